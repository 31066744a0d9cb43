//! Replays the transcripts of protocol/messages.md against a live server, and checks its
//! token example.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use common::{WAIT, Ws};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

fn doc() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/protocol/messages.md")).unwrap()
}

async fn online_becomes(addr: SocketAddr, n: f64) {
    common::until_metric(&[addr], "supersynk_direct_peers_online", n).await;
}

async fn replay(transcript: &str) {
    let server = common::start_default().await;
    let addr = server.local_addr;
    let mut peers: HashMap<String, Ws> = HashMap::new();
    let mut logged_in: HashSet<String> = HashSet::new();
    for line in transcript.lines() {
        let (who, rest) = line.split_at(line.find([' ', '>', '<', ':']).expect("a peer name"));
        let who = who.to_string();
        if let Some(frame) = rest.strip_prefix("> ") {
            if !peers.contains_key(&who) {
                let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/messages"))
                    .await
                    .unwrap();
                peers.insert(who.clone(), ws);
            }
            let ws = peers.get_mut(&who).unwrap();
            ws.send(Message::text(frame)).await.unwrap();
            // A first login is awaited, so the next line sees it done.
            if frame.starts_with(r#"{"login""#) && logged_in.insert(who.clone()) {
                online_becomes(addr, logged_in.len() as f64).await;
            }
        } else if let Some(expected) = rest.strip_prefix("< ") {
            let ws = peers.get_mut(&who).expect("peer connected");
            let got = loop {
                match tokio::time::timeout(WAIT, ws.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) => break t.to_string(),
                    Ok(Some(Ok(_))) => continue,
                    other => panic!("{line}: no message ({other:?})"),
                }
            };
            assert_eq!(got, expected, "{line}");
        } else if rest == ": close" {
            let mut ws = peers.remove(&who).expect("peer connected");
            ws.close(None).await.unwrap();
            logged_in.remove(&who);
            online_becomes(addr, logged_in.len() as f64).await;
        } else {
            panic!("unknown transcript line: {line}");
        }
    }
}

#[tokio::test]
async fn every_transcript_of_the_protocol_doc_holds() {
    let transcripts: Vec<String> = common::fenced_blocks(&doc())
        .into_iter()
        .filter(|(info, _)| info == "transcript")
        .map(|(_, body)| body)
        .collect();
    assert!(transcripts.len() >= 4);
    for t in transcripts {
        replay(&t).await;
    }
}

#[test]
fn the_token_example_is_the_hmac_the_server_checks() {
    let (_, body) = common::fenced_blocks(&doc())
        .into_iter()
        .find(|(info, _)| info == "token")
        .expect("a token example");
    let field = |k: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}: ")))
            .unwrap()
            .to_string()
    };
    assert_eq!(
        supersynk::messages::login_token(&field("secret"), &field("name")),
        field("token")
    );
}
