//! The HunterPie protocol over real sockets, driven the way the deployed plugin drives it.

mod common;

use common::*;
use futures::{SinkExt, StreamExt};
use supersynk::config::Settings;
use supersynk_client::HunterClient;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn version_status_health_and_metrics() {
    let server = start_default().await;
    let addr = server.local_addr;
    let (status, _, body) = http(addr, "GET", "/version", "").await;
    assert_eq!((status, body.as_str()), (200, "0.1"));
    let (status, _, body) = http(addr, "GET", "/", "").await;
    assert_eq!(status, 200);
    for id in ["sessions", "sockets", "bytes-relayed", "uptime"] {
        assert!(
            body.contains(&format!("id={id}>")),
            "status page shows {id}: {body}"
        );
    }
    assert_eq!(http(addr, "GET", "/healthz", "").await.0, 200);
    let (status, _, body) = http(addr, "GET", "/metrics", "").await;
    assert_eq!(status, 200);
    assert!(body.contains("supersynk_connections_open"));
    assert_eq!(http(addr, "GET", "/nope", "").await.0, 404);
    // A plain GET on /connect is not an upgrade.
    assert_eq!(http(addr, "GET", "/connect", "").await.0, 400);
}

#[tokio::test]
async fn plugin_session_with_compression_end_to_end() {
    let server = start_default().await;
    let addr = server.local_addr;
    let mut leader = plugin(addr).await;
    assert!(
        leader.deflate,
        "server agreed to permessage-deflate: {}",
        leader.handshake
    );
    let ext = leader
        .handshake
        .lines()
        .find(|l| {
            l.to_ascii_lowercase()
                .starts_with("sec-websocket-extensions")
        })
        .unwrap();
    assert!(
        ext.contains("server_no_context_takeover") && ext.contains("client_no_context_takeover"),
        "{ext}"
    );

    join(&mut leader, "Host", "c3@uTKeQR3Mp:Host", true).await;
    assert_eq!(state(&mut leader).await, (1, true));

    let mut follower = plugin(addr).await;
    join(&mut follower, "Friend", "c3@uTKeQR3Mp:Host", false).await;
    assert_eq!(state(&mut follower).await, (2, true));
    assert_eq!(state(&mut leader).await, (2, true));

    // Relayed byte for byte, in order, compressed once the message is long enough.
    let pushes: Vec<String> = (0..50).map(|n| push("c3@uTKeQR3Mp:Host", n)).collect();
    for p in &pushes {
        leader.send_text(p).await.unwrap();
    }
    for p in &pushes {
        let got = tokio::time::timeout(WAIT, follower.next_text())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(&got, p);
    }
    // The two sessionstates are short (under the 50-byte threshold? no: ~64 bytes) and the
    // pushes long: everything above the threshold arrives compressed.
    assert!(
        follower.inflated_messages() >= 50,
        "pushes arrived compressed"
    );

    // The leader never receives its own pushes: the next thing it sees is the leave.
    drop(follower);
    assert_eq!(state(&mut leader).await, (1, true));
}

#[tokio::test]
async fn small_messages_are_not_compressed() {
    let server = start(Settings {
        deflate_threshold: Some(1000),
        ..Default::default()
    })
    .await;
    let mut a = plugin(server.local_addr).await;
    join(&mut a, "A", "s", true).await;
    state(&mut a).await;
    a.send_text("ping").await.unwrap();
    assert_eq!(recv(&mut a).await, "pong");
    assert_eq!(a.inflated_messages(), 0);
}

#[tokio::test]
async fn works_without_compression() {
    let server = start_default().await;
    let mut leader = HunterClient::connect(server.local_addr, "/connect", false)
        .await
        .unwrap();
    assert!(!leader.deflate);
    let mut follower = HunterClient::connect(server.local_addr, "/connect", false)
        .await
        .unwrap();
    join(&mut leader, "L", "plain", true).await;
    state(&mut leader).await;
    join(&mut follower, "F", "plain", false).await;
    state(&mut follower).await;
    leader.send_text(&push("plain", 1)).await.unwrap();
    assert_eq!(recv(&mut follower).await["data"][0][0], "em_001");
}

#[tokio::test]
async fn pushes_reach_only_the_followers_of_the_leaders_session() {
    let server = start_default().await;
    let addr = server.local_addr;
    let mut leader = plugin(addr).await;
    let mut mine = plugin(addr).await;
    let mut other = plugin(addr).await;
    join(&mut leader, "L", "A", true).await;
    state(&mut leader).await;
    join(&mut mine, "M", "A", false).await;
    state(&mut mine).await;
    state(&mut leader).await;
    join(&mut other, "O", "B", false).await;
    assert_eq!(state(&mut other).await, (1, false));

    leader.send_text(&push("A", 7)).await.unwrap();
    assert_eq!(recv(&mut mine).await["data"][0][0], "em_007");

    // A push naming another session is refused, and B sees nothing.
    leader.send_text(&push("B", 8)).await.unwrap();
    assert!(servermsg(&mut leader).await.contains("not your session"));
    // A follower's push is refused.
    mine.send_text(&push("A", 9)).await.unwrap();
    assert!(
        servermsg(&mut mine)
            .await
            .contains("only the session leader")
    );
    // Proof that B received nothing: its next message is the answer to its own ping.
    other.send_text("ping").await.unwrap();
    assert_eq!(recv(&mut other).await, "pong");
    // And the leader did not get the follower's push either.
    leader.send_text("ping").await.unwrap();
    assert_eq!(recv(&mut leader).await, "pong");
}

#[tokio::test]
async fn membership_changes_are_announced_to_every_member() {
    let server = start_default().await;
    let addr = server.local_addr;
    let mut leader = plugin(addr).await;
    let mut f1 = plugin(addr).await;
    let mut f2 = plugin(addr).await;
    join(&mut leader, "L", "S", true).await;
    assert_eq!(state(&mut leader).await, (1, true));
    join(&mut f1, "F1", "S", false).await;
    assert_eq!(state(&mut f1).await, (2, true));
    assert_eq!(state(&mut leader).await, (2, true));
    join(&mut f2, "F2", "S", false).await;
    assert_eq!(state(&mut f2).await, (3, true));
    assert_eq!(state(&mut f1).await, (3, true));
    assert_eq!(state(&mut leader).await, (3, true));

    // Session switch: the old session hears it.
    join(&mut f2, "F2", "Elsewhere", false).await;
    assert_eq!(state(&mut f2).await, (1, false));
    assert_eq!(state(&mut f1).await, (2, true));
    assert_eq!(state(&mut leader).await, (2, true));

    // The leader leaves (LeaveSession): its socket is closed, the follower is told.
    leader
        .send_text(r#"{"type":"LeaveSession"}"#)
        .await
        .unwrap();
    assert_eq!(close_code(&mut leader).await, Some(1000));
    assert_eq!(state(&mut f1).await, (1, false));

    // README spelling `Close` works too.
    f2.send_text(r#"{"type":"Close"}"#).await.unwrap();
    assert_eq!(close_code(&mut f2).await, Some(1000));

    // Empty session id: told, and removed from the session.
    let mut f3 = plugin(addr).await;
    join(&mut f3, "F3", "S", false).await;
    assert_eq!(state(&mut f3).await, (2, false));
    assert_eq!(state(&mut f1).await, (2, false));
    f3.send_text(r#"{"type":"SetSession","sessionId":"","isLeader":false}"#)
        .await
        .unwrap();
    assert_eq!(servermsg(&mut f3).await, "Session id cannot be empty!");
    assert_eq!(state(&mut f1).await, (1, false));

    // A vanished socket (no close frame) counts as a leave.
    f3.send_text(r#"{"type":"SetSession","sessionId":"S","isLeader":true}"#)
        .await
        .unwrap();
    assert_eq!(state(&mut f3).await, (2, true));
    assert_eq!(state(&mut f1).await, (2, true));
    drop(f3);
    assert_eq!(state(&mut f1).await, (1, false));
}

#[tokio::test]
async fn type_is_case_insensitive_and_ping_text_gets_pong() {
    let server = start_default().await;
    let mut c = plugin(server.local_addr).await;
    c.send_text(r#"{"type":"setname","name":"x"}"#)
        .await
        .unwrap();
    c.send_text(r#"{"type":"SETSESSION","sessionId":"q","isLeader":true}"#)
        .await
        .unwrap();
    assert_eq!(state(&mut c).await, (1, true));
    c.send_text("ping").await.unwrap();
    assert_eq!(recv(&mut c).await, "pong");
}

#[tokio::test]
async fn ping_frames_are_answered() {
    let server = start_default().await;
    let mut c = plugin(server.local_addr).await;
    c.ws.send(Message::Ping(vec![1, 2, 3, 4, 5, 6, 7, 8].into()))
        .await
        .unwrap();
    let got = tokio::time::timeout(WAIT, c.ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got, Message::Pong(vec![1, 2, 3, 4, 5, 6, 7, 8].into()));
}

#[tokio::test]
async fn bad_input_gets_an_answer_and_the_connection_carries_on() {
    let server = start_default().await;
    let addr = server.local_addr;
    // A healthy session beside the misbehaving client.
    let (mut leader, mut follower) = pair(addr, "healthy").await;

    let mut bad = plugin(addr).await;
    let cases = [
        ("{not json", "Invalid JSON"),
        ("[1,2,3]", "JSON object"),
        ("42", "JSON object"),
        ("{}", "Missing \"type\""),
        (r#"{"type":12}"#, "\"type\" must be a string"),
        (r#"{"type":"Dance"}"#, "Unknown message type \"Dance\""),
        (
            r#"{"type":"SetSession","sessionId":5}"#,
            "\"sessionId\" must be a string",
        ),
        (
            r#"{"type":"SetSession","sessionId":"x","isLeader":"yes"}"#,
            "\"isLeader\" must be true or false",
        ),
        (
            r#"{"type":"SetName","name":["a"]}"#,
            "\"name\" must be a string",
        ),
        (
            r#"{"type":"Push","sessionId":"healthy"}"#,
            "Push needs \"data\"",
        ),
        (
            r#"{"type":"Push","sessionId":"healthy","data":[]}"#,
            "join a session first",
        ),
        (r#"{"type":"type","type":"Push"}"#, "Invalid JSON"),
    ];
    for (input, expected) in cases {
        bad.send_text(input).await.unwrap();
        let text = servermsg(&mut bad).await;
        assert!(
            text.contains(expected),
            "{input:?} answered {text:?}, expected {expected:?}"
        );
    }
    let long = format!(
        r#"{{"type":"SetSession","sessionId":"{}"}}"#,
        "x".repeat(300)
    );
    bad.send_text(&long).await.unwrap();
    assert!(servermsg(&mut bad).await.contains("too long"));
    bad.ws
        .send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert!(
        servermsg(&mut bad)
            .await
            .contains("Binary messages are not supported")
    );
    // Still usable.
    bad.send_text("ping").await.unwrap();
    assert_eq!(recv(&mut bad).await, "pong");

    // The healthy session never noticed.
    leader.send_text(&push("healthy", 1)).await.unwrap();
    assert_eq!(recv(&mut follower).await["data"][0][0], "em_001");
    assert!(metric(addr, "supersynk_errors_total").await >= 13.0);
}

#[tokio::test]
async fn broken_and_oversized_frames_close_with_the_documented_codes() {
    let server = start(Settings {
        max_message_bytes: Some(4096),
        ..Default::default()
    })
    .await;
    let addr = server.local_addr;
    let mut bystander = plugin(addr).await;
    join(&mut bystander, "B", "calm", true).await;
    state(&mut bystander).await;

    // Broken deflate data with RSV1 set.
    let mut c = plugin(addr).await;
    let mut frame = tokio_tungstenite::tungstenite::protocol::frame::Frame::message(
        vec![0xff, 0xfe, 0xfd, 0x00],
        tokio_tungstenite::tungstenite::protocol::frame::coding::OpCode::Data(
            tokio_tungstenite::tungstenite::protocol::frame::coding::Data::Text,
        ),
        true,
    );
    frame.header_mut().rsv1 = true;
    c.ws.send(Message::Frame(frame)).await.unwrap();
    assert_eq!(close_code(&mut c).await, Some(1007));

    // A small compressed frame that inflates past the limit.
    let mut c = plugin(addr).await;
    let bomb = format!(r#"{{"type":"SetName","name":"{}"}}"#, "a".repeat(100_000));
    c.send_text(&bomb).await.unwrap();
    assert_eq!(close_code(&mut c).await, Some(1009));

    // An uncompressed message over the limit.
    let mut c = HunterClient::connect(addr, "/connect", false)
        .await
        .unwrap();
    c.send_text(&"x".repeat(5000)).await.unwrap();
    assert_eq!(close_code(&mut c).await, Some(1009));

    // RSV1 without having agreed to compression is a protocol error.
    let mut c = HunterClient::connect(addr, "/connect", false)
        .await
        .unwrap();
    c.ws.send(supersynk_client::text_message("{}", true))
        .await
        .unwrap();
    assert_eq!(close_code(&mut c).await, Some(1002));

    // Invalid UTF-8 in a text frame (compressed, so it passes our inflater first).
    let mut c = plugin(addr).await;
    let mut frame = tokio_tungstenite::tungstenite::protocol::frame::Frame::message(
        supersynk_client::plugin_deflate(&[0xc3, 0x28, 0xa0, 0xa1]),
        tokio_tungstenite::tungstenite::protocol::frame::coding::OpCode::Data(
            tokio_tungstenite::tungstenite::protocol::frame::coding::Data::Text,
        ),
        true,
    );
    frame.header_mut().rsv1 = true;
    c.ws.send(Message::Frame(frame)).await.unwrap();
    assert_eq!(close_code(&mut c).await, Some(1007));

    // The bystander is unaffected.
    bystander.send_text("ping").await.unwrap();
    assert_eq!(recv(&mut bystander).await, "pong");
}

#[tokio::test]
async fn idle_sockets_are_closed_and_their_session_told() {
    let server = start(Settings {
        socket_timeout_ms: Some(600),
        socket_timeout_check_interval_ms: Some(100),
        ..Default::default()
    })
    .await;
    let addr = server.local_addr;
    let mut quiet = plugin(addr).await;
    let mut chatty = plugin(addr).await;
    join(&mut quiet, "Q", "idle", true).await;
    state(&mut quiet).await;
    join(&mut chatty, "C", "idle", false).await;
    state(&mut chatty).await;
    state(&mut quiet).await;
    // The chatty one keeps sending pings (any frame is activity); the quiet one does not.
    let keepalive = tokio::spawn(async move {
        for _ in 0..30 {
            chatty
                .ws
                .send(Message::Ping(vec![0; 8].into()))
                .await
                .unwrap();
            // The scenario, not a wait: a ping every 100 ms, well within the idle timeout.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        chatty
    });
    assert_eq!(close_code(&mut quiet).await, Some(4000));
    let mut chatty = keepalive.await.unwrap();
    // The survivor was told the leader left (pongs are skipped by next_text).
    assert_eq!(state(&mut chatty).await, (1, false));
}

#[tokio::test]
async fn a_relayed_push_is_compressed_once_whatever_the_number_of_followers() {
    let server = start_default().await;
    let addr = server.local_addr;
    let mut leader = plugin(addr).await;
    join(&mut leader, "L", "fan", true).await;
    state(&mut leader).await;
    let mut followers = Vec::new();
    for i in 0..4 {
        let mut f = plugin(addr).await;
        join(&mut f, &format!("F{i}"), "fan", false).await;
        followers.push(f);
        // Every member hears about the join before the next one joins.
        state(&mut leader).await;
        for f in followers.iter_mut() {
            state(f).await;
        }
    }
    for n in 0..20 {
        leader.send_text(&push("fan", n)).await.unwrap();
    }
    for f in followers.iter_mut() {
        for n in 0..20 {
            assert_eq!(recv(f).await["data"][0][0], format!("em_{n:03}"));
        }
    }
    // 5 distinct sessionstates and 20 pushes were compressed, once each...
    assert_eq!(
        metric(addr, "supersynk_deflate_compressions_total").await,
        25.0
    );
    // ...and written compressed 1+2+3+4+5 + 20*4 times.
    assert_eq!(metric(addr, "supersynk_deflate_messages_total").await, 95.0);
}

#[tokio::test]
async fn a_follower_vanishing_mid_write_does_not_disturb_the_session() {
    let server = start_default().await;
    let addr = server.local_addr;
    let (mut leader, mut good) = pair(addr, "rst").await;
    let mut gone = HunterClient::connect(addr, "/connect", false)
        .await
        .unwrap();
    join(&mut gone, "X", "rst", false).await;
    state(&mut gone).await;
    state(&mut good).await;
    state(&mut leader).await;

    let big = |n: usize| {
        format!(
            r#"{{"sessionId":"rst","type":"Push","data":[["em_{n}","{}"]]}}"#,
            "7".repeat(8_000)
        )
    };
    for n in 0..10 {
        leader.send_text(&big(n)).await.unwrap();
    }
    // Reset the connection (linger 0) with pushes in flight towards it.
    let tcp = gone.ws.get_ref().get_ref();
    tcp.set_zero_linger().unwrap();
    drop(gone);
    for n in 10..20 {
        leader.send_text(&big(n)).await.unwrap();
    }
    for n in 0..20 {
        loop {
            let v = recv(&mut good).await;
            if v["type"] == "Push" {
                assert_eq!(v["data"][0][0], format!("em_{n}"));
                break;
            }
            assert_eq!(v["type"], "sessionstate");
        }
    }
    // Both remaining members learn that the vanished follower left.
    loop {
        let (count, _) = state(&mut leader).await;
        if count == 2 {
            break;
        }
    }
}

#[tokio::test]
async fn a_compressed_frame_claiming_an_absurd_length_is_refused() {
    // Found by the frames fuzz target: a 64-bit length near u64::MAX overflowed the size check.
    use tokio::io::AsyncWriteExt;
    let server = start_default().await;
    let mut c = plugin(server.local_addr).await;
    let mut frame = vec![0xc1, 0xff];
    frame.extend_from_slice(&[0xff; 8]);
    frame.extend_from_slice(&[0, 0, 0, 0]);
    c.ws.get_mut().get_mut().write_all(&frame).await.unwrap();
    assert_eq!(close_code(&mut c).await, Some(1009));
    // The server is fine.
    let mut other = plugin(server.local_addr).await;
    other.send_text("ping").await.unwrap();
    assert_eq!(recv(&mut other).await, "pong");
}
