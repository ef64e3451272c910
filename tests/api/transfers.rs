//! Recording transfers: validation, retention, batches, idempotency.

use serde_json::json;

use crate::both;
use crate::helpers::*;

async fn records_each_category_and_reads_it_back_normalized(app: TestApp) {
    // Given a customer tenant that consented to carrier-a in France
    app.consent("oc-1", "carrier-a", "tenant-1", &["FR", "BE"])
        .await;
    let platform = app.platform();
    let carrier = app.carrier("carrier-a");

    // When the platform records flows 1 and 2 and the carrier flow 3
    let na = app
        .post(
            "/v1/transfers",
            &platform,
            &assignment(
                "carrier-a",
                "oc-1",
                "tenant-1",
                "+33 1 23 45 67 89",
                "SIP:+33123456789@SBC.carrier-a.example;transport=tls",
            ),
        )
        .await
        .expect(201);
    let c = app
        .post(
            "/v1/transfers",
            &platform,
            &cdr(
                "carrier-a",
                "call-1",
                "+1 (425) 555-0100",
                "sip:Bob@Example.com",
            ),
        )
        .await
        .expect(201);
    let q = app
        .post(
            "/v1/transfers",
            &platform,
            &quality("carrier-a", "call-1", "+14255550100", "+33123456780"),
        )
        .await
        .expect(201);
    let d = app
        .post(
            "/v1/transfers",
            &carrier,
            &duration("carrier-a", "call-1", "+14255550100", "+33123456780"),
        )
        .await
        .expect(201);

    // Then each answer carries id, recorded_at and retain_until from the policy
    assert_eq!(
        c.body["retain_until"], "2027-04-30T10:02:00Z",
        "CDR in FR: 180 days"
    );
    assert_eq!(
        d.body["retain_until"], "2028-05-02T10:05:00Z",
        "call_duration in US: 548 days"
    );
    assert!(na.body["recorded_at"].is_string());

    // And each record reads back decrypted, with identifiers normalized
    let r = app
        .read(
            &format!("/v1/transfers/{}", na.body["id"].as_str().unwrap()),
            &app.officer(),
        )
        .await
        .expect(200);
    assert_eq!(r.body["payload"]["phone_number"], "+33123456789");
    assert_eq!(
        r.body["payload"]["sip_uri"],
        "sip:+33123456789@sbc.carrier-a.example"
    );
    assert_eq!(r.body["consent_reference"], "oc-1");
    let r = app
        .read(
            &format!("/v1/transfers/{}", c.body["id"].as_str().unwrap()),
            &carrier,
        )
        .await
        .expect(200);
    assert_eq!(r.body["payload"]["caller"], "+14255550100");
    assert_eq!(r.body["payload"]["callee"], "sip:bob@example.com");
    assert_eq!(r.body["payload"]["call_id"], "call-1");
    assert_eq!(r.body["payload"]["duration_seconds"], 100);
    assert_eq!(r.body["category"], "call_detail_record");
    let r = app
        .read(
            &format!("/v1/transfers/{}", q.body["id"].as_str().unwrap()),
            &carrier,
        )
        .await
        .expect(200);
    assert_eq!(r.body["payload"]["mos"], 4.2);
    assert_eq!(r.body["payload"]["codec"], "SILK");
    let r = app
        .read(
            &format!("/v1/transfers/{}", d.body["id"].as_str().unwrap()),
            &carrier,
        )
        .await
        .expect(200);
    assert_eq!(r.body["payload"]["start_time"], "2026-11-01T10:00:00Z");
}
both!(records_each_category_and_reads_it_back_normalized);

async fn bad_input_names_every_field_and_stores_nothing(app: TestApp) {
    let mut t = cdr("carrier-a", "call-1", "12345", "+14255550101");
    t["payload"]["duration_seconds"] = json!(-3);
    t["payload"]["colour"] = json!("red");
    t["purpose"] = json!("usage_reporting");
    t["jurisdiction"] = json!("France");
    t["surprise"] = json!(true);
    let r = app
        .post("/v1/transfers", &app.platform(), &t)
        .await
        .expect(422);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    let mut fields = r.bad_fields();
    fields.sort();
    assert_eq!(
        fields,
        [
            "jurisdiction",
            "payload.caller",
            "payload.colour",
            "payload.duration_seconds",
            "purpose",
            "surprise"
        ]
    );
    // The message never echoes the rejected value.
    assert!(!r.text.contains("12345"));
    assert_eq!(app.count("transfers").await, 0);
    assert_eq!(app.count("subject_keys").await, 0);

    // Nor a field name that is not shaped like one (a client keying a map
    // by phone number or SIP URI), in the body or in the query.
    let mut t = cdr("carrier-a", "call-1", "+14255550100", "+14255550101");
    t["payload"]["+14255550177"] = json!("x");
    t["payload"]["alice@example.com"] = json!("x");
    let r = app
        .post("/v1/transfers", &app.platform(), &t)
        .await
        .expect(422);
    assert_eq!(r.bad_fields(), ["payload.?", "payload.?"]);
    assert!(
        !r.text.contains("4255550177") && !r.text.contains("alice"),
        "{}",
        r.text
    );
    let r = app
        .get("/v1/transfers?%2B14255550177=1&colour=red", &app.officer())
        .await
        .expect(422);
    let mut fields = r.bad_fields();
    fields.sort();
    assert_eq!(fields, ["?", "colour"]);
    assert!(!r.text.contains("4255550177"), "{}", r.text);

    // Direction against the flow table.
    let mut t = duration("carrier-a", "c", "+14255550100", "+14255550101");
    t["direction"] = json!("platform_to_carrier");
    let r = app
        .post("/v1/transfers", &app.platform(), &t)
        .await
        .expect(422);
    assert_eq!(r.bad_fields(), ["direction"]);
}
both!(bad_input_names_every_field_and_stores_nothing);

async fn retention_days_may_shorten_but_never_extend(app: TestApp) {
    let mut t = cdr("carrier-a", "c-1", "+14255550100", "+14255550101");
    t["retention_days"] = json!(30);
    let r = app
        .post("/v1/transfers", &app.platform(), &t)
        .await
        .expect(201);
    assert_eq!(r.body["retain_until"], "2026-12-01T10:02:00Z");
    t["retention_days"] = json!(181);
    let r = app
        .post("/v1/transfers", &app.platform(), &t)
        .await
        .expect(422);
    assert_eq!(r.bad_fields(), ["retention_days"]);
    assert_eq!(app.count("transfers").await, 1);
}
both!(retention_days_may_shorten_but_never_extend);

async fn batches_are_all_or_nothing(app: TestApp) {
    let platform = app.platform();
    let items: Vec<_> = (0..50)
        .map(|i| {
            cdr(
                "carrier-a",
                &format!("call-{i}"),
                &format!("+142555501{:02}", i % 100),
                "+33123456780",
            )
        })
        .collect();
    let r = app
        .post(
            "/v1/transfers/batch",
            &platform,
            &json!({"transfers": items}),
        )
        .await
        .expect(201);
    let ids = r.body["ids"].as_array().unwrap();
    assert_eq!(ids.len(), 50);
    // In input order: item 7 is call-7.
    let seven = app
        .read(
            &format!("/v1/transfers/{}", ids[7].as_str().unwrap()),
            &app.officer(),
        )
        .await
        .expect(200);
    assert_eq!(seven.body["payload"]["call_id"], "call-7");

    // One bad item among good ones: every bad index is listed, nothing stored.
    let mut items: Vec<_> = (0..5)
        .map(|i| {
            cdr(
                "carrier-b",
                &format!("b-{i}"),
                "+14255550100",
                "+14255550101",
            )
        })
        .collect();
    items[1]["payload"]["caller"] = json!("not a number");
    items[3]["category"] = json!("voicemail");
    // Rules of the retention policy and of number assignments are named in
    // the same answer, with the other bad fields of the same item.
    items[2]["retention_days"] = json!(500);
    items[4]["retention_days"] = json!(500);
    items[4]["payload"]["callee"] = json!("nope");
    items.push(assignment(
        "carrier-b",
        "oc-1",
        "tenant-1",
        "+14255550100",
        "sip:+14255550100@sbc.example",
    ));
    items[5]["legal_basis"] = json!("consent");
    let r = app
        .post(
            "/v1/transfers/batch",
            &platform,
            &json!({"transfers": items}),
        )
        .await
        .expect(422);
    let mut bad = r.bad_fields();
    bad.sort();
    assert_eq!(
        bad,
        [
            "1:payload.caller",
            "2:retention_days",
            "3:category",
            "4:payload.callee",
            "4:retention_days",
            "5:legal_basis"
        ]
    );
    assert_eq!(app.count("transfers").await, 50);

    // Limits.
    app.post("/v1/transfers/batch", &platform, &json!({"transfers": []}))
        .await
        .expect(422);
    let too_many: Vec<_> = (0..10_001).map(|_| json!({})).collect();
    let r = app
        .post(
            "/v1/transfers/batch",
            &platform,
            &json!({"transfers": too_many}),
        )
        .await
        .expect(422);
    assert_eq!(r.bad_fields(), ["transfers"]);
    app.post(
        "/v1/transfers/batch",
        &platform,
        &json!({"transfers": [], "extra": 1}),
    )
    .await
    .expect(422);
}
both!(batches_are_all_or_nothing);

async fn a_full_batch_of_ten_thousand_is_one_transaction(app: TestApp) {
    let items: Vec<_> = (0..10_000)
        .map(|i| {
            cdr(
                "carrier-a",
                &format!("call-{i}"),
                &format!("+1425555{:04}", i % 2000),
                &format!("+3312345{:04}", i % 3000),
            )
        })
        .collect();
    assert_eq!(app.batch(items).await.len(), 10_000);
    assert_eq!(app.count("transfers").await, 10_000);
    assert_eq!(app.count("transfer_slots").await, 20_000);
}
both!(a_full_batch_of_ten_thousand_is_one_transaction);

async fn idempotent_retries_store_nothing_new(app: TestApp) {
    let platform = app.platform();
    let mut t = cdr("carrier-a", "call-1", "+14255550100", "+14255550101");
    t["idempotency_key"] = json!("req-1");
    let first = app.post("/v1/transfers", &platform, &t).await.expect(201);
    // The same transfer spelled differently is the same request.
    t["payload"]["caller"] = json!("+1 425 555 0100");
    let again = app.post("/v1/transfers", &platform, &t).await.expect(201);
    assert_eq!(first.body, again.body);
    assert_eq!(app.count("transfers").await, 1);

    // Reusing the key for a different transfer is a conflict.
    t["payload"]["duration_seconds"] = json!(5);
    let r = app.post("/v1/transfers", &platform, &t).await.expect(409);
    assert!(r.body["detail"].as_str().unwrap().contains("req-1"));

    // In a batch: a retried item and a repeat within the batch map to one record each.
    let mut a = cdr("carrier-a", "call-2", "+14255550100", "+14255550101");
    a["idempotency_key"] = json!("req-2");
    let mut b = cdr("carrier-a", "call-1", "+14255550100", "+14255550101");
    b["idempotency_key"] = json!("req-1");
    let r = app
        .post(
            "/v1/transfers/batch",
            &platform,
            &json!({"transfers": [a.clone(), b, a]}),
        )
        .await
        .expect(201);
    let ids = r.body["ids"].as_array().unwrap();
    assert_eq!(ids[1], first.body["id"]);
    assert_eq!(ids[0], ids[2]);
    assert_eq!(app.count("transfers").await, 2);
}
both!(idempotent_retries_store_nothing_new);

async fn concurrent_retries_with_one_key_record_once(app: TestApp) {
    let platform = app.platform();
    let mut t = cdr("carrier-a", "call-1", "+14255550100", "+14255550101");
    t["idempotency_key"] = json!("same");
    let mut handles = Vec::new();
    for _ in 0..8 {
        let (client, url, token, body) = (
            app.client.clone(),
            format!("{}/v1/transfers", app.addr),
            platform.clone(),
            t.clone(),
        );
        handles.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for h in handles {
        let (status, body) = h.await.unwrap();
        assert_eq!(status, 201, "{body}");
        ids.insert(body["id"].as_str().unwrap().to_string());
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(app.count("transfers").await, 1);
}
both!(concurrent_retries_with_one_key_record_once);

async fn concurrent_batches_sharing_subjects_across_carriers_all_succeed(app: TestApp) {
    // Each batch touches the same subjects of several carriers, in a
    // different order: the service must not deadlock or fail any of them.
    let carriers = ["carrier-a", "carrier-b", "carrier-c", "carrier-d"];
    let mut handles = Vec::new();
    for round in 0..8 {
        let mut items = Vec::new();
        for k in 0..60 {
            let carrier = carriers[(k + round) % carriers.len()];
            items.push(cdr(
                carrier,
                &format!("r{round}-{k}"),
                &format!("+142555501{:02}", k % 30),
                &format!("+142555502{:02}", (k * 7) % 30),
            ));
        }
        if round % 2 == 1 {
            items.reverse();
        }
        let (client, url, token) = (
            app.client.clone(),
            format!("{}/v1/transfers/batch", app.addr),
            app.platform(),
        );
        handles.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .bearer_auth(token)
                .json(&json!({"transfers": items}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }));
    }
    for h in handles {
        let (status, body) = h.await.unwrap();
        assert_eq!(status, 201, "{body}");
    }
    assert_eq!(app.count("transfers").await, 480);
    // 60 distinct numbers per carrier at most: one key per (carrier, subject).
    assert!(app.count("subject_keys").await <= 4 * 60);
}
both!(concurrent_batches_sharing_subjects_across_carriers_all_succeed);

/// Two instances on one database (a second server, or the CLI beside one)
/// write side by side: no write fails because the other wrote meanwhile.
async fn two_instances_write_side_by_side(app: TestApp) {
    let other = app.another_instance(&[]).await;
    let platform = app.platform();
    let writers = [&app.addr, &other.url, &app.addr, &other.url].map(|base| {
        let (client, platform) = (&app.client, &platform);
        async move {
            let mut statuses = Vec::new();
            for round in 0..15 {
                let items: Vec<_> = (0..20)
                    .map(|i| {
                        // Shared subjects: every writer uses their keys.
                        cdr(
                            "carrier-a",
                            &format!("{base}-{round}-{i}"),
                            &format!("+1425555{:04}", i % 5),
                            "+33123456780",
                        )
                    })
                    .collect();
                let r = client
                    .post(format!("{base}/v1/transfers/batch"))
                    .bearer_auth(platform)
                    .json(&json!({"transfers": items}))
                    .send()
                    .await
                    .unwrap();
                statuses.push((r.status().as_u16(), r.text().await.unwrap()));
            }
            statuses
        }
    });
    let results = futures::future::join_all(writers).await;
    for (status, body) in results.iter().flatten() {
        assert_eq!(*status, 201, "{body}");
    }
    drop(other);
    assert_eq!(app.count("transfers").await, 4 * 15 * 20);
}
both!(two_instances_write_side_by_side);
