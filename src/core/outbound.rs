//! The bounded outbound queue of one connection.
//!
//! Owns what waits to be written to a socket, and nothing about how it is written. Producers
//! (any task: a leader's reader fanning out, the hub announcing presence) call
//! [`Outbound::send`], which never waits. The connection's single writer takes everything
//! queued in one batch. The queue is bounded in bytes: a message that would push it over the
//! limit closes the connection as a slow consumer, clears what was queued, and is refused, so
//! a receiver that stops reading costs at most the limit and never slows its sender.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::ws::deflate::deflate_message;

/// One message to be written, shared by every receiver: serialized once, and compressed at
/// most once (by the first writer that needs the compressed form).
#[derive(Debug)]
pub struct Payload {
    data: Bytes,
    kind: Kind,
    /// The permessage-deflate payload, computed on first use. `OnceLock` so concurrent
    /// writers on both runtime threads share one compression.
    deflated: OnceLock<Bytes>,
    /// When a relayed push arrived at this node (`supersynk_relay_latency_seconds`);
    /// `None` for everything the server says itself.
    arrived: Option<Instant>,
}

/// What a [`Payload`] is sent as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Binary,
    /// A WebSocket ping (a keep-alive probe of the server's; never compressed).
    Ping,
}

impl Payload {
    fn new(data: Bytes, kind: Kind) -> Arc<Payload> {
        Arc::new(Payload {
            data,
            kind,
            deflated: OnceLock::new(),
            arrived: None,
        })
    }

    /// A relayed push (text, or binary from another node), which arrived at `arrived`: its
    /// writes are timed into the relay latency histogram.
    pub fn relayed(data: impl Into<Bytes>, binary: bool, arrived: Instant) -> Arc<Payload> {
        Arc::new(Payload {
            data: data.into(),
            kind: if binary { Kind::Binary } else { Kind::Text },
            deflated: OnceLock::new(),
            arrived: Some(arrived),
        })
    }

    /// When a relayed push arrived.
    pub fn arrived(&self) -> Option<Instant> {
        self.arrived
    }

    /// A text message; `data` must be UTF-8 (it comes from a `&str` or a validated frame).
    pub fn text(data: impl Into<Bytes>) -> Arc<Payload> {
        Payload::new(data.into(), Kind::Text)
    }

    /// A binary message.
    pub fn binary(data: impl Into<Bytes>) -> Arc<Payload> {
        Payload::new(data.into(), Kind::Binary)
    }

    /// A ping frame with an empty payload.
    pub fn ping() -> Arc<Payload> {
        Payload::new(Bytes::new(), Kind::Ping)
    }

    /// The uncompressed bytes.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// Whether this is a binary (not text) message.
    pub fn is_binary(&self) -> bool {
        self.kind == Kind::Binary
    }

    /// Whether this is a ping frame.
    pub fn is_ping(&self) -> bool {
        self.kind == Kind::Ping
    }

    /// The compressed form, computed once for all receivers; the flag says whether this
    /// call was the one that compressed.
    pub fn deflated(&self, level: u32) -> (&Bytes, bool) {
        let mut computed = false;
        let bytes = self.deflated.get_or_init(|| {
            computed = true;
            deflate_message(&self.data, level)
        });
        (bytes, computed)
    }

    /// Whether the compressed form has been computed (for tests and metrics).
    pub fn is_deflated(&self) -> bool {
        self.deflated.get().is_some()
    }
}

/// Why a connection is being closed: a WebSocket close code and a reason for the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    pub code: u16,
    pub reason: &'static str,
}

/// Why [`Outbound::send`] refused a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The connection is closing or closed.
    #[error("connection closed")]
    Closed,
    /// The queue was full: the connection is now closing as a slow consumer.
    #[error("slow consumer")]
    SlowConsumer,
}

/// The close sent to a receiver whose queue overflowed (documented in protocol/hunterpie.md).
pub const SLOW_CONSUMER: Close = Close {
    code: 4008,
    reason: "slow consumer: outbound queue full",
};

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Arc<Payload>>,
    /// Bytes queued plus bytes taken by the writer and not yet written.
    bytes: usize,
    close: Option<Close>,
    /// Set once the writer is gone: nothing will ever be written again.
    writer_gone: bool,
}

#[derive(Debug)]
struct Shared {
    /// A `std` mutex: held for a push or a swap, never across `.await`.
    state: Mutex<State>,
    /// Wakes the writer when something is queued or the connection closes.
    writer_wake: Notify,
    /// Wakes [`Outbound::closed`] waiters (the reader, and any task of the front-end that
    /// works for the connection) when the connection starts closing.
    reader_wake: Notify,
    /// Wakes [`Outbound::flushed`] waiters when the queue is written out or the writer is gone.
    flush_wake: Notify,
    limit: usize,
}

/// A cheap-to-clone handle on one connection's outbound queue.
#[derive(Debug, Clone)]
pub struct Outbound(Arc<Shared>);

impl Outbound {
    /// A queue that holds at most `limit` bytes (one message larger than that is still
    /// accepted into an empty queue).
    pub fn new(limit: usize) -> Outbound {
        Outbound(Arc::new(Shared {
            state: Mutex::new(State::default()),
            writer_wake: Notify::new(),
            reader_wake: Notify::new(),
            flush_wake: Notify::new(),
            limit,
        }))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug in this module; the state stays
        // consistent (every mutation is a single step), so poisoning is ignored.
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a message without waiting.
    pub fn send(&self, payload: Arc<Payload>) -> Result<(), SendError> {
        let len = payload.data().len();
        let mut state = self.state();
        if state.close.is_some() {
            return Err(SendError::Closed);
        }
        if state.bytes > 0 && state.bytes + len > self.0.limit {
            state.queue.clear();
            state.close = Some(SLOW_CONSUMER);
            drop(state);
            self.0.writer_wake.notify_one();
            self.wake_closed();
            return Err(SendError::SlowConsumer);
        }
        state.bytes += len;
        let was_empty = state.queue.is_empty();
        state.queue.push_back(payload);
        drop(state);
        // A non-empty queue was already signalled and the writer drains it whole: one wake
        // per batch, not per message.
        if was_empty {
            self.0.writer_wake.notify_one();
        }
        Ok(())
    }

    /// Starts closing: what is already queued is still written, then the close frame.
    /// The first close wins.
    pub fn close(&self, close: Close) {
        let mut state = self.state();
        if state.close.is_none() {
            state.close = Some(close);
        }
        drop(state);
        self.0.writer_wake.notify_one();
        self.wake_closed();
    }

    /// Wakes every [`Outbound::closed`] waiter, and the next one if none waits yet.
    fn wake_closed(&self) {
        self.0.reader_wake.notify_waiters();
        self.0.reader_wake.notify_one();
    }

    /// The close in progress, if any.
    pub fn closing(&self) -> Option<Close> {
        self.state().close.clone()
    }

    /// Resolves once the connection is closing (for the reader's `select!`, and any other
    /// task waiting on the connection: every waiter is woken).
    pub async fn closed(&self) {
        loop {
            let notified = self.0.reader_wake.notified();
            if self.state().close.is_some() {
                return;
            }
            notified.await;
        }
    }

    /// For the writer: waits for work, moves every queued message into `batch`, and returns
    /// the close to send once the queue is empty and the connection is closing.
    pub async fn next_batch(&self, batch: &mut Vec<Arc<Payload>>) -> Option<Close> {
        loop {
            let notified = self.0.writer_wake.notified();
            {
                let mut state = self.state();
                if !state.queue.is_empty() {
                    batch.extend(state.queue.drain(..));
                    return None;
                }
                if let Some(close) = &state.close {
                    return Some(close.clone());
                }
            }
            notified.await;
        }
    }

    /// For the writer: `bytes` of a batch have been written.
    pub fn written(&self, bytes: usize) {
        let mut state = self.state();
        state.bytes = state.bytes.saturating_sub(bytes);
        let empty = state.bytes == 0;
        drop(state);
        if empty {
            self.0.flush_wake.notify_waiters();
        }
    }

    /// Waits until everything queued so far has been written to the socket (true), or the
    /// socket is gone first (false). For front-ends that may forget a message only once it
    /// has left the server.
    pub async fn flushed(&self) -> bool {
        loop {
            let notified = self.0.flush_wake.notified();
            tokio::pin!(notified);
            // Registered before the check, so a wake between the check and the await counts.
            notified.as_mut().enable();
            {
                let state = self.state();
                if state.bytes == 0 {
                    return true;
                }
                if state.writer_gone {
                    return false;
                }
            }
            notified.await;
        }
    }

    /// For the writer: the socket is gone; refuse everything from now on.
    pub fn writer_gone(&self, why: Close) {
        let mut state = self.state();
        state.writer_gone = true;
        state.queue.clear();
        if state.close.is_none() {
            state.close = Some(why);
        }
        drop(state);
        self.wake_closed();
        self.0.flush_wake.notify_waiters();
    }

    /// Bytes waiting (queued or being written).
    pub fn queued_bytes(&self) -> usize {
        self.state().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn batches_in_order_and_accounts_bytes() {
        let out = Outbound::new(100);
        out.send(Payload::text("a")).unwrap();
        out.send(Payload::text("bb")).unwrap();
        let mut batch = Vec::new();
        assert_eq!(out.next_batch(&mut batch).await, None);
        let texts: Vec<_> = batch.iter().map(|p| p.data().clone()).collect();
        assert_eq!(texts, vec![Bytes::from("a"), Bytes::from("bb")]);
        assert_eq!(out.queued_bytes(), 3);
        out.written(3);
        assert_eq!(out.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn overflow_closes_as_slow_consumer_and_frees_the_queue() {
        let out = Outbound::new(10);
        out.send(Payload::text("123456")).unwrap();
        assert_eq!(
            out.send(Payload::text("123456")),
            Err(SendError::SlowConsumer)
        );
        assert_eq!(out.send(Payload::text("1")), Err(SendError::Closed));
        let mut batch = Vec::new();
        assert_eq!(out.next_batch(&mut batch).await, Some(SLOW_CONSUMER));
        assert!(batch.is_empty());
        out.closed().await;
    }

    #[tokio::test]
    async fn every_task_waiting_for_the_close_is_woken() {
        let out = Outbound::new(100);
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let out = out.clone();
                tokio::spawn(async move { out.closed().await })
            })
            .collect();
        tokio::task::yield_now().await;
        out.close(Close {
            code: 1000,
            reason: "bye",
        });
        for w in waiters {
            tokio::time::timeout(std::time::Duration::from_secs(5), w)
                .await
                .expect("woken")
                .unwrap();
        }
    }

    #[tokio::test]
    async fn a_large_message_fits_an_empty_queue() {
        let out = Outbound::new(4);
        out.send(Payload::text("larger than four")).unwrap();
    }

    #[tokio::test]
    async fn close_drains_first() {
        let out = Outbound::new(100);
        out.send(Payload::text("bye")).unwrap();
        out.close(Close {
            code: 1001,
            reason: "going away",
        });
        let mut batch = Vec::new();
        assert_eq!(out.next_batch(&mut batch).await, None);
        assert_eq!(batch.len(), 1);
        batch.clear();
        assert_eq!(out.next_batch(&mut batch).await.map(|c| c.code), Some(1001));
    }

    #[test]
    fn payload_compresses_once() {
        let p = Payload::text("x".repeat(200));
        assert!(!p.is_deflated());
        let (a, first) = p.deflated(6);
        let (b, second) = p.deflated(6);
        assert!(first && !second);
        assert!(p.is_deflated());
        assert_eq!(a.as_ptr(), b.as_ptr());
    }
}
