//! The durable log store: the table `log_entries` in SQLite (`logs.sqlite3` in the data
//! directory, the default) or PostgreSQL (`--database-url`), the batching writer that fills
//! it off the request path, retention, and the keyset-paged query behind `/logs/query`.
//!
//! Owns the schema and the SQL. The columns are the original log dumper's (client_time,
//! level, msg, user, room, server_time, seq_number, text). The writer is fed by a bounded
//! channel: producers only `try_send`, so a full or failing store never blocks the relay; what
//! does not fit is counted (`logs_store_dropped_total`) and warned about. The writer's own
//! events are under this module's target, which the server-log forwarder skips, so a failing
//! store cannot feed itself.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::entry::{Entry, Posted, now_ms};
use crate::metrics::Metrics;
use crate::store::{Durability, Sqlite, StoreError};

/// The SQLite file of the log store in the data directory.
pub const SQLITE_FILE: &str = "logs.sqlite3";

/// Where entries are kept.
#[derive(Debug, Clone)]
pub enum LogStore {
    Sqlite(Sqlite),
    Postgres(deadpool_postgres::Pool),
}

/// How long entries are kept: by age and/or by count (`None`: no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    pub max_age: Option<Duration>,
    pub max_rows: Option<u64>,
}

/// A search of `/logs/query`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// Entries of this room and room-less ones (as a listener of the room sees).
    pub room: Option<String>,
    pub user: Option<String>,
    /// Levels, lowercase; empty: every level.
    pub levels: Vec<String>,
    /// A substring of `text` or `msg`, case-insensitive (ASCII).
    pub text: Option<String>,
    /// `serverTime` bounds, unix ms, inclusive.
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub limit: usize,
    /// Only entries before this cursor (from the previous page's `next`).
    pub before: Option<Cursor>,
}

/// A place in the newest-first order: (seq_number, row id). The row id breaks ties between
/// the nodes of a cluster sharing one PostgreSQL; in SQLite it is the seq_number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub seq: i64,
    pub id: i64,
}

impl Cursor {
    /// The text form given to clients: `<seq>.<id>`.
    pub fn encode(&self) -> String {
        format!("{}.{}", self.seq, self.id)
    }

    pub fn parse(s: &str) -> Option<Cursor> {
        let (seq, id) = s.split_once('.')?;
        Some(Cursor {
            seq: seq.parse().ok()?,
            id: id.parse().ok()?,
        })
    }
}

/// One page of a query, newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub entries: Vec<Entry>,
    /// The cursor of the next (older) page, if there may be one.
    pub next: Option<Cursor>,
}

const SQLITE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS log_entries (
    seq_number INTEGER PRIMARY KEY,
    server_time INTEGER NOT NULL,
    client_time INTEGER,
    level TEXT,
    msg TEXT,
    \"user\" TEXT,
    room TEXT,
    text TEXT
);
CREATE INDEX IF NOT EXISTS log_entries_room ON log_entries (room, seq_number);
CREATE INDEX IF NOT EXISTS log_entries_user ON log_entries (\"user\", seq_number);
CREATE INDEX IF NOT EXISTS log_entries_time ON log_entries (server_time);
";

const POSTGRES_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS log_entries (
    id BIGSERIAL PRIMARY KEY,
    seq_number BIGINT NOT NULL,
    server_time BIGINT NOT NULL,
    client_time BIGINT,
    level TEXT,
    msg TEXT,
    \"user\" TEXT,
    room TEXT,
    text TEXT
);
CREATE INDEX IF NOT EXISTS log_entries_seq ON log_entries (seq_number, id);
CREATE INDEX IF NOT EXISTS log_entries_room ON log_entries (room, seq_number);
CREATE INDEX IF NOT EXISTS log_entries_user ON log_entries (\"user\", seq_number);
CREATE INDEX IF NOT EXISTS log_entries_time ON log_entries (server_time);
";

const COLUMNS: &str = "seq_number, server_time, client_time, level, msg, \"user\", room, text";

/// A query parameter, for either backend.
#[derive(Debug, Clone)]
enum Param {
    Int(i64),
    Text(String),
}

impl LogStore {
    /// Opens the store the configuration names (PostgreSQL connects lazily).
    pub fn open(config: &crate::config::StoreConfig) -> Result<LogStore, StoreError> {
        match config {
            crate::config::StoreConfig::Sqlite(dir) => Ok(LogStore::Sqlite(Sqlite::open(
                dir,
                SQLITE_FILE,
                Durability::Process,
            )?)),
            crate::config::StoreConfig::Postgres(url) => {
                Ok(LogStore::Postgres(crate::store::postgres_pool(url, 4)?))
            }
        }
    }

    /// Creates the table if missing; returns the largest `seqNumber` stored (0 when none).
    pub async fn init(&self) -> Result<i64, StoreError> {
        match self {
            LogStore::Sqlite(db) => {
                db.call(|c| {
                    c.execute_batch(SQLITE_SCHEMA)?;
                    c.query_row(
                        "SELECT COALESCE(MAX(seq_number), 0) FROM log_entries",
                        [],
                        |r| r.get(0),
                    )
                })
                .await
            }
            LogStore::Postgres(pool) => {
                let client = pool.get().await?;
                if let Err(e) = client.batch_execute(POSTGRES_SCHEMA).await {
                    // Two nodes creating the table at once: one loses the race; try again.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    client.batch_execute(POSTGRES_SCHEMA).await.map_err(|_| e)?;
                }
                let row = client
                    .query_one("SELECT COALESCE(MAX(seq_number), 0) FROM log_entries", &[])
                    .await?;
                Ok(row.get(0))
            }
        }
    }

    /// Writes a batch in one transaction (SQLite) or one statement (PostgreSQL).
    pub async fn write(&self, batch: Arc<Vec<Arc<Entry>>>) -> Result<(), StoreError> {
        match self {
            LogStore::Sqlite(db) => {
                db.call(move |c| {
                    let tx = c.transaction()?;
                    {
                        let mut stmt = tx.prepare_cached(&format!(
                            "INSERT OR REPLACE INTO log_entries ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
                        ))?;
                        for e in batch.iter() {
                            let p = &e.posted;
                            stmt.execute(rusqlite::params![
                                e.seq,
                                e.server_time,
                                p.client_time,
                                p.level,
                                p.msg,
                                p.user,
                                p.room,
                                p.text
                            ])?;
                        }
                    }
                    tx.commit()
                })
                .await
            }
            LogStore::Postgres(pool) => {
                let client = pool.get().await?;
                let col = |f: fn(&Entry) -> Option<String>| -> Vec<Option<String>> {
                    batch.iter().map(|e| f(e)).collect()
                };
                let seq: Vec<i64> = batch.iter().map(|e| e.seq).collect();
                let server_time: Vec<i64> = batch.iter().map(|e| e.server_time).collect();
                let client_time: Vec<Option<i64>> =
                    batch.iter().map(|e| e.posted.client_time).collect();
                let (level, msg, user, room, text) = (
                    col(|e| e.posted.level.clone()),
                    col(|e| e.posted.msg.clone()),
                    col(|e| e.posted.user.clone()),
                    col(|e| e.posted.room.clone()),
                    col(|e| e.posted.text.clone()),
                );
                client
                    .execute(
                        &format!(
                            "INSERT INTO log_entries ({COLUMNS}) SELECT * FROM UNNEST(\
                             $1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::text[], \
                             $6::text[], $7::text[], $8::text[])"
                        ),
                        &[
                            &seq,
                            &server_time,
                            &client_time,
                            &level,
                            &msg,
                            &user,
                            &room,
                            &text,
                        ],
                    )
                    .await?;
                Ok(())
            }
        }
    }

    /// One page of entries matching `q`, newest first.
    pub async fn query(&self, q: Query) -> Result<Page, StoreError> {
        let postgres = matches!(self, LogStore::Postgres(_));
        let mut params: Vec<Param> = Vec::new();
        let mark = |params: &mut Vec<Param>, p: Param| {
            params.push(p);
            if postgres {
                format!("${}", params.len())
            } else {
                format!("?{}", params.len())
            }
        };
        let mut conds: Vec<String> = Vec::new();
        if let Some(room) = &q.room {
            let m = mark(&mut params, Param::Text(room.clone()));
            conds.push(format!("(room = {m} OR room IS NULL)"));
        }
        if let Some(user) = &q.user {
            let m = mark(&mut params, Param::Text(user.clone()));
            conds.push(format!("\"user\" = {m}"));
        }
        if !q.levels.is_empty() {
            let marks: Vec<String> = q
                .levels
                .iter()
                .map(|l| mark(&mut params, Param::Text(l.to_ascii_lowercase())))
                .collect();
            conds.push(format!("lower(level) IN ({})", marks.join(", ")));
        }
        if let Some(text) = &q.text {
            let m = mark(&mut params, Param::Text(text.to_ascii_lowercase()));
            let find = if postgres { "strpos" } else { "instr" };
            conds.push(format!(
                "({find}(lower(text), {m}) > 0 OR {find}(lower(msg), {m}) > 0)"
            ));
        }
        if let Some(since) = q.since {
            let m = mark(&mut params, Param::Int(since));
            conds.push(format!("server_time >= {m}"));
        }
        if let Some(until) = q.until {
            let m = mark(&mut params, Param::Int(until));
            conds.push(format!("server_time <= {m}"));
        }
        if let Some(c) = q.before {
            if postgres {
                let s = mark(&mut params, Param::Int(c.seq));
                let i = mark(&mut params, Param::Int(c.id));
                conds.push(format!("(seq_number, id) < ({s}, {i})"));
            } else {
                let s = mark(&mut params, Param::Int(c.seq));
                conds.push(format!("seq_number < {s}"));
            }
        }
        let limit = q.limit.max(1);
        let fetch = mark(&mut params, Param::Int(limit as i64 + 1));
        let filter = if conds.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conds.join(" AND "))
        };
        let (id, order) = if postgres {
            ("id", "seq_number DESC, id DESC")
        } else {
            ("seq_number", "seq_number DESC")
        };
        let sql = format!(
            "SELECT {COLUMNS}, {id} FROM log_entries {filter} ORDER BY {order} LIMIT {fetch}"
        );
        let mut rows: Vec<(Entry, i64)> = match self {
            LogStore::Sqlite(db) => {
                db.call(move |c| {
                    let mut stmt = c.prepare_cached(&sql)?;
                    let values: Vec<rusqlite::types::Value> = params
                        .into_iter()
                        .map(|p| match p {
                            Param::Int(i) => rusqlite::types::Value::Integer(i),
                            Param::Text(t) => rusqlite::types::Value::Text(t),
                        })
                        .collect();
                    let rows = stmt.query_map(rusqlite::params_from_iter(values), |r| {
                        Ok((
                            Entry {
                                seq: r.get(0)?,
                                server_time: r.get(1)?,
                                posted: Posted {
                                    client_time: r.get(2)?,
                                    level: r.get(3)?,
                                    msg: r.get(4)?,
                                    user: r.get(5)?,
                                    room: r.get(6)?,
                                    text: r.get(7)?,
                                },
                            },
                            r.get(8)?,
                        ))
                    })?;
                    rows.collect()
                })
                .await?
            }
            LogStore::Postgres(pool) => {
                let client = pool.get().await?;
                let boxed: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> = params
                    .into_iter()
                    .map(|p| -> Box<dyn tokio_postgres::types::ToSql + Sync + Send> {
                        match p {
                            Param::Int(i) => Box::new(i),
                            Param::Text(t) => Box::new(t),
                        }
                    })
                    .collect();
                let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = boxed
                    .iter()
                    .map(|b| b.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
                    .collect();
                client
                    .query(&sql, &refs)
                    .await?
                    .into_iter()
                    .map(|r| {
                        (
                            Entry {
                                seq: r.get(0),
                                server_time: r.get(1),
                                posted: Posted {
                                    client_time: r.get(2),
                                    level: r.get(3),
                                    msg: r.get(4),
                                    user: r.get(5),
                                    room: r.get(6),
                                    text: r.get(7),
                                },
                            },
                            r.get(8),
                        )
                    })
                    .collect()
            }
        };
        let more = rows.len() > limit;
        rows.truncate(limit);
        let next = if more {
            rows.last().map(|(e, id)| Cursor {
                seq: e.seq,
                id: *id,
            })
        } else {
            None
        };
        Ok(Page {
            entries: rows.into_iter().map(|(e, _)| e).collect(),
            next,
        })
    }

    /// Deletes what retention says to; returns how many rows went.
    pub async fn retain(&self, r: Retention) -> Result<u64, StoreError> {
        let cutoff = r
            .max_age
            .map(|age| now_ms().saturating_sub(age.as_millis() as i64));
        let keep = r.max_rows.map(|n| n as i64);
        match self {
            LogStore::Sqlite(db) => {
                db.call(move |c| {
                    let mut deleted = 0u64;
                    // In chunks, so the writer is never held up for long.
                    let chunk = |c: &mut rusqlite::Connection, cond: &str, p: i64| {
                        c.execute(
                            &format!("DELETE FROM log_entries WHERE seq_number IN (SELECT seq_number FROM log_entries WHERE {cond} ORDER BY seq_number LIMIT 5000)"),
                            [p],
                        )
                    };
                    if let Some(cutoff) = cutoff {
                        loop {
                            let n = chunk(c, "server_time < ?1", cutoff)?;
                            deleted += n as u64;
                            if n == 0 {
                                break;
                            }
                        }
                    }
                    if let Some(keep) = keep {
                        let oldest_kept: Option<i64> = c
                            .query_row(
                                "SELECT seq_number FROM log_entries ORDER BY seq_number DESC LIMIT 1 OFFSET ?1",
                                [keep.saturating_sub(1).max(0)],
                                |r| r.get(0),
                            )
                            .map(Some)
                            .or_else(|e| match e {
                                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                                e => Err(e),
                            })?;
                        let bound = if keep == 0 { Some(i64::MAX) } else { oldest_kept };
                        if let Some(bound) = bound {
                            loop {
                                let n = chunk(c, "seq_number < ?1", bound)?;
                                deleted += n as u64;
                                if n == 0 {
                                    break;
                                }
                            }
                        }
                    }
                    Ok(deleted)
                })
                .await
            }
            LogStore::Postgres(pool) => {
                let client = pool.get().await?;
                let mut deleted = 0;
                if let Some(cutoff) = cutoff {
                    deleted += client
                        .execute("DELETE FROM log_entries WHERE server_time < $1", &[&cutoff])
                        .await?;
                }
                if let Some(keep) = keep {
                    deleted += client
                        .execute(
                            "DELETE FROM log_entries WHERE id <= (SELECT id FROM log_entries ORDER BY id DESC OFFSET $1 LIMIT 1)",
                            &[&keep],
                        )
                        .await?;
                }
                Ok(deleted)
            }
        }
    }
}

/// How often retention runs (and once at start).
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(60);
/// Entries written in one batch at most.
const MAX_BATCH: usize = 2000;
/// Attempts at one batch before it is given up (about a minute of outage).
const MAX_ATTEMPTS: u32 = 15;

/// The writer: takes what the channel holds, writes it as one batch, retries a failing
/// store with back-off (meanwhile the channel fills and new entries are dropped and
/// counted), runs retention. On shutdown it writes what is queued, waiting briefly for
/// requests still in flight, then returns.
pub async fn run_writer(
    store: LogStore,
    mut rx: mpsc::Receiver<Arc<Entry>>,
    retention: Retention,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut retention_tick = tokio::time::interval(RETENTION_INTERVAL);
    retention_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut stopping = false;
    loop {
        if stopping {
            // Requests in flight when shutdown began may still post: wait a little for them.
            match tokio::time::timeout(
                Duration::from_millis(200),
                rx.recv_many(&mut batch, MAX_BATCH),
            )
            .await
            {
                Ok(n) if n > 0 => {}
                _ => return,
            }
        } else {
            tokio::select! {
                n = rx.recv_many(&mut batch, MAX_BATCH) => if n == 0 { return },
                _ = shutdown.cancelled() => { stopping = true; continue; }
                _ = retention_tick.tick() => {
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
                    continue;
                }
            }
        }
        let entries = Arc::new(std::mem::take(&mut batch));
        write_with_retry(&store, entries, &metrics, &shutdown).await;
    }
}

async fn write_with_retry(
    store: &LogStore,
    entries: Arc<Vec<Arc<Entry>>>,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    for attempt in 1..=MAX_ATTEMPTS {
        match store.write(entries.clone()).await {
            Ok(()) => {
                metrics.logs_stored.inc_by(entries.len() as u64);
                if attempt > 1 {
                    info!(attempt, "log store writes again");
                }
                return;
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
    metrics.logs_store_dropped.inc_by(entries.len() as u64);
    warn!(
        entries = entries.len(),
        "log store: batch given up, entries not stored"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: i64, room: Option<&str>, user: &str, level: &str, msg: &str) -> Arc<Entry> {
        Arc::new(Entry {
            seq,
            server_time: 1_000 + seq,
            posted: Posted {
                client_time: Some(seq),
                level: Some(level.into()),
                msg: Some(msg.into()),
                text: Some(format!("[{level}] {msg}")),
                user: Some(user.into()),
                room: room.map(Into::into),
            },
        })
    }

    #[tokio::test]
    async fn sqlite_write_query_page_retain() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            LogStore::Sqlite(Sqlite::open(dir.path(), SQLITE_FILE, Durability::Process).unwrap());
        assert_eq!(store.init().await.unwrap(), 0);
        let batch: Vec<_> = (1..=10)
            .map(|i| {
                let room = if i % 3 == 0 {
                    None
                } else {
                    Some(if i % 2 == 0 { "a" } else { "b" })
                };
                entry(
                    i,
                    room,
                    if i < 5 { "ann" } else { "bob" },
                    if i % 2 == 0 { "Info" } else { "Error" },
                    &format!("Message {i}"),
                )
            })
            .collect();
        store.write(Arc::new(batch)).await.unwrap();
        assert_eq!(store.init().await.unwrap(), 10);
        let seqs = |p: &Page| p.entries.iter().map(|e| e.seq).collect::<Vec<_>>();
        let all = store
            .query(Query {
                limit: 4,
                ..Query::default()
            })
            .await
            .unwrap();
        assert_eq!(seqs(&all), [10, 9, 8, 7]);
        let next = store
            .query(Query {
                limit: 4,
                before: all.next,
                ..Query::default()
            })
            .await
            .unwrap();
        assert_eq!(seqs(&next), [6, 5, 4, 3]);
        let room_a = store
            .query(Query {
                room: Some("a".into()),
                limit: 100,
                ..Query::default()
            })
            .await
            .unwrap();
        assert_eq!(seqs(&room_a), [10, 9, 8, 6, 4, 3, 2]);
        assert!(room_a.next.is_none());
        let q = Query {
            user: Some("bob".into()),
            levels: vec!["error".into()],
            text: Some("MESSAGE".into()),
            since: Some(1_006),
            until: Some(1_009),
            limit: 100,
            ..Query::default()
        };
        assert_eq!(seqs(&store.query(q).await.unwrap()), [9, 7]);
        let deleted = store
            .retain(Retention {
                max_rows: Some(3),
                max_age: None,
            })
            .await
            .unwrap();
        assert_eq!(deleted, 7);
        let left = store
            .query(Query {
                limit: 100,
                ..Query::default()
            })
            .await
            .unwrap();
        assert_eq!(seqs(&left), [10, 9, 8]);
        let deleted = store
            .retain(Retention {
                max_rows: None,
                max_age: Some(Duration::from_secs(1)),
            })
            .await
            .unwrap();
        assert_eq!(deleted, 3, "server times of 1970 are older than a second");
    }

    #[test]
    fn cursor_round_trip() {
        let c = Cursor { seq: 12, id: 40 };
        assert_eq!(Cursor::parse(&c.encode()), Some(c));
        assert_eq!(Cursor::parse("12"), None);
        assert_eq!(Cursor::parse("a.b"), None);
    }
}
