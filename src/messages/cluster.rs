//! Direct messages across the nodes of a cluster, over Redis.
//!
//! Owns where each online peer is: the key `{prefix}dm:peer:{name}` names the node it is
//! logged in on, and every node listens on its own channel `{prefix}dm:node:{node}`. A
//! sender's node publishes the message there; a node that finds nobody listening (a dead
//! node, a stale key) queues the message in the shared store (PostgreSQL) instead. After
//! queueing, a node pokes the recipient's node, if any, so a peer that logged in elsewhere
//! meanwhile drains its queue. A login claims the key and tells the node that held it to
//! close its older connection. Frames on a node channel: `m\n{to}\n{from}\n{raw}` (deliver),
//! `p\n{to}` (drain the queue), `t\n{to}` (taken over).

use std::time::Duration;

use futures::StreamExt;
use redis::aio::ConnectionManager;
use tokio::sync::OnceCell;
use tracing::{debug, info, warn};

use crate::config::ClusterConfig;
use crate::server::App;

/// One node's link to the others.
#[derive(Debug)]
pub struct Relay {
    /// This node's id, as in the channel name.
    node: String,
    prefix: String,
    /// Commands; reconnects by itself.
    cmd: OnceCell<ConnectionManager>,
    client: redis::Client,
}

/// What a node channel carries.
#[derive(Debug, PartialEq, Eq)]
enum Frame<'a> {
    Deliver {
        to: &'a str,
        from: &'a str,
        raw: &'a str,
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
            let (to, rest) = rest.split_once('\n')?;
            let (from, raw) = rest.split_once('\n')?;
            Some(Frame::Deliver { to, from, raw })
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

    /// Hands `raw` to the node `to` is logged in on; false if it is on none (or Redis is
    /// unreachable), and the message must be queued.
    pub async fn deliver(&self, to: &str, from: &str, raw: &str) -> bool {
        let Ok(mut cmd) = self.cmd().await else {
            return false;
        };
        let Some(node) = self.elsewhere(&mut cmd, to).await else {
            return false;
        };
        let listeners: redis::RedisResult<i64> = redis::cmd("PUBLISH")
            .arg(self.channel(&node))
            .arg(format!("m\n{to}\n{from}\n{raw}"))
            .query_async(&mut cmd)
            .await;
        matches!(listeners, Ok(n) if n > 0)
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
                    let Ok(payload) = std::str::from_utf8(msg.get_payload_bytes()) else {
                        continue;
                    };
                    match decode(payload) {
                        Some(frame) => on_frame(&app, frame).await,
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

async fn on_frame(app: &App, frame: Frame<'_>) {
    let m = &app.messages;
    match frame {
        Frame::Deliver { to, from, raw } => m.deliver_from_node(to, from, raw).await,
        Frame::Poke { to } => m.drain_if_online(to).await,
        Frame::TakenOver { to } => m.taken_over(to).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames() {
        assert_eq!(
            decode("m\nB\nA\n{\"x\":\"a\nb\"}"),
            Some(Frame::Deliver {
                to: "B",
                from: "A",
                raw: "{\"x\":\"a\nb\"}"
            })
        );
        assert_eq!(decode("p\nB"), Some(Frame::Poke { to: "B" }));
        assert_eq!(decode("t\nB"), Some(Frame::TakenOver { to: "B" }));
        assert_eq!(decode("x\nB"), None);
        assert_eq!(decode("m\nB"), None);
    }
}
