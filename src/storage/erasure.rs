//! Removing one data subject from the records of one carrier.

use sqlx::QueryBuilder;
use uuid::Uuid;

use super::retention::{children_deleted, shred_unused_keys, HELD};
use super::{on_tx, push_list, Tx, MAX_BINDS};
use crate::domain::Category;

/// Which of the subject's records an erasure is about: all of them in the
/// carrier (a request being processed), or the held records a pending
/// erasure found when it completed (not those recorded since).
#[derive(Debug, Clone, Copy)]
pub enum Scope {
    Subject,
    Pending(Uuid),
}

/// The subject's records in `scope` in the carrier that no active hold
/// protects, with their category.
///
/// The queries of one subject's records walk from the subject's lookup rows
/// (or the pending erasure's list) to the records: `CROSS JOIN` makes
/// SQLite keep that order (with no `ORDER BY` to guide it, it walked the
/// carrier's records instead, probing the lookup for each: 3.7 s per
/// erasure at 2 million records); to PostgreSQL it is an inner join like
/// any other.
pub async fn unheld_records(
    tx: &mut Tx,
    carrier: &str,
    index: &[u8],
    scope: Scope,
    limit: i64,
) -> sqlx::Result<Vec<(Uuid, String)>> {
    let (from, join) = scope.records(4);
    let sql = format!(
        "SELECT t.id, t.category FROM {from}
         WHERE {join} AND l.blind_index = $1 AND t.carrier_id = $2 AND NOT {HELD} LIMIT $3"
    );
    on_tx!(tx, c => {
        let q = sqlx::query_as(&sql)
        .bind(index)
        .bind(carrier)
        .bind(limit);
        match scope {
            Scope::Subject => q,
            Scope::Pending(request) => q.bind(request),
        }
        .fetch_all(c)
        .await
    })
}

/// Held records of the subject in `scope`: (record, category, hold).
pub async fn held_records(
    tx: &mut Tx,
    carrier: &str,
    index: &[u8],
    scope: Scope,
) -> sqlx::Result<Vec<(Uuid, String, Uuid)>> {
    let (from, join) = scope.records(3);
    let sql = format!(
        "SELECT t.id, t.category, h.id FROM {from}
         JOIN holds h ON h.released_at IS NULL
           AND (h.carrier_id IS NULL OR h.carrier_id = t.carrier_id)
           AND (h.category IS NULL OR h.category = t.category)
           AND (h.subject_index IS NULL OR EXISTS (
                SELECT 1 FROM subject_lookup hl WHERE hl.blind_index = h.subject_index AND hl.occurred_at = t.occurred_at AND hl.transfer_id = t.id))
         WHERE {join} AND l.blind_index = $1 AND t.carrier_id = $2"
    );
    on_tx!(tx, c => {
        let q = sqlx::query_as(&sql)
        .bind(index)
        .bind(carrier);
        match scope {
            Scope::Subject => q,
            Scope::Pending(request) => q.bind(request),
        }
        .fetch_all(c)
        .await
    })
}

impl Scope {
    /// The `FROM` list (`l` the subject's lookup rows, `t` the records)
    /// and the join condition of the records in this scope; a pending
    /// erasure's request id is the statement's parameter `$request`.
    fn records(self, request: usize) -> (&'static str, String) {
        match self {
            Self::Subject => (
                "subject_lookup l CROSS JOIN transfers t",
                "t.id = l.transfer_id".into(),
            ),
            Self::Pending(_) => (
                "erasures_pending_records p CROSS JOIN subject_lookup l CROSS JOIN transfers t",
                format!(
                    "p.request_id = ${request} AND l.transfer_id = p.transfer_id AND t.id = p.transfer_id"
                ),
            ),
        }
    }
}

/// Takes the subject's erasure lock for the rest of `tx` (PostgreSQL;
/// SQLite's write transactions are one at a time already): two erasures of
/// one subject in one carrier (a new request beside a pending one, or two
/// requests) run their transactions one after the other, so no two pick
/// the same records. A single 64-bit key, a key space of its own beside
/// the two-part keys of [`super::TxLock`].
pub async fn lock_subject(tx: &mut Tx, carrier: &str, index: &[u8]) -> sqlx::Result<()> {
    if let Tx::Postgres(t) = tx {
        sqlx::query(
            "SELECT pg_advisory_xact_lock(hashtextextended(
                 'tl-erasure/' || current_schema() || '/' || $1 || '/' || encode($2, 'hex'), 0))",
        )
        .bind(carrier)
        .bind(index)
        .execute(&mut **t)
        .await?;
    }
    Ok(())
}

/// Locks the subject's keys in the carrier for the rest of `tx`
/// (PostgreSQL; SQLite's writes are one at a time already). A write that
/// has already referenced one (its slot insert holds a key-share lock)
/// commits first, and the statements after this one see its record; a
/// write that comes later waits, and then finds the key moved aside
/// (`keys::add_seals` reports it, and the write retries under a new key) or
/// destroyed (its slot insert fails, and it retries).
pub async fn lock_subject_keys(tx: &mut Tx, carrier: &str, index: &[u8]) -> sqlx::Result<()> {
    if let Tx::Postgres(_) = tx {
        subject_key_ids(tx, carrier, index, " ORDER BY id FOR UPDATE").await?;
    }
    Ok(())
}

/// The ids of every generation of the subject's keys in the carrier
/// (`keys::generations`), with `tail` after the `WHERE` clause.
async fn subject_key_ids(
    tx: &mut Tx,
    carrier: &str,
    index: &[u8],
    tail: &str,
) -> sqlx::Result<Vec<Uuid>> {
    let (lo, hi) = super::keys::generations(index);
    on_tx!(tx, c => {
        sqlx::query_scalar(&format!(
            "SELECT id FROM subject_keys WHERE carrier_id = $1 AND blind_index >= $2 AND blind_index <= $3{tail}"
        ))
        .bind(carrier)
        .bind(lo)
        .bind(hi)
        .fetch_all(c)
        .await
    })
}

/// A record an erasure deleted, with what a retry of its transfer is
/// answered by (see `transfers::ErasedKey`).
#[derive(Debug, sqlx::FromRow)]
pub struct Deleted {
    pub id: Uuid,
    pub idempotency_key: Option<String>,
    pub request_hash: Option<Vec<u8>>,
    pub recorded_at: i64,
    pub retain_until: i64,
}

/// Removes the subject's slots and lookup rows from these records (id and
/// category, as [`unheld_records`] returns them), and the records left with
/// no subject at all. Returns the records that went.
pub async fn remove_subject(
    tx: &mut Tx,
    carrier: &str,
    records: &[(Uuid, String)],
    index: &[u8],
) -> sqlx::Result<Vec<Deleted>> {
    // Every generation of the subject's keys (see `keys::generations`).
    let (lo, hi) = super::keys::generations(index);
    let mut records = records.to_vec();
    records.sort_unstable();
    let mut deleted = Vec::new();
    for chunk in records.chunks(MAX_BINDS / 2) {
        // A number assignment has one slot, the subject's, whichever of its
        // identifiers found it: all of its slots go. Other records lose the
        // slots sealed under the subject's keys. (The category is known
        // here; asked of the database inside the statement, PostgreSQL
        // answered it by hashing every number assignment of the ledger.)
        let (assignments, others): (Vec<_>, Vec<_>) = chunk
            .iter()
            .partition(|(_, category)| category == Category::NumberAssignment.as_str());
        let ids = chunk.iter().map(|(id, _)| *id);
        on_tx!(tx, c, DB => {
            let mut qb = QueryBuilder::<DB>::new("DELETE FROM transfer_slots WHERE ");
            if !others.is_empty() {
                qb.push("(transfer_id IN (");
                push_list(&mut qb, others.iter().map(|(id, _)| *id));
                // Naming the carrier makes this a range of the (carrier_id,
                // blind_index) index, not a scan of every carrier's keys.
                qb.push(") AND subject_key_id IN (SELECT k.id FROM subject_keys k WHERE k.carrier_id = ");
                qb.push_bind(carrier);
                qb.push(" AND k.blind_index >= ");
                qb.push_bind(lo.as_slice());
                qb.push(" AND k.blind_index <= ");
                qb.push_bind(hi.as_slice());
                qb.push("))");
            }
            if !assignments.is_empty() {
                if !others.is_empty() {
                    qb.push(" OR ");
                }
                qb.push("transfer_id IN (");
                push_list(&mut qb, assignments.iter().map(|(id, _)| *id));
                qb.push(")");
            }
            qb.build().execute(&mut *c).await?;

            let mut qb = QueryBuilder::<DB>::new("DELETE FROM subject_lookup WHERE blind_index = ");
            qb.push_bind(index);
            qb.push(" AND transfer_id IN (");
            push_list(&mut qb, ids.clone());
            qb.push(")");
            qb.build().execute(&mut *c).await.map(|_| ())
        })?;
        // Two erasures of a call's two parties, each deleting its own
        // subject's slots, would each still see the other's (deleted but
        // not yet committed) and both keep the record, left with no
        // subject at all. Locked here, the record's second erasure waits
        // for the first to commit, and its delete below, a statement that
        // starts after the wait, sees no slot left. In id order, across
        // chunks too, so that two erasures cannot deadlock; after the
        // slots, as the sweep deletes a record's slots before the record,
        // so that an erasure and a sweep cannot either. (SQLite's write
        // transactions are one at a time.)
        if let Tx::Postgres(t) = &mut *tx {
            let ids: Vec<Uuid> = ids.clone().collect();
            sqlx::query("SELECT id FROM transfers WHERE id = ANY($1) ORDER BY id FOR UPDATE")
                .bind(&ids)
                .execute(&mut **t)
                .await?;
        }
        // A record left with no slot at all goes. Its slots are gone and
        // its remaining lookup rows go right after it, in this transaction,
        // so on PostgreSQL the delete trigger stands aside for it.
        children_deleted(tx, true).await?;
        let gone: Vec<Deleted> = on_tx!(tx, c, DB => {
            let mut qb = QueryBuilder::<DB>::new("DELETE FROM transfers WHERE id IN (");
            push_list(&mut qb, ids.clone());
            qb.push(
                ") AND NOT EXISTS (SELECT 1 FROM transfer_slots s WHERE s.transfer_id = transfers.id) \
                 RETURNING id, idempotency_key, request_hash, recorded_at, retain_until",
            );
            qb.build_query_as().fetch_all(&mut *c).await
        })?;
        children_deleted(tx, false).await?;
        if let (Tx::Postgres(t), false) = (&mut *tx, gone.is_empty()) {
            let ids: Vec<Uuid> = gone.iter().map(|d| d.id).collect();
            sqlx::query("DELETE FROM subject_lookup WHERE transfer_id = ANY($1)")
                .bind(&ids)
                .execute(&mut **t)
                .await?;
        }
        deleted.extend(gone);
    }
    Ok(deleted)
}

/// Clears the subject from the carrier's consents, which end as withdrawn
/// (a consent nobody holds any more), and destroys the subject's keys
/// there unless a record still needs them. Returns the keys destroyed.
pub async fn forget_subject(tx: &mut Tx, carrier: &str, index: &[u8]) -> sqlx::Result<Vec<Uuid>> {
    let now = super::micros(chrono::Utc::now());
    on_tx!(tx, c => {
        sqlx::query(
            "UPDATE consents SET subject_index = NULL, subject_sealed = NULL, subject_key_id = NULL,
                 status = 'withdrawn',
                 status_changed_at = CASE WHEN status = 'withdrawn' THEN status_changed_at ELSE $3 END
             WHERE carrier_id = $1 AND subject_index = $2",
        )
        .bind(carrier)
        .bind(index)
        .bind(now)
        .execute(&mut *c)
        .await
        .map(|r| r.rows_affected())
    })?;
    discard_exports(tx, carrier, index).await?;
    shred_subject_keys(tx, carrier, index).await
}

/// Deletes the exports prepared for the subject in the carrier, and the
/// identifiers their requests kept for them: copies of what an erasure
/// deletes. (The caller holds `TxLock::Exports`, so no export completes
/// meanwhile.)
pub async fn discard_exports(tx: &mut Tx, carrier: &str, index: &[u8]) -> sqlx::Result<()> {
    on_tx!(tx, c => {
        for sql in [
            "DELETE FROM subject_export_chunks WHERE request_id IN
               (SELECT id FROM subject_requests WHERE carrier_id = $1 AND subject_index = $2 AND kind = 'access')",
            "DELETE FROM subject_exports WHERE request_id IN
               (SELECT id FROM subject_requests WHERE carrier_id = $1 AND subject_index = $2 AND kind = 'access')",
            "UPDATE subject_requests SET subject_sealed = NULL, subject_master = NULL
               WHERE carrier_id = $1 AND subject_index = $2 AND kind = 'access' AND status = 'completed'",
        ] {
            sqlx::query(sql).bind(carrier).bind(index).execute(&mut *c).await?;
        }
        sqlx::Result::<()>::Ok(())
    })
}

/// Destroys the subject's keys in the carrier that no record or consent
/// uses any more. Returns the keys destroyed.
pub async fn shred_subject_keys(
    tx: &mut Tx,
    carrier: &str,
    index: &[u8],
) -> sqlx::Result<Vec<Uuid>> {
    let keys = subject_key_ids(tx, carrier, index, "").await?;
    // Its callers hold the subject's keys locked (`settled`): none is
    // skipped.
    Ok(shred_unused_keys(tx, &keys).await?.destroyed)
}

/// Moves the subject's current key in the carrier aside (as a spent one is,
/// [`super::keys::replace_subject_key`]): when held records keep it from
/// being destroyed, what is recorded about the subject from then on is
/// sealed under a new key, which the erasure's remainder, once the holds
/// are released, neither needs nor destroys. Idempotent.
pub async fn set_current_key_aside(tx: &mut Tx, carrier: &str, index: &[u8]) -> sqlx::Result<()> {
    let current =
        super::keys::subject_keys_by_index(tx, carrier, std::slice::from_ref(&index.to_vec()))
            .await?;
    for row in &current {
        super::keys::replace_subject_key(tx, row).await?;
    }
    Ok(())
}
