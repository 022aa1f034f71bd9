//! `meshca-sds`, the SDS server alone for sidecars: `meshca-sds serve` takes the flags of
//! `meshca sds serve` (the same definitions), serves the same secrets, and fails the same way.

use std::process::{Command, Stdio};

mod common;
use common::{http_get, wait_for, Env, Running};

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `meshca-sds ARGS` in the test directory, with its home, like `Env::cmd` runs `meshca`.
fn sidecar(env: &Env, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_meshca-sds"));
    c.args(args)
        .env("MESHCA_HOME", env.home())
        .env_remove("RUST_LOG")
        .current_dir(env.dir.path());
    c
}

#[test]
fn serve_help_is_the_help_of_meshca_sds_serve() {
    let env = Env::new();
    let meshca = env.ok(&["sds", "serve", "--help"]);
    let o = sidecar(&env, &["serve", "--help"]).output().unwrap();
    assert!(o.status.success(), "{}", common::text(&o));
    let ours = String::from_utf8(o.stdout).unwrap();
    // Word for word, flags, defaults and descriptions, but for the program's name.
    assert_eq!(
        ours,
        meshca.replace("Usage: meshca sds serve", "Usage: meshca-sds serve")
    );
    assert!(ours.contains("Usage: meshca-sds serve [OPTIONS]"), "{ours}");
    for flag in [
        "--source",
        "--signer",
        "--cert-file",
        "--worker-threads",
        "--home",
        "--kubeconfig",
    ] {
        assert!(ours.contains(flag), "{flag} not in {ours}");
    }
    let o = sidecar(&env, &["--version"]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("meshca-sds {VERSION}\n")
    );
    // `serve` is its only command.
    let o = sidecar(&env, &["--help"]).output().unwrap();
    let top = String::from_utf8(o.stdout).unwrap();
    let commands: Vec<&str> = top
        .split("Commands:")
        .nth(1)
        .unwrap()
        .split("Options:")
        .next()
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(commands, ["serve", "help"], "{top}");
    assert!(
        top.starts_with("The meshca SDS server alone (`meshca sds serve`)"),
        "{top}"
    );
}

#[test]
fn bad_flags_fail_with_one_line_like_meshca() {
    let env = Env::new();
    for args in [
        &["serve", "--cert-file", "c.pem"][..],
        &[
            "serve",
            "--ca",
            "ca1",
            "--namespace",
            "mesh",
            "--service-account",
            "web",
            "--worker-threads",
            "0",
        ],
        &["serve", "--source", "kube-csr"],
        &["issue"],
    ] {
        let o = sidecar(&env, args).stdin(Stdio::null()).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("meshca-sds: error: "), "{args:?}: {err}");
        if args[0] == "serve" {
            // The same message as `meshca sds serve`.
            let mut theirs = vec!["sds"];
            theirs.extend_from_slice(args);
            let t = env.run(&theirs);
            assert_eq!(t.status.code(), Some(1));
            assert_eq!(
                err.trim_start_matches("meshca-sds: error: ")
                    .replace("meshca-sds serve", "meshca sds serve"),
                String::from_utf8_lossy(&t.stderr).trim_start_matches("meshca: error: "),
                "{args:?}"
            );
        }
    }
}

/// A local CA served on one thread and on two: a FetchSecrets answered, /healthz and /metrics,
/// and a clean exit on SIGTERM that removes the socket.
#[test]
fn serve_answers_fetch_secrets_and_stops_on_sigterm() {
    let env = Env::new();
    env.ok(&["init", "--ca", "ca1"]);
    for workers in ["1", "2"] {
        let sock = env.path(&format!("run{workers}/sds.sock"));
        let sds_port = common::free_port();
        let port = common::free_port();
        let log = env.path(&format!("sds{workers}.log"));
        let child = sidecar(
            &env,
            &[
                "--log-format",
                "json",
                "serve",
                "--ca",
                "ca1",
                "--namespace",
                "mesh",
                "--service-account",
                "web",
                "--ttl",
                "1h",
                "--worker-threads",
                workers,
                "--listen",
                &format!("unix:{}", sock.display()),
                "--listen",
                &format!("tcp:127.0.0.1:{sds_port}"),
                "--metrics",
                &format!("tcp:127.0.0.1:{port}"),
            ],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
        let mut running = Running(child);
        assert!(
            wait_for(|| http_get(port, "/healthz", None).is_some_and(|(c, _, _)| c == 200)),
            "healthz never OK; log: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let fetched = rt.block_on(async {
            use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
            use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
            let mut client =
                SecretDiscoveryServiceClient::connect(format!("http://127.0.0.1:{sds_port}"))
                    .await
                    .unwrap();
            client
                .fetch_secrets(DiscoveryRequest {
                    resource_names: vec!["default".into(), "ROOTCA".into()],
                    type_url: meshca_sds::SECRET_TYPE_URL.into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
        });
        assert_eq!(fetched.resources.len(), 2, "{fetched:?}");
        let (code, _, metrics) = http_get(port, "/metrics", None).unwrap();
        assert_eq!(code, 200);
        assert!(
            metrics.contains("meshca_sds_fetches_total 1\n"),
            "{metrics}"
        );
        assert!(running.terminate().success(), "clean exit on SIGTERM");
        assert!(!sock.exists(), "socket removed");
        let log = std::fs::read_to_string(&log).unwrap();
        assert!(
            log.lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .any(|l| l["fields"]["message"] == "workload certificate obtained"),
            "{log}"
        );
    }
}

/// deploy/sds's sidecar and the kube-csr component run `meshca-sds serve` from the image
/// (deploy/image/build.sh's SIDECAR path), with flags that `meshca-sds serve` has.
#[test]
fn the_sidecar_manifests_run_meshca_sds_serve() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let read = |p: &str| std::fs::read_to_string(repo.join(p)).unwrap();
    let script = read("deploy/image/build.sh");
    let sidecar_path = script
        .lines()
        .find_map(|l| l.strip_prefix("SIDECAR="))
        .expect("build.sh sets SIDECAR");
    let env = Env::new();
    let o = sidecar(&env, &["serve", "--help"]).output().unwrap();
    let help = String::from_utf8(o.stdout).unwrap();
    let container = |p: &str| -> serde_json::Value {
        let doc: serde_json::Value = serde_saphyr::from_str(&read(p)).unwrap();
        doc["spec"]["template"]["spec"]["containers"][0].clone()
    };
    let full = container("deploy/sds/sidecar.yaml");
    assert_eq!(full["name"], "meshca-sds");
    assert_eq!(full["command"], serde_json::json!([sidecar_path]));
    let patch = container("deploy/components/sds-kube-csr/sidecar-patch.yaml");
    assert_eq!(patch["name"], "meshca-sds");
    for c in [&full, &patch] {
        let args: Vec<&str> = c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(args[0], "serve", "{args:?}");
        for a in &args[1..] {
            let flag = a.split('=').next().unwrap();
            assert!(
                help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
                "{flag} is not a flag of meshca-sds serve"
            );
        }
    }
}
