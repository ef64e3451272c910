//! Recording transfers and reading them back.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::app::AppState;
use crate::audit::{self, Event, Outcome};
use crate::auth::Principal;
use crate::crypto::{envelope, Key};
use crate::domain::consent::{ConsentKind, ConsentStatus};
use crate::domain::payload::Payload;
use crate::domain::transfer::NewTransfer;
use crate::domain::{Category, LegalBasis};
use crate::error::{AppError, Result, ResultExt};
use crate::storage::consents::ConsentRow;
use crate::storage::keys::{self, SubjectKeyRow};
use crate::storage::transfers::{self as store, NewLookup, NewRecord, NewSlot, TransferRow};
use crate::storage::{from_micros, micros, Tx};

/// The keyed hash reconciliation matches calls by: the same call id of the
/// same carrier gives the same key; without the key it reveals nothing.
pub fn call_key(state: &AppState, carrier: &str, call_id: &str) -> Vec<u8> {
    state
        .keys
        .blind()
        .of_str("call", &format!("{carrier}\u{0}{call_id}"))
}

/// The keyed hash an erased record's idempotency key is kept as (migration
/// 0020): the key is the carrier's own text, which may say anything.
pub fn erased_key_hash(state: &AppState, carrier: &str, key: &str) -> Vec<u8> {
    state
        .keys
        .blind()
        .of_str("idempotency", &format!("{carrier}\u{0}{key}"))
}

/// Blind indexes of one slot: the key's, and every identifier's.
struct SlotIndex {
    key: Vec<u8>,
    identifiers: Vec<Vec<u8>>,
}

/// Most transfers one batch may carry.
pub const MAX_BATCH: usize = 10_000;

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Recorded {
    pub id: Uuid,
    pub recorded_at: DateTime<Utc>,
    pub retain_until: DateTime<Utc>,
}

fn prefix(index: Option<usize>) -> String {
    index
        .map(|i| format!("transfers[{i}]: "))
        .unwrap_or_default()
}

/// Records transfers all or nothing, in one transaction. `batch` says whether
/// errors should carry item indexes.
pub async fn record(
    state: &AppState,
    who: &Principal,
    items: Vec<NewTransfer>,
    batch: bool,
) -> Result<Vec<Recorded>> {
    let idx = |i: usize| batch.then_some(i);

    // Authorization first: a caller learns nothing about data it may not write.
    for (i, t) in items.iter().enumerate() {
        let obj = format!("transfers/{}", t.direction);
        state
            .authorize_for(who, &t.carrier_id, &obj, "write")
            .map_err(|e| match e {
                AppError::Forbidden(m) => AppError::Forbidden(format!("{}{m}", prefix(idx(i)))),
                other => other,
            })?;
    }

    // A concurrent writer may take an idempotency key between our check and
    // our insert; the second attempt then finds and returns its record.
    let items = &items;
    let (tx, out) = with_retries(|| async move {
        let mut tx = state.db.begin().await?;
        let out = write(state, who, items, batch, &mut tx).await?;
        Ok((tx, out))
    })
    .await?;
    tx.commit().await?;
    for t in items {
        state
            .metrics
            .transfers_recorded
            .with_label_values(&[t.category.as_str()])
            .inc();
    }
    Ok(out)
}

/// Runs `attempt` up to three times while it fails with one of the
/// [`RETRIES`] markers or a transient database error (each attempt is a
/// transaction of its own); once they are spent, a marker becomes its
/// message for the caller.
pub(crate) async fn with_retries<T, F, Fut>(mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut n = 0;
    loop {
        n += 1;
        match attempt().await {
            Err(e) if is_transient(&e) && n < 3 => {
                tracing::warn!(
                    attempt = n,
                    "transient database conflict; retrying the transaction"
                );
            }
            Err(AppError::Conflict(m)) => match gave_up(&m) {
                Some(_) if n < 3 => {}
                Some(gave_up) => return Err(AppError::Conflict(gave_up.into())),
                None => return Err(AppError::Conflict(m)),
            },
            done => return done,
        }
    }
}

/// A concurrent writer took an idempotency key between our check and our insert.
const RETRY: &str = "\u{0}retry";
/// Another writer took a data key past its nonce budget between our check
/// and our count, or an erasure moved the key aside for held records; the
/// retry sees the count or the move and uses a new key.
pub(crate) const BUDGET_RACE: &str = "\u{0}budget";
/// A data key the write sealed under was destroyed by a concurrent erasure
/// or sweep before the write's slots referenced it.
const KEY_GONE: &str = "\u{0}key-gone";

/// Conflicts `write` signals with a marker: the transaction reruns, and
/// after the last attempt the caller gets the message beside the marker.
const RETRIES: [(&str, &str); 3] = [
    (
        RETRY,
        "concurrent writes with the same idempotency key; retry",
    ),
    (
        BUDGET_RACE,
        "concurrent writes or erasures kept spending or setting aside the same data keys; retry",
    ),
    (
        KEY_GONE,
        "a subject's data key kept being destroyed (erasure or retention sweep) while this \
         write sealed under it; retry",
    ),
];

/// A foreign-key violation on a row that references a data key: the key,
/// read unlocked, was destroyed since (on PostgreSQL a concurrent erasure
/// or sweep can do that); the retry resolves the subject's key afresh.
pub(crate) fn key_gone(e: sqlx::Error) -> AppError {
    match e {
        sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
            AppError::Conflict(KEY_GONE.into())
        }
        other => other.into(),
    }
}

/// If `m` is a retry marker, the message for the caller once the retries
/// are spent.
fn gave_up(m: &str) -> Option<&'static str> {
    RETRIES
        .iter()
        .find(|(marker, _)| *marker == m)
        .map(|(_, message)| *message)
}

/// A deadlock or serialization failure: the transaction can simply rerun.
fn is_transient(e: &AppError) -> bool {
    matches!(e, AppError::Database(sqlx::Error::Database(db)) if matches!(db.code().as_deref(), Some("40P01" | "40001")))
}

async fn write(
    state: &AppState,
    who: &Principal,
    items: &[NewTransfer],
    batch: bool,
    tx: &mut Tx,
) -> Result<Vec<Recorded>> {
    let idx = |i: usize| batch.then_some(i);
    let now = Utc::now();
    let mut results: Vec<Option<Recorded>> = vec![None; items.len()];
    // Keyed, so a stolen database cannot confirm a guessed transfer.
    let hashes: Vec<Vec<u8>> = items
        .iter()
        .map(|t| state.keys.blind().of_str("request", &t.canonical))
        .collect();

    // Idempotency: earlier results for these keys, and repeats within the
    // batch. Errors name a key as they name a field: free text typed as
    // one (a phone number, say) is not echoed.
    use crate::domain::fields::unknown_name;
    let mut by_carrier: HashMap<&str, Vec<&str>> = HashMap::new();
    for t in items {
        if let Some(k) = &t.idempotency_key {
            by_carrier.entry(t.carrier_id.as_str()).or_default().push(k);
        }
    }
    let mut existing = HashMap::new();
    for (carrier, keys) in &by_carrier {
        for row in store::by_idempotency_keys(tx, carrier, keys).await? {
            existing.insert((carrier.to_string(), row.idempotency_key.clone()), row);
        }
        // Keys of records erased since: their retry is answered as the
        // first request was, and the erased data is not stored again.
        let mut erased: HashMap<Vec<u8>, &str> = keys
            .iter()
            .filter(|k| !existing.contains_key(&(carrier.to_string(), k.to_string())))
            .map(|k| (erased_key_hash(state, carrier, k), *k))
            .collect();
        if erased.is_empty() {
            continue;
        }
        let hashes: Vec<Vec<u8>> = erased.keys().cloned().collect();
        for row in store::erased_keys(tx, carrier, &hashes).await? {
            if let Some(k) = erased.remove(&row.key_hash) {
                existing.insert(
                    (carrier.to_string(), k.to_string()),
                    store::IdempotentRow {
                        id: row.transfer_id,
                        idempotency_key: k.to_string(),
                        request_hash: row.request_hash,
                        recorded_at: row.recorded_at,
                        retain_until: row.retain_until,
                    },
                );
            }
        }
    }
    let mut first_in_batch: HashMap<(String, String), usize> = HashMap::new();
    let mut conflicts = Vec::new();
    for (i, t) in items.iter().enumerate() {
        let Some(k) = &t.idempotency_key else {
            continue;
        };
        let key = (t.carrier_id.to_string(), k.clone());
        if let Some(row) = existing.get(&key) {
            if row.request_hash.as_deref() != Some(hashes[i].as_slice()) {
                conflicts.push(format!(
                    "{}idempotency_key {:?} was already used for a different transfer",
                    prefix(idx(i)),
                    unknown_name(k)
                ));
            }
            results[i] = Some(Recorded {
                id: row.id,
                recorded_at: from_micros(row.recorded_at),
                retain_until: from_micros(row.retain_until),
            });
        } else if let Some(&j) = first_in_batch.get(&key) {
            if hashes[j] != hashes[i] {
                conflicts.push(format!(
                    "{}idempotency_key {:?} repeats item {j} with a different transfer",
                    prefix(idx(i)),
                    unknown_name(k)
                ));
            }
        } else {
            first_in_batch.insert(key, i);
        }
    }
    if !conflicts.is_empty() {
        return Err(AppError::Conflict(conflicts.join("; ")));
    }

    // Everything still to write, deduplicated within the batch.
    let fresh: Vec<usize> = (0..items.len())
        .filter(|&i| results[i].is_none())
        .filter(|&i| match &items[i].idempotency_key {
            Some(k) => {
                first_in_batch.get(&(items[i].carrier_id.to_string(), k.clone())) == Some(&i)
            }
            None => true,
        })
        .collect();

    // Subject keys, per carrier: existing ones in one query, new ones in one insert.
    let blind = state.keys.blind();
    let mut slot_index: Vec<Vec<SlotIndex>> = Vec::with_capacity(items.len());
    for t in items {
        slot_index.push(
            t.payload
                .slots
                .iter()
                .map(|s| SlotIndex {
                    key: blind.of(&s.key),
                    identifiers: s.identifiers.iter().map(|id| blind.of(id)).collect(),
                })
                .collect(),
        );
    }
    // The consent each fresh transfer relies on: the one it names, or, for
    // a number assignment that names none, its customer tenant's.
    let consent_of = check_consents(tx, items, &fresh, &slot_index, batch).await?;

    // Carriers, and keys within each, in one global order: concurrent
    // batches then lock subject-key rows in the same order and cannot deadlock.
    let mut wanted: std::collections::BTreeMap<&str, Vec<Vec<u8>>> =
        std::collections::BTreeMap::new();
    for &i in &fresh {
        for SlotIndex { key: key_index, .. } in &slot_index[i] {
            wanted
                .entry(items[i].carrier_id.as_str())
                .or_default()
                .push(key_index.clone());
        }
    }
    let mut subject_keys: HashMap<(String, Vec<u8>), (Uuid, Key)> = HashMap::new();
    let mut seals: Vec<(Uuid, i64)> = Vec::new();
    for (carrier, indexes) in wanted {
        let resolved = resolve_subject_keys(state, tx, carrier, indexes).await?;
        seals.extend(resolved.seals);
        for (bi, key) in resolved.keys {
            subject_keys.insert((carrier.to_string(), bi), key);
        }
    }

    let mut records = Vec::with_capacity(fresh.len());
    let mut slots = Vec::with_capacity(fresh.len() * 2);
    let mut lookups = Vec::with_capacity(fresh.len() * 2);
    for &i in &fresh {
        let t = &items[i];
        let id = Uuid::now_v7();
        let carrier = t.carrier_id.to_string();
        let mut to_seal = Vec::with_capacity(t.payload.slots.len());
        for (
            slot,
            SlotIndex {
                key: key_index,
                identifiers,
            },
        ) in t.payload.slots.iter().zip(&slot_index[i])
        {
            let (key_id, key) = subject_keys
                .get(&(carrier.clone(), key_index.clone()))
                .expect("resolved above");
            to_seal.push((slot.name, *key_id, key, &slot.fields));
            for bi in identifiers {
                lookups.push(NewLookup {
                    blind_index: bi.clone(),
                    occurred_at: micros(t.occurred_at),
                    transfer_id: id,
                });
            }
        }
        let call_key = t
            .payload
            .call_id()
            .map(|c| call_key(state, t.carrier_id.as_str(), c));
        let duration_seconds = match t.category {
            Category::CallDetailRecord | Category::CallDuration => t
                .payload
                .body
                .get("duration_seconds")
                .and_then(Value::as_i64),
            _ => None,
        };
        let consent_reference = consent_of.get(&i).cloned();
        let binding = envelope::Binding {
            version: envelope::BODY_AAD_VERSION,
            transfer_id: id,
            carrier_id: &carrier,
            category: t.category.as_str(),
            direction: t.direction.as_str(),
            occurred_at: micros(t.occurred_at),
            retain_until: micros(t.retain_until),
            purpose: t.purpose.as_str(),
            legal_basis: t.legal_basis.as_str(),
            jurisdiction: t.jurisdiction.as_str(),
            consent_reference: consent_reference.as_deref(),
            recorded_at: micros(now),
            recorded_by: &who.sub,
            call_key: call_key.as_deref(),
            duration_seconds,
        };
        let (body, sealed_slots) = envelope::seal_record(&binding, &t.payload.body, &to_seal);
        slots.extend(sealed_slots.into_iter().map(|s| NewSlot {
            transfer_id: id,
            slot: s.name,
            subject_key_id: s.subject_key_id,
            sealed: s.sealed,
        }));
        records.push(NewRecord {
            id,
            carrier_id: carrier,
            direction: t.direction.as_str(),
            category: t.category.as_str(),
            purpose: t.purpose.as_str(),
            legal_basis: t.legal_basis.as_str(),
            jurisdiction: t.jurisdiction.to_string(),
            consent_reference,
            occurred_at: micros(t.occurred_at),
            recorded_at: micros(now),
            retain_until: micros(t.retain_until),
            recorded_by: who.sub.clone(),
            idempotency_key: t.idempotency_key.clone(),
            request_hash: hashes[i].clone(),
            body,
            call_key,
            duration_seconds,
        });
        results[i] = Some(Recorded {
            id,
            recorded_at: from_micros(micros(now)),
            retain_until: from_micros(micros(t.retain_until)),
        });
    }

    store::insert_records(tx, &records)
        .await
        .on_constraint("transfers_idempotency|transfers.idempotency_key", || {
            AppError::Conflict(RETRY.into())
        })?;
    // Keys are read, not locked, before the batch seals under them.
    // (The slots' only foreign key is their data key's: their record is
    // written by this transaction.)
    store::insert_slots(tx, &slots).await.map_err(key_gone)?;
    store::insert_lookups(tx, &lookups).await?;

    // Every data key counts its encryptions (the nonce budget), in the
    // transaction that makes them. Last, so that the row locks last only
    // until the commit that follows: concurrent batches sharing subjects
    // then wait for each other's commit, not for each other's whole batch.
    let over = keys::add_seals(tx, &mut seals, state.config.data_key_max_seals).await?;
    if !over.is_empty() {
        tracing::info!(keys = ?over, "a concurrent write spent these data keys' nonce budget, or an erasure set them aside; retrying");
        return Err(AppError::Conflict(BUDGET_RACE.into()));
    }

    // Repeats within the batch share their first occurrence's result.
    for i in 0..items.len() {
        if results[i].is_none() {
            let k = items[i]
                .idempotency_key
                .clone()
                .expect("only keyed repeats are left");
            let j = first_in_batch[&(items[i].carrier_id.to_string(), k)];
            results[i] = results[j].clone();
        }
    }
    let results: Vec<Recorded> = results
        .into_iter()
        .map(|r| r.expect("every item resolved"))
        .collect();

    // The audit entry commits with the records, or neither does.
    let mut carriers: Vec<&str> = items.iter().map(|t| t.carrier_id.as_str()).collect();
    carriers.sort_unstable();
    carriers.dedup();
    let event = Event::new(
        if batch {
            "transfer.record_batch"
        } else {
            "transfer.record"
        },
        json!({
            "transfer_ids": results.iter().map(|r| r.id).collect::<Vec<_>>(),
            "carriers": carriers,
            "stored": fresh.len(),
        }),
    );
    let timer = state.metrics.audit_append.start_timer();
    audit::append(tx, Some(who), &event).await?;
    timer.observe_duration();
    Ok(results)
}

/// Subject keys resolved for a write.
pub(crate) struct Resolved {
    /// By blind index: the key's id and the key.
    pub keys: HashMap<Vec<u8>, (Uuid, Key)>,
    /// `(key id, encryptions this write makes with it)`, for `keys::add_seals`.
    pub seals: Vec<(Uuid, i64)>,
}

/// The subject keys of `carrier` for the given blind indexes, creating the
/// missing ones: existing keys in one query, new ones in one insert. An
/// index listed n times is sealed under n times. A key whose nonce budget
/// this write would exceed is replaced by a fresh one (the old one keeps
/// decrypting what it sealed).
pub(crate) async fn resolve_subject_keys(
    state: &AppState,
    tx: &mut Tx,
    carrier: &str,
    mut indexes: Vec<Vec<u8>>,
) -> Result<Resolved> {
    indexes.sort();
    let mut uses: Vec<(Vec<u8>, i64)> = Vec::with_capacity(indexes.len());
    for bi in indexes {
        match uses.last_mut() {
            Some((last, n)) if *last == bi => *n += 1,
            _ => uses.push((bi, 1)),
        }
    }
    let indexes: Vec<Vec<u8>> = uses.iter().map(|(bi, _)| bi.clone()).collect();
    let uses: HashMap<Vec<u8>, i64> = uses.into_iter().collect();
    let existing = keys::subject_keys_by_index(tx, carrier, &indexes).await?;
    state
        .keys
        .ensure(&state.db, existing.iter().map(|r| r.master_version))
        .await?;
    let unwrap = |row: &SubjectKeyRow| {
        state
            .keys
            .subject_key(row)
            .map_err(|e| AppError::Integrity(format!("subject key {}: {e}", row.id)))
    };
    let limit = state.config.data_key_max_seals;
    let mut out = HashMap::with_capacity(indexes.len());
    for row in existing {
        if row.seals + uses[&row.blind_index] > limit {
            tracing::info!(key = %row.id, seals = row.seals, "data key's nonce budget spent; replacing it");
            keys::replace_subject_key(tx, &row).await?;
            continue;
        }
        let key = unwrap(&row)?;
        out.insert(row.blind_index, (row.id, key));
    }
    let missing: Vec<Vec<u8>> = indexes
        .into_iter()
        .filter(|bi| !out.contains_key(bi))
        .collect();
    if !missing.is_empty() {
        let version = keys::current_master(tx).await?;
        state.keys.ensure(&state.db, [version]).await?;
        let mut created: HashMap<Uuid, Key> = HashMap::with_capacity(missing.len());
        let mut rows = Vec::with_capacity(missing.len());
        for bi in missing {
            let (row, key) = state
                .keys
                .new_subject_key(carrier, bi, version)
                .map_err(|e| AppError::Integrity(format!("master key v{version}: {e}")))?;
            created.insert(row.id, key);
            rows.push(row);
        }
        keys::insert_subject_keys(tx, &rows, micros(Utc::now())).await?;
        // Keys a concurrent writer created first win; use theirs.
        let indexes: Vec<Vec<u8>> = rows.into_iter().map(|r| r.blind_index).collect();
        let winners = keys::subject_keys_by_index(tx, carrier, &indexes).await?;
        state
            .keys
            .ensure(&state.db, winners.iter().map(|r| r.master_version))
            .await?;
        for row in winners {
            let key = match created.remove(&row.id) {
                Some(k) => k,
                None => unwrap(&row)?,
            };
            out.insert(row.blind_index, (row.id, key));
        }
    }
    let seals = out.iter().map(|(bi, (id, _))| (*id, uses[bi])).collect();
    Ok(Resolved { keys: out, seals })
}

/// Checks every consent the fresh transfers rely on; refuses with 409 naming
/// each consent that is missing, not active, or does not cover the transfer.
/// A number assignment that names no consent relies on its customer
/// tenant's authorization of the carrier: the first of the tenant's
/// customer-operator consents (by reference) that covers it, or 409 saying
/// why none does. Returns, by item, the reference each relies on.
async fn check_consents(
    tx: &mut Tx,
    items: &[NewTransfer],
    fresh: &[usize],
    slot_index: &[Vec<SlotIndex>],
    batch: bool,
) -> Result<HashMap<usize, String>> {
    let mut consent_of = HashMap::new();
    let mut problems = Vec::new();
    let mut refs: Vec<&str> = fresh
        .iter()
        .filter_map(|&i| items[i].consent.as_ref().map(|c| c.reference.as_str()))
        .collect();
    refs.sort_unstable();
    refs.dedup();
    let rows: HashMap<(String, String), ConsentRow> = if refs.is_empty() {
        HashMap::new()
    } else {
        crate::storage::consents::get_many(tx, &refs)
            .await?
            .into_iter()
            .map(|r| ((r.carrier_id.clone(), r.reference.clone()), r))
            .collect()
    };
    let mut of_tenant: HashMap<(String, String), Vec<ConsentRow>> = HashMap::new();
    for &i in fresh {
        let t = &items[i];
        let at = prefix(batch.then_some(i));
        if let Some(c) = &t.consent {
            let row = rows.get(&(t.carrier_id.to_string(), c.reference.clone()));
            match consent_covers(t, row, &slot_index[i]) {
                Ok(()) => {
                    consent_of.insert(i, c.reference.clone());
                }
                Err(m) => problems.push(format!("{at}consent {:?} {m}", c.reference)),
            }
            continue;
        }
        if t.category != Category::NumberAssignment {
            continue;
        }
        let tenant = t
            .payload
            .body
            .get("customer_tenant_id")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let key = (t.carrier_id.to_string(), tenant.to_string());
        if !of_tenant.contains_key(&key) {
            let found = crate::storage::consents::of_tenant(tx, &key.0, &key.1).await?;
            of_tenant.insert(key.clone(), found);
        }
        let candidates = &of_tenant[&key];
        let mut why = Vec::new();
        for row in candidates {
            match consent_covers(t, Some(row), &slot_index[i]) {
                Ok(()) => {
                    consent_of.insert(i, row.reference.clone());
                    break;
                }
                Err(m) => why.push(format!("consent {:?} {m}", row.reference)),
            }
        }
        if consent_of.contains_key(&i) {
            continue;
        }
        problems.push(if candidates.is_empty() {
            format!(
                "{at}customer tenant {tenant:?} has no customer_operator consent for carrier {}; register one, or name one in consent.reference",
                t.carrier_id
            )
        } else {
            format!(
                "{at}no consent of customer tenant {tenant:?} for carrier {} covers this transfer: {}",
                t.carrier_id,
                why.join(", ")
            )
        });
    }
    if problems.is_empty() {
        Ok(consent_of)
    } else {
        Err(AppError::Conflict(problems.join("; ")))
    }
}

fn consent_covers(
    t: &NewTransfer,
    row: Option<&ConsentRow>,
    slot_index: &[SlotIndex],
) -> Result<(), String> {
    let Some(row) = row else {
        return Err(format!("does not exist for carrier {}", t.carrier_id));
    };
    if row.status != ConsentStatus::Active.as_str() {
        return Err(format!("is {}, not active", row.status));
    }
    if !row
        .countries
        .split(',')
        .any(|c| c == t.jurisdiction.as_str())
    {
        return Err(format!("does not cover jurisdiction {}", t.jurisdiction));
    }
    if row.granted_at > micros(t.occurred_at) {
        return Err("was granted after the transfer occurred".into());
    }
    let kind: ConsentKind = row
        .kind
        .parse()
        .map_err(|_| "has an unknown kind".to_string())?;
    match (t.category, t.legal_basis, kind) {
        (Category::NumberAssignment, _, ConsentKind::CustomerOperator) => {
            let tenant = t.payload.body.get("customer_tenant_id").and_then(Value::as_str);
            if row.customer_tenant_id.as_deref() != tenant {
                return Err("is not the consent of this transfer's customer tenant".into());
            }
        }
        (Category::NumberAssignment, _, ConsentKind::DataSubject) => {
            return Err("is a data_subject consent; number_assignment needs the customer tenant's customer_operator consent".into())
        }
        (_, LegalBasis::Consent, ConsentKind::CustomerOperator) => {
            return Err("is a customer_operator consent; legal_basis consent needs a data_subject consent".into())
        }
        (_, _, ConsentKind::DataSubject) => {
            let subject = row.subject_index.as_deref();
            let covers = slot_index.iter().any(|s| s.identifiers.iter().any(|bi| Some(bi.as_slice()) == subject));
            if !covers {
                return Err("is not the consent of a data subject of this transfer".into());
            }
        }
        (_, _, ConsentKind::CustomerOperator) => {}
    }
    Ok(())
}

/// A record as read back: metadata, and the payload when decrypted.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TransferView {
    pub id: Uuid,
    pub carrier_id: String,
    pub direction: String,
    pub category: String,
    pub purpose: String,
    pub legal_basis: String,
    pub jurisdiction: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consent_reference: Option<String>,
    pub occurred_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
    pub retain_until: DateTime<Utc>,
    pub recorded_by: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
}

impl From<TransferRow> for TransferView {
    fn from(r: TransferRow) -> Self {
        Self {
            id: r.id,
            carrier_id: r.carrier_id,
            direction: r.direction,
            category: r.category,
            purpose: r.purpose,
            legal_basis: r.legal_basis,
            jurisdiction: r.jurisdiction,
            consent_reference: r.consent_reference,
            occurred_at: from_micros(r.occurred_at),
            recorded_at: from_micros(r.recorded_at),
            retain_until: from_micros(r.retain_until),
            recorded_by: r.recorded_by,
            payload: None,
        }
    }
}

/// Decrypts the payloads of `views` in place. Any ciphertext that fails
/// authentication fails the whole call: never wrong or partial data.
pub async fn decrypt(state: &AppState, views: &mut [TransferView]) -> Result<()> {
    let result = decrypt_all(state, views).await;
    if let Err(AppError::Integrity(_)) = &result {
        state
            .metrics
            .integrity_failures
            .with_label_values(&["transfer"])
            .inc();
    }
    result
}

async fn decrypt_all(state: &AppState, views: &mut [TransferView]) -> Result<()> {
    if views.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = views.iter().map(|v| v.id).collect();
    let (bodies, slots) = store::sealed(&state.db, &ids).await?;
    // Another instance may have rotated the master key since this one last
    // read the keyring.
    state
        .keys
        .ensure(&state.db, slots.iter().map(|s| s.master_version))
        .await?;
    let bodies: HashMap<Uuid, _> = bodies.into_iter().map(|b| (b.id, b)).collect();
    let mut by_record: HashMap<Uuid, Vec<_>> = HashMap::new();
    for s in slots {
        by_record.entry(s.transfer_id).or_default().push(s);
    }
    for v in views.iter_mut() {
        let integrity = |what: &str, e: crate::crypto::IntegrityError| {
            AppError::Integrity(format!("record {} {what}: {e}", v.id))
        };
        let category: Category = v
            .category
            .parse()
            .map_err(|_| AppError::Integrity(format!("record {} category", v.id)))?;
        let mut cek = None;
        let mut opened = Vec::new();
        for s in by_record.remove(&v.id).unwrap_or_default() {
            let key = state
                .keys
                .unwrap_subject(
                    s.subject_key_id,
                    &s.carrier_id,
                    s.master_version,
                    &s.wrapped_key,
                )
                .map_err(|e| integrity("subject key", e))?;
            let (k, fields) = envelope::open_slot(v.id, &s.slot, s.subject_key_id, &key, &s.sealed)
                .map_err(|e| integrity("slot", e))?;
            if cek
                .as_ref()
                .is_some_and(|c: &crate::crypto::RawKey| **c != *k)
            {
                return Err(integrity(
                    "slots",
                    crate::crypto::IntegrityError("slots disagree on the content key"),
                ));
            }
            cek = Some(k);
            opened.push((s.slot, fields));
        }
        // No slot left means every subject of the record was erased.
        let Some(cek) = cek else {
            v.payload = Some(Value::Null);
            continue;
        };
        let sealed = bodies
            .get(&v.id)
            .ok_or_else(|| AppError::Integrity(format!("record {} has no body", v.id)))?;
        let binding = envelope::Binding {
            version: sealed.aad_version,
            transfer_id: v.id,
            carrier_id: &v.carrier_id,
            category: &v.category,
            direction: &v.direction,
            occurred_at: micros(v.occurred_at),
            retain_until: micros(v.retain_until),
            purpose: &v.purpose,
            legal_basis: &v.legal_basis,
            jurisdiction: &v.jurisdiction,
            consent_reference: v.consent_reference.as_deref(),
            recorded_at: micros(v.recorded_at),
            recorded_by: &v.recorded_by,
            call_key: sealed.call_key.as_deref(),
            duration_seconds: sealed.duration_seconds,
        };
        let body: Map<String, Value> =
            envelope::open_body(&binding, &cek, &sealed.body).map_err(|e| integrity("body", e))?;
        v.payload = Some(Payload::assemble(category, body, opened));
    }
    Ok(())
}

/// One record with its decrypted payload. The read is audited, found or
/// not, before anything is returned.
pub async fn get(
    state: &AppState,
    who: &Principal,
    id: Uuid,
    reason: Option<&str>,
) -> Result<TransferView> {
    let event = |outcome| {
        Event::new(
            "transfer.read",
            json!({"transfer_id": id, "decrypted": true}),
        )
        .outcome(outcome)
        .reason(reason)
    };
    let Some(row) = store::get(&state.db, id, who.scope()).await? else {
        audit::record(state, Some(who), event(Outcome::NotFound)).await?;
        return Err(AppError::NotFound(format!("no transfer {id}")));
    };
    let mut views = [TransferView::from(row)];
    decrypt(state, &mut views).await?;
    audit::record(state, Some(who), event(Outcome::Success)).await?;
    let [v] = views;
    Ok(v)
}
