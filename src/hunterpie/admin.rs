//! The admin API (token-protected, under `/admin`, off unless `--admin-token` is set):
//! figures for the dashboard, the sessions and their members, a servermsg to a session or
//! to everyone, kicking a member; and the dashboard's login. Documented in
//! protocol/hunterpie.md.
//!
//! A request is the operator's with `Authorization: Bearer <token>` (scripts), or with the
//! cookie of a dashboard login ([`crate::http::login`]): then a request that changes
//! something must also echo the login's CSRF token.
//!
//! In cluster mode every request answers for every node: the node asked puts the question
//! ([`answer`]'s `op`) to the others through [`crate::cluster::peers`], merges their
//! answers with its own and names the nodes that did not answer in time. Every figure and
//! member names its node (`node`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use axum::Json;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::message::{Level, server_msg};
use super::now_ms;
use crate::cluster::peers::Answers;
use crate::core::hub::{ConnId, SessionInfo};
use crate::http::body::{self, BodyLimit};
use crate::http::login::{self, Gate, Scope};
use crate::server::App;
use crate::ws::connection::codes;

/// Most sessions `/admin/sessions` lists with `limit`.
const MAX_LIMIT: usize = 10_000;

/// The admin routes: the login, and the API behind the token check.
pub fn routes(app: App) -> Router<App> {
    let api = Router::new()
        .route("/stats", get(stats))
        .route("/sessions", get(sessions))
        .route("/message", post(message))
        .route("/kick", post(kick))
        .route_layer(axum::middleware::from_fn_with_state(app, require_token));
    login::routes("", gate).merge(api)
}

fn gate(app: &App) -> Gate<'_> {
    Gate {
        logins: &app.logins,
        scope: Scope::Admin,
        token: app.config.admin_token.as_deref(),
        tls: app.config.tls.is_some(),
        metrics: &app.metrics,
        limit: body_limit(app),
    }
}

fn body_limit(app: &App) -> BodyLimit {
    BodyLimit {
        max_bytes: app.config.limits.max_http_body_bytes,
        deadline: app.config.limits.http_body_timeout,
    }
}

async fn require_token(State(app): State<App>, req: Request, next: Next) -> Response {
    let Some(expected) = &app.config.admin_token else {
        return error(StatusCode::NOT_FOUND, "the admin API is off");
    };
    let headers = req.headers();
    let ok = match crate::http::bearer(headers) {
        Some(given) => crate::core::secret_eq(expected, given),
        None => match app.logins.check(Scope::Admin, headers) {
            Some(login) if req.method() == Method::GET || login.csrf_ok(headers) => true,
            Some(_) => return login::csrf_refused(&app.metrics),
            None => false,
        },
    };
    if ok {
        next.run(req).await
    } else {
        app.metrics.error("admin_unauthorized");
        error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin token (Authorization: Bearer ..., or log in on the dashboard)",
        )
    }
}

/// The host's name (a container's name under Docker).
fn host_name() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "local".into())
    })
}

/// The name of a cluster's node listening on `port`: its host name and port, unique even
/// for nodes on one host.
pub fn cluster_node_name(port: u16) -> String {
    format!("{}:{port}", host_name())
}

/// This node's name in every answer: its host name, with its port in cluster mode.
pub fn node_name(app: &App) -> &str {
    match &app.peers {
        Some(peers) => peers.name(),
        None => host_name(),
    }
}

/// The request's body as `T`, or the answer: 413 or 408 from [`body::read`], 400 naming
/// what was `expected` for a body that is not that JSON.
async fn json_body<T: DeserializeOwned>(
    app: &App,
    req: Request,
    expected: &str,
) -> Result<T, Response> {
    let bytes = body::read(&app.metrics, req, body_limit(app))
        .await
        .map_err(IntoResponse::into_response)?;
    serde_json::from_slice(&bytes).map_err(|_| error(StatusCode::BAD_REQUEST, expected))
}

fn error(status: StatusCode, text: &str) -> Response {
    (status, Json(json!({ "error": text }))).into_response()
}

/// The other nodes' answers to `question` (none outside a cluster): each answer's body,
/// with the names of the nodes that did not answer and whether Redis was reached.
async fn ask_others(app: &App, question: Value) -> Answers {
    match &app.peers {
        Some(peers) => peers.ask(question).await,
        None => Answers {
            reached: true,
            ..Answers::default()
        },
    }
}

/// What every cluster-wide answer adds: the nodes that did not answer in time, and whether
/// every node was asked (false while Redis is unreachable: this node only).
fn coverage(asked: &Answers) -> (Value, Value) {
    (json!(asked.missing), json!(asked.reached))
}

/// Answers another node's question (the admin API's part of [`crate::cluster::peers`]):
/// `{"op": "stats" | "sessions" | "message" | "kick", ...}` about this node alone.
pub fn answer(app: &App, question: &Value) -> Value {
    match question["op"].as_str() {
        Some("stats") => local_stats(app),
        Some("sessions") => match question["ids"].as_array() {
            Some(ids) => {
                let ids = ids.iter().filter_map(Value::as_str).collect();
                local_sessions(app, &Wanted::Ids(ids))
            }
            None => {
                let search = question["search"].as_str().unwrap_or_default();
                let limit = question["limit"]
                    .as_u64()
                    .map_or(usize::MAX, |n| n as usize);
                local_sessions(app, &Wanted::Matching { search, limit })
            }
        },
        Some("message") => {
            let level = parse_level(question["level"].as_str()).unwrap_or(Level::Warn);
            let text = question["text"].as_str().unwrap_or_default();
            local_message(app, level, text, question["session"].as_str())
        }
        Some("kick") => {
            let mine = question["node"].as_str() == Some(node_name(app));
            let kicked = mine
                && question["conn"]
                    .as_u64()
                    .is_some_and(|c| app.hub.close_connection(ConnId(c), codes::KICKED));
            json!({ "kicked": kicked })
        }
        _ => json!({ "error": "unknown question" }),
    }
}

/// This node's row of `/admin/stats`.
fn local_stats(app: &App) -> Value {
    let m = &app.metrics;
    let refusals: serde_json::Map<String, Value> = m
        .errors_by_kind()
        .into_iter()
        .map(|(kind, n)| (kind.to_string(), n.into()))
        .collect();
    json!({
        "node": node_name(app),
        "local": true,
        "version": env!("CARGO_PKG_VERSION"),
        "uptimeSeconds": m.started.elapsed().as_secs(),
        "connections": m.connections_open.get(),
        "sessions": app.hub.len(),
        "members": app.hub.local_members(),
        "logListeners": m.logs_listeners.get(),
        "totals": {
            "connections": m.connections_total.get(),
            "messagesIn": m.messages_in.get(),
            "messagesOut": m.messages_out.get(),
            "bytesIn": m.bytes_in.get(),
            "bytesOut": m.bytes_out.get(),
            "pushes": m.pushes_relayed.get(),
            "relayedBytes": m.bytes_relayed.get(),
            "slowConsumers": m.slow_consumer_disconnects.get(),
            "idleTimeouts": m.idle_timeouts.get(),
            "logEntries": m.logs_received.get(),
        },
        "refusals": refusals,
    })
}

/// Adds every number of `row` into `sum`, key by key, at every level (names and flags are
/// not summed).
fn add_numbers(sum: &mut serde_json::Map<String, Value>, row: &Value) {
    let Some(row) = row.as_object() else {
        return;
    };
    for (key, value) in row {
        match value {
            Value::Number(n) => {
                let before = sum.get(key).and_then(Value::as_u64).unwrap_or(0);
                sum.insert(key.clone(), (before + n.as_u64().unwrap_or(0)).into());
            }
            Value::Object(_) => {
                let entry = sum
                    .entry(key.clone())
                    .or_insert_with(|| Value::Object(Default::default()));
                if let Some(inner) = entry.as_object_mut() {
                    add_numbers(inner, value);
                }
            }
            _ => {}
        }
    }
}

/// `GET /admin/stats`: what the dashboard charts, per node (this one first, then the
/// others by name) and summed over the nodes (`cluster`), with the time. Counters are
/// totals since each node started; rates are the client's to compute.
async fn stats(State(app): State<App>) -> Response {
    let asked = ask_others(&app, json!({ "op": "stats" })).await;
    let mut rows = vec![local_stats(&app)];
    for a in &asked.answers {
        let mut row = a.body.clone();
        if let Some(row) = row.as_object_mut() {
            row.insert("local".into(), false.into());
            row.insert("node".into(), a.name.clone().into());
        }
        rows.push(row);
    }
    let mut cluster = serde_json::Map::new();
    cluster.insert("nodes".into(), rows.len().into());
    for row in &rows {
        add_numbers(&mut cluster, row);
    }
    cluster.remove("uptimeSeconds");
    // Every kind a node counted, and no other.
    cluster
        .entry("refusals")
        .or_insert_with(|| Value::Object(Default::default()));
    let (missing, complete) = coverage(&asked);
    Json(json!({
        "time": now_ms(),
        "nodes": rows,
        "cluster": cluster,
        "missing": missing,
        "complete": complete,
    }))
    .into_response()
}

/// The query of `/admin/sessions`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionsQuery {
    /// Only sessions whose id, or a member's name or address, contains this (any case).
    #[serde(default)]
    search: Option<String>,
    /// At most this many sessions (by id); `total` says how many matched.
    #[serde(default)]
    limit: Option<usize>,
}

/// Which of this node's sessions `/admin/sessions` asks for.
enum Wanted<'a> {
    /// Those that match the search (lower case; all when empty): the ids of all of them,
    /// and the first `limit` by id with their members.
    Matching { search: &'a str, limit: usize },
    /// These, with their members.
    Ids(std::collections::HashSet<&'a str>),
}

/// This node's sessions, as [`Wanted`]: `{"ids": [...], "sessions": [...]}`.
fn local_sessions(app: &App, wanted: &Wanted) -> Value {
    let matching: Vec<SessionInfo> = app
        .hub
        .snapshot()
        .into_iter()
        .filter(|s| match wanted {
            Wanted::Matching { search, .. } => search.is_empty() || matches(s, search),
            Wanted::Ids(ids) => ids.contains(&*s.id),
        })
        .collect();
    let limit = match wanted {
        Wanted::Matching { limit, .. } => *limit,
        Wanted::Ids(_) => usize::MAX,
    };
    let node = node_name(app);
    let ids: Vec<&str> = matching.iter().map(|s| &*s.id).collect();
    let sessions: Vec<Value> = matching
        .iter()
        .take(limit)
        .map(|s| {
            let members: Vec<Value> = s
                .members
                .iter()
                .map(|m| {
                    json!({
                        "conn": m.conn,
                        "name": m.name,
                        "leader": m.leader,
                        "addr": m.addr,
                        "since": m.since,
                        "node": node,
                    })
                })
                .collect();
            json!({ "id": s.id, "protected": s.protected, "members": members })
        })
        .collect();
    json!({ "ids": ids, "sessions": sessions })
}

/// Sessions merged by id: protected on any node, and every node's members.
type Merged = BTreeMap<String, (bool, Vec<Value>)>;

/// Every node's answer to a sessions question (this node's first): the ids they name, and
/// their sessions merged by id (members of every node, protected if it is on any).
fn merge_sessions<'a>(bodies: impl Iterator<Item = &'a Value>) -> (BTreeSet<String>, Merged) {
    let mut ids = BTreeSet::new();
    let mut merged = Merged::new();
    for body in bodies {
        for id in body["ids"].as_array().into_iter().flatten() {
            if let Some(id) = id.as_str() {
                ids.insert(id.to_string());
            }
        }
        for s in body["sessions"].as_array().into_iter().flatten() {
            let Some(id) = s["id"].as_str() else {
                continue;
            };
            let entry = merged.entry(id.to_string()).or_default();
            entry.0 |= s["protected"].as_bool().unwrap_or(false);
            entry
                .1
                .extend(s["members"].as_array().into_iter().flatten().cloned());
        }
    }
    (ids, merged)
}

/// `GET /admin/sessions[?search=S][&limit=N]`: the sessions of every node by id, each
/// member with the node it is connected to.
async fn sessions(State(app): State<App>, req: Request) -> Response {
    let q = match axum::extract::Query::<SessionsQuery>::try_from_uri(req.uri()) {
        Ok(q) => q.0,
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "expected ?search=text and/or ?limit=N (1 to 10000)",
            );
        }
    };
    let limit = match q.limit {
        None => usize::MAX,
        Some(n @ 1..=MAX_LIMIT) => n,
        Some(_) => return error(StatusCode::BAD_REQUEST, "limit must be 1 to 10000"),
    };
    let search = q.search.unwrap_or_default().to_lowercase();
    let question = json!({
        "op": "sessions",
        "search": search,
        "limit": (limit != usize::MAX).then_some(limit),
    });
    let mut asked = ask_others(&app, question).await;
    let local = local_sessions(
        &app,
        &Wanted::Matching {
            search: &search,
            limit,
        },
    );
    // Each node sent the ids of all its matching sessions and its first `limit` in full.
    // Without a search, a session among the first `limit` of the union is among the first
    // `limit` of every node it has members on, so all its members are here.
    let (ids, mut merged) =
        merge_sessions(std::iter::once(&local).chain(asked.answers.iter().map(|a| &a.body)));
    if !search.is_empty() && asked.reached && !ids.is_empty() {
        // A session may match on one node (a member's name) and not on another: a second
        // question fetches the chosen sessions whole from every node.
        let chosen: Vec<&str> = ids.iter().take(limit).map(String::as_str).collect();
        let again = ask_others(&app, json!({ "op": "sessions", "ids": chosen })).await;
        let local = local_sessions(&app, &Wanted::Ids(chosen.iter().copied().collect()));
        merged =
            merge_sessions(std::iter::once(&local).chain(again.answers.iter().map(|a| &a.body))).1;
        for name in again.missing {
            if !asked.missing.contains(&name) {
                asked.missing.push(name);
            }
        }
        asked.reached = again.reached;
    }
    let sessions: Vec<Value> = merged
        .into_iter()
        .take(limit)
        .map(|(id, (protected, members))| {
            json!({ "id": id, "protected": protected, "members": members })
        })
        .collect();
    let (missing, complete) = coverage(&asked);
    Json(json!({
        "total": ids.len(),
        "sessions": sessions,
        "missing": missing,
        "complete": complete,
    }))
    .into_response()
}

fn matches(s: &SessionInfo, search: &str) -> bool {
    s.id.to_lowercase().contains(search)
        || s.members.iter().any(|m| {
            m.name.to_lowercase().contains(search) || m.addr.to_lowercase().contains(search)
        })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageBody {
    text: String,
    #[serde(default)]
    level: Option<String>,
    /// Only this session's members; everyone when absent.
    #[serde(default)]
    session: Option<String>,
}

fn parse_level(level: Option<&str>) -> Option<Level> {
    match level.unwrap_or("warn") {
        "info" => Some(Level::Info),
        "warn" => Some(Level::Warn),
        "error" => Some(Level::Error),
        _ => None,
    }
}

/// Sends a servermsg to this node's members of `session`, or to everyone connected here:
/// how many got it, and whether this node has the session.
fn local_message(app: &App, level: Level, text: &str, session: Option<&str>) -> Value {
    let payload = server_msg(level, text);
    let (delivered, found) = match session {
        Some(id) => match app.hub.get(id) {
            Some(session) => (session.broadcast(&payload), true),
            None => (0, false),
        },
        None => (app.hub.broadcast_all(&payload), true),
    };
    json!({ "delivered": delivered, "found": found })
}

/// `POST /admin/message`: a servermsg to a session's members on every node, or to every
/// client of every node.
async fn message(State(app): State<App>, req: Request) -> Response {
    let expected = "expected JSON {\"text\": ..., \"level\"?: info|warn|error, \"session\"?: id}";
    let body: MessageBody = match json_body(&app, req, expected).await {
        Ok(body) => body,
        Err(res) => return res,
    };
    let Some(level) = parse_level(body.level.as_deref()) else {
        return error(StatusCode::BAD_REQUEST, "level must be info, warn or error");
    };
    let question = json!({
        "op": "message",
        "text": body.text,
        "level": body.level,
        "session": body.session,
    });
    let local = local_message(&app, level, &body.text, body.session.as_deref());
    let asked = ask_others(&app, question).await;
    let answers = std::iter::once(&local).chain(asked.answers.iter().map(|a| &a.body));
    let (mut delivered, mut found) = (0, false);
    for a in answers {
        delivered += a["delivered"].as_u64().unwrap_or(0);
        found |= a["found"].as_bool().unwrap_or(false);
    }
    if !found {
        return error(StatusCode::NOT_FOUND, "no such session");
    }
    let (missing, complete) = coverage(&asked);
    Json(json!({ "delivered": delivered, "missing": missing, "complete": complete }))
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KickBody {
    conn: u64,
    /// The node the connection is on (`node` of `/admin/sessions`); this one when absent.
    #[serde(default)]
    node: Option<String>,
}

/// Both bodies' parsers, for the body fuzz target.
pub(crate) fn parse_for_fuzzing(body: &[u8]) {
    let _ = serde_json::from_slice::<MessageBody>(body);
    let _ = serde_json::from_slice::<KickBody>(body);
    login::parse_for_fuzzing(body);
}

/// `POST /admin/kick`: closes a connection of this node or of another one.
async fn kick(State(app): State<App>, req: Request) -> Response {
    let expected =
        "expected JSON {\"conn\": <connection id from /admin/sessions>, \"node\"?: name}";
    let body: KickBody = match json_body(&app, req, expected).await {
        Ok(body) => body,
        Err(res) => return res,
    };
    let kicked = match body.node.as_deref() {
        None => app.hub.close_connection(ConnId(body.conn), codes::KICKED),
        Some(node) if node == node_name(&app) => {
            app.hub.close_connection(ConnId(body.conn), codes::KICKED)
        }
        Some(node) => {
            let question = json!({ "op": "kick", "conn": body.conn, "node": node });
            let asked = ask_others(&app, question).await;
            match asked.answers.iter().find(|a| a.name == node) {
                Some(a) => a.body["kicked"].as_bool().unwrap_or(false),
                None if asked.missing.iter().any(|m| m == node) => {
                    return error(
                        StatusCode::GATEWAY_TIMEOUT,
                        "that node did not answer in time",
                    );
                }
                None if !asked.reached => {
                    return error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "Redis is unreachable: only this node's connections can be kicked",
                    );
                }
                None => return error(StatusCode::NOT_FOUND, "no such node"),
            }
        }
    };
    if kicked {
        Json(json!({ "kicked": body.conn })).into_response()
    } else {
        error(StatusCode::NOT_FOUND, "no such connection")
    }
}
