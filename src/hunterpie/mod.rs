//! The HunterPie front-end: the sync protocol of the deployed HunterPie SyncPlugin, spoken
//! on `GET /connect` (protocol/hunterpie.md).
//!
//! Owns the protocol's rules (who may push where, when sessionstate is sent, what each bad
//! input is answered with) over the core's hub; owns no socket and no session state of its
//! own beyond each connection's name and current session.

pub mod admin;
pub mod dashboard;
pub mod message;

use std::sync::Arc;

use hyper::upgrade::Upgraded;
use tracing::debug;

use crate::core::hub::{Audience, Member, Role, Session};
use crate::server::{App, Peer};
use crate::ws::connection::codes;
use crate::ws::extension::Deflate;
use crate::ws::{Connection, Event};
use message::{Command, Level, server_msg, session_state};

/// To a leader whose `secret` is ignored because the operator has not turned session
/// secrets on (protocol/hunterpie.md).
pub const SECRETS_OFF: &str = "Session secrets are off on this server: the secret was ignored and the session is not protected.";

/// To a leader whose credential came after the session had a leader without one.
pub const NOT_PROTECTED: &str =
    "This session already had a leader without a secret: it stays unprotected.";

/// Sent to every client before the server closes for shutdown.
pub const SHUTDOWN_TEXT: &str = "Server is shutting down for maintenance; reconnect in a moment.";

/// What the server knows of one client.
struct Client {
    name: Arc<str>,
    /// When the connection opened (unix ms), for operators.
    since: i64,
    session: Option<(Arc<Session>, Role)>,
    /// Session switches this connection may still make (per-minute rate).
    switches: governor::DefaultDirectRateLimiter,
}

/// Serves one upgraded `/connect` socket until it closes.
pub async fn serve(upgraded: Upgraded, deflate: Option<Deflate>, app: App, peer: Peer) {
    let mut conn = Connection::start(upgraded, deflate, app.conn_context(), peer).await;
    app.hub.register(conn.id, conn.outbound.clone());
    let mut client = Client {
        name: Arc::from(""),
        since: now_ms(),
        session: None,
        switches: app.guard.switch_limiter(),
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
    app.hub.unregister(conn.id);
    conn.finish().await;
}

/// The time now, unix ms.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn leave(app: &App, conn: &Connection, client: &mut Client) {
    if let Some((session, _)) = client.session.take() {
        app.hub.leave(&session, conn.id);
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
        Command::SetName(name) => client.name = Arc::from(name),
        Command::SetSession {
            session_id,
            leader,
            secret,
            token,
        } => {
            if session_id.is_empty() {
                app.metrics.error("empty_session_id");
                leave(app, conn, client);
                conn.send(server_msg(Level::Warn, "Session id cannot be empty!"));
                return;
            }
            let switching = client
                .session
                .as_ref()
                .is_none_or(|(s, _)| s.id() != session_id);
            if switching && client.switches.check().is_err() {
                app.metrics.error("limit_session_switch_rate");
                let per_minute = app.config.limits.session_switches_per_minute;
                let text = format!(
                    "Rate limit: at most {per_minute} session changes per minute; try again later"
                );
                conn.send(server_msg(Level::Warn, &text));
                return;
            }
            if switching {
                leave(app, conn, client);
            }
            let secret_ignored =
                leader && secret.is_some() && token.is_none() && !app.config.leader_secrets;
            let (key, bad_token) = leader_key(app, &session_id, secret.as_deref(), token);
            let role = if leader && !bad_token {
                Role::Leader
            } else {
                Role::Follower
            };
            let member = Member {
                conn: conn.id,
                role,
                outbound: conn.outbound.clone(),
                name: client.name.clone(),
                addr: conn.peer.addr,
                since: client.since,
            };
            match app
                .hub
                .join(&session_id, member, key.as_deref(), session_state)
            {
                Ok(joined) => {
                    debug!(conn = conn.id.0, name = %client.name, session = %session_id, role = ?joined.role, "joined");
                    if leader && (bad_token || joined.leadership_refused) {
                        app.metrics.error("leadership_refused");
                        conn.send(server_msg(
                            Level::Error,
                            "This session is protected: only a leader with its secret can lead. Joined as a follower.",
                        ));
                    } else if secret_ignored {
                        conn.send(server_msg(Level::Warn, SECRETS_OFF));
                    } else if leader && key.is_some() && !joined.protected {
                        conn.send(server_msg(Level::Warn, NOT_PROTECTED));
                    }
                    client.session = Some((joined.session, joined.role));
                }
                Err(e) => {
                    app.metrics.error("limit_session_members");
                    conn.send(server_msg(Level::Warn, &format!("Cannot join: {e}")));
                }
            }
        }
        Command::Push { session_id } => {
            let refusal = match &client.session {
                None => Some("Push refused: join a session first"),
                Some((s, _)) if s.id() != session_id => {
                    Some("Push refused: sessionId is not your session")
                }
                Some((_, Role::Follower)) => Some("Push refused: only the session leader can push"),
                Some((session, Role::Leader)) => {
                    // Timed from when the reader got the frame.
                    let arrived = conn.last_activity().into_std();
                    let delivered = session.publish(
                        conn.id,
                        &crate::core::outbound::Payload::relayed(text.clone(), false, arrived),
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

/// The leader key a SetSession presents, and whether it presented a token that is not valid.
/// An HMAC token must be the hex HMAC-SHA256 of the session id under the operator's secret;
/// a session secret counts only when the operator turned them on (`--leader-secrets`), since
/// one chosen by any client could otherwise be held against a leader that cannot present
/// one (protocol/hunterpie.md).
fn leader_key(
    app: &App,
    session_id: &str,
    secret: Option<&str>,
    token: Option<String>,
) -> (Option<String>, bool) {
    match (token, secret) {
        (Some(token), _) => match &app.config.leader_token_secret {
            Some(key) if token_is_valid(key, session_id, &token) => {
                (Some(format!("token:{token}")), false)
            }
            _ => (None, true),
        },
        (None, Some(secret)) if app.config.leader_secrets => {
            (Some(format!("secret:{secret}")), false)
        }
        (None, _) => (None, false),
    }
}

/// The HMAC token for `session_id` under `key`, as lowercase hex.
pub fn leader_token(key: &str, session_id: &str) -> String {
    crate::core::hmac_hex(key, session_id)
}

fn token_is_valid(key: &str, session_id: &str, token: &str) -> bool {
    crate::core::secret_eq(&leader_token(key, session_id), &token.to_ascii_lowercase())
}
