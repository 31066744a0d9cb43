//! permessage-deflate (RFC 7692) for tungstenite, which has no extension support.
//!
//! Owns the compression codec and nothing else: negotiation lives in [`super::extension`],
//! framing in tungstenite. Inbound, an [`InflateLayer`] sits *under* tungstenite: it parses
//! frame headers on the raw byte stream, collects the fragments of every message whose first
//! frame has RSV1 set, inflates the message and hands tungstenite one ordinary frame with RSV1
//! clear. Every other byte passes through untouched, so tungstenite still does all protocol
//! checks. Outbound, [`deflate_message`] produces the payload of an RSV1 frame, which the
//! writer sends as a raw `Message::Frame`.
//!
//! The same header parser enforces a server's [`FrameLimits`] on every inbound frame,
//! compressed or not: tungstenite answers pings and gathers fragments without returning to
//! its caller, so pings, pongs and continuation frames are charged to the connection's
//! message rate here (whole messages are charged by the connection when they arrive), and
//! a message may have at most so many fragments.
//!
//! Both directions use no context takeover: every message is a fresh deflate stream. That is
//! what the deployed HunterPie client needs (it inflates each message with a fresh inflater)
//! and it lets one compressed message be shared by every follower. The inflater accepts
//! bytes after the end of a finished deflate stream, which that client sends.

use std::cell::RefCell;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The four bytes a sync flush ends with; RFC 7692 strips them from the wire.
const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Why the layer refused the inbound stream: a compressed message, or a frame over the
/// [`FrameLimits`]. Carried inside the `io::Error` that the layer returns, so the connection
/// can pick the close code.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// The compressed or the inflated message is over the configured limit (close 1009).
    #[error("message too big: over {0} bytes")]
    TooBig(usize),
    /// The payload is not a valid deflate stream (close 1007).
    #[error("invalid deflate data")]
    BadData,
    /// Frame sequence that RFC 6455/7692 forbid, e.g. a new data frame inside a
    /// compressed fragmented message (close 1002).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// A ping, pong or continuation frame over the connection's message rate (close 1008).
    #[error("rate limit: too many frames per second")]
    RateLimited,
    /// A fragmented message with more fragments than allowed (close 1009).
    #[error("message too big: more than {0} fragments")]
    TooManyFragments(usize),
}

/// What a server enforces on every inbound frame.
#[derive(Debug, Clone)]
pub struct FrameLimits {
    /// The connection's message rate, shared with the connection: it charges each whole
    /// text or binary message; the layer charges every other frame but a close (pings,
    /// pongs and continuations), so no kind of frame escapes the rate.
    pub rate: Arc<governor::DefaultDirectRateLimiter>,
    /// Frames one fragmented message may have, its first included.
    pub max_fragments: usize,
}

impl InflateError {
    /// Finds an `InflateError` inside an I/O error returned by the layer.
    pub fn from_io(err: &io::Error) -> Option<InflateError> {
        err.get_ref()?.downcast_ref::<InflateError>().copied()
    }
}

impl From<InflateError> for io::Error {
    fn from(e: InflateError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// Which side of the connection the layer is on: decides whether inbound frames are masked
/// and how rewritten frames are emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// We are the server: inbound frames are masked; rewritten frames carry a zero mask.
    Server,
    /// We are a client: inbound frames are unmasked.
    Client,
}

/// Where the header parser is in the inbound byte stream.
#[derive(Debug)]
enum Scan {
    /// Collecting a frame header (at most 14 bytes) in `header`.
    Header,
    /// Passing `remaining` payload bytes of an ordinary frame through.
    Pass { remaining: u64 },
    /// Collecting `remaining` payload bytes of a compressed message's frame.
    Collect {
        remaining: u64,
        mask: [u8; 4],
        offset: usize,
        fin: bool,
    },
}

/// A compressed message being collected across fragments.
#[derive(Debug)]
struct Pending {
    opcode: u8,
    payload: Vec<u8>,
}

/// An `AsyncRead + AsyncWrite` that inflates inbound permessage-deflate messages before
/// tungstenite sees them. Writes pass straight through.
#[derive(Debug)]
pub struct InflateLayer<S> {
    inner: S,
    /// Whether the extension was negotiated: compressed messages are inflated.
    enabled: bool,
    /// A server's limits on every frame: enforced by the scanner with the extension, by
    /// [`InflateLayer::observe`] without it. With neither, bytes pass straight through.
    limits: Option<FrameLimits>,
    /// Frames of the fragmented message in progress (0: none in progress).
    fragments: usize,
    side: Side,
    /// Limit for a compressed message and for its inflated size.
    max_message: usize,
    /// Bytes read from `inner` that are not scanned yet (a partial header, or what followed
    /// a compressed frame). Empty (no allocation) on an idle connection.
    input: BytesMut,
    /// Scanned bytes ready for tungstenite, in stream order.
    output: BytesMut,
    scan: Scan,
    header: [u8; 14],
    header_len: usize,
    pending: Option<Pending>,
    /// Compressed messages inflated so far.
    inflated: u64,
}

impl<S> InflateLayer<S> {
    /// Wraps `inner`. `enabled` is whether permessage-deflate was negotiated; `initial` holds
    /// bytes already read from the peer (after an HTTP handshake done by hand).
    pub fn new(inner: S, side: Side, enabled: bool, max_message: usize, initial: Bytes) -> Self {
        InflateLayer {
            inner,
            enabled,
            limits: None,
            fragments: 0,
            side,
            max_message,
            input: BytesMut::from(&initial[..]),
            output: BytesMut::new(),
            scan: Scan::Header,
            header: [0; 14],
            header_len: 0,
            pending: None,
            inflated: 0,
        }
    }

    /// Enforces `limits` on every inbound frame from now on.
    pub fn with_limits(mut self, limits: FrameLimits) -> Self {
        self.limits = Some(limits);
        self
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped stream, mutably (to write raw bytes under the WebSocket layer).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// How many compressed messages this layer has inflated.
    pub fn inflated_messages(&self) -> u64 {
        self.inflated
    }

    /// Scans `data` (raw bytes from the peer) into `self.output`.
    fn scan(&mut self, mut data: &[u8]) -> Result<(), InflateError> {
        while !data.is_empty() {
            match &mut self.scan {
                Scan::Header => {
                    let take = data.len().min(14 - self.header_len);
                    self.header[self.header_len..self.header_len + take]
                        .copy_from_slice(&data[..take]);
                    self.header_len += take;
                    match parse_header(&self.header[..self.header_len]) {
                        None => {
                            data = &data[take..];
                        }
                        Some(h) => {
                            // Give back what belongs to the payload.
                            let over = self.header_len - h.size;
                            data = &data[take - over..];
                            self.header_len = 0;
                            self.start_frame(h)?;
                        }
                    }
                }
                Scan::Pass { remaining } => {
                    let n = (*remaining).min(data.len() as u64) as usize;
                    self.output.extend_from_slice(&data[..n]);
                    *remaining -= n as u64;
                    data = &data[n..];
                    if *remaining == 0 {
                        self.scan = Scan::Header;
                    }
                }
                Scan::Collect {
                    remaining,
                    mask,
                    offset,
                    fin,
                } => {
                    let n = (*remaining).min(data.len() as u64) as usize;
                    let pending = self.pending.as_mut().ok_or(InflateError::BadData)?;
                    let start = pending.payload.len();
                    pending.payload.extend_from_slice(&data[..n]);
                    for (i, b) in pending.payload[start..].iter_mut().enumerate() {
                        *b ^= mask[(*offset + i) & 3];
                    }
                    *offset += n;
                    *remaining -= n as u64;
                    data = &data[n..];
                    if *remaining == 0 {
                        let fin = *fin;
                        self.scan = Scan::Header;
                        if fin {
                            self.finish_message()?;
                        }
                    }
                }
            }
        }
        // A zero-length payload ends a frame without any payload byte.
        if let Scan::Collect {
            remaining: 0, fin, ..
        } = self.scan
        {
            self.scan = Scan::Header;
            if fin {
                self.finish_message()?;
            }
        }
        Ok(())
    }

    /// Follows the frames of `data` (raw bytes from the peer, passed on unchanged) to charge
    /// each one to the limits, without copying anything: for connections without the
    /// extension.
    fn observe(&mut self, mut data: &[u8]) -> Result<(), InflateError> {
        while !data.is_empty() {
            match &mut self.scan {
                Scan::Header => {
                    let take = data.len().min(14 - self.header_len);
                    self.header[self.header_len..self.header_len + take]
                        .copy_from_slice(&data[..take]);
                    self.header_len += take;
                    match parse_header(&self.header[..self.header_len]) {
                        None => data = &data[take..],
                        Some(h) => {
                            let over = self.header_len - h.size;
                            data = &data[take - over..];
                            self.header_len = 0;
                            self.charge(&h)?;
                            if h.len > 0 {
                                self.scan = Scan::Pass { remaining: h.len };
                            }
                        }
                    }
                }
                Scan::Pass { remaining } => {
                    let n = (*remaining).min(data.len() as u64);
                    *remaining -= n;
                    data = &data[n as usize..];
                    if *remaining == 0 {
                        self.scan = Scan::Header;
                    }
                }
                // Only compressed messages are collected, and only with the extension.
                Scan::Collect { .. } => return Err(InflateError::Protocol("unexpected state")),
            }
        }
        Ok(())
    }

    /// Charges a frame to the limits: continuations count towards their message's
    /// fragments, and every frame but a data frame that starts a message (the connection
    /// charges the message) and a close costs one unit of the rate.
    fn charge(&mut self, h: &Header) -> Result<(), InflateError> {
        let Some(limits) = &self.limits else {
            return Ok(());
        };
        match h.opcode {
            // A new message; a fragmented one counts its first frame.
            0x1 | 0x2 => {
                self.fragments = usize::from(!h.fin);
                return Ok(());
            }
            0x0 => {
                self.fragments = self.fragments.saturating_add(1);
                if self.fragments > limits.max_fragments {
                    return Err(InflateError::TooManyFragments(limits.max_fragments));
                }
                if h.fin {
                    self.fragments = 0;
                }
            }
            0x8 => return Ok(()),
            _ => {}
        }
        limits.rate.check().map_err(|_| InflateError::RateLimited)
    }

    /// Decides what to do with a frame whose header was just parsed.
    fn start_frame(&mut self, h: Header) -> Result<(), InflateError> {
        self.charge(&h)?;
        let is_control = h.opcode & 0x08 != 0;
        let collect = if !self.enabled {
            false
        } else if self.pending.is_some() {
            // Inside a compressed fragmented message: continuations belong to it.
            match h.opcode {
                0x0 if h.rsv1 => return Err(InflateError::Protocol("RSV1 set on a continuation")),
                0x0 => true,
                _ if is_control => false,
                _ => {
                    return Err(InflateError::Protocol(
                        "new data frame inside a fragmented message",
                    ));
                }
            }
        } else {
            h.rsv1 && (h.opcode == 0x1 || h.opcode == 0x2)
        };
        if !collect {
            // Ordinary frame (or one tungstenite will reject): pass it on unchanged.
            self.output.extend_from_slice(&h.raw[..h.size]);
            self.scan = if h.len == 0 {
                Scan::Header
            } else {
                Scan::Pass { remaining: h.len }
            };
            return Ok(());
        }
        let pending = self.pending.get_or_insert_with(|| Pending {
            opcode: h.opcode,
            payload: Vec::new(),
        });
        // Saturating: a 64-bit length from the peer can be anything (found by fuzzing).
        if (pending.payload.len() as u64).saturating_add(h.len) > self.max_message as u64 {
            return Err(InflateError::TooBig(self.max_message));
        }
        pending.payload.reserve(h.len as usize);
        self.scan = Scan::Collect {
            remaining: h.len,
            mask: h.mask.unwrap_or([0; 4]),
            offset: 0,
            fin: h.fin,
        };
        Ok(())
    }

    /// Inflates the collected message and emits it as one uncompressed frame.
    fn finish_message(&mut self) -> Result<(), InflateError> {
        let Some(pending) = self.pending.take() else {
            return Ok(());
        };
        let plain = inflate_message(&pending.payload, self.max_message)?;
        self.inflated += 1;
        write_frame_header(
            &mut self.output,
            pending.opcode,
            plain.len(),
            self.side == Side::Server,
        );
        self.output.extend_from_slice(&plain);
        Ok(())
    }
}

/// Runs the inbound frame scanner over `data`, fed in chunks of `chunk` bytes, as a server
/// with permessage-deflate agreed and a fragment cap of 8 (a rate that never runs out, so
/// the outcome does not depend on time); returns the bytes tungstenite would see. For the
/// fuzz targets and their regression tests.
#[doc(hidden)]
pub fn scan_for_fuzzing(
    data: &[u8],
    chunk: usize,
    max_message: usize,
) -> Result<Vec<u8>, InflateError> {
    let quota = governor::Quota::per_second(std::num::NonZeroU32::MAX);
    let mut layer = InflateLayer::new((), Side::Server, true, max_message, Bytes::new())
        .with_limits(FrameLimits {
            rate: Arc::new(governor::RateLimiter::direct(quota)),
            max_fragments: 8,
        });
    for piece in data.chunks(chunk.max(1)) {
        layer.scan(piece)?;
    }
    Ok(layer.output.to_vec())
}

/// A parsed frame header.
#[derive(Debug)]
struct Header {
    fin: bool,
    rsv1: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    len: u64,
    size: usize,
    raw: [u8; 14],
}

/// Parses a frame header from the start of `b`, or `None` if more bytes are needed.
fn parse_header(b: &[u8]) -> Option<Header> {
    if b.len() < 2 {
        return None;
    }
    let masked = b[1] & 0x80 != 0;
    let (len, ext) = match b[1] & 0x7f {
        126 => (u16::from_be_bytes([*b.get(2)?, *b.get(3)?]) as u64, 2),
        127 => {
            let bytes: [u8; 8] = b.get(2..10)?.try_into().ok()?;
            (u64::from_be_bytes(bytes), 8)
        }
        n => (n as u64, 0),
    };
    let size = 2 + ext + if masked { 4 } else { 0 };
    if b.len() < size {
        return None;
    }
    let mask = masked.then(|| [b[size - 4], b[size - 3], b[size - 2], b[size - 1]]);
    let mut raw = [0u8; 14];
    raw[..size].copy_from_slice(&b[..size]);
    Some(Header {
        fin: b[0] & 0x80 != 0,
        rsv1: b[0] & 0x40 != 0,
        opcode: b[0] & 0x0f,
        mask,
        len,
        size,
        raw,
    })
}

/// Writes a final frame header for a payload of `len` bytes; `zero_mask` adds a mask key of
/// zeros (a server's tungstenite requires masked client frames; a zero key changes nothing).
fn write_frame_header(out: &mut BytesMut, opcode: u8, len: usize, zero_mask: bool) {
    let mask_bit = if zero_mask { 0x80 } else { 0 };
    out.extend_from_slice(&[0x80 | opcode]);
    if len < 126 {
        out.extend_from_slice(&[mask_bit | len as u8]);
    } else if len <= u16::MAX as usize {
        out.extend_from_slice(&[mask_bit | 126]);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.extend_from_slice(&[mask_bit | 127]);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    if zero_mask {
        out.extend_from_slice(&[0; 4]);
    }
}

/// Inflates one message payload (a raw deflate stream without its sync tail), refusing to
/// produce more than `max` bytes. Data after the end of a finished stream is ignored.
pub fn inflate_message(payload: &[u8], max: usize) -> Result<Vec<u8>, InflateError> {
    INFLATER.with(|cell| {
        let mut inflater = cell.borrow_mut();
        // A reset inflater is a fresh one: no context carries over between messages.
        inflater.reset(false);
        inflate_with(&mut inflater, payload, max)
    })
}

fn inflate_with(
    inflater: &mut Decompress,
    payload: &[u8],
    max: usize,
) -> Result<Vec<u8>, InflateError> {
    let mut out: Vec<u8> = Vec::with_capacity((payload.len() * 4).clamp(64, max.max(64)));
    for chunk in [payload, &SYNC_TAIL[..]] {
        let mut input = chunk;
        loop {
            if out.len() == out.capacity() {
                if out.len() >= max {
                    // The stream may still end here: check without room to write.
                    let before = inflater.total_in();
                    let status = inflater
                        .decompress(input, &mut [0u8; 1], FlushDecompress::Sync)
                        .map_err(|_| InflateError::BadData)?;
                    if inflater.total_out() as usize > max {
                        return Err(InflateError::TooBig(max));
                    }
                    if status == Status::StreamEnd {
                        return Ok(out);
                    }
                    input = &input[(inflater.total_in() - before) as usize..];
                    if input.is_empty() {
                        break;
                    }
                    continue;
                }
                out.reserve((out.capacity()).min(max - out.len()).max(64));
            }
            let before = inflater.total_in();
            let out_before = out.len();
            let status = inflater
                .decompress_vec(input, &mut out, FlushDecompress::Sync)
                .map_err(|_| InflateError::BadData)?;
            if out.len() > max {
                return Err(InflateError::TooBig(max));
            }
            input = &input[(inflater.total_in() - before) as usize..];
            match status {
                Status::StreamEnd => return Ok(out),
                _ if input.is_empty() && out.len() < out.capacity() => break,
                _ if input.is_empty() && out.len() == out_before => break,
                _ => {}
            }
        }
    }
    Ok(out)
}

thread_local! {
    /// One inflater per thread, reset for every message (allocating its window per message
    /// costs more than inflating a push).
    static INFLATER: RefCell<Decompress> = RefCell::new(Decompress::new(false));
    /// One compressor per thread, reset for every message: allocating deflate state per
    /// message would cost more than compressing a few hundred bytes.
    static DEFLATER: RefCell<Option<(u32, Compress)>> = const { RefCell::new(None) };
}

/// Compresses one message as a fresh raw deflate stream, sync-flushed, with the four-byte
/// tail removed (RFC 7692 section 7.2.1): the payload of an RSV1 frame.
pub fn deflate_message(data: &[u8], level: u32) -> Bytes {
    let mut out = compress_with(data, level, FlushCompress::Sync);
    if out.ends_with(&SYNC_TAIL) {
        out.truncate(out.len() - 4);
    }
    Bytes::from(out)
}

/// Compresses `data` as one fresh raw deflate stream ended by `flush` (Sync for RFC 7692,
/// Finish for a finished stream as the HunterPie client sends).
pub fn compress_with(data: &[u8], level: u32, flush: FlushCompress) -> Vec<u8> {
    DEFLATER.with(|cell| {
        let mut slot = cell.borrow_mut();
        let compress = match &mut *slot {
            Some((l, c)) if *l == level => {
                c.reset();
                c
            }
            other => {
                *other = Some((level, Compress::new(Compression::new(level), false)));
                &mut other.as_mut().expect("just set").1
            }
        };
        let mut out = Vec::with_capacity(data.len() / 2 + 64);
        let mut input = data;
        loop {
            let before = compress.total_in();
            // Status and errors: compressing from memory into a growing Vec cannot fail.
            let status = compress.compress_vec(input, &mut out, flush);
            input = &input[(compress.total_in() - before) as usize..];
            let done = match flush {
                FlushCompress::Finish => matches!(status, Ok(Status::StreamEnd)),
                _ => input.is_empty() && out.len() < out.capacity(),
            };
            if done || status.is_err() {
                break;
            }
            out.reserve(out.capacity().max(64));
        }
        out
    })
}

impl<S: AsyncRead + Unpin> AsyncRead for InflateLayer<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.enabled {
            // Nothing to rewrite: bytes go straight into tungstenite's buffer, and with
            // limits the headers are only looked at there (no copy, no buffer of ours).
            let before = buf.filled().len();
            if !this.input.is_empty() {
                let n = this.input.len().min(buf.remaining());
                buf.put_slice(&this.input[..n]);
                this.input.advance(n);
            } else {
                ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            }
            if this.limits.is_some() {
                this.observe(&buf.filled()[before..])?;
            }
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output[..n]);
                this.output.advance(n);
                if this.output.is_empty() {
                    // Idle connections keep no buffer.
                    this.output = BytesMut::new();
                }
                return Poll::Ready(Ok(()));
            }
            if !this.input.is_empty() {
                let input = std::mem::take(&mut this.input);
                this.scan(&input)?;
                continue;
            }
            // Large ordinary payloads go straight into tungstenite's buffer.
            if let Scan::Pass { remaining } = &mut this.scan {
                let limit = (*remaining).min(buf.remaining() as u64) as usize;
                let mut direct = ReadBuf::new(buf.initialize_unfilled_to(limit));
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut direct))?;
                let n = direct.filled().len();
                if n == 0 {
                    return Poll::Ready(Ok(()));
                }
                buf.advance(n);
                *remaining -= n as u64;
                if *remaining == 0 {
                    this.scan = Scan::Header;
                }
                return Poll::Ready(Ok(()));
            }
            // A stack buffer, left uninitialized (no memset per poll), so that an idle
            // connection parked here holds no heap buffer.
            let mut chunk = [const { MaybeUninit::<u8>::uninit() }; 4096];
            let mut read = ReadBuf::uninit(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
            this.scan(read.filled())?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for InflateLayer<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Compresses the way the deployed HunterPie client does: a finished stream plus 0x00.
    fn client_deflate(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), Compression::default());
        enc.write_all(data).unwrap();
        let mut out = enc.finish().unwrap();
        out.push(0);
        out
    }

    #[test]
    fn round_trip_with_sync_tail_removed() {
        let text = br#"{"type":"Push","data":[["em_001",[[0,32.42]],[]]]}"#.repeat(20);
        let packed = deflate_message(&text, 6);
        assert!(packed.len() < text.len());
        assert!(!packed.ends_with(&SYNC_TAIL));
        assert_eq!(inflate_message(&packed, 1 << 20).unwrap(), text);
    }

    #[test]
    fn accepts_finished_stream_with_trailing_byte() {
        let text = b"hello hello hello hello";
        assert_eq!(inflate_message(&client_deflate(text), 1024).unwrap(), text);
    }

    #[test]
    fn refuses_a_bomb() {
        let zeros = vec![0u8; 10 << 20];
        let packed = deflate_message(&zeros, 9);
        assert!(packed.len() < 20_000);
        assert_eq!(
            inflate_message(&packed, 64 * 1024),
            Err(InflateError::TooBig(64 * 1024))
        );
    }

    #[test]
    fn exact_limit_is_accepted() {
        let data = vec![b'a'; 4096];
        assert_eq!(
            inflate_message(&deflate_message(&data, 6), 4096).unwrap(),
            data
        );
        assert_eq!(inflate_message(&client_deflate(&data), 4096).unwrap(), data);
    }

    #[test]
    fn refuses_garbage() {
        assert_eq!(
            inflate_message(&[0xff, 0xff, 0xff, 0x12], 1024),
            Err(InflateError::BadData)
        );
    }

    #[test]
    fn empty_message() {
        assert_eq!(
            inflate_message(&deflate_message(b"", 6), 1024).unwrap(),
            b""
        );
        assert_eq!(inflate_message(&[0x00], 1024).unwrap(), b"");
    }

    fn masked_frame(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = vec![first];
        assert!(payload.len() < 126);
        out.push(0x80 | payload.len() as u8);
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        out
    }

    #[test]
    fn scan_rewrites_fragmented_compressed_message_around_a_ping() {
        let packed = client_deflate(b"fragmented hello");
        let (a, b) = packed.split_at(5);
        let mut wire = masked_frame(0x41, a, [1, 2, 3, 4]); // text, RSV1, not final
        wire.extend(masked_frame(0x89, b"p", [9, 9, 9, 9])); // ping in between
        wire.extend(masked_frame(0x80, b, [5, 6, 7, 8])); // final continuation
        let mut layer = InflateLayer::new((), Side::Server, true, 1024, Bytes::new());
        // Feed one byte at a time: headers and payloads split everywhere.
        for byte in &wire {
            layer.scan(std::slice::from_ref(byte)).unwrap();
        }
        let out = layer.output.to_vec();
        let ping = masked_frame(0x89, b"p", [9, 9, 9, 9]);
        assert_eq!(&out[..ping.len()], &ping[..]);
        let rest = &out[ping.len()..];
        assert_eq!(rest[0], 0x81);
        assert_eq!(rest[1], 0x80 | 16);
        assert_eq!(&rest[2..6], &[0, 0, 0, 0]);
        assert_eq!(&rest[6..], b"fragmented hello");
    }

    fn limited(max_fragments: usize, per_second: u32) -> InflateLayer<()> {
        let quota = governor::Quota::per_second(std::num::NonZeroU32::new(per_second).unwrap());
        InflateLayer::new((), Side::Server, false, 1024, Bytes::new()).with_limits(FrameLimits {
            rate: Arc::new(governor::RateLimiter::direct(quota)),
            max_fragments,
        })
    }

    #[test]
    fn fragments_are_capped_per_message_without_the_extension() {
        let message = |n: usize| {
            let mut wire = masked_frame(0x01, b"a", [1; 4]);
            for i in 1..n {
                let fin = if i + 1 == n { 0x80 } else { 0 };
                wire.extend(masked_frame(fin, b"b", [1; 4]));
            }
            wire
        };
        let mut layer = limited(3, 1000);
        // Cut anywhere, as reads come.
        for piece in [message(3), message(3)].concat().chunks(5) {
            layer.observe(piece).unwrap();
        }
        assert!(layer.output.is_empty(), "nothing copied");
        assert_eq!(
            limited(3, 1000).observe(&message(4)),
            Err(InflateError::TooManyFragments(3))
        );
    }

    #[test]
    fn pings_pongs_and_continuations_are_charged_but_not_closes_or_messages() {
        // A burst of 5: five pongs pass, the sixth is refused.
        let mut layer = limited(100, 5);
        for _ in 0..20 {
            layer.observe(&masked_frame(0x81, b"m", [0; 4])).unwrap();
        }
        for _ in 0..5 {
            layer.observe(&masked_frame(0x8a, b"", [0; 4])).unwrap();
        }
        layer.observe(&masked_frame(0x88, b"", [0; 4])).unwrap();
        assert_eq!(
            layer.observe(&masked_frame(0x89, b"", [0; 4])),
            Err(InflateError::RateLimited)
        );
    }

    #[test]
    fn scan_refuses_data_frame_inside_compressed_message() {
        let mut wire = masked_frame(0x41, &client_deflate(b"x")[..1], [0; 4]);
        wire.extend(masked_frame(0x81, b"y", [0; 4]));
        let mut layer = InflateLayer::new((), Side::Server, true, 1024, Bytes::new());
        assert!(matches!(layer.scan(&wire), Err(InflateError::Protocol(_))));
    }
}
