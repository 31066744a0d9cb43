//! supersynk-client: a HunterPie-compatible WebSocket client, for the tests and the benchmark tool.
//!
//! It does what the deployed plugin does on the wire (see protocol/hunterpie.md): the exact
//! opening handshake (including `permessage-deflate;client_no_context_takeover`), every
//! message compressed as a finished deflate stream plus one `0x00` byte when compression was
//! agreed, and every received RSV1 message inflated with a fresh inflater.

use std::net::SocketAddr;

use bytes::Bytes;
use flate2::FlushCompress;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use supersynk::ws::deflate::{InflateLayer, Side, compress_with};

/// The client's socket type.
pub type ClientStream = WebSocketStream<InflateLayer<TcpStream>>;

/// Why a client could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("handshake refused: {0}")]
    Handshake(String),
    #[error("websocket: {0}")]
    Ws(#[from] WsError),
}

/// A connected HunterPie client.
pub struct HunterClient {
    pub ws: ClientStream,
    /// Whether the server agreed to permessage-deflate.
    pub deflate: bool,
    /// The server's 101 answer, headers included.
    pub handshake: String,
}

/// The plugin's compression: a finished raw deflate stream followed by one 0x00 byte. The
/// level (1) is ours: the server accepts any, and the benchmark must stay cheap.
pub fn plugin_deflate(data: &[u8]) -> Vec<u8> {
    let mut out = compress_with(data, 1, FlushCompress::Finish);
    out.push(0);
    out
}

impl HunterClient {
    /// Connects to `addr` and upgrades `path` (normally `/connect`) with the plugin's exact
    /// request. `offer_deflate: false` leaves the extension header out.
    pub async fn connect(
        addr: SocketAddr,
        path: &str,
        offer_deflate: bool,
    ) -> Result<HunterClient, ClientError> {
        Self::connect_with_headers(addr, path, offer_deflate, &[]).await
    }

    /// [`HunterClient::connect`] with extra request headers (`X-Forwarded-For`, `Origin`...).
    pub async fn connect_with_headers(
        addr: SocketAddr,
        path: &str,
        offer_deflate: bool,
        headers: &[(&str, &str)],
    ) -> Result<HunterClient, ClientError> {
        let mut tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let key = tokio_tungstenite::tungstenite::handshake::client::generate_key();
        let ext = if offer_deflate {
            "Sec-WebSocket-Extensions: permessage-deflate;client_no_context_takeover\r\n"
        } else {
            ""
        };
        let extra: String = headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}\r\n"))
            .collect();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: keep-alive, Upgrade\r\nCache-Control: no-cache\r\n\
             Pragma: no-cache\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n{ext}{extra}\r\n",
            addr.ip()
        );
        tcp.write_all(request.as_bytes()).await?;
        let mut buf = Vec::with_capacity(512);
        let end = loop {
            let mut chunk = [0u8; 512];
            let n = tcp.read(&mut chunk).await?;
            if n == 0 {
                return Err(ClientError::Handshake(
                    String::from_utf8_lossy(&buf).into_owned(),
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos + 4;
            }
            if buf.len() > 16 * 1024 {
                return Err(ClientError::Handshake("answer too long".into()));
            }
        };
        let handshake = String::from_utf8_lossy(&buf[..end]).into_owned();
        if !handshake.starts_with("HTTP/1.1 101") {
            // Read the (short) body too: it says why. The connection may stay open
            // (keep-alive), so read Content-Length bytes, not to the end.
            let length = handshake
                .lines()
                .find_map(|l| {
                    let l = l.to_ascii_lowercase();
                    l.strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0)
                .min(4096);
            let mut body = buf[end..].to_vec();
            let read_body = async {
                let mut chunk = [0u8; 512];
                while body.len() < length {
                    match tcp.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => body.extend_from_slice(&chunk[..n]),
                    }
                }
            };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), read_body).await;
            return Err(ClientError::Handshake(format!(
                "{handshake}{}",
                String::from_utf8_lossy(&body)
            )));
        }
        let deflate = handshake.lines().any(|l| {
            let l = l.to_ascii_lowercase();
            l.starts_with("sec-websocket-extensions:") && l.contains("permessage-deflate")
        });
        let rest = Bytes::copy_from_slice(&buf[end..]);
        let layer = InflateLayer::new(tcp, Side::Client, deflate, 64 << 20, rest);
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0);
        let ws = WebSocketStream::from_raw_socket(layer, Role::Client, Some(config)).await;
        Ok(HunterClient {
            ws,
            deflate,
            handshake,
        })
    }

    /// Sends a text message, compressed the plugin's way when deflate was agreed.
    pub async fn send_text(&mut self, text: &str) -> Result<(), WsError> {
        self.ws.send(text_message(text, self.deflate)).await
    }

    /// The next text message, skipping control frames; `None` once closed.
    pub async fn next_text(&mut self) -> Option<Result<String, WsError>> {
        loop {
            match self.ws.next().await? {
                Ok(Message::Text(t)) => return Some(Ok(t.as_str().to_owned())),
                Ok(Message::Close(_)) => return None,
                Ok(_) => continue,
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// Messages that arrived compressed (RSV1) so far.
    pub fn inflated_messages(&self) -> u64 {
        self.ws.get_ref().inflated_messages()
    }
}

/// A text message as the plugin sends it: compressed (RSV1) when `deflate`.
pub fn text_message(text: &str, deflate: bool) -> Message {
    if deflate {
        let mut frame = Frame::message(
            plugin_deflate(text.as_bytes()),
            OpCode::Data(Data::Text),
            true,
        );
        frame.header_mut().rsv1 = true;
        Message::Frame(frame)
    } else {
        Message::text(text)
    }
}
