//! The tasks that keep the log store: the writer, which takes entries off the store's queue
//! and writes them in batches off the request path (with retention and the background
//! filling of `search`), and the reserver, which reserves `seqNumber`s ahead in the store.
//!
//! Owns the batching and what a failed write means. An outage (store unreachable, busy,
//! full) is retried with back-off, up to about a minute, then the batch is given up; a batch
//! the store refuses as data ([`StoreError::is_data_error`]) can never succeed, so it is
//! written again in halves down to single entries, and only the entries refused alone are
//! dropped (counted in `logs_store_refused_total` and `logs_store_dropped_total`, each
//! logged with its `seqNumber`). Meanwhile the queue fills and what does not fit is dropped
//! and counted by the producers: the relay is never held up. The events of this module are
//! under the target `supersynk::logs`, which the server-log forwarder skips, so a failing
//! store cannot feed itself.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::entry::Entry;
use super::queue::QueueRx;
use super::store::{LogStore, Retention};
use super::stream::Stream;
use crate::metrics::Metrics;
use crate::store::StoreError;

/// How often retention runs (and once at start).
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(60);
/// Entries written in one batch at most.
pub const MAX_BATCH: usize = 2000;
/// Attempts at one batch before it is given up (about a minute of outage).
const MAX_ATTEMPTS: u32 = 15;
/// `seqNumber`s reserved at a time; the next block is asked for when half of one is used.
pub const SEQ_BLOCK: i64 = 1_000_000;

/// Where the background filling of `search` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backfill {
    /// Steps are taken whenever the queue is empty.
    Pending,
    /// A step failed: tried again at the next retention tick.
    Failed,
    Done,
}

/// The writer: takes what the queue holds, writes it as one batch, runs retention, and
/// fills `search` of old rows while idle. It keeps writing while the server drains, so the
/// server's last events are stored too; once `close` is cancelled (the server has stopped:
/// nothing posts any more) it writes what is queued and returns. `shutdown` (the start of
/// the drain) only shortens the retries of a failing store.
pub async fn run_writer(
    store: LogStore,
    mut rx: QueueRx,
    retention: Retention,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    close: CancellationToken,
) {
    let mut retention_tick = tokio::time::interval(RETENTION_INTERVAL);
    retention_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut backfill = Backfill::Pending;
    // Entry bytes written since retention last ran.
    let mut written_since_retention = 0u64;
    loop {
        if close.is_cancelled() {
            if rx.is_empty() || rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
                return;
            }
        } else {
            if backfill == Backfill::Pending && rx.is_empty() && !shutdown.is_cancelled() {
                backfill = match store.backfill_step().await {
                    Ok(true) => Backfill::Pending,
                    Ok(false) => Backfill::Done,
                    Err(e) => {
                        metrics.logs_store_failures.inc();
                        warn!(error = %e, "log store: filling the search column failed; trying again later");
                        Backfill::Failed
                    }
                };
                continue;
            }
            tokio::select! {
                n = rx.recv_many(&mut batch, MAX_BATCH) => if n == 0 { return },
                _ = close.cancelled() => continue,
                _ = retention_tick.tick() => {
                    if backfill == Backfill::Failed {
                        backfill = Backfill::Pending;
                    }
                    retain(&store, retention, &metrics).await;
                    written_since_retention = 0;
                    continue;
                }
            }
        }
        let entries = std::mem::take(&mut batch);
        let taken = entries.clone();
        write_batch(&store, entries, &metrics, &shutdown).await;
        rx.release(&taken);
        // A flood can write far more than the size bound within a retention interval: the
        // bound is checked again after every tenth of it written.
        written_since_retention += taken.iter().map(|e| e.size() as u64).sum::<u64>();
        if let Some(max) = retention.max_bytes
            && written_since_retention >= max / 10
        {
            retain(&store, retention, &metrics).await;
            written_since_retention = 0;
        }
    }
}

/// Runs retention and measures the store (`logs_store_bytes`).
async fn retain(store: &LogStore, retention: Retention, metrics: &Metrics) {
    if retention != Retention::default() {
        match store.retain(retention).await {
            Ok(0) => {}
            Ok(n) => info!(deleted = n, "log store retention"),
            Err(e) => {
                metrics.logs_store_failures.inc();
                warn!(error = %e, "log store retention failed");
            }
        }
    }
    match store.size().await {
        Ok(bytes) => {
            metrics.logs_store_bytes.set(bytes as i64);
        }
        Err(e) => warn!(error = %e, "log store: cannot measure its size"),
    }
}

/// What became of one write.
enum Outcome {
    Written,
    /// The store refused the data: the same write can never succeed.
    Refused(StoreError),
    /// Retried for as long as allowed (or until shutdown) without success.
    GaveUp,
}

/// Writes `entries` (in `seqNumber` order, as queued), splitting a batch the store refuses
/// as data in halves until the entries it refuses alone are found and dropped.
async fn write_batch(
    store: &LogStore,
    entries: Vec<Arc<Entry>>,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) {
    let whole = entries.len();
    // A stack, left halves on top, so the order is kept.
    let mut todo = vec![entries];
    while let Some(mut part) = todo.pop() {
        match write_retrying(store, &part, metrics, shutdown).await {
            Outcome::Written => {
                metrics.logs_stored.inc_by(part.len() as u64);
            }
            Outcome::Refused(e) if part.len() > 1 => {
                if part.len() == whole {
                    warn!(error = %e, entries = part.len(), "log store refused a batch; writing it in parts");
                }
                let right = part.split_off(part.len() / 2);
                todo.push(right);
                todo.push(part);
            }
            Outcome::Refused(e) => {
                metrics.logs_store_refused.inc();
                metrics.logs_store_dropped.inc();
                warn!(error = %e, seq = part[0].seq, "log store refused an entry: not stored");
            }
            Outcome::GaveUp => {
                // The store is down: what is left of this batch would fare no better.
                let left = part.len() + todo.iter().map(Vec::len).sum::<usize>();
                metrics.logs_store_dropped.inc_by(left as u64);
                warn!(
                    entries = left,
                    "log store: batch given up, entries not stored"
                );
                return;
            }
        }
    }
}

/// One write, retried with back-off while the store has an outage.
async fn write_retrying(
    store: &LogStore,
    entries: &[Arc<Entry>],
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Outcome {
    let batch = Arc::new(entries.to_vec());
    let mut backoff = Duration::from_millis(100);
    for attempt in 1..=MAX_ATTEMPTS {
        match store.write(batch.clone()).await {
            Ok(()) => {
                if attempt > 1 {
                    info!(attempt, "log store writes again");
                }
                return Outcome::Written;
            }
            Err(e) if e.is_data_error() => {
                metrics.logs_store_failures.inc();
                return Outcome::Refused(e);
            }
            Err(e) => {
                metrics.logs_store_failures.inc();
                // One warning per failing attempt: at most one per back-off step.
                warn!(error = %e, attempt, entries = entries.len(), "log store write failed");
                if shutdown.is_cancelled() && attempt >= 2 {
                    break;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    Outcome::GaveUp
}

/// The reserver: whenever the stream asks for `seqNumber`s, reserves the next
/// [`SEQ_BLOCK`] in the store and hands them to the stream, retrying an unreachable store
/// with back-off (the stream meanwhile numbers on past its reservation; see
/// [`Stream::grant`]).
pub async fn run_reserver(
    store: LogStore,
    stream: Arc<Stream>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = stream.wants_numbers() => {}
        }
        let mut backoff = Duration::from_millis(100);
        let mut failed = false;
        loop {
            match store.reserve(stream.next_seq(), SEQ_BLOCK).await {
                Ok((first, last)) => {
                    stream.grant(first, last);
                    if failed {
                        info!(first, last, "log store: seqNumbers reserved again");
                    }
                    break;
                }
                Err(e) => {
                    metrics.logs_store_failures.inc();
                    if !failed {
                        warn!(error = %e, next_seq = stream.next_seq(), "log store: cannot reserve seqNumbers; numbering on unreserved");
                    }
                    failed = true;
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::entry::Posted;
    use crate::logs::store::Query;

    fn entry(seq: i64, user: &str) -> Arc<Entry> {
        Arc::new(Entry {
            seq,
            server_time: 1,
            posted: Posted {
                msg: Some(format!("m{seq}")),
                user: Some(user.into()),
                ..Posted::default()
            },
        })
    }

    #[tokio::test]
    async fn entries_the_store_refuses_cost_only_themselves() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(&crate::config::StoreConfig::Sqlite(
            dir.path().to_path_buf(),
        ))
        .unwrap();
        store.init().await.unwrap();
        // A store that refuses some data for good (as PostgreSQL refuses what its encoding
        // cannot hold): a trigger.
        let conn =
            rusqlite::Connection::open(dir.path().join(super::super::store::SQLITE_FILE)).unwrap();
        conn.execute_batch(
            "CREATE TRIGGER no_evil BEFORE INSERT ON log_entries WHEN NEW.\"user\" = 'evil' \
             BEGIN SELECT RAISE(ABORT, 'evil refused'); END;",
        )
        .unwrap();
        drop(conn);
        let metrics = Metrics::new();
        let batch: Vec<_> = (1..=9)
            .map(|i| entry(i, if i == 4 || i == 7 { "evil" } else { "ok" }))
            .collect();
        write_batch(&store, batch, &metrics, &CancellationToken::new()).await;
        let page = store
            .query(Query {
                limit: 100,
                ..Query::default()
            })
            .await
            .unwrap();
        let seqs: Vec<i64> = page.entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [9, 8, 6, 5, 3, 2, 1]);
        assert_eq!(metrics.logs_stored.get(), 7);
        assert_eq!(metrics.logs_store_refused.get(), 2);
        assert_eq!(metrics.logs_store_dropped.get(), 2);
    }
}
