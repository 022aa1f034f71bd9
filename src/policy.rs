//! Issuance policy: pure checks of a request against a CA's rules.
//!
//! The same [`Policy::check`] runs for `meshca issue`, for CSRs signed in the cluster, for SDS
//! renewals and before any ACM PCA call, so a decision never depends on the front end.
//!
//! Patterns:
//! - SPIFFE IDs match path segment by segment: `*` matches one segment, a final `**` matches
//!   one or more, and `{ns}`, `{sa}`, `{td}` match the namespace, service account and trust
//!   domain of the workload (the requester's, when a Kubernetes requester is known).
//! - DNS names match label by label: `*` matches one label, a leading `**` one or more labels,
//!   and `{ns}`, `{sa}` as above. `{sa}.{ns}.svc` allows exactly a workload's own service name.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::identity::{Sans, SpiffeId, TrustDomain};
use crate::key::{KeyAlgorithm, PublicKeyKind, MIN_RSA_BITS};

/// Default TTL of a workload certificate when none is asked for.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default maximum TTL of a workload certificate.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(90 * 24 * 3600);

/// What a CA may sign.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// SPIFFE ID patterns. Empty: any ID in the CA's trust domain.
    pub allowed_spiffe_ids: Vec<String>,
    /// DNS name patterns. Empty: any DNS name.
    pub allowed_dns: Vec<String>,
    /// Whether wildcard DNS SANs (`*.example.com`) may be issued at all.
    pub allow_wildcard_dns: bool,
    /// Whether IP SANs may be issued.
    pub allow_ip_sans: bool,
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
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            allowed_spiffe_ids: Vec::new(),
            allowed_dns: Vec::new(),
            allow_wildcard_dns: false,
            allow_ip_sans: true,
            require_spiffe_id: false,
            max_ttl: DEFAULT_MAX_TTL,
            default_ttl: DEFAULT_TTL,
            allowed_key_algorithms: Vec::new(),
        }
    }
}

/// A Kubernetes service account that asked for a certificate (CSR `spec.username`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requester {
    /// Namespace of the service account.
    pub namespace: String,
    /// Name of the service account.
    pub service_account: String,
}

impl Requester {
    /// Parses `system:serviceaccount:<ns>:<sa>`; other usernames give `None`.
    pub fn from_username(username: &str) -> Option<Requester> {
        let rest = username.strip_prefix("system:serviceaccount:")?;
        let (ns, sa) = rest.split_once(':')?;
        if ns.is_empty() || sa.is_empty() || sa.contains(':') {
            return None;
        }
        Some(Requester {
            namespace: ns.to_string(),
            service_account: sa.to_string(),
        })
    }
}

/// Everything a policy decision looks at.
#[derive(Clone, Debug)]
pub struct PolicyRequest<'a> {
    /// The SANs to be issued.
    pub sans: &'a Sans,
    /// The requested lifetime (`None`: the policy default).
    pub ttl: Option<Duration>,
    /// The subject public key's kind.
    pub key: PublicKeyKind,
    /// Whether the request asked for `CA:TRUE`.
    pub wants_ca: bool,
    /// The Kubernetes requester, when the decision is an auto-approval.
    pub requester: Option<&'a Requester>,
}

impl Policy {
    /// Checks a request. On success returns the TTL to issue with.
    pub fn check(
        &self,
        ca: &str,
        trust_domain: &TrustDomain,
        req: &PolicyRequest<'_>,
    ) -> Result<Duration> {
        let deny = |reason: String| Error::PolicyDenied {
            ca: ca.to_string(),
            reason,
        };
        if req.wants_ca {
            return Err(deny(
                "the request asks for CA:TRUE; meshca issues only end-entity certificates".into(),
            ));
        }
        match req.key {
            PublicKeyKind::Rsa { bits } if bits < MIN_RSA_BITS => {
                return Err(deny(format!(
                    "RSA key of {bits} bits is under the {MIN_RSA_BITS}-bit minimum"
                )))
            }
            PublicKeyKind::Other => return Err(deny("unsupported public key type".into())),
            _ => {}
        }
        if !self.allowed_key_algorithms.is_empty() {
            let ok = req
                .key
                .algorithm()
                .is_some_and(|a| self.allowed_key_algorithms.contains(&a));
            if !ok {
                return Err(deny(format!(
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
        let ttl = req.ttl.unwrap_or(self.default_ttl.min(self.max_ttl));
        if ttl.is_zero() {
            return Err(deny("TTL must be positive".into()));
        }
        if ttl > self.max_ttl {
            return Err(deny(format!(
                "TTL {} is over the maximum {}",
                humantime::format_duration(ttl),
                humantime::format_duration(self.max_ttl)
            )));
        }
        if req.sans.is_empty() {
            return Err(deny(
                "the request has no SAN (give a SPIFFE ID, DNS name or IP)".into(),
            ));
        }
        if self.require_spiffe_id && req.sans.spiffe_id.is_none() {
            return Err(deny("this CA requires a SPIFFE ID".into()));
        }

        // Bindings for {ns}/{sa}/{td}: the requester's when known, else the request's own ID.
        let own = req.sans.spiffe_id.as_ref().and_then(|id| id.k8s_workload());
        let (ns, sa) = match (req.requester, own) {
            (Some(r), _) => (Some(r.namespace.as_str()), Some(r.service_account.as_str())),
            (None, Some((ns, sa))) => (Some(ns), Some(sa)),
            (None, None) => (None, None),
        };
        let vars = Vars {
            ns,
            sa,
            td: trust_domain.as_str(),
        };

        if let Some(id) = &req.sans.spiffe_id {
            if id.trust_domain() != trust_domain {
                return Err(deny(format!(
                    "SPIFFE ID {id} is outside the CA's trust domain {trust_domain}"
                )));
            }
            if let Some(r) = req.requester {
                let expected =
                    SpiffeId::for_service_account(trust_domain, &r.namespace, &r.service_account)?;
                if *id != expected {
                    return Err(deny(format!(
                        "SPIFFE ID {id} does not belong to requester system:serviceaccount:{}:{} (expected {expected})",
                        r.namespace, r.service_account
                    )));
                }
            }
            if !self.allowed_spiffe_ids.is_empty()
                && !self
                    .allowed_spiffe_ids
                    .iter()
                    .any(|p| spiffe_matches(p, id, &vars))
            {
                return Err(deny(format!("SPIFFE ID {id} matches no allowed pattern")));
            }
        }
        for d in &req.sans.dns {
            if d.is_wildcard() && !self.allow_wildcard_dns {
                return Err(deny(format!("wildcard DNS name {d} is not allowed")));
            }
            if !self.allowed_dns.is_empty()
                && !self
                    .allowed_dns
                    .iter()
                    .any(|p| dns_matches(p, d.as_str(), &vars))
            {
                return Err(deny(format!("DNS name {d} matches no allowed pattern")));
            }
        }
        if let Some(ip) = req.sans.ips.first() {
            if !self.allow_ip_sans {
                return Err(deny(format!("IP SAN {ip} is not allowed")));
            }
        }
        Ok(ttl)
    }

    /// Checks that the policy itself is sensible (patterns parse, TTLs ordered).
    pub fn validate(&self) -> Result<()> {
        if self.max_ttl.is_zero() {
            return Err(Error::invalid("policy", "max_ttl must be positive"));
        }
        for p in &self.allowed_spiffe_ids {
            if !p.starts_with("spiffe://") {
                return Err(Error::invalid(
                    "policy",
                    format!("SPIFFE pattern {p:?} must start with spiffe://"),
                ));
            }
        }
        for p in &self.allowed_dns {
            if p.is_empty() || p.contains(char::is_whitespace) {
                return Err(Error::invalid(
                    "policy",
                    format!("DNS pattern {p:?} is empty or has spaces"),
                ));
            }
        }
        Ok(())
    }
}

struct Vars<'a> {
    ns: Option<&'a str>,
    sa: Option<&'a str>,
    td: &'a str,
}

impl Vars<'_> {
    fn bind(&self, pat: &str, val: &str) -> bool {
        match pat {
            "*" => true,
            "{ns}" => self.ns == Some(val),
            "{sa}" => self.sa == Some(val),
            "{td}" => self.td == val,
            lit => lit.eq_ignore_ascii_case(val),
        }
    }
}

fn spiffe_matches(pattern: &str, id: &SpiffeId, vars: &Vars<'_>) -> bool {
    let Some(rest) = pattern.strip_prefix("spiffe://") else {
        return false;
    };
    let id_s = id.to_string();
    let id_rest = &id_s["spiffe://".len()..];
    let p: Vec<&str> = rest.split('/').collect();
    let v: Vec<&str> = id_rest.split('/').collect();
    segs_match(&p, &v, vars)
}

fn segs_match(p: &[&str], v: &[&str], vars: &Vars<'_>) -> bool {
    match (p.split_first(), v.split_first()) {
        (Some((&"**", [])), Some(_)) => true,
        (Some((ph, pt)), Some((vh, vt))) => vars.bind(ph, vh) && segs_match(pt, vt, vars),
        (None, None) => true,
        _ => false,
    }
}

fn dns_matches(pattern: &str, name: &str, vars: &Vars<'_>) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let v: Vec<&str> = name.split('.').collect();
    if p.first() == Some(&"**") {
        let tail = &p[1..];
        return v.len() > tail.len() && segs_match(tail, &v[v.len() - tail.len()..], vars);
    }
    segs_match(&p, &v, vars)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::DnsName;

    fn sans(id: Option<&str>, dns: &[&str]) -> Sans {
        Sans {
            spiffe_id: id.map(|s| SpiffeId::parse(s).unwrap()),
            dns: dns.iter().map(|d| DnsName::parse(d).unwrap()).collect(),
            ips: vec![],
        }
    }

    fn req<'a>(
        s: &'a Sans,
        ttl: Option<Duration>,
        requester: Option<&'a Requester>,
    ) -> PolicyRequest<'a> {
        PolicyRequest {
            sans: s,
            ttl,
            key: PublicKeyKind::Ecdsa { bits: 256 },
            wants_ca: false,
            requester,
        }
    }

    fn td() -> TrustDomain {
        TrustDomain::default()
    }

    #[test]
    fn default_policy_allows_own_trust_domain_and_caps_ttl() {
        let p = Policy::default();
        let s = sans(Some("spiffe://cluster.local/ns/a/sa/b"), &["b.a.svc"]);
        assert_eq!(
            p.check("ca1", &td(), &req(&s, None, None)).unwrap(),
            DEFAULT_TTL
        );
        let e = p
            .check("ca1", &td(), &req(&s, Some(DEFAULT_MAX_TTL * 2), None))
            .unwrap_err();
        assert!(e.to_string().contains("over the maximum"), "{e}");
        let other = sans(Some("spiffe://evil.org/ns/a/sa/b"), &[]);
        let e = p.check("ca1", &td(), &req(&other, None, None)).unwrap_err();
        assert!(
            e.to_string().contains("outside the CA's trust domain"),
            "{e}"
        );
        let empty = Sans::default();
        assert!(p.check("ca1", &td(), &req(&empty, None, None)).is_err());
    }

    #[test]
    fn ca_requests_weak_keys_and_wildcards_are_denied() {
        let p = Policy::default();
        let s = sans(None, &["a.example.com"]);
        let mut r = req(&s, None, None);
        r.wants_ca = true;
        assert!(p
            .check("c", &td(), &r)
            .unwrap_err()
            .to_string()
            .contains("CA:TRUE"));
        let mut r = req(&s, None, None);
        r.key = PublicKeyKind::Rsa { bits: 1024 };
        assert!(p
            .check("c", &td(), &r)
            .unwrap_err()
            .to_string()
            .contains("1024 bits"));
        let w = sans(None, &["*.example.com"]);
        assert!(p
            .check("c", &td(), &req(&w, None, None))
            .unwrap_err()
            .to_string()
            .contains("wildcard"));
        let p2 = Policy {
            allow_wildcard_dns: true,
            ..Policy::default()
        };
        assert!(p2.check("c", &td(), &req(&w, None, None)).is_ok());
    }

    #[test]
    fn patterns_and_templates() {
        let p = Policy {
            allowed_spiffe_ids: vec!["spiffe://{td}/ns/{ns}/sa/{sa}".into()],
            allowed_dns: vec![
                "{sa}.{ns}.svc".into(),
                "{sa}.{ns}.svc.cluster.local".into(),
                "**.mesh.example".into(),
            ],
            ..Policy::default()
        };
        let ok = sans(
            Some("spiffe://cluster.local/ns/app/sa/blue"),
            &["blue.app.svc", "x.y.mesh.example"],
        );
        assert!(p.check("c", &td(), &req(&ok, None, None)).is_ok());
        let bad = sans(
            Some("spiffe://cluster.local/ns/app/sa/blue"),
            &["green.app.svc"],
        );
        let e = p
            .check("c", &td(), &req(&bad, None, None))
            .unwrap_err()
            .to_string();
        assert!(e.contains("green.app.svc"), "{e}");
        let bare = sans(None, &["mesh.example"]);
        assert!(
            p.check("c", &td(), &req(&bare, None, None)).is_err(),
            "** needs at least one label"
        );
        let no_id = sans(None, &["blue.app.svc"]);
        assert!(
            p.check("c", &td(), &req(&no_id, None, None)).is_err(),
            "templates need a bound identity"
        );
    }

    #[test]
    fn requester_may_only_get_its_own_identity() {
        let p = Policy::default();
        let r = Requester::from_username("system:serviceaccount:app:blue").unwrap();
        let own = sans(Some("spiffe://cluster.local/ns/app/sa/blue"), &[]);
        assert!(p.check("c", &td(), &req(&own, None, Some(&r))).is_ok());
        let other = sans(Some("spiffe://cluster.local/ns/app/sa/green"), &[]);
        let e = p
            .check("c", &td(), &req(&other, None, Some(&r)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not belong to requester"), "{e}");
        assert!(Requester::from_username("alice").is_none());
        assert!(Requester::from_username("system:serviceaccount:ns").is_none());
    }

    #[test]
    fn spiffe_globs() {
        let v = Vars {
            ns: None,
            sa: None,
            td: "cluster.local",
        };
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        assert!(spiffe_matches("spiffe://cluster.local/ns/*/sa/*", &id, &v));
        assert!(spiffe_matches("spiffe://cluster.local/**", &id, &v));
        assert!(spiffe_matches("spiffe://cluster.local/ns/a/**", &id, &v));
        assert!(!spiffe_matches("spiffe://cluster.local/ns/*", &id, &v));
        assert!(!spiffe_matches("spiffe://other/ns/*/sa/*", &id, &v));
    }

    #[test]
    fn policy_round_trips_through_toml() {
        let p = Policy {
            max_ttl: Duration::from_secs(3600),
            allowed_dns: vec!["*.svc".into()],
            ..Policy::default()
        };
        let s = toml::to_string(&p).unwrap();
        assert!(s.contains("max_ttl = \"1h\""), "{s}");
        let back: Policy = toml::from_str(&s).unwrap();
        assert_eq!(back, p);
        assert!(toml::from_str::<Policy>("bogus = 1").is_err());
    }
}
