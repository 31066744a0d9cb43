//! `--http-channels`: load on the HTTP channel API (protocol/channels.md).
//!
//! `--sessions` channels of `--followers + 1` clients. Every client is one task with its own
//! persistent HTTP/1.1 keep-alive connection (hyper's client connection, `TCP_NODELAY`: one
//! request in flight) and posts its state, a ~200-byte JSON object (client_id, position,
//! rotation quaternion, timestamp), to `POST /api/channels/bench-<channel>` every
//! `--interval-ms`, with `Client-Id` and `Client-Time` headers. Clients start spread evenly
//! over one interval.
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
use std::pin::pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONNECTION, CONTENT_TYPE, HOST};
use hyper::{Request, Version};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::time::{Interval, timeout};

use crate::harness::{
    Account, Harness, Latencies, Plan, RunFacts, Scenario, merged, micros_since, opt, quantile_ms,
    round2, shards, tick,
};
use crate::{Args, split_authority};

/// Largest answer body accepted.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// One client's connection: hyper's HTTP/1.1 client, one request at a time.
type Conn = SendRequest<Full<Bytes>>;

/// The scenario: where clients post, and the ages of the peer states they get.
pub(crate) struct Http {
    addr: SocketAddr,
    /// The `Host` header.
    host: String,
    /// Prepended to `/api/channels/...` (empty, or a reverse proxy's prefix).
    prefix: String,
    channels: usize,
    per_channel: usize,
    /// For connecting and for each request's full answer (`--connect-timeout-s`).
    request_timeout: Duration,
    /// Wall clock at the harness's epoch (about), in seconds since 1970: `Client-Time` and
    /// the bodies' `timestamp` are `unix_at_epoch + elapsed`, so a second run against the
    /// same server within a minute is not answered 204 (the server remembers each
    /// `Client-Id`'s last time for 60 s).
    unix_at_epoch: f64,
    /// Age of every peer state in a measured 200 answer (µs): now - its `timestamp`.
    age: Vec<Mutex<Histogram<u64>>>,
    setup: String,
}

impl Http {
    pub(crate) async fn new(args: &Args) -> anyhow::Result<Http> {
        let (authority, prefix) = parse_http_url(args.url())?;
        let addr = tokio::net::lookup_host(&authority)
            .await
            .with_context(|| format!("cannot resolve {authority}"))?
            .next()
            .with_context(|| format!("{authority} resolves to no address"))?;
        let unix_at_epoch = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let mut body = String::new();
        state_body(&mut body, "bench-0-0", 1234, 0.0, unix_at_epoch + 100.0);
        Ok(Http {
            addr,
            host: authority,
            prefix,
            channels: args.sessions,
            per_channel: args.followers + 1,
            request_timeout: Duration::from_secs_f64(args.connect_timeout_s),
            unix_at_epoch,
            age: shards(),
            setup: format!(
                "{} channels x {} clients, a post every {} ms, body {} B, one keep-alive connection each",
                args.sessions,
                args.followers + 1,
                args.interval_ms(),
                body.len()
            ),
        })
    }

    /// Opens one connection (within the request timeout), `TCP_NODELAY` as a game client
    /// would: small requests must leave at once, Nagle would hold them behind the previous
    /// answer's ACK.
    async fn connect(&self, h: &Harness) -> Result<Conn, String> {
        let tcp = match timeout(self.request_timeout, TcpStream::connect(self.addr)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(format!("connect: {}", h.describe_io(&e))),
            Err(_) => return Err("connect: timed out".into()),
        };
        tcp.set_nodelay(true)
            .map_err(|e| format!("set_nodelay: {}", h.describe_io(&e)))?;
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .title_case_headers(true)
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("connect: {}", hyper_kind(&e)))?;
        // The connection's I/O; it ends with the connection (closed, or the sender dropped).
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }
}

/// A complete answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// The server closes the connection after this answer.
    close: bool,
    server_time: Option<f64>,
    body: Bytes,
}

/// Sends one request and reads its whole answer. `Err` is a short, countable description;
/// the connection cannot be used after one.
async fn exchange(conn: &mut Conn, request: Request<Full<Bytes>>) -> Result<Answer, String> {
    conn.ready().await.map_err(|e| hyper_kind(&e))?;
    let response = conn
        .send_request(request)
        .await
        .map_err(|e| hyper_kind(&e))?;
    let (head, body) = response.into_parts();
    let body = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| match e.downcast::<hyper::Error>() {
            Ok(e) => hyper_kind(&e),
            Err(e) => format!("answer body: {e}"),
        })?
        .to_bytes();
    let tokens = |name| {
        head.headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .collect::<Vec<_>>()
    };
    let connection = tokens(CONNECTION);
    // HTTP/1.0 closes unless it says keep-alive.
    let close = connection.iter().any(|t| t == "close")
        || (head.version == Version::HTTP_10 && !connection.iter().any(|t| t == "keep-alive"));
    let server_time = head
        .headers
        .get("server-time")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|t| t.is_finite());
    Ok(Answer {
        status: head.status.as_u16(),
        close,
        server_time,
        body,
    })
}

/// A countable name for a failed exchange.
fn hyper_kind(e: &hyper::Error) -> String {
    let io = std::error::Error::source(e).and_then(|s| s.downcast_ref::<std::io::Error>());
    if let Some(io) = io {
        format!("i/o: {}", io_kind(io))
    } else if e.is_incomplete_message() {
        "closed by the server before the end of the answer".into()
    } else if e.is_parse() {
        format!("malformed answer: {e}")
    } else if e.is_closed() || e.is_canceled() {
        "connection closed".into()
    } else {
        e.to_string()
    }
}

impl Account for ClientResult {
    fn connect_error(&self) -> Option<&str> {
        self.connect_error.as_deref()
    }

    fn closed(&self) -> Option<&str> {
        None
    }
}

impl Scenario for Http {
    type Conn = ClientResult;
    type Figures = HttpFigures;

    fn mode(&self) -> &'static str {
        "http-channels"
    }

    fn verb(&self) -> &'static str {
        "posting"
    }

    fn connections(&self) -> usize {
        self.channels * self.per_channel
    }

    fn setup(&self) -> String {
        self.setup.clone()
    }

    async fn connection(self: Arc<Self>, h: Arc<Harness>, index: usize) -> ClientResult {
        client(&self, &h, index).await
    }

    fn figures(
        &self,
        run: &RunFacts,
        made: &[&ClientResult],
        warnings: &mut Vec<String>,
    ) -> HttpFigures {
        HttpFigures::of(self, run, made, warnings)
    }

    fn rows(figures: &HttpFigures, row: &mut dyn FnMut(&str, String)) {
        figures.rows(row);
    }
}

/// One client, from connecting to the end of the run.
async fn client(scenario: &Http, h: &Harness, index: usize) -> ClientResult {
    let args = &h.args;
    let per_channel = scenario.per_channel;
    let channel = index / per_channel;
    let id = format!("bench-{channel}-{}", index % per_channel);
    let channel_prefix = format!("bench-{channel}-");
    let path = format!("{}/api/channels/bench-{channel}", scenario.prefix);
    let mut result = ClientResult::default();

    let first = match h.slot().await {
        Ok(_slot) => scenario.connect(h).await,
        Err(e) => Err(e),
    };
    let mut conn = match first {
        Ok(conn) => {
            h.ready(true);
            Some(conn)
        }
        Err(e) => {
            h.ready(false);
            result.connect_error = Some(e);
            return result;
        }
    };

    let mut stop = pin!(h.stopped());
    let mut plan_wait = pin!(h.plan());
    let mut plan: Option<Arc<Plan>> = None;
    let mut ticker: Option<Interval> = None;
    let mut latencies = h.latencies(index);
    let mut ages = Latencies::of(&scenario.age, index);
    let mut body = String::with_capacity(256);
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
                ticker = Some(h.pacer(&p, index as f64 / scenario.connections() as f64));
                plan = Some(p);
            }
            _ = tick(&mut ticker), if ticker.is_some() => {
                let Some(plan) = &plan else { continue };
                let started = Instant::now();
                let ts = micros_since(h.epoch, started);
                if ts >= plan.window_end_us {
                    // Posting stops with the window, so the drain sees the backlog clear.
                    ticker = None;
                    continue;
                }
                let in_window = ts >= plan.window_start_us;
                if in_window {
                    result.sent_in_window += 1;
                    h.expected.fetch_add(1, Ordering::Relaxed);
                }
                result.sent_total += 1;
                let time_s = scenario.unix_at_epoch + ts as f64 / 1e6;
                state_body(&mut body, &id, seq, phase, time_s);
                seq += 1;
                let request = Request::post(path.as_str())
                    .header(HOST, scenario.host.as_str())
                    .header(CONTENT_TYPE, "application/json")
                    .header("Client-Id", id.as_str())
                    .header("Client-Time", format!("{time_s:.6}"))
                    .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
                    .expect("a valid request");
                // A connection the server closed since (idle, or after an error) is replaced.
                if conn.as_ref().is_some_and(|c| c.is_closed()) {
                    conn = None;
                }
                let reconnect = conn.is_none();
                let attempt = async {
                    let mut c = match conn.take() {
                        Some(c) => c,
                        None => scenario.connect(h).await?,
                    };
                    let answer = exchange(&mut c, request).await;
                    // Kept for the next request unless this one failed or was the last.
                    if answer.as_ref().is_ok_and(|a| !a.close) {
                        conn = Some(c);
                    }
                    answer
                };
                let outcome = tokio::select! {
                    biased;
                    // Still in flight at the end of the drain: neither answered nor failed.
                    _ = &mut stop => break,
                    r = timeout(scenario.request_timeout, attempt) => r,
                };
                result.reconnects += u64::from(reconnect);
                let outcome = outcome.unwrap_or_else(|_| Err("timed out".into()));
                let micros = micros_since(started, Instant::now());
                match outcome {
                    Ok(answer) => {
                        result.answered_total += 1;
                        result.server_closes += u64::from(answer.close);
                        let peers = check_answer(
                            &answer,
                            &id,
                            &channel_prefix,
                            &mut last_server_time,
                            &mut result,
                        );
                        if in_window {
                            latencies.record(micros);
                            match answer.status {
                                200 => {
                                    result.status_200 += 1;
                                    if let Some((peers, times)) = &peers {
                                        result.peers_seen += *peers as u64;
                                        if *peers < args.followers {
                                            result.incomplete_answers += 1;
                                        }
                                        let now_s = time_s + micros as f64 / 1e6;
                                        for &t in times {
                                            ages.record(((now_s - t).max(0.0) * 1e6) as u64);
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
                    h.delivered.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    result
}

/// One client's account, returned when its task ends.
#[derive(Debug, Default)]
pub(crate) struct ClientResult {
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

/// Checks an answer: for a 200, `Server-Time` and the body; records what is wrong in
/// `result`. For a valid 200 answer, returns how many peer states it holds and their
/// `timestamp`s.
fn check_answer(
    answer: &Answer,
    own_id: &str,
    channel_prefix: &str,
    last_server_time: &mut f64,
    result: &mut ClientResult,
) -> Option<(usize, Vec<f64>)> {
    let body = &answer.body[..];
    let unexpected = |result: &mut ClientResult, why: &str| {
        if result.first_unexpected.is_none() {
            let start: String = String::from_utf8_lossy(body).chars().take(200).collect();
            result.first_unexpected = Some(format!("{} {why}: {start}", answer.status));
        }
    };
    match answer.status {
        200 => {}
        204 => return None,
        _ => {
            unexpected(result, "answer");
            return None;
        }
    }
    match answer.server_time {
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

/// A countable name for a socket error.
fn io_kind(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(104) => "ECONNRESET: connection reset".into(),
        Some(32) => "EPIPE: broken pipe".into(),
        _ => format!("{:?}", e.kind()),
    }
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

/// What an `--http-channels` run adds to the report.
#[derive(Debug, Serialize)]
pub(crate) struct HttpFigures {
    channels: usize,
    clients_per_channel: usize,
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
    /// How old the peer states in measured 200 answers were (now - their timestamp).
    state_age_p50_ms: Option<f64>,
    state_age_p99_ms: Option<f64>,
    state_age_max_ms: Option<f64>,
}

impl HttpFigures {
    fn of(
        scenario: &Http,
        run: &RunFacts,
        made: &[&ClientResult],
        warnings: &mut Vec<String>,
    ) -> HttpFigures {
        let mut error_kinds = BTreeMap::new();
        for r in made {
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
        let target = round2(made.len() as f64 * 1000.0 / run.args.interval_ms());
        let rate = run.per_sec(sent);
        let unanswered = sent.saturating_sub(answered + errors);
        let peers_seen = sum(|r| r.peers_seen);
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
        let age = merged(&scenario.age);
        HttpFigures {
            channels: scenario.channels,
            clients_per_channel: scenario.per_channel,
            request_rate_target: target,
            request_rate: rate,
            requests_sent: sent,
            requests_answered: answered,
            requests_per_sec: run.per_sec(answered),
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
            first_unexpected_answer: made.iter().find_map(|r| r.first_unexpected.clone()),
            state_age_p50_ms: quantile_ms(&age, 0.5),
            state_age_p99_ms: quantile_ms(&age, 0.99),
            state_age_max_ms: (!age.is_empty()).then(|| round2(age.max() as f64 / 1000.0)),
        }
    }

    fn rows(&self, row: &mut dyn FnMut(&str, String)) {
        row(
            "keep-alive",
            format!(
                "{} reconnects, {} answers with Connection: close",
                self.reconnects, self.server_closes
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

    fn answer_of(status: u16, body: &str) -> Answer {
        Answer {
            status,
            close: false,
            server_time: Some(1.0),
            body: Bytes::copy_from_slice(body.as_bytes()),
        }
    }

    #[test]
    fn answers_are_checked() {
        let check = |status, body: &str| {
            let answer = answer_of(status, body);
            let mut result = ClientResult::default();
            let mut last = 0.5;
            let times = check_answer(&answer, "bench-1-0", "bench-1-", &mut last, &mut result);
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
        let scenario = Http::new(&args).await.unwrap();
        let report = crate::harness::run(scenario, args, 2).await.unwrap();
        assert_eq!(report.connections_made, 9);
        assert!(report.latency.p50_ms.is_some());
        let table = report.table(Http::rows);
        let report = &report.figures;
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
        assert!(report.state_age_p50_ms.is_some());
        assert!(
            table.contains("200: ") && table.contains("latency"),
            "{table}"
        );
        server.shutdown().await;
    }
}
