//! `/v1/reconciliation`: flow 3 against the platform's call records.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use super::extract::Params;
use crate::app::AppState;
use crate::auth::Principal;
use crate::domain::CarrierId;
use crate::error::{AppError, Result};
use crate::ledger::reconciliation::{self, Query, MAX_TOLERANCE_SECONDS};
use crate::storage::reconciliation::Outcome;

pub fn router() -> Router<AppState> {
    Router::new().route("/reconciliation", get(reconcile))
}

/// Matches the carrier's call durations with the platform's call detail
/// records by call id: totals, and a page of the calls with one outcome.
#[utoipa::path(get, path = "/v1/reconciliation", tag = "reconciliation",
    params(("carrier_id" = Option<String>, Query, description = "required except for carriers (their own)"),
           ("from" = Option<String>, Query), ("to" = Option<String>, Query),
           ("tolerance_seconds" = Option<u32>, Query, description = "default 0"),
           ("outcome" = Option<String>, Query, description = "matched, mismatched (default), missing_at_carrier or missing_at_platform"),
           ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "1 to 1000, default 100"), ("cursor" = Option<String>, Query),
           ("format" = Option<String>, Query, description = "json (default) or csv (the listed calls)")),
    responses((status = 200, body = reconciliation::Reconciliation)), security(("bearer" = [])))]
pub async fn reconcile(
    State(state): State<AppState>,
    who: Principal,
    mut p: Params,
) -> Result<Response> {
    p.allow(&[
        "carrier_id",
        "from",
        "to",
        "tolerance_seconds",
        "outcome",
        "limit",
        "cursor",
        "format",
    ]);
    let carrier = match p.get("carrier_id").is_some() {
        true => p.parse("carrier_id", CarrierId::parse),
        false => match &who.carrier {
            Some(own) => Some(own.clone()),
            None => {
                p.error("carrier_id", "is required");
                None
            }
        },
    };
    let (from, to) = p.period();
    let tolerance = p
        .parse("tolerance_seconds", |s| match s.parse::<i64>() {
            Ok(n) if (0..=MAX_TOLERANCE_SECONDS).contains(&n) => Ok(n),
            _ => Err(format!(
                "must be a whole number of seconds from 0 to {MAX_TOLERANCE_SECONDS}"
            )),
        })
        .unwrap_or(0);
    let outcome = p
        .parse("outcome", |s| {
            Outcome::parse(s).ok_or_else(|| {
                "must be one of: matched, mismatched, missing_at_carrier, missing_at_platform"
                    .into()
            })
        })
        .unwrap_or(Outcome::Mismatched);
    let limit = p.limit();
    let cursor = p.parse("cursor", |s| {
        hex::decode(s).map_err(|_| "is not a cursor this service issued".to_string())
    });
    let csv = match p.get("format") {
        None | Some("json") => false,
        Some("csv") => true,
        Some(_) => {
            p.error("format", "must be one of: json, csv");
            false
        }
    };
    p.finish()?;
    let carrier = carrier.ok_or_else(|| AppError::validation("carrier_id", "is required"))?;
    let q = Query {
        carrier,
        from,
        to,
        tolerance_seconds: tolerance,
        outcome,
        limit,
        cursor,
    };
    let r = reconciliation::reconcile(&state, &who, q).await?;
    if csv {
        let body = reconciliation::to_csv(&r)?;
        return Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], body).into_response());
    }
    Ok(Json(r).into_response())
}
