//! The durable log store: the table `log_entries` in SQLite (`logs.sqlite3` in the data
//! directory, the default) or PostgreSQL (`--database-url`), with its schema and migrations,
//! the reservations of `seqNumber`s, retention, and the keyset-paged query behind
//! `/logs/query`. The writer that fills it is in [`super::writer`].
//!
//! Owns the schema and the SQL. The columns are the original log dumper's (client_time,
//! level, msg, user, room, server_time, seq_number, text) plus `search`: `msg` and `text`
//! lowercased by Rust at insert time ([`search_key`]), so text search is case-insensitive
//! for every script and the same on both backends (SQLite's `lower()` is ASCII-only and
//! PostgreSQL's depends on the database's locale). Databases made before that column get it
//! at start and are filled in the background ([`LogStore::backfill_step`]); meanwhile rows
//! not filled yet are searched as before (ASCII case only). The table `log_meta` holds the
//! highest `seqNumber` reserved ([`LogStore::reserve`]) and the backfill's progress.
//!
//! SQLite gets two connections to the file: the writer's (writes, retention, reservations)
//! and the queries', so a query never waits behind a write that waits for a lock (WAL:
//! readers never block on the writer). Every operation first makes sure the schema is set
//! up, so a store unreachable at start is set up once it can be reached.

use std::sync::Arc;
use std::time::Duration;

use super::entry::{Entry, Posted, now_ms};
use crate::store::{Durability, Sqlite, StoreError};

/// The SQLite file of the log store in the data directory.
pub const SQLITE_FILE: &str = "logs.sqlite3";

/// Rows the background filling of `search` does per step.
const BACKFILL_ROWS: i64 = 1000;

/// Where entries are kept: a cheap-to-clone handle.
#[derive(Debug, Clone)]
pub struct LogStore {
    backend: Backend,
    /// Set once the schema is created and migrated; tried again by the next operation
    /// while it fails (`get_or_try_init`), so concurrent callers wait for one attempt.
    ready: Arc<tokio::sync::OnceCell<()>>,
}

#[derive(Debug, Clone)]
enum Backend {
    Sqlite { write: Sqlite, read: Sqlite },
    Postgres(deadpool_postgres::Pool),
}

/// How long entries are kept: by age, by count and/or by the store's size (`None`: no
/// limit). Past any bound the oldest entries go first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    pub max_age: Option<Duration>,
    pub max_rows: Option<u64>,
    /// Bytes of the store, as [`LogStore::size`] measures them.
    pub max_bytes: Option<u64>,
}

/// What a size bound deletes down to when passed: 90% of it, so that the next check does
/// not find it passed again at once.
fn size_target(max_bytes: u64) -> u64 {
    max_bytes / 10 * 9
}

/// SQLite: bytes of the database's pages in use (free pages are reused before the file
/// grows, so the file stays within what was once in use; the WAL aside).
fn sqlite_used_bytes(c: &rusqlite::Connection) -> rusqlite::Result<u64> {
    let pragma = |name: &str| c.query_row(&format!("PRAGMA {name}"), [], |r| r.get::<_, i64>(0));
    let (pages, free, size) = (
        pragma("page_count")?,
        pragma("freelist_count")?,
        pragma("page_size")?,
    );
    Ok((pages - free).max(0) as u64 * size.max(0) as u64)
}

/// PostgreSQL: (estimated bytes of `log_entries`' rows, the newest id, rows per byte). The
/// rows between the oldest and the newest id times the average size of the newest thousand
/// (`pg_column_size`): cheap, and blind to dead rows, which vacuum makes room of.
async fn postgres_size(client: &deadpool_postgres::Client) -> Result<(u64, i64, f64), StoreError> {
    let row = client
        .query_one(
            "SELECT COALESCE(MAX(id) - MIN(id) + 1, 0), COALESCE(MAX(id), 0) FROM log_entries",
            &[],
        )
        .await?;
    let (span, newest): (i64, i64) = (row.get(0), row.get(1));
    let avg: f64 = client
        .query_one(
            "SELECT COALESCE(AVG(pg_column_size(t.*)), 0)::float8 FROM \
             (SELECT * FROM log_entries ORDER BY id DESC LIMIT 1000) t",
            &[],
        )
        .await?
        .get(0);
    Ok(((span.max(0) as f64 * avg) as u64, newest, avg))
}

/// A search of `/logs/query`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// Entries of this room and room-less ones (as a listener of the room sees).
    pub room: Option<String>,
    pub user: Option<String>,
    /// Levels, lowercase; empty: every level.
    pub levels: Vec<String>,
    /// A substring of `text` or `msg`, case-insensitive (Unicode, by [`fold_case`]).
    pub text: Option<String>,
    /// `serverTime` bounds, unix ms, inclusive.
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub limit: usize,
    /// Only entries before this cursor (from the previous page's `next`).
    pub before: Option<Cursor>,
}

/// A place in the newest-first order: (seq_number, row id). SQLite orders by seq_number
/// (its row id); PostgreSQL by the row id, the order the entries were stored in, which for
/// one node is `seqNumber` order and for the nodes of a cluster sharing the table the order
/// they arrived in.
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

/// Lowercases character by character (so the lowercase of a concatenation is the
/// concatenation of the lowercases, which substring search needs; `to_lowercase` on a whole
/// string treats a final sigma specially).
pub fn fold_case(s: &str) -> String {
    s.chars().flat_map(char::to_lowercase).collect()
}

/// The `search` column of an entry: `msg` and `text` case-folded, `text` alone when it
/// already holds `msg` (as the plugin's `HH:mm:ss:fff [Level] msg` does), else both joined
/// by a newline.
pub fn search_key(msg: Option<&str>, text: Option<&str>) -> String {
    match (msg, text) {
        (Some(m), Some(t)) if t.contains(m) => fold_case(t),
        (Some(m), Some(t)) => format!("{}\n{}", fold_case(m), fold_case(t)),
        (Some(one), None) | (None, Some(one)) => fold_case(one),
        (None, None) => String::new(),
    }
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
    text TEXT,
    search TEXT,
    from_server INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS log_entries_room ON log_entries (room, seq_number);
CREATE INDEX IF NOT EXISTS log_entries_user ON log_entries (\"user\", seq_number);
CREATE INDEX IF NOT EXISTS log_entries_time ON log_entries (server_time);
CREATE TABLE IF NOT EXISTS log_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
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
    text TEXT,
    search TEXT,
    from_server BOOLEAN NOT NULL DEFAULT false
);
CREATE INDEX IF NOT EXISTS log_entries_seq ON log_entries (seq_number, id);
CREATE INDEX IF NOT EXISTS log_entries_room ON log_entries (room, seq_number);
CREATE INDEX IF NOT EXISTS log_entries_user ON log_entries (\"user\", seq_number);
CREATE INDEX IF NOT EXISTS log_entries_time ON log_entries (server_time);
CREATE TABLE IF NOT EXISTS log_meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
";

const COLUMNS: &str =
    "seq_number, server_time, client_time, level, msg, \"user\", room, text, search, from_server";

/// The `log_meta` key of the highest `seqNumber` reserved.
const SEQ_RESERVED: &str = "seq_reserved";
/// The `log_meta` key of the backfill of `search`: the last row done (absent: none to do).
const SEARCH_BACKFILL: &str = "search_backfill";

/// A query parameter, for either backend.
#[derive(Debug, Clone)]
enum Param {
    Int(i64),
    Text(String),
}

fn optional<T>(r: rusqlite::Result<T>) -> rusqlite::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(rusqlite::Error::QueryReturnedNoRows) => Ok(None),
        Err(e) => Err(e),
    }
}

impl LogStore {
    /// Opens the store the configuration names (PostgreSQL connects lazily).
    pub fn open(config: &crate::config::StoreConfig) -> Result<LogStore, StoreError> {
        let backend = match config {
            crate::config::StoreConfig::Sqlite(dir) => Backend::Sqlite {
                write: Sqlite::open(dir, SQLITE_FILE, Durability::Process)?,
                read: Sqlite::open(dir, SQLITE_FILE, Durability::Process)?,
            },
            crate::config::StoreConfig::Postgres(url) => {
                Backend::Postgres(crate::store::postgres_pool(url, 4)?)
            }
        };
        Ok(LogStore {
            backend,
            ready: Arc::new(tokio::sync::OnceCell::new()),
        })
    }

    /// Creates the tables if missing and adds `search` to a table made before it (the
    /// backfill is then noted in `log_meta`); done once (tried again while it fails).
    pub async fn init(&self) -> Result<(), StoreError> {
        self.ready
            .get_or_try_init(|| self.create_schema())
            .await
            .map(|_| ())
    }

    async fn create_schema(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite { write, .. } => {
                write
                    .call(|c| {
                        let tx = c.transaction()?;
                        tx.execute_batch(SQLITE_SCHEMA)?;
                        let has_search: bool = tx.query_row(
                            "SELECT COUNT(*) > 0 FROM pragma_table_info('log_entries') WHERE name = 'search'",
                            [],
                            |r| r.get(0),
                        )?;
                        if !has_search {
                            tx.execute_batch("ALTER TABLE log_entries ADD COLUMN search TEXT")?;
                            tx.execute(
                                "INSERT OR REPLACE INTO log_meta (key, value) VALUES (?1, 0)",
                                [SEARCH_BACKFILL],
                            )?;
                        }
                        let has_origin: bool = tx.query_row(
                            "SELECT COUNT(*) > 0 FROM pragma_table_info('log_entries') WHERE name = 'from_server'",
                            [],
                            |r| r.get(0),
                        )?;
                        if !has_origin {
                            // Older rows count as posted (the server's own were not told apart).
                            tx.execute_batch(
                                "ALTER TABLE log_entries ADD COLUMN from_server INTEGER NOT NULL DEFAULT 0",
                            )?;
                        }
                        tx.commit()
                    })
                    .await
            }
            Backend::Postgres(pool) => {
                let client = pool.get().await?;
                if let Err(e) = client.batch_execute(POSTGRES_SCHEMA).await {
                    // Two nodes creating the table at once: one loses the race; try again.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    client.batch_execute(POSTGRES_SCHEMA).await.map_err(|_| e)?;
                }
                let has_search = client
                    .query_opt(
                        "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() \
                         AND table_name = 'log_entries' AND column_name = 'search'",
                        &[],
                    )
                    .await?
                    .is_some();
                if !has_search {
                    client
                        .batch_execute(&format!(
                            "ALTER TABLE log_entries ADD COLUMN IF NOT EXISTS search TEXT; \
                             INSERT INTO log_meta (key, value) VALUES ('{SEARCH_BACKFILL}', 0) \
                             ON CONFLICT (key) DO NOTHING"
                        ))
                        .await?;
                }
                // Older rows count as posted (the server's own were not told apart).
                client
                    .batch_execute(
                        "ALTER TABLE log_entries ADD COLUMN IF NOT EXISTS from_server BOOLEAN NOT NULL DEFAULT false",
                    )
                    .await?;
                Ok(())
            }
        }
    }

    /// Whether the store answers (its tables made, a trivial query run): for `/readyz`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.init().await?;
        match &self.backend {
            Backend::Sqlite { read, .. } => {
                read.call(|c| c.query_row("SELECT 1", [], |_| Ok(()))).await
            }
            Backend::Postgres(pool) => {
                pool.get().await?.simple_query("SELECT 1").await?;
                Ok(())
            }
        }
    }

    /// Reserves `count` `seqNumber`s for this server: returns (first, last), the first at
    /// least `at_least` and above every number reserved before or stored, and records the
    /// last in `log_meta` before returning, so that no number handed out from it is ever
    /// handed out again, whatever happens to the process. With PostgreSQL every node of a
    /// cluster reserves from the same row, so their numbers never collide.
    pub async fn reserve(&self, at_least: i64, count: i64) -> Result<(i64, i64), StoreError> {
        self.init().await?;
        let count = count.max(1);
        let last: i64 = match &self.backend {
            Backend::Sqlite { write, .. } => {
                write
                    .call(move |c| {
                        let tx =
                            c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                        let reserved: i64 = optional(tx.query_row(
                            "SELECT value FROM log_meta WHERE key = ?1",
                            [SEQ_RESERVED],
                            |r| r.get(0),
                        ))?
                        .unwrap_or(0);
                        // The largest row id is found at once; it covers stores made before
                        // the reservations.
                        let stored: i64 = tx.query_row(
                            "SELECT COALESCE(MAX(seq_number), 0) FROM log_entries",
                            [],
                            |r| r.get(0),
                        )?;
                        let last = reserved.max(stored).max(at_least - 1) + count;
                        tx.execute(
                            "INSERT INTO log_meta (key, value) VALUES (?1, ?2) \
                             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                            rusqlite::params![SEQ_RESERVED, last],
                        )?;
                        tx.commit()?;
                        Ok(last)
                    })
                    .await?
            }
            Backend::Postgres(pool) => {
                let client = pool.get().await?;
                // One statement: atomic against the other nodes.
                let row = client
                    .query_one(
                        &format!(
                            "INSERT INTO log_meta (key, value) \
                             SELECT '{SEQ_RESERVED}', GREATEST($1, COALESCE(MAX(seq_number), 0)) + $2 FROM log_entries \
                             ON CONFLICT (key) DO UPDATE SET value = GREATEST(log_meta.value, EXCLUDED.value - $2) + $2 \
                             RETURNING value"
                        ),
                        &[&(at_least - 1), &count],
                    )
                    .await?;
                row.get(0)
            }
        };
        Ok((last - count + 1, last))
    }

    /// Fills `search` for up to 1000 rows of a table made before that column;
    /// returns whether there may be more to do.
    pub async fn backfill_step(&self) -> Result<bool, StoreError> {
        self.init().await?;
        match &self.backend {
            Backend::Sqlite { write, .. } => {
                write
                    .call(|c| {
                        let tx = c.transaction()?;
                        let Some(from) = optional(tx.query_row(
                            "SELECT value FROM log_meta WHERE key = ?1",
                            [SEARCH_BACKFILL],
                            |r| r.get::<_, i64>(0),
                        ))?
                        else {
                            return Ok(false);
                        };
                        let rows: Vec<(i64, Option<String>, Option<String>)> = {
                            let mut stmt = tx.prepare(
                                "SELECT seq_number, msg, text FROM log_entries WHERE seq_number > ?1 \
                                 ORDER BY seq_number LIMIT ?2",
                            )?;
                            stmt.query_map([from, BACKFILL_ROWS], |r| {
                                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                            })?
                            .collect::<rusqlite::Result<_>>()?
                        };
                        let Some(last) = rows.last().map(|r| r.0) else {
                            tx.execute("DELETE FROM log_meta WHERE key = ?1", [SEARCH_BACKFILL])?;
                            tx.commit()?;
                            return Ok(false);
                        };
                        {
                            let mut update = tx.prepare(
                                "UPDATE log_entries SET search = ?2 WHERE seq_number = ?1 AND search IS NULL",
                            )?;
                            for (seq, msg, text) in &rows {
                                update.execute(rusqlite::params![
                                    seq,
                                    search_key(msg.as_deref(), text.as_deref())
                                ])?;
                            }
                        }
                        tx.execute(
                            "UPDATE log_meta SET value = ?2 WHERE key = ?1",
                            rusqlite::params![SEARCH_BACKFILL, last],
                        )?;
                        tx.commit()?;
                        Ok(true)
                    })
                    .await
            }
            Backend::Postgres(pool) => {
                let client = pool.get().await?;
                let Some(from) = client
                    .query_opt("SELECT value FROM log_meta WHERE key = $1", &[&SEARCH_BACKFILL])
                    .await?
                    .map(|r| r.get::<_, i64>(0))
                else {
                    return Ok(false);
                };
                let rows = client
                    .query(
                        "SELECT id, msg, text FROM log_entries WHERE id > $1 ORDER BY id LIMIT $2",
                        &[&from, &BACKFILL_ROWS],
                    )
                    .await?;
                let Some(last) = rows.last().map(|r| r.get::<_, i64>(0)) else {
                    client
                        .execute("DELETE FROM log_meta WHERE key = $1", &[&SEARCH_BACKFILL])
                        .await?;
                    return Ok(false);
                };
                let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
                let keys: Vec<String> = rows
                    .iter()
                    .map(|r| search_key(r.get(1), r.get(2)))
                    .collect();
                client
                    .execute(
                        "UPDATE log_entries AS l SET search = u.s FROM UNNEST($1::bigint[], $2::text[]) AS u(id, s) \
                         WHERE l.id = u.id AND l.search IS NULL",
                        &[&ids, &keys],
                    )
                    .await?;
                // GREATEST: another node may be filling the same table.
                client
                    .execute(
                        "UPDATE log_meta SET value = GREATEST(value, $2) WHERE key = $1",
                        &[&SEARCH_BACKFILL, &last],
                    )
                    .await?;
                Ok(true)
            }
        }
    }

    /// Writes a batch in one transaction (SQLite) or one statement (PostgreSQL): all of it
    /// or nothing.
    pub async fn write(&self, batch: Arc<Vec<Arc<Entry>>>) -> Result<(), StoreError> {
        self.init().await?;
        match &self.backend {
            Backend::Sqlite { write, .. } => {
                write
                    .call(move |c| {
                        let tx = c.transaction()?;
                        {
                            // A plain INSERT: a number stored twice would be a bug, and is
                            // refused (and reported) rather than overwriting the first.
                            let mut stmt = tx.prepare_cached(&format!(
                                "INSERT INTO log_entries ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
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
                                    p.text,
                                    search_key(p.msg.as_deref(), p.text.as_deref()),
                                    p.from_server,
                                ])?;
                            }
                        }
                        tx.commit()
                    })
                    .await
            }
            Backend::Postgres(pool) => {
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
                let search: Vec<String> = batch
                    .iter()
                    .map(|e| search_key(e.posted.msg.as_deref(), e.posted.text.as_deref()))
                    .collect();
                let from_server: Vec<bool> = batch.iter().map(|e| e.posted.from_server).collect();
                client
                    .execute(
                        &format!(
                            "INSERT INTO log_entries ({COLUMNS}) SELECT * FROM UNNEST(\
                             $1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::text[], \
                             $6::text[], $7::text[], $8::text[], $9::text[], $10::boolean[])"
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
                            &search,
                            &from_server,
                        ],
                    )
                    .await?;
                Ok(())
            }
        }
    }

    /// One page of entries matching `q`, newest first.
    pub async fn query(&self, q: Query) -> Result<Page, StoreError> {
        self.init().await?;
        let postgres = matches!(self.backend, Backend::Postgres(_));
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
            let folded = mark(&mut params, Param::Text(fold_case(text)));
            // Rows not backfilled yet: as before the `search` column, ASCII case only.
            let ascii = mark(&mut params, Param::Text(text.to_ascii_lowercase()));
            let find = if postgres { "strpos" } else { "instr" };
            conds.push(format!(
                "({find}(search, {folded}) > 0 OR (search IS NULL AND \
                 ({find}(lower(text), {ascii}) > 0 OR {find}(lower(msg), {ascii}) > 0)))"
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
                let i = mark(&mut params, Param::Int(c.id));
                conds.push(format!("id < {i}"));
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
        let id = if postgres { "id" } else { "seq_number" };
        let sql = format!(
            "SELECT seq_number, server_time, client_time, level, msg, \"user\", room, text, from_server, {id} \
             FROM log_entries {filter} ORDER BY {id} DESC LIMIT {fetch}"
        );
        let mut rows: Vec<(Entry, i64)> = match &self.backend {
            Backend::Sqlite { read, .. } => {
                read.call(move |c| {
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
                                    from_server: r.get(8)?,
                                },
                            },
                            r.get(9)?,
                        ))
                    })?;
                    rows.collect()
                })
                .await?
            }
            Backend::Postgres(pool) => {
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
                                    from_server: r.get(8),
                                },
                            },
                            r.get(9),
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

    /// The store's size in bytes: SQLite, the database's pages in use; PostgreSQL, an
    /// estimate of the rows' bytes.
    pub async fn size(&self) -> Result<u64, StoreError> {
        self.init().await?;
        match &self.backend {
            Backend::Sqlite { write, .. } => write.call(|c| sqlite_used_bytes(c)).await,
            Backend::Postgres(pool) => Ok(postgres_size(&pool.get().await?).await?.0),
        }
    }

    /// Deletes what retention says to; returns how many rows went.
    pub async fn retain(&self, r: Retention) -> Result<u64, StoreError> {
        let cutoff = r
            .max_age
            .map(|age| now_ms().saturating_sub(age.as_millis() as i64));
        let keep = r.max_rows.map(|n| n as i64);
        let max_bytes = r.max_bytes;
        self.init().await?;
        match &self.backend {
            Backend::Sqlite { write: db, .. } => {
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
                    if let Some(max) = max_bytes {
                        // Rows go in proportion to the excess, oldest first; measured again
                        // after each step (index pages do not shrink exactly with the rows).
                        for _ in 0..4 {
                            let used = sqlite_used_bytes(c)?;
                            if used <= max {
                                break;
                            }
                            let rows: i64 =
                                c.query_row("SELECT COUNT(*) FROM log_entries", [], |r| r.get(0))?;
                            if rows == 0 {
                                break;
                            }
                            let excess = (used - size_target(max)) as f64 / used as f64;
                            let mut todo = ((rows as f64 * excess).ceil() as i64).clamp(1, rows);
                            while todo > 0 {
                                let n = c.execute(
                                    "DELETE FROM log_entries WHERE seq_number IN (SELECT seq_number FROM log_entries ORDER BY seq_number LIMIT ?1)",
                                    [todo.min(5000)],
                                )?;
                                deleted += n as u64;
                                todo -= n as i64;
                                if n == 0 {
                                    break;
                                }
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
            Backend::Postgres(pool) => {
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
                if let Some(max) = max_bytes {
                    let (size, newest, avg) = postgres_size(&client).await?;
                    if size > max && avg > 0.0 {
                        // The newest rows that fit in the target stay.
                        let keep = (size_target(max) as f64 / avg) as i64;
                        deleted += client
                            .execute(
                                "DELETE FROM log_entries WHERE id <= $1",
                                &[&(newest - keep)],
                            )
                            .await?;
                    }
                }
                Ok(deleted)
            }
        }
    }
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
                from_server: user == "server",
            },
        })
    }

    fn sqlite(dir: &std::path::Path) -> LogStore {
        LogStore::open(&crate::config::StoreConfig::Sqlite(dir.to_path_buf())).unwrap()
    }

    fn seqs(p: &Page) -> Vec<i64> {
        p.entries.iter().map(|e| e.seq).collect()
    }

    fn all(limit: usize) -> Query {
        Query {
            limit,
            ..Query::default()
        }
    }

    #[tokio::test]
    async fn sqlite_write_query_page_retain() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite(dir.path());
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
        let first = store.query(all(4)).await.unwrap();
        assert_eq!(seqs(&first), [10, 9, 8, 7]);
        let next = store
            .query(Query {
                before: first.next,
                ..all(4)
            })
            .await
            .unwrap();
        assert_eq!(seqs(&next), [6, 5, 4, 3]);
        let room_a = store
            .query(Query {
                room: Some("a".into()),
                ..all(100)
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
            ..all(100)
        };
        assert_eq!(seqs(&store.query(q).await.unwrap()), [9, 7]);
        // A number stored twice is refused, as data.
        let again = store.write(Arc::new(vec![entry(10, None, "x", "Info", "again")]));
        assert!(again.await.unwrap_err().is_data_error());
        let retention = Retention {
            max_rows: Some(3),
            max_age: None,
            max_bytes: None,
        };
        assert_eq!(store.retain(retention).await.unwrap(), 7);
        assert_eq!(seqs(&store.query(all(100)).await.unwrap()), [10, 9, 8]);
        let retention = Retention {
            max_rows: None,
            max_age: Some(Duration::from_secs(1)),
            max_bytes: None,
        };
        let deleted = store.retain(retention).await.unwrap();
        assert_eq!(deleted, 3, "server times of 1970 are older than a second");
    }

    #[tokio::test]
    async fn reservations_are_never_handed_out_twice_even_once_the_table_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite(dir.path());
        assert_eq!(store.reserve(1, 100).await.unwrap(), (1, 100));
        assert_eq!(store.reserve(1, 100).await.unwrap(), (101, 200));
        // At least where the caller already is.
        assert_eq!(store.reserve(5000, 10).await.unwrap(), (5000, 5009));
        store
            .write(Arc::new(vec![entry(5003, None, "u", "Info", "m")]))
            .await
            .unwrap();
        store
            .retain(Retention {
                max_rows: None,
                max_age: Some(Duration::from_secs(1)),
                max_bytes: None,
            })
            .await
            .unwrap();
        assert!(store.query(all(10)).await.unwrap().entries.is_empty());
        // Another process on the same file (a restart) goes on above.
        drop(store);
        let store = sqlite(dir.path());
        assert_eq!(store.reserve(1, 10).await.unwrap(), (5010, 5019));
    }

    #[tokio::test]
    async fn a_store_made_before_reservations_reserves_above_its_largest_number() {
        let dir = tempfile::tempdir().unwrap();
        let conn = rusqlite::Connection::open(dir.path().join(SQLITE_FILE)).unwrap();
        conn.execute_batch(
            "CREATE TABLE log_entries (seq_number INTEGER PRIMARY KEY, server_time INTEGER NOT NULL, \
             client_time INTEGER, level TEXT, msg TEXT, \"user\" TEXT, room TEXT, text TEXT);
             INSERT INTO log_entries VALUES (41, 1, 1, 'Info', 'Ärger mit ÉCOLE', 'u', NULL, '00:00 [Info] Ärger mit ÉCOLE');
             INSERT INTO log_entries VALUES (42, 1, 1, 'Info', 'plain', 'u', NULL, NULL);",
        )
        .unwrap();
        drop(conn);
        let store = sqlite(dir.path());
        assert_eq!(store.reserve(1, 10).await.unwrap(), (43, 52));
        let find = |text: &str| Query {
            text: Some(text.into()),
            ..all(10)
        };
        // Before the backfill: ASCII case only, as before.
        assert_eq!(seqs(&store.query(find("PLAIN")).await.unwrap()), [42]);
        assert!(store.query(find("ärger")).await.unwrap().entries.is_empty());
        while store.backfill_step().await.unwrap() {}
        for needle in ["Ärger", "ärger", "ÄRGER", "ÉCOLE", "école", "mit é"] {
            assert_eq!(
                seqs(&store.query(find(needle)).await.unwrap()),
                [41],
                "{needle}"
            );
        }
        assert_eq!(seqs(&store.query(find("PLAIN")).await.unwrap()), [42]);
        assert!(
            !store.backfill_step().await.unwrap(),
            "done, and stays done"
        );
    }

    #[test]
    fn search_keys_fold_case_per_character() {
        assert_eq!(fold_case("ÄRGER École ΣΑΣ"), "ärger école σασ");
        assert_eq!(
            search_key(Some("Ärger"), Some("12:00 [Info] Ärger")),
            "12:00 [info] ärger"
        );
        assert_eq!(search_key(Some("A"), Some("b")), "a\nb");
        assert_eq!(search_key(None, Some("B")), "b");
        assert_eq!(search_key(None, None), "");
    }

    #[test]
    fn cursor_round_trip() {
        let c = Cursor { seq: 12, id: 40 };
        assert_eq!(Cursor::parse(&c.encode()), Some(c));
        assert_eq!(Cursor::parse("12"), None);
        assert_eq!(Cursor::parse("a.b"), None);
    }
}
