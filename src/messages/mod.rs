//! The direct-message front-end (seed 002, SimpleMessageService): peers log in by name and
//! send each other messages; a message to a peer that is offline waits in a durable queue
//! and is delivered, once and in order, when the peer logs in again.
//!
//! Owns the WebSocket endpoint `/messages` (and `/` on `--messages-port` for the original's
//! clients), logins and their optional HMAC tokens, delivery, and the try-it page
//! `/messages.html`. Who is online here is [`peers`]; what is kept on disk is [`queue`]; the
//! frames are [`wire`]. The wire protocol is in protocol/messages.md.

pub mod cluster;
pub mod peers;
pub mod queue;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::response::{Html, Response};
use axum::routing::get;
use bytes::Bytes;
use hyper::upgrade::Upgraded;
use tokio::sync::OnceCell;
use tracing::{debug, info, warn};

use crate::config::{Config, MessagesConfig, StoreConfig};
use crate::core::hub::ConnId;
use crate::core::outbound::{Close, Outbound, Payload};
use crate::metrics::Metrics;
use crate::server::{App, Peer, upgrade_with};
use crate::store::StoreError;
use crate::ws::connection::codes;
use crate::ws::extension::Deflate;
use crate::ws::{Connection, Event};
use peers::{Online, Peers, SlotGuard};
use queue::{Queue, QueueError};
use wire::Request as Frame;

/// The close sent to a connection whose name logged in again elsewhere.
pub const REPLACED: Close = Close {
    code: 4009,
    reason: "logged in from another connection",
};

/// How long the drain at login waits for queued messages to reach the socket before it
/// leaves them queued (and the connection is dropped as stuck).
const DRAIN_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Messages taken from the queue per round of a drain.
const DRAIN_BATCH: usize = 100;

const STORE_DOWN: &str = "message store unavailable: message not stored, try again";

/// The direct-message front-end's state.
#[derive(Debug)]
pub struct Messages {
    peers: Peers,
    /// Opened once, at start (retried on use if that failed: the relay starts without it).
    queue: OnceCell<Queue>,
    store: StoreConfig,
    config: MessagesConfig,
    /// Bytes a drain round may queue on a connection: half its outbound queue.
    drain_bytes: usize,
    metrics: Arc<Metrics>,
    /// Cluster mode: the way to peers on other nodes.
    relay: Option<cluster::Relay>,
}

/// Routes on the main port.
pub fn routes() -> Router<App> {
    Router::new()
        .route("/messages", get(connect))
        .route("/messages.html", get(page))
}

/// The router of `--messages-port`: the protocol at `/`, as the original served it (and the
/// main port's routes, so the page works there too).
pub fn compat_router(app: App) -> Router {
    routes().route("/", get(connect)).with_state(app)
}

/// Opens the store at start, so a missing or broken one is in the log at once.
pub async fn open_store(app: App) {
    match app.messages.queue().await {
        Ok(_) => info!(store = %app.config.store.describe(), "direct messages: store open"),
        Err(e) => warn!(error = %e, "direct messages: store unavailable; will retry on use"),
    }
    if app.config.cluster.is_some() && matches!(app.config.store, StoreConfig::Sqlite(_)) {
        warn!(
            "direct messages: cluster mode with a SQLite queue: each node keeps its own queue; \
             give every node the same --database-url to share it"
        );
    }
}

async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

async fn connect(State(app): State<App>, mut req: Request) -> Response {
    upgrade_with(&app, &mut req, serve)
}

async fn serve(upgraded: Upgraded, deflate: Option<Deflate>, app: App, peer: Peer) {
    let mut conn = Connection::start(upgraded, deflate, app.conn_context(), peer).await;
    let mut me: Option<Arc<str>> = None;
    loop {
        match conn.next().await {
            Event::Text(text) => app.messages.on_text(&conn, &mut me, text).await,
            Event::Binary(_) => {
                app.messages.refuse(
                    &conn.outbound,
                    "binary frames are not supported: send JSON text",
                );
            }
            Event::Shutdown => conn.close(codes::SHUTDOWN),
            Event::Closed(_) => break,
        }
    }
    if let Some(name) = me {
        app.messages.logout(&name, conn.id).await;
    }
    conn.finish().await;
}

impl Messages {
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Messages {
        Messages {
            peers: Peers::default(),
            queue: OnceCell::new(),
            store: config.store.clone(),
            config: config.messages.clone(),
            drain_bytes: (config.outbound_queue_bytes / 2).max(1),
            metrics,
            relay: config.cluster.as_ref().and_then(cluster::Relay::new),
        }
    }

    /// Cluster mode: the link to the other nodes.
    pub fn relay(&self) -> Option<&cluster::Relay> {
        self.relay.as_ref()
    }

    async fn queue(&self) -> Result<&Queue, StoreError> {
        self.queue
            .get_or_try_init(|| Queue::open(&self.store))
            .await
    }

    fn refuse(&self, to: &Outbound, text: impl Into<String>) {
        self.metrics.direct("refused");
        // Refused only when the connection is closing; nothing to tell then.
        let _ = to.send(wire::error(text));
    }

    async fn on_text(&self, conn: &Connection, me: &mut Option<Arc<str>>, raw: Bytes) {
        let out = &conn.outbound;
        if raw.len() > self.config.max_bytes {
            let max = self.config.max_bytes;
            return self.refuse(out, format!("message too large: at most {max} bytes"));
        }
        // The WebSocket layer hands over valid UTF-8 only.
        let text = String::from_utf8_lossy(&raw);
        match wire::parse(&text) {
            Err(e) => {
                debug!(conn = conn.id.0, error = %e, "bad frame");
                self.refuse(out, e)
            }
            Ok(Frame::Login { name, token }) => self.login(conn, me, name, token).await,
            Ok(Frame::Send { from, to }) => {
                let Some(name) = me.as_deref() else {
                    return self.refuse(out, r#"not logged in: send {"login":"<name>"} first"#);
                };
                if from != name {
                    return self.refuse(
                        out,
                        format!(
                            "\"from\" must be the name this connection logged in with ({name})"
                        ),
                    );
                }
                if let Some(answer) = self.send(name, &to, raw).await {
                    // Refused only when closing.
                    let _ = out.send(answer);
                }
            }
        }
    }

    async fn login(
        &self,
        conn: &Connection,
        me: &mut Option<Arc<str>>,
        name: String,
        token: Option<String>,
    ) {
        let out = &conn.outbound;
        if let Some(current) = me.as_deref() {
            if current != name {
                self.refuse(out, format!("already logged in as {current}"));
            }
            return;
        }
        if let Some(secret) = &self.config.secret {
            match token {
                None => return self.refuse(out, format!("login as {name} requires a token")),
                Some(t)
                    if !crate::core::secret_eq(
                        &login_token(secret, &name),
                        &t.to_ascii_lowercase(),
                    ) =>
                {
                    return self.refuse(out, format!("invalid token for {name}"));
                }
                Some(_) => {}
            }
        }
        let queue = match self.queue().await {
            Ok(q) => q,
            Err(e) => {
                warn!(error = %e, "direct messages: store unavailable");
                return self.refuse(out, "message store unavailable: not logged in, try again");
            }
        };
        if let Err(e) = queue.register(&name).await {
            warn!(error = %e, "direct messages: cannot register a peer");
            return self.refuse(out, "message store unavailable: not logged in, try again");
        }
        let mut slot = self.peers.lock(&name).await;
        match slot.online.take() {
            Some(old) => replace(&old, &name),
            None => {
                self.metrics.direct_peers_online.inc();
            }
        }
        slot.online = Some(Online {
            conn: conn.id,
            outbound: out.clone(),
        });
        if let Some(relay) = &self.relay {
            relay.claim(&name).await;
        }
        debug!(conn = conn.id.0, name, "logged in");
        *me = Some(name.as_str().into());
        self.drain(&mut slot, queue, &name, out).await;
    }

    /// Delivers `name`'s queued messages to `out`, oldest first, removing each batch from
    /// the queue once it is written to the socket. Holding the peer's lock, so nothing
    /// overtakes the queue.
    async fn drain(&self, slot: &mut SlotGuard<'_>, queue: &Queue, name: &str, out: &Outbound) {
        match &self.relay {
            Some(relay) => {
                relay.drain_lease(name).await;
                self.drain_batches(slot, queue, name, out).await;
                relay.drain_done(name).await;
            }
            None => self.drain_batches(slot, queue, name, out).await,
        }
    }

    async fn drain_batches(
        &self,
        _slot: &mut SlotGuard<'_>,
        queue: &Queue,
        name: &str,
        out: &Outbound,
    ) {
        loop {
            let batch = match queue.pending(name, DRAIN_BATCH, self.drain_bytes).await {
                Ok(b) if b.is_empty() => return,
                Ok(b) => b,
                Err(e) => {
                    warn!(error = %e, name, "direct messages: cannot read the queue");
                    return;
                }
            };
            for q in &batch {
                if out.send(Payload::text(q.body.clone())).is_err() {
                    return;
                }
            }
            let written = tokio::time::timeout(DRAIN_WRITE_TIMEOUT, out.flushed()).await;
            if written != Ok(true) {
                // Not known to be written: the messages stay queued for the next login.
                if written.is_err() {
                    out.close(codes::IDLE);
                }
                return;
            }
            let n = batch.len() as u64;
            if let Err(e) = queue
                .remove(batch.into_iter().map(|q| q.id).collect())
                .await
            {
                warn!(error = %e, name, "direct messages: delivered messages not removed");
                return;
            }
            self.metrics
                .direct_messages
                .get_or_create(&crate::metrics::KindLabel { kind: "drained" })
                .inc_by(n);
        }
    }

    /// Delivers `raw` from `from` to `to`, or queues it; returns the answer for the sender,
    /// if any (a delivered message gets none, as in the original).
    async fn send(&self, from: &str, to: &str, raw: Bytes) -> Option<Arc<Payload>> {
        let slot = self.peers.lock(to).await;
        // A closing connection refuses: the peer is going offline, so the message is queued.
        if let Some(online) = &slot.online
            && online.outbound.send(Payload::text(raw.clone())).is_ok()
        {
            self.metrics.direct("delivered");
            return None;
        }
        // The WebSocket layer hands over valid UTF-8 only.
        let body = String::from_utf8_lossy(&raw);
        if let Some(relay) = &self.relay
            && relay.deliver(to, from, &body).await
        {
            self.metrics.direct("delivered");
            return None;
        }
        let queue = match self.queue().await {
            Ok(q) => q,
            Err(e) => {
                warn!(error = %e, "direct messages: store unavailable");
                self.metrics.direct("refused");
                return Some(wire::error(STORE_DOWN));
            }
        };
        match queue.is_known(to).await {
            Ok(true) => {}
            Ok(false) => {
                self.metrics.direct("refused");
                return Some(wire::unknown_peer(to));
            }
            Err(e) => {
                warn!(error = %e, "direct messages: store unavailable");
                self.metrics.direct("refused");
                return Some(wire::error(STORE_DOWN));
            }
        }
        let answer = match queue
            .enqueue(to, from, &body, self.config.queue_limit)
            .await
        {
            Ok(()) => {
                self.metrics.direct("queued");
                drop(slot);
                if let Some(relay) = &self.relay {
                    relay.poke(to).await;
                }
                return Some(wire::offline_peer(to));
            }
            Err(QueueError::Full(_)) => format!(
                "the queue of {to} is full ({} messages): message not stored",
                self.config.queue_limit
            ),
            Err(QueueError::Store(e)) => {
                warn!(error = %e, "direct messages: cannot queue a message");
                STORE_DOWN.into()
            }
        };
        drop(slot);
        self.metrics.direct("refused");
        Some(wire::error(answer))
    }

    /// `conn` is gone: `name` is offline unless it logged in again elsewhere.
    async fn logout(&self, name: &str, conn: ConnId) {
        let mut slot = self.peers.lock(name).await;
        if slot.online.as_ref().is_some_and(|o| o.conn == conn) {
            slot.online = None;
            self.metrics.direct_peers_online.dec();
            debug!(conn = conn.0, name, "logged out");
            if let Some(relay) = &self.relay {
                relay.release(name).await;
            }
        }
    }

    /// Cluster mode: another node's sender wrote to `to`, which was logged in here.
    async fn deliver_from_node(&self, to: &str, from: &str, raw: &str) {
        let slot = self.peers.lock(to).await;
        if let Some(online) = &slot.online
            && online.outbound.send(Payload::text(raw.to_owned())).is_ok()
        {
            self.metrics.direct("delivered");
            return;
        }
        // Gone meanwhile: the sender was told it was delivered, so it is queued here.
        let queued = match self.queue().await {
            Ok(q) => q
                .enqueue(to, from, raw, self.config.queue_limit)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        drop(slot);
        match queued {
            Ok(()) => {
                self.metrics.direct("queued");
                if let Some(relay) = &self.relay {
                    relay.poke(to).await;
                }
            }
            Err(e) => {
                self.metrics.direct("lost");
                warn!(error = %e, to, from, "direct messages: a relayed message could not be queued");
            }
        }
    }

    /// Cluster mode, after (re)connecting to Redis: every peer online here is written back.
    async fn reclaim_all(&self, relay: &cluster::Relay) {
        for name in self.peers.names() {
            if self.peers.lock(&name).await.online.is_some() {
                relay.reclaim(&name).await;
            }
        }
    }

    /// Cluster mode: a message was queued for `to` on another node.
    async fn drain_if_online(&self, to: &str) {
        let mut slot = self.peers.lock(to).await;
        let Some(out) = slot.online.as_ref().map(|o| o.outbound.clone()) else {
            return;
        };
        if let Ok(queue) = self.queue().await {
            self.drain(&mut slot, queue, to, &out).await;
        }
    }

    /// Cluster mode: `to` logged in on another node, which takes over.
    async fn taken_over(&self, to: &str) {
        let mut slot = self.peers.lock(to).await;
        if let Some(old) = slot.online.take() {
            self.metrics.direct_peers_online.dec();
            replace(&old, to);
        }
    }
}

/// Tells `old`, logged in as `name`, that a newer login took over, and closes it.
fn replace(old: &Online, name: &str) {
    let text = format!("{name} logged in from another connection: closing this one");
    // The old connection may be closing already; it is replaced either way.
    let _ = old.outbound.send(wire::error(text));
    old.outbound.close(REPLACED);
}

/// The login token of `name` under `secret`: HMAC-SHA256, lowercase hex.
pub fn login_token(secret: &str, name: &str) -> String {
    crate::core::hmac_hex(secret, name)
}
