//! Authentication and authorization: every endpoint × every role, and
//! carriers kept apart.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use transfer_ledger::auth::Role;

use crate::both;
use crate::helpers::*;

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn sign(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn claims() -> Value {
    json!({"sub": "po", "role": "privacy_officer", "iss": "transfer-ledger", "aud": "transfer-ledger",
           "exp": now() + 600, "nbf": now() - 10, "iat": now() - 10})
}

async fn bad_tokens_are_rejected(app: TestApp) {
    let b64 = |v: &Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let with = |k: &str, v: Value| {
        let mut c = claims();
        c[k] = v;
        sign(&c, JWT_SECRET)
    };
    let without = |k: &str| {
        let mut c = claims();
        c.as_object_mut().unwrap().remove(k);
        sign(&c, JWT_SECRET)
    };
    let alg_none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims())
    );
    let hs512 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS512),
        &claims(),
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap();
    let cases = [
        ("expired", with("exp", json!(now() - 3600))),
        ("not yet valid", with("nbf", json!(now() + 3600))),
        ("issued in the future", with("iat", json!(now() + 3600))),
        ("wrong issuer", with("iss", json!("someone-else"))),
        ("wrong audience", with("aud", json!("other-service"))),
        (
            "wrong audiences",
            with("aud", json!(["other-service", "third-service"])),
        ),
        (
            "wrongly signed",
            sign(&claims(), "another-secret-another-secret-another-secret"),
        ),
        ("alg none", alg_none),
        ("other algorithm", hs512),
        ("no exp", without("exp")),
        ("no iat", without("iat")),
        ("unknown role", with("role", json!("superuser"))),
        (
            "carrier without carrier claim",
            with("role", json!("carrier")),
        ),
        ("garbage", "not.a.token".to_string()),
        // A carrier claim would narrow another role; ignoring it would widen it.
        (
            "carrier claim on another role",
            with("carrier", json!("carrier-a")),
        ),
        // RFC 7515 §4.1.11: critical extensions this verifier does not know.
        ("critical extension", {
            let mut h = Header::new(Algorithm::HS256);
            h.crit = Some(vec!["exp".into()]);
            jsonwebtoken::encode(
                &h,
                &claims(),
                &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
            )
            .unwrap()
        }),
    ];
    assert_eq!(
        app.get("/v1/transfers", &sign(&claims(), JWT_SECRET))
            .await
            .status,
        200,
        "the valid token works"
    );
    // `aud` may list several audiences (RFC 7519 §4.1.3); ours must be one.
    let many = with("aud", json!(["other-service", "transfer-ledger"]));
    assert_eq!(
        app.get("/v1/transfers", &many).await.status,
        200,
        "an audience list naming this service works"
    );
    for (claim, token) in [("iat", without("iat")), ("exp", without("exp"))] {
        let r = app.get("/v1/transfers", &token).await;
        assert_eq!(r.status, 401);
        assert!(
            r.body["detail"]
                .as_str()
                .unwrap()
                .contains(&format!("lacks the {claim} claim")),
            "{}",
            r.text
        );
    }
    for (what, token) in cases {
        let r = app.get("/v1/transfers", &token).await;
        assert_eq!(r.status, 401, "{what}: {}", r.text);
        assert_eq!(r.headers["content-type"], "application/problem+json");
        assert_eq!(r.headers["www-authenticate"], "Bearer");
    }
    let r = app
        .raw(app.client.get(format!("{}/v1/transfers", app.addr)))
        .await;
    assert_eq!(r.status, 401, "missing token");
    let r = app
        .raw(
            app.client
                .get(format!("{}/v1/transfers", app.addr))
                .header("Authorization", "Basic abc"),
        )
        .await;
    assert_eq!(r.status, 401, "not bearer");
    // The scheme is case-insensitive (RFC 9110 §11.1).
    for scheme in ["BEARER ", "bearer ", "Bearer\t"] {
        let r = app
            .raw(app.client.get(format!("{}/v1/transfers", app.addr)).header(
                "Authorization",
                format!("{scheme}{}", sign(&claims(), JWT_SECRET)),
            ))
            .await;
        assert_eq!(r.status, 200, "{scheme:?}: {}", r.text);
    }
}
both!(bad_tokens_are_rejected);

/// Every endpoint × every role: the status each role gets.
async fn every_endpoint_for_every_role(app: TestApp) {
    app.consent("oc-a", "carrier-a", "tenant-1", &["FR"]).await;
    let rec = app
        .post(
            "/v1/transfers",
            &app.platform(),
            &cdr("carrier-a", "c1", "+14255550100", "+14255550101"),
        )
        .await
        .expect(201);
    let id = rec.body["id"].as_str().unwrap().to_string();
    let req = app
        .post(
            "/v1/subject-requests",
            &app.officer(),
            &json!({"kind": "access", "carrier_id": "carrier-a",
            "subject": {"phone_number": "+14255550100"}}),
        )
        .await
        .expect(202);
    let request_id = req.body["id"].as_str().unwrap().to_string();

    let roles = [
        (Role::PrivacyOfficer, None),
        (Role::Carrier, Some("carrier-a")),
        (Role::Platform, None),
        (Role::RetentionSweeper, None),
        (Role::Auditor, None),
        (Role::Admin, None),
    ];
    // (method, path, body, expected status per role in the order above)
    let flow2 = cdr("carrier-a", "c2", "+14255550100", "+14255550101");
    let flow3 = duration("carrier-a", "c2", "+14255550100", "+14255550101");
    let consent = |r: &str| {
        json!({"reference": r, "kind": "customer_operator", "carrier_id": "carrier-a",
        "customer_tenant_id": "t", "countries": ["FR"], "granted_at": "2026-01-01T00:00:00Z"})
    };
    let cases: Vec<(&str, String, Option<Value>, [u16; 6])> = vec![
        (
            "POST",
            "/v1/transfers".into(),
            Some(flow2.clone()),
            [403, 403, 201, 403, 403, 403],
        ),
        (
            "POST",
            "/v1/transfers".into(),
            Some(flow3.clone()),
            [403, 201, 403, 403, 403, 403],
        ),
        (
            "POST",
            "/v1/transfers/batch".into(),
            Some(json!({"transfers": [flow2]})),
            [403, 403, 201, 403, 403, 403],
        ),
        (
            "GET",
            "/v1/transfers".into(),
            None,
            [200, 200, 403, 403, 403, 403],
        ),
        (
            "GET",
            format!("/v1/transfers/{id}"),
            None,
            [200, 200, 403, 403, 403, 403],
        ),
        // A customer's authorization of a carrier is not the carrier's to
        // write; its subscribers' own consents are.
        (
            "POST",
            "/v1/consents".into(),
            Some(consent("__REF__")),
            [201, 403, 201, 403, 403, 403],
        ),
        (
            "POST",
            "/v1/consents".into(),
            Some(
                json!({"reference": "__REF__", "kind": "data_subject", "carrier_id": "carrier-a",
                "subject": {"phone_number": "+14255550100"}, "countries": ["FR"],
                "granted_at": "2026-01-01T00:00:00Z"}),
            ),
            [201, 201, 201, 403, 403, 403],
        ),
        (
            "GET",
            "/v1/consents/oc-a".into(),
            None,
            [200, 200, 200, 403, 403, 403],
        ),
        (
            "POST",
            "/v1/consents/oc-a/status".into(),
            Some(json!({"status": "active"})),
            [200, 403, 200, 403, 403, 403],
        ),
        (
            "GET",
            "/v1/reports/processing".into(),
            None,
            [200, 200, 403, 403, 200, 403],
        ),
        (
            "GET",
            "/v1/retention/policy".into(),
            None,
            [200, 403, 403, 403, 200, 200],
        ),
        (
            "GET",
            "/v1/retention/sweeps".into(),
            None,
            [200, 403, 403, 200, 200, 403],
        ),
        (
            "POST",
            "/v1/retention/sweeps".into(),
            Some(json!({"dry_run": true})),
            [201, 403, 403, 201, 403, 403],
        ),
        (
            "GET",
            "/v1/holds".into(),
            None,
            [200, 403, 403, 403, 200, 403],
        ),
        (
            "POST",
            "/v1/holds".into(),
            Some(json!({"carrier_id": "carrier-a", "reason": "r"})),
            [201, 403, 403, 403, 403, 403],
        ),
        (
            "DELETE",
            format!("/v1/holds/{}", uuid::Uuid::now_v7()),
            None,
            [404, 403, 403, 403, 403, 403],
        ),
        (
            "POST",
            "/v1/subject-requests".into(),
            Some(json!({"kind": "access", "carrier_id": "carrier-a",
            "subject": {"phone_number": "+14255550100"}})),
            [202, 202, 403, 403, 403, 403],
        ),
        (
            "GET",
            "/v1/subject-requests".into(),
            None,
            [200, 200, 403, 403, 403, 403],
        ),
        (
            "GET",
            format!("/v1/subject-requests/{request_id}"),
            None,
            [200, 200, 403, 403, 403, 403],
        ),
        (
            "GET",
            "/v1/reconciliation?carrier_id=carrier-a".into(),
            None,
            [200, 200, 403, 403, 403, 403],
        ),
        (
            "GET",
            "/v1/audit".into(),
            None,
            [200, 403, 403, 403, 200, 403],
        ),
        (
            "GET",
            "/v1/audit/verify".into(),
            None,
            [200, 403, 403, 403, 200, 403],
        ),
        (
            "GET",
            "/v1/audit/head".into(),
            None,
            [200, 403, 403, 403, 200, 403],
        ),
        (
            "GET",
            "/v1/keys/export-signing".into(),
            None,
            [200, 200, 200, 200, 200, 200],
        ),
        (
            "GET",
            "/v1/keys/status".into(),
            None,
            [403, 403, 403, 403, 200, 200],
        ),
        (
            "POST",
            "/v1/keys/rotate".into(),
            Some(json!({})),
            [403, 403, 403, 403, 403, 202],
        ),
        (
            "POST",
            "/v1/keys/export-signing/rotate".into(),
            Some(json!({})),
            [403, 403, 403, 403, 403, 201],
        ),
        (
            "POST",
            "/v1/policies/reload".into(),
            Some(json!({})),
            [403, 403, 403, 403, 403, 200],
        ),
    ];
    for (n, (method, path, body, expected)) in cases.into_iter().enumerate() {
        for ((role, carrier), want) in roles.iter().zip(expected) {
            let token = app.token(*role, *carrier);
            let mut req = match method {
                "GET" => app.client.get(format!("{}{path}", app.addr)),
                "DELETE" => app.client.delete(format!("{}{path}", app.addr)),
                _ => app.client.post(format!("{}{path}", app.addr)),
            }
            .bearer_auth(&token)
            .header("X-Access-Reason", "matrix test");
            if let Some(b) = &body {
                let b = b.to_string().replace("__REF__", &format!("ref-{n}-{role}"));
                req = req.header("content-type", "application/json").body(b);
            }
            let r = app.raw(req).await;
            assert_eq!(
                r.status.as_u16(),
                want,
                "{method} {path} as {role}: {}",
                r.text
            );
        }
    }
}
both!(every_endpoint_for_every_role);

async fn carriers_never_see_each_other(app: TestApp) {
    let platform = app.platform();
    let b_rec = app
        .post(
            "/v1/transfers",
            &platform,
            &cdr("carrier-b", "cb", "+14255550100", "+14255550101"),
        )
        .await
        .expect(201);
    let b_id = b_rec.body["id"].as_str().unwrap();
    app.post(
        "/v1/transfers",
        &platform,
        &cdr("carrier-a", "ca", "+14255550102", "+14255550103"),
    )
    .await
    .expect(201);
    let a = app.carrier("carrier-a");

    // B's record answers 404 to A, exactly like a missing record.
    let foreign = app
        .get(&format!("/v1/transfers/{b_id}"), &a)
        .await
        .expect(404);
    let missing = app
        .get(&format!("/v1/transfers/{}", uuid::Uuid::now_v7()), &a)
        .await
        .expect(404);
    assert_eq!(foreign.body["type"], missing.body["type"]);
    assert_eq!(foreign.body["title"], missing.body["title"]);

    // B's records never appear in A's lists, lookups or reports, whatever the filters.
    for path in [
        "/v1/transfers",
        "/v1/transfers?carrier_id=carrier-b",
        "/v1/transfers?subject=%2B14255550100",
        "/v1/transfers?include=payload&carrier_id=carrier-b",
    ] {
        let r = app.get(path, &a).await.expect(200);
        assert!(
            r.body["items"]
                .as_array()
                .unwrap()
                .iter()
                .all(|i| i["carrier_id"] == "carrier-a"),
            "{path}"
        );
        assert!(!r.text.contains(b_id));
    }
    let r = app.get("/v1/reports/processing", &a).await.expect(200);
    assert!(!r.text.contains("carrier-b"));

    // A cannot write for B, nor write the platform's flows.
    app.post(
        "/v1/transfers",
        &a,
        &duration("carrier-b", "x", "+14255550100", "+14255550101"),
    )
    .await
    .expect(403);
    app.post(
        "/v1/transfers",
        &a,
        &cdr("carrier-a", "x", "+14255550100", "+14255550101"),
    )
    .await
    .expect(403);
    let r = app
        .post(
            "/v1/transfers/batch",
            &a,
            &json!({"transfers": [duration("carrier-a", "x", "+14255550100", "+14255550101"),
                                  duration("carrier-b", "y", "+14255550100", "+14255550101")]}),
        )
        .await
        .expect(403);
    assert!(r.body["detail"].as_str().unwrap().contains("transfers[1]"));
    assert_eq!(app.count("transfers").await, 2);
}
both!(carriers_never_see_each_other);

/// Production keys: a JWKS document with RS256, ES256 and EdDSA keys chosen
/// by `kid`; the algorithm is the key's, never the token's.
#[tokio::test]
async fn asymmetric_keys_are_chosen_by_kid() {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwt");
    let extra = [(
        "LEDGER_JWT_KEYS_FILE".to_string(),
        format!("{fixtures}/jwks.json"),
    )]
    .into_iter()
    .collect();
    let app = spawn_app_with(Backend::Sqlite, extra).await.unwrap();
    let pem = |name: &str| std::fs::read(format!("{fixtures}/{name}")).unwrap();
    let rsa = EncodingKey::from_rsa_pem(&pem("rsa.pem")).unwrap();
    let ec = EncodingKey::from_ec_pem(&pem("ec.pem")).unwrap();
    let ed = EncodingKey::from_ed_pem(&pem("ed25519.pem")).unwrap();
    let token = |alg: Algorithm, kid: Option<&str>, key: &EncodingKey| {
        let mut h = Header::new(alg);
        h.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&h, &claims(), key).unwrap()
    };

    for (alg, kid, key) in [
        (Algorithm::RS256, "rsa-1", &rsa),
        (Algorithm::ES256, "ec-1", &ec),
        (Algorithm::EdDSA, "ed-1", &ed),
    ] {
        let r = app.get("/v1/transfers", &token(alg, Some(kid), key)).await;
        assert_eq!(r.status, 200, "{kid}: {}", r.text);
    }
    let refused = [
        ("unknown kid", token(Algorithm::EdDSA, Some("ed-2"), &ed)),
        ("no kid", token(Algorithm::EdDSA, None, &ed)),
        (
            "key of another kid",
            token(Algorithm::EdDSA, Some("rsa-1"), &ed),
        ),
        (
            "RSA key named as the EC kid",
            token(Algorithm::RS256, Some("ec-1"), &rsa),
        ),
        // The HS256 secret is not accepted once asymmetric keys are configured.
        ("shared secret", sign(&claims(), JWT_SECRET)),
    ];
    for (what, t) in refused {
        let r = app.get("/v1/transfers", &t).await;
        assert_eq!(r.status, 401, "{what}: {}", r.text);
    }
}

#[tokio::test]
async fn an_unusable_jwks_stops_the_service_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    // A symmetric key in the JWKS would let anyone holding it mint tokens
    // under an asymmetric-looking configuration: refused.
    std::fs::write(
        &path,
        r#"{"keys": [{"kty": "oct", "kid": "x", "k": "c2VjcmV0"}]}"#,
    )
    .unwrap();
    let vars: std::collections::HashMap<&str, String> = [
        ("LEDGER_DATA_DIR", dir.path().display().to_string()),
        ("LEDGER_LISTEN", "127.0.0.1:0".to_string()),
        ("LEDGER_JWT_KEYS_FILE", path.display().to_string()),
    ]
    .into_iter()
    .collect();
    let config = transfer_ledger::Config::from_lookup(|k| vars.get(k).cloned()).unwrap();
    let err = transfer_ledger::Application::build(config)
        .await
        .err()
        .expect("start refused");
    assert!(
        format!("{err:#}").contains("LEDGER_JWT_KEYS_FILE"),
        "{err:#}"
    );
}
