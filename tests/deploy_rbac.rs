//! deploy/ stays consistent with what `meshca signer run` does: no controller watches or
//! writes what its Role does not grant. Reads the manifests themselves (no cluster needed).
//!
//! What the controller needs, by default (`src/kube/run.rs`):
//! - cluster-wide: watch CSRs, write `/status`, `sign` for `meshca.io/*`; list, apply and
//!   delete ClusterTrustBundles, `attest` for `meshca.io/*`;
//! - in the store namespace `meshca`: watch the CA Secrets (reload), read bundle definitions,
//!   create/update ledger shards, the leader Lease;
//! - in every `--managed-namespace`: watch and patch Secrets, create Events.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

fn docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    docs_of(&text)
}

/// The documents of a YAML stream.
fn docs_of(text: &str) -> Vec<Value> {
    serde_saphyr::from_str_multiple::<Value, Vec<Value>>(text)
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn all(dir: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(root().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "yaml") && !p.ends_with("kustomization.yaml")
        })
        .collect();
    files.sort();
    for f in files {
        out.extend(docs(&f));
    }
    out
}

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(*p)?;
    }
    cur.as_str()
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(|v| v.as_array())
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// (apiGroup, resource, verb) granted by the (Cluster)Role `name` in `namespace` (None:
/// cluster-wide), when it is bound to the meshca-signer ServiceAccount.
fn grants(objs: &[Value], namespace: Option<&str>) -> BTreeSet<(String, String, String)> {
    let role_kind = if namespace.is_some() {
        "Role"
    } else {
        "ClusterRole"
    };
    let binding_kind = if namespace.is_some() {
        "RoleBinding"
    } else {
        "ClusterRoleBinding"
    };
    let mut out = BTreeSet::new();
    for b in objs
        .iter()
        .filter(|o| s(o, &["kind"]) == Some(binding_kind))
    {
        if namespace.is_some() && s(b, &["metadata", "namespace"]) != namespace {
            continue;
        }
        let bound = b["subjects"].as_array().into_iter().flatten().any(|sub| {
            s(sub, &["kind"]) == Some("ServiceAccount")
                && s(sub, &["name"]) == Some("meshca-signer")
                && s(sub, &["namespace"]) == Some("meshca")
        });
        if !bound || s(b, &["roleRef", "kind"]) != Some(role_kind) {
            continue;
        }
        let role_name = s(b, &["roleRef", "name"]).unwrap();
        for r in objs.iter().filter(|o| {
            s(o, &["kind"]) == Some(role_kind)
                && s(o, &["metadata", "name"]) == Some(role_name)
                && (namespace.is_none() || s(o, &["metadata", "namespace"]) == namespace)
        }) {
            for rule in r["rules"].as_array().into_iter().flatten() {
                for g in strings(rule.get("apiGroups")) {
                    for res in strings(rule.get("resources")) {
                        for v in strings(rule.get("verbs")) {
                            out.insert((g.clone(), res.clone(), v));
                        }
                    }
                }
            }
        }
    }
    out
}

fn need(
    have: &BTreeSet<(String, String, String)>,
    group: &str,
    resource: &str,
    verbs: &[&str],
    scope: &str,
) {
    for v in verbs {
        assert!(
            have.contains(&(group.to_string(), resource.to_string(), v.to_string())),
            "{scope}: the controller needs {v} on {group}/{resource}, which deploy/ does not grant"
        );
    }
}

fn deployment_args(objs: &[Value]) -> Vec<String> {
    let d = objs
        .iter()
        .find(|o| s(o, &["kind"]) == Some("Deployment"))
        .expect("a Deployment");
    strings(d["spec"]["template"]["spec"]["containers"][0].get("args"))
}

fn managed_namespaces(args: &[String]) -> Vec<String> {
    args.iter()
        .filter_map(|a| a.strip_prefix("--managed-namespace=").map(str::to_string))
        .collect()
}

fn check_install(objs: &[Value], managed: &[String]) {
    let cluster = grants(objs, None);
    need(
        &cluster,
        "certificates.k8s.io",
        "certificatesigningrequests",
        &["get", "list", "watch"],
        "cluster",
    );
    need(
        &cluster,
        "certificates.k8s.io",
        "certificatesigningrequests/status",
        &["patch"],
        "cluster",
    );
    need(
        &cluster,
        "certificates.k8s.io",
        "signers",
        &["sign"],
        "cluster",
    );
    // ClusterTrustBundles (on by default in `signer run`): list, apply, prune, attest.
    need(
        &cluster,
        "certificates.k8s.io",
        "clustertrustbundles",
        &["list", "patch", "delete"],
        "cluster",
    );
    need(
        &cluster,
        "certificates.k8s.io",
        "signers",
        &["attest"],
        "cluster",
    );
    let store = grants(objs, Some("meshca"));
    need(
        &store,
        "",
        "secrets",
        &["get", "list", "watch"],
        "namespace meshca (CA reload)",
    );
    need(
        &store,
        "",
        "configmaps",
        &["get", "list", "create", "update"],
        "namespace meshca (bundles, ledger)",
    );
    need(
        &store,
        "coordination.k8s.io",
        "leases",
        &["create", "get", "patch"],
        "namespace meshca (Lease)",
    );
    need(
        &store,
        "events.k8s.io",
        "events",
        &["create", "patch"],
        "namespace meshca (CaLoadFailed Events on CA Secrets)",
    );
    for ns in managed {
        assert_ne!(ns, "*", "deploy/ never manages every namespace");
        let g = grants(objs, Some(ns));
        need(
            &g,
            "",
            "secrets",
            &["get", "list", "watch", "patch"],
            &format!("managed namespace {ns}"),
        );
        need(
            &g,
            "events.k8s.io",
            "events",
            &["create", "patch"],
            &format!("managed namespace {ns}"),
        );
    }
}

/// Issue 17: the signer's ClusterRole granted every verb on every ClusterTrustBundle. The
/// sync (src/kube/trust_bundles) lists its bundles by label, applies them (server-side apply:
/// `patch`, plus `create` for a new one) and deletes stale ones: exactly those verbs.
#[test]
fn the_signer_gets_only_the_cluster_trust_bundle_verbs_it_uses() {
    let base = all("deploy/base");
    let ctb: Vec<String> = grants(&base, None)
        .into_iter()
        .filter(|(g, r, _)| g == "certificates.k8s.io" && r == "clustertrustbundles")
        .map(|(_, _, v)| v)
        .collect();
    assert_eq!(ctb, ["create", "delete", "list", "patch"]);
}

#[test]
fn the_base_install_watches_only_what_it_is_granted() {
    let base = all("deploy/base");
    let args = deployment_args(&base);
    assert!(args.iter().any(|a| a == "--store=kube:meshca"), "{args:?}");
    let managed = managed_namespaces(&args);
    assert!(
        managed.is_empty(),
        "the base manages {managed:?} but grants no Role there"
    );
    check_install(&base, &managed);
}

#[test]
fn the_examples_add_a_managed_namespace_together_with_its_role() {
    let mut objs = all("deploy/base");
    objs.extend(all("deploy/examples"));
    let k = docs(&root().join("deploy/examples/kustomization.yaml")).remove(0);
    assert!(strings(k.get("resources")).contains(&"../base".to_string()));
    // The JSON patches of the example overlay that add Deployment args.
    let mut args = deployment_args(&objs);
    for p in k["patches"].as_array().into_iter().flatten() {
        let ops: Vec<Value> = serde_saphyr::from_str(s(p, &["patch"]).unwrap()).unwrap();
        for op in ops {
            if s(&op, &["path"]) == Some("/spec/template/spec/containers/0/args/-") {
                args.push(s(&op, &["value"]).unwrap().to_string());
            }
        }
    }
    let managed = managed_namespaces(&args);
    assert_eq!(managed, vec!["demo".to_string()]);
    check_install(&objs, &managed);
    // The example Secret is one the default selector picks up.
    let secret = objs
        .iter()
        .find(|o| s(o, &["kind"]) == Some("Secret"))
        .unwrap();
    assert_eq!(
        s(secret, &["metadata", "labels", "meshca.io/managed"]),
        Some("true")
    );
}

/// Issue 17: deploy/examples/sds-kube-csr mounts the `mesh` bundle's ConfigMap in namespace
/// mesh, but nothing let the signer write ConfigMaps there.
#[test]
fn the_kube_csr_example_lets_the_signer_publish_the_bundle_it_mounts() {
    let dir = "deploy/examples/sds-kube-csr";
    let k = docs(&root().join(dir).join("kustomization.yaml")).remove(0);
    let mut objs = all("deploy/base");
    for r in strings(k.get("resources")) {
        let p = root().join(dir).join(&r);
        if p.is_dir() {
            objs.extend(all(&format!("{dir}/{r}")));
        } else {
            objs.extend(docs(&p));
        }
    }
    for c in strings(k.get("components")) {
        objs.extend(all(&format!("{dir}/{c}")));
    }
    // The sidecar's pod (namespace mesh) mounts <bundle>-trust-bundle ConfigMaps.
    let deployment_ns = docs(&root().join("deploy/sds/kustomization.yaml")).remove(0);
    let ns = s(&deployment_ns, &["namespace"]).unwrap().to_string();
    let mounted: Vec<String> = objs
        .iter()
        .filter(|o| s(o, &["kind"]) == Some("Deployment"))
        .flat_map(|d| {
            d["spec"]["template"]["spec"]["volumes"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|v| s(&v, &["configMap", "name"]).map(str::to_string))
        .filter(|n| n.ends_with("-trust-bundle"))
        .collect();
    assert_eq!(mounted, ["mesh-trust-bundle"]);
    let g = grants(&objs, Some(&ns));
    need(
        &g,
        "",
        "configmaps",
        &["get", "create", "patch"],
        &format!("namespace {ns} (the mesh-trust-bundle ConfigMap the example mounts)"),
    );
    // Nothing else there: no Secret of that namespace is managed.
    assert!(
        g.iter().all(|(_, r, _)| r == "configmaps"),
        "namespace {ns}: {g:?}"
    );
    // The namespace itself is part of the example.
    assert!(objs.iter().any(|o| s(o, &["kind"]) == Some("Namespace")
        && s(o, &["metadata", "name"]) == Some(ns.as_str())));
}

#[test]
fn the_pod_certificates_component_adds_the_flag_with_exactly_the_rights_it_needs() {
    let base = all("deploy/base");
    let base_cluster = grants(&base, None);
    assert!(
        !base_cluster
            .iter()
            .any(|(_, r, _)| r.starts_with("podcertificaterequests")),
        "the base grants nothing on PodCertificateRequests: {base_cluster:?}"
    );
    assert!(!deployment_args(&base).contains(&"--pod-certificates".to_string()));
    let dir = "deploy/components/pod-certificates";
    let k = docs(&root().join(dir).join("kustomization.yaml")).remove(0);
    assert_eq!(s(&k, &["kind"]), Some("Component"));
    let resources = strings(k.get("resources"));
    assert_eq!(
        resources,
        vec!["clusterrole.yaml".to_string()],
        "the example pod is not installed"
    );
    let added: Vec<String> = k["patches"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| serde_saphyr::from_str::<Vec<Value>>(s(p, &["patch"]).unwrap()).unwrap())
        .filter(|op| s(op, &["path"]) == Some("/spec/template/spec/containers/0/args/-"))
        .filter_map(|op| s(&op, &["value"]).map(str::to_string))
        .collect();
    assert_eq!(added, vec!["--pod-certificates".to_string()]);
    let mut objs = base.clone();
    objs.extend(docs(&root().join(dir).join("clusterrole.yaml")));
    let cluster = grants(&objs, None);
    check_install(&objs, &[]);
    need(
        &cluster,
        "certificates.k8s.io",
        "podcertificaterequests",
        &["get", "list", "watch"],
        "cluster",
    );
    need(
        &cluster,
        "certificates.k8s.io",
        "podcertificaterequests/status",
        &["update"],
        "cluster",
    );
    need(
        &cluster,
        "certificates.k8s.io",
        "signers",
        &["sign"],
        "cluster",
    );
    let pcr: Vec<_> = cluster
        .iter()
        .filter(|(_, r, _)| r.starts_with("podcertificaterequests"))
        .map(|(_, r, v)| format!("{r}:{v}"))
        .collect();
    assert_eq!(
        pcr,
        [
            "podcertificaterequests:get",
            "podcertificaterequests:list",
            "podcertificaterequests:watch",
            "podcertificaterequests/status:update",
        ],
        "nothing more (no create, delete or patch)"
    );
    // The example pod: a podCertificate projection for a meshca signer and the same
    // signer's ClusterTrustBundle.
    let pod = docs(&root().join(dir).join("example-pod.yaml")).remove(0);
    let sources = pod["spec"]["volumes"][0]["projected"]["sources"]
        .as_array()
        .unwrap();
    let pc = &sources[0]["podCertificate"];
    assert_eq!(s(pc, &["signerName"]), Some("meshca.io/mesh"));
    assert_eq!(s(pc, &["keyType"]), Some("ECDSAP256"));
    assert!(s(pc, &["credentialBundlePath"]).is_some());
    assert_eq!(
        s(&sources[1]["clusterTrustBundle"], &["signerName"]),
        Some("meshca.io/mesh")
    );
}

/// (apiGroup, resource, verb) the ClusterRoles bound to ServiceAccount `ns/sa` grant.
fn sa_cluster_grants(objs: &[Value], ns: &str, sa: &str) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for b in objs
        .iter()
        .filter(|o| s(o, &["kind"]) == Some("ClusterRoleBinding"))
    {
        let bound = b["subjects"].as_array().into_iter().flatten().any(|sub| {
            s(sub, &["kind"]) == Some("ServiceAccount")
                && s(sub, &["name"]) == Some(sa)
                && s(sub, &["namespace"]) == Some(ns)
        });
        if !bound {
            continue;
        }
        let role = s(b, &["roleRef", "name"]).unwrap();
        for r in objs.iter().filter(|o| {
            s(o, &["kind"]) == Some("ClusterRole") && s(o, &["metadata", "name"]) == Some(role)
        }) {
            for rule in r["rules"].as_array().into_iter().flatten() {
                assert!(
                    rule.get("resourceNames").is_none()
                        || !strings(rule.get("resources"))
                            .iter()
                            .any(|r| r.starts_with("certificatesigningrequests")),
                    "generated CSR names cannot be listed in resourceNames"
                );
                for g in strings(rule.get("apiGroups")) {
                    for res in strings(rule.get("resources")) {
                        for v in strings(rule.get("verbs")) {
                            out.insert((g.clone(), res.clone(), v));
                        }
                    }
                }
            }
        }
    }
    out
}

/// What `sds serve --source kube-csr` does with the pod's token (sds/src/kube_csr.rs,
/// src/kube/csr_client.rs, src/kube/trust_bundle_reader.rs): create, get, watch and delete
/// CSRs; list and watch ClusterTrustBundles. Nothing else: no list of CSRs, no Secrets, no
/// approval or signing rights.
#[test]
fn the_kube_csr_sidecar_component_grants_exactly_what_the_source_does() {
    let dir = "deploy/components/sds-kube-csr";
    let objs = all(dir);
    let have = sa_cluster_grants(&objs, "mesh", "web");
    let want: BTreeSet<(String, String, String)> = [
        ("certificatesigningrequests", "create"),
        ("certificatesigningrequests", "get"),
        ("certificatesigningrequests", "watch"),
        ("certificatesigningrequests", "delete"),
        ("clustertrustbundles", "list"),
        ("clustertrustbundles", "watch"),
    ]
    .into_iter()
    .map(|(r, v)| {
        (
            "certificates.k8s.io".to_string(),
            r.to_string(),
            v.to_string(),
        )
    })
    .chain(
        [
            ("sds.meshca.io", "kube-csr-sidecars", "use"),
            (
                "admissionregistration.k8s.io",
                "validatingadmissionpolicies",
                "get",
            ),
            (
                "admissionregistration.k8s.io",
                "validatingadmissionpolicybindings",
                "get",
            ),
        ]
        .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string())),
    )
    .collect();
    assert_eq!(have, want);
    // Deleting is limited to the account's own CSRs by an admission policy on spec.username.
    let vap = objs
        .iter()
        .find(|o| s(o, &["kind"]) == Some("ValidatingAdmissionPolicy"))
        .expect("a ValidatingAdmissionPolicy");
    let expr = s(&vap["spec"]["validations"][0], &["expression"]).unwrap();
    assert!(
        expr.contains("oldObject.spec.username") && expr.contains("request.userInfo.username"),
        "{expr}"
    );
    assert!(objs.iter().any(
        |o| s(o, &["kind"]) == Some("ValidatingAdmissionPolicyBinding")
            && s(o, &["spec", "policyName"]) == s(vap, &["metadata", "name"])
    ));
    // The sidecar runs the kube-csr source under that account.
    let patch = objs
        .iter()
        .find(|o| s(o, &["kind"]) == Some("Deployment"))
        .unwrap();
    let pod = &patch["spec"]["template"]["spec"];
    assert_eq!(s(pod, &["serviceAccountName"]), Some("web"));
    let args = strings(pod["containers"][0].get("args"));
    for a in ["--source=kube-csr", "--signer=meshca.io/mesh"] {
        assert!(args.iter().any(|x| x == a), "{a} not in {args:?}");
    }
    assert!(
        args.iter().any(|x| x.starts_with("--trust-bundle-file=")),
        "{args:?}"
    );
    let k = docs(&root().join(format!("{dir}/kustomization.yaml"))).remove(0);
    assert_eq!(s(&k, &["kind"]), Some("Component"));
    // The complete manifests pass kubernetes-validate (the patch is partial by design).
    let ok = std::process::Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("CI").unwrap_or_default().is_empty(),
            "kubernetes-validate does not run and CI is set (pip install kubernetes-validate)"
        );
        eprintln!("SKIPPED kubernetes-validate: not installed (pip install kubernetes-validate)");
        return;
    }
    for f in ["rbac.yaml", "delete-own-csrs.yaml"] {
        let o = std::process::Command::new("kubernetes-validate")
            .args(["--strict", "--quiet"])
            .arg(root().join(dir).join(f))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "kubernetes-validate rejects {f}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// `(group, resource, verb)` of each `authorizer.group('G').resource('R').check('V')` in a CEL
/// expression.
fn authorizer_checks(expr: &str) -> Vec<(String, String, String)> {
    let arg = |s: &str, call: &str| -> Option<String> {
        let rest = s.split_once(&format!("{call}('"))?.1;
        Some(rest.split_once('\'')?.0.to_string())
    };
    expr.split("authorizer.")
        .skip(1)
        .filter_map(|c| Some((arg(c, "group")?, arg(c, "resource")?, arg(c, "check")?)))
        .collect()
}

/// Issue 17: the admission policy that limits the sidecar's `delete` to its own CSRs matched
/// only service accounts of namespace `mesh`, so the component bound in another namespace
/// left `delete` unrestricted. It must match every account bound to the component's
/// ClusterRole, whatever its namespace: on a right that role grants, not on a namespace.
#[test]
fn the_kube_csr_delete_guard_follows_the_binding_not_a_namespace() {
    let dir = "deploy/components/sds-kube-csr";
    let mut objs = all(dir);
    let vap = objs
        .iter()
        .find(|o| s(o, &["kind"]) == Some("ValidatingAdmissionPolicy"))
        .expect("a ValidatingAdmissionPolicy")
        .clone();
    assert_eq!(s(&vap, &["spec", "failurePolicy"]), Some("Fail"));
    let conditions: Vec<String> = vap["spec"]["matchConditions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| s(c, &["expression"]).unwrap().to_string())
        .collect();
    for c in &conditions {
        assert!(
            !c.contains("system:serviceaccount:"),
            "the guard matches on a namespace's accounts, so the component bound elsewhere is unguarded: {c}"
        );
    }
    // Each condition is a conjunction of authorizer checks: the first is the marker right the
    // component's ClusterRole grants, the negated ones a right no role in deploy/ grants.
    let checks: Vec<_> = conditions
        .iter()
        .flat_map(|c| authorizer_checks(c))
        .collect();
    assert!(!checks.is_empty(), "{conditions:?}");
    let (marker, canaries) = checks.split_first().unwrap();
    // The component re-bound to an account of another namespace: it holds the marker, so
    // the policy matches it as well.
    objs.extend(docs_of(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {name: other}\n\
         roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: meshca-sds-csr}\n\
         subjects: [{kind: ServiceAccount, name: api, namespace: payments}]\n",
    ));
    for (ns, sa) in [("mesh", "web"), ("payments", "api")] {
        let have = sa_cluster_grants(&objs, ns, sa);
        assert!(
            have.contains(marker),
            "{ns}/{sa} lacks the marker {marker:?}"
        );
        assert!(have.contains(&(
            "certificates.k8s.io".to_string(),
            "certificatesigningrequests".to_string(),
            "delete".to_string()
        )));
        for c in canaries {
            assert!(!have.contains(c), "{c:?} is granted by name");
        }
    }
    let mut everything = all("deploy/base");
    for d in [
        dir,
        "deploy/components/auto-approve",
        "deploy/components/pod-certificates",
        "deploy/components/istio-ca",
        "deploy/examples",
    ] {
        everything.extend(all(d));
    }
    for r in everything
        .iter()
        .filter(|o| matches!(s(o, &["kind"]), Some("Role" | "ClusterRole")))
    {
        for rule in r["rules"].as_array().into_iter().flatten() {
            for c in canaries {
                let named = strings(rule.get("apiGroups")).contains(&c.0)
                    && strings(rule.get("resources")).contains(&c.1);
                assert!(!named, "the canary {c:?} is granted by {r}");
            }
        }
    }
    // The sidecar checks the same names at start-up (src/kube/csr_delete_guard.rs).
    #[cfg(feature = "kube")]
    {
        use meshca::kube::csr_delete_guard as g;
        assert_eq!(
            marker,
            &(
                g::MARKER_GROUP.to_string(),
                g::MARKER_RESOURCE.to_string(),
                g::MARKER_VERB.to_string()
            )
        );
        assert_eq!(
            canaries,
            &[(
                g::MARKER_GROUP.to_string(),
                g::CANARY_RESOURCE.to_string(),
                g::MARKER_VERB.to_string()
            )]
        );
        assert_eq!(s(&vap, &["metadata", "name"]), Some(g::GUARD));
        let role = objs
            .iter()
            .find(|o| {
                s(o, &["kind"]) == Some("ClusterRole")
                    && s(o, &["metadata", "name"]) == Some("meshca-sds-csr")
            })
            .unwrap();
        let names: Vec<String> = role["rules"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| strings(r.get("apiGroups")) == ["admissionregistration.k8s.io"])
            .flat_map(|r| strings(r.get("resourceNames")))
            .collect();
        assert_eq!(names, [g::GUARD]);
    }
}
