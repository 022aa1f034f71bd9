//! Whether the controllers of a leader's session have completed their first list.
//!
//! kube-runtime holds a controller's reconciles until its first list succeeds, and retries a
//! refused list (a 403 where a Role is missing, an API outage) with backoff, silently. This
//! module makes that visible: [`ControllerHealth`] is the pure state, read by `/readyz` and
//! the `meshca_controller_ready{controller}` gauge ([`super::metrics`]); [`drive`] is the
//! thin loop that runs a controller's stream and keeps the state.
//!
//! A leader keeps leading while a controller cannot list: the controllers that can list keep
//! signing, the one that cannot keeps retrying, and `/readyz` names it with its error. A
//! controller that never listed has nothing in flight, so it stops at once on shutdown.

use std::collections::BTreeMap;
use std::sync::Mutex;

use futures::{Stream, StreamExt};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;

/// Longest error text kept per controller (the API's message is usually one line).
const MAX_ERROR: usize = 300;

/// Where one controller stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControllerState {
    /// Started; its first list has not succeeded yet (`error`: the last failure).
    Syncing {
        /// Why the last list or watch failed, if one did.
        error: Option<String>,
    },
    /// Its first list succeeded: it reconciles.
    Ready,
}

/// The controllers of the current session, by name (`csr-signer`, `pod-certificates`,
/// `managed:<namespace>`). Empty on followers.
#[derive(Debug, Default)]
pub struct ControllerHealth {
    states: Mutex<BTreeMap<String, ControllerState>>,
}

impl ControllerHealth {
    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<String, ControllerState>) -> T) -> T {
        f(&mut self.states.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Registers a controller that is starting.
    pub fn starting(&self, name: &str) {
        self.with(|m| m.insert(name.to_string(), ControllerState::Syncing { error: None }));
    }

    /// Records a failed list or watch. A controller that already listed stays ready (its
    /// cache keeps serving while the watch is re-established).
    pub fn failed(&self, name: &str, error: &str) {
        let mut e: String = error.chars().take(MAX_ERROR).collect();
        if e.len() < error.len() {
            e.push('…');
        }
        self.with(|m| {
            let s = m
                .entry(name.to_string())
                .or_insert(ControllerState::Syncing { error: None });
            if let ControllerState::Syncing { error } = s {
                *error = Some(e);
            }
        });
    }

    /// Records a completed first list.
    pub fn ready(&self, name: &str) {
        self.with(|m| m.insert(name.to_string(), ControllerState::Ready));
    }

    /// Forgets a controller that stopped (or never runs, like an API the cluster lacks).
    pub fn stopped(&self, name: &str) {
        self.with(|m| m.remove(name));
    }

    /// Forgets every controller (the session ended).
    pub fn clear(&self) {
        self.with(|m| m.clear());
    }

    /// A copy of the states.
    pub fn snapshot(&self) -> BTreeMap<String, ControllerState> {
        self.with(|m| m.clone())
    }
}

/// Why the replica is not ready, one line per reason (empty: ready). Pure.
pub fn not_ready_reasons(
    cas_loaded: bool,
    controllers: &BTreeMap<String, ControllerState>,
) -> Vec<String> {
    let mut out = Vec::new();
    if !cas_loaded {
        out.push("CAs not loaded yet".to_string());
    }
    for (name, s) in controllers {
        match s {
            ControllerState::Ready => {}
            ControllerState::Syncing { error: None } => {
                out.push(format!("controller {name}: first list not completed yet"))
            }
            ControllerState::Syncing { error: Some(e) } => {
                out.push(format!("controller {name} cannot list: {e}"))
            }
        }
    }
    out
}

/// Runs `controller` (built up to its triggers) through `run` (its
/// [`Controller::run`] call) under [`drive`], with a graceful shutdown on `shutdown`.
pub async fn run_controller<K, E, S>(
    name: &str,
    health: &ControllerHealth,
    controller: Controller<K>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    run: impl FnOnce(Controller<K>) -> S,
) where
    K: Clone
        + kube::Resource
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
    E: std::error::Error + 'static,
    S: Stream<Item = Result<(ObjectRef<K>, Action), controller::Error<E, watcher::Error>>>,
{
    let shutdown = futures::FutureExt::shared(shutdown);
    let controller = controller.graceful_shutdown_on(shutdown.clone());
    let store = controller.store();
    drive(name, health, store, run(controller), shutdown).await;
}

/// Runs a controller's stream (from [`kube::runtime::Controller::run`]) until it ends,
/// keeping `health` up to date under `name`. `store` is the controller's own cache
/// ([`kube::runtime::Controller::store`]), ready after the first list. When `shutdown`
/// completes before that first list, this returns at once: nothing is in flight.
pub async fn drive<K, E>(
    name: &str,
    health: &ControllerHealth,
    store: Store<K>,
    stream: impl Stream<Item = Result<(ObjectRef<K>, Action), controller::Error<E, watcher::Error>>>,
    shutdown: impl std::future::Future<Output = ()>,
) where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
    E: std::error::Error + 'static,
{
    health.starting(name);
    let listed = store.wait_until_ready();
    tokio::pin!(listed, stream, shutdown);
    let mut synced = false;
    let mut stopping = false;
    loop {
        tokio::select! {
            r = &mut listed, if !synced => {
                synced = true;
                if r.is_ok() {
                    health.ready(name);
                    tracing::info!(controller = name, "controller listed; reconciling");
                }
            }
            _ = &mut shutdown, if !stopping => {
                stopping = true;
                if !synced {
                    tracing::warn!(controller = name, "stopping a controller that never listed");
                    break;
                }
            }
            item = stream.next() => match item {
                None => break,
                Some(Err(controller::Error::QueueError(e))) => {
                    health.failed(name, &e.to_string());
                    tracing::warn!(controller = name, error = %e, "controller cannot list or watch; retrying with backoff");
                }
                Some(Err(e)) => tracing::debug!(controller = name, error = %e, "controller event"),
                Some(Ok(_)) => {}
            }
        }
    }
    health.stopped(name);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_name_each_controller_that_has_not_listed() {
        let h = ControllerHealth::default();
        assert!(not_ready_reasons(true, &h.snapshot()).is_empty());
        assert_eq!(
            not_ready_reasons(false, &h.snapshot()),
            ["CAs not loaded yet"]
        );
        h.starting("csr-signer");
        h.starting("managed:app");
        h.failed("managed:app", &"secrets is forbidden ".repeat(40));
        h.ready("csr-signer");
        let r = not_ready_reasons(true, &h.snapshot());
        assert_eq!(r.len(), 1, "{r:?}");
        assert!(r[0].starts_with("controller managed:app cannot list: secrets is forbidden"));
        assert!(r[0].chars().count() < MAX_ERROR + 50, "bounded: {}", r[0]);
        // A failure after the first list does not make a controller unready.
        h.failed("csr-signer", "watch stream failed");
        assert_eq!(h.snapshot()["csr-signer"], ControllerState::Ready);
        h.stopped("managed:app");
        assert!(not_ready_reasons(true, &h.snapshot()).is_empty());
        h.starting("pod-certificates");
        assert_eq!(
            not_ready_reasons(true, &h.snapshot()),
            ["controller pod-certificates: first list not completed yet"]
        );
        h.clear();
        assert!(h.snapshot().is_empty());
    }
}
