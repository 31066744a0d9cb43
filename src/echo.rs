//! The echo front-end: `GET /echo` sends every message back as it came. Off unless
//! `--echo-endpoint true`; it exists for the Autobahn conformance suite, which drives the
//! WebSocket layer (framing, UTF-8, close handshake, permessage-deflate) through it.

use axum::extract::{Request, State};
use axum::response::Response;
use hyper::upgrade::Upgraded;

use crate::core::outbound::Payload;
use crate::server::{App, Peer, upgrade_with};
use crate::ws::connection::codes;
use crate::ws::extension::Deflate;
use crate::ws::{Connection, Event};

pub async fn connect(State(app): State<App>, mut req: Request) -> Response {
    upgrade_with(&app, &mut req, serve)
}

async fn serve(upgraded: Upgraded, deflate: Option<Deflate>, app: App, peer: Peer) {
    let mut conn = Connection::start(upgraded, deflate, app.conn_context(), peer).await;
    loop {
        match conn.next().await {
            Event::Text(t) => conn.send(Payload::text(t)),
            Event::Binary(b) => conn.send(Payload::binary(b)),
            Event::Shutdown => conn.close(codes::SHUTDOWN),
            Event::Closed(_) => break,
        }
    }
    conn.finish().await;
}
