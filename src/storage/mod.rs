//! Storage on SQLite (the embedded default) or PostgreSQL (scale-out).
//!
//! SQL is written once wherever the dialects agree (`$N` placeholders work on
//! both); the few places where they differ sit side by side in a `match` on
//! the backend. `on_db!` and `on_tx!` run the same query code against
//! whichever backend is configured.

pub mod audit;
pub mod consents;
pub mod erasure;
pub mod keys;
pub mod reconciliation;
pub mod requests;
pub mod retention;
pub mod transfers;

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, PgPool, Postgres, Sqlite, SqlitePool, Transaction};
use uuid::Uuid;

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("migrations/postgres");

/// Most bind parameters one statement may carry on either backend.
pub const MAX_BINDS: usize = 30_000;

#[derive(Clone, Debug)]
pub enum Db {
    /// SQLite allows one writer at a time; a single-connection write pool
    /// queues writers in the application instead of failing them with
    /// SQLITE_BUSY, and lets readers proceed in parallel (WAL).
    Sqlite {
        read: SqlitePool,
        write: SqlitePool,
        /// A file beside the database that sweeps lock (`flock`), so that at
        /// most one process sweeps; the OS releases it if the process dies.
        /// `None` for an in-memory database, which one process owns.
        lock_file: Option<std::path::PathBuf>,
    },
    Postgres(PgPool),
}

pub enum Tx {
    Sqlite(Transaction<'static, Sqlite>),
    Postgres(Transaction<'static, Postgres>),
}

/// Runs `$body` with `$c` bound to the read pool of whichever backend `$db` is.
/// `$DB` (optional) names the backend's `sqlx::Database` type inside `$body`.
macro_rules! on_db {
    ($db:expr, $c:ident => $body:expr) => {
        on_db!($db, $c, _DB => $body)
    };
    ($db:expr, $c:ident, $DB:ident => $body:expr) => {
        match $db {
            $crate::storage::Db::Sqlite { read, .. } => {
                #[allow(dead_code)]
                type $DB = sqlx::Sqlite;
                let $c = read;
                $body
            }
            $crate::storage::Db::Postgres(pool) => {
                #[allow(dead_code)]
                type $DB = sqlx::Postgres;
                let $c = pool;
                $body
            }
        }
    };
}

/// Runs `$body` with `$c: &mut Connection` inside the transaction `$tx`.
macro_rules! on_tx {
    ($tx:expr, $c:ident => $body:expr) => {
        on_tx!($tx, $c, _DB => $body)
    };
    ($tx:expr, $c:ident, $DB:ident => $body:expr) => {
        match $tx {
            $crate::storage::Tx::Sqlite(t) => {
                #[allow(dead_code)]
                type $DB = sqlx::Sqlite;
                let $c = &mut **t;
                $body
            }
            $crate::storage::Tx::Postgres(t) => {
                #[allow(dead_code)]
                type $DB = sqlx::Postgres;
                let $c = &mut **t;
                $body
            }
        }
    };
}
pub(crate) use {on_db, on_tx};

/// A host whose connection never leaves the machine: loopback or a Unix
/// socket directory.
fn is_local_host(host: &str) -> bool {
    host.starts_with('/')
        || host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `sslmode=prefer` (the default) falls back to plain text without a word
/// when the server offers no TLS: across a network, say so.
async fn warn_if_unencrypted(pool: &PgPool, host: &str) {
    let ssl: Result<Option<bool>, _> =
        sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_optional(pool)
            .await;
    if let Ok(Some(false)) = ssl {
        tracing::warn!(
            host,
            "the connection to PostgreSQL is not encrypted (the server offers no TLS, or \
             sslmode=disable); across a network use sslmode=verify-full"
        );
    }
}

/// Whether a `sqlite:` URL names an in-memory database (no file).
pub fn sqlite_in_memory(url: &str) -> bool {
    url.contains(":memory:") || url.contains("mode=memory")
}

/// Creates a new SQLite database file readable by its owner only (SQLite
/// would create it with the umask's mode, usually 0644); its write-ahead
/// log and shared-memory files take the same mode from it. An existing
/// file is left as it is; any error is left for SQLite's open to report.
fn create_private(path: &std::path::Path) {
    let mut open = std::fs::OpenOptions::new();
    open.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut open, 0o600);
    let _ = open.open(path);
}

/// A database error's message, once: sqlx's configuration and database
/// errors repeat their cause as their source, and `{:#}` would print it
/// twice.
fn once(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Configuration(inner) => inner.to_string(),
        sqlx::Error::Database(inner) => inner.message().to_string(),
        other => other.to_string(),
    }
}

/// Binds each value, separated by commas: the inside of an `IN (…)` list.
pub(crate) fn push_list<'a, DB, T>(
    qb: &mut sqlx::QueryBuilder<'a, DB>,
    values: impl IntoIterator<Item = T>,
) where
    DB: sqlx::Database,
    T: 'a + sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let mut sep = qb.separated(", ");
    for v in values {
        sep.push_bind(v);
    }
}

impl Db {
    /// Connects to `sqlite://…` or `postgres://…`.
    pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<Self> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let opts = PgConnectOptions::from_str(url)
                .map_err(|e| {
                    anyhow::anyhow!(
                        "LEDGER_DATABASE_URL is not a usable PostgreSQL URL: {}",
                        once(&e)
                    )
                })?
                // No parallel plans. The service's statements are short and
                // concurrent; a worker takes a core from another request and
                // costs milliseconds to start. Statistics skewed by one
                // subject with many records made a 10-row probe of a blind
                // index a parallel bitmap scan: 25 ms instead of 0.8 ms, and
                // most of an erasure's time at 1 million records.
                //
                // A transaction left idle for a minute ends with its
                // session: a process frozen (or cut off) mid-transaction
                // would otherwise keep its row and advisory locks, and every
                // sweep, erasure and hold behind them, until someone killed
                // it. The service never waits on anything outside the
                // database inside a transaction.
                .options([
                    ("max_parallel_workers_per_gather", "0"),
                    ("idle_in_transaction_session_timeout", "60s"),
                ])
                .log_slow_statements(log::LevelFilter::Warn, Duration::from_secs(5))
                // Batch statements vary in size; caching a hundred of them
                // per connection costs more memory than re-preparing them.
                .statement_cache_capacity(24);
            let host = opts.get_host().to_string();
            let cannot = |why: String| {
                anyhow::anyhow!(
                    "cannot connect to PostgreSQL at {host}:{} (LEDGER_DATABASE_URL): {why}",
                    opts.get_port()
                )
            };
            // One connection first, for the cause: the pool retries until
            // its timeout and then reports only that it timed out.
            match tokio::time::timeout(Duration::from_secs(10), opts.connect()).await {
                Ok(Ok(c)) => drop(sqlx::Connection::close(c).await),
                Ok(Err(e)) => return Err(cannot(once(&e))),
                Err(_) => return Err(cannot("no answer within 10 s".into())),
            }
            let pool = PgPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(opts.clone())
                .await
                .map_err(|e| cannot(once(&e)))?;
            if !is_local_host(&host) {
                warn_if_unencrypted(&pool, &host).await;
            }
            Ok(Self::Postgres(pool))
        } else if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)
                .map_err(|e| {
                    anyhow::anyhow!(
                        "LEDGER_DATABASE_URL is not a usable SQLite URL: {}",
                        once(&e)
                    )
                })?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .foreign_keys(true)
                .busy_timeout(Duration::from_secs(30))
                .log_slow_statements(log::LevelFilter::Warn, Duration::from_secs(5))
                // Batch statements vary in size; caching a hundred of them
                // per connection costs more memory than re-preparing them.
                .statement_cache_capacity(24);
            let in_memory = sqlite_in_memory(url);
            if in_memory {
                tracing::warn!("LEDGER_DATABASE_URL names an in-memory SQLite database: nothing recorded is kept after this process exits");
            }
            if !in_memory && !url.contains("mode=ro") {
                create_private(opts.get_filename());
            }
            // The writer touches every index of every table it appends to:
            // a 16 MiB page cache keeps the hot ones in memory instead of
            // re-reading them (larger ones cost the server memory budget).
            let write = SqlitePoolOptions::new()
                .max_connections(1)
                // Writers queue here by design; under a burst of large
                // batches a wait of seconds is normal, not worth a warning.
                .acquire_slow_threshold(Duration::from_secs(10))
                .connect_with(
                    opts.clone()
                        .pragma("cache_size", "-16384")
                        .pragma("wal_autocheckpoint", "10000"),
                )
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "cannot open the SQLite database {} (LEDGER_DATABASE_URL, or LEDGER_DATA_DIR \
                         for the embedded default): {}",
                        opts.get_filename().display(),
                        once(&e)
                    )
                })?;
            let lock_file = (!in_memory).then(|| {
                let mut p = opts.get_filename().as_os_str().to_owned();
                p.push(".sweep.lock");
                std::path::PathBuf::from(p)
            });
            let read = if in_memory {
                write.clone()
            } else {
                SqlitePoolOptions::new()
                    // Readers beyond a few per core only add page caches and threads.
                    .max_connections(max_connections.clamp(2, 4))
                    .connect_with(opts)
                    .await?
            };
            Ok(Self::Sqlite {
                read,
                write,
                lock_file,
            })
        } else {
            anyhow::bail!("LEDGER_DATABASE_URL must start with sqlite: or postgres://")
        }
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Self::Sqlite { .. } => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }

    fn migrator(&self) -> &'static Migrator {
        match self {
            Self::Sqlite { .. } => &SQLITE_MIGRATIONS,
            Self::Postgres(_) => &POSTGRES_MIGRATIONS,
        }
    }

    /// Applies pending migrations. On PostgreSQL sqlx holds an advisory lock
    /// meanwhile, so several instances starting together are safe.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        match self {
            Self::Sqlite { write, .. } => SQLITE_MIGRATIONS.run(write).await?,
            Self::Postgres(pool) => POSTGRES_MIGRATIONS.run(pool).await?,
        }
        Ok(())
    }

    /// Reachable, and every migration this binary knows is applied.
    pub async fn ready(&self) -> anyhow::Result<()> {
        let latest = self.migrator().iter().map(|m| m.version).max().unwrap_or(0);
        let applied: Option<i64> = on_db!(self, c => {
            sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(c)
                .await
        })?;
        anyhow::ensure!(applied.unwrap_or(0) >= latest, "migrations pending");
        Ok(())
    }

    /// A write transaction. On SQLite it takes the write lock at `BEGIN`
    /// (waiting up to the busy timeout): a deferred transaction that read
    /// first fails at its first write, without waiting, if another process
    /// on the same file (a second instance, the CLI) committed meanwhile.
    pub async fn begin(&self) -> sqlx::Result<Tx> {
        Ok(match self {
            Self::Sqlite { write, .. } => Tx::Sqlite(write.begin_with("BEGIN IMMEDIATE").await?),
            Self::Postgres(pool) => Tx::Postgres(pool.begin().await?),
        })
    }

    /// A transaction planned as index probes on PostgreSQL
    /// ([`PROBES_ONLY`]): sweep batches, an erasure's last step.
    pub async fn begin_probes(&self) -> sqlx::Result<Tx> {
        match self {
            Self::Sqlite { .. } => self.begin().await,
            Self::Postgres(pool) => Ok(Tx::Postgres(
                pool.begin_with(format!("BEGIN; {PROBES_ONLY}")).await?,
            )),
        }
    }

    /// A read-only transaction for statements that touch a few rows picked
    /// by key (one subject's records, the slots of a page): on SQLite a
    /// snapshot on a reader connection; on PostgreSQL planned as index
    /// probes ([`PROBES_ONLY`]), so that the plan does not depend on table
    /// statistics, which lag behind a bulk load.
    pub async fn begin_read_probes(&self) -> sqlx::Result<Tx> {
        match self {
            Self::Sqlite { read, .. } => Ok(Tx::Sqlite(read.begin().await?)),
            Self::Postgres(pool) => Ok(Tx::Postgres(
                pool.begin_with(format!("BEGIN READ ONLY; {PROBES_ONLY}"))
                    .await?,
            )),
        }
    }

    /// A transaction whose commit need not wait for the WAL flush
    /// (PostgreSQL `synchronous_commit = off`; SQLite in WAL mode with
    /// `synchronous=NORMAL` never waits for one). Only for intermediate
    /// steps of resumable work — a claim, an export chunk, an erasure batch —
    /// whose loss in a crash is redone, and whose outcome nobody sees before
    /// a later synchronous commit: the WAL is flushed in order, so that
    /// commit (every audited read is one) makes the earlier ones durable too.
    /// Its statements are planned as index probes ([`PROBES_ONLY`]).
    pub async fn begin_relaxed(&self) -> sqlx::Result<Tx> {
        match self {
            Self::Sqlite { .. } => self.begin().await,
            Self::Postgres(pool) => Ok(Tx::Postgres(
                pool.begin_with(format!(
                    "BEGIN; SET LOCAL synchronous_commit = off; {PROBES_ONLY}"
                ))
                .await?,
            )),
        }
    }

    /// Copies the SQLite write-ahead log into the database in the
    /// background, every `every`, until `stop` is notified; returns at once
    /// on PostgreSQL and for an in-memory database.
    ///
    /// The writer's commits otherwise pay for this themselves: SQLite
    /// checkpoints inside the commit that takes the log past
    /// `wal_autocheckpoint` pages, so one ingest batch, sweep batch or
    /// audited read in a few hundred waited for tens of megabytes to be
    /// copied (12 % of the single writer's time during an ingest, 18 % during
    /// a sweep). A passive checkpoint waits for nobody and runs beside the
    /// writer on a connection of its own; the writer's own checkpoint stays
    /// as it was, and finds little left to copy when it comes (it is what
    /// lets the next transaction start the log again from its beginning).
    pub async fn run_checkpointer(
        &self,
        every: Duration,
        stop: std::sync::Arc<tokio::sync::Notify>,
    ) {
        let Self::Sqlite {
            read,
            lock_file: Some(_),
            ..
        } = self
        else {
            return;
        };
        let opts = (*read.connect_options()).clone();
        let mut conn = match opts.connect().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the checkpoint connection; the writer checkpoints alone");
                return;
            }
        };
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.notified() => break,
            }
            let done: sqlx::Result<(i64, i64, i64)> =
                sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
                    .fetch_one(&mut conn)
                    .await;
            match done {
                Ok((_, log, copied)) => tracing::trace!(log, copied, "checkpoint"),
                // Another process checkpointing (a CLI sweep) answers busy;
                // the next tick tries again.
                Err(e) => tracing::debug!(error = %e, "checkpoint skipped"),
            }
        }
        let _ = sqlx::Connection::close(conn).await;
    }

    pub async fn close(&self) {
        match self {
            Self::Sqlite { read, write, .. } => {
                read.close().await;
                write.close().await;
            }
            Self::Postgres(pool) => pool.close().await,
        }
    }
}

/// Settings for a PostgreSQL transaction whose statements each touch a
/// bounded set of rows (a batch of ids, one subject's records): index probes
/// only, no JIT. Given an array of ids or a trigger's transition table
/// (which has no statistics), or right after a bulk load (when the
/// statistics lag far behind), the planner otherwise chose merge and hash
/// joins that read a whole index of the other side — a cost that grows with
/// the table, not with the batch (measured: a sweep batch spent 0.8 s
/// reading every entry of the slots' key index to shred 2,000 keys; access
/// requests for a 10-record subject took 100 ms at 300,000 records). With
/// those joins off and no statistics, it then chose a nested loop over the
/// carrier's records that rescanned a materialized copy of the subject's
/// lookup rows for each (measured: 2 s a page of 500, an export of 10,000
/// records 41 s, on a 40,000-record ledger); without `Materialize` the
/// inner side of a nested loop is rescanned for each outer row, an index
/// probe wherever a key index serves the join. SQLite plans these as
/// probes already. Sent with `BEGIN`, in its round trip. (Parallel plans
/// are off for every connection, see [`Db::connect`].)
const PROBES_ONLY: &str = "SET LOCAL jit = off; SET LOCAL enable_seqscan = off; \
     SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off; \
     SET LOCAL enable_material = off";

impl Tx {
    pub async fn commit(self) -> sqlx::Result<()> {
        match self {
            Self::Sqlite(t) => t.commit().await,
            Self::Postgres(t) => t.commit().await,
        }
    }
}

/// Microseconds since the epoch: the one time representation in storage.
pub fn micros(t: chrono::DateTime<chrono::Utc>) -> i64 {
    t.timestamp_micros()
}

pub fn from_micros(us: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_micros(us).unwrap_or_default()
}

/// A page read with one row more than `limit` (that row only says another
/// page follows): cuts it to `limit` and returns the cursor of its last
/// row, made by `cursor`, when another page follows.
pub fn next_page<T>(
    rows: &mut Vec<T>,
    limit: i64,
    cursor: impl Fn(&T) -> String,
) -> Option<String> {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    more.then(|| rows.last().map(cursor)).flatten()
}

/// The lists whose pages a `(time, id)` cursor continues. A cursor names its
/// list, so one taken from another list is refused rather than read as a
/// position in this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    Transfers,
    Sweeps,
    SubjectRequests,
}

impl Listing {
    fn tag(self) -> &'static str {
        match self {
            Listing::Transfers => "t",
            Listing::Sweeps => "s",
            Listing::SubjectRequests => "r",
        }
    }
}

/// A keyset cursor: the `(time, id)` of the last item of a page of
/// `listing`, opaque to clients (URL-safe base64, so it needs no escaping in
/// a query string).
pub fn encode_cursor(listing: Listing, at: i64, id: Uuid) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{}:{at}:{id}", listing.tag()))
}

pub fn decode_cursor(listing: Listing, s: &str) -> Result<(i64, Uuid), String> {
    use base64::Engine;
    let bad = || "is not a cursor this service issued for this list".to_string();
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let rest = text
        .strip_prefix(listing.tag())
        .and_then(|r| r.strip_prefix(':'))
        .ok_or_else(bad)?;
    let (at, id) = rest.split_once(':').ok_or_else(bad)?;
    Ok((
        at.parse().map_err(|_| bad())?,
        Uuid::parse_str(id).map_err(|_| bad())?,
    ))
}

/// Transaction-scoped locks that order operations of different instances
/// on PostgreSQL. (On SQLite a write transaction already excludes every
/// other: it begins `IMMEDIATE`.)
#[derive(Debug, Clone, Copy)]
pub enum TxLock {
    /// Root-wrapped keyring entries: a new key version against a root-key
    /// rotation, so that neither misses the other's rows.
    Keyring,
    /// Holds: placing or releasing one (exclusive) against a sweep or
    /// erasure batch deciding what is held (shared), so that what a batch
    /// deletes was unheld for the whole of its transaction.
    Holds,
    /// Completing an access export against completing an erasure: one sees
    /// the other's outcome (an erasure deletes the exports of its subject;
    /// an export built while an erasure completed is discarded).
    Exports,
}

/// PostgreSQL's SQLSTATE for a lock not granted within `lock_timeout`.
const LOCK_NOT_AVAILABLE: &str = "55P03";

impl TxLock {
    /// Advisory lock classes ("tlkr", "tlho"); the second key is the
    /// schema's hash, as for the sweep lock.
    fn class(self) -> i32 {
        match self {
            Self::Keyring => 0x746c_6b72,
            Self::Holds => 0x746c_686f,
            Self::Exports => 0x746c_6578,
        }
    }

    /// As [`TxLock::take`], but gives up after `wait`: `false` when the
    /// lock was not granted in time, and `tx` is then aborted (PostgreSQL
    /// refuses any further statement in it) and must be dropped. A caller
    /// that gives up leaves no statement waiting behind it, and while it
    /// waits, takers of the shared lock queue behind it, so the bound keeps
    /// both short. On SQLite the lock is the one writer's, taken at `BEGIN`.
    pub async fn take_within(
        self,
        tx: &mut Tx,
        shared: bool,
        wait: Duration,
    ) -> sqlx::Result<bool> {
        if let Tx::Postgres(t) = tx {
            sqlx::query(&format!(
                "SET LOCAL lock_timeout = {}",
                wait.as_millis().max(1)
            ))
            .execute(&mut **t)
            .await?;
            match self.take(tx, shared).await {
                Ok(()) => {}
                Err(sqlx::Error::Database(e))
                    if e.code().as_deref() == Some(LOCK_NOT_AVAILABLE) =>
                {
                    return Ok(false)
                }
                Err(e) => return Err(e),
            }
            if let Tx::Postgres(t) = tx {
                sqlx::query("SET LOCAL lock_timeout TO DEFAULT")
                    .execute(&mut **t)
                    .await?;
            }
        }
        Ok(true)
    }

    /// Waits for the lock; it is released when `tx` ends.
    pub async fn take(self, tx: &mut Tx, shared: bool) -> sqlx::Result<()> {
        if let Tx::Postgres(t) = tx {
            let f = if shared {
                "pg_advisory_xact_lock_shared"
            } else {
                "pg_advisory_xact_lock"
            };
            sqlx::query(&format!("SELECT {f}($1, hashtext(current_schema()))"))
                .bind(self.class())
                .execute(&mut **t)
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::is_local_host;

    #[test]
    fn only_loopback_and_sockets_count_as_local() {
        for host in [
            "localhost",
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "[::1]",
            "/var/run/postgresql",
        ] {
            assert!(is_local_host(host), "{host}");
        }
        for host in [
            "db.internal",
            "10.0.0.5",
            "192.168.1.1",
            "::ffff:10.0.0.1",
            "localhost.example",
        ] {
            assert!(!is_local_host(host), "{host}");
        }
    }
}
