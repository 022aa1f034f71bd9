//! Issuance policy: the one decision every front end asks. May *this requester* get *this
//! identity* from *this CA*, asked through *this front end*?
//!
//! [`Policy::decide`] is pure. `meshca issue` and SDS renewals (the local operator), the CSR
//! signer, the auto-approver and the managed-Secret controller all call it (through
//! [`crate::issue`]), and `meshca policy check` shows its answer offline.
//!
//! **Requesters.** The requester is what the platform authenticated, never what the request
//! claims ([`Requester`]):
//! - a Kubernetes service account (`system:serviceaccount:<ns>:<sa>`, from a CSR's
//!   `spec.username`) binds `{ns}`/`{sa}` to itself and may only get its own SPIFFE ID;
//! - a registration authority (a username listed in `registration_authorities`, e.g. istiod in
//!   RA mode) binds `{ns}`/`{sa}` to the requested SPIFFE ID, inside the CA's trust domain;
//! - any other Kubernetes user (a person, a node) binds nothing, so no templated rule matches;
//! - a managed Secret in namespace X binds `{ns}` to X and `{sa}` to the service account of the
//!   SPIFFE ID it asks for, which must be in X; the CA must list X in `managed_namespaces`;
//! - a pod's service account (a PodCertificateRequest's namespace and
//!   `spec.serviceAccountName`) binds `{ns}`/`{sa}` to itself and may only get its own ID; the
//!   CA must say `pod_certificates = true` and list the namespace in
//!   `pod_certificate_namespaces` (the PodCertificateRequest API has no approval step, so this
//!   opt-in is the only gate);
//! - an Istio client of `meshca istio-ca serve` (istio-agent, ztunnel) authenticated by its
//!   ServiceAccount token (TokenReview) or its current certificate binds `{ns}`/`{sa}` to that
//!   account and may only get its own SPIFFE ID;
//! - an Istio node agent (ztunnel) asking for another account's identity (`ImpersonatedIdentity`)
//!   binds `{ns}`/`{sa}` to the impersonated account, only when the CA lists the agent in
//!   `istio_node_agents` and that account has a pod on the agent's node (looked up by the
//!   server before it asks; the decision itself stays pure);
//! - the local operator (who holds the CA key) binds `{ns}`/`{sa}` from the requested ID.
//!
//! **In-cluster defaults.** For the Kubernetes front ends an empty `allowed_spiffe_ids`
//! means `spiffe://{td}/ns/{ns}/sa/{sa}` and an empty `allowed_dns` means `{sa}.{ns}.svc` and
//! `{sa}.{ns}.svc.cluster.local` (for the local operator, empty lists allow anything in the
//! trust domain). An IP SAN must lie in `allowed_ip_ranges`; in the cluster an empty list means
//! no IP SAN (for the local operator, any). The auto-approver additionally requires
//! `auto_approve = true`, never approves IP SANs, and approves a DNS name matched only by a
//! rule without `{ns}`/`{sa}` only with `auto_approve_static_dns = true`.
//!
//! Patterns: see [`pattern`]. Usages: see [`usage`].

pub mod pattern;
pub mod usage;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::identity::{Sans, TrustDomain};
use crate::key::{KeyAlgorithm, PublicKeyKind, MIN_RSA_BITS};

pub use ipnet::IpNet;
pub use pattern::Bindings;
pub use usage::{Ekus, Usages, ALLOWED_USAGES};

/// Default TTL of a workload certificate when none is asked for.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default maximum TTL of a workload certificate.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// The Kubernetes API's minimum `spec.expirationSeconds`.
pub const MIN_EXPIRATION_SECONDS: u64 = 600;

/// SPIFFE rule the in-cluster front ends use when a policy lists none.
pub const IN_CLUSTER_SPIFFE: [&str; 1] = ["spiffe://{td}/ns/{ns}/sa/{sa}"];
/// DNS rules the in-cluster front ends use when a policy lists none.
pub const IN_CLUSTER_DNS: [&str; 2] = ["{sa}.{ns}.svc", "{sa}.{ns}.svc.cluster.local"];

/// What a CA may sign.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// SPIFFE ID patterns. Empty: any ID in the CA's trust domain for the local operator,
    /// [`IN_CLUSTER_SPIFFE`] in the cluster.
    pub allowed_spiffe_ids: Vec<String>,
    /// DNS name patterns. Empty: any DNS name for the local operator, [`IN_CLUSTER_DNS`] in
    /// the cluster.
    pub allowed_dns: Vec<String>,
    /// Whether wildcard DNS SANs (`*.example.com`) may be issued at all.
    pub allow_wildcard_dns: bool,
    /// Whether IP SANs may be issued at all (never by auto-approval).
    pub allow_ip_sans: bool,
    /// IP ranges (CIDR, e.g. `10.0.0.0/8`) every IP SAN must lie in. Empty: the in-cluster
    /// front ends issue no IP SAN; the local operator any (within `allow_ip_sans`).
    pub allowed_ip_ranges: Vec<IpNet>,
    /// Whether every certificate must carry a SPIFFE ID.
    pub require_spiffe_id: bool,
    /// Longest TTL a certificate may have.
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
    /// TTL used when the request names none.
    #[serde(with = "humantime_serde")]
    pub default_ttl: Duration,
    /// Key algorithms accepted for workload keys. Empty: any supported one.
    pub allowed_key_algorithms: Vec<KeyAlgorithm>,
    /// Kubernetes usernames that request certificates for other workloads (istiod in RA
    /// mode): the requested SPIFFE ID's own ns/sa bind the templates. Default none.
    pub registration_authorities: Vec<String>,
    /// Namespaces whose managed Secrets this CA serves. Default none.
    pub managed_namespaces: Vec<String>,
    /// Whether `signer run --auto-approve` may approve CSRs for this CA. Default off.
    pub auto_approve: bool,
    /// Whether the PodCertificateRequest signer (`signer run --pod-certificates`) signs for
    /// this CA at all. Default off. The pod's namespace must also be listed in
    /// `pod_certificate_namespaces`.
    pub pod_certificates: bool,
    /// Namespaces whose pods may get a pod certificate from this CA. Default none.
    pub pod_certificate_namespaces: Vec<String>,
    /// Whether the auto-approver may approve DNS names matched only by a rule without
    /// `{ns}`/`{sa}` (e.g. `**.example.com`). Default off.
    pub auto_approve_static_dns: bool,
    /// Istio node agents (`<namespace>/<serviceaccount>`, e.g. `istio-system/ztunnel`) that
    /// may ask `meshca istio-ca serve` for the identity of a workload with a pod on their own
    /// node (ztunnel's `ImpersonatedIdentity`). Default none: impersonation is refused.
    pub istio_node_agents: Vec<String>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            allowed_spiffe_ids: Vec::new(),
            allowed_dns: Vec::new(),
            allow_wildcard_dns: false,
            allow_ip_sans: true,
            allowed_ip_ranges: Vec::new(),
            require_spiffe_id: false,
            max_ttl: DEFAULT_MAX_TTL,
            default_ttl: DEFAULT_TTL,
            allowed_key_algorithms: Vec::new(),
            registration_authorities: Vec::new(),
            managed_namespaces: Vec::new(),
            auto_approve: false,
            pod_certificates: false,
            pod_certificate_namespaces: Vec::new(),
            auto_approve_static_dns: false,
            istio_node_agents: Vec::new(),
        }
    }
}

/// The front end a request arrives through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FrontEnd {
    /// `meshca issue`, `meshca init`, SDS renewals: the local operator.
    Local,
    /// The CSR signer signing an approved Kubernetes CSR.
    CsrSigner,
    /// The auto-approver deciding a pending Kubernetes CSR.
    AutoApprover,
    /// The managed-Secret controller.
    ManagedSecret,
    /// The PodCertificateRequest signer (`certificates.k8s.io/v1beta1`).
    PodCertificate,
    /// Istio's `IstioCertificateService` (`meshca istio-ca serve`).
    IstioCa,
}

impl FrontEnd {
    /// The name used by `meshca policy check --as`.
    pub fn name(&self) -> &'static str {
        match self {
            FrontEnd::Local => "local",
            FrontEnd::CsrSigner => "csr-signer",
            FrontEnd::AutoApprover => "auto-approver",
            FrontEnd::ManagedSecret => "managed-secret",
            FrontEnd::PodCertificate => "pod-certificate",
            FrontEnd::IstioCa => "istio-ca",
        }
    }

    fn in_cluster(&self) -> bool {
        !matches!(self, FrontEnd::Local)
    }
}

impl std::str::FromStr for FrontEnd {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "local" => FrontEnd::Local,
            "csr-signer" => FrontEnd::CsrSigner,
            "auto-approver" => FrontEnd::AutoApprover,
            "managed-secret" => FrontEnd::ManagedSecret,
            "pod-certificate" => FrontEnd::PodCertificate,
            "istio-ca" => FrontEnd::IstioCa,
            _ => {
                return Err(Error::invalid(
                    "front end",
                    format!("{s:?}; expected local, csr-signer, auto-approver, managed-secret, pod-certificate or istio-ca"),
                ))
            }
        })
    }
}

/// Who asks, as the platform authenticated it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requester {
    /// The local operator (CLI, SDS): holds the CA key.
    LocalOperator,
    /// A Kubernetes user, as the API server authenticated it (a CSR's `spec.username`).
    Kube(String),
    /// A managed Secret in this namespace.
    SecretNamespace(String),
    /// The service account a pod runs as, from a PodCertificateRequest: its namespace (the
    /// request's own, enforced by the API server) and `spec.serviceAccountName` (tied to the
    /// pod by the API server's NodeRestriction admission when a kubelet creates the request).
    PodServiceAccount {
        /// The namespace.
        namespace: String,
        /// The service account's name.
        name: String,
    },
    /// A client of Istio's CA service, as the platform authenticated it: the ServiceAccount of
    /// a token the API server reviewed, or of the client's current certificate (mTLS).
    IstioAccount {
        /// The namespace.
        namespace: String,
        /// The service account's name.
        name: String,
    },
    /// An Istio node agent (authenticated like [`Requester::IstioAccount`]) asking for another
    /// account's identity (ztunnel's `ImpersonatedIdentity`).
    IstioImpersonation {
        /// The agent's namespace.
        agent_namespace: String,
        /// The agent's service account.
        agent_name: String,
        /// The agent's node, from its token's bound pod (`None`: the token names no node).
        node: Option<String>,
        /// The impersonated account's namespace.
        namespace: String,
        /// The impersonated service account.
        name: String,
        /// A pod of the impersonated account on the agent's node, as the server found it
        /// (`None`: there is none).
        pod_on_node: Option<String>,
    },
}

impl Requester {
    /// The requester of a Kubernetes CSR from its `spec.username`.
    pub fn kube(username: impl Into<String>) -> Requester {
        Requester::Kube(username.into())
    }

    /// `(namespace, name)` when this is `system:serviceaccount:<ns>:<sa>` or a pod's service
    /// account.
    pub fn service_account(&self) -> Option<(&str, &str)> {
        let u = match self {
            Requester::Kube(u) => u,
            Requester::PodServiceAccount { namespace, name }
            | Requester::IstioAccount { namespace, name }
            | Requester::IstioImpersonation {
                namespace, name, ..
            } => {
                return (!namespace.is_empty() && !name.is_empty())
                    .then_some((namespace.as_str(), name.as_str()))
            }
            _ => return None,
        };
        let (ns, sa) = u.strip_prefix("system:serviceaccount:")?.split_once(':')?;
        (!ns.is_empty() && !sa.is_empty() && !sa.contains(':')).then_some((ns, sa))
    }
}

impl std::fmt::Display for Requester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Requester::LocalOperator => f.write_str("the local operator"),
            Requester::Kube(u) => write!(f, "{u:?}"),
            Requester::SecretNamespace(ns) => write!(f, "a managed Secret in namespace {ns:?}"),
            Requester::PodServiceAccount { namespace, name } => {
                write!(f, "a pod of service account {namespace}/{name}")
            }
            Requester::IstioAccount { namespace, name } => {
                write!(f, "Istio client {namespace}/{name}")
            }
            Requester::IstioImpersonation {
                agent_namespace,
                agent_name,
                namespace,
                name,
                ..
            } => write!(
                f,
                "Istio node agent {agent_namespace}/{agent_name} for {namespace}/{name}"
            ),
        }
    }
}

/// Everything a policy decision looks at.
#[derive(Clone, Debug)]
pub struct PolicyRequest<'a> {
    /// The front end asking.
    pub via: FrontEnd,
    /// Who asks.
    pub requester: &'a Requester,
    /// The SANs to be issued.
    pub sans: &'a Sans,
    /// The requested lifetime (`None`: the policy default).
    pub ttl: Option<Duration>,
    /// The subject public key's kind.
    pub key: PublicKeyKind,
    /// Whether the request asked for `CA:TRUE`.
    pub wants_ca: bool,
    /// The usages asked for.
    pub usages: &'a Usages,
}

/// What an allowed request is issued with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The lifetime.
    pub ttl: Duration,
    /// The extended key usages.
    pub ekus: Ekus,
}

/// Why a request is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    /// The first rule that failed, naming the offending value.
    pub reason: String,
    /// The request is not for this front end to decide (the auto-approver leaves it pending
    /// for a person): the CA did not opt in, or the requester is not a workload.
    pub manual: bool,
    /// The refusal is about the key type (unsupported, or not one the CA's policy allows):
    /// the PodCertificateRequest signer reports it as `UnsupportedKeyType`.
    pub key_type: bool,
}

impl Denial {
    fn new(reason: impl Into<String>) -> Self {
        Denial {
            reason: reason.into(),
            manual: false,
            key_type: false,
        }
    }

    fn manual(reason: impl Into<String>) -> Self {
        Denial {
            reason: reason.into(),
            manual: true,
            key_type: false,
        }
    }

    fn key(reason: impl Into<String>) -> Self {
        Denial {
            reason: reason.into(),
            manual: false,
            key_type: true,
        }
    }

    /// As the library error of CA `ca`.
    pub fn into_error(self, ca: &str) -> Error {
        Error::PolicyDenied {
            ca: ca.to_string(),
            reason: self.reason,
        }
    }
}

/// How the requester binds `{ns}`/`{sa}`.
enum Binding<'a> {
    /// A service account: it may only get its own ID.
    Account(&'a str, &'a str),
    /// From the requested ID (registration authority, local operator).
    FromRequest,
    /// A managed Secret's namespace; `{sa}` from the requested ID.
    Namespace(&'a str),
    /// Nothing binds (a person, a node).
    Unbound,
}

impl Policy {
    /// The one decision: may `req.requester` get `req.sans` from CA `ca` (trust domain
    /// `trust_domain`) through `req.via`? Pure.
    pub fn decide(
        &self,
        ca: &str,
        trust_domain: &TrustDomain,
        req: &PolicyRequest<'_>,
    ) -> std::result::Result<Grant, Denial> {
        let via = req.via;
        let requester = req.requester;
        // The requester must be one this front end authenticates.
        let consistent = matches!(
            (via, requester),
            (FrontEnd::Local, Requester::LocalOperator)
                | (
                    FrontEnd::CsrSigner | FrontEnd::AutoApprover,
                    Requester::Kube(_)
                )
                | (FrontEnd::ManagedSecret, Requester::SecretNamespace(_))
                | (
                    FrontEnd::PodCertificate,
                    Requester::PodServiceAccount { .. }
                )
                | (
                    FrontEnd::IstioCa,
                    Requester::IstioAccount { .. } | Requester::IstioImpersonation { .. }
                )
        );
        if !consistent {
            return Err(Denial::new(format!(
                "{} cannot ask through the {} front end",
                requester,
                via.name()
            )));
        }
        let is_ra =
            matches!(requester, Requester::Kube(u) if self.registration_authorities.contains(u));
        let binding = match requester {
            Requester::LocalOperator => Binding::FromRequest,
            Requester::Kube(_) if is_ra => Binding::FromRequest,
            Requester::Kube(u) => match requester.service_account() {
                Some((ns, sa)) => Binding::Account(ns, sa),
                None if via == FrontEnd::AutoApprover => {
                    return Err(Denial::manual(format!(
                        "requester {u:?} is not a service account; left for manual approval"
                    )))
                }
                None => Binding::Unbound,
            },
            Requester::PodServiceAccount { namespace, name } => match requester.service_account() {
                Some((ns, sa)) => {
                    if let Some(d) = self.pod_certificate_gate(ca, ns) {
                        return Err(d);
                    }
                    Binding::Account(ns, sa)
                }
                None => {
                    return Err(Denial::new(format!(
                        "the pod's service account {namespace:?}/{name:?} is incomplete"
                    )))
                }
            },
            Requester::IstioAccount { namespace, name } => match requester.service_account() {
                Some((ns, sa)) => Binding::Account(ns, sa),
                None => {
                    return Err(Denial::new(format!(
                        "the Istio client's service account {namespace:?}/{name:?} is incomplete"
                    )))
                }
            },
            Requester::IstioImpersonation {
                agent_namespace,
                agent_name,
                node,
                namespace,
                name,
                pod_on_node,
            } => {
                self.istio_impersonation_gate(
                    ca,
                    &format!("{agent_namespace}/{agent_name}"),
                    node.as_deref(),
                    &format!("{namespace}/{name}"),
                    pod_on_node.as_deref(),
                )?;
                match requester.service_account() {
                    Some((ns, sa)) => Binding::Account(ns, sa),
                    None => {
                        return Err(Denial::new(format!(
                            "the impersonated service account {namespace:?}/{name:?} is incomplete"
                        )))
                    }
                }
            }
            Requester::SecretNamespace(ns) => {
                if !self.managed_namespaces.iter().any(|m| m == ns) {
                    return Err(Denial::new(format!(
                        "namespace {ns:?} is not served by CA {ca}: it is not in the policy's managed_namespaces"
                    )));
                }
                Binding::Namespace(ns)
            }
        };
        if via == FrontEnd::AutoApprover {
            if let Some(d) = self.auto_approval_gate(ca) {
                return Err(d);
            }
        }

        if req.wants_ca {
            return Err(Denial::new(
                "the request asks for CA:TRUE; meshca issues only end-entity certificates",
            ));
        }
        match req.key {
            PublicKeyKind::Rsa { bits } if bits < MIN_RSA_BITS => {
                return Err(Denial::key(format!(
                    "RSA key of {bits} bits is under the {MIN_RSA_BITS}-bit minimum"
                )))
            }
            PublicKeyKind::Other => return Err(Denial::key("unsupported public key type")),
            // Sizes meshca cannot issue for (ECDSA P-521, RSA 8192): refused here rather
            // than failing at signing.
            k if k.algorithm().is_none() => {
                return Err(Denial::key(format!("unsupported public key type {k}")))
            }
            _ => {}
        }
        if !self.allowed_key_algorithms.is_empty() {
            let ok = req
                .key
                .algorithm()
                .is_some_and(|a| self.allowed_key_algorithms.contains(&a));
            if !ok {
                return Err(Denial::key(format!(
                    "key type {} is not one of the allowed {}",
                    req.key,
                    self.allowed_key_algorithms
                        .iter()
                        .map(|a| a.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        let ekus = usage::grant(req.usages).map_err(Denial::new)?;

        let ttl = req.ttl.unwrap_or(self.default_ttl.min(self.max_ttl));
        if ttl.is_zero() {
            return Err(Denial::new("TTL must be positive"));
        }
        if matches!(via, FrontEnd::CsrSigner | FrontEnd::AutoApprover)
            && ttl.as_secs() < MIN_EXPIRATION_SECONDS
        {
            return Err(Denial::new(format!(
                "spec.expirationSeconds {} is below the minimum of {MIN_EXPIRATION_SECONDS}",
                ttl.as_secs()
            )));
        }
        if ttl > self.max_ttl {
            return Err(Denial::new(format!(
                "TTL {} is over the maximum {}",
                humantime::format_duration(ttl),
                humantime::format_duration(self.max_ttl)
            )));
        }
        if req.sans.is_empty() {
            return Err(Denial::new(
                "the request has no SAN (give a SPIFFE ID, DNS name or IP)",
            ));
        }
        if self.require_spiffe_id && req.sans.spiffe_id.is_none() {
            return Err(Denial::new("this CA requires a SPIFFE ID"));
        }

        let own = req.sans.spiffe_id.as_ref().and_then(|id| id.k8s_workload());
        let (ns, sa) = match binding {
            Binding::Account(ns, sa) => (Some(ns), Some(sa)),
            Binding::FromRequest => (own.map(|o| o.0), own.map(|o| o.1)),
            Binding::Namespace(ns) => (Some(ns), own.filter(|o| o.0 == ns).map(|o| o.1)),
            Binding::Unbound => (None, None),
        };
        let vars = Bindings {
            ns,
            sa,
            td: trust_domain.as_str(),
        };
        let unbound_hint = || {
            match binding {
            Binding::Unbound => format!(
                " (requester {requester} is not a service account, so {{ns}}/{{sa}} bind to nothing)"
            ),
            _ => String::new(),
        }
        };

        if let Some(id) = &req.sans.spiffe_id {
            if id.trust_domain() != trust_domain {
                return Err(Denial::new(format!(
                    "SPIFFE ID {id} is outside the CA's trust domain {trust_domain}"
                )));
            }
            match binding {
                Binding::Account(ns, sa) if own != Some((ns, sa)) => {
                    return Err(Denial::new(format!(
                        "SPIFFE ID {id} does not belong to requester {requester} (expected spiffe://{trust_domain}/ns/{ns}/sa/{sa})"
                    )))
                }
                Binding::Namespace(x) if own.map(|o| o.0) != Some(x) => {
                    return Err(Denial::new(format!(
                        "SPIFFE ID {id} is not an identity of namespace {x:?} (expected spiffe://{trust_domain}/ns/{x}/sa/<sa>)"
                    )))
                }
                _ => {}
            }
            let m = |p: &str| pattern::spiffe_id_matches(p, id, &vars);
            let rules: &[String] = &self.allowed_spiffe_ids;
            let matched = if rules.is_empty() {
                !via.in_cluster() || any_match(&IN_CLUSTER_SPIFFE, m)?
            } else {
                any_match(rules, m)?
            };
            if !matched {
                return Err(Denial::new(format!(
                    "SPIFFE ID {id} matches no allowed pattern{}",
                    unbound_hint()
                )));
            }
        }
        for d in &req.sans.dns {
            if d.is_wildcard() && !self.allow_wildcard_dns {
                return Err(Denial::new(format!("wildcard DNS name {d} is not allowed")));
            }
            let name = d.as_str();
            let ok = if self.allowed_dns.is_empty() {
                if !via.in_cluster() {
                    continue;
                }
                self.dns_allowed(&IN_CLUSTER_DNS, via, d, name, &vars)
            } else {
                self.dns_allowed(&self.allowed_dns, via, d, name, &vars)
            };
            if let Err(mut denial) = ok {
                if !denial.manual {
                    denial.reason.push_str(&unbound_hint());
                }
                return Err(denial);
            }
        }
        for ip in &req.sans.ips {
            self.ip_allowed(ca, via, *ip)?;
        }
        Ok(Grant { ttl, ekus })
    }

    /// Whether IP SAN `ip` may be issued through `via`: never by the auto-approver, never
    /// without `allow_ip_sans`, and inside `allowed_ip_ranges` (which the in-cluster front ends
    /// require: an empty list there means no IP SAN).
    fn ip_allowed(
        &self,
        ca: &str,
        via: FrontEnd,
        ip: std::net::IpAddr,
    ) -> std::result::Result<(), Denial> {
        if via == FrontEnd::AutoApprover {
            return Err(Denial::new(format!("IP SAN {ip} is never auto-approved")));
        }
        if !self.allow_ip_sans {
            return Err(Denial::new(format!("IP SAN {ip} is not allowed")));
        }
        if self.allowed_ip_ranges.is_empty() {
            if via.in_cluster() {
                return Err(Denial::new(format!(
                    "IP SAN {ip} is not allowed in the cluster: CA {ca}'s policy lists no allowed_ip_ranges"
                )));
            }
            return Ok(());
        }
        if self.allowed_ip_ranges.iter().any(|r| r.contains(&ip)) {
            return Ok(());
        }
        Err(Denial::new(format!(
            "IP SAN {ip} is outside CA {ca}'s allowed_ip_ranges ({})",
            self.allowed_ip_ranges
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }

    /// `Some` when CA `ca` does not sign pod certificates for namespace `ns`: the CA has no
    /// `pod_certificates = true`, or does not list `ns` in `pod_certificate_namespaces`.
    pub fn pod_certificate_gate(&self, ca: &str, ns: &str) -> Option<Denial> {
        if !self.pod_certificates {
            return Some(Denial::new(format!(
                "CA {ca} does not sign pod certificates (its policy has no pod_certificates = true); namespace {ns:?} asked"
            )));
        }
        if !self.pod_certificate_namespaces.iter().any(|n| n == ns) {
            return Some(Denial::new(format!(
                "namespace {ns:?} is not served pod certificates by CA {ca}: it is not in the policy's pod_certificate_namespaces"
            )));
        }
        None
    }

    /// `Err` unless node agent `agent` (`ns/sa`) may ask CA `ca` for the identity of `target`
    /// (`ns/sa`): the policy lists the agent in `istio_node_agents`, the agent's token names its
    /// node, and the server found a pod of `target` on that node.
    fn istio_impersonation_gate(
        &self,
        ca: &str,
        agent: &str,
        node: Option<&str>,
        target: &str,
        pod_on_node: Option<&str>,
    ) -> std::result::Result<(), Denial> {
        if !self.istio_node_agents.iter().any(|a| a == agent) {
            return Err(Denial::new(format!(
                "{agent} may not impersonate {target}: it is not in CA {ca}'s istio_node_agents"
            )));
        }
        let Some(node) = node else {
            return Err(Denial::new(format!(
                "node agent {agent} may not impersonate {target}: its token is not bound to a pod on a node"
            )));
        };
        if pod_on_node.is_none() {
            return Err(Denial::new(format!(
                "node agent {agent} may not impersonate {target}: {target} has no pod on node {node:?}"
            )));
        }
        Ok(())
    }

    /// Whether DNS name `d` matches one of `rules` (the auto-approver: one that binds the
    /// requester, unless the policy allows static rules).
    fn dns_allowed<S: AsRef<str>>(
        &self,
        rules: &[S],
        via: FrontEnd,
        d: &crate::identity::DnsName,
        name: &str,
        vars: &Bindings<'_>,
    ) -> std::result::Result<(), Denial> {
        let m = |p: &str| pattern::dns_matches(p, name, vars);
        if via == FrontEnd::AutoApprover && !self.auto_approve_static_dns {
            if any_match(rules, |p| Ok(pattern::binds_requester(p) && m(p)?))? {
                return Ok(());
            }
            if any_match(rules, m)? {
                return Err(Denial::manual(format!(
                    "DNS name {d} matches only a rule without {{ns}}/{{sa}}, which is not auto-approved (the policy has no auto_approve_static_dns = true); left for manual approval"
                )));
            }
        } else if any_match(rules, m)? {
            return Ok(());
        }
        Err(Denial::new(format!(
            "DNS name {d} matches no allowed pattern"
        )))
    }

    /// `Some` when CA `ca` does not opt in to auto-approval: the auto-approver leaves its CSRs
    /// pending for a person.
    pub fn auto_approval_gate(&self, ca: &str) -> Option<Denial> {
        (!self.auto_approve).then(|| {
            Denial::manual(format!(
                "CA {ca} does not auto-approve (its policy has no auto_approve = true); left for manual approval"
            ))
        })
    }

    /// Checks that the policy itself is sensible (patterns parse, TTLs ordered, names valid).
    pub fn validate(&self) -> Result<()> {
        if self.max_ttl.is_zero() {
            return Err(Error::invalid("policy", "max_ttl must be positive"));
        }
        for p in &self.allowed_spiffe_ids {
            pattern::check_spiffe(p).map_err(|e| Error::invalid("policy", e))?;
        }
        for p in &self.allowed_dns {
            pattern::check_dns(p).map_err(|e| Error::invalid("policy", e))?;
        }
        for u in &self.registration_authorities {
            if u.is_empty() || u.contains(char::is_whitespace) {
                return Err(Error::invalid(
                    "policy",
                    format!("registration authority {u:?} is not a Kubernetes username"),
                ));
            }
        }
        for a in &self.istio_node_agents {
            let ok = a
                .split_once('/')
                .is_some_and(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains('/'));
            if !ok || a.contains(char::is_whitespace) {
                return Err(Error::invalid(
                    "policy",
                    format!("istio_node_agents entry {a:?} is not <namespace>/<serviceaccount>"),
                ));
            }
        }
        let namespaces = self
            .managed_namespaces
            .iter()
            .map(|ns| ("managed namespace", ns))
            .chain(
                self.pod_certificate_namespaces
                    .iter()
                    .map(|ns| ("pod certificate namespace", ns)),
            );
        for (what, ns) in namespaces {
            let ok = !ns.is_empty()
                && ns.len() <= 63
                && ns
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            if !ok {
                return Err(Error::invalid(
                    "policy",
                    format!("{what} {ns:?} is not a Kubernetes namespace name"),
                ));
            }
        }
        Ok(())
    }
}

/// Whether any rule matches; a malformed rule is a denial naming it.
fn any_match<S: AsRef<str>>(
    rules: &[S],
    mut f: impl FnMut(&str) -> std::result::Result<bool, String>,
) -> std::result::Result<bool, Denial> {
    for r in rules {
        if f(r.as_ref()).map_err(|e| Denial::new(format!("the policy is invalid: {e}")))? {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{DnsName, SpiffeId};

    fn sans(id: Option<&str>, dns: &[&str]) -> Sans {
        Sans {
            spiffe_id: id.map(|s| SpiffeId::parse(s).unwrap()),
            dns: dns.iter().map(|d| DnsName::parse(d).unwrap()).collect(),
            ips: vec![],
        }
    }

    fn td() -> TrustDomain {
        TrustDomain::default()
    }

    const NO_USAGES: &Usages = &Usages {
        csr: None,
        kube: None,
    };

    fn ask(
        p: &Policy,
        via: FrontEnd,
        who: &Requester,
        s: &Sans,
        ttl: Option<Duration>,
    ) -> std::result::Result<Grant, Denial> {
        p.decide(
            "c",
            &td(),
            &PolicyRequest {
                via,
                requester: who,
                sans: s,
                ttl,
                key: PublicKeyKind::Ecdsa { bits: 256 },
                wants_ca: false,
                usages: NO_USAGES,
            },
        )
    }

    fn local(p: &Policy, s: &Sans, ttl: Option<Duration>) -> std::result::Result<Grant, Denial> {
        ask(p, FrontEnd::Local, &Requester::LocalOperator, s, ttl)
    }

    fn denied(r: std::result::Result<Grant, Denial>, needle: &str) -> Denial {
        match r {
            Err(d) => {
                assert!(
                    d.reason.contains(needle),
                    "{needle:?} not in {:?}",
                    d.reason
                );
                d
            }
            Ok(g) => panic!("expected a denial naming {needle:?}, got {g:?}"),
        }
    }

    #[test]
    fn default_policy_allows_own_trust_domain_and_caps_ttl() {
        let p = Policy::default();
        let s = sans(Some("spiffe://cluster.local/ns/a/sa/b"), &["b.a.svc"]);
        assert_eq!(local(&p, &s, None).unwrap().ttl, DEFAULT_TTL);
        denied(local(&p, &s, Some(DEFAULT_MAX_TTL * 2)), "over the maximum");
        let other = sans(Some("spiffe://evil.org/ns/a/sa/b"), &[]);
        denied(local(&p, &other, None), "outside the CA's trust domain");
        denied(local(&p, &Sans::default(), None), "no SAN");
    }

    #[test]
    fn ca_requests_weak_keys_and_wildcards_are_denied() {
        let p = Policy::default();
        let s = sans(None, &["a.example.com"]);
        let mut r = PolicyRequest {
            via: FrontEnd::Local,
            requester: &Requester::LocalOperator,
            sans: &s,
            ttl: None,
            key: PublicKeyKind::Ecdsa { bits: 256 },
            wants_ca: true,
            usages: NO_USAGES,
        };
        denied(p.decide("c", &td(), &r), "CA:TRUE");
        r.wants_ca = false;
        r.key = PublicKeyKind::Rsa { bits: 1024 };
        denied(p.decide("c", &td(), &r), "1024 bits");
        let w = sans(None, &["*.example.com"]);
        denied(local(&p, &w, None), "wildcard DNS name *.example.com");
        let p2 = Policy {
            allow_wildcard_dns: true,
            ..Policy::default()
        };
        assert!(local(&p2, &w, None).is_ok());
    }

    #[test]
    fn local_operator_binds_templates_from_the_requested_id() {
        let p = Policy {
            allowed_spiffe_ids: vec!["spiffe://{td}/ns/{ns}/sa/{sa}".into()],
            allowed_dns: vec!["{sa}.{ns}.svc".into(), "**.mesh.example".into()],
            ..Policy::default()
        };
        let ok = sans(
            Some("spiffe://cluster.local/ns/app/sa/blue"),
            &["blue.app.svc", "x.y.mesh.example"],
        );
        assert!(local(&p, &ok, None).is_ok());
        let bad = sans(
            Some("spiffe://cluster.local/ns/app/sa/blue"),
            &["green.app.svc"],
        );
        denied(local(&p, &bad, None), "green.app.svc");
        denied(
            local(&p, &sans(None, &["mesh.example"]), None),
            "mesh.example",
        );
        denied(
            local(&p, &sans(None, &["blue.app.svc"]), None),
            "DNS name blue.app.svc matches no allowed pattern",
        );
    }

    /// The defect of issue 8: `{ns}`/`{sa}` were bound from the request's own SPIFFE ID, so a
    /// templated rule admitted any Kubernetes-shaped ID for any requester.
    #[test]
    fn kube_requesters_bind_templates_never_the_request() {
        let p = Policy {
            allowed_spiffe_ids: vec!["spiffe://{td}/ns/{ns}/sa/{sa}".into()],
            ..Policy::default()
        };
        let blue = Requester::kube("system:serviceaccount:app:blue");
        let own = sans(Some("spiffe://cluster.local/ns/app/sa/blue"), &[]);
        assert!(ask(&p, FrontEnd::CsrSigner, &blue, &own, None).is_ok());
        for other in [
            "spiffe://cluster.local/ns/app/sa/green",
            "spiffe://cluster.local/ns/prod/sa/blue",
            "spiffe://cluster.local/ns/app/sa/Blue",
        ] {
            denied(
                ask(
                    &p,
                    FrontEnd::CsrSigner,
                    &blue,
                    &sans(Some(other), &[]),
                    None,
                ),
                other,
            );
        }
        // A person binds nothing: the templated rule does not match.
        let alice = Requester::kube("alice@example.com");
        let d = denied(
            ask(&p, FrontEnd::CsrSigner, &alice, &own, None),
            "spiffe://cluster.local/ns/app/sa/blue",
        );
        assert!(d.reason.contains("not a service account"), "{}", d.reason);
        // ... and the auto-approver leaves it for a person.
        let aa = Policy {
            auto_approve: true,
            ..p.clone()
        };
        assert!(
            ask(&aa, FrontEnd::AutoApprover, &alice, &own, None)
                .unwrap_err()
                .manual
        );
    }

    #[test]
    fn registration_authorities_bind_the_requested_id_in_the_trust_domain() {
        let istiod = "system:serviceaccount:istio-system:istiod";
        let p = Policy {
            registration_authorities: vec![istiod.into()],
            ..Policy::default()
        };
        let ra = Requester::kube(istiod);
        let blue = sans(
            Some("spiffe://cluster.local/ns/app/sa/blue"),
            &["blue.app.svc"],
        );
        assert!(ask(&p, FrontEnd::CsrSigner, &ra, &blue, None).is_ok());
        denied(
            ask(
                &p,
                FrontEnd::CsrSigner,
                &ra,
                &sans(Some("spiffe://evil.org/ns/app/sa/blue"), &[]),
                None,
            ),
            "spiffe://evil.org/ns/app/sa/blue",
        );
        denied(
            ask(
                &p,
                FrontEnd::CsrSigner,
                &ra,
                &sans(
                    Some("spiffe://cluster.local/ns/app/sa/blue"),
                    &["green.app.svc"],
                ),
                None,
            ),
            "green.app.svc",
        );
        // The same account, not listed, is an ordinary service account.
        denied(
            ask(&Policy::default(), FrontEnd::CsrSigner, &ra, &blue, None),
            "does not belong to requester",
        );
    }

    #[test]
    fn managed_secrets_get_only_identities_of_their_namespace() {
        let p = Policy {
            managed_namespaces: vec!["app".into()],
            ..Policy::default()
        };
        let app = Requester::SecretNamespace("app".into());
        let ok = sans(
            Some("spiffe://cluster.local/ns/app/sa/web"),
            &["web.app.svc"],
        );
        assert!(ask(&p, FrontEnd::ManagedSecret, &app, &ok, None).is_ok());
        denied(
            ask(
                &p,
                FrontEnd::ManagedSecret,
                &app,
                &sans(Some("spiffe://cluster.local/ns/prod/sa/web"), &[]),
                None,
            ),
            "spiffe://cluster.local/ns/prod/sa/web",
        );
        denied(
            ask(
                &p,
                FrontEnd::ManagedSecret,
                &app,
                &sans(
                    Some("spiffe://cluster.local/ns/app/sa/web"),
                    &["db.app.svc"],
                ),
                None,
            ),
            "db.app.svc",
        );
        let prod = Requester::SecretNamespace("prod".into());
        let d = denied(
            ask(
                &p,
                FrontEnd::ManagedSecret,
                &prod,
                &sans(Some("spiffe://cluster.local/ns/prod/sa/web"), &[]),
                None,
            ),
            "\"prod\"",
        );
        assert!(d.reason.contains("managed_namespaces"), "{}", d.reason);
        // Default: no namespace is served.
        denied(
            ask(&Policy::default(), FrontEnd::ManagedSecret, &app, &ok, None),
            "managed_namespaces",
        );
    }

    #[test]
    fn auto_approval_is_opt_in_and_static_dns_needs_its_own_key() {
        let gateway = Policy {
            allowed_dns: vec!["**.example.com".into()],
            ..Policy::default()
        };
        let sa = Requester::kube("system:serviceaccount:app:blue");
        let t = sans(None, &["tenanta.example.com"]);
        let d = denied(
            ask(&gateway, FrontEnd::AutoApprover, &sa, &t, None),
            "does not auto-approve",
        );
        assert!(d.manual);
        let on = Policy {
            auto_approve: true,
            ..gateway.clone()
        };
        let d = denied(
            ask(&on, FrontEnd::AutoApprover, &sa, &t, None),
            "tenanta.example.com",
        );
        assert!(d.reason.contains("auto_approve_static_dns"), "{}", d.reason);
        let static_ok = Policy {
            auto_approve_static_dns: true,
            ..on.clone()
        };
        assert!(ask(&static_ok, FrontEnd::AutoApprover, &sa, &t, None).is_ok());
        // Own service name under the default templated rules: approved; IP SANs never.
        let mesh = Policy {
            auto_approve: true,
            ..Policy::default()
        };
        let own = sans(
            Some("spiffe://cluster.local/ns/app/sa/blue"),
            &["blue.app.svc"],
        );
        assert!(ask(&mesh, FrontEnd::AutoApprover, &sa, &own, None).is_ok());
        let mut ip = own.clone();
        ip.ips.push("10.1.2.3".parse().unwrap());
        denied(
            ask(&mesh, FrontEnd::AutoApprover, &sa, &ip, None),
            "IP SAN 10.1.2.3 is never auto-approved",
        );
        // TTLs: under the API minimum and over the policy.
        denied(
            ask(
                &mesh,
                FrontEnd::AutoApprover,
                &sa,
                &own,
                Some(Duration::from_secs(599)),
            ),
            "599 is below the minimum of 600",
        );
        assert!(ask(
            &mesh,
            FrontEnd::AutoApprover,
            &sa,
            &own,
            Some(Duration::from_secs(600))
        )
        .is_ok());
    }

    #[test]
    fn a_pods_service_account_gets_only_its_own_id_and_key_refusals_say_so() {
        let web = Requester::PodServiceAccount {
            namespace: "app".into(),
            name: "web".into(),
        };
        let own = sans(Some("spiffe://cluster.local/ns/app/sa/web"), &[]);
        let p = Policy {
            pod_certificates: true,
            pod_certificate_namespaces: vec!["app".into()],
            ..Policy::default()
        };
        assert!(ask(&p, FrontEnd::PodCertificate, &web, &own, None).is_ok());
        for other in [
            "spiffe://cluster.local/ns/app/sa/db",
            "spiffe://cluster.local/ns/prod/sa/web",
        ] {
            let d = denied(
                ask(
                    &p,
                    FrontEnd::PodCertificate,
                    &web,
                    &sans(Some(other), &[]),
                    None,
                ),
                other,
            );
            assert!(
                d.reason.contains("a pod of service account app/web"),
                "{}",
                d.reason
            );
            assert!(!d.key_type);
        }
        // The in-cluster DNS default binds to the account too.
        assert!(ask(
            &p,
            FrontEnd::PodCertificate,
            &web,
            &sans(None, &["web.app.svc"]),
            None
        )
        .is_ok());
        denied(
            ask(
                &p,
                FrontEnd::PodCertificate,
                &web,
                &sans(None, &["db.app.svc"]),
                None,
            ),
            "db.app.svc",
        );
        // Only this front end takes this requester, and it takes no other.
        denied(
            ask(&p, FrontEnd::CsrSigner, &web, &own, None),
            "cannot ask through the csr-signer front end",
        );
        denied(
            ask(
                &p,
                FrontEnd::PodCertificate,
                &Requester::kube("system:serviceaccount:app:web"),
                &own,
                None,
            ),
            "cannot ask through the pod-certificate front end",
        );
        let empty = Requester::PodServiceAccount {
            namespace: "app".into(),
            name: String::new(),
        };
        denied(
            ask(&p, FrontEnd::PodCertificate, &empty, &own, None),
            "incomplete",
        );
        // Key refusals carry key_type (the signer reports UnsupportedKeyType); others do not.
        let req = |key, pol: &Policy| {
            pol.decide(
                "c",
                &td(),
                &PolicyRequest {
                    via: FrontEnd::PodCertificate,
                    requester: &web,
                    sans: &own,
                    ttl: None,
                    key,
                    wants_ca: false,
                    usages: NO_USAGES,
                },
            )
        };
        let d = denied(req(PublicKeyKind::Ecdsa { bits: 521 }, &p), "ecdsa-p521");
        assert!(d.key_type);
        let only384 = Policy {
            allowed_key_algorithms: vec![KeyAlgorithm::EcdsaP384],
            ..p.clone()
        };
        assert!(denied(req(PublicKeyKind::Ed25519, &only384), "ed25519").key_type);
        assert!(req(PublicKeyKind::Ecdsa { bits: 384 }, &only384).is_ok());
        assert_eq!(
            "pod-certificate".parse::<FrontEnd>().unwrap(),
            FrontEnd::PodCertificate
        );
    }

    /// Issue 17: every served CA signed a PodCertificateRequest for any pod in any namespace.
    #[test]
    fn pod_certificates_are_opt_in_per_ca_and_namespace() {
        let web = Requester::PodServiceAccount {
            namespace: "app".into(),
            name: "web".into(),
        };
        let own = sans(Some("spiffe://cluster.local/ns/app/sa/web"), &[]);
        let d = denied(
            ask(
                &Policy::default(),
                FrontEnd::PodCertificate,
                &web,
                &own,
                None,
            ),
            "CA c",
        );
        assert!(d.reason.contains("pod_certificates"), "{}", d.reason);
        assert!(d.reason.contains("\"app\""), "{}", d.reason);
        // A namespace list alone is not the opt-in.
        let listed = Policy {
            pod_certificate_namespaces: vec!["app".into()],
            ..Policy::default()
        };
        denied(
            ask(&listed, FrontEnd::PodCertificate, &web, &own, None),
            "pod_certificates = true",
        );
        // Opted in, but not for this namespace.
        let other = Policy {
            pod_certificates: true,
            pod_certificate_namespaces: vec!["prod".into()],
            ..Policy::default()
        };
        let d = denied(
            ask(&other, FrontEnd::PodCertificate, &web, &own, None),
            "namespace \"app\"",
        );
        assert!(d.reason.contains("CA c"), "{}", d.reason);
        assert!(
            d.reason.contains("pod_certificate_namespaces"),
            "{}",
            d.reason
        );
        // Opted in for it: allowed. Other front ends ignore the pod-certificate keys.
        let on = Policy {
            pod_certificates: true,
            pod_certificate_namespaces: vec!["app".into()],
            ..Policy::default()
        };
        assert!(ask(&on, FrontEnd::PodCertificate, &web, &own, None).is_ok());
        let csr = Requester::kube("system:serviceaccount:app:web");
        assert!(ask(&Policy::default(), FrontEnd::CsrSigner, &csr, &own, None).is_ok());
        // Namespaces are checked when the policy loads.
        let bad = Policy {
            pod_certificate_namespaces: vec!["App".into()],
            ..on.clone()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("\"App\""));
    }

    /// Issue 17: `allow_ip_sans` defaulted to true, so any in-cluster requester got any IP.
    #[test]
    fn in_cluster_ip_sans_need_allowed_ranges() {
        let blue = Requester::kube("system:serviceaccount:app:blue");
        let mut s = sans(Some("spiffe://cluster.local/ns/app/sa/blue"), &[]);
        s.ips.push("10.1.2.3".parse().unwrap());
        let d = denied(
            ask(&Policy::default(), FrontEnd::CsrSigner, &blue, &s, None),
            "IP SAN 10.1.2.3",
        );
        assert!(d.reason.contains("allowed_ip_ranges"), "{}", d.reason);
        // The local operator keeps `allow_ip_sans`.
        assert!(local(&Policy::default(), &s, None).is_ok());
        // Listed ranges: inside allowed through every in-cluster front end but the
        // auto-approver; outside denied naming the IP, for the local operator too.
        let ranged = Policy {
            allowed_ip_ranges: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
            managed_namespaces: vec!["app".into()],
            pod_certificates: true,
            pod_certificate_namespaces: vec!["app".into()],
            ..Policy::default()
        };
        let pod = Requester::PodServiceAccount {
            namespace: "app".into(),
            name: "blue".into(),
        };
        let ns = Requester::SecretNamespace("app".into());
        for (via, who) in [
            (FrontEnd::CsrSigner, &blue),
            (FrontEnd::ManagedSecret, &ns),
            (FrontEnd::PodCertificate, &pod),
        ] {
            assert!(ask(&ranged, via, who, &s, None).is_ok(), "{via:?}");
            let mut out = s.clone();
            out.ips.push("192.168.1.1".parse().unwrap());
            let d = denied(ask(&ranged, via, who, &out, None), "IP SAN 192.168.1.1");
            assert!(d.reason.contains("10.0.0.0/8, fd00::/8"), "{}", d.reason);
        }
        let mut out = s.clone();
        out.ips = vec!["fe80::1".parse().unwrap()];
        denied(
            local(&ranged, &out, None),
            "IP SAN fe80::1 is outside CA c's",
        );
        let aa = Policy {
            auto_approve: true,
            ..ranged.clone()
        };
        denied(
            ask(&aa, FrontEnd::AutoApprover, &blue, &s, None),
            "IP SAN 10.1.2.3 is never auto-approved",
        );
        // allow_ip_sans = false still wins.
        let off = Policy {
            allow_ip_sans: false,
            ..ranged
        };
        denied(
            ask(&off, FrontEnd::CsrSigner, &blue, &s, None),
            "IP SAN 10.1.2.3 is not allowed",
        );
        // A range that is not a CIDR fails to load, naming it.
        let e = toml::from_str::<Policy>("allowed_ip_ranges = [\"10.0.0.0/33\"]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("allowed_ip_ranges"), "{e}");
    }

    #[test]
    fn front_end_and_requester_must_agree() {
        let s = sans(Some("spiffe://cluster.local/ns/app/sa/web"), &[]);
        denied(
            ask(
                &Policy::default(),
                FrontEnd::ManagedSecret,
                &Requester::LocalOperator,
                &s,
                None,
            ),
            "cannot ask through the managed-secret front end",
        );
        denied(
            ask(
                &Policy::default(),
                FrontEnd::Local,
                &Requester::kube("system:serviceaccount:a:b"),
                &s,
                None,
            ),
            "cannot ask through the local front end",
        );
    }

    #[test]
    fn usages_are_granted_within_the_profile() {
        let p = Policy::default();
        let s = sans(None, &["a.example.com"]);
        let mk = |u: &'static [&'static str]| Usages {
            csr: None,
            kube: Some(u.iter().map(|s| s.to_string()).collect()),
        };
        let client = mk(&["digital signature", "client auth"]);
        let r = PolicyRequest {
            via: FrontEnd::Local,
            requester: &Requester::LocalOperator,
            sans: &s,
            ttl: None,
            key: PublicKeyKind::Ecdsa { bits: 256 },
            wants_ca: false,
            usages: &client,
        };
        assert_eq!(
            p.decide("c", &td(), &r).unwrap().ekus.names(),
            ["client auth"]
        );
        let code = mk(&["code signing"]);
        denied(
            p.decide(
                "c",
                &td(),
                &PolicyRequest {
                    usages: &code,
                    ..r.clone()
                },
            ),
            "\"code signing\"",
        );
    }

    #[test]
    fn unknown_placeholders_fail_to_load_naming_them() {
        let p = Policy {
            allowed_spiffe_ids: vec!["spiffe://{td}/ns/{namespace}/sa/{sa}".into()],
            ..Policy::default()
        };
        let e = p.validate().unwrap_err().to_string();
        assert!(e.contains("{namespace}"), "{e}");
        // A stored policy that slipped through is a denial naming it, not a match.
        denied(
            local(
                &p,
                &sans(Some("spiffe://cluster.local/ns/a/sa/b"), &[]),
                None,
            ),
            "{namespace}",
        );
        let p = Policy {
            allowed_dns: vec!["{service}.svc".into()],
            ..Policy::default()
        };
        assert!(p.validate().unwrap_err().to_string().contains("{service}"));
    }

    #[test]
    fn policy_round_trips_through_toml() {
        let p = Policy {
            max_ttl: Duration::from_secs(3600),
            allowed_dns: vec!["*.svc".into()],
            registration_authorities: vec!["system:serviceaccount:istio-system:istiod".into()],
            managed_namespaces: vec!["mtls".into()],
            auto_approve: true,
            ..Policy::default()
        };
        let s = toml::to_string(&p).unwrap();
        assert!(s.contains("max_ttl = \"1h\""), "{s}");
        assert!(s.contains("auto_approve = true"), "{s}");
        let back: Policy = toml::from_str(&s).unwrap();
        assert_eq!(back, p);
        assert!(toml::from_str::<Policy>("bogus = 1").is_err());
        // Stored policies from before these keys load with the safe defaults.
        let old: Policy = toml::from_str("allowed_dns = [\"*.svc\"]").unwrap();
        assert!(!old.auto_approve && old.managed_namespaces.is_empty());
    }
}
