//! Criterion benchmark of in-process policy decisions (what `meshca policy check`, the CSR
//! signer, the auto-approver and the managed-Secret controller each run per request).
//!
//! ```text
//! cargo bench --bench policy
//! ```
//!
//! - `policy/templated`: a service account asking the CSR signer for its own SPIFFE ID and two
//!   DNS names under `spiffe://{td}/ns/{ns}/sa/{sa}` and `{sa}.{ns}.svc[.cluster.local]`.
//! - `policy/glob`: a local-operator request under `spiffe://{td}/ns/mesh/sa/*` and
//!   `**.example.com`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use meshca::identity::{DnsName, Sans, SpiffeId, TrustDomain};
use meshca::key::PublicKeyKind;
use meshca::policy::{FrontEnd, Policy, PolicyRequest, Requester, Usages};

fn sans(id: &str, dns: &[&str]) -> Sans {
    Sans {
        spiffe_id: Some(SpiffeId::parse(id).unwrap()),
        dns: dns.iter().map(|d| DnsName::parse(d).unwrap()).collect(),
        ips: Vec::new(),
    }
}

fn bench_policy(c: &mut Criterion) {
    let td = TrustDomain::default();
    let templated = Policy {
        allowed_spiffe_ids: vec!["spiffe://{td}/ns/{ns}/sa/{sa}".into()],
        allowed_dns: vec!["{sa}.{ns}.svc".into(), "{sa}.{ns}.svc.cluster.local".into()],
        ..Policy::default()
    };
    let own = sans(
        "spiffe://cluster.local/ns/app/sa/blue",
        &["blue.app.svc", "blue.app.svc.cluster.local"],
    );
    let sa = Requester::kube("system:serviceaccount:app:blue");
    let op = Requester::LocalOperator;
    let usages = Usages::default();
    let glob = Policy {
        allowed_spiffe_ids: vec!["spiffe://{td}/ns/mesh/sa/*".into()],
        allowed_dns: vec!["**.example.com".into()],
        ..Policy::default()
    };
    let op_sans = sans(
        "spiffe://cluster.local/ns/mesh/sa/api",
        &["api.eu.example.com", "api.us.example.com"],
    );

    let mut g = c.benchmark_group("policy");
    g.throughput(Throughput::Elements(1));
    g.bench_function("templated", |b| {
        b.iter(|| {
            let req = PolicyRequest {
                via: FrontEnd::CsrSigner,
                requester: &sa,
                sans: black_box(&own),
                ttl: None,
                key: PublicKeyKind::Ecdsa { bits: 256 },
                wants_ca: false,
                usages: &usages,
            };
            templated.decide("mesh", &td, &req).unwrap()
        })
    });
    g.bench_function("glob", |b| {
        b.iter(|| {
            let req = PolicyRequest {
                via: FrontEnd::Local,
                requester: &op,
                sans: black_box(&op_sans),
                ttl: None,
                key: PublicKeyKind::Ecdsa { bits: 256 },
                wants_ca: false,
                usages: &usages,
            };
            glob.decide("mesh", &td, &req).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench_policy);
criterion_main!(benches);
