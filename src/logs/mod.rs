//! The log front-end (protocol/logs.md): the plugin posts its users' logs to
//! `POST /logs/add`; maintainers watch them live on the `GET /logs/listen` WebSocket or in the
//! viewer at `/logs.html`, and search what was stored with `GET /logs/query`.
//!
//! Owns the HTTP handlers, the listener sockets, the access token and the per-address rate of
//! `/logs/add`. The live stream is in [`stream`], parsing in [`entry`], the durable store in
//! [`store`], its writer and reserver in [`writer`], the queue between them in [`queue`], the
//! server's own events in [`forward`].
//!
//! Cluster mode: every node stamps and stores the entries posted to it, and [`relay`] hands
//! them to every other node's live stream, so a listener on any node sees every node's
//! entries (each node's own events stay on that node). `seqNumber` is strictly increasing
//! per node and across its restarts (numbers are reserved in the store before they are
//! handed out); nodes sharing one PostgreSQL reserve from the same row, so their numbers
//! differ, and `/logs/query` there sees every node's entries in the order they were stored.
pub mod entry;
pub mod forward;
pub mod ingest;
pub mod queue;
pub mod relay;
pub mod store;
pub mod stream;
pub mod writer;

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use hyper::upgrade::Upgraded;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::core::outbound::Payload;
use crate::core::secret_eq;
use crate::http::body::{self, BodyLimit};
use crate::http::login::{self, Gate, Scope};
use crate::http::page::Page;
use crate::metrics::Metrics;
use crate::server::{App, Peer, client_ip, upgrade_with};
use crate::ws::connection::codes;
use crate::ws::extension::Deflate;
use crate::ws::{Connection, Event};
use entry::{Entry, Posted, json_array, now_ms};
use queue::{QueueRx, StoreQueue};
use store::{Cursor, LogStore, Query, Retention};
use stream::Stream;

/// The viewer page, served as is and to anyone: it holds no entry, and asks for the token
/// when the server has one.
static VIEWER: Page = Page::new(include_str!("viewer.html"));
/// Entries that may wait for one 100 ms flush of the live stream.
const MAX_PENDING: usize = 100_000;
/// Largest page of `/logs/query`.
pub const MAX_QUERY_LIMIT: usize = 1000;

/// The log front-end's state: a cheap-to-clone handle.
#[derive(Debug, Clone)]
pub struct Logs(Arc<LogsInner>);

#[derive(Debug)]
pub struct LogsInner {
    pub stream: Arc<Stream>,
    /// `None` when the store could not be opened: entries are then only live.
    store: Option<LogStore>,
    /// Why the store could not be opened (for `/readyz`).
    store_error: Option<String>,
    /// The store's writer: it outlives the server's drain (so the last events are stored)
    /// and stops when [`Logs::close_store`] cancels `store_close`.
    store_tasks: TaskTracker,
    store_close: CancellationToken,
    /// To the store's writer; bounded in entries and bytes (`--logs-store-queue`,
    /// `--logs-store-queue-bytes`), never waits. `None` without a store: every entry is
    /// then counted as not stored and released once listeners had it.
    store_queue: Option<StoreQueue>,
    /// The writer's end, taken when the writer starts.
    store_rx: Mutex<Option<QueueRx>>,
    /// Cluster mode: to the publisher of this node's entries; bounded, only `try_send`.
    relay_tx: Option<mpsc::Sender<Arc<Entry>>>,
    /// The relay and its queue's end, taken when it starts.
    relay_rx: Mutex<Option<(relay::Relay, mpsc::Receiver<Arc<Entry>>)>>,
    /// `/logs/add` requests per second per client address.
    add_rate: DefaultKeyedRateLimiter<IpAddr>,
    /// `/logs/add` entries and bytes per second per client address.
    ingest: ingest::Ingest,
    /// Entries dropped for the store since the last warning, and when that was (unix ms):
    /// at most one warning per 10 s.
    dropped_unwarned: AtomicU64,
    last_drop_warning: AtomicI64,
    metrics: Arc<Metrics>,
}

impl std::ops::Deref for Logs {
    type Target = LogsInner;
    fn deref(&self) -> &LogsInner {
        &self.0
    }
}

impl Logs {
    /// Opens the store (SQLite: creates the file; PostgreSQL: connects lazily). A store that
    /// cannot be opened is logged and the server runs without it.
    pub fn new(config: &crate::config::Config, metrics: Arc<Metrics>) -> Logs {
        let l = &config.logs;
        let (store, store_error) = match LogStore::open(&config.store) {
            Ok(s) => (Some(s), None),
            Err(e) => {
                error!(error = %e, store = %config.store.describe(), "log store unavailable: logs are only live");
                (None, Some(e.to_string()))
            }
        };
        let (store_queue, store_rx) = match &store {
            Some(_) => {
                let (q, rx) = StoreQueue::new(
                    l.store_queue_entries,
                    l.store_queue_bytes,
                    metrics.logs_store_queue_bytes.clone(),
                );
                (Some(q), Some(rx))
            }
            None => (None, None),
        };
        let (relay_tx, relay_rx) = match config.cluster.as_ref().and_then(relay::Relay::new) {
            Some(r) => {
                let (tx, rx) = mpsc::channel(relay::QUEUE);
                (Some(tx), Some((r, rx)))
            }
            None => (None, None),
        };
        let per_second = NonZeroU32::new(l.per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(l.per_second.saturating_mul(2)).unwrap_or(NonZeroU32::MIN);
        Logs(Arc::new(LogsInner {
            stream: Arc::new(Stream::new(
                MAX_PENDING,
                l.listener_buffer_bytes,
                metrics.clone(),
            )),
            store,
            store_error,
            store_tasks: TaskTracker::new(),
            store_close: CancellationToken::new(),
            store_queue,
            store_rx: Mutex::new(store_rx),
            relay_tx,
            relay_rx: Mutex::new(relay_rx),
            add_rate: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
            ingest: ingest::Ingest::new(l.entries_per_second, l.bytes_per_second),
            dropped_unwarned: AtomicU64::new(0),
            last_drop_warning: AtomicI64::new(0),
            metrics,
        }))
    }

    /// Prepares the store and starts the writer, the 100 ms flusher and the forwarding of
    /// the server's events; all stop on the server's shutdown (the writer after writing what
    /// is queued).
    pub async fn start(&self, app: &App) {
        match &self.store {
            Some(store) => {
                self.stream.reserve_in_blocks(writer::SEQ_BLOCK);
                let first = store.reserve(self.stream.next_seq(), writer::SEQ_BLOCK);
                match tokio::time::timeout(Duration::from_secs(10), first).await {
                    Ok(Ok((first, last))) => self.stream.grant(first, last),
                    failed => {
                        let why = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => "timed out".into(),
                        };
                        // Above any number handed out before (unless the clock went back);
                        // the reserver covers them once the store can be reached.
                        self.stream.number_from_clock();
                        warn!(error = %why, next_seq = self.stream.next_seq(), "log store unreachable at start; numbering from the clock");
                    }
                }
                let rx = self
                    .store_rx
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                if let Some(rx) = rx {
                    let l = &app.config.logs;
                    let retention = Retention {
                        max_age: l
                            .retention_days
                            .map(|d| Duration::from_secs(u64::from(d) * 86_400)),
                        max_rows: l.retention_rows,
                        max_bytes: l.retention_bytes,
                    };
                    self.store_tasks.spawn(writer::run_writer(
                        store.clone(),
                        rx,
                        retention,
                        self.metrics.clone(),
                        app.shutdown.clone(),
                        self.store_close.clone(),
                    ));
                    app.tracker.spawn(writer::run_reserver(
                        store.clone(),
                        self.stream.clone(),
                        self.metrics.clone(),
                        app.shutdown.clone(),
                    ));
                }
                info!(store = %app.config.store.describe(), next_seq = self.stream.next_seq(), "log store ready");
            }
            // Nothing is kept, so nothing tells a restarted server where numbering was.
            None => self.stream.number_from_clock(),
        }
        let relay = self
            .relay_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((relay, rx)) = relay {
            app.tracker.spawn(relay.run(
                rx,
                self.stream.clone(),
                self.metrics.clone(),
                app.shutdown.clone(),
            ));
        }
        forward::register(Arc::downgrade(&self.0));
        let logs = self.clone();
        let shutdown = app.shutdown.clone();
        app.tracker.spawn(async move {
            let mut tick = tokio::time::interval(stream::FLUSH_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut ticks = 0u64;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {
                        logs.stream.flush();
                        ticks += 1;
                        if ticks.is_multiple_of(600) {
                            logs.add_rate.retain_recent();
                            logs.ingest.forget_idle();
                        }
                    }
                }
            }
            logs.stream.flush();
        });
    }

    /// After the server has stopped: lets the store's writer write what is queued (the
    /// server's last events included) and waits for it, within `grace`.
    pub async fn close_store(&self, grace: Duration) {
        self.store_close.cancel();
        self.store_tasks.close();
        if tokio::time::timeout(grace, self.store_tasks.wait())
            .await
            .is_err()
        {
            warn!("log store: entries still queued at exit were not stored");
        }
    }

    /// Whether the log store can be used: `Err(why)` when it could not be opened or does not
    /// answer now (within 2 s).
    pub async fn store_health(&self) -> Result<(), String> {
        let Some(store) = &self.store else {
            return Err(format!(
                "log store unavailable: {}",
                self.store_error.as_deref().unwrap_or("not opened")
            ));
        };
        match tokio::time::timeout(Duration::from_secs(2), store.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("store unreachable: {e}")),
            Err(_) => Err("store unreachable: no answer within 2 s".into()),
        }
    }
}

impl LogsInner {
    /// Stamps entries posted by clients, queues them for listeners, for the store and (in
    /// cluster mode) for the other nodes. Never waits.
    pub fn publish(&self, posted: Vec<Posted>) {
        self.stamp_and_queue(posted, true);
    }

    /// The same for the server's own events, which stay on this node (protocol/logs.md).
    pub(super) fn publish_own(&self, posted: Vec<Posted>) {
        self.stamp_and_queue(posted, false);
    }

    fn stamp_and_queue(&self, posted: Vec<Posted>, relay: bool) {
        self.metrics.logs_received.inc_by(posted.len() as u64);
        let mut dropped = 0u64;
        // Entries after the store's writer stopped (the server has stopped): not stored,
        // but no sign of a full queue.
        let mut after_close = 0u64;
        let mut not_relayed = 0u64;
        self.stream.publish(posted, |e| {
            if relay
                && let Some(tx) = &self.relay_tx
                && tx.try_send(e.clone()).is_err()
            {
                not_relayed += 1;
            }
            match self.store_queue.as_ref().map(|q| q.try_push(e)) {
                Some(Ok(())) => {}
                Some(Err(queue::Refused::Closed)) => after_close += 1,
                // Full, or no store: not stored (listeners still get it).
                Some(Err(queue::Refused::Full)) | None => dropped += 1,
            }
        });
        if after_close > 0 {
            self.metrics.logs_store_dropped.inc_by(after_close);
        }
        if not_relayed > 0 {
            self.metrics.cluster_dropped.inc_by(not_relayed);
        }
        if dropped > 0 {
            self.metrics.logs_store_dropped.inc_by(dropped);
            if self.store_queue.is_none() {
                // Said once at start ("log store unavailable"); counted, not repeated.
                return;
            }
            let total = self.dropped_unwarned.fetch_add(dropped, Ordering::Relaxed) + dropped;
            let now = now_ms();
            let last = self.last_drop_warning.load(Ordering::Relaxed);
            if now - last >= 10_000
                && self
                    .last_drop_warning
                    .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                self.dropped_unwarned.fetch_sub(total, Ordering::Relaxed);
                warn!(
                    dropped = total,
                    "log store queue full (entries or bytes): entries not stored"
                );
            }
        }
    }
}

/// The log front-end's routes.
pub fn routes() -> Router<App> {
    Router::new()
        .route("/logs/add", post(add))
        .route("/logs/listen", get(listen))
        .route("/logs/query", get(query))
        .route("/logs.html", get(|| async { VIEWER.response() }))
        .merge(login::routes("/logs", gate))
}

fn json_error(app: &App, status: StatusCode, text: &str, kind: &'static str) -> Response {
    app.metrics.error(kind);
    (status, axum::Json(serde_json::json!({ "error": text }))).into_response()
}

/// A request's query parameters, in order, repeats kept.
#[derive(Debug, Default)]
struct Params(Vec<(String, String)>);

impl Params {
    fn of(req: &Request) -> Params {
        // A query string that does not decode is taken as none (every parameter optional).
        axum::extract::Query::<Vec<(String, String)>>::try_from_uri(req.uri())
            .map(|q| Params(q.0))
            .unwrap_or_default()
    }

    /// Every value of `name`.
    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The value of a parameter that may be given once (an empty value is none); a repeat
    /// is refused rather than one of them silently winning.
    fn one<'a>(&'a self, name: &str) -> Result<Option<&'a str>, String> {
        let mut values = self
            .0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str());
        let first = values.next();
        if values.next().is_some() {
            return Err(format!("\"{name}\" may be given only once"));
        }
        Ok(first.filter(|v| !v.is_empty()))
    }

    /// `room`, or `roomId` when `room` is not given.
    fn room(&self) -> Result<Option<String>, String> {
        Ok(match self.one("room")? {
            Some(r) => Some(r.to_string()),
            None => self.one("roomId")?.map(String::from),
        })
    }
}

/// Whether the request carries the logs token (`?token=` or `Authorization: Bearer`, the
/// scheme in any case) or the cookie of a viewer login, or no token is configured. A
/// WebSocket authorized by the cookie alone must come from a page of this server
/// ([`login::same_origin`]).
fn authorized(app: &App, headers: &HeaderMap, params: &Params, websocket: bool) -> bool {
    let Some(want) = &app.config.logs.token else {
        return true;
    };
    let by_token = crate::http::bearer(headers)
        .into_iter()
        .chain(params.all("token"))
        .any(|got| secret_eq(got, want));
    by_token
        || (app.logins.check(Scope::Logs, headers).is_some()
            && (!websocket || login::same_origin(headers)))
}

/// The viewer's login endpoints (`/logs/login`, `/logs/logout`); without `--logs-token`
/// there is nothing to log in to (404, and `GET /logs/login` says the logs are open).
fn gate(app: &App) -> Gate<'_> {
    Gate {
        logins: &app.logins,
        scope: Scope::Logs,
        token: app.config.logs.token.as_deref(),
        tls: app.config.tls.is_some(),
        metrics: &app.metrics,
        limit: BodyLimit {
            max_bytes: app.config.limits.max_http_body_bytes,
            deadline: app.config.limits.http_body_timeout,
        },
    }
}

fn unauthorized(app: &App) -> Response {
    let mut res = json_error(
        app,
        StatusCode::UNAUTHORIZED,
        "a valid logs token is required (?token=..., Authorization: Bearer ..., or log in on /logs.html)",
        "logs_unauthorized",
    );
    res.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"supersynk logs\""),
    );
    res
}

/// `POST /logs/add`: one entry or an array; 200 with an empty body. The body is read within
/// `--max-http-body-bytes` and `--logs-body-timeout-ms` (see [`body::read`]).
async fn add(State(app): State<App>, req: Request) -> Response {
    let ip = client_ip(&app, &req);
    if !app.guard.is_exempt(ip) && app.logs.add_rate.check_key(&ip).is_err() {
        let text = format!(
            "rate limit: at most {} /logs/add requests per second per address",
            app.config.logs.per_second
        );
        let mut res = json_error(&app, StatusCode::TOO_MANY_REQUESTS, &text, "logs_rate");
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return res;
    }
    let limit = BodyLimit {
        max_bytes: app.config.limits.max_http_body_bytes,
        deadline: app.config.logs.body_timeout,
    };
    let body = match body::read(&app.metrics, req, limit).await {
        Ok(body) => body,
        Err(e) => {
            debug!(%ip, error = %e, "logs/add: body refused");
            return e.into_response();
        }
    };
    match entry::parse_body(&body) {
        Ok(posted) => {
            if !app.guard.is_exempt(ip)
                && let Err(refusal) = app.logs.ingest.charge(ip, posted.len(), body.len())
            {
                return ingest_refused(&app, refusal, posted.len(), body.len());
            }
            app.logs.publish(posted);
            StatusCode::OK.into_response()
        }
        Err(e) => {
            debug!(error = %e, "logs/add refused");
            json_error(
                &app,
                StatusCode::BAD_REQUEST,
                &e.to_string(),
                "logs_bad_body",
            )
        }
    }
}

/// The answer to a body refused by the per-address ingest limits (429 with `Retry-After`,
/// or 413 for more than an address may ever post at once); its entries are counted.
fn ingest_refused(
    app: &App,
    refusal: ingest::IngestRefusal,
    entries: usize,
    bytes: usize,
) -> Response {
    app.metrics.logs_refused_entries.inc_by(entries as u64);
    app.metrics.logs_refused_bytes.inc_by(bytes as u64);
    let text = refusal.to_string();
    match refusal {
        ingest::IngestRefusal::Rate { retry_after, .. } => {
            let mut res = json_error(
                app,
                StatusCode::TOO_MANY_REQUESTS,
                &text,
                "logs_ingest_rate",
            );
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                res.headers_mut().insert(header::RETRY_AFTER, v);
            }
            res
        }
        ingest::IngestRefusal::TooLarge { .. } => json_error(
            app,
            StatusCode::PAYLOAD_TOO_LARGE,
            &text,
            "logs_ingest_too_large",
        ),
    }
}

/// `GET /logs/listen?room=R` (or `roomId=R`): the live stream as a WebSocket.
async fn listen(State(app): State<App>, mut req: Request) -> Response {
    let p = Params::of(&req);
    if !authorized(&app, req.headers(), &p, true) {
        return unauthorized(&app);
    }
    let room = match p.room() {
        Ok(room) => room,
        Err(text) => return json_error(&app, StatusCode::BAD_REQUEST, &text, "logs_bad_query"),
    };
    upgrade_with(&app, &mut req, move |upgraded, deflate, app, peer| {
        serve_listener(upgraded, deflate, app, peer, room)
    })
}

/// A listener: registered in the stream until its socket closes. It may send text `ping`
/// (the viewer and the original's log page do, every 3 s): answered `pong`, as the
/// original did. Anything else it sends is ignored. The server pings a quiet listener
/// (`--logs-ping-interval-ms`), so one that only receives is not closed as idle as long as
/// its client answers pings (every WebSocket client does), and one that is gone is noticed.
async fn serve_listener(
    upgraded: Upgraded,
    deflate: Option<Deflate>,
    app: App,
    peer: Peer,
    room: Option<String>,
) {
    let mut ctx = app.conn_context();
    let mut settings = (*ctx.settings).clone();
    // No limit of its own: the stream checks the listener buffer before it queues anything,
    // so at most the buffer, a notice and one flush's array (shared by every listener of
    // the room) wait here. A limit here closed a listener as a slow consumer when a notice
    // was followed by an array larger than the limit, which the stream allows an idle
    // listener.
    settings.outbound_queue_bytes = usize::MAX / 4;
    ctx.settings = Arc::new(settings);
    let mut conn = Connection::start(upgraded, deflate, ctx, peer).await;
    conn.keepalive(app.config.logs.ping_interval);
    let guard = app.logs.stream.listen(room, conn.outbound.clone());
    loop {
        match conn.next().await {
            Event::Closed(_) => break,
            Event::Shutdown => conn.close(codes::SHUTDOWN),
            Event::Text(t) if &t[..] == b"ping" => conn.send(Payload::text("pong")),
            Event::Text(_) | Event::Binary(_) => {}
        }
    }
    drop(guard);
    conn.finish().await;
}

/// Reads one integer query parameter.
fn int_param(p: &Params, name: &str) -> Result<Option<i64>, String> {
    match p.one(name)?.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| format!("\"{name}\" must be an integer")),
    }
}

/// The search of `/logs/query`. `level` may be repeated (`level=info&level=warn` is
/// `level=info,warn`); any other parameter given twice is refused.
fn parse_query(p: &Params) -> Result<Query, String> {
    let limit = match int_param(p, "limit")? {
        None => 100,
        Some(n) if n >= 1 && n as usize <= MAX_QUERY_LIMIT => n as usize,
        Some(_) => return Err(format!("\"limit\" must be 1 to {MAX_QUERY_LIMIT}")),
    };
    let before = match p.one("cursor")? {
        None => None,
        Some(c) => Some(Cursor::parse(c).ok_or("\"cursor\" is not a cursor this server gave")?),
    };
    Ok(Query {
        room: p.room()?,
        user: p.one("user")?.map(String::from),
        levels: p
            .all("level")
            .flat_map(|l| l.split(','))
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| !s.is_empty())
            .collect(),
        text: p.one("text")?.map(String::from),
        since: int_param(p, "since").map_err(|e| format!("{e} (unix ms)"))?,
        until: int_param(p, "until").map_err(|e| format!("{e} (unix ms)"))?,
        limit,
        before,
    })
}

/// `GET /logs/query`: stored entries, newest first, a page at a time.
async fn query(State(app): State<App>, req: Request) -> Response {
    let p = Params::of(&req);
    if !authorized(&app, req.headers(), &p, false) {
        return unauthorized(&app);
    }
    let q = match parse_query(&p) {
        Ok(q) => q,
        Err(text) => return json_error(&app, StatusCode::BAD_REQUEST, &text, "logs_bad_query"),
    };
    let Some(store) = &app.logs.store else {
        return json_error(
            &app,
            StatusCode::SERVICE_UNAVAILABLE,
            "the log store is unavailable",
            "logs_store_unavailable",
        );
    };
    match store.query(q).await {
        Ok(page) => {
            let jsons: Vec<String> = page.entries.iter().map(Entry::to_json).collect();
            let next = match page.next {
                Some(c) => format!("\"{}\"", c.encode()),
                None => "null".into(),
            };
            let body = format!(
                "{{\"entries\":{},\"next\":{next}}}",
                json_array(jsons.iter().map(String::as_str))
            );
            let mut res = (StatusCode::OK, body).into_response();
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            res
        }
        Err(e) => {
            warn!(error = %e, "log query failed");
            json_error(
                &app,
                StatusCode::SERVICE_UNAVAILABLE,
                "the log store is unavailable",
                "logs_store_unavailable",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Params {
        Params(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn query_parameters() {
        let q = parse_query(&p(&[
            ("roomId", "r1"),
            ("level", "Info, WARN"),
            ("since", "5"),
            ("limit", "10"),
            ("cursor", "9.9"),
        ]))
        .unwrap();
        assert_eq!(q.room.as_deref(), Some("r1"));
        assert_eq!(q.levels, ["info", "warn"]);
        assert_eq!((q.since, q.until, q.limit), (Some(5), None, 10));
        assert_eq!(q.before, Some(Cursor { seq: 9, id: 9 }));
        assert_eq!(parse_query(&p(&[])).unwrap().limit, 100);
        assert_eq!(
            parse_query(&p(&[("since", "yesterday")])).unwrap_err(),
            "\"since\" must be an integer (unix ms)"
        );
        assert!(parse_query(&p(&[("limit", "0")])).is_err());
        assert!(parse_query(&p(&[("cursor", "x")])).is_err());
        // Levels combine; anything else given twice is refused.
        let q = parse_query(&p(&[("level", "info"), ("level", "warn,error")])).unwrap();
        assert_eq!(q.levels, ["info", "warn", "error"]);
        assert_eq!(
            parse_query(&p(&[("user", "a"), ("user", "b")])).unwrap_err(),
            "\"user\" may be given only once"
        );
        assert!(parse_query(&p(&[("room", "a"), ("room", "a")])).is_err());
        assert_eq!(
            parse_query(&p(&[("room", ""), ("roomId", "r")]))
                .unwrap()
                .room
                .as_deref(),
            Some("r")
        );
    }
}
