//! Storage: SQLite (embedded default, WAL) and PostgreSQL (several replicas).
//!
//! One implementation text serves both backends: each method body is written once and expanded
//! by `on_tx!`/`on_pool!` into a `match` arm per backend, where sqlx type-checks it against
//! that backend's types. SQL uses `$N` placeholders, which both drivers accept. A read that
//! both [`Store`] and [`Tx`] offer is one function over [`Conn`] (`on_conn!`), called with a
//! connection from the read pool or with the transaction's.
//!
//! One module per aggregate holds its record types and its queries: `certificates`,
//! `clusters` (with cluster reports), `cluster_settings`, `requests` (approvals), `audit`,
//! `rotations`, `workloads`, `crls`, `leases`, `blocked_keys`. Everything is re-exported at the crate root.
//!
//! Writes happen in a [`Tx`]. Every transaction is serialised: SQLite has one writer
//! connection and `BEGIN IMMEDIATE`; PostgreSQL takes a transaction-scoped advisory lock. That
//! keeps the audit chain linear across replicas and makes "state change + audit record" one
//! atomic unit.
#![forbid(unsafe_code)]

use std::str::FromStr;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

/// Key of the PostgreSQL advisory lock that serialises writers.
const WRITE_LOCK: i64 = 0x706b_692d_6d65_7368; // "pki-mesh"

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported database URL {}: use sqlite://PATH or postgres://...", redact_url(.0))]
    Url(String),
    #[error("{0} already exists")]
    Conflict(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Clone, Debug)]
pub enum Store {
    Sqlite { read: SqlitePool, write: SqlitePool },
    Postgres(PgPool),
}

pub enum Tx {
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>),
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
}

/// Expands `$body` once per backend, with `$c` bound to that backend's executor.
macro_rules! on_tx {
    ($self:expr, $c:ident => $body:expr) => {
        match $self {
            Tx::Sqlite(tx) => {
                let $c = &mut **tx;
                $body
            }
            Tx::Postgres(tx) => {
                let $c = &mut **tx;
                $body
            }
        }
    };
}

macro_rules! on_pool {
    ($self:expr, $c:ident => $body:expr) => {
        match $self {
            Store::Sqlite { read, .. } => {
                let $c = read;
                $body
            }
            Store::Postgres(pool) => {
                let $c = pool;
                $body
            }
        }
    };
}

/// A connection to run a read on, from the read pool or inside a write transaction, so that a
/// read both [`Store`] and [`Tx`] offer is written once, in a function over `Conn`.
pub(crate) enum Conn<'a> {
    Sqlite(&'a mut sqlx::SqliteConnection),
    Postgres(&'a mut sqlx::PgConnection),
}

/// Expands `$body` once per backend, with `$c` bound to that backend's connection.
macro_rules! on_conn {
    ($conn:expr, $c:ident => $body:expr) => {
        match $conn {
            $crate::Conn::Sqlite($c) => $body,
            $crate::Conn::Postgres($c) => $body,
        }
    };
}

/// A connection taken from the read pool for one shared read.
pub(crate) enum Reader {
    Sqlite(PoolConnection<sqlx::Sqlite>),
    Postgres(PoolConnection<sqlx::Postgres>),
}

impl Reader {
    pub(crate) fn conn(&mut self) -> Conn<'_> {
        match self {
            Reader::Sqlite(c) => Conn::Sqlite(c),
            Reader::Postgres(c) => Conn::Postgres(c),
        }
    }
}

#[macro_use]
mod text;

mod agents;
mod audit;
mod blocked_keys;
mod certificates;
mod cluster_settings;
mod clusters;
mod crls;
mod leases;
mod requests;
mod rotations;
mod workloads;

pub use agents::{AgentRecord, NamespaceReport};
pub use audit::AuditEvent;
pub use blocked_keys::{BLOCKING_REASONS, BlockedKey, spki_sha256};
pub use certificates::{CertFilter, CertIssuer, CertRecord};
pub use cluster_settings::ClusterSettingsRecord;
pub use clusters::{ClusterMode, ClusterRecord, ClusterReport, ClusterStatus};
pub use crls::CrlRecord;
pub use requests::{ApprovalRequest, RequestStatus};
pub use rotations::RotationRecord;
pub use text::UnknownValue;
pub use workloads::WorkloadRecord;

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

impl Store {
    /// Connects to `sqlite://PATH` (created if missing, WAL) or `postgres://...`, and applies
    /// the migrations when `migrate` is set.
    pub async fn connect(url: &str, migrate: bool) -> Result<Store> {
        let store = if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                // The writer never checkpoints on its own (a checkpoint in the commit path
                // stalls every waiting request); `checkpoint_wal` does it from a reader.
                .pragma("wal_autocheckpoint", "0")
                // A many-row INSERT keeps a statement journal (the pages it touched, to undo
                // it alone); in a file that is an open, an unlink and a write per page at every
                // group commit. It never needs to survive a crash: the WAL does.
                .pragma("temp_store", "memory")
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true);
            // One writer: SQLite serialises writes anyway; one connection makes it explicit and
            // keeps BEGIN IMMEDIATE from queueing on the file lock.
            // The writer's page cache holds the indexes' hot pages (default: 2 MiB), so that a
            // group commit finds the pages it changes without reading them back.
            let write = SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(opts.clone().pragma("cache_size", "-32768"))
                .await?;
            let read = SqlitePoolOptions::new().max_connections(8).connect_with(opts.read_only(false)).await?;
            if migrate {
                sqlx::migrate!("./migrations/sqlite").run(&write).await?;
            }
            Store::Sqlite { read, write }
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let pool =
                PgPoolOptions::new().max_connections(16).acquire_timeout(Duration::from_secs(10)).connect(url).await?;
            if migrate {
                sqlx::migrate!("./migrations/postgres").run(&pool).await?;
            }
            Store::Postgres(pool)
        } else {
            return Err(StoreError::Url(url.to_string()));
        };
        Ok(store)
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Store::Sqlite { .. } => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }

    /// Starts a serialised write transaction.
    pub async fn write(&self) -> Result<Tx> {
        Ok(match self {
            Store::Sqlite { write, .. } => Tx::Sqlite(write.begin_with("BEGIN IMMEDIATE").await?),
            Store::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(WRITE_LOCK).execute(&mut *tx).await?;
                Tx::Postgres(tx)
            }
        })
    }

    pub(crate) async fn reader(&self) -> Result<Reader> {
        Ok(match self {
            Store::Sqlite { read, .. } => Reader::Sqlite(read.acquire().await?),
            Store::Postgres(pool) => Reader::Postgres(pool.acquire().await?),
        })
    }

    /// Copies committed WAL frames into the database file without blocking the writer
    /// (SQLite; a no-op on PostgreSQL). Called every second by the server.
    pub async fn checkpoint_wal(&self) -> Result<()> {
        if let Store::Sqlite { read, .. } = self {
            sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(read).await?;
        }
        Ok(())
    }

    pub async fn ping(&self) -> Result<()> {
        on_pool!(self, p => sqlx::query("SELECT 1").execute(p).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    pub async fn close(&self) {
        match self {
            Store::Sqlite { read, write } => {
                read.close().await;
                write.close().await;
            }
            Store::Postgres(p) => p.close().await,
        }
    }
}

impl Tx {
    pub async fn commit(self) -> Result<()> {
        match self {
            Tx::Sqlite(tx) => tx.commit().await?,
            Tx::Postgres(tx) => tx.commit().await?,
        }
        Ok(())
    }

    pub(crate) fn conn(&mut self) -> Conn<'_> {
        match self {
            Tx::Sqlite(tx) => Conn::Sqlite(tx),
            Tx::Postgres(tx) => Conn::Postgres(tx),
        }
    }
}

pub fn now_millis() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

pub fn now_secs() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// A database URL without its password, for messages and logs.
pub fn redact_url(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(_)) if rest.contains('@') => {
            let (userinfo, host) = rest.rsplit_once('@').expect("checked");
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_redacted() {
        assert_eq!(super::redact_url("postgres://ca:s3cret@db:5432/pki"), "postgres://ca:***@db:5432/pki");
        assert_eq!(super::redact_url("postgres://ca@db/pki"), "postgres://ca:***@db/pki");
        assert_eq!(super::redact_url("sqlite:///var/lib/ca.db"), "sqlite:///var/lib/ca.db");
    }
}
