//! The admin API (token-protected, under `/admin`, off unless `--admin-token` is set):
//! list sessions and members, send a servermsg to a session or to everyone, kick a member.
//! Documented in protocol/hunterpie.md.

use axum::Json;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::message::{Level, server_msg};
use crate::core::hub::ConnId;
use crate::http::body::{self, BodyLimit};
use crate::server::App;
use crate::ws::connection::codes;

/// The admin routes, behind the bearer-token check.
pub fn routes(app: App) -> Router<App> {
    Router::new()
        .route("/sessions", get(sessions))
        .route("/message", post(message))
        .route("/kick", post(kick))
        .route_layer(axum::middleware::from_fn_with_state(app, require_token))
}

async fn require_token(State(app): State<App>, req: Request, next: Next) -> Response {
    let ok = match (&app.config.admin_token, crate::http::bearer(req.headers())) {
        (Some(expected), Some(given)) => crate::core::secret_eq(expected, given),
        _ => false,
    };
    if ok {
        next.run(req).await
    } else {
        app.metrics.error("admin_unauthorized");
        error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin token (Authorization: Bearer ...)",
        )
    }
}

/// The request's body as `T`, or the answer: 413 or 408 from [`body::read`], 400 naming
/// what was `expected` for a body that is not that JSON.
async fn json_body<T: DeserializeOwned>(
    app: &App,
    req: Request,
    expected: &str,
) -> Result<T, Response> {
    let limit = BodyLimit {
        max_bytes: app.config.limits.max_http_body_bytes,
        deadline: app.config.limits.http_body_timeout,
    };
    let bytes = body::read(&app.metrics, req, limit)
        .await
        .map_err(IntoResponse::into_response)?;
    serde_json::from_slice(&bytes).map_err(|_| error(StatusCode::BAD_REQUEST, expected))
}

fn error(status: StatusCode, text: &str) -> Response {
    (status, Json(json!({ "error": text }))).into_response()
}

async fn sessions(State(app): State<App>) -> Response {
    Json(json!({ "sessions": app.hub.snapshot() })).into_response()
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
}

/// Both bodies' parsers, for the body fuzz target.
pub(crate) fn parse_for_fuzzing(body: &[u8]) {
    let _ = serde_json::from_slice::<MessageBody>(body);
    let _ = serde_json::from_slice::<KickBody>(body);
}

async fn kick(State(app): State<App>, req: Request) -> Response {
    let expected = "expected JSON {\"conn\": <connection id from /admin/sessions>}";
    let body: KickBody = match json_body(&app, req, expected).await {
        Ok(body) => body,
        Err(res) => return res,
    };
    if app.hub.close_connection(ConnId(body.conn), codes::KICKED) {
        Json(json!({ "kicked": body.conn })).into_response()
    } else {
        error(StatusCode::NOT_FOUND, "no such connection")
    }
}
