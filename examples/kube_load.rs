//! Load tool: creates N approved CSRs for `meshca.io/<ca>` at once against a real cluster
//! where `meshca signer run` is serving that CA, and reports the time until all are signed and
//! the p50/p99 creation-to-issued latency.
//!
//! ```text
//! cargo run --release --features kube --example kube_load -- --ca mesh --count 1000 [--kubeconfig PATH] [--parallel 64]
//! ```
//! Latency of one CSR = from the moment its create call returned to the moment a watch event
//! showed its `status.certificate`, both measured on this machine's monotonic clock. The CSRs
//! are labelled `meshca-load=<run id>` and deleted at the end.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use serde_json::json;

struct Args {
    ca: String,
    count: usize,
    parallel: usize,
    kubeconfig: Option<std::path::PathBuf>,
    timeout: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        ca: String::new(),
        count: 1000,
        parallel: 64,
        kubeconfig: None,
        timeout: Duration::from_secs(600),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--ca" => a.ca = val()?,
            "--count" => a.count = val()?.parse().map_err(|e| format!("--count: {e}"))?,
            "--parallel" => a.parallel = val()?.parse().map_err(|e| format!("--parallel: {e}"))?,
            "--kubeconfig" => a.kubeconfig = Some(val()?.into()),
            "--timeout" => {
                a.timeout =
                    humantime::parse_duration(&val()?).map_err(|e| format!("--timeout: {e}"))?
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if a.ca.is_empty() {
        return Err("--ca NAME is required".into());
    }
    Ok(a)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main]
async fn main() {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("kube_load: {e}");
            std::process::exit(1);
        }
    };
    let client = meshca::kube::client(a.kubeconfig.as_deref())
        .await
        .unwrap_or_else(|e| {
            eprintln!("kube_load: {e}");
            std::process::exit(1);
        });
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let run_id = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    );
    let selector = format!("meshca-load={run_id}");

    // Pre-generate the requests so that key generation is not part of the measurement.
    let requests: Vec<String> = (0..a.count)
        .map(|i| {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let mut p = rcgen::CertificateParams::default();
            p.subject_alt_names = vec![rcgen::SanType::DnsName(
                format!("load-{i}.load.svc").try_into().unwrap(),
            )];
            p.serialize_request(&key).unwrap().pem().unwrap()
        })
        .collect();

    // Watch first, so no certificate event is missed.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let wc = watcher::Config::default().labels(&selector);
    let watch_api = api.clone();
    let watch_task = tokio::spawn(async move {
        let mut s = watcher(watch_api, wc).applied_objects().boxed();
        while let Ok(Some(c)) = s.try_next().await {
            if c.status
                .as_ref()
                .and_then(|s| s.certificate.as_ref())
                .is_some_and(|b| !b.0.is_empty())
            {
                let _ = tx.send((c.metadata.name.unwrap_or_default(), Instant::now()));
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;

    let start = Instant::now();
    let signer = format!("meshca.io/{}", a.ca);
    let created: HashMap<String, Instant> = futures::stream::iter(requests.into_iter().enumerate())
        .map(|(i, pem)| {
            let api = api.clone();
            let (signer, run_id) = (signer.clone(), run_id.clone());
            async move {
                let name = format!("meshca-load-{run_id}-{i}");
                let csr: CertificateSigningRequest = serde_json::from_value(json!({
                    "metadata": {"name": name, "labels": {"meshca-load": run_id}},
                    "spec": {
                        "request": base64::engine::general_purpose::STANDARD.encode(pem.as_bytes()),
                        "signerName": signer,
                        "usages": ["digital signature", "server auth", "client auth"],
                        "expirationSeconds": 3600,
                    }
                }))
                .unwrap();
                api.create(&PostParams::default(), &csr).await.expect("create CSR");
                let t = Instant::now();
                let approval = json!({"status": {"conditions": [{
                    "type": "Approved", "status": "True", "reason": "LoadTest", "message": "approved by kube_load"}]}});
                api.patch_approval(&name, &PatchParams::default(), &Patch::Merge(&approval)).await.expect("approve CSR");
                (name, t)
            }
        })
        .buffer_unordered(a.parallel.max(1))
        .collect()
        .await;
    let created_in = start.elapsed();

    let mut latencies = Vec::with_capacity(a.count);
    let deadline = tokio::time::Instant::now() + a.timeout;
    let mut seen = std::collections::HashSet::new();
    while seen.len() < a.count {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((name, t))) => {
                if let Some(c) = created.get(&name) {
                    if seen.insert(name) {
                        latencies.push(t.saturating_duration_since(*c));
                    }
                }
            }
            _ => break,
        }
    }
    let total = start.elapsed();
    watch_task.abort();
    latencies.sort();
    let _ = api
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels(&selector),
        )
        .await;

    println!(
        "CSRs created and approved: {} in {:.2?}",
        created.len(),
        created_in
    );
    println!(
        "signed: {}/{} in {:.2?} ({:.1} CSR/s)",
        seen.len(),
        a.count,
        total,
        seen.len() as f64 / total.as_secs_f64()
    );
    println!(
        "creation-to-issued latency: p50 {:.1?}  p99 {:.1?}  max {:.1?}",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default()
    );
    if seen.len() < a.count {
        eprintln!(
            "kube_load: timed out with {} CSRs unsigned",
            a.count - seen.len()
        );
        std::process::exit(2);
    }
}
