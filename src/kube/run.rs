//! `meshca signer run`: loads the CAs, serves health and metrics, elects a leader and, while
//! leading, runs the CSR controller, the managed-Secret controllers and the bundle sync.
//! Followers keep their CAs loaded and report ready, so a takeover only waits for the Lease.
//! The CAs are reloaded whenever the store changes ([`CaReload`]), on leader and followers
//! alike. Every certificate issued is recorded in the ledger (`RunConfig::ledger`).
//!
//! A session (the controllers of one leadership) ends when the Lease is lost or on shutdown.
//! Controllers that never listed stop at once (nothing is in flight); the others get
//! [`RunConfig::shutdown_grace`] to finish in-flight reconciles and are aborted after it, so
//! neither a lost Lease nor SIGTERM waits on a controller that cannot list. Shutdown
//! (SIGTERM, Ctrl-C or the caller's future) then releases the Lease and flushes the ledger,
//! each within a bound.
//!
//! A controller that cannot list (a 403 where a Role is missing, an API outage) does not make
//! the leader step down: the other controllers go on working, it retries with backoff, and
//! `/readyz` and `meshca_controller_ready` name it ([`super::health`]). Stepping down would
//! stop the working controllers too and hand the same failure to the next replica, which has
//! the same RBAC and reaches the same API server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::bundles;
use super::issuers;
use super::leader::{self, LeaderConfig};
use super::ledger::{LedgerSink, LedgerWriter};
use super::managed::Managed;
use super::metrics::{self, Metrics};
use super::ratelimit::RateLimiter;
use super::signer::{Signer, SignerConfig};
use crate::clock::{Clock, SystemClock};
use crate::error::{Error, Result};
use crate::store::Store;

/// How the served CAs follow the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaReload {
    /// Loaded once at start-up.
    Off,
    /// Re-read every interval (the local store).
    Poll(Duration),
    /// Watch the CA Secrets of the kube store in this namespace (plus a slow safety poll).
    KubeWatch {
        /// The store's namespace.
        namespace: String,
    },
}

/// Everything `meshca signer run` takes.
#[derive(Debug)]
pub struct RunConfig {
    /// Where the CAs and bundles are.
    pub store: Arc<dyn Store>,
    /// CAs to serve (`None`: every CA in the store).
    pub cas: Option<Vec<String>>,
    /// CSR controller settings.
    pub signer: SignerConfig,
    /// Client-side rate limit for writes.
    pub qps: f64,
    /// Burst for writes.
    pub burst: u32,
    /// Where to serve /healthz, /readyz, /metrics (`None`: not served).
    pub metrics_addr: Option<SocketAddr>,
    /// Leader election (`None`: always lead; run one replica only).
    pub leader: Option<LeaderConfig>,
    /// Namespaces whose annotated Secrets are managed (`["*"]`: all; empty: off).
    pub managed_namespaces: Vec<String>,
    /// Label selector of the watched Secrets (default [`super::managed::DEFAULT_SELECTOR`];
    /// `None` watches every Secret of the managed namespaces).
    pub managed_selector: Option<String>,
    /// How the CAs are reloaded.
    pub ca_reload: CaReload,
    /// Where issued certificates are recorded (`None`: not recorded).
    pub ledger: Option<Arc<dyn LedgerWriter>>,
    /// This replica's name in Events (`reportingInstance`).
    pub instance: Option<String>,
    /// How often trust-bundle ConfigMaps are re-applied (`None`: off).
    pub bundle_resync: Option<Duration>,
    /// Metrics to record into (`None`: a fresh registry). Lets callers and tests read them.
    pub metrics: Option<Arc<Metrics>>,
    /// Publish one ClusterTrustBundle `meshca.io:<ca>:<suffix>` per served CA, with this
    /// suffix, every `bundle_resync` (`None`: off, the default here; `meshca signer run`
    /// turns it on). Skipped with one log line when the cluster does not serve the API.
    pub cluster_trust_bundles: Option<String>,
    /// Also sign PodCertificateRequests (`--pod-certificates`; skipped, with one log line,
    /// where the cluster does not serve them).
    pub pod_certificates: bool,
    /// How long a session's controllers may take to stop once the Lease is lost or shutdown
    /// is asked for, and the bound on releasing the Lease; what is still running then is
    /// aborted ([`DEFAULT_SHUTDOWN_GRACE`]).
    pub shutdown_grace: Duration,
}

impl RunConfig {
    /// Defaults around a store: every CA, 200 QPS / burst 400, no metrics endpoint, no leader
    /// election, no managed Secrets (selector `meshca.io/managed=true` once enabled), bundles
    /// re-applied every 30 s, CAs re-read every 10 s, the ledger through [`Store::record`].
    pub fn new(store: Arc<dyn Store>) -> Self {
        RunConfig {
            cas: None,
            signer: SignerConfig::default(),
            qps: super::ratelimit::DEFAULT_QPS,
            burst: super::ratelimit::DEFAULT_BURST,
            metrics_addr: None,
            leader: None,
            managed_namespaces: Vec::new(),
            managed_selector: Some(super::managed::DEFAULT_SELECTOR.to_string()),
            bundle_resync: Some(Duration::from_secs(30)),
            metrics: None,
            cluster_trust_bundles: None,
            pod_certificates: false,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            ca_reload: CaReload::Poll(DEFAULT_CA_POLL),
            ledger: Some(Arc::new(super::ledger::StoreLedger(store.clone()))),
            instance: None,
            store,
        }
    }
}

/// How often the local store is re-read for CA changes.
pub const DEFAULT_CA_POLL: Duration = Duration::from_secs(10);
/// The safety poll behind the kube store's CA Secret watch.
pub const KUBE_SAFETY_POLL: Duration = Duration::from_secs(300);
/// [`RunConfig::shutdown_grace`] by default: with the ledger's own flush bound (10 s), a
/// stop fits in a Pod's default 30 s termination grace period.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(8);

async fn until(mut rx: watch::Receiver<bool>, want: bool) {
    // An error means the sender is gone: treat as reached.
    let _ = rx.wait_for(|v| *v == want).await;
}

/// Runs until `shutdown` completes.
pub async fn run(
    client: kube::Client,
    cfg: RunConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let metrics = cfg
        .metrics
        .clone()
        .unwrap_or_else(|| Arc::new(Metrics::new()));
    if let Some(suffix) = &cfg.cluster_trust_bundles {
        super::trust_bundles::validate_suffix(suffix)?;
    }
    // Every task this function starts lives in `bg` (or `session`) and is aborted when the
    // `run` future is dropped, so that cancelling `run` stops the replica at once (like a
    // killed process: no Lease release).
    let mut bg = tokio::task::JoinSet::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    bg.spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    if let Some(addr) = cfg.metrics_addr {
        let m = metrics.clone();
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::Store(format!("cannot listen on {addr}: {e}")))?;
        let stop = until(stop_rx.clone(), true);
        bg.spawn(async move {
            let _ = metrics::serve_listener(m, listener, stop).await;
        });
        tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    }

    let first = issuers::reload(cfg.store.as_ref(), cfg.cas.as_deref(), None, &metrics).await?;
    let names: Vec<String> = first
        .names()
        .iter()
        .map(|c| super::signer_name(c))
        .collect();
    tracing::info!(signers = ?names, "CAs loaded");
    let (issuers_tx, issuers_rx) = watch::channel(Arc::new(first));
    let triggers: Option<futures::stream::BoxStream<'static, ()>> = match &cfg.ca_reload {
        CaReload::Off => None,
        CaReload::Poll(every) => Some(Box::pin(issuers::poll_triggers(*every))),
        CaReload::KubeWatch { namespace } => Some(Box::pin(issuers::kube_triggers(
            client.clone(),
            namespace,
            KUBE_SAFETY_POLL,
        ))),
    };
    if let Some(t) = triggers {
        bg.spawn(issuers::watch_loop(
            cfg.store.clone(),
            cfg.cas.clone(),
            metrics.clone(),
            issuers_tx,
            t,
            until(stop_rx.clone(), true),
        ));
    } else {
        // Receivers keep the last value after the sender is gone.
        drop(issuers_tx);
    }
    metrics.set_ready(true);

    let (leader_rx, election) = match cfg.leader.clone() {
        Some(lc) => {
            let (rx, task) = leader::start(client.clone(), lc, until(stop_rx.clone(), true))?;
            (rx, Some(AbortOnDrop(task)))
        }
        None => (leader::always_leader(), None),
    };
    let limiter = Arc::new(RateLimiter::new(cfg.qps, cfg.burst));
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);

    if let Some(interval) = cfg.bundle_resync {
        bg.spawn(bundles::sync_loop(
            cfg.store.clone(),
            client.clone(),
            metrics.clone(),
            limiter.clone(),
            leader_rx.clone(),
            interval,
            stop_rx.clone(),
            Some(issuers_rx.clone()),
        ));
    }
    if let (Some(interval), Some(suffix)) = (cfg.bundle_resync, &cfg.cluster_trust_bundles) {
        bg.spawn(super::trust_bundles::sync_loop(
            cfg.store.clone(),
            client.clone(),
            limiter.clone(),
            leader_rx.clone(),
            issuers_rx.clone(),
            super::trust_bundles::LoopConfig {
                suffix: suffix.clone(),
                interval,
                retry_base: super::backoff::BASE,
            },
            stop_rx.clone(),
        ));
    }

    let (ledger, ledger_task) = match cfg.ledger.clone() {
        Some(w) => {
            let (sink, task) = LedgerSink::spawn(w, metrics.clone());
            (Some(sink), Some(task))
        }
        None => (None, None),
    };
    let mut signer_cfg = cfg.signer.clone();
    if signer_cfg.only_signer.is_none() {
        // Exactly one CA served by name: let the API server filter the CSR watch.
        if let Some([one]) = cfg.cas.as_deref() {
            signer_cfg.only_signer = Some(super::signer_name(one));
        }
    }
    let only_signer = signer_cfg.only_signer.clone();
    // The PodCertificateRequest signer: the same CA snapshot, limiter, leader and ledger.
    let mut pcr = cfg.pod_certificates.then(|| {
        super::pcr::PcrSigner::new(
            client.clone(),
            issuers_rx.clone(),
            super::pcr::PcrConfig {
                concurrency: signer_cfg.concurrency,
                only_signer: signer_cfg.only_signer.clone(),
            },
            metrics.clone(),
            limiter.clone(),
            leader_rx.clone(),
            clock.clone(),
        )
    });
    let mut signer = Signer::new(
        client.clone(),
        issuers_rx.clone(),
        signer_cfg,
        metrics.clone(),
        limiter.clone(),
        leader_rx.clone(),
        clock.clone(),
    );
    let served_rx = issuers_rx.clone();
    let mut managed = Managed::new(
        client.clone(),
        issuers_rx,
        metrics.clone(),
        limiter,
        leader_rx.clone(),
        clock,
    )
    .with_events(kube::runtime::events::Reporter {
        controller: "meshca-signer".into(),
        instance: cfg.instance.clone(),
    });
    if let Some(l) = &ledger {
        signer = signer.with_ledger(l.clone());
        managed = managed.with_ledger(l.clone());
        pcr = pcr.map(|p| p.with_ledger(l.clone()));
    }
    // Kept for the ledger catch-up at the start of each session.
    let repair_sink = ledger.clone();
    drop(ledger);
    let signer = Arc::new(signer);
    let managed = Arc::new(managed);
    let pcr = pcr.map(Arc::new);

    loop {
        // Wait to lead (or stop).
        tokio::select! {
            _ = until(stop_rx.clone(), true) => break,
            _ = until(leader_rx.clone(), true) => {}
        }
        if *stop_rx.borrow() {
            break;
        }
        metrics.leader.set(1);
        tracing::info!("leading: starting controllers");
        // A session ends when leadership is lost or on shutdown.
        let (end_tx, end_rx) = watch::channel(false);
        // Before signing anything: record what a previous leader issued but did not get into
        // the ledger (killed between its status write and its ledger batch).
        if let Some(sink) = &repair_sink {
            let catch_up = super::ledger_repair::catch_up(
                &client,
                cfg.store.as_ref(),
                sink,
                only_signer.as_deref(),
                |ca| served_rx.borrow().contains(ca),
                time::OffsetDateTime::now_utc(),
            );
            match tokio::time::timeout(Duration::from_secs(30), catch_up).await {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => tracing::warn!(
                    records = n,
                    "ledger catch-up: recorded certificates a previous leader issued"
                ),
                Ok(Err(e)) => tracing::warn!(error = %e, "ledger catch-up skipped"),
                Err(_) => tracing::warn!("ledger catch-up skipped: no answer within 30 s"),
            }
        }
        let mut session = tokio::task::JoinSet::new();
        session.spawn(signer.clone().run(until(end_rx.clone(), true)));
        if let Some(p) = &pcr {
            session.spawn(p.clone().run_if_served(until(end_rx.clone(), true)));
        }
        for ns in &cfg.managed_namespaces {
            let ns = (ns != "*").then(|| ns.clone());
            session.spawn(managed.clone().run(
                ns,
                cfg.managed_selector.clone(),
                until(end_rx.clone(), true),
            ));
        }
        tokio::select! {
            _ = until(leader_rx.clone(), false) => tracing::warn!("lost the Lease: stopping controllers"),
            _ = until(stop_rx.clone(), true) => {}
        }
        let _ = end_tx.send(true);
        let drained = async { while session.join_next().await.is_some() {} };
        if tokio::time::timeout(cfg.shutdown_grace, drained)
            .await
            .is_err()
        {
            tracing::warn!(grace = ?cfg.shutdown_grace, running = session.len(), "controllers did not stop in time; aborting them");
            session.shutdown().await;
        }
        metrics.controllers.clear();
        metrics.managed_certs.clear();
        metrics.leader.set(0);
        tracing::info!("controllers stopped");
    }
    if let Some(mut e) = election {
        // The election task releases the Lease (itself bounded); never wait without end.
        if tokio::time::timeout(cfg.shutdown_grace, &mut e.0)
            .await
            .is_err()
        {
            tracing::warn!("the Lease was not released in time; it expires by itself");
        }
    }
    // The controllers are stopped: the ledger writer ends once the last sink is dropped.
    drop(signer);
    drop(managed);
    drop(pcr);
    drop(repair_sink);
    if let Some(t) = ledger_task {
        super::ledger::flush(t, Duration::from_secs(10)).await;
    }
    bg.shutdown().await;
    Ok(())
}

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A future that completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("shutdown requested");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{create_root, CaSpec};
    use crate::key::KeyAlgorithm;
    use crate::kube::leader::LeaderConfig;
    use crate::kube::signer::tests::{csr_obj, csr_pem};
    use crate::kube::testutil::{json as resp, mock_client, next};
    use crate::store::LocalStore;
    use serde_json::json;

    #[tokio::test]
    async fn run_loads_cas_becomes_ready_signs_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::create(dir.path().join("home")).unwrap();
        let ca = create_root(&CaSpec::root("mesh"), time::OffsetDateTime::now_utc()).unwrap();
        let not_after = ca.info().unwrap().not_after.unix_timestamp();
        store.save_ca(&ca, false).await.unwrap();
        let (client, mut h) = mock_client();
        let metrics = Arc::new(Metrics::new());
        let mut cfg = RunConfig::new(Arc::new(store));
        cfg.metrics = Some(metrics.clone());
        cfg.bundle_resync = None;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run(client, cfg, async move {
            let _ = stopped.await;
        }));
        let pem = csr_pem(&["blue.app.svc"], KeyAlgorithm::EcdsaP256);
        let csr = serde_json::to_value(csr_obj("c1", "meshca.io/mesh", &pem, &["Approved"], None))
            .unwrap();
        let mut parked = Vec::new();
        let mut signed = false;
        while !signed {
            let (req, _, send) = next(&mut h).await;
            let q = req.uri().query().unwrap_or("").to_string();
            match req.method().as_str() {
                "GET" if q.contains("watch=true") => parked.push(send),
                "GET" => send.send_response(resp(
                    200,
                    &json!({"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequestList",
                            "metadata": {"resourceVersion": "1"}, "items": [csr]}),
                )),
                "PATCH" => {
                    assert!(req.uri().path().ends_with("/c1/status"));
                    send.send_response(resp(200, &csr));
                    signed = true;
                }
                m => panic!("unexpected {m} {}", req.uri()),
            }
        }
        eventually("ready once the CSR controller listed", 10, || {
            metrics.is_ready()
        })
        .await;
        assert_eq!(
            metrics.leader.get(),
            1,
            "no election configured: always leads"
        );
        let text = metrics.render();
        assert!(
            text.contains(&format!(
                "meshca_ca_expiration_timestamp_seconds{{ca=\"mesh\"}} {not_after}"
            )),
            "{text}"
        );
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("stops")
            .unwrap()
            .unwrap();
        assert_eq!(metrics.leader.get(), 0);
        assert_eq!(metrics.csrs_signed.get(), 1);
        drop(parked);
    }

    #[tokio::test]
    async fn run_with_pod_certificates_discovers_the_api_and_signs_a_request() {
        use crate::kube::pcr::check::tests::{key_and_pop, pcr};
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::create(dir.path().join("home")).unwrap();
        let mut spec = CaSpec::root("mesh");
        // The CA opts in to pod certificates for the request's namespace.
        spec.policy.pod_certificates = true;
        spec.policy.pod_certificate_namespaces = vec!["app".into()];
        let ca = create_root(&spec, time::OffsetDateTime::now_utc()).unwrap();
        store.save_ca(&ca, false).await.unwrap();
        let (client, mut h) = mock_client();
        let mut cfg = RunConfig::new(Arc::new(store));
        cfg.bundle_resync = None;
        cfg.ledger = None;
        cfg.pod_certificates = true;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run(client, cfg, async move {
            let _ = stopped.await;
        }));
        let uid = "9d1c2b3a-0000-4000-8000-000000000001";
        let (spki, pop) = key_and_pop("p256", uid);
        let item =
            serde_json::to_value(pcr("app", "web", "meshca.io/mesh", &spki, &pop, uid, None))
                .unwrap();
        let mut parked = Vec::new();
        let mut discovered = false;
        loop {
            let (req, body, send) = next(&mut h).await;
            let path = req.uri().path().to_string();
            let q = req.uri().query().unwrap_or("").to_string();
            match (req.method().as_str(), path.as_str()) {
                // Before Kubernetes 1.37: v1 serves CSRs only, so v1beta1 is used.
                ("GET", "/apis/certificates.k8s.io/v1") => send.send_response(resp(
                    200,
                    &json!({"kind": "APIResourceList", "apiVersion": "v1",
                            "groupVersion": "certificates.k8s.io/v1",
                            "resources": [{"name": "certificatesigningrequests", "singularName": "",
                                           "namespaced": false, "kind": "CertificateSigningRequest",
                                           "verbs": ["get", "list", "watch"]}]}),
                )),
                ("GET", "/apis/certificates.k8s.io/v1beta1") => {
                    discovered = true;
                    send.send_response(resp(
                        200,
                        &json!({"kind": "APIResourceList", "apiVersion": "v1",
                                "groupVersion": "certificates.k8s.io/v1beta1",
                                "resources": [{"name": "podcertificaterequests", "singularName": "",
                                               "namespaced": true, "kind": "PodCertificateRequest",
                                               "verbs": ["get", "list", "watch"]}]}),
                    ))
                }
                ("GET", _) if q.contains("watch=true") => parked.push(send),
                ("GET", "/apis/certificates.k8s.io/v1beta1/podcertificaterequests") => {
                    assert!(discovered, "listed only after discovery");
                    send.send_response(resp(
                        200,
                        &json!({"apiVersion": "certificates.k8s.io/v1beta1",
                                "kind": "PodCertificateRequestList",
                                "metadata": {"resourceVersion": "1"}, "items": [item]}),
                    ))
                }
                ("GET", _) => send.send_response(resp(
                    200,
                    &json!({"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequestList",
                            "metadata": {"resourceVersion": "1"}, "items": []}),
                )),
                ("PUT", p) => {
                    assert_eq!(
                        p,
                        "/apis/certificates.k8s.io/v1beta1/namespaces/app/podcertificaterequests/p1/status"
                    );
                    assert_eq!(body["status"]["conditions"][0]["type"], "Issued");
                    send.send_response(resp(200, &body));
                    break;
                }
                (m, p) => panic!("unexpected {m} {p}"),
            }
        }
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("stops")
            .unwrap()
            .unwrap();
        drop(parked);
    }

    /// An API server that answers the Lease `meshca/meshca-signer` and refuses everything
    /// else with 403, like a cluster where the signer lacks its Roles. Once `taken` is set,
    /// another replica holds the Lease: reads show it, and this replica's renewals conflict.
    async fn lease_only_server(
        mut h: tower_test::mock::Handle<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >,
        lease: Arc<std::sync::Mutex<Option<serde_json::Value>>>,
        taken: Arc<std::sync::atomic::AtomicBool>,
    ) {
        use crate::kube::testutil::{next_untimed, status};
        use std::sync::atomic::Ordering;
        while let Some((req, body, send)) = next_untimed(&mut h).await {
            let path = req.uri().path().to_string();
            if !path.starts_with("/apis/coordination.k8s.io/") {
                send.send_response(status(
                    403,
                    "Forbidden",
                    &format!("{path} is forbidden: User \"system:serviceaccount:meshca:meshca-signer\" cannot list"),
                ));
                continue;
            }
            if taken.load(Ordering::SeqCst) {
                let now = crate::kube::rfc3339(time::OffsetDateTime::now_utc());
                let other = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": "meshca-signer", "namespace": "meshca", "resourceVersion": "99"},
                    "spec": {"holderIdentity": "pod-b", "leaseDurationSeconds": 3600,
                             "acquireTime": now, "renewTime": now}});
                *lease.lock().unwrap() = Some(other.clone());
                match req.method().as_str() {
                    "GET" => send.send_response(resp(200, &other)),
                    _ => {
                        send.send_response(status(409, "Conflict", "the object has been modified"))
                    }
                }
                continue;
            }
            send.send_response(crate::kube::leader::tests::answer_lease(
                &req, &body, &lease,
            ));
        }
    }

    /// A replica with leader election, one managed namespace, and nothing else that writes.
    async fn forbidden_setup() -> (
        RunConfig,
        Arc<Metrics>,
        kube::Client,
        tower_test::mock::Handle<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::create(dir.path().join("home")).unwrap();
        let ca = create_root(&CaSpec::root("mesh"), time::OffsetDateTime::now_utc()).unwrap();
        store.save_ca(&ca, false).await.unwrap();
        let (client, h) = mock_client();
        let metrics = Arc::new(Metrics::new());
        let mut cfg = RunConfig::new(Arc::new(store));
        cfg.metrics = Some(metrics.clone());
        cfg.bundle_resync = None;
        cfg.ledger = None;
        cfg.ca_reload = CaReload::Off;
        cfg.managed_namespaces = vec!["app".into()];
        let mut lc = LeaderConfig::new("meshca", "pod-a");
        lc.lease_duration = Duration::from_secs(3);
        lc.renew_grace = Duration::from_secs(1);
        cfg.leader = Some(lc);
        (cfg, metrics, client, h, dir)
    }

    async fn eventually(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
        let t = std::time::Instant::now();
        while !cond() {
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "{what}: not within {secs} s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Issue 17: a leader whose first lists are refused (403) used to wait without bound for
    /// its controllers on shutdown, holding the Lease. It must stop, and release the Lease,
    /// within the shutdown grace.
    #[tokio::test]
    async fn a_leader_whose_lists_are_forbidden_stops_promptly_and_releases_the_lease() {
        let (cfg, metrics, client, h, _dir) = forbidden_setup().await;
        let lease = Arc::new(std::sync::Mutex::new(None));
        let server = tokio::spawn(lease_only_server(h, lease.clone(), Default::default()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run(client, cfg, async move {
            let _ = stopped.await;
        }));
        eventually("leading", 20, || metrics.leader.get() == 1).await;
        // Let the controllers try (and fail) their first lists.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let asked = std::time::Instant::now();
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("wedged: run did not return within 20 s of shutdown")
            .unwrap()
            .unwrap();
        assert!(asked.elapsed() < Duration::from_secs(20));
        assert_eq!(metrics.leader.get(), 0);
        let l = lease.lock().unwrap().clone().unwrap();
        assert!(l["spec"].get("holderIdentity").is_none(), "released: {l}");
        server.abort();
    }

    /// Issue 17: losing the Lease must end the session even when the controllers never
    /// listed, so that the replica stops acting (and can lead again later).
    #[tokio::test]
    async fn losing_the_lease_ends_a_session_whose_lists_are_forbidden() {
        let (cfg, metrics, client, h, _dir) = forbidden_setup().await;
        let lease = Arc::new(std::sync::Mutex::new(None));
        let taken = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let server = tokio::spawn(lease_only_server(h, lease.clone(), taken.clone()));
        let task = tokio::spawn(run(client, cfg, std::future::pending()));
        eventually("leading", 20, || metrics.leader.get() == 1).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        taken.store(true, std::sync::atomic::Ordering::SeqCst);
        eventually(
            "the session ends once another replica holds the Lease",
            30,
            || metrics.leader.get() == 0,
        )
        .await;
        task.abort();
        server.abort();
    }

    /// Issue 17: a leader whose controllers cannot list is not ready, and `/readyz` and the
    /// metrics name each such controller and its error.
    #[tokio::test]
    async fn a_controller_that_cannot_list_shows_in_readyz_and_metrics() {
        let (cfg, metrics, client, h, _dir) = forbidden_setup().await;
        let lease = Arc::new(std::sync::Mutex::new(None));
        let server = tokio::spawn(lease_only_server(h, lease, Default::default()));
        let task = tokio::spawn(run(client, cfg, std::future::pending()));
        eventually("leading", 20, || metrics.leader.get() == 1).await;
        eventually("not ready while the lists are refused", 20, || {
            let (code, _, body) = metrics.respond("/readyz");
            code == 503 && body.contains("csr-signer") && body.contains("managed:app")
        })
        .await;
        let (_, _, body) = metrics.respond("/readyz");
        assert!(body.contains("forbidden"), "{body}");
        let text = metrics.render();
        assert!(
            text.contains("meshca_controller_ready{controller=\"managed:app\"} 0"),
            "{text}"
        );
        task.abort();
        server.abort();
    }

    #[tokio::test]
    async fn run_refuses_an_empty_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::create(dir.path().join("home")).unwrap();
        let (client, _h) = mock_client();
        let e = run(
            client,
            RunConfig::new(Arc::new(store)),
            std::future::pending(),
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("no CA to serve"), "{e}");
    }
}
