//! `/v1/retention`: the policy in force and the sweeps.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
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
use crate::storage::{encode_cursor, next_page, Listing};

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
        // Not `o.get`, which reads null as absent.
        match body.get("dry_run") {
            None => false,
            // Null included: whether to delete is never left to a default.
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
        tokio::spawn(async move { sweep::run(&task_state, &who, dry_run, batch, None).await })
            .await
            .map_err(|e| AppError::Internal(anyhow::anyhow!("sweep task failed: {e}")))??;
    Ok((StatusCode::CREATED, Json(report)))
}

/// Past sweeps, newest first. When more follow, a `Link` header
/// (`rel="next"`) gives the next page.
#[utoipa::path(get, path = "/v1/retention/sweeps", tag = "retention",
    params(("dry_run" = Option<bool>, Query, description = "true: only dry runs; false: only sweeps that deleted"),
           ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "1 to 1000, default 100"),
           ("cursor" = Option<String>, Query, description = "from the Link header of the previous page")),
    responses((status = 200, body = Vec<SweepReport>,
               headers(("Link" = String, description = "<…>; rel=\"next\" when more sweeps follow")))),
    security(("bearer" = [])))]
pub async fn list_sweeps(
    State(state): State<AppState>,
    who: Principal,
    mut p: Params,
) -> Result<Response> {
    state.authorize(&who, "sweeps", "read")?;
    p.allow(&["dry_run", "limit", "cursor"]);
    let dry_run = p.flag("dry_run");
    let limit = p.limit();
    let after = p.cursor(Listing::Sweeps);
    p.finish()?;
    let mut rows =
        crate::storage::retention::list_sweeps(&state.db, dry_run, after, limit + 1).await?;
    let next = next_page(&mut rows, limit, |r| {
        encode_cursor(Listing::Sweeps, r.started_at, r.id)
    });
    audit::record(
        &state,
        Some(&who),
        Event::new(
            "retention.sweeps.read",
            json!({"returned": rows.len(), "filters": {"dry_run": dry_run, "after": after.map(|(at, id)| json!([at, id]))}}),
        ),
    )
    .await?;
    let mut response =
        Json(rows.into_iter().map(SweepReport::from).collect::<Vec<_>>()).into_response();
    if let Some(cursor) = next {
        let mut filters = vec![("limit", limit.to_string())];
        filters.extend(dry_run.map(|d| ("dry_run", d.to_string())));
        response.headers_mut().insert(
            header::LINK,
            super::extract::next_link("/v1/retention/sweeps", &filters, &cursor),
        );
    }
    Ok(response)
}
