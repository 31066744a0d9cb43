//! Cluster mode: several nodes share their sessions over Redis and behave as one.
//!
//! Owns everything Redis: the connection, the names, node liveness and the resync after an
//! outage; the hub and the front-ends know only the [`Link`] outbox. Protocol-agnostic:
//! payloads cross nodes as opaque bytes.
//!
//! How it works (every name under `--redis-prefix`):
//! - A node subscribes to the channel `s:{session}` of each session it has members in, and
//!   only those, so it receives the pushes and reports of its own sessions and nothing else.
//! - A push whose audience has members on other nodes is published on the session's
//!   channel ([`wire`]); the other nodes deliver it to their local members.
//! - Each node writes its members of a session (members, leaders, a version) into the hash
//!   `m:{session}` and publishes the same report on the channel. A node that joins a session
//!   subscribes first, then reads the hash, so it misses no report; versions make the order
//!   of reports and reads irrelevant. Presence is local members plus every other node's.
//! - Liveness: each node is in the set `nodes` and refreshes a key `node:{id}` (holding the
//!   node's name) that expires after `--node-timeout-ms`; every node checks the others at a third of that. The first
//!   to see a node's key gone removes it from the set and from every session it was in
//!   (`node:{id}:sessions`), then publishes `gone {id}` on `ctl`; every node forgets it and
//!   announces the corrected presence.
//! - Outage: while Redis is unreachable, local delivery goes on (with the last known
//!   counts), forwards are dropped and counted, and the node retries with backoff. Once
//!   back, it registers again under the same id, resubscribes and rewrites every session it
//!   serves, so a Redis that restarted empty is refilled by the nodes themselves. What it
//!   knew of other nodes stays counted until they confirm it or the node timeout passes.
//!   A clean shutdown removes the node at once.
//! - Questions to every node (the admin API's): [`peers`], on the same connections.

pub mod peers;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use redis::{AsyncConnectionConfig, RedisError, RedisResult};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, warn};

use crate::config::ClusterConfig;
use crate::core::hub::{NodeId, Presence, Remote};
use crate::core::link::{Forward, Link};
use crate::core::outbound::Payload;
use crate::server::App;
use peers::Peers;
use wire::{Message, node_text};

/// Forwards published per round trip at most.
const MAX_BATCH: usize = 1024;
/// Channels per SUBSCRIBE command at most.
const SUBSCRIBE_CHUNK: usize = 512;

/// Redis names, under the configured prefix.
#[derive(Debug)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn session_channel(&self, session: &str) -> String {
        format!("{}s:{session}", self.prefix)
    }
    fn members(&self, session: &str) -> String {
        format!("{}m:{session}", self.prefix)
    }
    fn control(&self) -> String {
        format!("{}ctl", self.prefix)
    }
    fn nodes(&self) -> String {
        format!("{}nodes", self.prefix)
    }
    fn alive(&self, node: NodeId) -> String {
        format!("{}node:{}", self.prefix, node_text(node))
    }
    fn node_sessions(&self, node: NodeId) -> String {
        format!("{}node:{}:sessions", self.prefix, node_text(node))
    }
}

/// Versions of this process's reports: increasing across epochs.
fn next_version() -> u64 {
    static VERSION: AtomicU64 = AtomicU64::new(1);
    VERSION.fetch_add(1, Ordering::Relaxed)
}

/// Nodes declared dead: entries of theirs read from a hash are ignored. A report the node
/// publishes itself proves it alive again (it was cut off, not dead).
type Dead = Arc<Mutex<HashSet<NodeId>>>;

fn is_dead(dead: &Dead, node: NodeId) -> bool {
    dead.lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(&node)
}

fn timed_out() -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "Redis did not answer in time",
    ))
}

async fn within<T>(limit: Duration, f: impl Future<Output = RedisResult<T>>) -> RedisResult<T> {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| Err(timed_out()))
}

/// Runs this node's side of the cluster until shutdown: connects, serves, and reconnects
/// after every outage.
pub async fn run(app: App, config: ClusterConfig) {
    let (Some(link), Some(peers)) = (app.hub.link().cloned(), app.peers.clone()) else {
        return;
    };
    let client = match redis::Client::open(config.redis_url.as_str()) {
        Ok(c) => c,
        Err(e) => {
            // The configuration was checked at start; this cannot happen.
            warn!(error = %e, "invalid Redis URL: cluster mode off");
            return;
        }
    };
    let keys = Arc::new(Keys {
        prefix: config.prefix.clone(),
    });
    let dead: Dead = Arc::default();
    let mut backoff = Duration::from_millis(100);
    // An outage starts when a connection is lost, or when the first one fails.
    let mut in_outage = false;
    loop {
        let started = tokio::time::Instant::now();
        let result = Epoch::connect(&app, &link, &peers, &client, &config, &keys, &dead).await;
        let error = match result {
            Ok(mut epoch) => match epoch.serve().await {
                Ok(()) => return,
                Err(e) => e,
            },
            Err(e) => e,
        };
        if app.shutdown.is_cancelled() {
            return;
        }
        if link.is_up() || !in_outage {
            warn!(error = %error, "Redis unreachable: serving local members only until it is back");
            app.metrics.redis_outages.inc();
            in_outage = true;
        } else {
            debug!(error = %error, "Redis still unreachable");
        }
        link.set_up(false);
        peers.set_connection(None);
        app.metrics.redis_up.set(0);
        app.metrics.cluster_nodes.set(0);
        link.drop_forwards();
        app.hub.sync_all_local();
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100);
        }
        tokio::select! {
            _ = app.shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One connection to Redis.
struct Epoch {
    app: App,
    link: Arc<Link>,
    peers: Peers,
    keys: Arc<Keys>,
    node: NodeId,
    node_text: String,
    timeout: Duration,
    /// Time allowed for one answer.
    answer: Duration,
    cmd: MultiplexedConnection,
    sink: PubSubSink,
    /// Sessions whose channel this epoch subscribed to.
    subscribed: HashSet<Arc<str>>,
    dead: Dead,
    /// Cancelled by the subscriber task when its connection ends or when this node was
    /// declared dead by another.
    lost: CancellationToken,
    _dispatch: AbortOnDropHandle<()>,
}

impl Epoch {
    async fn connect(
        app: &App,
        link: &Arc<Link>,
        peers: &Peers,
        client: &redis::Client,
        config: &ClusterConfig,
        keys: &Arc<Keys>,
        dead: &Dead,
    ) -> RedisResult<Epoch> {
        let node = peers.node();
        let answer = peers::answer_time(config.node_timeout);
        let settings = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(answer))
            .set_response_timeout(Some(answer));
        let cmd = client
            .get_multiplexed_async_connection_with_config(&settings)
            .await?;
        let (mut sink, stream) = within(answer, client.get_async_pubsub()).await?.split();
        within(
            answer,
            sink.subscribe(vec![keys.control(), peers.ask_channel()]),
        )
        .await?;
        within(answer, sink.psubscribe(peers.reply_pattern())).await?;
        let lost = CancellationToken::new();
        let dispatch = tokio::spawn(dispatch(
            stream,
            app.clone(),
            peers.clone(),
            keys.clone(),
            dead.clone(),
            lost.clone(),
        ));
        let mut epoch = Epoch {
            app: app.clone(),
            link: link.clone(),
            peers: peers.clone(),
            keys: keys.clone(),
            node,
            node_text: node_text(node),
            timeout: config.node_timeout,
            answer,
            cmd,
            sink,
            subscribed: HashSet::new(),
            dead: dead.clone(),
            lost,
            _dispatch: AbortOnDropHandle::new(dispatch),
        };
        // The key first, so that no other node sees this node listed without it.
        redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(keys.alive(node))
            .arg(peers.name())
            .arg("PX")
            .arg(epoch.timeout.as_millis() as u64)
            .ignore()
            .cmd("SADD")
            .arg(keys.nodes())
            .arg(&epoch.node_text)
            .ignore()
            .query_async::<()>(&mut epoch.cmd)
            .await?;
        Ok(epoch)
    }

    /// Serves until shutdown (Ok) or until the connection is lost (Err).
    async fn serve(&mut self) -> RedisResult<()> {
        self.link.set_up(true);
        self.peers.set_connection(Some(self.cmd.clone()));
        self.app.metrics.redis_up.set(1);
        info!(node = %self.node_text, "connected to Redis: cluster mode on");
        // Every session this node serves is new to this epoch: subscribe, report, read.
        for id in self.app.hub.ids() {
            self.link.changed(&id);
        }
        // Other nodes have this long to confirm what this node knew of them.
        let stale_deadline = tokio::time::sleep(self.timeout);
        tokio::pin!(stale_deadline);
        let mut stale_pending = true;
        let mut beat = tokio::time::interval(self.timeout / 3);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.app.shutdown.cancelled() => {
                    let node = self.node;
                    if let Err(e) = self.reap(node).await {
                        debug!(error = %e, "leaving the cluster cleanly failed");
                    }
                    return Ok(());
                }
                _ = self.lost.cancelled() => {
                    return Err(RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "subscription connection lost, or this node was declared dead",
                    )));
                }
                _ = &mut stale_deadline, if stale_pending => {
                    stale_pending = false;
                    for id in self.app.hub.ids() {
                        self.app.hub.drop_stale(&id);
                    }
                }
                _ = beat.tick() => {
                    self.heartbeat().await?;
                    // A safety net: a session still waiting for its first read (which
                    // holds its members' sessionstate) is read again.
                    for id in self.app.hub.ids() {
                        if self.app.hub.is_unsynced(&id) {
                            self.link.changed(&id);
                        }
                    }
                }
                work = self.link.next(MAX_BATCH) => {
                    if !work.changed.is_empty() {
                        self.sync_sessions(work.changed).await?;
                    }
                    if !work.forwards.is_empty() {
                        self.publish(work.forwards).await?;
                    }
                }
            }
        }
    }

    /// Refreshes this node's key, and removes the nodes whose key expired.
    async fn heartbeat(&mut self) -> RedisResult<()> {
        let (_, nodes): ((), Vec<String>) = redis::pipe()
            .cmd("SET")
            .arg(self.keys.alive(self.node))
            .arg(self.peers.name())
            .arg("PX")
            .arg(self.timeout.as_millis() as u64)
            .cmd("SMEMBERS")
            .arg(self.keys.nodes())
            .query_async(&mut self.cmd)
            .await?;
        let others: Vec<NodeId> = nodes
            .iter()
            .filter_map(|n| wire::parse_node_text(n))
            .filter(|n| *n != self.node)
            .collect();
        let mut pipe = redis::pipe();
        for n in &others {
            pipe.cmd("EXISTS").arg(self.keys.alive(*n));
        }
        let alive: Vec<bool> = if others.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(&mut self.cmd).await?
        };
        let mut live = 1;
        for (node, alive) in others.iter().zip(alive) {
            if alive {
                live += 1;
            } else {
                self.reap(*node).await?;
            }
        }
        self.app.metrics.cluster_nodes.set(live);
        Ok(())
    }

    /// Removes a dead node (or this one, leaving) from the cluster: from the node set,
    /// from every session it was in, and tells every node. Only the node that takes it out
    /// of the set does the rest, once.
    async fn reap(&mut self, node: NodeId) -> RedisResult<()> {
        let text = node_text(node);
        let removed: i64 = redis::cmd("SREM")
            .arg(self.keys.nodes())
            .arg(&text)
            .query_async(&mut self.cmd)
            .await?;
        if removed == 0 {
            return Ok(());
        }
        let sessions: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.keys.node_sessions(node))
            .query_async(&mut self.cmd)
            .await?;
        let mut pipe = redis::pipe();
        for s in &sessions {
            pipe.cmd("HDEL")
                .arg(self.keys.members(s))
                .arg(&text)
                .ignore();
        }
        pipe.cmd("DEL")
            .arg(self.keys.node_sessions(node))
            .arg(self.keys.alive(node))
            .ignore()
            .cmd("PUBLISH")
            .arg(self.keys.control())
            .arg(format!("gone {text}"))
            .ignore()
            .query_async::<()>(&mut self.cmd)
            .await?;
        if node != self.node {
            self.app.metrics.cluster_nodes_reaped.inc();
            info!(node = %text, sessions = sessions.len(), "removed a dead node from the cluster");
        }
        Ok(())
    }

    /// Reports this node's members of each changed session, subscribing to the sessions it
    /// joined, reading what the other nodes reported for every session that waits for it,
    /// and unsubscribing from those it left.
    async fn sync_sessions(&mut self, changed: Vec<Arc<str>>) -> RedisResult<()> {
        let hub = &self.app.hub;
        let (mut joined, mut unsynced, mut reports, mut left) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for id in changed {
            let local = hub.local_presence(&id);
            if local.members > 0 {
                let new_here = !self.subscribed.contains(&id);
                // Also a session emptied and created again here before this batch: still
                // subscribed, but the new session has not read the other nodes yet.
                if new_here || hub.is_unsynced(&id) {
                    hub.unsync(&id);
                    unsynced.push(id.clone());
                }
                if new_here {
                    joined.push(id.clone());
                }
                reports.push((id, local));
            } else if self.subscribed.remove(&id) {
                left.push(id);
            }
        }
        // Subscribe before reading: no report published after the read can be missed.
        for chunk in joined.chunks(SUBSCRIBE_CHUNK) {
            let names: Vec<String> = chunk
                .iter()
                .map(|id| self.keys.session_channel(id))
                .collect();
            within(self.answer, self.sink.subscribe(names)).await?;
        }
        self.subscribed.extend(joined.iter().cloned());
        let left_channels: Vec<String> = left
            .iter()
            .map(|id| self.keys.session_channel(id))
            .collect();
        let mut pipe = redis::pipe();
        let sessions = self.keys.node_sessions(self.node);
        let gone = left.into_iter().map(|id| (id, Presence::default()));
        for (id, presence) in reports.into_iter().chain(gone) {
            let remote = Remote {
                presence,
                version: next_version(),
            };
            if presence.members > 0 {
                pipe.cmd("HSET")
                    .arg(self.keys.members(&id))
                    .arg(&self.node_text)
                    .arg(wire::report_text(remote))
                    .ignore()
                    .cmd("SADD")
                    .arg(&sessions)
                    .arg(&*id)
                    .ignore();
            } else {
                pipe.cmd("HDEL")
                    .arg(self.keys.members(&id))
                    .arg(&self.node_text)
                    .ignore()
                    .cmd("SREM")
                    .arg(&sessions)
                    .arg(&*id)
                    .ignore();
            }
            pipe.cmd("PUBLISH")
                .arg(self.keys.session_channel(&id))
                .arg(wire::report(self.node, remote))
                .ignore();
        }
        for id in &unsynced {
            pipe.cmd("HGETALL").arg(self.keys.members(id));
        }
        let reads: Vec<HashMap<String, String>> = pipe.query_async(&mut self.cmd).await?;
        for (id, read) in unsynced.iter().zip(reads) {
            let remotes: Vec<(NodeId, Remote)> = read
                .iter()
                .filter_map(|(node, report)| {
                    Some((
                        wire::parse_node_text(node)?,
                        wire::parse_report_text(report)?,
                    ))
                })
                .filter(|(node, _)| *node != self.node && !is_dead(&self.dead, *node))
                .collect();
            hub.sync_remote(id, &remotes);
        }
        for chunk in left_channels.chunks(SUBSCRIBE_CHUNK) {
            within(self.answer, self.sink.unsubscribe(chunk)).await?;
        }
        Ok(())
    }

    /// Publishes forwards for members on other nodes, in one round trip.
    async fn publish(&mut self, forwards: Vec<Forward>) -> RedisResult<()> {
        let mut pipe = redis::pipe();
        for f in &forwards {
            pipe.cmd("PUBLISH")
                .arg(self.keys.session_channel(&f.session))
                .arg(wire::push(
                    self.node,
                    f.audience,
                    f.payload.is_binary(),
                    f.payload.data(),
                ))
                .ignore();
        }
        let n = forwards.len() as u64;
        match pipe.query_async::<()>(&mut self.cmd).await {
            Ok(()) => {
                self.app.metrics.cluster_forwarded.inc_by(n);
                Ok(())
            }
            Err(e) => {
                self.app.metrics.cluster_dropped.inc_by(n);
                Err(e)
            }
        }
    }
}

/// Delivers what other nodes publish, until the subscription connection ends.
async fn dispatch(
    mut stream: PubSubStream,
    app: App,
    peers: Peers,
    keys: Arc<Keys>,
    dead: Dead,
    lost: CancellationToken,
) {
    let node = peers.node();
    let control = keys.control();
    let ask = peers.ask_channel();
    let session_prefix = keys.session_channel("");
    while let Some(msg) = stream.next().await {
        let channel = msg.get_channel_name();
        if msg.from_pattern() {
            peers.on_answer(channel, msg.get_payload_bytes());
            continue;
        }
        if channel == ask {
            peers.on_question(&app, msg.get_payload_bytes());
            continue;
        }
        if channel == control {
            let gone = std::str::from_utf8(msg.get_payload_bytes())
                .ok()
                .and_then(|t| t.strip_prefix("gone "))
                .and_then(wire::parse_node_text);
            match gone {
                // Its own removal, as it shuts down.
                Some(n) if n == node && app.shutdown.is_cancelled() => break,
                Some(n) if n == node => {
                    warn!(
                        "this node was declared dead by another (it was silent too long): rejoining"
                    );
                    break;
                }
                Some(n) => {
                    dead.lock().unwrap_or_else(|e| e.into_inner()).insert(n);
                    app.hub.node_gone(n);
                }
                None => debug!("unknown control message"),
            }
            continue;
        }
        let Some(session) = channel.strip_prefix(&session_prefix) else {
            continue;
        };
        match wire::decode(msg.get_payload_bytes()) {
            Some(Message::Push {
                node: from,
                audience,
                binary,
                data,
            }) if from != node => {
                let payload = Payload::relayed(data, binary, std::time::Instant::now());
                app.metrics.cluster_received.inc();
                app.hub.deliver_remote(session, &payload, audience);
            }
            Some(Message::Report { node: from, remote }) if from != node => {
                dead.lock().unwrap_or_else(|e| e.into_inner()).remove(&from);
                app.hub.update_remote(session, from, remote);
            }
            Some(_) => {}
            None => debug!(channel, "malformed cluster message ignored"),
        }
    }
    lost.cancel();
}
