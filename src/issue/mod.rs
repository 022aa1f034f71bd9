//! Issuance: the [`Issuer`] seam and the policy-checked entry points every front end uses.
//!
//! [`issue_workload`] (fresh key) and [`issue_csr`] (external key, proof of possession
//! checked) both run [`Policy::check`](crate::policy::Policy::check) *before* the issuer is
//! called, so a denied request never reaches a remote backend.

#[cfg(feature = "aws-pca")]
pub mod acm_pca;
pub mod local;

use std::time::Duration;

use async_trait::async_trait;
use rustls_pki_types::CertificateDer;
use serde::Serialize;
use time::OffsetDateTime;

use crate::ca::CaMeta;
use crate::error::{Error, Result};
use crate::identity::Sans;
use crate::key::{KeyAlgorithm, PrivateKey, PublicKeyKind};
use crate::pemutil;
use crate::policy::{PolicyRequest, Requester};
use crate::x509::{CertInfo, CsrInfo};

pub use local::LocalIssuer;

/// A request that has passed policy, ready to be signed.
#[derive(Clone, Debug)]
pub struct SignRequest {
    /// DER SubjectPublicKeyInfo of the workload key.
    pub public_key_der: Vec<u8>,
    /// Kind of that key.
    pub key: PublicKeyKind,
    /// SANs to put in the certificate.
    pub sans: Sans,
    /// Lifetime, already checked against policy.
    pub ttl: Duration,
    /// The CSR itself, for backends that sign CSRs (ACM PCA).
    pub csr_der: Option<Vec<u8>>,
}

/// A signed certificate and what a workload needs to present it.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    /// The leaf.
    pub leaf: CertificateDer<'static>,
    /// Intermediates between the leaf and the root, nearest first (no root).
    pub intermediates: Vec<CertificateDer<'static>>,
    /// The root at the top of the chain.
    pub root: CertificateDer<'static>,
    /// Parsed facts of the leaf.
    pub info: CertInfo,
}

impl IssuedCert {
    /// `tls.crt` / `<name>_cert_chain.pem`: leaf followed by intermediates.
    pub fn chain_pem(&self) -> String {
        pemutil::certs_to_pem(std::iter::once(&self.leaf).chain(self.intermediates.iter()))
    }

    /// `<name>_cert.pem`: the leaf alone.
    pub fn leaf_pem(&self) -> String {
        pemutil::certs_to_pem([&self.leaf])
    }
}

/// A workload certificate together with the private key meshca generated for it.
#[derive(Debug)]
pub struct Workload {
    /// The key (redacted in `Debug`).
    pub key: PrivateKey,
    /// The certificate.
    pub cert: IssuedCert,
}

/// Something that signs workload certificates for one named CA.
#[async_trait]
pub trait Issuer: Send + Sync + std::fmt::Debug {
    /// The CA's stored facts, including its policy and trust domain.
    fn meta(&self) -> &CaMeta;

    /// Signs a request that has already passed policy.
    async fn sign(&self, req: &SignRequest, now: OffsetDateTime) -> Result<IssuedCert>;

    /// The CA certificate this issuer signs with, when it is known locally (used to tell
    /// whether an existing leaf came from this CA). Default: unknown.
    fn ca_certificate(&self) -> Option<&CertificateDer<'static>> {
        None
    }
}

/// One ledger line: what was issued, by whom, until when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct LedgerEntry {
    /// Serial, lower-case hex.
    pub serial: String,
    /// Issuing CA.
    pub ca: String,
    /// Subject DN.
    pub subject: String,
    /// SANs with type prefixes.
    pub sans: Vec<String>,
    /// notAfter.
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// When it was issued.
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    /// SHA-256 fingerprint.
    pub sha256: String,
    /// Authority key identifier (the issuing CA key's SKI), to tell a rotated CA's
    /// certificates from its predecessor's. Absent in entries written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aki: Option<String>,
}

impl LedgerEntry {
    /// The ledger line for a certificate issued by `ca` at `now`.
    pub fn for_cert(ca: &str, cert: &IssuedCert, now: OffsetDateTime) -> LedgerEntry {
        let mut sans = Vec::new();
        sans.extend(cert.info.sans.uri.iter().map(|u| format!("URI:{u}")));
        sans.extend(cert.info.sans.dns.iter().map(|d| format!("DNS:{d}")));
        sans.extend(cert.info.sans.ip.iter().map(|i| format!("IP:{i}")));
        LedgerEntry {
            serial: cert.info.serial_hex(),
            ca: ca.to_string(),
            subject: cert.info.subject.clone(),
            sans,
            not_after: cert.info.not_after,
            issued_at: now,
            sha256: cert.info.sha256_fingerprint.clone(),
            aki: cert.info.authority_key_id.clone(),
        }
    }
}

fn check(
    issuer: &dyn Issuer,
    sans: &Sans,
    ttl: Option<Duration>,
    key: PublicKeyKind,
    wants_ca: bool,
    requester: Option<&Requester>,
) -> Result<Duration> {
    let meta = issuer.meta();
    meta.policy.check(
        &meta.name,
        &meta.trust_domain,
        &PolicyRequest {
            sans,
            ttl,
            key,
            wants_ca,
            requester,
        },
    )
}

/// Generates a key of `alg` and issues a certificate for it, after policy.
pub async fn issue_workload(
    issuer: &dyn Issuer,
    sans: &Sans,
    ttl: Option<Duration>,
    alg: KeyAlgorithm,
    now: OffsetDateTime,
) -> Result<Workload> {
    let kind = match alg {
        KeyAlgorithm::EcdsaP256 => PublicKeyKind::Ecdsa { bits: 256 },
        KeyAlgorithm::EcdsaP384 => PublicKeyKind::Ecdsa { bits: 384 },
        KeyAlgorithm::Ed25519 => PublicKeyKind::Ed25519,
        KeyAlgorithm::Rsa2048 => PublicKeyKind::Rsa { bits: 2048 },
        KeyAlgorithm::Rsa3072 => PublicKeyKind::Rsa { bits: 3072 },
        KeyAlgorithm::Rsa4096 => PublicKeyKind::Rsa { bits: 4096 },
    };
    let ttl = check(issuer, sans, ttl, kind, false, None)?;
    let key = alg.generate()?;
    let csr_der = if issuer.meta().backend != crate::ca::Backend::Local {
        Some(local::csr_for(&key, sans, &issuer.meta().trust_domain)?)
    } else {
        None
    };
    let req = SignRequest {
        public_key_der: key.public_key_der(),
        key: kind,
        sans: sans.clone(),
        ttl,
        csr_der,
    };
    let cert = issuer.sign(&req, now).await?;
    Ok(Workload { key, cert })
}

/// What to do with an external CSR's requested SANs.
#[derive(Clone, Debug, Default)]
pub struct CsrOptions {
    /// When set, these SANs replace the ones the CSR asks for.
    pub override_sans: Option<Sans>,
    /// Requested TTL.
    pub ttl: Option<Duration>,
    /// The Kubernetes requester, for auto-approval decisions.
    pub requester: Option<Requester>,
}

/// Parses a CSR for CA `ca` and checks what does not depend on policy: no key under the RSA
/// minimum, and a self-signature that verifies (proof of possession).
pub fn parse_csr_checked(ca: &str, csr_der: &[u8]) -> Result<CsrInfo> {
    let info = CsrInfo::from_der(csr_der)?;
    // Weak keys first: the verifier refuses RSA under 2048 bits outright, which would
    // otherwise surface as a misleading signature failure.
    if let PublicKeyKind::Rsa { bits } = info.key {
        if bits < crate::key::MIN_RSA_BITS {
            return Err(Error::PolicyDenied {
                ca: ca.to_string(),
                reason: format!(
                    "RSA key of {bits} bits is under the {}-bit minimum",
                    crate::key::MIN_RSA_BITS
                ),
            });
        }
    }
    if !info.signature_valid {
        return Err(Error::Csr(
            "signature does not verify with the request's own key (proof of possession failed)"
                .into(),
        ));
    }
    Ok(info)
}

/// Checks an external CSR (signature, CA flag, SANs, key) against policy and returns the
/// request ready to sign. Pure: no I/O, so the signer and approver can share it.
pub fn check_csr(issuer: &dyn Issuer, csr_der: &[u8], opts: &CsrOptions) -> Result<SignRequest> {
    let info = parse_csr_checked(&issuer.meta().name, csr_der)?;
    let sans = match &opts.override_sans {
        Some(s) => s.clone(),
        None => info.sans.to_sans()?,
    };
    let ttl = check(
        issuer,
        &sans,
        opts.ttl,
        info.key,
        info.wants_ca,
        opts.requester.as_ref(),
    )?;
    Ok(SignRequest {
        public_key_der: info.spki_der,
        key: info.key,
        sans,
        ttl,
        csr_der: Some(csr_der.to_vec()),
    })
}

/// Signs an external CSR after [`check_csr`].
pub async fn issue_csr(
    issuer: &dyn Issuer,
    csr_der: &[u8],
    opts: &CsrOptions,
    now: OffsetDateTime,
) -> Result<IssuedCert> {
    let req = check_csr(issuer, csr_der, opts)?;
    issuer.sign(&req, now).await
}
