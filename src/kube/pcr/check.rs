//! Pure checks of a PodCertificateRequest: the key and its proof of possession, the identity
//! and the one policy decision, and the validity the API server will accept. No I/O.
//!
//! The key comes in one of two forms (`ValidatePodCertificateRequestCreate` in kubernetes
//! `pkg/apis/certificates/validation/validation.go` requires exactly one):
//! - `spec.stubPKCS10Request` (Kubernetes 1.36+, the only form in `certificates.k8s.io/v1`):
//!   a DER PKCS#10 request made by the kubelet with the pod's key. Its self-signature is the
//!   proof of possession and its subject public key is the key certified; the rest of it
//!   (subject, extensions) is ignored, since the identity comes from the pod's service
//!   account. If `spec.pkixPublicKey` is set as well it must be that same key.
//! - `spec.pkixPublicKey` with `spec.proofOfPossession` (v1alpha1, v1beta1; deprecated in
//!   1.36): the proof is a signature over the ASCII bytes of `spec.podUID` (Ed25519 over the
//!   bytes; ECDSA `VerifyASN1` over their SHA-256; RSA `VerifyPSS` with SHA-256 over their
//!   SHA-256).
//!
//! The API server verifies either proof and the key type (RSA 3072/4096, ECDSA
//! P-256/P-384/P-521 or Ed25519) at creation. meshca checks them again anyway (a request
//! never reaches a signature without a verified key), and refuses the key types it cannot
//! issue for (P-521) or the CA's policy does not allow with `UnsupportedKeyType`.
//!
//! What the status update must satisfy (`ValidatePodCertificateRequestStatusUpdate`):
//! `notBefore`/`notAfter` equal to the leaf's, `notBefore` within 5 minutes of the API
//! server's clock, a lifetime of at least 1 hour and at most `spec.maxExpirationSeconds`,
//! and `beginRefreshAt` at least 10 minutes after `notBefore` and before `notAfter`.

use std::time::Duration;

use time::OffsetDateTime;

use crate::ca::CaMeta;
use crate::identity::{Sans, SpiffeId};
use crate::issue::{decide, SignRequest};
use crate::key::{KeyAlgorithm, PublicKeyKind};
use crate::policy::{FrontEnd, PolicyRequest, Requester, Usages};
use crate::x509::{CertInfo, CsrInfo};

use super::Pcr;

/// `Denied` reason for a key type meshca or the CA's policy does not take
/// (`certificates.PodCertificateRequestConditionUnsupportedKeyType`).
pub const REASON_UNSUPPORTED_KEY_TYPE: &str = "UnsupportedKeyType";
/// `Denied` reason for `spec.unverifiedUserAnnotations` meshca does not recognise
/// (`certificates.PodCertificateRequestConditionInvalidUserConfig`, whose value is this).
pub const REASON_INVALID_USER_CONFIG: &str = "InvalidUnverifiedUserAnnotations";
/// `Denied` reason when the CA's policy refuses the pod's identity.
pub const REASON_POLICY: &str = super::super::signer::REASON_POLICY;
/// `Denied` reason for a request meshca cannot read (bad key, proof of possession).
pub const REASON_BAD_REQUEST: &str = super::super::signer::REASON_BAD_REQUEST;
/// `Failed` reason when the CA cannot issue a certificate the API server accepts.
pub const REASON_SIGN_FAILED: &str = super::super::signer::REASON_SIGN_FAILED;

/// The API's default `spec.maxExpirationSeconds`.
pub const DEFAULT_MAX_EXPIRATION: Duration = Duration::from_secs(86_400);
/// The shortest lifetime the API server accepts.
pub const MIN_LIFETIME: Duration = Duration::from_secs(3600);
/// How far before "now" notBefore is set. The API server wants notBefore within 5 minutes of
/// its clock, so the 5-minute backdating of other certificates would always be refused.
pub const BACKDATE: Duration = Duration::from_secs(60);
/// `beginRefreshAt` must be this far from `notBefore` and `notAfter`.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(600);
/// Largest accepted `pkixPublicKey` / `proofOfPossession` / `stubPKCS10Request` (the API's
/// limits, `MaxPKIXPublicKeySize` and `MaxStubPKCS10RequestSize`).
pub const MAX_KEY_BYTES: usize = 10 * 1024;

/// Why a request is refused: the condition to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// `Denied` (the request itself: key, identity, annotations) or `Failed` (the signer
    /// cannot issue).
    pub condition: &'static str,
    /// Condition reason (CamelCase).
    pub reason: &'static str,
    /// One line naming the offending value.
    pub message: String,
}

impl Refusal {
    pub(crate) fn denied(reason: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            condition: "Denied",
            reason,
            message: message.into(),
        }
    }

    pub(crate) fn failed(reason: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            condition: "Failed",
            reason,
            message: message.into(),
        }
    }
}

/// The Kubernetes name of a key type (`spec.podCertificate.keyType` of a projected volume).
pub fn kube_key_type(alg: KeyAlgorithm) -> Option<&'static str> {
    match alg {
        KeyAlgorithm::EcdsaP256 => Some("ECDSAP256"),
        KeyAlgorithm::EcdsaP384 => Some("ECDSAP384"),
        KeyAlgorithm::Ed25519 => Some("ED25519"),
        KeyAlgorithm::Rsa3072 => Some("RSA3072"),
        KeyAlgorithm::Rsa4096 => Some("RSA4096"),
        // The kubelet does not make RSA-2048 keys.
        KeyAlgorithm::Rsa2048 => None,
    }
}

/// A key type to suggest to a pod whose key was refused: the first the policy allows that a
/// kubelet can make, else ECDSAP256.
pub fn suggested_key_type(meta: &CaMeta) -> &'static str {
    let allowed = &meta.policy.allowed_key_algorithms;
    if allowed.is_empty() {
        return "ECDSAP256";
    }
    allowed
        .iter()
        .find_map(|a| kube_key_type(*a))
        .unwrap_or("ECDSAP256")
}

/// The requested public key: its kind and the bytes of its SPKI BIT STRING.
fn parse_key(spki: &[u8]) -> Result<(PublicKeyKind, Vec<u8>), Refusal> {
    use x509_parser::prelude::FromDer;
    if spki.is_empty() {
        // An explicit refusal, not a silent wait. Seen through certificates.k8s.io/v1, a
        // request created through v1beta1 with the deprecated pkixPublicKey has no key at all.
        return Err(Refusal::denied(
            REASON_BAD_REQUEST,
            "the request carries no key: neither spec.stubPKCS10Request nor spec.pkixPublicKey is set",
        ));
    }
    if spki.len() > MAX_KEY_BYTES {
        return Err(Refusal::denied(
            REASON_BAD_REQUEST,
            format!("spec.pkixPublicKey is {} bytes, over the limit", spki.len()),
        ));
    }
    match x509_parser::x509::SubjectPublicKeyInfo::from_der(spki) {
        Ok(([], k)) => Ok((PublicKeyKind::of(&k), k.subject_public_key.data.to_vec())),
        _ => Err(Refusal::denied(
            REASON_BAD_REQUEST,
            "spec.pkixPublicKey is not a DER SubjectPublicKeyInfo",
        )),
    }
}

/// Whether `pop` is a signature by the key over the ASCII bytes of `pod_uid`, as the
/// kubelet makes it (and the API server checks it): Ed25519 over the bytes, ECDSA (ASN.1)
/// over their SHA-256 whatever the curve, RSA-PSS with SHA-256 and MGF1-SHA-256 over their
/// SHA-256. Go's `rsa.SignPSS` with nil options, which the kubelet uses, makes the salt as
/// long as possible; a salt as long as the digest is accepted too.
pub fn verify_proof_of_possession(
    kind: PublicKeyKind,
    raw_key: &[u8],
    pod_uid: &str,
    pop: &[u8],
) -> bool {
    use aws_lc_rs::signature::{self, RsaPssSaltLength, UnparsedPublicKey, VerificationAlgorithm};
    const PSS_MAX: signature::RsaParameters =
        signature::RSA_PSS_2048_8192_SHA256.with_pss_salt_length(RsaPssSaltLength::Max);
    let msg = pod_uid.as_bytes();
    let ok = |alg: &'static dyn VerificationAlgorithm| {
        UnparsedPublicKey::new(alg, raw_key)
            .verify(msg, pop)
            .is_ok()
    };
    match kind {
        PublicKeyKind::Ed25519 => ok(&signature::ED25519),
        PublicKeyKind::Ecdsa { bits: 256 } => ok(&signature::ECDSA_P256_SHA256_ASN1),
        PublicKeyKind::Ecdsa { bits: 384 } => ok(&signature::ECDSA_P384_SHA256_ASN1),
        PublicKeyKind::Ecdsa { bits: 521 } => ok(&signature::ECDSA_P521_SHA256_ASN1),
        PublicKeyKind::Rsa { .. } => ok(&PSS_MAX) || ok(&signature::RSA_PSS_2048_8192_SHA256),
        _ => false,
    }
}

/// The lifetime to issue: `spec.maxExpirationSeconds` (default 24 h) capped by the CA's
/// `max_ttl`. The request names a maximum, not a wish, so a shorter certificate is what
/// Kubernetes permits; under the API's 1-hour minimum nothing acceptable can be issued.
pub fn lifetime(pcr: &Pcr, meta: &CaMeta) -> Result<Duration, Refusal> {
    let max = match pcr.spec.max_expiration_seconds {
        None => DEFAULT_MAX_EXPIRATION,
        Some(s) if s > 0 => Duration::from_secs(s as u64),
        Some(s) => {
            return Err(Refusal::denied(
                REASON_BAD_REQUEST,
                format!("spec.maxExpirationSeconds {s} is not positive"),
            ))
        }
    };
    let l = max.min(meta.policy.max_ttl);
    if l < MIN_LIFETIME {
        return Err(if max < MIN_LIFETIME {
            Refusal::denied(
                REASON_BAD_REQUEST,
                format!(
                    "spec.maxExpirationSeconds {} is under the 3600-second minimum lifetime",
                    max.as_secs()
                ),
            )
        } else {
            Refusal::failed(
                REASON_SIGN_FAILED,
                format!(
                    "CA {}'s max_ttl {} is under the 1-hour minimum lifetime of a pod certificate",
                    meta.name,
                    humantime::format_duration(meta.policy.max_ttl)
                ),
            )
        });
    }
    Ok(l)
}

/// The time to hand the issuer: the issuer backdates notBefore by
/// [`crate::profile::BACKDATE`] from it and sets notAfter to it plus the TTL, so signing at
/// `now + (profile::BACKDATE - BACKDATE)` with a TTL of `lifetime - profile::BACKDATE` gives
/// notBefore = `now - BACKDATE` and notAfter = notBefore + `lifetime`.
pub fn sign_time(now: OffsetDateTime) -> OffsetDateTime {
    now + (crate::profile::BACKDATE.saturating_sub(BACKDATE))
}

/// A request that passed every check: what to sign, and when.
#[derive(Clone, Debug)]
pub struct Prepared {
    /// The CA name.
    pub ca: String,
    /// The sign request (policy already granted).
    pub req: SignRequest,
    /// The time to pass to the issuer ([`sign_time`]).
    pub sign_at: OffsetDateTime,
    /// The pod's service account as `system:serviceaccount:<ns>:<sa>` (for the ledger).
    pub requester: String,
}

/// The key to certify, checked: its kind, its DER SubjectPublicKeyInfo, and the stub CSR
/// when it came in one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestedKey {
    /// The key's kind (a type meshca issues for, and the API allows).
    pub kind: PublicKeyKind,
    /// DER SubjectPublicKeyInfo.
    pub spki_der: Vec<u8>,
    /// `spec.stubPKCS10Request`, when the key came from it (for backends that sign CSRs).
    pub csr_der: Option<Vec<u8>>,
}

/// `UnsupportedKeyType` unless meshca issues for `kind` and a kubelet can ask for it.
fn check_key_type(kind: PublicKeyKind, field: &str, meta: &CaMeta) -> Result<(), Refusal> {
    if kind.algorithm().is_none() || matches!(kind, PublicKeyKind::Rsa { bits } if bits < 3072) {
        return Err(Refusal::denied(
            REASON_UNSUPPORTED_KEY_TYPE,
            format!(
                "key type {kind} of {field} is not supported by signer meshca.io/{}; use keyType {}",
                meta.name,
                suggested_key_type(meta)
            ),
        ));
    }
    Ok(())
}

/// A short name of a public key for messages: its kind and SHA-256 (of the DER SPKI).
fn key_id(kind: PublicKeyKind, spki: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, spki);
    format!("{kind} key SHA-256 {}", crate::pemutil::hex(d.as_ref()))
}

/// The key of a request that carries `spec.stubPKCS10Request`: the CSR parses, its key is a
/// type meshca issues for, its self-signature verifies (the proof of possession), and a
/// `pkixPublicKey` or `proofOfPossession` sent beside it agrees with it.
fn stub_key(pcr: &Pcr, meta: &CaMeta) -> Result<RequestedKey, Refusal> {
    let spec = &pcr.spec;
    let der = &spec.stub_pkc_s10_request.0;
    if der.len() > MAX_KEY_BYTES {
        return Err(Refusal::denied(
            REASON_BAD_REQUEST,
            format!(
                "spec.stubPKCS10Request is {} bytes, over the limit of {MAX_KEY_BYTES}",
                der.len()
            ),
        ));
    }
    let info = CsrInfo::from_der(der).map_err(|e| {
        Refusal::denied(
            REASON_BAD_REQUEST,
            format!("spec.stubPKCS10Request is not a DER PKCS#10 certificate request: {e}"),
        )
    })?;
    // The key type first: a P-521 key gets UnsupportedKeyType, not a signature error.
    check_key_type(info.key, "spec.stubPKCS10Request", meta)?;
    if !info.signature_valid {
        return Err(Refusal::denied(
            REASON_BAD_REQUEST,
            format!(
                "spec.stubPKCS10Request's signature does not verify with its own subject public key ({}): no proof of possession",
                key_id(info.key, &info.spki_der)
            ),
        ));
    }
    if let Some(pkix) = spec.pkix_public_key.as_ref().filter(|k| !k.0.is_empty()) {
        if pkix.0 != info.spki_der {
            let pkix_kind = parse_key(&pkix.0)
                .map(|(k, _)| k)
                .unwrap_or(PublicKeyKind::Other);
            return Err(Refusal::denied(
                REASON_BAD_REQUEST,
                format!(
                    "spec.pkixPublicKey ({}) is not the subject public key of spec.stubPKCS10Request ({})",
                    key_id(pkix_kind, &pkix.0),
                    key_id(info.key, &info.spki_der)
                ),
            ));
        }
    }
    if let Some(pop) = spec
        .proof_of_possession
        .as_ref()
        .filter(|p| !p.0.is_empty())
    {
        // Not sent beside a stub by any kubelet (the API server refuses the pair); a claim in
        // the request is checked, never ignored.
        let (kind, raw) = parse_key(&info.spki_der)?;
        if pop.0.len() > MAX_KEY_BYTES
            || !verify_proof_of_possession(kind, &raw, &spec.pod_uid, &pop.0)
        {
            return Err(Refusal::denied(
                REASON_BAD_REQUEST,
                format!(
                    "spec.proofOfPossession does not verify: it must be a signature by the key of spec.stubPKCS10Request over spec.podUID {:?}",
                    spec.pod_uid
                ),
            ));
        }
    }
    Ok(RequestedKey {
        kind: info.key,
        spki_der: info.spki_der,
        csr_der: Some(der.clone()),
    })
}

/// The key of a request that carries `spec.pkixPublicKey` and `spec.proofOfPossession`.
fn pkix_key(pcr: &Pcr, meta: &CaMeta) -> Result<RequestedKey, Refusal> {
    let spec = &pcr.spec;
    let spki = spec
        .pkix_public_key
        .as_ref()
        .map(|k| k.0.as_slice())
        .unwrap_or_default();
    let (kind, raw) = parse_key(spki)?;
    // The key type first: a P-521 key gets UnsupportedKeyType, not a signature error.
    check_key_type(kind, "spec.pkixPublicKey", meta)?;
    let pop = spec
        .proof_of_possession
        .as_ref()
        .map(|p| p.0.as_slice())
        .unwrap_or_default();
    if pop.len() > MAX_KEY_BYTES || !verify_proof_of_possession(kind, &raw, &spec.pod_uid, pop) {
        return Err(Refusal::denied(
            REASON_BAD_REQUEST,
            format!(
                "spec.proofOfPossession does not verify: it must be a signature by spec.pkixPublicKey over spec.podUID {:?}",
                spec.pod_uid
            ),
        ));
    }
    Ok(RequestedKey {
        kind,
        spki_der: spki.to_vec(),
        csr_der: None,
    })
}

/// Whether the request carries no key at all (neither `stubPKCS10Request` nor
/// `pkixPublicKey`): what a request created with `pkixPublicKey` through v1beta1 looks like
/// through v1, which does not have that field.
pub fn lacks_key(pcr: &Pcr) -> bool {
    pcr.spec.stub_pkc_s10_request.0.is_empty()
        && pcr
            .spec
            .pkix_public_key
            .as_ref()
            .is_none_or(|k| k.0.is_empty())
}

/// The key to certify and its proof of possession, from `spec.stubPKCS10Request` when set,
/// else from `spec.pkixPublicKey` and `spec.proofOfPossession`. `Err`: the refusal, naming
/// the field and the value.
pub fn requested_key(pcr: &Pcr, meta: &CaMeta) -> Result<RequestedKey, Refusal> {
    if pcr.spec.stub_pkc_s10_request.0.is_empty() {
        pkix_key(pcr, meta)
    } else {
        stub_key(pcr, meta)
    }
}

/// Every check before signing. `Err`: the condition to write.
pub fn prepare(pcr: &Pcr, meta: &CaMeta, now: OffsetDateTime) -> Result<Prepared, Refusal> {
    let spec = &pcr.spec;
    if let Some(k) = spec
        .unverified_user_annotations
        .as_ref()
        .and_then(|a| a.keys().next())
    {
        return Err(Refusal::denied(
            REASON_INVALID_USER_CONFIG,
            format!("meshca recognises no spec.unverifiedUserAnnotations; got key {k:?}"),
        ));
    }
    let key = requested_key(pcr, meta)?;
    let kind = key.kind;
    let namespace = pcr.metadata.namespace.clone().unwrap_or_default();
    let sa = spec.service_account_name.clone();
    let requester = Requester::PodServiceAccount {
        namespace: namespace.clone(),
        name: sa.clone(),
    };
    let id = SpiffeId::parse(&format!(
        "spiffe://{}/ns/{namespace}/sa/{sa}",
        meta.trust_domain
    ))
    .map_err(|e| Refusal::denied(REASON_BAD_REQUEST, e.to_string()))?;
    let sans = Sans {
        spiffe_id: Some(id),
        dns: Vec::new(),
        ips: Vec::new(),
    };
    let lifetime = lifetime(pcr, meta)?;
    let ttl = lifetime.saturating_sub(crate::profile::BACKDATE);
    const NO_USAGES: &Usages = &Usages {
        csr: None,
        kube: None,
    };
    let grant = decide(
        meta,
        &PolicyRequest {
            via: FrontEnd::PodCertificate,
            requester: &requester,
            sans: &sans,
            ttl: Some(ttl),
            key: kind,
            wants_ca: false,
            usages: NO_USAGES,
        },
    )
    .map_err(|d| {
        if d.key_type {
            Refusal::denied(
                REASON_UNSUPPORTED_KEY_TYPE,
                format!("{}; use keyType {}", d.reason, suggested_key_type(meta)),
            )
        } else {
            Refusal::denied(
                REASON_POLICY,
                format!("CA {} denies the request: {}", meta.name, d.reason),
            )
        }
    })?;
    Ok(Prepared {
        ca: meta.name.clone(),
        req: SignRequest {
            public_key_der: key.spki_der,
            key: kind,
            sans,
            ttl: grant.ttl,
            csr_der: key.csr_der,
            ekus: grant.ekus,
        },
        sign_at: sign_time(now),
        requester: format!("system:serviceaccount:{namespace}:{sa}"),
    })
}

/// The times of the status update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusTimes {
    /// The leaf's notBefore.
    pub not_before: OffsetDateTime,
    /// The leaf's notAfter.
    pub not_after: OffsetDateTime,
    /// When the kubelet should start refreshing.
    pub begin_refresh_at: OffsetDateTime,
}

/// The status times of `leaf`, checked against what the API server accepts at `now`.
/// `unit` in [0, 1] places `beginRefreshAt` between 50% and 60% of the lifetime (jitter, so
/// pods started together do not all renew together). `Err`: why the leaf is unacceptable.
pub fn status_times(
    leaf: &CertInfo,
    max_expiration: Option<i32>,
    now: OffsetDateTime,
    unit: f64,
) -> Result<StatusTimes, String> {
    let (nb, na) = (leaf.not_before, leaf.not_after);
    let life = na - nb;
    if (nb - now).abs() >= time::Duration::minutes(5) {
        return Err(format!(
            "the certificate's notBefore {nb} is not within 5 minutes of now ({now})"
        ));
    }
    if life < time::Duration::try_from(MIN_LIFETIME).unwrap_or(time::Duration::HOUR) {
        return Err(format!(
            "the certificate would live {}, under the 1-hour minimum (the CA expires at {na})",
            humantime::format_duration(Duration::try_from(life).unwrap_or_default())
        ));
    }
    let max = max_expiration
        .map(|s| time::Duration::seconds(s.into()))
        .unwrap_or(time::Duration::try_from(DEFAULT_MAX_EXPIRATION).unwrap_or(time::Duration::DAY));
    if life > max {
        return Err(format!(
            "the certificate would live {life}, over spec.maxExpirationSeconds {}",
            max.whole_seconds()
        ));
    }
    let frac = 0.5 + 0.1 * unit.clamp(0.0, 1.0);
    let margin = time::Duration::try_from(REFRESH_MARGIN).unwrap_or(time::Duration::minutes(10));
    let at = nb + life * frac;
    // Whole seconds: the API carries seconds only.
    let at = at.replace_nanosecond(0).unwrap_or(at);
    let at = at.clamp(nb + margin, na - margin);
    Ok(StatusTimes {
        not_before: nb,
        not_after: na,
        begin_refresh_at: at,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ca::{create_root, CaSpec};
    use crate::policy::Policy;

    /// A policy that opts in to pod certificates for namespace `app` (the requests' namespace).
    fn opted_in() -> Policy {
        Policy {
            pod_certificates: true,
            pod_certificate_namespaces: vec!["app".into()],
            ..Policy::default()
        }
    }
    use serde_json::json;

    /// A key of `alg` and its proof of possession over `uid`, made with aws-lc-rs the way the
    /// kubelet makes them (ECDSA over SHA-256 whatever the curve, Ed25519 over the bytes).
    pub(crate) fn key_and_pop(alg: &str, uid: &str) -> (Vec<u8>, Vec<u8>) {
        use aws_lc_rs::encoding::AsDer;
        use aws_lc_rs::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair};
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let ec = |sign: &'static signature::EcdsaSigningAlgorithm| {
            let kp = EcdsaKeyPair::generate(sign).unwrap();
            let spki = kp.public_key().as_der().unwrap().as_ref().to_vec();
            let pop = kp.sign(&rng, uid.as_bytes()).unwrap().as_ref().to_vec();
            (spki, pop)
        };
        match alg {
            "p256" => ec(&signature::ECDSA_P256_SHA256_ASN1_SIGNING),
            "p521" => ec(&signature::ECDSA_P521_SHA256_ASN1_SIGNING),
            "ed25519" => {
                let kp = Ed25519KeyPair::generate().unwrap();
                let spki = kp.public_key().as_der().unwrap().as_ref().to_vec();
                (spki, kp.sign(uid.as_bytes()).as_ref().to_vec())
            }
            other => panic!("{other}"),
        }
    }

    pub(crate) fn pcr(
        ns: &str,
        sa: &str,
        signer: &str,
        spki: &[u8],
        pop: &[u8],
        uid: &str,
        max: Option<i32>,
    ) -> Pcr {
        request(
            "v1beta1",
            ns,
            sa,
            signer,
            uid,
            json!({"maxExpirationSeconds": max, "pkixPublicKey": b64(spki), "proofOfPossession": b64(pop)}),
        )
    }

    fn b64(x: &[u8]) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(x)
    }

    /// Request `p1` of pod `web-0` in `ns` as read through `version`, its spec completed by
    /// the fields of `key`.
    fn request(
        version: &str,
        ns: &str,
        sa: &str,
        signer: &str,
        uid: &str,
        key: serde_json::Value,
    ) -> Pcr {
        let mut v = json!({
            "apiVersion": format!("certificates.k8s.io/{version}"),
            "kind": "PodCertificateRequest",
            "metadata": {"name": "p1", "namespace": ns, "resourceVersion": "7", "uid": "u-1"},
            "spec": {
                "signerName": signer, "podName": "web-0", "podUID": uid,
                "serviceAccountName": sa, "serviceAccountUID": "sa-uid",
                "nodeName": "node-1", "nodeUID": "node-uid",
            },
        });
        for (k, x) in key.as_object().unwrap() {
            v["spec"][k] = x.clone();
        }
        serde_json::from_value(v).unwrap()
    }

    fn meta(policy: Policy) -> CaMeta {
        let mut spec = CaSpec::root("mesh");
        spec.policy = policy;
        create_root(&spec, OffsetDateTime::now_utc()).unwrap().meta
    }

    const UID: &str = "0b1e7a0c-5d0e-4f4e-9a57-7d8f0c1e2a3b";

    /// A stub PKCS#10 request as the kubelet makes it (empty subject, no extension), signed
    /// with a new key of `alg` (`p256`, `p521`, `ed25519`); returns it and the key's DER SPKI.
    pub(crate) fn stub_csr(alg: &str) -> (Vec<u8>, Vec<u8>) {
        let a = match alg {
            "p256" => &rcgen::PKCS_ECDSA_P256_SHA256,
            "p521" => &rcgen::PKCS_ECDSA_P521_SHA512,
            "ed25519" => &rcgen::PKCS_ED25519,
            other => panic!("{other}"),
        };
        let kp = rcgen::KeyPair::generate_for(a).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params.serialize_request(&kp).unwrap();
        (
            csr.der().to_vec(),
            rcgen::PublicKeyData::subject_public_key_info(&kp),
        )
    }

    /// A `certificates.k8s.io/v1` request carrying `stubPKCS10Request` (and, when given,
    /// `pkixPublicKey`, which v1 does not have but a v1beta1 request may carry).
    pub(crate) fn stub_pcr(
        ns: &str,
        sa: &str,
        signer: &str,
        csr: &[u8],
        pkix: Option<&[u8]>,
        uid: &str,
    ) -> Pcr {
        let mut key = json!({"stubPKCS10Request": b64(csr)});
        if let Some(k) = pkix {
            key["pkixPublicKey"] = json!(b64(k));
        }
        request("v1", ns, sa, signer, uid, key)
    }

    #[test]
    fn a_good_stub_request_is_issued_to_the_csrs_key() {
        let m = meta(opted_in());
        let now = OffsetDateTime::now_utc();
        for alg in ["p256", "ed25519"] {
            let (csr, spki) = stub_csr(alg);
            // Alone, and with the same key as pkixPublicKey.
            for pkix in [None, Some(spki.as_slice())] {
                let p = stub_pcr("app", "web", "meshca.io/mesh", &csr, pkix, UID);
                let got = prepare(&p, &m, now).unwrap();
                assert_eq!(got.req.public_key_der, spki, "{alg}: the CSR's key");
                assert_eq!(got.req.csr_der.as_deref(), Some(csr.as_slice()));
                assert_eq!(
                    got.req.sans.spiffe_id.as_ref().unwrap().to_string(),
                    "spiffe://cluster.local/ns/app/sa/web"
                );
                assert_eq!(got.requester, "system:serviceaccount:app:web");
            }
        }
        // The subject and extensions of the stub are ignored: the identity is the pod's
        // service account's, whatever the CSR asks for.
        let kp = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        let csr = params.serialize_request(&kp).unwrap().der().to_vec();
        let got = prepare(
            &stub_pcr("app", "web", "meshca.io/mesh", &csr, None, UID),
            &m,
            now,
        )
        .unwrap();
        assert!(got.req.sans.dns.is_empty());
        assert_eq!(
            got.req.public_key_der,
            rcgen::PublicKeyData::subject_public_key_info(&kp)
        );
    }

    /// The refusal of `p` by CA `m`, checked to be `Denied` with `reason`: its message.
    fn denied(p: &Pcr, m: &CaMeta, reason: &str) -> String {
        let r = prepare(p, m, OffsetDateTime::now_utc()).unwrap_err();
        assert_eq!((r.condition, r.reason), ("Denied", reason), "{}", r.message);
        r.message
    }

    #[test]
    fn stub_request_refusals_name_the_offending_value() {
        let m = meta(opted_in());
        let (csr, spki) = stub_csr("p256");
        let fp = |k: &[u8]| {
            crate::pemutil::hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, k).as_ref())
        };
        let stub = |csr: &[u8], pkix: Option<&[u8]>| {
            stub_pcr("app", "web", "meshca.io/mesh", csr, pkix, UID)
        };
        // A bad signature (the last byte of the signature flipped): no proof of possession.
        let mut bad = csr.clone();
        *bad.last_mut().unwrap() ^= 0x01;
        assert!(
            !CsrInfo::from_der(&bad)
                .expect("still parses")
                .signature_valid
        );
        let msg = denied(&stub(&bad, None), &m, REASON_BAD_REQUEST);
        assert!(
            msg.contains("spec.stubPKCS10Request's signature does not verify")
                && msg.contains(&fp(&spki)),
            "{msg}"
        );
        // pkixPublicKey is another key than the CSR's: both named.
        let (other, _) = key_and_pop("p256", UID);
        let msg = denied(&stub(&csr, Some(&other)), &m, REASON_BAD_REQUEST);
        assert!(
            msg.contains("spec.pkixPublicKey (ecdsa-p256 key SHA-256 ")
                && msg.contains(&fp(&other))
                && msg.contains(&fp(&spki))
                && msg.contains("is not the subject public key of spec.stubPKCS10Request"),
            "{msg}"
        );
        // A key type meshca does not issue for (P-521): UnsupportedKeyType, suggesting one.
        let (csr521, _) = stub_csr("p521");
        let msg = denied(&stub(&csr521, None), &m, REASON_UNSUPPORTED_KEY_TYPE);
        assert!(
            msg.contains("key type ecdsa-p521 of spec.stubPKCS10Request")
                && msg.contains("use keyType ECDSAP256"),
            "{msg}"
        );
        // The CA's policy allows only P-384: the same rules as for pkixPublicKey.
        let p384 = meta(Policy {
            allowed_key_algorithms: vec![KeyAlgorithm::EcdsaP384],
            ..opted_in()
        });
        let msg = denied(&stub(&csr, None), &p384, REASON_UNSUPPORTED_KEY_TYPE);
        assert!(msg.contains("ECDSAP384"), "{msg}");
        // Not a CSR at all, and one over the API's size limit.
        let msg = denied(&stub(b"junk", None), &m, REASON_BAD_REQUEST);
        assert!(
            msg.contains("spec.stubPKCS10Request is not a DER PKCS#10"),
            "{msg}"
        );
        let big = vec![0x30; MAX_KEY_BYTES + 1];
        let msg = denied(&stub(&big, None), &m, REASON_BAD_REQUEST);
        assert!(msg.contains("10241 bytes"), "{msg}");
        // A proofOfPossession beside the stub must verify too.
        let mut p = stub(&csr, None);
        p.spec.proof_of_possession = Some(k8s_openapi::ByteString(b"not a signature".to_vec()));
        let msg = denied(&p, &m, REASON_BAD_REQUEST);
        assert!(
            msg.contains("spec.proofOfPossession does not verify") && msg.contains(UID),
            "{msg}"
        );
    }

    #[test]
    fn a_good_request_gets_its_service_accounts_id_and_a_bounded_lifetime() {
        let m = meta(opted_in());
        for alg in ["p256", "ed25519"] {
            let (spki, pop) = key_and_pop(alg, UID);
            let p = pcr("app", "web", "meshca.io/mesh", &spki, &pop, UID, Some(7200));
            let now = OffsetDateTime::now_utc();
            let got = prepare(&p, &m, now).unwrap();
            assert_eq!(
                got.req.sans.spiffe_id.as_ref().unwrap().to_string(),
                "spiffe://cluster.local/ns/app/sa/web",
                "{alg}"
            );
            assert!(got.req.sans.dns.is_empty() && got.req.sans.ips.is_empty());
            assert_eq!(got.req.public_key_der, spki);
            assert_eq!(
                got.req.ttl,
                Duration::from_secs(7200) - crate::profile::BACKDATE
            );
            assert_eq!(got.sign_at, now + Duration::from_secs(240));
            assert_eq!(got.requester, "system:serviceaccount:app:web");
        }
        // maxExpirationSeconds over the policy: capped at max_ttl.
        let short = meta(Policy {
            max_ttl: Duration::from_secs(2 * 3600),
            ..opted_in()
        });
        let (spki, pop) = key_and_pop("p256", UID);
        let p = pcr(
            "app",
            "web",
            "meshca.io/mesh",
            &spki,
            &pop,
            UID,
            Some(86400),
        );
        assert_eq!(
            prepare(&p, &short, OffsetDateTime::now_utc())
                .unwrap()
                .req
                .ttl,
            Duration::from_secs(7200) - crate::profile::BACKDATE
        );
    }

    #[test]
    fn refusals_name_the_condition_the_reason_and_the_value() {
        let m = meta(opted_in());
        let now = OffsetDateTime::now_utc();
        let (spki, pop) = key_and_pop("p256", UID);
        // P-521: the API server takes it, meshca does not.
        let (k521, pop521) = key_and_pop("p521", UID);
        let (kind, raw) = parse_key(&k521).unwrap();
        assert_eq!(kind, PublicKeyKind::Ecdsa { bits: 521 });
        assert!(verify_proof_of_possession(kind, &raw, UID, &pop521));
        let r = prepare(
            &pcr("app", "web", "meshca.io/mesh", &k521, &pop521, UID, None),
            &m,
            now,
        )
        .unwrap_err();
        assert_eq!(
            (r.condition, r.reason),
            ("Denied", REASON_UNSUPPORTED_KEY_TYPE)
        );
        assert!(
            r.message.contains("key type ecdsa-p521") && r.message.contains("ECDSAP256"),
            "{}",
            r.message
        );
        // The CA's policy allows only P-384: a P-256 key is UnsupportedKeyType, with P-384
        // suggested (through the one decision).
        let p384 = meta(Policy {
            allowed_key_algorithms: vec![KeyAlgorithm::EcdsaP384],
            ..opted_in()
        });
        let r = prepare(
            &pcr("app", "web", "meshca.io/mesh", &spki, &pop, UID, None),
            &p384,
            now,
        )
        .unwrap_err();
        assert_eq!(
            (r.condition, r.reason),
            ("Denied", REASON_UNSUPPORTED_KEY_TYPE)
        );
        assert!(r.message.contains("ECDSAP384"), "{}", r.message);
        // A proof over another pod's UID.
        let r = prepare(
            &pcr(
                "app",
                "web",
                "meshca.io/mesh",
                &spki,
                &pop,
                "another-uid",
                None,
            ),
            &m,
            now,
        )
        .unwrap_err();
        assert_eq!((r.condition, r.reason), ("Denied", REASON_BAD_REQUEST));
        assert!(r.message.contains("another-uid"), "{}", r.message);
        // No key at all (what a request made with pkixPublicKey through v1beta1 looks like
        // through v1): refused, saying so.
        let r = prepare(
            &pcr("app", "web", "meshca.io/mesh", b"", &pop, UID, None),
            &m,
            now,
        )
        .unwrap_err();
        assert_eq!((r.condition, r.reason), ("Denied", REASON_BAD_REQUEST));
        assert!(r.message.contains("stubPKCS10Request"), "{}", r.message);
        // Garbage key.
        let r = prepare(
            &pcr("app", "web", "meshca.io/mesh", b"junk", &pop, UID, None),
            &m,
            now,
        )
        .unwrap_err();
        assert_eq!(r.reason, REASON_BAD_REQUEST);
        // Policy: the CA's rules do not admit this service account's ID.
        let only_prod = meta(Policy {
            allowed_spiffe_ids: vec!["spiffe://{td}/ns/prod/sa/{sa}".into()],
            ..opted_in()
        });
        let r = prepare(
            &pcr("app", "web", "meshca.io/mesh", &spki, &pop, UID, None),
            &only_prod,
            now,
        )
        .unwrap_err();
        assert_eq!((r.condition, r.reason), ("Denied", REASON_POLICY));
        assert!(
            r.message.contains("spiffe://cluster.local/ns/app/sa/web"),
            "{}",
            r.message
        );
        // Unknown user annotations.
        let mut p = pcr("app", "web", "meshca.io/mesh", &spki, &pop, UID, None);
        p.spec.unverified_user_annotations =
            Some([("example.com/ttl".to_string(), "1h".to_string())].into());
        let r = prepare(&p, &m, now).unwrap_err();
        assert_eq!(
            (r.condition, r.reason),
            ("Denied", REASON_INVALID_USER_CONFIG)
        );
        assert!(r.message.contains("example.com/ttl"), "{}", r.message);
        // A CA whose max_ttl is under an hour cannot issue anything acceptable: Failed.
        let tiny = meta(Policy {
            max_ttl: Duration::from_secs(1800),
            default_ttl: Duration::from_secs(1800),
            ..opted_in()
        });
        let r = prepare(
            &pcr("app", "web", "meshca.io/mesh", &spki, &pop, UID, None),
            &tiny,
            now,
        )
        .unwrap_err();
        assert_eq!((r.condition, r.reason), ("Failed", REASON_SIGN_FAILED));
        assert!(r.message.contains("30m"), "{}", r.message);
    }

    #[test]
    fn rsa_and_p384_proofs_made_like_the_kubelets_verify() {
        // Made by openssl (an independent implementation), as Go does: RSA-PSS with SHA-256,
        // MGF1-SHA-256 and the longest salt (rsa.SignPSS with nil options); ECDSA P-384 over
        // SHA-256 (ecdsa.SignASN1 over sha256(podUID)).
        let openssl = "openssl";
        if std::process::Command::new(openssl)
            .arg("version")
            .output()
            .is_err()
        {
            assert!(
                std::env::var("CI").unwrap_or_default().is_empty(),
                "openssl missing under CI"
            );
            eprintln!("skipped: openssl is not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.pem");
        let run = |args: &[&str]| {
            let out = std::process::Command::new(openssl)
                .args(args)
                .current_dir(dir.path())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            out.stdout
        };
        run(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:3072",
            "-out",
            "k.pem",
        ]);
        let spki = run(&["pkey", "-in", "k.pem", "-pubout", "-outform", "DER"]);
        std::fs::write(dir.path().join("uid"), UID).unwrap();
        let sign = |salt: &str| {
            run(&[
                "dgst",
                "-sha256",
                "-sign",
                key.to_str().unwrap(),
                "-sigopt",
                "rsa_padding_mode:pss",
                "-sigopt",
                &format!("rsa_pss_saltlen:{salt}"),
                "-sigopt",
                "rsa_mgf1_md:sha256",
                "uid",
            ])
        };
        let (kind, raw) = parse_key(&spki).unwrap();
        assert_eq!(kind, PublicKeyKind::Rsa { bits: 3072 });
        assert!(verify_proof_of_possession(kind, &raw, UID, &sign("max")));
        assert!(verify_proof_of_possession(kind, &raw, UID, &sign("digest")));
        assert!(!verify_proof_of_possession(
            kind,
            &raw,
            "other",
            &sign("max")
        ));
        // And the whole check accepts it.
        let m = meta(opted_in());
        let p = pcr(
            "app",
            "web",
            "meshca.io/mesh",
            &spki,
            &sign("max"),
            UID,
            None,
        );
        assert!(prepare(&p, &m, OffsetDateTime::now_utc()).is_ok());
        // P-384.
        run(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-384",
            "-out",
            "e.pem",
        ]);
        let spki = run(&["pkey", "-in", "e.pem", "-pubout", "-outform", "DER"]);
        let pop = run(&["dgst", "-sha256", "-sign", "e.pem", "uid"]);
        let (kind, raw) = parse_key(&spki).unwrap();
        assert_eq!(kind, PublicKeyKind::Ecdsa { bits: 384 });
        assert!(verify_proof_of_possession(kind, &raw, UID, &pop));
        assert!(!verify_proof_of_possession(kind, &raw, "other", &pop));
        let p = pcr("app", "web", "meshca.io/mesh", &spki, &pop, UID, None);
        assert!(prepare(&p, &m, OffsetDateTime::now_utc()).is_ok());
    }

    #[test]
    fn status_times_satisfy_the_api_servers_rules() {
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let info = |nb: OffsetDateTime, na: OffsetDateTime| {
            let mut p = rcgen::CertificateParams::new(vec!["a.example".to_string()]).unwrap();
            p.not_before = nb;
            p.not_after = na;
            let k = rcgen::KeyPair::generate().unwrap();
            CertInfo::from_der(p.self_signed(&k).unwrap().der()).unwrap()
        };
        let nb = now - time::Duration::minutes(1);
        let na = nb + time::Duration::hours(2);
        for unit in [0.0, 0.5, 1.0] {
            let t = status_times(&info(nb, na), Some(7200), now, unit).unwrap();
            assert_eq!((t.not_before, t.not_after), (nb, na));
            assert!(t.begin_refresh_at >= nb + time::Duration::hours(1));
            assert!(t.begin_refresh_at <= nb + time::Duration::minutes(72));
            assert_eq!(t.begin_refresh_at.nanosecond(), 0);
        }
        // Over maxExpirationSeconds, under an hour (a CA about to expire), notBefore too old.
        assert!(status_times(&info(nb, na), Some(3600), now, 0.5)
            .unwrap_err()
            .contains("over spec.maxExpirationSeconds 3600"));
        assert!(
            status_times(&info(nb, nb + time::Duration::minutes(59)), None, now, 0.5)
                .unwrap_err()
                .contains("under the 1-hour minimum")
        );
        let old = now - time::Duration::minutes(5);
        assert!(
            status_times(&info(old, old + time::Duration::hours(2)), None, now, 0.5)
                .unwrap_err()
                .contains("not within 5 minutes")
        );
    }
}
