//! Istio's CA API (`istio.v1.auth.IstioCertificateService`), the pure parts: who the caller
//! is, which requester the one policy decision sees, and a short cache of token reviews.
//!
//! The gRPC service lives in `meshca-sds` (`istio_ca`), the TokenReview and pod lookups in
//! `meshca::kube::istio_auth`. This module does no I/O.
//!
//! **Callers.** istio-agent and ztunnel authenticate with a projected ServiceAccount token
//! (audience `istio-ca` by default) in the `authorization: Bearer <token>` metadata, which the
//! API server reviews ([`TokenAuthenticator`]); or, for renewal, with their current meshca
//! certificate over mutual TLS. Either way the caller is a ServiceAccount ([`Caller`]).
//!
//! **Requesters.** A caller asking for its own identity is [`Requester::IstioAccount`]. A
//! caller whose request metadata carries `ImpersonatedIdentity` (ztunnel in ambient mode) is
//! [`Requester::IstioImpersonation`]: the CA's policy must list it in `istio_node_agents`, and
//! the impersonated account must have a pod on the caller's node, which the server looks up
//! ([`PodDirectory`]) before asking the decision.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::identity::SpiffeId;
use crate::policy::Requester;

/// The token audience istio-agent and ztunnel request by default.
pub const DEFAULT_AUDIENCE: &str = "istio-ca";
/// The request metadata key ztunnel puts the workload's SPIFFE ID under.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// The request metadata key istio-agent puts `ISTIO_META_CERT_SIGNER` under.
pub const CERT_SIGNER: &str = "CertSigner";
/// The cluster ID istio-agent sends by default (`ClusterID` gRPC metadata).
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";
/// How long a successful token review is reused by default.
pub const DEFAULT_TOKEN_CACHE_TTL: Duration = Duration::from_secs(10);
/// Most token reviews cached at once.
pub const TOKEN_CACHE_ENTRIES: usize = 4096;

/// An authenticated ServiceAccount, and where its token says it runs.
#[derive(Clone, PartialEq, Eq)]
pub struct Caller {
    /// The namespace.
    pub namespace: String,
    /// The service account's name.
    pub name: String,
    /// The node of the pod the token is bound to (TokenReview's
    /// `authentication.kubernetes.io/node-name` extra), when it names one.
    pub node: Option<String>,
    /// The pod the token is bound to (`authentication.kubernetes.io/pod-name`).
    pub pod: Option<String>,
}

impl fmt::Debug for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if let Some(p) = &self.pod {
            write!(f, " pod={p}")?;
        }
        if let Some(n) = &self.node {
            write!(f, " node={n}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// TokenReview's extra key naming the bound pod's node.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// TokenReview's extra key naming the bound pod.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";

impl Caller {
    /// The caller a TokenReview authenticated as `username` with `extra`: `Err` names why
    /// it is not a ServiceAccount.
    pub fn from_review(
        username: &str,
        extra: &HashMap<String, Vec<String>>,
    ) -> Result<Caller, String> {
        let req = Requester::kube(username);
        let Some((ns, sa)) = req.service_account() else {
            return Err(format!(
                "the token authenticates {username:?}, not a service account"
            ));
        };
        let one = |k: &str| {
            extra
                .get(k)
                .and_then(|v| v.first())
                .filter(|s| !s.is_empty())
                .cloned()
        };
        Ok(Caller {
            namespace: ns.to_string(),
            name: sa.to_string(),
            node: one(NODE_NAME_EXTRA),
            pod: one(POD_NAME_EXTRA),
        })
    }

    /// The caller a client certificate's SPIFFE ID names (`spiffe://<td>/ns/<ns>/sa/<sa>`);
    /// `None` when the ID is not a Kubernetes workload's.
    pub fn from_spiffe_id(id: &SpiffeId) -> Option<Caller> {
        let (ns, sa) = id.k8s_workload()?;
        Some(Caller {
            namespace: ns.to_string(),
            name: sa.to_string(),
            node: None,
            pod: None,
        })
    }

    /// The requester the policy decision sees when this caller asks for its own identity.
    pub fn requester(&self) -> Requester {
        Requester::IstioAccount {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// The requester when this caller asks for `target`'s identity (`ImpersonatedIdentity`);
    /// `pod_on_node` is a pod of `target` the server found on the caller's node. `Err` when
    /// `target` is not a Kubernetes workload's SPIFFE ID.
    pub fn impersonating(
        &self,
        target: &SpiffeId,
        pod_on_node: Option<String>,
    ) -> Result<Requester, String> {
        let (ns, sa) = target.k8s_workload().ok_or_else(|| {
            format!(
                "{IMPERSONATED_IDENTITY} {target} is not spiffe://<trust domain>/ns/<ns>/sa/<sa>"
            )
        })?;
        Ok(Requester::IstioImpersonation {
            agent_namespace: self.namespace.clone(),
            agent_name: self.name.clone(),
            node: self.node.clone(),
            namespace: ns.to_string(),
            name: sa.to_string(),
            pod_on_node,
        })
    }

    /// `ns/sa`, as `istio_node_agents` lists node agents.
    pub fn account(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Why a token was not accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthError {
    /// The API server did not authenticate it (expired, wrong audience, bound object gone, not
    /// a ServiceAccount): the client's fault.
    Rejected(String),
    /// The review itself failed (API server unreachable, RBAC): not the client's fault.
    Unavailable(String),
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::Rejected(r) => write!(f, "token rejected: {r}"),
            AuthError::Unavailable(r) => write!(f, "token review unavailable: {r}"),
        }
    }
}

/// Reviews ServiceAccount tokens (the Kubernetes TokenReview API in production).
#[async_trait]
pub trait TokenAuthenticator: Send + Sync + fmt::Debug {
    /// Who `token` authenticates, for `audience`.
    async fn review(&self, token: &str, audience: &str) -> Result<Caller, AuthError>;
}

/// Finds pods (the Kubernetes API in production).
#[async_trait]
pub trait PodDirectory: Send + Sync + fmt::Debug {
    /// The name of a running (not finished, not deleted) pod in `namespace` that runs as
    /// service account `sa` on node `node`, if there is one.
    async fn pod_on_node(
        &self,
        namespace: &str,
        sa: &str,
        node: &str,
    ) -> Result<Option<String>, String>;
}

/// A token's SHA-256, the only form in which it is kept or logged.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    /// Hashes `token`.
    pub fn of(token: &str) -> TokenHash {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
        let mut h = [0u8; 32];
        h.copy_from_slice(d.as_ref());
        TokenHash(h)
    }
}

impl fmt::Debug for TokenHash {
    /// The first 8 bytes in hex: enough to correlate log lines, useless to an attacker.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// A short, bounded cache of successful token reviews, keyed by the token's hash (never the
/// token). Rejections are not cached: the next request is reviewed again.
#[derive(Debug)]
pub struct TokenCache {
    ttl: Duration,
    max: usize,
    entries: std::sync::Mutex<HashMap<(TokenHash, String), (Instant, Caller)>>,
}

impl TokenCache {
    /// A cache keeping each review `ttl` (zero: no caching), at most `max` entries.
    pub fn new(ttl: Duration, max: usize) -> TokenCache {
        TokenCache {
            ttl,
            max,
            entries: Default::default(),
        }
    }

    /// The cached caller for `token` and `audience` at `now`, if still fresh.
    pub fn get(&self, token: &TokenHash, audience: &str, now: Instant) -> Option<Caller> {
        let map = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&(*token, audience.to_string()))
            .filter(|(until, _)| now < *until)
            .map(|(_, c)| c.clone())
    }

    /// Remembers `caller` for `token` and `audience` from `now`. When full, expired entries
    /// go first, then (still full) everything: the cache is a shortcut, never a source of truth.
    pub fn put(&self, token: TokenHash, audience: &str, caller: Caller, now: Instant) {
        if self.ttl.is_zero() || self.max == 0 {
            return;
        }
        let mut map = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= self.max {
            map.retain(|_, (until, _)| now < *until);
            if map.len() >= self.max {
                map.clear();
            }
        }
        map.insert((token, audience.to_string()), (now + self.ttl, caller));
    }

    /// Entries held (expired ones included until the next eviction).
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The CA a request's `CertSigner` metadata selects among `served` (`meshca.io/<ca>` or
/// `<ca>`); `None` in the metadata selects `default`. `Err` names an unknown signer.
pub fn select_ca<'a>(
    cert_signer: Option<&str>,
    served: &'a [String],
    default: &'a str,
) -> Result<&'a str, String> {
    let Some(s) = cert_signer.filter(|s| !s.is_empty()) else {
        return Ok(default);
    };
    let name = s.strip_prefix("meshca.io/").unwrap_or(s);
    served
        .iter()
        .find(|c| c.as_str() == name)
        .map(String::as_str)
        .ok_or_else(|| {
            format!(
                "{CERT_SIGNER} {s:?} is not a CA this server serves ({})",
                served
                    .iter()
                    .map(|c| format!("meshca.io/{c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Sans, TrustDomain};
    use crate::policy::{FrontEnd, Policy, PolicyRequest, Usages};

    fn extra(node: Option<&str>) -> HashMap<String, Vec<String>> {
        let mut m = HashMap::new();
        m.insert(POD_NAME_EXTRA.to_string(), vec!["ztunnel-abc".to_string()]);
        if let Some(n) = node {
            m.insert(NODE_NAME_EXTRA.to_string(), vec![n.to_string()]);
        }
        m
    }

    #[test]
    fn caller_from_review() {
        let c = Caller::from_review(
            "system:serviceaccount:istio-system:ztunnel",
            &extra(Some("n1")),
        )
        .unwrap();
        assert_eq!(c.account(), "istio-system/ztunnel");
        assert_eq!(c.node.as_deref(), Some("n1"));
        assert_eq!(c.pod.as_deref(), Some("ztunnel-abc"));
        let e = Caller::from_review("alice", &HashMap::new()).unwrap_err();
        assert!(e.contains("\"alice\""), "{e}");
        let e = Caller::from_review("system:serviceaccount:ns", &HashMap::new()).unwrap_err();
        assert!(e.contains("not a service account"), "{e}");
    }

    fn decide(p: &Policy, who: &Requester, id: &str) -> Result<(), String> {
        let sans = Sans {
            spiffe_id: Some(SpiffeId::parse(id).unwrap()),
            dns: vec![],
            ips: vec![],
        };
        let usages = Usages {
            csr: None,
            kube: None,
        };
        p.decide(
            "ca1",
            &TrustDomain::default(),
            &PolicyRequest {
                via: FrontEnd::IstioCa,
                requester: who,
                sans: &sans,
                ttl: None,
                key: crate::key::PublicKeyKind::Ecdsa { bits: 256 },
                wants_ca: false,
                usages: &usages,
            },
        )
        .map(|_| ())
        .map_err(|d| d.reason)
    }

    const A: &str = "spiffe://cluster.local/ns/app/sa/a";
    const B: &str = "spiffe://cluster.local/ns/app/sa/b";

    #[test]
    fn an_account_gets_only_its_own_identity() {
        let p = Policy::default();
        let a = Caller::from_review("system:serviceaccount:app:a", &HashMap::new()).unwrap();
        decide(&p, &a.requester(), A).unwrap();
        let e = decide(&p, &a.requester(), B).unwrap_err();
        assert!(
            e.contains("sa/b") && e.contains("Istio client app/a"),
            "{e}"
        );
        // Another trust domain is refused too.
        let e = decide(&p, &a.requester(), "spiffe://other.td/ns/app/sa/a").unwrap_err();
        assert!(e.contains("trust domain"), "{e}");
        // The Istio requesters cannot ask through another front end, nor others through this one.
        let usages = Usages {
            csr: None,
            kube: None,
        };
        let sans = Sans {
            spiffe_id: Some(SpiffeId::parse(A).unwrap()),
            dns: vec![],
            ips: vec![],
        };
        let req = |via, who| PolicyRequest {
            via,
            requester: who,
            sans: &sans,
            ttl: None,
            key: crate::key::PublicKeyKind::Ecdsa { bits: 256 },
            wants_ca: false,
            usages: &usages,
        };
        let td = TrustDomain::default();
        let own = a.requester();
        assert!(p.decide("c", &td, &req(FrontEnd::CsrSigner, &own)).is_err());
        let kube = Requester::kube("system:serviceaccount:app:a");
        let e = p
            .decide("c", &td, &req(FrontEnd::IstioCa, &kube))
            .unwrap_err();
        assert!(e.reason.contains("istio-ca front end"), "{}", e.reason);
    }

    #[test]
    fn impersonation_needs_a_listed_agent_and_a_pod_on_its_node() {
        let mut p = Policy::default();
        let zt = Caller::from_review(
            "system:serviceaccount:istio-system:ztunnel",
            &extra(Some("n1")),
        )
        .unwrap();
        let target = SpiffeId::parse(B).unwrap();
        let with_pod = zt.impersonating(&target, Some("b-1".into())).unwrap();
        // Off by default: not listed.
        let e = decide(&p, &with_pod, B).unwrap_err();
        assert!(
            e.contains("istio-system/ztunnel")
                && e.contains("istio_node_agents")
                && e.contains("app/b"),
            "{e}"
        );
        p.istio_node_agents = vec!["istio-system/ztunnel".into()];
        decide(&p, &with_pod, B).unwrap();
        // No pod of b on n1.
        let e = decide(&p, &zt.impersonating(&target, None).unwrap(), B).unwrap_err();
        assert!(
            e.contains("no pod on node \"n1\"") && e.contains("app/b"),
            "{e}"
        );
        // A token bound to no node.
        let mut nodeless = zt.clone();
        nodeless.node = None;
        let e = decide(
            &p,
            &nodeless.impersonating(&target, Some("b-1".into())).unwrap(),
            B,
        )
        .unwrap_err();
        assert!(e.contains("not bound to a pod on a node"), "{e}");
        // Impersonating b, the certificate may still only carry b's identity.
        let e = decide(&p, &with_pod, A).unwrap_err();
        assert!(
            e.contains("sa/a") && e.contains("expected spiffe://cluster.local/ns/app/sa/b"),
            "{e}"
        );
        // Another listed name does not cover this agent.
        p.istio_node_agents = vec!["istio-system/other".into()];
        assert!(decide(&p, &with_pod, B).is_err());
        // Not a workload ID.
        let e = zt
            .impersonating(&SpiffeId::parse("spiffe://cluster.local/x").unwrap(), None)
            .unwrap_err();
        assert!(e.contains("ImpersonatedIdentity"), "{e}");
    }

    #[test]
    fn node_agents_are_validated() {
        for bad in ["ztunnel", "/z", "ns/", "a/b/c", "a b/c"] {
            let p = Policy {
                istio_node_agents: vec![bad.into()],
                ..Policy::default()
            };
            let e = p.validate().unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
        let p = Policy {
            istio_node_agents: vec!["istio-system/ztunnel".into()],
            ..Policy::default()
        };
        p.validate().unwrap();
    }

    #[test]
    fn token_cache_keys_by_hash_and_expires() {
        let c = TokenCache::new(Duration::from_secs(10), 2);
        let t0 = Instant::now();
        let who = Caller::from_review("system:serviceaccount:app:a", &HashMap::new()).unwrap();
        let h = TokenHash::of("secret-token");
        assert!(!format!("{h:?}").contains("secret"));
        assert_eq!(format!("{h:?}").len(), "sha256:".len() + 16);
        c.put(h, "istio-ca", who.clone(), t0);
        assert_eq!(c.get(&h, "istio-ca", t0), Some(who.clone()));
        // Another audience, another token, or later than the TTL: a miss.
        assert_eq!(c.get(&h, "other", t0), None);
        assert_eq!(c.get(&TokenHash::of("other"), "istio-ca", t0), None);
        assert_eq!(c.get(&h, "istio-ca", t0 + Duration::from_secs(10)), None);
        // Bounded.
        for i in 0..10 {
            c.put(TokenHash::of(&i.to_string()), "istio-ca", who.clone(), t0);
            assert!(c.len() <= 2);
        }
        let off = TokenCache::new(Duration::ZERO, 2);
        off.put(h, "istio-ca", who, t0);
        assert!(off.is_empty());
    }

    #[test]
    fn cert_signer_selects_a_served_ca() {
        let served = vec!["ca1".to_string(), "ca2".to_string()];
        assert_eq!(select_ca(None, &served, "ca1"), Ok("ca1"));
        assert_eq!(select_ca(Some(""), &served, "ca1"), Ok("ca1"));
        assert_eq!(select_ca(Some("meshca.io/ca2"), &served, "ca1"), Ok("ca2"));
        assert_eq!(select_ca(Some("ca2"), &served, "ca1"), Ok("ca2"));
        let e = select_ca(Some("meshca.io/ca3"), &served, "ca1").unwrap_err();
        assert!(
            e.contains("meshca.io/ca3") && e.contains("meshca.io/ca2"),
            "{e}"
        );
    }
}
