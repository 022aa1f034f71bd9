//! Trust bundles: named sets of CAs whose roots a workload trusts.

use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use crate::ca::{validate_ca_name, CaMaterial};
use crate::error::{Error, Result};
use crate::pemutil;

/// A named trust bundle, as declared and stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleSpec {
    /// Bundle name (e.g. `frontend`).
    pub name: String,
    /// Member CA names, in order.
    pub cas: Vec<String>,
    /// File name used when the bundle is exported as PEM (default `<name>_bundle.pem`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Namespaces the bundle's ConfigMap is published to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
}

impl BundleSpec {
    /// Validates the name, the member names and the export file name.
    pub fn validate(&self) -> Result<()> {
        validate_ca_name(&self.name).map_err(|_| {
            Error::invalid(
                "bundle name",
                format!("{:?}: use a-z, 0-9 and '-'", self.name),
            )
        })?;
        if self.cas.is_empty() {
            return Err(Error::invalid(
                "bundle",
                format!("{} lists no CA", self.name),
            ));
        }
        for c in &self.cas {
            validate_ca_name(c)?;
        }
        if let Some(f) = &self.file {
            if f.is_empty() || f.contains('/') || f.starts_with('.') {
                return Err(Error::invalid(
                    "bundle file",
                    format!("{f:?} must be a plain file name"),
                ));
            }
        }
        Ok(())
    }

    /// The export file name.
    pub fn file_name(&self) -> String {
        self.file
            .clone()
            .unwrap_or_else(|| format!("{}_bundle.pem", self.name.replace('-', "_")))
    }

    /// The ConfigMap name the bundle is published as.
    pub fn configmap_name(&self) -> String {
        format!("{}-trust-bundle", self.name)
    }
}

/// The anchors a CA contributes to a bundle: its root. Trusting an intermediate alone would
/// need partial-chain validation, which Envoy's BoringSSL does not do.
pub fn anchors_of(ca: &CaMaterial) -> Vec<CertificateDer<'static>> {
    vec![ca.root().clone()]
}

/// Collects anchors in order, dropping duplicates (two intermediates under one root give
/// the root once).
pub fn assemble<'a>(cas: impl IntoIterator<Item = &'a CaMaterial>) -> Vec<CertificateDer<'static>> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for ca in cas {
        for a in anchors_of(ca) {
            if seen.insert(pemutil::fingerprint_sha256(&a)) {
                out.push(a);
            }
        }
    }
    out
}

/// PEM of a bundle's anchors.
pub fn to_pem(anchors: &[CertificateDer<'static>]) -> String {
    pemutil::certs_to_pem(anchors.iter())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{create_intermediate, create_root, CaSpec};
    use time::OffsetDateTime;

    #[test]
    fn assemble_dedupes_shared_roots() {
        let now = OffsetDateTime::now_utc();
        let r1 = create_root(&CaSpec::root("ca1"), now).unwrap();
        let r2 = create_root(&CaSpec::root("ca2"), now).unwrap();
        let mut s = CaSpec::root("ca1-int");
        s.parent = Some("ca1".into());
        let i1 = create_intermediate(&s, &r1, now).unwrap();
        let a = assemble([&r1, &i1, &r2]);
        assert_eq!(a.len(), 2);
        assert_eq!(a[0], r1.cert);
        assert_eq!(a[1], r2.cert);
        let pem = to_pem(&a);
        assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 2);
    }

    #[test]
    fn spec_validation_and_names() {
        let mut b = BundleSpec {
            name: "frontend".into(),
            cas: vec!["ca1".into(), "ca2".into()],
            file: None,
            namespaces: vec![],
        };
        b.validate().unwrap();
        assert_eq!(b.file_name(), "frontend_bundle.pem");
        b.file = Some("ca_1_ca_2_bundle.pem".into());
        assert_eq!(b.file_name(), "ca_1_ca_2_bundle.pem");
        b.file = Some("../x".into());
        assert!(b.validate().is_err());
        b.file = None;
        b.cas.clear();
        assert!(b.validate().is_err());
    }
}
