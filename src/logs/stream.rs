//! The live log stream: stamping entries, and every 100 ms sending each listener one JSON
//! array of the entries it has not seen.
//!
//! Owns the sequence counter, the entries waiting for the next flush and the registry of
//! listeners. Knows nothing of HTTP or the durable store (the caller hands a closure that
//! queues each stamped entry for the store, called under the stamping lock so the store
//! receives entries in `seqNumber` order).
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
    /// Entries that may wait for one flush; more are left out of the live stream.
    max_pending: usize,
    /// Bytes a listener's socket may hold before its entries count as missed.
    listener_buffer: usize,
    metrics: Arc<Metrics>,
}

#[derive(Debug)]
struct State {
    next_seq: i64,
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

impl Stream {
    pub fn new(max_pending: usize, listener_buffer: usize, metrics: Arc<Metrics>) -> Stream {
        Stream {
            state: Mutex::new(State {
                next_seq: 1,
                pending: Vec::new(),
                left_out: 0,
            }),
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

    /// Makes the next `seqNumber` at least `next` (at start: one above the store's largest).
    pub fn raise_next_seq(&self, next: i64) {
        let mut s = self.state();
        s.next_seq = s.next_seq.max(next);
    }

    /// The `seqNumber` the next entry will get.
    pub fn next_seq(&self) -> i64 {
        self.state().next_seq
    }

    /// Stamps `posted` with `serverTime` and `seqNumber`, queues them for the next flush,
    /// and hands each to `store` in order.
    pub fn publish(&self, posted: Vec<Posted>, mut store: impl FnMut(Arc<Entry>)) {
        let server_time = now_ms();
        let mut s = self.state();
        for p in posted {
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
                if queued + notice.len() > self.listener_buffer {
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
/// one entry from `user: "server"`, level `Warn`, with `missed` (the count) and no
/// `seqNumber` (it is not a stored entry).
pub fn missed_notice(missed: u64) -> String {
    let now = now_ms();
    let msg = format!(
        "this listener could not keep up: {missed} log entries were not sent to it (see /logs/query)"
    );
    let text = format!("{} [Warn] {msg}", clock(now));
    format!(
        "[{{\"timestamp\":{now},\"level\":\"Warn\",\"msg\":{},\"text\":{},\"user\":\"server\",\"room\":null,\"serverTime\":{now},\"seqNumber\":null,\"missed\":{missed}}}]",
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
        stream.raise_next_seq(41);
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
    fn clock_format() {
        assert_eq!(clock(1700000000123), "22:13:20:123");
    }
}
