//! The reliable protocol's state that outlives sockets: every client (its sequence numbers,
//! its buffer of unacknowledged messages, its rooms and its pending requests) and the rooms.
//!
//! Owns numbering, buffering, resending, resume, room membership and fan-out, request
//! timeouts, the caps on client states, and the congestion signal that back-pressure is
//! built on (a connected receiver whose buffer is past half its bounds is *congested*; a
//! sender's reader waits for it, see [`super`]). Knows no socket: a connected client has an
//! [`Outbound`] queue attached, and everything the server sends it goes through that queue
//! (or only into the buffer while it is away).
//!
//! Rooms are a small registry of this module rather than [`crate::core::hub`] sessions: a
//! hub member is a connection's queue, and a message is one payload shared by every member,
//! while here a member is a client state that may have no connection at all (its messages
//! wait in its buffer for a resume), and every receiver needs its own sequence number.
//!
//! Locks: `clients` and `rooms` (maps), one per [`Room`], one per [`Client`], and
//! `detached` (per-address counts, a leaf: nothing is locked while it is held); all
//! `std::sync::Mutex`, never held across `.await`. Order: rooms map, then a room, then
//! clients one at a time; the clients map is never held with another lock. Fan-out to a room
//! happens under the room's lock, so every member sees the room's messages and announcements
//! in one order.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::Notify;
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
/// The close sent after a hello refused with `too_many_clients` (1013: try again later).
pub const TOO_MANY_CLIENTS: Close = Close {
    code: 1013,
    reason: "too many reliable clients: try again later",
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
    /// Requests waiting for this client's response, as (requester id, request id): they end
    /// at once (`unknown_client`) if this state is dropped.
    incoming: HashSet<(Arc<str>, u64)>,
    /// A sender waited for this client's acks for the whole back-pressure wait in vain:
    /// nobody waits for it again until its buffer is back under the mark.
    stalled: bool,
    /// The (non-exempt) address of its last connection, for the per-address cap.
    addr: Option<IpAddr>,
    /// Whether it is counted among the states without a connection.
    counted_detached: bool,
}

/// One client, connected or waiting for a resume.
#[derive(Debug)]
pub struct Client {
    pub id: Arc<str>,
    /// Proves ownership of `id` on a resume (ids are visible to room members).
    token: String,
    state: Mutex<ClientState>,
    /// Woken (`notify_waiters`) when this client acknowledges something, loses its
    /// connection or is dropped: senders waiting for it look again.
    drained: Notify,
}

#[derive(Debug, Default)]
struct Members {
    /// Set when the room is removed from the map (last member left).
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
    limits: wire::Limits,
    max_room_members: usize,
    metrics: Arc<Metrics>,
    clients: Mutex<HashMap<Arc<str>, Arc<Client>>>,
    rooms: Mutex<HashMap<Arc<str>, Arc<Room>>>,
    /// States without a connection per (non-exempt) client address; entries are removed at
    /// zero.
    detached: Mutex<HashMap<IpAddr, usize>>,
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
    /// This connection no longer holds the client (resumed elsewhere, or dropped): ignore.
    Elsewhere,
}

/// Connected receivers past the high-water mark after an operation: its sender waits for
/// them (see [`Registry::until_drained`]).
pub type Congested = Vec<Arc<Client>>;

/// What deliveries leave to do once no lock is held.
#[derive(Default)]
struct Fanout {
    /// States whose buffer overflowed, to [`Registry::remove`].
    overflowed: Vec<Arc<Client>>,
    congested: Congested,
}

impl Registry {
    pub fn new(config: ReliableConfig, max_room_members: usize, metrics: Arc<Metrics>) -> Self {
        let limits = wire::Limits {
            max_message_bytes: config.max_message_bytes,
            messages_per_second: config.messages_per_second,
            message_burst: config.message_burst,
        };
        Registry(Arc::new(Inner {
            config,
            limits,
            max_room_members,
            metrics,
            clients: Mutex::new(HashMap::new()),
            rooms: Mutex::new(HashMap::new()),
            detached: Mutex::new(HashMap::new()),
        }))
    }

    pub fn config(&self) -> &ReliableConfig {
        &self.0.config
    }

    fn welcome(&self, client: &Client, resumed: bool, seq: u64) -> Arc<Payload> {
        Payload::text(wire::welcome(
            &client.id,
            self.0.config.heartbeat.as_millis() as u64,
            resumed,
            seq,
            &client.token,
            &self.0.limits,
        ))
    }

    /// Counts `st` among the states without a connection (`up`), or stops counting it.
    fn count_detached(&self, st: &mut ClientState, up: bool) {
        if st.counted_detached == up {
            return;
        }
        st.counted_detached = up;
        if up {
            self.0.metrics.reliable_detached.inc();
        } else {
            self.0.metrics.reliable_detached.dec();
        }
        let Some(addr) = st.addr else { return };
        let mut detached = lock(&self.0.detached);
        if up {
            *detached.entry(addr).or_insert(0) += 1;
        } else if let Some(n) = detached.get_mut(&addr) {
            *n -= 1;
            if *n == 0 {
                detached.remove(&addr);
            }
        }
    }

    /// Answers a hello on connection `conn` from `addr` (`None` when the address is exempt
    /// from per-address limits): resumes the client it names when continuity can be proven
    /// (known id, right token, `last_seq` within what the server still holds), else makes a
    /// new client, unless too many states are held (`too_many_clients`). Queues the welcome
    /// and, on a resume, every unacknowledged message after `last_seq`, in order, before
    /// anything else can reach the queue (the queue of a reliable connection holds a whole
    /// buffer: [`super`]).
    pub fn hello(
        &self,
        resume: Option<wire::Resume<'_>>,
        conn: ConnId,
        outbound: &Outbound,
        addr: Option<IpAddr>,
    ) -> Result<Arc<Client>, WireError> {
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
                    self.count_detached(&mut st, false);
                    st.addr = addr;
                    st.attached = Some((conn, outbound.clone()));
                    st.generation += 1;
                    Self::ack_locked(&mut st, r.last_seq);
                    if !self.over_mark(&st) {
                        st.stalled = false;
                    }
                    // The connection is new: its queue is empty and holds a whole buffer.
                    let _ = outbound.send(self.welcome(&client, true, st.received));
                    let now = Instant::now();
                    let resent = st.unacked.len() as u64;
                    for u in st.unacked.iter_mut() {
                        u.sent_at = now;
                        let _ = outbound.send(u.payload.clone());
                    }
                    drop(st);
                    self.0.metrics.reliable_resumes.inc();
                    self.0.metrics.reliable_resends.inc_by(resent);
                    return Ok(client);
                }
                debug!(client = %client.id, token_ok, "resume refused");
            }
        }
        self.admit(addr)?;
        let client = Arc::new(Client {
            id: uuid::Uuid::new_v4().to_string().into(),
            token: uuid::Uuid::new_v4().simple().to_string(),
            state: Mutex::new(ClientState {
                attached: Some((conn, outbound.clone())),
                generation: 1,
                addr,
                ..ClientState::default()
            }),
            drained: Notify::new(),
        });
        // Sent before the client is findable, so nothing can precede the welcome.
        let _ = outbound.send(self.welcome(&client, false, 0));
        lock(&self.0.clients).insert(client.id.clone(), client.clone());
        self.0.metrics.reliable_clients.inc();
        Ok(client)
    }

    /// Whether one more client state may be made for a connection from `addr`.
    fn admit(&self, addr: Option<IpAddr>) -> Result<(), WireError> {
        let c = &self.0.config;
        let refusal = if self.len() >= c.max_clients {
            Some(format!(
                "the server holds {} client states, its maximum: try again later",
                c.max_clients
            ))
        } else {
            addr.filter(|a| {
                lock(&self.0.detached).get(a).copied().unwrap_or(0) >= c.max_detached_per_ip
            })
            .map(|_| {
                format!(
                    "{} client states from your address wait for a resume, the maximum: \
                         resume one of them, or try again later",
                    c.max_detached_per_ip
                )
            })
        };
        match refusal {
            Some(message) => {
                self.0.metrics.reliable_refused.inc();
                Err(WireError::new(Code::TooManyClients, message))
            }
            None => Ok(()),
        }
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
            self.count_detached(&mut st, true);
            st.generation
        };
        // Senders waiting for it stop: nobody waits for a client without a connection.
        client.drained.notify_waiters();
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
    /// requests cancelled, the requests waiting for it answered (`unknown_client`). Call with
    /// no lock held.
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
        let (rooms, pending, incoming) = {
            let mut st = lock(&client.state);
            st.unacked.clear();
            st.unacked_bytes = 0;
            self.count_detached(&mut st, false);
            (
                std::mem::take(&mut st.rooms),
                std::mem::take(&mut st.pending),
                std::mem::take(&mut st.incoming),
            )
        };
        client.drained.notify_waiters();
        for (id, p) in pending {
            p.timer.abort();
            if let Some(target) = self.find(&p.target) {
                lock(&target.state)
                    .incoming
                    .remove(&(client.id.clone(), id));
            }
        }
        for (requester_id, id) in incoming {
            let Some(requester) = self.find(&requester_id) else {
                continue;
            };
            let ended = {
                let mut st = lock(&requester.state);
                match st.pending.get(&id) {
                    Some(p) if p.target == client.id => st.pending.remove(&id),
                    _ => None,
                }
            };
            if let Some(p) = ended {
                p.timer.abort();
                let e = WireError::new(
                    Code::UnknownClient,
                    format!(
                        "client {} is gone (its state expired or was dropped) before it answered",
                        wire::json_str(&client.id)
                    ),
                );
                let error = wire::response_error(e.code, &e.message);
                self.deliver_one(
                    &requester,
                    &wire::response_tail(id, &client.id, None, Some(&error)),
                );
            }
        }
        for room in rooms {
            self.leave_room(&room, client);
        }
    }

    fn find(&self, id: &str) -> Option<Arc<Client>> {
        lock(&self.0.clients).get(id).cloned()
    }

    /// Whether a buffer is past the high-water mark: half of either bound.
    fn over_mark(&self, st: &ClientState) -> bool {
        let c = &self.0.config;
        st.unacked.len() > c.buffer_messages / 2 || st.unacked_bytes > c.buffer_bytes / 2
    }

    /// Whether a sender should wait for `client`: connected, not stalled, past the mark.
    pub fn is_congested(&self, client: &Client) -> bool {
        let st = lock(&client.state);
        st.attached.is_some() && !st.dropped && !st.stalled && self.over_mark(&st)
    }

    /// Waits until none of `receivers` is congested (true), or until `deadline` (false).
    pub async fn until_drained(&self, receivers: &[Arc<Client>], deadline: Instant) -> bool {
        for r in receivers {
            loop {
                let notified = r.drained.notified();
                tokio::pin!(notified);
                // Registered before the check, so a wake between the check and the await
                // counts.
                notified.as_mut().enable();
                if !self.is_congested(r) {
                    break;
                }
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    return false;
                }
            }
        }
        true
    }

    /// A wait for `receivers` ran out: those still congested are stalled (nobody waits for
    /// them until their buffer is back under the mark; a full buffer drops them as ever).
    /// Returns how many.
    pub fn stall(&self, receivers: &[Arc<Client>]) -> usize {
        let mut stalled = 0;
        for r in receivers {
            if self.is_congested(r) {
                lock(&r.state).stalled = true;
                debug!(client = %r.id, "stalled: no acks within the back-pressure wait");
                stalled += 1;
            }
        }
        stalled
    }

    /// Numbers, buffers and (when connected) queues one message for `client`. On overflow
    /// the client's state is marked dropped, its connection told and closed, and the client
    /// pushed to `fan.overflowed` for [`Registry::remove`] once no lock is held. A receiver
    /// other than `sender` left past the high-water mark goes to `fan.congested`.
    fn deliver(
        &self,
        client: &Arc<Client>,
        tail: &[u8],
        fan: &mut Fanout,
        sender: Option<&Client>,
    ) {
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
            fan.overflowed.push(client.clone());
            return;
        }
        st.sent = seq;
        st.unacked_bytes += len;
        if let Some((_, out)) = &st.attached {
            // The queue holds a whole buffer plus --outbound-queue-bytes: it is full only
            // when the peer stops reading. Then it closes as a slow consumer, and the message
            // stays in the buffer for the resume.
            let _ = out.send(payload.clone());
        }
        st.unacked.push_back(Unacked {
            seq,
            payload,
            sent_at: Instant::now(),
        });
        let congested = st.attached.is_some() && !st.stalled && self.over_mark(&st);
        drop(st);
        if congested && !sender.is_some_and(|s| std::ptr::eq(s, &**client)) {
            fan.congested.push(client.clone());
        }
    }

    /// Drops what overflowed; returns the congested receivers.
    fn finish(&self, fan: Fanout) -> Congested {
        for c in fan.overflowed {
            self.remove(&c);
        }
        fan.congested
    }

    /// Delivers one message to one client, from no sender that could wait.
    fn deliver_one(&self, client: &Arc<Client>, tail: &[u8]) {
        let mut fan = Fanout::default();
        self.deliver(client, tail, &mut fan, None);
        self.finish(fan);
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
        if seq <= st.acked {
            return Ok(());
        }
        Self::ack_locked(&mut st, seq);
        if !self.over_mark(&st) {
            st.stalled = false;
        }
        drop(st);
        client.drained.notify_waiters();
        Ok(())
    }

    /// Checks a message's sequence number, received on connection `conn`, against what was
    /// received; an in-order one is counted as received.
    pub fn receive(&self, client: &Client, conn: ConnId, seq: u64) -> Received {
        let mut st = lock(&client.state);
        if st.dropped || st.attached.as_ref().map(|(c, _)| *c) != Some(conn) {
            Received::Elsewhere
        } else if seq <= st.received {
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

    /// Resends, on `client`'s connection `conn`, the messages unacknowledged for longer than
    /// the resend timeout, oldest first, as far as they fit in `--outbound-queue-bytes` with
    /// what is queued already (the rest waits for a later call): a resend never makes a
    /// reader a slow consumer, and never piles up behind copies not written yet.
    pub fn resend_due(&self, client: &Client, conn: ConnId) {
        let now = Instant::now();
        let c = &self.0.config;
        let mut st = lock(&client.state);
        let Some((_, out)) = st.attached.clone().filter(|(id, _)| *id == conn) else {
            return;
        };
        let mut queued = out.queued_bytes();
        let mut resent = 0;
        // Not in `sent_at` order after a partial resend: every message is looked at.
        for u in st.unacked.iter_mut() {
            if now.duration_since(u.sent_at) < c.resend {
                continue;
            }
            let len = u.payload.data().len();
            if queued + len > c.outbound_queue_bytes {
                break;
            }
            queued += len;
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
    pub fn join(&self, client: &Arc<Client>, room: &str) -> Result<Congested, WireError> {
        if lock(&client.state).rooms.contains(room) {
            return Ok(Vec::new());
        }
        let mut fan = Fanout::default();
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
            {
                let mut st = lock(&client.state);
                // Dropped by another task meanwhile (an overflow): its rooms were taken
                // already, so it must not become a member that nobody would ever remove.
                if st.dropped {
                    if members.list.is_empty() {
                        members.dead = true;
                        rooms.remove(&name);
                    }
                    return Ok(Vec::new());
                }
                st.rooms.insert(name.clone());
            }
            drop(rooms);
            members.list.push(client.clone());
            let tail = wire::announce_tail("join", room, &client.id);
            for m in &members.list {
                self.deliver(m, &tail, &mut fan, Some(client));
            }
        }
        Ok(self.finish(fan))
    }

    /// Takes `client` out of `room`, announcing it to the members left.
    pub fn leave(&self, client: &Arc<Client>, room: &str) -> Result<Congested, WireError> {
        if !lock(&client.state).rooms.remove(room) {
            return Err(not_member(room));
        }
        Ok(self.leave_room(room, client))
    }

    fn leave_room(&self, room: &str, client: &Arc<Client>) -> Congested {
        let mut fan = Fanout::default();
        {
            let mut rooms = lock(&self.0.rooms);
            let Some(r) = rooms.get(room).cloned() else {
                return Vec::new();
            };
            let mut members = lock(&r.members);
            members.list.retain(|m| !Arc::ptr_eq(m, client));
            if members.list.is_empty() {
                members.dead = true;
                rooms.remove(room);
                return Vec::new();
            }
            drop(rooms);
            let tail = wire::announce_tail("leave", room, &client.id);
            for m in &members.list {
                self.deliver(m, &tail, &mut fan, Some(client));
            }
        }
        self.finish(fan)
    }

    /// Relays `data` to every other member of `room`; the sender must be a member.
    pub fn publish(
        &self,
        client: &Arc<Client>,
        room: &str,
        data: &serde_json::value::RawValue,
    ) -> Result<Congested, WireError> {
        if !lock(&client.state).rooms.contains(room) {
            return Err(not_member(room));
        }
        let Some(r) = lock(&self.0.rooms).get(room).cloned() else {
            return Err(not_member(room));
        };
        let tail = wire::publish_tail(room, &client.id, data);
        let mut fan = Fanout::default();
        {
            let members = lock(&r.members);
            for m in members.list.iter().filter(|m| !Arc::ptr_eq(m, client)) {
                self.deliver(m, &tail, &mut fan, Some(client));
            }
        }
        Ok(self.finish(fan))
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
    ) -> Result<Congested, WireError> {
        let Some(target) = self.find(to) else {
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
            let target_ref: Weak<Client> = Arc::downgrade(&target);
            let timer = tokio::spawn(async move {
                tokio::time::sleep(timeout).await;
                let timed_out = lock(&requester.state).pending.remove(&id).is_some();
                if timed_out {
                    if let Some(t) = target_ref.upgrade() {
                        lock(&t.state).incoming.remove(&(requester.id.clone(), id));
                    }
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
        // Registered at the target after the pending entry: a target dropped from now on
        // finds it and ends it; one dropped already is unknown.
        let registered = {
            let mut t = lock(&target.state);
            !t.dropped && t.incoming.insert((client.id.clone(), id))
        };
        if !registered {
            if let Some(p) = lock(&client.state).pending.remove(&id) {
                p.timer.abort();
            }
            return Err(unknown_client(to));
        }
        let mut fan = Fanout::default();
        self.deliver(
            &target,
            &wire::request_tail(id, &client.id, data),
            &mut fan,
            Some(client),
        );
        Ok(self.finish(fan))
    }

    /// Relays `client`'s response to request `id` of the client `to`.
    pub fn respond(
        &self,
        client: &Arc<Client>,
        id: u64,
        to: &str,
        data: Option<&str>,
        error: Option<&str>,
    ) -> Result<Congested, WireError> {
        let Some(requester) = self.find(to) else {
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
        lock(&client.state)
            .incoming
            .remove(&(requester.id.clone(), id));
        let data = data.or(if error.is_none() { Some("null") } else { None });
        let mut fan = Fanout::default();
        self.deliver(
            &requester,
            &wire::response_tail(id, &client.id, data, error),
            &mut fan,
            Some(client),
        );
        Ok(self.finish(fan))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn registry() -> Registry {
        let config = Config::default();
        Registry::new(config.reliable, 16, Arc::new(Metrics::new()))
    }

    #[tokio::test]
    async fn a_client_dropped_meanwhile_does_not_join_a_room() {
        let r = registry();
        let out = Outbound::new(1 << 20);
        let c = r.hello(None, ConnId::next(), &out, None).unwrap();
        // What an overflow on another task does first, before it removes the client.
        lock(&c.state).dropped = true;
        assert_eq!(r.join(&c, "room").unwrap().len(), 0);
        assert!(r.presence("room").is_empty());
        assert!(lock(&r.0.rooms).is_empty(), "no empty room left behind");
        assert!(lock(&c.state).rooms.is_empty());
    }

    #[tokio::test]
    async fn per_address_cap_counts_states_without_a_connection() {
        let mut config = Config::default().reliable;
        config.max_detached_per_ip = 1;
        let r = Registry::new(config, 16, Arc::new(Metrics::new()));
        let addr: IpAddr = "192.0.2.1".parse().unwrap();
        let (conn, out) = (ConnId::next(), Outbound::new(1 << 20));
        let a = r.hello(None, conn, &out, Some(addr)).unwrap();
        // Connected states do not count: a second one is fine.
        let (conn_b, out_b) = (ConnId::next(), Outbound::new(1 << 20));
        let _b = r.hello(None, conn_b, &out_b, Some(addr)).unwrap();
        r.detach(&a, conn);
        let e = r.hello(None, ConnId::next(), &out, Some(addr)).unwrap_err();
        assert_eq!(e.code, Code::TooManyClients);
        // Another address, and exempt ones, are not affected.
        r.hello(
            None,
            ConnId::next(),
            &out,
            Some("192.0.2.2".parse().unwrap()),
        )
        .unwrap();
        r.hello(None, ConnId::next(), &out, None).unwrap();
        // Resuming the waiting state frees the place.
        let resume = wire::Resume {
            client_id: a.id.to_string().into(),
            last_seq: 0,
            token: Some(a.token.clone().into()),
        };
        let again = r
            .hello(Some(resume), ConnId::next(), &out, Some(addr))
            .unwrap();
        assert!(Arc::ptr_eq(&again, &a));
        r.hello(None, ConnId::next(), &out, Some(addr)).unwrap();
    }
}
