//! The direct-message queue in Redis, for a cluster without PostgreSQL: every node shares
//! the known peers and the queue through the same Redis that shares the sessions.
//!
//! Owns the keys `{prefix}dm:known` (a set of the names that ever logged in) and
//! `{prefix}dm:q:{name}` (a stream per recipient, oldest first). Durability is Redis's own:
//! with `appendonly yes` and `appendfsync always` a queued message is on Redis's disk before
//! Redis answers, and so before the sender hears it was queued; without persistence a Redis
//! restart loses the queue, which [`RedisQueue::open`] warns about.

use std::time::Duration;

use redis::aio::ConnectionManager;
use tracing::warn;

use crate::config::ClusterConfig;

/// Adds a message unless the recipient already has `limit` waiting: 1 if added, 0 if full.
const ENQUEUE: &str = "if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end \
                       redis.call('XADD', KEYS[1], '*', 's', ARGV[2], 'b', ARGV[3]) \
                       return 1";

/// The queue's keys in one Redis.
#[derive(Clone)]
pub struct RedisQueue {
    cmd: ConnectionManager,
    prefix: String,
}

impl std::fmt::Debug for RedisQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisQueue")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisQueue {
    /// Connects, and warns when Redis keeps nothing on disk.
    pub async fn open(config: &ClusterConfig) -> redis::RedisResult<RedisQueue> {
        let client = redis::Client::open(config.redis_url.as_str())?;
        let settings = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            // Long: a command that timed out may still be carried out, and the sender would
            // be told "not stored" for a message that is.
            .set_response_timeout(Some(Duration::from_secs(10)));
        let mut cmd = ConnectionManager::new_with_config(client, settings).await?;
        // CONFIG may be disabled (managed Redis): then nothing is known, and nothing said.
        let persistence: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("appendonly")
            .query_async(&mut cmd)
            .await;
        if let Ok(v) = persistence
            && v.get(1).is_some_and(|v| v == "no")
        {
            warn!(
                "direct messages: the queue is in Redis, which has appendonly off: a Redis \
                 restart loses queued messages (use appendonly yes with appendfsync always, \
                 or --database-url)"
            );
        }
        Ok(RedisQueue {
            cmd,
            prefix: config.prefix.clone(),
        })
    }

    fn known_key(&self) -> String {
        format!("{}dm:known", self.prefix)
    }

    fn queue_key(&self, name: &str) -> String {
        format!("{}dm:q:{name}", self.prefix)
    }

    pub async fn register(&self, name: &str) -> redis::RedisResult<()> {
        redis::cmd("SADD")
            .arg(self.known_key())
            .arg(name)
            .query_async::<i64>(&mut self.cmd.clone())
            .await
            .map(drop)
    }

    pub async fn is_known(&self, name: &str) -> redis::RedisResult<bool> {
        redis::cmd("SISMEMBER")
            .arg(self.known_key())
            .arg(name)
            .query_async(&mut self.cmd.clone())
            .await
    }

    /// False if the queue is full.
    pub async fn enqueue(
        &self,
        recipient: &str,
        sender: &str,
        body: &str,
        limit: usize,
    ) -> redis::RedisResult<bool> {
        let added: i64 = redis::Script::new(ENQUEUE)
            .key(self.queue_key(recipient))
            .arg(limit)
            .arg(sender)
            .arg(body)
            .invoke_async(&mut self.cmd.clone())
            .await?;
        Ok(added == 1)
    }

    /// The oldest `max` messages: (stream id, body).
    pub async fn pending(
        &self,
        recipient: &str,
        max: usize,
    ) -> redis::RedisResult<Vec<(String, String)>> {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(self.queue_key(recipient))
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(max)
            .query_async(&mut self.cmd.clone())
            .await?;
        Ok(reply
            .ids
            .into_iter()
            .map(|entry| {
                let body = entry.get::<String>("b").unwrap_or_else(|| {
                    // Written only by ENQUEUE, with a body: another program's entry.
                    warn!(
                        id = entry.id,
                        "direct messages: a queued entry without a body"
                    );
                    String::new()
                });
                (entry.id, body)
            })
            .collect())
    }

    pub async fn remove(&self, recipient: &str, ids: &[String]) -> redis::RedisResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        redis::cmd("XDEL")
            .arg(self.queue_key(recipient))
            .arg(ids)
            .query_async::<i64>(&mut self.cmd.clone())
            .await
            .map(drop)
    }

    pub async fn len(&self, recipient: &str) -> redis::RedisResult<usize> {
        redis::cmd("XLEN")
            .arg(self.queue_key(recipient))
            .query_async(&mut self.cmd.clone())
            .await
    }
}
