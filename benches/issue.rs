//! Criterion benchmarks of in-process issuance with the local CA.
//!
//! ```text
//! cargo bench --bench issue
//! ```
//!
//! - `issue_workload/ecdsa-p256`: keygen + policy + sign + DER, then the chain PEM and the
//!   PKCS#8 key PEM (everything `meshca issue` computes before writing files).
//! - `sign_csr/ecdsa-p256`: sign-only from an already checked CSR ([`LocalIssuer::sign_now`]).
//! - `issue_csr/ecdsa-p256`: a CSR end to end (parse, proof of possession, policy, sign, PEM).
//!
//! The numbers in docs/performance.md come from `bench/compare.sh`, which also measures
//! `openssl speed` and Python `cryptography` in the same run.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use meshca::ca::{create_root, CaSpec};
use meshca::identity::{DnsName, Sans, SpiffeId, TrustDomain};
use meshca::issue::{check_csr, issue_csr, issue_workload, CsrOptions, LocalIssuer};
use meshca::key::KeyAlgorithm;
use time::OffsetDateTime;

fn sans() -> Sans {
    let td = TrustDomain::default();
    Sans {
        spiffe_id: Some(SpiffeId::for_service_account(&td, "bench", "workload").unwrap()),
        dns: vec![DnsName::parse("workload.bench.svc.cluster.local").unwrap()],
        ips: Vec::new(),
    }
}

fn csr_der() -> Vec<u8> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["workload.bench.svc.cluster.local".to_string()])
            .unwrap();
    params.subject_alt_names.push(rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from("spiffe://cluster.local/ns/bench/sa/workload").unwrap(),
    ));
    params.serialize_request(&key).unwrap().der().to_vec()
}

fn bench_issue(c: &mut Criterion) {
    let now = OffsetDateTime::now_utc();
    let issuer = LocalIssuer::new(create_root(&CaSpec::root("bench"), now).unwrap()).unwrap();
    let sans = sans();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();

    let mut g = c.benchmark_group("issue_workload");
    g.throughput(Throughput::Elements(1));
    g.bench_function("ecdsa-p256", |b| {
        b.iter(|| {
            let w = rt
                .block_on(issue_workload(
                    &issuer,
                    &sans,
                    None,
                    KeyAlgorithm::EcdsaP256,
                    now,
                ))
                .unwrap();
            (w.cert.chain_pem(), w.key.to_pkcs8_pem())
        })
    });
    g.finish();

    let csr = csr_der();
    let req = check_csr(&issuer, &csr, &CsrOptions::default()).unwrap();
    let mut g = c.benchmark_group("sign_csr");
    g.throughput(Throughput::Elements(1));
    g.bench_function("ecdsa-p256", |b| {
        b.iter(|| issuer.sign_now(&req, now).unwrap().chain_pem())
    });
    g.finish();

    let mut g = c.benchmark_group("issue_csr");
    g.throughput(Throughput::Elements(1));
    g.bench_function("ecdsa-p256", |b| {
        b.iter(|| {
            rt.block_on(issue_csr(&issuer, &csr, &CsrOptions::default(), now))
                .unwrap()
                .chain_pem()
        })
    });
    g.finish();
}

criterion_group!(benches, bench_issue);
criterion_main!(benches);
