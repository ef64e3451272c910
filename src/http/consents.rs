//! `/v1/consents`: the consents transfers rely on.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;

use super::extract::{AccessReason, JsonBody, Params};
use crate::app::AppState;
use crate::auth::Principal;
use crate::domain::consent::{ConsentKind, ConsentStatus, NewConsent};
use crate::domain::fields::{Errors, Obj};
use crate::error::{AppError, Result};
use crate::ledger::consents::{self as ledger, ConsentView};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/consents", post(create))
        .route("/consents/{reference}", get(show))
        .route("/consents/{reference}/status", post(change_status))
}

/// Register a consent (status `active`).
#[utoipa::path(post, operation_id = "register_consent", path = "/v1/consents", tag = "consents",
    request_body(content = super::openapi::ConsentInput, content_type = "application/json"),
    responses((status = 201, body = ConsentView), (status = 409, body = crate::error::Problem),
              (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    who: Principal,
    JsonBody(body): JsonBody,
) -> Result<(StatusCode, Json<ConsentView>)> {
    state.authorize_any(&who, &ConsentKind::WRITE_OBJECTS, "write")?;
    let c = NewConsent::parse(&body, Utc::now()).map_err(AppError::Validation)?;
    Ok((
        StatusCode::CREATED,
        Json(ledger::register(&state, &who, c).await?),
    ))
}

#[utoipa::path(get, operation_id = "show_consent", path = "/v1/consents/{reference}", tag = "consents",
    params(("reference" = String, Path),
           ("carrier_id" = Option<String>, Query, description = "when several carriers use the reference"),
           ("X-Access-Reason" = Option<String>, Header, description = "required of privacy officers when the consent names a data subject")),
    responses((status = 200, body = ConsentView), (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn show(
    State(state): State<AppState>,
    who: Principal,
    reason: AccessReason,
    Path(reference): Path<String>,
    p: Params,
) -> Result<Json<ConsentView>> {
    let carrier = carrier_param(p)?;
    let view = ledger::get(
        &state,
        &who,
        &reference,
        carrier.as_deref(),
        reason.0.as_deref(),
    )
    .await?;
    Ok(Json(view))
}

/// Suspend, reactivate, remove or withdraw a consent.
#[utoipa::path(post, path = "/v1/consents/{reference}/status", tag = "consents",
    params(("reference" = String, Path),
           ("carrier_id" = Option<String>, Query, description = "when several carriers use the reference")),
    request_body(content = super::openapi::StatusInput, content_type = "application/json"),
    responses((status = 200, body = ConsentView), (status = 409, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn change_status(
    State(state): State<AppState>,
    who: Principal,
    reason: AccessReason,
    Path(reference): Path<String>,
    p: Params,
    JsonBody(body): JsonBody,
) -> Result<Json<ConsentView>> {
    let carrier = carrier_param(p)?;
    let mut errs = Errors::default();
    let status = Obj::new(&body, "", &mut errs).and_then(|o| {
        o.deny_unknown(&["status"], &mut errs);
        o.parse::<ConsentStatus>("status", true, &mut errs, &ConsentStatus::expected())
    });
    let status = match status {
        Some(s) if errs.is_empty() => s,
        _ => return Err(AppError::Validation(errs.0)),
    };
    let view = ledger::set_status(
        &state,
        &who,
        &reference,
        carrier.as_deref(),
        reason.0.as_deref(),
        status,
    )
    .await?;
    Ok(Json(view))
}

fn carrier_param(mut p: Params) -> Result<Option<String>> {
    p.allow(&["carrier_id"]);
    let carrier = p.carrier_id();
    p.finish()?;
    Ok(carrier)
}
