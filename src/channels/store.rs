//! The state of the HTTP channel API: every channel's clients and their latest bodies.
//!
//! Owns channel membership and its bounds (clients, bytes), the silence timeout, the
//! per-client request order (`Client-Time`) and change notification for watchers. Knows
//! nothing of HTTP.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;

/// One client's latest state in a channel.
#[derive(Debug)]
struct Entry {
    /// The request body, verbatim (a JSON object).
    body: Bytes,
    last_post: Instant,
}

#[derive(Debug, Default)]
struct Channel {
    /// Clients in the order they first posted, so answers are stable.
    clients: Vec<(String, Entry)>,
}

#[derive(Debug, Default)]
struct State {
    channels: HashMap<String, Channel>,
    /// Last `Client-Time` seen per `Client-Id`, and when (for forgetting idle ids).
    order: HashMap<String, (f64, Instant)>,
    /// Change counters watchers wait on; kept while a channel exists or is watched.
    watchers: HashMap<String, watch::Sender<u64>>,
}

/// Every channel. A `std` mutex held for one operation, never across `.await`.
#[derive(Debug)]
pub struct Store {
    state: Mutex<State>,
    timeout: Duration,
    bounds: Bounds,
}

/// How much one channel holds at most, so that no answer and no watch message grows
/// without bound (`--max-channel-clients`, `--max-channel-bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub max_clients: usize,
    /// Bytes of every client's body together.
    pub max_bytes: usize,
}

/// A post that would take its channel past a bound (answered 413; nothing changes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Bound {
    #[error("channel full: at most {0} clients")]
    Clients(usize),
    #[error("channel state too large: at most {0} bytes of client states in all")]
    Bytes(usize),
}

impl Bounds {
    /// Whether a channel of `clients` clients whose bodies but the poster's take
    /// `others_bytes` may take a body of `len` bytes (`new`: from a client not in it yet).
    pub fn check(
        &self,
        clients: usize,
        new: bool,
        others_bytes: usize,
        len: usize,
    ) -> Result<(), Bound> {
        if new && clients >= self.max_clients {
            return Err(Bound::Clients(self.max_clients));
        }
        if others_bytes.saturating_add(len) > self.max_bytes {
            return Err(Bound::Bytes(self.max_bytes));
        }
        Ok(())
    }
}

/// The outcome of an ordering check.
#[derive(Debug, PartialEq, Eq)]
pub enum Order {
    InOrder,
    /// Older than the last request seen from that client id: answer 204, change nothing.
    Late,
}

/// The JSON array of `bodies` (each a JSON object, verbatim).
pub(crate) fn join(bodies: impl Iterator<Item = Bytes>) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.push(b'[');
    for (i, b) in bodies.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&b);
    }
    out.push(b']');
    Bytes::from(out)
}

impl Store {
    pub fn new(timeout: Duration, bounds: Bounds) -> Store {
        Store {
            state: Mutex::new(State::default()),
            timeout,
            bounds,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Every mutation is one step; a poisoned lock still holds valid maps.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `time` for `client`; `Late` if an equal or later time was seen before.
    pub fn check_order(&self, client: &str, time: f64) -> Order {
        let mut state = self.state();
        let now = Instant::now();
        match state.order.get_mut(client) {
            Some((last, _)) if time < *last => Order::Late,
            Some(entry) => {
                *entry = (time, now);
                Order::InOrder
            }
            None => {
                state.order.insert(client.to_string(), (time, now));
                Order::InOrder
            }
        }
    }

    /// Stores `body` as `client_id`'s state in `key`; returns the other clients' bodies as a
    /// JSON array. A post that would take the channel past its bounds changes nothing.
    pub fn post(&self, key: &str, client_id: &str, body: Bytes) -> Result<Bytes, Bound> {
        let mut state = self.state();
        if let Some(channel) = state.channels.get(key) {
            let mine = channel.clients.iter().position(|(id, _)| id == client_id);
            let others: usize = channel
                .clients
                .iter()
                .filter(|(id, _)| id != client_id)
                .map(|(_, e)| e.body.len())
                .sum();
            self.bounds
                .check(channel.clients.len(), mine.is_none(), others, body.len())?;
        }
        let channel = state.channels.entry(key.to_string()).or_default();
        let now = Instant::now();
        match channel.clients.iter_mut().find(|(id, _)| id == client_id) {
            Some((_, entry)) => {
                *entry = Entry {
                    body,
                    last_post: now,
                }
            }
            None => channel.clients.push((
                client_id.to_string(),
                Entry {
                    body,
                    last_post: now,
                },
            )),
        }
        let others = join(
            channel
                .clients
                .iter()
                .filter(|(id, _)| id != client_id)
                .map(|(_, e)| e.body.clone()),
        );
        notify(&mut state, key);
        Ok(others)
    }

    /// Every client's body in `key` as a JSON array (`[]` for an unknown channel).
    pub fn get(&self, key: &str) -> Bytes {
        let state = self.state();
        match state.channels.get(key) {
            Some(c) => join(c.clients.iter().map(|(_, e)| e.body.clone())),
            None => Bytes::from_static(b"[]"),
        }
    }

    /// The ids of the channels that have clients, sorted.
    pub fn channel_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.state().channels.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// A receiver that changes whenever `key` does.
    pub fn watch(&self, key: &str) -> watch::Receiver<u64> {
        let mut state = self.state();
        state
            .watchers
            .entry(key.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Removes clients silent for longer than the timeout, and empty channels; forgets
    /// request order of ids idle for a minute. Returns how many clients were removed.
    pub fn sweep(&self) -> usize {
        let mut state = self.state();
        let now = Instant::now();
        let timeout = self.timeout;
        let mut changed = Vec::new();
        let mut removed = 0;
        state.channels.retain(|key, channel| {
            let before = channel.clients.len();
            channel
                .clients
                .retain(|(_, e)| now.duration_since(e.last_post) <= timeout);
            if channel.clients.len() != before {
                removed += before - channel.clients.len();
                changed.push(key.clone());
            }
            !channel.clients.is_empty()
        });
        for key in changed {
            notify(&mut state, &key);
        }
        state
            .order
            .retain(|_, (_, seen)| now.duration_since(*seen) < Duration::from_secs(60));
        let State {
            watchers, channels, ..
        } = &mut *state;
        watchers.retain(|key, tx| tx.receiver_count() > 0 || channels.contains_key(key));
        removed
    }
}

fn notify(state: &mut State, key: &str) {
    if let Some(tx) = state.watchers.get(key) {
        tx.send_modify(|v| *v += 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOMY: Bounds = Bounds {
        max_clients: 100,
        max_bytes: 1 << 20,
    };

    #[test]
    fn post_answers_the_others_and_replaces_own_state() {
        let s = Store::new(Duration::from_secs(1), ROOMY);
        assert_eq!(
            s.post("t", "ada", Bytes::from_static(br#"{"client_id":"ada"}"#)),
            Ok(Bytes::from_static(b"[]"))
        );
        assert_eq!(
            s.post("t", "joe", Bytes::from_static(br#"{"client_id":"joe"}"#)),
            Ok(Bytes::from_static(br#"[{"client_id":"ada"}]"#))
        );
        s.post(
            "t",
            "ada",
            Bytes::from_static(br#"{"client_id":"ada","x":1}"#),
        )
        .unwrap();
        assert_eq!(
            s.get("t"),
            r#"[{"client_id":"ada","x":1},{"client_id":"joe"}]"#
        );
        assert_eq!(s.get("other"), "[]");
        assert_eq!(s.channel_ids(), ["t"]);
    }

    #[test]
    fn bounds_refuse_the_post_that_would_pass_them() {
        let s = Store::new(
            Duration::from_secs(1),
            Bounds {
                max_clients: 2,
                max_bytes: 10,
            },
        );
        let body = |n: usize| Bytes::from(vec![b'x'; n]);
        s.post("t", "a", body(4)).unwrap();
        s.post("t", "b", body(6)).unwrap();
        assert_eq!(s.post("t", "c", body(1)), Err(Bound::Clients(2)));
        assert_eq!(s.post("t", "a", body(5)), Err(Bound::Bytes(10)));
        // Replacing one's own state counts only the others'; a refusal changed nothing.
        s.post("t", "a", body(4)).unwrap();
        assert_eq!(s.get("t"), "[xxxx,xxxxxx]");
    }

    #[test]
    fn order() {
        let s = Store::new(Duration::from_secs(1), ROOMY);
        assert_eq!(s.check_order("a", 2.0), Order::InOrder);
        assert_eq!(s.check_order("a", 1.5), Order::Late);
        assert_eq!(s.check_order("a", 2.0), Order::InOrder);
        assert_eq!(s.check_order("b", 0.1), Order::InOrder);
    }

    #[test]
    fn sweep_removes_silent_clients_and_empty_channels() {
        let s = Store::new(Duration::from_millis(0), ROOMY);
        let mut rx = s.watch("t");
        s.post("t", "ada", Bytes::from_static(b"{}")).unwrap();
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(s.sweep(), 1);
        assert!(rx.has_changed().unwrap());
        assert!(s.channel_ids().is_empty());
    }
}
