//! Where CAs, trust bundles and the issuance ledger live.

pub mod local;
pub mod rotate;

use async_trait::async_trait;
use rustls_pki_types::CertificateDer;

use crate::bundle::{self, BundleSpec};
use crate::ca::{Backend, CaMaterial};
use crate::error::{Error, Result};
use crate::issue::{Issuer, LedgerEntry, LocalIssuer};
use crate::rotation::RotationState;

pub use local::LocalStore;

/// Whether a save created something new or found it already there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SaveOutcome {
    /// Newly written.
    Created,
    /// Replaced an existing object (`--force`).
    Replaced,
}

/// Which CA versions of a rotation a slot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// The prepared CAs, not yet issuing.
    Next,
    /// The replaced CAs, still trusted until prune.
    Previous,
}

impl Slot {
    /// The slot's name in storage.
    pub fn as_str(self) -> &'static str {
        match self {
            Slot::Next => "next",
            Slot::Previous => "previous",
        }
    }
}

/// Storage for CAs, bundles and the ledger. Implementations: [`LocalStore`] (directory,
/// the default) and the Kubernetes store (Secrets and ConfigMaps).
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// A short description for messages (`local:/path`, `kube:namespace`).
    fn describe(&self) -> String;
    /// Names of all CAs, sorted.
    async fn list_cas(&self) -> Result<Vec<String>>;
    /// Whether a CA exists.
    async fn ca_exists(&self, name: &str) -> Result<bool>;
    /// Loads a CA with its key (when local). [`Error::UnknownCa`] when absent.
    async fn load_ca(&self, name: &str) -> Result<CaMaterial>;
    /// Saves a CA. Fails with [`Error::AlreadyExists`] unless `replace`.
    async fn save_ca(&self, ca: &CaMaterial, replace: bool) -> Result<SaveOutcome>;
    /// All bundles, sorted by name.
    async fn list_bundles(&self) -> Result<Vec<BundleSpec>>;
    /// One bundle. [`Error::UnknownBundle`] when absent.
    async fn load_bundle(&self, name: &str) -> Result<BundleSpec>;
    /// Creates or replaces a bundle.
    async fn save_bundle(&self, b: &BundleSpec) -> Result<SaveOutcome>;
    /// Appends to the issuance ledger.
    async fn record(&self, entry: &LedgerEntry) -> Result<()>;
    /// Reads the whole ledger.
    async fn ledger(&self) -> Result<Vec<LedgerEntry>>;

    /// Every rotation record, sorted by CA name. A store that cannot rotate has none.
    async fn list_rotations(&self) -> Result<Vec<RotationState>> {
        Ok(Vec::new())
    }
    /// The rotation record of CA `ca`, if a rotation is in progress.
    async fn load_rotation(&self, ca: &str) -> Result<Option<RotationState>> {
        Ok(self
            .list_rotations()
            .await?
            .into_iter()
            .find(|r| r.ca == ca))
    }
    /// Writes a rotation record atomically.
    async fn save_rotation(&self, state: &RotationState) -> Result<()> {
        let _ = state;
        Err(self.no_rotation())
    }
    /// The CAs held in a slot of `ca`'s rotation (empty when none).
    async fn load_rotation_cas(&self, ca: &str, slot: Slot) -> Result<Vec<CaMaterial>> {
        let _ = (ca, slot);
        Ok(Vec::new())
    }
    /// Writes all CAs of a slot at once (atomically); fails if the slot is already written.
    async fn save_rotation_cas(&self, ca: &str, slot: Slot, cas: &[CaMaterial]) -> Result<()> {
        let _ = (ca, slot, cas);
        Err(self.no_rotation())
    }
    /// Removes one slot of `ca`'s rotation (no error when absent).
    async fn remove_rotation_cas(&self, ca: &str, slot: Slot) -> Result<()> {
        let _ = (ca, slot);
        Err(self.no_rotation())
    }
    /// Removes `ca`'s rotation record and everything under it.
    async fn remove_rotation(&self, ca: &str) -> Result<()> {
        let _ = ca;
        Err(self.no_rotation())
    }
    /// Records a revocation. Fails with [`Error::AlreadyExists`] for a serial already revoked.
    async fn revoke(&self, r: &crate::crl::Revocation) -> Result<()> {
        let _ = r;
        Err(Error::Unsupported(format!(
            "revocation on {} (use the local store)",
            self.describe()
        )))
    }
    /// Every recorded revocation, oldest first.
    async fn revocations(&self) -> Result<Vec<crate::crl::Revocation>> {
        Ok(Vec::new())
    }
    /// Unexpired certificates still in use where this store's certificates go, issued by a CA
    /// whose subject key identifier is in `skis`, each with where it is. Prune refuses while any is found, besides the ledger's (which can miss entries).
    /// The kube store looks at the cluster's TLS Secrets, CSRs and PodCertificateRequests; a
    /// local store has no such view (its ledger is written before a certificate is handed
    /// out) and finds none.
    async fn live_certificates(
        &self,
        skis: &std::collections::BTreeSet<String>,
        now: time::OffsetDateTime,
    ) -> Result<Vec<LiveCertificate>> {
        let _ = (skis, now);
        Ok(Vec::new())
    }
    /// Takes the store's rotation lock for one whole phase, or fails at once naming its
    /// holder: two phases never interleave. `holder` describes this process (see
    /// [`lock_holder`]). A store without rotation support needs no lock.
    async fn lock_rotation(&self, holder: &str) -> Result<Box<dyn PhaseLock>> {
        let _ = holder;
        Ok(Box::new(NoLock))
    }
    /// Publishes a bundle's anchors where the store keeps published copies (the kube store:
    /// the bundle's ConfigMaps in its namespaces). Returns how many copies were written.
    async fn publish_bundle(
        &self,
        spec: &BundleSpec,
        anchors: &[CertificateDer<'static>],
    ) -> Result<usize> {
        let _ = (spec, anchors);
        Ok(0)
    }
    /// Reports that CA `name` failed to load and is not served (`reason`: one line, never key
    /// material), where the store's users look: the kube store publishes a Warning Event on
    /// the CA's Secret. Best effort; the default does nothing (the caller logs the failure).
    async fn report_ca_load_failure(&self, name: &str, reason: &str) {
        let _ = (name, reason);
    }
    /// The error of a store without rotation support.
    fn no_rotation(&self) -> Error {
        Error::Unsupported(format!(
            "CA rotation on {} (use the local store)",
            self.describe()
        ))
    }
}

/// A certificate in use somewhere ([`Store::live_certificates`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveCertificate {
    /// Where it is: `secret <ns>/<name>`, `csr <name>`, `podcertificaterequest <ns>/<name>`.
    pub location: String,
    /// Its serial, hex.
    pub serial: String,
}

impl std::fmt::Display for LiveCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (serial {})", self.location, self.serial)
    }
}

/// A held rotation lock ([`Store::lock_rotation`]). Dropping it releases a local lock at
/// once; a remote one is released by [`PhaseLock::release`] (or expires).
#[async_trait]
pub trait PhaseLock: Send + Sync {
    /// Whether the lock is still held: a phase calls this before each write, and stops with
    /// this error once the lock is lost (a failed renewal, or no renewal within its bound).
    /// A local lock (an flock held by the open file) cannot be lost.
    fn check(&self) -> Result<()> {
        Ok(())
    }
    /// Releases the lock.
    async fn release(self: Box<Self>) -> Result<()>;
}

struct NoLock;

#[async_trait]
impl PhaseLock for NoLock {
    async fn release(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

/// This host's name (for lock holders), from the kernel or `$HOSTNAME`.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "unknown-host".into())
}

/// How a lock holder describes itself: `pid <pid> on <host>: <what>`.
pub fn lock_holder(what: &str) -> String {
    format!("pid {} on {}: {what}", std::process::id(), host_name())
}

/// The error of a phase that found the rotation lock taken.
pub fn lock_busy(holder: &str) -> Error {
    Error::invalid(
        "rotation",
        format!(
            "another rotation phase holds the lock ({}); wait until it finishes and run this one again",
            if holder.trim().is_empty() { "holder unknown" } else { holder.trim() }
        ),
    )
}

/// Loads a CA and wraps it in the [`Issuer`] its backend calls for.
pub async fn load_issuer(store: &dyn Store, name: &str) -> Result<Box<dyn Issuer>> {
    let ca = store.load_ca(name).await?;
    match &ca.meta.backend {
        Backend::Local => Ok(Box::new(LocalIssuer::new(ca)?)),
        #[cfg(feature = "aws-pca")]
        Backend::AcmPca { .. } => Ok(Box::new(
            crate::issue::acm_pca::AcmPcaIssuer::connect(ca, &crate::acm::PcaOptions::default())
                .await?,
        )),
        #[cfg(not(feature = "aws-pca"))]
        Backend::AcmPca { .. } => Err(Error::Unsupported(format!(
            "CA {name} is backed by ACM Private CA, which this build cannot reach (feature aws-pca)"
        ))),
    }
}

/// The anchors of a stored bundle. A member CA under rotation contributes the roots of
/// its next and previous versions too, so the bundle trusts both sides of the overlap.
pub async fn bundle_anchors(
    store: &dyn Store,
    spec: &BundleSpec,
) -> Result<Vec<CertificateDer<'static>>> {
    let rotations = store.list_rotations().await?;
    let mut cas = Vec::with_capacity(spec.cas.len());
    for name in &spec.cas {
        cas.push(store.load_ca(name).await.map_err(|e| match e {
            Error::UnknownCa(n) => {
                Error::invalid("bundle", format!("{} names unknown CA {n:?}", spec.name))
            }
            other => other,
        })?);
        for r in rotations.iter().filter(|r| r.covers(name)) {
            for slot in [Slot::Next, Slot::Previous] {
                cas.extend(
                    store
                        .load_rotation_cas(&r.ca, slot)
                        .await?
                        .into_iter()
                        .filter(|c| &c.meta.name == name),
                );
            }
        }
    }
    Ok(bundle::assemble(cas.iter()))
}

/// The anchors of CA `name` alone (its root, plus the other side of a rotation in progress):
/// what `ca.crt` holds when no bundle is named.
pub async fn ca_anchors(store: &dyn Store, name: &str) -> Result<Vec<CertificateDer<'static>>> {
    let spec = BundleSpec {
        name: name.to_string(),
        cas: vec![name.to_string()],
        file: None,
        namespaces: Vec::new(),
    };
    bundle_anchors(store, &spec).await
}

/// Every CA in the chains of `members` (each member and its parents up to the root), plus
/// the next and previous versions of those under rotation: the CAs a peer needs CRLs of.
pub async fn chain_cas(store: &dyn Store, members: &[String]) -> Result<Vec<CaMaterial>> {
    let mut seen = std::collections::BTreeSet::new();
    let mut cas = Vec::new();
    for m in members {
        let mut next = Some(m.clone());
        while let Some(name) = next {
            if !seen.insert(name.clone()) {
                break;
            }
            let c = store.load_ca(&name).await?;
            next = c.meta.parent.clone();
            cas.push(c);
        }
    }
    for r in store.list_rotations().await? {
        for slot in [Slot::Next, Slot::Previous] {
            let v = store.load_rotation_cas(&r.ca, slot).await?;
            cas.extend(v.into_iter().filter(|c| seen.contains(&c.meta.name)));
        }
    }
    Ok(cas)
}
