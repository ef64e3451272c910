//! Sweeps, the lock that keeps them one at a time, and legal holds.

use std::collections::BTreeSet;

use futures::TryStreamExt;
use sqlx::{FromRow, QueryBuilder};
use uuid::Uuid;

use super::{on_db, on_tx, push_list, Db, Tx, MAX_BINDS};

/// The database's own clock, in microseconds: expiry is judged by it, not
/// by whichever instance runs the sweep.
pub async fn db_now(db: &Db) -> sqlx::Result<i64> {
    match db {
        Db::Sqlite { read, .. } => {
            sqlx::query_scalar("SELECT CAST(unixepoch('subsec') * 1000000 AS INTEGER)")
                .fetch_one(read)
                .await
        }
        Db::Postgres(p) => {
            sqlx::query_scalar(
                "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT)",
            )
            .fetch_one(p)
            .await
        }
    }
}

/// Proof that this process is the one sweeping. Dropping it (or the
/// process dying) lets the next sweep start.
pub enum SweepLock {
    /// A session advisory lock, held on a connection of its own: PostgreSQL
    /// releases it when that connection closes, however the process ends.
    /// `None` once released.
    Postgres(Option<sqlx::pool::PoolConnection<sqlx::Postgres>>),
    /// An exclusive `flock` on a file beside the SQLite database.
    File(std::fs::File),
    InMemory,
}

/// The advisory lock of sweeps: this class ("tlsw") and the hash of the
/// schema, so that ledgers in different schemas of one database (tests run
/// that way) do not hold each other's sweeps.
const SWEEP_LOCK_CLASS: i32 = 0x746c_7377;
const SWEEP_LOCK: &str = "($1, hashtext(current_schema()))";

/// Takes the sweep lock without waiting; `None` if another sweep holds it.
///
/// On PostgreSQL, a holder whose running sweep has not renewed its lease
/// since `stale_before` (its process frozen, not dead, so its connection
/// and the lock outlive it) is ended first: its lock connection is
/// terminated, which releases the lock. Only the backend recorded in that
/// sweep's row, and only while it holds this ledger's sweep lock.
pub async fn try_lock(db: &Db, stale_before: i64) -> anyhow::Result<Option<SweepLock>> {
    match db {
        Db::Postgres(pool) => {
            let mut conn = pool.acquire().await?;
            let try_once = format!("SELECT pg_try_advisory_lock{SWEEP_LOCK}");
            let mut got: bool = sqlx::query_scalar(&try_once)
                .bind(SWEEP_LOCK_CLASS)
                .fetch_one(&mut *conn)
                .await?;
            if !got {
                // Locked, so a batch in flight (its lease renewed but not
                // yet committed) is waited for and then found fresh.
                let stale: Vec<i32> = sqlx::query_scalar(
                    "SELECT lock_pid FROM sweeps
                     WHERE status = 'running' AND lock_pid IS NOT NULL
                       AND COALESCE(renewed_at, started_at) < $1
                     FOR UPDATE",
                )
                .bind(stale_before)
                .fetch_all(&mut *conn)
                .await?;
                let ended: Vec<bool> = if stale.is_empty() {
                    Vec::new()
                } else {
                    sqlx::query_scalar(
                        "SELECT pg_terminate_backend(l.pid) FROM pg_locks l
                         WHERE l.pid = ANY($1) AND l.locktype = 'advisory' AND l.granted
                           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                           AND l.objsubid = 2 AND l.classid::bigint = $2
                           AND l.objid::bigint = (hashtext(current_schema())::bigint & 4294967295)",
                    )
                    .bind(&stale)
                    .bind(i64::from(SWEEP_LOCK_CLASS))
                    .fetch_all(&mut *conn)
                    .await?
                };
                if ended.contains(&true) {
                    tracing::warn!("a sweep stopped renewing its lease while holding the sweep lock (a frozen process); its lock connection was ended");
                    // The backend lets go of the lock as it exits.
                    for _ in 0..50 {
                        got = sqlx::query_scalar(&try_once)
                            .bind(SWEEP_LOCK_CLASS)
                            .fetch_one(&mut *conn)
                            .await?;
                        if got {
                            break;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
            Ok(got.then_some(SweepLock::Postgres(Some(conn))))
        }
        Db::Sqlite {
            lock_file: Some(path),
            ..
        } => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path)?;
            match file.try_lock() {
                Ok(()) => Ok(Some(SweepLock::File(file))),
                Err(std::fs::TryLockError::WouldBlock) => Ok(None),
                Err(std::fs::TryLockError::Error(e)) => Err(e.into()),
            }
        }
        Db::Sqlite {
            lock_file: None, ..
        } => Ok(Some(SweepLock::InMemory)),
    }
}

impl SweepLock {
    /// The PostgreSQL backend holding the lock, recorded with the sweep so
    /// that a stale holder can be ended (see [`try_lock`]).
    pub async fn pid(&mut self) -> sqlx::Result<Option<i32>> {
        match self {
            SweepLock::Postgres(Some(conn)) => sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(&mut **conn)
                .await
                .map(Some),
            _ => Ok(None),
        }
    }

    pub async fn release(mut self) {
        if let SweepLock::Postgres(slot) = &mut self {
            if let Some(mut conn) = slot.take() {
                let unlocked = sqlx::query(&format!("SELECT pg_advisory_unlock{SWEEP_LOCK}"))
                    .bind(SWEEP_LOCK_CLASS)
                    .execute(&mut *conn)
                    .await;
                if unlocked.is_err() {
                    // Never hand a connection still holding the lock back to the pool.
                    drop(conn.detach());
                }
            }
        }
    }
}

impl Drop for SweepLock {
    /// A sweep cancelled before it released its lock (a dropped request, a
    /// shutdown) closes the lock's connection, which releases the lock.
    fn drop(&mut self) {
        if let SweepLock::Postgres(slot) = self {
            if let Some(conn) = slot.take() {
                drop(conn.detach());
            }
        }
    }
}

#[derive(Debug, Clone, FromRow)]
pub struct SweepRow {
    pub id: Uuid,
    pub dry_run: bool,
    pub status: String,
    pub examined: i64,
    pub deleted: i64,
    pub held: i64,
    pub keys_shredded: i64,
    pub cutoff: i64,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub started_by: String,
}

const SWEEP_COLUMNS: &str =
    "id, dry_run, status, examined, deleted, held, keys_shredded, cutoff, started_at, finished_at, started_by";

pub async fn insert_sweep(tx: &mut Tx, s: &SweepRow) -> sqlx::Result<()> {
    on_tx!(tx, c => {
        sqlx::query(&format!(
            "INSERT INTO sweeps ({SWEEP_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        ))
        .bind(s.id)
        .bind(s.dry_run)
        .bind(&s.status)
        .bind(s.examined)
        .bind(s.deleted)
        .bind(s.held)
        .bind(s.keys_shredded)
        .bind(s.cutoff)
        .bind(s.started_at)
        .bind(s.finished_at)
        .bind(&s.started_by)
        .execute(c)
        .await
        .map(|r| r.rows_affected())
    })?;
    Ok(())
}

/// Records the lock's backend and renews the lease of a running sweep;
/// `false` when it is no longer running (interrupted by a sweep that took
/// over after its lease went stale): it must stop.
pub async fn renew_sweep(
    tx: &mut Tx,
    id: Uuid,
    now: i64,
    lock_pid: Option<i32>,
) -> sqlx::Result<bool> {
    let n = on_tx!(tx, c => {
        sqlx::query(
            "UPDATE sweeps SET renewed_at = $1, lock_pid = COALESCE($2, lock_pid) WHERE id = $3 AND status = 'running'",
        )
        .bind(now)
        .bind(lock_pid)
        .bind(id)
        .execute(c)
        .await
        .map(|r| r.rows_affected())
    })?;
    Ok(n == 1)
}

/// A sweep that stopped on an error is marked interrupted, now (the next
/// sweep finishes its job).
pub async fn interrupt(db: &Db, id: Uuid, at: i64) -> sqlx::Result<()> {
    on_db!(db, c => {
        sqlx::query("UPDATE sweeps SET status = 'interrupted', finished_at = $1 WHERE id = $2 AND status = 'running'")
            .bind(at)
            .bind(id)
            .execute(c)
            .await
            .map(|r| r.rows_affected())
    })?;
    Ok(())
}

/// Sweeps left `running` by a process that died are marked interrupted.
pub async fn interrupt_stale(tx: &mut Tx, except: Uuid) -> sqlx::Result<u64> {
    on_tx!(tx, c => {
        sqlx::query("UPDATE sweeps SET status = 'interrupted' WHERE status = 'running' AND id <> $1")
            .bind(except)
            .execute(c)
            .await
            .map(|r| r.rows_affected())
    })
}

/// Adds a batch's work to a sweep's counters. A batch that deleted records
/// also marks the sweep's key check pending (migration 0019) until
/// [`clear_keys_pending`].
pub async fn add_progress(tx: &mut Tx, id: Uuid, deleted: i64, keys: i64) -> sqlx::Result<()> {
    on_tx!(tx, c => {
        sqlx::query(
            "UPDATE sweeps SET examined = examined + $1, deleted = deleted + $1, keys_shredded = keys_shredded + $2,
                               keys_pending = (keys_pending OR $1 > 0)
             WHERE id = $3",
        )
        .bind(deleted)
        .bind(keys)
        .bind(id)
        .execute(c)
        .await
        .map(|r| r.rows_affected())
    })?;
    Ok(())
}

/// Whether a sweep other than `except` deleted records and stopped before
/// it checked their subject keys.
pub async fn keys_pending_elsewhere(tx: &mut Tx, except: Uuid) -> sqlx::Result<bool> {
    on_tx!(tx, c => {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM sweeps WHERE keys_pending AND id <> $1)")
            .bind(except)
            .fetch_one(c)
            .await
    })
}

/// The sweep left unused keys unchecked (others held them locked): the
/// next sweep walks every key.
pub async fn set_keys_pending(tx: &mut Tx, id: Uuid) -> sqlx::Result<()> {
    on_tx!(tx, c => {
        sqlx::query("UPDATE sweeps SET keys_pending = TRUE WHERE id = $1")
            .bind(id)
            .execute(c)
            .await
            .map(|r| r.rows_affected())
    })?;
    Ok(())
}

/// Every sweep's key check is done: the caller checked the keys of all of
/// them (its own candidates, or every subject key).
pub async fn clear_keys_pending(tx: &mut Tx) -> sqlx::Result<()> {
    on_tx!(tx, c => {
        sqlx::query("UPDATE sweeps SET keys_pending = FALSE WHERE keys_pending")
            .execute(c)
            .await
            .map(|r| r.rows_affected())
    })?;
    Ok(())
}

/// Records a running sweep's outcome; `false` if it is no longer running
/// (taken over, see [`renew_sweep`]).
pub async fn finish_sweep(tx: &mut Tx, s: &SweepRow) -> sqlx::Result<bool> {
    let n = on_tx!(tx, c => {
        sqlx::query(
            "UPDATE sweeps SET status = $1, examined = $2, deleted = $3, held = $4, keys_shredded = $5, finished_at = $6
             WHERE id = $7 AND status = 'running'",
        )
        .bind(&s.status)
        .bind(s.examined)
        .bind(s.deleted)
        .bind(s.held)
        .bind(s.keys_shredded)
        .bind(s.finished_at)
        .bind(s.id)
        .execute(c)
        .await
        .map(|r| r.rows_affected())
    })?;
    Ok(n == 1)
}

pub async fn sweep(db: &Db, id: Uuid) -> sqlx::Result<Option<SweepRow>> {
    on_db!(db, c => {
        sqlx::query_as(&format!("SELECT {SWEEP_COLUMNS} FROM sweeps WHERE id = $1")).bind(id).fetch_optional(c).await
    })
}

/// Sweeps, newest first: all, or only dry runs or only real ones; after
/// the `(started_at, id)` cursor of the last one already seen.
pub async fn list_sweeps(
    db: &Db,
    dry_run: Option<bool>,
    after: Option<(i64, Uuid)>,
    limit: i64,
) -> sqlx::Result<Vec<SweepRow>> {
    let (at, id) = after.unzip();
    on_db!(db, c => {
        sqlx::query_as(&format!(
            "SELECT {SWEEP_COLUMNS} FROM sweeps
             WHERE ($1 IS NULL OR dry_run = $1)
               AND ($2 IS NULL OR started_at < $2 OR (started_at = $2 AND id < $3))
             ORDER BY started_at DESC, id DESC LIMIT $4"
        ))
        .bind(dry_run)
        .bind(at)
        .bind(id)
        .bind(limit)
        .fetch_all(c)
        .await
    })
}

/// A record is held when an active hold matches it on every criterion the
/// hold sets (carrier, category, subject through the blind index).
pub(crate) const HELD: &str = "EXISTS (SELECT 1 FROM holds h WHERE h.released_at IS NULL
       AND (h.carrier_id IS NULL OR h.carrier_id = t.carrier_id)
       AND (h.category IS NULL OR h.category = t.category)
       AND (h.subject_index IS NULL OR EXISTS (
             SELECT 1 FROM subject_lookup l WHERE l.blind_index = h.subject_index AND l.occurred_at = t.occurred_at AND l.transfer_id = t.id)))";

/// What marks a record held, for statements that run while holds cannot
/// change (a sweep batch holds the holds lock): `FALSE` when no hold is in
/// force, which spares every record its probe of the holds table.
pub async fn held_test(tx: &mut Tx) -> sqlx::Result<&'static str> {
    Ok(if any_hold_in_force(tx).await? {
        HELD
    } else {
        "FALSE"
    })
}

async fn any_hold_in_force(tx: &mut Tx) -> sqlx::Result<bool> {
    on_tx!(tx, c => {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM holds WHERE released_at IS NULL)")
            .fetch_one(&mut *c)
            .await
    })
}

/// Where a sweep's next batch starts: just after the last record (by
/// expiry, then id) the previous batch looked at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SweepCursor {
    pub retain_until: i64,
    pub id: Uuid,
}

impl SweepCursor {
    pub const START: SweepCursor = SweepCursor {
        retain_until: i64::MIN,
        id: Uuid::nil(),
    };
}

/// The next expired, unheld records after `after`, oldest expiry first, and
/// the cursor for the batch after them. Starting after the previous batch
/// keeps each batch off the index entries of the records already deleted;
/// held records passed over stay behind the cursor.
pub async fn expired_batch(
    tx: &mut Tx,
    cutoff: i64,
    after: SweepCursor,
    limit: i64,
) -> sqlx::Result<(Vec<Uuid>, SweepCursor)> {
    let held = held_test(tx).await?;
    let rows: Vec<(Uuid, i64, bool)> = on_tx!(tx, c => {
        sqlx::query_as(&format!(
            "SELECT t.id, t.retain_until, {held} FROM transfers t
             WHERE t.retain_until < $1 AND (t.retain_until, t.id) > ($2, $3)
             ORDER BY t.retain_until, t.id LIMIT $4"
        ))
        .bind(cutoff)
        .bind(after.retain_until)
        .bind(after.id)
        .bind(limit)
        .fetch_all(c)
        .await
    })?;
    let next = rows
        .last()
        .map_or(after, |&(id, retain_until, _)| SweepCursor {
            retain_until,
            id,
        });
    Ok((
        rows.into_iter().filter(|r| !r.2).map(|r| r.0).collect(),
        next,
    ))
}

/// Those of `ids` (sorted) that no hold in force covers, sorted: all of
/// them, without a query, when no hold is in force. For a batch that holds
/// the holds lock, over records chosen before it took it.
pub async fn unheld(tx: &mut Tx, ids: &[Uuid]) -> sqlx::Result<Vec<Uuid>> {
    if !any_hold_in_force(tx).await? {
        return Ok(ids.to_vec());
    }
    match tx {
        Tx::Postgres(t) => {
            sqlx::query_scalar(&format!(
                "SELECT t.id FROM transfers t WHERE t.id = ANY($1) AND NOT {HELD} ORDER BY t.id"
            ))
            .bind(ids)
            .fetch_all(&mut **t)
            .await
        }
        Tx::Sqlite(t) => {
            let mut kept = Vec::with_capacity(ids.len());
            for chunk in ids.chunks(MAX_BINDS) {
                let mut qb = QueryBuilder::<sqlx::Sqlite>::new(
                    "SELECT t.id FROM transfers t WHERE t.id IN (",
                );
                push_list(&mut qb, chunk.iter().copied());
                qb.push(") AND NOT ");
                qb.push(HELD);
                qb.push(" ORDER BY t.id");
                let rows: Vec<Uuid> = qb.build_query_scalar().fetch_all(&mut **t).await?;
                kept.extend(rows);
            }
            Ok(kept)
        }
    }
}

/// Counts of expired records, held and not held.
pub async fn expired_counts(tx: &mut Tx, cutoff: i64) -> sqlx::Result<(i64, i64)> {
    let held = held_test(tx).await?;
    on_tx!(tx, c => {
        sqlx::query_as(&format!(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN {held} THEN 1 ELSE 0 END), 0) FROM transfers t WHERE t.retain_until < $1"
        ))
        .bind(cutoff)
        .fetch_one(c)
        .await
    })
}

/// How many expired records are held: none, without walking the expired
/// records (after a sweep, on PostgreSQL, the index entries of every record
/// it deleted), when no hold is in force.
pub async fn expired_held(tx: &mut Tx, cutoff: i64) -> sqlx::Result<i64> {
    if !any_hold_in_force(tx).await? {
        return Ok(0);
    }
    on_tx!(tx, c => {
        sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM transfers t WHERE t.retain_until < $1 AND {HELD}"
        ))
        .bind(cutoff)
        .fetch_one(c)
        .await
    })
}

/// Subject keys that would be left with nothing to decrypt if every
/// expired, unheld record went.
pub async fn keys_left_empty(db: &Db, cutoff: i64) -> sqlx::Result<i64> {
    on_db!(db, c => {
        sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM subject_keys k
             WHERE EXISTS (SELECT 1 FROM transfer_slots s WHERE s.subject_key_id = k.id)
               AND NOT EXISTS (SELECT 1 FROM transfer_slots s JOIN transfers t ON t.id = s.transfer_id
                               WHERE s.subject_key_id = k.id AND (t.retain_until >= $1 OR {HELD}))
               AND NOT EXISTS (SELECT 1 FROM consents co WHERE co.subject_key_id = k.id)"
        ))
        .bind(cutoff)
        .fetch_one(c)
        .await
    })
}

/// Deletes records with their slots and lookup rows, set-based. Returns
/// the ids of the records that went (any of `ids` already gone is not
/// among them) and the subject keys that sealed their slots (sorted,
/// distinct).
///
/// The children go first, each table in one statement, the slots
/// returning the keys that sealed them. SQLite: the foreign-key cascade of
/// the last statement then finds nothing left to do. PostgreSQL: the last
/// statement runs with [`children_deleted`], so the delete trigger stands
/// aside (migration 0018).
pub async fn delete_batch(tx: &mut Tx, ids: &[Uuid]) -> sqlx::Result<(Vec<Uuid>, Vec<Uuid>)> {
    let mut gone: Vec<Uuid> = Vec::new();
    let mut keys: Vec<Uuid> = Vec::new();
    match tx {
        Tx::Postgres(t) => {
            let c = &mut **t;
            keys = sqlx::query_scalar(
                "DELETE FROM transfer_slots WHERE transfer_id = ANY($1) RETURNING subject_key_id",
            )
            .bind(ids)
            .fetch_all(&mut *c)
            .await?;
            sqlx::query("DELETE FROM subject_lookup WHERE transfer_id = ANY($1)")
                .bind(ids)
                .execute(&mut *c)
                .await?;
            children_deleted_pg(&mut *c, true).await?;
            gone = sqlx::query_scalar("DELETE FROM transfers WHERE id = ANY($1) RETURNING id")
                .bind(ids)
                .fetch_all(&mut *c)
                .await?;
            children_deleted_pg(&mut *c, false).await?;
        }
        Tx::Sqlite(t) => {
            let c = &mut **t;
            for chunk in ids.chunks(MAX_BINDS) {
                let in_list = |sql: &str, tail: &str| {
                    let mut qb = QueryBuilder::<sqlx::Sqlite>::new(sql);
                    push_list(&mut qb, chunk.iter().copied());
                    qb.push(tail);
                    qb
                };
                let mut qb = in_list(
                    "DELETE FROM transfer_slots WHERE transfer_id IN (",
                    ") RETURNING subject_key_id",
                );
                let k: Vec<Uuid> = qb.build_query_scalar().fetch_all(&mut *c).await?;
                keys.extend(k);
                in_list("DELETE FROM subject_lookup WHERE transfer_id IN (", ")")
                    .build()
                    .execute(&mut *c)
                    .await?;
                let g: Vec<Uuid> = in_list("DELETE FROM transfers WHERE id IN (", ") RETURNING id")
                    .build_query_scalar()
                    .fetch_all(&mut *c)
                    .await?;
                gone.extend(g);
            }
        }
    }
    keys.sort();
    keys.dedup();
    Ok((gone, keys))
}

/// PostgreSQL: says (`on`) that the caller deletes, in this transaction,
/// the slots and lookup rows of exactly the records its next statement
/// deletes, so the row trigger of migration 0018 queues nothing for them;
/// `off` again right after that one statement. Nothing on SQLite, whose
/// foreign keys cascade (and find nothing left when the caller went first).
pub async fn children_deleted(tx: &mut Tx, on: bool) -> sqlx::Result<()> {
    match tx {
        Tx::Postgres(t) => children_deleted_pg(t, on).await,
        Tx::Sqlite(_) => Ok(()),
    }
}

async fn children_deleted_pg(c: &mut sqlx::PgConnection, on: bool) -> sqlx::Result<()> {
    sqlx::query("SELECT set_config('ledger.children_deleted', $1, true)")
        .bind(if on { "on" } else { "off" })
        .execute(c)
        .await
        .map(|_| ())
}

/// A subject key (`subject_keys`, unaliased) that no slot and no consent
/// uses: it has nothing left to decrypt.
const UNUSED: &str = "NOT EXISTS (SELECT 1 FROM transfer_slots s WHERE s.subject_key_id = subject_keys.id)
                  AND NOT EXISTS (SELECT 1 FROM consents co WHERE co.subject_key_id = subject_keys.id)";

/// Up to `limit` subject keys after `after`, in id order, that have nothing
/// left to decrypt: a sweep's walk of every key, when an earlier sweep
/// stopped before it checked the keys of what it deleted.
pub async fn unused_keys_after(tx: &mut Tx, after: Uuid, limit: i64) -> sqlx::Result<Vec<Uuid>> {
    on_tx!(tx, c => {
        sqlx::query_scalar(&format!(
            "SELECT id FROM subject_keys WHERE id > $1 AND {UNUSED} ORDER BY id LIMIT $2"
        ))
        .bind(after)
        .bind(limit)
        .fetch_all(c)
        .await
    })
}

/// Takes out of `keys` every key that a slot or a consent uses, reading
/// each table once, in full, instead of probing its key index once per
/// key. For many keys right after a sweep deleted their records' slots: on
/// PostgreSQL the index keeps the entries of those slots until vacuum, and
/// a probe visits the table for each of them to learn it is gone (at two
/// million records, 192,000 keys took 23.6 s of probes).
pub async fn drop_used_keys(db: &Db, keys: &mut BTreeSet<Uuid>) -> sqlx::Result<()> {
    for sql in [
        "SELECT subject_key_id FROM transfer_slots",
        "SELECT subject_key_id FROM consents WHERE subject_key_id IS NOT NULL",
    ] {
        on_db!(db, c => {
            let mut used = sqlx::query_scalar::<_, Uuid>(sql).fetch(c);
            while let Some(k) = used.try_next().await? {
                keys.remove(&k);
            }
            Ok::<_, sqlx::Error>(())
        })?;
    }
    Ok(())
}

/// How many subject keys have nothing left to decrypt now (what a walk of
/// every key would destroy).
pub async fn unused_keys(tx: &mut Tx) -> sqlx::Result<i64> {
    on_tx!(tx, c => {
        sqlx::query_scalar(&format!("SELECT COUNT(*) FROM subject_keys WHERE {UNUSED}"))
            .fetch_one(c)
            .await
    })
}

/// What [`shred_unused_keys`] did with its keys.
#[derive(Debug, Default)]
pub struct Shredded {
    /// Destroyed.
    pub destroyed: Vec<Uuid>,
    /// Unused, but locked by another transaction (PostgreSQL: a writer
    /// sealing under them, or a rewrap), so left as they are: check them
    /// again once that transaction has ended.
    pub skipped: Vec<Uuid>,
}

/// Destroys those of `keys` that no slot and no consent uses any more:
/// crypto-shredding.
pub async fn shred_unused_keys(tx: &mut Tx, keys: &[Uuid]) -> sqlx::Result<Shredded> {
    if keys.is_empty() {
        return Ok(Shredded::default());
    }
    if let Tx::Postgres(t) = tx {
        // One array parameter: planned as index probes, whatever the count.
        // Only keys unused in this statement's snapshot are locked (a key
        // still sealing a slot stays as it is: whoever deletes that slot
        // checks it then). A key a writer is sealing under right now (its
        // slot insert holds a key-share lock on it) is skipped, not waited
        // for, and reported so that the caller checks it again.
        let locked: Vec<Uuid> = sqlx::query_scalar(&format!(
            "SELECT id FROM subject_keys WHERE id = ANY($1) AND {UNUSED} ORDER BY id FOR UPDATE SKIP LOCKED"
        ))
        .bind(keys)
        .fetch_all(&mut **t)
        .await?;
        let skipped = if locked.len() < keys.len() {
            let held: BTreeSet<&Uuid> = locked.iter().collect();
            let others: Vec<Uuid> = keys.iter().filter(|k| !held.contains(k)).copied().collect();
            sqlx::query_scalar(&format!(
                "SELECT id FROM subject_keys WHERE id = ANY($1) AND {UNUSED}"
            ))
            .bind(&others)
            .fetch_all(&mut **t)
            .await?
        } else {
            Vec::new()
        };
        if locked.is_empty() {
            return Ok(Shredded {
                destroyed: locked,
                skipped,
            });
        }
        // A second statement, so a second snapshot, taken with the locks
        // held: no slot can be added under these keys any more, and a slot
        // a writer committed just before the lock is seen. (Checked in the
        // locking statement's snapshot only, such a slot was missed, and
        // the delete failed on the foreign key.)
        let destroyed = sqlx::query_scalar(&format!(
            "DELETE FROM subject_keys WHERE id = ANY($1) AND {UNUSED} RETURNING id"
        ))
        .bind(&locked)
        .fetch_all(&mut **t)
        .await?;
        return Ok(Shredded { destroyed, skipped });
    }
    let mut destroyed = Vec::new();
    for chunk in keys.chunks(MAX_BINDS) {
        let gone: Vec<Uuid> = on_tx!(tx, c, DB => {
            let mut qb = QueryBuilder::<DB>::new("DELETE FROM subject_keys WHERE id IN (");
            push_list(&mut qb, chunk.iter().copied());
            qb.push(") AND ");
            qb.push(UNUSED);
            qb.push(" RETURNING id");
            qb.build_query_scalar().fetch_all(&mut *c).await
        })?;
        destroyed.extend(gone);
    }
    Ok(Shredded {
        destroyed,
        skipped: Vec::new(),
    })
}

#[derive(Debug, Clone, FromRow)]
pub struct HoldRow {
    pub id: Uuid,
    pub carrier_id: Option<String>,
    pub subject_index: Option<Vec<u8>>,
    pub category: Option<String>,
    pub reason: String,
    pub created_at: i64,
    pub created_by: String,
    pub released_at: Option<i64>,
    pub released_by: Option<String>,
}

const HOLD_COLUMNS: &str =
    "id, carrier_id, subject_index, category, reason, created_at, created_by, released_at, released_by";

pub async fn insert_hold(tx: &mut Tx, h: &HoldRow) -> sqlx::Result<()> {
    on_tx!(tx, c => {
        sqlx::query(&format!("INSERT INTO holds ({HOLD_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"))
            .bind(h.id)
            .bind(&h.carrier_id)
            .bind(&h.subject_index)
            .bind(&h.category)
            .bind(&h.reason)
            .bind(h.created_at)
            .bind(&h.created_by)
            .bind(h.released_at)
            .bind(&h.released_by)
            .execute(c)
            .await
            .map(|r| r.rows_affected())
    })?;
    Ok(())
}

pub async fn release_hold(tx: &mut Tx, id: Uuid, at: i64, by: &str) -> sqlx::Result<bool> {
    let n = on_tx!(tx, c => {
        sqlx::query("UPDATE holds SET released_at = $1, released_by = $2 WHERE id = $3 AND released_at IS NULL")
            .bind(at)
            .bind(by)
            .bind(id)
            .execute(c)
            .await
            .map(|r| r.rows_affected())
    })?;
    Ok(n == 1)
}

pub async fn hold(db: &Db, id: Uuid) -> sqlx::Result<Option<HoldRow>> {
    on_db!(db, c => {
        sqlx::query_as(&format!("SELECT {HOLD_COLUMNS} FROM holds WHERE id = $1")).bind(id).fetch_optional(c).await
    })
}

/// Holds, newest first: those in force (`Some(true)`), those released
/// (`Some(false)`) or all.
pub async fn list_holds(db: &Db, active: Option<bool>) -> sqlx::Result<Vec<HoldRow>> {
    let filter = match active {
        Some(true) => "WHERE released_at IS NULL",
        Some(false) => "WHERE released_at IS NOT NULL",
        None => "",
    };
    on_db!(db, c => {
        sqlx::query_as(&format!(
            "SELECT {HOLD_COLUMNS} FROM holds {filter} ORDER BY created_at DESC, id DESC"
        ))
        .fetch_all(c)
        .await
    })
}

/// Active holds that cover any of these records, with what they hold.
pub async fn holds_covering(tx: &mut Tx, ids: &[Uuid]) -> sqlx::Result<Vec<(Uuid, Uuid)>> {
    let mut out = Vec::new();
    for chunk in ids.chunks(MAX_BINDS) {
        let rows: Vec<(Uuid, Uuid)> = on_tx!(tx, c, DB => {
            let mut qb = QueryBuilder::<DB>::new(
                "SELECT t.id, h.id FROM transfers t JOIN holds h ON h.released_at IS NULL
                   AND (h.carrier_id IS NULL OR h.carrier_id = t.carrier_id)
                   AND (h.category IS NULL OR h.category = t.category)
                   AND (h.subject_index IS NULL OR EXISTS (
                        SELECT 1 FROM subject_lookup l WHERE l.blind_index = h.subject_index AND l.occurred_at = t.occurred_at AND l.transfer_id = t.id))
                 WHERE t.id IN (",
            );
            push_list(&mut qb, chunk.iter().copied());
            qb.push(")");
            qb.build_query_as().fetch_all(&mut *c).await
        })?;
        out.extend(rows);
    }
    Ok(out)
}

pub async fn hold_in(tx: &mut Tx, id: Uuid) -> sqlx::Result<Option<HoldRow>> {
    on_tx!(tx, c => {
        sqlx::query_as(&format!("SELECT {HOLD_COLUMNS} FROM holds WHERE id = $1")).bind(id).fetch_optional(c).await
    })
}
