//! `supersynk-bench`: a load generator and benchmark for a HunterPie-compatible sync server.
//!
//! Opens `sessions * (followers + 1)` connections that behave like the deployed plugin
//! (SetName, then SetSession, then wait for the first `sessionstate`), and once every
//! connection has joined, every leader pushes a realistic monster message every
//! `--interval-ms`. Followers read continuously, check routing, order and integrity of what
//! the server relays, and record the latency of every push (`now - ts`, both from one
//! `Instant` of this process, in microseconds). Only pushes sent inside the measurement
//! window (after the warm-up) count; leaders stop with the window and the deliveries still in
//! flight are awaited for at most `--drain-s`. `--idle` instead holds the connections silent and reports the server's memory
//! per connection.
//!
//! `--follower-url` connects the followers to another node than the leaders (`--url`), e.g.
//! two nodes of a cluster sharing sessions over Redis: every delivery then crosses nodes.
//!
//! `--http-channels` loads the HTTP channel API instead (protocol/channels.md, module
//! [`http`]): `--sessions` channels of `--followers + 1` clients, each posting its state every
//! `--interval-ms` over its own keep-alive connection.
//!
//! `--reliable` loads the reliable protocol instead (protocol/reliable.md, module
//! [`reliable`]): `--sessions` rooms of `--followers + 1` clients, every client publishing to
//! its room every `--interval-ms` and acknowledging what it receives.
//!
//! Example: `supersynk-bench --url ws://127.0.0.1:5001/connect --sessions 2500 --followers 3
//! --interval-ms 30 --duration-s 20 --server-pid $(pgrep -x supersynk)`
#![forbid(unsafe_code)]

mod http;
mod reliable;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::pin::pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use supersynk_client::{ClientError, HunterClient};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::{Interval, MissedTickBehavior, interval_at, sleep_until, timeout};
use tokio_tungstenite::tungstenite::Message;

/// Highest latency the histograms hold (1 hour, in µs); anything above is clamped.
const MAX_LATENCY_US: u64 = 3_600_000_000;
/// Latency histogram shards; a follower flushes its batch into shard `index % SHARDS`.
const SHARDS: usize = 32;
/// Latencies a follower collects before it takes a shard's lock.
const BATCH: usize = 128;
/// The tail the leaders append to every push; followers parse it from the end.
const TS_KEY: &[u8] = b",\"ts\":";
const SEQ_KEY: &[u8] = b",\"seq\":";

#[derive(Parser, Debug, Clone)]
#[command(
    name = "supersynk-bench",
    version,
    about = "Load generator for a HunterPie-compatible sync server (supersynk)"
)]
struct Args {
    /// WebSocket URL of the server's plugin endpoint (ws:// only); with --http-channels the
    /// server's HTTP base, `http://host:port` (the API is under `/api/channels`)
    /// [default: ws://127.0.0.1:5001/connect, with --http-channels http://127.0.0.1:5001]
    #[arg(long, env = "SUPERSYNK_BENCH_URL")]
    url: Option<String>,
    /// WebSocket URL the followers connect to, when not --url (leaders always use --url):
    /// with two nodes of a cluster, every push then crosses from one node to the other
    /// [default: --url]
    #[arg(long)]
    follower_url: Option<String>,
    /// Sessions (one leader each); with --http-channels: channels
    #[arg(long, default_value_t = 100)]
    sessions: usize,
    /// Followers per session; with --http-channels: clients per channel minus one
    #[arg(long, default_value_t = 3)]
    followers: usize,
    /// Each leader pushes every this many ms (fractions allowed, e.g. 0.5); with
    /// --http-channels each client posts its state every this many ms
    /// [default: 170, with --http-channels 50]
    #[arg(long)]
    interval_ms: Option<f64>,
    /// Measurement window in seconds, after everyone joined and the warm-up
    /// (with --idle: how long the silent connections are held)
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,
    /// Pushing before the window starts, in seconds (not measured)
    #[arg(long, default_value_t = 2.0)]
    warmup_s: f64,
    /// After the window (leaders stop pushing with it), how long at most followers keep
    /// reading for measured pushes still in flight; ends early once all have arrived.
    /// Whatever has not arrived by then counts as lost (with --http-channels: clients stop
    /// posting with the window; requests unanswered by then count as unanswered)
    #[arg(long, default_value_t = 5.0)]
    drain_s: f64,
    /// Offer permessage-deflate, as the plugin does
    #[arg(long)]
    deflate: bool,
    /// Approximate size of one push in bytes (the plugin refuses over 16384)
    #[arg(long, default_value_t = 350)]
    payload_bytes: usize,
    /// The server's process id: report its RSS and CPU use over the window
    #[arg(long)]
    server_pid: Option<u32>,
    /// Print one JSON object instead of the table
    #[arg(long)]
    json: bool,
    /// Connect and join, push nothing, hold for --duration-s, then report the server's RSS
    /// per connection (needs --server-pid; use a freshly started server: one that has served
    /// before reuses freed memory and shows less)
    #[arg(long)]
    idle: bool,
    /// Connections being opened and joined at the same time
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// Time allowed for one connection to connect, upgrade and get its first sessionstate;
    /// with --http-channels: to connect, and for each request's full answer
    #[arg(long, default_value_t = 10.0)]
    connect_timeout_s: f64,
    /// Send a WebSocket ping every this many ms on every connection, like the plugin
    /// (1700); 0 = never
    #[arg(long, default_value_t = 0.0)]
    ping_ms: f64,
    /// What a leader does when it falls behind its interval: `delay` (default) skips the
    /// missed pushes and keeps the spacing, so an overloaded generator offers less load
    /// (visible as push rate < target) instead of bursting messages back-to-back, which no
    /// plugin does; `burst` catches up to keep the offered rate
    #[arg(long, value_enum, default_value_t = MissedTicks::Delay)]
    missed_ticks: MissedTicks,
    /// Runtime worker threads [default: the number of CPUs]
    #[arg(long)]
    threads: Option<usize>,
    /// Load the HTTP channel API instead (POST /api/channels/{key}): --sessions channels of
    /// --followers + 1 clients, each posting a ~200-byte state every --interval-ms over its
    /// own keep-alive HTTP/1.1 connection, with Client-Id and Client-Time
    #[arg(long, conflicts_with_all = ["idle", "deflate", "ping_ms", "payload_bytes", "follower_url"])]
    http_channels: bool,
    /// Load the reliable protocol instead (/v1/reliable): --sessions rooms of --followers + 1
    /// clients, each publishing --payload-bytes to its room every --interval-ms and
    /// acknowledging what it receives (cumulative acks every 100 ms or 64 messages)
    #[arg(long, conflicts_with_all = ["idle", "deflate", "ping_ms", "follower_url", "http_channels"])]
    reliable: bool,
}

impl Args {
    /// `--url`, or the default of the mode.
    fn url(&self) -> &str {
        match &self.url {
            Some(url) => url,
            None if self.http_channels => "http://127.0.0.1:5001",
            None if self.reliable => "ws://127.0.0.1:5001/v1/reliable",
            None => "ws://127.0.0.1:5001/connect",
        }
    }

    /// `--follower-url`, or `--url`.
    fn follower_url(&self) -> &str {
        self.follower_url.as_deref().unwrap_or_else(|| self.url())
    }

    /// `--interval-ms`, or the default of the mode.
    fn interval_ms(&self) -> f64 {
        match self.interval_ms {
            Some(ms) => ms,
            None if self.http_channels => 50.0,
            None => 170.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum MissedTicks {
    Delay,
    Burst,
}

/// When leaders push and which pushes are measured; published once everyone has joined.
#[derive(Debug)]
struct Plan {
    /// Leaders start pushing here (each with its own offset within one interval).
    start: tokio::time::Instant,
    /// The measurement window, in µs since `Shared::epoch`: a push counts if
    /// `window_start_us <= ts < window_end_us`.
    window_start_us: u64,
    window_end_us: u64,
}

/// What every connection task shares.
struct Shared {
    /// Where leaders connect (`--url`).
    addr: SocketAddr,
    path: String,
    /// Where followers connect (`--follower-url`, else the same as leaders).
    follower_addr: SocketAddr,
    follower_path: String,
    args: Args,
    /// The clock of every `ts`: one process, so leaders and followers share it exactly.
    epoch: Instant,
    /// Connections connecting and joining at once (`--connect-concurrency`); a task holds
    /// its permit from connect until its first sessionstate.
    connect_slots: Semaphore,
    /// Joined/failed, one per connection, to the main task (which counts them to know when
    /// the run is ready). Unbounded: at most one message per connection.
    events_tx: mpsc::UnboundedSender<Event>,
    /// Published once, when every connection has joined or failed.
    plan_rx: watch::Receiver<Option<Arc<Plan>>>,
    /// Set once, at the end of the run: every task stops reading and closes.
    stop_rx: watch::Receiver<bool>,
    /// Latency histograms (µs), sharded so followers rarely meet on a lock: a follower
    /// takes its shard's `std::sync::Mutex` once per `BATCH` latencies, never across
    /// `.await`. Merged at the end.
    latency: Vec<Mutex<Histogram<u64>>>,
    /// Time from connect to the first sessionstate (µs); locked once per connection.
    join_time: Mutex<Histogram<u64>>,
    /// Whether the EMFILE advice was printed already.
    emfile_reported: AtomicBool,
    /// Followers that joined, per session (complete before the plan is published).
    followers_joined: Vec<AtomicU32>,
    /// Deliveries of measured pushes expected and received so far, to end the drain early.
    expected: AtomicU64,
    delivered: AtomicU64,
}

/// What a connection reports while the run is being set up.
enum Event {
    Joined,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Leader,
    Follower,
}

/// One connection's account, returned when its task ends.
#[derive(Debug, Default)]
struct ConnResult {
    session: usize,
    leader: bool,
    /// Why it never joined, if it did not.
    connect_error: Option<String>,
    deflate_agreed: bool,
    /// Why the server side ended the connection before the run was over.
    closed: Option<String>,
    pushes_total: u64,
    pushes_in_window: u64,
    received_total: u64,
    received_in_window: u64,
    gaps: u64,
    out_of_order: u64,
    misrouted: u64,
    corrupted: u64,
    session_states: u64,
    server_msgs: u64,
    first_server_msg: Option<String>,
    other_msgs: u64,
    inflated: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run_main(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("supersynk-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_main(args: Args) -> anyhow::Result<()> {
    if args.sessions == 0 {
        bail!("--sessions must be at least 1");
    }
    if args.idle && args.server_pid.is_none() {
        bail!("--idle needs --server-pid (it reports the server's memory per connection)");
    }
    if !(args.interval_ms().is_finite() && args.interval_ms() > 0.0) {
        bail!("--interval-ms must be > 0");
    }
    for (name, v) in [
        ("--duration-s", args.duration_s),
        ("--warmup-s", args.warmup_s),
        ("--drain-s", args.drain_s),
        ("--ping-ms", args.ping_ms),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            bail!("{name} must be >= 0");
        }
    }
    if !(args.connect_timeout_s.is_finite() && args.connect_timeout_s > 0.0) {
        bail!("--connect-timeout-s must be > 0");
    }
    if let Some(pid) = args.server_pid
        && read_cpu_ticks(&pid.to_string()).is_none()
    {
        bail!("--server-pid {pid}: cannot read /proc/{pid}/stat (no such process?)");
    }
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    if args.http_channels {
        let report = runtime.block_on(http::run(args.clone(), threads))?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", report.table());
        }
        if report.connections_made == 0 {
            bail!("no connection could be made");
        }
        return Ok(());
    }
    let report = if args.reliable {
        runtime.block_on(reliable::run(args.clone(), threads))?
    } else {
        runtime.block_on(run(args.clone(), threads))?
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    if report.connections_made == 0 {
        bail!("no connection could be made");
    }
    Ok(())
}

/// `ws://host[:port]/path` into (`host:port`, `/path`).
fn parse_url(url: &str) -> anyhow::Result<(String, String)> {
    let rest = if let Some(r) = url.strip_prefix("ws://") {
        r
    } else if url.starts_with("wss://") {
        bail!("wss:// is not supported; use ws://");
    } else if url.contains("://") {
        bail!("unsupported URL scheme in {url:?}; use ws://host:port/path");
    } else {
        url
    };
    split_authority(url, rest, "/connect")
}

/// `host[:port][/path]` (`rest`, what follows the scheme of `url`) into (`host:port`,
/// `/path`): port 80 and `default_path` when absent.
fn split_authority(url: &str, rest: &str, default_path: &str) -> anyhow::Result<(String, String)> {
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, default_path),
    };
    if authority.is_empty() {
        bail!("no host in {url:?}");
    }
    let has_port = if authority.starts_with('[') {
        authority.contains("]:")
    } else {
        authority.contains(':')
    };
    let authority = if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    Ok((authority, path.to_owned()))
}

/// A `ws://` URL into the address to connect to and the request path.
async fn resolve(url: &str) -> anyhow::Result<(SocketAddr, String)> {
    let (authority, path) = parse_url(url)?;
    let addr = tokio::net::lookup_host(&authority)
        .await
        .with_context(|| format!("cannot resolve {authority}"))?
        .next()
        .with_context(|| format!("{authority} resolves to no address"))?;
    Ok((addr, path))
}

async fn run(args: Args, threads: usize) -> anyhow::Result<Report> {
    let (addr, path) = resolve(args.url()).await?;
    let (follower_addr, follower_path) = resolve(args.follower_url()).await?;
    let per_session = args.followers + 1;
    let total = args.sessions * per_session;
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
        follower_addr,
        follower_path,
        args: args.clone(),
        epoch: Instant::now(),
        connect_slots: Semaphore::new(args.connect_concurrency.max(1)),
        events_tx,
        plan_rx,
        stop_rx,
        latency: (0..SHARDS).map(|_| Mutex::new(histogram())).collect(),
        join_time: Mutex::new(histogram()),
        emfile_reported: AtomicBool::new(false),
        followers_joined: (0..args.sessions).map(|_| AtomicU32::new(0)).collect(),
        expected: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
    });

    // Connect and join everyone, `connect_concurrency` at a time, in order.
    let connect_started = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for index in 0..total {
        tasks.push(tokio::spawn(connection(shared.clone(), index)));
    }
    let (mut joined, mut failed) = (0usize, 0usize);
    let mut progress = tokio::time::interval(Duration::from_secs(1));
    progress.tick().await;
    while joined + failed < total {
        tokio::select! {
            event = events_rx.recv() => match event {
                Some(Event::Joined) => joined += 1,
                Some(Event::Failed) => failed += 1,
                None => break,
            },
            _ = progress.tick() => {
                eprintln!("connecting: {joined} joined, {failed} failed of {total}");
            }
        }
    }
    let connect_secs = connect_started.elapsed().as_secs_f64();
    eprintln!("{joined} of {total} connections joined in {connect_secs:.2} s ({failed} failed)");

    let mut window = Window::default();
    let mut server_rss_joined = None;
    let mut drain_secs = 0.0;
    if joined == 0 {
        eprintln!("no connection joined: nothing to measure");
    } else if args.idle {
        server_rss_joined = server_pid
            .as_deref()
            .and_then(|p| read_status_kib(p, "VmRSS:"));
        window.begin(server_pid.as_deref());
        eprintln!(
            "holding {joined} silent connections for {} s",
            args.duration_s
        );
        tokio::time::sleep(Duration::from_secs_f64(args.duration_s)).await;
        window.end(server_pid.as_deref());
    } else {
        drain_secs = measure(
            &args,
            shared.epoch,
            &plan_tx,
            server_pid.as_deref(),
            &mut window,
            (&shared.expected, &shared.delivered),
            "pushing",
        )
        .await;
    }
    stop_tx.send_replace(true);

    let mut results = Vec::with_capacity(total);
    for task in tasks {
        match task.await {
            Ok(r) => results.push(r),
            Err(e) => eprintln!("a connection task failed: {e}"),
        }
    }
    let latency = merged(&shared.latency, histogram());
    let join_time = shared
        .join_time
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
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
        server_rss_joined,
        server_pid: server_pid.as_deref(),
        fd_note,
        mode: None,
        expected: None,
    }))
}

/// CPU and memory samples at both ends of the window.
#[derive(Default)]
struct Window {
    started: Option<Instant>,
    secs: f64,
    server_ticks: Option<(u64, u64)>,
    self_ticks: Option<(u64, u64)>,
    server_rss_kib: Option<u64>,
    server_hwm_kib: Option<u64>,
    self_rss_kib: Option<u64>,
    self_hwm_kib: Option<u64>,
}

impl Window {
    fn begin(&mut self, server: Option<&str>) {
        self.started = Some(Instant::now());
        self.server_ticks = server.and_then(read_cpu_ticks).map(|t| (t, t));
        self.self_ticks = read_cpu_ticks("self").map(|t| (t, t));
    }

    fn end(&mut self, server: Option<&str>) {
        self.secs = self.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        let end = |ticks: &mut Option<(u64, u64)>, now: Option<u64>| {
            *ticks = match (*ticks, now) {
                (Some((a, _)), Some(b)) => Some((a, b)),
                _ => None,
            }
        };
        end(&mut self.server_ticks, server.and_then(read_cpu_ticks));
        end(&mut self.self_ticks, read_cpu_ticks("self"));
        self.server_rss_kib = server.and_then(|p| read_status_kib(p, "VmRSS:"));
        self.server_hwm_kib = server.and_then(|p| read_status_kib(p, "VmHWM:"));
        self.self_rss_kib = read_status_kib("self", "VmRSS:");
        self.self_hwm_kib = read_status_kib("self", "VmHWM:");
    }

    /// CPU use over the window, 100 = one core.
    fn cpu_pct(&self, ticks: Option<(u64, u64)>, clk_tck: f64) -> Option<f64> {
        let (a, b) = ticks?;
        (self.secs > 0.0).then(|| b.saturating_sub(a) as f64 / clk_tck / self.secs * 100.0)
    }
}

/// Publishes the plan, measures the window (`--warmup-s`, then `--duration-s`) and waits for
/// the measured deliveries still in flight (`(expected, delivered)`, at most `--drain-s`);
/// returns the drain's length in seconds. Shared by the WebSocket modes.
async fn measure(
    args: &Args,
    epoch: Instant,
    plan_tx: &watch::Sender<Option<Arc<Plan>>>,
    server: Option<&str>,
    window: &mut Window,
    (expected, delivered): (&AtomicU64, &AtomicU64),
    verb: &str,
) -> f64 {
    let now = tokio::time::Instant::now();
    let start = now + Duration::from_millis(100);
    let window_start = start + Duration::from_secs_f64(args.warmup_s);
    let window_end = window_start + Duration::from_secs_f64(args.duration_s);
    let micros = |t: tokio::time::Instant| micros_since(epoch, t.into_std());
    plan_tx.send_replace(Some(Arc::new(Plan {
        start,
        window_start_us: micros(window_start),
        window_end_us: micros(window_end),
    })));
    eprintln!(
        "{verb}: {} s warm-up, {} s measured, {} s drain",
        args.warmup_s, args.duration_s, args.drain_s
    );
    sleep_until(window_start).await;
    window.begin(server);
    sleep_until(window_end).await;
    window.end(server);
    // Wait for the measured messages still in flight: until all arrived, at most --drain-s.
    let drain_end = window_end + Duration::from_secs_f64(args.drain_s);
    let mut poll = tokio::time::interval_at(
        window_end + Duration::from_millis(100),
        Duration::from_millis(50),
    );
    loop {
        let at = poll.tick().await;
        if delivered.load(Ordering::Relaxed) >= expected.load(Ordering::Relaxed) || at >= drain_end
        {
            break;
        }
    }
    window_end.elapsed().as_secs_f64()
}

/// The latency shards, merged.
fn merged(shards: &[Mutex<Histogram<u64>>], mut into: Histogram<u64>) -> Histogram<u64> {
    for shard in shards {
        let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
        into.add(&*shard).expect("same bounds");
    }
    into
}

fn micros_since(epoch: Instant, t: Instant) -> u64 {
    t.saturating_duration_since(epoch).as_micros() as u64
}

/// A pending future for a disabled timer, so `select!` branches can share one shape.
async fn tick(interval: &mut Option<Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// One connection, from connecting to the end of the run.
async fn connection(shared: Arc<Shared>, index: usize) -> ConnResult {
    let args = &shared.args;
    let per_session = args.followers + 1;
    let session = index / per_session;
    let role = if index.is_multiple_of(per_session) {
        Role::Leader
    } else {
        Role::Follower
    };
    let mut state = ConnState::new(&shared, index, session, role);
    let mut client = match join(&shared, index, session, role, &mut state).await {
        Ok(client) => {
            if role == Role::Follower {
                shared.followers_joined[session].fetch_add(1, Ordering::Relaxed);
            }
            // The main task holds the receiver until every connection has reported.
            let _ = shared.events_tx.send(Event::Joined);
            client
        }
        Err(error) => {
            // As above.
            let _ = shared.events_tx.send(Event::Failed);
            state.result.connect_error = Some(error);
            return state.result;
        }
    };
    state.result.deflate_agreed = client.deflate;
    let deflate = client.deflate;
    let ws = &mut client.ws;

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
    let mut pusher: Option<Interval> = None;
    let mut pinger = (args.ping_ms > 0.0).then(|| {
        let period = Duration::from_secs_f64(args.ping_ms / 1000.0);
        // Spread the pings over one period.
        let offset = period.mul_f64((index % 1000) as f64 / 1000.0);
        let mut i = interval_at(tokio::time::Instant::now() + offset, period);
        i.set_missed_tick_behavior(MissedTickBehavior::Delay);
        i
    });
    let body = (role == Role::Leader && !args.idle).then(|| push_body(session, args.payload_bytes));
    let mut seq: u64 = 0;

    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            p = &mut plan_wait, if plan.is_none() => {
                let Some(p) = p else { break };
                plan = Some(p);
                if let (Some(plan), Some(_)) = (&plan, &body) {
                    let period = Duration::from_secs_f64(args.interval_ms() / 1000.0);
                    // Leaders start spread evenly over one interval, not all at once.
                    let offset = period.mul_f64(session as f64 / args.sessions as f64);
                    let mut i = interval_at(plan.start + offset, period);
                    i.set_missed_tick_behavior(match args.missed_ticks {
                        MissedTicks::Delay => MissedTickBehavior::Delay,
                        MissedTicks::Burst => MissedTickBehavior::Burst,
                    });
                    pusher = Some(i);
                }
            }
            _ = tick(&mut pusher), if pusher.is_some() => {
                let (Some(plan), Some(body)) = (&plan, &body) else { continue };
                let ts = micros_since(shared.epoch, Instant::now());
                if ts >= plan.window_end_us {
                    // Pushing stops with the window, so the drain sees the backlog clear.
                    pusher = None;
                    continue;
                }
                let in_window = ts >= plan.window_start_us;
                if in_window {
                    // Counted before sending: a follower may see it before `send` returns.
                    state.result.pushes_in_window += 1;
                    let followers = shared.followers_joined[session].load(Ordering::Relaxed);
                    shared.expected.fetch_add(u64::from(followers), Ordering::Relaxed);
                }
                seq += 1;
                state.result.pushes_total += 1;
                let mut text = String::with_capacity(body.len() + 48);
                text.push_str(body);
                // Writing into a String cannot fail.
                let _ = write!(text, ",\"ts\":{ts},\"seq\":{}}}", seq - 1);
                let message = if deflate { compressed_text(text.as_bytes()) } else { Message::text(text) };
                if let Err(e) = ws.send(message).await {
                    state.result.closed = Some(format!("send failed: {e}"));
                    break;
                }
            }
            _ = tick(&mut pinger), if pinger.is_some() => {
                if let Err(e) = ws.send(Message::Ping(Bytes::from_static(b"benchpng"))).await {
                    state.result.closed = Some(format!("ping failed: {e}"));
                    break;
                }
            }
            message = ws.next() => match message {
                Some(Ok(message)) => {
                    if let Err(reason) = state.on_message(message, plan.as_deref()) {
                        state.result.closed = Some(reason);
                        break;
                    }
                }
                Some(Err(e)) => {
                    state.result.closed = Some(format!("read error: {e}"));
                    break;
                }
                None => {
                    state.result.closed = Some("connection ended without a close frame".into());
                    break;
                }
            }
        }
    }
    state.flush_latencies();
    state.result.inflated = client.inflated_messages();
    if state.result.closed.is_none() {
        // A polite close; the run is over, so a failure or a slow server changes nothing.
        let _ = timeout(Duration::from_secs(2), client.ws.close(None)).await;
    }
    state.result
}

/// Connects, sends SetName and SetSession and waits for the first sessionstate.
async fn join(
    shared: &Shared,
    index: usize,
    session: usize,
    role: Role,
    state: &mut ConnState<'_>,
) -> Result<HunterClient, String> {
    let _slot = shared
        .connect_slots
        .acquire()
        .await
        .map_err(|_| "cancelled".to_owned())?;
    let started = Instant::now();
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs_f64(shared.args.connect_timeout_s);
    let attempt = async {
        let leader = role == Role::Leader;
        let (addr, path) = if leader {
            (shared.addr, &shared.path)
        } else {
            (shared.follower_addr, &shared.follower_path)
        };
        let mut client = HunterClient::connect(addr, path, shared.args.deflate)
            .await
            .map_err(|e| shared.describe(&e))?;
        let set_name = format!(r#"{{"type":"SetName","name":"b{index}"}}"#);
        let set_session = format!(
            r#"{{"sessionId":"bench-{session}:L","type":"SetSession","isLeader":{leader}}}"#
        );
        for text in [set_name, set_session] {
            let message = if client.deflate {
                compressed_text(text.as_bytes())
            } else {
                Message::text(text)
            };
            client
                .ws
                .send(message)
                .await
                .map_err(|e| format!("send during join: {e}"))?;
        }
        loop {
            match client.ws.next().await {
                Some(Ok(message)) => {
                    // A refused join gets a servermsg and no sessionstate: a refusal, not a
                    // timeout (e.g. `Cannot join: session is full: at most 256 members`).
                    if let Message::Text(t) = &message
                        && let Some(text) = join_refusal(t.as_str())
                    {
                        return Err(format!("refused: {text}"));
                    }
                    let is_state = matches!(&message, Message::Text(t) if t.as_str().contains("\"sessionstate\""));
                    state
                        .on_message(message, None)
                        .map_err(|e| format!("before sessionstate: {e}"))?;
                    if is_state {
                        return Ok(client);
                    }
                }
                Some(Err(e)) => return Err(format!("read error before sessionstate: {e}")),
                None => return Err("closed before sessionstate".into()),
            }
        }
    };
    let client = match tokio::time::timeout_at(deadline, attempt).await {
        Ok(result) => result?,
        Err(_) => return Err("timed out (connect, upgrade or first sessionstate)".into()),
    };
    let micros = started.elapsed().as_micros() as u64;
    shared
        .join_time
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .saturating_record(micros.max(1));
    Ok(client)
}

/// Whether a connect error is the server's refusal (see [`Report::joins_refused`]).
fn is_refusal(error: &str) -> bool {
    error.starts_with("refused: ") || error.starts_with("handshake refused: ")
}

/// The `text` of a servermsg that refuses a join (`Cannot join: ...`, `Rate limit: ...`).
fn join_refusal(message: &str) -> Option<String> {
    if !message.contains("\"servermsg\"") {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(message).ok()?;
    let text = value["text"].as_str()?;
    (text.starts_with("Cannot join") || text.starts_with("Rate limit")).then(|| text.to_owned())
}

impl Shared {
    /// A short, countable description of a connect failure.
    fn describe(&self, e: &ClientError) -> String {
        match e {
            ClientError::Io(io) => describe_io(io, &self.emfile_reported),
            ClientError::Handshake(answer) => {
                format!(
                    "handshake refused: {}",
                    answer.lines().next().unwrap_or("(empty answer)")
                )
            }
            ClientError::Ws(e) => format!("websocket: {e}"),
        }
    }
}

/// A short, countable description of a connect or socket failure; prints the EMFILE advice
/// once (`reported` remembers).
fn describe_io(io: &std::io::Error, reported: &AtomicBool) -> String {
    match io.raw_os_error() {
        Some(24) => {
            if !reported.swap(true, Ordering::Relaxed) {
                eprintln!(
                    "error: too many open files (EMFILE): raise the limit with `ulimit -n` \
                     (this tool needs one descriptor per connection, the server too)"
                );
            }
            "EMFILE: too many open files (raise ulimit -n)".into()
        }
        Some(99) => "EADDRNOTAVAIL: out of local ports".into(),
        Some(111) => "ECONNREFUSED: connection refused".into(),
        Some(104) => "ECONNRESET: connection reset".into(),
        Some(32) => "EPIPE: broken pipe".into(),
        _ => format!("i/o: {io}"),
    }
}

/// A connection's running tallies and the checks on what it receives.
struct ConnState<'a> {
    shared: &'a Shared,
    index: usize,
    role: Role,
    /// `{"sessionId":"bench-<s>:L",` — every push relayed to this connection starts so.
    prefix: Vec<u8>,
    /// Length of this session's push before the `,"ts":` tail.
    body_len: usize,
    next_seq: u64,
    batch: Vec<u32>,
    result: ConnResult,
}

impl<'a> ConnState<'a> {
    fn new(shared: &'a Shared, index: usize, session: usize, role: Role) -> Self {
        let body_len = push_body(session, shared.args.payload_bytes).len();
        ConnState {
            shared,
            index,
            role,
            prefix: format!(r#"{{"sessionId":"bench-{session}:L","#).into_bytes(),
            body_len,
            next_seq: 0,
            batch: Vec::new(),
            result: ConnResult {
                session,
                leader: role == Role::Leader,
                ..ConnResult::default()
            },
        }
    }

    /// Accounts for one received message; `Err` when the server closed the connection.
    fn on_message(&mut self, message: Message, plan: Option<&Plan>) -> Result<(), String> {
        let text = match &message {
            Message::Text(t) => t.as_str(),
            Message::Close(frame) => {
                return Err(match frame {
                    Some(f) => format!("closed by server: {} {}", f.code, f.reason),
                    None => "closed by server".into(),
                });
            }
            Message::Binary(_) => {
                self.result.other_msgs += 1;
                return Ok(());
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return Ok(()),
        };
        let bytes = text.as_bytes();
        if let Some((ts, seq, body_len)) = parse_tail(bytes) {
            self.on_push(bytes, ts, seq, body_len, plan);
        } else if text.contains("\"sessionstate\"") {
            self.result.session_states += 1;
        } else if text.contains("\"servermsg\"") {
            self.result.server_msgs += 1;
            if self.result.first_server_msg.is_none() {
                self.result.first_server_msg = Some(text.chars().take(200).collect());
            }
        } else {
            self.result.other_msgs += 1;
        }
        Ok(())
    }

    fn on_push(&mut self, bytes: &[u8], ts: u64, seq: u64, body_len: usize, plan: Option<&Plan>) {
        if self.role == Role::Leader || !bytes.starts_with(&self.prefix) {
            self.result.misrouted += 1;
            return;
        }
        if body_len != self.body_len {
            self.result.corrupted += 1;
        }
        self.result.received_total += 1;
        if seq == self.next_seq {
            self.next_seq += 1;
        } else if seq > self.next_seq {
            self.result.gaps += seq - self.next_seq;
            self.next_seq = seq + 1;
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
            let latency = now.saturating_sub(ts).clamp(1, u32::MAX as u64) as u32;
            if self.batch.capacity() == 0 {
                self.batch.reserve_exact(BATCH);
            }
            self.batch.push(latency);
            if self.batch.len() >= BATCH {
                self.flush_latencies();
            }
        }
    }

    fn flush_latencies(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let shard = &self.shared.latency[self.index % SHARDS];
        let mut histogram = shard.lock().unwrap_or_else(|e| e.into_inner());
        for &latency in &self.batch {
            histogram.saturating_record(latency as u64);
        }
        drop(histogram);
        self.batch.clear();
    }
}

/// A text message compressed the plugin's way (a finished raw deflate stream plus one `0x00`
/// byte, RSV1 set), with the library's per-thread reused compressor.
fn compressed_text(data: &[u8]) -> Message {
    supersynk_client::text_message(std::str::from_utf8(data).unwrap_or_default(), true)
}

/// Parses the `,"ts":<n>,"seq":<n>}` tail of a push from the end: (ts, seq, where the tail
/// starts). `None` for anything else (sessionstate, servermsg...).
fn parse_tail(b: &[u8]) -> Option<(u64, u64, usize)> {
    let end = b.len().checked_sub(1).filter(|&e| b[e] == b'}')?;
    let (seq, start) = digits_before(b, end)?;
    let end = start
        .checked_sub(SEQ_KEY.len())
        .filter(|&s| &b[s..start] == SEQ_KEY)?;
    let (ts, start) = digits_before(b, end)?;
    let tail = start
        .checked_sub(TS_KEY.len())
        .filter(|&s| &b[s..start] == TS_KEY)?;
    Some((ts, seq, tail))
}

/// The decimal number ending at `end`, and where it starts.
fn digits_before(b: &[u8], end: usize) -> Option<(u64, usize)> {
    let mut start = end;
    while start > 0 && b[start - 1].is_ascii_digit() {
        start -= 1;
    }
    if start == end || end - start > 19 {
        return None;
    }
    let value = b[start..end]
        .iter()
        .fold(0u64, |v, &c| v * 10 + u64::from(c - b'0'));
    Some((value, start))
}

/// One monster of a push: (parts, ailments), each (index, value in hundredths).
type Monster = (Vec<(u32, u32)>, Vec<(u32, u32)>);

/// A leader's push without its `,"ts":..,"seq":..}` tail: the plugin's monster format
/// (`[id, [[part, health], ...], [[ailment, buildup], ...]]`), grown part by part until the
/// whole push is about `target` bytes.
fn push_body(session: usize, target: usize) -> String {
    /// Roughly what the tail adds (`,"ts":` + 9 digits + `,"seq":` + 4 digits + `}`).
    const TAIL: usize = 27;
    let prefix = format!(r#"{{"sessionId":"bench-{session}:L","type":"Push","data":["#);
    let mut monsters: Vec<Monster> = vec![(vec![(0, 3242)], Vec::new())];
    let render = |monsters: &[Monster]| {
        let mut s = prefix.clone();
        for (m, (parts, ailments)) in monsters.iter().enumerate() {
            if m > 0 {
                s.push(',');
            }
            // Writing into a String cannot fail (here and below).
            let _ = write!(s, r#"["em_{:03}",["#, m + 1);
            for (i, (idx, v)) in parts.iter().enumerate() {
                let sep = if i > 0 { "," } else { "" };
                let _ = write!(s, "{sep}[{idx},{}]", number(*v));
            }
            s.push_str("],[");
            for (i, (idx, v)) in ailments.iter().enumerate() {
                let sep = if i > 0 { "," } else { "" };
                let _ = write!(s, "{sep}[{idx},{}]", number(*v));
            }
            s.push_str("]]");
        }
        s.push(']');
        s
    };
    let mut n: u32 = 1;
    loop {
        let s = render(&monsters);
        if s.len() + TAIL >= target {
            return s;
        }
        let last = monsters.last_mut().expect("one monster at least");
        let value = (n * 7919 + 1234) % 20000;
        if last.0.len() >= 16 && last.1.len() >= 6 {
            monsters.push((vec![(0, value)], Vec::new()));
        } else if n % 3 == 2 && last.1.len() < 6 {
            let index = 40 + last.1.len() as u32;
            last.1.push((index, value));
        } else if last.0.len() < 16 {
            let index = last.0.len() as u32;
            last.0.push((index, value));
        } else {
            let index = 40 + last.1.len() as u32;
            last.1.push((index, value));
        }
        n += 1;
    }
}

/// A value in hundredths as the plugin writes it: two decimals, `100.0` for whole numbers,
/// `0` for zero.
fn number(hundredths: u32) -> String {
    match (hundredths / 100, hundredths % 100) {
        (0, 0) => "0".into(),
        (w, 0) => format!("{w}.0"),
        (w, f) => format!("{w}.{f:02}"),
    }
}

/// Makes the soft RLIMIT_NOFILE at least `needed` if the hard limit allows (with the
/// `prlimit` tool: this crate has no libc). Returns a note when the limit stays too low.
fn ensure_fd_limit(needed: u64) -> Option<String> {
    let (soft, hard) = read_nofile_limits()?;
    if soft >= needed {
        return None;
    }
    if hard > soft {
        let hard_text = if hard == u64::MAX {
            "unlimited".to_owned()
        } else {
            hard.to_string()
        };
        let status = std::process::Command::new("prlimit")
            .arg(format!("--pid={}", std::process::id()))
            .arg(format!("--nofile={hard_text}:{hard_text}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        if let Ok(status) = status
            && status.success()
            && let Some((soft, _)) = read_nofile_limits()
            && soft >= needed
        {
            eprintln!("raised the open-files limit to {hard_text}");
            return None;
        }
    }
    let (soft, hard) = read_nofile_limits().unwrap_or((soft, hard));
    Some(format!(
        "open-files limit is {soft} (hard {hard}) but {needed} descriptors are needed: \
         connections past the limit will fail with EMFILE (raise it with `ulimit -n`)"
    ))
}

/// (soft, hard) "Max open files" of this process, from /proc/self/limits.
fn read_nofile_limits() -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut fields = line["Max open files".len()..].split_whitespace();
    let parse = |s: &str| {
        if s == "unlimited" {
            Some(u64::MAX)
        } else {
            s.parse().ok()
        }
    };
    Some((parse(fields.next()?)?, parse(fields.next()?)?))
}

/// utime + stime of a process (all its threads), in clock ticks.
fn read_cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name start at field 3 (state).
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// A `kB` line of /proc/PID/status, e.g. `VmRSS:`.
fn read_status_kib(pid: &str, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// `getconf CLK_TCK`, 100 if that fails.
fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|&t| t > 0.0)
        .unwrap_or(100.0)
}

struct ReportInput<'a> {
    args: &'a Args,
    threads: usize,
    total: usize,
    connect_secs: f64,
    drain_secs: f64,
    results: &'a [ConnResult],
    latency: &'a Histogram<u64>,
    join_time: &'a Histogram<u64>,
    window: &'a Window,
    clk_tck: f64,
    server_rss_before: Option<u64>,
    server_rss_joined: Option<u64>,
    server_pid: Option<&'a str>,
    fd_note: Option<String>,
    /// Set by modes where every connection publishes (`--reliable`): the mode's name and the
    /// deliveries it expected (the leader/follower count does not apply).
    mode: Option<&'static str>,
    expected: Option<u64>,
}

/// Everything the run found; printed as a table or, with `--json`, as one object.
#[derive(Debug, Serialize)]
struct Report {
    mode: &'static str,
    url: String,
    /// Where followers connected, when not `url`.
    follower_url: Option<String>,
    sessions: usize,
    followers: usize,
    interval_ms: f64,
    duration_s: f64,
    warmup_s: f64,
    drain_s: f64,
    drain_used_s: f64,
    deflate_offered: bool,
    payload_bytes: usize,
    missed_ticks: MissedTicks,
    threads: usize,
    connections_attempted: usize,
    connections_made: usize,
    connections_failed: usize,
    /// Failed connections the server refused (a handshake answered with an error status, or
    /// a join answered with a refusal), as opposed to errors and timeouts.
    joins_refused: usize,
    connect_errors: BTreeMap<String, usize>,
    connect_time_s: f64,
    join_time_p50_ms: Option<f64>,
    join_time_p99_ms: Option<f64>,
    join_time_max_ms: Option<f64>,
    deflate_agreed: usize,
    connections_closed_by_server: usize,
    close_reasons: BTreeMap<String, usize>,
    window_s: f64,
    push_rate_target: f64,
    push_rate: f64,
    pushes_sent: u64,
    pushes_sent_total: u64,
    deliveries_expected: u64,
    deliveries_received: u64,
    deliveries_lost: i64,
    loss_pct: f64,
    deliveries_per_sec: f64,
    deliveries_received_total: u64,
    seq_gaps: u64,
    out_of_order: u64,
    misrouted: u64,
    corrupted: u64,
    latency_p50_ms: Option<f64>,
    latency_p90_ms: Option<f64>,
    latency_p99_ms: Option<f64>,
    latency_p999_ms: Option<f64>,
    latency_max_ms: Option<f64>,
    latency_mean_ms: Option<f64>,
    messages_received_compressed: u64,
    session_states_received: u64,
    server_messages: u64,
    first_server_message: Option<String>,
    other_messages: u64,
    server_pid: Option<String>,
    server_rss_before_mib: Option<f64>,
    server_rss_joined_mib: Option<f64>,
    server_rss_mib: Option<f64>,
    server_rss_peak_mib: Option<f64>,
    server_cpu_pct: Option<f64>,
    server_rss_per_connection_kib: Option<f64>,
    bench_cpu_pct: Option<f64>,
    bench_rss_mib: Option<f64>,
    bench_rss_peak_mib: Option<f64>,
    warnings: Vec<String>,
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn mib(kib: Option<u64>) -> Option<f64> {
    kib.map(|k| round2(k as f64 / 1024.0))
}

fn quantile_ms(h: &Histogram<u64>, q: f64) -> Option<f64> {
    (!h.is_empty()).then(|| round2(h.value_at_quantile(q) as f64 / 1000.0))
}

impl Report {
    fn build(input: ReportInput) -> Report {
        let ReportInput {
            args,
            results,
            window,
            latency,
            join_time,
            ..
        } = input;
        let made: Vec<&ConnResult> = results
            .iter()
            .filter(|r| r.connect_error.is_none())
            .collect();
        let mut connect_errors = BTreeMap::new();
        for r in results {
            if let Some(e) = &r.connect_error {
                *connect_errors.entry(e.clone()).or_insert(0) += 1;
            }
        }
        let mut close_reasons = BTreeMap::new();
        for r in &made {
            if let Some(reason) = &r.closed {
                *close_reasons.entry(reason.clone()).or_insert(0) += 1;
            }
        }
        // Expected deliveries: every measured push times the followers of its session that
        // joined (one that is closed later still counts: what it misses is lost).
        let mut pushes_in_window = vec![0u64; args.sessions];
        let mut followers_joined = vec![0u64; args.sessions];
        for r in &made {
            if r.leader {
                pushes_in_window[r.session] += r.pushes_in_window;
            } else {
                followers_joined[r.session] += 1;
            }
        }
        let expected: u64 = input.expected.unwrap_or_else(|| {
            pushes_in_window
                .iter()
                .zip(&followers_joined)
                .map(|(p, f)| p * f)
                .sum()
        });
        let sum = |f: fn(&ConnResult) -> u64| made.iter().map(|r| f(r)).sum::<u64>();
        let received = sum(|r| r.received_in_window);
        let pushes_sent = sum(|r| r.pushes_in_window);
        let leaders = made.iter().filter(|r| r.leader).count();
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
        let per_connection = match (input.server_rss_before, window.server_rss_kib) {
            (Some(before), Some(after)) if args.idle && !made.is_empty() => {
                Some(round2((after as f64 - before as f64) / made.len() as f64))
            }
            _ => None,
        };
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
        let target = if args.idle {
            0.0
        } else {
            round2(leaders as f64 * 1000.0 / args.interval_ms())
        };
        let rate = per_sec(pushes_sent);
        let closed = made.iter().filter(|r| r.closed.is_some()).count();
        if closed > 0 {
            warnings.push(format!(
                "{closed} connections were closed by the server during the run"
            ));
        } else if !args.idle && target > 0.0 && rate < target * 0.95 {
            warnings.push(format!(
                "leaders pushed {rate:.0}/s, below the target {target:.0}/s: the generator fell behind"
            ));
        }
        if args.payload_bytes > 16384 {
            warnings.push("pushes over 16384 bytes: the plugin never sends those".into());
        }
        let first_server_message = made.iter().find_map(|r| r.first_server_msg.clone());
        Report {
            mode: match input.mode {
                Some(mode) => mode,
                None if args.idle => "idle",
                None => "load",
            },
            url: args.url().to_owned(),
            follower_url: args.follower_url.clone(),
            sessions: args.sessions,
            followers: args.followers,
            interval_ms: args.interval_ms(),
            duration_s: args.duration_s,
            warmup_s: args.warmup_s,
            drain_s: args.drain_s,
            drain_used_s: round2(input.drain_secs),
            deflate_offered: args.deflate,
            payload_bytes: push_body(0, args.payload_bytes).len() + 27,
            missed_ticks: args.missed_ticks,
            threads: input.threads,
            connections_attempted: input.total,
            connections_made: made.len(),
            connections_failed: input.total - made.len(),
            joins_refused: results
                .iter()
                .filter_map(|r| r.connect_error.as_deref())
                .filter(|e| is_refusal(e))
                .count(),
            connect_errors,
            connect_time_s: round2(input.connect_secs),
            join_time_p50_ms: quantile_ms(join_time, 0.5),
            join_time_p99_ms: quantile_ms(join_time, 0.99),
            join_time_max_ms: quantile_ms(join_time, 1.0),
            deflate_agreed: made.iter().filter(|r| r.deflate_agreed).count(),
            connections_closed_by_server: closed,
            close_reasons,
            window_s: round2(secs),
            push_rate_target: target,
            push_rate: rate,
            pushes_sent,
            pushes_sent_total: sum(|r| r.pushes_total),
            deliveries_expected: expected,
            deliveries_received: received,
            deliveries_lost: expected as i64 - received as i64,
            loss_pct: if expected > 0 {
                round2((expected as f64 - received as f64) / expected as f64 * 100.0)
            } else {
                0.0
            },
            deliveries_per_sec: per_sec(received),
            deliveries_received_total: sum(|r| r.received_total),
            seq_gaps: sum(|r| r.gaps),
            out_of_order: sum(|r| r.out_of_order),
            misrouted: sum(|r| r.misrouted),
            corrupted: sum(|r| r.corrupted),
            latency_p50_ms: quantile_ms(latency, 0.5),
            latency_p90_ms: quantile_ms(latency, 0.9),
            latency_p99_ms: quantile_ms(latency, 0.99),
            latency_p999_ms: quantile_ms(latency, 0.999),
            latency_max_ms: (!latency.is_empty()).then(|| round2(latency.max() as f64 / 1000.0)),
            latency_mean_ms: (!latency.is_empty()).then(|| round2(latency.mean() / 1000.0)),
            messages_received_compressed: sum(|r| r.inflated),
            session_states_received: sum(|r| r.session_states),
            server_messages: sum(|r| r.server_msgs),
            first_server_message,
            other_messages: sum(|r| r.other_msgs),
            server_pid: input.server_pid.map(str::to_owned),
            server_rss_before_mib: mib(input.server_rss_before),
            server_rss_joined_mib: mib(input.server_rss_joined),
            server_rss_mib: mib(window.server_rss_kib),
            server_rss_peak_mib: mib(window.server_hwm_kib),
            server_cpu_pct: server_cpu,
            server_rss_per_connection_kib: per_connection,
            bench_cpu_pct: bench_cpu,
            bench_rss_mib: mib(window.self_rss_kib),
            bench_rss_peak_mib: mib(window.self_hwm_kib),
            warnings,
        }
    }

    fn table(&self) -> String {
        fn opt(v: Option<f64>, unit: &str) -> String {
            v.map_or_else(|| "-".into(), |v| format!("{v:.2}{unit}"))
        }
        let mut s = String::new();
        let mut row = |k: &str, v: String| {
            // Writing into a String cannot fail.
            let _ = writeln!(s, "  {k:<26} {v}");
        };
        match &self.follower_url {
            Some(f) => row(
                "mode",
                format!("{} (leaders {}, followers {f})", self.mode, self.url),
            ),
            None => row("mode", format!("{} ({})", self.mode, self.url)),
        }
        let setup = if self.mode == "reliable" {
            format!(
                "{} rooms x {} members, all publishing",
                self.sessions,
                self.followers + 1
            )
        } else {
            format!(
                "{} sessions x (1 leader + {} followers)",
                self.sessions, self.followers
            )
        };
        row(
            "setup",
            format!(
                "{setup}, interval {} ms, payload {} B, deflate {}",
                self.interval_ms,
                self.payload_bytes,
                if self.deflate_offered {
                    "offered"
                } else {
                    "off"
                }
            ),
        );
        row(
            "connections",
            format!(
                "{} attempted, {} made, {} failed ({} refused by the server), {} closed by server",
                self.connections_attempted,
                self.connections_made,
                self.connections_failed,
                self.joins_refused,
                self.connections_closed_by_server
            ),
        );
        for (error, n) in &self.connect_errors {
            row("  connect error", format!("{n} x {error}"));
        }
        for (reason, n) in &self.close_reasons {
            row("  closed", format!("{n} x {reason}"));
        }
        row(
            "connect + join",
            format!(
                "{:.2} s total; per connection p50 {} p99 {} max {}",
                self.connect_time_s,
                opt(self.join_time_p50_ms, " ms"),
                opt(self.join_time_p99_ms, " ms"),
                opt(self.join_time_max_ms, " ms")
            ),
        );
        if self.deflate_offered {
            row(
                "deflate agreed",
                format!("{} connections", self.deflate_agreed),
            );
        }
        if self.mode != "idle" {
            row(
                "window",
                format!(
                    "{:.2} s (then {:.2} s drain)",
                    self.window_s, self.drain_used_s
                ),
            );
        } else {
            row("window", format!("{:.2} s", self.window_s));
        }
        if self.mode != "idle" {
            row(
                "pushes sent",
                format!(
                    "{} in window ({:.0}/s, target {:.0}/s), {} in all",
                    self.pushes_sent, self.push_rate, self.push_rate_target, self.pushes_sent_total
                ),
            );
            row(
                "deliveries",
                format!(
                    "{} expected, {} received, {} lost ({:.2}%; lost = not arrived by the end of the drain)",
                    self.deliveries_expected,
                    self.deliveries_received,
                    self.deliveries_lost,
                    self.loss_pct
                ),
            );
            row("deliveries/s", format!("{:.0}", self.deliveries_per_sec));
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
                "integrity",
                format!(
                    "{} seq gaps, {} out of order, {} misrouted, {} corrupted",
                    self.seq_gaps, self.out_of_order, self.misrouted, self.corrupted
                ),
            );
            row(
                "received compressed",
                format!("{} messages", self.messages_received_compressed),
            );
        }
        row(
            "other messages",
            format!(
                "{} sessionstate, {} servermsg, {} unrecognised",
                self.session_states_received, self.server_messages, self.other_messages
            ),
        );
        if let Some(m) = &self.first_server_message {
            row("  first servermsg", m.clone());
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
            if self.mode == "idle" {
                row(
                    "server RSS after join",
                    opt(self.server_rss_joined_mib, " MiB"),
                );
                row(
                    "server RSS/connection",
                    opt(self.server_rss_per_connection_kib, " KiB"),
                );
            }
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
    use supersynk_client::text_message;

    #[test]
    fn tail_round_trip() {
        let mut push = push_body(7, 350);
        let body_len = push.len();
        push.push_str(",\"ts\":123456,\"seq\":42}");
        assert_eq!(parse_tail(push.as_bytes()), Some((123456, 42, body_len)));
        assert!(serde_json::from_str::<serde_json::Value>(&push).is_ok());
        assert!((330..=380).contains(&push.len()), "{}", push.len());
        assert_eq!(
            parse_tail(br#"{"type":"sessionstate","leaderConnected":true,"playersCount":3}"#),
            None
        );
        assert_eq!(parse_tail(b"}"), None);
        assert_eq!(parse_tail(b""), None);
    }

    #[test]
    fn payload_sizes() {
        for target in [0, 50, 350, 1000, 4000, 16000] {
            let body = push_body(12, target);
            let v: serde_json::Value =
                serde_json::from_str(&format!("{body},\"ts\":1,\"seq\":1}}")).unwrap();
            assert!(v["data"].is_array());
            assert!(
                body.len() + 27 >= target && body.len() + 27 < target.max(100) + 40,
                "{target}"
            );
        }
    }

    #[test]
    fn compression_matches_the_plugin() {
        for size in [10, 350, 5000] {
            let text = push_body(3, size);
            for _ in 0..2 {
                let (Message::Frame(ours), Message::Frame(theirs)) =
                    (compressed_text(text.as_bytes()), text_message(&text, true))
                else {
                    panic!("frames expected");
                };
                assert_eq!(ours.payload(), theirs.payload());
                assert!(ours.header().rsv1);
            }
        }
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("ws://127.0.0.1:5001/connect").unwrap(),
            ("127.0.0.1:5001".into(), "/connect".into())
        );
        assert_eq!(
            parse_url("ws://localhost").unwrap(),
            ("localhost:80".into(), "/connect".into())
        );
        assert_eq!(
            parse_url("[::1]:9/x").unwrap(),
            ("[::1]:9".into(), "/x".into())
        );
        assert!(parse_url("wss://h/connect").is_err());
    }
}
