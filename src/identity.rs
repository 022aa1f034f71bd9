//! Workload identities, parsed once at the boundary.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The default SPIFFE trust domain, as used by Istio and most meshes.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// A SPIFFE trust domain name (lower-case letters, digits, `.`, `-`, `_`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a trust domain name.
    pub fn new(s: &str) -> Result<Self> {
        if s.is_empty() || s.len() > 255 {
            return Err(Error::invalid(
                "trust domain",
                format!("{s:?} must be 1 to 255 characters"),
            ));
        }
        if let Some(c) = s.chars().find(|c| {
            !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))
        }) {
            return Err(Error::invalid(
                "trust domain",
                format!("{s:?} contains {c:?}; only a-z, 0-9, '.', '-' and '_' are allowed"),
            ));
        }
        Ok(TrustDomain(s.to_string()))
    }

    /// The trust domain as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TrustDomain {
    fn default() -> Self {
        TrustDomain(DEFAULT_TRUST_DOMAIN.to_string())
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        TrustDomain::new(s)
    }
}

impl TryFrom<String> for TrustDomain {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        TrustDomain::new(&s)
    }
}

impl From<TrustDomain> for String {
    fn from(t: TrustDomain) -> String {
        t.0
    }
}

/// A SPIFFE ID: `spiffe://<trust-domain>/<path>`, validated per the SPIFFE ID spec.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    path: String,
}

impl SpiffeId {
    /// Parses `spiffe://td/path`.
    pub fn parse(s: &str) -> Result<Self> {
        const WHAT: &str = "SPIFFE ID";
        if s.len() > 2048 {
            return Err(Error::invalid(WHAT, "longer than 2048 bytes"));
        }
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| Error::invalid(WHAT, format!("{s:?} does not start with spiffe://")))?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let trust_domain =
            TrustDomain::new(td).map_err(|e| Error::invalid(WHAT, format!("{s:?}: {e}")))?;
        if path.is_empty() {
            return Err(Error::invalid(
                WHAT,
                format!("{s:?} has no path; workload IDs look like spiffe://{td}/ns/<ns>/sa/<sa>"),
            ));
        }
        for seg in path[1..].split('/') {
            if seg.is_empty() {
                return Err(Error::invalid(
                    WHAT,
                    format!("{s:?} has an empty path segment"),
                ));
            }
            if seg == "." || seg == ".." {
                return Err(Error::invalid(
                    WHAT,
                    format!("{s:?} has a '{seg}' path segment"),
                ));
            }
            if let Some(c) = seg
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
            {
                return Err(Error::invalid(
                    WHAT,
                    format!(
                        "{s:?} contains {c:?}; path segments allow a-z, A-Z, 0-9, '.', '-', '_'"
                    ),
                ));
            }
        }
        Ok(SpiffeId {
            trust_domain,
            path: path.to_string(),
        })
    }

    /// The Kubernetes workload identity `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn for_service_account(td: &TrustDomain, namespace: &str, sa: &str) -> Result<Self> {
        for (what, v) in [("namespace", namespace), ("service account", sa)] {
            if v.is_empty() || v.len() > 253 || !is_dns_label_chars(v) {
                return Err(Error::invalid(
                    "Kubernetes name",
                    format!("{what} {v:?} is not a valid Kubernetes name"),
                ));
            }
        }
        SpiffeId::parse(&format!("spiffe://{td}/ns/{namespace}/sa/{sa}"))
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path, starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `(namespace, service account)` when the path has the Kubernetes shape `/ns/<ns>/sa/<sa>`.
    pub fn k8s_workload(&self) -> Option<(&str, &str)> {
        let mut it = self.path[1..].split('/');
        match (it.next(), it.next(), it.next(), it.next(), it.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
}

fn is_dns_label_chars(v: &str) -> bool {
    v.chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

impl FromStr for SpiffeId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        SpiffeId::parse(s)
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        SpiffeId::parse(&s)
    }
}

impl From<SpiffeId> for String {
    fn from(s: SpiffeId) -> String {
        s.to_string()
    }
}

/// A DNS name for a SAN: lower-cased, LDH labels, optionally a leading `*.` wildcard label.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DnsName(String);

impl DnsName {
    /// Parses and lower-cases a DNS name (a trailing dot is removed).
    pub fn parse(s: &str) -> Result<Self> {
        const WHAT: &str = "DNS name";
        let lower = s.trim_end_matches('.').to_ascii_lowercase();
        if lower.is_empty() || lower.len() > 253 {
            return Err(Error::invalid(
                WHAT,
                format!("{s:?} must be 1 to 253 characters"),
            ));
        }
        for (i, label) in lower.split('.').enumerate() {
            if i == 0 && label == "*" {
                continue;
            }
            if label.is_empty() || label.len() > 63 {
                return Err(Error::invalid(
                    WHAT,
                    format!("{s:?} has a label that is empty or over 63 characters"),
                ));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(Error::invalid(
                    WHAT,
                    format!("{s:?}: label {label:?} starts or ends with '-'"),
                ));
            }
            if let Some(c) = label
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
            {
                return Err(Error::invalid(WHAT, format!("{s:?} contains {c:?}")));
            }
        }
        if lower == "*" {
            return Err(Error::invalid(WHAT, "a bare '*' is not a DNS name"));
        }
        Ok(DnsName(lower))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the first label is the wildcard `*`.
    pub fn is_wildcard(&self) -> bool {
        self.0.starts_with("*.")
    }
}

impl fmt::Display for DnsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for DnsName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        DnsName::parse(s)
    }
}

impl TryFrom<String> for DnsName {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        DnsName::parse(&s)
    }
}

impl From<DnsName> for String {
    fn from(d: DnsName) -> String {
        d.0
    }
}

/// The subject alternative names of a workload certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sans {
    /// At most one SPIFFE ID (the X509-SVID rule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<SpiffeId>,
    /// DNS names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<DnsName>,
    /// IP addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<std::net::IpAddr>,
}

impl Sans {
    /// Whether no SAN at all is present.
    pub fn is_empty(&self) -> bool {
        self.spiffe_id.is_none() && self.dns.is_empty() && self.ips.is_empty()
    }

    /// Every SAN as a display string (`URI:`, `DNS:`, `IP:` prefixes), for logs and ledgers.
    pub fn display_list(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(id) = &self.spiffe_id {
            out.push(format!("URI:{id}"));
        }
        out.extend(self.dns.iter().map(|d| format!("DNS:{d}")));
        out.extend(self.ips.iter().map(|i| format!("IP:{i}")));
        out
    }

    /// Removes duplicate DNS names and IPs, keeping first occurrences.
    pub fn dedup(&mut self) {
        let mut seen = std::collections::HashSet::new();
        self.dns.retain(|d| seen.insert(d.clone()));
        let mut seen = std::collections::HashSet::new();
        self.ips.retain(|i| seen.insert(*i));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_parse_and_reject() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/frontend").unwrap();
        assert_eq!(id.trust_domain().as_str(), "cluster.local");
        assert_eq!(id.k8s_workload(), Some(("default", "frontend")));
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/frontend"
        );
        for bad in [
            "http://cluster.local/x",
            "spiffe://cluster.local",
            "spiffe://cluster.local/",
            "spiffe://Cluster.local/x",
            "spiffe://cluster.local/a//b",
            "spiffe://cluster.local/a/../b",
            "spiffe://cluster.local/a?b",
            "spiffe:///x",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad} should be rejected");
        }
        assert_eq!(
            SpiffeId::parse("spiffe://td/ns/a/sa/b/extra")
                .unwrap()
                .k8s_workload(),
            None
        );
    }

    #[test]
    fn service_account_ids() {
        let td = TrustDomain::default();
        let id = SpiffeId::for_service_account(&td, "mesh", "blue").unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/mesh/sa/blue");
        assert!(SpiffeId::for_service_account(&td, "Mesh", "blue").is_err());
        assert!(SpiffeId::for_service_account(&td, "mesh", "").is_err());
    }

    #[test]
    fn dns_names() {
        assert_eq!(
            DnsName::parse("Blue.Mesh.svc.").unwrap().as_str(),
            "blue.mesh.svc"
        );
        assert!(DnsName::parse("*.example.com").unwrap().is_wildcard());
        for bad in [
            "",
            "*",
            "a..b",
            "-a.b",
            "a-.b",
            "a b",
            "x.*.y",
            &"a".repeat(64),
        ] {
            assert!(DnsName::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn sans_dedup_and_display() {
        let mut s = Sans {
            spiffe_id: Some(SpiffeId::parse("spiffe://td/w").unwrap()),
            dns: vec![DnsName::parse("a").unwrap(), DnsName::parse("A").unwrap()],
            ips: vec!["10.0.0.1".parse().unwrap()],
        };
        s.dedup();
        assert_eq!(
            s.display_list(),
            ["URI:spiffe://td/w", "DNS:a", "IP:10.0.0.1"]
        );
    }
}
