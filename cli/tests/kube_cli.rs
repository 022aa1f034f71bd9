//! The CLI's Kubernetes wiring (`--store kube:<ns>`, `--kubeconfig`, `issue --secret` written
//! to the cluster, `bundle publish`) run as a real process against a small in-memory fake of
//! the Kubernetes REST API on 127.0.0.1. (No real API server exists here; the e2e tests in
//! tests/kube_e2e.rs cover one.) The fake implements just enough of core/v1 Secrets and
//! ConfigMaps: get, list with label selectors, create (409 on duplicates) and server-side
//! apply (and, when asked, certificates.k8s.io/v1beta1 discovery and ClusterTrustBundles), and
//! records every request so the tests can check methods, paths and parameters.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use serde_json::{json, Value};

#[derive(Default)]
struct State {
    /// (namespace, resource, name) -> object
    objects: BTreeMap<(String, String, String), Value>,
    /// "METHOD path?query content-type"
    log: Vec<String>,
    /// Serve certificates.k8s.io/v1beta1 ClusterTrustBundles (cluster-scoped, kept in
    /// `objects` under namespace "").
    serve_ctb: bool,
    /// Refuse (403) every request outside namespace `meshca` (a signer without its Roles
    /// and ClusterRole there).
    forbid_outside_meshca: bool,
}

struct Fake {
    port: u16,
    state: Arc<Mutex<State>>,
}

fn status(code: u16, reason: &str, msg: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "reason": reason, "message": msg, "code": code}),
    )
}

fn selector_matches(sel: &str, labels: &Value) -> bool {
    sel.split(',')
        .filter(|s| !s.is_empty())
        .all(|term| match term.split_once('=') {
            Some((k, v)) => labels.get(k).and_then(Value::as_str) == Some(v),
            None => labels.get(term).is_some(),
        })
}

fn query_param(q: &str, key: &str) -> Option<String> {
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| {
            v.replace("%2C", ",")
                .replace("%3D", "=")
                .replace("%2F", "/")
        })
    })
}

/// certificates.k8s.io/v1beta1: discovery, and ClusterTrustBundles list (label selector),
/// server-side apply (whole object replaced) and delete.
fn handle_ctb(st: &mut State, method: &str, path: &str, query: &str, body: &[u8]) -> (u16, Value) {
    const GV: &str = "/apis/certificates.k8s.io/v1beta1";
    let key = |n: &str| {
        (
            String::new(),
            "clustertrustbundles".to_string(),
            n.to_string(),
        )
    };
    match (method, path.strip_prefix(GV)) {
        ("GET", Some("")) => (
            200,
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "certificates.k8s.io/v1beta1",
                   "resources": [{"name": "clustertrustbundles", "singularName": "", "namespaced": false,
                                  "kind": "ClusterTrustBundle", "verbs": ["get", "list", "patch", "delete"]}]}),
        ),
        ("GET", Some("/clustertrustbundles")) => {
            let sel = query_param(query, "labelSelector").unwrap_or_default();
            let items: Vec<Value> = st
                .objects
                .iter()
                .filter(|((n, r, _), o)| {
                    n.is_empty()
                        && r == "clustertrustbundles"
                        && selector_matches(&sel, &o["metadata"]["labels"])
                })
                .map(|(_, o)| o.clone())
                .collect();
            (
                200,
                json!({"apiVersion": "certificates.k8s.io/v1beta1", "kind": "ClusterTrustBundleList",
                       "metadata": {"resourceVersion": "1"}, "items": items}),
            )
        }
        ("PATCH", Some(p)) if p.starts_with("/clustertrustbundles/") => {
            let n = &p["/clustertrustbundles/".len()..];
            let o: Value = serde_json::from_slice(body).unwrap();
            st.objects.insert(key(n), o.clone());
            (200, o)
        }
        ("DELETE", Some(p)) if p.starts_with("/clustertrustbundles/") => {
            let n = &p["/clustertrustbundles/".len()..];
            match st.objects.remove(&key(n)) {
                Some(_) => (
                    200,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
                ),
                None => status(404, "NotFound", "not found"),
            }
        }
        _ => status(404, "NotFound", "unsupported path"),
    }
}

fn handle(st: &mut State, method: &str, target: &str, ctype: &str, body: &[u8]) -> (u16, Value) {
    st.log.push(format!("{method} {target} {ctype}"));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if st.forbid_outside_meshca
        && !path.starts_with("/api/v1/namespaces/meshca/")
        && !path.starts_with("/apis/coordination.k8s.io/v1/namespaces/meshca/")
    {
        return status(403, "Forbidden", &format!("{path} is forbidden"));
    }
    if st.serve_ctb && path.starts_with("/apis/certificates.k8s.io/") {
        return handle_ctb(st, method, path, query, body);
    }
    let mut parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // apis/coordination.k8s.io/v1/... is served like api/v1/... (Leases).
    let api_version = if parts.len() > 3 && parts[0] == "apis" && parts[1] == "coordination.k8s.io"
    {
        parts.drain(0..2);
        parts.insert(0, "api");
        "coordination.k8s.io/v1"
    } else {
        "v1"
    };
    // Lists across namespaces: api/v1/<resource>, and CSRs (prune's check of the
    // certificates still in use).
    let cluster_list = (parts.len() == 3 && parts[0] == "api")
        || path == "/apis/certificates.k8s.io/v1/certificatesigningrequests";
    if method == "GET" && cluster_list {
        let res = parts.last().copied().unwrap_or_default();
        let items: Vec<Value> = st
            .objects
            .iter()
            .filter(|((_, r, _), _)| r == res)
            .map(|(_, o)| o.clone())
            .collect();
        return (
            200,
            json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items}),
        );
    }
    // api/v1/namespaces/<ns>/<resource>[/<name>]
    if parts.len() < 5 || parts[0] != "api" || parts[2] != "namespaces" {
        return status(404, "NotFound", "unsupported path");
    }
    let (ns, res) = (parts[3].to_string(), parts[4].to_string());
    let name = parts.get(5).map(|s| s.to_string());
    let kind = match res.as_str() {
        "secrets" => "Secret",
        "leases" => "Lease",
        _ => "ConfigMap",
    };
    match (method, name) {
        ("GET", None) => {
            let sel = query_param(query, "labelSelector").unwrap_or_default();
            let items: Vec<Value> = st
                .objects
                .iter()
                .filter(|((n, r, _), o)| {
                    *n == ns && *r == res && selector_matches(&sel, &o["metadata"]["labels"])
                })
                .map(|(_, o)| o.clone())
                .collect();
            (
                200,
                json!({"apiVersion": "v1", "kind": format!("{kind}List"), "metadata": {"resourceVersion": "1"}, "items": items}),
            )
        }
        ("GET", Some(n)) => match st.objects.get(&(ns, res.clone(), n.clone())) {
            Some(o) => (200, o.clone()),
            None => status(404, "NotFound", &format!("{res} \"{n}\" not found")),
        },
        ("POST", None) => {
            let mut o: Value = serde_json::from_slice(body).unwrap();
            let n = o["metadata"]["name"].as_str().unwrap().to_string();
            let key = (ns.clone(), res.clone(), n.clone());
            if st.objects.contains_key(&key) {
                return status(
                    409,
                    "AlreadyExists",
                    &format!("{res} \"{n}\" already exists"),
                );
            }
            o["metadata"]["namespace"] = json!(ns);
            o["metadata"]["resourceVersion"] = json!("1");
            o["apiVersion"] = json!(api_version);
            o["kind"] = json!(kind);
            st.objects.insert(key, o.clone());
            (201, o)
        }
        ("PUT", Some(n)) => {
            let mut o: Value = serde_json::from_slice(body).unwrap();
            let key = (ns, res, n.clone());
            // Optimistic concurrency, as the API server does it.
            let stored_rv = st
                .objects
                .get(&key)
                .map(|c| c["metadata"]["resourceVersion"].clone());
            if let Some(rv) = stored_rv {
                if !o["metadata"]["resourceVersion"].is_null()
                    && o["metadata"]["resourceVersion"] != rv
                {
                    return status(409, "Conflict", "the object has been modified");
                }
                let next = rv.as_str().unwrap_or("1").parse::<u64>().unwrap_or(1) + 1;
                o["metadata"]["resourceVersion"] = json!(next.to_string());
            }
            st.objects.insert(key, o.clone());
            (200, o)
        }
        ("DELETE", Some(n)) => match st.objects.remove(&(ns, res.clone(), n.clone())) {
            Some(_) => (
                200,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
            ),
            None => status(404, "NotFound", &format!("{res} \"{n}\" not found")),
        },
        ("PATCH", Some(n)) => {
            assert_eq!(
                ctype, "application/apply-patch+yaml",
                "only server-side apply is expected"
            );
            let patch: Value = serde_json::from_slice(body).unwrap();
            let key = (ns.clone(), res.clone(), n.clone());
            let mut o = st
                .objects
                .get(&key)
                .cloned()
                .unwrap_or_else(|| json!({"metadata": {}}));
            for field in ["data", "type"] {
                if let Some(v) = patch.get(field) {
                    if let (Some(dst), Some(src)) = (
                        o.get_mut(field).and_then(Value::as_object_mut),
                        v.as_object(),
                    ) {
                        for (k, v) in src {
                            dst.insert(k.clone(), v.clone());
                        }
                    } else {
                        o[field] = v.clone();
                    }
                }
            }
            for m in ["labels", "annotations"] {
                if let Some(v) = patch["metadata"].get(m) {
                    o["metadata"][m] = v.clone();
                }
            }
            o["metadata"]["name"] = json!(n);
            o["metadata"]["namespace"] = json!(ns);
            o["apiVersion"] = json!("v1");
            o["kind"] = json!(kind);
            st.objects.insert(key, o.clone());
            (200, o)
        }
        _ => status(405, "MethodNotAllowed", "unsupported"),
    }
}

fn serve_conn(stream: TcpStream, state: Arc<Mutex<State>>) {
    let mut r = BufReader::new(stream.try_clone().unwrap());
    let mut w = stream;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut it = line.split_whitespace();
        let (method, target) = (
            it.next().unwrap_or("").to_string(),
            it.next().unwrap_or("").to_string(),
        );
        let (mut len, mut ctype) = (0usize, String::new());
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                match k.to_ascii_lowercase().as_str() {
                    "content-length" => len = v.trim().parse().unwrap_or(0),
                    "content-type" => ctype = v.trim().to_string(),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let (code, v) = handle(&mut state.lock().unwrap(), &method, &target, &ctype, &body);
        let b = serde_json::to_vec(&v).unwrap();
        let head = format!(
            "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            b.len()
        );
        if w.write_all(head.as_bytes())
            .and_then(|_| w.write_all(&b))
            .is_err()
        {
            return;
        }
    }
}

impl Fake {
    fn start() -> Fake {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State::default()));
        let s = state.clone();
        // The listener thread ends with the test process.
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let s = s.clone();
                std::thread::spawn(move || serve_conn(c, s));
            }
        });
        Fake { port, state }
    }

    fn object(&self, ns: &str, res: &str, name: &str) -> Option<Value> {
        self.state
            .lock()
            .unwrap()
            .objects
            .get(&(ns.into(), res.into(), name.into()))
            .cloned()
    }

    fn log(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }
}

struct Cli {
    dir: tempfile::TempDir,
}

impl Cli {
    fn new(port: u16) -> Cli {
        let dir = tempfile::tempdir().unwrap();
        let kc = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{port}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: u\n    namespace: default\ncurrent-context: fake\n"
        );
        std::fs::write(dir.path().join("kubeconfig"), kc).unwrap();
        Cli { dir }
    }

    fn run(&self, args: &[&str]) -> Output {
        let kc = self.dir.path().join("kubeconfig");
        let mut all = vec![
            "--store",
            "kube:meshca",
            "--kubeconfig",
            kc.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        Command::new(env!("CARGO_BIN_EXE_meshca"))
            .args(&all)
            .env_remove("KUBECONFIG")
            .env_remove("RUST_LOG")
            .env("MESHCA_HOME", self.dir.path().join("unused-home"))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "meshca {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }
}

/// `meshca issue` of `web.app.svc` for ServiceAccount app/web into Secret `app/web-tls`.
fn issue_web_tls(cli: &Cli) -> String {
    cli.ok(&[
        "issue",
        "--ca",
        "mesh",
        "--namespace",
        "app",
        "--service-account",
        "web",
        "--dns",
        "web.app.svc",
        "--secret",
        "app/web-tls",
    ])
}

fn data(o: &Value, key: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(o["data"][key].as_str().unwrap())
        .unwrap()
}

#[test]
fn kube_store_init_issue_secret_bundle_publish_and_ledger() {
    let fake = Fake::start();
    let cli = Cli::new(fake.port);

    // init writes the CA Secret with a plain create.
    cli.ok(&["init", "--ca", "mesh"]);
    let ca = fake
        .object("meshca", "secrets", "meshca-ca-mesh")
        .expect("CA Secret");
    assert_eq!(ca["type"], "kubernetes.io/tls");
    assert_eq!(ca["metadata"]["labels"]["meshca.io/ca"], "mesh");
    assert_eq!(
        ca["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "meshca"
    );
    assert!(!data(&ca, "tls.key").is_empty());
    // `init` is idempotent: an existing CA is left alone (found through the store's get).
    let before = fake.object("meshca", "secrets", "meshca-ca-mesh").unwrap();
    let again = cli.ok(&["init", "--ca", "mesh"]);
    assert!(again.contains("exists"), "{again}");
    assert_eq!(
        fake.object("meshca", "secrets", "meshca-ca-mesh").unwrap(),
        before
    );

    // ca list reads it back through the label selector.
    let list: Value = serde_json::from_str(&cli.ok(&["ca", "list", "--output", "json"])).unwrap();
    assert_eq!(list[0]["name"], "mesh", "{list}");

    // issue --secret writes the Secret to the cluster by server-side apply.
    issue_web_tls(&cli);
    let s = fake
        .object("app", "secrets", "web-tls")
        .expect("workload Secret");
    assert_eq!(s["type"], "kubernetes.io/tls");
    let chain = meshca::pemutil::parse_certs(&data(&s, "tls.crt"), "tls.crt").unwrap();
    let roots = meshca::pemutil::parse_certs(&data(&s, "ca.crt"), "ca.crt").unwrap();
    assert_eq!(
        roots,
        meshca::pemutil::parse_certs(&data(&ca, "ca.crt"), "ca.crt").unwrap()
    );
    meshca::x509::verify_chain(
        &chain[0],
        &chain[1..],
        &roots,
        time::OffsetDateTime::now_utc(),
        meshca::x509::Usage::Server,
    )
    .unwrap();
    let key = meshca::key::PrivateKey::from_pem(
        std::str::from_utf8(&data(&s, "tls.key")).unwrap(),
        "tls.key",
    )
    .unwrap();
    assert_eq!(
        key.public_key_der(),
        meshca::x509::CertInfo::from_der(&chain[0])
            .unwrap()
            .spki_der
    );
    let log = fake.log();
    let apply = log
        .iter()
        .find(|l| l.starts_with("PATCH /api/v1/namespaces/app/secrets/web-tls"))
        .expect("an apply");
    assert!(
        apply.contains("fieldManager=meshca")
            && apply.contains("force=true")
            && apply.ends_with("application/apply-patch+yaml"),
        "{apply}"
    );

    // The ledger recorded the issuance in a ConfigMap shard.
    let ledger: Value = serde_json::from_str(&cli.ok(&["ledger", "--output", "json"])).unwrap();
    assert!(
        ledger
            .to_string()
            .contains("spiffe://cluster.local/ns/app/sa/web"),
        "{ledger}"
    );

    // bundle create + publish: ConfigMap <name>-trust-bundle with ca.crt in the namespace.
    cli.ok(&[
        "bundle",
        "create",
        "mesh-trust",
        "--ca",
        "mesh",
        "--namespace",
        "app",
    ]);
    assert!(fake
        .object("meshca", "configmaps", "meshca-bundle-mesh-trust")
        .is_some());
    let out: Value =
        serde_json::from_str(&cli.ok(&["bundle", "publish", "mesh-trust", "--output", "json"]))
            .unwrap();
    assert_eq!(out["namespaces"], json!(["app"]));
    let cm = fake
        .object("app", "configmaps", "mesh-trust-trust-bundle")
        .expect("bundle ConfigMap");
    assert_eq!(
        cm["data"]["ca.crt"].as_str().unwrap().as_bytes(),
        &data(&ca, "ca.crt")[..]
    );
    assert_eq!(cm["metadata"]["labels"]["meshca.io/bundle"], "mesh-trust");
}

/// Issue 17: a signer whose lists are all refused (no Role in its managed namespace, no
/// ClusterRole for CSRs) used to ignore SIGTERM: kube-runtime holds a controller until its
/// first list succeeds, and the shutdown waited for it without bound.
#[test]
fn signer_run_ends_promptly_on_sigterm_while_its_lists_are_refused() {
    let fake = Fake::start();
    let cli = Cli::new(fake.port);
    cli.ok(&["init", "--ca", "mesh"]);
    fake.state.lock().unwrap().forbid_outside_meshca = true;
    let kc = cli.dir.path().join("kubeconfig");
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshca"))
        .args([
            "--store",
            "kube:meshca",
            "--kubeconfig",
            kc.to_str().unwrap(),
            "signer",
            "run",
            "--leader-elect",
            "false",
            "--metrics-addr",
            "off",
            "--managed-namespace",
            "app",
            "--bundle-resync",
            "0s",
        ])
        .env_remove("KUBECONFIG")
        .env("RUST_LOG", "warn")
        .env("MESHCA_HOME", cli.dir.path().join("unused-home"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let waited = std::time::Instant::now();
    let refused = |fake: &Fake| {
        let log = fake.log();
        log.iter().any(|l| l.contains("certificatesigningrequests"))
            && log.iter().any(|l| l.contains("/namespaces/app/secrets"))
    };
    while !refused(&fake) {
        assert!(
            waited.elapsed() < std::time::Duration::from_secs(30),
            "the controllers never tried to list: {:?}",
            fake.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let asked = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if asked.elapsed() > std::time::Duration::from_secs(20) {
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    if status.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let status = status.unwrap_or_else(|| panic!("still running 20 s after SIGTERM: {err}"));
    assert!(status.success(), "{status:?}: {err}");
    assert!(
        err.contains("forbidden"),
        "the refused lists are logged: {err}"
    );
}

#[test]
fn kube_store_errors_are_one_line_and_exit_codes_hold() {
    // Nothing listens on this port: an unreachable cluster is not the user's input error.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cli = Cli::new(port);
    let o = cli.run(&["ca", "list"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("meshca: error: kubernetes: listing CA Secrets"),
        "{err}"
    );
    // A missing kubeconfig and an empty namespace are the user's: exit 1.
    let o = Command::new(env!("CARGO_BIN_EXE_meshca"))
        .args([
            "--store",
            "kube:meshca",
            "--kubeconfig",
            "/nonexistent/kubeconfig",
            "ca",
            "list",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let o = Command::new(env!("CARGO_BIN_EXE_meshca"))
        .args(["--store", "kube:", "ca", "list"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("needs a namespace"));
}

#[test]
fn bundle_publish_cluster_trust_bundle_says_when_the_cluster_lacks_the_api() {
    // The fake serves no certificates.k8s.io group: discovery answers 404 for all three
    // versions.
    let fake = Fake::start();
    let cli = Cli::new(fake.port);
    cli.ok(&["init", "--ca", "mesh"]);
    cli.ok(&["bundle", "create", "mesh-trust", "--ca", "mesh"]);
    let o = cli.run(&["bundle", "publish", "mesh-trust", "--cluster-trust-bundle"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("serves no certificates.k8s.io v1, v1beta1 or v1alpha1 clustertrustbundles"),
        "{err}"
    );
    let log = fake.log();
    let apis: Vec<&String> = log.iter().filter(|l| l.contains(" /apis/")).collect();
    assert_eq!(apis.len(), 3, "{apis:?}");
    for (i, v) in ["v1", "v1beta1", "v1alpha1"].iter().enumerate() {
        assert!(
            apis[i].starts_with(&format!("GET /apis/certificates.k8s.io/{v} ")),
            "{apis:?}"
        );
    }
    // A suffix the API server would refuse is refused before any request.
    let before = fake.log().len();
    let o = cli.run(&[
        "bundle",
        "publish",
        "mesh-trust",
        "--cluster-trust-bundle",
        "--suffix",
        "Roots",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("ClusterTrustBundle suffix"));
    assert_eq!(fake.log().len(), before, "no request for a bad suffix");
}

#[test]
fn bundle_publish_cluster_trust_bundle_applies_skips_unchanged_and_prunes_an_old_suffix() {
    let fake = Fake::start();
    fake.state.lock().unwrap().serve_ctb = true;
    let cli = Cli::new(fake.port);
    cli.ok(&["init", "--ca", "mesh"]);
    cli.ok(&["bundle", "create", "mesh-trust", "--ca", "mesh"]);
    let ca = fake
        .object("meshca", "secrets", "meshca-ca-mesh")
        .expect("CA Secret");
    let publish = |extra: &[&str]| -> Value {
        let mut a = vec![
            "bundle",
            "publish",
            "mesh-trust",
            "--cluster-trust-bundle",
            "--output",
            "json",
        ];
        a.extend_from_slice(extra);
        serde_json::from_str(&cli.ok(&a)).unwrap()
    };
    let r = publish(&[]);
    assert_eq!(r["applied"], json!(["meshca.io:mesh:roots"]), "{r}");
    assert_eq!(r["api_version"], "certificates.k8s.io/v1beta1");
    assert_eq!(
        r["cluster_trust_bundles"][0]["signer_name"],
        "meshca.io/mesh"
    );
    let o = fake
        .object("", "clustertrustbundles", "meshca.io:mesh:roots")
        .expect("ClusterTrustBundle");
    assert_eq!(o["spec"]["signerName"], "meshca.io/mesh");
    assert_eq!(
        o["spec"]["trustBundle"].as_str().unwrap().as_bytes(),
        &data(&ca, "ca.crt")[..]
    );
    assert_eq!(o["metadata"]["labels"]["meshca.io/ca"], "mesh");
    let patches = |f: &Fake| {
        f.log()
            .iter()
            .filter(|l| l.starts_with("PATCH /apis/"))
            .count()
    };
    assert_eq!(patches(&fake), 1);
    assert!(fake.log().iter().any(|l| l.starts_with(
        "PATCH /apis/certificates.k8s.io/v1beta1/clustertrustbundles/meshca.io:mesh:roots?"
    ) && l.contains("fieldManager=meshca")
        && l.ends_with("application/apply-patch+yaml")));
    // Unchanged: no write.
    let r = publish(&[]);
    assert_eq!(
        (r["applied"].clone(), r["unchanged"].clone()),
        (json!([]), json!(1)),
        "{r}"
    );
    assert_eq!(patches(&fake), 1);
    // Another suffix: the new name is applied, the old one deleted.
    let r = publish(&["--suffix", "v2"]);
    assert_eq!(r["applied"], json!(["meshca.io:mesh:v2"]), "{r}");
    assert_eq!(r["deleted"], json!(["meshca.io:mesh:roots"]), "{r}");
    assert!(fake
        .object("", "clustertrustbundles", "meshca.io:mesh:roots")
        .is_none());
    assert!(fake
        .object("", "clustertrustbundles", "meshca.io:mesh:v2")
        .is_some());
}

/// `ca rotate` on `--store kube:`: the three phases through the binary, the bundle ConfigMap
/// holding both roots during the overlap, `--status -o json`, and the Lease phase lock.
#[test]
fn kube_store_ca_rotation_phases_and_lock() {
    let fake = Fake::start();
    let cli = Cli::new(fake.port);
    cli.ok(&["init", "--ca", "mesh"]);
    cli.ok(&[
        "bundle",
        "create",
        "mesh",
        "--ca",
        "mesh",
        "--namespace",
        "apps",
    ]);
    let roots = |fake: &Fake| {
        fake.object("apps", "configmaps", "mesh-trust-bundle")
            .map(|c| {
                c["data"]["ca.crt"]
                    .as_str()
                    .unwrap()
                    .matches("BEGIN CERTIFICATE")
                    .count()
            })
    };
    let status = |cli: &Cli| -> Value {
        serde_json::from_str(&cli.ok(&["ca", "rotate", "mesh", "--status", "-o", "json"])).unwrap()
    };
    let old = fake.object("meshca", "secrets", "meshca-ca-mesh").unwrap();
    // A workload certificate of the old CA, live in a TLS Secret.
    issue_web_tls(&cli);

    cli.ok(&["ca", "rotate", "mesh", "--phase", "prepare"]);
    assert_eq!(roots(&fake), Some(2), "both roots published at prepare");
    assert!(fake
        .object("meshca", "secrets", "meshca-rotation-mesh-next")
        .is_some());
    assert!(
        fake.object("meshca", "leases", "meshca-rotation").is_none(),
        "lock released"
    );
    let st = status(&cli);
    assert_eq!(st["phase"], "prepared");
    assert_ne!(st["next"]["sha256"], st["current"]["sha256"]);
    // The record is replaced with a resourceVersion precondition.
    assert!(fake
        .log()
        .iter()
        .any(|l| l.starts_with("PUT /api/v1/namespaces/meshca/configmaps/meshca-rotation-mesh")));

    // A live lock held by another process: the next phase fails at once, one line, naming it.
    let holder = "pid 1 on elsewhere: meshca ca rotate mesh --phase prepare";
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    fake.state.lock().unwrap().objects.insert(
        ("meshca".into(), "leases".into(), "meshca-rotation".into()),
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": "meshca-rotation", "namespace": "meshca", "resourceVersion": "5"},
               "spec": {"holderIdentity": holder, "leaseDurationSeconds": 60, "renewTime": now}}),
    );
    let o = cli.run(&["ca", "rotate", "mesh", "--phase", "activate"]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("another rotation phase holds the lock") && err.contains(holder),
        "{err}"
    );
    assert_eq!(status(&cli)["phase"], "prepared", "nothing changed");
    fake.state.lock().unwrap().objects.remove(&(
        "meshca".into(),
        "leases".into(),
        "meshca-rotation".into(),
    ));

    cli.ok(&["ca", "rotate", "mesh", "--phase", "activate", "--now"]);
    let new = fake.object("meshca", "secrets", "meshca-ca-mesh").unwrap();
    assert_ne!(
        new["data"]["tls.crt"], old["data"]["tls.crt"],
        "the new CA issues"
    );
    assert_eq!(status(&cli)["phase"], "active");
    assert_eq!(roots(&fake), Some(2));
    // The ledger lost its entry (issue 17): prune still sees the certificate in use.
    fake.state
        .lock()
        .unwrap()
        .objects
        .retain(|(_, r, n), _| !(r == "configmaps" && n.starts_with("meshca-ledger-")));
    let o = cli.run(&["ca", "rotate", "mesh", "--phase", "prune"]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("prune refused") && err.contains("secret app/web-tls (serial "),
        "{err}"
    );
    assert_eq!(roots(&fake), Some(2), "nothing pruned");
    cli.ok(&["ca", "rotate", "mesh", "--phase", "prune", "--force"]);
    assert_eq!(roots(&fake), Some(1), "old root pruned");
    assert_eq!(status(&cli)["phase"], "idle");
    for n in ["meshca-rotation-mesh-next", "meshca-rotation-mesh-previous"] {
        assert!(fake.object("meshca", "secrets", n).is_none(), "{n}");
    }
    assert!(fake
        .object("meshca", "configmaps", "meshca-rotation-mesh")
        .is_none());
}
