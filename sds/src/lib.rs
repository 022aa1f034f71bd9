//! # meshca-sds
//!
//! An Envoy Secret Discovery Service (SDS) server. It serves the workload certificate as the
//! secret `default`, its trust bundle as `ROOTCA` and every trust bundle of a meshca home
//! under its own name, over all three RPCs of `envoy.service.secret.v3.SecretDiscoveryService`
//! (`StreamSecrets`, `DeltaSecrets`, `FetchSecrets`), on a Unix socket and/or TCP.
//!
//! Certificates come from a [`CertSource`]: a CA in a meshca home ([`LocalCaSource`], which
//! issues and renews the certificate itself) or PEM files ([`FileSource`], e.g. a mounted
//! `kubernetes.io/tls` Secret). A [`Rotator`](rotation::Rotator) renews at a fraction of the
//! lifetime with jitter, verifies every new chain against the bundle and the expected
//! identity, and publishes a [`Snapshot`](secrets::Snapshot) through `tokio::sync::watch`;
//! each stream pushes only what changed. The protocol bookkeeping lives in [`xds`], which
//! does no I/O.
//!
//! ```no_run
//! use meshca_sds::{serve, shutdown_signal, Listen, ServeConfig, SourceConfig};
//! # async fn run() -> Result<(), meshca_sds::ServeError> {
//! let cfg = ServeConfig::new(
//!     SourceConfig::Files {
//!         cert: "/etc/tls/tls.crt".into(),
//!         key: "/etc/tls/tls.key".into(),
//!         ca: "/etc/tls/ca.crt".into(),
//!         expected: None,
//!     },
//!     vec![Listen::parse("unix:/run/meshca/sds.sock")?],
//! );
//! serve(cfg, shutdown_signal()).await
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod authority;
pub mod fswatch;
pub mod grpc;
#[cfg(feature = "kube")]
pub mod istio_ca;
#[cfg(feature = "kube")]
pub mod kube_csr;
pub mod metrics;
pub mod rotation;
pub mod secrets;
pub mod service;
pub mod source;
pub mod transport;
pub mod xds;

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use meshca::identity::Sans;
use meshca::key::KeyAlgorithm;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_stream::StreamExt;

pub use metrics::Metrics;
pub use rotation::RotationConfig;
pub use secrets::{Snapshot, DEFAULT_NAME, ROOTCA_NAME, SECRET_TYPE_URL};
pub use service::{Limits, SdsService};
pub use source::{CertSource, FileSource, LocalCaSource, Material, SourceError, WorkloadCert};
pub use transport::{ClientAllowList, TlsConfig};

/// The default Unix socket path.
pub const DEFAULT_SOCKET_PATH: &str = "/run/meshca/sds.sock";

/// Errors of the server front end. One line each, never key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The configuration is unusable.
    #[error("invalid SDS configuration: {0}")]
    Config(String),
    /// The certificate source failed at startup.
    #[error("certificate source failed at startup: {0}")]
    Source(#[source] SourceError),
    /// A listener could not be set up.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server on {addr}: {source}")]
    Transport {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
}

/// An address to serve SDS on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// A Unix domain socket path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

impl Listen {
    /// Parses `unix:PATH` or `tcp:HOST:PORT` (HOST an IP address; `[::1]` for IPv6).
    pub fn parse(s: &str) -> Result<Listen, ServeError> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(ServeError::Config("unix: needs a socket path".into()));
            }
            return Ok(Listen::Unix(PathBuf::from(p)));
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            let addr = a.parse::<SocketAddr>().map_err(|_| {
                ServeError::Config(format!(
                    "{s:?}: expected tcp:IP:PORT, e.g. tcp:127.0.0.1:8234"
                ))
            })?;
            return Ok(Listen::Tcp(addr));
        }
        Err(ServeError::Config(format!(
            "{s:?}: expected unix:PATH or tcp:IP:PORT"
        )))
    }
}

impl ServeError {
    /// Whether the configuration or input is at fault (the CLI exits 1) rather than the
    /// environment (exit 2).
    pub fn is_user_error(&self) -> bool {
        match self {
            ServeError::Config(_) | ServeError::Listen { .. } => true,
            ServeError::Source(e) => e.user_error,
            ServeError::Transport { .. } => false,
        }
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
            Listen::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// Where certificates come from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// Issue from a CA in a meshca home.
    LocalCa {
        /// The meshca home.
        home: PathBuf,
        /// CA name.
        ca: String,
        /// Trust bundle served as `ROOTCA` (default: the CA's root, plus the other root while
        /// the CA is rotated).
        bundle: Option<String>,
        /// Identity of the certificate.
        sans: Sans,
        /// Lifetime (default: the CA policy's default TTL).
        ttl: Option<Duration>,
        /// Key algorithm of the workload key.
        key: KeyAlgorithm,
        /// Serve the CRLs of the bundle's CAs in `ROOTCA` (`--crl`).
        crl: bool,
    },
    /// Serve PEM files.
    Files {
        /// Certificate chain, leaf first (`tls.crt`).
        cert: PathBuf,
        /// Private key (`tls.key`).
        key: PathBuf,
        /// Trust bundle (`ca.crt`).
        ca: PathBuf,
        /// Identity the certificate must carry, if any.
        expected: Option<Sans>,
    },
    /// A Kubernetes CSR to the cluster's signer, under the pod's own service account.
    #[cfg(feature = "kube")]
    KubeCsr(kube_csr::KubeCsrConfig),
}

/// Everything [`serve`] needs. Build with [`ServeConfig::new`] and adjust fields.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The certificate source.
    pub source: SourceConfig,
    /// Addresses to serve on (at least one).
    pub listen: Vec<Listen>,
    /// File mode of Unix sockets (default 0600).
    pub socket_mode: u32,
    /// Optional address for `/metrics` and `/healthz`.
    pub metrics: Option<SocketAddr>,
    /// Rotation settings.
    pub rotation: RotationConfig,
    /// HTTP/2 streams allowed per connection (default 1024; HTTP/2
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub max_concurrent_streams: u32,
    /// Largest request message accepted, in bytes after decoding (default 256 KiB); a larger
    /// one ends its stream with `RESOURCE_EXHAUSTED`.
    pub max_request_bytes: usize,
    /// Names per request and per stream, name length, unknown names per stream.
    pub limits: Limits,
    /// Mutual TLS for every TCP listener. Required for a TCP listener on a non-loopback
    /// address unless `danger_plaintext_tcp` is set.
    pub tls: Option<TlsConfig>,
    /// Serve non-loopback TCP listeners in plaintext without TLS. Anyone who reaches the
    /// port gets the workload's private key.
    pub danger_plaintext_tcp: bool,
    /// Whether SIGHUP forces a renewal / re-read of the source (default true in [`serve`]).
    pub reload_on_sighup: bool,
    /// How long shutdown waits for connections to close (default 5 s).
    pub shutdown_grace: Duration,
}

impl ServeConfig {
    /// A configuration with defaults.
    pub fn new(source: SourceConfig, listen: Vec<Listen>) -> Self {
        ServeConfig {
            source,
            listen,
            socket_mode: 0o600,
            metrics: None,
            rotation: RotationConfig::default(),
            max_concurrent_streams: 1024,
            max_request_bytes: 256 * 1024,
            limits: Limits::default(),
            tls: None,
            danger_plaintext_tcp: false,
            reload_on_sighup: true,
            shutdown_grace: Duration::from_secs(5),
        }
    }

    fn validate(&self) -> Result<(), ServeError> {
        if self.listen.is_empty() {
            return Err(ServeError::Config(
                "no listen address (give unix:PATH and/or tcp:IP:PORT)".into(),
            ));
        }
        let r = &self.rotation;
        if !(r.renew_at > 0.0 && r.renew_at < 1.0) {
            return Err(ServeError::Config(format!(
                "renew-at {} must be between 0 and 1 (exclusive)",
                r.renew_at
            )));
        }
        if !(0.0..1.0).contains(&r.jitter) {
            return Err(ServeError::Config(format!(
                "jitter {} must be in [0, 1)",
                r.jitter
            )));
        }
        if r.poll_interval.is_zero() {
            return Err(ServeError::Config("poll interval must be positive".into()));
        }
        transport::check_exposure(&self.listen, self.tls.as_ref(), self.danger_plaintext_tcp)?;
        if self.max_concurrent_streams == 0 || self.max_request_bytes == 0 {
            return Err(ServeError::Config(
                "max streams per connection and max request size must be positive".into(),
            ));
        }
        let l = &self.limits;
        if l.max_names_per_request == 0 || l.max_names_per_stream == 0 || l.max_name_len == 0 {
            return Err(ServeError::Config(
                "the names-per-request, names-per-stream and name-length limits must be positive"
                    .into(),
            ));
        }
        if self.socket_mode & !0o777 != 0 {
            return Err(ServeError::Config(format!(
                "socket mode {:o} is not a permission mode",
                self.socket_mode
            )));
        }
        Ok(())
    }

    async fn build_source(
        &self,
        #[allow(unused_variables)] metrics: &Arc<Metrics>,
    ) -> Result<Box<dyn CertSource>, ServeError> {
        Ok(match &self.source {
            SourceConfig::LocalCa {
                home,
                ca,
                bundle,
                sans,
                ttl,
                key,
                crl,
            } => Box::new(
                LocalCaSource::new(home, ca, bundle.clone(), sans.clone(), *ttl, *key)
                    .map_err(|e| ServeError::Config(e.to_string()))?
                    .serve_crls(*crl),
            ),
            SourceConfig::Files {
                cert,
                key,
                ca,
                expected,
            } => Box::new(FileSource::new(
                cert.clone(),
                key.clone(),
                ca.clone(),
                expected.clone(),
            )),
            #[cfg(feature = "kube")]
            SourceConfig::KubeCsr(k) => Box::new(
                kube_csr::KubeCsrSource::connect(k, metrics.clone())
                    .await
                    .map_err(ServeError::Source)?,
            ),
        })
    }
}

/// A bound listener and what it resolved to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bound {
    /// A Unix socket at this path.
    Unix(PathBuf),
    /// A TCP listener at this address (the real port when 0 was asked for).
    Tcp(SocketAddr),
}

/// A running server. Dropping it does not stop it; call [`Server::shutdown`].
#[derive(Debug)]
pub struct Server {
    bound: Vec<Bound>,
    metrics_addr: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    reload: Arc<Notify>,
    shutdown_tx: watch::Sender<bool>,
    servers: Vec<(String, JoinHandle<Result<(), tonic::transport::Error>>)>,
    background: Vec<JoinHandle<()>>,
    sockets: Vec<PathBuf>,
    grace: Duration,
}

fn listen_err(addr: impl std::fmt::Display, source: std::io::Error) -> ServeError {
    ServeError::Listen {
        addr: addr.to_string(),
        source,
    }
}

/// Binds a Unix socket with `mode` without a window where it is reachable with looser
/// permissions, whatever the umask: the socket is bound inside a fresh private directory
/// (mode 0700) next to `path`, chmod-ed to `mode`, then renamed into place. The process
/// umask is never touched (it is shared by every thread). A stale socket (nobody listening)
/// is replaced; a live one or a non-socket file is an error.
fn bind_unix(path: &Path, mode: u32) -> Result<UnixListener, ServeError> {
    bind_unix_with(path, mode, |_| {})
}

/// [`bind_unix`], calling `after_bind` with the socket's temporary path right after bind(2)
/// (the tests check its reachability there).
fn bind_unix_with(
    path: &Path,
    mode: u32,
    after_bind: impl FnOnce(&Path),
) -> Result<UnixListener, ServeError> {
    use std::os::unix::fs::DirBuilderExt;
    let shown = format!("unix:{}", path.display());
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if !md.file_type().is_socket() {
            return Err(listen_err(
                &shown,
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "path exists and is not a socket",
                ),
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(listen_err(
                &shown,
                std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another server is listening on it",
                ),
            ));
        }
        std::fs::remove_file(path).map_err(|e| listen_err(&shown, e))?;
    }
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| listen_err(&shown, e))?;
            dir.to_path_buf()
        }
        None => PathBuf::from("."),
    };
    path.file_name().ok_or_else(|| {
        listen_err(
            &shown,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "socket path has no file name",
            ),
        )
    })?;
    // mkdir(2) is exclusive, so a directory someone else created is never reused.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut attempt = 0;
    let private = loop {
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Short names: a socket path is limited to 107 bytes.
        let d = dir.join(format!(".sds-{}-{n}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&d) {
            Ok(()) => break d,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 16 => attempt += 1,
            Err(e) => return Err(listen_err(&shown, e)),
        }
    };
    let tmp = private.join("s");
    let bound = std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700))
        .and_then(|_| std::os::unix::net::UnixListener::bind(&tmp))
        .and_then(|l| {
            after_bind(&tmp);
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
            std::fs::rename(&tmp, path)?;
            l.set_nonblocking(true)?;
            Ok(l)
        });
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&private);
    let l = bound.map_err(|e| listen_err(&shown, e))?;
    UnixListener::from_std(l).map_err(|e| listen_err(&shown, e))
}

/// HTTP/2 receive window of one stream (the most request bytes it may have in flight).
pub const REQUEST_STREAM_WINDOW: u32 = 64 * 1024;
/// HTTP/2 receive window of one connection, shared by its streams.
pub const REQUEST_CONNECTION_WINDOW: u32 = 128 * 1024;

impl Server {
    /// Loads the first secrets (failing fast on a broken source), binds every listener and
    /// starts serving.
    pub async fn start(cfg: ServeConfig) -> Result<Server, ServeError> {
        cfg.validate()?;
        let metrics = Arc::new(Metrics::default());
        let source = cfg.build_source(&metrics).await?;
        // The transport's files are checked before the first certificate is issued.
        let tls = cfg
            .tls
            .as_ref()
            .map(|t| t.server_config(metrics.clone()))
            .transpose()?;
        let (snap_tx, snap_rx) = watch::channel(Arc::new(Snapshot::new()));
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let mut rotator =
            rotation::Rotator::new(source, cfg.rotation.clone(), snap_tx, metrics.clone());
        rotator.step(true).await.map_err(ServeError::Source)?;

        let service = SdsService::new(
            snap_rx.clone(),
            metrics.clone(),
            shutdown_rx.clone(),
            cfg.limits,
        );
        let mut bound = Vec::new();
        let mut servers = Vec::new();
        let mut sockets = Vec::new();
        for l in &cfg.listen {
            let svc = grpc::SdsServer::new(service.clone(), cfg.max_request_bytes);
            let builder = tonic::transport::Server::builder()
                .max_concurrent_streams(cfg.max_concurrent_streams)
                // SDS requests are a few KiB: small receive windows bound what a client can
                // make the server hold unread (hyper's defaults are 1 MiB each); larger
                // requests, up to --max-request-bytes, still arrive, in more round trips.
                .initial_stream_window_size(Some(REQUEST_STREAM_WINDOW))
                .initial_connection_window_size(Some(REQUEST_CONNECTION_WINDOW))
                .http2_keepalive_interval(Some(Duration::from_secs(60)))
                .http2_keepalive_timeout(Some(Duration::from_secs(20)));
            let mut sd = shutdown_rx.clone();
            let signal = async move {
                let _ = sd.wait_for(|s| *s).await;
            };
            let handle = match l {
                Listen::Unix(path) => {
                    let listener = bind_unix(path, cfg.socket_mode)?;
                    sockets.push(path.clone());
                    bound.push(Bound::Unix(path.clone()));
                    let mut b = builder;
                    // gRPC C-core and grpc-java send the socket path as `:authority`, which
                    // h2 alone refuses: see [`authority`].
                    let incoming = UnixListenerStream::new(listener)
                        .map(|c| c.map(authority::UnixAuthorityFix::new));
                    tokio::spawn(async move {
                        b.add_service(svc)
                            .serve_with_incoming_shutdown(incoming, signal)
                            .await
                    })
                }
                Listen::Tcp(addr) => {
                    let listener = TcpListener::bind(addr)
                        .await
                        .map_err(|e| listen_err(l, e))?;
                    let local = listener.local_addr().map_err(|e| listen_err(l, e))?;
                    bound.push(Bound::Tcp(local));
                    let mut b = builder;
                    match &tls {
                        Some(tls) => {
                            let incoming = transport::tls_incoming(
                                listener,
                                tls.clone(),
                                metrics.clone(),
                                shutdown_rx.clone(),
                            );
                            tokio::spawn(async move {
                                b.add_service(svc)
                                    .serve_with_incoming_shutdown(incoming, signal)
                                    .await
                            })
                        }
                        None => {
                            if transport::is_exposed(&local) {
                                tracing::warn!(listen = %l, "serving SDS in PLAINTEXT on a non-loopback address (--danger-plaintext-tcp): anyone who reaches it gets the private key");
                            }
                            let incoming = TcpListenerStream::new(listener).map(|c| {
                                c.inspect(|s| {
                                    let _ = s.set_nodelay(true);
                                })
                            });
                            tokio::spawn(async move {
                                b.add_service(svc)
                                    .serve_with_incoming_shutdown(incoming, signal)
                                    .await
                            })
                        }
                    }
                }
            };
            let security = match l {
                Listen::Unix(_) => "unix socket",
                Listen::Tcp(_) if tls.is_some() => "mutual TLS",
                Listen::Tcp(_) => "plaintext",
            };
            tracing::info!(listen = %l, transport = security, "serving SDS");
            servers.push((l.to_string(), handle));
        }

        let mut background = Vec::new();
        let mut metrics_addr = None;
        if let Some(addr) = cfg.metrics {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| listen_err(format!("metrics tcp:{addr}"), e))?;
            metrics_addr = Some(listener.local_addr().map_err(|e| listen_err(addr, e))?);
            tracing::info!(addr = %metrics_addr.expect("set"), "serving /metrics and /healthz");
            background.push(tokio::spawn(metrics::serve_http(
                listener,
                metrics.clone(),
                snap_rx.clone(),
                shutdown_rx.clone(),
            )));
        }
        let reload = Arc::new(Notify::new());
        let watch = rotator.start_watching();
        background.push(tokio::spawn(rotator.run(
            reload.clone(),
            watch,
            shutdown_rx.clone(),
        )));
        Ok(Server {
            bound,
            metrics_addr,
            metrics,
            snapshots: snap_rx,
            reload,
            shutdown_tx,
            servers,
            background,
            sockets,
            grace: cfg.shutdown_grace,
        })
    }

    /// What the server listens on.
    pub fn bound(&self) -> &[Bound] {
        &self.bound
    }

    /// The TCP addresses the server listens on.
    pub fn tcp_addrs(&self) -> Vec<SocketAddr> {
        self.bound
            .iter()
            .filter_map(|b| match b {
                Bound::Tcp(a) => Some(*a),
                Bound::Unix(_) => None,
            })
            .collect()
    }

    /// The metrics address, if serving metrics.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The published snapshots.
    pub fn snapshots(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshots.clone()
    }

    /// Forces a renewal (local CA) or a re-read (files) now.
    pub fn reload(&self) {
        self.reload.notify_one();
    }

    /// A handle that forces renewals, for signal handlers.
    pub fn reload_handle(&self) -> Arc<Notify> {
        self.reload.clone()
    }

    /// Stops: ends every open stream, stops accepting, waits up to the grace period, and
    /// removes the Unix sockets.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        let _ = self.shutdown_tx.send(true);
        let mut result = Ok(());
        for (addr, mut h) in self.servers {
            match tokio::time::timeout(self.grace, &mut h).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => {
                    if result.is_ok() {
                        result = Err(ServeError::Transport { addr, source: e });
                    }
                }
                Ok(Err(join)) => tracing::warn!(addr = %addr, error = %join, "server task failed"),
                Err(_) => {
                    tracing::warn!(addr = %addr, "connections still open after the grace period; closing them");
                    h.abort();
                }
            }
        }
        for h in self.background {
            if tokio::time::timeout(Duration::from_secs(2), h)
                .await
                .is_err()
            {
                tracing::warn!("background task did not stop in time");
            }
        }
        for s in &self.sockets {
            let _ = std::fs::remove_file(s);
        }
        tracing::info!("SDS server stopped");
        result
    }

    /// Serves until `signal` resolves (or a server task fails), then shuts down.
    pub async fn run_until(mut self, signal: impl Future<Output = ()>) -> Result<(), ServeError> {
        tokio::pin!(signal);
        let failed = {
            let watch_servers = futures_first_exit(&mut self.servers);
            tokio::select! {
                _ = &mut signal => None,
                f = watch_servers => Some(f),
            }
        };
        if let Some((addr, err)) = failed {
            tracing::error!(addr = %addr, error = %err, "server stopped unexpectedly");
        }
        self.shutdown().await
    }
}

/// Resolves when any server task finishes on its own (which only happens on error).
async fn futures_first_exit(
    servers: &mut [(String, JoinHandle<Result<(), tonic::transport::Error>>)],
) -> (String, String) {
    loop {
        if let Some((addr, _)) = servers.iter().find(|(_, h)| h.is_finished()) {
            return (addr.clone(), "server task exited".into());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Resolves once the shutdown flag is set (or its sender is gone).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => tracing::info!("SIGTERM received; shutting down"),
                _ = i.recv() => tracing::info!("SIGINT received; shutting down"),
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Starts a server from `cfg` and runs it until `shutdown` resolves. With
/// `cfg.reload_on_sighup`, SIGHUP forces a renewal.
pub async fn serve(cfg: ServeConfig, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    let sighup = cfg.reload_on_sighup;
    let server = Server::start(cfg).await?;
    if sighup {
        let reload = server.reload_handle();
        if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::info!("SIGHUP received; renewing");
                    reload.notify_one();
                }
            });
        }
    }
    server.run_until(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_parsing() {
        assert_eq!(
            Listen::parse("unix:/tmp/x.sock").unwrap(),
            Listen::Unix("/tmp/x.sock".into())
        );
        assert_eq!(
            Listen::parse("tcp:127.0.0.1:0").unwrap(),
            Listen::Tcp("127.0.0.1:0".parse().unwrap())
        );
        assert_eq!(
            Listen::parse("tcp:[::1]:80").unwrap().to_string(),
            "tcp:[::1]:80"
        );
        for bad in [
            "unix:",
            "tcp:localhost:80",
            "udp:1",
            "/tmp/x",
            "tcp:1.2.3.4",
        ] {
            assert!(Listen::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn config_validation() {
        let src = SourceConfig::Files {
            cert: "c".into(),
            key: "k".into(),
            ca: "a".into(),
            expected: None,
        };
        let mut c = ServeConfig::new(src, vec![]);
        assert!(c.validate().unwrap_err().to_string().contains("no listen"));
        c.listen.push(Listen::Tcp("127.0.0.1:0".parse().unwrap()));
        c.validate().unwrap();
        c.rotation.renew_at = 1.0;
        assert!(c.validate().is_err());
        c.rotation.renew_at = 0.7;
        c.socket_mode = 0o1777;
        assert!(c.validate().is_err());
    }

    const UMASK_CHILD: &str = "MESHCA_SDS_TEST_UMASK_CHILD";
    /// Serializes the socket tests: a child forked by one of them holds copies of the other's
    /// listening sockets until it execs, which would make a closed socket look live.
    static SOCKET_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Under umask 000 the socket is bound with mode 0777: it must not be reachable until it
    /// has its final mode. Runs itself again in a child process with umask 000 (the umask is
    /// per process, so it cannot be changed under the other tests).
    #[test]
    fn unix_socket_never_looser_than_mode_under_umask_000() {
        let name = "tests::unix_socket_never_looser_than_mode_under_umask_000";
        if std::env::var_os(UMASK_CHILD).is_none() {
            let _serial = SOCKET_TESTS.lock().unwrap_or_else(|e| e.into_inner());
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg("umask 000 && exec \"$0\" \"$@\"")
                .arg(std::env::current_exe().unwrap())
                .args(["--exact", name, "--nocapture", "--test-threads=1"])
                .env(UMASK_CHILD, "1")
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "child failed:\n{text}");
            assert!(
                text.contains("1 passed"),
                "child did not run the test:\n{text}"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        // The umask really is 000 here.
        let probe = dir.path().join("probe");
        std::fs::create_dir(&probe).unwrap();
        assert_eq!(
            std::fs::metadata(&probe).unwrap().permissions().mode() & 0o777,
            0o777,
            "umask 000 in the child"
        );
        // A socket directory others may traverse, like /run/meshca (0755).
        let sock_dir = dir.path().join("run");
        std::fs::create_dir(&sock_dir).unwrap();
        std::fs::set_permissions(&sock_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = sock_dir.join("sds.sock");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _rt = rt.enter();
        for mode in [0o600, 0o660] {
            let _ = std::fs::remove_file(&path);
            let mut checked = false;
            let l = bind_unix_with(&path, mode, |tmp| {
                // Right after bind(2): the socket has the umask's mode. Another user can
                // connect only if the socket grants more than `mode` AND no directory
                // between it and the socket directory shuts others out.
                let sock = std::fs::metadata(tmp).unwrap().permissions().mode() & 0o777;
                let looser = sock & !mode & 0o077;
                let mut shut_out = false;
                let mut d = tmp.parent();
                while let Some(p) = d.filter(|p| *p != sock_dir.as_path()) {
                    let m = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
                    shut_out |= m & 0o077 == 0;
                    d = p.parent();
                }
                assert!(
                    looser == 0 || shut_out,
                    "socket {} bound with mode {sock:o} (wanted {mode:o}) where others can reach it",
                    tmp.display()
                );
                checked = true;
            });
            drop(l.unwrap());
            assert!(checked);
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                mode
            );
            let left: Vec<_> = std::fs::read_dir(&sock_dir)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(
                left,
                vec![std::ffi::OsString::from("sds.sock")],
                "no leftovers"
            );
        }
    }

    #[test]
    fn unix_socket_mode_and_stale_socket() {
        let _serial = SOCKET_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/sds.sock");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = bind_unix(&p, 0o600).unwrap();
            let md = std::fs::metadata(&p).unwrap();
            assert_eq!(md.permissions().mode() & 0o777, 0o600);
            // Live: refused.
            assert!(bind_unix(&p, 0o600)
                .unwrap_err()
                .to_string()
                .contains("another server"));
            drop(l);
            // Stale: replaced, with the requested mode.
            let _l = bind_unix(&p, 0o660).unwrap();
            assert_eq!(
                std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o660
            );
        });
        let f = dir.path().join("file");
        std::fs::write(&f, "x").unwrap();
        assert!(bind_unix(&f, 0o600)
            .unwrap_err()
            .to_string()
            .contains("not a socket"));
    }
}
