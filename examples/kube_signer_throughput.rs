//! In-process signing throughput of the CSR controller's reconcile against a mock API server
//! that accepts every write at once. This measures meshca's own cost per CSR (parse, verify,
//! policy, sign, JSON patch, client pipeline, handing the ledger record to the batching
//! writer), not a real API server's; see docs/kubernetes.md. The ledger writer here accepts
//! every batch at once and counts the records.
//!
//! ```text
//! cargo run --release --features kube --example kube_signer_throughput -- [COUNT] [CONCURRENCY]
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures::StreamExt;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use meshca::ca::{create_root, CaSpec};
use meshca::issue::{Issuer, LocalIssuer};
use meshca::kube::issuers::IssuerSet;
use meshca::kube::ledger::{IssuedRecord, LedgerSink, LedgerWriter};
use meshca::kube::metrics::Metrics;
use meshca::kube::ratelimit::RateLimiter;
use meshca::kube::signer::{Signer, SignerConfig};
use serde_json::json;

#[derive(Debug, Default)]
struct CountingLedger(AtomicUsize);

#[async_trait::async_trait]
impl LedgerWriter for CountingLedger {
    async fn append(&self, records: &[IssuedRecord]) -> meshca::error::Result<()> {
        self.0.fetch_add(records.len(), Ordering::Relaxed);
        Ok(())
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let count: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let concurrency: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(16);

    let writes = Arc::new(AtomicUsize::new(0));
    let w = writes.clone();
    // The mock API server: every PATCH succeeds with a minimal CSR body.
    let svc = tower::service_fn(move |req: http::Request<kube::client::Body>| {
        let w = w.clone();
        async move {
            assert_eq!(req.method(), http::Method::PATCH);
            w.fetch_add(1, Ordering::Relaxed);
            let body = serde_json::to_vec(&json!({
                "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
                "metadata": {"name": "x"}, "spec": {"request": "", "signerName": "meshca.io/mesh"}
            }))
            .unwrap();
            Ok::<_, std::convert::Infallible>(
                http::Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(body))
                    .unwrap(),
            )
        }
    });
    let client = kube::Client::new(svc, "default");
    let ca = create_root(&CaSpec::root("mesh"), time::OffsetDateTime::now_utc()).unwrap();
    let issuers: BTreeMap<String, Arc<dyn Issuer>> = [(
        "mesh".to_string(),
        Arc::new(LocalIssuer::new(ca).unwrap()) as Arc<dyn Issuer>,
    )]
    .into_iter()
    .collect();
    let metrics = Arc::new(Metrics::new());
    let ledger = Arc::new(CountingLedger::default());
    let (sink, ledger_task) = LedgerSink::spawn(ledger.clone(), metrics.clone());
    let signer = Arc::new(
        Signer::new(
            client,
            IssuerSet::watch_fixed(issuers),
            SignerConfig {
                concurrency: concurrency as u16,
                ..SignerConfig::default()
            },
            metrics,
            Arc::new(RateLimiter::new(0.0, 1)),
            meshca::kube::leader::always_leader(),
            Arc::new(meshca::clock::SystemClock),
        )
        .with_ledger(sink),
    );

    let csrs: Vec<CertificateSigningRequest> = (0..count)
        .map(|i| {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let mut p = rcgen::CertificateParams::default();
            p.subject_alt_names = vec![
                rcgen::SanType::URI(format!("spiffe://cluster.local/ns/load/sa/w{i}").try_into().unwrap()),
                rcgen::SanType::DnsName(format!("w{i}.load.svc").try_into().unwrap()),
            ];
            let pem = p.serialize_request(&key).unwrap().pem().unwrap();
            serde_json::from_value(json!({
                "metadata": {"name": format!("c{i}"), "resourceVersion": "1"},
                "spec": {
                    // The requester the API server would record: the workload's own
                    // ServiceAccount, which the policy binds to its SPIFFE ID and DNS name.
                    "username": format!("system:serviceaccount:load:w{i}"),
                    "request": base64::engine::general_purpose::STANDARD.encode(pem.as_bytes()),
                    "signerName": "meshca.io/mesh",
                    "usages": ["digital signature", "server auth", "client auth"],
                    "expirationSeconds": 3600,
                },
                "status": {"conditions": [{"type": "Approved", "status": "True", "reason": "Load", "message": "x"}]},
            }))
            .unwrap()
        })
        .collect();

    let start = Instant::now();
    let mut lat: Vec<Duration> = futures::stream::iter(csrs)
        .map(|c| {
            let s = signer.clone();
            async move {
                let t = Instant::now();
                s.reconcile(&c).await.expect("reconcile");
                t.elapsed()
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let total = start.elapsed();
    lat.sort();
    let p = |q: f64| lat[((lat.len() as f64 - 1.0) * q).round() as usize];
    assert_eq!(
        writes.load(Ordering::Relaxed),
        count,
        "one status write per CSR"
    );
    assert_eq!(signer.metrics().csrs_signed.get(), count as u64);
    drop(signer);
    meshca::kube::ledger::flush(ledger_task, Duration::from_secs(30)).await;
    assert_eq!(
        ledger.0.load(Ordering::Relaxed),
        count,
        "one ledger record per CSR"
    );
    println!("mock API, in-process: {count} CSRs signed in {total:.2?} = {:.0} CSR/s (concurrency {concurrency})", count as f64 / total.as_secs_f64());
    println!(
        "per-reconcile latency: p50 {:.2?}  p99 {:.2?}  max {:.2?}",
        p(0.5),
        p(0.99),
        lat[lat.len() - 1]
    );
}
