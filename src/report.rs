//! The JSON shapes of the CLI's `--output json`, shared with tests that deserialize them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ca::{Backend, CaMaterial};
use crate::error::Result;
use crate::output::WorkloadFiles;
use crate::policy::Policy;

/// `meshca issue --output json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IssueReport {
    /// Issuing CA.
    pub ca: String,
    /// Serial, lower-case hex.
    pub serial: String,
    /// Subject DN.
    pub subject: String,
    /// SANs with type prefixes.
    pub sans: Vec<String>,
    /// notBefore.
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    /// notAfter.
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// Files written, when written to a directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<WorkloadFiles>,
    /// Bundle PEM written next to the files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_file: Option<PathBuf>,
    /// Leaf + intermediates PEM (when not written to files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_chain_pem: Option<String>,
    /// The generated private key PEM (when not written to files; never for CSRs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key_pem: Option<String>,
    /// The trust anchors (`ca.crt`) PEM (when not written to files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
}

/// One CA in `meshca ca list` / `meshca ca show`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaSummary {
    /// Name.
    pub name: String,
    /// `root` or `intermediate`.
    pub kind: String,
    /// Parent CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Key location.
    pub backend: Backend,
    /// Subject DN.
    pub subject: String,
    /// Key type.
    pub key: String,
    /// Trust domain.
    pub trust_domain: String,
    /// notAfter.
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// Seconds left.
    pub seconds_left: i64,
    /// SHA-256 fingerprint.
    pub sha256_fingerprint: String,
    /// Path length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_len: Option<u8>,
    /// Issuance policy (in `ca show`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Policy>,
    /// The CA certificate followed by its parents, PEM (in `ca show`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_pem: Option<String>,
}

impl CaSummary {
    /// Summarizes a loaded CA; `detail` adds the policy and chain.
    pub fn of(ca: &CaMaterial, now: OffsetDateTime, detail: bool) -> Result<CaSummary> {
        let info = ca.info()?;
        Ok(CaSummary {
            name: ca.meta.name.clone(),
            kind: if ca.is_root() { "root" } else { "intermediate" }.into(),
            parent: ca.meta.parent.clone(),
            backend: ca.meta.backend.clone(),
            subject: info.subject.clone(),
            key: info.key.to_string(),
            trust_domain: ca.meta.trust_domain.to_string(),
            not_after: info.not_after,
            seconds_left: (info.not_after - now).whole_seconds(),
            sha256_fingerprint: info.sha256_fingerprint.clone(),
            path_len: info.path_len,
            policy: detail.then(|| ca.meta.policy.clone()),
            chain_pem: detail.then(|| ca.chain_pem()),
        })
    }
}

/// `meshca bundle show`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BundleReport {
    /// Bundle name.
    pub name: String,
    /// Member CAs.
    pub cas: Vec<String>,
    /// Export file name.
    pub file: String,
    /// Target namespaces.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Anchors: subject and fingerprint.
    pub anchors: Vec<AnchorSummary>,
    /// PEM of the anchors.
    pub pem: String,
}

/// One anchor of a bundle.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AnchorSummary {
    /// Subject DN.
    pub subject: String,
    /// SHA-256 fingerprint.
    pub sha256_fingerprint: String,
    /// notAfter.
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
}
