//! The log front-end's fixtures (`/logs/add`, `/logs/listen`, `/logs/query`,
//! protocol/logs.md): the plugin's entries, posting them, listeners that the server has
//! registered, and queries that wait for the store.

use std::net::SocketAddr;

use serde_json::Value;

use super::{WAIT, Ws, eventually_within, http, metric, until_metric};

/// One entry exactly as the deployed plugin posts it.
pub fn plugin_entry(user: &str, room: &str, level: &str, msg: &str) -> String {
    format!(
        r#"{{"timestamp":1700000000123,"level":"{level}","msg":"{msg}","text":"22:13:20:123 [{level}] {msg}","user":"{user}","room":"{room}"}}"#
    )
}

/// POSTs `body` to `/logs/add`; returns (status, body).
pub async fn post(addr: SocketAddr, body: &str) -> (u16, String) {
    let (status, _, body) = http(addr, "POST", "/logs/add", body).await;
    (status, body)
}

/// POSTs `body` to `/logs/add`, which must take it (200).
pub async fn posted(addr: SocketAddr, body: &str) {
    let (status, answer) = post(addr, body).await;
    assert_eq!(status, 200, "{answer}");
}

/// A listener on `/logs/listen{query}`, once the server has registered it (so that what is
/// posted next reaches it).
pub async fn listener(addr: SocketAddr, query: &str) -> Ws {
    let before = metric(addr, "supersynk_logs_listeners").await;
    let ws = listener_unregistered(addr, query).await;
    until_metric(&[addr], "supersynk_logs_listeners", before + 1.0).await;
    ws
}

/// A listener on `/logs/listen{query}`, upgraded but maybe not registered yet.
pub async fn listener_unregistered(addr: SocketAddr, query: &str) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/logs/listen{query}"))
        .await
        .expect("listener connects");
    ws
}

/// Reads arrays from a listener until `n` entries from users other than "server" came.
pub async fn entries(ws: &mut Ws, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        let v = super::next_json(ws).await;
        for e in v.as_array().expect("every message is a JSON array") {
            if e["user"] != "server" {
                out.push(e.clone());
            }
        }
    }
    out
}

/// The `msg` of each entry.
pub fn msgs(entries: &[Value]) -> Vec<&str> {
    entries.iter().map(|e| e["msg"].as_str().unwrap()).collect()
}

/// Polls `/logs/query?{q}` until `check` accepts the answer.
pub async fn query_until(addr: SocketAddr, q: &str, check: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let found = eventually_within(WAIT, async || {
        let (status, _, body) = http(addr, "GET", &format!("/logs/query?{q}"), "").await;
        assert_eq!(status, 200, "{body}");
        last = serde_json::from_str(&body).unwrap();
        check(&last).then(|| last.clone())
    })
    .await;
    found.unwrap_or_else(|| panic!("query {q}: {last}"))
}

/// The entries of a query's answer that the plugin posted (not the server's own).
pub fn plugin_users(v: &Value) -> Vec<Value> {
    v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["user"] != "server")
        .cloned()
        .collect()
}
