//! Bearer tokens. The algorithm is fixed by configuration and never taken
//! from the token; `iss`, `aud`, `exp`, `nbf` and `iat` are required.

use chrono::Utc;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::Role;
use crate::domain::CarrierId;

/// Seconds of clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECONDS: u64 = 30;

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carrier: Option<String>,
    pub iss: String,
    pub aud: String,
    pub exp: i64,
    pub nbf: i64,
    pub iat: i64,
}

#[derive(Debug)]
pub struct Verified {
    pub sub: String,
    pub role: Role,
    pub carrier: Option<CarrierId>,
}

pub struct TokenVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl TokenVerifier {
    pub fn hs256(secret: &SecretString, issuer: &str, audience: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.validate_exp = true;
        validation.leeway = LEEWAY_SECONDS;
        Self {
            key: DecodingKey::from_secret(secret.expose_secret().as_bytes()),
            validation,
        }
    }

    /// Verifies signature and claims. The error is safe to show the caller.
    pub fn verify(&self, token: &str) -> Result<Verified, String> {
        use jsonwebtoken::errors::ErrorKind;
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => "token expired",
                    ErrorKind::ImmatureSignature => "token not yet valid",
                    ErrorKind::InvalidIssuer => "token issuer not accepted",
                    ErrorKind::InvalidAudience => "token audience not accepted",
                    ErrorKind::InvalidSignature => "token signature invalid",
                    ErrorKind::InvalidAlgorithm => "token algorithm not accepted",
                    ErrorKind::MissingRequiredClaim(_) => "token lacks a required claim",
                    _ => "token malformed",
                }
                .to_string()
            })?;
        let c = data.claims;
        let role: Role = c
            .role
            .parse()
            .map_err(|_| format!("unknown role; expected one of: {}", Role::expected()))?;
        let carrier = match (role, c.carrier) {
            (Role::Carrier, Some(id)) => {
                Some(CarrierId::parse(&id).map_err(|e| format!("carrier claim {e}"))?)
            }
            (Role::Carrier, None) => return Err("the carrier role requires a carrier claim".into()),
            (_, _) => None,
        };
        if c.sub.is_empty() || c.sub.len() > 256 {
            return Err("sub claim must be 1 to 256 characters".into());
        }
        Ok(Verified {
            sub: c.sub,
            role,
            carrier,
        })
    }
}

/// Signs tokens with the configured HS256 secret (CLI and tests).
pub struct TokenIssuer {
    key: EncodingKey,
    issuer: String,
    audience: String,
}

impl TokenIssuer {
    pub fn hs256(secret: &SecretString, issuer: &str, audience: &str) -> Self {
        Self {
            key: EncodingKey::from_secret(secret.expose_secret().as_bytes()),
            issuer: issuer.into(),
            audience: audience.into(),
        }
    }

    pub fn issue(
        &self,
        sub: &str,
        role: Role,
        carrier: Option<&str>,
        ttl: std::time::Duration,
    ) -> anyhow::Result<String> {
        let now = Utc::now().timestamp();
        let claims = Claims {
            sub: sub.into(),
            role: role.as_str().into(),
            carrier: carrier.map(str::to_string),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            exp: now + ttl.as_secs() as i64,
            nbf: now,
            iat: now,
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.key,
        )?)
    }
}
