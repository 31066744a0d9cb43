//! The reliable protocol's fixtures (`/v1/reliable`, protocol/reliable.md): a raw client
//! that sends frames and reads them as JSON, and the set-ups most tests start from (a client
//! welcomed, a client in a room, two clients in one room).

use std::net::SocketAddr;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use supersynk::config::Settings;
use tokio_tungstenite::tungstenite::Message;

use super::{WAIT, Ws};

/// A raw protocol client: sends frames, reads frames as JSON.
pub struct Client {
    pub ws: Ws,
}

/// A client welcomed by the server: the client, its clientId and its resume token.
pub type Welcomed = (Client, String, String);

impl Client {
    /// Opens `/v1/reliable`; nothing sent yet.
    pub async fn connect(addr: SocketAddr) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/reliable"))
            .await
            .expect("upgrade");
        Client { ws }
    }

    /// A connection that says its client is at `ip` (through a trusted proxy).
    pub async fn connect_from(addr: SocketAddr, ip: &str) -> Client {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = format!("ws://{addr}/v1/reliable")
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("x-forwarded-for", ip.parse().unwrap());
        let (ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .expect("upgrade");
        Client { ws }
    }

    /// A new client, welcomed: (client, clientId, token).
    pub async fn welcomed(addr: SocketAddr) -> Welcomed {
        let mut c = Client::connect(addr).await;
        let (id, token) = c.hello().await;
        (c, id, token)
    }

    /// A new client that joined `room` with its first message (seq 1).
    pub async fn joined(addr: SocketAddr, room: &str) -> Welcomed {
        let (mut c, id, token) = Client::welcomed(addr).await;
        join(&mut c, 1, room, &id).await;
        (c, id, token)
    }

    /// A new connection that resumes `id` from `last_seq` with `token`: the client and the
    /// welcome (resumed or not).
    pub async fn resume(addr: SocketAddr, id: &str, last_seq: u64, token: &str) -> (Client, Value) {
        let mut c = Client::connect(addr).await;
        c.send_json(json!({"t":"hello","clientId":id,"lastSeq":last_seq,"token":token}))
            .await;
        let welcome = c.recv().await;
        assert_eq!(welcome["t"], "welcome", "{welcome}");
        (c, welcome)
    }

    pub async fn send(&mut self, frame: &str) {
        self.ws
            .send(Message::text(frame.to_owned()))
            .await
            .expect("send");
    }

    pub async fn send_json(&mut self, v: Value) {
        self.send(&v.to_string()).await;
    }

    /// The next frame, within [`WAIT`].
    pub async fn recv(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame in time")
                .expect("socket open")
                .expect("no socket error");
            match msg {
                Message::Text(t) => return serde_json::from_str(&t).expect("JSON frame"),
                Message::Close(f) => panic!("closed: {f:?}"),
                _ => continue,
            }
        }
    }

    /// The next frame that is not a heartbeat.
    pub async fn recv_data(&mut self) -> Value {
        loop {
            let v = self.recv().await;
            if v["t"] != "hb" {
                return v;
            }
        }
    }

    /// Reads until the server closes; returns the close code.
    pub async fn close_code(&mut self) -> Option<u16> {
        super::close_code_of(&mut self.ws, WAIT).await
    }

    /// Says hello; returns (clientId, token) of the welcome.
    pub async fn hello(&mut self) -> (String, String) {
        self.send(r#"{"t":"hello"}"#).await;
        let w = self.recv().await;
        assert_eq!(w["t"], "welcome", "{w}");
        assert_eq!(w["resumed"], false);
        assert_eq!(w["seq"], 0);
        (
            w["clientId"].as_str().unwrap().to_owned(),
            w["token"].as_str().unwrap().to_owned(),
        )
    }
}

/// Two new clients in `room`, A first; A has read B's join (A's seq 2).
pub async fn pair(addr: SocketAddr, room: &str) -> (Welcomed, Welcomed) {
    let mut a = Client::joined(addr, room).await;
    let b = Client::joined(addr, room).await;
    expect(&a.0.recv().await, json!({"op":"join","from":b.1}));
    (a, b)
}

/// Expects a frame with these fields (others ignored, in nested objects too).
pub fn expect(v: &Value, fields: Value) {
    fn subset(want: &Value, got: &Value) -> bool {
        match (want, got) {
            (Value::Object(w), Value::Object(g)) => w
                .iter()
                .all(|(k, wv)| g.get(k).is_some_and(|gv| subset(wv, gv))),
            _ => want == got,
        }
    }
    assert!(subset(&fields, v), "expected {fields}\n     got {v}");
}

/// Joins `room` with message `seq`: the join comes back to the joiner, then its ack.
pub async fn join(c: &mut Client, seq: u64, room: &str, id: &str) {
    c.send_json(json!({"t":"msg","seq":seq,"op":"join","room":room}))
        .await;
    expect(
        &c.recv_data().await,
        json!({"t":"msg","op":"join","room":room,"from":id}),
    );
    expect(&c.recv_data().await, json!({"t":"ack","seq":seq}));
}

/// Settings with the protocol's timers shortened.
pub fn short(heartbeat_ms: u64, resend_ms: u64, window_ms: u64) -> Settings {
    Settings {
        reliable_heartbeat_ms: Some(heartbeat_ms),
        reliable_resend_ms: Some(resend_ms),
        reliable_resume_window_ms: Some(window_ms),
        ..Settings::default()
    }
}
