//! `/v1/keys`: public keys that verify what the service signs.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use serde::Serialize;

use crate::app::AppState;
use crate::auth::Principal;
use crate::error::Result;

pub fn router() -> Router<AppState> {
    Router::new().route("/keys/export-signing", get(export_signing))
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
