//! Issuance: the [`Issuer`] seam and the policy-checked entry points every front end uses.
//!
//! Every entry point asks the one decision, [`Policy::decide`](crate::policy::Policy::decide),
//! with the requester and front end, *before* the issuer is called, so a denied request never
//! reaches a remote backend:
//! - [`issue_workload`] (fresh key, the local operator) and [`issue_workload_as`] (fresh key,
//!   any requester: the managed-Secret controller);
//! - [`decide_csr`] / [`check_csr`] / [`issue_csr`] (external key, proof of possession
//!   checked): `meshca issue --csr`, the CSR signer, the auto-approver, `meshca policy check`.

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
use crate::policy::{Denial, Ekus, FrontEnd, Grant, PolicyRequest, Requester, Usages};
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
    /// Extended key usages granted by policy.
    pub ekus: Ekus,
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
        LedgerEntry::for_leaf(ca, &cert.info, now)
    }

    /// The ledger line for the leaf `info` describes, issued by `ca` at `now`.
    pub fn for_leaf(ca: &str, info: &CertInfo, now: OffsetDateTime) -> LedgerEntry {
        let mut sans = Vec::new();
        sans.extend(info.sans.uri.iter().map(|u| format!("URI:{u}")));
        sans.extend(info.sans.dns.iter().map(|d| format!("DNS:{d}")));
        sans.extend(info.sans.ip.iter().map(|i| format!("IP:{i}")));
        LedgerEntry {
            serial: info.serial_hex(),
            ca: ca.to_string(),
            subject: info.subject.clone(),
            sans,
            not_after: info.not_after,
            issued_at: now,
            sha256: info.sha256_fingerprint.clone(),
            aki: info.authority_key_id.clone(),
        }
    }
}

/// The one policy decision for the CA `meta` describes:
/// [`Policy::decide`](crate::policy::Policy::decide).
pub fn decide(meta: &CaMeta, req: &PolicyRequest<'_>) -> std::result::Result<Grant, Denial> {
    meta.policy.decide(&meta.name, &meta.trust_domain, req)
}

/// The key kind a freshly generated key of `alg` has.
pub fn key_kind(alg: KeyAlgorithm) -> PublicKeyKind {
    match alg {
        KeyAlgorithm::EcdsaP256 => PublicKeyKind::Ecdsa { bits: 256 },
        KeyAlgorithm::EcdsaP384 => PublicKeyKind::Ecdsa { bits: 384 },
        KeyAlgorithm::Ed25519 => PublicKeyKind::Ed25519,
        KeyAlgorithm::Rsa2048 => PublicKeyKind::Rsa { bits: 2048 },
        KeyAlgorithm::Rsa3072 => PublicKeyKind::Rsa { bits: 3072 },
        KeyAlgorithm::Rsa4096 => PublicKeyKind::Rsa { bits: 4096 },
    }
}

/// The policy request for a fresh key of `alg` (no usages asked: the profile default).
pub fn workload_request<'a>(
    via: FrontEnd,
    requester: &'a Requester,
    sans: &'a Sans,
    ttl: Option<Duration>,
    alg: KeyAlgorithm,
) -> PolicyRequest<'a> {
    const NO_USAGES: &Usages = &Usages {
        csr: None,
        kube: None,
    };
    PolicyRequest {
        via,
        requester,
        sans,
        ttl,
        key: key_kind(alg),
        wants_ca: false,
        usages: NO_USAGES,
    }
}

/// Generates a key of `alg` and issues a certificate for it, after policy, for the local
/// operator (`meshca issue`, `meshca init`, SDS renewals).
pub async fn issue_workload(
    issuer: &dyn Issuer,
    sans: &Sans,
    ttl: Option<Duration>,
    alg: KeyAlgorithm,
    now: OffsetDateTime,
) -> Result<Workload> {
    let req = workload_request(FrontEnd::Local, &Requester::LocalOperator, sans, ttl, alg);
    issue_workload_as(issuer, &req, alg, now).await
}

/// Generates a key of `alg` and issues a certificate for it after the decision on `req`
/// (whose `key` must be [`key_kind`]`(alg)`; see [`workload_request`]).
pub async fn issue_workload_as(
    issuer: &dyn Issuer,
    req: &PolicyRequest<'_>,
    alg: KeyAlgorithm,
    now: OffsetDateTime,
) -> Result<Workload> {
    let kind = key_kind(alg);
    if req.key != kind {
        return Err(Error::invalid(
            "policy request",
            "the key kind does not match the key algorithm",
        ));
    }
    let grant = decide(issuer.meta(), req).map_err(|d| d.into_error(&issuer.meta().name))?;
    let key = alg.generate()?;
    let sans = req.sans;
    let csr_der = if issuer.meta().backend != crate::ca::Backend::Local {
        Some(local::csr_for(&key, sans, &issuer.meta().trust_domain)?)
    } else {
        None
    };
    let req = SignRequest {
        public_key_der: key.public_key_der(),
        key: kind,
        sans: sans.clone(),
        ttl: grant.ttl,
        csr_der,
        ekus: grant.ekus,
    };
    let cert = issuer.sign(&req, now).await?;
    Ok(Workload { key, cert })
}

/// Who asks for an external CSR, through which front end, and what to do with it.
#[derive(Clone, Debug)]
pub struct CsrOptions {
    /// The front end asking.
    pub via: FrontEnd,
    /// Who asks (a CSR's `spec.username` in the cluster).
    pub requester: Requester,
    /// When set, these SANs replace the ones the CSR asks for.
    pub override_sans: Option<Sans>,
    /// Requested TTL.
    pub ttl: Option<Duration>,
    /// A Kubernetes CSR's `spec.usages` (the CSR's own extensions are always read).
    pub kube_usages: Option<Vec<String>>,
}

impl Default for CsrOptions {
    /// The local operator (`meshca issue --csr`).
    fn default() -> Self {
        CsrOptions {
            via: FrontEnd::Local,
            requester: Requester::LocalOperator,
            override_sans: None,
            ttl: None,
            kube_usages: None,
        }
    }
}

impl CsrOptions {
    /// Options for a Kubernetes CSR from `username` seen through `via`.
    pub fn kube(
        via: FrontEnd,
        username: &str,
        ttl: Option<Duration>,
        usages: Option<Vec<String>>,
    ) -> Self {
        CsrOptions {
            via,
            requester: Requester::kube(username),
            override_sans: None,
            ttl,
            kube_usages: usages,
        }
    }
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

/// Parses and checks an external CSR (signature, CA flag, SANs, key, usages) and asks the one
/// decision. `Err`: the CSR is unreadable or its proof of possession fails; `Ok(Err)`: policy
/// denies it; `Ok(Ok)`: the request ready to sign. Pure: no I/O.
pub fn decide_csr(
    meta: &CaMeta,
    csr_der: &[u8],
    opts: &CsrOptions,
) -> Result<std::result::Result<SignRequest, Denial>> {
    let info = parse_csr_checked(&meta.name, csr_der)?;
    let sans = match &opts.override_sans {
        Some(s) => s.clone(),
        None => info.sans.to_sans()?,
    };
    let usages = Usages {
        csr: info.requested_usages.clone(),
        kube: opts.kube_usages.clone(),
    };
    let req = PolicyRequest {
        via: opts.via,
        requester: &opts.requester,
        sans: &sans,
        ttl: opts.ttl,
        key: info.key,
        wants_ca: info.wants_ca,
        usages: &usages,
    };
    Ok(decide(meta, &req).map(|grant| SignRequest {
        public_key_der: info.spki_der,
        key: info.key,
        sans,
        ttl: grant.ttl,
        csr_der: Some(csr_der.to_vec()),
        ekus: grant.ekus,
    }))
}

/// [`decide_csr`] with a denial as [`Error::PolicyDenied`].
pub fn check_csr(issuer: &dyn Issuer, csr_der: &[u8], opts: &CsrOptions) -> Result<SignRequest> {
    decide_csr(issuer.meta(), csr_der, opts)?.map_err(|d| d.into_error(&issuer.meta().name))
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
