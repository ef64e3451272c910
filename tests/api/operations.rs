//! Health, OpenAPI, and the problem+json shape of every error.

use serde_json::Value;

use crate::both;
use crate::helpers::*;
use transfer_ledger::storage::Db;

async fn health_readiness_and_openapi(app: TestApp) {
    let r = app.get("/healthz", "").await.expect(200);
    assert_eq!(r.body["status"], "ok");
    let r = app.get("/readyz", "").await.expect(200);
    assert_eq!(
        r.body["database"],
        if app.backend == Backend::Sqlite {
            "sqlite"
        } else {
            "postgres"
        }
    );
    assert!(r.headers.contains_key("x-request-id"));

    let r = app.get("/openapi.json", "").await.expect(200);
    assert!(r.body["openapi"].as_str().unwrap().starts_with("3.1"));
    for path in [
        "/v1/transfers",
        "/v1/transfers/batch",
        "/v1/transfers/{id}",
        "/v1/consents",
        "/v1/reports/processing",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(r.body["paths"].get(path).is_some(), "{path} documented");
    }
    // Statuses the service sends are declared.
    for (path, method, status) in [
        ("/v1/transfers/batch", "post", "409"),
        ("/v1/subject-requests/{id}/export", "get", "404"),
        ("/v1/subject-requests/{id}/extend", "post", "404"),
        ("/v1/holds/{id}", "delete", "409"),
    ] {
        assert!(
            r.body["paths"][path][method]["responses"]
                .get(status)
                .is_some(),
            "{method} {path} declares {status}"
        );
    }
    assert!(r.body["components"]["securitySchemes"]["bearer"].is_object());
    // Every schema referenced is defined (nested ones too, such as a
    // request view's processing failures).
    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x.as_str()) {
                        ("$ref", Some(r)) => out.push(r),
                        _ => refs(x, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&r.body, &mut all);
    assert!(all.iter().any(|r| r.ends_with("/RequestView")));
    for reference in all {
        let name = reference
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("unexpected $ref {reference}"));
        assert!(
            r.body["components"]["schemas"].get(name).is_some(),
            "{reference} is not defined"
        );
    }
    // OpenAPI requires every operationId to be unique (client generators
    // name their methods after them).
    let mut ids: Vec<&str> = r.body["paths"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|ops| ops.as_object().unwrap().values())
        .filter_map(|op| op["operationId"].as_str())
        .collect();
    let operations = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), operations, "operationIds are unique: {ids:?}");
    // Errors are documented as they are sent: problem+json, and 401 wherever
    // a token is required.
    for (path, ops) in r.body["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            for (status, response) in op["responses"].as_object().unwrap() {
                if status.starts_with('4') || status.starts_with('5') {
                    let types: Vec<&String> =
                        response["content"].as_object().unwrap().keys().collect();
                    assert_eq!(
                        types,
                        ["application/problem+json"],
                        "{method} {path} {status}"
                    );
                }
            }
            if op.get("security").is_some() {
                assert!(
                    op["responses"].get("401").is_some(),
                    "{method} {path} documents 401"
                );
            }
        }
    }
    let list = &r.body["paths"]["/v1/transfers"]["get"]["responses"];
    assert!(list.get("422").is_some(), "bad filters are a 422");
    assert!(
        list.get("400").is_some(),
        "a missing access reason is a 400"
    );
}
both!(health_readiness_and_openapi);

async fn every_error_is_problem_json(app: TestApp) {
    let token = app.platform();
    let url = format!("{}/v1/transfers", app.addr);
    // A body sent as is, labelled JSON.
    let post_text = |text: String| {
        app.raw(
            app.client
                .post(&url)
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .body(text),
        )
    };

    let r = post_text("{not json".into()).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    assert!(r.body["detail"].as_str().unwrap().contains("line 1"));
    assert!(r.body["request_id"].is_string());
    assert_eq!(
        r.body["request_id"].as_str().unwrap(),
        r.headers["x-request-id"].to_str().unwrap()
    );

    let r = app
        .raw(app.client.post(&url).bearer_auth(&token).body("{}"))
        .await;
    assert_eq!(r.status, 400, "no JSON content type");

    // A key named twice in one object is ambiguous (which one counts?):
    // refused, at any depth, with nothing stored.
    let mut t = cdr("carrier-a", "c-1", "+14255550100", "+14255550101");
    let body = t.to_string();
    let twice_at_top = body.replacen("{", r#"{"carrier_id": "carrier-b", "#, 1);
    t["payload"]["call_id"] = "c-2".into();
    let twice_in_payload = t.to_string().replacen(
        r#""call_id":"c-2""#,
        r#""call_id":"c-1","call_id":"c-2""#,
        1,
    );
    assert_ne!(twice_in_payload, t.to_string());
    for twice in [twice_at_top, twice_in_payload] {
        let r = post_text(twice).await;
        assert_eq!(r.status, 400, "{}", r.text);
        assert!(
            r.body["detail"]
                .as_str()
                .unwrap()
                .starts_with("the body repeats a key"),
            "{}",
            r.text
        );
    }
    assert_eq!(app.count("transfers").await, 0);
    app.post(
        "/v1/transfers",
        &token,
        &cdr("carrier-a", "c-1", "+14255550100", "+14255550101"),
    )
    .await
    .expect(201);

    for (req, status) in [
        (app.client.get(format!("{}/no/such/route", app.addr)), 404),
        (app.client.delete(format!("{}/healthz", app.addr)), 405),
    ] {
        let r = app.raw(req).await;
        assert_eq!(r.status, status);
        assert_eq!(r.headers["content-type"], "application/problem+json");
        assert_eq!(r.body["status"], status);
    }

    let r = app
        .post("/v1/transfers", &token, &serde_json::json!([1, 2]))
        .await
        .expect(422);
    assert_eq!(r.bad_fields(), ["body"]);
}
both!(every_error_is_problem_json);

#[tokio::test]
async fn oversized_bodies_are_refused() {
    let extra = [("LEDGER_BODY_LIMIT_BYTES".to_string(), "1024".to_string())]
        .into_iter()
        .collect();
    let app = spawn_app_with(Backend::Sqlite, extra).await.unwrap();
    let big = serde_json::json!({"transfers": vec![cdr("carrier-a", "c", "+14255550100", "+14255550101"); 10]});
    let r = app
        .post("/v1/transfers/batch", &app.platform(), &big)
        .await
        .expect(413);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    assert_eq!(app.count("transfers").await, 0);
}

/// Connections that hold the service without asking anything — silent
/// ones, half-sent headers, an HTTP/2 preface and then nothing (slowloris;
/// no token needed) — are closed, so a crowd of them cannot hold every
/// descriptor; a client that asks meanwhile is served.
#[tokio::test]
async fn idle_and_half_sent_connections_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app(Backend::Sqlite).await.unwrap();
    let addr = app.addr.trim_start_matches("http://").to_string();
    let mut held = Vec::new();
    for opening in [
        &b""[..],
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
        b"PRI * HTTP/2.0\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ] {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(opening).await.unwrap();
        held.push(s);
    }
    app.get("/healthz", "").await.expect(200);
    // Idle timeout, plus the grace a connection asked to close has, plus a
    // margin for the once-a-second check.
    let limit = transfer_ledger::http::server::IDLE_TIMEOUT * 2 + std::time::Duration::from_secs(5);
    for (i, mut s) in held.into_iter().enumerate() {
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(limit, s.read_to_end(&mut buf)).await;
        assert!(closed.is_ok(), "connection {i} is still held");
    }
}

async fn metrics_use_route_templates_and_no_personal_data(app: TestApp) {
    let r = app
        .post(
            "/v1/transfers",
            &app.platform(),
            &cdr("carrier-a", "c1", "+14255550100", "+14255550101"),
        )
        .await
        .expect(201);
    let id = r.body["id"].as_str().unwrap();
    app.read(&format!("/v1/transfers/{id}"), &app.officer())
        .await
        .expect(200);
    app.get("/v1/transfers?subject=%2B14255550100", &app.officer())
        .await
        .expect(200);
    // Invented methods share one label instead of adding series.
    let method = reqwest::Method::from_bytes(b"XFUZZA").unwrap();
    app.raw(app.client.request(method, format!("{}/healthz", app.addr)))
        .await
        .expect(405);
    let r = app.get("/metrics", "").await.expect(200);
    assert!(!r.text.contains("XFUZZA"), "{}", r.text);
    assert!(
        r.text.contains(
            r#"ledger_http_requests_total{method="other",route="/healthz",status="405"} 1"#
        ),
        "{}",
        r.text
    );
    assert!(
        r.text.contains(
            r#"ledger_http_requests_total{method="GET",route="/v1/transfers/{id}",status="200"} 1"#
        ),
        "{}",
        r.text
    );
    assert!(r
        .text
        .contains(r#"ledger_transfers_recorded_total{category="call_detail_record"} 1"#));
    // The integrity alert's series exists before the first failure.
    assert!(r
        .text
        .contains(r#"ledger_integrity_failures_total{what="transfer"} 0"#));
    assert!(!r.text.contains(id));
    assert!(!r.text.contains("4255550100"));
}
both!(metrics_use_route_templates_and_no_personal_data);

/// A plain `X-Request-Id` is kept; one too long or not plain ASCII is
/// replaced by the service's own.
async fn request_ids_are_kept_only_when_plain(app: TestApp) {
    let with_id = |id: &str| {
        app.client
            .get(format!("{}/v1/subject-requests/nope", app.addr))
            .bearer_auth(app.officer())
            .header("X-Request-Id", id)
    };
    let r = app.raw(with_id("ticket-42.retry:1")).await.expect(404);
    assert_eq!(r.headers["x-request-id"], "ticket-42.retry:1");
    assert_eq!(r.body["request_id"], "ticket-42.retry:1");
    for bad in ["x".repeat(129), "with space".into(), "".into()] {
        let r = app.raw(with_id(&bad)).await.expect(404);
        let id = r.headers["x-request-id"].to_str().unwrap().to_string();
        assert!(uuid::Uuid::parse_str(&id).is_ok(), "{bad:?} replaced: {id}");
        assert_eq!(r.body["request_id"], id.as_str());
    }
}
both!(request_ids_are_kept_only_when_plain);

/// A connection to the SQLite database file itself that ignores the
/// write-ahead log (immutable).
async fn the_file_alone(app: &TestApp) -> sqlx::SqliteConnection {
    use sqlx::sqlite::SqliteConnectOptions;
    use sqlx::ConnectOptions;
    SqliteConnectOptions::new()
        .filename(app.dir().join("ledger.db"))
        .read_only(true)
        .immutable(true)
        .connect()
        .await
        .unwrap()
}

/// Transfers in the database file itself; `None` while it lacks the table.
async fn transfers_in_the_file(app: &TestApp) -> Option<i64> {
    sqlx::query_scalar("SELECT COUNT(*) FROM transfers")
        .fetch_one(&mut the_file_alone(app).await)
        .await
        .ok()
}

async fn tables_in_the_file(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'")
        .fetch_one(&mut the_file_alone(app).await)
        .await
        .unwrap()
}

/// `serve` copies SQLite's write-ahead log into the database file in the
/// background (`Db::run_checkpointer`): a write reaches the file itself
/// without waiting for the writer's own checkpoint, which comes only after
/// 10,000 pages; `LEDGER_CHECKPOINT_INTERVAL=0` turns that off. SQLite
/// only: PostgreSQL checkpoints by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_log_is_copied_into_the_database_in_the_background() {
    let t = cdr("carrier-a", "c-1", "+14255550100", "+14255550101");
    let app = spawn_app(Backend::Sqlite).await.unwrap();
    app.post("/v1/transfers", &app.platform(), &t)
        .await
        .expect(201);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let in_file = transfers_in_the_file(&app).await;
        if in_file == Some(1) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the record is still only in the write-ahead log ({in_file:?} in the file)"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    let off = [("LEDGER_CHECKPOINT_INTERVAL".to_string(), "0".to_string())];
    let app = spawn_app_with(Backend::Sqlite, off.into_iter().collect())
        .await
        .unwrap();
    app.post("/v1/transfers", &app.platform(), &t)
        .await
        .expect(201);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    // Even the schema is still only in the log: the file has no table yet.
    assert_eq!(tables_in_the_file(&app).await, 0);
}

/// The service's PostgreSQL connections honour the URL's `sslmode`: with
/// `require` they are encrypted, with `verify-full` a server certificate
/// the machine does not trust is refused, naming the cause. (PostgreSQL
/// only; a server without TLS must then refuse `require`.)
async fn postgres_connections_use_tls_when_the_url_asks(app: TestApp) {
    if app.backend != Backend::Postgres {
        return;
    }
    let base = postgres_url();
    let with = |mode: &str| {
        let sep = if base.contains('?') { '&' } else { '?' };
        format!("{base}{sep}sslmode={mode}")
    };
    let server_tls: String = sqlx::query_scalar("SHOW ssl")
        .fetch_one(match app.db() {
            Db::Postgres(p) => p,
            Db::Sqlite { .. } => unreachable!(),
        })
        .await
        .unwrap();
    let required = Db::connect(&with("require"), 1).await;
    if server_tls != "on" {
        assert!(required.is_err(), "require must fail without TLS");
        return;
    }
    let Db::Postgres(pool) = required.unwrap() else {
        unreachable!()
    };
    let (ssl, version): (bool, String) =
        sqlx::query_as("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(ssl && version.starts_with("TLS"), "{ssl} {version}");
    pool.close().await;

    // A self-signed or private-CA certificate is not in the system's roots:
    // verify-full refuses it (pass `sslrootcert=` to trust a private CA).
    match Db::connect(&with("verify-full"), 1).await {
        Err(e) => assert!(
            format!("{e:#}").to_lowercase().contains("certificate"),
            "{e:#}"
        ),
        // A machine whose roots do trust the server's certificate.
        Ok(Db::Postgres(pool)) => pool.close().await,
        Ok(_) => unreachable!(),
    }
}
both!(postgres_connections_use_tls_when_the_url_asks);
