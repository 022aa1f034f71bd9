//! Registering an existing ACM PCA under a meshca name, and creating root or subordinate
//! PCAs that meshca then registers.

use std::sync::Arc;

use aws_sdk_acmpca::primitives::Blob;
use aws_sdk_acmpca::types::{
    Asn1Subject, CertificateAuthorityConfiguration, CertificateAuthorityStatus,
    CertificateAuthorityType, Tag,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use super::client::{IssueParams, PcaClient, PcaOptions};
use super::limiter::limiter_for;
use super::{
    idempotency_token, pca_key_algorithm, signing_algorithm_for, subordinate_template, Arn,
    TEMPLATE_ROOT,
};
use crate::ca::{
    validate_ca_name, Backend, CaMaterial, CaMeta, CaSpec, DEFAULT_INTERMEDIATE_VALIDITY,
    DEFAULT_ROOT_VALIDITY,
};
use crate::error::{Error, Result};
use crate::identity::TrustDomain;
use crate::pemutil;
use crate::policy::Policy;
use crate::profile;
use crate::x509::{CertInfo, CsrInfo};

/// What [`register_pca`] records about the CA besides its certificates.
#[derive(Clone, Debug, Default)]
pub struct PcaCaSpec {
    /// SPIFFE trust domain of the workloads the CA signs (default `cluster.local`).
    pub trust_domain: Option<TrustDomain>,
    /// Issuance policy enforced by meshca before any AWS call.
    pub policy: Policy,
    /// The meshca parent CA's name, if the PCA is a subordinate of one.
    pub parent: Option<String>,
}

fn backend_err(message: String) -> Error {
    Error::Backend {
        backend: "acm-pca",
        message,
        retryable: false,
    }
}

/// Orders `chain` (certificates above `cert`, any order) nearest first, ending at a root.
fn order_chain(
    cert: &CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
) -> Result<Vec<CertificateDer<'static>>> {
    let mut pool: Vec<(CertInfo, CertificateDer<'static>)> = chain
        .into_iter()
        .map(|c| Ok((CertInfo::from_der(&c)?, c)))
        .collect::<Result<_>>()?;
    let mut out = Vec::new();
    let mut cur = CertInfo::from_der(cert)?;
    while !cur.self_signed && !pool.is_empty() {
        let i = pool
            .iter()
            .position(|(info, _)| info.subject_der == cur.issuer_der)
            .ok_or_else(|| {
                backend_err(format!(
                    "certificate chain from ACM PCA does not link above {}",
                    cur.subject
                ))
            })?;
        let (info, der) = pool.remove(i);
        out.push(der);
        cur = info;
    }
    Ok(out)
}

fn parse_pem_certs(pem_text: &str, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    pemutil::parse_certs(pem_text.as_bytes(), what)
}

/// Reads an ACTIVE PCA's certificate and chain into a [`CaMaterial`] (no key).
async fn read_material(client: &PcaClient, arn: &Arn, meta: CaMeta) -> Result<CaMaterial> {
    let a = arn.arn.as_str();
    let d = client
        .call("DescribeCertificateAuthority", a, None, || {
            client
                .sdk()
                .describe_certificate_authority()
                .certificate_authority_arn(a)
                .send()
        })
        .await?;
    let status = d.certificate_authority().and_then(|c| c.status());
    if status != Some(&CertificateAuthorityStatus::Active) {
        return Err(Error::Backend {
            backend: "acm-pca",
            message: format!(
                "CA {a} is not active (status {}); activate it (install its certificate) first",
                status.map(|s| s.as_str()).unwrap_or("unknown")
            ),
            retryable: false,
        });
    }
    let out = client
        .call("GetCertificateAuthorityCertificate", a, None, || {
            client
                .sdk()
                .get_certificate_authority_certificate()
                .certificate_authority_arn(a)
                .send()
        })
        .await?;
    let cert = parse_pem_certs(out.certificate().unwrap_or_default(), "PCA certificate")?
        .into_iter()
        .next()
        .ok_or_else(|| backend_err(format!("CA {a} returned no certificate")))?;
    let chain = match out.certificate_chain().filter(|c| !c.trim().is_empty()) {
        Some(c) => parse_pem_certs(c, "PCA certificate chain")?,
        None => Vec::new(),
    };
    let parents = order_chain(&cert, chain)?;
    let ca = CaMaterial {
        meta,
        cert,
        parents,
        key: None,
    };
    ca.validate()
        .map_err(|e| backend_err(format!("CA {a}: {e}")))?;
    Ok(ca)
}

fn meta_for(
    name: &str,
    arn: &Arn,
    opts: &PcaOptions,
    spec: &PcaCaSpec,
    now: OffsetDateTime,
) -> CaMeta {
    CaMeta {
        name: name.to_string(),
        parent: spec.parent.clone(),
        backend: Backend::AcmPca {
            arn: arn.arn.clone(),
            region: opts.region.clone(),
            endpoint: opts.endpoint.clone(),
        },
        trust_domain: spec.trust_domain.clone().unwrap_or_default(),
        policy: spec.policy.clone(),
        created_at: now,
    }
}

/// Registers an existing, ACTIVE PCA under the meshca name `name`: reads its certificate and
/// chain so trust bundles can include it. The key stays in AWS.
pub async fn register_pca(
    name: &str,
    arn: &str,
    spec: &PcaCaSpec,
    opts: &PcaOptions,
    now: OffsetDateTime,
) -> Result<CaMaterial> {
    validate_ca_name(name)?;
    spec.policy.validate()?;
    let arn = Arn::parse(arn)?;
    let client = PcaClient::connect(Some(&arn), opts).await?;
    read_material(&client, &arn, meta_for(name, &arn, opts, spec, now)).await
}

/// Creates a PCA of `kind` and returns its ARN once its CSR can be fetched, with the CSR.
async fn create_and_get_csr(
    client: &PcaClient,
    spec: &CaSpec,
    kind: CertificateAuthorityType,
) -> Result<(Arn, Vec<u8>, bool)> {
    let key_alg = pca_key_algorithm(spec.key)?;
    let signing = signing_algorithm_for(match spec.key {
        crate::key::KeyAlgorithm::EcdsaP256 => crate::key::PublicKeyKind::Ecdsa { bits: 256 },
        crate::key::KeyAlgorithm::EcdsaP384 => crate::key::PublicKeyKind::Ecdsa { bits: 384 },
        _ => crate::key::PublicKeyKind::Rsa { bits: 2048 },
    })?;
    let cn = spec
        .subject
        .common_name
        .clone()
        .unwrap_or_else(|| format!("meshca {} CA", spec.name));
    if cn.is_empty() || cn.len() > 64 {
        return Err(Error::invalid(
            "CA subject",
            "common name must be 1 to 64 characters",
        ));
    }
    let subject = Asn1Subject::builder()
        .common_name(&cn)
        .set_organization(spec.subject.organization.clone())
        .set_organizational_unit(spec.subject.organizational_unit.clone())
        .build();
    let config = CertificateAuthorityConfiguration::builder()
        .key_algorithm(key_alg.clone())
        .signing_algorithm(signing)
        .subject(subject)
        .build()
        .map_err(|e| Error::Build(format!("CA configuration: {e}")))?;
    // Same spec -> same token: re-running a create that failed half-way within AWS's
    // five-minute window continues with the CA already created instead of making another.
    let token = idempotency_token(&[
        b"create",
        spec.name.as_bytes(),
        kind.as_str().as_bytes(),
        key_alg.as_str().as_bytes(),
        cn.as_bytes(),
    ]);
    let tag = Tag::builder()
        .key("meshca:name")
        .value(&spec.name)
        .build()
        .map_err(|e| Error::Build(format!("tag: {e}")))?;
    let out = client
        .call("CreateCertificateAuthority", "(new CA)", None, || {
            client
                .sdk()
                .create_certificate_authority()
                .certificate_authority_configuration(config.clone())
                .certificate_authority_type(kind.clone())
                .idempotency_token(&token)
                .tags(tag.clone())
                .send()
        })
        .await?;
    let arn = Arn::parse(out.certificate_authority_arn().unwrap_or_default())?;
    let a = arn.arn.as_str();
    tracing::info!(arn = a, "created ACM PCA");
    let d = client
        .call("DescribeCertificateAuthority", a, None, || {
            client
                .sdk()
                .describe_certificate_authority()
                .certificate_authority_arn(a)
                .send()
        })
        .await?;
    if d.certificate_authority().and_then(|c| c.status())
        == Some(&CertificateAuthorityStatus::Active)
    {
        return Ok((arn, Vec::new(), true));
    }
    let csr = client
        .poll("GetCertificateAuthorityCsr", a, || {
            client
                .sdk()
                .get_certificate_authority_csr()
                .certificate_authority_arn(a)
                .send()
        })
        .await?;
    let csr_der = pemutil::parse_blocks(csr.csr().unwrap_or_default().as_bytes(), "PCA CSR")?
        .into_iter()
        .find(|b| b.tag().ends_with("CERTIFICATE REQUEST"))
        .map(|b| b.into_contents())
        .ok_or_else(|| {
            backend_err(format!(
                "CA {a}: GetCertificateAuthorityCsr returned no CSR"
            ))
        })?;
    let info = CsrInfo::from_der(&csr_der)?;
    if !info.signature_valid {
        return Err(backend_err(format!(
            "CA {a}: its CSR's signature does not verify"
        )));
    }
    Ok((arn, csr_der, false))
}

async fn import(
    client: &PcaClient,
    arn: &Arn,
    cert: &CertificateDer<'_>,
    chain: &[CertificateDer<'static>],
) -> Result<()> {
    let a = arn.arn.as_str();
    let cert_pem = pemutil::certs_to_pem([cert]);
    let chain_pem = (!chain.is_empty()).then(|| pemutil::certs_to_pem(chain.iter()));
    client
        .call("ImportCertificateAuthorityCertificate", a, None, || {
            client
                .sdk()
                .import_certificate_authority_certificate()
                .certificate_authority_arn(a)
                .certificate(Blob::new(cert_pem.as_bytes()))
                .set_certificate_chain(chain_pem.as_ref().map(|c| Blob::new(c.as_bytes())))
                .send()
        })
        .await?;
    Ok(())
}

/// RFC 5280 section 4.2.1.2 method 1 key identifier of a CSR's public key.
fn method1_key_id(csr_der: &[u8]) -> Result<Vec<u8>> {
    use x509_parser::prelude::FromDer;
    let spki_der = CsrInfo::from_der(csr_der)?.spki_der;
    let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&spki_der)
        .map_err(|_| Error::Csr("CA CSR public key does not parse".into()))?;
    Ok(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
        &spki.subject_public_key.data,
    )
    .as_ref()
    .to_vec())
}

/// Checks that a CA certificate issued for `csr_der` carries its key and is a CA.
fn check_ca_cert(a: &str, cert: &CertificateDer<'_>, csr_der: &[u8]) -> Result<()> {
    let info = CertInfo::from_der(cert)?;
    let csr = CsrInfo::from_der(csr_der)?;
    if info.spki_der != csr.spki_der {
        return Err(backend_err(format!(
            "CA {a}: issued certificate does not carry the CA's public key"
        )));
    }
    if !info.is_ca {
        return Err(backend_err(format!(
            "CA {a}: issued certificate is not a CA certificate (basicConstraints CA:TRUE missing)"
        )));
    }
    Ok(())
}

/// Creates a root PCA for `spec`, self-signs it with the RootCACertificate/V1 template,
/// imports the certificate (activating the CA) and returns it registered under `spec.name`.
pub async fn create_root_pca(
    spec: &CaSpec,
    opts: &PcaOptions,
    now: OffsetDateTime,
) -> Result<CaMaterial> {
    validate_ca_name(&spec.name)?;
    spec.policy.validate()?;
    if spec.parent.is_some() {
        return Err(Error::invalid(
            "CA spec",
            "create_root_pca called with a parent",
        ));
    }
    let client = PcaClient::connect(None, opts).await?;
    let (arn, csr_der, active) =
        create_and_get_csr(&client, spec, CertificateAuthorityType::Root).await?;
    let pspec = PcaCaSpec {
        trust_domain: spec.trust_domain.clone(),
        policy: spec.policy.clone(),
        parent: None,
    };
    if !active {
        let a = arn.arn.as_str();
        let template = arn.template(TEMPLATE_ROOT);
        let signing = signing_algorithm_for(CsrInfo::from_der(&csr_der)?.key)?;
        let validity = spec.validity.unwrap_or(DEFAULT_ROOT_VALIDITY);
        let limiter = limiter_for(a, &opts.limiter)?;
        let token = idempotency_token(&[
            a.as_bytes(),
            &csr_der,
            template.as_bytes(),
            &validity.as_secs().to_be_bytes(),
        ]);
        let cert_arn = client
            .issue_certificate(
                &IssueParams {
                    ca_arn: a,
                    csr_der: &csr_der,
                    template_arn: template,
                    signing,
                    not_before: now - profile::BACKDATE,
                    not_after: now + validity,
                    token,
                    passthrough: None,
                },
                &limiter,
            )
            .await?;
        let (cert_pem, _) = client.get_certificate(a, &cert_arn).await?;
        let cert = parse_pem_certs(&cert_pem, "root certificate")?
            .into_iter()
            .next()
            .ok_or_else(|| {
                backend_err(format!("CA {a}: GetCertificate returned no certificate"))
            })?;
        check_ca_cert(a, &cert, &csr_der)?;
        import(&client, &arn, &cert, &[]).await?;
    }
    read_material(&client, &arn, meta_for(&spec.name, &arn, opts, &pspec, now)).await
}

/// Creates a subordinate PCA for `spec` under `parent`, which signs it: locally when meshca
/// holds the parent's key, or through the parent PCA (SubordinateCACertificate_PathLen<n>/V1)
/// when the parent is itself PCA-backed. The certificate is imported with the parent's chain.
pub async fn create_subordinate_pca(
    spec: &CaSpec,
    parent: &CaMaterial,
    opts: &PcaOptions,
    now: OffsetDateTime,
) -> Result<CaMaterial> {
    validate_ca_name(&spec.name)?;
    spec.policy.validate()?;
    // Within the name constraints of every CA above, checked before any AWS call.
    let spec = &crate::ca::within_parent_constraints(spec, parent)?;
    let pinfo = parent.info()?;
    if pinfo.path_len == Some(0) {
        return Err(Error::invalid(
            "CA spec",
            format!(
                "parent CA {} has pathLen 0 and cannot sign another CA",
                parent.meta.name
            ),
        ));
    }
    let path_len = spec.path_len.unwrap_or(0);
    if let Some(pl) = pinfo.path_len {
        if path_len >= pl {
            return Err(Error::invalid(
                "CA spec",
                format!("pathLen {path_len} must be below the parent's {pl}"),
            ));
        }
    }
    if now >= pinfo.not_after {
        return Err(Error::invalid(
            "CA spec",
            format!("parent CA {} has expired", parent.meta.name),
        ));
    }
    let not_after =
        (now + spec.validity.unwrap_or(DEFAULT_INTERMEDIATE_VALIDITY)).min(pinfo.not_after);
    // Default the region to the parent PCA's so both live side by side.
    let mut opts = opts.clone();
    let parent_pca = match &parent.meta.backend {
        Backend::AcmPca {
            arn,
            region,
            endpoint,
        } => {
            let parn = Arn::parse(arn)?;
            if opts.region.is_none() {
                opts.region = Some(region.clone().unwrap_or_else(|| parn.region.clone()));
            }
            Some((parn, region.clone(), endpoint.clone()))
        }
        Backend::Local => None,
    };
    let client = Arc::new(PcaClient::connect(None, &opts).await?);
    let (arn, csr_der, active) =
        create_and_get_csr(&client, spec, CertificateAuthorityType::Subordinate).await?;
    let a = arn.arn.clone();
    if !active {
        let cert: CertificateDer<'static> = match (&parent.key, parent_pca) {
            (Some(pkey), _) => {
                let mut csr_params =
                    rcgen::CertificateSigningRequestParams::from_der(&csr_der.clone().into())
                        .map_err(|e| backend_err(format!("CA {a}: its CSR does not parse: {e}")))?;
                let mut params = profile::ca_params(
                    spec,
                    Some(path_len),
                    now - profile::BACKDATE,
                    not_after,
                    true,
                )?;
                // Keep the subject exactly as the PCA's CSR has it.
                params.distinguished_name = csr_params.params.distinguished_name.clone();
                // RFC 5280 method-1 key identifier (SHA-1 of the public key bits): what the
                // PCA puts in the AKI of the certificates it issues, so path builders that
                // match AKI to SKI (OpenSSL) link them.
                params.key_identifier_method =
                    rcgen::KeyIdMethod::PreSpecified(method1_key_id(&csr_der)?);
                csr_params.params = params;
                let issuer = rcgen::Issuer::from_ca_cert_der(&parent.cert, pkey.key_pair()?)?;
                csr_params.signed_by(&issuer)?.der().clone()
            }
            (None, Some((parn, region, endpoint))) => {
                let popts = PcaOptions {
                    region,
                    endpoint,
                    ..opts.clone()
                };
                let pclient = if popts.region == opts.region && popts.endpoint == opts.endpoint {
                    client.clone()
                } else {
                    Arc::new(PcaClient::connect(Some(&parn), &popts).await?)
                };
                let pa = parn.arn.as_str();
                let template = parn.template(&subordinate_template(path_len)?);
                let token = idempotency_token(&[pa.as_bytes(), &csr_der, template.as_bytes()]);
                let limiter = limiter_for(pa, &opts.limiter)?;
                let cert_arn = pclient
                    .issue_certificate(
                        &IssueParams {
                            ca_arn: pa,
                            csr_der: &csr_der,
                            template_arn: template,
                            signing: signing_algorithm_for(pinfo.key)?,
                            not_before: now - profile::BACKDATE,
                            not_after,
                            token,
                            passthrough: None,
                        },
                        &limiter,
                    )
                    .await?;
                let (pem_text, _) = pclient.get_certificate(pa, &cert_arn).await?;
                parse_pem_certs(&pem_text, "subordinate certificate")?
                    .into_iter()
                    .next()
                    .ok_or_else(|| {
                        backend_err(format!("CA {pa}: GetCertificate returned no certificate"))
                    })?
            }
            (None, None) => {
                return Err(Error::Unsupported(format!(
                    "parent CA {} has no key and no backend",
                    parent.meta.name
                )));
            }
        };
        check_ca_cert(&a, &cert, &csr_der)?;
        crate::x509::check_chain_order(&[cert.clone(), parent.cert.clone()]).map_err(|e| {
            backend_err(format!(
                "CA {a}: certificate does not chain to parent {}: {e}",
                parent.meta.name
            ))
        })?;
        import(&client, &arn, &cert, &parent.chain()).await?;
    }
    let pspec = PcaCaSpec {
        trust_domain: spec.trust_domain.clone(),
        policy: spec.policy.clone(),
        parent: Some(parent.meta.name.clone()),
    };
    let ca = read_material(
        &client,
        &arn,
        meta_for(&spec.name, &arn, &opts, &pspec, now),
    )
    .await?;
    if ca.parents != parent.chain() {
        return Err(backend_err(format!(
            "CA {a}: its chain does not match parent CA {}'s chain",
            parent.meta.name
        )));
    }
    Ok(ca)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{create_intermediate, create_root};

    #[test]
    fn chain_is_ordered_nearest_first() {
        let now = OffsetDateTime::now_utc();
        let root = create_root(&CaSpec::root("r"), now).unwrap();
        let mut s = CaSpec::root("i1");
        s.parent = Some("r".into());
        s.path_len = Some(0);
        let mut rs = CaSpec::root("r");
        rs.path_len = Some(2);
        let root = if root.info().unwrap().path_len == Some(1) {
            create_root(&rs, now).unwrap()
        } else {
            root
        };
        let mut s1 = CaSpec::root("i1");
        s1.parent = Some("r".into());
        s1.path_len = Some(1);
        let i1 = create_intermediate(&s1, &root, now).unwrap();
        s.name = "i2".into();
        let i2 = create_intermediate(&s, &i1, now).unwrap();
        let shuffled = vec![root.cert.clone(), i1.cert.clone()];
        assert_eq!(
            order_chain(&i2.cert, shuffled).unwrap(),
            vec![i1.cert.clone(), root.cert.clone()]
        );
        // A chain that does not link is refused.
        let other = create_root(&CaSpec::root("o"), now).unwrap();
        assert!(order_chain(&i2.cert, vec![other.cert.clone()]).is_err());
        // A root has no parents.
        assert!(order_chain(&root.cert, Vec::new()).unwrap().is_empty());
    }
}
