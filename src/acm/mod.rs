//! AWS ACM Private CA support (feature `aws-pca`): client configuration, the per-CA rate
//! limiter, error mapping, and registration or creation of PCA-backed CAs.
//!
//! The issuer itself is [`crate::issue::acm_pca::AcmPcaIssuer`]. A PCA's key never leaves
//! AWS: meshca stores only its certificate and chain (a [`CaMaterial`](crate::ca::CaMaterial)
//! with `key: None` and [`Backend::AcmPca`](crate::ca::Backend::AcmPca)).

pub mod ca;
pub mod client;
pub mod error;
pub mod limiter;

use aws_sdk_acmpca::types::SigningAlgorithm;

use crate::error::{Error, Result};
use crate::key::{KeyAlgorithm, PublicKeyKind};

pub use ca::{create_root_pca, create_subordinate_pca, register_pca, PcaCaSpec};
pub use client::{PcaClient, PcaOptions};
pub use limiter::{LimiterConfig, RateLimiter};

/// A parsed ACM PCA certificate-authority ARN:
/// `arn:<partition>:acm-pca:<region>:<account>:certificate-authority/<id>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arn {
    /// The whole ARN.
    pub arn: String,
    /// `aws`, `aws-cn`, `aws-us-gov`, ...
    pub partition: String,
    /// Region.
    pub region: String,
    /// Account ID.
    pub account: String,
}

impl Arn {
    /// Parses a CA ARN.
    pub fn parse(s: &str) -> Result<Arn> {
        let bad = |why: &str| Error::invalid("ACM PCA ARN", format!("{s:?}: {why}"));
        let parts: Vec<&str> = s.splitn(6, ':').collect();
        if parts.len() != 6 || parts[0] != "arn" {
            return Err(bad(
                "expected arn:<partition>:acm-pca:<region>:<account>:certificate-authority/<id>",
            ));
        }
        if parts[2] != "acm-pca" {
            return Err(bad("not an acm-pca ARN"));
        }
        let ok =
            |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !ok(parts[1]) || !ok(parts[3]) || !ok(parts[4]) {
            return Err(bad("empty or invalid partition, region or account"));
        }
        let id = parts[5]
            .strip_prefix("certificate-authority/")
            .ok_or_else(|| bad("resource must be certificate-authority/<id>"))?;
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(bad("invalid CA id"));
        }
        Ok(Arn {
            arn: s.to_string(),
            partition: parts[1].to_string(),
            region: parts[3].to_string(),
            account: parts[4].to_string(),
        })
    }

    /// The ARN of an AWS-managed certificate template in this partition, e.g.
    /// `EndEntityCertificate/V1`.
    pub fn template(&self, name: &str) -> String {
        format!("arn:{}:acm-pca:::template/{name}", self.partition)
    }
}

/// Template for workload (end-entity) certificates: SANs and subject pass through from the CSR.
pub const TEMPLATE_END_ENTITY: &str = "EndEntityCertificate/V1";
/// Template for end-entity certificates whose SANs are given through the API
/// (when meshca overrides the SANs a CSR asks for).
pub const TEMPLATE_END_ENTITY_API: &str = "EndEntityCertificate_APIPassthrough/V1";
/// Template for a root CA's self-signed certificate.
pub const TEMPLATE_ROOT: &str = "RootCACertificate/V1";

/// Template for a subordinate CA with `path_len` (0 to 3).
pub fn subordinate_template(path_len: u8) -> Result<String> {
    if path_len > 3 {
        return Err(Error::invalid(
            "CA spec",
            "ACM PCA templates allow pathLen 0 to 3",
        ));
    }
    Ok(format!("SubordinateCACertificate_PathLen{path_len}/V1"))
}

/// The signing algorithm a CA with this key uses.
pub fn signing_algorithm_for(key: PublicKeyKind) -> Result<SigningAlgorithm> {
    match key {
        PublicKeyKind::Ecdsa { bits: 256 } => Ok(SigningAlgorithm::Sha256Withecdsa),
        PublicKeyKind::Ecdsa { bits: 384 } => Ok(SigningAlgorithm::Sha384Withecdsa),
        PublicKeyKind::Ecdsa { bits: 521 } => Ok(SigningAlgorithm::Sha512Withecdsa),
        PublicKeyKind::Rsa { .. } => Ok(SigningAlgorithm::Sha256Withrsa),
        other => Err(Error::Unsupported(format!("ACM PCA CA key {other:?}"))),
    }
}

/// The PCA key algorithm for a meshca key algorithm (ACM PCA has no Ed25519 CA keys).
pub fn pca_key_algorithm(alg: KeyAlgorithm) -> Result<aws_sdk_acmpca::types::KeyAlgorithm> {
    use aws_sdk_acmpca::types::KeyAlgorithm as K;
    match alg {
        KeyAlgorithm::EcdsaP256 => Ok(K::EcPrime256v1),
        KeyAlgorithm::EcdsaP384 => Ok(K::EcSecp384r1),
        KeyAlgorithm::Rsa2048 => Ok(K::Rsa2048),
        KeyAlgorithm::Rsa3072 => Ok(K::Rsa3072),
        KeyAlgorithm::Rsa4096 => Ok(K::Rsa4096),
        KeyAlgorithm::Ed25519 => Err(Error::Unsupported("ACM PCA has no Ed25519 CA keys".into())),
    }
}

/// An IssueCertificate idempotency token derived from everything that defines the request.
///
/// The same request (same CA, CSR - which holds the fresh public key -, template, signing
/// algorithm, SANs and TTL) always gives the same token, so a retry within AWS's five-minute
/// window returns the certificate already issued instead of a second one; a different
/// request always gives a different token. Independent of the clock on purpose. The token is
/// 32 lower-case hex characters (AWS allows at most 36 characters).
pub fn idempotency_token(parts: &[&[u8]]) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(b"meshca-pca-token-v1");
    for p in parts {
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p);
    }
    crate::pemutil::hex(&ctx.finish().as_ref()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arns_parse() {
        let a = Arn::parse(
            "arn:aws-cn:acm-pca:cn-north-1:123456789012:certificate-authority/1234-abcd",
        )
        .unwrap();
        assert_eq!(a.region, "cn-north-1");
        assert_eq!(
            a.template(TEMPLATE_END_ENTITY),
            "arn:aws-cn:acm-pca:::template/EndEntityCertificate/V1"
        );
        for bad in [
            "",
            "arn:aws:acm:us-east-1:1:certificate/x",
            "arn:aws:acm-pca:us-east-1:1:certificate-authority/",
            "arn:aws:acm-pca::1:certificate-authority/x",
            "arn:aws:acm-pca:us-east-1:1:certificate-authority/x/certificate/y",
        ] {
            assert!(Arn::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn token_is_deterministic_short_and_distinct() {
        let t1 = idempotency_token(&[b"arn", b"csr1", b"tmpl"]);
        let t2 = idempotency_token(&[b"arn", b"csr1", b"tmpl"]);
        assert_eq!(t1, t2);
        assert_eq!(t1.len(), 32);
        assert!(t1.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(t1, idempotency_token(&[b"arn", b"csr2", b"tmpl"]));
        // Field boundaries matter (length-prefixed).
        assert_ne!(
            idempotency_token(&[b"ab", b"c"]),
            idempotency_token(&[b"a", b"bc"])
        );
    }

    #[test]
    fn algorithms_map() {
        assert_eq!(
            signing_algorithm_for(PublicKeyKind::Ecdsa { bits: 384 }).unwrap(),
            SigningAlgorithm::Sha384Withecdsa
        );
        assert_eq!(
            signing_algorithm_for(PublicKeyKind::Rsa { bits: 2048 }).unwrap(),
            SigningAlgorithm::Sha256Withrsa
        );
        assert!(pca_key_algorithm(KeyAlgorithm::Ed25519).is_err());
        assert!(subordinate_template(4).is_err());
        assert_eq!(
            subordinate_template(0).unwrap(),
            "SubordinateCACertificate_PathLen0/V1"
        );
    }
}
