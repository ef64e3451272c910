//! Bearer tokens. The algorithm is fixed by configuration (HS256, or per key
//! of a JWKS document) and never taken from the token; `iss`, `aud`, `exp`,
//! `nbf` and `iat` are required.

use std::collections::HashMap;

use anyhow::Context;
use chrono::Utc;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm};
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
    pub aud: Audience,
    pub exp: i64,
    pub nbf: i64,
    pub iat: i64,
}

/// `aud`: one audience, or several (RFC 7519 §4.1.3). jsonwebtoken checks
/// that the configured one is among them.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug)]
pub struct Verified {
    pub sub: String,
    pub role: Role,
    pub carrier: Option<CarrierId>,
}

/// Verifies bearer tokens: with the HS256 secret (embedded default), or with
/// the public keys of a JWKS document (production), chosen by `kid`. Each
/// key's algorithm comes from the key, never from the token header.
pub struct TokenVerifier {
    keys: Keys,
    issuer: String,
    audience: String,
}

enum Keys {
    Shared(DecodingKey),
    ByKid(HashMap<String, (DecodingKey, Algorithm)>),
}

impl TokenVerifier {
    pub fn hs256(secret: &SecretString, issuer: &str, audience: &str) -> Self {
        Self {
            keys: Keys::Shared(DecodingKey::from_secret(secret.expose_secret().as_bytes())),
            issuer: issuer.into(),
            audience: audience.into(),
        }
    }

    /// Loads a JWKS document of RS256, ES256 and EdDSA public keys.
    pub fn jwks(document: &str, issuer: &str, audience: &str) -> anyhow::Result<Self> {
        let set: JwkSet =
            serde_json::from_str(document).context("the JWKS document does not parse")?;
        let mut keys = HashMap::new();
        for (i, jwk) in set.keys.iter().enumerate() {
            let kid = jwk
                .common
                .key_id
                .clone()
                .with_context(|| format!("JWKS key {i} has no kid"))?;
            let alg = key_algorithm(jwk).with_context(|| format!("JWKS key {kid}"))?;
            check_key_use(jwk).with_context(|| format!("JWKS key {kid}"))?;
            let key = DecodingKey::from_jwk(jwk)
                .with_context(|| format!("JWKS key {kid} is not a usable public key"))?;
            anyhow::ensure!(
                keys.insert(kid.clone(), (key, alg)).is_none(),
                "JWKS kid {kid} appears twice"
            );
        }
        anyhow::ensure!(!keys.is_empty(), "the JWKS document has no keys");
        Ok(Self {
            keys: Keys::ByKid(keys),
            issuer: issuer.into(),
            audience: audience.into(),
        })
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.algorithms = vec![alg];
        v.set_issuer(&[&self.issuer]);
        v.set_audience(&[&self.audience]);
        v.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        v.validate_nbf = true;
        v.validate_exp = true;
        v.leeway = LEEWAY_SECONDS;
        v
    }

    /// Verifies signature and claims. The error is safe to show the caller.
    pub fn verify(&self, token: &str) -> Result<Verified, String> {
        use jsonwebtoken::errors::ErrorKind;
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| "token malformed".to_string())?;
        // RFC 7515 §4.1.11: a critical extension this verifier does not
        // implement (it implements none) makes the token invalid.
        if header.crit.is_some() {
            return Err(
                "token header has critical extensions (crit), none of which are supported".into(),
            );
        }
        let (key, alg) = match &self.keys {
            Keys::Shared(key) => (key, Algorithm::HS256),
            Keys::ByKid(keys) => {
                let kid = header.kid.ok_or("token has no kid")?;
                let (key, alg) = keys
                    .get(&kid)
                    .ok_or("token signed with an unknown key id")?;
                (key, *alg)
            }
        };
        let data =
            jsonwebtoken::decode::<Claims>(token, key, &self.validation(alg)).map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => "token expired",
                    ErrorKind::ImmatureSignature => "token not yet valid",
                    ErrorKind::InvalidIssuer => "token issuer not accepted",
                    ErrorKind::InvalidAudience => "token audience not accepted",
                    ErrorKind::InvalidSignature => "token signature invalid",
                    ErrorKind::InvalidAlgorithm => "token algorithm not accepted",
                    ErrorKind::MissingRequiredClaim(c) => return format!("token lacks the {c} claim"),
                    // serde names a missing field (`missing field `iat``);
                    // other messages may quote the token's content.
                    ErrorKind::Json(e) => match e.to_string().strip_prefix("missing field `") {
                        Some(rest) => {
                            let claim = rest.split('`').next().unwrap_or_default();
                            return format!("token lacks the {claim} claim");
                        }
                        None => "token claims malformed: sub, role, iss, aud, exp, nbf and iat are required, carrier with the carrier role",
                    },
                    _ => "token malformed",
                }
                .to_string()
            })?;
        let c = data.claims;
        // A token cannot have been issued after now: one that says so comes
        // from a clock far off or was made to outlive its stated age. (A
        // minute of skew allowed: identity providers' clocks drift.)
        if c.iat > Utc::now().timestamp() + 60 {
            return Err("token issued in the future (iat)".into());
        }
        let role: Role = c
            .role
            .parse()
            .map_err(|_| format!("unknown role; expected one of: {}", Role::expected()))?;
        let carrier = match (role, c.carrier) {
            (Role::Carrier, Some(id)) => {
                Some(CarrierId::parse(&id).map_err(|e| format!("carrier claim {e}"))?)
            }
            (Role::Carrier, None) => return Err("the carrier role requires a carrier claim".into()),
            // Other roles reach every carrier: a carrier claim on one most
            // likely means an identity provider that meant to narrow it, and
            // ignoring it would widen the caller's reach instead.
            (_, Some(_)) => {
                return Err(format!(
                    "the carrier claim is only accepted with the carrier role, not with {role}"
                ))
            }
            (_, None) => None,
        };
        check_sub(&c.sub).map_err(|e| format!("sub claim {e}"))?;
        Ok(Verified {
            sub: c.sub,
            role,
            carrier,
        })
    }
}

/// The one algorithm a JWK may verify: its `alg`, or the one its key type
/// implies. Only RS256, ES256 and EdDSA are accepted.
fn key_algorithm(jwk: &Jwk) -> anyhow::Result<Algorithm> {
    let implied = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        _ => anyhow::bail!("only RSA, EC P-256 and Ed25519 public keys are accepted"),
    };
    match jwk.common.key_algorithm {
        None => Ok(implied),
        Some(KeyAlgorithm::RS256) if implied == Algorithm::RS256 => Ok(implied),
        Some(KeyAlgorithm::ES256) if implied == Algorithm::ES256 => Ok(implied),
        Some(KeyAlgorithm::EdDSA) if implied == Algorithm::EdDSA => Ok(implied),
        Some(other) => {
            anyhow::bail!("alg {other:?} is not accepted for this key type (RS256, ES256 or EdDSA)")
        }
    }
}

/// RSA moduli accepted, in bits: at least NIST SP 800-131A's 2048, at most
/// the 4096 the `rsa` crate verifies with (a larger key would load and then
/// refuse every token).
const RSA_BITS: std::ops::RangeInclusive<usize> = 2048..=4096;

/// A JWKS key must be meant for verifying signatures (`use`, `key_ops`, if
/// given, say so) and, if RSA, have a modulus of [`RSA_BITS`].
fn check_key_use(jwk: &Jwk) -> anyhow::Result<()> {
    use base64::Engine;
    use jsonwebtoken::jwk::{KeyOperations, PublicKeyUse};
    if let Some(u) = &jwk.common.public_key_use {
        anyhow::ensure!(
            *u == PublicKeyUse::Signature,
            "has \"use\" {u:?}; only signature keys (\"sig\") verify tokens"
        );
    }
    if let Some(ops) = &jwk.common.key_operations {
        anyhow::ensure!(
            ops.contains(&KeyOperations::Verify),
            "has \"key_ops\" without \"verify\""
        );
    }
    if let AlgorithmParameters::RSA(p) = &jwk.algorithm {
        let n = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&p.n)
            .context("the RSA modulus (n) is not unpadded base64url")?;
        let n = &n[n.iter().take_while(|b| **b == 0).count()..];
        let bits = n
            .first()
            .map_or(0, |b| n.len() * 8 - b.leading_zeros() as usize);
        anyhow::ensure!(
            RSA_BITS.contains(&bits),
            "is a {bits}-bit RSA key; {} to {} bits are accepted",
            RSA_BITS.start(),
            RSA_BITS.end()
        );
    }
    Ok(())
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
            aud: Audience::One(self.audience.clone()),
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

/// A token's subject: 1 to 256 bytes (it names the actor in every audit
/// entry). Shared by the verifier and `token issue`.
pub fn check_sub(sub: &str) -> Result<(), &'static str> {
    if sub.is_empty() || sub.len() > 256 {
        return Err("must be 1 to 256 characters");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("../../tests/fixtures/jwt/jwks.json");

    /// The fixture's RSA key with `edit` applied, alone in a JWKS document.
    fn rsa_key_with(edit: impl Fn(&mut serde_json::Value)) -> String {
        let doc: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
        let mut key = doc["keys"][0].clone();
        assert_eq!(key["kty"], "RSA");
        edit(&mut key);
        serde_json::json!({"keys": [key]}).to_string()
    }

    #[test]
    fn jwks_keys_must_be_signature_keys_of_a_safe_size() {
        let load = |doc: String| TokenVerifier::jwks(&doc, "i", "a").map(|_| ());
        load(rsa_key_with(|_| {})).expect("the fixture key is accepted");
        load(rsa_key_with(|k| {
            k.as_object_mut().unwrap().remove("use");
        }))
        .expect("use is optional");
        load(rsa_key_with(|k| {
            k["key_ops"] = serde_json::json!(["verify"])
        }))
        .expect("key_ops naming verify");

        let refused = |doc: String, why: &str| {
            let err = load(doc).expect_err(why);
            assert!(format!("{err:#}").contains(why), "{err:#}");
        };
        refused(
            rsa_key_with(|k| k["use"] = "enc".into()),
            "only signature keys",
        );
        refused(
            rsa_key_with(|k| k["key_ops"] = serde_json::json!(["encrypt"])),
            "without \"verify\"",
        );
        // Moduli of a given bit length (top byte 0x01 << k), with or
        // without a leading zero byte, as some encoders write them.
        let modulus = |bits: usize, leading_zero: bool| {
            use base64::Engine;
            let mut n = vec![0xC5u8; bits.div_ceil(8)];
            n[0] = 1 << ((bits - 1) % 8);
            if leading_zero {
                n.insert(0, 0);
            }
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&n)
        };
        let with_n = |n: String| rsa_key_with(move |k| k["n"] = n.clone().into());
        for bits in [2048, 3072, 4096] {
            load(with_n(modulus(bits, false))).unwrap_or_else(|e| panic!("{bits}: {e:#}"));
        }
        load(with_n(modulus(2048, true))).expect("a leading zero byte does not count");
        refused(with_n(modulus(1024, false)), "is a 1024-bit RSA key");
        refused(with_n(modulus(2047, false)), "is a 2047-bit RSA key");
        refused(with_n(modulus(4097, true)), "is a 4097-bit RSA key");
        refused(with_n(format!("{}=", modulus(2048, false))), "base64url");
    }
}
