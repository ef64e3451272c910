//! `/v1/subject-requests`: data-subject access and erasure requests.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::extract::{AccessReason, JsonBody, Params};
use crate::app::AppState;
use crate::auth::Principal;
use crate::error::Result;
use crate::requests::{self, export, RequestView};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/subject-requests", post(create).get(list))
        .route("/subject-requests/{id}", get(show))
        .route("/subject-requests/{id}/extend", post(extend))
        .route("/subject-requests/{id}/export", get(download))
}

/// Record an access or erasure request; it is processed in the background.
#[utoipa::path(post, path = "/v1/subject-requests", tag = "subject requests",
    request_body(content = super::openapi::SubjectRequestInput, content_type = "application/json"),
    params(("Accept-Language" = Option<String>, Header, description = "used when the body names no language")),
    responses((status = 202, body = RequestView), (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    who: Principal,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<(StatusCode, Json<RequestView>)> {
    let accept = headers
        .get(header::ACCEPT_LANGUAGE)
        .and_then(|v| v.to_str().ok());
    Ok((
        StatusCode::ACCEPTED,
        Json(requests::create(&state, &who, &body, accept).await?),
    ))
}

/// Requests, newest first, with overdue ones flagged.
#[utoipa::path(get, path = "/v1/subject-requests", tag = "subject requests",
    params(("limit" = Option<u32>, Query, description = "1 to 1000, default 100")),
    responses((status = 200, body = Vec<RequestView>)), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    who: Principal,
    mut p: Params,
) -> Result<Json<Vec<RequestView>>> {
    p.allow(&["limit"]);
    let limit = p.limit();
    p.finish()?;
    Ok(Json(requests::list(&state, &who, limit).await?))
}

/// One request: status, due date, and the signed receipt of an erasure.
#[utoipa::path(get, path = "/v1/subject-requests/{id}", tag = "subject requests", params(("id" = String, Path)),
    responses((status = 200, body = RequestView), (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn show(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<RequestView>> {
    Ok(Json(requests::get(&state, &who, &id).await?))
}

/// Extend the deadline once, by two further months.
#[utoipa::path(post, path = "/v1/subject-requests/{id}/extend", tag = "subject requests", params(("id" = String, Path)),
    request_body(content = super::openapi::ReasonInput, content_type = "application/json"),
    responses((status = 200, body = RequestView), (status = 409, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn extend(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Json<RequestView>> {
    Ok(Json(requests::extend(&state, &who, &id, &body).await?))
}

/// The signed access export (JSON), with `X-Export-SHA256` and `X-Export-Signature`.
#[utoipa::path(get, path = "/v1/subject-requests/{id}/export", tag = "subject requests",
    params(("id" = String, Path), ("X-Access-Reason" = Option<String>, Header, description = "required of privacy officers")),
    responses((status = 200, description = "the export document"), (status = 409, body = crate::error::Problem),
              (status = 410, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn download(
    State(state): State<AppState>,
    who: Principal,
    reason: AccessReason,
    Path(id): Path<String>,
) -> Result<Response> {
    let (headers, body): (HeaderMap, Body) =
        export::download(&state, &who, &id, reason.0.as_deref()).await?;
    Ok((headers, body).into_response())
}
