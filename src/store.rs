//! The durable store's backends: SQLite in the data directory (the default, no setup) and
//! PostgreSQL (`--database-url`, shared by every node of a cluster).
//!
//! Owns opening them and running SQLite's blocking calls off the async runtime. It knows no
//! tables: each front-end that keeps data (the log store, the message queue) owns its schema
//! and its SQL, in its own SQLite file of the data directory so one front-end's writes never
//! wait for another's.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::StoreConfig;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the data directory {0}: {1}")]
    DataDir(String, std::io::Error),
    #[error("SQLite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Shown with the server's SQLSTATE, message and detail (`db error` alone says nothing).
    #[error("PostgreSQL: {}", postgres_detail(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("PostgreSQL pool: {}", pool_detail(.0))]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("invalid PostgreSQL URL: {0}")]
    Url(String),
    #[error("{0}")]
    Failed(String),
    #[error("the store's worker thread failed")]
    Worker,
}

impl StoreError {
    /// Whether the store refused the data itself, so that trying the same write again can
    /// never succeed (as opposed to an outage: the store unreachable, busy, full or not yet
    /// set up). PostgreSQL: SQLSTATE classes 22 (data exception), 23 (integrity constraint)
    /// and 54 (program limit, e.g. a value too large); SQLite: too big, constraint, mismatch.
    pub fn is_data_error(&self) -> bool {
        let postgres = |e: &tokio_postgres::Error| {
            e.code().is_some_and(|c| {
                ["22", "23", "54"]
                    .iter()
                    .any(|class| c.code().starts_with(class))
            })
        };
        match self {
            StoreError::Postgres(e) => postgres(e),
            StoreError::Pool(deadpool_postgres::PoolError::Backend(e)) => postgres(e),
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.code,
                rusqlite::ErrorCode::TooBig
                    | rusqlite::ErrorCode::ConstraintViolation
                    | rusqlite::ErrorCode::TypeMismatch
            ),
            _ => false,
        }
    }
}

/// A PostgreSQL error with what the server said (severity, SQLSTATE, message, detail,
/// hint), or the underlying cause (e.g. the connection's io error).
fn postgres_detail(e: &tokio_postgres::Error) -> String {
    use std::fmt::Write as _;
    match e.as_db_error() {
        Some(db) => {
            let mut out = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
            // Writing into a String cannot fail.
            if let Some(detail) = db.detail() {
                let _ = write!(out, " (detail: {detail})");
            }
            if let Some(hint) = db.hint() {
                let _ = write!(out, " (hint: {hint})");
            }
            out
        }
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

fn pool_detail(e: &deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(e) => postgres_detail(e),
        e => e.to_string(),
    }
}

/// How hard a SQLite database works to keep a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// A commit survives the process being killed, not a power cut (WAL, synchronous=NORMAL).
    Process,
    /// A commit is on the disk itself before it returns (WAL, synchronous=FULL: one fsync).
    Disk,
}

/// One SQLite database, shared by the tasks of one front-end.
#[derive(Debug, Clone)]
pub struct Sqlite {
    /// A std mutex: calls run on the blocking pool and never await while holding it; SQLite
    /// allows one writer at a time anyway.
    conn: Arc<Mutex<rusqlite::Connection>>,
}

impl Sqlite {
    /// Opens (and creates) `dir/file`, creating `dir` if missing.
    pub fn open(dir: &Path, file: &str, durability: Durability) -> Result<Sqlite, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::DataDir(dir.display().to_string(), e))?;
        let conn = rusqlite::Connection::open(dir.join(file))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        let sync = match durability {
            Durability::Process => "NORMAL",
            Durability::Disk => "FULL",
        };
        conn.pragma_update(None, "synchronous", sync)?;
        Ok(Sqlite {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` with the connection on the blocking pool.
    pub async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            // A panic in another call poisons the lock; the connection itself is still sound.
            let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut conn)
        })
        .await
        .map_err(|_| StoreError::Worker)?
        .map_err(StoreError::from)
    }

    /// Runs `f` with the connection on the calling thread (for dedicated writer threads).
    pub fn call_blocking<T>(
        &self,
        f: impl FnOnce(&mut rusqlite::Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn).map_err(StoreError::from)
    }
}

/// A pool of PostgreSQL connections that reconnects by itself.
pub fn postgres_pool(url: &str, max_size: usize) -> Result<deadpool_postgres::Pool, StoreError> {
    let config: tokio_postgres::Config = url.parse()?;
    let manager = deadpool_postgres::Manager::from_config(
        config,
        tokio_postgres::NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    deadpool_postgres::Pool::builder(manager)
        .max_size(max_size)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| StoreError::Url(e.to_string()))
}

impl StoreConfig {
    /// A short description for logs: the directory or the server (never the password).
    pub fn describe(&self) -> String {
        match self {
            StoreConfig::Sqlite(dir) => format!("SQLite in {}", dir.display()),
            StoreConfig::Postgres(url) => match url.parse::<tokio_postgres::Config>() {
                Ok(c) => format!(
                    "PostgreSQL at {:?}/{}",
                    c.get_hosts(),
                    c.get_dbname().unwrap_or("")
                ),
                Err(_) => "PostgreSQL".into(),
            },
        }
    }
}
