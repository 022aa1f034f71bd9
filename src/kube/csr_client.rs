//! The client side of a `certificates.k8s.io/v1` CertificateSigningRequest: a workload asks
//! the cluster's signer (`meshca.io/<ca>`) for its own certificate, with a key that is made
//! in memory and never leaves the process (`meshca sds serve --source kube-csr`).
//!
//! One request ([`CsrClient::request`]):
//! 1. generates a key ([`KeyAlgorithm::generate`]) and a PKCS#10 request for the identity
//!    ([`crate::issue::local::csr_for`]);
//! 2. creates a CSR (`generateName`) under the caller's own credentials (the pod's
//!    service-account token in-cluster): `spec.signerName`, `spec.expirationSeconds` and
//!    `spec.usages` as the signer and the auto-approver expect ([`usages_for`]). The API server
//!    fills `spec.username` from the token (`pkg/registry/certificates`: `PrepareForCreate`
//!    clears whatever the client sent and injects the authenticated user), and the approver
//!    binds the identity to that, never to what the request claims;
//! 3. watches that one CSR (field selector `metadata.name=`) until it carries a certificate,
//!    a `Denied` or a `Failed` condition, or the timeout passes;
//! 4. deletes it, whatever the outcome: the request holds nothing secret, but the CSR cleaner
//!    of kube-controller-manager only removes issued and denied CSRs after 1 h and pending ones
//!    after 24 h, so a fleet renewing every few hours would otherwise keep thousands around.
//!
//! The checks on the answer ([`outcome`], [`check_issued`]) and the manifest ([`manifest`])
//! are pure; [`CsrClient`] does the I/O.

use std::time::Duration;

use base64::Engine as _;
use futures::StreamExt;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::api::{Api, DeleteParams, PostParams, WatchEvent, WatchParams};
use rustls_pki_types::CertificateDer;
use serde_json::json;

use super::{kube_err, LABEL_MANAGED_BY, MANAGED_BY};
use crate::error::{Error, Result};
use crate::identity::{Sans, TrustDomain};
use crate::key::{KeyAlgorithm, PrivateKey};
use crate::x509::CertInfo;

/// The API's minimum `spec.expirationSeconds`.
pub const MIN_EXPIRATION: Duration = Duration::from_secs(600);
/// Label on every CSR the client creates (value: the service account, `<ns>.<sa>`, when known).
pub const LABEL_REQUESTER: &str = "meshca.io/sds-requester";

/// The `spec.usages` of a workload CSR: what the signer and the auto-approver grant
/// ([`crate::policy::usage`]): `digital signature` (plus `key encipherment` for RSA, the
/// workload profile's KeyUsage), `server auth` and `client auth`.
pub fn usages_for(alg: KeyAlgorithm) -> Vec<String> {
    let mut u = vec!["digital signature"];
    if alg.is_rsa() {
        u.push("key encipherment");
    }
    u.extend(["server auth", "client auth"]);
    u.into_iter().map(str::to_string).collect()
}

/// What to ask for.
#[derive(Clone, Debug)]
pub struct CsrRequest {
    /// `meshca.io/<ca>`.
    pub signer_name: String,
    /// The identity (SPIFFE ID, DNS names, IPs) put in the request.
    pub sans: Sans,
    /// Trust domain (the subject's O).
    pub trust_domain: TrustDomain,
    /// Key algorithm of the key made for the request.
    pub key: KeyAlgorithm,
    /// `spec.expirationSeconds` (at least 600 s).
    pub expiration: Duration,
    /// `generateName` of the CSR (the API server appends 5 random characters).
    pub name_prefix: String,
    /// Value of the [`LABEL_REQUESTER`] label (empty: none).
    pub requester_label: String,
}

impl CsrRequest {
    /// Checks what the API server would refuse (expiration under 600 s, no identity, a signer
    /// name that is not `meshca.io/<ca>`) before anything is sent.
    pub fn validate(&self) -> Result<()> {
        if super::ca_from_signer_name(&self.signer_name).is_none() {
            return Err(Error::invalid(
                "signer name",
                format!("{:?}: expected meshca.io/<ca>", self.signer_name),
            ));
        }
        if self.expiration < MIN_EXPIRATION {
            return Err(Error::invalid(
                "expiration",
                format!(
                    "{}s is below the API minimum of 600s",
                    self.expiration.as_secs()
                ),
            ));
        }
        if self.sans.is_empty() {
            return Err(Error::invalid(
                "identity",
                "the CSR needs a SPIFFE ID, a DNS name or an IP",
            ));
        }
        Ok(())
    }
}

/// The CSR object to create for `request_pem`. Pure.
pub fn manifest(req: &CsrRequest, request_pem: &str) -> serde_json::Value {
    let mut labels = serde_json::Map::new();
    labels.insert(LABEL_MANAGED_BY.into(), MANAGED_BY.into());
    if !req.requester_label.is_empty() {
        labels.insert(LABEL_REQUESTER.into(), req.requester_label.clone().into());
    }
    json!({
        "apiVersion": "certificates.k8s.io/v1",
        "kind": "CertificateSigningRequest",
        "metadata": { "generateName": req.name_prefix, "labels": labels },
        "spec": {
            "request": base64::engine::general_purpose::STANDARD.encode(request_pem.as_bytes()),
            "signerName": req.signer_name,
            "expirationSeconds": req.expiration.as_secs().min(i32::MAX as u64),
            "usages": usages_for(req.key),
        },
    })
}

/// Where a CSR stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Neither issued nor refused yet.
    Pending,
    /// `status.certificate` is set (PEM, leaf first).
    Issued(Vec<u8>),
    /// Refused: a `Denied` or `Failed` condition.
    Refused(Refusal),
}

/// A `Denied` or `Failed` condition, quoted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// `Denied` or `Failed`.
    pub condition: String,
    /// The condition's reason (CamelCase, e.g. `MeshcaPolicyDenied`).
    pub reason: String,
    /// The condition's message.
    pub message: String,
    /// The CSR's name.
    pub csr: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CSR {} {}: {}: {}",
            self.csr,
            self.condition.to_lowercase(),
            self.reason,
            self.message
        )
    }
}

/// Classifies a CSR as the signer left it. A certificate wins over conditions (the API server
/// does not let one be added to a denied or failed CSR). Pure.
pub fn outcome(csr: &CertificateSigningRequest) -> Outcome {
    let status = csr.status.as_ref();
    if let Some(c) = status
        .and_then(|s| s.certificate.as_ref())
        .filter(|c| !c.0.is_empty())
    {
        return Outcome::Issued(c.0.clone());
    }
    for ty in ["Denied", "Failed"] {
        if let Some(c) = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == ty && c.status == "True"))
        {
            return Outcome::Refused(Refusal {
                condition: ty.to_string(),
                reason: c.reason.clone().unwrap_or_default(),
                message: c.message.clone().unwrap_or_default(),
                csr: csr.metadata.name.clone().unwrap_or_default(),
            });
        }
    }
    Outcome::Pending
}

/// A certificate obtained for a key made here.
pub struct Obtained {
    /// The key (never written anywhere by this module).
    pub key: PrivateKey,
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The parsed leaf.
    pub info: CertInfo,
    /// The CSR it came from (already deleted, or its deletion failed and was logged).
    pub csr: String,
    /// `spec.username` the API server recorded for the CSR.
    pub username: String,
}

impl std::fmt::Debug for Obtained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Obtained")
            .field("csr", &self.csr)
            .field("serial", &self.info.serial)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Parses `status.certificate` and checks that the leaf is for `key`: a signer that answered
/// with someone else's certificate must not have it served with this key. Pure.
pub fn check_issued(
    pem: &[u8],
    key: &PrivateKey,
    csr: &str,
) -> Result<(Vec<CertificateDer<'static>>, CertInfo)> {
    let chain = crate::pemutil::parse_certs(pem, &format!("CSR {csr} status.certificate"))?;
    let info = CertInfo::from_der(&chain[0])?;
    if info.spki_der != key.public_key_der() {
        return Err(Error::Verify(format!(
            "CSR {csr}: the issued certificate is not for the key of the request"
        )));
    }
    Ok((chain, info))
}

/// The result of one request.
#[derive(Debug)]
pub enum Answer {
    /// Signed.
    Issued(Box<Obtained>),
    /// Denied or failed by the approver or signer.
    Refused(Refusal),
}

/// Creates, watches and deletes CSRs with one client.
#[derive(Clone)]
pub struct CsrClient {
    api: Api<CertificateSigningRequest>,
}

impl std::fmt::Debug for CsrClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CsrClient").finish_non_exhaustive()
    }
}

/// Longest single watch call; the wait renews the watch until its own deadline.
const WATCH_CALL_SECS: u32 = 60;

impl CsrClient {
    /// A client acting as `client`'s user (in a pod: its service account).
    pub fn new(client: kube::Client) -> Self {
        CsrClient {
            api: Api::all(client),
        }
    }

    /// One request: key, CSR, create, watch until finished or `timeout`, delete. A refusal is
    /// an [`Answer::Refused`]; an API or network failure (or the timeout) is an error, and a
    /// CSR created before it is deleted as well.
    pub async fn request(&self, req: &CsrRequest, timeout: Duration) -> Result<Answer> {
        req.validate()?;
        let key = req.key.generate()?;
        let der = crate::issue::local::csr_for(&key, &req.sans, &req.trust_domain)?;
        let request_pem = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
        let body: CertificateSigningRequest =
            serde_json::from_value(manifest(req, &request_pem))
                .map_err(|e| Error::Build(format!("CSR manifest: {e}")))?;
        let created = self
            .api
            .create(&PostParams::default(), &body)
            .await
            .map_err(|e| kube_err("creating a CSR", e))?;
        let name = created.metadata.name.clone().unwrap_or_default();
        let username = created.spec.username.clone().unwrap_or_default();
        tracing::info!(csr = %name, signer = %req.signer_name, username = %username, "CSR created; waiting for it to be signed");
        let waited = self.wait(&created, timeout).await;
        self.delete(&name).await;
        match waited? {
            Outcome::Issued(pem) => {
                let (chain, info) = check_issued(&pem, &key, &name)?;
                Ok(Answer::Issued(Box::new(Obtained {
                    key,
                    chain,
                    info,
                    csr: name,
                    username,
                })))
            }
            Outcome::Refused(r) => Ok(Answer::Refused(r)),
            Outcome::Pending => Err(Error::Backend {
                backend: "kubernetes",
                message: format!(
                    "CSR {name} was neither signed nor refused within {}s (is `meshca signer run --auto-approve` running for {}?)",
                    timeout.as_secs(),
                    req.signer_name
                ),
                retryable: true,
            }),
        }
    }

    /// Watches `csr` until it is finished or `timeout` passes (then [`Outcome::Pending`]).
    pub async fn wait(
        &self,
        csr: &CertificateSigningRequest,
        timeout: Duration,
    ) -> Result<Outcome> {
        let name = csr.metadata.name.clone().unwrap_or_default();
        let first = outcome(csr);
        if first != Outcome::Pending {
            return Ok(first);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut version = csr.metadata.resource_version.clone().unwrap_or_default();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Ok(Outcome::Pending);
            }
            let secs = (left.as_secs() as u32).clamp(1, WATCH_CALL_SECS);
            let wp = WatchParams::default()
                .fields(&format!("metadata.name={name}"))
                .timeout(secs);
            let watched = tokio::time::timeout(left, async {
                let stream = self
                    .api
                    .watch(&wp, &version)
                    .await
                    .map_err(|e| kube_err("watching the CSR", e))?;
                futures::pin_mut!(stream);
                while let Some(ev) = stream.next().await {
                    match ev.map_err(|e| kube_err("watching the CSR", e))? {
                        WatchEvent::Added(c) | WatchEvent::Modified(c) => {
                            if let Some(rv) = &c.metadata.resource_version {
                                version = rv.clone();
                            }
                            let o = outcome(&c);
                            if o != Outcome::Pending {
                                return Ok(Some(o));
                            }
                        }
                        WatchEvent::Deleted(_) => {
                            return Err(Error::Backend {
                                backend: "kubernetes",
                                message: format!("CSR {name} was deleted before it was signed"),
                                retryable: true,
                            })
                        }
                        WatchEvent::Bookmark(b) => version = b.metadata.resource_version,
                        WatchEvent::Error(e) if e.code == 410 => return Ok(None),
                        WatchEvent::Error(e) => {
                            return Err(kube_err("watching the CSR", kube::Error::Api(e)))
                        }
                    }
                }
                Ok(None)
            })
            .await;
            match watched {
                Err(_) => return Ok(Outcome::Pending),
                Ok(Ok(Some(o))) => return Ok(o),
                Ok(Ok(None)) => {
                    // The watch ended (its timeout, or 410 Gone): look once, then watch again
                    // from what was seen.
                    let c = self
                        .api
                        .get(&name)
                        .await
                        .map_err(|e| kube_err("reading the CSR", e))?;
                    let o = outcome(&c);
                    if o != Outcome::Pending {
                        return Ok(o);
                    }
                    version = c.metadata.resource_version.unwrap_or_default();
                }
                Ok(Err(e)) => return Err(e),
            }
        }
    }

    /// Deletes a finished (or abandoned) CSR; failures are logged, never fatal: the cluster's
    /// CSR cleaner removes it later.
    pub async fn delete(&self, name: &str) {
        match self.api.delete(name, &DeleteParams::default()).await {
            Ok(_) => tracing::debug!(csr = name, "CSR deleted"),
            Err(e) if super::api_code(&e) == Some(404) => {}
            Err(e) => {
                tracing::warn!(csr = name, error = %e, "could not delete the CSR; the cluster's CSR cleaner removes it within 1 h (24 h if pending)")
            }
        }
    }
}

/// The namespace and service account a service-account token was issued for: the `sub` claim
/// `system:serviceaccount:<ns>:<sa>` of the JWT. The signature is not checked (the API server
/// does that; this only picks the identity to ask for). Pure.
pub fn service_account_of_token(token: &str) -> Result<(String, String)> {
    let bad = |m: &str| Error::invalid("service account token", m.to_string());
    let payload = token
        .trim()
        .split('.')
        .nth(1)
        .ok_or_else(|| bad("not a JWT"))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| bad("the payload is not base64url"))?;
    let claims: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| bad("the payload is not JSON"))?;
    let sub = claims["sub"].as_str().ok_or_else(|| bad("no sub claim"))?;
    service_account_of_username(sub).ok_or_else(|| {
        bad(&format!(
            "sub {sub:?} is not system:serviceaccount:<namespace>:<name>"
        ))
    })
}

/// `(ns, sa)` of `system:serviceaccount:<ns>:<sa>`. Pure.
pub fn service_account_of_username(u: &str) -> Option<(String, String)> {
    let rest = u.strip_prefix("system:serviceaccount:")?;
    let (ns, sa) = rest.split_once(':')?;
    (!ns.is_empty() && !sa.is_empty() && !sa.contains(':'))
        .then(|| (ns.to_string(), sa.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{create_root, CaSpec};
    use crate::identity::SpiffeId;
    use crate::issue::LocalIssuer;
    use crate::kube::testutil::{json as resp, mock_client, next, status};
    use crate::x509::CsrInfo;
    use http::{Request, Response};
    use kube::client::Body;
    use tower_test::mock::Handle;

    fn request() -> CsrRequest {
        let td = TrustDomain::default();
        CsrRequest {
            signer_name: "meshca.io/mesh".into(),
            sans: Sans {
                spiffe_id: Some(SpiffeId::for_service_account(&td, "app", "blue").unwrap()),
                dns: vec![crate::identity::DnsName::parse("blue.app.svc").unwrap()],
                ips: vec![],
            },
            trust_domain: td,
            key: KeyAlgorithm::EcdsaP256,
            expiration: Duration::from_secs(3600),
            name_prefix: "meshca-sds-blue-".into(),
            requester_label: "app.blue".into(),
        }
    }

    fn csr_json(name: &str, rv: &str, status: serde_json::Value) -> serde_json::Value {
        json!({
            "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
            "metadata": { "name": name, "resourceVersion": rv },
            "spec": { "request": "", "signerName": "meshca.io/mesh",
                      "username": "system:serviceaccount:app:blue" },
            "status": status,
        })
    }

    /// A watch response: one JSON event per line.
    fn events(evs: &[serde_json::Value]) -> Response<Body> {
        let mut body = Vec::new();
        for e in evs {
            body.extend(serde_json::to_vec(e).unwrap());
            body.push(b'\n');
        }
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap()
    }

    /// Checks the POST: path, the spec the signer and approver expect, and a PEM request that
    /// parses, carries the identity and verifies. Returns the request's public key.
    async fn expect_create(h: &mut Handle<Request<Body>, Response<Body>>, name: &str) -> CsrInfo {
        let (req, body, send) = next(h).await;
        assert_eq!(req.method(), "POST");
        assert_eq!(
            req.uri().path(),
            "/apis/certificates.k8s.io/v1/certificatesigningrequests"
        );
        assert_eq!(body["metadata"]["generateName"], "meshca-sds-blue-");
        assert_eq!(body["metadata"]["labels"][LABEL_REQUESTER], "app.blue");
        assert_eq!(body["spec"]["signerName"], "meshca.io/mesh");
        assert_eq!(body["spec"]["expirationSeconds"], 3600);
        assert_eq!(
            body["spec"]["usages"],
            json!(["digital signature", "server auth", "client auth"])
        );
        assert!(body["spec"].get("username").is_none(), "{body}");
        let pem = base64::engine::general_purpose::STANDARD
            .decode(body["spec"]["request"].as_str().unwrap())
            .unwrap();
        assert!(pem.starts_with(b"-----BEGIN CERTIFICATE REQUEST-----"));
        let info = CsrInfo::from_pem(&pem, "request").unwrap();
        assert_eq!(
            info.sans.uri,
            ["spiffe://cluster.local/ns/app/sa/blue".to_string()]
        );
        assert_eq!(info.sans.dns, ["blue.app.svc".to_string()]);
        let mut created = csr_json(name, "100", json!({}));
        created["spec"]["request"] = body["spec"]["request"].clone();
        send.send_response(resp(201, &created));
        info
    }

    async fn expect_watch(
        h: &mut Handle<Request<Body>, Response<Body>>,
        name: &str,
        rv: &str,
    ) -> tower_test::mock::SendResponse<Response<Body>> {
        let (req, _, send) = next(h).await;
        assert_eq!(req.method(), "GET");
        assert_eq!(
            req.uri().path(),
            "/apis/certificates.k8s.io/v1/certificatesigningrequests"
        );
        let q = req.uri().query().unwrap().to_string();
        assert!(q.contains("watch=true"), "{q}");
        assert!(q.contains(&format!("resourceVersion={rv}")), "{q}");
        assert!(
            q.contains(&format!("fieldSelector=metadata.name%3D{name}")),
            "{q}"
        );
        send
    }

    async fn expect_delete(h: &mut Handle<Request<Body>, Response<Body>>, name: &str, code: u16) {
        let (req, _, send) = next(h).await;
        assert_eq!(req.method(), "DELETE");
        assert_eq!(
            req.uri().path(),
            format!("/apis/certificates.k8s.io/v1/certificatesigningrequests/{name}")
        );
        if code == 200 {
            send.send_response(resp(200, &csr_json(name, "103", json!({}))));
        } else {
            send.send_response(status(code, "NotFound", "gone"));
        }
    }

    fn sign_for(spki_csr: &CsrInfo, csr_pem_b64: &str) -> String {
        let _ = spki_csr;
        let ca = create_root(&CaSpec::root("mesh"), time::OffsetDateTime::now_utc()).unwrap();
        let issuer = LocalIssuer::new(ca).unwrap();
        let pem = base64::engine::general_purpose::STANDARD
            .decode(csr_pem_b64)
            .unwrap();
        let der = crate::pemutil::parse_blocks(&pem, "r")
            .unwrap()
            .remove(0)
            .into_contents();
        let opts = crate::issue::CsrOptions::kube(
            crate::policy::FrontEnd::CsrSigner,
            "system:serviceaccount:app:blue",
            Some(Duration::from_secs(3600)),
            Some(usages_for(KeyAlgorithm::EcdsaP256)),
        );
        let sr = crate::issue::check_csr(&issuer, &der, &opts).unwrap();
        let cert = issuer
            .sign_now(&sr, time::OffsetDateTime::now_utc())
            .unwrap();
        base64::engine::general_purpose::STANDARD.encode(cert.chain_pem().as_bytes())
    }

    #[tokio::test]
    async fn signed_csr_gives_a_chain_for_the_generated_key_and_is_deleted() {
        let (client, mut h) = mock_client();
        let server = tokio::spawn(async move {
            // Capture the request to sign it for real.
            let (req, body, send) = next(&mut h).await;
            assert_eq!(req.method(), "POST");
            let info = CsrInfo::from_pem(
                &base64::engine::general_purpose::STANDARD
                    .decode(body["spec"]["request"].as_str().unwrap())
                    .unwrap(),
                "r",
            )
            .unwrap();
            let mut created = csr_json("meshca-sds-blue-x1", "100", json!({}));
            created["spec"]["request"] = body["spec"]["request"].clone();
            send.send_response(resp(201, &created));
            let cert = sign_for(&info, body["spec"]["request"].as_str().unwrap());
            let w = expect_watch(&mut h, "meshca-sds-blue-x1", "100").await;
            w.send_response(events(&[
                json!({"type": "MODIFIED", "object": csr_json("meshca-sds-blue-x1", "101",
                    json!({"conditions": [{"type": "Approved", "status": "True", "reason": "MeshcaPolicyApproved", "message": "ok"}]}))}),
                json!({"type": "MODIFIED", "object": csr_json("meshca-sds-blue-x1", "102",
                    json!({"certificate": cert, "conditions": [{"type": "Approved", "status": "True", "reason": "MeshcaPolicyApproved", "message": "ok"}]}))}),
            ]));
            expect_delete(&mut h, "meshca-sds-blue-x1", 200).await;
        });
        let c = CsrClient::new(client);
        let a = c
            .request(&request(), Duration::from_secs(30))
            .await
            .unwrap();
        server.await.unwrap();
        let Answer::Issued(o) = a else {
            panic!("{a:?}")
        };
        assert_eq!(o.csr, "meshca-sds-blue-x1");
        assert_eq!(o.username, "system:serviceaccount:app:blue");
        assert_eq!(o.info.spki_der, o.key.public_key_der());
        assert_eq!(
            o.info.sans.uri,
            ["spiffe://cluster.local/ns/app/sa/blue".to_string()]
        );
        assert!(!format!("{o:?}").contains("PRIVATE"));
    }

    #[tokio::test]
    async fn denied_and_failed_are_quoted_and_deleted() {
        for (ty, reason) in [
            ("Denied", "MeshcaPolicyDenied"),
            ("Failed", "MeshcaBadRequest"),
        ] {
            let (client, mut h) = mock_client();
            let server = tokio::spawn(async move {
                expect_create(&mut h, "c-1").await;
                let w = expect_watch(&mut h, "c-1", "100").await;
                w.send_response(events(&[json!({"type": "MODIFIED", "object": csr_json("c-1", "101",
                    json!({"conditions": [{"type": ty, "status": "True", "reason": reason,
                        "message": "spiffe://cluster.local/ns/app/sa/green does not belong to requester"}]}))})]));
                // Already removed by someone else: fine.
                expect_delete(&mut h, "c-1", 404).await;
            });
            let a = CsrClient::new(client)
                .request(&request(), Duration::from_secs(30))
                .await
                .unwrap();
            server.await.unwrap();
            let Answer::Refused(r) = a else {
                panic!("{a:?}")
            };
            assert_eq!(r.condition, ty);
            assert_eq!(r.reason, reason);
            let shown = r.to_string();
            assert!(
                shown.contains(reason)
                    && shown.contains("does not belong to requester")
                    && shown.contains("c-1"),
                "{shown}"
            );
        }
    }

    #[tokio::test]
    async fn a_transient_create_failure_is_a_retryable_error_and_nothing_is_left() {
        let (client, mut h) = mock_client();
        let server = tokio::spawn(async move {
            let (req, _, send) = next(&mut h).await;
            assert_eq!(req.method(), "POST");
            send.send_response(status(503, "ServiceUnavailable", "etcd leader changed"));
        });
        let e = CsrClient::new(client)
            .request(&request(), Duration::from_secs(30))
            .await
            .unwrap_err();
        server.await.unwrap();
        assert!(crate::kube::retryable(&e), "{e}");
        assert!(e.to_string().contains("etcd leader changed"), "{e}");
    }

    #[tokio::test]
    async fn an_ended_watch_is_resumed_from_a_fresh_read_and_a_timeout_deletes_the_csr() {
        let (client, mut h) = mock_client();
        let server = tokio::spawn(async move {
            expect_create(&mut h, "c-2").await;
            // The watch ends with 410 Gone: the client reads the CSR and watches again.
            let w = expect_watch(&mut h, "c-2", "100").await;
            w.send_response(events(&[json!({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "too old resource version", "reason": "Expired", "code": 410}})]));
            let (req, _, send) = next(&mut h).await;
            assert_eq!(req.method(), "GET");
            assert_eq!(
                req.uri().path(),
                "/apis/certificates.k8s.io/v1/certificatesigningrequests/c-2"
            );
            send.send_response(resp(200, &csr_json("c-2", "200", json!({}))));
            // Never answered: the request times out.
            let w = expect_watch(&mut h, "c-2", "200").await;
            expect_delete(&mut h, "c-2", 200).await;
            drop(w);
        });
        let e = CsrClient::new(client)
            .request(&request(), Duration::from_secs(2))
            .await
            .unwrap_err();
        server.await.unwrap();
        assert!(crate::kube::retryable(&e), "{e}");
        assert!(e.to_string().contains("neither signed nor refused"), "{e}");
    }

    #[tokio::test]
    async fn a_certificate_for_another_key_is_refused() {
        let (client, mut h) = mock_client();
        let server = tokio::spawn(async move {
            let info = expect_create(&mut h, "c-3").await;
            // Signed, but for a different request (another key).
            let other = crate::kube::signer::tests::csr_pem(
                &["spiffe://cluster.local/ns/app/sa/blue"],
                KeyAlgorithm::EcdsaP256,
            );
            let cert = sign_for(
                &info,
                &base64::engine::general_purpose::STANDARD.encode(other.as_bytes()),
            );
            let w = expect_watch(&mut h, "c-3", "100").await;
            w.send_response(events(&[
                json!({"type": "MODIFIED", "object": csr_json("c-3", "101",
                json!({"certificate": cert}))}),
            ]));
            expect_delete(&mut h, "c-3", 200).await;
        });
        let e = CsrClient::new(client)
            .request(&request(), Duration::from_secs(30))
            .await
            .unwrap_err();
        server.await.unwrap();
        assert!(e.to_string().contains("not for the key"), "{e}");
    }

    #[test]
    fn pure_helpers() {
        assert_eq!(
            usages_for(KeyAlgorithm::Rsa2048),
            [
                "digital signature",
                "key encipherment",
                "server auth",
                "client auth"
            ]
        );
        // The usages asked for are exactly what the signer grants.
        let u = crate::policy::usage::Usages {
            csr: None,
            kube: Some(usages_for(KeyAlgorithm::Rsa2048)),
        };
        assert_eq!(
            crate::policy::usage::grant(&u).unwrap(),
            crate::policy::usage::Ekus::default()
        );
        let mut r = request();
        r.expiration = Duration::from_secs(599);
        assert!(r.validate().unwrap_err().to_string().contains("600"));
        r.expiration = Duration::from_secs(600);
        r.signer_name = "example.com/x".into();
        assert!(r
            .validate()
            .unwrap_err()
            .to_string()
            .contains("meshca.io/<ca>"));
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"sub":"system:serviceaccount:app:blue","kubernetes.io":{}}"#);
        assert_eq!(
            service_account_of_token(&format!("eyJhbGciOiJSUzI1NiJ9.{claims}.sig\n")).unwrap(),
            ("app".to_string(), "blue".to_string())
        );
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"sub":"alice"}"#);
        assert!(service_account_of_token(&format!("a.{claims}.b"))
            .unwrap_err()
            .to_string()
            .contains("alice"));
        assert!(service_account_of_token("garbage").is_err());
        assert_eq!(
            service_account_of_username("system:serviceaccount:a:b:c"),
            None
        );
    }
}
