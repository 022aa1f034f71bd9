//! The tonic `SecretDiscoveryService`: one task per stream drives an [`xds`](crate::xds)
//! state machine with the client's requests and with every published [`Snapshot`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryService;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

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
/// Responses buffered per stream before the stream task waits for the client.
const STREAM_BUFFER: usize = 4;

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
    ) -> Vec<DiscoveryResponse> {
        out.pushes
            .iter()
            .filter_map(|p| {
                let e = snap.get(&p.name)?;
                tracing::info!(stream, node, mode = "sotw", resource = %p.name, version = %p.version, nonce = %p.nonce, "push");
                Some(DiscoveryResponse {
                    version_info: p.version.clone(),
                    resources: vec![e.any.clone()],
                    type_url: SECRET_TYPE_URL.to_string(),
                    nonce: p.nonce.clone(),
                    ..Default::default()
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
    ) -> Vec<DeltaDiscoveryResponse> {
        let mut v: Vec<DeltaDiscoveryResponse> = out
            .removals
            .iter()
            .map(|r| {
                tracing::info!(stream, node, mode = "delta", removed = ?r.names, nonce = %r.nonce, "removal");
                DeltaDiscoveryResponse {
                    type_url: SECRET_TYPE_URL.to_string(),
                    removed_resources: r.names.clone(),
                    nonce: r.nonce.clone(),
                    ..Default::default()
                }
            })
            .collect();
        v.extend(out.pushes.iter().filter_map(|p| {
            let e = snap.get(&p.name)?;
            tracing::info!(stream, node, mode = "delta", resource = %p.name, version = %p.version, nonce = %p.nonce, "push");
            Some(DeltaDiscoveryResponse {
                system_version_info: p.version.clone(),
                resources: vec![Resource {
                    name: p.name.clone(),
                    version: p.version.clone(),
                    resource: Some(e.any.clone()),
                    ..Default::default()
                }],
                type_url: SECRET_TYPE_URL.to_string(),
                nonce: p.nonce.clone(),
                ..Default::default()
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
    type Resp = DiscoveryResponse;
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
    ) -> Vec<(DiscoveryResponse, u64)> {
        shared
            .sotw_responses(stream, node, out, snap)
            .into_iter()
            .map(|r| (r, 1))
            .collect()
    }
}

impl Flavor for DeltaStream {
    type Req = DeltaDiscoveryRequest;
    type Resp = DeltaDiscoveryResponse;
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
    ) -> Vec<(DeltaDiscoveryResponse, u64)> {
        shared
            .delta_responses(stream, node, out, snap)
            .into_iter()
            .map(|r| {
                let pushes = r.resources.len() as u64;
                (r, pushes)
            })
            .collect()
    }
}

/// One stream's task: feeds the client's requests and every published snapshot to the state
/// machine and sends what it decides, until the client leaves, errs or the server stops.
async fn run_stream<F: Flavor>(
    shared: Arc<Shared>,
    mut st: F,
    id: String,
    mut inbound: Streaming<F::Req>,
    tx: mpsc::Sender<Result<F::Resp, Status>>,
) {
    let mut snaps = shared.snapshots.clone();
    let mut shutdown = shared.shutdown.clone();
    let mut node = String::from("-");
    let mut first = true;
    loop {
        let (out, snap) = tokio::select! {
            _ = crate::stopped(&mut shutdown) => break,
            msg = inbound.message() => match msg {
                Ok(Some(req)) => {
                    if first {
                        node = F::node(&req);
                        first = false;
                        tracing::info!(stream = %id, node = %node, mode = F::MODE.as_str(), "stream opened");
                    }
                    let snap = snaps.borrow_and_update().clone();
                    match st.on_request(req, &snap, &shared.limits) {
                        Ok(out) => (out, snap),
                        Err(s) => {
                            tracing::warn!(stream = %id, node = %node, error = %s.message(), "bad request; closing stream");
                            let _ = tx.send(Err(s)).await;
                            break;
                        }
                    }
                }
                Ok(None) => break,
                Err(s) => {
                    // tonic reports a message over max_decoding_message_size as OUT_OF_RANGE;
                    // gRPC's code for it is RESOURCE_EXHAUSTED.
                    let s = if s.code() == tonic::Code::OutOfRange {
                        Status::resource_exhausted(s.message().to_string())
                    } else {
                        s
                    };
                    if s.code() == tonic::Code::ResourceExhausted {
                        tracing::warn!(stream = %id, node = %node, error = %s.message(), "request too large; closing stream");
                    } else {
                        tracing::debug!(stream = %id, node = %node, error = %s.message(), "stream ended by client");
                    }
                    // Tell the client why (a decoding limit, say); never wait for a client
                    // that is gone.
                    let _ = tx.try_send(Err(s));
                    break;
                }
            },
            changed = snaps.changed() => {
                if changed.is_err() {
                    break;
                }
                let snap = snaps.borrow_and_update().clone();
                (st.on_update(&snap), snap)
            }
        };
        shared.log_events(F::MODE, &id, &node, &out);
        for (resp, pushes) in F::responses(&shared, &id, &node, &out, &snap) {
            if tx.send(Ok(resp)).await.is_err() {
                tracing::debug!(stream = %id, "client went away");
                return;
            }
            shared.metrics.pushes.add(F::MODE, pushes);
        }
    }
    tracing::debug!(stream = %id, node = %node, "stream closed");
}

#[tonic::async_trait]
impl SecretDiscoveryService for SdsService {
    type DeltaSecretsStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;
    type StreamSecretsStream = ReceiverStream<Result<DiscoveryResponse, Status>>;

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let (id, guard) = self.inner.open(Mode::Delta);
        let st = DeltaStream::new(&id);
        let shared = self.inner.clone();
        tokio::spawn(async move {
            run_stream(shared, st, id, request.into_inner(), tx).await;
            drop(guard);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let (id, guard) = self.inner.open(Mode::Sotw);
        let st = SotwStream::new(&id);
        let shared = self.inner.clone();
        tokio::spawn(async move {
            run_stream(shared, st, id, request.into_inner(), tx).await;
            drop(guard);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let req = request.into_inner();
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
                    resources.push(e.any.clone());
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
        Ok(Response::new(DiscoveryResponse {
            version_info: versions.join(","),
            resources,
            type_url: SECRET_TYPE_URL.to_string(),
            nonce,
            ..Default::default()
        }))
    }
}
