//! `--reliable`: load on the reliable protocol (protocol/reliable.md).
//!
//! `--sessions` rooms of `--followers + 1` clients. Every client is one task with its own
//! WebSocket (no deflate): it says hello, joins `bench-<room>` and, once every client has
//! joined, publishes `{"pad":"..","s":<sender>,"ts":<µs>,"seq":<k>}` to its room every
//! `--interval-ms` (clients start spread over one interval), with its own numbering.
//! Receivers acknowledge cumulatively every 100 ms or every 64 messages (as the TypeScript
//! client does), answer nothing else, and check what they get: the room, per-sender order
//! (gaps, out of order), the server's numbering (duplicates are dropped, as the protocol
//! says). Latency is `now - ts` on one clock. Expected deliveries: every measured publish
//! times the other members of its room. The figures are the HunterPie
//! scenario's ([`Deliveries`]), with mode `reliable`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::time::{MissedTickBehavior, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::harness::{Harness, Latencies, Plan, RunFacts, Scenario, tick};
use crate::hunterpie::{ConnResult, Deliveries, digits_before, parse_tail};
use crate::{Args, resolve};

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

/// Cumulative acks go out at least this often while messages are owed (as the TypeScript client)...
const ACK_EVERY: Duration = Duration::from_millis(100);
/// ...or at once after this many.
const ACK_AFTER: u64 = 64;
const PREFIX: &[u8] = br#"{"t":"msg","seq":"#;

/// The scenario: where clients connect, and how many joined each room.
pub(crate) struct Reliable {
    addr: SocketAddr,
    path: String,
    rooms: usize,
    per_room: usize,
    setup: String,
    /// Members joined per room (complete before the plan is published).
    joined: Vec<AtomicU64>,
}

impl Reliable {
    pub(crate) async fn new(args: &Args) -> anyhow::Result<Reliable> {
        let (addr, path) = resolve(args.url()).await?;
        Ok(Reliable {
            addr,
            path,
            rooms: args.sessions,
            per_room: args.followers + 1,
            setup: format!(
                "{} rooms x {} members, all publishing, interval {} ms, payload {} B, deflate off",
                args.sessions,
                args.followers + 1,
                args.interval_ms(),
                args.payload_bytes
            ),
            joined: (0..args.sessions).map(|_| AtomicU64::new(0)).collect(),
        })
    }
}

impl Scenario for Reliable {
    type Conn = ConnResult;
    type Figures = Deliveries;

    fn mode(&self) -> &'static str {
        "reliable"
    }

    fn verb(&self) -> &'static str {
        "publishing"
    }

    fn connections(&self) -> usize {
        self.rooms * self.per_room
    }

    fn setup(&self) -> String {
        self.setup.clone()
    }

    async fn connection(self: Arc<Self>, h: Arc<Harness>, index: usize) -> ConnResult {
        client(&self, &h, index).await
    }

    fn figures(
        &self,
        run: &RunFacts,
        made: &[&ConnResult],
        warnings: &mut Vec<String>,
    ) -> Deliveries {
        // Every measured publish times the other members of its room, counted as sent.
        Deliveries::of(run, made, run.expected, run.args.payload_bytes, warnings)
    }

    fn rows(figures: &Deliveries, row: &mut dyn FnMut(&str, String)) {
        figures.rows(row);
    }
}

/// Connects, says hello and joins the room; returns the socket once the join is acked, and
/// the last seq the server numbered until then (join announcements).
async fn connect(scenario: &Reliable, h: &Harness, room: usize) -> Result<(Ws, u64), String> {
    let _slot = h.slot().await?;
    let started = Instant::now();
    let attempt = async {
        let tcp = TcpStream::connect(scenario.addr)
            .await
            .map_err(|e| h.describe_io(&e))?;
        // Small frames must leave at once.
        let _ = tcp.set_nodelay(true);
        let url = format!("ws://{}{}", scenario.addr, scenario.path);
        // A 4 KiB read buffer, as the HunterPie client's: tungstenite zero-fills the free
        // part of its read buffer on every read, which at the default 128 KiB made the
        // load generator the bottleneck.
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0);
        let (mut ws, _) = tokio_tungstenite::client_async_with_config(url, tcp, Some(config))
            .await
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(answer) => {
                    format!("handshake refused: HTTP {}", answer.status())
                }
                e => format!("handshake: {e}"),
            })?;
        let join = format!(r#"{{"t":"msg","seq":1,"op":"join","room":"bench-{room}"}}"#);
        for text in [r#"{"t":"hello"}"#.to_owned(), join] {
            ws.send(Message::text(text))
                .await
                .map_err(|e| format!("send during join: {e}"))?;
        }
        let mut in_seq = 0;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t.as_str() == r#"{"t":"ack","seq":1}"# => {
                    return Ok((ws, in_seq));
                }
                Some(Ok(Message::Text(t))) if t.as_bytes().starts_with(PREFIX) => {
                    let rest = &t.as_bytes()[PREFIX.len()..];
                    let digits = rest.iter().take_while(|c| c.is_ascii_digit()).count();
                    in_seq = digits_before(rest, digits).map_or(in_seq, |(v, _)| v);
                }
                Some(Ok(Message::Text(t))) if t.as_str().contains(r#""t":"error""#) => {
                    return Err(format!("refused: {}", t.as_str()));
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(format!("read error before the join ack: {e}")),
                None => return Err("closed before the join ack".into()),
            }
        }
    };
    let ws = timeout(Duration::from_secs_f64(h.args.connect_timeout_s), attempt)
        .await
        .map_err(|_| "timed out (connect, upgrade, hello or join)".to_owned())??;
    h.record_join(started);
    Ok(ws)
}

/// A member's tallies and checks.
struct Member<'a> {
    h: &'a Harness,
    /// `,"room":"bench-<room>","from":` — every publish relayed to this member has it.
    room_key: Vec<u8>,
    /// The server's numbering: the last seq received in order, and acks owed.
    in_seq: u64,
    owed: u64,
    /// Next expected publish number per sender.
    next: HashMap<u64, u64>,
    latencies: Latencies<'a>,
    result: ConnResult,
}

impl Member<'_> {
    /// Accounts for one frame; `Err` when the server closed the connection.
    fn on_message(&mut self, message: Message, plan: Option<&Plan>) -> Result<(), String> {
        let text = match &message {
            Message::Text(t) => t.as_str(),
            Message::Close(frame) => {
                return Err(match frame {
                    Some(f) => format!("closed by server: {} {}", f.code, f.reason),
                    None => "closed by server".into(),
                });
            }
            _ => return Ok(()),
        };
        let b = text.as_bytes();
        let Some(rest) = b.strip_prefix(PREFIX) else {
            if text.contains(r#""t":"error""#) {
                self.result.server_msgs += 1;
                if self.result.first_server_msg.is_none() {
                    self.result.first_server_msg = Some(text.chars().take(200).collect());
                }
            }
            // Acks and heartbeats.
            return Ok(());
        };
        let digits = rest.iter().take_while(|c| c.is_ascii_digit()).count();
        let seq = digits_before(rest, digits).map_or(0, |(v, _)| v);
        if seq <= self.in_seq {
            // A resend of something already received: the protocol drops it.
            self.owed += 1;
            return Ok(());
        }
        if seq != self.in_seq + 1 {
            self.result.gaps += 1;
        }
        self.in_seq = seq;
        self.owed += 1;
        let after = &rest[digits..];
        if after.starts_with(br#","op":"#) {
            // Join and leave announcements.
            self.result.session_states += 1;
            return Ok(());
        }
        if !after.starts_with(&self.room_key) {
            self.result.misrouted += 1;
            return Ok(());
        }
        // `...,"s":<sender>,"ts":<µs>,"seq":<k>}}`
        let Some((ts, k, tail)) = b.len().checked_sub(1).and_then(|e| parse_tail(&b[..e])) else {
            self.result.corrupted += 1;
            return Ok(());
        };
        let Some((sender, _)) = digits_before(b, tail) else {
            self.result.corrupted += 1;
            return Ok(());
        };
        self.result.received_total += 1;
        let next = self.next.entry(sender).or_insert(0);
        if k == *next {
            *next += 1;
        } else if k > *next {
            self.result.gaps += k - *next;
            *next = k + 1;
        } else {
            self.result.out_of_order += 1;
        }
        if let Some(plan) = plan
            && plan.measures(ts)
        {
            self.result.received_in_window += 1;
            self.h.delivered.fetch_add(1, Ordering::Relaxed);
            self.latencies.record(self.h.now_us().saturating_sub(ts));
        }
        Ok(())
    }
}

/// One client, from connecting to the end of the run.
async fn client(scenario: &Reliable, h: &Harness, index: usize) -> ConnResult {
    let args = &h.args;
    let per_room = scenario.per_room;
    let room = index / per_room;
    let mut m = Member {
        h,
        room_key: format!(r#","room":"bench-{room}","from":"#).into_bytes(),
        in_seq: 0,
        owed: 0,
        next: HashMap::new(),
        latencies: h.latencies(index),
        result: ConnResult {
            session: room,
            leader: true,
            ..ConnResult::default()
        },
    };
    let mut ws = match connect(scenario, h, room).await {
        Ok((ws, in_seq)) => {
            m.in_seq = in_seq;
            m.owed = 1;
            scenario.joined[room].fetch_add(1, Ordering::Relaxed);
            h.ready(true);
            ws
        }
        Err(e) => {
            h.ready(false);
            m.result.connect_error = Some(e);
            return m.result;
        }
    };
    let mut stop = pin!(h.stopped());
    let mut plan_wait = pin!(h.plan());
    let mut plan: Option<Arc<Plan>> = None;
    let mut publisher = None;
    let mut acker = tokio::time::interval(ACK_EVERY);
    acker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let pad = "x".repeat(args.payload_bytes.saturating_sub(120));
    let (mut out_seq, mut k) = (1u64, 0u64);
    let mut last_sent = Instant::now();
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            p = &mut plan_wait, if plan.is_none() => {
                let Some(p) = p else { break };
                publisher = Some(h.pacer(&p, index as f64 / scenario.connections() as f64));
                plan = Some(p);
            }
            _ = tick(&mut publisher), if publisher.is_some() => {
                let Some(plan) = &plan else { continue };
                let ts = h.now_us();
                if ts >= plan.window_end_us {
                    publisher = None;
                    continue;
                }
                if ts >= plan.window_start_us {
                    m.result.pushes_in_window += 1;
                    let others = scenario.joined[room].load(Ordering::Relaxed).saturating_sub(1);
                    h.expected.fetch_add(others, Ordering::Relaxed);
                }
                m.result.pushes_total += 1;
                out_seq += 1;
                let mut text = String::with_capacity(pad.len() + 160);
                // Writing into a String cannot fail.
                let _ = write!(
                    text,
                    r#"{{"t":"msg","seq":{out_seq},"op":"publish","room":"bench-{room}","data":{{"pad":"{pad}","s":{index},"ts":{ts},"seq":{k}}}}}"#
                );
                k += 1;
                if let Err(e) = ws.send(Message::text(text)).await {
                    m.result.closed = Some(format!("send failed: {e}"));
                    break;
                }
            }
            _ = acker.tick() => {
                // A heartbeat when nothing else was sent for a while (before the plan).
                let idle = last_sent.elapsed() >= Duration::from_secs(5);
                if m.owed > 0 || idle {
                    m.owed = 0;
                    last_sent = Instant::now();
                    let ack = format!(r#"{{"t":"ack","seq":{}}}"#, m.in_seq);
                    if let Err(e) = ws.send(Message::text(ack)).await {
                        m.result.closed = Some(format!("send failed: {e}"));
                        break;
                    }
                }
            }
            message = ws.next() => match message {
                Some(Ok(message)) => {
                    if let Err(reason) = m.on_message(message, plan.as_deref()) {
                        m.result.closed = Some(reason);
                        break;
                    }
                    if m.owed >= ACK_AFTER {
                        m.owed = 0;
                        let ack = format!(r#"{{"t":"ack","seq":{}}}"#, m.in_seq);
                        if let Err(e) = ws.send(Message::text(ack)).await {
                            m.result.closed = Some(format!("send failed: {e}"));
                            break;
                        }
                    }
                }
                Some(Err(e)) => {
                    m.result.closed = Some(format!("read error: {e}"));
                    break;
                }
                None => {
                    m.result.closed = Some("connection ended without a close frame".into());
                    break;
                }
            }
        }
    }
    if m.result.closed.is_none() {
        // A polite close; the run is over either way.
        let _ = timeout(Duration::from_secs(2), ws.close(None)).await;
    }
    let Member { result, .. } = m;
    result
}
