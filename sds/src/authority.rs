//! Serving gRPC clients that send their Unix socket path as `:authority`.
//!
//! gRPC C-core (since 1.57: Envoy's `google_grpc`, Python, C++) sends the percent-encoded
//! socket path as `:authority`, grpc-java the raw path. Neither is a valid URI authority, and
//! h2 (under tonic and hyper) resets every such stream with PROTOCOL_ERROR; h2 has no option
//! to relax that (hyperium/h2#487). So every connection accepted on a Unix listener is wrapped
//! in [`UnixAuthorityFix`], which reads the client's HTTP/2 frames before h2 does and rewrites
//! each header block whose `:authority` is not a valid authority, putting
//! [`REPLACEMENT`] there instead. The server never uses `:authority`, and on a Unix socket it
//! carries no routing meaning.
//!
//! How: after the connection preface, frames are passed through unchanged except HEADERS and
//! their CONTINUATIONs. Each header block is decoded with HPACK (the client's dynamic table
//! is kept per connection) and encoded again as literals without indexing, so h2's decoder
//! table stays empty and needs no bookkeeping; padding is dropped, priority kept. Server to
//! client bytes are not touched.
//!
//! Bounds and bad input: a header block over [`MAX_BLOCK`] bytes (compressed) or
//! [`MAX_DECODED`] bytes (decoded, HPACK size), a block that does not decode, a malformed
//! frame or anything but an HTTP/2 preface switches the connection to pass-through for good:
//! the bytes go to h2 as they came and h2 answers with the error it would have given without
//! this layer. Nothing here panics on input; [`AuthorityRewriter`] does no I/O, so it is
//! fuzzed and tested on bytes alone.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a bad `:authority` becomes.
pub const REPLACEMENT: &str = "localhost";
/// Largest header block (all of its frames, compressed) that is rewritten.
pub const MAX_BLOCK: usize = 64 * 1024;
/// Largest decoded header list (HPACK size: name + value + 32 per field) that is rewritten.
/// h2 refuses lists over 16 KiB anyway.
pub const MAX_DECODED: usize = 64 * 1024;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Payload size of the frames written towards h2: the HTTP/2 minimum of
/// SETTINGS_MAX_FRAME_SIZE, which every receiver accepts.
const OUT_FRAME: usize = 16 * 1024;
/// The HPACK table size h2's decoder advertises (the HTTP/2 default; the server keeps it).
const TABLE_SIZE: usize = 4096;
/// Read size from the socket.
const READ_CHUNK: usize = 8 * 1024;
/// [`AuthorityRewriter::push`] stops once its output holds this much: HPACK can expand a
/// few bytes into a 4 KiB header, so the output is bounded by this, not by the input.
pub const OUT_HIGH_WATER: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Preface,
    Frames,
    Passthrough,
}

/// A header block being collected (HEADERS plus CONTINUATIONs).
struct Block {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    /// The frames as received, for pass-through.
    raw: Vec<u8>,
}

/// The client-to-server half of an HTTP/2 connection, with bad `:authority` values
/// rewritten. Feed it what the client sent; it appends what h2 should read.
pub struct AuthorityRewriter {
    state: State,
    pending: Vec<u8>,
    /// Payload bytes of the current frame still to pass through unchanged.
    skip: usize,
    block: Option<Block>,
    decoder: loona_hpack::Decoder<'static>,
    rewritten: u64,
}

impl std::fmt::Debug for AuthorityRewriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityRewriter")
            .field("state", &self.state)
            .field("rewritten", &self.rewritten)
            .finish_non_exhaustive()
    }
}

impl Default for AuthorityRewriter {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether h2 accepts `v` as `:authority`.
fn valid_authority(v: &[u8]) -> bool {
    http::uri::Authority::try_from(v).is_ok()
}

/// HPACK integer with an `n`-bit prefix whose high bits are `first`.
fn put_int(out: &mut Vec<u8>, first: u8, n: u8, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A literal header field without indexing, new name, no Huffman coding.
fn put_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0);
    put_int(out, 0, 7, name.len());
    out.extend_from_slice(name);
    put_int(out, 0, 7, value.len());
    out.extend_from_slice(value);
}

fn put_frame_header(out: &mut Vec<u8>, len: usize, ty: u8, flags: u8, stream: u32) {
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.push(ty);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
}

impl AuthorityRewriter {
    /// A rewriter at the start of a connection.
    pub fn new() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        AuthorityRewriter {
            state: State::Preface,
            pending: Vec::new(),
            skip: 0,
            block: None,
            decoder,
            rewritten: 0,
        }
    }

    /// How many `:authority` values were rewritten so far.
    pub fn rewritten(&self) -> u64 {
        self.rewritten
    }

    /// Whether input is held that [`AuthorityRewriter::push`] may turn into output without
    /// more input.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Whether the connection passes through unchanged from here on.
    pub fn is_passthrough(&self) -> bool {
        self.state == State::Passthrough
    }

    /// Feeds bytes the client sent; appends to `out` what h2 should read. Stops once `out`
    /// holds [`OUT_HIGH_WATER`] bytes, keeping the rest of the input: call again (with more
    /// input, or none) once `out` has been consumed.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        if self.state == State::Passthrough {
            out.extend_from_slice(input);
            return;
        }
        self.pending.extend_from_slice(input);
        self.process(out);
        if self.pending.is_empty() {
            // An idle connection holds no input buffer (SDS reads are rare and small).
            self.pending = Vec::new();
        }
    }

    /// The client closed its side: what is left goes to h2 as it came.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        self.bail(out);
    }

    /// Gives up rewriting: everything held and everything after passes through.
    fn bail(&mut self, out: &mut Vec<u8>) {
        if let Some(b) = self.block.take() {
            out.extend_from_slice(&b.raw);
        }
        out.append(&mut self.pending);
        self.pending = Vec::new();
        self.state = State::Passthrough;
    }

    fn process(&mut self, out: &mut Vec<u8>) {
        loop {
            match self.state {
                State::Passthrough => {
                    out.append(&mut self.pending);
                    return;
                }
                State::Preface => {
                    let n = self.pending.len().min(PREFACE.len());
                    if self.pending[..n] != PREFACE[..n] {
                        self.bail(out);
                        continue;
                    }
                    if n < PREFACE.len() {
                        return;
                    }
                    out.extend(self.pending.drain(..n));
                    self.state = State::Frames;
                }
                State::Frames => {
                    if out.len() >= OUT_HIGH_WATER {
                        return;
                    }
                    if self.skip > 0 {
                        let n = self.skip.min(self.pending.len());
                        if n == 0 {
                            return;
                        }
                        out.extend(self.pending.drain(..n));
                        self.skip -= n;
                        continue;
                    }
                    if self.pending.len() < FRAME_HEADER {
                        return;
                    }
                    if !self.frame(out) {
                        return;
                    }
                }
            }
        }
    }

    /// Handles the frame at the start of `pending`; false when more bytes are needed.
    fn frame(&mut self, out: &mut Vec<u8>) -> bool {
        let h = &self.pending[..FRAME_HEADER];
        let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
        let (ty, flags) = (h[3], h[4]);
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        match &self.block {
            Some(b) if ty != CONTINUATION || stream != b.stream => {
                // Interleaved frame inside a header block: h2 reports it.
                self.bail(out);
                return true;
            }
            None if ty != HEADERS => {
                out.extend(self.pending.drain(..FRAME_HEADER));
                self.skip = len;
                return true;
            }
            _ => {}
        }
        let held = self.block.as_ref().map_or(0, |b| b.raw.len());
        // A frame over h2's SETTINGS_MAX_FRAME_SIZE (which is OUT_FRAME) is h2's to refuse.
        if len > OUT_FRAME || held + len > MAX_BLOCK + FRAME_HEADER * (MAX_BLOCK / OUT_FRAME + 1) {
            self.bail(out);
            return true;
        }
        if self.pending.len() < FRAME_HEADER + len {
            return false;
        }
        let payload = &self.pending[FRAME_HEADER..FRAME_HEADER + len];
        match self.block.as_mut() {
            None => {
                let mut p = payload;
                let mut pad = 0;
                if flags & PADDED != 0 {
                    let Some((&n, rest)) = p.split_first() else {
                        self.bail(out);
                        return true;
                    };
                    pad = n as usize;
                    p = rest;
                }
                let mut priority = None;
                if flags & PRIORITY != 0 {
                    let Some((pr, rest)) = p.split_first_chunk::<5>() else {
                        self.bail(out);
                        return true;
                    };
                    priority = Some(*pr);
                    p = rest;
                }
                if pad > p.len() {
                    self.bail(out);
                    return true;
                }
                let fragment = p[..p.len() - pad].to_vec();
                self.block = Some(Block {
                    stream,
                    end_stream: flags & END_STREAM != 0,
                    priority,
                    fragment,
                    raw: self.pending.drain(..FRAME_HEADER + len).collect(),
                });
            }
            Some(b) => {
                b.fragment.extend_from_slice(payload);
                b.raw.extend(self.pending.drain(..FRAME_HEADER + len));
            }
        }
        if flags & END_HEADERS != 0 {
            self.end_block(out);
        }
        true
    }

    /// Decodes the complete block, rewrites `:authority` if needed, and writes it as
    /// HEADERS (+ CONTINUATION) frames.
    fn end_block(&mut self, out: &mut Vec<u8>) {
        let Some(b) = self.block.take() else { return };
        let mut encoded = Vec::with_capacity(b.fragment.len() + 64);
        let (mut size, mut over, mut changed) = (0usize, false, 0u64);
        let decoded = self.decoder.decode_with_cb(&b.fragment, |n, v| {
            size = size.saturating_add(n.len() + v.len() + 32);
            if size > MAX_DECODED {
                over = true;
            }
            if over {
                return;
            }
            if &*n == b":authority" && std::str::from_utf8(&v).is_ok() && !valid_authority(&v) {
                changed += 1;
                put_literal(&mut encoded, &n, REPLACEMENT.as_bytes());
            } else {
                put_literal(&mut encoded, &n, &v);
            }
        });
        if decoded.is_err() || over {
            self.block = Some(b);
            self.bail(out);
            return;
        }
        if changed > 0 {
            tracing::debug!(
                stream = b.stream,
                "Unix socket client sent a socket path as :authority; serving it as {REPLACEMENT}"
            );
        }
        self.rewritten += changed;
        let first_room = OUT_FRAME - if b.priority.is_some() { 5 } else { 0 };
        let first_len = encoded.len().min(first_room);
        let mut flags = if b.end_stream { END_STREAM } else { 0 };
        if b.priority.is_some() {
            flags |= PRIORITY;
        }
        if first_len == encoded.len() {
            flags |= END_HEADERS;
        }
        let prio_len = if b.priority.is_some() { 5 } else { 0 };
        put_frame_header(out, first_len + prio_len, HEADERS, flags, b.stream);
        if let Some(p) = b.priority {
            out.extend_from_slice(&p);
        }
        out.extend_from_slice(&encoded[..first_len]);
        let mut rest = &encoded[first_len..];
        while !rest.is_empty() {
            let n = rest.len().min(OUT_FRAME);
            let f = if n == rest.len() { END_HEADERS } else { 0 };
            put_frame_header(out, n, CONTINUATION, f, b.stream);
            out.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
        }
    }
}

/// A connection accepted on a Unix listener, with [`AuthorityRewriter`] on its read side.
#[derive(Debug)]
pub struct UnixAuthorityFix<T> {
    inner: T,
    fix: AuthorityRewriter,
    out: Vec<u8>,
    out_pos: usize,
    eof: bool,
}

impl<T> UnixAuthorityFix<T> {
    /// Wraps a freshly accepted connection.
    pub fn new(inner: T) -> Self {
        UnixAuthorityFix {
            inner,
            fix: AuthorityRewriter::new(),
            out: Vec::new(),
            out_pos: 0,
            eof: false,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for UnixAuthorityFix<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_pos);
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    // An idle connection holds no output buffer.
                    this.out = Vec::new();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if this.fix.has_pending() {
                // Input held back at the output bound, or an incomplete frame.
                this.fix.push(&[], &mut this.out);
                if !this.out.is_empty() {
                    continue;
                }
            }
            if this.fix.is_passthrough() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                this.eof = true;
                this.fix.finish(&mut this.out);
            } else {
                this.fix.push(rb.filled(), &mut this.out);
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for UnixAuthorityFix<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected
    for UnixAuthorityFix<T>
{
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        put_frame_header(&mut f, payload.len(), ty, flags, stream);
        f.extend_from_slice(payload);
        f
    }

    /// Type, flags, stream, decoded headers (on END_HEADERS) and payload of one frame.
    type Frame = (u8, u8, u32, Vec<(Vec<u8>, Vec<u8>)>, Vec<u8>);

    /// Splits h2's input into frames and decodes every header block with a fresh decoder
    /// per connection (as h2 would, with its table).
    fn h2_view(bytes: &[u8]) -> Vec<Frame> {
        assert_eq!(&bytes[..PREFACE.len()], PREFACE);
        let mut rest = &bytes[PREFACE.len()..];
        let mut dec = loona_hpack::Decoder::new();
        let mut frames = Vec::new();
        let mut block = Vec::new();
        while !rest.is_empty() {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            let (ty, flags) = (rest[3], rest[4]);
            let id = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            let payload = rest[9..9 + len].to_vec();
            rest = &rest[9 + len..];
            let mut headers = Vec::new();
            if ty == HEADERS || ty == CONTINUATION {
                let skip = if flags & PRIORITY != 0 && ty == HEADERS {
                    5
                } else {
                    0
                };
                block.extend_from_slice(&payload[skip..]);
                if flags & END_HEADERS != 0 {
                    headers = dec.decode(&block).unwrap();
                    block.clear();
                }
            }
            frames.push((ty, flags, id, headers, payload));
        }
        frames
    }

    fn request(enc: &mut loona_hpack::Encoder<'_>, authority: &[u8]) -> Vec<u8> {
        enc.encode([
            (&b":method"[..], &b"POST"[..]),
            (&b":path"[..], &b"/x"[..]),
            (&b":authority"[..], authority),
            (&b"te"[..], &b"trailers"[..]),
        ])
    }

    fn run(input: &[u8], chunk: usize) -> (Vec<u8>, AuthorityRewriter) {
        let mut r = AuthorityRewriter::new();
        let mut out = Vec::new();
        for c in input.chunks(chunk.max(1)) {
            r.push(c, &mut out);
        }
        r.finish(&mut out);
        (out, r)
    }

    #[test]
    fn rewrites_socket_paths_and_keeps_the_rest() {
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(4, 0, 0, &[0, 3, 0, 0, 0, 100]));
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &request(&mut enc, b"%2Frun%2Fs.sock"),
        ));
        input.extend(frame(0, END_STREAM, 1, b"\0\0\0\0\x01z"));
        // From the dynamic table this time, split over CONTINUATION, padded, with priority.
        let b = request(&mut enc, b"%2Frun%2Fs.sock");
        let mut first = vec![2u8];
        first.extend_from_slice(&[0, 0, 0, 1, 7]);
        first.extend_from_slice(&b[..2]);
        first.extend_from_slice(&[0, 0]);
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 3, &first));
        input.extend(frame(CONTINUATION, 0, 3, &b[2..3]));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, &b[3..]));
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            5,
            &request(&mut enc, b"/run/s.sock"),
        ));
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            7,
            &request(&mut enc, b"example.com:80"),
        ));
        for chunk in [1, 2, 7, 9, 100, input.len()] {
            let (out, r) = run(&input, chunk);
            assert_eq!(r.rewritten(), 3, "chunk {chunk}");
            let frames = h2_view(&out);
            let kinds: Vec<_> = frames.iter().map(|f| (f.0, f.1, f.2)).collect();
            assert_eq!(
                kinds,
                vec![
                    (4, 0, 0),
                    (HEADERS, END_HEADERS, 1),
                    (0, END_STREAM, 1),
                    (HEADERS, END_HEADERS | PRIORITY | END_STREAM, 3),
                    (HEADERS, END_HEADERS, 5),
                    (HEADERS, END_HEADERS, 7),
                ]
            );
            assert_eq!(frames[0].4, [0, 3, 0, 0, 0, 100]);
            assert_eq!(frames[2].4, b"\0\0\0\0\x01z");
            assert_eq!(&frames[3].4[..5], &[0, 0, 0, 1, 7]);
            let auth = |i: usize| {
                frames[i]
                    .3
                    .iter()
                    .find(|(n, _)| n == b":authority")
                    .map(|(_, v)| v.clone())
                    .unwrap()
            };
            for i in [1, 3, 4] {
                assert_eq!(auth(i), b"localhost");
                assert_eq!(frames[i].3.len(), 4);
                assert_eq!(frames[i].3[1], (b":path".to_vec(), b"/x".to_vec()));
            }
            assert_eq!(auth(5), b"example.com:80");
        }
    }

    #[test]
    fn large_blocks_are_split_and_oversized_ones_pass_through() {
        let mut enc = loona_hpack::Encoder::new();
        let big = vec![b'a'; 40 * 1024];
        let block = enc.encode([
            (&b":authority"[..], &b"/s"[..]),
            (&b"x-big"[..], big.as_slice()),
        ]);
        let mut input = PREFACE.to_vec();
        input.extend(split(1, &block));
        let (out, r) = run(&input, 4096);
        assert_eq!(r.rewritten(), 1);
        let frames = h2_view(&out);
        assert_eq!(frames.len(), 3);
        assert!(frames.iter().all(|f| f.4.len() <= OUT_FRAME));
        assert_eq!(frames[2].3[1].1, big);

        // Over MAX_BLOCK: h2 gets the bytes as they came.
        let huge = vec![b'a'; MAX_BLOCK + 1];
        let block = enc.encode([(&b"x-huge"[..], huge.as_slice())]);
        let mut input = PREFACE.to_vec();
        input.extend(split(1, &block));
        let (out, r) = run(&input, 4096);
        assert!(r.is_passthrough());
        assert_eq!(out, input);

        // A frame over the 16 KiB frame size: h2's to refuse (FRAME_SIZE_ERROR).
        let block = enc.encode([(&b":authority"[..], &b"/s"[..]), (&b"x"[..], &big[..20000])]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let (out, r) = run(&input, 4096);
        assert!(r.is_passthrough());
        assert_eq!(out, input);
    }

    /// A header block as HEADERS + CONTINUATION frames of at most 16 KiB.
    fn split(stream: u32, block: &[u8]) -> Vec<u8> {
        let chunks: Vec<&[u8]> = block.chunks(OUT_FRAME).collect();
        let mut v = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let ty = if i == 0 { HEADERS } else { CONTINUATION };
            let f = if i + 1 == chunks.len() {
                END_HEADERS
            } else {
                0
            };
            v.extend(frame(ty, f, stream, c));
        }
        v
    }

    #[test]
    fn bad_input_passes_through_unchanged() {
        let mut cases: Vec<Vec<u8>> = vec![
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            b"PRI * HTTP/2.0\r\n\r\nXX".to_vec(),
        ];
        let with = |frames: &[Vec<u8>]| {
            let mut v = PREFACE.to_vec();
            frames.iter().for_each(|f| v.extend_from_slice(f));
            v
        };
        // Undecodable HPACK (index out of range), bad padding, truncated priority,
        // interleaved frame, CONTINUATION on another stream, an integer that never ends.
        cases.push(with(&[frame(HEADERS, END_HEADERS, 1, &[0xff, 0x7f])]));
        cases.push(with(&[frame(HEADERS, END_HEADERS | PADDED, 1, &[9, 0x82])]));
        cases.push(with(&[frame(HEADERS, END_HEADERS | PRIORITY, 1, &[0, 0])]));
        cases.push(with(&[frame(HEADERS, 0, 1, &[0x82]), frame(0, 0, 1, b"x")]));
        cases.push(with(&[
            frame(HEADERS, 0, 1, &[0x82]),
            frame(CONTINUATION, END_HEADERS, 3, &[0x84]),
        ]));
        cases.push(with(&[frame(
            HEADERS,
            END_HEADERS,
            1,
            &[0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        )]));
        // A truncated connection.
        cases.push(with(&[frame(HEADERS, 0, 1, &[0x82])])[..30].to_vec());
        for c in cases {
            for chunk in [1, 5, c.len()] {
                let (out, _) = run(&c, chunk);
                assert_eq!(out, c, "chunk {chunk}");
            }
        }
    }

    #[test]
    fn hpack_expansion_is_bounded_per_push() {
        // One 4 KiB header entered once, then referenced from many 1-byte blocks: each block
        // decodes to 4 KiB, so 8 KiB of input would become megabytes at once.
        let mut enc = loona_hpack::Encoder::new();
        let big = vec![b'v'; 4000];
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &enc.encode([(&b"x-big"[..], big.as_slice())]),
        ));
        let mut n = 0u32;
        while input.len() < 64 * 1024 {
            n += 1;
            input.extend(frame(HEADERS, END_HEADERS, 1 + 2 * n, &[0xbe]));
        }
        let mut r = AuthorityRewriter::new();
        let mut h2 = Vec::new();
        let mut peak = 0;
        for c in input.chunks(READ_CHUNK) {
            let mut out = Vec::new();
            r.push(c, &mut out);
            peak = peak.max(out.len());
            h2.extend(out);
            while r.has_pending() {
                let mut out = Vec::new();
                r.push(&[], &mut out);
                if out.is_empty() {
                    break;
                }
                peak = peak.max(out.len());
                h2.extend(out);
            }
        }
        assert!(peak <= OUT_HIGH_WATER + 2 * OUT_FRAME, "peak {peak}");
        let frames = h2_view(&h2);
        assert_eq!(frames.len() as u32, n + 1);
        assert!(frames
            .iter()
            .all(|f| f.3 == vec![(b"x-big".to_vec(), big.clone())]));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // xorshift: deterministic pseudo-random frames around the interesting shapes.
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for _ in 0..3000 {
            let mut input = PREFACE.to_vec();
            for _ in 0..(next() % 6) {
                let ty = [HEADERS, CONTINUATION, 0, 4, 3][(next() % 5) as usize];
                let flags = (next() & 0x2d) as u8;
                let len = (next() % 40) as usize;
                let payload: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                input.extend(frame(ty, flags, (next() % 4) as u32, &payload));
            }
            let cut = (next() as usize) % (input.len() + 1);
            let _ = run(&input[..cut.max(PREFACE.len())], 1 + (next() % 50) as usize);
        }
    }

    #[test]
    fn integers_round_trip() {
        for v in [0, 1, 126, 127, 128, 255, 16383, 16384, 1 << 20] {
            let mut out = Vec::new();
            put_literal(&mut out, b"n", &vec![b'v'; v]);
            let d = loona_hpack::Decoder::new().decode(&out).unwrap();
            assert_eq!(d, vec![(b"n".to_vec(), vec![b'v'; v])]);
        }
    }
}
