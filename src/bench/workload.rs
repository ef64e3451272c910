//! A synthetic Operator Connect workload: carriers and customer tenants with
//! consents, subscribers with realistic E.164 numbers and SIP URIs, a number
//! assignment per subscriber, and per call a CDR and a quality record from
//! the platform and a duration from the carrier (a few per cent disagreeing).

use chrono::{DateTime, Duration, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::domain::PhoneNumber;

pub const CARRIERS: &[(&str, &str)] = &[
    ("carrier-fr", "FR"),
    ("carrier-de", "DE"),
    ("carrier-us", "US"),
    ("carrier-br", "BR"),
    ("carrier-it", "IT"),
];
pub const TENANTS_PER_CARRIER: usize = 4;

pub struct Subscriber {
    pub carrier: usize,
    pub tenant: usize,
    pub number: String,
}

pub struct Workload {
    pub subscribers: Vec<Subscriber>,
    /// Every transfer, in submission order: (submitted by the carrier?, JSON).
    pub transfers: Vec<(bool, Value)>,
    pub call_pairs: usize,
}

/// A valid number of the carrier's country.
fn number(rng: &mut StdRng, country: &str) -> String {
    loop {
        let candidate = match country {
            "FR" => format!(
                "+33 6 {:02} {:02} {:02} {:02}",
                rng.gen_range(0..100),
                rng.gen_range(0..100),
                rng.gen_range(0..100),
                rng.gen_range(0..100)
            ),
            "DE" => format!("+49 151 {:08}", rng.gen_range(0..100_000_000)),
            "US" => {
                let area = [206, 425, 212, 312, 415, 617, 646, 702][rng.gen_range(0..8)];
                format!(
                    "+1 {area} {} {:04}",
                    rng.gen_range(201..999),
                    rng.gen_range(0..10_000)
                )
            }
            "BR" => format!(
                "+55 11 9{:04} {:04}",
                rng.gen_range(0..10_000),
                rng.gen_range(0..10_000)
            ),
            _ => format!(
                "+39 3{:02} {:07}",
                rng.gen_range(20..50),
                rng.gen_range(0..10_000_000)
            ),
        };
        if let Ok(n) = PhoneNumber::parse(&candidate) {
            return n.as_str().to_string();
        }
    }
}

pub fn consent_ref(carrier: usize, tenant: usize) -> String {
    format!("oc-{}-t{tenant}", CARRIERS[carrier].0)
}

pub fn tenant_id(carrier: usize, tenant: usize) -> String {
    format!("tenant-{carrier}-{tenant}")
}

/// `records` transfers: one assignment per subscriber, three records per
/// call, and up to two numbers handed back (`unassigned`) to make the count.
pub fn generate(records: usize, seed: u64, now: DateTime<Utc>) -> Workload {
    let mut rng = StdRng::seed_from_u64(seed);
    let n_subscribers = (records / 20).max(10);
    let subscribers: Vec<Subscriber> = (0..n_subscribers)
        .map(|i| {
            let carrier = i % CARRIERS.len();
            Subscriber {
                carrier,
                tenant: rng.gen_range(0..TENANTS_PER_CARRIER),
                number: number(&mut rng, CARRIERS[carrier].1),
            }
        })
        .collect();
    let mut transfers = Vec::with_capacity(records);
    let assignment = |s: &Subscriber, action: &str, days_ago: i64| {
        let (carrier, country) = CARRIERS[s.carrier];
        let host = format!("sbc.{carrier}.example");
        let at = rfc3339(now - Duration::days(days_ago));
        json!({
            "carrier_id": carrier, "direction": "platform_to_carrier", "category": "number_assignment",
            "purpose": "service_provisioning", "legal_basis": "contract", "jurisdiction": country,
            "consent": {"reference": consent_ref(s.carrier, s.tenant)},
            "occurred_at": at,
            "payload": {"phone_number": s.number, "sip_uri": format!("sip:{}@{host}", s.number),
                        "customer_tenant_id": tenant_id(s.carrier, s.tenant), "action": action,
                        "effective_at": at}
        })
    };
    for s in &subscribers {
        transfers.push((false, assignment(s, "assigned", 90)));
    }
    let mut call_pairs = 0;
    let mut call = 0u64;
    let mut expired_records = 0usize;
    while transfers.len() + 3 <= records {
        call += 1;
        let s = &subscribers[rng.gen_range(0..subscribers.len())];
        let (carrier, country) = CARRIERS[s.carrier];
        let callee = &subscribers[rng.gen_range(0..subscribers.len())].number;
        // Old calls kept one day, expired for the sweep: as many as keep
        // the expired records at half of all records.
        let expired = 2 * expired_records < transfers.len() + 3;
        if expired {
            expired_records += 3;
        }
        let duration = rng.gen_range(5..3_600i64);
        let ago = rng.gen_range(if expired {
            3 * 86_400..30 * 86_400
        } else {
            600..86_400
        });
        let start = now - Duration::seconds(ago + duration + 60);
        let end = start + Duration::seconds(duration);
        let call_id = format!("{carrier}-{call:010}");
        let retention = if expired { json!(1) } else { Value::Null };
        let base = |category: &str, direction: &str, purpose: &str, payload: Value| {
            let mut t = json!({
                "carrier_id": carrier, "direction": direction, "category": category, "purpose": purpose,
                "legal_basis": if direction == "carrier_to_platform" { "contract" } else { "legitimate_interest" },
                "jurisdiction": country, "occurred_at": rfc3339(end + Duration::seconds(30)), "payload": payload,
            });
            if !retention.is_null() {
                t["retention_days"] = retention.clone();
            }
            t
        };
        let cdr = base(
            "call_detail_record",
            "platform_to_carrier",
            "troubleshooting",
            json!({
            "call_id": call_id, "caller": s.number, "callee": callee, "start_time": rfc3339(start), "end_time": rfc3339(end),
            "duration_seconds": duration, "call_direction": "outbound", "disconnect_reason": 200}),
        );
        let quality = base(
            "call_quality",
            "platform_to_carrier",
            "service_operation",
            json!({
            "call_id": call_id, "caller": s.number, "callee": callee, "mos": rng.gen_range(2.5..4.5f64),
            "jitter_ms": rng.gen_range(0.0..40.0f64), "packet_loss_pct": rng.gen_range(0.0..3.0f64),
            "round_trip_ms": rng.gen_range(10.0..300.0f64), "codec": "SILK"}),
        );
        // A few per cent of carriers report a different duration.
        let reported = if rng.gen_range(0..100) < 3 {
            duration + rng.gen_range(5..120)
        } else {
            duration
        };
        let dur = base(
            "call_duration",
            "carrier_to_platform",
            "reconciliation",
            json!({
            "call_id": call_id, "caller": s.number, "callee": callee, "start_time": rfc3339(start), "duration_seconds": reported}),
        );
        transfers.push((false, cdr));
        transfers.push((false, quality));
        transfers.push((true, dur));
        call_pairs += 1;
    }
    for s in subscribers
        .iter()
        .take(records.saturating_sub(transfers.len()))
    {
        transfers.push((false, assignment(s, "unassigned", 30)));
    }
    Workload {
        subscribers,
        transfers,
        call_pairs,
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// `n` call detail records of one caller, for the export measurements; all
/// within retention.
pub fn calls_of(
    carrier: usize,
    caller: &str,
    n: usize,
    callees: &[Subscriber],
    seed: u64,
    now: DateTime<Utc>,
) -> Vec<Value> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (carrier_id, country) = CARRIERS[carrier];
    (0..n)
        .map(|i| {
            let duration = rng.gen_range(5..600i64);
            let start = now - Duration::seconds(rng.gen_range(3_600..20 * 86_400) + duration);
            let end = start + Duration::seconds(duration);
            json!({
                "carrier_id": carrier_id, "direction": "platform_to_carrier", "category": "call_detail_record",
                "purpose": "troubleshooting", "legal_basis": "legitimate_interest", "jurisdiction": country,
                "occurred_at": rfc3339(end + Duration::seconds(30)),
                "payload": {"call_id": format!("x-{seed}-{i}"), "caller": caller,
                            "callee": callees[rng.gen_range(0..callees.len())].number,
                            "start_time": rfc3339(start), "end_time": rfc3339(end), "duration_seconds": duration,
                            "call_direction": "outbound", "disconnect_reason": 200}
            })
        })
        .collect()
}

/// A number no generated subscriber has (they are random mobile numbers).
pub fn dedicated_number(i: usize) -> String {
    format!("+33123{:06}", 100_000 + i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workload_has_exactly_the_records_asked_for() {
        for records in [2_000, 2_001, 2_002, 20_000] {
            let w = generate(records, 42, Utc::now());
            assert_eq!(w.transfers.len(), records);
            let unassigned = w
                .transfers
                .iter()
                .filter(|(_, t)| t["payload"]["action"] == "unassigned")
                .count();
            assert!(unassigned <= 2, "{unassigned}");
        }
    }
}
