//! Benchmark client for `meshca signer run` against a real API server, and the "limit" the
//! same API server sustains when a trivial client does the same writes (bench/kube-signer.sh
//! runs the whole thing; docs/kubernetes.md "Performance" has the method and the numbers).
//!
//! ```text
//! kube_bench --kubeconfig ADMIN --mode MODE [--signer-kubeconfig SA] [--ca NAME]
//!            [--count 1000] [--parallel 16] [--rate 0] [--accounts 10] [--timeout 300s]
//! ```
//! Modes:
//! - `csr-meshca`: `--count` CSRs, each created under a TokenRequest token of one of
//!   `--accounts` ServiceAccounts of namespace `meshca-bench-csr` (so `spec.username` is
//!   `system:serviceaccount:meshca-bench-csr:sa-<k>`), asking for that account's own SPIFFE ID
//!   and `sa-<k>.meshca-bench-csr.svc`, for `meshca.io/<ca>`. meshca must approve and sign them.
//! - `csr-limit`: the same creates, for `meshca.io/<ca>-limit` (a signer nobody serves); a
//!   trivial signer in this process, under `--signer-kubeconfig`, approves each through
//!   `/approval` and writes a fixed certificate through `/status` (two merge patches, as meshca
//!   does), with the same concurrency.
//! - `pcr-meshca` / `pcr-limit`: PodCertificateRequests (certificates.k8s.io/v1beta1, P-256
//!   `pkixPublicKey` + `proofOfPossession` over the pod UID) for Pods of namespace
//!   `meshca-bench-pcr` bound to node `meshca-e2e-node` (created once, not timed); `-limit`
//!   writes a fixed chain through a PUT of `/status` (one write, as meshca does).
//! - `fill-csrs`: `--count` pending CSRs for `meshca.io/<ca>` created by the admin (not a
//!   ServiceAccount: the auto-approver leaves them pending), for the memory measurement.
//! - `fill-secrets`: `--count` managed Secrets in namespace `meshca-bench-secrets` (label
//!   `meshca.io/managed=true`, annotations `meshca.io/ca`, `meshca.io/spiffe-id`,
//!   `meshca.io/dns-names`), then waits until meshca has filled them all.
//! - `cleanup`: deletes every object labelled `meshca-bench` (CSRs, PCRs, Secrets).
//!
//! `--rate 0` is a closed loop: `--parallel` creates in flight. `--rate R` is an open loop: one
//! create every 1/R s, whatever the latency. Latency of one request = from the start of its
//! create call to the watch event showing its certificate, on this machine's monotonic clock;
//! the rate = requests / (first create to last certificate). One JSON line on stdout per run.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::certificates::v1beta1::PodCertificateRequest;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use serde_json::json;

const CSR_NS: &str = "meshca-bench-csr";
const PCR_NS: &str = "meshca-bench-pcr";
const SECRET_NS: &str = "meshca-bench-secrets";
const NODE: &str = "meshca-e2e-node";
const LABEL: &str = "meshca-bench";

struct Args {
    mode: String,
    ca: String,
    count: usize,
    parallel: usize,
    rate: f64,
    accounts: usize,
    kubeconfig: std::path::PathBuf,
    signer_kubeconfig: Option<std::path::PathBuf>,
    timeout: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        mode: String::new(),
        ca: "bench".into(),
        count: 1000,
        parallel: 16,
        rate: 0.0,
        accounts: 10,
        kubeconfig: std::path::PathBuf::new(),
        signer_kubeconfig: None,
        timeout: Duration::from_secs(300),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let num = |s: String| s.parse::<f64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--mode" => a.mode = val()?,
            "--ca" => a.ca = val()?,
            "--count" => a.count = num(val()?)? as usize,
            "--parallel" => a.parallel = (num(val()?)? as usize).max(1),
            "--rate" => a.rate = num(val()?)?,
            "--accounts" => a.accounts = (num(val()?)? as usize).max(1),
            "--kubeconfig" => a.kubeconfig = val()?.into(),
            "--signer-kubeconfig" => a.signer_kubeconfig = Some(val()?.into()),
            "--timeout" => {
                a.timeout =
                    humantime::parse_duration(&val()?).map_err(|e| format!("--timeout: {e}"))?
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if a.mode.is_empty() || a.kubeconfig.as_os_str().is_empty() {
        return Err("--mode and --kubeconfig are required".into());
    }
    Ok(a)
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn fatal(what: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("kube_bench: {what}: {e}");
    std::process::exit(2);
}

/// A client for the kubeconfig's server that authenticates with `token`.
async fn token_client(kc: &std::path::Path, token: &str) -> kube::Client {
    let mut config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(kc).unwrap_or_else(|e| fatal("kubeconfig", e)),
        &Default::default(),
    )
    .await
    .unwrap_or_else(|e| fatal("kubeconfig", e));
    config.auth_info = Default::default();
    config.auth_info.token = Some(token.to_string().into());
    kube::Client::try_from(config).unwrap_or_else(|e| fatal("client", e))
}

/// Creates `obj` unless it exists.
async fn ensure<K>(api: &Api<K>, obj: serde_json::Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(obj).unwrap();
    match api.create(&PostParams::default(), &obj).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => fatal("create", e),
    }
}

/// Namespace `ns` with ServiceAccounts sa-0..sa-(n-1); returns their UIDs.
async fn accounts(admin: &kube::Client, ns: &str, n: usize) -> Vec<String> {
    let nss: Api<Namespace> = Api::all(admin.clone());
    ensure(&nss, json!({"metadata": {"name": ns}})).await;
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), ns);
    let mut uids = Vec::new();
    for k in 0..n {
        let name = format!("sa-{k}");
        ensure(&sas, json!({"metadata": {"name": name}})).await;
        let sa = sas.get(&name).await.unwrap_or_else(|e| fatal("get sa", e));
        uids.push(sa.metadata.uid.unwrap_or_default());
    }
    uids
}

/// Clients authenticating as each ServiceAccount of `CSR_NS`, allowed to create CSRs.
async fn requester_clients(
    admin: &kube::Client,
    kc: &std::path::Path,
    n: usize,
) -> Vec<kube::Client> {
    accounts(admin, CSR_NS, n).await;
    let crs: Api<ClusterRole> = Api::all(admin.clone());
    ensure(
        &crs,
        json!({"metadata": {"name": "meshca-bench-requester"}, "rules": [{
            "apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests"],
            "verbs": ["create", "get", "list", "watch"]}]}),
    )
    .await;
    let crbs: Api<ClusterRoleBinding> = Api::all(admin.clone());
    ensure(
        &crbs,
        json!({"metadata": {"name": "meshca-bench-requester"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "meshca-bench-requester"},
               "subjects": [{"kind": "Group", "apiGroup": "rbac.authorization.k8s.io", "name": format!("system:serviceaccounts:{CSR_NS}")}]}),
    )
    .await;
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), CSR_NS);
    let mut out = Vec::new();
    for k in 0..n {
        let tr = sas
            .create_token_request(
                &format!("sa-{k}"),
                &PostParams::default(),
                &serde_json::from_value(json!({"spec": {"expirationSeconds": 3600}})).unwrap(),
            )
            .await
            .unwrap_or_else(|e| fatal("token request", e));
        out.push(
            token_client(
                kc,
                tr.status
                    .and_then(|s| s.token)
                    .as_deref()
                    .unwrap_or_default(),
            )
            .await,
        );
    }
    out
}

fn p256() -> rcgen::KeyPair {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

/// A CA-less leaf for `key`, valid from now for `life` (the trivial signer's fixed certificate).
fn fixed_cert(
    key: &rcgen::KeyPair,
    life: Duration,
) -> (String, time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap();
    let ca_key = p256();
    let mut cap = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    cap.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    cap.not_before = now - time::Duration::minutes(1);
    cap.not_after = now + time::Duration::days(2);
    let issuer = rcgen::Issuer::new(cap, &ca_key);
    let mut p = rcgen::CertificateParams::new(vec!["fixed.bench.svc".to_string()]).unwrap();
    p.not_before = now;
    p.not_after = now + time::Duration::try_from(life).unwrap();
    let leaf = p.signed_by(key, &issuer).unwrap();
    (leaf.pem(), p.not_before, p.not_after)
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// The one JSON line of a timed run.
fn report(
    a: &Args,
    created: &HashMap<String, Instant>,
    done: &HashMap<String, Instant>,
    start: Instant,
    end: Instant,
) {
    let mut lat: Vec<Duration> = done
        .iter()
        .filter_map(|(n, t)| created.get(n).map(|c| t.saturating_duration_since(*c)))
        .collect();
    lat.sort();
    let secs = end.duration_since(start).as_secs_f64();
    let ms = |d: Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
    println!(
        "{}",
        json!({
            "mode": a.mode, "count": a.count, "parallel": a.parallel, "rate_target": a.rate,
            "issued": lat.len(), "seconds": (secs * 1000.0).round() / 1000.0,
            "per_second": ((lat.len() as f64 / secs) * 10.0).round() / 10.0,
            "p50_ms": ms(percentile(&lat, 0.5)), "p99_ms": ms(percentile(&lat, 0.99)),
            "max_ms": ms(lat.last().copied().unwrap_or_default()),
        })
    );
    if lat.len() < a.count {
        eprintln!(
            "kube_bench: {} of {} not issued within {:?}",
            a.count - lat.len(),
            a.count,
            a.timeout
        );
        std::process::exit(3);
    }
}

/// Runs `make(i)` for i in 0..count, closed loop (`parallel` at once) or open loop (`rate`/s).
async fn drive<F, Fut>(a: &Args, make: F)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    if a.rate > 0.0 {
        let start = tokio::time::Instant::now();
        let mut tasks = Vec::with_capacity(a.count);
        for i in 0..a.count {
            tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / a.rate)).await;
            tasks.push(tokio::spawn(make(i)));
        }
        for t in tasks {
            let _ = t.await;
        }
    } else {
        futures::stream::iter(0..a.count)
            .map(|i| tokio::spawn(make(i)))
            .buffer_unordered(a.parallel)
            .for_each(|_| async {})
            .await;
    }
}

/// Watches objects labelled `meshca-bench=<run>` until `count` are issued (per `issued`).
fn watch_issued<K>(
    api: Api<K>,
    run: &str,
    issued: fn(&K) -> bool,
) -> tokio::sync::mpsc::UnboundedReceiver<(String, Instant)>
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let wc = watcher::Config::default().labels(&format!("{LABEL}={run}"));
    tokio::spawn(async move {
        let mut s = watcher(api, wc).applied_objects().boxed();
        while let Ok(Some(o)) = s.try_next().await {
            if issued(&o) {
                let _ = tx.send((o.meta().name.clone().unwrap_or_default(), Instant::now()));
            }
        }
    });
    rx
}

async fn collect(
    a: &Args,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, Instant)>,
    deadline: tokio::time::Instant,
) -> (HashMap<String, Instant>, Instant) {
    let mut done = HashMap::new();
    let mut last = Instant::now();
    while done.len() < a.count {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((n, t))) => {
                if done.insert(n, t).is_none() {
                    last = t;
                }
            }
            _ => break,
        }
    }
    (done, last)
}

type Created = Arc<std::sync::Mutex<HashMap<String, Instant>>>;

async fn csr_run(a: &Args, admin: kube::Client, limit: bool) {
    let clients = requester_clients(&admin, &a.kubeconfig, a.accounts).await;
    let run = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    let signer = if limit {
        format!("meshca.io/{}-limit", a.ca)
    } else {
        format!("meshca.io/{}", a.ca)
    };
    // Requests are generated before the clock starts.
    let bodies: Vec<CertificateSigningRequest> = (0..a.count)
        .map(|i| {
            let k = i % a.accounts;
            let key = p256();
            let mut p = rcgen::CertificateParams::default();
            p.subject_alt_names = vec![
                rcgen::SanType::URI(
                    format!("spiffe://cluster.local/ns/{CSR_NS}/sa/sa-{k}")
                        .try_into()
                        .unwrap(),
                ),
                rcgen::SanType::DnsName(format!("sa-{k}.{CSR_NS}.svc").try_into().unwrap()),
            ];
            let pem = p.serialize_request(&key).unwrap().pem().unwrap();
            serde_json::from_value(json!({
                "metadata": {"name": format!("bench-{run}-{i}"), "labels": {LABEL: run}},
                "spec": {"request": b64(pem.as_bytes()), "signerName": signer,
                         "usages": ["digital signature", "server auth", "client auth"],
                         "expirationSeconds": 3600}
            }))
            .unwrap()
        })
        .collect();
    let api: Api<CertificateSigningRequest> = Api::all(admin.clone());
    let mut rx = watch_issued(api.clone(), &run, |c: &CertificateSigningRequest| {
        c.status
            .as_ref()
            .and_then(|s| s.certificate.as_ref())
            .is_some_and(|b| !b.0.is_empty())
    });
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The trivial signer: approve, then a fixed certificate, `parallel` at once.
    let (sign_tx, sign_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let trivial = if limit {
        let kc = a.signer_kubeconfig.as_deref().unwrap_or(&a.kubeconfig);
        let sc = meshca::kube::client(Some(kc))
            .await
            .unwrap_or_else(|e| fatal("signer kubeconfig", e));
        let sapi: Api<CertificateSigningRequest> = Api::all(sc);
        let (cert, _, _) = fixed_cert(&p256(), Duration::from_secs(3600));
        let cert = Arc::new(cert);
        let parallel = a.parallel;
        Some(tokio::spawn(async move {
            tokio_stream_from(sign_rx)
                .map(|name| {
                    let (sapi, cert) = (sapi.clone(), cert.clone());
                    async move {
                        let approval = json!({"status": {"conditions": [{"type": "Approved", "status": "True", "reason": "BenchLimit", "message": "trivial client"}]}});
                        sapi.patch_approval(&name, &PatchParams::default(), &Patch::Merge(&approval)).await.unwrap_or_else(|e| fatal("approve", e));
                        let status = json!({"status": {"certificate": b64(cert.as_bytes())}});
                        sapi.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await.unwrap_or_else(|e| fatal("status", e));
                    }
                })
                .buffer_unordered(parallel)
                .for_each(|_| async {})
                .await;
        }))
    } else {
        drop(sign_rx);
        None
    };

    let created: Created = Default::default();
    let bodies = Arc::new(bodies);
    let clients = Arc::new(clients);
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + a.timeout;
    let accounts = a.accounts;
    let drive_fut = drive(a, |i| {
        let (bodies, clients, created, sign_tx) = (
            bodies.clone(),
            clients.clone(),
            created.clone(),
            sign_tx.clone(),
        );
        async move {
            let capi: Api<CertificateSigningRequest> = Api::all(clients[i % accounts].clone());
            let t = Instant::now();
            let c = capi
                .create(&PostParams::default(), &bodies[i])
                .await
                .unwrap_or_else(|e| fatal("create CSR", e));
            let name = c.metadata.name.unwrap_or_default();
            created.lock().unwrap().insert(name.clone(), t);
            if limit {
                let _ = sign_tx.send(name);
            }
        }
    });
    let ((), (done, last)) = tokio::join!(drive_fut, collect(a, &mut rx, deadline));
    drop(sign_tx);
    if let Some(t) = trivial {
        t.abort();
    }
    let created = created.lock().unwrap().clone();
    report(a, &created, &done, start, last);
}

/// An mpsc receiver as a stream.
fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Pods p-0..p-(count-1) of `PCR_NS` bound to `NODE` (created once); (pod UID, SA name, SA UID).
async fn pods(a: &Args, admin: &kube::Client) -> Vec<(String, String, String, String)> {
    let sa_uids = accounts(admin, PCR_NS, a.accounts).await;
    let api: Api<Pod> = Api::namespaced(admin.clone(), PCR_NS);
    let existing: HashMap<String, String> = api
        .list(&ListParams::default())
        .await
        .unwrap_or_else(|e| fatal("list pods", e))
        .items
        .into_iter()
        .map(|p| {
            (
                p.metadata.name.unwrap_or_default(),
                p.metadata.uid.unwrap_or_default(),
            )
        })
        .collect();
    let existing = Arc::new(existing);
    futures::stream::iter(0..a.count)
        .map(|i| {
            let (api, existing) = (api.clone(), existing.clone());
            let sa = format!("sa-{}", i % a.accounts);
            let sa_uid = sa_uids[i % a.accounts].clone();
            async move {
                let name = format!("p-{i}");
                let uid = match existing.get(&name) {
                    Some(u) => u.clone(),
                    None => {
                        let p: Pod = serde_json::from_value(json!({
                            "metadata": {"name": name, "labels": {LABEL: "pods"}},
                            "spec": {"serviceAccountName": sa, "nodeName": NODE,
                                     "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}]}
                        }))
                        .unwrap();
                        api.create(&PostParams::default(), &p).await.unwrap_or_else(|e| fatal("create pod", e)).metadata.uid.unwrap_or_default()
                    }
                };
                (name, uid, sa, sa_uid)
            }
        })
        .buffered(32)
        .collect()
        .await
}

async fn pcr_run(a: &Args, admin: kube::Client, limit: bool) {
    let pods = pods(a, &admin).await;
    let run = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    let signer = if limit {
        format!("meshca.io/{}-limit", a.ca)
    } else {
        format!("meshca.io/{}", a.ca)
    };
    // One fixed key for the trivial signer (its fixed chain must match pkixPublicKey); a key per
    // request for meshca. Keys and proofs are made before the clock starts.
    let fixed_key = p256();
    let life = Duration::from_secs(86400);
    let bodies: Vec<PodCertificateRequest> = pods
        .iter()
        .enumerate()
        .map(|(i, (pod, uid, sa, sa_uid))| {
            let own;
            let key = if limit { &fixed_key } else { own = p256(); &own };
            let kp = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
                &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                &key.serialize_der(),
            )
            .unwrap();
            let pop = kp.sign(&aws_lc_rs::rand::SystemRandom::new(), uid.as_bytes()).unwrap();
            serde_json::from_value(json!({
                "metadata": {"name": format!("bench-{run}-{i}"), "namespace": PCR_NS, "labels": {LABEL: run}},
                "spec": {"signerName": signer, "podName": pod, "podUID": uid,
                         "serviceAccountName": sa, "serviceAccountUID": sa_uid,
                         "nodeName": NODE, "nodeUID": "00000000-0000-4000-8000-000000000000",
                         "maxExpirationSeconds": life.as_secs(),
                         "pkixPublicKey": b64(&rcgen::PublicKeyData::subject_public_key_info(key)), "proofOfPossession": b64(pop.as_ref())}
            }))
            .unwrap()
        })
        .collect();
    let api: Api<PodCertificateRequest> = Api::namespaced(admin.clone(), PCR_NS);
    let mut rx = watch_issued(api.clone(), &run, |p: &PodCertificateRequest| {
        p.status
            .as_ref()
            .and_then(|s| s.certificate_chain.as_ref())
            .is_some_and(|c| !c.is_empty())
    });
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (sign_tx, sign_rx) = tokio::sync::mpsc::unbounded_channel::<PodCertificateRequest>();
    let trivial = if limit {
        let kc = a.signer_kubeconfig.as_deref().unwrap_or(&a.kubeconfig);
        let sc = meshca::kube::client(Some(kc))
            .await
            .unwrap_or_else(|e| fatal("signer kubeconfig", e));
        let sapi: Api<PodCertificateRequest> = Api::namespaced(sc, PCR_NS);
        let (chain, nb, na) = fixed_cert(&fixed_key, life);
        let status = Arc::new(json!({
            "conditions": [{"type": "Issued", "status": "True", "reason": "BenchLimit", "message": "trivial client",
                            "lastTransitionTime": rfc3339(nb)}],
            "certificateChain": chain, "notBefore": rfc3339(nb), "notAfter": rfc3339(na),
            "beginRefreshAt": rfc3339(nb + (na - nb) / 2),
        }));
        let parallel = a.parallel;
        Some(tokio::spawn(async move {
            tokio_stream_from(sign_rx)
                .map(|pcr| {
                    let (sapi, status) = (sapi.clone(), status.clone());
                    async move {
                        let mut v = serde_json::to_value(&pcr).unwrap();
                        v["status"] = (*status).clone();
                        if let Some(g) = pcr.metadata.generation {
                            v["status"]["conditions"][0]["observedGeneration"] = json!(g);
                        }
                        let p: PodCertificateRequest = serde_json::from_value(v).unwrap();
                        let name = pcr.metadata.name.clone().unwrap_or_default();
                        sapi.replace_status(&name, &PostParams::default(), &p)
                            .await
                            .unwrap_or_else(|e| fatal("PCR status", e));
                    }
                })
                .buffer_unordered(parallel)
                .for_each(|_| async {})
                .await;
        }))
    } else {
        drop(sign_rx);
        None
    };

    let created: Created = Default::default();
    let bodies = Arc::new(bodies);
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + a.timeout;
    let drive_fut = drive(a, |i| {
        let (bodies, api, created, sign_tx) = (
            bodies.clone(),
            api.clone(),
            created.clone(),
            sign_tx.clone(),
        );
        async move {
            let t = Instant::now();
            let p = api
                .create(&PostParams::default(), &bodies[i])
                .await
                .unwrap_or_else(|e| fatal("create PCR", e));
            created
                .lock()
                .unwrap()
                .insert(p.metadata.name.clone().unwrap_or_default(), t);
            if limit {
                let _ = sign_tx.send(p);
            }
        }
    });
    let ((), (done, last)) = tokio::join!(drive_fut, collect(a, &mut rx, deadline));
    drop(sign_tx);
    if let Some(t) = trivial {
        t.abort();
    }
    let created = created.lock().unwrap().clone();
    report(a, &created, &done, start, last);
    // Refusals show as conditions without a chain: say so rather than time out silently.
}

async fn fill_csrs(a: &Args, admin: kube::Client) {
    let api: Api<CertificateSigningRequest> = Api::all(admin);
    let run = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    let key = p256();
    let start = Instant::now();
    futures::stream::iter(0..a.count)
        .map(|i| {
            let api = api.clone();
            let mut p = rcgen::CertificateParams::default();
            p.subject_alt_names = vec![rcgen::SanType::DnsName(format!("fill-{i}.{CSR_NS}.svc").try_into().unwrap())];
            let pem = p.serialize_request(&key).unwrap().pem().unwrap();
            let body: CertificateSigningRequest = serde_json::from_value(json!({
                "metadata": {"name": format!("fill-{run}-{i}"), "labels": {LABEL: "fill"}},
                "spec": {"request": b64(pem.as_bytes()), "signerName": format!("meshca.io/{}", a.ca),
                         "usages": ["digital signature", "server auth", "client auth"], "expirationSeconds": 3600}
            }))
            .unwrap();
            async move {
                api.create(&PostParams::default(), &body).await.unwrap_or_else(|e| fatal("create CSR", e));
            }
        })
        .buffer_unordered(a.parallel)
        .for_each(|_| async {})
        .await;
    println!(
        "{}",
        json!({"mode": a.mode, "created": a.count, "seconds": start.elapsed().as_secs_f64()})
    );
}

async fn fill_secrets(a: &Args, admin: kube::Client) {
    let nss: Api<Namespace> = Api::all(admin.clone());
    ensure(&nss, json!({"metadata": {"name": SECRET_NS}})).await;
    let api: Api<Secret> = Api::namespaced(admin, SECRET_NS);
    let have = api
        .list_metadata(&ListParams::default().labels(&format!("{LABEL}=secrets")))
        .await
        .unwrap_or_else(|e| fatal("list", e))
        .items
        .len();
    let start = Instant::now();
    futures::stream::iter(have..have + a.count)
        .map(|i| {
            let api = api.clone();
            let body: Secret = serde_json::from_value(json!({
                "metadata": {"name": format!("w{i}"), "labels": {LABEL: "secrets", "meshca.io/managed": "true"},
                             "annotations": {"meshca.io/ca": a.ca,
                                             "meshca.io/spiffe-id": format!("spiffe://cluster.local/ns/{SECRET_NS}/sa/w{i}"),
                                             "meshca.io/dns-names": format!("w{i}.{SECRET_NS}.svc")}},
                "type": "kubernetes.io/tls", "data": {"tls.crt": "", "tls.key": ""}
            }))
            .unwrap();
            async move {
                api.create(&PostParams::default(), &body).await.unwrap_or_else(|e| fatal("create Secret", e));
            }
        })
        .buffer_unordered(a.parallel)
        .for_each(|_| async {})
        .await;
    let created_in = start.elapsed().as_secs_f64();
    // Wait until meshca has filled every one (list with pages, count non-empty tls.crt).
    let want = have + a.count;
    let deadline = Instant::now() + a.timeout;
    let filled = loop {
        let mut n = 0;
        let mut lp = ListParams::default()
            .labels(&format!("{LABEL}=secrets"))
            .limit(500);
        loop {
            let l = api.list(&lp).await.unwrap_or_else(|e| fatal("list", e));
            n += l
                .items
                .iter()
                .filter(|s| {
                    s.data
                        .as_ref()
                        .and_then(|d| d.get("tls.crt"))
                        .is_some_and(|b| !b.0.is_empty())
                })
                .count();
            match l.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(c) => lp = lp.continue_token(&c),
                None => break,
            }
        }
        if n >= want || Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    println!(
        "{}",
        json!({"mode": a.mode, "created": a.count, "total": want, "filled": filled,
                          "create_seconds": created_in, "seconds": start.elapsed().as_secs_f64()})
    );
    if filled < want {
        std::process::exit(3);
    }
}

async fn cleanup(admin: kube::Client) {
    let dp = DeleteParams::default();
    let all = ListParams::default().labels(LABEL);
    let csrs: Api<CertificateSigningRequest> = Api::all(admin.clone());
    let _ = csrs.delete_collection(&dp, &all).await;
    let pcrs: Api<PodCertificateRequest> = Api::namespaced(admin.clone(), PCR_NS);
    let _ = pcrs.delete_collection(&dp, &all).await;
    let secrets: Api<Secret> = Api::namespaced(admin, SECRET_NS);
    let _ = secrets.delete_collection(&dp, &all).await;
}

#[tokio::main]
async fn main() {
    let a = parse_args().unwrap_or_else(|e| fatal("usage", e));
    let admin = meshca::kube::client(Some(a.kubeconfig.as_path()))
        .await
        .unwrap_or_else(|e| fatal("kubeconfig", e));
    match a.mode.as_str() {
        "csr-meshca" => csr_run(&a, admin, false).await,
        "csr-limit" => csr_run(&a, admin, true).await,
        "pcr-meshca" => pcr_run(&a, admin, false).await,
        "pcr-limit" => pcr_run(&a, admin, true).await,
        "fill-csrs" => fill_csrs(&a, admin).await,
        "fill-secrets" => fill_secrets(&a, admin).await,
        "cleanup" => cleanup(admin).await,
        m => fatal("usage", format!("unknown mode {m}")),
    }
}
