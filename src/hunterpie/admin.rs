//! The admin API (token-protected, under `/admin`, off unless `--admin-token` is set):
//! list sessions and members, send a servermsg to a session or to everyone, kick a member.
//! Documented in protocol/hunterpie.md.

use axum::Json;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use super::message::{Level, server_msg};
use crate::core::hub::ConnId;
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
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let ok = match (&app.config.admin_token, given) {
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

/// The answer to a body that is not the expected JSON: 413 when it was too large.
fn bad_body(rejection: axum::extract::rejection::JsonRejection, expected: &str) -> Response {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large")
    } else {
        error(StatusCode::BAD_REQUEST, expected)
    }
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

async fn message(
    State(app): State<App>,
    body: Result<Json<MessageBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let body = match body {
        Ok(Json(body)) => body,
        Err(r) => {
            return bad_body(
                r,
                "expected JSON {\"text\": ..., \"level\"?: info|warn|error, \"session\"?: id}",
            );
        }
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

async fn kick(
    State(app): State<App>,
    body: Result<Json<KickBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let body = match body {
        Ok(Json(body)) => body,
        Err(r) => {
            return bad_body(
                r,
                "expected JSON {\"conn\": <connection id from /admin/sessions>}",
            );
        }
    };
    if app.hub.close_connection(ConnId(body.conn), codes::KICKED) {
        Json(json!({ "kicked": body.conn })).into_response()
    } else {
        error(StatusCode::NOT_FOUND, "no such connection")
    }
}
