//! The SDS service: each stream's response body drives an [`xds`](crate::xds) state machine
//! with the client's requests and with every published [`Snapshot`].
//!
//! A stream has no task of its own. Its response stream is polled by the HTTP/2 stream task
//! hyper already runs for it, so a new snapshot wakes one task per stream, not two, and no
//! channel sits between them. That task polls the body only while the client's flow-control
//! window has room, so a client that stops reading also stops being served: its stream holds
//! no queue of responses, and when it reads again it gets the current version, not every
//! version in between.

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::Status;

use crate::grpc::{Framed, Requests};
use crate::metrics::{Metrics, Mode};
use crate::secrets::{Snapshot, SECRET_TYPE_URL};
use crate::xds::{DeltaRequest, DeltaStream, Event, Outcome, SotwRequest, SotwStream};

/// Most names one stream may subscribe to (the default of [`Limits::max_names_per_stream`]).
pub const MAX_NAMES_PER_STREAM: usize = 1024;

/// What one client may ask of the server. Every limit ends only the offending stream (or
/// call), with a gRPC status naming the limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most resource names in one request: SotW `resource_names`, delta
    /// `resource_names_subscribe`, FetchSecrets (`INVALID_ARGUMENT`).
    pub max_names_per_request: usize,
    /// Most names one stream may be subscribed to (`INVALID_ARGUMENT`).
    pub max_names_per_stream: usize,
    /// Longest resource name, in bytes (`INVALID_ARGUMENT`).
    pub max_name_len: usize,
    /// Most subscribed names that do not exist (yet) that one stream may wait on
    /// (`NOT_FOUND`). Each waits for its secret to appear; beyond this the stream ends.
    pub max_unknown_per_stream: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_names_per_request: 128,
            max_names_per_stream: MAX_NAMES_PER_STREAM,
            max_name_len: 512,
            max_unknown_per_stream: 16,
        }
    }
}

/// A name for an error message: escaped, and cut to 64 characters.
fn shown(name: &str) -> String {
    let cut: String = name.chars().take(64).collect();
    if cut.len() < name.len() {
        format!("{cut:?}...")
    } else {
        format!("{cut:?}")
    }
}

impl Limits {
    /// Checks the names of one request, of which `total` will be subscribed afterwards.
    fn check_request<'a>(
        &self,
        names: impl ExactSizeIterator<Item = &'a String>,
        total: usize,
    ) -> Result<(), Status> {
        let n = names.len();
        if n > self.max_names_per_request {
            return Err(Status::invalid_argument(format!(
                "{n} resource names in one request; at most {} are allowed",
                self.max_names_per_request
            )));
        }
        if total > self.max_names_per_stream {
            return Err(Status::invalid_argument(format!(
                "{total} resource names in one stream; at most {} are allowed",
                self.max_names_per_stream
            )));
        }
        for name in names {
            if name.len() > self.max_name_len {
                return Err(Status::invalid_argument(format!(
                    "resource name {} is {} bytes long; at most {} are allowed",
                    shown(name),
                    name.len(),
                    self.max_name_len
                )));
            }
        }
        Ok(())
    }

    /// Checks how many of the stream's subscriptions do not exist in `snap`.
    fn check_unknown<'a>(
        &self,
        subscribed: impl Iterator<Item = &'a str>,
        snap: &Snapshot,
    ) -> Result<(), Status> {
        let unknown: Vec<&str> = subscribed.filter(|n| snap.get(n).is_none()).collect();
        if unknown.len() > self.max_unknown_per_stream {
            return Err(Status::not_found(format!(
                "{} subscribed secrets do not exist, e.g. {}; at most {} may wait on one stream",
                unknown.len(),
                shown(unknown[0]),
                self.max_unknown_per_stream
            )));
        }
        Ok(())
    }
}
/// The response stream of one `StreamSecrets` or `DeltaSecrets` call.
pub type ResponseStream<R> = Pin<Box<dyn Stream<Item = Result<R, Status>> + Send>>;

/// The SDS service. Cheap to clone; all clones share state.
#[derive(Clone, Debug)]
pub struct SdsService {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    limits: Limits,
    next_id: AtomicU64,
}

impl SdsService {
    /// A service serving the snapshots published on `snapshots` within `limits`; open
    /// streams end when `shutdown` becomes true.
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
        limits: Limits,
    ) -> Self {
        SdsService {
            inner: Arc::new(Shared {
                snapshots,
                metrics,
                shutdown,
                limits,
                next_id: AtomicU64::new(1),
            }),
        }
    }
}

/// Decrements the open-streams gauge when a stream task ends, however it ends.
struct OpenGuard(Arc<Metrics>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.streams_open.fetch_sub(1, Ordering::Relaxed);
    }
}

fn check_type(type_url: &str) -> Result<(), Status> {
    if type_url.is_empty() || type_url == SECRET_TYPE_URL {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "unsupported type_url {type_url:?}; this server serves {SECRET_TYPE_URL}"
        )))
    }
}

fn node_id(node: &Option<envoy_types::pb::envoy::config::core::v3::Node>) -> String {
    node.as_ref()
        .map(|n| format!("{}/{}", n.cluster, n.id))
        .unwrap_or_else(|| "-".into())
}

impl Shared {
    fn log_events(&self, mode: Mode, stream: &str, node: &str, out: &Outcome) {
        for e in &out.events {
            match e {
                Event::Ack { name, version } => {
                    self.metrics.acks.add(mode, 1);
                    tracing::info!(stream, node, mode = mode.as_str(), resource = %name, version = %version, "ACK");
                }
                Event::Nack {
                    name,
                    version,
                    detail,
                } => {
                    self.metrics.nacks.add(mode, 1);
                    tracing::warn!(
                        stream, node, mode = mode.as_str(), resource = %name, version = %version, detail = %detail,
                        "NACK: client rejected the secret; it is not re-sent until it changes"
                    );
                }
                Event::StaleNonce { nonce } => {
                    self.metrics.stale_nonces.add(mode, 1);
                    tracing::debug!(stream, node, mode = mode.as_str(), nonce = %nonce, "stale nonce ignored");
                }
                Event::Subscribed(n) => {
                    tracing::debug!(stream, node, mode = mode.as_str(), resource = %n, "subscribed")
                }
                Event::Unsubscribed(n) => {
                    tracing::debug!(stream, node, mode = mode.as_str(), resource = %n, "unsubscribed")
                }
                Event::Unknown(n) => tracing::warn!(
                    stream, node, mode = mode.as_str(), resource = %n,
                    "requested secret does not exist; stream stays open and it is sent if it appears"
                ),
            }
        }
    }

    fn sotw_responses(
        &self,
        stream: &str,
        node: &str,
        out: &Outcome,
        snap: &Snapshot,
    ) -> Vec<Framed<DiscoveryResponse>> {
        out.pushes
            .iter()
            .filter_map(|p| {
                let e = snap.get(&p.name)?;
                tracing::info!(stream, node, mode = "sotw", resource = %p.name, version = %p.version, nonce = %p.nonce, "push");
                Some(Framed {
                    head: DiscoveryResponse {
                        version_info: p.version.clone(),
                        type_url: SECRET_TYPE_URL.to_string(),
                        nonce: p.nonce.clone(),
                        ..Default::default()
                    },
                    tail: vec![e.pieces(&p.name).sotw().clone()],
                })
            })
            .collect()
    }

    fn delta_responses(
        &self,
        stream: &str,
        node: &str,
        out: &Outcome,
        snap: &Snapshot,
    ) -> Vec<Framed<DeltaDiscoveryResponse>> {
        let mut v: Vec<Framed<DeltaDiscoveryResponse>> = out
            .removals
            .iter()
            .map(|r| {
                tracing::info!(stream, node, mode = "delta", removed = ?r.names, nonce = %r.nonce, "removal");
                Framed::head(DeltaDiscoveryResponse {
                    type_url: SECRET_TYPE_URL.to_string(),
                    removed_resources: r.names.clone(),
                    nonce: r.nonce.clone(),
                    ..Default::default()
                })
            })
            .collect();
        v.extend(out.pushes.iter().filter_map(|p| {
            let e = snap.get(&p.name)?;
            tracing::info!(stream, node, mode = "delta", resource = %p.name, version = %p.version, nonce = %p.nonce, "push");
            Some(Framed {
                head: DeltaDiscoveryResponse {
                    system_version_info: p.version.clone(),
                    type_url: SECRET_TYPE_URL.to_string(),
                    nonce: p.nonce.clone(),
                    ..Default::default()
                },
                tail: vec![e.pieces(&p.name).delta().clone()],
            })
        }));
        v
    }

    fn open(&self, mode: Mode) -> (String, OpenGuard) {
        let id = format!("s{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        self.metrics.streams_open.fetch_add(1, Ordering::Relaxed);
        self.metrics.streams_total.add(mode, 1);
        (id, OpenGuard(self.metrics.clone()))
    }
}

/// What differs between the state-of-the-world and the delta protocol; [`run_stream`] drives
/// either.
trait Flavor: Send + 'static {
    type Req: prost::Message + Default + Send + 'static;
    type Resp: Send + 'static;
    const MODE: Mode;
    /// The `node` of a request, for logs.
    fn node(req: &Self::Req) -> String;
    /// Validates a request and feeds it to the state machine; an error status closes the stream.
    fn on_request(
        &mut self,
        req: Self::Req,
        snap: &Snapshot,
        limits: &Limits,
    ) -> Result<Outcome, Status>;
    /// Feeds a newly published snapshot to the state machine.
    fn on_update(&mut self, snap: &Snapshot) -> Outcome;
    /// The responses for an outcome, each with the number of secrets it pushes.
    fn responses(
        shared: &Shared,
        stream: &str,
        node: &str,
        out: &Outcome,
        snap: &Snapshot,
    ) -> Vec<(Self::Resp, u64)>;
}

impl Flavor for SotwStream {
    type Req = DiscoveryRequest;
    type Resp = Framed<DiscoveryResponse>;
    const MODE: Mode = Mode::Sotw;

    fn node(req: &DiscoveryRequest) -> String {
        node_id(&req.node)
    }

    fn on_request(
        &mut self,
        req: DiscoveryRequest,
        snap: &Snapshot,
        limits: &Limits,
    ) -> Result<Outcome, Status> {
        check_type(&req.type_url)?;
        limits.check_request(req.resource_names.iter(), req.resource_names.len())?;
        let r = SotwRequest {
            version_info: req.version_info,
            response_nonce: req.response_nonce,
            resource_names: req.resource_names,
            error_detail: req.error_detail.map(|e| e.message),
        };
        let out = SotwStream::on_request(self, &r, snap);
        limits.check_unknown(self.subscribed(), snap)?;
        Ok(out)
    }

    fn on_update(&mut self, snap: &Snapshot) -> Outcome {
        SotwStream::on_update(self, snap)
    }

    fn responses(
        shared: &Shared,
        stream: &str,
        node: &str,
        out: &Outcome,
        snap: &Snapshot,
    ) -> Vec<(Framed<DiscoveryResponse>, u64)> {
        shared
            .sotw_responses(stream, node, out, snap)
            .into_iter()
            .map(|r| (r, 1))
            .collect()
    }
}

impl Flavor for DeltaStream {
    type Req = DeltaDiscoveryRequest;
    type Resp = Framed<DeltaDiscoveryResponse>;
    const MODE: Mode = Mode::Delta;

    fn node(req: &DeltaDiscoveryRequest) -> String {
        node_id(&req.node)
    }

    fn on_request(
        &mut self,
        req: DeltaDiscoveryRequest,
        snap: &Snapshot,
        limits: &Limits,
    ) -> Result<Outcome, Status> {
        check_type(&req.type_url)?;
        let n = req.resource_names_subscribe.len() + self.subscribed().count();
        limits.check_request(req.resource_names_subscribe.iter(), n)?;
        let r = DeltaRequest {
            response_nonce: req.response_nonce,
            subscribe: req.resource_names_subscribe,
            unsubscribe: req.resource_names_unsubscribe,
            initial_versions: req
                .initial_resource_versions
                .into_iter()
                .collect::<BTreeMap<_, _>>(),
            error_detail: req.error_detail.map(|e| e.message),
        };
        let out = DeltaStream::on_request(self, &r, snap);
        limits.check_unknown(self.subscribed(), snap)?;
        Ok(out)
    }

    fn on_update(&mut self, snap: &Snapshot) -> Outcome {
        DeltaStream::on_update(self, snap)
    }

    fn responses(
        shared: &Shared,
        stream: &str,
        node: &str,
        out: &Outcome,
        snap: &Snapshot,
    ) -> Vec<(Framed<DeltaDiscoveryResponse>, u64)> {
        shared
            .delta_responses(stream, node, out, snap)
            .into_iter()
            .map(|r| {
                let pushes = r.tail.len() as u64;
                (r, pushes)
            })
            .collect()
    }
}

/// One stream: the state machine, the client's requests and the snapshots it follows.
struct StreamState<F: Flavor> {
    shared: Arc<Shared>,
    st: F,
    id: String,
    inbound: Requests<F::Req>,
    snaps: watch::Receiver<Arc<Snapshot>>,
    shutdown: watch::Receiver<bool>,
    node: String,
    first: bool,
    /// Responses decided but not yet handed to the transport, with their push counts.
    queue: VecDeque<(F::Resp, u64)>,
    done: bool,
    _open: OpenGuard,
}

impl<F: Flavor> StreamState<F>
where
    F::Req: Send,
{
    /// The next response: feeds the client's requests and every published snapshot to the
    /// state machine until it decides to send something, or the stream ends (the client
    /// left or erred, or the server stops).
    async fn next(&mut self) -> Option<Result<F::Resp, Status>> {
        loop {
            if let Some((resp, pushes)) = self.queue.pop_front() {
                self.shared.metrics.pushes.add(F::MODE, pushes);
                return Some(Ok(resp));
            }
            if self.done {
                tracing::debug!(stream = %self.id, node = %self.node, "stream closed");
                return None;
            }
            let (out, snap) = tokio::select! {
                _ = crate::stopped(&mut self.shutdown) => {
                    self.done = true;
                    continue;
                }
                msg = self.inbound.message() => match msg {
                    Ok(Some(req)) => {
                        if self.first {
                            self.node = F::node(&req);
                            self.first = false;
                            tracing::info!(stream = %self.id, node = %self.node, mode = F::MODE.as_str(), "stream opened");
                        }
                        let snap = self.snaps.borrow_and_update().clone();
                        match self.st.on_request(req, &snap, &self.shared.limits) {
                            Ok(out) => (out, snap),
                            Err(s) => {
                                tracing::warn!(stream = %self.id, node = %self.node, error = %s.message(), "bad request; closing stream");
                                self.done = true;
                                return Some(Err(s));
                            }
                        }
                    }
                    Ok(None) => {
                        self.done = true;
                        continue;
                    }
                    Err(s) => {
                        if s.code() == tonic::Code::ResourceExhausted {
                            tracing::warn!(stream = %self.id, node = %self.node, error = %s.message(), "request too large; closing stream");
                        } else {
                            tracing::debug!(stream = %self.id, node = %self.node, error = %s.message(), "stream ended by client");
                        }
                        // Tell the client why (a decoding limit, say).
                        self.done = true;
                        return Some(Err(s));
                    }
                },
                changed = self.snaps.changed() => {
                    if changed.is_err() {
                        self.done = true;
                        continue;
                    }
                    let snap = self.snaps.borrow_and_update().clone();
                    (self.st.on_update(&snap), snap)
                }
            };
            self.shared.log_events(F::MODE, &self.id, &self.node, &out);
            self.queue.extend(F::responses(
                &self.shared,
                &self.id,
                &self.node,
                &out,
                &snap,
            ));
        }
    }
}

impl SdsService {
    fn start<F: Flavor>(
        &self,
        mode: Mode,
        st: impl FnOnce(&str) -> F,
        inbound: Requests<F::Req>,
    ) -> ResponseStream<F::Resp>
    where
        F::Req: Send,
    {
        let (id, open) = self.inner.open(mode);
        let state = StreamState {
            shared: self.inner.clone(),
            st: st(&id),
            id,
            inbound,
            snaps: self.inner.snapshots.clone(),
            shutdown: self.inner.shutdown.clone(),
            node: String::from("-"),
            first: true,
            queue: VecDeque::new(),
            done: false,
            _open: open,
        };
        Box::pin(futures_util::stream::unfold(state, |mut s| async move {
            let item = s.next().await?;
            Some((item, s))
        }))
    }

    /// A `DeltaSecrets` call: the stream of responses to `inbound`.
    pub fn delta_secrets(
        &self,
        inbound: Requests<DeltaDiscoveryRequest>,
    ) -> ResponseStream<Framed<DeltaDiscoveryResponse>> {
        self.start(Mode::Delta, DeltaStream::new, inbound)
    }

    /// A `StreamSecrets` call: the stream of responses to `inbound`.
    pub fn stream_secrets(
        &self,
        inbound: Requests<DiscoveryRequest>,
    ) -> ResponseStream<Framed<DiscoveryResponse>> {
        self.start(Mode::Sotw, SotwStream::new, inbound)
    }

    /// A `FetchSecrets` call: every requested secret, or `NOT_FOUND` naming a missing one.
    pub fn fetch_secrets(
        &self,
        req: DiscoveryRequest,
    ) -> Result<Framed<DiscoveryResponse>, Status> {
        check_type(&req.type_url)?;
        self.inner
            .limits
            .check_request(req.resource_names.iter(), req.resource_names.len())?;
        if req.resource_names.is_empty() {
            return Err(Status::invalid_argument(
                "FetchSecrets needs at least one resource name",
            ));
        }
        let snap = self.inner.snapshots.borrow().clone();
        let mut resources = Vec::new();
        let mut versions = Vec::new();
        for n in &req.resource_names {
            match snap.get(n) {
                Some(e) => {
                    resources.push(e.pieces(n).sotw().clone());
                    versions.push(e.version.clone());
                }
                None => {
                    tracing::warn!(node = %node_id(&req.node), resource = %n, "fetch of a secret that does not exist");
                    return Err(Status::not_found(format!("no secret named {n:?}")));
                }
            }
        }
        self.inner.metrics.fetches.fetch_add(1, Ordering::Relaxed);
        let nonce = format!("f{}", self.inner.next_id.fetch_add(1, Ordering::Relaxed));
        tracing::info!(node = %node_id(&req.node), resources = ?req.resource_names, "fetch");
        Ok(Framed {
            head: DiscoveryResponse {
                version_info: versions.join(","),
                type_url: SECRET_TYPE_URL.to_string(),
                nonce,
                ..Default::default()
            },
            tail: resources,
        })
    }
}
