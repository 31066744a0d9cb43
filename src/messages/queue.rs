//! The durable part of direct messages: the known peers and the offline queue.
//!
//! Owns the tables and their SQL, on SQLite (`messages.sqlite3` in the data directory,
//! synchronous=FULL: a queued message is on the disk before the sender hears it was queued)
//! or PostgreSQL (shared by the nodes of a cluster); a cluster without PostgreSQL keeps them
//! in Redis ([`super::redis_queue`]). Knows nothing of sockets: the front-end decides when a
//! message may leave the queue.
//!
//! Bounded: at most so many known peers (a new name past it is refused; known names still
//! log in), so many messages per recipient, and so many bytes of queued messages in all,
//! counted in the store itself (a row of `dm_meta` kept by triggers; a counter key in
//! Redis), so the bound holds across restarts and for every node sharing the store.

use std::time::{SystemTime, UNIX_EPOCH};

use super::group_commit::GroupCommit;
use super::redis_queue::RedisQueue;
use crate::config::{ClusterConfig, StoreConfig};
use crate::store::{Durability, Sqlite, StoreError, postgres_pool};

/// Where a queued message is, to remove it once delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageId {
    /// A row of the SQL table.
    Row(i64),
    /// An entry of the recipient's Redis stream.
    Stream(String),
}

/// One queued message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub id: MessageId,
    /// The frame as the sender sent it, delivered unchanged.
    pub body: String,
}

/// Why a message was not queued.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the queue of {0} is full")]
    Full(String),
    /// The queued messages of every recipient together take the store's bound.
    #[error("the message store is full")]
    StoreFull,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What became of an enqueue, as the backends answer it.
pub const ADDED: i64 = 1;
pub const RECIPIENT_FULL: i64 = 0;
pub const STORE_FULL: i64 = 2;

/// How many messages the store holds at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueBounds {
    /// Messages waiting for one recipient.
    pub per_recipient: usize,
    /// Bytes of every queued message together.
    pub store_bytes: u64,
}

/// The store of known peers and queued messages.
#[derive(Debug, Clone)]
pub enum Queue {
    /// SQLite, with messages committed in groups by [`GroupCommit`]'s thread.
    Sqlite {
        db: Sqlite,
        commit: GroupCommit,
    },
    Postgres(deadpool_postgres::Pool),
    Redis(RedisQueue),
}

const SQLITE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS peers (
    name TEXT PRIMARY KEY,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    recipient TEXT NOT NULL,
    sender TEXT NOT NULL,
    body TEXT NOT NULL,
    queued_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS queue_by_recipient ON queue (recipient, id);
CREATE TABLE IF NOT EXISTS dm_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO dm_meta (key, value)
    SELECT 'queued_bytes', COALESCE(SUM(length(CAST(body AS BLOB))), 0) FROM queue;
CREATE TRIGGER IF NOT EXISTS queue_bytes_in AFTER INSERT ON queue BEGIN
    UPDATE dm_meta SET value = value + length(CAST(NEW.body AS BLOB)) WHERE key = 'queued_bytes';
END;
CREATE TRIGGER IF NOT EXISTS queue_bytes_out AFTER DELETE ON queue BEGIN
    UPDATE dm_meta SET value = value - length(CAST(OLD.body AS BLOB)) WHERE key = 'queued_bytes';
END;
";

const POSTGRES_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS dm_peers (
    name TEXT PRIMARY KEY,
    created_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS dm_queue (
    id BIGSERIAL PRIMARY KEY,
    recipient TEXT NOT NULL,
    sender TEXT NOT NULL,
    body TEXT NOT NULL,
    queued_ms BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS dm_queue_by_recipient ON dm_queue (recipient, id);
CREATE TABLE IF NOT EXISTS dm_meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
INSERT INTO dm_meta (key, value)
    SELECT 'queued_bytes', COALESCE(SUM(octet_length(body)), 0) FROM dm_queue
    ON CONFLICT (key) DO NOTHING;
CREATE OR REPLACE FUNCTION dm_queue_bytes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE dm_meta SET value = value + octet_length(NEW.body) WHERE key = 'queued_bytes';
        RETURN NEW;
    END IF;
    UPDATE dm_meta SET value = value - octet_length(OLD.body) WHERE key = 'queued_bytes';
    RETURN OLD;
END $$;
CREATE OR REPLACE TRIGGER dm_queue_bytes AFTER INSERT OR DELETE ON dm_queue
    FOR EACH ROW EXECUTE FUNCTION dm_queue_bytes();
";

pub(super) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Queue {
    /// Opens the store and creates its tables if missing: PostgreSQL when configured, else
    /// Redis in a cluster (so the nodes share it), else SQLite.
    pub async fn open(
        config: &StoreConfig,
        cluster: Option<&ClusterConfig>,
    ) -> Result<Queue, StoreError> {
        match config {
            StoreConfig::Sqlite(_) if let Some(cluster) = cluster => {
                Ok(Queue::Redis(RedisQueue::open(cluster).await?))
            }
            StoreConfig::Sqlite(dir) => {
                let db = Sqlite::open(dir, "messages.sqlite3", Durability::Disk)?;
                db.call(|c| c.execute_batch(SQLITE_SCHEMA)).await?;
                let commit = GroupCommit::spawn(db.clone()).map_err(|_| StoreError::Worker)?;
                Ok(Queue::Sqlite { db, commit })
            }
            StoreConfig::Postgres(url) => {
                let pool = postgres_pool(url, 8)?;
                let client = pool.get().await?;
                if let Err(e) = client.batch_execute(POSTGRES_SCHEMA).await {
                    // Two nodes creating the schema at once: one loses the race; try again.
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    client.batch_execute(POSTGRES_SCHEMA).await.map_err(|_| e)?;
                }
                Ok(Queue::Postgres(pool))
            }
        }
    }

    /// Remembers `name` as a known peer, unless it is new and `max` peers are known
    /// already: false then.
    pub async fn register(&self, name: &str, max: u64) -> Result<bool, StoreError> {
        if self.is_known(name).await? {
            return Ok(true);
        }
        let name = name.to_owned();
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        match self {
            Queue::Sqlite { db, .. } => {
                db.call(move |c| {
                    c.execute(
                        "INSERT OR IGNORE INTO peers (name, created_ms) SELECT ?1, ?2 \
                         WHERE (SELECT COUNT(*) FROM peers) < ?3",
                        rusqlite::params![name, now_ms(), max],
                    )?;
                    c.query_row("SELECT 1 FROM peers WHERE name = ?1", [name], |_| Ok(()))
                        .map(|()| true)
                        .or_else(|e| match e {
                            rusqlite::Error::QueryReturnedNoRows => Ok(false),
                            e => Err(e),
                        })
                })
                .await
            }
            Queue::Postgres(pool) => {
                let client = pool.get().await?;
                client
                    .execute(
                        "INSERT INTO dm_peers (name, created_ms) SELECT $1, $2 \
                         WHERE (SELECT COUNT(*) FROM dm_peers) < $3 \
                         ON CONFLICT (name) DO NOTHING",
                        &[&name, &now_ms(), &max],
                    )
                    .await?;
                Ok(client
                    .query_opt("SELECT 1 FROM dm_peers WHERE name = $1", &[&name])
                    .await?
                    .is_some())
            }
            Queue::Redis(r) => Ok(r.register(&name, max).await?),
        }
    }

    /// Whether `name` has ever logged in.
    pub async fn is_known(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_owned();
        match self {
            Queue::Sqlite { db, .. } => {
                db.call(move |c| {
                    c.query_row("SELECT 1 FROM peers WHERE name = ?1", [name], |_| Ok(()))
                        .map(|()| true)
                        .or_else(|e| match e {
                            rusqlite::Error::QueryReturnedNoRows => Ok(false),
                            e => Err(e),
                        })
                })
                .await
            }
            Queue::Postgres(pool) => Ok(pool
                .get()
                .await?
                .query_opt("SELECT 1 FROM dm_peers WHERE name = $1", &[&name])
                .await?
                .is_some()),
            Queue::Redis(r) => Ok(r.is_known(&name).await?),
        }
    }

    /// Queues `body` for `recipient`, unless `recipient` already has as many messages
    /// waiting as the bounds allow, or the store as many bytes. Returns once the message
    /// is committed.
    pub async fn enqueue(
        &self,
        recipient: &str,
        sender: &str,
        body: &str,
        bounds: QueueBounds,
    ) -> Result<(), QueueError> {
        let (r, s, b) = (recipient.to_owned(), sender.to_owned(), body.to_owned());
        let limit = bounds.per_recipient as i64;
        let store_bytes = i64::try_from(bounds.store_bytes).unwrap_or(i64::MAX);
        let outcome = match self {
            Queue::Sqlite { commit, .. } => commit.enqueue(&r, &s, &b, limit, store_bytes).await?,
            Queue::Postgres(pool) => {
                let client = pool.get().await.map_err(StoreError::from)?;
                let added = client
                    .execute(
                        "INSERT INTO dm_queue (recipient, sender, body, queued_ms) \
                         SELECT $1, $2, $3, $4 \
                         WHERE (SELECT COUNT(*) FROM dm_queue WHERE recipient = $1) < $5 \
                         AND (SELECT value FROM dm_meta WHERE key = 'queued_bytes') \
                             + octet_length($3) <= $6",
                        &[&r, &s, &b, &now_ms(), &limit, &store_bytes],
                    )
                    .await
                    .map_err(StoreError::from)?;
                if added > 0 {
                    ADDED
                } else {
                    let waiting: i64 = client
                        .query_one("SELECT COUNT(*) FROM dm_queue WHERE recipient = $1", &[&r])
                        .await
                        .map_err(StoreError::from)?
                        .get(0);
                    if waiting >= limit {
                        RECIPIENT_FULL
                    } else {
                        STORE_FULL
                    }
                }
            }
            Queue::Redis(q) => q
                .enqueue(&r, &s, &b, limit, store_bytes)
                .await
                .map_err(StoreError::from)?,
        };
        match outcome {
            ADDED => Ok(()),
            STORE_FULL => Err(QueueError::StoreFull),
            _ => Err(QueueError::Full(recipient.to_owned())),
        }
    }

    /// Bytes of every queued message together.
    pub async fn queued_bytes(&self) -> Result<u64, StoreError> {
        let bytes = match self {
            Queue::Sqlite { db, .. } => {
                db.call(|c| {
                    c.query_row(
                        "SELECT value FROM dm_meta WHERE key = 'queued_bytes'",
                        [],
                        |r| r.get::<_, i64>(0),
                    )
                })
                .await?
            }
            Queue::Postgres(pool) => pool
                .get()
                .await?
                .query_one("SELECT value FROM dm_meta WHERE key = 'queued_bytes'", &[])
                .await?
                .get(0),
            Queue::Redis(q) => q.queued_bytes().await?,
        };
        Ok(bytes.max(0) as u64)
    }

    /// The oldest messages waiting for `recipient`, in the order they were queued: at most
    /// `max` of them, and no more than `max_bytes` (at least one).
    pub async fn pending(
        &self,
        recipient: &str,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<Queued>, StoreError> {
        let r = recipient.to_owned();
        let rows: Vec<Queued> = match self {
            Queue::Sqlite { db, .. } => {
                db.call(move |c| {
                    let mut stmt = c.prepare_cached(
                        "SELECT id, body FROM queue WHERE recipient = ?1 ORDER BY id LIMIT ?2",
                    )?;
                    let rows = stmt.query_map(rusqlite::params![r, max as i64], |row| {
                        Ok(Queued {
                            id: MessageId::Row(row.get(0)?),
                            body: row.get(1)?,
                        })
                    })?;
                    rows.collect()
                })
                .await?
            }
            Queue::Postgres(pool) => pool
                .get()
                .await?
                .query(
                    "SELECT id, body FROM dm_queue WHERE recipient = $1 ORDER BY id LIMIT $2",
                    &[&r, &(max as i64)],
                )
                .await?
                .iter()
                .map(|row| Queued {
                    id: MessageId::Row(row.get(0)),
                    body: row.get(1),
                })
                .collect(),
            Queue::Redis(q) => q
                .pending(&r, max)
                .await?
                .into_iter()
                .map(|(id, body)| Queued {
                    id: MessageId::Stream(id),
                    body,
                })
                .collect(),
        };
        let mut bytes = 0;
        Ok(rows
            .into_iter()
            .enumerate()
            .take_while(|(i, q)| {
                bytes += q.body.len();
                *i == 0 || bytes <= max_bytes
            })
            .map(|(_, q)| q)
            .collect())
    }

    /// Removes delivered messages of `recipient`.
    pub async fn remove(&self, recipient: &str, ids: Vec<MessageId>) -> Result<(), StoreError> {
        let rows = || -> Vec<i64> {
            ids.iter()
                .filter_map(|id| match id {
                    MessageId::Row(r) => Some(*r),
                    MessageId::Stream(_) => None,
                })
                .collect()
        };
        match self {
            Queue::Sqlite { db, .. } => {
                let ids = rows();
                db.call(move |c| {
                    let tx = c.transaction()?;
                    {
                        let mut stmt = tx.prepare_cached("DELETE FROM queue WHERE id = ?1")?;
                        for id in ids {
                            stmt.execute([id])?;
                        }
                    }
                    tx.commit()
                })
                .await
            }
            Queue::Postgres(pool) => {
                pool.get()
                    .await?
                    .execute("DELETE FROM dm_queue WHERE id = ANY($1)", &[&rows()])
                    .await?;
                Ok(())
            }
            Queue::Redis(q) => {
                let ids: Vec<String> = ids
                    .into_iter()
                    .filter_map(|id| match id {
                        MessageId::Stream(s) => Some(s),
                        MessageId::Row(_) => None,
                    })
                    .collect();
                Ok(q.remove(recipient, &ids).await?)
            }
        }
    }

    /// Messages waiting for `recipient`.
    pub async fn len(&self, recipient: &str) -> Result<usize, StoreError> {
        let r = recipient.to_owned();
        match self {
            Queue::Sqlite { db, .. } => db
                .call(move |c| {
                    c.query_row(
                        "SELECT COUNT(*) FROM queue WHERE recipient = ?1",
                        [r],
                        |row| row.get::<_, i64>(0),
                    )
                })
                .await
                .map(|n| n as usize),
            Queue::Postgres(pool) => {
                let row = pool
                    .get()
                    .await?
                    .query_one("SELECT COUNT(*) FROM dm_queue WHERE recipient = $1", &[&r])
                    .await?;
                Ok(row.get::<_, i64>(0) as usize)
            }
            Queue::Redis(q) => Ok(q.len(&r).await?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn sqlite() -> (Queue, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(&StoreConfig::Sqlite(dir.path().into()), None)
            .await
            .unwrap();
        (q, dir)
    }

    #[tokio::test]
    async fn peers_are_known_once_registered() {
        let (q, _dir) = sqlite().await;
        assert!(!q.is_known("A").await.unwrap());
        assert!(q.register("A", 2).await.unwrap());
        assert!(q.register("A", 2).await.unwrap());
        assert!(q.is_known("A").await.unwrap());
        assert!(!q.is_known("a").await.unwrap());
        // At the bound, a new name is refused and a known one still logs in.
        assert!(q.register("B", 2).await.unwrap());
        assert!(!q.register("C", 2).await.unwrap());
        assert!(!q.is_known("C").await.unwrap());
        assert!(q.register("A", 2).await.unwrap());
    }

    #[tokio::test]
    async fn the_store_is_bounded_in_bytes_across_recipients() {
        let (q, _dir) = sqlite().await;
        let bounds = QueueBounds {
            per_recipient: 100,
            store_bytes: 10,
        };
        q.enqueue("B", "A", "12345", bounds).await.unwrap();
        q.enqueue("C", "A", "12345", bounds).await.unwrap();
        assert!(matches!(
            q.enqueue("D", "A", "1", bounds).await,
            Err(QueueError::StoreFull)
        ));
        assert_eq!(q.queued_bytes().await.unwrap(), 10);
        let p = q.pending("B", 10, 1 << 20).await.unwrap();
        q.remove("B", vec![p[0].id.clone()]).await.unwrap();
        assert_eq!(q.queued_bytes().await.unwrap(), 5);
        q.enqueue("D", "A", "é", bounds).await.unwrap();
        assert_eq!(q.queued_bytes().await.unwrap(), 7, "bytes, not characters");
    }

    #[tokio::test]
    async fn queue_keeps_order_limit_and_removal() {
        let (q, _dir) = sqlite().await;
        let bounds = QueueBounds {
            per_recipient: 3,
            store_bytes: 1 << 20,
        };
        for i in 0..3 {
            q.enqueue("B", "A", &format!("m{i}"), bounds).await.unwrap();
        }
        assert!(matches!(
            q.enqueue("B", "A", "m3", bounds).await,
            Err(QueueError::Full(_))
        ));
        q.enqueue("C", "A", "other", bounds).await.unwrap();
        let p = q.pending("B", 10, 1 << 20).await.unwrap();
        let bodies: Vec<_> = p.iter().map(|m| m.body.as_str()).collect();
        assert_eq!(bodies, ["m0", "m1", "m2"]);
        // A byte budget keeps at least one message.
        assert_eq!(q.pending("B", 10, 1).await.unwrap().len(), 1);
        q.remove("B", vec![p[0].id.clone(), p[1].id.clone()])
            .await
            .unwrap();
        assert_eq!(q.len("B").await.unwrap(), 1);
        assert_eq!(q.len("C").await.unwrap(), 1);
    }
}
