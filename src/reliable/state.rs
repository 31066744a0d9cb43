//! The reliable protocol's state that outlives sockets: every client (its sequence numbers,
//! its buffer of unacknowledged messages, its rooms and its pending requests) and the rooms.
//!
//! Owns numbering, buffering, resending, resume, room membership and fan-out, and request
//! timeouts. Knows no socket: a connected client has an [`Outbound`] queue attached, and
//! everything the server sends it goes through that queue (or only into the buffer while it
//! is away).
//!
//! Rooms are a small registry of this module rather than [`crate::core::hub`] sessions: a
//! hub member is a connection's queue, and a message is one payload shared by every member,
//! while here a member is a client state that may have no connection at all (its messages
//! wait in its buffer for a resume), and every receiver needs its own sequence number.
//!
//! Locks: `clients` and `rooms` (maps), one per [`Room`], one per [`Client`]; all
//! `std::sync::Mutex`, never held across `.await`. Order: rooms map, then a room, then
//! clients one at a time; the clients map is never held with another lock. Fan-out to a room
//! happens under the room's lock, so every member sees the room's messages and announcements
//! in one order.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::debug;

use super::wire::{self, Code, WireError};
use crate::config::ReliableConfig;
use crate::core::hub::ConnId;
use crate::core::outbound::{Close, Outbound, Payload};
use crate::metrics::Metrics;

/// The close sent when a client's buffer overflowed and its state was dropped.
pub const OVERFLOW: Close = Close {
    code: 4008,
    reason: "reliable buffer full: client state dropped",
};
/// The close sent to a connection whose client id was resumed on another connection.
pub const REPLACED: Close = Close {
    code: 4001,
    reason: "client resumed on another connection",
};

/// Locks a mutex; a panic while holding one of these locks would be a bug here, and every
/// mutation is a single step, so poisoning is ignored.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One message sent and not yet acknowledged.
#[derive(Debug)]
struct Unacked {
    seq: u64,
    payload: Arc<Payload>,
    sent_at: Instant,
}

/// A request this client made, waiting for its response.
#[derive(Debug)]
struct Pending {
    target: Arc<str>,
    timer: AbortHandle,
}

#[derive(Debug, Default)]
struct ClientState {
    /// The last sequence number given to a message for this client.
    sent: u64,
    /// The client's cumulative acknowledgement.
    acked: u64,
    /// Messages `acked + 1 ..= sent`, oldest first.
    unacked: VecDeque<Unacked>,
    unacked_bytes: usize,
    /// The last sequence number received (and processed) from this client.
    received: u64,
    rooms: BTreeSet<Arc<str>>,
    /// The connection this client is on, if any.
    attached: Option<(ConnId, Outbound)>,
    /// Bumped at every attach and detach, so a resume-window timer knows whether it is stale.
    generation: u64,
    /// Set once the state is dropped (overflow, expiry): nothing is delivered any more.
    dropped: bool,
    pending: HashMap<u64, Pending>,
}

/// One client, connected or waiting for a resume.
#[derive(Debug)]
pub struct Client {
    pub id: Arc<str>,
    /// Proves ownership of `id` on a resume (ids are visible to room members).
    token: String,
    state: Mutex<ClientState>,
}

#[derive(Debug, Default)]
struct Members {
    /// Set when the room is removed from the map (last member left); a joiner that fetched
    /// it before then retries with a fresh room.
    dead: bool,
    list: Vec<Arc<Client>>,
}

#[derive(Debug, Default)]
struct Room {
    members: Mutex<Members>,
}

#[derive(Debug)]
struct Inner {
    config: ReliableConfig,
    max_room_members: usize,
    metrics: Arc<Metrics>,
    clients: Mutex<HashMap<Arc<str>, Arc<Client>>>,
    rooms: Mutex<HashMap<Arc<str>, Arc<Room>>>,
}

/// A cheap-to-clone handle on every client and room of the reliable protocol.
#[derive(Debug, Clone)]
pub struct Registry(Arc<Inner>);

/// What [`Registry::receive`] decided about a client's message.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// The next one: process it.
    InOrder,
    /// Already received: drop it (and acknowledge again).
    Duplicate,
    /// Ahead of the next expected one: drop it; the client resends from `expected`.
    Gap { expected: u64 },
}

/// Client states whose buffer overflowed during a delivery, to drop once no lock is held.
type Overflowed = Vec<Arc<Client>>;

impl Registry {
    pub fn new(config: ReliableConfig, max_room_members: usize, metrics: Arc<Metrics>) -> Self {
        Registry(Arc::new(Inner {
            config,
            max_room_members,
            metrics,
            clients: Mutex::new(HashMap::new()),
            rooms: Mutex::new(HashMap::new()),
        }))
    }

    pub fn config(&self) -> &ReliableConfig {
        &self.0.config
    }

    fn heartbeat_ms(&self) -> u64 {
        self.0.config.heartbeat.as_millis() as u64
    }

    /// Answers a hello on connection `conn`: resumes the client it names when continuity can
    /// be proven (known id, right token, `last_seq` within what the server still holds),
    /// else makes a new client. Queues the welcome and, on a resume, every unacknowledged
    /// message after `last_seq`, in order, before anything else can reach the queue.
    pub fn hello(
        &self,
        resume: Option<wire::Resume<'_>>,
        conn: ConnId,
        outbound: &Outbound,
    ) -> Arc<Client> {
        if let Some(r) = resume {
            let found = lock(&self.0.clients).get(r.client_id.as_ref()).cloned();
            if let Some(client) = found {
                // Without a token, the id alone resumes unless the operator requires tokens.
                let token_ok = match r.token.as_deref() {
                    Some(t) => crate::core::secret_eq(t, &client.token),
                    None => !self.0.config.require_token,
                };
                let mut st = lock(&client.state);
                if token_ok && !st.dropped && r.last_seq >= st.acked && r.last_seq <= st.sent {
                    if let Some((_, old)) = st.attached.take() {
                        let e = WireError::new(Code::Replaced, "resumed on another connection");
                        // The old connection may be closing already.
                        let _ = old.send(Payload::text(wire::error(&e, None)));
                        old.close(REPLACED);
                    }
                    st.attached = Some((conn, outbound.clone()));
                    st.generation += 1;
                    Self::ack_locked(&mut st, r.last_seq);
                    let _ = outbound.send(Payload::text(wire::welcome(
                        &client.id,
                        self.heartbeat_ms(),
                        true,
                        st.received,
                        &client.token,
                    )));
                    let now = Instant::now();
                    let resent = st.unacked.len() as u64;
                    for u in st.unacked.iter_mut() {
                        u.sent_at = now;
                        let _ = outbound.send(u.payload.clone());
                    }
                    drop(st);
                    self.0.metrics.reliable_resumes.inc();
                    self.0.metrics.reliable_resends.inc_by(resent);
                    return client;
                }
                debug!(client = %client.id, token_ok, "resume refused");
            }
        }
        let client = Arc::new(Client {
            id: uuid::Uuid::new_v4().to_string().into(),
            token: uuid::Uuid::new_v4().simple().to_string(),
            state: Mutex::new(ClientState {
                attached: Some((conn, outbound.clone())),
                generation: 1,
                ..ClientState::default()
            }),
        });
        // Sent before the client is findable, so nothing can precede the welcome.
        let _ = outbound.send(Payload::text(wire::welcome(
            &client.id,
            self.heartbeat_ms(),
            false,
            0,
            &client.token,
        )));
        lock(&self.0.clients).insert(client.id.clone(), client.clone());
        self.0.metrics.reliable_clients.inc();
        client
    }

    /// The connection `conn` of `client` is gone: its state waits for a resume until the
    /// resume window ends.
    pub fn detach(&self, client: &Arc<Client>, conn: ConnId) {
        let generation = {
            let mut st = lock(&client.state);
            if st.attached.as_ref().map(|(c, _)| *c) != Some(conn) || st.dropped {
                return;
            }
            st.attached = None;
            st.generation += 1;
            st.generation
        };
        let registry = self.clone();
        let client = client.clone();
        let window = self.0.config.resume_window;
        // Not tracked for shutdown: it only frees memory, and must not hold shutdown up.
        tokio::spawn(async move {
            tokio::time::sleep(window).await;
            let expired = {
                let mut st = lock(&client.state);
                let expired = st.generation == generation && st.attached.is_none() && !st.dropped;
                if expired {
                    st.dropped = true;
                }
                expired
            };
            if expired {
                debug!(client = %client.id, "resume window over");
                registry.0.metrics.reliable_expired.inc();
                registry.remove(&client);
            }
        });
    }

    /// Forgets a dropped client: out of the map, out of every room (announced), its pending
    /// requests cancelled. Call with no lock held.
    fn remove(&self, client: &Arc<Client>) {
        let removed = {
            let mut clients = lock(&self.0.clients);
            match clients.get(&client.id) {
                Some(c) if Arc::ptr_eq(c, client) => clients.remove(&client.id).is_some(),
                _ => false,
            }
        };
        if removed {
            self.0.metrics.reliable_clients.dec();
        }
        let (rooms, pending) = {
            let mut st = lock(&client.state);
            st.unacked.clear();
            st.unacked_bytes = 0;
            (
                std::mem::take(&mut st.rooms),
                std::mem::take(&mut st.pending),
            )
        };
        for p in pending.into_values() {
            p.timer.abort();
        }
        for room in rooms {
            self.leave_room(&room, client);
        }
    }

    /// Numbers, buffers and (when connected) queues one message for `client`. On overflow
    /// the client's state is marked dropped, its connection told and closed, and the client
    /// pushed to `overflowed` for [`Registry::remove`] once no lock is held.
    fn deliver(&self, client: &Arc<Client>, tail: &[u8], overflowed: &mut Overflowed) {
        let mut st = lock(&client.state);
        if st.dropped {
            return;
        }
        let seq = st.sent + 1;
        let payload = Payload::text(wire::msg(seq, tail));
        let len = payload.data().len();
        let c = &self.0.config;
        if st.unacked.len() >= c.buffer_messages || st.unacked_bytes + len > c.buffer_bytes {
            st.dropped = true;
            if let Some((_, out)) = st.attached.take() {
                let e = WireError::new(
                    Code::Overflow,
                    format!(
                        "more than {} messages or {} bytes unacknowledged: client state dropped",
                        c.buffer_messages, c.buffer_bytes
                    ),
                );
                let _ = out.send(Payload::text(wire::error(&e, None)));
                out.close(OVERFLOW);
            }
            drop(st);
            debug!(client = %client.id, "reliable buffer overflow");
            self.0.metrics.reliable_overflows.inc();
            overflowed.push(client.clone());
            return;
        }
        st.sent = seq;
        st.unacked_bytes += len;
        if let Some((_, out)) = &st.attached {
            // A full queue closes the connection as a slow consumer; the message stays in
            // the buffer for the resume.
            let _ = out.send(payload.clone());
        }
        st.unacked.push_back(Unacked {
            seq,
            payload,
            sent_at: Instant::now(),
        });
    }

    fn drop_overflowed(&self, overflowed: Overflowed) {
        for c in overflowed {
            self.remove(&c);
        }
    }

    /// Delivers one message to one client.
    fn deliver_one(&self, client: &Arc<Client>, tail: &[u8]) {
        let mut overflowed = Vec::new();
        self.deliver(client, tail, &mut overflowed);
        self.drop_overflowed(overflowed);
    }

    fn ack_locked(st: &mut ClientState, seq: u64) {
        if seq <= st.acked {
            return;
        }
        while st.unacked.front().is_some_and(|u| u.seq <= seq) {
            if let Some(u) = st.unacked.pop_front() {
                st.unacked_bytes -= u.payload.data().len();
            }
        }
        st.acked = seq;
    }

    /// A cumulative acknowledgement (from an `ack` or a heartbeat).
    pub fn ack(&self, client: &Client, seq: u64) -> Result<(), WireError> {
        let mut st = lock(&client.state);
        if seq > st.sent {
            return Err(WireError::new(
                Code::BadAck,
                format!(
                    "ack {seq} for a message never sent: the last sent is {}",
                    st.sent
                ),
            ));
        }
        Self::ack_locked(&mut st, seq);
        Ok(())
    }

    /// Checks a message's sequence number against what was received; an in-order one is
    /// counted as received.
    pub fn receive(&self, client: &Client, seq: u64) -> Received {
        let mut st = lock(&client.state);
        if seq <= st.received {
            Received::Duplicate
        } else if seq > st.received + 1 {
            Received::Gap {
                expected: st.received + 1,
            }
        } else {
            st.received = seq;
            Received::InOrder
        }
    }

    /// The last sequence number received from `client`.
    pub fn received(&self, client: &Client) -> u64 {
        lock(&client.state).received
    }

    /// Resends, on `client`'s connection, every message unacknowledged for longer than the
    /// resend timeout.
    pub fn resend_due(&self, client: &Client) {
        let now = Instant::now();
        let timeout = self.0.config.resend;
        let mut st = lock(&client.state);
        let Some((_, out)) = st.attached.clone() else {
            return;
        };
        let mut resent = 0;
        for u in st.unacked.iter_mut() {
            if now.duration_since(u.sent_at) < timeout {
                break;
            }
            u.sent_at = now;
            let _ = out.send(u.payload.clone());
            resent += 1;
        }
        drop(st);
        if resent > 0 {
            self.0.metrics.reliable_resends.inc_by(resent);
        }
    }

    /// Joins `client` to `room`, announcing the join to every member (the joiner included).
    pub fn join(&self, client: &Arc<Client>, room: &str) -> Result<(), WireError> {
        if lock(&client.state).rooms.contains(room) {
            return Ok(());
        }
        let mut overflowed = Vec::new();
        let name: Arc<str> = room.into();
        {
            let mut rooms = lock(&self.0.rooms);
            let r = rooms.entry(name.clone()).or_default().clone();
            let mut members = lock(&r.members);
            if members.list.len() >= self.0.max_room_members {
                return Err(WireError::new(
                    Code::RoomFull,
                    format!("room is full: at most {} members", self.0.max_room_members),
                ));
            }
            drop(rooms);
            members.list.push(client.clone());
            lock(&client.state).rooms.insert(name.clone());
            let tail = wire::announce_tail("join", room, &client.id);
            for m in &members.list {
                self.deliver(m, &tail, &mut overflowed);
            }
        }
        self.drop_overflowed(overflowed);
        Ok(())
    }

    /// Takes `client` out of `room`, announcing it to the members left.
    pub fn leave(&self, client: &Arc<Client>, room: &str) -> Result<(), WireError> {
        if !lock(&client.state).rooms.remove(room) {
            return Err(not_member(room));
        }
        self.leave_room(room, client);
        Ok(())
    }

    fn leave_room(&self, room: &str, client: &Arc<Client>) {
        let mut overflowed = Vec::new();
        {
            let mut rooms = lock(&self.0.rooms);
            let Some(r) = rooms.get(room).cloned() else {
                return;
            };
            let mut members = lock(&r.members);
            members.list.retain(|m| !Arc::ptr_eq(m, client));
            if members.list.is_empty() {
                members.dead = true;
                rooms.remove(room);
                return;
            }
            drop(rooms);
            let tail = wire::announce_tail("leave", room, &client.id);
            for m in &members.list {
                self.deliver(m, &tail, &mut overflowed);
            }
        }
        self.drop_overflowed(overflowed);
    }

    /// Relays `data` to every other member of `room`; the sender must be a member.
    pub fn publish(
        &self,
        client: &Arc<Client>,
        room: &str,
        data: &serde_json::value::RawValue,
    ) -> Result<(), WireError> {
        if !lock(&client.state).rooms.contains(room) {
            return Err(not_member(room));
        }
        let Some(r) = lock(&self.0.rooms).get(room).cloned() else {
            return Err(not_member(room));
        };
        let tail = wire::publish_tail(room, &client.id, data);
        let mut overflowed = Vec::new();
        {
            let members = lock(&r.members);
            for m in members.list.iter().filter(|m| !Arc::ptr_eq(m, client)) {
                self.deliver(m, &tail, &mut overflowed);
            }
        }
        self.drop_overflowed(overflowed);
        Ok(())
    }

    /// The ids of `room`'s members, in join order (empty for a room that does not exist).
    pub fn presence(&self, room: &str) -> Vec<Arc<str>> {
        let Some(r) = lock(&self.0.rooms).get(room).cloned() else {
            return Vec::new();
        };
        let members = lock(&r.members);
        members.list.iter().map(|m| m.id.clone()).collect()
    }

    /// Answers `client`'s request `id` itself (the server is the target).
    pub fn answer(&self, client: &Arc<Client>, id: u64, data: Option<&str>, error: Option<&str>) {
        self.deliver_one(client, &wire::response_tail(id, "server", data, error));
    }

    /// Relays a request from `client` to the client `to`, and starts its timeout.
    pub fn request(
        &self,
        client: &Arc<Client>,
        id: u64,
        to: &str,
        data: &serde_json::value::RawValue,
        timeout: Duration,
    ) -> Result<(), WireError> {
        let Some(target) = lock(&self.0.clients).get(to).cloned() else {
            return Err(unknown_client(to));
        };
        {
            let mut st = lock(&client.state);
            if st.pending.contains_key(&id) {
                return Err(WireError::new(
                    Code::DuplicateRequest,
                    format!("request {id} is still waiting for its response"),
                ));
            }
            let registry = self.clone();
            let requester = client.clone();
            let target_id = target.id.clone();
            let timer = tokio::spawn(async move {
                tokio::time::sleep(timeout).await;
                let timed_out = lock(&requester.state).pending.remove(&id).is_some();
                if timed_out {
                    let error = wire::response_error(
                        Code::Timeout,
                        &format!("no response within {} ms", timeout.as_millis()),
                    );
                    registry.deliver_one(
                        &requester,
                        &wire::response_tail(id, &target_id, None, Some(&error)),
                    );
                }
            });
            st.pending.insert(
                id,
                Pending {
                    target: target.id.clone(),
                    timer: timer.abort_handle(),
                },
            );
        }
        self.deliver_one(&target, &wire::request_tail(id, &client.id, data));
        Ok(())
    }

    /// Relays `client`'s response to request `id` of the client `to`.
    pub fn respond(
        &self,
        client: &Arc<Client>,
        id: u64,
        to: &str,
        data: Option<&str>,
        error: Option<&str>,
    ) -> Result<(), WireError> {
        let Some(requester) = lock(&self.0.clients).get(to).cloned() else {
            return Err(unknown_client(to));
        };
        {
            let mut st = lock(&requester.state);
            match st.pending.get(&id) {
                Some(p) if p.target == client.id => {
                    if let Some(p) = st.pending.remove(&id) {
                        p.timer.abort();
                    }
                }
                _ => {
                    return Err(WireError::new(
                        Code::UnknownRequest,
                        format!(
                            "{to} has no request {id} waiting for you (answered or timed out?)"
                        ),
                    ));
                }
            }
        }
        let data = data.or(if error.is_none() { Some("null") } else { None });
        self.deliver_one(
            &requester,
            &wire::response_tail(id, &client.id, data, error),
        );
        Ok(())
    }

    /// Client states held (for tests and the status page).
    pub fn len(&self) -> usize {
        lock(&self.0.clients).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn not_member(room: &str) -> WireError {
    WireError::new(
        Code::NotMember,
        format!("not a member of room {}", wire::json_str(room)),
    )
}

pub fn unknown_client(id: &str) -> WireError {
    WireError::new(
        Code::UnknownClient,
        format!(
            "no client {} (never connected, or expired)",
            wire::json_str(id)
        ),
    )
}
