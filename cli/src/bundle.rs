//! `meshca bundle`: named trust bundles.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use meshca::bundle::{self, BundleSpec};
use meshca::output::{bundle_configmap_manifest_with_crl, ObjectRef};
use meshca::report::{AnchorSummary, BundleReport};
use meshca::store::{self, SaveOutcome, Store};
use meshca::x509::CertInfo;

use crate::common::{rfc3339, usage, Ctx};

#[derive(Subcommand, Debug)]
pub enum BundleCmd {
    /// Create a bundle of CAs (e.g. `frontend` trusting ca1 and ca2).
    Create(CreateArgs),
    /// Add or remove member CAs.
    Update(UpdateArgs),
    /// Show a bundle's members and anchors.
    Show(NameArg),
    /// List bundles.
    List,
    /// Write a bundle's PEM to a file or stdout.
    Export(ExportArgs),
    /// Print a ConfigMap manifest (key ca.crt) for `kubectl apply -f -`.
    Configmap(ConfigMapArgs),
    /// Write the bundle's ConfigMaps (key ca.crt) to the cluster by server-side apply; with
    /// --cluster-trust-bundle, one ClusterTrustBundle per member CA instead.
    Publish(crate::kube_store::PublishArgs),
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Bundle name.
    name: String,
    /// Member CA (repeatable).
    #[arg(long = "ca", value_name = "NAME", required = true)]
    cas: Vec<String>,
    /// File name used by export and workload output [default: <name>_bundle.pem].
    #[arg(long)]
    file: Option<String>,
    /// Namespace the ConfigMap is published to (repeatable).
    #[arg(long = "namespace", value_name = "NS")]
    namespaces: Vec<String>,
    /// Replace an existing bundle of that name.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
pub struct UpdateArgs {
    /// Bundle name.
    name: String,
    /// CA to add (repeatable).
    #[arg(long = "add-ca", value_name = "NAME")]
    add: Vec<String>,
    /// CA to remove (repeatable).
    #[arg(long = "remove-ca", value_name = "NAME")]
    remove: Vec<String>,
    /// Namespace to add (repeatable).
    #[arg(long = "add-namespace", value_name = "NS")]
    add_ns: Vec<String>,
}

#[derive(Args, Debug)]
pub struct NameArg {
    /// Bundle name.
    name: String,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Bundle name.
    name: String,
    /// Output file [default: stdout].
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ConfigMapArgs {
    /// Bundle name.
    name: String,
    /// Namespace(s) [default: the bundle's namespaces].
    #[arg(long = "namespace", value_name = "NS")]
    namespaces: Vec<String>,
    /// ConfigMap name [default: <bundle>-trust-bundle].
    #[arg(long)]
    configmap_name: Option<String>,
    /// Also add `ca.crl`: the CRLs of every CA in the bundle's chains (valid 7 days).
    #[arg(long)]
    crl: bool,
}

async fn report(store: &dyn Store, spec: &BundleSpec) -> anyhow::Result<BundleReport> {
    let anchors = store::bundle_anchors(store, spec).await?;
    let mut summaries = Vec::new();
    for a in &anchors {
        let i = CertInfo::from_der(a)?;
        summaries.push(AnchorSummary {
            subject: i.subject,
            sha256_fingerprint: i.sha256_fingerprint,
            not_after: i.not_after,
        });
    }
    Ok(BundleReport {
        name: spec.name.clone(),
        cas: spec.cas.clone(),
        file: spec.file_name(),
        namespaces: spec.namespaces.clone(),
        anchors: summaries,
        pem: bundle::to_pem(&anchors),
    })
}

fn text(r: &BundleReport) -> String {
    let mut s = format!(
        "bundle {}\n  CAs      {}\n  file     {}\n",
        r.name,
        r.cas.join(", "),
        r.file
    );
    if !r.namespaces.is_empty() {
        s.push_str(&format!("  publish  {}\n", r.namespaces.join(", ")));
    }
    for a in &r.anchors {
        s.push_str(&format!(
            "  anchor   {}  until {}  sha256 {}\n",
            a.subject,
            rfc3339(a.not_after),
            a.sha256_fingerprint
        ));
    }
    s
}

async fn save_checked(
    ctx: &Ctx,
    store: &dyn Store,
    spec: &BundleSpec,
) -> anyhow::Result<SaveOutcome> {
    spec.validate()?;
    // Every member must exist before the definition is stored.
    let r = report(store, spec).await?;
    let outcome = store.save_bundle(spec).await?;
    ctx.emit(&r, || {
        format!(
            "{} bundle {}\n{}",
            if outcome == SaveOutcome::Created {
                "created"
            } else {
                "updated"
            },
            spec.name,
            text(&r)
        )
    })?;
    Ok(outcome)
}

pub async fn run(ctx: &Ctx, cmd: BundleCmd) -> anyhow::Result<()> {
    let store = ctx.store(false).await?;
    let store = store.as_ref();
    match cmd {
        BundleCmd::Publish(a) => return crate::kube_store::publish(ctx, store, a).await,
        BundleCmd::Create(a) => {
            if !a.force && store.load_bundle(&a.name).await.is_ok() {
                return Err(meshca::Error::AlreadyExists(format!("bundle {}", a.name)).into());
            }
            let spec = BundleSpec {
                name: a.name,
                cas: a.cas,
                file: a.file,
                namespaces: a.namespaces,
            };
            save_checked(ctx, store, &spec).await?;
        }
        BundleCmd::Update(a) => {
            if a.add.is_empty() && a.remove.is_empty() && a.add_ns.is_empty() {
                return Err(usage(
                    "nothing to do: give --add-ca, --remove-ca or --add-namespace",
                ));
            }
            let mut spec = store.load_bundle(&a.name).await?;
            for r in &a.remove {
                if !spec.cas.contains(r) {
                    return Err(usage(format!("bundle {} has no CA {r:?}", spec.name)));
                }
                spec.cas.retain(|c| c != r);
            }
            for c in a.add {
                if !spec.cas.contains(&c) {
                    spec.cas.push(c);
                }
            }
            for n in a.add_ns {
                if !spec.namespaces.contains(&n) {
                    spec.namespaces.push(n);
                }
            }
            save_checked(ctx, store, &spec).await?;
        }
        BundleCmd::Show(a) => {
            let r = report(store, &store.load_bundle(&a.name).await?).await?;
            ctx.emit(&r, || text(&r))?;
        }
        BundleCmd::List => {
            let mut all = Vec::new();
            for b in store.list_bundles().await? {
                all.push(report(store, &b).await?);
            }
            ctx.emit(&all, || {
                if all.is_empty() {
                    return "no bundles\n".into();
                }
                all.iter()
                    .map(|r| format!("{:<20} {}\n", r.name, r.cas.join(",")))
                    .collect()
            })?;
        }
        BundleCmd::Export(a) => {
            let r = report(store, &store.load_bundle(&a.name).await?).await?;
            match a.out {
                Some(p) => {
                    meshca::fsutil::write_atomic(
                        &p,
                        r.pem.as_bytes(),
                        meshca::fsutil::PUBLIC_MODE,
                    )?;
                    eprintln!(
                        "meshca: wrote {} ({} anchors)",
                        p.display(),
                        r.anchors.len()
                    );
                }
                None => print!("{}", r.pem),
            }
        }
        BundleCmd::Configmap(a) => {
            let spec = store.load_bundle(&a.name).await?;
            let r = report(store, &spec).await?;
            let namespaces = if a.namespaces.is_empty() {
                spec.namespaces.clone()
            } else {
                a.namespaces
            };
            if namespaces.is_empty() {
                return Err(usage(
                    "no namespace: pass --namespace or add namespaces to the bundle",
                ));
            }
            let name = a.configmap_name.unwrap_or_else(|| spec.configmap_name());
            let crl = if a.crl {
                let now = time::OffsetDateTime::now_utc();
                let revoked = store.revocations().await?;
                let mut pem = String::new();
                for ca in store::chain_cas(store, &spec.cas).await? {
                    let der = meshca::crl::build(
                        &ca,
                        &revoked,
                        now,
                        meshca::crl::DEFAULT_CRL_VALIDITY,
                        meshca::crl::crl_number(now),
                    )?;
                    pem.push_str(&meshca::crl::to_pem(&der));
                }
                Some(pem)
            } else {
                None
            };
            let mut docs = Vec::new();
            for ns in namespaces {
                let at: ObjectRef = format!("{ns}/{name}").parse()?;
                docs.push(bundle_configmap_manifest_with_crl(
                    &at,
                    &spec.name,
                    &r.pem,
                    crl.as_deref(),
                )?);
            }
            print!("{}", docs.join("---\n"));
        }
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct CtbReport {
    bundle: String,
    api_version: String,
    cluster_trust_bundles: Vec<CtbItem>,
    applied: Vec<String>,
    deleted: Vec<String>,
    unchanged: usize,
}

#[derive(serde::Serialize)]
struct CtbItem {
    name: String,
    signer_name: String,
    anchors: usize,
}

/// `meshca bundle publish NAME --cluster-trust-bundle`: one ClusterTrustBundle
/// `meshca.io:<ca>:<suffix>` per member CA of bundle `name`, holding that CA's roots (both
/// during a rotation); stale ones of those CAs (another suffix) are deleted.
pub async fn publish_cluster_trust_bundles(
    ctx: &Ctx,
    store: &dyn Store,
    name: &str,
    suffix: &str,
) -> anyhow::Result<()> {
    use meshca::kube::trust_bundles as ctb;
    ctb::validate_suffix(suffix)?;
    let spec = store.load_bundle(name).await?;
    let mut want = Vec::new();
    for ca in &spec.cas {
        want.push(ctb::desired(
            ca,
            &store::ca_anchors(store, ca).await?,
            suffix,
        )?);
    }
    let client = meshca::kube::client(ctx.kubeconfig.as_deref()).await?;
    let Some(ar) = ctb::detect(&client).await? else {
        return Err(meshca::Error::Unsupported(format!(
            "ClusterTrustBundles: the cluster serves no {} (served by default from Kubernetes 1.37; on 1.33 to 1.36, feature gate ClusterTrustBundle and --runtime-config certificates.k8s.io/v1beta1/clustertrustbundles=true)",
            ctb::WANTED.describe()
        ))
        .into());
    };
    let r = ctb::sync(&client, &ar, &want, None).await?;
    let report = CtbReport {
        bundle: spec.name.clone(),
        api_version: ar.api_version.clone(),
        cluster_trust_bundles: want
            .iter()
            .map(|d| CtbItem {
                name: d.name.clone(),
                signer_name: d.signer.clone(),
                anchors: d.anchors,
            })
            .collect(),
        applied: r.applied,
        deleted: r.deleted,
        unchanged: r.unchanged,
    };
    ctx.emit(&report, || {
        let mut s = String::new();
        for i in &report.cluster_trust_bundles {
            let what = if report.applied.contains(&i.name) {
                "applied"
            } else {
                "unchanged"
            };
            s.push_str(&format!(
                "{what} ClusterTrustBundle {} (signer {}, {} anchors, {})\n",
                i.name, i.signer_name, i.anchors, report.api_version
            ));
        }
        for d in &report.deleted {
            s.push_str(&format!("deleted stale ClusterTrustBundle {d}\n"));
        }
        s
    })
}
