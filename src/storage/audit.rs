//! The audit log's rows and its append cursor.

use sqlx::{FromRow, QueryBuilder};

use super::{on_db, on_tx, Db, Tx};

#[derive(Debug, Clone, FromRow)]
pub struct AuditRow {
    pub seq: i64,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub outcome: String,
    pub entry: String,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
}

const COLUMNS: &str = "seq, at, actor, action, outcome, entry, prev_hash, hash";

/// Locks and reads the append cursor. On PostgreSQL the row lock, held to
/// commit, serializes appends across every instance; SQLite's single writer
/// already does.
pub async fn lock_head(tx: &mut Tx) -> sqlx::Result<(i64, Vec<u8>)> {
    on_tx!(tx, c, DB => {
        let sql = if <DB as sqlx::Database>::NAME == "PostgreSQL" {
            "SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE"
        } else {
            "SELECT seq, hash FROM audit_head WHERE id = 1"
        };
        sqlx::query_as(sql).fetch_one(c).await
    })
}

/// The insert of `row`, for whichever backend it is executed on.
macro_rules! insert {
    ($row:expr) => {
        sqlx::query(INSERT)
            .bind($row.seq)
            .bind($row.at)
            .bind(&$row.actor)
            .bind(&$row.action)
            .bind(&$row.outcome)
            .bind(&$row.entry)
            .bind(&$row.prev_hash)
            .bind(&$row.hash)
    };
}

const INSERT: &str =
    "INSERT INTO audit_log (seq, at, actor, action, outcome, entry, prev_hash, hash) \
                      VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

/// Appends `row` inside `tx`, whose caller holds the cursor ([`lock_head`]).
/// The database checks that the row follows the cursor and moves it
/// (migration 0022).
pub async fn append(tx: &mut Tx, row: &AuditRow) -> sqlx::Result<()> {
    on_tx!(tx, c => insert!(row).execute(&mut *c).await.map(drop))
}

/// Appends `row` in a statement of its own, without reading the cursor
/// first: `row` was built on a guess of where the chain ends. If the guess
/// was wrong the database refuses the row ([`is_moved_head`]) and nothing
/// is stored. One round trip instead of the four of a locked append.
pub async fn append_guessed(db: &Db, row: &AuditRow) -> sqlx::Result<()> {
    match db {
        Db::Sqlite { write, .. } => insert!(row).execute(write).await.map(drop),
        Db::Postgres(pool) => insert!(row).execute(pool).await.map(drop),
    }
}

/// The database refused a row that does not follow the cursor: another
/// append moved it after the row's guess was made.
pub fn is_moved_head(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.message().starts_with("audit_head moved"))
}

/// Entries after `after`, in chain order.
pub async fn chain_page(db: &Db, after: i64, limit: i64) -> sqlx::Result<Vec<AuditRow>> {
    on_db!(db, c => {
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2"))
            .bind(after)
            .bind(limit)
            .fetch_all(c)
            .await
    })
}

pub async fn entry_at(db: &Db, seq: i64) -> sqlx::Result<Option<AuditRow>> {
    on_db!(db, c => {
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM audit_log WHERE seq = $1"))
            .bind(seq)
            .fetch_optional(c)
            .await
    })
}

/// The newest entry.
pub async fn last(db: &Db) -> sqlx::Result<Option<AuditRow>> {
    on_db!(db, c => {
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM audit_log ORDER BY seq DESC LIMIT 1"))
            .fetch_optional(c)
            .await
    })
}

/// Where the append cursor says the chain ends; `None` if its row is gone.
pub async fn cursor(db: &Db) -> sqlx::Result<Option<(i64, Vec<u8>)>> {
    on_db!(db, c => {
        sqlx::query_as("SELECT seq, hash FROM audit_head WHERE id = 1").fetch_optional(c).await
    })
}

#[derive(Debug, Default, Clone)]
pub struct AuditFilter {
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub actor: Option<String>,
    pub action: Option<String>,
    /// Keyset cursor: entries before this sequence number.
    pub before: Option<i64>,
    pub limit: i64,
}

/// Newest first.
pub async fn list(db: &Db, f: &AuditFilter) -> sqlx::Result<Vec<AuditRow>> {
    on_db!(db, c, DB => {
        let mut qb = QueryBuilder::<DB>::new(format!("SELECT {COLUMNS} FROM audit_log WHERE 1 = 1"));
        if let Some(v) = f.from {
            qb.push(" AND at >= ").push_bind(v);
        }
        if let Some(v) = f.to {
            qb.push(" AND at < ").push_bind(v);
        }
        if let Some(v) = &f.actor {
            qb.push(" AND actor = ").push_bind(v.as_str());
        }
        if let Some(v) = &f.action {
            qb.push(" AND action = ").push_bind(v.as_str());
        }
        if let Some(v) = f.before {
            qb.push(" AND seq < ").push_bind(v);
        }
        qb.push(" ORDER BY seq DESC LIMIT ").push_bind(f.limit);
        qb.build_query_as().fetch_all(c).await
    })
}
