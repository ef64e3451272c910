//! The verified caller, extracted once per request.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::policy::Reach;
use super::Role;
use crate::app::AppState;
use crate::domain::CarrierId;
use crate::error::AppError;

#[derive(Debug, Clone)]
pub struct Principal {
    pub sub: String,
    pub role: Role,
    /// Set for (and only for) the carrier role, from the verified token.
    pub carrier: Option<CarrierId>,
}

impl Principal {
    /// The carrier every storage query of this caller is confined to, if any.
    pub fn scope(&self) -> Option<&str> {
        self.carrier.as_ref().map(CarrierId::as_str)
    }

    fn reach(&self, target: Option<&CarrierId>) -> Reach {
        match (&self.carrier, target) {
            (Some(own), Some(t)) if own == t => Reach::Own,
            // A scoped caller's listing only ever reaches its own carrier.
            (Some(_), None) => Reach::Own,
            _ => Reach::Any,
        }
    }
}

/// Where the extractor leaves who the caller turned out to be, so the layer
/// that audits denied requests can name them.
#[derive(Clone, Default)]
pub struct PrincipalSlot(pub std::sync::Arc<std::sync::Mutex<Option<Principal>>>);

impl PrincipalSlot {
    pub fn get(&self) -> Option<Principal> {
        self.0.lock().expect("slot lock").clone()
    }
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| AppError::Unauthorized("missing Authorization: Bearer token".into()))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| {
                // RFC 9110 §11.1: the scheme is case-insensitive.
                let (scheme, token) = h.trim_start().split_once([' ', '\t'])?;
                scheme.eq_ignore_ascii_case("bearer").then_some(token)
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                AppError::Unauthorized("the Authorization header must be `Bearer <token>`".into())
            })?;
        let v = state
            .tokens()
            .verify(token)
            .map_err(AppError::Unauthorized)?;
        let principal = Self {
            sub: v.sub,
            role: v.role,
            carrier: v.carrier,
        };
        if let Some(slot) = parts.extensions.get::<PrincipalSlot>() {
            *slot.0.lock().expect("slot lock") = Some(principal.clone());
        }
        Ok(principal)
    }
}

impl AppState {
    /// May `who` perform `act` on `obj` within its own scope (listings and
    /// reads, which storage confines to the caller's carrier)?
    pub fn authorize(&self, who: &Principal, obj: &str, act: &str) -> Result<(), AppError> {
        self.authorize_reach(who, who.reach(None), obj, act, false)
    }

    /// May `who` perform `act` on `obj` for `carrier`?
    pub fn authorize_for(
        &self,
        who: &Principal,
        carrier: &CarrierId,
        obj: &str,
        act: &str,
    ) -> Result<(), AppError> {
        self.authorize_reach(who, who.reach(Some(carrier)), obj, act, true)
    }

    /// May `who` perform `act` on any of `objs` for some carrier? A cheap
    /// check before validating a body, so callers without any right learn
    /// nothing from validation errors.
    pub fn authorize_any(&self, who: &Principal, objs: &[&str], act: &str) -> Result<(), AppError> {
        let policy = self.policy();
        let reaches = [Reach::Own, Reach::Any];
        if objs
            .iter()
            .any(|o| reaches.iter().any(|r| policy.allows(who.role, *r, o, act)))
        {
            Ok(())
        } else {
            Err(AppError::Forbidden(format!(
                "the {} role may not {act} {}",
                who.role,
                objs.join(" or ")
            )))
        }
    }

    fn authorize_reach(
        &self,
        who: &Principal,
        reach: Reach,
        obj: &str,
        act: &str,
        named_carrier: bool,
    ) -> Result<(), AppError> {
        if self.policy().allows(who.role, reach, obj, act) {
            Ok(())
        } else {
            // A carrier is named only where one is involved: policies and
            // keys belong to no carrier.
            let whose = match (reach, named_carrier) {
                (Reach::Own, _) => " for its own carrier",
                (Reach::Any, true) => " for this carrier",
                (Reach::Any, false) => "",
            };
            Err(AppError::Forbidden(format!(
                "the {} role may not {act} {obj}{whose}",
                who.role
            )))
        }
    }
}
