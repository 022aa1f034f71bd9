//! Certificate authorities: creation of roots and intermediates, and loaded CA material.

use std::time::Duration;

use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::{Error, Result};
use crate::identity::TrustDomain;
use crate::key::{KeyAlgorithm, PrivateKey};
use crate::pemutil;
use crate::policy::Policy;
use crate::profile::{self, CaSubject};
use crate::x509::CertInfo;

/// Default validity of a root CA.
pub const DEFAULT_ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Default validity of an intermediate CA.
pub const DEFAULT_INTERMEDIATE_VALIDITY: Duration = Duration::from_secs(5 * 365 * 24 * 3600);

/// Where a CA's key lives and how it signs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Backend {
    /// The key is held by the meshca store (local directory or Kubernetes Secret).
    #[default]
    Local,
    /// The key lives in AWS ACM Private CA and never leaves it.
    AcmPca {
        /// The CA's ARN.
        arn: String,
        /// AWS region, when not taken from the environment.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        region: Option<String>,
        /// A custom endpoint (private endpoints, tests).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint: Option<String>,
    },
}

/// A CA's name, validated: lower-case DNS-label characters, 1 to 63 long (it is used as a
/// directory name, a Secret name suffix and in `meshca.io/<name>` signer names).
pub fn validate_ca_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "CA name",
            format!("{name:?}: use 1 to 63 characters of a-z, 0-9 and '-', not starting or ending with '-'"),
        ))
    }
}

/// What `meshca init` creates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaSpec {
    /// The CA's name.
    pub name: String,
    /// Parent CA name for an intermediate; `None` for a root.
    #[serde(default)]
    pub parent: Option<String>,
    /// Key algorithm.
    #[serde(default)]
    pub key: KeyAlgorithm,
    /// Validity (defaults: 10 years for roots, 5 for intermediates, capped by the parent).
    #[serde(default, with = "humantime_serde")]
    pub validity: Option<Duration>,
    /// Subject fields.
    #[serde(default)]
    pub subject: CaSubject,
    /// Path length constraint (defaults: 1 for roots, 0 for intermediates).
    #[serde(default)]
    pub path_len: Option<u8>,
    /// SPIFFE trust domain of the workloads this CA signs (default `cluster.local`, or the
    /// config file's top-level `trust_domain`).
    #[serde(default)]
    pub trust_domain: Option<TrustDomain>,
    /// DNS name constraints: permitted subtrees.
    #[serde(default)]
    pub permitted_dns: Vec<String>,
    /// DNS name constraints: excluded subtrees.
    #[serde(default)]
    pub excluded_dns: Vec<String>,
    /// What this CA may issue.
    #[serde(default)]
    pub policy: Policy,
}

impl CaSpec {
    /// A root CA spec with all defaults.
    pub fn root(name: &str) -> Self {
        CaSpec {
            name: name.to_string(),
            parent: None,
            key: KeyAlgorithm::default(),
            validity: None,
            subject: CaSubject::default(),
            path_len: None,
            trust_domain: None,
            permitted_dns: Vec::new(),
            excluded_dns: Vec::new(),
            policy: Policy::default(),
        }
    }
}

/// Stored facts about a CA (everything but the key and certificates).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaMeta {
    /// Name.
    pub name: String,
    /// Parent CA name for intermediates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Where the key lives.
    #[serde(default)]
    pub backend: Backend,
    /// SPIFFE trust domain.
    pub trust_domain: TrustDomain,
    /// Issuance policy.
    #[serde(default)]
    pub policy: Policy,
    /// When meshca created or registered the CA.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// A CA as loaded: its certificate, the chain above it and (for local backends) its key.
#[derive(Debug)]
pub struct CaMaterial {
    /// Facts and policy.
    pub meta: CaMeta,
    /// The CA's own certificate.
    pub cert: CertificateDer<'static>,
    /// Certificates above this CA, nearest first, ending with the root. Empty for a root.
    pub parents: Vec<CertificateDer<'static>>,
    /// The signing key; `None` when the key lives in a remote backend.
    pub key: Option<PrivateKey>,
}

impl CaMaterial {
    /// The trust anchor of this CA: the root at the top of its chain.
    pub fn root(&self) -> &CertificateDer<'static> {
        self.parents.last().unwrap_or(&self.cert)
    }

    /// Whether this is a self-signed root.
    pub fn is_root(&self) -> bool {
        self.parents.is_empty()
    }

    /// The CA certificate followed by its parents (what `chain.pem` holds).
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        std::iter::once(self.cert.clone())
            .chain(self.parents.iter().cloned())
            .collect()
    }

    /// The intermediates a leaf signed by this CA must carry: this CA (if not a root) and
    /// the parents below the root.
    pub fn leaf_chain_tail(&self) -> Vec<CertificateDer<'static>> {
        if self.is_root() {
            return Vec::new();
        }
        let mut v = vec![self.cert.clone()];
        v.extend(self.parents[..self.parents.len() - 1].iter().cloned());
        v
    }

    /// Parsed facts of the CA certificate.
    pub fn info(&self) -> Result<CertInfo> {
        CertInfo::from_der(&self.cert)
    }

    /// Checks internal consistency: the certificate is a CA, the key matches it, and the
    /// chain links up.
    pub fn validate(&self) -> Result<()> {
        let info = self.info()?;
        if !info.is_ca {
            return Err(Error::Corrupt(format!(
                "CA {}: certificate is not a CA certificate",
                self.meta.name
            )));
        }
        if let Some(key) = &self.key {
            if key.public_key_der() != info.spki_der {
                return Err(Error::Corrupt(format!(
                    "CA {}: private key does not match the certificate",
                    self.meta.name
                )));
            }
        }
        crate::x509::check_chain_order(&self.chain())
            .map_err(|e| Error::Corrupt(format!("CA {}: {e}", self.meta.name)))
    }

    /// PEM of [`CaMaterial::chain`].
    pub fn chain_pem(&self) -> String {
        pemutil::certs_to_pem(self.chain().iter())
    }
}

/// Creates a self-signed root CA with a fresh key.
pub fn create_root(spec: &CaSpec, now: OffsetDateTime) -> Result<CaMaterial> {
    validate_ca_name(&spec.name)?;
    spec.policy.validate()?;
    if spec.parent.is_some() {
        return Err(Error::invalid(
            "CA spec",
            "create_root called with a parent",
        ));
    }
    let validity = spec.validity.unwrap_or(DEFAULT_ROOT_VALIDITY);
    let key = spec.key.generate()?;
    let params = profile::ca_params(
        spec,
        Some(spec.path_len.unwrap_or(1)),
        now - profile::BACKDATE,
        now + validity,
        false,
    )?;
    let cert = params.self_signed(key.key_pair()?)?;
    Ok(CaMaterial {
        meta: meta_for(spec, now),
        cert: cert.der().clone(),
        parents: Vec::new(),
        key: Some(key),
    })
}

/// Creates an intermediate CA signed by a local `parent`. Its validity is capped at the
/// parent's notAfter; the parent's path length must allow it.
pub fn create_intermediate(
    spec: &CaSpec,
    parent: &CaMaterial,
    now: OffsetDateTime,
) -> Result<CaMaterial> {
    validate_ca_name(&spec.name)?;
    spec.policy.validate()?;
    let parent_key = parent.key.as_ref().ok_or_else(|| {
        Error::Unsupported(format!(
            "parent CA {} keeps its key in {:?}; sign the intermediate through that backend",
            parent.meta.name, parent.meta.backend
        ))
    })?;
    let pinfo = parent.info()?;
    if pinfo.path_len == Some(0) {
        return Err(Error::invalid(
            "CA spec",
            format!(
                "parent CA {} has pathLen 0 and cannot sign another CA",
                parent.meta.name
            ),
        ));
    }
    let validity = spec.validity.unwrap_or(DEFAULT_INTERMEDIATE_VALIDITY);
    let not_after = (now + validity).min(pinfo.not_after);
    let path_len = spec.path_len.unwrap_or(0);
    if let Some(pl) = pinfo.path_len {
        if path_len >= pl {
            return Err(Error::invalid(
                "CA spec",
                format!("pathLen {path_len} must be below the parent's {pl}"),
            ));
        }
    }
    let key = spec.key.generate()?;
    let params = profile::ca_params(
        spec,
        Some(path_len),
        now - profile::BACKDATE,
        not_after,
        true,
    )?;
    let issuer = rcgen::Issuer::from_ca_cert_der(&parent.cert, parent_key.key_pair()?)?;
    let cert = params.signed_by(key.key_pair()?, &issuer)?;
    let mut meta = meta_for(spec, now);
    meta.parent = Some(parent.meta.name.clone());
    Ok(CaMaterial {
        meta,
        cert: cert.der().clone(),
        parents: parent.chain(),
        key: Some(key),
    })
}

fn meta_for(spec: &CaSpec, now: OffsetDateTime) -> CaMeta {
    CaMeta {
        name: spec.name.clone(),
        parent: spec.parent.clone(),
        backend: Backend::Local,
        trust_domain: spec.trust_domain.clone().unwrap_or_default(),
        policy: spec.policy.clone(),
        created_at: now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_intermediate_profiles() {
        let now = OffsetDateTime::now_utc();
        let root = create_root(&CaSpec::root("gateway"), now).unwrap();
        root.validate().unwrap();
        let ri = root.info().unwrap();
        assert!(ri.is_ca);
        assert_eq!(ri.path_len, Some(1));
        assert!(ri.key_usage.iter().any(|k| k == "keyCertSign"));
        assert_eq!(ri.subject, "CN=meshca gateway CA");
        let mut spec = CaSpec::root("team-a");
        spec.parent = Some("gateway".into());
        spec.validity = Some(Duration::from_secs(100 * 365 * 24 * 3600));
        let int = create_intermediate(&spec, &root, now).unwrap();
        int.validate().unwrap();
        let ii = int.info().unwrap();
        assert_eq!(ii.path_len, Some(0));
        assert!(
            ii.not_after <= ri.not_after,
            "capped at the parent's notAfter"
        );
        assert_eq!(ii.issuer, ri.subject);
        assert_eq!(int.root(), &root.cert);
        // pathLen 0 cannot sign another CA.
        let mut spec2 = CaSpec::root("deeper");
        spec2.parent = Some("team-a".into());
        assert!(create_intermediate(&spec2, &int, now)
            .unwrap_err()
            .to_string()
            .contains("pathLen 0"));
    }

    #[test]
    fn names_are_validated() {
        for bad in ["", "CA1", "ca_1", "-a", "a/b", &"a".repeat(64)] {
            assert!(validate_ca_name(bad).is_err(), "{bad:?}");
        }
        validate_ca_name("ca-1").unwrap();
    }

    #[test]
    fn swapped_key_is_detected() {
        let now = OffsetDateTime::now_utc();
        let mut a = create_root(&CaSpec::root("a"), now).unwrap();
        let b = create_root(&CaSpec::root("b"), now).unwrap();
        a.key = b.key;
        assert!(a
            .validate()
            .unwrap_err()
            .to_string()
            .contains("does not match"));
    }
}
