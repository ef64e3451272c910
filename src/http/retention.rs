//! `/v1/retention`: the policy in force and the sweeps.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::extract::{OptionalJsonBody, Params};
use crate::app::AppState;
use crate::audit::{self, Event};
use crate::auth::Principal;
use crate::domain::fields::{Errors, Obj};
use crate::error::{AppError, Result};
use crate::retention::sweep::{self, SweepReport};
use crate::retention::RetentionPolicy;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/retention/policy", get(policy))
        .route("/retention/sweeps", get(list_sweeps).post(run_sweep))
}

/// Maximum retention per category and per-jurisdiction overrides, in days.
#[utoipa::path(get, path = "/v1/retention/policy", tag = "retention",
    responses((status = 200, body = RetentionPolicy)), security(("bearer" = [])))]
pub async fn policy(
    State(state): State<AppState>,
    who: Principal,
) -> Result<Json<RetentionPolicy>> {
    state.authorize(&who, "retention", "read")?;
    let policy = (*state.retention()).clone();
    audit::record(
        &state,
        Some(&who),
        Event::new("retention.policy.read", json!({})),
    )
    .await?;
    Ok(Json(policy))
}

/// Run a sweep now. `409` if one is already running.
#[utoipa::path(post, path = "/v1/retention/sweeps", tag = "retention",
    request_body(content = Option<super::openapi::SweepInput>, content_type = "application/json",
        description = "optional: no body runs a sweep that deletes"),
    responses((status = 201, body = SweepReport), (status = 409, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn run_sweep(
    State(state): State<AppState>,
    who: Principal,
    OptionalJsonBody(body): OptionalJsonBody,
) -> Result<(StatusCode, Json<SweepReport>)> {
    state.authorize(&who, "sweeps", "write")?;
    let mut errs = Errors::default();
    let dry_run = Obj::new(&body, "", &mut errs).map(|o| {
        o.deny_unknown(&["dry_run"], &mut errs);
        match o.get("dry_run") {
            None => false,
            Some(v) => v.as_bool().unwrap_or_else(|| {
                errs.add("dry_run", "must be true or false");
                false
            }),
        }
    });
    let Some(dry_run) = dry_run.filter(|_| errs.is_empty()) else {
        return Err(AppError::Validation(errs.0));
    };
    // Its own task: a client that disconnects, or a request timeout, does
    // not cut the sweep short.
    let (task_state, batch) = (state.clone(), state.config.sweep_batch);
    let report =
        tokio::spawn(
            async move { sweep::run(&task_state, &who, dry_run, batch, &|_, _| {}).await },
        )
        .await
        .map_err(|e| AppError::Internal(anyhow::anyhow!("sweep task failed: {e}")))??;
    Ok((StatusCode::CREATED, Json(report)))
}

/// Past sweeps, newest first.
#[utoipa::path(get, path = "/v1/retention/sweeps", tag = "retention",
    params(("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "1 to 1000, default 100")),
    responses((status = 200, body = Vec<SweepReport>)), security(("bearer" = [])))]
pub async fn list_sweeps(
    State(state): State<AppState>,
    who: Principal,
    mut p: Params,
) -> Result<Json<Vec<SweepReport>>> {
    state.authorize(&who, "sweeps", "read")?;
    p.allow(&["limit"]);
    let limit = p.limit();
    p.finish()?;
    let rows = crate::storage::retention::list_sweeps(&state.db, limit).await?;
    audit::record(
        &state,
        Some(&who),
        Event::new("retention.sweeps.read", json!({"returned": rows.len()})),
    )
    .await?;
    Ok(Json(rows.into_iter().map(SweepReport::from).collect()))
}
