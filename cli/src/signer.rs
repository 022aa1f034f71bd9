//! `meshca signer run`: the in-cluster CSR signer controller.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use meshca::kube::leader::LeaderConfig;
use meshca::kube::ledger::{LedgerWriter, StoreLedger};
use meshca::kube::run::{run, shutdown_signal, CaReload, RunConfig};
use meshca::kube::signer::{SignerConfig, TtlMode};

use crate::common::{usage, Ctx};

#[derive(Subcommand, Debug)]
pub enum SignerCmd {
    /// Run the controller: sign approved CSRs for meshca.io/<ca>, fill managed Secrets,
    /// publish trust-bundle ConfigMaps; serve /healthz, /readyz and /metrics.
    Run(RunArgs),
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// CA to serve as signer meshca.io/<ca> (repeatable) [default: every CA in the store].
    #[arg(long = "ca", value_name = "NAME")]
    cas: Vec<String>,
    /// Approve or deny pending CSRs from service accounts by policy.
    #[arg(long)]
    auto_approve: bool,
    /// What to do when spec.expirationSeconds exceeds the policy's max TTL: fail the CSR, or
    /// cap the certificate at the maximum.
    #[arg(long, default_value = "fail", value_parser = ["fail", "cap"])]
    ttl_over_policy: String,
    /// Reconciles running at once.
    #[arg(long, default_value_t = 16)]
    concurrency: u16,
    /// Client-side limit on the controller's API requests per second (0: unlimited).
    #[arg(long, default_value_t = meshca::kube::ratelimit::DEFAULT_QPS)]
    qps: f64,
    /// Burst above --qps.
    #[arg(long, default_value_t = meshca::kube::ratelimit::DEFAULT_BURST)]
    burst: u32,
    /// Address of /healthz, /readyz and /metrics ("off" to disable).
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: String,
    /// Elect a leader on a Lease so that only one replica acts (disable only with one replica).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Lease name.
    #[arg(long, default_value = "meshca-signer")]
    lease_name: String,
    /// Lease namespace [default: $POD_NAMESPACE, else the kube store's namespace].
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// This replica's identity in the Lease [default: $POD_NAME, else the host name].
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Lease duration.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    lease_duration: Duration,
    /// Renew this long before the Lease expires.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    renew_grace: Duration,
    /// Namespace whose annotated Secrets (meshca.io/ca) are managed; repeatable; "*" for all.
    #[arg(long = "managed-namespace", value_name = "NS")]
    managed_namespaces: Vec<String>,
    /// Label selector of the Secrets watched for management ("" watches every Secret of the
    /// managed namespaces).
    #[arg(long, default_value = meshca::kube::managed::DEFAULT_SELECTOR)]
    managed_selector: String,
    /// How often the local store is re-read for CA changes ("0s": load once). The kube store
    /// is watched instead.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    ca_reload: Duration,
    /// How often trust-bundle ConfigMaps (and ClusterTrustBundles) are re-applied ("0s"
    /// disables).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    bundle_resync: Duration,
    /// Keep one ClusterTrustBundle meshca.io:<ca>:<suffix> per served CA (skipped with one
    /// log line when the cluster does not serve the API).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    cluster_trust_bundles: bool,
    /// The last part of the ClusterTrustBundle names.
    #[arg(long, default_value = meshca::kube::trust_bundles::DEFAULT_SUFFIX)]
    cluster_trust_bundle_suffix: String,
    /// Also sign PodCertificateRequests (certificates.k8s.io/v1, else v1beta1, else v1alpha1,
    /// by discovery) for meshca.io/<ca>; skipped with one log line where the cluster serves
    /// none of them.
    #[arg(long)]
    pod_certificates: bool,
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

pub async fn run_cmd(ctx: &Ctx, cmd: SignerCmd) -> anyhow::Result<()> {
    let SignerCmd::Run(a) = cmd;
    let metrics_addr = match a.metrics_addr.as_str() {
        "off" | "" => None,
        s => Some(
            s.parse::<SocketAddr>()
                .map_err(|e| usage(format!("--metrics-addr {s:?}: {e}")))?,
        ),
    };
    let ttl_mode: TtlMode = a.ttl_over_policy.parse()?;
    if a.cluster_trust_bundles {
        meshca::kube::trust_bundles::validate_suffix(&a.cluster_trust_bundle_suffix)?;
    }
    let store: Arc<dyn meshca::store::Store> = Arc::from(ctx.store(false).await?);
    let client = meshca::kube::client(ctx.kubeconfig.as_deref()).await?;
    // The kube store writes whole ledger lines (requester and object included) in batches.
    let (ca_reload, ledger): (CaReload, Arc<dyn LedgerWriter>) =
        match crate::kube_store::kube_namespace(ctx) {
            Some(ns) => (
                CaReload::KubeWatch {
                    namespace: ns.to_string(),
                },
                Arc::new(crate::kube_store::open(ns, ctx.kubeconfig.as_deref()).await?),
            ),
            None => (
                if a.ca_reload.is_zero() {
                    CaReload::Off
                } else {
                    CaReload::Poll(a.ca_reload)
                },
                Arc::new(StoreLedger(store.clone())),
            ),
        };
    let leader = if a.leader_elect {
        let ns = a
            .lease_namespace
            .clone()
            .or_else(|| crate::kube_store::kube_namespace(ctx).map(str::to_string))
            .ok_or_else(|| usage("leader election needs --lease-namespace (or $POD_NAMESPACE, or --store kube:<ns>)"))?;
        let identity = a
            .identity
            .clone()
            .or_else(hostname)
            .ok_or_else(|| usage("leader election needs --identity (or $POD_NAME)"))?;
        let mut lc = LeaderConfig::new(ns, identity);
        lc.lease_name = a.lease_name.clone();
        lc.lease_duration = a.lease_duration;
        lc.renew_grace = a.renew_grace;
        Some(lc)
    } else {
        None
    };
    let cfg = RunConfig {
        store,
        cas: (!a.cas.is_empty()).then(|| a.cas.clone()),
        signer: SignerConfig {
            concurrency: a.concurrency,
            ttl_mode,
            auto_approve: a.auto_approve,
            only_signer: None,
        },
        qps: a.qps,
        burst: a.burst,
        metrics_addr,
        leader,
        managed_namespaces: a.managed_namespaces.clone(),
        managed_selector: (!a.managed_selector.is_empty()).then(|| a.managed_selector.clone()),
        bundle_resync: (!a.bundle_resync.is_zero()).then_some(a.bundle_resync),
        metrics: None,
        cluster_trust_bundles: a
            .cluster_trust_bundles
            .then(|| a.cluster_trust_bundle_suffix.clone()),
        pod_certificates: a.pod_certificates,
        shutdown_grace: meshca::kube::run::DEFAULT_SHUTDOWN_GRACE,
        ca_reload,
        ledger: Some(ledger),
        instance: a.identity.clone().or_else(hostname),
    };
    run(client, cfg, shutdown_signal()).await?;
    Ok(())
}
