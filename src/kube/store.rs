//! [`KubeStore`]: the meshca store in one Kubernetes namespace.
//!
//! Layout (all objects labelled `app.kubernetes.io/managed-by: meshca`):
//! ```text
//! Secret    meshca-ca-<name>               type kubernetes.io/tls, label meshca.io/ca=<name>
//!           tls.crt  the CA certificate followed by its parents up to the root
//!           tls.key  the CA key, PKCS#8 PEM (empty for remote-key backends such as ACM PCA)
//!           ca.crt   the root at the top of the chain
//!           annotation meshca.io/meta: the CA's facts and policy (JSON)
//! ConfigMap meshca-bundle-<name>           label meshca.io/bundle-spec=<name>; bundle.json
//! ConfigMap meshca-ledger-<yyyymmdd>-<n>   label meshca.io/ledger=true; ledger.jsonl
//! ```
//! A CA is created with a plain create (so two concurrent `init`s cannot both win) and
//! replaced with server-side apply (field manager `meshca`, forced) carrying the
//! resourceVersion it was read at as a precondition. The ledger is sharded
//! by day and by size (each shard stays under 256 kB, a quarter of the 1 MiB object limit: every
//! append rewrites the whole shard, so its size is the cost of each write); appends use
//! optimistic concurrency (resourceVersion) and retry on conflict, so no line is lost.

use std::collections::BTreeMap;

use async_trait::async_trait;
use base64::Engine as _;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;

use super::{api_code, kube_err, FIELD_MANAGER, LABEL_CA, LABEL_MANAGED_BY, MANAGED_BY};
use crate::bundle::BundleSpec;
use crate::ca::{validate_ca_name, CaMaterial, CaMeta};
use crate::error::{Error, Result};
use crate::issue::LedgerEntry;
use crate::key::PrivateKey;
use crate::pemutil;
use crate::rotation::RotationState;
use crate::store::{PhaseLock, SaveOutcome, Slot, Store};

/// Annotation holding a CA's [`CaMeta`] as JSON.
pub const ANNOTATION_META: &str = "meshca.io/meta";
/// Label of bundle-definition ConfigMaps.
pub const LABEL_BUNDLE_SPEC: &str = "meshca.io/bundle-spec";
/// Label of ledger shards.
pub const LABEL_LEDGER: &str = "meshca.io/ledger";
const LEDGER_SHARD_LIMIT: usize = 256_000;
const LEDGER_MAX_CONFLICTS: u32 = 20;

/// Event reason on a CA Secret whose CA failed to load and is not served.
pub const EVENT_CA_LOAD_FAILED: &str = "CaLoadFailed";

/// The Secret name of a CA.
pub fn ca_secret_name(ca: &str) -> String {
    format!("meshca-ca-{ca}")
}

/// The ConfigMap name of a bundle definition.
pub fn bundle_spec_name(bundle: &str) -> String {
    format!("meshca-bundle-{bundle}")
}

/// A store in one namespace of a cluster.
#[derive(Clone)]
pub struct KubeStore {
    client: kube::Client,
    namespace: String,
    /// The last ledger shard appended to: appends start there instead of reading every full
    /// shard of the day again, and without reading it again at all while no one else wrote it.
    ledger_hint: std::sync::Arc<std::sync::Mutex<Option<LedgerTail>>>,
}

/// The ledger shard this store last wrote.
#[derive(Clone)]
struct LedgerTail {
    day: String,
    n: u32,
    /// The shard as the API server returned it from that write (its resourceVersion the
    /// precondition of the next one); `None` once a conflict says someone else wrote it.
    shard: Option<ConfigMap>,
}

impl std::fmt::Debug for KubeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeStore")
            .field("namespace", &self.namespace)
            .finish()
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The Secret manifest (as applied) of a CA.
pub fn ca_secret_manifest(ca: &CaMaterial, namespace: &str) -> Result<serde_json::Value> {
    let meta = serde_json::to_string(&ca.meta).map_err(|e| Error::Build(e.to_string()))?;
    let key = ca.key.as_ref().map(|k| k.to_pkcs8_pem());
    let key_bytes: &[u8] = key.as_ref().map(|k| k.as_bytes()).unwrap_or(b"");
    Ok(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": ca_secret_name(&ca.meta.name),
            "namespace": namespace,
            "labels": { LABEL_MANAGED_BY: MANAGED_BY, LABEL_CA: ca.meta.name },
            "annotations": { ANNOTATION_META: meta },
        },
        "type": "kubernetes.io/tls",
        "data": {
            "tls.crt": b64(ca.chain_pem().as_bytes()),
            "tls.key": b64(key_bytes),
            "ca.crt": b64(pemutil::certs_to_pem([ca.root()]).as_bytes()),
        }
    }))
}

/// Reads a CA back from its Secret.
pub fn ca_from_secret(name: &str, s: &Secret) -> Result<CaMaterial> {
    let sname = ca_secret_name(name);
    let labelled = s
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_CA))
        .is_some_and(|v| v == name);
    if !labelled {
        return Err(Error::Corrupt(format!(
            "Secret {sname} is not labelled {LABEL_CA}={name}"
        )));
    }
    let meta_json = s
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_META))
        .ok_or_else(|| {
            Error::Corrupt(format!(
                "Secret {sname} has no {ANNOTATION_META} annotation"
            ))
        })?;
    let data = s.data.as_ref();
    let get = |k: &str| data.and_then(|d| d.get(k)).map(|b| b.0.as_slice());
    let crt =
        get("tls.crt").ok_or_else(|| Error::Corrupt(format!("Secret {sname} has no tls.crt")))?;
    let ca = ca_from_parts(&format!("Secret {sname}"), meta_json, crt, get("tls.key"))?;
    if ca.meta.name != name {
        return Err(Error::Corrupt(format!(
            "Secret {sname} describes CA {:?}",
            ca.meta.name
        )));
    }
    Ok(ca)
}

/// A CA from its stored parts: the [`CaMeta`] JSON, the chain PEM (the CA first) and the
/// key PEM (absent or empty for remote-key backends). `what` names the object in errors,
/// which never echo key material.
pub fn ca_from_parts(
    what: &str,
    meta_json: &str,
    crt: &[u8],
    key: Option<&[u8]>,
) -> Result<CaMaterial> {
    let meta: CaMeta = serde_json::from_str(meta_json)
        .map_err(|e| Error::Corrupt(format!("{what} {ANNOTATION_META}: {e}")))?;
    let chain = pemutil::parse_certs(crt, &format!("{what} tls.crt"))
        .map_err(|e| Error::Corrupt(e.to_string()))?;
    let key = match key.filter(|k| !k.is_empty()) {
        Some(k) => {
            let text = zeroize::Zeroizing::new(k.to_vec());
            let s = std::str::from_utf8(&text)
                .map_err(|_| Error::Corrupt(format!("{what} tls.key is not PEM text")))?;
            Some(
                PrivateKey::from_pem(s, &format!("{what} tls.key"))
                    .map_err(|e| Error::Corrupt(e.to_string()))?,
            )
        }
        None => None,
    };
    let mut it = chain.into_iter();
    let cert = it
        .next()
        .ok_or_else(|| Error::Corrupt(format!("{what} tls.crt is empty")))?;
    let ca = CaMaterial {
        meta,
        cert,
        parents: it.collect(),
        key,
    };
    ca.validate()?;
    Ok(ca)
}

impl KubeStore {
    /// A store in `namespace` reached through `client`.
    pub fn new(client: kube::Client, namespace: impl Into<String>) -> Self {
        KubeStore {
            client,
            namespace: namespace.into(),
            ledger_hint: Default::default(),
        }
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The client.
    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn configmaps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Writes (creates or updates) a `kubernetes.io/tls`-shaped Secret `namespace/name` with
    /// `tls.crt`, `tls.key` and `ca.crt` by server-side apply (field manager `meshca-issue`,
    /// forced: its own manager, so it neither strips nor is stripped by the managed-Secret
    /// controller's fields).
    /// An existing Secret keeps its type and its other keys.
    pub async fn apply_tls_secret(
        &self,
        namespace: &str,
        name: &str,
        tls_crt: &str,
        tls_key: &str,
        ca_crt: &str,
        ca: &str,
    ) -> Result<()> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let exists = api
            .get_metadata_opt(name)
            .await
            .map_err(|e| kube_err("reading the target Secret", e))?
            .is_some();
        let mut body = super::managed::apply_body(name, namespace, tls_crt, tls_key, ca_crt, None);
        body["metadata"]["labels"] = json!({ LABEL_MANAGED_BY: MANAGED_BY });
        body["metadata"]["annotations"] = json!({ "meshca.io/issued-by": ca });
        if !exists {
            // The type is immutable: set it only when creating.
            body["type"] = json!("kubernetes.io/tls");
        }
        super::apply(
            &api,
            name,
            &body,
            super::FIELD_MANAGER_ISSUE,
            &format!("applying Secret {namespace}/{name}"),
        )
        .await
    }

    fn ledger_shard(&self, day: &str, n: u32) -> String {
        format!("meshca-ledger-{day}-{n}")
    }

    /// Appends `line` (one or more whole lines) to the day's first shard with room. There is
    /// no limit on shards per day: the ledger never refuses a record for lack of room.
    async fn append_ledger(&self, line: &str) -> Result<()> {
        if line.len() > LEDGER_SHARD_LIMIT {
            return Err(Error::Store(format!(
                "ledger: a record batch of {} bytes exceeds a shard ({LEDGER_SHARD_LIMIT} bytes)",
                line.len()
            )));
        }
        let day = {
            let d = time::OffsetDateTime::now_utc().date();
            format!("{:04}{:02}{:02}", d.year(), u8::from(d.month()), d.day())
        };
        let api = self.configmaps();
        let mut conflicts = 0;
        let (mut n, mut cached) = {
            let hint = self.ledger_hint.lock().unwrap_or_else(|p| p.into_inner());
            match hint.as_ref().filter(|t| t.day == day) {
                Some(t) => (t.n, t.shard.clone()),
                None => (0, None),
            }
        };
        loop {
            let name = self.ledger_shard(&day, n);
            // The copy from this store's own last write, while it is the shard in question:
            // one request per append instead of two (a conflict re-reads it).
            let current = match cached
                .take()
                .filter(|cm| cm.metadata.name.as_deref() == Some(name.as_str()))
            {
                Some(cm) => Some(cm),
                None => api
                    .get_opt(&name)
                    .await
                    .map_err(|e| kube_err("reading the ledger", e))?,
            };
            let result = match current {
                None => {
                    let cm: ConfigMap = serde_json::from_value(json!({
                        "metadata": { "name": name, "labels": { LABEL_MANAGED_BY: MANAGED_BY, LABEL_LEDGER: "true" } },
                        "data": { "ledger.jsonl": line }
                    }))
                    .map_err(|e| Error::Build(e.to_string()))?;
                    api.create(
                        &PostParams {
                            field_manager: Some(FIELD_MANAGER.into()),
                            ..Default::default()
                        },
                        &cm,
                    )
                    .await
                }
                Some(mut cm) => {
                    let data = cm.data.get_or_insert_with(BTreeMap::new);
                    let text = data.entry("ledger.jsonl".into()).or_default();
                    if text.len() + line.len() > LEDGER_SHARD_LIMIT {
                        n += 1;
                        continue;
                    }
                    text.push_str(line);
                    // `cm` still carries the resourceVersion it was read at: optimistic concurrency.
                    api.replace(
                        &name,
                        &PostParams {
                            field_manager: Some(FIELD_MANAGER.into()),
                            ..Default::default()
                        },
                        &cm,
                    )
                    .await
                }
            };
            match result {
                Ok(written) => {
                    *self.ledger_hint.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(LedgerTail {
                            day,
                            n,
                            shard: Some(written),
                        });
                    return Ok(());
                }
                Err(e) if api_code(&e) == Some(409) && conflicts < LEDGER_MAX_CONFLICTS => {
                    conflicts += 1
                }
                Err(e) => return Err(kube_err("appending to the ledger", e)),
            }
        }
    }
}

#[async_trait]
impl super::ledger::LedgerWriter for KubeStore {
    /// One line per record (the common entry plus requester and object), appended to the
    /// current shard in one optimistic read-modify-write.
    async fn append(&self, records: &[super::ledger::IssuedRecord]) -> Result<()> {
        // Whole lines, in chunks that fit a shard with room to spare (a retry after a chunk
        // was written writes it again: a duplicate line, never a lost one).
        let mut text = String::new();
        for r in records {
            let mut line = serde_json::to_string(r).map_err(|e| Error::Build(e.to_string()))?;
            line.push('\n');
            if !text.is_empty() && text.len() + line.len() > LEDGER_SHARD_LIMIT / 2 {
                self.append_ledger(&std::mem::take(&mut text)).await?;
            }
            text.push_str(&line);
        }
        if text.is_empty() {
            return Ok(());
        }
        self.append_ledger(&text).await
    }
}

#[async_trait]
impl Store for KubeStore {
    fn describe(&self) -> String {
        format!("kube:{}", self.namespace)
    }

    async fn list_cas(&self) -> Result<Vec<String>> {
        let lp =
            ListParams::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_CA}"));
        let list = self
            .secrets()
            .list_metadata(&lp)
            .await
            .map_err(|e| kube_err("listing CA Secrets", e))?;
        let mut names: Vec<String> = list
            .items
            .iter()
            .filter_map(|s| s.metadata.labels.as_ref()?.get(LABEL_CA).cloned())
            .filter(|n| validate_ca_name(n).is_ok())
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    async fn ca_exists(&self, name: &str) -> Result<bool> {
        if validate_ca_name(name).is_err() {
            return Ok(false);
        }
        let s = self
            .secrets()
            .get_metadata_opt(&ca_secret_name(name))
            .await
            .map_err(|e| kube_err("reading a CA Secret", e))?;
        Ok(s.is_some())
    }

    async fn report_ca_load_failure(&self, name: &str, reason: &str) {
        use kube::runtime::events::{Event, EventType, Recorder, Reporter};
        let recorder = Recorder::new(
            self.client.clone(),
            Reporter {
                controller: "meshca-signer".into(),
                instance: Some(crate::store::host_name()),
            },
        );
        let secret = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Secret".into()),
            name: Some(ca_secret_name(name)),
            namespace: Some(self.namespace.clone()),
            ..Default::default()
        };
        let ev = Event {
            type_: EventType::Warning,
            reason: EVENT_CA_LOAD_FAILED.into(),
            note: Some(super::signer::truncate(
                &format!("CA {name} is not served (nothing is issued for it): {reason}"),
                1000,
            )),
            action: "Load".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&ev, &secret).await {
            tracing::warn!(ca = %name, error = %e, "could not publish an Event");
        }
    }

    async fn load_ca(&self, name: &str) -> Result<CaMaterial> {
        validate_ca_name(name).map_err(|_| Error::UnknownCa(name.to_string()))?;
        let s = self
            .secrets()
            .get_opt(&ca_secret_name(name))
            .await
            .map_err(|e| kube_err("reading a CA Secret", e))?
            .ok_or_else(|| Error::UnknownCa(name.to_string()))?;
        ca_from_secret(name, &s)
    }

    async fn save_ca(&self, ca: &CaMaterial, replace: bool) -> Result<SaveOutcome> {
        validate_ca_name(&ca.meta.name)?;
        ca.validate()?;
        let manifest = ca_secret_manifest(ca, &self.namespace)?;
        let name = ca_secret_name(&ca.meta.name);
        let api = self.secrets();
        if !replace {
            let s: Secret =
                serde_json::from_value(manifest).map_err(|e| Error::Build(e.to_string()))?;
            let pp = PostParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            };
            return match api.create(&pp, &s).await {
                Ok(_) => Ok(SaveOutcome::Created),
                Err(e) if api_code(&e) == Some(409) => {
                    Err(Error::AlreadyExists(format!("CA {}", ca.meta.name)))
                }
                Err(e) => Err(kube_err("creating a CA Secret", e)),
            };
        }
        let current = api
            .get_metadata_opt(&name)
            .await
            .map_err(|e| kube_err("reading a CA Secret", e))?;
        let existed = current.is_some();
        let mut manifest = manifest;
        if let Some(rv) = current.and_then(|m| m.metadata.resource_version) {
            // The version just read is the precondition: a CA Secret changed in between (another
            // writer) makes the API server answer 409 instead of being overwritten.
            manifest["metadata"]["resourceVersion"] = json!(rv);
        }
        super::apply(
            &api,
            &name,
            &manifest,
            FIELD_MANAGER,
            "applying a CA Secret",
        )
        .await?;
        Ok(if existed {
            SaveOutcome::Replaced
        } else {
            SaveOutcome::Created
        })
    }

    async fn list_bundles(&self) -> Result<Vec<BundleSpec>> {
        let lp = ListParams::default().labels(&format!(
            "{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_BUNDLE_SPEC}"
        ));
        let list = self
            .configmaps()
            .list(&lp)
            .await
            .map_err(|e| kube_err("listing bundle ConfigMaps", e))?;
        let mut out = Vec::new();
        for cm in &list.items {
            out.push(bundle_from_configmap(cm)?);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn load_bundle(&self, name: &str) -> Result<BundleSpec> {
        if validate_ca_name(name).is_err() {
            return Err(Error::UnknownBundle(name.to_string()));
        }
        let cm = self
            .configmaps()
            .get_opt(&bundle_spec_name(name))
            .await
            .map_err(|e| kube_err("reading a bundle ConfigMap", e))?
            .ok_or_else(|| Error::UnknownBundle(name.to_string()))?;
        bundle_from_configmap(&cm)
    }

    async fn save_bundle(&self, b: &BundleSpec) -> Result<SaveOutcome> {
        b.validate()?;
        let name = bundle_spec_name(&b.name);
        let api = self.configmaps();
        let existed = api
            .get_metadata_opt(&name)
            .await
            .map_err(|e| kube_err("reading a bundle ConfigMap", e))?
            .is_some();
        let spec = serde_json::to_string_pretty(b).map_err(|e| Error::Build(e.to_string()))?;
        let manifest = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": { LABEL_MANAGED_BY: MANAGED_BY, LABEL_BUNDLE_SPEC: b.name },
            },
            "data": { "bundle.json": spec }
        });
        super::apply(
            &api,
            &name,
            &manifest,
            FIELD_MANAGER,
            "applying a bundle ConfigMap",
        )
        .await?;
        Ok(if existed {
            SaveOutcome::Replaced
        } else {
            SaveOutcome::Created
        })
    }

    async fn record(&self, entry: &LedgerEntry) -> Result<()> {
        let mut line = serde_json::to_string(entry).map_err(|e| Error::Build(e.to_string()))?;
        line.push('\n');
        self.append_ledger(&line).await
    }

    async fn ledger(&self) -> Result<Vec<LedgerEntry>> {
        let lp = ListParams::default().labels(&format!(
            "{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_LEDGER}=true"
        ));
        let list = self
            .configmaps()
            .list(&lp)
            .await
            .map_err(|e| kube_err("listing ledger ConfigMaps", e))?;
        let mut out = Vec::new();
        for cm in &list.items {
            let name = cm.metadata.name.clone().unwrap_or_default();
            let text = cm
                .data
                .as_ref()
                .and_then(|d| d.get("ledger.jsonl"))
                .map(String::as_str)
                .unwrap_or("");
            for (i, l) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                out.push(serde_json::from_str(l).map_err(|e| {
                    Error::Corrupt(format!("ConfigMap {name} line {}: {e}", i + 1))
                })?);
            }
        }
        out.sort_by_key(|e: &LedgerEntry| e.issued_at);
        // A serial may stand twice (a stuck leader flushing after the new leader's catch-up,
        // `ledger_repair`): the ledger is the set of certificates issued.
        Ok(super::ledger_repair::dedupe(out))
    }

    async fn list_rotations(&self) -> Result<Vec<RotationState>> {
        self.list_rotations_kube().await
    }
    async fn load_rotation(&self, ca: &str) -> Result<Option<RotationState>> {
        self.load_rotation_kube(ca).await
    }
    async fn save_rotation(&self, state: &RotationState) -> Result<()> {
        self.save_rotation_kube(state).await
    }
    async fn load_rotation_cas(&self, ca: &str, slot: Slot) -> Result<Vec<CaMaterial>> {
        self.load_rotation_cas_kube(ca, slot).await
    }
    async fn save_rotation_cas(&self, ca: &str, slot: Slot, cas: &[CaMaterial]) -> Result<()> {
        self.save_rotation_cas_kube(ca, slot, cas).await
    }
    async fn remove_rotation_cas(&self, ca: &str, slot: Slot) -> Result<()> {
        self.remove_rotation_cas_kube(ca, slot).await
    }
    async fn remove_rotation(&self, ca: &str) -> Result<()> {
        self.remove_rotation_kube(ca).await
    }
    async fn lock_rotation(&self, holder: &str) -> Result<Box<dyn PhaseLock>> {
        Ok(Box::new(self.lock_rotation_kube(holder).await?))
    }
    async fn live_certificates(
        &self,
        skis: &std::collections::BTreeSet<String>,
        now: time::OffsetDateTime,
    ) -> Result<Vec<crate::store::LiveCertificate>> {
        super::live_certs::live_certificates(&self.client, skis, now).await
    }
    /// Applies the bundle's `<bundle>-trust-bundle` ConfigMaps in its namespaces (what the
    /// signer's bundle sync writes too), so a rotation phase publishes at once.
    async fn publish_bundle(
        &self,
        spec: &BundleSpec,
        anchors: &[rustls_pki_types::CertificateDer<'static>],
    ) -> Result<usize> {
        if spec.namespaces.is_empty() {
            return Ok(0);
        }
        super::bundles::publish(&self.client, spec, anchors, &spec.namespaces, None).await
    }
}

fn bundle_from_configmap(cm: &ConfigMap) -> Result<BundleSpec> {
    let name = cm.metadata.name.clone().unwrap_or_default();
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get("bundle.json"))
        .ok_or_else(|| Error::Corrupt(format!("ConfigMap {name} has no bundle.json")))?;
    let b: BundleSpec =
        serde_json::from_str(text).map_err(|e| Error::Corrupt(format!("ConfigMap {name}: {e}")))?;
    b.validate()?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{create_root, CaSpec};
    use crate::kube::testutil::{json as resp, mock_client, next, status};

    fn secret_from(manifest: &serde_json::Value) -> Secret {
        serde_json::from_value(manifest.clone()).unwrap()
    }

    #[test]
    fn ca_secret_round_trips_and_is_labelled() {
        let ca = create_root(&CaSpec::root("mesh"), time::OffsetDateTime::now_utc()).unwrap();
        let m = ca_secret_manifest(&ca, "meshca").unwrap();
        assert_eq!(m["type"], "kubernetes.io/tls");
        assert_eq!(m["metadata"]["labels"][LABEL_CA], "mesh");
        assert_eq!(m["metadata"]["labels"][LABEL_MANAGED_BY], "meshca");
        let back = ca_from_secret("mesh", &secret_from(&m)).unwrap();
        assert_eq!(back.cert, ca.cert);
        assert!(back.key.is_some());
        // A Secret for another CA name is refused, not silently used.
        assert!(ca_from_secret("other", &secret_from(&m)).is_err());
        // A damaged key is reported without echoing it.
        let mut bad = m.clone();
        bad["data"]["tls.key"] = serde_json::Value::String(b64(
            b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n",
        ));
        let e = ca_from_secret("mesh", &secret_from(&bad))
            .unwrap_err()
            .to_string();
        assert!(e.contains("tls.key") && !e.contains("c2VjcmV0"), "{e}");
    }

    #[tokio::test]
    async fn create_conflict_is_already_exists_and_load_missing_is_unknown() {
        let (client, mut h) = mock_client();
        let store = KubeStore::new(client, "meshca");
        let ca = create_root(&CaSpec::root("mesh"), time::OffsetDateTime::now_utc()).unwrap();
        let server = tokio::spawn(async move {
            let (req, body, send) = next(&mut h).await;
            assert_eq!(req.method(), "POST");
            assert!(
                req.uri().path().ends_with("/namespaces/meshca/secrets"),
                "{}",
                req.uri()
            );
            assert!(req
                .uri()
                .query()
                .unwrap_or("")
                .contains("fieldManager=meshca"));
            assert_eq!(body["metadata"]["name"], "meshca-ca-mesh");
            send.send_response(status(
                409,
                "AlreadyExists",
                "secrets \"meshca-ca-mesh\" already exists",
            ));
            let (req, _, send) = next(&mut h).await;
            assert_eq!(req.method(), "GET");
            assert!(req.uri().path().ends_with("/secrets/meshca-ca-nope"));
            send.send_response(status(404, "NotFound", "not found"));
        });
        let e = store.save_ca(&ca, false).await.unwrap_err();
        assert!(matches!(e, Error::AlreadyExists(_)), "{e}");
        assert!(matches!(
            store.load_ca("nope").await,
            Err(Error::UnknownCa(_))
        ));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn replace_uses_forced_server_side_apply() {
        let (client, mut h) = mock_client();
        let store = KubeStore::new(client, "meshca");
        let ca = create_root(&CaSpec::root("mesh"), time::OffsetDateTime::now_utc()).unwrap();
        let server = tokio::spawn(async move {
            let (_, _, send) = next(&mut h).await; // metadata GET
            send.send_response(status(404, "NotFound", "not found"));
            let (req, body, send) = next(&mut h).await;
            assert_eq!(req.method(), "PATCH");
            assert_eq!(
                req.headers()["content-type"],
                "application/apply-patch+yaml"
            );
            let q = req.uri().query().unwrap();
            assert!(
                q.contains("fieldManager=meshca") && q.contains("force=true"),
                "{q}"
            );
            assert_eq!(body["kind"], "Secret");
            send.send_response(resp(200, &body));
        });
        assert_eq!(
            store.save_ca(&ca, true).await.unwrap(),
            SaveOutcome::Created
        );
        server.await.unwrap();
    }

    /// Issue 17: the ledger stopped at 64 full shards a day, losing every later record.
    fn today() -> String {
        let d = time::OffsetDateTime::now_utc().date();
        format!("{:04}{:02}{:02}", d.year(), u8::from(d.month()), d.day())
    }

    #[tokio::test]
    async fn ledger_append_goes_past_64_full_shards_a_day() {
        let (client, mut h) = mock_client();
        let store = KubeStore::new(client, "meshca");
        let full = 70;
        let server = tokio::spawn(async move {
            for n in 0..full {
                let (req, _, send) = next(&mut h).await;
                assert!(
                    req.uri().path().ends_with(&format!("-{n}")),
                    "{}",
                    req.uri()
                );
                send.send_response(resp(
                    200,
                    &json!({"apiVersion":"v1","kind":"ConfigMap",
                    "metadata":{"name":format!("x-{n}"),"resourceVersion":"1"},
                    "data":{"ledger.jsonl":"a".repeat(LEDGER_SHARD_LIMIT)}}),
                ));
            }
            let (req, _, send) = next(&mut h).await;
            assert!(
                req.uri().path().ends_with(&format!("-{full}")),
                "{}",
                req.uri()
            );
            send.send_response(status(404, "NotFound", "not found"));
            let (req, body, send) = next(&mut h).await;
            assert_eq!(req.method(), "POST");
            assert_eq!(body["data"]["ledger.jsonl"], "new\n");
            send.send_response(resp(201, &body));
        });
        store.append_ledger("new\n").await.unwrap();
        server.await.unwrap();
    }

    /// A second append starts at the shard the first one wrote to, from the copy that write
    /// returned (no read); a conflict reads the shard again.
    #[tokio::test]
    async fn ledger_append_remembers_the_days_last_shard_and_its_content() {
        let (client, mut h) = mock_client();
        let store = KubeStore::new(client, "meshca");
        let shard = move |n: u32, rv: &str, text: &str| {
            json!({"apiVersion":"v1","kind":"ConfigMap",
            "metadata":{"name":format!("meshca-ledger-{}-{n}", today()),"resourceVersion":rv},
            "data":{"ledger.jsonl":text}})
        };
        let (full, old) = (
            shard(0, "1", &"a".repeat(LEDGER_SHARD_LIMIT)),
            shard(1, "1", "old\n"),
        );
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut answer = |req: http::Request<()>, body: serde_json::Value| {
                seen.push(format!(
                    "{} {}",
                    req.method(),
                    req.uri().path().rsplit('-').next().unwrap()
                ));
                body
            };
            // First append: shard 0 is full, shard 1 is read and written.
            let (req, b, send) = next(&mut h).await;
            answer(req, b);
            send.send_response(resp(200, &full));
            let (req, b, send) = next(&mut h).await;
            answer(req, b);
            send.send_response(resp(200, &old));
            let (req, mut b, send) = next(&mut h).await;
            let b2 = answer(req, b.clone());
            assert_eq!(b2["data"]["ledger.jsonl"], "old\na\n");
            b["metadata"]["resourceVersion"] = json!("2");
            send.send_response(resp(200, &b));
            // Second append: written at once, on top of the first write, with its version.
            let (req, b, send) = next(&mut h).await;
            let b = answer(req, b);
            assert_eq!(b["data"]["ledger.jsonl"], "old\na\nb\n");
            assert_eq!(b["metadata"]["resourceVersion"], "2");
            send.send_response(status(409, "Conflict", "the object has been modified"));
            // The conflict: read again, then write on top of what someone else wrote.
            let (req, b, send) = next(&mut h).await;
            answer(req, b);
            send.send_response(resp(200, &shard(1, "3", "old\nother\n")));
            let (req, b, send) = next(&mut h).await;
            let b = answer(req, b);
            assert_eq!(b["data"]["ledger.jsonl"], "old\nother\nb\n");
            send.send_response(resp(200, &b));
            seen
        });
        store.append_ledger("a\n").await.unwrap();
        store.append_ledger("b\n").await.unwrap();
        let seen = server.await.unwrap();
        assert_eq!(seen, ["GET 0", "GET 1", "PUT 1", "PUT 1", "GET 1", "PUT 1"]);
        assert!(store
            .append_ledger(&"x".repeat(LEDGER_SHARD_LIMIT + 1))
            .await
            .is_err());
    }

    #[tokio::test]
    async fn ledger_append_retries_on_conflict_and_rolls_full_shards() {
        let (client, mut h) = mock_client();
        let store = KubeStore::new(client, "meshca");
        let server = tokio::spawn(async move {
            // Shard 0 is full.
            let (req, _, send) = next(&mut h).await;
            assert!(req.uri().path().ends_with("-0"), "{}", req.uri());
            send.send_response(resp(200, &json!({"apiVersion":"v1","kind":"ConfigMap",
                "metadata":{"name":"x-0","resourceVersion":"1"},"data":{"ledger.jsonl":"a".repeat(LEDGER_SHARD_LIMIT)}})));
            // Shard 1 exists; the first replace conflicts, the second succeeds.
            for attempt in 0..2 {
                let (req, _, send) = next(&mut h).await;
                assert!(req.uri().path().ends_with("-1"));
                send.send_response(resp(200, &json!({"apiVersion":"v1","kind":"ConfigMap",
                    "metadata":{"name":"x-1","resourceVersion":format!("{}", 10 + attempt)},"data":{"ledger.jsonl":"old\n"}})));
                let (req, body, send) = next(&mut h).await;
                assert_eq!(req.method(), "PUT");
                assert_eq!(
                    body["metadata"]["resourceVersion"],
                    format!("{}", 10 + attempt)
                );
                assert_eq!(body["data"]["ledger.jsonl"], "old\nnew\n");
                if attempt == 0 {
                    send.send_response(status(409, "Conflict", "the object has been modified"));
                } else {
                    send.send_response(resp(200, &body));
                }
            }
            // The next append starts at shard 1: the full shard 0 is not read again.
            let (req, _, send) = next(&mut h).await;
            assert!(req.uri().path().ends_with("-1"), "{}", req.uri());
            send.send_response(resp(200, &json!({"apiVersion":"v1","kind":"ConfigMap",
                "metadata":{"name":"x-1","resourceVersion":"20"},"data":{"ledger.jsonl":"old\nnew\n"}})));
            let (req, body, send) = next(&mut h).await;
            assert_eq!(req.method(), "PUT");
            assert_eq!(body["data"]["ledger.jsonl"], "old\nnew\nmore\n");
            send.send_response(resp(200, &body));
        });
        store.append_ledger("new\n").await.unwrap();
        store.append_ledger("more\n").await.unwrap();
        server.await.unwrap();
    }
}
