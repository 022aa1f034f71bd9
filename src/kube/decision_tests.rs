//! The abuse corpus of issue 8 at controller level: each in-cluster front end (CSR signer,
//! auto-approver, managed-Secret controller) run against a tower-test API server, asserting the
//! exact write it makes. Every denial has an allowed twin, so a checker that denies
//! everything fails here too.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use serde_json::json;

use super::approver::{self, Verdict, REASON_DENIED};
use super::managed::{Managed, ANN_CA, ANN_ERROR, ANN_SPIFFE_ID};
use super::metrics::Metrics;
use super::ratelimit::RateLimiter;
use super::signer::tests::{csr_obj, csr_pem, issuer, local, signer_with};
use super::signer::{SignerConfig, TtlMode, REASON_POLICY};
use super::testutil::{json as resp, mock_client, next};
use crate::issue::Issuer;
use crate::key::KeyAlgorithm;
use crate::policy::Policy;

const BLUE: &str = "system:serviceaccount:app:blue";

fn templated() -> Policy {
    Policy {
        allowed_spiffe_ids: vec!["spiffe://{td}/ns/{ns}/sa/{sa}".into()],
        allowed_dns: vec!["{sa}.{ns}.svc".into()],
        ..Policy::default()
    }
}

fn csr_from(
    user: &str,
    sans: &[&str],
    conditions: &[&str],
) -> k8s_openapi::api::certificates::v1::CertificateSigningRequest {
    let mut c = csr_obj(
        "c1",
        "meshca.io/mesh",
        &csr_pem(sans, KeyAlgorithm::EcdsaP256),
        conditions,
        None,
    );
    c.spec.username = Some(user.into());
    c
}

fn ok_body() -> serde_json::Value {
    json!({
        "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
        "metadata": {"name": "c1"}, "spec": {"request": "", "signerName": "meshca.io/mesh"},
    })
}

/// Runs the signer on an approved CSR; returns the `/status` patch body it sent.
async fn sign(policy: Policy, user: &str, sans: &[&str]) -> serde_json::Value {
    let (client, mut h) = mock_client();
    let s = signer_with(
        client,
        &[("mesh", issuer("mesh", policy))],
        SignerConfig::default(),
    );
    let csr = csr_from(user, sans, &["Approved"]);
    let server = tokio::spawn(async move {
        let (req, body, send) = next(&mut h).await;
        assert_eq!(req.method(), "PATCH");
        assert_eq!(
            req.uri().path(),
            "/apis/certificates.k8s.io/v1/certificatesigningrequests/c1/status"
        );
        assert_eq!(body["metadata"]["resourceVersion"], "42");
        send.send_response(resp(200, &ok_body()));
        body
    });
    s.reconcile(&csr).await.unwrap();
    server.await.unwrap()
}

fn assert_failed(body: &serde_json::Value, needle: &str) {
    assert!(body["status"].get("certificate").is_none(), "{body}");
    // The existing Approved condition, then the new Failed one.
    let cs = body["status"]["conditions"].as_array().unwrap();
    assert_eq!(cs.len(), 2, "{body}");
    assert_eq!(cs[0]["type"], "Approved");
    let c = &cs[1];
    assert_eq!(c["type"], "Failed", "{body}");
    assert_eq!(c["status"], "True");
    assert_eq!(c["reason"], REASON_POLICY);
    let m = c["message"].as_str().unwrap();
    assert!(m.contains(needle), "{needle:?} not in {m}");
}

fn assert_signed(body: &serde_json::Value) {
    assert!(body["status"]["certificate"].is_string(), "{body}");
    assert!(body["status"].get("conditions").is_none(), "{body}");
}

/// Issue 8's first defect: the signer passed no requester, so `{ns}`/`{sa}` bound to the
/// requested SPIFFE ID and a templated rule admitted any Kubernetes-shaped ID.
#[tokio::test]
async fn signer_binds_templates_to_the_csr_requester() {
    // Another SA's ID (same namespace, other namespace, differing only in case).
    for other in [
        "spiffe://cluster.local/ns/app/sa/green",
        "spiffe://cluster.local/ns/prod/sa/blue",
        "spiffe://cluster.local/ns/app/sa/Blue",
    ] {
        assert_failed(&sign(templated(), BLUE, &[other]).await, other);
    }
    // Another service's DNS name.
    assert_failed(
        &sign(
            templated(),
            BLUE,
            &["spiffe://cluster.local/ns/app/sa/blue", "green.app.svc"],
        )
        .await,
        "green.app.svc",
    );
    // A person asking for a workload identity under a templated rule.
    assert_failed(
        &sign(
            templated(),
            "alice@example.com",
            &["spiffe://cluster.local/ns/app/sa/blue"],
        )
        .await,
        "spiffe://cluster.local/ns/app/sa/blue",
    );
    // Twin: the account's own identity and service name.
    assert_signed(
        &sign(
            templated(),
            BLUE,
            &["spiffe://cluster.local/ns/app/sa/blue", "blue.app.svc"],
        )
        .await,
    );
}

#[tokio::test]
async fn signer_registration_authorities_stay_in_the_trust_domain() {
    let istiod = "system:serviceaccount:istio-system:istiod";
    let ra = Policy {
        registration_authorities: vec![istiod.into()],
        ..templated()
    };
    assert_signed(
        &sign(
            ra.clone(),
            istiod,
            &["spiffe://cluster.local/ns/app/sa/blue"],
        )
        .await,
    );
    assert_failed(
        &sign(ra, istiod, &["spiffe://evil.example/ns/app/sa/blue"]).await,
        "spiffe://evil.example/ns/app/sa/blue",
    );
    // An unlisted SA acting as an RA.
    assert_failed(
        &sign(
            templated(),
            istiod,
            &["spiffe://cluster.local/ns/app/sa/blue"],
        )
        .await,
        "spiffe://cluster.local/ns/app/sa/blue",
    );
}

#[tokio::test]
async fn signer_refuses_ca_usages_and_ttls_out_of_bounds() {
    let own = ["spiffe://cluster.local/ns/app/sa/blue"];
    for bad in ["cert sign", "code signing"] {
        let (client, mut h) = mock_client();
        let s = signer_with(
            client,
            &[("mesh", issuer("mesh", templated()))],
            SignerConfig::default(),
        );
        let mut csr = csr_from(BLUE, &own, &["Approved"]);
        csr.spec.usages = Some(vec!["digital signature".into(), bad.into()]);
        let server = tokio::spawn(async move {
            let (_, body, send) = next(&mut h).await;
            send.send_response(resp(200, &ok_body()));
            body
        });
        s.reconcile(&csr).await.unwrap();
        assert_failed(&server.await.unwrap(), &format!("{bad:?}"));
    }
    for (exp, needle) in [
        (599, "599 is below the minimum of 600"),
        (200 * 24 * 3600, "over the maximum"),
    ] {
        let (client, mut h) = mock_client();
        let s = signer_with(
            client,
            &[("mesh", issuer("mesh", templated()))],
            SignerConfig::default(),
        );
        let mut csr = csr_from(BLUE, &own, &["Approved"]);
        csr.spec.expiration_seconds = Some(exp);
        let server = tokio::spawn(async move {
            let (_, body, send) = next(&mut h).await;
            send.send_response(resp(200, &ok_body()));
            body
        });
        s.reconcile(&csr).await.unwrap();
        assert_failed(&server.await.unwrap(), needle);
    }
}

/// A client-only Kubernetes CSR gets a client-only certificate.
#[tokio::test]
async fn signer_honours_client_only_usages() {
    let (client, mut h) = mock_client();
    let s = signer_with(
        client,
        &[("mesh", issuer("mesh", templated()))],
        SignerConfig::default(),
    );
    let mut csr = csr_from(
        BLUE,
        &["spiffe://cluster.local/ns/app/sa/blue"],
        &["Approved"],
    );
    csr.spec.usages = Some(vec!["digital signature".into(), "client auth".into()]);
    let server = tokio::spawn(async move {
        let (_, body, send) = next(&mut h).await;
        send.send_response(resp(200, &ok_body()));
        body
    });
    s.reconcile(&csr).await.unwrap();
    let body = server.await.unwrap();
    use base64::Engine as _;
    let pem = base64::engine::general_purpose::STANDARD
        .decode(body["status"]["certificate"].as_str().unwrap())
        .unwrap();
    let certs = crate::pemutil::parse_certs(&pem, "status.certificate").unwrap();
    let info = crate::x509::CertInfo::from_der(&certs[0]).unwrap();
    assert_eq!(info.extended_key_usage, vec!["clientAuth".to_string()]);
}

/// Issue 8's third defect: with examples/mesh.toml, any service account was auto-approved for
/// `tenanta.example.com` from the gateway CA. Its policy does not opt in, so the approver
/// leaves the CSR for a person: reconcile writes nothing (a write would block on the mock).
#[tokio::test]
async fn auto_approver_leaves_gateway_names_to_a_person() {
    let cfg =
        crate::config::MeshConfig::parse(include_str!("../../examples/mesh.toml"), "mesh.toml")
            .unwrap();
    let gw = cfg.cas.iter().find(|c| c.name == "gateway").unwrap();
    let iss = issuer("gateway", gw.policy.clone());
    let mut csr = csr_from(BLUE, &["tenanta.example.com"], &[]);
    csr.spec.signer_name = "meshca.io/gateway".into();
    assert!(
        matches!(
            approver::evaluate(&csr, iss.as_ref(), TtlMode::Fail),
            Verdict::Leave(_)
        ),
        "must not be approved"
    );
    let (client, _h) = mock_client();
    let cfg = SignerConfig {
        auto_approve: true,
        ..SignerConfig::default()
    };
    let s = signer_with(client, &[("gateway", iss)], cfg);
    tokio::time::timeout(Duration::from_secs(5), s.reconcile(&csr))
        .await
        .expect("the approver must not write")
        .unwrap();
    assert_eq!(s.metrics().csrs_approved.get(), 0);
}

/// Runs the approver on a pending CSR; returns the `/approval` patch body.
async fn approve(policy: Policy, user: &str, sans: &[&str]) -> serde_json::Value {
    let (client, mut h) = mock_client();
    let cfg = SignerConfig {
        auto_approve: true,
        ..SignerConfig::default()
    };
    let s = signer_with(client, &[("mesh", issuer("mesh", policy))], cfg);
    let csr = csr_from(user, sans, &[]);
    let server = tokio::spawn(async move {
        let (req, body, send) = next(&mut h).await;
        assert_eq!(req.method(), "PATCH");
        assert_eq!(
            req.uri().path(),
            "/apis/certificates.k8s.io/v1/certificatesigningrequests/c1/approval"
        );
        send.send_response(resp(200, &ok_body()));
        body
    });
    s.reconcile(&csr).await.unwrap();
    server.await.unwrap()
}

#[tokio::test]
async fn auto_approver_corpus() {
    let on = |p: Policy| Policy {
        auto_approve: true,
        ..p
    };
    let denied = |body: serde_json::Value, needle: &str| {
        let c = &body["status"]["conditions"][0];
        assert_eq!(c["type"], "Denied", "{body}");
        assert_eq!(c["reason"], REASON_DENIED);
        let m = c["message"].as_str().unwrap();
        assert!(m.contains(needle), "{needle:?} not in {m}");
    };
    let own = "spiffe://cluster.local/ns/app/sa/blue";
    denied(
        approve(
            on(templated()),
            BLUE,
            &["spiffe://cluster.local/ns/app/sa/green"],
        )
        .await,
        "spiffe://cluster.local/ns/app/sa/green",
    );
    denied(
        approve(on(templated()), BLUE, &[own, "*.app.svc"]).await,
        "*.app.svc",
    );
    denied(
        approve(on(templated()), BLUE, &[own, "10.1.2.3"]).await,
        "10.1.2.3",
    );
    denied(
        approve(on(templated()), BLUE, &[own, "green.app.svc"]).await,
        "green.app.svc",
    );
    // A static DNS rule is not auto-approved unless the policy says so.
    let gateway = on(Policy {
        allowed_dns: vec!["**.example.com".into()],
        ..Policy::default()
    });
    let (client, _h) = mock_client();
    let s = signer_with(
        client,
        &[("mesh", issuer("mesh", gateway.clone()))],
        SignerConfig {
            auto_approve: true,
            ..SignerConfig::default()
        },
    );
    tokio::time::timeout(
        Duration::from_secs(5),
        s.reconcile(&csr_from(BLUE, &["tenanta.example.com"], &[])),
    )
    .await
    .expect("left for a person: no write")
    .unwrap();
    let approved = approve(
        Policy {
            auto_approve_static_dns: true,
            ..gateway
        },
        BLUE,
        &["tenanta.example.com"],
    )
    .await;
    assert_eq!(approved["status"]["conditions"][0]["type"], "Approved");
    // Twin: own identity and service name.
    let approved = approve(on(templated()), BLUE, &[own, "blue.app.svc"]).await;
    let c = &approved["status"]["conditions"][0];
    assert_eq!(c["type"], "Approved", "{approved}");
    assert!(c["message"].as_str().unwrap().contains(BLUE));
}

fn managed_with(
    policy: Policy,
) -> (
    Managed,
    tower_test::mock::Handle<http::Request<kube::client::Body>, http::Response<kube::client::Body>>,
) {
    let (client, h) = mock_client();
    let m = Managed::new(
        client,
        super::issuers::IssuerSet::watch_fixed(
            [("mesh".to_string(), local("mesh", policy) as Arc<dyn Issuer>)]
                .into_iter()
                .collect(),
        ),
        Arc::new(Metrics::new()),
        Arc::new(RateLimiter::new(0.0, 1)),
        super::leader::always_leader(),
        Arc::new(crate::clock::SystemClock),
    );
    (m, h)
}

/// Reconciles a managed Secret in `ns` asking for `id`; returns the apply body.
async fn managed(policy: Policy, ns: &str, id: &str) -> serde_json::Value {
    let (m, mut h) = managed_with(policy);
    let s: Secret = serde_json::from_value(json!({
        "metadata": {"name": "w", "namespace": ns, "annotations": {ANN_CA: "mesh", ANN_SPIFFE_ID: id}},
    }))
    .unwrap();
    let want = format!("/api/v1/namespaces/{ns}/secrets/w");
    let server = tokio::spawn(async move {
        let (req, body, send) = next(&mut h).await;
        assert_eq!(req.method(), "PATCH");
        assert_eq!(req.uri().path(), want);
        send.send_response(resp(200, &body));
        body
    });
    m.reconcile(&s).await.unwrap();
    server.await.unwrap()
}

fn managed_refused(body: &serde_json::Value, needle: &str) {
    assert!(
        body.get("data").is_none(),
        "no key material on a refusal: {body}"
    );
    let m = body["metadata"]["annotations"][ANN_ERROR].as_str().unwrap();
    assert!(m.contains(needle), "{needle:?} not in {m}");
}

/// Issue 8's second defect: a Secret's namespace was not tied to the identity it got.
#[tokio::test]
async fn managed_secrets_get_only_their_namespace_identities() {
    let serves_app = Policy {
        managed_namespaces: vec!["app".into()],
        ..Policy::default()
    };
    // Another namespace's identity.
    managed_refused(
        &managed(
            serves_app.clone(),
            "app",
            "spiffe://cluster.local/ns/prod/sa/web",
        )
        .await,
        "spiffe://cluster.local/ns/prod/sa/web",
    );
    // A namespace the CA does not serve (and the default: none).
    managed_refused(
        &managed(
            serves_app.clone(),
            "prod",
            "spiffe://cluster.local/ns/prod/sa/web",
        )
        .await,
        "\"prod\"",
    );
    managed_refused(
        &managed(
            Policy::default(),
            "app",
            "spiffe://cluster.local/ns/app/sa/web",
        )
        .await,
        "managed_namespaces",
    );
    // Twin: its own namespace's identity.
    let body = managed(serves_app, "app", "spiffe://cluster.local/ns/app/sa/web").await;
    assert!(body["data"]["tls.crt"].is_string(), "{body}");
}
