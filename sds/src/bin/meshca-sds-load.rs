//! Load generator for the meshca SDS server.
//!
//! Starts the server as a child process (this binary re-executed with `__serve`) with a local
//! CA in a temporary meshca home, on each `--transport` in turn (a Unix socket, plaintext TCP
//! on 127.0.0.1, or TCP with mutual TLS: the client presents a certificate on the server's
//! allow-list), then for each stream count N:
//! - fresh connections: connect (and handshake), open a stream, time the first secret;
//! - cold start: opens fresh streams one at a time on an idle server and times the first
//!   secret (p50/p99);
//! - churn (`--churn K`, `--churn-batches B`, default 2): B batches of K clients (32 at a
//!   time), each a new connection and one stream that vanishes: most read their first secret
//!   first; a fraction (`--churn-reset F`, default 0.5) resets mid-way instead, half of them
//!   right after sending the request, half right after the response headers, before reading
//!   the response. The server's RSS before and after each batch, and the growth in percent,
//!   show a leak (`--churn 10000 --churn-batches 10` is the issue's 100,000 cycles);
//! - connections: opens N concurrent `StreamSecrets` (or `DeltaSecrets`) streams,
//!   `--per-conn` per HTTP/2 connection (default 2: one connection per simulated Envoy),
//!   ACKs every response, and reads the server's resident memory (VmRSS) before and after:
//!   memory per connection and per stream;
//! - stalled clients (`--stalled M`): M more connections of `--per-conn` streams that stop
//!   reading their socket once they have their first secret; they stay open through the
//!   rotations, so the server's RSS afterwards shows whether unread pushes pile up;
//! - rotation: sends SIGHUP (forced renewal) and times until every stream has the new
//!   certificate: p50, p90, p99, all, and a histogram of arrival times; plus the server's CPU
//!   time (utime + stime from `/proc/PID/stat`) over the round and the 500 ms after it, in
//!   which the ACKs are handled; several rounds;
//! - with `--ca-rotation` the streams subscribe to `ROOTCA` instead, the server watches the
//!   home (as `sds serve` does; the 2 s poll is only its fallback), and each round runs `meshca ca rotate ca1
//!   --phase prepare` in-process and times until every stream has the new bundle (then
//!   activate and prune reset the CA for the next round).
//!
//! Every stream subscribes to the one secret that a round changes (`default`, or `ROOTCA`
//! with `--ca-rotation`), not a `default` and a `ROOTCA` stream per connection as a real
//! Envoy opens: so each round reaches all N streams, and "a rotation reaching all N streams"
//! stays comparable across shapes, servers and earlier runs. The memory per connection and
//! per stream is the same either way (both secrets are a few KiB).
//!
//! `--peer go-control-plane=PATH` runs the go-control-plane peer (`bench/go-sds`, built by
//! `bench/go-sds/build.sh`) instead of meshca's server, with the same secrets: the load
//! generator issues the workload certificate and key from the same local CA into files, and
//! starts the peer on the same transport. A rotation writes a new certificate and key
//! (temporary file, then rename) and sends SIGHUP; a CA change writes a `ROOTCA` file with
//! the old and a new root and sends SIGHUP (the next round goes back to the old root alone).
//! Times run from just before the change (the store write for meshca, the file write for the
//! peer), exactly as for meshca, and the same RSS and CPU are read from the peer's pid.
//! With `--transport tls` the peer verifies the client certificate's chain only (meshca also
//! checks the SPIFFE ID against its allow-list).
//!
//! `--summary FILE` appends every measure as a tab-separated line (server, transport, N,
//! measure, value) for `bench/sds-peer.sh`, which compares the two servers.
//!
//! ```text
//! meshca-sds-load [--streams 1000,10000] [--per-conn 2] [--rounds 3] [--delta]
//!                 [--cold 300] [--cold-conn 100] [--transport unix,tcp,tls] [--ca-rotation]
//!                 [--churn 5000] [--churn-batches 2] [--churn-reset 0.5] [--stalled 0]
//!                 [--peer go-control-plane=PATH] [--summary FILE]
//! ```
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
    churn_batches: usize,
    churn_reset: f64,
    stalled: usize,
    transports: Vec<Transport>,
    ca_rotation: bool,
    /// The go-control-plane peer's binary, run instead of meshca's server.
    peer: Option<PathBuf>,
    summary: Option<PathBuf>,
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
    fn key(self) -> &'static str {
        match self {
            Transport::Unix => "unix",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
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
    eprintln!("usage: meshca-sds-load [--streams 1000,10000] [--per-conn 2] [--rounds 3] [--cold 300] [--cold-conn 100] [--churn 0] [--churn-batches 2] [--churn-reset 0.5] [--stalled 0] [--delta] [--transport unix,tcp,tls] [--ca-rotation] [--peer go-control-plane=PATH] [--summary FILE]");
    std::process::exit(1)
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        streams: vec![1000, 10_000],
        per_conn: 2,
        rounds: 3,
        delta: false,
        cold: 300,
        cold_conn: 100,
        churn: 0,
        churn_batches: 2,
        churn_reset: 0.5,
        stalled: 0,
        transports: vec![Transport::Unix],
        ca_rotation: false,
        peer: None,
        summary: None,
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
            "--churn-batches" => o.churn_batches = val().parse().unwrap_or_else(|_| usage()),
            "--churn-reset" => o.churn_reset = val().parse().unwrap_or_else(|_| usage()),
            "--stalled" => o.stalled = val().parse().unwrap_or_else(|_| usage()),
            "--peer" => {
                let v = val();
                let path = v
                    .strip_prefix("go-control-plane=")
                    .unwrap_or_else(|| usage());
                o.peer = Some(PathBuf::from(path));
            }
            "--summary" => o.summary = Some(PathBuf::from(val())),
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
    if o.per_conn == 0 || o.streams.contains(&0) || !(0.0..=1.0).contains(&o.churn_reset) {
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

/// CPU time of process `pid` so far (utime + stime, all threads), from `/proc/PID/stat`.
fn cpu_time(pid: u32) -> Duration {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 (1-based), so 11 and 12 here.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64)
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks() -> u64 {
    static TCK: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
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
        self.try_channel(None).await.expect("connect")
    }

    /// A new HTTP/2 connection; with `stall`, one that stops reading its socket once the
    /// flag is set.
    async fn try_channel(
        &self,
        stall: Option<Arc<AtomicBool>>,
    ) -> Result<Channel, tonic::transport::Error> {
        let t = self.clone();
        Endpoint::try_from("http://localhost")
            .unwrap()
            .initial_connection_window_size(Some(16 * 1024 * 1024))
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let (t, stall) = (t.clone(), stall.clone());
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
                    let io: Box<dyn Io> = match stall {
                        Some(stall) => Box::new(StallIo { inner: io, stall }),
                        None => io,
                    };
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(io))
                }
            }))
            .await
    }
}

/// A connection that stops reading once `stall` is set: its reads stay pending for ever, so
/// the kernel's buffers fill and the server's writes to it back up.
struct StallIo {
    inner: Box<dyn Io>,
    stall: Arc<AtomicBool>,
}

impl tokio::io::AsyncRead for StallIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.stall.load(Ordering::Relaxed) {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for StallIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
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
    wait_ready(child, target)
}

/// Waits until `target` takes connections (10 s at most).
fn wait_ready(child: ChildGuard, target: &Target) -> ChildGuard {
    for _ in 0..200 {
        if target.ready() {
            return child;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(child);
    panic!("server did not listen on {}", target.listen());
}

/// The server a run drives.
enum Server {
    /// meshca's own SDS server: this binary as a child.
    Meshca,
    /// The go-control-plane peer: its binary, the directory of its secret files, and the PEM
    /// of ca1's root (its `ROOTCA` outside a CA change).
    Peer {
        bin: PathBuf,
        files: PathBuf,
        root_pem: String,
    },
}

impl Server {
    fn name(&self) -> &'static str {
        match self {
            Server::Meshca => "meshca",
            Server::Peer { .. } => "go-control-plane",
        }
    }
}

/// Writes `data` to `path` atomically: a temporary file beside it, then rename.
fn write_atomic(path: &Path, data: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).expect("write secret file");
    std::fs::rename(&tmp, path).expect("rename secret file");
}

/// Issues a workload certificate and key from ca1 (the SANs, TTL and key meshca's server
/// uses) into the peer's `cert.pem` and `key.pem`.
async fn peer_issue(store: &LocalStore, files: &Path) {
    let issuer = meshca::store::load_issuer(store, "ca1")
        .await
        .expect("issuer");
    let w = meshca::issue::issue_workload(
        issuer.as_ref(),
        &sans(),
        Some(Duration::from_secs(3600)),
        KeyAlgorithm::EcdsaP256,
        time::OffsetDateTime::now_utc(),
    )
    .await
    .expect("issue");
    write_atomic(&files.join("cert.pem"), w.cert.chain_pem().as_bytes());
    write_atomic(&files.join("key.pem"), w.key.to_pkcs8_pem().as_bytes());
}

/// Starts the go-control-plane peer on `target` with the secrets in `files`.
fn start_peer(bin: &Path, files: &Path, target: &Target, tls_dir: &Path) -> ChildGuard {
    let mut cmd = Command::new(bin);
    cmd.arg("-dir")
        .arg(files)
        .arg("-listen")
        .arg(target.listen());
    if target.transport == Transport::Tls {
        cmd.arg("-tls-cert")
            .arg(tls_dir.join("server.crt"))
            .arg("-tls-key")
            .arg(tls_dir.join("server.key"))
            .arg("-tls-client-ca")
            .arg(tls_dir.join("ca.crt"));
    }
    let child = ChildGuard(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start go-control-plane peer"),
    );
    wait_ready(child, target)
}

/// One churn client: a new connection and one stream that vanishes. `mode` 0 reads the first
/// secret first; 1 resets right after the request has been sent; 2 right after the
/// response headers, before reading the response. Returns whether it went as planned.
async fn churn_client(target: Target, delta: bool, mode: u8) -> bool {
    let Ok(ch) = target.try_channel(None).await else {
        return false;
    };
    let mut client = Client::new(ch);
    if mode == 0 {
        return match open_stream(client, "default", delta, 0, None).await {
            Ok((_, reader)) => {
                reader.abort();
                true
            }
            Err(_) => false,
        };
    }
    // The request goes into a channel of one; once the call has taken it out to send it,
    // the channel has its capacity back.
    let sent = |cap: usize, max: usize| cap == max;
    let call = if delta {
        let (tx, rx) = mpsc::channel(1);
        let req = DeltaDiscoveryRequest {
            type_url: SECRET_TYPE_URL.into(),
            resource_names_subscribe: vec!["default".into()],
            ..Default::default()
        };
        if tx.send(req).await.is_err() {
            return false;
        }
        let task = tokio::spawn(async move {
            // Dropped as soon as the headers are in: the stream is reset unread.
            client.delta_secrets(ReceiverStream::new(rx)).await.is_ok()
        });
        (
            task,
            Box::new(move || sent(tx.capacity(), tx.max_capacity()))
                as Box<dyn Fn() -> bool + Send>,
        )
    } else {
        let (tx, rx) = mpsc::channel(1);
        if tx.send(sotw_req(&["default"], "", "")).await.is_err() {
            return false;
        }
        let task =
            tokio::spawn(
                async move { client.stream_secrets(ReceiverStream::new(rx)).await.is_ok() },
            );
        (
            task,
            Box::new(move || sent(tx.capacity(), tx.max_capacity()))
                as Box<dyn Fn() -> bool + Send>,
        )
    };
    let (task, is_sent) = call;
    if mode == 1 {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !is_sent() && Instant::now() < deadline {
            tokio::task::yield_now().await;
        }
        let ok = is_sent();
        // Drops the call, its stream and the connection: a reset mid-request.
        task.abort();
        ok
    } else {
        matches!(
            tokio::time::timeout(Duration::from_secs(30), task).await,
            Ok(Ok(true))
        )
    }
}

/// Whether churn client `i` of a batch resets mid-way (spread evenly, a fraction `f`), and
/// how: 1 after the request, 2 after the headers (alternately).
fn churn_mode(i: usize, f: f64) -> u8 {
    let (a, b) = ((i as f64 * f).floor(), ((i + 1) as f64 * f).floor());
    if b > a {
        1 + (b as u64 % 2) as u8
    } else {
        0
    }
}

/// Arrival-time histogram buckets, upper bounds in ms.
const BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000];

/// A compact histogram of `lat` (sorted): "≤N ms: count" for each non-empty bucket.
fn histogram(lat: &[Duration]) -> String {
    let mut counts = [0usize; BUCKETS_MS.len() + 1];
    for d in lat {
        let ms = d.as_secs_f64() * 1000.0;
        let b = BUCKETS_MS
            .iter()
            .position(|&u| ms <= u as f64)
            .unwrap_or(BUCKETS_MS.len());
        counts[b] += 1;
    }
    let mut out = Vec::new();
    for (i, &c) in counts.iter().enumerate() {
        if c > 0 {
            out.push(match BUCKETS_MS.get(i) {
                Some(u) => format!("≤{u} ms: {c}"),
                None => format!(">{} ms: {c}", BUCKETS_MS[BUCKETS_MS.len() - 1]),
            });
        }
    }
    out.join(", ")
}

/// Tab-separated measures of one run (server, transport, N, measure, value) for
/// `--summary`.
struct Summary {
    prefix: String,
    lines: String,
}

impl Summary {
    fn put(&mut self, measure: &str, value: f64) {
        self.lines
            .push_str(&format!("{}\t{measure}\t{value:.3}\n", self.prefix));
    }
    fn write(&self, path: Option<&Path>) {
        if let Some(path) = path {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("summary file");
            f.write_all(self.lines.as_bytes()).expect("write summary");
        }
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn msf(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
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
    let server = match &opts.peer {
        None => Server::Meshca,
        Some(bin) => {
            let files = dir.path().join("peer");
            std::fs::create_dir_all(&files).expect("peer dir");
            let root_pem = ca.chain_pem();
            write_atomic(&files.join("ca.pem"), root_pem.as_bytes());
            peer_issue(&store, &files).await;
            Server::Peer {
                bin: bin.clone(),
                files,
                root_pem,
            }
        }
    };
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
            "# {} SDS load ({mode}, {}, {} streams per HTTP/2 connection)",
            server.name(),
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
            run_n(&opts, &server, &store, &home, &target, &tls_dir, n).await;
        }
    }
}

/// One run with N streams on `target`: starts the server, measures, stops it.
async fn run_n(
    opts: &Opts,
    server: &Server,
    store: &LocalStore,
    home: &Path,
    target: &Target,
    tls_dir: &Path,
    n: usize,
) {
    let mut sum = Summary {
        prefix: format!("{}\t{}\t{n}", server.name(), target.transport.key()),
        lines: String::new(),
    };
    let child = match server {
        Server::Meshca => {
            let poll_ms = if opts.ca_rotation { 2000 } else { 5000 };
            start_child(home, target, tls_dir, poll_ms)
        }
        Server::Peer { bin, files, .. } => start_peer(bin, files, target, tls_dir),
    };
    let pid = child.0.id();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_start = rss_kib(pid);

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

    // Churn: batches of vanishing clients, some resetting mid-way.
    let mut churn_rss = vec![rss_kib(pid)];
    let mut churn_failed = 0usize;
    let t_churn = Instant::now();
    if opts.churn > 0 {
        for _ in 0..opts.churn_batches {
            let mut set = tokio::task::JoinSet::new();
            for i in 0..opts.churn {
                if set.len() >= 32 {
                    if let Some(r) = set.join_next().await {
                        churn_failed += usize::from(!r.unwrap_or(false));
                    }
                }
                set.spawn(churn_client(
                    target.clone(),
                    opts.delta,
                    churn_mode(i, opts.churn_reset),
                ));
            }
            while let Some(r) = set.join_next().await {
                churn_failed += usize::from(!r.unwrap_or(false));
            }
            tokio::time::sleep(Duration::from_millis(1000)).await;
            churn_rss.push(rss_kib(pid));
        }
    }
    let churn_time = t_churn.elapsed();
    let base_rss = rss_kib(pid);

    // N concurrent streams.
    let board = Arc::new(Board {
        base: Instant::now(),
        last_ns: (0..n).map(|_| AtomicU64::new(0)).collect(),
        received: AtomicUsize::new(0),
    });
    let name = if opts.ca_rotation {
        "ROOTCA"
    } else {
        "default"
    };
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
    // KiB.
    let grown = rss.saturating_sub(base_rss) as f64;
    let per_stream = grown / n as f64;
    let per_conn = grown / conns as f64;

    // Clients that stop reading.
    let stall = Arc::new(AtomicBool::new(false));
    let mut stalled = Vec::new();
    let mut stalled_readers = Vec::new();
    for _ in 0..opts.stalled {
        let ch = target
            .try_channel(Some(stall.clone()))
            .await
            .expect("connect");
        for _ in 0..opts.per_conn {
            let (_, r) = open_stream(Client::new(ch.clone()), name, opts.delta, 0, None)
                .await
                .expect("stalled client's stream");
            stalled_readers.push(r);
        }
        stalled.push(ch);
    }
    stall.store(true, Ordering::Relaxed);
    let rss_stalled = rss_kib(pid);

    println!();
    println!(
        "## {} with N = {n} streams ({conns} connections)",
        server.name()
    );
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
        "| server RSS at start / idle / with {n} streams | {:.1} MiB / {:.1} MiB / {:.1} MiB |",
        mib(rss_start),
        mib(base_rss),
        mib(rss)
    );
    println!(
        "| server RSS per connection / per stream | {:.1} KiB / {:.1} KiB |",
        per_conn, per_stream
    );
    sum.put("cold_p50_ms", msf(pct(&cold, 0.5)));
    sum.put("cold_conn_p50_ms", msf(pct(&cold_conn, 0.5)));
    sum.put("cold_conn_p99_ms", msf(pct(&cold_conn, 0.99)));
    sum.put("first_p50_ms", msf(pct(&ramp, 0.5)));
    sum.put("first_p99_ms", msf(pct(&ramp, 0.99)));
    sum.put("open_ms", msf(open_time));
    sum.put("rss_start_mib", mib(rss_start));
    sum.put("rss_idle_mib", mib(base_rss));
    sum.put("rss_n_mib", mib(rss));
    sum.put("rss_per_conn_kib", per_conn);
    sum.put("rss_per_stream_kib", per_stream);
    if opts.churn > 0 {
        let rss_list: Vec<String> = churn_rss
            .iter()
            .map(|&k| format!("{:.1}", mib(k)))
            .collect();
        let first = churn_rss[0] as f64;
        let last = *churn_rss.last().unwrap() as f64;
        let growth = (last - first) / first * 100.0;
        println!(
            "| churn: {} x {} vanishing clients (connection + stream each, {:.0} % reset mid-way, {} failed, {}): RSS before / after each batch | {} MiB |",
            opts.churn_batches,
            opts.churn,
            opts.churn_reset * 100.0,
            churn_failed,
            ms(churn_time),
            rss_list.join(" / ")
        );
        println!("| churn: RSS growth over all batches | {growth:+.1} % |");
        // The first batch warms the allocator up to its 32 clients in flight; what grows
        // after it is what churn leaves behind.
        if churn_rss.len() > 2 {
            let warm = churn_rss[1] as f64;
            let warm_growth = (last - warm) / warm * 100.0;
            println!("| churn: RSS growth after the 1st batch | {warm_growth:+.1} % |");
            sum.put("churn_warm_growth_pct", warm_growth);
        }
        sum.put("churn_cycles", (opts.churn * opts.churn_batches) as f64);
        sum.put("churn_rss_before_mib", mib(churn_rss[0]));
        sum.put("churn_rss_after_mib", last / 1024.0);
        sum.put("churn_growth_pct", growth);
        sum.put("churn_failed", churn_failed as f64);
        sum.put("churn_s", churn_time.as_secs_f64());
    }
    if opts.stalled > 0 {
        println!(
            "| {} stalled connections ({} streams) that stop reading: RSS with them | {:.1} MiB |",
            opts.stalled,
            opts.stalled * opts.per_conn,
            mib(rss_stalled)
        );
        sum.put("rss_stalled_mib", mib(rss_stalled));
    }

    // Rotation fan-out rounds.
    let mut peer_round = 0u32;
    for round in 1..=opts.rounds {
        let before = board.received.load(Ordering::Relaxed);
        // The peer's new files are written before the signal (meshca issues after it).
        if let (Server::Peer { files, .. }, false) = (server, opts.ca_rotation) {
            peer_issue(store, files).await;
        }
        let cpu0 = cpu_time(pid);
        let t0 = board.base.elapsed().as_nanos() as u64;
        match (server, opts.ca_rotation) {
            (Server::Meshca, true) => ca_phase(store, Request::Prepare).await,
            (Server::Meshca, false) | (Server::Peer { .. }, false) => signal(pid, "-HUP"),
            (
                Server::Peer {
                    files, root_pem, ..
                },
                true,
            ) => {
                // The old root and a new one, as `prepare` puts in the bundle.
                peer_round += 1;
                let new = create_root(
                    &CaSpec::root(&format!("ca1-{peer_round}")),
                    time::OffsetDateTime::now_utc(),
                )
                .expect("new root");
                let both = format!("{root_pem}{}", new.chain_pem());
                write_atomic(&files.join("ca.pem"), both.as_bytes());
                signal(pid, "-HUP");
            }
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
        tokio::time::sleep(Duration::from_millis(500)).await;
        let cpu = cpu_time(pid).saturating_sub(cpu0);
        let what = if opts.ca_rotation {
            "CA change (new ROOTCA)"
        } else {
            "rotation"
        };
        let all = lat.last().copied().unwrap_or_default();
        println!(
            "| {what} round {round}: streams updated / p50 / p90 / p99 / all | {got}/{n} / {} / {} / {} / {} |",
            ms(pct(&lat, 0.5)),
            ms(pct(&lat, 0.9)),
            ms(pct(&lat, 0.99)),
            ms(all)
        );
        println!("| {what} round {round}: arrivals | {} |", histogram(&lat));
        println!(
            "| {what} round {round}: server CPU (utime + stime, round + 500 ms) | {:.0} ms |",
            msf(cpu)
        );
        let key = if opts.ca_rotation { "ca" } else { "rot" };
        sum.put(&format!("{key}{round}_updated"), got as f64);
        sum.put(&format!("{key}{round}_p50_ms"), msf(pct(&lat, 0.5)));
        sum.put(&format!("{key}{round}_p90_ms"), msf(pct(&lat, 0.9)));
        sum.put(&format!("{key}{round}_p99_ms"), msf(pct(&lat, 0.99)));
        sum.put(&format!("{key}{round}_all_ms"), msf(all));
        sum.put(&format!("{key}{round}_cpu_ms"), msf(cpu));
        if opts.ca_rotation {
            // Back to one root, and let those pushes pass before the next round.
            match server {
                Server::Meshca => {
                    ca_phase(store, Request::Activate).await;
                    tokio::time::sleep(Duration::from_millis(2500)).await;
                    ca_phase(store, Request::Prune).await;
                    tokio::time::sleep(Duration::from_millis(2500)).await;
                }
                Server::Peer {
                    files, root_pem, ..
                } => {
                    write_atomic(&files.join("ca.pem"), root_pem.as_bytes());
                    signal(pid, "-HUP");
                    tokio::time::sleep(Duration::from_millis(2500)).await;
                }
            }
        }
    }
    let rss_after = rss_kib(pid);
    println!("| server RSS after rotations | {:.1} MiB |", mib(rss_after));
    sum.put("rss_after_mib", mib(rss_after));
    for r in stalled_readers {
        r.abort();
    }
    drop(stalled);
    drop(channels);
    drop(child);
    sum.write(opts.summary.as_deref());
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
