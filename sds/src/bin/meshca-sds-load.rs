//! Load generator for the meshca SDS server.
//!
//! Starts the server as a child process (this binary re-executed with `__serve`) on a Unix
//! socket, with a local CA in a temporary meshca home, then for each stream count N:
//! - cold start: opens fresh streams one at a time on an idle server and times the first
//!   secret (p50/p99);
//! - connections: opens N concurrent `StreamSecrets` (or `DeltaSecrets`) streams spread over
//!   several HTTP/2 connections, ACKs every response, and reads the server's resident memory
//!   (VmRSS) before and after: memory per stream;
//! - churn (`--churn K`): K times, a new connection, one stream, the first secret, then the
//!   client vanishes; twice, with the server's RSS after each batch (a leak shows as growth);
//! - rotation: sends SIGHUP (forced renewal) and times until every stream has the new
//!   certificate (p50, p99, all), several rounds;
//! - with `--ca-rotation` the streams subscribe to `ROOTCA` instead, the server polls the
//!   home every 2 s (the `sds serve` default), and each round runs `meshca ca rotate ca1
//!   --phase prepare` in-process and times until every stream has the new bundle (then
//!   activate and prune reset the CA for the next round).
//!
//! ```text
//! meshca-sds-load [--streams 1000,10000] [--per-conn 100] [--rounds 3] [--churn 5000] [--delta]
//!                 [--ca-rotation]
//! ```
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use meshca::bundle::BundleSpec;
use meshca::ca::{create_root, CaSpec};
use meshca::identity::{Sans, SpiffeId, TrustDomain};
use meshca::key::KeyAlgorithm;
use meshca::rotation::Request;
use meshca::store::rotate::{run_phase, RotateOptions};
use meshca::store::{LocalStore, Store};
use meshca_sds::{Listen, ServeConfig, SourceConfig, SECRET_TYPE_URL};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};

type Client = SecretDiscoveryServiceClient<Channel>;

#[derive(Debug)]
struct Opts {
    streams: Vec<usize>,
    per_conn: usize,
    rounds: usize,
    delta: bool,
    cold: usize,
    churn: usize,
    ca_rotation: bool,
}

fn usage() -> ! {
    eprintln!("usage: meshca-sds-load [--streams 1000,10000] [--per-conn 100] [--rounds 3] [--cold 300] [--churn 0] [--delta] [--ca-rotation]");
    std::process::exit(1)
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        streams: vec![1000, 10_000],
        per_conn: 100,
        rounds: 3,
        delta: false,
        cold: 300,
        churn: 0,
        ca_rotation: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--streams" => {
                o.streams = val()
                    .split(',')
                    .map(|s| s.trim().parse().unwrap_or_else(|_| usage()))
                    .collect()
            }
            "--per-conn" => o.per_conn = val().parse().unwrap_or_else(|_| usage()),
            "--rounds" => o.rounds = val().parse().unwrap_or_else(|_| usage()),
            "--cold" => o.cold = val().parse().unwrap_or_else(|_| usage()),
            "--churn" => o.churn = val().parse().unwrap_or_else(|_| usage()),
            "--delta" => o.delta = true,
            "--ca-rotation" => o.ca_rotation = true,
            _ => usage(),
        }
    }
    if o.per_conn == 0 || o.streams.contains(&0) {
        usage();
    }
    o
}

fn sans() -> Sans {
    Sans {
        spiffe_id: Some(
            SpiffeId::for_service_account(&TrustDomain::default(), "load", "client").unwrap(),
        ),
        ..Sans::default()
    }
}

/// The child: serve until SIGTERM.
fn serve_child(home: &Path, sock: &Path) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_writer(std::io::stderr)
        .init();
    let mut cfg = ServeConfig::new(
        SourceConfig::LocalCa {
            home: home.to_path_buf(),
            ca: "ca1".into(),
            bundle: Some("mesh".into()),
            sans: sans(),
            ttl: Some(Duration::from_secs(3600)),
            key: KeyAlgorithm::EcdsaP256,
            crl: false,
        },
        vec![Listen::Unix(sock.to_path_buf())],
    );
    let poll_ms = std::env::var("MESHCA_SDS_LOAD_POLL_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    cfg.rotation.poll_interval = Duration::from_millis(poll_ms);
    if let Err(e) = rt.block_on(meshca_sds::serve(cfg, meshca_sds::shutdown_signal())) {
        eprintln!("server: {e}");
        std::process::exit(2);
    }
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
}

async fn channel(sock: &Path) -> Channel {
    let path = sock.to_path_buf();
    Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .initial_connection_window_size(Some(16 * 1024 * 1024))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .expect("connect")
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Shared record of when each stream last received a push.
struct Board {
    base: Instant,
    last_ns: Vec<AtomicU64>,
    received: AtomicUsize,
}

fn sotw_req(names: &[&str], nonce: &str, version: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.into(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        type_url: SECRET_TYPE_URL.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

/// Opens one stream, waits for the first secret (returns its latency), then keeps ACKing
/// and recording pushes on the board until the stream ends.
async fn open_stream(
    mut client: Client,
    name: &'static str,
    delta: bool,
    slot: usize,
    board: Option<Arc<Board>>,
) -> Result<(Duration, tokio::task::JoinHandle<()>), String> {
    let (tx_first, rx_first) = tokio::sync::oneshot::channel();
    let start = Instant::now();
    let reader = if delta {
        let (tx, rx) = mpsc::channel(4);
        tx.send(DeltaDiscoveryRequest {
            type_url: SECRET_TYPE_URL.into(),
            resource_names_subscribe: vec![name.into()],
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
        let mut rs = client
            .delta_secrets(ReceiverStream::new(rx))
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        tokio::spawn(async move {
            let mut first = Some(tx_first);
            while let Ok(Some(r)) = rs.message().await {
                if let Some(f) = first.take() {
                    let _ = f.send(start.elapsed());
                } else if let Some(b) = &board {
                    b.last_ns[slot].store(b.base.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    b.received.fetch_add(1, Ordering::Relaxed);
                }
                let ack = DeltaDiscoveryRequest {
                    type_url: SECRET_TYPE_URL.into(),
                    response_nonce: r.nonce,
                    ..Default::default()
                };
                if tx.send(ack).await.is_err() {
                    break;
                }
            }
        })
    } else {
        let (tx, rx) = mpsc::channel(4);
        tx.send(sotw_req(&[name], "", ""))
            .await
            .map_err(|e| e.to_string())?;
        let mut rs = client
            .stream_secrets(ReceiverStream::new(rx))
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        tokio::spawn(async move {
            let mut first = Some(tx_first);
            while let Ok(Some(r)) = rs.message().await {
                if let Some(f) = first.take() {
                    let _ = f.send(start.elapsed());
                } else if let Some(b) = &board {
                    b.last_ns[slot].store(b.base.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    b.received.fetch_add(1, Ordering::Relaxed);
                }
                if tx
                    .send(sotw_req(&[name], &r.nonce, &r.version_info))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        })
    };
    let first = tokio::time::timeout(Duration::from_secs(60), rx_first)
        .await
        .map_err(|_| "no first secret within 60 s".to_string())?
        .map_err(|_| "stream ended before the first secret".to_string())?;
    Ok((first, reader))
}

struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        signal(self.0.id(), "-TERM");
        for _ in 0..50 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_child(home: &Path, sock: &Path, poll_ms: u64) -> ChildGuard {
    let exe = std::env::current_exe().expect("current exe");
    let child = ChildGuard(
        Command::new(exe)
            .env("MESHCA_SDS_LOAD_POLL_MS", poll_ms.to_string())
            .arg("__serve")
            .arg(home)
            .arg(sock)
            .stdin(Stdio::null())
            .spawn()
            .expect("start server"),
    );
    for _ in 0..200 {
        if sock.exists() {
            return child;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(child);
    panic!("server did not create {}", sock.display());
}

async fn run(opts: Opts) {
    let dir = tempfile::tempdir().expect("tempdir");
    let home: PathBuf = dir.path().join("home");
    let store = LocalStore::create(&home).expect("home");
    let ca = create_root(&CaSpec::root("ca1"), time::OffsetDateTime::now_utc()).expect("ca");
    store.save_ca(&ca, false).await.expect("save ca");
    store
        .save_bundle(&BundleSpec {
            name: "mesh".into(),
            cas: vec!["ca1".into()],
            file: None,
            namespaces: vec![],
        })
        .await
        .expect("bundle");
    let mode = if opts.delta {
        "DeltaSecrets"
    } else {
        "StreamSecrets"
    };
    println!(
        "# meshca SDS load ({mode}, Unix socket, {} streams per HTTP/2 connection)",
        opts.per_conn
    );
    println!(
        "host: {} CPUs; server and load generator share them",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );

    for &n in &opts.streams {
        let sock = dir.path().join(format!("sds-{n}.sock"));
        let poll_ms = if opts.ca_rotation { 2000 } else { 5000 };
        let child = start_child(&home, &sock, poll_ms);
        let pid = child.0.id();
        tokio::time::sleep(Duration::from_millis(300)).await;

        // Cold start on an idle server: fresh connection-level stream, first secret.
        let ch = channel(&sock).await;
        let mut cold = Vec::with_capacity(opts.cold);
        for _ in 0..opts.cold {
            let c = Client::new(ch.clone());
            let (tx, rx) = mpsc::channel(1);
            let t = Instant::now();
            tx.send(sotw_req(&["default"], "", "")).await.unwrap();
            let mut rs = c
                .clone()
                .stream_secrets(ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            rs.message().await.unwrap().unwrap();
            cold.push(t.elapsed());
            drop(tx);
        }
        cold.sort();
        drop(ch);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut churn_rss = vec![rss_kib(pid)];
        let t_churn = Instant::now();
        for _ in 0..2 {
            for _ in 0..opts.churn {
                let c = Client::new(channel(&sock).await);
                let (_, reader) = open_stream(c, "default", opts.delta, 0, None)
                    .await
                    .expect("churn stream");
                reader.abort();
                // Dropping the client and its connection here: the stream vanishes mid-way.
            }
            tokio::time::sleep(Duration::from_millis(1000)).await;
            churn_rss.push(rss_kib(pid));
        }
        let churn_time = t_churn.elapsed();
        let base_rss = rss_kib(pid);

        // N concurrent streams.
        let board = Arc::new(Board {
            base: Instant::now(),
            last_ns: (0..n).map(|_| AtomicU64::new(0)).collect(),
            received: AtomicUsize::new(0),
        });
        let conns = n.div_ceil(opts.per_conn);
        let mut channels = Vec::with_capacity(conns);
        for _ in 0..conns {
            channels.push(channel(&sock).await);
        }
        let t_open = Instant::now();
        let sem = Arc::new(tokio::sync::Semaphore::new(512));
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let client = Client::new(channels[i / opts.per_conn].clone());
            let (board, sem, delta) = (board.clone(), sem.clone(), opts.delta);
            let name = if opts.ca_rotation {
                "ROOTCA"
            } else {
                "default"
            };
            handles.push(tokio::spawn(async move {
                let _p = sem.acquire_owned().await.unwrap();
                open_stream(client, name, delta, i, Some(board))
                    .await
                    .map(|(d, _)| d)
            }));
        }
        let mut ramp = Vec::with_capacity(n);
        for h in handles {
            match h.await.unwrap() {
                Ok(d) => ramp.push(d),
                Err(e) => panic!("stream failed: {e}"),
            }
        }
        let open_time = t_open.elapsed();
        ramp.sort();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss = rss_kib(pid);
        let per_stream = (rss.saturating_sub(base_rss)) as f64 * 1024.0 / n as f64;

        println!();
        println!("## N = {n} streams ({conns} connections)");
        println!("| measure | value |");
        println!("|---|---|");
        println!(
            "| cold start, first secret, idle server (p50 / p99, {} samples) | {} / {} |",
            cold.len(),
            ms(pct(&cold, 0.5)),
            ms(pct(&cold, 0.99))
        );
        println!(
            "| first secret while opening {n} streams, 512 in flight (p50 / p99) | {} / {} |",
            ms(pct(&ramp, 0.5)),
            ms(pct(&ramp, 0.99))
        );
        println!("| time to open all {n} streams | {} |", ms(open_time));
        println!(
            "| server RSS idle / with {n} streams | {:.1} MiB / {:.1} MiB |",
            base_rss as f64 / 1024.0,
            rss as f64 / 1024.0
        );
        println!("| server RSS per stream | {:.1} KiB |", per_stream / 1024.0);
        if opts.churn > 0 {
            println!(
                "| churn: 2 x {} vanishing clients (connection + stream each, {}) : RSS before / after 1st / after 2nd | {:.1} / {:.1} / {:.1} MiB |",
                opts.churn,
                ms(churn_time),
                churn_rss[0] as f64 / 1024.0,
                churn_rss[1] as f64 / 1024.0,
                churn_rss[2] as f64 / 1024.0
            );
        }

        // Rotation fan-out rounds.
        for round in 1..=opts.rounds {
            let before = board.received.load(Ordering::Relaxed);
            let t0 = board.base.elapsed().as_nanos() as u64;
            if opts.ca_rotation {
                ca_phase(&store, Request::Prepare).await;
            } else {
                signal(pid, "-HUP");
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            while board.received.load(Ordering::Relaxed) < before + n && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let got = board.received.load(Ordering::Relaxed) - before;
            let mut lat: Vec<Duration> = board
                .last_ns
                .iter()
                .map(|a| a.load(Ordering::Relaxed))
                .filter(|t| *t >= t0)
                .map(|t| Duration::from_nanos(t - t0))
                .collect();
            lat.sort();
            let what = if opts.ca_rotation {
                "CA rotation (prepare to new ROOTCA, 2 s poll)"
            } else {
                "rotation"
            };
            println!(
                "| {what} round {round}: streams updated / p50 / p99 / all | {got}/{n} / {} / {} / {} |",
                ms(pct(&lat, 0.5)),
                ms(pct(&lat, 0.99)),
                ms(lat.last().copied().unwrap_or_default())
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
            if opts.ca_rotation {
                // Back to one root, and let those pushes pass before the next round.
                ca_phase(&store, Request::Activate).await;
                tokio::time::sleep(Duration::from_millis(2500)).await;
                ca_phase(&store, Request::Prune).await;
                tokio::time::sleep(Duration::from_millis(2500)).await;
            }
        }
        let rss_after = rss_kib(pid);
        println!(
            "| server RSS after rotations | {:.1} MiB |",
            rss_after as f64 / 1024.0
        );
        drop(channels);
        drop(child);
    }
}

/// Runs one phase of `meshca ca rotate ca1` on the load test's home (prune forced: the
/// server's own certificate from the old CA is live in the ledger).
async fn ca_phase(store: &LocalStore, req: Request) {
    let opts = RotateOptions {
        force: true,
        ..Default::default()
    };
    run_phase(store, "ca1", req, &opts, time::OffsetDateTime::now_utc())
        .await
        .expect("rotation phase");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("__serve") && args.len() == 4 {
        serve_child(Path::new(&args[2]), Path::new(&args[3]));
        return;
    }
    let opts = parse_opts();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(opts));
}
