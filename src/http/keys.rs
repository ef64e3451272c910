//! `/v1/keys`: rotation and status of the key hierarchy, and the public keys
//! that verify what the service signs; `/v1/policies/reload`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde::Serialize;

use crate::app::{AppState, Reloaded};
use crate::auth::Principal;
use crate::crypto::keyring::Rotatable;
use crate::error::Result;
use crate::ledger::keys::{self as lifecycle, KeyStatus, Rotation};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/keys/export-signing", get(export_signing))
        .route("/keys/export-signing/rotate", post(rotate_signing))
        .route("/keys/rotate", post(rotate))
        .route("/keys/status", get(status))
        .route("/policies/reload", post(reload_policies))
}

/// Adds a master-key version; data keys are rewrapped in the background and
/// old versions keep decrypting until then. Admins.
#[utoipa::path(post, path = "/v1/keys/rotate", tag = "keys",
    responses((status = 202, body = Rotation), (status = 403)), security(("bearer" = [])))]
pub async fn rotate(
    State(state): State<AppState>,
    who: Principal,
) -> Result<(StatusCode, Json<Rotation>)> {
    state.authorize(&who, "keys", "write")?;
    let r = lifecycle::rotate(&state, &who, Rotatable::Master).await?;
    Ok((StatusCode::ACCEPTED, Json(r)))
}

/// Adds an export-signing key version; the old public keys stay published.
#[utoipa::path(post, path = "/v1/keys/export-signing/rotate", tag = "keys",
    responses((status = 201, body = Rotation), (status = 403)), security(("bearer" = [])))]
pub async fn rotate_signing(
    State(state): State<AppState>,
    who: Principal,
) -> Result<(StatusCode, Json<Rotation>)> {
    state.authorize(&who, "keys", "write")?;
    let r = lifecycle::rotate(&state, &who, Rotatable::Signing).await?;
    Ok((StatusCode::CREATED, Json(r)))
}

/// How many data keys each master-key version still wraps.
#[utoipa::path(get, path = "/v1/keys/status", tag = "keys",
    responses((status = 200, body = KeyStatus)), security(("bearer" = [])))]
pub async fn status(State(state): State<AppState>, who: Principal) -> Result<Json<KeyStatus>> {
    state.authorize(&who, "keys", "read")?;
    let status = lifecycle::status(&state).await?;
    crate::audit::record(
        &state,
        Some(&who),
        crate::audit::Event::new(
            "keys.status.read",
            serde_json::json!({"current": status.current, "rewrap_pending": status.rewrap_pending}),
        ),
    )
    .await?;
    Ok(Json(status))
}

/// Re-reads `policies/` (model, rules, retention); a file that does not
/// parse or validate is refused with 422 and the old policy stays.
#[utoipa::path(post, path = "/v1/policies/reload", tag = "keys",
    responses((status = 200, body = Reloaded), (status = 422)), security(("bearer" = [])))]
pub async fn reload_policies(
    State(state): State<AppState>,
    who: Principal,
) -> Result<Json<Reloaded>> {
    state.authorize(&who, "policies", "write")?;
    Ok(Json(crate::ledger::policies::reload(&state, &who).await?))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct PublishedKey {
    pub key_id: String,
    pub public_key: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct SigningKeys {
    pub alg: &'static str,
    /// The current key: base64 of the raw 32-byte Ed25519 public key.
    pub public_key: String,
    pub key_id: String,
    /// Every key still published, so older signatures stay verifiable.
    pub keys: Vec<PublishedKey>,
}

/// The Ed25519 public key that signs exports, receipts and audit heads.
#[utoipa::path(get, path = "/v1/keys/export-signing", tag = "keys",
    responses((status = 200, body = SigningKeys)), security(("bearer" = [])))]
pub async fn export_signing(
    State(state): State<AppState>,
    who: Principal,
) -> Result<Json<SigningKeys>> {
    state.authorize(&who, "keys/export-signing", "read")?;
    let b64 = |k: &ed25519_dalek::VerifyingKey| {
        base64::engine::general_purpose::STANDARD.encode(k.as_bytes())
    };
    let keys: Vec<PublishedKey> = state
        .keys
        .verifying_keys()
        .iter()
        .map(|(id, k)| PublishedKey {
            key_id: id.clone(),
            public_key: b64(k),
        })
        .collect();
    let current = keys.last().expect("a signing key");
    Ok(Json(SigningKeys {
        alg: "Ed25519",
        public_key: current.public_key.clone(),
        key_id: current.key_id.clone(),
        keys: keys
            .iter()
            .map(|k| PublishedKey {
                key_id: k.key_id.clone(),
                public_key: k.public_key.clone(),
            })
            .collect(),
    }))
}
