//! The reliable protocol on `/v1/reliable` (protocol/reliable.md), over real sockets against
//! the real server: the doc's transcripts replayed, then every rule one by one.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::reliable::{Client, expect, join, pair, short};
use common::{WAIT, metric};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use supersynk::config::Settings;
use tokio_tungstenite::tungstenite::Message;

// ---- the doc's transcripts ----

/// Matches a received frame against an expected one, binding `$variables`.
fn matches(want: &Value, got: &Value, vars: &mut HashMap<String, Value>) -> bool {
    match (want, got) {
        (Value::String(w), _) if w.starts_with('$') => match vars.get(w) {
            Some(bound) => bound == got,
            // Distinct variables stand for distinct values (a new client's id or token is
            // never one seen before).
            None if vars.values().any(|v| v == got) => false,
            None => {
                vars.insert(w.clone(), got.clone());
                true
            }
        },
        (Value::Object(w), Value::Object(g)) => {
            w.len() == g.len()
                && w.iter()
                    .all(|(k, wv)| g.get(k).is_some_and(|gv| matches(wv, gv, vars)))
        }
        (Value::Array(w), Value::Array(g)) => {
            w.len() == g.len() && w.iter().zip(g).all(|(wv, gv)| matches(wv, gv, vars))
        }
        _ => want == got,
    }
}

/// Replaces `$variables` in a frame to send.
fn substitute(v: &Value, vars: &HashMap<String, Value>) -> Value {
    match v {
        Value::String(s) if s.starts_with('$') => vars
            .get(s)
            .cloned()
            .unwrap_or_else(|| panic!("{s} is not bound yet")),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| (k.clone(), substitute(v, vars)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(|v| substitute(v, vars)).collect()),
        other => other.clone(),
    }
}

#[tokio::test]
async fn doc_transcripts_replay_against_the_server() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/protocol/reliable.md"))
        .unwrap();
    let mut transcripts = 0;
    let mut lines_checked = 0;
    for (info, body) in common::fenced_blocks(&doc) {
        if info != "transcript" {
            continue;
        }
        transcripts += 1;
        let server = common::start_default().await;
        let mut clients: HashMap<String, Client> = HashMap::new();
        let mut vars = HashMap::new();
        for line in body.lines().filter(|l| !l.trim().is_empty()) {
            let (who, rest) = line.split_at(1);
            if rest.trim() == "cut" {
                // Drops the socket without a close handshake.
                clients.remove(who);
                continue;
            }
            let (dir, frame) = rest.split_at(1);
            let frame: Value =
                serde_json::from_str(frame.trim()).unwrap_or_else(|e| panic!("{line}: {e}"));
            if !clients.contains_key(who) {
                clients.insert(who.to_owned(), Client::connect(server.local_addr).await);
            }
            let c = clients.get_mut(who).unwrap();
            match dir {
                ">" => c.send_json(substitute(&frame, &vars)).await,
                "<" => {
                    let got = c.recv().await;
                    assert!(
                        matches(&frame, &got, &mut vars),
                        "transcript line {line}\n  got {got}"
                    );
                }
                _ => panic!("bad transcript line {line}"),
            }
            lines_checked += 1;
        }
        // Gone before the shutdown, so it does not wait for their close handshakes.
        drop(clients);
        server.shutdown().await;
    }
    assert!(
        transcripts >= 5 && lines_checked >= 60,
        "{transcripts} transcripts, {lines_checked} lines"
    );
}

// ---- rule by rule ----

#[tokio::test]
async fn resume_after_a_cut_delivers_what_was_missed_in_order() {
    let server = common::start_default().await;
    let addr = server.local_addr;
    let (mut a, a_id, _) = Client::joined(addr, "r").await;
    let (mut b, b_id, b_token) = Client::joined(addr, "r").await;
    b.send(r#"{"t":"ack","seq":1}"#).await;
    // B sends two messages; the second one's ack is lost with the cut.
    b.send(r#"{"t":"msg","seq":2,"op":"publish","room":"r","data":"b1"}"#)
        .await;
    expect(&b.recv().await, json!({"t":"ack","seq":2}));
    drop(b);
    expect(&a.recv().await, json!({"op":"join","from":b_id}));
    expect(&a.recv().await, json!({"seq":3,"data":"b1"}));
    for (i, text) in ["m1", "m2", "m3"].iter().enumerate() {
        a.send_json(json!({"t":"msg","seq":2 + i,"op":"publish","room":"r","data":text}))
            .await;
        expect(&a.recv().await, json!({"t":"ack","seq":2 + i}));
    }
    let (mut b, welcome) = Client::resume(addr, &b_id, 1, &b_token).await;
    expect(
        &welcome,
        json!({"t":"welcome","clientId":b_id,"resumed":true,"seq":2,"token":b_token}),
    );
    for (seq, text) in [(2, "m1"), (3, "m2"), (4, "m3")] {
        expect(
            &b.recv().await,
            json!({"t":"msg","seq":seq,"room":"r","from":a_id,"data":text}),
        );
    }
    b.send(r#"{"t":"ack","seq":4}"#).await;
    // Live again: numbering goes on, both ways.
    b.send(r#"{"t":"msg","seq":3,"op":"publish","room":"r","data":"back"}"#)
        .await;
    expect(&b.recv().await, json!({"t":"ack","seq":3}));
    expect(&a.recv().await, json!({"seq":4,"from":b_id,"data":"back"}));
    assert_eq!(metric(addr, "supersynk_reliable_resumes_total").await, 1.0);
}

#[tokio::test]
async fn resume_after_the_window_gets_a_new_id_and_the_room_hears_the_leave() {
    let server = common::start(short(15_000, 2000, 200)).await;
    let addr = server.local_addr;
    let ((mut a, _, _), (b, b_id, b_token)) = pair(addr, "r").await;
    drop(b);
    // The window ends: the room is told B left.
    expect(
        &a.recv().await,
        json!({"t":"msg","seq":3,"op":"leave","room":"r","from":b_id}),
    );
    let mut b = Client::connect(addr).await;
    b.send_json(json!({"t":"hello","clientId":b_id,"lastSeq":1,"token":b_token}))
        .await;
    let w = b.recv().await;
    expect(&w, json!({"t":"welcome","resumed":false,"seq":0}));
    assert_ne!(w["clientId"], json!(b_id));
    assert_eq!(metric(addr, "supersynk_reliable_expired_total").await, 1.0);
}

#[tokio::test]
async fn resume_refuses_a_wrong_token_and_an_unprovable_last_seq() {
    let server = common::start_default().await;
    let addr = server.local_addr;
    let (b, b_id, b_token) = Client::welcomed(addr).await;
    drop(b);
    for hello in [
        json!({"t":"hello","clientId":b_id,"lastSeq":0,"token":"guess"}),
        // The server never sent seq 5: continuity cannot be proven.
        json!({"t":"hello","clientId":b_id,"lastSeq":5,"token":b_token}),
        json!({"t":"hello","clientId":b_id,"lastSeq":5}),
    ] {
        let mut c = Client::connect(addr).await;
        c.send_json(hello).await;
        let w = c.recv().await;
        expect(&w, json!({"t":"welcome","resumed":false}));
        assert_ne!(w["clientId"], json!(b_id));
    }
    let (_c, welcome) = Client::resume(addr, &b_id, 0, &b_token).await;
    expect(&welcome, json!({"resumed":true,"clientId":b_id}));
}

#[tokio::test]
async fn a_takeover_with_the_id_alone_gets_a_fresh_session_and_no_secret() {
    let server = common::start_default().await;
    let addr = server.local_addr;
    let (mut victim, victim_id, victim_token) = Client::joined(addr, "r").await;
    victim.send(r#"{"t":"ack","seq":1}"#).await;
    // The attacker is in the room: it learns the victim's id from the announcements.
    let (mut attacker, attacker_id, _) = Client::joined(addr, "r").await;
    attacker
        .send(r#"{"t":"msg","seq":2,"op":"request","id":1,"to":"server","data":{"presence":"r"}}"#)
        .await;
    expect(
        &attacker.recv().await,
        json!({"op":"response","id":1,"data":{"members":[victim_id,attacker_id]}}),
    );
    expect(
        &victim.recv().await,
        json!({"op":"join","from":attacker_id}),
    );
    // Every guess of lastSeq with the id alone, or a wrong token: a fresh session each time,
    // with a new id and a token of its own.
    for last_seq in 0..4u64 {
        for token in [None, Some("0123456789abcdef0123456789abcdef")] {
            let mut c = Client::connect(addr).await;
            let mut hello = json!({"t":"hello","clientId":victim_id,"lastSeq":last_seq});
            if let Some(t) = token {
                hello["token"] = json!(t);
            }
            c.send_json(hello).await;
            let w = c.recv().await;
            expect(&w, json!({"t":"welcome","resumed":false,"seq":0}));
            assert_ne!(w["clientId"], json!(victim_id));
            assert_ne!(w["token"], json!(victim_token));
            // Not in the victim's rooms: its publish is refused, nothing reaches the room.
            c.send(r#"{"t":"msg","seq":1,"op":"publish","room":"r","data":"as the victim"}"#)
                .await;
            expect(&c.recv().await, json!({"t":"error","code":"not_member"}));
        }
    }
    // The victim was never replaced: it is still connected, and it hears the next message.
    attacker
        .send(r#"{"t":"msg","seq":3,"op":"publish","room":"r","data":"still here?"}"#)
        .await;
    expect(
        &victim.recv_data().await,
        json!({"t":"msg","seq":3,"from":attacker_id,"data":"still here?"}),
    );
    assert_eq!(metric(addr, "supersynk_reliable_resumes_total").await, 0.0);
    // Presence answers the members of a room only.
    let mut outsider = Client::connect(addr).await;
    outsider.hello().await;
    outsider
        .send(r#"{"t":"msg","seq":1,"op":"request","id":1,"to":"server","data":{"presence":"r"}}"#)
        .await;
    let answer = outsider.recv().await;
    expect(
        &answer,
        json!({"op":"response","id":1,"from":"server","error":{"code":"not_member"}}),
    );
    assert!(!answer.to_string().contains(&victim_id));
    expect(
        &outsider.recv().await,
        json!({"t":"error","code":"not_member","seq":1}),
    );
    // The owner, with its token, resumes.
    drop(victim);
    let (_back, welcome) = Client::resume(addr, &victim_id, 1, &victim_token).await;
    expect(&welcome, json!({"resumed":true,"clientId":victim_id}));
}

#[tokio::test]
async fn a_resume_elsewhere_replaces_the_old_connection() {
    let server = common::start_default().await;
    let (mut a, id, token) = Client::welcomed(server.local_addr).await;
    let (_a2, welcome) = Client::resume(server.local_addr, &id, 0, &token).await;
    expect(&welcome, json!({"resumed":true}));
    expect(&a.recv().await, json!({"t":"error","code":"replaced"}));
    assert_eq!(a.close_code().await, Some(4001));
}

#[tokio::test]
async fn duplicates_and_stale_resends_are_delivered_once() {
    let server = common::start_default().await;
    let addr = server.local_addr;
    let ((mut a, a_id, _), (mut b, b_id, _)) = pair(addr, "r").await;
    let p = |seq: u64, data: &str| {
        json!({"t":"msg","seq":seq,"op":"publish","room":"r","data":data}).to_string()
    };
    b.send(&p(2, "one")).await;
    b.send(&p(2, "one")).await; // duplicate
    b.send(&p(3, "two")).await;
    b.send(&p(2, "one")).await; // stale
    b.send(&p(5, "after a gap")).await; // ahead of a gap: kept
    b.send(&p(4, "three")).await;
    b.send(&p(5000, "far ahead")).await; // too far: dropped
    expect(&b.recv().await, json!({"t":"ack","seq":2}));
    expect(&b.recv().await, json!({"t":"ack","seq":2}));
    expect(&b.recv().await, json!({"t":"ack","seq":3}));
    expect(&b.recv().await, json!({"t":"ack","seq":3}));
    // The server names what it misses, then carries both out in order once it has them.
    assert_eq!(b.recv().await, json!({"t":"ack","seq":3,"missing":[[4,4]]}));
    expect(&b.recv().await, json!({"t":"ack","seq":4}));
    expect(&b.recv().await, json!({"t":"ack","seq":5}));
    expect(
        &b.recv().await,
        json!({"t":"error","code":"seq_gap","seq":5000}),
    );
    // A got each once, in order, and nothing else.
    for (seq, data) in [(3, "one"), (4, "two"), (5, "three"), (6, "after a gap")] {
        expect(&a.recv().await, json!({"seq":seq,"data":data}));
    }
    a.send_json(
        json!({"t":"msg","seq":2,"op":"request","id":1,"to":"server","data":{"presence":"r"}}),
    )
    .await;
    expect(
        &a.recv().await,
        json!({"op":"response","id":1,"data":{"room":"r","members":[a_id,b_id]}}),
    );
}

#[tokio::test]
async fn unacknowledged_messages_are_resent_after_the_timeout_until_acked() {
    let server = common::start(short(15_000, 100, 120_000)).await;
    let addr = server.local_addr;
    let (mut a, a_id, _) = Client::welcomed(addr).await;
    a.send(r#"{"t":"msg","seq":1,"op":"join","room":"r"}"#)
        .await;
    let first = a.recv().await;
    expect(&first, json!({"seq":1,"op":"join","from":a_id}));
    expect(&a.recv().await, json!({"t":"ack","seq":1}));
    let sent = tokio::time::Instant::now();
    // Not acknowledged: the same message again, after the resend timeout.
    assert_eq!(a.recv().await, first);
    assert!(sent.elapsed() >= Duration::from_millis(60));
    assert_eq!(a.recv().await, first);
    a.send(r#"{"t":"ack","seq":1}"#).await;
    // Acknowledged: after a few resend periods, the next frame is the presence answer. The
    // scenario, not a wait: three resend periods in which nothing may be resent.
    tokio::time::sleep(Duration::from_millis(350)).await;
    a.send(r#"{"t":"msg","seq":2,"op":"request","id":1,"to":"server","data":{"presence":"r"}}"#)
        .await;
    loop {
        let v = a.recv().await;
        if v == first {
            // Resent before the ack arrived; nothing after it.
            continue;
        }
        expect(&v, json!({"seq":2,"op":"response","id":1}));
        break;
    }
    assert!(metric(addr, "supersynk_reliable_resends_total").await >= 2.0);
}

#[tokio::test]
async fn heartbeats_carry_the_last_seq_and_a_silent_peer_is_dropped_but_resumable() {
    let server = common::start(short(100, 2000, 120_000)).await;
    let addr = server.local_addr;
    let mut a = Client::connect(addr).await;
    a.send(r#"{"t":"hello"}"#).await;
    let w = a.recv().await;
    expect(&w, json!({"t":"welcome","heartbeatMs":100}));
    let (id, token) = (w["clientId"].clone(), w["token"].clone());
    a.send(r#"{"t":"msg","seq":1,"op":"join","room":"r"}"#)
        .await;
    a.recv().await;
    a.recv().await;
    a.send(r#"{"t":"ack","seq":1}"#).await;
    // A heartbeat within about 100 ms, carrying the last seq received.
    let started = tokio::time::Instant::now();
    expect(&a.recv().await, json!({"t":"hb","ack":1}));
    assert!(started.elapsed() < Duration::from_secs(1));
    // Silent from now on (we only read): closed within about 2 x 100 ms, code 4000.
    assert_eq!(a.close_code().await, Some(4000));
    assert!(started.elapsed() < Duration::from_secs(2));
    let (_a, welcome) =
        Client::resume(addr, id.as_str().unwrap(), 1, token.as_str().unwrap()).await;
    expect(&welcome, json!({"t":"welcome","resumed":true,"seq":1}));
    // A client that never says hello is dropped the same way.
    let mut mute = Client::connect(addr).await;
    assert_eq!(mute.close_code().await, Some(4000));
}

#[tokio::test]
async fn a_client_sending_heartbeats_stays_connected() {
    let server = common::start(short(60, 2000, 120_000)).await;
    let mut a = Client::connect(server.local_addr).await;
    a.hello().await;
    let until = tokio::time::Instant::now() + Duration::from_millis(500);
    let mut hbs = 0;
    while tokio::time::Instant::now() < until {
        let v = a.recv().await;
        expect(&v, json!({"t":"hb","ack":0}));
        hbs += 1;
        a.send(r#"{"t":"hb","ack":0}"#).await;
    }
    assert!(hbs >= 4, "{hbs} heartbeats");
}

#[tokio::test]
async fn room_fan_out_gives_every_other_member_its_own_seq() {
    let server = common::start_default().await;
    let addr = server.local_addr;
    let mut members = Vec::new();
    for i in 0..5u64 {
        let mut c = Client::connect(addr).await;
        let (id, _) = c.hello().await;
        join(&mut c, 1, "fan", &id).await;
        // Earlier members hear the join.
        for (_, m) in members.iter_mut() {
            let m: &mut Client = m;
            expect(&m.recv().await, json!({"op":"join","from":id}));
        }
        members.push((id, c));
        let _ = i;
    }
    let (sender_id, sender) = &mut members[2];
    let sender_id = sender_id.clone();
    sender
        .send(r#"{"t":"msg","seq":2,"op":"publish","room":"fan","data":{"n":1}}"#)
        .await;
    expect(&sender.recv().await, json!({"t":"ack","seq":2}));
    for (i, (_, m)) in members.iter_mut().enumerate() {
        if i == 2 {
            continue;
        }
        // Member i heard 5 - i joins (its own included): the publish is the next seq.
        expect(
            &m.recv().await,
            json!({"t":"msg","seq":5 - i + 1,"room":"fan","from":sender_id,"data":{"n":1}}),
        );
    }
    // The publisher got nothing but its ack: its next frame is the answer to a request.
    let (_, sender) = &mut members[2];
    sender
        .send(r#"{"t":"msg","seq":3,"op":"leave","room":"fan"}"#)
        .await;
    expect(&sender.recv().await, json!({"t":"ack","seq":3}));
    for (i, (_, m)) in members.iter_mut().enumerate() {
        if i != 2 {
            expect(&m.recv().await, json!({"op":"leave","from":sender_id}));
        }
    }
}

#[tokio::test]
async fn requests_reach_a_client_away_on_its_resume_and_time_out_otherwise() {
    let server = common::start(Settings {
        reliable_request_timeout_ms: Some(300),
        ..Settings::default()
    })
    .await;
    let addr = server.local_addr;
    let (mut a, a_id, _) = Client::welcomed(addr).await;
    let (b, b_id, b_token) = Client::welcomed(addr).await;
    drop(b);
    // A request to B while B is away: buffered for B.
    a.send_json(
        json!({"t":"msg","seq":1,"op":"request","id":1,"to":b_id,"data":"ping","timeoutMs":60000}),
    )
    .await;
    expect(&a.recv().await, json!({"t":"ack","seq":1}));
    let (mut b, welcome) = Client::resume(addr, &b_id, 0, &b_token).await;
    expect(&welcome, json!({"resumed":true}));
    expect(
        &b.recv().await,
        json!({"seq":1,"op":"request","id":1,"from":a_id,"data":"ping"}),
    );
    b.send_json(json!({"t":"msg","seq":1,"op":"response","id":1,"to":a_id,"data":"pong"}))
        .await;
    expect(&b.recv().await, json!({"t":"ack","seq":1}));
    expect(
        &a.recv().await,
        json!({"seq":1,"op":"response","id":1,"from":b_id,"data":"pong"}),
    );
    // timeoutMs is capped by the server's 300 ms.
    let started = tokio::time::Instant::now();
    a.send_json(
        json!({"t":"msg","seq":2,"op":"request","id":2,"to":b_id,"data":null,"timeoutMs":60000}),
    )
    .await;
    expect(&a.recv().await, json!({"t":"ack","seq":2}));
    expect(
        &a.recv().await,
        json!({"seq":2,"op":"response","id":2,"from":b_id,"error":{"code":"timeout"}}),
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    // A pending id cannot be reused until it is answered.
    a.send_json(json!({"t":"msg","seq":3,"op":"request","id":3,"to":b_id,"data":null}))
        .await;
    expect(&a.recv().await, json!({"t":"ack","seq":3}));
    a.send_json(json!({"t":"msg","seq":4,"op":"request","id":3,"to":b_id,"data":null}))
        .await;
    expect(
        &a.recv().await,
        json!({"t":"error","code":"duplicate_request","seq":4}),
    );
    expect(&a.recv().await, json!({"t":"ack","seq":4}));
}

#[tokio::test]
async fn malformed_frames_get_documented_errors_and_nothing_else_breaks() {
    let server = common::start_default().await;
    let addr = server.local_addr;
    let (mut bystander, by_id, _) = Client::joined(addr, "r").await;

    let mut c = Client::connect(addr).await;
    c.send(r#"{"t":"msg","seq":1,"op":"join","room":"r"}"#)
        .await;
    expect(
        &c.recv().await,
        json!({"t":"error","code":"hello_required"}),
    );
    c.ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    expect(&c.recv().await, json!({"t":"error","code":"binary_frame"}));
    let (id, _) = c.hello().await;
    for (frame, code) in [
        ("not json", "bad_json"),
        ("[1,2,3]", "bad_frame"),
        ("{}", "bad_frame"),
        (r#"{"t":"dance"}"#, "bad_frame"),
        (r#"{"t":"hello"}"#, "already_welcomed"),
        (r#"{"t":"msg","seq":"1"}"#, "bad_frame"),
        (r#"{"t":"msg","seq":-1}"#, "bad_frame"),
        (r#"{"t":"msg","seq":1e300}"#, "bad_frame"),
        (
            r#"{"t":"msg","seq":123456789012345678901234567890}"#,
            "bad_frame",
        ),
        (r#"{"t":"ack","seq":99}"#, "bad_ack"),
        (r#"{"t":"hb","ack":"x"}"#, "bad_frame"),
        (
            r#"{"t":"msg","seq":2000,"op":"join","room":"r"}"#,
            "seq_gap",
        ),
    ] {
        c.send(frame).await;
        expect(&c.recv().await, json!({"t":"error","code":code}));
    }
    // In-order messages with a bad operation are consumed (acked), then refused.
    for (seq, frame, code) in [
        (1, json!({"op":"dance"}), "bad_op"),
        (2, json!({"op":"join","room":7}), "bad_op"),
        (3, json!({"op":"join"}), "bad_op"),
        (4, json!({"op":"join","room":"x".repeat(129)}), "bad_op"),
        (5, json!({"op":"publish","room":"r","data":1}), "not_member"),
        (6, json!({"op":"leave","room":"r"}), "not_member"),
        (
            7,
            json!({"op":"response","id":1,"to":by_id,"data":1}),
            "unknown_request",
        ),
        (
            8,
            json!({"op":"response","id":1,"to":"ghost","data":1}),
            "unknown_client",
        ),
        (9, json!({"op":"request","id":1.5,"to":by_id}), "bad_op"),
        // A response's error is an object, as the doc shows.
        (
            10,
            json!({"op":"response","id":1,"to":by_id,"error":"notanobject"}),
            "bad_op",
        ),
    ] {
        let mut f = frame.as_object().unwrap().clone();
        f.insert("t".into(), json!("msg"));
        f.insert("seq".into(), json!(seq));
        c.send_json(Value::Object(f)).await;
        // The refusal names the message and comes before its ack, so a client can tie it to
        // the message before it counts the message as done.
        expect(&c.recv().await, json!({"t":"error","code":code,"seq":seq}));
        expect(&c.recv().await, json!({"t":"ack","seq":seq}));
    }
    // Bad server requests get an error response and an error.
    c.send(r#"{"t":"msg","seq":11,"op":"request","id":4,"to":"server","data":{"x":1}}"#)
        .await;
    expect(
        &c.recv().await,
        json!({"op":"response","id":4,"from":"server","error":{"code":"bad_request"}}),
    );
    expect(
        &c.recv().await,
        json!({"t":"error","code":"bad_request","seq":11}),
    );
    expect(&c.recv().await, json!({"t":"ack","seq":11}));
    // Still working, and the bystander saw nothing but this join.
    join(&mut c, 12, "r", &id).await;
    expect(
        &bystander.recv().await,
        json!({"seq":2,"op":"join","from":id}),
    );
    c.send(r#"{"t":"msg","seq":13,"op":"publish","room":"r","data":"fine"}"#)
        .await;
    expect(&bystander.recv().await, json!({"seq":3,"data":"fine"}));
}

#[tokio::test]
async fn a_receiver_that_stops_acking_is_dropped_when_its_buffer_is_full() {
    let server = common::start(Settings {
        reliable_buffer_messages: Some(4),
        ..Settings::default()
    })
    .await;
    let addr = server.local_addr;
    let (mut a, _, _) = Client::joined(addr, "r").await;
    a.send(r#"{"t":"ack","seq":1}"#).await;
    let (mut b, b_id, b_token) = Client::joined(addr, "r").await;
    expect(&a.recv().await, json!({"op":"join","from":b_id}));
    a.send(r#"{"t":"ack","seq":2}"#).await;
    // B holds its join (seq 1) unacked; three more fill its buffer, the fourth overflows:
    // B's state is dropped and A, the member left, hears B leave. A never waits for B.
    for seq in 2..=5u64 {
        a.send_json(json!({"t":"msg","seq":seq,"op":"publish","room":"r","data":seq}))
            .await;
        if seq == 5 {
            expect(&a.recv().await, json!({"seq":3,"op":"leave","from":b_id}));
        }
        expect(&a.recv().await, json!({"t":"ack","seq":seq}));
    }
    let mut seen = Vec::new();
    loop {
        let v = b.recv().await;
        if v["t"] == "error" {
            expect(&v, json!({"code":"overflow"}));
            break;
        }
        seen.push(v["seq"].as_u64().unwrap());
    }
    assert_eq!(seen, vec![2, 3, 4]);
    assert_eq!(b.close_code().await, Some(4008));
    let (_b, welcome) = Client::resume(addr, &b_id, 4, &b_token).await;
    expect(&welcome, json!({"resumed":false}));
    assert_eq!(
        metric(addr, "supersynk_reliable_overflows_total").await,
        1.0
    );
}

/// The next `msg` frame, skipping heartbeats and (resent) messages up to `last`.
async fn next_msg(c: &mut Client, last: u64) -> Value {
    loop {
        let v = c.recv_data().await;
        assert_ne!(v["t"], "error", "{v}");
        if v["t"] == "msg" && v["seq"].as_u64().unwrap() > last {
            return v;
        }
    }
}

#[tokio::test]
async fn the_welcome_announces_the_limits_a_client_must_keep() {
    let server = common::start(Settings {
        max_message_bytes: Some(2048),
        messages_per_second: Some(50),
        message_burst: Some(60),
        ..Settings::default()
    })
    .await;
    let mut a = Client::connect(server.local_addr).await;
    a.send(r#"{"t":"hello"}"#).await;
    expect(
        &a.recv().await,
        json!({"t":"welcome","maxMessageBytes":2048,"messagesPerSecond":50,"messageBurst":60}),
    );
}

#[tokio::test]
async fn a_resume_with_a_full_buffer_gets_all_of_it() {
    // Default settings: the 256 KiB outbound queue is smaller than what B has missed.
    let server = common::start_default().await;
    let addr = server.local_addr;
    let ((mut a, a_id, _), (mut b, b_id, b_token)) = pair(addr, "r").await;
    b.send(r#"{"t":"ack","seq":1}"#).await;
    drop(b);
    // 200 messages of 4 KB: about 820 KB, within B's 1 MiB and 1000-message buffer.
    let text = "x".repeat(4000);
    for i in 0..200u64 {
        a.send_json(
            json!({"t":"msg","seq":2 + i,"op":"publish","room":"r","data":{"i":i,"text":text}}),
        )
        .await;
        expect(&a.recv().await, json!({"t":"ack","seq":2 + i}));
    }
    let (mut b, welcome) = Client::resume(addr, &b_id, 1, &b_token).await;
    expect(
        &welcome,
        json!({"t":"welcome","clientId":b_id,"resumed":true}),
    );
    for i in 0..200u64 {
        let v = b.recv_data().await;
        expect(
            &v,
            json!({"t":"msg","seq":2 + i,"from":a_id,"data":{"i":i}}),
        );
    }
    b.send(r#"{"t":"ack","seq":201}"#).await;
    b.send(r#"{"t":"msg","seq":2,"op":"publish","room":"r","data":"all here"}"#)
        .await;
    expect(&b.recv_data().await, json!({"t":"ack","seq":2}));
    expect(&a.recv().await, json!({"from":b_id,"data":"all here"}));
}

#[tokio::test]
async fn resending_a_large_unacknowledged_buffer_keeps_the_connection() {
    let server = common::start(Settings {
        reliable_resend_ms: Some(100),
        // Room for the 820 KB unacknowledged: this is about resends only.
        reliable_buffer_bytes: Some(4 << 20),
        ..Settings::default()
    })
    .await;
    let addr = server.local_addr;
    let ((mut a, a_id, _), (mut b, b_id, _)) = pair(addr, "r").await;
    b.send(r#"{"t":"ack","seq":1}"#).await;
    a.send(r#"{"t":"ack","seq":2}"#).await;
    let text = "x".repeat(4000);
    for i in 0..200u64 {
        a.send_json(
            json!({"t":"msg","seq":2 + i,"op":"publish","room":"r","data":{"i":i,"text":text}}),
        )
        .await;
        expect(&a.recv().await, json!({"t":"ack","seq":2 + i}));
    }
    // B reads but does not acknowledge: everything comes once, then again (resends start
    // while A still publishes), on the same connection.
    let mut seen = [0u32; 200];
    while seen.iter().any(|n| *n < 2) {
        let v = b.recv_data().await;
        let seq = v["seq"]
            .as_u64()
            .expect("a message, not an error or a close");
        expect(&v, json!({"t":"msg","data":{"i":seq - 2}}));
        seen[seq as usize - 2] += 1;
    }
    let last = 201;
    b.send_json(json!({"t":"ack","seq":last})).await;
    b.send(r#"{"t":"msg","seq":2,"op":"request","id":1,"to":"server","data":{"presence":"r"}}"#)
        .await;
    let v = next_msg(&mut b, last).await;
    expect(
        &v,
        json!({"op":"response","id":1,"data":{"members":[a_id,b_id]}}),
    );
    assert!(metric(addr, "supersynk_reliable_resends_total").await >= 200.0);
}

#[tokio::test]
async fn a_burst_to_a_receiver_that_acks_loses_nothing() {
    // The rate limit is raised so that the publisher outruns the receiver's acks, and the
    // receiver's buffer holds the whole burst: nothing waits, nothing is lost.
    let server = common::start(Settings {
        reliable_buffer_messages: Some(10_000),
        ..common::unthrottled()
    })
    .await;
    let addr = server.local_addr;
    const N: u64 = 5000;
    let ((mut a, _, _), (mut b, _, _)) = pair(addr, "burst").await;
    b.send(r#"{"t":"ack","seq":1}"#).await;
    a.send(r#"{"t":"ack","seq":2}"#).await;
    // B acknowledges every 64 messages, as the TypeScript client does.
    let receiver = tokio::spawn(async move {
        let mut got = Vec::new();
        let mut last = 1;
        while got.len() < N as usize {
            let v = next_msg(&mut b, last).await;
            last = v["seq"].as_u64().unwrap();
            got.push(v["data"]["n"].as_u64().unwrap());
            if got.len().is_multiple_of(64) {
                b.send_json(json!({"t":"ack","seq":last})).await;
            }
        }
        got
    });
    let (mut sink, mut stream) = a.ws.split();
    let acks = tokio::spawn(async move {
        loop {
            let msg = tokio::time::timeout(WAIT, stream.next())
                .await
                .expect("a frame in time")
                .expect("socket open")
                .expect("no socket error");
            let Message::Text(t) = msg else {
                panic!("publisher got {msg:?}")
            };
            let v: Value = serde_json::from_str(&t).unwrap();
            assert_ne!(v["t"], "error", "{v}");
            if v["t"] == "ack" && v["seq"] == N + 1 {
                return;
            }
        }
    });
    for n in 1..=N {
        let frame = json!({"t":"msg","seq":n + 1,"op":"publish","room":"burst","data":{"n":n}});
        sink.feed(Message::text(frame.to_string())).await.unwrap();
    }
    sink.flush().await.unwrap();
    acks.await.unwrap();
    let got = receiver.await.unwrap();
    assert_eq!(got, (1..=N).collect::<Vec<_>>(), "exactly once, in order");
    assert_eq!(
        metric(addr, "supersynk_reliable_overflows_total").await,
        0.0
    );
}

#[tokio::test]
async fn a_receiver_away_does_not_hold_senders_up() {
    let server = common::start(Settings {
        reliable_buffer_messages: Some(20),
        ..Settings::default()
    })
    .await;
    let addr = server.local_addr;
    let ((mut a, _, _), (mut b, b_id, b_token)) = pair(addr, "r").await;
    b.send(r#"{"t":"ack","seq":1}"#).await;
    drop(b);
    common::until_metric(&[addr], "supersynk_reliable_detached", 1.0).await;
    // B's buffer fills while B is away: A never waits (a wait would outlast the 5 s each
    // of these acks may take).
    for seq in 2..=15u64 {
        a.send_json(json!({"t":"msg","seq":seq,"op":"publish","room":"r","data":seq}))
            .await;
        expect(&a.recv().await, json!({"t":"ack","seq":seq}));
    }
    let (mut b, welcome) = Client::resume(addr, &b_id, 1, &b_token).await;
    expect(&welcome, json!({"resumed":true}));
    for seq in 2..=15u64 {
        expect(&b.recv_data().await, json!({"seq":seq,"data":seq}));
    }
}

#[tokio::test]
async fn websocket_pings_count_as_heard() {
    let server = common::start(short(100, 2000, 120_000)).await;
    let mut a = Client::connect(server.local_addr).await;
    a.hello().await;
    // Only pings, for three times the 200 ms after which a silent peer is lost.
    let mut pings = tokio::time::interval(Duration::from_millis(40));
    let until = tokio::time::Instant::now() + Duration::from_millis(600);
    while tokio::time::Instant::now() < until {
        pings.tick().await;
        a.ws.send(Message::Ping(vec![1].into())).await.unwrap();
    }
    a.send(r#"{"t":"msg","seq":1,"op":"join","room":"r"}"#)
        .await;
    expect(&a.recv_data().await, json!({"op":"join","room":"r"}));
}

#[tokio::test]
async fn a_request_ends_at_once_when_its_target_expires() {
    let server = common::start(Settings {
        reliable_resume_window_ms: Some(300),
        ..Settings::default()
    })
    .await;
    let addr = server.local_addr;
    let mut a = Client::connect(addr).await;
    a.hello().await;
    let (b, b_id, _) = Client::welcomed(addr).await;
    drop(b);
    let started = tokio::time::Instant::now();
    a.send_json(
        json!({"t":"msg","seq":1,"op":"request","id":1,"to":b_id,"data":"x","timeoutMs":10000}),
    )
    .await;
    expect(&a.recv().await, json!({"t":"ack","seq":1}));
    // Within the 300 ms window and some slack, not the 10 s timeout.
    expect(
        &a.recv_data().await,
        json!({"t":"msg","seq":1,"op":"response","id":1,"from":b_id,"error":{"code":"unknown_client"}}),
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    // B is unknown now: a new request is refused at once.
    a.send_json(json!({"t":"msg","seq":2,"op":"request","id":2,"to":b_id,"data":"x"}))
        .await;
    expect(
        &a.recv_data().await,
        json!({"op":"response","id":2,"from":"server","error":{"code":"unknown_client"}}),
    );
}

async fn refused(c: &mut Client) {
    c.send(r#"{"t":"hello"}"#).await;
    expect(
        &c.recv().await,
        json!({"t":"error","code":"too_many_clients"}),
    );
    assert_eq!(c.close_code().await, Some(1013));
}

#[tokio::test]
async fn client_states_are_capped_in_all_and_per_address_while_away() {
    let server = common::start(Settings {
        reliable_max_clients: Some(4),
        reliable_max_detached_per_ip: Some(2),
        trusted_proxies: Some(vec!["127.0.0.1/32".parse().unwrap()]),
        ..Settings::default()
    })
    .await;
    let addr = server.local_addr;
    // Two states from 203.0.113.5 lose their connection: the address has its two.
    let mut away = Vec::new();
    for _ in 0..2 {
        let mut c = Client::connect_from(addr, "203.0.113.5").await;
        away.push(c.hello().await);
    }
    common::until_metric(&[addr], "supersynk_reliable_detached", 2.0).await;
    refused(&mut Client::connect_from(addr, "203.0.113.5").await).await;
    // Other addresses are not affected.
    let mut other = Client::connect_from(addr, "203.0.113.6").await;
    other.hello().await;
    // A resume is not a new state; it frees its place under the address.
    let (id, token) = &away[0];
    let mut back = Client::connect_from(addr, "203.0.113.5").await;
    back.send_json(json!({"t":"hello","clientId":id,"lastSeq":0,"token":token}))
        .await;
    expect(&back.recv().await, json!({"resumed":true,"clientId":id}));
    let mut fresh = Client::connect_from(addr, "203.0.113.5").await;
    fresh.hello().await;
    // Four states are held now (two from .5 connected, one away, one from .6): the cap.
    refused(&mut Client::connect_from(addr, "198.51.100.1").await).await;
    refused(&mut Client::connect(addr).await).await;
    assert_eq!(metric(addr, "supersynk_reliable_refused_total").await, 3.0);
    assert_eq!(metric(addr, "supersynk_reliable_clients").await, 4.0);
    // A resume still works at the cap.
    let (id, token) = &away[1];
    let (_back, welcome) = Client::resume(addr, id, 0, token).await;
    expect(&welcome, json!({"resumed":true,"clientId":id}));
}

/// A well-behaved peer at full speed, that has received up to `last`: publishes `n` messages
/// `{"n":i}` to `room` with at most `window` unacknowledged, and acknowledges every 64
/// messages it receives. Resolves with the `n`s received from others, once it has `expect`
/// of them and its own are acked.
async fn flood(
    c: Client,
    last: u64,
    room: &'static str,
    n: u64,
    window: u64,
    expect: usize,
) -> Vec<u64> {
    let (mut sink, mut stream) = c.ws.split();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(1024);
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            sink.send(Message::text(frame)).await.expect("send");
        }
    });
    // Our seq 1 was the join; publishes are 2..=n+1.
    let (acked_tx, mut acked_rx) = tokio::sync::watch::channel(1u64);
    let acks = tx.clone();
    let reader = tokio::spawn(async move {
        let (mut got, mut last, mut own) = (Vec::new(), last, 1u64);
        while got.len() < expect || own < n + 1 {
            let msg = tokio::time::timeout(WAIT, stream.next())
                .await
                .expect("a frame in time")
                .expect("socket open")
                .expect("no socket error");
            let Message::Text(t) = msg else { continue };
            let v: Value = serde_json::from_str(&t).unwrap();
            match v["t"].as_str() {
                Some("ack") => {
                    own = own.max(v["seq"].as_u64().unwrap());
                    let _ = acked_tx.send(own);
                }
                Some("msg") => {
                    let seq = v["seq"].as_u64().unwrap();
                    if seq <= last {
                        continue;
                    }
                    assert_eq!(seq, last + 1, "in order");
                    last = seq;
                    if let Some(i) = v["data"]["n"].as_u64() {
                        got.push(i);
                    }
                    if seq.is_multiple_of(64) {
                        let _ = acks.send(json!({"t":"ack","seq":seq}).to_string()).await;
                    }
                }
                Some("hb") => {}
                _ => panic!("{v}"),
            }
        }
        let _ = acks.send(json!({"t":"ack","seq":last}).to_string()).await;
        got
    });
    for i in 1..=n {
        while i + 1 - *acked_rx.borrow() > window {
            acked_rx.changed().await.expect("reader alive");
        }
        let frame = json!({"t":"msg","seq":i + 1,"op":"publish","room":room,"data":{"n":i}});
        tx.send(frame.to_string()).await.unwrap();
    }
    let got = reader.await.unwrap();
    drop(tx);
    writer.await.unwrap();
    got
}

#[tokio::test]
async fn two_senders_flooding_each_other_both_get_everything() {
    // As in the burst test, the rate limit is raised so that senders outrun acks, and the
    // buffers hold what each may fall behind.
    let server = common::start(Settings {
        reliable_buffer_messages: Some(4000),
        ..common::unthrottled()
    })
    .await;
    let addr = server.local_addr;
    const N: u64 = 3000;
    let ((a, _, _), (b, _, _)) = pair(addr, "duel").await;
    let (at_a, at_b) = tokio::join!(
        flood(a, 2, "duel", N, 200, N as usize),
        flood(b, 1, "duel", N, 200, N as usize)
    );
    let all: Vec<u64> = (1..=N).collect();
    assert_eq!(at_a, all, "B to A: exactly once, in order");
    assert_eq!(at_b, all, "A to B: exactly once, in order");
    assert_eq!(
        metric(addr, "supersynk_reliable_overflows_total").await,
        0.0
    );
}

// ---- the open internet (issue 15): members that fall behind, memory, losses ----

/// `{"t":"msg","seq":..,"op":"publish","room":..,"data":{"i":..,"pad":"xx.."}}` of about
/// 60 KB.
fn big_publish(seq: u64, room: &str, i: u64) -> Value {
    json!({"t":"msg","seq":seq,"op":"publish","room":room,"data":{"i":i,"pad":"x".repeat(60_000)}})
}

#[tokio::test]
async fn a_member_that_reads_but_never_acks_slows_nobody_and_overflows_alone() {
    let server = common::start_default().await;
    let addr = server.local_addr;
    let ((mut a, a_id, _), (mut b, _, _)) = pair(addr, "r").await;
    // One publish of 60 KB from A to B, B acknowledging: how long until B has it.
    let mut a_seq = 1;
    let mut b_seq = 1;
    let mut round = async |a: &mut Client, b: &mut Client, i: u64| {
        a_seq += 1;
        let started = tokio::time::Instant::now();
        a.send_json(big_publish(a_seq, "r", i)).await;
        let v = loop {
            let v = b.recv_data().await;
            if v["t"] == "msg" && v["op"].is_null() {
                break v;
            }
        };
        let took = started.elapsed();
        expect(&v, json!({"from":a_id,"data":{"i":i}}));
        b_seq = v["seq"].as_u64().unwrap();
        b.send_json(json!({"t":"ack","seq":b_seq})).await;
        loop {
            let v = a.recv_data().await;
            if v["t"] == "ack" {
                assert_eq!(v["seq"], a_seq);
                break;
            }
        }
        took
    };
    let mut before = Duration::ZERO;
    for i in 0..3 {
        before = before.max(round(&mut a, &mut b, i).await);
    }
    // C joins, reads everything, and never acknowledges.
    let (mut c, c_id, c_token) = Client::joined(addr, "r").await;
    expect(&a.recv().await, json!({"op":"join","from":c_id}));
    expect(&b.recv().await, json!({"op":"join","from":c_id}));
    let reader = tokio::spawn(async move {
        let (mut last, mut overflow) = (1, false);
        loop {
            match tokio::time::timeout(WAIT, c.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["t"] == "msg" {
                        last = last.max(v["seq"].as_u64().unwrap());
                    }
                    overflow |= v["code"] == "overflow";
                }
                Ok(Some(Ok(Message::Close(f)))) => {
                    return (last, overflow, f.map(|f| u16::from(f.code)));
                }
                Ok(Some(Ok(_))) => {}
                other => panic!("C: {other:?}"),
            }
        }
    });
    // 20 more: C's 1 MiB buffer overflows after about 17; B's latency does not move (the
    // back-pressure wait made B wait 7.5 s for the 10th).
    let mut during = Duration::ZERO;
    for i in 3..23 {
        let took = round(&mut a, &mut b, i).await;
        during = during.max(took);
        assert!(took < Duration::from_secs(2), "publish {i} took {took:?}");
    }
    println!("B's latency: at most {before:?} before C, {during:?} with C");
    let (c_last, overflow, code) = reader.await.unwrap();
    assert!(overflow, "C was told its buffer overflowed");
    assert_eq!(code, Some(4008));
    assert!((15..=20).contains(&c_last), "C got {c_last} messages");
    // C starts over; A (which acknowledges nothing: these are resent) heard it leave.
    expect(
        &next_msg(&mut a, 3).await,
        json!({"op":"leave","from":c_id}),
    );
    let (_c, welcome) = Client::resume(addr, &c_id, c_last, &c_token).await;
    expect(&welcome, json!({"t":"welcome","resumed":false}));
    assert_eq!(
        metric(addr, "supersynk_reliable_overflows_total").await,
        1.0
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn waiting_states_share_one_copy_of_each_message() {
    let (proc, addr) = common::spawn(&["--port", "0"], &[]);
    const STATES: usize = 150;
    for _ in 0..STATES {
        let mut c = Client::connect(addr).await;
        let (id, _) = c.hello().await;
        c.send(r#"{"t":"msg","seq":1,"op":"join","room":"mem"}"#)
            .await;
        loop {
            let v = c.recv().await;
            if v["t"] == "ack" {
                break;
            }
            expect(&v, json!({"op":"join"}));
            let _ = &id;
        }
        // Gone without a word: the state waits for a resume.
    }
    common::until_metric(&[addr], "supersynk_reliable_detached", STATES as f64).await;
    let (mut p, _, _) = Client::joined(addr, "mem").await;
    let before = rss_kib(proc.0.id());
    for i in 0..16u64 {
        p.send_json(big_publish(2 + i, "mem", i)).await;
        expect(&p.recv_data().await, json!({"t":"ack","seq":2 + i}));
    }
    let after = rss_kib(proc.0.id());
    let held = metric(addr, "supersynk_reliable_buffered_bytes").await;
    println!(
        "{STATES} waiting states, 16 publishes of 60 KB: RSS {before} -> {after} KiB, {held} bytes held"
    );
    // Each of the 16 messages once (about 960 KB), not once per state (144 MB).
    assert!((960_000.0..1_100_000.0).contains(&held), "{held}");
    assert!(
        after.saturating_sub(before) < 16 * 1024,
        "RSS grew by {} KiB",
        after - before
    );
}

#[tokio::test]
async fn the_total_buffer_bound_drops_waiting_states_first_then_refuses() {
    let server = common::start(Settings {
        reliable_total_buffer_bytes: Some(500_000),
        ..Settings::default()
    })
    .await;
    let addr = server.local_addr;
    let mut waiting = Vec::new();
    for _ in 0..5 {
        let mut w = Client::connect(addr).await;
        let (id, token) = w.hello().await;
        join(&mut w, 1, "r", &id).await;
        waiting.push((id, token));
    }
    common::until_metric(&[addr], "supersynk_reliable_detached", 5.0).await;
    let (mut p, _, _) = Client::joined(addr, "r").await;
    // Eight messages of 60 KB fit; the ninth makes room by dropping the waiting states
    // (each holds the same messages: all of them must go), then is delivered.
    for seq in 2..=10u64 {
        p.send_json(big_publish(seq, "r", seq)).await;
        if seq == 10 {
            for (id, _) in &waiting {
                expect(&p.recv().await, json!({"op":"leave","from":id}));
            }
        }
        expect(&p.recv().await, json!({"t":"ack","seq":seq}));
    }
    assert_eq!(metric(addr, "supersynk_reliable_evicted_total").await, 5.0);
    for (id, token) in &waiting {
        let mut w = Client::connect(addr).await;
        w.send_json(json!({"t":"hello","clientId":id,"lastSeq":1,"token":token}))
            .await;
        expect(&w.recv().await, json!({"t":"welcome","resumed":false}));
    }
    // A connected member that does not acknowledge holds the rest: the next message past
    // the bound is refused to its sender, and nobody receives it.
    let (mut n, n_id, _) = Client::joined(addr, "r").await;
    expect(&p.recv().await, json!({"op":"join","from":n_id}));
    for seq in 11..=18u64 {
        p.send_json(big_publish(seq, "r", seq)).await;
        expect(&p.recv_data().await, json!({"t":"ack","seq":seq}));
    }
    p.send_json(big_publish(19, "r", 19)).await;
    expect(
        &p.recv_data().await,
        json!({"t":"error","code":"server_busy","seq":19}),
    );
    expect(&p.recv_data().await, json!({"t":"ack","seq":19}));
    let mut last = 1;
    while last < 9 {
        let v = n.recv_data().await;
        expect(&v, json!({"t":"msg"}));
        last = last.max(v["seq"].as_u64().unwrap());
    }
    // Acknowledged: room again (what is left is announcements).
    n.send_json(json!({"t":"ack","seq":9})).await;
    common::eventually("N's ack frees its buffer", async || {
        (metric(addr, "supersynk_reliable_buffered_bytes").await <= 10_000.0).then_some(())
    })
    .await;
    p.send_json(big_publish(20, "r", 20)).await;
    expect(&p.recv_data().await, json!({"t":"ack","seq":20}));
    expect(
        &next_msg(&mut n, 9).await,
        json!({"seq":10,"data":{"i":20}}),
    );
}

#[tokio::test]
async fn rooms_per_client_are_capped_and_room_names_have_no_control_characters() {
    let server = common::start_default().await;
    let (mut c, id, _) = Client::welcomed(server.local_addr).await;
    for i in 1..=64u64 {
        join(&mut c, i, &format!("room-{i}"), &id).await;
    }
    c.send(r#"{"t":"msg","seq":65,"op":"join","room":"one-too-many"}"#)
        .await;
    expect(
        &c.recv().await,
        json!({"t":"error","code":"too_many_rooms","seq":65}),
    );
    expect(&c.recv().await, json!({"t":"ack","seq":65}));
    c.send(r#"{"t":"msg","seq":66,"op":"leave","room":"room-1"}"#)
        .await;
    expect(&c.recv().await, json!({"t":"ack","seq":66}));
    join(&mut c, 67, "one-more", &id).await;
    for (seq, room) in [
        (68, "nul\u{0}byte"),
        (69, "new\nline"),
        (70, "esc\u{1b}[31m"),
    ] {
        c.send_json(json!({"t":"msg","seq":seq,"op":"leave","room":room}))
            .await;
        expect(
            &c.recv().await,
            json!({"t":"error","code":"bad_op","seq":seq}),
        );
        expect(&c.recv().await, json!({"t":"ack","seq":seq}));
    }
}

/// A small deterministic random number generator (xorshift64*), for the lossy link.
struct Rng(u64);

impl Rng {
    fn chance(&mut self, p: f64) -> bool {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11;
        (x as f64 / (1u64 << 53) as f64) < p
    }
}

/// A protocol client behind a link that loses each frame, either way, with probability
/// `loss`: it keeps what arrives ahead of a gap and names what it misses, resends what the
/// server names missing (and, after `seq_gap`, from the gap), and resends after 1 s.
/// Publishes `publish` messages `{"n":i}` to `room` (at most 256 unacknowledged), and
/// returns the `n`s received from others once it has `want` of them and its own are
/// acknowledged.
async fn lossy_peer(
    addr: SocketAddr,
    room: &'static str,
    seed: u64,
    loss: f64,
    publish: u64,
    want: usize,
    ready: std::sync::Arc<tokio::sync::Barrier>,
) -> Vec<u64> {
    use std::collections::BTreeMap;
    let (mut c, id, _) = Client::welcomed(addr).await;
    join(&mut c, 1, room, &id).await;
    let mut in_seq = 1;
    ready.wait().await;
    let mut rng = Rng(seed);
    let (mut sink, mut stream) = c.ws.split();
    let mut ahead: BTreeMap<u64, Value> = BTreeMap::new();
    let mut got = Vec::new();
    // Our own messages: seq -> (frame, last sent).
    let mut sent: BTreeMap<u64, (String, tokio::time::Instant)> = BTreeMap::new();
    let (mut next, mut acked, mut owed) = (2u64, 1u64, false);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let started = tokio::time::Instant::now();
    let missing = |in_seq: u64, ahead: &BTreeMap<u64, Value>| {
        let (mut from, mut out) = (in_seq + 1, Vec::new());
        for &s in ahead.keys() {
            if s > from {
                out.push([from, s - 1]);
            }
            from = s + 1;
        }
        out
    };
    while got.len() < want || acked < publish + 1 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "stuck: {} of {want}",
            got.len()
        );
        let mut out: Vec<String> = Vec::new();
        while next <= publish + 1 && next - acked <= 256 {
            let f = json!({"t":"msg","seq":next,"op":"publish","room":room,"data":{"n":next - 1}});
            sent.insert(next, (f.to_string(), tokio::time::Instant::now()));
            out.push(f.to_string());
            next += 1;
        }
        tokio::select! {
            frame = stream.next() => {
                let Some(Ok(Message::Text(t))) = frame else { continue };
                if rng.chance(loss) {
                    continue;
                }
                let v: Value = serde_json::from_str(&t).unwrap();
                let resend = |sent: &mut BTreeMap<u64, (String, tokio::time::Instant)>, from: u64, to: u64, out: &mut Vec<String>| {
                    for (_, (f, at)) in sent.range_mut(from..=to) {
                        *at = tokio::time::Instant::now();
                        out.push(f.clone());
                    }
                };
                match v["t"].as_str() {
                    Some("ack") | Some("hb") => {
                        let n = v["seq"].as_u64().or(v["ack"].as_u64()).unwrap();
                        acked = acked.max(n);
                        sent.retain(|s, _| *s > acked);
                        for r in v["missing"].as_array().into_iter().flatten() {
                            resend(&mut sent, r[0].as_u64().unwrap(), r[1].as_u64().unwrap(), &mut out);
                        }
                    }
                    Some("error") if v["code"] == "seq_gap" => {
                        resend(&mut sent, acked + 1, u64::MAX, &mut out);
                    }
                    Some("msg") => {
                        let seq = v["seq"].as_u64().unwrap();
                        owed = true;
                        if seq == in_seq + 1 {
                            let mut v = Some(v);
                            while let Some(m) = v {
                                in_seq += 1;
                                if let Some(n) = m["data"]["n"].as_u64() {
                                    got.push(n);
                                }
                                v = ahead.remove(&(in_seq + 1));
                            }
                        } else if seq > in_seq + 1 {
                            ahead.insert(seq, v);
                            let f = json!({"t":"ack","seq":in_seq,"missing":missing(in_seq, &ahead)});
                            out.push(f.to_string());
                        }
                    }
                    _ => panic!("{v}"),
                }
            }
            _ = tick.tick() => {
                if owed || !ahead.is_empty() {
                    owed = false;
                    let mut f = json!({"t":"ack","seq":in_seq});
                    if !ahead.is_empty() {
                        f["missing"] = json!(missing(in_seq, &ahead));
                    }
                    out.push(f.to_string());
                }
                let now = tokio::time::Instant::now();
                for (f, at) in sent.values_mut() {
                    if now.duration_since(*at) >= Duration::from_secs(1) {
                        *at = now;
                        out.push(f.clone());
                    }
                }
            }
        }
        for f in out {
            if !rng.chance(loss) {
                sink.send(Message::text(f)).await.expect("send");
            }
        }
    }
    // The last acks, without loss, so the other peer's messages are settled.
    let _ = sink
        .send(Message::text(json!({"t":"ack","seq":in_seq}).to_string()))
        .await;
    got
}

#[tokio::test]
async fn losses_are_recovered_at_once_exactly_once_and_in_order() {
    // Default timers (the server resends after 2 s); only the rate is raised, as this client
    // does not pace itself.
    let server = common::start(common::unthrottled()).await;
    let addr = server.local_addr;
    const N: u64 = 600;
    let ready = std::sync::Arc::new(tokio::sync::Barrier::new(2));
    let started = tokio::time::Instant::now();
    // A publishes 600 through its lossy link, B receives them through its own.
    let sender = tokio::spawn(lossy_peer(addr, "lossy", 11, 0.03, N, 0, ready.clone()));
    let receiver = tokio::spawn(lossy_peer(addr, "lossy", 29, 0.03, 0, N as usize, ready));
    let (sent_got, got) = (sender.await.unwrap(), receiver.await.unwrap());
    let took = started.elapsed();
    assert!(sent_got.is_empty());
    assert_eq!(got, (1..=N).collect::<Vec<_>>(), "exactly once, in order");
    let resends = metric(addr, "supersynk_reliable_resends_total").await;
    println!("{N} messages at 3% loss each way in {took:?} ({resends} resent by the server)");
    assert!(resends > 0.0, "nothing was lost: nothing tested");
    // Go-back-N on the 2 s timer took 37 s.
    assert!(took < Duration::from_secs(10), "{took:?}");
}
