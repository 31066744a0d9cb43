//! `ws::Connection` in-process: the server half of a `tokio::io::duplex` pipe is served by
//! hyper with the crate's own upgrade (`ws::upgrade::accept`), and the test drives the
//! resulting [`Connection`] itself while tokio-tungstenite's client speaks over the other
//! half. No listener, no front-end: what one connection does with frames, pings, closes,
//! limits, a reader that stops reading and silence.

mod common;

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use common::WAIT;
use futures::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use supersynk::config::{Config, Settings};
use supersynk::core::outbound::{Close, Payload, SLOW_CONSUMER, SendError};
use supersynk::limits::Guard;
use supersynk::metrics::Metrics;
use supersynk::server::Peer;
use supersynk::ws::connection::{ConnContext, codes};
use supersynk::ws::{Connection, Event, WsSettings, upgrade};
use tokio::io::DuplexStream;
use tokio::sync::oneshot;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The settings of these tests: small enough to reach every limit with a few frames.
fn settings() -> WsSettings {
    WsSettings {
        max_message_bytes: 1024,
        max_message_fragments: 8,
        outbound_queue_bytes: 16 * 1024,
        deflate_threshold: 256,
        deflate_level: 1,
        idle_timeout: Duration::from_secs(30),
        idle_check_interval: Duration::from_secs(1),
        close_timeout: Duration::from_secs(2),
    }
}

/// One upgraded connection: the test's client on one end of the pipe, the server's
/// [`Connection`] on the other.
struct Pipe {
    client: WebSocketStream<DuplexStream>,
    conn: Connection,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

/// Opens a pipe of `buffer` bytes each way and upgrades it: the client's request goes
/// through hyper and `upgrade::accept`, the 101 comes back, and the server's side becomes a
/// [`Connection`] with `ws` settings.
async fn open(ws: WsSettings, buffer: usize) -> Pipe {
    let (client_io, server_io) = tokio::io::duplex(buffer);
    let config = Config::resolve(Settings::default()).expect("default config");
    let metrics = Arc::new(Metrics::new());
    let guard = Arc::new(Guard::new(&config, metrics.clone()));
    let shutdown = CancellationToken::new();
    let ctx = ConnContext {
        settings: Arc::new(ws),
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
        tracker: TaskTracker::new(),
        guard: guard.clone(),
    };
    let (conn_tx, conn_rx) = oneshot::channel();
    let conn_tx = Arc::new(std::sync::Mutex::new(Some(conn_tx)));
    let service = service_fn(move |req: hyper::Request<Incoming>| {
        let (ctx, guard, conn_tx) = (ctx.clone(), guard.clone(), conn_tx.clone());
        async move {
            let mut req = req.map(axum::body::Body::new);
            let accepted = match upgrade::accept(&mut req, true) {
                Ok(a) => a,
                Err(e) => return Ok::<_, Infallible>(e.into_response()),
            };
            tokio::spawn(async move {
                let upgraded = accepted.on_upgrade.await.expect("upgraded");
                let ip: IpAddr = [127, 0, 0, 1].into();
                let peer = Peer {
                    addr: ip,
                    permit: guard.admit(ip).expect("admitted"),
                };
                let conn = Connection::start(upgraded, accepted.deflate, ctx, peer).await;
                let tx = conn_tx.lock().unwrap().take().expect("one upgrade");
                // The test holds the receiver until it has the connection.
                let _ = tx.send(conn);
            });
            Ok(accepted.response)
        }
    });
    tokio::spawn(
        http1::Builder::new()
            .serve_connection(TokioIo::new(server_io), service)
            .with_upgrades(),
    );
    let (client, response) = tokio_tungstenite::client_async("ws://localhost/connect", client_io)
        .await
        .expect("the 101");
    assert_eq!(response.status(), 101);
    let conn = tokio::time::timeout(WAIT, conn_rx)
        .await
        .expect("upgraded in time")
        .expect("a connection");
    Pipe {
        client,
        conn,
        metrics,
        shutdown,
    }
}

/// Runs `conn` as an echo front-end until it closes (answering shutdown with 1001); returns
/// the close it ended with, once `finish` is done.
fn spawn_echo(mut conn: Connection) -> tokio::task::JoinHandle<Close> {
    tokio::spawn(async move {
        let close = loop {
            match conn.next().await {
                Event::Text(t) => conn.send(Payload::text(t)),
                Event::Binary(b) => conn.send(Payload::binary(b)),
                Event::Shutdown => conn.close(codes::SHUTDOWN),
                Event::Closed(close) => break close,
            }
        };
        conn.finish().await;
        close
    })
}

/// Runs `conn`, which is closing already: its next event must be `Closed`; returns that
/// close, once `finish` is done.
fn spawn_closing(mut conn: Connection) -> tokio::task::JoinHandle<Close> {
    tokio::spawn(async move {
        let close = match conn.next().await {
            Event::Closed(c) => c,
            other => panic!("expected Closed, got {other:?}"),
        };
        conn.finish().await;
        close
    })
}

/// The client's next message within [`WAIT`].
async fn next(client: &mut WebSocketStream<DuplexStream>) -> Message {
    next_within(client, WAIT).await
}

/// The client's next message within `limit`.
async fn next_within(client: &mut WebSocketStream<DuplexStream>, limit: Duration) -> Message {
    tokio::time::timeout(limit, client.next())
        .await
        .expect("a frame in time")
        .expect("stream open")
        .expect("no error")
}

/// Reads until the server's close frame (each frame within [`WAIT`]), then on to the end
/// of the stream (which sends tungstenite's answer to the close); returns the close's code
/// and reason, and how many data messages came before it.
async fn until_close(client: &mut WebSocketStream<DuplexStream>) -> (u16, String, usize) {
    until_close_within(client, WAIT).await
}

/// [`until_close`], each frame within `limit`.
async fn until_close_within(
    client: &mut WebSocketStream<DuplexStream>,
    limit: Duration,
) -> (u16, String, usize) {
    let mut before = 0;
    loop {
        match next_within(client, limit).await {
            Message::Close(Some(f)) => {
                ends(client).await;
                return (u16::from(f.code), f.reason.to_string(), before);
            }
            Message::Close(None) => panic!("a close frame without a code"),
            Message::Text(_) | Message::Binary(_) => before += 1,
            _ => {}
        }
    }
}

/// The server's side is gone: the client reads the end of the stream.
async fn ends(client: &mut WebSocketStream<DuplexStream>) {
    let end = tokio::time::timeout(WAIT, async {
        loop {
            match client.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(_)) => continue,
            }
        }
    });
    end.await.expect("the server drops the socket");
}

fn count(metrics: &Metrics, family: &str, kind: &'static str) -> u64 {
    let label = supersynk::metrics::KindLabel { kind };
    match family {
        "closes" => metrics.closes.get_or_create(&label).get(),
        _ => metrics.errors.get_or_create(&label).get(),
    }
}

#[tokio::test]
async fn text_and_binary_round_trip() {
    let mut p = open(settings(), 64 * 1024).await;
    let echo = spawn_echo(p.conn);
    p.client.send(Message::text("hello")).await.unwrap();
    assert_eq!(next(&mut p.client).await, Message::text("hello"));
    p.client
        .send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(
        next(&mut p.client).await,
        Message::binary(vec![0u8, 1, 2, 255])
    );
    assert_eq!(p.metrics.messages_in.get(), 2);
    assert_eq!(p.metrics.connections_open.get(), 1);
    p.client.close(None).await.unwrap();
    assert_eq!(echo.await.unwrap(), codes::PEER_CLOSED);
    assert_eq!(p.metrics.messages_out.get(), 2);
    assert_eq!(p.metrics.connections_open.get(), 0);
}

#[tokio::test]
async fn a_ping_is_answered_with_its_payload() {
    let mut p = open(settings(), 64 * 1024).await;
    let _echo = spawn_echo(p.conn);
    p.client
        .send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    assert_eq!(
        next(&mut p.client).await,
        Message::Pong(b"are you there".to_vec().into())
    );
    // The connection goes on as before.
    p.client.send(Message::text("after")).await.unwrap();
    assert_eq!(next(&mut p.client).await, Message::text("after"));
}

#[tokio::test]
async fn the_clients_close_is_echoed_with_its_code() {
    let mut p = open(settings(), 64 * 1024).await;
    let echo = spawn_echo(p.conn);
    p.client
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Away,
            reason: "leaving".into(),
        })))
        .await
        .unwrap();
    let (code, _, before) = until_close(&mut p.client).await;
    assert_eq!((code, before), (1001, 0));
    assert_eq!(echo.await.unwrap(), codes::PEER_CLOSED);
    assert_eq!(count(&p.metrics, "closes", "normal"), 1);
}

#[tokio::test]
async fn a_server_close_comes_after_what_was_queued_and_waits_for_the_answer() {
    // A close timeout far past WAIT: the server's side ends on the client's answer.
    let ws = WsSettings {
        close_timeout: Duration::from_secs(60),
        ..settings()
    };
    let mut p = open(ws, 64 * 1024).await;
    p.conn.send(Payload::text("last words"));
    p.conn.close(codes::KICKED);
    let server = spawn_closing(p.conn);
    assert_eq!(next(&mut p.client).await, Message::text("last words"));
    let (code, reason, _) = until_close(&mut p.client).await;
    assert_eq!(
        (code, reason.as_str()),
        (4003, "removed by an administrator")
    );
    // The client answered the close: the server's finish ends then, not at its timeout.
    assert_eq!(
        tokio::time::timeout(WAIT, server).await.unwrap().unwrap(),
        codes::KICKED
    );
    assert_eq!(count(&p.metrics, "closes", "kicked"), 1);
}

#[tokio::test]
async fn shutdown_is_seen_once_and_closes_with_1001() {
    let mut p = open(settings(), 64 * 1024).await;
    let echo = spawn_echo(p.conn);
    p.client.send(Message::text("before")).await.unwrap();
    assert_eq!(next(&mut p.client).await, Message::text("before"));
    p.shutdown.cancel();
    let (code, reason, _) = until_close(&mut p.client).await;
    assert_eq!((code, reason.as_str()), (1001, "server shutting down"));
    assert_eq!(echo.await.unwrap(), codes::SHUTDOWN);
    assert_eq!(count(&p.metrics, "closes", "shutdown"), 1);
}

#[tokio::test]
async fn an_oversized_message_is_closed_with_1009() {
    let mut p = open(settings(), 64 * 1024).await;
    let echo = spawn_echo(p.conn);
    // Within the limit: echoed.
    let fits = "a".repeat(1024);
    p.client.send(Message::text(fits.clone())).await.unwrap();
    assert_eq!(next(&mut p.client).await, Message::text(fits));
    // One byte over: closed, nothing echoed.
    p.client
        .send(Message::text("b".repeat(1025)))
        .await
        .unwrap();
    let (code, reason, before) = until_close(&mut p.client).await;
    assert_eq!(
        (code, reason.as_str(), before),
        (1009, "message too big", 0)
    );
    assert_eq!(echo.await.unwrap(), codes::TOO_BIG);
    assert_eq!(count(&p.metrics, "errors", "too_big"), 1);
    assert_eq!(count(&p.metrics, "closes", "too_big"), 1);
}

#[tokio::test]
async fn a_reader_that_stops_reading_is_closed_as_a_slow_consumer() {
    // A 4 KiB pipe: the writer is stuck once the client stops reading, and the 16 KiB queue
    // behind it overflows.
    let mut p = open(settings(), 4 * 1024).await;
    let kib = "k".repeat(1024);
    let mut sent = 0;
    let refused = loop {
        match p.conn.outbound.send(Payload::text(kib.clone())) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 1000, "the queue never filled");
        // Lets the writer take what the pipe holds.
        tokio::task::yield_now().await;
    };
    assert_eq!(refused, SendError::SlowConsumer);
    assert_eq!(p.conn.outbound.closing(), Some(SLOW_CONSUMER));
    let server = spawn_closing(p.conn);
    // The client reads again: what was in the pipe and the writer's hands, then the code.
    let (code, reason, before) = until_close(&mut p.client).await;
    assert_eq!(
        (code, reason.as_str()),
        (4008, "slow consumer: outbound queue full")
    );
    assert!(before < sent, "the queue behind the writer was dropped");
    assert_eq!(server.await.unwrap(), SLOW_CONSUMER);
    assert_eq!(p.metrics.slow_consumer_disconnects.get(), 1);
    assert_eq!(count(&p.metrics, "closes", "slow_consumer"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_is_closed_as_idle_after_the_timeout() {
    let mut p = open(settings(), 64 * 1024).await;
    let echo = spawn_echo(p.conn);
    let started = tokio::time::Instant::now();
    // Activity moves the deadline: a message at 20 s...
    tokio::time::sleep(Duration::from_secs(20)).await;
    p.client.send(Message::text("still here")).await.unwrap();
    assert_eq!(next(&mut p.client).await, Message::text("still here"));
    // ...and the close comes 30 s after it (within one check interval), not 30 s after the
    // start. Time is paused: it advances only while every task waits.
    let code = until_close_within(&mut p.client, Duration::from_secs(60)).await;
    assert_eq!((code.0, code.1.as_str()), (4000, "idle timeout"));
    let silent = started.elapsed();
    assert!(
        silent >= Duration::from_secs(50) && silent <= Duration::from_secs(52),
        "closed after {silent:?}"
    );
    assert_eq!(echo.await.unwrap(), codes::IDLE);
    assert_eq!(p.metrics.idle_timeouts.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn keepalive_pings_a_listening_client_which_is_then_never_idle() {
    // The server waits long for the answer to its close, so the silent client can still
    // read it (and answer) after the silence.
    let ws = WsSettings {
        close_timeout: Duration::from_secs(60),
        ..settings()
    };
    let mut p = open(ws, 64 * 1024).await;
    p.conn.keepalive(Duration::from_secs(10));
    let echo = spawn_echo(p.conn);
    let started = tokio::time::Instant::now();
    // The client only reads (tungstenite answers each ping with a pong as it reads): it sees
    // pings for far longer than the idle timeout, and no close.
    let mut pings = 0;
    while started.elapsed() < Duration::from_secs(120) {
        match next_within(&mut p.client, Duration::from_secs(15)).await {
            Message::Ping(_) => pings += 1,
            other => panic!("expected a ping, got {other:?}"),
        }
    }
    assert!(pings >= 10, "{pings} pings in 120 s");
    // A client that stops answering (it reads nothing, so tungstenite sends no pong) is
    // closed as idle within twice the ping interval. This sleep is the scenario: the
    // silence itself, in paused time.
    tokio::time::sleep(Duration::from_secs(25)).await;
    let (code, reason, _) = until_close(&mut p.client).await;
    assert_eq!((code, reason.as_str()), (4000, "idle timeout"));
    assert_eq!(echo.await.unwrap(), codes::IDLE);
    assert_eq!(p.metrics.idle_timeouts.get(), 1);
}
