//! Certificates whose `/status` write may or may not have taken effect.
//!
//! A write that fails without an answer from the API server (the connection dropped, a
//! timeout, a 5xx) may still have been committed to etcd. Seen on a real API server killed
//! while the leader signed: the certificate was on the CSR, the signer had taken the write for
//! failed, signed a second certificate on the retry, lost the resourceVersion race to its own
//! first write, and recorded neither in the ledger.
//!
//! So the signer keeps such a certificate here, by CSR uid, until it knows what happened:
//! - the retry sends the *same* certificate again instead of signing a new one (with an ACM
//!   PCA CA a second signature is a second bill);
//! - once the CSR is seen with a certificate, [`InDoubt::settle`] says whether it is the one
//!   kept here (then it was delivered and goes into the ledger) or another writer's (then
//!   the kept one was never delivered and is dropped).
//!
//! Entries are public certificates only (the requester holds the key). Pure: no I/O.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use time::OffsetDateTime;

use crate::issue::IssuedCert;

/// How long an unsettled entry is kept (a CSR deleted meanwhile never settles).
pub const KEEP: Duration = Duration::from_secs(3600);

/// A certificate whose write is in doubt.
#[derive(Clone, Debug)]
pub struct Pending {
    /// The CA that signed it.
    pub ca: String,
    /// The certificate.
    pub cert: IssuedCert,
    /// When it was signed (the ledger's `issued_at`).
    pub issued_at: OffsetDateTime,
    since: Instant,
}

/// What a CSR seen with a certificate says about the entry kept for it.
#[derive(Debug)]
pub enum Settled {
    /// Nothing was kept for this CSR.
    Nothing,
    /// The certificate on the CSR is the one kept: the in-doubt write took effect.
    Delivered(Pending),
    /// Another certificate is on the CSR: the kept one was never delivered.
    Superseded(Pending),
}

/// The certificates in doubt, by CSR uid.
#[derive(Debug, Default)]
pub struct InDoubt {
    map: Mutex<HashMap<String, Pending>>,
}

impl InDoubt {
    /// Keeps `cert` (signed by `ca` at `issued_at`) for the CSR `uid`, dropping entries older
    /// than [`KEEP`].
    pub fn put(&self, uid: &str, ca: &str, cert: IssuedCert, issued_at: OffsetDateTime) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, p| p.since.elapsed() < KEEP);
        m.insert(
            uid.to_string(),
            Pending {
                ca: ca.to_string(),
                cert,
                issued_at,
                since: Instant::now(),
            },
        );
    }

    /// The certificate kept for `uid` from `ca`, to send again instead of signing anew.
    pub fn resend(&self, uid: &str, ca: &str) -> Option<Pending> {
        let m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.get(uid).filter(|p| p.ca == ca).cloned()
    }

    /// The CSR `uid` now carries a certificate with serial `serial` (hex): removes and
    /// returns what was kept for it, saying whether it is that certificate.
    pub fn settle(&self, uid: &str, serial: &str) -> Settled {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match m.remove(uid) {
            None => Settled::Nothing,
            Some(p) if p.cert.info.serial_hex() == serial => Settled::Delivered(p),
            Some(p) => Settled::Superseded(p),
        }
    }

    /// Forgets the write in doubt for `uid` (the write was answered after all).
    pub fn forget(&self, uid: &str) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(uid);
    }

    /// How many writes are in doubt.
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no write is in doubt.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// CSRs whose certificate this replica wrote, until its cache shows it.
///
/// The controller's cache lags its own writes: after approving and signing a CSR in one
/// reconcile, the watch still delivers the approval's version (approved, no certificate), and a
/// reconcile of it would sign a second certificate only to lose the resourceVersion race (seen
/// against a real API server: 1,789 status writes for 1,000 CSRs). `status.certificate` cannot
/// be changed once set, so a CSR written here needs no reconcile until the cache catches up.
#[derive(Debug, Default)]
pub struct Written {
    map: Mutex<HashMap<String, Instant>>,
}

impl Written {
    /// `uid` was written.
    pub fn mark(&self, uid: &str) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, t| t.elapsed() < KEEP);
        m.insert(uid.to_string(), Instant::now());
    }

    /// Whether `uid` was written and the cache has not shown it yet.
    pub fn pending(&self, uid: &str) -> bool {
        let m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.contains_key(uid)
    }

    /// The cache shows `uid` signed.
    pub fn seen(&self, uid: &str) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{create_root, CaSpec};
    use crate::issue::{issue_workload, LocalIssuer};

    fn cert(issuer: &LocalIssuer) -> IssuedCert {
        let sans = crate::identity::Sans {
            dns: vec![crate::identity::DnsName::parse("web.app.svc").unwrap()],
            ..Default::default()
        };
        futures::executor::block_on(issue_workload(
            issuer,
            &sans,
            None,
            crate::key::KeyAlgorithm::EcdsaP256,
            OffsetDateTime::now_utc(),
        ))
        .unwrap()
        .cert
    }

    #[test]
    fn the_kept_certificate_is_resent_then_settled_by_serial() {
        let now = OffsetDateTime::now_utc();
        let issuer = LocalIssuer::new(create_root(&CaSpec::root("mesh"), now).unwrap()).unwrap();
        let (a, b) = (cert(&issuer), cert(&issuer));
        let d = InDoubt::default();
        assert!(d.resend("u1", "mesh").is_none());
        d.put("u1", "mesh", a.clone(), now);
        // Resent as many times as asked, only for the same CA.
        assert_eq!(
            d.resend("u1", "mesh").unwrap().cert.info.serial_hex(),
            a.info.serial_hex()
        );
        assert!(d.resend("u1", "other").is_none());
        assert!(d.resend("u2", "mesh").is_none());
        // The CSR shows the kept certificate: delivered, and gone from the map.
        match d.settle("u1", &a.info.serial_hex()) {
            Settled::Delivered(p) => assert_eq!(p.ca, "mesh"),
            other => panic!("{other:?}"),
        }
        assert!(d.is_empty());
        assert!(matches!(
            d.settle("u1", &a.info.serial_hex()),
            Settled::Nothing
        ));
        // Another writer's certificate: the kept one was never delivered.
        d.put("u1", "mesh", a, now);
        assert!(matches!(
            d.settle("u1", &b.info.serial_hex()),
            Settled::Superseded(_)
        ));
        assert!(d.is_empty());
        d.put("u3", "mesh", b, now);
        d.forget("u3");
        assert!(d.is_empty());
    }
}
