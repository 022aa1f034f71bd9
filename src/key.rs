//! Key algorithms and private keys.

use std::fmt;
use std::str::FromStr;

use rcgen::{KeyPair, PublicKeyData, RsaKeySize, SignatureAlgorithm};
use serde::{Deserialize, Serialize};
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::error::{Error, Result};

/// The smallest RSA modulus meshca accepts anywhere.
pub const MIN_RSA_BITS: usize = 2048;

/// A key algorithm for CAs and workloads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum KeyAlgorithm {
    /// ECDSA on P-256 with SHA-256 (the default).
    #[default]
    EcdsaP256,
    /// ECDSA on P-384 with SHA-384.
    EcdsaP384,
    /// Ed25519.
    Ed25519,
    /// RSA 2048 with PKCS#1 v1.5 SHA-256 signatures.
    Rsa2048,
    /// RSA 3072.
    Rsa3072,
    /// RSA 4096.
    Rsa4096,
}

impl KeyAlgorithm {
    /// Every supported algorithm, in the order shown to users.
    pub const ALL: [KeyAlgorithm; 6] = [
        KeyAlgorithm::EcdsaP256,
        KeyAlgorithm::EcdsaP384,
        KeyAlgorithm::Ed25519,
        KeyAlgorithm::Rsa2048,
        KeyAlgorithm::Rsa3072,
        KeyAlgorithm::Rsa4096,
    ];

    /// The name used on the command line and in files.
    pub fn name(self) -> &'static str {
        match self {
            KeyAlgorithm::EcdsaP256 => "ecdsa-p256",
            KeyAlgorithm::EcdsaP384 => "ecdsa-p384",
            KeyAlgorithm::Ed25519 => "ed25519",
            KeyAlgorithm::Rsa2048 => "rsa-2048",
            KeyAlgorithm::Rsa3072 => "rsa-3072",
            KeyAlgorithm::Rsa4096 => "rsa-4096",
        }
    }

    /// Whether this is an RSA algorithm.
    pub fn is_rsa(self) -> bool {
        matches!(
            self,
            KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096
        )
    }

    /// The rcgen signature algorithm a key of this kind signs with.
    pub fn signature_algorithm(self) -> &'static SignatureAlgorithm {
        match self {
            KeyAlgorithm::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyAlgorithm::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyAlgorithm::Ed25519 => &rcgen::PKCS_ED25519,
            _ => &rcgen::PKCS_RSA_SHA256,
        }
    }

    /// Generates a fresh private key.
    ///
    /// ECDSA keys are generated with one scalar multiplication and kept as PKCS#8; the
    /// signing key pair is only parsed when the key is first used to sign (a workload key
    /// issued by a local CA never is). Other algorithms go through rcgen.
    pub fn generate(self) -> Result<PrivateKey> {
        if let Some(k) = self.generate_ecdsa() {
            return Ok(k);
        }
        let kp = match self {
            KeyAlgorithm::Rsa2048 => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_2048)
            }
            KeyAlgorithm::Rsa3072 => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_3072)
            }
            KeyAlgorithm::Rsa4096 => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_4096)
            }
            other => KeyPair::generate_for(other.signature_algorithm()),
        }
        .map_err(|e| Error::Build(format!("generating a {} key: {e}", self.name())))?;
        Ok(PrivateKey::from_key_pair(kp, self))
    }

    /// ECDSA key generation without rcgen's PKCS#8 round trip (which re-derives and checks
    /// the public key, a second scalar multiplication): aws-lc generates the key once and
    /// hands out the PKCS#8 document and the public point. The SubjectPublicKeyInfo is
    /// encoded by rcgen from that point (aws-lc's own encoder converts the point to affine
    /// coordinates again, a field inversion per call). `None` for other algorithms, or when
    /// aws-lc fails (then rcgen is used).
    fn generate_ecdsa(self) -> Option<PrivateKey> {
        use aws_lc_rs::signature::{
            EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_ASN1_SIGNING,
            ECDSA_P384_SHA384_ASN1_SIGNING,
        };
        let alg = match self {
            KeyAlgorithm::EcdsaP256 => &ECDSA_P256_SHA256_ASN1_SIGNING,
            KeyAlgorithm::EcdsaP384 => &ECDSA_P384_SHA384_ASN1_SIGNING,
            _ => return None,
        };
        let kp = EcdsaKeyPair::generate(alg).ok()?;
        let pkcs8 = zeroize::Zeroizing::new(kp.to_pkcs8v1().ok()?.as_ref().to_vec());
        let public = KnownPublicKey {
            alg: self.signature_algorithm(),
            raw: kp.public_key().as_ref().to_vec(),
        };
        Some(PrivateKey {
            pair: std::sync::OnceLock::new(),
            spki: public.subject_public_key_info(),
            public_raw: public.raw,
            pkcs8,
            algorithm: self,
        })
    }
}

/// A public key of a kind meshca knows: its signature algorithm and the bytes of the
/// SubjectPublicKeyInfo BIT STRING. rcgen encodes the SubjectPublicKeyInfo from it.
pub(crate) struct KnownPublicKey {
    pub(crate) alg: &'static SignatureAlgorithm,
    pub(crate) raw: Vec<u8>,
}

impl PublicKeyData for KnownPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KeyAlgorithm {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let norm = s.to_ascii_lowercase().replace('_', "-");
        match norm.as_str() {
            "ecdsa-p256" | "p256" | "ec-p256" | "ecdsa" => Ok(KeyAlgorithm::EcdsaP256),
            "ecdsa-p384" | "p384" | "ec-p384" => Ok(KeyAlgorithm::EcdsaP384),
            "ed25519" => Ok(KeyAlgorithm::Ed25519),
            "rsa-2048" | "rsa" => Ok(KeyAlgorithm::Rsa2048),
            "rsa-3072" => Ok(KeyAlgorithm::Rsa3072),
            "rsa-4096" => Ok(KeyAlgorithm::Rsa4096),
            _ => {
                if let Some(bits) = norm
                    .strip_prefix("rsa-")
                    .and_then(|b| b.parse::<usize>().ok())
                {
                    if bits < MIN_RSA_BITS {
                        return Err(Error::invalid(
                            "key algorithm",
                            format!("RSA keys under {MIN_RSA_BITS} bits are refused (got {bits})"),
                        ));
                    }
                }
                Err(Error::invalid(
                    "key algorithm",
                    format!(
                        "{s:?}; expected one of {}",
                        KeyAlgorithm::ALL.map(|a| a.name()).join(", ")
                    ),
                ))
            }
        }
    }
}

impl TryFrom<String> for KeyAlgorithm {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<KeyAlgorithm> for String {
    fn from(k: KeyAlgorithm) -> String {
        k.name().to_string()
    }
}

/// The kind and size of a public key, as found in a certificate or CSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum PublicKeyKind {
    /// ECDSA on the named curve.
    Ecdsa {
        /// Curve size in bits (256, 384, 521).
        bits: usize,
    },
    /// Ed25519.
    Ed25519,
    /// RSA with a modulus of `bits` bits.
    Rsa {
        /// Modulus size.
        bits: usize,
    },
    /// Something meshca does not issue for.
    Other,
}

impl PublicKeyKind {
    /// Classifies a parsed SubjectPublicKeyInfo.
    pub fn of(spki: &SubjectPublicKeyInfo<'_>) -> PublicKeyKind {
        match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => PublicKeyKind::Rsa {
                bits: rsa.key_size(),
            },
            Ok(PublicKey::EC(ec)) => PublicKeyKind::Ecdsa {
                // x509-parser sizes the point's coordinates in whole bytes: 528 for P-521.
                bits: match ec.key_size() {
                    528 => 521,
                    b => b,
                },
            },
            _ if spki.algorithm.algorithm == x509_parser::oid_registry::OID_SIG_ED25519 => {
                PublicKeyKind::Ed25519
            }
            _ => PublicKeyKind::Other,
        }
    }

    /// The matching [`KeyAlgorithm`], if meshca supports it.
    pub fn algorithm(self) -> Option<KeyAlgorithm> {
        match self {
            PublicKeyKind::Ecdsa { bits: 256 } => Some(KeyAlgorithm::EcdsaP256),
            PublicKeyKind::Ecdsa { bits: 384 } => Some(KeyAlgorithm::EcdsaP384),
            PublicKeyKind::Ed25519 => Some(KeyAlgorithm::Ed25519),
            PublicKeyKind::Rsa { bits: 2048 } => Some(KeyAlgorithm::Rsa2048),
            PublicKeyKind::Rsa { bits: 3072 } => Some(KeyAlgorithm::Rsa3072),
            PublicKeyKind::Rsa { bits: 4096 } => Some(KeyAlgorithm::Rsa4096),
            _ => None,
        }
    }
}

impl fmt::Display for PublicKeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublicKeyKind::Ecdsa { bits } => write!(f, "ecdsa-p{bits}"),
            PublicKeyKind::Ed25519 => f.write_str("ed25519"),
            PublicKeyKind::Rsa { bits } => write!(f, "rsa-{bits}"),
            PublicKeyKind::Other => f.write_str("unsupported"),
        }
    }
}

/// A private key held in memory. `Debug` never shows key material and the PKCS#8 bytes are
/// only reachable through [`PrivateKey::to_pkcs8_pem`].
pub struct PrivateKey {
    /// The rcgen key pair used for signing; parsed from `pkcs8` on first use for keys
    /// generated by [`KeyAlgorithm::generate`].
    pair: std::sync::OnceLock<KeyPair>,
    /// PKCS#8 DER (zeroized on drop).
    pkcs8: zeroize::Zeroizing<Vec<u8>>,
    /// DER SubjectPublicKeyInfo.
    spki: Vec<u8>,
    /// The public key as it appears in the SPKI BIT STRING.
    public_raw: Vec<u8>,
    algorithm: KeyAlgorithm,
}

impl PrivateKey {
    fn from_key_pair(kp: KeyPair, algorithm: KeyAlgorithm) -> PrivateKey {
        PrivateKey {
            pkcs8: zeroize::Zeroizing::new(kp.serialize_der()),
            spki: kp.subject_public_key_info(),
            public_raw: kp.der_bytes().to_vec(),
            pair: std::sync::OnceLock::from(kp),
            algorithm,
        }
    }

    /// Parses a PEM private key (PKCS#8, SEC1 or PKCS#1). Errors never echo the input.
    pub fn from_pem(pem_text: &str, source_name: &str) -> Result<Self> {
        let kp = KeyPair::from_pem(pem_text).map_err(|_| Error::Pem {
            source_name: source_name.to_string(),
            reason: "not a readable private key (expected PKCS#8, SEC1 or PKCS#1 PEM)".into(),
        })?;
        let spki_der = kp.subject_public_key_info();
        let (_, spki) =
            <SubjectPublicKeyInfo as x509_parser::prelude::FromDer<_>>::from_der(&spki_der)
                .map_err(|_| Error::Pem {
                    source_name: source_name.to_string(),
                    reason: "private key has an unreadable public half".into(),
                })?;
        let kind = PublicKeyKind::of(&spki);
        if let PublicKeyKind::Rsa { bits } = kind {
            if bits < MIN_RSA_BITS {
                return Err(Error::invalid(
                    "key",
                    format!("{source_name}: RSA key of {bits} bits is under the {MIN_RSA_BITS}-bit minimum"),
                ));
            }
        }
        let algorithm = kind.algorithm().ok_or_else(|| {
            Error::invalid("key", format!("{source_name}: unsupported key type {kind}"))
        })?;
        Ok(PrivateKey::from_key_pair(kp, algorithm))
    }

    /// The algorithm of this key.
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// The key as PKCS#8 PEM. The caller is responsible for writing it with mode 0600.
    pub fn to_pkcs8_pem(&self) -> zeroize::Zeroizing<String> {
        let mut text = zeroize::Zeroizing::new(String::new());
        crate::pemutil::encode_block("PRIVATE KEY", &self.pkcs8, &mut text);
        text
    }

    /// The DER SubjectPublicKeyInfo of the public half.
    pub fn public_key_der(&self) -> Vec<u8> {
        self.spki.clone()
    }

    /// The public key bytes as carried in the SubjectPublicKeyInfo BIT STRING.
    pub(crate) fn public_key_raw(&self) -> &[u8] {
        &self.public_raw
    }

    /// The rcgen key pair, for signing (parsed from PKCS#8 on first use).
    pub(crate) fn key_pair(&self) -> Result<&KeyPair> {
        if let Some(kp) = self.pair.get() {
            return Ok(kp);
        }
        let kp = KeyPair::from_pkcs8_der_and_sign_algo(
            &rustls_pki_types::PrivatePkcs8KeyDer::from(self.pkcs8.as_slice()),
            self.algorithm.signature_algorithm(),
        )
        .map_err(|e| Error::Build(format!("loading a {} key: {e}", self.algorithm)))?;
        Ok(self.pair.get_or_init(|| kp))
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey")
            .field("algorithm", &self.algorithm)
            .field("material", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_rsa_minimum() {
        for a in KeyAlgorithm::ALL {
            assert_eq!(a.name().parse::<KeyAlgorithm>().unwrap(), a);
        }
        let e = "rsa-1024".parse::<KeyAlgorithm>().unwrap_err().to_string();
        assert!(e.contains("under 2048"), "{e}");
        assert!("dsa".parse::<KeyAlgorithm>().is_err());
    }

    #[test]
    fn generated_keys_reload_with_the_same_algorithm_and_debug_is_redacted() {
        for a in [
            KeyAlgorithm::EcdsaP256,
            KeyAlgorithm::EcdsaP384,
            KeyAlgorithm::Ed25519,
            KeyAlgorithm::Rsa2048,
        ] {
            let k = a.generate().unwrap();
            let pem = k.to_pkcs8_pem();
            let back = PrivateKey::from_pem(&pem, "test").unwrap();
            assert_eq!(back.algorithm(), a);
            assert_eq!(back.public_key_der(), k.public_key_der());
            let dbg = format!("{k:?}");
            assert!(dbg.contains("redacted"));
            let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
            assert!(!dbg.contains(&body[..20]));
        }
    }

    #[test]
    fn fast_ecdsa_keys_match_rcgen_and_sign_after_lazy_parse() {
        for a in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::EcdsaP384] {
            let k = a.generate().unwrap();
            assert!(
                k.pair.get().is_none(),
                "{a}: generated keys are parsed lazily"
            );
            let parsed = KeyPair::from_pem(&k.to_pkcs8_pem()).unwrap();
            assert_eq!(parsed.subject_public_key_info(), k.public_key_der(), "{a}");
            assert_eq!(parsed.der_bytes(), k.public_key_raw(), "{a}");
            assert_eq!(parsed.algorithm(), a.signature_algorithm(), "{a}");
            // Signing parses the key once; the signature verifies with the public key.
            let msg = b"meshca";
            let sig = rcgen::SigningKey::sign(k.key_pair().unwrap(), msg).unwrap();
            assert!(k.pair.get().is_some());
            let spki_der = k.public_key_der();
            let (_, spki) =
                <SubjectPublicKeyInfo as x509_parser::prelude::FromDer<_>>::from_der(&spki_der)
                    .unwrap();
            let sig_alg = match a {
                KeyAlgorithm::EcdsaP256 => x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256,
                _ => x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA384,
            };
            x509_parser::verify::verify_signature(
                &spki,
                &x509_parser::x509::AlgorithmIdentifier::new(sig_alg, None),
                &x509_parser::der_parser::asn1_rs::BitString::new(0, &sig),
                msg,
            )
            .unwrap();
        }
    }

    /// aws-lc's CPU-jitter entropy source costs ~30 ms of CPU at the first random number of
    /// every process; meshca builds aws-lc to seed from the OS instead
    /// (`AWS_LC_SYS_NO_JITTER_ENTROPY=1` in .cargo/config.toml, docs/performance.md).
    #[test]
    #[cfg(not(feature = "fips"))]
    fn aws_lc_seeds_from_the_os() {
        let mut b = [0u8; 16];
        aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut b).unwrap();
        assert!(
            aws_lc_rs::try_fips_cpu_jitter_entropy().is_err(),
            "aws-lc was built with CPU-jitter entropy: build with AWS_LC_SYS_NO_JITTER_ENTROPY=1"
        );
    }

    /// The `fips` feature links aws-lc's FIPS module: it runs in FIPS mode, with its
    /// validated entropy source.
    #[test]
    #[cfg(feature = "fips")]
    fn fips_builds_run_the_fips_module() {
        aws_lc_rs::try_fips_mode().expect("aws-lc in FIPS mode");
        let k = KeyAlgorithm::EcdsaP256.generate().unwrap();
        assert!(!k.public_key_der().is_empty());
    }

    #[test]
    fn garbage_key_error_does_not_echo_input() {
        let e = PrivateKey::from_pem(
            "-----BEGIN PRIVATE KEY-----\nc2VjcmV0c2VjcmV0\n-----END PRIVATE KEY-----\n",
            "k.pem",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("k.pem:"), "{e}");
        assert!(!e.contains("c2VjcmV0"));
    }
}
