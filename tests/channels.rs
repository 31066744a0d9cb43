//! The HTTP channel API over real HTTP, and its watch socket.

mod common;

use common::*;
use serde_json::{Value, json};
use supersynk::config::Settings;

const JSON: (&str, &str) = ("Content-Type", "application/json");

/// A bad request: body, extra headers, expected status, expected text in the error.
type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], u16, &'a str);

async fn post(
    addr: std::net::SocketAddr,
    key: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (u16, String, Value) {
    let mut all = vec![JSON];
    all.extend_from_slice(headers);
    let (status, head, body) =
        http_with(addr, "POST", &format!("/api/channels/{key}"), &all, body).await;
    (
        status,
        head,
        serde_json::from_str(&body).unwrap_or(Value::Null),
    )
}

async fn get_json(addr: std::net::SocketAddr, path: &str) -> Value {
    let (status, _, body) = http(addr, "GET", path, "").await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn server_time(head: &str) -> f64 {
    let line = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("server-time:"))
        .expect("Server-Time header");
    line.split(':').nth(1).unwrap().trim().parse().unwrap()
}

#[tokio::test]
async fn the_seed_curl_session() {
    let server = start_default().await;
    let addr = server.local_addr;
    let (_, _, body) = http(addr, "GET", "/api", "").await;
    assert_eq!(
        body,
        format!("supersynk server {}", env!("CARGO_PKG_VERSION"))
    );
    let (status, _, v) = post(addr, "test", r#"{"client_id":"ada"}"#, &[]).await;
    assert_eq!((status, v), (200, json!([])));
    let (status, _, v) = post(addr, "test", r#"{"client_id":"joe"}"#, &[]).await;
    assert_eq!((status, v), (200, json!([{"client_id":"ada"}])));
    assert_eq!(
        get_json(addr, "/api/channels/test").await,
        json!([{"client_id":"ada"},{"client_id":"joe"}])
    );
    assert_eq!(get_json(addr, "/api/channels").await, json!(["test"]));
    assert_eq!(get_json(addr, "/api/channels/unknown").await, json!([]));
}

#[tokio::test]
async fn state_is_replaced_verbatim_and_channels_are_isolated() {
    let server = start_default().await;
    let addr = server.local_addr;
    post(addr, "a", r#"{"client_id":"ada","pos":[1,2,3]}"#, &[]).await;
    post(addr, "b", r#"{"client_id":"bob"}"#, &[]).await;
    post(
        addr,
        "a",
        r#"{"client_id":"ada","pos":[4,5,6],"extra":{"deep":true}}"#,
        &[],
    )
    .await;
    let (_, _, v) = post(addr, "a", r#"{"client_id":"joe"}"#, &[]).await;
    assert_eq!(
        v,
        json!([{"client_id":"ada","pos":[4,5,6],"extra":{"deep":true}}])
    );
    assert_eq!(
        get_json(addr, "/api/channels/b").await,
        json!([{"client_id":"bob"}])
    );
    assert_eq!(get_json(addr, "/api/channels").await, json!(["a", "b"]));
}

#[tokio::test]
async fn late_requests_get_204_and_change_nothing() {
    let server = start_default().await;
    let addr = server.local_addr;
    let order = |t: &'static str| [("Client-Id", "ada"), ("Client-Time", t)];
    let (status, head, _) = post(addr, "o", r#"{"client_id":"ada","v":2}"#, &order("2.5")).await;
    assert_eq!(status, 200);
    let t1 = server_time(&head);
    let (status, head, v) = post(addr, "o", r#"{"client_id":"ada","v":1}"#, &order("1.25")).await;
    assert_eq!((status, v), (204, Value::Null));
    assert!(!head.to_ascii_lowercase().contains("server-time"));
    assert_eq!(
        get_json(addr, "/api/channels/o").await,
        json!([{"client_id":"ada","v":2}])
    );
    let (status, _, _) = http_with(addr, "GET", "/api/channels/o", &order("1.0"), "").await;
    assert_eq!(status, 204);
    let (status, head, _) = post(addr, "o", r#"{"client_id":"ada","v":3}"#, &order("3")).await;
    assert_eq!(status, 200);
    assert!(server_time(&head) >= t1, "Server-Time never decreases");
    assert_eq!(
        get_json(addr, "/api/channels/o").await,
        json!([{"client_id":"ada","v":3}])
    );
}

#[tokio::test]
async fn server_time_is_present_and_never_decreases() {
    let server = start_default().await;
    let mut last = 0.0;
    for i in 0..20 {
        let (status, head, _) = post(
            server.local_addr,
            "t",
            &format!(r#"{{"client_id":"c{i}"}}"#),
            &[],
        )
        .await;
        assert_eq!(status, 200);
        let t = server_time(&head);
        assert!(t >= last);
        let digits = head
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("server-time"))
            .unwrap()
            .rsplit('.')
            .next()
            .unwrap();
        assert_eq!(digits.trim().len(), 3, "3 decimals");
        last = t;
    }
}

#[tokio::test]
async fn silent_clients_and_empty_channels_are_removed() {
    let server = start(Settings {
        channel_timeout_ms: Some(300),
        ..Default::default()
    })
    .await;
    let addr = server.local_addr;
    post(addr, "quiet", r#"{"client_id":"ada"}"#, &[]).await;
    post(addr, "busy", r#"{"client_id":"joe"}"#, &[]).await;
    // joe keeps posting; ada falls silent.
    eventually(
        "the silent client and its empty channel are removed",
        async || {
            post(addr, "busy", r#"{"client_id":"joe"}"#, &[]).await;
            (get_json(addr, "/api/channels").await == json!(["busy"])).then_some(())
        },
    )
    .await;
    assert_eq!(get_json(addr, "/api/channels/quiet").await, json!([]));
    assert_eq!(
        get_json(addr, "/api/channels/busy").await,
        json!([{"client_id":"joe"}])
    );
}

#[tokio::test]
async fn bad_input_is_refused_and_stores_nothing() {
    let server = start(Settings {
        max_channel_body_bytes: Some(200),
        ..Default::default()
    })
    .await;
    let addr = server.local_addr;
    let cases: [Case; 9] = [
        ("{nope", &[], 400, "not valid JSON"),
        ("[1,2]", &[], 400, "must be a JSON object"),
        ("\"ada\"", &[], 400, "must be a JSON object"),
        (r#"{"name":"ada"}"#, &[], 400, "needs a \"client_id\""),
        (r#"{"client_id":""}"#, &[], 400, "non-empty string"),
        (r#"{"client_id":42}"#, &[], 400, "non-empty string"),
        (r#"{"client_id":null}"#, &[], 400, "client_id"),
        (
            r#"{"client_id":"ada"}"#,
            &[("Client-Time", "soon")],
            400,
            "Client-Time must be a number",
        ),
        (
            r#"{"client_id":"ada"}"#,
            &[("Client-Time", "NaN")],
            400,
            "Client-Time must be a number",
        ),
    ];
    for (body, headers, status, text) in cases {
        let mut all = vec![JSON];
        all.extend_from_slice(headers);
        let (got, _, answer) = http_with(addr, "POST", "/api/channels/bad", &all, body).await;
        assert_eq!(got, status, "{body}");
        let v: Value = serde_json::from_str(&answer)
            .unwrap_or_else(|_| panic!("JSON error for {body}: {answer}"));
        assert!(
            v["error"].as_str().unwrap().contains(text),
            "{body}: {answer}"
        );
    }
    let big = format!(r#"{{"client_id":"ada","pad":"{}"}}"#, "x".repeat(300));
    let (got, _, answer) = http_with(addr, "POST", "/api/channels/bad", &[JSON], &big).await;
    assert_eq!(got, 413, "{answer}");
    assert_eq!(get_json(addr, "/api/channels").await, json!([]));
}

#[tokio::test]
async fn forty_clients_posting_at_once() {
    let server = start_default().await;
    let addr = server.local_addr;
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            tokio::spawn(async move {
                let mut others = Vec::new();
                for round in 0..5 {
                    let (status, _, v) = post(
                        addr,
                        "crowd",
                        &format!(r#"{{"client_id":"c{i}","round":{round}}}"#),
                        &[],
                    )
                    .await;
                    assert_eq!(status, 200);
                    let ids: Vec<String> = v
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|e| e["client_id"].as_str().unwrap().to_string())
                        .collect();
                    assert!(
                        !ids.contains(&format!("c{i}")),
                        "a client never gets its own state back"
                    );
                    others = ids;
                }
                others.len()
            })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap() <= 39);
    }
    let all = get_json(addr, "/api/channels/crowd").await;
    assert_eq!(all.as_array().unwrap().len(), 40);
    assert!(all.as_array().unwrap().iter().all(|e| e["round"] == 4));
}

#[tokio::test]
async fn the_watch_socket_sees_each_change() {
    let server = start(Settings {
        channel_timeout_ms: Some(400),
        ..Default::default()
    })
    .await;
    let addr = server.local_addr;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/api/channels/w/watch"))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await, json!([]));
    post(addr, "w", r#"{"client_id":"ada"}"#, &[]).await;
    assert_eq!(next_json(&mut ws).await, json!([{"client_id":"ada"}]));
    post(addr, "w", r#"{"client_id":"joe","x":1}"#, &[]).await;
    assert_eq!(
        next_json(&mut ws).await,
        json!([{"client_id":"ada"},{"client_id":"joe","x":1}])
    );
    // Both fall silent: the watcher sees the channel empty.
    let mut last = Value::Null;
    for _ in 0..5 {
        last = next_json(&mut ws).await;
        if last == json!([]) {
            break;
        }
    }
    assert_eq!(last, json!([]));
}
