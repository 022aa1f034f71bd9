//! The ACM Private CA issuer: the workload key stays local, only a CSR goes to AWS, and the
//! CA key never leaves AWS.
//!
//! AWS copies a CSR's subject and SAN extension into the certificate, so before any call a
//! CSR is refused when its SANs hold a form meshca does not check (otherName, directoryName,
//! registeredID, x400Address, ediPartyName, e-mail) or its subject holds anything but a `CN`
//! equal to a checked SAN and an `O` equal to the trust domain ([`check_subject`]); the
//! names must also pass the name constraints of every CA on the chain.
//!
//! Every certificate AWS returns is checked before it is handed out: it must carry the
//! requested public key and exactly the requested SANs (no other form, no duplicate) and a
//! subject that passes the same check, must not be a CA, must not outlive the requested
//! validity, and must chain to the PCA certificate meshca has registered.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_acmpca::types::{ApiPassthrough, Extensions, GeneralName, SigningAlgorithm};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use super::{IssuedCert, Issuer, SignRequest};
use crate::acm::client::{IssueParams, PcaClient, PcaOptions};
use crate::acm::limiter::{limiter_for, RateLimiter};
use crate::acm::{
    idempotency_token, signing_algorithm_for, Arn, TEMPLATE_END_ENTITY, TEMPLATE_END_ENTITY_API,
};
use crate::ca::{Backend, CaMaterial, CaMeta, ChainConstraints};
use crate::error::{Error, Result};
use crate::identity::Sans;
use crate::pemutil;
use crate::profile;
use crate::x509::{check_chain_order, verify_chain, CertInfo, CsrInfo, Usage};

/// How much later than requested a returned notAfter may be, and how far in the future a
/// notBefore may be (clock skew between meshca and AWS); anything beyond is refused.
pub const NOT_AFTER_TOLERANCE: Duration = Duration::from_secs(5 * 60);

/// An [`Issuer`] that signs through an ACM Private CA.
pub struct AcmPcaIssuer {
    ca: CaMaterial,
    arn: Arn,
    ca_not_after: OffsetDateTime,
    signing: SigningAlgorithm,
    client: Arc<PcaClient>,
    limiter: Arc<RateLimiter>,
    constraints: ChainConstraints,
}

impl std::fmt::Debug for AcmPcaIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmPcaIssuer")
            .field("ca", &self.ca.meta.name)
            .field("arn", &self.arn.arn)
            .finish()
    }
}

/// What one IssueCertificate call will ask for; pure, so tests can inspect it.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedIssue {
    /// Template ARN.
    pub template_arn: String,
    /// SANs given through the API (when they differ from the CSR's, or the CSR's subject is
    /// empty), else `None`.
    pub passthrough_sans: Option<Sans>,
    /// The SAN extension goes through the API as a critical custom extension: the CSR's
    /// subject is empty, so the certificate's will be too, and RFC 5280 (4.2.1.6), which AWS
    /// Private CA enforces, then wants the SAN extension critical. ztunnel's CSRs are like
    /// that (istio#56191).
    pub critical_san: bool,
    /// notBefore.
    pub not_before: OffsetDateTime,
    /// notAfter (capped at the CA's notAfter).
    pub not_after: OffsetDateTime,
    /// The idempotency token.
    pub token: String,
}

impl AcmPcaIssuer {
    /// Connects to AWS for the registered PCA `ca` (backend [`Backend::AcmPca`]). `opts`
    /// supplies the limiter and retry settings; a region or endpoint set in `opts` overrides
    /// the one stored with the CA (e.g. `--aws-endpoint` at issue time).
    pub async fn connect(ca: CaMaterial, opts: &PcaOptions) -> Result<Self> {
        let (arn, region, endpoint) = match &ca.meta.backend {
            Backend::AcmPca {
                arn,
                region,
                endpoint,
            } => (Arn::parse(arn)?, region.clone(), endpoint.clone()),
            other => {
                return Err(Error::Unsupported(format!(
                    "CA {} has backend {other:?}, not acm-pca",
                    ca.meta.name
                )))
            }
        };
        let opts = PcaOptions {
            region: opts.region.clone().or(region),
            endpoint: opts.endpoint.clone().or(endpoint),
            ..opts.clone()
        };
        let client = Arc::new(PcaClient::connect(Some(&arn), &opts).await?);
        Self::with_client(ca, client)
    }

    /// Wraps `ca` with an existing client (shared by several CAs in one process).
    pub fn with_client(ca: CaMaterial, client: Arc<PcaClient>) -> Result<Self> {
        let arn = match &ca.meta.backend {
            Backend::AcmPca { arn, .. } => Arn::parse(arn)?,
            other => {
                return Err(Error::Unsupported(format!(
                    "CA {} has backend {other:?}, not acm-pca",
                    ca.meta.name
                )))
            }
        };
        if ca.key.is_some() {
            return Err(Error::Corrupt(format!(
                "CA {}: an ACM PCA CA must not have a local key",
                ca.meta.name
            )));
        }
        let info = ca.info()?;
        let signing = signing_algorithm_for(info.key)?;
        let limiter = limiter_for(&arn.arn, &client.options().limiter)?;
        let constraints = ChainConstraints::of_chain(&ca.meta.name, &ca.chain())?;
        Ok(AcmPcaIssuer {
            constraints,
            ca_not_after: info.not_after,
            ca,
            arn,
            signing,
            client,
            limiter,
        })
    }

    /// The registered CA.
    pub fn ca(&self) -> &CaMaterial {
        &self.ca
    }

    /// The client (for call counters).
    pub fn client(&self) -> &PcaClient {
        &self.client
    }

    /// Plans the IssueCertificate call for `req` at `now`: template, validity, token.
    pub fn plan(
        &self,
        req: &SignRequest,
        csr_der: &[u8],
        now: OffsetDateTime,
    ) -> Result<PlannedIssue> {
        let csr = CsrInfo::from_der(csr_der)?;
        if !csr.signature_valid {
            return Err(Error::Csr(
                "signature does not verify with the request's own key".into(),
            ));
        }
        if csr.spki_der != req.public_key_der {
            return Err(Error::Csr(
                "the CSR's key is not the key being certified".into(),
            ));
        }
        // AWS copies the CSR's subject and SAN extension into the certificate: everything in
        // them must be something meshca has checked.
        let deny = |reason: String| Error::PolicyDenied {
            ca: self.ca.meta.name.clone(),
            reason,
        };
        let csr_sans = csr.sans.to_sans().map_err(|e| {
            deny(format!(
                "the CSR's SAN extension, which ACM PCA would copy, is refused: {e}"
            ))
        })?;
        check_subject(
            &csr.subject_attributes,
            &req.sans,
            &self.ca.meta.trust_domain,
        )
        .map_err(|e| deny(format!("CSR subject, which ACM PCA would copy: {e}")))?;
        self.constraints.check_sans(&req.sans).map_err(deny)?;
        let same = sans_key(&csr_sans) == sans_key(&req.sans);
        let critical_san = csr.subject_attributes.is_empty();
        let (template, passthrough_sans) = if same && !critical_san {
            (TEMPLATE_END_ENTITY, None)
        } else {
            (TEMPLATE_END_ENTITY_API, Some(req.sans.clone()))
        };
        let template_arn = self.arn.template(template);
        let sans = sans_key(&req.sans).join(",");
        let token = idempotency_token(&[
            self.arn.arn.as_bytes(),
            csr_der,
            template_arn.as_bytes(),
            self.signing.as_str().as_bytes(),
            sans.as_bytes(),
            &req.ttl.as_secs().to_be_bytes(),
            &[u8::from(critical_san)],
        ]);
        Ok(PlannedIssue {
            template_arn,
            passthrough_sans,
            critical_san,
            not_before: now - profile::BACKDATE,
            not_after: (now + req.ttl).min(self.ca_not_after),
            token,
        })
    }

    /// Checks a certificate returned for `req` and builds the [`IssuedCert`].
    pub fn check_issued(
        &self,
        req: &SignRequest,
        leaf: CertificateDer<'static>,
        requested_not_after: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<IssuedCert> {
        verify_issued(&self.ca, req, leaf, requested_not_after, now)
    }
}

/// Checks the subject a certificate will carry (or carries). Only what meshca can check
/// against the request may appear: `CN` equal to one of the checked SANs (a DNS name, the
/// SPIFFE ID or an IP address) and `O` equal to the CA's trust domain, each at most once.
/// Any other attribute (OU, C, serialNumber, emailAddress, DC, UID, ...) is refused.
pub fn check_subject(
    attrs: &[crate::x509::DnAttribute],
    sans: &Sans,
    trust_domain: &crate::identity::TrustDomain,
) -> Result<(), String> {
    let san_values: Vec<String> = sans
        .spiffe_id
        .iter()
        .map(|i| i.to_string())
        .chain(sans.dns.iter().map(|d| d.to_string()))
        .chain(sans.ips.iter().map(|i| i.to_string()))
        .collect();
    let mut seen = Vec::new();
    for a in attrs {
        let value = a
            .value
            .as_deref()
            .ok_or_else(|| format!("attribute {} does not hold a string", a.kind))?;
        let ok = match a.kind.as_str() {
            "CN" => san_values.iter().any(|v| v == value),
            "O" => value == trust_domain.as_str(),
            other => {
                return Err(format!(
                    "attribute {other}={} cannot be checked (only CN and O can)",
                    crate::escape::Escaped(value)
                ))
            }
        };
        if !ok {
            return Err(format!(
                "{}={} is neither one of the checked SANs (CN) nor the trust domain {trust_domain} (O)",
                a.kind,
                crate::escape::Escaped(value)
            ));
        }
        if seen.contains(&a.kind) {
            return Err(format!("attribute {} appears more than once", a.kind));
        }
        seen.push(a.kind.clone());
    }
    Ok(())
}

/// Canonical, order-independent form of SANs for comparison.
fn sans_key(s: &Sans) -> Vec<String> {
    let mut v = s.display_list();
    v.sort();
    v.dedup();
    v
}

/// The OID of the subjectAltName extension.
const SAN_OID: &str = "2.5.29.17";

/// The DER value of a subjectAltName extension (GeneralNames) holding `sans`: the SPIFFE ID
/// as uniformResourceIdentifier \[6\], DNS names as dNSName \[2\], IPs as iPAddress \[7\].
pub fn san_extension_der(sans: &Sans) -> Vec<u8> {
    use yasna::Tag;
    yasna::construct_der(|w| {
        w.write_sequence(|w| {
            if let Some(id) = &sans.spiffe_id {
                w.next().write_tagged_implicit(Tag::context(6), |w| {
                    w.write_ia5_string(&id.to_string())
                });
            }
            for d in &sans.dns {
                w.next()
                    .write_tagged_implicit(Tag::context(2), |w| w.write_ia5_string(d.as_str()));
            }
            for ip in &sans.ips {
                let bytes = match ip {
                    std::net::IpAddr::V4(v) => v.octets().to_vec(),
                    std::net::IpAddr::V6(v) => v.octets().to_vec(),
                };
                w.next()
                    .write_tagged_implicit(Tag::context(7), |w| w.write_bytes(&bytes));
            }
        })
    })
}

/// The APIPassthrough extensions for `sans`: the SAN extension as a critical custom extension
/// when `critical` (AWS's SubjectAlternativeNames field has no critical flag), else the
/// SubjectAlternativeNames field.
pub fn passthrough(sans: &Sans, critical: bool) -> Result<ApiPassthrough> {
    if critical {
        use base64::Engine;
        let ext = aws_sdk_acmpca::types::CustomExtension::builder()
            .object_identifier(SAN_OID)
            .value(base64::engine::general_purpose::STANDARD.encode(san_extension_der(sans)))
            .critical(true)
            .build()
            .map_err(|e| Error::Build(format!("ACM PCA custom extension: {e}")))?;
        return Ok(ApiPassthrough::builder()
            .extensions(Extensions::builder().custom_extensions(ext).build())
            .build());
    }
    let mut names = Vec::new();
    if let Some(id) = &sans.spiffe_id {
        names.push(
            GeneralName::builder()
                .uniform_resource_identifier(id.to_string())
                .build(),
        );
    }
    for d in &sans.dns {
        names.push(GeneralName::builder().dns_name(d.as_str()).build());
    }
    for ip in &sans.ips {
        names.push(GeneralName::builder().ip_address(ip.to_string()).build());
    }
    Ok(ApiPassthrough::builder()
        .extensions(
            Extensions::builder()
                .set_subject_alternative_names(Some(names))
                .build(),
        )
        .build())
}

fn mismatch(ca: &CaMaterial, what: String) -> Error {
    Error::Backend {
        backend: "acm-pca",
        message: format!(
            "certificate returned by CA {} refused: {what}",
            ca.meta.name
        ),
        retryable: false,
    }
}

/// Checks that `leaf` is what `req` asked for and chains to the registered PCA `ca`.
pub fn verify_issued(
    ca: &CaMaterial,
    req: &SignRequest,
    leaf: CertificateDer<'static>,
    requested_not_after: OffsetDateTime,
    now: OffsetDateTime,
) -> Result<IssuedCert> {
    let info = CertInfo::from_der(&leaf)?;
    if info.spki_der != req.public_key_der {
        return Err(mismatch(
            ca,
            "it does not carry the requested public key".into(),
        ));
    }
    if info.is_ca {
        return Err(mismatch(ca, "it is a CA certificate".into()));
    }
    // Exactly the checked SANs: no other form, no duplicate, nothing missing.
    let got = info
        .sans
        .to_sans()
        .map_err(|e| mismatch(ca, format!("its SANs are not valid: {e}")))?;
    let raw_count = info.sans.uri.len() + info.sans.dns.len() + info.sans.ip.len();
    if sans_key(&got) != sans_key(&req.sans) || raw_count != sans_key(&got).len() {
        let mut raw: Vec<String> = info.sans.uri.iter().map(|u| format!("URI:{u}")).collect();
        raw.extend(info.sans.dns.iter().map(|d| format!("DNS:{d}")));
        raw.extend(info.sans.ip.iter().map(|i| format!("IP:{i}")));
        raw.sort();
        return Err(mismatch(
            ca,
            format!(
                "SANs [{}] differ from the requested [{}]",
                raw.join(", "),
                sans_key(&req.sans).join(", ")
            ),
        ));
    }
    check_subject(&info.subject_attributes, &req.sans, &ca.meta.trust_domain)
        .map_err(|e| mismatch(ca, format!("its subject is not what was checked: {e}")))?;
    if info.not_after > requested_not_after + NOT_AFTER_TOLERANCE {
        return Err(mismatch(
            ca,
            format!(
                "validity not honoured: notAfter {} is later than the requested {}",
                info.not_after, requested_not_after
            ),
        ));
    }
    let mut chain = vec![leaf.clone()];
    chain.extend(ca.chain());
    check_chain_order(&chain).map_err(|e| {
        mismatch(
            ca,
            format!("it is not signed by the registered CA certificate: {e}"),
        )
    })?;
    // A notBefore slightly ahead of our clock is skew between meshca and AWS, not an error;
    // verify the chain at the moment the certificate became valid in that case.
    if info.not_before > now + NOT_AFTER_TOLERANCE {
        return Err(mismatch(
            ca,
            format!("notBefore {} is in the future", info.not_before),
        ));
    }
    let at = now.max(info.not_before);
    let intermediates = ca.leaf_chain_tail();
    verify_chain(
        &leaf,
        &intermediates,
        &[ca.root().clone()],
        at,
        Usage::Server,
    )
    .map_err(|e| mismatch(ca, e.to_string()))?;
    Ok(IssuedCert {
        leaf,
        intermediates,
        root: ca.root().clone(),
        info,
    })
}

#[async_trait]
impl Issuer for AcmPcaIssuer {
    fn meta(&self) -> &CaMeta {
        &self.ca.meta
    }

    async fn sign(&self, req: &SignRequest, now: OffsetDateTime) -> Result<IssuedCert> {
        let csr_der = req.csr_der.as_deref().ok_or_else(|| {
            Error::Unsupported(format!(
                "CA {} (ACM PCA) signs CSRs only; the request carries no CSR",
                self.ca.meta.name
            ))
        })?;
        if req.ekus != crate::policy::Ekus::default() {
            // The PCA's end-entity template sets serverAuth and clientAuth.
            return Err(Error::Unsupported(format!(
                "CA {} (ACM PCA) issues serverAuth and clientAuth together; a request for only {} cannot be honoured",
                self.ca.meta.name,
                req.ekus.names().join(", ")
            )));
        }
        if now >= self.ca_not_after {
            return Err(Error::Build(format!(
                "CA {} expired at {}",
                self.ca.meta.name, self.ca_not_after
            )));
        }
        let plan = self.plan(req, csr_der, now)?;
        let passthrough = plan
            .passthrough_sans
            .as_ref()
            .map(|s| passthrough(s, plan.critical_san))
            .transpose()?;
        let a = self.arn.arn.as_str();
        let cert_arn = self
            .client
            .issue_certificate(
                &IssueParams {
                    ca_arn: a,
                    csr_der,
                    template_arn: plan.template_arn.clone(),
                    signing: self.signing.clone(),
                    not_before: plan.not_before,
                    not_after: plan.not_after,
                    token: plan.token.clone(),
                    passthrough,
                },
                &self.limiter,
            )
            .await?;
        let (cert_pem, _chain) = self.client.get_certificate(a, &cert_arn).await?;
        let leaf = pemutil::parse_certs(cert_pem.as_bytes(), "GetCertificate")?
            .into_iter()
            .next()
            .ok_or_else(|| mismatch(&self.ca, "GetCertificate returned no certificate".into()))?;
        tracing::debug!(ca = %self.ca.meta.name, cert_arn, "ACM PCA issued a certificate");
        verify_issued(&self.ca, req, leaf, plan.not_after, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{create_root, CaSpec};
    use crate::identity::{DnsName, SpiffeId, TrustDomain};
    use crate::issue::LocalIssuer;
    use crate::key::{KeyAlgorithm, PublicKeyKind};

    fn req_for(key: &crate::key::PrivateKey, sans: &Sans, ttl: Duration) -> SignRequest {
        SignRequest {
            public_key_der: key.public_key_der(),
            key: PublicKeyKind::Ecdsa { bits: 256 },
            sans: sans.clone(),
            ttl,
            csr_der: None,
            ekus: crate::policy::Ekus::default(),
        }
    }

    fn sans() -> Sans {
        Sans {
            spiffe_id: Some(
                SpiffeId::for_service_account(&TrustDomain::default(), "ns", "sa").unwrap(),
            ),
            dns: vec![DnsName::parse("svc.ns.svc").unwrap()],
            ips: vec!["10.0.0.1".parse().unwrap()],
        }
    }

    /// The critical SAN sent for an empty-subject CSR (istio#56191) is the same DER as the SAN
    /// extension rcgen writes for the same names, and goes out as a critical custom extension.
    #[test]
    fn critical_san_passthrough_matches_rcgens_encoding() {
        use base64::Engine;
        let want = sans();
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = crate::profile::san_list(&want).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.der()).unwrap();
        let rcgen_san = parsed
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == SAN_OID)
            .unwrap()
            .value
            .to_vec();
        assert_eq!(san_extension_der(&want), rcgen_san);

        let pt = passthrough(&want, true).unwrap();
        let ext = pt.extensions().unwrap();
        assert!(ext.subject_alternative_names().is_empty());
        let [custom] = ext.custom_extensions() else {
            panic!("{:?}", ext.custom_extensions())
        };
        assert_eq!(custom.object_identifier(), SAN_OID);
        assert_eq!(custom.critical(), Some(true));
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(custom.value())
                .unwrap(),
            rcgen_san
        );
        // Not critical: the plain SubjectAlternativeNames field, no custom extension.
        let pt = passthrough(&want, false).unwrap();
        let ext = pt.extensions().unwrap();
        assert_eq!(ext.subject_alternative_names().len(), 3);
        assert!(ext.custom_extensions().is_empty());
    }

    /// `verify_issued` against a local CA playing the PCA: right, wrong key, wrong SANs,
    /// too long, wrong CA.
    #[test]
    fn returned_certificates_are_checked() {
        let now = OffsetDateTime::now_utc();
        let ca = create_root(&CaSpec::root("p"), now).unwrap();
        let ca_copy = CaMaterial {
            meta: ca.meta.clone(),
            cert: ca.cert.clone(),
            parents: Vec::new(),
            key: None,
        };
        let local = LocalIssuer::new(ca).unwrap();
        let key = KeyAlgorithm::EcdsaP256.generate().unwrap();
        let ttl = Duration::from_secs(3600);
        let req = req_for(&key, &sans(), ttl);
        let good = local.sign_now(&req, now).unwrap();
        verify_issued(&ca_copy, &req, good.leaf.clone(), now + ttl, now).unwrap();

        // Too long: notAfter later than asked.
        let e = verify_issued(
            &ca_copy,
            &req,
            good.leaf.clone(),
            now + Duration::from_secs(60),
            now,
        )
        .unwrap_err();
        assert!(e.to_string().contains("validity not honoured"), "{e}");

        // Other key.
        let other = KeyAlgorithm::EcdsaP256.generate().unwrap();
        let e = verify_issued(
            &ca_copy,
            &req_for(&other, &sans(), ttl),
            good.leaf.clone(),
            now + ttl,
            now,
        )
        .unwrap_err();
        assert!(e.to_string().contains("public key"), "{e}");

        // SANs differ.
        let mut fewer = sans();
        fewer.ips.clear();
        let e = verify_issued(
            &ca_copy,
            &req_for(&key, &fewer, ttl),
            good.leaf.clone(),
            now + ttl,
            now,
        )
        .unwrap_err();
        assert!(e.to_string().contains("SANs"), "{e}");

        // Signed by a different CA.
        let stranger = LocalIssuer::new(create_root(&CaSpec::root("s"), now).unwrap()).unwrap();
        let bad = stranger.sign_now(&req, now).unwrap();
        let e = verify_issued(&ca_copy, &req, bad.leaf, now + ttl, now).unwrap_err();
        assert!(
            e.to_string().contains("not signed by the registered CA"),
            "{e}"
        );
    }
}
