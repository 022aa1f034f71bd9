//! Prometheus metrics and the `/healthz`, `/readyz`, `/metrics` endpoints.
//!
//! Metric names (all prefixed `meshca_`):
//! - `csr_reconciles_total` CSR reconciles for signers meshca serves;
//! - `csrs_signed_total`, `csrs_failed_total{reason}`, `csr_conflicts_total` (someone else won);
//! - `csrs_approved_total`, `csrs_denied_total` (auto-approver);
//! - `pod_certificate_requests_issued_total`,
//!   `pod_certificate_requests_refused_total{condition,reason}` (the PodCertificateRequest
//!   signer);
//! - `csr_sign_duration_seconds` histogram: from the reconcile start to the accepted status write;
//! - `csr_issue_latency_seconds` histogram: from the CSR's creationTimestamp to the accepted write;
//! - `managed_secrets_issued_total`, `managed_secrets_failed_total` (refused or failed
//!   issuance; the Secret's data is kept), `bundle_configmaps_applied_total`;
//! - `ledger_entries_total`, `ledger_write_failures_total`, `ledger_backlog`: issued
//!   certificates recorded in the store's ledger, failed write attempts (each retried until
//!   written), and records waiting to be written (issuance waits once it reaches
//!   [`super::ledger::QUEUE`] plus one batch);
//! - `ca_reloads_total`: new snapshots of the served CAs (a CA created, replaced or removed);
//! - `ca_expiration_timestamp_seconds{ca}`: notAfter of each CA the store holds, as a Unix
//!   time (cert-manager: `certmanager_certificate_expiration_timestamp_seconds`);
//! - `ca_ready_status{ca,condition}`: 1 on the `True` series while the CA is served, on the
//!   `False` series while it fails to load (cert-manager: `certmanager_certificate_ready_status`);
//!   both series of a CA removed from the store are removed;
//! - `managed_secret_expiration_timestamp_seconds{namespace,name,ca}`,
//!   `managed_secret_renewal_timestamp_seconds{namespace,name,ca}` and
//!   `managed_secret_ready_status{namespace,name,ca,condition}`: each managed Secret's
//!   certificate on the leader ([`ManagedCerts`]); the renewal time is when it became due
//!   (so a renewal that keeps failing shows as a time in the past); the series of a Secret
//!   that is deleted, stops being managed, or moves to a CA this signer does not serve are
//!   removed, and all of them when the replica stops leading;
//! - `leader` 1 while this replica leads;
//! - `istio_ca_issued_total{ca}`, `istio_ca_refused_total{reason}` (`meshca istio-ca serve`);
//! - `controller_ready{controller}`: 1 once a controller of the leader's session has
//!   completed its first list, 0 while it cannot (see [`super::health`]).
//!
//! `/healthz` answers 200 while the process serves HTTP. `/readyz` answers 200 once the CAs
//! are loaded (followers are ready too: they are hot standbys) and, on the leader, every
//! controller has completed its first list; 503 before, naming each reason (a controller
//! that cannot list, with its error).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::error::{Error, Result};

/// Label set with one `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The condition reason.
    pub reason: String,
}

/// Label set of a PodCertificateRequest refusal: `Denied` or `Failed`, and its reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PcrRefusalLabel {
    /// `Denied` or `Failed`.
    pub condition: String,
    /// The condition reason.
    pub reason: String,
}

/// Label set with one `ca`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CaLabel {
    /// The CA name.
    pub ca: String,
}

/// Label set of a CA's readiness: `condition` is `True` or `False`, one-hot.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CaConditionLabel {
    /// The CA name.
    pub ca: String,
    /// `True` or `False`.
    pub condition: String,
}

/// Label set of a managed Secret's certificate.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecretLabel {
    /// The Secret's namespace.
    pub namespace: String,
    /// The Secret's name.
    pub name: String,
    /// The CA it asks for (`meshca.io/ca`).
    pub ca: String,
}

/// Label set of a managed Secret's readiness: `condition` is `True` or `False`, one-hot.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecretConditionLabel {
    /// The Secret's namespace.
    pub namespace: String,
    /// The Secret's name.
    pub name: String,
    /// The CA it asks for.
    pub ca: String,
    /// `True` or `False`.
    pub condition: String,
}

/// What the metrics show of one managed Secret's certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertSeries {
    /// The CA it asks for.
    pub ca: String,
    /// notAfter of its certificate, Unix time (`None`: no readable certificate).
    pub not_after: Option<i64>,
    /// When its renewal is (or became) due, Unix time.
    pub renewal: i64,
    /// Whether it holds a certificate for what it asks for, from the CA's current key, not
    /// expired.
    pub ready: bool,
}

impl CertSeries {
    /// `next` as recorded after `prev` at Unix time `now`: a renewal already due for the same
    /// certificate keeps the time it became due, so a renewal that keeps failing shows how
    /// long it has been overdue (each retry would otherwise move it to "now").
    pub fn after(prev: Option<&CertSeries>, mut next: CertSeries, now: i64) -> CertSeries {
        if let Some(p) = prev {
            if p.ca == next.ca
                && p.not_after == next.not_after
                && next.renewal <= now
                && p.renewal < next.renewal
            {
                next.renewal = p.renewal;
            }
        }
        next
    }
}

/// The managed Secrets' certificates as the leader's controllers last saw them. Deleted
/// Secrets leave through [`ManagedCerts::watch_store`]: at each scrape, an entry whose Secret
/// is in none of the controllers' caches (of its namespace) is dropped.
#[derive(Default)]
pub struct ManagedCerts {
    certs: Mutex<BTreeMap<(String, String), CertSeries>>,
    /// The caches of the running managed-Secret controllers: the namespace each watches
    /// (`None`: all) and its reflector store.
    stores: Mutex<
        Vec<(
            Option<String>,
            kube::runtime::reflector::Store<k8s_openapi::api::core::v1::Secret>,
        )>,
    >,
}

impl std::fmt::Debug for ManagedCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagedCerts")
            .field("certs", &lock(&self.certs).len())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ManagedCerts {
    /// Records Secret `namespace/name` (see [`CertSeries::after`]).
    pub fn set(&self, namespace: &str, name: &str, series: CertSeries, now: i64) {
        let mut certs = lock(&self.certs);
        let key = (namespace.to_string(), name.to_string());
        let next = CertSeries::after(certs.get(&key), series, now);
        certs.insert(key, next);
    }

    /// Forgets Secret `namespace/name`.
    pub fn remove(&self, namespace: &str, name: &str) {
        lock(&self.certs).remove(&(namespace.to_string(), name.to_string()));
    }

    /// What is recorded for Secret `namespace/name`.
    pub fn get(&self, namespace: &str, name: &str) -> Option<CertSeries> {
        lock(&self.certs)
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Registers the cache of a managed-Secret controller watching `namespace` (`None`: all).
    pub fn watch_store(
        &self,
        namespace: Option<String>,
        store: kube::runtime::reflector::Store<k8s_openapi::api::core::v1::Secret>,
    ) {
        lock(&self.stores).push((namespace, store));
    }

    /// Forgets every Secret and cache (the controllers stopped: this replica no longer leads).
    pub fn clear(&self) {
        lock(&self.stores).clear();
        lock(&self.certs).clear();
    }

    /// Drops the entries whose Secret a controller watching its namespace no longer has.
    fn prune(&self) -> Vec<((String, String), CertSeries)> {
        let stores = lock(&self.stores);
        let mut certs = lock(&self.certs);
        certs.retain(|(ns, name), _| {
            let watching: Vec<_> = stores
                .iter()
                .filter(|(w, _)| w.as_deref().is_none_or(|w| w == ns))
                .collect();
            // No controller of this session watches it: kept as recorded (nothing to check).
            watching.is_empty()
                || watching.iter().any(|(_, s)| {
                    s.get(&kube::runtime::reflector::ObjectRef::new(name).within(ns))
                        .is_some()
                })
        });
        certs.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// Label set with one `controller`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    /// The controller: `csr-signer`, `pod-certificates` or `managed:<namespace>`.
    pub controller: String,
}

/// Everything the controller counts.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// One render at a time: the families filled at render time are cleared and refilled.
    render_lock: Mutex<()>,
    ready: AtomicBool,
    /// CSR reconciles for served signers.
    pub csr_reconciles: Counter,
    /// Certificates written to CSRs.
    pub csrs_signed: Counter,
    /// `Failed` conditions written, by reason.
    pub csrs_failed: Family<ReasonLabel, Counter>,
    /// Writes that lost to another writer.
    pub csr_conflicts: Counter,
    /// Auto-approvals.
    pub csrs_approved: Counter,
    /// Auto-denials.
    pub csrs_denied: Counter,
    /// Reconcile start to accepted write.
    pub sign_duration: Histogram,
    /// CSR creation to accepted write.
    pub issue_latency: Histogram,
    /// Managed Secrets (re)issued.
    pub managed_issued: Counter,
    /// Managed Secrets that could not be issued.
    pub managed_failed: Counter,
    /// Trust-bundle ConfigMaps applied.
    pub bundle_applied: Counter,
    /// Ledger entries written.
    pub ledger_entries: Counter,
    /// Failed ledger write attempts (each batch is retried until written).
    pub ledger_failures: Counter,
    /// Records waiting to be written to the ledger.
    pub ledger_backlog: Gauge,
    /// The controllers of the leader's session and whether each has listed.
    pub controllers: super::health::ControllerHealth,
    /// 1 per controller that has listed, 0 per one that has not (from `controllers`).
    controller_ready: Family<ControllerLabel, Gauge>,
    /// Snapshots of the served CAs published after start-up.
    pub ca_reloads: Counter,
    /// CA notAfter as Unix time.
    pub ca_expiration: Family<CaLabel, Gauge>,
    /// Per CA, one-hot: `True` while it is served, `False` while it fails to load (nothing is
    /// issued for it). Set through [`Metrics::set_ca_ready`].
    ca_ready: Family<CaConditionLabel, Gauge>,
    /// The managed Secrets' certificates (rendered at each scrape).
    pub managed_certs: ManagedCerts,
    managed_expiration: Family<SecretLabel, Gauge>,
    managed_renewal: Family<SecretLabel, Gauge>,
    managed_ready: Family<SecretConditionLabel, Gauge>,
    /// Per CA: loads that failed (start-up and reloads).
    pub ca_load_errors: Family<CaLabel, Counter>,
    /// 1 while leading.
    pub leader: Gauge,
    /// PodCertificateRequests issued.
    pub pcrs_issued: Counter,
    /// PodCertificateRequests denied or failed, by condition and reason.
    pub pcrs_refused: Family<PcrRefusalLabel, Counter>,
    /// Certificates issued through Istio's CA API, by CA.
    pub istio_issued: Family<CaLabel, Counter>,
    /// Istio CA requests refused, by reason (`unauthenticated`, `denied`, `invalid`,
    /// `unavailable`).
    pub istio_refused: Family<ReasonLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("meshca");
        let m = Metrics {
            registry: Registry::default(),
            render_lock: Mutex::new(()),
            ready: AtomicBool::new(false),
            csr_reconciles: Counter::default(),
            csrs_signed: Counter::default(),
            csrs_failed: Family::default(),
            csr_conflicts: Counter::default(),
            csrs_approved: Counter::default(),
            csrs_denied: Counter::default(),
            sign_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            issue_latency: Histogram::new(exponential_buckets(0.005, 2.0, 16)),
            managed_issued: Counter::default(),
            managed_failed: Counter::default(),
            bundle_applied: Counter::default(),
            ledger_entries: Counter::default(),
            ledger_failures: Counter::default(),
            ledger_backlog: Gauge::default(),
            controllers: Default::default(),
            controller_ready: Family::default(),
            ca_reloads: Counter::default(),
            ca_expiration: Family::default(),
            ca_ready: Family::default(),
            managed_certs: ManagedCerts::default(),
            managed_expiration: Family::default(),
            managed_renewal: Family::default(),
            managed_ready: Family::default(),
            ca_load_errors: Family::default(),
            leader: Gauge::default(),
            pcrs_issued: Counter::default(),
            pcrs_refused: Family::default(),
            istio_issued: Family::default(),
            istio_refused: Family::default(),
        };
        registry.register(
            "csr_reconciles",
            "CSR reconciles for signers meshca serves",
            m.csr_reconciles.clone(),
        );
        registry.register(
            "csrs_signed",
            "Certificates written to CSRs",
            m.csrs_signed.clone(),
        );
        registry.register(
            "csrs_failed",
            "Failed conditions written to CSRs",
            m.csrs_failed.clone(),
        );
        registry.register(
            "csr_conflicts",
            "CSR writes that lost to another writer",
            m.csr_conflicts.clone(),
        );
        registry.register(
            "csrs_approved",
            "CSRs approved by policy",
            m.csrs_approved.clone(),
        );
        registry.register(
            "csrs_denied",
            "CSRs denied by policy",
            m.csrs_denied.clone(),
        );
        registry.register(
            "csr_sign_duration_seconds",
            "Reconcile start to accepted certificate write",
            m.sign_duration.clone(),
        );
        registry.register(
            "csr_issue_latency_seconds",
            "CSR creation to accepted certificate write",
            m.issue_latency.clone(),
        );
        registry.register(
            "managed_secrets_issued",
            "Managed Secrets issued or renewed",
            m.managed_issued.clone(),
        );
        registry.register(
            "managed_secrets_failed",
            "Managed Secrets that could not be issued",
            m.managed_failed.clone(),
        );
        registry.register(
            "bundle_configmaps_applied",
            "Trust-bundle ConfigMaps applied",
            m.bundle_applied.clone(),
        );
        registry.register(
            "ledger_entries",
            "Issued certificates recorded in the ledger",
            m.ledger_entries.clone(),
        );
        registry.register(
            "ledger_write_failures",
            "Failed ledger write attempts (retried until written)",
            m.ledger_failures.clone(),
        );
        registry.register(
            "ledger_backlog",
            "Issued certificates waiting to be written to the ledger",
            m.ledger_backlog.clone(),
        );
        registry.register(
            "controller_ready",
            "1 once a controller of the leader has completed its first list, 0 while it cannot",
            m.controller_ready.clone(),
        );
        registry.register(
            "ca_reloads",
            "New snapshots of the served CAs after start-up",
            m.ca_reloads.clone(),
        );
        registry.register(
            "ca_expiration_timestamp_seconds",
            "notAfter of each CA (Unix time)",
            m.ca_expiration.clone(),
        );
        registry.register(
            "ca_ready_status",
            "1 on condition True while the CA is served, on False while it fails to load (nothing is issued for it)",
            m.ca_ready.clone(),
        );
        registry.register(
            "managed_secret_expiration_timestamp_seconds",
            "notAfter of each managed Secret's certificate (Unix time; on the leader)",
            m.managed_expiration.clone(),
        );
        registry.register(
            "managed_secret_renewal_timestamp_seconds",
            "When each managed Secret's renewal is or became due (Unix time; on the leader)",
            m.managed_renewal.clone(),
        );
        registry.register(
            "managed_secret_ready_status",
            "1 on condition True while a managed Secret holds a valid certificate for what it asks for, else on False (on the leader)",
            m.managed_ready.clone(),
        );
        registry.register(
            "ca_load_errors",
            "Loads of a CA that failed, at start-up or on a reload",
            m.ca_load_errors.clone(),
        );
        registry.register("leader", "1 while this replica leads", m.leader.clone());
        registry.register(
            "pod_certificate_requests_issued",
            "PodCertificateRequests issued",
            m.pcrs_issued.clone(),
        );
        registry.register(
            "pod_certificate_requests_refused",
            "PodCertificateRequests denied or failed, by condition and reason",
            m.pcrs_refused.clone(),
        );
        registry.register(
            "istio_ca_issued",
            "Certificates issued through Istio's CA API, by CA",
            m.istio_issued.clone(),
        );
        registry.register(
            "istio_ca_refused",
            "Istio CA requests refused, by reason",
            m.istio_refused.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Sets CA `name`'s `ca_ready_status`: 1 on `True` and 0 on `False` when `ready`, else the
    /// reverse.
    pub fn set_ca_ready(&self, name: &str, ready: bool) {
        for (condition, on) in [("True", ready), ("False", !ready)] {
            self.ca_ready
                .get_or_create(&CaConditionLabel {
                    ca: name.to_string(),
                    condition: condition.into(),
                })
                .set(i64::from(on));
        }
    }

    /// Removes every series of CA `name` (it left the store).
    pub fn forget_ca(&self, name: &str) {
        for condition in ["True", "False"] {
            self.ca_ready.remove(&CaConditionLabel {
                ca: name.to_string(),
                condition: condition.into(),
            });
        }
        self.ca_expiration.remove(&CaLabel {
            ca: name.to_string(),
        });
    }

    /// Marks the process ready (or not).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// Why `/readyz` answers 503, one line each (empty: ready).
    pub fn not_ready_reasons(&self) -> Vec<String> {
        super::health::not_ready_reasons(
            self.ready.load(Ordering::Acquire),
            &self.controllers.snapshot(),
        )
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.not_ready_reasons().is_empty()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let _one = lock(&self.render_lock);
        self.controller_ready.clear();
        for (name, state) in self.controllers.snapshot() {
            let ready = state == super::health::ControllerState::Ready;
            self.controller_ready
                .get_or_create(&ControllerLabel { controller: name })
                .set(i64::from(ready));
        }
        self.managed_expiration.clear();
        self.managed_renewal.clear();
        self.managed_ready.clear();
        for ((namespace, name), c) in self.managed_certs.prune() {
            let label = SecretLabel {
                namespace,
                name,
                ca: c.ca,
            };
            if let Some(t) = c.not_after {
                self.managed_expiration.get_or_create(&label).set(t);
            }
            self.managed_renewal.get_or_create(&label).set(c.renewal);
            for (condition, on) in [("True", c.ready), ("False", !c.ready)] {
                self.managed_ready
                    .get_or_create(&SecretConditionLabel {
                        namespace: label.namespace.clone(),
                        name: label.name.clone(),
                        ca: label.ca.clone(),
                        condition: condition.into(),
                    })
                    .set(i64::from(on));
            }
        }
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }

    /// Answers one HTTP request with the classic Prometheus text format (what a scraper gets
    /// that does not ask for OpenMetrics; see [`Metrics::respond_to`]).
    pub fn respond(&self, path: &str) -> (u16, &'static str, String) {
        self.respond_to(path, None)
    }

    /// Answers one HTTP request. `/metrics` is OpenMetrics when `accept` (the request's
    /// `Accept` header) lists `application/openmetrics-text` (Prometheus does), else the
    /// classic text format 0.0.4 (as client_golang does: `promtool check metrics`, curl).
    pub fn respond_to(&self, path: &str, accept: Option<&str>) -> (u16, &'static str, String) {
        match path {
            "/healthz" | "/livez" => (200, "text/plain", "ok\n".into()),
            "/readyz" => match self.not_ready_reasons() {
                r if r.is_empty() => (200, "text/plain", "ok\n".into()),
                r => (
                    503,
                    "text/plain",
                    r.iter().map(|l| format!("not ready: {l}\n")).collect(),
                ),
            },
            "/metrics" if wants_openmetrics(accept) => (
                200,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.render(),
            ),
            "/metrics" => (
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                openmetrics_to_text(&self.render()),
            ),
            _ => (404, "text/plain", "not found\n".into()),
        }
    }
}

/// Whether an `Accept` header asks for OpenMetrics (a media range
/// `application/openmetrics-text` whose `q` is not 0).
fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',').any(|range| {
            let mut parts = range.split(';').map(str::trim);
            parts
                .next()
                .is_some_and(|t| t.eq_ignore_ascii_case("application/openmetrics-text"))
                && !parts.any(|p| {
                    p.strip_prefix("q=")
                        .and_then(|q| q.parse::<f32>().ok())
                        .is_some_and(|q| q <= 0.0)
                })
        })
    })
}

/// The classic Prometheus text format (0.0.4) of an OpenMetrics exposition as
/// `prometheus_client` writes it: a counter family `x` is named `x_total` in its `# HELP` and
/// `# TYPE` lines (its samples already are), an info family `x` becomes the gauge `x_info`,
/// `unknown` becomes `untyped`, and `# UNIT`, `# EOF` and counters' `_created` samples are
/// dropped. Sample lines are the same in both formats.
fn openmetrics_to_text(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    // The current family's HELP line, held until its TYPE line says how to name it.
    let mut help: Option<(&str, &str)> = None;
    let mut created: Option<String> = None;
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
            created = None;
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (name, kind) = match kind {
                "counter" => {
                    created = Some(format!("{name}_created"));
                    (format!("{name}_total"), "counter")
                }
                "info" => (format!("{name}_info"), "gauge"),
                "unknown" => (name.to_string(), "untyped"),
                k => (name.to_string(), k),
            };
            if let Some((_, text)) = help.take() {
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        if created.as_deref().is_some_and(|c| {
            line.strip_prefix(c)
                .is_some_and(|r| r.starts_with([' ', '{']))
        }) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Serves the endpoints on `addr` until `shutdown` completes.
pub async fn serve(
    metrics: Arc<Metrics>,
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Store(format!("cannot listen on {addr}: {e}")))?;
    serve_listener(metrics, listener, shutdown).await
}

/// Serves the endpoints on a bound listener until `shutdown` completes.
pub async fn serve_listener(
    metrics: Arc<Metrics>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let m = metrics.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let accept = req
                    .headers()
                    .get(hyper::header::ACCEPT)
                    .and_then(|v| v.to_str().ok());
                let (code, ctype, body) = m.respond_to(req.uri().path(), accept);
                async move {
                    Response::builder()
                        .status(code)
                        .header("content-type", ctype)
                        .body(Full::new(Bytes::from(body)))
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
            {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        get_with(addr, path, "").await
    }

    async fn get_with(addr: SocketAddr, path: &str, headers: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[test]
    fn openmetrics_is_for_whoever_asks_for_it() {
        // Prometheus's default scrape Accept header.
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
        )));
        assert!(!wants_openmetrics(None));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(Some("text/plain;version=0.0.4")));
        assert!(!wants_openmetrics(Some("application/openmetrics-text;q=0")));
    }

    #[test]
    fn the_classic_text_names_counters_with_total() {
        let m = Metrics::new();
        m.csrs_signed.inc();
        m.sign_duration.observe(0.01);
        let om = m.render();
        assert!(om.contains("# TYPE meshca_csrs_signed counter\n"), "{om}");
        assert!(om.ends_with("# EOF\n"), "{om}");
        let text = openmetrics_to_text(&om);
        for line in [
            "# HELP meshca_csrs_signed_total Certificates written to CSRs.\n",
            "# TYPE meshca_csrs_signed_total counter\nmeshca_csrs_signed_total 1\n",
            "# TYPE meshca_leader gauge\nmeshca_leader 0\n",
            "# TYPE meshca_csr_sign_duration_seconds histogram\n",
            "meshca_csr_sign_duration_seconds_count 1\n",
        ] {
            assert!(text.contains(line), "{line:?} not in {text}");
        }
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        // Info families and created timestamps, which prometheus_client can write.
        let converted = openmetrics_to_text(
            "# HELP build Build.\n# TYPE build info\nbuild_info{v=\"1\"} 1\n# HELP c C.\n# TYPE c counter\nc_total 2\nc_created 1.5\n# EOF\n",
        );
        assert_eq!(
            converted,
            "# HELP build_info Build.\n# TYPE build_info gauge\nbuild_info{v=\"1\"} 1\n# HELP c_total C.\n# TYPE c_total counter\nc_total 2\n"
        );
    }

    #[tokio::test]
    async fn endpoints_over_http() {
        let m = Arc::new(Metrics::new());
        m.csrs_signed.inc();
        m.csrs_failed
            .get_or_create(&ReasonLabel {
                reason: "MeshcaPolicyDenied".into(),
            })
            .inc();
        m.ca_expiration
            .get_or_create(&CaLabel { ca: "mesh".into() })
            .set(2_000_000_000);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let srv = tokio::spawn(serve_listener(m.clone(), l, async move {
            let _ = stopped.await;
        }));
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        m.set_ready(true);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        let body = get(addr, "/metrics").await;
        assert!(body.contains("meshca_csrs_signed_total 1"), "{body}");
        assert!(
            body.contains("meshca_csrs_failed_total{reason=\"MeshcaPolicyDenied\"} 1"),
            "{body}"
        );
        assert!(
            body.contains("meshca_ca_expiration_timestamp_seconds{ca=\"mesh\"} 2000000000"),
            "{body}"
        );
        assert!(
            body.contains("content-type: text/plain; version=0.0.4"),
            "{body}"
        );
        assert!(
            body.contains("# TYPE meshca_csrs_signed_total counter"),
            "{body}"
        );
        let om = get_with(
            addr,
            "/metrics",
            "Accept: application/openmetrics-text;version=1.0.0;q=0.6,text/plain;q=0.3\r\n",
        )
        .await;
        assert!(
            om.contains("content-type: application/openmetrics-text; version=1.0.0"),
            "{om}"
        );
        assert!(om.contains("# TYPE meshca_csrs_signed counter"), "{om}");
        assert!(om.contains("meshca_csrs_signed_total 1"), "{om}");
        assert!(om.trim_end().ends_with("# EOF"), "{om}");
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        stop.send(()).unwrap();
        srv.await.unwrap().unwrap();
    }
}
