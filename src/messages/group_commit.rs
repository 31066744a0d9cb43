//! Group commit of queued messages into SQLite: one thread commits every message that
//! arrived while the previous commit was on its way to the disk, in one transaction.
//!
//! Owns that thread and its queue. With `synchronous=FULL` each commit costs one fsync (a few
//! ms), so committing messages one by one caps the whole server at a few hundred queued
//! messages a second; grouped, concurrent senders share the fsync. Each sender still hears
//! back only once its own message is on the disk.

use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use super::queue::{ADDED, RECIPIENT_FULL, STORE_FULL, now_ms};
use crate::store::{Sqlite, StoreError};

/// Messages committed in one transaction at most.
const MAX_GROUP: usize = 256;

/// Senders waiting for the writer thread at most; more wait for room (each sender has one
/// message in flight, so this is reached only with that many senders at once).
const QUEUE: usize = 4096;

/// One message to commit, and where to say whether it was (false: the queue was full).
struct Enqueue {
    recipient: String,
    sender: String,
    body: String,
    limit: i64,
    store_bytes: i64,
    done: oneshot::Sender<Result<i64, String>>,
}

/// The handle senders use; the thread ends when every handle is dropped.
#[derive(Debug, Clone)]
pub struct GroupCommit {
    tx: mpsc::Sender<Enqueue>,
}

impl std::fmt::Debug for Enqueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enqueue")
            .field("recipient", &self.recipient)
            .finish_non_exhaustive()
    }
}

impl GroupCommit {
    /// Starts the writer thread on `db`.
    pub fn spawn(db: Sqlite) -> std::io::Result<GroupCommit> {
        let (tx, rx) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("dm-queue-commit".into())
            .spawn(move || run(db, rx))?;
        Ok(GroupCommit { tx })
    }

    /// Commits `body` for `recipient` unless it has `limit` messages waiting already or the
    /// queue holds `store_bytes` bytes in all: [`ADDED`] once it is on the disk, else
    /// [`RECIPIENT_FULL`] or [`STORE_FULL`].
    pub async fn enqueue(
        &self,
        recipient: &str,
        sender: &str,
        body: &str,
        limit: i64,
        store_bytes: i64,
    ) -> Result<i64, StoreError> {
        let (done, answer) = oneshot::channel();
        let job = Enqueue {
            recipient: recipient.to_owned(),
            sender: sender.to_owned(),
            body: body.to_owned(),
            limit,
            store_bytes,
            done,
        };
        self.tx.send(job).await.map_err(|_| StoreError::Worker)?;
        match answer.await {
            Ok(Ok(added)) => Ok(added),
            Ok(Err(e)) => Err(StoreError::Failed(e)),
            Err(_) => Err(StoreError::Worker),
        }
    }
}

fn run(db: Sqlite, mut rx: mpsc::Receiver<Enqueue>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while let Some(first) = rx.blocking_recv() {
        group.push(first);
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        let result = db.call_blocking(|c| {
            let tx = c.transaction()?;
            let mut added = Vec::with_capacity(group.len());
            {
                // One statement each: the count and the bytes (kept by a trigger) see the rows
                // this group added before it.
                let mut insert = tx.prepare_cached(
                    "INSERT INTO queue (recipient, sender, body, queued_ms) \
                     SELECT ?1, ?2, ?3, ?4 \
                     WHERE (SELECT COUNT(*) FROM queue WHERE recipient = ?1) < ?5 \
                     AND (SELECT value FROM dm_meta WHERE key = 'queued_bytes') \
                         + length(CAST(?3 AS BLOB)) <= ?6",
                )?;
                let mut waiting =
                    tx.prepare_cached("SELECT COUNT(*) FROM queue WHERE recipient = ?1")?;
                for j in &group {
                    let n = insert.execute(rusqlite::params![
                        j.recipient,
                        j.sender,
                        j.body,
                        now_ms(),
                        j.limit,
                        j.store_bytes
                    ])?;
                    added.push(if n > 0 {
                        ADDED
                    } else if waiting.query_row([&j.recipient], |r| r.get::<_, i64>(0))? >= j.limit
                    {
                        RECIPIENT_FULL
                    } else {
                        STORE_FULL
                    });
                }
            }
            tx.commit()?;
            Ok(added)
        });
        match result {
            Ok(added) => {
                for (job, added) in group.drain(..).zip(added) {
                    // The sender may have gone meanwhile; its message is queued anyway.
                    let _ = job.done.send(Ok(added));
                }
            }
            Err(e) => {
                warn!(error = %e, messages = group.len(), "direct messages: a group commit failed");
                let text = e.to_string();
                for job in group.drain(..) {
                    // As above: nobody may be waiting any more.
                    let _ = job.done.send(Err(text.clone()));
                }
            }
        }
    }
}
