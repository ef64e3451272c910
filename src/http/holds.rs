//! `/v1/holds`: legal holds.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json, Router};
use uuid::Uuid;

use super::extract::{JsonBody, Params};
use crate::app::AppState;
use crate::auth::Principal;
use crate::error::{AppError, Result};
use crate::retention::holds::{self, HoldView};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/holds", get(list).post(place))
        .route("/holds/{id}", delete(release))
}

/// Place a legal hold on records matching every given criterion.
#[utoipa::path(post, path = "/v1/holds", tag = "retention",
    request_body(content = super::openapi::HoldInput, content_type = "application/json"),
    responses((status = 201, body = HoldView), (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn place(
    State(state): State<AppState>,
    who: Principal,
    JsonBody(body): JsonBody,
) -> Result<(StatusCode, Json<HoldView>)> {
    Ok((
        StatusCode::CREATED,
        Json(holds::place(&state, &who, &body).await?),
    ))
}

/// Release a hold: the records it kept go with the next sweep.
#[utoipa::path(delete, path = "/v1/holds/{id}", tag = "retention", params(("id" = Uuid, Path)),
    responses((status = 200, body = HoldView), (status = 404, body = crate::error::Problem),
              (status = 409, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn release(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<HoldView>> {
    state.authorize(&who, "holds", "write")?;
    let id = Uuid::parse_str(&id)
        .map_err(|_| AppError::NotFound("no hold with that id (ids are UUIDs)".into()))?;
    Ok(Json(holds::release(&state, &who, id).await?))
}

/// Holds, newest first; `?active=true` for those in force, `false` for
/// those released.
#[utoipa::path(get, operation_id = "list_holds", path = "/v1/holds", tag = "retention", params(("active" = Option<bool>, Query)),
    responses((status = 200, body = Vec<HoldView>)), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    who: Principal,
    mut p: Params,
) -> Result<Json<Vec<HoldView>>> {
    p.allow(&["active"]);
    let active = p.parse("active", |s| {
        s.parse::<bool>()
            .map_err(|_| "must be true or false".to_string())
    });
    p.finish()?;
    Ok(Json(holds::list(&state, &who, active).await?))
}
