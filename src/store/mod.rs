//! Where CAs, trust bundles and the issuance ledger live.

pub mod local;

use async_trait::async_trait;
use rustls_pki_types::CertificateDer;

use crate::bundle::{self, BundleSpec};
use crate::ca::{Backend, CaMaterial};
use crate::error::{Error, Result};
use crate::issue::{Issuer, LedgerEntry, LocalIssuer};

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

/// The anchors of a stored bundle.
pub async fn bundle_anchors(
    store: &dyn Store,
    spec: &BundleSpec,
) -> Result<Vec<CertificateDer<'static>>> {
    let mut cas = Vec::with_capacity(spec.cas.len());
    for name in &spec.cas {
        cas.push(store.load_ca(name).await.map_err(|e| match e {
            Error::UnknownCa(n) => {
                Error::invalid("bundle", format!("{} names unknown CA {n:?}", spec.name))
            }
            other => other,
        })?);
    }
    Ok(bundle::assemble(cas.iter()))
}
