//! The admin API (token-protected, under `/admin`, off unless `--admin-token` is set):
//! figures for the dashboard, the sessions and their members, a servermsg to a session or
//! to everyone, kicking a member; and the dashboard's login. Documented in
//! protocol/hunterpie.md.
//!
//! A request is the operator's with `Authorization: Bearer <token>` (scripts), or with the
//! cookie of a dashboard login ([`crate::http::login`]): then a request that changes
//! something must also echo the login's CSRF token. Every answer names the node it comes
//! from (`node`), so that a cluster-wide admin can merge the nodes' answers.

use std::sync::OnceLock;

use axum::Json;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::message::{Level, server_msg};
use super::now_ms;
use crate::core::hub::{ConnId, SessionInfo};
use crate::http::body::{self, BodyLimit};
use crate::http::login::{self, Gate, Scope};
use crate::server::App;
use crate::ws::connection::codes;

/// Most sessions `/admin/sessions` lists with `limit`.
const MAX_LIMIT: usize = 10_000;

/// The admin routes: the login, and the API behind the token check.
pub fn routes(app: App) -> Router<App> {
    let api = Router::new()
        .route("/stats", get(stats))
        .route("/sessions", get(sessions))
        .route("/message", post(message))
        .route("/kick", post(kick))
        .route_layer(axum::middleware::from_fn_with_state(app, require_token));
    login::routes("", gate).merge(api)
}

fn gate(app: &App) -> Gate<'_> {
    Gate {
        logins: &app.logins,
        scope: Scope::Admin,
        token: app.config.admin_token.as_deref(),
        tls: app.config.tls.is_some(),
        metrics: &app.metrics,
        limit: body_limit(app),
    }
}

fn body_limit(app: &App) -> BodyLimit {
    BodyLimit {
        max_bytes: app.config.limits.max_http_body_bytes,
        deadline: app.config.limits.http_body_timeout,
    }
}

async fn require_token(State(app): State<App>, req: Request, next: Next) -> Response {
    let Some(expected) = &app.config.admin_token else {
        return error(StatusCode::NOT_FOUND, "the admin API is off");
    };
    let headers = req.headers();
    let ok = match crate::http::bearer(headers) {
        Some(given) => crate::core::secret_eq(expected, given),
        None => match app.logins.check(Scope::Admin, headers) {
            Some(login) if req.method() == Method::GET || login.csrf_ok(headers) => true,
            Some(_) => return login::csrf_refused(&app.metrics),
            None => false,
        },
    };
    if ok {
        next.run(req).await
    } else {
        app.metrics.error("admin_unauthorized");
        error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin token (Authorization: Bearer ..., or log in on the dashboard)",
        )
    }
}

/// This node's name in every answer: its host name (a container's name under Docker).
pub fn node_name() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "local".into())
    })
}

/// The request's body as `T`, or the answer: 413 or 408 from [`body::read`], 400 naming
/// what was `expected` for a body that is not that JSON.
async fn json_body<T: DeserializeOwned>(
    app: &App,
    req: Request,
    expected: &str,
) -> Result<T, Response> {
    let bytes = body::read(&app.metrics, req, body_limit(app))
        .await
        .map_err(IntoResponse::into_response)?;
    serde_json::from_slice(&bytes).map_err(|_| error(StatusCode::BAD_REQUEST, expected))
}

fn error(status: StatusCode, text: &str) -> Response {
    (status, Json(json!({ "error": text }))).into_response()
}

/// `GET /admin/stats`: what the dashboard charts, per node (this one), with the time.
/// Counters are totals since the node started; rates are the client's to compute.
async fn stats(State(app): State<App>) -> Response {
    let m = &app.metrics;
    let refusals: serde_json::Map<String, serde_json::Value> = m
        .errors_by_kind()
        .into_iter()
        .map(|(kind, n)| (kind.to_string(), n.into()))
        .collect();
    let node = json!({
        "node": node_name(),
        "local": true,
        "version": env!("CARGO_PKG_VERSION"),
        "uptimeSeconds": m.started.elapsed().as_secs(),
        "connections": m.connections_open.get(),
        "sessions": app.hub.len(),
        "members": app.hub.local_members(),
        "logListeners": m.logs_listeners.get(),
        "totals": {
            "connections": m.connections_total.get(),
            "messagesIn": m.messages_in.get(),
            "messagesOut": m.messages_out.get(),
            "bytesIn": m.bytes_in.get(),
            "bytesOut": m.bytes_out.get(),
            "pushes": m.pushes_relayed.get(),
            "relayedBytes": m.bytes_relayed.get(),
            "slowConsumers": m.slow_consumer_disconnects.get(),
            "idleTimeouts": m.idle_timeouts.get(),
            "logEntries": m.logs_received.get(),
        },
        "refusals": refusals,
    });
    Json(json!({ "time": now_ms(), "nodes": [node] })).into_response()
}

/// The query of `/admin/sessions`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionsQuery {
    /// Only sessions whose id, or a member's name or address, contains this (any case).
    #[serde(default)]
    search: Option<String>,
    /// At most this many sessions (by id); `total` says how many matched.
    #[serde(default)]
    limit: Option<usize>,
}

/// `GET /admin/sessions[?search=S][&limit=N]`: the sessions by id, each member with the
/// node it is connected to.
async fn sessions(State(app): State<App>, req: Request) -> Response {
    let q = match axum::extract::Query::<SessionsQuery>::try_from_uri(req.uri()) {
        Ok(q) => q.0,
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "expected ?search=text and/or ?limit=N (1 to 10000)",
            );
        }
    };
    let limit = match q.limit {
        None => usize::MAX,
        Some(n @ 1..=MAX_LIMIT) => n,
        Some(_) => return error(StatusCode::BAD_REQUEST, "limit must be 1 to 10000"),
    };
    let search = q.search.unwrap_or_default().to_lowercase();
    let matching: Vec<SessionInfo> = app
        .hub
        .snapshot()
        .into_iter()
        .filter(|s| search.is_empty() || matches(s, &search))
        .collect();
    let total = matching.len();
    let node = node_name();
    let sessions: Vec<serde_json::Value> = matching
        .into_iter()
        .take(limit)
        .map(|s| {
            let members: Vec<serde_json::Value> = s
                .members
                .iter()
                .map(|m| {
                    json!({
                        "conn": m.conn,
                        "name": m.name,
                        "leader": m.leader,
                        "addr": m.addr,
                        "since": m.since,
                        "node": node,
                    })
                })
                .collect();
            json!({ "id": s.id, "protected": s.protected, "members": members })
        })
        .collect();
    Json(json!({ "total": total, "sessions": sessions })).into_response()
}

fn matches(s: &SessionInfo, search: &str) -> bool {
    s.id.to_lowercase().contains(search)
        || s.members.iter().any(|m| {
            m.name.to_lowercase().contains(search) || m.addr.to_lowercase().contains(search)
        })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageBody {
    text: String,
    #[serde(default)]
    level: Option<String>,
    /// Only this session's members; everyone when absent.
    #[serde(default)]
    session: Option<String>,
}

async fn message(State(app): State<App>, req: Request) -> Response {
    let expected = "expected JSON {\"text\": ..., \"level\"?: info|warn|error, \"session\"?: id}";
    let body: MessageBody = match json_body(&app, req, expected).await {
        Ok(body) => body,
        Err(res) => return res,
    };
    let level = match body.level.as_deref().unwrap_or("warn") {
        "info" => Level::Info,
        "warn" => Level::Warn,
        "error" => Level::Error,
        _ => return error(StatusCode::BAD_REQUEST, "level must be info, warn or error"),
    };
    let payload = server_msg(level, &body.text);
    let delivered = match &body.session {
        Some(id) => match app.hub.get(id) {
            Some(session) => session.broadcast(&payload),
            None => return error(StatusCode::NOT_FOUND, "no such session"),
        },
        None => app.hub.broadcast_all(&payload),
    };
    Json(json!({ "delivered": delivered })).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KickBody {
    conn: u64,
    /// The node the connection is on (`node` of `/admin/sessions`); this one when absent.
    #[serde(default)]
    node: Option<String>,
}

/// Both bodies' parsers, for the body fuzz target.
pub(crate) fn parse_for_fuzzing(body: &[u8]) {
    let _ = serde_json::from_slice::<MessageBody>(body);
    let _ = serde_json::from_slice::<KickBody>(body);
    login::parse_for_fuzzing(body);
}

async fn kick(State(app): State<App>, req: Request) -> Response {
    let expected =
        "expected JSON {\"conn\": <connection id from /admin/sessions>, \"node\"?: name}";
    let body: KickBody = match json_body(&app, req, expected).await {
        Ok(body) => body,
        Err(res) => return res,
    };
    if body.node.as_deref().is_some_and(|n| n != node_name()) {
        return error(StatusCode::NOT_FOUND, "no such node");
    }
    if app.hub.close_connection(ConnId(body.conn), codes::KICKED) {
        Json(json!({ "kicked": body.conn })).into_response()
    } else {
        error(StatusCode::NOT_FOUND, "no such connection")
    }
}
