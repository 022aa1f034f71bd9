//! Certificate profiles: pure builders of rcgen parameters for CAs and workloads.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, KeyUsagePurpose, NameConstraints, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::error::{Error, Result};
use crate::identity::{Sans, TrustDomain};
use crate::key::PublicKeyKind;
use crate::policy::Ekus;

/// How far notBefore is set back to absorb clock skew between hosts.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// A fresh 128-bit positive random serial number.
pub fn random_serial() -> Result<SerialNumber> {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut b)
        .map_err(|_| Error::Build("system random number generator failed".into()))?;
    b[0] &= 0x7f; // positive
    b[0] |= 0x40; // keep all 16 bytes significant
    Ok(SerialNumber::from_slice(&b))
}

/// The parameters of a workload (X509-SVID compatible) certificate.
///
/// `CA:FALSE`, digitalSignature (+ keyEncipherment for RSA keys), the granted EKUs (by
/// default serverAuth and clientAuth), SKI and AKI, a random serial, notBefore backdated by
/// [`BACKDATE`].
pub fn workload_params(
    sans: &Sans,
    trust_domain: &TrustDomain,
    key: PublicKeyKind,
    ekus: Ekus,
    now: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams> {
    let mut p = CertificateParams::default();
    p.not_before = now - BACKDATE;
    p.not_after = not_after;
    p.serial_number = Some(random_serial()?);
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    if matches!(key, PublicKeyKind::Rsa { .. }) {
        p.key_usages.push(KeyUsagePurpose::KeyEncipherment);
    }
    p.extended_key_usages = Vec::new();
    if ekus.server_auth {
        p.extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    if ekus.client_auth {
        p.extended_key_usages
            .push(ExtendedKeyUsagePurpose::ClientAuth);
    }
    if p.extended_key_usages.is_empty() {
        return Err(Error::Build(
            "a workload certificate needs an extended key usage".into(),
        ));
    }
    p.use_authority_key_identifier_extension = true;
    p.distinguished_name = workload_subject(sans, trust_domain);
    p.subject_alt_names = san_list(sans)?;
    Ok(p)
}

/// Subject of a workload certificate: `O=<trust domain>` and, when it fits in 64 characters,
/// `CN=` the first DNS name or else the SPIFFE ID.
pub fn workload_subject(sans: &Sans, trust_domain: &TrustDomain) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain.as_str());
    let cn = sans
        .dns
        .first()
        .map(|d| d.to_string())
        .or_else(|| sans.spiffe_id.as_ref().map(|i| i.to_string()))
        .or_else(|| sans.ips.first().map(|i| i.to_string()));
    if let Some(cn) = cn.filter(|c| c.len() <= 64) {
        dn.push(DnType::CommonName, cn);
    }
    dn
}

/// rcgen SANs in the order URI, DNS, IP.
pub fn san_list(sans: &Sans) -> Result<Vec<SanType>> {
    let mut out = Vec::new();
    if let Some(id) = &sans.spiffe_id {
        out.push(SanType::URI(id.to_string().try_into().map_err(|_| {
            Error::invalid("SPIFFE ID", "not representable as IA5String")
        })?));
    }
    for d in &sans.dns {
        out.push(SanType::DnsName(d.as_str().try_into().map_err(|_| {
            Error::invalid("DNS name", "not representable as IA5String")
        })?));
    }
    for ip in &sans.ips {
        out.push(SanType::IpAddress(*ip));
    }
    Ok(out)
}

/// Subject fields of a CA.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CaSubject {
    /// Common name (defaults to "meshca <name> CA").
    pub common_name: Option<String>,
    /// Organization.
    pub organization: Option<String>,
    /// Organizational unit.
    pub organizational_unit: Option<String>,
}

/// The parameters of a CA certificate: `CA:TRUE` with a path length, keyCertSign + cRLSign,
/// SKI (and AKI for intermediates), optional DNS name constraints.
pub fn ca_params(
    spec: &crate::ca::CaSpec,
    path_len: Option<u8>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    intermediate: bool,
) -> Result<CertificateParams> {
    let (name, subject) = (&spec.name, &spec.subject);
    let (permitted_dns, excluded_dns) = (&spec.permitted_dns, &spec.excluded_dns);
    let mut p = CertificateParams::default();
    p.not_before = not_before;
    p.not_after = not_after;
    p.serial_number = Some(random_serial()?);
    p.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.use_authority_key_identifier_extension = intermediate;
    let mut dn = DistinguishedName::new();
    if let Some(o) = &subject.organization {
        dn.push(DnType::OrganizationName, o.as_str());
    }
    if let Some(ou) = &subject.organizational_unit {
        dn.push(DnType::OrganizationalUnitName, ou.as_str());
    }
    let cn = subject
        .common_name
        .clone()
        .unwrap_or_else(|| format!("meshca {name} CA"));
    if cn.is_empty() || cn.len() > 64 {
        return Err(Error::invalid(
            "CA subject",
            "common name must be 1 to 64 characters",
        ));
    }
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    if !permitted_dns.is_empty() || !excluded_dns.is_empty() {
        let sub = |v: &Vec<String>| -> Result<Vec<GeneralSubtree>> {
            v.iter()
                .map(|d| {
                    let d = d.trim_start_matches('.');
                    crate::identity::DnsName::parse(d)?;
                    Ok(GeneralSubtree::DnsName(d.to_string()))
                })
                .collect()
        };
        p.name_constraints = Some(NameConstraints {
            permitted_subtrees: sub(permitted_dns)?,
            excluded_subtrees: sub(excluded_dns)?,
        });
    }
    Ok(p)
}
