//! `meshca sds serve` end to end: starts, logs structured lines, answers /healthz and
//! /metrics, keeps its socket at mode 0600, stops on SIGTERM and removes the socket; bad
//! flags fail with one line and exit 1.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;
use common::{http_get, wait_for, Env, Running};

impl Env {
    fn fails(&self, args: &[&str]) -> String {
        let o = self.run(args);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(o.status.code(), Some(1), "meshca {args:?}: {err}");
        let lines: Vec<_> = err.lines().collect();
        assert_eq!(lines.len(), 1, "one line on stderr, got: {err}");
        lines[0].to_string()
    }
}

#[test]
fn serve_runs_reports_health_and_stops_on_sigterm() {
    let env = Env::new();
    let o = env.run(&["init", "--ca", "ca1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let sock = env.path("run/sds.sock");
    let port = common::free_port();
    let log = std::fs::File::create(env.path("sds.log")).unwrap();
    let child = env
        .cmd(&[
            "--log-format",
            "json",
            "sds",
            "serve",
            "--ca",
            "ca1",
            "--namespace",
            "mesh",
            "--service-account",
            "web",
            "--ttl",
            "1h",
            "--listen",
            &format!("unix:{}", sock.display()),
            "--listen",
            "tcp:127.0.0.1:0",
            "--metrics",
            &format!("tcp:127.0.0.1:{port}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut running = Running(child);
    assert!(
        wait_for(|| http_get(port, "/healthz", None).is_some_and(|(c, _, _)| c == 200)),
        "healthz never OK; log: {}",
        std::fs::read_to_string(env.path("sds.log")).unwrap()
    );
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let (code, _, metrics) = http_get(port, "/metrics", None).unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("meshca_sds_rotations_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("meshca_sds_certificate_expiration_timestamp_seconds{name=\"default\"} "),
        "{metrics}"
    );
    assert!(running.terminate().success(), "clean exit on SIGTERM");
    assert!(!Path::new(&sock).exists(), "socket removed");
    let log = std::fs::read_to_string(env.path("sds.log")).unwrap();
    // Structured JSON lines, including the certificate it obtained.
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "workload certificate obtained"),
        "{log}"
    );
    assert!(!log.contains("PRIVATE KEY"), "no key material in logs");
}

#[test]
fn bad_flags_fail_with_one_line() {
    let env = Env::new();
    assert!(env.run(&["init", "--ca", "ca1"]).status.success());
    let e = env.fails(&["sds", "serve"]);
    assert!(e.contains("--ca") || e.contains("--cert-file"), "{e}");
    let e = env.fails(&["sds", "serve", "--ca", "ca1", "--listen", "tcp:127.0.0.1:0"]);
    assert!(e.contains("identity"), "{e}");
    let e = env.fails(&[
        "sds",
        "serve",
        "--ca",
        "ca1",
        "--dns",
        "a.example",
        "--listen",
        "udp:1",
    ]);
    assert!(e.contains("unix:PATH"), "{e}");
    let e = env.fails(&[
        "sds",
        "serve",
        "--ca",
        "nope",
        "--dns",
        "a.example",
        "--listen",
        "tcp:127.0.0.1:0",
    ]);
    assert!(e.contains("unknown CA"), "{e}");
    let e = env.fails(&[
        "sds",
        "serve",
        "--ca",
        "ca1",
        "--dns",
        "a.example",
        "--renew-at",
        "1.5",
        "--listen",
        "tcp:127.0.0.1:0",
    ]);
    assert!(e.contains("renew-at"), "{e}");
    let e = env.fails(&[
        "sds",
        "serve",
        "--ca",
        "ca1",
        "--dns",
        "a.example",
        "--socket-mode",
        "999",
    ]);
    assert!(e.contains("socket-mode"), "{e}");
    let e = env.fails(&[
        "sds",
        "serve",
        "--cert-file",
        "missing.crt",
        "--key-file",
        "k",
        "--ca-file",
        "c",
        "--listen",
        "tcp:127.0.0.1:0",
    ]);
    assert!(e.contains("missing.crt"), "{e}");
}

/// Waits up to `secs` for the process to exit; kills it (and returns None) if it does not.
fn exits_within(child: &mut Running, secs: u64) -> Option<std::process::ExitStatus> {
    for _ in 0..secs * 20 {
        if let Some(st) = child.0.try_wait().unwrap() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// A plaintext SDS server on a non-loopback address hands private keys to anyone who can
/// reach it: refused at startup with one line, exit 1.
#[test]
fn non_loopback_tcp_without_mtls_refuses_to_start() {
    let env = Env::new();
    assert!(env.run(&["init", "--ca", "ca1"]).status.success());
    let port = common::free_port();
    let mut child = Running(
        env.cmd(&[
            "sds",
            "serve",
            "--ca",
            "ca1",
            "--dns",
            "a.example",
            "--listen",
            &format!("tcp:0.0.0.0:{port}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap(),
    );
    let st = exits_within(&mut child, 10).expect("a plaintext SDS server started on 0.0.0.0");
    assert_eq!(st.code(), Some(1));
    let mut err = String::new();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let lines: Vec<_> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains(&format!("tcp:0.0.0.0:{port} is not a loopback address"))
            && lines[0].contains("--tls-cert")
            && lines[0].contains("--danger-plaintext-tcp"),
        "{err}"
    );
}

#[test]
fn mtls_flags_must_be_complete() {
    let env = Env::new();
    assert!(env.run(&["init", "--ca", "ca1"]).status.success());
    let tls = [
        "--tls-cert",
        "c.pem",
        "--tls-key",
        "k.pem",
        "--client-ca",
        "ca.pem",
    ];
    let fails = |listen: &str, tls: &[&str], extra: &[&str]| {
        let mut args = vec![
            "sds",
            "serve",
            "--ca",
            "ca1",
            "--dns",
            "a.example",
            "--listen",
            listen,
        ];
        args.extend_from_slice(tls);
        args.extend_from_slice(extra);
        env.fails(&args)
    };
    let lo = "tcp:127.0.0.1:0";
    let e = fails(lo, &tls[..2], &[]);
    assert!(e.contains("--tls-key") || e.contains("--client-ca"), "{e}");
    let e = fails(lo, &tls, &[]);
    assert!(e.contains("allow-list"), "{e}");
    let e = fails(
        lo,
        &tls,
        &[
            "--allow-client-spiffe-id",
            "spiffe://cluster.local/bad path",
        ],
    );
    assert!(e.contains("allow-client-spiffe-id"), "{e}");
    let e = fails("tcp:0.0.0.0:0", &tls, &["--danger-plaintext-tcp"]);
    assert!(e.contains("--danger-plaintext-tcp"), "{e}");
    let e = fails(lo, &tls, &["--allow-client-subject", "CN=x"]);
    assert!(e.contains("c.pem"), "a missing file is named: {e}");
}

/// `meshca sds serve` with mutual TLS, checked with openssl s_client: an allowed client
/// completes the handshake with ALPN h2; a client of the same CA that is not on the
/// allow-list gets the alert access_denied; one without a certificate is refused.
#[test]
fn mtls_serve_checked_with_openssl_s_client() {
    let env = Env::new();
    assert!(env.run(&["init", "--ca", "ca1"]).status.success());
    let issue = |extra: &[&str]| {
        let mut args = vec!["issue", "--ca", "ca1", "--out-dir", "out"];
        args.extend_from_slice(extra);
        let o = env.run(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    issue(&["--dns", "localhost", "--name", "srv"]);
    issue(&[
        "--namespace",
        "mesh",
        "--service-account",
        "envoy",
        "--name",
        "allowed",
    ]);
    issue(&[
        "--namespace",
        "mesh",
        "--service-account",
        "intruder",
        "--name",
        "intruder",
    ]);
    issue(&["--dns", "gw.example", "--name", "bysubject"]);
    let ca = env.path("home/cas/ca1/ca.crt");
    let port = common::free_port();
    let log = std::fs::File::create(env.path("sds.log")).unwrap();
    let p = |s: &str| env.path(s).display().to_string();
    let child = env
        .cmd(&[
            "sds",
            "serve",
            "--ca",
            "ca1",
            "--dns",
            "a.example",
            "--listen",
            &format!("tcp:127.0.0.1:{port}"),
            "--tls-cert",
            &p("out/srv_cert_chain.pem"),
            "--tls-key",
            &p("out/srv_key.pem"),
            "--client-ca",
            &ca.display().to_string(),
            "--allow-client-spiffe-id",
            "spiffe://cluster.local/ns/mesh/sa/envoy",
            "--allow-client-subject",
            "O=cluster.local, CN=gw.example",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let _running = Running(child);
    assert!(
        wait_for(|| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()),
        "server did not listen; log: {}",
        std::fs::read_to_string(env.path("sds.log")).unwrap()
    );
    let s_client = |name: Option<&str>| -> String {
        let mut c = Command::new("openssl");
        c.args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
            .args([
                "-servername",
                "localhost",
                "-verify_return_error",
                "-tls1_2",
            ])
            .args(["-alpn", "h2", "-CAfile"])
            .arg(&ca);
        if let Some(n) = name {
            c.arg("-cert")
                .arg(env.path(&format!("out/{n}_cert.pem")))
                .arg("-key")
                .arg(env.path(&format!("out/{n}_key.pem")));
        }
        let o = c
            .stdin(Stdio::null())
            .output()
            .expect("openssl must be installed (.ci/run installs it)");
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    for ok in ["allowed", "bysubject"] {
        let out = s_client(Some(ok));
        assert!(
            out.contains("Verify return code: 0") && out.contains("ALPN protocol: h2"),
            "{ok}: {out}"
        );
        assert!(!out.contains("alert"), "{ok}: {out}");
    }
    let out = s_client(Some("intruder"));
    assert!(out.contains("alert access denied"), "{out}");
    let out = s_client(None);
    assert!(
        out.contains("alert handshake failure") || out.contains("alert"),
        "{out}"
    );
    let log = std::fs::read_to_string(env.path("sds.log")).unwrap();
    assert!(
        log.contains("spiffe://cluster.local/ns/mesh/sa/intruder") && log.contains("allow-list"),
        "the refusal names the client: {log}"
    );
}

#[test]
fn kube_csr_flags_fail_with_one_line() {
    let env = Env::new();
    let kc = [
        "sds",
        "serve",
        "--source",
        "kube-csr",
        "--listen",
        "tcp:127.0.0.1:0",
    ];
    let with = |extra: &[&str]| {
        let mut v: Vec<&str> = kc.to_vec();
        v.extend_from_slice(extra);
        env.fails(&v)
    };
    let e = with(&[]);
    assert!(e.contains("--signer meshca.io/<ca>"), "{e}");
    let e = with(&["--signer", "example.com/x"]);
    assert!(e.contains("expected meshca.io/<ca>"), "{e}");
    let e = with(&["--signer", "meshca.io/mesh"]);
    assert!(
        e.contains("--trust-bundle-file PATH or --cluster-trust-bundles"),
        "{e}"
    );
    // No identity and no readable token: says so.
    let e = with(&[
        "--signer",
        "meshca.io/mesh",
        "--trust-bundle-file",
        "ca.crt",
        "--token-file",
        "missing-token",
    ]);
    assert!(
        e.contains("service-account token") && e.contains("--namespace"),
        "{e}"
    );
    // A token that is not a service account's.
    std::fs::write(env.path("token"), "a.eyJzdWIiOiJhbGljZSJ9.b").unwrap();
    let e = with(&[
        "--signer",
        "meshca.io/mesh",
        "--trust-bundle-file",
        "ca.crt",
        "--token-file",
        env.path("token").to_str().unwrap(),
    ]);
    assert!(e.contains("\"alice\""), "{e}");
    let e = with(&[
        "--signer",
        "meshca.io/mesh",
        "--trust-bundle-file",
        "ca.crt",
        "--namespace",
        "app",
        "--service-account",
        "blue",
        "--ttl",
        "5m",
    ]);
    assert!(e.contains("below the API minimum of 600s"), "{e}");
    let e = env.fails(&[
        "sds",
        "serve",
        "--ca",
        "ca1",
        "--dns",
        "a.example",
        "--signer",
        "meshca.io/mesh",
    ]);
    assert!(
        e.contains("cannot be used with") || e.contains("--source kube-csr"),
        "{e}"
    );
}
