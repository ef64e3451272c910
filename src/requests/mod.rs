//! Data-subject requests: access (GDPR Art. 15/20) and erasure (Art. 17).
//!
//! A request is recorded and answered `202`; a background processor
//! (notified at once, and polling for requests a dead process left behind)
//! prepares the signed export or performs the erasure. Work is resumable:
//! a half-written export is discarded and rebuilt; erasure proceeds in
//! batches that each commit whole.

pub mod erasure;
pub mod export;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Months, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::app::AppState;
use crate::audit::{self, Event, Outcome};
use crate::auth::Principal;
use crate::domain::consent::parse_subject;
use crate::domain::fields::{Errors, Obj};
use crate::domain::{CarrierId, SubjectId};
use crate::error::{AppError, Result};
use crate::storage::requests::{self as store, RequestRow};
use crate::storage::{encode_cursor, from_micros, micros, next_page, Tx};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RequestView {
    pub id: Uuid,
    pub kind: String,
    pub carrier_id: String,
    pub status: String,
    pub language: String,
    pub received_at: DateTime<Utc>,
    pub due_at: DateTime<Utc>,
    pub overdue: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extended_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extension_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<DateTime<Utc>>,
    /// The signed erasure receipt, once an erasure is completed.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub receipt: Option<Value>,
    /// While the request is not completed: its failed processing attempts
    /// (each is retried after the claim timeout), the last one described.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processing_failures: Option<ProcessingFailures>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProcessingFailures {
    pub count: i64,
    pub last_at: DateTime<Utc>,
    /// What went wrong, without personal data; the detail is in the
    /// service's log.
    pub last: String,
}

impl From<RequestRow> for RequestView {
    fn from(r: RequestRow) -> Self {
        let due = from_micros(r.due_at);
        let processing_failures = match (r.status.as_str(), &r.last_failure, r.last_failure_at) {
            ("completed", ..) => None,
            (_, Some(last), Some(at)) => Some(ProcessingFailures {
                count: r.failures,
                last_at: from_micros(at),
                last: last.clone(),
            }),
            _ => None,
        };
        Self {
            overdue: r.status != "completed" && Utc::now() > due,
            id: r.id,
            kind: r.kind,
            carrier_id: r.carrier_id,
            status: r.status,
            language: r.language,
            received_at: from_micros(r.received_at),
            due_at: due,
            extended_at: r.extended_at.map(from_micros),
            extension_reason: r.extension_reason,
            completed_at: r.completed_at.map(from_micros),
            receipt: r.receipt.and_then(|s| serde_json::from_str(&s).ok()),
            processing_failures,
        }
    }
}

pub(crate) fn subject_aad(id: Uuid) -> String {
    format!("tl/request-subject/{id}")
}

/// Records a request and wakes the processor.
pub async fn create(
    state: &AppState,
    who: &Principal,
    body: &Value,
    accept_language: Option<&str>,
) -> Result<RequestView> {
    state.authorize_any(who, &["subject_requests"], "write")?;
    let mut errs = Errors::default();
    let parsed = Obj::new(body, "", &mut errs).map(|o| {
        o.deny_unknown(&["kind", "carrier_id", "subject", "language"], &mut errs);
        let kind = o.str("kind", true, &mut errs).and_then(|k| match k {
            "access" | "erasure" => Some(k.to_string()),
            _ => {
                errs.add("kind", "must be one of: access, erasure");
                None
            }
        });
        let carrier = o.str("carrier_id", true, &mut errs).and_then(|s| {
            CarrierId::parse(s)
                .map_err(|e| errs.add("carrier_id", e))
                .ok()
        });
        let subject = parse_subject(&o, "subject", &mut errs);
        let language = o.str("language", false, &mut errs).and_then(|l| {
            let ok = !l.is_empty()
                && l.len() <= 35
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !ok {
                errs.add("language", "must be a language tag such as en, fr or pt-BR");
            }
            ok.then(|| l.to_string())
        });
        (kind, carrier, subject, language)
    });
    let Some((Some(kind), Some(carrier), Some(subject), language)) =
        parsed.filter(|_| errs.is_empty())
    else {
        return Err(AppError::Validation(errs.0));
    };
    state.authorize_for(who, &carrier, "subject_requests", "write")?;
    let language =
        crate::i18n::negotiate(language.as_deref().or(accept_language).unwrap_or("en")).to_string();

    let now = Utc::now();
    let id = Uuid::now_v7();
    let mut tx = state.db.begin().await?;
    let master = crate::storage::keys::current_master(&mut tx).await?;
    state.keys.ensure(&state.db, [master]).await?;
    let sealed = state
        .keys
        .seal_with_master(
            master,
            &subject_aad(id),
            subject_json(&subject).to_string().as_bytes(),
        )
        .map_err(|e| AppError::Integrity(format!("request {id}: {e}")))?;
    let row = RequestRow {
        id,
        kind,
        carrier_id: carrier.to_string(),
        subject_index: state.keys.blind().of(&subject),
        subject_sealed: Some(sealed),
        subject_master: Some(master),
        language,
        status: "received".into(),
        received_at: micros(now),
        // GDPR Art. 12(3): one month after receipt.
        due_at: micros(now.checked_add_months(Months::new(1)).expect("in range")),
        extended_at: None,
        extension_reason: None,
        completed_at: None,
        requested_by: who.sub.clone(),
        claimed_at: None,
        progress: None,
        receipt: None,
        failures: 0,
        last_failure: None,
        last_failure_at: None,
    };
    store::insert(&mut tx, &row).await?;
    let target = json!({"request_id": id, "kind": row.kind, "carrier_id": row.carrier_id, "subject_index": hex::encode(&row.subject_index)});
    audit::append(
        &mut tx,
        Some(who),
        &Event::new("subject_request.create", target),
    )
    .await?;
    tx.commit().await?;
    state.requests_ready.notify_one();
    Ok(row.into())
}

pub fn subject_json(s: &SubjectId) -> Value {
    match s {
        SubjectId::Phone(p) => json!({"phone_number": p.as_str()}),
        SubjectId::Sip(u) => json!({"sip_uri": u.as_str()}),
    }
}

/// The request's subject, while the request still keeps it.
pub async fn open_subject(state: &AppState, r: &RequestRow) -> Result<Option<SubjectId>> {
    let (Some(sealed), Some(master)) = (&r.subject_sealed, r.subject_master) else {
        return Ok(None);
    };
    state.keys.ensure(&state.db, [master]).await?;
    let pt = state
        .keys
        .open_with_master(master, &subject_aad(r.id), sealed)
        .map_err(|e| AppError::Integrity(format!("request {} subject: {e}", r.id)))?;
    let v: Value = serde_json::from_slice(&pt)
        .map_err(|_| AppError::Integrity("request subject is not JSON".into()))?;
    let s = v
        .get("phone_number")
        .or_else(|| v.get("sip_uri"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    SubjectId::parse(s)
        .map(Some)
        .map_err(|_| AppError::Integrity("request subject does not parse".into()))
}

/// The request `id` as `who` may see it. A well-formed id it may not see
/// (missing, or another carrier's) is audited as `not_found` under
/// `action`, like a miss on a transfer: probing for another carrier's ids
/// leaves a trace.
async fn find(
    state: &AppState,
    who: &Principal,
    id: &str,
    action: &'static str,
) -> Result<RequestRow> {
    let uuid = Uuid::parse_str(id).map_err(|_| not_a_request_id())?;
    match store::get(&state.db, uuid, who.scope()).await? {
        Some(row) => Ok(row),
        None => {
            audit_not_found(state, who, action, id).await?;
            Err(AppError::NotFound(format!("no subject request {uuid}")))
        }
    }
}

/// A path segment that is no request id: not echoed, since it may be
/// anything, a phone number included.
pub(crate) fn not_a_request_id() -> AppError {
    AppError::NotFound("no subject request with that id (ids are UUIDs)".into())
}

/// Longest `Prefer: wait` honoured, below the request timeout.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// One request; with `wait`, the answer waits until the request is
/// completed or `wait` has passed (RFC 7240 `Prefer: wait`), so a client
/// need not poll. Completions on this instance wake the wait at once; those
/// on another instance are seen within 100 ms.
pub async fn get(
    state: &AppState,
    who: &Principal,
    id: &str,
    wait: Option<Duration>,
) -> Result<RequestView> {
    state.authorize(who, "subject_requests", "read")?;
    let deadline = tokio::time::Instant::now() + wait.unwrap_or_default().min(MAX_WAIT);
    let row = loop {
        // Registered before the read, so a completion in between is not missed.
        let done = state.requests_done.notified();
        tokio::pin!(done);
        done.as_mut().enable();
        let row = find(state, who, id, "subject_request.read").await?;
        let now = tokio::time::Instant::now();
        if row.status == "completed" || now >= deadline {
            break row;
        }
        let pause = (deadline - now).min(Duration::from_millis(100));
        tokio::select! {
            _ = done => {}
            _ = tokio::time::sleep(pause) => {}
        }
    };
    audit::record(
        state,
        Some(who),
        Event::new("subject_request.read", json!({"request_id": row.id})),
    )
    .await?;
    Ok(row.into())
}

/// What a list of requests shows.
#[derive(Debug, Clone)]
pub struct ListFilter {
    pub status: Option<String>,
    pub overdue: Option<bool>,
    pub after: Option<(i64, Uuid)>,
    pub limit: i64,
}

/// A page of requests, newest first, and the cursor of the next page when
/// more follow.
pub async fn list(
    state: &AppState,
    who: &Principal,
    f: &ListFilter,
) -> Result<(Vec<RequestView>, Option<String>)> {
    state.authorize(who, "subject_requests", "read")?;
    let mut rows = store::list(
        &state.db,
        &store::RequestFilter {
            scope: who.scope(),
            status: f.status.as_deref(),
            overdue: f.overdue,
            now: micros(Utc::now()),
            after: f.after,
            limit: f.limit + 1,
        },
    )
    .await?;
    let next = next_page(&mut rows, f.limit, |r| {
        encode_cursor(
            crate::storage::Listing::SubjectRequests,
            r.received_at,
            r.id,
        )
    });
    audit::record(
        state,
        Some(who),
        Event::new(
            "subject_request.list",
            json!({"returned": rows.len(), "filters": {"status": f.status, "overdue": f.overdue, "after": f.after.map(|(at, id)| json!([at, id]))}}),
        ),
    )
    .await?;
    Ok((rows.into_iter().map(RequestView::from).collect(), next))
}

/// Extends the deadline once, by two further months (Art. 12(3)).
pub async fn extend(
    state: &AppState,
    who: &Principal,
    id: &str,
    body: &Value,
) -> Result<RequestView> {
    state.authorize_any(who, &["subject_requests"], "write")?;
    let mut errs = Errors::default();
    let reason = Obj::new(body, "", &mut errs).and_then(|o| {
        o.deny_unknown(&["reason"], &mut errs);
        o.text("reason", 1000, true, &mut errs)
    });
    let Some(reason) = reason.filter(|_| errs.is_empty()) else {
        return Err(AppError::Validation(errs.0));
    };
    let row = find(state, who, id, "subject_request.extend").await?;
    // Whatever the status (a request is usually answered within moments),
    // but only while the deadline runs: Art. 12(3) has the controller
    // announce an extension within the first month, and a deadline already
    // missed cannot be moved after the fact.
    if Utc::now() > from_micros(row.due_at) {
        return Err(AppError::Conflict(format!(
            "subject request {} is past its deadline; it can no longer be extended",
            row.id
        )));
    }
    if row.extended_at.is_some() {
        return Err(AppError::Conflict(format!(
            "subject request {} was already extended once",
            row.id
        )));
    }
    // One month plus two further months, both counted from receipt: a
    // request received on 31 January is due on 28 February, and extended
    // to 30 April (not to two months after 28 February).
    let due = from_micros(row.received_at)
        .checked_add_months(Months::new(3))
        .expect("in range");
    let mut tx = state.db.begin().await?;
    if !store::extend(&mut tx, row.id, micros(due), micros(Utc::now()), &reason).await? {
        return Err(AppError::Conflict(format!(
            "subject request {} was already extended once",
            row.id
        )));
    }
    audit::append(
        &mut tx,
        Some(who),
        &Event::new(
            "subject_request.extend",
            json!({"request_id": row.id, "due_at": due}),
        )
        .reason(Some(&reason)),
    )
    .await?;
    tx.commit().await?;
    Ok(store::get(&state.db, row.id, None)
        .await?
        .expect("just updated")
        .into())
}

/// A processor that stalled past the claim timeout (a pause, a long GC of
/// the VM) finds its request taken over: it stops, its last transaction
/// rolled back, and leaves the request to the one that took it.
pub(crate) fn claim_lost(id: Uuid) -> AppError {
    AppError::Conflict(format!(
        "subject request {id} was taken over by another processor; this one stops"
    ))
}

/// The claim a processing request's processor holds.
pub(crate) fn held_claim(r: &RequestRow) -> Result<i64> {
    r.claimed_at
        .ok_or_else(|| AppError::Integrity(format!("subject request {} is not claimed", r.id)))
}

/// Processes one request if it can be claimed.
pub async fn process(state: &AppState, id: Uuid) -> Result<()> {
    let now = micros(Utc::now());
    if !store::claim(&state.db, id, now, state.config.stale_before(now)).await? {
        return Ok(());
    }
    let row = store::get(&state.db, id, None)
        .await?
        .ok_or_else(|| AppError::NotFound("request vanished".into()))?;
    let done = match row.kind.as_str() {
        "access" => export::prepare(state, &row).await,
        _ => erasure::perform(state, &row).await,
    };
    match &done {
        Ok(()) => state.requests_done.notify_waiters(),
        Err(e) => {
            if let Err(again) = record_failure(state, &row, e).await {
                tracing::error!(request = %id, error = %again, "cannot record a processing failure");
            }
        }
    }
    done
}

/// Makes a failed attempt visible on the request and in the audit trail:
/// a request that keeps failing (a record that fails its integrity check,
/// a key that cannot be unwrapped) shows why, instead of only `processing`
/// until it is overdue. Not for a processor that lost its claim (a
/// conflict): the request is another processor's now.
async fn record_failure(state: &AppState, row: &RequestRow, e: &AppError) -> Result<()> {
    let description = match e {
        AppError::Conflict(_) => return Ok(()),
        AppError::Integrity(_) => "a stored record or key failed its integrity check (tampering or corruption); the service log names it".to_string(),
        AppError::Database(_) | AppError::Internal(_) => {
            "a database or internal error; the service log has the detail".to_string()
        }
        // Messages can name what they refused; the log has them.
        other => format!(
            "processing stopped with {} {}; the service log has the detail",
            other.status().as_u16(),
            other.status().canonical_reason().unwrap_or("error")
        ),
    };
    // The claim as this processor last renewed it.
    let Some(held) = store::get(&state.db, row.id, None)
        .await?
        .and_then(|r| r.claimed_at)
    else {
        return Ok(());
    };
    let mut tx = state.db.begin().await?;
    if !store::record_failure(&mut tx, row.id, held, micros(Utc::now()), &description).await? {
        return Ok(()); // completed or taken over meanwhile
    }
    append_system(
        &mut tx,
        &Event::new(
            "subject_request.processing_failed",
            json!({"request_id": row.id, "kind": row.kind, "error": description}),
        )
        .outcome(Outcome::Failed),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Appends an entry of the service's own background work (the processor),
/// whose actor is `system`.
pub(crate) async fn append_system(tx: &mut Tx, event: &Event) -> Result<audit::Appended> {
    let system = Principal {
        sub: "system".into(),
        role: crate::auth::Role::Admin,
        carrier: None,
    };
    audit::append(tx, Some(&system), event).await
}

/// The background processor: wakes on new requests, polls for abandoned
/// ones, expires old exports, and redoes erasures whose holds were released.
pub async fn run_worker(state: AppState, stop: Arc<tokio::sync::Notify>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = state.requests_ready.notified() => {}
            _ = tick.tick() => {}
            _ = stop.notified() => return,
        }
        if let Err(e) = housekeeping(&state).await {
            tracing::error!(error = %e, "subject-request housekeeping failed");
        }
        let now = micros(Utc::now());
        let pending = match store::pending(&state.db, state.config.stale_before(now)).await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot list pending subject requests");
                continue;
            }
        };
        for id in pending {
            match process(&state, id).await {
                Ok(()) => {}
                // Its claim went to another processor: not a failure of
                // the request, and not this processor's to retry.
                Err(e @ AppError::Conflict(_)) => {
                    tracing::warn!(request = %id, error = %e, "subject request taken over by another processor")
                }
                Err(e) => {
                    tracing::error!(request = %id, error = %e, "subject request failed; it will be retried")
                }
            }
        }
    }
}

async fn housekeeping(state: &AppState) -> Result<()> {
    let mut tx = state.db.begin().await?;
    let expired = store::expire_exports(&mut tx, micros(Utc::now())).await?;
    if !expired.is_empty() {
        append_system(
            &mut tx,
            &Event::new("subject_export.expire", json!({"request_ids": expired})),
        )
        .await?;
    }
    tx.commit().await?;
    erasure::redo_pending(state).await
}

/// Records a read that found nothing (for the audit trail's sake).
pub async fn audit_not_found(
    state: &AppState,
    who: &Principal,
    action: &'static str,
    id: &str,
) -> Result<()> {
    audit::record(
        state,
        Some(who),
        Event::new(action, json!({"request_id": id})).outcome(Outcome::NotFound),
    )
    .await?;
    Ok(())
}
