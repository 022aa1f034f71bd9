//! The CAs the controllers sign with, as one snapshot published through a
//! `tokio::sync::watch` channel, so that a CA created, replaced or removed in the store reaches
//! the CSR signer and the managed-Secret controller without a restart.
//!
//! - [`IssuerSet`]: an immutable snapshot (CA name -> [`Issuer`], plus a fingerprint per CA).
//!   Each reconcile takes the current snapshot once and uses it throughout, so one decision
//!   never mixes two generations of a CA.
//! - [`reload`]: builds the next snapshot from the store. A CA whose stored certificate and
//!   facts (policy included) are unchanged keeps its issuer (no reconnect for ACM PCA); a
//!   changed one is loaded afresh; a removed one is dropped. Each CA is loaded on its own, so
//!   one that fails never stops the others, at start-up or later:
//!   - a CA whose stored content fails to load (an unknown policy key, a bad certificate or
//!     key) is **not served**, fail closed: it never keeps signing under its previous, maybe
//!     looser, policy. It is listed in [`IssuerSet::failed`], `meshca_ca_ready_status{ca}` moves
//!     to `condition="False"`, `meshca_ca_load_errors_total{ca}` counts it, and the store reports it
//!     ([`Store::report_ca_load_failure`]: a Warning Event `CaLoadFailed` on the kube
//!     store's CA Secret) when the failure is new or its reason changed;
//!   - a transient read error (the API server or the disk, [`super::retryable`]) says nothing
//!     about the content: a CA already served keeps its issuer (counted and logged), one not
//!     yet loaded is not served until a later reload succeeds.
//! - [`watch_loop`]: re-runs [`reload`] whenever a trigger fires (a watch event on the kube
//!   store's CA Secrets, or a poll tick for the local store) and publishes the new snapshot
//!   only when something changed.
//!
//! CA rotation publishes through the same channel: activate replaces the CA Secrets (a new
//! fingerprint), and each snapshot also carries every CA's trust anchors (its root plus the
//! other side of a rotation in progress), which change at prepare and prune. The kube triggers
//! watch the rotation slot Secrets too, so those changes reach the controllers at once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::watch;

use super::metrics::{CaLabel, Metrics};
use crate::ca::CaMaterial;
use crate::error::{Error, Result};
use crate::issue::Issuer;
use crate::store::{load_issuer, Store};

/// One generation of the served CAs.
#[derive(Debug, Default)]
pub struct IssuerSet {
    issuers: BTreeMap<String, Arc<dyn Issuer>>,
    fingerprints: BTreeMap<String, String>,
    /// PEM of each CA's anchors ([`crate::store::ca_anchors`]); absent: the CA's root alone.
    anchors: BTreeMap<String, String>,
    /// CAs that failed to load and are not served, with the reason.
    failed: BTreeMap<String, String>,
}

/// The receiving side: the current snapshot, and a way to wait for the next one.
pub type IssuerWatch = watch::Receiver<Arc<IssuerSet>>;

impl IssuerSet {
    /// A snapshot of fixed issuers (tests, examples, callers that never reload).
    pub fn fixed(issuers: BTreeMap<String, Arc<dyn Issuer>>) -> Self {
        let fingerprints = issuers
            .iter()
            .map(|(n, i)| {
                let fp = i
                    .ca_certificate()
                    .map(|c| {
                        crate::pemutil::hex(
                            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, c).as_ref(),
                        )
                    })
                    .unwrap_or_default();
                (n.clone(), fp)
            })
            .collect();
        IssuerSet {
            issuers,
            fingerprints,
            anchors: BTreeMap::new(),
            failed: BTreeMap::new(),
        }
    }

    /// A watch that always shows `issuers` (its sender is dropped at once; receivers keep the
    /// value).
    pub fn watch_fixed(issuers: BTreeMap<String, Arc<dyn Issuer>>) -> IssuerWatch {
        watch::channel(Arc::new(Self::fixed(issuers))).1
    }

    /// The issuer of CA `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Issuer>> {
        self.issuers.get(name)
    }

    /// Whether CA `name` is served.
    pub fn contains(&self, name: &str) -> bool {
        self.issuers.contains_key(name)
    }

    /// The served CA names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.issuers.keys().cloned().collect()
    }

    /// Number of CAs.
    pub fn len(&self) -> usize {
        self.issuers.len()
    }

    /// Whether no CA is served.
    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// The trust anchors of CA `name` as PEM, both roots during a rotation (`None`: only its
    /// own root, e.g. a fixed snapshot).
    pub fn anchors_pem(&self, name: &str) -> Option<&str> {
        self.anchors.get(name).map(String::as_str)
    }

    /// CAs that failed to load and are not served (name -> one-line reason, no key material).
    pub fn failed(&self) -> &BTreeMap<String, String> {
        &self.failed
    }

    /// The fingerprint of CA `name` (SHA-256 over its stored certificate and facts).
    pub fn fingerprint(&self, name: &str) -> Option<&str> {
        self.fingerprints.get(name).map(String::as_str)
    }
}

/// SHA-256 over a CA's certificate and its stored facts (policy included), hex.
pub fn ca_fingerprint(ca: &CaMaterial) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(ca.cert.as_ref());
    for p in &ca.parents {
        ctx.update(p.as_ref());
    }
    ctx.update(
        serde_json::to_string(&ca.meta)
            .unwrap_or_default()
            .as_bytes(),
    );
    crate::pemutil::hex(ctx.finish().as_ref())
}

fn record_expiry(metrics: &Metrics, name: &str, ca: &CaMaterial) {
    if let Ok(info) = ca.info() {
        metrics
            .ca_expiration
            .get_or_create(&CaLabel {
                ca: name.to_string(),
            })
            .set(info.not_after.unix_timestamp());
    }
}

/// What loading one CA came to.
enum Loaded {
    /// Served with this issuer and fingerprint.
    Served(Arc<dyn Issuer>, String),
    /// Removed from the store (after start-up): no longer served.
    Removed,
    /// Not served: its stored content fails to load, or it could not be read and was not
    /// served before.
    Failed(Error),
}

/// Loads CA `n`, reusing the previous issuer when its content is unchanged, or when a
/// transient error hides the content. `Err` only for a CA named at start-up that does not
/// exist.
async fn load_one(
    store: &dyn Store,
    n: &str,
    previous: Option<&IssuerSet>,
    metrics: &Metrics,
) -> Result<Loaded> {
    let kept = |e: &Error| {
        let p = previous.filter(|_| super::retryable(e))?;
        Some((p.get(n)?.clone(), p.fingerprint(n)?.to_string()))
    };
    let ca = match store.load_ca(n).await {
        Ok(ca) => ca,
        Err(Error::UnknownCa(_)) if previous.is_some() => {
            tracing::warn!(ca = %n, "CA removed from the store: no longer served");
            return Ok(Loaded::Removed);
        }
        Err(e @ Error::UnknownCa(_)) => return Err(e),
        Err(e) => {
            return Ok(match kept(&e) {
                Some((i, fp)) => {
                    count_error(metrics, n);
                    tracing::error!(ca = %n, error = %e, "CA could not be read; keeping the loaded one");
                    Loaded::Served(i, fp)
                }
                None => Loaded::Failed(e),
            })
        }
    };
    let fp = ca_fingerprint(&ca);
    if let Some(i) = previous
        .filter(|p| p.fingerprint(n) == Some(fp.as_str()))
        .and_then(|p| p.get(n))
    {
        return Ok(Loaded::Served(i.clone(), fp));
    }
    record_expiry(metrics, n, &ca);
    match load_issuer(store, n).await {
        Ok(i) => {
            if previous.is_some() {
                tracing::info!(ca = %n, fingerprint = %fp, "CA loaded (new or replaced)");
            }
            Ok(Loaded::Served(Arc::from(i), fp))
        }
        Err(e) => Ok(match kept(&e) {
            Some((i, old)) => {
                count_error(metrics, n);
                tracing::error!(ca = %n, error = %e, "changed CA could not be reached; keeping the loaded one");
                Loaded::Served(i, old)
            }
            None => Loaded::Failed(e),
        }),
    }
}

fn ca_label(n: &str) -> CaLabel {
    CaLabel { ca: n.to_string() }
}

fn count_error(metrics: &Metrics, n: &str) {
    metrics.ca_load_errors.get_or_create(&ca_label(n)).inc();
}

/// Builds the next snapshot from `store`: every CA (`names` `None`) or the named ones.
/// `previous` supplies the issuers of unchanged CAs (see the module docs for CAs that fail to
/// load: they are left out and listed in [`IssuerSet::failed`]). Errors: the store cannot
/// list its CAs, a CA named at start-up does not exist, or nothing at all can be served at
/// start-up.
pub async fn reload(
    store: &dyn Store,
    names: Option<&[String]>,
    previous: Option<&IssuerSet>,
    metrics: &Metrics,
) -> Result<IssuerSet> {
    let names = match names {
        Some(n) => n.to_vec(),
        None => store.list_cas().await?,
    };
    let mut next = IssuerSet::default();
    for n in names {
        match load_one(store, &n, previous, metrics).await? {
            Loaded::Served(i, fp) => {
                metrics.set_ca_ready(&n, true);
                next.issuers.insert(n.clone(), i);
                next.fingerprints.insert(n, fp);
            }
            Loaded::Removed => {}
            Loaded::Failed(e) => {
                count_error(metrics, &n);
                metrics.set_ca_ready(&n, false);
                let reason = e.to_string();
                tracing::error!(ca = %n, error = %reason, "CA could not be loaded; not served (nothing is issued for it)");
                if previous.and_then(|p| p.failed.get(&n)) != Some(&reason) {
                    store.report_ca_load_failure(&n, &reason).await;
                }
                next.failed.insert(n, reason);
            }
        }
    }
    // A CA listed before and gone from the store now (not listed, or named and missing)
    // leaves no series behind.
    if let Some(p) = previous {
        for n in p.issuers.keys().chain(p.failed.keys()) {
            if !next.issuers.contains_key(n) && !next.failed.contains_key(n) {
                metrics.forget_ca(n);
            }
        }
    }
    for n in next.issuers.keys().cloned().collect::<Vec<_>>() {
        let pem = match crate::store::ca_anchors(store, &n).await {
            Ok(a) if !a.is_empty() => Some(crate::bundle::to_pem(&a)),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(ca = %n, error = %e, "CA anchors could not be read; keeping the loaded ones");
                previous.and_then(|p| p.anchors_pem(&n)).map(str::to_string)
            }
        };
        if let Some(pem) = pem {
            next.anchors.insert(n, pem);
        }
    }
    if previous.is_none() && next.is_empty() {
        let why: Vec<String> = next
            .failed
            .iter()
            .map(|(n, e)| format!("CA {n}: {e}"))
            .collect();
        return Err(Error::Store(if why.is_empty() {
            format!("no CA to serve in {}", store.describe())
        } else {
            format!("no CA to serve in {}: {}", store.describe(), why.join("; "))
        }));
    }
    Ok(next)
}

/// Whether two snapshots serve the same CAs with the same fingerprints and anchors.
fn same(a: &IssuerSet, b: &IssuerSet) -> bool {
    a.fingerprints == b.fingerprints && a.anchors == b.anchors && a.failed == b.failed
}

/// Reloads on every item of `triggers` until it ends or `stop` fires, publishing a snapshot
/// on `tx` when it differs from the current one. Reload errors are logged and the current
/// snapshot stays.
pub async fn watch_loop(
    store: Arc<dyn Store>,
    names: Option<Vec<String>>,
    metrics: Arc<Metrics>,
    tx: watch::Sender<Arc<IssuerSet>>,
    triggers: impl Stream<Item = ()> + Send,
    stop: impl std::future::Future<Output = ()> + Send,
) {
    let mut triggers = std::pin::pin!(triggers);
    let mut stop = std::pin::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            t = triggers.next() => if t.is_none() { return },
        }
        let current = tx.borrow().clone();
        match reload(store.as_ref(), names.as_deref(), Some(&current), &metrics).await {
            Ok(next) if !same(&next, &current) => {
                tracing::info!(cas = ?next.names(), "served CAs changed");
                metrics.ca_reloads.inc();
                tx.send_replace(Arc::new(next));
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "reloading the CAs failed; keeping the current ones")
            }
        }
    }
}

/// A trigger every `every` (the local store: the home directory is re-read and compared).
pub fn poll_triggers(every: Duration) -> impl Stream<Item = ()> + Send {
    futures::stream::unfold(
        tokio::time::interval_at(tokio::time::Instant::now() + every, every),
        |mut iv| async move {
            iv.tick().await;
            Some(((), iv))
        },
    )
}

/// A trigger per change of the kube store's CA Secrets (label `meshca.io/ca`) in
/// `namespace`, plus a slow poll as a safety net. Watch errors are retried by the watcher
/// with its default backoff.
pub fn kube_triggers(
    client: kube::Client,
    namespace: &str,
    safety_poll: Duration,
) -> impl Stream<Item = ()> + Send {
    use k8s_openapi::api::core::v1::Secret;
    use kube::core::PartialObjectMeta;
    use kube::runtime::watcher;
    // Metadata only: the watch never carries the CA keys.
    let api: kube::Api<PartialObjectMeta<Secret>> = kube::Api::namespaced(client, namespace);
    let cfg = watcher::Config::default().labels(&format!(
        "{}={},{}",
        super::LABEL_MANAGED_BY,
        super::MANAGED_BY,
        super::LABEL_CA
    ));
    // A rotation's slot Secrets (prepare writes the next CAs, prune removes the previous).
    let slots = watcher::Config::default().labels(&format!(
        "{}={},{}",
        super::LABEL_MANAGED_BY,
        super::MANAGED_BY,
        super::store_rotation::LABEL_ROTATION
    ));
    let events = |cfg| {
        watcher(api.clone(), cfg).filter_map(|ev| async move {
            match ev {
                Ok(watcher::Event::Apply(_))
                | Ok(watcher::Event::Delete(_))
                | Ok(watcher::Event::InitDone) => Some(()),
                Ok(_) => None,
                Err(e) => {
                    tracing::debug!(error = %e, "CA Secret watch error");
                    None
                }
            }
        })
    };
    futures::stream::select(
        futures::stream::select(events(cfg), events(slots)),
        poll_triggers(safety_poll),
    )
}

/// A stream that yields once per new snapshot on `rx` (for `Controller::reconcile_all_on`).
pub fn changes(rx: IssuerWatch) -> impl Stream<Item = ()> + Send {
    futures::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// [`same`] for other modules' tests.
    pub(crate) fn same_pub(a: &IssuerSet, b: &IssuerSet) -> bool {
        same(a, b)
    }
    use crate::ca::{create_root, CaSpec};
    use crate::store::LocalStore;

    #[tokio::test]
    async fn reload_picks_up_created_replaced_and_removed_cas() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::create(dir.path().join("home")).unwrap();
        let now = time::OffsetDateTime::now_utc();
        let a = create_root(&CaSpec::root("a"), now).unwrap();
        store.save_ca(&a, false).await.unwrap();
        let m = Metrics::new();
        let first = reload(&store, None, None, &m).await.unwrap();
        assert_eq!(first.names(), vec!["a"]);
        let a_issuer = first.get("a").unwrap().clone();
        // Unchanged: the same issuer object is kept.
        let again = reload(&store, None, Some(&first), &m).await.unwrap();
        assert!(same(&first, &again));
        assert!(Arc::ptr_eq(again.get("a").unwrap(), &a_issuer));
        // Created.
        store
            .save_ca(&create_root(&CaSpec::root("b"), now).unwrap(), false)
            .await
            .unwrap();
        let second = reload(&store, None, Some(&again), &m).await.unwrap();
        assert_eq!(second.names(), vec!["a", "b"]);
        // Replaced under the same name (same DN, new key): a new issuer with the new cert.
        let a2 = create_root(&CaSpec::root("a"), now).unwrap();
        assert_eq!(a2.info().unwrap().subject, a.info().unwrap().subject);
        store.save_ca(&a2, true).await.unwrap();
        let third = reload(&store, None, Some(&second), &m).await.unwrap();
        assert!(!same(&second, &third));
        assert_eq!(
            third.get("a").unwrap().ca_certificate().unwrap(),
            &a2.cert,
            "the replaced CA signs from now on"
        );
        // Removed from the store while every CA is listed: `b` is no longer served and its
        // series are gone (no stale expiry or readiness).
        let text = m.render();
        for series in [
            "meshca_ca_expiration_timestamp_seconds{ca=\"b\"}",
            "meshca_ca_ready_status{ca=\"b\",condition=\"True\"} 1",
        ] {
            assert!(text.contains(series), "{series} not in {text}");
        }
        std::fs::remove_dir_all(dir.path().join("home/cas/b")).unwrap();
        let without_b = reload(&store, None, Some(&third), &m).await.unwrap();
        assert_eq!(without_b.names(), vec!["a"]);
        let text = m.render();
        assert!(!text.contains("ca=\"b\""), "stale series of b: {text}");
        assert!(
            text.contains("meshca_ca_ready_status{ca=\"a\",condition=\"True\"} 1"),
            "{text}"
        );
        // Removed (named explicitly, so it is looked up and found missing).
        let names = vec!["a".to_string(), "gone".to_string()];
        let fourth = reload(&store, Some(&names), Some(&third), &m)
            .await
            .unwrap();
        assert_eq!(fourth.names(), vec!["a"]);
        assert!(!m.render().contains("ca=\"gone\""));
        // At start-up a missing named CA is an error.
        assert!(reload(&store, Some(&names), None, &m).await.is_err());
    }

    /// Adds an unknown key to CA `name`'s stored policy (the local store's meta.json).
    fn break_policy(home: &std::path::Path, name: &str) {
        let path = home.join("cas").join(name).join("meta.json");
        let mut meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        meta["policy"]["pod_certificate"] = serde_json::json!(true);
        std::fs::write(&path, serde_json::to_vec(&meta).unwrap()).unwrap();
    }

    /// Issue 17: one CA that failed to load stopped the signer for every CA at start-up, and
    /// a changed CA that failed to load kept signing under its previous policy.
    #[tokio::test]
    async fn a_ca_that_fails_to_load_is_isolated_and_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let store = LocalStore::create(&home).unwrap();
        let now = time::OffsetDateTime::now_utc();
        for n in ["a", "b"] {
            store
                .save_ca(&create_root(&CaSpec::root(n), now).unwrap(), false)
                .await
                .unwrap();
        }
        break_policy(&home, "b");
        let m = Metrics::new();
        // Start-up: `a` is served, `b` is not, and says why.
        let first = reload(&store, None, None, &m).await.unwrap();
        assert_eq!(first.names(), vec!["a"]);
        let why = &first.failed()["b"];
        assert!(why.contains("pod_certificate"), "{why}");
        let text = m.render();
        for line in [
            "meshca_ca_ready_status{ca=\"a\",condition=\"True\"} 1",
            "meshca_ca_ready_status{ca=\"a\",condition=\"False\"} 0",
            "meshca_ca_ready_status{ca=\"b\",condition=\"True\"} 0",
            "meshca_ca_ready_status{ca=\"b\",condition=\"False\"} 1",
            "meshca_ca_load_errors_total{ca=\"b\"} 1",
        ] {
            assert!(text.contains(line), "{line} not in {text}");
        }
        // At run time `a`'s policy is changed into one that fails to load: `a` stops being
        // served (fail closed), it does not keep its previous issuer.
        break_policy(&home, "a");
        let second = reload(&store, None, Some(&first), &m).await.unwrap();
        assert!(second.is_empty(), "{:?}", second.names());
        assert_eq!(second.failed().keys().collect::<Vec<_>>(), vec!["a", "b"]);
        assert!(!same(&first, &second));
        let text = m.render();
        assert!(
            text.contains("meshca_ca_ready_status{ca=\"a\",condition=\"False\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("meshca_ca_load_errors_total{ca=\"a\"} 1"),
            "{text}"
        );
        // Fixed: served again.
        store
            .save_ca(&create_root(&CaSpec::root("a"), now).unwrap(), true)
            .await
            .unwrap();
        let third = reload(&store, None, Some(&second), &m).await.unwrap();
        assert_eq!(third.names(), vec!["a"]);
        assert!(m
            .render()
            .contains("meshca_ca_ready_status{ca=\"a\",condition=\"True\"} 1"));
        // Nothing at all to serve at start-up is an error naming each CA's failure.
        break_policy(&home, "a");
        let e = reload(&store, None, None, &m)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("CA a:") && e.contains("CA b:"), "{e}");
    }

    /// Issue 17, in the cluster: a CA Secret whose policy no longer loads stops the CA and
    /// publishes one Warning Event on the Secret (not again while the reason is the same).
    #[tokio::test]
    async fn a_kube_ca_that_fails_to_reload_gets_an_event_and_is_not_served() {
        use crate::kube::store::{ca_secret_manifest, KubeStore, ANNOTATION_META};
        use crate::kube::testutil::{json as resp, mock_client, next};
        let ca = create_root(&CaSpec::root("mesh"), time::OffsetDateTime::now_utc()).unwrap();
        let mut secret = ca_secret_manifest(&ca, "meshca").unwrap();
        let meta = secret["metadata"]["annotations"][ANNOTATION_META]
            .as_str()
            .unwrap()
            .replace(
                "\"auto_approve\":false",
                "\"auto_approve\":false,\"bogus\":1",
            );
        assert!(meta.contains("bogus"), "{meta}");
        secret["metadata"]["annotations"][ANNOTATION_META] = serde_json::json!(meta);
        let (client, mut h) = mock_client();
        let store = KubeStore::new(client, "meshca");
        let served = IssuerSet::fixed(
            [(
                "mesh".to_string(),
                Arc::new(crate::issue::LocalIssuer::new(ca).unwrap()) as Arc<dyn Issuer>,
            )]
            .into_iter()
            .collect(),
        );
        let server = tokio::spawn(async move {
            for round in 0..2 {
                let (req, _, send) = next(&mut h).await;
                assert_eq!(req.method(), "GET");
                assert_eq!(
                    req.uri().path(),
                    "/api/v1/namespaces/meshca/secrets/meshca-ca-mesh"
                );
                send.send_response(resp(200, &secret));
                if round == 1 {
                    break;
                }
                let (req, ev, send) = next(&mut h).await;
                assert_eq!(req.method(), "POST");
                assert_eq!(
                    req.uri().path(),
                    "/apis/events.k8s.io/v1/namespaces/meshca/events"
                );
                assert_eq!(ev["type"], "Warning");
                assert_eq!(ev["reason"], "CaLoadFailed");
                assert_eq!(ev["regarding"]["kind"], "Secret");
                assert_eq!(ev["regarding"]["name"], "meshca-ca-mesh");
                let note = ev["note"].as_str().unwrap();
                assert!(
                    note.contains("CA mesh is not served") && note.contains("bogus"),
                    "{note}"
                );
                send.send_response(resp(201, &ev));
            }
            // The same failure again: no second Event.
            assert!(
                tokio::time::timeout(Duration::from_millis(200), h.next_request())
                    .await
                    .is_err()
            );
        });
        let m = Metrics::new();
        let names = vec!["mesh".to_string()];
        let next_set = reload(&store, Some(&names), Some(&served), &m)
            .await
            .unwrap();
        assert!(
            next_set.is_empty(),
            "fail closed: the old issuer is not kept"
        );
        assert!(next_set.failed()["mesh"].contains("bogus"));
        let again = reload(&store, Some(&names), Some(&next_set), &m)
            .await
            .unwrap();
        assert!(same(&next_set, &again));
        server.await.unwrap();
        assert!(m
            .render()
            .contains("meshca_ca_ready_status{ca=\"mesh\",condition=\"False\"} 1"));
    }

    #[tokio::test]
    async fn watch_loop_publishes_only_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(LocalStore::create(dir.path().join("home")).unwrap());
        let now = time::OffsetDateTime::now_utc();
        store
            .save_ca(&create_root(&CaSpec::root("a"), now).unwrap(), false)
            .await
            .unwrap();
        let m = Arc::new(Metrics::new());
        let first = reload(store.as_ref(), None, None, &m).await.unwrap();
        let (tx, mut rx) = watch::channel(Arc::new(first));
        let (trig_tx, trig_rx) = futures::channel::mpsc::unbounded::<()>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(watch_loop(
            store.clone(),
            None,
            m,
            tx,
            trig_rx,
            async move {
                let _ = stop_rx.await;
            },
        ));
        rx.mark_unchanged();
        // A trigger with nothing changed publishes nothing.
        trig_tx.unbounded_send(()).unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), rx.changed())
                .await
                .is_err()
        );
        // A replaced CA is published.
        store
            .save_ca(&create_root(&CaSpec::root("a"), now).unwrap(), true)
            .await
            .unwrap();
        trig_tx.unbounded_send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("published")
            .unwrap();
        stop_tx.send(()).unwrap();
        task.await.unwrap();
    }
}
