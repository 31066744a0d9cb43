//! The page at `/`: the public status (sessions, sockets, bytes relayed, uptime, rendered by
//! the server so that probes and `curl` see them) and, with `--admin-token`, the admin
//! dashboard over the admin API (login, live figures and charts, the sessions and their
//! members, messages and kicks). Without the token the page says the dashboard is off, and
//! no admin route exists.

use axum::extract::State;
use axum::response::Response;

use super::admin::node_name;
use crate::http::page::Page;
use crate::server::App;

/// The page's template (`{{name}}` placeholders, filled per request).
static DASHBOARD: Page = Page::new(include_str!("dashboard.html"));

/// `GET /`.
pub async fn page(State(app): State<App>) -> Response {
    let m = &app.metrics;
    let up = m.started.elapsed().as_secs();
    let uptime = format!(
        "{}d {:02}:{:02}:{:02}",
        up / 86400,
        up / 3600 % 24,
        up / 60 % 60,
        up % 60
    );
    DASHBOARD.render(&[
        ("version", env!("CARGO_PKG_VERSION")),
        (
            "admin",
            if app.config.admin_token.is_some() {
                "on"
            } else {
                "off"
            },
        ),
        ("node", node_name(&app)),
        ("sessions", &app.hub.len().to_string()),
        ("sockets", &m.connections_open.get().to_string()),
        ("bytes_relayed", &m.bytes_relayed.get().to_string()),
        ("uptime", &uptime),
    ])
}
