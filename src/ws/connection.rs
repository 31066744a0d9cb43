//! The life of one WebSocket connection, for any front-end.
//!
//! Owns the socket: a reader half polled by the front-end's task through
//! [`Connection::next`], and a writer task (spawned here, tracked for shutdown) that alone
//! owns the sink and drains the connection's [`Outbound`] queue in batches. The reader also
//! watches the idle timeout, the server's shutdown signal and the queue's closing (a slow
//! consumer or a broken socket), and turns every peer error into a close code.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::task::JoinHandle;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame, Frame};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::deflate::{FrameLimits, InflateError, InflateLayer, Side};
use super::extension::Deflate;
use crate::core::hub::ConnId;
use crate::core::outbound::{Close, Outbound, Payload, SLOW_CONSUMER};
use crate::metrics::Metrics;

/// The raw byte stream under the WebSocket protocol.
pub type Io = InflateLayer<TokioIo<Upgraded>>;
type Ws = WebSocketStream<Io>;

/// Close codes the server sends (documented in protocol/hunterpie.md).
pub mod codes {
    use crate::core::outbound::Close;
    pub const NORMAL: Close = Close {
        code: 1000,
        reason: "bye",
    };
    pub const SHUTDOWN: Close = Close {
        code: 1001,
        reason: "server shutting down",
    };
    pub const PROTOCOL: Close = Close {
        code: 1002,
        reason: "protocol error",
    };
    pub const BAD_DATA: Close = Close {
        code: 1007,
        reason: "invalid message data",
    };
    pub const TOO_BIG: Close = Close {
        code: 1009,
        reason: "message too big",
    };
    pub const IDLE: Close = Close {
        code: 4000,
        reason: "idle timeout",
    };
    pub const RATE_LIMITED: Close = Close {
        code: 1008,
        reason: "rate limit: too many messages per second",
    };
    /// A fragmented message with more fragments than `--max-message-fragments`.
    pub const TOO_MANY_FRAGMENTS: Close = Close {
        code: 1009,
        reason: "message too big: too many fragments",
    };
    /// Closed by an operator through the admin API.
    pub const KICKED: Close = Close {
        code: 4003,
        reason: "removed by an administrator",
    };
    /// The peer sent a close frame: tungstenite has queued the echo of its code, which the
    /// writer only has to flush.
    pub const PEER_CLOSED: Close = Close {
        code: 1000,
        reason: "",
    };
    /// What the writer records when the socket broke; nothing can be sent.
    pub const GONE: Close = Close {
        code: 1006,
        reason: "connection lost",
    };
}

/// Settings of every WebSocket connection.
#[derive(Debug, Clone)]
pub struct WsSettings {
    pub max_message_bytes: usize,
    /// Frames one fragmented message may have.
    pub max_message_fragments: usize,
    pub outbound_queue_bytes: usize,
    pub deflate_threshold: usize,
    pub deflate_level: u32,
    pub idle_timeout: Duration,
    pub idle_check_interval: Duration,
    /// How long the writer may take to send a close frame before the socket is dropped.
    pub close_timeout: Duration,
}

/// What the shared server state gives every connection.
#[derive(Debug, Clone)]
pub struct ConnContext {
    pub settings: Arc<WsSettings>,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    pub guard: Arc<crate::limits::Guard>,
}

/// What the reader saw.
#[derive(Debug)]
pub enum Event {
    /// A text message (valid UTF-8, already inflated).
    Text(bytes::Bytes),
    /// A binary message.
    Binary(bytes::Bytes),
    /// The server is shutting down: say goodbye, then [`Connection::close`]. Seen once.
    Shutdown,
    /// The connection is closing or closed; the front-end should clean up and
    /// [`Connection::finish`].
    Closed(Close),
}

/// One WebSocket connection, from the front-end's side.
pub struct Connection {
    pub id: ConnId,
    /// The client's address and its place under the connection limits.
    pub peer: crate::server::Peer,
    /// Messages per second this connection may send. Shared with the frame layer under
    /// tungstenite, which charges pings, pongs and continuation frames to it; this side
    /// charges whole messages.
    rate: Arc<governor::DefaultDirectRateLimiter>,
    /// The queue every message to this peer goes through.
    pub outbound: Outbound,
    stream: SplitStream<Ws>,
    writer: JoinHandle<()>,
    idle: Interval,
    last_activity: Instant,
    /// Server pings, for front-ends whose clients may only listen: see
    /// [`Connection::keepalive`].
    keepalive: Option<Keepalive>,
    /// What a message over the rate limit gets instead of a close: see
    /// [`Connection::answer_over_rate`].
    over_rate: Option<Arc<Payload>>,
    shutdown_seen: bool,
    ctx: ConnContext,
}

/// Server pings on a quiet connection, and the silence after which it is dead.
struct Keepalive {
    tick: Interval,
    every: Duration,
}

impl Connection {
    /// Wraps an upgraded socket, spawning its writer.
    pub async fn start(
        upgraded: Upgraded,
        deflate: Option<Deflate>,
        ctx: ConnContext,
        peer: crate::server::Peer,
    ) -> Connection {
        let s = &ctx.settings;
        let rate = Arc::new(ctx.guard.message_limiter());
        let io = InflateLayer::new(
            TokioIo::new(upgraded),
            Side::Server,
            deflate.is_some(),
            s.max_message_bytes,
            Default::default(),
        )
        .with_limits(FrameLimits {
            rate: rate.clone(),
            max_fragments: s.max_message_fragments,
        });
        let config = WebSocketConfig::default()
            // Small buffers keep idle connections cheap; they grow for large frames.
            .read_buffer_size(2048)
            // Frames of a batch are gathered and written with one syscall at the flush.
            .write_buffer_size(64 * 1024)
            .max_message_size(Some(s.max_message_bytes))
            .max_frame_size(Some(s.max_message_bytes));
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
        let (sink, stream) = ws.split();
        let outbound = Outbound::new(s.outbound_queue_bytes);
        let writer = ctx
            .tracker
            .spawn(write_loop(sink, outbound.clone(), deflate, ctx.clone()));
        let mut idle = tokio::time::interval_at(
            Instant::now() + s.idle_check_interval,
            s.idle_check_interval,
        );
        idle.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ctx.metrics.connections_open.inc();
        ctx.metrics.connections_total.inc();
        Connection {
            id: ConnId::next(),
            peer,
            rate,
            outbound,
            stream,
            writer,
            idle,
            last_activity: Instant::now(),
            keepalive: None,
            over_rate: None,
            shutdown_seen: false,
            ctx,
        }
    }

    /// Pings the peer after `every` of silence, and closes the connection as idle (4000)
    /// after twice that with no frame at all (a pong counts). For clients that may only
    /// listen, so a live one is never taken for idle and a dead one is noticed within
    /// `2 x every`, whatever the idle timeout.
    /// `every` is at most half the idle timeout, so a client that answers is never idle.
    pub fn keepalive(&mut self, every: Duration) {
        let every = every.min(self.ctx.settings.idle_timeout / 2);
        let mut tick = tokio::time::interval_at(Instant::now() + every / 2, every / 2);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        self.keepalive = Some(Keepalive { tick, every });
    }

    /// A message over the rate limit is dropped and answered with `answer` instead of
    /// closing the connection (1008), for protocols where every message gets an answer.
    pub fn answer_over_rate(&mut self, answer: Arc<Payload>) {
        self.over_rate = Some(answer);
    }

    /// Queues a message for the peer. A refusal means the connection is closing, which the
    /// next call to [`Connection::next`] reports.
    pub fn send(&self, payload: Arc<Payload>) {
        // Refused only when closing; `next` then returns `Event::Closed`.
        let _ = self.outbound.send(payload);
    }

    /// Starts closing: queued messages are written first, then the close frame.
    pub fn close(&self, close: Close) {
        self.outbound.close(close);
    }

    /// When the peer was last heard: any frame, pings and pongs included.
    pub fn last_activity(&self) -> Instant {
        self.last_activity
    }

    /// Waits for the next thing the front-end must act on.
    pub async fn next(&mut self) -> Event {
        loop {
            if let Some(close) = self.outbound.closing() {
                return Event::Closed(close);
            }
            tokio::select! {
                biased;
                _ = self.outbound.closed() => {}
                _ = self.ctx.shutdown.cancelled(), if !self.shutdown_seen => {
                    self.shutdown_seen = true;
                    return Event::Shutdown;
                }
                _ = self.idle.tick() => {
                    if self.last_activity.elapsed() >= self.ctx.settings.idle_timeout {
                        self.close_idle();
                    }
                }
                _ = keepalive_tick(&mut self.keepalive) => {
                    let silent = self.last_activity.elapsed();
                    let every = self.keepalive.as_ref().map_or(Duration::MAX, |k| k.every);
                    if silent >= every * 2 {
                        self.close_idle();
                    } else if silent >= every {
                        // Refused only when closing, which `next` reports.
                        let _ = self.outbound.send(Payload::ping());
                    }
                }
                msg = self.stream.next() => {
                    self.last_activity = Instant::now();
                    // Other frames were charged by the frame layer (`FrameLimits`).
                    if matches!(msg, Some(Ok(Message::Text(_) | Message::Binary(_)))) && self.rate.check().is_err() {
                        debug!(conn = self.id.0, addr = %self.peer.addr, "message rate limit");
                        self.ctx.metrics.error("limit_message_rate");
                        match &self.over_rate {
                            Some(answer) => {
                                // Refused only when closing, which `next` reports.
                                let _ = self.outbound.send(answer.clone());
                            }
                            None => self.outbound.close(codes::RATE_LIMITED),
                        }
                        continue;
                    }
                    match msg {
                        Some(Ok(Message::Text(text))) => {
                            self.count_in(text.len());
                            return Event::Text(text.into());
                        }
                        Some(Ok(Message::Binary(data))) => {
                            self.count_in(data.len());
                            return Event::Binary(data);
                        }
                        // Pings are answered by tungstenite on the next poll.
                        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                        Some(Ok(Message::Close(frame))) => {
                            debug!(conn = self.id.0, ?frame, "peer closed");
                            self.outbound.close(codes::PEER_CLOSED);
                        }
                        None => self.outbound.close(codes::GONE),
                        Some(Err(e)) => {
                            let (kind, close) = classify(&e);
                            debug!(conn = self.id.0, error = %e, kind, "closing on peer error");
                            self.ctx.metrics.error(kind);
                            self.outbound.close(close);
                        }
                    }
                }
            }
        }
    }

    fn close_idle(&self) {
        debug!(conn = self.id.0, "idle timeout");
        self.ctx.metrics.idle_timeouts.inc();
        self.outbound.close(codes::IDLE);
    }

    fn count_in(&self, len: usize) {
        self.ctx.metrics.messages_in.inc();
        self.ctx.metrics.bytes_in.inc_by(len as u64);
    }

    /// Waits (within the close timeout) for the writer to send what is queued and the close
    /// frame, and for the peer's answering close, then drops the socket.
    pub async fn finish(self) {
        let Connection {
            outbound,
            mut stream,
            mut writer,
            ctx,
            ..
        } = self;
        if outbound.closing().is_none() {
            outbound.close(codes::NORMAL);
        }
        let deadline = Instant::now() + ctx.settings.close_timeout;
        if tokio::time::timeout_at(deadline, &mut writer)
            .await
            .is_err()
        {
            writer.abort();
            // What it had not written never will be: waiters on `flushed` learn it now.
            outbound.writer_gone(codes::GONE);
        } else if !matches!(outbound.closing(), Some(codes::GONE | codes::PEER_CLOSED)) {
            // We sent the close: the handshake ends with the peer's answer (RFC 6455 7.1.1),
            // so the socket is not reset under data still in flight. Anything else the peer
            // sends meanwhile is dropped.
            let answer = async {
                while let Some(Ok(m)) = stream.next().await {
                    if m.is_close() {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout_at(deadline, answer).await;
        }
        let close = outbound.closing().unwrap_or(codes::GONE);
        ctx.metrics
            .closes
            .get_or_create(&crate::metrics::KindLabel {
                kind: close_kind(close.code),
            })
            .inc();
        if close == SLOW_CONSUMER {
            ctx.metrics.slow_consumer_disconnects.inc();
        }
        ctx.metrics.connections_open.dec();
        drop(stream);
    }
}

fn close_kind(code: u16) -> &'static str {
    match code {
        1000 => "normal",
        1001 => "shutdown",
        1002 => "protocol_error",
        1006 => "connection_lost",
        1007 => "invalid_data",
        1009 => "too_big",
        1008 => "rate_limited",
        4000 => "idle_timeout",
        4003 => "kicked",
        4008 => "slow_consumer",
        _ => "other",
    }
}

/// The next keep-alive tick, or never without keep-alive.
async fn keepalive_tick(keepalive: &mut Option<Keepalive>) {
    match keepalive {
        Some(k) => {
            k.tick.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Maps a read error to a metrics kind and the close to send.
fn classify(e: &WsError) -> (&'static str, Close) {
    match e {
        WsError::Capacity(_) => ("too_big", codes::TOO_BIG),
        WsError::Utf8(_) => ("invalid_utf8", codes::BAD_DATA),
        WsError::Protocol(_) => ("protocol", codes::PROTOCOL),
        WsError::Io(io) => match InflateError::from_io(io) {
            Some(InflateError::TooBig(_)) => ("too_big", codes::TOO_BIG),
            Some(InflateError::BadData) => ("bad_deflate", codes::BAD_DATA),
            Some(InflateError::Protocol(_)) => ("protocol", codes::PROTOCOL),
            Some(InflateError::RateLimited) => ("limit_message_rate", codes::RATE_LIMITED),
            Some(InflateError::TooManyFragments(_)) => {
                ("too_many_fragments", codes::TOO_MANY_FRAGMENTS)
            }
            None => ("io", codes::GONE),
        },
        WsError::ConnectionClosed | WsError::AlreadyClosed => ("closed", codes::GONE),
        _ => ("other", codes::PROTOCOL),
    }
}

/// Builds the frame for one payload: compressed (RSV1) when deflate was negotiated and the
/// message is long enough, else plain. The payload bytes are shared, never copied here.
/// The flag says whether this call compressed the payload (first receiver to need it).
fn frame_for(p: &Payload, deflate: Option<Deflate>, s: &WsSettings) -> (Frame, bool) {
    if p.is_ping() {
        return (Frame::ping(p.data().clone()), false);
    }
    let opcode = OpCode::Data(if p.is_binary() {
        Data::Binary
    } else {
        Data::Text
    });
    let len = p.data().len();
    match deflate {
        Some(d) if len >= s.deflate_threshold && len <= d.max_compressed_len() => {
            let (bytes, computed) = p.deflated(s.deflate_level);
            let mut frame = Frame::message(bytes.clone(), opcode, true);
            frame.header_mut().rsv1 = true;
            (frame, computed)
        }
        _ => (Frame::message(p.data().clone(), opcode, true), false),
    }
}

/// The writer: the only code that writes to the socket.
async fn write_loop(
    mut sink: SplitSink<Ws, Message>,
    outbound: Outbound,
    deflate: Option<Deflate>,
    ctx: ConnContext,
) {
    let s = &ctx.settings;
    let mut batch = Vec::new();
    // Arrival times of the relayed pushes of the batch being written.
    let mut arrivals = Vec::new();
    // This connection's share of the histograms, merged at most once a second (and when
    // the writer ends, aborted included): no atomics shared per delivery.
    let mut latency = ctx.metrics.relay_latency.local();
    let mut queued = ctx.metrics.outbound_queue.local();
    loop {
        let close = outbound.next_batch(&mut batch).await;
        if !batch.is_empty() {
            let (mut plain, mut wire, mut saved, mut deflated, mut compressions) =
                (0usize, 0usize, 0usize, 0u64, 0u64);
            let count = batch.len();
            for p in batch.drain(..) {
                arrivals.extend(p.arrived());
                let (frame, computed) = frame_for(&p, deflate, s);
                compressions += computed as u64;
                plain += p.data().len();
                wire += frame.payload().len();
                if frame.header().rsv1 {
                    deflated += 1;
                    saved += p.data().len().saturating_sub(frame.payload().len());
                }
                if let Err(e) = sink.feed(Message::Frame(frame)).await {
                    debug!(error = %e, "write failed");
                    outbound.writer_gone(codes::GONE);
                    return;
                }
            }
            if let Err(e) = sink.flush().await {
                debug!(error = %e, "flush failed");
                outbound.writer_gone(codes::GONE);
                return;
            }
            outbound.written(plain);
            let now = std::time::Instant::now();
            for arrived in arrivals.drain(..) {
                latency.observe(now.saturating_duration_since(arrived).as_nanos() as u64);
            }
            // What the batch took is what the queue held: the previous batch was written.
            queued.observe(plain as u64);
            latency.merge_every(now);
            queued.merge_every(now);
            let m = &ctx.metrics;
            m.messages_out.inc_by(count as u64);
            m.bytes_out.inc_by(wire as u64);
            if deflated > 0 {
                m.deflate_messages.inc_by(deflated);
                m.deflate_saved_bytes.inc_by(saved as u64);
                m.deflate_compressions.inc_by(compressions);
            }
        }
        if let Some(close) = close {
            if close == codes::PEER_CLOSED {
                // Flushes the echo tungstenite queued; the sink refuses new frames now.
                let _ = tokio::time::timeout(s.close_timeout, sink.close()).await;
            } else if close != codes::GONE {
                let frame = CloseFrame {
                    code: CloseCode::from(close.code),
                    reason: close.reason.into(),
                };
                // The peer may be gone or stuck; either way the socket is dropped next.
                let _ =
                    tokio::time::timeout(s.close_timeout, sink.send(Message::Close(Some(frame))))
                        .await;
            }
            outbound.writer_gone(close);
            return;
        }
    }
}
