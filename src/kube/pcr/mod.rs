//! The PodCertificateRequest signer (`certificates.k8s.io/v1beta1`, Kubernetes 1.35 behind the
//! `PodCertificateRequest` feature gate): `meshca signer run --pod-certificates`.
//!
//! The kubelet makes the key in the pod's node, proves possession by signing the pod's UID,
//! and creates a PodCertificateRequest naming the signer of the pod's `podCertificate`
//! projected volume. For every request whose `spec.signerName` is `meshca.io/<ca>` for a CA
//! it serves (the same [`IssuerWatch`] snapshot as the CSR signer, so reloads and rotations
//! apply), the controller:
//! 1. leaves alone requests that already carry `Issued`, `Denied` or `Failed` (terminal: the
//!    API server makes the whole status immutable then);
//! 2. runs the pure checks of [`check::prepare`]: no unknown `unverifiedUserAnnotations`, a
//!    key type meshca issues for, the proof of possession, and the one policy decision for
//!    the identity `spiffe://<td>/ns/<namespace>/sa/<serviceAccountName>` with the pod's
//!    service account as requester ([`crate::policy::FrontEnd::PodCertificate`]);
//! 3. signs, checks the leaf's times against the API server's rules
//!    ([`check::status_times`]), and writes one `/status` update (PUT, carrying the
//!    resourceVersion it decided on) with the chain, the times and an `Issued` condition;
//! 4. records the certificate in the ledger (requester `system:serviceaccount:<ns>:<sa>`,
//!    object `pcr/<ns>/<name>`).
//!
//! Refusals are `Denied` (the request: `UnsupportedKeyType` with a suggested `keyType`,
//! `InvalidUnverifiedUserAnnotations`, `MeshcaPolicyDenied`, `MeshcaBadRequest`) or `Failed`
//! (the signer cannot issue something the API server accepts: `MeshcaSigningFailed`,
//! `MeshcaRejectedByAPIServer`); the kubelet treats both as final. Transient errors (5xx,
//! 429, 409 on a non-terminal request, RBAC refusals an operator fixes, a throttled backend)
//! are retried with per-request backoff with jitter ([`super::backoff`]).
//!
//! The API is found through discovery ([`served`]): when `certificates.k8s.io/v1beta1` has
//! no `podcertificaterequests`, one line is logged and the controller does not start.

pub mod check;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::certificates::v1beta1::PodCertificateRequest;
use kube::api::{Api, PostParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::watcher;
use tokio::sync::watch;

use self::check::Refusal;
use super::backoff::Backoff;
use super::issuers::{self, IssuerWatch};
use super::ledger::{IssuedRecord, LedgerSink};
use super::metrics::{Metrics, PcrRefusalLabel};
use super::ratelimit::RateLimiter;
use super::{ca_from_signer_name, kube_err, FIELD_MANAGER};
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::issue::LedgerEntry;

/// The API group version of PodCertificateRequests meshca serves.
pub const GROUP_VERSION: &str = "certificates.k8s.io/v1beta1";
/// The resource name in discovery.
pub const RESOURCE: &str = "podcertificaterequests";
/// `Failed` reason when the API server refuses the update as invalid; the message quotes it.
pub const REASON_API_REJECTED: &str = super::signer::REASON_API_REJECTED;
/// The API server's message when the request is already terminal: someone else won.
pub const ALREADY_TERMINAL: &str =
    "immutable after PodCertificateRequest is issued, denied, or failed";
/// The API server's message when the writer lacks `sign` on the signer: an RBAC fix, retried.
pub const NOT_PERMITTED_TO_SIGN: &str = "is not permitted to \"sign\"";

/// Whether the API server serves PodCertificateRequests in [`GROUP_VERSION`]. `Ok(false)`
/// when the group version or the resource is absent (404, or not listed).
pub async fn served(client: &kube::Client) -> Result<bool> {
    match client.list_api_group_resources(GROUP_VERSION).await {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == RESOURCE)),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(kube_err("discovering certificates.k8s.io/v1beta1", e)),
    }
}

/// The PodCertificateRequest controller's name in `/readyz` and `meshca_controller_ready`.
pub const CONTROLLER_NAME: &str = "pod-certificates";

/// The outcome of looking at a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Not addressed to a signer this controller serves.
    NotOurs,
    /// Already `Issued`, `Denied` or `Failed`.
    Terminal,
    /// To be signed by this CA.
    Sign {
        /// The CA.
        ca: String,
    },
}

/// Classifies a request. Pure.
pub fn classify(pcr: &PodCertificateRequest, serves: impl Fn(&str) -> bool) -> Decision {
    let Some(ca) = ca_from_signer_name(&pcr.spec.signer_name).filter(|c| serves(c)) else {
        return Decision::NotOurs;
    };
    let st = pcr.status.as_ref();
    let terminal = st.is_some_and(|s| {
        s.certificate_chain
            .as_deref()
            .is_some_and(|c| !c.is_empty())
            || s.conditions.as_ref().is_some_and(|cs| {
                cs.iter().any(|c| {
                    matches!(c.type_.as_str(), "Issued" | "Denied" | "Failed") && c.status == "True"
                })
            })
    });
    if terminal {
        Decision::Terminal
    } else {
        Decision::Sign { ca: ca.to_string() }
    }
}

/// What a write came to.
#[derive(Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Accepted.
    Written,
    /// Someone else changed the request first (409, 404, or it is already terminal).
    LostRace,
}

/// Controller settings.
#[derive(Clone, Debug)]
pub struct PcrConfig {
    /// Reconciles running at once.
    pub concurrency: u16,
    /// When set, the watch carries the field selector `spec.signerName=<it>`.
    pub only_signer: Option<String>,
}

impl Default for PcrConfig {
    fn default() -> Self {
        PcrConfig {
            concurrency: 16,
            only_signer: None,
        }
    }
}

/// The PodCertificateRequest signer.
pub struct PcrSigner {
    client: kube::Client,
    issuers: IssuerWatch,
    cfg: PcrConfig,
    metrics: Arc<Metrics>,
    limiter: Arc<RateLimiter>,
    leader: watch::Receiver<bool>,
    clock: Arc<dyn Clock>,
    backoff: Backoff,
    ledger: Option<LedgerSink>,
}

impl std::fmt::Debug for PcrSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PcrSigner")
            .field("cas", &self.issuers.borrow().names())
            .field("cfg", &self.cfg)
            .finish()
    }
}

fn key(pcr: &PodCertificateRequest) -> String {
    format!(
        "{}/{}",
        pcr.metadata.namespace.as_deref().unwrap_or_default(),
        pcr.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Random in [0, 1] for the refresh-time jitter.
fn unit() -> f64 {
    let mut b = [0u8; 4];
    if aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut b).is_err() {
        return 0.5;
    }
    f64::from(u32::from_be_bytes(b)) / f64::from(u32::MAX)
}

impl PcrSigner {
    /// A signer for the CAs `issuers` shows.
    pub fn new(
        client: kube::Client,
        issuers: IssuerWatch,
        cfg: PcrConfig,
        metrics: Arc<Metrics>,
        limiter: Arc<RateLimiter>,
        leader: watch::Receiver<bool>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        PcrSigner {
            client,
            issuers,
            cfg,
            metrics,
            limiter,
            leader,
            clock,
            backoff: Backoff::new(),
            ledger: None,
        }
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Records every certificate issued into `ledger`.
    pub fn with_ledger(mut self, ledger: LedgerSink) -> Self {
        self.ledger = Some(ledger);
        self
    }

    fn leading(&self) -> bool {
        *self.leader.borrow()
    }

    fn api(&self, ns: &str) -> Api<PodCertificateRequest> {
        Api::namespaced(self.client.clone(), ns)
    }

    /// The one `/status` update (PUT with the resourceVersion read).
    async fn write(&self, updated: &PodCertificateRequest, what: &str) -> Result<WriteOutcome> {
        let ns = updated.metadata.namespace.as_deref().unwrap_or_default();
        let name = updated.metadata.name.as_deref().unwrap_or_default();
        self.limiter.acquire().await;
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        match self.api(ns).replace_status(name, &pp, updated).await {
            Ok(_) => Ok(WriteOutcome::Written),
            Err(kube::Error::Api(s))
                if s.code == 409
                    || s.code == 404
                    || (s.code == 422 && s.message.contains(ALREADY_TERMINAL)) =>
            {
                tracing::info!(pcr = %format!("{ns}/{name}"), error = %s.message, "{what}: lost the race to another writer");
                Ok(WriteOutcome::LostRace)
            }
            Err(kube::Error::Api(s))
                if s.code == 422 && s.message.contains(NOT_PERMITTED_TO_SIGN) =>
            {
                // RBAC: `sign` on signers/meshca.io/<ca> is missing. An operator fixes that
                // without the request changing, so retry.
                Err(Error::Backend {
                    backend: "kubernetes",
                    message: format!("{what}: {} ({} {})", s.message, s.code, s.reason),
                    retryable: true,
                })
            }
            Err(e) => Err(kube_err(what, e)),
        }
    }

    async fn refuse(&self, pcr: &PodCertificateRequest, r: &Refusal) -> Result<WriteOutcome> {
        let updated = status::refused(pcr, r, self.clock.now())?;
        let out = self.write(&updated, "writing a refusal").await?;
        if out == WriteOutcome::Written {
            self.metrics
                .pcrs_refused
                .get_or_create(&PcrRefusalLabel {
                    condition: r.condition.to_string(),
                    reason: r.reason.to_string(),
                })
                .inc();
            tracing::warn!(pcr = %key(pcr), condition = r.condition, reason = r.reason, message = %r.message, "PodCertificateRequest refused");
        }
        Ok(out)
    }

    /// Reconciles one request.
    pub async fn reconcile(&self, pcr: &PodCertificateRequest) -> Result<Action> {
        let snapshot = self.issuers.borrow().clone();
        let Decision::Sign { ca } = classify(pcr, |c| snapshot.contains(c)) else {
            return Ok(Action::await_change());
        };
        if !self.leading() {
            return Ok(Action::await_change());
        }
        let Some(issuer) = snapshot.get(&ca) else {
            return Ok(Action::await_change());
        };
        let now = self.clock.now();
        let prepared = match check::prepare(pcr, issuer.meta(), now) {
            Ok(p) => p,
            Err(r) => {
                self.refuse(pcr, &r).await?;
                return Ok(Action::await_change());
            }
        };
        let cert = match issuer.sign(&prepared.req, prepared.sign_at).await {
            Ok(c) => c,
            Err(e @ Error::PolicyDenied { .. }) => {
                // The CA's name constraints refuse the identity.
                let r = Refusal::denied(check::REASON_POLICY, e.to_string());
                self.refuse(pcr, &r).await?;
                return Ok(Action::await_change());
            }
            Err(e) if super::retryable(&e) => return Err(e),
            Err(e) => {
                // An expired CA, a backend that needs a CSR (ACM PCA), a terminal backend
                // refusal: no retry fixes these.
                let r = Refusal::failed(check::REASON_SIGN_FAILED, e.to_string());
                self.refuse(pcr, &r).await?;
                return Ok(Action::await_change());
            }
        };
        let times =
            match check::status_times(&cert.info, pcr.spec.max_expiration_seconds, now, unit()) {
                Ok(t) => t,
                Err(m) => {
                    let r = Refusal::failed(check::REASON_SIGN_FAILED, format!("CA {ca}: {m}"));
                    self.refuse(pcr, &r).await?;
                    return Ok(Action::await_change());
                }
            };
        // Fencing: leadership may have been lost while signing.
        if !self.leading() {
            return Ok(Action::await_change());
        }
        let message = format!(
            "issued by CA {ca}, serial {}, for {}",
            cert.info.serial_hex(),
            prepared
                .req
                .sans
                .spiffe_id
                .as_ref()
                .map(|i| i.to_string())
                .unwrap_or_default()
        );
        let updated = status::issued(pcr, &cert.chain_pem(), &times, &message, now)?;
        match self.write(&updated, "writing the certificate").await {
            Ok(WriteOutcome::Written) => {
                self.metrics.pcrs_issued.inc();
                tracing::info!(pcr = %key(pcr), ca = %ca, serial = %cert.info.serial_hex(), sans = ?cert.info.sans, not_after = %cert.info.not_after, "signed PodCertificateRequest");
                if let Some(l) = &self.ledger {
                    l.record(IssuedRecord {
                        entry: LedgerEntry::for_cert(&ca, &cert, now),
                        requester: prepared.requester.clone(),
                        object: format!("pcr/{}", key(pcr)),
                    })
                    .await;
                }
            }
            Ok(WriteOutcome::LostRace) => {}
            Err(e) if !super::retryable(&e) => {
                // 400/422 other than "already terminal": say so instead of leaving the pod
                // waiting forever.
                let r = Refusal::failed(REASON_API_REJECTED, e.to_string());
                self.refuse(pcr, &r).await?;
            }
            Err(e) => return Err(e),
        }
        Ok(Action::await_change())
    }

    /// [`PcrSigner::reconcile`], resetting the request's backoff after a success. A terminal
    /// error that escaped (a refusal that could not be written as invalid) is logged and not
    /// retried; a retryable one is returned for backoff.
    pub async fn reconcile_or_log(&self, pcr: &PodCertificateRequest) -> Result<Action> {
        match self.reconcile(pcr).await {
            Ok(a) => {
                self.backoff.reset(&key(pcr));
                Ok(a)
            }
            Err(e) if super::retryable(&e) => Err(e),
            Err(e) => {
                self.backoff.reset(&key(pcr));
                tracing::error!(pcr = %key(pcr), error = %e, "PodCertificateRequest: terminal error");
                Ok(Action::await_change())
            }
        }
    }

    /// The wait before retrying request `key` (`<ns>/<name>`) after a retryable failure.
    pub fn backoff(&self, key: &str) -> Duration {
        self.backoff.next(key)
    }

    /// The watch: narrowed to one signer name when configured.
    pub fn watcher_config(&self) -> watcher::Config {
        match &self.cfg.only_signer {
            Some(s) => watcher::Config::default().fields(&format!("spec.signerName={s}")),
            None => watcher::Config::default(),
        }
    }

    /// Runs the controller until `shutdown` completes.
    pub async fn run(
        self: Arc<Self>,
        shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    ) {
        let api: Api<PodCertificateRequest> = Api::all(self.client.clone());
        let cfg = ControllerConfig::default().concurrency(self.cfg.concurrency.max(1));
        let controller = Controller::new(api, self.watcher_config())
            .with_config(cfg)
            .reconcile_all_on(issuers::changes(self.issuers.clone()));
        let health = &self.metrics.controllers;
        super::health::run_controller(CONTROLLER_NAME, health, controller, shutdown, |c| {
            c.run(
                |pcr, ctx: Arc<PcrSigner>| async move { ctx.reconcile_or_log(&pcr).await },
                |pcr, err, ctx: Arc<PcrSigner>| {
                    let k = key(&pcr);
                    let d = ctx.backoff(&k);
                    tracing::warn!(pcr = %k, error = %err, retry_in = ?d, "PodCertificateRequest reconcile failed; will retry");
                    Action::requeue(d)
                },
                self.clone(),
            )
        })
        .await;
    }

    /// Feature detection, then [`PcrSigner::run`]: when the API server does not serve
    /// PodCertificateRequests, one line is logged and this returns at once. Discovery errors
    /// other than "not served" are retried with backoff until `shutdown`.
    pub async fn run_if_served(
        self: Arc<Self>,
        shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    ) {
        let mut shutdown = Box::pin(shutdown);
        let mut failures = 0u32;
        let health = &self.metrics.controllers;
        health.starting(CONTROLLER_NAME);
        loop {
            match served(&self.client).await {
                Ok(true) => break,
                Ok(false) => {
                    health.stopped(CONTROLLER_NAME);
                    tracing::info!("certificates.k8s.io/v1beta1 podcertificaterequests is not served by this cluster; the PodCertificateRequest signer is off");
                    return;
                }
                Err(e) => {
                    health.failed(CONTROLLER_NAME, &e.to_string());
                    failures += 1;
                    let d = super::backoff::jitter(super::backoff::ceiling(failures), unit());
                    tracing::warn!(error = %e, retry_in = ?d, "PodCertificateRequest API discovery failed");
                    tokio::select! {
                        _ = &mut shutdown => {
                            health.stopped(CONTROLLER_NAME);
                            return;
                        }
                        _ = tokio::time::sleep(d) => {}
                    }
                }
            }
        }
        tracing::info!("PodCertificateRequest signer started");
        self.run(shutdown).await;
    }
}

#[cfg(test)]
mod tests;
