//! Managed Secrets: the cert-manager-style flow without a CRD.
//!
//! A Secret labelled `meshca.io/managed: "true"` (the default watch selector) and annotated
//! with `meshca.io/ca: <ca>` plus `meshca.io/spiffe-id` and/or `meshca.io/dns-names`
//! (comma-separated), and optionally `meshca.io/ttl` (e.g. `24h`) and
//! `meshca.io/key-algorithm`, is filled with `tls.crt` (leaf + chain), `tls.key` and `ca.crt`
//! (the CA's root) by server-side apply with its own field manager (`meshca-managed`), carrying
//! the resourceVersion it decided on: a replica that lost leadership, or a decision made on a
//! stale copy, gets a 409 and cannot overwrite a newer key. The controller re-issues when the
//! annotations no longer match the certificate, when the certificate was not issued by the
//! CA's current key (its authority key identifier is not the CA's subject key identifier), and
//! at 2/3 of its lifetime.
//!
//! **A refused or failed renewal never touches the credential.** The reason goes into the
//! `meshca.io/error` annotation (a JSON merge patch of that one annotation, field manager
//! `meshca-managed-error`, which cannot drop `tls.crt`/`tls.key`/`ca.crt`), a Warning Event on
//! the Secret (`IssuanceRefused` when retrying cannot help, `IssuanceFailed` when it will be
//! retried) and `meshca_managed_secrets_failed_total`. A terminal refusal is recorded once per
//! request and CA; a retryable failure is retried with per-Secret exponential backoff with
//! jitter (0.5 s doubling to 5 min). The annotation is removed after the next successful
//! issuance. The key is generated in the controller and never logged.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerConfig};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::Resource as _;
use serde_json::json;
use time::OffsetDateTime;
use tokio::sync::watch;

use super::backoff::Backoff;
use super::issuers::{self, IssuerWatch};
use super::ledger::{IssuedRecord, LedgerSink};
use super::metrics::{CertSeries, Metrics};
use super::ratelimit::RateLimiter;
use super::{FIELD_MANAGER_ERROR, FIELD_MANAGER_MANAGED};
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::identity::{DnsName, Sans, SpiffeId};
use crate::issue::{issue_csr, CsrOptions, LedgerEntry};
use crate::key::KeyAlgorithm;
use crate::key::PrivateKey;
use crate::policy::{FrontEnd, Requester};
use crate::x509::CertInfo;

/// Annotation naming the CA.
pub const ANN_CA: &str = "meshca.io/ca";
/// Annotation with the SPIFFE ID.
pub const ANN_SPIFFE_ID: &str = "meshca.io/spiffe-id";
/// Annotation with comma-separated DNS names.
pub const ANN_DNS_NAMES: &str = "meshca.io/dns-names";
/// Annotation with the TTL (humantime, e.g. `24h`).
pub const ANN_TTL: &str = "meshca.io/ttl";
/// Annotation with the key algorithm (default `ecdsa-p256`).
pub const ANN_KEY_ALGORITHM: &str = "meshca.io/key-algorithm";
/// Annotation meshca sets when it cannot issue.
pub const ANN_ERROR: &str = "meshca.io/error";
/// Label that opts a Secret in to management.
pub const LABEL_MANAGED: &str = "meshca.io/managed";
/// The default label selector of the managed-Secret watch.
pub const DEFAULT_SELECTOR: &str = "meshca.io/managed=true";
/// Event reason: issuance refused, retrying cannot help (policy, bad annotations, a terminal
/// backend error).
pub const EVENT_REFUSED: &str = "IssuanceRefused";
/// Event reason: issuance failed and will be retried with backoff.
pub const EVENT_FAILED: &str = "IssuanceFailed";

/// What a managed Secret asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManagedRequest {
    /// The CA.
    pub ca: String,
    /// SANs.
    pub sans: Sans,
    /// TTL (`None`: the policy default).
    pub ttl: Option<Duration>,
    /// Key algorithm.
    pub key: KeyAlgorithm,
}

/// Parses the annotations. `None` when the Secret is not managed (no `meshca.io/ca`).
pub fn parse_annotations(ann: &BTreeMap<String, String>) -> Option<Result<ManagedRequest>> {
    let ca = ann.get(ANN_CA)?.trim().to_string();
    Some((|| {
        let spiffe_id = ann
            .get(ANN_SPIFFE_ID)
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(SpiffeId::parse)
            .transpose()?;
        let dns = ann
            .get(ANN_DNS_NAMES)
            .map(|s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
                    .map(DnsName::parse)
                    .collect::<Result<Vec<_>>>()
            })
            .transpose()?
            .unwrap_or_default();
        let mut sans = Sans {
            spiffe_id,
            dns,
            ips: Vec::new(),
        };
        sans.dedup();
        if sans.is_empty() {
            return Err(Error::invalid(
                "managed Secret",
                format!("set {ANN_SPIFFE_ID} and/or {ANN_DNS_NAMES}"),
            ));
        }
        let ttl = ann
            .get(ANN_TTL)
            .map(|t| {
                humantime::parse_duration(t.trim())
                    .map_err(|e| Error::invalid("managed Secret", format!("{ANN_TTL} {t:?}: {e}")))
            })
            .transpose()?;
        let key = ann
            .get(ANN_KEY_ALGORITHM)
            .map(|k| k.parse())
            .transpose()?
            .unwrap_or_default();
        Ok(ManagedRequest { ca, sans, ttl, key })
    })())
}

/// What a managed Secret's certificate shows: its notAfter, when it must be replaced, and
/// whether it is ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CertStatus {
    /// notAfter of the leaf in `tls.crt` (`None`: missing or unreadable).
    pub not_after: Option<OffsetDateTime>,
    /// When it must be replaced (see [`renewal_time`]).
    pub renew_at: OffsetDateTime,
    /// The certificate is for what the Secret asks for, from the CA's current key, and not
    /// expired (cert-manager's Ready condition: a renewal that is merely due stays ready).
    pub ready: bool,
}

/// The pure decision behind [`renewal_time`] and the managed-Secret metrics. `req` `None`:
/// the annotations do not parse, so nothing can match.
pub fn cert_status(
    tls_crt: Option<&[u8]>,
    req: Option<&ManagedRequest>,
    ca_ski: Option<&str>,
    now: OffsetDateTime,
) -> CertStatus {
    let info = tls_crt
        .and_then(|crt| crate::pemutil::parse_certs(crt, "tls.crt").ok())
        .and_then(|certs| certs.first().and_then(|leaf| CertInfo::from_der(leaf).ok()));
    let due_now = CertStatus {
        not_after: info.as_ref().map(|i| i.not_after),
        renew_at: now,
        ready: false,
    };
    let (Some(info), Some(req)) = (info, req) else {
        return due_now;
    };
    let want_uri: Vec<String> = req.sans.spiffe_id.iter().map(|s| s.to_string()).collect();
    let mut want_dns: Vec<String> = req
        .sans
        .dns
        .iter()
        .map(|d| d.as_str().to_ascii_lowercase())
        .collect();
    let mut have_dns: Vec<String> = info
        .sans
        .dns
        .iter()
        .map(|d| d.to_ascii_lowercase())
        .collect();
    want_dns.sort();
    have_dns.sort();
    if info.sans.uri != want_uri
        || have_dns != want_dns
        || ca_ski.is_some_and(|ski| info.authority_key_id.as_deref() != Some(ski))
    {
        return due_now;
    }
    // meshca backdates notBefore for clock skew; the lifetime that matters starts at issuance
    // (otherwise a short TTL would always look due and be re-issued in a loop).
    let start = (info.not_before + crate::profile::BACKDATE).min(info.not_after);
    CertStatus {
        not_after: Some(info.not_after),
        renew_at: start + (info.not_after - start) * 2 / 3,
        ready: info.not_after > now,
    }
}

/// When the Secret's current certificate must be replaced: `now` when it is missing, unreadable,
/// for other SANs, or not issued by the CA's current key (`ca_ski`, the CA's subject key
/// identifier, compared with the leaf's authority key identifier: a CA re-created under the
/// same name keeps its DN but not its key); else at 2/3 of its lifetime (which may be in the
/// past: the caller renews when the result is not after `now`).
pub fn renewal_time(
    tls_crt: Option<&[u8]>,
    req: &ManagedRequest,
    ca_ski: Option<&str>,
    now: OffsetDateTime,
) -> OffsetDateTime {
    cert_status(tls_crt, Some(req), ca_ski, now).renew_at
}

/// The apply body for a managed Secret. With `resource_version` the apply is conditional: the
/// API server answers 409 when the Secret changed since it was read.
pub fn apply_body(
    name: &str,
    namespace: &str,
    tls_crt: &str,
    tls_key: &str,
    ca_crt: &str,
    resource_version: Option<&str>,
) -> serde_json::Value {
    let b = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    let mut body = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": { "name": name, "namespace": namespace },
        "data": { "tls.crt": b(tls_crt), "tls.key": b(tls_key), "ca.crt": b(ca_crt) },
    });
    if let Some(rv) = resource_version {
        body["metadata"]["resourceVersion"] = json!(rv);
    }
    body
}

/// A digest of what a Secret asks for (its meshca annotations, the error annotation aside)
/// and of the CA that would serve it: a terminal refusal is recorded once per value.
fn request_fingerprint(ann: &BTreeMap<String, String>, ca_fingerprint: Option<&str>) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for (k, v) in ann
        .iter()
        .filter(|(k, _)| k.starts_with("meshca.io/") && k.as_str() != ANN_ERROR)
    {
        ctx.update(&(k.len() as u64).to_be_bytes());
        ctx.update(k.as_bytes());
        ctx.update(&(v.len() as u64).to_be_bytes());
        ctx.update(v.as_bytes());
    }
    ctx.update(ca_fingerprint.unwrap_or("").as_bytes());
    crate::pemutil::hex(ctx.finish().as_ref())
}

/// The managed-Secret controller's context.
pub struct Managed {
    client: kube::Client,
    issuers: IssuerWatch,
    metrics: Arc<Metrics>,
    limiter: Arc<RateLimiter>,
    leader: watch::Receiver<bool>,
    clock: Arc<dyn Clock>,
    backoff: Backoff,
    /// Per Secret (`ns/name`): no new attempt before this instant (a retryable failure's
    /// backoff holds even when a watch event arrives earlier).
    not_before: Mutex<HashMap<String, Instant>>,
    /// Per Secret: the request fingerprint last refused terminally.
    refused: Mutex<HashMap<String, String>>,
    recorder: Option<Recorder>,
    ledger: Option<LedgerSink>,
    /// Per Secret: the key and CSR of an issuance that failed with a retryable error.
    pending: Mutex<HashMap<String, Pending>>,
}

/// The key and CSR of a Secret's issuance that failed with a retryable error. The retry
/// presents the same CSR for the same request, so a backend that deduplicates by request (ACM
/// PCA's idempotency token is derived from the CSR) does not issue, and bill, a second
/// certificate. Kept in memory only; `Debug` of the key is redacted.
#[derive(Debug)]
struct Pending {
    fingerprint: String,
    key: PrivateKey,
    csr_der: Vec<u8>,
}

impl std::fmt::Debug for Managed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Managed")
            .field("cas", &self.issuers.borrow().names())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn secret_key(s: &Secret) -> String {
    format!(
        "{}/{}",
        s.metadata.namespace.as_deref().unwrap_or_default(),
        s.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Longest wait between checks of a healthy Secret.
const MAX_RECHECK: Duration = Duration::from_secs(6 * 3600);

impl Managed {
    /// A controller context over the CAs `issuers` shows.
    pub fn new(
        client: kube::Client,
        issuers: IssuerWatch,
        metrics: Arc<Metrics>,
        limiter: Arc<RateLimiter>,
        leader: watch::Receiver<bool>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Managed {
            client,
            issuers,
            metrics,
            limiter,
            leader,
            clock,
            backoff: Backoff::new(),
            not_before: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
            recorder: None,
            ledger: None,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Publishes a Warning Event on the Secret for each refused or failed issuance.
    pub fn with_events(mut self, reporter: Reporter) -> Self {
        self.recorder = Some(Recorder::new(self.client.clone(), reporter));
        self
    }

    /// Records every certificate issued into `ledger`.
    pub fn with_ledger(mut self, ledger: LedgerSink) -> Self {
        self.ledger = Some(ledger);
        self
    }

    fn api(&self, ns: &str) -> Api<Secret> {
        Api::namespaced(self.client.clone(), ns)
    }

    /// Sets or clears (`None`) the error annotation with a merge patch of that one key.
    async fn set_error_annotation(&self, s: &Secret, message: Option<&str>) -> Result<()> {
        let (ns, name) = (
            s.metadata.namespace.as_deref().unwrap_or_default(),
            s.metadata.name.as_deref().unwrap_or_default(),
        );
        let patch = json!({ "metadata": { "annotations": { ANN_ERROR: message } } });
        self.limiter.acquire().await;
        let pp = PatchParams {
            field_manager: Some(FIELD_MANAGER_ERROR.into()),
            ..Default::default()
        };
        self.api(ns)
            .patch(name, &pp, &Patch::Merge(&patch))
            .await
            .map(|_| ())
            .map_err(|e| super::kube_err("annotating a managed Secret", e))
    }

    /// Records a refused (`retrying` false) or failed issuance: annotation (when it changes),
    /// Event and metric. The Secret's data is never part of the write.
    async fn report(&self, s: &Secret, message: &str, retrying: bool) -> Result<()> {
        self.metrics.managed_failed.inc();
        let key = secret_key(s);
        let text = if retrying {
            format!("{message} (will retry; the current certificate is kept)")
        } else {
            message.to_string()
        };
        tracing::warn!(secret = %key, error = message, retrying, "managed Secret not issued");
        let current = s
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANN_ERROR));
        if current.map(String::as_str) != Some(text.as_str()) {
            self.set_error_annotation(s, Some(&text)).await?;
        }
        if let Some(r) = &self.recorder {
            let ev = Event {
                type_: EventType::Warning,
                reason: if retrying {
                    EVENT_FAILED
                } else {
                    EVENT_REFUSED
                }
                .into(),
                note: Some(super::signer::truncate(&text, 1000)),
                action: "Issue".into(),
                secondary: None,
            };
            if let Err(e) = r.publish(&ev, &s.object_ref(&())).await {
                tracing::warn!(secret = %key, error = %e, "could not publish an Event");
            }
        }
        Ok(())
    }

    /// A terminal refusal: reported once for this request and CA.
    async fn refuse(&self, s: &Secret, fingerprint: String, message: &str) -> Result<Action> {
        let key = secret_key(s);
        self.report(s, message, false).await?;
        lock(&self.refused).insert(key, fingerprint);
        Ok(Action::await_change())
    }

    /// Reconciles one Secret.
    pub async fn reconcile(&self, s: &Secret) -> Result<Action> {
        let empty = BTreeMap::new();
        let ann = s.metadata.annotations.as_ref().unwrap_or(&empty);
        let key = secret_key(s);
        let parsed = parse_annotations(ann);
        if parsed.is_none() {
            self.forget(s);
            return Ok(Action::await_change());
        }
        if !*self.leader.borrow() {
            return Ok(Action::await_change());
        }
        // One snapshot of the CAs for the whole decision.
        let snapshot = self.issuers.borrow().clone();
        let crt = s
            .data
            .as_ref()
            .and_then(|d| d.get("tls.crt"))
            .map(|b| b.0.as_slice());
        let req = match parsed {
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                let ca = ann.get(ANN_CA).map(|c| c.trim()).unwrap_or_default();
                if snapshot.contains(ca) {
                    self.record(s, ca, cert_status(crt, None, None, self.clock.now()));
                } else {
                    self.forget(s);
                }
                let fp = request_fingerprint(ann, None);
                if lock(&self.refused).get(&key) == Some(&fp) {
                    return Ok(Action::await_change());
                }
                return self.refuse(s, fp, &e.to_string()).await;
            }
            None => return Ok(Action::await_change()),
        };
        let Some(issuer) = snapshot.get(&req.ca).cloned() else {
            // Another meshca signer may serve it.
            self.forget(s);
            return Ok(Action::await_change());
        };
        if let Some(until) = lock(&self.not_before).get(&key).copied() {
            let now = Instant::now();
            if until > now {
                return Ok(Action::requeue(until - now));
            }
        }
        let now = self.clock.now();
        let ca_ski = issuer
            .ca_certificate()
            .and_then(|c| CertInfo::from_der(c).ok())
            .and_then(|i| i.subject_key_id);
        let status = cert_status(crt, Some(&req), ca_ski.as_deref(), now);
        self.record(s, &req.ca, status);
        let due = status.renew_at;
        // `ca.crt`: the CA's anchors, both roots while a rotation overlaps.
        let want_ca_crt = snapshot.anchors_pem(&req.ca).map(str::to_string);
        if due > now {
            if let Some(want) = &want_ca_crt {
                self.refresh_ca_crt(s, want).await?;
            }
            if ann.contains_key(ANN_ERROR) {
                // The request is satisfied again (e.g. the annotations were reverted).
                self.set_error_annotation(s, None).await?;
            }
            let wait = Duration::try_from(due - now)
                .unwrap_or(MAX_RECHECK)
                .min(MAX_RECHECK);
            return Ok(Action::requeue(wait));
        }
        let fp = request_fingerprint(ann, snapshot.fingerprint(&req.ca));
        if lock(&self.refused).get(&key) == Some(&fp) {
            return Ok(Action::await_change());
        }
        // The key and CSR of a retried request are reused (see `Pending`).
        let reuse = lock(&self.pending)
            .remove(&key)
            .filter(|p| p.fingerprint == fp);
        let (wkey, csr_der) = match reuse {
            Some(p) => (p.key, p.csr_der),
            None => {
                let k = req.key.generate()?;
                let csr = crate::issue::local::csr_for(&k, &req.sans, &issuer.meta().trust_domain)?;
                (k, csr)
            }
        };
        // The requester is the Secret's namespace, never the identity it asks for.
        let opts = CsrOptions {
            via: FrontEnd::ManagedSecret,
            requester: Requester::SecretNamespace(s.metadata.namespace.clone().unwrap_or_default()),
            override_sans: Some(req.sans.clone()),
            ttl: req.ttl,
            kube_usages: None,
        };
        let cert = match issue_csr(issuer.as_ref(), &csr_der, &opts, now).await {
            Ok(c) => c,
            Err(e) if !super::retryable(&e) => return self.refuse(s, fp, &e.to_string()).await,
            Err(e) => {
                lock(&self.pending).insert(
                    key.clone(),
                    Pending {
                        fingerprint: fp,
                        key: wkey,
                        csr_der,
                    },
                );
                if let Err(e2) = self.report(s, &e.to_string(), true).await {
                    tracing::warn!(secret = %key, error = %e2, "could not record the failure");
                }
                return Err(e);
            }
        };
        let w = crate::issue::Workload { key: wkey, cert };
        let (ns, name) = (
            s.metadata.namespace.as_deref().unwrap_or_default(),
            s.metadata.name.as_deref().unwrap_or_default(),
        );
        let pem_key = w.key.to_pkcs8_pem();
        let body = apply_body(
            name,
            ns,
            &w.cert.chain_pem(),
            &pem_key,
            &want_ca_crt.unwrap_or_else(|| crate::pemutil::certs_to_pem([&w.cert.root])),
            s.metadata.resource_version.as_deref(),
        );
        // Fencing: leadership may have been lost while issuing.
        if !*self.leader.borrow() {
            return Ok(Action::await_change());
        }
        self.limiter.acquire().await;
        let applied = self
            .api(ns)
            .patch(
                name,
                &PatchParams::apply(FIELD_MANAGER_MANAGED).force(),
                &Patch::Apply(&body),
            )
            .await;
        match applied {
            Ok(_) => {}
            Err(e) if super::api_code(&e) == Some(409) => {
                // The Secret changed since it was read (another replica, a user): the newer
                // version arrives as a watch event and is decided on afresh.
                tracing::info!(secret = %key, error = %e, "managed Secret changed under us; not overwritten");
                return Ok(Action::await_change());
            }
            Err(e) => return Err(super::kube_err("applying a managed Secret", e)),
        }
        self.metrics.managed_issued.inc();
        self.backoff.reset(&key);
        lock(&self.not_before).remove(&key);
        lock(&self.refused).remove(&key);
        tracing::info!(secret = %key, ca = %req.ca, serial = %w.cert.info.serial_hex(), not_after = %w.cert.info.not_after, "issued managed Secret");
        if let Some(l) = &self.ledger {
            l.record(IssuedRecord {
                entry: LedgerEntry::for_cert(&req.ca, &w.cert, now),
                requester: format!("namespace:{ns}"),
                object: format!("secret/{key}"),
            })
            .await;
        }
        if ann.contains_key(ANN_ERROR) {
            if let Err(e) = self.set_error_annotation(s, None).await {
                tracing::warn!(secret = %key, error = %e, "could not remove the error annotation");
            }
        }
        let issued = cert_status(
            Some(w.cert.chain_pem().as_bytes()),
            Some(&req),
            ca_ski.as_deref(),
            now,
        );
        self.record(s, &req.ca, issued);
        Ok(Action::requeue(
            Duration::try_from(issued.renew_at - now)
                .unwrap_or(MAX_RECHECK)
                .clamp(Duration::from_secs(1), MAX_RECHECK),
        ))
    }

    /// Shows `status` in the metrics as Secret `s`'s certificate from CA `ca`.
    fn record(&self, s: &Secret, ca: &str, status: CertStatus) {
        self.metrics.managed_certs.set(
            s.metadata.namespace.as_deref().unwrap_or_default(),
            s.metadata.name.as_deref().unwrap_or_default(),
            CertSeries {
                ca: ca.to_string(),
                not_after: status.not_after.map(OffsetDateTime::unix_timestamp),
                renewal: status.renew_at.unix_timestamp(),
                ready: status.ready,
            },
            self.clock.now().unix_timestamp(),
        );
    }

    /// Removes Secret `s` from the metrics (not managed, or not by this signer).
    fn forget(&self, s: &Secret) {
        self.metrics.managed_certs.remove(
            s.metadata.namespace.as_deref().unwrap_or_default(),
            s.metadata.name.as_deref().unwrap_or_default(),
        );
    }

    /// Re-applies a valid credential with `ca.crt` set to `want` when it differs (a rotation
    /// added or pruned a root): `tls.crt` and `tls.key` stay byte for byte, and the Secret's
    /// resourceVersion is the precondition (a 409 means a newer Secret, decided afresh).
    async fn refresh_ca_crt(&self, s: &Secret, want: &str) -> Result<()> {
        let data = s.data.as_ref();
        let get = |k: &str| data.and_then(|d| d.get(k)).map(|b| b.0.as_slice());
        if get("ca.crt") == Some(want.as_bytes()) {
            return Ok(());
        }
        let (Some(crt), Some(key)) = (
            get("tls.crt").and_then(|b| std::str::from_utf8(b).ok()),
            get("tls.key").and_then(|b| std::str::from_utf8(b).ok()),
        ) else {
            return Ok(());
        };
        if !*self.leader.borrow() {
            return Ok(());
        }
        let (ns, name) = (
            s.metadata.namespace.as_deref().unwrap_or_default(),
            s.metadata.name.as_deref().unwrap_or_default(),
        );
        let body = apply_body(
            name,
            ns,
            crt,
            key,
            want,
            s.metadata.resource_version.as_deref(),
        );
        self.limiter.acquire().await;
        match self
            .api(ns)
            .patch(
                name,
                &PatchParams::apply(FIELD_MANAGER_MANAGED).force(),
                &Patch::Apply(&body),
            )
            .await
        {
            Ok(_) => {
                tracing::info!(secret = %secret_key(s), "managed Secret ca.crt updated (trust anchors changed)");
                Ok(())
            }
            Err(e) if super::api_code(&e) == Some(409) => Ok(()),
            Err(e) => Err(super::kube_err("updating a managed Secret's ca.crt", e)),
        }
    }

    /// The wait after a retryable failure of `s`: exponential per Secret, with jitter. No new
    /// attempt is made before it ends, whatever triggers the next reconcile.
    pub fn retry_after(&self, s: &Secret) -> Duration {
        let key = secret_key(s);
        let d = self.backoff.next(&key);
        lock(&self.not_before).insert(key, Instant::now() + d);
        d
    }

    /// Runs a controller over the Secrets of `namespace` (all namespaces when `None`),
    /// reporting whether it has listed as [`controller_name`] ([`super::health`]),
    /// narrowed by a label selector (see [`DEFAULT_SELECTOR`]), until `shutdown`. Every Secret
    /// is looked at again when the served CAs change.
    pub async fn run(
        self: Arc<Self>,
        namespace: Option<String>,
        label_selector: Option<String>,
        shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    ) {
        let api: Api<Secret> = match &namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        };
        let mut wc = watcher::Config::default();
        if let Some(sel) = label_selector {
            wc = wc.labels(&sel);
        }
        let name = controller_name(namespace.as_deref());
        let controller = super::relist::controller(api, wc, ())
            .with_config(ControllerConfig::default().concurrency(8))
            .reconcile_all_on(issuers::changes(self.issuers.clone()));
        // A Secret deleted (or unlabelled) leaves this cache: its series go with it.
        self.metrics
            .managed_certs
            .watch_store(namespace.clone(), controller.store());
        let health = &self.metrics.controllers;
        super::health::run_controller(&name, health, controller, shutdown, |c| {
            c.run(
                |s, ctx: Arc<Managed>| async move { ctx.reconcile(&s).await },
                |s, err, ctx: Arc<Managed>| {
                    let d = ctx.retry_after(&s);
                    tracing::warn!(secret = %secret_key(&s), error = %err, retry_in = ?d, "managed Secret reconcile failed; retrying");
                    Action::requeue(d)
                },
                self.clone(),
            )
        })
        .await;
    }
}

/// The managed-Secret controller's name in `/readyz` and `meshca_controller_ready`:
/// `managed:<namespace>`, or `managed:*` for all namespaces.
pub fn controller_name(namespace: Option<&str>) -> String {
    format!("managed:{}", namespace.unwrap_or("*"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::issue::issue_workload;
    use crate::kube::signer::tests::local;
    use crate::kube::testutil::{json as resp, mock_client, next, status};
    use crate::policy::Policy;

    /// A CA serving managed Secrets in namespace `app`, any service name there.
    fn serves_app() -> Policy {
        Policy {
            managed_namespaces: vec!["app".into()],
            allowed_dns: vec!["*.{ns}.svc".into(), "*.app.svc".into()],
            ..Policy::default()
        }
    }

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn annotations_parse_and_errors_are_readable() {
        assert!(parse_annotations(&ann(&[("other", "x")])).is_none());
        let r = parse_annotations(&ann(&[
            (ANN_CA, "mesh"),
            (ANN_SPIFFE_ID, "spiffe://cluster.local/ns/a/sa/b"),
            (ANN_DNS_NAMES, "b.a.svc, b.a.svc.cluster.local"),
            (ANN_TTL, "2h"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(r.ca, "mesh");
        assert_eq!(r.sans.dns.len(), 2);
        assert_eq!(r.ttl, Some(Duration::from_secs(7200)));
        let e = parse_annotations(&ann(&[(ANN_CA, "mesh")]))
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(e.contains(ANN_SPIFFE_ID), "{e}");
        let e = parse_annotations(&ann(&[
            (ANN_CA, "mesh"),
            (ANN_DNS_NAMES, "a.b"),
            (ANN_TTL, "soon"),
        ]))
        .unwrap()
        .unwrap_err()
        .to_string();
        assert!(e.contains("meshca.io/ttl"), "{e}");
    }

    fn managed(client: kube::Client, iss: Arc<dyn crate::issue::Issuer>) -> Managed {
        Managed::new(
            client,
            issuers::IssuerSet::watch_fixed([("mesh".to_string(), iss)].into_iter().collect()),
            Arc::new(Metrics::new()),
            Arc::new(RateLimiter::new(0.0, 1)),
            crate::kube::leader::always_leader(),
            Arc::new(crate::clock::SystemClock),
        )
    }

    /// What a Secret asking `mesh` for web.app.svc asks for, and a certificate `iss` issued
    /// for it at `now`.
    async fn web_app_svc(
        iss: &dyn crate::issue::Issuer,
        now: OffsetDateTime,
    ) -> (ManagedRequest, crate::issue::Workload) {
        let req = parse_annotations(&ann(&[(ANN_CA, "mesh"), (ANN_DNS_NAMES, "web.app.svc")]))
            .unwrap()
            .unwrap();
        let w = issue_workload(iss, &req.sans, None, req.key, now)
            .await
            .unwrap();
        (req, w)
    }

    fn ski(iss: &crate::issue::LocalIssuer) -> String {
        iss.ca().info().unwrap().subject_key_id.unwrap()
    }

    #[tokio::test]
    async fn fills_then_renews_at_two_thirds() {
        let iss = local("mesh", serves_app());
        let ca_ski = ski(&iss);
        let req = parse_annotations(&ann(&[
            (ANN_CA, "mesh"),
            (ANN_DNS_NAMES, "web.app.svc"),
            (ANN_TTL, "3h"),
        ]))
        .unwrap()
        .unwrap();
        let now = OffsetDateTime::now_utc();
        assert_eq!(
            renewal_time(None, &req, Some(&ca_ski), now),
            now,
            "empty Secret: issue now"
        );
        let w = issue_workload(iss.as_ref(), &req.sans, req.ttl, req.key, now)
            .await
            .unwrap();
        let pem = w.cert.chain_pem();
        let at = renewal_time(Some(pem.as_bytes()), &req, Some(&ca_ski), now);
        let info = &w.cert.info;
        let issued = info.not_before + crate::profile::BACKDATE;
        let expected = issued + (info.not_after - issued) * 2 / 3;
        assert_eq!(at, expected);
        assert!(
            (at - now - time::Duration::hours(2)).abs() < time::Duration::seconds(2),
            "2/3 of 3 h: {at}"
        );
        // A 30 s certificate is renewed 20 s after issuance, not at once (backdating ignored).
        let short = parse_annotations(&ann(&[
            (ANN_CA, "mesh"),
            (ANN_DNS_NAMES, "web.app.svc"),
            (ANN_TTL, "30s"),
        ]))
        .unwrap()
        .unwrap();
        let ws = issue_workload(iss.as_ref(), &short.sans, short.ttl, short.key, now)
            .await
            .unwrap();
        let at_short = renewal_time(
            Some(ws.cert.chain_pem().as_bytes()),
            &short,
            Some(&ca_ski),
            now,
        );
        assert_eq!(
            at_short,
            now.replace_nanosecond(0).unwrap() + time::Duration::seconds(20)
        );
        // Past 2/3: due now.
        let later = at + time::Duration::seconds(1);
        assert!(renewal_time(Some(pem.as_bytes()), &req, Some(&ca_ski), later) <= later);
        // Annotations changed: due now.
        let other = parse_annotations(&ann(&[(ANN_CA, "mesh"), (ANN_DNS_NAMES, "api.app.svc")]))
            .unwrap()
            .unwrap();
        assert_eq!(
            renewal_time(Some(pem.as_bytes()), &other, Some(&ca_ski), now),
            now
        );
    }

    #[tokio::test]
    async fn a_ca_recreated_with_the_same_name_triggers_renewal() {
        // Same name, so the same DN; a new key, so a new SKI. The old leaf's issuer DN still
        // matches the new CA's subject: only the key identifiers tell them apart.
        let old = local("mesh", serves_app());
        let new = local("mesh", serves_app());
        assert_eq!(
            old.ca().info().unwrap().subject,
            new.ca().info().unwrap().subject
        );
        let req = parse_annotations(&ann(&[(ANN_CA, "mesh"), (ANN_DNS_NAMES, "web.app.svc")]))
            .unwrap()
            .unwrap();
        let now = OffsetDateTime::now_utc();
        let w = issue_workload(old.as_ref(), &req.sans, req.ttl, req.key, now)
            .await
            .unwrap();
        let pem = w.cert.chain_pem();
        assert_eq!(w.cert.info.issuer, new.ca().info().unwrap().subject);
        assert!(renewal_time(Some(pem.as_bytes()), &req, Some(&ski(&old)), now) > now);
        assert_eq!(
            renewal_time(Some(pem.as_bytes()), &req, Some(&ski(&new)), now),
            now,
            "issued by the old key: renew now"
        );
    }

    #[tokio::test]
    async fn reconcile_applies_tls_keys_with_its_own_field_manager_and_a_precondition() {
        let (client, mut h) = mock_client();
        let iss = local("mesh", serves_app());
        let root = iss.ca().root().clone();
        let m = managed(client, iss);
        let s: Secret = serde_json::from_value(json!({
            "metadata": {"name": "web-tls", "namespace": "app", "resourceVersion": "7",
                         "annotations": {ANN_CA: "mesh", ANN_DNS_NAMES: "web.app.svc"}},
        }))
        .unwrap();
        let server = tokio::spawn(async move {
            let (req, body, send) = next(&mut h).await;
            assert_eq!(req.method(), "PATCH");
            assert_eq!(req.uri().path(), "/api/v1/namespaces/app/secrets/web-tls");
            assert_eq!(
                req.headers()["content-type"],
                "application/apply-patch+yaml"
            );
            let q = req.uri().query().unwrap();
            assert!(
                q.contains("fieldManager=meshca-managed&")
                    || q.ends_with("fieldManager=meshca-managed"),
                "{q}"
            );
            assert!(q.contains("force=true"), "{q}");
            assert_eq!(
                body["metadata"]["resourceVersion"], "7",
                "conditional on the version decided on"
            );
            send.send_response(resp(200, &body));
            body
        });
        let action = m.reconcile(&s).await.unwrap();
        let body = server.await.unwrap();
        let d = |k: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(body["data"][k].as_str().unwrap())
                .unwrap()
        };
        let chain = crate::pemutil::parse_certs(&d("tls.crt"), "tls.crt").unwrap();
        let anchors = crate::pemutil::parse_certs(&d("ca.crt"), "ca.crt").unwrap();
        assert_eq!(anchors, vec![root.clone()]);
        crate::x509::verify_chain(
            &chain[0],
            &chain[1..],
            &[root],
            OffsetDateTime::now_utc(),
            crate::x509::Usage::Server,
        )
        .unwrap();
        let key = crate::key::PrivateKey::from_pem(
            std::str::from_utf8(&d("tls.key")).unwrap(),
            "tls.key",
        )
        .unwrap();
        assert_eq!(
            key.public_key_der(),
            crate::x509::CertInfo::from_der(&chain[0]).unwrap().spki_der
        );
        // Next look: at 2/3 of the 24 h default lifetime, about 16 h away (capped at 6 h).
        assert_eq!(action, Action::requeue(MAX_RECHECK));
        assert_eq!(m.metrics.managed_issued.get(), 1);
        // The metrics show the new certificate: its notAfter, renewal at 2/3, ready.
        let info = crate::x509::CertInfo::from_der(&chain[0]).unwrap();
        let series = m.metrics.managed_certs.get("app", "web-tls").unwrap();
        assert_eq!(series.ca, "mesh");
        assert_eq!(series.not_after, Some(info.not_after.unix_timestamp()));
        let issued = info.not_before + crate::profile::BACKDATE;
        let due: OffsetDateTime = issued + (info.not_after - issued) * 2 / 3;
        assert_eq!(series.renewal, due.unix_timestamp());
        assert!(series.ready);
        let text = m.metrics.render();
        let labels = "namespace=\"app\",name=\"web-tls\",ca=\"mesh\"";
        for line in [
            format!(
                "meshca_managed_secret_expiration_timestamp_seconds{{{labels}}} {}",
                info.not_after.unix_timestamp()
            ),
            format!(
                "meshca_managed_secret_renewal_timestamp_seconds{{{labels}}} {}",
                due.unix_timestamp()
            ),
            format!("meshca_managed_secret_ready_status{{{labels},condition=\"True\"}} 1"),
            format!("meshca_managed_secret_ready_status{{{labels},condition=\"False\"}} 0"),
        ] {
            assert!(text.contains(&line), "{line} not in {text}");
        }
    }

    /// Issue 19: the series of a managed Secret that is deleted, stops being managed, or moves
    /// to a CA this signer does not serve must go (no stale series), and all of them when the
    /// replica stops leading.
    #[tokio::test]
    async fn managed_secret_series_leave_with_the_secret() {
        let (client, _h) = mock_client();
        let iss = local("mesh", serves_app());
        let now = OffsetDateTime::now_utc();
        let (_, w) = web_app_svc(iss.as_ref(), now).await;
        let b = |t: &str| base64::engine::general_purpose::STANDARD.encode(t);
        let secret = |name: &str, annotations: serde_json::Value| -> Secret {
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "app", "annotations": annotations},
                "data": {"tls.crt": b(&w.cert.chain_pem()), "tls.key": b(&w.key.to_pkcs8_pem()),
                         "ca.crt": b(&crate::pemutil::certs_to_pem([&w.cert.root]))},
            }))
            .unwrap()
        };
        let m = managed(client, iss);
        let ok = json!({ANN_CA: "mesh", ANN_DNS_NAMES: "web.app.svc"});
        let (a, c) = (secret("a", ok.clone()), secret("c", ok.clone()));
        // Not due, nothing written: only the metrics change.
        m.reconcile(&a).await.unwrap();
        m.reconcile(&c).await.unwrap();
        let text = m.metrics.render();
        assert!(
            text.contains("name=\"a\",ca=\"mesh\",condition=\"True\"} 1"),
            "{text}"
        );
        assert!(text.contains("name=\"c\""), "{text}");
        // The controller's cache holds `a` and `c`; `c` is deleted: its series go at the next
        // scrape, `a`'s stay.
        let (store, mut writer) = kube::runtime::reflector::store::<Secret>();
        writer.apply_watcher_event(&watcher::Event::Apply(a.clone()));
        writer.apply_watcher_event(&watcher::Event::Apply(c.clone()));
        m.metrics
            .managed_certs
            .watch_store(Some("app".into()), store);
        assert!(m.metrics.render().contains("name=\"c\""));
        writer.apply_watcher_event(&watcher::Event::Delete(c.clone()));
        let text = m.metrics.render();
        assert!(
            !text.contains("name=\"c\""),
            "stale series of a deleted Secret: {text}"
        );
        assert!(text.contains("name=\"a\""), "{text}");
        // `a` no longer names a CA (unmanaged), then names a CA served elsewhere.
        m.reconcile(&secret("a", json!({ANN_DNS_NAMES: "web.app.svc"})))
            .await
            .unwrap();
        assert!(m.metrics.managed_certs.get("app", "a").is_none());
        m.reconcile(&a).await.unwrap();
        assert!(m.metrics.managed_certs.get("app", "a").is_some());
        m.reconcile(&secret(
            "a",
            json!({ANN_CA: "elsewhere", ANN_DNS_NAMES: "web.app.svc"}),
        ))
        .await
        .unwrap();
        assert!(m.metrics.managed_certs.get("app", "a").is_none());
        // Stepping down clears every series.
        m.reconcile(&a).await.unwrap();
        assert!(m.metrics.render().contains("name=\"a\""));
        m.metrics.managed_certs.clear();
        assert!(!m
            .metrics
            .render()
            .contains("meshca_managed_secret_ready_status{"));
    }

    #[test]
    fn an_overdue_renewal_keeps_the_time_it_became_due() {
        let series = |not_after, renewal| CertSeries {
            ca: "mesh".into(),
            not_after: Some(not_after),
            renewal,
            ready: true,
        };
        // Due at 100, retried at 200 and 300: still shown as due since 100.
        let first = CertSeries::after(None, series(1000, 100), 100);
        let retried = CertSeries::after(Some(&first), series(1000, 200), 200);
        assert_eq!(retried.renewal, 100);
        // A new certificate: its own renewal time.
        let renewed = CertSeries::after(Some(&retried), series(2000, 900), 300);
        assert_eq!(renewed.renewal, 900);
        // Not due yet: the computed time, even when an earlier one was recorded.
        let later = CertSeries::after(Some(&first), series(1000, 500), 300);
        assert_eq!(later.renewal, 500);
    }

    /// The defect: `ca.crt` held the issuing root only and was written only with a new
    /// certificate, so during a rotation's overlap a mounted-Secret workload kept trusting the
    /// old root alone and refused peers already re-issued by the new CA (and, after activate,
    /// the re-issued ones refused peers still on the old CA). Now prepare's new root reaches
    /// `ca.crt` of every managed Secret at once, its credential untouched, and prune removes
    /// the old root again.
    #[tokio::test]
    async fn a_rotation_puts_both_roots_in_ca_crt_without_touching_the_credential() {
        use crate::rotation::Request;
        use crate::store::rotate::{run_phase, RotateOptions};
        use crate::store::Store as _;
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::LocalStore::create(dir.path().join("h")).unwrap();
        let now = OffsetDateTime::now_utc();
        let mut spec = crate::ca::CaSpec::root("mesh");
        spec.policy = serves_app();
        let ca = crate::ca::create_root(&spec, now).unwrap();
        store.save_ca(&ca, false).await.unwrap();
        let m_metrics = Metrics::new();
        let first = issuers::reload(&store, None, None, &m_metrics)
            .await
            .unwrap();
        let iss = first.get("mesh").unwrap().clone();
        // A filled Secret, not due, whose ca.crt is the one root.
        let (_, w) = web_app_svc(iss.as_ref(), now).await;
        let b = |t: &str| base64::engine::general_purpose::STANDARD.encode(t);
        let (crt, key) = (w.cert.chain_pem(), w.key.to_pkcs8_pem());
        let one_root = crate::pemutil::certs_to_pem([ca.root()]);
        let s: Secret = serde_json::from_value(json!({
            "metadata": {"name": "web-tls", "namespace": "app", "resourceVersion": "9",
                         "annotations": {ANN_CA: "mesh", ANN_DNS_NAMES: "web.app.svc"}},
            "data": {"tls.crt": b(&crt), "tls.key": b(&key), "ca.crt": b(&one_root)},
        }))
        .unwrap();
        assert_eq!(first.anchors_pem("mesh"), Some(one_root.as_str()));

        run_phase(
            &store,
            "mesh",
            Request::Prepare,
            &RotateOptions::default(),
            now,
        )
        .await
        .unwrap();
        let second = issuers::reload(&store, None, Some(&first), &m_metrics)
            .await
            .unwrap();
        assert!(
            !super::issuers::tests::same_pub(&first, &second),
            "published"
        );
        let both = second.anchors_pem("mesh").unwrap().to_string();
        assert_eq!(both.matches("BEGIN CERTIFICATE").count(), 2);

        let (client, mut h) = mock_client();
        let (tx, rx) = watch::channel(Arc::new(second));
        let m = Managed::new(
            client,
            rx,
            Arc::new(Metrics::new()),
            Arc::new(RateLimiter::new(0.0, 1)),
            crate::kube::leader::always_leader(),
            Arc::new(crate::clock::SystemClock),
        );
        let server = tokio::spawn(async move {
            let (req, body, send) = next(&mut h).await;
            assert_eq!(req.method(), "PATCH");
            assert_eq!(req.uri().path(), "/api/v1/namespaces/app/secrets/web-tls");
            let q = req.uri().query().unwrap();
            assert!(
                q.contains("fieldManager=meshca-managed") && q.contains("force=true"),
                "{q}"
            );
            assert_eq!(body["metadata"]["resourceVersion"], "9");
            send.send_response(resp(200, &body));
            body
        });
        m.reconcile(&s).await.unwrap();
        let body = server.await.unwrap();
        let d = |k: &str| {
            String::from_utf8(
                base64::engine::general_purpose::STANDARD
                    .decode(body["data"][k].as_str().unwrap())
                    .unwrap(),
            )
            .unwrap()
        };
        assert_eq!(d("ca.crt"), both);
        assert_eq!(
            (d("tls.crt"), d("tls.key")),
            (crt, key.to_string()),
            "credential kept"
        );
        assert_eq!(m.metrics.managed_issued.get(), 0, "nothing re-issued");
        drop(tx);
    }

    #[tokio::test]
    async fn a_conflict_means_a_newer_secret_and_is_not_overwritten() {
        let (client, mut h) = mock_client();
        let m = managed(client, local("mesh", serves_app()));
        let s: Secret = serde_json::from_value(json!({
            "metadata": {"name": "w", "namespace": "app", "resourceVersion": "7",
                         "annotations": {ANN_CA: "mesh", ANN_DNS_NAMES: "web.app.svc"}},
        }))
        .unwrap();
        let server = tokio::spawn(async move {
            let (_, body, send) = next(&mut h).await;
            assert_eq!(body["metadata"]["resourceVersion"], "7");
            send.send_response(status(
                409,
                "Conflict",
                "Operation cannot be fulfilled on secrets \"w\": the object has been modified",
            ));
            // Nothing else: no retry with a fresh version, no annotation.
            assert!(
                tokio::time::timeout(Duration::from_millis(200), h.next_request())
                    .await
                    .is_err()
            );
        });
        assert_eq!(m.reconcile(&s).await.unwrap(), Action::await_change());
        server.await.unwrap();
        assert_eq!(m.metrics.managed_issued.get(), 0);
    }

    /// The defect: a refused renewal applied only the error annotation with the data's field
    /// manager and `force`, and server-side apply then removes every field that manager owned
    /// but left out (tls.crt, tls.key, ca.crt). The write must be a merge patch of that one
    /// annotation under another field manager, so that nothing else can change.
    #[tokio::test]
    async fn a_refused_renewal_keeps_the_data_byte_for_byte() {
        let (client, mut h) = mock_client();
        let iss = local("mesh", serves_app());
        // A Secret meshca filled earlier for web.app.svc ...
        let now = OffsetDateTime::now_utc();
        let sans = parse_annotations(&ann(&[(ANN_CA, "mesh"), (ANN_DNS_NAMES, "web.app.svc")]))
            .unwrap()
            .unwrap()
            .sans;
        let w = issue_workload(iss.as_ref(), &sans, None, KeyAlgorithm::EcdsaP256, now)
            .await
            .unwrap();
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
        let data = json!({
            "tls.crt": b64(&w.cert.chain_pem()),
            "tls.key": b64(&w.key.to_pkcs8_pem()),
            "ca.crt": b64(&crate::pemutil::certs_to_pem([&w.cert.root])),
        });
        // ... whose annotations now ask for something the policy refuses.
        let s: Secret = serde_json::from_value(json!({
            "metadata": {"name": "w", "namespace": "app", "resourceVersion": "9", "uid": "u-1",
                         "annotations": {ANN_CA: "mesh", ANN_DNS_NAMES: "*.app.svc"}},
            "type": "kubernetes.io/tls",
            "data": data,
        }))
        .unwrap();
        let m = managed(client, iss).with_events(Reporter {
            controller: "meshca-signer".into(),
            instance: Some("meshca-signer-0".into()),
        });
        let server = tokio::spawn(async move {
            let (req, body, send) = next(&mut h).await;
            assert_eq!(req.method(), "PATCH");
            assert_eq!(req.uri().path(), "/api/v1/namespaces/app/secrets/w");
            assert_eq!(
                req.headers()["content-type"],
                "application/merge-patch+json",
                "a merge patch cannot drop fields; an apply of a partial object can"
            );
            let q = req.uri().query().unwrap_or("");
            assert!(q.contains("fieldManager=meshca-managed-error"), "{q}");
            assert!(!q.contains("force"), "{q}");
            let msg = body["metadata"]["annotations"][ANN_ERROR]
                .as_str()
                .unwrap()
                .to_string();
            assert_eq!(
                body,
                json!({"metadata": {"annotations": {ANN_ERROR: msg.clone()}}}),
                "exactly one annotation, nothing else"
            );
            send.send_response(resp(200, &json!({})));
            // The Event on the Secret.
            let (req, ev, send) = next(&mut h).await;
            assert_eq!(req.method(), "POST");
            assert_eq!(
                req.uri().path(),
                "/apis/events.k8s.io/v1/namespaces/app/events"
            );
            assert_eq!(ev["type"], "Warning");
            assert_eq!(ev["reason"], EVENT_REFUSED);
            assert_eq!(ev["regarding"]["kind"], "Secret");
            assert_eq!(ev["regarding"]["name"], "w");
            assert_eq!(ev["reportingController"], "meshca-signer");
            assert!(ev["note"].as_str().unwrap().contains("*.app.svc"), "{ev}");
            send.send_response(resp(201, &ev));
            // Nothing else: in particular no apply of the Secret.
            assert!(
                tokio::time::timeout(Duration::from_millis(200), h.next_request())
                    .await
                    .is_err()
            );
            msg
        });
        assert_eq!(m.reconcile(&s).await.unwrap(), Action::await_change());
        let msg = server.await.unwrap();
        assert!(msg.contains("wildcard DNS name *.app.svc"), "{msg}");
        assert_eq!(m.metrics.managed_failed.get(), 1);
        assert_eq!(m.metrics.managed_issued.get(), 0);
        // The metrics: the kept certificate's notAfter, due, not ready (not what it asks for).
        let series = m.metrics.managed_certs.get("app", "w").unwrap();
        assert_eq!(
            series.not_after,
            Some(w.cert.info.not_after.unix_timestamp())
        );
        assert!(series.renewal <= OffsetDateTime::now_utc().unix_timestamp());
        assert!(!series.ready);
    }

    #[tokio::test]
    async fn a_terminal_refusal_is_recorded_once() {
        let (client, mut h) = mock_client();
        let m = managed(client, local("mesh", serves_app()));
        let mut s: Secret = serde_json::from_value(json!({
            "metadata": {"name": "w", "namespace": "app", "annotations": {ANN_CA: "mesh", ANN_DNS_NAMES: "*.app.svc"}},
        }))
        .unwrap();
        let server = tokio::spawn(async move {
            let (req, body, send) = next(&mut h).await;
            assert_eq!(req.method(), "PATCH");
            assert!(body.get("data").is_none(), "no key material on failure");
            let msg = body["metadata"]["annotations"][ANN_ERROR]
                .as_str()
                .unwrap()
                .to_string();
            send.send_response(resp(200, &body));
            msg
        });
        assert_eq!(m.reconcile(&s).await.unwrap(), Action::await_change());
        let msg = server.await.unwrap();
        // Seen again (the annotation write comes back as a watch event): not tried again, no
        // second write (no request is served, so one would hang the test).
        s.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(ANN_ERROR.into(), msg);
        assert_eq!(m.reconcile(&s).await.unwrap(), Action::await_change());
        assert_eq!(m.metrics.managed_failed.get(), 1);
        assert_eq!(m.metrics.managed_issued.get(), 0);
    }

    #[derive(Debug)]
    struct Unavailable(crate::ca::CaMeta);

    #[async_trait::async_trait]
    impl crate::issue::Issuer for Unavailable {
        fn meta(&self) -> &crate::ca::CaMeta {
            &self.0
        }
        async fn sign(
            &self,
            _: &crate::issue::SignRequest,
            _: OffsetDateTime,
        ) -> Result<crate::issue::IssuedCert> {
            Err(Error::Backend {
                backend: "acm-pca",
                message: "throttled".into(),
                retryable: true,
            })
        }
    }

    #[tokio::test]
    async fn a_retryable_failure_backs_off_per_secret_with_jitter() {
        let (client, mut h) = mock_client();
        let meta = local("mesh", serves_app()).ca().meta.clone();
        let m = managed(client, Arc::new(Unavailable(meta)));
        let s: Secret = serde_json::from_value(json!({
            "metadata": {"name": "w", "namespace": "app", "annotations": {ANN_CA: "mesh", ANN_DNS_NAMES: "web.app.svc"}},
        }))
        .unwrap();
        let server = tokio::spawn(async move {
            let (_, body, send) = next(&mut h).await;
            let msg = body["metadata"]["annotations"][ANN_ERROR]
                .as_str()
                .unwrap()
                .to_string();
            assert!(
                msg.contains("throttled") && msg.contains("will retry"),
                "{msg}"
            );
            send.send_response(resp(200, &body));
        });
        let e = m.reconcile(&s).await.unwrap_err();
        assert!(super::super::retryable(&e), "{e}");
        server.await.unwrap();
        // The error policy's waits grow per Secret (not a flat 5 s) and stay under the cap.
        let d1 = m.retry_after(&s);
        assert!(d1 <= Duration::from_millis(500), "{d1:?}");
        // Within the backoff window a reconcile (e.g. from a watch event) makes no attempt.
        assert_ne!(m.reconcile(&s).await.unwrap(), Action::await_change());
        let mut last = d1;
        for _ in 0..12 {
            last = m.retry_after(&s);
        }
        assert!(
            last > Duration::from_secs(60) && last <= super::super::backoff::CAP,
            "{last:?}"
        );
        assert_eq!(m.metrics.managed_failed.get(), 1);
    }

    /// Fails its first call with a retryable error, then signs with a local CA; records the
    /// CSR of every call (ACM PCA derives its idempotency token from the CSR).
    #[derive(Debug)]
    struct FlakyOnce {
        inner: Arc<crate::issue::LocalIssuer>,
        csrs: Mutex<Vec<Vec<u8>>>,
    }

    #[async_trait::async_trait]
    impl crate::issue::Issuer for FlakyOnce {
        fn meta(&self) -> &crate::ca::CaMeta {
            crate::issue::Issuer::meta(self.inner.as_ref())
        }
        async fn sign(
            &self,
            req: &crate::issue::SignRequest,
            now: OffsetDateTime,
        ) -> Result<crate::issue::IssuedCert> {
            let n = {
                let mut c = self.csrs.lock().unwrap();
                c.push(req.csr_der.clone().expect("a CSR"));
                c.len()
            };
            if n == 1 {
                return Err(Error::Backend {
                    backend: "acm-pca",
                    message: "GetCertificate timed out".into(),
                    retryable: true,
                });
            }
            crate::issue::Issuer::sign(self.inner.as_ref(), req, now).await
        }
        fn ca_certificate(&self) -> Option<&rustls_pki_types::CertificateDer<'static>> {
            crate::issue::Issuer::ca_certificate(self.inner.as_ref())
        }
    }

    /// The defect: each retry made a fresh key, so a new CSR, a new ACM PCA idempotency token
    /// and a second billed certificate. A retry of the same request reuses key and CSR.
    #[tokio::test]
    async fn a_retry_of_the_same_secret_presents_the_same_key_and_csr() {
        let (client, mut h) = mock_client();
        let flaky = Arc::new(FlakyOnce {
            inner: local("mesh", serves_app()),
            csrs: Mutex::new(Vec::new()),
        });
        let m = managed(client, flaky.clone());
        let s: Secret = serde_json::from_value(json!({
            "metadata": {"name": "w", "namespace": "app", "resourceVersion": "3",
                         "annotations": {ANN_CA: "mesh", ANN_DNS_NAMES: "web.app.svc"}},
        }))
        .unwrap();
        let server = tokio::spawn(async move {
            // The failure's annotation, then the apply of the retry.
            let (_, body, send) = next(&mut h).await;
            assert!(body.get("data").is_none());
            send.send_response(resp(200, &body));
            let (req, body, send) = next(&mut h).await;
            assert_eq!(
                req.headers()["content-type"],
                "application/apply-patch+yaml"
            );
            send.send_response(resp(200, &body));
            body
        });
        assert!(
            m.reconcile(&s).await.is_err(),
            "first attempt fails, retryably"
        );
        m.reconcile(&s).await.unwrap();
        let body = server.await.unwrap();
        let csrs = flaky.csrs.lock().unwrap().clone();
        assert_eq!(csrs.len(), 2, "two backend calls");
        assert_eq!(csrs[0], csrs[1], "the retry presents the same CSR");
        // The key applied is the CSR's key.
        let key_pem = base64::engine::general_purpose::STANDARD
            .decode(body["data"]["tls.key"].as_str().unwrap())
            .unwrap();
        let key =
            crate::key::PrivateKey::from_pem(std::str::from_utf8(&key_pem).unwrap(), "k").unwrap();
        let csr = crate::x509::CsrInfo::from_der(&csrs[0]).unwrap();
        assert_eq!(key.public_key_der(), csr.spki_der);
        assert!(lock(&m.pending).is_empty(), "forgotten after success");
    }
}
