//! The secrets served: an immutable snapshot of named, encoded Envoy `Secret`s.
//!
//! A [`Snapshot`] is built once per change by the rotation loop and shared (`Arc`) by every
//! stream, so fanning a rotation out to thousands of streams costs one encoding.

use std::collections::BTreeMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{data_source::Specifier, DataSource};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    secret, CertificateValidationContext, Secret, TlsCertificate,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::xds::Versions;

/// Name of the workload certificate (Istio and SPIRE convention).
pub const DEFAULT_NAME: &str = "default";
/// Name of the workload's trust bundle (Istio and SPIRE convention).
pub const ROOTCA_NAME: &str = "ROOTCA";
/// Type URL of `envoy.extensions.transport_sockets.tls.v3.Secret`.
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// What kind of secret an entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A `tls_certificate` (chain and key).
    Certificate {
        /// Serial of the leaf, hex with colons.
        serial: String,
        /// notAfter of the leaf.
        not_after: OffsetDateTime,
    },
    /// A `validation_context` with `trusted_ca`.
    Bundle {
        /// Number of anchors.
        anchors: usize,
    },
}

/// One encoded secret.
#[derive(Clone)]
pub struct Entry {
    /// Content hash (hex, 16 characters); also the xDS version.
    pub version: String,
    /// The encoded `Secret` wrapped in `Any`.
    pub any: Any,
    /// What it is.
    pub kind: Kind,
    /// The resource encoded for responses: once per version, when the first stream sends it
    /// (a snapshot that is built and found unchanged, as on every poll, is never encoded).
    pieces: std::sync::OnceLock<crate::grpc::Pieces>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the encoded bytes: a certificate entry holds a private key.
        f.debug_struct("Entry")
            .field("version", &self.version)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Entry {
    /// The entry encoded for responses, served under `name` (its name in the snapshot).
    pub fn pieces(&self, name: &str) -> &crate::grpc::Pieces {
        self.pieces
            .get_or_init(|| crate::grpc::Pieces::new(name, &self.version, &self.any))
    }
}

/// All secrets at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    entries: BTreeMap<String, Arc<Entry>>,
}

impl Versions for Snapshot {
    fn version_of(&self, name: &str) -> Option<&str> {
        self.entries.get(name).map(|e| e.version.as_str())
    }
}

fn inline(bytes: Vec<u8>) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(bytes)),
        ..Default::default()
    })
}

fn version_of(name: &str, encoded: &[u8]) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(name.as_bytes());
    ctx.update(&[0]);
    ctx.update(encoded);
    let d = ctx.finish();
    meshca::pemutil::hex(&d.as_ref()[..8])
}

fn entry(secret: Secret, kind: Kind) -> Entry {
    let bytes = secret.encode_to_vec();
    let version = version_of(&secret.name, &bytes);
    Entry {
        version,
        any: Any {
            type_url: SECRET_TYPE_URL.to_string(),
            value: bytes,
        },
        kind,
        pieces: std::sync::OnceLock::new(),
    }
}

/// Builds a `tls_certificate` secret from a PEM chain (leaf first) and a PEM key.
pub fn certificate_entry(
    name: &str,
    chain_pem: &str,
    key_pem: &str,
    serial: String,
    not_after: OffsetDateTime,
) -> Entry {
    let secret = Secret {
        name: name.to_string(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(chain_pem.as_bytes().to_vec()),
            private_key: inline(key_pem.as_bytes().to_vec()),
            ..Default::default()
        })),
    };
    entry(secret, Kind::Certificate { serial, not_after })
}

/// Builds a `validation_context` secret trusting `anchors`.
pub fn bundle_entry(name: &str, anchors: &[CertificateDer<'static>]) -> Entry {
    validation_entry(name, anchors, None)
}

/// CRLs served with a trust bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Crls {
    /// Concatenated PEM CRLs, one per CA.
    pub pem: String,
    /// Whether Envoy may check the leaf only (`only_verify_leaf_cert_crl`): set when some CA
    /// of a chain has no CRL, because by default Envoy refuses a chain unless it has a CRL
    /// for every CA in it.
    pub leaf_only: bool,
}

/// Builds a `validation_context` secret trusting `anchors`, with CRLs in its `crl` field.
pub fn validation_entry(
    name: &str,
    anchors: &[CertificateDer<'static>],
    crls: Option<&Crls>,
) -> Entry {
    let pem = meshca::pemutil::certs_to_pem(anchors.iter());
    let secret = Secret {
        name: name.to_string(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: inline(pem.into_bytes()),
                crl: crls.and_then(|c| inline(c.pem.as_bytes().to_vec())),
                only_verify_leaf_cert_crl: crls.is_some_and(|c| c.leaf_only),
                ..Default::default()
            },
        )),
    };
    entry(
        secret,
        Kind::Bundle {
            anchors: anchors.len(),
        },
    )
}

impl Snapshot {
    /// An empty snapshot.
    pub fn new() -> Self {
        Snapshot::default()
    }

    /// Adds or replaces an entry.
    pub fn insert(&mut self, name: &str, e: Entry) {
        self.entries.insert(name.to_string(), Arc::new(e));
    }

    /// Looks an entry up.
    pub fn get(&self, name: &str) -> Option<&Arc<Entry>> {
        self.entries.get(name)
    }

    /// Names and versions, in name order.
    pub fn versions(&self) -> BTreeMap<String, String> {
        self.entries
            .iter()
            .map(|(k, v)| (k.clone(), v.version.clone()))
            .collect()
    }

    /// Whether both snapshots hold the same names at the same versions.
    pub fn same_as(&self, other: &Snapshot) -> bool {
        self.entries.len() == other.entries.len()
            && self
                .entries
                .iter()
                .zip(other.entries.iter())
                .all(|((a, x), (b, y))| a == b && x.version == y.version)
    }

    /// Names whose version differs between `self` and `newer` (added, changed or removed).
    pub fn changed_names(&self, newer: &Snapshot) -> Vec<String> {
        let mut out: Vec<String> = newer
            .entries
            .iter()
            .filter(|(k, v)| self.entries.get(*k).map(|o| &o.version) != Some(&v.version))
            .map(|(k, _)| k.clone())
            .collect();
        out.extend(
            self.entries
                .keys()
                .filter(|k| !newer.entries.contains_key(*k))
                .cloned(),
        );
        out.sort();
        out
    }

    /// The workload certificate's notAfter, if one is served.
    pub fn cert_not_after(&self) -> Option<OffsetDateTime> {
        match self.entries.get(DEFAULT_NAME).map(|e| &e.kind) {
            Some(Kind::Certificate { not_after, .. }) => Some(*not_after),
            _ => None,
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there is no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_content_hashes_and_decode_back() {
        let now = OffsetDateTime::now_utc();
        let a = certificate_entry("default", "CHAIN", "KEY", "01".into(), now);
        let b = certificate_entry("default", "CHAIN", "KEY", "01".into(), now);
        let c = certificate_entry("default", "CHAIN2", "KEY", "01".into(), now);
        let d = certificate_entry("other", "CHAIN", "KEY", "01".into(), now);
        assert_eq!(a.version, b.version);
        assert_ne!(a.version, c.version);
        assert_ne!(a.version, d.version, "the name is part of the version");
        assert_eq!(a.version.len(), 16);
        let s = Secret::decode(a.any.value.as_slice()).unwrap();
        assert_eq!(s.name, "default");
        assert!(!format!("{a:?}").contains("KEY"), "Debug hides the key");
        let Some(secret::Type::TlsCertificate(t)) = s.r#type else {
            panic!("not a certificate")
        };
        assert_eq!(
            t.private_key.unwrap().specifier,
            Some(Specifier::InlineBytes(b"KEY".to_vec()))
        );
    }

    #[test]
    fn snapshot_diff() {
        let now = OffsetDateTime::now_utc();
        let mut s1 = Snapshot::new();
        s1.insert(
            "default",
            certificate_entry("default", "A", "K", "1".into(), now),
        );
        s1.insert("ROOTCA", bundle_entry("ROOTCA", &[]));
        let mut s2 = s1.clone();
        assert!(s1.same_as(&s2));
        s2.insert(
            "default",
            certificate_entry("default", "B", "K", "2".into(), now),
        );
        s2.insert("x", bundle_entry("x", &[]));
        assert!(!s1.same_as(&s2));
        assert_eq!(
            s1.changed_names(&s2),
            vec!["default".to_string(), "x".to_string()]
        );
        assert_eq!(
            s2.changed_names(&s1),
            vec!["default".to_string(), "x".to_string()]
        );
        assert_eq!(s2.cert_not_after(), Some(now));
        assert_eq!(
            s2.version_of("x"),
            Some(s2.get("x").unwrap().version.as_str())
        );
    }
}
