//! Liveness and readiness over real HTTP: `/readyz` is 200 when the server can serve, 503
//! with the reason while it drains after SIGTERM, while its store cannot be used (a data
//! directory that cannot be made, PostgreSQL on a closed port) and while Redis is down in
//! cluster mode; `/healthz` stays 200 (alive) throughout.

mod common;

use std::net::SocketAddr;

use common::cluster::{Redis, free_port, unique_prefix};
use common::*;
use supersynk::config::Settings;
use tokio::io::AsyncWriteExt;

/// Polls /readyz until its status is `status`; returns the body.
async fn until_ready(addr: SocketAddr, status: u16) -> String {
    let mut last = (0, String::new());
    let body = eventually_within(WAIT * 2, async || {
        let (got, _, body) = http(addr, "GET", "/readyz", "").await;
        if got == status {
            return Some(body);
        }
        last = (got, body);
        None
    })
    .await;
    body.unwrap_or_else(|| {
        panic!(
            "/readyz never answered {status}; last {}: {:?}",
            last.0, last.1
        )
    })
}

#[tokio::test]
async fn ready_with_the_embedded_store_and_with_postgresql() {
    let server = start_default().await;
    assert_eq!(until_ready(server.local_addr, 200).await, "ready\n");
    let postgres = start(Settings {
        database_url: Some("postgres://postgres@127.0.0.1:5432/test".into()),
        ..Settings::default()
    })
    .await;
    assert_eq!(until_ready(postgres.local_addr, 200).await, "ready\n");
}

#[tokio::test]
async fn not_ready_while_the_data_directory_cannot_be_made() {
    let server = start(Settings {
        data_dir: Some("/proc/nope".into()),
        ..Settings::default()
    })
    .await;
    let body = until_ready(server.local_addr, 503).await;
    assert!(body.starts_with("not ready\n"), "{body}");
    assert!(
        body.contains("store: log store unavailable") && body.contains("/proc/nope"),
        "{body}"
    );
    // Alive all the same: the relay itself does not need the store.
    let (status, _, health) = http(server.local_addr, "GET", "/healthz", "").await;
    assert_eq!((status, health.as_str()), (200, "ok\n"));
}

#[tokio::test]
async fn not_ready_while_postgresql_is_unreachable() {
    let closed = free_port();
    let server = start(Settings {
        database_url: Some(format!("postgres://postgres@127.0.0.1:{closed}/test")),
        ..Settings::default()
    })
    .await;
    let body = until_ready(server.local_addr, 503).await;
    assert!(
        body.contains("store: store unreachable: PostgreSQL"),
        "{body}"
    );
    // Probes are answered from a cache: a burst of them asks the store at most once a
    // second and each still answers quickly.
    let started = std::time::Instant::now();
    for _ in 0..20 {
        assert_eq!(http(server.local_addr, "GET", "/readyz", "").await.0, 503);
    }
    assert!(started.elapsed() < WAIT, "{:?}", started.elapsed());
}

#[tokio::test]
async fn not_ready_while_redis_is_down_in_cluster_mode() {
    let redis = Redis::start(free_port());
    let prefix = unique_prefix();
    let server = start(Settings {
        redis_url: Some(redis.url()),
        redis_prefix: Some(prefix.to_string()),
        ..Settings::default()
    })
    .await;
    let addr = server.local_addr;
    assert_eq!(until_ready(addr, 200).await, "ready\n");
    drop(redis);
    let body = until_ready(addr, 503).await;
    assert!(body.contains("redis: unreachable"), "{body}");
    let (status, _, health) = http(addr, "GET", "/healthz", "").await;
    assert_eq!(status, 200);
    assert!(health.starts_with("degraded"), "{health}");
}

#[tokio::test]
async fn not_ready_while_draining_after_sigterm_but_alive() {
    let (child, addr) = spawn(&["--port", "0", "--shutdown-grace-ms", "10000"], &[]);
    assert_eq!(until_ready(addr, 200).await, "ready\n");
    // A client that upgrades and then never reads nor answers the close holds the drain
    // for the writer's close timeout (2 s).
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    raw.write_all(
        b"GET /connect HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    until_metric(&[addr], "supersynk_connections_open", 1.0).await;
    sigterm(&child);
    let body = until_ready(addr, 503).await;
    assert_eq!(body, "not ready\ndraining: the server is shutting down\n");
    let (status, head, health) = http(addr, "GET", "/healthz", "").await;
    assert_eq!((status, health.as_str()), (200, "ok\n"));
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    // The metrics stay readable; anything else, upgrades included, is refused.
    assert!(metric(addr, "supersynk_connections_total").await >= 1.0);
    assert_eq!(http(addr, "GET", "/version", "").await.0, 503);
    assert!(exits_cleanly(child).await);
}
