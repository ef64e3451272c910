//! Legal holds: records they match outlive their retention and survive
//! erasure requests until released.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::app::AppState;
use crate::audit::{self, Event};
use crate::auth::Principal;
use crate::domain::consent::parse_subject;
use crate::domain::fields::{Errors, Obj};
use crate::domain::{CarrierId, Category};
use crate::error::{AppError, Result};
use crate::storage::retention::{self as store, HoldRow};
use crate::storage::{from_micros, micros, Tx, TxLock};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct HoldView {
    pub id: Uuid,
    pub carrier_id: Option<String>,
    /// The held subject's blind index (hex): the identifier itself is not kept.
    pub subject_index: Option<String>,
    pub category: Option<String>,
    pub reason: String,
    pub active: bool,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
    pub released_at: Option<DateTime<Utc>>,
    pub released_by: Option<String>,
}

impl From<HoldRow> for HoldView {
    fn from(h: HoldRow) -> Self {
        Self {
            id: h.id,
            carrier_id: h.carrier_id,
            subject_index: h.subject_index.as_ref().map(hex::encode),
            category: h.category,
            reason: h.reason,
            active: h.released_at.is_none(),
            created_at: from_micros(h.created_at),
            created_by: h.created_by,
            released_at: h.released_at.map(from_micros),
            released_by: h.released_by,
        }
    }
}

fn target(h: &HoldRow) -> Value {
    json!({
        "hold_id": h.id, "carrier_id": h.carrier_id, "category": h.category,
        "subject_index": h.subject_index.as_ref().map(hex::encode),
    })
}

/// How long placing or releasing a hold waits for the sweep and erasure
/// batches in flight (a batch takes about a second).
const HOLD_LOCK_WAIT: Duration = Duration::from_secs(20);

/// The holds lock, exclusively, or a 503 if batches keep it longer than
/// [`HOLD_LOCK_WAIT`] (an instance stuck mid-batch: PostgreSQL ends its
/// transaction after a minute idle). Nothing is left waiting.
async fn hold_lock(tx: &mut Tx, done: &str) -> Result<()> {
    if TxLock::Holds.take_within(tx, false, HOLD_LOCK_WAIT).await? {
        return Ok(());
    }
    Err(AppError::Unavailable(format!(
        "a retention sweep or erasure batch has been deleting records for more than {} s; the hold was not {done}: retry",
        HOLD_LOCK_WAIT.as_secs()
    )))
}

pub async fn place(state: &AppState, who: &Principal, body: &Value) -> Result<HoldView> {
    state.authorize(who, "holds", "write")?;
    let mut errs = Errors::default();
    let parsed = Obj::new(body, "", &mut errs).map(|o| {
        o.deny_unknown(&["carrier_id", "subject", "category", "reason"], &mut errs);
        let carrier = o.str("carrier_id", false, &mut errs).and_then(|s| {
            CarrierId::parse(s)
                .map_err(|e| errs.add("carrier_id", e))
                .ok()
        });
        let subject = o
            .get("subject")
            .is_some()
            .then(|| parse_subject(&o, "subject", &mut errs))
            .flatten();
        let category: Option<Category> =
            o.parse("category", false, &mut errs, &Category::expected());
        let reason = o.text("reason", 1000, true, &mut errs);
        (carrier, subject, category, reason)
    });
    let Some((carrier, subject, category, Some(reason))) = parsed.filter(|_| errs.is_empty())
    else {
        return Err(AppError::Validation(errs.0));
    };
    if carrier.is_none() && subject.is_none() && category.is_none() {
        return Err(AppError::validation(
            "body",
            "a hold needs at least one of carrier_id, subject or category",
        ));
    }
    let row = HoldRow {
        id: Uuid::now_v7(),
        carrier_id: carrier.map(|c| c.to_string()),
        subject_index: subject.map(|s| state.keys.blind().of(&s)),
        category: category.map(|c| c.to_string()),
        reason,
        created_at: micros(Utc::now()),
        created_by: who.sub.clone(),
        released_at: None,
        released_by: None,
    };
    let mut tx = state.db.begin().await?;
    // After the sweep and erasure batches in flight: from the 201 on,
    // nothing the hold covers is deleted.
    hold_lock(&mut tx, "placed").await?;
    store::insert_hold(&mut tx, &row).await?;
    audit::append(&mut tx, Some(who), &Event::new("hold.place", target(&row))).await?;
    tx.commit().await?;
    Ok(row.into())
}

pub async fn release(state: &AppState, who: &Principal, id: Uuid) -> Result<HoldView> {
    state.authorize(who, "holds", "write")?;
    let mut tx = state.db.begin().await?;
    // Not in the middle of an erasure's completion, which decides from the
    // holds whether anything is left to erase later.
    hold_lock(&mut tx, "released").await?;
    if !store::release_hold(&mut tx, id, micros(Utc::now()), &who.sub).await? {
        let existing = store::hold(&state.db, id).await?;
        return Err(match existing {
            Some(_) => AppError::Conflict(format!("hold {id} is already released")),
            None => AppError::NotFound(format!("no hold {id}")),
        });
    }
    let row = store::hold_in(&mut tx, id)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no hold {id}")))?;
    audit::append(
        &mut tx,
        Some(who),
        &Event::new("hold.release", target(&row)),
    )
    .await?;
    tx.commit().await?;
    // Erasures this hold kept from finishing can finish now.
    state.requests_ready.notify_one();
    Ok(row.into())
}

pub async fn list(
    state: &AppState,
    who: &Principal,
    active: Option<bool>,
) -> Result<Vec<HoldView>> {
    state.authorize(who, "holds", "read")?;
    let rows = store::list_holds(&state.db, active).await?;
    audit::record(
        state,
        Some(who),
        Event::new(
            "hold.list",
            json!({"active": active, "returned": rows.len()}),
        ),
    )
    .await?;
    Ok(rows.into_iter().map(HoldView::from).collect())
}
