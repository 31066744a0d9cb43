//! Direct messages' fixtures (`/messages`, protocol/messages.md): a peer that logs in and
//! reads text frames, waits on who is online, and two nodes sharing one Redis (and one
//! PostgreSQL schema) for the cluster tests.

use std::net::SocketAddr;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use supersynk::Server;
use supersynk::config::Settings;
use tokio_tungstenite::tungstenite::Message;

use super::postgres::Schema;
use super::{WAIT, Ws, metric};

/// What a sender hears when its message for B was queued.
pub const OFFLINE: &str = "messages will be sent as B comes back online";

/// A peer of the direct-message protocol.
pub struct Peer(pub Ws);

impl Peer {
    pub async fn connect(addr: SocketAddr) -> Peer {
        Peer::connect_url(&format!("ws://{addr}/messages")).await
    }

    pub async fn connect_url(url: &str) -> Peer {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connects");
        Peer(ws)
    }

    /// Connects and sends the login (not yet seen by the server: see [`online`]).
    pub async fn login(addr: SocketAddr, name: &str) -> Peer {
        let mut p = Peer::connect(addr).await;
        p.send(json!({ "login": name })).await;
        p
    }

    /// Logs in and waits until the login is done: `None`, or the refusal's text (the
    /// answer to a probe sent after the login comes next either way).
    pub async fn login_checked(addr: SocketAddr, name: &str) -> (Peer, Option<String>) {
        let mut p = Peer::login(addr, name).await;
        p.text("probe").await;
        let e = p.error().await;
        if e.starts_with("invalid JSON") {
            (p, None)
        } else {
            p.error().await;
            (p, Some(e))
        }
    }

    /// Logs in on a socket with a tiny receive buffer, which reads nothing until the test
    /// calls [`Peer::next`]: a recipient that falls behind, or one that is stuck.
    pub async fn login_slow_reader(addr: SocketAddr, name: &str) -> Peer {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = tokio_tungstenite::MaybeTlsStream::Plain(socket.connect(addr).await.unwrap());
        let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/messages"), stream)
            .await
            .expect("connects");
        let mut p = Peer(ws);
        p.send(json!({ "login": name })).await;
        p
    }

    pub async fn send(&mut self, v: Value) {
        self.text(&v.to_string()).await;
    }

    pub async fn text(&mut self, t: &str) {
        self.0.send(Message::text(t)).await.expect("sent");
    }

    /// Sends a message; returns the frame, as the recipient will get it.
    pub async fn msg(&mut self, from: &str, to: &str, msg: &str) -> String {
        let frame = json!({ "from": from, "to": to, "msg": msg }).to_string();
        self.text(&frame).await;
        frame
    }

    /// The next text message, within [`WAIT`].
    pub async fn next(&mut self) -> String {
        loop {
            let m = tokio::time::timeout(WAIT, self.0.next())
                .await
                .expect("a message in time")
                .expect("socket open")
                .expect("no socket error");
            match m {
                Message::Text(t) => return t.to_string(),
                Message::Close(c) => panic!("closed: {c:?}"),
                _ => continue,
            }
        }
    }

    /// The next text message if one comes within `ms`.
    pub async fn next_within(&mut self, ms: u64) -> Option<String> {
        let wait = std::time::Duration::from_millis(ms);
        loop {
            match tokio::time::timeout(wait, self.0.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => return Some(t.to_string()),
                Ok(Some(Ok(Message::Close(c)))) => panic!("closed: {c:?}"),
                Ok(Some(Ok(_))) => continue,
                Ok(other) => panic!("socket ended: {other:?}"),
                Err(_) => return None,
            }
        }
    }

    /// The next message's `error` text.
    pub async fn error(&mut self) -> String {
        let v: Value = serde_json::from_str(&self.next().await).expect("JSON");
        v["error"].as_str().expect("an error").to_string()
    }

    /// Proves nothing arrived before now: a bad frame's answer is the next message.
    pub async fn nothing_pending(&mut self) {
        self.text("not json").await;
        let e = self.error().await;
        assert!(
            e.starts_with("invalid JSON"),
            "unexpected message first: {e}"
        );
    }

    /// The close code, once the server closes.
    pub async fn closed(&mut self) -> Option<u16> {
        super::close_code_of(&mut self.0, WAIT).await
    }
}

/// Waits until the server has seen `n` peers online.
pub async fn online(addr: SocketAddr, n: f64) {
    super::until_metric(&[addr], "supersynk_direct_peers_online", n).await;
}

/// Logs in each of `names`, and waits until the server has seen them online.
pub async fn logged_in<const N: usize>(addr: SocketAddr, names: [&str; N]) -> [Peer; N] {
    let before = metric(addr, "supersynk_direct_peers_online").await;
    let mut peers = Vec::new();
    for name in names {
        peers.push(Peer::login(addr, name).await);
    }
    online(addr, before + N as f64).await;
    peers.try_into().ok().expect("N peers")
}

/// Logs `name` in once and out again, so it is a known peer that is offline.
pub async fn known_offline(addr: SocketAddr, name: &str) {
    let mut p = Peer::login(addr, name).await;
    p.nothing_pending().await;
    let before = metric(addr, "supersynk_direct_peers_online").await;
    drop(p);
    online(addr, before - 1.0).await;
}

/// Waits until `n` nodes listen for direct messages under `prefix` on the Redis at `url`.
pub async fn nodes_listening(url: &str, prefix: &str, n: usize) {
    let client = redis::Client::open(url).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    super::eventually("the nodes listen", async || {
        let channels: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg(format!("{prefix}dm:node:*"))
            .query_async(&mut con)
            .await
            .unwrap();
        (channels.len() == n).then_some(())
    })
    .await;
}

/// Two nodes on the Redis at `redis_url` under `prefix`, both listening for direct messages;
/// with a PostgreSQL schema of their own when `postgres`.
pub struct TwoNodes {
    pub one: Server,
    pub two: Server,
    schema: Option<Schema>,
}

impl TwoNodes {
    /// Starts both nodes with `settings` over the Redis (and database) ones.
    pub async fn start(
        redis_url: &str,
        prefix: &str,
        postgres: bool,
        settings: Settings,
    ) -> TwoNodes {
        let schema = match postgres {
            true => Some(Schema::create("dm").await),
            false => None,
        };
        let settings = Settings {
            redis_url: Some(redis_url.to_string()),
            redis_prefix: Some(prefix.to_string()),
            database_url: schema.as_ref().map(Schema::url),
            ..settings
        };
        let one = super::start(settings.clone()).await;
        let two = super::start(settings).await;
        nodes_listening(redis_url, prefix, 2).await;
        TwoNodes { one, two, schema }
    }

    /// Two nodes with PostgreSQL on a Redis server of their own (on a free port, under the
    /// default prefix), for tests that stop and restart it; A logged in on node one and B
    /// on node two.
    pub async fn on_own_redis() -> (super::cluster::Redis, TwoNodes, Peer, Peer) {
        let redis = super::cluster::Redis::start(super::cluster::free_port());
        let nodes = TwoNodes::start(&redis.url(), "supersynk:", true, Settings::default()).await;
        let (a, b) = nodes.a_and_b().await;
        (redis, nodes, a, b)
    }

    /// (node one's address, node two's).
    pub fn addrs(&self) -> (SocketAddr, SocketAddr) {
        (self.one.local_addr, self.two.local_addr)
    }

    /// A logged in on node one, B on node two, both seen online.
    pub async fn a_and_b(&self) -> (Peer, Peer) {
        let (n1, n2) = self.addrs();
        let a = Peer::login(n1, "A").await;
        let b = Peer::login(n2, "B").await;
        online(n1, 1.0).await;
        online(n2, 1.0).await;
        (a, b)
    }

    /// Drops the PostgreSQL schema (the nodes may still run).
    pub async fn drop_schema(&self) {
        if let Some(schema) = &self.schema {
            schema.drop_schema().await;
        }
    }
}
