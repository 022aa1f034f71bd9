//! Counters and gauges, rendered as Prometheus text, and a tiny HTTP endpoint for them and
//! for `/healthz`.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::secrets::Snapshot;

/// Which protocol variant a stream uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `StreamSecrets`.
    Sotw,
    /// `DeltaSecrets`.
    Delta,
}

impl Mode {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Sotw => "sotw",
            Mode::Delta => "delta",
        }
    }
}

/// A pair of counters, one per [`Mode`].
#[derive(Debug, Default)]
pub struct PerMode {
    sotw: AtomicU64,
    delta: AtomicU64,
}

impl PerMode {
    /// Adds `n` for `mode`.
    pub fn add(&self, mode: Mode, n: u64) {
        match mode {
            Mode::Sotw => self.sotw.fetch_add(n, Ordering::Relaxed),
            Mode::Delta => self.delta.fetch_add(n, Ordering::Relaxed),
        };
    }

    /// Current value for `mode`.
    pub fn get(&self, mode: Mode) -> u64 {
        match mode {
            Mode::Sotw => self.sotw.load(Ordering::Relaxed),
            Mode::Delta => self.delta.load(Ordering::Relaxed),
        }
    }
}

/// Everything the server counts.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Open streams (gauge).
    pub streams_open: AtomicI64,
    /// Streams accepted.
    pub streams_total: PerMode,
    /// Responses carrying a secret.
    pub pushes: PerMode,
    /// ACKs received.
    pub acks: PerMode,
    /// NACKs received.
    pub nacks: PerMode,
    /// Requests with a stale or unknown nonce.
    pub stale_nonces: PerMode,
    /// FetchSecrets calls answered.
    pub fetches: AtomicU64,
    /// Workload certificates published (first one included).
    pub rotations: AtomicU64,
    /// Trust bundle changes published.
    pub bundle_updates: AtomicU64,
    /// Source load or verification failures.
    pub source_errors: AtomicU64,
    /// notAfter of the served workload certificate (`default`), Unix seconds (0: none).
    pub cert_expiry: AtomicI64,
    /// When the served workload certificate's renewal (or, for a file source, its re-read)
    /// is due, Unix seconds (0: none). A renewal that fails leaves it in the past.
    pub cert_renewal: AtomicI64,
    /// TLS clients whose certificate verified but is not on the allow-list.
    pub clients_refused: AtomicU64,
    /// TLS handshakes that failed or timed out (refused clients included).
    pub tls_handshake_failures: AtomicU64,
    /// Workload certificates obtained through a Kubernetes CSR (`kube-csr` source).
    pub csr_issued: AtomicU64,
    /// Refused CSRs by (condition, reason) (`kube-csr` source).
    pub csr_refusals: std::sync::Mutex<std::collections::BTreeMap<(String, String), u64>>,
    /// The last refusal: condition, reason, message.
    pub csr_last_refusal: std::sync::Mutex<Option<(String, String, String)>>,
}

/// A Prometheus label value: backslash, quote and newline escaped, cut to 256 bytes.
fn label_value(v: &str) -> String {
    let mut end = v.len().min(256);
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    v[..end]
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// Counts a refused CSR and remembers it as the last refusal.
    pub fn record_csr_refusal(&self, condition: &str, reason: &str, message: &str) {
        let mut m = self.csr_refusals.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((condition.to_string(), reason.to_string()))
            .or_insert(0) += 1;
        *self
            .csr_last_refusal
            .lock()
            .unwrap_or_else(|p| p.into_inner()) =
            Some((condition.into(), reason.into(), message.into()));
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let mut gauge = |name: &str, help: &str, v: i64| {
            s.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"
            ));
        };
        gauge(
            "meshca_sds_streams_open",
            "SDS streams currently open.",
            self.streams_open.load(Ordering::Relaxed),
        );
        // The workload certificate, named as cert-manager names its certificates' series;
        // absent until there is one.
        for (name, help, v) in [
            (
                "meshca_sds_certificate_expiration_timestamp_seconds",
                "notAfter of the served workload certificate (Unix time).",
                &self.cert_expiry,
            ),
            (
                "meshca_sds_certificate_renewal_timestamp_seconds",
                "When the served workload certificate's renewal is due (Unix time; in the past while renewing fails).",
                &self.cert_renewal,
            ),
        ] {
            s.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
            let v = v.load(Ordering::Relaxed);
            if v > 0 {
                s.push_str(&format!("{name}{{name=\"{}\"}} {v}\n", crate::DEFAULT_NAME));
            }
        }
        let mut counter = |name: &str, help: &str, v: u64| {
            s.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
            ));
        };
        counter(
            "meshca_sds_fetches_total",
            "FetchSecrets calls answered.",
            self.fetches.load(Ordering::Relaxed),
        );
        counter(
            "meshca_sds_rotations_total",
            "Workload certificates published.",
            self.rotations.load(Ordering::Relaxed),
        );
        counter(
            "meshca_sds_bundle_updates_total",
            "Trust bundle changes published.",
            self.bundle_updates.load(Ordering::Relaxed),
        );
        counter(
            "meshca_sds_source_errors_total",
            "Certificate source failures (the current secrets stay served).",
            self.source_errors.load(Ordering::Relaxed),
        );
        counter(
            "meshca_sds_tls_clients_refused_total",
            "TLS clients with a valid certificate that is not on the allow-list.",
            self.clients_refused.load(Ordering::Relaxed),
        );
        counter(
            "meshca_sds_tls_handshake_failures_total",
            "TLS handshakes that failed or timed out.",
            self.tls_handshake_failures.load(Ordering::Relaxed),
        );
        for (name, help, pm) in [
            (
                "meshca_sds_streams_total",
                "SDS streams accepted.",
                &self.streams_total,
            ),
            (
                "meshca_sds_pushes_total",
                "Responses sent carrying a secret.",
                &self.pushes,
            ),
            ("meshca_sds_acks_total", "ACKs received.", &self.acks),
            ("meshca_sds_nacks_total", "NACKs received.", &self.nacks),
            (
                "meshca_sds_stale_nonces_total",
                "Requests with a stale nonce (ignored).",
                &self.stale_nonces,
            ),
        ] {
            s.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
            for m in [Mode::Sotw, Mode::Delta] {
                s.push_str(&format!(
                    "{name}{{mode=\"{}\"}} {}\n",
                    m.as_str(),
                    pm.get(m)
                ));
            }
        }
        let refusals = self.csr_refusals.lock().unwrap_or_else(|p| p.into_inner());
        let issued = self.csr_issued.load(Ordering::Relaxed);
        if issued > 0 || !refusals.is_empty() {
            s.push_str("# HELP meshca_sds_csr_issued_total Workload certificates obtained through a Kubernetes CSR.\n# TYPE meshca_sds_csr_issued_total counter\n");
            s.push_str(&format!("meshca_sds_csr_issued_total {issued}\n"));
            s.push_str("# HELP meshca_sds_csr_refusals_total Kubernetes CSRs refused, by condition and reason.\n# TYPE meshca_sds_csr_refusals_total counter\n");
            for ((c, r), n) in refusals.iter() {
                s.push_str(&format!(
                    "meshca_sds_csr_refusals_total{{condition=\"{}\",reason=\"{}\"}} {n}\n",
                    label_value(c),
                    label_value(r)
                ));
            }
        }
        drop(refusals);
        if let Some((c, r, m)) = self
            .csr_last_refusal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            s.push_str("# HELP meshca_sds_csr_last_refusal_info The last refused Kubernetes CSR, quoted.\n# TYPE meshca_sds_csr_last_refusal_info gauge\n");
            s.push_str(&format!(
                "meshca_sds_csr_last_refusal_info{{condition=\"{}\",reason=\"{}\",message=\"{}\"}} 1\n",
                label_value(c),
                label_value(r),
                label_value(m)
            ));
        }
        s
    }
}

/// Whether the server is healthy: it serves an unexpired workload certificate.
pub fn healthy(snap: &Snapshot, now: time::OffsetDateTime) -> Result<(), String> {
    match snap.cert_not_after() {
        Some(t) if t > now => Ok(()),
        Some(t) => Err(format!("workload certificate expired at {t}")),
        None => Err("no workload certificate yet".into()),
    }
}

/// Serves `GET /metrics` and `GET /healthz` on `listener` until `shutdown` resolves.
pub async fn serve_http(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = crate::stopped(&mut shutdown) => return,
        };
        let Ok((mut sock, _)) = conn else { continue };
        let metrics = metrics.clone();
        let snap = snapshots.borrow().clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while len < buf.len() {
                    let n = sock.read(&mut buf[len..]).await?;
                    if n == 0 {
                        break;
                    }
                    len += n;
                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..len]);
            let mut parts = head.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (status, ctype, body) = match (method, path) {
                ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
                ("GET", "/healthz") => match healthy(&snap, time::OffsetDateTime::now_utc()) {
                    Ok(()) => ("200 OK", "text/plain", "ok\n".to_string()),
                    Err(e) => ("503 Service Unavailable", "text/plain", format!("{e}\n")),
                },
                ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
                _ => (
                    "405 Method Not Allowed",
                    "text/plain",
                    "method not allowed\n".to_string(),
                ),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ =
                tokio::time::timeout(Duration::from_secs(5), sock.write_all(resp.as_bytes())).await;
            let _ = sock.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_has_every_series() {
        let m = Metrics::default();
        m.pushes.add(Mode::Delta, 3);
        m.nacks.add(Mode::Sotw, 1);
        assert!(
            !m.render()
                .contains("meshca_sds_certificate_expiration_timestamp_seconds{"),
            "no series before there is a certificate"
        );
        m.cert_expiry.store(1234, Ordering::Relaxed);
        m.cert_renewal.store(1000, Ordering::Relaxed);
        let t = m.render();
        assert!(
            t.contains("meshca_sds_pushes_total{mode=\"delta\"} 3\n"),
            "{t}"
        );
        assert!(t.contains("meshca_sds_nacks_total{mode=\"sotw\"} 1\n"));
        assert!(t.contains(
            "meshca_sds_certificate_expiration_timestamp_seconds{name=\"default\"} 1234\n"
        ));
        assert!(
            t.contains("meshca_sds_certificate_renewal_timestamp_seconds{name=\"default\"} 1000\n")
        );
        for n in [
            "streams_open",
            "acks_total",
            "rotations_total",
            "bundle_updates_total",
            "stale_nonces_total",
        ] {
            assert!(t.contains(&format!("# TYPE meshca_sds_{n} ")), "{n}");
        }
    }

    #[test]
    fn health_needs_unexpired_cert() {
        let now = time::OffsetDateTime::now_utc();
        let mut s = Snapshot::new();
        assert!(healthy(&s, now).is_err());
        s.insert(
            "default",
            crate::secrets::certificate_entry(
                "default",
                "c",
                "k",
                "1".into(),
                now + time::Duration::hours(1),
            ),
        );
        assert!(healthy(&s, now).is_ok());
        assert!(healthy(&s, now + time::Duration::hours(2))
            .unwrap_err()
            .contains("expired"));
    }
}
