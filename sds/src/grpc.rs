//! The gRPC face of the SDS service: routing of the three `SecretDiscoveryService` methods,
//! how requests are read and how responses are written.
//!
//! The server code that `envoy-types` generates fixes tonic's default codec: an 8 KiB encode
//! and an 8 KiB decode buffer for every stream, the decode buffer kept as large as the largest
//! request for the stream's life (a real Envoy's requests carry its node, about 60 KB), and
//! each response encoded whole for each stream. Here, for all three methods:
//!
//! - requests are read straight from the HTTP/2 body ([`Requests`]) into a buffer freed after
//!   each message, so an idle stream holds none;
//! - a response is a small per-stream head (version, nonce, type URL) followed by the
//!   resource, which is encoded once per secret version ([`Pieces`]) and handed to HTTP/2 as
//!   the same [`Bytes`] by every stream that sends it ([`FramedBody`]). Protobuf parses
//!   concatenated encodings as one merged message, so head plus piece is the same wire
//!   message as the whole response (a unit test checks it).
//!
//! See docs/sds.md (Performance) for what each part saves.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use http_body::Body as _;
use prost::Message;
use tonic::Status;

use crate::service::{ResponseStream, SdsService};

/// The gRPC service name.
pub const SERVICE: &str = "envoy.service.secret.v3.SecretDiscoveryService";
const STREAM_SECRETS: &str = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets";
const DELTA_SECRETS: &str = "/envoy.service.secret.v3.SecretDiscoveryService/DeltaSecrets";
const FETCH_SECRETS: &str = "/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets";

/// The parts of a response that are the same for every stream, encoded once per secret
/// version: the resource as the `resources` field of a `DiscoveryResponse` and of a
/// `DeltaDiscoveryResponse`.
#[derive(Clone, Default)]
pub struct Pieces {
    sotw: Bytes,
    delta: Bytes,
}

impl Pieces {
    /// Encodes `any` (the secret named `name` at `version`) for both protocols.
    pub fn new(name: &str, version: &str, any: &Any) -> Pieces {
        let sotw = DiscoveryResponse {
            resources: vec![any.clone()],
            ..Default::default()
        };
        let delta = DeltaDiscoveryResponse {
            resources: vec![Resource {
                name: name.to_string(),
                version: version.to_string(),
                resource: Some(any.clone()),
                ..Default::default()
            }],
            ..Default::default()
        };
        Pieces {
            sotw: sotw.encode_to_vec().into(),
            delta: delta.encode_to_vec().into(),
        }
    }

    /// The resource as `DiscoveryResponse.resources`.
    pub fn sotw(&self) -> &Bytes {
        &self.sotw
    }

    /// The resource as `DeltaDiscoveryResponse.resources`.
    pub fn delta(&self) -> &Bytes {
        &self.delta
    }
}

impl std::fmt::Debug for Pieces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the bytes: a certificate's pieces hold its private key.
        f.debug_struct("Pieces")
            .field("sotw_len", &self.sotw.len())
            .field("delta_len", &self.delta.len())
            .finish()
    }
}

/// A response: a per-stream head message followed by shared, already encoded fields of the
/// same message type.
#[derive(Clone, Debug, Default)]
pub struct Framed<M> {
    /// Fields that differ per stream (version, nonce, type URL, removals).
    pub head: M,
    /// Encoded fields shared across streams (the resources), appended after the head.
    pub tail: Vec<Bytes>,
}

impl<M: Message> Framed<M> {
    /// A response holding only `head`.
    pub fn head(head: M) -> Self {
        Framed {
            head,
            tail: Vec::new(),
        }
    }

    /// The encoded length.
    pub fn encoded_len(&self) -> usize {
        self.head.encoded_len() + self.tail.iter().map(Bytes::len).sum::<usize>()
    }
}

/// The request messages of one call, read straight from the HTTP/2 body.
///
/// Envoy sends its node (every extension it was built with: about 60 KB for Envoy 1.40) in
/// its requests, and tonic's `Streaming` keeps a decode buffer as large as the largest request
/// for as long as the stream lives. This reader holds only the bytes of the message in
/// progress and frees them once the message is decoded, so an idle stream holds no request
/// buffer at all.
pub struct Requests<M> {
    body: tonic::body::Body,
    buf: BytesMut,
    max: usize,
    ended: bool,
    _m: PhantomData<fn() -> M>,
}

impl<M: Message + Default> Requests<M> {
    /// Reads the messages of `body`, refusing any over `max` bytes.
    pub fn new(body: tonic::body::Body, max: usize) -> Self {
        Requests {
            body,
            buf: BytesMut::new(),
            max,
            ended: false,
            _m: PhantomData,
        }
    }

    /// The next message; `None` once the client has half-closed the stream.
    pub async fn message(&mut self) -> Result<Option<M>, Status> {
        std::future::poll_fn(|cx| self.poll_message(cx)).await
    }

    fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<M>, Status>> {
        loop {
            if let Some(m) = self.decode()? {
                return Poll::Ready(Ok(Some(m)));
            }
            if self.ended {
                return Poll::Ready(if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(Status::invalid_argument(format!(
                        "the request stream ended inside a message ({} bytes of it)",
                        self.buf.len()
                    )))
                });
            }
            match std::task::ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    // Trailers of a request stream carry nothing this server reads.
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(s)) => return Poll::Ready(Err(s)),
                None => self.ended = true,
            }
        }
    }

    /// Decodes the message at the start of the buffer once it is whole.
    fn decode(&mut self) -> Result<Option<M>, Status> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        if self.buf[0] != 0 {
            return Err(Status::unimplemented(
                "compressed request message; this server accepts no grpc-encoding",
            ));
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        let len = len as usize;
        if len > self.max {
            return Err(Status::resource_exhausted(format!(
                "request message of {len} bytes; at most {} are allowed (--max-request-bytes)",
                self.max
            )));
        }
        if self.buf.len() < 5 + len {
            self.buf.reserve(5 + len - self.buf.len());
            return Ok(None);
        }
        let m = M::decode(&self.buf[5..5 + len])
            .map_err(|e| Status::invalid_argument(format!("malformed request message: {e}")))?;
        tracing::trace!(bytes = len, "request message");
        if self.buf.len() == 5 + len {
            // Free the buffer: an idle stream holds none.
            self.buf = BytesMut::new();
        } else {
            let _ = self.buf.split_to(5 + len);
        }
        Ok(Some(m))
    }
}

/// Refuses a compressed request stream: this server accepts no `grpc-encoding` (as tonic
/// does when no compression is enabled).
fn check_encoding(req: &http::Request<tonic::body::Body>) -> Result<(), Status> {
    match req.headers().get("grpc-encoding") {
        None => Ok(()),
        Some(v) if v == "identity" => Ok(()),
        Some(v) => Err(Status::unimplemented(format!(
            "grpc-encoding {v:?} is not supported; send uncompressed messages"
        ))),
    }
}

/// Starts a call: reads its requests with [`Requests`] and answers with a [`FramedBody`] of
/// what `respond` makes of them.
fn call<Req, Resp>(
    req: http::Request<tonic::body::Body>,
    max_request_bytes: usize,
    respond: impl FnOnce(Requests<Req>) -> ResponseStream<Framed<Resp>>,
) -> http::Response<tonic::body::Body>
where
    Req: Message + Default + Send + 'static,
    Resp: Message + Send + 'static,
{
    if let Err(s) = check_encoding(&req) {
        return s.into_http();
    }
    let inbound = Requests::new(req.into_body(), max_request_bytes);
    let body = FramedBody {
        stream: respond(inbound),
        pending: VecDeque::new(),
        trailers: None,
        done: false,
    };
    let mut resp = http::Response::new(tonic::body::Body::new(body));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    resp
}

/// The response body of a streaming call. Each response goes out as gRPC's 5-byte prefix
/// and the head's encoding in one small buffer, then each shared piece as it is: a clone of
/// the same [`Bytes`] every other stream sends, so HTTP/2 writes it without a per-stream
/// copy and the stream keeps nothing once it is written. The call's status ends the body as
/// trailers.
struct FramedBody<M> {
    stream: ResponseStream<Framed<M>>,
    pending: VecDeque<Bytes>,
    trailers: Option<http::HeaderMap>,
    done: bool,
}

fn trailers(status: &Status) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    if status.add_header(&mut h).is_err() {
        h.insert("grpc-status", http::HeaderValue::from_static("13"));
    }
    h
}

impl<M: Message> FramedBody<M> {
    fn queue(&mut self, f: Framed<M>) {
        let len = f.encoded_len();
        let Ok(prefix) = u32::try_from(len) else {
            self.trailers = Some(trailers(&Status::internal(format!(
                "a response of {len} bytes is too large for gRPC"
            ))));
            return;
        };
        let mut head = BytesMut::with_capacity(5 + f.head.encoded_len());
        head.put_u8(0);
        head.put_u32(prefix);
        if let Err(e) = f.head.encode(&mut head) {
            self.trailers = Some(trailers(&Status::internal(format!(
                "encoding a response: {e}"
            ))));
            return;
        }
        self.pending.push_back(head.freeze());
        self.pending.extend(f.tail);
    }
}

impl<M: Message> http_body::Body for FramedBody<M> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let this = &mut *self;
        loop {
            if let Some(b) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(http_body::Frame::data(b))));
            }
            if let Some(t) = this.trailers.take() {
                this.done = true;
                return Poll::Ready(Some(Ok(http_body::Frame::trailers(t))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match std::task::ready!(this.stream.as_mut().poll_next(cx)) {
                Some(Ok(f)) => this.queue(f),
                Some(Err(s)) => this.trailers = Some(trailers(&s)),
                None => this.trailers = Some(trailers(&Status::ok(""))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.pending.is_empty() && self.trailers.is_none()
    }
}

/// The tonic service: routes the three methods to an [`SdsService`].
#[derive(Clone, Debug)]
pub struct SdsServer {
    service: SdsService,
    max_request_bytes: usize,
}

impl SdsServer {
    /// Serves `service`, refusing requests over `max_request_bytes` (`RESOURCE_EXHAUSTED`).
    pub fn new(service: SdsService, max_request_bytes: usize) -> Self {
        SdsServer {
            service,
            max_request_bytes,
        }
    }
}

impl tonic::server::NamedService for SdsServer {
    const NAME: &'static str = SERVICE;
}

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for SdsServer {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let service = self.service.clone();
        let max = self.max_request_bytes;
        let resp = match req.uri().path() {
            STREAM_SECRETS => call(req, max, |inbound| service.stream_secrets(inbound)),
            DELTA_SECRETS => call(req, max, |inbound| service.delta_secrets(inbound)),
            // Unary: one request, one response, then the status; the same reader and writer.
            FETCH_SECRETS => call(req, max, |mut inbound: Requests<DiscoveryRequest>| {
                let once = async move {
                    let req = inbound.message().await?.ok_or_else(|| {
                        Status::invalid_argument("FetchSecrets carried no request message")
                    })?;
                    service.fetch_secrets(req)
                };
                Box::pin(futures_util::stream::once(once))
            }),
            path => Status::unimplemented(format!("no method {path}")).into_http(),
        };
        std::future::ready(Ok(resp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl<M: Message> Framed<M> {
        /// The whole encoding.
        fn to_vec(&self) -> Vec<u8> {
            let mut v = Vec::with_capacity(self.encoded_len());
            self.head.encode(&mut v).expect("a Vec grows");
            for t in &self.tail {
                v.extend_from_slice(t);
            }
            v
        }
    }
    use crate::secrets::SECRET_TYPE_URL;

    fn any() -> Any {
        Any {
            type_url: SECRET_TYPE_URL.to_string(),
            value: vec![7; 3000],
        }
    }

    #[test]
    fn head_plus_piece_is_the_whole_sotw_response() {
        let p = Pieces::new("default", "v1", &any());
        let whole = DiscoveryResponse {
            version_info: "v1".into(),
            resources: vec![any()],
            type_url: SECRET_TYPE_URL.into(),
            nonce: "s1-1".into(),
            ..Default::default()
        };
        let framed = Framed {
            head: DiscoveryResponse {
                version_info: "v1".into(),
                type_url: SECRET_TYPE_URL.into(),
                nonce: "s1-1".into(),
                ..Default::default()
            },
            tail: vec![p.sotw().clone()],
        };
        assert_eq!(framed.encoded_len(), whole.encoded_len());
        let back = DiscoveryResponse::decode(framed.to_vec().as_slice()).unwrap();
        assert_eq!(back, whole);
    }

    #[test]
    fn head_plus_piece_is_the_whole_delta_response() {
        let p = Pieces::new("ROOTCA", "v2", &any());
        let whole = DeltaDiscoveryResponse {
            system_version_info: "v2".into(),
            resources: vec![Resource {
                name: "ROOTCA".into(),
                version: "v2".into(),
                resource: Some(any()),
                ..Default::default()
            }],
            type_url: SECRET_TYPE_URL.into(),
            nonce: "s2-1".into(),
            ..Default::default()
        };
        let framed = Framed {
            head: DeltaDiscoveryResponse {
                system_version_info: "v2".into(),
                type_url: SECRET_TYPE_URL.into(),
                nonce: "s2-1".into(),
                ..Default::default()
            },
            tail: vec![p.delta().clone()],
        };
        let back = DeltaDiscoveryResponse::decode(framed.to_vec().as_slice()).unwrap();
        assert_eq!(back, whole);
    }

    #[test]
    fn several_pieces_make_a_repeated_field_in_order() {
        let a = Any {
            type_url: "a".into(),
            value: vec![1],
        };
        let b = Any {
            type_url: "b".into(),
            value: vec![2],
        };
        let framed = Framed {
            head: DiscoveryResponse::default(),
            tail: vec![
                Pieces::new("a", "1", &a).sotw().clone(),
                Pieces::new("b", "1", &b).sotw().clone(),
            ],
        };
        let back = DiscoveryResponse::decode(framed.to_vec().as_slice()).unwrap();
        assert_eq!(back.resources, vec![a, b]);
    }

    #[test]
    fn pieces_debug_shows_no_bytes() {
        let p = Pieces::new("default", "v1", &any());
        let s = format!("{p:?}");
        assert!(!s.contains("7, 7"), "{s}");
        assert!(s.contains("sotw_len"), "{s}");
    }
}
