//! Controllers whose triggers never run ahead of their cache.
//!
//! kube-runtime's [`Controller::new`] triggers a reconcile for every object its watcher
//! yields, and looks the object up in its reflector's store when the reconcile starts. On a
//! relist (the watch expired, e.g. after an API server restart: `410 too old resource
//! version`) the watcher yields each listed object as `InitApply` while the store keeps them in
//! a side buffer until `InitDone`. A reconcile scheduled in between finds an object that
//! appeared during the outage missing, and the controller drops it with `ObjectNotFound`
//! without a retry: an approved CSR created while the API server restarted stayed unsigned
//! until something changed it again (found by the e2e API server restart round).
//!
//! [`controller`] builds the same controller from the same watcher and store, but holds the
//! relist's objects back until `InitDone`, when the store has them ([`hold_relist`]). It also
//! drops `metadata.managedFields` before the cache: no reconcile reads them.

use futures::{stream, Stream, StreamExt};
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{Controller, WatchStreamExt};
use kube::{Api, Resource, ResourceExt};

/// A [`Controller`] for `api`/`wc` whose relist triggers wait for the relist to complete.
pub fn controller<K>(api: Api<K>, wc: watcher::Config, dyntype: K::DynamicType) -> Controller<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let writer = Writer::new(dyntype.clone());
    let reader = writer.as_reader();
    let triggers = cache(watcher::watcher(api, wc), writer);
    Controller::for_stream_with(triggers, reader, dyntype)
}

/// Feeds `events` into `writer`'s cache without their managedFields (no reconcile reads
/// them; they are often a large part of an object) and returns the objects to reconcile
/// ([`hold_relist`]).
pub fn cache<K, S>(
    events: S,
    writer: Writer<K>,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send
where
    K: Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
    S: Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
{
    hold_relist(
        events
            .modify(|o| o.managed_fields_mut().clear())
            .reflect(writer),
    )
}

/// The objects to reconcile from a reflected watch stream (each event already applied to the
/// store): an `Apply` at once, a relist's `InitApply` objects all at its `InitDone`. Deletes
/// trigger nothing (as in [`Controller::new`]); errors pass through.
pub fn hold_relist<K, S>(events: S) -> impl Stream<Item = Result<K, watcher::Error>> + Send
where
    K: Send + 'static,
    S: Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
{
    events
        .scan(Vec::new(), |pending, ev| {
            let out: Vec<Result<K, watcher::Error>> = match ev {
                Ok(Event::Init) => {
                    pending.clear();
                    Vec::new()
                }
                Ok(Event::InitApply(o)) => {
                    pending.push(o);
                    Vec::new()
                }
                Ok(Event::InitDone) => std::mem::take(pending).into_iter().map(Ok).collect(),
                Ok(Event::Apply(o)) => vec![Ok(o)],
                Ok(Event::Delete(_)) => Vec::new(),
                Err(e) => vec![Err(e)],
            };
            std::future::ready(Some(stream::iter(out)))
        })
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
    use kube::runtime::reflector::ObjectRef;

    fn csr(name: &str) -> CertificateSigningRequest {
        let mut c = CertificateSigningRequest::default();
        c.metadata.name = Some(name.into());
        c.metadata.managed_fields = Some(vec![Default::default()]);
        c
    }

    /// A first list, a watched create, then a relist that brings a new object: every object
    /// is emitted only once the store holds it (with `applied_objects()` the relist's new
    /// object would be emitted while the store still lacked it).
    #[tokio::test]
    async fn every_trigger_finds_its_object_in_the_store() {
        let writer: Writer<CertificateSigningRequest> = Writer::new(());
        let reader = writer.as_reader();
        let events = vec![
            Ok(Event::Init),
            Ok(Event::InitApply(csr("a"))),
            Ok(Event::InitDone),
            Ok(Event::Apply(csr("b"))),
            // The watch expired: relist, with c created during the outage and b deleted.
            Ok(Event::Init),
            Ok(Event::InitApply(csr("a"))),
            Ok(Event::InitApply(csr("c"))),
            Ok(Event::InitDone),
            Ok(Event::Delete(csr("a"))),
        ];
        let out = cache(stream::iter(events), writer);
        tokio::pin!(out);
        let mut seen = Vec::new();
        while let Some(o) = out.next().await {
            let o = o.unwrap();
            let name = o.metadata.name.clone().unwrap();
            assert!(
                reader.get(&ObjectRef::new(&name)).is_some(),
                "{name} triggered before the store had it"
            );
            seen.push(name);
        }
        assert_eq!(seen, ["a", "b", "a", "c"]);
        // The relist removed b from the store; the delete removed a.
        assert!(reader.get(&ObjectRef::new("b")).is_none());
        assert!(reader.get(&ObjectRef::new("a")).is_none());
        let c = reader.get(&ObjectRef::new("c")).unwrap();
        assert!(c
            .metadata
            .managed_fields
            .as_deref()
            .unwrap_or_default()
            .is_empty());
    }

    /// The same stream through kube-runtime's own trigger path emits every listed object
    /// before the store has it. For the first list the controller's runner waits until the
    /// store is ready; for a relist nothing waits, and c is dropped: the defect this module
    /// exists for (if kube-runtime changes this, the module may no longer be needed).
    #[tokio::test]
    async fn applied_objects_runs_ahead_of_the_store_on_a_relist() {
        let writer: Writer<CertificateSigningRequest> = Writer::new(());
        let reader = writer.as_reader();
        let events: Vec<Result<Event<CertificateSigningRequest>, watcher::Error>> = vec![
            Ok(Event::Init),
            Ok(Event::InitApply(csr("a"))),
            Ok(Event::InitDone),
            Ok(Event::Init),
            Ok(Event::InitApply(csr("c"))),
            Ok(Event::InitDone),
        ];
        let out = stream::iter(events).reflect(writer).applied_objects();
        tokio::pin!(out);
        let mut missing = Vec::new();
        while let Some(o) = out.next().await {
            let name = o.unwrap().metadata.name.unwrap();
            if reader.get(&ObjectRef::new(&name)).is_none() {
                missing.push(name);
            }
        }
        assert_eq!(missing, ["a", "c"]);
    }
}
