//! The transfer log: records, their sealed slots and the blind-index lookup.

use sqlx::{FromRow, QueryBuilder};
use uuid::Uuid;

use super::{on_db, on_tx, push_list, Db, Tx, MAX_BINDS};
use crate::crypto::envelope::BODY_AAD_VERSION;

#[derive(Debug, Clone)]
pub struct NewRecord {
    pub id: Uuid,
    pub carrier_id: String,
    pub direction: &'static str,
    pub category: &'static str,
    pub purpose: &'static str,
    pub legal_basis: &'static str,
    pub jurisdiction: String,
    pub consent_reference: Option<String>,
    pub occurred_at: i64,
    pub recorded_at: i64,
    pub retain_until: i64,
    pub recorded_by: String,
    pub idempotency_key: Option<String>,
    pub request_hash: Vec<u8>,
    pub body: Vec<u8>,
    /// Keyed hash of the call id, for reconciliation (calls only).
    pub call_key: Option<Vec<u8>>,
    /// The call's duration, for reconciliation (CDRs and call durations).
    pub duration_seconds: Option<i64>,
}

pub struct NewSlot {
    pub transfer_id: Uuid,
    pub slot: &'static str,
    pub subject_key_id: Uuid,
    pub sealed: Vec<u8>,
}

pub struct NewLookup {
    pub blind_index: Vec<u8>,
    pub occurred_at: i64,
    pub transfer_id: Uuid,
}

/// Metadata of a record, without personal data.
#[derive(Debug, Clone, FromRow)]
pub struct TransferRow {
    pub id: Uuid,
    pub carrier_id: String,
    pub direction: String,
    pub category: String,
    pub purpose: String,
    pub legal_basis: String,
    pub jurisdiction: String,
    pub consent_reference: Option<String>,
    pub occurred_at: i64,
    pub recorded_at: i64,
    pub retain_until: i64,
    pub recorded_by: String,
}

const TRANSFER_COLUMNS: &str = "t.id, t.carrier_id, t.direction, t.category, t.purpose, t.legal_basis, \
     t.jurisdiction, t.consent_reference, t.occurred_at, t.recorded_at, t.retain_until, t.recorded_by";

/// A sealed slot with the subject key that opens it.
#[derive(Debug, Clone, FromRow)]
pub struct SlotRow {
    pub transfer_id: Uuid,
    pub slot: String,
    pub sealed: Vec<u8>,
    pub subject_key_id: Uuid,
    pub carrier_id: String,
    pub master_version: i64,
    pub wrapped_key: Vec<u8>,
}

/// A sealed body with the columns bound to it that reads of the log do
/// not otherwise fetch.
#[derive(Debug, Clone, FromRow)]
pub struct BodyRow {
    pub id: Uuid,
    pub body: Vec<u8>,
    pub aad_version: i16,
    pub call_key: Option<Vec<u8>>,
    pub duration_seconds: Option<i64>,
}

#[derive(Debug, Clone, FromRow)]
pub struct IdempotentRow {
    pub id: Uuid,
    pub idempotency_key: String,
    pub request_hash: Option<Vec<u8>>,
    pub recorded_at: i64,
    pub retain_until: i64,
}

pub async fn insert_records(tx: &mut Tx, records: &[NewRecord]) -> sqlx::Result<()> {
    for chunk in records.chunks(MAX_BINDS / 17) {
        on_tx!(tx, c, DB => {
            let mut qb = QueryBuilder::<DB>::new(
                "INSERT INTO transfers (id, carrier_id, direction, category, purpose, legal_basis, jurisdiction, \
                 consent_reference, occurred_at, recorded_at, retain_until, recorded_by, idempotency_key, \
                 request_hash, body, call_key, duration_seconds, aad_version) ",
            );
            qb.push_values(chunk, |mut b, r| {
                b.push_bind(r.id)
                    .push_bind(r.carrier_id.as_str())
                    .push_bind(r.direction)
                    .push_bind(r.category)
                    .push_bind(r.purpose)
                    .push_bind(r.legal_basis)
                    .push_bind(r.jurisdiction.as_str())
                    .push_bind(r.consent_reference.as_deref())
                    .push_bind(r.occurred_at)
                    .push_bind(r.recorded_at)
                    .push_bind(r.retain_until)
                    .push_bind(r.recorded_by.as_str())
                    .push_bind(r.idempotency_key.as_deref())
                    .push_bind(r.request_hash.as_slice())
                    .push_bind(r.body.as_slice())
                    .push_bind(r.call_key.as_deref())
                    .push_bind(r.duration_seconds)
                    // A constant, not a parameter: the binds stay at 17 a row.
                    .push(BODY_AAD_VERSION);
            });
            qb.build().execute(&mut *c).await.map(|r| r.rows_affected())
        })?;
    }
    Ok(())
}

pub async fn insert_slots(tx: &mut Tx, slots: &[NewSlot]) -> sqlx::Result<()> {
    for chunk in slots.chunks(MAX_BINDS / 4) {
        on_tx!(tx, c, DB => {
            let mut qb = QueryBuilder::<DB>::new("INSERT INTO transfer_slots (transfer_id, slot, subject_key_id, sealed) ");
            qb.push_values(chunk, |mut b, s| {
                b.push_bind(s.transfer_id).push_bind(s.slot).push_bind(s.subject_key_id).push_bind(s.sealed.as_slice());
            });
            qb.build().execute(&mut *c).await.map(|r| r.rows_affected())
        })?;
    }
    Ok(())
}

pub async fn insert_lookups(tx: &mut Tx, lookups: &[NewLookup]) -> sqlx::Result<()> {
    for chunk in lookups.chunks(MAX_BINDS / 3) {
        on_tx!(tx, c, DB => {
            let mut qb = QueryBuilder::<DB>::new("INSERT INTO subject_lookup (blind_index, occurred_at, transfer_id) ");
            qb.push_values(chunk, |mut b, l| {
                b.push_bind(l.blind_index.as_slice()).push_bind(l.occurred_at).push_bind(l.transfer_id);
            });
            qb.push(" ON CONFLICT DO NOTHING");
            qb.build().execute(&mut *c).await.map(|r| r.rows_affected())
        })?;
    }
    Ok(())
}

/// Records of `carrier` already stored under the given idempotency keys.
pub async fn by_idempotency_keys(
    tx: &mut Tx,
    carrier: &str,
    keys: &[&str],
) -> sqlx::Result<Vec<IdempotentRow>> {
    let mut out = Vec::new();
    for chunk in keys.chunks(MAX_BINDS / 2) {
        let rows: Vec<IdempotentRow> = on_tx!(tx, c, DB => {
            let mut qb = QueryBuilder::<DB>::new(
                "SELECT id, idempotency_key, request_hash, recorded_at, retain_until FROM transfers WHERE carrier_id = ",
            );
            qb.push_bind(carrier).push(" AND idempotency_key IN (");
            push_list(&mut qb, chunk.iter().copied());
            qb.push(")");
            qb.build_query_as().fetch_all(&mut *c).await
        })?;
        out.extend(rows);
    }
    Ok(out)
}

/// What is kept of an erased record's idempotency key (migration 0020):
/// enough to answer a retry as the first request was answered.
#[derive(Debug, Clone, FromRow)]
pub struct ErasedKey {
    pub carrier_id: String,
    /// Keyed hash of the key (`ledger::transfers::erased_key_hash`).
    pub key_hash: Vec<u8>,
    pub transfer_id: Uuid,
    pub request_hash: Option<Vec<u8>>,
    pub recorded_at: i64,
    pub retain_until: i64,
}

pub async fn insert_erased_keys(tx: &mut Tx, rows: &[ErasedKey]) -> sqlx::Result<()> {
    for chunk in rows.chunks(MAX_BINDS / 6) {
        on_tx!(tx, c, DB => {
            let mut qb = QueryBuilder::<DB>::new(
                "INSERT INTO erased_idempotency_keys (carrier_id, key_hash, transfer_id, request_hash, recorded_at, retain_until) ",
            );
            qb.push_values(chunk, |mut b, r| {
                b.push_bind(r.carrier_id.as_str())
                    .push_bind(r.key_hash.as_slice())
                    .push_bind(r.transfer_id)
                    .push_bind(r.request_hash.as_deref())
                    .push_bind(r.recorded_at)
                    .push_bind(r.retain_until);
            });
            // A key erased twice (a record re-sent after its tombstone was
            // swept, then erased again): the later answer stands.
            qb.push(
                " ON CONFLICT (carrier_id, key_hash) DO UPDATE SET transfer_id = excluded.transfer_id, \
                 request_hash = excluded.request_hash, recorded_at = excluded.recorded_at, \
                 retain_until = excluded.retain_until",
            );
            qb.build().execute(&mut *c).await.map(|r| r.rows_affected())
        })?;
    }
    Ok(())
}

/// The erased records of `carrier` whose idempotency keys hash to these.
pub async fn erased_keys(
    tx: &mut Tx,
    carrier: &str,
    hashes: &[Vec<u8>],
) -> sqlx::Result<Vec<ErasedKey>> {
    let mut out = Vec::new();
    for chunk in hashes.chunks(MAX_BINDS / 2) {
        let rows: Vec<ErasedKey> = on_tx!(tx, c, DB => {
            let mut qb = QueryBuilder::<DB>::new(
                "SELECT carrier_id, key_hash, transfer_id, request_hash, recorded_at, retain_until \
                 FROM erased_idempotency_keys WHERE carrier_id = ",
            );
            qb.push_bind(carrier).push(" AND key_hash IN (");
            push_list(&mut qb, chunk.iter().map(Vec::as_slice));
            qb.push(")");
            qb.build_query_as().fetch_all(&mut *c).await
        })?;
        out.extend(rows);
    }
    Ok(out)
}

/// Forgets the erased keys whose records' retention has ended by `cutoff`.
pub async fn forget_erased_keys(tx: &mut Tx, cutoff: i64) -> sqlx::Result<u64> {
    on_tx!(tx, c => {
        sqlx::query("DELETE FROM erased_idempotency_keys WHERE retain_until < $1")
            .bind(cutoff)
            .execute(c)
            .await
            .map(|r| r.rows_affected())
    })
}

/// One record's metadata, if it exists within `scope` (a carrier, or all).
pub async fn get(db: &Db, id: Uuid, scope: Option<&str>) -> sqlx::Result<Option<TransferRow>> {
    on_db!(db, c => {
        sqlx::query_as(&format!(
            "SELECT {TRANSFER_COLUMNS} FROM transfers t WHERE t.id = $1 AND ($2 IS NULL OR t.carrier_id = $2)"
        ))
        .bind(id)
        .bind(scope)
        .fetch_optional(c)
        .await
    })
}

/// Sealed bodies and slots (with their subject keys) of the given records.
pub async fn sealed(db: &Db, ids: &[Uuid]) -> sqlx::Result<(Vec<BodyRow>, Vec<SlotRow>)> {
    let mut bodies = Vec::with_capacity(ids.len());
    let mut slots = Vec::with_capacity(ids.len() * 2);
    let mut tx = db.begin_read_probes().await?;
    for chunk in ids.chunks(MAX_BINDS) {
        on_tx!(&mut tx, c, DB => {
            let mut qb = QueryBuilder::<DB>::new("SELECT id, body, aad_version, call_key, duration_seconds FROM transfers WHERE id IN (");
            push_list(&mut qb, chunk.iter().copied());
            qb.push(")");
            bodies.extend(qb.build_query_as::<BodyRow>().fetch_all(&mut *c).await?);

            let mut qb = QueryBuilder::<DB>::new(
                "SELECT s.transfer_id, s.slot, s.sealed, s.subject_key_id, k.carrier_id, k.master_version, k.wrapped_key \
                 FROM transfer_slots s JOIN subject_keys k ON k.id = s.subject_key_id WHERE s.transfer_id IN (",
            );
            push_list(&mut qb, chunk.iter().copied());
            qb.push(")");
            slots.extend(qb.build_query_as::<SlotRow>().fetch_all(&mut *c).await?);
        });
    }
    tx.commit().await?;
    Ok((bodies, slots))
}

/// Filters of the transfer log; all optional, combined with AND.
#[derive(Debug, Default, Clone)]
pub struct LogFilter {
    pub scope: Option<String>,
    pub carrier_id: Option<String>,
    pub category: Option<&'static str>,
    pub direction: Option<&'static str>,
    pub purpose: Option<&'static str>,
    pub legal_basis: Option<&'static str>,
    pub jurisdiction: Option<String>,
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub subject_index: Option<Vec<u8>>,
    /// Keyset cursor: the `(occurred_at, id)` of the last item already seen.
    pub after: Option<(i64, Uuid)>,
    pub limit: i64,
}

/// A page of the log, newest first. With a subject, the walk starts from
/// the blind-index lookup (an index range per subject), otherwise from the
/// `(occurred_at, id)` indexes of the log.
pub async fn list(db: &Db, f: &LogFilter) -> sqlx::Result<Vec<TransferRow>> {
    if f.subject_index.is_some() && matches!(db, Db::Postgres(_)) {
        // One subject's records: probes from the lookup rows, whatever the
        // statistics say about the carrier's share of the log. (SQLite
        // plans them so already; no transaction needed there.)
        let mut tx = db.begin_read_probes().await?;
        let rows = on_tx!(&mut tx, c, DB => list_query::<DB>("", f).build_query_as().fetch_all(&mut *c).await)?;
        tx.commit().await?;
        return Ok(rows);
    }
    on_db!(db, c, DB => list_query::<DB>("", f).build_query_as().fetch_all(c).await)
}

/// PostgreSQL's plan of a page of one subject's records, as [`list`] runs
/// it: a line per plan node. PostgreSQL only, with a subject: for tests
/// that the page is planned as probes.
#[doc(hidden)]
pub async fn plan_of_subject_page(db: &Db, f: &LogFilter) -> sqlx::Result<Vec<String>> {
    if !matches!(db, Db::Postgres(_)) || f.subject_index.is_none() {
        return Err(sqlx::Error::Protocol(
            "plan_of_subject_page: PostgreSQL and a subject only".into(),
        ));
    }
    let mut tx = db.begin_read_probes().await?;
    let plan = on_tx!(&mut tx, c, DB => list_query::<DB>("EXPLAIN ", f).build_query_scalar().fetch_all(&mut *c).await)?;
    tx.commit().await?;
    Ok(plan)
}

fn list_query<'a, DB: sqlx::Database>(prefix: &str, f: &'a LogFilter) -> QueryBuilder<'a, DB>
where
    &'a [u8]: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Uuid: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    {
        let mut qb = QueryBuilder::<DB>::new(format!("{prefix}SELECT {TRANSFER_COLUMNS} FROM "));
        let time_col = if let Some(bi) = &f.subject_index {
            qb.push(
                // From the subject's lookup rows to the records, in that
                // order (see `erasure::unheld_records`).
                "subject_lookup l CROSS JOIN transfers t WHERE t.id = l.transfer_id AND l.blind_index = ",
            );
            qb.push_bind(bi.as_slice());
            "l"
        } else {
            qb.push("transfers t WHERE 1 = 1");
            "t"
        };
        let id_col = if time_col == "l" {
            "l.transfer_id"
        } else {
            "t.id"
        };
        if let Some(s) = &f.scope {
            qb.push(" AND t.carrier_id = ").push_bind(s.as_str());
        }
        if let Some(v) = &f.carrier_id {
            qb.push(" AND t.carrier_id = ").push_bind(v.as_str());
        }
        if let Some(v) = f.category {
            qb.push(" AND t.category = ").push_bind(v);
        }
        if let Some(v) = f.direction {
            qb.push(" AND t.direction = ").push_bind(v);
        }
        if let Some(v) = f.purpose {
            qb.push(" AND t.purpose = ").push_bind(v);
        }
        if let Some(v) = f.legal_basis {
            qb.push(" AND t.legal_basis = ").push_bind(v);
        }
        if let Some(v) = &f.jurisdiction {
            qb.push(" AND t.jurisdiction = ").push_bind(v.as_str());
        }
        if let Some(v) = f.from {
            qb.push(format!(" AND {time_col}.occurred_at >= "))
                .push_bind(v);
        }
        if let Some(v) = f.to {
            qb.push(format!(" AND {time_col}.occurred_at < "))
                .push_bind(v);
        }
        if let Some((at, id)) = f.after {
            qb.push(format!(" AND ({time_col}.occurred_at, {id_col}) < ("));
            qb.push_bind(at).push(", ").push_bind(id).push(")");
        }
        qb.push(format!(
            " ORDER BY {time_col}.occurred_at DESC, {id_col} DESC LIMIT "
        ));
        qb.push_bind(f.limit);
        qb
    }
}

/// One group of the Art. 30 record of processing.
#[derive(Debug, Clone, FromRow)]
pub struct ProcessingGroup {
    pub carrier_id: String,
    pub category: String,
    pub purpose: String,
    pub legal_basis: String,
    pub direction: String,
    pub jurisdiction: String,
    pub transfers: i64,
}

pub async fn processing_groups(
    db: &Db,
    scope: Option<&str>,
    from: Option<i64>,
    to: Option<i64>,
) -> sqlx::Result<Vec<ProcessingGroup>> {
    on_db!(db, c => {
        sqlx::query_as(
            "SELECT carrier_id, category, purpose, legal_basis, direction, jurisdiction, COUNT(*) AS transfers
             FROM transfers
             WHERE ($1 IS NULL OR carrier_id = $1) AND ($2 IS NULL OR occurred_at >= $2) AND ($3 IS NULL OR occurred_at < $3)
             GROUP BY carrier_id, category, purpose, legal_basis, direction, jurisdiction
             ORDER BY carrier_id, category, purpose, legal_basis, direction, jurisdiction",
        )
        .bind(scope)
        .bind(from)
        .bind(to)
        .fetch_all(c)
        .await
    })
}

/// Metadata of the given records (any carrier: callers scope beforehand).
pub async fn get_many(db: &Db, ids: &[Uuid]) -> sqlx::Result<Vec<TransferRow>> {
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(MAX_BINDS) {
        let rows: Vec<TransferRow> = on_db!(db, c, DB => {
            let mut qb = QueryBuilder::<DB>::new(format!("SELECT {TRANSFER_COLUMNS} FROM transfers t WHERE t.id IN ("));
            push_list(&mut qb, chunk.iter().copied());
            qb.push(")");
            qb.build_query_as().fetch_all(c).await
        })?;
        out.extend(rows);
    }
    Ok(out)
}
