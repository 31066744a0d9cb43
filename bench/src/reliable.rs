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
//! times the other members of its room. The report is the WebSocket mode's
//! ([`super::Report`]), with mode `reliable`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::{MissedTickBehavior, interval_at, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::{
    Args, BATCH, ConnResult, Event, MAX_LATENCY_US, MissedTicks, Plan, Report, ReportInput, SHARDS,
    Window, clock_ticks_per_second, describe_io, digits_before, ensure_fd_limit, micros_since,
    parse_tail, read_status_kib, resolve, tick,
};

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

/// Cumulative acks go out at least this often while messages are owed (as the TypeScript client)...
const ACK_EVERY: Duration = Duration::from_millis(100);
/// ...or at once after this many.
const ACK_AFTER: u64 = 64;
const PREFIX: &[u8] = br#"{"t":"msg","seq":"#;

struct Shared {
    addr: std::net::SocketAddr,
    path: String,
    args: Args,
    epoch: Instant,
    connect_slots: Semaphore,
    events_tx: mpsc::UnboundedSender<Event>,
    plan_rx: watch::Receiver<Option<Arc<Plan>>>,
    stop_rx: watch::Receiver<bool>,
    /// Latency histograms (µs), sharded as in the WebSocket mode.
    latency: Vec<Mutex<Histogram<u64>>>,
    join_time: Mutex<Histogram<u64>>,
    emfile_reported: AtomicBool,
    /// Members joined per room (complete before the plan is published).
    joined: Vec<AtomicU64>,
    expected: AtomicU64,
    delivered: AtomicU64,
}

pub(crate) async fn run(args: Args, threads: usize) -> anyhow::Result<Report> {
    let (addr, path) = resolve(args.url()).await?;
    let per_room = args.followers + 1;
    let total = args.sessions * per_room;
    let fd_note = ensure_fd_limit(total as u64 + 64);
    if let Some(note) = &fd_note {
        eprintln!("warning: {note}");
    }
    let server_pid = args.server_pid.map(|p| p.to_string());
    let clk_tck = clock_ticks_per_second();
    let server_rss_before = server_pid
        .as_deref()
        .and_then(|p| read_status_kib(p, "VmRSS:"));
    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    let (plan_tx, plan_rx) = watch::channel(None);
    let (stop_tx, stop_rx) = watch::channel(false);
    let histogram =
        || Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds");
    let shared = Arc::new(Shared {
        addr,
        path,
        args: args.clone(),
        epoch: Instant::now(),
        connect_slots: Semaphore::new(args.connect_concurrency.max(1)),
        events_tx,
        plan_rx,
        stop_rx,
        latency: (0..SHARDS).map(|_| Mutex::new(histogram())).collect(),
        join_time: Mutex::new(histogram()),
        emfile_reported: AtomicBool::new(false),
        joined: (0..args.sessions).map(|_| AtomicU64::new(0)).collect(),
        expected: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
    });

    let connect_started = Instant::now();
    let tasks: Vec<_> = (0..total)
        .map(|i| tokio::spawn(client(shared.clone(), i)))
        .collect();
    let (mut joined, mut failed) = (0usize, 0usize);
    while joined + failed < total {
        match events_rx.recv().await {
            Some(Event::Joined) => joined += 1,
            Some(Event::Failed) => failed += 1,
            None => break,
        }
    }
    let connect_secs = connect_started.elapsed().as_secs_f64();
    eprintln!("{joined} of {total} clients joined in {connect_secs:.2} s ({failed} failed)");

    let mut window = Window::default();
    let mut drain_secs = 0.0;
    if joined > 0 {
        drain_secs = super::measure(
            &args,
            shared.epoch,
            &plan_tx,
            server_pid.as_deref(),
            &mut window,
            (&shared.expected, &shared.delivered),
            "publishing",
        )
        .await;
    }
    stop_tx.send_replace(true);
    let mut results = Vec::with_capacity(total);
    for task in tasks {
        match task.await {
            Ok(r) => results.push(r),
            Err(e) => eprintln!("a client task failed: {e}"),
        }
    }
    let latency = super::merged(&shared.latency, histogram());
    let join_time = shared
        .join_time
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let expected = shared.expected.load(Ordering::Relaxed);
    Ok(Report::build(ReportInput {
        args: &args,
        threads,
        total,
        connect_secs,
        drain_secs,
        results: &results,
        latency: &latency,
        join_time: &join_time,
        window: &window,
        clk_tck,
        server_rss_before,
        server_rss_joined: None,
        server_pid: server_pid.as_deref(),
        fd_note,
        mode: Some("reliable"),
        expected: Some(expected),
    }))
}

/// Connects, says hello and joins the room; returns the socket once the join is acked, and
/// the last seq the server numbered until then (join announcements).
async fn connect(shared: &Shared, room: usize) -> Result<(Ws, u64), String> {
    let _slot = shared
        .connect_slots
        .acquire()
        .await
        .map_err(|_| "cancelled".to_owned())?;
    let started = Instant::now();
    let attempt = async {
        let tcp = TcpStream::connect(shared.addr)
            .await
            .map_err(|e| describe_io(&e, &shared.emfile_reported))?;
        // Small frames must leave at once.
        let _ = tcp.set_nodelay(true);
        let url = format!("ws://{}{}", shared.addr, shared.path);
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
    let ws = timeout(
        Duration::from_secs_f64(shared.args.connect_timeout_s),
        attempt,
    )
    .await
    .map_err(|_| "timed out (connect, upgrade, hello or join)".to_owned())??;
    shared
        .join_time
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .saturating_record((started.elapsed().as_micros() as u64).max(1));
    Ok(ws)
}

/// A member's tallies and checks.
struct Member<'a> {
    shared: &'a Shared,
    index: usize,
    /// `,"room":"bench-<room>","from":` — every publish relayed to this member has it.
    room_key: Vec<u8>,
    /// The server's numbering: the last seq received in order, and acks owed.
    in_seq: u64,
    owed: u64,
    /// Next expected publish number per sender.
    next: HashMap<u64, u64>,
    batch: Vec<u32>,
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
            && ts >= plan.window_start_us
            && ts < plan.window_end_us
        {
            self.result.received_in_window += 1;
            self.shared.delivered.fetch_add(1, Ordering::Relaxed);
            let now = micros_since(self.shared.epoch, Instant::now());
            self.batch
                .push(now.saturating_sub(ts).clamp(1, u32::MAX as u64) as u32);
            if self.batch.len() >= BATCH {
                self.flush_latencies();
            }
        }
        Ok(())
    }

    fn flush_latencies(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let shard = &self.shared.latency[self.index % SHARDS];
        let mut h = shard.lock().unwrap_or_else(|e| e.into_inner());
        for &l in &self.batch {
            h.saturating_record(u64::from(l));
        }
        drop(h);
        self.batch.clear();
    }
}

/// One client, from connecting to the end of the run.
async fn client(shared: Arc<Shared>, index: usize) -> ConnResult {
    let args = &shared.args;
    let per_room = args.followers + 1;
    let room = index / per_room;
    let mut m = Member {
        shared: &shared,
        index,
        room_key: format!(r#","room":"bench-{room}","from":"#).into_bytes(),
        in_seq: 0,
        owed: 0,
        next: HashMap::new(),
        batch: Vec::with_capacity(BATCH),
        result: ConnResult {
            session: room,
            leader: true,
            ..ConnResult::default()
        },
    };
    let mut ws = match connect(&shared, room).await {
        Ok((ws, in_seq)) => {
            m.in_seq = in_seq;
            m.owed = 1;
            shared.joined[room].fetch_add(1, Ordering::Relaxed);
            // The main task holds the receiver until every client has reported.
            let _ = shared.events_tx.send(Event::Joined);
            ws
        }
        Err(e) => {
            let _ = shared.events_tx.send(Event::Failed);
            m.result.connect_error = Some(e);
            return m.result;
        }
    };
    let mut plan_rx = shared.plan_rx.clone();
    let mut stop_rx = shared.stop_rx.clone();
    let mut stop = pin!(async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    });
    let mut plan_wait = pin!(async move {
        plan_rx
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|p| (*p).clone())
    });
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
                let period = Duration::from_secs_f64(args.interval_ms() / 1000.0);
                let offset = period.mul_f64(index as f64 / (args.sessions * per_room) as f64);
                let mut i = interval_at(p.start + offset, period);
                i.set_missed_tick_behavior(match args.missed_ticks {
                    MissedTicks::Delay => MissedTickBehavior::Delay,
                    MissedTicks::Burst => MissedTickBehavior::Burst,
                });
                publisher = Some(i);
                plan = Some(p);
            }
            _ = tick(&mut publisher), if publisher.is_some() => {
                let Some(plan) = &plan else { continue };
                let ts = micros_since(shared.epoch, Instant::now());
                if ts >= plan.window_end_us {
                    publisher = None;
                    continue;
                }
                if ts >= plan.window_start_us {
                    m.result.pushes_in_window += 1;
                    let others = shared.joined[room].load(Ordering::Relaxed).saturating_sub(1);
                    shared.expected.fetch_add(others, Ordering::Relaxed);
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
    m.flush_latencies();
    if m.result.closed.is_none() {
        // A polite close; the run is over either way.
        let _ = timeout(Duration::from_secs(2), ws.close(None)).await;
    }
    m.result
}
