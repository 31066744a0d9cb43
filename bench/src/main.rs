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
//! Every scenario runs in one harness ([`harness`]: the shared state, the run loop, the
//! report) behind the small [`harness::Scenario`] trait: [`hunterpie`] (the default),
//! [`http`] and [`reliable`].
//!
//! `--http-channels` loads the HTTP channel API instead (protocol/channels.md, module
//! [`http`], over hyper's client): `--sessions` channels of `--followers + 1` clients, each posting its state every
//! `--interval-ms` over its own keep-alive connection.
//!
//! `--reliable` loads the reliable protocol instead (protocol/reliable.md, module
//! [`reliable`]): `--sessions` rooms of `--followers + 1` clients, every client publishing to
//! its room every `--interval-ms` and acknowledging what it receives.
//!
//! Example: `supersynk-bench --url ws://127.0.0.1:5001/connect --sessions 2500 --followers 3
//! --interval-ms 30 --duration-s 20 --server-pid $(pgrep -x supersynk)`
#![forbid(unsafe_code)]

mod harness;
mod http;
mod hunterpie;
mod reliable;
mod system;

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use serde::Serialize;

use crate::harness::Scenario;
use crate::system::read_cpu_ticks;

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
    runtime.block_on(async {
        if args.http_channels {
            report(http::Http::new(&args).await?, args, threads).await
        } else if args.reliable {
            report(reliable::Reliable::new(&args).await?, args, threads).await
        } else {
            report(hunterpie::HunterPie::new(&args).await?, args, threads).await
        }
    })
}

/// Runs `scenario` and prints its report (`--json`: one object, else a table).
async fn report<S: Scenario>(scenario: S, args: Args, threads: usize) -> anyhow::Result<()> {
    let json = args.json;
    let report = harness::run(scenario, args, threads).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table(S::rows));
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

#[cfg(test)]
mod tests {
    use super::*;

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
