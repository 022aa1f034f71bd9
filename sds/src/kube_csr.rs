//! The `kube-csr` source (cargo feature `kube`): the workload certificate comes from the
//! cluster's signer through a `certificates.k8s.io/v1` CSR made under the pod's own
//! service-account token ([`meshca::kube::csr_client`]); no CA key and no workload key ever
//! touch a disk. `ROOTCA` comes from a mounted trust-bundle ConfigMap (`ca.crt`, re-read when
//! its directory changes) or from the signer's ClusterTrustBundles (a read-only watch).
//!
//! Renewal follows the rotator ([`crate::rotation`]: `--renew-at` with jitter). A `Denied` or
//! `Failed` CSR is quoted (condition, reason, message) in the log and in
//! `meshca_sds_csr_refusals_total` / `meshca_sds_csr_last_refusal_info`; the current
//! certificate stays served while it is valid, and the next CSR waits for a per-source
//! backoff ([`meshca::kube::backoff`]: 0.5 s doubling to 5 min, jittered), during which the
//! trust bundle keeps being refreshed.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use meshca::identity::Sans;
use meshca::kube::backoff::Backoff;
use meshca::kube::csr_client::{Answer, CsrClient, CsrRequest};
use meshca::kube::trust_bundle_reader::TrustBundleReader;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::metrics::Metrics;
use crate::source::{CertSource, Material, SourceError, WorkloadCert};

/// Where `ROOTCA` comes from.
#[derive(Clone, Debug)]
pub enum TrustConfig {
    /// A PEM file, e.g. the `ca.crt` of a mounted `<bundle>-trust-bundle` ConfigMap; re-read
    /// when its directory changes (a ConfigMap volume swaps its `..data` symlink atomically).
    File(PathBuf),
    /// The ClusterTrustBundles whose `spec.signerName` is `signer`, optionally narrowed by a
    /// label selector.
    ClusterTrustBundles {
        /// `meshca.io/<ca>`.
        signer: String,
        /// A label selector, e.g. `meshca.io/bundle=mesh`.
        labels: Option<String>,
    },
}

/// Configuration of the `kube-csr` source.
#[derive(Clone, Debug)]
pub struct KubeCsrConfig {
    /// A kubeconfig file (default: `KUBECONFIG`, `~/.kube/config`, else in-cluster).
    pub kubeconfig: Option<PathBuf>,
    /// What to ask for.
    pub request: CsrRequest,
    /// How long one CSR may take to be signed before it is deleted and retried.
    pub timeout: Duration,
    /// Where `ROOTCA` comes from.
    pub trust: TrustConfig,
}

enum Trust {
    File(PathBuf),
    Cluster(TrustBundleReader),
}

/// The `kube-csr` certificate source.
pub struct KubeCsrSource {
    csrs: CsrClient,
    request: CsrRequest,
    timeout: Duration,
    trust: Trust,
    backoff: Backoff,
    retry_at: Mutex<Option<OffsetDateTime>>,
    obtained_any: AtomicBool,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for KubeCsrSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeCsrSource")
            .field("signer", &self.request.signer_name)
            .field("sans", &self.request.sans)
            .finish_non_exhaustive()
    }
}

const BACKOFF_KEY: &str = "csr";

impl KubeCsrSource {
    /// Connects (kubeconfig or in-cluster), checks that the admission policy limiting the
    /// sidecar's CSR deletes to its own CSRs is in place
    /// ([`meshca::kube::csr_delete_guard::verify`]; an error otherwise) and, for
    /// ClusterTrustBundles, waits for the first list.
    pub async fn connect(cfg: &KubeCsrConfig, metrics: Arc<Metrics>) -> Result<Self, SourceError> {
        let name = format!("kube-csr:{}", cfg.request.signer_name);
        let err = |e: meshca::Error| {
            let user_error = e.is_user_error();
            SourceError {
                source_name: name.clone(),
                message: e.to_string(),
                user_error,
            }
        };
        cfg.request.validate().map_err(err)?;
        let client = meshca::kube::client(cfg.kubeconfig.as_deref())
            .await
            .map_err(err)?;
        // The sidecar deletes its CSRs: refuse to start where nothing limits that right to
        // its own CSRs (meshca::kube::csr_delete_guard).
        meshca::kube::csr_delete_guard::verify(&client)
            .await
            .map_err(err)?;
        Self::with_client(client, cfg, metrics).await.map_err(err)
    }

    /// [`KubeCsrSource::connect`] with a given client (tests, the mock API server).
    pub async fn with_client(
        client: kube::Client,
        cfg: &KubeCsrConfig,
        metrics: Arc<Metrics>,
    ) -> meshca::Result<Self> {
        let trust = match &cfg.trust {
            TrustConfig::File(p) => Trust::File(p.clone()),
            TrustConfig::ClusterTrustBundles { signer, labels } => Trust::Cluster(
                TrustBundleReader::start(
                    client.clone(),
                    signer,
                    labels.as_deref(),
                    Duration::from_secs(30),
                )
                .await?,
            ),
        };
        Ok(KubeCsrSource {
            csrs: CsrClient::new(client),
            request: cfg.request.clone(),
            timeout: cfg.timeout,
            trust,
            backoff: Backoff::new(),
            retry_at: Mutex::new(None),
            obtained_any: AtomicBool::new(false),
            metrics,
        })
    }

    fn err(&self, message: String, user_error: bool) -> SourceError {
        SourceError {
            source_name: self.describe(),
            message,
            user_error,
        }
    }

    async fn bundle(&self) -> Result<Vec<CertificateDer<'static>>, SourceError> {
        match &self.trust {
            Trust::File(p) => {
                let path = p.clone();
                let text = tokio::task::spawn_blocking(move || meshca::fsutil::read_limited(&path))
                    .await
                    .map_err(|e| self.err(format!("reader task failed: {e}"), false))?
                    .map_err(|e| self.err(e.to_string(), e.is_user_error()))?;
                meshca::pemutil::parse_certs(&text, &p.display().to_string())
                    .map_err(|e| self.err(e.to_string(), true))
            }
            Trust::Cluster(r) => r.anchors().map_err(|e| self.err(e.to_string(), false)),
        }
    }

    /// Records a failed attempt: the next CSR waits for the backoff.
    fn back_off(&self, now: OffsetDateTime) -> Duration {
        let d = self.backoff.next(BACKOFF_KEY);
        *self.retry_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(now + d);
        d
    }

    /// One CSR; before the first certificate, transient failures are retried here (with the
    /// backoff) until the timeout, so that a pod starting before the API is reachable does not
    /// crash-loop.
    async fn obtain(&self, now: OffsetDateTime) -> Result<WorkloadCert, SourceError> {
        let started = tokio::time::Instant::now();
        loop {
            let answer = self.csrs.request(&self.request, self.timeout).await;
            match answer {
                Ok(Answer::Issued(o)) => {
                    let o = *o;
                    self.backoff.reset(BACKOFF_KEY);
                    *self.retry_at.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    self.obtained_any.store(true, Ordering::Relaxed);
                    self.metrics.csr_issued.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(csr = %o.csr, serial = %o.info.serial, username = %o.username, "CSR signed");
                    return Ok(WorkloadCert {
                        chain: o.chain,
                        key_pem: o.key.to_pkcs8_pem(),
                        info: o.info,
                        obtained_at: OffsetDateTime::now_utc().max(now),
                    });
                }
                Ok(Answer::Refused(r)) => {
                    self.metrics
                        .record_csr_refusal(&r.condition, &r.reason, &r.message);
                    let d = self.back_off(now);
                    tracing::warn!(csr = %r.csr, condition = %r.condition, reason = %r.reason, message = %r.message, retry_in = ?d, "CSR refused; keeping the current certificate while it is valid");
                    return Err(self.err(format!("{r}; next CSR in {}s", d.as_secs().max(1)), true));
                }
                Err(e) => {
                    let retryable = meshca::kube::retryable(&e);
                    let d = self.back_off(now);
                    let first = !self.obtained_any.load(Ordering::Relaxed);
                    if retryable && first && started.elapsed() + d < self.timeout {
                        tracing::warn!(error = %e, retry_in = ?d, "CSR request failed; retrying");
                        tokio::time::sleep(d).await;
                        continue;
                    }
                    return Err(self.err(
                        format!("{e}; next CSR in {}s", d.as_secs().max(1)),
                        !retryable && e.is_user_error(),
                    ));
                }
            }
        }
    }
}

#[async_trait]
impl CertSource for KubeCsrSource {
    fn describe(&self) -> String {
        format!("kube-csr:{}", self.request.signer_name)
    }

    async fn load(&self, renew: bool, now: OffsetDateTime) -> Result<Material, SourceError> {
        let bundle = self.bundle().await?;
        let mut m = Material {
            bundle,
            ..Material::default()
        };
        if !renew {
            return Ok(m);
        }
        let wait = *self.retry_at.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = wait.filter(|at| now < *at) {
            // Backing off after a refusal or failure: serve the bundle, ask again later.
            tracing::debug!(retry_at = %at, "CSR backoff: not requesting yet");
            return Ok(m);
        }
        m.workload = Some(self.obtain(now).await?);
        Ok(m)
    }

    fn expected_identity(&self) -> Option<&Sans> {
        Some(&self.request.sans)
    }

    /// The trust-bundle file's directory (a mounted ConfigMap swaps its `..data` symlink
    /// there). ClusterTrustBundles come through their own API watch, and are polled from it.
    fn watch_spec(&self) -> crate::fswatch::WatchSpec {
        match &self.trust {
            Trust::File(p) => crate::fswatch::WatchSpec::parents_of([p.as_path()]),
            Trust::Cluster(_) => crate::fswatch::WatchSpec::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rotation::{RotationConfig, Rotator};
    use base64::Engine as _;
    use http::{Request, Response};
    use kube::client::Body;
    use meshca::ca::{create_root, CaSpec};
    use meshca::identity::{SpiffeId, TrustDomain};
    use meshca::issue::LocalIssuer;
    use meshca::key::KeyAlgorithm;
    use serde_json::json;
    use tokio::sync::watch;
    use tower_test::mock::Handle;

    type H = Handle<Request<Body>, Response<Body>>;

    fn b64(b: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(b)
    }

    fn respond(code: u16, v: &serde_json::Value) -> Response<Body> {
        Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(v).unwrap()))
            .unwrap()
    }

    fn csr(name: &str, rv: &str, request: &str, status: serde_json::Value) -> serde_json::Value {
        json!({
            "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
            "metadata": {"name": name, "resourceVersion": rv},
            "spec": {"request": request, "signerName": "meshca.io/mesh",
                     "username": "system:serviceaccount:app:blue"},
            "status": status,
        })
    }

    async fn next(
        h: &mut H,
    ) -> (
        Request<()>,
        serde_json::Value,
        tower_test::mock::SendResponse<Response<Body>>,
    ) {
        let (req, send) = tokio::time::timeout(Duration::from_secs(10), h.next_request())
            .await
            .expect("a request within 10 s")
            .expect("client alive");
        let (parts, body) = req.into_parts();
        let bytes = http_body_util::BodyExt::collect(body)
            .await
            .unwrap()
            .to_bytes();
        let v = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (Request::from_parts(parts, ()), v, send)
    }

    enum Verdict {
        Sign,
        Refuse(&'static str, &'static str, &'static str),
        Unavailable,
    }

    /// One CSR round: checks the create (signer, expiration, usages, a request that parses),
    /// answers the watch with `verdict` and expects the delete of that CSR.
    async fn round(h: &mut H, ca: &LocalIssuer, name: &str, verdict: Verdict) {
        let (req, body, send) = next(h).await;
        assert_eq!(req.method(), "POST");
        assert_eq!(
            req.uri().path(),
            "/apis/certificates.k8s.io/v1/certificatesigningrequests"
        );
        assert_eq!(body["spec"]["signerName"], "meshca.io/mesh");
        assert_eq!(body["spec"]["expirationSeconds"], 3600);
        assert_eq!(
            body["spec"]["usages"],
            json!(["digital signature", "server auth", "client auth"])
        );
        if let Verdict::Unavailable = verdict {
            send.send_response(respond(
                503,
                &json!({"kind": "Status", "apiVersion": "v1",
                "metadata": {}, "status": "Failure", "message": "apiserver restarting",
                "reason": "ServiceUnavailable", "code": 503}),
            ));
            return;
        }
        let request = body["spec"]["request"].as_str().unwrap().to_string();
        send.send_response(respond(201, &csr(name, "1", &request, json!({}))));
        let status = match verdict {
            Verdict::Sign => {
                let pem = base64::engine::general_purpose::STANDARD
                    .decode(&request)
                    .unwrap();
                let der = meshca::pemutil::parse_blocks(&pem, "r")
                    .unwrap()
                    .remove(0)
                    .into_contents();
                let opts = meshca::issue::CsrOptions::kube(
                    meshca::policy::FrontEnd::CsrSigner,
                    "system:serviceaccount:app:blue",
                    Some(Duration::from_secs(3600)),
                    Some(meshca::kube::csr_client::usages_for(
                        KeyAlgorithm::EcdsaP256,
                    )),
                );
                let sr = meshca::issue::check_csr(ca, &der, &opts).unwrap();
                let cert = ca.sign_now(&sr, OffsetDateTime::now_utc()).unwrap();
                json!({"certificate": b64(cert.chain_pem().as_bytes()),
                       "conditions": [{"type": "Approved", "status": "True", "reason": "MeshcaPolicyApproved", "message": "ok"}]})
            }
            Verdict::Refuse(ty, reason, message) => {
                json!({"conditions": [{"type": ty, "status": "True", "reason": reason, "message": message}]})
            }
            Verdict::Unavailable => unreachable!(),
        };
        let (req, _, send) = next(h).await;
        assert!(req.uri().query().unwrap().contains("watch=true"));
        let ev = json!({"type": "MODIFIED", "object": csr(name, "2", &request, status)});
        let mut b = serde_json::to_vec(&ev).unwrap();
        b.push(b'\n');
        send.send_response(Response::builder().status(200).body(Body::from(b)).unwrap());
        let (req, _, send) = next(h).await;
        assert_eq!(req.method(), "DELETE");
        assert_eq!(
            req.uri().path(),
            format!("/apis/certificates.k8s.io/v1/certificatesigningrequests/{name}")
        );
        send.send_response(respond(200, &csr(name, "3", &request, json!({}))));
    }

    struct Fixture {
        ca: LocalIssuer,
        _dir: tempfile::TempDir,
        cfg: KubeCsrConfig,
    }

    fn fixture() -> Fixture {
        let root = create_root(&CaSpec::root("mesh"), OffsetDateTime::now_utc()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(
            &ca_file,
            meshca::bundle::to_pem(std::slice::from_ref(&root.cert)),
        )
        .unwrap();
        let td = TrustDomain::default();
        let cfg = KubeCsrConfig {
            kubeconfig: None,
            request: CsrRequest {
                signer_name: "meshca.io/mesh".into(),
                sans: Sans {
                    spiffe_id: Some(SpiffeId::for_service_account(&td, "app", "blue").unwrap()),
                    ..Sans::default()
                },
                trust_domain: td,
                key: KeyAlgorithm::EcdsaP256,
                expiration: Duration::from_secs(3600),
                name_prefix: "meshca-sds-".into(),
                requester_label: String::new(),
            },
            timeout: Duration::from_secs(20),
            trust: TrustConfig::File(ca_file),
        };
        Fixture {
            ca: LocalIssuer::new(root).unwrap(),
            _dir: dir,
            cfg,
        }
    }

    #[tokio::test]
    async fn signed_then_denied_keeps_the_old_certificate_backs_off_and_says_why() {
        let f = fixture();
        let (svc, mut h) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let metrics = Arc::new(Metrics::default());
        let source =
            KubeCsrSource::with_client(kube::Client::new(svc, "default"), &f.cfg, metrics.clone())
                .await
                .unwrap();
        let (tx, rx) = watch::channel(Arc::new(crate::Snapshot::new()));
        let mut rot = Rotator::new(
            Box::new(source),
            RotationConfig::default(),
            tx,
            metrics.clone(),
        );

        // Signed: served as `default`, with the bundle file as ROOTCA.
        let (r, _) = tokio::join!(rot.step(true), round(&mut h, &f.ca, "c-1", Verdict::Sign));
        r.unwrap();
        let first = rx.borrow().versions();
        assert!(
            first.contains_key(crate::DEFAULT_NAME) && first.contains_key(crate::ROOTCA_NAME),
            "{first:?}"
        );
        assert_eq!(metrics.csr_issued.load(Ordering::Relaxed), 1);

        // Denied on renewal: an error quoting reason and message; the old certificate stays.
        let (r, _) = tokio::join!(
            rot.step(true),
            round(
                &mut h,
                &f.ca,
                "c-2",
                Verdict::Refuse(
                    "Denied",
                    "MeshcaPolicyDenied",
                    "spiffe://cluster.local/ns/app/sa/green does not belong to requester"
                )
            )
        );
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("MeshcaPolicyDenied")
                && e.contains("does not belong to requester")
                && e.contains("c-2"),
            "{e}"
        );
        assert_eq!(
            rx.borrow().versions(),
            first,
            "the current secrets stay served"
        );
        let text = metrics.render();
        assert!(text.contains("meshca_sds_csr_refusals_total{condition=\"Denied\",reason=\"MeshcaPolicyDenied\"} 1"), "{text}");
        assert!(text.contains("message=\"spiffe://cluster.local/ns/app/sa/green does not belong to requester\"} 1"), "{text}");

        // Within the backoff no new CSR is made, and the bundle is still refreshed.
        rot.step(true).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), h.next_request())
                .await
                .is_err(),
            "no CSR during the backoff"
        );
        assert_eq!(rx.borrow().versions(), first);
    }

    #[tokio::test]
    async fn failed_and_transient_errors_then_a_retry_succeeds() {
        let f = fixture();
        let (svc, mut h) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let metrics = Arc::new(Metrics::default());
        let source =
            KubeCsrSource::with_client(kube::Client::new(svc, "default"), &f.cfg, metrics.clone())
                .await
                .unwrap();
        // At startup (no certificate yet) a 503 is retried within the timeout.
        let (w, _) = tokio::join!(source.load(true, OffsetDateTime::now_utc()), async {
            round(&mut h, &f.ca, "c-1", Verdict::Unavailable).await;
            round(&mut h, &f.ca, "c-2", Verdict::Sign).await;
        });
        assert!(w.unwrap().workload.is_some());
        // Failed: quoted, counted, and the backoff is honoured before the next CSR.
        let (r, _) = tokio::join!(
            source.load(true, OffsetDateTime::now_utc()),
            round(
                &mut h,
                &f.ca,
                "c-3",
                Verdict::Refuse("Failed", "MeshcaBadRequest", "bad request")
            )
        );
        let e = r.unwrap_err();
        assert!(
            e.to_string().contains("MeshcaBadRequest: bad request"),
            "{e}"
        );
        let m = source.load(true, OffsetDateTime::now_utc()).await.unwrap();
        assert!(m.workload.is_none() && !m.bundle.is_empty());
        // After the backoff, a transient failure is an error (with a certificate in hand the
        // rotator retries) ...
        let later = OffsetDateTime::now_utc() + time::Duration::seconds(600);
        let (r, _) = tokio::join!(
            source.load(true, later),
            round(&mut h, &f.ca, "c-4", Verdict::Unavailable)
        );
        assert!(r.unwrap_err().to_string().contains("apiserver restarting"));
        // ... and the next attempt signs.
        let later = later + time::Duration::seconds(600);
        let (r, _) = tokio::join!(
            source.load(true, later),
            round(&mut h, &f.ca, "c-5", Verdict::Sign)
        );
        assert!(r.unwrap().workload.is_some());
        assert_eq!(metrics.csr_issued.load(Ordering::Relaxed), 2);
        assert!(metrics.render().contains("reason=\"MeshcaBadRequest\"} 1"));
    }
}
