//! `meshca istio-ca serve` on a real control plane, called by a Go client built from
//! istio.io/api's stubs and grpc-go (tests/istio, `MESHCA_ISTIO_CLIENT_BIN`) that sends what
//! istio-agent and ztunnel send: a PEM CSR, validity_duration, `authorization: Bearer <token>`,
//! `ClusterID`, and `CertSigner` / `ImpersonatedIdentity` request metadata.
//!
//! The server runs under the ServiceAccount `meshca/meshca-signer` with exactly the rights of
//! deploy/components/istio-ca/clusterrole.yaml; tokens come from the TokenRequest API (bound
//! to pods created with `spec.nodeName` set: the harness has no kubelet or scheduler). Each
//! denial has an allowed twin.
//!
//! `.ci/run` exports `MESHCA_E2E_KUBECONFIG`, `MESHCA_E2E_KUBECTL`, `MESHCA_E2E_CLUSTER_DIR`
//! (tests/cluster/cluster.sh) and `MESHCA_ISTIO_CLIENT_BIN` (tests/istio/build.sh). Without
//! them each test prints why and returns; with `CI=true` it fails.

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::{text, Env};
use serde_json::{json, Value};

struct Peers {
    kubeconfig: PathBuf,
    kubectl: PathBuf,
    dir: PathBuf,
    client: PathBuf,
}

fn peers() -> Option<Peers> {
    let c = cluster::Cluster::from_env("the Istio CA e2e tests")?;
    let client = common::peer(
        "MESHCA_ISTIO_CLIENT_BIN",
        "export MESHCA_ISTIO_CLIENT_BIN=$(bash tests/istio/build.sh)",
    )?;
    Some(Peers {
        kubeconfig: c.kubeconfig,
        kubectl: c.kubectl,
        dir: c.dir,
        client,
    })
}

impl Peers {
    fn kubectl_in(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        common::kubectl_output(&self.kubectl, &self.kubeconfig, args, stdin)
    }

    fn kubectl(&self, args: &[&str]) -> String {
        let o = self.kubectl_in(args, None);
        assert!(o.status.success(), "kubectl {args:?}: {}", text(&o));
        String::from_utf8(o.stdout).unwrap()
    }

    fn apply(&self, v: &Value) {
        let body = serde_json::to_vec(v).unwrap();
        // The tests run in parallel and share objects (the `meshca` namespace): two applies
        // that both find the object missing race to create it, and the loser gets
        // AlreadyExists; applied again, it finds the object and patches it.
        let mut o = self.kubectl_in(&["apply", "-f", "-"], Some(&body));
        for _ in 0..3 {
            if o.status.success() || !text(&o).contains("AlreadyExists") {
                break;
            }
            o = self.kubectl_in(&["apply", "-f", "-"], Some(&body));
        }
        assert!(o.status.success(), "kubectl apply: {}", text(&o));
    }

    fn namespace(&self, ns: &str) {
        self.apply(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}));
    }

    fn service_account(&self, ns: &str, sa: &str) {
        self.apply(&json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": sa, "namespace": ns}}));
    }

    /// A pod of `sa` placed on `node` (no scheduler: spec.nodeName set directly).
    fn pod(&self, ns: &str, name: &str, sa: &str, node: &str) {
        self.apply(&json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"serviceAccountName": sa, "nodeName": node, "automountServiceAccountToken": false,
                     "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}]}}));
    }

    /// A TokenRequest token of `ns/sa` for `audience`, bound to `pod` when given.
    fn token(&self, ns: &str, sa: &str, audience: &str, pod: Option<&str>, out: &Path) -> PathBuf {
        let mut args = vec![
            "create",
            "token",
            sa,
            "-n",
            ns,
            "--audience",
            audience,
            "--duration=1h",
        ];
        if let Some(p) = pod {
            args.extend(["--bound-object-kind", "Pod", "--bound-object-name", p]);
        }
        let t = self.kubectl(&args);
        std::fs::write(out, t.trim()).unwrap();
        out.to_path_buf()
    }

    /// A ServiceAccount token signed with the API server's own signing key (the harness's
    /// pki/sa.key) with the given `exp` offset from now: an expired token the API server
    /// rejects for its expiry alone (its twin, with a future `exp`, is accepted).
    fn forged_token(&self, env: &Env, ns: &str, sa: &str, exp_offset: i64, out: &str) -> PathBuf {
        let uid = self.kubectl(&[
            "get",
            "serviceaccount",
            sa,
            "-n",
            ns,
            "-o",
            "jsonpath={.metadata.uid}",
        ]);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let header = b64(br#"{"alg":"RS256","typ":"JWT"}"#);
        let claims = json!({
            "iss": "https://kubernetes.default.svc.cluster.local",
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "aud": ["istio-ca"],
            "iat": now - 7200, "nbf": now - 7200, "exp": now + exp_offset,
            "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": uid}},
        });
        let signing_input = format!("{header}.{}", b64(&serde_json::to_vec(&claims).unwrap()));
        let input = env.path(&format!("{out}.in"));
        std::fs::write(&input, &signing_input).unwrap();
        let key = self.dir.join("pki/sa.key");
        let sig = common::openssl(&[
            "dgst",
            "-sha256",
            "-sign",
            key.to_str().unwrap(),
            input.to_str().unwrap(),
        ]);
        let path = env.path(out);
        std::fs::write(&path, format!("{signing_input}.{}", b64(&sig.stdout))).unwrap();
        path
    }

    /// A kubeconfig for ServiceAccount `ns/sa` (TokenRequest), against the same API server.
    fn sa_kubeconfig(&self, ns: &str, sa: &str, out: &Path) {
        let token = self.kubectl(&["create", "token", sa, "-n", ns, "--duration=1h"]);
        let view: Value = serde_json::from_str(
            &self.kubectl(&["config", "view", "--raw", "--minify", "-o", "json"]),
        )
        .unwrap();
        let kc = json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "e2e", "cluster": view["clusters"][0]["cluster"]}],
            "users": [{"name": sa, "user": {"token": token.trim()}}],
            "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": sa}}],
            "current-context": "e2e",
        });
        std::fs::write(out, serde_json::to_vec(&kc).unwrap()).unwrap();
    }

    /// The server's identity: `meshca/meshca-signer` with deploy/components/istio-ca's RBAC.
    fn server_kubeconfig(&self, env: &Env) -> PathBuf {
        self.namespace("meshca");
        self.service_account("meshca", "meshca-signer");
        let rbac = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/components/istio-ca/clusterrole.yaml");
        self.kubectl(&["apply", "-f", rbac.to_str().unwrap()]);
        let kc = env.path("server.kubeconfig");
        self.sa_kubeconfig("meshca", "meshca-signer", &kc);
        kc
    }
}

/// A running `meshca istio-ca serve`, killed when dropped.
struct Server {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(env: &Env, kubeconfig: &Path, args: &[&str]) -> Server {
        let log = env.path(&format!("server-{}.log", common::free_port()));
        let mut c = env.cmd(&[
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "istio-ca",
            "serve",
        ]);
        c.args(args)
            .args(["--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = c.spawn().unwrap();
        let mut s = Server {
            child,
            addr: String::new(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let l = std::fs::read_to_string(&s.log).unwrap_or_default();
            if let Some(rest) = l.split("istio-ca listening on ").nth(1) {
                s.addr = rest.lines().next().unwrap().trim().to_string();
                return s;
            }
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!("meshca istio-ca serve exited ({st}): {l}");
            }
            assert!(Instant::now() < deadline, "server did not start: {l}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// One call of the Go client: `Ok(chain PEM)` or `Err("code=<Code> msg=...")`.
fn call(p: &Peers, env: &Env, server: &Server, args: &[&str], out: &str) -> Result<String, String> {
    let chain = env.path(&format!("{out}.chain.pem"));
    let key = env.path(&format!("{out}.key.pem"));
    let o = Command::new(&p.client)
        .args(["-addr", &server.addr])
        .args(args)
        .arg("-out-chain")
        .arg(&chain)
        .arg("-out-key")
        .arg(&key)
        .output()
        .unwrap();
    match o.status.code() {
        Some(0) => Ok(std::fs::read_to_string(&chain).unwrap()),
        Some(3) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        _ => panic!(
            "client {args:?} failed: {}\nserver log:\n{}",
            text(&o),
            server.log()
        ),
    }
}

/// The chain's leaf verifies against `root` (openssl); returns the leaf's URI SAN line.
fn verify(env: &Env, chain_pem: &str, root: &Path, name: &str) -> String {
    let certs = pem::parse_many(chain_pem).unwrap();
    assert!(certs.len() >= 2, "chain of {} certificates", certs.len());
    // Istio wants the root last.
    let root_pem = std::fs::read_to_string(root).unwrap();
    assert_eq!(
        pem::parse(root_pem.as_bytes()).unwrap().contents(),
        certs.last().unwrap().contents(),
        "the last certificate of the chain is not the root"
    );
    let leaf = env.path(&format!("{name}.leaf.pem"));
    std::fs::write(&leaf, pem::encode(&certs[0])).unwrap();
    let o = common::openssl(&[
        "verify",
        "-CAfile",
        root.to_str().unwrap(),
        "-purpose",
        "sslclient",
        leaf.to_str().unwrap(),
    ]);
    assert!(text(&o).contains(": OK"), "{}", text(&o));
    let o = common::openssl(&[
        "x509",
        "-in",
        leaf.to_str().unwrap(),
        "-noout",
        "-ext",
        "subjectAltName",
    ]);
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// A fresh meshca home with CAs `ca1` and `ca2`; returns the root PEM paths.
fn cas(env: &Env, extra: &[&str]) -> (PathBuf, PathBuf) {
    let mut args = vec!["init", "--ca", "ca1", "--ca", "ca2"];
    args.extend_from_slice(extra);
    env.ok(&args);
    let mut roots = Vec::new();
    for ca in ["ca1", "ca2"] {
        let p = env.path(&format!("{ca}.root.pem"));
        std::fs::write(&p, env.ok(&["ca", "show", ca, "--pem"])).unwrap();
        roots.push(p);
    }
    (roots[0].clone(), roots[1].clone())
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", std::process::id())
}

#[test]
fn ca_addr_mode_token_then_mtls_renewal_two_cas_and_denials() {
    let Some(p) = peers() else { return };
    let env = Env::new();
    let (root1, root2) = cas(&env, &[]);
    // The server's own certificate (TLS with optional client certificates).
    env.ok(&[
        "issue",
        "--ca",
        "ca1",
        "--dns",
        "localhost",
        "--name",
        "srv",
        "--out-dir",
        "out",
    ]);
    let kc = p.server_kubeconfig(&env);
    let metrics_port = common::free_port().to_string();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let server = Server::start(
        &env,
        &kc,
        &[
            "--ca",
            "ca1",
            "--ca",
            "ca2",
            "--tls-cert",
            env.path("out/srv_cert_chain.pem").to_str().unwrap(),
            "--tls-key",
            env.path("out/srv_key.pem").to_str().unwrap(),
            "--metrics-addr",
            &metrics_addr,
        ],
    );
    let ns = unique("istio-e2e-app");
    p.namespace(&ns);
    for sa in ["a", "b"] {
        p.service_account(&ns, sa);
    }
    let id = |sa: &str| format!("spiffe://cluster.local/ns/{ns}/sa/{sa}");
    let tok_a = p.token(&ns, "a", "istio-ca", None, &env.path("a.token"));
    let tls = ["-ca", root1.to_str().unwrap()];
    let with = |extra: &[&str]| -> Vec<String> {
        tls.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let run = |args: Vec<String>, out: &str| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        call(&p, &env, &server, &a, out)
    };

    // Allowed: A's token for A's identity; the chain (leaf first, root last) verifies.
    let chain = run(
        with(&[
            "-token",
            tok_a.to_str().unwrap(),
            "-spiffe-id",
            &id("a"),
            "-ttl",
            "3600",
        ]),
        "a1",
    )
    .unwrap();
    let san = verify(&env, &chain, &root1, "a1");
    assert!(san.contains(&format!("URI:{}", id("a"))), "{san}");
    // Denied twin: A's token asking for B's identity.
    let e = run(
        with(&["-token", tok_a.to_str().unwrap(), "-spiffe-id", &id("b")]),
        "a2",
    )
    .unwrap_err();
    assert!(
        e.starts_with("code=PermissionDenied")
            && e.contains(&id("b"))
            && e.contains(&format!("{ns}/a")),
        "{e}"
    );

    // Renewal over mutual TLS with the certificate just issued, no token.
    let renewed = run(
        with(&[
            "-cert",
            env.path("a1.chain.pem").to_str().unwrap(),
            "-key",
            env.path("a1.key.pem").to_str().unwrap(),
            "-spiffe-id",
            &id("a"),
        ]),
        "a3",
    )
    .unwrap();
    let san = verify(&env, &renewed, &root1, "a3");
    assert!(san.contains(&id("a")), "{san}");
    assert_ne!(renewed, chain);
    // Denied twin: the same client certificate asking for B.
    let e = run(
        with(&[
            "-cert",
            env.path("a1.chain.pem").to_str().unwrap(),
            "-key",
            env.path("a1.key.pem").to_str().unwrap(),
            "-spiffe-id",
            &id("b"),
        ]),
        "a4",
    )
    .unwrap_err();
    assert!(
        e.starts_with("code=PermissionDenied") && e.contains(&id("b")),
        "{e}"
    );
    // No credentials at all.
    let e = run(with(&["-spiffe-id", &id("a")]), "a5").unwrap_err();
    assert!(
        e.starts_with("code=Unauthenticated") && e.contains("no credentials"),
        "{e}"
    );

    // Two CAs: CertSigner meshca.io/ca2 (ISTIO_META_CERT_SIGNER) gets a chain to ca2's root.
    let green = run(
        with(&[
            "-token",
            tok_a.to_str().unwrap(),
            "-spiffe-id",
            &id("a"),
            "-cert-signer",
            "meshca.io/ca2",
        ]),
        "g1",
    )
    .unwrap();
    verify(&env, &green, &root2, "g1");
    let leaf = env.path("g1.leaf.pem");
    let o = Command::new("openssl")
        .args([
            "verify",
            "-CAfile",
            root1.to_str().unwrap(),
            leaf.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        !text(&o).contains(": OK"),
        "a ca2 leaf verified against ca1: {}",
        text(&o)
    );
    let e = run(
        with(&[
            "-token",
            tok_a.to_str().unwrap(),
            "-spiffe-id",
            &id("a"),
            "-cert-signer",
            "meshca.io/ca3",
        ]),
        "g2",
    )
    .unwrap_err();
    assert!(
        e.starts_with("code=InvalidArgument") && e.contains("meshca.io/ca3"),
        "{e}"
    );

    // Another cluster's ClusterID is refused; the default one passed above.
    let e = run(
        with(&[
            "-token",
            tok_a.to_str().unwrap(),
            "-spiffe-id",
            &id("a"),
            "-cluster-id",
            "other",
        ]),
        "c1",
    )
    .unwrap_err();
    assert!(
        e.starts_with("code=Unauthenticated") && e.contains("\"other\""),
        "{e}"
    );

    // Every certificate in the ledger (written in batches, so waited for), and the counters.
    let serial = |f: &str| {
        let o = common::openssl(&[
            "x509",
            "-in",
            env.path(f).to_str().unwrap(),
            "-noout",
            "-serial",
        ]);
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .trim_start_matches("serial=")
            .to_lowercase()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    for f in ["a1.leaf.pem", "a3.leaf.pem", "g1.leaf.pem"] {
        let s = serial(f);
        loop {
            let ledger = env.ok(&["ledger"]);
            if ledger.to_lowercase().contains(&s) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "serial {s} of {f} not in the ledger after 10 s:\n{ledger}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let m = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let o = Command::new("curl")
                .args(["-s", &format!("http://{metrics_addr}/metrics")])
                .output()
                .unwrap();
            let s = String::from_utf8_lossy(&o.stdout).to_string();
            if s.contains("istio_ca_issued") || Instant::now() > deadline {
                break s;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert!(
        m.contains("meshca_istio_ca_issued_total{ca=\"ca1\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("meshca_istio_ca_issued_total{ca=\"ca2\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("meshca_istio_ca_refused_total{reason=\"denied\"} 2"),
        "{m}"
    );
    // The token never reaches the log.
    let token = std::fs::read_to_string(&tok_a).unwrap();
    assert!(!server.log().contains(token.trim()));
    p.kubectl(&["delete", "namespace", &ns, "--wait=false"]);
}

#[test]
fn expired_and_wrong_audience_tokens_are_refused() {
    let Some(p) = peers() else { return };
    let env = Env::new();
    let (root1, _) = cas(&env, &[]);
    let kc = p.server_kubeconfig(&env);
    // Plaintext on loopback (the transport rule of SDS); a non-loopback address needs TLS.
    let o = env.run(&[
        "--kubeconfig",
        kc.to_str().unwrap(),
        "istio-ca",
        "serve",
        "--ca",
        "ca1",
        "--listen",
        "0.0.0.0:0",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("not a loopback address"), "{}", text(&o));
    let server = Server::start(&env, &kc, &["--ca", "ca1", "--ca-reload", "200ms"]);
    let ns = unique("istio-e2e-tok");
    p.namespace(&ns);
    p.service_account(&ns, "a");
    let id = format!("spiffe://cluster.local/ns/{ns}/sa/a");
    let run = |tok: &Path, out: &str| {
        call(
            &p,
            &env,
            &server,
            &["-token", tok.to_str().unwrap(), "-spiffe-id", &id],
            out,
        )
    };

    // Wrong audience, and its twin with istio-ca.
    let wrong = p.token(
        &ns,
        "a",
        "https://kubernetes.default.svc.cluster.local",
        None,
        &env.path("wrong.token"),
    );
    let e = run(&wrong, "w").unwrap_err();
    assert!(
        e.starts_with("code=Unauthenticated") && e.contains("istio-ca"),
        "{e}"
    );
    let right = p.token(&ns, "a", "istio-ca", None, &env.path("right.token"));
    run(&right, "r").unwrap();

    // Expired an hour ago, and its twin (the same forged token, valid for another hour).
    let expired = p.forged_token(&env, &ns, "a", -3600, "expired.token");
    let e = run(&expired, "x").unwrap_err();
    assert!(e.starts_with("code=Unauthenticated"), "{e}");
    let fresh = p.forged_token(&env, &ns, "a", 3600, "fresh.token");
    run(&fresh, "f").unwrap();
    // Garbage.
    std::fs::write(env.path("junk.token"), "not-a-jwt").unwrap();
    let e = run(&env.path("junk.token"), "j").unwrap_err();
    assert!(e.starts_with("code=Unauthenticated"), "{e}");

    // CA ca1 replaced in the store (a new key and root): the running server issues from the
    // new one without a restart.
    let old_root = std::fs::read_to_string(&root1).unwrap();
    env.ok(&["init", "--ca", "ca1", "--force"]);
    let new_root = env.path("ca1.new.pem");
    std::fs::write(&new_root, env.ok(&["ca", "show", "ca1", "--pem"])).unwrap();
    assert_ne!(std::fs::read_to_string(&new_root).unwrap(), old_root);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let chain = run(&right, "reload").unwrap();
        let last = pem::parse_many(&chain).unwrap().pop().unwrap();
        if pem::encode(&last)
            == pem::encode(&pem::parse(std::fs::read(&new_root).unwrap()).unwrap())
        {
            verify(&env, &chain, &new_root, "reload");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still issuing from the old ca1:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    p.kubectl(&["delete", "namespace", &ns, "--wait=false"]);
}

#[test]
fn ztunnel_impersonation_only_for_listed_agents_and_pods_on_their_node() {
    let Some(p) = peers() else { return };
    let env = Env::new();
    let sys = unique("istio-e2e-sys");
    let agent = format!("{sys}/ztunnel");
    let (root1, _) = cas(&env, &["--istio-node-agent", &agent]);
    let kc = p.server_kubeconfig(&env);
    let server = Server::start(&env, &kc, &["--ca", "ca1"]);
    let ns = unique("istio-e2e-amb");
    p.namespace(&sys);
    p.namespace(&ns);
    p.service_account(&sys, "ztunnel");
    p.service_account(&sys, "rogue");
    for sa in ["b", "c"] {
        p.service_account(&ns, sa);
    }
    p.pod(&sys, "ztunnel-n1", "ztunnel", "node-1");
    p.pod(&sys, "rogue-n1", "rogue", "node-1");
    p.pod(&ns, "b-n1", "b", "node-1");
    p.pod(&ns, "c-n2", "c", "node-2");
    let id = |sa: &str| format!("spiffe://cluster.local/ns/{ns}/sa/{sa}");
    let zt = p.token(
        &sys,
        "ztunnel",
        "istio-ca",
        Some("ztunnel-n1"),
        &env.path("zt.token"),
    );
    let imp = |tok: &Path, sa: &str, out: &str| {
        call(
            &p,
            &env,
            &server,
            &["-token", tok.to_str().unwrap(), "-impersonate", &id(sa)],
            out,
        )
    };

    // Allowed: the listed agent, for a workload with a pod on its node.
    let chain = imp(&zt, "b", "b").unwrap();
    let san = verify(&env, &chain, &root1, "b");
    assert!(san.contains(&format!("URI:{}", id("b"))), "{san}");
    // Denied: a workload whose only pod is on another node.
    let e = imp(&zt, "c", "c").unwrap_err();
    assert!(
        e.starts_with("code=PermissionDenied")
            && e.contains(&format!("{ns}/c"))
            && e.contains("node-1"),
        "{e}"
    );
    // Denied: an unlisted account, although its token is bound to a pod on the same node.
    let rogue = p.token(
        &sys,
        "rogue",
        "istio-ca",
        Some("rogue-n1"),
        &env.path("rogue.token"),
    );
    let e = imp(&rogue, "b", "r").unwrap_err();
    assert!(
        e.starts_with("code=PermissionDenied")
            && e.contains(&format!("{sys}/rogue"))
            && e.contains("istio_node_agents"),
        "{e}"
    );
    // ... while the same rogue token still gets its own identity.
    call(
        &p,
        &env,
        &server,
        &[
            "-token",
            rogue.to_str().unwrap(),
            "-spiffe-id",
            &format!("spiffe://cluster.local/ns/{sys}/sa/rogue"),
        ],
        "r2",
    )
    .unwrap();
    // Denied: the listed agent with a token bound to no pod (so to no node).
    let unbound = p.token(
        &sys,
        "ztunnel",
        "istio-ca",
        None,
        &env.path("zt-unbound.token"),
    );
    let e = imp(&unbound, "b", "u").unwrap_err();
    assert!(
        e.starts_with("code=PermissionDenied") && e.contains("not bound to a pod"),
        "{e}"
    );
    // Once c has a pod on node-1, the same request is allowed.
    p.pod(&ns, "c-n1", "c", "node-1");
    imp(&zt, "c", "c2").unwrap();
    p.kubectl(&["delete", "namespace", &ns, &sys, "--wait=false"]);
}

/// A `meshca signer run` (the admin's kubeconfig: the signer's own RBAC is kube_e2e's
/// subject), killed when dropped.
struct Signer(Child);

impl Drop for Signer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The workload CSR istio-agent sends (RSA 2048 by default, empty subject, the SPIFFE ID in a
/// critical SAN extension), PEM.
fn agent_csr(env: &Env, name: &str, id: &str) -> Vec<u8> {
    let key = env.path(&format!("{name}.key"));
    let csr = env.path(&format!("{name}.csr"));
    common::openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        key.to_str().unwrap(),
    ]);
    common::openssl(&[
        "req",
        "-new",
        "-key",
        key.to_str().unwrap(),
        "-subj",
        "/",
        "-addext",
        &format!("subjectAltName=critical,URI:{id}"),
        "-out",
        csr.to_str().unwrap(),
    ]);
    std::fs::read(csr).unwrap()
}

/// What istiod's RA (EXTERNAL_CA=ISTIOD_RA_KUBERNETES_API) does for one workload, under the
/// token of `kubeconfig`: create the CSR (generateName csr-workload-, the four usages,
/// expirationSeconds = the requested lifetime, signerName = K8S_SIGNER or the pod's
/// ISTIO_META_CERT_SIGNER), approve it itself, wait for the certificate, delete the CSR.
/// `Ok(certificate PEM)` or `Err(the Failed/Denied condition message)`.
fn ra_sign(kubeconfig: &Path, csr_pem: Vec<u8>, signer: &str, id: &str) -> Result<String, String> {
    use k8s_openapi::api::certificates::v1::{
        CertificateSigningRequest, CertificateSigningRequestCondition,
        CertificateSigningRequestSpec,
    };
    use kube::api::{DeleteParams, ObjectMeta, PostParams};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = meshca::kube::client(Some(kubeconfig)).await.unwrap();
        let api: kube::Api<CertificateSigningRequest> = kube::Api::all(client);
        let csr = CertificateSigningRequest {
            metadata: ObjectMeta {
                generate_name: Some("csr-workload-".into()),
                ..Default::default()
            },
            spec: CertificateSigningRequestSpec {
                request: k8s_openapi::ByteString(csr_pem),
                signer_name: signer.into(),
                usages: Some(
                    [
                        "digital signature",
                        "key encipherment",
                        "server auth",
                        "client auth",
                    ]
                    .map(String::from)
                    .to_vec(),
                ),
                expiration_seconds: Some(86400),
                ..Default::default()
            },
            status: None,
        };
        let mut created = api.create(&PostParams::default(), &csr).await.unwrap();
        let name = created.metadata.name.clone().unwrap();
        let msg = format!("CSR ({name}) for the certificate ({id}) is approved");
        created
            .status
            .get_or_insert_with(Default::default)
            .conditions = Some(vec![CertificateSigningRequestCondition {
            type_: "Approved".into(),
            status: "True".into(),
            reason: Some(msg.clone()),
            message: Some(msg),
            ..Default::default()
        }]);
        api.replace_subresource("approval", &name, &PostParams::default(), &created)
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let out = loop {
            let c = api.get(&name).await.unwrap();
            let st = c.status.unwrap_or_default();
            if let Some(cert) = st.certificate {
                break Ok(String::from_utf8(cert.0).unwrap());
            }
            if let Some(f) = st
                .conditions
                .unwrap_or_default()
                .into_iter()
                .find(|c| c.type_ == "Failed" || c.type_ == "Denied")
            {
                break Err(f.message.unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "CSR {name} not signed in 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let _ = api.delete(&name, &DeleteParams::default()).await;
        out
    })
}

#[test]
fn ra_mode_istiod_signs_through_the_csr_api_with_one_ca_and_two() {
    let Some(p) = peers() else { return };
    let env = Env::new();
    let sys = unique("istio-e2e-ra-sys");
    let istiod = format!("system:serviceaccount:{sys}:istiod");
    let (root1, root2) = cas(&env, &["--registration-authority", &istiod]);
    let ns = unique("istio-e2e-ra");
    p.namespace(&sys);
    p.namespace(&ns);
    p.service_account(&sys, "istiod");
    p.service_account(&ns, "rogue");
    // istiod's rights in RA mode (its Helm chart's ClusterRole): create and approve CSRs for
    // its K8S_SIGNER and the per-pod ISTIO_META_CERT_SIGNERs. The same for an ordinary
    // account, to show that it is the CA's registration_authorities that decides.
    let role = format!("{sys}-csr");
    p.apply(&json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": role},
        "rules": [
            {"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests"],
             "verbs": ["create", "get", "list", "watch", "delete"]},
            {"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests/approval"],
             "verbs": ["update"]},
            {"apiGroups": ["certificates.k8s.io"], "resources": ["signers"],
             "resourceNames": ["meshca.io/ca1", "meshca.io/ca2"], "verbs": ["approve"]}]}));
    p.apply(
        &json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": role},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": "istiod", "namespace": sys},
                     {"kind": "ServiceAccount", "name": "rogue", "namespace": ns}]}),
    );
    let istiod_kc = env.path("istiod.kubeconfig");
    p.sa_kubeconfig(&sys, "istiod", &istiod_kc);
    let rogue_kc = env.path("rogue.kubeconfig");
    p.sa_kubeconfig(&ns, "rogue", &rogue_kc);
    let log = env.path("signer.log");
    let _signer = Signer(
        env.cmd(&[
            "--kubeconfig",
            p.kubeconfig.to_str().unwrap(),
            "signer",
            "run",
            "--ca",
            "ca1",
            "--ca",
            "ca2",
            "--leader-elect=false",
            "--metrics-addr",
            "off",
            "--cluster-trust-bundles=false",
            "--bundle-resync",
            "0s",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap(),
    );
    let id = |sa: &str| format!("spiffe://cluster.local/ns/{ns}/sa/{sa}");

    // One CA: K8S_SIGNER=meshca.io/ca1 for workload blue.
    let blue = ra_sign(
        &istiod_kc,
        agent_csr(&env, "blue", &id("blue")),
        "meshca.io/ca1",
        &id("blue"),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}\nsigner log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    let san = verify_leaf(&env, &blue, &root1, "blue");
    assert!(san.contains(&format!("URI:{}", id("blue"))), "{san}");
    // Two CAs: green's pod sets ISTIO_META_CERT_SIGNER=meshca.io/ca2.
    let green = ra_sign(
        &istiod_kc,
        agent_csr(&env, "green", &id("green")),
        "meshca.io/ca2",
        &id("green"),
    )
    .unwrap();
    let san = verify_leaf(&env, &green, &root2, "green");
    assert!(san.contains(&format!("URI:{}", id("green"))), "{san}");
    // Denied twin: an account that is not a registration authority, with the same RBAC,
    // asking for blue's identity.
    let e = ra_sign(
        &rogue_kc,
        agent_csr(&env, "rogue", &id("blue")),
        "meshca.io/ca1",
        &id("blue"),
    )
    .unwrap_err();
    assert!(
        e.contains(&id("blue")) && e.contains(&format!("{ns}:rogue")),
        "{e}"
    );
    p.kubectl(&["delete", "namespace", &ns, &sys, "--wait=false"]);
    p.kubectl(&["delete", "clusterrolebinding,clusterrole", &role]);
}

/// The leaf of a CSR's certificate verifies against `root` (openssl); its SAN line.
fn verify_leaf(env: &Env, cert_pem: &str, root: &Path, name: &str) -> String {
    let leaf = env.path(&format!("{name}.crt"));
    let first = pem::parse_many(cert_pem).unwrap().remove(0);
    std::fs::write(&leaf, pem::encode(&first)).unwrap();
    let o = common::openssl(&[
        "verify",
        "-CAfile",
        root.to_str().unwrap(),
        leaf.to_str().unwrap(),
    ]);
    assert!(text(&o).contains(": OK"), "{}", text(&o));
    let o = common::openssl(&[
        "x509",
        "-in",
        leaf.to_str().unwrap(),
        "-noout",
        "-ext",
        "subjectAltName",
    ]);
    String::from_utf8_lossy(&o.stdout).to_string()
}
