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
//! - `ca_expiry_timestamp_seconds{ca}`: notAfter of each loaded CA, as a Unix time;
//! - `leader` 1 while this replica leads;
//! - `istio_ca_issued_total{ca}`, `istio_ca_refused_total{reason}` (`meshca istio-ca serve`);
//! - `controller_ready{controller}`: 1 once a controller of the leader's session has
//!   completed its first list, 0 while it cannot (see [`super::health`]).
//!
//! `/healthz` answers 200 while the process serves HTTP. `/readyz` answers 200 once the CAs
//! are loaded (followers are ready too: they are hot standbys) and, on the leader, every
//! controller has completed its first list; 503 before, naming each reason (a controller
//! that cannot list, with its error).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
    pub ca_expiry: Family<CaLabel, Gauge>,
    /// Per CA: 1 while it is served, 0 while it fails to load (nothing is issued for it).
    pub ca_ready: Family<CaLabel, Gauge>,
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
            ca_expiry: Family::default(),
            ca_ready: Family::default(),
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
            "ca_expiry_timestamp_seconds",
            "notAfter of each loaded CA (Unix time)",
            m.ca_expiry.clone(),
        );
        registry.register(
            "ca_ready",
            "1 while the CA is served, 0 while it fails to load (nothing is issued for it)",
            m.ca_ready.clone(),
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
        self.controller_ready.clear();
        for (name, state) in self.controllers.snapshot() {
            let ready = state == super::health::ControllerState::Ready;
            self.controller_ready
                .get_or_create(&ControllerLabel { controller: name })
                .set(i64::from(ready));
        }
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }

    /// Answers one HTTP request.
    pub fn respond(&self, path: &str) -> (u16, &'static str, String) {
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
            "/metrics" => (
                200,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.render(),
            ),
            _ => (404, "text/plain", "not found\n".into()),
        }
    }
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
                let (code, ctype, body) = m.respond(req.uri().path());
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
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
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
        m.ca_expiry
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
            body.contains("meshca_ca_expiry_timestamp_seconds{ca=\"mesh\"} 2000000000"),
            "{body}"
        );
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        stop.send(()).unwrap();
        srv.await.unwrap().unwrap();
    }
}
