//! Checks the examples of protocol/hunterpie.md against the server's own parser and
//! renderers, and round-trips every JSON example.

use supersynk::core::hub::Presence;
use supersynk::hunterpie::message::{self, Level};

/// (info string, body) of every fenced block of a markdown file.
fn blocks(markdown: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in markdown.lines() {
        if let Some(info) = line.strip_prefix("```") {
            match current.take() {
                Some(block) => out.push(block),
                None => current = Some((info.trim().to_string(), String::new())),
            }
        } else if let Some((_, body)) = current.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out
}

#[test]
fn hunterpie_examples_are_what_the_server_accepts_and_renders() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/protocol/hunterpie.md"
    ))
    .unwrap();
    let (mut client, mut server) = (0, 0);
    for (info, body) in blocks(&doc) {
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
