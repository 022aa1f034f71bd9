//! The guard on the kube-csr sidecar's `delete` right (deploy/components/sds-kube-csr).
//!
//! CSRs are cluster-scoped and their names generated, so RBAC cannot narrow the sidecar's
//! `delete` to its own CSRs. The component's ValidatingAdmissionPolicy [`GUARD`] does: it
//! matches every principal bound to ClusterRole `meshca-sds-csr` (in whatever namespace and by
//! whatever binding), recognised by a marker right that only that role grants
//! ([`MARKER_GROUP`]/[`MARKER_RESOURCE`] verb [`MARKER_VERB`], not a real resource), and lets it
//! delete a CSR only when `spec.username` is its own. Principals with wildcard rights (which
//! could delete any CSR anyway) are told apart by a second right nobody grants by name
//! ([`CANARY_RESOURCE`]).
//!
//! Without that policy the `delete` right is unrestricted, so the sidecar refuses to start
//! ([`verify`], called by `sds serve --source kube-csr` before anything else) unless:
//! the cluster serves `admissionregistration.k8s.io/v1` ValidatingAdmissionPolicy, the policy
//! and its binding exist (binding action `Deny`, policy failure policy not `Ignore`), and the
//! sidecar's own account carries the marker (so the policy applies to it). [`check`] is the
//! pure half.

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};

use super::kube_err;
use crate::error::{Error, Result};

/// Name of the ValidatingAdmissionPolicy and of its binding.
pub const GUARD: &str = "meshca-sds-delete-own-csrs";
/// API group of the marker right (not a served API).
pub const MARKER_GROUP: &str = "sds.meshca.io";
/// Resource of the marker right: ClusterRole `meshca-sds-csr` grants it.
pub const MARKER_RESOURCE: &str = "kube-csr-sidecars";
/// Resource no role grants by name: allowed only through wildcard rights.
pub const CANARY_RESOURCE: &str = "wildcard-canary";
/// Verb of the marker right.
pub const MARKER_VERB: &str = "use";

const FIX: &str = "install deploy/components/sds-kube-csr (rbac.yaml and delete-own-csrs.yaml)";

/// What [`verify`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// Whether `admissionregistration.k8s.io/v1` serves `validatingadmissionpolicies`.
    pub api_served: bool,
    /// The policy's `spec.failurePolicy` (`Some("")` when unset, the API default `Fail`),
    /// `None` when the policy does not exist.
    pub policy_failure: Option<String>,
    /// The binding's `(spec.policyName, spec.validationActions)`, `None` when absent.
    pub binding: Option<(String, Vec<String>)>,
    /// Whether this account holds the marker right.
    pub marker: bool,
    /// Whether this account holds the canary right (wildcard rights).
    pub wildcard: bool,
}

/// Whether `found` shows a guard that limits this sidecar's deletes to its own CSRs. The
/// error is one line naming what is missing. Pure.
pub fn check(found: &Found) -> Result<()> {
    let refuse = |what: String| {
        Err(Error::invalid(
            "kube-csr sidecar",
            format!("{what}, so nothing limits this sidecar's CSR delete right to its own CSRs; refusing to start"),
        ))
    };
    if !found.api_served {
        return refuse(
            "the cluster does not serve admissionregistration.k8s.io/v1 ValidatingAdmissionPolicy (Kubernetes 1.30 or later)"
                .into(),
        );
    }
    match found.policy_failure.as_deref() {
        None => {
            return refuse(format!(
                "ValidatingAdmissionPolicy {GUARD} is not installed ({FIX})"
            ))
        }
        Some("Ignore") => {
            return refuse(format!(
                "ValidatingAdmissionPolicy {GUARD} has failurePolicy Ignore (use Fail)"
            ))
        }
        Some(_) => {}
    }
    match &found.binding {
        None => {
            return refuse(format!(
                "ValidatingAdmissionPolicyBinding {GUARD} is not installed ({FIX})"
            ))
        }
        Some((policy, _)) if policy != GUARD => {
            return refuse(format!(
                "ValidatingAdmissionPolicyBinding {GUARD} binds policy {policy:?}, not {GUARD}"
            ))
        }
        Some((_, actions)) if !actions.iter().any(|a| a == "Deny") => {
            return refuse(format!(
                "ValidatingAdmissionPolicyBinding {GUARD} has validationActions {actions:?}, without Deny"
            ))
        }
        Some(_) => {}
    }
    if !found.marker && !found.wildcard {
        return refuse(format!(
            "this account is not bound to ClusterRole meshca-sds-csr (it lacks {MARKER_VERB} on {MARKER_GROUP}/{MARKER_RESOURCE}, which the policy matches on)"
        ));
    }
    Ok(())
}

/// Whether this client's user may `verb` `group/resource` (a SelfSubjectAccessReview, which
/// every authenticated user may create).
async fn allowed(client: &kube::Client, resource: &str) -> Result<bool> {
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                group: Some(MARKER_GROUP.into()),
                resource: Some(resource.into()),
                verb: Some(MARKER_VERB.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let r = api
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| kube_err("reviewing the sidecar's own rights", e))?;
    Ok(r.status.is_some_and(|s| s.allowed))
}

/// Reads what [`check`] needs from the cluster: discovery, the policy and binding by name,
/// and two access reviews of this client's own user.
pub async fn find(client: &kube::Client) -> Result<Found> {
    let api_served = match client
        .list_api_group_resources("admissionregistration.k8s.io/v1")
        .await
    {
        Ok(list) => list
            .resources
            .iter()
            .any(|r| r.name == "validatingadmissionpolicies"),
        Err(e) if super::api_code(&e) == Some(404) => false,
        Err(e) => return Err(kube_err("discovering admissionregistration.k8s.io/v1", e)),
    };
    let mut found = Found {
        api_served,
        ..Found::default()
    };
    if !found.api_served {
        return Ok(found);
    }
    let fetch = |what: &'static str| {
        move |e| {
            kube_err(
                &format!("reading {what} {GUARD} (grant get on it: deploy/components/sds-kube-csr/rbac.yaml)"),
                e,
            )
        }
    };
    let policies: Api<ValidatingAdmissionPolicy> = Api::all(client.clone());
    found.policy_failure = policies
        .get_opt(GUARD)
        .await
        .map_err(fetch("ValidatingAdmissionPolicy"))?
        .map(|p| p.spec.and_then(|s| s.failure_policy).unwrap_or_default());
    let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(client.clone());
    found.binding = bindings
        .get_opt(GUARD)
        .await
        .map_err(fetch("ValidatingAdmissionPolicyBinding"))?
        .map(|b| (b.spec.policy_name, b.spec.validation_actions));
    found.marker = allowed(client, MARKER_RESOURCE).await?;
    found.wildcard = allowed(client, CANARY_RESOURCE).await?;
    Ok(found)
}

/// [`find`], then [`check`]: `Ok` only when the guard holds for this sidecar.
pub async fn verify(client: &kube::Client) -> Result<()> {
    let found = find(client).await?;
    check(&found)?;
    if found.wildcard {
        tracing::warn!(
            "the sidecar's account holds wildcard rights: the CSR delete guard does not limit it"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::testutil::{json as resp, mock_client, next, status};
    use serde_json::json;

    fn good() -> Found {
        Found {
            api_served: true,
            policy_failure: Some("Fail".into()),
            binding: Some((GUARD.into(), vec!["Deny".into()])),
            marker: true,
            wildcard: false,
        }
    }

    #[test]
    fn only_a_complete_guard_that_applies_to_this_account_passes() {
        check(&good()).unwrap();
        check(&Found {
            policy_failure: Some(String::new()),
            ..good()
        })
        .unwrap();
        for (f, needle) in [
            (
                Found {
                    api_served: false,
                    ..good()
                },
                "does not serve admissionregistration.k8s.io/v1",
            ),
            (
                Found {
                    policy_failure: None,
                    ..good()
                },
                "ValidatingAdmissionPolicy meshca-sds-delete-own-csrs is not installed",
            ),
            (
                Found {
                    policy_failure: Some("Ignore".into()),
                    ..good()
                },
                "failurePolicy Ignore",
            ),
            (
                Found {
                    binding: None,
                    ..good()
                },
                "ValidatingAdmissionPolicyBinding meshca-sds-delete-own-csrs is not installed",
            ),
            (
                Found {
                    binding: Some(("other".into(), vec!["Deny".into()])),
                    ..good()
                },
                "binds policy \"other\"",
            ),
            (
                Found {
                    binding: Some((GUARD.into(), vec!["Warn".into(), "Audit".into()])),
                    ..good()
                },
                "[\"Warn\", \"Audit\"], without Deny",
            ),
            (
                Found {
                    marker: false,
                    ..good()
                },
                "not bound to ClusterRole meshca-sds-csr",
            ),
        ] {
            let e = check(&f).unwrap_err().to_string();
            assert!(e.contains(needle), "{needle:?} not in {e}");
            assert!(e.ends_with("refusing to start"), "{e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }

    /// The I/O half against a mock API server: discovery, the two objects, two reviews.
    #[tokio::test]
    async fn find_reads_discovery_the_objects_and_its_own_rights() {
        let (client, mut h) = mock_client();
        let server = tokio::spawn(async move {
            let (req, _, send) = next(&mut h).await;
            assert_eq!(req.uri().path(), "/apis/admissionregistration.k8s.io/v1");
            send.send_response(resp(
                200,
                &json!({"kind": "APIResourceList", "apiVersion": "v1",
                    "groupVersion": "admissionregistration.k8s.io/v1", "resources": [
                    {"name": "validatingadmissionpolicies", "singularName": "", "namespaced": false,
                     "kind": "ValidatingAdmissionPolicy", "verbs": ["get"]}]}),
            ));
            let (req, _, send) = next(&mut h).await;
            assert_eq!(
                req.uri().path(),
                format!(
                    "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies/{GUARD}"
                )
            );
            send.send_response(resp(
                200,
                &json!({"apiVersion": "admissionregistration.k8s.io/v1",
                    "kind": "ValidatingAdmissionPolicy", "metadata": {"name": GUARD},
                    "spec": {"failurePolicy": "Fail"}}),
            ));
            // The binding is missing.
            let (req, _, send) = next(&mut h).await;
            assert!(req
                .uri()
                .path()
                .ends_with(&format!("/validatingadmissionpolicybindings/{GUARD}")));
            send.send_response(status(404, "NotFound", "not found"));
            for (resource, allowed) in [(MARKER_RESOURCE, true), (CANARY_RESOURCE, false)] {
                let (req, body, send) = next(&mut h).await;
                assert_eq!(req.method(), "POST");
                assert_eq!(
                    req.uri().path(),
                    "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
                );
                let ra = &body["spec"]["resourceAttributes"];
                assert_eq!(ra["group"], MARKER_GROUP);
                assert_eq!(ra["resource"], resource);
                assert_eq!(ra["verb"], MARKER_VERB);
                let mut answer = body.clone();
                answer["status"] = json!({"allowed": allowed});
                send.send_response(resp(201, &answer));
            }
        });
        let found = find(&client).await.unwrap();
        server.await.unwrap();
        assert_eq!(
            found,
            Found {
                binding: None,
                ..good()
            }
        );
        let e = check(&found).unwrap_err().to_string();
        assert!(
            e.contains("Binding meshca-sds-delete-own-csrs is not installed"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_cluster_without_the_api_is_found_out_by_discovery() {
        let (client, mut h) = mock_client();
        let server = tokio::spawn(async move {
            let (req, _, send) = next(&mut h).await;
            assert_eq!(req.uri().path(), "/apis/admissionregistration.k8s.io/v1");
            send.send_response(status(404, "NotFound", "the server could not find it"));
        });
        let e = verify(&client).await.unwrap_err().to_string();
        server.await.unwrap();
        assert!(
            e.contains("does not serve admissionregistration.k8s.io/v1"),
            "{e}"
        );
    }
}
