//! The Helm chart `deploy/helm/meshca`: linted (`helm lint --strict`), rendered and validated
//! with kubernetes-validate for the oldest and newest Kubernetes we support, checked against the
//! kustomize tree (`kubectl kustomize`) so the two cannot drift, its schema rejecting wrong
//! values, its README table and alert rules checked against their sources; then installed on a
//! real control plane, the signer run as a process under the chart's ServiceAccount token
//! (TokenRequest) with exactly the chart's RBAC, upgraded with features turned off, and
//! uninstalled.
//!
//! Peers: helm built from its Go module (tests/helm/build.sh; `.ci/run` exports
//! `MESHCA_HELM_BIN`), kubectl and the cluster of tests/cluster/cluster.sh (`MESHCA_E2E_*`),
//! kubernetes-validate (PyPI). Without them a test prints why and returns; with `CI=true` it
//! fails.
//!
//! Drift check, how: the chart is rendered with release name `meshca` in namespace `meshca`
//! (which gives deploy/'s object names) and with the values that match a kustomize overlay;
//! both outputs are reduced to what matters to the cluster: the set of rights the signer's
//! ServiceAccount gets (scope, apiGroup, resource, resourceName, verb, from every Role and
//! ClusterRole bound to it, however they are split into objects), and the signer Deployment's
//! pod and container (image, pull policy, args as a set, env, ports, probes, resources, both
//! securityContexts, service account, replicas, strategy), the metrics Service's ports and the
//! PodDisruptionBudget. Labels, selectors and object names of the chart's own RBAC objects are
//! free to differ (the chart adds the Helm labels and splits ClusterTrustBundle rights into
//! their own ClusterRole so that they can be turned off).

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use cluster::{relative, repo, text, Cluster, Replica};

fn helm_bin() -> Option<PathBuf> {
    common::peer(
        "MESHCA_HELM_BIN",
        "export MESHCA_HELM_BIN=$(bash tests/helm/build.sh)",
    )
}

fn kubectl_bin() -> Option<PathBuf> {
    common::peer(
        "MESHCA_E2E_KUBECTL",
        "kubectl renders the kustomize tree: source the env.sh of tests/cluster/cluster.sh",
    )
}

fn chart() -> PathBuf {
    repo().join("deploy/helm/meshca")
}

struct Helm {
    bin: PathBuf,
    dir: tempfile::TempDir,
}

impl Helm {
    fn new() -> Option<Helm> {
        Some(Helm {
            bin: helm_bin()?,
            dir: tempfile::tempdir().unwrap(),
        })
    }

    /// helm with its state (config, cache, repositories) in a temporary directory.
    fn run(&self, args: &[&str], kubeconfig: Option<&Path>) -> Output {
        let mut c = Command::new(&self.bin);
        c.args(args)
            .env("HELM_CONFIG_HOME", self.dir.path().join("config"))
            .env("HELM_CACHE_HOME", self.dir.path().join("cache"))
            .env("HELM_DATA_HOME", self.dir.path().join("data"))
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null());
        if let Some(k) = kubeconfig {
            c.arg("--kubeconfig").arg(k);
        }
        c.output().expect("helm")
    }

    fn ok(&self, args: &[&str], kubeconfig: Option<&Path>) -> String {
        let o = self.run(args, kubeconfig);
        assert!(o.status.success(), "helm {args:?}: {}", text(&o));
        String::from_utf8(o.stdout).unwrap()
    }

    /// A values file holding `values` (JSON is YAML).
    fn values(&self, name: &str, values: &Value) -> PathBuf {
        let p = self.dir.path().join(format!("{name}.yaml"));
        std::fs::write(&p, serde_json::to_vec_pretty(values).unwrap()).unwrap();
        p
    }

    /// `helm template meshca CHART -n meshca -f VALUES`: its output and exit status.
    fn template_raw(&self, values: &Value) -> Output {
        let f = self.values("template", values);
        self.run(
            &[
                "template",
                "meshca",
                chart().to_str().unwrap(),
                "--namespace",
                "meshca",
                "-f",
                f.to_str().unwrap(),
            ],
            None,
        )
    }

    fn template(&self, values: &Value) -> String {
        let o = self.template_raw(values);
        assert!(o.status.success(), "helm template {values}: {}", text(&o));
        String::from_utf8(o.stdout).unwrap()
    }
}

/// The documents of a YAML stream.
fn docs(text: &str) -> Vec<Value> {
    serde_saphyr::from_str_multiple::<Value, Vec<Value>>(text)
        .unwrap_or_else(|e| panic!("{e}\n{text}"))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

fn kind<'a>(objs: &'a [Value], k: &str, name: &str) -> Option<&'a Value> {
    objs.iter()
        .find(|o| o["kind"] == k && o["metadata"]["name"] == name)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// One right: (namespace or "" for cluster-wide, apiGroup, resource, resourceName or "",
/// verb).
type Right = (String, String, String, String, String);

/// Whether a right belongs to a feature.
type Belongs = fn(&Right) -> bool;

/// Every right that Roles and ClusterRoles bound to ServiceAccount `ns/sa` give it.
fn rights(objs: &[Value], ns: &str, sa: &str) -> BTreeSet<Right> {
    let mut out = BTreeSet::new();
    for b in objs
        .iter()
        .filter(|o| o["kind"] == "RoleBinding" || o["kind"] == "ClusterRoleBinding")
    {
        let bound = b["subjects"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["kind"] == "ServiceAccount" && s["name"] == sa && s["namespace"] == ns);
        if !bound {
            continue;
        }
        let scope = if b["kind"] == "RoleBinding" {
            b["metadata"]["namespace"].as_str().unwrap().to_string()
        } else {
            String::new()
        };
        let role_kind = b["roleRef"]["kind"].as_str().unwrap();
        let role = objs
            .iter()
            .find(|o| {
                o["kind"] == role_kind
                    && o["metadata"]["name"] == b["roleRef"]["name"]
                    && (role_kind == "ClusterRole"
                        || o["metadata"]["namespace"].as_str() == Some(&scope))
            })
            .unwrap_or_else(|| panic!("{}: its {role_kind} is not rendered", b["metadata"]));
        for rule in role["rules"].as_array().into_iter().flatten() {
            let names = strings(&rule["resourceNames"]);
            let names = if names.is_empty() {
                vec![String::new()]
            } else {
                names
            };
            for g in strings(&rule["apiGroups"]) {
                for r in strings(&rule["resources"]) {
                    for n in &names {
                        for v in strings(&rule["verbs"]) {
                            out.insert((scope.clone(), g.clone(), r.clone(), n.clone(), v));
                        }
                    }
                }
            }
        }
    }
    out
}

/// What of the signer Deployment must be the same in both trees.
fn deployment_shape(objs: &[Value]) -> Value {
    let d = kind(objs, "Deployment", "meshca-signer").expect("Deployment meshca-signer");
    let pod = &d["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let mut args = strings(&c["args"]);
    args.sort();
    json!({
        "replicas": d["spec"]["replicas"],
        "strategy": d["spec"]["strategy"],
        "serviceAccountName": pod["serviceAccountName"],
        "terminationGracePeriodSeconds": pod["terminationGracePeriodSeconds"],
        "podSecurityContext": pod["securityContext"],
        "containers": pod["containers"].as_array().unwrap().len(),
        "image": c["image"],
        "imagePullPolicy": c["imagePullPolicy"],
        "args": args,
        "env": c["env"],
        "ports": c["ports"],
        "livenessProbe": c["livenessProbe"],
        "readinessProbe": c["readinessProbe"],
        "resources": c["resources"],
        "securityContext": c["securityContext"],
    })
}

fn service_and_pdb(objs: &[Value]) -> Value {
    let svc = kind(objs, "Service", "meshca-signer-metrics").expect("metrics Service");
    let pdb = kind(objs, "PodDisruptionBudget", "meshca-signer").expect("PDB");
    json!({"ports": svc["spec"]["ports"], "minAvailable": pdb["spec"]["minAvailable"]})
}

/// `kubectl kustomize` of an overlay with these resources and components (paths relative to
/// deploy/).
fn kustomize(kubectl: &Path, resources: &[&str], components: &[&str]) -> Vec<Value> {
    let overlay = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let deploy = relative(overlay.path(), &repo().join("deploy"));
    let list = |xs: &[&str]| {
        xs.iter()
            .map(|x| format!("  - {}/{x}\n", deploy.display()))
            .collect::<String>()
    };
    std::fs::write(
        overlay.path().join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n{}components:\n{}",
            list(resources),
            if components.is_empty() { "  []\n".to_string() } else { list(components) }
        ),
    )
    .unwrap();
    let o = Command::new(kubectl)
        .args(["kustomize", overlay.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "kubectl kustomize: {}", text(&o));
    docs(&String::from_utf8(o.stdout).unwrap())
}

fn show(rights: &BTreeSet<Right>) -> String {
    rights
        .iter()
        .map(|r| format!("  {r:?}\n"))
        .collect::<String>()
}

#[test]
fn chart_renders_what_the_kustomize_overlays_install() {
    let (Some(h), Some(kubectl)) = (Helm::new(), kubectl_bin()) else {
        return;
    };
    // (kustomize resources, components) and the chart values that mean the same.
    let cases: Vec<(&str, Vec<&str>, Vec<&str>, Value)> = vec![
        ("deploy/", vec!["."], vec![], json!({})),
        (
            "deploy/examples + auto-approve + pod-certificates",
            vec!["examples"],
            vec!["components/auto-approve", "components/pod-certificates"],
            json!({"autoApprove": true, "podCertificates": true, "managedNamespaces": ["demo"]}),
        ),
        (
            "deploy/ + examples/sds-kube-csr + auto-approve",
            vec![".", "examples/sds-kube-csr"],
            vec!["components/auto-approve"],
            json!({"autoApprove": true, "trustBundleNamespaces": ["mesh"]}),
        ),
    ];
    for (name, resources, components, values) in cases {
        let k = kustomize(&kubectl, &resources, &components);
        let c = docs(&h.template(&values));
        let (kr, cr) = (
            rights(&k, "meshca", "meshca-signer"),
            rights(&c, "meshca", "meshca-signer"),
        );
        assert!(!kr.is_empty(), "{name}: kustomize grants nothing");
        assert_eq!(
            kr,
            cr,
            "{name}: the signer's rights differ.\nonly kustomize:\n{}only the chart ({values}):\n{}",
            show(&kr.difference(&cr).cloned().collect()),
            show(&cr.difference(&kr).cloned().collect())
        );
        assert_eq!(
            deployment_shape(&k),
            deployment_shape(&c),
            "{name}: the signer Deployment differs (left kustomize, right the chart with {values})"
        );
        assert_eq!(service_and_pdb(&k), service_and_pdb(&c), "{name}");
        eprintln!(
            "{name}: {} rights, Deployment and Service equal to the chart with {values}",
            kr.len()
        );
    }
}

/// Every feature on, as the lint and validation tests render it.
fn all_on() -> Value {
    json!({
        "cas": ["mesh", "gateway"],
        "autoApprove": true,
        "podCertificates": true,
        "clusterTrustBundles": true,
        "managedNamespaces": ["demo", "apps"],
        "trustBundleNamespaces": ["mesh"],
        "replicas": 3,
        "image": {"digest": format!("sha256:{}", "ab".repeat(32)), "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "registry"}],
        "extraArgs": ["--ttl-over-policy=cap", "--qps=100"],
        "serviceAccount": {"annotations": {"example.com/owner": "platform"}},
        "namespace": {"create": true},
        "podAnnotations": {"example.com/scrape": "true"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "pki", "effect": "NoSchedule"}],
        "priorityClassName": "system-cluster-critical",
        "metrics": {"serviceMonitor": {"enabled": true, "labels": {"release": "prom"}},
                    "prometheusRule": {"enabled": true, "labels": {"release": "prom"}}},
    })
}

#[test]
fn a_feature_that_is_off_grants_nothing_for_it() {
    let Some(h) = Helm::new() else { return };
    let sa = |objs: &[Value]| rights(objs, "meshca", "meshca-signer");
    let on = sa(&docs(&h.template(&all_on())));
    let with = |patch: Value| {
        let mut v = all_on();
        for (k, x) in patch.as_object().unwrap() {
            v[k] = x.clone();
        }
        sa(&docs(&h.template(&v)))
    };
    let matching = |rs: &BTreeSet<Right>, f: &dyn Fn(&Right) -> bool| -> BTreeSet<Right> {
        rs.iter().filter(|r| f(r)).cloned().collect()
    };
    // (feature turned off, the rights that belong to it)
    let features: Vec<(Value, Belongs)> = vec![
        (json!({"autoApprove": false}), |r: &Right| {
            r.4 == "approve" || r.2 == "certificatesigningrequests/approval"
        }),
        (json!({"podCertificates": false}), |r: &Right| {
            r.2.starts_with("podcertificaterequests")
        }),
        (json!({"clusterTrustBundles": false}), |r: &Right| {
            r.2 == "clustertrustbundles" || r.4 == "attest"
        }),
        (json!({"managedNamespaces": []}), |r: &Right| {
            r.0 == "demo" || r.0 == "apps"
        }),
        (json!({"trustBundleNamespaces": []}), |r: &Right| {
            r.0 == "mesh"
        }),
        (
            json!({"leaderElection": {"enabled": false}, "replicas": 1}),
            |r: &Right| r.2 == "leases",
        ),
    ];
    for (off, belongs) in features {
        let theirs = matching(&on, &belongs);
        assert!(!theirs.is_empty(), "all on: no rights for {off}");
        let without = with(off.clone());
        assert!(
            matching(&without, &belongs).is_empty(),
            "{off}: still granted:\n{}",
            show(&matching(&without, &belongs))
        );
        // Turning one feature off removes its rights and nothing else.
        let removed: BTreeSet<Right> = on.difference(&without).cloned().collect();
        assert_eq!(removed, theirs, "{off}");
        assert!(without.is_subset(&on), "{off}: adds rights");
    }
    // Only the listed CAs' signer names; a Secret is written only in managed namespaces.
    for r in on.iter().filter(|r| r.2 == "signers") {
        assert!(
            r.3 == "meshca.io/mesh" || r.3 == "meshca.io/gateway",
            "signer right beyond cas: {r:?}"
        );
    }
    for r in on.iter().filter(|r| r.2 == "secrets") {
        let write = !matches!(r.4.as_str(), "get" | "list" | "watch");
        assert!(
            !write || r.0 == "demo" || r.0 == "apps",
            "Secret write right outside managedNamespaces: {r:?}"
        );
    }
    assert!(
        on.iter()
            .filter(|r| r.0 == "mesh")
            .all(|r| r.2 == "configmaps"),
        "trustBundleNamespaces grant ConfigMaps only"
    );
    // And the Deployment asks for exactly the features that are on.
    let args = |v: &Value| {
        let objs = docs(&h.template(v));
        strings(
            &kind(&objs, "Deployment", "meshca-signer").unwrap()["spec"]["template"]["spec"]
                ["containers"][0]["args"],
        )
    };
    let a = args(&all_on());
    for want in [
        "--ca=mesh",
        "--ca=gateway",
        "--auto-approve",
        "--pod-certificates",
        "--managed-namespace=demo",
        "--managed-namespace=apps",
        "--ttl-over-policy=cap",
    ] {
        assert!(a.contains(&want.to_string()), "{want} not in {a:?}");
    }
    let d = args(&json!({}));
    for absent in [
        "--auto-approve",
        "--pod-certificates",
        "--managed-namespace",
    ] {
        assert!(
            !d.iter().any(|x| x.starts_with(absent)),
            "{absent} in {d:?}"
        );
    }
    let no_ctb = args(&json!({"clusterTrustBundles": false}));
    assert!(no_ctb.contains(&"--cluster-trust-bundles=false".to_string()));
}

#[test]
fn the_chart_owns_no_secret_and_keeps_the_namespace_it_creates() {
    let Some(h) = Helm::new() else { return };
    for values in [json!({}), all_on()] {
        let objs = docs(&h.template(&values));
        assert!(
            objs.iter().all(|o| o["kind"] != "Secret"),
            "{values}: the chart renders a Secret, which `helm uninstall` would delete"
        );
        let ns: Vec<&Value> = objs.iter().filter(|o| o["kind"] == "Namespace").collect();
        if values["namespace"]["create"] == true {
            assert_eq!(ns.len(), 1, "{values}");
            assert_eq!(
                ns[0]["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
                "a Namespace the chart creates must survive uninstall (it holds the CA Secrets)"
            );
            assert_eq!(
                ns[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
                "restricted"
            );
        } else {
            assert!(ns.is_empty(), "{values}");
        }
    }
}

#[test]
fn helm_lint_strict_passes_for_default_and_every_feature_on() {
    let Some(h) = Helm::new() else { return };
    let all = h.values("all-on", &all_on());
    let chart = chart();
    let chart = chart.to_str().unwrap();
    for args in [
        vec!["lint", "--strict", chart],
        vec!["lint", "--strict", chart, "-f", all.to_str().unwrap()],
    ] {
        let out = h.ok(&args, None);
        assert!(
            out.contains("1 chart(s) linted, 0 chart(s) failed"),
            "{out}"
        );
        assert!(
            !out.contains("[WARNING]") && !out.contains("[ERROR]"),
            "{out}"
        );
    }
}

#[test]
fn rendered_chart_is_valid_kubernetes_1_34_and_1_37() {
    let Some(h) = Helm::new() else { return };
    let ok = Command::new("kubernetes-validate")
        .arg("--version")
        .output();
    let version = match ok {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ if std::env::var("CI").as_deref() == Ok("true") => {
            panic!(
                "kubernetes-validate does not run and CI is set (pip install kubernetes-validate)"
            )
        }
        _ => {
            eprintln!(
                "skipping: kubernetes-validate not installed (pip install kubernetes-validate)"
            );
            return;
        }
    };
    for (name, values) in [("default", json!({})), ("all-on", all_on())] {
        let manifest = h.template(&values);
        let objs = docs(&manifest);
        // kubernetes-validate knows the built-in kinds only: it warns that it has no schema for
        // the prometheus-operator resources (CRDs), whose shape is checked below instead.
        let (crds, builtin): (Vec<&Value>, Vec<&Value>) = objs
            .iter()
            .partition(|o| o["apiVersion"] == "monitoring.coreos.com/v1");
        let file = h.dir.path().join(format!("{name}.yaml"));
        std::fs::write(&file, &manifest).unwrap();
        for k8s in ["1.34.0", "1.37.0"] {
            let o = Command::new("kubernetes-validate")
                .args(["--strict", "-k", k8s])
                .arg(&file)
                .output()
                .unwrap();
            let out = text(&o);
            let short = k8s.trim_end_matches(".0");
            let passed = out
                .lines()
                .filter(|l| {
                    l.starts_with("INFO") && l.contains(&format!("against version {short}"))
                })
                .count();
            assert!(
                o.status.success() && !out.contains("ERROR") && passed == builtin.len(),
                "kubernetes-validate --strict -k {k8s}, {name} ({} built-in objects): {out}",
                builtin.len()
            );
            for l in out.lines().filter(|l| l.starts_with("WARN")) {
                assert!(
                    l.contains("Couldn't find schema for kind ServiceMonitor")
                        || l.contains("Couldn't find schema for kind PrometheusRule"),
                    "{name} on {k8s}: {l}"
                );
            }
        }
        if name == "all-on" {
            assert_eq!(crds.len(), 2, "ServiceMonitor and PrometheusRule");
            let sm = crds.iter().find(|o| o["kind"] == "ServiceMonitor").unwrap();
            assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
            let pr = crds.iter().find(|o| o["kind"] == "PrometheusRule").unwrap();
            let alerts: Vec<&str> = pr["spec"]["groups"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|g| g["rules"].as_array().unwrap())
                .filter_map(|r| r["alert"].as_str())
                .collect();
            assert!(alerts.contains(&"MeshcaSignerNoLeader"), "{alerts:?}");
        } else {
            assert!(crds.is_empty());
        }
        eprintln!(
            "{name}: {} objects valid for Kubernetes 1.34.0 and 1.37.0 (kubernetes-validate {version}, --strict)",
            builtin.len()
        );
    }
}

#[test]
fn schema_rejects_a_wrong_value_with_one_message_naming_it() {
    let Some(h) = Helm::new() else { return };
    for (values, want) in [
        (json!({"autoApprove": "yes"}), "autoApprove"),
        (json!({"autoAprove": true}), "autoAprove"),
        (json!({"image": {"tag": "1", "registry": "x"}}), "registry"),
        (
            json!({"managedNamespaces": ["Not_A_Namespace"]}),
            "managedNamespaces",
        ),
        (json!({"cas": ["mesh", "mesh"]}), "cas"),
        (json!({"replicas": 0}), "replicas"),
        (json!({"logLevel": "verbose"}), "logLevel"),
        (json!({"extraArgs": ["ttl-over-policy=cap"]}), "extraArgs"),
        (json!({"image": {"digest": "latest"}}), "digest"),
        (
            json!({"leaderElection": {"enabled": false}}),
            "leaderElection.enabled=false needs replicas: 1",
        ),
        (
            json!({"managedNamespaces": ["mesh"], "trustBundleNamespaces": ["mesh"]}),
            "in both managedNamespaces and trustBundleNamespaces",
        ),
        (
            json!({"managedNamespaces": ["meshca"]}),
            "is the release namespace",
        ),
    ] {
        let o = h.template_raw(&values);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!o.status.success(), "{values}: accepted");
        assert!(o.stdout.is_empty(), "{values}: printed manifests");
        assert!(
            err.contains(want),
            "{values}: the error does not name {want}: {err}"
        );
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(lines.len() <= 4, "{values}: not one clear message: {err}");
        eprintln!("{values}: {}", lines.join(" / "));
    }
}

/// `a.b.c` -> value for every leaf of values.yaml (a non-empty map is not a leaf).
fn leaves(v: &Value, prefix: &str, out: &mut BTreeMap<String, Value>) {
    match v.as_object() {
        Some(m) if !m.is_empty() => {
            for (k, x) in m {
                leaves(x, &format!("{prefix}{k}."), out);
            }
        }
        _ => {
            out.insert(prefix.trim_end_matches('.').to_string(), v.clone());
        }
    }
}

#[test]
fn readme_values_table_lists_every_value_with_its_default() {
    let values: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(chart().join("values.yaml")).unwrap())
            .unwrap();
    let mut want = BTreeMap::new();
    leaves(&values, "", &mut want);
    let readme = std::fs::read_to_string(chart().join("README.md")).unwrap();
    let table = readme
        .split("## Values")
        .nth(1)
        .expect("README.md has a ## Values section");
    let mut got = BTreeMap::new();
    for line in table.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let key = cells[1].trim_matches('`').to_string();
        let default: Value = serde_json::from_str(cells[3].trim_matches('`'))
            .unwrap_or_else(|e| panic!("README row {key}: default {}: {e}", cells[3]));
        let ty = match &default {
            Value::Bool(_) => "bool",
            Value::Number(_) => "int",
            Value::String(_) => "string",
            Value::Array(_) => "list",
            _ => "object",
        };
        assert_eq!(cells[2], ty, "README row {key}: type");
        assert!(!cells[4].is_empty(), "README row {key}: no description");
        assert!(
            got.insert(key.clone(), default).is_none(),
            "README lists {key} twice"
        );
    }
    assert_eq!(
        got, want,
        "chart README values table (left) and values.yaml (right) differ"
    );
    // values.schema.json describes exactly the top-level keys (plus Helm's `global`).
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(chart().join("values.schema.json")).unwrap())
            .unwrap();
    let mut keys: BTreeSet<&str> = schema["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.remove("global");
    let top: BTreeSet<&str> = values
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys, top,
        "values.schema.json and values.yaml top-level keys"
    );
}

#[test]
fn chart_alert_rules_equal_deploy_prometheus_rules() {
    let chart_rules: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(chart().join("files/prometheus-rules.yaml")).unwrap(),
    )
    .unwrap();
    let alerts: Vec<&Value> = chart_rules["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect();
    assert!(
        alerts.iter().any(|a| a["expr"]
            .as_str()
            .is_some_and(|e| e.contains("meshca_leader"))),
        "no alert on meshca_leader"
    );
    let deploy = repo().join("deploy/prometheus/rules.yaml");
    let Ok(text) = std::fs::read_to_string(&deploy) else {
        eprintln!(
            "skipping the comparison: {} does not exist (yet); the chart's copy stands alone",
            deploy.display()
        );
        return;
    };
    let deploy_rules: Value = serde_saphyr::from_str(&text).unwrap();
    assert_eq!(
        chart_rules, deploy_rules,
        "deploy/helm/meshca/files/prometheus-rules.yaml must equal deploy/prometheus/rules.yaml (copy it)"
    );
}

/// The shell blocks of docs/kubernetes.md marked `<!-- helm-e2e: NAME -->`, by name.
fn doc_blocks() -> BTreeMap<String, String> {
    let doc = std::fs::read_to_string(repo().join("docs/kubernetes.md")).unwrap();
    let mut out = BTreeMap::new();
    let mut rest = doc.as_str();
    while let Some(i) = rest.find("<!-- helm-e2e: ") {
        rest = &rest[i + "<!-- helm-e2e: ".len()..];
        let name = rest[..rest.find(" -->").unwrap()].to_string();
        let start = rest.find("```sh\n").unwrap() + "```sh\n".len();
        let end = start + rest[start..].find("\n```").unwrap();
        out.insert(name, rest[start..end].to_string());
        rest = &rest[end..];
    }
    out
}

/// Runs the documented commands with the test's names and peers on PATH.
struct Docs {
    blocks: BTreeMap<String, String>,
    vars: Vec<(&'static str, String)>,
    path: std::ffi::OsString,
    kubeconfig: PathBuf,
    helm: Helm,
}

impl Docs {
    /// Block `name` with bash (-e: each command must succeed unless `check` is false); its
    /// output.
    fn run(&self, name: &str, check: bool) -> Output {
        let block = self
            .blocks
            .get(name)
            .unwrap_or_else(|| panic!("docs/kubernetes.md has no helm-e2e block {name}"));
        eprintln!("--- docs block {name}:\n{block}");
        let o = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "set -uo pipefail{}\n{block}",
                if check { " -e" } else { "" }
            ))
            .envs(self.vars.iter().map(|(k, v)| (*k, v)))
            .env("PATH", &self.path)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CONFIG_HOME", self.helm.dir.path().join("config"))
            .env("HELM_CACHE_HOME", self.helm.dir.path().join("cache"))
            .env("HELM_DATA_HOME", self.helm.dir.path().join("data"))
            .env_remove("RUST_LOG")
            .current_dir(repo())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        eprintln!("{}", text(&o));
        assert!(
            !check || o.status.success(),
            "docs block {name} failed: {}",
            text(&o)
        );
        o
    }

    fn var(&self, k: &str) -> &str {
        &self.vars.iter().find(|(n, _)| *n == k).unwrap().1
    }
}

/// Whether user `user` may `verb` `resource` (named `name`) of `group` in `ns` ("" cluster),
/// by a SubjectAccessReview.
fn allowed(
    c: &Cluster,
    user: &str,
    ns: &str,
    group: &str,
    resource: &str,
    name: &str,
    verb: &str,
) -> bool {
    let (resource, sub) = resource.split_once('/').unwrap_or((resource, ""));
    let sar = json!({
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": user, "resourceAttributes": {
            "namespace": ns, "group": group, "resource": resource, "subresource": sub,
            "name": name, "verb": verb}},
    });
    let o = c.kubectl_in(
        &["create", "-f", "-", "-o", "json"],
        Some(&serde_json::to_vec(&sar).unwrap()),
    );
    assert!(o.status.success(), "SubjectAccessReview: {}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v["status"]["allowed"] == true
}

/// `kubectl get KIND NAME [-n NS]`: found, or NotFound (anything else fails).
fn exists(c: &Cluster, kind: &str, name: &str, ns: Option<&str>) -> bool {
    let mut args = vec!["get", kind, name, "-o", "name"];
    if let Some(ns) = ns {
        args.extend(["-n", ns]);
    }
    let o = c.kubectl_in(&args, None);
    if o.status.success() {
        return true;
    }
    assert!(
        text(&o).contains("NotFound"),
        "kubectl {args:?}: {}",
        text(&o)
    );
    false
}

/// The objects of a release (`helm get manifest`): (kind, name, namespace).
fn release_objects(d: &Docs, release: &str, ns: &str) -> Vec<(String, String, Option<String>)> {
    let m = d.helm.ok(
        &["get", "manifest", release, "--namespace", ns],
        Some(&d.kubeconfig),
    );
    docs(&m)
        .iter()
        .map(|o| {
            (
                o["kind"].as_str().unwrap().to_string(),
                o["metadata"]["name"].as_str().unwrap().to_string(),
                o["metadata"]["namespace"].as_str().map(str::to_string),
            )
        })
        .collect()
}

/// The installed signer Deployment's container arguments.
fn installed_args(c: &Cluster, ns: &str, deployment: &str) -> Vec<String> {
    let d = c.json(&["get", "deployment", deployment, "-n", ns]);
    strings(&d["spec"]["template"]["spec"]["containers"][0]["args"])
}

/// `meshca signer run` with the Deployment's arguments, as the pod would run it: metrics on a
/// free loopback port instead of 0.0.0.0:8080, and the Lease namespace and identity that the
/// pod gets from POD_NAMESPACE/POD_NAME.
fn start_chart_signer(
    kubeconfig: &Path,
    args: &[String],
    ns: &str,
    identity: &str,
    dir: &Path,
) -> Replica {
    assert_eq!(&args[..2], ["signer", "run"], "{args:?}");
    let mut a: Vec<String> = args
        .iter()
        .filter(|x| !x.starts_with("--metrics-addr="))
        .cloned()
        .collect();
    a.push(format!("--metrics-addr=127.0.0.1:{}", common::free_port()));
    a.push(format!("--lease-namespace={ns}"));
    a.push(format!("--identity={identity}"));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    Replica::spawn(kubeconfig, &a, identity, dir)
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not after {timeout:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn helm_install_sign_upgrade_uninstall_on_a_real_control_plane() {
    let Some(c) = Cluster::from_env("the Helm chart e2e test") else {
        return;
    };
    let Some(helm) = Helm::new() else { return };
    let t0 = Instant::now();
    let phase = |what: &str| eprintln!("[{:>6.1} s] {what}", t0.elapsed().as_secs_f64());
    // Fresh names per run: this cluster never finishes deleting a namespace (no
    // controller-manager), and cluster-scoped names follow the release name.
    let id = format!("{}", std::process::id());
    let (ns, release, ca, apps) = (
        format!("meshca-h{id}"),
        format!("meshca-h{id}"),
        format!("helm{id}"),
        format!("meshca-h{id}-apps"),
    );
    let sa_user = format!("system:serviceaccount:{ns}:{release}-signer");
    let mut path = vec![
        Path::new(env!("CARGO_BIN_EXE_meshca"))
            .parent()
            .unwrap()
            .to_path_buf(),
        helm.bin.parent().unwrap().to_path_buf(),
        c.kubectl.parent().unwrap().to_path_buf(),
    ];
    path.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    let d = Docs {
        blocks: doc_blocks(),
        vars: vec![
            ("NS", ns.clone()),
            ("RELEASE", release.clone()),
            ("CA", ca.clone()),
            ("APPS", apps.clone()),
        ],
        path: std::env::join_paths(path).unwrap(),
        kubeconfig: c.kubeconfig.clone(),
        helm,
    };
    assert_eq!(d.var("NS"), ns);
    let work = tempfile::tempdir().unwrap();
    let logs = c.dir.join("helm-e2e-logs");
    std::fs::create_dir_all(&logs).unwrap();

    d.run("namespaces", true);
    // An install that references a CA which does not exist yet fails, naming it.
    let o = d.run("install", false);
    assert!(
        !o.status.success(),
        "install before the CA exists: {}",
        text(&o)
    );
    let want = format!("CA Secret {ns}/meshca-ca-{ca} not found");
    assert!(text(&o).contains(&want), "no `{want}` in: {}", text(&o));
    d.run("first-ca", true);
    let ca_secret = c.json(&["get", "secret", &format!("meshca-ca-{ca}"), "-n", &ns]);
    let out = String::from_utf8(d.run("install", true).stdout).unwrap();
    assert!(out.contains("STATUS: deployed"), "{out}");
    phase("helm install done");
    let installed = release_objects(&d, &release, &ns);
    for (k, n, o) in &installed {
        assert!(exists(&c, k, n, o.as_deref()), "{k} {n} not installed");
    }
    assert!(
        installed.iter().all(|(k, _, _)| k != "Secret"),
        "the chart installs no Secret"
    );

    // The signer under the chart's ServiceAccount, with the Deployment's arguments.
    let args = installed_args(&c, &ns, &format!("{release}-signer"));
    for want in [
        format!("--store=kube:{ns}"),
        format!("--ca={ca}"),
        "--auto-approve".to_string(),
        format!("--managed-namespace={apps}"),
    ] {
        assert!(args.contains(&want), "{want} not in {args:?}");
    }
    let sa_kc = work.path().join("signer.kubeconfig");
    c.service_account_kubeconfig(&ns, &format!("{release}-signer"), &sa_kc);
    let mut signer = start_chart_signer(&sa_kc, &args, &ns, "helm-replica-a", &logs);

    // First certificate: the documented managed Secret.
    for (user_ns, verb, res, name, group) in [
        (apps.as_str(), "patch", "secrets", "", ""),
        (
            "",
            "update",
            "certificatesigningrequests/approval",
            "",
            "certificates.k8s.io",
        ),
    ] {
        assert!(
            allowed(&c, &sa_user, user_ns, group, res, name, verb),
            "{verb} {res} in {user_ns:?} denied after install"
        );
    }
    let out = String::from_utf8(d.run("can-i", false).stdout).unwrap();
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["yes", "yes"],
        "{out}"
    );
    d.run("first-certificate", true);
    wait_for("managed Secret filled", Duration::from_secs(60), || {
        let s = c.json(&["get", "secret", "web-tls", "-n", &apps]);
        s["data"]["tls.crt"]
            .as_str()
            .filter(|v| !v.is_empty())
            .map(|_| ())
    });
    let out = String::from_utf8(d.run("read-certificate", true).stdout).unwrap();
    assert!(
        out.contains(&format!("URI:spiffe://cluster.local/ns/{apps}/sa/web"))
            && out.contains(&format!("DNS:web.{apps}.svc")),
        "{out}"
    );
    phase("managed Secret filled");

    // A CSR from ServiceAccount apps/web for its own identity: approved by policy, signed,
    // and the chain verifies against the CA.
    c.kubectl(&["create", "serviceaccount", "web", "-n", &apps]);
    let csr_role = format!("{release}-e2e-csr-creator");
    c.kubectl(&[
        "create",
        "clusterrole",
        &csr_role,
        "--verb=create,get",
        "--resource=certificatesigningrequests",
    ]);
    c.kubectl(&[
        "create",
        "clusterrolebinding",
        &csr_role,
        "--clusterrole",
        &csr_role,
        &format!("--serviceaccount={apps}:web"),
    ]);
    let web_kc = work.path().join("web.kubeconfig");
    c.service_account_kubeconfig(&apps, "web", &web_kc);
    let csr_pem = cluster::csr_pem_with_san(
        work.path(),
        &format!("URI:spiffe://cluster.local/ns/{apps}/sa/web,DNS:web.{apps}.svc"),
    );
    let create_csr = |name: &str, kubeconfig: &Path| {
        let csr = json!({
            "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
            "metadata": {"name": name, "labels": {"meshca-helm-e2e": id}},
            "spec": {"request": cluster::b64(csr_pem.as_bytes()),
                     "signerName": format!("meshca.io/{ca}"),
                     "usages": ["digital signature", "server auth", "client auth"]},
        });
        let mut cmd = Command::new(&c.kubectl);
        cmd.arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["create", "-f", "-"]);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(
            &mut child.stdin.take().unwrap(),
            &serde_json::to_vec(&csr).unwrap(),
        )
        .unwrap();
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "create CSR {name}: {}", text(&o));
    };
    let csr1 = format!("{release}-web-1");
    create_csr(&csr1, &web_kc);
    let signed = |name: &str| {
        let v = c.json(&["get", "csr", name]);
        let failed = v["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|x| x["type"] == "Failed" || x["type"] == "Denied");
        assert!(failed.is_none(), "CSR {name}: {failed:?}");
        v["status"]["certificate"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(|s| {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD.decode(s).unwrap()
            })
    };
    let chain = wait_for(
        "CSR auto-approved and signed",
        Duration::from_secs(60),
        || signed(&csr1),
    );
    let v = c.json(&["get", "csr", &csr1]);
    assert!(
        v["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["type"] == "Approved"),
        "{v}"
    );
    std::fs::write(work.path().join("chain.pem"), &chain).unwrap();
    std::fs::write(
        work.path().join("ca.pem"),
        c.meshca_in(&ns, &["ca", "export", &ca]),
    )
    .unwrap();
    let verify = common::openssl(&[
        "verify",
        "-x509_strict",
        "-CAfile",
        work.path().join("ca.pem").to_str().unwrap(),
        work.path().join("chain.pem").to_str().unwrap(),
    ]);
    assert!(text(&verify).contains(": OK"), "{}", text(&verify));
    phase("CSR from apps/web auto-approved, signed, verified");

    // Upgrade with the auto-approver and the managed namespace off: their RBAC is gone.
    d.run("upgrade", true);
    let out = String::from_utf8(d.run("can-i", false).stdout).unwrap();
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["no", "no"],
        "{out}"
    );
    for (user_ns, verb, res, group) in [
        (apps.as_str(), "patch", "secrets", ""),
        (apps.as_str(), "get", "secrets", ""),
        (
            "",
            "update",
            "certificatesigningrequests/approval",
            "certificates.k8s.io",
        ),
    ] {
        assert!(
            !allowed(&c, &sa_user, user_ns, group, res, "", verb),
            "{verb} {res} in {user_ns:?} still allowed after the upgrade"
        );
    }
    let on_signer = |verb: &str| {
        let signer = format!("meshca.io/{ca}");
        allowed(
            &c,
            &sa_user,
            "",
            "certificates.k8s.io",
            "signers",
            &signer,
            verb,
        )
    };
    assert!(!on_signer("approve"), "approve on the signer still allowed");
    assert!(!exists(
        &c,
        "clusterrole",
        &format!("{release}-approver"),
        None
    ));
    assert!(!exists(
        &c,
        "role",
        &format!("{release}-managed-secrets"),
        Some(&apps)
    ));
    // Signing stays: the upgraded Deployment's signer signs an approved CSR.
    let args = installed_args(&c, &ns, &format!("{release}-signer"));
    assert!(
        !args
            .iter()
            .any(|a| a == "--auto-approve" || a.starts_with("--managed-namespace")),
        "{args:?}"
    );
    assert!(on_signer("sign"), "sign on the signer gone");
    // The rollout: the old pod gets SIGTERM (and releases the Lease), the new one starts.
    cluster::signal(&signer, "-TERM");
    let st = signer.child.wait().unwrap();
    assert!(st.success(), "signer exit after SIGTERM: {st}");
    drop(signer);
    signer = start_chart_signer(&sa_kc, &args, &ns, "helm-replica-b", &logs);
    let csr2 = format!("{release}-web-2");
    // From apps/web again (the policy binds the identity to the requester), approved by a
    // person now that the signer no longer approves.
    create_csr(&csr2, &web_kc);
    c.kubectl(&["certificate", "approve", &csr2]);
    wait_for(
        "CSR signed after the upgrade",
        Duration::from_secs(60),
        || signed(&csr2),
    );
    phase("helm upgrade done: approve and managed-Secret rights gone, signing works");
    let upgraded = release_objects(&d, &release, &ns);
    let log = std::fs::read_to_string(&signer.log).unwrap_or_default();
    assert!(!log.contains("panicked"), "{log}");
    drop(signer);

    // Uninstall: every object of the release gone (those of the first install too), the CA
    // Secret left as it was.
    let out = String::from_utf8(d.run("uninstall", true).stdout).unwrap();
    assert!(out.contains(&format!("meshca-ca-{ca}")), "{out}");
    let mut all: BTreeSet<_> = installed.into_iter().collect();
    all.extend(upgraded);
    for (k, n, o) in &all {
        assert!(
            !exists(&c, k, n, o.as_deref()),
            "{k} {n} left after uninstall"
        );
    }
    let after = c.json(&["get", "secret", &format!("meshca-ca-{ca}"), "-n", &ns]);
    assert_eq!(after["metadata"]["uid"], ca_secret["metadata"]["uid"]);
    assert_eq!(after["data"], ca_secret["data"], "CA Secret changed");
    let left = c.json(&[
        "get",
        "all,roles,rolebindings,serviceaccounts,poddisruptionbudgets",
        "-n",
        &ns,
        "-l",
        &format!("app.kubernetes.io/instance={release}"),
    ]);
    assert_eq!(left["items"].as_array().unwrap().len(), 0, "{left}");
    phase(&format!(
        "helm uninstall done: {} objects gone, CA Secret kept",
        all.len()
    ));

    // Clean up what the test made besides the namespaces (which this cluster cannot delete).
    for args in [
        vec!["delete", "csr", "-l", &format!("meshca-helm-e2e={id}")],
        vec!["delete", "clusterrolebinding,clusterrole", &csr_role],
        vec![
            "delete",
            "clustertrustbundles",
            "-l",
            &format!("meshca.io/ca={ca}"),
        ],
    ] {
        let _ = c.kubectl_in(&args, None);
    }
}
