//! The PodCertificateRequest signer against a tower-test API server: each path asserts the
//! exact request (method, path, query, body) it makes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use time::OffsetDateTime;

use super::check::tests::{key_and_pop, pcr, stub_csr, stub_pcr};
use super::check::{
    REASON_BAD_REQUEST, REASON_INVALID_USER_CONFIG, REASON_POLICY, REASON_SIGN_FAILED,
    REASON_UNSUPPORTED_KEY_TYPE,
};
use super::*;
use crate::clock::SystemClock;
use crate::issue::{Issuer, SignRequest};
use crate::kube::discovery::tests::resource_list;
use crate::kube::issuers::IssuerSet;
use crate::kube::signer::tests::local;
use crate::kube::testutil::{json as resp, mock_client, next, status as api_status};
use crate::policy::Policy;

/// A policy that opts in to pod certificates for namespace `app` (the requests' namespace).
fn opted_in() -> Policy {
    Policy {
        pod_certificates: true,
        pod_certificate_namespaces: vec!["app".into()],
        ..Policy::default()
    }
}

const UID: &str = "5f0c8a1e-9b7d-4c2a-8e6f-1a2b3c4d5e6f";
const PATH: &str =
    "/apis/certificates.k8s.io/v1beta1/namespaces/app/podcertificaterequests/p1/status";
const V1_PATH: &str =
    "/apis/certificates.k8s.io/v1/namespaces/app/podcertificaterequests/p1/status";

/// A signer of CA `mesh` writing through v1beta1 (the requests of [`good`] carry
/// `pkixPublicKey`, which v1 does not have).
fn signer(client: kube::Client, iss: Arc<dyn Issuer>) -> PcrSigner {
    signer_v(client, iss, "v1beta1")
}

fn signer_v(client: kube::Client, iss: Arc<dyn Issuer>, version: &str) -> PcrSigner {
    PcrSigner::new(
        client,
        IssuerSet::watch_fixed([("mesh".to_string(), iss)].into_iter().collect()),
        PcrConfig::default(),
        Arc::new(crate::kube::metrics::Metrics::new()),
        Arc::new(RateLimiter::new(0.0, 1)),
        crate::kube::leader::always_leader(),
        Arc::new(SystemClock),
    )
    .with_api(WANTED.resource(version))
}

/// The spec as read, as a status update must carry it: without the empty
/// `stubPKCS10Request` the model always has.
fn spec_as_read(sent: &Pcr) -> serde_json::Value {
    let mut spec = serde_json::to_value(sent).unwrap()["spec"].clone();
    if spec["stubPKCS10Request"] == "" {
        spec.as_object_mut().unwrap().remove("stubPKCS10Request");
    }
    spec
}

fn good(max: Option<i32>) -> (Pcr, Vec<u8>) {
    let (spki, pop) = key_and_pop("p256", UID);
    (
        pcr("app", "web", "meshca.io/mesh", &spki, &pop, UID, max),
        spki,
    )
}

/// Checks the one PUT: method, path, query, precondition, unchanged spec; returns the body.
fn assert_put(req: &http::Request<()>, body: &serde_json::Value, sent: &Pcr) {
    assert_put_at(req, body, sent, PATH, "certificates.k8s.io/v1beta1")
}

fn assert_put_at(
    req: &http::Request<()>,
    body: &serde_json::Value,
    sent: &Pcr,
    path: &str,
    api_version: &str,
) {
    assert_eq!(req.method(), "PUT");
    assert_eq!(req.uri().path(), path);
    assert_eq!(body["apiVersion"], api_version);
    assert!(
        req.uri()
            .query()
            .unwrap_or("")
            .contains("fieldManager=meshca"),
        "{:?}",
        req.uri().query()
    );
    assert_eq!(body["metadata"]["resourceVersion"], "7", "the precondition");
    assert_eq!(body["kind"], "PodCertificateRequest");
    assert_eq!(body["spec"], spec_as_read(sent), "spec unchanged");
}

fn ok(body: &serde_json::Value) -> http::Response<kube::client::Body> {
    resp(200, body)
}

fn only_condition(body: &serde_json::Value) -> serde_json::Value {
    let st = body["status"].as_object().unwrap();
    assert_eq!(
        st.keys().collect::<Vec<_>>(),
        vec!["conditions"],
        "a refusal sets conditions and nothing else: {st:?}"
    );
    let cs = st["conditions"].as_array().unwrap();
    assert_eq!(cs.len(), 1, "{cs:?}");
    assert_eq!(cs[0]["status"], "True");
    assert!(cs[0]["lastTransitionTime"].as_str().unwrap().ends_with('Z'));
    cs[0].clone()
}

#[tokio::test]
async fn a_request_is_signed_in_one_status_update_the_api_server_accepts() {
    let (client, mut h) = mock_client();
    let ca = local("mesh", opted_in());
    let rec = Arc::new(crate::kube::signer::tests::Rec::default());
    let (sink, task) =
        LedgerSink::spawn(rec.clone(), Arc::new(crate::kube::metrics::Metrics::new()));
    let s = signer(client, ca.clone()).with_ledger(sink);
    let (p, spki) = good(Some(7200));
    let sent = p.clone();
    let server = tokio::spawn(async move {
        let (req, body, send) = next(&mut h).await;
        assert_put(&req, &body, &sent);
        send.send_response(ok(&body));
        body
    });
    let before = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    assert_eq!(
        s.reconcile_or_log(&p).await.unwrap(),
        Action::await_change()
    );
    let body = server.await.unwrap();
    assert_eq!(s.metrics().pcrs_issued.get(), 1);
    let st = &body["status"];
    let cs = st["conditions"].as_array().unwrap();
    assert_eq!(cs.len(), 1);
    assert_eq!(cs[0]["type"], "Issued");
    assert_eq!(cs[0]["reason"], status::REASON_ISSUED);
    // The chain: leaf first, verifying to the CA with rustls-webpki, for the pod's key.
    let certs =
        crate::pemutil::parse_certs(st["certificateChain"].as_str().unwrap().as_bytes(), "chain")
            .unwrap();
    assert_eq!(certs.len(), 1, "a root CA: the leaf alone");
    let info = crate::x509::CertInfo::from_der(&certs[0]).unwrap();
    crate::x509::verify_chain(
        &certs[0],
        &[],
        &[ca.ca().cert.clone()],
        OffsetDateTime::now_utc(),
        crate::x509::Usage::Client,
    )
    .unwrap();
    assert_eq!(
        info.sans.uri,
        vec!["spiffe://cluster.local/ns/app/sa/web".to_string()]
    );
    assert!(info.sans.dns.is_empty() && info.sans.ip.is_empty());
    assert_eq!(info.spki_der, spki, "issued to spec.pkixPublicKey");
    // Times: equal to the leaf's, notBefore within a minute of now, lifetime = 2 h, refresh
    // between 50% and 60% and at least 10 minutes from either end.
    let t = |k: &str| {
        OffsetDateTime::parse(
            st[k].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    assert_eq!(t("notBefore"), info.not_before);
    assert_eq!(t("notAfter"), info.not_after);
    assert!(
        (info.not_before - (before - time::Duration::minutes(1))).abs()
            <= time::Duration::seconds(2)
    );
    assert_eq!(info.not_after - info.not_before, time::Duration::hours(2));
    let r = t("beginRefreshAt");
    assert!(r >= info.not_before + time::Duration::hours(1), "{r}");
    assert!(r <= info.not_before + time::Duration::minutes(72), "{r}");
    // The ledger names the service account and the request.
    drop(s);
    crate::kube::ledger::flush(task, Duration::from_secs(10)).await;
    let got = rec.0.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].requester, "system:serviceaccount:app:web");
    assert_eq!(got[0].object, "pcr/app/p1");
    assert_eq!(got[0].entry.serial, info.serial_hex());
}

/// Runs one reconcile of `p` that ends in a refusal; returns the refusal's condition.
async fn refused(iss: Arc<dyn Issuer>, p: Pcr) -> serde_json::Value {
    let (client, mut h) = mock_client();
    let s = signer(client, iss);
    let sent = p.clone();
    let server = tokio::spawn(async move {
        let (req, body, send) = next(&mut h).await;
        assert_put(&req, &body, &sent);
        send.send_response(ok(&body));
        body
    });
    assert_eq!(
        s.reconcile_or_log(&p).await.unwrap(),
        Action::await_change()
    );
    let c = only_condition(&server.await.unwrap());
    let text = s.metrics().render();
    let line = format!(
        "meshca_pod_certificate_requests_refused_total{{condition=\"{}\",reason=\"{}\"}} 1",
        c["type"].as_str().unwrap(),
        c["reason"].as_str().unwrap()
    );
    assert!(text.contains(&line), "{line} not in {text}");
    assert_eq!(s.metrics().pcrs_issued.get(), 0);
    c
}

#[tokio::test]
async fn each_denial_reason_is_written_as_a_denied_condition_naming_the_value() {
    let mesh = local("mesh", opted_in());
    // Unsupported key type (P-521, which the API server accepts).
    let (k, pop) = key_and_pop("p521", UID);
    let c = refused(
        mesh.clone(),
        pcr("app", "web", "meshca.io/mesh", &k, &pop, UID, None),
    )
    .await;
    assert_eq!(
        (c["type"].as_str(), c["reason"].as_str()),
        (Some("Denied"), Some(REASON_UNSUPPORTED_KEY_TYPE))
    );
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("use keyType ECDSAP256"),
        "{c}"
    );
    // Unknown user annotations.
    let (mut p, _) = good(None);
    p.spec.unverified_user_annotations = Some([("acme.io/x".to_string(), "y".to_string())].into());
    let c = refused(mesh.clone(), p).await;
    assert_eq!(
        (c["type"].as_str(), c["reason"].as_str()),
        (Some("Denied"), Some(REASON_INVALID_USER_CONFIG))
    );
    assert!(c["message"].as_str().unwrap().contains("acme.io/x"), "{c}");
    // Policy: the CA serves namespace prod only.
    let prod = local(
        "mesh",
        Policy {
            allowed_spiffe_ids: vec!["spiffe://{td}/ns/prod/sa/{sa}".into()],
            ..opted_in()
        },
    );
    let c = refused(prod, good(None).0).await;
    assert_eq!(
        (c["type"].as_str(), c["reason"].as_str()),
        (Some("Denied"), Some(REASON_POLICY))
    );
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("spiffe://cluster.local/ns/app/sa/web"),
        "{c}"
    );
    // Issue 17: a CA without the pod-certificate opt-in, and one serving another namespace.
    for (policy, needle) in [
        (Policy::default(), "CA mesh does not sign pod certificates"),
        (
            Policy {
                pod_certificate_namespaces: vec!["prod".into()],
                ..opted_in()
            },
            "namespace \"app\" is not served pod certificates by CA mesh",
        ),
    ] {
        let c = refused(local("mesh", policy), good(None).0).await;
        assert_eq!(
            (c["type"].as_str(), c["reason"].as_str()),
            (Some("Denied"), Some(REASON_POLICY))
        );
        assert!(c["message"].as_str().unwrap().contains(needle), "{c}");
    }
    // Proof of possession over another UID.
    let (k, pop) = key_and_pop("p256", "not-the-pod");
    let c = refused(
        mesh.clone(),
        pcr("app", "web", "meshca.io/mesh", &k, &pop, UID, None),
    )
    .await;
    assert_eq!(
        (c["type"].as_str(), c["reason"].as_str()),
        (Some("Denied"), Some(REASON_BAD_REQUEST))
    );
    // The allowed twin: the same CA signs the good request (a checker that denies
    // everything fails here).
    let (client, mut h) = mock_client();
    let s = signer(client, mesh);
    let server = tokio::spawn(async move {
        let (_, body, send) = next(&mut h).await;
        send.send_response(ok(&body));
        body
    });
    s.reconcile(&good(None).0).await.unwrap();
    assert_eq!(
        server.await.unwrap()["status"]["conditions"][0]["type"],
        "Issued"
    );
}

#[derive(Debug)]
struct Refusing(crate::ca::CaMeta, bool);

#[async_trait::async_trait]
impl Issuer for Refusing {
    fn meta(&self) -> &crate::ca::CaMeta {
        &self.0
    }
    async fn sign(&self, _: &SignRequest, _: OffsetDateTime) -> Result<crate::issue::IssuedCert> {
        Err(Error::Backend {
            backend: "acm-pca",
            message: if self.1 { "throttled" } else { "access denied" }.into(),
            retryable: self.1,
        })
    }
}

#[tokio::test]
async fn what_no_retry_fixes_fails_the_request() {
    // A CA whose policy cannot reach the 1-hour minimum.
    let tiny = local(
        "mesh",
        Policy {
            max_ttl: Duration::from_secs(1800),
            default_ttl: Duration::from_secs(1800),
            ..opted_in()
        },
    );
    let c = refused(tiny, good(None).0).await;
    assert_eq!(
        (c["type"].as_str(), c["reason"].as_str()),
        (Some("Failed"), Some(REASON_SIGN_FAILED))
    );
    assert!(
        c["message"].as_str().unwrap().contains("1-hour minimum"),
        "{c}"
    );
    // A terminal backend refusal.
    let meta = local("mesh", opted_in()).ca().meta.clone();
    let c = refused(Arc::new(Refusing(meta, false)), good(None).0).await;
    assert_eq!(
        (c["type"].as_str(), c["reason"].as_str()),
        (Some("Failed"), Some(REASON_SIGN_FAILED))
    );
    assert!(
        c["message"].as_str().unwrap().contains("access denied"),
        "{c}"
    );
    // The API server refuses the certificate as invalid (not "already terminal"): Failed,
    // quoting it.
    let (client, mut h) = mock_client();
    let s = signer(client, local("mesh", opted_in()));
    let (p, _) = good(None);
    let sent = p.clone();
    let api_message = "PodCertificateRequest.certificates.k8s.io \"p1\" is invalid: status.notBefore: Invalid value: must be set to within 5 minutes of kube-apiserver's current time";
    let server = tokio::spawn(async move {
        let (req, body, send) = next(&mut h).await;
        assert_put(&req, &body, &sent);
        assert!(body["status"]["certificateChain"].is_string());
        send.send_response(api_status(422, "Invalid", api_message));
        let (req, body, send) = next(&mut h).await;
        assert_put(&req, &body, &sent);
        let c = only_condition(&body);
        send.send_response(ok(&body));
        c
    });
    s.reconcile_or_log(&p).await.unwrap();
    let c = server.await.unwrap();
    assert_eq!(
        (c["type"].as_str(), c["reason"].as_str()),
        (Some("Failed"), Some(REASON_API_REJECTED))
    );
    assert!(
        c["message"].as_str().unwrap().contains("within 5 minutes"),
        "{c}"
    );
}

#[tokio::test]
async fn transient_errors_are_retried_with_backoff_and_write_nothing_terminal() {
    // 500 on the write, and the 422 an RBAC gap gives ("not permitted to sign"): retried.
    for (code, reason, msg) in [
        (500, "InternalError", "etcd timeout"),
        (
            422,
            "Invalid",
            "PodCertificateRequest.certificates.k8s.io \"p1\" is invalid: spec.signerName: Forbidden: User \"system:serviceaccount:meshca:meshca-signer\" is not permitted to \"sign\" for signer \"meshca.io/mesh\"",
        ),
    ] {
        let (client, mut h) = mock_client();
        let s = signer(client, local("mesh", opted_in()));
        let (p, _) = good(None);
        let sent = p.clone();
        let server = tokio::spawn(async move {
            let (req, body, send) = next(&mut h).await;
            assert_put(&req, &body, &sent);
            send.send_response(api_status(code, reason, msg));
            // Nothing else: no Failed condition follows.
            assert!(tokio::time::timeout(Duration::from_millis(200), h.next_request())
                .await
                .is_err());
        });
        let e = s.reconcile_or_log(&p).await.unwrap_err();
        assert!(crate::kube::retryable(&e), "{code}: {e}");
        server.await.unwrap();
        let d1 = s.backoff("app/p1");
        let d2 = s.backoff("app/p1");
        assert!(d1 >= Duration::from_millis(250) && d1 <= Duration::from_millis(500), "{d1:?}");
        assert!(d2 >= Duration::from_millis(500) && d2 <= Duration::from_secs(1), "{d2:?}");
    }
    // A throttled backend: retried, no request at all.
    let (client, mut h) = mock_client();
    let meta = local("mesh", opted_in()).ca().meta.clone();
    let s = signer(client, Arc::new(Refusing(meta, true)));
    assert!(crate::kube::retryable(
        &s.reconcile_or_log(&good(None).0).await.unwrap_err()
    ));
    assert!(
        tokio::time::timeout(Duration::from_millis(100), h.next_request())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_lost_race_terminal_foreign_and_follower_requests_are_left_alone() {
    // 409 and "already terminal": counted as lost, nothing more written.
    for (code, msg) in [
        (409, "the object has been modified".to_string()),
        (422, format!("status: Invalid value: {ALREADY_TERMINAL}")),
    ] {
        let (client, mut h) = mock_client();
        let s = signer(client, local("mesh", opted_in()));
        let server = tokio::spawn(async move {
            let (_, _, send) = next(&mut h).await;
            send.send_response(api_status(code, "Conflict", &msg));
            assert!(
                tokio::time::timeout(Duration::from_millis(200), h.next_request())
                    .await
                    .is_err()
            );
        });
        assert_eq!(
            s.reconcile_or_log(&good(None).0).await.unwrap(),
            Action::await_change()
        );
        server.await.unwrap();
    }
    let (client, mut h) = mock_client();
    let s = signer(client.clone(), local("mesh", opted_in()));
    let (p, _) = good(None);
    let mut issued = p.clone();
    issued.status = serde_json::from_value(json!({"conditions": [{
        "type": "Issued", "status": "True", "reason": "X", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}))
    .unwrap();
    let mut denied = p.clone();
    denied.status = serde_json::from_value(json!({"conditions": [{
        "type": "Denied", "status": "True", "reason": "X", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}))
    .unwrap();
    let mut foreign = p.clone();
    foreign.spec.signer_name = "meshca.io/other".into();
    let mut k8s = p.clone();
    k8s.spec.signer_name = "kubernetes.io/kube-apiserver-client-pod".into();
    for x in [&issued, &denied, &foreign, &k8s] {
        assert_eq!(s.reconcile(x).await.unwrap(), Action::await_change());
    }
    assert_eq!(classify(&issued, |_| true), Decision::Terminal);
    assert_eq!(classify(&foreign, |c| c == "mesh"), Decision::NotOurs);
    assert_eq!(
        classify(&p, |c| c == "mesh"),
        Decision::Sign { ca: "mesh".into() }
    );
    // A follower signs nothing.
    let (tx, rx) = watch::channel(false);
    let follower = PcrSigner::new(
        client,
        IssuerSet::watch_fixed(
            [(
                "mesh".to_string(),
                local("mesh", opted_in()) as Arc<dyn Issuer>,
            )]
            .into_iter()
            .collect(),
        ),
        PcrConfig::default(),
        Arc::new(crate::kube::metrics::Metrics::new()),
        Arc::new(RateLimiter::new(0.0, 1)),
        rx,
        Arc::new(SystemClock),
    );
    follower.reconcile(&p).await.unwrap();
    drop(tx);
    assert!(
        tokio::time::timeout(Duration::from_millis(100), h.next_request())
            .await
            .is_err()
    );
}

/// A sink for the log lines of one test (a `tracing` default for the current thread, which
/// is the whole of a `#[tokio::test]`).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

impl Logs {
    fn capture(&self) -> tracing::subscriber::DefaultGuard {
        tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_writer(self.clone())
                .with_ansi(false)
                .without_time()
                .with_max_level(tracing::Level::INFO)
                .finish(),
        )
    }

    fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .map(str::to_string)
            .collect()
    }
}

const GV: &str = "/apis/certificates.k8s.io";

/// Runs `run_if_served` of a signer for `meshca.io/mesh` against a mock whose discovery
/// answers `answers` (path, response) in order; then expects the LIST of the version it
/// chose (`want`, or none), a watch, and stops. Returns the log lines.
async fn discover(
    answers: Vec<(&'static str, http::Response<kube::client::Body>)>,
    want: Option<&str>,
) -> Vec<String> {
    let logs = Logs::default();
    let _g = logs.capture();
    let (s, mut h) = discovering_signer();
    session(s, &mut h, answers, want).await;
    logs.lines()
}

type MockHandle =
    tower_test::mock::Handle<http::Request<kube::client::Body>, http::Response<kube::client::Body>>;

/// A signer for `meshca.io/mesh` that discovers its version.
fn discovering_signer() -> (Arc<PcrSigner>, MockHandle) {
    let (client, h) = mock_client();
    let s = Arc::new(PcrSigner::new(
        client,
        IssuerSet::watch_fixed(
            [(
                "mesh".to_string(),
                local("mesh", opted_in()) as Arc<dyn Issuer>,
            )]
            .into_iter()
            .collect(),
        ),
        PcrConfig {
            only_signer: Some("meshca.io/mesh".into()),
            ..PcrConfig::default()
        },
        Arc::new(crate::kube::metrics::Metrics::new()),
        Arc::new(RateLimiter::new(0.0, 1)),
        crate::kube::leader::always_leader(),
        Arc::new(SystemClock),
    ));
    (s, h)
}

/// One leadership session of `s`: `run_if_served` against discovery answers `answers`
/// (path, response) in order; then the LIST of the version chosen (`want`, or none), a
/// watch, and a stop.
async fn session(
    s: Arc<PcrSigner>,
    h: &mut MockHandle,
    answers: Vec<(&'static str, http::Response<kube::client::Body>)>,
    want: Option<&str>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let ctl = tokio::spawn(s.clone().run_if_served(async move {
        let _ = stopped.await;
    }));
    for (path, response) in answers {
        let (req, body, send) = next(h).await;
        assert_eq!(req.method(), "GET");
        assert_eq!(req.uri().path(), format!("{GV}/{path}"));
        assert_eq!(req.uri().query(), None);
        assert!(body.is_null());
        send.send_response(response);
    }
    match want {
        Some(v) => {
            let (req, _, send) = next(h).await;
            assert_eq!(req.method(), "GET");
            assert_eq!(req.uri().path(), format!("{GV}/{v}/podcertificaterequests"));
            let q = req.uri().query().unwrap_or("").to_string();
            assert!(
                q.contains("fieldSelector=spec.signerName%3Dmeshca.io%2Fmesh"),
                "{q}"
            );
            assert!(!q.contains("watch=true"), "{q}");
            send.send_response(resp(
                200,
                &json!({"apiVersion": format!("certificates.k8s.io/{v}"), "kind": "PodCertificateRequestList",
                        "metadata": {"resourceVersion": "1"}, "items": []}),
            ));
            let (req, _, _parked) = next(h).await;
            assert_eq!(req.uri().path(), format!("{GV}/{v}/podcertificaterequests"));
            assert!(req.uri().query().unwrap().contains("watch=true"));
            assert_eq!(
                s.api_resource().api_version,
                format!("certificates.k8s.io/{v}")
            );
            stop.send(()).unwrap();
            tokio::time::timeout(Duration::from_secs(10), ctl)
                .await
                .expect("stops")
                .unwrap();
        }
        None => {
            tokio::time::timeout(Duration::from_secs(5), ctl)
                .await
                .expect("returns when the API is absent")
                .unwrap();
            // Nothing else was asked: the client is gone.
            drop(s);
            assert!(h.next_request().await.is_none());
        }
    }
}

fn not_found() -> http::Response<kube::client::Body> {
    api_status(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

#[tokio::test]
async fn discovery_uses_v1_when_served() {
    let logs = discover(
        vec![(
            "v1",
            resource_list(
                "certificates.k8s.io/v1",
                &[
                    "certificatesigningrequests",
                    "clustertrustbundles",
                    "podcertificaterequests",
                    "podcertificaterequests/status",
                ],
            ),
        )],
        Some("v1"),
    )
    .await;
    let started: Vec<&String> = logs
        .iter()
        .filter(|l| l.contains("signer started"))
        .collect();
    assert_eq!(started.len(), 1, "{logs:?}");
    assert!(started[0].contains("certificates.k8s.io/v1"), "{logs:?}");
}

#[tokio::test]
async fn discovery_falls_back_to_v1beta1_when_v1_lacks_the_resource() {
    // Kubernetes 1.35/1.36: v1 serves CSRs only. A discovery error is retried first.
    let logs = discover(
        vec![
            ("v1", api_status(503, "ServiceUnavailable", "starting")),
            (
                "v1",
                resource_list("certificates.k8s.io/v1", &["certificatesigningrequests"]),
            ),
            (
                "v1beta1",
                resource_list(
                    "certificates.k8s.io/v1beta1",
                    &["clustertrustbundles", "podcertificaterequests"],
                ),
            ),
        ],
        Some("v1beta1"),
    )
    .await;
    assert!(
        logs.iter()
            .any(|l| l.contains("signer started") && l.contains("certificates.k8s.io/v1beta1")),
        "{logs:?}"
    );
}

#[tokio::test]
async fn each_leadership_session_discovers_again() {
    // Session 1 on a 1.36 cluster (v1beta1); the control plane is upgraded to 1.37 before
    // session 2, which uses v1.
    let (s, mut h) = discovering_signer();
    let v1 = |with_pcr: bool| {
        let mut r = vec!["certificatesigningrequests"];
        if with_pcr {
            r.push("podcertificaterequests");
        }
        resource_list("certificates.k8s.io/v1", &r)
    };
    let beta = resource_list("certificates.k8s.io/v1beta1", &["podcertificaterequests"]);
    session(
        s.clone(),
        &mut h,
        vec![("v1", v1(false)), ("v1beta1", beta)],
        Some("v1beta1"),
    )
    .await;
    session(s, &mut h, vec![("v1", v1(true))], Some("v1")).await;
}

#[tokio::test]
async fn discovery_falls_back_to_v1alpha1_when_neither_v1_nor_v1beta1_serves_it() {
    // Kubernetes 1.34: v1alpha1 only; v1beta1 is absent (404).
    discover(
        vec![
            (
                "v1",
                resource_list("certificates.k8s.io/v1", &["certificatesigningrequests"]),
            ),
            ("v1beta1", not_found()),
            (
                "v1alpha1",
                resource_list(
                    "certificates.k8s.io/v1alpha1",
                    &["clustertrustbundles", "podcertificaterequests"],
                ),
            ),
        ],
        Some("v1alpha1"),
    )
    .await;
}

#[tokio::test]
async fn discovery_turns_the_signer_off_with_one_log_line_when_no_version_serves_it() {
    let logs = discover(
        vec![
            (
                "v1",
                resource_list("certificates.k8s.io/v1", &["certificatesigningrequests"]),
            ),
            (
                "v1beta1",
                resource_list("certificates.k8s.io/v1beta1", &["clustertrustbundles"]),
            ),
            ("v1alpha1", not_found()),
        ],
        None,
    )
    .await;
    assert_eq!(logs.len(), 1, "{logs:?}");
    assert!(
        logs[0].contains(
            "certificates.k8s.io v1, v1beta1 or v1alpha1 podcertificaterequests is not served"
        ) && logs[0].contains("signer is off"),
        "{logs:?}"
    );
}

/// The leaf of a status update body with an `Issued` condition.
fn issued_leaf(body: &serde_json::Value) -> crate::x509::CertInfo {
    assert_eq!(body["status"]["conditions"][0]["type"], "Issued", "{body}");
    let pem = body["status"]["certificateChain"].as_str().unwrap();
    let certs = crate::pemutil::parse_certs(pem.as_bytes(), "chain").unwrap();
    crate::x509::CertInfo::from_der(&certs[0]).unwrap()
}

#[tokio::test]
async fn a_stub_request_through_v1_is_issued_to_the_csrs_key() {
    let (client, mut h) = mock_client();
    let ca = local("mesh", opted_in());
    let s = signer_v(client, ca.clone(), "v1");
    let (csr, spki) = stub_csr("p256");
    let p = stub_pcr("app", "web", "meshca.io/mesh", &csr, None, UID);
    let sent = p.clone();
    let server = tokio::spawn(async move {
        let (req, body, send) = next(&mut h).await;
        assert_put_at(&req, &body, &sent, V1_PATH, "certificates.k8s.io/v1");
        send.send_response(ok(&body));
        body
    });
    s.reconcile_or_log(&p).await.unwrap();
    let info = issued_leaf(&server.await.unwrap());
    assert_eq!(info.spki_der, spki, "issued to the stub CSR's key");
    assert_eq!(
        info.sans.uri,
        vec!["spiffe://cluster.local/ns/app/sa/web".to_string()]
    );
    // A stub with a bad signature: Denied through v1, naming the field.
    let (client, mut h) = mock_client();
    let s = signer_v(client, ca, "v1");
    let mut bad = csr.clone();
    *bad.last_mut().unwrap() ^= 0x01;
    let p = stub_pcr("app", "web", "meshca.io/mesh", &bad, None, UID);
    let server = tokio::spawn(async move {
        let (req, body, send) = next(&mut h).await;
        assert_eq!(req.uri().path(), V1_PATH);
        send.send_response(ok(&body));
        only_condition(&body)
    });
    s.reconcile_or_log(&p).await.unwrap();
    let c = server.await.unwrap();
    assert_eq!(
        (c["type"].as_str(), c["reason"].as_str()),
        (Some("Denied"), Some(REASON_BAD_REQUEST))
    );
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("spec.stubPKCS10Request's signature does not verify"),
        "{c}"
    );
}

#[tokio::test]
async fn a_replaced_ca_signs_the_next_request_without_a_restart() {
    let (client, mut h) = mock_client();
    let old = local("mesh", opted_in());
    let new = local("mesh", opted_in());
    let set = |i: &Arc<crate::issue::LocalIssuer>| {
        Arc::new(IssuerSet::fixed(
            [("mesh".to_string(), i.clone() as Arc<dyn Issuer>)]
                .into_iter()
                .collect(),
        ))
    };
    let (tx, rx) = watch::channel(set(&old));
    let s = PcrSigner::new(
        client,
        rx,
        PcrConfig::default(),
        Arc::new(crate::kube::metrics::Metrics::new()),
        Arc::new(RateLimiter::new(0.0, 1)),
        crate::kube::leader::always_leader(),
        Arc::new(SystemClock),
    )
    .with_api(WANTED.resource("v1beta1"));
    let server = tokio::spawn(async move {
        let mut akis = Vec::new();
        for _ in 0..2 {
            let (req, body, send) = next(&mut h).await;
            assert_eq!(req.uri().path(), PATH);
            let pem = body["status"]["certificateChain"]
                .as_str()
                .unwrap()
                .to_string();
            let der = crate::pemutil::parse_certs(pem.as_bytes(), "c")
                .unwrap()
                .remove(0);
            akis.push(
                crate::x509::CertInfo::from_der(&der)
                    .unwrap()
                    .authority_key_id,
            );
            send.send_response(ok(&body));
        }
        akis
    });
    s.reconcile(&good(None).0).await.unwrap();
    tx.send_replace(set(&new));
    s.reconcile(&good(None).0).await.unwrap();
    let akis = server.await.unwrap();
    assert_eq!(akis[0], old.ca().info().unwrap().subject_key_id);
    assert_eq!(
        akis[1],
        new.ca().info().unwrap().subject_key_id,
        "the new key signs"
    );
}

#[tokio::test]
async fn a_keyless_v1_request_gets_its_key_from_v1beta1_or_is_denied() {
    // Created through v1beta1 with pkixPublicKey (a kubelet before 1.36), seen through v1:
    // no key. It is read again through v1beta1, signed for that key, and written through v1.
    let (client, mut h) = mock_client();
    let s = signer_v(client, local("mesh", opted_in()), "v1");
    let (legacy, spki) = good(None);
    let mut seen = serde_json::to_value(&legacy).unwrap();
    seen["apiVersion"] = json!("certificates.k8s.io/v1");
    let spec = seen["spec"].as_object_mut().unwrap();
    spec.remove("pkixPublicKey");
    spec.remove("proofOfPossession");
    spec.insert("stubPKCS10Request".into(), serde_json::Value::Null);
    let seen: Pcr = serde_json::from_value(seen).unwrap();
    assert!(check::lacks_key(&seen));
    let sent = seen.clone();
    let server = tokio::spawn(async move {
        let (req, body, send) = next(&mut h).await;
        assert_eq!(req.method(), "GET");
        assert_eq!(
            req.uri().path(),
            "/apis/certificates.k8s.io/v1beta1/namespaces/app/podcertificaterequests/p1"
        );
        assert!(body.is_null());
        send.send_response(ok(&serde_json::to_value(&legacy).unwrap()));
        let (req, body, send) = next(&mut h).await;
        assert_put_at(&req, &body, &sent, V1_PATH, "certificates.k8s.io/v1");
        assert!(!body["spec"]
            .as_object()
            .unwrap()
            .contains_key("pkixPublicKey"));
        send.send_response(ok(&body));
        body
    });
    s.reconcile_or_log(&seen).await.unwrap();
    assert_eq!(issued_leaf(&server.await.unwrap()).spki_der, spki);
    // v1beta1 not served (404): Denied for having no key, saying so.
    let (client, mut h) = mock_client();
    let s = signer_v(client, local("mesh", opted_in()), "v1");
    let server = tokio::spawn(async move {
        let (req, _, send) = next(&mut h).await;
        assert_eq!(req.method(), "GET");
        send.send_response(not_found());
        let (req, body, send) = next(&mut h).await;
        assert_eq!(req.uri().path(), V1_PATH);
        send.send_response(ok(&body));
        only_condition(&body)
    });
    s.reconcile_or_log(&seen).await.unwrap();
    let c = server.await.unwrap();
    assert_eq!(
        (c["type"].as_str(), c["reason"].as_str()),
        (Some("Denied"), Some(REASON_BAD_REQUEST))
    );
    assert!(
        c["message"].as_str().unwrap().contains("carries no key"),
        "{c}"
    );
    // A v1beta1 signer never reads twice: the request is refused at once.
    let (client, mut h) = mock_client();
    let s = signer(client, local("mesh", opted_in()));
    let server = tokio::spawn(async move {
        let (req, body, send) = next(&mut h).await;
        assert_eq!(req.method(), "PUT");
        send.send_response(ok(&body));
    });
    s.reconcile_or_log(&seen).await.unwrap();
    server.await.unwrap();
}
