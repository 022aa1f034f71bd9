//! Revocation: the stored record of a revoked certificate and X.509 v2 CRLs built with
//! rcgen's [`rcgen::CertificateRevocationListParams`].

use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ca::CaMaterial;
use crate::error::{Error, Result};

/// Default time from a CRL's thisUpdate to its nextUpdate.
pub const DEFAULT_CRL_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);

/// Why a certificate was revoked (RFC 5280 CRLReason).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// No reason given.
    #[default]
    Unspecified,
    /// The certificate's key was compromised.
    KeyCompromise,
    /// The CA's key was compromised.
    CaCompromise,
    /// The subject's affiliation changed.
    AffiliationChanged,
    /// Replaced by another certificate.
    Superseded,
    /// No longer needed.
    CessationOfOperation,
    /// Temporarily on hold.
    CertificateHold,
    /// A privilege was withdrawn.
    PrivilegeWithdrawn,
}

impl std::str::FromStr for Reason {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|_| {
            Error::invalid(
                "revocation reason",
                format!("{s:?}: use unspecified, key-compromise, ca-compromise, affiliation-changed, superseded, cessation-of-operation, certificate-hold or privilege-withdrawn"),
            )
        })
    }
}

impl Reason {
    fn rcgen(self) -> rcgen::RevocationReason {
        use rcgen::RevocationReason as R;
        match self {
            Reason::Unspecified => R::Unspecified,
            Reason::KeyCompromise => R::KeyCompromise,
            Reason::CaCompromise => R::CaCompromise,
            Reason::AffiliationChanged => R::AffiliationChanged,
            Reason::Superseded => R::Superseded,
            Reason::CessationOfOperation => R::CessationOfOperation,
            Reason::CertificateHold => R::CertificateHold,
            Reason::PrivilegeWithdrawn => R::PrivilegeWithdrawn,
        }
    }
}

/// A revoked certificate, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revocation {
    /// Serial, lower-case hex without separators (the ledger's form).
    pub serial: String,
    /// The CA that issued it.
    pub ca: String,
    /// Why.
    pub reason: Reason,
    /// When meshca recorded the revocation.
    #[serde(with = "time::serde::rfc3339")]
    pub revoked_at: OffsetDateTime,
}

/// A serial number in the ledger's form: lower-case hex, no separators, no leading zeros
/// (so `00:AB` and `ab` are the same serial).
pub fn normalize_serial(s: &str) -> Result<String> {
    let hex: String = s
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if hex.is_empty() || hex.len() > 40 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Error::invalid(
            "serial",
            format!("{s:?}: expected up to 20 bytes of hex, optionally colon-separated"),
        ));
    }
    let t = hex.trim_start_matches('0');
    Ok(if t.is_empty() {
        "0".into()
    } else {
        t.to_string()
    })
}

fn serial_bytes(normalized: &str) -> Result<Vec<u8>> {
    let padded = if normalized.len() % 2 == 1 {
        format!("0{normalized}")
    } else {
        normalized.to_string()
    };
    (0..padded.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&padded[i..i + 2], 16)
                .map_err(|_| Error::invalid("serial", normalized.to_string()))
        })
        .collect()
}

/// Builds an X.509 v2 CRL (DER) signed by `ca`, listing `revoked` (entries of other CAs are
/// ignored), with thisUpdate `now`, nextUpdate `now + validity` and CRL number `number`.
pub fn build(
    ca: &CaMaterial,
    revoked: &[Revocation],
    now: OffsetDateTime,
    validity: Duration,
    number: u64,
) -> Result<Vec<u8>> {
    let key = ca.key.as_ref().ok_or_else(|| {
        Error::Unsupported(format!(
            "CA {} keeps its key in {:?}; meshca signs CRLs only with keys it holds",
            ca.meta.name, ca.meta.backend
        ))
    })?;
    let mut revoked_certs = Vec::new();
    for r in revoked.iter().filter(|r| r.ca == ca.meta.name) {
        revoked_certs.push(rcgen::RevokedCertParams {
            serial_number: rcgen::SerialNumber::from_slice(&serial_bytes(&normalize_serial(
                &r.serial,
            )?)?),
            revocation_time: r.revoked_at,
            reason_code: Some(r.reason.rcgen()),
            invalidity_date: None,
        });
    }
    let params = rcgen::CertificateRevocationListParams {
        this_update: now,
        next_update: now + validity,
        crl_number: rcgen::SerialNumber::from_slice(&number.to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    let issuer = rcgen::Issuer::from_ca_cert_der(&ca.cert, key.key_pair()?)?;
    let crl = params.signed_by(&issuer)?;
    Ok(crl.der().to_vec())
}

/// PEM (`X509 CRL`) of a DER CRL.
pub fn to_pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("X509 CRL", der.to_vec()))
}

/// A CRL number that grows with time (milliseconds since the epoch), so successive CRLs of
/// a CA carry increasing numbers without a stored counter.
pub fn crl_number(now: OffsetDateTime) -> u64 {
    u64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{create_root, CaSpec};

    #[test]
    fn serials_normalize_and_reasons_parse() {
        assert_eq!(normalize_serial("00:AB:0c").unwrap(), "ab0c");
        assert_eq!(normalize_serial("ab0c").unwrap(), "ab0c");
        assert!(normalize_serial("xyz").is_err());
        assert!(normalize_serial("").is_err());
        assert_eq!(
            "key-compromise".parse::<Reason>().unwrap(),
            Reason::KeyCompromise
        );
        assert!("bogus"
            .parse::<Reason>()
            .unwrap_err()
            .to_string()
            .contains("\"bogus\""));
        assert_eq!(serial_bytes("abc").unwrap(), vec![0x0a, 0xbc]);
    }

    #[test]
    fn crl_lists_only_this_cas_revocations() {
        let now = OffsetDateTime::now_utc();
        let ca = create_root(&CaSpec::root("ca1"), now).unwrap();
        let r = |ca: &str, s: &str| Revocation {
            serial: s.into(),
            ca: ca.into(),
            reason: Reason::KeyCompromise,
            revoked_at: now,
        };
        let der = build(
            &ca,
            &[r("ca1", "0a1b"), r("ca2", "ff")],
            now,
            DEFAULT_CRL_VALIDITY,
            7,
        )
        .unwrap();
        let (_, crl) = x509_parser::parse_x509_crl(&der).unwrap();
        let serials: Vec<_> = crl
            .iter_revoked_certificates()
            .map(|c| c.raw_serial_as_string())
            .collect();
        assert_eq!(serials, ["0a:1b"]);
        assert!(crl.next_update().is_some());
        assert_eq!(crl.crl_number().map(|n| n.to_string()), Some("7".into()));
    }
}
