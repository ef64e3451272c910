//! The retention sweep: one engine behind the HTTP endpoint, the CLI and the
//! schedule.
//!
//! Expired, unheld records go in batches; each batch is one transaction that
//! deletes the records (their slots and lookup rows cascade), destroys the
//! subject keys left with nothing to decrypt, adds the batch to the sweep's
//! counters and appends its audit entry. A sweep killed at any instant
//! therefore leaves whole batches done and the rest untouched: a rerun
//! finishes the job, and nothing is counted or audited twice. A lock that
//! the operating system or PostgreSQL releases when its holder dies keeps
//! sweeps to one at a time across processes and instances.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

use crate::app::AppState;
use crate::audit::{self, Event};
use crate::auth::Principal;
use crate::error::{AppError, Result};
use crate::storage::retention::{self as store, SweepRow};
use crate::storage::{from_micros, micros, TxLock};

/// How many expired records a sweep chooses at a time (by expiry, 16 bytes
/// each) before deleting them in batches in id order. Ids are time-ordered
/// (UUIDv7), and a record's slots and lookup rows are written with it, so
/// in id order consecutive batches delete from neighbouring pages of each
/// table instead of every batch touching pages all over it, and again
/// (on PostgreSQL each page then costs a full-page image in the WAL once
/// per checkpoint, not once per batch that touched it).
const CHUNK: i64 = 500_000;

/// The most subject keys a sweep remembers for its check after the last
/// batch (16 bytes each, a few tens of MB of set at most); past it, the
/// check walks every subject key instead.
const MAX_CANDIDATE_KEYS: usize = 1_000_000;

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SweepReport {
    pub id: Uuid,
    pub dry_run: bool,
    pub status: String,
    pub examined: i64,
    pub deleted: i64,
    pub held: i64,
    pub keys_shredded: i64,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub started_by: String,
}

impl From<SweepRow> for SweepReport {
    fn from(r: SweepRow) -> Self {
        Self {
            id: r.id,
            dry_run: r.dry_run,
            status: r.status,
            examined: r.examined,
            deleted: r.deleted,
            held: r.held,
            keys_shredded: r.keys_shredded,
            started_at: from_micros(r.started_at),
            finished_at: r.finished_at.map(from_micros),
            started_by: r.started_by,
        }
    }
}

/// Runs one sweep. `progress(deleted_so_far, to_delete)`, if given, is
/// called after each batch (counting what is to delete first costs a walk
/// of every expired record, so only a caller that shows it asks). Fails
/// with 409 if another sweep is running.
pub async fn run(
    state: &AppState,
    who: &Principal,
    dry_run: bool,
    batch: i64,
    progress: Option<&(dyn Fn(u64, u64) + Send + Sync)>,
) -> Result<SweepReport> {
    let db = &state.db;
    let id = Uuid::now_v7();
    let stale_before = state.config.stale_before(micros(Utc::now()));
    let Some(mut lock) = store::try_lock(db, stale_before).await? else {
        return Err(AppError::Conflict(
            "a retention sweep is already running; try again when it has finished".into(),
        ));
    };
    let cutoff = store::db_now(db).await?;
    let mut tx = db.begin().await?;
    // Holding the lock, any sweep still marked running died mid-way.
    store::interrupt_stale(&mut tx, id).await?;
    let mut row = SweepRow {
        id,
        dry_run,
        status: "running".into(),
        examined: 0,
        deleted: 0,
        held: 0,
        keys_shredded: 0,
        cutoff,
        started_at: micros(Utc::now()),
        finished_at: None,
        started_by: who.sub.clone(),
    };
    store::insert_sweep(&mut tx, &row).await?;
    let pid = lock.pid().await?;
    store::renew_sweep(&mut tx, id, row.started_at, pid).await?;
    tx.commit().await?;

    let result = sweep_batches(state, who, &mut row, batch, progress).await;
    if let Err(e) = &result {
        // Said here, whoever started it: an HTTP caller may have gone (a
        // request timeout) and the schedule has no caller at all.
        tracing::error!(sweep = %id, dry_run, error = %e, "retention sweep failed; the next sweep finishes its job");
        if let Err(e) = store::interrupt(db, id, micros(Utc::now())).await {
            tracing::error!(sweep = %id, error = %e, "cannot mark the failed sweep interrupted; the next sweep will");
        }
    }
    lock.release().await;
    result?;
    Ok(row.into())
}

async fn sweep_batches(
    state: &AppState,
    who: &Principal,
    row: &mut SweepRow,
    batch: i64,
    progress: Option<&(dyn Fn(u64, u64) + Send + Sync)>,
) -> Result<()> {
    let db = &state.db;
    // Whether the sweep checked every subject key its deletions (or an
    // earlier sweep's) left unused; see `shred_keys`.
    let mut keys_checked = true;
    let counts = || async {
        let mut tx = db.begin_probes().await?;
        let counts = store::expired_counts(&mut tx, row.cutoff).await?;
        tx.commit().await?;
        Ok::<_, AppError>(counts)
    };

    if row.dry_run {
        let (expired, held) = counts().await?;
        row.examined = expired;
        row.deleted = expired - held;
        row.held = held;
        row.keys_shredded = store::keys_left_empty(db, row.cutoff).await?;
        // A sweep would also finish the key check of one that stopped
        // before it (see `shred_keys`).
        let mut tx = db.begin_probes().await?;
        if store::keys_pending_elsewhere(&mut tx, row.id).await? {
            row.keys_shredded += store::unused_keys(&mut tx).await?;
        }
        tx.commit().await?;
    } else {
        let to_delete = match progress {
            Some(_) => {
                let (expired, held) = counts().await?;
                (expired - held).max(0) as u64
            }
            None => 0,
        };
        let mut cursor = store::SweepCursor::START;
        // The subject keys that sealed the deleted slots, each once,
        // checked after the last batch; `None` past the cap, and the keys
        // are then found by a walk of every key instead.
        let mut candidates: Option<BTreeSet<Uuid>> = Some(BTreeSet::new());
        loop {
            // The next expired records, by expiry, many batches' worth at a
            // time, deleted batch by batch in id order (see `CHUNK`).
            let mut tx = db.begin_probes().await?;
            let (mut ids, next) =
                store::expired_batch(&mut tx, row.cutoff, cursor, batch.max(CHUNK)).await?;
            tx.commit().await?;
            if next == cursor {
                break;
            }
            cursor = next;
            ids.sort_unstable();
            for slice in ids.chunks(batch.max(1) as usize) {
                let (deleted, keys) = retrying(|| sweep_batch(state, who, row, slice)).await?;
                if let Some(c) = &mut candidates {
                    c.extend(keys);
                    if c.len() > MAX_CANDIDATE_KEYS {
                        candidates = None;
                    }
                }
                row.deleted += deleted;
                row.examined += deleted;
                if let Some(progress) = progress {
                    progress(row.deleted as u64, to_delete);
                }
            }
        }
        keys_checked = shred_keys(state, who, row, candidates, batch).await?;
        // The idempotency keys of erased records, kept as long as those
        // records would have been (migration 0020).
        let mut tx = db.begin().await?;
        crate::storage::transfers::forget_erased_keys(&mut tx, row.cutoff).await?;
        tx.commit().await?;
        // Held as the walk left them: a hold placed during the sweep
        // counts the records it kept.
        let mut tx = db.begin_probes().await?;
        let held_now = store::expired_held(&mut tx, row.cutoff).await?;
        tx.commit().await?;
        row.held = held_now;
        row.examined += held_now;
    }

    row.status = "completed".into();
    row.finished_at = Some(micros(Utc::now()));
    let mut tx = db.begin().await?;
    if !store::finish_sweep(&mut tx, row).await? {
        return Err(taken_over(row.id));
    }
    if !row.dry_run {
        if keys_checked {
            store::clear_keys_pending(&mut tx).await?;
        } else {
            store::set_keys_pending(&mut tx, row.id).await?;
        }
    }
    let target = json!({
        "sweep_id": row.id, "dry_run": row.dry_run, "examined": row.examined, "deleted": row.deleted,
        "held": row.held, "keys_shredded": row.keys_shredded,
    });
    audit::append(&mut tx, Some(who), &Event::new("retention.sweep", target)).await?;
    tx.commit().await?;
    Ok(())
}

/// The built-in schedule: a sweep every `interval`, as the service itself.
/// Several instances may run it; the sweep lock lets one sweep at a time.
pub async fn schedule(state: AppState, interval: Duration, batch: i64) {
    let scheduler = Principal {
        sub: "scheduler".into(),
        role: crate::auth::Role::RetentionSweeper,
        carrier: None,
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match run(&state, &scheduler, false, batch, None).await {
            Ok(r) => {
                tracing::info!(sweep = %r.id, deleted = r.deleted, held = r.held, keys_shredded = r.keys_shredded, "scheduled sweep done")
            }
            Err(AppError::Conflict(m)) => tracing::info!(reason = %m, "scheduled sweep skipped"),
            Err(e) => tracing::error!(error = %e, "scheduled sweep failed; the next one resumes"),
        }
    }
}

/// One batch: those of `ids` (expired, chosen before) that no hold covers
/// now, deleted in one transaction with their audit entry. What it deleted
/// and the subject keys that sealed their slots.
async fn sweep_batch(
    state: &AppState,
    who: &Principal,
    row: &SweepRow,
    ids: &[Uuid],
) -> Result<(i64, Vec<Uuid>)> {
    let mut tx = state.db.begin_probes().await?;
    // The lease first: a sweep that stalled past it and was taken over
    // stops here, and while this batch runs its row lock keeps a takeover
    // waiting.
    if !store::renew_sweep(&mut tx, row.id, micros(Utc::now()), None).await? {
        return Err(taken_over(row.id));
    }
    // Holds stay as they are until this batch commits (a hold being placed
    // waits), so nothing held is deleted: the records were chosen before
    // this lock, and those a hold covers now are passed over.
    TxLock::Holds.take(&mut tx, true).await?;
    let ids = store::unheld(&mut tx, ids).await?;
    if ids.is_empty() {
        tx.commit().await?;
        return Ok((0, Vec::new()));
    }
    let (gone, keys) = store::delete_batch(&mut tx, &ids).await?;
    if gone.is_empty() {
        // Erased meanwhile: nothing to count or audit.
        tx.commit().await?;
        return Ok((0, keys));
    }
    store::add_progress(&mut tx, row.id, gone.len() as i64, 0).await?;
    let target = json!({"sweep_id": row.id, "deleted_ids": gone});
    audit::append(
        &mut tx,
        Some(who),
        &Event::new("retention.sweep.batch", target),
    )
    .await?;
    tx.commit().await?;
    Ok((gone.len() as i64, keys))
}

/// Destroys the subject keys the sweep's deletions left with nothing to
/// decrypt: each of `candidates` once, in batches, or, when that set is not
/// known (past the cap) or an earlier sweep stopped before it checked its
/// own (`keys_pending`, migration 0019), every subject key in id order.
/// Each batch is one transaction with the sweep's counter and its audit
/// entry; a sweep killed here leaves its own flag set, and the next sweep
/// walks every key.
///
/// An unused key that another transaction holds locked (PostgreSQL: a
/// writer sealing under it, or a rewrap) is checked again once that has
/// ended, a few times. Whether every key was checked: if not, the sweep
/// leaves its flag set, and the next sweep walks every key.
async fn shred_keys(
    state: &AppState,
    who: &Principal,
    row: &mut SweepRow,
    candidates: Option<BTreeSet<Uuid>>,
    batch: i64,
) -> Result<bool> {
    let mut tx = state.db.begin_probes().await?;
    let walk = store::keys_pending_elsewhere(&mut tx, row.id).await?;
    tx.commit().await?;
    let mut skipped = Vec::new();
    match candidates {
        Some(mut keys) if !walk => {
            // More keys than a batch: one read of the slots' keys instead of
            // a probe per key (see `drop_used_keys`). Only narrows the
            // candidates; each key left is checked again, locked, below.
            if keys.len() > batch as usize {
                store::drop_used_keys(&state.db, &mut keys).await?;
            }
            let keys: Vec<Uuid> = keys.into_iter().collect();
            for chunk in keys.chunks(batch.max(1) as usize) {
                let (_, locked) = shred_key_batch(state, who, row, KeyBatch::These(chunk)).await?;
                skipped.extend(locked);
            }
        }
        _ => {
            let mut after = Uuid::nil();
            loop {
                let (next, locked) =
                    shred_key_batch(state, who, row, KeyBatch::UnusedAfter(after, batch)).await?;
                skipped.extend(locked);
                match next {
                    Some(last) => after = last,
                    None => break,
                }
            }
        }
    }
    for _ in 0..LOCKED_KEY_RETRIES {
        if skipped.is_empty() {
            break;
        }
        tokio::time::sleep(LOCKED_KEY_PAUSE).await;
        let mut again = Vec::new();
        for chunk in skipped.chunks(batch.max(1) as usize) {
            again.extend(
                shred_key_batch(state, who, row, KeyBatch::These(chunk))
                    .await?
                    .1,
            );
        }
        skipped = again;
    }
    if !skipped.is_empty() {
        tracing::warn!(sweep = %row.id, keys = skipped.len(), "unused subject keys stayed locked by other transactions; the next sweep checks every key");
    }
    Ok(skipped.is_empty())
}

/// How often, and after how long a pause, [`shred_keys`] checks again the
/// unused keys another transaction held locked.
const LOCKED_KEY_RETRIES: usize = 3;
const LOCKED_KEY_PAUSE: Duration = Duration::from_millis(200);

/// The keys one batch of [`shred_keys`] checks.
#[derive(Clone, Copy)]
enum KeyBatch<'a> {
    /// These candidates.
    These(&'a [Uuid]),
    /// The walk of every key: up to `limit` unused keys after this one.
    UnusedAfter(Uuid, i64),
}

/// One transaction of [`shred_keys`]: destroys those of the batch's keys
/// that nothing uses, with the sweep's counter and audit entry. The walk's
/// next position (`None` for candidates, or when the walk has ended), and
/// the unused keys another transaction had locked.
async fn shred_key_batch(
    state: &AppState,
    who: &Principal,
    row: &mut SweepRow,
    keys: KeyBatch<'_>,
) -> Result<(Option<Uuid>, Vec<Uuid>)> {
    let id = row.id;
    let (shredded, skipped, next) = retrying(|| async {
        let mut tx = state.db.begin_probes().await?;
        if !store::renew_sweep(&mut tx, id, micros(Utc::now()), None).await? {
            return Err(taken_over(id));
        }
        let (keys, next) = match keys {
            KeyBatch::These(chunk) => (chunk.to_vec(), None),
            KeyBatch::UnusedAfter(after, limit) => {
                let keys = store::unused_keys_after(&mut tx, after, limit).await?;
                let next = keys.last().copied().filter(|_| keys.len() as i64 == limit);
                (keys, next)
            }
        };
        let store::Shredded {
            destroyed: shredded,
            skipped,
        } = store::shred_unused_keys(&mut tx, &keys).await?;
        if !shredded.is_empty() {
            store::add_progress(&mut tx, id, 0, shredded.len() as i64).await?;
            let target = json!({"sweep_id": id, "keys_shredded": shredded.len()});
            audit::append(
                &mut tx,
                Some(who),
                &Event::new("retention.sweep.keys", target),
            )
            .await?;
        }
        tx.commit().await?;
        Ok((shredded, skipped, next))
    })
    .await?;
    for k in &shredded {
        state.keys.forget(*k);
    }
    row.keys_shredded += shredded.len() as i64;
    Ok((next, skipped))
}

/// Runs `step` again, up to twice, when it failed on a conflict with a
/// writer: a writer sealing under a key the step found unused (its slots
/// not committed yet), or a deadlock with one. The step's transaction
/// rolled back, so it simply reruns.
async fn retrying<T, F, Fut>(mut step: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut attempts = 0;
    loop {
        match step().await {
            Err(e) if attempts < 2 && retryable(&e) => {
                attempts += 1;
                tracing::warn!(error = %e, attempt = attempts, "sweep batch conflicted with a writer; retrying it");
            }
            other => return other,
        }
    }
}

fn taken_over(id: Uuid) -> AppError {
    AppError::Conflict(format!(
        "sweep {id} stopped renewing its lease for longer than the claim timeout and was taken over by another sweep, which finishes the job"
    ))
}

/// A deadlock, a serialization failure, or (PostgreSQL) a key's deletion
/// refused because a writer's slots now reference it.
fn retryable(e: &AppError) -> bool {
    matches!(e, AppError::Database(sqlx::Error::Database(db))
        if matches!(db.code().as_deref(), Some("40P01" | "40001" | "23503")))
}
