//! Consents gate the transfers that rely on them.

use serde_json::{json, Value};
use transfer_ledger::auth::Role;

use crate::both;
use crate::helpers::*;

async fn number_assignments_need_an_active_covering_consent(app: TestApp) {
    let platform = app.platform();
    app.consent("oc-1", "carrier-a", "tenant-1", &["FR"]).await;
    let na = |consent: &str, tenant: &str| {
        assignment(
            "carrier-a",
            consent,
            tenant,
            "+33123456789",
            "sip:+33123456789@x.example",
        )
    };

    // Active and covering: accepted.
    app.post("/v1/transfers", &platform, &na("oc-1", "tenant-1"))
        .await
        .expect(201);

    // Naming no consent, it relies on its customer tenant's for the
    // carrier, and the record names that one.
    let unnamed = |tenant: &str| {
        let mut t = na("oc-1", tenant);
        t.as_object_mut().unwrap().remove("consent");
        t
    };
    let r = app
        .post("/v1/transfers", &platform, &unnamed("tenant-1"))
        .await
        .expect(201);
    let id = r.body["id"].as_str().unwrap();
    let shown = app
        .get(
            "/v1/transfers?carrier_id=carrier-a&category=number_assignment",
            &app.officer(),
        )
        .await
        .expect(200);
    let item = shown.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == id)
        .unwrap()
        .clone();
    assert_eq!(item["consent_reference"], "oc-1");
    // Refused with 409, the detail saying why.
    let refused = |tenant: &'static str, why: &'static str| {
        let (app, platform, t) = (&app, &platform, unnamed(tenant));
        async move {
            let r = app.post("/v1/transfers", platform, &t).await.expect(409);
            assert!(
                r.body["detail"].as_str().unwrap().contains(why),
                "{}",
                r.text
            );
        }
    };
    // A tenant with none: 409 naming the tenant.
    refused("tenant-9", "\"tenant-9\" has no customer_operator consent").await;

    // Unknown consent, another tenant's, or a jurisdiction not covered: 409 naming the consent.
    let r = app
        .post("/v1/transfers", &platform, &na("oc-404", "tenant-1"))
        .await
        .expect(409);
    assert!(
        r.body["detail"].as_str().unwrap().contains("oc-404"),
        "{}",
        r.text
    );
    let r = app
        .post("/v1/transfers", &platform, &na("oc-1", "tenant-2"))
        .await
        .expect(409);
    assert!(r.body["detail"].as_str().unwrap().contains("oc-1"));
    let mut t = na("oc-1", "tenant-1");
    t["jurisdiction"] = json!("US");
    let r = app.post("/v1/transfers", &platform, &t).await.expect(409);
    assert!(r.body["detail"]
        .as_str()
        .unwrap()
        .contains("jurisdiction US"));

    // A consent registered for another carrier does not cover this one.
    app.consent("oc-b", "carrier-b", "tenant-1", &["FR"]).await;
    app.post("/v1/transfers", &platform, &na("oc-b", "tenant-1"))
        .await
        .expect(409);

    // Suspended: refused; reactivated: accepted again; removed: final.
    let status = |s: &str| json!({"status": s});
    app.post("/v1/consents/oc-1/status", &platform, &status("suspended"))
        .await
        .expect(200);
    let r = app
        .post("/v1/transfers", &platform, &na("oc-1", "tenant-1"))
        .await
        .expect(409);
    assert!(r.body["detail"].as_str().unwrap().contains("suspended"));
    // Also when it is not named: why the tenant's consent does not cover it.
    refused("tenant-1", "consent \"oc-1\" is suspended").await;
    app.post("/v1/consents/oc-1/status", &platform, &status("active"))
        .await
        .expect(200);
    app.post("/v1/transfers", &platform, &na("oc-1", "tenant-1"))
        .await
        .expect(201);
    app.post("/v1/consents/oc-1/status", &platform, &status("removed"))
        .await
        .expect(200);
    app.post("/v1/consents/oc-1/status", &platform, &status("active"))
        .await
        .expect(409);
    app.post("/v1/transfers", &platform, &na("oc-1", "tenant-1"))
        .await
        .expect(409);
    app.post("/v1/consents/oc-1/status", &platform, &status("withdrawn"))
        .await
        .expect(409);
    app.post("/v1/consents/oc-1/status", &platform, &status("gone"))
        .await
        .expect(422);

    assert_eq!(app.count("transfers").await, 3);
    let shown = app
        .get("/v1/consents/oc-1", &app.officer())
        .await
        .expect(200);
    assert_eq!(shown.body["status"], "removed");
    assert_eq!(shown.body["countries"], json!(["FR"]));
    assert_eq!(shown.body["customer_tenant_id"], "tenant-1");
}
both!(number_assignments_need_an_active_covering_consent);

async fn consent_as_legal_basis_needs_the_subjects_own_consent(app: TestApp) {
    let carrier = app.carrier("carrier-a");
    // The carrier registers its subscriber's consent.
    let r = app
        .post(
            "/v1/consents",
            &carrier,
            &json!({"reference": "ds-1", "kind": "data_subject", "carrier_id": "carrier-a",
                    "subject": {"phone_number": "+1 425 555 0100"}, "countries": ["US", "FR"],
                    "granted_at": "2026-10-01T00:00:00Z"}),
        )
        .await
        .expect(201);
    assert_eq!(r.body["subject"]["phone_number"], "+14255550100");
    assert_eq!(r.body["status"], "active");
    // A privacy officer reading a consent that names a person says why.
    let r = app
        .get("/v1/consents/ds-1", &app.officer())
        .await
        .expect(400);
    assert!(r.body["detail"]
        .as_str()
        .unwrap()
        .contains("X-Access-Reason"));
    let r = app
        .read("/v1/consents/ds-1", &app.officer())
        .await
        .expect(200);
    assert_eq!(r.body["subject"]["phone_number"], "+14255550100");

    let mut t = duration("carrier-a", "call-9", "+14255550100", "+14255550101");
    t["legal_basis"] = json!("consent");
    t["consent"] = json!({"reference": "ds-1", "granted_at": "2026-10-01T00:00:00Z"});
    app.post("/v1/transfers", &carrier, &t).await.expect(201);

    // Not a subject of this transfer: refused.
    let mut other = duration("carrier-a", "call-10", "+14255550102", "+14255550103");
    other["legal_basis"] = json!("consent");
    other["consent"] = json!({"reference": "ds-1"});
    let r = app
        .post("/v1/transfers", &carrier, &other)
        .await
        .expect(409);
    assert!(r.body["detail"].as_str().unwrap().contains("ds-1"));

    // Withdrawn: refused from then on, and final.
    app.post(
        "/v1/consents/ds-1/status",
        &carrier,
        &json!({"status": "withdrawn"}),
    )
    .await
    .expect(200);
    let r = app.post("/v1/transfers", &carrier, &t).await;
    // The earlier identical request has no idempotency key, so this is a new transfer.
    assert_eq!(r.status, 409, "{}", r.text);
    assert!(r.body["detail"].as_str().unwrap().contains("withdrawn"));
    app.post(
        "/v1/consents/ds-1/status",
        &carrier,
        &json!({"status": "active"}),
    )
    .await
    .expect(409);

    // Once the subject is erased the consent stays, its subject shown as
    // null (the key that sealed it is gone).
    app.erase("+14255550100").await;
    let r = app.get("/v1/consents/ds-1", &carrier).await.expect(200);
    assert_eq!(r.body["subject"], Value::Null);
    assert!(
        r.body.as_object().unwrap().contains_key("subject"),
        "{}",
        r.text
    );
    assert_eq!(r.body["status"], "withdrawn");
}
both!(consent_as_legal_basis_needs_the_subjects_own_consent);

async fn consent_registration_is_validated_and_scoped(app: TestApp) {
    let carrier = app.carrier("carrier-a");
    let r = app
        .post(
            "/v1/consents",
            &carrier,
            &json!({"reference": "x", "kind": "data_subject", "carrier_id": "carrier-a",
                    "subject": {"phone_number": "+1", "sip_uri": "sip:a@b"}, "countries": ["ZZ"],
                    "granted_at": "soon", "extra": 1}),
        )
        .await
        .expect(422);
    let mut f = r.bad_fields();
    f.sort();
    assert_eq!(f, ["countries[0]", "extra", "granted_at", "subject"]);

    // A carrier cannot register for another carrier.
    app.post(
        "/v1/consents",
        &carrier,
        &json!({"reference": "y", "kind": "data_subject", "carrier_id": "carrier-b",
                "subject": {"phone_number": "+14255550100"}, "countries": ["FR"],
                "granted_at": "2026-01-01T00:00:00Z"}),
    )
    .await
    .expect(403);

    // Another carrier's consent answers 404, exactly like a missing one.
    app.consent("oc-b", "carrier-b", "tenant-1", &["FR"]).await;
    let foreign = app.get("/v1/consents/oc-b", &carrier).await.expect(404);
    let missing = app.get("/v1/consents/nope", &carrier).await.expect(404);
    assert_eq!(foreign.body["type"], missing.body["type"]);
    app.post(
        "/v1/consents/oc-b/status",
        &carrier,
        &json!({"status": "suspended"}),
    )
    .await
    .expect(404);
    app.get("/v1/consents/oc-b", &app.carrier("carrier-b"))
        .await
        .expect(200);
    // The probes leave a trace, naming the reference unless it is free text.
    app.get("/v1/consents/%2B14255550100", &carrier)
        .await
        .expect(404);
    let misses: Vec<(Value, Value)> = app
        .all_pages(
            "/v1/audit?actor=carrier-carrier-a&limit=100",
            &app.token(Role::Auditor, None),
        )
        .await
        .iter()
        .filter(|e| e["entry"]["outcome"] == "not_found")
        .map(|e| {
            (
                e["entry"]["action"].clone(),
                e["entry"]["target"]["reference"].clone(),
            )
        })
        .collect();
    assert_eq!(
        misses,
        [
            (json!("consent.read"), json!("?")),
            (json!("consent.status"), json!("oc-b")),
            (json!("consent.read"), json!("nope")),
            (json!("consent.read"), json!("oc-b")),
        ]
    );

    // A reference is registered once.
    app.post(
        "/v1/consents",
        &app.platform(),
        &json!({"reference": "oc-b", "kind": "customer_operator", "carrier_id": "carrier-b",
                "customer_tenant_id": "t", "countries": ["FR"], "granted_at": "2026-01-01T00:00:00Z"}),
    )
    .await
    .expect(409);
}
both!(consent_registration_is_validated_and_scoped);

/// A customer's authorization of a carrier gates the platform's number
/// assignments to that carrier: the carrier must neither make one up nor
/// undo the platform's suspension of one.
async fn a_carrier_cannot_grant_or_revive_its_own_customer_authorization(app: TestApp) {
    let carrier = app.carrier("carrier-a");
    let r = app
        .post(
            "/v1/consents",
            &carrier,
            &json!({"reference": "oc-fake", "kind": "customer_operator", "carrier_id": "carrier-a",
                    "customer_tenant_id": "tenant-evil", "countries": ["FR"],
                    "granted_at": "2026-01-01T00:00:00Z"}),
        )
        .await
        .expect(403);
    assert!(r.text.contains("consents/customer_operator"), "{}", r.text);
    app.get("/v1/consents/oc-fake", &app.platform())
        .await
        .expect(404);

    app.consent("oc-1", "carrier-a", "tenant-1", &["FR"]).await;
    app.post(
        "/v1/consents/oc-1/status",
        &app.platform(),
        &json!({"status": "suspended"}),
    )
    .await
    .expect(200);
    for status in ["active", "removed"] {
        app.post(
            "/v1/consents/oc-1/status",
            &carrier,
            &json!({"status": status}),
        )
        .await
        .expect(403);
    }
    let shown = app.get("/v1/consents/oc-1", &carrier).await.expect(200);
    assert_eq!(shown.body["status"], "suspended");

    // Its subscribers' own consents are the carrier's to record.
    app.post(
        "/v1/consents",
        &carrier,
        &json!({"reference": "ds-1", "kind": "data_subject", "carrier_id": "carrier-a",
                "subject": {"phone_number": "+14255550100"}, "countries": ["FR"],
                "granted_at": "2026-01-01T00:00:00Z"}),
    )
    .await
    .expect(201);
    app.post(
        "/v1/consents/ds-1/status",
        &carrier,
        &json!({"status": "withdrawn"}),
    )
    .await
    .expect(200);
}
both!(a_carrier_cannot_grant_or_revive_its_own_customer_authorization);
