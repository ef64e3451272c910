//! The Art. 30 record of processing.

use crate::both;
use crate::helpers::*;

async fn the_record_of_processing_is_filled_in_from_the_ledger(app: TestApp) {
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
        &cdr("carrier-a", "c2", "+14255550100", "+14255550101"),
    )
    .await
    .expect(201);
    let mut us = cdr("carrier-a", "c3", "+14255550100", "+14255550101");
    us["jurisdiction"] = "US".into();
    app.post("/v1/transfers", &platform, &us).await.expect(201);
    app.post(
        "/v1/transfers",
        &app.carrier("carrier-b"),
        &duration("carrier-b", "c9", "+14255550100", "+14255550101"),
    )
    .await
    .expect(201);

    let r = app
        .get("/v1/reports/processing", &app.officer())
        .await
        .expect(200);
    assert_eq!(r.body["controller"]["name"], "Example Platform Ltd");
    assert_eq!(
        r.body["data_protection_officer"]["contact"],
        "dpo@example.com"
    );
    let acts = r.body["activities"].as_array().unwrap();
    assert_eq!(acts.len(), 2);
    let a = &acts[0];
    assert_eq!(a["carrier_id"], "carrier-a");
    assert_eq!(a["category"], "call_detail_record");
    assert_eq!(a["transfers"], 3);
    assert_eq!(a["recipient"], "carrier carrier-a");
    assert_eq!(a["jurisdictions"], serde_json::json!(["FR", "US"]));
    assert_eq!(a["transfers_outside_eea"], true);
    assert_eq!(a["third_countries"], serde_json::json!(["US"]));
    assert!(a["erasure_time_limit"]
        .as_str()
        .unwrap()
        .starts_with("180 days"));
    assert!(a["security_measures"][0]
        .as_str()
        .unwrap()
        .contains("AES-256-GCM"));
    assert!(!a["personal_data_categories"].as_array().unwrap().is_empty());
    assert_eq!(acts[1]["recipient"], "the platform");

    // Period filter.
    let r = app
        .get(
            "/v1/reports/processing?from=2026-11-01T10:04:00Z&to=2026-11-02T00:00:00Z",
            &app.officer(),
        )
        .await
        .expect(200);
    assert_eq!(r.body["activities"].as_array().unwrap().len(), 1);

    // CSV for spreadsheets.
    let r = app
        .get("/v1/reports/processing?format=csv", &app.officer())
        .await
        .expect(200);
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/csv"));
    let lines: Vec<_> = r.text.lines().collect();
    assert!(lines[0].starts_with("carrier_id,category,purpose,legal_basis,direction,transfers"));
    assert_eq!(lines.len(), 3);
    assert!(lines[1].contains("FR; US"));

    // A carrier sees only its own activities.
    let r = app
        .get("/v1/reports/processing", &app.carrier("carrier-b"))
        .await
        .expect(200);
    let acts = r.body["activities"].as_array().unwrap();
    assert_eq!(acts.len(), 1);
    assert_eq!(acts[0]["carrier_id"], "carrier-b");
    app.get("/v1/reports/processing?format=pdf", &app.officer())
        .await
        .expect(422);
}
both!(the_record_of_processing_is_filled_in_from_the_ledger);

/// A carrier id may start with `-` or `@`; in the CSV it must not run as a
/// formula when a privacy officer opens the file.
async fn the_csv_report_never_runs_a_cell_as_a_formula(app: TestApp) {
    app.post(
        "/v1/transfers",
        &app.platform(),
        &cdr("@cmd", "c-1", "+14255550100", "+14255550101"),
    )
    .await
    .expect(201);
    let r = app
        .get("/v1/reports/processing?format=csv", &app.officer())
        .await
        .expect(200);
    let row = r.text.lines().nth(1).unwrap();
    assert!(row.starts_with("'@cmd,call_detail_record,"), "{row}");
    let json = app
        .get("/v1/reports/processing", &app.officer())
        .await
        .expect(200);
    assert_eq!(json.body["activities"][0]["carrier_id"], "@cmd");
}
both!(the_csv_report_never_runs_a_cell_as_a_formula);
