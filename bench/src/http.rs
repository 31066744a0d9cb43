//! `--http-channels`: load on the HTTP channel API (protocol/channels.md).
//!
//! `--sessions` channels of `--followers + 1` clients. Every client is one task with its own
//! persistent HTTP/1.1 keep-alive connection (a minimal client written here over a tokio
//! `TcpStream`: one request in flight, `Content-Length` bodies only) and posts its state,
//! a ~200-byte JSON object (client_id, position, rotation quaternion, timestamp), to
//! `POST /api/channels/bench-<channel>` every `--interval-ms`, with `Client-Id` and
//! `Client-Time` headers. Clients start spread evenly over one interval.
//!
//! Per request: the latency from the tick (before writing, or before reconnecting when the
//! connection was lost) to the last byte of the answer, the status, and for a `200` that the
//! body is a JSON array of the other clients of the same channel, never the client itself.
//! An answer with `Connection: close`, an end of stream, an I/O error or a timeout drops the
//! connection; the next request reconnects. Only requests sent inside the measurement window
//! (after the warm-up) count; clients stop sending with the window and the requests still in
//! flight are awaited for at most `--drain-s`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::ops::Range;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::{Interval, MissedTickBehavior, interval_at, sleep_until, timeout};

use super::{
    Args, BATCH, Event, MAX_LATENCY_US, MissedTicks, Plan, SHARDS, Window, clock_ticks_per_second,
    describe_io, ensure_fd_limit, mib, micros_since, quantile_ms, read_status_kib, round2,
    split_authority, tick,
};

/// Largest answer head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Largest answer body accepted.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// What every client task shares.
struct Shared {
    addr: SocketAddr,
    /// The `Host` header.
    host: String,
    /// Prepended to `/api/channels/...` (empty, or a reverse proxy's prefix).
    prefix: String,
    args: Args,
    period: Duration,
    /// For connecting and for each request's full answer (`--connect-timeout-s`).
    request_timeout: Duration,
    /// The clock of every latency and of `Client-Time`.
    epoch: Instant,
    /// Wall clock at `epoch`, in seconds since 1970: `Client-Time` and the bodies'
    /// `timestamp` are `unix_at_epoch + elapsed`, so a second run against the same server
    /// within a minute is not answered 204 (the server remembers each `Client-Id`'s last
    /// time for 60 s).
    unix_at_epoch: f64,
    connect_slots: Semaphore,
    events_tx: mpsc::UnboundedSender<Event>,
    plan_rx: watch::Receiver<Option<Arc<Plan>>>,
    stop_rx: watch::Receiver<bool>,
    /// Request latency (µs), sharded as in the WebSocket mode; merged at the end.
    latency: Vec<Mutex<Histogram<u64>>>,
    /// Age of every peer state in a measured 200 answer (µs): now - its `timestamp`.
    age: Vec<Mutex<Histogram<u64>>>,
    emfile_reported: AtomicBool,
    /// Measured requests sent, and those finished (answered or failed), to end the drain early.
    sent_in_window: AtomicU64,
    done_in_window: AtomicU64,
}

/// One client's account, returned when its task ends.
#[derive(Debug, Default)]
struct ClientResult {
    /// Why its first connection failed (it then sent nothing).
    connect_error: Option<String>,
    sent_total: u64,
    sent_in_window: u64,
    answered_total: u64,
    /// Measured answers by status: 200, 204, 4xx, 5xx, anything else.
    status_200: u64,
    status_204: u64,
    status_4xx: u64,
    status_5xx: u64,
    status_other: u64,
    /// Measured requests without an answer (I/O error, end of stream, timeout, bad answer).
    errors_in_window: u64,
    errors_total: u64,
    /// Every failed request (measured or not), by kind.
    error_kinds: BTreeMap<String, u64>,
    /// Requests that opened a new connection: the previous one was lost or closed.
    reconnects: u64,
    /// Answers carrying `Connection: close` (or HTTP/1.0 without keep-alive).
    server_closes: u64,
    /// 200 answers holding the client's own state (any time).
    self_in_answer: u64,
    /// 200 answers holding a client of another channel (any time).
    misrouted: u64,
    /// 200 answers that are not a JSON array of objects with a string `client_id` (any time).
    bad_answers: u64,
    missing_server_time: u64,
    server_time_backwards: u64,
    /// Measured 200 answers with fewer peers than the channel has other clients.
    incomplete_answers: u64,
    /// Peer states in measured 200 answers.
    peers_seen: u64,
    /// The first answer that was not 200 or 204, or not a valid 200 (status and start).
    first_unexpected: Option<String>,
}

/// A peer's state in an answer: only what is checked.
#[derive(Deserialize)]
struct PeerState<'a> {
    #[serde(borrow)]
    client_id: Cow<'a, str>,
    #[serde(default)]
    timestamp: Option<f64>,
}

/// The parsed head of an answer.
#[derive(Debug, PartialEq)]
struct Head {
    status: u16,
    content_length: Option<usize>,
    /// The server closes the connection after this answer.
    close: bool,
    chunked: bool,
    server_time: Option<f64>,
}

/// A complete answer; its body is `buf[body]`.
#[derive(Debug)]
struct Answer {
    head: Head,
    body: Range<usize>,
}

/// `http://host[:port][/prefix]` (or `host[:port]`) into (`host:port`, prefix without a
/// trailing slash).
fn parse_http_url(url: &str) -> anyhow::Result<(String, String)> {
    let rest = if let Some(r) = url.strip_prefix("http://") {
        r
    } else if url.starts_with("https://") {
        bail!("https:// is not supported; use http://host:port");
    } else if url.contains("://") {
        bail!("--http-channels needs an http:// URL (http://host:port), not {url:?}");
    } else {
        url
    };
    let (authority, path) = split_authority(url, rest, "")?;
    Ok((authority, path.trim_end_matches('/').to_owned()))
}

pub(crate) async fn run(args: Args, threads: usize) -> anyhow::Result<HttpReport> {
    let (authority, prefix) = parse_http_url(args.url())?;
    let addr = tokio::net::lookup_host(&authority)
        .await
        .with_context(|| format!("cannot resolve {authority}"))?
        .next()
        .with_context(|| format!("{authority} resolves to no address"))?;
    let per_channel = args.followers + 1;
    let total = args.sessions * per_channel;
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
    let unix_at_epoch = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let shared = Arc::new(Shared {
        addr,
        host: authority,
        prefix,
        args: args.clone(),
        period: Duration::from_secs_f64(args.interval_ms() / 1000.0),
        request_timeout: Duration::from_secs_f64(args.connect_timeout_s),
        epoch: Instant::now(),
        unix_at_epoch,
        connect_slots: Semaphore::new(args.connect_concurrency.max(1)),
        events_tx,
        plan_rx,
        stop_rx,
        latency: (0..SHARDS).map(|_| Mutex::new(histogram())).collect(),
        age: (0..SHARDS).map(|_| Mutex::new(histogram())).collect(),
        emfile_reported: AtomicBool::new(false),
        sent_in_window: AtomicU64::new(0),
        done_in_window: AtomicU64::new(0),
    });

    // Every client opens its connection, `connect_concurrency` at a time.
    let connect_started = Instant::now();
    let tasks: Vec<_> = (0..total)
        .map(|index| tokio::spawn(client(shared.clone(), index)))
        .collect();
    let (mut connected, mut failed) = (0usize, 0usize);
    let mut progress = tokio::time::interval(Duration::from_secs(1));
    progress.tick().await;
    while connected + failed < total {
        tokio::select! {
            event = events_rx.recv() => match event {
                Some(Event::Joined) => connected += 1,
                Some(Event::Failed) => failed += 1,
                None => break,
            },
            _ = progress.tick() => {
                eprintln!("connecting: {connected} connected, {failed} failed of {total}");
            }
        }
    }
    let connect_secs = connect_started.elapsed().as_secs_f64();
    eprintln!("{connected} of {total} clients connected in {connect_secs:.2} s ({failed} failed)");

    let mut window = Window::default();
    let mut drain_secs = 0.0;
    if connected == 0 {
        eprintln!("no client connected: nothing to measure");
    } else {
        let now = tokio::time::Instant::now();
        let start = now + Duration::from_millis(100);
        let window_start = start + Duration::from_secs_f64(args.warmup_s);
        let window_end = window_start + Duration::from_secs_f64(args.duration_s);
        let micros = |t: tokio::time::Instant| micros_since(shared.epoch, t.into_std());
        plan_tx.send_replace(Some(Arc::new(Plan {
            start,
            window_start_us: micros(window_start),
            window_end_us: micros(window_end),
        })));
        eprintln!(
            "posting: {} s warm-up, {} s measured, {} s drain",
            args.warmup_s, args.duration_s, args.drain_s
        );
        sleep_until(window_start).await;
        window.begin(server_pid.as_deref());
        sleep_until(window_end).await;
        window.end(server_pid.as_deref());
        // Wait for the measured requests still in flight: until all finished, at most --drain-s.
        let drain_end = window_end + Duration::from_secs_f64(args.drain_s);
        let mut poll = interval_at(
            window_end + Duration::from_millis(20),
            Duration::from_millis(20),
        );
        loop {
            let at = poll.tick().await;
            let sent = shared.sent_in_window.load(Ordering::Relaxed);
            if shared.done_in_window.load(Ordering::Relaxed) >= sent || at >= drain_end {
                break;
            }
        }
        drain_secs = window_end.elapsed().as_secs_f64();
    }
    stop_tx.send_replace(true);

    let mut results = Vec::with_capacity(total);
    for task in tasks {
        match task.await {
            Ok(r) => results.push(r),
            Err(e) => eprintln!("a client task failed: {e}"),
        }
    }
    let merge = |shards: &[Mutex<Histogram<u64>>]| {
        let mut all = histogram();
        for shard in shards {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            all.add(&*shard).expect("same bounds");
        }
        all
    };
    Ok(HttpReport::build(ReportInput {
        args: &args,
        threads,
        total,
        connect_secs,
        drain_secs,
        results: &results,
        latency: &merge(&shared.latency),
        age: &merge(&shared.age),
        window: &window,
        clk_tck,
        server_rss_before,
        server_pid: server_pid.as_deref(),
        fd_note,
        body_bytes: {
            let mut body = String::new();
            state_body(&mut body, "bench-0-0", 1234, 0.0, unix_at_epoch + 100.0);
            body.len()
        },
    }))
}

/// A client's latencies and peer ages waiting to be recorded (one lock per `BATCH`).
struct Batches<'a> {
    shared: &'a Shared,
    shard: usize,
    latency: Vec<u32>,
    age: Vec<u32>,
}

impl Batches<'_> {
    fn latency(&mut self, micros: u64) {
        push_batch(&mut self.latency, micros, &self.shared.latency[self.shard]);
    }

    fn age(&mut self, micros: u64) {
        push_batch(&mut self.age, micros, &self.shared.age[self.shard]);
    }

    fn flush(&mut self) {
        flush_batch(&mut self.latency, &self.shared.latency[self.shard]);
        flush_batch(&mut self.age, &self.shared.age[self.shard]);
    }
}

fn push_batch(batch: &mut Vec<u32>, micros: u64, shard: &Mutex<Histogram<u64>>) {
    if batch.capacity() == 0 {
        batch.reserve_exact(BATCH);
    }
    batch.push(micros.clamp(1, u64::from(u32::MAX)) as u32);
    if batch.len() >= BATCH {
        flush_batch(batch, shard);
    }
}

fn flush_batch(batch: &mut Vec<u32>, shard: &Mutex<Histogram<u64>>) {
    if batch.is_empty() {
        return;
    }
    let mut histogram = shard.lock().unwrap_or_else(|e| e.into_inner());
    for &v in batch.iter() {
        histogram.saturating_record(u64::from(v));
    }
    drop(histogram);
    batch.clear();
}

/// Opens one connection (within the request timeout), `TCP_NODELAY` as a game client would.
async fn connect(shared: &Shared) -> Result<TcpStream, String> {
    let tcp = match timeout(shared.request_timeout, TcpStream::connect(shared.addr)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            return Err(format!(
                "connect: {}",
                describe_io(&e, &shared.emfile_reported)
            ));
        }
        Err(_) => return Err("connect: timed out".into()),
    };
    // Small requests must leave at once; Nagle would hold them behind the previous answer's ACK.
    tcp.set_nodelay(true)
        .map_err(|e| format!("set_nodelay: {}", describe_io(&e, &shared.emfile_reported)))?;
    Ok(tcp)
}

/// One client, from connecting to the end of the run.
async fn client(shared: Arc<Shared>, index: usize) -> ClientResult {
    let args = &shared.args;
    let per_channel = args.followers + 1;
    let channel = index / per_channel;
    let id = format!("bench-{channel}-{}", index % per_channel);
    let channel_prefix = format!("bench-{channel}-");
    let path = format!("{}/api/channels/bench-{channel}", shared.prefix);
    let mut result = ClientResult::default();

    let first = {
        let _slot = shared.connect_slots.acquire().await;
        connect(&shared).await
    };
    let mut conn = match first {
        Ok(tcp) => {
            // The main task holds the receiver until every client has reported.
            let _ = shared.events_tx.send(Event::Joined);
            Some(tcp)
        }
        Err(e) => {
            // As above.
            let _ = shared.events_tx.send(Event::Failed);
            result.connect_error = Some(e);
            return result;
        }
    };

    let mut plan_rx = shared.plan_rx.clone();
    let mut stop_rx = shared.stop_rx.clone();
    let mut stop = pin!(async move {
        // Stop on the signal, or if the sender is gone (the run is over either way).
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
    let mut ticker: Option<Interval> = None;
    let mut batches = Batches {
        shared: &shared,
        shard: index % SHARDS,
        latency: Vec::new(),
        age: Vec::new(),
    };
    let mut body = String::with_capacity(256);
    let mut request = String::with_capacity(512);
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut seq: u64 = 0;
    let mut last_server_time = f64::NEG_INFINITY;
    // Where this client walks (radians), so clients do not all post the same numbers.
    let phase = (index % 628) as f64 / 100.0;

    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            p = &mut plan_wait, if plan.is_none() => {
                let Some(p) = p else { break };
                // Clients start spread evenly over one interval, not all at once.
                let clients = args.sessions * per_channel;
                let offset = shared.period.mul_f64(index as f64 / clients as f64);
                let mut i = interval_at(p.start + offset, shared.period);
                i.set_missed_tick_behavior(match args.missed_ticks {
                    MissedTicks::Delay => MissedTickBehavior::Delay,
                    MissedTicks::Burst => MissedTickBehavior::Burst,
                });
                ticker = Some(i);
                plan = Some(p);
            }
            _ = tick(&mut ticker), if ticker.is_some() => {
                let Some(plan) = &plan else { continue };
                let started = Instant::now();
                let ts = micros_since(shared.epoch, started);
                if ts >= plan.window_end_us {
                    // Posting stops with the window, so the drain sees the backlog clear.
                    ticker = None;
                    continue;
                }
                let in_window = ts >= plan.window_start_us;
                if in_window {
                    result.sent_in_window += 1;
                    shared.sent_in_window.fetch_add(1, Ordering::Relaxed);
                }
                result.sent_total += 1;
                let time_s = shared.unix_at_epoch + ts as f64 / 1e6;
                state_body(&mut body, &id, seq, phase, time_s);
                seq += 1;
                request.clear();
                // Writing into a String cannot fail.
                let _ = write!(
                    request,
                    "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
                     Client-Id: {id}\r\nClient-Time: {time_s:.6}\r\nContent-Length: {}\r\n\r\n{body}",
                    shared.host,
                    body.len()
                );
                let reconnect = conn.is_none();
                let attempt = async {
                    let mut tcp = match conn.take() {
                        Some(tcp) => tcp,
                        None => connect(&shared).await?,
                    };
                    let answer = exchange(&mut tcp, request.as_bytes(), &mut buf).await;
                    // Kept for the next request unless this one failed or was the last.
                    if answer.as_ref().is_ok_and(|a| !a.head.close) {
                        conn = Some(tcp);
                    }
                    answer
                };
                let outcome = tokio::select! {
                    biased;
                    // Still in flight at the end of the drain: neither answered nor failed.
                    _ = &mut stop => break,
                    r = timeout(shared.request_timeout, attempt) => r,
                };
                result.reconnects += u64::from(reconnect);
                let outcome = outcome.unwrap_or_else(|_| Err("timed out".into()));
                let micros = micros_since(started, Instant::now());
                match outcome {
                    Ok(answer) => {
                        result.answered_total += 1;
                        result.server_closes += u64::from(answer.head.close);
                        let peers = check_answer(
                            &answer,
                            &buf,
                            &id,
                            &channel_prefix,
                            &mut last_server_time,
                            &mut result,
                        );
                        if in_window {
                            batches.latency(micros);
                            match answer.head.status {
                                200 => {
                                    result.status_200 += 1;
                                    if let Some((peers, times)) = &peers {
                                        result.peers_seen += *peers as u64;
                                        if *peers < args.followers {
                                            result.incomplete_answers += 1;
                                        }
                                        let now_s = time_s + micros as f64 / 1e6;
                                        for &t in times {
                                            batches.age(((now_s - t).max(0.0) * 1e6) as u64);
                                        }
                                    }
                                }
                                204 => result.status_204 += 1,
                                400..=499 => result.status_4xx += 1,
                                500..=599 => result.status_5xx += 1,
                                _ => result.status_other += 1,
                            }
                        }
                    }
                    Err(kind) => {
                        result.errors_total += 1;
                        if in_window {
                            result.errors_in_window += 1;
                        }
                        *result.error_kinds.entry(kind).or_insert(0) += 1;
                    }
                }
                if in_window {
                    shared.done_in_window.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    batches.flush();
    result
}

/// Checks an answer: for a 200, `Server-Time` and the body; records what is wrong in
/// `result`. For a valid 200 answer, returns how many peer states it holds and their
/// `timestamp`s.
fn check_answer(
    answer: &Answer,
    buf: &[u8],
    own_id: &str,
    channel_prefix: &str,
    last_server_time: &mut f64,
    result: &mut ClientResult,
) -> Option<(usize, Vec<f64>)> {
    let body = &buf[answer.body.clone()];
    let unexpected = |result: &mut ClientResult, why: &str| {
        if result.first_unexpected.is_none() {
            let start: String = String::from_utf8_lossy(body).chars().take(200).collect();
            result.first_unexpected = Some(format!("{} {why}: {start}", answer.head.status));
        }
    };
    match answer.head.status {
        200 => {}
        204 => return None,
        _ => {
            unexpected(result, "answer");
            return None;
        }
    }
    match answer.head.server_time {
        Some(t) if t < *last_server_time => result.server_time_backwards += 1,
        Some(t) => *last_server_time = t,
        None => result.missing_server_time += 1,
    }
    let Ok(peers) = serde_json::from_slice::<Vec<PeerState>>(body) else {
        result.bad_answers += 1;
        unexpected(result, "not a JSON array of states with a client_id");
        return None;
    };
    let mut times = Vec::with_capacity(peers.len());
    for peer in &peers {
        if peer.client_id == own_id {
            result.self_in_answer += 1;
            unexpected(result, "holds the client's own state");
        } else if !peer.client_id.starts_with(channel_prefix) {
            result.misrouted += 1;
            unexpected(result, "holds a client of another channel");
        }
        if let Some(t) = peer.timestamp {
            times.push(t);
        }
    }
    Some((peers.len(), times))
}

/// Sends one request and reads its whole answer into `buf` (cleared first). `Err` is a
/// short, countable description; the connection cannot be used after one.
async fn exchange(
    tcp: &mut TcpStream,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> Result<Answer, String> {
    buf.clear();
    tcp.write_all(request)
        .await
        .map_err(|e| format!("write: {}", io_kind(&e)))?;
    let mut searched = 0;
    let head_end = loop {
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        let n = tcp
            .read_buf(buf)
            .await
            .map_err(|e| format!("read: {}", io_kind(&e)))?;
        if n == 0 {
            return Err(if buf.is_empty() {
                "closed by the server before answering".into()
            } else {
                "closed by the server within the answer head".into()
            });
        }
        if let Some(i) = find_blank_line(&buf[searched..]) {
            break searched + i + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err("answer head over 64 KiB".into());
        }
        searched = buf.len().saturating_sub(3);
    };
    let head = parse_head(&buf[..head_end])?;
    let body_len = match head.content_length {
        Some(n) => n,
        None if head.status == 204 || head.status == 304 || head.status < 200 => 0,
        None if head.chunked => return Err("chunked answer (not supported)".into()),
        None if head.close => {
            // The body runs to the end of the stream.
            loop {
                if buf.len() - head_end > MAX_BODY {
                    return Err("answer body over 16 MiB".into());
                }
                buf.reserve(4096);
                let n = tcp
                    .read_buf(buf)
                    .await
                    .map_err(|e| format!("read: {}", io_kind(&e)))?;
                if n == 0 {
                    break;
                }
            }
            buf.len() - head_end
        }
        None => return Err("answer without Content-Length on a kept-alive connection".into()),
    };
    if body_len > MAX_BODY {
        return Err("answer body over 16 MiB".into());
    }
    let end = head_end + body_len;
    while buf.len() < end {
        buf.reserve(end - buf.len());
        let n = tcp
            .read_buf(buf)
            .await
            .map_err(|e| format!("read: {}", io_kind(&e)))?;
        if n == 0 {
            return Err("closed by the server within the answer body".into());
        }
    }
    if buf.len() > end {
        return Err("bytes after the answer (none was asked for)".into());
    }
    Ok(Answer {
        head,
        body: head_end..end,
    })
}

/// A countable name for a socket error.
fn io_kind(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(104) => "ECONNRESET: connection reset".into(),
        Some(32) => "EPIPE: broken pipe".into(),
        _ => format!("{:?}", e.kind()),
    }
}

/// Where `\r\n\r\n` starts in `b`.
fn find_blank_line(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n")
}

/// The status line and the headers this client needs, from a head ending in `\r\n\r\n`.
fn parse_head(head: &[u8]) -> Result<Head, String> {
    let text = std::str::from_utf8(head).map_err(|_| "answer head is not UTF-8".to_owned())?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|s| (100..1000).contains(s));
    let Some(status) = status.filter(|_| version.starts_with("HTTP/1.")) else {
        let line: String = status_line.chars().take(60).collect();
        return Err(format!("malformed status line {line:?}"));
    };
    let mut parsed = Head {
        status,
        content_length: None,
        // HTTP/1.0 closes unless it says keep-alive.
        close: version == "HTTP/1.0",
        chunked: false,
        server_time: None,
    };
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err("malformed header line".into());
        };
        let value = value.trim();
        let tokens = || value.split(',').map(str::trim);
        if name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse::<usize>()
                .map_err(|_| "malformed Content-Length".to_owned())?;
            if parsed.content_length.is_some_and(|m| m != n) {
                return Err("conflicting Content-Length headers".into());
            }
            parsed.content_length = Some(n);
        } else if name.eq_ignore_ascii_case("connection") {
            if tokens().any(|t| t.eq_ignore_ascii_case("close")) {
                parsed.close = true;
            } else if tokens().any(|t| t.eq_ignore_ascii_case("keep-alive")) {
                parsed.close = false;
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            parsed.chunked = tokens().any(|t| t.eq_ignore_ascii_case("chunked"));
        } else if name.eq_ignore_ascii_case("server-time") {
            parsed.server_time = value.parse::<f64>().ok().filter(|t| t.is_finite());
        }
    }
    if parsed.chunked {
        // Transfer-Encoding wins over Content-Length (RFC 9112 6.3).
        parsed.content_length = None;
    }
    Ok(parsed)
}

/// A client's state as a game client would post it (~200 bytes): where it stands, where it
/// looks (a quaternion), and its clock (`time_s`, seconds). It walks a circle, one step a post.
fn state_body(out: &mut String, id: &str, seq: u64, phase: f64, time_s: f64) {
    let angle = phase + seq as f64 * 0.05;
    let (sin, cos) = angle.sin_cos();
    let (half_sin, half_cos) = (angle / 2.0).sin_cos();
    let tilt = 0.02 * (angle * 3.0).sin();
    out.clear();
    // Writing into a String cannot fail.
    let _ = write!(
        out,
        r#"{{"client_id":"{id}","anim":"walk","position":{{"x":{:.5},"y":{:.5},"z":{:.5}}},"rotation":{{"x":{tilt:.6},"y":{half_sin:.6},"z":{:.6},"w":{half_cos:.6}}},"timestamp":{time_s:.6},"seq":{seq}}}"#,
        12.5 * cos,
        1.5 + 0.25 * (2.0 * angle).sin(),
        12.5 * sin,
        -tilt / 2.0,
    );
}

struct ReportInput<'a> {
    args: &'a Args,
    threads: usize,
    total: usize,
    connect_secs: f64,
    drain_secs: f64,
    results: &'a [ClientResult],
    latency: &'a Histogram<u64>,
    age: &'a Histogram<u64>,
    window: &'a Window,
    clk_tck: f64,
    server_rss_before: Option<u64>,
    server_pid: Option<&'a str>,
    fd_note: Option<String>,
    body_bytes: usize,
}

/// Everything an `--http-channels` run found; a table or, with `--json`, one object.
#[derive(Debug, Serialize)]
pub(crate) struct HttpReport {
    mode: &'static str,
    url: String,
    channels: usize,
    clients_per_channel: usize,
    interval_ms: f64,
    duration_s: f64,
    warmup_s: f64,
    drain_s: f64,
    drain_used_s: f64,
    body_bytes: usize,
    missed_ticks: MissedTicks,
    threads: usize,
    connections_attempted: usize,
    pub(crate) connections_made: usize,
    connections_failed: usize,
    connect_errors: BTreeMap<String, usize>,
    connect_time_s: f64,
    window_s: f64,
    /// Requests per second the clients should send (clients x 1000 / interval).
    request_rate_target: f64,
    /// Measured requests sent per second.
    request_rate: f64,
    requests_sent: u64,
    requests_answered: u64,
    /// Measured requests answered (any status) per second of the window.
    requests_per_sec: f64,
    requests_sent_total: u64,
    requests_answered_total: u64,
    status_200: u64,
    status_204: u64,
    status_4xx: u64,
    status_5xx: u64,
    status_other: u64,
    /// Measured requests that got no answer: I/O error, end of stream, timeout, bad answer.
    errors: u64,
    /// Measured requests still in flight when the drain ended.
    unanswered: u64,
    errors_total: u64,
    error_kinds: BTreeMap<String, u64>,
    reconnects: u64,
    server_closes: u64,
    self_in_answer: u64,
    misrouted: u64,
    bad_answers: u64,
    missing_server_time: u64,
    server_time_backwards: u64,
    incomplete_answers: u64,
    peers_per_answer: Option<f64>,
    first_unexpected_answer: Option<String>,
    latency_p50_ms: Option<f64>,
    latency_p90_ms: Option<f64>,
    latency_p99_ms: Option<f64>,
    latency_p999_ms: Option<f64>,
    latency_max_ms: Option<f64>,
    latency_mean_ms: Option<f64>,
    /// How old the peer states in measured 200 answers were (now - their timestamp).
    state_age_p50_ms: Option<f64>,
    state_age_p99_ms: Option<f64>,
    state_age_max_ms: Option<f64>,
    server_pid: Option<String>,
    server_rss_before_mib: Option<f64>,
    server_rss_mib: Option<f64>,
    server_rss_peak_mib: Option<f64>,
    server_cpu_pct: Option<f64>,
    bench_cpu_pct: Option<f64>,
    bench_rss_mib: Option<f64>,
    bench_rss_peak_mib: Option<f64>,
    warnings: Vec<String>,
}

impl HttpReport {
    fn build(input: ReportInput) -> HttpReport {
        let ReportInput {
            args,
            results,
            window,
            latency,
            age,
            ..
        } = input;
        let made: Vec<&ClientResult> = results
            .iter()
            .filter(|r| r.connect_error.is_none())
            .collect();
        let mut connect_errors = BTreeMap::new();
        for r in results {
            if let Some(e) = &r.connect_error {
                *connect_errors.entry(e.clone()).or_insert(0) += 1;
            }
        }
        let mut error_kinds = BTreeMap::new();
        for r in &made {
            for (kind, n) in &r.error_kinds {
                *error_kinds.entry(kind.clone()).or_insert(0) += n;
            }
        }
        let sum = |f: fn(&ClientResult) -> u64| made.iter().map(|r| f(r)).sum::<u64>();
        let status_200 = sum(|r| r.status_200);
        let answered =
            status_200 + sum(|r| r.status_204 + r.status_4xx + r.status_5xx + r.status_other);
        let sent = sum(|r| r.sent_in_window);
        let errors = sum(|r| r.errors_in_window);
        let secs = window.secs;
        let per_sec = |n: u64| {
            if secs > 0.0 {
                round2(n as f64 / secs)
            } else {
                0.0
            }
        };
        let server_cpu = window
            .cpu_pct(window.server_ticks, input.clk_tck)
            .map(round2);
        let bench_cpu = window.cpu_pct(window.self_ticks, input.clk_tck).map(round2);
        let target = round2(made.len() as f64 * 1000.0 / args.interval_ms());
        let rate = per_sec(sent);
        let unanswered = sent.saturating_sub(answered + errors);
        let peers_seen = sum(|r| r.peers_seen);
        let first_unexpected = made.iter().find_map(|r| r.first_unexpected.clone());

        let mut warnings = Vec::new();
        if let Some(note) = input.fd_note {
            warnings.push(note);
        }
        if let Some(cpu) = bench_cpu
            && cpu > 85.0 * input.threads as f64
        {
            warnings.push(format!(
                "the load generator used {cpu:.0}% CPU of {} threads: it may be the bottleneck",
                input.threads
            ));
        }
        if target > 0.0 && rate < target * 0.95 {
            warnings.push(format!(
                "clients sent {rate:.0}/s, below the target {target:.0}/s: answers slower than \
                 the interval, or the generator fell behind"
            ));
        }
        let violations = sum(|r| r.self_in_answer + r.misrouted + r.bad_answers);
        if violations > 0 {
            warnings.push(format!(
                "{violations} answers broke the protocol (own state, other channel, or not a JSON array)"
            ));
        }
        if errors + unanswered > 0 {
            warnings.push(format!(
                "{errors} measured requests failed and {unanswered} were never answered"
            ));
        }
        HttpReport {
            mode: "http-channels",
            url: args.url().to_owned(),
            channels: args.sessions,
            clients_per_channel: args.followers + 1,
            interval_ms: args.interval_ms(),
            duration_s: args.duration_s,
            warmup_s: args.warmup_s,
            drain_s: args.drain_s,
            drain_used_s: round2(input.drain_secs),
            body_bytes: input.body_bytes,
            missed_ticks: args.missed_ticks,
            threads: input.threads,
            connections_attempted: input.total,
            connections_made: made.len(),
            connections_failed: input.total - made.len(),
            connect_errors,
            connect_time_s: round2(input.connect_secs),
            window_s: round2(secs),
            request_rate_target: target,
            request_rate: rate,
            requests_sent: sent,
            requests_answered: answered,
            requests_per_sec: per_sec(answered),
            requests_sent_total: sum(|r| r.sent_total),
            requests_answered_total: sum(|r| r.answered_total),
            status_200,
            status_204: sum(|r| r.status_204),
            status_4xx: sum(|r| r.status_4xx),
            status_5xx: sum(|r| r.status_5xx),
            status_other: sum(|r| r.status_other),
            errors,
            unanswered,
            errors_total: sum(|r| r.errors_total),
            error_kinds,
            reconnects: sum(|r| r.reconnects),
            server_closes: sum(|r| r.server_closes),
            self_in_answer: sum(|r| r.self_in_answer),
            misrouted: sum(|r| r.misrouted),
            bad_answers: sum(|r| r.bad_answers),
            missing_server_time: sum(|r| r.missing_server_time),
            server_time_backwards: sum(|r| r.server_time_backwards),
            incomplete_answers: sum(|r| r.incomplete_answers),
            peers_per_answer: (status_200 > 0)
                .then(|| round2(peers_seen as f64 / status_200 as f64)),
            first_unexpected_answer: first_unexpected,
            latency_p50_ms: quantile_ms(latency, 0.5),
            latency_p90_ms: quantile_ms(latency, 0.9),
            latency_p99_ms: quantile_ms(latency, 0.99),
            latency_p999_ms: quantile_ms(latency, 0.999),
            latency_max_ms: (!latency.is_empty()).then(|| round2(latency.max() as f64 / 1000.0)),
            latency_mean_ms: (!latency.is_empty()).then(|| round2(latency.mean() / 1000.0)),
            state_age_p50_ms: quantile_ms(age, 0.5),
            state_age_p99_ms: quantile_ms(age, 0.99),
            state_age_max_ms: (!age.is_empty()).then(|| round2(age.max() as f64 / 1000.0)),
            server_pid: input.server_pid.map(str::to_owned),
            server_rss_before_mib: mib(input.server_rss_before),
            server_rss_mib: mib(window.server_rss_kib),
            server_rss_peak_mib: mib(window.server_hwm_kib),
            server_cpu_pct: server_cpu,
            bench_cpu_pct: bench_cpu,
            bench_rss_mib: mib(window.self_rss_kib),
            bench_rss_peak_mib: mib(window.self_hwm_kib),
            warnings,
        }
    }

    pub(crate) fn table(&self) -> String {
        fn opt(v: Option<f64>, unit: &str) -> String {
            v.map_or_else(|| "-".into(), |v| format!("{v:.2}{unit}"))
        }
        let mut s = String::new();
        let mut row = |k: &str, v: String| {
            // Writing into a String cannot fail.
            let _ = writeln!(s, "  {k:<26} {v}");
        };
        row("mode", format!("{} ({})", self.mode, self.url));
        row(
            "setup",
            format!(
                "{} channels x {} clients, a post every {} ms, body {} B, one keep-alive connection each",
                self.channels, self.clients_per_channel, self.interval_ms, self.body_bytes
            ),
        );
        row(
            "connections",
            format!(
                "{} attempted, {} made, {} failed in {:.2} s; {} reconnects, {} answers with Connection: close",
                self.connections_attempted,
                self.connections_made,
                self.connections_failed,
                self.connect_time_s,
                self.reconnects,
                self.server_closes
            ),
        );
        for (error, n) in &self.connect_errors {
            row("  connect error", format!("{n} x {error}"));
        }
        row(
            "window",
            format!(
                "{:.2} s (then {:.2} s drain)",
                self.window_s, self.drain_used_s
            ),
        );
        row(
            "requests sent",
            format!(
                "{} in window ({:.0}/s, target {:.0}/s), {} in all",
                self.requests_sent,
                self.request_rate,
                self.request_rate_target,
                self.requests_sent_total
            ),
        );
        row(
            "requests answered",
            format!(
                "{} in window ({:.0}/s), {} in all",
                self.requests_answered, self.requests_per_sec, self.requests_answered_total
            ),
        );
        row(
            "by status",
            format!(
                "200: {}, 204: {}, 4xx: {}, 5xx: {}, other: {}; errors {} (+{} unanswered)",
                self.status_200,
                self.status_204,
                self.status_4xx,
                self.status_5xx,
                self.status_other,
                self.errors,
                self.unanswered
            ),
        );
        for (kind, n) in &self.error_kinds {
            row("  error", format!("{n} x {kind}"));
        }
        row(
            "latency",
            format!(
                "p50 {} p90 {} p99 {} p99.9 {} max {} (mean {})",
                opt(self.latency_p50_ms, " ms"),
                opt(self.latency_p90_ms, " ms"),
                opt(self.latency_p99_ms, " ms"),
                opt(self.latency_p999_ms, " ms"),
                opt(self.latency_max_ms, " ms"),
                opt(self.latency_mean_ms, " ms")
            ),
        );
        row(
            "answers",
            format!(
                "{} peers per 200 (of {}), {} incomplete; peer state age p50 {} p99 {} max {}",
                opt(self.peers_per_answer, ""),
                self.clients_per_channel - 1,
                self.incomplete_answers,
                opt(self.state_age_p50_ms, " ms"),
                opt(self.state_age_p99_ms, " ms"),
                opt(self.state_age_max_ms, " ms")
            ),
        );
        row(
            "integrity",
            format!(
                "{} with own state, {} misrouted, {} not a JSON array, {} without Server-Time, {} Server-Time backwards",
                self.self_in_answer,
                self.misrouted,
                self.bad_answers,
                self.missing_server_time,
                self.server_time_backwards
            ),
        );
        if let Some(m) = &self.first_unexpected_answer {
            row("  first unexpected", m.clone());
        }
        if let Some(pid) = &self.server_pid {
            row(
                "server",
                format!(
                    "pid {pid}: CPU {} RSS {} (before {}, peak {})",
                    opt(self.server_cpu_pct, "%"),
                    opt(self.server_rss_mib, " MiB"),
                    opt(self.server_rss_before_mib, " MiB"),
                    opt(self.server_rss_peak_mib, " MiB")
                ),
            );
        }
        row(
            "load generator",
            format!(
                "CPU {} ({} threads) RSS {} (peak {})",
                opt(self.bench_cpu_pct, "%"),
                self.threads,
                opt(self.bench_rss_mib, " MiB"),
                opt(self.bench_rss_peak_mib, " MiB")
            ),
        );
        for w in &self.warnings {
            row("WARNING", w.clone());
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn urls() {
        assert_eq!(
            parse_http_url("http://127.0.0.1:5001").unwrap(),
            ("127.0.0.1:5001".into(), String::new())
        );
        assert_eq!(
            parse_http_url("http://localhost/").unwrap(),
            ("localhost:80".into(), String::new())
        );
        assert_eq!(
            parse_http_url("http://h:8/sync/").unwrap(),
            ("h:8".into(), "/sync".into())
        );
        assert_eq!(
            parse_http_url("[::1]:9").unwrap(),
            ("[::1]:9".into(), String::new())
        );
        assert!(parse_http_url("https://h").is_err());
        assert!(parse_http_url("ws://h:1/connect").is_err());
    }

    #[test]
    fn heads() {
        let head = parse_head(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nserver-time: 12.345\r\n\
              content-length: 2\r\n\r\n",
        )
        .unwrap();
        assert_eq!(
            head,
            Head {
                status: 200,
                content_length: Some(2),
                close: false,
                chunked: false,
                server_time: Some(12.345),
            }
        );
        let head = parse_head(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n").unwrap();
        assert_eq!(
            (head.status, head.close, head.content_length),
            (204, true, None)
        );
        let head = parse_head(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").unwrap();
        assert!(head.close);
        let head = parse_head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        )
        .unwrap();
        assert!(head.chunked && head.content_length.is_none());
        assert!(parse_head(b"HTTP/1.1 2x OK\r\n\r\n").is_err());
        assert!(parse_head(b"SPDY 200\r\n\r\n").is_err());
        assert!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
                .is_err()
        );
        assert_eq!(find_blank_line(b"a\r\n\r\nb"), Some(1));
        assert_eq!(find_blank_line(b"a\r\n\r"), None);
    }

    #[test]
    fn bodies_are_about_200_bytes_of_json() {
        let mut body = String::new();
        for seq in [0, 7, 12345] {
            state_body(&mut body, "bench-249-3", seq, 3.1, 1_790_000_000.123456);
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["client_id"], "bench-249-3");
            assert_eq!(v["seq"], seq);
            assert!((v["timestamp"].as_f64().unwrap() - 1_790_000_000.123456).abs() < 1e-5);
            let q = &v["rotation"];
            let norm: f64 = ["x", "y", "z", "w"]
                .iter()
                .map(|k| q[k].as_f64().unwrap().powi(2))
                .sum();
            assert!((norm - 1.0).abs() < 0.01, "{norm}");
            assert!((180..=230).contains(&body.len()), "{} {body}", body.len());
        }
    }

    fn answer_of(status: u16, body: &str) -> (Answer, Vec<u8>) {
        let head = Head {
            status,
            content_length: Some(body.len()),
            close: false,
            chunked: false,
            server_time: Some(1.0),
        };
        (
            Answer {
                head,
                body: 0..body.len(),
            },
            body.as_bytes().to_vec(),
        )
    }

    #[test]
    fn answers_are_checked() {
        let check = |status, body: &str| {
            let (answer, buf) = answer_of(status, body);
            let mut result = ClientResult::default();
            let mut last = 0.5;
            let times = check_answer(
                &answer,
                &buf,
                "bench-1-0",
                "bench-1-",
                &mut last,
                &mut result,
            );
            (times, result)
        };
        let (times, r) = check(
            200,
            r#"[{"client_id":"bench-1-1","timestamp":5.5,"x":[1]},{"client_id":"bench-1-2"}]"#,
        );
        assert_eq!(times, Some((2, vec![5.5])));
        assert_eq!((r.self_in_answer, r.misrouted, r.bad_answers), (0, 0, 0));
        let (_, r) = check(
            200,
            r#"[{"client_id":"bench-1-0"},{"client_id":"bench-2-0"}]"#,
        );
        assert_eq!((r.self_in_answer, r.misrouted), (1, 1));
        assert!(r.first_unexpected.unwrap().contains("own state"));
        for bad in ["{}", "[1]", r#"[{"id":"x"}]"#, "[", ""] {
            let (times, r) = check(200, bad);
            assert_eq!((times, r.bad_answers), (None, 1), "{bad}");
        }
        let (times, r) = check(204, "");
        assert_eq!((times, r.first_unexpected), (None, None));
        let (_, r) = check(429, "slow down");
        assert_eq!(r.first_unexpected.unwrap(), "429 answer: slow down");
    }

    /// A short run against the real server, in this process.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_run_against_the_server() {
        let config = supersynk::config::Config::resolve(supersynk::config::Settings {
            bind: Some([127, 0, 0, 1].into()),
            port: Some(0),
            ..Default::default()
        })
        .unwrap();
        let server = supersynk::Server::start(config).await.unwrap();
        let url = format!("http://{}", server.local_addr);
        let args = Args::try_parse_from([
            "supersynk-bench",
            "--http-channels",
            "--url",
            &url,
            "--sessions",
            "3",
            "--followers",
            "2",
            "--interval-ms",
            "20",
            "--warmup-s",
            "0.3",
            "--duration-s",
            "0.5",
        ])
        .unwrap();
        let report = run(args, 2).await.unwrap();
        assert_eq!(report.connections_made, 9);
        assert!(report.requests_sent > 100, "{report:?}");
        assert_eq!(report.status_200, report.requests_sent, "{report:?}");
        assert_eq!(
            report.errors + report.unanswered + report.reconnects,
            0,
            "{report:?}"
        );
        assert_eq!(
            report.self_in_answer + report.misrouted + report.bad_answers,
            0
        );
        assert_eq!(report.missing_server_time + report.server_time_backwards, 0);
        assert_eq!(report.incomplete_answers, 0, "{report:?}");
        assert_eq!(report.peers_per_answer, Some(2.0));
        assert!(report.latency_p50_ms.is_some() && report.state_age_p50_ms.is_some());
        assert!(report.table().contains("200: "));
        server.shutdown().await;
    }
}
