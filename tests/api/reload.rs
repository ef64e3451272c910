//! Reloading policies (`POST /v1/policies/reload`, `SIGHUP`) and the JWKS
//! document (on change, `SIGHUP`) without a restart.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use transfer_ledger::auth::Role;

use crate::helpers::*;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwt");
const POLICIES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/policies");

/// A copy of the repository's policies that a test may edit.
fn policy_copy(dir: &std::path::Path) -> std::path::PathBuf {
    let to = dir.join("policies");
    std::fs::create_dir_all(&to).unwrap();
    for f in ["model.conf", "policy.csv", "retention.toml"] {
        std::fs::copy(format!("{POLICIES}/{f}"), to.join(f)).unwrap();
    }
    to
}

/// The service with its policies in `dir`.
async fn on_policies(backend: Backend, dir: &std::path::Path) -> Option<TestApp> {
    let extra: HashMap<String, String> =
        [("LEDGER_POLICY_DIR".to_string(), dir.display().to_string())]
            .into_iter()
            .collect();
    spawn_app_with(backend, extra).await
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A reload applies a valid policy at once; a policy that does not parse or
/// validate is refused with 422 naming the problem, and the one in force
/// stays. Both are audited.
async fn policies_reload_or_stay(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = policy_copy(tmp.path());
    let Some(app) = on_policies(backend, &dir).await else {
        return;
    };
    let admin = app.token(Role::Admin, None);
    let auditor = app.token(Role::Auditor, None);
    app.get("/v1/transfers", &auditor).await.expect(403);

    // Only admins reload.
    app.post("/v1/policies/reload", &app.officer(), &json!({}))
        .await
        .expect(403);

    // Auditors may now list transfers (metadata only).
    let mut rules = std::fs::read_to_string(dir.join("policy.csv")).unwrap();
    rules.push_str("p, auditor, *, transfers, read\n");
    std::fs::write(dir.join("policy.csv"), &rules).unwrap();
    let r = app
        .post("/v1/policies/reload", &admin, &json!({}))
        .await
        .expect(200);
    let files: Vec<&str> = r.body["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["file"].as_str().unwrap())
        .collect();
    assert_eq!(files, ["model.conf", "policy.csv", "retention.toml"]);
    assert_eq!(r.body["source"], dir.display().to_string());
    app.get("/v1/transfers", &auditor).await.expect(200);

    // Broken files, one at a time: each refused by name; the policy in force
    // (auditors may list) stays.
    let good_retention = std::fs::read_to_string(dir.join("retention.toml")).unwrap();
    let good_model = std::fs::read_to_string(dir.join("model.conf")).unwrap();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "policy.csv",
            format!("{rules}p, auditor, everywhere, transfers, read\n"),
            "policy.csv line",
        ),
        (
            "policy.csv",
            format!("{rules}p, superuser, *, transfers, read\n"),
            "unknown role",
        ),
        // A rule of an older policy, which would now grant nothing.
        (
            "policy.csv",
            format!("{rules}p, carrier, own, consents, write\n"),
            "consents are written per kind",
        ),
        (
            "retention.toml",
            good_retention.replace(
                "call_quality = 90",
                "call_quality = 90\nno_such_category = 30",
            ),
            "retention.toml",
        ),
        (
            "model.conf",
            "[request_definition]\nr = ".into(),
            "model.conf",
        ),
    ];
    for (file, text, named) in cases {
        std::fs::write(dir.join(file), &text).unwrap();
        let r = app
            .post("/v1/policies/reload", &admin, &json!({}))
            .await
            .expect(422);
        let message = r.body["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains(named), "{file}: {message}");
        assert!(message.contains("previous policy stays in force"));
        app.get("/v1/transfers", &auditor).await.expect(200);
        app.get("/v1/retention/policy", &auditor).await.expect(200);
        // Put the good file back.
        let good = match file {
            "policy.csv" => rules.clone(),
            "retention.toml" => good_retention.clone(),
            _ => good_model.clone(),
        };
        std::fs::write(dir.join(file), good).unwrap();
    }

    let reloads = app
        .get("/v1/audit?action=policies.reload", &auditor)
        .await
        .expect(200);
    assert_eq!(reloads.body["items"].as_array().unwrap().len(), 1);
    let refused = app
        .get("/v1/audit?action=policies.reload_refused", &auditor)
        .await
        .expect(200);
    assert_eq!(refused.body["items"].as_array().unwrap().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_reload_or_stay_sqlite() {
    policies_reload_or_stay(Backend::Sqlite).await
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_reload_or_stay_postgres() {
    policies_reload_or_stay(Backend::Postgres).await
}

/// Reconciliation names calls by their ids, decrypted from the records: a
/// policy that lets a role reconcile but not decrypt gives it no call ids.
async fn reconciling_takes_the_right_to_decrypt(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = policy_copy(tmp.path());
    let mut rules = std::fs::read_to_string(dir.join("policy.csv")).unwrap();
    rules.push_str("p, auditor, *, reconciliation, read\n");
    std::fs::write(dir.join("policy.csv"), &rules).unwrap();
    let Some(app) = on_policies(backend, &dir).await else {
        return;
    };
    let auditor = app.token(Role::Auditor, None);
    let path = "/v1/reconciliation?carrier_id=carrier-a";
    app.get(path, &auditor).await.expect(403);

    rules.push_str("p, auditor, *, transfers, decrypt\n");
    std::fs::write(dir.join("policy.csv"), &rules).unwrap();
    app.post(
        "/v1/policies/reload",
        &app.token(Role::Admin, None),
        &json!({}),
    )
    .await
    .expect(200);
    app.get(path, &auditor).await.expect(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciling_takes_the_right_to_decrypt_sqlite() {
    reconciling_takes_the_right_to_decrypt(Backend::Sqlite).await
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciling_takes_the_right_to_decrypt_postgres() {
    reconciling_takes_the_right_to_decrypt(Backend::Postgres).await
}

fn claims() -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({"sub": "officer-1", "role": "privacy_officer", "iss": "transfer-ledger",
           "aud": "transfer-ledger", "exp": now + 600, "nbf": now - 5, "iat": now})
}

fn jwks_with(kids: &[&str]) -> String {
    let all: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{FIXTURES}/jwks.json")).unwrap())
            .unwrap();
    let keys: Vec<Value> = all["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| kids.contains(&k["kid"].as_str().unwrap()))
        .cloned()
        .collect();
    json!({ "keys": keys }).to_string()
}

/// Keys are rolled with an overlap by editing the JWKS file: the service
/// re-reads it on change; a file that does not load leaves the keys in force.
async fn jwks_is_reread_when_it_changes(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("jwks.json");
    std::fs::write(&path, jwks_with(&["rsa-1"])).unwrap();
    let extra: HashMap<String, String> = [
        ("LEDGER_JWT_KEYS_FILE", path.display().to_string()),
        ("LEDGER_RELOAD_INTERVAL", "200ms".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let Some(app) = spawn_app_with(backend, extra).await else {
        return;
    };
    let pem = |name: &str| std::fs::read(format!("{FIXTURES}/{name}")).unwrap();
    let rsa = EncodingKey::from_rsa_pem(&pem("rsa.pem")).unwrap();
    let ed = EncodingKey::from_ed_pem(&pem("ed25519.pem")).unwrap();
    let token = |alg: Algorithm, kid: &str, key: &EncodingKey| {
        let mut h = Header::new(alg);
        h.kid = Some(kid.to_string());
        jsonwebtoken::encode(&h, &claims(), key).unwrap()
    };
    let (t_rsa, t_ed) = (
        token(Algorithm::RS256, "rsa-1", &rsa),
        token(Algorithm::EdDSA, "ed-1", &ed),
    );
    let status = |t: String| {
        let app = &app;
        async move { app.get("/v1/transfers", &t).await.status.as_u16() }
    };
    assert_eq!(status(t_rsa.clone()).await, 200);
    assert_eq!(status(t_ed.clone()).await, 401);

    // Overlap: both keys.
    std::fs::write(&path, jwks_with(&["rsa-1", "ed-1"])).unwrap();
    eventually("ed-1 accepted", async || status(t_ed.clone()).await == 200).await;
    assert_eq!(status(t_rsa.clone()).await, 200);

    // A broken file is not taken: both keys still work.
    std::fs::write(&path, "{\"keys\": [").unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(status(t_rsa.clone()).await, 200);
    assert_eq!(status(t_ed.clone()).await, 200);

    // The old key retired.
    std::fs::write(&path, jwks_with(&["ed-1"])).unwrap();
    eventually("rsa-1 refused", async || status(t_rsa.clone()).await == 401).await;
    assert_eq!(status(t_ed.clone()).await, 200);

    // HS256 tokens are not accepted under a JWKS: read the trail directly.
    let reloads = app
        .scalar("SELECT COUNT(*) FROM audit_log WHERE action = 'keys.jwks_reload'")
        .await;
    assert_eq!(reloads, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_is_reread_when_it_changes_sqlite() {
    jwks_is_reread_when_it_changes(Backend::Sqlite).await
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_is_reread_when_it_changes_postgres() {
    jwks_is_reread_when_it_changes(Backend::Postgres).await
}

/// `SIGHUP` to the running binary reloads the policies and the JWKS file.
async fn sighup_reloads_policies_and_keys(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = policy_copy(tmp.path());
    let jwks = tmp.path().join("jwks.json");
    std::fs::write(&jwks, jwks_with(&["rsa-1"])).unwrap();
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let listen = format!("127.0.0.1:{}", free_port());
    let mut server = app.cli_spawn(
        &["serve"],
        &[
            ("LEDGER_LISTEN", &listen),
            ("LEDGER_POLICY_DIR", dir.to_str().unwrap()),
            ("LEDGER_JWT_KEYS_FILE", jwks.to_str().unwrap()),
            // No polling: only the signal can reload.
            ("LEDGER_RELOAD_INTERVAL", "1h"),
        ],
    );
    let url = format!("http://{listen}");
    let pem = |name: &str| std::fs::read(format!("{FIXTURES}/{name}")).unwrap();
    let ed = EncodingKey::from_ed_pem(&pem("ed25519.pem")).unwrap();
    let rsa = EncodingKey::from_rsa_pem(&pem("rsa.pem")).unwrap();
    let token = |alg: Algorithm, kid: &str, key: &EncodingKey, role: &str| {
        let mut h = Header::new(alg);
        h.kid = Some(kid.to_string());
        let mut c = claims();
        c["role"] = json!(role);
        jsonwebtoken::encode(&h, &c, key).unwrap()
    };
    let client = reqwest::Client::new();
    let status = |t: String| {
        let (client, url) = (&client, &url);
        async move {
            match client
                .get(format!("{url}/v1/transfers"))
                .bearer_auth(t)
                .send()
                .await
            {
                Ok(r) => r.status().as_u16(),
                Err(_) => 0,
            }
        }
    };
    let officer_rsa = token(Algorithm::RS256, "rsa-1", &rsa, "privacy_officer");
    eventually("server up", async || {
        status(officer_rsa.clone()).await == 200
    })
    .await;
    let auditor_ed = token(Algorithm::EdDSA, "ed-1", &ed, "auditor");
    assert_eq!(status(auditor_ed.clone()).await, 401);

    std::fs::write(&jwks, jwks_with(&["rsa-1", "ed-1"])).unwrap();
    let mut rules = std::fs::read_to_string(dir.join("policy.csv")).unwrap();
    rules.push_str("p, auditor, *, transfers, read\n");
    std::fs::write(dir.join("policy.csv"), &rules).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        status(auditor_ed.clone()).await,
        401,
        "no reload without the signal"
    );

    let pid = server.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    eventually("reloaded on SIGHUP", async || {
        status(auditor_ed.clone()).await == 200
    })
    .await;
    server.kill().unwrap();
    let _ = server.wait();
    assert_eq!(
        app.scalar(
            "SELECT COUNT(*) FROM audit_log WHERE action = 'policies.reload' AND actor LIKE '%system:SIGHUP%'"
        )
        .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_policies_and_keys_sqlite() {
    sighup_reloads_policies_and_keys(Backend::Sqlite).await
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_policies_and_keys_postgres() {
    sighup_reloads_policies_and_keys(Backend::Postgres).await
}
