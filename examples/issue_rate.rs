//! Measures in-process issuance throughput on one thread and prints machine-readable lines.
//!
//! ```text
//! cargo run --release --example issue_rate -- [SECONDS [NAME...]]
//! ```
//!
//! With NAMEs, only those measurements run (for profiling one of them).
//!
//! Output, one line per measurement:
//! `name certs_per_cpu_second iterations cpu_seconds cpu certs_per_wall_second`. Rates are
//! per second of this thread's CPU time (user + system, from `/proc/thread-self/schedstat`),
//! as `openssl speed` divides by CPU time; where that file is missing the clock is `wall`.
//!
//! - `issue_workload`: ECDSA P-256 keygen + policy check + sign + DER, then the PEM of the
//!   chain and the PKCS#8 key (what `meshca issue` writes), through [`issue_workload`] and a
//!   [`LocalIssuer`].
//! - `sign_csr`: sign-only from an already checked CSR ([`LocalIssuer::sign_now`]) + PEM.
//! - `issue_csr`: a CSR end to end: parse, proof-of-possession check, policy, sign, PEM.
//! - `parse_leaf`, `keygen` (only when named): the x509-parser read-back of an issued leaf
//!   into [`meshca::x509::CertInfo`], and ECDSA P-256 key generation alone.
//!
//! `bench/compare.sh` runs it next to `openssl speed` and Python `cryptography`.

use std::time::{Duration, Instant};

use meshca::ca::{create_root, CaSpec};
use meshca::identity::{DnsName, Sans, SpiffeId, TrustDomain};
use meshca::issue::{check_csr, issue_csr, issue_workload, CsrOptions, LocalIssuer};
use meshca::key::KeyAlgorithm;
use time::OffsetDateTime;

/// CPU time this thread has run (user + system), from `/proc/thread-self/schedstat`.
/// `openssl speed` divides by CPU time too, so rates stay comparable on a busy machine.
fn thread_cpu_time() -> Option<Duration> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = s.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

fn measure(name: &str, budget: Duration, mut f: impl FnMut() -> usize) {
    let only: Vec<String> = std::env::args().skip(2).collect();
    if !only.is_empty() && !only.iter().any(|o| o == name) {
        return;
    }
    // Warm up (page faults, lazy initialisation in the crypto library).
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_millis(200) {
        std::hint::black_box(f());
    }
    // Run for `budget` of CPU time (wall time where /proc is unavailable), at most 10x
    // `budget` of wall time.
    let cpu0 = thread_cpu_time();
    let cpu = || thread_cpu_time().zip(cpu0).map(|(now, start)| now - start);
    let start = Instant::now();
    let mut n: u64 = 0;
    let mut bytes = 0usize;
    loop {
        let spent = cpu().unwrap_or_else(|| start.elapsed());
        if spent >= budget || start.elapsed() >= budget * 10 {
            break;
        }
        for _ in 0..64 {
            bytes = bytes.wrapping_add(f());
            n += 1;
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let (secs, clock) = match cpu() {
        Some(c) => (c.as_secs_f64(), "cpu"),
        None => (wall, "wall"),
    };
    std::hint::black_box(bytes);
    println!(
        "{name} {:.1} {n} {secs:.3} {clock} {:.1}",
        n as f64 / secs,
        n as f64 / wall
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let seconds: f64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(3.0);
    let budget = Duration::from_secs_f64(seconds);
    let now = OffsetDateTime::now_utc();
    let issuer = LocalIssuer::new(create_root(&CaSpec::root("bench"), now)?)?;
    let td = TrustDomain::default();
    let sans = Sans {
        spiffe_id: Some(SpiffeId::for_service_account(&td, "bench", "workload")?),
        dns: vec![DnsName::parse("workload.bench.svc.cluster.local")?],
        ips: Vec::new(),
    };
    let rt = tokio::runtime::Builder::new_current_thread().build()?;

    measure("issue_workload", budget, || {
        let w = rt
            .block_on(issue_workload(
                &issuer,
                &sans,
                None,
                KeyAlgorithm::EcdsaP256,
                now,
            ))
            .expect("issue");
        w.cert.chain_pem().len() + w.key.to_pkcs8_pem().len()
    });

    // A CSR made once by a workload (rcgen), signed repeatedly.
    let wkey = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params =
        rcgen::CertificateParams::new(vec!["workload.bench.svc.cluster.local".to_string()])?;
    params
        .subject_alt_names
        .push(rcgen::SanType::URI(rcgen::string::Ia5String::try_from(
            "spiffe://cluster.local/ns/bench/sa/workload",
        )?));
    let csr_der = params.serialize_request(&wkey)?.der().to_vec();
    let req = check_csr(&issuer, &csr_der, &CsrOptions::default())?;

    measure("sign_csr", budget, || {
        let c = issuer.sign_now(&req, now).expect("sign");
        c.chain_pem().len()
    });
    measure("issue_csr", budget, || {
        let c = rt
            .block_on(issue_csr(&issuer, &csr_der, &CsrOptions::default(), now))
            .expect("issue csr");
        c.chain_pem().len()
    });
    // Parts of the above, for profiling (only run when named).
    if std::env::args().skip(2).count() > 0 {
        let leaf = issuer.sign_now(&req, now)?.leaf;
        measure("parse_leaf", budget, || {
            meshca::x509::CertInfo::from_der(&leaf)
                .expect("parse")
                .serial
                .len()
        });
        measure("keygen", budget, || {
            KeyAlgorithm::EcdsaP256
                .generate()
                .expect("keygen")
                .public_key_der()
                .len()
        });
    }
    Ok(())
}
