//! `kube-csr` sidecars against an in-process fake API server that runs the real signer and
//! policy auto-approver (`meshca::kube::signer::Signer::reconcile`, with `--auto-approve`).
//!
//! The fake keeps CSRs in memory, fills `spec.username` from the client's (simulated) token,
//! serves create, get, a `metadata.name` watch, the `/approval` and `/status` merge patches and
//! delete, and queues every created or changed CSR for a pool of 16 reconcile workers (the
//! controller's default concurrency). It measures meshca's own costs, not a real API server's.
//!
//! ```text
//! cargo run --release -p meshca-sds --features kube --example kube_csr_sidecars -- roundtrip [SIDECARS] [ROUNDS]
//! cargo run --release -p meshca-sds --features kube --example kube_csr_sidecars -- spread [SIDECARS] [COMPRESSION]
//! cargo run --release -p meshca-sds --features kube --example kube_csr_sidecars -- idle MESHCA_BIN [SECONDS]
//! ```
//! - `roundtrip`: SIDECARS (100) request at once, ROUNDS (5) times; create-to-signed p50/p99 as
//!   each sidecar sees it (create, watch, signed, delete).
//! - `spread`: SIDECARS (1000) whose certificates (24 h) were all issued at the same moment renew
//!   at `--renew-at 0.5`, once with `--jitter 0` (all at once) and once with the default 0.1 (the
//!   deadlines come from `WorkloadCert::renew_deadline`); time is compressed by COMPRESSION (360:
//!   the 72 min jitter window becomes 12 s). Peak signer queue depth and create-to-signed p99.
//! - `idle`: serves the fake over HTTP on 127.0.0.1, runs `MESHCA_BIN sds serve --source kube-csr`
//!   (`meshca-sds serve` when MESHCA_BIN is the sidecar binary) against it, waits for the
//!   certificate, then reports the process's RSS, PSS and CPU time over SECONDS (60) of idling.
//!   For a run with the binary out of the page cache, evict it first:
//!   `python3 sds/bench/idle_rss.py --evict-only MESHCA_BIN`.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http::{Request, Response};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use meshca::ca::{create_root, CaSpec};
use meshca::identity::{Sans, SpiffeId, TrustDomain};
use meshca::issue::{Issuer, LocalIssuer};
use meshca::key::KeyAlgorithm;
use meshca::kube::csr_client::{Answer, CsrClient, CsrRequest};
use meshca::kube::signer::{Signer, SignerConfig};
use meshca::policy::Policy;
use serde_json::{json, Value};
use tokio::sync::{broadcast, Notify};

type RespBody = UnsyncBoxBody<Bytes, Infallible>;

const CSRS: &str = "/apis/certificates.k8s.io/v1/certificatesigningrequests";

#[derive(Default)]
struct Fake {
    csrs: Mutex<BTreeMap<String, Value>>,
    rv: AtomicU64,
    seq: AtomicU64,
    events: Option<broadcast::Sender<(String, Value)>>,
    queue: Mutex<VecDeque<String>>,
    queued: Notify,
    depth: AtomicUsize,
    max_depth: AtomicUsize,
    created: Mutex<BTreeMap<String, Instant>>,
    signed: Mutex<Vec<Duration>>,
}

fn json_resp(code: u16, v: &Value) -> Response<RespBody> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(v).unwrap())).boxed_unsync())
        .unwrap()
}

fn not_found(name: &str) -> Response<RespBody> {
    json_resp(
        404,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("certificatesigningrequests \"{name}\" not found"),
                "reason": "NotFound", "code": 404}),
    )
}

impl Fake {
    fn new() -> Arc<Fake> {
        let (tx, _) = broadcast::channel(65536);
        Arc::new(Fake {
            events: Some(tx),
            ..Fake::default()
        })
    }

    fn enqueue(&self, name: &str) {
        self.queue.lock().unwrap().push_back(name.to_string());
        let d = self.depth.fetch_add(1, Ordering::Relaxed) + 1;
        self.max_depth.fetch_max(d, Ordering::Relaxed);
        self.queued.notify_one();
    }

    async fn next_queued(&self) -> String {
        loop {
            if let Some(n) = self.queue.lock().unwrap().pop_front() {
                self.depth.fetch_sub(1, Ordering::Relaxed);
                return n;
            }
            self.queued.notified().await;
        }
    }

    fn bump(&self, obj: &mut Value) {
        let rv = self.rv.fetch_add(1, Ordering::Relaxed) + 1;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    }

    fn publish(&self, name: &str, obj: &Value) {
        let _ = self
            .events
            .as_ref()
            .unwrap()
            .send((name.to_string(), json!({"type": "MODIFIED", "object": obj})));
    }

    async fn handle(self: &Arc<Self>, username: &str, req: Request<Bytes>) -> Response<RespBody> {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let method = req.method().clone();
        let body = req.into_body();
        if let Some(r) = delete_guard(method.as_str(), &path, &body) {
            return r;
        }
        let rest = path.strip_prefix(CSRS).unwrap_or("");
        let parts: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
        match (method.as_str(), parts.as_slice()) {
            ("POST", [""]) => {
                let mut obj: Value = serde_json::from_slice(&body).unwrap();
                let n = self.seq.fetch_add(1, Ordering::Relaxed);
                let prefix = obj["metadata"]["generateName"].as_str().unwrap_or("csr-");
                let name = format!("{prefix}{n:05}");
                obj["metadata"]["name"] = json!(name);
                obj["metadata"]["creationTimestamp"] = json!(time::OffsetDateTime::now_utc()
                    .replace_nanosecond(0)
                    .unwrap()
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap());
                obj["spec"]["username"] = json!(username);
                obj["status"] = json!({});
                self.bump(&mut obj);
                self.csrs.lock().unwrap().insert(name.clone(), obj.clone());
                self.created
                    .lock()
                    .unwrap()
                    .insert(name.clone(), Instant::now());
                self.enqueue(&name);
                json_resp(201, &obj)
            }
            ("GET", [""]) if query.contains("watch=true") => {
                let sel = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("fieldSelector=metadata.name%3D"))
                    .unwrap_or("")
                    .to_string();
                let since: u64 = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("resourceVersion="))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let rx = self.events.as_ref().unwrap().subscribe();
                let current = self.csrs.lock().unwrap().get(&sel).cloned();
                let first = current.filter(|o| {
                    o["metadata"]["resourceVersion"]
                        .as_str()
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0)
                        > since
                });
                let stream =
                    futures::stream::iter(first.map(|o| json!({"type": "MODIFIED", "object": o})))
                        .chain(events_of(rx, sel))
                        .map(|v| {
                            let mut b = serde_json::to_vec(&v).unwrap();
                            b.push(b'\n');
                            Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(b)))
                        });
                Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(StreamBody::new(stream).boxed_unsync())
                    .unwrap()
            }
            ("GET", [name]) => match self.csrs.lock().unwrap().get(*name) {
                Some(o) => json_resp(200, o),
                None => not_found(name),
            },
            ("PATCH", [name, sub]) if *sub == "approval" || *sub == "status" => {
                let patch: Value = serde_json::from_slice(&body).unwrap();
                let mut map = self.csrs.lock().unwrap();
                let Some(obj) = map.get_mut(*name) else {
                    return not_found(name);
                };
                if let Some(c) = patch["status"].get("conditions") {
                    obj["status"]["conditions"] = c.clone();
                }
                if let Some(c) = patch["status"].get("certificate") {
                    obj["status"]["certificate"] = c.clone();
                    if let Some(t) = self.created.lock().unwrap().get(*name) {
                        self.signed.lock().unwrap().push(t.elapsed());
                    }
                }
                self.bump(obj);
                let o = obj.clone();
                drop(map);
                self.publish(name, &o);
                if patch["status"].get("certificate").is_none() {
                    self.enqueue(name);
                }
                json_resp(200, &o)
            }
            ("DELETE", [name]) => match self.csrs.lock().unwrap().remove(*name) {
                Some(o) => json_resp(200, &o),
                None => not_found(name),
            },
            _ => json_resp(
                404,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": format!("{method} {path} not served by the fake"), "reason": "NotFound", "code": 404}),
            ),
        }
    }
}

/// What `sds serve --source kube-csr` checks at start-up (meshca::kube::csr_delete_guard): the
/// cluster serves ValidatingAdmissionPolicy, the guard and its binding are installed, and the
/// sidecar's account holds the marker right (not wildcard rights).
fn delete_guard(method: &str, path: &str, body: &[u8]) -> Option<Response<RespBody>> {
    use meshca::kube::csr_delete_guard::{GUARD, MARKER_RESOURCE};
    const AR: &str = "/apis/admissionregistration.k8s.io/v1";
    let object = |kind: &str, spec: Value| {
        json_resp(
            200,
            &json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": kind,
                    "metadata": {"name": GUARD}, "spec": spec}),
        )
    };
    Some(match (method, path) {
        ("GET", AR) => json_resp(
            200,
            &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "admissionregistration.k8s.io/v1",
                    "resources": [{"name": "validatingadmissionpolicies", "singularName": "", "namespaced": false,
                                   "kind": "ValidatingAdmissionPolicy", "verbs": ["get"]}]}),
        ),
        ("GET", p) if p == format!("{AR}/validatingadmissionpolicies/{GUARD}") => object(
            "ValidatingAdmissionPolicy",
            json!({"failurePolicy": "Fail"}),
        ),
        ("GET", p) if p == format!("{AR}/validatingadmissionpolicybindings/{GUARD}") => object(
            "ValidatingAdmissionPolicyBinding",
            json!({"policyName": GUARD, "validationActions": ["Deny"]}),
        ),
        ("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews") => {
            let mut review: Value = serde_json::from_slice(body).ok()?;
            let allowed = review["spec"]["resourceAttributes"]["resource"] == MARKER_RESOURCE;
            review["status"] = json!({ "allowed": allowed });
            json_resp(201, &review)
        }
        _ => return None,
    })
}

/// Every event of CSR `name`.
fn events_of(
    rx: broadcast::Receiver<(String, Value)>,
    name: String,
) -> futures::stream::BoxStream<'static, Value> {
    futures::stream::unfold(rx, move |mut rx| {
        let name = name.clone();
        async move {
            loop {
                match rx.recv().await {
                    Ok((n, ev)) if n == name => return Some((ev, rx)),
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return None,
                }
            }
        }
    })
    .boxed()
}

/// A client whose requests reach `fake` as `username` (a service-account token, simulated).
fn client_as(fake: &Arc<Fake>, username: &str) -> kube::Client {
    let fake = fake.clone();
    let username = username.to_string();
    let svc = tower::service_fn(move |req: Request<kube::client::Body>| {
        let fake = fake.clone();
        let username = username.clone();
        async move {
            let (parts, body) = req.into_parts();
            let bytes = body.collect_bytes().await.unwrap_or_default();
            Ok::<_, Infallible>(
                fake.handle(&username, Request::from_parts(parts, bytes))
                    .await,
            )
        }
    });
    kube::Client::new(svc, "default")
}

/// The signer and approver, 16 reconciles at once, fed by the fake's queue.
fn start_signer(fake: &Arc<Fake>) -> rustls_pki_types::CertificateDer<'static> {
    let mut spec = CaSpec::root("mesh");
    spec.policy = Policy {
        auto_approve: true,
        ..Policy::default()
    };
    let ca = create_root(&spec, time::OffsetDateTime::now_utc()).unwrap();
    let root = ca.cert.clone();
    let issuers: BTreeMap<String, Arc<dyn Issuer>> = [(
        "mesh".to_string(),
        Arc::new(LocalIssuer::new(ca).unwrap()) as Arc<dyn Issuer>,
    )]
    .into_iter()
    .collect();
    let signer = Arc::new(Signer::new(
        client_as(fake, "system:serviceaccount:meshca:meshca-signer"),
        meshca::kube::issuers::IssuerSet::watch_fixed(issuers),
        SignerConfig {
            auto_approve: true,
            ..SignerConfig::default()
        },
        Arc::new(meshca::kube::metrics::Metrics::new()),
        Arc::new(meshca::kube::ratelimit::RateLimiter::new(0.0, 1)),
        meshca::kube::leader::always_leader(),
        Arc::new(meshca::clock::SystemClock),
    ));
    for _ in 0..16 {
        let fake = fake.clone();
        let signer = signer.clone();
        tokio::spawn(async move {
            loop {
                let name = fake.next_queued().await;
                let Some(obj) = fake.csrs.lock().unwrap().get(&name).cloned() else {
                    continue;
                };
                let csr: CertificateSigningRequest = serde_json::from_value(obj).unwrap();
                if let Err(e) = signer.reconcile(&csr).await {
                    eprintln!("reconcile {name}: {e}");
                }
            }
        });
    }
    root
}

fn request_for(i: usize) -> CsrRequest {
    let td = TrustDomain::default();
    CsrRequest {
        signer_name: "meshca.io/mesh".into(),
        sans: Sans {
            spiffe_id: Some(SpiffeId::for_service_account(&td, "load", &format!("w{i}")).unwrap()),
            ..Sans::default()
        },
        trust_domain: td,
        key: KeyAlgorithm::EcdsaP256,
        expiration: Duration::from_secs(24 * 3600),
        name_prefix: format!("meshca-sds-load-w{i}-"),
        requester_label: format!("load.w{i}"),
    }
}

async fn one(fake: &Arc<Fake>, i: usize) -> Duration {
    let c = CsrClient::new(client_as(fake, &format!("system:serviceaccount:load:w{i}")));
    let t = Instant::now();
    match c.request(&request_for(i), Duration::from_secs(120)).await {
        Ok(Answer::Issued(_)) => t.elapsed(),
        other => panic!("sidecar {i}: {other:?}"),
    }
}

fn pct(v: &mut [Duration], q: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

async fn roundtrip(n: usize, rounds: usize) {
    let fake = Fake::new();
    start_signer(&fake);
    let mut all = Vec::new();
    for r in 0..rounds {
        let t = Instant::now();
        let mut lat: Vec<Duration> =
            futures::future::join_all((0..n).map(|i| one(&fake, r * n + i))).await;
        let wall = t.elapsed();
        println!(
            "round {}: {n} sidecars at once: create-to-signed p50 {:.1?} p99 {:.1?} max {:.1?}; all done in {wall:.1?}; peak queue {}",
            r + 1,
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.99),
            lat[lat.len() - 1],
            fake.max_depth.swap(0, Ordering::Relaxed)
        );
        all.extend(lat);
    }
    assert!(fake.csrs.lock().unwrap().is_empty(), "every CSR deleted");
    println!(
        "all {} requests: p50 {:.1?} p99 {:.1?}; CSRs left on the fake: 0",
        all.len(),
        pct(&mut all, 0.5),
        pct(&mut all, 0.99)
    );
}

async fn spread(n: usize, compression: f64) {
    // The renewal deadlines of n certificates (24 h) issued at one moment, from the rotator's
    // own formula.
    let ca = create_root(&CaSpec::root("t"), time::OffsetDateTime::now_utc()).unwrap();
    let issuer = LocalIssuer::new(ca).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let w = meshca::issue::issue_workload(
        &issuer,
        &request_for(0).sans,
        Some(Duration::from_secs(24 * 3600)),
        KeyAlgorithm::EcdsaP256,
        now,
    )
    .await
    .unwrap();
    let cert = meshca_sds::WorkloadCert {
        chain: vec![w.cert.leaf.clone()],
        key_pem: w.key.to_pkcs8_pem(),
        info: w.cert.info.clone(),
        obtained_at: now,
    };
    for jitter in [0.0, 0.1] {
        let fake = Fake::new();
        start_signer(&fake);
        let mut offsets: Vec<Duration> = (0..n)
            .map(|_| {
                let d = cert.renew_deadline(0.5, unit(), jitter);
                Duration::try_from(d - now).unwrap()
            })
            .collect();
        offsets.sort();
        let first = offsets[0];
        let window = offsets[n - 1] - first;
        let t = Instant::now();
        let tasks = offsets.iter().enumerate().map(|(i, off)| {
            let fake = fake.clone();
            let delay = (*off - first).div_f64(compression);
            async move {
                tokio::time::sleep(delay).await;
                one(&fake, i).await
            }
        });
        let mut lat: Vec<Duration> = futures::future::join_all(tasks).await;
        let mut signed = fake.signed.lock().unwrap().clone();
        println!(
            "jitter {jitter}: {n} renewals spread over {:.0?} real ({:.1?} here, compressed {compression}x); peak signer queue {}; create-to-signed (signer side) p50 {:.1?} p99 {:.1?}; sidecar round trip p99 {:.1?}; done in {:.1?}",
            window,
            window.div_f64(compression),
            fake.max_depth.load(Ordering::Relaxed),
            pct(&mut signed, 0.5),
            pct(&mut signed, 0.99),
            pct(&mut lat, 0.99),
            t.elapsed()
        );
    }
}

fn unit() -> f64 {
    let mut b = [0u8; 4];
    aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut b).unwrap();
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}

fn proc_stat(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 after the name.
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    (rss_kb, ticks as f64 / 100.0)
}

async fn idle(bin: &str, secs: u64) {
    let fake = Fake::new();
    let ca = start_signer(&fake);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = fake.clone();
    let api_requests = Arc::new(AtomicU64::new(0));
    let counted = api_requests.clone();
    tokio::spawn(async move {
        loop {
            let (sock, _) = listener.accept().await.unwrap();
            let fake = served.clone();
            let counted = counted.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let fake = fake.clone();
                    counted.fetch_add(1, Ordering::Relaxed);
                    async move {
                        let (parts, body) = req.into_parts();
                        let bytes = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        Ok::<_, Infallible>(
                            fake.handle(
                                "system:serviceaccount:load:idle",
                                Request::from_parts(parts, bytes),
                            )
                            .await,
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                    .await;
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    std::fs::write(
        &kc,
        format!("apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://{addr}\"}}\nusers:\n- name: idle\n  user: {{token: fake}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: idle}}\ncurrent-context: fake\n"),
    )
    .unwrap();
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, meshca::bundle::to_pem(std::slice::from_ref(&ca))).unwrap();
    let sock = dir.path().join("sds.sock");
    // `meshca-sds serve` is `meshca sds serve`.
    let sidecar = std::path::Path::new(bin)
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("meshca-sds"));
    let serve: &[&str] = if sidecar {
        &["serve"]
    } else {
        &["sds", "serve"]
    };
    let mut child = tokio::process::Command::new(bin)
        .args(["--kubeconfig"])
        .arg(&kc)
        .args(serve)
        .args([
            "--source",
            "kube-csr",
            "--signer",
            "meshca.io/mesh",
            "--namespace",
            "load",
            "--service-account",
            "idle",
            "--trust-bundle-file",
        ])
        .arg(&ca_file)
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let t = Instant::now();
    while !sock.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the sidecar did not start"
        );
        if let Ok(Some(st)) = child.try_wait() {
            panic!("the sidecar exited: {st}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "sidecar serving after {:.2?} (CSR created, approved, signed, deleted); CSRs left: {}",
        t.elapsed(),
        fake.csrs.lock().unwrap().len()
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (rss0, cpu0) = proc_stat(pid);
    let reqs0 = api_requests.load(Ordering::Relaxed);
    let mut peak = rss0;
    for _ in 0..secs {
        tokio::time::sleep(Duration::from_secs(1)).await;
        peak = peak.max(proc_stat(pid).0);
    }
    let (rss1, cpu1) = proc_stat(pid);
    let kib = |file: &str, key: &str| -> f64 {
        std::fs::read_to_string(format!("/proc/{pid}/{file}"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    println!(
        "idle {secs}s: RSS {:.1} MiB at start, {:.1} MiB at end (PSS {:.1}, anonymous {:.1}, file-backed {:.1} MiB; {} threads), peak {:.1} MiB; CPU {:.2}s = {:.3}% of one core; API requests while idle: {}",
        rss0 as f64 / 1024.0,
        rss1 as f64 / 1024.0,
        kib("smaps_rollup", "Pss:") / 1024.0,
        kib("status", "RssAnon:") / 1024.0,
        kib("status", "RssFile:") / 1024.0,
        kib("status", "Threads:"),
        peak as f64 / 1024.0,
        cpu1 - cpu0,
        100.0 * (cpu1 - cpu0) / secs as f64,
        api_requests.load(Ordering::Relaxed) - reqs0
    );
    child.start_kill().unwrap();
    let _ = child.wait().await;
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    match args.first().map(String::as_str) {
        Some("roundtrip") => roundtrip(num(1, 100), num(2, 5)).await,
        Some("spread") => spread(num(1, 1000), args.get(2).and_then(|s| s.parse().ok()).unwrap_or(360.0)).await,
        Some("idle") => idle(args.get(1).expect("idle MESHCA_BIN [SECONDS]"), num(2, 60) as u64).await,
        _ => eprintln!("usage: kube_csr_sidecars roundtrip [N] [ROUNDS] | spread [N] [COMPRESSION] | idle MESHCA_BIN [SECONDS]"),
    }
}
