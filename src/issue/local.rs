//! The local CA: signs with a key held in the meshca store.

use async_trait::async_trait;
use rcgen::{PublicKeyData, SignatureAlgorithm, SigningKey};
use time::OffsetDateTime;

use super::{IssuedCert, Issuer, SignRequest};
use crate::ca::{CaMaterial, CaMeta, ChainConstraints};
use crate::error::{Error, Result};
use crate::identity::{Sans, TrustDomain};
use crate::key::PrivateKey;
use crate::profile;
use crate::x509::CertInfo;

/// An [`Issuer`] backed by a CA whose key meshca holds.
pub struct LocalIssuer {
    ca: CaMaterial,
    not_after: OffsetDateTime,
    /// Name constraints of every CA on the chain, from this CA up to the root.
    constraints: ChainConstraints,
    issuer: rcgen::Issuer<'static, KeyRef>,
}

/// The CA key, shared with the rcgen issuer without exposing it.
struct KeyRef(std::sync::Arc<PrivateKey>);

impl PublicKeyData for KeyRef {
    fn der_bytes(&self) -> &[u8] {
        self.0.public_key_raw()
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.0.algorithm().signature_algorithm()
    }
}

impl SigningKey for KeyRef {
    fn sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, rcgen::Error> {
        self.0
            .key_pair()
            .map_err(|_| rcgen::Error::CouldNotParseKeyPair)?
            .sign(msg)
    }
}

impl std::fmt::Debug for LocalIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalIssuer")
            .field("ca", &self.ca.meta.name)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl LocalIssuer {
    /// Wraps a loaded CA. Fails when the CA has no local key.
    pub fn new(mut ca: CaMaterial) -> Result<Self> {
        let key = ca.key.take().ok_or_else(|| {
            Error::Unsupported(format!(
                "CA {} has no local key (backend {:?})",
                ca.meta.name, ca.meta.backend
            ))
        })?;
        let info = ca.info()?;
        // Parse the signing key now, so a bad key fails here rather than at the first sign.
        key.key_pair()?;
        let issuer = rcgen::Issuer::from_ca_cert_der(&ca.cert, KeyRef(std::sync::Arc::new(key)))?;
        let constraints = ChainConstraints::of_chain(&ca.meta.name, &ca.chain())?;
        Ok(LocalIssuer {
            not_after: info.not_after,
            constraints,
            ca,
            issuer,
        })
    }

    /// The CA behind this issuer (its key has moved into the issuer).
    pub fn ca(&self) -> &CaMaterial {
        &self.ca
    }
}

/// A subject public key for rcgen, from DER SubjectPublicKeyInfo.
enum SubjectKey {
    /// Parsed once with x509-parser; re-encodes to exactly the input bytes.
    Known(crate::key::KnownPublicKey),
    /// Anything else, as rcgen parses it.
    Rcgen(rcgen::SubjectPublicKeyInfo),
}

impl PublicKeyData for SubjectKey {
    fn der_bytes(&self) -> &[u8] {
        match self {
            SubjectKey::Known(k) => k.der_bytes(),
            SubjectKey::Rcgen(k) => k.der_bytes(),
        }
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        match self {
            SubjectKey::Known(k) => k.algorithm(),
            SubjectKey::Rcgen(k) => k.algorithm(),
        }
    }
}

/// Wraps DER SPKI bytes for rcgen. Keys of the kinds meshca issues for take a single parse
/// (rcgen's own parser tries every algorithm it knows, which showed in profiles); the result
/// must re-encode to exactly `der`, else rcgen's parser decides.
fn spki(der: &[u8]) -> Result<SubjectKey> {
    use x509_parser::prelude::FromDer;
    if let Ok(([], parsed)) = x509_parser::x509::SubjectPublicKeyInfo::from_der(der) {
        if let Some(alg) = crate::key::PublicKeyKind::of(&parsed).algorithm() {
            let key = SubjectKey::Known(crate::key::KnownPublicKey {
                alg: alg.signature_algorithm(),
                raw: parsed.subject_public_key.data.to_vec(),
            });
            if key.subject_public_key_info() == der {
                return Ok(key);
            }
        }
    }
    rcgen::SubjectPublicKeyInfo::from_der(der)
        .map(SubjectKey::Rcgen)
        .map_err(|e| Error::Build(format!("public key: {e}")))
}

/// A CSR for `key` carrying `sans` (for backends that sign CSRs).
pub fn csr_for(key: &PrivateKey, sans: &Sans, td: &TrustDomain) -> Result<Vec<u8>> {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = profile::workload_subject(sans, td);
    p.subject_alt_names = profile::san_list(sans)?;
    Ok(p.serialize_request(key.key_pair()?)?.der().to_vec())
}

#[async_trait]
impl Issuer for LocalIssuer {
    fn meta(&self) -> &CaMeta {
        &self.ca.meta
    }

    async fn sign(&self, req: &SignRequest, now: OffsetDateTime) -> Result<IssuedCert> {
        self.sign_now(req, now)
    }

    fn ca_certificate(&self) -> Option<&rustls_pki_types::CertificateDer<'static>> {
        Some(&self.ca.cert)
    }
}

impl LocalIssuer {
    /// Synchronous signing (the local CA does no I/O).
    pub fn sign_now(&self, req: &SignRequest, now: OffsetDateTime) -> Result<IssuedCert> {
        if now >= self.not_after {
            return Err(Error::Build(format!(
                "CA {} expired at {}",
                self.ca.meta.name, self.not_after
            )));
        }
        // Never issue a certificate that the name constraints of any CA on its chain make
        // invalid.
        self.constraints
            .check_sans(&req.sans)
            .map_err(|reason| Error::PolicyDenied {
                ca: self.ca.meta.name.clone(),
                reason,
            })?;
        // A leaf never outlives its CA.
        let not_after = (now + req.ttl).min(self.not_after);
        let params = profile::workload_params(
            &req.sans,
            &self.ca.meta.trust_domain,
            req.key,
            req.ekus,
            now,
            not_after,
        )?;
        let cert = params.signed_by(&spki(&req.public_key_der)?, &self.issuer)?;
        let leaf = cert.der().clone();
        let info = CertInfo::from_der(&leaf)?;
        Ok(IssuedCert {
            leaf,
            intermediates: self.ca.leaf_chain_tail(),
            root: self.ca.root().clone(),
            info,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyAlgorithm;

    #[test]
    fn subject_keys_take_the_single_parse_path_and_match_rcgen() {
        for a in [
            KeyAlgorithm::EcdsaP256,
            KeyAlgorithm::EcdsaP384,
            KeyAlgorithm::Ed25519,
            KeyAlgorithm::Rsa2048,
        ] {
            let der = a.generate().unwrap().public_key_der();
            let k = spki(&der).unwrap();
            assert!(matches!(k, SubjectKey::Known(_)), "{a}");
            let r = rcgen::SubjectPublicKeyInfo::from_der(&der).unwrap();
            assert_eq!(k.der_bytes(), r.der_bytes(), "{a}");
            assert_eq!(
                k.subject_public_key_info(),
                r.subject_public_key_info(),
                "{a}"
            );
        }
        // Trailing bytes and garbage are refused.
        let mut der = KeyAlgorithm::EcdsaP256.generate().unwrap().public_key_der();
        der.push(0);
        assert!(spki(&der).is_err());
        assert!(spki(b"garbage").is_err());
    }
}
