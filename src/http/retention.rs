//! `/v1/retention`: the policy in force.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};

use crate::app::AppState;
use crate::auth::Principal;
use crate::error::Result;
use crate::retention::RetentionPolicy;

pub fn router() -> Router<AppState> {
    Router::new().route("/retention/policy", get(policy))
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
    crate::audit::record(
        &state,
        Some(&who),
        crate::audit::Event::new("retention.policy.read", serde_json::json!({})),
    )
    .await?;
    Ok(Json(policy))
}
