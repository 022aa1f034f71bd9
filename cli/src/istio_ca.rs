//! `meshca istio-ca serve`: Istio's CA API (`istio.v1.auth.IstioCertificateService`) for
//! istio-agent and ztunnel (`CA_ADDR`), backed by meshca CAs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use futures::stream::BoxStream;
use meshca::kube::issuers;
use meshca::kube::istio_auth::KubeIstioAuth;
use meshca::kube::ledger::{LedgerSink, LedgerWriter, StoreLedger};
use meshca::kube::metrics::Metrics;
use meshca_sds::istio_ca::{IstioCaConfig, IstioCaServer, IstioTls};

use crate::common::{usage, Ctx};

#[derive(Subcommand, Debug)]
pub enum IstioCaCmd {
    /// Serve IstioCertificateService/CreateCertificate: ServiceAccount tokens checked with
    /// TokenReview (or the client's current certificate), every request through the CA's policy.
    Serve(ServeArgs),
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// CA to issue from (repeatable). The first answers requests without CertSigner metadata;
    /// istio-agent's ISTIO_META_CERT_SIGNER=meshca.io/<ca> selects another.
    #[arg(long = "ca", value_name = "NAME", required = true)]
    cas: Vec<String>,
    /// TCP address to listen on. Without --tls-cert it must be a loopback address.
    #[arg(long, default_value = "127.0.0.1:15012")]
    listen: SocketAddr,
    /// Server certificate chain (PEM), leaf first. Clients may then renew with their current
    /// meshca certificate (mutual TLS).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Audience the ServiceAccount tokens must carry.
    #[arg(long, default_value = meshca::istio::DEFAULT_AUDIENCE)]
    audience: String,
    /// This cluster's ID: a request whose ClusterID metadata names another is refused.
    #[arg(long, default_value = meshca::istio::DEFAULT_CLUSTER_ID)]
    cluster_id: String,
    /// How long a successful TokenReview is reused for the same token ("0s": never).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    token_cache_ttl: Duration,
    /// Address of /healthz, /readyz and /metrics ("off" to disable).
    #[arg(long, default_value = "off")]
    metrics_addr: String,
    /// How often the local store is re-read for CA changes ("0s": load once). The kube store
    /// is watched instead. The roots that client certificates (mTLS renewal) must chain to
    /// stay those loaded at start.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    ca_reload: Duration,
}

pub async fn run(ctx: &Ctx, cmd: IstioCaCmd) -> anyhow::Result<()> {
    let IstioCaCmd::Serve(a) = cmd;
    let metrics_addr = match a.metrics_addr.as_str() {
        "off" | "" => None,
        s => Some(
            s.parse::<SocketAddr>()
                .map_err(|e| usage(format!("--metrics-addr {s:?}: {e}")))?,
        ),
    };
    let mut seen = std::collections::BTreeSet::new();
    if let Some(dup) = a.cas.iter().find(|c| !seen.insert(c.as_str())) {
        return Err(usage(format!("--ca {dup} is given twice")));
    }
    let store: Arc<dyn meshca::store::Store> = Arc::from(ctx.store(false).await?);
    let metrics = Arc::new(Metrics::new());
    // The same snapshots as the signer's: a CA replaced in the store (rotation) is served
    // without a restart, one that fails to load is not served.
    let first = issuers::reload(store.as_ref(), Some(&a.cas), None, &metrics).await?;
    for name in &a.cas {
        match first.get(name) {
            Some(i) => i.meta().policy.validate()?,
            None => {
                let why = first.failed().get(name).cloned().unwrap_or_default();
                return Err(usage(format!("CA {name} cannot be served: {why}")));
            }
        }
    }
    let (issuers_tx, issuers_rx) = tokio::sync::watch::channel(Arc::new(first));
    let client = meshca::kube::client(ctx.kubeconfig.as_deref()).await?;
    let auth = Arc::new(KubeIstioAuth::new(client.clone(), a.token_cache_ttl));
    let (ledger, triggers): (Arc<dyn LedgerWriter>, Option<BoxStream<'static, ()>>) =
        match crate::kube_store::kube_namespace(ctx) {
            Some(ns) => (
                Arc::new(crate::kube_store::open(ns, ctx.kubeconfig.as_deref()).await?),
                Some(Box::pin(issuers::kube_triggers(
                    client,
                    ns,
                    meshca::kube::run::KUBE_SAFETY_POLL,
                ))),
            ),
            None => (
                Arc::new(StoreLedger(store.clone())),
                (!a.ca_reload.is_zero()).then(|| {
                    Box::pin(issuers::poll_triggers(a.ca_reload)) as BoxStream<'static, ()>
                }),
            ),
        };
    metrics.set_ready(true);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let reload_task = triggers.map(|t| {
        tokio::spawn(issuers::watch_loop(
            store.clone(),
            Some(a.cas.clone()),
            metrics.clone(),
            issuers_tx,
            t,
            until_stopped(stop_rx.clone()),
        ))
    });
    let (sink, ledger_task) = LedgerSink::spawn(ledger, metrics.clone());
    let server = IstioCaServer::start(IstioCaConfig {
        listen: a.listen,
        tls: a.tls_cert.map(|cert| IstioTls {
            cert,
            key: a.tls_key.unwrap_or_default(),
        }),
        cas: a.cas.clone(),
        issuers: issuers_rx,
        auth: auth.clone(),
        pods: auth,
        audience: a.audience,
        cluster_id: a.cluster_id,
        ledger: Some(sink),
        metrics: metrics.clone(),
    })
    .await
    .map_err(|e| match e {
        meshca_sds::ServeError::Config(m) => usage(m),
        e if e.is_user_error() => usage(e.to_string()),
        e => anyhow::Error::new(e),
    })?;
    // Tests and scripts read the bound address from this line.
    eprintln!("meshca: istio-ca listening on {}", server.local_addr());
    let metrics_task = metrics_addr.map(|addr| {
        tokio::spawn(meshca::kube::metrics::serve(
            metrics.clone(),
            addr,
            until_stopped(stop_rx.clone()),
        ))
    });
    meshca_sds::shutdown_signal().await;
    let _ = stop_tx.send(true);
    server.shutdown().await?;
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    if let Some(t) = reload_task {
        let _ = t.await;
    }
    meshca::kube::ledger::flush(ledger_task, Duration::from_secs(10)).await;
    Ok(())
}
