//! Envelope encryption of one record.
//!
//! A record gets a random content key. The body (the payload fields that
//! identify no one by themselves) is sealed under the content key. Each data
//! subject of the record has a slot: the content key together with that
//! subject's identifiers, sealed under the subject's key. Any one subject key
//! opens the body; destroying one subject key removes that subject's
//! identifiers and its path to the body, and leaves the other subject's slot
//! intact. Associated data binds every ciphertext to its record (and slot),
//! so ciphertexts moved between records fail to open.

use serde_json::{Map, Value};
use uuid::Uuid;

use super::{IntegrityError, Key, RawKey};

pub struct SealedSlot {
    pub name: &'static str,
    pub subject_key_id: Uuid,
    pub sealed: Vec<u8>,
}

/// The associated-data layout new records are sealed with.
pub const BODY_AAD_VERSION: i16 = 2;

/// What a record's body is bound to: its id and every metadata column.
/// Changing any of them in the database makes the body fail to open, so a
/// database writer cannot re-label a record (another carrier, a longer
/// retention, another purpose or legal basis, a different call duration)
/// without its next decrypting read failing.
///
/// Version 1 (records written before migration 0013) bound only the id,
/// carrier, category, direction, occurrence and retention; it is still
/// read. The version column is bound implicitly: a record sealed under
/// version 2 does not open under version 1's associated data.
#[derive(Debug, Clone, Copy)]
pub struct Binding<'a> {
    pub version: i16,
    pub transfer_id: Uuid,
    pub carrier_id: &'a str,
    pub category: &'a str,
    pub direction: &'a str,
    pub occurred_at: i64,
    pub retain_until: i64,
    pub purpose: &'a str,
    pub legal_basis: &'a str,
    pub jurisdiction: &'a str,
    pub consent_reference: Option<&'a str>,
    pub recorded_at: i64,
    pub recorded_by: &'a str,
    pub call_key: Option<&'a [u8]>,
    pub duration_seconds: Option<i64>,
}

fn body_aad(b: &Binding<'_>) -> Result<Vec<u8>, IntegrityError> {
    match b.version {
        1 => Ok(format!(
            "tl/body/{}/{}/{}/{}/{}/{}",
            b.transfer_id, b.carrier_id, b.category, b.direction, b.occurred_at, b.retain_until
        )
        .into_bytes()),
        // A JSON array: unambiguous whatever the fields contain.
        2 => Ok(serde_json::to_vec(&serde_json::json!([
            "tl/body/2",
            b.transfer_id,
            b.carrier_id,
            b.category,
            b.direction,
            b.occurred_at,
            b.retain_until,
            b.purpose,
            b.legal_basis,
            b.jurisdiction,
            b.consent_reference,
            b.recorded_at,
            b.recorded_by,
            b.call_key.map(hex::encode),
            b.duration_seconds,
        ]))
        .expect("JSON")),
        _ => Err(IntegrityError("unknown associated-data version")),
    }
}

fn slot_aad(transfer_id: Uuid, slot: &str, subject_key_id: Uuid) -> Vec<u8> {
    format!("tl/slot/{transfer_id}/{slot}/{subject_key_id}").into_bytes()
}

/// Seals `body` and one slot per `(name, subject key id, key, fields)`.
pub fn seal_record(
    binding: &Binding<'_>,
    body: &Map<String, Value>,
    slots: &[(&'static str, Uuid, &Key, &Map<String, Value>)],
) -> (Vec<u8>, Vec<SealedSlot>) {
    let cek_raw = Key::generate_raw();
    let cek = Key::from_bytes(&cek_raw);
    let transfer_id = binding.transfer_id;
    let binding = Binding {
        version: BODY_AAD_VERSION,
        ..*binding
    };
    let body_sealed = cek.seal(
        &body_aad(&binding).expect("the current version"),
        &serde_json::to_vec(body).expect("JSON map"),
    );
    let sealed_slots = slots
        .iter()
        .map(|(name, key_id, key, fields)| {
            let mut pt = zeroize::Zeroizing::new(cek_raw.to_vec());
            serde_json::to_writer(&mut *pt, fields).expect("JSON map");
            SealedSlot {
                name,
                subject_key_id: *key_id,
                sealed: key.seal(&slot_aad(transfer_id, name, *key_id), &pt),
            }
        })
        .collect();
    (body_sealed, sealed_slots)
}

/// Opens a slot: the record's content key and the subject's fields.
pub fn open_slot(
    transfer_id: Uuid,
    slot: &str,
    subject_key_id: Uuid,
    key: &Key,
    sealed: &[u8],
) -> Result<(RawKey, Map<String, Value>), IntegrityError> {
    let pt = key.open(&slot_aad(transfer_id, slot, subject_key_id), sealed)?;
    if pt.len() < 32 {
        return Err(IntegrityError("slot too short"));
    }
    let mut cek = RawKey::default();
    cek.copy_from_slice(&pt[..32]);
    let fields =
        serde_json::from_slice(&pt[32..]).map_err(|_| IntegrityError("slot is not JSON"))?;
    Ok((cek, fields))
}

pub fn open_body(
    binding: &Binding<'_>,
    cek: &RawKey,
    sealed: &[u8],
) -> Result<Map<String, Value>, IntegrityError> {
    let pt = Key::from_bytes(cek).open(&body_aad(binding)?, sealed)?;
    serde_json::from_slice(&pt).map_err(|_| IntegrityError("body is not JSON"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn each_subject_opens_the_body_and_only_its_own_identifiers() {
        let (a, b) = (
            Key::from_bytes(&Key::generate_raw()),
            Key::from_bytes(&Key::generate_raw()),
        );
        let (ida, idb) = (Uuid::now_v7(), Uuid::now_v7());
        let body = map(json!({"call_id": "c-1"}));
        let (fa, fb) = (
            map(json!({"caller": "+14255550100"})),
            map(json!({"callee": "+14255550101"})),
        );
        let bind = binding();
        let t = bind.transfer_id;
        let (sealed_body, slots) = seal_record(
            &bind,
            &body,
            &[("caller", ida, &a, &fa), ("callee", idb, &b, &fb)],
        );

        let (cek_b, fields_b) = open_slot(t, "callee", idb, &b, &slots[1].sealed).unwrap();
        assert_eq!(fields_b, fb);
        assert_eq!(open_body(&bind, &cek_b, &sealed_body).unwrap(), body);
        // Metadata changed in the database (another carrier, longer retention): refused.
        assert!(open_body(
            &Binding {
                carrier_id: "other",
                ..bind
            },
            &cek_b,
            &sealed_body
        )
        .is_err());
        assert!(open_body(
            &Binding {
                retain_until: 3,
                ..bind
            },
            &cek_b,
            &sealed_body
        )
        .is_err());
        // B's key cannot open A's slot.
        assert!(open_slot(t, "caller", ida, &b, &slots[0].sealed).is_err());
        // A slot moved to another record does not open.
        assert!(open_slot(Uuid::now_v7(), "callee", idb, &b, &slots[1].sealed).is_err());
        // A body moved to another record does not open.
        assert!(open_body(
            &Binding {
                transfer_id: Uuid::now_v7(),
                ..bind
            },
            &cek_b,
            &sealed_body
        )
        .is_err());
    }

    fn sealed_with(bind: &Binding<'_>) -> (RawKey, Vec<u8>) {
        let key = Key::from_bytes(&Key::generate_raw());
        let id = Uuid::now_v7();
        let fields = map(json!({"caller": "+14255550100"}));
        let (body, slots) = seal_record(
            bind,
            &map(json!({"call_id": "c-1"})),
            &[("caller", id, &key, &fields)],
        );
        let (cek, _) = open_slot(bind.transfer_id, "caller", id, &key, &slots[0].sealed).unwrap();
        (cek, body)
    }

    fn binding() -> Binding<'static> {
        Binding {
            version: BODY_AAD_VERSION,
            transfer_id: Uuid::now_v7(),
            carrier_id: "carrier-a",
            category: "call_detail_record",
            direction: "platform_to_carrier",
            occurred_at: 1,
            retain_until: 2,
            purpose: "troubleshooting",
            legal_basis: "legitimate_interest",
            jurisdiction: "FR",
            consent_reference: Some("consent-1"),
            recorded_at: 3,
            recorded_by: "platform",
            call_key: Some(&[7; 32]),
            duration_seconds: Some(100),
        }
    }

    #[test]
    fn every_metadata_column_is_bound() {
        let bind = binding();
        let (cek, body) = sealed_with(&bind);
        assert!(open_body(&bind, &cek, &body).is_ok());
        let changed = [
            Binding {
                purpose: "billing",
                ..bind
            },
            Binding {
                legal_basis: "contract",
                ..bind
            },
            Binding {
                jurisdiction: "DE",
                ..bind
            },
            Binding {
                consent_reference: None,
                ..bind
            },
            Binding {
                consent_reference: Some("consent-2"),
                ..bind
            },
            Binding {
                recorded_at: 4,
                ..bind
            },
            Binding {
                recorded_by: "someone-else",
                ..bind
            },
            Binding {
                call_key: None,
                ..bind
            },
            Binding {
                call_key: Some(&[8; 32]),
                ..bind
            },
            Binding {
                duration_seconds: Some(1),
                ..bind
            },
            Binding {
                duration_seconds: None,
                ..bind
            },
            Binding {
                occurred_at: 0,
                ..bind
            },
            Binding {
                direction: "carrier_to_platform",
                ..bind
            },
            Binding {
                category: "call_quality",
                ..bind
            },
            // Downgrading the version column does not help either.
            Binding { version: 1, ..bind },
            Binding { version: 3, ..bind },
        ];
        for c in &changed {
            assert!(open_body(c, &cek, &body).is_err(), "{c:?} opened");
        }
    }

    #[test]
    fn records_sealed_under_version_1_still_open() {
        let bind = Binding {
            version: 1,
            ..binding()
        };
        let cek_raw = Key::generate_raw();
        let body = map(json!({"call_id": "c-1"}));
        let sealed = Key::from_bytes(&cek_raw).seal(
            &body_aad(&bind).unwrap(),
            &serde_json::to_vec(&body).unwrap(),
        );
        assert_eq!(open_body(&bind, &cek_raw, &sealed).unwrap(), body);
        // Version 1 bound the carrier and retention, not the purpose.
        assert!(open_body(
            &Binding {
                retain_until: 9,
                ..bind
            },
            &cek_raw,
            &sealed
        )
        .is_err());
        assert!(open_body(
            &Binding {
                purpose: "billing",
                ..bind
            },
            &cek_raw,
            &sealed
        )
        .is_ok());
    }
}
