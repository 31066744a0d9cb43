//! The channel API's state in Redis (cluster mode): HTTP requests are not sticky, so behind
//! nginx any node may get any request, and every node must see the same channels.
//!
//! Owns the Redis layout of channels and the scripts that keep it; the same rules as the
//! in-process [`super::store::Store`]. Each operation is one Lua script, so it is atomic
//! whichever nodes run it, and all times come from Redis's clock:
//! - `ch:b:{key}` (hash) client id -> latest body; `ch:t:{key}` (sorted set) client id ->
//!   time of its last post; `ch:f:{key}` (sorted set) client id -> time of its first post,
//!   for a stable order. Clients silent past the timeout are removed by whichever request
//!   touches the channel next, and the keys expire on their own once nobody posts.
//! - `channels` (sorted set) channel -> time of its last post: the channels with clients
//!   are those posted to within the timeout.
//! - `cto:{client id}`: the last `Client-Time` of that id, forgotten after a minute.
//! - `epoch`: the cluster's start, set once: `Server-Time` counts from it on every node,
//!   so it never decreases, whichever node answers.

use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisResult, Script};
use tokio::sync::OnceCell;

use super::store::Order;
use crate::config::ClusterConfig;

/// The clock and the epoch, then removal of silent clients of channel KEYS[1..3]; every
/// script below starts with it. Leaves `now` and `since_epoch` (ms).
const PRELUDE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local epoch = tonumber(redis.call('GET', KEYS[4]))
if not epoch then
  epoch = now
  redis.call('SET', KEYS[4], now)
end
local since_epoch = now - epoch
local timeout = tonumber(ARGV[1])
local function sweep()
  local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. (now - timeout))
  for _, c in ipairs(dead) do
    redis.call('HDEL', KEYS[1], c)
    redis.call('ZREM', KEYS[2], c)
    redis.call('ZREM', KEYS[3], c)
  end
end
local function bodies(except)
  local out = {since_epoch}
  for _, c in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
    if c ~= except then
      local b = redis.call('HGET', KEYS[1], c)
      if b then out[#out + 1] = b end
    end
  end
  return out
end
";

/// KEYS: bodies, times, first, epoch, channels. ARGV: timeout, client id, body, channel.
const POST: &str = r"
sweep()
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[2], now, ARGV[2])
redis.call('ZADD', KEYS[3], 'NX', now, ARGV[2])
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], timeout * 2 + 1000) end
redis.call('ZADD', KEYS[5], now, ARGV[4])
return bodies(ARGV[2])
";

/// KEYS: bodies, times, first, epoch. ARGV: timeout.
const GET: &str = r"
sweep()
return bodies(nil)
";

/// KEYS: -, -, -, epoch, channels. ARGV: timeout.
const LIST: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', '(' .. (now - timeout))
local out = {since_epoch}
for _, c in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do out[#out + 1] = c end
return out
";

/// KEYS: -, -, -, epoch, the client's last time. ARGV: timeout, client time.
const ORDER: &str = r"
local last = redis.call('GET', KEYS[5])
if last and tonumber(ARGV[2]) < tonumber(last) then return {since_epoch, '0'} end
redis.call('SET', KEYS[5], ARGV[2], 'PX', 60000)
return {since_epoch, '1'}
";

/// An answer and the `Server-Time` (seconds since the cluster's epoch) it was made at.
pub type Timed<T> = (f64, T);

/// Channel state shared by every node through Redis.
pub struct Shared {
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    prefix: String,
    timeout: Duration,
    post: Script,
    get: Script,
    list: Script,
    order: Script,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl Shared {
    /// The URL was checked when the configuration was read.
    pub fn new(cluster: &ClusterConfig, timeout: Duration) -> RedisResult<Shared> {
        let script = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        Ok(Shared {
            client: redis::Client::open(cluster.redis_url.as_str())?,
            conn: OnceCell::new(),
            prefix: cluster.prefix.clone(),
            timeout,
            post: script(POST),
            get: script(GET),
            list: script(LIST),
            order: script(ORDER),
        })
    }

    /// The connection, made on first use; it reconnects by itself after a failure.
    async fn conn(&self) -> RedisResult<ConnectionManager> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1);
        self.conn
            .get_or_try_init(|| ConnectionManager::new_with_config(self.client.clone(), config))
            .await
            .cloned()
    }

    /// The five keys of a script about channel `key` (`fifth` depends on the script).
    fn keys(&self, key: &str, fifth: String) -> [String; 5] {
        let p = &self.prefix;
        [
            format!("{p}ch:b:{key}"),
            format!("{p}ch:t:{key}"),
            format!("{p}ch:f:{key}"),
            format!("{p}epoch"),
            fifth,
        ]
    }

    async fn run(
        &self,
        script: &Script,
        keys: [String; 5],
        args: &[&[u8]],
    ) -> RedisResult<Timed<Vec<Vec<u8>>>> {
        let mut inv = script.key(&keys[..]);
        inv.arg(self.timeout.as_millis() as u64);
        for a in args {
            inv.arg(*a);
        }
        let mut conn = self.conn().await?;
        let (since_epoch, rest): (u64, Vec<Vec<u8>>) = {
            let mut all: Vec<redis::Value> = inv.invoke_async(&mut conn).await?;
            if all.is_empty() {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Parse,
                    "empty script answer",
                )));
            }
            let first = all.remove(0);
            (
                redis::from_redis_value(first)?,
                redis::from_redis_value(redis::Value::Array(all))?,
            )
        };
        Ok((since_epoch as f64 / 1000.0, rest))
    }

    /// Records `time` for `client`; `Late` if a later time was seen before.
    pub async fn check_order(&self, client: &str, time: f64) -> RedisResult<Timed<Order>> {
        let last = format!("{}cto:{client}", self.prefix);
        let time = time.to_string();
        let (t, answer) = self
            .run(&self.order, self.keys("", last), &[time.as_bytes()])
            .await?;
        let in_order = answer.first().is_some_and(|v| v.as_slice() != b"0");
        Ok((
            t,
            if in_order {
                Order::InOrder
            } else {
                Order::Late
            },
        ))
    }

    /// Stores `body` as `client`'s state in `key`; returns the other clients' bodies.
    pub async fn post(&self, key: &str, client: &str, body: &[u8]) -> RedisResult<Timed<Bytes>> {
        let channels = format!("{}channels", self.prefix);
        let (t, bodies) = self
            .run(
                &self.post,
                self.keys(key, channels),
                &[client.as_bytes(), body, key.as_bytes()],
            )
            .await?;
        Ok((t, super::store::join(bodies.into_iter().map(Bytes::from))))
    }

    /// Every client's body in `key` (`[]` for an unknown channel).
    pub async fn get(&self, key: &str) -> RedisResult<Timed<Bytes>> {
        let channels = format!("{}channels", self.prefix);
        let (t, bodies) = self.run(&self.get, self.keys(key, channels), &[]).await?;
        Ok((t, super::store::join(bodies.into_iter().map(Bytes::from))))
    }

    /// The ids of the channels that have clients, sorted.
    pub async fn channel_ids(&self) -> RedisResult<Timed<Vec<String>>> {
        let channels = format!("{}channels", self.prefix);
        let (t, ids) = self.run(&self.list, self.keys("", channels), &[]).await?;
        let mut ids: Vec<String> = ids
            .into_iter()
            .map(|id| String::from_utf8_lossy(&id).into_owned())
            .collect();
        ids.sort();
        Ok((t, ids))
    }
}
