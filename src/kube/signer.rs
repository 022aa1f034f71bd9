//! The CSR signer: a kube-runtime controller over `certificates.k8s.io/v1`
//! CertificateSigningRequests whose `signerName` is `meshca.io/<ca>` for a CA it loaded.
//!
//! For each CSR the controller:
//! 1. ignores it unless the signer name is one it serves (an unknown `meshca.io/x` is left
//!    alone for whoever serves it) and it has no certificate yet;
//! 2. with auto-approval on, decides pending CSRs by policy ([`super::approver`]);
//! 3. signs only when an `Approved` condition is present and neither `Denied` nor `Failed` is
//!    (the API server would accept a certificate on an unapproved CSR, so this check is ours);
//! 4. parses the request, verifies its signature, checks `spec.usages` and `expirationSeconds`
//!    and runs the CA's policy through [`crate::issue::check_csr`] - the same decision the CLI
//!    makes;
//! 5. writes the leaf plus chain PEM to `status.certificate` through the `/status`
//!    subresource, as a merge patch carrying the resourceVersion it decided on. A conflict
//!    (409), or the API server's 422 `status.certificate: Forbidden: updates may not modify
//!    existing certificate content` (the certificate is already set), means someone else
//!    changed or signed the CSR first: it is counted and never retried blindly;
//! 6. records the certificate in the ledger with the requester and the CSR's name
//!    ([`super::ledger`]).
//!
//! Bad input (garbage request, bad signature, RSA-1024, forbidden SANs, `isCA`, TTL out of
//! bounds) ends in a `Failed` condition with a readable message, never in a crash loop. Any
//! other error is either terminal ([`super::retryable`] false: a 400/422 from the API server,
//! an ACM PCA refusal), which fails the CSR once quoting the message, or retryable, which is
//! retried with per-object exponential backoff with jitter ([`super::backoff`]: 0.5 s doubling
//! to 5 min). The CAs come from an [`IssuerWatch`]: a CA created, replaced or removed is
//! used from the next reconcile on, and every CSR is looked at again when the set changes.
//!
//! **TTL.** `spec.expirationSeconds` below 600 (the API minimum) fails. Above the policy's
//! `max_ttl` it fails too by default ([`TtlMode::Fail`]), because the same request fails
//! through `meshca issue`; [`TtlMode::Cap`] instead issues the policy maximum, which
//! Kubernetes allows ("the signer may issue a shorter certificate").

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerConfig};
use kube::runtime::watcher;
use serde_json::json;
use time::OffsetDateTime;
use tokio::sync::watch;

use super::backoff::Backoff;
use super::in_doubt::{InDoubt, Settled, Written};
use super::issuers::{self, IssuerWatch};
use super::ledger::{IssuedRecord, LedgerSink};
use super::metrics::{Metrics, ReasonLabel};
use super::ratelimit::RateLimiter;
use super::{ca_from_signer_name, kube_err, FIELD_MANAGER};
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::issue::IssuedCert;
use crate::issue::{check_csr, CsrOptions, Issuer, LedgerEntry, SignRequest};
use crate::policy::FrontEnd;

/// The CSR controller's name in `/readyz` and `meshca_controller_ready`.
pub const CONTROLLER_NAME: &str = "csr-signer";

/// The API's minimum `spec.expirationSeconds` (checked by the policy decision).
pub const MIN_EXPIRATION_SECONDS: i32 = crate::policy::MIN_EXPIRATION_SECONDS as i32;
/// Condition reason for requests that cannot be parsed or verified.
pub const REASON_BAD_REQUEST: &str = "MeshcaBadRequest";
/// Condition reason for requests the CA's policy refuses.
pub const REASON_POLICY: &str = "MeshcaPolicyDenied";
/// Condition reason for signing failures that retrying cannot fix (e.g. expired CA, a backend
/// refusal).
pub const REASON_SIGN_FAILED: &str = "MeshcaSigningFailed";
/// Condition reason when the API server refuses a write as invalid (400/422 other than "the
/// certificate is already set"); the message quotes the API server.
pub const REASON_API_REJECTED: &str = "MeshcaRejectedByAPIServer";
/// The API server's message when `status.certificate` is already set
/// (`pkg/apis/certificates/validation`): the only 422 that means another writer won.
pub const CERTIFICATE_ALREADY_SET: &str = "updates may not modify existing certificate content";

/// What to do when `expirationSeconds` exceeds the policy's maximum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TtlMode {
    /// Set a `Failed` condition (the default; consistent with `meshca issue`).
    #[default]
    Fail,
    /// Issue with the policy's maximum TTL instead.
    Cap,
}

impl std::str::FromStr for TtlMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fail" => Ok(TtlMode::Fail),
            "cap" => Ok(TtlMode::Cap),
            _ => Err(Error::invalid(
                "TTL mode",
                format!("{s:?}; expected fail or cap"),
            )),
        }
    }
}

/// Controller settings.
#[derive(Clone, Debug)]
pub struct SignerConfig {
    /// Reconciles running at once.
    pub concurrency: u16,
    /// Over-policy TTL handling.
    pub ttl_mode: TtlMode,
    /// Whether pending CSRs are approved or denied by policy.
    pub auto_approve: bool,
    /// The one signer name served, when exactly one CA is served by name: the CSR watch then
    /// carries the field selector `spec.signerName=<it>` and the API server sends nothing
    /// else (`None`: every CSR is watched and filtered here).
    pub only_signer: Option<String>,
}

impl Default for SignerConfig {
    fn default() -> Self {
        SignerConfig {
            concurrency: 16,
            ttl_mode: TtlMode::Fail,
            auto_approve: false,
            only_signer: None,
        }
    }
}

impl SignerConfig {
    /// The CSR watch: narrowed to [`SignerConfig::only_signer`] when set.
    pub fn watcher_config(&self) -> watcher::Config {
        match &self.only_signer {
            Some(s) => watcher::Config::default().fields(&format!("spec.signerName={s}")),
            None => watcher::Config::default(),
        }
    }
}

/// Everything a reconcile needs.
pub struct Signer {
    client: kube::Client,
    issuers: IssuerWatch,
    cfg: SignerConfig,
    pub(super) metrics: Arc<Metrics>,
    pub(super) limiter: Arc<RateLimiter>,
    leader: watch::Receiver<bool>,
    pub(super) clock: Arc<dyn Clock>,
    backoff: Backoff,
    ledger: Option<LedgerSink>,
    in_doubt: InDoubt,
    written: Written,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("cas", &self.issuers.borrow().names())
            .field("cfg", &self.cfg)
            .finish()
    }
}

/// The outcome of looking at a CSR.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Not addressed to a signer this controller serves.
    NotOurs,
    /// `status.certificate` is already set.
    AlreadySigned,
    /// Denied or Failed: terminal.
    Terminal(&'static str),
    /// Neither approved nor denied yet.
    Pending {
        /// The CA.
        ca: String,
    },
    /// Approved and not denied or failed: sign with `ca`.
    Sign {
        /// The CA.
        ca: String,
    },
}

fn has_condition(csr: &CertificateSigningRequest, ty: &str) -> bool {
    csr.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == ty && c.status == "True"))
}

/// Classifies a CSR. Pure.
pub fn classify(csr: &CertificateSigningRequest, serves: impl Fn(&str) -> bool) -> Decision {
    let Some(ca) = ca_from_signer_name(&csr.spec.signer_name).filter(|c| serves(c)) else {
        return Decision::NotOurs;
    };
    if csr
        .status
        .as_ref()
        .and_then(|s| s.certificate.as_ref())
        .is_some_and(|c| !c.0.is_empty())
    {
        return Decision::AlreadySigned;
    }
    if has_condition(csr, "Denied") {
        return Decision::Terminal("denied");
    }
    if has_condition(csr, "Failed") {
        return Decision::Terminal("failed");
    }
    if has_condition(csr, "Approved") {
        Decision::Sign { ca: ca.to_string() }
    } else {
        Decision::Pending { ca: ca.to_string() }
    }
}

/// A request that must not be signed, with the condition reason and message to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Condition reason (CamelCase).
    pub reason: &'static str,
    /// Human-readable message naming what was wrong.
    pub message: String,
}

impl Rejection {
    fn bad(message: impl Into<String>) -> Self {
        Rejection {
            reason: REASON_BAD_REQUEST,
            message: message.into(),
        }
    }
}

/// Maps a library error from a request check: the requester's fault becomes a rejection,
/// anything else stays an error (retried).
fn reject_or_retry(e: Error) -> std::result::Result<Rejection, Error> {
    match e {
        Error::PolicyDenied { .. } => Ok(Rejection {
            reason: REASON_POLICY,
            message: e.to_string(),
        }),
        Error::Csr(_) | Error::Invalid { .. } | Error::Pem { .. } | Error::TooLarge { .. } => {
            Ok(Rejection::bad(e.to_string()))
        }
        other => Err(other),
    }
}

/// The DER of the PEM `CERTIFICATE REQUEST` in `spec.request`.
pub fn request_der(csr: &CertificateSigningRequest) -> std::result::Result<Vec<u8>, Rejection> {
    let raw = &csr.spec.request.0;
    if raw.len() > crate::fsutil::MAX_INPUT_BYTES as usize {
        return Err(Rejection::bad(format!(
            "spec.request is {} bytes, over the limit",
            raw.len()
        )));
    }
    let blocks = crate::pemutil::parse_blocks(raw, "spec.request")
        .map_err(|e| Rejection::bad(e.to_string()))?;
    let reqs: Vec<_> = blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE REQUEST")
        .collect();
    match reqs.len() {
        1 => Ok(reqs.into_iter().next().expect("one").into_contents()),
        0 => Err(Rejection::bad(
            "spec.request holds no CERTIFICATE REQUEST PEM block",
        )),
        n => Err(Rejection::bad(format!(
            "spec.request holds {n} CERTIFICATE REQUEST blocks; expected one"
        ))),
    }
}

/// The TTL asked for, checked against the API minimum and (in [`TtlMode::Cap`]) capped.
pub fn requested_ttl(
    csr: &CertificateSigningRequest,
    issuer: &dyn Issuer,
    mode: TtlMode,
) -> std::result::Result<Option<Duration>, Rejection> {
    let Some(s) = csr.spec.expiration_seconds else {
        return Ok(None);
    };
    // Under 600 s the policy decision refuses it; a negative value is malformed.
    if s < 0 {
        return Err(Rejection::bad(format!(
            "spec.expirationSeconds {s} is negative"
        )));
    }
    let ttl = Duration::from_secs(s as u64);
    Ok(Some(match mode {
        TtlMode::Fail => ttl,
        TtlMode::Cap => ttl.min(issuer.meta().policy.max_ttl),
    }))
}

/// The request DER and requested TTL (usages, the API minimum of `expirationSeconds` and
/// everything else are the policy decision's).
pub fn request_ttl_and_der(
    csr: &CertificateSigningRequest,
    issuer: &dyn Issuer,
    mode: TtlMode,
) -> std::result::Result<(Vec<u8>, Option<Duration>), Rejection> {
    let der = request_der(csr)?;
    let ttl = requested_ttl(csr, issuer, mode)?;
    Ok((der, ttl))
}

/// Every check before signing (no I/O). `Err(Ok(rejection))` fails the CSR;
/// `Err(Err(error))` is unexpected and retried.
pub fn prepare(
    csr: &CertificateSigningRequest,
    issuer: &dyn Issuer,
    mode: TtlMode,
) -> std::result::Result<SignRequest, std::result::Result<Rejection, Error>> {
    let (der, ttl) = request_ttl_and_der(csr, issuer, mode).map_err(Ok)?;
    let opts = CsrOptions::kube(
        FrontEnd::CsrSigner,
        csr.spec.username.as_deref().unwrap_or(""),
        ttl,
        csr.spec.usages.clone(),
    );
    check_csr(issuer, &der, &opts).map_err(reject_or_retry)
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// The existing conditions as JSON plus `new` (merge patches replace the whole list).
pub(crate) fn conditions_plus(
    csr: &CertificateSigningRequest,
    ty: &str,
    reason: &str,
    message: &str,
    now: OffsetDateTime,
) -> serde_json::Value {
    let mut list: Vec<serde_json::Value> = csr
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .map(|cs| {
            cs.iter()
                .map(|c| serde_json::to_value(c).unwrap_or(serde_json::Value::Null))
                .collect()
        })
        .unwrap_or_default();
    list.retain(|c| !c.is_null());
    let ts = super::rfc3339(now);
    list.push(json!({
        "type": ty,
        "status": "True",
        "reason": reason,
        "message": truncate(message, 1000),
        "lastUpdateTime": ts,
        "lastTransitionTime": ts,
    }));
    serde_json::Value::Array(list)
}

pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// The key of a CSR in [`InDoubt`]: its uid (its name when the object has none).
fn csr_uid(csr: &CertificateSigningRequest) -> &str {
    csr.metadata
        .uid
        .as_deref()
        .or(csr.metadata.name.as_deref())
        .unwrap_or_default()
}

/// What a write attempt came to.
#[derive(Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Accepted.
    Written,
    /// 409/422: another writer got there first (or the CSR changed under us).
    LostRace,
}

/// Whether an API error says another writer got there first: a resourceVersion conflict
/// (409), the CSR gone (404), or the one 422 that means `status.certificate` is already set.
/// Every other 422 is a real validation error.
pub fn is_lost_race(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => {
            s.code == 409
                || s.code == 404
                || (s.code == 422 && s.message.contains(CERTIFICATE_ALREADY_SET))
        }
        _ => false,
    }
}

pub(super) fn classify_write(
    r: std::result::Result<CertificateSigningRequest, kube::Error>,
    what: &str,
) -> Result<WriteOutcome> {
    match r {
        Ok(_) => Ok(WriteOutcome::Written),
        Err(e) if is_lost_race(&e) => {
            tracing::info!(error = %e, "{what}: lost the race to another writer");
            Ok(WriteOutcome::LostRace)
        }
        Err(e) => Err(kube_err(what, e)),
    }
}

impl Signer {
    /// A signer for the CAs `issuers` shows (see [`issuers::IssuerSet::watch_fixed`] for a
    /// fixed set).
    pub fn new(
        client: kube::Client,
        issuers: IssuerWatch,
        cfg: SignerConfig,
        metrics: Arc<Metrics>,
        limiter: Arc<RateLimiter>,
        leader: watch::Receiver<bool>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Signer {
            client,
            issuers,
            cfg,
            metrics,
            limiter,
            leader,
            clock,
            backoff: Backoff::new(),
            ledger: None,
            in_doubt: InDoubt::default(),
            written: Written::default(),
        }
    }

    /// Records every certificate written into `ledger`.
    pub fn with_ledger(mut self, ledger: LedgerSink) -> Self {
        self.ledger = Some(ledger);
        self
    }

    /// The signer names served now.
    pub fn signer_names(&self) -> Vec<String> {
        self.issuers
            .borrow()
            .names()
            .iter()
            .map(|c| super::signer_name(c))
            .collect()
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub(super) fn api(&self) -> Api<CertificateSigningRequest> {
        Api::all(self.client.clone())
    }

    fn leading(&self) -> bool {
        *self.leader.borrow()
    }

    /// Writes a `Failed` condition through `/status`.
    async fn fail(&self, csr: &CertificateSigningRequest, rej: &Rejection) -> Result<WriteOutcome> {
        let name = csr.metadata.name.as_deref().unwrap_or_default();
        let patch = json!({
            "metadata": { "resourceVersion": csr.metadata.resource_version },
            "status": { "conditions": conditions_plus(csr, "Failed", rej.reason, &rej.message, self.clock.now()) },
        });
        self.limiter.acquire().await;
        let pp = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let out = classify_write(
            self.api()
                .patch_status(name, &pp, &Patch::Merge(&patch))
                .await,
            "setting a Failed condition",
        )?;
        if out == WriteOutcome::Written {
            tracing::warn!(csr = name, reason = rej.reason, message = %rej.message, "CSR failed");
            self.metrics
                .csrs_failed
                .get_or_create(&ReasonLabel {
                    reason: rej.reason.to_string(),
                })
                .inc();
        } else {
            self.metrics.csr_conflicts.inc();
        }
        Ok(out)
    }

    /// Reconciles one CSR.
    pub async fn reconcile(&self, csr: &CertificateSigningRequest) -> Result<Action> {
        let started = std::time::Instant::now();
        // One snapshot of the CAs for the whole decision.
        let snapshot = self.issuers.borrow().clone();
        let decision = classify(csr, |c| snapshot.contains(c));
        let ca = match decision {
            Decision::AlreadySigned => {
                self.written.seen(csr_uid(csr));
                self.settle_in_doubt(csr).await;
                return Ok(Action::await_change());
            }
            Decision::NotOurs | Decision::Terminal(_) => return Ok(Action::await_change()),
            // Signed here already; the cache has an older version ([`Written`]).
            Decision::Pending { .. } | Decision::Sign { .. }
                if self.written.pending(csr_uid(csr)) =>
            {
                return Ok(Action::await_change())
            }
            Decision::Pending { ca } => {
                self.metrics.csr_reconciles.inc();
                if !self.cfg.auto_approve {
                    return Ok(Action::await_change());
                }
                if !self.leading() {
                    return Ok(super::not_leading());
                }
                let Some(issuer) = snapshot.get(&ca) else {
                    return Ok(Action::await_change());
                };
                let verdict = super::approver::evaluate(csr, issuer.as_ref(), self.cfg.ttl_mode);
                let Some(approved) = super::approver::write(self, csr, &verdict).await? else {
                    return Ok(Action::await_change());
                };
                // Approved just now: sign the object the approval returned, in this reconcile.
                // Everything is checked again on it (classify, then `prepare`'s decision).
                return match classify(&approved, |c| snapshot.contains(c)) {
                    Decision::Sign { ca } => self.sign(&approved, ca, &snapshot, started).await,
                    _ => Ok(Action::await_change()),
                };
            }
            Decision::Sign { ca } => ca,
        };
        self.metrics.csr_reconciles.inc();
        self.sign(csr, ca, &snapshot, started).await
    }

    /// Signs approved CSR `csr` with CA `ca` of `snapshot` (after [`prepare`]'s checks) and
    /// writes the certificate; `started` is when its reconcile began.
    async fn sign(
        &self,
        csr: &CertificateSigningRequest,
        ca: String,
        snapshot: &issuers::IssuerSet,
        started: std::time::Instant,
    ) -> Result<Action> {
        let name = csr.metadata.name.as_deref().unwrap_or_default();
        if !self.leading() {
            return Ok(super::not_leading());
        }
        let Some(issuer) = snapshot.get(&ca) else {
            return Ok(Action::await_change());
        };
        let req = match prepare(csr, issuer.as_ref(), self.cfg.ttl_mode) {
            Ok(r) => r,
            Err(Ok(rej)) => {
                self.fail(csr, &rej).await?;
                return Ok(Action::await_change());
            }
            Err(Err(e)) => return Err(e),
        };
        let uid = csr_uid(csr);
        // A certificate whose earlier write may have taken effect is sent again, not signed
        // anew ([`super::in_doubt`]).
        let (cert, now) = match self.in_doubt.resend(uid, &ca) {
            Some(p) => {
                tracing::info!(csr = name, serial = %p.cert.info.serial_hex(), "sending again the certificate whose last write may have taken effect");
                (Some(p.cert), p.issued_at)
            }
            None => {
                let now = self.clock.now();
                (self.sign_new(csr, &req, issuer.as_ref(), now).await?, now)
            }
        };
        let Some(cert) = cert else {
            return Ok(Action::await_change());
        };
        // Fencing: leadership may have been lost while signing.
        if !self.leading() {
            return Ok(super::not_leading());
        }
        let patch = json!({
            "metadata": { "resourceVersion": csr.metadata.resource_version },
            "status": { "certificate": b64(cert.chain_pem().as_bytes()) },
        });
        self.limiter.acquire().await;
        let pp = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let written = classify_write(
            self.api()
                .patch_status(name, &pp, &Patch::Merge(&patch))
                .await,
            "writing status.certificate",
        );
        let written = match written {
            Err(e) if !super::retryable(&e) => {
                self.in_doubt.forget(uid);
                // The API server refuses this certificate (400/422 other than "already set"):
                // say so on the CSR instead of leaving it pending forever.
                let rej = Rejection {
                    reason: REASON_API_REJECTED,
                    message: e.to_string(),
                };
                self.fail(csr, &rej).await?;
                return Ok(Action::await_change());
            }
            Err(e) => {
                // No answer, or a 5xx/409/429: the write may have been committed.
                self.in_doubt.put(uid, &ca, cert, now);
                return Err(e);
            }
            Ok(w) => w,
        };
        match written {
            WriteOutcome::Written => {
                self.in_doubt.forget(uid);
                self.written.mark(uid);
                self.metrics
                    .sign_duration
                    .observe(started.elapsed().as_secs_f64());
                self.delivered(csr, &ca, &cert);
                self.record(csr, &ca, &cert, now).await;
            }
            WriteOutcome::LostRace => {
                // Kept if in doubt: the CSR, once seen with a certificate, settles it.
                self.metrics.csr_conflicts.inc();
            }
        }
        Ok(Action::await_change())
    }

    /// Signs `req` for `csr` with `issuer`; `None` when the CA cannot sign it (the CSR is
    /// failed, quoting why).
    async fn sign_new(
        &self,
        csr: &CertificateSigningRequest,
        req: &crate::issue::SignRequest,
        issuer: &dyn Issuer,
        now: OffsetDateTime,
    ) -> Result<Option<IssuedCert>> {
        match issuer.sign(req, now).await {
            Ok(c) => Ok(Some(c)),
            Err(e @ Error::Build(_)) => {
                // The CA cannot sign this (expired CA, unsupported key): retrying will not help.
                let rej = Rejection {
                    reason: REASON_SIGN_FAILED,
                    message: e.to_string(),
                };
                self.fail(csr, &rej).await?;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Counts and logs a certificate written onto `csr`.
    fn delivered(&self, csr: &CertificateSigningRequest, ca: &str, cert: &IssuedCert) {
        let name = csr.metadata.name.as_deref().unwrap_or_default();
        self.metrics.csrs_signed.inc();
        if let Some(created) = &csr.metadata.creation_timestamp {
            let created_ms = created.0.as_millisecond();
            let now_ms = (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
            // creationTimestamp has one-second resolution; clamp at zero.
            self.metrics
                .issue_latency
                .observe(((now_ms - created_ms).max(0)) as f64 / 1000.0);
        }
        tracing::info!(csr = name, ca = %ca, serial = %cert.info.serial_hex(), sans = ?cert.info.sans, not_after = %cert.info.not_after, "signed CSR");
    }

    /// Records `cert`, issued by `ca` at `issued_at` for `csr`, in the ledger.
    async fn record(
        &self,
        csr: &CertificateSigningRequest,
        ca: &str,
        cert: &IssuedCert,
        issued_at: OffsetDateTime,
    ) {
        if let Some(l) = &self.ledger {
            l.record(IssuedRecord {
                entry: LedgerEntry::for_cert(ca, cert, issued_at),
                requester: csr.spec.username.clone().unwrap_or_default(),
                object: format!("csr/{}", csr.metadata.name.as_deref().unwrap_or_default()),
            })
            .await;
        }
    }

    /// `csr` carries a certificate: if this replica kept one whose write was in doubt, the
    /// CSR says whether that write took effect; a delivered one is counted and recorded.
    async fn settle_in_doubt(&self, csr: &CertificateSigningRequest) {
        if self.in_doubt.is_empty() {
            return;
        }
        let Some(serial) = super::ledger_repair::issued_leaf(csr).map(|i| i.serial_hex()) else {
            return;
        };
        let name = csr.metadata.name.as_deref().unwrap_or_default();
        match self.in_doubt.settle(csr_uid(csr), &serial) {
            Settled::Nothing => {}
            Settled::Delivered(p) => {
                tracing::info!(csr = name, serial = %serial, "a write in doubt had taken effect: recording its certificate");
                self.delivered(csr, &p.ca, &p.cert);
                self.record(csr, &p.ca, &p.cert, p.issued_at).await;
            }
            Settled::Superseded(p) => {
                tracing::info!(csr = name, serial = %p.cert.info.serial_hex(), on_csr = %serial, "a write in doubt had not taken effect; another certificate is on the CSR");
            }
        }
    }

    /// [`Signer::reconcile`], then the error policy's half that needs I/O: a terminal error
    /// fails the CSR once (quoting it) and is not retried; a retryable one is returned for
    /// backoff. A success resets the CSR's backoff.
    pub async fn reconcile_or_fail(&self, csr: &CertificateSigningRequest) -> Result<Action> {
        let name = csr.metadata.name.as_deref().unwrap_or_default();
        match self.reconcile(csr).await {
            Ok(a) => {
                self.backoff.reset(name);
                Ok(a)
            }
            Err(e) if super::retryable(&e) => Err(e),
            Err(e) => {
                self.backoff.reset(name);
                if !self.leading() {
                    return Ok(super::not_leading());
                }
                let reason = match &e {
                    Error::Backend {
                        backend: "kubernetes",
                        ..
                    } => REASON_API_REJECTED,
                    _ => REASON_SIGN_FAILED,
                };
                let rej = Rejection {
                    reason,
                    message: e.to_string(),
                };
                if let Err(e2) = self.fail(csr, &rej).await {
                    tracing::error!(csr = name, error = %e, fail_error = %e2, "terminal error, and the Failed condition could not be written");
                }
                Ok(Action::await_change())
            }
        }
    }

    /// The wait before retrying `name` after a retryable failure (jittered, per CSR).
    pub fn backoff(&self, name: &str) -> Duration {
        self.backoff.next(name)
    }

    /// Runs the CSR controller until `shutdown` completes (in-flight reconciles finish first),
    /// reporting whether it has listed as [`CONTROLLER_NAME`] ([`super::health`]).
    pub async fn run(
        self: Arc<Self>,
        shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    ) {
        let api = self.api();
        let cfg = ControllerConfig::default().concurrency(self.cfg.concurrency.max(1));
        let controller = super::relist::controller(api, self.cfg.watcher_config(), ())
            .with_config(cfg)
            // A CA created, replaced or removed: look at every CSR again.
            .reconcile_all_on(issuers::changes(self.issuers.clone()));
        let health = &self.metrics.controllers;
        super::health::run_controller(CONTROLLER_NAME, health, controller, shutdown, |c| {
            c.run(
                |csr, ctx: Arc<Signer>| async move { ctx.reconcile_or_fail(&csr).await },
                |csr, err, ctx: Arc<Signer>| {
                    let name = csr.metadata.name.as_deref().unwrap_or_default();
                    let d = ctx.backoff(name);
                    tracing::warn!(csr = name, error = %err, retry_in = ?d, "CSR reconcile failed; will retry");
                    Action::requeue(d)
                },
                self.clone(),
            )
        })
        .await;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ca::{create_root, CaSpec};
    use crate::clock::SystemClock;
    use crate::issue::LocalIssuer;
    use crate::key::KeyAlgorithm;
    use crate::kube::testutil::{json as resp, mock_client, next, status};
    use crate::policy::Policy;
    use std::sync::Mutex;

    pub(crate) fn local(name: &str, policy: Policy) -> Arc<LocalIssuer> {
        let mut spec = CaSpec::root(name);
        spec.policy = policy;
        Arc::new(LocalIssuer::new(create_root(&spec, OffsetDateTime::now_utc()).unwrap()).unwrap())
    }

    /// A ledger that keeps what it is given, for tests to read.
    #[derive(Debug, Default)]
    pub(crate) struct Rec(pub(crate) Mutex<Vec<IssuedRecord>>);
    #[async_trait::async_trait]
    impl super::super::ledger::LedgerWriter for Rec {
        async fn append(&self, r: &[IssuedRecord]) -> Result<()> {
            self.0.lock().unwrap().extend_from_slice(r);
            Ok(())
        }
    }

    pub(crate) fn issuer(name: &str, policy: Policy) -> Arc<dyn Issuer> {
        local(name, policy)
    }

    /// A PEM CSR for `sans` with a fresh key of `alg`, made with rcgen.
    pub(crate) fn csr_pem(sans: &[&str], alg: KeyAlgorithm) -> String {
        let key = match alg {
            KeyAlgorithm::EcdsaP256 => {
                rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
            }
            _ => rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap(),
        };
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = sans
            .iter()
            .map(|s| {
                if s.starts_with("spiffe://") {
                    rcgen::SanType::URI(s.to_string().try_into().unwrap())
                } else if let Ok(ip) = s.parse() {
                    rcgen::SanType::IpAddress(ip)
                } else {
                    rcgen::SanType::DnsName(s.to_string().try_into().unwrap())
                }
            })
            .collect();
        p.serialize_request(&key).unwrap().pem().unwrap()
    }

    pub(crate) fn csr_obj(
        name: &str,
        signer: &str,
        pem: &str,
        conditions: &[&str],
        exp: Option<i32>,
    ) -> CertificateSigningRequest {
        let conds: Vec<serde_json::Value> = conditions
            .iter()
            .map(|t| json!({"type": t, "status": "True", "reason": "Test", "message": "test"}))
            .collect();
        serde_json::from_value(json!({
            "apiVersion": "certificates.k8s.io/v1",
            "kind": "CertificateSigningRequest",
            "metadata": { "name": name, "resourceVersion": "42", "creationTimestamp": "2026-01-01T00:00:00Z" },
            "spec": {
                "request": b64(pem.as_bytes()),
                "signerName": signer,
                "usages": ["digital signature", "server auth", "client auth"],
                "username": "system:serviceaccount:app:blue",
                "expirationSeconds": exp,
            },
            "status": { "conditions": conds },
        }))
        .unwrap()
    }

    pub(crate) fn signer_with(
        client: kube::Client,
        issuers: &[(&str, Arc<dyn Issuer>)],
        cfg: SignerConfig,
    ) -> Signer {
        Signer::new(
            client,
            crate::kube::issuers::IssuerSet::watch_fixed(
                issuers
                    .iter()
                    .map(|(n, i)| (n.to_string(), i.clone()))
                    .collect(),
            ),
            cfg,
            Arc::new(Metrics::new()),
            Arc::new(RateLimiter::new(0.0, 1)),
            super::super::leader::always_leader(),
            Arc::new(SystemClock),
        )
    }

    #[test]
    fn classification() {
        let pem = csr_pem(&["blue.app.svc"], KeyAlgorithm::EcdsaP256);
        let serves = |c: &str| c == "mesh";
        assert_eq!(
            classify(
                &csr_obj("x", "example.com/other", &pem, &["Approved"], None),
                serves
            ),
            Decision::NotOurs
        );
        assert_eq!(
            classify(
                &csr_obj("x", "meshca.io/unknown", &pem, &["Approved"], None),
                serves
            ),
            Decision::NotOurs
        );
        assert_eq!(
            classify(&csr_obj("x", "meshca.io/mesh", &pem, &[], None), serves),
            Decision::Pending { ca: "mesh".into() }
        );
        assert_eq!(
            classify(
                &csr_obj("x", "meshca.io/mesh", &pem, &["Approved"], None),
                serves
            ),
            Decision::Sign { ca: "mesh".into() }
        );
        assert_eq!(
            classify(
                &csr_obj("x", "meshca.io/mesh", &pem, &["Approved", "Denied"], None),
                serves
            ),
            Decision::Terminal("denied")
        );
        assert_eq!(
            classify(
                &csr_obj("x", "meshca.io/mesh", &pem, &["Approved", "Failed"], None),
                serves
            ),
            Decision::Terminal("failed")
        );
        let mut signed = csr_obj("x", "meshca.io/mesh", &pem, &["Approved"], None);
        signed.status.as_mut().unwrap().certificate = Some(k8s_openapi::ByteString(b"x".to_vec()));
        assert_eq!(classify(&signed, serves), Decision::AlreadySigned);
        // An Approved condition whose status is not "True" does not count.
        let mut c = csr_obj("x", "meshca.io/mesh", &pem, &["Approved"], None);
        c.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].status = "False".into();
        assert_eq!(
            classify(&c, serves),
            Decision::Pending { ca: "mesh".into() }
        );
    }

    #[test]
    fn bad_input_is_rejected_with_reasons() {
        let iss = issuer(
            "mesh",
            Policy {
                max_ttl: Duration::from_secs(3600),
                ..Policy::default()
            },
        );
        let check = |csr: &CertificateSigningRequest, mode| match prepare(csr, iss.as_ref(), mode) {
            Err(Ok(r)) => r,
            other => panic!("expected a rejection, got {other:?}"),
        };
        let good = csr_pem(&["blue.app.svc"], KeyAlgorithm::EcdsaP256);
        // Garbage request.
        let r = check(
            &csr_obj("x", "meshca.io/mesh", "garbage", &["Approved"], None),
            TtlMode::Fail,
        );
        assert_eq!(r.reason, REASON_BAD_REQUEST);
        assert!(r.message.contains("no PEM block"), "{}", r.message);
        // Signature that does not match: flip a byte inside the signature.
        let der = pem::parse(&good).unwrap().into_contents();
        let mut bad = der.clone();
        let n = bad.len();
        bad[n - 5] ^= 0x01;
        let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", bad));
        let r = check(
            &csr_obj("x", "meshca.io/mesh", &tampered, &["Approved"], None),
            TtlMode::Fail,
        );
        assert!(
            r.message.contains("signature does not verify"),
            "{}",
            r.message
        );
        // TTL below the API minimum and above the policy.
        let r = check(
            &csr_obj("x", "meshca.io/mesh", &good, &["Approved"], Some(599)),
            TtlMode::Fail,
        );
        assert!(
            r.message.contains("below the minimum of 600"),
            "{}",
            r.message
        );
        let r = check(
            &csr_obj("x", "meshca.io/mesh", &good, &["Approved"], Some(7200)),
            TtlMode::Fail,
        );
        assert_eq!(r.reason, REASON_POLICY);
        assert!(r.message.contains("over the maximum"), "{}", r.message);
        // In cap mode the same request is issued with the policy maximum.
        let ok = prepare(
            &csr_obj("x", "meshca.io/mesh", &good, &["Approved"], Some(7200)),
            iss.as_ref(),
            TtlMode::Cap,
        )
        .unwrap();
        assert_eq!(ok.ttl, Duration::from_secs(3600));
        // Wildcard and IP SANs the policy forbids.
        let w = csr_pem(&["*.example.com"], KeyAlgorithm::EcdsaP256);
        let r = check(
            &csr_obj("x", "meshca.io/mesh", &w, &["Approved"], None),
            TtlMode::Fail,
        );
        assert!(
            r.message.contains("wildcard DNS name *.example.com"),
            "{}",
            r.message
        );
        let no_ip = issuer(
            "mesh",
            Policy {
                allow_ip_sans: false,
                ..Policy::default()
            },
        );
        let ip = csr_pem(&["10.0.0.1"], KeyAlgorithm::EcdsaP256);
        match prepare(
            &csr_obj("x", "meshca.io/mesh", &ip, &["Approved"], None),
            no_ip.as_ref(),
            TtlMode::Fail,
        ) {
            Err(Ok(r)) => assert!(r.message.contains("IP SAN 10.0.0.1"), "{}", r.message),
            other => panic!("{other:?}"),
        }
        // CA usages.
        let mut ca_use = csr_obj("x", "meshca.io/mesh", &good, &["Approved"], None);
        ca_use.spec.usages = Some(vec!["cert sign".into()]);
        assert!(check(&ca_use, TtlMode::Fail).message.contains("cert sign"));
    }

    #[test]
    fn rsa_1024_is_refused() {
        // rcgen cannot make RSA-1024 keys; use a committed-at-runtime openssl one when present.
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.pem");
        let out = std::process::Command::new("openssl")
            .args([
                "req",
                "-new",
                "-newkey",
                "rsa:1024",
                "-nodes",
                "-subj",
                "/CN=x",
                "-addext",
                "subjectAltName=DNS:a.example.com",
                "-keyout",
            ])
            .arg(&key)
            .output();
        let Some(out) = out.ok().filter(|o| o.status.success()) else {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("openssl is required in CI");
            }
            eprintln!("skipping: openssl not available");
            return;
        };
        let pem = String::from_utf8(out.stdout).unwrap();
        let iss = issuer("mesh", Policy::default());
        match prepare(
            &csr_obj("x", "meshca.io/mesh", &pem, &["Approved"], None),
            iss.as_ref(),
            TtlMode::Fail,
        ) {
            Err(Ok(r)) => {
                assert!(r.message.contains("1024"), "{}", r.message);
                assert_eq!(r.reason, REASON_POLICY, "{}", r.message);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn approved_csr_is_signed_through_the_status_subresource() {
        let (client, mut h) = mock_client();
        let iss = local("mesh", Policy::default());
        let s = signer_with(
            client,
            &[("mesh", iss.clone() as Arc<dyn Issuer>)],
            SignerConfig::default(),
        );
        let pem = csr_pem(
            &["spiffe://cluster.local/ns/app/sa/blue", "blue.app.svc"],
            KeyAlgorithm::EcdsaP256,
        );
        let csr = csr_obj("c1", "meshca.io/mesh", &pem, &["Approved"], Some(3600));
        let server = tokio::spawn(async move {
            let (req, body, send) = next(&mut h).await;
            assert_eq!(req.method(), "PATCH");
            assert_eq!(
                req.uri().path(),
                "/apis/certificates.k8s.io/v1/certificatesigningrequests/c1/status"
            );
            assert_eq!(
                req.headers()["content-type"],
                "application/merge-patch+json"
            );
            assert!(req.uri().query().unwrap().contains("fieldManager=meshca"));
            assert_eq!(body["metadata"]["resourceVersion"], "42");
            let pem = base64::engine::general_purpose::STANDARD
                .decode(body["status"]["certificate"].as_str().unwrap())
                .unwrap();
            send.send_response(resp(200, &json!({
                "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
                "metadata": {"name": "c1"}, "spec": {"request": "", "signerName": "meshca.io/mesh"},
            })));
            pem
        });
        let action = s.reconcile(&csr).await.unwrap();
        assert_eq!(action, Action::await_change());
        let pem = server.await.unwrap();
        let certs = crate::pemutil::parse_certs(&pem, "status.certificate").unwrap();
        assert_eq!(certs.len(), 1, "a root CA's leaf chain is the leaf alone");
        let info = crate::x509::CertInfo::from_der(&certs[0]).unwrap();
        assert_eq!(info.sans.uri, vec!["spiffe://cluster.local/ns/app/sa/blue"]);
        let lifetime = info.not_after - info.not_before;
        assert!(
            lifetime <= time::Duration::seconds(3600 + 600),
            "{lifetime}"
        );
        crate::x509::verify_chain(
            &certs[0],
            &[],
            &[iss.ca().root().clone()],
            OffsetDateTime::now_utc(),
            crate::x509::Usage::Client,
        )
        .unwrap();
        assert_eq!(s.metrics.csrs_signed.get(), 1);
    }

    #[tokio::test]
    async fn controller_lists_watches_signs_and_shuts_down() {
        let (client, mut h) = mock_client();
        let s = Arc::new(signer_with(
            client,
            &[("mesh", issuer("mesh", Policy::default()))],
            SignerConfig::default(),
        ));
        let pem = csr_pem(&["blue.app.svc"], KeyAlgorithm::EcdsaP256);
        let approved =
            serde_json::to_value(csr_obj("c1", "meshca.io/mesh", &pem, &["Approved"], None))
                .unwrap();
        let other = serde_json::to_value(csr_obj("c2", "example.com/x", &pem, &["Approved"], None))
            .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let ctl = tokio::spawn(s.clone().run(async move {
            let _ = stopped.await;
        }));
        let mut patched = Vec::new();
        let mut parked = Vec::new();
        // The initial list, the watch (left open) and exactly one status patch, in any order.
        while patched.is_empty() {
            let (req, body, send) = next(&mut h).await;
            let q = req.uri().query().unwrap_or("").to_string();
            match req.method().as_str() {
                "GET" if q.contains("watch=true") => parked.push(send),
                "GET" => {
                    assert_eq!(
                        req.uri().path(),
                        "/apis/certificates.k8s.io/v1/certificatesigningrequests"
                    );
                    send.send_response(resp(200, &json!({
                        "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequestList",
                        "metadata": {"resourceVersion": "100"}, "items": [approved, other],
                    })));
                }
                "PATCH" => {
                    patched.push(req.uri().path().to_string());
                    assert!(body["status"]["certificate"].is_string());
                    send.send_response(resp(200, &approved));
                }
                m => panic!("unexpected {m} {}", req.uri()),
            }
        }
        assert_eq!(
            patched,
            vec!["/apis/certificates.k8s.io/v1/certificatesigningrequests/c1/status"]
        );
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), ctl)
            .await
            .expect("graceful shutdown")
            .unwrap();
        assert_eq!(s.metrics.csrs_signed.get(), 1);
        drop(parked);
    }

    #[tokio::test]
    async fn conflict_means_someone_else_won() {
        let (client, mut h) = mock_client();
        let s = signer_with(
            client,
            &[("mesh", issuer("mesh", Policy::default()))],
            SignerConfig::default(),
        );
        let pem = csr_pem(&["blue.app.svc"], KeyAlgorithm::EcdsaP256);
        let csr = csr_obj("c1", "meshca.io/mesh", &pem, &["Approved"], None);
        let server = tokio::spawn(async move {
            let (_, _, send) = next(&mut h).await;
            send.send_response(status(409, "Conflict", "the object has been modified"));
            // The API server's message when status.certificate is already set
            // (pkg/apis/certificates/validation: validateCertificateSigningRequestUpdate).
            let (_, _, send) = next(&mut h).await;
            send.send_response(status(
                422,
                "Invalid",
                "CertificateSigningRequest.certificates.k8s.io \"c1\" is invalid: status.certificate: Forbidden: updates may not modify existing certificate content",
            ));
        });
        assert_eq!(s.reconcile(&csr).await.unwrap(), Action::await_change());
        assert_eq!(s.reconcile(&csr).await.unwrap(), Action::await_change());
        server.await.unwrap();
        assert_eq!(s.metrics.csrs_signed.get(), 0);
        assert_eq!(s.metrics.csr_conflicts.get(), 2);
    }

    /// The defect: every 422 counted as a lost race, so a real validation error left the CSR
    /// pending forever. Any other 422 must fail the CSR, quoting the API server.
    #[tokio::test]
    async fn any_other_422_fails_the_csr_quoting_the_api_server() {
        let (client, mut h) = mock_client();
        let s = signer_with(
            client,
            &[("mesh", issuer("mesh", Policy::default()))],
            SignerConfig::default(),
        );
        let pem = csr_pem(&["blue.app.svc"], KeyAlgorithm::EcdsaP256);
        let csr = csr_obj("c1", "meshca.io/mesh", &pem, &["Approved"], None);
        let api_message = "CertificateSigningRequest.certificates.k8s.io \"c1\" is invalid: status.certificate: Invalid value: \"<certificate data>\": must contain at least one CERTIFICATE PEM block";
        let server = tokio::spawn(async move {
            let (req, body, send) = next(&mut h).await;
            assert!(body["status"]["certificate"].is_string());
            assert!(req.uri().path().ends_with("/c1/status"));
            send.send_response(status(422, "Invalid", api_message));
            let (req, body, send) = next(&mut h).await;
            assert_eq!(req.method(), "PATCH");
            assert!(req.uri().path().ends_with("/c1/status"));
            assert!(body["status"].get("certificate").is_none());
            let conds = body["status"]["conditions"].as_array().unwrap().clone();
            assert_eq!(conds.last().unwrap()["type"], "Failed");
            assert_eq!(conds.last().unwrap()["reason"], REASON_API_REJECTED);
            let msg = conds.last().unwrap()["message"]
                .as_str()
                .unwrap()
                .to_string();
            send.send_response(resp(200, &json!({
                "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
                "metadata": {"name": "c1"}, "spec": {"request": "", "signerName": "meshca.io/mesh"},
            })));
            msg
        });
        assert_eq!(
            s.reconcile_or_fail(&csr).await.unwrap(),
            Action::await_change()
        );
        let msg = server.await.unwrap();
        assert!(
            msg.contains("must contain at least one CERTIFICATE PEM block"),
            "{msg}"
        );
        assert_eq!(s.metrics.csr_conflicts.get(), 0);
        assert!(s
            .metrics
            .render()
            .contains("meshca_csrs_failed_total{reason=\"MeshcaRejectedByAPIServer\"} 1"));
    }

    #[derive(Debug)]
    struct Refusing(crate::ca::CaMeta, bool);

    #[async_trait::async_trait]
    impl Issuer for Refusing {
        fn meta(&self) -> &crate::ca::CaMeta {
            &self.0
        }
        async fn sign(
            &self,
            _: &SignRequest,
            _: OffsetDateTime,
        ) -> Result<crate::issue::IssuedCert> {
            Err(Error::Backend {
                backend: "acm-pca",
                message: if self.1 {
                    "throttled"
                } else {
                    "access denied calling IssueCertificate"
                }
                .into(),
                retryable: self.1,
            })
        }
    }

    /// The defect: `Backend.retryable` was ignored, so a refusal that no retry can fix was
    /// retried forever (and, on ACM PCA, billed again each time).
    #[tokio::test]
    async fn terminal_backend_errors_fail_once_and_retryable_ones_back_off() {
        let meta = local("mesh", Policy::default()).ca().meta.clone();
        let pem = csr_pem(&["blue.app.svc"], KeyAlgorithm::EcdsaP256);
        let csr = csr_obj("c1", "meshca.io/mesh", &pem, &["Approved"], None);
        // Retryable: returned for backoff, nothing written.
        let (client, mut h) = mock_client();
        let s = signer_with(
            client,
            &[("mesh", Arc::new(Refusing(meta.clone(), true)))],
            SignerConfig::default(),
        );
        let e = s.reconcile_or_fail(&csr).await.unwrap_err();
        assert!(super::super::retryable(&e), "{e}");
        assert!(
            tokio::time::timeout(Duration::from_millis(100), h.next_request())
                .await
                .is_err()
        );
        // Terminal: one Failed condition quoting the backend.
        let (client, mut h) = mock_client();
        let s = signer_with(
            client,
            &[("mesh", Arc::new(Refusing(meta, false)))],
            SignerConfig::default(),
        );
        let server = tokio::spawn(async move {
            let (req, body, send) = next(&mut h).await;
            assert!(req.uri().path().ends_with("/c1/status"));
            let c = body["status"]["conditions"]
                .as_array()
                .unwrap()
                .last()
                .unwrap()
                .clone();
            assert_eq!(c["type"], "Failed");
            assert_eq!(c["reason"], REASON_SIGN_FAILED);
            assert!(
                c["message"].as_str().unwrap().contains("access denied"),
                "{c}"
            );
            send.send_response(resp(200, &json!({
                "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
                "metadata": {"name": "c1"}, "spec": {"request": "", "signerName": "meshca.io/mesh"},
            })));
        });
        assert_eq!(
            s.reconcile_or_fail(&csr).await.unwrap(),
            Action::await_change()
        );
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_replaced_ca_signs_without_a_restart_and_the_ledger_names_the_requester() {
        let (client, mut h) = mock_client();
        let old = local("mesh", Policy::default());
        let new = local("mesh", Policy::default());
        let set = |i: &Arc<LocalIssuer>| {
            Arc::new(crate::kube::issuers::IssuerSet::fixed(
                [("mesh".to_string(), i.clone() as Arc<dyn Issuer>)]
                    .into_iter()
                    .collect(),
            ))
        };
        let (tx, rx) = watch::channel(set(&old));
        let rec = Arc::new(Rec::default());
        let metrics = Arc::new(Metrics::new());
        let (sink, task) = LedgerSink::spawn(rec.clone(), metrics.clone());
        let s = Signer::new(
            client,
            rx,
            SignerConfig::default(),
            metrics,
            Arc::new(RateLimiter::new(0.0, 1)),
            super::super::leader::always_leader(),
            Arc::new(SystemClock),
        )
        .with_ledger(sink);
        let pem = csr_pem(&["blue.app.svc"], KeyAlgorithm::EcdsaP256);
        let server = tokio::spawn(async move {
            let mut certs = Vec::new();
            for _ in 0..2 {
                let (_, body, send) = next(&mut h).await;
                certs.push(
                    base64::engine::general_purpose::STANDARD
                        .decode(body["status"]["certificate"].as_str().unwrap())
                        .unwrap(),
                );
                send.send_response(resp(200, &json!({
                    "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
                    "metadata": {"name": "c"}, "spec": {"request": "", "signerName": "meshca.io/mesh"},
                })));
            }
            certs
        });
        s.reconcile(&csr_obj("c1", "meshca.io/mesh", &pem, &["Approved"], None))
            .await
            .unwrap();
        tx.send_replace(set(&new));
        s.reconcile(&csr_obj("c2", "meshca.io/mesh", &pem, &["Approved"], None))
            .await
            .unwrap();
        let certs = server.await.unwrap();
        let aki = |pem: &[u8]| {
            let der = crate::pemutil::parse_certs(pem, "c").unwrap().remove(0);
            crate::x509::CertInfo::from_der(&der)
                .unwrap()
                .authority_key_id
        };
        assert_eq!(aki(&certs[0]), old.ca().info().unwrap().subject_key_id);
        assert_eq!(
            aki(&certs[1]),
            new.ca().info().unwrap().subject_key_id,
            "the new key signs"
        );
        drop(s);
        super::super::ledger::flush(task, Duration::from_secs(10)).await;
        let got = rec.0.lock().unwrap().clone();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].requester, "system:serviceaccount:app:blue");
        assert_eq!(got[0].object, "csr/c1");
        assert_eq!(got[1].object, "csr/c2");
        assert_eq!(got[0].entry.ca, "mesh");
    }

    /// A status write answered 503 may have been committed (seen on a real API server killed
    /// mid-write): the retry sends the same certificate, not a new one, and once the CSR shows
    /// it, it goes into the ledger; a CSR showing another writer's certificate records nothing.
    #[tokio::test]
    async fn a_write_in_doubt_is_sent_again_unchanged_and_recorded_once_the_csr_shows_it() {
        let (client, mut h) = mock_client();
        let rec = Arc::new(Rec::default());
        let metrics = Arc::new(Metrics::new());
        let (sink, task) = LedgerSink::spawn(rec.clone(), metrics.clone());
        let s = signer_with(
            client,
            &[("mesh", issuer("mesh", Policy::default()))],
            SignerConfig::default(),
        )
        .with_ledger(sink);
        let pem = csr_pem(&["blue.app.svc"], KeyAlgorithm::EcdsaP256);
        let server = tokio::spawn(async move {
            let mut sent = Vec::new();
            for answer in [
                status(503, "ServiceUnavailable", "apiserver is shutting down"),
                status(409, "Conflict", "the object has been modified"),
                status(503, "ServiceUnavailable", "apiserver is shutting down"),
            ] {
                let (_, body, send) = next(&mut h).await;
                sent.push(body["status"]["certificate"].as_str().unwrap().to_string());
                send.send_response(answer);
            }
            sent
        });
        let csr = |name: &str, uid: &str| {
            let mut c = csr_obj(name, "meshca.io/mesh", &pem, &["Approved"], None);
            c.metadata.uid = Some(uid.into());
            c
        };
        let with_cert = |mut c: CertificateSigningRequest, chain_b64: &str| {
            c.status.as_mut().unwrap().certificate = Some(k8s_openapi::ByteString(
                base64::engine::general_purpose::STANDARD
                    .decode(chain_b64)
                    .unwrap(),
            ));
            c
        };
        // 503: in doubt. The retry sends the same certificate and loses the race to it.
        assert!(s.reconcile(&csr("c1", "u1")).await.is_err());
        s.reconcile(&csr("c1", "u1")).await.unwrap();
        // Another CSR, in doubt too.
        assert!(s.reconcile(&csr("c2", "u2")).await.is_err());
        let sent = server.await.unwrap();
        assert_eq!(
            sent[0], sent[1],
            "the certificate in doubt is sent again, not re-signed"
        );
        assert_ne!(sent[0], sent[2]);
        // c1 shows the certificate in doubt: delivered, recorded. c2 shows another writer's.
        s.reconcile(&with_cert(csr("c1", "u1"), &sent[0]))
            .await
            .unwrap();
        s.reconcile(&with_cert(csr("c2", "u2"), &sent[0]))
            .await
            .unwrap();
        assert!(s.in_doubt.is_empty());
        let serial = |b: &str| {
            let pem = base64::engine::general_purpose::STANDARD.decode(b).unwrap();
            let der = crate::pemutil::parse_certs(&pem, "c").unwrap().remove(0);
            crate::x509::CertInfo::from_der(&der).unwrap().serial_hex()
        };
        drop(s);
        super::super::ledger::flush(task, Duration::from_secs(10)).await;
        let got = rec.0.lock().unwrap().clone();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].object, "csr/c1");
        assert_eq!(got[0].entry.serial, serial(&sent[0]));
    }

    /// The cache lags the signer's own write: a reconcile of the version it signed from (still
    /// without a certificate) writes nothing and signs nothing.
    #[tokio::test]
    async fn a_csr_signed_here_is_not_signed_again_from_a_stale_cached_version() {
        let (client, mut h) = mock_client();
        let s = signer_with(
            client,
            &[("mesh", issuer("mesh", Policy::default()))],
            SignerConfig::default(),
        );
        let pem = csr_pem(&["blue.app.svc"], KeyAlgorithm::EcdsaP256);
        let mut csr = csr_obj("c1", "meshca.io/mesh", &pem, &["Approved"], None);
        csr.metadata.uid = Some("u1".into());
        let server = tokio::spawn(async move {
            let (_, body, send) = next(&mut h).await;
            send.send_response(resp(200, &body));
            // No second request comes.
            let again = tokio::time::timeout(Duration::from_millis(300), next(&mut h)).await;
            assert!(again.is_err(), "a second status write was sent");
        });
        s.reconcile(&csr).await.unwrap();
        s.reconcile(&csr).await.unwrap();
        server.await.unwrap();
        assert_eq!(s.metrics.csrs_signed.get(), 1);
    }

    #[tokio::test]
    async fn one_served_signer_narrows_the_watch_with_a_field_selector() {
        let (client, mut h) = mock_client();
        let cfg = SignerConfig {
            only_signer: Some("meshca.io/mesh".into()),
            ..SignerConfig::default()
        };
        let s = Arc::new(signer_with(
            client,
            &[("mesh", issuer("mesh", Policy::default()))],
            cfg,
        ));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let ctl = tokio::spawn(s.clone().run(async move {
            let _ = stopped.await;
        }));
        let (req, _, send) = next(&mut h).await;
        assert_eq!(req.method(), "GET");
        let q = req.uri().query().unwrap_or("").to_string();
        assert!(
            q.contains("fieldSelector=spec.signerName%3Dmeshca.io%2Fmesh"),
            "{q}"
        );
        send.send_response(resp(
            200,
            &json!({
                "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequestList",
                "metadata": {"resourceVersion": "1"}, "items": [],
            }),
        ));
        let (req, _, _parked) = next(&mut h).await;
        assert!(req
            .uri()
            .query()
            .unwrap()
            .contains("fieldSelector=spec.signerName%3Dmeshca.io%2Fmesh"));
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), ctl)
            .await
            .expect("stops")
            .unwrap();
        // Without one named signer the watch is unfiltered.
        assert!(SignerConfig::default()
            .watcher_config()
            .field_selector
            .is_none());
    }

    #[tokio::test]
    async fn server_errors_are_retried_with_backoff() {
        let (client, mut h) = mock_client();
        let s = signer_with(
            client,
            &[("mesh", issuer("mesh", Policy::default()))],
            SignerConfig::default(),
        );
        let pem = csr_pem(&["blue.app.svc"], KeyAlgorithm::EcdsaP256);
        let csr = csr_obj("c1", "meshca.io/mesh", &pem, &["Approved"], None);
        let server = tokio::spawn(async move {
            let (_, _, send) = next(&mut h).await;
            send.send_response(status(500, "InternalError", "etcd timeout"));
        });
        let e = s.reconcile(&csr).await.unwrap_err();
        assert!(
            matches!(
                e,
                Error::Backend {
                    retryable: true,
                    ..
                }
            ),
            "{e}"
        );
        server.await.unwrap();
        let d1 = s.backoff("c1");
        let d2 = s.backoff("c1");
        assert!(
            d1 >= Duration::from_millis(250) && d1 <= Duration::from_millis(500),
            "{d1:?}"
        );
        assert!(
            d2 >= Duration::from_millis(500) && d2 <= Duration::from_millis(1000),
            "{d2:?}"
        );
    }

    #[tokio::test]
    async fn bad_csr_gets_a_failed_condition_keeping_existing_ones() {
        let (client, mut h) = mock_client();
        let s = signer_with(
            client,
            &[("mesh", issuer("mesh", Policy::default()))],
            SignerConfig::default(),
        );
        let csr = csr_obj("c1", "meshca.io/mesh", "garbage", &["Approved"], None);
        let server = tokio::spawn(async move {
            let (req, body, send) = next(&mut h).await;
            assert_eq!(
                req.uri().path(),
                "/apis/certificates.k8s.io/v1/certificatesigningrequests/c1/status"
            );
            let conds = body["status"]["conditions"].as_array().unwrap().clone();
            assert_eq!(conds.len(), 2);
            assert_eq!(conds[0]["type"], "Approved");
            assert_eq!(conds[1]["type"], "Failed");
            assert_eq!(conds[1]["status"], "True");
            assert_eq!(conds[1]["reason"], REASON_BAD_REQUEST);
            assert!(conds[1]["lastUpdateTime"].as_str().unwrap().ends_with('Z'));
            assert_eq!(body["metadata"]["resourceVersion"], "42");
            assert!(body["status"].get("certificate").is_none());
            send.send_response(resp(200, &json!({
                "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
                "metadata": {"name": "c1"}, "spec": {"request": "", "signerName": "meshca.io/mesh"},
            })));
        });
        s.reconcile(&csr).await.unwrap();
        server.await.unwrap();
        let text = s.metrics.render();
        assert!(
            text.contains("meshca_csrs_failed_total{reason=\"MeshcaBadRequest\"} 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn pending_denied_unknown_and_follower_make_no_requests() {
        let (client, mut h) = mock_client();
        let iss = issuer("mesh", Policy::default());
        let pem = csr_pem(&["blue.app.svc"], KeyAlgorithm::EcdsaP256);
        let s = signer_with(
            client.clone(),
            &[("mesh", iss.clone())],
            SignerConfig::default(),
        );
        for csr in [
            csr_obj("p", "meshca.io/mesh", &pem, &[], None),
            csr_obj("d", "meshca.io/mesh", &pem, &["Denied"], None),
            csr_obj("f", "meshca.io/mesh", &pem, &["Approved", "Failed"], None),
            csr_obj("u", "meshca.io/unknown", &pem, &["Approved"], None),
        ] {
            assert_eq!(s.reconcile(&csr).await.unwrap(), Action::await_change());
        }
        // A follower does not sign an approved CSR.
        let (tx, rx) = watch::channel(false);
        let follower = Signer::new(
            client,
            crate::kube::issuers::IssuerSet::watch_fixed(
                [("mesh".to_string(), iss)].into_iter().collect(),
            ),
            SignerConfig::default(),
            Arc::new(Metrics::new()),
            Arc::new(RateLimiter::new(0.0, 1)),
            rx,
            Arc::new(SystemClock),
        );
        follower
            .reconcile(&csr_obj("a", "meshca.io/mesh", &pem, &["Approved"], None))
            .await
            .unwrap();
        drop(tx);
        // No request reached the API.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), h.next_request())
                .await
                .is_err()
        );
    }
}
