//! The queue from the stamping path to the store's writer, bounded twice: in entries
//! (`--logs-store-queue`) and in bytes (`--logs-store-queue-bytes`).
//!
//! Owns only the accounting. Producers [`StoreQueue::try_push`] and never wait: an entry
//! that would pass either bound is refused (the caller counts it as not stored; listeners
//! still get it). The bytes of an entry stay counted until the writer [`QueueRx::release`]s
//! it, after its batch was written or given up, so the batch being written or retried
//! counts too: what waits for the store in memory is at most the byte bound (plus one
//! entry), whatever the store does.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;

use super::entry::Entry;

/// The producers' end; cheap to share (the front-end holds one).
#[derive(Debug)]
pub struct StoreQueue {
    tx: mpsc::Sender<Arc<Entry>>,
    /// Bytes pushed and not yet released; shared with the writer's end.
    bytes: Arc<AtomicUsize>,
    max_bytes: usize,
    /// `logs_store_queue_bytes`, set on every change.
    gauge: Gauge,
}

/// Why [`StoreQueue::try_push`] refused an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// A bound (entries or bytes) would be passed.
    Full,
    /// The writer is gone: the server has stopped.
    Closed,
}

/// The writer's end.
#[derive(Debug)]
pub struct QueueRx {
    rx: mpsc::Receiver<Arc<Entry>>,
    bytes: Arc<AtomicUsize>,
    gauge: Gauge,
}

impl StoreQueue {
    /// A queue of at most `max_entries` entries and `max_bytes` bytes (by [`Entry::size`]),
    /// whose bytes are shown in `gauge`.
    pub fn new(max_entries: usize, max_bytes: usize, gauge: Gauge) -> (StoreQueue, QueueRx) {
        let (tx, rx) = mpsc::channel(max_entries.max(1));
        let bytes = Arc::new(AtomicUsize::new(0));
        (
            StoreQueue {
                tx,
                bytes: bytes.clone(),
                max_bytes,
                gauge: gauge.clone(),
            },
            QueueRx { rx, bytes, gauge },
        )
    }

    /// Queues `entry` unless a bound would be passed or the writer is gone.
    pub fn try_push(&self, entry: Arc<Entry>) -> Result<(), Refused> {
        let size = entry.size();
        let before = self.bytes.fetch_add(size, Ordering::Relaxed);
        let refused = if before + size > self.max_bytes {
            Some(Refused::Full)
        } else {
            match self.tx.try_send(entry) {
                Ok(()) => None,
                Err(mpsc::error::TrySendError::Full(_)) => Some(Refused::Full),
                Err(mpsc::error::TrySendError::Closed(_)) => Some(Refused::Closed),
            }
        };
        if let Some(why) = refused {
            self.bytes.fetch_sub(size, Ordering::Relaxed);
            return Err(why);
        }
        self.gauge.set((before + size) as i64);
        Ok(())
    }

    /// Bytes queued or being written now.
    pub fn queued_bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl QueueRx {
    /// Waits for entries and moves up to `limit` into `buf`; 0 once every producer is gone.
    pub async fn recv_many(&mut self, buf: &mut Vec<Arc<Entry>>, limit: usize) -> usize {
        self.rx.recv_many(buf, limit).await
    }

    /// Whether nothing waits now.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// Gives back the bytes of entries taken with [`QueueRx::recv_many`], once written or
    /// given up.
    pub fn release(&self, entries: &[Arc<Entry>]) {
        let size: usize = entries.iter().map(|e| e.size()).sum();
        let before = self.bytes.fetch_sub(size, Ordering::Relaxed);
        self.gauge.set(before.saturating_sub(size) as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::entry::Posted;

    fn entry(msg_len: usize) -> Arc<Entry> {
        Arc::new(Entry {
            seq: 1,
            server_time: 0,
            posted: Posted {
                msg: Some("x".repeat(msg_len)),
                ..Posted::default()
            },
        })
    }

    #[tokio::test]
    async fn bounded_in_bytes_until_released() {
        let (q, mut rx) = StoreQueue::new(100, 10_000, Gauge::default());
        assert!(q.try_push(entry(4000)).is_ok());
        assert!(q.try_push(entry(4000)).is_ok());
        // A third would pass 10,000 bytes; a small one still fits.
        assert_eq!(q.try_push(entry(4000)), Err(Refused::Full));
        assert!(q.try_push(entry(10)).is_ok());
        let mut batch = Vec::new();
        assert_eq!(rx.recv_many(&mut batch, 10).await, 3);
        // Taken but not written yet: still counted.
        assert_eq!(q.try_push(entry(4000)), Err(Refused::Full));
        rx.release(&batch);
        assert_eq!(q.queued_bytes(), 0);
        assert!(q.try_push(entry(4000)).is_ok());
    }

    #[test]
    fn bounded_in_entries_and_refused_once_the_writer_is_gone() {
        let (q, rx) = StoreQueue::new(2, usize::MAX, Gauge::default());
        assert!(q.try_push(entry(1)).is_ok() && q.try_push(entry(1)).is_ok());
        assert_eq!(q.try_push(entry(1)), Err(Refused::Full));
        drop(rx);
        assert_eq!(q.try_push(entry(1)), Err(Refused::Closed));
        assert_eq!(q.queued_bytes(), 2 * entry(1).size());
    }
}
