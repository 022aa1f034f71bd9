//! Policy pattern compile + match: `Policy::validate` on arbitrary patterns, then the one
//! decision (`Policy::decide`) of a small arbitrary request through an arbitrary front end and
//! requester (SANs parsed at the boundary as the front ends do). Must never panic, and an
//! allowed request keeps the invariants every front end relies on.
#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use meshca::identity::{DnsName, Sans, SpiffeId, TrustDomain};
use meshca::key::PublicKeyKind;
use meshca::policy::{FrontEnd, Policy, PolicyRequest, Requester, Usages};

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
    registration_authorities: Vec<String>,
    managed_namespaces: Vec<String>,
    auto_approve: bool,
    auto_approve_static_dns: bool,
    pod_certificates: bool,
    pod_certificate_namespaces: Vec<String>,
    front_end: u8,
    requester: String,
    csr_usages: Option<Vec<String>>,
    kube_usages: Option<Vec<String>>,
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
        registration_authorities: inp.registration_authorities,
        managed_namespaces: inp.managed_namespaces,
        auto_approve: inp.auto_approve,
        auto_approve_static_dns: inp.auto_approve_static_dns,
        pod_certificates: inp.pod_certificates,
        pod_certificate_namespaces: inp.pod_certificate_namespaces,
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
    let (via, requester) = match inp.front_end % 5 {
        0 => (FrontEnd::Local, Requester::LocalOperator),
        1 => (FrontEnd::CsrSigner, Requester::kube(inp.requester)),
        2 => (FrontEnd::AutoApprover, Requester::kube(inp.requester)),
        3 => {
            let (ns, sa) = inp
                .requester
                .split_once(':')
                .unwrap_or((&inp.requester, ""));
            (
                FrontEnd::PodCertificate,
                Requester::PodServiceAccount {
                    namespace: ns.to_string(),
                    name: sa.to_string(),
                },
            )
        }
        _ => (
            FrontEnd::ManagedSecret,
            Requester::SecretNamespace(inp.requester),
        ),
    };
    let usages = Usages {
        csr: inp.csr_usages,
        kube: inp.kube_usages,
    };
    let req = PolicyRequest {
        via,
        requester: &requester,
        sans: &sans,
        ttl: inp.ttl_secs.map(|s| Duration::from_secs(s.into())),
        key: PublicKeyKind::Ecdsa { bits: 256 },
        wants_ca: inp.wants_ca,
        usages: &usages,
    };
    if let Ok(grant) = policy.decide("fuzz", &td, &req) {
        assert!(!inp.wants_ca, "CA:TRUE is never allowed");
        assert!(
            grant.ttl <= policy.max_ttl,
            "the TTL is capped by the policy"
        );
        if via == FrontEnd::AutoApprover {
            assert!(policy.auto_approve, "auto-approval needs the CA's opt-in");
            assert!(
                sans.ips.is_empty(),
                "the auto-approver never approves IP SANs"
            );
        }
        if via != FrontEnd::Local {
            // The input lists no allowed_ip_ranges: no IP SAN in the cluster.
            assert!(
                sans.ips.is_empty(),
                "an in-cluster IP SAN needs the CA's ranges"
            );
        }
        if let Requester::PodServiceAccount { namespace, .. } = &requester {
            assert!(
                policy.pod_certificates && policy.pod_certificate_namespaces.contains(namespace),
                "a pod certificate needs the CA's opt-in for its namespace"
            );
        }
        if let Requester::SecretNamespace(ns) = &requester {
            assert!(
                policy.managed_namespaces.contains(ns),
                "a managed Secret is served only in the CA's namespaces"
            );
        }
        if let (Some((ns, sa)), Some(id)) = (requester.service_account(), &sans.spiffe_id) {
            if !policy
                .registration_authorities
                .iter()
                .any(|r| Some(r.as_str()) == requester_name(&requester))
            {
                assert_eq!(
                    id.k8s_workload(),
                    Some((ns, sa)),
                    "a service account only gets its own SPIFFE ID"
                );
            }
        }
    }
});

fn requester_name(r: &Requester) -> Option<&str> {
    match r {
        Requester::Kube(u) => Some(u),
        _ => None,
    }
}
