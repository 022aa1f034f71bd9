//! Managed Secrets: the cert-manager-style flow without a CRD.
//!
//! A Secret annotated with `meshca.io/ca: <ca>` plus `meshca.io/spiffe-id` and/or
//! `meshca.io/dns-names` (comma-separated), and optionally `meshca.io/ttl` (e.g. `24h`) and
//! `meshca.io/key-algorithm`, is filled with `tls.crt` (leaf + chain), `tls.key` and `ca.crt`
//! (the CA's root) by server-side apply with field manager `meshca`. The controller re-issues
//! when the annotations no longer match the certificate, when it was not signed by the CA, and
//! at 2/3 of its lifetime. A request the policy refuses gets a `meshca.io/error` annotation
//! with the reason (removed again once issuance succeeds); the Secret's other keys are left
//! alone. The key is generated in the controller and never logged.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::watcher;
use serde_json::json;
use time::OffsetDateTime;
use tokio::sync::watch;

use super::metrics::Metrics;
use super::ratelimit::RateLimiter;
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::identity::{DnsName, Sans, SpiffeId};
use crate::issue::{issue_workload_as, workload_request, Issuer};
use crate::key::KeyAlgorithm;
use crate::policy::{FrontEnd, Requester};
use crate::x509::CertInfo;

/// Annotation naming the CA.
pub const ANN_CA: &str = "meshca.io/ca";
/// Annotation with the SPIFFE ID.
pub const ANN_SPIFFE_ID: &str = "meshca.io/spiffe-id";
/// Annotation with comma-separated DNS names.
pub const ANN_DNS_NAMES: &str = "meshca.io/dns-names";
/// Annotation with the TTL (humantime, e.g. `24h`).
pub const ANN_TTL: &str = "meshca.io/ttl";
/// Annotation with the key algorithm (default `ecdsa-p256`).
pub const ANN_KEY_ALGORITHM: &str = "meshca.io/key-algorithm";
/// Annotation meshca sets when it cannot issue.
pub const ANN_ERROR: &str = "meshca.io/error";

/// What a managed Secret asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManagedRequest {
    /// The CA.
    pub ca: String,
    /// SANs.
    pub sans: Sans,
    /// TTL (`None`: the policy default).
    pub ttl: Option<Duration>,
    /// Key algorithm.
    pub key: KeyAlgorithm,
}

/// Parses the annotations. `None` when the Secret is not managed (no `meshca.io/ca`).
pub fn parse_annotations(ann: &BTreeMap<String, String>) -> Option<Result<ManagedRequest>> {
    let ca = ann.get(ANN_CA)?.trim().to_string();
    Some((|| {
        let spiffe_id = ann
            .get(ANN_SPIFFE_ID)
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(SpiffeId::parse)
            .transpose()?;
        let dns = ann
            .get(ANN_DNS_NAMES)
            .map(|s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
                    .map(DnsName::parse)
                    .collect::<Result<Vec<_>>>()
            })
            .transpose()?
            .unwrap_or_default();
        let mut sans = Sans {
            spiffe_id,
            dns,
            ips: Vec::new(),
        };
        sans.dedup();
        if sans.is_empty() {
            return Err(Error::invalid(
                "managed Secret",
                format!("set {ANN_SPIFFE_ID} and/or {ANN_DNS_NAMES}"),
            ));
        }
        let ttl = ann
            .get(ANN_TTL)
            .map(|t| {
                humantime::parse_duration(t.trim())
                    .map_err(|e| Error::invalid("managed Secret", format!("{ANN_TTL} {t:?}: {e}")))
            })
            .transpose()?;
        let key = ann
            .get(ANN_KEY_ALGORITHM)
            .map(|k| k.parse())
            .transpose()?
            .unwrap_or_default();
        Ok(ManagedRequest { ca, sans, ttl, key })
    })())
}

/// When the Secret's current certificate must be replaced: `now` when it is missing, unreadable,
/// for other SANs or from another CA; else at 2/3 of its lifetime (which may be in the past:
/// the caller renews when the result is not after `now`).
pub fn renewal_time(
    tls_crt: Option<&[u8]>,
    req: &ManagedRequest,
    ca_subject: Option<&str>,
    now: OffsetDateTime,
) -> OffsetDateTime {
    let Some(crt) = tls_crt else { return now };
    let Ok(certs) = crate::pemutil::parse_certs(crt, "tls.crt") else {
        return now;
    };
    let Some(leaf) = certs.first() else {
        return now;
    };
    let Ok(info) = CertInfo::from_der(leaf) else {
        return now;
    };
    let want_uri: Vec<String> = req.sans.spiffe_id.iter().map(|s| s.to_string()).collect();
    let mut want_dns: Vec<String> = req
        .sans
        .dns
        .iter()
        .map(|d| d.as_str().to_ascii_lowercase())
        .collect();
    let mut have_dns: Vec<String> = info
        .sans
        .dns
        .iter()
        .map(|d| d.to_ascii_lowercase())
        .collect();
    want_dns.sort();
    have_dns.sort();
    if info.sans.uri != want_uri
        || have_dns != want_dns
        || ca_subject.is_some_and(|s| s != info.issuer)
    {
        return now;
    }
    // meshca backdates notBefore for clock skew; the lifetime that matters starts at issuance
    // (otherwise a short TTL would always look due and be re-issued in a loop).
    let start = (info.not_before + crate::profile::BACKDATE).min(info.not_after);
    start + (info.not_after - start) * 2 / 3
}

/// The apply body for a managed Secret.
pub fn apply_body(
    name: &str,
    namespace: &str,
    tls_crt: &str,
    tls_key: &str,
    ca_crt: &str,
) -> serde_json::Value {
    let b = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": { "name": name, "namespace": namespace },
        "data": { "tls.crt": b(tls_crt), "tls.key": b(tls_key), "ca.crt": b(ca_crt) },
    })
}

/// The managed-Secret controller's context.
pub struct Managed {
    client: kube::Client,
    issuers: BTreeMap<String, Arc<dyn Issuer>>,
    metrics: Arc<Metrics>,
    limiter: Arc<RateLimiter>,
    leader: watch::Receiver<bool>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Managed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Managed")
            .field("cas", &self.issuers.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Longest wait between checks of a healthy Secret.
const MAX_RECHECK: Duration = Duration::from_secs(6 * 3600);

impl Managed {
    /// A controller context.
    pub fn new(
        client: kube::Client,
        issuers: BTreeMap<String, Arc<dyn Issuer>>,
        metrics: Arc<Metrics>,
        limiter: Arc<RateLimiter>,
        leader: watch::Receiver<bool>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Managed {
            client,
            issuers,
            metrics,
            limiter,
            leader,
            clock,
        }
    }

    async fn apply(&self, ns: &str, name: &str, body: &serde_json::Value) -> Result<()> {
        self.limiter.acquire().await;
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        super::apply(&api, name, body, "applying a managed Secret").await
    }

    async fn record_error(&self, s: &Secret, message: &str) -> Result<Action> {
        self.metrics.managed_failed.inc();
        let (ns, name) = (
            s.metadata.namespace.as_deref().unwrap_or_default(),
            s.metadata.name.as_deref().unwrap_or_default(),
        );
        tracing::warn!(secret = %format!("{ns}/{name}"), error = message, "managed Secret not issued");
        let current = s
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANN_ERROR));
        if current.map(String::as_str) != Some(message) {
            let body = json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": { "name": name, "namespace": ns, "annotations": { ANN_ERROR: message } },
            });
            self.apply(ns, name, &body).await?;
        }
        Ok(Action::await_change())
    }

    /// Reconciles one Secret.
    pub async fn reconcile(&self, s: &Secret) -> Result<Action> {
        let empty = BTreeMap::new();
        let ann = s.metadata.annotations.as_ref().unwrap_or(&empty);
        let req = match parse_annotations(ann) {
            None => return Ok(Action::await_change()),
            Some(Err(e)) => {
                let msg = e.to_string();
                return self.leader_only(|| self.record_error(s, &msg)).await;
            }
            Some(Ok(r)) => r,
        };
        let Some(issuer) = self.issuers.get(&req.ca) else {
            // Another meshca signer may serve it.
            return Ok(Action::await_change());
        };
        if !*self.leader.borrow() {
            return Ok(Action::await_change());
        }
        let now = self.clock.now();
        let ca_subject = issuer
            .ca_certificate()
            .and_then(|c| CertInfo::from_der(c).ok())
            .map(|i| i.subject);
        let ca_subject = ca_subject.as_deref();
        let crt = s
            .data
            .as_ref()
            .and_then(|d| d.get("tls.crt"))
            .map(|b| b.0.as_slice());
        let due = renewal_time(crt, &req, ca_subject, now);
        if due > now {
            let wait = Duration::try_from(due - now)
                .unwrap_or(MAX_RECHECK)
                .min(MAX_RECHECK);
            return Ok(Action::requeue(wait));
        }
        // The requester is the Secret's namespace, never the identity it asks for.
        let requester =
            Requester::SecretNamespace(s.metadata.namespace.clone().unwrap_or_default());
        let preq = workload_request(
            FrontEnd::ManagedSecret,
            &requester,
            &req.sans,
            req.ttl,
            req.key,
        );
        let w = match issue_workload_as(issuer.as_ref(), &preq, req.key, now).await {
            Ok(w) => w,
            Err(e) if e.is_user_error() => return self.record_error(s, &e.to_string()).await,
            Err(e) => return Err(e),
        };
        let (ns, name) = (
            s.metadata.namespace.as_deref().unwrap_or_default(),
            s.metadata.name.as_deref().unwrap_or_default(),
        );
        let key = w.key.to_pkcs8_pem();
        let body = apply_body(
            name,
            ns,
            &w.cert.chain_pem(),
            &key,
            &crate::pemutil::certs_to_pem([&w.cert.root]),
        );
        self.apply(ns, name, &body).await?;
        self.metrics.managed_issued.inc();
        tracing::info!(secret = %format!("{ns}/{name}"), ca = %req.ca, serial = %w.cert.info.serial_hex(), not_after = %w.cert.info.not_after, "issued managed Secret");
        let next = renewal_time(Some(w.cert.chain_pem().as_bytes()), &req, ca_subject, now);
        Ok(Action::requeue(
            Duration::try_from(next - now)
                .unwrap_or(MAX_RECHECK)
                .clamp(Duration::from_secs(1), MAX_RECHECK),
        ))
    }

    async fn leader_only<F, Fut>(&self, f: F) -> Result<Action>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Action>>,
    {
        if *self.leader.borrow() {
            f().await
        } else {
            Ok(Action::await_change())
        }
    }

    /// Runs a controller over the Secrets of `namespace` (all namespaces when `None`),
    /// optionally narrowed by a label selector, until `shutdown`.
    pub async fn run(
        self: Arc<Self>,
        namespace: Option<String>,
        label_selector: Option<String>,
        shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    ) {
        let api: Api<Secret> = match &namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        };
        let mut wc = watcher::Config::default();
        if let Some(sel) = label_selector {
            wc = wc.labels(&sel);
        }
        Controller::new(api, wc)
            .with_config(ControllerConfig::default().concurrency(8))
            .graceful_shutdown_on(shutdown)
            .run(
                |s, ctx: Arc<Managed>| async move { ctx.reconcile(&s).await },
                |s, err, _| {
                    tracing::warn!(secret = ?s.metadata.name, error = %err, "managed Secret reconcile failed; retrying");
                    Action::requeue(Duration::from_secs(5))
                },
                self.clone(),
            )
            .for_each(|_| async {})
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::issue::issue_workload;
    use crate::kube::signer::tests::local;
    use crate::kube::testutil::{json as resp, mock_client, next};
    use crate::policy::Policy;

    /// A CA serving managed Secrets in namespace `app`, any service name there.
    fn serves_app() -> Policy {
        Policy {
            managed_namespaces: vec!["app".into()],
            allowed_dns: vec!["*.{ns}.svc".into()],
            ..Policy::default()
        }
    }

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn annotations_parse_and_errors_are_readable() {
        assert!(parse_annotations(&ann(&[("other", "x")])).is_none());
        let r = parse_annotations(&ann(&[
            (ANN_CA, "mesh"),
            (ANN_SPIFFE_ID, "spiffe://cluster.local/ns/a/sa/b"),
            (ANN_DNS_NAMES, "b.a.svc, b.a.svc.cluster.local"),
            (ANN_TTL, "2h"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(r.ca, "mesh");
        assert_eq!(r.sans.dns.len(), 2);
        assert_eq!(r.ttl, Some(Duration::from_secs(7200)));
        let e = parse_annotations(&ann(&[(ANN_CA, "mesh")]))
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(e.contains(ANN_SPIFFE_ID), "{e}");
        let e = parse_annotations(&ann(&[
            (ANN_CA, "mesh"),
            (ANN_DNS_NAMES, "a.b"),
            (ANN_TTL, "soon"),
        ]))
        .unwrap()
        .unwrap_err()
        .to_string();
        assert!(e.contains("meshca.io/ttl"), "{e}");
    }

    #[tokio::test]
    async fn fills_then_renews_at_two_thirds() {
        let iss = local("mesh", Policy::default());
        let ca_subject = iss.ca().info().unwrap().subject;
        let req = parse_annotations(&ann(&[
            (ANN_CA, "mesh"),
            (ANN_DNS_NAMES, "web.app.svc"),
            (ANN_TTL, "3h"),
        ]))
        .unwrap()
        .unwrap();
        let now = OffsetDateTime::now_utc();
        assert_eq!(
            renewal_time(None, &req, Some(&ca_subject), now),
            now,
            "empty Secret: issue now"
        );
        let w = issue_workload(iss.as_ref(), &req.sans, req.ttl, req.key, now)
            .await
            .unwrap();
        let pem = w.cert.chain_pem();
        let at = renewal_time(Some(pem.as_bytes()), &req, Some(&ca_subject), now);
        let info = &w.cert.info;
        let issued = info.not_before + crate::profile::BACKDATE;
        let expected = issued + (info.not_after - issued) * 2 / 3;
        assert_eq!(at, expected);
        assert!(
            (at - now - time::Duration::hours(2)).abs() < time::Duration::seconds(2),
            "2/3 of 3 h: {at}"
        );
        // A 30 s certificate is renewed 20 s after issuance, not at once (backdating ignored).
        let short = parse_annotations(&ann(&[
            (ANN_CA, "mesh"),
            (ANN_DNS_NAMES, "web.app.svc"),
            (ANN_TTL, "30s"),
        ]))
        .unwrap()
        .unwrap();
        let ws = issue_workload(iss.as_ref(), &short.sans, short.ttl, short.key, now)
            .await
            .unwrap();
        let at_short = renewal_time(
            Some(ws.cert.chain_pem().as_bytes()),
            &short,
            Some(&ca_subject),
            now,
        );
        assert_eq!(
            at_short,
            now.replace_nanosecond(0).unwrap() + time::Duration::seconds(20)
        );
        // Past 2/3: due now.
        let later = at + time::Duration::seconds(1);
        assert!(renewal_time(Some(pem.as_bytes()), &req, Some(&ca_subject), later) <= later);
        // Annotations changed: due now.
        let other = parse_annotations(&ann(&[(ANN_CA, "mesh"), (ANN_DNS_NAMES, "api.app.svc")]))
            .unwrap()
            .unwrap();
        assert_eq!(
            renewal_time(Some(pem.as_bytes()), &other, Some(&ca_subject), now),
            now
        );
        // Another CA: due now.
        assert_eq!(
            renewal_time(Some(pem.as_bytes()), &req, Some("CN=other"), now),
            now
        );
    }

    #[tokio::test]
    async fn reconcile_applies_tls_keys_with_the_meshca_field_manager() {
        let (client, mut h) = mock_client();
        let iss = local("mesh", serves_app());
        let root = iss.ca().root().clone();
        let m = Managed::new(
            client,
            [("mesh".to_string(), iss as Arc<dyn Issuer>)]
                .into_iter()
                .collect(),
            Arc::new(Metrics::new()),
            Arc::new(RateLimiter::new(0.0, 1)),
            crate::kube::leader::always_leader(),
            Arc::new(crate::clock::SystemClock),
        );
        let s: Secret = serde_json::from_value(json!({
            "metadata": {"name": "web-tls", "namespace": "app", "annotations": {ANN_CA: "mesh", ANN_DNS_NAMES: "web.app.svc"}},
        }))
        .unwrap();
        let server = tokio::spawn(async move {
            let (req, body, send) = next(&mut h).await;
            assert_eq!(req.method(), "PATCH");
            assert_eq!(req.uri().path(), "/api/v1/namespaces/app/secrets/web-tls");
            let q = req.uri().query().unwrap();
            assert!(
                q.contains("fieldManager=meshca") && q.contains("force=true"),
                "{q}"
            );
            send.send_response(resp(200, &body));
            body
        });
        let action = m.reconcile(&s).await.unwrap();
        let body = server.await.unwrap();
        let d = |k: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(body["data"][k].as_str().unwrap())
                .unwrap()
        };
        let chain = crate::pemutil::parse_certs(&d("tls.crt"), "tls.crt").unwrap();
        let anchors = crate::pemutil::parse_certs(&d("ca.crt"), "ca.crt").unwrap();
        assert_eq!(anchors, vec![root.clone()]);
        crate::x509::verify_chain(
            &chain[0],
            &chain[1..],
            &[root],
            OffsetDateTime::now_utc(),
            crate::x509::Usage::Server,
        )
        .unwrap();
        let key = crate::key::PrivateKey::from_pem(
            std::str::from_utf8(&d("tls.key")).unwrap(),
            "tls.key",
        )
        .unwrap();
        assert_eq!(
            key.public_key_der(),
            crate::x509::CertInfo::from_der(&chain[0]).unwrap().spki_der
        );
        // Next look: at 2/3 of the 24 h default lifetime, about 16 h away (capped at 6 h).
        assert_eq!(action, Action::requeue(MAX_RECHECK));
        assert_eq!(m.metrics.managed_issued.get(), 1);
    }

    #[tokio::test]
    async fn refused_requests_get_an_error_annotation_once() {
        let (client, mut h) = mock_client();
        let m = Managed::new(
            client,
            [(
                "mesh".to_string(),
                local("mesh", serves_app()) as Arc<dyn Issuer>,
            )]
            .into_iter()
            .collect(),
            Arc::new(Metrics::new()),
            Arc::new(RateLimiter::new(0.0, 1)),
            crate::kube::leader::always_leader(),
            Arc::new(crate::clock::SystemClock),
        );
        let mut s: Secret = serde_json::from_value(json!({
            "metadata": {"name": "w", "namespace": "app", "annotations": {ANN_CA: "mesh", ANN_DNS_NAMES: "*.app.svc"}},
        }))
        .unwrap();
        let server = tokio::spawn(async move {
            let (req, body, send) = next(&mut h).await;
            assert_eq!(req.method(), "PATCH");
            assert!(body.get("data").is_none(), "no key material on failure");
            let msg = body["metadata"]["annotations"][ANN_ERROR]
                .as_str()
                .unwrap()
                .to_string();
            send.send_response(resp(200, &body));
            msg
        });
        assert_eq!(m.reconcile(&s).await.unwrap(), Action::await_change());
        let msg = server.await.unwrap();
        assert!(msg.contains("wildcard DNS name *.app.svc"), "{msg}");
        // Seen again with the annotation already set: no second write (no request is served).
        s.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(ANN_ERROR.into(), msg);
        assert_eq!(m.reconcile(&s).await.unwrap(), Action::await_change());
        assert_eq!(m.metrics.managed_failed.get(), 2);
        assert_eq!(m.metrics.managed_issued.get(), 0);
    }
}
