//! What prune checks in the cluster besides the ledger: the certificates still in use there.
//!
//! The ledger records what meshca issued, but an entry can be missing (a ledger write that
//! never landed, a certificate issued before the ledger existed, one copied in by hand), and
//! prune must not remove a root that live certificates still chain to. So prune on the kube
//! store also lists, cluster-wide:
//! - Secrets of type `kubernetes.io/tls`: the first certificate of `tls.crt`;
//! - CertificateSigningRequests: the first certificate of `status.certificate`;
//! - PodCertificateRequests (where the cluster serves them): the first certificate of
//!   `status.certificateChain`;
//!
//! and reports each one that is unexpired and whose authority key identifier is the subject
//! key identifier of a CA being pruned. A list that fails (RBAC, an outage) fails the check:
//! prune is refused rather than run blind (`--force` goes ahead).

use std::collections::BTreeSet;

use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams};
use time::OffsetDateTime;

use super::kube_err;
use crate::error::Result;
use crate::store::LiveCertificate;
use crate::x509::CertInfo;

/// Page size of the lists.
const PAGE: u32 = 500;

/// The serial of the first certificate of `pem` when it is unexpired at `now` and was issued
/// by a CA whose subject key identifier is in `skis`. Anything unreadable is `None`: a Secret
/// that holds no certificate of ours is no reason to refuse. Pure.
pub fn blocking_leaf(pem: &[u8], skis: &BTreeSet<String>, now: OffsetDateTime) -> Option<String> {
    let first = crate::pemutil::parse_blocks(pem, "live certificate")
        .ok()?
        .into_iter()
        .find(|b| b.tag() == "CERTIFICATE")?;
    let info = CertInfo::from_der(first.contents()).ok()?;
    let aki = info.authority_key_id.as_ref()?;
    (skis.contains(aki) && info.not_after > now).then(|| info.serial_hex())
}

/// Lists every object of `api` in pages.
async fn list_all<K>(api: &Api<K>, lp: ListParams, what: &str) -> Result<Vec<K>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut out = Vec::new();
    let mut lp = lp.limit(PAGE);
    loop {
        let page = api.list(&lp).await.map_err(|e| kube_err(what, e))?;
        out.extend(page.items);
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => lp = lp.continue_token(&c),
            None => return Ok(out),
        }
    }
}

/// The live certificates in the cluster issued by a CA with one of `skis`.
pub async fn live_certificates(
    client: &kube::Client,
    skis: &BTreeSet<String>,
    now: OffsetDateTime,
) -> Result<Vec<LiveCertificate>> {
    if skis.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    let secrets: Api<Secret> = Api::all(client.clone());
    for s in list_all(
        &secrets,
        ListParams::default().fields("type=kubernetes.io/tls"),
        "listing TLS Secrets to find live certificates of the old CA (prune needs list on secrets cluster-wide, or --force)",
    )
    .await?
    {
        if s.type_.as_deref() != Some("kubernetes.io/tls") {
            continue;
        }
        let crt = s.data.as_ref().and_then(|d| d.get("tls.crt"));
        if let Some(serial) = crt.and_then(|c| blocking_leaf(&c.0, skis, now)) {
            out.push(LiveCertificate {
                location: format!(
                    "secret {}/{}",
                    s.metadata.namespace.as_deref().unwrap_or_default(),
                    s.metadata.name.as_deref().unwrap_or_default()
                ),
                serial,
            });
        }
    }
    let csrs: Api<CertificateSigningRequest> = Api::all(client.clone());
    for c in list_all(
        &csrs,
        ListParams::default(),
        "listing CertificateSigningRequests to find live certificates of the old CA",
    )
    .await?
    {
        let crt = c.status.as_ref().and_then(|s| s.certificate.as_ref());
        if let Some(serial) = crt.and_then(|b| blocking_leaf(&b.0, skis, now)) {
            out.push(LiveCertificate {
                location: format!("csr {}", c.metadata.name.as_deref().unwrap_or_default()),
                serial,
            });
        }
    }
    // Through the version the cluster serves (v1 on 1.37, v1alpha1 on 1.34, ...).
    if let Some(ar) = super::pcr::discover(client).await? {
        let pcrs: Api<super::pcr::Pcr> = Api::all_with(client.clone(), &ar);
        for p in list_all(
            &pcrs,
            ListParams::default(),
            "listing PodCertificateRequests to find live certificates of the old CA",
        )
        .await?
        {
            let chain = p.status.as_ref().and_then(|s| s.certificate_chain.as_ref());
            if let Some(serial) = chain.and_then(|c| blocking_leaf(c.as_bytes(), skis, now)) {
                out.push(LiveCertificate {
                    location: format!(
                        "podcertificaterequest {}/{}",
                        p.metadata.namespace.as_deref().unwrap_or_default(),
                        p.metadata.name.as_deref().unwrap_or_default()
                    ),
                    serial,
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{create_root, CaSpec};
    use crate::store::rotate::tests::leaf_from;

    #[tokio::test]
    async fn a_leaf_blocks_only_when_unexpired_and_issued_by_a_listed_ca() {
        let now = OffsetDateTime::now_utc();
        let old = create_root(&CaSpec::root("old"), now).unwrap();
        let ski = old.info().unwrap().subject_key_id.unwrap();
        let other = create_root(&CaSpec::root("other"), now).unwrap();
        let mine = leaf_from(old, now).await;
        let theirs = leaf_from(other, now).await;
        let skis = BTreeSet::from([ski]);
        let pem = mine.chain_pem();
        assert_eq!(
            blocking_leaf(pem.as_bytes(), &skis, now),
            Some(mine.info.serial_hex())
        );
        // Expired by then: no longer blocks.
        let later = mine.info.not_after + time::Duration::seconds(1);
        assert_eq!(blocking_leaf(pem.as_bytes(), &skis, later), None);
        assert_eq!(
            blocking_leaf(theirs.chain_pem().as_bytes(), &skis, now),
            None
        );
        for junk in [
            &b""[..],
            b"not pem",
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        ] {
            assert_eq!(blocking_leaf(junk, &skis, now), None);
        }
    }
}
