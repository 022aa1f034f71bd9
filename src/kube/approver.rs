//! The optional policy auto-approver (`--auto-approve`, off by default).
//!
//! Only CAs whose policy says `auto_approve = true` are decided; CSRs for any other CA are left
//! pending for a person. A pending CSR is decided by the one policy decision
//! ([`crate::policy::Policy::decide`], front end `auto-approver`) with the requester taken from
//! `spec.username`, never from the request:
//! - a service account `system:serviceaccount:<ns>:<sa>` binds `{ns}`/`{sa}` and may only get
//!   its own SPIFFE ID `spiffe://<td>/ns/<ns>/sa/<sa>`; a registration authority listed in the
//!   policy binds them to the SPIFFE ID it asks for, inside the CA's trust domain;
//! - DNS names must match `allowed_dns` (default `{sa}.{ns}.svc[.cluster.local]`); a name matched
//!   only by a rule without `{ns}`/`{sa}` is left for a person unless the policy says
//!   `auto_approve_static_dns = true`;
//! - IP SANs are never auto-approved (a service account cannot prove it owns an address);
//! - no `CA:TRUE`, only the usages meshca issues, no TTL over the policy (in the default
//!   [`TtlMode::Fail`]) or under 600 s, no weak key.
//!
//! Anything else is **denied** with a reason naming the offending value. CSRs from users
//! that are not service accounts (people, nodes) are left pending for a human to decide.
//! Decisions are written through the `/approval` subresource as a merge patch carrying the
//! resourceVersion they were made on.

use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use super::signer::{
    classify_write, conditions_plus, request_ttl_and_der, Signer, TtlMode, WriteOutcome,
};
use super::FIELD_MANAGER;
use crate::error::Result;
use crate::issue::{decide_csr, CsrOptions, Issuer};
use crate::policy::FrontEnd;

/// Condition reason of an approval.
pub const REASON_APPROVED: &str = "MeshcaPolicyApproved";
/// Condition reason of a denial.
pub const REASON_DENIED: &str = "MeshcaPolicyDenied";

/// The approver's decision on a pending CSR.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Approve, with a message.
    Approve(String),
    /// Deny, with a message naming what was wrong.
    Deny(String),
    /// Leave for a human (the requester is not a service account).
    Leave(String),
}

/// Decides a pending CSR through the one policy decision ([`crate::issue::decide_csr`], front
/// end [`FrontEnd::AutoApprover`], requester `spec.username`). Pure.
pub fn evaluate(csr: &CertificateSigningRequest, issuer: &dyn Issuer, mode: TtlMode) -> Verdict {
    let meta = issuer.meta();
    if let Some(d) = meta.policy.auto_approval_gate(&meta.name) {
        return Verdict::Leave(d.reason);
    }
    let username = csr.spec.username.as_deref().unwrap_or("");
    let (der, ttl) = match request_ttl_and_der(csr, issuer, mode) {
        Ok(v) => v,
        Err(rej) => return Verdict::Deny(rej.message),
    };
    let opts = CsrOptions::kube(
        FrontEnd::AutoApprover,
        username,
        ttl,
        csr.spec.usages.clone(),
    );
    match decide_csr(meta, &der, &opts) {
        Ok(Ok(req)) => Verdict::Approve(format!(
            "approved by meshca policy: {username} may receive {}",
            req.sans.display_list().join(", ")
        )),
        Ok(Err(d)) if d.manual => Verdict::Leave(d.reason),
        Ok(Err(d)) => Verdict::Deny(d.into_error(&meta.name).to_string()),
        Err(e) => Verdict::Deny(e.to_string()),
    }
}

/// Writes a verdict through `/approval`. Returns the CSR as the API server returned it when an
/// approval was written (its new resourceVersion and the `Approved` condition), so the signer
/// can sign it in the same reconcile instead of waiting for the watch event and a second
/// place in the queue.
pub async fn write(
    signer: &Signer,
    csr: &CertificateSigningRequest,
    verdict: &Verdict,
) -> Result<Option<CertificateSigningRequest>> {
    let name = csr.metadata.name.as_deref().unwrap_or_default();
    let (ty, reason, message) = match verdict {
        Verdict::Approve(m) => ("Approved", REASON_APPROVED, m),
        Verdict::Deny(m) => ("Denied", REASON_DENIED, m),
        Verdict::Leave(m) => {
            tracing::info!(csr = name, "{m}");
            return Ok(None);
        }
    };
    let patch = json!({
        "metadata": { "resourceVersion": csr.metadata.resource_version },
        "status": { "conditions": conditions_plus(csr, ty, reason, message, signer.clock.now()) },
    });
    signer.limiter.acquire().await;
    let pp = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    let response = signer
        .api()
        .patch_approval(name, &pp, &Patch::Merge(&patch))
        .await;
    let returned = response.as_ref().ok().cloned();
    let out = classify_write(response, "writing an approval")?;
    match (&out, verdict) {
        (WriteOutcome::Written, Verdict::Approve(_)) => {
            signer.metrics.csrs_approved.inc();
            tracing::info!(csr = name, message = %message, "CSR approved");
        }
        (WriteOutcome::Written, _) => {
            signer.metrics.csrs_denied.inc();
            tracing::warn!(csr = name, message = %message, "CSR denied");
        }
        _ => {
            signer.metrics.csr_conflicts.inc();
        }
    }
    Ok(match (out, verdict) {
        (WriteOutcome::Written, Verdict::Approve(_)) => returned,
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyAlgorithm;
    use crate::kube::signer::tests::{csr_obj, csr_pem, issuer, signer_with};
    use crate::kube::signer::SignerConfig;
    use crate::kube::testutil::{json as resp, mock_client, next};
    use crate::policy::Policy;

    /// Decides with `policy` opted in to auto-approval.
    fn eval(sans: &[&str], username: &str, policy: Policy, exp: Option<i32>) -> Verdict {
        let iss = issuer(
            "mesh",
            Policy {
                auto_approve: true,
                ..policy
            },
        );
        let mut csr = csr_obj(
            "c",
            "meshca.io/mesh",
            &csr_pem(sans, KeyAlgorithm::EcdsaP256),
            &[],
            exp,
        );
        csr.spec.username = Some(username.into());
        evaluate(&csr, iss.as_ref(), TtlMode::Fail)
    }

    #[test]
    fn own_identity_and_service_names_are_approved() {
        let v = eval(
            &[
                "spiffe://cluster.local/ns/app/sa/blue",
                "blue.app.svc",
                "blue.app.svc.cluster.local",
            ],
            "system:serviceaccount:app:blue",
            Policy::default(),
            Some(3600),
        );
        match v {
            Verdict::Approve(m) => assert!(
                m.contains("system:serviceaccount:app:blue") && m.contains("blue.app.svc"),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn anything_else_is_denied_naming_the_offender() {
        let sa = "system:serviceaccount:app:blue";
        let deny = |v: Verdict, needle: &str| match v {
            Verdict::Deny(m) => assert!(m.contains(needle), "{needle:?} not in {m}"),
            other => panic!("expected a denial naming {needle}: {other:?}"),
        };
        deny(
            eval(
                &["spiffe://cluster.local/ns/app/sa/green"],
                sa,
                Policy::default(),
                None,
            ),
            "spiffe://cluster.local/ns/app/sa/green",
        );
        deny(
            eval(&["green.app.svc"], sa, Policy::default(), None),
            "green.app.svc",
        );
        deny(
            eval(&["api.bank.example"], sa, Policy::default(), None),
            "api.bank.example",
        );
        deny(eval(&["10.1.2.3"], sa, Policy::default(), None), "10.1.2.3");
        deny(
            eval(&["*.app.svc"], sa, Policy::default(), None),
            "*.app.svc",
        );
        deny(
            eval(
                &["blue.app.svc"],
                sa,
                Policy::default(),
                Some(365 * 24 * 3600),
            ),
            "over the maximum",
        );
        deny(
            eval(&["blue.app.svc"], sa, Policy::default(), Some(60)),
            "below the minimum",
        );
        // A policy's own patterns replace the defaults.
        let p = Policy {
            allowed_dns: vec!["{sa}.mesh.example".into()],
            ..Policy::default()
        };
        assert!(matches!(
            eval(&["blue.mesh.example"], sa, p.clone(), None),
            Verdict::Approve(_)
        ));
        deny(eval(&["blue.app.svc"], sa, p, None), "blue.app.svc");
    }

    #[test]
    fn people_are_left_for_manual_approval() {
        assert!(matches!(
            eval(
                &["blue.app.svc"],
                "alice@example.com",
                Policy::default(),
                None
            ),
            Verdict::Leave(_)
        ));
    }

    /// A signer with auto-approval on, serving CA `mesh` whose policy opts in to it.
    fn auto_approving_signer(client: kube::Client) -> crate::kube::signer::Signer {
        let cfg = SignerConfig {
            auto_approve: true,
            ..SignerConfig::default()
        };
        let on = Policy {
            auto_approve: true,
            ..Policy::default()
        };
        signer_with(client, &[("mesh", issuer("mesh", on))], cfg)
    }

    #[tokio::test]
    async fn auto_approve_writes_through_the_approval_subresource() {
        let (client, mut h) = mock_client();
        let s = auto_approving_signer(client);
        let csr = csr_obj(
            "c1",
            "meshca.io/mesh",
            &csr_pem(
                &["spiffe://cluster.local/ns/app/sa/green"],
                KeyAlgorithm::EcdsaP256,
            ),
            &[],
            None,
        );
        let server = tokio::spawn(async move {
            let (req, body, send) = next(&mut h).await;
            assert_eq!(req.method(), "PATCH");
            assert_eq!(
                req.uri().path(),
                "/apis/certificates.k8s.io/v1/certificatesigningrequests/c1/approval"
            );
            assert_eq!(body["metadata"]["resourceVersion"], "42");
            let c = &body["status"]["conditions"][0];
            assert_eq!(c["type"], "Denied");
            assert_eq!(c["reason"], REASON_DENIED);
            assert!(
                c["message"]
                    .as_str()
                    .unwrap()
                    .contains("does not belong to requester"),
                "{c}"
            );
            send.send_response(resp(200, &json!({
                "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
                "metadata": {"name": "c1"}, "spec": {"request": "", "signerName": "meshca.io/mesh"},
            })));
        });
        s.reconcile(&csr).await.unwrap();
        server.await.unwrap();
        assert_eq!(s.metrics().csrs_denied.get(), 1);
    }

    /// An approval is followed, in the same reconcile, by the signature: on the object the
    /// approval returned (its resourceVersion), not after a watch event and a second pass
    /// through the queue.
    #[tokio::test]
    async fn an_approved_csr_is_signed_in_the_same_reconcile() {
        let (client, mut h) = mock_client();
        let s = auto_approving_signer(client);
        // blue (the requester csr_obj sets) asks for its own SPIFFE ID.
        let csr = csr_obj(
            "c1",
            "meshca.io/mesh",
            &csr_pem(
                &["spiffe://cluster.local/ns/app/sa/blue"],
                KeyAlgorithm::EcdsaP256,
            ),
            &[],
            None,
        );
        let mut approved = serde_json::to_value(&csr).unwrap();
        approved["metadata"]["resourceVersion"] = json!("43");
        approved["status"]["conditions"] = json!([{
            "type": "Approved", "status": "True", "reason": REASON_APPROVED, "message": "ok",
        }]);
        let server = tokio::spawn(async move {
            let (req, body, send) = next(&mut h).await;
            assert!(req.uri().path().ends_with("/c1/approval"), "{}", req.uri());
            assert_eq!(body["status"]["conditions"][0]["type"], "Approved");
            send.send_response(resp(200, &approved));
            let (req, body, send) = next(&mut h).await;
            assert!(req.uri().path().ends_with("/c1/status"), "{}", req.uri());
            assert_eq!(body["metadata"]["resourceVersion"], "43");
            assert!(body["status"]["certificate"].as_str().is_some());
            send.send_response(resp(200, &approved));
        });
        s.reconcile(&csr).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), server)
            .await
            .expect("the status write follows the approval in the same reconcile")
            .unwrap();
        assert_eq!(s.metrics().csrs_approved.get(), 1);
        assert_eq!(s.metrics().csrs_signed.get(), 1);
    }
}
