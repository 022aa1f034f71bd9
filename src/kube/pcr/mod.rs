//! The PodCertificateRequest signer: `meshca signer run --pod-certificates`.
//!
//! PodCertificateRequests are `certificates.k8s.io/v1` from Kubernetes 1.37 (GA), v1beta1 in
//! 1.35 and 1.36 and v1alpha1 in 1.34 (both behind the `PodCertificateRequest` feature gate).
//! The version is found through discovery ([`discover`]: v1, then v1beta1, then v1alpha1, the
//! first whose group version lists `podcertificaterequests`), logged once, and used for the
//! watch and every `/status` update. Whatever the version, a request is read into one model,
//! [`Pcr`] (the v1beta1 spec of Kubernetes 1.37, which has every field of every version).
//! When no version serves the resource, one line is logged and the controller does not
//! start.
//!
//! The kubelet makes the key in the pod's node and creates a PodCertificateRequest naming the
//! signer of the pod's `podCertificate` projected volume, with the key and its proof of
//! possession in one of two forms: a stub PKCS#10 request (`spec.stubPKCS10Request`,
//! Kubernetes 1.36+, the only form in v1) whose self-signature is the proof, or
//! `spec.pkixPublicKey` with `spec.proofOfPossession`, a signature over the pod's UID
//! (v1alpha1 and v1beta1). Through v1, a request created with `pkixPublicKey` through
//! v1beta1 (an older kubelet) shows no key: it is read again through v1beta1 for its key.
//!
//! For every request whose `spec.signerName` is `meshca.io/<ca>` for a CA it serves (the
//! same [`IssuerWatch`] snapshot as the CSR signer, so reloads and rotations apply), the
//! controller:
//! 1. leaves alone requests that already carry `Issued`, `Denied` or `Failed` (terminal: the
//!    API server makes the whole status immutable then);
//! 2. runs the pure checks of [`check::prepare`]: no unknown `unverifiedUserAnnotations`, a
//!    key type meshca issues for, the proof of possession (the stub CSR's signature, or the
//!    signature over the pod's UID; a `pkixPublicKey` beside a stub must be the CSR's key),
//!    and the one policy decision for the identity
//!    `spiffe://<td>/ns/<namespace>/sa/<serviceAccountName>` with the pod's service account
//!    as requester ([`crate::policy::FrontEnd::PodCertificate`]);
//! 3. signs, checks the leaf's times against the API server's rules
//!    ([`check::status_times`]), and writes one `/status` update (PUT through the discovered
//!    version, carrying the resourceVersion it decided on) with the chain, the times and an
//!    `Issued` condition;
//! 4. records the certificate in the ledger (requester `system:serviceaccount:<ns>:<sa>`,
//!    object `pcr/<ns>/<name>`).
//!
//! Refusals are `Denied` (the request: `UnsupportedKeyType` with a suggested `keyType`,
//! `InvalidUnverifiedUserAnnotations`, `MeshcaPolicyDenied`, `MeshcaBadRequest`) or `Failed`
//! (the signer cannot issue something the API server accepts: `MeshcaSigningFailed`,
//! `MeshcaRejectedByAPIServer`); the kubelet treats both as final. Transient errors (5xx,
//! 429, 409 on a non-terminal request, RBAC refusals an operator fixes, a throttled backend)
//! are retried with per-request backoff with jitter ([`super::backoff`]).

pub mod check;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::certificates::v1beta1::{
    PodCertificateRequestSpec, PodCertificateRequestStatus,
};
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube::runtime::controller::{Action, Config as ControllerConfig};
use kube::runtime::watcher;
use tokio::sync::watch;

use self::check::Refusal;
use super::backoff::Backoff;
use super::discovery::{first_served, Wanted};
use super::issuers::{self, IssuerWatch};
use super::ledger::{IssuedRecord, LedgerSink};
use super::metrics::{Metrics, PcrRefusalLabel};
use super::ratelimit::RateLimiter;
use super::{ca_from_signer_name, kube_err, FIELD_MANAGER};
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::issue::LedgerEntry;

/// A PodCertificateRequest as meshca reads it, whatever the served version: the v1beta1
/// spec and status of Kubernetes 1.37, a superset of v1 (which has `stubPKCS10Request` but
/// not the deprecated `pkixPublicKey` and `proofOfPossession`), of the 1.35 v1beta1 and of
/// v1alpha1. A field a version lacks reads as empty. It is read and written through the
/// discovered version's [`ApiResource`], so no `apiVersion` is checked on the way in.
pub type Pcr = kube::core::Object<PodCertificateRequestSpec, PodCertificateRequestStatus>;

/// The API group.
pub const GROUP: &str = "certificates.k8s.io";
/// The versions tried by [`discover`], in order: v1 (GA in Kubernetes 1.37), v1beta1 (1.35),
/// v1alpha1 (1.34).
pub const VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha1"];
/// The resource name in discovery.
pub const RESOURCE: &str = "podcertificaterequests";
/// The version that still carries the deprecated `pkixPublicKey` when v1 is in use.
pub const LEGACY_VERSION: &str = "v1beta1";
/// The kind.
pub const KIND: &str = "PodCertificateRequest";
/// The PodCertificateRequest API, for discovery.
pub const WANTED: Wanted = Wanted {
    group: GROUP,
    versions: &VERSIONS,
    plural: RESOURCE,
    kind: KIND,
};
/// `Failed` reason when the API server refuses the update as invalid; the message quotes it.
pub const REASON_API_REJECTED: &str = super::signer::REASON_API_REJECTED;
/// The API server's message when the request is already terminal: someone else won.
pub const ALREADY_TERMINAL: &str =
    "immutable after PodCertificateRequest is issued, denied, or failed";
/// The API server's message when the writer lacks `sign` on the signer: an RBAC fix, retried.
pub const NOT_PERMITTED_TO_SIGN: &str = "is not permitted to \"sign\"";

/// The PodCertificateRequest API the cluster serves: the first of [`VERSIONS`] whose group
/// version lists `podcertificaterequests`; `Ok(None)` when none does. Errors other than 404
/// are returned (retry later).
pub async fn discover(client: &kube::Client) -> Result<Option<ApiResource>> {
    first_served(client, &WANTED).await
}

/// Whether the cluster serves PodCertificateRequests in any version ([`discover`]).
pub async fn served(client: &kube::Client) -> Result<bool> {
    Ok(discover(client).await?.is_some())
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
pub fn classify(pcr: &Pcr, serves: impl Fn(&str) -> bool) -> Decision {
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
    /// The served version, set by discovery at the start of each leadership session
    /// ([`PcrSigner::run_if_served`]) or once by [`PcrSigner::with_api`]; v1 until then.
    api: std::sync::RwLock<Option<ApiResource>>,
    /// Set by [`PcrSigner::with_api`]: no discovery.
    api_pinned: bool,
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
            .field("api", &self.api_resource().api_version)
            .finish()
    }
}

fn key(pcr: &Pcr) -> String {
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
            api: std::sync::RwLock::new(None),
            api_pinned: false,
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

    /// Uses `api` (a version [`discover`] returned) instead of discovering one.
    pub fn with_api(mut self, api: ApiResource) -> Self {
        self.set_api(api);
        self.api_pinned = true;
        self
    }

    fn set_api(&self, api: ApiResource) {
        // A poisoned lock only means a panic elsewhere while writing an Option: take it.
        *self.api.write().unwrap_or_else(|e| e.into_inner()) = Some(api);
    }

    /// The version in use: the discovered one, else v1.
    pub fn api_resource(&self) -> ApiResource {
        self.api
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| WANTED.resource(VERSIONS[0]))
    }

    fn leading(&self) -> bool {
        *self.leader.borrow()
    }

    /// The one `/status` update (PUT with the resourceVersion read) through the version in
    /// use. The body is [`status`]'s, as raw JSON: the spec as read, less what that version
    /// does not know.
    async fn write(&self, updated: &DynamicObject, what: &str) -> Result<WriteOutcome> {
        let ns = updated.metadata.namespace.as_deref().unwrap_or_default();
        let name = updated.metadata.name.as_deref().unwrap_or_default();
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), ns, &self.api_resource());
        self.limiter.acquire().await;
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        match api.replace_status(name, &pp, updated).await {
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

    /// A request seen through v1 without any key (v1 has no `pkixPublicKey`) may have been
    /// created through v1beta1 with the deprecated `pkixPublicKey` and `proofOfPossession`
    /// (a kubelet older than 1.36): it is read again through v1beta1, for its key only. `None`
    /// when not needed, or when v1beta1 does not have it (404: not served, or gone); the
    /// checks then refuse the request for having no key. Other errors are returned (retry).
    async fn legacy_key_form(&self, pcr: &Pcr) -> Result<Option<Pcr>> {
        let ar = self.api_resource();
        if ar.version != VERSIONS[0] || !check::lacks_key(pcr) {
            return Ok(None);
        }
        let ns = pcr.metadata.namespace.as_deref().unwrap_or_default();
        let name = pcr.metadata.name.as_deref().unwrap_or_default();
        let api: Api<Pcr> =
            Api::namespaced_with(self.client.clone(), ns, &WANTED.resource(LEGACY_VERSION));
        self.limiter.acquire().await;
        match api.get(name).await {
            Ok(old) => {
                tracing::info!(pcr = %key(pcr), "PodCertificateRequest without a key in v1: its key read through certificates.k8s.io/v1beta1");
                Ok(Some(old))
            }
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
            Err(e) => Err(kube_err(
                "reading the PodCertificateRequest through certificates.k8s.io/v1beta1",
                e,
            )),
        }
    }

    async fn refuse(&self, pcr: &Pcr, r: &Refusal) -> Result<WriteOutcome> {
        let updated = status::refused(pcr, &self.api_resource(), r, self.clock.now())?;
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
    pub async fn reconcile(&self, pcr: &Pcr) -> Result<Action> {
        let snapshot = self.issuers.borrow().clone();
        let Decision::Sign { ca } = classify(pcr, |c| snapshot.contains(c)) else {
            return Ok(Action::await_change());
        };
        if !self.leading() {
            return Ok(super::not_leading());
        }
        let Some(issuer) = snapshot.get(&ca) else {
            return Ok(Action::await_change());
        };
        let now = self.clock.now();
        let legacy = self.legacy_key_form(pcr).await?;
        let prepared = match check::prepare(legacy.as_ref().unwrap_or(pcr), issuer.meta(), now) {
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
            return Ok(super::not_leading());
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
        let updated = status::issued(
            pcr,
            &self.api_resource(),
            &cert.chain_pem(),
            &times,
            &message,
            now,
        )?;
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
    pub async fn reconcile_or_log(&self, pcr: &Pcr) -> Result<Action> {
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

    /// Runs the controller (through the version in use, [`PcrSigner::api_resource`]) until
    /// `shutdown` completes.
    pub async fn run(
        self: Arc<Self>,
        shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    ) {
        let ar = self.api_resource();
        let api: Api<Pcr> = Api::all_with(self.client.clone(), &ar);
        let cfg = ControllerConfig::default().concurrency(self.cfg.concurrency.max(1));
        let controller = super::relist::controller(api, self.watcher_config(), ar)
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

    /// Discovery ([`discover`]), then [`PcrSigner::run`] through the version found, which is
    /// logged once: when the API server serves PodCertificateRequests in no version, one line
    /// is logged and this returns at once. Discovery errors other than "not served" are
    /// retried with backoff until `shutdown`. Called at the start of each leadership
    /// session, so a cluster upgraded meanwhile (v1beta1 to v1) is followed. A version set by
    /// [`PcrSigner::with_api`] is used as is.
    pub async fn run_if_served(
        self: Arc<Self>,
        shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    ) {
        let mut shutdown = Box::pin(shutdown);
        let mut failures = 0u32;
        let health = &self.metrics.controllers;
        health.starting(CONTROLLER_NAME);
        if !self.api_pinned {
            loop {
                match discover(&self.client).await {
                    Ok(Some(ar)) => {
                        self.set_api(ar);
                        break;
                    }
                    Ok(None) => {
                        health.stopped(CONTROLLER_NAME);
                        tracing::info!(
                            "{} is not served by this cluster; the PodCertificateRequest signer is off",
                            WANTED.describe()
                        );
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
        }
        tracing::info!(api = %self.api_resource().api_version, "PodCertificateRequest signer started");
        self.run(shutdown).await;
    }
}

#[cfg(test)]
mod tests;
