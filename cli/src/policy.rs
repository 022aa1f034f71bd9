//! `meshca policy check`: the decision the controllers make, offline.
//!
//! It runs the library's one decision ([`meshca::policy::Policy::decide`]) through the same
//! entry points the controllers use: [`meshca::issue::decide_csr`] for the CSR signer and the
//! auto-approver (a `--spiffe-id`/`--dns`/`--ip` request becomes a CSR with a throwaway
//! P-256 key, as a workload would send), [`meshca::issue::decide`] with
//! [`meshca::issue::workload_request`] for the managed-Secret controller. Exit 0 when allowed,
//! 1 when denied.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use meshca::config::sans_from_parts;
use meshca::identity::{DnsName, SpiffeId};
use meshca::issue::{decide, decide_csr, workload_request, CsrOptions};
use meshca::key::KeyAlgorithm;
use meshca::policy::{Denial, FrontEnd, Requester, Usages};
use serde::Serialize;

use crate::common::{read_csr_der, usage, Ctx, UsageError};

/// `meshca policy ...`.
#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Explain whether a CA's policy allows a request through a front end (exit 1: denied).
    Check(CheckArgs),
}

/// `meshca policy check`.
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The CA.
    #[arg(long)]
    ca: String,
    /// The front end asking: csr-signer, auto-approver, managed-secret, pod-certificate or
    /// istio-ca (with --requester system:serviceaccount:<ns>:<sa>, the workload's account), or
    /// local: the operator.
    #[arg(long = "as", value_name = "FRONT_END")]
    via: FrontEnd,
    /// A PEM CSR to check (instead of --spiffe-id/--dns/--ip).
    #[arg(long, conflicts_with_all = ["spiffe_id", "dns", "ips"])]
    csr: Option<PathBuf>,
    /// The SPIFFE ID asked for.
    #[arg(long)]
    spiffe_id: Option<SpiffeId>,
    /// A DNS name asked for (repeatable).
    #[arg(long = "dns", value_name = "NAME")]
    dns: Vec<DnsName>,
    /// An IP address asked for (repeatable).
    #[arg(long = "ip", value_name = "ADDR")]
    ips: Vec<IpAddr>,
    /// The Kubernetes username of the requester (a CSR's spec.username), e.g.
    /// system:serviceaccount:app:blue. Required for csr-signer and auto-approver.
    #[arg(long, value_name = "USER")]
    requester: Option<String>,
    /// The managed Secret's namespace. Required for managed-secret.
    #[arg(long, value_name = "NS")]
    namespace: Option<String>,
    /// A Kubernetes usage (spec.usages), e.g. 'client auth' (repeatable).
    #[arg(long = "usage", value_name = "U")]
    usages: Vec<String>,
    /// The lifetime asked for (spec.expirationSeconds).
    #[arg(long, value_name = "N")]
    expiration_seconds: Option<u64>,
}

#[derive(Serialize)]
struct Report {
    decision: &'static str,
    reason: Option<String>,
    ca: String,
    sans: Vec<String>,
    ttl_seconds: Option<u64>,
}

pub async fn run(ctx: &Ctx, cmd: PolicyCmd) -> anyhow::Result<()> {
    match cmd {
        PolicyCmd::Check(a) => check(ctx, a).await,
    }
}

async fn check(ctx: &Ctx, a: CheckArgs) -> anyhow::Result<()> {
    let store = ctx.store(false).await?;
    let meta = store.load_ca(&a.ca).await?.meta;
    let ttl = a.expiration_seconds.map(Duration::from_secs);
    let kube_usages = (!a.usages.is_empty()).then(|| a.usages.clone());
    let requester = match a.via {
        FrontEnd::CsrSigner | FrontEnd::AutoApprover => {
            if a.namespace.is_some() {
                return Err(usage(format!(
                    "--namespace is for --as managed-secret; --as {} takes --requester",
                    a.via.name()
                )));
            }
            let user = a.requester.clone().ok_or_else(|| {
                usage(format!(
                    "--as {} needs --requester USER (the CSR's spec.username)",
                    a.via.name()
                ))
            })?;
            Requester::kube(user)
        }
        FrontEnd::PodCertificate | FrontEnd::IstioCa => {
            // The pod's service account, as the PodCertificateRequest names it; or the Istio
            // client's, as its token or certificate authenticated it.
            let via = a.via.name();
            let user = a.requester.clone().ok_or_else(|| {
                usage(format!("--as {via} needs --requester system:serviceaccount:<ns>:<sa> (the workload's service account)"))
            })?;
            let Some((ns, sa)) = Requester::kube(user.clone())
                .service_account()
                .map(|(n, s)| (n.to_string(), s.to_string()))
            else {
                return Err(usage(format!(
                    "--as {via}: --requester {user:?} is not system:serviceaccount:<ns>:<sa>"
                )));
            };
            if a.namespace.is_some() {
                return Err(usage(format!(
                    "--as {via} takes the namespace from --requester, not --namespace"
                )));
            }
            if a.via == FrontEnd::IstioCa {
                Requester::IstioAccount {
                    namespace: ns,
                    name: sa,
                }
            } else {
                Requester::PodServiceAccount {
                    namespace: ns,
                    name: sa,
                }
            }
        }
        FrontEnd::ManagedSecret => {
            if a.requester.is_some() {
                return Err(usage(
                    "a managed Secret's requester is its namespace: give --namespace NS, not --requester",
                ));
            }
            let ns = a.namespace.clone().ok_or_else(|| {
                usage("--as managed-secret needs --namespace NS (the Secret's namespace)")
            })?;
            Requester::SecretNamespace(ns)
        }
        FrontEnd::Local => {
            if a.requester.is_some() || a.namespace.is_some() {
                return Err(usage(
                    "--as local is the operator: no --requester or --namespace",
                ));
            }
            Requester::LocalOperator
        }
    };
    let given = || {
        sans_from_parts(
            &meta.trust_domain,
            a.spiffe_id.clone(),
            None,
            None,
            a.dns.clone(),
            a.ips.clone(),
        )
    };
    let outcome: Result<(meshca::identity::Sans, Duration), (Vec<String>, Denial)> =
        match (&a.csr, a.via) {
            (Some(_), FrontEnd::ManagedSecret) => {
                return Err(usage(
                    "a managed Secret carries no CSR: give --spiffe-id/--dns instead of --csr",
                ))
            }
            (Some(path), via) => {
                let der = read_csr_der(path)?;
                csr_decision(&meta, &der, via, &requester, ttl, kube_usages)?
            }
            (None, FrontEnd::ManagedSecret) => {
                let sans = given()?;
                let mut req = workload_request(
                    FrontEnd::ManagedSecret,
                    &requester,
                    &sans,
                    ttl,
                    KeyAlgorithm::EcdsaP256,
                );
                let usages = Usages {
                    csr: None,
                    kube: kube_usages,
                };
                req.usages = &usages;
                match decide(&meta, &req) {
                    Ok(g) => Ok((sans.clone(), g.ttl)),
                    Err(d) => Err((sans.display_list(), d)),
                }
            }
            (None, via) => {
                // As a workload would ask: a CSR for these SANs with a fresh key.
                let sans = given()?;
                let key = KeyAlgorithm::EcdsaP256.generate()?;
                let der = meshca::issue::local::csr_for(&key, &sans, &meta.trust_domain)?;
                csr_decision(&meta, &der, via, &requester, ttl, kube_usages)?
            }
        };
    let (report, denied) = match outcome {
        Ok((sans, ttl)) => (
            Report {
                decision: "allowed",
                reason: None,
                ca: meta.name.clone(),
                sans: sans.display_list(),
                ttl_seconds: Some(ttl.as_secs()),
            },
            None,
        ),
        Err((sans, d)) => (
            Report {
                decision: "denied",
                reason: Some(d.reason.clone()),
                ca: meta.name.clone(),
                sans,
                ttl_seconds: None,
            },
            Some(d.reason),
        ),
    };
    ctx.emit(&report, || match &report.reason {
        None => "allowed\n".to_string(),
        Some(r) => format!("denied: {r}\n"),
    })?;
    match denied {
        None => Ok(()),
        // Exit 1 with the decision already on stdout.
        Some(r) => Err(anyhow::Error::new(UsageError(format!(
            "CA {} denies the request: {r}",
            meta.name
        )))),
    }
}

/// The CSR path of the signer and auto-approver: [`decide_csr`]. A CSR that cannot be read
/// or whose proof of possession fails is an error (the controllers fail it the same way).
#[allow(clippy::type_complexity)]
fn csr_decision(
    meta: &meshca::ca::CaMeta,
    der: &[u8],
    via: FrontEnd,
    requester: &Requester,
    ttl: Option<Duration>,
    kube_usages: Option<Vec<String>>,
) -> anyhow::Result<Result<(meshca::identity::Sans, Duration), (Vec<String>, Denial)>> {
    let opts = CsrOptions {
        via,
        requester: requester.clone(),
        override_sans: None,
        ttl,
        kube_usages,
    };
    let sans = meshca::x509::CsrInfo::from_der(der)?
        .sans
        .to_sans()
        .map(|s| s.display_list())
        .unwrap_or_default();
    Ok(match decide_csr(meta, der, &opts)? {
        Ok(req) => Ok((req.sans, req.ttl)),
        Err(d) => Err((sans, d)),
    })
}
