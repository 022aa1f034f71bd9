//! Issuance latency and throughput through the ACM PCA backend against a PCA endpoint
//! (moto locally: an upper bound, since moto signs in-process with no network or HSM).
//!
//! ```text
//! moto_server -H 127.0.0.1 -p 5000 &
//! MESHCA_MOTO_ENDPOINT=http://127.0.0.1:5000 cargo run --release --features aws-pca --example pca_bench
//! ```
//! Optional: PCA_BENCH_N (sequential issues, default 200), PCA_BENCH_CONC (parallel tasks,
//! default 16), PCA_BENCH_TOTAL (parallel issues, default 400).

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshca::acm::{create_root_pca, LimiterConfig, PcaOptions};
use meshca::ca::CaSpec;
use meshca::identity::{Sans, SpiffeId, TrustDomain};
use meshca::issue::acm_pca::AcmPcaIssuer;
use meshca::issue::issue_workload;
use meshca::key::KeyAlgorithm;

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn sans(i: usize) -> Sans {
    Sans {
        spiffe_id: Some(
            SpiffeId::for_service_account(&TrustDomain::default(), "bench", &format!("sa{i}"))
                .unwrap(),
        ),
        ..Sans::default()
    }
}

/// moto issues for a fixed 365 days; asking for that keeps meshca's validity check happy.
const TTL: Duration = Duration::from_secs(365 * 24 * 3600);

async fn run_parallel(
    issuer: Arc<AcmPcaIssuer>,
    conc: usize,
    total: usize,
) -> (Duration, usize, usize, Vec<Duration>) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (issuer, next) = (issuer.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut failed, mut lat) = (0, 0, Vec::new());
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let t = Instant::now();
                let now = time::OffsetDateTime::now_utc();
                match issue_workload(
                    issuer.as_ref(),
                    &sans(i),
                    Some(TTL),
                    KeyAlgorithm::EcdsaP256,
                    now,
                )
                .await
                {
                    Ok(_) => {
                        ok += 1;
                        lat.push(t.elapsed());
                    }
                    Err(_) => failed += 1,
                }
            }
            (ok, failed, lat)
        }));
    }
    let (mut ok, mut failed, mut lat) = (0, 0, Vec::new());
    for t in tasks {
        let (o, f, l) = t.await.unwrap();
        ok += o;
        failed += f;
        lat.extend(l);
    }
    lat.sort();
    (start.elapsed(), ok, failed, lat)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Ok(ep) = std::env::var("MESHCA_MOTO_ENDPOINT") else {
        eprintln!("set MESHCA_MOTO_ENDPOINT=http://127.0.0.1:PORT (a running moto_server)");
        std::process::exit(2);
    };
    if std::env::var("AWS_ACCESS_KEY_ID").is_err() {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    }
    let n = env_usize("PCA_BENCH_N", 200);
    let conc = env_usize("PCA_BENCH_CONC", 16);
    let total = env_usize("PCA_BENCH_TOTAL", 400);
    let base = PcaOptions {
        region: Some("us-east-1".into()),
        endpoint: Some(ep),
        ..PcaOptions::default()
    };
    let mut spec = CaSpec::root("bench");
    spec.policy.max_ttl = Duration::from_secs(400 * 24 * 3600);
    let now = time::OffsetDateTime::now_utc();
    let t = Instant::now();
    let ca = create_root_pca(&spec, &base, now)
        .await
        .expect("create root PCA");
    println!(
        "create+activate root PCA: {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let copy = |ca: &meshca::ca::CaMaterial| meshca::ca::CaMaterial {
        meta: ca.meta.clone(),
        cert: ca.cert.clone(),
        parents: ca.parents.clone(),
        key: None,
    };

    // Unlimited client-side rate: what the backend path itself costs.
    let fast = PcaOptions {
        limiter: LimiterConfig {
            rate_per_sec: 1e6,
            burst: 1_000_000,
            max_wait: Duration::from_secs(60),
        },
        ..base.clone()
    };
    let issuer = Arc::new(AcmPcaIssuer::connect(copy(&ca), &fast).await.unwrap());
    let (wall, ok, failed, lat) = run_parallel(issuer.clone(), 1, n).await;
    println!(
        "sequential: {ok} ok, {failed} failed in {:.2}s; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        wall.as_secs_f64(),
        pct(&lat, 0.5).as_secs_f64() * 1e3,
        pct(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().unwrap().as_secs_f64() * 1e3
    );
    let (wall, ok, failed, lat) = run_parallel(issuer.clone(), conc, total).await;
    println!(
        "parallel x{conc}: {ok} ok, {failed} failed in {:.2}s = {:.1} certs/s; latency p50 {:.1} ms, p99 {:.1} ms",
        wall.as_secs_f64(),
        ok as f64 / wall.as_secs_f64(),
        pct(&lat, 0.5).as_secs_f64() * 1e3,
        pct(&lat, 0.99).as_secs_f64() * 1e3
    );

    // Default limiter: a burst of 60 renewals at once.
    let limited = Arc::new(AcmPcaIssuer::connect(copy(&ca), &base).await.unwrap());
    let before = limited.client().calls();
    let (wall, ok, failed, _) = run_parallel(limited.clone(), 60, 60).await;
    println!(
        "default limiter ({}/s, burst {}, max wait {}s), 60 at once: {ok} ok, {failed} shed in {:.2}s; IssueCertificate+GetCertificate calls {}",
        meshca::acm::limiter::DEFAULT_RATE_PER_SEC,
        meshca::acm::limiter::DEFAULT_BURST,
        meshca::acm::limiter::DEFAULT_MAX_WAIT.as_secs(),
        wall.as_secs_f64(),
        limited.client().calls() - before
    );
}
