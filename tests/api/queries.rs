//! Reading the transfer log: filters, subject lookups, keyset pagination.

use std::collections::HashSet;

use serde_json::json;

use crate::both;
use crate::helpers::*;

async fn filters_narrow_the_log(app: TestApp) {
    let platform = app.platform();
    app.post(
        "/v1/transfers",
        &platform,
        &cdr("carrier-a", "c1", "+14255550100", "+14255550101"),
    )
    .await
    .expect(201);
    app.post(
        "/v1/transfers",
        &platform,
        &quality("carrier-a", "c1", "+14255550100", "+14255550101"),
    )
    .await
    .expect(201);
    app.post(
        "/v1/transfers",
        &platform,
        &cdr("carrier-b", "c2", "+14255550102", "+14255550103"),
    )
    .await
    .expect(201);
    app.post(
        "/v1/transfers",
        &app.carrier("carrier-b"),
        &duration("carrier-b", "c2", "+14255550102", "+14255550103"),
    )
    .await
    .expect(201);
    let officer = app.officer();
    let count = |r: &Reply| r.body["items"].as_array().unwrap().len();

    assert_eq!(
        count(&app.get("/v1/transfers", &officer).await.expect(200)),
        4
    );
    assert_eq!(
        count(
            &app.get("/v1/transfers?carrier_id=carrier-b", &officer)
                .await
        ),
        2
    );
    assert_eq!(
        count(
            &app.get("/v1/transfers?category=call_quality", &officer)
                .await
        ),
        1
    );
    assert_eq!(
        count(
            &app.get("/v1/transfers?direction=carrier_to_platform", &officer)
                .await
        ),
        1
    );
    assert_eq!(
        count(
            &app.get("/v1/transfers?purpose=troubleshooting", &officer)
                .await
        ),
        2
    );
    assert_eq!(
        count(
            &app.get("/v1/transfers?legal_basis=contract", &officer)
                .await
        ),
        1
    );
    assert_eq!(
        count(&app.get("/v1/transfers?jurisdiction=DE", &officer).await),
        1
    );
    assert_eq!(
        count(
            &app.get("/v1/transfers?from=2026-11-01T10:03:00Z", &officer)
                .await
        ),
        2
    );
    assert_eq!(
        count(
            &app.get("/v1/transfers?to=2026-11-01T10:03:00Z", &officer)
                .await
        ),
        2
    );
    // A `+` left unescaped in a time zone offset is read as itself: no
    // date-time has a space there.
    assert_eq!(
        count(
            &app.get("/v1/transfers?from=2026-11-01T11:03:00+01:00", &officer)
                .await
        ),
        2
    );
    assert_eq!(count(&app.get("/v1/transfers?carrier_id=carrier-a&category=call_detail_record&purpose=troubleshooting", &officer).await), 1);

    // Newest first, metadata only by default.
    let r = app.get("/v1/transfers", &officer).await;
    let items = r.body["items"].as_array().unwrap();
    assert_eq!(items[0]["category"], "call_duration");
    assert!(items.iter().all(|i| i.get("payload").is_none()));

    // Bad parameters are named, all of them.
    let r = app
        .get(
            "/v1/transfers?category=x&limit=5000&from=yesterday&cursor=zz&colour=red",
            &officer,
        )
        .await
        .expect(422);
    let mut f = r.bad_fields();
    f.sort();
    assert_eq!(f, ["category", "colour", "cursor", "from", "limit"]);
    // A period that ends before it starts is named, as in reports and
    // reconciliation.
    for path in ["/v1/transfers", "/v1/audit"] {
        let r = app
            .get(
                &format!("{path}?from=2026-11-02T00:00:00Z&to=2026-11-01T00:00:00Z"),
                &officer,
            )
            .await
            .expect(422);
        assert_eq!(r.bad_fields(), ["to"], "{path}");
    }
    // A query string that is not URL encoding is refused, not searched for
    // as some other text, and the answer names the parameter, not its value.
    for (query, names) in [
        (
            "subject=%2B1425%zz",
            "the value of `subject` has a % not followed",
        ),
        (
            "subject=%FF%FE",
            "the value of `subject` decodes to bytes that are not UTF-8",
        ),
        (
            "carrier_id=carrier-a&category=call%2",
            "the value of `category` has a %",
        ),
        ("sub%jject=1", "a parameter name has a %"),
    ] {
        let r = app
            .get(&format!("/v1/transfers?{query}"), &officer)
            .await
            .expect(400);
        let detail = r.body["detail"].as_str().unwrap();
        assert!(detail.contains(names), "{query}: {detail}");
        assert!(!detail.contains("1425"), "{query}: {detail}");
    }
    // Encoded text that is valid still decodes.
    let r = app
        .get(
            "/v1/transfers?purpose=trouble%73hooting&carrier_id=carrier%2Da",
            &officer,
        )
        .await
        .expect(200);
    assert!(count(&r) > 0);
}
both!(filters_narrow_the_log);

async fn subjects_are_found_through_the_blind_index_in_any_spelling(app: TestApp) {
    let platform = app.platform();
    app.post(
        "/v1/transfers",
        &platform,
        &cdr("carrier-a", "c1", "+14255550100", "sip:Alice@Example.com"),
    )
    .await
    .expect(201);
    app.post(
        "/v1/transfers",
        &platform,
        &quality("carrier-a", "c1", "+33123456780", "+1 425 555 0100"),
    )
    .await
    .expect(201);
    app.post(
        "/v1/transfers",
        &platform,
        &cdr("carrier-a", "c2", "+33123456780", "+33123456781"),
    )
    .await
    .expect(201);
    let officer = app.officer();
    for spelling in [
        "%2B14255550100",
        "%2B1%20(425)%20555-0100",
        "tel:%2B1-425-555-0100",
    ] {
        let r = app
            .get(&format!("/v1/transfers?subject={spelling}"), &officer)
            .await
            .expect(200);
        assert_eq!(r.body["items"].as_array().unwrap().len(), 2, "{spelling}");
    }
    for spelling in [
        "sip:alice@example.com",
        "SIP:ALICE@EXAMPLE.COM;transport=tls",
    ] {
        let r = app
            .get(
                &format!("/v1/transfers?subject={}", urlencode(spelling)),
                &officer,
            )
            .await
            .expect(200);
        assert_eq!(r.body["items"].as_array().unwrap().len(), 1, "{spelling}");
    }
    // Combined with other filters, and decrypted on request.
    let r = app
        .read(
            "/v1/transfers?subject=%2B14255550100&category=call_quality&include=payload",
            &officer,
        )
        .await
        .expect(200);
    let items = r.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["payload"]["callee"], "+14255550100");
    // So is the `+` of a phone number.
    let r = app
        .get(
            "/v1/transfers?subject=+14255550100&category=call_quality",
            &officer,
        )
        .await
        .expect(200);
    assert_eq!(r.body["items"].as_array().unwrap().len(), 1);
    assert_eq!(
        app.get("/v1/transfers?subject=%2B14255550199", &officer)
            .await
            .body["items"],
        json!([])
    );
    assert_eq!(
        app.get("/v1/transfers?subject=hello", &officer)
            .await
            .expect(422)
            .bad_fields(),
        ["subject"]
    );

    // A SIP user part's parameters: an extension is another subject, number
    // portability's routing parameters are not.
    for (call, caller) in [
        ("c3", "sip:+14255551000;ext=12;npdi@sbc.example;user=phone"),
        ("c4", "sip:+14255551000;npdi;rn=+14255559999@sbc.example"),
    ] {
        app.post(
            "/v1/transfers",
            &platform,
            &cdr("carrier-a", call, caller, "+33123456780"),
        )
        .await
        .expect(201);
    }
    for (spelling, calls) in [
        ("sip:+14255551000;ext=12@sbc.example", ["c3"]),
        ("sip:+14255551000@SBC.example;user=phone", ["c4"]),
    ] {
        let r = app
            .read(
                &format!(
                    "/v1/transfers?subject={}&include=payload",
                    urlencode(spelling)
                ),
                &officer,
            )
            .await
            .expect(200);
        let found: Vec<&str> = r.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["payload"]["call_id"].as_str().unwrap())
            .collect();
        assert_eq!(found, calls, "{spelling}");
    }
}
both!(subjects_are_found_through_the_blind_index_in_any_spelling);

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn pagination_is_stable_under_concurrent_inserts(app: TestApp) {
    let platform = app.platform();
    let items: Vec<_> = (0..120)
        .map(|i| {
            let mut t = cdr(
                "carrier-a",
                &format!("c{i}"),
                "+14255550100",
                "+14255550101",
            );
            t["occurred_at"] = json!(format!("2026-11-01T{:02}:{:02}:00Z", 8 + i / 60, i % 60));
            t
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
    let existing: HashSet<String> = r.body["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();

    // Walk pages of 25 while another writer keeps inserting newer and older records.
    let writer = {
        let (client, url, token) = (
            app.client.clone(),
            format!("{}/v1/transfers", app.addr),
            platform.clone(),
        );
        tokio::spawn(async move {
            for i in 0..30 {
                let mut t = cdr(
                    "carrier-a",
                    &format!("new{i}"),
                    "+14255550100",
                    "+14255550101",
                );
                t["occurred_at"] = json!(if i % 2 == 0 {
                    "2026-11-01T12:00:00Z"
                } else {
                    "2026-11-01T07:00:00Z"
                });
                client
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&t)
                    .send()
                    .await
                    .unwrap();
            }
        })
    };
    let officer = app.officer();
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut last_key: Option<(String, String)> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/transfers?limit=25&cursor={c}"),
            None => "/v1/transfers?limit=25".to_string(),
        };
        let r = app.get(&path, &officer).await.expect(200);
        for item in r.body["items"].as_array().unwrap() {
            let key = (
                item["occurred_at"].as_str().unwrap().to_string(),
                item["id"].as_str().unwrap().to_string(),
            );
            if let Some(prev) = &last_key {
                assert!(key < *prev, "strictly newest first");
            }
            last_key = Some(key);
            seen.push(item["id"].as_str().unwrap().to_string());
        }
        match r.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    writer.await.unwrap();
    let unique: HashSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "no record twice");
    assert!(
        existing.is_subset(&unique),
        "every record that existed before the walk was seen"
    );
}
both!(pagination_is_stable_under_concurrent_inserts);

async fn decrypting_reads_by_officers_need_a_reason(app: TestApp) {
    let r = app
        .post(
            "/v1/transfers",
            &app.platform(),
            &cdr("carrier-a", "c1", "+14255550100", "+14255550101"),
        )
        .await
        .expect(201);
    let id = r.body["id"].as_str().unwrap();
    let officer = app.officer();
    let r = app
        .get(&format!("/v1/transfers/{id}"), &officer)
        .await
        .expect(400);
    assert!(r.body["detail"]
        .as_str()
        .unwrap()
        .contains("X-Access-Reason"));
    app.get("/v1/transfers?include=payload", &officer)
        .await
        .expect(400);
    app.get("/v1/transfers", &officer).await.expect(200);
    app.read(&format!("/v1/transfers/{id}"), &officer)
        .await
        .expect(200);
    // Carriers reading their own records state no reason.
    app.get(&format!("/v1/transfers/{id}"), &app.carrier("carrier-a"))
        .await
        .expect(200);
    // Unknown and malformed ids are 404.
    app.read(&format!("/v1/transfers/{}", uuid::Uuid::now_v7()), &officer)
        .await
        .expect(404);
    app.read("/v1/transfers/not-a-uuid", &officer)
        .await
        .expect(404);
    // A path segment that is no id is not echoed: it may be a number.
    let carrier = app.carrier("carrier-a");
    for (path, token) in [
        ("/v1/transfers/%2B33123456789", &officer),
        ("/v1/subject-requests/%2B33123456789", &carrier),
        ("/v1/subject-requests/%2B33123456789/export", &carrier),
        ("/v1/consents/%2B33123456789", &carrier),
    ] {
        let r = app.read(path, token).await.expect(404);
        assert!(!r.text.contains("33123456789"), "{path}: {}", r.text);
    }
    let r = app
        .raw(
            app.client
                .delete(format!("{}/v1/holds/%2B33123456789", app.addr))
                .bearer_auth(&officer),
        )
        .await
        .expect(404);
    assert!(!r.text.contains("33123456789"), "{}", r.text);
}
both!(decrypting_reads_by_officers_need_a_reason);

/// Records of several categories and carriers, interleaved in time and
/// sharing instants, come back newest first (ties by id), each once,
/// through pages of every size, whole or filtered by carrier or direction.
async fn pages_of_mixed_categories_come_newest_first(app: TestApp) {
    // (occurred_at, id, carrier, category)
    let mut posted: Vec<(String, String, String, String)> = Vec::new();
    let mut post = async |token: String, items: Vec<serde_json::Value>| {
        let r = app
            .post("/v1/transfers/batch", &token, &json!({"transfers": items}))
            .await
            .expect(201);
        for (item, id) in items.iter().zip(r.body["ids"].as_array().unwrap()) {
            posted.push((
                item["occurred_at"].as_str().unwrap().to_string(),
                id.as_str().unwrap().to_string(),
                item["carrier_id"].as_str().unwrap().to_string(),
                item["category"].as_str().unwrap().to_string(),
            ));
        }
    };
    // Two records at each minute: of different categories, often of
    // different carriers.
    let at = |i: usize| format!("2026-11-01T09:{:02}:00Z", (i * 7) % 23);
    let platform: Vec<_> = (0..36)
        .map(|i| {
            let carrier = ["carrier-a", "carrier-b"][i % 2];
            let call = format!("m{i}");
            let mut t = if i % 3 == 0 {
                quality(carrier, &call, "+14255550100", "+14255550101")
            } else {
                cdr(carrier, &call, "+14255550100", "+14255550101")
            };
            t["occurred_at"] = json!(at(i));
            t
        })
        .collect();
    post(app.platform(), platform).await;
    let durations: Vec<_> = (36..50)
        .map(|i| {
            let mut t = duration(
                "carrier-a",
                &format!("m{i}"),
                "+14255550100",
                "+14255550101",
            );
            t["occurred_at"] = json!(at(i));
            t
        })
        .collect();
    post(app.carrier("carrier-a"), durations).await;

    let newest_first = |carrier: Option<&str>, category: Option<&str>| {
        let mut v: Vec<_> = posted
            .iter()
            .filter(|p| carrier.is_none_or(|c| p.2 == c) && category.is_none_or(|c| p.3 == c))
            .map(|p| (p.0.clone(), p.1.clone()))
            .collect();
        v.sort_by(|a, b| b.cmp(a));
        v.into_iter().map(|p| p.1).collect::<Vec<_>>()
    };
    let ids = |items: Vec<serde_json::Value>| {
        items
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let officer = app.officer();
    for limit in [1, 7, 50, 100] {
        let all = app
            .all_pages(&format!("/v1/transfers?limit={limit}"), &officer)
            .await;
        assert_eq!(
            ids(all),
            newest_first(None, None),
            "whole log, pages of {limit}"
        );
        let a = app
            .all_pages(
                &format!("/v1/transfers?carrier_id=carrier-a&limit={limit}"),
                &officer,
            )
            .await;
        assert_eq!(
            ids(a),
            newest_first(Some("carrier-a"), None),
            "one carrier, pages of {limit}"
        );
    }
    // A carrier's own view is the same merge, scoped.
    let own = app
        .all_pages("/v1/transfers?limit=6", &app.carrier("carrier-b"))
        .await;
    assert_eq!(ids(own), newest_first(Some("carrier-b"), None));
    // A direction only one category crosses in; a purpose no category of
    // that direction serves.
    let inbound = app
        .all_pages(
            "/v1/transfers?direction=carrier_to_platform&limit=4",
            &officer,
        )
        .await;
    assert_eq!(ids(inbound), newest_first(None, Some("call_duration")));
    let none = app
        .get(
            "/v1/transfers?direction=carrier_to_platform&purpose=troubleshooting",
            &officer,
        )
        .await
        .expect(200);
    assert_eq!(none.body["items"], json!([]));
    assert_eq!(none.body["next_cursor"], json!(null));
}
both!(pages_of_mixed_categories_come_newest_first);

/// A cursor continues the list that issued it; one from another list is
/// refused, not read as a position in this one.
async fn a_foreign_cursor_or_a_malformed_carrier_is_refused(app: TestApp) {
    let officer = app.officer();
    let items: Vec<_> = (0..3)
        .map(|i| {
            cdr(
                "carrier-a",
                &format!("c-{i}"),
                "+14255550100",
                "+14255550101",
            )
        })
        .collect();
    app.post(
        "/v1/transfers/batch",
        &app.platform(),
        &json!({"transfers": items}),
    )
    .await
    .expect(201);
    let page = app.get("/v1/transfers?limit=1", &officer).await.expect(200);
    let cursor = page.body["next_cursor"].as_str().unwrap().to_string();
    app.get(&format!("/v1/transfers?limit=1&cursor={cursor}"), &officer)
        .await
        .expect(200);
    // An empty or malformed carrier is refused, not matched against nothing.
    for bad in ["", "a%20b"] {
        let r = app
            .get(&format!("/v1/transfers?carrier_id={bad}"), &officer)
            .await
            .expect(422);
        assert_eq!(r.bad_fields(), ["carrier_id"]);
    }
    // A cursor of the earlier, untagged format (`time:id`) is refused too.
    let untagged = {
        use base64::Engine;
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let raw = String::from_utf8(engine.decode(&cursor).unwrap()).unwrap();
        engine.encode(raw.strip_prefix("t:").unwrap())
    };
    let r = app
        .get(&format!("/v1/transfers?cursor={untagged}"), &officer)
        .await
        .expect(422);
    assert_eq!(r.bad_fields(), ["cursor"]);
    for list in ["/v1/retention/sweeps", "/v1/subject-requests"] {
        let r = app
            .get(&format!("{list}?cursor={cursor}"), &officer)
            .await
            .expect(422);
        assert_eq!(r.bad_fields(), ["cursor"], "{list}");
    }
}
both!(a_foreign_cursor_or_a_malformed_carrier_is_refused);

/// On PostgreSQL a page of one subject's records is planned as index probes
/// whatever the statistics say. Right after a bulk load there are none, and
/// the planner once chose a nested loop over all of the carrier's records
/// that rescanned a materialized copy of the subject's lookup rows for each
/// (2 s a page, an export of 10,000 records 41 s, on 40,000 records).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_page_is_planned_as_probes_right_after_a_bulk_load() {
    let Some(app) = spawn_app(Backend::Postgres).await else {
        return;
    };
    // 40,000 records of 5 carriers; the first 10,000 are one subject's.
    app.exec(
        "INSERT INTO transfers (id, carrier_id, direction, category, purpose, legal_basis,
                                jurisdiction, occurred_at, recorded_at, retain_until, recorded_by, body)
         SELECT md5(g::text)::uuid, 'carrier-' || (g % 5), 'platform_to_carrier', 'call_detail_record',
                'billing', 'contract', 'US', 1700000000000000 + g * 1000000::bigint, 0, 0, 'bulk', '\\x00'
         FROM generate_series(1, 40000) g",
        None,
        None,
    )
    .await;
    app.exec(
        "INSERT INTO subject_lookup (blind_index, occurred_at, transfer_id)
         SELECT CASE WHEN g <= 10000 THEN '\\x01'::bytea ELSE decode(md5(g::text), 'hex') END,
                1700000000000000 + g * 1000000::bigint, md5(g::text)::uuid
         FROM generate_series(1, 40000) g",
        None,
        None,
    )
    .await;
    let page = transfer_ledger::storage::transfers::LogFilter {
        scope: Some("carrier-1".into()),
        subject_index: Some(vec![1]),
        after: Some((1700000000000000 + 5000 * 1000000, uuid::Uuid::nil())),
        limit: 500,
        ..Default::default()
    };
    let plan = transfer_ledger::storage::transfers::plan_of_subject_page(app.db(), &page)
        .await
        .unwrap()
        .join("\n");
    assert!(
        !plan.contains("Materialize") && plan.contains("Index Scan using transfers_pkey"),
        "{plan}"
    );
}
