//! Direct messages across the nodes of a cluster, over Redis.
//!
//! Owns where each online peer is: the key `{prefix}dm:peer:{name}` names the node it is
//! logged in on, and every node listens on its own channel `{prefix}dm:node:{node}`. A
//! sender's node publishes the message there and waits for that node's answer (delivered,
//! not logged in here, queue full, store down); a node that gets no answer (a dead node)
//! or "not here" (a stale key) queues the message in the shared store (PostgreSQL) instead.
//! After queueing, a node pokes the recipient's node, if any, so a peer that logged in
//! elsewhere meanwhile drains its queue. A login claims the key and tells the node that held
//! it to close its older connection. Frames on a node channel:
//! `m\n{node}\n{id}\n{to}\n{from}\n{raw}` (deliver, answer to `node` under `id`),
//! `a\n{id}\n{d|n|f|s}` (the answer), `p\n{to}` (drain the queue), `t\n{to}` (taken over).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use redis::aio::ConnectionManager;
use tokio::sync::{OnceCell, oneshot};
use tracing::{debug, info, warn};

use super::Delivery;
use crate::config::ClusterConfig;
use crate::server::App;

/// How long a sender's node waits for the recipient's node to answer before it takes the
/// recipient for gone and queues the message itself.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// One node's link to the others.
#[derive(Debug)]
pub struct Relay {
    /// This node's id, as in the channel name.
    node: String,
    prefix: String,
    /// Commands; reconnects by itself.
    cmd: OnceCell<ConnectionManager>,
    client: redis::Client,
    /// Deliveries waiting for the other node's answer, by id. A std mutex, held for one
    /// map operation.
    waiting: Mutex<HashMap<u64, oneshot::Sender<Delivery>>>,
    next_id: AtomicU64,
}

/// What a node channel carries.
#[derive(Debug, PartialEq, Eq)]
enum Frame<'a> {
    Deliver {
        node: &'a str,
        id: u64,
        to: &'a str,
        from: &'a str,
        raw: &'a str,
    },
    Answer {
        id: u64,
        delivery: Delivery,
    },
    Poke {
        to: &'a str,
    },
    TakenOver {
        to: &'a str,
    },
}

fn decode(payload: &str) -> Option<Frame<'_>> {
    let (kind, rest) = payload.split_once('\n')?;
    match kind {
        "m" => {
            let (node, rest) = rest.split_once('\n')?;
            let (id, rest) = rest.split_once('\n')?;
            let (to, rest) = rest.split_once('\n')?;
            let (from, raw) = rest.split_once('\n')?;
            Some(Frame::Deliver {
                node,
                id: id.parse().ok()?,
                to,
                from,
                raw,
            })
        }
        "a" => {
            let (id, delivery) = rest.split_once('\n')?;
            let delivery = match delivery {
                "d" => Delivery::Delivered,
                "n" => Delivery::NotHere,
                "f" => Delivery::Full,
                "b" => Delivery::StoreFull,
                "s" => Delivery::StoreDown,
                _ => return None,
            };
            Some(Frame::Answer {
                id: id.parse().ok()?,
                delivery,
            })
        }
        "p" => Some(Frame::Poke { to: rest }),
        "t" => Some(Frame::TakenOver { to: rest }),
        _ => None,
    }
}

/// How long a drain lease lasts if its node dies holding it, in ms.
const DRAIN_LEASE_MS: u64 = 35_000;

/// Compare-and-delete: a node releases a key only if it still holds it.
const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                       return redis.call('DEL', KEYS[1]) else return 0 end";

impl Relay {
    pub fn new(config: &ClusterConfig) -> Option<Relay> {
        let client = redis::Client::open(config.redis_url.as_str()).ok()?;
        Some(Relay {
            node: uuid::Uuid::new_v4().simple().to_string(),
            prefix: config.prefix.clone(),
            cmd: OnceCell::new(),
            client,
            waiting: Mutex::default(),
            next_id: AtomicU64::new(1),
        })
    }

    fn peer_key(&self, name: &str) -> String {
        format!("{}dm:peer:{name}", self.prefix)
    }

    fn channel(&self, node: &str) -> String {
        format!("{}dm:node:{node}", self.prefix)
    }

    async fn cmd(&self) -> redis::RedisResult<ConnectionManager> {
        self.cmd
            .get_or_try_init(|| {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_response_timeout(Some(Duration::from_secs(2)));
                ConnectionManager::new_with_config(self.client.clone(), config)
            })
            .await
            .cloned()
    }

    /// `name` logged in here: claims it, and tells the node that had it, if another.
    pub async fn claim(&self, name: &str) {
        let result: redis::RedisResult<()> = async {
            let mut cmd = self.cmd().await?;
            let old: Option<String> = redis::cmd("SET")
                .arg(self.peer_key(name))
                .arg(&self.node)
                .arg("GET")
                .query_async(&mut cmd)
                .await?;
            if let Some(old) = old.filter(|o| *o != self.node) {
                let _: i64 = redis::cmd("PUBLISH")
                    .arg(self.channel(&old))
                    .arg(format!("t\n{name}"))
                    .query_async(&mut cmd)
                    .await?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            warn!(error = %e, name, "direct messages: cannot claim a peer in Redis");
        }
    }

    /// After an outage (Redis may have restarted empty): `name`, online here, is written
    /// back unless it logged in on another node meanwhile.
    pub async fn reclaim(&self, name: &str) {
        // The command connection may still hold the socket Redis dropped: the first try
        // can fail while it reconnects.
        for _ in 0..5 {
            let done: redis::RedisResult<Option<String>> = async {
                let mut cmd = self.cmd().await?;
                redis::cmd("SET")
                    .arg(self.peer_key(name))
                    .arg(&self.node)
                    .arg("NX")
                    .query_async(&mut cmd)
                    .await
            }
            .await;
            if done.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        warn!(name, "direct messages: cannot write a peer back to Redis");
    }

    /// `name` left this node.
    pub async fn release(&self, name: &str) {
        let result: redis::RedisResult<i64> = async {
            let mut cmd = self.cmd().await?;
            redis::Script::new(RELEASE)
                .key(self.peer_key(name))
                .arg(&self.node)
                .invoke_async(&mut cmd)
                .await
        }
        .await;
        if let Err(e) = result {
            warn!(error = %e, name, "direct messages: cannot release a peer in Redis");
        }
    }

    fn drain_key(&self, name: &str) -> String {
        format!("{}dm:drain:{name}", self.prefix)
    }

    /// Waits (up to 10 s) for the right to drain `name`'s queue, so that two nodes never
    /// deliver the same queued message: a login on another node waits for the drain in
    /// progress to remove what it delivered. Without Redis, the drain goes ahead.
    pub async fn drain_lease(&self, name: &str) {
        let Ok(mut cmd) = self.cmd().await else {
            return;
        };
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < until {
            let set: redis::RedisResult<Option<String>> = redis::cmd("SET")
                .arg(self.drain_key(name))
                .arg(&self.node)
                .arg("NX")
                .arg("PX")
                .arg(DRAIN_LEASE_MS)
                .query_async(&mut cmd)
                .await;
            match set {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        warn!(
            name,
            "direct messages: another node's drain is stuck; draining anyway"
        );
    }

    /// The drain of `name` is over.
    pub async fn drain_done(&self, name: &str) {
        if let Ok(mut cmd) = self.cmd().await {
            let _: redis::RedisResult<i64> = redis::Script::new(RELEASE)
                .key(self.drain_key(name))
                .arg(&self.node)
                .invoke_async(&mut cmd)
                .await;
        }
    }

    /// The node `name` is logged in on, if another than this one.
    async fn elsewhere(&self, cmd: &mut ConnectionManager, name: &str) -> Option<String> {
        let node: Option<String> = redis::cmd("GET")
            .arg(self.peer_key(name))
            .query_async(cmd)
            .await
            .ok()?;
        node.filter(|n| *n != self.node)
    }

    /// Hands `raw` to the node `to` is logged in on and returns that node's answer;
    /// [`Delivery::NotHere`] if it is on none, the node does not answer in time, or Redis
    /// is unreachable: the message must then be queued here.
    pub async fn deliver(&self, to: &str, from: &str, raw: &str) -> Delivery {
        let Ok(mut cmd) = self.cmd().await else {
            return Delivery::NotHere;
        };
        let Some(node) = self.elsewhere(&mut cmd, to).await else {
            return Delivery::NotHere;
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiting().insert(id, tx);
        let frame = format!("m\n{}\n{id}\n{to}\n{from}\n{raw}", self.node);
        let listeners: redis::RedisResult<i64> = redis::cmd("PUBLISH")
            .arg(self.channel(&node))
            .arg(frame)
            .query_async(&mut cmd)
            .await;
        let answer = match listeners {
            Ok(n) if n > 0 => tokio::time::timeout(ANSWER_TIMEOUT, rx).await.ok(),
            _ => None,
        };
        self.waiting().remove(&id);
        match answer {
            Some(Ok(delivery)) => delivery,
            _ => {
                debug!(
                    to,
                    node, "direct messages: no answer from the recipient's node"
                );
                Delivery::NotHere
            }
        }
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Delivery>>> {
        // One map operation at a time: poisoning cannot leave it torn.
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells `node` what became of its delivery `id`.
    async fn answer(&self, node: &str, id: u64, delivery: Delivery) {
        let code = match delivery {
            Delivery::Delivered => "d",
            Delivery::NotHere => "n",
            Delivery::Full => "f",
            Delivery::StoreFull => "b",
            Delivery::StoreDown => "s",
        };
        let sent: redis::RedisResult<i64> = async {
            let mut cmd = self.cmd().await?;
            redis::cmd("PUBLISH")
                .arg(self.channel(node))
                .arg(format!("a\n{id}\n{code}"))
                .query_async(&mut cmd)
                .await
        }
        .await;
        if let Err(e) = sent {
            // The sender's node times out and queues the message itself.
            debug!(error = %e, "direct messages: cannot answer a delivery");
        }
    }

    /// A message was queued for `to`: if it logged in on another node meanwhile, that node
    /// drains its queue.
    pub async fn poke(&self, to: &str) {
        let Ok(mut cmd) = self.cmd().await else {
            return;
        };
        if let Some(node) = self.elsewhere(&mut cmd, to).await {
            let _: redis::RedisResult<i64> = redis::cmd("PUBLISH")
                .arg(self.channel(&node))
                .arg(format!("p\n{to}"))
                .query_async(&mut cmd)
                .await;
        }
    }
}

/// Listens on this node's channel until shutdown, resubscribing after every outage.
pub async fn run(app: App) {
    let Some(relay) = app.messages.relay() else {
        return;
    };
    let channel = relay.channel(&relay.node);
    let mut backoff = Duration::from_millis(100);
    loop {
        let subscribed = async {
            let mut pubsub = relay.client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            redis::RedisResult::Ok(pubsub)
        };
        let pubsub = tokio::select! {
            _ = app.shutdown.cancelled() => return,
            s = subscribed => s,
        };
        match pubsub {
            Ok(pubsub) => {
                info!(
                    node = relay.node,
                    "direct messages: listening for other nodes"
                );
                backoff = Duration::from_millis(100);
                app.messages.reclaim_all(relay).await;
                let mut stream = pubsub.into_on_message();
                loop {
                    let msg = tokio::select! {
                        _ = app.shutdown.cancelled() => return,
                        m = stream.next() => m,
                    };
                    let Some(msg) = msg else { break };
                    let Ok(payload) = String::from_utf8(msg.get_payload_bytes().to_vec()) else {
                        continue;
                    };
                    // Answers are handled here, so a delivery that waits for a peer's lock
                    // never holds up the answers this node's own senders wait for.
                    match decode(&payload) {
                        Some(Frame::Answer { id, delivery }) => {
                            if let Some(tx) = relay.waiting().remove(&id) {
                                // The sender may have timed out already.
                                let _ = tx.send(delivery);
                            }
                        }
                        // A poke marks the peer's queue as first before the frames after
                        // it (the sender's next message) are handled.
                        Some(Frame::Poke { to }) => app.messages.drain_if_online(to).await,
                        Some(_) => {
                            app.tracker.spawn(on_frame(app.clone(), payload));
                        }
                        None => debug!("direct messages: unknown frame from another node"),
                    }
                }
                warn!("direct messages: lost the Redis subscription; reconnecting");
            }
            Err(e) => warn!(error = %e, "direct messages: cannot subscribe in Redis"),
        }
        tokio::select! {
            _ = app.shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Acts on a frame from another node (not an answer).
async fn on_frame(app: App, payload: String) {
    let m = &app.messages;
    let Some(frame) = decode(&payload) else {
        return;
    };
    match frame {
        Frame::Deliver {
            node,
            id,
            to,
            from,
            raw,
        } => {
            let delivery = m.deliver_from_node(to, from, raw).await;
            if let Some(relay) = m.relay() {
                relay.answer(node, id, delivery).await;
            }
        }
        Frame::Answer { .. } => {}
        Frame::Poke { .. } => {}
        Frame::TakenOver { to } => m.taken_over(to).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames() {
        assert_eq!(
            decode("m\nn1\n7\nB\nA\n{\"x\":\"a\nb\"}"),
            Some(Frame::Deliver {
                node: "n1",
                id: 7,
                to: "B",
                from: "A",
                raw: "{\"x\":\"a\nb\"}"
            })
        );
        assert_eq!(
            decode("a\n7\nf"),
            Some(Frame::Answer {
                id: 7,
                delivery: Delivery::Full
            })
        );
        assert_eq!(decode("a\n7\nx"), None);
        assert_eq!(decode("p\nB"), Some(Frame::Poke { to: "B" }));
        assert_eq!(decode("t\nB"), Some(Frame::TakenOver { to: "B" }));
        assert_eq!(decode("x\nB"), None);
        assert_eq!(decode("m\nB"), None);
    }
}
