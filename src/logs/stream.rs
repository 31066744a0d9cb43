//! The live log stream: stamping entries, and every 100 ms sending each listener one JSON
//! array of the entries it has not seen.
//!
//! Owns the sequence counter, the entries waiting for the next flush and the registry of
//! listeners. Knows nothing of HTTP or the durable store (the caller hands a closure that
//! queues each stamped entry for the store, called under the stamping lock so the store
//! receives entries in `seqNumber` order).
//!
//! Numbering: with a store, `seqNumber`s come from blocks the store has reserved (recorded
//! there before they are handed out: [`Stream::grant`]), so no number is ever handed out
//! twice, across restarts, SIGKILL and retention included. When half of a block is used the
//! stream asks for the next ([`Stream::wants_numbers`]); stamping never waits for it: past
//! the end of its reservation (the store unreachable for that long) it numbers on, and those
//! numbers are covered by the next reservation once the store takes one. Without a store
//! (or when it is unreachable at start) numbering starts from the clock
//! ([`Stream::number_from_clock`]). `serverTime` is taken under the same lock and never goes
//! backwards while `seqNumber` rises.
//!
//! Memory is bounded twice: at most `max_pending` entries wait between two flushes (more
//! are left out of the live stream, still stored, and counted as missed), and a listener's
//! socket never holds more than its buffer: when a flush would push it over, that flush's
//! entries are counted as missed for that listener instead of queued. Once its queue has
//! room again the listener gets one notice saying how many entries it missed (see
//! [`missed_notice`]), then new entries as before. A listener is never closed for being slow.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::entry::{Entry, Posted, json_array, now_ms};
use crate::core::outbound::{Outbound, Payload};
use crate::metrics::Metrics;

/// How often listeners are sent what is new.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// The live stream of one server.
#[derive(Debug)]
pub struct Stream {
    /// A `std` mutex held to stamp a batch (and queue it for the store) or to take the
    /// pending entries; never across `.await`.
    state: Mutex<State>,
    /// A `std` mutex held to add or remove a listener, or for one flush's walk (which only
    /// pushes to the listeners' queues and never waits).
    listeners: Mutex<HashMap<u64, Listener>>,
    next_listener: AtomicU64,
    /// Told (`notify_one`, never waiting) when the numbering wants another reserved block.
    wants_numbers: Notify,
    /// Entries that may wait for one flush; more are left out of the live stream.
    max_pending: usize,
    /// Bytes a listener's socket may hold before its entries count as missed.
    listener_buffer: usize,
    metrics: Arc<Metrics>,
}

#[derive(Debug)]
struct State {
    next_seq: i64,
    /// Numbers below this are reserved in the store; `i64::MAX` when not reserving.
    reserved_until: i64,
    /// The next block granted (first, last), taken once the current one is used up.
    spare: Option<(i64, i64)>,
    /// Size of the blocks asked for; 0: no reservations (no store).
    block: i64,
    /// The last `serverTime` given.
    last_time: i64,
    pending: Vec<Arc<Entry>>,
    /// Entries left out of the live stream since the last flush (over `max_pending`).
    left_out: u64,
}

#[derive(Debug)]
struct Listener {
    room: Option<String>,
    outbound: Outbound,
    /// Entries this listener should have had and did not, not yet told.
    missed: u64,
}

impl State {
    /// Whether another block should be reserved.
    fn wants_numbers(&self) -> bool {
        self.block > 0
            && self.spare.is_none()
            && self.reserved_until.saturating_sub(self.next_seq) < self.block / 2
    }
}

impl Stream {
    /// A stream numbering from 1, without reservations (see [`Stream::reserve_in_blocks`]).
    pub fn new(max_pending: usize, listener_buffer: usize, metrics: Arc<Metrics>) -> Stream {
        Stream {
            state: Mutex::new(State {
                next_seq: 1,
                reserved_until: i64::MAX,
                spare: None,
                block: 0,
                last_time: 0,
                pending: Vec::new(),
                left_out: 0,
            }),
            wants_numbers: Notify::new(),
            listeners: Mutex::new(HashMap::new()),
            next_listener: AtomicU64::new(0),
            max_pending,
            listener_buffer,
            metrics,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing panics under this lock; a poisoned one still holds sound data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn listeners(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Listener>> {
        self.listeners.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// From now on, numbers come from blocks of `block` reserved in the store: none is
    /// reserved yet, so the stream wants one at once.
    pub fn reserve_in_blocks(&self, block: i64) {
        let mut s = self.state();
        s.block = block.max(2);
        s.reserved_until = s.next_seq;
        s.spare = None;
        self.wants_numbers.notify_one();
    }

    /// Numbers from the clock (unix ms x 1000) unless already above: for a server without a
    /// store, or whose store cannot be reached at start. Above every number a store has
    /// handed out unless that ran ahead of the clock by more than 1000 a millisecond.
    pub fn number_from_clock(&self) {
        let mut s = self.state();
        s.next_seq = s.next_seq.max(now_ms().saturating_mul(1000));
    }

    /// Numbers `first..=last` are reserved in the store. Used at once when the current
    /// block is used up (or none was reserved), else kept for when it is.
    pub fn grant(&self, first: i64, last: i64) {
        let mut s = self.state();
        if s.next_seq >= s.reserved_until {
            s.next_seq = s.next_seq.max(first);
            s.reserved_until = last.saturating_add(1);
        } else {
            s.spare = Some((first, last));
        }
        if s.wants_numbers() {
            self.wants_numbers.notify_one();
        }
    }

    /// Returns once the numbering wants another block reserved (for one waiting task).
    pub async fn wants_numbers(&self) {
        loop {
            if self.state().wants_numbers() {
                return;
            }
            // `notify_one` keeps a permit when nobody waits, so none is missed between the
            // check and here.
            self.wants_numbers.notified().await;
        }
    }

    /// The `seqNumber` the next entry will get.
    pub fn next_seq(&self) -> i64 {
        self.state().next_seq
    }

    /// Stamps `posted` with `serverTime` and `seqNumber`, queues them for the next flush,
    /// and hands each to `store` in order.
    pub fn publish(&self, posted: Vec<Posted>, mut store: impl FnMut(Arc<Entry>)) {
        let mut s = self.state();
        // Under the lock, so a later number never has an earlier time (a clock stepped back
        // repeats the last time instead).
        let server_time = now_ms().max(s.last_time);
        s.last_time = server_time;
        for p in posted {
            if s.next_seq >= s.reserved_until
                && let Some((first, last)) = s.spare.take()
            {
                s.next_seq = s.next_seq.max(first);
                s.reserved_until = last.saturating_add(1);
            }
            let entry = Arc::new(Entry {
                seq: s.next_seq,
                server_time,
                posted: p,
            });
            s.next_seq += 1;
            store(entry.clone());
            if s.pending.len() < self.max_pending {
                s.pending.push(entry);
            } else {
                s.left_out += 1;
            }
        }
        if s.wants_numbers() {
            self.wants_numbers.notify_one();
        }
    }

    /// Queues entries stamped by another node (cluster mode) for the next flush.
    pub fn relay_in(&self, entries: Vec<Arc<Entry>>) {
        let mut s = self.state();
        for entry in entries {
            if s.pending.len() < self.max_pending {
                s.pending.push(entry);
            } else {
                s.left_out += 1;
            }
        }
    }

    /// Registers a listener following `room` (all rooms when `None`), fed through
    /// `outbound`; it is forgotten when the guard is dropped.
    pub fn listen(self: &Arc<Self>, room: Option<String>, outbound: Outbound) -> ListenerGuard {
        let id = self.next_listener.fetch_add(1, Ordering::Relaxed);
        self.listeners().insert(
            id,
            Listener {
                room,
                outbound,
                missed: 0,
            },
        );
        self.metrics.logs_listeners.inc();
        ListenerGuard {
            stream: self.clone(),
            id,
        }
    }

    /// Listeners registered now.
    pub fn listener_count(&self) -> usize {
        self.listeners().len()
    }

    /// Sends every listener the entries since the last flush that it may see, as one JSON
    /// array per room, serialized once per room.
    pub fn flush(&self) {
        let (batch, left_out) = {
            let mut s = self.state();
            (
                std::mem::take(&mut s.pending),
                std::mem::take(&mut s.left_out),
            )
        };
        let mut listeners = self.listeners();
        if listeners.is_empty() {
            return;
        }
        let jsons: Vec<String> = batch.iter().map(|e| e.to_json()).collect();
        // Per followed room: the array (None when empty) and how many entries it holds.
        let mut arrays: HashMap<Option<String>, (Option<Arc<Payload>>, u64)> = HashMap::new();
        for l in listeners.values_mut() {
            let (array, count) = arrays.entry(l.room.clone()).or_insert_with(|| {
                let room = l.room.as_deref();
                let items: Vec<&str> = batch
                    .iter()
                    .zip(&jsons)
                    .filter(|(e, _)| e.visible_in(room))
                    .map(|(_, j)| j.as_str())
                    .collect();
                let count = items.len() as u64;
                ((count > 0).then(|| Payload::text(json_array(items))), count)
            });
            if left_out > 0 {
                // Which rooms they were for is not kept: every listener is told.
                l.missed += left_out;
                self.metrics.logs_listener_missed.inc_by(left_out);
            }
            let queued = l.outbound.queued_bytes();
            // An array larger than the whole buffer still goes to a listener that is idle.
            if let Some(array) = array
                && queued > 0
                && queued + array.data().len() > self.listener_buffer
            {
                l.missed += *count;
                self.metrics.logs_listener_missed.inc_by(*count);
                continue;
            }
            if l.missed > 0 {
                let notice = missed_notice(l.missed);
                // Like an array, the notice goes to an idle listener whatever its size.
                if queued > 0 && queued + notice.len() > self.listener_buffer {
                    // Neither the notice nor this flush's entries go: they are missed too.
                    l.missed += *count;
                    self.metrics.logs_listener_missed.inc_by(*count);
                    continue;
                }
                // Refused only when the socket is closing; its guard removes it soon.
                let _ = l.outbound.send(Payload::text(notice));
                l.missed = 0;
            }
            if let Some(array) = array {
                // As above: refused only when closing.
                let _ = l.outbound.send(array.clone());
            }
        }
    }

    /// Flushes every [`FLUSH_INTERVAL`] until shutdown, then once more.
    pub async fn run_flusher(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(FLUSH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => self.flush(),
            }
        }
        self.flush();
    }
}

/// What a listener that could not keep up is sent once it can again: a JSON array holding
/// one entry from `user: "server"` (`fromServer: true`), level `Warn`, with `missed` (the
/// count) and no `seqNumber` (it is not a stored entry).
pub fn missed_notice(missed: u64) -> String {
    let now = now_ms();
    let msg = format!(
        "this listener could not keep up: {missed} log entries were not sent to it (see /logs/query)"
    );
    let text = format!("{} [Warn] {msg}", clock(now));
    format!(
        "[{{\"timestamp\":{now},\"level\":\"Warn\",\"msg\":{},\"text\":{},\"user\":\"server\",\"room\":null,\"serverTime\":{now},\"seqNumber\":null,\"fromServer\":true,\"missed\":{missed}}}]",
        serde_json::Value::from(msg),
        serde_json::Value::from(text)
    )
}

/// `HH:mm:ss:fff` (UTC) of a unix time in ms, as the plugin writes at the start of `text`.
pub fn clock(ms: i64) -> String {
    let day_ms = ms.rem_euclid(86_400_000);
    format!(
        "{:02}:{:02}:{:02}:{:03}",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000
    )
}

/// A listener's place in the stream; dropping it forgets the listener at once.
#[derive(Debug)]
pub struct ListenerGuard {
    stream: Arc<Stream>,
    id: u64,
}

impl Drop for ListenerGuard {
    fn drop(&mut self) {
        if self.stream.listeners().remove(&self.id).is_some() {
            self.stream.metrics.logs_listeners.dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn posted(room: Option<&str>, msg: &str) -> Posted {
        Posted {
            msg: Some(msg.into()),
            room: room.map(Into::into),
            ..Posted::default()
        }
    }

    fn drain(o: &Outbound) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        let mut batch = Vec::new();
        // The queue is open and holds messages: the batch is ready at once.
        let ready = futures::FutureExt::now_or_never(o.next_batch(&mut batch));
        if ready.is_some() {
            for p in batch.drain(..) {
                out.push(serde_json::from_slice(p.data()).unwrap());
                o.written(p.data().len());
            }
        }
        out
    }

    #[test]
    fn stamps_in_order_and_routes_rooms() {
        let stream = Arc::new(Stream::new(1000, 1 << 20, Arc::new(Metrics::new())));
        stream.reserve_in_blocks(100);
        stream.grant(41, 140);
        let (all, a, b) = (
            Outbound::new(1 << 20),
            Outbound::new(1 << 20),
            Outbound::new(1 << 20),
        );
        let _g = (
            stream.listen(None, all.clone()),
            stream.listen(Some("a".into()), a.clone()),
            stream.listen(Some("b".into()), b.clone()),
        );
        let mut stored = Vec::new();
        stream.publish(
            vec![
                posted(Some("a"), "1"),
                posted(None, "2"),
                posted(Some("c"), "3"),
            ],
            |e| stored.push(e.seq),
        );
        assert_eq!(stored, [41, 42, 43]);
        stream.flush();
        let msgs = |v: &[serde_json::Value]| -> Vec<String> {
            v[0].as_array()
                .unwrap()
                .iter()
                .map(|e| e["msg"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(msgs(&drain(&all)), ["1", "2", "3"]);
        assert_eq!(msgs(&drain(&a)), ["1", "2"]);
        assert_eq!(msgs(&drain(&b)), ["2"]);
        assert_eq!(stream.listener_count(), 3);
        drop(_g);
        assert_eq!(stream.listener_count(), 0);
    }

    #[test]
    fn a_slow_listener_is_told_what_it_missed() {
        let stream = Arc::new(Stream::new(1000, 400, Arc::new(Metrics::new())));
        let slow = Outbound::new(1 << 20);
        let _g = stream.listen(None, slow.clone());
        // Fills the listener's buffer: the first flush is queued (nobody drains it).
        stream.publish(vec![posted(None, &"x".repeat(300))], |_| {});
        stream.flush();
        // These do not fit: missed.
        stream.publish(vec![posted(None, "a"), posted(None, "b")], |_| {});
        stream.flush();
        stream.publish(vec![posted(None, "c")], |_| {});
        stream.flush();
        let got = drain(&slow);
        assert_eq!(got.len(), 1, "only the first array was queued");
        // Drained: the notice, then new entries.
        stream.publish(vec![posted(None, "d")], |_| {});
        stream.flush();
        let got = drain(&slow);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0][0]["missed"], 3);
        assert_eq!(got[0][0]["user"], "server");
        assert_eq!(got[1][0]["msg"], "d");
    }

    #[test]
    fn entries_that_fit_behind_a_notice_that_does_not_are_counted_as_missed() {
        let stream = Arc::new(Stream::new(1000, 1000, Arc::new(Metrics::new())));
        let slow = Outbound::new(1 << 20);
        let _g = stream.listen(None, slow.clone());
        stream.publish(vec![posted(None, &"x".repeat(600))], |_| {});
        stream.flush();
        // Does not fit behind the first: missed.
        stream.publish(vec![posted(None, &"y".repeat(400))], |_| {});
        stream.flush();
        // Would fit, but the notice owed first does not: missed as well, not lost.
        stream.publish(vec![posted(None, "c")], |_| {});
        stream.flush();
        assert_eq!(drain(&slow).len(), 1);
        stream.publish(vec![posted(None, "d")], |_| {});
        stream.flush();
        let got = drain(&slow);
        assert_eq!(got[0][0]["missed"], 2);
        assert_eq!(got[1][0]["msg"], "d");
    }

    #[test]
    fn numbers_come_from_reserved_blocks_and_never_wait_for_one() {
        let stream = Arc::new(Stream::new(1000, 1 << 20, Arc::new(Metrics::new())));
        let wants = || futures::FutureExt::now_or_never(stream.wants_numbers()).is_some();
        stream.reserve_in_blocks(10);
        assert!(wants(), "nothing is reserved yet");
        stream.grant(1, 10);
        assert!(!wants());
        let stamp = |n: usize| {
            let mut seqs = Vec::new();
            stream.publish(vec![posted(None, "m"); n], |e| seqs.push(e.seq));
            seqs
        };
        assert_eq!(stamp(4), [1, 2, 3, 4]);
        assert!(!wants());
        assert_eq!(stamp(2), [5, 6]);
        assert!(wants(), "half of the block is used");
        // The next block is kept until this one is used up.
        stream.grant(100, 109);
        assert!(!wants());
        assert_eq!(stamp(6), [7, 8, 9, 10, 100, 101]);
        // No block in time: numbering goes on, unreserved, and wants one.
        assert_eq!(
            stamp(10),
            [102, 103, 104, 105, 106, 107, 108, 109, 110, 111]
        );
        assert!(wants());
        // A block below where numbering is: nothing goes backwards.
        stream.grant(50, 59);
        assert!(wants());
        assert_eq!(stamp(1), [112]);
        stream.grant(200, 209);
        assert_eq!(stamp(1), [200]);
        assert!(!wants());
    }

    #[test]
    fn clock_format() {
        assert_eq!(clock(1700000000123), "22:13:20:123");
    }
}
