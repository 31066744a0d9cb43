//! The HunterPie scenario (the default, protocol/hunterpie.md): `--sessions` sessions of one
//! leader and `--followers` followers that behave like the deployed plugin (SetName, then
//! SetSession, then wait for the first `sessionstate`; a join refused by a servermsg is a
//! refusal). Once every connection has joined, every leader pushes a realistic monster
//! message every `--interval-ms`; followers read continuously, check routing, order and
//! integrity of what the server relays, and record the latency of every push (`now - ts`,
//! both from one `Instant` of this process, in µs). Expected deliveries: every measured push
//! times the followers of its session that had joined. `--idle` holds the connections silent.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde::Serialize;
use supersynk_client::{ClientError, HunterClient};
use tokio::time::{Interval, MissedTickBehavior, interval_at, timeout};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{Account, Harness, Latencies, Plan, RunFacts, Scenario, round2, tick};
use crate::{Args, resolve};

/// The tail the leaders append to every push; followers parse it from the end.
const TS_KEY: &[u8] = b",\"ts\":";
const SEQ_KEY: &[u8] = b",\"seq\":";

/// The scenario: where leaders and followers connect, and how many followers joined.
pub(crate) struct HunterPie {
    addr: SocketAddr,
    path: String,
    /// Where followers connect (`--follower-url`, else the same as leaders).
    follower_addr: SocketAddr,
    follower_path: String,
    sessions: usize,
    followers: usize,
    /// Followers that joined, per session (complete before the plan is published).
    followers_joined: Vec<AtomicU32>,
    setup: String,
}

impl HunterPie {
    pub(crate) async fn new(args: &Args) -> anyhow::Result<HunterPie> {
        let (addr, path) = resolve(args.url()).await?;
        let (follower_addr, follower_path) = resolve(args.follower_url()).await?;
        Ok(HunterPie {
            addr,
            path,
            follower_addr,
            follower_path,
            sessions: args.sessions,
            followers: args.followers,
            followers_joined: (0..args.sessions).map(|_| AtomicU32::new(0)).collect(),
            setup: setup_line(args, push_body(0, args.payload_bytes).len() + 27),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Leader,
    Follower,
}

/// One connection's account: the HunterPie scenario's and the reliable one's.
#[derive(Debug, Default)]
pub(crate) struct ConnResult {
    pub session: usize,
    /// Leaders push (in the reliable scenario every member publishes and is a leader).
    pub leader: bool,
    /// Why it never joined, if it did not.
    pub connect_error: Option<String>,
    pub deflate_agreed: bool,
    /// Why the server side ended the connection before the run was over.
    pub closed: Option<String>,
    pub pushes_total: u64,
    pub pushes_in_window: u64,
    pub received_total: u64,
    pub received_in_window: u64,
    pub gaps: u64,
    pub out_of_order: u64,
    pub misrouted: u64,
    pub corrupted: u64,
    pub session_states: u64,
    pub server_msgs: u64,
    pub first_server_msg: Option<String>,
    pub other_msgs: u64,
    pub inflated: u64,
}

impl Account for ConnResult {
    fn connect_error(&self) -> Option<&str> {
        self.connect_error.as_deref()
    }

    fn closed(&self) -> Option<&str> {
        self.closed.as_deref()
    }
}

/// What the HunterPie and reliable scenarios report: pushes and their deliveries.
#[derive(Debug, Serialize)]
pub(crate) struct Deliveries {
    pub sessions: usize,
    pub followers: usize,
    pub deflate_offered: bool,
    pub payload_bytes: usize,
    pub deflate_agreed: usize,
    pub push_rate_target: f64,
    pub push_rate: f64,
    pub pushes_sent: u64,
    pub pushes_sent_total: u64,
    pub deliveries_expected: u64,
    pub deliveries_received: u64,
    pub deliveries_lost: i64,
    pub loss_pct: f64,
    pub deliveries_per_sec: f64,
    pub deliveries_received_total: u64,
    pub seq_gaps: u64,
    pub out_of_order: u64,
    pub misrouted: u64,
    pub corrupted: u64,
    pub messages_received_compressed: u64,
    pub session_states_received: u64,
    pub server_messages: u64,
    pub first_server_message: Option<String>,
    pub other_messages: u64,
    /// Whether the run was `--idle` (nothing pushed: the delivery lines are left out).
    #[serde(skip)]
    idle: bool,
}

impl Deliveries {
    /// The figures of `made`, expecting `expected` deliveries; `payload_bytes` is the size
    /// of one push.
    pub(crate) fn of(
        run: &RunFacts,
        made: &[&ConnResult],
        expected: u64,
        payload_bytes: usize,
        warnings: &mut Vec<String>,
    ) -> Deliveries {
        let args = run.args;
        let sum = |f: fn(&ConnResult) -> u64| made.iter().map(|r| f(r)).sum::<u64>();
        let received = sum(|r| r.received_in_window);
        let pushes_sent = sum(|r| r.pushes_in_window);
        let leaders = made.iter().filter(|r| r.leader).count();
        let target = if args.idle {
            0.0
        } else {
            round2(leaders as f64 * 1000.0 / args.interval_ms())
        };
        let rate = run.per_sec(pushes_sent);
        let closed = made.iter().any(|r| r.closed.is_some());
        if !closed && !args.idle && target > 0.0 && rate < target * 0.95 {
            warnings.push(format!(
                "leaders pushed {rate:.0}/s, below the target {target:.0}/s: the generator fell behind"
            ));
        }
        if args.payload_bytes > 16384 {
            warnings.push("pushes over 16384 bytes: the plugin never sends those".into());
        }
        Deliveries {
            sessions: args.sessions,
            followers: args.followers,
            deflate_offered: args.deflate,
            payload_bytes,
            deflate_agreed: made.iter().filter(|r| r.deflate_agreed).count(),
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
            deliveries_per_sec: run.per_sec(received),
            deliveries_received_total: sum(|r| r.received_total),
            seq_gaps: sum(|r| r.gaps),
            out_of_order: sum(|r| r.out_of_order),
            misrouted: sum(|r| r.misrouted),
            corrupted: sum(|r| r.corrupted),
            messages_received_compressed: sum(|r| r.inflated),
            session_states_received: sum(|r| r.session_states),
            server_messages: sum(|r| r.server_msgs),
            first_server_message: made.iter().find_map(|r| r.first_server_msg.clone()),
            other_messages: sum(|r| r.other_msgs),
            idle: args.idle,
        }
    }

    pub(crate) fn rows(&self, row: &mut dyn FnMut(&str, String)) {
        if self.deflate_offered {
            row(
                "deflate agreed",
                format!("{} connections", self.deflate_agreed),
            );
        }
        if !self.idle {
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
    }
}

impl Scenario for HunterPie {
    type Conn = ConnResult;
    type Figures = Deliveries;

    fn mode(&self) -> &'static str {
        "load"
    }

    fn verb(&self) -> &'static str {
        "pushing"
    }

    fn connections(&self) -> usize {
        self.sessions * (self.followers + 1)
    }

    fn setup(&self) -> String {
        self.setup.clone()
    }

    async fn connection(self: Arc<Self>, h: Arc<Harness>, index: usize) -> ConnResult {
        connection(&self, &h, index).await
    }

    fn figures(
        &self,
        run: &RunFacts,
        made: &[&ConnResult],
        warnings: &mut Vec<String>,
    ) -> Deliveries {
        // Expected deliveries: every measured push times the followers of its session that
        // joined (one that is closed later still counts: what it misses is lost).
        let mut pushes_in_window = vec![0u64; self.sessions];
        let mut followers_joined = vec![0u64; self.sessions];
        for r in made {
            if r.leader {
                pushes_in_window[r.session] += r.pushes_in_window;
            } else {
                followers_joined[r.session] += 1;
            }
        }
        let expected = pushes_in_window
            .iter()
            .zip(&followers_joined)
            .map(|(p, f)| p * f)
            .sum();
        let payload = push_body(0, run.args.payload_bytes).len() + 27;
        Deliveries::of(run, made, expected, payload, warnings)
    }

    fn rows(figures: &Deliveries, row: &mut dyn FnMut(&str, String)) {
        figures.rows(row);
    }
}

/// The setup line of a leader/follower run.
pub(crate) fn setup_line(args: &Args, payload_bytes: usize) -> String {
    format!(
        "{} sessions x (1 leader + {} followers), interval {} ms, payload {} B, deflate {}",
        args.sessions,
        args.followers,
        args.interval_ms(),
        payload_bytes,
        if args.deflate { "offered" } else { "off" }
    )
}

/// One connection, from connecting to the end of the run.
async fn connection(scenario: &HunterPie, h: &Harness, index: usize) -> ConnResult {
    let args = &h.args;
    let per_session = args.followers + 1;
    let session = index / per_session;
    let role = if index.is_multiple_of(per_session) {
        Role::Leader
    } else {
        Role::Follower
    };
    let mut state = ConnState::new(h, index, session, role);
    let mut client = match join(scenario, h, index, session, role, &mut state).await {
        Ok(client) => {
            if role == Role::Follower {
                scenario.followers_joined[session].fetch_add(1, Ordering::Relaxed);
            }
            h.ready(true);
            client
        }
        Err(error) => {
            h.ready(false);
            state.result.connect_error = Some(error);
            return state.result;
        }
    };
    state.result.deflate_agreed = client.deflate;
    let deflate = client.deflate;
    let ws = &mut client.ws;

    let mut stop = pin!(h.stopped());
    let mut plan_wait = pin!(h.plan());
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
                if body.is_some() {
                    // Leaders start spread evenly over one interval, not all at once.
                    pusher = Some(h.pacer(&p, session as f64 / args.sessions as f64));
                }
                plan = Some(p);
            }
            _ = tick(&mut pusher), if pusher.is_some() => {
                let (Some(plan), Some(body)) = (&plan, &body) else { continue };
                let ts = h.now_us();
                if ts >= plan.window_end_us {
                    // Pushing stops with the window, so the drain sees the backlog clear.
                    pusher = None;
                    continue;
                }
                if ts >= plan.window_start_us {
                    // Counted before sending: a follower may see it before `send` returns.
                    state.result.pushes_in_window += 1;
                    let followers = scenario.followers_joined[session].load(Ordering::Relaxed);
                    h.expected.fetch_add(u64::from(followers), Ordering::Relaxed);
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
    state.result.inflated = client.inflated_messages();
    if state.result.closed.is_none() {
        // A polite close; the run is over, so a failure or a slow server changes nothing.
        let _ = timeout(Duration::from_secs(2), client.ws.close(None)).await;
    }
    let ConnState { result, .. } = state;
    result
}

/// Connects, sends SetName and SetSession and waits for the first sessionstate.
async fn join(
    scenario: &HunterPie,
    h: &Harness,
    index: usize,
    session: usize,
    role: Role,
    state: &mut ConnState<'_>,
) -> Result<HunterClient, String> {
    let _slot = h.slot().await?;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(h.args.connect_timeout_s);
    let attempt = async {
        let leader = role == Role::Leader;
        let (addr, path) = if leader {
            (scenario.addr, &scenario.path)
        } else {
            (scenario.follower_addr, &scenario.follower_path)
        };
        // The client sets TCP_NODELAY and reads with a 4 KiB buffer, as the plugin would.
        let mut client = HunterClient::connect(addr, path, h.args.deflate)
            .await
            .map_err(|e| describe(h, &e))?;
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
    h.record_join(started);
    Ok(client)
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

/// A short, countable description of a connect failure.
fn describe(h: &Harness, e: &ClientError) -> String {
    match e {
        ClientError::Io(io) => h.describe_io(io),
        ClientError::Handshake(answer) => {
            format!(
                "handshake refused: {}",
                answer.lines().next().unwrap_or("(empty answer)")
            )
        }
        ClientError::Ws(e) => format!("websocket: {e}"),
    }
}

/// A connection's running tallies and the checks on what it receives.
struct ConnState<'a> {
    h: &'a Harness,
    role: Role,
    /// `{"sessionId":"bench-<s>:L",` — every push relayed to this connection starts so.
    prefix: Vec<u8>,
    /// Length of this session's push before the `,"ts":` tail.
    body_len: usize,
    next_seq: u64,
    latencies: Latencies<'a>,
    result: ConnResult,
}

impl<'a> ConnState<'a> {
    fn new(h: &'a Harness, index: usize, session: usize, role: Role) -> Self {
        let body_len = push_body(session, h.args.payload_bytes).len();
        ConnState {
            h,
            role,
            prefix: format!(r#"{{"sessionId":"bench-{session}:L","#).into_bytes(),
            body_len,
            next_seq: 0,
            latencies: h.latencies(index),
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
            && plan.measures(ts)
        {
            self.result.received_in_window += 1;
            self.h.delivered.fetch_add(1, Ordering::Relaxed);
            self.latencies.record(self.h.now_us().saturating_sub(ts));
        }
    }
}

/// A text message compressed the plugin's way (a finished raw deflate stream plus one `0x00`
/// byte, RSV1 set), with the library's per-thread reused compressor.
fn compressed_text(data: &[u8]) -> Message {
    supersynk_client::text_message(std::str::from_utf8(data).unwrap_or_default(), true)
}

/// Parses the `,"ts":<n>,"seq":<n>}` tail of a push from the end: (ts, seq, where the tail
/// starts). `None` for anything else (sessionstate, servermsg...).
pub(crate) fn parse_tail(b: &[u8]) -> Option<(u64, u64, usize)> {
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
pub(crate) fn digits_before(b: &[u8], end: usize) -> Option<(u64, usize)> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use supersynk_client::text_message;
    use tokio_tungstenite::tungstenite::Message;

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
}
