//! Liveness and readiness: `GET /healthz` and `GET /readyz`.
//!
//! `/healthz` says the process serves (200 while it runs, draining included). `/readyz`
//! says whether it should be sent traffic: 503, with one reason a line, while it drains
//! after SIGTERM/SIGINT, while the durable store it is configured with cannot be used
//! (not opened, or not answering), and in cluster mode while Redis is unreachable. Owns the
//! store probe's cache: the store is asked at most once a second, however often `/readyz`
//! is.

use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::server::App;

/// How long a store probe's answer is reused.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// The last store probe.
#[derive(Debug, Default)]
pub struct Health {
    /// An async mutex, held across the probe: concurrent requests wait for one probe and
    /// share its answer.
    store: tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>,
}

impl Health {
    /// The store's health, probed again if the last answer is older than [`PROBE_EVERY`].
    async fn store(&self, app: &App) -> Result<(), String> {
        let mut last = self.store.lock().await;
        if let Some((at, answer)) = &*last
            && at.elapsed() < PROBE_EVERY
        {
            return answer.clone();
        }
        let answer = app.logs.store_health().await;
        *last = Some((Instant::now(), answer.clone()));
        answer
    }
}

/// 200 while the server serves. In cluster mode with Redis unreachable the answer stays
/// 200 (local delivery goes on, and a Redis outage must not take every node out of a load
/// balancer) but says `degraded`.
pub async fn healthz(State(app): State<App>) -> &'static str {
    match app.hub.link() {
        Some(link) if !link.is_up() => "degraded: Redis unreachable, serving local members only\n",
        _ => "ok\n",
    }
}

/// 200 `ready` when the server should get traffic, else 503 `not ready` and the reasons.
pub async fn readyz(State(app): State<App>) -> Response {
    let mut reasons = Vec::new();
    if app.shutdown.is_cancelled() {
        reasons.push("draining: the server is shutting down".to_string());
    }
    if let Some(link) = app.hub.link()
        && !link.is_up()
    {
        reasons.push("redis: unreachable (cluster mode)".to_string());
    }
    if let Err(why) = app.health.store(&app).await {
        reasons.push(format!("store: {why}"));
    }
    if reasons.is_empty() {
        return (StatusCode::OK, "ready\n").into_response();
    }
    let body = format!("not ready\n{}\n", reasons.join("\n"));
    (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
}
