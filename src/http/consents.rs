//! `/v1/consents`: the consents transfers rely on.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;

use super::extract::JsonBody;
use crate::app::AppState;
use crate::auth::Principal;
use crate::domain::consent::{ConsentStatus, NewConsent};
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
#[utoipa::path(post, path = "/v1/consents", tag = "consents",
    request_body(content = super::openapi::ConsentInput, content_type = "application/json"),
    responses((status = 201, body = ConsentView), (status = 409, body = crate::error::Problem),
              (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    who: Principal,
    JsonBody(body): JsonBody,
) -> Result<(StatusCode, Json<ConsentView>)> {
    let c = NewConsent::parse(&body, Utc::now()).map_err(AppError::Validation)?;
    Ok((
        StatusCode::CREATED,
        Json(ledger::register(&state, &who, c).await?),
    ))
}

#[utoipa::path(get, path = "/v1/consents/{reference}", tag = "consents",
    params(("reference" = String, Path)),
    responses((status = 200, body = ConsentView), (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn show(
    State(state): State<AppState>,
    who: Principal,
    Path(reference): Path<String>,
) -> Result<Json<ConsentView>> {
    Ok(Json(ledger::get(&state, &who, &reference).await?))
}

/// Suspend, reactivate, remove or withdraw a consent.
#[utoipa::path(post, path = "/v1/consents/{reference}/status", tag = "consents",
    params(("reference" = String, Path)),
    request_body(content = super::openapi::StatusInput, content_type = "application/json"),
    responses((status = 200, body = ConsentView), (status = 409, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn change_status(
    State(state): State<AppState>,
    who: Principal,
    Path(reference): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Json<ConsentView>> {
    let mut errs = Errors::default();
    let status = Obj::new(&body, "", &mut errs).and_then(|o| {
        o.deny_unknown(&["status"], &mut errs);
        o.parse::<ConsentStatus>("status", true, &mut errs, &ConsentStatus::expected())
    });
    let status = match status {
        Some(s) if errs.is_empty() => s,
        _ => return Err(AppError::Validation(errs.0)),
    };
    Ok(Json(
        ledger::set_status(&state, &who, &reference, status).await?,
    ))
}
