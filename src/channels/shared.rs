//! The channel API's state in Redis (cluster mode): HTTP requests are not sticky, so behind
//! nginx any node may get any request, and every node must see the same channels.
//!
//! Owns the Redis layout of channels and the scripts that keep it; the same rules and
//! bounds as the in-process [`super::store::Store`]. Each operation is one Lua script, so it is atomic
//! whichever nodes run it, and all times come from Redis's clock:
//! - `ch:b:{key}` (hash) client id -> latest body; `ch:t:{key}` (sorted set) client id ->
//!   time of its last post; `ch:f:{key}` (sorted set) client id -> time of its first post,
//!   for a stable order. Clients silent past the timeout are removed by whichever request
//!   touches the channel next, and the keys expire on their own once nobody posts.
//! - `channels` (sorted set) channel -> time of its last post: the channels with clients
//!   are those posted to within the timeout.
//! - `cto:{client id}`: the last `Client-Time` of that id, forgotten after a minute; checked
//!   in the same script as the request it comes with.
//! - `epoch`: the cluster's start, set once: `Server-Time` counts from it on every node,
//!   so it never decreases, whichever node answers.

use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisResult, Script};
use tokio::sync::OnceCell;

use super::store::{Bound, Bounds};
use crate::config::ClusterConfig;

/// Every script starts with this: the clock and the epoch (KEYS[4]), the request-order
/// check (ARGV[2] the Client-Id or '', ARGV[3] its Client-Time, KEYS[6] its last time),
/// and removal of the silent clients of channel KEYS[1..3] (ARGV[1] the timeout). Scripts
/// answer `{ms since epoch, '1' in order or '0' late, results...}`.
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
if ARGV[2] ~= '' then
  local last = redis.call('GET', KEYS[6])
  if last and tonumber(ARGV[3]) < tonumber(last) then return {since_epoch, '0'} end
  redis.call('SET', KEYS[6], ARGV[3], 'PX', 60000)
end
local function sweep()
  local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. (now - timeout))
  for _, c in ipairs(dead) do
    redis.call('HDEL', KEYS[1], c)
    redis.call('ZREM', KEYS[2], c)
    redis.call('ZREM', KEYS[3], c)
  end
end
local function bodies(except)
  local out = {since_epoch, '1'}
  for _, c in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
    if c ~= except then
      local b = redis.call('HGET', KEYS[1], c)
      if b then out[#out + 1] = b end
    end
  end
  return out
end
";

/// KEYS: bodies, times, first, epoch, channels, -. ARGV: -, -, -, client id, body, channel,
/// max clients, max bytes. A post past a bound answers `{ms, 'c'}` (clients) or `{ms, 'b'}`
/// (bytes) and changes nothing.
const POST: &str = r"
sweep()
local mine = redis.call('HEXISTS', KEYS[1], ARGV[4]) == 1
if not mine and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[7]) then return {since_epoch, 'c'} end
local total = string.len(ARGV[5])
for _, c in ipairs(redis.call('HKEYS', KEYS[1])) do
  if c ~= ARGV[4] then total = total + redis.call('HSTRLEN', KEYS[1], c) end
end
if total > tonumber(ARGV[8]) then return {since_epoch, 'b'} end
redis.call('HSET', KEYS[1], ARGV[4], ARGV[5])
redis.call('ZADD', KEYS[2], now, ARGV[4])
redis.call('ZADD', KEYS[3], 'NX', now, ARGV[4])
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], timeout * 2 + 1000) end
redis.call('ZADD', KEYS[5], now, ARGV[6])
return bodies(ARGV[4])
";

/// KEYS: bodies, times, first, epoch, -, -.
const GET: &str = r"
sweep()
return bodies(nil)
";

/// KEYS: -, -, -, epoch, channels, -.
const LIST: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', '(' .. (now - timeout))
local out = {since_epoch, '1'}
for _, c in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do out[#out + 1] = c end
return out
";

/// An answer and the `Server-Time` (seconds since the cluster's epoch) it was made at.
pub type Timed<T> = (f64, T);

/// A request's `Client-Id` and `Client-Time`, checked against the last one of that id.
pub type Ordering<'a> = Option<(&'a str, f64)>;

/// What a script answered after the clock.
enum Reply {
    /// Older than its client's last request: nothing changed.
    Late,
    /// A post past a bound: nothing changed.
    Refused(Bound),
    Values(Vec<Vec<u8>>),
}

/// Channel state shared by every node through Redis.
pub struct Shared {
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    prefix: String,
    timeout: Duration,
    bounds: Bounds,
    post: Script,
    get: Script,
    list: Script,
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
    pub fn new(cluster: &ClusterConfig, timeout: Duration, bounds: Bounds) -> RedisResult<Shared> {
        let script = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        Ok(Shared {
            client: redis::Client::open(cluster.redis_url.as_str())?,
            conn: OnceCell::new(),
            prefix: cluster.prefix.clone(),
            timeout,
            bounds,
            post: script(POST),
            get: script(GET),
            list: script(LIST),
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

    /// The keys of a script about channel `key`.
    fn keys(&self, key: &str, order: Ordering) -> [String; 6] {
        let p = &self.prefix;
        [
            format!("{p}ch:b:{key}"),
            format!("{p}ch:t:{key}"),
            format!("{p}ch:f:{key}"),
            format!("{p}epoch"),
            format!("{p}channels"),
            format!("{p}cto:{}", order.map_or("", |(client, _)| client)),
        ]
    }

    /// Runs `script`.
    async fn run(
        &self,
        script: &Script,
        key: &str,
        order: Ordering<'_>,
        args: &[&[u8]],
    ) -> RedisResult<Timed<Reply>> {
        let mut inv = script.key(&self.keys(key, order)[..]);
        inv.arg(self.timeout.as_millis() as u64);
        match order {
            Some((client, time)) => inv.arg(client).arg(time.to_string()),
            None => inv.arg("").arg(""),
        };
        for a in args {
            inv.arg(*a);
        }
        let mut conn = self.conn().await?;
        let answer: Vec<redis::Value> = inv.invoke_async(&mut conn).await?;
        let mut answer = answer.into_iter();
        let (Some(since_epoch), Some(in_order)) = (answer.next(), answer.next()) else {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Parse,
                "short script answer",
            )));
        };
        let since_epoch: u64 = redis::from_redis_value(since_epoch)?;
        let in_order: String = redis::from_redis_value(in_order)?;
        let t = since_epoch as f64 / 1000.0;
        let reply = match in_order.as_str() {
            "1" => Reply::Values(redis::from_redis_value(redis::Value::Array(
                answer.collect(),
            ))?),
            "c" => Reply::Refused(Bound::Clients(self.bounds.max_clients)),
            "b" => Reply::Refused(Bound::Bytes(self.bounds.max_bytes)),
            _ => Reply::Late,
        };
        Ok((t, reply))
    }

    /// Stores `body` as `client`'s state in `key`; returns the other clients' bodies (None
    /// for a late request, an error for one past a bound; neither changes anything).
    pub async fn post(
        &self,
        key: &str,
        client: &str,
        body: &[u8],
        order: Ordering<'_>,
    ) -> RedisResult<Timed<Option<Result<Bytes, Bound>>>> {
        let (max_clients, max_bytes) = (
            self.bounds.max_clients.to_string(),
            self.bounds.max_bytes.to_string(),
        );
        let args: [&[u8]; 5] = [
            client.as_bytes(),
            body,
            key.as_bytes(),
            max_clients.as_bytes(),
            max_bytes.as_bytes(),
        ];
        let (t, reply) = self.run(&self.post, key, order, &args).await?;
        Ok((
            t,
            match reply {
                Reply::Late => None,
                Reply::Refused(bound) => Some(Err(bound)),
                Reply::Values(bodies) => Some(Ok(join(bodies))),
            },
        ))
    }

    /// Every client's body in `key` (`[]` for an unknown channel; None for a late request).
    pub async fn get(&self, key: &str, order: Ordering<'_>) -> RedisResult<Timed<Option<Bytes>>> {
        let (t, reply) = self.run(&self.get, key, order, &[]).await?;
        Ok((t, reply.values().map(join)))
    }

    /// The ids of the channels that have clients, sorted.
    pub async fn channel_ids(&self) -> RedisResult<Timed<Vec<String>>> {
        let (t, reply) = self.run(&self.list, "", None, &[]).await?;
        let mut ids: Vec<String> = reply
            .values()
            .unwrap_or_default()
            .into_iter()
            .map(|id| String::from_utf8_lossy(&id).into_owned())
            .collect();
        ids.sort();
        Ok((t, ids))
    }
}

impl Reply {
    fn values(self) -> Option<Vec<Vec<u8>>> {
        match self {
            Reply::Values(v) => Some(v),
            Reply::Late | Reply::Refused(_) => None,
        }
    }
}

fn join(bodies: Vec<Vec<u8>>) -> Bytes {
    super::store::join(bodies.into_iter().map(Bytes::from))
}
