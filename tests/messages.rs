//! Direct messages (seed 002) over real sockets: delivery, the original's error texts, the
//! durable offline queue across restarts and kills, logins and bad input.

mod common;

use common::messages::{OFFLINE, Peer, TwoNodes, known_offline, logged_in, online};
use common::{WAIT, metric};
use futures::SinkExt;
use serde_json::json;
use supersynk::config::Settings;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn a_message_reaches_an_online_peer_unchanged_and_the_sender_hears_nothing() {
    let server = common::start_default().await;
    let addr = server.local_addr;
    let [mut a, mut b] = logged_in(addr, ["A", "B"]).await;
    let frame = r#"{"from": "A", "to":"B",  "msg":"hello \u00e9 B"}"#;
    a.text(frame).await;
    assert_eq!(b.next().await, frame);
    a.nothing_pending().await;
}

#[tokio::test]
async fn the_original_error_texts_and_the_queue() {
    let server = common::start_default().await;
    let addr = server.local_addr;
    let mut a = Peer::login(addr, "A").await;
    a.msg("A", "B", "who?").await;
    assert_eq!(a.error().await, "peer B does not exist");

    known_offline(addr, "B").await;
    let sent = a.msg("A", "B", "while you were away").await;
    assert_eq!(
        a.error().await,
        "connection to B closed, messages will be sent as B comes back online"
    );
    let mut b = Peer::login(addr, "B").await;
    assert_eq!(b.next().await, sent);
    b.nothing_pending().await;
}

#[tokio::test]
async fn queued_messages_from_several_senders_arrive_in_order_once() {
    let server = common::start_default().await;
    let addr = server.local_addr;
    known_offline(addr, "B").await;
    let mut a = Peer::login(addr, "A").await;
    let mut c = Peer::login(addr, "C").await;
    let mut sent = Vec::new();
    for i in 0..20 {
        let (p, name) = if i % 3 == 0 {
            (&mut c, "C")
        } else {
            (&mut a, "A")
        };
        sent.push(p.msg(name, "B", &format!("m{i}")).await);
        assert!(p.error().await.ends_with(OFFLINE));
    }
    let mut b = Peer::login(addr, "B").await;
    for s in &sent {
        assert_eq!(&b.next().await, s);
    }
    b.nothing_pending().await;
    drop(b);
    online(addr, 2.0).await;
    // Delivered once: the next login finds an empty queue, and a live message is next.
    let mut b = Peer::login(addr, "B").await;
    online(addr, 3.0).await;
    let live = a.msg("A", "B", "live").await;
    assert_eq!(b.next().await, live);
    assert_eq!(
        metric(addr, "supersynk_direct_messages_total{kind=\"drained\"}").await,
        20.0
    );
}

#[tokio::test]
async fn a_closed_socket_is_offline_at_once() {
    let server = common::start_default().await;
    let addr = server.local_addr;
    let [mut a, b] = logged_in(addr, ["A", "B"]).await;
    // Gone without a close frame: the TCP connection just ends.
    drop(b);
    online(addr, 1.0).await;
    a.msg("A", "B", "are you there").await;
    assert!(a.error().await.ends_with(OFFLINE));
}

#[tokio::test]
async fn messages_before_login_or_in_another_name_are_refused() {
    let server = common::start_default().await;
    let addr = server.local_addr;
    let mut b = Peer::login(addr, "B").await;
    let mut x = Peer::connect(addr).await;
    x.msg("X", "B", "hi").await;
    assert_eq!(
        x.error().await,
        r#"not logged in: send {"login":"<name>"} first"#
    );
    x.send(json!({"login": "X"})).await;
    x.msg("A", "B", "I am A").await;
    assert_eq!(
        x.error().await,
        "\"from\" must be the name this connection logged in with (X)"
    );
    x.send(json!({"login": "Y"})).await;
    assert_eq!(x.error().await, "already logged in as X");
    // Still usable, still X.
    let ok = x.msg("X", "B", "hi, X here").await;
    assert_eq!(b.next().await, ok);
    b.nothing_pending().await;
}

#[tokio::test]
async fn bad_input_gets_an_error_and_the_connection_stays_usable() {
    let server = common::start(Settings {
        messages_max_bytes: Some(200),
        ..Settings::default()
    })
    .await;
    let addr = server.local_addr;
    let mut b = Peer::login(addr, "B").await;
    let mut a = Peer::login(addr, "A").await;
    let cases: &[(&str, &str)] = &[
        ("{nope", "invalid JSON"),
        ("[1,2]", "expected a JSON object"),
        ("42", "expected a JSON object"),
        (r#"{"hello":1}"#, "expected {"),
        (r#"{"from":"A","to":"B"}"#, "missing field \"msg\""),
        (r#"{"from":"A","msg":"x"}"#, "missing field \"to\""),
        (
            r#"{"from":"A","to":"B","msg":7}"#,
            "\"msg\" must be a string",
        ),
        (
            r#"{"from":"A","to":["B"],"msg":"x"}"#,
            "\"to\" must be a string",
        ),
        (
            r#"{"from":"A","to":"B","msg":"x","x":1}"#,
            "unknown field \"x\"",
        ),
        (
            r#"{"from":"A","to":"","msg":"x"}"#,
            "\"to\": a peer name cannot be empty",
        ),
        (r#"{"login":null}"#, "\"login\" must be a string"),
    ];
    for (frame, error) in cases {
        a.text(frame).await;
        let got = a.error().await;
        assert!(got.starts_with(error), "{frame}: {got}");
    }
    let big = format!(r#"{{"from":"A","to":"B","msg":"{}"}}"#, "x".repeat(300));
    a.text(&big).await;
    assert_eq!(a.error().await, "message too large: at most 200 bytes");
    a.0.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(
        a.error().await,
        "binary frames are not supported: send JSON text"
    );
    let ok = a.msg("A", "B", "still here").await;
    assert_eq!(b.next().await, ok);
    b.nothing_pending().await;
}

#[tokio::test]
async fn a_full_queue_refuses_instead_of_losing() {
    let server = common::start(Settings {
        messages_queue_limit: Some(2),
        ..Settings::default()
    })
    .await;
    let addr = server.local_addr;
    known_offline(addr, "B").await;
    let mut a = Peer::login(addr, "A").await;
    let first = a.msg("A", "B", "1").await;
    assert!(a.error().await.ends_with(OFFLINE));
    let second = a.msg("A", "B", "2").await;
    assert!(a.error().await.ends_with(OFFLINE));
    a.msg("A", "B", "3").await;
    assert_eq!(
        a.error().await,
        "the queue of B is full (2 messages): message not stored"
    );
    let mut b = Peer::login(addr, "B").await;
    assert_eq!(b.next().await, first);
    assert_eq!(b.next().await, second);
    b.nothing_pending().await;
}

#[tokio::test]
async fn with_a_secret_logins_need_the_hmac_token_and_a_second_login_takes_over() {
    let secret = "s3cret";
    let server = common::start(Settings {
        messages_secret: Some(secret.into()),
        ..Settings::default()
    })
    .await;
    let addr = server.local_addr;
    let mut x = Peer::connect(addr).await;
    x.send(json!({"login": "A"})).await;
    assert_eq!(x.error().await, "login as A requires a token");
    x.send(json!({"login": "A", "token": "00ff"})).await;
    assert_eq!(x.error().await, "invalid token for A");
    x.send(json!({"login": "A", "token": supersynk::messages::login_token(secret, "B")}))
        .await;
    assert_eq!(x.error().await, "invalid token for A");

    // The documented token: HMAC-SHA256 of the name under the secret, in hex.
    let token = |n: &str| {
        use hmac::{Hmac, Mac};
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(n.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    };
    assert_eq!(token("A"), supersynk::messages::login_token(secret, "A"));
    let mut a1 = Peer::connect(addr).await;
    a1.send(json!({"login": "A", "token": token("A")})).await;
    let mut b = Peer::connect(addr).await;
    b.send(json!({"login": "B", "token": token("B").to_uppercase()}))
        .await;
    online(addr, 2.0).await;
    let mut a2 = Peer::connect(addr).await;
    a2.send(json!({"login": "A", "token": token("A")})).await;
    assert_eq!(
        a1.error().await,
        "A logged in from another connection: closing this one"
    );
    assert_eq!(a1.closed().await, Some(4009));
    let m = b.msg("B", "A", "to the new A").await;
    assert_eq!(a2.next().await, m);
}

#[tokio::test]
async fn the_original_clients_port_speaks_the_same_protocol_at_root() {
    let server = common::start(Settings {
        messages_port: Some(0),
        ..Settings::default()
    })
    .await;
    let compat = server.messages_addr.expect("the compatibility port is on");
    let mut a = Peer::connect_url(&format!("ws://{compat}/")).await;
    a.send(json!({"login": "A"})).await;
    // Peers on either port reach each other.
    let mut b = Peer::login(server.local_addr, "B").await;
    online(server.local_addr, 2.0).await;
    let m = a.msg("A", "B", "from the old port").await;
    assert_eq!(b.next().await, m);
    let m = b.msg("B", "A", "to the old port").await;
    assert_eq!(a.next().await, m);
}

/// Queues a message for B in a server process, stops it with `signal`, starts another on
/// the same data directory and checks B gets the message.
async fn survives(signal: &str) {
    let dir = common::data_dir();
    let dir = dir.to_str().unwrap();
    let (proc, addr) = common::spawn(&["--port", "0", "--data-dir", dir], &[]);
    known_offline(addr, "B").await;
    let mut a = Peer::login(addr, "A").await;
    let sent = a.msg("A", "B", &format!("before {signal}")).await;
    assert!(a.error().await.ends_with(OFFLINE));
    let status = std::process::Command::new("kill")
        .args([signal, &proc.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let _ = common::exits_cleanly(proc).await;

    let (_proc, addr) = common::spawn(&["--port", "0", "--data-dir", dir], &[]);
    let mut b = Peer::login(addr, "B").await;
    assert_eq!(b.next().await, sent);
    b.nothing_pending().await;
    // Known peers are kept too.
    let mut c = Peer::login(addr, "C").await;
    c.msg("C", "A", "A is still known").await;
    assert!(c.error().await.starts_with("connection to A closed"));
}

#[tokio::test]
async fn the_queue_survives_sigterm() {
    survives("-TERM").await;
}

#[tokio::test]
async fn the_queue_survives_sigkill() {
    survives("-KILL").await;
}

#[tokio::test]
async fn the_queue_in_postgresql_outlives_the_server() {
    let schema = common::postgres::Schema::create("dm").await;
    let settings = || Settings {
        database_url: Some(schema.url()),
        ..Settings::default()
    };
    let server = common::start(settings()).await;
    let addr = server.local_addr;
    known_offline(addr, "B").await;
    let mut a = Peer::login(addr, "A").await;
    let sent = a.msg("A", "B", "kept in PostgreSQL").await;
    assert!(a.error().await.ends_with(OFFLINE));
    drop(a);
    server.shutdown().await;

    // Another server (a fresh data directory: nothing local) on the same database.
    let server = common::start(settings()).await;
    let mut b = Peer::login(server.local_addr, "B").await;
    assert_eq!(b.next().await, sent);
    b.nothing_pending().await;
    schema.drop_schema().await;
}

#[tokio::test]
async fn in_a_cluster_peers_on_different_nodes_reach_each_other_and_share_the_queue() {
    let prefix = common::cluster::unique_prefix();
    let redis_url = common::cluster::redis_url();
    let nodes = TwoNodes::start(&redis_url, &prefix, true, Settings::default()).await;
    let (n1, n2) = nodes.addrs();
    let (mut a, mut b) = nodes.a_and_b().await;
    let m = a.msg("A", "B", "across nodes").await;
    assert_eq!(b.next().await, m);
    a.nothing_pending().await;

    // B goes offline on node two; the message waits in the shared queue, and B gets it
    // when it logs in on node one.
    drop(b);
    online(n2, 0.0).await;
    let queued = a.msg("A", "B", "queued for B").await;
    assert!(a.error().await.ends_with(OFFLINE));
    let mut b = Peer::login(n1, "B").await;
    assert_eq!(b.next().await, queued);

    // A second login on the other node takes over.
    let mut b2 = Peer::login(n2, "B").await;
    assert_eq!(
        b.error().await,
        "B logged in from another connection: closing this one"
    );
    assert_eq!(b.closed().await, Some(4009));
    online(n1, 1.0).await;
    let m = a.msg("A", "B", "to the newest B").await;
    assert_eq!(b2.next().await, m);
    nodes.drop_schema().await;
}

#[tokio::test]
async fn the_try_it_page_works_in_chromium() {
    common::browser::run("messages.mjs").await;
}

#[tokio::test]
async fn after_redis_restarts_empty_the_nodes_write_their_peers_back() {
    use common::cluster::Redis;
    let (redis, nodes, mut a, mut b) = TwoNodes::on_own_redis().await;
    let (redis_url, port) = (redis.url(), redis.port);

    // Redis restarts with nothing: where B is was lost with it.
    drop(redis);
    let _redis = Redis::start(port);
    common::messages::nodes_listening(&redis_url, "supersynk:", 2).await;
    let client = redis::Client::open(redis_url.as_str()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    common::eventually("B written back", async || {
        redis::cmd("EXISTS")
            .arg("supersynk:dm:peer:B")
            .query_async::<bool>(&mut con)
            .await
            .unwrap()
            .then_some(())
    })
    .await;
    let m = a.msg("A", "B", "after the restart").await;
    assert_eq!(b.next().await, m);
    a.nothing_pending().await;
    nodes.drop_schema().await;
}

/// Settings for tests that send hundreds of messages at once: no rate limit, a long queue.
fn unthrottled() -> Settings {
    Settings {
        messages_queue_limit: Some(10_000),
        ..common::unthrottled()
    }
}

/// Frames of about 15 KB, numbered, from A to B.
fn big_frames(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| json!({ "from": "A", "to": "B", "msg": format!("{i}:{}", "x".repeat(15_000)) }))
        .map(|v| v.to_string())
        .collect()
}

#[tokio::test]
async fn a_recipient_that_falls_behind_loses_nothing_and_holds_up_nobody() {
    let server = common::start(Settings {
        outbound_queue_bytes: Some(64 * 1024),
        ..unthrottled()
    })
    .await;
    let addr = server.local_addr;
    let mut a = Peer::login(addr, "A").await;
    let mut c = Peer::login(addr, "C").await;
    let mut b = Peer::login_slow_reader(addr, "B").await;
    online(addr, 3.0).await;

    // Far more than the kernel's buffers and B's outbound queue hold: the rest waits in
    // B's durable queue, and A is told nothing (every message will be delivered).
    let frames = big_frames(600);
    for f in &frames {
        a.text(f).await;
    }
    a.nothing_pending().await;
    assert!(metric(addr, r#"supersynk_direct_messages_total{kind="spilled"}"#).await > 0.0);

    // B, still not reading, holds up neither A nor A's messages to others.
    let m = a.msg("A", "C", "not stuck behind B").await;
    assert_eq!(c.next().await, m);

    // Once B reads, it gets every message, in order, once.
    for f in &frames {
        assert_eq!(&b.next().await, f);
    }
    let m = a.msg("A", "B", "after the backlog").await;
    assert_eq!(b.next().await, m);
    b.nothing_pending().await;
}

#[tokio::test]
async fn a_listening_peer_is_kept_alive_by_pings_and_a_dead_one_is_noticed() {
    let server = common::start(Settings {
        socket_timeout_ms: Some(600),
        socket_timeout_check_interval_ms: Some(100),
        messages_ping_interval_ms: Some(200),
        ..Settings::default()
    })
    .await;
    let addr = server.local_addr;
    // B only listens; its client answers the server's pings as it reads.
    let b = Peer::login(addr, "B").await;
    let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel();
    let listener = tokio::spawn(async move {
        let mut b = b;
        loop {
            let text = b.next().await;
            if got_tx.send(text).is_err() {
                return;
            }
        }
    });
    // D is connected but never reads again: no pongs, as a peer whose machine vanished.
    let d = Peer::login_slow_reader(addr, "D").await;
    online(addr, 2.0).await;
    // D goes offline within twice the ping interval; B stays, past the idle timeout too.
    online(addr, 1.0).await;
    // The scenario, not a wait: B outlives more than twice the idle timeout, and only D
    // was closed as idle.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(metric(addr, "supersynk_idle_timeouts_total").await, 1.0);
    let mut a = Peer::login(addr, "A").await;
    let m = a.msg("A", "B", "still there?").await;
    assert_eq!(got_rx.recv().await.as_deref(), Some(m.as_str()));
    a.msg("A", "D", "gone?").await;
    assert!(a.error().await.starts_with("connection to D closed"));
    listener.abort();
    drop(d);
}

#[tokio::test]
async fn a_message_over_the_rate_limit_is_answered_and_the_connection_stays() {
    let server = common::start(Settings {
        messages_per_second: Some(5),
        message_burst: Some(5),
        ..Settings::default()
    })
    .await;
    let addr = server.local_addr;
    let [mut a, mut c] = logged_in(addr, ["A", "C"]).await;
    let frames: Vec<String> = (0..20)
        .map(|i| json!({ "from": "A", "to": "C", "msg": i.to_string() }).to_string())
        .collect();
    for f in &frames {
        a.text(f).await;
    }
    // Every message is either delivered or answered: none is lost unseen.
    let mut refused = 0;
    let mut delivered = Vec::new();
    while refused + delivered.len() < frames.len() {
        tokio::select! {
            e = a.error() => {
                assert!(e.starts_with("rate limit: at most 5 messages per second"), "{e}");
                refused += 1;
            }
            m = c.next() => delivered.push(m),
        }
    }
    assert!(refused > 0 && !delivered.is_empty());
    // Delivered ones in the order sent.
    let mut expected = frames.iter().filter(|f| delivered.contains(f));
    assert!(delivered.iter().all(|d| Some(d) == expected.next()));
    // Once the rate allows again, the connection works as before: each try is either
    // answered as over the rate or delivered.
    common::eventually("a message delivered once the rate allows", async || {
        let m = a.msg("A", "C", "later").await;
        tokio::select! {
            e = a.error() => {
                assert!(e.starts_with("rate limit: at most 5 messages per second"), "{e}");
                None
            }
            got = c.next() => {
                assert_eq!(got, m);
                Some(())
            }
        }
    })
    .await;
}

#[tokio::test]
async fn in_a_cluster_a_stale_location_gets_the_message_queued_not_lost() {
    let prefix = common::cluster::unique_prefix();
    let settings = Settings {
        messages_queue_limit: Some(3),
        ..Settings::default()
    };
    let nodes = TwoNodes::start(&common::cluster::redis_url(), &prefix, true, settings).await;
    let (n1, n2) = nodes.addrs();

    // B was on node two; its entry in Redis outlives it (as after an outage there).
    let redis = redis::Client::open(common::cluster::redis_url()).unwrap();
    let mut con = redis.get_multiplexed_async_connection().await.unwrap();
    let key = format!("{}dm:peer:B", &*prefix);
    known_offline(n2, "B").await;
    let [mut b] = logged_in(n2, ["B"]).await;
    let node_two: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut con)
        .await
        .unwrap();
    drop(b);
    online(n2, 0.0).await;
    let () = redis::cmd("SET")
        .arg(&key)
        .arg(&node_two)
        .query_async(&mut con)
        .await
        .unwrap();

    // Node two answers that B is not there: the sender's node queues, and says so.
    let mut a = Peer::login(n1, "A").await;
    let mut queued = Vec::new();
    for i in 0..3 {
        queued.push(a.msg("A", "B", &format!("q{i}")).await);
        assert!(a.error().await.ends_with(OFFLINE));
    }
    a.msg("A", "B", "one too many").await;
    assert_eq!(
        a.error().await,
        "the queue of B is full (3 messages): message not stored"
    );
    b = Peer::login(n1, "B").await;
    for q in &queued {
        assert_eq!(&b.next().await, q);
    }
    b.nothing_pending().await;
    nodes.drop_schema().await;
}

#[tokio::test]
async fn in_a_cluster_without_postgresql_the_queue_is_shared_through_redis() {
    let prefix = common::cluster::unique_prefix();
    let redis_url = common::cluster::redis_url();
    let nodes = TwoNodes::start(&redis_url, &prefix, false, Settings::default()).await;
    let (n1, n2) = nodes.addrs();

    // B is known to every node once it logged in on one.
    known_offline(n2, "B").await;
    let mut a = Peer::login(n1, "A").await;
    let first = a.msg("A", "B", "queued on node one").await;
    assert!(a.error().await.ends_with(OFFLINE));
    drop(a);
    online(n1, 0.0).await;

    // Node one goes away; its queue was not its own.
    drop(nodes.one);
    let mut b = Peer::login(n2, "B").await;
    assert_eq!(b.next().await, first);
    b.nothing_pending().await;
}

#[tokio::test]
async fn a_takeover_while_the_queue_is_delivered_repeats_nothing() {
    let server = common::start(unthrottled()).await;
    let addr = server.local_addr;
    known_offline(addr, "B").await;
    let mut a = Peer::login(addr, "A").await;
    let mut sent = Vec::new();
    for i in 0..500 {
        sent.push(a.msg("A", "B", &format!("q{i}")).await);
        assert!(a.error().await.ends_with(OFFLINE));
    }

    // B logs in and starts getting its queue; a second login takes over mid-way.
    let mut first = Peer::login(addr, "B").await;
    let mut got_first = vec![first.next().await];
    let mut second = Peer::login(addr, "B").await;
    loop {
        let m = first.next().await;
        if m.contains("logged in from another connection") {
            break;
        }
        got_first.push(m);
    }
    // A last message goes behind whatever still waits, so it ends the second's share.
    let last = a.msg("A", "B", "last").await;
    let mut got_second = Vec::new();
    loop {
        let m = second.next().await;
        if m == last {
            break;
        }
        got_second.push(m);
    }

    // In order, nothing twice: the second connection goes on after the first's last.
    let index = |m: &String| sent.iter().position(|s| s == m).expect("a sent message");
    let all: Vec<usize> = got_first.iter().chain(&got_second).map(index).collect();
    assert!(
        all.windows(2).all(|w| w[0] < w[1]),
        "order or repeats: {all:?}"
    );
    assert_eq!(all.last(), Some(&499), "the queue was delivered to its end");
}

#[tokio::test]
async fn a_taken_over_connection_that_does_not_read_does_not_hold_up_the_new_one() {
    let server = common::start(unthrottled()).await;
    let addr = server.local_addr;
    known_offline(addr, "B").await;
    let mut a = Peer::login(addr, "A").await;
    let frames = big_frames(600);
    for f in &frames {
        a.text(f).await;
        assert!(a.error().await.ends_with(OFFLINE));
    }
    // A connection of B's that reads nothing gets what its socket takes, then is stuck.
    let stuck = Peer::login_slow_reader(addr, "B").await;
    let drained = r#"supersynk_direct_messages_total{kind="drained"}"#;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut last = -1.0;
    loop {
        // The observation window, not a wait for an event: "stuck" is a count that has not
        // moved for 300 ms, which nothing announces.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let now = metric(addr, drained).await;
        if now > 0.0 && now == last {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stuck B never got stuck"
        );
        last = now;
    }
    assert!(
        last < frames.len() as f64,
        "its socket took the whole queue"
    );
    // A new login takes over at once, and gets the queue from where the stuck one was.
    let mut b = Peer::login(addr, "B").await;
    let first = b.next().await;
    let from = frames
        .iter()
        .position(|f| *f == first)
        .expect("a queued frame");
    for f in &frames[from + 1..] {
        assert_eq!(&b.next().await, f);
    }
    drop(stuck);
}

#[tokio::test]
async fn in_a_cluster_a_redis_outage_does_not_reorder_a_sender_s_messages() {
    use common::cluster::Redis;
    let (redis, nodes, mut a, mut b) = TwoNodes::on_own_redis().await;
    let port = redis.port;

    // Redis goes for long enough that the nodes come back at different times; A sends
    // at once, one message at a time: some are queued (node two not listening yet), the
    // rest delivered.
    drop(redis);
    // Both nodes see the outage...
    let (n1, n2) = nodes.addrs();
    common::until_metric(&[n1, n2], "supersynk_redis_up", 0.0).await;
    // ...and it lasts: the scenario, not a wait. Three seconds take the nodes' reconnect
    // back-offs (up to 2 s and 5 s) apart, so they come back at different times.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let _redis = Redis::start(port);
    let mut sent = Vec::new();
    for i in 0..30 {
        sent.push(a.msg("A", "B", &i.to_string()).await);
        if let Some(answer) = a.next_within(200).await {
            assert!(answer.contains("connection to B closed"), "{answer}");
        }
    }
    // B gets them all, in the order A sent them.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    let mut got = Vec::new();
    while got.len() < sent.len() && tokio::time::Instant::now() < deadline {
        if let Some(m) = b.next_within(500).await {
            got.push(m);
        }
    }
    assert_eq!(got, sent);
    nodes.drop_schema().await;
}
