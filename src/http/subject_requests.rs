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
#[utoipa::path(post, operation_id = "create_subject_request", path = "/v1/subject-requests", tag = "subject requests",
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

/// Requests, newest first, with overdue ones flagged. When more follow,
/// a `Link` header (`rel="next"`) gives the next page.
#[utoipa::path(get, operation_id = "list_subject_requests", path = "/v1/subject-requests", tag = "subject requests",
    params(("status" = Option<String>, Query, description = "received, processing or completed"),
           ("overdue" = Option<bool>, Query, description = "true: only requests not completed and past due_at; false: only the others"),
           ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "1 to 1000, default 100"),
           ("cursor" = Option<String>, Query, description = "from the Link header of the previous page")),
    responses((status = 200, body = Vec<RequestView>,
               headers(("Link" = String, description = "<…>; rel=\"next\" when more requests follow")))),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    who: Principal,
    mut p: Params,
) -> Result<Response> {
    p.allow(&["status", "overdue", "limit", "cursor"]);
    let status = p.parse("status", |s| match s {
        "received" | "processing" | "completed" => Ok(s.to_string()),
        _ => Err("must be received, processing or completed".into()),
    });
    let filter = requests::ListFilter {
        overdue: p.flag("overdue"),
        limit: p.limit(),
        after: p.cursor(crate::storage::Listing::SubjectRequests),
        status,
    };
    p.finish()?;
    let (views, next) = requests::list(&state, &who, &filter).await?;
    let mut response = Json(views).into_response();
    if let Some(cursor) = next {
        let mut filters = vec![("limit", filter.limit.to_string())];
        filters.extend(filter.status.map(|s| ("status", s)));
        filters.extend(filter.overdue.map(|o| ("overdue", o.to_string())));
        response.headers_mut().insert(
            header::LINK,
            super::extract::next_link("/v1/subject-requests", &filters, &cursor),
        );
    }
    Ok(response)
}

/// One request: status, due date, and the signed receipt of an erasure.
/// `Prefer: wait=N` waits up to N seconds (at most 30) for it to complete.
#[utoipa::path(get, operation_id = "show_subject_request", path = "/v1/subject-requests/{id}", tag = "subject requests",
    params(("id" = String, Path),
           ("Prefer" = Option<String>, Header, description = "wait=N: answer once the request is completed, or after N seconds (at most 30)")),
    responses((status = 200, body = RequestView), (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn show(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response> {
    let wait = prefer_wait(&headers);
    let view = requests::get(&state, &who, &id, wait).await?;
    let mut response = Json(view).into_response();
    if let Some(w) = wait {
        let applied = format!("wait={}", w.min(requests::MAX_WAIT).as_secs());
        if let Ok(v) = header::HeaderValue::from_str(&applied) {
            response
                .headers_mut()
                .insert(header::HeaderName::from_static("preference-applied"), v);
        }
    }
    Ok(response)
}

/// `Prefer: wait=N` (RFC 7240): seconds the client is willing to wait.
/// Anything else in the header is ignored, as the RFC asks.
fn prefer_wait(headers: &HeaderMap) -> Option<std::time::Duration> {
    headers
        .get_all(header::HeaderName::from_static("prefer"))
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|p| p.trim().strip_prefix("wait="))
        .find_map(|n| n.trim().parse::<u64>().ok())
        .map(std::time::Duration::from_secs)
}

/// Extend the deadline once, by two further months.
#[utoipa::path(post, path = "/v1/subject-requests/{id}/extend", tag = "subject requests", params(("id" = String, Path)),
    request_body(content = super::openapi::ReasonInput, content_type = "application/json"),
    responses((status = 200, body = RequestView), (status = 404, body = crate::error::Problem),
              (status = 409, body = crate::error::Problem)),
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
    responses((status = 200, description = "the export document"), (status = 404, body = crate::error::Problem),
              (status = 409, body = crate::error::Problem), (status = 410, body = crate::error::Problem)),
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
