//! The reliable protocol front-end: `GET /v1/reliable` (protocol/reliable.md).
//!
//! A WebSocket protocol where nothing is lost: numbered messages both ways, cumulative acks,
//! heartbeats, resends after a timeout, resume of a lost client's state within a window, rooms
//! and request/response. [`wire`] parses and renders frames; [`state`] holds what outlives a
//! socket (clients and rooms). This module owns one connection's loop: the reader `select!`s
//! over the socket, a timer (heartbeats, the dead-peer check, resends), the end of a
//! back-pressure wait and shutdown; everything it sends goes through the connection's bounded
//! queue ([`crate::ws`]). Talks to the rest of the server only through [`crate::ws`],
//! [`crate::core`], [`crate::config`] and [`crate::metrics`].
//!
//! Two decisions shape the loop:
//!
//! - **The outbound queue holds a whole buffer.** A reliable connection's queue is sized
//!   `--reliable-buffer-bytes` plus `--outbound-queue-bytes`: every numbered message in it is
//!   also in the client's buffer (the payload is one `Arc`, shared), so a resume can queue
//!   the whole buffer at once and no memory is doubled. Only a peer that stops reading fills
//!   the headroom (a slow consumer).
//! - **Back-pressure.** When a message leaves a connected receiver's buffer past half its
//!   bounds, the sender's messages wait (up to `--reliable-backpressure-ms`) until it
//!   acknowledges below that. The reader keeps reading meanwhile: acks and heartbeats are
//!   handled at once (so two senders waiting for each other both make progress), and the
//!   sender's next in-order messages are read ahead, up to `--outbound-queue-bytes`, and
//!   carried out after the wait, in order. A receiver that has not caught up by the end of
//!   the wait is stalled: nobody waits for it, and its full buffer drops it as before.

pub mod state;
pub mod wire;

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use hyper::upgrade::Upgraded;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::debug;

pub use state::Registry;
use state::{Client, Congested, Received};
use wire::{ClientFrame, Code, Op, Target, WireError};

use crate::core::outbound::{Close, Payload};
use crate::server::{App, Peer, upgrade_with};
use crate::ws::connection::{WsSettings, codes};
use crate::ws::extension::Deflate;
use crate::ws::{Connection, Event};

/// The close sent to a peer silent for twice the heartbeat interval (or that never said
/// hello in that time).
pub const HEARTBEAT_TIMEOUT: Close = Close {
    code: 4000,
    reason: "heartbeat timeout",
};

/// The route's handler.
pub async fn connect(State(app): State<App>, mut req: Request) -> Response {
    upgrade_with(&app, &mut req, serve)
}

/// A sender waiting for congested receivers.
struct Wait {
    receivers: Congested,
    deadline: Instant,
}

/// One connection's protocol state (the socket is [`Connection`]'s).
struct Session {
    app: App,
    registry: Registry,
    /// The client address, `None` when exempt from per-address limits.
    addr: Option<IpAddr>,
    client: Option<Arc<Client>>,
    wait: Option<Wait>,
    /// In-order messages read during a wait (consecutive seqs after the last received), to
    /// carry out after it; at most `ahead_limit` bytes, then the socket is not read.
    ahead: VecDeque<Bytes>,
    ahead_bytes: usize,
    ahead_limit: usize,
}

/// One connection's life: hello, then frames until the socket closes.
async fn serve(upgraded: Upgraded, deflate: Option<Deflate>, app: App, peer: Peer) {
    let registry = app.reliable.clone();
    let cfg = registry.config().clone();
    let mut ctx = app.conn_context();
    ctx.settings = Arc::new(WsSettings {
        outbound_queue_bytes: cfg.buffer_bytes + cfg.outbound_queue_bytes,
        ..(*ctx.settings).clone()
    });
    let addr = (!app.guard.is_exempt(peer.addr)).then_some(peer.addr);
    let mut conn = Connection::start(upgraded, deflate, ctx, peer).await;
    let heartbeat = cfg.heartbeat;
    let dead_after = heartbeat * 2;
    let check = (heartbeat.min(cfg.resend) / 4).max(Duration::from_millis(5));
    let mut timer = tokio::time::interval_at(Instant::now() + check, check);
    timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_hb = Instant::now();
    // While the read-ahead is full the socket is not read, so the peer cannot be heard:
    // silence counts from when reading resumed.
    let mut reading_since = Instant::now();
    let mut s = Session {
        app,
        registry: registry.clone(),
        addr,
        client: None,
        wait: None,
        ahead: VecDeque::new(),
        ahead_bytes: 0,
        ahead_limit: cfg.outbound_queue_bytes,
    };
    loop {
        s.run_ahead(&conn);
        let reading = s.wait.is_none() || s.ahead_bytes < s.ahead_limit;
        tokio::select! {
            event = conn.next(), if reading => match event {
                Event::Text(text) => s.on_text(&conn, text),
                Event::Binary(_) => {
                    s.app.metrics.error("reliable_binary_frame");
                    send_error(&conn, &WireError::new(Code::BinaryFrame, "frames are JSON text"), None);
                }
                Event::Shutdown => conn.close(codes::SHUTDOWN),
                Event::Closed(_) => break,
            },
            _ = timer.tick() => {
                if !reading {
                    reading_since = Instant::now();
                }
                if conn.last_activity().max(reading_since).elapsed() >= dead_after {
                    debug!(conn = conn.id.0, "heartbeat timeout");
                    conn.close(HEARTBEAT_TIMEOUT);
                    continue;
                }
                let Some(c) = &s.client else { continue };
                if last_hb.elapsed() >= heartbeat {
                    last_hb = Instant::now();
                    conn.send(Payload::text(wire::hb(registry.received(c))));
                }
                registry.resend_due(c, conn.id);
            }
            drained = until_drained(&registry, s.wait.as_ref()), if s.wait.is_some() => {
                s.end_wait(drained);
            }
        }
    }
    if let Some(c) = &s.client {
        registry.detach(c, conn.id);
    }
    conn.finish().await;
}

async fn until_drained(registry: &Registry, wait: Option<&Wait>) -> bool {
    match wait {
        Some(w) => registry.until_drained(&w.receivers, w.deadline).await,
        None => std::future::pending().await,
    }
}

fn send_error(conn: &Connection, e: &WireError, seq: Option<u64>) {
    debug!(conn = conn.id.0, code = e.code.as_str(), message = %e.message, "reliable: refused");
    conn.send(Payload::text(wire::error(e, seq)));
}

impl Session {
    /// Handles one text frame.
    fn on_text(&mut self, conn: &Connection, text: Bytes) {
        // The ws layer hands over valid UTF-8 only.
        let str = std::str::from_utf8(&text).unwrap_or_default();
        let frame = match wire::parse(str) {
            Ok(f) => f,
            Err(e) => {
                self.app.metrics.error("reliable_bad_frame");
                send_error(conn, &e, None);
                return;
            }
        };
        let Some(c) = self.client.clone() else {
            match frame {
                ClientFrame::Hello(resume) => {
                    match self
                        .registry
                        .hello(resume, conn.id, &conn.outbound, self.addr)
                    {
                        Ok(c) => self.client = Some(c),
                        Err(e) => {
                            send_error(conn, &e, None);
                            conn.close(state::TOO_MANY_CLIENTS);
                        }
                    }
                }
                _ => send_error(
                    conn,
                    &WireError::new(Code::HelloRequired, "say hello first"),
                    None,
                ),
            }
            return;
        };
        match frame {
            ClientFrame::Hello(_) => send_error(
                conn,
                &WireError::new(Code::AlreadyWelcomed, "this connection said hello already"),
                None,
            ),
            ClientFrame::Ack(seq) | ClientFrame::Hb(seq) => {
                if let Err(e) = self.registry.ack(&c, seq) {
                    send_error(conn, &e, None);
                }
            }
            ClientFrame::Msg(seq, op) => {
                if self.wait.is_none() && self.ahead.is_empty() {
                    self.carry_out(conn, &c, seq, op);
                } else {
                    self.read_ahead(conn, &c, seq, text.clone());
                }
            }
        }
    }

    /// A message read while waiting: kept if it is the next in order, else answered as
    /// [`Session::carry_out`] would (a duplicate is acknowledged again, a gap refused).
    fn read_ahead(&mut self, conn: &Connection, c: &Client, seq: u64, text: Bytes) {
        let received = self.registry.received(c);
        let next = received + 1 + self.ahead.len() as u64;
        if seq <= received {
            conn.send(Payload::text(wire::ack(received)));
        } else if seq < next {
            // Read ahead already (a resend): acknowledged once carried out.
        } else if seq == next {
            self.ahead_bytes += text.len();
            self.ahead.push_back(text);
        } else {
            send_error(conn, &gap(next, seq), Some(seq));
        }
    }

    /// Carries out what was read ahead, in order, until a message makes this sender wait.
    fn run_ahead(&mut self, conn: &Connection) {
        while self.wait.is_none() {
            let Some(text) = self.ahead.pop_front() else {
                return;
            };
            self.ahead_bytes -= text.len();
            let Some(c) = self.client.clone() else { return };
            let str = std::str::from_utf8(&text).unwrap_or_default();
            // Parsed once already when it was read.
            if let Ok(ClientFrame::Msg(seq, op)) = wire::parse(str) {
                self.carry_out(conn, &c, seq, op);
            }
        }
    }

    /// A message, when this sender is not waiting: checked against the numbering, carried
    /// out, then acknowledged (a refusal comes first, as an `error` with its `seq`).
    fn carry_out(
        &mut self,
        conn: &Connection,
        c: &Arc<Client>,
        seq: u64,
        op: Result<Op<'_>, WireError>,
    ) {
        match self.registry.receive(c, conn.id, seq) {
            Received::Elsewhere => {}
            Received::Duplicate => {
                conn.send(Payload::text(wire::ack(self.registry.received(c))));
            }
            Received::Gap { expected } => send_error(conn, &gap(expected, seq), Some(seq)),
            Received::InOrder => match op.and_then(|op| on_op(&self.registry, c, op)) {
                Ok(congested) => {
                    conn.send(Payload::text(wire::ack(seq)));
                    let wait = self.registry.config().backpressure;
                    if !congested.is_empty() && !wait.is_zero() {
                        self.app.metrics.reliable_backpressure_waits.inc();
                        self.wait = Some(Wait {
                            receivers: congested,
                            deadline: Instant::now() + wait,
                        });
                    }
                }
                Err(e) => {
                    send_error(conn, &e, Some(seq));
                    conn.send(Payload::text(wire::ack(seq)));
                }
            },
        }
    }

    /// The wait is over: every receiver caught up (`drained`), or the time ran out.
    fn end_wait(&mut self, drained: bool) {
        let Some(w) = self.wait.take() else { return };
        if !drained {
            let stalled = self.registry.stall(&w.receivers);
            self.app
                .metrics
                .reliable_backpressure_stalls
                .inc_by(stalled as u64);
        }
    }
}

fn gap(expected: u64, seq: u64) -> WireError {
    WireError::new(
        Code::SeqGap,
        format!("expected seq {expected}, got {seq}: resend from {expected}"),
    )
}

/// Carries out one operation of an in-order message; returns the receivers its sender must
/// wait for.
fn on_op(registry: &Registry, c: &Arc<Client>, op: Op<'_>) -> Result<Congested, WireError> {
    match op {
        Op::Join { room } => registry.join(c, &room),
        Op::Leave { room } => registry.leave(c, &room),
        Op::Publish { room, data } => registry.publish(c, &room, data),
        Op::Request {
            id,
            to: Target::Server,
            data,
            ..
        } => {
            #[derive(serde::Deserialize)]
            struct Presence {
                presence: String,
            }
            match serde_json::from_str::<Presence>(data.get()) {
                Ok(p) => {
                    let ids = registry.presence(&p.presence);
                    let members: Vec<&str> = ids.iter().map(|m| &**m).collect();
                    let answer = serde_json::json!({ "room": p.presence, "members": members });
                    registry.answer(c, id, Some(&answer.to_string()), None);
                    Ok(Vec::new())
                }
                Err(_) => {
                    let e = WireError::new(
                        Code::BadRequest,
                        r#"the server answers {"presence":"<room>"} only"#,
                    );
                    let error = wire::response_error(e.code, &e.message);
                    registry.answer(c, id, None, Some(&error));
                    Err(e)
                }
            }
        }
        Op::Request {
            id,
            to: Target::Client(to),
            data,
            timeout_ms,
        } => {
            let max = registry.config().request_timeout;
            let timeout = timeout_ms.map_or(max, |ms| Duration::from_millis(ms).min(max));
            let result = registry.request(c, id, &to, data, timeout);
            if let Err(e) = &result
                && e.code == Code::UnknownClient
            {
                // The requester's pending request ends here too, as an error response.
                let error = wire::response_error(e.code, &e.message);
                registry.answer(c, id, None, Some(&error));
            }
            result
        }
        Op::Response {
            id,
            to,
            data,
            error,
        } => registry.respond(c, id, &to, data.map(|d| d.get()), error.map(|e| e.get())),
    }
}
