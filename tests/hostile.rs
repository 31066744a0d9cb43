//! What one hostile client can try on the open internet (issue 14), each attack performed
//! over real sockets with a bounded load, asserting what the other users see: frames that
//! would escape the rate, leadership protection turned into a takeover, a log flood,
//! unbounded channel state and direct-message names and stores.

mod common;

use common::*;
use futures::StreamExt;
use supersynk::client::HunterClient;
use supersynk::config::Settings;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

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
    tokio::time::timeout(WAIT * 2, async {
        loop {
            match c.ws.next().await {
                Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await
    .expect("the server ended the flooding connection")
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
    let mut attacker = plugin(addr).await;
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
