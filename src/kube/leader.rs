//! Leader election on a `coordination.k8s.io/v1` Lease, so that two replicas never both act.
//!
//! The Lease itself is driven by the maintained
//! [`kube-lease-manager`](https://docs.rs/kube-lease-manager) crate (it matches kube 5). This
//! module adds the policy around it, published through a `tokio::sync::watch` of `bool`:
//!
//! - **Step down on any error.** If renewing or reading the Lease fails, meshca stops acting
//!   at once (publishes `false`) instead of assuming it still leads, then rebuilds the lease
//!   manager with backoff. A fresh manager reports `true` again as soon as the Lease is
//!   (still or again) ours.
//! - **Release on shutdown**, so that a rolling update hands over without waiting for expiry.
//!
//! Leadership is an efficiency and sanity measure, not the only guard: a CSR's certificate is
//! written with a resourceVersion precondition and `status.certificate` is immutable, so even a
//! deposed leader that still believes it leads cannot sign a CSR a second time.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::error::{Error, Result};

/// Lease settings.
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    /// Lease name.
    pub lease_name: String,
    /// Lease namespace.
    pub namespace: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// How long a Lease stays valid after its last renewal.
    pub lease_duration: Duration,
    /// How long before expiry the holder renews.
    pub renew_grace: Duration,
}

impl LeaderConfig {
    /// Defaults: lease `meshca-signer`, 15 s duration, renewal 5 s before expiry.
    pub fn new(namespace: impl Into<String>, identity: impl Into<String>) -> Self {
        LeaderConfig {
            lease_name: "meshca-signer".into(),
            namespace: namespace.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_grace: Duration::from_secs(5),
        }
    }

    fn validate(&self) -> Result<()> {
        let d = self.lease_duration.as_secs();
        let g = self.renew_grace.as_secs();
        if d == 0 || g == 0 || g >= d {
            return Err(Error::invalid(
                "leader election",
                format!("lease duration ({d} s) and renew grace ({g} s) must be positive whole seconds with grace < duration"),
            ));
        }
        if self.identity.is_empty() {
            return Err(Error::invalid("leader election", "identity is empty"));
        }
        Ok(())
    }
}

/// One lease manager instance, as the election loop sees it.
#[async_trait]
pub trait LeaseBackend: Send + Sync {
    /// Waits until this replica's leadership changes and returns the new state.
    async fn changed(&self) -> std::result::Result<bool, String>;
    /// Gives the Lease up if held.
    async fn release(&self) -> std::result::Result<(), String>;
}

#[async_trait]
impl LeaseBackend for kube_lease_manager::LeaseManager {
    async fn changed(&self) -> std::result::Result<bool, String> {
        kube_lease_manager::LeaseManager::changed(self)
            .await
            .map_err(|e| e.to_string())
    }
    async fn release(&self) -> std::result::Result<(), String> {
        kube_lease_manager::LeaseManager::release(self)
            .await
            .map_err(|e| e.to_string())
    }
}

/// A leadership flag that is always `true` (leader election disabled: one replica only).
pub fn always_leader() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(true);
    // Keep the sender alive for the life of the process so `changed()` never errors.
    std::mem::forget(tx);
    rx
}

const MIN_BACKOFF: Duration = Duration::from_millis(500);
/// Longest wait for the Lease release on shutdown (an unreachable API server must not hold
/// the process).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The election loop: builds a backend with `make`, publishes its leadership changes on `tx`,
/// steps down and rebuilds on errors, and releases on `shutdown`.
pub async fn drive<B, M, F>(make: M, tx: watch::Sender<bool>, shutdown: impl Future<Output = ()>)
where
    B: LeaseBackend,
    M: Fn() -> F,
    F: Future<Output = std::result::Result<B, String>>,
{
    tokio::pin!(shutdown);
    let mut backoff = MIN_BACKOFF;
    loop {
        let backend = tokio::select! {
            _ = &mut shutdown => { tx.send_replace(false); return; }
            b = make() => b,
        };
        let backend = match backend {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "cannot set up the leader lease; retrying");
                tx.send_replace(false);
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        loop {
            tokio::select! {
                _ = &mut shutdown => {
                    tx.send_replace(false);
                    match tokio::time::timeout(RELEASE_TIMEOUT, backend.release()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::warn!(error = %e, "releasing the leader lease failed"),
                        Err(_) => tracing::warn!("releasing the leader lease timed out; it expires by itself"),
                    }
                    return;
                }
                r = backend.changed() => match r {
                    Ok(leading) => {
                        backoff = MIN_BACKOFF;
                        if *tx.borrow() != leading {
                            tracing::info!(leading, "leadership changed");
                        }
                        tx.send_replace(leading);
                    }
                    Err(e) => {
                        if *tx.borrow() {
                            tracing::warn!(error = %e, "lease error: stepping down");
                        } else {
                            tracing::warn!(error = %e, "lease error");
                        }
                        tx.send_replace(false);
                        break;
                    }
                }
            }
        }
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Starts leader election on a Lease. Returns the leadership flag and the election task,
/// which ends (after releasing the Lease) when `shutdown` completes.
pub fn start(
    client: kube::Client,
    cfg: LeaderConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(watch::Receiver<bool>, tokio::task::JoinHandle<()>)> {
    cfg.validate()?;
    let (tx, rx) = watch::channel(false);
    let make = move || {
        let client = client.clone();
        let cfg = cfg.clone();
        async move {
            let params = kube_lease_manager::LeaseParams::new(
                cfg.identity.clone(),
                cfg.lease_duration.as_secs(),
                cfg.renew_grace.as_secs(),
            )
            .with_field_manager(format!("meshca-leader-{}", cfg.identity));
            kube_lease_manager::LeaseManager::new(
                client,
                cfg.lease_name.clone(),
                cfg.namespace.clone(),
                params,
                kube_lease_manager::LeaseCreateMode::AutoCreate,
            )
            .await
            .map_err(|e| e.to_string())
        }
    };
    let task = tokio::spawn(drive(make, tx, shutdown));
    Ok((rx, task))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    type Script = VecDeque<std::result::Result<bool, String>>;

    /// A scripted backend: each `changed()` pops the next result; an empty script waits forever.
    struct Scripted {
        script: Arc<Mutex<Script>>,
        released: Arc<Mutex<u32>>,
    }

    #[async_trait]
    impl LeaseBackend for Scripted {
        async fn changed(&self) -> std::result::Result<bool, String> {
            let next = self.script.lock().unwrap().pop_front();
            match next {
                Some(r) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    r
                }
                None => std::future::pending().await,
            }
        }
        async fn release(&self) -> std::result::Result<(), String> {
            *self.released.lock().unwrap() += 1;
            Ok(())
        }
    }

    async fn wait_for(rx: &mut watch::Receiver<bool>, want: bool) {
        tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|v| *v == want))
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn steps_down_on_error_and_rebuilds_to_lead_again() {
        let scripts: Arc<Mutex<VecDeque<Script>>> = Arc::new(Mutex::new(VecDeque::from(vec![
            VecDeque::from(vec![
                Ok(true),
                Err("renew failed: connection refused".to_string()),
            ]),
            VecDeque::from(vec![Ok(true)]),
        ])));
        let built = Arc::new(Mutex::new(0u32));
        let released = Arc::new(Mutex::new(0u32));
        let (tx, mut rx) = watch::channel(false);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (s2, b2, r2) = (scripts.clone(), built.clone(), released.clone());
        let task = tokio::spawn(drive(
            move || {
                let s = s2.lock().unwrap().pop_front().unwrap_or_default();
                *b2.lock().unwrap() += 1;
                let r = r2.clone();
                async move {
                    Ok(Scripted {
                        script: Arc::new(Mutex::new(s)),
                        released: r,
                    })
                }
            },
            tx,
            async move {
                let _ = stop_rx.await;
            },
        ));
        wait_for(&mut rx, true).await;
        wait_for(&mut rx, false).await; // the renew error made it step down
        wait_for(&mut rx, true).await; // a rebuilt manager leads again
        assert_eq!(*built.lock().unwrap(), 2);
        stop_tx.send(()).unwrap();
        task.await.unwrap();
        assert!(!*rx.borrow(), "not leading after shutdown");
        assert_eq!(*released.lock().unwrap(), 1, "lease released on shutdown");
    }

    #[tokio::test(start_paused = true)]
    async fn setup_failures_back_off_and_never_lead() {
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let a2 = attempts.clone();
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(drive(
            move || {
                a2.lock().unwrap().push(tokio::time::Instant::now());
                async { Err::<Scripted, _>("forbidden".to_string()) }
            },
            tx,
            tokio::time::sleep(Duration::from_secs(20)),
        ));
        task.await.unwrap();
        assert!(!*rx.borrow());
        let a = attempts.lock().unwrap();
        // 0.5 + 1 + 2 + 4 + 8 = 15.5 s; the next wait (16 s) outlasts the 20 s shutdown.
        assert_eq!(a.len(), 6, "{a:?}");
        let gaps: Vec<u128> = a.windows(2).map(|w| (w[1] - w[0]).as_millis()).collect();
        assert_eq!(gaps, vec![500, 1000, 2000, 4000, 8000]);
    }

    #[test]
    fn config_is_validated() {
        let mut c = LeaderConfig::new("meshca", "pod-a");
        c.validate().unwrap();
        c.renew_grace = c.lease_duration;
        assert!(c.validate().is_err());
        let c = LeaderConfig::new("meshca", "");
        assert!(c.validate().is_err());
    }

    /// A minimal Lease endpoint on the tower-test mock: get, create, and both patch kinds
    /// (server-side apply and strategic merge) merged into `spec`; records field managers.
    async fn serve_lease(
        mut h: tower_test::mock::Handle<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >,
        managers: Arc<Mutex<Vec<String>>>,
        lease: Arc<Mutex<Option<serde_json::Value>>>,
    ) {
        use crate::kube::testutil::next;
        loop {
            let (req, body, send) = next(&mut h).await;
            let base = "/apis/coordination.k8s.io/v1/namespaces/meshca/leases";
            if req.method() == "POST" {
                assert_eq!(req.uri().path(), base);
            } else {
                assert_eq!(req.uri().path(), format!("{base}/meshca-signer"));
            }
            if req.method() == "PATCH" {
                let q = req.uri().query().unwrap_or("").to_string();
                if let Some(fm) = q.split('&').find_map(|kv| kv.strip_prefix("fieldManager=")) {
                    managers.lock().unwrap().push(fm.to_string());
                }
            }
            send.send_response(answer_lease(&req, &body, &lease));
        }
    }

    /// The answer of a one-Lease API server to `req`: get, create, and both patch kinds
    /// merged into `spec`.
    pub(crate) fn answer_lease(
        req: &http::Request<()>,
        body: &serde_json::Value,
        lease: &Mutex<Option<serde_json::Value>>,
    ) -> http::Response<kube::client::Body> {
        use crate::kube::testutil::{json, status};
        let mut l = lease.lock().unwrap();
        match req.method().as_str() {
            "GET" => match l.clone() {
                Some(v) => json(200, &v),
                None => status(404, "NotFound", "leases not found"),
            },
            "POST" => {
                let mut v = body.clone();
                v["metadata"]["resourceVersion"] = serde_json::json!("1");
                *l = Some(v.clone());
                json(201, &v)
            }
            "PATCH" => {
                let mut v = l.clone().expect("patch of an existing lease");
                for (k, val) in body["spec"].as_object().unwrap() {
                    if val.is_null() {
                        v["spec"].as_object_mut().map(|o| o.remove(k));
                    } else {
                        v["spec"][k] = val.clone();
                    }
                }
                *l = Some(v.clone());
                json(200, &v)
            }
            m => panic!("unexpected {m}"),
        }
    }

    #[tokio::test]
    async fn start_acquires_the_lease_and_releases_it_on_shutdown() {
        let (client, h) = crate::kube::testutil::mock_client();
        let managers = Arc::new(Mutex::new(Vec::new()));
        let lease = Arc::new(Mutex::new(None));
        let server = tokio::spawn(serve_lease(h, managers.clone(), lease.clone()));
        let mut cfg = LeaderConfig::new("meshca", "pod-a");
        cfg.lease_duration = Duration::from_secs(3);
        cfg.renew_grace = Duration::from_secs(1);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (mut rx, task) = start(client, cfg, async move {
            let _ = stop_rx.await;
        })
        .unwrap();
        wait_for(&mut rx, true).await;
        {
            let l = lease.lock().unwrap().clone().unwrap();
            assert_eq!(l["metadata"]["name"], "meshca-signer");
            assert_eq!(l["spec"]["holderIdentity"], "pod-a");
            assert_eq!(l["spec"]["leaseDurationSeconds"], 3);
        }
        stop_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
        assert!(!*rx.borrow());
        let l = lease.lock().unwrap().clone().unwrap();
        assert!(l["spec"].get("holderIdentity").is_none(), "released: {l}");
        assert!(
            managers
                .lock()
                .unwrap()
                .iter()
                .all(|m| m == "meshca-leader-pod-a"),
            "{:?}",
            managers.lock().unwrap()
        );
        server.abort();
    }

    #[tokio::test]
    async fn two_candidates_one_leader_and_takeover_after_the_leader_dies() {
        let lease = Arc::new(Mutex::new(None));
        let mut servers = Vec::new();
        let mut candidates = Vec::new();
        for id in ["pod-a", "pod-b"] {
            let (client, h) = crate::kube::testutil::mock_client();
            servers.push(tokio::spawn(serve_lease(
                h,
                Arc::new(Mutex::new(Vec::new())),
                lease.clone(),
            )));
            let mut cfg = LeaderConfig::new("meshca", id);
            cfg.lease_duration = Duration::from_secs(2);
            cfg.renew_grace = Duration::from_secs(1);
            candidates.push(start(client, cfg, std::future::pending()).unwrap());
            if id == "pod-a" {
                // Let pod-a win deterministically.
                wait_for(&mut candidates[0].0, true).await;
            }
        }
        // For a while, exactly one leads: pod-a keeps renewing, pod-b waits.
        for _ in 0..30 {
            assert!(
                *candidates[0].0.borrow() && !*candidates[1].0.borrow(),
                "exactly one leader"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Kill pod-a without releasing: pod-b takes over once the lease expires.
        let killed_at = std::time::Instant::now();
        candidates[0].1.abort();
        wait_for(&mut candidates[1].0, true).await;
        assert!(
            killed_at.elapsed() <= Duration::from_secs(10),
            "{:?}",
            killed_at.elapsed()
        );
        assert_eq!(
            lease.lock().unwrap().clone().unwrap()["spec"]["holderIdentity"],
            "pod-b"
        );
        for s in servers {
            s.abort();
        }
    }
}
