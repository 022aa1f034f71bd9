//! `meshca sds serve`: the Envoy SDS server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use meshca::identity::{SpiffeId, TrustDomain};
use meshca::key::KeyAlgorithm;
use meshca::store::Store;
use meshca_sds::{
    ClientAllowList, Listen, ServeConfig, SourceConfig, TlsConfig, DEFAULT_SOCKET_PATH,
};

use crate::common::{usage, Ctx, IdentityArgs};

/// `meshca sds ...`
#[derive(Subcommand, Debug)]
pub enum SdsCmd {
    /// Serve `default` (workload certificate) and `ROOTCA` (trust bundle) to Envoy over SDS,
    /// renewing and pushing rotations and bundle changes.
    Serve(Box<ServeArgs>),
}

/// Where the workload certificate comes from.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// A CA of the meshca home (--ca).
    LocalCa,
    /// PEM files (--cert-file, --key-file, --ca-file).
    Files,
    /// A Kubernetes CSR to the cluster's signer (--signer), under the pod's service account.
    KubeCsr,
}

/// The projected service-account token of a pod.
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Certificate source [default: local-ca with --ca, files with --cert-file].
    #[arg(long, value_enum)]
    source: Option<SourceKind>,
    /// Issue and renew the workload certificate from this CA of the meshca home.
    #[arg(long, required_unless_present_any = ["cert_file", "source"])]
    ca: Option<String>,
    /// kube-csr: the signer to ask, meshca.io/<ca>.
    #[arg(long, value_name = "SIGNER", conflicts_with_all = ["ca", "cert_file"])]
    signer: Option<String>,
    /// kube-csr: ROOTCA from this PEM file, re-read when its directory changes (e.g. the
    /// ca.crt of a mounted <bundle>-trust-bundle ConfigMap).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["ca", "cert_file"])]
    trust_bundle_file: Option<PathBuf>,
    /// kube-csr: ROOTCA from the ClusterTrustBundles of --signer (read-only list/watch).
    #[arg(long, conflicts_with = "trust_bundle_file")]
    cluster_trust_bundles: bool,
    /// kube-csr: only ClusterTrustBundles matching this label selector.
    #[arg(long, value_name = "SELECTOR", requires = "cluster_trust_bundles")]
    cluster_trust_bundle_labels: Option<String>,
    /// kube-csr: how long one CSR may wait to be signed before it is deleted and retried.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2m")]
    csr_timeout: Duration,
    /// kube-csr: the service-account token whose `sub` gives the default identity
    /// spiffe://<td>/ns/<ns>/sa/<sa> (when --spiffe-id and --namespace are not given).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_TOKEN_FILE)]
    token_file: PathBuf,
    #[command(flatten)]
    id: IdentityArgs,
    /// Trust domain for --namespace/--service-account with the file source
    /// [default: the CA's trust domain, else cluster.local].
    #[arg(long)]
    trust_domain: Option<TrustDomain>,
    /// Trust bundle served as ROOTCA [default: the CA's root, plus the other root while the
    /// CA is rotated, from prepare until prune]. Every bundle of the home is also served
    /// under its own name.
    #[arg(long, conflicts_with = "cert_file")]
    bundle: Option<String>,
    /// Lifetime of the workload certificate, e.g. 24h [default: the CA policy's default].
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "cert_file")]
    ttl: Option<Duration>,
    /// Renew when this fraction of the lifetime has passed (0 < f < 1).
    #[arg(long, default_value_t = 0.5)]
    renew_at: f64,
    /// Pull each renewal earlier by a random part of up to this fraction (0 <= j < 1).
    #[arg(long, default_value_t = 0.1)]
    jitter: f64,
    /// Workload key algorithm.
    #[arg(long, default_value = "ecdsa-p256", conflicts_with = "cert_file")]
    key: KeyAlgorithm,
    /// Where to serve SDS: unix:PATH and/or tcp:IP:PORT (repeatable)
    /// [default: unix:/run/meshca/sds.sock].
    #[arg(long, value_name = "ADDR")]
    listen: Vec<String>,
    /// File mode of Unix sockets, octal.
    #[arg(long, default_value = "600")]
    socket_mode: String,
    /// Serve Prometheus /metrics and /healthz on tcp:IP:PORT.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// File source: certificate chain, leaf first (e.g. a mounted Secret's tls.crt).
    #[arg(long, requires_all = ["key_file", "ca_file"], conflicts_with = "ca")]
    cert_file: Option<PathBuf>,
    /// File source: private key (tls.key).
    #[arg(long, requires = "cert_file")]
    key_file: Option<PathBuf>,
    /// File source: trust bundle (ca.crt), served as ROOTCA.
    #[arg(long, requires = "cert_file")]
    ca_file: Option<PathBuf>,
    /// Put the CRLs of the ROOTCA bundle's CAs (every CA of their chains) in ROOTCA's
    /// validation context, and push each new revocation.
    #[arg(long, conflicts_with = "cert_file")]
    crl: bool,
    /// How often the home or the files are re-read where they cannot be watched (NFS and
    /// other network file systems). Watched sources are re-read on every change, and every
    /// max(this, 60s) as a safety net.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    poll_interval: Duration,
    /// Mutual TLS on every tcp: listener: this server's certificate chain (PEM, leaf first).
    /// Required, with --tls-key, --client-ca and an allow-list, for a non-loopback address.
    #[arg(long, value_name = "PATH", requires_all = ["tls_key", "client_ca"])]
    tls_cert: Option<PathBuf>,
    /// Mutual TLS: this server's private key (PEM).
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: CA certificates (PEM) that client certificates must chain to.
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// Mutual TLS: allow clients whose certificate carries this SPIFFE ID (repeatable).
    #[arg(long, value_name = "ID", requires = "tls_cert")]
    allow_client_spiffe_id: Vec<String>,
    /// Mutual TLS: allow clients whose certificate has this subject DN, e.g. "CN=envoy,O=mesh"
    /// (repeatable).
    #[arg(long, value_name = "DN", requires = "tls_cert")]
    allow_client_subject: Vec<String>,
    /// Serve tcp: listeners on non-loopback addresses in PLAINTEXT. Anyone who reaches the port
    /// gets the workload's private key.
    #[arg(long, conflicts_with = "tls_cert")]
    danger_plaintext_tcp: bool,
    /// Concurrent SDS streams allowed on one connection (HTTP/2 max concurrent streams).
    #[arg(long, default_value_t = 1024, value_name = "N")]
    max_streams_per_connection: u32,
    /// Largest request message accepted, in bytes (larger: RESOURCE_EXHAUSTED).
    #[arg(long, default_value_t = 256 * 1024, value_name = "BYTES")]
    max_request_bytes: usize,
    /// Most resource names in one request (more: INVALID_ARGUMENT).
    #[arg(long, default_value_t = 128, value_name = "N")]
    max_names_per_request: usize,
    /// Threads that run the server: 1 runs it all on the main thread (enough for the few
    /// streams of one Envoy); N > 1 spreads the streams over N worker threads (a node's or a
    /// fleet's Envoys) [default: 2 for `meshca sds serve`, 1 for `meshca-sds serve`].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    worker_threads: Option<u16>,
}

impl SdsCmd {
    /// How many threads the runtime of this command should run: `--worker-threads`, else
    /// `default` (the program's).
    pub fn worker_threads(&self, default: usize) -> usize {
        match self {
            SdsCmd::Serve(a) => a.worker_threads.map_or(default, usize::from),
        }
    }
}

pub async fn run(ctx: &Ctx, cmd: SdsCmd) -> anyhow::Result<()> {
    match cmd {
        SdsCmd::Serve(a) => serve(ctx, *a).await,
    }
}

fn parse_tcp(flag: &str, s: &str) -> anyhow::Result<SocketAddr> {
    s.strip_prefix("tcp:")
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| usage(format!("{flag} {s:?}: expected tcp:IP:PORT")))
}

/// Builds the server configuration from the flags (no I/O except reading the CA's trust
/// domain from the home).
pub async fn config(ctx: &Ctx, a: ServeArgs) -> anyhow::Result<ServeConfig> {
    let listen = if a.listen.is_empty() {
        vec![Listen::Unix(PathBuf::from(DEFAULT_SOCKET_PATH))]
    } else {
        a.listen
            .iter()
            .map(|l| Listen::parse(l).map_err(|e| usage(e.to_string())))
            .collect::<anyhow::Result<_>>()?
    };
    let socket_mode = u32::from_str_radix(&a.socket_mode, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| {
            usage(format!(
                "--socket-mode {:?}: expected an octal mode such as 600",
                a.socket_mode
            ))
        })?;
    let metrics = a
        .metrics
        .as_deref()
        .map(|m| parse_tcp("--metrics", m))
        .transpose()?;
    let kind = a.source.unwrap_or(if a.cert_file.is_some() {
        SourceKind::Files
    } else {
        SourceKind::LocalCa
    });
    if kind != SourceKind::KubeCsr
        && (a.signer.is_some() || a.trust_bundle_file.is_some() || a.cluster_trust_bundles)
    {
        return Err(usage(
            "--signer, --trust-bundle-file and --cluster-trust-bundles go with --source kube-csr",
        ));
    }
    let source = match (&a.ca, &a.cert_file) {
        _ if kind == SourceKind::KubeCsr => kube_csr_source(ctx, &a)?,
        (Some(ca), None) if kind == SourceKind::LocalCa => {
            if ctx.store != "local" {
                return Err(usage(
                    "sds serve issues from the local store only (--store local)",
                ));
            }
            let home = ctx.home_dir()?;
            let store = meshca::store::LocalStore::open(&home)?;
            let td = match &a.trust_domain {
                Some(td) => td.clone(),
                None => store.load_ca(ca).await?.meta.trust_domain,
            };
            let sans = a.id.sans(&td)?;
            if sans.is_empty() {
                return Err(usage(
                    "give the workload identity: --spiffe-id, --namespace/--service-account or --dns",
                ));
            }
            SourceConfig::LocalCa {
                home,
                ca: ca.clone(),
                bundle: a.bundle.clone(),
                sans,
                ttl: a.ttl,
                key: a.key,
                crl: a.crl,
            }
        }
        (None, Some(cert)) if kind == SourceKind::Files => {
            let td = a.trust_domain.clone().unwrap_or_default();
            let sans = a.id.sans(&td)?;
            SourceConfig::Files {
                cert: cert.clone(),
                key: a
                    .key_file
                    .clone()
                    .ok_or_else(|| usage("--cert-file needs --key-file"))?,
                ca: a
                    .ca_file
                    .clone()
                    .ok_or_else(|| usage("--cert-file needs --ca-file"))?,
                expected: (!sans.is_empty()).then_some(sans),
            }
        }
        _ => {
            return Err(usage(
                "give either --ca (local CA), --cert-file/--key-file/--ca-file, or --source kube-csr --signer meshca.io/<ca>",
            ))
        }
    };
    let tls = match (&a.tls_cert, &a.tls_key, &a.client_ca) {
        (Some(cert), Some(key), Some(client_ca)) => {
            let spiffe_ids = a
                .allow_client_spiffe_id
                .iter()
                .map(|id| {
                    SpiffeId::parse(id).map_err(|e| usage(format!("--allow-client-spiffe-id: {e}")))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let allow = ClientAllowList {
                spiffe_ids,
                subjects: a.allow_client_subject.clone(),
            };
            if allow.is_empty() {
                return Err(usage(
                    "--tls-cert needs an allow-list: --allow-client-spiffe-id and/or --allow-client-subject",
                ));
            }
            Some(TlsConfig {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: client_ca.clone(),
                allow,
            })
        }
        (None, None, None) => None,
        _ => {
            return Err(usage(
                "mutual TLS needs all of --tls-cert, --tls-key and --client-ca",
            ))
        }
    };
    let mut cfg = ServeConfig::new(source, listen);
    cfg.tls = tls;
    cfg.danger_plaintext_tcp = a.danger_plaintext_tcp;
    cfg.max_concurrent_streams = a.max_streams_per_connection;
    cfg.max_request_bytes = a.max_request_bytes;
    cfg.limits.max_names_per_request = a.max_names_per_request;
    cfg.socket_mode = socket_mode;
    cfg.metrics = metrics;
    cfg.rotation.renew_at = a.renew_at;
    cfg.rotation.jitter = a.jitter;
    cfg.rotation.poll_interval = a.poll_interval;
    Ok(cfg)
}

/// The `kube-csr` source from the flags. The identity is --spiffe-id, or
/// --namespace/--service-account, else the service account of the token file; plus --dns/--ip.
fn kube_csr_source(ctx: &Ctx, a: &ServeArgs) -> anyhow::Result<SourceConfig> {
    use meshca::kube::csr_client::{self, CsrRequest};
    use meshca_sds::kube_csr::{KubeCsrConfig, TrustConfig};
    let signer = a
        .signer
        .clone()
        .ok_or_else(|| usage("--source kube-csr needs --signer meshca.io/<ca>"))?;
    if meshca::kube::ca_from_signer_name(&signer).is_none() {
        return Err(usage(format!(
            "--signer {signer:?}: expected meshca.io/<ca>"
        )));
    }
    if a.crl || a.bundle.is_some() {
        return Err(usage("--crl and --bundle go with --ca (local CA)"));
    }
    let trust = match (&a.trust_bundle_file, a.cluster_trust_bundles) {
        (Some(p), false) => TrustConfig::File(p.clone()),
        (None, true) => TrustConfig::ClusterTrustBundles {
            signer: signer.clone(),
            labels: a.cluster_trust_bundle_labels.clone(),
        },
        _ => return Err(usage(
            "--source kube-csr needs ROOTCA: --trust-bundle-file PATH or --cluster-trust-bundles",
        )),
    };
    let td = a.trust_domain.clone().unwrap_or_default();
    let mut sans = a.id.sans(&td)?;
    let (ns, sa) = match (&sans.spiffe_id, &a.id.namespace, &a.id.service_account) {
        (_, Some(ns), Some(sa)) => (ns.clone(), sa.clone()),
        (Some(id), _, _) => id
            .k8s_workload()
            .map(|(n, s)| (n.to_string(), s.to_string()))
            .unwrap_or_default(),
        (None, _, _) => {
            let token = meshca::fsutil::read_limited(&a.token_file).map_err(|e| {
                usage(format!(
                    "no identity given and the service-account token cannot be read ({e}): pass --namespace/--service-account or --spiffe-id"
                ))
            })?;
            let (ns, sa) = csr_client::service_account_of_token(&String::from_utf8_lossy(&token))
                .map_err(|e| usage(format!("{}: {e}", a.token_file.display())))?;
            sans.spiffe_id = Some(meshca::identity::SpiffeId::for_service_account(
                &td, &ns, &sa,
            )?);
            (ns, sa)
        }
    };
    let requester_label = if ns.is_empty() {
        String::new()
    } else {
        format!("{ns}.{sa}")
    };
    let name_prefix = if sa.is_empty() {
        "meshca-sds-".to_string()
    } else {
        // generateName: at most 253 characters with the 5 the API server appends.
        let mut p = format!("meshca-sds-{ns}-{sa}-");
        p.truncate(200);
        p
    };
    let request = CsrRequest {
        signer_name: signer,
        sans,
        trust_domain: td,
        key: a.key,
        expiration: a.ttl.unwrap_or(Duration::from_secs(24 * 3600)),
        name_prefix,
        requester_label,
    };
    request.validate().map_err(|e| usage(e.to_string()))?;
    Ok(SourceConfig::KubeCsr(KubeCsrConfig {
        kubeconfig: ctx.kubeconfig.clone(),
        request,
        timeout: a.csr_timeout,
        trust,
    }))
}

async fn serve(ctx: &Ctx, a: ServeArgs) -> anyhow::Result<()> {
    let cfg = config(ctx, a).await?;
    meshca_sds::serve(cfg, meshca_sds::shutdown_signal())
        .await
        .map_err(|e| {
            if e.is_user_error() {
                usage(e.to_string())
            } else {
                anyhow::Error::new(e)
            }
        })
}
