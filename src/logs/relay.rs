//! Cluster mode: every node's live entries reach the listeners of every node.
//!
//! Owns the Redis channel `{prefix}logs:live`. A node publishes the entries posted to it
//! (already stamped: `serverTime` and `seqNumber` are the receiving node's), a few hundred
//! per message; every other node adds them to its own live stream, as if posted there, but
//! does not store them (the node that received them did). Best effort, like the live stream
//! itself: what cannot be published (Redis down, too slow) is counted in
//! `cluster_dropped_total` and is still in the store.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use redis::aio::ConnectionManager;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::entry::{Entry, parse_body};
use super::stream::Stream;
use crate::config::ClusterConfig;
use crate::metrics::Metrics;

/// Entries waiting to be published, at most (then they are dropped and counted).
pub const QUEUE: usize = 20_000;

/// Entries per published message, at most.
const BATCH: usize = 500;

/// This node's side of the channel.
#[derive(Debug)]
pub struct Relay {
    node: String,
    channel: String,
    client: redis::Client,
}

impl Relay {
    pub fn new(config: &ClusterConfig) -> Option<Relay> {
        Some(Relay {
            node: uuid::Uuid::new_v4().simple().to_string(),
            channel: format!("{}logs:live", config.prefix),
            client: redis::Client::open(config.redis_url.as_str()).ok()?,
        })
    }

    /// Runs the publisher and the subscriber until shutdown.
    pub async fn run(
        self,
        rx: mpsc::Receiver<Arc<Entry>>,
        stream: Arc<Stream>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) {
        let relay = Arc::new(self);
        let publisher = tokio::spawn(relay.clone().publish(rx, metrics, shutdown.clone()));
        relay.subscribe(stream, shutdown).await;
        // Ends on its own at shutdown; a panic there was logged already.
        let _ = publisher.await;
    }

    async fn publish(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<Arc<Entry>>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) {
        let mut cmd: Option<ConnectionManager> = None;
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return,
                e = rx.recv() => e,
            };
            let Some(first) = first else { return };
            batch.push(first);
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(e) => batch.push(e),
                    Err(_) => break,
                }
            }
            let mut payload = format!("{}\n[", self.node);
            for (i, e) in batch.iter().enumerate() {
                if i > 0 {
                    payload.push(',');
                }
                payload.push_str(&e.to_json());
            }
            payload.push(']');
            if cmd.is_none() {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_response_timeout(Some(Duration::from_secs(2)));
                cmd = ConnectionManager::new_with_config(self.client.clone(), config)
                    .await
                    .ok();
            }
            let sent = match cmd.as_mut() {
                Some(c) => redis::cmd("PUBLISH")
                    .arg(&self.channel)
                    .arg(payload)
                    .query_async::<i64>(c)
                    .await
                    .is_ok(),
                None => false,
            };
            if !sent {
                metrics.cluster_dropped.inc_by(batch.len() as u64);
                debug!(
                    entries = batch.len(),
                    "logs: live entries not published to the cluster"
                );
            }
            batch.clear();
        }
    }

    async fn subscribe(&self, stream: Arc<Stream>, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let subscribed = async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(&self.channel).await?;
                redis::RedisResult::Ok(pubsub)
            };
            let pubsub = tokio::select! {
                _ = shutdown.cancelled() => return,
                s = subscribed => s,
            };
            match pubsub {
                Ok(pubsub) => {
                    info!("logs: following the other nodes' live entries");
                    backoff = Duration::from_millis(100);
                    let mut messages = pubsub.into_on_message();
                    loop {
                        let msg = tokio::select! {
                            _ = shutdown.cancelled() => return,
                            m = messages.next() => m,
                        };
                        let Some(msg) = msg else { break };
                        match decode(msg.get_payload_bytes(), &self.node) {
                            Some(entries) => stream.relay_in(entries),
                            None => debug!("logs: an unreadable message on the cluster channel"),
                        }
                    }
                    warn!("logs: lost the cluster channel; reconnecting");
                }
                Err(e) => warn!(error = %e, "logs: cannot subscribe to the cluster channel"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

/// Another node's entries (none for this node's own messages, `None` if unreadable).
fn decode(payload: &[u8], own: &str) -> Option<Vec<Arc<Entry>>> {
    let text = std::str::from_utf8(payload).ok()?;
    let (node, array) = text.split_once('\n')?;
    if node == own {
        return Some(Vec::new());
    }
    let stamps: Vec<serde_json::Value> = serde_json::from_str(array).ok()?;
    let posted = parse_body(array.as_bytes()).ok()?;
    if stamps.len() != posted.len() {
        return None;
    }
    stamps
        .iter()
        .zip(posted)
        .map(|(v, posted)| {
            Some(Arc::new(Entry {
                seq: v["seqNumber"].as_i64()?,
                server_time: v["serverTime"].as_i64()?,
                posted,
            }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::entry::Posted;

    #[test]
    fn entries_cross_unchanged_and_a_node_skips_its_own() {
        let e = Entry {
            seq: 42,
            server_time: 1_700_000_000_123,
            posted: Posted {
                client_time: Some(1_700_000_000_000),
                level: Some("Warn".into()),
                msg: Some("m \"quoted\"".into()),
                text: Some("t".into()),
                user: Some("Hunter".into()),
                room: Some("r".into()),
                from_server: false,
            },
        };
        let payload = format!("other\n[{}]", e.to_json());
        let got = decode(payload.as_bytes(), "me").unwrap();
        assert_eq!(*got[0], e);
        assert!(decode(payload.as_bytes(), "other").unwrap().is_empty());
        assert!(decode(b"other\n[{\"seqNumber\":1}]", "me").is_none());
        assert!(decode(b"garbage", "me").is_none());
    }
}
