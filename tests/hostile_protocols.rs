//! What one hostile client can try on the open internet (issue 14), each attack performed
//! over real sockets with a bounded load, asserting what the other users see: frames that
//! would escape the rate, leadership protection turned into a takeover, a log flood,
//! unbounded channel state and direct-message names and stores.

mod common;

use std::time::Duration;

use common::messages::Peer;
use common::*;
use futures::StreamExt;
use supersynk::config::Settings;
use supersynk_client::HunterClient;
use tokio::io::AsyncWriteExt;

// ---- Frames that escape the rate (point 3) ----

/// One masked client frame: `first` is FIN/RSV/opcode.
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [0x11, 0x22, 0x33, 0x44];
    let mut out = vec![first, 0x80 | payload.len() as u8];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
    out
}

/// Writes `frame` `count` times under the WebSocket layer of `c`, in writes of about 64 KiB;
/// stops early once the server has closed the socket. Returns how many were written.
async fn flood(c: &mut HunterClient, frame: &[u8], count: usize) -> usize {
    let per_write = (65536 / frame.len()).max(1);
    let chunk = frame.repeat(per_write);
    let tcp = c.ws.get_mut().get_mut();
    let mut sent = 0;
    while sent < count {
        let n = per_write.min(count - sent);
        if tcp.write_all(&chunk[..n * frame.len()]).await.is_err() {
            break;
        }
        sent += n;
    }
    sent
}

/// How the server ended `c`: the close code it sent, or `None` if the socket broke first
/// (a server that closes with unread bytes from a flooder may reset the connection).
async fn ended(c: &mut HunterClient) -> Option<u16> {
    close_code_of(&mut c.ws, WAIT * 2).await
}

/// A leader's pushes during an attack: every one reaches its follower, in order.
async fn pushes_flow(leader: &mut HunterClient, follower: &mut HunterClient, session: &str) {
    for n in 0..50 {
        leader.send_text(&push(session, n)).await.unwrap();
    }
    for n in 0..50 {
        let v = recv(follower).await;
        assert_eq!(v["data"][0][0], format!("em_{n:03}"));
    }
}

#[tokio::test]
async fn unsolicited_pongs_count_towards_the_rate() {
    let server = start_default().await;
    let addr = server.local_addr;
    let (mut leader, mut follower) = pair(addr, "pong:Host").await;
    // Without permessage-deflate (the frame layer only looks at the headers then).
    let mut attacker = HunterClient::connect(addr, "/connect", false)
        .await
        .unwrap();
    assert!(!attacker.deflate);
    // 200,000 empty pongs (1.2 MB): the rate (200/s, bursts of 400) ends it long before.
    let sent = flood(&mut attacker, &frame(0x8a, b""), 200_000).await;
    let code = ended(&mut attacker).await;
    assert!(matches!(code, None | Some(1008)), "{code:?} after {sent}");
    assert!(metric(addr, "supersynk_errors_total{kind=\"limit_message_rate\"}").await >= 1.0);
    until_metric(
        &[addr],
        "supersynk_closes_total{kind=\"rate_limited\"}",
        1.0,
    )
    .await;
    pushes_flow(&mut leader, &mut follower, "pong:Host").await;
}

#[tokio::test]
async fn empty_continuations_inside_a_message_hit_the_fragment_cap() {
    let server = start_default().await;
    let addr = server.local_addr;
    let (mut leader, mut follower) = pair(addr, "frag:Host").await;
    let mut attacker = plugin(addr).await;
    // A text message opened, then empty continuation frames that never end it.
    let tcp = attacker.ws.get_mut().get_mut();
    tcp.write_all(&frame(0x01, b"{")).await.unwrap();
    flood(&mut attacker, &frame(0x00, b""), 200_000).await;
    let code = ended(&mut attacker).await;
    assert!(matches!(code, None | Some(1009)), "{code:?}");
    until_metric(
        &[addr],
        "supersynk_errors_total{kind=\"too_many_fragments\"}",
        1.0,
    )
    .await;
    pushes_flow(&mut leader, &mut follower, "frag:Host").await;
}

#[tokio::test]
async fn continuations_count_towards_the_rate_whatever_the_fragment_cap() {
    let server = start(Settings {
        max_message_fragments: Some(10_000_000),
        ..Settings::default()
    })
    .await;
    let addr = server.local_addr;
    let (mut leader, mut follower) = pair(addr, "cont:Host").await;
    let mut attacker = plugin(addr).await;
    let tcp = attacker.ws.get_mut().get_mut();
    tcp.write_all(&frame(0x01, b"{")).await.unwrap();
    flood(&mut attacker, &frame(0x00, b""), 200_000).await;
    let code = ended(&mut attacker).await;
    assert!(matches!(code, None | Some(1008)), "{code:?}");
    until_metric(
        &[addr],
        "supersynk_closes_total{kind=\"rate_limited\"}",
        1.0,
    )
    .await;
    pushes_flow(&mut leader, &mut follower, "cont:Host").await;
}

#[tokio::test]
async fn the_plugins_fragmented_pushes_and_pings_are_within_every_limit() {
    // The plugin pings every 1.7 s and its messages over ~8 KiB arrive fragmented; a leader
    // sending a burst of 16 KiB pushes in 4 KiB fragments, a ping between each, at the
    // default limits: every push reaches the follower unchanged.
    let server = start_default().await;
    let addr = server.local_addr;
    let (mut leader, mut follower) = pair(addr, "big:Host").await;
    let monster = r#"["em_001",[[0,32.42],[1,23.42]],[[42,41.23]]]"#;
    let data = vec![monster; 16_000 / monster.len()].join(",");
    let text = format!(r#"{{"sessionId":"big:Host","type":"Push","data":[{data}]}}"#);
    assert!(text.len() > 15_000 && text.len() < 16_384);
    let tcp = leader.ws.get_mut().get_mut();
    for _ in 0..40 {
        // Uncompressed text in four fragments (the plugin's library also sends them so when
        // compression is off), with a ping in the middle.
        let mut wire = Vec::new();
        for (i, part) in text.as_bytes().chunks(4096).enumerate() {
            let opcode = if i == 0 { 0x1 } else { 0x0 };
            let fin = if (i + 1) * 4096 >= text.len() {
                0x80
            } else {
                0
            };
            wire.extend(long_frame(fin | opcode, part));
            if i == 1 {
                wire.extend(frame(0x89, b"12345678"));
            }
        }
        tcp.write_all(&wire).await.unwrap();
    }
    for _ in 0..40 {
        let got = tokio::time::timeout(WAIT, follower.next_text())
            .await
            .expect("a push in time")
            .expect("open")
            .expect("no error");
        assert_eq!(got, text);
    }
    assert_eq!(
        metric(addr, "supersynk_errors_total{kind=\"limit_message_rate\"}").await,
        0.0
    );
}

/// A masked client frame of any length.
fn long_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [9, 8, 7, 6];
    let mut out = vec![first];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
    out
}

// ---- Leadership protection used as a takeover (point 4) ----

/// Joins `session` as leader presenting `secret`, as a client other than the plugin could.
async fn lead_with_secret(c: &mut HunterClient, session: &str, secret: &str) {
    c.send_text(&format!(
        r#"{{"type":"SetSession","sessionId":"{session}","isLeader":true,"secret":"{secret}"}}"#
    ))
    .await
    .unwrap();
}

/// The next message `c` gets is the answer to a text `ping`: nothing (no servermsg) came
/// before it.
async fn nothing_pending(c: &mut HunterClient) {
    c.send_text("ping").await.unwrap();
    assert_eq!(recv(c).await, "pong");
}

/// The plugin leader `leader` leads `session`: its pushes reach `follower`, unchanged.
async fn leads(leader: &mut HunterClient, follower: &mut HunterClient, session: &str) {
    let text = push(session, 7);
    leader.send_text(&text).await.unwrap();
    loop {
        let got = tokio::time::timeout(WAIT, follower.next_text())
            .await
            .expect("a push in time")
            .expect("open")
            .expect("no error");
        if got.contains("\"Push\"") {
            assert_eq!(got, text);
            break;
        }
    }
    nothing_pending(leader).await;
}

#[tokio::test]
async fn a_secret_cannot_take_over_a_running_plugin_session() {
    for secrets in [None, Some(true)] {
        let server = start(Settings {
            leader_secrets: secrets,
            ..Settings::default()
        })
        .await;
        let addr = server.local_addr;
        let session = "c3@uTKeQR3Mp:Host";
        let (mut host, mut follower) = pair(addr, session).await;
        let mut attacker = plugin(addr).await;
        lead_with_secret(&mut attacker, session, "mine now").await;
        assert_eq!(state(&mut attacker).await, (3, true));
        let warning = servermsg(&mut attacker).await;
        assert!(
            warning.contains("not protected") || warning.contains("stays unprotected"),
            "{warning}"
        );
        for c in [&mut host, &mut follower] {
            assert_eq!(state(c).await, (3, true));
        }
        leads(&mut host, &mut follower, session).await;
        // The plugin host reconnects (a new socket, no secret): it leads again at once.
        drop(host);
        for c in [&mut attacker, &mut follower] {
            assert_eq!(state(c).await, (2, true));
        }
        let mut host = plugin(addr).await;
        join(&mut host, "Host", session, true).await;
        assert_eq!(state(&mut host).await, (3, true));
        nothing_pending(&mut host).await;
        assert_eq!(state(&mut follower).await, (3, true));
        leads(&mut host, &mut follower, session).await;
        assert_eq!(
            metric(addr, "supersynk_errors_total{kind=\"leadership_refused\"}").await,
            0.0
        );
    }
}

#[tokio::test]
async fn a_pre_claimed_session_id_does_not_lock_out_the_plugin_leader() {
    let server = start_default().await;
    let addr = server.local_addr;
    let session = "c3@uTKeQR3Mp:Late";
    // The attacker claims the id with a secret before the plugin host arrives.
    let mut attacker = plugin(addr).await;
    lead_with_secret(&mut attacker, session, "squatted").await;
    assert_eq!(state(&mut attacker).await, (1, true));
    assert!(servermsg(&mut attacker).await.contains("secrets are off"));
    let mut host = plugin(addr).await;
    join(&mut host, "Late", session, true).await;
    assert_eq!(state(&mut host).await, (2, true));
    nothing_pending(&mut host).await;
    let mut follower = plugin(addr).await;
    join(&mut follower, "F", session, false).await;
    assert_eq!(state(&mut follower).await, (3, true));
    assert_eq!(state(&mut host).await, (3, true));
    leads(&mut host, &mut follower, session).await;
}

#[tokio::test]
async fn with_leader_secrets_on_a_pre_claimed_id_refuses_a_secretless_leader() {
    // What the operator accepts with --leader-secrets true (protocol/hunterpie.md): only
    // for leaders that all present secrets, which the deployed plugin does not.
    let server = start(Settings {
        leader_secrets: Some(true),
        ..Settings::default()
    })
    .await;
    let addr = server.local_addr;
    let mut owner = plugin(addr).await;
    lead_with_secret(&mut owner, "vip", "s3cret").await;
    assert_eq!(state(&mut owner).await, (1, true));
    nothing_pending(&mut owner).await;
    let mut plain = plugin(addr).await;
    join(&mut plain, "P", "vip", true).await;
    assert_eq!(state(&mut plain).await, (2, true));
    assert!(servermsg(&mut plain).await.contains("protected"));
}

// ---- Log store flood (point 5) ----

/// One plugin-style log entry, padded to about `pad` bytes of message.
fn log_entry(user: &str, n: usize, pad: usize) -> String {
    let msg = format!("entry {n} {}", "x".repeat(pad));
    format!(
        r#"{{"timestamp":1700000000000,"level":"Info","msg":"{msg}","text":"00:00:00:000 [Info] {msg}","user":"{user}","room":"r"}}"#
    )
}

/// Waits until every entry received was either stored or counted as not stored.
async fn store_settled(addr: std::net::SocketAddr) {
    let settled = eventually_within(WAIT * 4, async || {
        let received = metric(addr, "supersynk_logs_received_total").await;
        let done = metric(addr, "supersynk_logs_stored_total").await
            + metric(addr, "supersynk_logs_store_dropped_total").await;
        (done >= received).then_some(())
    })
    .await;
    assert!(settled.is_some(), "store not settled");
}

/// How many stored entries `user` has (at most 1000 looked at).
async fn stored(addr: std::net::SocketAddr, user: &str) -> usize {
    let (status, _, body) = http(
        addr,
        "GET",
        &format!("/logs/query?user={user}&limit=1000"),
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["entries"].as_array().unwrap().len()
}

#[tokio::test]
async fn a_log_flood_from_one_address_loses_only_its_own_entries() {
    // A store queue of 2,000 entries: without per-address limits on entries, the flood's
    // bodies (900 entries each, as fast as the request rate allows) fill it and everyone's
    // entries are dropped with the flood's.
    let server = start(Settings {
        trusted_proxies: Some(vec!["127.0.0.1/32".parse().unwrap()]),
        logs_store_queue: Some(2000),
        ..Settings::default()
    })
    .await;
    let addr = server.local_addr;
    let flood_body = format!(
        "[{}]",
        (0..900)
            .map(|n| log_entry("flood", n, 150))
            .collect::<Vec<_>>()
            .join(",")
    );
    let flooder = tokio::spawn(async move {
        let mut statuses = Vec::new();
        for _ in 0..60 {
            let (status, _, _) = http_with(
                addr,
                "POST",
                "/logs/add",
                &[("X-Forwarded-For", "203.0.113.66")],
                &flood_body,
            )
            .await;
            statuses.push(status);
        }
        statuses
    });
    // A plugin posting batches of 5 beside it, from another address: every entry is stored.
    for batch in 0..40 {
        let body = format!(
            "[{}]",
            (0..5)
                .map(|i| log_entry("hunter", batch * 5 + i, 80))
                .collect::<Vec<_>>()
                .join(",")
        );
        let (status, _, text) = http_with(
            addr,
            "POST",
            "/logs/add",
            &[("X-Forwarded-For", "203.0.113.7")],
            &body,
        )
        .await;
        assert_eq!(status, 200, "{text}");
        // The scenario, not a wait: a plugin's pace, so its batches span the flood.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let statuses = flooder.await.unwrap();
    assert!(
        statuses.contains(&200),
        "the flood's first bodies fit its burst"
    );
    assert!(statuses.contains(&429), "{statuses:?}");
    store_settled(addr).await;
    assert_eq!(stored(addr, "hunter").await, 200);
    assert_eq!(
        metric(addr, "supersynk_logs_store_dropped_total").await,
        0.0
    );
    assert!(metric(addr, "supersynk_logs_refused_entries_total").await >= 900.0);
    assert!(metric(addr, "supersynk_errors_total{kind=\"logs_ingest_rate\"}").await >= 1.0);
    server.shutdown().await;
}

#[tokio::test]
async fn the_log_store_stays_within_its_size_on_disk_oldest_deleted_first() {
    let dir = data_dir();
    let bound: u64 = 2 << 20;
    let server = start(Settings {
        data_dir: Some(dir.clone()),
        logs_retention_bytes: Some(bound),
        ..Settings::default()
    })
    .await;
    let addr = server.local_addr;
    // About 24 MB of entries from loopback (exempt from per-address limits), twelve times
    // the bound, in bodies of 1,000 entries.
    let mut n = 0;
    for _ in 0..60 {
        let body = format!(
            "[{}]",
            (0..1000)
                .map(|_| {
                    n += 1;
                    log_entry("big", n, 160)
                })
                .collect::<Vec<_>>()
                .join(",")
        );
        let (status, _, text) = http(addr, "POST", "/logs/add", &body).await;
        assert_eq!(status, 200, "{text}");
    }
    store_settled(addr).await;
    let file = std::fs::metadata(dir.join("logs.sqlite3")).unwrap().len();
    assert!(
        file <= bound * 2,
        "logs.sqlite3 is {file} bytes, bound {bound}"
    );
    // The newest entries are kept, the oldest went first.
    let (_, _, body) = http(addr, "GET", "/logs/query?user=big&limit=1", "").await;
    assert!(
        body.contains(&format!("\"entry {n} ")),
        "{}",
        &body[..200.min(body.len())]
    );
    let (_, _, body) = http(addr, "GET", "/logs/query?text=entry%201%20x", "").await;
    assert!(
        body.starts_with("{\"entries\":[]"),
        "{}",
        &body[..200.min(body.len())]
    );
    let measured = metric(addr, "supersynk_logs_store_bytes").await;
    assert!(
        measured > 0.0 && measured <= (bound * 2) as f64,
        "{measured}"
    );
    server.shutdown().await;
}

// ---- Unbounded channel state (point 7) ----

async fn post_channel(addr: std::net::SocketAddr, key: &str, body: &str) -> (u16, String) {
    let (status, _, body) = http_with(
        addr,
        "POST",
        &format!("/api/channels/{key}"),
        &[("Content-Type", "application/json")],
        body,
    )
    .await;
    (status, body)
}

#[tokio::test]
async fn a_channel_is_bounded_in_clients_and_bytes_on_one_node_and_in_a_cluster() {
    let prefix = common::cluster::unique_prefix();
    for redis in [None, Some(common::cluster::redis_url())] {
        let server = start(Settings {
            // Nobody times out during the attack: the bounds alone hold it.
            channel_timeout_ms: Some(30_000),
            redis_url: redis.clone(),
            redis_prefix: Some(prefix.to_string()),
            ..Settings::default()
        })
        .await;
        let addr = server.local_addr;
        let (status, _) = post_channel(addr, "room", r#"{"client_id":"ada","pos":[1,2]}"#).await;
        assert_eq!(status, 200);
        let (mut watcher, _) =
            tokio_tungstenite::connect_async(format!("ws://{addr}/api/channels/room/watch"))
                .await
                .unwrap();
        // 200 client ids of 60 KB each (12 MB): the state would be 12 MB for every watcher.
        let pad = "x".repeat(60_000);
        let mut statuses = Vec::new();
        for i in 0..200 {
            let body = format!(r#"{{"client_id":"big{i}","pad":"{pad}"}}"#);
            let (status, text) = post_channel(addr, "room", &body).await;
            if status == 413 {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                assert!(
                    v["error"]
                        .as_str()
                        .unwrap()
                        .contains("channel state too large"),
                    "{text}"
                );
            }
            statuses.push(status);
        }
        let accepted = statuses.iter().filter(|s| **s == 200).count();
        assert_eq!(accepted, 2, "two 60 KB states fit in 128 KiB beside ada's");
        assert_eq!(statuses.iter().filter(|s| **s == 413).count(), 198);
        // Then many small ones: past 100 clients, refused.
        let mut full = 0;
        for i in 0..150 {
            let (status, text) =
                post_channel(addr, "room", &format!(r#"{{"client_id":"c{i}"}}"#)).await;
            if status == 413 {
                assert!(text.contains("channel full: at most 100 clients"), "{text}");
                full += 1;
            }
        }
        assert_eq!(full, 150 - (100 - 3));
        // Every user still sees a bounded state, and ada's posts work as before.
        let (status, _, state) = http(addr, "GET", "/api/channels/room", "").await;
        assert_eq!(status, 200);
        assert!(state.len() < 128 * 1024 + 200 * 2, "{}", state.len());
        let (status, others) =
            post_channel(addr, "room", r#"{"client_id":"ada","pos":[3,4]}"#).await;
        assert_eq!(status, 200);
        assert!(others.contains("big0") && !others.contains("\"ada\""));
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let msg = tokio::time::timeout_at(deadline, watcher.next())
                .await
                .expect("the watcher sees ada's last post")
                .unwrap()
                .unwrap();
            let text = msg.to_text().unwrap();
            assert!(
                text.len() < 128 * 1024 + 200 * 2,
                "watch message of {}",
                text.len()
            );
            if text.contains("[3,4]") {
                break;
            }
        }
        assert!(
            metric(
                addr,
                "supersynk_errors_total{kind=\"channel_state_too_large\"}"
            )
            .await
                >= 198.0
        );
        assert!(metric(addr, "supersynk_errors_total{kind=\"channel_full\"}").await >= 53.0);
        server.shutdown().await;
    }
}

// ---- Direct messages without a secret (point 8) ----

#[tokio::test]
async fn direct_message_names_cannot_pass_for_others() {
    let server = start_default().await;
    let addr = server.local_addr;
    for spoof in [
        "adm\u{202E}nimda",
        "Bob\u{200B}",
        "\u{2066}Bob",
        "Bob\u{00A0}",
        " Bob",
    ] {
        let (_ws, refused) = Peer::login_checked(addr, spoof).await;
        let refused = refused.unwrap_or_else(|| panic!("{spoof:?} logged in"));
        assert!(refused.contains("a peer name cannot"), "{refused}");
    }
    let (mut bob, refused) = Peer::login_checked(addr, "Bob").await;
    assert_eq!(refused, None);
    let (mut eve, _) = Peer::login_checked(addr, "Eve").await;
    eve.msg("Eve", "Bob\u{200D}", "hi").await;
    assert!(eve.error().await.contains("invisible"));
    let sent = eve.msg("Eve", "Bob", "hello").await;
    assert_eq!(bob.next().await, sent);
}

#[tokio::test]
async fn throw_away_names_fill_neither_the_known_peers_nor_the_store() {
    let dir = data_dir();
    let bound: u64 = 1 << 20;
    let server = start(Settings {
        data_dir: Some(dir.clone()),
        messages_store_bytes: Some(bound),
        messages_max_peers: Some(45),
        ..Settings::default()
    })
    .await;
    let addr = server.local_addr;
    // Alice and Bob are known; Bob is offline with a message waiting.
    drop(Peer::login_checked(addr, "Bob").await);
    until_metric(&[addr], "supersynk_direct_peers_online", 0.0).await;
    let (mut alice, _) = Peer::login_checked(addr, "Alice").await;
    let (mut carol, _) = Peer::login_checked(addr, "Carol").await;
    let waiting = alice.msg("Alice", "Bob", "see you at 8").await;
    assert!(alice.error().await.starts_with("connection to Bob closed"));
    // One client makes 60 throw-away names: the peers past the bound are refused.
    let mut made = Vec::new();
    let mut refused = 0;
    for i in 0..60 {
        let name = format!("junk{i}");
        match Peer::login_checked(addr, &name).await {
            (_, None) => made.push(name),
            (_, Some(e)) => {
                assert!(e.contains("too many known peers (at most 45)"), "{e}");
                refused += 1;
            }
        }
    }
    assert_eq!((made.len(), refused), (42, 18));
    until_metric(&[addr], "supersynk_direct_peers_online", 2.0).await;
    // Then 16 KB messages to those names, 200 of them (3.2 MB): the store stops at its bound.
    let (mut spammer, _) = Peer::login_checked(addr, "junk0").await;
    let filler = "x".repeat(16_000);
    let mut full = 0;
    for i in 0..200 {
        spammer
            .msg("junk0", &made[1 + i % (made.len() - 1)], &filler)
            .await;
        let e = spammer.error().await;
        if e.starts_with("the message store is full") {
            full += 1;
        } else {
            assert!(e.starts_with("connection to junk"), "{e}");
        }
    }
    assert!(full >= 130, "{full} refused");
    let file = std::fs::metadata(dir.join("messages.sqlite3"))
        .unwrap()
        .len();
    assert!(file <= bound * 2, "messages.sqlite3 is {file} bytes");
    // Known users are not affected: Alice reaches Carol, Bob logs in and gets his message.
    let sent = alice.msg("Alice", "Carol", "still here").await;
    assert_eq!(carol.next().await, sent);
    let mut bob = Peer::login(addr, "Bob").await;
    assert_eq!(bob.next().await, waiting);
}

#[tokio::test]
async fn the_message_store_bound_holds_in_postgresql_and_in_redis() {
    let schema = common::postgres::Schema::create("dm").await;
    let prefix = common::cluster::unique_prefix();
    let postgres = Settings {
        database_url: Some(schema.url()),
        ..Settings::default()
    };
    let redis = Settings {
        redis_url: Some(common::cluster::redis_url()),
        redis_prefix: Some(prefix.to_string()),
        ..Settings::default()
    };
    for backend in [postgres, redis] {
        let server = start(Settings {
            messages_store_bytes: Some(64 * 1024),
            ..backend
        })
        .await;
        let addr = server.local_addr;
        drop(Peer::login_checked(addr, "B").await);
        until_metric(&[addr], "supersynk_direct_peers_online", 0.0).await;
        let (mut a, _) = Peer::login_checked(addr, "A").await;
        let eight_kb = "y".repeat(8000);
        let mut queued = 0;
        let mut first_refusal = None;
        for _ in 0..12 {
            a.msg("A", "B", &eight_kb).await;
            let e = a.error().await;
            if e.starts_with("connection to B closed") {
                queued += 1;
            } else {
                first_refusal.get_or_insert(e);
            }
        }
        assert_eq!(queued, 8, "{first_refusal:?}");
        assert!(
            first_refusal
                .unwrap()
                .starts_with("the message store is full (65536 bytes")
        );
        // B takes its messages: the room they took is free again once they are removed.
        let mut b = Peer::login(addr, "B").await;
        for _ in 0..8 {
            assert!(b.next().await.contains(&eight_kb));
        }
        drop(b);
        until_metric(&[addr], "supersynk_direct_peers_online", 1.0).await;
        eventually("the store's bytes given back", async || {
            a.msg("A", "B", &eight_kb).await;
            let e = a.error().await;
            e.starts_with("connection to B closed").then_some(())
        })
        .await;
        server.shutdown().await;
    }
    schema.drop_schema().await;
}
