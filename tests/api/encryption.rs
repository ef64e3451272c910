//! Personal data at rest: never plaintext, and tampering never yields data.

use serde_json::json;
use uuid::Uuid;

use crate::both;
use crate::helpers::*;

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

async fn no_personal_data_is_stored_in_plaintext(app: TestApp) {
    app.consent("oc-1", "carrier-a", "tenant-1", &["FR"]).await;
    app.post(
        "/v1/transfers",
        &app.platform(),
        &assignment(
            "carrier-a",
            "oc-1",
            "tenant-1",
            "+33198765432",
            "sip:+33198765432@sbc.uniquehost.example",
        ),
    )
    .await
    .expect(201);
    app.post(
        "/v1/transfers",
        &app.platform(),
        &cdr(
            "carrier-a",
            "CALLID-7f3e9",
            "+14255550177",
            "sip:zelda@secret.example",
        ),
    )
    .await
    .expect(201);
    app.post(
        "/v1/consents",
        &app.carrier("carrier-a"),
        &json!({"reference": "ds-1", "kind": "data_subject", "carrier_id": "carrier-a",
                "subject": {"sip_uri": "sip:yannick@consent.example"}, "countries": ["FR"],
                "granted_at": "2026-10-01T00:00:00Z"}),
    )
    .await
    .expect(201);

    let dump = app.dump().await;
    assert!(dump.len() > 500, "the dump read the tables");
    for secret in [
        "33198765432",
        "uniquehost",
        "14255550177",
        "4255550177",
        "zelda",
        "secret.example",
        "CALLID-7f3e9",
        "7f3e9",
        "yannick",
        "normal call clearing",
    ] {
        assert!(!contains(&dump, secret), "{secret} found in plaintext");
    }
    // The dump does contain what is meant to be metadata.
    assert!(contains(&dump, "carrier-a") && contains(&dump, "call_detail_record"));
}
both!(no_personal_data_is_stored_in_plaintext);

pub(crate) async fn stored_bytes(app: &TestApp, sql: &str, id: Uuid) -> Vec<u8> {
    use transfer_ledger::storage::Db;
    match app.db() {
        Db::Sqlite { read, .. } => sqlx::query_scalar(sql)
            .bind(id)
            .fetch_one(read)
            .await
            .unwrap(),
        Db::Postgres(p) => sqlx::query_scalar(sql).bind(id).fetch_one(p).await.unwrap(),
    }
}

async fn tampered_ciphertext_is_an_integrity_error_and_the_service_stays_up(app: TestApp) {
    let officer = app.officer();
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = app
            .post(
                "/v1/transfers",
                &app.platform(),
                &cdr(
                    "carrier-a",
                    &format!("call-{i}"),
                    &format!("+1425555010{i}"),
                    "+33123456780",
                ),
            )
            .await
            .expect(201);
        ids.push(Uuid::parse_str(r.body["id"].as_str().unwrap()).unwrap());
    }

    // One flipped byte in a record's body.
    let mut body = stored_bytes(&app, "SELECT body FROM transfers WHERE id = $1", ids[0]).await;
    let mid = body.len() / 2;
    body[mid] ^= 0x01;
    assert_eq!(
        app.exec(
            "UPDATE transfers SET body = $1 WHERE id = $2",
            Some(body),
            Some(ids[0])
        )
        .await,
        1
    );
    let r = app
        .read(&format!("/v1/transfers/{}", ids[0]), &officer)
        .await
        .expect(500);
    assert!(r.body["type"].as_str().unwrap().ends_with("/integrity"));
    assert!(r.body.get("payload").is_none());
    assert!(!r.text.contains("call-0"));

    // One flipped byte in a slot.
    let mut slot = stored_bytes(
        &app,
        "SELECT sealed FROM transfer_slots WHERE transfer_id = $1 AND slot = 'callee'",
        ids[1],
    )
    .await;
    let last = slot.len() - 1;
    slot[last] ^= 0x80;
    app.exec(
        "UPDATE transfer_slots SET sealed = $1 WHERE transfer_id = $2 AND slot = 'callee'",
        Some(slot),
        Some(ids[1]),
    )
    .await;
    app.read(&format!("/v1/transfers/{}", ids[1]), &officer)
        .await
        .expect(500);

    // A listing that includes a tampered record fails whole: never partial data.
    let r = app
        .read("/v1/transfers?include=payload", &officer)
        .await
        .expect(500);
    assert!(r.body.get("items").is_none());

    // The untouched record still reads, and the service is healthy.
    let ok = app
        .read(&format!("/v1/transfers/{}", ids[2]), &officer)
        .await
        .expect(200);
    assert_eq!(ok.body["payload"]["call_id"], "call-2");
    app.get("/healthz", "").await.expect(200);
    app.get("/readyz", "").await.expect(200);
}
both!(tampered_ciphertext_is_an_integrity_error_and_the_service_stays_up);

async fn swapped_ciphertexts_do_not_open(app: TestApp) {
    let officer = app.officer();
    let mut ids = Vec::new();
    for i in 0..2 {
        let r = app
            .post(
                "/v1/transfers",
                &app.platform(),
                &cdr(
                    "carrier-a",
                    &format!("call-{i}"),
                    "+14255550100",
                    "+33123456780",
                ),
            )
            .await
            .expect(201);
        ids.push(Uuid::parse_str(r.body["id"].as_str().unwrap()).unwrap());
    }
    // Same subjects, so the same subject keys: only associated data tells the records apart.
    let a = stored_bytes(&app, "SELECT body FROM transfers WHERE id = $1", ids[0]).await;
    let b = stored_bytes(&app, "SELECT body FROM transfers WHERE id = $1", ids[1]).await;
    app.exec(
        "UPDATE transfers SET body = $1 WHERE id = $2",
        Some(b),
        Some(ids[0]),
    )
    .await;
    app.exec(
        "UPDATE transfers SET body = $1 WHERE id = $2",
        Some(a),
        Some(ids[1]),
    )
    .await;
    app.read(&format!("/v1/transfers/{}", ids[0]), &officer)
        .await
        .expect(500);
    app.read(&format!("/v1/transfers/{}", ids[1]), &officer)
        .await
        .expect(500);

    // Swapping the slots too still fails: each slot is bound to its record.
    let sa = stored_bytes(
        &app,
        "SELECT sealed FROM transfer_slots WHERE transfer_id = $1 AND slot = 'caller'",
        ids[0],
    )
    .await;
    let sb = stored_bytes(
        &app,
        "SELECT sealed FROM transfer_slots WHERE transfer_id = $1 AND slot = 'caller'",
        ids[1],
    )
    .await;
    app.exec(
        "UPDATE transfer_slots SET sealed = $1 WHERE transfer_id = $2 AND slot = 'caller'",
        Some(sb),
        Some(ids[0]),
    )
    .await;
    app.exec(
        "UPDATE transfer_slots SET sealed = $1 WHERE transfer_id = $2 AND slot = 'caller'",
        Some(sa),
        Some(ids[1]),
    )
    .await;
    app.read(&format!("/v1/transfers/{}", ids[0]), &officer)
        .await
        .expect(500);
    // Metadata-only reads are unaffected.
    app.get("/v1/transfers", &officer).await.expect(200);
}
both!(swapped_ciphertexts_do_not_open);

async fn the_wrong_master_key_refuses_to_start(app: TestApp) {
    use transfer_ledger::{Application, Config};
    let mut vars = app.vars.clone();
    vars.insert(
        "LEDGER_MASTER_KEY".into(),
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into(),
    );
    let config = Config::from_lookup(|k| vars.get(k).cloned()).unwrap();
    let err = Application::build(config).await.err().expect("refused");
    assert!(
        format!("{err:#}").contains("not the key the database was created with"),
        "{err:#}"
    );
}
both!(the_wrong_master_key_refuses_to_start);

/// A database writer who re-labels a record (another purpose, legal basis,
/// jurisdiction, consent, recorder, time, retention or call duration) makes
/// its next decrypting read fail: every metadata column is bound to the
/// sealed payload. Metadata-only reads cannot tell (threat model).
async fn relabelled_records_do_not_open(app: TestApp) {
    let officer = app.officer();
    let changes = [
        "purpose = 'billing'",
        "legal_basis = 'contract'",
        "jurisdiction = 'DE'",
        "consent_reference = 'consent-forged'",
        "recorded_by = 'someone-else'",
        "recorded_at = recorded_at + 1",
        "occurred_at = occurred_at - 1",
        "retain_until = retain_until + 86400000000",
        "direction = 'carrier_to_platform'",
        "carrier_id = 'carrier-b'",
        "duration_seconds = 1",
        "call_key = NULL",
        "aad_version = 1",
    ];
    let items = (0..=changes.len())
        .map(|i| {
            cdr(
                "carrier-a",
                &format!("call-{i}"),
                "+14255550100",
                "+33123456780",
            )
        })
        .collect();
    let ids = app.batch(items).await;
    for (change, id) in changes.iter().zip(&ids) {
        let id = Uuid::parse_str(id).unwrap();
        let sql = format!("UPDATE transfers SET {change} WHERE id = $1");
        assert_eq!(app.exec(&sql, None, Some(id)).await, 1, "{sql}");
        let r = app
            .read(&format!("/v1/transfers/{id}"), &officer)
            .await
            .expect(500);
        assert!(
            r.body["type"].as_str().unwrap().ends_with("/integrity"),
            "{change}: {}",
            r.text
        );
        assert!(!r.text.contains("+14255550100"));
    }
    // The untouched record opens.
    let last = ids.last().unwrap();
    let ok = app
        .read(&format!("/v1/transfers/{last}"), &officer)
        .await
        .expect(200);
    assert_eq!(ok.body["payload"]["caller"], "+14255550100");
}
both!(relabelled_records_do_not_open);
