//! `meshca init`: create CAs from flags or from a mesh file.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use meshca::ca::{create_intermediate, create_root, CaSpec};
use meshca::config::{apply_with_progress, Applied, ApplyOptions, MeshConfig, Outcome};
use meshca::identity::TrustDomain;
use meshca::key::KeyAlgorithm;
use meshca::policy::Policy;
use meshca::profile::CaSubject;
use meshca::store::SaveOutcome;

use crate::common::{usage, Ctx};
use crate::progress::Progress;

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Declarative mesh file (CAs, bundles, workloads); relative paths resolve against it.
    #[arg(long, conflicts_with = "ca")]
    config: Option<PathBuf>,
    /// Name of a CA to create (repeatable: each gets the options below).
    #[arg(long = "ca", value_name = "NAME")]
    ca: Vec<String>,
    /// Parent CA: create intermediates signed by it.
    #[arg(long)]
    parent: Option<String>,
    /// Key algorithm: ecdsa-p256, ecdsa-p384, ed25519, rsa-2048, rsa-3072, rsa-4096.
    #[arg(long, default_value = "ecdsa-p256")]
    key: KeyAlgorithm,
    /// Validity, e.g. 10y, 90d [default: 10y for roots, 5y for intermediates].
    #[arg(long, value_parser = humantime::parse_duration)]
    validity: Option<Duration>,
    /// Subject common name [default: "meshca <name> CA"] (only with a single --ca).
    #[arg(long)]
    common_name: Option<String>,
    /// Subject organization.
    #[arg(long)]
    organization: Option<String>,
    /// Subject organizational unit.
    #[arg(long)]
    organizational_unit: Option<String>,
    /// SPIFFE trust domain of the workloads this CA signs.
    #[arg(long, default_value = meshca::identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: TrustDomain,
    /// basicConstraints pathLen [default: 1 for roots, 0 for intermediates].
    #[arg(long)]
    path_len: Option<u8>,
    /// Name constraint: permitted DNS subtree (repeatable).
    #[arg(long = "permit-dns", value_name = "DOMAIN")]
    permit_dns: Vec<String>,
    /// Name constraint: excluded DNS subtree (repeatable).
    #[arg(long = "exclude-dns", value_name = "DOMAIN")]
    exclude_dns: Vec<String>,
    /// Policy: longest workload TTL.
    #[arg(long, value_parser = humantime::parse_duration)]
    max_ttl: Option<Duration>,
    /// Policy: TTL when a request names none.
    #[arg(long, value_parser = humantime::parse_duration)]
    default_ttl: Option<Duration>,
    /// Policy: allowed SPIFFE ID pattern (repeatable), e.g. 'spiffe://{td}/ns/*/sa/*'.
    #[arg(long = "allow-spiffe", value_name = "PATTERN")]
    allow_spiffe: Vec<String>,
    /// Policy: allowed DNS pattern (repeatable), e.g. '{sa}.{ns}.svc' or '**.example.com'.
    #[arg(long = "allow-dns", value_name = "PATTERN")]
    allow_dns: Vec<String>,
    /// Policy: permit wildcard DNS SANs.
    #[arg(long)]
    allow_wildcard_dns: bool,
    /// Policy: refuse IP SANs.
    #[arg(long)]
    deny_ip_sans: bool,
    /// Policy: every certificate must carry a SPIFFE ID.
    #[arg(long)]
    require_spiffe_id: bool,
    /// Policy: a Kubernetes username that requests certificates for other workloads (istiod
    /// in RA mode), e.g. 'system:serviceaccount:istio-system:istiod' (repeatable).
    #[arg(long = "registration-authority", value_name = "USER")]
    registration_authorities: Vec<String>,
    /// Policy: a namespace whose managed Secrets this CA serves (repeatable; default none).
    #[arg(long = "managed-namespace", value_name = "NS")]
    managed_namespaces: Vec<String>,
    /// Policy: let `signer run --auto-approve` approve CSRs for this CA (default off).
    #[arg(long)]
    auto_approve: bool,
    /// Policy: let the PodCertificateRequest signer (`signer run --pod-certificates`) sign
    /// for this CA (default off); the pods' namespaces must also be listed with
    /// --pod-certificate-namespace.
    #[arg(long)]
    pod_certificates: bool,
    /// Policy: a namespace whose pods may get pod certificates from this CA (repeatable;
    /// default none).
    #[arg(long = "pod-certificate-namespace", value_name = "NS")]
    pod_certificate_namespaces: Vec<String>,
    /// Policy: an IP range (CIDR, e.g. 10.0.0.0/8) IP SANs must lie in (repeatable). Without
    /// one the in-cluster front ends issue no IP SAN.
    #[arg(long = "allow-ip-range", value_name = "CIDR")]
    allowed_ip_ranges: Vec<meshca::policy::IpNet>,
    /// Policy: let the auto-approver approve DNS names matched only by a rule without
    /// {ns}/{sa} (e.g. '**.example.com').
    #[arg(long)]
    auto_approve_static_dns: bool,
    /// Policy: an Istio node agent `<namespace>/<serviceaccount>` (e.g. istio-system/ztunnel)
    /// that may ask `meshca istio-ca serve` for the identity of a workload with a pod on its
    /// node (ztunnel's ImpersonatedIdentity); repeatable, default none.
    #[arg(long = "istio-node-agent", value_name = "NS/SA")]
    istio_node_agents: Vec<String>,
    /// Replace existing CAs (and re-issue workloads with --config).
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    aws: crate::aws::AwsInitArgs,
}

pub async fn run(ctx: &Ctx, a: InitArgs) -> anyhow::Result<()> {
    let store = ctx.store(true).await?;
    let now = time::OffsetDateTime::now_utc();
    let report: Vec<Applied> = if let Some(path) = &a.config {
        let cfg = MeshConfig::load(path)?;
        let base_dir = path.parent().map(|p| p.to_path_buf()).unwrap_or_default();
        let steps = cfg.cas.len() + cfg.bundles.len() + cfg.workloads.len();
        let progress = Progress::bar(ctx, steps as u64, "");
        progress.set_prefix(format!(
            "{} CAs, {} workloads ",
            cfg.cas.len(),
            cfg.workloads.len()
        ));
        apply_with_progress(
            store.as_ref(),
            &cfg,
            &ApplyOptions {
                force: a.force,
                base_dir,
            },
            now,
            &progress,
        )
        .await?
    } else {
        if a.ca.is_empty() {
            return Err(usage("give --ca NAME (repeatable) or --config FILE"));
        }
        if a.ca.len() > 1 && a.common_name.is_some() {
            return Err(usage(
                "--common-name applies to one CA; create the CAs one at a time",
            ));
        }
        let pca = a.aws.is_pca(&a.ca)?;
        let mut policy = Policy::default();
        if let Some(m) = a.max_ttl {
            policy.max_ttl = m;
        }
        if let Some(d) = a.default_ttl {
            policy.default_ttl = d;
        }
        policy.allowed_spiffe_ids = a.allow_spiffe.clone();
        policy.allowed_dns = a.allow_dns.clone();
        policy.allow_wildcard_dns = a.allow_wildcard_dns;
        policy.allow_ip_sans = !a.deny_ip_sans;
        policy.require_spiffe_id = a.require_spiffe_id;
        policy.registration_authorities = a.registration_authorities.clone();
        policy.managed_namespaces = a.managed_namespaces.clone();
        policy.auto_approve = a.auto_approve;
        policy.auto_approve_static_dns = a.auto_approve_static_dns;
        policy.pod_certificates = a.pod_certificates;
        policy.pod_certificate_namespaces = a.pod_certificate_namespaces.clone();
        policy.allowed_ip_ranges = a.allowed_ip_ranges.clone();
        policy.istio_node_agents = a.istio_node_agents.clone();
        policy.validate()?;
        let parent = match &a.parent {
            Some(p) => Some(store.load_ca(p).await?),
            None => None,
        };
        let mut report = Vec::new();
        for name in &a.ca {
            let spec = CaSpec {
                name: name.clone(),
                parent: a.parent.clone(),
                key: a.key,
                validity: a.validity,
                subject: CaSubject {
                    common_name: a.common_name.clone(),
                    organization: a.organization.clone(),
                    organizational_unit: a.organizational_unit.clone(),
                },
                path_len: a.path_len,
                trust_domain: Some(a.trust_domain.clone()),
                permitted_dns: a.permit_dns.clone(),
                excluded_dns: a.exclude_dns.clone(),
                policy: policy.clone(),
            };
            if store.ca_exists(name).await? && !a.force {
                report.push(Applied {
                    kind: "ca".into(),
                    name: name.clone(),
                    outcome: Outcome::Exists,
                    files: vec![],
                    serial: None,
                });
                continue;
            }
            tracing::info!(ca = %name, key = %a.key, "generating CA key");
            let keygen = || {
                a.key.is_rsa().then(|| {
                    Progress::spinner(ctx, format!("generating a {} key for CA {name}", a.key))
                })
            };
            let ca = match &parent {
                _ if pca => crate::aws::init_pca(ctx, &a.aws, &spec, parent.as_ref(), now).await?,
                None => {
                    let _p = keygen();
                    create_root(&spec, now)?
                }
                Some(p) => {
                    let _p = keygen();
                    create_intermediate(&spec, p, now)?
                }
            };
            let outcome = match store.save_ca(&ca, a.force).await {
                Ok(SaveOutcome::Created) => Outcome::Created,
                Ok(SaveOutcome::Replaced) => Outcome::Replaced,
                // Another process created it between our check and our save.
                Err(meshca::Error::AlreadyExists(_)) => Outcome::Exists,
                Err(e) => return Err(e.into()),
            };
            report.push(Applied {
                kind: "ca".into(),
                name: name.clone(),
                outcome,
                files: vec![],
                serial: Some(ca.info()?.serial_hex()),
            });
        }
        report
    };
    let home = store.describe();
    ctx.emit(&report, || {
        let mut s = String::new();
        for r in &report {
            let what = match r.outcome {
                Outcome::Created => "created",
                Outcome::Exists => "exists (left alone; --force replaces it)",
                Outcome::Replaced => "replaced",
                Outcome::Updated => "updated",
                Outcome::Unchanged => "unchanged",
            };
            s.push_str(&format!("{:<8} {:<16} {what}", r.kind, r.name));
            if let Some(serial) = &r.serial {
                s.push_str(&format!("  serial {serial}"));
            }
            s.push('\n');
            for f in &r.files {
                s.push_str(&format!("           wrote {}\n", f.display()));
            }
        }
        s.push_str(&format!("store: {home}\n"));
        s
    })
}
