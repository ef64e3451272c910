//! Erasure: a subject's records in one carrier's scope lose that subject's
//! identifiers (records with no other subject go entirely), and the
//! subject's key in that scope is destroyed, so copies of the ciphertext in
//! old backups cannot be opened either. What a legal hold protects stays,
//! is reported, and is erased when the hold is released.

use std::collections::BTreeMap;

use base64::Engine;
use chrono::Utc;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::app::AppState;
use crate::audit::Event;
use crate::error::{AppError, Result};
use crate::ledger::transfers::erased_key_hash;
use crate::storage::erasure::{self as erase, Scope};
use crate::storage::requests::{self as store, RequestRow};
use crate::storage::transfers::ErasedKey;
use crate::storage::{from_micros, micros, Tx, TxLock};

/// Records handled per transaction.
const BATCH: i64 = 1000;

#[derive(Default, serde::Serialize, serde::Deserialize)]
struct Progress {
    deleted: BTreeMap<String, i64>,
    keys_destroyed: i64,
}

/// Erases what it can now, in batches; completes the request with a
/// signed receipt.
pub async fn perform(state: &AppState, r: &RequestRow) -> Result<()> {
    let mut progress: Progress = r
        .progress
        .as_deref()
        .and_then(|p| serde_json::from_str(p).ok())
        .unwrap_or_default();
    let mut claim = Claim::Request(super::held_claim(r)?);
    let mut tx = loop {
        erase_batches(
            state,
            r.id,
            &r.carrier_id,
            &r.subject_index,
            Scope::Subject,
            &mut progress,
            &mut claim,
        )
        .await?;
        let settled = settled(
            state,
            r.id,
            &r.carrier_id,
            &r.subject_index,
            Scope::Subject,
            &mut claim,
        );
        if let Some(tx) = settled.await? {
            break tx;
        }
    };
    // One instant for the receipt and the request, to the microsecond the
    // database keeps.
    let completed_at = from_micros(micros(Utc::now()));
    let held =
        erase::held_records(&mut tx, &r.carrier_id, &r.subject_index, Scope::Subject).await?;
    let keys_destroyed = erase::forget_subject(&mut tx, &r.carrier_id, &r.subject_index).await?;
    for k in &keys_destroyed {
        state.keys.forget(*k);
    }
    progress.keys_destroyed += keys_destroyed.len() as i64;
    let mut held_counts: BTreeMap<String, i64> = BTreeMap::new();
    let mut hold_ids: Vec<Uuid> = Vec::new();
    let mut counted = std::collections::HashSet::new();
    for (record, category, hold) in &held {
        // A record under two holds is one record kept.
        if counted.insert(*record) {
            *held_counts.entry(category.clone()).or_default() += 1;
        }
        hold_ids.push(*hold);
    }
    hold_ids.sort();
    hold_ids.dedup();
    let held_records: Vec<Uuid> = held
        .iter()
        .map(|(id, ..)| *id)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if !held_records.is_empty() {
        // The held records are erased when their holds are released, and
        // only they: what is recorded about the subject from now on is
        // sealed under a new key and is not this erasure's.
        store::add_pending_erasure(
            &mut tx,
            r.id,
            &r.carrier_id,
            &r.subject_index,
            &held_records,
        )
        .await?;
        erase::set_current_key_aside(&mut tx, &r.carrier_id, &r.subject_index).await?;
    }

    let target = json!({
        "request_id": r.id, "carrier_id": r.carrier_id, "subject_index": hex::encode(&r.subject_index),
        "deleted": progress.deleted, "held": held_counts, "hold_ids": hold_ids, "keys_destroyed": progress.keys_destroyed,
    });
    let appended = super::append_system(
        &mut tx,
        &Event::new("subject_request.erasure_completed", target),
    )
    .await?;
    let mut receipt = json!({
        "request_id": r.id,
        "carrier_id": r.carrier_id,
        "completed_at": completed_at,
        "deleted": progress.deleted,
        "held": held_counts,
        "hold_ids": hold_ids,
        "keys_destroyed": progress.keys_destroyed,
        "audit_seq": appended.seq,
        "audit_hash": hex::encode(appended.hash),
    });
    let (key_id, signature) = state.keys.sign(&receipt_digest(&receipt));
    receipt["key_id"] = json!(key_id);
    receipt["signature"] =
        json!(base64::engine::general_purpose::STANDARD.encode(signature.to_bytes()));
    // The identifier is not kept past an erasure: only its blind index.
    if !store::complete(
        &mut tx,
        r.id,
        claim.held(),
        micros(completed_at),
        Some(&receipt.to_string()),
        false,
    )
    .await?
    {
        return Err(super::claim_lost(r.id));
    }
    tx.commit().await?;
    Ok(())
}

/// The claim under which a processor erases: on a request it is
/// processing, or on a pending erasure (a completed request's records that
/// a hold kept) it is redoing. Each holds the `claimed_at` it last wrote.
#[derive(Clone, Copy)]
enum Claim {
    Request(i64),
    Pending(i64),
}

impl Claim {
    fn held(self) -> i64 {
        match self {
            Self::Request(at) | Self::Pending(at) => at,
        }
    }

    /// Renews the claim inside `tx`, before the transaction's long
    /// statements: until `tx` ends, the row lock keeps any other
    /// processor's claim waiting, and it then finds the claim fresh (or the
    /// work done). The renewed claim, to keep once `tx` commits (if it
    /// rolls back, the claim held is still `self`); an error if the claim
    /// was lost meanwhile.
    async fn renew(self, tx: &mut Tx, request: Uuid) -> Result<Self> {
        let now = micros(Utc::now());
        let (renewed, next) = match self {
            Self::Request(held) => (
                store::renew_claim(tx, request, held, now).await?,
                Self::Request(now),
            ),
            Self::Pending(held) => (
                store::renew_pending_erasure(tx, request, held, Some(now)).await?,
                Self::Pending(now),
            ),
        };
        if !renewed {
            return Err(super::claim_lost(request));
        }
        Ok(next)
    }
}

/// A transaction in which the holds cannot change and nothing of the
/// subject in `scope` is left unheld, to complete an erasure in, with the
/// claim renewed in it (so that however long the completion takes, no
/// other processor takes it over); `None` if a hold was released since the
/// last batch (its records are erased first).
async fn settled(
    state: &AppState,
    request: Uuid,
    carrier: &str,
    index: &[u8],
    scope: Scope,
    claim: &mut Claim,
) -> Result<Option<Tx>> {
    let mut tx = state.db.begin_probes().await?;
    erase::lock_subject(&mut tx, carrier, index).await?;
    // Renewed before the waits for the locks below.
    let renewed = claim.renew(&mut tx, request).await?;
    TxLock::Holds.take(&mut tx, true).await?;
    // After any export of the subject being completed: it is deleted here.
    TxLock::Exports.take(&mut tx, false).await?;
    // After any write already sealing under the subject's keys: its record
    // is seen below (and listed, if held), and later writes wait for the
    // completion and then seal under a new key.
    erase::lock_subject_keys(&mut tx, carrier, index).await?;
    if !erase::unheld_records(&mut tx, carrier, index, scope, 1)
        .await?
        .is_empty()
    {
        drop(tx); // rolled back: it changed nothing (the claim is as it was)
        return Ok(None);
    }
    // The caller commits or fails: either way it holds no older claim.
    *claim = renewed;
    Ok(Some(tx))
}

/// SHA-256 of the receipt without `key_id` and `signature`, serialized
/// compactly with keys in sorted order: the bytes its signature covers.
pub fn receipt_digest(receipt: &Value) -> [u8; 32] {
    let mut unsigned = receipt.clone();
    if let Value::Object(m) = &mut unsigned {
        m.remove("signature");
        m.remove("key_id");
    }
    // serde_json maps are ordered by key: this is the canonical form.
    Sha256::digest(serde_json::to_vec(&unsigned).expect("JSON")).into()
}

/// Erases the subject from its unheld records in `scope`, a batch per
/// transaction.
async fn erase_batches(
    state: &AppState,
    request: Uuid,
    carrier: &str,
    index: &[u8],
    scope: Scope,
    progress: &mut Progress,
    claim: &mut Claim,
) -> Result<()> {
    loop {
        // A batch lost in a crash (with its audit entry: they commit
        // together) is redone; the synchronous completing transaction
        // flushes every batch before the receipt exists.
        let mut tx = state.db.begin_relaxed().await?;
        // No other erasure of the subject picks these records meanwhile.
        erase::lock_subject(&mut tx, carrier, index).await?;
        // The claim is renewed first: no takeover during the batch.
        let renewed = claim.renew(&mut tx, request).await?;
        // Holds stay as they are until this batch commits.
        TxLock::Holds.take(&mut tx, true).await?;
        let records = erase::unheld_records(&mut tx, carrier, index, scope, BATCH).await?;
        if records.is_empty() {
            tx.commit().await?;
            *claim = renewed;
            return Ok(());
        }
        let ids: Vec<Uuid> = records.iter().map(|(id, _)| *id).collect();
        let gone = erase::remove_subject(&mut tx, carrier, &records, index).await?;
        let removed = gone.len();
        // A retry of an erased transfer is answered, not stored again.
        let keys: Vec<ErasedKey> = gone
            .into_iter()
            .filter_map(|d| {
                Some(ErasedKey {
                    carrier_id: carrier.to_string(),
                    key_hash: erased_key_hash(state, carrier, d.idempotency_key.as_deref()?),
                    transfer_id: d.id,
                    request_hash: d.request_hash,
                    recorded_at: d.recorded_at,
                    retain_until: d.retain_until,
                })
            })
            .collect();
        crate::storage::transfers::insert_erased_keys(&mut tx, &keys).await?;
        let mut batch: BTreeMap<String, i64> = BTreeMap::new();
        for (_, category) in &records {
            *batch.entry(category.clone()).or_default() += 1;
            *progress.deleted.entry(category.clone()).or_default() += 1;
        }
        store::set_progress(
            &mut tx,
            request,
            &serde_json::to_string(progress).expect("JSON"),
        )
        .await?;
        let target = json!({"request_id": request, "transfer_ids": ids, "records_deleted": removed, "by_category": batch});
        super::append_system(
            &mut tx,
            &Event::new("subject_request.erasure_batch", target),
        )
        .await?;
        tx.commit().await?;
        *claim = renewed;
    }
}

/// Erasures that holds kept from finishing: finish them for the records no
/// longer held, and note them done when nothing is held any more. Each is
/// redone by one instance at a time, under a lease like a request's claim;
/// one that fails gives its lease up and is retried at the next poll.
pub async fn redo_pending(state: &AppState) -> Result<()> {
    let config = &state.config;
    for pending in
        store::pending_erasures(&state.db, config.stale_before(micros(Utc::now()))).await?
    {
        let request = pending.request_id;
        let now = micros(Utc::now());
        if !store::claim_pending_erasure(&state.db, request, now, config.stale_before(now)).await? {
            continue; // another instance is on it
        }
        let mut claim = Claim::Pending(now);
        if let Err(e) = redo_one(state, &pending, &mut claim).await {
            tracing::error!(request = %request, error = %e, "redoing a pending erasure failed; it will be retried");
            let given_up = async {
                let mut tx = state.db.begin().await?;
                store::renew_pending_erasure(&mut tx, request, claim.held(), None).await?;
                tx.commit().await
            };
            if let Err(e) = given_up.await {
                tracing::error!(request = %request, error = %e, "cannot give up the lease on a pending erasure; another instance takes it after the claim timeout");
            }
        }
    }
    Ok(())
}

/// One pending erasure, under `claim` (a lease this processor holds): the
/// held records it found when it completed, and none recorded since.
async fn redo_one(
    state: &AppState,
    pending: &store::PendingErasure,
    claim: &mut Claim,
) -> Result<()> {
    let (request, carrier, index) = (
        pending.request_id,
        pending.carrier_id.as_str(),
        pending.subject_index.as_slice(),
    );
    let scope = Scope::Pending(request);
    let r = store::get(&state.db, request, None)
        .await?
        .ok_or_else(|| AppError::Integrity(format!("pending erasure {request} has no request")))?;
    let mut progress: Progress = r
        .progress
        .as_deref()
        .and_then(|p| serde_json::from_str(p).ok())
        .unwrap_or_default();
    let before = progress.deleted.values().sum::<i64>();
    let mut tx = loop {
        erase_batches(state, request, carrier, index, scope, &mut progress, claim).await?;
        if let Some(tx) = settled(state, request, carrier, index, scope, claim).await? {
            break tx;
        }
    };
    // A pending erasure of an earlier version did not set the subject's key
    // aside when it completed, and records since were sealed under it: it
    // is set aside now, once, so that what comes next gets a new key.
    if !pending.key_set_aside {
        erase::set_current_key_aside(&mut tx, carrier, index).await?;
        store::pending_key_set_aside(&mut tx, request).await?;
    }
    let still_held = erase::held_records(&mut tx, carrier, index, scope).await?;
    let after = progress.deleted.values().sum::<i64>();
    if after > before {
        // Exports prepared since the completion (an access request while
        // these records were held) hold copies of what was just erased.
        erase::discard_exports(&mut tx, carrier, index).await?;
    }
    let mut destroyed = Vec::new();
    if still_held.is_empty() {
        // The keys its records were sealed under (set aside at completion);
        // the consents were cleared then, and those made since are not
        // this erasure's.
        destroyed = erase::shred_subject_keys(&mut tx, carrier, index).await?;
        store::remove_pending_erasure(&mut tx, request).await?;
    } else {
        // Still held: free for whichever instance polls next.
        store::renew_pending_erasure(&mut tx, request, claim.held(), None).await?;
    }
    if after > before || !destroyed.is_empty() {
        let target = json!({"request_id": request, "records": after - before, "keys_destroyed": destroyed.len(), "finished": still_held.is_empty()});
        super::append_system(
            &mut tx,
            &Event::new("subject_request.erasure_released", target),
        )
        .await?;
    }
    tx.commit().await?;
    for k in destroyed {
        state.keys.forget(k);
    }
    Ok(())
}
