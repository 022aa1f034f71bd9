//! meshca's alerts (deploy/prometheus/rules.yaml): one source for the rule file and the
//! PrometheusRule of deploy/components/prometheus, `promtool check rules` clean, and
//! `promtool test rules deploy/prometheus/rules_test.yaml` passing (a firing and a non-firing
//! case per alert).
//!
//! promtool comes from `tests/prometheus/promtool.sh build` (its Go module, pinned there);
//! `.ci/run` exports its path as `MESHCA_PROMTOOL_BIN`. Without it the promtool tests print
//! why and return; with `CI=true` they fail.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn promtool() -> Option<PathBuf> {
    match std::env::var_os("MESHCA_PROMTOOL_BIN").filter(|v| !v.is_empty()) {
        Some(p) => Some(PathBuf::from(p)),
        None if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("MESHCA_PROMTOOL_BIN is not set: with CI=true the rule tests need promtool (bash tests/prometheus/promtool.sh build)")
        }
        None => {
            eprintln!("skipping: set MESHCA_PROMTOOL_BIN to the path `bash tests/prometheus/promtool.sh build` prints to run promtool on the rules");
            None
        }
    }
}

/// Runs promtool in the repository root; its exit code must be 0 and it must warn about
/// nothing. Returns its output.
fn run_promtool(bin: &Path, args: &[&str]) -> String {
    let o = Command::new(bin)
        .args(args)
        .current_dir(root())
        .output()
        .expect("promtool runs");
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "promtool {args:?}: {out}");
    assert!(
        !out.to_ascii_lowercase().contains("warn"),
        "promtool {args:?} warns: {out}"
    );
    out
}

#[test]
fn the_prometheus_rule_wraps_the_rule_file_unchanged() {
    let file = yaml("deploy/prometheus/rules.yaml");
    let cr = yaml("deploy/components/prometheus/prometheusrule.yaml");
    assert_eq!(cr["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(cr["kind"], "PrometheusRule");
    assert_eq!(
        cr["spec"], file,
        "deploy/components/prometheus/prometheusrule.yaml's spec must be deploy/prometheus/rules.yaml (copy its groups: under spec:)"
    );
    // The component ships it, and a ServiceMonitor.
    let k = yaml("deploy/components/prometheus/kustomization.yaml");
    assert_eq!(k["kind"], "Component");
    let resources: Vec<&str> = k["resources"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(resources, ["servicemonitor.yaml", "prometheusrule.yaml"]);
    // cli/tests/metrics_scrape.rs builds it with kustomize and checks that the ServiceMonitor
    // selects the signer's metrics Service.
}

/// Each alert is fired by some case of rules_test.yaml. (promtool compares each evaluation's
/// alerts exactly, so the series a case leaves silent are its non-firing cases.)
#[test]
fn every_alert_has_a_unit_test_that_fires_it() {
    let file = yaml("deploy/prometheus/rules.yaml");
    let tests = yaml("deploy/prometheus/rules_test.yaml");
    let alerts: Vec<&str> = file["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter_map(|r| r["alert"].as_str())
        .collect();
    assert!(alerts.len() >= 5, "{alerts:?}");
    for alert in alerts {
        let cases: Vec<&Value> = tests["tests"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|t| t["alert_rule_test"].as_array().unwrap())
            .filter(|c| c["alertname"] == alert)
            .collect();
        assert!(
            cases
                .iter()
                .any(|c| !c["exp_alerts"].as_array().unwrap().is_empty()),
            "no firing case for {alert}"
        );
    }
}

#[test]
fn promtool_checks_the_rules_clean() {
    let Some(bin) = promtool() else { return };
    let out = run_promtool(&bin, &["check", "rules", "deploy/prometheus/rules.yaml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn promtool_unit_tests_of_the_rules_pass() {
    let Some(bin) = promtool() else { return };
    let out = run_promtool(
        &bin,
        &["test", "rules", "deploy/prometheus/rules_test.yaml"],
    );
    assert!(out.contains("SUCCESS"), "{out}");
}
