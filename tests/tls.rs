//! Native TLS: HTTPS and a WebSocket over TLS (wss) with a real rustls client.

mod common;

use std::sync::Arc;

use common::*;
use futures::{SinkExt, StreamExt};
use supersynk::config::Settings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{self, pki_types::ServerName};
use tokio_tungstenite::tungstenite::Message;

async fn tls_connect(
    addr: std::net::SocketAddr,
    cert_der: &[u8],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert_der.to_vec().into()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

#[tokio::test]
async fn https_and_wss_with_a_real_tls_client() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = std::env::temp_dir().join(format!("supersynk-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let server = start(Settings {
        tls_cert: Some(cert_path),
        tls_key: Some(key_path),
        ..Default::default()
    })
    .await;
    let addr = server.local_addr;
    let der = cert.cert.der().to_vec();

    // HTTPS
    let mut tls = tls_connect(addr, &der).await;
    tls.write_all(b"GET /version HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tls.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.ends_with("\r\n\r\n0.1"), "{out}");

    // wss: the HunterPie protocol over TLS.
    let tls = tls_connect(addr, &der).await;
    let (mut ws, _) = tokio_tungstenite::client_async("wss://localhost/connect", tls)
        .await
        .unwrap();
    ws.send(Message::text(
        r#"{"type":"SetSession","sessionId":"secure","isLeader":true}"#,
    ))
    .await
    .unwrap();
    let msg = ws.next().await.unwrap().unwrap();
    assert_eq!(
        msg.into_text().unwrap().as_str(),
        r#"{"type":"sessionstate","leaderConnected":true,"playersCount":1}"#
    );

    // A plain-TCP client gets nothing but a closed connection, and the server carries on.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, plain.read_to_end(&mut buf))
        .await
        .unwrap();
    assert!(!String::from_utf8_lossy(&buf).contains("0.1"));
    ws.send(Message::text("ping")).await.unwrap();
    assert_eq!(
        ws.next()
            .await
            .unwrap()
            .unwrap()
            .into_text()
            .unwrap()
            .as_str(),
        "pong"
    );
    let _ = std::fs::remove_dir_all(dir);
}
