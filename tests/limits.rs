//! Every limit at and past its value, leadership protection, the Origin allowlist and the
//! admin API, over real sockets.

mod common;

use std::time::Duration;

use common::*;
use futures::SinkExt;
use supersynk::config::Settings;
use supersynk_client::HunterClient;
use tokio_tungstenite::tungstenite::Message;

fn behind_proxy(s: Settings) -> Settings {
    // Tests connect from 127.0.0.1: make it a trusted proxy so X-Forwarded-For names the client.
    Settings {
        trusted_proxies: Some(vec!["127.0.0.1/32".parse().unwrap()]),
        ..s
    }
}

async fn from(addr: std::net::SocketAddr, client: &str) -> Result<HunterClient, String> {
    HunterClient::connect_with_headers(addr, "/connect", true, &[("X-Forwarded-For", client)])
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn connections_per_address_at_and_past_the_limit() {
    let server = start(behind_proxy(Settings {
        max_connections_per_ip: Some(2),
        ..Default::default()
    }))
    .await;
    let addr = server.local_addr;
    let a = from(addr, "203.0.113.5").await.unwrap();
    let _b = from(addr, "203.0.113.5").await.unwrap();
    let refused = from(addr, "203.0.113.5")
        .await
        .err()
        .expect("third is refused");
    assert!(
        refused.contains("429") && refused.contains("at most 2 connections per address"),
        "{refused}"
    );
    // Another address is not affected.
    from(addr, "203.0.113.6").await.unwrap();
    // A closed connection gives its place back.
    drop(a);
    let _again = eventually("the place released after close", async || {
        from(addr, "203.0.113.5").await.ok()
    })
    .await;
    assert!(
        metric(
            addr,
            "supersynk_errors_total{kind=\"limit_connections_per_ip\"}"
        )
        .await
            >= 1.0
    );
}

#[tokio::test]
async fn loopback_is_exempt_from_per_address_limits() {
    let server = start(Settings {
        max_connections_per_ip: Some(2),
        ..Default::default()
    })
    .await;
    let addr = server.local_addr;
    // Six from 127.0.0.1, three times the per-address limit: every one is admitted and works.
    let mut all = Vec::new();
    for i in 0..6 {
        let mut c = plugin(addr).await;
        join(&mut c, &format!("P{i}"), "loopback", i == 0).await;
        assert_eq!(state(&mut c).await, (i + 1, true), "client {i}");
        all.push(c);
    }
    // A push of the leader reaches the five others.
    all[0].send_text(&push("loopback", 1)).await.unwrap();
    for c in &mut all[1..] {
        loop {
            let v = recv(c).await;
            if v["type"] == "sessionstate" {
                continue;
            }
            assert_eq!(v["data"][0][0], "em_001", "{v}");
            break;
        }
    }
    assert_eq!(metric(addr, "supersynk_connections_open").await, 6.0);
    assert_eq!(
        metric(
            addr,
            "supersynk_errors_total{kind=\"limit_connections_per_ip\"}"
        )
        .await,
        0.0
    );
}

#[tokio::test]
async fn total_connections_at_and_past_the_limit() {
    let server = start(Settings {
        max_connections: Some(2),
        ..Default::default()
    })
    .await;
    let _a = plugin(server.local_addr).await;
    let _b = plugin(server.local_addr).await;
    let refused = HunterClient::connect(server.local_addr, "/connect", true)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        refused.contains("503") && refused.contains("server full: at most 2 connections"),
        "{refused}"
    );
}

#[tokio::test]
async fn message_rate_at_and_past_the_limit() {
    let server = start(Settings {
        messages_per_second: Some(20),
        message_burst: Some(20),
        ..Default::default()
    })
    .await;
    let mut c = plugin(server.local_addr).await;
    for _ in 0..20 {
        c.send_text("ping").await.unwrap();
    }
    for _ in 0..20 {
        assert_eq!(recv(&mut c).await, "pong");
    }
    for _ in 0..30 {
        // The server may close while we are still sending.
        if c.send_text("ping").await.is_err() {
            break;
        }
    }
    let mut code = None;
    for _ in 0..40 {
        match tokio::time::timeout(WAIT, futures::StreamExt::next(&mut c.ws))
            .await
            .unwrap()
        {
            Some(Ok(Message::Close(f))) => {
                code = f.map(|f| (u16::from(f.code), f.reason.to_string()));
                break;
            }
            Some(Ok(_)) => continue,
            _ => break,
        }
    }
    let (code, reason) = code.expect("closed with a frame");
    assert_eq!(code, 1008);
    assert!(reason.contains("rate limit"), "{reason}");
}

#[tokio::test]
async fn a_client_sending_100_messages_a_second_is_not_limited() {
    let server = start_default().await;
    let mut c = plugin(server.local_addr).await;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for _ in 0..200 {
        tick.tick().await;
        c.send_text("ping").await.unwrap();
    }
    for _ in 0..200 {
        assert_eq!(recv(&mut c).await, "pong");
    }
}

#[tokio::test]
async fn session_switches_at_and_past_the_limit() {
    let server = start(Settings {
        session_switches_per_minute: Some(3),
        ..Default::default()
    })
    .await;
    let mut c = plugin(server.local_addr).await;
    for s in ["a", "b", "c"] {
        join(&mut c, "X", s, false).await;
        assert_eq!(state(&mut c).await, (1, false));
    }
    // Re-joining the same session is not a switch.
    join(&mut c, "X", "c", true).await;
    assert_eq!(state(&mut c).await, (1, true));
    join(&mut c, "X", "d", false).await;
    assert!(
        servermsg(&mut c)
            .await
            .contains("at most 3 session changes per minute")
    );
    // Still in session c.
    c.send_text(&push("c", 1)).await.unwrap();
    c.send_text("ping").await.unwrap();
    assert_eq!(recv(&mut c).await, "pong");
}

#[tokio::test]
async fn members_per_session_at_and_past_the_limit() {
    let server = start(Settings {
        max_session_members: Some(2),
        ..Default::default()
    })
    .await;
    let mut a = plugin(server.local_addr).await;
    let mut b = plugin(server.local_addr).await;
    let mut c = plugin(server.local_addr).await;
    join(&mut a, "A", "small", true).await;
    state(&mut a).await;
    join(&mut b, "B", "small", false).await;
    assert_eq!(state(&mut b).await, (2, true));
    state(&mut a).await;
    join(&mut c, "C", "small", false).await;
    assert_eq!(
        servermsg(&mut c).await,
        "Cannot join: session is full: at most 2 members"
    );
    // The members were not told about anyone new.
    a.send_text("ping").await.unwrap();
    assert_eq!(recv(&mut a).await, "pong");
}

#[tokio::test]
async fn http_rate_and_body_limits() {
    let settings = behind_proxy(Settings {
        http_requests_per_second: Some(5),
        max_http_body_bytes: Some(100),
        admin_token: Some("t0ken".into()),
        ..Default::default()
    });
    let server = start(settings).await;
    let addr = server.local_addr;
    let client = [("X-Forwarded-For", "198.51.100.20")];
    let mut statuses = Vec::new();
    for _ in 0..30 {
        statuses.push(http_with(addr, "GET", "/version", &client, "").await.0);
    }
    // A burst of twice the rate passes, then 429.
    assert!(statuses[..10].iter().all(|s| *s == 200), "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
    let (_, _, body) = http_with(addr, "GET", "/version", &client, "").await;
    assert!(body.contains("at most 5 requests per second"), "{body}");
    // Loopback itself is not limited.
    for _ in 0..30 {
        assert_eq!(http(addr, "GET", "/version", "").await.0, 200);
    }
    // Bodies over the limit: 413.
    let auth = [
        ("Authorization", "Bearer t0ken"),
        ("Content-Type", "application/json"),
    ];
    let big = format!(r#"{{"text":"{}"}}"#, "x".repeat(200));
    assert_eq!(
        http_with(addr, "POST", "/admin/message", &auth, &big)
            .await
            .0,
        413
    );
    assert_eq!(
        http_with(addr, "POST", "/admin/message", &auth, r#"{"text":"hi"}"#)
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn origin_allowlist() {
    let server = start(Settings {
        allowed_origins: Some(vec!["https://ok.example".into()]),
        ..Default::default()
    })
    .await;
    let addr = server.local_addr;
    let evil = HunterClient::connect_with_headers(
        addr,
        "/connect",
        true,
        &[("Origin", "https://evil.example")],
    )
    .await;
    let err = evil.err().expect("refused").to_string();
    assert!(
        err.contains("403") && err.contains("origin not allowed"),
        "{err}"
    );
    HunterClient::connect_with_headers(addr, "/connect", true, &[("Origin", "https://ok.example")])
        .await
        .unwrap();
    // The plugin sends no Origin.
    plugin(addr).await;
}

#[tokio::test]
async fn a_session_secret_protects_leadership() {
    let server = start(Settings {
        leader_secrets: Some(true),
        ..Default::default()
    })
    .await;
    let addr = server.local_addr;
    let mut owner = plugin(addr).await;
    owner
        .send_text(r#"{"type":"SetSession","sessionId":"vip","isLeader":true,"secret":"s3cret"}"#)
        .await
        .unwrap();
    assert_eq!(state(&mut owner).await, (1, true));

    // A second client claiming leadership without the secret joins as a follower.
    let mut thief = plugin(addr).await;
    join(&mut thief, "T", "vip", true).await;
    assert_eq!(state(&mut thief).await, (2, true));
    assert!(servermsg(&mut thief).await.contains("protected"));
    assert_eq!(state(&mut owner).await, (2, true));
    thief.send_text(&push("vip", 1)).await.unwrap();
    assert!(
        servermsg(&mut thief)
            .await
            .contains("only the session leader")
    );
    // A wrong secret is no better.
    let mut wrong = plugin(addr).await;
    wrong
        .send_text(r#"{"type":"SetSession","sessionId":"vip","isLeader":true,"secret":"guess"}"#)
        .await
        .unwrap();
    assert_eq!(state(&mut wrong).await, (3, true));
    assert!(servermsg(&mut wrong).await.contains("protected"));
    // The owner's pushes reach both followers.
    owner.send_text(&push("vip", 2)).await.unwrap();
    for c in [&mut thief, &mut wrong] {
        loop {
            let v = recv(c).await;
            if v["type"] == "Push" {
                assert_eq!(v["data"][0][0], "em_002");
                break;
            }
        }
    }
    // The same secret makes a second leader (a reconnecting owner).
    let mut again = plugin(addr).await;
    again
        .send_text(r#"{"type":"SetSession","sessionId":"vip","isLeader":true,"secret":"s3cret"}"#)
        .await
        .unwrap();
    assert_eq!(state(&mut again).await, (4, true));
}

#[tokio::test]
async fn hmac_leader_tokens() {
    let server = start(Settings {
        leader_token_secret: Some("operator-key".into()),
        ..Default::default()
    })
    .await;
    let addr = server.local_addr;
    let token = supersynk::hunterpie::leader_token("operator-key", "tok:Host");
    let mut host = plugin(addr).await;
    host.send_text(&format!(
        r#"{{"type":"SetSession","sessionId":"tok:Host","isLeader":true,"token":"{token}"}}"#
    ))
    .await
    .unwrap();
    assert_eq!(state(&mut host).await, (1, true));
    let mut forger = plugin(addr).await;
    let forged = supersynk::hunterpie::leader_token("guessed-key", "tok:Host");
    forger
        .send_text(&format!(
            r#"{{"type":"SetSession","sessionId":"tok:Host","isLeader":true,"token":"{forged}"}}"#
        ))
        .await
        .unwrap();
    assert_eq!(state(&mut forger).await, (2, true));
    assert!(servermsg(&mut forger).await.contains("protected"));
    // Without a token on a protected session: follower too.
    let mut plain = plugin(addr).await;
    join(&mut plain, "P", "tok:Host", true).await;
    assert_eq!(state(&mut plain).await, (3, true));
    assert!(servermsg(&mut plain).await.contains("protected"));
    // Sessions whose leader presents nothing stay open to the deployed plugin.
    let mut open = plugin(addr).await;
    join(&mut open, "O", "open:Host", true).await;
    assert_eq!(state(&mut open).await, (1, true));
}

#[tokio::test]
async fn admin_api_lists_messages_and_kicks() {
    let server = start(Settings {
        admin_token: Some("adm1n".into()),
        ..Default::default()
    })
    .await;
    let addr = server.local_addr;
    let auth = [
        ("Authorization", "Bearer adm1n"),
        ("Content-Type", "application/json"),
    ];
    assert_eq!(http(addr, "GET", "/admin/sessions", "").await.0, 401);
    assert_eq!(
        http_with(
            addr,
            "GET",
            "/admin/sessions",
            &[("Authorization", "Bearer nope")],
            ""
        )
        .await
        .0,
        401
    );

    let mut host = plugin(addr).await;
    join(&mut host, "Host", "party", true).await;
    state(&mut host).await;
    let mut guest = plugin(addr).await;
    join(&mut guest, "Guest", "party", false).await;
    state(&mut guest).await;
    state(&mut host).await;
    let mut loner = plugin(addr).await;
    loner
        .send_text(r#"{"type":"SetName","name":"Loner"}"#)
        .await
        .unwrap();

    let (status, _, body) = http_with(addr, "GET", "/admin/sessions", &auth, "").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let party = &v["sessions"][0];
    assert_eq!(party["id"], "party");
    let names: Vec<&str> = party["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Host", "Guest"]);
    assert_eq!(party["members"][0]["leader"], true);
    let guest_conn = party["members"][1]["conn"].as_u64().unwrap();

    // A message to the session reaches its members only.
    let (status, _, body) = http_with(
        addr,
        "POST",
        "/admin/message",
        &auth,
        r#"{"text":"Restart at 20:00","session":"party"}"#,
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"complete":true,"delivered":2,"missing":[]}"#)
    );
    assert_eq!(servermsg(&mut host).await, "Restart at 20:00");
    assert_eq!(servermsg(&mut guest).await, "Restart at 20:00");
    // To everyone, connected but in no session included.
    let (status, _, body) = http_with(
        addr,
        "POST",
        "/admin/message",
        &auth,
        r#"{"text":"Maintenance","level":"error"}"#,
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"complete":true,"delivered":3,"missing":[]}"#)
    );
    assert_eq!(servermsg(&mut loner).await, "Maintenance");
    assert_eq!(
        http_with(
            addr,
            "POST",
            "/admin/message",
            &auth,
            r#"{"text":"x","level":"loud"}"#
        )
        .await
        .0,
        400
    );
    assert_eq!(
        http_with(
            addr,
            "POST",
            "/admin/message",
            &auth,
            r#"{"text":"x","session":"none"}"#
        )
        .await
        .0,
        404
    );
    assert_eq!(
        http_with(addr, "POST", "/admin/message", &auth, "not json")
            .await
            .0,
        400
    );

    // Kick the guest: closed with 4003, the host is told.
    let (status, _, _) = http_with(
        addr,
        "POST",
        "/admin/kick",
        &auth,
        &format!(r#"{{"conn":{guest_conn}}}"#),
    )
    .await;
    assert_eq!(status, 200);
    servermsg(&mut guest).await;
    assert_eq!(close_code(&mut guest).await, Some(4003));
    assert_eq!(servermsg(&mut host).await, "Maintenance");
    assert_eq!(state(&mut host).await, (1, true));
    assert_eq!(
        http_with(addr, "POST", "/admin/kick", &auth, r#"{"conn":999999}"#)
            .await
            .0,
        404
    );
    // Ping frames still work for the host.
    host.ws.send(Message::Ping(vec![1].into())).await.unwrap();
}

#[tokio::test]
async fn admin_api_is_off_without_a_token() {
    let server = start_default().await;
    assert_eq!(
        http(server.local_addr, "GET", "/admin/sessions", "")
            .await
            .0,
        404
    );
}
