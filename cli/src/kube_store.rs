//! The Kubernetes side of the CLI: `--store kube:<namespace>`, `issue --secret` written
//! straight to the cluster, and `bundle publish`.

use std::path::Path;

use clap::Args;
use meshca::kube::store::KubeStore;
use meshca::store::{bundle_anchors, LocalStore, Store};

use crate::common::{usage, Ctx};

/// Opens the Kubernetes store in `namespace`, using `--kubeconfig`, else `KUBECONFIG` /
/// `~/.kube/config`, else the in-cluster service account.
pub async fn open(namespace: &str, kubeconfig: Option<&Path>) -> anyhow::Result<KubeStore> {
    if namespace.is_empty() {
        return Err(usage("--store kube:<namespace> needs a namespace"));
    }
    let client = meshca::kube::client(kubeconfig).await?;
    Ok(KubeStore::new(client, namespace))
}

// Here rather than in common.rs, which `meshca-sds` shares: the sidecar never opens a store
// this way, and so links no Kubernetes store.
impl Ctx {
    /// Opens the selected store; `create` makes a missing local home (for `init`).
    pub async fn store(&self, create: bool) -> anyhow::Result<Box<dyn Store>> {
        match self.store.as_str() {
            "local" => {
                let home = self.home_dir()?;
                let s = if create {
                    LocalStore::create(&home)?
                } else {
                    LocalStore::open(&home)?
                };
                Ok(Box::new(s))
            }
            other if other.starts_with("kube:") => Ok(Box::new(
                open(&other["kube:".len()..], self.kubeconfig.as_deref()).await?,
            )),
            other => Err(usage(format!(
                "unknown --store {other:?}; use `local` or `kube:<namespace>`"
            ))),
        }
    }
}

/// The namespace of `--store kube:<ns>`, if that is the selected store.
pub fn kube_namespace(ctx: &Ctx) -> Option<&str> {
    ctx.store.strip_prefix("kube:")
}

/// `meshca bundle publish`.
#[derive(Args, Debug)]
pub struct PublishArgs {
    /// Bundle name.
    name: String,
    /// Target namespace (repeatable) [default: the bundle's own namespaces].
    #[arg(
        long = "namespace",
        value_name = "NS",
        conflicts_with = "cluster_trust_bundle"
    )]
    namespaces: Vec<String>,
    /// Publish one ClusterTrustBundle meshca.io:<ca>:<suffix> per member CA (its roots, both
    /// during a rotation) instead of ConfigMaps.
    #[arg(long)]
    pub cluster_trust_bundle: bool,
    /// The last part of the ClusterTrustBundle names.
    #[arg(long, default_value = meshca::kube::trust_bundles::DEFAULT_SUFFIX, requires = "cluster_trust_bundle")]
    pub suffix: String,
}

#[derive(serde::Serialize)]
struct PublishReport {
    bundle: String,
    configmap: String,
    namespaces: Vec<String>,
    anchors: usize,
}

/// Publishes a bundle as ConfigMaps `<name>-trust-bundle` (key `ca.crt`) in each namespace.
pub async fn publish(ctx: &Ctx, store: &dyn Store, a: PublishArgs) -> anyhow::Result<()> {
    if a.cluster_trust_bundle {
        return crate::bundle::publish_cluster_trust_bundles(ctx, store, &a.name, &a.suffix).await;
    }
    let spec = store.load_bundle(&a.name).await?;
    let namespaces = if a.namespaces.is_empty() {
        spec.namespaces.clone()
    } else {
        a.namespaces
    };
    if namespaces.is_empty() {
        return Err(usage(format!(
            "bundle {} names no namespace: pass --namespace NS (repeatable)",
            spec.name
        )));
    }
    let anchors = bundle_anchors(store, &spec).await?;
    let client = meshca::kube::client(ctx.kubeconfig.as_deref()).await?;
    meshca::kube::bundles::publish(&client, &spec, &anchors, &namespaces, None).await?;
    let report = PublishReport {
        bundle: spec.name.clone(),
        configmap: spec.configmap_name(),
        namespaces,
        anchors: anchors.len(),
    };
    ctx.emit(&report, || {
        format!(
            "published bundle {} ({} anchors) as ConfigMap {} in {}\n",
            report.bundle,
            report.anchors,
            report.configmap,
            report.namespaces.join(", ")
        )
    })
}
