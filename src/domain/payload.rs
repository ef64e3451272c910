//! Payload schemas per category. A validated payload is split into the part
//! that identifies each data subject (a "slot": the number of a number
//! assignment, or the caller and the callee of a call) and the shared rest,
//! so that each subject's identifiers can be sealed under that subject's key.

use serde_json::{Map, Value};

use super::fields::{Errors, Obj};
use super::{Category, PhoneNumber, SipUri, SubjectId};

/// The identifying part of a payload for one data subject.
#[derive(Debug, Clone)]
pub struct Slot {
    /// `subject` for a number assignment, `caller` or `callee` for calls.
    pub name: &'static str,
    /// The identifier whose data key seals this slot.
    pub key: SubjectId,
    /// Every identifier the slot can be found by (the key first).
    pub identifiers: Vec<SubjectId>,
    /// The payload fields this slot holds, normalized.
    pub fields: Map<String, Value>,
}

#[derive(Debug, Clone)]
pub struct Payload {
    /// Fields that identify no one on their own; sealed under a per-record
    /// content key that every slot's subject key wraps.
    pub body: Map<String, Value>,
    pub slots: Vec<Slot>,
}

/// The slots a category has, with the payload fields each one holds.
pub fn slot_fields(category: Category) -> &'static [(&'static str, &'static [&'static str])] {
    match category {
        Category::NumberAssignment => &[("subject", &["phone_number", "sip_uri"])],
        _ => &[("caller", &["caller"]), ("callee", &["callee"])],
    }
}

const NUMBER_ASSIGNMENT: &[&str] = &[
    "phone_number",
    "sip_uri",
    "customer_tenant_id",
    "action",
    "effective_at",
];
const CALL_DETAIL_RECORD: &[&str] = &[
    "call_id",
    "caller",
    "callee",
    "start_time",
    "end_time",
    "duration_seconds",
    "call_direction",
    "disconnect_reason",
];
const CALL_QUALITY: &[&str] = &[
    "call_id",
    "caller",
    "callee",
    "mos",
    "jitter_ms",
    "packet_loss_pct",
    "round_trip_ms",
    "codec",
];
const CALL_DURATION: &[&str] = &[
    "call_id",
    "caller",
    "callee",
    "start_time",
    "duration_seconds",
];

/// Thirty days of call is more than any real call; it catches unit mix-ups.
const MAX_DURATION_SECONDS: u64 = 30 * 24 * 3600;

pub fn fields_of(category: Category) -> &'static [&'static str] {
    match category {
        Category::NumberAssignment => NUMBER_ASSIGNMENT,
        Category::CallDetailRecord => CALL_DETAIL_RECORD,
        Category::CallQuality => CALL_QUALITY,
        Category::CallDuration => CALL_DURATION,
    }
}

impl Payload {
    /// Validates `value` against the schema of `category`, recording every
    /// problem under `path`.
    pub fn parse(category: Category, value: &Value, path: &str, errs: &mut Errors) -> Option<Self> {
        let obj = Obj::new(value, path, errs)?;
        obj.deny_unknown(fields_of(category), errs);
        let before = errs.0.len();
        let mut body = Map::new();
        let mut slots = Vec::new();

        match category {
            Category::NumberAssignment => {
                let phone = subject_field(&obj, "phone_number", errs, |s| {
                    PhoneNumber::parse(s).map(SubjectId::Phone)
                });
                let sip = subject_field(&obj, "sip_uri", errs, |s| {
                    SipUri::parse(s).map(SubjectId::Sip)
                });
                put(
                    &mut body,
                    "customer_tenant_id",
                    obj.ident("customer_tenant_id", 128, true, errs),
                );
                let action = obj.str("action", true, errs);
                if let Some(a) = action {
                    if a == "assigned" || a == "unassigned" {
                        body.insert("action".into(), a.into());
                    } else {
                        errs.add(obj.path("action"), "must be one of: assigned, unassigned");
                    }
                }
                put(
                    &mut body,
                    "effective_at",
                    obj.time("effective_at", true, errs).map(rfc3339),
                );
                if let (Some(phone), Some(sip)) = (phone, sip) {
                    let mut fields = Map::new();
                    fields.insert("phone_number".into(), phone.as_str().into());
                    fields.insert("sip_uri".into(), sip.as_str().into());
                    slots.push(Slot {
                        name: "subject",
                        key: phone.clone(),
                        identifiers: vec![phone, sip],
                        fields,
                    });
                }
            }
            Category::CallDetailRecord | Category::CallQuality | Category::CallDuration => {
                put(&mut body, "call_id", obj.text("call_id", 256, true, errs));
                let caller = subject_field(&obj, "caller", errs, SubjectId::parse);
                let callee = subject_field(&obj, "callee", errs, SubjectId::parse);
                for (name, id) in [("caller", caller), ("callee", callee)] {
                    if let Some(id) = id {
                        let mut fields = Map::new();
                        fields.insert(name.into(), id.as_str().into());
                        slots.push(Slot {
                            name,
                            key: id.clone(),
                            identifiers: vec![id],
                            fields,
                        });
                    }
                }
                match category {
                    Category::CallDetailRecord => parse_cdr(&obj, &mut body, errs),
                    Category::CallQuality => parse_quality(&obj, &mut body, errs),
                    _ => {
                        put(
                            &mut body,
                            "start_time",
                            obj.time("start_time", true, errs).map(rfc3339),
                        );
                        put(
                            &mut body,
                            "duration_seconds",
                            obj.uint("duration_seconds", 0, MAX_DURATION_SECONDS, true, errs),
                        );
                    }
                }
            }
        }
        (errs.0.len() == before).then_some(Self { body, slots })
    }

    /// The call id of a call payload.
    pub fn call_id(&self) -> Option<&str> {
        self.body.get("call_id").and_then(Value::as_str)
    }

    /// Rebuilds the payload as submitted (normalized) from its body and the
    /// slots that could be opened; fields of a missing slot (an erased
    /// subject) come back as `null`.
    pub fn assemble(
        category: Category,
        mut body: Map<String, Value>,
        opened: Vec<(String, Map<String, Value>)>,
    ) -> Value {
        for (slot, fields) in slot_fields(category) {
            match opened.iter().find(|(name, _)| name == slot) {
                Some((_, map)) => body.extend(map.clone()),
                None => {
                    for f in *fields {
                        body.insert((*f).to_string(), Value::Null);
                    }
                }
            }
        }
        let order = fields_of(category);
        let mut out = Map::new();
        for f in order {
            if let Some(v) = body.remove(*f) {
                out.insert((*f).to_string(), v);
            }
        }
        Value::Object(out)
    }
}

fn parse_cdr(obj: &Obj<'_>, body: &mut Map<String, Value>, errs: &mut Errors) {
    let start = obj.time("start_time", true, errs);
    let end = obj.time("end_time", true, errs);
    if let (Some(s), Some(e)) = (start, end) {
        if e < s {
            errs.add(obj.path("end_time"), "must not be before start_time");
        }
    }
    put(body, "start_time", start.map(rfc3339));
    put(body, "end_time", end.map(rfc3339));
    put(
        body,
        "duration_seconds",
        obj.uint("duration_seconds", 0, MAX_DURATION_SECONDS, true, errs),
    );
    match obj.str("call_direction", true, errs) {
        Some(d @ ("inbound" | "outbound")) => {
            body.insert("call_direction".into(), d.into());
        }
        Some(_) => errs.add(
            obj.path("call_direction"),
            "must be one of: inbound, outbound",
        ),
        None => {}
    }
    // A SIP status code or a platform reason phrase; both occur in practice.
    match obj.required("disconnect_reason", errs) {
        Some(Value::Number(n)) if n.as_u64().is_some_and(|c| c < 1000) => {
            body.insert("disconnect_reason".into(), Value::Number(n.clone()));
        }
        Some(Value::String(_)) => put(
            body,
            "disconnect_reason",
            obj.text("disconnect_reason", 128, true, errs),
        ),
        Some(_) => errs.add(
            obj.path("disconnect_reason"),
            "must be a SIP status code or a reason text",
        ),
        None => {}
    }
}

fn parse_quality(obj: &Obj<'_>, body: &mut Map<String, Value>, errs: &mut Errors) {
    put(body, "mos", obj.number("mos", 1.0, 5.0, true, errs));
    put(
        body,
        "jitter_ms",
        obj.number("jitter_ms", 0.0, 60_000.0, true, errs),
    );
    put(
        body,
        "packet_loss_pct",
        obj.number("packet_loss_pct", 0.0, 100.0, true, errs),
    );
    put(
        body,
        "round_trip_ms",
        obj.number("round_trip_ms", 0.0, 60_000.0, true, errs),
    );
    put(body, "codec", obj.ident("codec", 32, true, errs));
}

fn subject_field(
    obj: &Obj<'_>,
    key: &str,
    errs: &mut Errors,
    parse: impl Fn(&str) -> Result<SubjectId, String>,
) -> Option<SubjectId> {
    let s = obj.str(key, true, errs)?;
    parse(s).map_err(|e| errs.add(obj.path(key), e)).ok()
}

fn put<T: Into<Value>>(body: &mut Map<String, Value>, key: &str, v: Option<T>) {
    if let Some(v) = v {
        body.insert(key.to_string(), v.into());
    }
}

fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(category: Category, v: Value) -> Result<Payload, Vec<String>> {
        let mut errs = Errors::default();
        Payload::parse(category, &v, "payload", &mut errs)
            .ok_or_else(|| errs.0.into_iter().map(|e| e.field).collect())
    }

    #[test]
    fn a_cdr_splits_into_body_and_two_slots() {
        let p = parse(
            Category::CallDetailRecord,
            json!({"call_id": "c-1", "caller": "+1 425 555 0100", "callee": "SIP:Bob@Example.com",
                   "start_time": "2026-01-01T10:00:00Z", "end_time": "2026-01-01T10:01:00Z",
                   "duration_seconds": 60, "call_direction": "outbound", "disconnect_reason": 200}),
        )
        .unwrap();
        assert_eq!(p.slots.len(), 2);
        assert_eq!(p.slots[0].fields["caller"], "+14255550100");
        assert_eq!(p.slots[1].fields["callee"], "sip:bob@example.com");
        assert!(!p.body.contains_key("caller"));
        assert_eq!(p.call_id(), Some("c-1"));
    }

    #[test]
    fn every_bad_field_is_named() {
        let fields = parse(
            Category::CallDetailRecord,
            json!({"call_id": "c", "caller": "12", "callee": "+14255550101", "start_time": "yesterday",
                   "end_time": "2026-01-01T10:01:00Z", "duration_seconds": -5, "call_direction": "sideways",
                   "disconnect_reason": 200, "colour": "red"}),
        )
        .unwrap_err();
        for f in [
            "payload.caller",
            "payload.start_time",
            "payload.duration_seconds",
            "payload.call_direction",
            "payload.colour",
        ] {
            assert!(
                fields.contains(&f.to_string()),
                "{f} missing from {fields:?}"
            );
        }
    }

    #[test]
    fn assemble_restores_the_payload_and_nulls_erased_slots() {
        let p = parse(
            Category::CallDuration,
            json!({"call_id": "c-2", "caller": "+14255550100", "callee": "+14255550101",
                   "start_time": "2026-01-01T10:00:00Z", "duration_seconds": 7}),
        )
        .unwrap();
        let callee = p.slots[1].clone();
        let v = Payload::assemble(
            Category::CallDuration,
            p.body.clone(),
            vec![("callee".into(), callee.fields)],
        );
        assert_eq!(v["caller"], Value::Null);
        assert_eq!(v["callee"], "+14255550101");
        assert_eq!(v["duration_seconds"], 7);
    }

    #[test]
    fn number_assignment_needs_both_identifiers() {
        let errs = parse(
            Category::NumberAssignment,
            json!({"phone_number": "+14255550100", "customer_tenant_id": "t1", "action": "assigned",
                   "effective_at": "2026-01-01T00:00:00Z"}),
        )
        .unwrap_err();
        assert_eq!(errs, vec!["payload.sip_uri"]);
    }
}
