//! The reliable protocol front-end: `GET /v1/reliable` (protocol/reliable.md).
//!
//! A WebSocket protocol where nothing is lost: numbered messages both ways, cumulative acks
//! (naming what is missing), heartbeats, resends, resume of a lost client's state within a
//! window, rooms and request/response. [`wire`] parses and renders frames; [`state`] holds
//! what outlives a socket (clients and rooms). This module owns one connection's loop: the
//! reader `select!`s over the socket, a timer (heartbeats, the dead-peer check, resends),
//! the connection's queue draining (to write what waits for its window) and shutdown;
//! everything it sends goes through the connection's bounded queue ([`crate::ws`]). Talks to
//! the rest of the server only through [`crate::ws`], [`crate::core`], [`crate::config`] and
//! [`crate::metrics`].
//!
//! A message that arrives ahead of a gap (one before it was lost on the way) is kept, up to
//! [`MAX_AHEAD`] numbers past the last received and `--outbound-queue-bytes` of frames, and
//! answered with an ack naming what is missing, so the client resends only that; the kept
//! messages are carried out, in order, once the gap is filled. Past those bounds a message
//! ahead is dropped and answered `seq_gap`, as a client that ignores `missing` expects.

pub mod state;
pub mod wire;

use std::collections::BTreeMap;
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
use state::{Client, Received};
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

/// How far past the last message received in order a message ahead of a gap may be kept.
pub const MAX_AHEAD: u64 = 1024;

/// The route's handler.
pub async fn connect(State(app): State<App>, mut req: Request) -> Response {
    upgrade_with(&app, &mut req, serve)
}

/// One connection's protocol state (the socket is [`Connection`]'s).
struct Session {
    app: App,
    registry: Registry,
    /// The client address, `None` when exempt from per-address limits.
    addr: Option<IpAddr>,
    client: Option<Arc<Client>>,
    /// Messages received ahead of a gap, by seq (their frames' text), to carry out once the
    /// gap is filled; at most `ahead_limit` bytes.
    ahead: BTreeMap<u64, Bytes>,
    ahead_bytes: usize,
    ahead_limit: usize,
    /// When the client was last told what is missing (to tell it again on the timer while
    /// the gap lasts, in case that ack was lost too).
    missing_told: Instant,
}

/// One connection's life: hello, then frames until the socket closes.
async fn serve(upgraded: Upgraded, deflate: Option<Deflate>, app: App, peer: Peer) {
    let registry = app.reliable.clone();
    let cfg = registry.config().clone();
    let mut ctx = app.conn_context();
    // Numbered messages are queued only while the queue holds less than
    // --outbound-queue-bytes (state::Registry::pump); the other half is for acks,
    // heartbeats and errors, which only a peer that stops reading fills.
    ctx.settings = Arc::new(WsSettings {
        outbound_queue_bytes: 2 * cfg.outbound_queue_bytes,
        ..(*ctx.settings).clone()
    });
    let addr = (!app.guard.is_exempt(peer.addr)).then_some(peer.addr);
    let mut conn = Connection::start(upgraded, deflate, ctx, peer).await;
    let outbound = conn.outbound.clone();
    let heartbeat = cfg.heartbeat;
    let dead_after = heartbeat * 2;
    let check = (heartbeat.min(cfg.resend) / 4).max(Duration::from_millis(5));
    let mut timer = tokio::time::interval_at(Instant::now() + check, check);
    timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_hb = Instant::now();
    let mut s = Session {
        app,
        registry: registry.clone(),
        addr,
        client: None,
        ahead: BTreeMap::new(),
        ahead_bytes: 0,
        ahead_limit: cfg.outbound_queue_bytes,
        missing_told: Instant::now(),
    };
    loop {
        let backlog = s
            .client
            .as_ref()
            .is_some_and(|c| registry.has_backlog(c, conn.id));
        tokio::select! {
            event = conn.next() => match event {
                Event::Text(text) => s.on_text(&conn, text),
                Event::Binary(_) => {
                    s.app.metrics.error("reliable_binary_frame");
                    send_error(&conn, &WireError::new(Code::BinaryFrame, "frames are JSON text"), None);
                }
                Event::Shutdown => conn.close(codes::SHUTDOWN),
                Event::Closed(_) => break,
            },
            _ = timer.tick() => {
                if conn.last_activity().elapsed() >= dead_after {
                    debug!(conn = conn.id.0, "heartbeat timeout");
                    conn.close(HEARTBEAT_TIMEOUT);
                    continue;
                }
                let Some(c) = s.client.clone() else { continue };
                if last_hb.elapsed() >= heartbeat {
                    last_hb = Instant::now();
                    s.missing_told = last_hb;
                    conn.send(Payload::text(wire::hb(registry.received(&c), &s.missing(&c))));
                } else if !s.ahead.is_empty() && s.missing_told.elapsed() >= cfg.resend / 8 {
                    s.missing_told = Instant::now();
                    conn.send(Payload::text(wire::ack(registry.received(&c), &s.missing(&c))));
                }
                registry.resend_due(&c, conn.id);
            }
            // The queue drained: what waits for the window follows.
            _ = outbound.flushed(), if backlog => {
                if let Some(c) = &s.client {
                    registry.pump(c, conn.id);
                }
            }
        }
    }
    if let Some(c) = &s.client {
        registry.detach(c, conn.id);
    }
    conn.finish().await;
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
            ClientFrame::Ack { ack, .. } => {
                if let Err(e) = self.registry.ack(&c, conn.id, &ack) {
                    send_error(conn, &e, None);
                }
            }
            ClientFrame::Msg(seq, op) => match self.registry.receive(&c, conn.id, seq) {
                Received::Elsewhere => {}
                Received::Duplicate => {
                    let received = self.registry.received(&c);
                    conn.send(Payload::text(wire::ack(received, &self.missing(&c))));
                }
                Received::Ahead { expected } => {
                    self.keep_ahead(conn, &c, seq, expected, &text);
                }
                Received::InOrder => {
                    self.carry_out(conn, &c, seq, op);
                    self.run_ahead(conn, &c);
                }
            },
        }
    }

    /// The ranges missing before the messages kept ahead (at most
    /// [`wire::MAX_MISSING_RANGES`], the first ones).
    fn missing(&self, c: &Client) -> Vec<(u64, u64)> {
        let mut next = self.registry.received(c) + 1;
        let mut out = Vec::new();
        for &seq in self.ahead.keys() {
            if seq > next {
                if out.len() == wire::MAX_MISSING_RANGES {
                    break;
                }
                out.push((next, seq - 1));
            }
            next = seq + 1;
        }
        out
    }

    /// A message ahead of the next expected one: kept within the bounds, and answered with
    /// an ack naming what is missing; else dropped and answered `seq_gap`.
    fn keep_ahead(&mut self, conn: &Connection, c: &Client, seq: u64, expected: u64, text: &Bytes) {
        if !self.ahead.contains_key(&seq) {
            if seq - expected >= MAX_AHEAD || self.ahead_bytes + text.len() > self.ahead_limit {
                send_error(conn, &gap(expected, seq), Some(seq));
                return;
            }
            self.ahead_bytes += text.len();
            self.ahead.insert(seq, text.clone());
        }
        self.missing_told = Instant::now();
        conn.send(Payload::text(wire::ack(expected - 1, &self.missing(c))));
    }

    /// Carries out, in order, the messages kept ahead that follow the last one received.
    fn run_ahead(&mut self, conn: &Connection, c: &Arc<Client>) {
        while let Some(entry) = self.ahead.first_entry() {
            let seq = *entry.key();
            let received = self.registry.received(c);
            if seq > received + 1 {
                break;
            }
            let text = entry.remove();
            self.ahead_bytes -= text.len();
            if seq <= received || self.registry.receive(c, conn.id, seq) != Received::InOrder {
                continue;
            }
            let str = std::str::from_utf8(&text).unwrap_or_default();
            // Parsed once already when it was read.
            if let Ok(ClientFrame::Msg(seq, op)) = wire::parse(str) {
                self.carry_out(conn, c, seq, op);
            }
        }
        if !self.ahead.is_empty() {
            // Still a gap further on: say so with the last ack.
            self.missing_told = Instant::now();
            let received = self.registry.received(c);
            conn.send(Payload::text(wire::ack(received, &self.missing(c))));
        }
    }

    /// An in-order message (already counted as received): carried out, then acknowledged
    /// (a refusal comes first, as an `error` with its `seq`).
    fn carry_out(
        &mut self,
        conn: &Connection,
        c: &Arc<Client>,
        seq: u64,
        op: Result<Op<'_>, WireError>,
    ) {
        if let Err(e) = op.and_then(|op| on_op(&self.registry, c, op)) {
            send_error(conn, &e, Some(seq));
        }
        conn.send(Payload::text(wire::ack(seq, &[])));
    }
}

fn gap(expected: u64, seq: u64) -> WireError {
    WireError::new(
        Code::SeqGap,
        format!("expected seq {expected}, got {seq}: resend from {expected}"),
    )
}

/// Carries out one operation of an in-order message.
fn on_op(registry: &Registry, c: &Arc<Client>, op: Op<'_>) -> Result<(), WireError> {
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
            let answer = serde_json::from_str::<Presence>(data.get())
                .map_err(|_| {
                    WireError::new(
                        Code::BadRequest,
                        r#"the server answers {"presence":"<room>"} only"#,
                    )
                })
                .and_then(|p| {
                    let ids = registry.presence(c, &p.presence)?;
                    let members: Vec<&str> = ids.iter().map(|m| &**m).collect();
                    Ok(serde_json::json!({ "room": p.presence, "members": members }).to_string())
                });
            match answer {
                Ok(answer) => {
                    registry.answer(c, id, Some(&answer), None);
                    Ok(())
                }
                Err(e) => {
                    // The requester's pending request ends here too, as an error response.
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
