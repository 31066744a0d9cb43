//! The HTTP channel API (protocol/channels.md): clients that only speak HTTP share state
//! through channels, one request per update, compatible with the original supersynk Flask
//! server and its Unity client; plus a WebSocket that pushes a channel's state to watchers.
//!
//! Owns the HTTP handlers and the watch socket; the state lives in [`store`].

pub mod store;

use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper::upgrade::Upgraded;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::core::outbound::Payload;
use crate::server::{App, Peer, upgrade_with};
use crate::ws::connection::codes;
use crate::ws::extension::Deflate;
use crate::ws::{Connection, Event};
use store::Order;

/// The channel API's routes.
pub fn routes() -> Router<App> {
    Router::new()
        .route("/api", get(version))
        .route("/api/channels", get(list))
        .route("/api/channels/{key}", get(get_channel).post(post_channel))
        .route("/api/channels/{key}/watch", get(watch))
}

/// Runs the silence sweeper until shutdown.
pub async fn sweep_until_shutdown(app: App) {
    let period =
        (app.config.channel_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = app.shutdown.cancelled() => return,
            _ = tick.tick() => {
                app.channels.sweep();
            }
        }
    }
}

fn error(status: StatusCode, text: &str, app: &App, kind: &'static str) -> Response {
    app.metrics.error(kind);
    (status, axum::Json(serde_json::json!({ "error": text }))).into_response()
}

/// A 200 answer with a JSON body and `Server-Time` (seconds since the server started).
fn ok_json(app: &App, body: Bytes) -> Response {
    let mut res = (StatusCode::OK, body).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let server_time = format!("{:.3}", app.metrics.started.elapsed().as_secs_f64());
    if let Ok(v) = HeaderValue::from_str(&server_time) {
        h.insert("server-time", v);
    }
    res
}

async fn version() -> String {
    format!("supersynk server {}", env!("CARGO_PKG_VERSION"))
}

async fn list(State(app): State<App>) -> Response {
    let ids = serde_json::to_vec(&app.channels.channel_ids()).unwrap_or_default();
    ok_json(&app, Bytes::from(ids))
}

/// Checks `Client-Id`/`Client-Time`: `Some` is the answer to give instead (400 or 204).
fn check_order(app: &App, headers: &HeaderMap) -> Option<Response> {
    let time = headers.get("client-time")?;
    let time = time
        .to_str()
        .ok()
        .and_then(|t| t.trim().parse::<f64>().ok())
        .filter(|t| t.is_finite());
    let Some(time) = time else {
        let text = "Client-Time must be a number (seconds)";
        return Some(error(
            StatusCode::BAD_REQUEST,
            text,
            app,
            "channel_bad_client_time",
        ));
    };
    let client = headers.get("client-id").and_then(|v| v.to_str().ok())?;
    match app.channels.check_order(client, time) {
        Order::InOrder => None,
        Order::Late => Some(StatusCode::NO_CONTENT.into_response()),
    }
}

async fn get_channel(
    State(app): State<App>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(answer) = check_order(&app, &headers) {
        return answer;
    }
    ok_json(&app, app.channels.get(&key))
}

#[derive(Deserialize)]
struct Posted<'a> {
    #[serde(borrow, default)]
    client_id: Option<&'a RawValue>,
}

/// The `client_id` of a posted body, or the 400 text.
fn client_id(body: &[u8]) -> Result<String, &'static str> {
    let text = std::str::from_utf8(body).map_err(|_| "body is not valid JSON (not UTF-8)")?;
    if serde_json::from_str::<serde::de::IgnoredAny>(text).is_err() {
        return Err("body is not valid JSON");
    }
    if !text.trim_start().starts_with('{') {
        return Err("body must be a JSON object");
    }
    let posted: Posted = serde_json::from_str(text).map_err(|_| "body is not valid JSON")?;
    let raw = posted.client_id.ok_or("body needs a \"client_id\"")?;
    match serde_json::from_str::<String>(raw.get()) {
        Ok(id) if !id.is_empty() => Ok(id),
        _ => Err("\"client_id\" must be a non-empty string"),
    }
}

async fn post_channel(
    State(app): State<App>,
    Path(key): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let limit = app.config.max_channel_body_bytes;
    if body.len() > limit {
        let text = format!("body too large: at most {limit} bytes");
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &text,
            &app,
            "channel_body_too_large",
        );
    }
    let id = match client_id(&body) {
        Ok(id) => id,
        Err(text) => return error(StatusCode::BAD_REQUEST, text, &app, "channel_bad_body"),
    };
    if let Some(answer) = check_order(&app, &headers) {
        return answer;
    }
    ok_json(&app, app.channels.post(&key, &id, body))
}

async fn watch(State(app): State<App>, Path(key): Path<String>, mut req: Request) -> Response {
    upgrade_with(&app, &mut req, move |upgraded, deflate, app, peer| {
        serve_watch(upgraded, deflate, app, peer, key)
    })
}

/// Sends the channel's state on connect and after every change, at most once per
/// `--channel-watch-interval-ms`.
async fn serve_watch(
    upgraded: Upgraded,
    deflate: Option<Deflate>,
    app: App,
    peer: Peer,
    key: String,
) {
    let mut conn = Connection::start(upgraded, deflate, app.conn_context(), peer).await;
    let mut changes = app.channels.watch(&key);
    changes.mark_unchanged();
    conn.send(Payload::text(app.channels.get(&key)));
    let mut next_send = tokio::time::Instant::now();
    loop {
        tokio::select! {
            event = conn.next() => match event {
                Event::Closed(_) => break,
                Event::Shutdown => conn.close(codes::SHUTDOWN),
                Event::Text(t) if &t[..] == b"ping" => conn.send(Payload::text("pong")),
                Event::Text(_) | Event::Binary(_) => {}
            },
            changed = changes.changed() => {
                if changed.is_err() {
                    // The store forgot this channel's counter: take a new one.
                    changes = app.channels.watch(&key);
                    continue;
                }
                // Coalesce: changes until the next allowed send go out in one snapshot.
                tokio::time::sleep_until(next_send).await;
                changes.mark_unchanged();
                conn.send(Payload::text(app.channels.get(&key)));
                next_send = tokio::time::Instant::now() + app.config.channel_watch_interval;
            }
        }
    }
    conn.finish().await;
}
