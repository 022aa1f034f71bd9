//! Ledger catch-up when a replica starts to lead.
//!
//! The ledger writer batches records after the certificate is written, so a leader killed
//! between its `/status` write and the batch's ConfigMap update loses those records, although
//! the certificates are in the cluster. `prune` refuses on what is live in the cluster anyway
//! ([`super::live_certs`]); this makes the ledger itself whole again: before a new leader starts
//! its controllers it lists the CSRs of the CAs it serves, reads the ledger, and records every
//! issued certificate whose serial the ledger lacks (requester `spec.username`, object
//! `csr/<name>`, `issued_at` = the time of the catch-up).
//!
//! The list is taken before the new leader signs anything, so nothing it signs itself is taken
//! for missing. A stuck old leader (SIGSTOP) that later flushes its own queue may write a
//! serial a second time; the ledger is read as a set of serials ([`dedupe`]), so the line is
//! redundant, never a second certificate.

use std::collections::HashSet;

use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::api::{Api, ListParams};
use time::OffsetDateTime;

use super::ca_from_signer_name;
use super::ledger::{IssuedRecord, LedgerSink};
use crate::error::Result;
use crate::issue::LedgerEntry;
use crate::store::Store;
use crate::x509::CertInfo;

/// The records missing from a ledger that holds `recorded` serials, for the CSRs of CAs that
/// `serves` says are served. A CSR without a certificate, or whose certificate does not parse,
/// is skipped (the signer logs those). Pure.
pub fn unrecorded(
    csrs: &[CertificateSigningRequest],
    serves: impl Fn(&str) -> bool,
    recorded: &HashSet<String>,
    now: OffsetDateTime,
) -> Vec<IssuedRecord> {
    let mut out = Vec::new();
    for c in csrs {
        let Some(ca) = ca_from_signer_name(&c.spec.signer_name).filter(|ca| serves(ca)) else {
            continue;
        };
        let Some(info) = issued_leaf(c) else {
            continue;
        };
        if recorded.contains(&info.serial_hex()) {
            continue;
        }
        out.push(IssuedRecord {
            entry: LedgerEntry::for_leaf(ca, &info, now),
            requester: c.spec.username.clone().unwrap_or_default(),
            object: format!("csr/{}", c.metadata.name.as_deref().unwrap_or_default()),
        });
    }
    out
}

/// The leaf of the certificate on CSR `c`, if it has one that parses.
pub fn issued_leaf(c: &CertificateSigningRequest) -> Option<CertInfo> {
    let cert = c.status.as_ref()?.certificate.as_ref()?;
    let chain = crate::pemutil::parse_certs(&cert.0, "status.certificate").ok()?;
    CertInfo::from_der(chain.first()?).ok()
}

/// `entries` with each serial once (the first line of it kept), in order. Pure.
pub fn dedupe(entries: Vec<LedgerEntry>) -> Vec<LedgerEntry> {
    let mut seen = HashSet::new();
    entries
        .into_iter()
        .filter(|e| seen.insert(e.serial.clone()))
        .collect()
}

/// Lists the CSRs (of `only_signer` when set), reads `store`'s ledger, and queues the missing
/// records on `sink`. Returns how many were queued.
pub async fn catch_up(
    client: &kube::Client,
    store: &dyn Store,
    sink: &LedgerSink,
    only_signer: Option<&str>,
    serves: impl Fn(&str) -> bool,
    now: OffsetDateTime,
) -> Result<usize> {
    let mut lp = ListParams::default();
    if let Some(s) = only_signer {
        lp = lp.fields(&format!("spec.signerName={s}"));
    }
    let csrs = Api::<CertificateSigningRequest>::all(client.clone())
        .list(&lp)
        .await
        .map_err(|e| super::kube_err("listing CSRs for the ledger catch-up", e))?;
    let recorded: HashSet<String> = store
        .ledger()
        .await?
        .into_iter()
        .map(|e| e.serial)
        .collect();
    let missing = unrecorded(&csrs.items, serves, &recorded, now);
    let n = missing.len();
    for r in missing {
        tracing::warn!(serial = %r.entry.serial, object = %r.object, requester = %r.requester, "ledger catch-up: recording a certificate the ledger lacks (a previous leader stopped before writing it)");
        sink.record(r).await;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{create_root, CaSpec};
    use crate::issue::{issue_workload, LocalIssuer};
    use serde_json::json;

    fn signed_csr(name: &str, signer: &str, chain: Option<&str>) -> CertificateSigningRequest {
        let mut v = json!({
            "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
            "metadata": {"name": name},
            "spec": {"request": "", "signerName": signer, "username": "system:serviceaccount:app:web"},
        });
        if let Some(c) = chain {
            use base64::Engine as _;
            v["status"] =
                json!({"certificate": base64::engine::general_purpose::STANDARD.encode(c)});
        }
        serde_json::from_value(v).unwrap()
    }

    /// A chain PEM for `web.app.svc` from `issuer`, and its serial.
    fn leaf(issuer: &LocalIssuer) -> (String, String) {
        let sans = crate::identity::Sans {
            dns: vec![crate::identity::DnsName::parse("web.app.svc").unwrap()],
            ..Default::default()
        };
        let now = OffsetDateTime::now_utc();
        let w = futures::executor::block_on(issue_workload(
            issuer,
            &sans,
            None,
            crate::key::KeyAlgorithm::EcdsaP256,
            now,
        ))
        .unwrap();
        (w.cert.chain_pem(), w.cert.info.serial_hex())
    }

    #[test]
    fn only_served_signed_and_unrecorded_csrs_are_caught_up() {
        let now = OffsetDateTime::now_utc();
        let ca = create_root(&CaSpec::root("mesh"), now).unwrap();
        let issuer = LocalIssuer::new(ca).unwrap();
        let (a, a_serial) = leaf(&issuer);
        let (b, b_serial) = leaf(&issuer);
        let csrs = vec![
            signed_csr("a", "meshca.io/mesh", Some(&a)),
            signed_csr("b", "meshca.io/mesh", Some(&b)),
            signed_csr("pending", "meshca.io/mesh", None),
            signed_csr("other-ca", "meshca.io/other", Some(&a)),
            signed_csr("not-ours", "example.com/x", Some(&a)),
            signed_csr("garbage", "meshca.io/mesh", Some("not a certificate")),
        ];
        let recorded: HashSet<String> = [b_serial].into_iter().collect();
        let got = unrecorded(&csrs, |c| c == "mesh", &recorded, now);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].entry.serial, a_serial);
        assert_eq!(got[0].entry.ca, "mesh");
        assert_eq!(got[0].object, "csr/a");
        assert_eq!(got[0].requester, "system:serviceaccount:app:web");
        assert!(got[0].entry.sans.contains(&"DNS:web.app.svc".to_string()));
    }

    #[test]
    fn a_serial_written_twice_reads_once() {
        let now = OffsetDateTime::now_utc();
        let ca = create_root(&CaSpec::root("mesh"), now).unwrap();
        let issuer = LocalIssuer::new(ca).unwrap();
        let (a, _) = leaf(&issuer);
        let rec = unrecorded(
            &[signed_csr("a", "meshca.io/mesh", Some(&a))],
            |_| true,
            &HashSet::new(),
            now,
        );
        let e = rec[0].entry.clone();
        let mut other = e.clone();
        other.serial = "01".into();
        let got = dedupe(vec![e.clone(), other.clone(), e.clone()]);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].serial, e.serial);
        assert_eq!(got[1].serial, "01");
    }
}
