//! The rotation loop: re-reads a [`CertSource`] when what it reads changes (watched, see
//! [`crate::fswatch`]; polled where it cannot be watched), renews the workload certificate
//! at a fraction of its lifetime (with jitter), verifies what it gets and publishes a new
//! [`Snapshot`] through `tokio::sync::watch` only when something changed.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::{watch, Notify};

use crate::fswatch::{Watching, DEBOUNCE, WATCHED_POLL};
use crate::metrics::Metrics;
use crate::secrets::{
    bundle_entry, certificate_entry, validation_entry, Snapshot, DEFAULT_NAME, ROOTCA_NAME,
};
use crate::source::{verify_workload, CertSource, Material, SourceError, WorkloadCert};

/// Rotation settings.
#[derive(Clone, Debug)]
pub struct RotationConfig {
    /// Renew when this fraction of the certificate's lifetime has passed (default 0.5).
    pub renew_at: f64,
    /// Renewal is pulled earlier by up to this fraction of the renewal time (default 0.1).
    pub jitter: f64,
    /// How often the source is re-read for bundle or file changes where it cannot be
    /// watched (default 2 s). While it is watched, it is re-read on every change and, as a
    /// safety net, every [`WATCHED_POLL`](crate::fswatch::WATCHED_POLL) or this, whichever
    /// is longer.
    pub poll_interval: Duration,
    /// Longest wait between retries after a failure (default 60 s).
    pub max_backoff: Duration,
}

impl Default for RotationConfig {
    fn default() -> Self {
        RotationConfig {
            renew_at: 0.5,
            jitter: 0.1,
            poll_interval: Duration::from_secs(2),
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// A uniform random number in `[0, 1)`.
fn random_unit() -> f64 {
    let mut b = [0u8; 4];
    if aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut b).is_err() {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}

/// The rotation state: the current certificate and what is published.
pub struct Rotator {
    source: Box<dyn CertSource>,
    cfg: RotationConfig,
    tx: watch::Sender<Arc<Snapshot>>,
    metrics: Arc<Metrics>,
    current: Option<WorkloadCert>,
    deadline: Option<OffsetDateTime>,
}

impl std::fmt::Debug for Rotator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rotator")
            .field("source", &self.source.describe())
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

impl Rotator {
    /// A rotator publishing into `tx`.
    pub fn new(
        source: Box<dyn CertSource>,
        cfg: RotationConfig,
        tx: watch::Sender<Arc<Snapshot>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Rotator {
            source,
            cfg,
            tx,
            metrics,
            current: None,
            deadline: None,
        }
    }

    /// The source's description.
    pub fn describe(&self) -> String {
        self.source.describe()
    }

    /// One step: load (renewing if due or `force`), verify, publish if changed. On error the
    /// published secrets stay as they are.
    pub async fn step(&mut self, force: bool) -> Result<(), SourceError> {
        let now = OffsetDateTime::now_utc();
        let mut due = force || self.current.is_none() || self.deadline.is_some_and(|d| now >= d);
        let mut material = self.source.load(due, now).await?;
        if due && material.workload.is_none() && self.current.is_some() {
            // The source declined to renew now (it is backing off after a refused request):
            // keep the current certificate and ask again at the next poll, not in a busy loop.
            self.deadline = Some(now + self.cfg.poll_interval);
        }
        if !due && self.issued_by_other_key(&material) {
            tracing::info!(
                source = %self.source.describe(),
                "the issuing CA was rotated with --now; renewing from the new CA"
            );
            due = true;
            material = self.source.load(true, now).await?;
        }
        match self.accept(material, now) {
            Ok(()) => Ok(()),
            // The current certificate no longer verifies (a CA rotation took it out of the
            // bundle): a renewing source gets one immediate chance to issue a new one.
            Err(e) if !due => {
                tracing::info!(error = %e, "current certificate no longer verifies; renewing");
                let material = self.source.load(true, now).await?;
                self.accept(material, now).map_err(|e| self.refused(e))
            }
            Err(e) => Err(self.refused(e)),
        }
    }

    /// Whether the source asks for a certificate from another key than the current one's
    /// issuer (AKI against SKI; never the DN, which a rotated CA keeps).
    fn issued_by_other_key(&self, m: &Material) -> bool {
        match (&m.renew_unless_issued_by, &self.current) {
            (Some(ski), Some(cur)) => !cur
                .info
                .authority_key_id
                .as_deref()
                .is_some_and(|aki| aki.eq_ignore_ascii_case(ski)),
            _ => false,
        }
    }

    /// Shows the current certificate's renewal time in the metrics. Only a new deadline from
    /// a certificate moves it: a declined or failed renewal leaves it in the past.
    fn publish_renewal(&self) {
        if let Some(d) = self.deadline {
            self.metrics
                .cert_renewal
                .store(d.unix_timestamp(), Ordering::Relaxed);
        }
    }

    fn refused(&self, message: String) -> SourceError {
        SourceError {
            source_name: self.source.describe(),
            message,
            user_error: true,
        }
    }

    fn accept(&mut self, m: Material, now: OffsetDateTime) -> Result<(), String> {
        let Material {
            workload,
            bundle,
            named_bundles,
            renew_unless_issued_by: _,
            crls,
        } = m;
        let fresh = workload.is_some();
        let cert = match (&workload, &self.current) {
            (Some(w), _) => w,
            (None, Some(c)) => c,
            (None, None) => return Err("the source provided no workload certificate".into()),
        };
        verify_workload(cert, &bundle, self.source.expected_identity(), now)
            .map_err(|e| format!("refusing to publish certificate {}: {e}", cert.info.serial))?;
        let mut snap = Snapshot::new();
        snap.insert(
            DEFAULT_NAME,
            certificate_entry(
                DEFAULT_NAME,
                &cert.chain_pem(),
                &cert.key_pem,
                cert.info.serial.clone(),
                cert.info.not_after,
            ),
        );
        snap.insert(
            ROOTCA_NAME,
            validation_entry(ROOTCA_NAME, &bundle, crls.as_ref()),
        );
        for (name, anchors) in &named_bundles {
            if name == DEFAULT_NAME || name == ROOTCA_NAME {
                tracing::warn!(bundle = %name, "trust bundle name is reserved; not served by that name");
                continue;
            }
            snap.insert(name, bundle_entry(name, anchors));
        }
        let prev = self.tx.borrow().clone();
        let changed = prev.changed_names(&snap);
        if fresh {
            if let Some(w) = workload {
                let same_cert = self.current.as_ref().is_some_and(|c| c.chain == w.chain);
                if !same_cert {
                    self.deadline =
                        Some(w.renew_deadline(self.cfg.renew_at, random_unit(), self.cfg.jitter));
                    self.publish_renewal();
                    tracing::info!(
                        serial = %w.info.serial,
                        not_after = %w.info.not_after,
                        renew_at = %self.deadline.map(|d| d.to_string()).unwrap_or_default(),
                        source = %self.source.describe(),
                        "workload certificate obtained"
                    );
                    self.current = Some(w);
                } else if self.deadline.is_none_or(|d| now >= d) {
                    // A file source re-read the same certificate: nothing to renew here.
                    self.deadline =
                        Some(w.renew_deadline(self.cfg.renew_at, random_unit(), self.cfg.jitter));
                    self.publish_renewal();
                }
            }
        }
        if changed.is_empty() {
            return Ok(());
        }
        if changed.iter().any(|n| n == DEFAULT_NAME) {
            self.metrics.rotations.fetch_add(1, Ordering::Relaxed);
        }
        let bundles_changed = changed
            .iter()
            .filter(|n| n.as_str() != DEFAULT_NAME)
            .count() as u64;
        self.metrics
            .bundle_updates
            .fetch_add(bundles_changed, Ordering::Relaxed);
        if let Some(t) = snap.cert_not_after() {
            self.metrics
                .cert_expiry
                .store(t.unix_timestamp(), Ordering::Relaxed);
        }
        tracing::info!(changed = ?changed, versions = ?snap.versions(), "publishing secrets");
        self.tx.send_replace(Arc::new(snap));
        Ok(())
    }

    /// Starts watching what the source reads. `None` (logged with the reason) when the source
    /// cannot be watched: then [`Rotator::run`] polls it every `poll_interval`.
    pub fn start_watching(&self) -> Option<(Arc<Notify>, Watching)> {
        let spec = self.source.watch_spec();
        let source = self.source.describe();
        if spec.dirs.is_empty() {
            tracing::info!(source = %source, poll_interval = ?self.cfg.poll_interval, "polling the source");
            return None;
        }
        let changed = Arc::new(Notify::new());
        match crate::fswatch::start(&spec, changed.clone()) {
            Ok(w) => {
                tracing::info!(
                    source = %source,
                    dirs = ?w.dirs,
                    safety_poll = ?self.cfg.poll_interval.max(WATCHED_POLL),
                    "watching the source for changes"
                );
                Some((changed, w))
            }
            Err(e) => {
                tracing::warn!(
                    source = %source,
                    reason = %e,
                    poll_interval = ?self.cfg.poll_interval,
                    "cannot watch the source for changes; polling it instead"
                );
                None
            }
        }
    }

    /// Runs until `shutdown` is set. `reload` forces a renewal (SIGHUP). With `watch` (from
    /// [`Rotator::start_watching`]) the source is re-read [`DEBOUNCE`] after each change and
    /// polled only as a safety net.
    pub async fn run(
        mut self,
        reload: Arc<Notify>,
        watch: Option<(Arc<Notify>, Watching)>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut failures: u32 = 0;
        let mut force = false;
        let (changed, poll) = match &watch {
            Some((c, _)) => (c.clone(), self.cfg.poll_interval.max(WATCHED_POLL)),
            None => (Arc::new(Notify::new()), self.cfg.poll_interval),
        };
        loop {
            let wait = if failures == 0 {
                let mut w = poll;
                if let Some(d) = self.deadline {
                    let until = d - OffsetDateTime::now_utc();
                    if until < time::Duration::ZERO {
                        w = Duration::ZERO;
                    } else if let Ok(u) = Duration::try_from(until) {
                        w = w.min(u);
                    }
                }
                w
            } else {
                let base = self.cfg.poll_interval.max(Duration::from_millis(500));
                let exp = base.saturating_mul(1u32 << failures.min(10));
                let capped = exp.min(self.cfg.max_backoff);
                capped.mul_f64(0.75 + 0.5 * random_unit())
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = reload.notified() => { force = true; }
                _ = changed.notified() => {
                    // Let writes that come together (a rotation step, a cert and its key)
                    // land before reading.
                    tokio::time::sleep(DEBOUNCE).await;
                }
                _ = crate::stopped(&mut shutdown) => return,
            }
            match self.step(force).await {
                Ok(()) => {
                    failures = 0;
                    force = false;
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    self.metrics.source_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        error = %e,
                        attempt = failures,
                        "certificate source failed; keeping the current secrets and retrying with backoff"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use meshca::ca::{create_root, CaSpec};
    use meshca::identity::{Sans, SpiffeId, TrustDomain};
    use meshca::issue::{issue_workload, LocalIssuer};
    use meshca::key::KeyAlgorithm;
    use std::sync::atomic::AtomicU64;
    use std::sync::Mutex;

    /// Issues one short-lived certificate, then declines every renewal (as a source backing
    /// off after a refused CSR does), counting the loads.
    #[derive(Debug)]
    struct Declining {
        first: Mutex<Option<WorkloadCert>>,
        anchors: Vec<rustls_pki_types::CertificateDer<'static>>,
        loads: Arc<AtomicU64>,
        sans: Sans,
    }

    #[async_trait]
    impl CertSource for Declining {
        fn describe(&self) -> String {
            "declining".into()
        }
        async fn load(&self, _renew: bool, _now: OffsetDateTime) -> Result<Material, SourceError> {
            self.loads.fetch_add(1, Ordering::Relaxed);
            Ok(Material {
                workload: self.first.lock().unwrap().take(),
                bundle: self.anchors.clone(),
                ..Material::default()
            })
        }
        fn expected_identity(&self) -> Option<&Sans> {
            Some(&self.sans)
        }
    }

    #[tokio::test]
    async fn a_source_that_declines_a_due_renewal_is_asked_again_at_the_next_poll_not_in_a_loop() {
        let now = OffsetDateTime::now_utc();
        let ca = create_root(&CaSpec::root("ca1"), now).unwrap();
        let anchors = vec![ca.cert.clone()];
        let issuer = LocalIssuer::new(ca).unwrap();
        let sans = Sans {
            spiffe_id: Some(
                SpiffeId::for_service_account(&TrustDomain::default(), "a", "b").unwrap(),
            ),
            ..Sans::default()
        };
        let w = issue_workload(
            &issuer,
            &sans,
            Some(Duration::from_secs(600)),
            KeyAlgorithm::EcdsaP256,
            now,
        )
        .await
        .unwrap();
        // Obtained long ago: the renewal is due at once.
        let cert = WorkloadCert {
            chain: vec![w.cert.leaf.clone()],
            key_pem: w.key.to_pkcs8_pem(),
            info: w.cert.info.clone(),
            obtained_at: now - time::Duration::seconds(590),
        };
        let loads = Arc::new(AtomicU64::new(0));
        let source = Declining {
            first: Mutex::new(Some(cert)),
            anchors,
            loads: loads.clone(),
            sans,
        };
        let (tx, _rx) = watch::channel(Arc::new(Snapshot::new()));
        // Renewal due at 10 % of the lifetime: already passed.
        let cfg = RotationConfig {
            poll_interval: Duration::from_millis(100),
            renew_at: 0.1,
            ..RotationConfig::default()
        };
        let metrics = Arc::new(Metrics::default());
        let mut rot = Rotator::new(Box::new(source), cfg, tx, metrics.clone());
        rot.step(true).await.unwrap();
        let due = metrics.cert_renewal.load(Ordering::Relaxed);
        assert!(
            due > 0 && due < now.unix_timestamp(),
            "renewal due in the past: {due}"
        );
        assert_eq!(
            metrics.cert_expiry.load(Ordering::Relaxed),
            w.cert.info.not_after.unix_timestamp()
        );
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(rot.run(Arc::new(Notify::new()), None, stop_rx));
        tokio::time::sleep(Duration::from_millis(550)).await;
        stop_tx.send(true).unwrap();
        task.await.unwrap();
        let n = loads.load(Ordering::Relaxed);
        assert!(
            (2..=10).contains(&n),
            "{n} loads in 550 ms with a 100 ms poll"
        );
        // The declined renewals moved the next attempt, not the time the renewal became due
        // (what the overdue-renewal alert reads).
        assert_eq!(metrics.cert_renewal.load(Ordering::Relaxed), due);
    }
}
