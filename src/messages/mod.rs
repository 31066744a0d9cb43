//! The direct-message front-end (seed 002, SimpleMessageService): peers log in by name and
//! send each other messages; a message to a peer that is offline waits in a durable queue
//! and is delivered, once and in order, when the peer logs in again.
//!
//! Owns the WebSocket endpoint `/messages` (and `/` on `--messages-port` for the original's
//! clients), logins and their optional HMAC tokens, delivery, and the try-it page
//! `/messages.html`. Who is online here is [`peers`]; what is kept on disk is [`queue`]; the
//! frames are [`wire`]. The wire protocol is in protocol/messages.md.

pub mod cluster;
pub mod group_commit;
pub mod peers;
pub mod queue;
pub mod redis_queue;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::response::Response;
use axum::routing::get;
use bytes::Bytes;
use hyper::upgrade::Upgraded;
use tokio::sync::{Notify, OnceCell};
use tracing::{debug, info, warn};

use crate::config::{ClusterConfig, Config, MessagesConfig, StoreConfig};
use crate::core::hub::ConnId;
use crate::core::outbound::{Close, Outbound, Payload, SLOW_CONSUMER};
use crate::http::page::Page;
use crate::metrics::Metrics;
use crate::server::{App, Peer, upgrade_with};
use crate::store::StoreError;
use crate::ws::connection::codes;
use crate::ws::extension::Deflate;
use crate::ws::{Connection, Event};
use peers::{Online, Peers, SlotGuard};
use queue::{Queue, QueueBounds, QueueError};
use wire::Request as Frame;

/// The close sent to a connection whose name logged in again elsewhere.
pub const REPLACED: Close = Close {
    code: 4009,
    reason: "logged in from another connection",
};

/// How long a drain round waits for its batch to reach the socket before the connection is
/// closed as a slow consumer (the batch stays queued for the next login).
const DRAIN_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Messages taken from the queue per round of a drain.
const DRAIN_BATCH: usize = 100;

/// How long a drain waits before it reads a failing store again.
const STORE_RETRY: Duration = Duration::from_secs(1);

/// The close of a connection whose delivered messages could not be removed from its queue.
pub const STORE_FAILED: Close = Close {
    code: 1011,
    reason: "message store failed",
};

const STORE_DOWN: &str = "message store unavailable: message not stored, try again";

/// The direct-message front-end's state.
#[derive(Debug)]
pub struct Messages {
    peers: Peers,
    /// Opened once, at start (retried on use if that failed: the relay starts without it).
    queue: OnceCell<Queue>,
    store: StoreConfig,
    /// Cluster mode: where the queue is when there is no PostgreSQL.
    cluster: Option<ClusterConfig>,
    config: MessagesConfig,
    /// Bytes a recipient's outbound queue may hold before further messages to it spill
    /// into its durable queue: half the queue, so the connection is never closed as a slow
    /// consumer with messages in it.
    live_bytes: usize,
    /// The answer to a message over the connection's rate limit.
    over_rate: Arc<Payload>,
    metrics: Arc<Metrics>,
    /// Cluster mode: the way to peers on other nodes.
    relay: Option<cluster::Relay>,
}

/// What became of a message handed to the node where its recipient is logged in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Written to the recipient's connection, or queued behind its backlog: it will be.
    Delivered,
    /// The recipient is not logged in there.
    NotHere,
    /// The recipient's queue is full: the message was not kept.
    Full,
    /// The store holds as many bytes of queued messages as it may: the message was not kept.
    StoreFull,
    /// The store failed: the message was not kept.
    StoreDown,
}

/// How one round of a drain ended.
enum Round {
    /// A batch was written and removed: go on.
    More,
    /// The queue is empty and the backlog cleared: sleep until woken.
    Empty,
    /// The connection is gone or replaced: the task ends.
    Stop,
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
        Ok(Queue::Redis(_)) => info!("direct messages: store open in Redis (the cluster's)"),
        Ok(_) => info!(store = %app.config.store.describe(), "direct messages: store open"),
        Err(e) => warn!(error = %e, "direct messages: store unavailable; will retry on use"),
    }
}

async fn page() -> Response {
    static PAGE: Page = Page::new(include_str!("page.html"));
    PAGE.response()
}

async fn connect(State(app): State<App>, mut req: Request) -> Response {
    upgrade_with(&app, &mut req, serve)
}

async fn serve(upgraded: Upgraded, deflate: Option<Deflate>, app: App, peer: Peer) {
    let mut conn = Connection::start(upgraded, deflate, app.conn_context(), peer).await;
    let m = &app.messages;
    conn.keepalive(m.config.ping_interval);
    conn.answer_over_rate(m.over_rate.clone());
    let mut me: Option<Arc<str>> = None;
    loop {
        match conn.next().await {
            Event::Text(text) => m.on_text(&app, &conn, &mut me, text).await,
            Event::Binary(_) => {
                m.refuse(
                    &conn.outbound,
                    "binary frames are not supported: send JSON text",
                );
            }
            Event::Shutdown => conn.close(codes::SHUTDOWN),
            Event::Closed(_) => break,
        }
    }
    if let Some(name) = me {
        m.logout(&name, conn.id).await;
    }
    conn.finish().await;
}

impl Messages {
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Messages {
        let over_rate = wire::error(format!(
            "rate limit: at most {} messages per second (bursts of {}): message not sent",
            config.limits.messages_per_second, config.limits.message_burst
        ));
        Messages {
            peers: Peers::default(),
            queue: OnceCell::new(),
            store: config.store.clone(),
            cluster: config.cluster.clone(),
            config: config.messages.clone(),
            live_bytes: (config.outbound_queue_bytes / 2).max(1),
            over_rate,
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
            .get_or_try_init(|| Queue::open(&self.store, self.cluster.as_ref()))
            .await
    }

    fn refuse(&self, to: &Outbound, text: impl Into<String>) {
        self.metrics.direct("refused");
        // Refused only when the connection is closing; nothing to tell then.
        let _ = to.send(wire::error(text));
    }

    async fn on_text(&self, app: &App, conn: &Connection, me: &mut Option<Arc<str>>, raw: Bytes) {
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
            Ok(Frame::Login { name, token }) => self.login(app, conn, me, name, token).await,
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
        app: &App,
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
        match queue.register(&name, self.config.max_peers).await {
            Ok(true) => {}
            Ok(false) => {
                return self.refuse(
                    out,
                    format!(
                        "too many known peers (at most {}): a new name cannot log in",
                        self.config.max_peers
                    ),
                );
            }
            Err(e) => {
                warn!(error = %e, "direct messages: cannot register a peer");
                return self.refuse(out, "message store unavailable: not logged in, try again");
            }
        }
        let name: Arc<str> = name.into();
        let wake = Arc::new(Notify::new());
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
            wake: wake.clone(),
        });
        // Whatever waits in the queue goes before anything new.
        slot.backlog = true;
        if let Some(relay) = &self.relay {
            relay.claim(&name).await;
        }
        drop(slot);
        debug!(conn = conn.id.0, %name, "logged in");
        *me = Some(name.clone());
        app.tracker
            .spawn(drain(app.clone(), name, conn.id, out.clone(), wake));
    }

    /// One round of `name`'s drain on connection `conn`: under the peer's lock, takes the
    /// oldest batch from the queue and hands it to the connection (or, if the queue is
    /// empty, clears the backlog); then, without the lock, waits for the batch to be written
    /// to the socket and removes it from the queue.
    async fn drain_round(&self, queue: &Queue, name: &str, conn: ConnId, out: &Outbound) -> Round {
        let batch = {
            let mut slot = self.peers.lock(name).await;
            if slot.online.as_ref().is_none_or(|o| o.conn != conn) {
                return Round::Stop;
            }
            let budget = self.live_bytes.saturating_sub(out.queued_bytes());
            let batch = match queue.pending(name, DRAIN_BATCH, budget).await {
                Ok(b) => b,
                Err(e) => {
                    warn!(error = %e, name, "direct messages: cannot read the queue");
                    drop(slot);
                    tokio::select! {
                        _ = out.closed() => return Round::Stop,
                        _ = tokio::time::sleep(STORE_RETRY) => return Round::More,
                    }
                }
            };
            if batch.is_empty() {
                slot.backlog = false;
                return Round::Empty;
            }
            for q in &batch {
                if out.send(Payload::text(q.body.clone())).is_err() {
                    return Round::Stop;
                }
            }
            batch
        };
        // A closing connection still writes what it has queued (a takeover's old connection
        // gets its batch, then the close), so only the writer knows. Not known to be written
        // (the socket went first, within the close timeout, or its client stopped reading):
        // the batch stays queued for the next login, which may repeat some of it.
        let written = tokio::select! {
            biased;
            w = out.flushed() => w,
            _ = tokio::time::sleep(DRAIN_WRITE_TIMEOUT) => {
                debug!(conn = conn.0, name, "queued messages not read: slow consumer");
                out.close(SLOW_CONSUMER);
                false
            }
        };
        if !written {
            return Round::Stop;
        }
        let n = batch.len() as u64;
        let ids: Vec<_> = batch.into_iter().map(|q| q.id).collect();
        let mut tries = 0;
        while let Err(e) = queue.remove(name, ids.clone()).await {
            tries += 1;
            if tries == 3 {
                // They were written, and nothing more can go out behind them: the client
                // is closed, and its next login gets them once more (at least once).
                warn!(error = %e, name, "direct messages: delivered messages not removed");
                out.close(STORE_FAILED);
                return Round::Stop;
            }
            tokio::time::sleep(STORE_RETRY).await;
        }
        self.metrics
            .direct_messages
            .get_or_create(&crate::metrics::KindLabel { kind: "drained" })
            .inc_by(n);
        Round::More
    }

    /// Delivers `raw` from `from` to `to`, or queues it; returns the answer for the sender,
    /// if any (a delivered message gets none, as in the original).
    async fn send(&self, from: &str, to: &str, raw: Bytes) -> Option<Arc<Payload>> {
        // The WebSocket layer hands over valid UTF-8 only.
        let body = String::from_utf8_lossy(&raw);
        let mut delivery = {
            let mut slot = self.peers.lock(to).await;
            self.deliver_here(&mut slot, to, from, &body).await
        };
        if delivery == Delivery::NotHere
            && let Some(relay) = &self.relay
        {
            delivery = relay.deliver(to, from, &body).await;
        }
        let answer = match delivery {
            Delivery::Delivered => return None,
            Delivery::Full => self.full(to),
            Delivery::StoreFull => self.store_full(),
            Delivery::StoreDown => STORE_DOWN.into(),
            Delivery::NotHere => return Some(self.queue_offline(to, from, &body).await),
        };
        self.metrics.direct("refused");
        Some(wire::error(answer))
    }

    /// Delivers to `to` if it is logged in on this node: written to its connection, or
    /// queued behind its backlog (when older messages wait, or its connection has more
    /// than `live_bytes` unwritten) and its drain woken.
    async fn deliver_here(
        &self,
        slot: &mut SlotGuard<'_>,
        to: &str,
        from: &str,
        body: &str,
    ) -> Delivery {
        let Some(online) = &slot.online else {
            return Delivery::NotHere;
        };
        if online.outbound.closing().is_some() {
            // Going offline: the message waits in the queue for the next login.
            return Delivery::NotHere;
        }
        if !slot.backlog && online.outbound.queued_bytes() + body.len() <= self.live_bytes {
            if online.outbound.send(Payload::text(body.to_owned())).is_ok() {
                self.metrics.direct("delivered");
                return Delivery::Delivered;
            }
            return Delivery::NotHere;
        }
        let queue = match self.queue().await {
            Ok(q) => q,
            Err(e) => {
                warn!(error = %e, "direct messages: store unavailable");
                return Delivery::StoreDown;
            }
        };
        match queue.enqueue(to, from, body, self.bounds()).await {
            Ok(()) => {
                self.metrics.direct("spilled");
                online.wake.notify_one();
                slot.backlog = true;
                Delivery::Delivered
            }
            Err(QueueError::Full(_)) => Delivery::Full,
            Err(QueueError::StoreFull) => Delivery::StoreFull,
            Err(QueueError::Store(e)) => {
                warn!(error = %e, "direct messages: cannot queue a message");
                Delivery::StoreDown
            }
        }
    }

    fn full(&self, to: &str) -> String {
        format!(
            "the queue of {to} is full ({} messages): message not stored",
            self.config.queue_limit
        )
    }

    fn store_full(&self) -> String {
        format!(
            "the message store is full ({} bytes queued for offline peers): message not stored",
            self.config.store_bytes
        )
    }

    fn bounds(&self) -> QueueBounds {
        QueueBounds {
            per_recipient: self.config.queue_limit,
            store_bytes: self.config.store_bytes,
        }
    }

    /// `to` is logged in nowhere: queues the message if `to` is a known peer. The answer
    /// is the original's "connection closed" text once the message is committed. Runs
    /// without the peer's lock, so senders to one offline peer share the store's commits.
    async fn queue_offline(&self, to: &str, from: &str, body: &str) -> Arc<Payload> {
        let refused = |text: String| {
            self.metrics.direct("refused");
            wire::error(text)
        };
        let queue = match self.queue().await {
            Ok(q) => q,
            Err(e) => {
                warn!(error = %e, "direct messages: store unavailable");
                return refused(STORE_DOWN.into());
            }
        };
        match queue.is_known(to).await {
            Ok(true) => {}
            Ok(false) => {
                self.metrics.direct("refused");
                return wire::unknown_peer(to);
            }
            Err(e) => {
                warn!(error = %e, "direct messages: store unavailable");
                return refused(STORE_DOWN.into());
            }
        }
        match queue.enqueue(to, from, body, self.bounds()).await {
            Ok(()) => {
                self.metrics.direct("queued");
                // The store was written without the peer's lock: if it logged in meanwhile,
                // its drain may have found the queue empty already. Before the sender hears
                // (and sends its next message), the peer's new messages go behind this one.
                self.drain_if_online(to).await;
                if let Some(relay) = &self.relay {
                    relay.poke(to).await;
                }
                wire::offline_peer(to)
            }
            Err(QueueError::Full(_)) => refused(self.full(to)),
            Err(QueueError::StoreFull) => refused(self.store_full()),
            Err(QueueError::Store(e)) => {
                warn!(error = %e, "direct messages: cannot queue a message");
                refused(STORE_DOWN.into())
            }
        }
    }

    /// `conn` is gone: `name` is offline unless it logged in again elsewhere.
    async fn logout(&self, name: &str, conn: ConnId) {
        let mut slot = self.peers.lock(name).await;
        if slot.online.as_ref().is_some_and(|o| o.conn == conn) {
            slot.online = None;
            slot.backlog = false;
            self.metrics.direct_peers_online.dec();
            debug!(conn = conn.0, name, "logged out");
            if let Some(relay) = &self.relay {
                relay.release(name).await;
            }
        }
    }

    /// Cluster mode: another node's sender wrote to `to`, which it found logged in here.
    async fn deliver_from_node(&self, to: &str, from: &str, raw: &str) -> Delivery {
        let mut slot = self.peers.lock(to).await;
        self.deliver_here(&mut slot, to, from, raw).await
    }

    /// Cluster mode, after (re)connecting to Redis: every peer online here is written back.
    /// Messages for them may have been queued meanwhile by nodes that found no listener
    /// here, so each one's new messages go behind its queue (this runs before any frame of
    /// the new subscription is handled).
    async fn reclaim_all(&self, relay: &cluster::Relay) {
        for name in self.peers.names() {
            if self.peers.lock(&name).await.online.is_some() {
                relay.reclaim(&name).await;
                self.drain_if_online(&name).await;
            }
        }
    }

    /// A message was queued for `to` (here, or on another node in cluster mode); if `to` is
    /// logged in here, its new messages go behind the queue and its drain is woken.
    async fn drain_if_online(&self, to: &str) {
        let mut slot = self.peers.lock(to).await;
        if let Some(online) = &slot.online {
            online.wake.notify_one();
            slot.backlog = true;
        }
    }

    /// Cluster mode: `to` logged in on another node, which takes over.
    async fn taken_over(&self, to: &str) {
        let mut slot = self.peers.lock(to).await;
        if let Some(old) = slot.online.take() {
            slot.backlog = false;
            self.metrics.direct_peers_online.dec();
            replace(&old, to);
        }
    }
}

/// The drain task of one logged-in connection: delivers `name`'s queue, oldest first,
/// whenever it is woken (at login, when a message spills into the queue, when another node
/// queued one), until the connection is gone or replaced. A cycle holds the peer's drain
/// gate here and, in cluster mode, a lease in Redis, so two connections never deliver the
/// same queued message.
async fn drain(app: App, name: Arc<str>, conn: ConnId, out: Outbound, wake: Arc<Notify>) {
    let m = &app.messages;
    let Ok(queue) = m.queue().await else {
        // The login registered the peer, so the store opened; it cannot be gone now.
        return;
    };
    loop {
        let gate = m.peers.lock(&name).await.drain_gate.clone();
        let round = {
            let _cycle = gate.lock().await;
            if let Some(relay) = &m.relay {
                relay.drain_lease(&name).await;
            }
            let round = loop {
                match m.drain_round(queue, &name, conn, &out).await {
                    Round::More => continue,
                    other => break other,
                }
            };
            if let Some(relay) = &m.relay {
                relay.drain_done(&name).await;
            }
            round
        };
        if let Round::Stop = round {
            return;
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = out.closed() => return,
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
