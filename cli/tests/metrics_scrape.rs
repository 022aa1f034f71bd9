//! `/metrics` of the signer and of the SDS server through `promtool check metrics`: exit 0 and
//! nothing printed (no lint problem, no warning), and every metric deploy/prometheus/rules.yaml
//! names is one they export.
//!
//! - in process: every family of both registries with a sample;
//! - real processes: `meshca signer run` against the control plane of tests/cluster (it signs a
//!   CSR, fails one, fills a managed Secret, and drops that Secret's series once it is
//!   deleted) and `meshca sds serve` after a FetchSecrets call.
//!
//! promtool comes from `tests/prometheus/promtool.sh build`; `.ci/run` exports its path as
//! `MESHCA_PROMTOOL_BIN`, and `MESHCA_E2E_KUBECONFIG`/`MESHCA_E2E_KUBECTL` for the cluster.
//! Without them a test prints why and returns; with `CI=true` it fails.

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cluster::Cluster;
use common::*;
use serde_json::{json, Value};

fn promtool() -> Option<PathBuf> {
    peer(
        "MESHCA_PROMTOOL_BIN",
        "the path `bash tests/prometheus/promtool.sh build` prints",
    )
}

/// `promtool check metrics` on `exposition`: exit 0 and no output at all.
fn check_metrics(promtool: &Path, what: &str, exposition: &str) {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    let mut input = child.stdin.take().unwrap();
    input.write_all(exposition.as_bytes()).unwrap();
    drop(input);
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success() && o.stdout.is_empty() && o.stderr.is_empty(),
        "promtool check metrics on {what}: {:?} {}\n{exposition}",
        o.status,
        text(&o)
    );
}

/// The metric families an exposition in the classic text format declares.
fn families(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect()
}

/// The `meshca_*` metric names deploy/prometheus/rules.yaml uses.
fn rule_metrics() -> BTreeSet<String> {
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/rules.yaml");
    let text = std::fs::read_to_string(rules).unwrap();
    let exprs: Vec<String> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(str::to_string)
        .collect();
    let mut out = BTreeSet::new();
    for line in exprs {
        for token in line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if token.starts_with("meshca_") {
                out.insert(token.to_string());
            }
        }
    }
    out
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out after {secs} s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn every_family_of_the_signer_and_the_sds_server_passes_promtool() {
    let Some(promtool) = promtool() else { return };
    // The signer's registry with a sample in every family.
    use meshca::kube::metrics::{CaLabel, CertSeries, Metrics, PcrRefusalLabel, ReasonLabel};
    let m = Metrics::new();
    m.csr_reconciles.inc();
    m.csrs_signed.inc();
    m.csrs_failed
        .get_or_create(&ReasonLabel {
            reason: "MeshcaPolicyDenied".into(),
        })
        .inc();
    m.csr_conflicts.inc();
    m.csrs_approved.inc();
    m.csrs_denied.inc();
    m.sign_duration.observe(0.02);
    m.issue_latency.observe(0.2);
    m.managed_issued.inc();
    m.managed_failed.inc();
    m.bundle_applied.inc();
    m.ledger_entries.inc();
    m.ledger_failures.inc();
    m.ledger_backlog.set(2);
    m.controllers.ready("csr-signer");
    m.controllers.failed("managed:app", "forbidden");
    m.ca_reloads.inc();
    let mesh = CaLabel { ca: "mesh".into() };
    m.ca_expiration.get_or_create(&mesh).set(2_000_000_000);
    m.set_ca_ready("mesh", true);
    m.set_ca_ready("gateway", false);
    m.ca_load_errors
        .get_or_create(&CaLabel {
            ca: "gateway".into(),
        })
        .inc();
    m.leader.set(1);
    m.pcrs_issued.inc();
    m.pcrs_refused
        .get_or_create(&PcrRefusalLabel {
            condition: "Denied".into(),
            reason: "UnsupportedKeyType".into(),
        })
        .inc();
    m.managed_certs.set(
        "app",
        "web-tls",
        CertSeries {
            ca: "mesh".into(),
            not_after: Some(2_000_000_000),
            renewal: 1_900_000_000,
            ready: true,
        },
        1_800_000_000,
    );
    let (code, ctype, signer) = m.respond("/metrics");
    assert_eq!(code, 200);
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    check_metrics(&promtool, "the signer's registry", &signer);
    for f in [
        "meshca_ca_expiration_timestamp_seconds",
        "meshca_ca_ready_status",
        "meshca_managed_secret_expiration_timestamp_seconds",
        "meshca_managed_secret_renewal_timestamp_seconds",
        "meshca_managed_secret_ready_status",
        "meshca_csrs_failed_total",
        "meshca_leader",
    ] {
        assert!(families(&signer).contains(f), "{f} not in {signer}");
    }

    // The SDS server's, with the kube-csr source's series too.
    let s = meshca_sds::Metrics::default();
    s.cert_expiry
        .store(2_000_000_000, std::sync::atomic::Ordering::Relaxed);
    s.cert_renewal
        .store(1_950_000_000, std::sync::atomic::Ordering::Relaxed);
    s.fetches.store(1, std::sync::atomic::Ordering::Relaxed);
    s.nacks.add(meshca_sds::metrics::Mode::Sotw, 1);
    s.csr_issued.store(1, std::sync::atomic::Ordering::Relaxed);
    s.record_csr_refusal("Denied", "MeshcaPolicyDenied", "not \"allowed\"\nhere");
    let sds = s.render();
    check_metrics(&promtool, "the SDS server's registry", &sds);

    // Every metric an alert reads exists (a renamed metric would silence its alert).
    let exported: BTreeSet<String> = families(&signer).union(&families(&sds)).cloned().collect();
    let missing: Vec<_> = rule_metrics().difference(&exported).cloned().collect();
    assert!(
        missing.is_empty(),
        "rules.yaml reads {missing:?}, which nothing exports"
    );
}

#[test]
fn the_running_signer_and_sds_server_pass_promtool_check_metrics() {
    let Some(promtool) = promtool() else { return };
    let Some(cluster) = Cluster::from_env("the metrics scrape test") else {
        return;
    };
    let env = Env::new();
    let id = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
            % 1_000_000
    );
    let ns = format!("meshca-metrics-{id}");
    let ca = format!("metrics-{id}");
    cluster.kubectl(&["create", "namespace", &ns]);
    let csrs = [format!("{ns}-ok"), format!("{ns}-refused")];
    // Removes what the test created on the shared control plane, pass or fail.
    struct Cleanup<'a>(&'a Cluster, &'a str, &'a [String]);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            for c in self.2 {
                let _ = self
                    .0
                    .kubectl_in(&["delete", "csr", c, "--ignore-not-found"], None);
            }
            let _ = self
                .0
                .kubectl_in(&["delete", "namespace", self.1, "--wait=false"], None);
        }
    }
    let _cleanup = Cleanup(&cluster, &ns, &csrs);

    let web = format!("web.{ns}.svc");
    env.ok(&[
        "init",
        "--ca",
        &ca,
        "--allow-dns",
        &web,
        "--managed-namespace",
        &ns,
    ]);
    let signer_port = free_port();
    let signer_log = env.path("signer.log");
    let _signer = Running(
        env.cmd(&[
            "--kubeconfig",
            cluster.kubeconfig.to_str().unwrap(),
            "signer",
            "run",
            "--ca",
            &ca,
            "--metrics-addr",
            &format!("127.0.0.1:{signer_port}"),
            "--lease-namespace",
            &ns,
            "--identity",
            "metrics-0",
            "--managed-namespace",
            &ns,
            "--cluster-trust-bundles",
            "false",
        ])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&signer_log).unwrap())
        .spawn()
        .unwrap(),
    );
    let signer_metrics = || http_get(signer_port, "/metrics", None).map(|(_, _, b)| b);
    let log = || std::fs::read_to_string(&signer_log).unwrap_or_default();
    wait_for("the signer to lead", 60, || {
        signer_metrics().is_some_and(|b| b.contains("\nmeshca_leader 1\n"))
    });

    // A CSR it signs and one it fails (a name its policy does not allow), both approved by
    // the admin; a managed Secret it fills.
    for (name, dns) in [(&csrs[0], web.as_str()), (&csrs[1], "other.example.com")] {
        let csr = openssl_csr(&env, name, P256, &[&format!("subjectAltName=DNS:{dns}")]);
        let request = pem::parse(std::fs::read(&csr).unwrap()).unwrap();
        let body = json!({
            "apiVersion": "certificates.k8s.io/v1",
            "kind": "CertificateSigningRequest",
            "metadata": {"name": name},
            "spec": {
                "request": base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    pem::encode(&request),
                ),
                "signerName": format!("meshca.io/{ca}"),
                "usages": ["digital signature", "server auth"],
            }
        });
        cluster.kubectl_stdin(&["create", "-f", "-"], &body.to_string());
        cluster.kubectl(&["certificate", "approve", name]);
    }
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "web-tls", "namespace": ns,
                     "labels": {"meshca.io/managed": "true"},
                     "annotations": {"meshca.io/ca": ca, "meshca.io/dns-names": web}},
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": "", "tls.key": ""},
    });
    cluster.kubectl_stdin(&["create", "-f", "-"], &secret.to_string());
    wait_for("the CSR to be signed", 60, || {
        cluster.json(&["get", "csr", &csrs[0]])["status"]["certificate"].is_string()
    });
    let series = format!(
        "meshca_managed_secret_expiration_timestamp_seconds{{namespace=\"{ns}\",name=\"web-tls\",ca=\"{ca}\"}}"
    );
    wait_for("the signer's metrics to show the activity", 60, || {
        signer_metrics().is_some_and(|b| {
            b.contains("\nmeshca_csrs_signed_total 1\n")
                && b.contains("meshca_csrs_failed_total{reason=\"MeshcaPolicyDenied\"} 1")
                && b.contains(&series)
        })
    });
    let (code, ctype, body) = http_get(signer_port, "/metrics", None).unwrap();
    assert_eq!(code, 200);
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    check_metrics(&promtool, "meshca signer run's /metrics", &body);
    let leaf = cluster.json(&["get", "secret", "web-tls", "-n", &ns])["data"]["tls.crt"]
        .as_str()
        .map(|b| base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b).unwrap())
        .expect("the managed Secret is filled");
    let info = meshca::x509::CertInfo::from_der(
        &meshca::pemutil::parse_certs(&leaf, "tls.crt").unwrap()[0],
    )
    .unwrap();
    assert!(
        body.contains(&format!("{series} {}\n", info.not_after.unix_timestamp())),
        "{body}"
    );
    for line in [
        format!("meshca_ca_ready_status{{ca=\"{ca}\",condition=\"True\"}} 1"),
        format!("meshca_ca_expiration_timestamp_seconds{{ca=\"{ca}\"}} "),
        format!(
            "meshca_managed_secret_ready_status{{namespace=\"{ns}\",name=\"web-tls\",ca=\"{ca}\",condition=\"True\"}} 1"
        ),
    ] {
        assert!(body.contains(&line), "{line} not in {body}\nlog: {}", log());
    }
    // Prometheus asks for OpenMetrics and gets it.
    let (_, ctype, om) = http_get(
        signer_port,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0;q=0.6,text/plain;version=0.0.4;q=0.3"),
    )
    .unwrap();
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    assert!(om.trim_end().ends_with("# EOF"), "{om}");

    // The Secret is deleted: its series leave with it (no stale series).
    cluster.kubectl(&["delete", "secret", "web-tls", "-n", &ns]);
    wait_for("the deleted Secret's series to go", 30, || {
        signer_metrics().is_some_and(|b| !b.contains(&format!("name=\"web-tls\",ca=\"{ca}\"")))
    });

    // The SDS server, from the same CA, after one FetchSecrets.
    let sds_port = free_port();
    let sds_metrics_port = free_port();
    let _sds = Running(
        env.cmd(&[
            "sds",
            "serve",
            "--ca",
            &ca,
            "--namespace",
            &ns,
            "--service-account",
            "web",
            "--ttl",
            "1h",
            "--listen",
            &format!("tcp:127.0.0.1:{sds_port}"),
            "--metrics",
            &format!("tcp:127.0.0.1:{sds_metrics_port}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(env.path("sds.log")).unwrap())
        .spawn()
        .unwrap(),
    );
    wait_for("the SDS server to be healthy", 30, || {
        http_get(sds_metrics_port, "/healthz", None).is_some_and(|(c, _, _)| c == 200)
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let fetched = rt.block_on(async {
        use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
        use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
        let mut client = SecretDiscoveryServiceClient::connect(format!("http://127.0.0.1:{sds_port}"))
            .await
            .unwrap();
        client
            .fetch_secrets(DiscoveryRequest {
                resource_names: vec!["default".into()],
                type_url: meshca_sds::SECRET_TYPE_URL.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    });
    assert_eq!(fetched.resources.len(), 1);
    let (code, _, sds) = http_get(sds_metrics_port, "/metrics", None).unwrap();
    assert_eq!(code, 200);
    for line in [
        "meshca_sds_fetches_total 1\n",
        "meshca_sds_certificate_expiration_timestamp_seconds{name=\"default\"} ",
        "meshca_sds_certificate_renewal_timestamp_seconds{name=\"default\"} ",
    ] {
        assert!(sds.contains(line), "{line} not in {sds}");
    }
    check_metrics(&promtool, "meshca sds serve's /metrics", &sds);
}

/// deploy/ with the prometheus component, as a user's overlay builds it with kustomize: the
/// PrometheusRule holds rules.yaml's groups, and the ServiceMonitor selects the signer's
/// metrics Service by labels it carries, on a port it has.
#[test]
fn the_prometheus_component_builds_with_kustomize() {
    let Some(cluster) = Cluster::from_env("the metrics scrape test") else {
        return;
    };
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // kustomize takes only relative paths, so the overlay lives in the target directory.
    let overlay = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let deploy = relative(overlay.path(), &repo.join("deploy"));
    std::fs::write(
        overlay.path().join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {d}\ncomponents:\n  - {d}/components/prometheus\n",
            d = deploy.display()
        ),
    )
    .unwrap();
    let rendered = cluster.kubectl(&["kustomize", overlay.path().to_str().unwrap()]);
    let docs: Vec<Value> = serde_saphyr::from_str_multiple::<Value, Vec<Value>>(&rendered).unwrap();
    let find = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} in {rendered}"))
    };
    let rules: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(repo.join("deploy/prometheus/rules.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(find("PrometheusRule")["spec"], rules);
    let (sm, svc) = (find("ServiceMonitor"), find("Service"));
    assert_eq!(sm["metadata"]["namespace"], svc["metadata"]["namespace"]);
    for (k, v) in sm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&svc["metadata"]["labels"][k], v, "Service label {k}");
    }
    let port = &sm["spec"]["endpoints"][0]["port"];
    assert!(
        svc["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| &p["name"] == port),
        "{svc}"
    );
}
