//! `meshca policy check`: the abuse corpus of issues 8 and 17, through the binary. Each case is
//! denied with a reason naming the offending value and has an allowed twin, so a checker
//! that denies everything fails. Also: the init flags of the new policy keys, and the EKUs a
//! real issued certificate carries (openssl x509 -text).

use std::path::Path;

mod common;
use common::{openssl, openssl_csr, Env, P256};

const BLUE: &str = "system:serviceaccount:app:blue";
const ISTIOD: &str = "system:serviceaccount:istio-system:istiod";
const OWN: &str = "spiffe://cluster.local/ns/app/sa/blue";

/// A home with examples/mesh.toml applied and a CA `mesh` made with the new init flags.
fn mesh_env() -> Env {
    let env = Env::new();
    let cfg = env.path("mesh.toml");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mesh.toml");
    std::fs::copy(example, &cfg).unwrap();
    env.ok(&["init", "--config", cfg.to_str().unwrap()]);
    env.ok(&[
        "init",
        "--ca",
        "mesh",
        "--allow-spiffe",
        "spiffe://{td}/ns/{ns}/sa/{sa}",
        "--allow-dns",
        "{sa}.{ns}.svc",
        "--max-ttl",
        "24h",
        "--auto-approve",
        "--registration-authority",
        ISTIOD,
        "--managed-namespace",
        "app",
        "--pod-certificates",
        "--pod-certificate-namespace",
        "app",
        "--allow-ip-range",
        "10.0.0.0/8",
    ]);
    env
}

/// `meshca policy check` on an [`Env`].
trait PolicyCheck {
    fn check(&self, ca: &str, args: &[&str]) -> (i32, String);
    fn allowed(&self, ca: &str, args: &[&str]) {
        let (code, out) = self.check(ca, args);
        assert_eq!((code, out.as_str()), (0, "allowed\n"), "{args:?}");
    }
    fn denied(&self, ca: &str, args: &[&str], needle: &str) {
        let (code, out) = self.check(ca, args);
        assert_eq!(code, 1, "{args:?}: {out}");
        assert!(out.starts_with("denied: "), "{args:?}: {out}");
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(out.contains(needle), "{args:?}: {needle:?} not in {out}");
    }
}

impl PolicyCheck for Env {
    fn check(&self, ca: &str, args: &[&str]) -> (i32, String) {
        let mut a = vec!["policy", "check", "--ca", ca];
        a.extend_from_slice(args);
        let o = self.run(&a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.contains("panicked"), "{err}");
        (
            o.status.code().unwrap(),
            String::from_utf8(o.stdout).unwrap(),
        )
    }
}

fn signer(requester: &str, rest: &[&'static str]) -> Vec<String> {
    let mut v = vec![
        "--as".into(),
        "csr-signer".into(),
        "--requester".into(),
        requester.into(),
    ];
    v.extend(rest.iter().map(|s| s.to_string()));
    v
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn another_accounts_identity_and_names_are_denied() {
    let env = mesh_env();
    for other in [
        "spiffe://cluster.local/ns/app/sa/green",
        "spiffe://cluster.local/ns/prod/sa/blue",
        "spiffe://cluster.local/ns/app/sa/Blue",
    ] {
        let mut a = signer(BLUE, &["--spiffe-id"]);
        a.push(other.into());
        env.denied("mesh", &strs(&a), other);
    }
    env.allowed("mesh", &strs(&signer(BLUE, &["--spiffe-id", OWN])));
    for (dns, needle) in [
        ("green.app.svc", "green.app.svc"),
        ("*.app.svc", "*.app.svc"),
    ] {
        let mut a = signer(BLUE, &["--spiffe-id", OWN, "--dns"]);
        a.push(dns.into());
        env.denied("mesh", &strs(&a), needle);
    }
    env.allowed(
        "mesh",
        &strs(&signer(
            BLUE,
            &["--spiffe-id", OWN, "--dns", "blue.app.svc"],
        )),
    );
    // IP SANs are never auto-approved.
    let aa = [
        "--as",
        "auto-approver",
        "--requester",
        BLUE,
        "--spiffe-id",
        OWN,
    ];
    let mut ip = aa.to_vec();
    ip.extend(["--ip", "10.1.2.3"]);
    env.denied("mesh", &ip, "IP SAN 10.1.2.3");
    env.allowed("mesh", &aa);
}

#[test]
fn the_gateway_ca_is_not_auto_approved_for_its_names() {
    let env = mesh_env();
    for sa in [BLUE, "system:serviceaccount:istio-ingress:gateway"] {
        env.denied(
            "gateway",
            &[
                "--as",
                "auto-approver",
                "--requester",
                sa,
                "--dns",
                "tenanta.example.com",
            ],
            "auto_approve",
        );
        // Nor as a managed Secret in any namespace.
        env.denied(
            "gateway",
            &[
                "--as",
                "managed-secret",
                "--namespace",
                "istio-ingress",
                "--dns",
                "tenanta.example.com",
            ],
            "\"istio-ingress\"",
        );
    }
    // Twin: the operator may, and a person who approves the CSR may have it signed.
    env.allowed(
        "gateway",
        &["--as", "local", "--dns", "tenanta.example.com"],
    );
    env.allowed(
        "gateway",
        &[
            "--as",
            "csr-signer",
            "--requester",
            BLUE,
            "--dns",
            "tenanta.example.com",
        ],
    );
}

#[test]
fn ca_flags_usages_and_ttls_out_of_bounds_are_denied() {
    let env = mesh_env();
    for bad in ["cert sign", "crl sign", "code signing"] {
        let mut a = signer(
            BLUE,
            &[
                "--spiffe-id",
                OWN,
                "--usage",
                "digital signature",
                "--usage",
            ],
        );
        a.push(bad.into());
        env.denied("mesh", &strs(&a), &format!("{bad:?}"));
    }
    env.allowed(
        "mesh",
        &strs(&signer(
            BLUE,
            &[
                "--spiffe-id",
                OWN,
                "--usage",
                "digital signature",
                "--usage",
                "client auth",
            ],
        )),
    );
    env.denied(
        "mesh",
        &strs(&signer(
            BLUE,
            &["--spiffe-id", OWN, "--expiration-seconds", "599"],
        )),
        "599",
    );
    env.denied(
        "mesh",
        &strs(&signer(
            BLUE,
            &["--spiffe-id", OWN, "--expiration-seconds", "86401"],
        )),
        "over the maximum",
    );
    env.allowed(
        "mesh",
        &strs(&signer(
            BLUE,
            &["--spiffe-id", OWN, "--expiration-seconds", "600"],
        )),
    );
    // CA:TRUE in the CSR itself.
    let ca_csr = openssl_csr(
        &env,
        "ca",
        P256,
        &[
            "basicConstraints=critical,CA:TRUE",
            &format!("subjectAltName=URI:{OWN}"),
        ],
    );
    env.denied(
        "mesh",
        &[
            "--as",
            "csr-signer",
            "--requester",
            BLUE,
            "--csr",
            ca_csr.to_str().unwrap(),
        ],
        "CA:TRUE",
    );
    let leaf_csr = openssl_csr(&env, "leaf", P256, &[&format!("subjectAltName=URI:{OWN}")]);
    env.allowed(
        "mesh",
        &[
            "--as",
            "csr-signer",
            "--requester",
            BLUE,
            "--csr",
            leaf_csr.to_str().unwrap(),
        ],
    );
}

#[test]
fn people_registration_authorities_and_managed_secrets() {
    let env = mesh_env();
    // A person under a templated rule.
    env.denied(
        "mesh",
        &strs(&signer("alice@example.com", &["--spiffe-id", OWN])),
        "not a service account",
    );
    // The listed RA inside the trust domain; outside it; an unlisted SA acting as one.
    env.allowed(
        "mesh",
        &strs(&signer(
            ISTIOD,
            &["--spiffe-id", OWN, "--dns", "blue.app.svc"],
        )),
    );
    env.denied(
        "mesh",
        &strs(&signer(
            ISTIOD,
            &["--spiffe-id", "spiffe://evil.example/ns/app/sa/blue"],
        )),
        "spiffe://evil.example/ns/app/sa/blue",
    );
    env.denied(
        "mesh",
        &strs(&signer(
            "system:serviceaccount:istio-system:other",
            &["--spiffe-id", OWN],
        )),
        OWN,
    );
    // Managed Secrets: another namespace's identity; a namespace the CA does not serve.
    let ms = |ns: &'static str, id: &'static str| {
        [
            "--as",
            "managed-secret",
            "--namespace",
            ns,
            "--spiffe-id",
            id,
        ]
    };
    env.denied(
        "mesh",
        &ms("app", "spiffe://cluster.local/ns/prod/sa/web"),
        "spiffe://cluster.local/ns/prod/sa/web",
    );
    env.denied(
        "mesh",
        &ms("prod", "spiffe://cluster.local/ns/prod/sa/web"),
        "\"prod\"",
    );
    env.allowed("mesh", &ms("app", "spiffe://cluster.local/ns/app/sa/web"));
}

#[test]
fn json_output_and_usage_errors() {
    let env = mesh_env();
    let (code, out) = env.check(
        "mesh",
        &[
            "-o",
            "json",
            "--as",
            "csr-signer",
            "--requester",
            BLUE,
            "--spiffe-id",
            OWN,
            "--expiration-seconds",
            "3600",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"decision": "allowed", "reason": null, "ca": "mesh", "sans": [format!("URI:{OWN}")], "ttl_seconds": 3600})
    );
    let (code, out) = env.check(
        "mesh",
        &[
            "-o",
            "json",
            "--as",
            "csr-signer",
            "--requester",
            BLUE,
            "--spiffe-id",
            "spiffe://cluster.local/ns/app/sa/green",
        ],
    );
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["decision"], "denied");
    assert!(
        v["reason"].as_str().unwrap().contains("ns/app/sa/green"),
        "{v}"
    );
    assert_eq!(
        v["sans"],
        serde_json::json!(["URI:spiffe://cluster.local/ns/app/sa/green"])
    );
    assert!(v["ttl_seconds"].is_null());
    // Missing requester: a usage error, exit 1, nothing on stdout.
    let o = env.run(&[
        "policy",
        "check",
        "--ca",
        "mesh",
        "--as",
        "csr-signer",
        "--spiffe-id",
        OWN,
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--requester"));
}

#[test]
fn unknown_placeholders_fail_at_init_naming_them() {
    let env = mesh_env();
    let o = env.run(&[
        "init",
        "--ca",
        "bad",
        "--allow-spiffe",
        "spiffe://{td}/ns/{namespace}/sa/{sa}",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("{namespace}"), "{err}");
    std::fs::write(
        env.path("bad.toml"),
        "[[ca]]\nname = \"bad\"\n[ca.policy]\nallowed_dns = [\"{service}.svc\"]\n",
    )
    .unwrap();
    let o = env.run(&["init", "--config", env.path("bad.toml").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("{service}"));
}

/// Issue 9's usage defect, on a real certificate: a client-only CSR gets a client-only
/// certificate; one asking for codeSigning is refused, naming it.
#[test]
fn issued_certificates_carry_only_the_granted_ekus() {
    let env = mesh_env();
    let san = "subjectAltName=URI:spiffe://cluster.local/ns/howto-k8s-mtls-file-based/sa/blue";
    let client = openssl_csr(&env, "client", P256, &[san, "extendedKeyUsage=clientAuth"]);
    env.ok(&[
        "issue",
        "--ca",
        "ca1",
        "--csr",
        client.to_str().unwrap(),
        "--name",
        "client",
        "--out-dir",
        "o",
    ]);
    let text = openssl(&[
        "x509",
        "-noout",
        "-text",
        "-in",
        env.path("o/client_cert.pem").to_str().unwrap(),
    ]);
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    assert!(!text.contains("TLS Web Server Authentication"), "{text}");
    // Twin: no request gets the profile default, both.
    let plain = openssl_csr(&env, "plain", P256, &[san]);
    env.ok(&[
        "issue",
        "--ca",
        "ca1",
        "--csr",
        plain.to_str().unwrap(),
        "--name",
        "plain",
        "--out-dir",
        "o",
    ]);
    let text = openssl(&[
        "x509",
        "-noout",
        "-text",
        "-in",
        env.path("o/plain_cert.pem").to_str().unwrap(),
    ]);
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
    let code = openssl_csr(&env, "code", P256, &[san, "extendedKeyUsage=codeSigning"]);
    let o = env.run(&[
        "issue",
        "--ca",
        "ca1",
        "--csr",
        code.to_str().unwrap(),
        "--out-dir",
        "o",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("\"code signing\""));
}

#[test]
fn pod_certificate_decisions_bind_to_the_pods_service_account() {
    let env = mesh_env();
    let pod = |id: &'static str| {
        [
            "--as",
            "pod-certificate",
            "--requester",
            BLUE,
            "--spiffe-id",
            id,
        ]
    };
    env.allowed("mesh", &pod(OWN));
    env.denied(
        "mesh",
        &pod("spiffe://cluster.local/ns/app/sa/green"),
        "spiffe://cluster.local/ns/app/sa/green",
    );
    // The requester must be a service account, and comes from --requester only.
    let (code, _) = env.check(
        "mesh",
        &[
            "--as",
            "pod-certificate",
            "--requester",
            "alice",
            "--spiffe-id",
            OWN,
        ],
    );
    assert_eq!(code, 1);
    let (code, _) = env.check(
        "mesh",
        &[
            "--as",
            "pod-certificate",
            "--requester",
            BLUE,
            "--namespace",
            "app",
            "--spiffe-id",
            OWN,
        ],
    );
    assert_eq!(code, 1);
}

fn pod(requester: &str, id: &str) -> Vec<String> {
    [
        "--as",
        "pod-certificate",
        "--requester",
        requester,
        "--spiffe-id",
        id,
    ]
    .map(String::from)
    .to_vec()
}

/// Issue 17: the pod-certificate front end skipped every per-CA opt-in, so the gateway CA
/// (which opts in to nothing) signed for any pod in any namespace.
#[test]
fn pod_certificates_need_the_cas_opt_in_and_a_listed_namespace() {
    let env = mesh_env();
    // The repro, and the same pod from a namespace the other CAs do serve otherwise.
    for (ca, ns) in [("gateway", "evil"), ("ca1", "howto-k8s-mtls-file-based")] {
        let a = pod(
            &format!("system:serviceaccount:{ns}:default"),
            &format!("spiffe://cluster.local/ns/{ns}/sa/default"),
        );
        env.denied(
            ca,
            &strs(&a),
            &format!("CA {ca} does not sign pod certificates"),
        );
    }
    // The mesh CA opts in for `app` only.
    env.denied(
        "mesh",
        &strs(&pod(
            "system:serviceaccount:prod:blue",
            "spiffe://cluster.local/ns/prod/sa/blue",
        )),
        "namespace \"prod\" is not served pod certificates by CA mesh",
    );
    env.allowed("mesh", &strs(&pod(BLUE, OWN)));
}

/// Issue 17: `allow_ip_sans` defaulted to true, so an approved service-account CSR, or a
/// registration authority's, got any IP. In the cluster an IP SAN needs the CA's ranges.
#[test]
fn in_cluster_ip_sans_need_the_cas_ranges() {
    let env = mesh_env();
    let howto = "system:serviceaccount:howto-k8s-mtls-file-based:blue";
    let howto_id = "spiffe://cluster.local/ns/howto-k8s-mtls-file-based/sa/blue";
    // ca1 lists no range: no IP SAN through the CSR signer or a managed Secret ...
    let csr = |ip: &str| {
        [
            "--as",
            "csr-signer",
            "--requester",
            howto,
            "--spiffe-id",
            howto_id,
            "--ip",
            ip,
        ]
        .map(String::from)
    };
    env.denied("ca1", &strs(&csr("10.1.2.3")), "IP SAN 10.1.2.3");
    env.denied(
        "ca1",
        &[
            "--as",
            "managed-secret",
            "--namespace",
            "howto-k8s-mtls-file-based",
            "--spiffe-id",
            howto_id,
            "--ip",
            "10.1.2.3",
        ],
        "lists no allowed_ip_ranges",
    );
    // ... while the local operator keeps allow_ip_sans (twin), and the same CSR without the
    // IP is signed.
    env.allowed(
        "ca1",
        &["--as", "local", "--spiffe-id", howto_id, "--ip", "10.1.2.3"],
    );
    let mut no_ip = csr("10.1.2.3").to_vec();
    no_ip.truncate(6);
    env.allowed("ca1", &strs(&no_ip));
    // The mesh CA allows 10.0.0.0/8: outside it is denied, for istiod as a registration
    // authority and for a pod; inside it is allowed.
    for (who, ip) in [(ISTIOD, "192.168.1.1"), (ISTIOD, "10.1.2.3")] {
        let mut a = signer(who, &["--spiffe-id", OWN, "--ip"]);
        a.push(ip.into());
        if ip.starts_with("10.") {
            env.allowed("mesh", &strs(&a));
        } else {
            env.denied("mesh", &strs(&a), "IP SAN 192.168.1.1 is outside CA mesh's");
        }
    }
    for ip in ["192.168.1.1", "10.1.2.3"] {
        let mut a = pod(BLUE, OWN);
        a.extend(["--ip".to_string(), ip.to_string()]);
        if ip.starts_with("10.") {
            env.allowed("mesh", &strs(&a));
        } else {
            env.denied("mesh", &strs(&a), "10.0.0.0/8");
        }
    }
}

/// The repository's files, for the example manifests.
fn repo(p: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p)
}

fn yaml(p: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(repo(p)).unwrap();
    serde_saphyr::from_str_multiple::<serde_json::Value, Vec<serde_json::Value>>(&text)
        .unwrap()
        .into_iter()
        .find(|v| !v.is_null())
        .unwrap()
}

fn text(v: &serde_json::Value, path: &[&str]) -> String {
    path.iter()
        .fold(v, |v, k| &v[*k])
        .as_str()
        .unwrap_or_else(|| panic!("{path:?} in {v}"))
        .to_string()
}

/// `24h`-style TTLs of the examples, in seconds.
fn hours(ttl: &str) -> String {
    let h: u64 = ttl.strip_suffix('h').unwrap().parse().unwrap();
    (h * 3600).to_string()
}

/// Issue 17: the CA deploy/examples told users to create (`init --ca mesh`, the default policy)
/// refused both managed-secret.yaml and csr.yaml. The documented CA, deploy/examples/mesh.toml,
/// is checked here against exactly the requests of the example manifests (read from them, so
/// a change to either side that breaks the examples fails here); the old CA is the denied
/// twin.
#[test]
fn the_documented_example_ca_allows_exactly_the_example_requests() {
    const INIT: &str = "meshca --store kube:meshca init --config deploy/examples/mesh.toml";
    for doc in ["docs/kubernetes.md", "deploy/examples/kustomization.yaml"] {
        let t = std::fs::read_to_string(repo(doc)).unwrap();
        assert!(t.contains(INIT), "{doc} does not document `{INIT}`");
    }
    let env = Env::new();
    let cfg = env.path("mesh.toml");
    std::fs::copy(repo("deploy/examples/mesh.toml"), &cfg).unwrap();
    env.ok(&["init", "--config", cfg.to_str().unwrap()]);
    env.ok(&["init", "--ca", "old"]);
    // (CA, policy check arguments, what the old CA's refusal names when it refuses).
    let mut requests: Vec<(String, Vec<String>, Option<&str>)> = Vec::new();
    // deploy/examples/managed-secret.yaml: the Secret's namespace asks.
    let secret = yaml("deploy/examples/managed-secret.yaml");
    let ann = |k: &str| text(&secret, &["metadata", "annotations", k]);
    let mut a: Vec<String> = [
        "--as",
        "managed-secret",
        "--namespace",
        &text(&secret, &["metadata", "namespace"]),
        "--spiffe-id",
        &ann("meshca.io/spiffe-id"),
        "--expiration-seconds",
        &hours(&ann("meshca.io/ttl")),
    ]
    .map(String::from)
    .to_vec();
    for d in ann("meshca.io/dns-names").split(',') {
        a.extend(["--dns".into(), d.into()]);
    }
    requests.push((ann("meshca.io/ca"), a, Some("managed_namespaces")));
    // deploy/examples/csr.yaml: created and approved by a person (kubeadm's admin user).
    let csr = yaml("deploy/examples/csr.yaml");
    use base64::Engine as _;
    let pem = base64::engine::general_purpose::STANDARD
        .decode(text(&csr, &["spec", "request"]))
        .unwrap();
    let csr_file = env.path("csr.pem");
    std::fs::write(&csr_file, pem).unwrap();
    let mut a: Vec<String> = [
        "--as",
        "csr-signer",
        "--requester",
        "kubernetes-admin",
        "--csr",
        csr_file.to_str().unwrap(),
        "--expiration-seconds",
    ]
    .map(String::from)
    .to_vec();
    a.push(
        csr["spec"]["expirationSeconds"]
            .as_u64()
            .unwrap()
            .to_string(),
    );
    for u in csr["spec"]["usages"].as_array().unwrap() {
        a.extend(["--usage".into(), u.as_str().unwrap().into()]);
    }
    let signer = text(&csr, &["spec", "signerName"]);
    let ca = signer.strip_prefix("meshca.io/").unwrap().to_string();
    requests.push((ca, a, Some("not a service account")));
    // deploy/examples/sds-kube-csr: the sidecar's own account, through the auto-approver
    // (deploy/components/auto-approve) and then the signer.
    let patch = yaml("deploy/components/sds-kube-csr/sidecar-patch.yaml");
    let pod = &patch["spec"]["template"]["spec"];
    let ns = text(&patch, &["metadata", "namespace"]);
    let sa = text(pod, &["serviceAccountName"]);
    let args: Vec<String> = pod["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let arg = |k: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(k))
            .unwrap_or_else(|| panic!("{k} in {args:?}"))
            .to_string()
    };
    let ca = arg("--signer=meshca.io/");
    for via in ["auto-approver", "csr-signer"] {
        let a = [
            "--as",
            via,
            "--requester",
            &format!("system:serviceaccount:{ns}:{sa}"),
            "--spiffe-id",
            &format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"),
            "--expiration-seconds",
            &hours(&arg("--ttl=")),
            "--usage",
            "digital signature",
            "--usage",
            "server auth",
            "--usage",
            "client auth",
        ]
        .map(String::from)
        .to_vec();
        // The old CA signed an approved CSR for the account's own identity, but never
        // auto-approved it.
        let old = (via == "auto-approver").then_some("auto_approve");
        requests.push((ca.clone(), a, old));
    }
    // deploy/components/pod-certificates/example-pod.yaml: the pod's account.
    let p = yaml("deploy/components/pod-certificates/example-pod.yaml");
    let pc = &p["spec"]["volumes"][0]["projected"]["sources"][0]["podCertificate"];
    let ns = text(&p, &["metadata", "namespace"]);
    let sa = text(&p, &["spec", "serviceAccountName"]);
    let a = [
        "--as",
        "pod-certificate",
        "--requester",
        &format!("system:serviceaccount:{ns}:{sa}"),
        "--spiffe-id",
        &format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"),
        "--expiration-seconds",
        &pc["maxExpirationSeconds"].as_u64().unwrap().to_string(),
    ]
    .map(String::from)
    .to_vec();
    let signer = text(pc, &["signerName"]);
    requests.push((
        signer.strip_prefix("meshca.io/").unwrap().to_string(),
        a,
        Some("pod_certificates"),
    ));
    assert_eq!(requests.len(), 5);
    for (ca, a, old_reason) in &requests {
        assert_eq!(ca, "mesh", "{a:?}");
        env.allowed(ca, &strs(a));
        // The twin: the CA the examples used to document refuses it.
        if let Some(reason) = old_reason {
            env.denied("old", &strs(a), reason);
        }
    }
}
