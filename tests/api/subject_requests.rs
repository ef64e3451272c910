//! Data-subject access exports and erasure.

use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};
use sha2::Digest;
use transfer_ledger::auth::Role;

use crate::both;
use crate::helpers::*;

const X: &str = "+14255550100";

impl TestApp {
    pub(crate) async fn request(
        &self,
        token: &str,
        kind: &str,
        carrier: &str,
        subject: Value,
        language: Option<&str>,
    ) -> Value {
        let mut body = json!({"kind": kind, "carrier_id": carrier, "subject": subject});
        if let Some(l) = language {
            body["language"] = json!(l);
        }
        let r = self
            .post("/v1/subject-requests", token, &body)
            .await
            .expect(202);
        assert_eq!(r.body["status"], "received");
        r.body
    }

    /// Erases a phone number at carrier-a as a privacy officer; the
    /// completed request, with its receipt.
    pub(crate) async fn erase(&self, phone: &str) -> Value {
        let officer = self.officer();
        let req = self
            .request(
                &officer,
                "erasure",
                "carrier-a",
                json!({"phone_number": phone}),
                None,
            )
            .await;
        self.completed(&officer, req["id"].as_str().unwrap()).await
    }

    /// Requests access to a phone number's records at carrier-a, waits for
    /// it to complete and downloads its export: the export document.
    pub(crate) async fn access_export(&self, token: &str, phone: &str) -> Value {
        let req = self
            .request(
                token,
                "access",
                "carrier-a",
                json!({"phone_number": phone}),
                None,
            )
            .await;
        let id = req["id"].as_str().unwrap();
        self.completed(token, id).await;
        let (_, body) = self.export(token, id).await;
        serde_json::from_slice(&body).unwrap()
    }

    /// Releases a hold as a privacy officer and waits, up to `within`,
    /// until no erasure is pending any more (the redo is done).
    pub(crate) async fn release_and_await_redo(&self, hold: &str, within: Duration) {
        let release = self
            .client
            .delete(format!("{}/v1/holds/{hold}", self.addr))
            .bearer_auth(self.officer());
        self.raw(release).await.expect(200);
        let deadline = std::time::Instant::now() + within;
        while self.count("erasures_pending").await > 0 {
            assert!(std::time::Instant::now() < deadline, "never redone");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for a request to complete, the way clients should: one GET
    /// with `Prefer: wait`.
    pub(crate) async fn completed(&self, token: &str, id: &str) -> Value {
        let r = self
            .client
            .get(format!("{}/v1/subject-requests/{id}", self.addr))
            .bearer_auth(token)
            .header("Prefer", "wait=20")
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.headers()["preference-applied"],
            "wait=20",
            "the wait is acknowledged"
        );
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["status"], "completed", "request {id} did not complete");
        body
    }

    pub(crate) async fn export(
        &self,
        token: &str,
        id: &str,
    ) -> (reqwest::header::HeaderMap, Vec<u8>) {
        let r = self
            .client
            .get(format!("{}/v1/subject-requests/{id}/export", self.addr))
            .bearer_auth(token)
            .header("X-Access-Reason", "DSAR")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let headers = r.headers().clone();
        (headers, r.bytes().await.unwrap().to_vec())
    }

    async fn signing_key(&self) -> ed25519_compact::PublicKey {
        let k = self
            .get("/v1/keys/export-signing", &self.officer())
            .await
            .expect(200)
            .body;
        assert_eq!(k["alg"], "Ed25519");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(k["public_key"].as_str().unwrap())
            .unwrap();
        ed25519_compact::PublicKey::from_slice(&raw).unwrap()
    }
}

/// Verifies an export with an Ed25519 implementation independent of the service's.
fn verify_export(
    key: &ed25519_compact::PublicKey,
    headers: &reqwest::header::HeaderMap,
    body: &[u8],
) -> Result<(), String> {
    let digest = sha2::Sha256::digest(body);
    if hex::encode(digest) != headers["x-export-sha256"].to_str().unwrap() {
        return Err("digest header does not match the body".into());
    }
    let sig = base64::engine::general_purpose::STANDARD
        .decode(headers["x-export-signature"].to_str().unwrap())
        .unwrap();
    let sig = ed25519_compact::Signature::from_slice(&sig).map_err(|e| e.to_string())?;
    key.verify(digest, &sig).map_err(|e| e.to_string())
}

async fn seed(app: &TestApp) {
    app.consent("oc-1", "carrier-a", "tenant-1", &["FR"]).await;
    let p = app.platform();
    app.post(
        "/v1/transfers",
        &p,
        &assignment(
            "carrier-a",
            "oc-1",
            "tenant-1",
            X,
            &format!("sip:{X}@sbc.example"),
        ),
    )
    .await
    .expect(201);
    app.post(
        "/v1/transfers",
        &p,
        &cdr("carrier-a", "c1", X, "+14255550101"),
    )
    .await
    .expect(201);
    app.post(
        "/v1/transfers",
        &p,
        &cdr("carrier-a", "c2", "+14255550102", "+1 425 555 0100"),
    )
    .await
    .expect(201);
    app.post("/v1/transfers", &p, &cdr("carrier-a", "c3", X, X))
        .await
        .expect(201);
    app.post(
        "/v1/transfers",
        &p,
        &quality("carrier-a", "c1", X, "+14255550101"),
    )
    .await
    .expect(201);
    app.post(
        "/v1/transfers",
        &app.carrier("carrier-a"),
        &duration("carrier-a", "c1", X, "+14255550101"),
    )
    .await
    .expect(201);
    // The same person's number at another carrier, and someone else's records.
    app.post(
        "/v1/transfers",
        &p,
        &cdr("carrier-b", "b1", X, "+14255550101"),
    )
    .await
    .expect(201);
    app.post(
        "/v1/transfers",
        &p,
        &cdr("carrier-a", "c9", "+14255550101", "+14255550102"),
    )
    .await
    .expect(201);
}

async fn access_exports_are_complete_localized_and_signed(app: TestApp) {
    seed(&app).await;
    let carrier = app.carrier("carrier-a");
    let req = app
        .request(
            &carrier,
            "access",
            "carrier-a",
            json!({"phone_number": "+1 (425) 555-0100"}),
            Some("fr"),
        )
        .await;
    // Due one calendar month after receipt.
    let received =
        chrono::DateTime::parse_from_rfc3339(req["received_at"].as_str().unwrap()).unwrap();
    let due = chrono::DateTime::parse_from_rfc3339(req["due_at"].as_str().unwrap()).unwrap();
    assert_eq!(
        due,
        received.checked_add_months(chrono::Months::new(1)).unwrap()
    );
    let id = req["id"].as_str().unwrap();
    app.completed(&carrier, id).await;

    let (headers, body) = app.export(&carrier, id).await;
    let key = app.signing_key().await;
    verify_export(&key, &headers, &body).expect("the export verifies");
    let mut tampered = body.clone();
    let pos = tampered.len() / 2;
    tampered[pos] ^= 0x20;
    assert!(
        verify_export(&key, &headers, &tampered).is_err(),
        "a modified export is rejected"
    );

    let doc: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["subject"]["phone_number"], X);
    assert_eq!(doc["language"], "fr");
    assert_eq!(
        doc["record_count"], 6,
        "every carrier-a record of the subject, none of carrier-b"
    );
    let records = doc["records"].as_array().unwrap();
    assert!(records.iter().all(|r| r["carrier_id"] == "carrier-a"));
    for field in [
        "category",
        "purpose",
        "legal_basis",
        "direction",
        "source",
        "recipient",
        "jurisdiction",
        "occurred_at",
        "retain_until",
        "payload",
    ] {
        assert!(records.iter().all(|r| !r[field].is_null()), "{field}");
    }
    // The other party of a call is withheld; the subject's own data is there.
    let c1 = records
        .iter()
        .find(|r| r["payload"]["call_id"] == "c1" && r["category"] == "call_detail_record")
        .unwrap();
    assert_eq!(c1["payload"]["caller"], X);
    assert_eq!(c1["payload"]["callee"], "(other party)");
    let na = records
        .iter()
        .find(|r| r["category"] == "number_assignment")
        .unwrap();
    assert_eq!(na["payload"]["sip_uri"], format!("sip:{X}@sbc.example"));
    // Rights, no automated decisions, explanations in French.
    let rights: Vec<&str> = doc["rights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["right"].as_str().unwrap())
        .collect();
    for r in ["access", "rectification", "erasure", "complaint"] {
        assert!(rights.contains(&r), "{r}");
    }
    assert_eq!(doc["automated_decision_making"]["exists"], false);
    assert!(doc["explanations"]["purposes"]["troubleshooting"]
        .as_str()
        .unwrap()
        .contains("appels"));
    assert!(c1["recipient"].as_str().unwrap().contains("carrier-a"));

    // Accept-Language is honoured when the body names no language; unknown ones fall back to English.
    let r = app
        .raw(app.client.post(format!("{}/v1/subject-requests", app.addr)).bearer_auth(&carrier).header("Accept-Language", "zh-TW,zh;q=0.9")
            .json(&json!({"kind": "access", "carrier_id": "carrier-a", "subject": {"phone_number": X}})))
        .await;
    assert_eq!(r.body["language"], "zh-TW");
    let de = app
        .request(
            &carrier,
            "access",
            "carrier-a",
            json!({"phone_number": X}),
            Some("de"),
        )
        .await;
    assert_eq!(de["language"], "en");
}
both!(access_exports_are_complete_localized_and_signed);

async fn a_subject_with_no_records_gets_an_empty_valid_export(app: TestApp) {
    let officer = app.officer();
    let req = app
        .request(
            &officer,
            "access",
            "carrier-a",
            json!({"sip_uri": "sip:nobody@example.com"}),
            None,
        )
        .await;
    let id = req["id"].as_str().unwrap();
    app.completed(&officer, id).await;
    let (headers, body) = app.export(&officer, id).await;
    verify_export(&app.signing_key().await, &headers, &body).unwrap();
    let doc: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["record_count"], 0);
    assert_eq!(doc["records"], json!([]));
    assert_eq!(doc["subject"]["sip_uri"], "sip:nobody@example.com");
    // Privacy officers say why they download.
    let r = app
        .get(&format!("/v1/subject-requests/{id}/export"), &officer)
        .await
        .expect(400);
    assert!(r.body["detail"]
        .as_str()
        .unwrap()
        .contains("X-Access-Reason"));
    // And the refusal is audited, like every denied request.
    let entries = app.audit_entries().await;
    let denied = entries
        .iter()
        .find(|e| e["action"] == "request.denied")
        .expect("the refused download is audited");
    assert_eq!(
        denied["target"]["route"],
        "/v1/subject-requests/{id}/export"
    );
    assert_eq!(denied["target"]["status"], 400);
    assert_eq!(denied["actor"]["role"], "privacy_officer");
}
both!(a_subject_with_no_records_gets_an_empty_valid_export);

/// An export past its expiry is gone at once, not only once housekeeping
/// (every few seconds) has deleted it.
async fn an_expired_export_is_gone_before_it_is_deleted(app: TestApp) {
    let carrier = app.carrier("carrier-a");
    let req = app
        .request(
            &carrier,
            "access",
            "carrier-a",
            json!({"phone_number": X}),
            None,
        )
        .await;
    let id = req["id"].as_str().unwrap();
    app.completed(&carrier, id).await;
    app.export(&carrier, id).await;
    app.exec(
        "UPDATE subject_exports SET expires_at = expires_at - 8 * 86400000000",
        None,
        None,
    )
    .await;
    let r = app
        .get(&format!("/v1/subject-requests/{id}/export"), &carrier)
        .await
        .expect(410);
    assert!(r.text.contains("7 days"), "{}", r.text);
}
both!(an_expired_export_is_gone_before_it_is_deleted);

async fn carriers_only_reach_their_own_requests(app: TestApp) {
    let a = app.carrier("carrier-a");
    let b = app.carrier("carrier-b");
    let req = app
        .request(&a, "access", "carrier-a", json!({"phone_number": X}), None)
        .await;
    let id = req["id"].as_str().unwrap();
    app.get(&format!("/v1/subject-requests/{id}"), &b)
        .await
        .expect(404);
    app.get(&format!("/v1/subject-requests/{id}/export"), &b)
        .await
        .expect(404);
    app.post(
        &format!("/v1/subject-requests/{id}/extend"),
        &b,
        &json!({"reason": "x"}),
    )
    .await
    .expect(404);
    app.post(
        "/v1/subject-requests",
        &b,
        &json!({"kind": "erasure", "carrier_id": "carrier-a", "subject": {"phone_number": X}}),
    )
    .await
    .expect(403);
    let list = app.get("/v1/subject-requests", &b).await.expect(200);
    assert_eq!(list.body, json!([]));
    // Each probe for another carrier's request leaves a trace, naming the
    // prober and the id.
    let entries = app.audit_entries().await;
    let misses: Vec<&Value> = entries
        .iter()
        .filter(|e| e["outcome"] == "not_found")
        .collect();
    assert!(misses
        .iter()
        .all(|e| e["actor"]["carrier"] == "carrier-b" && e["target"]["request_id"] == id));
    let actions: Vec<&str> = misses
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "subject_request.read",
            "subject_request.export_download",
            "subject_request.extend"
        ]
    );
    // Bad requests name every bad field.
    let r = app.post("/v1/subject-requests", &a, &json!({"kind": "forget", "carrier_id": "carrier-a", "subject": {"phone_number": "12"}, "language": "??"})).await.expect(422);
    let mut f = r.bad_fields();
    f.sort();
    assert_eq!(f, ["kind", "language", "subject.phone_number"]);
}
both!(carriers_only_reach_their_own_requests);

async fn deadlines_extend_once_to_three_months_from_receipt(app: TestApp) {
    let officer = app.officer();
    let (app, officer) = (&app, &officer);
    let access = || async move {
        app.request(
            officer,
            "access",
            "carrier-a",
            json!({"phone_number": X}),
            None,
        )
        .await
    };
    let extend = |id: String, body: Value| async move {
        app.post(&format!("/v1/subject-requests/{id}/extend"), officer, &body)
            .await
    };
    let req = access().await;
    let id = req["id"].as_str().unwrap().to_string();
    // Answered within moments; the extension still applies, once.
    let done = app.completed(officer, &id).await;
    assert_eq!(done["status"], "completed");
    let r = extend(id.clone(), json!({"reason": "complex request"}))
        .await
        .expect(200);
    let received =
        chrono::DateTime::parse_from_rfc3339(req["received_at"].as_str().unwrap()).unwrap();
    let extended =
        chrono::DateTime::parse_from_rfc3339(r.body["due_at"].as_str().unwrap()).unwrap();
    assert_eq!(
        extended,
        received.checked_add_months(chrono::Months::new(3)).unwrap()
    );
    assert_eq!(r.body["extension_reason"], "complex request");
    extend(id.clone(), json!({"reason": "again"}))
        .await
        .expect(409);
    extend(id, json!({})).await.expect(422);
    let list = app.get("/v1/subject-requests", officer).await.expect(200);
    assert_eq!(list.body[0]["overdue"], false);

    // Both periods run from receipt: received on 31 January, due on 28
    // February (the month's last day), extended to 30 April — not to two
    // months after 28 February.
    let end_of_month = access().await["id"].as_str().unwrap().to_string();
    let at = |s: &str| {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .timestamp_micros()
    };
    let moved = app
        .exec(
            &format!(
                "UPDATE subject_requests SET received_at = {}, due_at = {} WHERE id = $1",
                at("2027-01-31T10:00:00Z"),
                at("2027-02-28T10:00:00Z")
            ),
            None,
            Some(uuid::Uuid::parse_str(&end_of_month).unwrap()),
        )
        .await;
    assert_eq!(moved, 1);
    let r = extend(end_of_month, json!({"reason": "complex request"}))
        .await
        .expect(200);
    assert_eq!(r.body["due_at"], "2027-04-30T10:00:00Z");

    // A deadline already past cannot be moved after the fact.
    let late = access().await["id"].as_str().unwrap().to_string();
    let moved = app
        .exec(
            "UPDATE subject_requests SET due_at = due_at - 4000000000000 WHERE id = $1",
            None,
            Some(uuid::Uuid::parse_str(&late).unwrap()),
        )
        .await;
    assert_eq!(moved, 1);
    let r = extend(late, json!({"reason": "too late"}))
        .await
        .expect(409);
    assert!(r.text.contains("past its deadline"), "{}", r.text);
}
both!(deadlines_extend_once_to_three_months_from_receipt);

/// The seed, a hold on carrier-a's call quality records, and an erasure of
/// X in carrier-a, completed: (the hold's id, the completed request).
async fn erase_x_with_quality_held(app: &TestApp) -> (String, Value) {
    seed(app).await;
    let hold = app
        .post(
            "/v1/holds",
            &app.officer(),
            &json!({"carrier_id": "carrier-a", "category": "call_quality", "reason": "dispute"}),
        )
        .await
        .expect(201);
    let hold_id = hold.body["id"].as_str().unwrap().to_string();
    (hold_id, erase_x(app).await)
}

/// Erases X in carrier-a, as carrier-a; the completed request.
async fn erase_x(app: &TestApp) -> Value {
    let carrier = app.carrier("carrier-a");
    let req = app
        .request(
            &carrier,
            "erasure",
            "carrier-a",
            json!({"phone_number": X}),
            None,
        )
        .await;
    app.completed(&carrier, req["id"].as_str().unwrap()).await
}

async fn erasure_removes_the_subject_in_scope_and_keeps_what_is_held(app: TestApp) {
    let (hold_id, done) = erase_x_with_quality_held(&app).await;
    let officer = app.officer();
    let carrier = app.carrier("carrier-a");
    let receipt = &done["receipt"];
    assert_eq!(
        receipt["deleted"],
        json!({"call_detail_record": 3, "call_duration": 1, "number_assignment": 1})
    );
    // One instant: the receipt says when the request completed.
    assert_eq!(receipt["completed_at"], done["completed_at"]);
    assert_eq!(receipt["held"], json!({"call_quality": 1}));
    assert_eq!(receipt["hold_ids"], json!([hold_id]));
    assert_eq!(
        receipt["keys_destroyed"], 0,
        "the held record still needs the key"
    );

    // The receipt is signed (independent implementation) and anchored in the audit trail.
    let mut unsigned = receipt.clone();
    let sig = base64::engine::general_purpose::STANDARD
        .decode(unsigned["signature"].as_str().unwrap())
        .unwrap();
    unsigned.as_object_mut().unwrap().remove("signature");
    unsigned.as_object_mut().unwrap().remove("key_id");
    let digest = sha2::Sha256::digest(serde_json::to_vec(&unsigned).unwrap());
    app.signing_key()
        .await
        .verify(
            digest,
            &ed25519_compact::Signature::from_slice(&sig).unwrap(),
        )
        .expect("receipt verifies");
    let auditor = app.token(Role::Auditor, None);
    let entries = app
        .get(
            "/v1/audit?action=subject_request.erasure_completed",
            &auditor,
        )
        .await
        .expect(200);
    let entry = &entries.body["items"][0];
    assert_eq!(entry["seq"], receipt["audit_seq"]);
    assert_eq!(entry["hash"], receipt["audit_hash"]);

    // In carrier-a, no lookup or decrypt returns the subject any more, except the held record.
    let found = app
        .get(
            &format!(
                "/v1/transfers?subject={}&carrier_id=carrier-a",
                "%2B14255550100"
            ),
            &officer,
        )
        .await
        .expect(200);
    let items = found.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["category"], "call_quality");
    let all = app
        .read(
            "/v1/transfers?carrier_id=carrier-a&include=payload&limit=1000",
            &officer,
        )
        .await
        .expect(200);
    let unheld: Vec<&Value> = all.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["category"] != "call_quality")
        .collect();
    assert!(!serde_json::to_string(&unheld)
        .unwrap()
        .contains("4255550100"));
    // The other party's data stays: c1 keeps its callee, its caller is gone.
    let c1 = unheld
        .iter()
        .find(|i| i["payload"]["call_id"] == "c1" && i["category"] == "call_detail_record")
        .unwrap();
    assert_eq!(c1["payload"]["caller"], Value::Null);
    assert_eq!(c1["payload"]["callee"], "+14255550101");
    // c3 (caller and callee both the subject) is gone entirely; so is the number assignment.
    assert!(!unheld.iter().any(|i| i["payload"]["call_id"] == "c3"));
    assert!(!unheld.iter().any(|i| i["category"] == "number_assignment"));
    // Carrier-b's records of the same number are untouched.
    let b = app
        .read(
            "/v1/transfers?carrier_id=carrier-b&include=payload",
            &officer,
        )
        .await
        .expect(200);
    assert_eq!(b.body["items"][0]["payload"]["caller"], X);

    // Released, the hold lets the erasure finish: the record and the key go.
    let keys_before = app.count("subject_keys").await;
    app.raw(
        app.client
            .delete(format!("{}/v1/holds/{hold_id}", app.addr))
            .bearer_auth(&officer),
    )
    .await;
    for _ in 0..100 {
        if app
            .get(
                "/v1/transfers?subject=%2B14255550100&carrier_id=carrier-a",
                &officer,
            )
            .await
            .body["items"]
            == json!([])
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        app.get(
            "/v1/transfers?subject=%2B14255550100&carrier_id=carrier-a",
            &officer
        )
        .await
        .body["items"],
        json!([])
    );
    for _ in 0..50 {
        if app.count("subject_keys").await == keys_before - 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        app.count("subject_keys").await,
        keys_before - 1,
        "the subject's carrier-a key is destroyed"
    );
    // The export of the erased subject in scope is empty.
    assert_eq!(app.access_export(&carrier, X).await["record_count"], 0);
    // The number assignment went whole: its SIP URI's lookup row too.
    app.assert_no_orphans().await;
    app.assert_audit_valid().await;
}
both!(erasure_removes_the_subject_in_scope_and_keeps_what_is_held);

/// An erasure that a hold kept from finishing erases, once the hold is
/// released, the held records it found, and nothing recorded about the
/// subject after it completed: those are sealed under a new key, which
/// stays.
async fn records_made_after_an_erasure_are_not_its_to_erase(app: TestApp) {
    let (hold_id, done) = erase_x_with_quality_held(&app).await;
    let officer = app.officer();
    assert_eq!(done["receipt"]["held"], json!({"call_quality": 1}));
    // The held record's clock may have run ahead of the erasure's (another
    // instance wrote it): it is the erasure's all the same.
    app.exec(
        "UPDATE transfers SET recorded_at = recorded_at + 60000000 WHERE category = 'call_quality'",
        None,
        None,
    )
    .await;

    // Recorded after the erasure: a call, and a quality record the hold
    // covers as well.
    let ids = app
        .batch(vec![
            cdr("carrier-a", "after-1", X, "+14255550101"),
            quality("carrier-a", "after-1", X, "+14255550101"),
        ])
        .await;
    let (after, after_q) = (ids[0].clone(), ids[1].clone());
    let caller = |id: String| {
        let app = &app;
        let officer = officer.clone();
        async move {
            app.read(&format!("/v1/transfers/{id}"), &officer)
                .await
                .expect(200)
                .body["payload"]["caller"]
                .clone()
        }
    };
    // The held remainder, redone while the hold stands, leaves them alone.
    // (As one from before 2026-11-24 would be: its subject's key not yet
    // set aside, which the redo does, once.)
    app.exec(
        "UPDATE erasures_pending SET key_set_aside = FALSE",
        None,
        None,
    )
    .await;
    let set_aside = "SELECT COUNT(*) FROM erasures_pending WHERE key_set_aside";
    for _ in 0..200 {
        // The server's own processor may be redoing it meanwhile.
        transfer_ledger::requests::erasure::redo_pending(&app.state)
            .await
            .unwrap();
        if app.scalar(set_aside).await == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.scalar(set_aside).await, 1);
    assert_eq!(caller(after.clone()).await, X);
    assert_eq!(caller(after_q.clone()).await, X);

    // Released, the hold lets the erasure finish with the record it held.
    app.raw(
        app.client
            .delete(format!("{}/v1/holds/{hold_id}", app.addr))
            .bearer_auth(&officer),
    )
    .await;
    for _ in 0..200 {
        transfer_ledger::requests::erasure::redo_pending(&app.state)
            .await
            .unwrap();
        if app.scalar("SELECT COUNT(*) FROM erasures_pending").await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let found = app
        .get(
            "/v1/transfers?subject=%2B14255550100&carrier_id=carrier-a&limit=1000",
            &officer,
        )
        .await
        .expect(200);
    let mut ids: Vec<&str> = found.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    ids.sort();
    let mut want = vec![after.as_str(), after_q.as_str()];
    want.sort();
    assert_eq!(
        ids, want,
        "only the records made after the erasure are left"
    );
    assert_eq!(caller(after.clone()).await, X);
    assert_eq!(caller(after_q.clone()).await, X);
    let auditor = app.token(Role::Auditor, None);
    let released = app
        .get(
            "/v1/audit?action=subject_request.erasure_released",
            &auditor,
        )
        .await
        .expect(200);
    let last = &released.body["items"][0]["entry"]["target"];
    assert_eq!(last["finished"], true, "{last}");
    assert_eq!(last["records"], 1, "{last}");
    assert_eq!(
        last["keys_destroyed"], 1,
        "the key the held record was sealed under"
    );
    assert_eq!(app.scalar("SELECT COUNT(*) FROM erasures_pending").await, 0);
    app.assert_audit_valid().await;
}
both!(records_made_after_an_erasure_are_not_its_to_erase);

/// A write that read a subject's key just before an erasure set it aside
/// (held records kept it) does not seal under it: counting its encryptions
/// finds the key moved, and the write retries with a new key.
async fn a_key_set_aside_is_not_sealed_under(app: TestApp) {
    use transfer_ledger::storage::keys;
    app.batch(vec![cdr("carrier-a", "k1", X, "+14255550101")])
        .await;
    let (id, index): (uuid::Uuid, Vec<u8>) = {
        let mut tx = app.db().begin().await.unwrap();
        let index = app
            .state
            .keys
            .blind()
            .of(&transfer_ledger::domain::SubjectId::parse(X).unwrap());
        let rows = keys::subject_keys_by_index(&mut tx, "carrier-a", std::slice::from_ref(&index))
            .await
            .unwrap();
        (rows[0].id, index)
    };
    let mut tx = app.db().begin().await.unwrap();
    keys::set_key_aside(&mut tx, id, &index).await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = app.db().begin().await.unwrap();
    let moved = keys::add_seals(&mut tx, &mut [(id, 1)], i64::MAX)
        .await
        .unwrap();
    assert_eq!(moved, [id]);
}
both!(a_key_set_aside_is_not_sealed_under);

async fn a_request_abandoned_mid_way_is_finished_and_never_served_half_done(app: TestApp) {
    seed(&app).await;
    let carrier = app.carrier("carrier-a");
    let req = app
        .request(
            &carrier,
            "access",
            "carrier-a",
            json!({"phone_number": X}),
            None,
        )
        .await;
    let id = req["id"].as_str().unwrap();
    app.completed(&carrier, id).await;
    let (_, good) = app.export(&carrier, id).await;
    // Pretend a processor died half way through rebuilding it: the request is
    // back in processing under a stale claim, with a stray chunk.
    let uuid = uuid::Uuid::parse_str(id).unwrap();
    app.exec(
        "UPDATE subject_requests SET status = 'processing', claimed_at = 0 WHERE id = $1",
        None,
        Some(uuid),
    )
    .await;
    app.exec(
        "DELETE FROM subject_export_chunks WHERE request_id = $1",
        None,
        Some(uuid),
    )
    .await;
    app.exec(
        "DELETE FROM subject_exports WHERE request_id = $1",
        None,
        Some(uuid),
    )
    .await;
    app.exec(
        "INSERT INTO subject_export_chunks (request_id, seq, sealed) VALUES ($2, 0, $1)",
        Some(vec![1, 2, 3]),
        Some(uuid),
    )
    .await;
    let r = app
        .get(&format!("/v1/subject-requests/{id}/export"), &carrier)
        .await;
    assert_eq!(r.status, 409, "not served while processing: {}", r.text);
    // Any wake-up (here: a new request) makes the processor pick it up again.
    app.request(
        &carrier,
        "access",
        "carrier-a",
        json!({"phone_number": "+14255550101"}),
        None,
    )
    .await;
    app.completed(&carrier, id).await;
    let (headers, body) = app.export(&carrier, id).await;
    verify_export(&app.signing_key().await, &headers, &body).unwrap();
    let (a, b): (Value, Value) = (
        serde_json::from_slice(&good).unwrap(),
        serde_json::from_slice(&body).unwrap(),
    );
    assert_eq!(a["records"], b["records"]);
}
both!(a_request_abandoned_mid_way_is_finished_and_never_served_half_done);

/// Kill the service with SIGKILL in the middle of erasures, several times:
/// once the claim of the dead process has lapsed, another instance finishes
/// each erasure; every record of the subject is erased exactly once (one
/// batch entry per record in the audit trail, one completion, a receipt
/// that counts each record once), nothing of the subject is left to find,
/// and the audit chain verifies.
async fn erasures_survive_the_service_being_killed(app: TestApp) {
    const PER_SUBJECT: usize = 3500; // four batches of the erasure
    let subjects = [
        "+14255550141",
        "+14255550142",
        "+14255550143",
        "+14255550144",
    ];
    let mut ids: Vec<std::collections::HashSet<String>> = Vec::new();
    for (s, subject) in subjects.iter().enumerate() {
        let mut mine = std::collections::HashSet::new();
        for chunk in 0..PER_SUBJECT / 500 {
            let items: Vec<Value> = (0..500)
                .map(|i| {
                    cdr(
                        "carrier-a",
                        &format!("k{s}-{chunk}-{i}"),
                        subject,
                        "+33123456780",
                    )
                })
                .collect();
            mine.extend(app.batch(items).await);
        }
        ids.push(mine);
    }

    let carrier = app.carrier("carrier-a");
    let mut requests = Vec::new();
    for (round, subject) in subjects.iter().enumerate() {
        // A second instance on the same database takes the request.
        let other = app.another_instance(&[]).await;
        let r = app
            .raw(
                reqwest::Client::new()
                    .post(format!("{}/v1/subject-requests", other.url))
                    .bearer_auth(&carrier)
                    .json(&json!({"kind": "erasure", "carrier_id": "carrier-a", "subject": {"phone_number": subject}})),
            )
            .await
            .expect(202);
        let id = uuid::Uuid::parse_str(r.body["id"].as_str().unwrap()).unwrap();
        // Even rounds: once a batch has committed; odd rounds: at some instant.
        if round % 2 == 0 {
            // A read: polling with a write would queue for the lock
            // behind the erasure's batches until it is done.
            let started = match app.backend {
                Backend::Sqlite => format!("X'{}'", id.simple()),
                Backend::Postgres => format!("'{id}'"),
            };
            let started = format!(
                "SELECT COUNT(*) FROM subject_requests WHERE id = {started} AND progress IS NOT NULL"
            );
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while app.scalar(&started).await == 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no batch ever committed"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        } else {
            tokio::time::sleep(Duration::from_millis(5 + round as u64 * 37)).await;
        }
        other.kill();
        requests.push(id.to_string());
    }
    // Every instance that claimed them is dead (a new one also takes up a
    // request the one before it died before claiming): their claims lapse,
    // as if CLAIM_TIMEOUT had passed. Whatever this running service claimed
    // it finishes before it looks for more, so it never runs one twice.
    let killed_mid_way = app
        .exec(
            "UPDATE subject_requests SET claimed_at = 0 WHERE status = 'processing'",
            None,
            None,
        )
        .await;
    assert!(
        killed_mid_way >= 2,
        "the erasures finished before they could be killed"
    );

    // Any wake-up (here: another request) makes this instance finish them.
    app.request(
        &carrier,
        "access",
        "carrier-a",
        json!({"phone_number": "+14255550149"}),
        None,
    )
    .await;
    let auditor = app.token(Role::Auditor, None);
    let officer = app.officer();
    for ((id, subject), mine) in requests.iter().zip(subjects).zip(&ids) {
        let done = app.completed(&carrier, id).await;
        assert_eq!(
            done["receipt"]["deleted"],
            json!({"call_detail_record": PER_SUBJECT}),
            "each record counted once"
        );
        let batches = app
            .all_pages(
                "/v1/audit?action=subject_request.erasure_batch&limit=1000",
                &auditor,
            )
            .await;
        let erased: Vec<String> = batches
            .iter()
            .filter(|e| e["entry"]["target"]["request_id"] == id.as_str())
            .flat_map(|e| {
                e["entry"]["target"]["transfer_ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
            })
            .collect();
        let unique: std::collections::HashSet<String> = erased.iter().cloned().collect();
        assert_eq!(
            erased.len(),
            unique.len(),
            "no record erased or audited twice"
        );
        assert_eq!(&unique, mine, "every record of the subject erased");
        let completions = app
            .all_pages(
                "/v1/audit?action=subject_request.erasure_completed&limit=1000",
                &auditor,
            )
            .await
            .iter()
            .filter(|e| e["entry"]["target"]["request_id"] == id.as_str())
            .count();
        assert_eq!(completions, 1);
        let left = app
            .read(
                &format!("/v1/transfers?subject={}", subject.replace('+', "%2B")),
                &officer,
            )
            .await
            .expect(200);
        assert_eq!(
            left.body["items"],
            json!([]),
            "nothing of the subject is left"
        );
    }
    app.assert_audit_valid().await;
}
both!(erasures_survive_the_service_being_killed);

/// The list pages with a `Link` header and filters by status and overdue:
/// an overdue request older than a page is still found.
async fn requests_are_listed_page_by_page_and_filtered(app: TestApp) {
    let officer = app.officer();
    let mut ids = Vec::new();
    for i in 0..5 {
        let r = app
            .request(
                &officer,
                "access",
                "carrier-a",
                json!({"phone_number": format!("+1425555017{i}")}),
                None,
            )
            .await;
        let id = r["id"].as_str().unwrap().to_string();
        app.completed(&officer, &id).await;
        ids.push(id);
    }
    // The oldest one is overdue: still processing (claimed just now, so no
    // worker takes it) and past its deadline.
    let late = uuid::Uuid::parse_str(&ids[0]).unwrap();
    let now = chrono::Utc::now().timestamp_micros();
    let moved = app
        .exec(
            &format!(
                "UPDATE subject_requests SET status = 'processing', claimed_at = {now}, due_at = {} WHERE id = $1",
                now - 1_000_000
            ),
            None,
            Some(late),
        )
        .await;
    assert_eq!(moved, 1);

    let pages = app
        .linked_pages("/v1/subject-requests?limit=2", &officer)
        .await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
    let listed: Vec<String> = pages
        .iter()
        .flatten()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(listed, newest_first, "each once, newest first");

    let overdue = app
        .linked_pages("/v1/subject-requests?overdue=true&limit=1", &officer)
        .await;
    assert_eq!(overdue.len(), 1, "one page, no link");
    assert_eq!(overdue[0][0]["id"], ids[0].as_str());
    assert_eq!(overdue[0][0]["overdue"], true);
    let on_time = app
        .linked_pages("/v1/subject-requests?overdue=false&limit=3", &officer)
        .await;
    assert_eq!(on_time.iter().map(Vec::len).collect::<Vec<_>>(), [3, 1]);
    assert!(on_time.iter().flatten().all(|r| r["overdue"] == false));
    let completed = app
        .get("/v1/subject-requests?status=completed", &officer)
        .await
        .expect(200);
    assert_eq!(completed.body.as_array().unwrap().len(), 4);
    let processing = app
        .get("/v1/subject-requests?status=processing", &officer)
        .await
        .expect(200);
    assert_eq!(processing.body[0]["id"], ids[0].as_str());

    // Another carrier sees none of them, on any page.
    let other = app
        .get(
            "/v1/subject-requests?overdue=true",
            &app.carrier("carrier-b"),
        )
        .await
        .expect(200);
    assert_eq!(other.body, json!([]));

    let r = app
        .get(
            "/v1/subject-requests?status=done&overdue=yes&cursor=zz",
            &officer,
        )
        .await
        .expect(422);
    let mut bad = r.bad_fields();
    bad.sort();
    assert_eq!(bad, ["cursor", "overdue", "status"]);
}
both!(requests_are_listed_page_by_page_and_filtered);

/// An access export built on one instance while another completes an
/// erasure of the same subject: the export is discarded (410, the trail
/// says why), not completed with the erased data or with chunks the
/// erasure deleted. PostgreSQL only: the export is stalled at its first
/// chunk by a trigger to hold the window open (on SQLite the worker of one
/// instance and the write lock serialize them).
async fn an_export_built_while_its_subject_is_erased_is_discarded(app: TestApp) {
    if app.backend != Backend::Postgres {
        return;
    }
    app.batch(
        (0..5)
            .map(|i| cdr("carrier-a", &format!("e{i}"), X, "+33123456780"))
            .collect(),
    )
    .await;
    app.exec(
        "CREATE FUNCTION stall_export() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(1.5); RETURN NEW; END; $$",
        None,
        None,
    )
    .await;
    app.exec(
        "CREATE TRIGGER stall_export BEFORE INSERT ON subject_export_chunks FOR EACH ROW EXECUTE FUNCTION stall_export()",
        None,
        None,
    )
    .await;
    let carrier = app.carrier("carrier-a");
    let other = app.another_instance(&[]).await;
    let access = app
        .raw(
            app.client
                .post(format!("{}/v1/subject-requests", other.url))
                .bearer_auth(&carrier)
                .json(&json!({"kind": "access", "carrier_id": "carrier-a", "subject": {"phone_number": X}})),
        )
        .await
        .expect(202);
    let access = access.body["id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(400)).await;
    app.erase(X).await;
    let done = app.completed(&carrier, &access).await;
    assert_eq!(done["status"], "completed");

    let r = app
        .get(&format!("/v1/subject-requests/{access}/export"), &carrier)
        .await
        .expect(410);
    assert!(r.text.contains("erasure"), "{}", r.text);
    let chunks = app
        .scalar(&format!(
            "SELECT COUNT(*) FROM subject_export_chunks WHERE request_id = '{access}'"
        ))
        .await;
    assert_eq!(chunks, 0, "nothing of the export is kept");
    let entries = app
        .all_pages(
            "/v1/audit?action=subject_request.access_completed&limit=100",
            &app.token(Role::Auditor, None),
        )
        .await;
    let entry = entries
        .iter()
        .find(|e| e["entry"]["target"]["request_id"] == access.as_str())
        .unwrap();
    assert!(entry["entry"]["target"]["discarded"].is_string(), "{entry}");
}
both!(an_export_built_while_its_subject_is_erased_is_discarded);

/// A processor renews and completes a request only while the claim is its
/// own: one that stalled past the claim timeout and was taken over stops
/// instead of appending a second completion and overwriting the receipt.
async fn a_processor_that_lost_its_claim_changes_nothing(app: TestApp) {
    use transfer_ledger::storage::requests as store;
    let carrier = app.carrier("carrier-a");
    let done = app.erase(X).await;
    let id = uuid::Uuid::parse_str(done["id"].as_str().unwrap()).unwrap();
    // As if still processing, under the claim another processor took
    // (`t`): a fresh claim, so that this instance's own processor, polling
    // meanwhile, does not take the request over as stale.
    let t = chrono::Utc::now().timestamp_micros();
    app.exec(
        &format!(
            "UPDATE subject_requests SET status = 'processing', claimed_at = {t} WHERE id = $1"
        ),
        None,
        Some(id),
    )
    .await;
    let db = app.db();
    let mut tx = db.begin().await.unwrap();
    assert!(
        !store::renew_claim(&mut tx, id, t + 1, t + 2).await.unwrap(),
        "not its claim"
    );
    assert!(
        !store::complete(&mut tx, id, t + 1, t + 3, Some("{}"), false)
            .await
            .unwrap()
    );
    assert!(store::renew_claim(&mut tx, id, t, t + 2).await.unwrap());
    assert!(
        !store::complete(&mut tx, id, t, t + 3, Some("{}"), false)
            .await
            .unwrap(),
        "renewed since"
    );
    assert!(
        store::complete(&mut tx, id, t + 2, t + 3, Some("{}"), false)
            .await
            .unwrap()
    );
    assert!(
        !store::complete(&mut tx, id, t + 2, t + 4, Some("{}"), false)
            .await
            .unwrap(),
        "already completed"
    );
    drop(tx); // rolled back
              // Rolled back: the request is as the test left it; its receipt intact.
    let now = app
        .get(&format!("/v1/subject-requests/{id}"), &carrier)
        .await
        .expect(200);
    assert_eq!(now.body["receipt"], done["receipt"]);
}
both!(a_processor_that_lost_its_claim_changes_nothing);

/// A completion that takes longer than the claim timeout is not taken over
/// meanwhile: the processor renews its claim inside the completing
/// transaction, so another processor's claim waits for it and then finds
/// the request completed. Before, the other processor took the request
/// over and the first one's completion was refused, round after round.
async fn a_completion_longer_than_the_claim_timeout_is_not_taken_over(app: TestApp) {
    use transfer_ledger::storage::{micros, requests as store};
    if app.backend != Backend::Postgres {
        return;
    }
    // The completion's first statement (on the subject's consents) sleeps.
    app.exec(
        "CREATE FUNCTION stall_completion() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(14); RETURN NULL; END; $$",
        None,
        None,
    )
    .await;
    app.exec(
        "CREATE TRIGGER stall_completion BEFORE UPDATE ON consents FOR EACH STATEMENT EXECUTE FUNCTION stall_completion()",
        None,
        None,
    )
    .await;
    let officer = app.officer();
    let req = app
        .request(
            &officer,
            "erasure",
            "carrier-a",
            json!({"phone_number": X}),
            None,
        )
        .await;
    let id = req["id"].as_str().unwrap();
    let uuid = uuid::Uuid::parse_str(id).unwrap();
    // Into the stalled completion, and past the 10 s claim timeout.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while app
        .scalar("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND query LIKE 'UPDATE consents SET subject_index = NULL%'")
        .await
        == 0
    {
        assert!(std::time::Instant::now() < deadline, "no completion began");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(11)).await;
    // Another processor that believes the request abandoned.
    let now = micros(chrono::Utc::now());
    let took_over = store::claim(app.db(), uuid, now, now - 10_000_000)
        .await
        .unwrap();
    assert!(!took_over, "a processor mid-completion was taken over");
    let done = app.completed(&officer, id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert!(done["receipt"]["signature"].is_string(), "{done}");
    assert_eq!(
        app.scalar(
            "SELECT count(*) FROM audit_log WHERE action = 'subject_request.erasure_completed'"
        )
        .await,
        1
    );
}
both!(
    a_completion_longer_than_the_claim_timeout_is_not_taken_over,
    [("LEDGER_CLAIM_TIMEOUT", "10s")]
);

/// The record ids that `subject_request.erasure_batch` entries list, in
/// order, repeats included.
fn batch_ids(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .flat_map(|e| e["entry"]["target"]["transfer_ids"].as_array().unwrap())
        .map(|id| id.as_str().unwrap().to_string())
        .collect()
}

/// An erasure a hold kept from finishing is redone, once the hold is
/// released, by one instance: each record is erased and listed once, and
/// one entry tells that the request is finished. Before, every instance
/// redid it at once, and the trail listed the records twice.
async fn a_pending_erasure_is_redone_by_one_instance_at_a_time(app: TestApp) {
    seed(&app).await;
    let hold = app
        .hold(json!({"carrier_id": "carrier-a", "reason": "dispute"}))
        .await;
    let done = app.erase(X).await;
    let request = done["id"].as_str().unwrap().to_string();
    let held: i64 = done["receipt"]["held"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_i64().unwrap())
        .sum();
    assert!(held > 0, "{done}");
    let _other = app.another_instance(&[]).await;
    if app.backend == Backend::Postgres {
        // A redo long enough for both instances' polls (every 5 s) to come
        // while it runs.
        app.exec(
            "CREATE FUNCTION stall_redo() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(6); RETURN NULL; END; $$",
            None,
            None,
        )
        .await;
        app.exec(
            "CREATE TRIGGER stall_redo BEFORE DELETE ON subject_lookup FOR EACH STATEMENT EXECUTE FUNCTION stall_redo()",
            None,
            None,
        )
        .await;
    }
    app.release_and_await_redo(hold["id"].as_str().unwrap(), Duration::from_secs(60))
        .await;
    // Long enough for a second instance that began redoing it meanwhile
    // (within 5 s of the release) to finish its own batch, which waits for
    // the first one's row locks and then stalls too (12 s, as measured
    // with the lease disabled).
    let settle = if app.backend == Backend::Postgres {
        15
    } else {
        6
    };
    tokio::time::sleep(Duration::from_secs(settle)).await;

    let auditor = app.token(Role::Auditor, None);
    let mine = |action: &str| {
        let (app, auditor, request) = (&app, &auditor, &request);
        let path = format!("/v1/audit?action={action}&limit=1000");
        async move {
            app.all_pages(&path, auditor)
                .await
                .into_iter()
                .filter(|e| e["entry"]["target"]["request_id"] == *request)
                .collect::<Vec<_>>()
        }
    };
    let mut erased = batch_ids(&mine("subject_request.erasure_batch").await);
    let listed = erased.len();
    erased.sort();
    erased.dedup();
    assert_eq!(listed, erased.len(), "records listed twice: {erased:?}");
    assert_eq!(erased.len() as i64, held);
    let released = mine("subject_request.erasure_released").await;
    assert_eq!(released.len(), 1, "{released:?}");
    assert_eq!(released[0]["entry"]["target"]["finished"], true);
    assert_eq!(released[0]["entry"]["target"]["records"], held);
}
both!(a_pending_erasure_is_redone_by_one_instance_at_a_time);

/// A request whose processing fails (here, a record of the subject that
/// fails its integrity check) says so on the request and in the audit
/// trail, without the detail, instead of showing only `processing`.
async fn a_failing_request_shows_why(app: TestApp) {
    let r = app
        .post(
            "/v1/transfers",
            &app.platform(),
            &cdr("carrier-a", "c-broken", X, "+33123456780"),
        )
        .await
        .expect(201);
    let record = uuid::Uuid::parse_str(r.body["id"].as_str().unwrap()).unwrap();
    let mut body =
        crate::encryption::stored_bytes(&app, "SELECT body FROM transfers WHERE id = $1", record)
            .await;
    let mid = body.len() / 2;
    body[mid] ^= 0x01;
    app.exec(
        "UPDATE transfers SET body = $1 WHERE id = $2",
        Some(body),
        Some(record),
    )
    .await;

    let officer = app.officer();
    let req = app
        .request(
            &officer,
            "access",
            "carrier-a",
            json!({"phone_number": X}),
            None,
        )
        .await;
    let path = format!("/v1/subject-requests/{}", req["id"].as_str().unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let seen = loop {
        let now = app.get(&path, &officer).await.expect(200).body;
        if !now["processing_failures"].is_null() {
            break now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no failure shown: {now}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(seen["status"], "processing", "{seen}");
    let failures = &seen["processing_failures"];
    assert_eq!(failures["count"], 1, "{seen}");
    assert!(
        failures["last"]
            .as_str()
            .unwrap()
            .contains("integrity check"),
        "{seen}"
    );
    assert!(failures["last_at"].is_string(), "{seen}");
    // Nothing of the record or the subject in what is shown.
    assert!(!seen.to_string().contains("c-broken") && !seen.to_string().contains("4255550100"));

    let auditor = app.token(Role::Auditor, None);
    let entries = app
        .all_pages(
            "/v1/audit?action=subject_request.processing_failed&limit=100",
            &auditor,
        )
        .await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["entry"]["outcome"], "failed");
    assert_eq!(entries[0]["entry"]["target"]["request_id"], req["id"]);
    app.assert_audit_valid().await;
}
both!(a_failing_request_shows_why);

/// Two erasures of one subject processed at once by two instances do not
/// pick the same records: each record is erased, counted and listed by one
/// of them.
async fn two_erasures_of_one_subject_share_nothing(app: TestApp) {
    seed(&app).await;
    let other = app.another_instance(&[]).await;
    if app.backend == Backend::Postgres {
        // Each batch long enough for the other instance's to start meanwhile.
        app.exec(
            "CREATE FUNCTION stall_erasure() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(2); RETURN NULL; END; $$",
            None,
            None,
        )
        .await;
        app.exec(
            "CREATE TRIGGER stall_erasure BEFORE DELETE ON subject_lookup FOR EACH STATEMENT EXECUTE FUNCTION stall_erasure()",
            None,
            None,
        )
        .await;
    }
    let officer = app.officer();
    let body =
        json!({"kind": "erasure", "carrier_id": "carrier-a", "subject": {"phone_number": X}});
    let (a, b) = tokio::join!(
        app.post("/v1/subject-requests", &officer, &body),
        app.raw(
            app.client
                .post(format!("{}/v1/subject-requests", other.url))
                .bearer_auth(&officer)
                .json(&body)
        ),
    );
    let ids = [
        a.expect(202).body["id"].clone(),
        b.expect(202).body["id"].clone(),
    ];
    let mut deleted = 0;
    for id in &ids {
        let done = app.completed(&officer, id.as_str().unwrap()).await;
        deleted += done["receipt"]["deleted"]
            .as_object()
            .unwrap()
            .values()
            .map(|n| n.as_i64().unwrap())
            .sum::<i64>();
    }
    let auditor = app.token(Role::Auditor, None);
    let entries: Vec<Value> = app
        .all_pages(
            "/v1/audit?action=subject_request.erasure_batch&limit=1000",
            &auditor,
        )
        .await
        .into_iter()
        .filter(|e| ids.contains(&e["entry"]["target"]["request_id"]))
        .collect();
    let mut listed = batch_ids(&entries);
    let n = listed.len();
    listed.sort();
    listed.dedup();
    assert_eq!(n, listed.len(), "records erased by both: {listed:?}");
    assert_eq!(deleted, n as i64, "receipts count each record once");
    assert!(n > 0);
}
both!(two_erasures_of_one_subject_share_nothing);

/// The consent of an erased subject loses its subject and ends withdrawn:
/// nobody holds it any more, and no transfer can rely on it.
async fn an_erased_subjects_consent_ends_withdrawn(app: TestApp) {
    let carrier = app.carrier("carrier-a");
    app.post(
        "/v1/consents",
        &carrier,
        &json!({"reference": "ds-x", "kind": "data_subject", "carrier_id": "carrier-a",
            "subject": {"phone_number": X}, "countries": ["FR"], "granted_at": "2026-10-01T00:00:00Z"}),
    )
    .await
    .expect(201);
    erase_x(&app).await;
    let c = app.get("/v1/consents/ds-x", &carrier).await.expect(200);
    assert_eq!(c.body["status"], "withdrawn", "{}", c.body);
    assert!(c.body["subject"].is_null(), "{}", c.body);
    let mut t = duration("carrier-a", "k1", X, "+14255550101");
    t["legal_basis"] = json!("consent");
    t["consent"] = json!({"reference": "ds-x"});
    let r = app.post("/v1/transfers", &carrier, &t).await.expect(409);
    assert!(r.text.contains("ds-x"), "{}", r.text);
}
both!(an_erased_subjects_consent_ends_withdrawn);

/// The two parties of the same calls, erased at the same moment through two
/// instances: none of their calls is left, not even as a record with
/// neither party (on PostgreSQL each erasure used to see the other's slots,
/// deleted but not yet committed, and keep the record for the other).
async fn erasing_both_parties_at_once_leaves_none_of_their_calls(app: TestApp) {
    let officer = app.officer();
    let other = app.another_instance(&[]).await;
    // The race is not every round's: eight rounds catch it reliably.
    for round in 0..8 {
        let (x, y) = (
            format!("+1425555{:04}", 300 + round),
            format!("+3312345{:04}", 6700 + round),
        );
        let calls: Vec<Value> = (0..600)
            .map(|i| cdr("carrier-a", &format!("both-{round}-{i}"), &x, &y))
            .collect();
        app.batch(calls).await;
        let erase = |url: &str, subject: &str| {
            app.raw(
                app.client
                    .post(format!("{url}/v1/subject-requests"))
                    .bearer_auth(&officer)
                    .json(&json!({"kind": "erasure", "carrier_id": "carrier-a", "subject": {"phone_number": subject}})),
            )
        };
        let (a, b) = tokio::join!(erase(&app.addr, &x), erase(&other.url, &y));
        for r in [a.expect(202), b.expect(202)] {
            app.completed(&officer, r.body["id"].as_str().unwrap())
                .await;
        }
        assert_eq!(
            app.count("transfers").await,
            0,
            "round {round}: calls between two erased subjects are left"
        );
    }
    app.assert_no_orphans().await;
    app.assert_audit_valid().await;
}
both!(erasing_both_parties_at_once_leaves_none_of_their_calls);

/// An export prepared while a hold kept some of an erased subject's records
/// holds copies of them: once the hold is released and they are erased, the
/// export goes too (its download answers 410).
async fn an_export_of_held_records_goes_with_them(app: TestApp) {
    seed(&app).await;
    let officer = app.officer();
    let hold = app
        .hold(json!({"carrier_id": "carrier-a", "reason": "dispute"}))
        .await;
    let done = app.erase(X).await;
    assert_ne!(done["receipt"]["held"], json!({}), "{done}");
    let export = app.access_export(&officer, X).await;
    assert!(!export["records"].as_array().unwrap().is_empty());
    let access = export["request_id"].as_str().unwrap();

    app.release_and_await_redo(hold["id"].as_str().unwrap(), Duration::from_secs(30))
        .await;
    let r = app
        .raw(
            app.client
                .get(format!("{}/v1/subject-requests/{access}/export", app.addr))
                .bearer_auth(&officer)
                .header("X-Access-Reason", "DSAR"),
        )
        .await
        .expect(410);
    assert!(r.text.contains("erasure"), "{}", r.text);
    assert_eq!(app.count("subject_export_chunks").await, 0);
}
both!(an_export_of_held_records_goes_with_them);

/// A carrier's retry of a transfer whose record went with its erased subject
/// is answered as the first request was, and the erased data is not stored
/// again; the key with other content is still a conflict. The key is kept
/// (as a keyed hash) until the record's retention would have ended.
async fn a_retry_of_an_erased_transfer_stores_nothing(app: TestApp) {
    app.consent("oc-1", "carrier-a", "tenant-1", &["FR"]).await;
    let platform = app.platform();
    let mut t = assignment(
        "carrier-a",
        "oc-1",
        "tenant-1",
        X,
        "sip:+14255550100@sbc.example",
    );
    t["idempotency_key"] = json!("na-1");
    let first = app.post("/v1/transfers", &platform, &t).await.expect(201);
    app.erase(X).await;
    assert_eq!(app.count("transfers").await, 0);

    let again = app.post("/v1/transfers", &platform, &t).await.expect(201);
    assert_eq!(again.body, first.body);
    let batch = app
        .post(
            "/v1/transfers/batch",
            &platform,
            &json!({"transfers": [t.clone()]}),
        )
        .await
        .expect(201);
    assert_eq!(batch.body["ids"], json!([first.body["id"]]));
    assert_eq!(app.count("transfers").await, 0, "erased data stored again");
    let mut other = t.clone();
    other["payload"]["action"] = json!("unassigned");
    app.post("/v1/transfers", &platform, &other)
        .await
        .expect(409);
    let kept = app
        .scalar("SELECT COUNT(*) FROM erased_idempotency_keys")
        .await;
    assert_eq!(kept, 1);

    // As if its retention had ended: a sweep forgets it.
    app.exec(
        "UPDATE erased_idempotency_keys SET retain_until = 0",
        None,
        None,
    )
    .await;
    app.post(
        "/v1/retention/sweeps",
        &app.token(Role::RetentionSweeper, None),
        &json!({}),
    )
    .await
    .expect(201);
    let kept = app
        .scalar("SELECT COUNT(*) FROM erased_idempotency_keys")
        .await;
    assert_eq!(kept, 0);
}
both!(a_retry_of_an_erased_transfer_stores_nothing);
