//! The reliable protocol's state that outlives sockets: every client (its sequence numbers,
//! its buffer of unacknowledged messages, its rooms and its pending requests) and the rooms.
//!
//! Owns numbering, buffering, sending and resending, resume, room membership and fan-out,
//! request timeouts, and the caps on client states, rooms per client and buffered bytes.
//! Knows no socket: a connected client has an [`Outbound`] queue attached, and everything
//! the server sends it goes through that queue (or only into its buffer while it is away).
//!
//! Three decisions shape it:
//!
//! - **One copy of each message.** A message is rendered once for all its receivers (a
//!   [`Body`]: the frame after the receiver's own `seq`); a receiver's buffer holds its
//!   number and a reference to the body. The frame's bytes are put together only when it is
//!   written to a connection. Every body alive counts once in the bytes held by all states
//!   (`reliable_buffered_bytes`), bounded by `--reliable-total-buffer-bytes`.
//! - **A window, not a copy of the buffer, in the queue.** A connected client's numbered
//!   messages are queued only while its queue holds less than `--outbound-queue-bytes`; the
//!   rest wait in its buffer and follow as the writer drains the queue ([`Registry::pump`]).
//!   So a resume of a full buffer, or resends, never make a reading client a slow consumer.
//! - **No sender waits for a receiver.** A message is numbered, buffered and queued for every
//!   receiver at once; a receiver that falls behind fills its own buffer, and at its bounds
//!   its state is dropped (`overflow`): the sender and the other members never notice.
//!
//! Rooms are a small registry of this module rather than [`crate::core::hub`] sessions: a
//! hub member is a connection's queue, and a message is one payload shared by every member,
//! while here a member is a client state that may have no connection at all (its messages
//! wait in its buffer for a resume), and every receiver needs its own sequence number.
//!
//! Locks: `clients` and `rooms` (maps), one per [`Room`], one per [`Client`], and two
//! leaves (nothing is locked while they are held): `detached` (per-address counts) and
//! `waiting` (states without a connection that hold messages, oldest first). All
//! `std::sync::Mutex`, never held across `.await`. Order: rooms map, then a room, then
//! clients one at a time; the clients map is never held with another lock. Fan-out to a room
//! happens under the room's lock, so every member sees the room's messages and announcements
//! in one order.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use prometheus_client::metrics::gauge::Gauge;
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

/// One message as every receiver gets it after its own `{"t":"msg","seq":N`: rendered once,
/// shared by every receiver's buffer. Counted in `reliable_buffered_bytes` while alive.
#[derive(Debug)]
struct Body {
    tail: Bytes,
    held: Gauge,
}

impl Drop for Body {
    fn drop(&mut self) {
        self.held.dec_by(self.tail.len() as i64);
    }
}

/// One message numbered for a client and not yet acknowledged.
#[derive(Debug)]
struct Unacked {
    seq: u64,
    body: Arc<Body>,
    /// The frame's length ([`wire::msg_len`]): what it counts against the client's bounds.
    len: usize,
    /// When it was last written to the current connection; `None` until first written there.
    sent_at: Option<Instant>,
    /// Resent on the current connection because the client named it missing: a later
    /// request for it waits for the resend guard.
    requested: bool,
}

impl Unacked {
    fn frame(&self) -> Arc<Payload> {
        Payload::text(wire::msg(self.seq, &self.body.tail))
    }
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
    /// How many of the last messages of `unacked` are not yet written to the current
    /// connection (all of them while there is none): they are written in order, as the
    /// connection's window allows.
    unsent: usize,
    /// The last sequence number received (and processed) from this client.
    received: u64,
    rooms: BTreeSet<Arc<str>>,
    /// The connection this client is on, if any.
    attached: Option<(ConnId, Outbound)>,
    /// Bumped at every attach and detach, so a resume-window timer knows whether it is stale.
    generation: u64,
    /// Set once the state is dropped (overflow, expiry, eviction): nothing is delivered any
    /// more.
    dropped: bool,
    pending: HashMap<u64, Pending>,
    /// Requests waiting for this client's response, as (requester id, request id): they end
    /// at once (`unknown_client`) if this state is dropped.
    incoming: HashSet<(Arc<str>, u64)>,
    /// The (non-exempt) address of its last connection, for the per-address cap.
    addr: Option<IpAddr>,
    /// Whether it is counted among the states without a connection.
    counted_detached: bool,
    /// Its key in the registry's `waiting` line (no connection, messages held).
    waiting: Option<u64>,
}

/// One client, connected or waiting for a resume.
#[derive(Debug)]
pub struct Client {
    pub id: Arc<str>,
    /// Proves ownership of `id` on a resume (ids are visible to room members): the id alone
    /// never resumes.
    token: String,
    state: Mutex<ClientState>,
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
    /// States without a connection that hold messages, in the order they started waiting
    /// (keys from `next_waiting`): the first to be dropped when the bytes held by all states
    /// reach `--reliable-total-buffer-bytes`.
    waiting: Mutex<(u64, BTreeMap<u64, Weak<Client>>)>,
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
    /// Ahead of the next expected one (`expected`): keep it for later, or drop it.
    Ahead { expected: u64 },
    /// This connection no longer holds the client (resumed elsewhere, or dropped): ignore.
    Elsewhere,
}

/// What deliveries leave to do once no lock is held: states whose buffer overflowed, to
/// [`Registry::remove`].
#[derive(Default)]
struct Fanout {
    overflowed: Vec<Arc<Client>>,
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
            waiting: Mutex::new((0, BTreeMap::new())),
        }))
    }

    pub fn config(&self) -> &ReliableConfig {
        &self.0.config
    }

    /// How long a message resent on request must wait before another request resends it
    /// again: an eighth of the resend timeout, so that the requests a receiver sends before
    /// the resend reaches it do not each cost a copy.
    fn request_guard(&self) -> Duration {
        (self.0.config.resend / 8).max(Duration::from_millis(1))
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

    /// Puts a state without a connection that holds messages in the `waiting` line.
    fn start_waiting(&self, client: &Arc<Client>, st: &mut ClientState) {
        if st.waiting.is_some() || st.attached.is_some() || st.unacked.is_empty() {
            return;
        }
        let mut waiting = lock(&self.0.waiting);
        let key = waiting.0;
        waiting.0 += 1;
        waiting.1.insert(key, Arc::downgrade(client));
        st.waiting = Some(key);
    }

    fn stop_waiting(&self, st: &mut ClientState) {
        if let Some(key) = st.waiting.take() {
            lock(&self.0.waiting).1.remove(&key);
        }
    }

    /// Answers a hello on connection `conn` from `addr` (`None` when the address is exempt
    /// from per-address limits): resumes the client it names when continuity can be proven
    /// (known id, the welcome's token, `last_seq` within what the server still holds), else
    /// makes a new client, unless too many states are held (`too_many_clients`). On a resume,
    /// queues the welcome and then the unacknowledged messages after `last_seq`, in order, as
    /// far as the window allows (the rest follow through [`Registry::pump`]), before anything
    /// else can reach the queue.
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
                // The id is public (every room member sees it): only the token resumes.
                let token_ok = r
                    .token
                    .as_deref()
                    .is_some_and(|t| crate::core::secret_eq(t, &client.token));
                let mut st = lock(&client.state);
                if token_ok && !st.dropped && r.last_seq >= st.acked && r.last_seq <= st.sent {
                    if let Some((_, old)) = st.attached.take() {
                        let e = WireError::new(Code::Replaced, "resumed on another connection");
                        // The old connection may be closing already.
                        let _ = old.send(Payload::text(wire::error(&e, None)));
                        old.close(REPLACED);
                    }
                    self.count_detached(&mut st, false);
                    self.stop_waiting(&mut st);
                    st.addr = addr;
                    st.attached = Some((conn, outbound.clone()));
                    st.generation += 1;
                    Self::ack_locked(&mut st, r.last_seq);
                    for u in st.unacked.iter_mut() {
                        u.sent_at = None;
                        u.requested = false;
                    }
                    st.unsent = st.unacked.len();
                    // The connection is new: its queue is empty.
                    let _ = outbound.send(self.welcome(&client, true, st.received));
                    let resent = st.unacked.len() as u64;
                    self.pump_locked(&mut st, Instant::now());
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
            self.start_waiting(client, &mut st);
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
            st.unsent = 0;
            self.count_detached(&mut st, false);
            self.stop_waiting(&mut st);
            (
                std::mem::take(&mut st.rooms),
                std::mem::take(&mut st.pending),
                std::mem::take(&mut st.incoming),
            )
        };
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
                    wire::response_tail(id, &client.id, None, Some(&error)),
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

    /// A message's shared body, counted in the bytes held by all states.
    fn body(&self, tail: Vec<u8>) -> Arc<Body> {
        let held = self.0.metrics.reliable_buffered_bytes.clone();
        held.inc_by(tail.len() as i64);
        Arc::new(Body {
            tail: tail.into(),
            held,
        })
    }

    /// Makes room for a client's message of `len` bytes under `--reliable-total-buffer-bytes`:
    /// drops states without a connection, those waiting longest first (as if their resume
    /// window had ended), until it fits; refuses it (`server_busy`) if connected clients
    /// hold the rest. Call with no lock held.
    fn make_room(&self, len: usize) -> Result<(), WireError> {
        let max = self.0.config.total_buffer_bytes;
        let held = &self.0.metrics.reliable_buffered_bytes;
        while held.get().max(0) as usize + len > max {
            let first = lock(&self.0.waiting).1.pop_first();
            let Some((key, client)) = first else {
                self.0.metrics.error("reliable_server_busy");
                return Err(WireError::new(
                    Code::ServerBusy,
                    format!(
                        "the server holds {max} bytes of unacknowledged messages, its \
                         maximum: try again later"
                    ),
                ));
            };
            let Some(client) = client.upgrade() else {
                continue;
            };
            let evicted = {
                let mut st = lock(&client.state);
                if st.waiting != Some(key) || st.dropped || st.attached.is_some() {
                    false
                } else {
                    st.waiting = None;
                    st.dropped = true;
                    st.unacked.clear();
                    st.unacked_bytes = 0;
                    st.unsent = 0;
                    true
                }
            };
            if evicted {
                debug!(client = %client.id, "dropped to make room for new messages");
                self.0.metrics.reliable_evicted.inc();
                self.remove(&client);
            }
        }
        Ok(())
    }

    /// Numbers and buffers one message for `client`, and queues it if its connection's window
    /// allows. On overflow the client's state is marked dropped, its connection told and
    /// closed, and the client pushed to `fan.overflowed` for [`Registry::remove`] once no
    /// lock is held.
    fn deliver(&self, client: &Arc<Client>, body: &Arc<Body>, fan: &mut Fanout) {
        let mut st = lock(&client.state);
        if st.dropped {
            return;
        }
        let seq = st.sent + 1;
        let len = wire::msg_len(seq, body.tail.len());
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
        st.unacked.push_back(Unacked {
            seq,
            body: body.clone(),
            len,
            sent_at: None,
            requested: false,
        });
        st.unsent += 1;
        if st.attached.is_some() {
            self.pump_locked(&mut st, Instant::now());
        } else {
            self.start_waiting(client, &mut st);
        }
    }

    /// Writes the client's next unsent messages, in order, while its connection's queue
    /// holds less than `--outbound-queue-bytes` (at least one when it is empty). Returns
    /// how many.
    fn pump_locked(&self, st: &mut ClientState, now: Instant) -> usize {
        let Some((_, out)) = st.attached.clone() else {
            return 0;
        };
        let window = self.0.config.outbound_queue_bytes;
        let mut queued = out.queued_bytes();
        let first = st.unacked.len() - st.unsent;
        let mut written = 0;
        for u in st.unacked.range_mut(first..) {
            if queued > 0 && queued + u.len > window {
                break;
            }
            if out.send(u.frame()).is_err() {
                // Closing: everything unsent is written after a resume.
                break;
            }
            queued += u.len;
            u.sent_at = Some(now);
            written += 1;
        }
        st.unsent -= written;
        written
    }

    /// Whether `client`, on connection `conn`, has messages waiting for room in the window.
    pub fn has_backlog(&self, client: &Client, conn: ConnId) -> bool {
        let st = lock(&client.state);
        st.unsent > 0 && st.attached.as_ref().is_some_and(|(c, _)| *c == conn)
    }

    /// Writes what waits for room in the window of `client`'s connection `conn` (called as
    /// its queue drains).
    pub fn pump(&self, client: &Client, conn: ConnId) {
        let mut st = lock(&client.state);
        if st.attached.as_ref().is_some_and(|(c, _)| *c == conn) {
            self.pump_locked(&mut st, Instant::now());
        }
    }

    fn finish(&self, fan: Fanout) {
        for c in fan.overflowed {
            self.remove(&c);
        }
    }

    /// Delivers one message of the server's to one client.
    fn deliver_one(&self, client: &Arc<Client>, tail: Vec<u8>) {
        let mut fan = Fanout::default();
        self.deliver(client, &self.body(tail), &mut fan);
        self.finish(fan);
    }

    fn ack_locked(st: &mut ClientState, seq: u64) {
        if seq <= st.acked {
            return;
        }
        while st.unacked.front().is_some_and(|u| u.seq <= seq) {
            if let Some(u) = st.unacked.pop_front() {
                st.unacked_bytes -= u.len;
            }
        }
        st.unsent = st.unsent.min(st.unacked.len());
        st.acked = seq;
    }

    /// An acknowledgement (from an `ack` or a heartbeat) on connection `conn`: cumulative,
    /// then the messages it names missing are resent at once (on that connection, as far as
    /// its window allows; one resent on request already waits for the request guard).
    pub fn ack(&self, client: &Client, conn: ConnId, ack: &wire::Ack) -> Result<(), WireError> {
        let mut st = lock(&client.state);
        let last = ack
            .missing
            .iter()
            .map(|r| r.1)
            .max()
            .unwrap_or(0)
            .max(ack.seq);
        if last > st.sent {
            return Err(WireError::new(
                Code::BadAck,
                format!(
                    "ack {last} for a message never sent: the last sent is {}",
                    st.sent
                ),
            ));
        }
        Self::ack_locked(&mut st, ack.seq);
        let Some((_, out)) = st
            .attached
            .clone()
            .filter(|(c, _)| *c == conn && !ack.missing.is_empty())
        else {
            return Ok(());
        };
        let now = Instant::now();
        let guard = self.request_guard();
        let window = self.0.config.outbound_queue_bytes;
        let mut queued = out.queued_bytes();
        let (acked, written) = (st.acked, st.unacked.len() - st.unsent);
        let mut resent = 0;
        'ranges: for &(from, to) in &ack.missing {
            // Acknowledged meanwhile, or never written on this connection (the window
            // writes those anyway): nothing to resend.
            let from = from.max(acked + 1);
            let to = to.min(acked + written as u64);
            for seq in from..=to {
                let u = &mut st.unacked[(seq - acked - 1) as usize];
                if u.requested && u.sent_at.is_some_and(|t| now.duration_since(t) < guard) {
                    continue;
                }
                if queued > 0 && queued + u.len > window {
                    break 'ranges;
                }
                if out.send(u.frame()).is_err() {
                    break 'ranges;
                }
                queued += u.len;
                u.sent_at = Some(now);
                u.requested = true;
                resent += 1;
            }
        }
        drop(st);
        if resent > 0 {
            self.0.metrics.reliable_resends.inc_by(resent);
        }
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
            Received::Ahead {
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

    /// On `client`'s connection `conn`: resends the messages unacknowledged for longer than
    /// the resend timeout, oldest first, then writes what waits for the window, as far as
    /// the window allows (the rest waits for a later call): a resend never makes a reader a
    /// slow consumer, and never piles up behind copies not written yet.
    pub fn resend_due(&self, client: &Client, conn: ConnId) {
        let now = Instant::now();
        let c = &self.0.config;
        let mut st = lock(&client.state);
        let Some((_, out)) = st.attached.clone().filter(|(id, _)| *id == conn) else {
            return;
        };
        let mut queued = out.queued_bytes();
        let mut resent = 0;
        let written = st.unacked.len() - st.unsent;
        // Not in `sent_at` order after a partial resend: every message is looked at.
        for u in st.unacked.range_mut(..written) {
            if u.sent_at.is_some_and(|t| now.duration_since(t) < c.resend) {
                continue;
            }
            if queued > 0 && queued + u.len > c.outbound_queue_bytes {
                break;
            }
            if out.send(u.frame()).is_err() {
                break;
            }
            queued += u.len;
            u.sent_at = Some(now);
            resent += 1;
        }
        self.pump_locked(&mut st, now);
        drop(st);
        if resent > 0 {
            self.0.metrics.reliable_resends.inc_by(resent);
        }
    }

    /// Joins `client` to `room`, announcing the join to every member (the joiner included).
    pub fn join(&self, client: &Arc<Client>, room: &str) -> Result<(), WireError> {
        {
            let st = lock(&client.state);
            if st.rooms.contains(room) {
                return Ok(());
            }
            let max = self.0.config.max_rooms_per_client;
            if st.rooms.len() >= max {
                return Err(WireError::new(
                    Code::TooManyRooms,
                    format!("in {max} rooms already, the maximum: leave one first"),
                ));
            }
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
                    return Ok(());
                }
                st.rooms.insert(name.clone());
            }
            drop(rooms);
            members.list.push(client.clone());
            let body = self.body(wire::announce_tail("join", room, &client.id));
            for m in &members.list {
                self.deliver(m, &body, &mut fan);
            }
        }
        self.finish(fan);
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
        let mut fan = Fanout::default();
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
            let body = self.body(wire::announce_tail("leave", room, &client.id));
            for m in &members.list {
                self.deliver(m, &body, &mut fan);
            }
        }
        self.finish(fan);
    }

    fn is_member(&self, client: &Client, room: &str) -> bool {
        lock(&client.state).rooms.contains(room)
    }

    /// Relays `data` to every other member of `room`; the sender must be a member.
    pub fn publish(
        &self,
        client: &Arc<Client>,
        room: &str,
        data: &serde_json::value::RawValue,
    ) -> Result<(), WireError> {
        if !self.is_member(client, room) {
            return Err(not_member(room));
        }
        let Some(r) = lock(&self.0.rooms).get(room).cloned() else {
            return Err(not_member(room));
        };
        let tail = wire::publish_tail(room, &client.id, data);
        self.make_room(tail.len())?;
        let body = self.body(tail);
        let mut fan = Fanout::default();
        {
            let members = lock(&r.members);
            for m in members.list.iter().filter(|m| !Arc::ptr_eq(m, client)) {
                self.deliver(m, &body, &mut fan);
            }
        }
        self.finish(fan);
        Ok(())
    }

    /// The ids of `room`'s members, in join order, for a member of it (`not_member`
    /// otherwise: ids are for the members of a room only).
    pub fn presence(&self, client: &Client, room: &str) -> Result<Vec<Arc<str>>, WireError> {
        if !self.is_member(client, room) {
            return Err(not_member(room));
        }
        let Some(r) = lock(&self.0.rooms).get(room).cloned() else {
            return Ok(Vec::new());
        };
        let members = lock(&r.members);
        Ok(members.list.iter().map(|m| m.id.clone()).collect())
    }

    /// Answers `client`'s request `id` itself (the server is the target).
    pub fn answer(&self, client: &Arc<Client>, id: u64, data: Option<&str>, error: Option<&str>) {
        self.deliver_one(client, wire::response_tail(id, "server", data, error));
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
        let Some(target) = self.find(to) else {
            return Err(unknown_client(to));
        };
        // Only this client's own connection adds to its pending requests: checked once.
        if lock(&client.state).pending.contains_key(&id) {
            return Err(WireError::new(
                Code::DuplicateRequest,
                format!("request {id} is still waiting for its response"),
            ));
        }
        let tail = wire::request_tail(id, &client.id, data);
        self.make_room(tail.len())?;
        {
            let mut st = lock(&client.state);
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
                        wire::response_tail(id, &target_id, None, Some(&error)),
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
        self.deliver(&target, &self.body(tail), &mut fan);
        self.finish(fan);
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
        let Some(requester) = self.find(to) else {
            return Err(unknown_client(to));
        };
        let unknown = || {
            WireError::new(
                Code::UnknownRequest,
                format!("{to} has no request {id} waiting for you (answered or timed out?)"),
            )
        };
        let waits = |st: &ClientState| st.pending.get(&id).is_some_and(|p| p.target == client.id);
        if !waits(&lock(&requester.state)) {
            return Err(unknown());
        }
        let data = data.or(if error.is_none() { Some("null") } else { None });
        let tail = wire::response_tail(id, &client.id, data, error);
        self.make_room(tail.len())?;
        {
            let mut st = lock(&requester.state);
            if !waits(&st) {
                return Err(unknown());
            }
            if let Some(p) = st.pending.remove(&id) {
                p.timer.abort();
            }
        }
        lock(&client.state)
            .incoming
            .remove(&(requester.id.clone(), id));
        let mut fan = Fanout::default();
        self.deliver(&requester, &self.body(tail), &mut fan);
        self.finish(fan);
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
        r.join(&c, "room").unwrap();
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

    #[tokio::test]
    async fn a_body_is_counted_once_while_any_receiver_holds_it() {
        let r = registry();
        let held = || r.0.metrics.reliable_buffered_bytes.get();
        let clients: Vec<_> = (0..3)
            .map(|_| {
                let (conn, out) = (ConnId::next(), Outbound::new(1 << 20));
                let c = r.hello(None, conn, &out, None).unwrap();
                r.join(&c, "r").unwrap();
                (c, conn)
            })
            .collect();
        for (c, _) in &clients {
            let mut st = lock(&c.state);
            let sent = st.sent;
            Registry::ack_locked(&mut st, sent);
        }
        // Join announcements still held by nobody: freed.
        assert_eq!(held(), 0);
        let data = serde_json::value::RawValue::from_string("\"x\"".into()).unwrap();
        r.publish(&clients[0].0, "r", &data).unwrap();
        let one = held();
        assert!(one > 0);
        let ack = |i: usize| {
            let sent = lock(&clients[i].0.state).sent;
            let a = wire::Ack {
                seq: sent,
                missing: vec![],
            };
            r.ack(&clients[i].0, clients[i].1, &a).unwrap();
        };
        ack(1);
        assert_eq!(held(), one, "still held by the third member");
        ack(2);
        assert_eq!(held(), 0);
    }
}
