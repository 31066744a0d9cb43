//! The log front-end: the plugin's exact bodies, stamping and order, room routing, listener
//! lifetime and back-pressure, errors, access, persistence across restarts (SQLite and a
//! real PostgreSQL), the examples of protocol/logs.md, and the viewer in Chromium.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::logs::{
    entries, listener, msgs, plugin_entry, plugin_users, post, posted, query_until,
};
use common::postgres::Schema;
use common::{WAIT, eventually, eventually_within, http, http_with, metric};
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use supersynk::config::Settings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn plugin_bodies_are_stamped_in_order_and_routed_by_room() {
    let server = common::start_default().await;
    let addr = server.local_addr;
    // Each is registered (as the server counts it) before the next opens.
    let mut all = listener(addr, "").await;
    let mut room_a = listener(addr, "?room=A").await;
    let mut room_b = listener(addr, "?roomId=B").await;

    let before = supersynk::logs::entry::now_ms();
    // One object, then the plugin's batch of five (and a room-less entry).
    let (status, body) = post(addr, &plugin_entry("Hunter1", "A", "Info", "a1")).await;
    assert_eq!((status, body.as_str()), (200, ""));
    let batch = format!(
        "[{},{},{},{},{}]",
        plugin_entry("Hunter2", "B", "Warn", "b1"),
        plugin_entry("Hunter1", "A", "Error", "a2"),
        plugin_entry("Hunter3", "", "Info", "none1"),
        plugin_entry("Hunter2", "B", "Debug", "b2"),
        plugin_entry("Hunter1", "A", "Info", "a3"),
    );
    let (status, body) = post(addr, &batch).await;
    assert_eq!((status, body.as_str()), (200, ""));

    let got = entries(&mut all, 6).await;
    assert_eq!(msgs(&got), ["a1", "b1", "a2", "none1", "b2", "a3"]);
    let seqs: Vec<i64> = got
        .iter()
        .map(|e| e["seqNumber"].as_i64().unwrap())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[1] > w[0]),
        "strictly increasing: {seqs:?}"
    );
    for e in &got {
        let t = e["serverTime"].as_i64().unwrap();
        assert!(t >= before && t <= supersynk::logs::entry::now_ms());
        assert_eq!(e["timestamp"], 1700000000123i64);
    }
    // The plugin's fields come back exactly.
    let first: Value = serde_json::from_str(&plugin_entry("Hunter1", "A", "Info", "a1")).unwrap();
    for (k, v) in first.as_object().unwrap() {
        assert_eq!(&got[0][k], v, "field {k}");
    }
    assert_eq!(got[3]["room"], Value::Null, "an empty room is room-less");

    assert_eq!(
        msgs(&entries(&mut room_a, 4).await),
        ["a1", "a2", "none1", "a3"]
    );
    assert_eq!(msgs(&entries(&mut room_b, 3).await), ["b1", "none1", "b2"]);
    server.shutdown().await;
}

#[tokio::test]
async fn a_listener_that_goes_away_is_forgotten_at_once() {
    let server = common::start_default().await;
    let addr = server.local_addr;
    let mut ws = listener(addr, "?room=r").await;
    // The original's log page pings every 3 s and gets "pong".
    ws.send(Message::text("ping")).await.unwrap();
    loop {
        let m = tokio::time::timeout(common::WAIT, ws.next())
            .await
            .expect("an answer in time")
            .expect("open")
            .expect("no error");
        if m.to_text().unwrap() == "pong" {
            break;
        }
    }
    ws.close(None).await.unwrap();
    common::until_metric(&[addr], "supersynk_logs_listeners", 0.0).await;
    // A listener whose connection just drops is forgotten too.
    let ws = listener(addr, "").await;
    drop(ws);
    common::until_metric(&[addr], "supersynk_logs_listeners", 0.0).await;
    // Posting with nobody listening is fine.
    posted(addr, &plugin_entry("u", "r", "Info", "x")).await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_slow_listener_is_told_how_many_entries_it_missed() {
    let server = common::start(Settings {
        logs_listener_buffer_bytes: Some(64 * 1024),
        ..Settings::default()
    })
    .await;
    let addr = server.local_addr;
    // A listener that does not read, with a small receive buffer.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let (mut slow, _) = tokio_tungstenite::client_async(format!("ws://{addr}/logs/listen"), tcp)
        .await
        .unwrap();
    common::until_metric(&[addr], "supersynk_logs_listeners", 1.0).await;
    let big = "x".repeat(1000);
    let body = format!(
        "[{}]",
        vec![plugin_entry("u", "r", "Info", &big); 300].join(",")
    );
    let mut bodies = 0;
    eventually("the listener falls behind", async || {
        assert!(bodies < 100, "the listener never fell behind");
        posted(addr, &body).await;
        bodies += 1;
        (metric(addr, "supersynk_logs_listener_missed_total").await > 0.0).then_some(())
    })
    .await;
    // The server's memory did not grow with it: the listener is still connected, and once it
    // reads it is told how many entries it missed. Meanwhile entries larger than its whole
    // buffer keep coming: the notice and such an array go out together to a listener that
    // caught up, without closing it as a slow consumer.
    assert_eq!(metric(addr, "supersynk_logs_listeners").await, 1.0);
    let huge = format!("[{}]", plugin_entry("u", "r", "Info", &"h".repeat(200_000)));
    let poster = tokio::spawn(async move {
        loop {
            posted(addr, &huge).await;
            // The scenario, not a wait: a steady stream of huge entries.
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    });
    let mut next = async || -> Value {
        match slow.next().await {
            Some(Ok(Message::Text(t))) => serde_json::from_str(&t).unwrap(),
            other => panic!("the listener was closed: {other:?}"),
        }
    };
    let (missed, huge_after) = tokio::time::timeout(Duration::from_secs(30), async {
        let missed = loop {
            let v = next().await;
            if let Some(n) = v[0]["missed"].as_u64() {
                assert_eq!(v[0]["user"], "server");
                assert_eq!(v[0]["level"], "Warn");
                break n;
            }
        };
        let mut huge_after = 0;
        while huge_after < 3 {
            let v = next().await;
            huge_after += v
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["msg"].as_str().is_some_and(|m| m.starts_with("hhh")))
                .count();
        }
        (missed, huge_after)
    })
    .await
    .expect("a missed notice, then entries again");
    poster.abort();
    assert!(missed > 0 && huge_after >= 3);
    assert_eq!(
        metric(addr, "supersynk_slow_consumer_disconnects_total").await,
        0.0
    );
    server.shutdown().await;
}

#[tokio::test]
async fn bad_bodies_get_a_json_error_and_nothing_crashes() {
    let server = common::start(Settings {
        max_http_body_bytes: Some(4096),
        ..Settings::default()
    })
    .await;
    let addr = server.local_addr;
    for (body, want) in [
        ("{\"msg\":", "body is not valid JSON"),
        (
            "\"hello\"",
            "body must be a JSON object or an array of objects",
        ),
        ("[{\"msg\":\"ok\"},null]", "entry 1 is not a JSON object"),
        (
            "{\"timestamp\":\"now\"}",
            "entry 0: \"timestamp\" must be a number (unix ms)",
        ),
        ("[{\"level\":3}]", "entry 0: \"level\" must be a string"),
        ("", "body is not valid JSON"),
    ] {
        let (status, text) = post(addr, body).await;
        assert_eq!(status, 400, "{body}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(
            v["error"].as_str().unwrap().starts_with(want),
            "{body}: {v}"
        );
    }
    let (status, text) = post(addr, &format!("{{\"msg\":\"{}\"}}", "x".repeat(5000))).await;
    assert_eq!(status, 413);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(v["error"].as_str().unwrap().contains("4096"), "{v}");
    // A UTF-8 byte order mark before the JSON (some .NET writers send one) is fine.
    posted(addr, "\u{FEFF}{\"msg\":\"with a BOM\"}").await;
    // Nothing of a refused batch is kept, and the server still serves.
    let (status, _) = post(addr, "[{\"msg\":\"kept\"},{\"msg\":1}]").await;
    assert_eq!(status, 400);
    posted(addr, "{\"msg\":\"after\"}").await;
    let v = query_until(addr, "limit=10", |v| plugin_users(v).len() == 2).await;
    assert_eq!(msgs(&plugin_users(&v)), ["after", "with a BOM"]);
    server.shutdown().await;
}

/// Writes a raw request head (and `body`) and reads until the server answers and closes, or
/// `within` passes; returns the answer and how long it took.
async fn raw(addr: SocketAddr, head: &str, body: &[u8], within: Duration) -> (String, Duration) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let t0 = tokio::time::Instant::now();
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(body).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(within, tcp.read_to_end(&mut out))
        .await
        .expect("answered and closed in time")
        .unwrap();
    (String::from_utf8_lossy(&out).into_owned(), t0.elapsed())
}

#[tokio::test]
async fn oversized_declared_bodies_are_refused_at_once_and_stalled_ones_time_out() {
    let server = common::start(Settings {
        max_http_body_bytes: Some(4096),
        logs_body_timeout_ms: Some(300),
        ..Settings::default()
    })
    .await;
    let addr = server.local_addr;
    // A Content-Length over the limit: 413 without waiting for a byte of the body, and the
    // connection is closed (keep-alive requested).
    let (answer, took) = raw(
        addr,
        "POST /logs/add HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n",
        b"[",
        WAIT,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("at most 4096 bytes"), "{answer}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    // A body that stops coming: 408 after the body deadline, then closed.
    let (answer, took) = raw(
        addr,
        "POST /logs/add HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n",
        b"[{",
        WAIT,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("within 300 ms"), "{answer}");
    assert!(took >= Duration::from_millis(300), "{took:?}");
    // The server still serves.
    posted(addr, "{\"msg\":\"fine\"}").await;
    server.shutdown().await;
}

#[tokio::test]
async fn the_token_guards_viewer_listen_and_query_but_not_add() {
    let server = common::start(Settings {
        logs_token: Some("s3cret".into()),
        ..Settings::default()
    })
    .await;
    let addr = server.local_addr;
    posted(addr, &plugin_entry("u", "elsewhere", "Info", "open")).await;
    // The viewer page is open (it holds no entry and asks for the token: tests/browser.rs).
    let (status, _, body) = http(addr, "GET", "/logs.html", "").await;
    assert_eq!(status, 200);
    assert!(body.contains("login-form"));
    for path in ["/logs/query", "/logs/listen"] {
        let (status, head, body) = http(addr, "GET", path, "").await;
        assert_eq!(status, 401, "{path}");
        assert!(body.contains("token"), "{body}");
        assert!(
            head.to_ascii_lowercase()
                .contains("www-authenticate: bearer realm=\"supersynk logs\""),
            "{head}"
        );
        let (status, _, _) = http(addr, "GET", &format!("{path}?token=wrong"), "").await;
        assert_eq!(status, 401, "{path}");
    }
    let (status, head, body) = http(addr, "GET", "/logs.html?token=s3cret", "").await;
    assert_eq!(status, 200);
    assert!(head.to_ascii_lowercase().contains("text/html"));
    assert!(body.contains("supersynk logs"));
    // The auth scheme's name is case-insensitive (RFC 9110); the token is not.
    for (auth, want) in [
        ("Bearer s3cret", 200),
        ("bearer s3cret", 200),
        ("BEARER s3cret", 200),
        ("Bearer S3CRET", 401),
        ("Basic s3cret", 401),
    ] {
        let (status, _, _) =
            http_with(addr, "GET", "/logs/query", &[("Authorization", auth)], "").await;
        assert_eq!(status, want, "{auth}");
    }
    let (status, _, _) = http(addr, "GET", "/logs/query?token=%20s3cret", "").await;
    assert_eq!(status, 401, "the token exactly");
    assert!(
        tokio_tungstenite::connect_async(format!("ws://{addr}/logs/listen"))
            .await
            .is_err()
    );
    let mut ws = listener(addr, "?token=s3cret&room=r").await;
    post(addr, &plugin_entry("u", "r", "Info", "seen")).await;
    assert_eq!(msgs(&entries(&mut ws, 1).await), ["seen"]);
    server.shutdown().await;
}

#[tokio::test]
async fn add_is_rate_limited_per_client_address() {
    let server = common::start(Settings {
        logs_per_second: Some(2),
        trusted_proxies: Some(vec!["127.0.0.1/32".parse().unwrap()]),
        ..Settings::default()
    })
    .await;
    let addr = server.local_addr;
    let from = |ip: &'static str| [("X-Forwarded-For", ip)];
    let body = plugin_entry("u", "r", "Info", "x");
    let mut refused = 0;
    for _ in 0..10 {
        let (status, head, text) =
            http_with(addr, "POST", "/logs/add", &from("203.0.113.7"), &body).await;
        if status == 429 {
            refused += 1;
            assert!(text.contains("rate limit"), "{text}");
            assert!(
                head.to_ascii_lowercase().contains("retry-after: 1"),
                "{head}"
            );
        } else {
            assert_eq!(status, 200);
        }
    }
    assert!(refused >= 5, "refused {refused} of 10");
    // Another address has its own allowance.
    let (status, _, _) = http_with(addr, "POST", "/logs/add", &from("203.0.113.8"), &body).await;
    assert_eq!(status, 200);
    server.shutdown().await;
}

#[tokio::test]
async fn query_filters_and_pages_newest_first() {
    let server = common::start_default().await;
    let addr = server.local_addr;
    let batch: Vec<String> = (0..10)
        .map(|i| {
            let room = if i % 2 == 0 { "A" } else { "B" };
            let level = if i % 3 == 0 { "Error" } else { "Info" };
            let user = if i < 5 { "ann" } else { "bob" };
            plugin_entry(user, room, level, &format!("Message {i}"))
        })
        .collect();
    posted(addr, &format!("[{}]", batch.join(","))).await;
    let v = query_until(addr, "user=ann&limit=100", |v| plugin_users(v).len() == 5).await;
    assert_eq!(
        msgs(&plugin_users(&v)),
        [
            "Message 4",
            "Message 3",
            "Message 2",
            "Message 1",
            "Message 0"
        ]
    );
    let v = query_until(addr, "room=A&level=error", |_| true).await;
    assert_eq!(msgs(&plugin_users(&v)), ["Message 6", "Message 0"]);
    let v = query_until(addr, "text=message%209", |_| true).await;
    assert_eq!(msgs(&plugin_users(&v)), ["Message 9"]);
    // Pages of 3 with the cursor, plugin entries only.
    let mut seen = Vec::new();
    let mut q = "user=bob&limit=3".to_string();
    loop {
        let v = query_until(addr, &q, |_| true).await;
        seen.extend(msgs(&plugin_users(&v)).into_iter().map(String::from));
        match v["next"].as_str() {
            Some(c) => q = format!("user=bob&limit=3&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(
        seen,
        [
            "Message 9",
            "Message 8",
            "Message 7",
            "Message 6",
            "Message 5"
        ]
    );
    let now = supersynk::logs::entry::now_ms();
    let v = query_until(addr, &format!("since={}&user=ann", now + 60_000), |_| true).await;
    assert!(plugin_users(&v).is_empty());
    let v = query_until(addr, &format!("until={}&user=ann", now + 60_000), |_| true).await;
    assert_eq!(plugin_users(&v).len(), 5);
    // `level` may be repeated (the values combine); any other parameter only once.
    let v = query_until(addr, "room=A&level=error&level=info&user=ann", |_| true).await;
    assert_eq!(
        msgs(&plugin_users(&v)),
        ["Message 4", "Message 2", "Message 0"]
    );
    for bad in [
        "limit=0",
        "limit=abc",
        "since=yesterday",
        "cursor=zz",
        "user=ann&user=bob",
        "room=A&room=B",
    ] {
        let (status, _, body) = http(addr, "GET", &format!("/logs/query?{bad}"), "").await;
        assert_eq!(status, 400, "{bad}");
        assert!(serde_json::from_str::<Value>(&body).unwrap()["error"].is_string());
    }
    let (status, _, body) = http(addr, "GET", "/logs/listen?room=A&room=B", "").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("may be given only once"), "{body}");
    server.shutdown().await;
}

#[tokio::test]
async fn entries_survive_a_restart_of_the_binary_and_numbering_goes_on() {
    let dir = common::data_dir();
    let dir = dir.to_str().unwrap();
    let (proc, addr) = common::spawn(&["--port", "0", "--data-dir", dir], &[]);
    let batch = format!(
        "[{},{}]",
        plugin_entry("Hunter1", "R", "Info", "before restart 1"),
        plugin_entry("Hunter1", "R", "Warn", "before restart 2")
    );
    posted(addr, &batch).await;
    common::sigterm(&proc);
    assert!(common::exits_cleanly(proc).await);

    let (proc, addr) = common::spawn(&["--port", "0", "--data-dir", dir], &[]);
    let v = query_until(addr, "user=Hunter1", |v| plugin_users(v).len() == 2).await;
    let old = plugin_users(&v);
    assert_eq!(msgs(&old), ["before restart 2", "before restart 1"]);
    let old_max = old[0]["seqNumber"].as_i64().unwrap();
    // The server's own events went into the same stream and store.
    let v = query_until(addr, "user=server&text=listening", |v| {
        v["entries"].as_array().unwrap().len() >= 2
    })
    .await;
    assert_eq!(v["entries"][0]["level"], "Info");
    let mut ws = listener(addr, "?room=R").await;
    posted(addr, &plugin_entry("Hunter1", "R", "Info", "after")).await;
    let got = entries(&mut ws, 1).await;
    assert!(got[0]["seqNumber"].as_i64().unwrap() > old_max);
    common::sigterm(&proc);
    assert!(common::exits_cleanly(proc).await);
}

#[tokio::test]
async fn retention_keeps_the_newest_rows_and_shutdown_writes_what_is_queued() {
    let dir = common::data_dir();
    let server = common::start(Settings {
        data_dir: Some(dir.clone()),
        ..Settings::default()
    })
    .await;
    let batch: Vec<String> = (0..10)
        .map(|i| plugin_entry("keep", "r", "Info", &format!("m{i}")))
        .collect();
    posted(server.local_addr, &format!("[{}]", batch.join(","))).await;
    // At once: what is still queued for the store is written on the way out.
    server.shutdown().await;
    let server = common::start(Settings {
        data_dir: Some(dir.clone()),
        logs_retention_rows: Some(4),
        logs_server_level: Some("off".into()),
        ..Settings::default()
    })
    .await;
    let v = query_until(server.local_addr, "limit=100", |v| {
        v["entries"].as_array().unwrap().len() <= 4
    })
    .await;
    let kept = plugin_users(&v);
    assert_eq!(msgs(&kept), ["m9", "m8", "m7", "m6"]);
    server.shutdown().await;
}

#[tokio::test]
async fn postgres_store_keeps_entries_across_restarts() {
    let schema = Schema::create("logs_test").await;
    let settings = || Settings {
        database_url: Some(schema.url()),
        ..Settings::default()
    };
    let server = common::start(settings()).await;
    let batch: Vec<String> = (0..5)
        .map(|i| {
            plugin_entry(
                "pg",
                if i % 2 == 0 { "A" } else { "B" },
                "Info",
                &format!("p{i}"),
            )
        })
        .collect();
    posted(server.local_addr, &format!("[{}]", batch.join(","))).await;
    server.shutdown().await;
    // The rows are in the table the original dumper had, in this test's schema.
    let rows = schema
        .client
        .query(
            &format!(
                "SELECT msg, room, \"user\", level, text, client_time, server_time, seq_number FROM {}.log_entries WHERE \"user\" = 'pg' ORDER BY seq_number",
                schema.name
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 5);
    assert_eq!(rows[0].get::<_, String>(0), "p0");
    assert_eq!(rows[0].get::<_, i64>(5), 1700000000123);

    let server = common::start(settings()).await;
    let addr = server.local_addr;
    let v = query_until(addr, "user=pg&room=A", |v| plugin_users(v).len() == 3).await;
    assert_eq!(msgs(&plugin_users(&v)), ["p4", "p2", "p0"]);
    let old_max = v["entries"][0]["seqNumber"].as_i64().unwrap();
    let v = query_until(addr, "user=pg&limit=2", |_| true).await;
    let c = v["next"].as_str().unwrap().to_string();
    let v = query_until(addr, &format!("user=pg&limit=2&cursor={c}"), |_| true).await;
    assert_eq!(msgs(&plugin_users(&v)), ["p2", "p1"]);
    posted(addr, &plugin_entry("pg", "A", "Info", "new")).await;
    let v = query_until(addr, "user=pg&limit=1", |v| v["entries"][0]["msg"] == "new").await;
    assert!(v["entries"][0]["seqNumber"].as_i64().unwrap() > old_max);
    assert!(metric(addr, "supersynk_logs_stored_total").await >= 1.0);
    server.shutdown().await;
    schema.drop_schema().await;
}

#[tokio::test]
async fn a_failing_store_does_not_block_the_relay() {
    // A PostgreSQL nobody listens on: posting and listening go on; the failures are counted.
    let server = common::start(Settings {
        database_url: Some("postgres://postgres@127.0.0.1:1/none".into()),
        ..Settings::default()
    })
    .await;
    let addr = server.local_addr;
    let mut ws = listener(addr, "").await;
    for i in 0..3 {
        posted(addr, &plugin_entry("u", "r", "Info", &format!("{i}"))).await;
    }
    assert_eq!(msgs(&entries(&mut ws, 3).await), ["0", "1", "2"]);
    eventually("a store failure counted", async || {
        (metric(addr, "supersynk_logs_store_failures_total").await > 0.0).then_some(())
    })
    .await;
    let (status, _, body) = http(addr, "GET", "/logs/query", "").await;
    assert_eq!(status, 503, "{body}");
    server.shutdown().await;
}

/// Replays the request/answer pairs of protocol/logs.md. In answers, `serverTime`,
/// `seqNumber` and `next` only need the same JSON type as the example.
#[tokio::test]
async fn protocol_doc_examples_replay_against_the_server() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/protocol/logs.md")).unwrap();
    let server = common::start(Settings {
        logs_server_level: Some("off".into()),
        ..Settings::default()
    })
    .await;
    let addr = server.local_addr;
    let mut request: Option<String> = None;
    let mut pairs = 0;
    for (info, body) in common::fenced_blocks(&doc) {
        match info.as_str() {
            "http request" => request = Some(body),
            "http answer" => {
                let req = request.take().expect("an answer follows a request");
                let (head, req_body) = req.split_once("\n\n").unwrap_or((req.trim_end(), ""));
                let mut parts = head.lines().next().unwrap().split(' ');
                let (method, path) = (parts.next().unwrap(), parts.next().unwrap());
                let (want_status, want_body) = body
                    .trim_end()
                    .split_once('\n')
                    .unwrap_or((body.trim_end(), ""));
                let want_status: u16 = want_status.parse().unwrap();
                // Stored entries reach queries within a write batch: try again briefly.
                let mut last = (0, String::new());
                let answered = eventually_within(WAIT, async || {
                    let (status, _, got) = http(addr, method, path, req_body.trim_end()).await;
                    let ok = status == want_status
                        && if want_body.is_empty() {
                            got.is_empty()
                        } else {
                            let got: Value = serde_json::from_str(&got).unwrap_or(Value::Null);
                            let want: Value = serde_json::from_str(want_body).unwrap();
                            same_shape(&got, &want)
                        };
                    last = (status, got);
                    ok.then_some(())
                })
                .await;
                assert!(
                    answered.is_some(),
                    "{method} {path}: got {} {}, want {want_status} {want_body}",
                    last.0,
                    last.1
                );
                pairs += 1;
            }
            _ => {}
        }
    }
    assert!(pairs >= 5, "found {pairs} pairs");
    server.shutdown().await;
}

fn same_shape(got: &Value, want: &Value) -> bool {
    match (got, want) {
        (Value::Object(g), Value::Object(w)) => {
            g.len() == w.len()
                && w.iter().all(|(k, wv)| match g.get(k) {
                    Some(gv) if ["serverTime", "seqNumber", "next"].contains(&k.as_str()) => {
                        std::mem::discriminant(gv) == std::mem::discriminant(wv)
                            || (gv.is_number() && wv.is_number())
                    }
                    Some(gv) => same_shape(gv, wv),
                    None => false,
                })
        }
        (Value::Array(g), Value::Array(w)) => {
            g.len() == w.len() && g.iter().zip(w).all(|(g, w)| same_shape(g, w))
        }
        _ => got == want,
    }
}

#[tokio::test]
async fn viewer_in_chromium_shows_filters_and_reconnects() {
    common::browser::run("logs.mjs").await;
}

#[tokio::test]
async fn in_a_cluster_a_listener_on_any_node_sees_every_node_s_entries() {
    let prefix = common::cluster::unique_prefix();
    let settings = || Settings {
        redis_url: Some(common::cluster::redis_url()),
        redis_prefix: Some(prefix.to_string()),
        ..Settings::default()
    };
    let one = common::start(settings()).await;
    let two = common::start(settings()).await;
    // Both nodes follow the channel before anything is posted.
    let client = redis::Client::open(common::cluster::redis_url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let channel = format!("{}logs:live", &*prefix);
    eventually("both nodes subscribed", async || {
        let (_, n): (String, i64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&channel)
            .query_async(&mut con)
            .await
            .unwrap();
        (n == 2).then_some(())
    })
    .await;
    let mut on_two = listener(two.local_addr, "?room=r").await;
    let body = format!(
        "[{},{}]",
        plugin_entry("Hunter", "r", "Info", "posted to node one"),
        plugin_entry("Other", "elsewhere", "Info", "another room")
    );
    posted(one.local_addr, &body).await;
    posted(
        two.local_addr,
        &plugin_entry("Hunter", "r", "Warn", "posted to node two"),
    )
    .await;
    let mut got = entries(&mut on_two, 2).await;
    got.sort_by_key(|e| e["msg"].as_str().unwrap().to_string());
    assert_eq!(msgs(&got), ["posted to node one", "posted to node two"]);
    // Stamped by the node that received it.
    assert!(got[0]["seqNumber"].as_i64().is_some() && got[0]["serverTime"].as_i64().is_some());
}

/// `s` percent-encoded for a query string.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Posts an entry with non-ASCII capitals and checks that every spelling finds it (and
/// the entries of `also`, stored earlier), on whatever store the server has.
async fn search_ignores_case_in_any_script(addr: SocketAddr, also: &[&str]) {
    let entry = r#"{"timestamp":1700000000123,"level":"Info","msg":"Ärger mit ÉCOLE","text":"22:13:20:123 [Info] Ärger mit ÉCOLE","user":"uni","room":"r"}"#;
    posted(addr, entry).await;
    let mut want: Vec<&str> = vec!["uni"];
    want.extend(also);
    for needle in ["Ärger", "ärger", "ÄRGER", "ÉCOLE", "école", "r mit é"] {
        let q = format!("text={}", encode(needle));
        let v = query_until(addr, &q, |v| {
            v["entries"].as_array().unwrap().len() == want.len()
        })
        .await;
        let users: Vec<&str> = v["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["user"].as_str().unwrap())
            .collect();
        assert_eq!(users, want, "{needle}");
    }
    let v = query_until(addr, "text=%C3%A4rgerlich", |_| true).await;
    assert!(v["entries"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn sqlite_text_search_ignores_case_in_any_script() {
    let server = common::start_default().await;
    search_ignores_case_in_any_script(server.local_addr, &[]).await;
    server.shutdown().await;
}

#[tokio::test]
async fn postgres_keeps_every_good_entry_of_a_batch_and_migrates_an_old_table() {
    let schema = Schema::create("logs_test").await;
    // A table as the previous version made it (no `search`, no `log_meta`), with a row.
    schema
        .client
        .batch_execute(&format!(
            "CREATE TABLE {0}.log_entries (id BIGSERIAL PRIMARY KEY, seq_number BIGINT NOT NULL, \
             server_time BIGINT NOT NULL, client_time BIGINT, level TEXT, msg TEXT, \"user\" TEXT, \
             room TEXT, text TEXT);
             INSERT INTO {0}.log_entries (seq_number, server_time, level, msg, \"user\", text) \
             VALUES (41, (extract(epoch from now()) * 1000)::bigint, 'Info', 'old Ärger mit ÉCOLE', \
             'old', '00:00 [Info] old Ärger mit ÉCOLE')",
            schema.name
        ))
        .await
        .unwrap();
    let server = common::start(Settings {
        database_url: Some(schema.url()),
        ..Settings::default()
    })
    .await;
    let addr = server.local_addr;
    // A NUL is replaced (PostgreSQL text cannot hold it), and costs nobody anything.
    let body = r#"[{"msg":"innocent 1","user":"victim"},{"msg":"a\u0000b","user":"evil"},{"msg":"innocent 2","user":"victim"}]"#;
    posted(addr, body).await;
    let v = query_until(addr, "user=victim", |v| plugin_users(v).len() == 2).await;
    assert_eq!(msgs(&plugin_users(&v)), ["innocent 2", "innocent 1"]);
    assert!(v["entries"][0]["seqNumber"].as_i64().unwrap() > 41);
    let v = query_until(addr, "user=evil", |v| plugin_users(v).len() == 1).await;
    assert_eq!(v["entries"][0]["msg"], "a\u{FFFD}b");
    // New rows and the old one (once filled in) are found in any case.
    search_ignores_case_in_any_script(addr, &["old"]).await;
    // A store that refuses one entry for good (here a constraint; a LATIN1 database refuses
    // what it cannot encode the same way) keeps the others of its batch.
    schema
        .client
        .batch_execute(&format!(
            "ALTER TABLE {}.log_entries ADD CONSTRAINT refuse CHECK (\"user\" <> 'refused')",
            schema.name
        ))
        .await
        .unwrap();
    let body = r#"[{"msg":"kept 1","user":"ok"},{"msg":"x","user":"refused"},{"msg":"kept 2","user":"ok"}]"#;
    posted(addr, body).await;
    let v = query_until(addr, "user=ok", |v| plugin_users(v).len() == 2).await;
    assert_eq!(msgs(&plugin_users(&v)), ["kept 2", "kept 1"]);
    assert_eq!(
        metric(addr, "supersynk_logs_store_refused_total").await,
        1.0
    );
    assert_eq!(
        metric(addr, "supersynk_logs_store_dropped_total").await,
        1.0
    );
    server.shutdown().await;
    schema.drop_schema().await;
}

/// The numbers a listener saw.
fn seqs(entries: &[Value]) -> Vec<i64> {
    entries
        .iter()
        .map(|e| e["seqNumber"].as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn seq_numbers_are_never_handed_out_twice_across_sigkill_and_retention() {
    let dir = common::data_dir();
    let file = dir.join("logs.sqlite3");
    let args = [
        "--port",
        "0",
        "--data-dir",
        dir.to_str().unwrap(),
        "--logs-server-level",
        "off",
    ];
    let (mut proc, addr) = common::spawn(&args, &[]);
    let mut ws = listener(addr, "").await;
    posted(addr, &plugin_entry("u", "r", "Info", "stored")).await;
    let mut seen = seqs(&entries(&mut ws, 1).await);
    query_until(addr, "user=u", |v| plugin_users(v).len() == 1).await;
    // Another process holds the database's write lock: what is posted now waits in the queue.
    let lock = rusqlite::Connection::open(&file).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let queued: Vec<String> = (0..5)
        .map(|i| plugin_entry("u", "r", "Info", &format!("queued {i}")))
        .collect();
    posted(addr, &format!("[{}]", queued.join(","))).await;
    seen.extend(seqs(&entries(&mut ws, 5).await));
    // SIGKILL: the queue is lost (protocol/logs.md says so), its numbers are not reused.
    proc.0.kill().unwrap();
    proc.0.wait().unwrap();
    drop(lock);
    let (proc, addr) = common::spawn(&args, &[]);
    let mut ws = listener(addr, "").await;
    posted(addr, &plugin_entry("u", "r", "Info", "after kill")).await;
    let after = seqs(&entries(&mut ws, 1).await)[0];
    assert!(seen.iter().all(|s| after > *s), "{after} after {seen:?}");
    seen.push(after);
    let v = query_until(addr, "user=u", |v| plugin_users(v).len() == 2).await;
    assert_eq!(msgs(&plugin_users(&v)), ["after kill", "stored"]);
    common::sigterm(&proc);
    assert!(common::exits_cleanly(proc).await);
    // Every entry older than the retention: the next start empties the table.
    let db = rusqlite::Connection::open(&file).unwrap();
    db.execute(
        "UPDATE log_entries SET server_time = server_time - 40 * 86400000",
        [],
    )
    .unwrap();
    drop(db);
    let (proc, addr) = common::spawn(&args, &[]);
    query_until(addr, "limit=10", |v| {
        v["entries"].as_array().unwrap().is_empty()
    })
    .await;
    common::sigterm(&proc);
    assert!(common::exits_cleanly(proc).await);
    let (proc, addr) = common::spawn(&args, &[]);
    let mut ws = listener(addr, "").await;
    posted(addr, &plugin_entry("u", "r", "Info", "emptied")).await;
    let last = seqs(&entries(&mut ws, 1).await)[0];
    assert!(seen.iter().all(|s| last > *s), "{last} after {seen:?}");
    common::sigterm(&proc);
    assert!(common::exits_cleanly(proc).await);
}

#[tokio::test]
async fn without_a_store_entries_are_live_only_and_counted_as_not_stored() {
    let dir = common::data_dir();
    let not_a_dir = dir.join("a-file");
    std::fs::write(&not_a_dir, "x").unwrap();
    let server = common::start(Settings {
        data_dir: Some(not_a_dir),
        ..Settings::default()
    })
    .await;
    let addr = server.local_addr;
    let mut ws = listener(addr, "").await;
    let batch: Vec<String> = (0..3)
        .map(|i| plugin_entry("u", "r", "Info", &format!("live {i}")))
        .collect();
    posted(addr, &format!("[{}]", batch.join(","))).await;
    assert_eq!(
        msgs(&entries(&mut ws, 3).await),
        ["live 0", "live 1", "live 2"]
    );
    // Counted as not stored, and nothing waits for a store.
    assert_eq!(
        metric(addr, "supersynk_logs_store_dropped_total").await,
        3.0
    );
    assert_eq!(metric(addr, "supersynk_logs_store_queue_bytes").await, 0.0);
    let (status, _, _) = http(addr, "GET", "/logs/query", "").await;
    assert_eq!(status, 503);
    server.shutdown().await;
}

#[tokio::test]
async fn the_store_queue_is_bounded_in_bytes_while_the_store_is_held_up() {
    let dir = common::data_dir();
    let server = common::start(Settings {
        data_dir: Some(dir.clone()),
        logs_store_queue_bytes: Some(300_000),
        ..Settings::default()
    })
    .await;
    let addr = server.local_addr;
    let mut ws = listener(addr, "").await;
    let lock = rusqlite::Connection::open(dir.join("logs.sqlite3")).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    // Eight entries of 100 KB: two fit in 300 KB, the other six are not stored.
    let big = "x".repeat(100_000);
    let batch: Vec<String> = (0..8)
        .map(|i| format!(r#"{{"msg":"big {i} {big}","user":"big"}}"#))
        .collect();
    posted(addr, &format!("[{}]", batch.join(","))).await;
    // Listeners get every one.
    assert_eq!(entries(&mut ws, 8).await.len(), 8);
    assert_eq!(
        metric(addr, "supersynk_logs_store_dropped_total").await,
        6.0
    );
    let queued = metric(addr, "supersynk_logs_store_queue_bytes").await;
    assert!(queued > 200_000.0 && queued <= 300_000.0, "{queued}");
    // The store comes back: the two are written and their bytes released.
    drop(lock);
    common::until_metric(&[addr], "supersynk_logs_stored_total", 2.0).await;
    common::until_metric(&[addr], "supersynk_logs_store_queue_bytes", 0.0).await;
    let v = query_until(addr, "user=big", |v| plugin_users(v).len() == 2).await;
    let users = plugin_users(&v);
    let stored: Vec<&str> = msgs(&users).into_iter().map(|m| &m[..5]).collect();
    assert_eq!(stored, ["big 1", "big 0"]);
    server.shutdown().await;
}

#[tokio::test]
async fn a_listener_that_only_receives_is_pinged_not_closed_as_idle() {
    let server = common::start(Settings {
        socket_timeout_ms: Some(400),
        socket_timeout_check_interval_ms: Some(50),
        ..Settings::default()
    })
    .await;
    let addr = server.local_addr;
    let mut ws = listener(addr, "").await;
    // Three idle timeouts pass; the client sends nothing but answers the server's pings
    // (tungstenite does while it reads).
    let until = tokio::time::Instant::now() + Duration::from_millis(1200);
    let mut pings = 0;
    loop {
        match tokio::time::timeout_at(until, ws.next()).await {
            Err(_) => break,
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            Ok(Some(Ok(Message::Text(_)))) => {}
            other => panic!("the listener was closed: {other:?}"),
        }
    }
    assert!(pings >= 2, "{pings} pings");
    posted(addr, &plugin_entry("u", "r", "Info", "still here")).await;
    assert_eq!(msgs(&entries(&mut ws, 1).await), ["still here"]);
    server.shutdown().await;
}
