//! End-to-end tests of the Kubernetes front end against a real API server.
//!
//! CI runs them against the control plane of `tests/cluster/cluster.sh` (kube-apiserver and
//! etcd built from their Go modules), which `.ci/run` starts and exports as
//! `MESHCA_E2E_KUBECONFIG`. Against any other cluster:
//! ```text
//! MESHCA_E2E_KUBECONFIG=$HOME/.kube/config cargo test --features meshca/kube --test kube_e2e
//! ```
//! Without `MESHCA_E2E_KUBECONFIG` each test prints why and returns; with `CI=true` it fails.
//! The kubeconfig's user must be allowed to create namespaces, CSRs, approvals, ClusterRoles
//! and bindings (a kind or k3d admin is fine). Each test works in its own namespace
//! `meshca-e2e-<id>` with its own CA `e2e-<id>` (so its signer name `meshca.io/e2e-<id>` is
//! unique cluster-wide) and deletes what it created, CSRs (and ClusterTrustBundles) included.
//! The controller runs in-process, exactly as `meshca signer run` runs it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use meshca::bundle::BundleSpec;
use meshca::ca::{create_root, CaSpec};
use meshca::kube::leader::LeaderConfig;
use meshca::kube::metrics::Metrics;
use meshca::kube::run::{run, CaReload, RunConfig};
use meshca::kube::store::{ca_secret_name, KubeStore};
use meshca::policy::Policy;
use meshca::store::Store;
use serde_json::json;

const LABEL: &str = "meshca-e2e";

fn kubeconfig() -> Option<PathBuf> {
    match std::env::var_os("MESHCA_E2E_KUBECONFIG").filter(|v| !v.is_empty()) {
        Some(p) => Some(PathBuf::from(p)),
        None if std::env::var("CI").as_deref() == Ok("true") => {
            panic!(
                "MESHCA_E2E_KUBECONFIG is not set: with CI=true the e2e tests need the control plane that .ci/run starts (tests/cluster/cluster.sh)"
            )
        }
        None => {
            eprintln!("skipping: set MESHCA_E2E_KUBECONFIG to a cluster's kubeconfig to run the Kubernetes e2e tests");
            None
        }
    }
}

fn unique() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{:x}{}",
        (t as u64) & 0xff_ffff,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

struct Env {
    client: kube::Client,
    ns: String,
    ca: String,
    /// The CA's policy, kept to replace the CA under the same policy.
    policy: Policy,
    store: Arc<KubeStore>,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<meshca::Result<()>>>,
    cluster_objects: Vec<(String, String)>,
}

impl Env {
    /// `policy` gets the test namespace (for `managed_namespaces` and registration
    /// authorities, which name it).
    async fn new(path: &std::path::Path, policy: impl FnOnce(&str) -> Policy) -> Env {
        let client = meshca::kube::client(Some(path)).await.expect("kubeconfig");
        let id = unique();
        let ns = format!("meshca-e2e-{id}");
        let nsapi: Api<Namespace> = Api::all(client.clone());
        nsapi
            .create(
                &PostParams::default(),
                &serde_json::from_value(
                    json!({"metadata": {"name": ns, "labels": {LABEL: "true"}}}),
                )
                .unwrap(),
            )
            .await
            .expect("create namespace");
        let store = Arc::new(KubeStore::new(client.clone(), ns.clone()));
        let ca = format!("e2e-{id}");
        let policy = policy(&ns);
        let mut spec = CaSpec::root(&ca);
        spec.policy = policy.clone();
        let material = create_root(&spec, time::OffsetDateTime::now_utc()).unwrap();
        store.save_ca(&material, false).await.expect("save CA");
        Env {
            client,
            ns,
            ca,
            policy,
            store,
            stops: Vec::new(),
            tasks: Vec::new(),
            cluster_objects: Vec::new(),
        }
    }

    fn signer(&self) -> String {
        format!("meshca.io/{}", self.ca)
    }

    fn config(&self) -> RunConfig {
        let mut c = RunConfig::new(self.store.clone() as Arc<dyn Store>);
        c.cas = Some(vec![self.ca.clone()]);
        c.bundle_resync = Some(Duration::from_secs(1));
        // As `meshca signer run --store kube:<ns>` does.
        c.ca_reload = CaReload::KubeWatch {
            namespace: self.ns.clone(),
        };
        c.ledger = Some(self.store.clone());
        c
    }

    /// A client that authenticates as ServiceAccount `sa` of the test namespace (created
    /// here) with a fresh token, against the same API server.
    async fn sa_client(&self, kc: &std::path::Path, sa: &str) -> kube::Client {
        let sa_api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &self.ns);
        sa_api
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": sa}})).unwrap(),
            )
            .await
            .unwrap();
        let tr = sa_api
            .create_token_request(
                sa,
                &PostParams::default(),
                &serde_json::from_value(json!({"spec": {"expirationSeconds": 600}})).unwrap(),
            )
            .await
            .unwrap();
        // k8s-openapi v1_37: TokenRequestStatus.token is optional.
        let token = tr
            .status
            .unwrap()
            .token
            .expect("TokenRequest returned a token");
        let mut config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(kc).unwrap(),
            &Default::default(),
        )
        .await
        .unwrap();
        config.auth_info = Default::default();
        config.auth_info.token = Some(token.into());
        kube::Client::try_from(config).unwrap()
    }

    /// Starts a controller replica that also manages the test namespace's Secrets.
    fn start_managing_its_namespace(&mut self) {
        let mut cfg = self.config();
        cfg.managed_namespaces = vec![self.ns.clone()];
        self.start(cfg);
    }

    /// Starts a controller replica (as the kubeconfig's user); returns its index.
    fn start(&mut self, cfg: RunConfig) -> usize {
        self.start_as(self.client.clone(), cfg)
    }

    /// Starts a controller replica that talks to the API server through `client`.
    fn start_as(&mut self, client: kube::Client, cfg: RunConfig) -> usize {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        self.tasks.push(tokio::spawn(run(client, cfg, async move {
            let _ = rx.await;
        })));
        self.stops.push(tx);
        self.tasks.len() - 1
    }

    /// Starts the controller as deploy/ runs it: under a token of ServiceAccount
    /// `meshca-signer`, bound only by deploy/'s own RBAC (not admin), rendered into the test
    /// namespace.
    async fn start_deployed(&mut self, kc: &std::path::Path) {
        self.start_deployed_with(kc, |_| {}).await
    }

    /// [`Env::start_deployed`] with a last change to the controller's configuration (e.g.
    /// `--pod-certificates`).
    async fn start_deployed_with(
        &mut self,
        kc: &std::path::Path,
        tweak: impl FnOnce(&mut RunConfig),
    ) {
        let sa = self.deployed_client(kc).await;
        // The controller as the Deployment runs it: store = its namespace, leader election on the
        // Lease deploy/ grants, the namespace managed.
        let mut cfg = self.config();
        let sa_store = Arc::new(KubeStore::new(sa.clone(), self.ns.clone()));
        cfg.store = sa_store.clone();
        cfg.ledger = Some(sa_store);
        cfg.managed_namespaces = vec![self.ns.clone()];
        cfg.leader = Some(LeaderConfig::new(self.ns.clone(), "e2e-0".to_string()));
        tweak(&mut cfg);
        self.start_as(sa, cfg);
    }

    /// A client of ServiceAccount `meshca-signer`, bound only by deploy/'s own RBAC (not
    /// admin), rendered into the test namespace.
    async fn deployed_client(&mut self, kc: &std::path::Path) -> kube::Client {
        let sa = self.sa_client(kc, "meshca-signer").await;
        let cluster_name = format!("{}-signer", self.ns);
        for obj in deploy_rbac(&self.ns, &cluster_name) {
            let kind = obj["kind"].as_str().unwrap();
            let dyn_api = |plural: &str, namespaced: bool| {
                let ar = kube::api::ApiResource {
                    group: "rbac.authorization.k8s.io".into(),
                    version: "v1".into(),
                    api_version: "rbac.authorization.k8s.io/v1".into(),
                    kind: kind.to_string(),
                    plural: plural.into(),
                };
                if namespaced {
                    Api::<kube::api::DynamicObject>::namespaced_with(
                        self.client.clone(),
                        &self.ns,
                        &ar,
                    )
                } else {
                    Api::<kube::api::DynamicObject>::all_with(self.client.clone(), &ar)
                }
            };
            let api = match kind {
                "ClusterRole" => dyn_api("clusterroles", false),
                "ClusterRoleBinding" => dyn_api("clusterrolebindings", false),
                "Role" => dyn_api("roles", true),
                _ => dyn_api("rolebindings", true),
            };
            let o: kube::api::DynamicObject = serde_json::from_value(obj.clone()).unwrap();
            api.create(&PostParams::default(), &o).await.unwrap();
            if kind.starts_with("Cluster") {
                self.cluster_objects
                    .push((kind.to_string(), cluster_name.clone()));
            }
        }
        sa
    }

    fn csrs(&self) -> Api<CertificateSigningRequest> {
        Api::all(self.client.clone())
    }

    async fn create_csr_as(
        &self,
        client: &kube::Client,
        name: &str,
        pem: &str,
        signer: &str,
        exp: Option<i32>,
    ) -> Result<CertificateSigningRequest, kube::Error> {
        let api: Api<CertificateSigningRequest> = Api::all(client.clone());
        let csr: CertificateSigningRequest = serde_json::from_value(json!({
            "apiVersion": "certificates.k8s.io/v1",
            "kind": "CertificateSigningRequest",
            "metadata": {"name": name, "labels": {LABEL: self.ns}},
            "spec": {
                "request": b64(pem.as_bytes()),
                "signerName": signer,
                "usages": ["digital signature", "server auth", "client auth"],
                "expirationSeconds": exp,
            }
        }))
        .unwrap();
        api.create(&PostParams::default(), &csr).await
    }

    async fn create_csr(
        &self,
        name: &str,
        pem: &str,
        signer: &str,
        exp: Option<i32>,
    ) -> CertificateSigningRequest {
        self.create_csr_as(&self.client, name, pem, signer, exp)
            .await
            .expect("create CSR")
    }

    /// Approves or denies CSR `name` as the kubeconfig's user.
    async fn decide(&self, name: &str, ty: &str) {
        self.decide_as(&self.client, name, ty)
            .await
            .expect("approval");
    }

    /// Approves or denies CSR `name` through `client` (a PATCH of `/approval`).
    async fn decide_as(
        &self,
        client: &kube::Client,
        name: &str,
        ty: &str,
    ) -> Result<CertificateSigningRequest, kube::Error> {
        let patch = json!({"status": {"conditions": [{
            "type": ty, "status": "True", "reason": "E2ETest", "message": "decided by the e2e test",
        }]}});
        Api::<CertificateSigningRequest>::all(client.clone())
            .patch_approval(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
    }

    /// A ClusterRole with `rules` bound to ServiceAccount `sa` of the test namespace (deleted
    /// by [`Env::cleanup`]).
    async fn grant(&mut self, sa: &str, rules: serde_json::Value) {
        let name = format!("{}-{sa}", self.ns);
        Api::<k8s_openapi::api::rbac::v1::ClusterRole>::all(self.client.clone())
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": name}, "rules": rules}))
                    .unwrap(),
            )
            .await
            .unwrap();
        self.cluster_objects
            .push(("ClusterRole".into(), name.clone()));
        Api::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>::all(self.client.clone())
            .create(&PostParams::default(), &serde_json::from_value(json!({
                "metadata": {"name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
                "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": self.ns}]
            })).unwrap())
            .await
            .unwrap();
        self.cluster_objects
            .push(("ClusterRoleBinding".into(), name));
    }

    /// Runs `op` until it stops answering 403 (a new RBAC binding may take a moment to apply),
    /// for at most 30 s.
    async fn once_authorized<T, F: std::future::Future<Output = Result<T, kube::Error>>>(
        what: &str,
        op: impl Fn() -> F,
    ) -> T {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match op().await {
                Ok(v) => return v,
                Err(e) if meshca::kube::api_code(&e) == Some(403) && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(500)).await
                }
                Err(e) => panic!("{what}: {e}"),
            }
        }
    }

    async fn wait_csr(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        f: impl Fn(&CertificateSigningRequest) -> bool,
    ) -> CertificateSigningRequest {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.csrs().get(name).await.expect("get CSR");
            if f(&c) {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "CSR {name}: timed out waiting for {what}: {:?}",
                c.status
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn wait_signed(&self, name: &str) -> Vec<u8> {
        let c = self
            .wait_csr(name, "a certificate", Duration::from_secs(60), |c| {
                certificate(c).is_some()
            })
            .await;
        certificate(&c).unwrap()
    }

    async fn cleanup(mut self) {
        for s in self.stops.drain(..) {
            let _ = s.send(());
        }
        for t in self.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(20), t).await;
        }
        let lp = ListParams::default().labels(&format!("{LABEL}={}", self.ns));
        let _ = self
            .csrs()
            .delete_collection(&DeleteParams::default(), &lp)
            .await;
        for (kind, name) in &self.cluster_objects {
            let dp = DeleteParams::default();
            let _ = match kind.as_str() {
                "ClusterRole" => {
                    Api::<k8s_openapi::api::rbac::v1::ClusterRole>::all(self.client.clone())
                        .delete(name, &dp)
                        .await
                        .map(|_| ())
                }
                _ => {
                    Api::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>::all(self.client.clone())
                        .delete(name, &dp)
                        .await
                        .map(|_| ())
                }
            };
        }
        let _ = Api::<Namespace>::all(self.client.clone())
            .delete(&self.ns, &DeleteParams::default())
            .await;
    }
}

fn certificate(c: &CertificateSigningRequest) -> Option<Vec<u8>> {
    c.status
        .as_ref()?
        .certificate
        .as_ref()
        .map(|b| b.0.clone())
        .filter(|b| !b.is_empty())
}

fn condition<'a>(
    c: &'a CertificateSigningRequest,
    ty: &str,
) -> Option<&'a k8s_openapi::api::certificates::v1::CertificateSigningRequestCondition> {
    c.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|x| x.type_ == ty)
}

/// The trust domain of the test CAs (`CaSpec::root`'s default).
const TD: &str = "cluster.local";

/// The SPIFFE ID of ServiceAccount `sa` in namespace `ns`.
fn workload_id(ns: &str, sa: &str) -> String {
    format!("spiffe://{TD}/ns/{ns}/sa/{sa}")
}

/// What a workload needs to ask for certificates: create CSRs and read them back.
fn csr_creator_rules() -> serde_json::Value {
    json!([{"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests"], "verbs": ["create", "get"]}])
}

/// What a registration authority (istiod in RA mode) needs for CA `signer`: create CSRs,
/// approve them (the `/approval` subresource, PATCHed here, PUT by client-go) and `approve`
/// on the signer name, which the API server's CSR approval admission checks.
fn registration_authority_rules(signer: &str) -> serde_json::Value {
    json!([
        {"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests"], "verbs": ["create", "get"]},
        {"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests/approval"], "verbs": ["update", "patch"]},
        {"apiGroups": ["certificates.k8s.io"], "resources": ["signers"], "resourceNames": [signer], "verbs": ["approve"]},
    ])
}

/// The policy of the tests whose CSRs the kubeconfig's user (a person) creates: a person binds
/// no `{ns}`/`{sa}`, so only rules without them match its CSRs; and managed Secrets of the
/// test namespace, which binds `{ns}`.
fn admin_policy(ns: &str) -> Policy {
    Policy {
        allowed_spiffe_ids: vec!["spiffe://cluster.local/ns/app/sa/web".into()],
        allowed_dns: vec![
            "web.app.svc".into(),
            "a.example.com".into(),
            "*.{ns}.svc".into(),
        ],
        managed_namespaces: vec![ns.to_string()],
        ..Policy::default()
    }
}

fn csr_pem(sans: &[&str]) -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = sans
        .iter()
        .map(|s| {
            if s.starts_with("spiffe://") {
                rcgen::SanType::URI(s.to_string().try_into().unwrap())
            } else {
                rcgen::SanType::DnsName(s.to_string().try_into().unwrap())
            }
        })
        .collect();
    p.serialize_request(&key).unwrap().pem().unwrap()
}

fn openssl_verify(ca_pem: &[u8], chain_pem: &[u8]) -> String {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("ca.pem"), ca_pem).unwrap();
    std::fs::write(d.path().join("chain.pem"), chain_pem).unwrap();
    let out = std::process::Command::new("openssl")
        .args([
            "verify",
            "-CAfile",
            "ca.pem",
            "-untrusted",
            "chain.pem",
            "chain.pem",
        ])
        .current_dir(d.path())
        .output()
        .expect("openssl");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn ca_crt_from_secret(env: &Env) -> Vec<u8> {
    let s: Secret = Api::namespaced(env.client.clone(), &env.ns)
        .get(&ca_secret_name(&env.ca))
        .await
        .unwrap();
    s.data.unwrap()["ca.crt"].0.clone()
}

#[tokio::test]
async fn approved_csr_is_signed_and_verifies_with_openssl() {
    let Some(kc) = kubeconfig() else { return };
    let mut env = Env::new(&kc, admin_policy).await;
    env.start(env.config());
    let name = format!("{}-ok", env.ns);
    env.create_csr(
        &name,
        &csr_pem(&["spiffe://cluster.local/ns/app/sa/web", "web.app.svc"]),
        &env.signer(),
        Some(3600),
    )
    .await;
    env.decide(&name, "Approved").await;
    let chain = env.wait_signed(&name).await;
    let ca = ca_crt_from_secret(&env).await;
    let out = openssl_verify(&ca, &chain);
    let certs = meshca::pemutil::parse_certs(&chain, "status.certificate").unwrap();
    let info = meshca::x509::CertInfo::from_der(&certs[0]).unwrap();
    env.cleanup().await;
    assert!(out.contains("chain.pem: OK"), "{out}");
    assert_eq!(info.sans.uri, vec!["spiffe://cluster.local/ns/app/sa/web"]);
    let life = info.not_after - info.not_before;
    assert!(
        life <= time::Duration::seconds(3600 + 600),
        "expirationSeconds honoured: {life}"
    );
}

#[tokio::test]
async fn pending_denied_and_unknown_ca_csrs_are_left_alone() {
    let Some(kc) = kubeconfig() else { return };
    let mut env = Env::new(&kc, admin_policy).await;
    env.start(env.config());
    let pem = csr_pem(&["web.app.svc"]);
    let (pending, denied, unknown, control) = (
        format!("{}-pending", env.ns),
        format!("{}-denied", env.ns),
        format!("{}-unknown", env.ns),
        format!("{}-control", env.ns),
    );
    env.create_csr(&pending, &pem, &env.signer(), None).await;
    env.create_csr(&denied, &pem, &env.signer(), None).await;
    env.decide(&denied, "Denied").await;
    env.create_csr(
        &unknown,
        &pem,
        &format!("meshca.io/{}-nobody", env.ca),
        None,
    )
    .await;
    env.decide(&unknown, "Approved").await;
    // The control CSR, created last, proves the controller has seen the others.
    env.create_csr(&control, &pem, &env.signer(), None).await;
    env.decide(&control, "Approved").await;
    env.wait_signed(&control).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut results = BTreeMap::new();
    for n in [&pending, &denied, &unknown] {
        let c = env.csrs().get(n).await.unwrap();
        results.insert(
            n.clone(),
            (certificate(&c).is_some(), condition(&c, "Failed").is_some()),
        );
    }
    env.cleanup().await;
    for (n, (cert, failed)) in results {
        assert!(
            !cert && !failed,
            "{n} was touched: certificate={cert} failed={failed}"
        );
    }
}

#[tokio::test]
async fn bad_input_fails_or_is_rejected_with_reasons() {
    let Some(kc) = kubeconfig() else { return };
    let mut env = Env::new(&kc, |ns| Policy {
        max_ttl: Duration::from_secs(3600),
        allow_ip_sans: false,
        ..admin_policy(ns)
    })
    .await;
    env.start(env.config());
    // The API server itself refuses a garbage request and expirationSeconds under 600.
    let e = env
        .create_csr_as(
            &env.client,
            &format!("{}-garbage", env.ns),
            "garbage",
            &env.signer(),
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(meshca::kube::api_code(&e), Some(422), "{e}");
    let e = env
        .create_csr_as(
            &env.client,
            &format!("{}-short", env.ns),
            &csr_pem(&["a.example.com"]),
            &env.signer(),
            Some(599),
        )
        .await
        .unwrap_err();
    assert_eq!(meshca::kube::api_code(&e), Some(422), "{e}");
    // ... and a request whose signature does not match (the API server verifies it on create).
    let good = csr_pem(&["a.example.com"]);
    let mut der = pem::parse(&good).unwrap().into_contents();
    let n = der.len();
    der[n - 5] ^= 0x01;
    let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
    let e = env
        .create_csr_as(
            &env.client,
            &format!("{}-tampered", env.ns),
            &tampered,
            &env.signer(),
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(meshca::kube::api_code(&e), Some(422), "{e}");
    // What reaches the signer gets a Failed condition naming the problem.
    let d = tempfile::tempdir().unwrap();
    let rsa = std::process::Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "rsa:1024",
            "-nodes",
            "-subj",
            "/CN=x",
            "-addext",
            "subjectAltName=DNS:a.example.com",
            "-keyout",
        ])
        .arg(d.path().join("k.pem"))
        .output()
        .expect("openssl");
    let cases = [
        (
            "rsa1024",
            String::from_utf8(rsa.stdout).unwrap(),
            None,
            "1024 bits",
        ),
        (
            "wildcard",
            csr_pem(&["*.example.com"]),
            None,
            "wildcard DNS name *.example.com",
        ),
        (
            "ttl",
            csr_pem(&["a.example.com"]),
            Some(7200),
            "over the maximum",
        ),
    ];
    for (suffix, pem, exp, _) in &cases {
        let n = format!("{}-{suffix}", env.ns);
        env.create_csr(&n, pem, &env.signer(), *exp).await;
        env.decide(&n, "Approved").await;
    }
    let mut failures = Vec::new();
    for (suffix, _, _, needle) in &cases {
        let n = format!("{}-{suffix}", env.ns);
        let c = env
            .wait_csr(&n, "a Failed condition", Duration::from_secs(60), |c| {
                condition(c, "Failed").is_some()
            })
            .await;
        let f = condition(&c, "Failed").unwrap();
        failures.push((
            suffix.to_string(),
            f.reason.clone().unwrap_or_default(),
            f.message.clone().unwrap_or_default(),
            needle.to_string(),
            certificate(&c).is_some(),
        ));
    }
    env.cleanup().await;
    for (suffix, reason, message, needle, cert) in failures {
        assert!(!cert, "{suffix}: signed anyway");
        assert!(reason.starts_with("Meshca"), "{suffix}: reason {reason}");
        assert!(
            message.contains(&needle),
            "{suffix}: {message:?} lacks {needle:?}"
        );
    }
}

#[tokio::test]
async fn auto_approve_denies_another_accounts_spiffe_id_and_approves_its_own() {
    let Some(kc) = kubeconfig() else { return };
    // The CA opts in to auto-approval; its rules are the in-cluster defaults (bound to the
    // requester).
    let mut env = Env::new(&kc, |_| Policy {
        auto_approve: true,
        ..Policy::default()
    })
    .await;
    let mut cfg = env.config();
    cfg.signer.auto_approve = true;
    env.start(cfg);
    let (other, own) = blue_asks_for_green_and_itself(&mut env, &kc).await;
    let denied = env
        .wait_csr(&other, "Denied", Duration::from_secs(60), |c| {
            condition(c, "Denied").is_some()
        })
        .await;
    let chain = env.wait_signed(&own).await;
    let approved = env.csrs().get(&own).await.unwrap();
    let ca = ca_crt_from_secret(&env).await;
    env.cleanup().await;
    let d = condition(&denied, "Denied").unwrap();
    assert_eq!(d.reason.as_deref(), Some("MeshcaPolicyDenied"));
    assert!(
        d.message.as_deref().unwrap_or("").contains("/sa/green"),
        "{:?}",
        d.message
    );
    assert!(certificate(&denied).is_none());
    assert_eq!(
        condition(&approved, "Approved").unwrap().reason.as_deref(),
        Some("MeshcaPolicyApproved")
    );
    assert!(openssl_verify(&ca, &chain).contains("OK"));
}

#[tokio::test]
async fn managed_secret_is_filled_and_renewed() {
    let Some(kc) = kubeconfig() else { return };
    // The CA serves the test namespace; its rules are the in-cluster defaults, bound to the
    // Secret's namespace and the service account of the SPIFFE ID it asks for.
    let mut env = Env::new(&kc, |ns| Policy {
        managed_namespaces: vec![ns.to_string()],
        ..Policy::default()
    })
    .await;
    let mut cfg = env.config();
    cfg.managed_namespaces = vec![env.ns.clone()];
    env.start(cfg);
    let api: Api<Secret> = Api::namespaced(env.client.clone(), &env.ns);
    api.create(&PostParams::default(), &serde_json::from_value(json!({
        "metadata": {"name": "web-tls", "labels": {"meshca.io/managed": "true"}, "annotations": {
            "meshca.io/ca": env.ca, "meshca.io/dns-names": format!("web.{}.svc", env.ns), "meshca.io/ttl": "30s",
            "meshca.io/spiffe-id": format!("spiffe://cluster.local/ns/{}/sa/web", env.ns),
        }},
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": "", "tls.key": ""},
    })).unwrap())
    .await
    .unwrap();
    let serial = |s: &Secret| -> Option<String> {
        let crt = s.data.as_ref()?.get("tls.crt")?.0.clone();
        let certs = meshca::pemutil::parse_certs(&crt, "tls.crt").ok()?;
        Some(meshca::x509::CertInfo::from_der(&certs[0]).ok()?.serial)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let (first, s1) = loop {
        let s = api.get("web-tls").await.unwrap();
        if let Some(x) = serial(&s) {
            break (x, s);
        }
        assert!(
            Instant::now() < deadline,
            "managed Secret never filled: {:?}",
            s.metadata.annotations
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // 2/3 of 30 s: renewed after about 20 s.
    let deadline = Instant::now() + Duration::from_secs(60);
    let second = loop {
        let s = api.get("web-tls").await.unwrap();
        if let Some(x) = serial(&s).filter(|x| *x != first) {
            break x;
        }
        assert!(Instant::now() < deadline, "managed Secret never renewed");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let data = s1.data.clone().unwrap();
    let ca = ca_crt_from_secret(&env).await;
    env.cleanup().await;
    assert_ne!(first, second);
    assert_eq!(data["ca.crt"].0, ca);
    assert!(openssl_verify(&ca, &data["tls.crt"].0).contains("OK"));
    let key = meshca::key::PrivateKey::from_pem(
        std::str::from_utf8(&data["tls.key"].0).unwrap(),
        "tls.key",
    )
    .unwrap();
    let certs = meshca::pemutil::parse_certs(&data["tls.crt"].0, "tls.crt").unwrap();
    assert_eq!(
        key.public_key_der(),
        meshca::x509::CertInfo::from_der(&certs[0])
            .unwrap()
            .spki_der
    );
}

#[tokio::test]
async fn bundle_configmap_is_published_and_follows_membership() {
    let Some(kc) = kubeconfig() else { return };
    let mut env = Env::new(&kc, |_| Policy::default()).await;
    let second = format!("{}-b", env.ca);
    let ca2 = create_root(&CaSpec::root(&second), time::OffsetDateTime::now_utc()).unwrap();
    env.store.save_ca(&ca2, false).await.unwrap();
    let name = format!("b{}", unique());
    env.store
        .save_bundle(&BundleSpec {
            name: name.clone(),
            cas: vec![env.ca.clone()],
            file: None,
            namespaces: vec![env.ns.clone()],
        })
        .await
        .unwrap();
    env.start(env.config());
    let api: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.ns);
    let count = |cm: &ConfigMap| {
        cm.data
            .as_ref()
            .and_then(|d| d.get("ca.crt"))
            .map(|p| p.matches("BEGIN CERTIFICATE").count())
            .unwrap_or(0)
    };
    let wait = |want: usize| {
        let api = api.clone();
        let name = name.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Some(cm) = api.get_opt(&format!("{name}-trust-bundle")).await.unwrap() {
                    if count(&cm) == want {
                        return cm;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "bundle ConfigMap never had {want} certificates"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let one = wait(1).await;
    env.store
        .save_bundle(&BundleSpec {
            name: name.clone(),
            cas: vec![env.ca.clone(), second.clone()],
            file: None,
            namespaces: vec![env.ns.clone()],
        })
        .await
        .unwrap();
    let two = wait(2).await;
    let ca = ca_crt_from_secret(&env).await;
    env.cleanup().await;
    assert_eq!(one.data.unwrap()["ca.crt"].as_bytes(), &ca[..]);
    assert_eq!(one.metadata.labels.unwrap()["meshca.io/bundle"], name);
    assert!(two.data.unwrap()["ca.crt"].contains(&String::from_utf8(ca).unwrap()));
}

#[tokio::test]
async fn two_replicas_one_leader_and_no_double_signing_after_the_leader_dies() {
    let Some(kc) = kubeconfig() else { return };
    let mut env = Env::new(&kc, admin_policy).await;
    let lease = format!("{}-lease", env.ca);
    let metrics = [Arc::new(Metrics::new()), Arc::new(Metrics::new())];
    for (i, m) in metrics.iter().enumerate() {
        let mut cfg = env.config();
        let mut lc = LeaderConfig::new(env.ns.clone(), format!("replica-{i}"));
        lc.lease_name = lease.clone();
        cfg.leader = Some(lc);
        cfg.metrics = Some(m.clone());
        env.start(cfg);
    }
    // Exactly one leads, and keeps leading.
    let deadline = Instant::now() + Duration::from_secs(60);
    while metrics.iter().map(|m| m.leader.get()).sum::<i64>() != 1 {
        assert!(Instant::now() < deadline, "no leader elected");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for _ in 0..20 {
        assert_eq!(
            metrics.iter().map(|m| m.leader.get()).sum::<i64>(),
            1,
            "two leaders at once"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leader = metrics.iter().position(|m| m.leader.get() == 1).unwrap();
    let holder = Api::<Lease>::namespaced(env.client.clone(), &env.ns)
        .get(&lease)
        .await
        .unwrap();
    assert_eq!(
        holder.spec.unwrap().holder_identity.as_deref(),
        Some(format!("replica-{leader}").as_str())
    );

    // A burst of approved CSRs; kill the leader (no Lease release) while it works on them.
    let n = 30;
    let pem = csr_pem(&["web.app.svc"]);
    let names: Vec<String> = (0..n).map(|i| format!("{}-ha-{i}", env.ns)).collect();
    for name in &names {
        env.create_csr(name, &pem, &env.signer(), None).await;
        env.decide(name, "Approved").await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while metrics[leader].csrs_signed.get() == 0 {
        assert!(Instant::now() < deadline, "leader signed nothing");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    env.tasks[leader].abort();
    let follower = 1 - leader;
    // Takeover waits for the Lease to expire (15 s). A second burst after the kill, so the
    // follower has work even when the leader finished the first one before it died (the real
    // API server is fast enough for that).
    let deadline = Instant::now() + Duration::from_secs(60);
    while metrics[follower].leader.get() != 1 {
        assert!(Instant::now() < deadline, "the follower did not take over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut names = names;
    for i in n..n + 5 {
        let name = format!("{}-ha-{i}", env.ns);
        env.create_csr(&name, &pem, &env.signer(), None).await;
        env.decide(&name, "Approved").await;
        names.push(name);
    }
    let n = names.len();
    for name in &names {
        env.wait_csr(name, "a certificate", Duration::from_secs(90), |c| {
            certificate(c).is_some()
        })
        .await;
    }
    let signed = [metrics[0].csrs_signed.get(), metrics[1].csrs_signed.get()];
    let follower_led = metrics[follower].leader.get();
    env.cleanup().await;
    assert_eq!(follower_led, 1, "the follower took over");
    // Every CSR has a certificate (checked above). Each accepted write is counted, so more
    // accepted writes than CSRs would mean a CSR was signed twice. (An aborted leader may lose
    // the count of a write the server accepted just before the abort, hence `<=`.)
    assert!(
        signed[0] + signed[1] <= n as u64,
        "a CSR was signed twice: {signed:?}"
    );
    assert!(
        signed[follower] >= 1,
        "the follower signed the rest: {signed:?}"
    );
}

/// The leaf's authority key identifier.
fn aki(chain_pem: &[u8]) -> Option<String> {
    let certs = meshca::pemutil::parse_certs(chain_pem, "chain").ok()?;
    meshca::x509::CertInfo::from_der(&certs[0])
        .ok()?
        .authority_key_id
}

async fn create_managed(env: &Env, name: &str, dns: &str) {
    let api: Api<Secret> = Api::namespaced(env.client.clone(), &env.ns);
    api.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"meshca.io/managed": "true"}, "annotations": {
                "meshca.io/ca": env.ca, "meshca.io/dns-names": dns,
            }},
            "type": "kubernetes.io/tls",
            "data": {"tls.crt": "", "tls.key": ""},
        }))
        .unwrap(),
    )
    .await
    .unwrap();
}

async fn wait_secret(env: &Env, name: &str, what: &str, f: impl Fn(&Secret) -> bool) -> Secret {
    let api: Api<Secret> = Api::namespaced(env.client.clone(), &env.ns);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = api.get(name).await.unwrap();
        if f(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "Secret {name}: timed out waiting for {what}: {:?}",
            s.metadata.annotations
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn filled(s: &Secret) -> bool {
    s.data
        .as_ref()
        .and_then(|d| d.get("tls.crt"))
        .is_some_and(|c| !c.0.is_empty())
}

#[tokio::test]
async fn a_refused_renewal_keeps_the_credential_and_says_why() {
    let Some(kc) = kubeconfig() else { return };
    let mut env = Env::new(&kc, admin_policy).await;
    env.start_managing_its_namespace();
    create_managed(&env, "web-tls", &format!("web.{}.svc", env.ns)).await;
    let before = wait_secret(&env, "web-tls", "a certificate", filled).await;
    // Now ask for something the policy refuses (a wildcard).
    let api: Api<Secret> = Api::namespaced(env.client.clone(), &env.ns);
    api.patch(
        "web-tls",
        &PatchParams::default(),
        &Patch::Merge(&json!({"metadata": {"annotations": {"meshca.io/dns-names": "*.app.svc"}}})),
    )
    .await
    .unwrap();
    let after = wait_secret(&env, "web-tls", "the error annotation", |s| {
        s.metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key("meshca.io/error"))
    })
    .await;
    // A Warning Event on the Secret says why.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(env.client.clone(), &env.ns);
    let deadline = Instant::now() + Duration::from_secs(30);
    let ev = loop {
        let list = events.list(&ListParams::default()).await.unwrap();
        if let Some(e) = list.items.into_iter().find(|e| {
            e.reason.as_deref() == Some("IssuanceRefused")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("web-tls")
        }) {
            break e;
        }
        assert!(Instant::now() < deadline, "no IssuanceRefused Event");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // Field ownership: the data is meshca-managed's, the annotation meshca-managed-error's.
    let managers: Vec<String> = after
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect();
    env.cleanup().await;
    assert_eq!(
        before.data, after.data,
        "tls.crt, tls.key and ca.crt survive byte for byte"
    );
    let msg = &after.metadata.annotations.unwrap()["meshca.io/error"];
    assert!(msg.contains("*.app.svc"), "{msg}");
    assert!(ev.note.unwrap_or_default().contains("*.app.svc"));
    assert!(
        managers.iter().any(|m| m == "meshca-managed"),
        "{managers:?}"
    );
    assert!(
        managers.iter().any(|m| m == "meshca-managed-error"),
        "{managers:?}"
    );
}

#[tokio::test]
async fn a_replaced_ca_is_used_without_a_restart() {
    let Some(kc) = kubeconfig() else { return };
    let mut env = Env::new(&kc, admin_policy).await;
    env.start_managing_its_namespace();
    let old = env.store.load_ca(&env.ca).await.unwrap();
    let old_ski = old.info().unwrap().subject_key_id;
    let first = format!("{}-before", env.ns);
    env.create_csr(&first, &csr_pem(&["a.example.com"]), &env.signer(), None)
        .await;
    env.decide(&first, "Approved").await;
    assert_eq!(aki(&env.wait_signed(&first).await), old_ski);
    create_managed(&env, "web-tls", &format!("web.{}.svc", env.ns)).await;
    let s1 = wait_secret(&env, "web-tls", "a certificate", filled).await;
    assert_eq!(aki(&s1.data.unwrap()["tls.crt"].0), old_ski);

    // Replace the CA under the same name (same DN and policy, new key), as `init --force` does.
    let mut spec = CaSpec::root(&env.ca);
    spec.policy = env.policy.clone();
    let new = create_root(&spec, time::OffsetDateTime::now_utc()).unwrap();
    let new_ski = new.info().unwrap().subject_key_id;
    assert_ne!(new_ski, old_ski);
    env.store.save_ca(&new, true).await.unwrap();

    // The controller follows the CA Secret through its watch: the managed Secret is re-issued
    // by the new CA (AKI against the new SKI) with no restart ...
    let s2 = wait_secret(&env, "web-tls", "re-issuance by the new CA", |s| {
        s.data
            .as_ref()
            .and_then(|d| d.get("tls.crt"))
            .is_some_and(|c| aki(&c.0) == new_ski)
    })
    .await;
    // ... and from then on CSRs are signed with the new key. (A CSR created in the instant
    // between the replace and the watch event reaching the controller may still be signed by
    // the old CA, which stays valid: the API server orders no events across resources. The
    // real server showed that window; the mock API answered in order.)
    let second = format!("{}-after", env.ns);
    env.create_csr(&second, &csr_pem(&["a.example.com"]), &env.signer(), None)
        .await;
    env.decide(&second, "Approved").await;
    let chain = env.wait_signed(&second).await;
    // Both certificates are in the ledger with their requester and object (the ledger is
    // written in batches: waited for).
    let deadline = Instant::now() + Duration::from_secs(10);
    let ledger = loop {
        let l = env.store.ledger().await.unwrap();
        if l.len() >= 3 || Instant::now() > deadline {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    env.cleanup().await;
    assert_eq!(aki(&chain), new_ski);
    assert!(s2.data.is_some());
    assert!(ledger.len() >= 3, "{ledger:?}");
}

/// deploy/base's Role and ClusterRole, and examples/demo-rbac.yaml's Role, rendered for the
/// test namespace (`meshca` -> the test namespace, `demo` -> the test namespace, cluster-wide
/// names made unique).
fn deploy_rbac(ns: &str, unique_name: &str) -> Vec<serde_json::Value> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    for f in [
        "deploy/base/clusterrole.yaml",
        "deploy/base/role.yaml",
        "deploy/examples/demo-rbac.yaml",
    ] {
        let text = std::fs::read_to_string(root.join(f)).unwrap();
        let docs: Vec<serde_json::Value> = serde_saphyr::from_str_multiple(&text).unwrap();
        for mut j in docs {
            if j.is_null() {
                continue;
            }
            let kind = j["kind"].as_str().unwrap().to_string();
            if kind.starts_with("Cluster") {
                j["metadata"]["name"] = json!(unique_name);
                if kind == "ClusterRoleBinding" {
                    j["roleRef"]["name"] = json!(unique_name);
                }
            } else {
                j["metadata"]["namespace"] = json!(ns);
                // Two Roles land in one namespace here: keep their names apart.
                let n = format!("{}-{}", j["metadata"]["name"].as_str().unwrap(), out.len());
                if kind == "RoleBinding" {
                    j["roleRef"]["name"] = json!(format!(
                        "{}-{}",
                        j["roleRef"]["name"].as_str().unwrap(),
                        out.len() - 1
                    ));
                }
                j["metadata"]["name"] = json!(n);
            }
            for sub in j["subjects"].as_array_mut().into_iter().flatten() {
                sub["namespace"] = json!(ns);
            }
            out.push(j);
        }
    }
    out
}

#[tokio::test]
async fn the_controller_runs_under_its_own_service_account_with_the_deploy_rbac() {
    let Some(kc) = kubeconfig() else { return };
    let mut env = Env::new(&kc, admin_policy).await;
    env.start_deployed(&kc).await;
    let name = format!("{}-sa", env.ns);
    env.create_csr(&name, &csr_pem(&["a.example.com"]), &env.signer(), None)
        .await;
    env.decide(&name, "Approved").await;
    let chain = env.wait_signed(&name).await;
    create_managed(&env, "web-tls", &format!("web.{}.svc", env.ns)).await;
    wait_secret(&env, "web-tls", "a certificate", filled).await;
    // The ledger (ConfigMaps in the store namespace) was written under the same account.
    let deadline = Instant::now() + Duration::from_secs(30);
    let ledger = loop {
        let l = env.store.ledger().await.unwrap();
        if l.len() >= 2 {
            break l;
        }
        assert!(Instant::now() < deadline, "ledger not written: {l:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let lease: Lease = Api::namespaced(env.client.clone(), &env.ns)
        .get("meshca-signer")
        .await
        .unwrap();
    env.cleanup().await;
    assert!(!chain.is_empty());
    assert!(ledger.len() >= 2);
    assert_eq!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some("e2e-0")
    );
}

/// ServiceAccount `blue` of the test namespace, allowed to create CSRs, creates one for
/// ServiceAccount `green`'s SPIFFE ID and one for its own (with `blue.<ns>.svc`) under its own
/// token. Returns the two CSR names `(other, own)`.
async fn blue_asks_for_green_and_itself(env: &mut Env, kc: &std::path::Path) -> (String, String) {
    let blue = env.sa_client(kc, "blue").await;
    env.grant("blue", csr_creator_rules()).await;
    let other = format!("{}-other", env.ns);
    let own = format!("{}-own", env.ns);
    let other_pem = csr_pem(&[&workload_id(&env.ns, "green")]);
    let own_pem = csr_pem(&[
        &workload_id(&env.ns, "blue"),
        &format!("blue.{}.svc", env.ns),
    ]);
    let signer = env.signer();
    let env = &*env;
    Env::once_authorized("create CSR as blue", || {
        env.create_csr_as(&blue, &other, &other_pem, &signer, None)
    })
    .await;
    env.create_csr_as(&blue, &own, &own_pem, &signer, None)
        .await
        .expect("create CSR as blue");
    (other, own)
}

/// `spec.username` of CSR `c`, as the API server set it.
fn username(c: &CertificateSigningRequest) -> String {
    c.spec.username.clone().unwrap_or_default()
}

/// The URI SANs of the leaf of `chain_pem`.
fn leaf_uris(chain_pem: &[u8]) -> Vec<String> {
    let certs = meshca::pemutil::parse_certs(chain_pem, "status.certificate").unwrap();
    meshca::x509::CertInfo::from_der(&certs[0])
        .unwrap()
        .sans
        .uri
}

/// CSR `name`, once it has a Failed condition.
async fn wait_failed(env: &Env, name: &str) -> CertificateSigningRequest {
    env.wait_csr(name, "a Failed condition", Duration::from_secs(60), |c| {
        condition(c, "Failed").is_some()
    })
    .await
}

/// `c` failed as the policy denied it, with a message naming each of `needles`, and has no
/// certificate.
fn assert_policy_denied(c: &CertificateSigningRequest, needles: &[&str]) {
    let f = condition(c, "Failed").expect("a Failed condition");
    let message = f.message.as_deref().unwrap_or_default();
    assert_eq!(f.reason.as_deref(), Some("MeshcaPolicyDenied"), "{message}");
    for n in needles {
        assert!(message.contains(n), "{message:?} does not name {n:?}");
    }
    assert!(certificate(c).is_none(), "signed anyway: {message}");
}

#[tokio::test]
async fn the_signer_binds_a_service_accounts_csr_to_its_own_id_even_when_a_person_approved_it() {
    let Some(kc) = kubeconfig() else { return };
    // The in-cluster default rules (bound to the requester), no auto-approval: a person
    // approves, the signer still decides for `spec.username`.
    let mut env = Env::new(&kc, |_| Policy::default()).await;
    env.start_deployed(&kc).await;
    let (other, own) = blue_asks_for_green_and_itself(&mut env, &kc).await;
    let by_admin = format!("{}-admin", env.ns);
    let green_id = workload_id(&env.ns, "green");
    let blue_id = workload_id(&env.ns, "blue");
    // The kubeconfig's user (a person) asking for blue's ID binds no {ns}/{sa}.
    env.create_csr(&by_admin, &csr_pem(&[&blue_id]), &env.signer(), None)
        .await;
    for n in [&other, &own, &by_admin] {
        env.decide(n, "Approved").await;
    }
    let denied = wait_failed(&env, &other).await;
    let chain = env.wait_signed(&own).await;
    let signed = env.csrs().get(&own).await.unwrap();
    let admin_csr = wait_failed(&env, &by_admin).await;
    let ca = ca_crt_from_secret(&env).await;
    let blue_user = format!("system:serviceaccount:{}:blue", env.ns);
    env.cleanup().await;
    // The API server, not the client, set the requester.
    assert_eq!(username(&denied), blue_user);
    assert_eq!(username(&signed), blue_user);
    assert_ne!(username(&admin_csr), blue_user);
    // The denial names the ID and the requester.
    assert_policy_denied(&denied, &[&green_id, &blue_user]);
    assert_eq!(leaf_uris(&chain), vec![blue_id.clone()]);
    assert!(openssl_verify(&ca, &chain).contains("chain.pem: OK"));
    assert_policy_denied(&admin_csr, &[&blue_id]);
}

#[tokio::test]
async fn a_registration_authority_gets_workload_ids_of_its_trust_domain_and_an_unlisted_account_does_not(
) {
    let Some(kc) = kubeconfig() else { return };
    // istiod in RA mode: it creates and approves CSRs for the workloads it serves.
    let mut env = Env::new(&kc, |ns| Policy {
        registration_authorities: vec![format!("system:serviceaccount:{ns}:istiod")],
        ..Policy::default()
    })
    .await;
    env.start_deployed(&kc).await;
    let istiod = env.sa_client(&kc, "istiod").await;
    let rogue = env.sa_client(&kc, "rogue").await;
    let rules = registration_authority_rules(&env.signer());
    env.grant("istiod", rules.clone()).await;
    env.grant("rogue", rules).await;
    let web_id = workload_id(&env.ns, "web");
    let foreign_id = format!("spiffe://other.example/ns/{}/sa/web", env.ns);
    let cases = [
        (
            format!("{}-ra", env.ns),
            &istiod,
            csr_pem(&[&web_id, &format!("web.{}.svc", env.ns)]),
        ),
        (
            format!("{}-ra-foreign", env.ns),
            &istiod,
            csr_pem(&[&foreign_id]),
        ),
        (format!("{}-rogue", env.ns), &rogue, csr_pem(&[&web_id])),
    ];
    let signer = env.signer();
    for (name, client, pem) in &cases {
        Env::once_authorized("create CSR as the RA", || {
            env.create_csr_as(client, name, pem, &signer, None)
        })
        .await;
        // Each approves its own CSR: the API server lets it (it has `approve` on the signer);
        // whether it gets a certificate is the signer's decision.
        Env::once_authorized("approve as the RA", || {
            env.decide_as(client, name, "Approved")
        })
        .await;
    }
    let chain = env.wait_signed(&cases[0].0).await;
    let signed = env.csrs().get(&cases[0].0).await.unwrap();
    let foreign = wait_failed(&env, &cases[1].0).await;
    let rogue_csr = wait_failed(&env, &cases[2].0).await;
    let ca = ca_crt_from_secret(&env).await;
    let (istiod_user, rogue_user) = (
        format!("system:serviceaccount:{}:istiod", env.ns),
        format!("system:serviceaccount:{}:rogue", env.ns),
    );
    env.cleanup().await;
    assert_eq!(username(&signed), istiod_user);
    assert!(condition(&signed, "Approved").is_some());
    assert_eq!(leaf_uris(&chain), vec![web_id.clone()]);
    assert!(openssl_verify(&ca, &chain).contains("chain.pem: OK"));
    assert_eq!(username(&foreign), istiod_user);
    assert_policy_denied(&foreign, &[&foreign_id, "outside the CA's trust domain"]);
    assert_eq!(username(&rogue_csr), rogue_user);
    assert_policy_denied(&rogue_csr, &[&web_id, &rogue_user]);
}

/// The ClusterTrustBundle API of the cluster, or `None` (printed: the feature gate
/// `ClusterTrustBundle` and the runtime config for `certificates.k8s.io/v1beta1` are off).
async fn ctb_api(client: &kube::Client) -> Option<kube::api::ApiResource> {
    let ar = meshca::kube::trust_bundles::detect(client)
        .await
        .expect("discovery");
    if ar.is_none() {
        eprintln!("skipping: the cluster serves no ClusterTrustBundle API (enable the ClusterTrustBundle feature gate and certificates.k8s.io/v1beta1)");
    }
    ar
}

/// The roots (DER) in ClusterTrustBundle `name`, if it exists.
async fn ctb_roots(
    client: &kube::Client,
    ar: &kube::api::ApiResource,
    name: &str,
) -> Option<(String, Vec<Vec<u8>>)> {
    let api: Api<kube::api::DynamicObject> = Api::all_with(client.clone(), ar);
    let o = api.get_opt(name).await.expect("get ClusterTrustBundle")?;
    let signer = o.data["spec"]["signerName"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let pem = o.data["spec"]["trustBundle"].as_str().unwrap_or("");
    let roots = meshca::pemutil::parse_certs(pem.as_bytes(), name)
        .unwrap()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    Some((signer, roots))
}

async fn delete_ctbs(client: &kube::Client, ar: &kube::api::ApiResource, ca: &str) {
    let api: Api<kube::api::DynamicObject> = Api::all_with(client.clone(), ar);
    let _ = api
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels(&format!("meshca.io/ca={ca}")),
        )
        .await;
}

/// Under the controller's ServiceAccount with deploy/'s RBAC: `bundle publish
/// --cluster-trust-bundle` (the library call it makes) creates `meshca.io:<ca>:cli` with the
/// CA's root; the signer's sync (suffix `roots`) creates `meshca.io:<ca>:roots` and prunes the
/// `cli` one; the kube-csr sidecar's reader, under a workload account with the sds-kube-csr
/// RBAC, reads the root, and after `ca rotate --phase prepare` (local store) the bundle and the
/// reader hold both roots.
#[tokio::test]
async fn cluster_trust_bundle_is_published_and_holds_both_roots_during_a_rotation() {
    use meshca::kube::trust_bundles as ctb;
    let Some(kc) = kubeconfig() else { return };
    let mut env = Env::new(&kc, admin_policy).await;
    let Some(ar) = ctb_api(&env.client).await else {
        env.cleanup().await;
        return;
    };
    let sa = env.deployed_client(&kc).await;
    // The CAs in a local home (rotation runs there); the cluster only sees the bundles.
    let home = tempfile::tempdir().unwrap();
    let local = Arc::new(meshca::store::LocalStore::create(home.path().join("h")).unwrap());
    let root = create_root(&CaSpec::root(&env.ca), time::OffsetDateTime::now_utc()).unwrap();
    local.save_ca(&root, false).await.unwrap();

    // Publish as `meshca bundle publish --cluster-trust-bundle --suffix cli` does.
    let cli_name = ctb::bundle_name(&env.ca, "cli");
    let want = ctb::desired(
        &env.ca,
        &meshca::store::ca_anchors(local.as_ref(), &env.ca)
            .await
            .unwrap(),
        "cli",
    )
    .unwrap();
    // A new binding may take a moment to apply: retry 403s for up to 30 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    let r = loop {
        match ctb::sync(&sa, &ar, std::slice::from_ref(&want), None).await {
            Ok(r) => break r,
            Err(e) if e.to_string().contains("(403") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            Err(e) => panic!("publish as meshca-signer: {e}"),
        }
    };
    assert_eq!(r.applied, vec![cli_name.clone()]);
    let (signer, roots) = ctb_roots(&env.client, &ar, &cli_name).await.unwrap();
    assert_eq!(signer, env.signer());
    assert_eq!(roots, vec![root.cert.as_ref().to_vec()]);

    // The signer under the same account: its own suffix, and the old one pruned.
    let mut cfg = RunConfig::new(local.clone() as Arc<dyn Store>);
    cfg.cas = Some(vec![env.ca.clone()]);
    cfg.bundle_resync = Some(Duration::from_secs(1));
    cfg.ca_reload = CaReload::Poll(Duration::from_secs(1));
    cfg.cluster_trust_bundles = Some("roots".into());
    cfg.ledger = None;
    env.start_as(sa.clone(), cfg);
    let name = ctb::bundle_name(&env.ca, "roots");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let have = ctb_roots(&env.client, &ar, &name).await;
        let old = ctb_roots(&env.client, &ar, &cli_name).await;
        if let (Some((_, roots)), None) = (&have, &old) {
            assert_eq!(roots, &vec![root.cert.as_ref().to_vec()]);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no {name} or {cli_name} not pruned"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The kube-csr sidecar's reader (`sds serve --source kube-csr --cluster-trust-bundle`),
    // under a workload account with exactly deploy/components/sds-kube-csr's RBAC, sees it.
    let web = env.sa_client(&kc, "web").await;
    env.grant(
        "web",
        cluster_role_rules("deploy/components/sds-kube-csr/rbac.yaml"),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let reader = loop {
        match meshca::kube::trust_bundle_reader::TrustBundleReader::start(
            web.clone(),
            &env.signer(),
            None,
            Duration::from_secs(10),
        )
        .await
        {
            Ok(r) => break r,
            // The new binding may take a moment to apply.
            Err(e) if Instant::now() < deadline => {
                eprintln!("retrying the reader: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            Err(e) => panic!("reader as {}/web: {e}", env.ns),
        }
    };
    let anchors = |r: &meshca::kube::trust_bundle_reader::TrustBundleReader| {
        r.anchors()
            .map(|a| a.iter().map(|c| c.as_ref().to_vec()).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert_eq!(anchors(&reader), vec![root.cert.as_ref().to_vec()]);

    // Rotation prepare: the next root joins, the active one stays.
    meshca::store::rotate::run_phase(
        local.as_ref(),
        &env.ca,
        meshca::rotation::Request::Prepare,
        &Default::default(),
        time::OffsetDateTime::now_utc(),
    )
    .await
    .unwrap();
    let next = local
        .load_rotation_cas(&env.ca, meshca::store::Slot::Next)
        .await
        .unwrap();
    let want = vec![root.cert.as_ref().to_vec(), next[0].cert.as_ref().to_vec()];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, roots) = ctb_roots(&env.client, &ar, &name).await.unwrap();
        if roots == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{name} holds {} roots",
            roots.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The sidecar's reader follows through its watch: both roots, in the bundle's order.
    let deadline = Instant::now() + Duration::from_secs(30);
    while anchors(&reader) != want {
        assert!(
            Instant::now() < deadline,
            "the reader holds {} anchors",
            anchors(&reader).len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(reader);
    let ca = env.ca.clone();
    env.cleanup().await;
    delete_ctbs(&meshca::kube::client(Some(&kc)).await.unwrap(), &ar, &ca).await;
}

/// The ClusterTrustBundleAttest admission plugin: an account with every right on
/// `clustertrustbundles` but no `attest` on `signers` cannot write `meshca.io:<ca>:<suffix>`
/// (403 naming the signer), which is why deploy/ grants `attest` on `meshca.io/*`.
#[tokio::test]
async fn writing_a_cluster_trust_bundle_needs_attest_on_the_signer() {
    use meshca::kube::trust_bundles as ctb;
    let Some(kc) = kubeconfig() else { return };
    let mut env = Env::new(&kc, admin_policy).await;
    let Some(ar) = ctb_api(&env.client).await else {
        env.cleanup().await;
        return;
    };
    let rogue = env.sa_client(&kc, "no-attest").await;
    env.grant(
        "no-attest",
        json!([{"apiGroups": ["certificates.k8s.io"], "resources": ["clustertrustbundles"],
                "verbs": ["get", "list", "create", "update", "patch", "delete"]}]),
    )
    .await;
    let root = create_root(&CaSpec::root(&env.ca), time::OffsetDateTime::now_utc()).unwrap();
    let want = ctb::desired(&env.ca, std::slice::from_ref(&root.cert), "roots").unwrap();
    // Wait for the binding to apply (the list is allowed by it), then the write is refused.
    let deadline = Instant::now() + Duration::from_secs(30);
    let e = loop {
        match ctb::sync(&rogue, &ar, std::slice::from_ref(&want), None).await {
            Err(e) if e.to_string().contains("listing") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            Err(e) => break e.to_string(),
            Ok(r) => panic!("written without attest: {r:?}"),
        }
    };
    assert!(e.contains("403"), "{e}");
    assert!(e.contains(&env.signer()), "{e}");
    let ca = env.ca.clone();
    env.cleanup().await;
    delete_ctbs(&meshca::kube::client(Some(&kc)).await.unwrap(), &ar, &ca).await;
}

fn pem_count(b: &[u8]) -> usize {
    String::from_utf8_lossy(b)
        .matches("BEGIN CERTIFICATE")
        .count()
}

async fn wait_bundle_roots(env: &Env, name: &str, roots: usize) -> String {
    let api: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.ns);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pem = api
            .get_opt(name)
            .await
            .unwrap()
            .and_then(|c| c.data)
            .and_then(|d| d.get("ca.crt").cloned())
            .unwrap_or_default();
        if pem_count(pem.as_bytes()) == roots {
            return pem;
        }
        assert!(
            Instant::now() < deadline,
            "ConfigMap {name}: timed out waiting for {roots} roots: {pem}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Issue 10's rotation scenario over the kube store, as far as it goes without Envoy in the
/// cluster. The controller runs under its deploy/ ServiceAccount and RBAC; the phases run
/// with the kubeconfig's (operator) credentials, as `meshca ca rotate --store kube:<ns>` does.
#[tokio::test]
async fn ca_rotation_over_the_kube_store_without_a_signer_restart() {
    use meshca::rotation::Request;
    use meshca::store::rotate::{run_phase, RotateOptions};
    let Some(kc) = kubeconfig() else { return };
    let mut env = Env::new(&kc, admin_policy).await;
    let bundle = BundleSpec {
        name: "mesh".into(),
        cas: vec![env.ca.clone()],
        file: None,
        namespaces: vec![env.ns.clone()],
    };
    env.store.save_bundle(&bundle).await.unwrap();
    env.start_deployed(&kc).await;
    let now = time::OffsetDateTime::now_utc;
    let old = env.store.load_ca(&env.ca).await.unwrap();
    let old_ski = old.info().unwrap().subject_key_id;

    // Before: a managed Secret and a CSR from the old CA, both in the ledger.
    create_managed(&env, "web-tls", &format!("web.{}.svc", env.ns)).await;
    let s1 = wait_secret(&env, "web-tls", "a certificate", filled).await;
    let s1_data_crt = s1.data.unwrap()["tls.crt"].0.clone();
    assert_eq!(aki(&s1_data_crt), old_ski);
    let before = format!("{}-before", env.ns);
    env.create_csr(&before, &csr_pem(&["a.example.com"]), &env.signer(), None)
        .await;
    env.decide(&before, "Approved").await;
    let old_chain = env.wait_signed(&before).await;
    let old_serial = meshca::x509::CertInfo::from_der(
        &meshca::pemutil::parse_certs(&old_chain, "chain").unwrap()[0],
    )
    .unwrap()
    .serial_hex();
    wait_bundle_roots(&env, "mesh-trust-bundle", 1).await;

    // prepare: the bundle ConfigMap holds both roots; the old CA still signs.
    let o = RotateOptions::default();
    run_phase(env.store.as_ref(), &env.ca, Request::Prepare, &o, now())
        .await
        .unwrap();
    let both = wait_bundle_roots(&env, "mesh-trust-bundle", 2).await;
    // The managed Secret's ca.crt gains the new root too, its credential untouched.
    let s_prep = wait_secret(&env, "web-tls", "both roots in ca.crt", |s| {
        s.data
            .as_ref()
            .and_then(|d| d.get("ca.crt"))
            .is_some_and(|c| pem_count(&c.0) == 2)
    })
    .await;
    let s1_crt = s1_data_crt.clone();
    // The signer's own bundle sync (deploy/ RBAC) reads the rotation too: delete the
    // ConfigMap and it comes back with both roots.
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.ns);
    cms.delete("mesh-trust-bundle", &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(
        wait_bundle_roots(&env, "mesh-trust-bundle", 2).await,
        both,
        "re-published by the signer"
    );

    // activate --now: no restart; the managed Secret is re-issued by the new CA and a CSR
    // signed from now on chains to it.
    let act = RotateOptions {
        renew_now: true,
        ..Default::default()
    };
    run_phase(env.store.as_ref(), &env.ca, Request::Activate, &act, now())
        .await
        .unwrap();
    let new = env.store.load_ca(&env.ca).await.unwrap();
    let new_ski = new.info().unwrap().subject_key_id;
    assert_ne!(new_ski, old_ski);
    let s2 = wait_secret(&env, "web-tls", "re-issuance by the new CA", |s| {
        s.data
            .as_ref()
            .and_then(|d| d.get("tls.crt"))
            .is_some_and(|c| aki(&c.0) == new_ski)
    })
    .await;
    let after = format!("{}-after", env.ns);
    env.create_csr(&after, &csr_pem(&["a.example.com"]), &env.signer(), None)
        .await;
    env.decide(&after, "Approved").await;
    let new_chain = env.wait_signed(&after).await;
    let new_root = meshca::pemutil::certs_to_pem([new.root()]);

    // prune: refused while the old CA's certificates are in the ledger, listing them.
    let refused = run_phase(env.store.as_ref(), &env.ca, Request::Prune, &o, now())
        .await
        .map(|_| ())
        .unwrap_err()
        .to_string();
    let forced = RotateOptions {
        force: true,
        ..Default::default()
    };
    let r = run_phase(env.store.as_ref(), &env.ca, Request::Prune, &forced, now())
        .await
        .unwrap();
    let one = wait_bundle_roots(&env, "mesh-trust-bundle", 1).await;
    wait_secret(&env, "web-tls", "one root in ca.crt after prune", |s| {
        s.data
            .as_ref()
            .and_then(|d| d.get("ca.crt"))
            .is_some_and(|c| pem_count(&c.0) == 1)
    })
    .await;
    let left = env.store.list_rotations().await.unwrap();
    env.cleanup().await;
    assert_eq!(aki(&new_chain), new_ski);
    assert!(
        openssl_verify(new_root.as_bytes(), &new_chain).contains("OK"),
        "the new CSR chains to the new root"
    );
    assert!(s2.data.is_some());
    assert_eq!(
        s_prep.data.unwrap()["tls.crt"].0,
        s1_crt,
        "prepare changed only ca.crt"
    );
    assert!(
        refused.contains("prune refused") && refused.contains(&old_serial),
        "{refused}"
    );
    assert!(!r.forced_past.is_empty());
    assert_eq!(
        one,
        meshca::bundle::to_pem(std::slice::from_ref(new.root())),
        "only the new root is left"
    );
    assert!(left.is_empty());
}

// ---------------------------------------------------------------------------------------
// PodCertificateRequests (certificates.k8s.io/v1beta1, Kubernetes 1.35 with the
// PodCertificateRequest feature gate and the v1beta1 API enabled). No kubelet runs here: the
// test creates the requests itself, as the kubelet would, with a real proof of possession
// over the UID of a real Pod. NodeRestriction only restricts node identities, so the
// kubeconfig's user (an admin) may create them.

/// Whether the cluster serves PodCertificateRequests; otherwise skip (fail under CI).
async fn pcr_served(env: &Env) -> bool {
    let served = meshca::kube::pcr::served(&env.client)
        .await
        .expect("discovery");
    if !served {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the e2e cluster serves no PodCertificateRequest API (v1, v1beta1 or v1alpha1)"
        );
        eprintln!("skipping: the cluster serves no PodCertificateRequest API (v1 on 1.37; before it --feature-gates=PodCertificateRequest=true and --runtime-config for v1beta1 or v1alpha1)");
    }
    served
}

/// Grants deploy/components/pod-certificates' ClusterRole to the test namespace's
/// `meshca-signer` (renamed to be unique; deleted by cleanup).
async fn grant_pod_certificates_component(env: &mut Env) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text =
        std::fs::read_to_string(root.join("deploy/components/pod-certificates/clusterrole.yaml"))
            .unwrap();
    let docs: Vec<serde_json::Value> = serde_saphyr::from_str_multiple(&text).unwrap();
    let name = format!("{}-pcr", env.ns);
    for mut j in docs.into_iter().filter(|d| !d.is_null()) {
        j["metadata"]["name"] = json!(name);
        if j["kind"] == "ClusterRoleBinding" {
            j["roleRef"]["name"] = json!(name);
            for sub in j["subjects"].as_array_mut().into_iter().flatten() {
                sub["namespace"] = json!(env.ns);
            }
            Api::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>::all(env.client.clone())
                .create(&PostParams::default(), &serde_json::from_value(j).unwrap())
                .await
                .unwrap();
            env.cluster_objects
                .push(("ClusterRoleBinding".into(), name.clone()));
        } else {
            Api::<k8s_openapi::api::rbac::v1::ClusterRole>::all(env.client.clone())
                .create(&PostParams::default(), &serde_json::from_value(j).unwrap())
                .await
                .unwrap();
            env.cluster_objects
                .push(("ClusterRole".into(), name.clone()));
        }
    }
}

/// A ServiceAccount `sa` and a Pod running as it (bound to a node that does not exist, so it
/// never starts); returns (pod UID, ServiceAccount UID).
async fn pod_as(env: &Env, pod: &str, sa: &str) -> (String, String) {
    let sa_api: Api<ServiceAccount> = Api::namespaced(env.client.clone(), &env.ns);
    let acct = match sa_api.get_opt(sa).await.unwrap() {
        Some(a) => a,
        None => sa_api
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": sa}})).unwrap(),
            )
            .await
            .unwrap(),
    };
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(env.client.clone(), &env.ns);
    let p = pods
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": pod},
                "spec": {"serviceAccountName": sa, "nodeName": "meshca-e2e-no-such-node",
                         "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}]}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    (p.metadata.uid.unwrap(), acct.metadata.uid.unwrap())
}

/// The key and proof of a test PodCertificateRequest.
#[derive(Clone, Copy, PartialEq)]
enum PcrKey {
    /// A P-256 key with a valid proof, as the kubelet makes it.
    P256,
    /// A P-521 key (the API server accepts it; meshca does not issue for it).
    P521,
    /// A P-256 key whose proof does not verify: over another UID (v1alpha1/v1beta1), or a
    /// stub CSR with a broken signature (v1).
    BadProof,
}

/// The PodCertificateRequest API the cluster serves first (v1 on 1.37, v1alpha1 on 1.34).
async fn pcr_resource(env: &Env) -> kube::api::ApiResource {
    meshca::kube::pcr::discover(&env.client)
        .await
        .unwrap()
        .expect("PodCertificateRequests are served")
}

/// Creates a PodCertificateRequest for `signer` as the kubelet would for `pod`, through the
/// version the cluster serves: v1 with a `stubPKCS10Request` (the CSR's signature proves
/// possession), older versions with `pkixPublicKey` and a `proofOfPossession` over the pod's
/// UID. Returns the request and the key's SubjectPublicKeyInfo.
#[allow(clippy::too_many_arguments)]
async fn create_pcr_for(
    env: &Env,
    signer: &str,
    name: &str,
    pod: &str,
    sa: &str,
    uids: &(String, String),
    key: PcrKey,
    annotations: Option<serde_json::Value>,
) -> Result<(meshca::kube::pcr::Pcr, Vec<u8>), kube::Error> {
    let ar = pcr_resource(env).await;
    let alg = match key {
        PcrKey::P521 => &rcgen::PKCS_ECDSA_P521_SHA512,
        _ => &rcgen::PKCS_ECDSA_P256_SHA256,
    };
    let kp = rcgen::KeyPair::generate_for(alg).unwrap();
    let spki = rcgen::PublicKeyData::subject_public_key_info(&kp);
    let mut spec = json!({
        "signerName": signer, "podName": pod, "podUID": uids.0,
        "serviceAccountName": sa, "serviceAccountUID": uids.1,
        "nodeName": "meshca-e2e-no-such-node", "nodeUID": "00000000-0000-4000-8000-000000000000",
        "maxExpirationSeconds": 3600,
    });
    if ar.version == "v1" {
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        let mut der = p.serialize_request(&kp).unwrap().der().to_vec();
        if key == PcrKey::BadProof {
            // The signature is the DER's last bytes.
            let n = der.len();
            der[n - 4] ^= 0x55;
        }
        spec["stubPKCS10Request"] = json!(b64(&der));
    } else {
        use aws_lc_rs::signature::{
            EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P521_SHA256_ASN1_SIGNING,
        };
        let sig_alg = match key {
            // The API server checks a P-521 proof over the SHA-256 of the UID.
            PcrKey::P521 => &ECDSA_P521_SHA256_ASN1_SIGNING,
            _ => &ECDSA_P256_SHA256_ASN1_SIGNING,
        };
        let signing = EcdsaKeyPair::from_pkcs8(sig_alg, &kp.serialize_der()).unwrap();
        let signed_uid = if key == PcrKey::BadProof {
            "other"
        } else {
            uids.0.as_str()
        };
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pop = signing.sign(&rng, signed_uid.as_bytes()).unwrap();
        spec["pkixPublicKey"] = json!(b64(&spki));
        spec["proofOfPossession"] = json!(b64(pop.as_ref()));
    }
    if let Some(a) = annotations {
        spec["unverifiedUserAnnotations"] = a;
    }
    let obj: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": ar.api_version, "kind": "PodCertificateRequest",
        "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap();
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(env.client.clone(), &env.ns, &ar);
    let created = api.create(&PostParams::default(), &obj).await?;
    Ok((
        serde_json::from_value(serde_json::to_value(created).unwrap()).unwrap(),
        spki,
    ))
}

/// [`create_pcr_for`] the test's own signer.
async fn create_pcr(
    env: &Env,
    name: &str,
    pod: &str,
    sa: &str,
    uids: &(String, String),
    key: PcrKey,
    annotations: Option<serde_json::Value>,
) -> Result<(meshca::kube::pcr::Pcr, Vec<u8>), kube::Error> {
    create_pcr_for(env, &env.signer(), name, pod, sa, uids, key, annotations).await
}

/// Waits for `Issued`, `Denied` or `Failed` on request `name`; returns it and the type.
async fn wait_pcr(env: &Env, name: &str) -> (meshca::kube::pcr::Pcr, String) {
    let ar = pcr_resource(env).await;
    let api: Api<meshca::kube::pcr::Pcr> = Api::namespaced_with(env.client.clone(), &env.ns, &ar);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let p = api.get(name).await.expect("get PodCertificateRequest");
        let done = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| {
                cs.iter()
                    .find(|c| matches!(c.type_.as_str(), "Issued" | "Denied" | "Failed"))
                    .map(|c| c.type_.clone())
            });
        if let Some(t) = done {
            return (p, t);
        }
        assert!(
            Instant::now() < deadline,
            "PodCertificateRequest {name}: no verdict: {:?}",
            p.status
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn pcr_condition(p: &meshca::kube::pcr::Pcr) -> (String, String, String) {
    let c = &p.status.as_ref().unwrap().conditions.as_ref().unwrap()[0];
    (c.type_.clone(), c.reason.clone(), c.message.clone())
}

#[tokio::test]
async fn pod_certificate_requests_are_signed_or_denied_under_the_deploy_rbac() {
    let Some(kc) = kubeconfig() else { return };
    // The CA admits the SPIFFE ID of service account `web` of the test namespace only.
    let mut env = Env::new(&kc, |ns| Policy {
        allowed_spiffe_ids: vec![format!("spiffe://cluster.local/ns/{ns}/sa/web")],
        // The per-CA opt-in to pod certificates, for the test namespace only.
        pod_certificates: true,
        pod_certificate_namespaces: vec![ns.to_string()],
        ..Policy::default()
    })
    .await;
    if !pcr_served(&env).await {
        env.cleanup().await;
        return;
    }
    grant_pod_certificates_component(&mut env).await;
    env.start_deployed_with(&kc, |c| c.pod_certificates = true)
        .await;

    // Signed: one status update the API server accepted (it checks the times, the key and
    // the "sign" permission), verifying to the CA with the pod's SPIFFE ID.
    let web = pod_as(&env, "web-0", "web").await;
    let (_, web_key) = create_pcr(&env, "web-0-cert", "web-0", "web", &web, PcrKey::P256, None)
        .await
        .expect("create PodCertificateRequest");
    let (p, ty) = wait_pcr(&env, "web-0-cert").await;
    assert_eq!(ty, "Issued", "{:?}", p.status);
    let st = p.status.as_ref().unwrap();
    let chain =
        meshca::pemutil::parse_certs(st.certificate_chain.as_deref().unwrap().as_bytes(), "chain")
            .unwrap();
    let info = meshca::x509::CertInfo::from_der(&chain[0]).unwrap();
    assert_eq!(
        info.sans.uri,
        vec![format!("spiffe://cluster.local/ns/{}/sa/web", env.ns)]
    );
    assert_eq!(info.spki_der, web_key, "issued to the request's key");
    let ca = env.store.load_ca(&env.ca).await.unwrap();
    meshca::x509::verify_chain(
        &chain[0],
        &chain[1..],
        &[ca.root().clone()],
        time::OffsetDateTime::now_utc(),
        meshca::x509::Usage::Client,
    )
    .unwrap();
    assert!(st.not_before.is_some() && st.not_after.is_some() && st.begin_refresh_at.is_some());
    assert!(info.not_after - info.not_before <= time::Duration::hours(1));

    // Denied: an account the CA's policy does not admit, a P-521 key, unknown annotations.
    let db = pod_as(&env, "db-0", "db").await;
    create_pcr(&env, "db-0-cert", "db-0", "db", &db, PcrKey::P256, None)
        .await
        .unwrap();
    let (p, _) = wait_pcr(&env, "db-0-cert").await;
    let (ty, reason, msg) = pcr_condition(&p);
    assert_eq!(
        (ty.as_str(), reason.as_str()),
        ("Denied", "MeshcaPolicyDenied"),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("spiffe://cluster.local/ns/{}/sa/db", env.ns)),
        "{msg}"
    );
    assert!(p.status.as_ref().unwrap().certificate_chain.is_none());

    let web1 = pod_as(&env, "web-1", "web").await;
    create_pcr(
        &env,
        "web-1-p521",
        "web-1",
        "web",
        &web1,
        PcrKey::P521,
        None,
    )
    .await
    .unwrap();
    let (p, _) = wait_pcr(&env, "web-1-p521").await;
    let (ty, reason, msg) = pcr_condition(&p);
    assert_eq!(
        (ty.as_str(), reason.as_str()),
        ("Denied", "UnsupportedKeyType"),
        "{msg}"
    );
    assert!(msg.contains("ECDSAP256"), "{msg}");

    let (created, _) = create_pcr(
        &env,
        "web-1-annotated",
        "web-1",
        "web",
        &web1,
        PcrKey::P256,
        Some(json!({"example.com/role": "admin"})),
    )
    .await
    .unwrap();
    let (p, _) = wait_pcr(&env, "web-1-annotated").await;
    let (ty, reason, msg) = pcr_condition(&p);
    if pcr_resource(&env).await.version == "v1alpha1" {
        // v1alpha1 (1.34) has no unverifiedUserAnnotations: the API server drops the field,
        // so the signer sees a plain request.
        assert!(created.spec.unverified_user_annotations.is_none());
        assert_eq!(ty, "Issued", "{msg}");
    } else {
        assert_eq!(
            (ty.as_str(), reason.as_str()),
            ("Denied", "InvalidUnverifiedUserAnnotations"),
            "{msg}"
        );
        assert!(msg.contains("example.com/role"), "{msg}");
    }

    // The ledger has the certificate, with the service account as requester.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let l = env.store.ledger().await.unwrap();
        if l.iter().any(|e| e.serial == info.serial_hex()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no ledger entry for {}",
            info.serial_hex()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    env.cleanup().await;
}

#[tokio::test]
async fn the_api_server_checks_the_proof_of_possession_and_unknown_signers_are_left_alone() {
    let Some(kc) = kubeconfig() else { return };
    let mut env = Env::new(&kc, |ns| Policy {
        pod_certificates: true,
        pod_certificate_namespaces: vec![ns.to_string()],
        ..Policy::default()
    })
    .await;
    if !pcr_served(&env).await {
        env.cleanup().await;
        return;
    }
    grant_pod_certificates_component(&mut env).await;
    env.start_deployed_with(&kc, |c| c.pod_certificates = true)
        .await;
    let web = pod_as(&env, "web-0", "web").await;
    // A proof that does not verify (over another UID; on v1 a stub CSR with a broken
    // signature): refused at create (422), so it never reaches the signer.
    let e = create_pcr(
        &env,
        "bad-pop",
        "web-0",
        "web",
        &web,
        PcrKey::BadProof,
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(meshca::kube::api_code(&e), Some(422), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("proof-of-possession") || msg.contains("signature"),
        "{e}"
    );
    // A request for an unknown meshca.io signer gets no condition (another meshca may serve
    // it); a control request for the served one, created after it, is issued.
    create_pcr_for(
        &env,
        "meshca.io/not-served-here",
        "other-signer",
        "web-0",
        "web",
        &web,
        PcrKey::P256,
        None,
    )
    .await
    .unwrap();
    create_pcr(&env, "control", "web-0", "web", &web, PcrKey::P256, None)
        .await
        .unwrap();
    assert_eq!(wait_pcr(&env, "control").await.1, "Issued");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ar = pcr_resource(&env).await;
    let api: Api<meshca::kube::pcr::Pcr> = Api::namespaced_with(env.client.clone(), &env.ns, &ar);
    let o = api.get("other-signer").await.unwrap();
    assert!(
        o.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_none_or(|c| c.is_empty()),
        "{:?}",
        o.status
    );
    env.cleanup().await;
}

/// The rules of the first ClusterRole in `file` (a deploy/ manifest).
fn cluster_role_rules(file: &str) -> serde_json::Value {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join(file)).unwrap();
    let docs: Vec<serde_json::Value> = serde_saphyr::from_str_multiple(&text).unwrap();
    docs.into_iter()
        .find(|d| d["kind"] == "ClusterRole")
        .unwrap()["rules"]
        .clone()
}

fn sidecar_request(env: &Env, sa: &str, prefix: &str) -> meshca::kube::csr_client::CsrRequest {
    let td = meshca::identity::TrustDomain::default();
    meshca::kube::csr_client::CsrRequest {
        signer_name: env.signer(),
        sans: meshca::identity::Sans {
            spiffe_id: Some(meshca::identity::SpiffeId::parse(&workload_id(&env.ns, sa)).unwrap()),
            ..Default::default()
        },
        trust_domain: td,
        key: meshca::key::KeyAlgorithm::EcdsaP256,
        expiration: Duration::from_secs(3600),
        name_prefix: format!("{prefix}-"),
        requester_label: format!("{}.{sa}", env.ns),
    }
}

/// `sds serve --source kube-csr` as a sidecar does it: under the pod's own ServiceAccount with
/// exactly the RBAC of deploy/components/sds-kube-csr, against the signer and auto-approver
/// running under theirs (deploy/base + deploy/components/auto-approve). Its own identity is
/// signed and verifies with openssl; another account's is denied with the approver's reason;
/// every CSR is gone afterwards. Then 100 sidecars at once: create-to-signed p50/p99.
#[tokio::test]
async fn kube_csr_sidecar_gets_its_own_identity_under_its_own_account_and_cleans_up() {
    use meshca::kube::csr_client::{Answer, CsrClient};
    let Some(kc) = kubeconfig() else { return };
    let mut env = Env::new(&kc, |_| Policy {
        auto_approve: true,
        ..Policy::default()
    })
    .await;
    env.grant(
        "meshca-signer",
        cluster_role_rules("deploy/components/auto-approve/clusterrole.yaml"),
    )
    .await;
    env.start_deployed_with(&kc, |c| c.signer.auto_approve = true)
        .await;
    let web = env.sa_client(&kc, "web").await;
    env.grant(
        "web",
        cluster_role_rules("deploy/components/sds-kube-csr/rbac.yaml"),
    )
    .await;
    let csrs = CsrClient::new(web.clone());
    let own = sidecar_request(&env, "web", &format!("{}-web", env.ns));
    let answer = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match csrs.request(&own, Duration::from_secs(60)).await {
                Ok(a) => break a,
                // The new bindings may take a moment to apply.
                Err(e) if Instant::now() < deadline => {
                    eprintln!("retrying: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
    };
    let Answer::Issued(o) = answer else {
        panic!("{answer:?}")
    };
    assert_eq!(o.username, format!("system:serviceaccount:{}:web", env.ns));
    assert_eq!(o.info.sans.uri, [workload_id(&env.ns, "web")]);
    let gone = env.csrs().get_opt(&o.csr).await.unwrap();
    assert!(gone.is_none(), "the sidecar deleted its CSR {}", o.csr);
    // Another account's identity: denied by the approver, quoted, and deleted as well.
    let mut green = sidecar_request(&env, "green", &format!("{}-web", env.ns));
    green.requester_label = format!("{}.web", env.ns);
    let refused = csrs.request(&green, Duration::from_secs(60)).await.unwrap();
    let Answer::Refused(r) = refused else {
        panic!("{refused:?}")
    };
    assert_eq!(r.condition, "Denied");
    assert_eq!(r.reason, "MeshcaPolicyDenied");
    assert!(r.message.contains("/sa/green"), "{r}");
    assert!(env.csrs().get_opt(&r.csr).await.unwrap().is_none());
    // 100 sidecars at once (one account, 100 CSRs).
    let t = Instant::now();
    let mut lat: Vec<Duration> = futures::future::join_all((0..100).map(|i| {
        let csrs = csrs.clone();
        let req = sidecar_request(&env, "web", &format!("{}-web-{i}", env.ns));
        async move {
            let t = Instant::now();
            match csrs.request(&req, Duration::from_secs(120)).await {
                Ok(Answer::Issued(_)) => t.elapsed(),
                other => panic!("{other:?}"),
            }
        }
    }))
    .await;
    lat.sort();
    eprintln!(
        "100 concurrent kube-csr sidecars: create-to-signed p50 {:?} p99 {:?} (all in {:?})",
        lat[49],
        lat[98],
        t.elapsed()
    );
    let ca = ca_crt_from_secret(&env).await;
    env.cleanup().await;
    let chain = meshca::pemutil::certs_to_pem(o.chain.iter());
    assert!(openssl_verify(&ca, chain.as_bytes()).contains("OK"));
}

/// The two-CA mesh, kube-csr part: green's sidecar gets its certificate from ca2 through a CSR
/// under its own account; the frontend's ROOTCA (the `frontend` bundle ConfigMap that the signer
/// publishes, which `--trust-bundle-file` reads from its volume) holds ca1 only and refuses
/// green, then ca1+ca2 after `bundle update`, and accepts green's chain.
#[tokio::test]
async fn kube_csr_two_ca_mesh_green_is_accepted_after_the_bundle_change() {
    use meshca::kube::csr_client::{Answer, CsrClient};
    let Some(kc) = kubeconfig() else { return };
    let on = Policy {
        auto_approve: true,
        ..Policy::default()
    };
    let mut env = Env::new(&kc, |_| on.clone()).await;
    let ca2 = format!("{}-2", env.ca);
    let mut spec = CaSpec::root(&ca2);
    spec.policy = on.clone();
    env.store
        .save_ca(
            &create_root(&spec, time::OffsetDateTime::now_utc()).unwrap(),
            false,
        )
        .await
        .unwrap();
    let bundle = format!("frontend{}", unique());
    let ns = env.ns.clone();
    let save = |cas: Vec<String>| BundleSpec {
        name: bundle.clone(),
        cas,
        file: None,
        namespaces: vec![ns.clone()],
    };
    env.store
        .save_bundle(&save(vec![env.ca.clone()]))
        .await
        .unwrap();
    env.grant(
        "meshca-signer",
        cluster_role_rules("deploy/components/auto-approve/clusterrole.yaml"),
    )
    .await;
    let both = vec![env.ca.clone(), ca2.clone()];
    env.start_deployed_with(&kc, |c| {
        c.signer.auto_approve = true;
        c.cas = Some(both);
    })
    .await;
    let green = env.sa_client(&kc, "green").await;
    env.grant(
        "green",
        cluster_role_rules("deploy/components/sds-kube-csr/rbac.yaml"),
    )
    .await;
    let mut req = sidecar_request(&env, "green", &format!("{}-green", env.ns));
    req.signer_name = format!("meshca.io/{ca2}");
    let csrs = CsrClient::new(green);
    let deadline = Instant::now() + Duration::from_secs(30);
    let o = loop {
        match csrs.request(&req, Duration::from_secs(60)).await {
            Ok(Answer::Issued(o)) => break o,
            Err(e) if Instant::now() < deadline => {
                eprintln!("retrying: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            other => panic!("{other:?}"),
        }
    };
    let api: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.ns);
    let anchors = |n: usize| {
        let api = api.clone();
        let name = format!("{bundle}-trust-bundle");
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Some(cm) = api.get_opt(&name).await.unwrap() {
                    let pem = cm
                        .data
                        .unwrap_or_default()
                        .remove("ca.crt")
                        .unwrap_or_default();
                    let certs =
                        meshca::pemutil::parse_certs(pem.as_bytes(), "ca.crt").unwrap_or_default();
                    if certs.len() == n {
                        return certs;
                    }
                }
                assert!(Instant::now() < deadline, "{name} never had {n} roots");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let verify = |a: &[rustls_pki_types::CertificateDer<'static>]| {
        meshca::x509::verify_chain(
            &o.chain[0],
            &o.chain[1..],
            a,
            time::OffsetDateTime::now_utc(),
            meshca::x509::Usage::Client,
        )
    };
    let ca1_only = anchors(1).await;
    let refused = verify(&ca1_only);
    env.store
        .save_bundle(&save(vec![env.ca.clone(), ca2.clone()]))
        .await
        .unwrap();
    let two = anchors(2).await;
    let accepted = verify(&two);
    env.cleanup().await;
    assert!(
        refused.is_err(),
        "ca1 alone must not accept green (from ca2)"
    );
    accepted.expect("ca1+ca2 accepts green");
}

/// A Secret labelled for management in a namespace the controller watches but the CA's
/// policy does not serve is refused, naming the namespace; its twin in a served namespace is
/// filled. The namespace is the requester: what the Secret asks for does not matter.
#[tokio::test]
async fn a_managed_secret_in_a_namespace_the_ca_does_not_serve_is_refused() {
    let Some(kc) = kubeconfig() else { return };
    let mut env = Env::new(&kc, admin_policy).await;
    let other = format!("{}-x", env.ns);
    Api::<Namespace>::all(env.client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": other, "labels": {LABEL: "true"}}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    let mut cfg = env.config();
    // The controller watches both namespaces; the CA serves only the first.
    cfg.managed_namespaces = vec![env.ns.clone(), other.clone()];
    env.start(cfg);
    create_managed(&env, "web-tls", &format!("web.{}.svc", env.ns)).await;
    let secret = json!({
        "metadata": {"name": "web-tls", "labels": {"meshca.io/managed": "true"}, "annotations": {
            "meshca.io/ca": env.ca, "meshca.io/dns-names": format!("web.{other}.svc"),
        }},
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": "", "tls.key": ""},
    });
    let api: Api<Secret> = Api::namespaced(env.client.clone(), &other);
    api.create(
        &PostParams::default(),
        &serde_json::from_value(secret).unwrap(),
    )
    .await
    .unwrap();
    let served = wait_secret(&env, "web-tls", "a certificate", filled).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let refused = loop {
        let s = api.get("web-tls").await.unwrap();
        if s.metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key("meshca.io/error"))
        {
            break s;
        }
        assert!(Instant::now() < deadline, "no error annotation in {other}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let _ = Api::<Namespace>::all(env.client.clone())
        .delete(&other, &DeleteParams::default())
        .await;
    env.cleanup().await;
    assert!(filled(&served));
    assert!(
        !filled(&refused),
        "no certificate for an unserved namespace"
    );
    let msg = &refused.metadata.annotations.unwrap()["meshca.io/error"];
    assert!(
        msg.contains(&other),
        "the denial names the namespace: {msg}"
    );
}

/// 200 managed Secrets with a 30 s lifetime are all filled, then all renewed (2/3 of the
/// lifetime), each verifying against the CA.
#[tokio::test]
async fn two_hundred_managed_secrets_are_issued_and_renewed() {
    let Some(kc) = kubeconfig() else { return };
    let mut env = Env::new(&kc, admin_policy).await;
    env.start_managing_its_namespace();
    let api: Api<Secret> = Api::namespaced(env.client.clone(), &env.ns);
    let n = 200;
    for i in 0..n {
        api.create(&PostParams::default(), &serde_json::from_value(json!({
            "metadata": {"name": format!("s{i:03}"), "labels": {"meshca.io/managed": "true"}, "annotations": {
                "meshca.io/ca": env.ca, "meshca.io/dns-names": format!("s{i:03}.{}.svc", env.ns),
                "meshca.io/ttl": "30s",
            }},
            "type": "kubernetes.io/tls",
            "data": {"tls.crt": "", "tls.key": ""},
        })).unwrap())
        .await
        .unwrap();
    }
    let serials = |list: &[Secret]| -> BTreeMap<String, String> {
        list.iter()
            .filter_map(|s| {
                let crt = s.data.as_ref()?.get("tls.crt")?.0.clone();
                let certs = meshca::pemutil::parse_certs(&crt, "tls.crt").ok()?;
                Some((
                    s.metadata.name.clone()?,
                    meshca::x509::CertInfo::from_der(&certs[0]).ok()?.serial,
                ))
            })
            .collect()
    };
    let lp = ListParams::default().labels("meshca.io/managed=true");
    let deadline = Instant::now() + Duration::from_secs(120);
    let (first, sample) = loop {
        let list = api.list(&lp).await.unwrap().items;
        let s = serials(&list);
        if s.len() == n {
            break (s, list[0].clone());
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} managed Secrets filled",
            s.len()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = serials(&api.list(&lp).await.unwrap().items);
        let renewed = s.iter().filter(|(k, v)| first.get(*k) != Some(v)).count();
        if renewed == n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{renewed} of {n} managed Secrets renewed"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let ca = ca_crt_from_secret(&env).await;
    env.cleanup().await;
    let data = sample.data.unwrap();
    assert!(openssl_verify(&ca, &data["tls.crt"].0).contains("OK"));
}

/// The kubelet's own path, under the node's identity: a Node object, a Pod bound to it, and
/// the PodCertificateRequest created with the node's credentials (`system:node:<name>` in
/// `system:nodes`), which the Node authorizer and the NodeRestriction admission plugin check.
/// Through the version the cluster serves first: on 1.37 `certificates.k8s.io/v1` with a
/// `stubPKCS10Request` (the CSR's signature is the proof of possession); on older releases
/// v1beta1 or v1alpha1 with `pkixPublicKey` and `proofOfPossession`. The issued chain verifies
/// with `openssl verify` against the CA and carries the request's key. Its twin, the same node
/// asking for a pod bound to another node, is refused by the API server.
#[tokio::test]
async fn a_node_gets_a_pod_certificate_through_node_restriction() {
    use kube::api::{ApiResource, DynamicObject};
    let Some(kc) = kubeconfig() else { return };
    let node_kc = match std::env::var_os("MESHCA_E2E_NODE_KUBECONFIG") {
        Some(p) => PathBuf::from(p),
        None if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("MESHCA_E2E_NODE_KUBECONFIG is not set (tests/cluster/cluster.sh sets it)")
        }
        None => {
            eprintln!("skipping: MESHCA_E2E_NODE_KUBECONFIG (a kubeconfig of system:node:<name>) is not set");
            return;
        }
    };
    let node_name =
        std::env::var("MESHCA_E2E_NODE_NAME").unwrap_or_else(|_| "meshca-e2e-node".into());
    let mut env = Env::new(&kc, |ns| Policy {
        allowed_spiffe_ids: vec![format!("spiffe://cluster.local/ns/{ns}/sa/web")],
        // The per-CA opt-in to pod certificates, for the test namespace only.
        pod_certificates: true,
        pod_certificate_namespaces: vec![ns.to_string()],
        ..Policy::default()
    })
    .await;
    let ar: ApiResource = match meshca::kube::pcr::discover(&env.client).await.unwrap() {
        Some(ar) => ar,
        None => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "the e2e cluster serves no PodCertificateRequest API"
            );
            eprintln!("skipping: the cluster serves no PodCertificateRequest API");
            env.cleanup().await;
            return;
        }
    };
    grant_pod_certificates_component(&mut env).await;
    env.start_deployed_with(&kc, |c| c.pod_certificates = true)
        .await;

    // The Node (shared by runs: created once) and a Pod of ServiceAccount `web` bound to it.
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(env.client.clone());
    let node = match nodes.get_opt(&node_name).await.unwrap() {
        Some(n) => n,
        None => nodes
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": node_name}})).unwrap(),
            )
            .await
            .unwrap(),
    };
    let node_uid = node.metadata.uid.unwrap();
    let sa_api: Api<ServiceAccount> = Api::namespaced(env.client.clone(), &env.ns);
    let sa = sa_api
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "web"}})).unwrap(),
        )
        .await
        .unwrap();
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(env.client.clone(), &env.ns);
    let mut uids = Vec::new();
    for (pod, on) in [
        ("web-0", node_name.as_str()),
        ("web-1", "meshca-e2e-other-node"),
    ] {
        let p = pods
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": {"name": pod},
                    // NodeRestriction lets a node ask only for a signer whose
                    // podCertificate volume the pod mounts.
                    "spec": {"serviceAccountName": "web", "nodeName": on,
                             "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10",
                                             "volumeMounts": [{"name": "cert", "mountPath": "/var/run/meshca"}]}],
                             "volumes": [{"name": "cert", "projected": {"sources": [{"podCertificate": {
                                 "signerName": env.signer(), "keyType": "ECDSAP256",
                                 "credentialBundlePath": "credentialbundle.pem"}}]}}]}
                }))
                .unwrap(),
            )
            .await
            .unwrap();
        uids.push(p.metadata.uid.unwrap());
    }

    // The request, as the kubelet makes it, with the node's credentials.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let request = |pod: &str, pod_uid: &str| {
        let mut spec = json!({
            "signerName": env.signer(), "podName": pod, "podUID": pod_uid,
            "serviceAccountName": "web", "serviceAccountUID": sa.metadata.uid.clone().unwrap(),
            "nodeName": node_name, "nodeUID": node_uid, "maxExpirationSeconds": 3600,
        });
        if ar.version == "v1" {
            let mut p = rcgen::CertificateParams::default();
            p.distinguished_name = rcgen::DistinguishedName::new();
            spec["stubPKCS10Request"] = json!(b64(p.serialize_request(&key).unwrap().der()));
        } else {
            use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
            let kp =
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &key.serialize_der())
                    .unwrap();
            let rng = aws_lc_rs::rand::SystemRandom::new();
            spec["pkixPublicKey"] =
                json!(b64(&rcgen::PublicKeyData::subject_public_key_info(&key)));
            spec["proofOfPossession"] =
                json!(b64(kp.sign(&rng, pod_uid.as_bytes()).unwrap().as_ref()));
        }
        let obj = json!({"apiVersion": ar.api_version, "kind": "PodCertificateRequest",
                         "metadata": {"name": format!("{pod}-cert")}, "spec": spec});
        serde_json::from_value::<DynamicObject>(obj).unwrap()
    };
    let node_client = meshca::kube::client(Some(&node_kc)).await.unwrap();
    let as_node: Api<DynamicObject> = Api::namespaced_with(node_client, &env.ns, &ar);
    let refused = as_node
        .create(&PostParams::default(), &request("web-1", &uids[1]))
        .await;
    let wanted = request("web-0", &uids[0]);
    let pp = PostParams::default();
    Env::once_authorized("create PodCertificateRequest as the node", || {
        as_node.create(&pp, &wanted)
    })
    .await;

    let api: Api<meshca::kube::pcr::Pcr> = Api::namespaced_with(env.client.clone(), &env.ns, &ar);
    let deadline = Instant::now() + Duration::from_secs(60);
    let p = loop {
        let p = api.get("web-0-cert").await.unwrap();
        let done = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.status == "True"));
        if done {
            break p;
        }
        assert!(Instant::now() < deadline, "no verdict: {:?}", p.status);
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let ca = ca_crt_from_secret(&env).await;
    let ns = env.ns.clone();
    env.cleanup().await;
    let st = p.status.unwrap();
    let conds = st.conditions.unwrap_or_default();
    assert!(
        conds
            .iter()
            .any(|c| c.type_ == "Issued" && c.status == "True"),
        "{conds:?}"
    );
    let chain = st.certificate_chain.unwrap();
    let out = openssl_verify(&ca, chain.as_bytes());
    assert!(out.contains("chain.pem: OK"), "{out}");
    let certs = meshca::pemutil::parse_certs(chain.as_bytes(), "certificateChain").unwrap();
    let info = meshca::x509::CertInfo::from_der(&certs[0]).unwrap();
    assert_eq!(
        info.spki_der,
        rcgen::PublicKeyData::subject_public_key_info(&key),
        "issued to the request's key"
    );
    assert_eq!(info.sans.uri, vec![workload_id(&ns, "web")]);
    // The twin: a pod bound to another node is not this node's to ask for.
    let e = refused.expect_err("a node asked for a pod on another node");
    let code = meshca::kube::api_code(&e);
    assert!(matches!(code, Some(403) | Some(422)), "{e}");
}

/// The kube-csr sidecar's delete guard on the real API server: deploy/'s
/// ValidatingAdmissionPolicy (matched through the marker permission of ClusterRole
/// `meshca-sds-csr`, not through a namespace) lets ServiceAccount `b`, bound to that role in
/// a namespace other than `mesh`, delete only its own CSRs: `a`'s is refused naming its owner,
/// its own is deleted. The sidecar's start-up check (`csr_delete_guard::verify`) passes under
/// `b`'s token once the policy is installed.
#[tokio::test]
async fn a_kube_csr_sidecar_may_delete_only_its_own_csrs_in_any_namespace() {
    use kube::api::{ApiResource, DynamicObject};
    let Some(kc) = kubeconfig() else { return };
    let mut env = Env::new(&kc, |_| Policy::default()).await;
    // The policy and its binding, as deploy/components/sds-kube-csr installs them
    // (cluster-scoped, fixed names: applied, so every run and test may do it).
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text =
        std::fs::read_to_string(root.join("deploy/components/sds-kube-csr/delete-own-csrs.yaml"))
            .unwrap();
    let docs: Vec<serde_json::Value> = serde_saphyr::from_str_multiple(&text).unwrap();
    for d in docs.into_iter().filter(|d| !d.is_null()) {
        let kind = d["kind"].as_str().unwrap().to_string();
        let ar = ApiResource {
            group: "admissionregistration.k8s.io".into(),
            version: "v1".into(),
            api_version: "admissionregistration.k8s.io/v1".into(),
            plural: match kind.as_str() {
                "ValidatingAdmissionPolicy" => "validatingadmissionpolicies".into(),
                _ => "validatingadmissionpolicybindings".into(),
            },
            kind,
        };
        let name = d["metadata"]["name"].as_str().unwrap().to_string();
        Api::<DynamicObject>::all_with(env.client.clone(), &ar)
            .patch(
                &name,
                &PatchParams::apply("meshca-e2e").force(),
                &Patch::Apply(&d),
            )
            .await
            .expect("apply the delete guard");
    }
    let rules = cluster_role_rules("deploy/components/sds-kube-csr/rbac.yaml");
    let a = env.sa_client(&kc, "a").await;
    env.grant("a", rules.clone()).await;
    let b = env.sa_client(&kc, "b").await;
    env.grant("b", rules).await;

    let pem = csr_pem(&["x.example.com"]);
    let signer = env.signer();
    // The new RBAC and the new policy take a moment to apply: until b's delete of a's CSR is
    // refused, each try uses a fresh CSR of a's.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    let refusal = loop {
        n += 1;
        let victim = format!("{}-a-{n}", env.ns);
        Env::once_authorized("create a CSR as a", || {
            env.create_csr_as(&a, &victim, &pem, &signer, None)
        })
        .await;
        match Api::<CertificateSigningRequest>::all(b.clone())
            .delete(&victim, &DeleteParams::default())
            .await
        {
            Err(e) if meshca::kube::api_code(&e) != Some(403) || Instant::now() > deadline => {
                break e
            }
            Err(_) => {}
            Ok(_) => assert!(
                Instant::now() < deadline,
                "b deleted a's CSR {victim}: the guard never applied"
            ),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let own = format!("{}-b-own", env.ns);
    Env::once_authorized("create a CSR as b", || {
        env.create_csr_as(&b, &own, &pem, &signer, None)
    })
    .await;
    let own_delete = Api::<CertificateSigningRequest>::all(b.clone())
        .delete(&own, &DeleteParams::default())
        .await;
    let guard = meshca::kube::csr_delete_guard::verify(&b).await;
    let ns = env.ns.clone();
    env.cleanup().await;
    let msg = refusal.to_string();
    assert!(
        msg.contains("may delete only its own CSRs")
            && msg.contains(&format!("system:serviceaccount:{ns}:a")),
        "{msg}"
    );
    assert!(own_delete.is_ok(), "b deletes its own CSR: {own_delete:?}");
    assert!(guard.is_ok(), "the sidecar's start-up check: {guard:?}");
}
