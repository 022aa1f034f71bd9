//! Summaries of PEM files (certificates, chains, CSRs, bundles) for `meshca inspect`.

use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::Result;
use crate::pemutil;
use crate::x509::{self, CertInfo, CsrInfo, Usage};

/// One PEM object of an inspected file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Object {
    /// An X.509 certificate.
    Certificate {
        /// Parsed facts.
        #[serde(flatten)]
        info: Box<CertInfo>,
        /// Seconds until notAfter (negative when expired).
        seconds_left: i64,
    },
    /// A PKCS#10 request.
    CertificateRequest(Box<CsrInfo>),
    /// A private key: only its presence and label are reported, never its content.
    PrivateKey {
        /// The PEM label.
        label: String,
    },
    /// Another PEM block.
    Other {
        /// The PEM label.
        label: String,
    },
}

/// Whether a sequence of certificates is a proper chain (each issued by the next).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChainOrder {
    /// Whether the order links up.
    pub ordered: bool,
    /// What is wrong, when not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// The result of verifying a chain against a bundle.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Verification {
    /// Bundle source (file or bundle name).
    pub bundle: String,
    /// Whether the first certificate validates to an anchor for TLS server use.
    pub valid_for_server: bool,
    /// Whether it validates for TLS client use.
    pub valid_for_client: bool,
    /// The verification error, when neither is valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Everything `meshca inspect` prints.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Inspection {
    /// The inspected source.
    pub source: String,
    /// Objects in file order.
    pub objects: Vec<Object>,
    /// Chain order of the certificates (when there are two or more).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<ChainOrder>,
    /// Verification against `--bundle`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<Verification>,
}

/// Inspects PEM text. Private keys are reported by label only.
pub fn inspect(text: &[u8], source: &str, now: OffsetDateTime) -> Result<Inspection> {
    let blocks = pemutil::parse_blocks(text, source)?;
    let mut objects = Vec::new();
    let mut certs: Vec<CertificateDer<'static>> = Vec::new();
    for b in blocks {
        let tag = b.tag().to_string();
        match tag.as_str() {
            "CERTIFICATE" => {
                let info = CertInfo::from_der(b.contents()).map_err(|_| crate::Error::Pem {
                    source_name: source.to_string(),
                    reason: format!("certificate {} is not valid X.509 DER", certs.len() + 1),
                })?;
                let seconds_left = (info.not_after - now).whole_seconds();
                objects.push(Object::Certificate {
                    info: Box::new(info),
                    seconds_left,
                });
                certs.push(CertificateDer::from(b.into_contents()));
            }
            "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST" => objects.push(
                Object::CertificateRequest(Box::new(CsrInfo::from_der(b.contents())?)),
            ),
            l if l.ends_with("PRIVATE KEY") => objects.push(Object::PrivateKey { label: tag }),
            _ => objects.push(Object::Other { label: tag }),
        }
    }
    let chain = (certs.len() >= 2).then(|| match x509::check_chain_order(&certs) {
        Ok(()) => ChainOrder {
            ordered: true,
            problem: None,
        },
        Err(e) => ChainOrder {
            ordered: false,
            problem: Some(e.to_string()),
        },
    });
    Ok(Inspection {
        source: source.to_string(),
        objects,
        chain,
        verification: None,
    })
}

/// Verifies the first certificate of `chain` (the rest are intermediates) against `anchors`.
pub fn verify(
    chain: &[CertificateDer<'static>],
    anchors: &[CertificateDer<'static>],
    bundle: &str,
    now: OffsetDateTime,
) -> Verification {
    let Some((leaf, rest)) = chain.split_first() else {
        return Verification {
            bundle: bundle.to_string(),
            valid_for_server: false,
            valid_for_client: false,
            error: Some("no certificate to verify".into()),
        };
    };
    // Self-signed roots in the presented chain are not intermediates.
    let inter: Vec<_> = rest
        .iter()
        .filter(|c| {
            !CertInfo::from_der(c)
                .map(|i| i.self_signed)
                .unwrap_or(false)
        })
        .cloned()
        .collect();
    let s = x509::verify_chain(leaf, &inter, anchors, now, Usage::Server);
    let c = x509::verify_chain(leaf, &inter, anchors, now, Usage::Client);
    let error = match (&s, &c) {
        (Err(e), Err(_)) => Some(e.to_string()),
        _ => None,
    };
    Verification {
        bundle: bundle.to_string(),
        valid_for_server: s.is_ok(),
        valid_for_client: c.is_ok(),
        error,
    }
}
