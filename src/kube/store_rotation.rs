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
//! - The lock is a Lease created by the phase's process (409: someone holds it). A Lease
//!   whose `renewTime + leaseDurationSeconds` has passed, or whose holder names a process of
//!   this host that no longer exists (a phase killed with kill -9), is taken over by a
//!   replace at the resourceVersion read. The holder renews it every
//!   [`LEASE_RENEW`] while the phase runs and deletes it (precondition: its own
//!   resourceVersion) when done.

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
use crate::store::{holder_pid_on_this_host, lock_busy, PhaseLock, Slot};

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

    pub(super) async fn lock_rotation_kube(&self, holder: &str) -> Result<KubePhaseLock> {
        let api: Api<Lease> = Api::namespaced(self.client().clone(), self.namespace());
        for _ in 0..3 {
            let now = OffsetDateTime::now_utc();
            let mut lease = lease_manifest(holder, self.namespace(), now)?;
            match api.create(&pp(), &lease).await {
                Ok(l) => return Ok(KubePhaseLock::start(api, l)),
                Err(e) if api_code(&e) == Some(409) => {}
                Err(e) => return Err(kube_err("creating the rotation lock Lease", e)),
            }
            let Some(cur) = api
                .get_opt(ROTATION_LEASE)
                .await
                .map_err(|e| kube_err("reading the rotation lock Lease", e))?
            else {
                continue; // released meanwhile
            };
            let (who, until) = lease_holder(&cur);
            let dead_here = holder_pid_on_this_host(&who)
                .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists());
            let expired = until.is_none_or(|t| t < now);
            if !(expired || dead_here) {
                let until = until.map(|t| format!(", valid until {}", super::rfc3339(t)));
                return Err(lock_busy(&format!(
                    "{who}{}; Lease {}/{ROTATION_LEASE}",
                    until.unwrap_or_default(),
                    self.namespace()
                )));
            }
            tracing::warn!(holder = %who, "taking over a stale rotation lock");
            lease.metadata.resource_version = cur.metadata.resource_version.clone();
            match api.replace(ROTATION_LEASE, &pp(), &lease).await {
                Ok(l) => return Ok(KubePhaseLock::start(api, l)),
                Err(e) if api_code(&e) == Some(409) => continue,
                Err(e) => return Err(kube_err("taking over the rotation lock Lease", e)),
            }
        }
        Err(lock_busy(&format!(
            "Lease {}/{ROTATION_LEASE} keeps changing",
            self.namespace()
        )))
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

/// A Lease's holder and the time its hold ends (`None`: unreadable, treated as expired).
fn lease_holder(l: &Lease) -> (String, Option<OffsetDateTime>) {
    let v = serde_json::to_value(l).unwrap_or_default();
    let who = v["spec"]["holderIdentity"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let until = v["spec"]["renewTime"]
        .as_str()
        .and_then(|t| OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok())
        .zip(v["spec"]["leaseDurationSeconds"].as_i64())
        .map(|(t, d)| t + time::Duration::seconds(d));
    (who, until)
}

/// The held phase lock: renewed in the background until released.
pub struct KubePhaseLock {
    api: Api<Lease>,
    lease: Arc<Mutex<Lease>>,
    renewer: tokio::task::JoinHandle<()>,
}

impl KubePhaseLock {
    fn start(api: Api<Lease>, lease: Lease) -> Self {
        let lease = Arc::new(Mutex::new(lease));
        let (a, l) = (api.clone(), lease.clone());
        let renewer = tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEASE_RENEW).await;
                let mut next = l.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let renew = rfc3339_micro(OffsetDateTime::now_utc());
                let mut v = serde_json::to_value(&next).unwrap_or_default();
                v["spec"]["renewTime"] = json!(renew);
                match serde_json::from_value::<Lease>(v) {
                    Ok(x) => next = x,
                    Err(_) => return,
                }
                match a.replace(ROTATION_LEASE, &pp(), &next).await {
                    Ok(done) => *l.lock().unwrap_or_else(|p| p.into_inner()) = done,
                    Err(e) => {
                        tracing::warn!(error = %e, "renewing the rotation lock failed");
                    }
                }
            }
        });
        KubePhaseLock {
            api,
            lease,
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
    async fn release(self: Box<Self>) -> Result<()> {
        self.renewer.abort();
        let rv = self
            .lease
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .metadata
            .resource_version
            .clone();
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
