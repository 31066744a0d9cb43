//! Cluster mode against a real Redis: nodes as separate processes, the plugin's clients on
//! different nodes, nodes killed, Redis restarted. Each test uses its own key prefix, so
//! tests share the machine's Redis (127.0.0.1:6379, or `SUPERSYNK_TEST_REDIS`) without
//! seeing each other; the restart test runs a Redis of its own.

mod common;

use std::net::SocketAddr;

use common::cluster::*;
use common::*;
use supersynk_client::HunterClient;

/// A leader that creates `session` on the node at `addr`.
async fn first_leader(addr: SocketAddr, session: &str) -> HunterClient {
    let mut c = plugin(addr).await;
    join(&mut c, "L", session, true).await;
    assert_eq!(state(&mut c).await, (1, true));
    c
}

#[tokio::test]
async fn a_session_split_across_nodes_behaves_as_one() {
    let (redis, prefix) = (redis_url(), unique_prefix());
    let (_a_proc, a) = node(&redis, &prefix, &[]).await;
    let (_b_proc, b) = node(&redis, &prefix, &[]).await;
    let short_idle = [
        "--socket-timeout-ms",
        "1000",
        "--socket-timeout-check-interval-ms",
        "200",
    ];
    let (_c_proc, c) = node(&redis, &prefix, &short_idle).await;
    let session = "c3@uTKeQR3Mp:Hunter";
    let mut leader = first_leader(a, session).await;

    // A follower on another node sees the leader, and the leader sees it.
    let mut far = follower(b, "Far", session).await;
    assert_eq!(state(&mut far).await, (2, true));
    assert_eq!(state(&mut leader).await, (2, true));
    let mut near = follower(a, "Near", session).await;
    assert_eq!(state(&mut near).await, (3, true));
    assert_eq!(state(&mut leader).await, (3, true));
    assert_eq!(state(&mut far).await, (3, true));

    // Pushes reach followers on both nodes, unchanged and in order.
    for n in 0..20 {
        leader.send_text(&push(session, n)).await.unwrap();
    }
    for n in 0..20 {
        assert_eq!(recv_text(&mut far).await, push(session, n));
        assert_eq!(recv_text(&mut near).await, push(session, n));
    }

    // A follower that goes silent on node C times out there; the other nodes see it go.
    let mut sleepy = follower(c, "Sleepy", session).await;
    assert_eq!(state(&mut sleepy).await, (4, true));
    for member in [&mut leader, &mut near, &mut far] {
        assert_eq!(state(member).await, (4, true));
    }
    assert_eq!(close_code(&mut sleepy).await, Some(4000));
    for member in [&mut leader, &mut near, &mut far] {
        assert_eq!(state(member).await, (3, true));
    }

    // LeaveSession on node B.
    far.send_text(r#"{"type":"LeaveSession"}"#).await.unwrap();
    assert_eq!(state(&mut leader).await, (2, true));
    assert_eq!(state(&mut near).await, (2, true));

    // A leader that disconnects from node A.
    let mut far = follower(b, "Far2", session).await;
    assert_eq!(state(&mut far).await, (3, true));
    assert_eq!(state(&mut near).await, (3, true));
    drop(leader);
    assert_eq!(state(&mut far).await, (2, false));
    assert_eq!(state(&mut near).await, (2, false));

    // A session with no member on node B costs node B nothing.
    let b_received = metric(b, "supersynk_cluster_received_total").await;
    let a_forwarded = metric(a, "supersynk_cluster_forwarded_total").await;
    let (mut solo_leader, mut solo_follower) = pair(a, "solo").await;
    for n in 0..10 {
        solo_leader.send_text(&push("solo", n)).await.unwrap();
    }
    for n in 0..10 {
        assert_eq!(recv_text(&mut solo_follower).await, push("solo", n));
    }
    assert_eq!(
        metric(b, "supersynk_cluster_received_total").await,
        b_received
    );
    assert_eq!(
        metric(a, "supersynk_cluster_forwarded_total").await,
        a_forwarded
    );
}

#[tokio::test]
async fn a_killed_node_and_a_stopped_node_leave_their_sessions() {
    let (redis, prefix) = (redis_url(), unique_prefix());
    let fast = ["--node-timeout-ms", "1500"];
    let (_a_proc, a) = node(&redis, &prefix, &fast).await;
    let (b_proc, b) = node(&redis, &prefix, &fast).await;
    let (mut c_proc, c) = node(&redis, &prefix, &fast).await;
    let session = "3nodes:Hunter";
    let mut leader = first_leader(c, session).await;
    let mut on_a = follower(a, "A", session).await;
    assert_eq!(state(&mut on_a).await, (2, true));
    let mut on_b = follower(b, "B", session).await;
    assert_eq!(state(&mut on_b).await, (3, true));
    until_state(&mut on_a, (3, true)).await;
    until_state(&mut leader, (3, true)).await;
    leader.send_text(&push(session, 7)).await.unwrap();
    assert_eq!(recv_text(&mut on_a).await, push(session, 7));
    assert_eq!(recv_text(&mut on_b).await, push(session, 7));

    // SIGKILL: the node says nothing; the others notice its key expire.
    c_proc.0.kill().unwrap();
    c_proc.0.wait().unwrap();
    assert_eq!(state(&mut on_a).await, (2, false));
    assert_eq!(state(&mut on_b).await, (2, false));
    // One node removed the dead one, once.
    common::until_metric(&[a, b], "supersynk_cluster_nodes_reaped_total", 1.0).await;

    // SIGTERM: the node leaves the cluster as it stops, and node A is told at once.
    sigterm(&b_proc);
    assert_eq!(state(&mut on_a).await, (1, false));
    assert!(exits_cleanly(b_proc).await);
    common::until_metric(&[a], "supersynk_cluster_nodes", 1.0).await;
}

#[tokio::test]
async fn redis_restart_mid_session() {
    let redis = Redis::start(free_port());
    let (url, port, prefix) = (redis.url(), redis.port, unique_prefix());
    let (a_proc, a) = node(&url, &prefix, &[]).await;
    let (b_proc, b) = node(&url, &prefix, &[]).await;
    let session = "outage:Hunter";
    let mut leader = first_leader(a, session).await;
    let mut far = follower(b, "Far", session).await;
    assert_eq!(state(&mut far).await, (2, true));
    assert_eq!(state(&mut leader).await, (2, true));

    // Redis goes away (its data with it). Both nodes say so, and local delivery goes on.
    drop(redis);
    wait_for_health(a, "degraded").await;
    wait_for_health(b, "degraded").await;
    assert_eq!(metric(a, "supersynk_redis_up").await, 0.0);
    let mut near = follower(a, "Near", session).await;
    assert_eq!(state(&mut near).await, (3, true), "the last known count");
    assert_eq!(state(&mut leader).await, (3, true));
    leader.send_text(&push(session, 1)).await.unwrap();
    assert_eq!(recv_text(&mut near).await, push(session, 1));
    // The push could not reach the far follower's node, and that is counted.
    assert_eq!(metric(a, "supersynk_cluster_dropped_total").await, 1.0);

    // Redis comes back empty: the nodes reconnect and rewrite the cluster's state.
    let _redis = Redis::start(port);
    wait_for_health(a, "ok").await;
    wait_for_health(b, "ok").await;
    assert!(metric(a, "supersynk_redis_outages_total").await >= 1.0);
    // Counts agree everywhere again: a new member is seen by all.
    let mut late = follower(b, "Late", session).await;
    for member in [&mut late, &mut leader, &mut near, &mut far] {
        until_state(member, (4, true)).await;
    }
    // Pushes cross nodes again (the far follower missed push 1: Redis was down).
    leader.send_text(&push(session, 2)).await.unwrap();
    for member in [&mut near, &mut far, &mut late] {
        assert_eq!(next_push(member).await, push(session, 2));
    }
    drop((a_proc, b_proc));
}

/// Posts `body` to channel `key` on `addr`; returns (status, Server-Time, body).
async fn post_channel(
    addr: SocketAddr,
    key: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (u16, f64, String) {
    let (status, head, body) =
        http_with(addr, "POST", &format!("/api/channels/{key}"), headers, body).await;
    (status, server_time(&head), body)
}

fn server_time(head: &str) -> f64 {
    head.lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("server-time: ")
                .map(String::from)
        })
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

#[tokio::test]
async fn http_channels_are_shared_by_every_node() {
    let (redis, prefix) = (redis_url(), unique_prefix());
    let timeout = ["--channel-timeout-ms", "600"];
    let (_a_proc, a) = node(&redis, &prefix, &timeout).await;
    let (_b_proc, b) = node(&redis, &prefix, &timeout).await;

    // Requests alternate between the nodes, as behind a load balancer without stickiness.
    let (status, t1, others) = post_channel(a, "room", r#"{"client_id":"ada","x":1}"#, &[]).await;
    assert_eq!((status, others.as_str()), (200, "[]"));
    let (status, t2, others) = post_channel(b, "room", r#"{"client_id":"joe"}"#, &[]).await;
    assert_eq!(
        (status, others.as_str()),
        (200, r#"[{"client_id":"ada","x":1}]"#)
    );
    let (status, head, all) = http(a, "GET", "/api/channels/room", "").await;
    assert_eq!(status, 200);
    assert_eq!(all, r#"[{"client_id":"ada","x":1},{"client_id":"joe"}]"#);
    let t3 = server_time(&head);
    assert!(
        t1 <= t2 && t2 <= t3,
        "Server-Time never decreases: {t1} {t2} {t3}"
    );
    assert_eq!(http(b, "GET", "/api/channels", "").await.2, r#"["room"]"#);

    // Client-Time is checked across nodes: a late request on the other node changes nothing.
    let ordered = |t: &'static str| [("Client-Id", "ada"), ("Client-Time", t)];
    let late_body = r#"{"client_id":"ada","x":"late"}"#;
    assert_eq!(
        post_channel(a, "room", r#"{"client_id":"ada","x":2}"#, &ordered("10.5"))
            .await
            .0,
        200
    );
    assert_eq!(
        post_channel(b, "room", late_body, &ordered("10.4")).await.0,
        204
    );

    // A watcher on node B sees a change posted on node A.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{b}/api/channels/room/watch"))
        .await
        .unwrap();
    let first = next_json(&mut ws).await;
    assert_eq!(first[0]["x"], 2);
    post_channel(a, "room", r#"{"client_id":"ada","x":3}"#, &[]).await;
    let mut seen = next_json(&mut ws).await;
    while seen[0]["x"] != 3 {
        seen = next_json(&mut ws).await;
    }

    // Everyone falls silent: gone from both nodes after the timeout.
    let mut last = seen;
    while last != serde_json::json!([]) {
        last = next_json(&mut ws).await;
    }
    for n in [a, b] {
        assert_eq!(http(n, "GET", "/api/channels/room", "").await.2, "[]");
        assert_eq!(http(n, "GET", "/api/channels", "").await.2, "[]");
    }
}

#[tokio::test]
async fn http_channels_answer_503_while_redis_is_down() {
    let redis = Redis::start(free_port());
    let (url, port, prefix) = (redis.url(), redis.port, unique_prefix());
    let (_a_proc, a) = node(&url, &prefix, &[]).await;
    assert_eq!(
        post_channel(a, "c", r#"{"client_id":"ada"}"#, &[]).await.0,
        200
    );
    drop(redis);
    let (status, _, body) = post_channel(a, "c", r#"{"client_id":"joe"}"#, &[]).await;
    assert_eq!(status, 503);
    assert!(body.contains("channel store unavailable"), "{body}");
    // Back, empty: the API works again without a restart of the node.
    let _redis = Redis::start(port);
    let body = eventually("the store comes back", async || {
        let (status, _, body) = post_channel(a, "c", r#"{"client_id":"joe"}"#, &[]).await;
        (status == 200).then_some(body)
    })
    .await;
    assert_eq!(body, "[]");
}

#[tokio::test]
async fn a_node_starts_while_redis_is_down_and_joins_when_it_comes() {
    let port = free_port();
    let (url, prefix) = (format!("redis://127.0.0.1:{port}"), unique_prefix());
    let args = [
        "--port",
        "0",
        "--redis-url",
        &url,
        "--redis-prefix",
        &prefix,
    ];
    let (_a_proc, a) = spawn(&args, &[]);
    wait_for_health(a, "degraded").await;
    // Alone, it serves its own members at once.
    let (mut leader, mut near) = pair(a, "early:Hunter").await;
    leader.send_text(&push("early:Hunter", 1)).await.unwrap();
    assert_eq!(recv_text(&mut near).await, push("early:Hunter", 1));
    // Redis arrives: the node joins the cluster, and a second node sees its members.
    let _redis = Redis::start(port);
    wait_for_health(a, "ok").await;
    let (_b_proc, b) = node(&url, &prefix, &[]).await;
    let mut far = follower(b, "Far", "early:Hunter").await;
    until_state(&mut far, (3, true)).await;
    assert_eq!(state(&mut leader).await, (3, true));
    assert_eq!(state(&mut near).await, (3, true));
    leader.send_text(&push("early:Hunter", 2)).await.unwrap();
    assert_eq!(next_push(&mut far).await, push("early:Hunter", 2));
    assert_eq!(recv_text(&mut near).await, push("early:Hunter", 2));
}

#[tokio::test]
async fn a_member_that_leaves_and_comes_back_at_once_is_told_the_count() {
    // A member leaves a session (the last one on its node) and is back in it at once, as
    // when the plugin switches sessions back and forth: each time it must be told the count.
    // (Of the session it only passed through it may hear nothing: it left before that
    // session had read the other nodes.)
    let (redis, prefix) = (redis_url(), unique_prefix());
    let (_a_proc, a) = node(&redis, &prefix, &[]).await;
    let (_b_proc, b) = node(&redis, &prefix, &[]).await;
    let session = "rejoin:Hunter";
    let mut leader = first_leader(a, session).await;
    let mut far = follower(b, "Far", session).await;
    assert_eq!(state(&mut far).await, (2, true));
    let set = |id: &str| format!(r#"{{"sessionId":"{id}","type":"SetSession","isLeader":false}}"#);
    for _ in 0..10 {
        far.send_text(&set("elsewhere")).await.unwrap();
        far.send_text(&set(session)).await.unwrap();
        until_state(&mut far, (2, true)).await;
    }
    until_state(&mut leader, (2, true)).await;
}
