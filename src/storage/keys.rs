//! Key material at rest: root-wrapped keys and per-subject data keys.

use sqlx::{FromRow, QueryBuilder};
use uuid::Uuid;

use super::{on_db, on_tx, Db, Tx, MAX_BINDS};

#[derive(Debug, FromRow)]
pub struct KeyringRow {
    pub purpose: String,
    pub version: i64,
    pub wrapped: Vec<u8>,
}

pub async fn keyring(db: &Db) -> sqlx::Result<Vec<KeyringRow>> {
    on_db!(db, c => {
        sqlx::query_as("SELECT purpose, version, wrapped FROM keyring ORDER BY purpose, version")
            .fetch_all(c)
            .await
    })
}

/// Inserts a keyring entry unless one exists (another instance won the race).
pub async fn insert_keyring(
    tx: &mut Tx,
    purpose: &str,
    version: i64,
    wrapped: &[u8],
    now: i64,
) -> sqlx::Result<()> {
    on_tx!(tx, c => {
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
    Ok(())
}

#[derive(Debug, Clone, FromRow)]
pub struct SubjectKeyRow {
    pub id: Uuid,
    pub carrier_id: String,
    pub blind_index: Vec<u8>,
    pub master_version: i64,
    pub wrapped_key: Vec<u8>,
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
                "SELECT id, carrier_id, blind_index, master_version, wrapped_key FROM subject_keys WHERE carrier_id = ",
            );
            qb.push_bind(carrier).push(" AND blind_index IN (");
            let mut sep = qb.separated(", ");
            for bi in chunk {
                sep.push_bind(bi.as_slice());
            }
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
        sqlx::query_as("SELECT id, carrier_id, blind_index, master_version, wrapped_key FROM subject_keys WHERE id = $1")
            .bind(id)
            .fetch_optional(c)
            .await
    })
}
