//! Flow 3: do the carrier's call durations agree with the platform's call
//! detail records? Matching runs in SQL on keyed call hashes and durations
//! kept as metadata; only the call ids listed in a page are decrypted.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::app::AppState;
use crate::audit::{self, Event};
use crate::auth::Principal;
use crate::domain::CarrierId;
use crate::error::{AppError, Result};
use crate::ledger::transfers::{decrypt, TransferView};
use crate::storage::reconciliation::{self as store, Outcome};
use crate::storage::{micros, transfers};

/// The largest duration difference a reconciliation may tolerate: a day.
pub const MAX_TOLERANCE_SECONDS: i64 = 86_400;

#[derive(Debug, Clone)]
pub struct Query {
    pub carrier: CarrierId,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub tolerance_seconds: i64,
    pub outcome: Outcome,
    pub limit: i64,
    pub cursor: Option<Vec<u8>>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CallItem {
    pub call_id: Option<String>,
    pub outcome: &'static str,
    pub platform_seconds: Option<i64>,
    pub carrier_seconds: Option<i64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Reconciliation {
    pub carrier_id: String,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub tolerance_seconds: i64,
    pub matched: i64,
    pub mismatched: i64,
    pub missing_at_carrier: i64,
    pub missing_at_platform: i64,
    pub total_platform_seconds: i64,
    pub total_carrier_seconds: i64,
    /// Which outcome `items` lists.
    pub outcome: &'static str,
    pub items: Vec<CallItem>,
    pub next_cursor: Option<String>,
}

fn bounds(q: &Query) -> (i64, i64) {
    (
        q.from.map(micros).unwrap_or(i64::MIN),
        q.to.map(micros).unwrap_or(i64::MAX),
    )
}

/// The summary only (the CLI, the bench).
pub async fn summary(state: &AppState, q: &Query) -> Result<store::Summary> {
    let (from, to) = bounds(q);
    Ok(store::reconcile(
        &state.db,
        q.carrier.as_str(),
        from,
        to,
        q.tolerance_seconds,
        None,
    )
    .await?
    .0)
}

pub async fn reconcile(state: &AppState, who: &Principal, q: Query) -> Result<Reconciliation> {
    state.authorize_for(who, &q.carrier, "reconciliation", "read")?;
    // Its page names calls by their ids, decrypted from the records: only
    // for whom the policy lets decrypt them too.
    state.authorize_for(who, &q.carrier, "transfers", "decrypt")?;
    let (from, to) = bounds(&q);
    let listing = store::Listing {
        outcome: q.outcome,
        after: q.cursor.as_deref(),
        limit: q.limit as usize + 1,
    };
    let (s, mut page) = store::reconcile(
        &state.db,
        q.carrier.as_str(),
        from,
        to,
        q.tolerance_seconds,
        Some(listing),
    )
    .await?;
    let more = page.len() as i64 > q.limit;
    page.truncate(q.limit as usize);
    let next_cursor = more
        .then(|| page.last().map(|i| hex::encode(&i.call_key)))
        .flatten();

    // Call ids of this page only: one record per call is decrypted.
    let keys: Vec<Vec<u8>> = page.iter().map(|i| i.call_key.clone()).collect();
    let mut record_of: HashMap<Vec<u8>, Uuid> = HashMap::new();
    for (key, id) in store::record_per_call(&state.db, q.carrier.as_str(), &keys).await? {
        record_of.entry(key).or_insert(id);
    }
    let ids: Vec<Uuid> = record_of.values().copied().collect();
    let mut views: Vec<TransferView> = transfers::get_many(&state.db, &ids)
        .await?
        .into_iter()
        .map(TransferView::from)
        .collect();
    decrypt(state, &mut views).await?;
    let call_ids: HashMap<Uuid, String> = views
        .into_iter()
        .filter_map(|v| {
            v.payload
                .as_ref()
                .and_then(|p| p.get("call_id"))
                .and_then(Value::as_str)
                .map(|c| (v.id, c.to_string()))
        })
        .collect();
    let items = page
        .iter()
        .map(|i| CallItem {
            call_id: record_of
                .get(&i.call_key)
                .and_then(|id| call_ids.get(id).cloned()),
            outcome: q.outcome.as_str(),
            platform_seconds: i.pd,
            carrier_seconds: i.cd,
        })
        .collect::<Vec<_>>();

    let target = json!({
        "carrier_id": q.carrier.as_str(), "from": q.from, "to": q.to, "tolerance_seconds": q.tolerance_seconds,
        "outcome": q.outcome.as_str(), "returned": items.len(),
    });
    audit::record(state, Some(who), Event::new("reconciliation.read", target)).await?;
    Ok(Reconciliation {
        carrier_id: q.carrier.to_string(),
        from: q.from,
        to: q.to,
        tolerance_seconds: q.tolerance_seconds,
        matched: s.matched,
        mismatched: s.mismatched,
        missing_at_carrier: s.missing_at_carrier,
        missing_at_platform: s.missing_at_platform,
        total_platform_seconds: s.total_platform_seconds,
        total_carrier_seconds: s.total_carrier_seconds,
        outcome: q.outcome.as_str(),
        items,
        next_cursor,
    })
}

/// The page's items as CSV.
pub fn to_csv(r: &Reconciliation) -> Result<String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let err = |e: csv::Error| AppError::Internal(e.into());
    w.write_record(["call_id", "outcome", "platform_seconds", "carrier_seconds"])
        .map_err(err)?;
    let opt = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_default();
    for i in &r.items {
        w.write_record([
            super::csv_text(i.call_id.as_deref().unwrap_or_default()).into_owned(),
            i.outcome.to_string(),
            opt(i.platform_seconds),
            opt(i.carrier_seconds),
        ])
        .map_err(err)?;
    }
    String::from_utf8(
        w.into_inner()
            .map_err(|e| AppError::Internal(anyhow::anyhow!("{e}")))?,
    )
    .map_err(|e| AppError::Internal(e.into()))
}
