//! Checks the examples of protocol/hunterpie.md against the server's own parser and
//! renderers, and round-trips every JSON example.

mod common;

use supersynk::core::hub::Presence;
use supersynk::hunterpie::message::{self, Level};

#[test]
fn hunterpie_examples_are_what_the_server_accepts_and_renders() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/protocol/hunterpie.md"
    ))
    .unwrap();
    let (mut client, mut server) = (0, 0);
    for (info, body) in common::fenced_blocks(&doc) {
        let body = body.trim();
        if !info.starts_with("json") {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{body}: {e}"));
        assert_eq!(
            serde_json::to_string(&value).unwrap().len(),
            body.len(),
            "example is compact JSON: {body}"
        );
        let round: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&value).unwrap()).unwrap();
        assert_eq!(round, value);
        match info.as_str() {
            "json client" => {
                client += 1;
                message::parse(body).unwrap_or_else(|e| panic!("server refuses {body}: {e}"));
            }
            "json server" => {
                server += 1;
                let rendered = match value["type"].as_str().unwrap() {
                    "sessionstate" => message::session_state(Presence {
                        members: value["playersCount"].as_u64().unwrap() as usize,
                        leaders: value["leaderConnected"].as_bool().unwrap() as usize,
                    }),
                    "servermsg" => {
                        assert_eq!(value["level"], "warn");
                        message::server_msg(Level::Warn, value["text"].as_str().unwrap())
                    }
                    other => panic!("unexpected server example type {other}"),
                };
                assert_eq!(
                    std::str::from_utf8(rendered.data()).unwrap(),
                    body,
                    "server renders the example exactly"
                );
            }
            other => panic!("unknown example kind {other}"),
        }
    }
    assert!(
        client >= 5 && server >= 2,
        "examples found: {client} client, {server} server"
    );
}

/// Replays the request/answer pairs of protocol/channels.md against a fresh server.
#[tokio::test]
async fn channel_api_examples_replay_against_the_server() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/protocol/channels.md"))
        .unwrap();
    let config = supersynk::Config::resolve(supersynk::config::Settings {
        bind: Some([127, 0, 0, 1].into()),
        port: Some(0),
        ..Default::default()
    })
    .unwrap();
    let server = supersynk::Server::start(config).await.unwrap();
    let mut request: Option<String> = None;
    let mut pairs = 0;
    for (info, body) in common::fenced_blocks(&doc) {
        match info.as_str() {
            "http request" => request = Some(body),
            "http answer" => {
                let req = request.take().expect("an answer follows a request");
                let (head, req_body) = req.split_once("\n\n").unwrap_or((req.trim_end(), ""));
                let req_body = req_body.trim_end();
                let mut lines = head.lines();
                let request_line = lines.next().unwrap();
                let headers: String = lines.map(|l| format!("{l}\r\n")).collect();
                let raw = format!(
                    "{request_line} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n{req_body}",
                    req_body.len()
                );
                let mut tcp = tokio::net::TcpStream::connect(server.local_addr)
                    .await
                    .unwrap();
                tcp.write_all(raw.as_bytes()).await.unwrap();
                let mut out = String::new();
                tcp.read_to_string(&mut out).await.unwrap();
                let (got_head, got_body) = out.split_once("\r\n\r\n").unwrap();
                let status = got_head.split(' ').nth(1).unwrap();
                let (want_status, want_body) = body
                    .trim_end()
                    .split_once('\n')
                    .unwrap_or((body.trim_end(), ""));
                assert_eq!(status, want_status, "{request_line}");
                if want_body.is_empty() {
                    assert!(got_body.is_empty(), "{request_line}: {got_body}");
                } else {
                    let got: serde_json::Value = serde_json::from_str(got_body).unwrap();
                    let want: serde_json::Value = serde_json::from_str(want_body).unwrap();
                    assert_eq!(got, want, "{request_line}");
                }
                pairs += 1;
            }
            _ => {}
        }
    }
    assert!(pairs >= 7, "found {pairs} pairs");
}
