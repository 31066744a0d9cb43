//! The HunterPie front-end: the sync protocol of the deployed HunterPie SyncPlugin, spoken
//! on `GET /connect` (protocol/hunterpie.md).
//!
//! Owns the protocol's rules (who may push where, when sessionstate is sent, what each bad
//! input is answered with) over the core's hub; owns no socket and no session state of its
//! own beyond each connection's name and current session.

pub mod message;

use std::sync::Arc;

use hyper::upgrade::Upgraded;
use tracing::debug;

use crate::core::hub::{Audience, Member, Role, Session};
use crate::server::App;
use crate::ws::connection::codes;
use crate::ws::extension::Deflate;
use crate::ws::{Connection, Event};
use message::{Command, Level, server_msg, session_state};

/// Sent to every client before the server closes for shutdown.
pub const SHUTDOWN_TEXT: &str = "Server is shutting down for maintenance; reconnect in a moment.";

/// What the server knows of one client.
struct Client {
    name: String,
    session: Option<(Arc<Session>, Role)>,
}

/// Serves one upgraded `/connect` socket until it closes.
pub async fn serve(upgraded: Upgraded, deflate: Option<Deflate>, app: App) {
    let mut conn = Connection::start(upgraded, deflate, app.conn_context()).await;
    let mut client = Client {
        name: String::new(),
        session: None,
    };
    loop {
        match conn.next().await {
            Event::Text(text) => on_text(&conn, &mut client, text, &app),
            Event::Binary(_) => {
                app.metrics.error("binary_frame");
                debug!(conn = conn.id.0, "binary frame refused");
                conn.send(server_msg(
                    Level::Warn,
                    "Binary messages are not supported: send JSON text",
                ));
            }
            Event::Shutdown => {
                conn.send(server_msg(Level::Warn, SHUTDOWN_TEXT));
                conn.close(codes::SHUTDOWN);
            }
            Event::Closed(close) => {
                debug!(conn = conn.id.0, name = %client.name, code = close.code, "closed");
                break;
            }
        }
    }
    leave(&app, &conn, &mut client);
    conn.finish().await;
}

fn leave(app: &App, conn: &Connection, client: &mut Client) {
    if let Some((session, _)) = client.session.take() {
        app.hub.leave(&session, conn.id, session_state);
    }
}

fn on_text(conn: &Connection, client: &mut Client, text: bytes::Bytes, app: &App) {
    if &text[..] == b"ping" {
        conn.send(crate::core::outbound::Payload::text("pong"));
        return;
    }
    // Text frames are valid UTF-8: tungstenite checked them.
    let Ok(s) = std::str::from_utf8(&text) else {
        return;
    };
    let command = match message::parse(s) {
        Ok(c) => c,
        Err(e) => {
            app.metrics.error(e.kind());
            debug!(conn = conn.id.0, error = %e, "bad message");
            conn.send(server_msg(Level::Warn, &e.to_string()));
            return;
        }
    };
    match command {
        Command::SetName(name) => client.name = name,
        Command::SetSession { session_id, leader } => {
            if session_id.is_empty() {
                app.metrics.error("empty_session_id");
                leave(app, conn, client);
                conn.send(server_msg(Level::Warn, "Session id cannot be empty!"));
                return;
            }
            if client
                .session
                .as_ref()
                .is_some_and(|(s, _)| s.id() != session_id)
            {
                leave(app, conn, client);
            }
            let role = if leader { Role::Leader } else { Role::Follower };
            let member = Member {
                conn: conn.id,
                role,
                outbound: conn.outbound.clone(),
            };
            let session = app.hub.join(&session_id, member, session_state);
            debug!(conn = conn.id.0, name = %client.name, session = %session_id, leader, "joined");
            client.session = Some((session, role));
        }
        Command::Push { session_id } => {
            let refusal = match &client.session {
                None => Some("Push refused: join a session first"),
                Some((s, _)) if s.id() != session_id => {
                    Some("Push refused: sessionId is not your session")
                }
                Some((_, Role::Follower)) => Some("Push refused: only the session leader can push"),
                Some((session, Role::Leader)) => {
                    let delivered = session.publish(
                        conn.id,
                        &crate::core::outbound::Payload::text(text.clone()),
                        Audience::Followers,
                    );
                    app.metrics.pushes_relayed.inc();
                    app.metrics
                        .bytes_relayed
                        .inc_by((text.len() * delivered) as u64);
                    None
                }
            };
            if let Some(refusal) = refusal {
                app.metrics.error("push_refused");
                debug!(conn = conn.id.0, refusal, "push refused");
                conn.send(server_msg(Level::Warn, refusal));
            }
        }
        Command::Leave => {
            leave(app, conn, client);
            conn.close(codes::NORMAL);
        }
    }
}
