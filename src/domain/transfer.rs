//! A transfer as submitted: parsed and checked against the flow table.

use chrono::{DateTime, Duration, Utc};
use serde_json::{json, Value};

use super::fields::{Errors, Obj};
use super::payload::Payload;
use super::{CarrierId, Category, Country, Direction, LegalBasis, Purpose};
use crate::error::FieldError;
use crate::retention::RetentionPolicy;

const FIELDS: &[&str] = &[
    "carrier_id",
    "direction",
    "category",
    "purpose",
    "legal_basis",
    "consent",
    "jurisdiction",
    "occurred_at",
    "payload",
    "retention_days",
    "idempotency_key",
];

/// How far in the future `occurred_at` may lie, for clock skew.
const MAX_CLOCK_SKEW: Duration = Duration::minutes(5);

#[derive(Debug, Clone)]
pub struct ConsentRef {
    pub reference: String,
    pub granted_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
pub struct NewTransfer {
    pub carrier_id: CarrierId,
    pub direction: Direction,
    pub category: Category,
    pub purpose: Purpose,
    pub legal_basis: LegalBasis,
    pub consent: Option<ConsentRef>,
    pub jurisdiction: Country,
    pub occurred_at: DateTime<Utc>,
    pub payload: Payload,
    pub retention_days: Option<u32>,
    /// `occurred_at` plus the retention in force when it was parsed.
    pub retain_until: DateTime<Utc>,
    pub idempotency_key: Option<String>,
    /// The normalized request, canonically serialized. Its keyed hash
    /// tells a retry (same idempotency key, same transfer) from a reuse of
    /// the key for another transfer. Holds personal data: never log it.
    pub canonical: String,
}

impl NewTransfer {
    /// Parses one transfer against the flow table and the retention policy
    /// in force, naming every bad field (prefixed by `path`).
    pub fn parse(
        value: &Value,
        path: &str,
        now: DateTime<Utc>,
        retention: &RetentionPolicy,
    ) -> Result<Self, Vec<FieldError>> {
        let mut errs = Errors::default();
        let parsed = Self::parse_into(value, path, now, retention, &mut errs);
        match parsed {
            Some(t) if errs.is_empty() => Ok(t),
            _ => Err(errs.0),
        }
    }

    fn parse_into(
        value: &Value,
        path: &str,
        now: DateTime<Utc>,
        retention: &RetentionPolicy,
        errs: &mut Errors,
    ) -> Option<Self> {
        let obj = Obj::new(value, path, errs)?;
        obj.deny_unknown(FIELDS, errs);

        let carrier_id = obj.str("carrier_id", true, errs).and_then(|s| {
            CarrierId::parse(s)
                .map_err(|e| errs.add(obj.path("carrier_id"), e))
                .ok()
        });
        let direction: Option<Direction> =
            obj.parse("direction", true, errs, &Direction::expected());
        let category: Option<Category> = obj.parse("category", true, errs, &Category::expected());
        let purpose: Option<Purpose> = obj.parse("purpose", true, errs, &Purpose::expected());
        let legal_basis: Option<LegalBasis> =
            obj.parse("legal_basis", true, errs, &LegalBasis::expected());
        let jurisdiction = obj.str("jurisdiction", true, errs).and_then(|s| {
            Country::parse(s)
                .map_err(|e| errs.add(obj.path("jurisdiction"), e))
                .ok()
        });
        let occurred_at = obj.time("occurred_at", true, errs);
        if occurred_at.is_some_and(|t| t > now + MAX_CLOCK_SKEW) {
            errs.add(obj.path("occurred_at"), "must not be in the future");
        }
        let retention_days = obj
            .uint("retention_days", 1, 36_500, false, errs)
            .map(|d| d as u32);
        let retain_until = match (category, &jurisdiction, occurred_at) {
            (Some(category), Some(jurisdiction), Some(occurred_at)) => retention
                .retain_until(category, jurisdiction, occurred_at, retention_days)
                .map_err(|m| errs.add(obj.path("retention_days"), m))
                .ok(),
            _ => None,
        };
        let idempotency_key = obj.text("idempotency_key", 255, false, errs);

        let consent = obj.object("consent", false, errs).and_then(|c| {
            c.deny_unknown(&["reference", "granted_at"], errs);
            let reference = c.text("reference", 128, true, errs);
            let granted_at = c.time("granted_at", false, errs);
            if granted_at.is_some_and(|t| t > now + MAX_CLOCK_SKEW) {
                errs.add(c.path("granted_at"), "must not be in the future");
            }
            reference.map(|reference| ConsentRef {
                reference,
                granted_at,
            })
        });
        if category == Some(Category::NumberAssignment) {
            if legal_basis == Some(LegalBasis::Consent) {
                errs.add(
                    obj.path("legal_basis"),
                    "number_assignment relies on the customer tenant's authorization of the \
                     carrier (a customer_operator consent), not on a data subject's consent; \
                     use contract",
                );
            }
        } else if legal_basis == Some(LegalBasis::Consent) && obj.get("consent").is_none() {
            errs.add(
                obj.path("consent"),
                "is required when legal_basis is consent",
            );
        }

        if let (Some(category), Some(direction)) = (category, direction) {
            let (allowed_direction, purposes) = category.flow();
            if direction != allowed_direction {
                errs.add(
                    obj.path("direction"),
                    format!("{category} data only crosses {allowed_direction}"),
                );
            }
            if let Some(purpose) = purpose {
                if !purposes.contains(&purpose) {
                    let allowed: Vec<_> = purposes.iter().map(|p| p.as_str()).collect();
                    errs.add(
                        obj.path("purpose"),
                        format!(
                            "{category} may only be transferred for: {}",
                            allowed.join(", ")
                        ),
                    );
                }
            }
        }

        let payload = match (category, obj.required("payload", errs)) {
            (Some(category), Some(p)) => Payload::parse(category, p, &obj.path("payload"), errs),
            _ => None,
        };

        let t = Self {
            carrier_id: carrier_id?,
            direction: direction?,
            category: category?,
            purpose: purpose?,
            legal_basis: legal_basis?,
            consent,
            jurisdiction: jurisdiction?,
            occurred_at: occurred_at?,
            payload: payload?,
            retention_days,
            retain_until: retain_until?,
            idempotency_key,
            canonical: String::new(),
        };
        Some(t.with_canonical())
    }

    fn with_canonical(mut self) -> Self {
        let slots: Vec<_> = self
            .payload
            .slots
            .iter()
            .map(|s| json!({"name": s.name, "fields": s.fields}))
            .collect();
        let canonical = json!({
            "carrier_id": self.carrier_id.as_str(),
            "direction": self.direction,
            "category": self.category,
            "purpose": self.purpose,
            "legal_basis": self.legal_basis,
            "consent": self.consent.as_ref().map(|c| json!({"reference": c.reference, "granted_at": c.granted_at})),
            "jurisdiction": self.jurisdiction,
            "occurred_at": self.occurred_at.timestamp_micros(),
            "body": self.payload.body,
            "slots": slots,
            "retention_days": self.retention_days,
        });
        self.canonical = canonical.to_string();
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cdr() -> Value {
        json!({
            "carrier_id": "carrier-a", "direction": "platform_to_carrier", "category": "call_detail_record",
            "purpose": "troubleshooting", "legal_basis": "contract", "jurisdiction": "FR",
            "occurred_at": "2026-01-01T10:02:00Z",
            "payload": {"call_id": "c-1", "caller": "+33123456789", "callee": "+33123456780",
                        "start_time": "2026-01-01T10:00:00Z", "end_time": "2026-01-01T10:01:00Z",
                        "duration_seconds": 60, "call_direction": "outbound", "disconnect_reason": "normal"}
        })
    }

    fn fields(v: &Value) -> Vec<String> {
        NewTransfer::parse(v, "", Utc::now(), &RetentionPolicy::default_policy())
            .unwrap_err()
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn a_valid_cdr_parses() {
        let t =
            NewTransfer::parse(&cdr(), "", Utc::now(), &RetentionPolicy::default_policy()).unwrap();
        assert_eq!(t.category, Category::CallDetailRecord);
        assert_eq!(t.payload.slots.len(), 2);
    }

    #[test]
    fn combinations_outside_the_flow_table_are_refused() {
        let mut v = cdr();
        v["direction"] = "carrier_to_platform".into();
        v["purpose"] = "usage_reporting".into();
        assert_eq!(fields(&v), vec!["direction", "purpose"]);
    }

    #[test]
    fn consent_basis_needs_a_consent() {
        let mut v = cdr();
        v["legal_basis"] = "consent".into();
        assert_eq!(fields(&v), vec!["consent"]);
    }

    #[test]
    fn policy_rules_are_named_with_every_other_bad_field() {
        let mut v = cdr();
        v["retention_days"] = 999.into();
        v["payload"]["caller"] = "nope".into();
        let mut f = fields(&v);
        f.sort();
        assert_eq!(f, ["payload.caller", "retention_days"]);

        let v = json!({
            "carrier_id": "carrier-a", "direction": "platform_to_carrier", "category": "number_assignment",
            "purpose": "service_provisioning", "legal_basis": "consent", "jurisdiction": "FR",
            "occurred_at": "2026-01-01T10:02:00Z", "retention_days": 5000,
            "payload": {"phone_number": "bad", "sip_uri": "sip:+33123456789@sbc.example",
                        "customer_tenant_id": "t-1", "action": "assigned",
                        "effective_at": "2026-01-01T10:00:00Z"}
        });
        let mut f = fields(&v);
        f.sort();
        // (No consent named: a number assignment may rely on its tenant's.)
        assert_eq!(f, ["legal_basis", "payload.phone_number", "retention_days"]);
    }

    #[test]
    fn retention_days_out_of_range_get_one_message() {
        for bad in [json!(0), json!(10.5), json!(-1), json!("10"), json!(36_501)] {
            let mut v = cdr();
            v["retention_days"] = bad.clone();
            let errs = NewTransfer::parse(&v, "", Utc::now(), &RetentionPolicy::default_policy())
                .unwrap_err();
            assert_eq!(errs.len(), 1, "{bad}");
            assert_eq!(
                errs[0].message, "must be a whole number from 1 to 36500",
                "{bad}"
            );
        }
    }

    #[test]
    fn retention_is_the_policy_maximum_unless_shortened() {
        let policy = RetentionPolicy::default_policy();
        let mut v = cdr();
        let t = NewTransfer::parse(&v, "", Utc::now(), &policy).unwrap();
        let fr = Country::parse("FR").unwrap();
        let max = policy.max_days(Category::CallDetailRecord, &fr);
        assert_eq!(t.retain_until, t.occurred_at + Duration::days(max.into()));
        v["retention_days"] = 7.into();
        let t = NewTransfer::parse(&v, "", Utc::now(), &policy).unwrap();
        assert_eq!(t.retain_until, t.occurred_at + Duration::days(7));
    }

    #[test]
    fn the_same_transfer_spelled_differently_hashes_the_same() {
        let a =
            NewTransfer::parse(&cdr(), "", Utc::now(), &RetentionPolicy::default_policy()).unwrap();
        let mut v = cdr();
        v["payload"]["caller"] = "+33 1 23 45 67 89".into();
        let b = NewTransfer::parse(&v, "", Utc::now(), &RetentionPolicy::default_policy()).unwrap();
        assert_eq!(a.canonical, b.canonical);
        v["payload"]["duration_seconds"] = 61.into();
        let c = NewTransfer::parse(&v, "", Utc::now(), &RetentionPolicy::default_policy()).unwrap();
        assert_ne!(a.canonical, c.canonical);
    }

    #[test]
    fn future_occurrences_and_unknown_fields_are_named() {
        let mut v = cdr();
        v["occurred_at"] = "2999-01-01T00:00:00Z".into();
        v["extra"] = 1.into();
        assert_eq!(fields(&v), vec!["extra", "occurred_at"]);
    }
}
