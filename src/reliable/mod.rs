//! The reliable protocol front-end: `GET /v1/reliable` (protocol/reliable.md).
//!
//! A WebSocket protocol where nothing is lost: numbered messages both ways, cumulative acks,
//! heartbeats, resends after a timeout, resume of a lost client's state within a window, rooms
//! and request/response. [`wire`] parses and renders frames; [`state`] holds what outlives a
//! socket (clients and rooms). This module owns one connection's loop: the reader `select!`s
//! over the socket, a timer (heartbeats, the dead-peer check, resends) and shutdown;
//! everything it sends goes through the connection's bounded queue ([`crate::ws`]).
//! Talks to the rest of the server only through [`crate::ws`], [`crate::core`],
//! [`crate::config`] and [`crate::metrics`].

pub mod state;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::response::Response;
use hyper::upgrade::Upgraded;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::debug;

pub use state::Registry;
use state::{Client, Received};
use wire::{ClientFrame, Code, Op, Target, WireError};

use crate::core::outbound::{Close, Payload};
use crate::server::{App, Peer, upgrade_with};
use crate::ws::connection::codes;
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

/// One connection's life: hello, then frames until the socket closes.
async fn serve(upgraded: Upgraded, deflate: Option<Deflate>, app: App, peer: Peer) {
    let mut conn = Connection::start(upgraded, deflate, app.conn_context(), peer).await;
    let registry = app.reliable.clone();
    let cfg = registry.config().clone();
    let heartbeat = cfg.heartbeat;
    let dead_after = heartbeat * 2;
    let check = (heartbeat.min(cfg.resend) / 4).max(Duration::from_millis(5));
    let mut timer = tokio::time::interval_at(Instant::now() + check, check);
    timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let mut last_hb = Instant::now();
    let mut client: Option<Arc<Client>> = None;
    loop {
        tokio::select! {
            event = conn.next() => match event {
                Event::Text(text) => {
                    last_heard = Instant::now();
                    // The ws layer hands over valid UTF-8 only.
                    let text = std::str::from_utf8(&text).unwrap_or_default();
                    on_text(&app, &registry, &conn, &mut client, text);
                }
                Event::Binary(_) => {
                    last_heard = Instant::now();
                    app.metrics.error("reliable_binary_frame");
                    send_error(&conn, &WireError::new(Code::BinaryFrame, "frames are JSON text"), None);
                }
                Event::Shutdown => conn.close(codes::SHUTDOWN),
                Event::Closed(_) => break,
            },
            _ = timer.tick() => {
                if last_heard.elapsed() >= dead_after {
                    debug!(conn = conn.id.0, "heartbeat timeout");
                    conn.close(HEARTBEAT_TIMEOUT);
                    continue;
                }
                let Some(c) = &client else { continue };
                if last_hb.elapsed() >= heartbeat {
                    last_hb = Instant::now();
                    conn.send(Payload::text(wire::hb(registry.received(c))));
                }
                registry.resend_due(c);
            }
        }
    }
    if let Some(c) = &client {
        registry.detach(c, conn.id);
    }
    conn.finish().await;
}

fn send_error(conn: &Connection, e: &WireError, seq: Option<u64>) {
    debug!(conn = conn.id.0, code = e.code.as_str(), message = %e.message, "reliable: refused");
    conn.send(Payload::text(wire::error(e, seq)));
}

/// Handles one text frame.
fn on_text(
    app: &App,
    registry: &Registry,
    conn: &Connection,
    client: &mut Option<Arc<Client>>,
    text: &str,
) {
    let frame = match wire::parse(text) {
        Ok(f) => f,
        Err(e) => {
            app.metrics.error("reliable_bad_frame");
            send_error(conn, &e, None);
            return;
        }
    };
    let Some(c) = client.as_ref() else {
        match frame {
            ClientFrame::Hello(resume) => {
                *client = Some(registry.hello(resume, conn.id, &conn.outbound));
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
            if let Err(e) = registry.ack(c, seq) {
                send_error(conn, &e, None);
            }
        }
        ClientFrame::Msg(seq, op) => match registry.receive(c, seq) {
            Received::Duplicate => conn.send(Payload::text(wire::ack(registry.received(c)))),
            Received::Gap { expected } => send_error(
                conn,
                &WireError::new(
                    Code::SeqGap,
                    format!("expected seq {expected}, got {seq}: resend from {expected}"),
                ),
                Some(seq),
            ),
            Received::InOrder => {
                let result = op.and_then(|op| on_op(registry, c, op));
                conn.send(Payload::text(wire::ack(seq)));
                if let Err(e) = result {
                    send_error(conn, &e, Some(seq));
                }
            }
        },
    }
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
            match serde_json::from_str::<Presence>(data.get()) {
                Ok(p) => {
                    let ids = registry.presence(&p.presence);
                    let members: Vec<&str> = ids.iter().map(|m| &**m).collect();
                    let answer = serde_json::json!({ "room": p.presence, "members": members });
                    registry.answer(c, id, Some(&answer.to_string()), None);
                    Ok(())
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
