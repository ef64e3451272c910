//! Liveness and readiness.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::app::AppState;
use crate::error::{AppError, Result};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200)))]
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// The database is reachable, every migration is applied, and this
/// instance's root key opens the keyring as it now is.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses((status = 200), (status = 503)))]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Value>> {
    state.db.ready().await.map_err(|e| {
        tracing::warn!(error = %e, "not ready");
        AppError::Unavailable("the database is unreachable or not migrated".into())
    })?;
    if let Some(why) = state.keys.unreadable() {
        tracing::warn!(error = %why, "not ready");
        return Err(AppError::Unavailable(
            "this instance's root key does not open the keyring's newest versions (the root key \
             was rotated): restart it with the new root key"
                .into(),
        ));
    }
    Ok(Json(
        json!({"status": "ready", "database": state.db.backend()}),
    ))
}
