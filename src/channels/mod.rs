//! The HTTP channel API (protocol/channels.md): clients that only speak HTTP share state
//! through channels, one request per update, compatible with the original supersynk Flask
//! server and its Unity client; plus a WebSocket that pushes a channel's state to watchers.
//!
//! Owns the HTTP handlers and the watch socket; the state lives in [`store`] (one node) or
//! in Redis through [`shared`] (cluster mode).

pub mod shared;
pub mod store;

use std::time::{Duration, Instant};

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
use crate::http::body::{self, BodyLimit};
use crate::server::{App, Peer, upgrade_with};
use crate::ws::connection::codes;
use crate::ws::extension::Deflate;
use crate::ws::{Connection, Event};
use shared::{Ordering, Shared, Timed};
use store::{Bound, Bounds, Order, Store};

/// Where the channels live: in this process, or in Redis for every node (cluster mode).
#[derive(Debug)]
pub enum Channels {
    Local { store: Store, started: Instant },
    Shared(Box<Shared>),
}

type Answer<T> = redis::RedisResult<Timed<T>>;

impl Channels {
    /// In Redis when the configuration has a cluster (the URL was checked), else local.
    pub fn new(config: &crate::config::Config) -> Channels {
        let bounds = Bounds {
            max_clients: config.max_channel_clients,
            max_bytes: config.max_channel_bytes,
        };
        let local = || Channels::Local {
            store: Store::new(config.channel_timeout, bounds),
            started: Instant::now(),
        };
        match &config.cluster {
            Some(c) => match Shared::new(c, config.channel_timeout, bounds) {
                Ok(shared) => Channels::Shared(Box::new(shared)),
                Err(e) => {
                    // Config::resolve checked the URL, so this does not happen.
                    tracing::error!(error = %e, "invalid Redis URL: channels stay local");
                    local()
                }
            },
            None => local(),
        }
    }

    fn now(started: &Instant) -> f64 {
        started.elapsed().as_secs_f64()
    }

    /// The local store's request-order check: false for a late request.
    fn in_order(store: &Store, order: Ordering) -> bool {
        order.is_none_or(|(client, time)| store.check_order(client, time) == Order::InOrder)
    }

    /// Posts; `None` for a late request (answered 204), an error for one past the
    /// channel's bounds (413); neither changes anything.
    async fn post(
        &self,
        key: &str,
        client: &str,
        body: Bytes,
        order: Ordering<'_>,
    ) -> Answer<Option<Result<Bytes, Bound>>> {
        match self {
            Channels::Local { store, started } => Ok((
                Self::now(started),
                Self::in_order(store, order).then(|| store.post(key, client, body)),
            )),
            Channels::Shared(s) => s.post(key, client, &body, order).await,
        }
    }

    /// The channel's state; `None` for a late request.
    async fn get(&self, key: &str, order: Ordering<'_>) -> Answer<Option<Bytes>> {
        match self {
            Channels::Local { store, started } => Ok((
                Self::now(started),
                Self::in_order(store, order).then(|| store.get(key)),
            )),
            Channels::Shared(s) => s.get(key, order).await,
        }
    }

    async fn channel_ids(&self) -> Answer<Vec<String>> {
        match self {
            Channels::Local { store, started } => Ok((Self::now(started), store.channel_ids())),
            Channels::Shared(s) => s.channel_ids().await,
        }
    }
}

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
                if let Channels::Local { store, .. } = &app.channels {
                    store.sweep();
                }
            }
        }
    }
}

fn error(status: StatusCode, text: &str, app: &App, kind: &'static str) -> Response {
    app.metrics.error(kind);
    (status, axum::Json(serde_json::json!({ "error": text }))).into_response()
}

/// The answer when the shared store (Redis) cannot be reached: 503, nothing stored.
fn unavailable(app: &App, e: redis::RedisError) -> Response {
    tracing::warn!(error = %e, "channel store unavailable");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "channel store unavailable (Redis); nothing was stored, try again",
        app,
        "channel_store_unavailable",
    )
}

/// A 200 answer with a JSON body and `Server-Time` (seconds since the server started, or
/// in cluster mode since the cluster's epoch).
fn ok_json(server_time: f64, body: Bytes) -> Response {
    let mut res = (StatusCode::OK, body).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let server_time = format!("{server_time:.3}");
    if let Ok(v) = HeaderValue::from_str(&server_time) {
        h.insert("server-time", v);
    }
    res
}

async fn version() -> String {
    format!("supersynk server {}", env!("CARGO_PKG_VERSION"))
}

async fn list(State(app): State<App>) -> Response {
    match app.channels.channel_ids().await {
        Ok((t, ids)) => ok_json(t, Bytes::from(serde_json::to_vec(&ids).unwrap_or_default())),
        Err(e) => unavailable(&app, e),
    }
}

/// A `Client-Time` that is not a number.
struct BadClientTime;

/// The request's `Client-Id` and `Client-Time`, if it has both.
fn ordering(headers: &HeaderMap) -> Result<Option<(String, f64)>, BadClientTime> {
    let Some(time) = headers.get("client-time") else {
        return Ok(None);
    };
    let time = time
        .to_str()
        .ok()
        .and_then(|t| t.trim().parse::<f64>().ok())
        .filter(|t| t.is_finite())
        .ok_or(BadClientTime)?;
    let client = headers.get("client-id").and_then(|v| v.to_str().ok());
    Ok(client.map(|c| (c.to_string(), time)))
}

fn bad_client_time(app: &App) -> Response {
    let text = "Client-Time must be a number (seconds)";
    error(
        StatusCode::BAD_REQUEST,
        text,
        app,
        "channel_bad_client_time",
    )
}

/// 200 with the body, 204 for a late request, 503 when the shared store is unreachable.
fn answer(app: &App, result: Answer<Option<Bytes>>) -> Response {
    match result {
        Ok((t, Some(body))) => ok_json(t, body),
        Ok((_, None)) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => unavailable(app, e),
    }
}

async fn get_channel(
    State(app): State<App>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Ok(order) = ordering(&headers) else {
        return bad_client_time(&app);
    };
    let order = order.as_ref().map(|(c, t)| (c.as_str(), *t));
    answer(&app, app.channels.get(&key, order).await)
}

#[derive(Deserialize)]
struct Posted<'a> {
    #[serde(borrow, default)]
    client_id: Option<&'a RawValue>,
}

/// The `client_id` of a posted body, or the 400 text.
pub(crate) fn client_id(body: &[u8]) -> Result<String, &'static str> {
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

async fn post_channel(State(app): State<App>, Path(key): Path<String>, req: Request) -> Response {
    let Ok(order) = ordering(req.headers()) else {
        return bad_client_time(&app);
    };
    let limit = BodyLimit {
        max_bytes: app.config.max_channel_body_bytes,
        deadline: app.config.limits.http_body_timeout,
    };
    let body = match body::read(&app.metrics, req, limit).await {
        Ok(body) => body,
        Err(e) => return e.into_response(),
    };
    let id = match client_id(&body) {
        Ok(id) => id,
        Err(text) => return error(StatusCode::BAD_REQUEST, text, &app, "channel_bad_body"),
    };
    let order = order.as_ref().map(|(c, t)| (c.as_str(), *t));
    match app.channels.post(&key, &id, body, order).await {
        Ok((_, Some(Err(bound)))) => {
            let kind = match bound {
                Bound::Clients(_) => "channel_full",
                Bound::Bytes(_) => "channel_state_too_large",
            };
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &bound.to_string(),
                &app,
                kind,
            )
        }
        Ok((t, Some(Ok(others)))) => answer(&app, Ok((t, Some(others)))),
        Ok((t, None)) => answer(&app, Ok((t, None))),
        Err(e) => unavailable(&app, e),
    }
}

async fn watch(State(app): State<App>, Path(key): Path<String>, mut req: Request) -> Response {
    upgrade_with(&app, &mut req, move |upgraded, deflate, app, peer| {
        serve_watch(upgraded, deflate, app, peer, key)
    })
}

/// Sends the channel's state on connect and after every change, at most once per
/// `--channel-watch-interval-ms`. In cluster mode changes come from any node, so the watch
/// reads the shared state at that interval and sends it when it differs.
async fn serve_watch(
    upgraded: Upgraded,
    deflate: Option<Deflate>,
    app: App,
    peer: Peer,
    key: String,
) {
    let mut conn = Connection::start(upgraded, deflate, app.conn_context(), peer).await;
    match &app.channels {
        Channels::Local { store, .. } => watch_local(&mut conn, &app, store, &key).await,
        Channels::Shared(shared) => watch_shared(&mut conn, &app, shared, &key).await,
    }
    conn.finish().await;
}

/// Answers the watcher's own messages; false once the socket is closed.
fn on_watch_event(conn: &Connection, event: Event) -> bool {
    match event {
        Event::Closed(_) => return false,
        Event::Shutdown => conn.close(codes::SHUTDOWN),
        Event::Text(t) if &t[..] == b"ping" => conn.send(Payload::text("pong")),
        Event::Text(_) | Event::Binary(_) => {}
    }
    true
}

async fn watch_local(conn: &mut Connection, app: &App, store: &Store, key: &str) {
    let mut changes = store.watch(key);
    changes.mark_unchanged();
    conn.send(Payload::text(store.get(key)));
    let mut next_send = tokio::time::Instant::now();
    loop {
        tokio::select! {
            event = conn.next() => if !on_watch_event(conn, event) { return },
            changed = changes.changed() => {
                if changed.is_err() {
                    // The store forgot this channel's counter: take a new one.
                    changes = store.watch(key);
                    continue;
                }
                // Coalesce: changes until the next allowed send go out in one snapshot.
                tokio::time::sleep_until(next_send).await;
                changes.mark_unchanged();
                conn.send(Payload::text(store.get(key)));
                next_send = tokio::time::Instant::now() + app.config.channel_watch_interval;
            }
        }
    }
}

async fn watch_shared(conn: &mut Connection, app: &App, shared: &Shared, key: &str) {
    let mut tick = tokio::time::interval(app.config.channel_watch_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<Bytes> = None;
    loop {
        tokio::select! {
            event = conn.next() => if !on_watch_event(conn, event) { return },
            _ = tick.tick() => match shared.get(key, None).await {
                Ok((_, Some(state))) if last.as_ref() != Some(&state) => {
                    conn.send(Payload::text(state.clone()));
                    last = Some(state);
                }
                Ok(_) => {}
                // Redis unreachable: keep the last state and try again at the next tick.
                Err(e) => tracing::debug!(error = %e, "watch: channel store unavailable"),
            },
        }
    }
}
