//! A real control plane for the CLI's end-to-end tests (tests/cluster/cluster.sh, which .ci/run
//! starts): finding it through the environment, kubectl and `meshca` as its admin, kubeconfigs
//! of ServiceAccounts (TokenRequest), and `meshca signer run` processes. Included with
//! `#[path = "common/cluster.rs"] mod cluster;` by the test binaries that use a cluster.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use serde_json::{json, Value};

pub struct Cluster {
    pub kubeconfig: PathBuf,
    pub kubectl: PathBuf,
    pub dir: PathBuf,
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[allow(unused_imports)] // each test binary uses a different subset
pub use crate::common::{relative, text};

impl Cluster {
    /// The cluster of `.ci/run` (its env.sh), or None with the reason printed (a panic with
    /// `CI=true`); `what` names the test in that message.
    pub fn from_env(what: &str) -> Option<Cluster> {
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        match (
            var("MESHCA_E2E_KUBECONFIG"),
            var("MESHCA_E2E_KUBECTL"),
            var("MESHCA_E2E_CLUSTER_DIR"),
        ) {
            (Some(kubeconfig), Some(kubectl), Some(dir)) => Some(Cluster {
                kubeconfig,
                kubectl,
                dir,
            }),
            _ if std::env::var("CI").as_deref() == Ok("true") => panic!(
                "MESHCA_E2E_KUBECONFIG, MESHCA_E2E_KUBECTL and MESHCA_E2E_CLUSTER_DIR are not set: with CI=true this test needs the control plane that .ci/run starts (tests/cluster/cluster.sh)"
            ),
            _ => {
                eprintln!("skipping: start tests/cluster/cluster.sh and source its env.sh (MESHCA_E2E_KUBECONFIG, MESHCA_E2E_KUBECTL, MESHCA_E2E_CLUSTER_DIR) to run {what}");
                None
            }
        }
    }

    /// Runs `f` with the admin's CSR API on a current-thread runtime.
    pub fn with_client<F, Fut>(&self, f: F)
    where
        F: FnOnce(kube::Api<k8s_openapi::api::certificates::v1::CertificateSigningRequest>) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let client = meshca::kube::client(Some(&self.kubeconfig)).await.unwrap();
            f(kube::Api::all(client)).await
        })
    }

    pub fn kubectl_in(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        crate::common::kubectl_output(&self.kubectl, &self.kubeconfig, args, stdin)
    }

    /// kubectl with `stdin` as its input, which must succeed; its stdout.
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> String {
        let o = self.kubectl_in(args, Some(stdin.as_bytes()));
        assert!(o.status.success(), "kubectl {args:?}: {}", text(&o));
        String::from_utf8(o.stdout).unwrap()
    }

    /// kubectl, which must succeed; its stdout.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let o = self.kubectl_in(args, None);
        assert!(o.status.success(), "kubectl {args:?}: {}", text(&o));
        String::from_utf8(o.stdout).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.kubectl(&a)).unwrap()
    }

    /// `meshca` as the admin (the operator), with the kube store in namespace `meshca`.
    pub fn meshca(&self, args: &[&str]) -> String {
        self.meshca_in("meshca", args)
    }

    /// `meshca` as the admin, with the kube store in namespace `ns`.
    pub fn meshca_in(&self, ns: &str, args: &[&str]) -> String {
        let o = Command::new(env!("CARGO_BIN_EXE_meshca"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["--store", &format!("kube:{ns}")])
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "meshca {args:?}: {}", text(&o));
        String::from_utf8(o.stdout).unwrap()
    }

    /// A kubeconfig that authenticates as ServiceAccount `ns/sa` with a token from the
    /// TokenRequest API (`kubectl create token`), against the same API server.
    pub fn service_account_kubeconfig(&self, ns: &str, sa: &str, out: &Path) {
        let token = self.kubectl(&["create", "token", sa, "-n", ns, "--duration=1h"]);
        let view = self.json(&["config", "view", "--raw", "--minify"]);
        let cluster = &view["clusters"][0]["cluster"];
        let kc = json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "e2e", "cluster": cluster}],
            "users": [{"name": sa, "user": {"token": token.trim()}}],
            "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": sa}}],
            "current-context": "e2e",
        });
        std::fs::write(out, serde_json::to_vec(&kc).unwrap()).unwrap();
    }
}

/// A `meshca signer run` replica, killed when dropped.
pub struct Replica {
    pub child: Child,
    pub identity: String,
    pub log: PathBuf,
}

impl Replica {
    /// `meshca --kubeconfig KUBECONFIG ARGS` (a `signer run`), its stderr in DIR/IDENTITY.log.
    pub fn spawn(kubeconfig: &Path, args: &[&str], identity: &str, dir: &Path) -> Replica {
        let log = dir.join(format!("{identity}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_meshca"))
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Replica {
            child,
            identity: identity.to_string(),
            log,
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        // A stopped process must be continued to die of SIGKILL promptly.
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn signal(r: &Replica, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &r.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill {sig} {}", r.identity);
}

pub fn csr_pem(dir: &Path, dns: &str) -> String {
    csr_pem_with_san(dir, &format!("DNS:{dns}"))
}

/// A P-256 CSR with an empty subject and subjectAltName `san` (openssl syntax, e.g.
/// `URI:spiffe://...,DNS:...`), made in `dir`; its PEM.
pub fn csr_pem_with_san(dir: &Path, san: &str) -> String {
    let key = dir.join("csr.key");
    let csr = dir.join("csr.pem");
    let o = crate::common::openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        key.to_str().unwrap(),
        "-subj",
        "/",
        "-addext",
        &format!("subjectAltName={san}"),
        "-out",
        csr.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "openssl req: {}", text(&o));
    std::fs::read_to_string(csr).unwrap()
}

pub fn b64(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}
