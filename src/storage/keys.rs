//! Key material at rest: root-wrapped keys and per-subject data keys.

use sqlx::{FromRow, QueryBuilder};
use uuid::Uuid;

use super::{on_db, on_tx, push_list, Db, Tx, MAX_BINDS};

#[derive(Debug, Clone, FromRow)]
pub struct KeyringRow {
    pub purpose: String,
    pub version: i64,
    /// Sealed under the root key; empty once the version is retired.
    pub wrapped: Vec<u8>,
    pub created_at: i64,
    pub retired_at: Option<i64>,
}

const KEYRING_COLUMNS: &str = "purpose, version, wrapped, created_at, retired_at";

pub async fn keyring(db: &Db) -> sqlx::Result<Vec<KeyringRow>> {
    on_db!(db, c => {
        sqlx::query_as(&format!("SELECT {KEYRING_COLUMNS} FROM keyring ORDER BY purpose, version"))
            .fetch_all(c)
            .await
    })
}

/// Every keyring row, locked (PostgreSQL) until the transaction ends.
pub async fn keyring_for_update(tx: &mut Tx) -> sqlx::Result<Vec<KeyringRow>> {
    let sql = format!("SELECT {KEYRING_COLUMNS} FROM keyring ORDER BY purpose, version");
    on_tx!(tx, c, DB => {
        let sql = if is_postgres::<DB>() { format!("{sql} FOR UPDATE") } else { sql.clone() };
        sqlx::query_as(&sql).fetch_all(&mut *c).await
    })
}

fn is_postgres<DB: sqlx::Database>() -> bool {
    DB::NAME == "PostgreSQL"
}

/// The version new material must be wrapped under: the newest master key,
/// read in the writing transaction and (on PostgreSQL) share-locked, so that
/// its retirement waits for this transaction and then sees what it wrote.
pub async fn current_master(tx: &mut Tx) -> sqlx::Result<i64> {
    on_tx!(tx, c, DB => {
        let lock = if is_postgres::<DB>() { " FOR SHARE" } else { "" };
        sqlx::query_scalar(&format!(
            "SELECT version FROM keyring WHERE purpose = 'master' AND retired_at IS NULL
             ORDER BY version DESC LIMIT 1{lock}"
        ))
        .fetch_one(&mut *c)
        .await
    })
}

/// The next version of a purpose's key.
pub async fn next_version(tx: &mut Tx, purpose: &str) -> sqlx::Result<i64> {
    on_tx!(tx, c => {
        sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) + 1 FROM keyring WHERE purpose = $1")
            .bind(purpose)
            .fetch_one(&mut *c)
            .await
    })
}

/// Replaces a keyring entry's wrapping (root-key rotation) if it is still
/// `old`. Returns whether it was.
pub async fn rewrap_keyring(
    tx: &mut Tx,
    purpose: &str,
    version: i64,
    old: &[u8],
    new: &[u8],
) -> sqlx::Result<bool> {
    let n = on_tx!(tx, c => {
        sqlx::query("UPDATE keyring SET wrapped = $1 WHERE purpose = $2 AND version = $3 AND wrapped = $4")
            .bind(new)
            .bind(purpose)
            .bind(version)
            .bind(old)
            .execute(&mut *c)
            .await
            .map(|r| r.rows_affected())
    })?;
    Ok(n == 1)
}

/// What each master-key version still wraps: `(version, data keys, other
/// sealed values)`; versions that wrap nothing are absent.
pub async fn master_usage(db: &Db) -> sqlx::Result<Vec<(i64, i64, i64)>> {
    let rows: Vec<(i64, i64, i64)> = on_db!(db, c => {
        sqlx::query_as(
            "SELECT v, CAST(SUM(k) AS BIGINT), CAST(SUM(o) AS BIGINT) FROM (
                 SELECT master_version AS v, COUNT(*) AS k, 0 AS o FROM subject_keys GROUP BY master_version
                 UNION ALL
                 SELECT subject_master, 0, COUNT(*) FROM subject_requests WHERE subject_master IS NOT NULL GROUP BY subject_master
                 UNION ALL
                 SELECT master, 0, COUNT(*) FROM subject_exports GROUP BY master
             ) u GROUP BY v ORDER BY v",
        )
        .fetch_all(c)
        .await
    })?;
    Ok(rows)
}

/// Whether anything is still wrapped under a master key older than `current`.
///
/// The subject keys' oldest version is read as `MIN`, one probe of the
/// index's first entry whatever the plan. (`EXISTS (… master_version < $1)`
/// got a generic plan on PostgreSQL after a few runs, a sequential scan
/// that reads every key when none is below: 83 ms against 0.6 at 192,000
/// keys, every round of the key worker.)
pub async fn any_below(db: &Db, current: i64) -> sqlx::Result<bool> {
    on_db!(db, c => {
        sqlx::query_scalar(
            "SELECT COALESCE((SELECT MIN(master_version) FROM subject_keys) < $1, FALSE)
                 OR EXISTS (SELECT 1 FROM subject_requests WHERE subject_master < $1)
                 OR EXISTS (SELECT 1 FROM subject_exports WHERE master < $1)",
        )
        .bind(current)
        .fetch_one(c)
        .await
    })
}

/// Retires master-key version `version` if it wraps nothing, erasing its
/// material. The keyring row is locked first (PostgreSQL): a writer that
/// share-locked it has committed by then, and the count sees its rows.
pub async fn retire_master(tx: &mut Tx, version: i64, now: i64) -> sqlx::Result<bool> {
    on_tx!(tx, c, DB => {
        let lock = if is_postgres::<DB>() { " FOR UPDATE" } else { "" };
        let live: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT version FROM keyring WHERE purpose = 'master' AND version = $1 AND retired_at IS NULL{lock}"
        ))
        .bind(version)
        .fetch_optional(&mut *c)
        .await?;
        if live.is_none() {
            return Ok(false);
        }
        let used: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM subject_keys WHERE master_version = $1)
                 OR EXISTS (SELECT 1 FROM subject_requests WHERE subject_master = $1)
                 OR EXISTS (SELECT 1 FROM subject_exports WHERE master = $1)",
        )
        .bind(version)
        .fetch_one(&mut *c)
        .await?;
        if used {
            return Ok(false);
        }
        sqlx::query("UPDATE keyring SET wrapped = $1, retired_at = $2 WHERE purpose = 'master' AND version = $3")
            .bind(Vec::<u8>::new())
            .bind(now)
            .bind(version)
            .execute(&mut *c)
            .await?;
        Ok(true)
    })
}

/// Inserts a keyring entry unless one exists (another instance won the
/// race). Returns whether this call inserted it.
pub async fn insert_keyring(
    tx: &mut Tx,
    purpose: &str,
    version: i64,
    wrapped: &[u8],
    now: i64,
) -> sqlx::Result<bool> {
    let n = on_tx!(tx, c => {
        sqlx::query(
            "INSERT INTO keyring (purpose, version, wrapped, created_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (purpose, version) DO NOTHING",
        )
        .bind(purpose)
        .bind(version)
        .bind(wrapped)
        .bind(now)
        .execute(c)
        .await
        .map(|r| r.rows_affected())
    })?;
    Ok(n == 1)
}

#[derive(Debug, Clone, FromRow)]
pub struct SubjectKeyRow {
    pub id: Uuid,
    pub carrier_id: String,
    pub blind_index: Vec<u8>,
    pub master_version: i64,
    pub wrapped_key: Vec<u8>,
    /// Encryptions made with the key so far.
    #[sqlx(default)]
    pub seals: i64,
}

/// The length of a current key's `blind_index`: an HMAC-SHA256.
const CURRENT_INDEX_LEN: i64 = 32;

/// The range of `subject_keys.blind_index` values holding one subject's
/// keys: its current key (the 32-byte index itself) and the keys replaced
/// when their nonce budget ran out (the index followed by the key's id).
pub fn generations(index: &[u8]) -> (Vec<u8>, Vec<u8>) {
    debug_assert_eq!(index.len() as i64, CURRENT_INDEX_LEN);
    let mut hi = index.to_vec();
    hi.extend_from_slice(&[0xFF; 16]);
    (index.to_vec(), hi)
}

/// Moves a key whose nonce budget is spent aside, under its generation
/// index, so a fresh key can take the subject's index. Idempotent.
pub async fn replace_subject_key(tx: &mut Tx, row: &SubjectKeyRow) -> sqlx::Result<()> {
    set_key_aside(tx, row.id, &row.blind_index).await
}

/// Moves key `id`, the current key of the subject `index`, under its
/// generation index (the index followed by the key's id): it keeps
/// decrypting what it sealed, and the subject's next write creates a new
/// key. Idempotent.
pub async fn set_key_aside(tx: &mut Tx, id: Uuid, index: &[u8]) -> sqlx::Result<()> {
    let mut aside = index.to_vec();
    aside.extend_from_slice(id.as_bytes());
    on_tx!(tx, c => {
        sqlx::query("UPDATE subject_keys SET blind_index = $1 WHERE id = $2 AND blind_index = $3")
            .bind(aside)
            .bind(id)
            .bind(index)
            .execute(&mut *c)
            .await
            .map(|_| ())
    })?;
    Ok(())
}

/// Adds `(key, encryptions)` to the keys' counts: one statement per distinct
/// count (a batch has few), and returns the keys whose count now exceeds
/// `limit` (a concurrent writer spent the budget first) or that were moved
/// aside since the caller read them (a concurrent erasure kept them for
/// held records): the caller rolls back and retries, and its retry
/// replaces them. On PostgreSQL the rows
/// are locked in id order first, so concurrent writers cannot deadlock; the
/// locks last until commit, so writers call this last, just before the
/// audit append, and do not queue behind each other's whole batch.
pub async fn add_seals(
    tx: &mut Tx,
    counts: &mut [(Uuid, i64)],
    limit: i64,
) -> sqlx::Result<Vec<Uuid>> {
    counts.sort_unstable();
    if let Tx::Postgres(_) = tx {
        for chunk in counts.chunks(MAX_BINDS) {
            on_tx!(tx, c, DB => {
                let mut qb = QueryBuilder::<DB>::new("SELECT id FROM subject_keys WHERE id IN (");
                push_list(&mut qb, chunk.iter().map(|(id, _)| *id));
                qb.push(") ORDER BY id FOR NO KEY UPDATE");
                qb.build().fetch_all(&mut *c).await.map(|_| ())
            })?;
        }
    }
    let mut by_count: std::collections::BTreeMap<i64, Vec<Uuid>> = Default::default();
    for (id, n) in counts.iter() {
        by_count.entry(*n).or_default().push(*id);
    }
    let mut over = Vec::new();
    for (n, ids) in by_count {
        for chunk in ids.chunks(MAX_BINDS - 1) {
            on_tx!(tx, c, DB => {
                let mut qb = QueryBuilder::<DB>::new("UPDATE subject_keys SET seals = seals + ");
                qb.push_bind(n).push(" WHERE id IN (");
                push_list(&mut qb, chunk.iter().copied());
                // A key whose index is longer than a blind index was moved
                // aside meanwhile (its budget spent by another writer, or an
                // erasure held back by a hold): not to be sealed under.
                qb.push(") RETURNING id, seals, CAST(length(blind_index) AS BIGINT)");
                qb.build_query_as::<(Uuid, i64, i64)>().fetch_all(&mut *c).await.map(|rows| {
                    over.extend(
                        rows.into_iter()
                            .filter(|&(_, seals, len)| seals > limit || len > CURRENT_INDEX_LEN)
                            .map(|(id, ..)| id),
                    )
                })
            })?;
        }
    }
    Ok(over)
}

/// Up to `limit` subject keys still wrapped under a master key older than
/// `current`, in id order; on PostgreSQL locked, skipping rows a writer
/// holds (they are taken by a later batch), so a rewrap never waits.
pub async fn stale_subject_keys(
    tx: &mut Tx,
    current: i64,
    limit: i64,
) -> sqlx::Result<Vec<SubjectKeyRow>> {
    on_tx!(tx, c, DB => {
        let lock = if is_postgres::<DB>() { " FOR UPDATE SKIP LOCKED" } else { "" };
        sqlx::query_as(&format!(
            "SELECT id, carrier_id, blind_index, master_version, wrapped_key, seals FROM subject_keys
             WHERE master_version < $1 ORDER BY id LIMIT $2{lock}"
        ))
        .bind(current)
        .bind(limit)
        .fetch_all(&mut *c)
        .await
    })
}

/// Compare-and-set of a subject key's wrapping: only a row still wrapped
/// under `old` changes, so a key erased meanwhile stays erased.
pub async fn rewrap_subject_key(
    tx: &mut Tx,
    id: Uuid,
    old: i64,
    new: i64,
    wrapped: &[u8],
) -> sqlx::Result<bool> {
    let n = on_tx!(tx, c => {
        sqlx::query("UPDATE subject_keys SET master_version = $1, wrapped_key = $2 WHERE id = $3 AND master_version = $4")
            .bind(new)
            .bind(wrapped)
            .bind(id)
            .bind(old)
            .execute(&mut *c)
            .await
            .map(|r| r.rows_affected())
    })?;
    Ok(n == 1)
}

/// A value sealed directly under a master key: a request's identifier or an
/// export's key.
#[derive(Debug, FromRow)]
pub struct MasterSealed {
    pub id: Uuid,
    pub master: i64,
    pub sealed: Vec<u8>,
}

/// Where values sealed directly under a master key are kept.
#[derive(Debug, Clone, Copy)]
pub enum SealedUnderMaster {
    /// `subject_requests.subject_sealed`, while the request needs it.
    RequestSubject,
    /// `subject_exports.wrapped_key`.
    ExportKey,
}

impl SealedUnderMaster {
    /// `(table, id column, version column, sealed column)`.
    fn columns(self) -> (&'static str, &'static str, &'static str, &'static str) {
        match self {
            Self::RequestSubject => ("subject_requests", "id", "subject_master", "subject_sealed"),
            Self::ExportKey => ("subject_exports", "request_id", "master", "wrapped_key"),
        }
    }
}

/// Up to `limit` such values under versions older than `current`, locked
/// like `stale_subject_keys`.
pub async fn stale_sealed(
    tx: &mut Tx,
    what: SealedUnderMaster,
    current: i64,
    limit: i64,
) -> sqlx::Result<Vec<MasterSealed>> {
    let (table, id, master, sealed) = what.columns();
    on_tx!(tx, c, DB => {
        let lock = if is_postgres::<DB>() { " FOR UPDATE SKIP LOCKED" } else { "" };
        sqlx::query_as(&format!(
            "SELECT {id} AS id, {master} AS master, {sealed} AS sealed FROM {table}
             WHERE {master} < $1 AND {sealed} IS NOT NULL ORDER BY {id} LIMIT $2{lock}"
        ))
        .bind(current)
        .bind(limit)
        .fetch_all(&mut *c)
        .await
    })
}

/// Compare-and-set of such a value's sealing, as `rewrap_subject_key`.
pub async fn rewrap_sealed(
    tx: &mut Tx,
    what: SealedUnderMaster,
    row: &MasterSealed,
    new: i64,
    sealed: &[u8],
) -> sqlx::Result<bool> {
    let (table, id, master, column) = what.columns();
    let n = on_tx!(tx, c => {
        sqlx::query(&format!(
            "UPDATE {table} SET {master} = $1, {column} = $2 WHERE {id} = $3 AND {master} = $4"
        ))
        .bind(new)
        .bind(sealed)
        .bind(row.id)
        .bind(row.master)
        .execute(&mut *c)
        .await
        .map(|r| r.rows_affected())
    })?;
    Ok(n == 1)
}

/// The subject keys of `carrier` for the given blind indexes.
pub async fn subject_keys_by_index(
    tx: &mut Tx,
    carrier: &str,
    indexes: &[Vec<u8>],
) -> sqlx::Result<Vec<SubjectKeyRow>> {
    let mut out = Vec::with_capacity(indexes.len());
    for chunk in indexes.chunks(MAX_BINDS / 2) {
        let rows: Vec<SubjectKeyRow> = on_tx!(tx, c, DB => {
            let mut qb = QueryBuilder::<DB>::new(
                "SELECT id, carrier_id, blind_index, master_version, wrapped_key, seals FROM subject_keys WHERE carrier_id = ",
            );
            qb.push_bind(carrier).push(" AND blind_index IN (");
            push_list(&mut qb, chunk.iter().map(|bi| bi.as_slice()));
            qb.push(")");
            qb.build_query_as().fetch_all(&mut *c).await
        })?;
        out.extend(rows);
    }
    Ok(out)
}

/// Inserts new subject keys, skipping any that a concurrent writer created
/// first; the caller re-reads to learn the winners.
pub async fn insert_subject_keys(
    tx: &mut Tx,
    rows: &[SubjectKeyRow],
    now: i64,
) -> sqlx::Result<()> {
    for chunk in rows.chunks(MAX_BINDS / 6) {
        on_tx!(tx, c, DB => {
            let mut qb = QueryBuilder::<DB>::new(
                "INSERT INTO subject_keys (id, carrier_id, blind_index, master_version, wrapped_key, created_at) ",
            );
            qb.push_values(chunk, |mut b, r| {
                b.push_bind(r.id)
                    .push_bind(r.carrier_id.as_str())
                    .push_bind(r.blind_index.as_slice())
                    .push_bind(r.master_version)
                    .push_bind(r.wrapped_key.as_slice())
                    .push_bind(now);
            });
            qb.push(" ON CONFLICT (carrier_id, blind_index) DO NOTHING");
            qb.build().execute(&mut *c).await.map(|r| r.rows_affected())
        })?;
    }
    Ok(())
}

pub async fn subject_key_by_id(db: &Db, id: Uuid) -> sqlx::Result<Option<SubjectKeyRow>> {
    on_db!(db, c => {
        sqlx::query_as("SELECT id, carrier_id, blind_index, master_version, wrapped_key, seals FROM subject_keys WHERE id = $1")
            .bind(id)
            .fetch_optional(c)
            .await
    })
}
