//! Policy pattern compile + match: `Policy::validate` on arbitrary patterns, then
//! `Policy::check` of a small arbitrary request (SANs parsed at the boundary as the front ends
//! do). Must never panic.
#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use meshca::identity::{DnsName, Sans, SpiffeId, TrustDomain};
use meshca::key::PublicKeyKind;
use meshca::policy::{Policy, PolicyRequest, Requester};

#[derive(Arbitrary, Debug)]
struct Input {
    spiffe_patterns: Vec<String>,
    dns_patterns: Vec<String>,
    allow_wildcard_dns: bool,
    allow_ip_sans: bool,
    require_spiffe_id: bool,
    trust_domain: Option<String>,
    spiffe_id: Option<String>,
    dns: Vec<String>,
    ips: Vec<[u8; 4]>,
    username: Option<String>,
    ttl_secs: Option<u32>,
    wants_ca: bool,
}

fuzz_target!(|inp: Input| {
    let policy = Policy {
        allowed_spiffe_ids: inp.spiffe_patterns,
        allowed_dns: inp.dns_patterns,
        allow_wildcard_dns: inp.allow_wildcard_dns,
        allow_ip_sans: inp.allow_ip_sans,
        require_spiffe_id: inp.require_spiffe_id,
        ..Policy::default()
    };
    if policy.validate().is_err() {
        return;
    }
    let td = match inp.trust_domain.as_deref().map(TrustDomain::new) {
        Some(Ok(td)) => td,
        Some(Err(_)) => return,
        None => TrustDomain::default(),
    };
    let spiffe_id = match inp.spiffe_id.as_deref().map(SpiffeId::parse) {
        Some(Ok(id)) => Some(id),
        Some(Err(_)) => return,
        None => None,
    };
    let Ok(dns) = inp
        .dns
        .iter()
        .map(|d| DnsName::parse(d))
        .collect::<Result<Vec<_>, _>>()
    else {
        return;
    };
    let mut sans = Sans {
        spiffe_id,
        dns,
        ips: inp.ips.iter().map(|b| std::net::IpAddr::from(*b)).collect(),
    };
    sans.dedup();
    let requester = inp.username.as_deref().and_then(Requester::from_username);
    let req = PolicyRequest {
        sans: &sans,
        ttl: inp.ttl_secs.map(|s| Duration::from_secs(s.into())),
        key: PublicKeyKind::Ecdsa { bits: 256 },
        wants_ca: inp.wants_ca,
        requester: requester.as_ref(),
    };
    if let Ok(ttl) = policy.check("fuzz", &td, &req) {
        assert!(!inp.wants_ca, "CA:TRUE is never allowed");
        assert!(ttl <= policy.max_ttl, "the TTL is capped by the policy");
    }
});
