//! Consents that transfers rely on: a customer tenant's authorization of a
//! carrier (Operator Connect), and a data subject's own consent.

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::fields::{Errors, Obj};
use super::{string_enum, CarrierId, Country, SubjectId};
use crate::error::FieldError;

string_enum!(ConsentKind {
    CustomerOperator = "customer_operator",
    DataSubject = "data_subject",
});

string_enum!(ConsentStatus {
    Active = "active",
    Suspended = "suspended",
    Removed = "removed",
    Withdrawn = "withdrawn",
});

impl ConsentKind {
    /// Every casbin object that writes a consent, one per kind.
    pub const WRITE_OBJECTS: [&'static str; 2] =
        ["consents/customer_operator", "consents/data_subject"];

    /// The casbin object for writing a consent of this kind: who may
    /// register or change a customer's authorization of a carrier is not who
    /// may record a subscriber's own consent (the carrier it authorizes must
    /// not grant or revive it for itself).
    pub fn write_object(self) -> &'static str {
        match self {
            ConsentKind::CustomerOperator => Self::WRITE_OBJECTS[0],
            ConsentKind::DataSubject => Self::WRITE_OBJECTS[1],
        }
    }

    /// The statuses a consent of this kind can be moved to from `from`.
    pub fn may_move(self, from: ConsentStatus, to: ConsentStatus) -> Result<(), String> {
        use ConsentStatus::*;
        let allowed: &[ConsentStatus] = match (self, from) {
            (_, Removed | Withdrawn) => &[],
            (ConsentKind::CustomerOperator, Active) => &[Suspended, Removed],
            (ConsentKind::CustomerOperator, Suspended) => &[Active, Removed],
            (ConsentKind::DataSubject, Active) => &[Withdrawn],
            (ConsentKind::DataSubject, Suspended) => &[Active, Withdrawn],
        };
        if allowed.contains(&to) {
            Ok(())
        } else if allowed.is_empty() {
            Err(format!("a {from} consent is final and cannot change"))
        } else {
            let names: Vec<_> = allowed.iter().map(|s| s.as_str()).collect();
            Err(format!(
                "a {self} consent that is {from} can only become: {}",
                names.join(", ")
            ))
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewConsent {
    pub reference: String,
    pub kind: ConsentKind,
    pub carrier_id: CarrierId,
    pub customer_tenant_id: Option<String>,
    pub subject: Option<SubjectId>,
    pub countries: Vec<Country>,
    pub granted_at: DateTime<Utc>,
}

impl NewConsent {
    pub fn parse(value: &Value, now: DateTime<Utc>) -> Result<Self, Vec<FieldError>> {
        let mut errs = Errors::default();
        let c = Self::parse_into(value, now, &mut errs);
        match c {
            Some(c) if errs.is_empty() => Ok(c),
            _ => Err(errs.0),
        }
    }

    fn parse_into(value: &Value, now: DateTime<Utc>, errs: &mut Errors) -> Option<Self> {
        let obj = Obj::new(value, "", errs)?;
        obj.deny_unknown(
            &[
                "reference",
                "kind",
                "carrier_id",
                "customer_tenant_id",
                "subject",
                "countries",
                "granted_at",
            ],
            errs,
        );
        let reference = obj.text("reference", 128, true, errs);
        let kind: Option<ConsentKind> = obj.parse("kind", true, errs, &ConsentKind::expected());
        let carrier_id = obj.str("carrier_id", true, errs).and_then(|s| {
            CarrierId::parse(s)
                .map_err(|e| errs.add("carrier_id", e))
                .ok()
        });
        let granted_at = obj.time("granted_at", true, errs);
        if granted_at.is_some_and(|t| t > now + chrono::Duration::minutes(5)) {
            errs.add("granted_at", "must not be in the future");
        }

        let mut countries = Vec::new();
        match obj.required("countries", errs) {
            Some(Value::Array(items)) if !items.is_empty() => {
                for (i, item) in items.iter().enumerate() {
                    match item.as_str().map(Country::parse) {
                        Some(Ok(c)) if !countries.contains(&c) => countries.push(c),
                        Some(Ok(_)) => {}
                        Some(Err(e)) => errs.add(format!("countries[{i}]"), e),
                        None => errs.add(format!("countries[{i}]"), "must be a string"),
                    }
                }
            }
            Some(_) => errs.add(
                "countries",
                "must be a non-empty array of ISO 3166-1 alpha-2 codes",
            ),
            None => {}
        }

        let mut customer_tenant_id = None;
        let mut subject = None;
        match kind {
            Some(ConsentKind::CustomerOperator) => {
                customer_tenant_id = obj.ident("customer_tenant_id", 128, true, errs);
                if obj.get("subject").is_some() {
                    errs.add("subject", "is only for data_subject consents");
                }
            }
            Some(ConsentKind::DataSubject) => {
                subject = parse_subject(&obj, "subject", errs);
                if obj.get("customer_tenant_id").is_some() {
                    errs.add(
                        "customer_tenant_id",
                        "is only for customer_operator consents",
                    );
                }
            }
            None => {}
        }

        Some(Self {
            reference: reference?,
            kind: kind?,
            carrier_id: carrier_id?,
            customer_tenant_id,
            subject,
            countries,
            granted_at: granted_at?,
        })
    }
}

/// `{phone_number}` or `{sip_uri}`: exactly one.
pub fn parse_subject(obj: &Obj<'_>, key: &str, errs: &mut Errors) -> Option<SubjectId> {
    let s = obj.object(key, true, errs)?;
    s.deny_unknown(&["phone_number", "sip_uri"], errs);
    let phone = s.str("phone_number", false, errs);
    let sip = s.str("sip_uri", false, errs);
    match (phone, sip) {
        (Some(p), None) => super::PhoneNumber::parse(p)
            .map(SubjectId::Phone)
            .map_err(|e| errs.add(s.path("phone_number"), e))
            .ok(),
        (None, Some(u)) => super::SipUri::parse(u)
            .map(SubjectId::Sip)
            .map_err(|e| errs.add(s.path("sip_uri"), e))
            .ok(),
        _ => {
            errs.add(
                obj.path(key),
                "must hold exactly one of phone_number or sip_uri",
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_statuses_are_final() {
        use ConsentStatus::*;
        assert!(ConsentKind::CustomerOperator
            .may_move(Active, Suspended)
            .is_ok());
        assert!(ConsentKind::CustomerOperator
            .may_move(Removed, Active)
            .is_err());
        assert!(ConsentKind::DataSubject.may_move(Active, Withdrawn).is_ok());
        assert!(ConsentKind::DataSubject
            .may_move(Withdrawn, Active)
            .is_err());
        assert!(ConsentKind::DataSubject.may_move(Active, Removed).is_err());
    }
}
