//! Data-subject requests and their prepared exports.

use sqlx::FromRow;
use uuid::Uuid;

use super::{on_db, on_tx, Db, Tx, MAX_BINDS};

#[derive(Debug, Clone, FromRow)]
pub struct RequestRow {
    pub id: Uuid,
    pub kind: String,
    pub carrier_id: String,
    pub subject_index: Vec<u8>,
    pub subject_sealed: Option<Vec<u8>>,
    pub subject_master: Option<i64>,
    pub language: String,
    pub status: String,
    pub received_at: i64,
    pub due_at: i64,
    pub extended_at: Option<i64>,
    pub extension_reason: Option<String>,
    pub completed_at: Option<i64>,
    pub requested_by: String,
    pub claimed_at: Option<i64>,
    pub progress: Option<String>,
    pub receipt: Option<String>,
    /// Failed processing attempts, and the last one's public description
    /// and time (not written by [`insert`]).
    pub failures: i64,
    pub last_failure: Option<String>,
    pub last_failure_at: Option<i64>,
}

const COLUMNS: &str = "id, kind, carrier_id, subject_index, subject_sealed, subject_master, language, status, \
     received_at, due_at, extended_at, extension_reason, completed_at, requested_by, claimed_at, progress, receipt";
/// What a read returns: [`COLUMNS`] and the processing failures.
const READ_COLUMNS: &str = "id, kind, carrier_id, subject_index, subject_sealed, subject_master, language, status, \
     received_at, due_at, extended_at, extension_reason, completed_at, requested_by, claimed_at, progress, receipt, \
     failures, last_failure, last_failure_at";

pub async fn insert(tx: &mut Tx, r: &RequestRow) -> sqlx::Result<()> {
    on_tx!(tx, c => {
        sqlx::query(&format!(
            "INSERT INTO subject_requests ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
        ))
        .bind(r.id)
        .bind(&r.kind)
        .bind(&r.carrier_id)
        .bind(&r.subject_index)
        .bind(&r.subject_sealed)
        .bind(r.subject_master)
        .bind(&r.language)
        .bind(&r.status)
        .bind(r.received_at)
        .bind(r.due_at)
        .bind(r.extended_at)
        .bind(&r.extension_reason)
        .bind(r.completed_at)
        .bind(&r.requested_by)
        .bind(r.claimed_at)
        .bind(&r.progress)
        .bind(&r.receipt)
        .execute(c)
        .await
        .map(|r| r.rows_affected())
    })?;
    Ok(())
}

pub async fn get(db: &Db, id: Uuid, scope: Option<&str>) -> sqlx::Result<Option<RequestRow>> {
    on_db!(db, c => {
        sqlx::query_as(&format!(
            "SELECT {READ_COLUMNS} FROM subject_requests WHERE id = $1 AND ($2 IS NULL OR carrier_id = $2)"
        ))
        .bind(id)
        .bind(scope)
        .fetch_optional(c)
        .await
    })
}

/// Which requests a list shows; every filter optional.
#[derive(Debug, Clone, Default)]
pub struct RequestFilter<'a> {
    pub scope: Option<&'a str>,
    pub status: Option<&'a str>,
    /// Not completed and past `due_at` at `now` (or the opposite).
    pub overdue: Option<bool>,
    pub now: i64,
    /// Keyset cursor: the `(received_at, id)` of the last item already seen.
    pub after: Option<(i64, Uuid)>,
    pub limit: i64,
}

/// Requests, newest first.
pub async fn list(db: &Db, f: &RequestFilter<'_>) -> sqlx::Result<Vec<RequestRow>> {
    let (at, id) = f.after.unzip();
    on_db!(db, c => {
        sqlx::query_as(&format!(
            "SELECT {READ_COLUMNS} FROM subject_requests
             WHERE ($1 IS NULL OR carrier_id = $1)
               AND ($2 IS NULL OR status = $2)
               AND ($3 IS NULL OR (status <> 'completed' AND due_at < $4) = $3)
               AND ($5 IS NULL OR received_at < $5 OR (received_at = $5 AND id < $6))
             ORDER BY received_at DESC, id DESC LIMIT $7"
        ))
        .bind(f.scope)
        .bind(f.status)
        .bind(f.overdue)
        .bind(f.now)
        .bind(at)
        .bind(id)
        .bind(f.limit)
        .fetch_all(c)
        .await
    })
}

/// Claims a request for processing: one that is new, or whose processor
/// stopped (its claim is older than `stale_before`).
pub async fn claim(db: &Db, id: Uuid, now: i64, stale_before: i64) -> sqlx::Result<bool> {
    // A claim lost in a crash leaves the request to be claimed again.
    take_claim(
        db,
        "UPDATE subject_requests SET status = 'processing', claimed_at = $1
         WHERE id = $2 AND (status = 'received' OR (status = 'processing' AND claimed_at < $3))",
        id,
        now,
        stale_before,
    )
    .await
}

/// Runs a claiming `UPDATE` (binding `now`, `id`, `stale_before` as $1–$3)
/// in a transaction of its own: `true` if it took the row.
async fn take_claim(
    db: &Db,
    sql: &str,
    id: Uuid,
    now: i64,
    stale_before: i64,
) -> sqlx::Result<bool> {
    let mut tx = db.begin_relaxed().await?;
    let n = on_tx!(&mut tx, c => {
        sqlx::query(sql)
            .bind(now)
            .bind(id)
            .bind(stale_before)
            .execute(c)
            .await
            .map(|r| r.rows_affected())
    })?;
    tx.commit().await?;
    Ok(n == 1)
}

/// Requests waiting for processing, or abandoned by a processor that died.
pub async fn pending(db: &Db, stale_before: i64) -> sqlx::Result<Vec<Uuid>> {
    on_db!(db, c => {
        sqlx::query_scalar(
            "SELECT id FROM subject_requests WHERE status = 'received' OR (status = 'processing' AND claimed_at < $1)
             ORDER BY received_at LIMIT 100",
        )
        .bind(stale_before)
        .fetch_all(c)
        .await
    })
}

/// Renews the claim this processor holds (`held`, the `claimed_at` it
/// last wrote) to `now`. `false` when the claim is no longer its own:
/// another processor took the request over after this one stalled past
/// the claim timeout, and this one must stop.
pub async fn renew_claim(tx: &mut Tx, id: Uuid, held: i64, now: i64) -> sqlx::Result<bool> {
    set_claim(
        tx,
        "UPDATE subject_requests SET claimed_at = $1
         WHERE id = $2 AND status = 'processing' AND claimed_at = $3",
        Some(now),
        id,
        held,
    )
    .await
}

/// Runs a fenced claim `UPDATE` (binding `now`, `id`, `held` as $1–$3):
/// `true` if the claim was still `held` and is now `now`.
async fn set_claim(
    tx: &mut Tx,
    sql: &str,
    now: Option<i64>,
    id: Uuid,
    held: i64,
) -> sqlx::Result<bool> {
    let n = on_tx!(tx, c => {
        sqlx::query(sql)
            .bind(now)
            .bind(id)
            .bind(held)
            .execute(c)
            .await
            .map(|r| r.rows_affected())
    })?;
    Ok(n == 1)
}

/// Counts a failed processing attempt by the processor holding the claim
/// (`held`); `false`, changing nothing, when it no longer does.
pub async fn record_failure(
    tx: &mut Tx,
    id: Uuid,
    held: i64,
    at: i64,
    description: &str,
) -> sqlx::Result<bool> {
    let n = on_tx!(tx, c => {
        sqlx::query(
            "UPDATE subject_requests SET failures = failures + 1, last_failure = $1, last_failure_at = $2
             WHERE id = $3 AND status = 'processing' AND claimed_at = $4",
        )
        .bind(description)
        .bind(at)
        .bind(id)
        .bind(held)
        .execute(c)
        .await
        .map(|r| r.rows_affected())
    })?;
    Ok(n == 1)
}

pub async fn set_progress(tx: &mut Tx, id: Uuid, progress: &str) -> sqlx::Result<()> {
    on_tx!(tx, c => {
        sqlx::query("UPDATE subject_requests SET progress = $1 WHERE id = $2").bind(progress).bind(id).execute(c).await.map(|r| r.rows_affected())
    })?;
    Ok(())
}

/// Completes a request whose claim this processor holds (`held`, as in
/// [`renew_claim`]); `false`, changing nothing, when it no longer does.
pub async fn complete(
    tx: &mut Tx,
    id: Uuid,
    held: i64,
    now: i64,
    receipt: Option<&str>,
    keep_subject: bool,
) -> sqlx::Result<bool> {
    let n = on_tx!(tx, c => {
        sqlx::query(
            "UPDATE subject_requests SET status = 'completed', completed_at = $1, receipt = $2,
               subject_sealed = CASE WHEN $3 THEN subject_sealed ELSE NULL END,
               subject_master = CASE WHEN $3 THEN subject_master ELSE NULL END
             WHERE id = $4 AND status = 'processing' AND claimed_at = $5",
        )
        .bind(now)
        .bind(receipt)
        .bind(keep_subject)
        .bind(id)
        .bind(held)
        .execute(c)
        .await
        .map(|r| r.rows_affected())
    })?;
    Ok(n == 1)
}

pub async fn extend(
    tx: &mut Tx,
    id: Uuid,
    due_at: i64,
    now: i64,
    reason: &str,
) -> sqlx::Result<bool> {
    let n = on_tx!(tx, c => {
        sqlx::query(
            "UPDATE subject_requests SET due_at = $1, extended_at = $2, extension_reason = $3
             WHERE id = $4 AND extended_at IS NULL",
        )
        .bind(due_at)
        .bind(now)
        .bind(reason)
        .bind(id)
        .execute(c)
        .await
        .map(|r| r.rows_affected())
    })?;
    Ok(n == 1)
}

#[derive(Debug, Clone, FromRow)]
pub struct ExportRow {
    pub request_id: Uuid,
    pub master: i64,
    pub wrapped_key: Vec<u8>,
    pub chunks: i64,
    pub size: i64,
    pub records: i64,
    pub sha256: Vec<u8>,
    pub signature: Vec<u8>,
    pub key_id: String,
    pub created_at: i64,
    pub expires_at: i64,
}

const EXPORT_COLUMNS: &str =
    "request_id, master, wrapped_key, chunks, size, records, sha256, signature, key_id, created_at, expires_at";

/// Removes a half-written export of a request (a processor died mid-way).
/// How many erasures of this subject in this carrier's scope completed.
pub async fn completed_erasures(tx: &mut Tx, carrier: &str, index: &[u8]) -> sqlx::Result<i64> {
    on_tx!(tx, c => {
        sqlx::query_scalar(
            "SELECT COUNT(*) FROM subject_requests
             WHERE carrier_id = $1 AND subject_index = $2 AND kind = 'erasure' AND status = 'completed'",
        )
        .bind(carrier)
        .bind(index)
        .fetch_one(c)
        .await
    })
}

pub async fn discard_export(tx: &mut Tx, id: Uuid) -> sqlx::Result<()> {
    on_tx!(tx, c => {
        sqlx::query("DELETE FROM subject_export_chunks WHERE request_id = $1").bind(id).execute(&mut *c).await?;
        sqlx::query("DELETE FROM subject_exports WHERE request_id = $1").bind(id).execute(&mut *c).await.map(|r| r.rows_affected())
    })?;
    Ok(())
}

pub async fn insert_chunk(tx: &mut Tx, id: Uuid, seq: i64, sealed: &[u8]) -> sqlx::Result<()> {
    on_tx!(tx, c => {
        sqlx::query("INSERT INTO subject_export_chunks (request_id, seq, sealed) VALUES ($1, $2, $3)")
            .bind(id)
            .bind(seq)
            .bind(sealed)
            .execute(c)
            .await
            .map(|r| r.rows_affected())
    })?;
    Ok(())
}

pub async fn insert_export(tx: &mut Tx, e: &ExportRow) -> sqlx::Result<()> {
    on_tx!(tx, c => {
        sqlx::query(&format!("INSERT INTO subject_exports ({EXPORT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"))
            .bind(e.request_id)
            .bind(e.master)
            .bind(&e.wrapped_key)
            .bind(e.chunks)
            .bind(e.size)
            .bind(e.records)
            .bind(&e.sha256)
            .bind(&e.signature)
            .bind(&e.key_id)
            .bind(e.created_at)
            .bind(e.expires_at)
            .execute(c)
            .await
            .map(|r| r.rows_affected())
    })?;
    Ok(())
}

pub async fn export(db: &Db, id: Uuid) -> sqlx::Result<Option<ExportRow>> {
    on_db!(db, c => {
        sqlx::query_as(&format!("SELECT {EXPORT_COLUMNS} FROM subject_exports WHERE request_id = $1"))
            .bind(id)
            .fetch_optional(c)
            .await
    })
}

pub async fn chunk(db: &Db, id: Uuid, seq: i64) -> sqlx::Result<Option<Vec<u8>>> {
    on_db!(db, c => {
        sqlx::query_scalar("SELECT sealed FROM subject_export_chunks WHERE request_id = $1 AND seq = $2")
            .bind(id)
            .bind(seq)
            .fetch_optional(c)
            .await
    })
}

/// Deletes exports past their expiry, and the identifiers their requests
/// kept for them. Returns the request ids.
pub async fn expire_exports(tx: &mut Tx, now: i64) -> sqlx::Result<Vec<Uuid>> {
    let ids: Vec<Uuid> = on_tx!(tx, c => {
        sqlx::query_scalar("SELECT request_id FROM subject_exports WHERE expires_at < $1").bind(now).fetch_all(c).await
    })?;
    for id in &ids {
        discard_export(tx, *id).await?;
        on_tx!(tx, c => {
            sqlx::query("UPDATE subject_requests SET subject_sealed = NULL, subject_master = NULL WHERE id = $1")
                .bind(*id)
                .execute(c)
                .await
                .map(|r| r.rows_affected())
        })?;
    }
    Ok(ids)
}

/// Notes an erasure that holds kept from finishing, with the held records
/// it found: those, and only those, are erased once no hold covers them.
pub async fn add_pending_erasure(
    tx: &mut Tx,
    id: Uuid,
    carrier: &str,
    subject_index: &[u8],
    records: &[Uuid],
) -> sqlx::Result<()> {
    on_tx!(tx, c => {
        sqlx::query(
            "INSERT INTO erasures_pending (request_id, carrier_id, subject_index, key_set_aside)
             VALUES ($1, $2, $3, TRUE)
             ON CONFLICT (request_id) DO NOTHING",
        )
        .bind(id)
        .bind(carrier)
        .bind(subject_index)
        .execute(c)
        .await
        .map(|r| r.rows_affected())
    })?;
    for chunk in records.chunks(MAX_BINDS / 2) {
        on_tx!(tx, c, DB => {
            let mut qb = sqlx::QueryBuilder::<DB>::new(
                "INSERT INTO erasures_pending_records (request_id, transfer_id) ",
            );
            qb.push_values(chunk, |mut b, record| {
                b.push_bind(id).push_bind(*record);
            });
            qb.push(" ON CONFLICT (request_id, transfer_id) DO NOTHING");
            qb.build().execute(&mut *c).await.map(|r| r.rows_affected())
        })?;
    }
    Ok(())
}

/// Notes that the pending erasure's subject key has been set aside.
pub async fn pending_key_set_aside(tx: &mut Tx, id: Uuid) -> sqlx::Result<()> {
    on_tx!(tx, c => {
        sqlx::query("UPDATE erasures_pending SET key_set_aside = TRUE WHERE request_id = $1")
            .bind(id)
            .execute(c)
            .await
            .map(|r| r.rows_affected())
    })?;
    Ok(())
}

pub async fn remove_pending_erasure(tx: &mut Tx, id: Uuid) -> sqlx::Result<()> {
    on_tx!(tx, c => {
        sqlx::query("DELETE FROM erasures_pending_records WHERE request_id = $1").bind(id).execute(&mut *c).await?;
        sqlx::query("DELETE FROM erasures_pending WHERE request_id = $1").bind(id).execute(&mut *c).await.map(|r| r.rows_affected())
    })?;
    Ok(())
}

/// A pending erasure: its request, and whose records (the held ones it
/// found, in `erasures_pending_records`).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PendingErasure {
    pub request_id: Uuid,
    pub carrier_id: String,
    pub subject_index: Vec<u8>,
    /// Whether the subject's key was set aside (at completion, or by a
    /// redo of an erasure from before that was done).
    pub key_set_aside: bool,
}

/// Pending erasures no processor holds (or whose processor has not renewed
/// its lease since `stale_before`).
pub async fn pending_erasures(db: &Db, stale_before: i64) -> sqlx::Result<Vec<PendingErasure>> {
    on_db!(db, c => {
        sqlx::query_as(
            "SELECT request_id, carrier_id, subject_index, key_set_aside FROM erasures_pending
             WHERE claimed_at IS NULL OR claimed_at < $1",
        )
        .bind(stale_before)
        .fetch_all(c)
        .await
    })
}

/// Takes the lease on a pending erasure, as [`claim`] does a request:
/// `true` if this processor now holds it.
pub async fn claim_pending_erasure(
    db: &Db,
    id: Uuid,
    now: i64,
    stale_before: i64,
) -> sqlx::Result<bool> {
    take_claim(
        db,
        "UPDATE erasures_pending SET claimed_at = $1
         WHERE request_id = $2 AND (claimed_at IS NULL OR claimed_at < $3)",
        id,
        now,
        stale_before,
    )
    .await
}

/// Renews (to `now`) or, with `None`, gives up the lease this processor
/// holds on a pending erasure (`held`, the value it last wrote); `false`
/// when the lease is no longer its own.
pub async fn renew_pending_erasure(
    tx: &mut Tx,
    id: Uuid,
    held: i64,
    now: Option<i64>,
) -> sqlx::Result<bool> {
    set_claim(
        tx,
        "UPDATE erasures_pending SET claimed_at = $1 WHERE request_id = $2 AND claimed_at = $3",
        now,
        id,
        held,
    )
    .await
}
