//! Parsed views of certificates and CSRs (x509-parser) and chain verification (rustls-webpki).

use rustls_pki_types::{CertificateDer, UnixTime};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::{Error, Result};
use crate::identity::{DnsName, Sans, SpiffeId};
use crate::key::PublicKeyKind;
use crate::pemutil;

/// Subject alternative names as found, without validation (for display).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawSans {
    /// URI SANs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uri: Vec<String>,
    /// DNS SANs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
    /// IP SANs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip: Vec<String>,
    /// E-mail SANs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub email: Vec<String>,
    /// SANs of the forms meshca neither issues nor checks (otherName, directoryName,
    /// registeredID, x400Address, ediPartyName, unparseable entries), shown as
    /// `form:value`. Their presence makes [`RawSans::to_sans`] fail.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other: Vec<String>,
}

impl RawSans {
    fn push(&mut self, gn: &GeneralName<'_>) {
        match gn {
            GeneralName::URI(u) => self.uri.push(u.to_string()),
            GeneralName::DNSName(d) => self.dns.push(d.to_string()),
            GeneralName::RFC822Name(e) => self.email.push(e.to_string()),
            GeneralName::IPAddress(b) => self.ip.push(match b.len() {
                4 => std::net::IpAddr::from(<[u8; 4]>::try_from(*b).expect("len 4")).to_string(),
                16 => std::net::IpAddr::from(<[u8; 16]>::try_from(*b).expect("len 16")).to_string(),
                _ => format!("<{} bytes>", b.len()),
            }),
            GeneralName::OtherName(oid, _) => self.other.push(format!("otherName:{oid}")),
            GeneralName::DirectoryName(dn) => self.other.push(format!("directoryName:{dn}")),
            GeneralName::RegisteredID(oid) => self.other.push(format!("registeredID:{oid}")),
            other => self.other.push(general_name_form(other).to_string()),
        }
    }

    /// Validates into typed [`Sans`]: at most one URI, which must be a SPIFFE ID.
    pub fn to_sans(&self) -> Result<Sans> {
        if self.uri.len() > 1 {
            return Err(Error::invalid(
                "SANs",
                "more than one URI SAN (an X509-SVID has exactly one)",
            ));
        }
        if let Some(o) = self.other.first() {
            return Err(Error::invalid(
                "SANs",
                format!("SAN {o} is of a form meshca does not issue or check"),
            ));
        }
        if let Some(e) = self.email.first() {
            return Err(Error::invalid(
                "SANs",
                format!("e-mail SAN {e} is not supported"),
            ));
        }
        let mut s = Sans {
            spiffe_id: self.uri.first().map(|u| SpiffeId::parse(u)).transpose()?,
            dns: self
                .dns
                .iter()
                .map(|d| DnsName::parse(d))
                .collect::<Result<_>>()?,
            ips: self
                .ip
                .iter()
                .map(|i| {
                    i.parse()
                        .map_err(|_| Error::invalid("SANs", format!("bad IP SAN {i}")))
                })
                .collect::<Result<_>>()?,
        };
        s.dedup();
        Ok(s)
    }
}

/// The facts of a certificate that meshca shows and checks.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CertInfo {
    /// Subject DN (RFC 4514 style).
    pub subject: String,
    /// Issuer DN.
    pub issuer: String,
    /// Serial number, hex with colons.
    pub serial: String,
    /// notBefore.
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    /// notAfter.
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// basicConstraints CA flag.
    pub is_ca: bool,
    /// basicConstraints pathLen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_len: Option<u8>,
    /// Subject alternative names.
    pub sans: RawSans,
    /// Public key kind.
    pub key: PublicKeyKind,
    /// Signature algorithm name.
    pub signature_algorithm: String,
    /// SHA-256 fingerprint of the DER.
    pub sha256_fingerprint: String,
    /// Subject key identifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_key_id: Option<String>,
    /// Authority key identifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority_key_id: Option<String>,
    /// Key usages by name.
    pub key_usage: Vec<String>,
    /// Extended key usages by name.
    pub extended_key_usage: Vec<String>,
    /// Whether subject == issuer and the signature verifies with its own key.
    pub self_signed: bool,
    /// DER SubjectPublicKeyInfo (not serialized).
    #[serde(skip, default)]
    pub spki_der: Vec<u8>,
    /// DER subject (not serialized), for chain linking.
    #[serde(skip, default)]
    pub subject_der: Vec<u8>,
    /// Subject attributes in order (not serialized), see [`DnAttribute`].
    #[serde(skip, default)]
    pub subject_attributes: Vec<DnAttribute>,
    /// DER issuer (not serialized), for chain linking.
    #[serde(skip, default)]
    pub issuer_der: Vec<u8>,
}

fn parse_cert<'a>(der: &'a [u8]) -> Result<X509Certificate<'a>> {
    let (rest, c) = X509Certificate::from_der(der)
        .map_err(|_| Error::invalid("certificate", "not valid X.509 DER"))?;
    if !rest.is_empty() {
        return Err(Error::invalid(
            "certificate",
            "trailing bytes after the certificate",
        ));
    }
    Ok(c)
}

/// One attribute of a distinguished name: its type (the short name, e.g. `CN`, `O`, `OU`, or
/// else the dotted OID) and its value (`None` when it is not a string).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnAttribute {
    /// The short name (`CN`, `O`, `OU`, ...) or else the dotted OID.
    pub kind: String,
    /// The value as text.
    pub value: Option<String>,
}

fn dn_attributes(name: &x509_parser::x509::X509Name<'_>) -> Vec<DnAttribute> {
    use x509_parser::objects::{oid2abbrev, oid_registry};
    name.iter_attributes()
        .map(|a| DnAttribute {
            kind: oid2abbrev(a.attr_type(), oid_registry())
                .map(str::to_string)
                .unwrap_or_else(|_| a.attr_type().to_id_string()),
            value: a.as_str().ok().map(str::to_string),
        })
        .collect()
}

fn asn1_to_odt(t: x509_parser::time::ASN1Time) -> OffsetDateTime {
    t.to_datetime()
}

impl CertInfo {
    /// Parses DER.
    pub fn from_der(der: &[u8]) -> Result<CertInfo> {
        let c = parse_cert(der)?;
        let mut sans = RawSans::default();
        let mut is_ca = false;
        let mut path_len = None;
        let mut ski = None;
        let mut aki = None;
        let mut ku = Vec::new();
        let mut eku = Vec::new();
        for ext in c.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(s) => {
                    s.general_names.iter().for_each(|g| sans.push(g))
                }
                ParsedExtension::BasicConstraints(bc) => {
                    is_ca = bc.ca;
                    path_len = bc.path_len_constraint.map(|p| p.min(255) as u8);
                }
                ParsedExtension::SubjectKeyIdentifier(k) => ski = Some(pemutil::hex_colon(k.0)),
                ParsedExtension::AuthorityKeyIdentifier(a) => {
                    aki = a.key_identifier.as_ref().map(|k| pemutil::hex_colon(k.0))
                }
                ParsedExtension::KeyUsage(k) => {
                    let names = [
                        (k.digital_signature(), "digitalSignature"),
                        (k.non_repudiation(), "nonRepudiation"),
                        (k.key_encipherment(), "keyEncipherment"),
                        (k.data_encipherment(), "dataEncipherment"),
                        (k.key_agreement(), "keyAgreement"),
                        (k.key_cert_sign(), "keyCertSign"),
                        (k.crl_sign(), "cRLSign"),
                    ];
                    ku = names
                        .iter()
                        .filter(|(b, _)| *b)
                        .map(|(_, n)| n.to_string())
                        .collect();
                }
                ParsedExtension::ExtendedKeyUsage(e) => {
                    let names = [
                        (e.server_auth, "serverAuth"),
                        (e.client_auth, "clientAuth"),
                        (e.code_signing, "codeSigning"),
                        (e.email_protection, "emailProtection"),
                        (e.any, "any"),
                    ];
                    eku = names
                        .iter()
                        .filter(|(b, _)| *b)
                        .map(|(_, n)| n.to_string())
                        .collect();
                }
                _ => {}
            }
        }
        let self_signed =
            c.subject().as_raw() == c.issuer().as_raw() && c.verify_signature(None).is_ok();
        Ok(CertInfo {
            subject: c.subject().to_string(),
            issuer: c.issuer().to_string(),
            serial: pemutil::hex_colon(c.raw_serial()),
            not_before: asn1_to_odt(c.validity().not_before),
            not_after: asn1_to_odt(c.validity().not_after),
            is_ca,
            path_len,
            sans,
            key: PublicKeyKind::of(c.public_key()),
            signature_algorithm: sig_alg_name(&c.signature_algorithm.algorithm),
            sha256_fingerprint: pemutil::fingerprint_sha256(der),
            subject_key_id: ski,
            authority_key_id: aki,
            key_usage: ku,
            extended_key_usage: eku,
            self_signed,
            spki_der: c.public_key().raw.to_vec(),
            subject_der: c.subject().as_raw().to_vec(),
            subject_attributes: dn_attributes(c.subject()),
            issuer_der: c.issuer().as_raw().to_vec(),
        })
    }

    /// The serial number as lower-case hex without separators (the ledger's form).
    pub fn serial_hex(&self) -> String {
        self.serial.replace(':', "").to_ascii_lowercase()
    }
}

fn sig_alg_name(oid: &x509_parser::der_parser::oid::Oid<'_>) -> String {
    use x509_parser::oid_registry as r;
    let known = [
        (r::OID_SIG_ECDSA_WITH_SHA256, "ecdsa-with-SHA256"),
        (r::OID_SIG_ECDSA_WITH_SHA384, "ecdsa-with-SHA384"),
        (r::OID_SIG_ED25519, "ED25519"),
        (r::OID_PKCS1_SHA256WITHRSA, "sha256WithRSAEncryption"),
        (r::OID_PKCS1_SHA384WITHRSA, "sha384WithRSAEncryption"),
        (r::OID_PKCS1_SHA512WITHRSA, "sha512WithRSAEncryption"),
        (r::OID_PKCS1_SHA1WITHRSA, "sha1WithRSAEncryption"),
    ];
    known
        .iter()
        .find(|(o, _)| o == oid)
        .map(|(_, n)| n.to_string())
        .unwrap_or_else(|| oid.to_id_string())
}

/// Checks that each certificate is issued by the next (names link and signatures verify).
pub fn check_chain_order(chain: &[CertificateDer<'_>]) -> Result<()> {
    for (i, pair) in chain.windows(2).enumerate() {
        let child = parse_cert(&pair[0])?;
        let parent = parse_cert(&pair[1])?;
        if child.issuer().as_raw() != parent.subject().as_raw() {
            return Err(Error::Verify(format!(
                "certificate {} ({}) is not issued by certificate {} ({})",
                i + 1,
                child.subject(),
                i + 2,
                parent.subject()
            )));
        }
        child
            .verify_signature(Some(parent.public_key()))
            .map_err(|_| {
                Error::Verify(format!(
                    "signature of certificate {} does not verify with certificate {}",
                    i + 1,
                    i + 2
                ))
            })?;
    }
    Ok(())
}

/// An IP address range of a name constraint: network and mask of one address family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpSubtree {
    /// Network address bytes (4 or 16).
    pub network: Vec<u8>,
    /// Mask bytes, as long as `network`.
    pub mask: Vec<u8>,
}

impl IpSubtree {
    /// Whether `ip` lies in the range (an address of the other family never does).
    pub fn contains(&self, ip: &std::net::IpAddr) -> bool {
        let octets = match ip {
            std::net::IpAddr::V4(v) => v.octets().to_vec(),
            std::net::IpAddr::V6(v) => v.octets().to_vec(),
        };
        octets.len() == self.network.len()
            && octets
                .iter()
                .zip(&self.network)
                .zip(&self.mask)
                .all(|((a, n), m)| a & m == n & m)
    }
}

impl std::fmt::Display for IpSubtree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let addr = |b: &[u8]| match b.len() {
            4 => std::net::IpAddr::from(<[u8; 4]>::try_from(b).expect("len 4")).to_string(),
            16 => std::net::IpAddr::from(<[u8; 16]>::try_from(b).expect("len 16")).to_string(),
            _ => pemutil::hex(b),
        };
        write!(f, "{}/{}", addr(&self.network), addr(&self.mask))
    }
}

/// The name constraints of a CA certificate, in the form meshca evaluates them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NameConstraintSet {
    /// Permitted DNS subtrees, lower-cased, without leading dots.
    pub permitted_dns: Vec<String>,
    /// Excluded DNS subtrees, lower-cased, without leading dots.
    pub excluded_dns: Vec<String>,
    /// Permitted IP ranges.
    pub permitted_ip: Vec<IpSubtree>,
    /// Excluded IP ranges.
    pub excluded_ip: Vec<IpSubtree>,
    /// Constrained name forms meshca does not evaluate (`URI`, `directoryName`, ...).
    pub other_forms: Vec<&'static str>,
}

impl NameConstraintSet {
    /// Whether the certificate carries no name constraint at all.
    pub fn is_empty(&self) -> bool {
        *self == NameConstraintSet::default()
    }
}

fn general_name_form(gn: &GeneralName<'_>) -> &'static str {
    match gn {
        GeneralName::OtherName(..) => "otherName",
        GeneralName::RFC822Name(_) => "rfc822Name",
        GeneralName::DNSName(_) => "dNSName",
        GeneralName::X400Address(_) => "x400Address",
        GeneralName::DirectoryName(_) => "directoryName",
        GeneralName::EDIPartyName(_) => "ediPartyName",
        GeneralName::URI(_) => "uniformResourceIdentifier",
        GeneralName::IPAddress(_) => "iPAddress",
        GeneralName::RegisteredID(_) => "registeredID",
        GeneralName::Invalid(..) => "invalid general name",
    }
}

/// The name constraints of a CA certificate (empty when it has none).
pub fn name_constraints(der: &[u8]) -> Result<NameConstraintSet> {
    let c = parse_cert(der)?;
    let mut set = NameConstraintSet::default();
    for ext in c.extensions() {
        if let ParsedExtension::NameConstraints(nc) = ext.parsed_extension() {
            for (subtrees, permitted) in [
                (&nc.permitted_subtrees, true),
                (&nc.excluded_subtrees, false),
            ] {
                for st in subtrees.iter().flatten() {
                    match &st.base {
                        GeneralName::DNSName(d) => {
                            let d = d.trim_start_matches('.').to_ascii_lowercase();
                            if permitted {
                                set.permitted_dns.push(d)
                            } else {
                                set.excluded_dns.push(d)
                            }
                        }
                        GeneralName::IPAddress(b) if b.len() == 8 || b.len() == 32 => {
                            let (network, mask) = b.split_at(b.len() / 2);
                            let r = IpSubtree {
                                network: network.to_vec(),
                                mask: mask.to_vec(),
                            };
                            if permitted {
                                set.permitted_ip.push(r)
                            } else {
                                set.excluded_ip.push(r)
                            }
                        }
                        other => {
                            let form = general_name_form(other);
                            if !set.other_forms.contains(&form) {
                                set.other_forms.push(form);
                            }
                        }
                    }
                }
            }
        } else if ext.oid == x509_parser::oid_registry::OID_X509_EXT_NAME_CONSTRAINTS {
            // Present but not parseable: nothing issued under it could be checked.
            set.other_forms.push("unparseable name constraints");
        }
    }
    Ok(set)
}

/// Which extended key usage a verification asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// TLS server.
    Server,
    /// TLS client.
    Client,
}

/// Validates `leaf` up to one of `anchors` through `intermediates` at time `at`, with
/// rustls-webpki (the same path building rustls uses for handshakes).
pub fn verify_chain(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    anchors: &[CertificateDer<'_>],
    at: OffsetDateTime,
    usage: Usage,
) -> Result<()> {
    let ee =
        webpki::EndEntityCert::try_from(leaf).map_err(|e| Error::Verify(format!("leaf: {e:?}")))?;
    let tas: Vec<_> = anchors
        .iter()
        .map(|a| webpki::anchor_from_trusted_cert(a).map(|t| t.to_owned()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::Verify(format!("trust anchor: {e:?}")))?;
    let secs = u64::try_from(at.unix_timestamp()).unwrap_or(0);
    let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs));
    let ku = match usage {
        Usage::Server => webpki::KeyUsage::server_auth(),
        Usage::Client => webpki::KeyUsage::client_auth(),
    };
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &tas,
        intermediates,
        time,
        ku,
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| Error::Verify(describe_webpki(&e)))
}

fn describe_webpki(e: &webpki::Error) -> String {
    match e {
        webpki::Error::UnknownIssuer => "no path to a trusted root (unknown issuer)".into(),
        webpki::Error::CertExpired { .. } => "certificate has expired".into(),
        webpki::Error::CertNotValidYet { .. } => "certificate is not valid yet".into(),
        webpki::Error::InvalidSignatureForPublicKey => {
            "a signature in the chain does not verify".into()
        }
        other => format!("{other:?}"),
    }
}

/// The facts of a PKCS#10 CSR.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CsrInfo {
    /// Subject DN.
    pub subject: String,
    /// Requested SANs.
    pub sans: RawSans,
    /// Whether the request asks for CA:TRUE.
    pub wants_ca: bool,
    /// Public key kind.
    pub key: PublicKeyKind,
    /// Whether the self-signature verifies (proof of possession).
    pub signature_valid: bool,
    /// DER SubjectPublicKeyInfo.
    #[serde(skip, default)]
    pub spki_der: Vec<u8>,
    /// The key usages and extended key usages the request asks for, as Kubernetes usage
    /// names (`digital signature`, `client auth`, `code signing`, ...); `None` when it carries
    /// neither extension. Unknown EKUs appear as `extended key usage <oid>`.
    #[serde(skip, default)]
    pub requested_usages: Option<Vec<String>>,
    /// Subject attributes in order (not serialized), see [`DnAttribute`].
    #[serde(skip, default)]
    pub subject_attributes: Vec<DnAttribute>,
}

/// Kubernetes usage names of a KeyUsage extension.
fn key_usage_names(k: &x509_parser::extensions::KeyUsage) -> Vec<String> {
    [
        (k.digital_signature(), "digital signature"),
        (k.non_repudiation(), "content commitment"),
        (k.key_encipherment(), "key encipherment"),
        (k.data_encipherment(), "data encipherment"),
        (k.key_agreement(), "key agreement"),
        (k.key_cert_sign(), "cert sign"),
        (k.crl_sign(), "crl sign"),
        (k.encipher_only(), "encipher only"),
        (k.decipher_only(), "decipher only"),
    ]
    .iter()
    .filter(|(b, _)| *b)
    .map(|(_, n)| n.to_string())
    .collect()
}

/// Kubernetes usage names of an ExtendedKeyUsage extension.
fn eku_names(e: &x509_parser::extensions::ExtendedKeyUsage<'_>) -> Vec<String> {
    let mut v: Vec<String> = [
        (e.any, "any"),
        (e.server_auth, "server auth"),
        (e.client_auth, "client auth"),
        (e.code_signing, "code signing"),
        (e.email_protection, "email protection"),
        (e.time_stamping, "timestamping"),
        (e.ocsp_signing, "ocsp signing"),
    ]
    .iter()
    .filter(|(b, _)| *b)
    .map(|(_, n)| n.to_string())
    .collect();
    v.extend(e.other.iter().map(|o| format!("extended key usage {o}")));
    v
}

impl CsrInfo {
    /// Parses a DER CSR; does not fail on a bad signature (see `signature_valid`).
    pub fn from_der(der: &[u8]) -> Result<CsrInfo> {
        let (rest, csr) = X509CertificationRequest::from_der(der)
            .map_err(|_| Error::Csr("not a valid PKCS#10 certificate request".into()))?;
        if !rest.is_empty() {
            return Err(Error::Csr("trailing bytes after the request".into()));
        }
        let mut sans = RawSans::default();
        let mut wants_ca = false;
        let mut usages: Option<Vec<String>> = None;
        if let Some(exts) = csr.requested_extensions() {
            for ext in exts {
                match ext {
                    ParsedExtension::SubjectAlternativeName(s) => {
                        s.general_names.iter().for_each(|g| sans.push(g))
                    }
                    ParsedExtension::BasicConstraints(bc) => wants_ca |= bc.ca,
                    ParsedExtension::KeyUsage(k) => usages
                        .get_or_insert_with(Vec::new)
                        .extend(key_usage_names(k)),
                    ParsedExtension::ExtendedKeyUsage(e) => {
                        usages.get_or_insert_with(Vec::new).extend(eku_names(e))
                    }
                    _ => {}
                }
            }
        }
        let info = &csr.certification_request_info;
        Ok(CsrInfo {
            subject: info.subject.to_string(),
            sans,
            wants_ca,
            key: PublicKeyKind::of(&info.subject_pki),
            signature_valid: csr.verify_signature().is_ok(),
            spki_der: info.subject_pki.raw.to_vec(),
            requested_usages: usages,
            subject_attributes: dn_attributes(&info.subject),
        })
    }

    /// Parses a PEM CSR (`CERTIFICATE REQUEST` or `NEW CERTIFICATE REQUEST`).
    pub fn from_pem(text: &[u8], source_name: &str) -> Result<CsrInfo> {
        let blocks = pemutil::parse_blocks(text, source_name)?;
        let b = blocks
            .iter()
            .find(|b| b.tag() == "CERTIFICATE REQUEST" || b.tag() == "NEW CERTIFICATE REQUEST")
            .ok_or_else(|| Error::Pem {
                source_name: source_name.to_string(),
                reason: "no CERTIFICATE REQUEST block".into(),
            })?;
        CsrInfo::from_der(b.contents())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{create_root, CaSpec};

    #[test]
    fn chain_order_detects_wrong_order() {
        let now = OffsetDateTime::now_utc();
        let root = create_root(&CaSpec::root("r"), now).unwrap();
        let mut spec = CaSpec::root("i");
        spec.parent = Some("r".into());
        let int = crate::ca::create_intermediate(&spec, &root, now).unwrap();
        check_chain_order(&int.chain()).unwrap();
        let reversed: Vec<_> = int.chain().into_iter().rev().collect();
        assert!(check_chain_order(&reversed).is_err());
    }

    #[test]
    fn name_constraints_are_enforced_at_issuance_and_by_webpki() {
        use crate::issue::LocalIssuer;
        let now = OffsetDateTime::now_utc();
        let mut spec = CaSpec::root("team");
        spec.permitted_dns = vec!["team.example".into()];
        spec.excluded_dns = vec!["secret.team.example".into()];
        let ca = create_root(&spec, now).unwrap();
        let nc = name_constraints(&ca.cert).unwrap();
        assert_eq!(nc.permitted_dns, vec!["team.example".to_string()]);
        assert_eq!(nc.excluded_dns, vec!["secret.team.example".to_string()]);
        let root = ca.cert.clone();
        let issuer = LocalIssuer::new(ca).unwrap();
        let key = crate::key::KeyAlgorithm::EcdsaP256.generate().unwrap();
        let req = |name: &str| crate::ca::tests::dns_request(&key, name);
        let ok = issuer.sign_now(&req("api.team.example"), now).unwrap();
        verify_chain(
            &ok.leaf,
            &[],
            std::slice::from_ref(&root),
            now,
            Usage::Server,
        )
        .unwrap();
        for bad in [
            "api.other.example",
            "x.secret.team.example",
            "team.example.evil",
        ] {
            let e = issuer.sign_now(&req(bad), now).unwrap_err().to_string();
            assert!(e.contains("name constraints"), "{bad}: {e}");
        }
    }

    #[test]
    fn garbage_csr_is_a_csr_error() {
        assert!(matches!(CsrInfo::from_der(b"garbage"), Err(Error::Csr(_))));
        assert!(matches!(
            CsrInfo::from_pem(b"nope", "x"),
            Err(Error::Pem { .. })
        ));
    }
}
