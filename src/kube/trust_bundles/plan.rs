//! The pure half of the ClusterTrustBundle sync: names, the desired objects and the plan
//! (what to apply, what to delete) from the desired and the listed objects.

use std::collections::BTreeSet;

use kube::api::DynamicObject;
use rustls_pki_types::CertificateDer;
use serde_json::json;

use super::super::{signer_name, LABEL_CA, LABEL_MANAGED_BY, MANAGED_BY};
use crate::bundle;
use crate::error::{Error, Result};

/// The API group.
pub const GROUP: &str = "certificates.k8s.io";
/// The versions tried by [`detect`], in order: v1 (GA in Kubernetes 1.37), v1beta1 (1.33),
/// v1alpha1 (1.27).
pub const VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha1"];
/// The resource's plural name.
pub const PLURAL: &str = "clustertrustbundles";
/// The kind.
pub const KIND: &str = "ClusterTrustBundle";
/// The default last part of the name: `meshca.io:<ca>:roots`.
pub const DEFAULT_SUFFIX: &str = "roots";
/// The API server's limit on `spec.trustBundle` (`certificates.MaxTrustBundleSize`, 1 MiB).
pub const MAX_TRUST_BUNDLE_SIZE: usize = 1024 * 1024;

/// Checks that `suffix` is a DNS subdomain (lowercase letters, digits, `-` and `.`, starting
/// and ending alphanumeric, at most 253 characters), as the API server requires of the part
/// after `meshca.io:<ca>:`.
pub fn validate_suffix(suffix: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::invalid(
            "ClusterTrustBundle suffix",
            format!("{suffix:?}: {why}"),
        ))
    };
    if suffix.is_empty() || suffix.len() > 253 {
        return bad("must be 1 to 253 characters");
    }
    for label in suffix.split('.') {
        let ok_chars = label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        let ok_ends = label
            .bytes()
            .next()
            .zip(label.bytes().last())
            .is_some_and(|(a, z)| a.is_ascii_alphanumeric() && z.is_ascii_alphanumeric());
        if !ok_chars || !ok_ends || label.len() > 63 {
            return bad("use a DNS subdomain: a-z, 0-9, '-' and '.', alphanumeric at both ends");
        }
    }
    Ok(())
}

/// `meshca.io:<ca>:<suffix>`: the signer name with `/` replaced by `:`, then `:` and the
/// suffix.
pub fn bundle_name(ca: &str, suffix: &str) -> String {
    format!("{}:{suffix}", signer_name(ca).replace('/', ":"))
}

/// One ClusterTrustBundle as meshca wants it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    /// The CA.
    pub ca: String,
    /// `meshca.io:<ca>:<suffix>`.
    pub name: String,
    /// `meshca.io/<ca>`.
    pub signer: String,
    /// `spec.trustBundle`: the anchors as PEM, deduplicated, no headers.
    pub pem: String,
    /// Number of anchors.
    pub anchors: usize,
}

/// The ClusterTrustBundle of CA `ca` holding `anchors` (its roots). Refuses what the API
/// server would: no anchor, a bad suffix, a bundle over 1 MiB.
pub fn desired(ca: &str, anchors: &[CertificateDer<'static>], suffix: &str) -> Result<Desired> {
    validate_suffix(suffix)?;
    crate::ca::validate_ca_name(ca)?;
    let mut seen = BTreeSet::new();
    let unique: Vec<CertificateDer<'static>> = anchors
        .iter()
        .filter(|a| seen.insert(a.as_ref().to_vec()))
        .cloned()
        .collect();
    if unique.is_empty() {
        return Err(Error::invalid(
            "ClusterTrustBundle",
            format!("CA {ca} has no root to publish"),
        ));
    }
    let pem = bundle::to_pem(&unique);
    if pem.len() > MAX_TRUST_BUNDLE_SIZE {
        return Err(Error::invalid(
            "ClusterTrustBundle",
            format!(
                "CA {ca}: {} bytes of roots exceed the API limit of {MAX_TRUST_BUNDLE_SIZE}",
                pem.len()
            ),
        ));
    }
    Ok(Desired {
        ca: ca.to_string(),
        name: bundle_name(ca, suffix),
        signer: signer_name(ca),
        pem,
        anchors: unique.len(),
    })
}

/// The server-side apply body of `d` for `api_version` (`certificates.k8s.io/v1`, or the
/// older version [`detect`] found).
pub fn manifest(d: &Desired, api_version: &str) -> serde_json::Value {
    json!({
        "apiVersion": api_version,
        "kind": KIND,
        "metadata": {
            "name": d.name,
            "labels": { LABEL_MANAGED_BY: MANAGED_BY, LABEL_CA: d.ca },
        },
        "spec": { "signerName": d.signer, "trustBundle": d.pem },
    })
}

/// A listed ClusterTrustBundle (only what [`plan`] compares).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Existing {
    /// Object name.
    pub name: String,
    /// `meshca.io/ca` label.
    pub ca: Option<String>,
    /// Whether `app.kubernetes.io/managed-by` is `meshca`.
    pub managed: bool,
    /// `spec.signerName`.
    pub signer: Option<String>,
    /// `spec.trustBundle`.
    pub pem: Option<String>,
}

impl Existing {
    pub(super) fn from_object(o: &DynamicObject) -> Existing {
        let labels = o.metadata.labels.clone().unwrap_or_default();
        let spec = o.data.get("spec");
        let s = |k: &str| {
            spec.and_then(|v| v.get(k))
                .and_then(|v| v.as_str())
                .map(str::to_string)
        };
        Existing {
            name: o.metadata.name.clone().unwrap_or_default(),
            ca: labels.get(LABEL_CA).cloned(),
            managed: labels.get(LABEL_MANAGED_BY).map(String::as_str) == Some(MANAGED_BY),
            signer: s("signerName"),
            pem: s("trustBundle"),
        }
    }
}

/// What one sync does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Objects to apply (missing or different).
    pub apply: Vec<Desired>,
    /// Names of stale objects to delete.
    pub delete: Vec<String>,
    /// Objects already as wanted.
    pub unchanged: usize,
}

/// Whether `e` is a ClusterTrustBundle meshca published for CA `ca`: both labels
/// (`app.kubernetes.io/managed-by: meshca`, `meshca.io/ca: <ca>`), `spec.signerName`
/// `meshca.io/<ca>` and a name under `meshca.io:<ca>:`. Labels alone are not enough: anyone
/// who may write a bundle may set them.
pub fn owned_by(e: &Existing, ca: &str) -> bool {
    let prefix = bundle_name(ca, "");
    e.managed
        && e.ca.as_deref() == Some(ca)
        && e.signer.as_deref() == Some(signer_name(ca).as_str())
        && e.name.len() > prefix.len()
        && e.name.starts_with(&prefix)
}

/// Compares the desired objects with the listed ones: apply what is missing or differs
/// (content, signer or labels), delete the desired CAs' own objects ([`owned_by`]) under
/// another name. Objects of other CAs or signers, named otherwise, or without both labels,
/// are left alone.
pub fn plan(desired: &[Desired], existing: &[Existing]) -> Plan {
    let mut p = Plan::default();
    for d in desired {
        match existing.iter().find(|e| e.name == d.name) {
            Some(e)
                if e.managed
                    && e.ca.as_deref() == Some(d.ca.as_str())
                    && e.signer.as_deref() == Some(d.signer.as_str())
                    && e.pem.as_deref() == Some(d.pem.as_str()) =>
            {
                p.unchanged += 1
            }
            _ => p.apply.push(d.clone()),
        }
    }
    let cas: BTreeSet<&str> = desired.iter().map(|d| d.ca.as_str()).collect();
    let names: BTreeSet<&str> = desired.iter().map(|d| d.name.as_str()).collect();
    for e in existing {
        let ours = cas.iter().any(|c| owned_by(e, c));
        if ours && !names.contains(e.name.as_str()) {
            p.delete.push(e.name.clone());
        }
    }
    p
}
