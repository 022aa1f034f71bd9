//! Istio's CA API served by meshca (`meshca istio-ca serve`): istio-agent and ztunnel with
//! `CA_ADDR` pointed here get their workload certificates from a meshca CA.
//!
//! Each `CreateCertificate` call:
//! 1. checks the `ClusterID` metadata (when sent) against this server's cluster ID;
//! 2. authenticates the caller: the `authorization: Bearer <token>` metadata reviewed by the
//!    API server for the configured audience, or else the client certificate of a mutual TLS
//!    connection (issued by a served CA: renewal);
//! 3. picks the CA (`CertSigner` metadata: `meshca.io/<ca>`; else the first served CA);
//! 4. for `ImpersonatedIdentity` metadata (ztunnel), looks up a pod of that account on the
//!    caller's node when the CA lists the caller in `istio_node_agents`;
//! 5. asks the one policy decision ([`meshca::issue::decide_csr`], front end `istio-ca`) with
//!    the authenticated requester, signs, records the certificate in the ledger and answers the
//!    chain leaf first, root last.
//!
//! Refusals are gRPC statuses: `Unauthenticated` (no or bad credentials, wrong cluster),
//! `PermissionDenied` (policy, naming the offending value), `InvalidArgument` (unreadable CSR
//! or metadata), `Unavailable` (the API server could not be asked). Tokens are never logged;
//! a token's hash prefix correlates log lines.
//!
//! Transport: mutual TLS is offered (client certificates optional, verified against the served
//! CAs), or plaintext on a loopback address only, as for SDS.

pub mod proto;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use meshca::identity::SpiffeId;
use meshca::issue::{CsrOptions, Issuer, LedgerEntry};
use meshca::istio::{
    select_ca, AuthError, Caller, PodDirectory, TokenAuthenticator, TokenHash, CERT_SIGNER,
    IMPERSONATED_IDENTITY,
};
use meshca::kube::issuers::IssuerWatch;
use meshca::kube::ledger::{IssuedRecord, LedgerSink};
use meshca::kube::metrics::{CaLabel, Metrics, ReasonLabel};
use meshca::policy::FrontEnd;
use meshca::x509::CertInfo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use crate::ServeError;
use proto::{
    IstioCertificateRequest, IstioCertificateResponse, IstioCertificateService,
    IstioCertificateServiceServer,
};

/// The server's own certificate for TLS.
#[derive(Clone, Debug)]
pub struct IstioTls {
    /// Server certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
}

/// What `meshca istio-ca serve` runs.
#[derive(Clone)]
pub struct IstioCaConfig {
    /// TCP address to listen on.
    pub listen: SocketAddr,
    /// TLS (required unless `listen` is a loopback address).
    pub tls: Option<IstioTls>,
    /// The CAs served, by name; the first answers requests without `CertSigner`.
    pub cas: Vec<String>,
    /// The current issuers of those CAs (reloaded when the store changes: a rotated CA is
    /// picked up without a restart).
    pub issuers: IssuerWatch,
    /// Token reviews.
    pub auth: Arc<dyn TokenAuthenticator>,
    /// Pod lookups for impersonation.
    pub pods: Arc<dyn PodDirectory>,
    /// The token audience required.
    pub audience: String,
    /// This cluster's ID (a request's `ClusterID` metadata must match it when sent).
    pub cluster_id: String,
    /// Where issued certificates are recorded (`None`: nowhere, tests only).
    pub ledger: Option<LedgerSink>,
    /// Counters.
    pub metrics: Arc<Metrics>,
}

impl std::fmt::Debug for IstioCaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IstioCaConfig")
            .field("listen", &self.listen)
            .field("tls", &self.tls)
            .field("cas", &self.cas)
            .field("audience", &self.audience)
            .field("cluster_id", &self.cluster_id)
            .finish_non_exhaustive()
    }
}

struct Handler {
    issuers: IssuerWatch,
    names: Vec<String>,
    auth: Arc<dyn TokenAuthenticator>,
    pods: Arc<dyn PodDirectory>,
    audience: String,
    cluster_id: String,
    ledger: Option<LedgerSink>,
    metrics: Arc<Metrics>,
}

/// A refusal: the gRPC status and the metric reason.
fn refuse(h: &Handler, reason: &str, status: Status) -> Status {
    h.metrics
        .istio_refused
        .get_or_create(&ReasonLabel {
            reason: reason.to_string(),
        })
        .inc();
    status
}

impl Handler {
    async fn authenticate(
        &self,
        req: &Request<IstioCertificateRequest>,
        issuer: &dyn Issuer,
    ) -> Result<(Caller, String), Status> {
        if let Some(v) = req.metadata().get("authorization") {
            let v = v
                .to_str()
                .map_err(|_| Status::unauthenticated("the authorization metadata is not text"))?;
            let token = v
                .strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    Status::unauthenticated("the authorization metadata is not \"Bearer <token>\"")
                })?;
            let hash = TokenHash::of(token);
            return match self.auth.review(token, &self.audience).await {
                Ok(c) => {
                    tracing::debug!(token = ?hash, caller = ?c, "token reviewed");
                    let user = format!("system:serviceaccount:{}:{}", c.namespace, c.name);
                    Ok((c, user))
                }
                Err(AuthError::Rejected(r)) => {
                    tracing::info!(token = ?hash, reason = %r, "token rejected");
                    Err(Status::unauthenticated(r))
                }
                Err(AuthError::Unavailable(r)) => {
                    tracing::warn!(token = ?hash, reason = %r, "token review failed");
                    Err(Status::unavailable(r))
                }
            };
        }
        // Renewal: the client's current certificate, already verified by the TLS handshake
        // against the served CAs.
        let certs = req
            .extensions()
            .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
            .and_then(|i| i.peer_certs())
            .ok_or_else(|| {
            Status::unauthenticated(
                "no credentials: send \"authorization: Bearer <ServiceAccount token>\" or a client certificate",
            )
        })?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("empty client certificate chain"))?;
        let info = CertInfo::from_der(leaf)
            .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?;
        let [uri] = info.sans.uri.as_slice() else {
            return Err(Status::unauthenticated(format!(
                "the client certificate carries {} URI SANs, not one SPIFFE ID",
                info.sans.uri.len()
            )));
        };
        let id = SpiffeId::parse(uri).map_err(|e| {
            Status::unauthenticated(format!("client certificate URI SAN {uri:?}: {e}"))
        })?;
        if id.trust_domain() != &issuer.meta().trust_domain {
            return Err(Status::unauthenticated(format!(
                "client certificate identity {id} is outside CA {}'s trust domain {}",
                issuer.meta().name,
                issuer.meta().trust_domain
            )));
        }
        let c = Caller::from_spiffe_id(&id).ok_or_else(|| {
            Status::unauthenticated(format!(
                "client certificate identity {id} is not spiffe://<td>/ns/<ns>/sa/<sa>"
            ))
        })?;
        let user = format!("spiffe:{id}");
        Ok((c, user))
    }

    async fn create(
        &self,
        req: Request<IstioCertificateRequest>,
    ) -> Result<IstioCertificateResponse, Status> {
        if let Some(v) = req.metadata().get("clusterid") {
            let v = v.to_str().unwrap_or("");
            if v != self.cluster_id {
                return Err(refuse(
                    self,
                    "unauthenticated",
                    Status::unauthenticated(format!(
                        "ClusterID {v:?} is not this server's cluster {:?}",
                        self.cluster_id
                    )),
                ));
            }
        }
        let body = req.get_ref();
        let ca = select_ca(body.metadata_str(CERT_SIGNER), &self.names, &self.names[0])
            .map_err(|e| refuse(self, "invalid", Status::invalid_argument(e)))?;
        // One snapshot for the whole request: never two generations of a CA.
        let set = self.issuers.borrow().clone();
        let issuer = set.get(ca).cloned().ok_or_else(|| {
            let why = set
                .failed()
                .get(ca)
                .map(String::as_str)
                .unwrap_or("it is not in the store");
            refuse(
                self,
                "unavailable",
                Status::unavailable(format!("CA {ca} is not served now: {why}")),
            )
        })?;
        let (caller, user) = self
            .authenticate(&req, issuer.as_ref())
            .await
            .map_err(|s| {
                let reason = if s.code() == tonic::Code::Unavailable {
                    "unavailable"
                } else {
                    "unauthenticated"
                };
                refuse(self, reason, s)
            })?;
        let body = req.into_inner();
        let requester = match body.metadata_str(IMPERSONATED_IDENTITY) {
            None => caller.requester(),
            Some(target) => {
                let target = SpiffeId::parse(target).map_err(|e| {
                    refuse(
                        self,
                        "invalid",
                        Status::invalid_argument(format!("{IMPERSONATED_IDENTITY}: {e}")),
                    )
                })?;
                // The pod lookup only for an agent the policy lists: nobody else makes meshca
                // list pods.
                let listed = issuer
                    .meta()
                    .policy
                    .istio_node_agents
                    .contains(&caller.account());
                let pod = match (listed, caller.node.as_deref(), target.k8s_workload()) {
                    (true, Some(node), Some((ns, sa))) => {
                        self.pods.pod_on_node(ns, sa, node).await.map_err(|e| {
                            tracing::warn!(error = %e, "pod lookup failed");
                            refuse(self, "unavailable", Status::unavailable(e))
                        })?
                    }
                    _ => None,
                };
                caller
                    .impersonating(&target, pod)
                    .map_err(|e| refuse(self, "invalid", Status::invalid_argument(e)))?
            }
        };
        let csr_der = pem::parse(body.csr.as_bytes())
            .ok()
            .filter(|p| p.tag() == "CERTIFICATE REQUEST" || p.tag() == "NEW CERTIFICATE REQUEST")
            .ok_or_else(|| {
                refuse(
                    self,
                    "invalid",
                    Status::invalid_argument("csr is not a PEM CERTIFICATE REQUEST"),
                )
            })?
            .into_contents();
        let ttl = match body.validity_duration {
            0 => None,
            s if s > 0 => Some(std::time::Duration::from_secs(s as u64)),
            s => {
                return Err(refuse(
                    self,
                    "invalid",
                    Status::invalid_argument(format!("validity_duration {s} is negative")),
                ))
            }
        };
        let opts = CsrOptions {
            via: FrontEnd::IstioCa,
            requester: requester.clone(),
            override_sans: None,
            ttl,
            kube_usages: None,
        };
        let signed = match meshca::issue::decide_csr(issuer.meta(), &csr_der, &opts) {
            Err(e) => {
                return Err(refuse(
                    self,
                    "invalid",
                    Status::invalid_argument(format!("csr: {e}")),
                ))
            }
            Ok(Err(d)) => {
                tracing::info!(caller = ?caller, ca, reason = %d.reason, "Istio CA request denied");
                return Err(refuse(
                    self,
                    "denied",
                    Status::permission_denied(format!("CA {ca}: {}", d.reason)),
                ));
            }
            Ok(Ok(sign)) => sign,
        };
        let now = time::OffsetDateTime::now_utc();
        let cert = issuer.sign(&signed, now).await.map_err(|e| {
            tracing::error!(ca, error = %e, "signing failed");
            refuse(
                self,
                "unavailable",
                Status::unavailable(format!("CA {ca} could not sign: {e}")),
            )
        })?;
        if let Some(l) = &self.ledger {
            l.record(IssuedRecord {
                entry: LedgerEntry::for_cert(ca, &cert, now),
                requester: user,
                object: match (&requester, requester.service_account()) {
                    (
                        meshca::policy::Requester::IstioImpersonation {
                            agent_namespace,
                            agent_name,
                            ..
                        },
                        Some((ns, sa)),
                    ) => format!("istio-ca/{ns}/{sa} via {agent_namespace}/{agent_name}"),
                    (_, Some((ns, sa))) => format!("istio-ca/{ns}/{sa}"),
                    _ => "istio-ca".to_string(),
                },
            })
            .await;
        }
        self.metrics
            .istio_issued
            .get_or_create(&CaLabel { ca: ca.to_string() })
            .inc();
        tracing::info!(caller = ?caller, ca, serial = %cert.info.serial_hex(), sans = ?cert.info.sans.uri, "issued through Istio's CA API");
        let mut chain = vec![meshca::pemutil::certs_to_pem([&cert.leaf])];
        chain.extend(
            cert.intermediates
                .iter()
                .chain(std::iter::once(&cert.root))
                .map(|c| meshca::pemutil::certs_to_pem([c])),
        );
        Ok(IstioCertificateResponse { cert_chain: chain })
    }
}

#[tonic::async_trait]
impl IstioCertificateService for Handler {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        self.create(request).await.map(Response::new)
    }
}

/// A running server.
#[derive(Debug)]
pub struct IstioCaServer {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

fn tls_config(
    tls: &IstioTls,
    cas: &[String],
    issuers: &IssuerWatch,
) -> Result<Arc<rustls::ServerConfig>, ServeError> {
    let err = |m: String| ServeError::Config(format!("TLS: {m}"));
    let chain = meshca::pemutil::parse_certs(
        &meshca::fsutil::read_limited(&tls.cert).map_err(|e| err(e.to_string()))?,
        &tls.cert.display().to_string(),
    )
    .map_err(|e| err(e.to_string()))?;
    let key_text = zeroize::Zeroizing::new(
        String::from_utf8(meshca::fsutil::read_limited(&tls.key).map_err(|e| err(e.to_string()))?)
            .map_err(|_| err(format!("{}: not PEM text", tls.key.display())))?,
    );
    let key = meshca::key::PrivateKey::from_pem(&key_text, &tls.key.display().to_string())
        .map_err(|e| err(e.to_string()))?;
    let key_der = {
        use rustls::pki_types::pem::PemObject;
        PrivateKeyDer::from_pem_slice(key.to_pkcs8_pem().as_bytes())
            .map_err(|_| err(format!("{}: unreadable private key", tls.key.display())))?
    };
    // Client certificates are optional (token clients send none) and must chain to a served
    // CA's anchors (its root, plus the other side of a rotation in progress), as loaded at
    // start.
    let mut roots = rustls::RootCertStore::empty();
    let set = issuers.borrow().clone();
    for name in cas {
        let anchors = match set.anchors_pem(name) {
            Some(pem) => meshca::pemutil::parse_certs(pem.as_bytes(), name)
                .map_err(|e| err(format!("CA {name}: {e}")))?,
            None => set
                .get(name)
                .and_then(|i| i.ca_certificate())
                .map(|c| vec![CertificateDer::from(c.to_vec())])
                .unwrap_or_default(),
        };
        for c in anchors {
            roots.add(c).map_err(|e| err(format!("CA {name}: {e}")))?;
        }
    }
    let builder = if roots.is_empty() {
        rustls::ServerConfig::builder().with_no_client_auth()
    } else {
        let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
            .allow_unauthenticated()
            .build()
            .map_err(|e| err(e.to_string()))?;
        rustls::ServerConfig::builder().with_client_cert_verifier(verifier)
    };
    let mut cfg = builder.with_single_cert(chain, key_der).map_err(|e| {
        err(format!(
            "{} and {} do not form a usable server certificate: {e}",
            tls.cert.display(),
            tls.key.display()
        ))
    })?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

impl IstioCaServer {
    /// Binds and starts serving.
    pub async fn start(cfg: IstioCaConfig) -> Result<IstioCaServer, ServeError> {
        if cfg.cas.is_empty() {
            return Err(ServeError::Config("no CA to serve".into()));
        }
        if cfg.tls.is_none() && crate::transport::is_exposed(&cfg.listen) {
            return Err(ServeError::Config(format!(
                "{} is not a loopback address: Istio's CA API needs TLS there (--tls-cert and --tls-key)",
                cfg.listen
            )));
        }
        let tls = cfg
            .tls
            .as_ref()
            .map(|t| tls_config(t, &cfg.cas, &cfg.issuers))
            .transpose()?;
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| ServeError::Listen {
                addr: cfg.listen.to_string(),
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|e| ServeError::Config(e.to_string()))?;
        let handler = Arc::new(Handler {
            names: cfg.cas,
            issuers: cfg.issuers,
            auth: cfg.auth,
            pods: cfg.pods,
            audience: cfg.audience,
            cluster_id: cfg.cluster_id,
            ledger: cfg.ledger,
            metrics: cfg.metrics,
        });
        let svc = IstioCertificateServiceServer::new(handler);
        let (stop, rx) = watch::channel(false);
        let mut rx2 = rx.clone();
        let signal = async move { crate::stopped(&mut rx2).await };
        let router = tonic::transport::Server::builder().add_service(svc);
        let task = match tls {
            Some(config) => {
                let incoming = crate::transport::tls_incoming(
                    listener,
                    config,
                    Arc::new(crate::metrics::Metrics::default()),
                    rx,
                );
                tokio::spawn(router.serve_with_incoming_shutdown(incoming, signal))
            }
            None => tokio::spawn(
                router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal),
            ),
        };
        Ok(IstioCaServer { addr, stop, task })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets calls in flight finish, and returns.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        let _ = self.stop.send(true);
        match self.task.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(ServeError::Transport {
                addr: self.addr.to_string(),
                source,
            }),
            Err(e) => Err(ServeError::Config(format!("Istio CA server task: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
    use meshca::istio::{AuthError, Caller};

    /// Accepts the token "good:<ns>:<sa>" (bound to node n1), refuses "expired", and cannot
    /// reach the API server for "down".
    #[derive(Debug)]
    struct Fake;

    #[async_trait::async_trait]
    impl TokenAuthenticator for Fake {
        async fn review(&self, token: &str, audience: &str) -> Result<Caller, AuthError> {
            assert_eq!(audience, "istio-ca");
            match token.strip_prefix("good:").and_then(|r| r.split_once(':')) {
                Some((ns, sa)) => Ok(Caller {
                    namespace: ns.into(),
                    name: sa.into(),
                    node: Some("n1".into()),
                    pod: Some("p".into()),
                }),
                None if token == "down" => Err(AuthError::Unavailable("connection refused".into())),
                None => Err(AuthError::Rejected("token has expired".into())),
            }
        }
    }

    #[async_trait::async_trait]
    impl PodDirectory for Fake {
        async fn pod_on_node(
            &self,
            ns: &str,
            sa: &str,
            node: &str,
        ) -> Result<Option<String>, String> {
            Ok((ns == "app" && sa == "b" && node == "n1").then(|| "b-1".to_string()))
        }
    }

    fn handler(node_agents: &[&str]) -> Handler {
        let now = time::OffsetDateTime::now_utc();
        let mut ca = meshca::ca::create_root(&meshca::ca::CaSpec::root("ca1"), now).unwrap();
        ca.meta.policy.istio_node_agents = node_agents.iter().map(|s| s.to_string()).collect();
        let issuer: Arc<dyn Issuer> = Arc::new(meshca::issue::LocalIssuer::new(ca).unwrap());
        Handler {
            names: vec!["ca1".into()],
            issuers: meshca::kube::issuers::IssuerSet::watch_fixed(
                [("ca1".to_string(), issuer)].into(),
            ),
            auth: Arc::new(Fake),
            pods: Arc::new(Fake),
            audience: "istio-ca".into(),
            cluster_id: "Kubernetes".into(),
            ledger: None,
            metrics: Arc::new(Metrics::new()),
        }
    }

    fn csr(id: &str) -> String {
        let key = meshca::key::KeyAlgorithm::EcdsaP256.generate().unwrap();
        let sans = meshca::identity::Sans {
            spiffe_id: Some(SpiffeId::parse(id).unwrap()),
            ..Default::default()
        };
        let der = meshca::issue::local::csr_for(&key, &sans, &Default::default()).unwrap();
        pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der))
    }

    fn req(
        token: Option<&str>,
        csr: String,
        ttl: i64,
        meta: &[(&str, &str)],
    ) -> Request<IstioCertificateRequest> {
        let fields = meta
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    Value {
                        kind: Some(Kind::StringValue(v.to_string())),
                    },
                )
            })
            .collect();
        let mut r = Request::new(IstioCertificateRequest {
            csr,
            validity_duration: ttl,
            metadata: (!meta.is_empty()).then_some(Struct { fields }),
        });
        if let Some(t) = token {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        r
    }

    const A: &str = "spiffe://cluster.local/ns/app/sa/a";
    const B: &str = "spiffe://cluster.local/ns/app/sa/b";

    #[tokio::test]
    async fn statuses_name_what_was_wrong() {
        let h = handler(&["istio-system/ztunnel"]);
        let ok = h
            .create(req(Some("good:app:a"), csr(A), 3600, &[]))
            .await
            .unwrap();
        assert_eq!(ok.cert_chain.len(), 2);
        let leaf = pem::parse(&ok.cert_chain[0]).unwrap();
        let info = CertInfo::from_der(leaf.contents()).unwrap();
        assert_eq!(info.sans.uri, vec![A.to_string()]);
        assert_eq!(
            (info.not_after - info.not_before).whole_seconds(),
            3600 + meshca::profile::BACKDATE.as_secs() as i64
        );

        let cases: Vec<(Request<IstioCertificateRequest>, tonic::Code, &str)> = vec![
            (
                req(Some("good:app:a"), csr(B), 0, &[]),
                tonic::Code::PermissionDenied,
                "sa/b",
            ),
            (
                req(Some("expired"), csr(A), 0, &[]),
                tonic::Code::Unauthenticated,
                "expired",
            ),
            (
                req(Some("down"), csr(A), 0, &[]),
                tonic::Code::Unavailable,
                "connection refused",
            ),
            (
                req(None, csr(A), 0, &[]),
                tonic::Code::Unauthenticated,
                "no credentials",
            ),
            (
                req(Some("good:app:a"), "junk".into(), 0, &[]),
                tonic::Code::InvalidArgument,
                "PEM",
            ),
            (
                req(Some("good:app:a"), csr(A), -5, &[]),
                tonic::Code::InvalidArgument,
                "-5",
            ),
            (
                req(
                    Some("good:app:a"),
                    csr(A),
                    0,
                    &[("CertSigner", "meshca.io/nope")],
                ),
                tonic::Code::InvalidArgument,
                "meshca.io/nope",
            ),
            (
                req(
                    Some("good:app:a"),
                    csr(A),
                    0,
                    &[("ImpersonatedIdentity", "not a uri")],
                ),
                tonic::Code::InvalidArgument,
                "ImpersonatedIdentity",
            ),
            // Impersonation: an unlisted caller; the listed one for a pod on another node.
            (
                req(
                    Some("good:app:a"),
                    csr(B),
                    0,
                    &[("ImpersonatedIdentity", B)],
                ),
                tonic::Code::PermissionDenied,
                "istio_node_agents",
            ),
            (
                req(
                    Some("good:istio-system:ztunnel"),
                    csr("spiffe://cluster.local/ns/app/sa/c"),
                    0,
                    &[("ImpersonatedIdentity", "spiffe://cluster.local/ns/app/sa/c")],
                ),
                tonic::Code::PermissionDenied,
                "app/c has no pod on node \"n1\"",
            ),
        ];
        for (i, (r, code, needle)) in cases.into_iter().enumerate() {
            let e = h.create(r).await.unwrap_err();
            assert_eq!(e.code(), code, "case {i}: {e:?}");
            assert!(e.message().contains(needle), "case {i}: {}", e.message());
        }
        // The allowed twin of the impersonation denials: the listed agent, b has a pod on n1.
        let ok = h
            .create(req(
                Some("good:istio-system:ztunnel"),
                csr(B),
                0,
                &[("ImpersonatedIdentity", B)],
            ))
            .await
            .unwrap();
        let leaf = pem::parse(&ok.cert_chain[0]).unwrap();
        assert_eq!(
            CertInfo::from_der(leaf.contents()).unwrap().sans.uri,
            vec![B.to_string()]
        );
        let mut r = req(Some("good:app:a"), csr(A), 0, &[]);
        r.metadata_mut()
            .insert("clusterid", "other".parse().unwrap());
        let e = h.create(r).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains("\"other\""), "{}", e.message());
    }
}
