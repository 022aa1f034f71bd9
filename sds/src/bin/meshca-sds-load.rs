//! Load generator for the meshca SDS server.
//!
//! Starts the server as a child process (this binary re-executed with `__serve`) with a local
//! CA in a temporary meshca home, on each `--transport` in turn (a Unix socket, plaintext TCP
//! on 127.0.0.1, or TCP with mutual TLS: the client presents a certificate on the server's
//! allow-list), then for each stream count N:
//! - fresh connections: connect (and handshake), open a stream, time the first secret;
//! - cold start: opens fresh streams one at a time on an idle server and times the first
//!   secret (p50/p99);
//! - connections: opens N concurrent `StreamSecrets` (or `DeltaSecrets`) streams spread over
//!   several HTTP/2 connections, ACKs every response, and reads the server's resident memory
//!   (VmRSS) before and after: memory per stream;
//! - churn (`--churn K`): K times, a new connection, one stream, the first secret, then the
//!   client vanishes; twice, with the server's RSS after each batch (a leak shows as growth);
//! - rotation: sends SIGHUP (forced renewal) and times until every stream has the new
//!   certificate (p50, p99, all), several rounds;
//! - with `--ca-rotation` the streams subscribe to `ROOTCA` instead, the server watches the
//!   home (as `sds serve` does; the 2 s poll is only its fallback), and each round runs `meshca ca rotate ca1
//!   --phase prepare` in-process and times until every stream has the new bundle (then
//!   activate and prune reset the CA for the next round).
//!
//! ```text
//! meshca-sds-load [--streams 1000,10000] [--per-conn 100] [--rounds 3] [--churn 5000] [--delta]
//!                 [--cold 300] [--cold-conn 100] [--transport unix,tcp,tls] [--ca-rotation]
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
    cold_conn: usize,
    churn: usize,
    transports: Vec<Transport>,
    ca_rotation: bool,
}

/// How the load generator reaches the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    /// Unix socket.
    Unix,
    /// Plaintext TCP on 127.0.0.1.
    Tcp,
    /// TCP on 127.0.0.1 with mutual TLS (client certificate on the allow-list).
    Tls,
}

impl Transport {
    fn parse(s: &str) -> Option<Transport> {
        match s {
            "unix" => Some(Transport::Unix),
            "tcp" => Some(Transport::Tcp),
            "tls" => Some(Transport::Tls),
            _ => None,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Transport::Unix => "Unix socket",
            Transport::Tcp => "TCP 127.0.0.1, plaintext",
            Transport::Tls => "TCP 127.0.0.1, mutual TLS",
        }
    }
}

fn usage() -> ! {
    eprintln!("usage: meshca-sds-load [--streams 1000,10000] [--per-conn 100] [--rounds 3] [--cold 300] [--cold-conn 100] [--churn 0] [--delta] [--transport unix,tcp,tls] [--ca-rotation]");
    std::process::exit(1)
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        streams: vec![1000, 10_000],
        per_conn: 100,
        rounds: 3,
        delta: false,
        cold: 300,
        cold_conn: 100,
        churn: 0,
        transports: vec![Transport::Unix],
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
            "--cold-conn" => o.cold_conn = val().parse().unwrap_or_else(|_| usage()),
            "--transport" => {
                o.transports = val()
                    .split(',')
                    .map(|s| Transport::parse(s.trim()).unwrap_or_else(|| usage()))
                    .collect()
            }
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

/// The SPIFFE ID the load generator's client certificate carries (on the allow-list).
const CLIENT_ID: &str = "spiffe://cluster.local/ns/load/sa/generator";

/// The child: serve on `listen` until SIGTERM; with `tls_dir`, mutual TLS from
/// `server.crt`, `server.key` and `ca.crt` there.
fn serve_child(home: &Path, listen: &str, tls_dir: Option<&Path>) {
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
        vec![Listen::parse(listen).expect("listen address")],
    );
    let poll_ms = std::env::var("MESHCA_SDS_LOAD_POLL_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    cfg.rotation.poll_interval = Duration::from_millis(poll_ms);
    cfg.tls = tls_dir.map(|d| meshca_sds::TlsConfig {
        cert: d.join("server.crt"),
        key: d.join("server.key"),
        client_ca: d.join("ca.crt"),
        allow: meshca_sds::ClientAllowList {
            spiffe_ids: vec![SpiffeId::parse(CLIENT_ID).expect("id")],
            subjects: vec![],
        },
    });
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

/// Where and how the server is reached.
#[derive(Clone)]
struct Target {
    transport: Transport,
    sock: PathBuf,
    addr: std::net::SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Target {
    /// The `--listen` value for the server.
    fn listen(&self) -> String {
        match self.transport {
            Transport::Unix => format!("unix:{}", self.sock.display()),
            Transport::Tcp | Transport::Tls => format!("tcp:{}", self.addr),
        }
    }

    fn ready(&self) -> bool {
        match self.transport {
            Transport::Unix => self.sock.exists(),
            Transport::Tcp | Transport::Tls => std::net::TcpStream::connect(self.addr).is_ok(),
        }
    }

    /// A new HTTP/2 connection.
    async fn channel(&self) -> Channel {
        let t = self.clone();
        Endpoint::try_from("http://localhost")
            .unwrap()
            .initial_connection_window_size(Some(16 * 1024 * 1024))
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let t = t.clone();
                async move {
                    let io: Box<dyn Io> = match (t.transport, &t.tls) {
                        (Transport::Unix, _) => {
                            Box::new(tokio::net::UnixStream::connect(&t.sock).await?)
                        }
                        (Transport::Tcp, _) | (Transport::Tls, None) => {
                            let s = tokio::net::TcpStream::connect(t.addr).await?;
                            s.set_nodelay(true)?;
                            Box::new(s)
                        }
                        (Transport::Tls, Some(cfg)) => {
                            let s = tokio::net::TcpStream::connect(t.addr).await?;
                            s.set_nodelay(true)?;
                            let name =
                                rustls::pki_types::ServerName::try_from("localhost").expect("name");
                            Box::new(
                                tokio_rustls::TlsConnector::from(cfg.clone())
                                    .connect(name, s)
                                    .await?,
                            )
                        }
                    };
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(io))
                }
            }))
            .await
            .expect("connect")
    }
}

/// Any client connection.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// Issues the server certificate (DNS localhost) and the client certificate ([`CLIENT_ID`])
/// from ca1, writes the server's files to `dir` and returns the client's rustls config.
async fn tls_setup(store: &LocalStore, dir: &Path) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    std::fs::create_dir_all(dir).expect("tls dir");
    let issuer = meshca::store::load_issuer(store, "ca1")
        .await
        .expect("issuer");
    let issue = |sans: Sans| {
        let issuer = &issuer;
        async move {
            meshca::issue::issue_workload(
                issuer.as_ref(),
                &sans,
                Some(Duration::from_secs(3600)),
                KeyAlgorithm::EcdsaP256,
                time::OffsetDateTime::now_utc(),
            )
            .await
            .expect("issue")
        }
    };
    let srv = issue(Sans {
        dns: vec![meshca::identity::DnsName::parse("localhost").expect("dns")],
        ..Sans::default()
    })
    .await;
    let cli = issue(Sans {
        spiffe_id: Some(SpiffeId::parse(CLIENT_ID).expect("id")),
        ..Sans::default()
    })
    .await;
    let ca_pem = store.load_ca("ca1").await.expect("ca").chain_pem();
    std::fs::write(dir.join("server.crt"), srv.cert.chain_pem()).expect("write");
    std::fs::write(dir.join("server.key"), srv.key.to_pkcs8_pem().as_bytes()).expect("write");
    std::fs::write(dir.join("ca.crt"), &ca_pem).expect("write");
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.expect("ca pem")).expect("root");
    }
    let chain = CertificateDer::pem_slice_iter(cli.cert.chain_pem().as_bytes())
        .map(|c| c.expect("chain"))
        .collect();
    let key = PrivateKeyDer::from_pem_slice(cli.key.to_pkcs8_pem().as_bytes()).expect("key");
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client config");
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
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

fn start_child(home: &Path, target: &Target, tls_dir: &Path, poll_ms: u64) -> ChildGuard {
    let exe = std::env::current_exe().expect("current exe");
    let child = ChildGuard(
        Command::new(exe)
            .env("MESHCA_SDS_LOAD_POLL_MS", poll_ms.to_string())
            .arg("__serve")
            .arg(home)
            .arg(target.listen())
            .arg(if target.transport == Transport::Tls {
                tls_dir.as_os_str()
            } else {
                std::ffi::OsStr::new("-")
            })
            .stdin(Stdio::null())
            .spawn()
            .expect("start server"),
    );
    for _ in 0..200 {
        if target.ready() {
            return child;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(child);
    panic!("server did not listen on {}", target.listen());
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
    let tls_dir = dir.path().join("tls");
    let client_tls = if opts.transports.contains(&Transport::Tls) {
        Some(tls_setup(&store, &tls_dir).await)
    } else {
        None
    };
    println!(
        "host: {} CPUs; server and load generator share them",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );

    for &transport in &opts.transports {
        println!();
        println!(
            "# meshca SDS load ({mode}, {}, {} streams per HTTP/2 connection)",
            transport.name(),
            opts.per_conn
        );
        for &n in &opts.streams {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port");
            let target = Target {
                transport,
                sock: dir.path().join(format!("sds-{n}.sock")),
                addr: port,
                tls: client_tls.clone(),
            };
            let poll_ms = if opts.ca_rotation { 2000 } else { 5000 };
            let child = start_child(&home, &target, &tls_dir, poll_ms);
            let pid = child.0.id();
            tokio::time::sleep(Duration::from_millis(300)).await;

            // First secret on a fresh connection (connect, TLS handshake if any, stream).
            let mut cold_conn = Vec::with_capacity(opts.cold_conn);
            for _ in 0..opts.cold_conn {
                let t = Instant::now();
                let c = Client::new(target.channel().await);
                let (_, reader) = open_stream(c, "default", opts.delta, 0, None)
                    .await
                    .expect("fresh-connection stream");
                cold_conn.push(t.elapsed());
                reader.abort();
            }
            cold_conn.sort();

            // Cold start on an idle server: fresh connection-level stream, first secret.
            let ch = target.channel().await;
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
                    let c = Client::new(target.channel().await);
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
                channels.push(target.channel().await);
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
            "| first secret on a fresh connection, idle server (p50 / p99, {} samples) | {} / {} |",
            cold_conn.len(),
            ms(pct(&cold_conn, 0.5)),
            ms(pct(&cold_conn, 0.99))
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
                while board.received.load(Ordering::Relaxed) < before + n
                    && Instant::now() < deadline
                {
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
                    "CA rotation (prepare to new ROOTCA, watched home)"
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
    if args.get(1).map(String::as_str) == Some("__serve") && args.len() == 5 {
        let tls = (args[4] != "-").then(|| Path::new(&args[4]));
        serve_child(Path::new(&args[2]), &args[3], tls);
        return;
    }
    let opts = parse_opts();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(opts));
}
