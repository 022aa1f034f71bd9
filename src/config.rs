//! The declarative mesh file (`meshca.toml`): CAs, trust bundles and workloads, and the
//! idempotent apply step behind `meshca init --config`.
//!
//! ```toml
//! trust_domain = "cluster.local"
//! out_dir = "out"                  # relative to this file
//!
//! [[ca]]
//! name = "ca1"
//! [ca.policy]
//! max_ttl = "30d"
//!
//! [[bundle]]
//! name = "frontend"
//! cas = ["ca1", "ca2"]
//!
//! [[workload]]
//! name = "frontend"
//! ca = "ca1"
//! namespace = "mesh"
//! service_account = "frontend"
//! dns = ["frontend.mesh.svc.cluster.local"]
//! bundle = "frontend"
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::bundle::{self, BundleSpec};
use crate::ca::{create_intermediate, create_root, CaSpec};
use crate::error::{Error, Result};
use crate::fsutil::{self, PUBLIC_MODE};
use crate::identity::{DnsName, Sans, SpiffeId, TrustDomain};
use crate::issue::{issue_workload, LedgerEntry};
use crate::key::KeyAlgorithm;
use crate::output::{self, ObjectRef, WorkloadFiles};
use crate::store::{self, SaveOutcome, Store};
use crate::x509::CertInfo;

/// A workload certificate declared in the mesh file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Name used for the files (`<name>_cert.pem`, ...).
    pub name: String,
    /// Issuing CA.
    pub ca: String,
    /// Explicit SPIFFE ID.
    #[serde(default)]
    pub spiffe_id: Option<SpiffeId>,
    /// Namespace (with `service_account`, builds `spiffe://<td>/ns/<ns>/sa/<sa>`).
    #[serde(default)]
    pub namespace: Option<String>,
    /// Service account.
    #[serde(default)]
    pub service_account: Option<String>,
    /// DNS SANs.
    #[serde(default)]
    pub dns: Vec<DnsName>,
    /// IP SANs.
    #[serde(default)]
    pub ips: Vec<std::net::IpAddr>,
    /// Lifetime (default: the CA policy's default TTL).
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
    /// Workload key algorithm.
    #[serde(default)]
    pub key: KeyAlgorithm,
    /// Trust bundle written next to the files and used as `ca.crt` of `secret`.
    #[serde(default)]
    pub bundle: Option<String>,
    /// Also write a `kubernetes.io/tls` Secret manifest `<name>-secret.yaml` for NAMESPACE/NAME.
    #[serde(default)]
    pub secret: Option<String>,
}

impl WorkloadSpec {
    /// The SANs this workload asks for.
    pub fn sans(&self, td: &TrustDomain) -> Result<Sans> {
        sans_from_parts(
            td,
            self.spiffe_id.clone(),
            self.namespace.as_deref(),
            self.service_account.as_deref(),
            self.dns.clone(),
            self.ips.clone(),
        )
    }
}

/// Builds SANs from the CLI/config parts: an explicit SPIFFE ID, or namespace + service
/// account (both or neither), plus DNS names and IPs.
pub fn sans_from_parts(
    td: &TrustDomain,
    spiffe_id: Option<SpiffeId>,
    namespace: Option<&str>,
    service_account: Option<&str>,
    dns: Vec<DnsName>,
    ips: Vec<std::net::IpAddr>,
) -> Result<Sans> {
    let from_sa = match (namespace, service_account) {
        (Some(ns), Some(sa)) => Some(SpiffeId::for_service_account(td, ns, sa)?),
        (None, None) => None,
        _ => {
            return Err(Error::invalid(
                "identity",
                "--namespace and --service-account go together",
            ))
        }
    };
    if spiffe_id.is_some() && from_sa.is_some() {
        return Err(Error::invalid(
            "identity",
            "give either a SPIFFE ID or a namespace and service account, not both",
        ));
    }
    let mut s = Sans {
        spiffe_id: spiffe_id.or(from_sa),
        dns,
        ips,
    };
    s.dedup();
    Ok(s)
}

/// The whole mesh file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshConfig {
    /// Default trust domain for CAs that name none.
    #[serde(default)]
    pub trust_domain: Option<TrustDomain>,
    /// Where workload files and bundle PEMs go (relative to the config file).
    #[serde(default)]
    pub out_dir: Option<PathBuf>,
    /// CAs, parents before or after children (they are ordered on apply).
    #[serde(default, rename = "ca")]
    pub cas: Vec<CaSpec>,
    /// Trust bundles.
    #[serde(default, rename = "bundle")]
    pub bundles: Vec<BundleSpec>,
    /// Workloads to issue.
    #[serde(default, rename = "workload")]
    pub workloads: Vec<WorkloadSpec>,
    /// CA certificates to write as `kubernetes.io/tls` Secret manifests (the gateway root
    /// users download).
    #[serde(default, rename = "ca_secret")]
    pub ca_secrets: Vec<CaSecretSpec>,
}

/// A CA written as a Secret manifest `<out_dir>/<ca>-ca-secret.yaml`: `tls.crt` and
/// `ca.crt` hold the CA certificate (ca.crt both roots during a rotation); no key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaSecretSpec {
    /// The CA.
    pub ca: String,
    /// NAMESPACE/NAME of the Secret.
    pub secret: String,
}

impl MeshConfig {
    /// Parses TOML. Unknown keys are errors (typos must not be silently ignored).
    pub fn parse(text: &str, source: &str) -> Result<MeshConfig> {
        let mut c: MeshConfig = toml::from_str(text).map_err(|e| Error::Invalid {
            what: "config",
            reason: format!(
                "{source}: {}",
                e.to_string()
                    .lines()
                    .collect::<Vec<_>>()
                    .join(" ")
                    .replace("  ", " ")
            ),
        })?;
        let td = c.trust_domain.clone();
        for ca in &mut c.cas {
            if ca.trust_domain.is_none() {
                ca.trust_domain = td.clone();
            }
        }
        c.validate()?;
        Ok(c)
    }

    /// Reads and parses a file (size-limited).
    pub fn load(path: &Path) -> Result<MeshConfig> {
        let bytes = fsutil::read_limited(path)?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| Error::invalid("config", format!("{} is not UTF-8", path.display())))?;
        MeshConfig::parse(text, &path.display().to_string())
    }

    fn validate(&self) -> Result<()> {
        let mut names = std::collections::HashSet::new();
        for ca in &self.cas {
            crate::ca::validate_ca_name(&ca.name)?;
            ca.policy
                .validate()
                .map_err(|e| Error::invalid("config", format!("CA {:?}: {e}", ca.name)))?;
            if !names.insert(ca.name.as_str()) {
                return Err(Error::invalid(
                    "config",
                    format!("CA {:?} is declared twice", ca.name),
                ));
            }
        }
        let mut bnames = std::collections::HashSet::new();
        for b in &self.bundles {
            b.validate()?;
            if !bnames.insert(b.name.as_str()) {
                return Err(Error::invalid(
                    "config",
                    format!("bundle {:?} is declared twice", b.name),
                ));
            }
        }
        let mut wnames = std::collections::HashSet::new();
        for w in &self.workloads {
            output::validate_workload_name(&w.name)?;
            if !wnames.insert(w.name.as_str()) {
                return Err(Error::invalid(
                    "config",
                    format!("workload {:?} is declared twice", w.name),
                ));
            }
            if let Some(b) = &w.bundle {
                if !bnames.contains(b.as_str()) {
                    return Err(Error::invalid(
                        "config",
                        format!("workload {} uses undeclared bundle {b:?}", w.name),
                    ));
                }
            }
            if let Some(s) = &w.secret {
                s.parse::<ObjectRef>()?;
            }
        }
        for c in &self.ca_secrets {
            crate::ca::validate_ca_name(&c.ca)?;
            c.secret.parse::<ObjectRef>()?;
        }
        Ok(())
    }
}

/// What apply did with one object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Newly created.
    Created,
    /// Already there and left alone.
    Exists,
    /// Replaced (`--force`).
    Replaced,
    /// Definition updated.
    Updated,
    /// Unchanged.
    Unchanged,
}

/// One line of the apply report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// `ca`, `bundle` or `workload`.
    pub kind: String,
    /// Its name.
    pub name: String,
    /// What happened.
    pub outcome: Outcome,
    /// Files written (workload files, bundle PEM, Secret manifest).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<PathBuf>,
    /// Serial of an issued certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

/// Options of [`apply`].
#[derive(Clone, Debug, Default)]
pub struct ApplyOptions {
    /// Replace existing CAs and re-issue existing workload certificates.
    pub force: bool,
    /// Where relative paths resolve (the config file's directory).
    pub base_dir: PathBuf,
}

/// Told about each step of [`apply_with_progress`] (the CLI draws a progress bar).
pub trait ApplyProgress {
    /// Called before each CA, bundle and workload: `done` of `total` steps are finished and
    /// the next is the `kind` ("ca", "bundle", "workload") called `name`.
    fn step(&self, done: usize, total: usize, kind: &str, name: &str);
}

/// No progress reporting.
impl ApplyProgress for () {
    fn step(&self, _: usize, _: usize, _: &str, _: &str) {}
}

/// Creates what the mesh file declares and leaves alone what exists.
///
/// CAs are created parents-first; bundles are stored and their PEM written to `out_dir`;
/// workloads are issued unless their certificate file already exists, chains to the current
/// CA and has more than a third of its lifetime left.
pub async fn apply(
    store: &dyn Store,
    cfg: &MeshConfig,
    opts: &ApplyOptions,
    now: OffsetDateTime,
) -> Result<Vec<Applied>> {
    apply_with_progress(store, cfg, opts, now, &()).await
}

/// [`apply`], telling `progress` before each CA, bundle and workload.
pub async fn apply_with_progress(
    store: &dyn Store,
    cfg: &MeshConfig,
    opts: &ApplyOptions,
    now: OffsetDateTime,
    progress: &dyn ApplyProgress,
) -> Result<Vec<Applied>> {
    let total = cfg.cas.len() + cfg.bundles.len() + cfg.workloads.len();
    let mut report = Vec::new();
    for spec in order_cas(store, &cfg.cas).await? {
        progress.step(report.len(), total, "ca", &spec.name);
        let exists = store.ca_exists(&spec.name).await?;
        if exists && !opts.force {
            report.push(applied("ca", &spec.name, Outcome::Exists));
            continue;
        }
        let ca = match &spec.parent {
            None => create_root(spec, now)?,
            Some(p) => create_intermediate(spec, &store.load_ca(p).await?, now)?,
        };
        let outcome = match store.save_ca(&ca, opts.force).await {
            Ok(SaveOutcome::Created) => Outcome::Created,
            Ok(SaveOutcome::Replaced) => Outcome::Replaced,
            // Another process created it between the check and the save.
            Err(Error::AlreadyExists(_)) => Outcome::Exists,
            Err(e) => return Err(e),
        };
        report.push(applied("ca", &spec.name, outcome));
    }

    let out_dir = opts
        .base_dir
        .join(cfg.out_dir.clone().unwrap_or_else(|| PathBuf::from("out")));
    for b in &cfg.bundles {
        progress.step(report.len(), total, "bundle", &b.name);
        let outcome = match store.load_bundle(&b.name).await {
            Ok(old) if old == *b => Outcome::Unchanged,
            Ok(_) => Outcome::Updated,
            Err(Error::UnknownBundle(_)) => Outcome::Created,
            Err(e) => return Err(e),
        };
        let anchors = store::bundle_anchors(store, b).await?;
        if outcome != Outcome::Unchanged {
            store.save_bundle(b).await?;
        }
        fsutil::create_private_dir(&out_dir)?;
        let path = out_dir.join(b.file_name());
        fsutil::write_atomic(&path, bundle::to_pem(&anchors).as_bytes(), PUBLIC_MODE)?;
        let mut a = applied("bundle", &b.name, outcome);
        a.files.push(path);
        report.push(a);
    }

    for w in &cfg.workloads {
        progress.step(report.len(), total, "workload", &w.name);
        report.push(apply_workload(store, cfg, w, &out_dir, opts.force, now).await?);
    }
    for c in &cfg.ca_secrets {
        let at: ObjectRef = c.secret.parse()?;
        let ca = store.load_ca(&c.ca).await?;
        let tls_crt = crate::pemutil::certs_to_pem(
            std::iter::once(&ca.cert).chain(ca.leaf_chain_tail().iter().skip(1)),
        );
        let anchors = bundle::to_pem(&store::ca_anchors(store, &c.ca).await?);
        let yaml = output::ca_secret_manifest(&at, &c.ca, &tls_crt, None, &anchors)?;
        fsutil::create_private_dir(&out_dir)?;
        let p = out_dir.join(format!("{}-ca-secret.yaml", c.ca));
        fsutil::write_atomic(&p, yaml.as_bytes(), PUBLIC_MODE)?;
        let mut a = applied("ca-secret", &c.ca, Outcome::Updated);
        a.files.push(p);
        report.push(a);
    }
    Ok(report)
}

fn applied(kind: &str, name: &str, outcome: Outcome) -> Applied {
    Applied {
        kind: kind.into(),
        name: name.into(),
        outcome,
        files: Vec::new(),
        serial: None,
    }
}

async fn apply_workload(
    store: &dyn Store,
    cfg: &MeshConfig,
    w: &WorkloadSpec,
    out_dir: &Path,
    force: bool,
    now: OffsetDateTime,
) -> Result<Applied> {
    let issuer = store::load_issuer(store, &w.ca).await?;
    let td = issuer.meta().trust_domain.clone();
    let sans = w.sans(&td)?;
    let paths = output::workload_paths(out_dir, &w.name);
    if !force {
        if let Some(serial) = still_good(&paths, store, &w.ca, now).await {
            let mut a = applied("workload", &w.name, Outcome::Exists);
            a.serial = Some(serial);
            return Ok(a);
        }
    }
    let workload = issue_workload(issuer.as_ref(), &sans, w.ttl, w.key, now).await?;
    let mut files = Vec::new();
    let WorkloadFiles { cert, key, chain } =
        output::write_workload_files(out_dir, &w.name, &workload)?;
    files.extend([cert, key, chain]);
    if let Some(secret) = &w.secret {
        let at: ObjectRef = secret.parse()?;
        let ca_pem = match &w.bundle {
            Some(b) => bundle::to_pem(
                &store::bundle_anchors(
                    store,
                    &store.load_bundle(b).await.or_else(|_| {
                        cfg.bundles
                            .iter()
                            .find(|x| &x.name == b)
                            .cloned()
                            .ok_or_else(|| Error::UnknownBundle(b.clone()))
                    })?,
                )
                .await?,
            ),
            // The issuing CA's anchors: both roots while it rotates.
            None => bundle::to_pem(&store::ca_anchors(store, &w.ca).await?),
        };
        let yaml = output::tls_secret_manifest(&at, &w.ca, &workload, &ca_pem)?;
        let p = out_dir.join(format!("{}-secret.yaml", w.name));
        fsutil::write_atomic(&p, yaml.as_bytes(), fsutil::KEY_MODE)?;
        files.push(p);
    }
    store
        .record(&LedgerEntry::for_cert(&w.ca, &workload.cert, now))
        .await?;
    Ok(Applied {
        kind: "workload".into(),
        name: w.name.clone(),
        outcome: Outcome::Created,
        files,
        serial: Some(workload.cert.info.serial_hex()),
    })
}

/// The serial of an existing workload certificate that may be kept: issued by the CA's
/// current key (its AKI is the CA's SKI) and with over a third of its lifetime left.
async fn still_good(
    paths: &WorkloadFiles,
    store: &dyn Store,
    ca: &str,
    now: OffsetDateTime,
) -> Option<String> {
    if !paths.key.exists() || !paths.chain.exists() {
        return None;
    }
    let bytes = fsutil::read_limited(&paths.cert).ok()?;
    let certs = crate::pemutil::parse_certs(&bytes, "cert").ok()?;
    let info = CertInfo::from_der(certs.first()?).ok()?;
    let ca_info = store.load_ca(ca).await.ok()?.info().ok()?;
    let lifetime = info.not_after - info.not_before;
    let left = info.not_after - now;
    // Compare the issuing key (AKI against SKI): a rotated CA keeps its DN.
    (crate::rotation::issued_by(&info, &ca_info) && left * 3 > lifetime).then(|| info.serial_hex())
}

/// Orders CA specs so that every parent comes before its children.
async fn order_cas<'a>(store: &dyn Store, cas: &'a [CaSpec]) -> Result<Vec<&'a CaSpec>> {
    let mut done: std::collections::HashSet<&str> = std::collections::HashSet::new();
    let mut out = Vec::new();
    let mut pending: Vec<&CaSpec> = cas.iter().collect();
    while !pending.is_empty() {
        let before = pending.len();
        let mut rest = Vec::new();
        for spec in pending {
            let ready = match &spec.parent {
                None => true,
                Some(p) => {
                    done.contains(p.as_str())
                        || (!cas.iter().any(|c| &c.name == p) && store.ca_exists(p).await?)
                }
            };
            if ready {
                done.insert(&spec.name);
                out.push(spec);
            } else {
                rest.push(spec);
            }
        }
        if rest.len() == before {
            let names: Vec<_> = rest
                .iter()
                .map(|s| format!("{} (parent {:?})", s.name, s.parent))
                .collect();
            return Err(Error::invalid(
                "config",
                format!("CA parents are unknown or cyclic: {}", names.join(", ")),
            ));
        }
        pending = rest;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    const MESH: &str = r#"
trust_domain = "mesh.example"
out_dir = "o"
[[ca]]
name = "team"
parent = "root"
[[ca]]
name = "root"
[[bundle]]
name = "b"
cas = ["team"]
[[workload]]
name = "w"
ca = "team"
namespace = "ns"
service_account = "sa"
bundle = "b"
secret = "ns/w-tls"
"#;

    #[test]
    fn apply_is_idempotent_and_orders_parents() {
        let d = tempfile::tempdir().unwrap();
        let store = LocalStore::create(d.path().join("home")).unwrap();
        let cfg = MeshConfig::parse(MESH, "t").unwrap();
        let opts = ApplyOptions {
            force: false,
            base_dir: d.path().to_path_buf(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let now = OffsetDateTime::now_utc();
        let r1 = rt.block_on(apply(&store, &cfg, &opts, now)).unwrap();
        let outcomes: Vec<_> = r1
            .iter()
            .map(|a| (a.name.as_str(), a.outcome.clone()))
            .collect();
        assert_eq!(
            outcomes,
            [
                ("root", Outcome::Created),
                ("team", Outcome::Created),
                ("b", Outcome::Created),
                ("w", Outcome::Created)
            ]
        );
        assert!(d.path().join("o/w_key.pem").exists());
        assert!(d.path().join("o/w-secret.yaml").exists());
        let r2 = rt.block_on(apply(&store, &cfg, &opts, now)).unwrap();
        assert!(
            r2.iter()
                .all(|a| matches!(a.outcome, Outcome::Exists | Outcome::Unchanged)),
            "{r2:?}"
        );
        assert_eq!(r1[3].serial, r2[3].serial, "workload kept");
        assert_eq!(rt.block_on(store.ledger()).unwrap().len(), 1);
        let team = rt.block_on(store.load_ca("team")).unwrap();
        assert_eq!(team.meta.trust_domain.as_str(), "mesh.example");
    }

    #[test]
    fn apply_reissues_what_a_rotated_ca_signed() {
        use crate::rotation::Request;
        use crate::store::rotate::{run_phase, RotateOptions};
        let d = tempfile::tempdir().unwrap();
        let store = LocalStore::create(d.path().join("home")).unwrap();
        let cfg = MeshConfig::parse(MESH, "t").unwrap();
        let opts = ApplyOptions {
            force: false,
            base_dir: d.path().to_path_buf(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let now = OffsetDateTime::now_utc();
        let r1 = rt.block_on(apply(&store, &cfg, &opts, now)).unwrap();
        let o = RotateOptions::default();
        rt.block_on(run_phase(&store, "root", Request::Prepare, &o, now))
            .unwrap();
        rt.block_on(run_phase(&store, "root", Request::Activate, &o, now))
            .unwrap();
        // Same DNs, new keys: the workload must be re-issued from the new CA.
        let r2 = rt.block_on(apply(&store, &cfg, &opts, now)).unwrap();
        let w = r2.iter().find(|a| a.name == "w").unwrap();
        assert_eq!(w.outcome, Outcome::Created, "{r2:?}");
        assert_ne!(w.serial, r1[3].serial);
        let r3 = rt.block_on(apply(&store, &cfg, &opts, now)).unwrap();
        assert_eq!(
            r3.iter().find(|a| a.name == "w").unwrap().outcome,
            Outcome::Exists
        );
    }

    #[test]
    fn config_errors_are_clear() {
        let e = MeshConfig::parse("[[ca]]\nname = \"a\"\nbogus = 1\n", "m.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("m.toml") && e.contains("bogus"), "{e}");
        let e = MeshConfig::parse("[[ca]]\nname = \"a\"\n[[ca]]\nname = \"a\"\n", "m")
            .unwrap_err()
            .to_string();
        assert!(e.contains("declared twice"), "{e}");
        let cyc = "[[ca]]\nname = \"a\"\nparent = \"b\"\n[[ca]]\nname = \"b\"\nparent = \"a\"\n";
        let cfg = MeshConfig::parse(cyc, "m").unwrap();
        let d = tempfile::tempdir().unwrap();
        let store = LocalStore::create(d.path().join("h")).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let e = rt
            .block_on(apply(
                &store,
                &cfg,
                &ApplyOptions::default(),
                OffsetDateTime::now_utc(),
            ))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown or cyclic"), "{e}");
    }
}
