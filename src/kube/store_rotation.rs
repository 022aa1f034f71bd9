//! CA rotation on the [`KubeStore`]: the rotation record, the two CA slots and the phase lock,
//! each one Kubernetes object written in one request, so every step of
//! [`crate::store::rotate`] is atomic on the API server.
//!
//! Layout (in the store namespace, all labelled `app.kubernetes.io/managed-by: meshca` and
//! `meshca.io/rotation: <ca>`; none carries `meshca.io/ca`, so no controller serves a slot):
//! ```text
//! ConfigMap meshca-rotation-<ca>             state.json: the RotationState
//! Secret    meshca-rotation-<ca>-next        the prepared CAs      (type Opaque)
//! Secret    meshca-rotation-<ca>-previous    the replaced CAs      (type Opaque)
//!           cas.json            the slot's CA names, parents first
//!           <x>.chain.pem       CA <x>'s certificate followed by its parents
//!           <x>.key.pem         its key, PKCS#8 PEM
//!           <x>.meta.json       its facts and policy
//! Lease     meshca-rotation                  the phase lock (coordination.k8s.io/v1)
//! ```
//! - The record is created with a plain create (a concurrent start gets 409) and then
//!   replaced with the resourceVersion it was read at (optimistic concurrency), and only by a
//!   record whose steps extend the stored ones, so a writer that missed a step is refused
//!   instead of rewinding the rotation.
//! - A slot is created with a plain create and never updated: a second write of the same
//!   slot gets 409 ([`Error::AlreadyExists`]). Removing it is a delete (404 is fine).
//! - The lock is a Lease created by the phase's process (409: someone holds it). One whose
//!   `renewTime + leaseDurationSeconds` lies ahead on this host's clock is refused at once;
//!   one that looks expired is taken over (a replace at the resourceVersion read) only after
//!   this process has seen it unchanged for its whole duration on its own monotonic clock,
//!   as client-go's leader election does. Neither another host's clock nor `/proc/<pid>` (a
//!   holder may live in another PID namespace) decides a takeover. The holder renews it
//!   every [`LEASE_RENEW`] while the phase runs; a failed renewal, or none confirmed within
//!   45 s of being sent, makes [`PhaseLock::check`] fail, and the phase checks before
//!   each write. It deletes the Lease (precondition: its own resourceVersion) when done.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use serde_json::json;
use time::OffsetDateTime;

use super::store::{ca_from_parts, KubeStore};
use super::{api_code, kube_err, FIELD_MANAGER, LABEL_MANAGED_BY, MANAGED_BY};
use crate::ca::CaMaterial;
use crate::error::{Error, Result};
use crate::rotation::RotationState;
use crate::store::{lock_busy, PhaseLock, Slot};

/// Label of every rotation object, valued with the rotated CA.
pub const LABEL_ROTATION: &str = "meshca.io/rotation";
/// The phase-lock Lease.
pub const ROTATION_LEASE: &str = "meshca-rotation";
/// How long the lock stays valid after its last renewal.
pub const LEASE_SECONDS: i64 = 60;
/// How often a running phase renews the lock.
pub const LEASE_RENEW: Duration = Duration::from_secs(20);

/// The ConfigMap holding CA `ca`'s rotation record.
pub fn record_name(ca: &str) -> String {
    format!("meshca-rotation-{ca}")
}

/// The Secret holding a slot of CA `ca`'s rotation.
pub fn slot_name(ca: &str, slot: Slot) -> String {
    format!("meshca-rotation-{ca}-{}", slot.as_str())
}

fn pp() -> PostParams {
    PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn rfc3339_micro(t: OffsetDateTime) -> String {
    // MicroTime: RFC 3339 with microseconds.
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

fn state_from(cm: &ConfigMap) -> Result<RotationState> {
    let name = cm.metadata.name.clone().unwrap_or_default();
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get("state.json"))
        .ok_or_else(|| Error::Corrupt(format!("ConfigMap {name} has no state.json")))?;
    serde_json::from_str(text).map_err(|e| Error::Corrupt(format!("ConfigMap {name}: {e}")))
}

/// The manifest of a rotation record.
pub fn record_manifest(st: &RotationState, namespace: &str) -> Result<serde_json::Value> {
    let text = serde_json::to_string_pretty(st).map_err(|e| Error::Build(e.to_string()))?;
    Ok(json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": record_name(&st.ca),
            "namespace": namespace,
            "labels": { LABEL_MANAGED_BY: MANAGED_BY, LABEL_ROTATION: st.ca },
        },
        "data": { "state.json": text }
    }))
}

/// The manifest of a slot Secret.
pub fn slot_manifest(
    ca: &str,
    slot: Slot,
    cas: &[CaMaterial],
    namespace: &str,
) -> Result<serde_json::Value> {
    let names: Vec<&str> = cas.iter().map(|c| c.meta.name.as_str()).collect();
    let mut data = serde_json::Map::new();
    data.insert(
        "cas.json".into(),
        json!(b64(serde_json::to_string(&names)
            .map_err(|e| Error::Build(e.to_string()))?
            .as_bytes())),
    );
    for c in cas {
        let n = &c.meta.name;
        let meta = serde_json::to_string(&c.meta).map_err(|e| Error::Build(e.to_string()))?;
        data.insert(format!("{n}.meta.json"), json!(b64(meta.as_bytes())));
        data.insert(
            format!("{n}.chain.pem"),
            json!(b64(c.chain_pem().as_bytes())),
        );
        if let Some(k) = &c.key {
            data.insert(
                format!("{n}.key.pem"),
                json!(b64(k.to_pkcs8_pem().as_bytes())),
            );
        }
    }
    Ok(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": slot_name(ca, slot),
            "namespace": namespace,
            "labels": {
                LABEL_MANAGED_BY: MANAGED_BY,
                LABEL_ROTATION: ca,
                "meshca.io/rotation-slot": slot.as_str(),
            },
        },
        "type": "Opaque",
        "data": data,
    }))
}

fn slot_from(s: &Secret) -> Result<Vec<CaMaterial>> {
    let sname = s.metadata.name.clone().unwrap_or_default();
    let data = s.data.as_ref();
    let get = |k: &str| data.and_then(|d| d.get(k)).map(|b| b.0.as_slice());
    let names: Vec<String> = serde_json::from_slice(
        get("cas.json").ok_or_else(|| Error::Corrupt(format!("Secret {sname} has no cas.json")))?,
    )
    .map_err(|e| Error::Corrupt(format!("Secret {sname} cas.json: {e}")))?;
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        let what = format!("Secret {sname} CA {n}");
        let meta = get(&format!("{n}.meta.json"))
            .and_then(|m| std::str::from_utf8(m).ok())
            .ok_or_else(|| Error::Corrupt(format!("{what}: no readable {n}.meta.json")))?;
        let crt = get(&format!("{n}.chain.pem"))
            .ok_or_else(|| Error::Corrupt(format!("{what}: no {n}.chain.pem")))?;
        let ca = ca_from_parts(&what, meta, crt, get(&format!("{n}.key.pem")))?;
        if ca.meta.name != n {
            return Err(Error::Corrupt(format!(
                "{what}: describes CA {:?}",
                ca.meta.name
            )));
        }
        out.push(ca);
    }
    Ok(out)
}

impl KubeStore {
    fn rotation_configmaps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client().clone(), self.namespace())
    }

    fn rotation_secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client().clone(), self.namespace())
    }

    pub(super) async fn list_rotations_kube(&self) -> Result<Vec<RotationState>> {
        let lp = ListParams::default()
            .labels(&format!("{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_ROTATION}"));
        let list = self
            .rotation_configmaps()
            .list(&lp)
            .await
            .map_err(|e| kube_err("listing rotation records", e))?;
        let mut out = Vec::new();
        for cm in &list.items {
            out.push(state_from(cm)?);
        }
        out.sort_by(|a, b| a.ca.cmp(&b.ca));
        Ok(out)
    }

    pub(super) async fn load_rotation_kube(&self, ca: &str) -> Result<Option<RotationState>> {
        if crate::ca::validate_ca_name(ca).is_err() {
            return Ok(None);
        }
        self.rotation_configmaps()
            .get_opt(&record_name(ca))
            .await
            .map_err(|e| kube_err("reading a rotation record", e))?
            .map(|cm| state_from(&cm))
            .transpose()
    }

    pub(super) async fn save_rotation_kube(&self, st: &RotationState) -> Result<()> {
        crate::ca::validate_ca_name(&st.ca)?;
        let api = self.rotation_configmaps();
        let name = record_name(&st.ca);
        let manifest = record_manifest(st, self.namespace())?;
        let concurrent = || {
            Error::Store(format!(
                "the rotation record of CA {} (ConfigMap {name}) was changed by another process meanwhile; re-run the phase",
                st.ca
            ))
        };
        let current = api
            .get_opt(&name)
            .await
            .map_err(|e| kube_err("reading a rotation record", e))?;
        let result = match current {
            None => {
                let cm: ConfigMap =
                    serde_json::from_value(manifest).map_err(|e| Error::Build(e.to_string()))?;
                api.create(&pp(), &cm).await.map(|_| ())
            }
            Some(cur) => {
                let stored = state_from(&cur)?;
                let extends = stored.ca == st.ca
                    && stored.started_at == st.started_at
                    && st.steps.starts_with(&stored.steps);
                if !extends {
                    return Err(concurrent());
                }
                let mut cm: ConfigMap =
                    serde_json::from_value(manifest).map_err(|e| Error::Build(e.to_string()))?;
                // The resourceVersion read above: the API server answers 409 if the record
                // changed since.
                cm.metadata.resource_version = cur.metadata.resource_version.clone();
                api.replace(&name, &pp(), &cm).await.map(|_| ())
            }
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) if api_code(&e) == Some(409) => Err(concurrent()),
            Err(e) => Err(kube_err("writing a rotation record", e)),
        }
    }

    pub(super) async fn load_rotation_cas_kube(
        &self,
        ca: &str,
        slot: Slot,
    ) -> Result<Vec<CaMaterial>> {
        if crate::ca::validate_ca_name(ca).is_err() {
            return Ok(Vec::new());
        }
        match self
            .rotation_secrets()
            .get_opt(&slot_name(ca, slot))
            .await
            .map_err(|e| kube_err("reading a rotation slot Secret", e))?
        {
            Some(s) => slot_from(&s),
            None => Ok(Vec::new()),
        }
    }

    pub(super) async fn save_rotation_cas_kube(
        &self,
        ca: &str,
        slot: Slot,
        cas: &[CaMaterial],
    ) -> Result<()> {
        crate::ca::validate_ca_name(ca)?;
        for c in cas {
            c.validate()?;
        }
        let s: Secret = serde_json::from_value(slot_manifest(ca, slot, cas, self.namespace())?)
            .map_err(|e| Error::Build(e.to_string()))?;
        match self.rotation_secrets().create(&pp(), &s).await {
            Ok(_) => Ok(()),
            Err(e) if api_code(&e) == Some(409) => Err(Error::AlreadyExists(format!(
                "{} CAs of the rotation of {ca}",
                slot.as_str()
            ))),
            Err(e) => Err(kube_err("creating a rotation slot Secret", e)),
        }
    }

    async fn delete_ignoring_missing<K>(api: &Api<K>, name: &str, what: &str) -> Result<()>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(e) if api_code(&e) == Some(404) => Ok(()),
            Err(e) => Err(kube_err(what, e)),
        }
    }

    pub(super) async fn remove_rotation_cas_kube(&self, ca: &str, slot: Slot) -> Result<()> {
        crate::ca::validate_ca_name(ca)?;
        Self::delete_ignoring_missing(
            &self.rotation_secrets(),
            &slot_name(ca, slot),
            "deleting a rotation slot Secret",
        )
        .await
    }

    pub(super) async fn remove_rotation_kube(&self, ca: &str) -> Result<()> {
        for slot in [Slot::Next, Slot::Previous] {
            self.remove_rotation_cas_kube(ca, slot).await?;
        }
        Self::delete_ignoring_missing(
            &self.rotation_configmaps(),
            &record_name(ca),
            "deleting a rotation record",
        )
        .await
    }

    /// Takes the phase lock. A Lease held by someone else is refused at once while its
    /// renewTime looks recent on this host's clock (a hint only: a clock may be wrong). One
    /// that looks expired is taken over only once this process has seen it unchanged (same
    /// resourceVersion) for its whole duration on its own monotonic clock, as client-go's
    /// leader election does; a change meanwhile means its holder is alive.
    pub(super) async fn lock_rotation_kube(&self, holder: &str) -> Result<KubePhaseLock> {
        let api: Api<Lease> = Api::namespaced(self.client().clone(), self.namespace());
        let busy = |detail: String| {
            lock_busy(&format!(
                "{detail}; Lease {}/{ROTATION_LEASE}",
                self.namespace()
            ))
        };
        // What this process saw of another holder's Lease, and since when.
        let mut observed: Option<(String, tokio::time::Instant)> = None;
        let mut creates = 0;
        let mut create = true;
        loop {
            let mut lease = lease_manifest(holder, self.namespace(), OffsetDateTime::now_utc())?;
            if create {
                let sent = tokio::time::Instant::now();
                match api.create(&pp(), &lease).await {
                    Ok(l) => return Ok(KubePhaseLock::start(api, l, sent, self.namespace())),
                    Err(e) if api_code(&e) == Some(409) => {}
                    Err(e) => return Err(kube_err("creating the rotation lock Lease", e)),
                }
                creates += 1;
                create = false;
            }
            let Some(cur) = api
                .get_opt(ROTATION_LEASE)
                .await
                .map_err(|e| kube_err("reading the rotation lock Lease", e))?
            else {
                // Released meanwhile: create again (a few times at most).
                if creates >= 3 {
                    return Err(busy("the Lease keeps changing".into()));
                }
                create = true;
                continue;
            };
            let seen = lease_observation(&cur);
            let (who, until, duration) = lease_holder(&cur);
            if let Some(t) = until.filter(|t| *t >= OffsetDateTime::now_utc()) {
                return Err(busy(format!("{who}, valid until {}", super::rfc3339(t))));
            }
            let since = match &observed {
                Some((before, _)) if *before != seen => {
                    return Err(busy(format!("{who}, still renewing it")));
                }
                Some((_, since)) => *since,
                None => {
                    tracing::warn!(holder = %who, wait_s = duration.as_secs(), "the rotation lock looks expired; taking it over once it has stayed unchanged that long");
                    observed = Some((seen, tokio::time::Instant::now()));
                    tokio::time::Instant::now()
                }
            };
            if since.elapsed() < duration {
                tokio::time::sleep(LEASE_POLL.min(duration - since.elapsed())).await;
                continue;
            }
            tracing::warn!(holder = %who, "taking over a stale rotation lock");
            lease.metadata.resource_version = cur.metadata.resource_version.clone();
            let sent = tokio::time::Instant::now();
            return match api.replace(ROTATION_LEASE, &pp(), &lease).await {
                Ok(l) => Ok(KubePhaseLock::start(api, l, sent, self.namespace())),
                Err(e) if api_code(&e) == Some(409) => {
                    Err(busy(format!("{who}, changed while being taken over")))
                }
                Err(e) => Err(kube_err("taking over the rotation lock Lease", e)),
            };
        }
    }
}

/// The Lease manifest of the phase lock held by `holder` from `now`.
pub fn lease_manifest(holder: &str, namespace: &str, now: OffsetDateTime) -> Result<Lease> {
    serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": ROTATION_LEASE,
            "namespace": namespace,
            "labels": { LABEL_MANAGED_BY: MANAGED_BY },
        },
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": LEASE_SECONDS,
            "acquireTime": rfc3339_micro(now),
            "renewTime": rfc3339_micro(now),
        }
    }))
    .map_err(|e| Error::Build(e.to_string()))
}

/// A Lease's holder, the time its hold ends by its own renewTime (`None`: unreadable,
/// treated as expired), and how long it must be seen unchanged before it is stale (its
/// duration, never less than [`LEASE_SECONDS`]).
fn lease_holder(l: &Lease) -> (String, Option<OffsetDateTime>, Duration) {
    let spec = l.spec.as_ref();
    let who = spec
        .and_then(|s| s.holder_identity.clone())
        .unwrap_or_default();
    let secs = spec
        .and_then(|s| s.lease_duration_seconds)
        .map(i64::from)
        .unwrap_or(LEASE_SECONDS)
        .max(LEASE_SECONDS);
    let until = spec
        .and_then(|s| s.renew_time.as_ref())
        .and_then(|t| {
            let v = serde_json::to_value(t).ok()?;
            OffsetDateTime::parse(v.as_str()?, &time::format_description::well_known::Rfc3339).ok()
        })
        .map(|t| t + time::Duration::seconds(secs));
    (who, until, Duration::from_secs(secs.unsigned_abs()))
}

/// What identifies one version of a Lease: its resourceVersion, holder and renewTime.
fn lease_observation(l: &Lease) -> String {
    let spec = serde_json::to_value(&l.spec).unwrap_or_default();
    format!(
        "{:?} {} {}",
        l.metadata.resource_version, spec["holderIdentity"], spec["renewTime"]
    )
}

/// How often a phase waiting to take over a lock that looks expired reads it again.
pub const LEASE_POLL: Duration = Duration::from_secs(5);
/// How long after sending a renewal the phase still counts on the lock: the lease duration
/// less a margin, so that it stops writing before anyone may take the lock over (no other
/// process can see the renewed Lease unchanged for a full duration any sooner).
const HOLD: Duration = Duration::from_secs(LEASE_SECONDS as u64 - 15);

/// What the holder knows of its lock.
struct Hold {
    lease: Lease,
    /// Until when (monotonic) the lock is surely held.
    valid_until: tokio::time::Instant,
    /// Why it is lost, once it is.
    lost: Option<String>,
}

/// The held phase lock: renewed in the background until released. A renewal that fails
/// marks it lost; [`PhaseLock::check`] then fails, and so does it once `HOLD` (45 s) has passed
/// since the last renewal was sent (a renewal that hangs).
pub struct KubePhaseLock {
    api: Api<Lease>,
    namespace: String,
    hold: Arc<Mutex<Hold>>,
    renewer: tokio::task::JoinHandle<()>,
}

fn hold(h: &Mutex<Hold>) -> std::sync::MutexGuard<'_, Hold> {
    h.lock().unwrap_or_else(|p| p.into_inner())
}

impl KubePhaseLock {
    fn start(api: Api<Lease>, lease: Lease, sent: tokio::time::Instant, namespace: &str) -> Self {
        let h = Arc::new(Mutex::new(Hold {
            lease,
            valid_until: sent + HOLD,
            lost: None,
        }));
        let (a, h2) = (api.clone(), h.clone());
        let renewer = tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEASE_RENEW).await;
                let mut v = serde_json::to_value(&hold(&h2).lease).unwrap_or_default();
                v["spec"]["renewTime"] = json!(rfc3339_micro(OffsetDateTime::now_utc()));
                let next: Lease = match serde_json::from_value(v) {
                    Ok(l) => l,
                    Err(e) => {
                        hold(&h2).lost = Some(format!("cannot build the renewal: {e}"));
                        return;
                    }
                };
                let sent = tokio::time::Instant::now();
                let why = match tokio::time::timeout(HOLD, a.replace(ROTATION_LEASE, &pp(), &next))
                    .await
                {
                    Ok(Ok(done)) => {
                        let mut g = hold(&h2);
                        g.lease = done;
                        g.valid_until = sent + HOLD;
                        continue;
                    }
                    Ok(Err(e)) if api_code(&e) == Some(409) => {
                        "another process changed or took it over".to_string()
                    }
                    Ok(Err(e)) => kube_err("renewing it failed", e).to_string(),
                    Err(_) => "renewing it timed out".to_string(),
                };
                tracing::error!(reason = %why, "lost the rotation lock; the phase stops before its next write");
                hold(&h2).lost = Some(why);
                return;
            }
        });
        KubePhaseLock {
            api,
            namespace: namespace.to_string(),
            hold: h,
            renewer,
        }
    }
}

impl Drop for KubePhaseLock {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

#[async_trait]
impl PhaseLock for KubePhaseLock {
    fn check(&self) -> Result<()> {
        let h = hold(&self.hold);
        let why = match &h.lost {
            Some(why) => why.clone(),
            None if tokio::time::Instant::now() >= h.valid_until => {
                format!("not renewed within {} s", HOLD.as_secs())
            }
            None => return Ok(()),
        };
        Err(Error::Store(format!(
            "lost the rotation lock (Lease {}/{ROTATION_LEASE}): {why}; stopped before the next step (re-run the phase to finish it)",
            self.namespace
        )))
    }

    async fn release(self: Box<Self>) -> Result<()> {
        self.renewer.abort();
        let rv = hold(&self.hold).lease.metadata.resource_version.clone();
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: rv,
                uid: None,
            }),
            ..Default::default()
        };
        match self.api.delete(ROTATION_LEASE, &dp).await {
            Ok(_) => Ok(()),
            // Gone, or taken over after it expired: not ours to delete any more.
            Err(e) if matches!(api_code(&e), Some(404 | 409)) => Ok(()),
            Err(e) => Err(kube_err("releasing the rotation lock Lease", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The rotation phases on the kube store against an in-memory API server (tower-test):
    //! objects with resourceVersions, 409 on a create of an existing object or a stale
    //! resourceVersion, 404 on a missing one. Every request is logged and the tests check the
    //! exact writes (method, path, query, body, preconditions). The server can fail every
    //! request after the N-th, which is what a process killed mid-phase leaves behind.

    use std::collections::BTreeMap;

    use super::*;
    use crate::bundle::BundleSpec;
    use crate::ca::{create_intermediate, create_root, CaSpec};
    use crate::kube::store::{ca_secret_manifest, ca_secret_name};
    use crate::kube::testutil::{json as resp, mock_client, next_untimed, status};
    use crate::rotation::{Phase, Request};
    use crate::store::rotate::tests::leaf_from;
    use crate::store::rotate::{run_phase, RotateOptions};
    use crate::store::{bundle_anchors, Store};

    const NS: &str = "meshca";

    #[derive(Clone, Debug)]
    struct Logged {
        method: String,
        path: String,
        query: String,
        body: serde_json::Value,
    }

    impl Logged {
        fn line(&self) -> String {
            format!("{} {}", self.method, self.path)
        }
    }

    #[derive(Default)]
    struct Fake {
        objects: BTreeMap<String, serde_json::Value>,
        rv: u64,
        log: Vec<Logged>,
        /// Fail (503) every request after this many.
        fail_after: Option<usize>,
        /// At this request, another process takes the rotation Lease over.
        steal_at: Option<usize>,
        /// Answer this request only after this long.
        delay_at: Option<(usize, Duration)>,
        /// Refuse (403) lists across namespaces.
        forbid_cluster_lists: bool,
    }

    type Shared = Arc<Mutex<Fake>>;

    fn lock(f: &Shared) -> std::sync::MutexGuard<'_, Fake> {
        f.lock().unwrap()
    }

    /// `/api/v1/namespaces/<ns>/<res>[/<name>]` or the coordination.k8s.io equivalent:
    /// (collection path, name).
    fn split(path: &str) -> (String, Option<String>) {
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let res_at = parts.iter().position(|p| *p == "namespaces").unwrap() + 2;
        let coll = parts[..=res_at].join("/");
        (coll, parts.get(res_at + 1).map(|s| s.to_string()))
    }

    fn selected(obj: &serde_json::Value, selector: &str) -> bool {
        let labels = &obj["metadata"]["labels"];
        selector
            .split(',')
            .filter(|s| !s.is_empty())
            .all(|term| match term.split_once('=') {
                Some((k, v)) => labels[k] == v,
                None => !labels[term].is_null(),
            })
    }

    fn query_param(q: &str, key: &str) -> Option<String> {
        q.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == key).then(|| {
                v.replace("%2C", ",")
                    .replace("%3D", "=")
                    .replace("%2F", "/")
                    .replace("+", " ")
            })
        })
    }

    fn serve(
        fake: &Shared,
        method: &str,
        path: &str,
        query: &str,
        body: &serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let mut f = lock(fake);
        let n = f.log.len();
        f.log.push(Logged {
            method: method.into(),
            path: path.into(),
            query: query.into(),
            body: body.clone(),
        });
        if f.fail_after.is_some_and(|max| n >= max) {
            return (503, status_body(503, "ServiceUnavailable", "killed"));
        }
        if f.steal_at == Some(n) {
            f.rv += 1;
            let rv = f.rv.to_string();
            if let Some(l) = f.objects.get_mut(&format!("{LEASES}/{ROTATION_LEASE}")) {
                l["spec"]["holderIdentity"] = json!("pid 1 on other-host: meshca ca rotate");
                l["metadata"]["resourceVersion"] = json!(rv);
            }
        }
        if !path.contains("/namespaces/") {
            // A list across namespaces (`/api/v1/secrets`), or discovery.
            let p = path.trim_start_matches('/');
            let Some((group, res)) = p.rsplit_once('/') else {
                return (404, status_body(404, "NotFound", "not found"));
            };
            if method != "GET" || !(group.starts_with("api/") || group.contains('/')) {
                return (404, status_body(404, "NotFound", "not found"));
            }
            if f.forbid_cluster_lists {
                return (
                    403,
                    status_body(403, "Forbidden", &format!("{res} is forbidden")),
                );
            }
            let items: Vec<_> = f
                .objects
                .iter()
                .filter(|(k, _)| {
                    let coll = k.rsplit_once('/').unwrap().0;
                    coll == p
                        || (coll.starts_with(&format!("{group}/namespaces/"))
                            && coll.ends_with(&format!("/{res}")))
                })
                .map(|(_, v)| v.clone())
                .collect();
            if items.is_empty() && !matches!(res, "secrets" | "certificatesigningrequests") {
                return (404, status_body(404, "NotFound", "not found"));
            }
            return (
                200,
                json!({"apiVersion":"v1","kind":"List","metadata":{"resourceVersion":"1"},"items":items}),
            );
        }
        let (coll, name) = split(path);
        let key = |name: &str| format!("{coll}/{name}");
        match (method, name) {
            ("GET", None) => {
                let sel = query_param(query, "labelSelector").unwrap_or_default();
                let items: Vec<_> = f
                    .objects
                    .iter()
                    .filter(|(k, v)| k.rsplit_once('/').unwrap().0 == coll && selected(v, &sel))
                    .map(|(_, v)| v.clone())
                    .collect();
                (
                    200,
                    json!({"apiVersion":"v1","kind":"List","metadata":{"resourceVersion":"1"},"items":items}),
                )
            }
            ("GET", Some(name)) => match f.objects.get(&key(&name)) {
                Some(o) => (200, o.clone()),
                None => (404, status_body(404, "NotFound", "not found")),
            },
            ("POST", None) => {
                let name = body["metadata"]["name"].as_str().unwrap().to_string();
                if f.objects.contains_key(&key(&name)) {
                    return (409, status_body(409, "AlreadyExists", "already exists"));
                }
                f.rv += 1;
                let mut o = body.clone();
                o["metadata"]["resourceVersion"] = json!(f.rv.to_string());
                f.objects.insert(key(&name), o.clone());
                (201, o)
            }
            ("PUT", Some(name)) => {
                let Some(cur) = f.objects.get(&key(&name)) else {
                    return (404, status_body(404, "NotFound", "not found"));
                };
                if body["metadata"]["resourceVersion"] != cur["metadata"]["resourceVersion"] {
                    return (
                        409,
                        status_body(409, "Conflict", "the object has been modified"),
                    );
                }
                f.rv += 1;
                let mut o = body.clone();
                o["metadata"]["resourceVersion"] = json!(f.rv.to_string());
                f.objects.insert(key(&name), o.clone());
                (200, o)
            }
            ("PATCH", Some(name)) => {
                // Server-side apply of a whole object: upsert; a resourceVersion in the body
                // is a precondition.
                let want = &body["metadata"]["resourceVersion"];
                let cur = f
                    .objects
                    .get(&key(&name))
                    .map(|o| &o["metadata"]["resourceVersion"]);
                if !want.is_null() && cur != Some(want) {
                    return (
                        409,
                        status_body(409, "Conflict", "the object has been modified"),
                    );
                }
                f.rv += 1;
                let mut o = body.clone();
                o["metadata"]["resourceVersion"] = json!(f.rv.to_string());
                f.objects.insert(key(&name), o.clone());
                (200, o)
            }
            ("DELETE", Some(name)) => {
                let Some(cur) = f.objects.get(&key(&name)) else {
                    return (404, status_body(404, "NotFound", "not found"));
                };
                let want = &body["preconditions"]["resourceVersion"];
                if !want.is_null() && *want != cur["metadata"]["resourceVersion"] {
                    return (409, status_body(409, "Conflict", "precondition failed"));
                }
                f.objects.remove(&key(&name));
                (
                    200,
                    json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Success","code":200}),
                )
            }
            other => panic!("unexpected request {other:?} {path}"),
        }
    }

    fn status_body(code: u16, reason: &str, message: &str) -> serde_json::Value {
        json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
               "message":message,"reason":reason,"code":code})
    }

    /// A store backed by `fake`; the server task ends when aborted.
    fn store(fake: &Shared) -> (KubeStore, tokio::task::JoinHandle<()>) {
        let (client, mut h) = mock_client();
        let f = fake.clone();
        let task = tokio::spawn(async move {
            while let Some((req, body, send)) = next_untimed(&mut h).await {
                let (code, v) = serve(
                    &f,
                    req.method().as_str(),
                    req.uri().path(),
                    req.uri().query().unwrap_or(""),
                    &body,
                );
                let _ = status; // the shared helper shapes the same Status bodies
                let delay = {
                    let g = lock(&f);
                    g.delay_at
                        .filter(|(n, _)| *n + 1 == g.log.len())
                        .map(|(_, d)| d)
                };
                match delay {
                    Some(d) => {
                        tokio::spawn(async move {
                            tokio::time::sleep(d).await;
                            send.send_response(resp(code, &v));
                        });
                    }
                    None => send.send_response(resp(code, &v)),
                }
            }
        });
        (KubeStore::new(client, NS), task)
    }

    /// Root `root`, intermediate `team` under it, bundle `mesh` (holding `team`) published to
    /// namespace `apps`; returns the two CAs.
    fn seed(fake: &Shared) -> (CaMaterial, CaMaterial) {
        let now = OffsetDateTime::now_utc();
        let root = create_root(&CaSpec::root("root"), now).unwrap();
        let mut is = CaSpec::root("team");
        is.parent = Some("root".into());
        let team = create_intermediate(&is, &root, now).unwrap();
        let mut f = lock(fake);
        for ca in [&root, &team] {
            let mut m = ca_secret_manifest(ca, NS).unwrap();
            m["metadata"]["resourceVersion"] = json!("1");
            f.objects.insert(
                format!(
                    "api/v1/namespaces/{NS}/secrets/{}",
                    ca_secret_name(&ca.meta.name)
                ),
                m,
            );
        }
        let spec = BundleSpec {
            name: "mesh".into(),
            cas: vec!["team".into()],
            file: None,
            namespaces: vec!["apps".into()],
        };
        f.objects.insert(
            format!("api/v1/namespaces/{NS}/configmaps/meshca-bundle-mesh"),
            json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"meshca-bundle-mesh",
                "namespace":NS,"resourceVersion":"1",
                "labels":{LABEL_MANAGED_BY:MANAGED_BY,"meshca.io/bundle-spec":"mesh"}},
                "data":{"bundle.json":serde_json::to_string(&spec).unwrap()}}),
        );
        f.rv = 1;
        (root, team)
    }

    fn writes(fake: &Shared, from: usize) -> Vec<Logged> {
        lock(fake).log[from..]
            .iter()
            .filter(|l| l.method != "GET")
            .cloned()
            .collect()
    }

    fn certs(pem: &serde_json::Value) -> usize {
        pem.as_str().unwrap().matches("BEGIN CERTIFICATE").count()
    }

    fn object(fake: &Shared, path: &str) -> Option<serde_json::Value> {
        lock(fake).objects.get(path).cloned()
    }

    const CM: &str = "api/v1/namespaces/meshca/configmaps";
    const SECRETS: &str = "api/v1/namespaces/meshca/secrets";
    const LEASES: &str = "apis/coordination.k8s.io/v1/namespaces/meshca/leases";

    fn opts() -> RotateOptions {
        RotateOptions::default()
    }

    /// Runs prepare on `root`, which must fail; its error.
    async fn prepare_fails(s: &KubeStore) -> String {
        let now = OffsetDateTime::now_utc();
        match run_phase(s, "root", Request::Prepare, &opts(), now).await {
            Ok(r) => panic!("prepare went ahead: {r:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn forced() -> RotateOptions {
        RotateOptions {
            force: true,
            ..opts()
        }
    }

    /// Since request `mark`, a refused phase wrote nothing but its lock.
    fn assert_only_the_lock(fake: &Shared, mark: usize) {
        let lines: Vec<String> = writes(fake, mark).iter().map(Logged::line).collect();
        assert_eq!(
            lines,
            [
                format!("POST /{LEASES}"),
                format!("DELETE /{LEASES}/meshca-rotation")
            ],
            "a refused phase writes nothing but the lock"
        );
    }

    #[tokio::test]
    async fn the_phases_send_exactly_these_writes_with_preconditions() {
        let fake: Shared = Default::default();
        let (root, team) = seed(&fake);
        let (s, task) = store(&fake);
        let now = OffsetDateTime::now_utc();

        // prepare
        run_phase(&s, "root", Request::Prepare, &opts(), now)
            .await
            .unwrap();
        let w = writes(&fake, 0);
        let lines: Vec<String> = w.iter().map(Logged::line).collect();
        assert_eq!(
            lines,
            [
                format!("POST /{LEASES}"),
                format!("POST /{CM}"),
                format!("POST /{SECRETS}"),
                format!("PUT /{CM}/meshca-rotation-root"),
                "PATCH /api/v1/namespaces/apps/configmaps/mesh-trust-bundle".to_string(),
                format!("PUT /{CM}/meshca-rotation-root"),
                format!("DELETE /{LEASES}/meshca-rotation"),
            ]
        );
        // The lock names this process and expires.
        assert!(w[0].body["spec"]["holderIdentity"]
            .as_str()
            .unwrap()
            .starts_with(&format!("pid {} on ", std::process::id())));
        assert_eq!(w[0].body["spec"]["leaseDurationSeconds"], LEASE_SECONDS);
        // Record: created with the first step, then replaced at the version read.
        let st: RotationState =
            serde_json::from_str(w[1].body["data"]["state.json"].as_str().unwrap()).unwrap();
        assert_eq!(st.steps.len(), 1);
        assert_eq!(st.steps[0].step, "started");
        assert!(w[1].query.contains("fieldManager=meshca"), "{}", w[1].query);
        // The replace carries the version the record was created at (seed 1, lease 2).
        assert_eq!(w[3].body["metadata"]["resourceVersion"], "3");
        // Slot: both CAs, keys included, no meshca.io/ca label (never served), Opaque.
        let slot = &w[2].body;
        assert_eq!(slot["metadata"]["name"], "meshca-rotation-root-next");
        assert_eq!(slot["type"], "Opaque");
        assert!(slot["metadata"]["labels"]["meshca.io/ca"].is_null());
        assert_eq!(slot["metadata"]["labels"][LABEL_ROTATION], "root");
        for k in [
            "cas.json",
            "root.chain.pem",
            "root.key.pem",
            "team.meta.json",
            "team.chain.pem",
            "team.key.pem",
        ] {
            assert!(slot["data"][k].is_string(), "{k}");
        }
        // The bundle ConfigMap holds both roots, applied by forced SSA.
        assert!(w[4].query.contains("fieldManager=meshca") && w[4].query.contains("force=true"));
        assert_eq!(certs(&w[4].body["data"]["ca.crt"]), 2);
        // The lock is deleted at the version this process holds.
        assert!(
            w[6].body["preconditions"]["resourceVersion"].is_string(),
            "{}",
            w[6].body
        );
        assert!(object(&fake, &format!("{LEASES}/meshca-rotation")).is_none());
        let next = s.load_rotation_cas("root", Slot::Next).await.unwrap();
        assert_eq!(next.len(), 2);
        assert_eq!(next[1].root(), &next[0].cert, "next team under next root");

        // activate
        let mark = lock(&fake).log.len();
        run_phase(
            &s,
            "root",
            Request::Activate,
            &RotateOptions {
                renew_now: true,
                ..opts()
            },
            now,
        )
        .await
        .unwrap();
        let lines: Vec<String> = writes(&fake, mark).iter().map(Logged::line).collect();
        assert_eq!(
            lines,
            [
                format!("POST /{LEASES}"),
                format!("PUT /{CM}/meshca-rotation-root"),
                format!("POST /{SECRETS}"),
                format!("PUT /{CM}/meshca-rotation-root"),
                format!("PATCH /{SECRETS}/meshca-ca-root"),
                format!("PUT /{CM}/meshca-rotation-root"),
                format!("PATCH /{SECRETS}/meshca-ca-team"),
                format!("PUT /{CM}/meshca-rotation-root"),
                format!("PUT /{CM}/meshca-rotation-root"),
                format!("DELETE /{SECRETS}/meshca-rotation-root-next"),
                "PATCH /api/v1/namespaces/apps/configmaps/mesh-trust-bundle".to_string(),
                format!("DELETE /{LEASES}/meshca-rotation"),
            ]
        );
        // Each CA swap is conditional on the version of the CA Secret just read.
        let swaps: Vec<Logged> = writes(&fake, mark)
            .into_iter()
            .filter(|l| l.method == "PATCH" && l.path.contains("/secrets/meshca-ca-"))
            .collect();
        assert_eq!(swaps.len(), 2);
        for sw in &swaps {
            assert!(
                sw.body["metadata"]["resourceVersion"].is_string(),
                "{}",
                sw.path
            );
            assert!(sw.query.contains("force=true"), "{}", sw.query);
        }
        assert_eq!(s.load_ca("root").await.unwrap().cert, next[0].cert);
        assert_eq!(s.load_ca("team").await.unwrap().cert, next[1].cert);
        let prev = s.load_rotation_cas("root", Slot::Previous).await.unwrap();
        assert_eq!(
            (prev[0].cert.clone(), prev[1].cert.clone()),
            (root.cert.clone(), team.cert.clone())
        );
        let st = s.load_rotation("root").await.unwrap().unwrap();
        assert_eq!((st.phase, st.renew_now), (Phase::Active, true));
        assert!(crate::store::rotate::renew_now_for(&s, "team")
            .await
            .unwrap());

        // prune: refused while the ledger holds a live certificate of the old team CA.
        let old_team = prev.into_iter().nth(1).unwrap();
        let w = leaf_from(old_team, now).await;
        s.record(&crate::issue::LedgerEntry::for_cert("team", &w, now))
            .await
            .unwrap();
        let mark = lock(&fake).log.len();
        let e = run_phase(&s, "root", Request::Prune, &opts(), now)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("prune refused") && e.contains(&w.info.serial_hex()),
            "{e}"
        );
        assert_only_the_lock(&fake, mark);
        let mark = lock(&fake).log.len();
        let r = run_phase(&s, "root", Request::Prune, &forced(), now)
            .await
            .unwrap();
        assert_eq!(r.forced_past.len(), 1);
        let w = writes(&fake, mark);
        let lines: Vec<String> = w.iter().map(Logged::line).collect();
        assert_eq!(
            lines,
            [
                format!("POST /{LEASES}"),
                format!("PUT /{CM}/meshca-rotation-root"),
                format!("DELETE /{SECRETS}/meshca-rotation-root-previous"),
                format!("DELETE /{SECRETS}/meshca-rotation-root-next"),
                "PATCH /api/v1/namespaces/apps/configmaps/mesh-trust-bundle".to_string(),
                format!("DELETE /{SECRETS}/meshca-rotation-root-next"),
                format!("DELETE /{SECRETS}/meshca-rotation-root-previous"),
                format!("DELETE /{CM}/meshca-rotation-root"),
                format!("DELETE /{LEASES}/meshca-rotation"),
            ]
        );
        assert_eq!(certs(&w[4].body["data"]["ca.crt"]), 1, "old root gone");
        assert!(s.list_rotations().await.unwrap().is_empty());
        let b = s.load_bundle("mesh").await.unwrap();
        assert_eq!(
            bundle_anchors(&s, &b).await.unwrap(),
            vec![next[0].cert.clone()]
        );
        task.abort();
    }

    /// The stored objects after a phase, each with what must not depend on interruptions:
    /// a record's phase, a slot's CA names, a trust bundle's number of roots.
    fn summary(fake: &Shared) -> Vec<(String, String)> {
        lock(fake)
            .objects
            .iter()
            .map(|(k, v)| {
                let d = &v["data"];
                let what = if let Some(st) = d["state.json"].as_str() {
                    let st: RotationState = serde_json::from_str(st).unwrap();
                    format!("{} {}", st.phase, st.cas.join(","))
                } else if let Some(c) = d["cas.json"].as_str() {
                    let raw = base64::engine::general_purpose::STANDARD.decode(c).unwrap();
                    String::from_utf8(raw).unwrap()
                } else if d["ca.crt"].is_string() && v["kind"] == "ConfigMap" {
                    format!("{} roots", certs(&d["ca.crt"]))
                } else {
                    String::new()
                };
                (k.clone(), what)
            })
            .collect()
    }

    /// The process "dies" after its N-th request (every later one fails); its Lease then
    /// names a pid that no longer exists. Re-running the phase takes the stale lock over and
    /// finishes the phase, for every N.
    #[tokio::test(start_paused = true)]
    async fn a_phase_cut_after_any_request_finishes_on_rerun() {
        let now = OffsetDateTime::now_utc();
        for req in [Request::Prepare, Request::Activate, Request::Prune] {
            // The number of requests of an uninterrupted run, and its final objects.
            let reference: Shared = Default::default();
            seed(&reference);
            let (s, task) = store(&reference);
            let force = forced();
            for earlier in [Request::Prepare, Request::Activate] {
                if earlier == req {
                    break;
                }
                run_phase(&s, "root", earlier, &opts(), now).await.unwrap();
            }
            let start_state = lock(&reference).objects.clone();
            let mark = lock(&reference).log.len();
            run_phase(&s, "root", req, &force, now).await.unwrap();
            let total = lock(&reference).log.len() - mark;
            let want = summary(&reference);
            task.abort();
            for cut in 0..total {
                let fake: Shared = Default::default();
                {
                    let mut f = lock(&fake);
                    f.objects = start_state.clone();
                    f.rv = 1000;
                    f.fail_after = Some(cut);
                }
                let (s, task) = store(&fake);
                let first = run_phase(&s, "root", req, &force, now).await;
                // Only the lock's release comes after the last step: losing it is no failure
                // of the phase (the Lease is left behind, to be taken over).
                assert_eq!(
                    first.is_ok(),
                    cut == total - 1,
                    "{req:?} cut after {cut} of {total} requests: {first:?}"
                );
                {
                    let mut f = lock(&fake);
                    f.fail_after = None;
                    f.log.clear();
                    let lease = format!("{LEASES}/meshca-rotation");
                    if let Some(l) = f.objects.get_mut(&lease) {
                        l["spec"]["holderIdentity"] = json!(format!(
                            "pid 4194304 on {}: meshca ca rotate root (killed)",
                            crate::store::host_name()
                        ));
                        l["spec"]["renewTime"] = json!("2020-01-01T00:00:00.000000Z");
                    }
                }
                if first.is_err() {
                    run_phase(&s, "root", req, &force, now)
                        .await
                        .unwrap_or_else(|e| panic!("{req:?} cut after {cut}: re-run: {e}"));
                    assert!(object(&fake, &format!("{LEASES}/meshca-rotation")).is_none());
                }
                let mut got = summary(&fake);
                got.retain(|(k, _)| !k.starts_with(LEASES));
                assert_eq!(got, want, "{req:?} cut after {cut} of {total}");
                if req != Request::Prune {
                    let st = s.load_rotation("root").await.unwrap().unwrap();
                    assert_eq!(
                        st.phase,
                        if req == Request::Prepare {
                            Phase::Prepared
                        } else {
                            Phase::Active
                        }
                    );
                    let slot = if req == Request::Prepare {
                        Slot::Next
                    } else {
                        Slot::Previous
                    };
                    assert_eq!(s.load_rotation_cas("root", slot).await.unwrap().len(), 2);
                }
                task.abort();
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_live_lock_refuses_a_second_phase_naming_its_holder() {
        let fake: Shared = Default::default();
        seed(&fake);
        let holder = crate::store::lock_holder("meshca ca rotate root --phase prepare");
        lock(&fake).objects.insert(
            format!("{LEASES}/meshca-rotation"),
            serde_json::to_value(lease_manifest(&holder, NS, OffsetDateTime::now_utc()).unwrap())
                .unwrap(),
        );
        let (s, task) = store(&fake);
        let e = prepare_fails(&s).await;
        assert!(
            e.contains("another rotation phase holds the lock") && e.contains(&holder),
            "{e}"
        );
        let lines: Vec<String> = lock(&fake).log.iter().map(Logged::line).collect();
        assert_eq!(
            lines,
            [
                format!("POST /{LEASES}"),
                format!("GET /{LEASES}/meshca-rotation")
            ]
        );
        // An expired lease is taken over by a replace at the version read.
        {
            let mut f = lock(&fake);
            let l = f
                .objects
                .get_mut(&format!("{LEASES}/meshca-rotation"))
                .unwrap();
            l["spec"]["renewTime"] = json!("2020-01-01T00:00:00.000000Z");
            l["metadata"]["resourceVersion"] = json!("77");
            f.log.clear();
        }
        let l = s.lock_rotation_kube("me").await.unwrap();
        let put = writes(&fake, 0);
        assert_eq!(put[1].line(), format!("PUT /{LEASES}/meshca-rotation"));
        assert_eq!(put[1].body["metadata"]["resourceVersion"], "77");
        assert_eq!(put[1].body["spec"]["holderIdentity"], "me");
        Box::new(l).release().await.unwrap();
        task.abort();
    }

    /// Issue 17: a failed renewal was only logged, and the phase went on writing after
    /// another process had taken the lock over. It must stop before its next write.
    #[tokio::test(start_paused = true)]
    async fn a_phase_that_lost_its_lock_writes_nothing_more() {
        let fake: Shared = Default::default();
        seed(&fake);
        {
            let mut f = lock(&fake);
            // Right after the lock is taken, another process takes it over, and this
            // phase's next answer comes only after its renewal has failed.
            f.steal_at = Some(1);
            f.delay_at = Some((1, LEASE_RENEW + Duration::from_secs(10)));
        }
        let (s, task) = store(&fake);
        let e = prepare_fails(&s).await;
        assert!(e.contains("lost the rotation lock"), "{e}");
        let lines: Vec<String> = writes(&fake, 0).iter().map(Logged::line).collect();
        assert_eq!(
            lines,
            [
                format!("POST /{LEASES}"),
                format!("PUT /{LEASES}/{ROTATION_LEASE}"),
                format!("DELETE /{LEASES}/{ROTATION_LEASE}"),
            ],
            "nothing written after the failed renewal"
        );
        assert!(object(&fake, &format!("{CM}/meshca-rotation-root")).is_none());
        let l = object(&fake, &format!("{LEASES}/{ROTATION_LEASE}")).unwrap();
        assert_eq!(
            l["spec"]["holderIdentity"], "pid 1 on other-host: meshca ca rotate",
            "the new holder's lock is left alone"
        );
        task.abort();
    }

    /// Issue 17: takeover compared another writer's renewTime with the local clock, and
    /// trusted `/proc/<pid>` when the host name matched. A Lease is stale only once this
    /// process has seen it unchanged for its whole duration on its own monotonic clock.
    #[tokio::test(start_paused = true)]
    async fn a_lease_is_taken_over_only_after_it_stays_unchanged_for_its_duration() {
        let fake: Shared = Default::default();
        seed(&fake);
        let key = format!("{LEASES}/{ROTATION_LEASE}");
        // A live phase on a host whose clock is far behind: its renewTime looks expired here.
        let holder = "pid 7 on other-host: meshca ca rotate root --phase activate";
        let mut l =
            serde_json::to_value(lease_manifest(holder, NS, OffsetDateTime::now_utc()).unwrap())
                .unwrap();
        l["spec"]["renewTime"] = json!("2020-01-01T00:00:00.000000Z");
        l["metadata"]["resourceVersion"] = json!("50");
        lock(&fake).objects.insert(key.clone(), l);
        let (s, task) = store(&fake);
        let (f2, k2) = (fake.clone(), key.clone());
        let renewer = tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEASE_RENEW).await;
                let mut f = lock(&f2);
                f.rv += 1;
                let rv = f.rv.to_string();
                f.objects.get_mut(&k2).unwrap()["metadata"]["resourceVersion"] = json!(rv);
            }
        });
        let e = match s.lock_rotation_kube("me").await {
            Ok(_) => panic!("took over a lock whose holder keeps renewing it"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains("another rotation phase holds the lock") && e.contains(holder),
            "{e}"
        );
        // The holder dies. Its host name is ours and its pid is gone, and the Lease looks
        // fresh: neither says anything across PID namespaces or clocks.
        renewer.abort();
        let dead = format!(
            "pid 4194304 on {}: meshca ca rotate root (killed)",
            crate::store::host_name()
        );
        {
            let mut f = lock(&fake);
            let l = f.objects.get_mut(&key).unwrap();
            l["spec"]["holderIdentity"] = json!(dead);
            l["spec"]["renewTime"] = json!(rfc3339_micro(OffsetDateTime::now_utc()));
        }
        let e = match s.lock_rotation_kube("me").await {
            Ok(_) => panic!("took over a fresh-looking lock because a local pid is gone"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(&dead), "{e}");
        // Once it looks expired here too, it is taken over after a full lease duration of
        // seeing it unchanged.
        lock(&fake).objects.get_mut(&key).unwrap()["spec"]["renewTime"] =
            json!("2020-01-01T00:00:00.000000Z");
        let t = tokio::time::Instant::now();
        let held = s
            .lock_rotation_kube("me")
            .await
            .map_err(|e| e.to_string())
            .unwrap();
        assert!(
            t.elapsed() >= Duration::from_secs(LEASE_SECONDS as u64),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(object(&fake, &key).unwrap()["spec"]["holderIdentity"], "me");
        Box::new(held).release().await.unwrap();
        task.abort();
    }

    /// The seeded rotation of `root`, prepared and activated.
    async fn active(fake: &Shared) -> (KubeStore, tokio::task::JoinHandle<()>, OffsetDateTime) {
        seed(fake);
        let (s, task) = store(fake);
        let now = OffsetDateTime::now_utc();
        for req in [Request::Prepare, Request::Activate] {
            run_phase(&s, "root", req, &opts(), now).await.unwrap();
        }
        (s, task, now)
    }

    /// Issue 17: prune trusted the ledger alone. A certificate of the old CA that is live in
    /// the cluster (a TLS Secret, a CSR) but missing from the ledger blocks prune.
    #[tokio::test]
    async fn prune_refuses_while_the_cluster_holds_live_certificates_of_the_old_ca() {
        let fake: Shared = Default::default();
        let (s, task, now) = active(&fake).await;
        let mut serials = Vec::new();
        let mut pems = Vec::new();
        for _ in 0..2 {
            let previous = s.load_rotation_cas("root", Slot::Previous).await.unwrap();
            let old_team = previous.into_iter().nth(1).unwrap();
            let w = leaf_from(old_team, now).await;
            serials.push(w.info.serial_hex());
            pems.push(w.chain_pem());
        }
        {
            let mut f = lock(&fake);
            f.objects.insert(
                "api/v1/namespaces/app/secrets/web-tls".into(),
                json!({"apiVersion":"v1","kind":"Secret","type":"kubernetes.io/tls",
                       "metadata":{"name":"web-tls","namespace":"app","resourceVersion":"1"},
                       "data":{"tls.crt": b64(pems[0].as_bytes()), "tls.key": b64(b"unused")}}),
            );
            f.objects.insert(
                "apis/certificates.k8s.io/v1/certificatesigningrequests/c1".into(),
                json!({"apiVersion":"certificates.k8s.io/v1","kind":"CertificateSigningRequest",
                       "metadata":{"name":"c1","resourceVersion":"1"},
                       "spec":{"request": b64(b"unused"), "signerName":"meshca.io/team", "usages":[]},
                       "status":{"certificate": b64(pems[1].as_bytes())}}),
            );
        }
        let mark = lock(&fake).log.len();
        let e = run_phase(&s, "root", Request::Prune, &opts(), now)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("prune refused"), "{e}");
        assert!(
            e.contains("secret app/web-tls") && e.contains(&serials[0]),
            "{e}"
        );
        assert!(e.contains("csr c1") && e.contains(&serials[1]), "{e}");
        assert_only_the_lock(&fake, mark);
        let r = run_phase(&s, "root", Request::Prune, &forced(), now)
            .await
            .unwrap();
        assert_eq!(r.forced_past.len(), 2, "{:?}", r.forced_past);
        task.abort();
    }

    /// Prune does not run blind: when the certificates in use cannot be listed, it is refused
    /// without `--force`, and `--force` names what it did not check.
    #[tokio::test]
    async fn prune_refuses_when_it_cannot_check_the_cluster() {
        let fake: Shared = Default::default();
        let (s, task, now) = active(&fake).await;
        lock(&fake).forbid_cluster_lists = true;
        let e = run_phase(&s, "root", Request::Prune, &opts(), now)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("prune refused: cannot check") && e.contains("forbidden"),
            "{e}"
        );
        let st = crate::store::rotate::status(&s, "root", now).await.unwrap();
        assert!(
            st.blocked_by.iter().any(|b| b.contains("cannot check")),
            "{:?}",
            st.blocked_by
        );
        let r = run_phase(&s, "root", Request::Prune, &forced(), now)
            .await
            .unwrap();
        assert!(
            r.forced_past.iter().any(|f| f.contains("not checked")),
            "{:?}",
            r.forced_past
        );
        task.abort();
    }

    /// A record write by a process that missed a step (its steps do not extend the stored
    /// ones) is refused instead of rewinding the rotation.
    #[tokio::test]
    async fn a_record_that_does_not_extend_the_stored_one_is_refused() {
        let fake: Shared = Default::default();
        seed(&fake);
        let (s, task) = store(&fake);
        let now = OffsetDateTime::now_utc();
        let mut a = RotationState::new("root", vec!["root".into()], now);
        a.step("started", now);
        s.save_rotation(&a).await.unwrap();
        let mut b = a.clone();
        b.step("next-created", now);
        s.save_rotation(&b).await.unwrap();
        a.step("other", now);
        let e = s.save_rotation(&a).await.unwrap_err().to_string();
        assert!(e.contains("changed by another process"), "{e}");
        // A second create of the same slot is AlreadyExists.
        let root = s.load_ca("root").await.unwrap();
        s.save_rotation_cas("root", Slot::Next, std::slice::from_ref(&root))
            .await
            .unwrap();
        assert!(matches!(
            s.save_rotation_cas("root", Slot::Next, &[root]).await,
            Err(Error::AlreadyExists(_))
        ));
        task.abort();
    }
}
