//! The gateway flow of the walkthrough: after `meshca init --config examples/mesh.toml` the
//! downloadable `istio-ingress/gateway-ca-tls` Secret's `tls.crt` is the self-signed gateway
//! root, and `curl --cacert` with it reaches an `openssl s_server` serving the gateway
//! credential (`istio-ingress/gateway-tls`) for tenanta.example.com. During a rotation of
//! the gateway CA its `ca.crt` holds both roots. openssl and curl are Debian packages that
//! .ci/run installs.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use base64::Engine;

fn meshca(home: &Path, dir: &Path, args: &[&str]) -> String {
    let o: Output = Command::new(env!("CARGO_BIN_EXE_meshca"))
        .args(args)
        .env("MESHCA_HOME", home)
        .env_remove("RUST_LOG")
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "meshca {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn secret_data(yaml: &str, key: &str) -> String {
    let v: serde_json::Value = serde_saphyr::from_str(yaml).unwrap();
    let b = base64::engine::general_purpose::STANDARD
        .decode(v["data"][key].as_str().unwrap())
        .unwrap();
    String::from_utf8(b).unwrap()
}

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn gateway_ca_secret_is_the_root_and_curl_reaches_the_gateway() {
    let d = tempfile::tempdir().unwrap();
    let home = d.path().join("home");
    let cfg = d.path().join("mesh.toml");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mesh.toml"),
        &cfg,
    )
    .unwrap();
    meshca(
        &home,
        d.path(),
        &["init", "--config", cfg.to_str().unwrap()],
    );
    let out = d.path().join("out");
    let ca_yaml = std::fs::read_to_string(out.join("gateway-ca-secret.yaml")).unwrap();
    let v: serde_json::Value = serde_saphyr::from_str(&ca_yaml).unwrap();
    assert_eq!(v["type"], "kubernetes.io/tls");
    assert_eq!(v["metadata"]["namespace"], "istio-ingress");
    assert_eq!(v["metadata"]["name"], "gateway-ca-tls");
    assert_eq!(
        secret_data(&ca_yaml, "tls.key"),
        "",
        "no key in the CA Secret"
    );
    let ca_pem = secret_data(&ca_yaml, "tls.crt");
    assert_eq!(secret_data(&ca_yaml, "ca.crt"), ca_pem);
    let ca_file = d.path().join("ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    // Self-signed CA: it verifies against itself and says CA:TRUE.
    let o = Command::new("openssl")
        .args(["verify", "-x509_strict", "-CAfile"])
        .arg(&ca_file)
        .arg(&ca_file)
        .output()
        .expect("openssl must be installed (.ci/run installs it)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let o = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&ca_file)
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(t.contains("CA:TRUE"), "{t}");
    assert!(
        t.contains("Issuer: O = Example Corp, CN = Gateway Root CA"),
        "{t}"
    );
    assert!(
        t.contains("Subject: O = Example Corp, CN = Gateway Root CA"),
        "{t}"
    );

    // The serving credential is a separate Secret.
    let gw_yaml = std::fs::read_to_string(out.join("gateway-secret.yaml")).unwrap();
    let g: serde_json::Value = serde_saphyr::from_str(&gw_yaml).unwrap();
    assert_eq!(g["metadata"]["name"], "gateway-tls");
    assert!(secret_data(&gw_yaml, "tls.key").contains("PRIVATE KEY"));

    let port = common::free_port();
    let server = Kill(
        Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(out.join("gateway_cert_chain.pem"))
            .arg("-key")
            .arg(out.join("gateway_key.pem"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let curl = |ca: &Path| {
        Command::new("curl")
            .args(["-sS", "--max-time", "5", "--cacert"])
            .arg(ca)
            .arg("--resolve")
            .arg(format!("tenanta.example.com:{port}:127.0.0.1"))
            .arg(format!("https://tenanta.example.com:{port}/"))
            .output()
            .expect("curl must be installed (.ci/run installs it)")
    };
    let mut last = None;
    for _ in 0..50 {
        let o = curl(&ca_file);
        if o.status.success() {
            last = None;
            break;
        }
        last = Some(String::from_utf8_lossy(&o.stderr).to_string());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(last, None, "curl --cacert gateway-ca-tls failed");
    // Another root does not reach it: the check is real.
    let other = d.path().join("other.pem");
    std::fs::write(&other, meshca(&home, d.path(), &["ca", "export", "ca1"])).unwrap();
    assert!(!curl(&other).status.success());
    drop(server);

    // During a gateway rotation the downloadable ca.crt holds both roots.
    meshca(
        &home,
        d.path(),
        &["ca", "rotate", "gateway", "--phase", "prepare"],
    );
    meshca(
        &home,
        d.path(),
        &["init", "--config", cfg.to_str().unwrap()],
    );
    let ca_yaml = std::fs::read_to_string(out.join("gateway-ca-secret.yaml")).unwrap();
    assert_eq!(
        secret_data(&ca_yaml, "ca.crt")
            .matches("BEGIN CERTIFICATE")
            .count(),
        2
    );
    assert_eq!(
        secret_data(&ca_yaml, "tls.crt"),
        ca_pem,
        "old CA still current"
    );
    let printed = meshca(
        &home,
        d.path(),
        &[
            "ca",
            "export",
            "gateway",
            "--secret",
            "istio-ingress/gateway-ca-tls",
        ],
    );
    assert_eq!(
        secret_data(&printed, "ca.crt")
            .matches("BEGIN CERTIFICATE")
            .count(),
        2
    );
    let with_key = meshca(
        &home,
        d.path(),
        &[
            "ca",
            "export",
            "gateway",
            "--secret",
            "cert-manager/gateway-ca",
            "--include-key",
        ],
    );
    assert!(secret_data(&with_key, "tls.key").contains("BEGIN PRIVATE KEY"));
}
