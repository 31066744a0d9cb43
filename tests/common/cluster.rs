//! Helpers for tests with several nodes: nodes in cluster mode against a real Redis, each
//! test under a key prefix of its own.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use supersynk_client::HunterClient;

use super::*;

pub fn redis_url() -> String {
    std::env::var("SUPERSYNK_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A key prefix of the test's own; its keys are deleted when the test ends (nodes killed
/// by a test leave theirs behind).
pub struct Prefix(String);

impl std::ops::Deref for Prefix {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        let redis = redis_url();
        let Ok(out) = Command::new("redis-cli")
            .args(["-u", &redis, "--scan", "--pattern", &format!("{}*", self.0)])
            .output()
        else {
            return;
        };
        let keys: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(String::from)
            .collect();
        if !keys.is_empty() {
            let _ = Command::new("redis-cli")
                .args(["-u", &redis, "DEL"])
                .args(&keys)
                .stdout(Stdio::null())
                .status();
        }
    }
}

pub fn unique_prefix() -> Prefix {
    Prefix(format!("supersynk-test-{}:", uuid::Uuid::new_v4().simple()))
}

/// A node of the cluster `prefix`, once it is connected to Redis.
pub async fn node(redis: &str, prefix: &str, args: &[&str]) -> (Proc, SocketAddr) {
    let mut all = vec![
        "--port",
        "0",
        "--redis-url",
        redis,
        "--redis-prefix",
        prefix,
    ];
    all.extend_from_slice(args);
    let (proc, addr) = spawn(&all, &[]);
    wait_for_health(addr, "ok").await;
    (proc, addr)
}

/// Waits until /healthz starts with `want`.
pub async fn wait_for_health(addr: SocketAddr, want: &str) {
    let mut last = String::new();
    let said = super::eventually_within(WAIT, async || {
        let (_, _, body) = http(addr, "GET", "/healthz", "").await;
        last = body;
        last.starts_with(want).then_some(())
    })
    .await;
    assert!(
        said.is_some(),
        "healthz never said {want:?}; last: {last:?}"
    );
}

pub async fn recv_text(c: &mut HunterClient) -> String {
    tokio::time::timeout(WAIT, c.next_text())
        .await
        .expect("a message in time")
        .expect("socket open")
        .expect("no socket error")
}

pub async fn follower(addr: SocketAddr, name: &str, session: &str) -> HunterClient {
    let mut c = plugin(addr).await;
    join(&mut c, name, session, false).await;
    c
}

/// Reads sessionstates until one says (players, leader); other messages must not come.
pub async fn until_state(c: &mut HunterClient, want: (u64, bool)) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = tokio::time::timeout_at(deadline, state(c))
            .await
            .unwrap_or_else(|_| panic!("no sessionstate {want:?} in time"));
        if got == want {
            return;
        }
    }
}

/// The next message that is not a sessionstate.
pub async fn next_push(c: &mut HunterClient) -> String {
    loop {
        let text = recv_text(c).await;
        if !text.contains(r#""type":"sessionstate""#) {
            return text;
        }
    }
}

/// A Redis server of the test's own, on a free port, keeping nothing on disk.
pub struct Redis {
    child: Child,
    pub port: u16,
}

impl Redis {
    pub fn start(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        super::eventually_blocking("redis-server listens", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Redis { child, port }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
