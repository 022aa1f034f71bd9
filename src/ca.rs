//! Certificate authorities: creation of roots and intermediates, and loaded CA material.

use std::time::Duration;

use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::{Error, Result};
use crate::identity::TrustDomain;
use crate::key::{KeyAlgorithm, PrivateKey};
use crate::pemutil;
use crate::policy::Policy;
use crate::profile::{self, CaSubject};
use crate::x509::CertInfo;

/// Default validity of a root CA.
pub const DEFAULT_ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Default validity of an intermediate CA.
pub const DEFAULT_INTERMEDIATE_VALIDITY: Duration = Duration::from_secs(5 * 365 * 24 * 3600);

/// Where a CA's key lives and how it signs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Backend {
    /// The key is held by the meshca store (local directory or Kubernetes Secret).
    #[default]
    Local,
    /// The key lives in AWS ACM Private CA and never leaves it.
    AcmPca {
        /// The CA's ARN.
        arn: String,
        /// AWS region, when not taken from the environment.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        region: Option<String>,
        /// A custom endpoint (private endpoints, tests).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint: Option<String>,
    },
}

/// A CA's name, validated: lower-case DNS-label characters, 1 to 63 long (it is used as a
/// directory name, a Secret name suffix and in `meshca.io/<name>` signer names).
pub fn validate_ca_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "CA name",
            format!("{name:?}: use 1 to 63 characters of a-z, 0-9 and '-', not starting or ending with '-'"),
        ))
    }
}

/// What `meshca init` creates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaSpec {
    /// The CA's name.
    pub name: String,
    /// Parent CA name for an intermediate; `None` for a root.
    #[serde(default)]
    pub parent: Option<String>,
    /// Key algorithm.
    #[serde(default)]
    pub key: KeyAlgorithm,
    /// Validity (defaults: 10 years for roots, 5 for intermediates, capped by the parent).
    #[serde(default, with = "humantime_serde")]
    pub validity: Option<Duration>,
    /// Subject fields.
    #[serde(default)]
    pub subject: CaSubject,
    /// Path length constraint (defaults: 1 for roots, 0 for intermediates).
    #[serde(default)]
    pub path_len: Option<u8>,
    /// SPIFFE trust domain of the workloads this CA signs (default `cluster.local`, or the
    /// config file's top-level `trust_domain`).
    #[serde(default)]
    pub trust_domain: Option<TrustDomain>,
    /// DNS name constraints: permitted subtrees.
    #[serde(default)]
    pub permitted_dns: Vec<String>,
    /// DNS name constraints: excluded subtrees.
    #[serde(default)]
    pub excluded_dns: Vec<String>,
    /// What this CA may issue.
    #[serde(default)]
    pub policy: Policy,
}

impl CaSpec {
    /// A root CA spec with all defaults.
    pub fn root(name: &str) -> Self {
        CaSpec {
            name: name.to_string(),
            parent: None,
            key: KeyAlgorithm::default(),
            validity: None,
            subject: CaSubject::default(),
            path_len: None,
            trust_domain: None,
            permitted_dns: Vec::new(),
            excluded_dns: Vec::new(),
            policy: Policy::default(),
        }
    }
}

/// Stored facts about a CA (everything but the key and certificates).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaMeta {
    /// Name.
    pub name: String,
    /// Parent CA name for intermediates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Where the key lives.
    #[serde(default)]
    pub backend: Backend,
    /// SPIFFE trust domain.
    pub trust_domain: TrustDomain,
    /// Issuance policy.
    #[serde(default)]
    pub policy: Policy,
    /// When meshca created or registered the CA.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// A CA as loaded: its certificate, the chain above it and (for local backends) its key.
#[derive(Debug)]
pub struct CaMaterial {
    /// Facts and policy.
    pub meta: CaMeta,
    /// The CA's own certificate.
    pub cert: CertificateDer<'static>,
    /// Certificates above this CA, nearest first, ending with the root. Empty for a root.
    pub parents: Vec<CertificateDer<'static>>,
    /// The signing key; `None` when the key lives in a remote backend.
    pub key: Option<PrivateKey>,
}

impl CaMaterial {
    /// The trust anchor of this CA: the root at the top of its chain.
    pub fn root(&self) -> &CertificateDer<'static> {
        self.parents.last().unwrap_or(&self.cert)
    }

    /// Whether this is a self-signed root.
    pub fn is_root(&self) -> bool {
        self.parents.is_empty()
    }

    /// The CA certificate followed by its parents (what `chain.pem` holds).
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        std::iter::once(self.cert.clone())
            .chain(self.parents.iter().cloned())
            .collect()
    }

    /// The intermediates a leaf signed by this CA must carry: this CA (if not a root) and
    /// the parents below the root.
    pub fn leaf_chain_tail(&self) -> Vec<CertificateDer<'static>> {
        if self.is_root() {
            return Vec::new();
        }
        let mut v = vec![self.cert.clone()];
        v.extend(self.parents[..self.parents.len() - 1].iter().cloned());
        v
    }

    /// Parsed facts of the CA certificate.
    pub fn info(&self) -> Result<CertInfo> {
        CertInfo::from_der(&self.cert)
    }

    /// Checks internal consistency: the certificate is a CA, the key matches it, and the
    /// chain links up.
    pub fn validate(&self) -> Result<()> {
        let info = self.info()?;
        if !info.is_ca {
            return Err(Error::Corrupt(format!(
                "CA {}: certificate is not a CA certificate",
                self.meta.name
            )));
        }
        if let Some(key) = &self.key {
            if key.public_key_der() != info.spki_der {
                return Err(Error::Corrupt(format!(
                    "CA {}: private key does not match the certificate",
                    self.meta.name
                )));
            }
        }
        crate::x509::check_chain_order(&self.chain())
            .map_err(|e| Error::Corrupt(format!("CA {}: {e}", self.meta.name)))
    }

    /// PEM of [`CaMaterial::chain`].
    pub fn chain_pem(&self) -> String {
        pemutil::certs_to_pem(self.chain().iter())
    }
}

/// Whether DNS name `name` lies in the subtree `base` (RFC 5280: `base` itself or any name
/// made by adding labels on the left). Both lower-case, without leading dots.
pub fn dns_within(name: &str, base: &str) -> bool {
    name == base
        || (name.len() > base.len()
            && name.ends_with(base)
            && name.as_bytes()[name.len() - base.len() - 1] == b'.')
}

/// The name constraints of every CA certificate on a chain, as one check: a name passes only
/// when every CA on the chain permits it (RFC 5280 validation applies each CA's constraints
/// to everything below it, so checking the issuing CA alone would sign certificates its own
/// chain makes invalid).
#[derive(Clone, Debug, Default)]
pub struct ChainConstraints {
    /// (label of the CA, its constraints), issuing CA first; CAs without constraints left out.
    cas: Vec<(String, crate::x509::NameConstraintSet)>,
}

impl ChainConstraints {
    /// Reads the constraints of `chain` (CA certificate first, then its parents up to the
    /// root). `name` labels the first certificate in messages; the others are named by
    /// their subject.
    pub fn of_chain(name: &str, chain: &[CertificateDer<'_>]) -> Result<Self> {
        let mut cas = Vec::new();
        for (i, der) in chain.iter().enumerate() {
            let set = crate::x509::name_constraints(der)?;
            if set.is_empty() {
                continue;
            }
            let label = if i == 0 {
                format!("CA {name}")
            } else {
                format!("CA {}", CertInfo::from_der(der)?.subject)
            };
            cas.push((label, set));
        }
        Ok(ChainConstraints { cas })
    }

    /// Whether no CA on the chain carries name constraints.
    pub fn is_empty(&self) -> bool {
        self.cas.is_empty()
    }

    /// Checks the SANs of a certificate about to be issued; the error names the value and
    /// the CA whose constraint it breaks.
    pub fn check_sans(&self, sans: &crate::identity::Sans) -> std::result::Result<(), String> {
        for (ca, c) in &self.cas {
            for d in &sans.dns {
                let d = d.as_str().to_ascii_lowercase();
                if !c.permitted_dns.is_empty() && !c.permitted_dns.iter().any(|b| dns_within(&d, b))
                {
                    return Err(format!(
                        "DNS name {d} is outside the permitted subtrees [{}] of {ca}'s name constraints",
                        c.permitted_dns.join(", ")
                    ));
                }
                if let Some(b) = c.excluded_dns.iter().find(|b| dns_within(&d, b)) {
                    return Err(format!(
                        "DNS name {d} is in the excluded subtree {b} of {ca}'s name constraints"
                    ));
                }
            }
            for ip in &sans.ips {
                let same_family = |r: &&crate::x509::IpSubtree| {
                    r.network.len() == if ip.is_ipv4() { 4 } else { 16 }
                };
                let permits: Vec<_> = c.permitted_ip.iter().filter(same_family).collect();
                if !permits.is_empty() && !permits.iter().any(|r| r.contains(ip)) {
                    return Err(format!(
                        "IP address {ip} is outside the permitted ranges of {ca}'s name constraints"
                    ));
                }
                if let Some(r) = c.excluded_ip.iter().find(|r| r.contains(ip)) {
                    return Err(format!(
                        "IP address {ip} is in the excluded range {r} of {ca}'s name constraints"
                    ));
                }
            }
            // Forms meshca does not evaluate: refuse what they could apply to, rather than
            // sign something the chain may make invalid.
            for form in &c.other_forms {
                let applies = match *form {
                    "uniformResourceIdentifier" => sans.spiffe_id.is_some(),
                    "rfc822Name" | "otherName" | "x400Address" | "ediPartyName"
                    | "registeredID" => false,
                    _ => true, // directoryName (every certificate has a subject), unparseable
                };
                if applies {
                    return Err(format!(
                        "{ca} carries {form} name constraints, which meshca does not evaluate"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The permitted DNS subtrees every CA on the chain allows (their intersection); `None`
    /// when no CA on the chain restricts DNS names.
    pub fn permitted_dns(&self) -> Option<Vec<String>> {
        let mut acc: Option<Vec<String>> = None;
        for (_, c) in &self.cas {
            if c.permitted_dns.is_empty() {
                continue;
            }
            acc = Some(match acc {
                None => c.permitted_dns.clone(),
                Some(prev) => {
                    let mut v: Vec<String> = prev
                        .iter()
                        .filter(|a| c.permitted_dns.iter().any(|b| dns_within(a, b)))
                        .chain(
                            c.permitted_dns
                                .iter()
                                .filter(|b| prev.iter().any(|a| dns_within(b, a))),
                        )
                        .cloned()
                        .collect();
                    v.sort();
                    v.dedup();
                    v
                }
            });
        }
        acc
    }

    /// Checks the DNS subtree `base` that a new CA below this chain wants to permit: it must
    /// lie within every CA's permitted subtrees and in none of their excluded ones.
    pub fn check_permitted_subtree(&self, base: &str) -> std::result::Result<(), String> {
        for (ca, c) in &self.cas {
            if !c.permitted_dns.is_empty() && !c.permitted_dns.iter().any(|b| dns_within(base, b)) {
                return Err(format!(
                    "permitted DNS subtree {base} is wider than or outside the permitted subtrees [{}] of {ca}",
                    c.permitted_dns.join(", ")
                ));
            }
            if let Some(b) = c.excluded_dns.iter().find(|b| dns_within(base, b)) {
                return Err(format!(
                    "permitted DNS subtree {base} lies in the excluded subtree {b} of {ca}"
                ));
            }
        }
        Ok(())
    }
}

/// Creates a self-signed root CA with a fresh key.
pub fn create_root(spec: &CaSpec, now: OffsetDateTime) -> Result<CaMaterial> {
    validate_ca_name(&spec.name)?;
    spec.policy.validate()?;
    if spec.parent.is_some() {
        return Err(Error::invalid(
            "CA spec",
            "create_root called with a parent",
        ));
    }
    let validity = spec.validity.unwrap_or(DEFAULT_ROOT_VALIDITY);
    let key = spec.key.generate()?;
    let params = profile::ca_params(
        spec,
        Some(spec.path_len.unwrap_or(1)),
        now - profile::BACKDATE,
        now + validity,
        false,
    )?;
    let cert = params.self_signed(key.key_pair()?)?;
    Ok(CaMaterial {
        meta: meta_for(spec, now),
        cert: cert.der().clone(),
        parents: Vec::new(),
        key: Some(key),
    })
}

/// Creates an intermediate CA signed by a local `parent`. Its validity is capped at the
/// parent's notAfter; the parent's path length must allow it.
pub fn create_intermediate(
    spec: &CaSpec,
    parent: &CaMaterial,
    now: OffsetDateTime,
) -> Result<CaMaterial> {
    validate_ca_name(&spec.name)?;
    spec.policy.validate()?;
    let parent_key = parent.key.as_ref().ok_or_else(|| {
        Error::Unsupported(format!(
            "parent CA {} keeps its key in {:?}; sign the intermediate through that backend",
            parent.meta.name, parent.meta.backend
        ))
    })?;
    let pinfo = parent.info()?;
    if pinfo.path_len == Some(0) {
        return Err(Error::invalid(
            "CA spec",
            format!(
                "parent CA {} has pathLen 0 and cannot sign another CA",
                parent.meta.name
            ),
        ));
    }
    let spec = &within_parent_constraints(spec, parent)?;
    let validity = spec.validity.unwrap_or(DEFAULT_INTERMEDIATE_VALIDITY);
    let not_after = (now + validity).min(pinfo.not_after);
    let path_len = spec.path_len.unwrap_or(0);
    if let Some(pl) = pinfo.path_len {
        if path_len >= pl {
            return Err(Error::invalid(
                "CA spec",
                format!("pathLen {path_len} must be below the parent's {pl}"),
            ));
        }
    }
    let key = spec.key.generate()?;
    let params = profile::ca_params(
        spec,
        Some(path_len),
        now - profile::BACKDATE,
        not_after,
        true,
    )?;
    let issuer = rcgen::Issuer::from_ca_cert_der(&parent.cert, parent_key.key_pair()?)?;
    let cert = params.signed_by(key.key_pair()?, &issuer)?;
    let mut meta = meta_for(spec, now);
    meta.parent = Some(parent.meta.name.clone());
    Ok(CaMaterial {
        meta,
        cert: cert.der().clone(),
        parents: parent.chain(),
        key: Some(key),
    })
}

/// `spec` checked against the name constraints of `parent`'s whole chain: each permitted
/// DNS subtree must lie within what every CA above allows, and outside what they exclude. A
/// spec that permits nothing in particular inherits the chain's permitted subtrees, so the
/// intermediate states its own limits.
pub fn within_parent_constraints(spec: &CaSpec, parent: &CaMaterial) -> Result<CaSpec> {
    let chain = ChainConstraints::of_chain(&parent.meta.name, &parent.chain())?;
    let name = spec.name.clone();
    let deny = |reason: String| Error::invalid("CA spec", format!("intermediate {name}: {reason}"));
    let mut spec = spec.clone();
    for p in &spec.permitted_dns {
        let base = p.trim_start_matches('.').to_ascii_lowercase();
        chain.check_permitted_subtree(&base).map_err(deny)?;
    }
    if spec.permitted_dns.is_empty() {
        if let Some(inherited) = chain.permitted_dns() {
            if inherited.is_empty() {
                return Err(deny(
                    "the CAs above permit no DNS name in common, so nothing could be issued".into(),
                ));
            }
            spec.permitted_dns = inherited;
        }
    }
    Ok(spec)
}

fn meta_for(spec: &CaSpec, now: OffsetDateTime) -> CaMeta {
    CaMeta {
        name: spec.name.clone(),
        parent: spec.parent.clone(),
        backend: Backend::Local,
        trust_domain: spec.trust_domain.clone().unwrap_or_default(),
        policy: spec.policy.clone(),
        created_at: now,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn root_and_intermediate_profiles() {
        let now = OffsetDateTime::now_utc();
        let root = create_root(&CaSpec::root("gateway"), now).unwrap();
        root.validate().unwrap();
        let ri = root.info().unwrap();
        assert!(ri.is_ca);
        assert_eq!(ri.path_len, Some(1));
        assert!(ri.key_usage.iter().any(|k| k == "keyCertSign"));
        assert_eq!(ri.subject, "CN=meshca gateway CA");
        let mut spec = CaSpec::root("team-a");
        spec.parent = Some("gateway".into());
        spec.validity = Some(Duration::from_secs(100 * 365 * 24 * 3600));
        let int = create_intermediate(&spec, &root, now).unwrap();
        int.validate().unwrap();
        let ii = int.info().unwrap();
        assert_eq!(ii.path_len, Some(0));
        assert!(
            ii.not_after <= ri.not_after,
            "capped at the parent's notAfter"
        );
        assert_eq!(ii.issuer, ri.subject);
        assert_eq!(int.root(), &root.cert);
        // pathLen 0 cannot sign another CA.
        let mut spec2 = CaSpec::root("deeper");
        spec2.parent = Some("team-a".into());
        assert!(create_intermediate(&spec2, &int, now)
            .unwrap_err()
            .to_string()
            .contains("pathLen 0"));
    }

    /// A one-hour request for a P-256 `key` with the single DNS SAN `name`.
    pub(crate) fn dns_request(key: &PrivateKey, name: &str) -> crate::issue::SignRequest {
        crate::issue::SignRequest {
            public_key_der: key.public_key_der(),
            key: crate::key::PublicKeyKind::Ecdsa { bits: 256 },
            sans: crate::identity::Sans {
                dns: vec![crate::identity::DnsName::parse(name).unwrap()],
                ..Default::default()
            },
            ttl: Duration::from_secs(3600),
            csr_der: None,
            ekus: crate::policy::Ekus::default(),
        }
    }

    fn constrained_root(permit: &[&str], exclude: &[&str], now: OffsetDateTime) -> CaMaterial {
        let mut spec = CaSpec::root("corp");
        spec.permitted_dns = permit.iter().map(|s| s.to_string()).collect();
        spec.excluded_dns = exclude.iter().map(|s| s.to_string()).collect();
        create_root(&spec, now).unwrap()
    }

    fn child(name: &str, permit: &[&str]) -> CaSpec {
        let mut spec = CaSpec::root(name);
        spec.parent = Some("corp".into());
        spec.permitted_dns = permit.iter().map(|s| s.to_string()).collect();
        spec
    }

    #[test]
    fn intermediates_stay_within_the_chain_constraints() {
        let now = OffsetDateTime::now_utc();
        let root = constrained_root(&["example.com"], &["secret.example.com"], now);
        for (permit, why) in [
            (
                "other.org",
                "outside the permitted subtrees [example.com] of CA corp",
            ),
            ("com", "wider than or outside"),
            ("notexample.com", "outside the permitted subtrees"),
            (
                "x.secret.example.com",
                "excluded subtree secret.example.com of CA corp",
            ),
        ] {
            let e = create_intermediate(&child("team", &[permit]), &root, now)
                .unwrap_err()
                .to_string();
            assert!(e.contains(permit) && e.contains(why), "{permit}: {e}");
            assert!(e.contains("intermediate team"), "{e}");
        }
        for ok in ["example.com", ".team.example.com", "API.example.com"] {
            create_intermediate(&child("team", &[ok]), &root, now).unwrap();
        }
        // No permit of its own: it inherits the chain's, and states them in its certificate.
        let two = constrained_root(&["example.com", "example.net"], &[], now);
        let int = create_intermediate(&child("team", &[]), &two, now).unwrap();
        let nc = crate::x509::name_constraints(&int.cert).unwrap();
        assert_eq!(nc.permitted_dns, vec!["example.com", "example.net"]);
        // Two levels: the grandchild is held to the limits of every CA above it.
        let mut root_spec = CaSpec::root("corp");
        root_spec.permitted_dns = vec!["example.com".into()];
        root_spec.path_len = Some(2);
        let root2 = create_root(&root_spec, now).unwrap();
        let mut mid_spec = child("mid", &["team.example.com"]);
        mid_spec.path_len = Some(1);
        let mid = create_intermediate(&mid_spec, &root2, now).unwrap();
        let e = create_intermediate(&child("leafca", &["example.com"]), &mid, now)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[team.example.com] of CA mid"), "{e}");
    }

    /// Issuance checks every CA on the chain: the intermediate permits example.com, the root
    /// above it excludes secret.example.com, so api.secret.example.com must be refused (a
    /// verifier would reject it for the root's constraint).
    #[test]
    fn issuance_checks_the_constraints_of_every_ca_on_the_chain() {
        use crate::issue::LocalIssuer;
        let now = OffsetDateTime::now_utc();
        let root = constrained_root(&["example.com"], &["secret.example.com"], now);
        let anchor = root.cert.clone();
        let int = create_intermediate(&child("team", &["example.com"]), &root, now).unwrap();
        let issuer = LocalIssuer::new(int).unwrap();
        let key = KeyAlgorithm::EcdsaP256.generate().unwrap();
        let req = |name: &str| dns_request(&key, name);
        let ok = issuer.sign_now(&req("api.example.com"), now).unwrap();
        crate::x509::verify_chain(
            &ok.leaf,
            &ok.intermediates,
            std::slice::from_ref(&anchor),
            now,
            crate::x509::Usage::Server,
        )
        .unwrap();
        let e = issuer
            .sign_now(&req("api.secret.example.com"), now)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("api.secret.example.com")
                && e.contains("excluded subtree secret.example.com of CA CN=meshca corp CA"),
            "{e}"
        );
    }

    #[test]
    fn dns_subtrees_match_whole_labels() {
        assert!(dns_within("example.com", "example.com"));
        assert!(dns_within("a.b.example.com", "example.com"));
        assert!(!dns_within("notexample.com", "example.com"));
        assert!(!dns_within("com", "example.com"));
    }

    #[test]
    fn names_are_validated() {
        for bad in ["", "CA1", "ca_1", "-a", "a/b", &"a".repeat(64)] {
            assert!(validate_ca_name(bad).is_err(), "{bad:?}");
        }
        validate_ca_name("ca-1").unwrap();
    }

    #[test]
    fn swapped_key_is_detected() {
        let now = OffsetDateTime::now_utc();
        let mut a = create_root(&CaSpec::root("a"), now).unwrap();
        let b = create_root(&CaSpec::root("b"), now).unwrap();
        a.key = b.key;
        assert!(a
            .validate()
            .unwrap_err()
            .to_string()
            .contains("does not match"));
    }
}
