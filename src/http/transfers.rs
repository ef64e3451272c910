//! `/v1/transfers`: record and query the transfer log.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use serde::Serialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::extract::{AccessReason, JsonBody, Params};
use crate::app::AppState;
use crate::audit::{self, Event};
use crate::auth::{Principal, Role};
use crate::domain::transfer::NewTransfer;
use crate::domain::{Category, Country, Direction, LegalBasis, Purpose, SubjectId};
use crate::error::{AppError, FieldError, Result};
use crate::ledger::transfers::{self as ledger, Recorded, TransferView, MAX_BATCH};
use crate::storage::transfers::LogFilter;
use crate::storage::{encode_cursor, next_page, Listing};
use crate::storage::{micros, transfers as store};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/transfers", post(create).get(list))
        .route("/transfers/batch", post(create_batch))
        .route("/transfers/{id}", get(show))
}

const WRITE_OBJECTS: &[&str] = &[
    "transfers/platform_to_carrier",
    "transfers/carrier_to_platform",
];

/// Record one transfer.
#[utoipa::path(post, operation_id = "record_transfer", path = "/v1/transfers", tag = "transfers",
    request_body(content = super::openapi::TransferInput, content_type = "application/json"),
    responses(
        (status = 201, body = Recorded),
        (status = 403, body = crate::error::Problem), (status = 409, body = crate::error::Problem),
        (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    who: Principal,
    JsonBody(body): JsonBody,
) -> Result<(StatusCode, Json<Recorded>)> {
    state.authorize_any(&who, WRITE_OBJECTS, "write")?;
    let t = NewTransfer::parse(&body, "", Utc::now(), &state.retention())
        .map_err(AppError::Validation)?;
    let mut out = ledger::record(&state, &who, vec![t], false).await?;
    Ok((StatusCode::CREATED, Json(out.remove(0))))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct BatchRecorded {
    /// In input order.
    pub ids: Vec<Uuid>,
}

/// Record up to 10,000 transfers, all or nothing.
#[utoipa::path(post, path = "/v1/transfers/batch", tag = "transfers",
    request_body(content = super::openapi::BatchInput, content_type = "application/json"),
    responses((status = 201, body = BatchRecorded), (status = 403, body = crate::error::Problem),
              (status = 409, body = crate::error::Problem), (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn create_batch(
    State(state): State<AppState>,
    who: Principal,
    JsonBody(body): JsonBody,
) -> Result<(StatusCode, Json<BatchRecorded>)> {
    state.authorize_any(&who, WRITE_OBJECTS, "write")?;
    let items = match &body {
        Value::Object(m) if m.len() == 1 && m.contains_key("transfers") => match &m["transfers"] {
            Value::Array(items) if items.is_empty() => {
                return Err(AppError::validation("transfers", "must not be empty"))
            }
            Value::Array(items) if items.len() > MAX_BATCH => {
                return Err(AppError::validation(
                    "transfers",
                    format!("at most {MAX_BATCH} transfers per batch"),
                ))
            }
            Value::Array(items) => items,
            _ => {
                return Err(AppError::validation(
                    "transfers",
                    "must be an array of transfers",
                ))
            }
        },
        _ => {
            return Err(AppError::validation(
                "body",
                "must be an object with exactly one field, transfers",
            ))
        }
    };
    let (now, retention) = (Utc::now(), state.retention());
    let mut parsed = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match NewTransfer::parse(item, "", now, &retention) {
            Ok(t) => parsed.push(t),
            Err(errs) => errors.extend(errs.into_iter().map(|e| FieldError {
                index: Some(i),
                ..e
            })),
        }
    }
    if !errors.is_empty() {
        return Err(AppError::Validation(errors));
    }
    let out = ledger::record(&state, &who, parsed, true).await?;
    Ok((
        StatusCode::CREATED,
        Json(BatchRecorded {
            ids: out.into_iter().map(|r| r.id).collect(),
        }),
    ))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct TransferPage {
    pub items: Vec<TransferView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

const LIST_PARAMS: &[&str] = &[
    "carrier_id",
    "category",
    "direction",
    "purpose",
    "legal_basis",
    "jurisdiction",
    "from",
    "to",
    "subject",
    "limit",
    "cursor",
    "include",
];

/// The transfer log, newest first.
#[utoipa::path(get, operation_id = "list_transfers", path = "/v1/transfers", tag = "transfers",
    params(
        ("carrier_id" = Option<String>, Query), ("category" = Option<String>, Query),
        ("direction" = Option<String>, Query), ("purpose" = Option<String>, Query),
        ("legal_basis" = Option<String>, Query), ("jurisdiction" = Option<String>, Query),
        ("from" = Option<String>, Query, description = "RFC 3339, inclusive, on occurred_at"),
        ("to" = Option<String>, Query, description = "RFC 3339, exclusive, on occurred_at"),
        ("subject" = Option<String>, Query, description = "a phone number or SIP URI"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "1 to 1000, default 100"),
        ("cursor" = Option<String>, Query), ("include" = Option<String>, Query, description = "`payload` to decrypt"),
        ("X-Access-Reason" = Option<String>, Header, description = "required of privacy officers with include=payload")),
    responses((status = 200, body = TransferPage), (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    who: Principal,
    reason: AccessReason,
    mut p: Params,
) -> Result<Json<TransferPage>> {
    state.authorize(&who, "transfers", "read")?;
    p.allow(LIST_PARAMS);
    let (from, to) = p.period();
    let mut f = LogFilter {
        scope: who.scope().map(str::to_string),
        carrier_id: p.carrier_id(),
        category: p.parse("category", |s| {
            s.parse::<Category>()
                .map(Category::as_str)
                .map_err(|_| format!("must be one of: {}", Category::expected()))
        }),
        direction: p.parse("direction", |s| {
            s.parse::<Direction>()
                .map(Direction::as_str)
                .map_err(|_| format!("must be one of: {}", Direction::expected()))
        }),
        purpose: p.parse("purpose", |s| {
            s.parse::<Purpose>()
                .map(Purpose::as_str)
                .map_err(|_| format!("must be one of: {}", Purpose::expected()))
        }),
        legal_basis: p.parse("legal_basis", |s| {
            s.parse::<LegalBasis>()
                .map(LegalBasis::as_str)
                .map_err(|_| format!("must be one of: {}", LegalBasis::expected()))
        }),
        jurisdiction: p.parse("jurisdiction", |s| Country::parse(s).map(|c| c.to_string())),
        from: from.map(micros),
        to: to.map(micros),
        subject_index: p.parse("subject", |s| {
            SubjectId::parse(s).map(|id| state.keys.blind().of(&id))
        }),
        after: p.cursor(Listing::Transfers),
        limit: p.limit(),
    };
    let with_payload = match p.get("include") {
        None => false,
        Some("payload") => true,
        Some(_) => {
            p.error("include", "must be: payload");
            false
        }
    };
    p.finish()?;
    if with_payload {
        require_decrypt(&state, &who, &reason)?;
    }

    // One extra row tells whether another page follows.
    f.limit += 1;
    let mut rows = store::list(&state.db, &f).await?;
    f.limit -= 1;
    let next_cursor = next_page(&mut rows, f.limit, |r| {
        encode_cursor(Listing::Transfers, r.occurred_at, r.id)
    });
    let mut items: Vec<TransferView> = rows.into_iter().map(TransferView::from).collect();
    if with_payload {
        ledger::decrypt(&state, &mut items).await?;
    }
    let target = json!({
        "filters": audit_filters(&f),
        "include_payload": with_payload,
        "transfer_ids": items.iter().map(|i| i.id).collect::<Vec<_>>(),
    });
    audit::record(
        &state,
        Some(&who),
        Event::new("transfer.list", target).reason(reason.0.as_deref()),
    )
    .await?;
    Ok(Json(TransferPage { items, next_cursor }))
}

/// The filters of a log query as the audit trail keeps them: the subject
/// only as its blind index.
fn audit_filters(f: &LogFilter) -> Value {
    json!({
        "carrier_id": f.carrier_id,
        "category": f.category,
        "direction": f.direction,
        "purpose": f.purpose,
        "legal_basis": f.legal_basis,
        "jurisdiction": f.jurisdiction,
        "from": f.from,
        "to": f.to,
        "subject_index": f.subject_index.as_ref().map(hex::encode),
        "after": f.after.map(|(at, id)| json!([at, id])),
    })
}

/// One record with its decrypted payload.
#[utoipa::path(get, operation_id = "show_transfer", path = "/v1/transfers/{id}", tag = "transfers",
    params(("id" = Uuid, Path), ("X-Access-Reason" = Option<String>, Header, description = "required of privacy officers")),
    responses((status = 200, body = TransferView), (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn show(
    State(state): State<AppState>,
    who: Principal,
    reason: AccessReason,
    Path(id): Path<String>,
) -> Result<Json<TransferView>> {
    state.authorize(&who, "transfers", "read")?;
    require_decrypt(&state, &who, &reason)?;
    // A malformed id names no record: the same answer as a missing one.
    // Not echoed: a path segment that is no id may be anything, a phone
    // number included.
    let id = Uuid::parse_str(&id)
        .map_err(|_| AppError::NotFound("no transfer with that id (ids are UUIDs)".into()))?;
    Ok(Json(
        ledger::get(&state, &who, id, reason.0.as_deref()).await?,
    ))
}

/// Decrypting reads need the decrypt permission, and privacy officers must
/// say why.
fn require_decrypt(state: &AppState, who: &Principal, reason: &AccessReason) -> Result<()> {
    state.authorize(who, "transfers", "decrypt")?;
    if who.role == Role::PrivacyOfficer && reason.0.is_none() {
        return Err(AppError::ReasonRequired(
            "reading decrypted personal data requires an X-Access-Reason header stating why".into(),
        ));
    }
    Ok(())
}
