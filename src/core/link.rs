//! The hub's outbox to a backplane (the Redis cluster link of [`crate::cluster`]).
//!
//! Owns what the hub has to tell other nodes and nothing about how it is told. The hub
//! marks a session whose local membership changed, and forwards pushes whose audience has
//! members elsewhere; neither ever waits. Changes coalesce per session (the backplane reads
//! the current membership when it gets to it), and forwards are bounded in bytes: past the
//! bound they are dropped and counted, so a slow or absent Redis never grows the server's
//! memory or slows local delivery.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::core::hub::Audience;
use crate::core::outbound::Payload;
use crate::metrics::Metrics;

/// A payload for the members of a session on other nodes.
#[derive(Debug, Clone)]
pub struct Forward {
    pub session: Arc<str>,
    pub payload: Arc<Payload>,
    pub audience: Audience,
}

/// What the backplane has to do next.
#[derive(Debug, Default)]
pub struct Work {
    /// Sessions whose local membership changed since the last take.
    pub changed: Vec<Arc<str>>,
    pub forwards: Vec<Forward>,
}

#[derive(Debug, Default)]
struct Pending {
    changed: HashSet<Arc<str>>,
    forwards: VecDeque<Forward>,
    forward_bytes: usize,
}

/// The outbox. Shared by the hub (producer) and the backplane (its one consumer).
#[derive(Debug)]
pub struct Link {
    pending: Mutex<Pending>,
    wake: Notify,
    max_forward_bytes: usize,
    /// Whether the backplane is connected; while it is not, sessions announce local
    /// presence at once and forwards are dropped.
    up: AtomicBool,
    metrics: Arc<Metrics>,
}

impl Link {
    pub fn new(max_forward_bytes: usize, metrics: Arc<Metrics>) -> Link {
        Link {
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
            max_forward_bytes,
            up: AtomicBool::new(false),
            metrics,
        }
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the backplane is connected.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Set by the backplane as it connects and loses its connection.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Release);
    }

    /// Marks `session`'s local membership as changed.
    pub fn changed(&self, session: &Arc<str>) {
        let mut p = self.pending();
        if p.changed.insert(session.clone()) && p.changed.len() == 1 {
            drop(p);
            self.wake.notify_one();
        }
    }

    /// Queues a forward; false (the forward is dropped, and counted) while the backplane
    /// is down or its queue is full.
    pub fn forward(&self, forward: Forward) -> bool {
        if !self.is_up() {
            self.metrics.cluster_dropped.inc();
            return false;
        }
        let size = forward.payload.data().len() + forward.session.len();
        let mut p = self.pending();
        if p.forward_bytes + size > self.max_forward_bytes {
            drop(p);
            self.metrics.cluster_dropped.inc();
            return false;
        }
        p.forward_bytes += size;
        p.forwards.push_back(forward);
        let first = p.forwards.len() == 1;
        drop(p);
        if first {
            self.wake.notify_one();
        }
        true
    }

    /// Drops (and counts) every queued forward: the backplane lost its connection.
    pub fn drop_forwards(&self) {
        let mut p = self.pending();
        p.forward_bytes = 0;
        let n = std::mem::take(&mut p.forwards).len();
        drop(p);
        self.metrics.cluster_dropped.inc_by(n as u64);
    }

    /// Waits until there is work, then takes all of it (forwards up to `max_forwards`).
    pub async fn next(&self, max_forwards: usize) -> Work {
        loop {
            let notified = self.wake.notified();
            {
                let mut p = self.pending();
                if !p.changed.is_empty() || !p.forwards.is_empty() {
                    let n = p.forwards.len().min(max_forwards);
                    let forwards: Vec<Forward> = p.forwards.drain(..n).collect();
                    p.forward_bytes -= forwards
                        .iter()
                        .map(|f| f.payload.data().len() + f.session.len())
                        .sum::<usize>();
                    return Work {
                        changed: p.changed.drain().collect(),
                        forwards,
                    };
                }
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn changes_coalesce_and_forwards_are_bounded() {
        let metrics = Arc::new(Metrics::new());
        let link = Link::new(100, metrics.clone());
        let s: Arc<str> = Arc::from("s");
        link.changed(&s);
        link.changed(&s);
        let f = |n: usize| Forward {
            session: s.clone(),
            payload: Payload::text(vec![b'x'; n]),
            audience: Audience::Followers,
        };
        assert!(!link.forward(f(10)), "dropped while down");
        link.set_up(true);
        assert!(link.forward(f(49)));
        assert!(link.forward(f(49)));
        assert!(!link.forward(f(1)), "over the byte bound");
        assert_eq!(metrics.cluster_dropped.get(), 2);
        let work = link.next(1).await;
        assert_eq!(work.changed, vec![s.clone()]);
        assert_eq!(work.forwards.len(), 1);
        assert!(
            link.forward(f(49)),
            "the bound counts what is still queued only"
        );
        assert_eq!(link.next(10).await.forwards.len(), 2);
    }
}
