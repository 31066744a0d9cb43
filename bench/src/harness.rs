//! The one harness every scenario runs in: the state every connection task shares
//! ([`Harness`]), the run loop ([`run`]: connect everyone, publish the [`Plan`], measure the
//! window, wait for what is still in flight, stop) and the report ([`Report`]: what every
//! scenario measures the same way, and the scenario's own [`Scenario::Figures`] flattened
//! into it). A scenario ([`crate::hunterpie`], [`crate::http`], [`crate::reliable`]) only
//! says what one connection does and what its accounts add up to.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{Semaphore, SemaphorePermit, mpsc, watch};
use tokio::time::{Interval, MissedTickBehavior, interval_at, sleep_until};

use crate::system::{clock_ticks_per_second, ensure_fd_limit, read_cpu_ticks, read_status_kib};
use crate::{Args, MissedTicks};

/// Highest latency the histograms hold (1 hour, in µs); anything above is clamped.
const MAX_LATENCY_US: u64 = 3_600_000_000;
/// Latency histogram shards; connection `index` flushes its batch into shard `index % SHARDS`.
const SHARDS: usize = 32;
/// Latencies a connection collects before it takes a shard's lock.
const BATCH: usize = 128;

/// A scenario: what one connection does, and what the accounts of all add up to.
pub(crate) trait Scenario: Send + Sync + Sized + 'static {
    /// One connection's account, returned when its task ends.
    type Conn: Account + Send + 'static;
    /// What the scenario adds to the report (flattened into its JSON object).
    type Figures: Serialize;
    /// The report's `mode`.
    fn mode(&self) -> &'static str;
    /// What the connections do in the window, for the progress line ("pushing").
    fn verb(&self) -> &'static str;
    /// Connections in all.
    fn connections(&self) -> usize;
    /// The report's setup line.
    fn setup(&self) -> String;
    /// One connection, from connecting to the end of the run. It calls [`Harness::ready`]
    /// once, when it has joined or failed to, and stops at [`Harness::stopped`].
    fn connection(
        self: Arc<Self>,
        h: Arc<Harness>,
        index: usize,
    ) -> impl Future<Output = Self::Conn> + Send;
    /// The figures of the connections that were made; warnings go to `warnings`.
    fn figures(
        &self,
        run: &RunFacts,
        made: &[&Self::Conn],
        warnings: &mut Vec<String>,
    ) -> Self::Figures;
    /// The figures' lines of the table (`row(name, value)`), between the window and the latency.
    fn rows(figures: &Self::Figures, row: &mut dyn FnMut(&str, String));
}

/// What the harness reads of a connection's account.
pub(crate) trait Account {
    /// Why it never joined (connected, for HTTP), if it did not.
    fn connect_error(&self) -> Option<&str>;
    /// Why the server ended it before the run was over.
    fn closed(&self) -> Option<&str>;
}

/// When connections start and which of their messages are measured; published once
/// everyone has joined.
#[derive(Debug)]
pub(crate) struct Plan {
    /// Connections start here (each with its own offset within one interval).
    pub start: tokio::time::Instant,
    /// The measurement window, in µs since [`Harness::epoch`]: a message counts if
    /// `window_start_us <= ts < window_end_us`.
    pub window_start_us: u64,
    pub window_end_us: u64,
}

impl Plan {
    pub fn measures(&self, ts: u64) -> bool {
        ts >= self.window_start_us && ts < self.window_end_us
    }
}

/// What every connection task shares.
pub(crate) struct Harness {
    pub args: Args,
    /// The clock of every timestamp: one process, so senders and receivers share it exactly.
    pub epoch: Instant,
    /// Connections connecting and joining at once (`--connect-concurrency`).
    connect_slots: Semaphore,
    /// Joined (true) or failed, once per connection, to the run loop. Unbounded: at most
    /// one message per connection.
    events_tx: mpsc::UnboundedSender<bool>,
    plan_rx: watch::Receiver<Option<Arc<Plan>>>,
    /// Set once, at the end of the run: every task stops and closes.
    stop_rx: watch::Receiver<bool>,
    /// Latency histograms (µs), sharded so connections rarely meet on a lock (see
    /// [`Latencies`]); merged at the end.
    latency: Vec<Mutex<Histogram<u64>>>,
    /// Time from connect to joined (µs); locked once per connection.
    join_time: Mutex<Histogram<u64>>,
    /// Whether the EMFILE advice was printed already.
    emfile_reported: AtomicBool,
    /// Measured messages expected and those arrived (or requests sent and finished), so
    /// far: the drain ends once they meet.
    pub expected: AtomicU64,
    pub delivered: AtomicU64,
}

/// An empty latency histogram (1 µs to an hour, 3 digits).
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// Histograms sharded as the harness's latencies, for a scenario's other figures.
pub(crate) fn shards() -> Vec<Mutex<Histogram<u64>>> {
    (0..SHARDS).map(|_| Mutex::new(histogram())).collect()
}

/// The shards, merged.
pub(crate) fn merged(shards: &[Mutex<Histogram<u64>>]) -> Histogram<u64> {
    let mut all = histogram();
    for shard in shards {
        let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
        all.add(&*shard).expect("same bounds");
    }
    all
}

impl Harness {
    /// A connect slot (`--connect-concurrency`), held from connect until joined.
    pub async fn slot(&self) -> Result<SemaphorePermit<'_>, String> {
        self.connect_slots
            .acquire()
            .await
            .map_err(|_| "cancelled".to_owned())
    }

    /// Reports that this connection joined (`true`) or failed to; once per connection.
    pub fn ready(&self, joined: bool) {
        // The run loop holds the receiver until every connection has reported.
        let _ = self.events_tx.send(joined);
    }

    /// Records how long joining took since `started`.
    pub fn record_join(&self, started: Instant) {
        let micros = (started.elapsed().as_micros() as u64).max(1);
        self.join_time
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .saturating_record(micros);
    }

    /// Resolves with the plan once published (`None` if the run ended first).
    pub fn plan(&self) -> impl Future<Output = Option<Arc<Plan>>> + Send + 'static {
        let mut rx = self.plan_rx.clone();
        async move {
            rx.wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|p| (*p).clone())
        }
    }

    /// Resolves at the end of the run.
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.stop_rx.clone();
        // Stop on the signal, or if the sender is gone (the run is over either way).
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    /// The ticks of a connection that sends every `--interval-ms` from the plan's start,
    /// offset by `fraction` of one interval (so connections do not all send at once), with
    /// `--missed-ticks`.
    pub fn pacer(&self, plan: &Plan, fraction: f64) -> Interval {
        let period = Duration::from_secs_f64(self.args.interval_ms() / 1000.0);
        let mut i = interval_at(plan.start + period.mul_f64(fraction), period);
        i.set_missed_tick_behavior(match self.args.missed_ticks {
            MissedTicks::Delay => MissedTickBehavior::Delay,
            MissedTicks::Burst => MissedTickBehavior::Burst,
        });
        i
    }

    /// Now, in µs since the epoch.
    pub fn now_us(&self) -> u64 {
        micros_since(self.epoch, Instant::now())
    }

    /// Connection `index`'s latency batch.
    pub fn latencies(&self, index: usize) -> Latencies<'_> {
        Latencies::new(&self.latency[index % SHARDS])
    }

    /// A short, countable description of a connect or socket failure; prints the EMFILE
    /// advice once.
    pub fn describe_io(&self, io: &std::io::Error) -> String {
        match io.raw_os_error() {
            Some(24) => {
                if !self.emfile_reported.swap(true, Ordering::Relaxed) {
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
}

/// Values (µs) a connection collects before it takes its shard's `std::sync::Mutex`, once
/// per [`BATCH`], never across `.await`; the rest on drop.
pub(crate) struct Latencies<'a> {
    shard: &'a Mutex<Histogram<u64>>,
    batch: Vec<u32>,
}

impl<'a> Latencies<'a> {
    pub fn new(shard: &'a Mutex<Histogram<u64>>) -> Self {
        Latencies {
            shard,
            batch: Vec::new(),
        }
    }

    /// A shard of `shards` for connection `index`.
    pub fn of(shards: &'a [Mutex<Histogram<u64>>], index: usize) -> Self {
        Self::new(&shards[index % SHARDS])
    }

    pub fn record(&mut self, micros: u64) {
        if self.batch.capacity() == 0 {
            self.batch.reserve_exact(BATCH);
        }
        self.batch.push(micros.clamp(1, u64::from(u32::MAX)) as u32);
        if self.batch.len() >= BATCH {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let mut histogram = self.shard.lock().unwrap_or_else(|e| e.into_inner());
        for &v in &self.batch {
            histogram.saturating_record(u64::from(v));
        }
        drop(histogram);
        self.batch.clear();
    }
}

impl Drop for Latencies<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

pub(crate) fn micros_since(epoch: Instant, t: Instant) -> u64 {
    t.saturating_duration_since(epoch).as_micros() as u64
}

/// A pending future for a disabled timer, so `select!` branches can share one shape.
pub(crate) async fn tick(interval: &mut Option<Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
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
        (self.secs > 0.0).then(|| round2(b.saturating_sub(a) as f64 / clk_tck / self.secs * 100.0))
    }
}

/// What the run loop knows when the scenario adds up its figures.
pub(crate) struct RunFacts<'a> {
    pub args: &'a Args,
    /// Length of the measurement window in seconds (0 when nothing was measured).
    pub window_s: f64,
    /// Measured messages expected by the end ([`Harness::expected`]).
    pub expected: u64,
}

impl RunFacts<'_> {
    /// `n` per second of the window.
    pub fn per_sec(&self, n: u64) -> f64 {
        if self.window_s > 0.0 {
            round2(n as f64 / self.window_s)
        } else {
            0.0
        }
    }
}

/// Runs `scenario` to its end and reports.
pub(crate) async fn run<S: Scenario>(
    scenario: S,
    args: Args,
    threads: usize,
) -> anyhow::Result<Report<S::Figures>> {
    let total = scenario.connections();
    let fd_note = ensure_fd_limit(total as u64 + 64);
    if let Some(note) = &fd_note {
        eprintln!("warning: {note}");
    }
    let server_pid = args.server_pid.map(|p| p.to_string());
    let server_pid = server_pid.as_deref();
    let clk_tck = clock_ticks_per_second();
    let server_rss_before = server_pid.and_then(|p| read_status_kib(p, "VmRSS:"));

    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    let (plan_tx, plan_rx) = watch::channel(None);
    let (stop_tx, stop_rx) = watch::channel(false);
    let h = Arc::new(Harness {
        args: args.clone(),
        epoch: Instant::now(),
        connect_slots: Semaphore::new(args.connect_concurrency.max(1)),
        events_tx,
        plan_rx,
        stop_rx,
        latency: shards(),
        join_time: Mutex::new(histogram()),
        emfile_reported: AtomicBool::new(false),
        expected: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
    });
    let scenario = Arc::new(scenario);

    // Connect and join everyone, `connect_concurrency` at a time, in order.
    let connect_started = Instant::now();
    let tasks: Vec<_> = (0..total)
        .map(|index| tokio::spawn(scenario.clone().connection(h.clone(), index)))
        .collect();
    let (mut joined, mut failed) = (0usize, 0usize);
    let mut progress = tokio::time::interval(Duration::from_secs(1));
    progress.tick().await;
    while joined + failed < total {
        tokio::select! {
            event = events_rx.recv() => match event {
                Some(true) => joined += 1,
                Some(false) => failed += 1,
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
        server_rss_joined = server_pid.and_then(|p| read_status_kib(p, "VmRSS:"));
        window.begin(server_pid);
        eprintln!(
            "holding {joined} silent connections for {} s",
            args.duration_s
        );
        tokio::time::sleep(Duration::from_secs_f64(args.duration_s)).await;
        window.end(server_pid);
    } else {
        let now = tokio::time::Instant::now();
        let start = now + Duration::from_millis(100);
        let window_start = start + Duration::from_secs_f64(args.warmup_s);
        let window_end = window_start + Duration::from_secs_f64(args.duration_s);
        let micros = |t: tokio::time::Instant| micros_since(h.epoch, t.into_std());
        plan_tx.send_replace(Some(Arc::new(Plan {
            start,
            window_start_us: micros(window_start),
            window_end_us: micros(window_end),
        })));
        eprintln!(
            "{}: {} s warm-up, {} s measured, {} s drain",
            scenario.verb(),
            args.warmup_s,
            args.duration_s,
            args.drain_s
        );
        sleep_until(window_start).await;
        window.begin(server_pid);
        sleep_until(window_end).await;
        window.end(server_pid);
        // Wait for what is still in flight: until all arrived, at most --drain-s.
        let drain_end = window_end + Duration::from_secs_f64(args.drain_s);
        let mut poll = interval_at(
            window_end + Duration::from_millis(20),
            Duration::from_millis(20),
        );
        loop {
            let at = poll.tick().await;
            let expected = h.expected.load(Ordering::Relaxed);
            if h.delivered.load(Ordering::Relaxed) >= expected || at >= drain_end {
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
            Err(e) => eprintln!("a connection task failed: {e}"),
        }
    }

    let made: Vec<&S::Conn> = results
        .iter()
        .filter(|r| r.connect_error().is_none())
        .collect();
    let mut connect_errors = BTreeMap::new();
    for e in results.iter().filter_map(|r| r.connect_error()) {
        *connect_errors.entry(e.to_owned()).or_insert(0) += 1;
    }
    let mut close_reasons = BTreeMap::new();
    for reason in made.iter().filter_map(|r| r.closed()) {
        *close_reasons.entry(reason.to_owned()).or_insert(0) += 1;
    }
    let closed = made.iter().filter(|r| r.closed().is_some()).count();
    let mut warnings = Vec::new();
    if let Some(note) = fd_note {
        warnings.push(note);
    }
    let bench_cpu = window.cpu_pct(window.self_ticks, clk_tck);
    if let Some(cpu) = bench_cpu
        && cpu > 85.0 * threads as f64
    {
        warnings.push(format!(
            "the load generator used {cpu:.0}% CPU of {threads} threads: it may be the bottleneck"
        ));
    }
    if closed > 0 {
        warnings.push(format!(
            "{closed} connections were closed by the server during the run"
        ));
    }
    let facts = RunFacts {
        args: &args,
        window_s: window.secs,
        expected: h.expected.load(Ordering::Relaxed),
    };
    let figures = scenario.figures(&facts, &made, &mut warnings);
    let latency = merged(&h.latency);
    let join_time = h
        .join_time
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let per_connection = match (server_rss_before, window.server_rss_kib) {
        (Some(before), Some(after)) if args.idle && !made.is_empty() => {
            Some(round2((after as f64 - before as f64) / made.len() as f64))
        }
        _ => None,
    };
    Ok(Report {
        mode: if args.idle { "idle" } else { scenario.mode() },
        url: args.url().to_owned(),
        follower_url: args.follower_url.clone(),
        setup: scenario.setup(),
        interval_ms: args.interval_ms(),
        duration_s: args.duration_s,
        warmup_s: args.warmup_s,
        drain_s: args.drain_s,
        drain_used_s: round2(drain_secs),
        missed_ticks: args.missed_ticks,
        threads,
        connections_attempted: total,
        connections_made: made.len(),
        connections_failed: total - made.len(),
        joins_refused: results
            .iter()
            .filter_map(|r| r.connect_error())
            .filter(|e| is_refusal(e))
            .count(),
        connect_errors,
        connect_time_s: round2(connect_secs),
        join_time_p50_ms: quantile_ms(&join_time, 0.5),
        join_time_p99_ms: quantile_ms(&join_time, 0.99),
        join_time_max_ms: quantile_ms(&join_time, 1.0),
        connections_closed_by_server: closed,
        close_reasons,
        window_s: round2(window.secs),
        latency: Quantiles::of(&latency),
        figures,
        server_pid: server_pid.map(str::to_owned),
        server_rss_before_mib: mib(server_rss_before),
        server_rss_joined_mib: mib(server_rss_joined),
        server_rss_mib: mib(window.server_rss_kib),
        server_rss_peak_mib: mib(window.server_hwm_kib),
        server_cpu_pct: window.cpu_pct(window.server_ticks, clk_tck),
        server_rss_per_connection_kib: per_connection,
        bench_cpu_pct: bench_cpu,
        bench_rss_mib: mib(window.self_rss_kib),
        bench_rss_peak_mib: mib(window.self_hwm_kib),
        warnings,
    })
}

/// Whether a connect error is the server's refusal (see [`Report::joins_refused`]):
/// scenarios describe them as `refused: ...` or `handshake refused: ...`.
pub(crate) fn is_refusal(error: &str) -> bool {
    error.starts_with("refused: ") || error.starts_with("handshake refused: ")
}

/// Percentiles of the latency histogram (µs), in ms: `latency_p50_ms`... in the report.
#[derive(Debug, Serialize)]
pub(crate) struct Quantiles {
    #[serde(rename = "latency_p50_ms")]
    pub p50_ms: Option<f64>,
    #[serde(rename = "latency_p90_ms")]
    pub p90_ms: Option<f64>,
    #[serde(rename = "latency_p99_ms")]
    pub p99_ms: Option<f64>,
    #[serde(rename = "latency_p999_ms")]
    pub p999_ms: Option<f64>,
    #[serde(rename = "latency_max_ms")]
    pub max_ms: Option<f64>,
    #[serde(rename = "latency_mean_ms")]
    pub mean_ms: Option<f64>,
}

impl Quantiles {
    pub fn of(h: &Histogram<u64>) -> Quantiles {
        Quantiles {
            p50_ms: quantile_ms(h, 0.5),
            p90_ms: quantile_ms(h, 0.9),
            p99_ms: quantile_ms(h, 0.99),
            p999_ms: quantile_ms(h, 0.999),
            max_ms: (!h.is_empty()).then(|| round2(h.max() as f64 / 1000.0)),
            mean_ms: (!h.is_empty()).then(|| round2(h.mean() / 1000.0)),
        }
    }

    /// `p50 .. p90 .. p99 .. p99.9 .. max .. (mean ..)`.
    pub fn line(&self) -> String {
        format!(
            "p50 {} p90 {} p99 {} p99.9 {} max {} (mean {})",
            opt(self.p50_ms, " ms"),
            opt(self.p90_ms, " ms"),
            opt(self.p99_ms, " ms"),
            opt(self.p999_ms, " ms"),
            opt(self.max_ms, " ms"),
            opt(self.mean_ms, " ms")
        )
    }
}

/// Everything a run found; printed as a table or, with `--json`, as one object.
#[derive(Debug, Serialize)]
pub(crate) struct Report<F> {
    pub mode: &'static str,
    pub url: String,
    /// Where followers connected, when not `url`.
    pub follower_url: Option<String>,
    pub setup: String,
    pub interval_ms: f64,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub drain_s: f64,
    pub drain_used_s: f64,
    pub missed_ticks: MissedTicks,
    pub threads: usize,
    pub connections_attempted: usize,
    pub connections_made: usize,
    pub connections_failed: usize,
    /// Failed connections the server refused (a handshake answered with an error status,
    /// a join answered with a refusal), as opposed to errors and timeouts.
    pub joins_refused: usize,
    pub connect_errors: BTreeMap<String, usize>,
    pub connect_time_s: f64,
    pub join_time_p50_ms: Option<f64>,
    pub join_time_p99_ms: Option<f64>,
    pub join_time_max_ms: Option<f64>,
    pub connections_closed_by_server: usize,
    pub close_reasons: BTreeMap<String, usize>,
    pub window_s: f64,
    /// Latency of what was measured (a delivery, an answer), `latency_p50_ms`...
    #[serde(flatten)]
    pub latency: Quantiles,
    #[serde(flatten)]
    pub figures: F,
    pub server_pid: Option<String>,
    pub server_rss_before_mib: Option<f64>,
    pub server_rss_joined_mib: Option<f64>,
    pub server_rss_mib: Option<f64>,
    pub server_rss_peak_mib: Option<f64>,
    pub server_cpu_pct: Option<f64>,
    pub server_rss_per_connection_kib: Option<f64>,
    pub bench_cpu_pct: Option<f64>,
    pub bench_rss_mib: Option<f64>,
    pub bench_rss_peak_mib: Option<f64>,
    pub warnings: Vec<String>,
}

/// A scenario's lines of the table ([`Scenario::rows`]).
pub(crate) type Rows<F> = fn(&F, &mut dyn FnMut(&str, String));

impl<F> Report<F> {
    /// The report as a table, the scenario's lines (`rows`) after the window's.
    pub fn table(&self, rows: Rows<F>) -> String {
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
        row("setup", self.setup.clone());
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
        if self.mode == "idle" {
            row("window", format!("{:.2} s", self.window_s));
        } else {
            row(
                "window",
                format!(
                    "{:.2} s (then {:.2} s drain)",
                    self.window_s, self.drain_used_s
                ),
            );
        }
        rows(&self.figures, &mut row);
        if self.mode != "idle" {
            row("latency", self.latency.line());
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

/// `v` with two decimals and `unit`, or `-`.
pub(crate) fn opt(v: Option<f64>, unit: &str) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.2}{unit}"))
}

pub(crate) fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn mib(kib: Option<u64>) -> Option<f64> {
    kib.map(|k| round2(k as f64 / 1024.0))
}

pub(crate) fn quantile_ms(h: &Histogram<u64>, q: f64) -> Option<f64> {
    (!h.is_empty()).then(|| round2(h.value_at_quantile(q) as f64 / 1000.0))
}
