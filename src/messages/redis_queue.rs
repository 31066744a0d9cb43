//! The direct-message queue in Redis, for a cluster without PostgreSQL: every node shares
//! the known peers and the queue through the same Redis that shares the sessions.
//!
//! Owns the keys `{prefix}dm:known` (a set of the names that ever logged in),
//! `{prefix}dm:q:{name}` (a stream per recipient, oldest first) and `{prefix}dm:bytes` (the
//! bytes of every queued body together, kept by the scripts that add and remove them). Durability is Redis's own:
//! with `appendonly yes` and `appendfsync always` a queued message is on Redis's disk before
//! Redis answers, and so before the sender hears it was queued; without persistence a Redis
//! restart loses the queue, which [`RedisQueue::open`] warns about.

use std::time::Duration;

use redis::aio::ConnectionManager;
use tracing::warn;

use crate::config::ClusterConfig;

/// Adds a message unless the recipient already has `limit` (ARGV[1]) waiting (0) or the
/// queue holds ARGV[4] bytes in all (2): 1 if added.
const ENQUEUE: &str = "if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end \
                       local total = tonumber(redis.call('GET', KEYS[2]) or '0') \
                       if total + string.len(ARGV[3]) > tonumber(ARGV[4]) then return 2 end \
                       redis.call('XADD', KEYS[1], '*', 's', ARGV[2], 'b', ARGV[3]) \
                       redis.call('INCRBY', KEYS[2], string.len(ARGV[3])) \
                       return 1";

/// Removes the entries ARGV of stream KEYS[1], taking their bodies' bytes off KEYS[2].
const REMOVE: &str = "local freed = 0 \
                      for _, id in ipairs(ARGV) do \
                        local e = redis.call('XRANGE', KEYS[1], id, id) \
                        if #e > 0 then \
                          local f = e[1][2] \
                          for i = 1, #f, 2 do if f[i] == 'b' then freed = freed + string.len(f[i + 1]) end end \
                          redis.call('XDEL', KEYS[1], id) \
                        end \
                      end \
                      local left = redis.call('DECRBY', KEYS[2], freed) \
                      if left < 0 then redis.call('SET', KEYS[2], 0) end \
                      return freed";

/// Registers ARGV[1] unless it is new and ARGV[2] names are known: 1 if known now.
const REGISTER: &str = "if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 1 end \
                        if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end \
                        redis.call('SADD', KEYS[1], ARGV[1]) \
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

    fn bytes_key(&self) -> String {
        format!("{}dm:bytes", self.prefix)
    }

    /// False if `name` is new and `max` names are known already.
    pub async fn register(&self, name: &str, max: i64) -> redis::RedisResult<bool> {
        let known: i64 = redis::Script::new(REGISTER)
            .key(self.known_key())
            .arg(name)
            .arg(max)
            .invoke_async(&mut self.cmd.clone())
            .await?;
        Ok(known == 1)
    }

    /// Bytes of every queued body together.
    pub async fn queued_bytes(&self) -> redis::RedisResult<i64> {
        let v: Option<i64> = redis::cmd("GET")
            .arg(self.bytes_key())
            .query_async(&mut self.cmd.clone())
            .await?;
        Ok(v.unwrap_or(0))
    }

    pub async fn is_known(&self, name: &str) -> redis::RedisResult<bool> {
        redis::cmd("SISMEMBER")
            .arg(self.known_key())
            .arg(name)
            .query_async(&mut self.cmd.clone())
            .await
    }

    /// 1 if added, 0 if the recipient's queue is full, 2 if the store is.
    pub async fn enqueue(
        &self,
        recipient: &str,
        sender: &str,
        body: &str,
        limit: i64,
        store_bytes: i64,
    ) -> redis::RedisResult<i64> {
        redis::Script::new(ENQUEUE)
            .key(self.queue_key(recipient))
            .key(self.bytes_key())
            .arg(limit)
            .arg(sender)
            .arg(body)
            .arg(store_bytes)
            .invoke_async(&mut self.cmd.clone())
            .await
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
        redis::Script::new(REMOVE)
            .key(self.queue_key(recipient))
            .key(self.bytes_key())
            .arg(ids)
            .invoke_async::<i64>(&mut self.cmd.clone())
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
