//! Key lifecycle: master-key rotation under load, compare-and-set rewrap,
//! the nonce budget, signing-key rotation, root-key rotation.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use transfer_ledger::auth::Role;
use transfer_ledger::crypto::keyring::{NewVersion, Rotatable};
use transfer_ledger::storage::keys as store;

use crate::both;
use crate::helpers::*;

/// A valid US number per `i` (0..9900), and a valid French mobile.
fn us(i: usize) -> String {
    format!("+1425555{:04}", 100 + i)
}
fn fr(i: usize) -> String {
    format!("+3361234{:04}", i % 10_000)
}

fn batch(from: usize, n: usize) -> Value {
    json!({"transfers": (from..from + n)
        .map(|i| cdr("carrier-a", &format!("call-{i}"), &us(i % 9000), &fr(i % 50)))
        .collect::<Vec<_>>()})
}

impl TestApp {
    fn admin(&self) -> String {
        self.token(Role::Admin, None)
    }

    async fn key_status(&self) -> Value {
        self.get("/v1/keys/status", &self.admin())
            .await
            .expect(200)
            .body
    }

    /// Waits until master-key `version` is retired (it wraps nothing).
    async fn retired(&self, version: i64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let s = self.key_status().await;
            let v = s["versions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["version"] == version)
                .cloned()
                .expect("version listed");
            if !v["retired_at"].is_null() {
                assert_eq!(v["data_keys"], 0, "{s}");
                assert_eq!(v["other_sealed"], 0, "{s}");
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "v{version} was never retired: {s}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every record with its decrypted payload, page by page.
    async fn decrypt_all(&self) -> Vec<Value> {
        let officer = self.officer();
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = "/v1/transfers?include=payload&limit=500".to_string();
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let r = self.read(&path, &officer).await.expect(200);
            out.extend(r.body["items"].as_array().unwrap().iter().cloned());
            match r.body["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.into()),
                None => return out,
            }
        }
    }
}

/// Reads, decrypting reads and writes keep succeeding while two master-key
/// rotations rewrap every data key; afterwards every record still decrypts,
/// old exports still open, the old versions are retired with their material
/// erased, and the audit chain verifies.
async fn rotation_under_concurrent_traffic_fails_no_request(app: TestApp) {
    let app = Arc::new(app);
    let platform = app.platform();
    app.post("/v1/transfers/batch", &platform, &batch(0, 400))
        .await
        .expect(201);
    // An export sealed under v1, to be rewrapped too.
    let officer = app.officer();
    let req = app
        .request(
            &officer,
            "access",
            "carrier-a",
            json!({"phone_number": us(0)}),
            None,
        )
        .await;
    let req_id = req["id"].as_str().unwrap().to_string();
    app.completed(&officer, &req_id).await;
    let s = app.key_status().await;
    assert_eq!(s["current"], 1);
    assert!(s["versions"][0]["data_keys"].as_i64().unwrap() >= 400);

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let done = Arc::new(AtomicUsize::new(0));
    let next = Arc::new(AtomicUsize::new(10_000));
    let mut tasks = Vec::new();
    for worker in 0..3 {
        let (app, stop, failures, done, next) = (
            app.clone(),
            stop.clone(),
            failures.clone(),
            done.clone(),
            next.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let (platform, officer) = (app.platform(), app.officer());
            while !stop.load(Ordering::Relaxed) {
                let r = match worker {
                    // Writes: new subscribers, hence new data keys.
                    0 => {
                        let from = next.fetch_add(10, Ordering::Relaxed);
                        app.post("/v1/transfers/batch", &platform, &batch(from, 10))
                            .await
                    }
                    1 => app.get("/v1/transfers?limit=50", &officer).await,
                    _ => {
                        app.read("/v1/transfers?include=payload&limit=50", &officer)
                            .await
                    }
                };
                done.fetch_add(1, Ordering::Relaxed);
                if !r.status.is_success() {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("worker {worker}: {} {}", r.status, r.text));
                }
            }
        }));
    }

    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = app
        .post("/v1/keys/rotate", &app.admin(), &json!({}))
        .await
        .expect(202);
    assert_eq!(r.body, json!({"key": "master", "version": 2}));
    app.retired(1).await;
    let r = app
        .post("/v1/keys/rotate", &app.admin(), &json!({}))
        .await
        .expect(202);
    assert_eq!(r.body["version"], 3);
    let s = app.retired(2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }

    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert!(done.load(Ordering::Relaxed) > 20, "too little traffic");
    assert_eq!(s["current"], 3);
    assert_eq!(s["rewrap_pending"], false);

    // Nothing is left under the old versions, whose material is erased.
    assert_eq!(
        app.scalar("SELECT COUNT(*) FROM subject_keys WHERE master_version <> 3")
            .await,
        0
    );
    assert_eq!(
        app.scalar(
            "SELECT COUNT(*) FROM keyring WHERE purpose = 'master' AND version < 3
             AND retired_at IS NOT NULL AND length(wrapped) = 0"
        )
        .await,
        2
    );
    // Every record (including those written during the rotations) decrypts.
    let all = app.decrypt_all().await;
    assert_eq!(all.len() as i64, app.count("transfers").await);
    assert!(all.len() > 400);
    assert!(all.iter().all(|t| t["payload"]["caller"].is_string()));
    // The export sealed under v1 still opens and verifies.
    let (headers, body) = app.export(&officer, &req_id).await;
    assert!(!body.is_empty());
    assert_eq!(headers["x-export-key-id"], "v1");

    let auditor = app.token(Role::Auditor, None);
    app.assert_audit_valid().await;
    let rotations = app
        .get("/v1/audit?action=keys.rotate", &auditor)
        .await
        .expect(200);
    assert_eq!(rotations.body["items"].as_array().unwrap().len(), 2);
    let retirements = app
        .get("/v1/audit?action=keys.retire", &auditor)
        .await
        .expect(200);
    assert_eq!(retirements.body["items"].as_array().unwrap().len(), 2);
    // Reading the key status is a read like any other: audited.
    let status = app.key_status().await;
    let reads = app
        .get("/v1/audit?action=keys.status.read", &auditor)
        .await
        .expect(200);
    let last = &reads.body["items"][0]["entry"];
    assert_eq!(last["actor"]["role"], "admin");
    assert_eq!(last["target"]["current"], status["current"]);
}
both!(rotation_under_concurrent_traffic_fails_no_request);

/// The rewrap is a compare-and-set: a data key erased between the rewrap's
/// read and its write stays erased; a write during a rotation wraps its new
/// keys under the newest version even before this instance has heard of it.
async fn rewrap_resurrects_nothing_and_new_writes_use_the_new_version(app: TestApp) {
    let platform = app.platform();
    app.post(
        "/v1/transfers",
        &platform,
        &cdr("carrier-a", "c1", &us(1), &fr(1)),
    )
    .await
    .expect(201);
    app.post(
        "/v1/transfers",
        &platform,
        &cdr("carrier-a", "c2", &us(2), &fr(2)),
    )
    .await
    .expect(201);

    // Another instance adds v2: this one has not read the keyring since.
    let state = &app.state;
    let mut tx = app.db().begin().await.unwrap();
    let v2 = state
        .keys
        .add_version(&mut tx, Rotatable::Master)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(v2, NewVersion::Added(2));
    assert_eq!(state.keys.current_version(), 1);

    // The rewrap reads the stale keys and computes their new wrapping...
    state.keys.refresh(app.db()).await.unwrap();
    let mut tx = app.db().begin().await.unwrap();
    let stale = store::stale_subject_keys(&mut tx, 2, 100).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(stale.len(), 4, "two callers and two callees");
    let rewrapped: Vec<_> = stale
        .iter()
        .map(|k| (k.clone(), state.keys.rewrap_subject(k, 2).unwrap()))
        .collect();

    // ...meanwhile the first caller is erased...
    app.erase(&us(1)).await;
    let erased = app.count("subject_keys").await;
    assert_eq!(erased, 3);

    // ...so its compare-and-set finds nothing and writes nothing back.
    let mut tx = app.db().begin().await.unwrap();
    let mut applied = 0;
    for (k, wrapped) in &rewrapped {
        if store::rewrap_subject_key(&mut tx, k.id, k.master_version, 2, wrapped)
            .await
            .unwrap()
        {
            applied += 1;
        }
    }
    // A second pass (another instance, a retry) changes nothing either.
    for (k, wrapped) in &rewrapped {
        assert!(
            !store::rewrap_subject_key(&mut tx, k.id, k.master_version, 2, wrapped)
                .await
                .unwrap()
        );
    }
    tx.commit().await.unwrap();
    assert_eq!(applied, 3);
    assert_eq!(app.count("subject_keys").await, 3, "nothing resurrected");
    assert_eq!(
        app.scalar("SELECT COUNT(*) FROM subject_keys WHERE master_version = 2")
            .await,
        3
    );

    // A new subscriber's key is wrapped under v2.
    app.post(
        "/v1/transfers",
        &platform,
        &cdr("carrier-a", "c3", &us(3), &fr(2)),
    )
    .await
    .expect(201);
    assert_eq!(
        app.scalar("SELECT COUNT(*) FROM subject_keys WHERE master_version = 2")
            .await,
        4
    );
    let all = app.decrypt_all().await;
    assert_eq!(all.len(), 3, "c1 kept for its callee, c2, c3");
    assert!(all.iter().all(|t| t["payload"]["callee"].is_string()));
}
both!(rewrap_resurrects_nothing_and_new_writes_use_the_new_version);

/// Each data key counts its encryptions and is replaced when the budget is
/// spent; the old key keeps decrypting, and erasure reaches every key the
/// subject ever had. (The least budget is one full batch, 10,000.)
async fn data_keys_are_replaced_when_their_nonce_budget_is_spent(app: TestApp) {
    let platform = app.platform();
    // 10,000 calls from one caller in one batch: its key's budget, exactly.
    app.post("/v1/transfers/batch", &platform, &calls(0, 10_000))
        .await
        .expect(201);
    assert_eq!(app.count("subject_keys").await, 51);
    assert_eq!(
        app.scalar("SELECT MAX(seals) FROM subject_keys").await,
        10_000
    );
    // The next call needs a fresh key for the caller; the callee's has room.
    app.post("/v1/transfers/batch", &platform, &calls(10_000, 2))
        .await
        .expect(201);
    assert_eq!(app.count("subject_keys").await, 52);
    assert_eq!(
        app.scalar("SELECT COUNT(*) FROM subject_keys WHERE seals > 10000")
            .await,
        0,
        "no key exceeds its budget"
    );
    assert_eq!(
        app.scalar("SELECT CAST(SUM(seals) AS BIGINT) FROM subject_keys")
            .await,
        2 * 10_002,
        "every sealed slot counted"
    );
    let all = app.decrypt_all().await;
    assert_eq!(all.len(), 10_002);
    assert!(
        all.iter().all(|t| t["payload"]["caller"] == us(1)),
        "records under the replaced key and the new one open"
    );

    // Erasure of the caller destroys both of its keys; the callees' stay.
    app.erase(&us(1)).await;
    assert_eq!(
        app.count("subject_keys").await,
        50,
        "both generations destroyed"
    );
    let all = app.decrypt_all().await;
    assert_eq!(all.len(), 10_002, "the callees' data stays");
    assert!(all.iter().all(|t| t["payload"]["caller"] != us(1)));
}

both!(
    data_keys_are_replaced_when_their_nonce_budget_is_spent,
    LEAST_BUDGET
);

/// The least nonce budget the service accepts: one full batch.
const LEAST_BUDGET: [(&str, &str); 1] = [("LEDGER_DATA_KEY_MAX_SEALS", "10000")];

/// A batch of `n` calls from one caller (`us(1)`) to 50 callees.
fn calls(from: usize, n: usize) -> Value {
    json!({"transfers": (from..from + n)
        .map(|i| cdr("carrier-a", &format!("c{i}"), &us(1), &fr(i % 50)))
        .collect::<Vec<_>>()})
}

/// Concurrent batches that together spend one data key's budget: each
/// counts its encryptions just before it commits, and one that finds the
/// budget spent by another rolls back and retries with a fresh key. No key
/// ever exceeds its budget, every encryption is counted, nothing is lost.
async fn concurrent_batches_never_overspend_a_data_key(app: TestApp) {
    let platform = app.platform();
    // Three batches of 4,000 calls from one caller: 12,000 encryptions
    // against a budget of 10,000, so one batch needs a fresh key.
    let (a, b, c) = (calls(0, 4_000), calls(4_000, 4_000), calls(8_000, 4_000));
    let (ra, rb, rc) = futures::join!(
        app.post("/v1/transfers/batch", &platform, &a),
        app.post("/v1/transfers/batch", &platform, &b),
        app.post("/v1/transfers/batch", &platform, &c),
    );
    for r in [ra, rb, rc] {
        r.expect(201);
    }
    assert_eq!(
        app.scalar("SELECT COUNT(*) FROM subject_keys WHERE seals > 10000")
            .await,
        0,
        "no key exceeds its budget"
    );
    assert_eq!(
        app.scalar("SELECT CAST(SUM(seals) AS BIGINT) FROM subject_keys")
            .await,
        2 * 12_000,
        "every encryption counted once, none of a rolled-back attempt"
    );
    assert_eq!(
        app.count("subject_keys").await,
        52,
        "the caller's two keys and 50 callees'"
    );
    let all = app.decrypt_all().await;
    assert_eq!(all.len(), 12_000);
    assert!(all.iter().all(|t| t["payload"]["caller"] == us(1)));
}

both!(concurrent_batches_never_overspend_a_data_key, LEAST_BUDGET);

/// A data key destroyed between the write's reading it and its slots
/// referencing it (on PostgreSQL a concurrent erasure or sweep can do that)
/// makes the write retry and, if it keeps happening, refuse with a clear
/// 409 that stores nothing; never a 500. A trigger destroys the key at the
/// last moment of every attempt.
async fn a_data_key_destroyed_mid_write_is_a_conflict_not_a_failure(app: TestApp) {
    destroy_the_key_on_insert(&app, "transfer_slots").await;
    let r = app
        .post(
            "/v1/transfers",
            &app.platform(),
            &cdr("carrier-a", "c1", &us(1), &fr(1)),
        )
        .await;
    refused_for_the_destroyed_key(&app, r, &["transfers", "transfer_slots"]).await;
}
both!(a_data_key_destroyed_mid_write_is_a_conflict_not_a_failure);

/// A trigger that destroys the data key a row of `table` references just
/// before the row is inserted, at every attempt.
async fn destroy_the_key_on_insert(app: &TestApp, table: &str) {
    let destroy = "DELETE FROM subject_keys WHERE id = NEW.subject_key_id;";
    app.before_insert_trigger(
        "key_gone",
        table,
        destroy,
        &format!("{destroy} RETURN NEW;"),
    )
    .await;
}

/// A 409 naming the cause, and nothing of the attempts left in `tables`
/// or among the data keys.
async fn refused_for_the_destroyed_key(app: &TestApp, r: Reply, tables: &[&str]) {
    let r = r.expect(409);
    let detail = r.body["detail"].as_str().unwrap();
    assert!(
        detail.contains("data key") && detail.contains("retry"),
        "{detail}"
    );
    for table in tables {
        assert_eq!(app.count(table).await, 0, "{table}");
    }
    assert_eq!(
        app.count("subject_keys").await,
        0,
        "the attempts rolled back"
    );
}

/// The same for a consent naming a data subject, which seals the subject
/// under the subject's data key (a 500 before consents retried). PostgreSQL
/// only: on SQLite the one writer keeps erasures and sweeps out of a
/// registration's transaction, and a BEFORE trigger deleting the parent of
/// an `ON DELETE SET NULL` reference has undefined results there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_key_destroyed_mid_consent_is_a_conflict_not_a_failure() {
    let Some(app) = spawn_app(Backend::Postgres).await else {
        return;
    };
    destroy_the_key_on_insert(&app, "consents").await;
    let r = app
        .post(
            "/v1/consents",
            &app.carrier("carrier-a"),
            &json!({"reference": "ds-1", "kind": "data_subject", "carrier_id": "carrier-a",
                    "subject": {"phone_number": us(1)}, "countries": ["US"],
                    "granted_at": "2026-01-01T00:00:00Z"}),
        )
        .await;
    refused_for_the_destroyed_key(&app, r, &["consents"]).await;
}

/// A new export-signing key signs from now on; the old public key stays
/// published by key id, so what it signed still verifies.
async fn signing_keys_rotate_and_old_ones_stay_published(app: TestApp) {
    let auditor = app.token(Role::Auditor, None);
    let old_head = app.get("/v1/audit/head", &auditor).await.expect(200).body;
    assert_eq!(old_head["key_id"], "v1");

    app.post("/v1/keys/export-signing/rotate", &app.officer(), &json!({}))
        .await
        .expect(403);
    let r = app
        .post("/v1/keys/export-signing/rotate", &app.admin(), &json!({}))
        .await
        .expect(201);
    assert_eq!(r.body, json!({"key": "signing", "version": 2}));

    let keys = app
        .get("/v1/keys/export-signing", &auditor)
        .await
        .expect(200)
        .body;
    assert_eq!(keys["key_id"], "v2");
    let ids: Vec<&str> = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["v1", "v2"]);
    let public = |id: &str| {
        let k = keys["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["key_id"] == id)
            .unwrap();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(k["public_key"].as_str().unwrap())
            .unwrap();
        ed25519_compact::PublicKey::from_slice(&raw).unwrap()
    };
    let verify = |head: &Value, key: &ed25519_compact::PublicKey| {
        let at = chrono::DateTime::parse_from_rfc3339(head["at"].as_str().unwrap())
            .unwrap()
            .with_timezone(&chrono::Utc);
        let message = transfer_ledger::audit::signed_message(
            head["seq"].as_i64().unwrap(),
            head["hash"].as_str().unwrap(),
            &at,
        );
        let sig = base64::engine::general_purpose::STANDARD
            .decode(head["signature"].as_str().unwrap())
            .unwrap();
        key.verify(
            message.as_bytes(),
            &ed25519_compact::Signature::from_slice(&sig).unwrap(),
        )
        .is_ok()
    };
    let new_head = app.get("/v1/audit/head", &auditor).await.expect(200).body;
    assert_eq!(new_head["key_id"], "v2");
    assert!(verify(&new_head, &public("v2")));
    assert!(!verify(&new_head, &public("v1")));
    assert!(verify(&old_head, &public("v1")));

    // The CLI still checks the log against the head signed by v1.
    let file = app.dir().join("old-head.json");
    std::fs::write(&file, old_head.to_string()).unwrap();
    app.cli_ok(&["audit", "verify", "--since-head", file.to_str().unwrap()]);
    let s = app.key_status().await;
    assert_eq!(
        s["signing"],
        json!({"current": "v2", "published": ["v1", "v2"]})
    );
}
both!(signing_keys_rotate_and_old_ones_stay_published);

/// `keys rotate` from the CLI beside a running server: the CLI rewraps and
/// retires v1; the server, which still holds v1 in memory, picks up v2.
async fn cli_rotation_beside_a_running_server(app: TestApp) {
    let platform = app.platform();
    app.post("/v1/transfers/batch", &platform, &batch(0, 50))
        .await
        .expect(201);
    let report: Value = serde_json::from_slice(&app.cli_ok(&["keys", "rotate"])).unwrap();
    assert_eq!(report["version"], 2);
    assert_eq!(report["retired"], json!([1]));
    assert_eq!(report["remaining"], false);
    assert!(report["rewrapped"].as_u64().unwrap() >= 50, "{report}");

    // The server reads and writes on.
    assert_eq!(app.decrypt_all().await.len(), 50);
    app.post("/v1/transfers/batch", &platform, &batch(100, 10))
        .await
        .expect(201);
    assert_eq!(app.decrypt_all().await.len(), 60);
    assert_eq!(
        app.scalar("SELECT COUNT(*) FROM subject_keys WHERE master_version <> 2")
            .await,
        0
    );
    let s: Value = serde_json::from_slice(&app.cli_ok(&["keys", "status"])).unwrap();
    assert_eq!(s["current"], 2);
}
both!(cli_rotation_beside_a_running_server);

/// `keys rotate-root`: the keyring moves to the new root key in one
/// transaction; the old key no longer opens the database, the new one does,
/// and every record still decrypts.
async fn root_key_rotation(app: TestApp) {
    let platform = app.platform();
    app.post("/v1/transfers/batch", &platform, &batch(0, 20))
        .await
        .expect(201);
    let new_key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
    let file = app.dir().join("new-root.key");
    std::fs::write(&file, format!("{new_key}\n")).unwrap();

    let bad = app.dir().join("bad.key");
    std::fs::write(&bad, "not a key").unwrap();
    let out = app.cli(&[
        "keys",
        "rotate-root",
        "--new-key-file",
        bad.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("base64"));

    let stdout = app.cli_ok(&[
        "keys",
        "rotate-root",
        "--new-key-file",
        file.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&stdout).contains("LEDGER_MASTER_KEY_FILE"));

    // This instance still holds the old root key: a new master or signing
    // version wrapped under it would leave the ledger opened by neither
    // key, so it refuses and says to restart.
    for path in ["/v1/keys/rotate", "/v1/keys/export-signing/rotate"] {
        let r = app.post(path, &app.admin(), &json!({})).await.expect(409);
        assert!(
            r.body["detail"].as_str().unwrap().contains("restart"),
            "{}",
            r.text
        );
    }

    // The old root key is refused, the new one opens everything.
    let out = app.cli(&["keys", "status"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not open"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listen = format!("127.0.0.1:{}", free_port());
    let mut server = app.cli_spawn(
        &["serve"],
        &[
            ("LEDGER_MASTER_KEY", ""),
            ("LEDGER_MASTER_KEY_FILE", file.to_str().unwrap()),
            ("LEDGER_LISTEN", &listen),
        ],
    );
    let url = format!("http://{listen}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let officer = app.officer();
    let page = loop {
        let r = app
            .client
            .get(format!("{url}/v1/transfers?include=payload&limit=100"))
            .bearer_auth(&officer)
            .header("X-Access-Reason", "root rotation check")
            .send()
            .await;
        if let Ok(r) = r {
            break r.json::<Value>().await.unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "server with the new key never came up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 20);
    assert!(items.iter().all(|t| t["payload"]["caller"].is_string()));

    // A master version added under the new root key cannot be read by the
    // instance still on the old one: it says it is not ready (a load
    // balancer stops sending it requests) until restarted with the new key.
    assert_eq!(app.get("/readyz", "").await.status, 200);
    let r = app
        .client
        .post(format!("{url}/v1/keys/rotate"))
        .bearer_auth(app.admin())
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = app.get("/readyz", "").await;
        if r.status == 503 {
            assert!(
                r.text.contains("restart it with the new root key"),
                "{}",
                r.text
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the old-key instance stayed ready"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.kill().unwrap();
    let _ = server.wait();
}
both!(root_key_rotation);

/// A rotation killed (SIGKILL) at any instant loses nothing: the next
/// `keys rotate` moves everything to its version and retires all others.
async fn a_killed_rotation_resumes(app: TestApp) {
    let platform = app.platform();
    for from in (0..4000).step_by(2000) {
        app.post("/v1/transfers/batch", &platform, &batch(from, 2000))
            .await
            .expect(201);
    }
    for round in 0..3u64 {
        let mut child = app.cli_spawn(&["keys", "rotate"], &[]);
        tokio::time::sleep(Duration::from_millis(150 + 200 * round)).await;
        let _ = child.kill();
        let _ = child.wait();
    }
    let report: Value = serde_json::from_slice(&app.cli_ok(&["keys", "rotate"])).unwrap();
    let current = report["version"].as_i64().unwrap();
    let s = app.key_status().await;
    assert_eq!(s["current"], current);
    for v in s["versions"].as_array().unwrap() {
        if v["version"] != current {
            assert!(!v["retired_at"].is_null(), "{s}");
        }
    }
    assert_eq!(
        app.scalar(&format!(
            "SELECT COUNT(*) FROM subject_keys WHERE master_version <> {current}"
        ))
        .await,
        0
    );
    assert_eq!(app.decrypt_all().await.len(), 4000);
    app.assert_audit_valid().await;
}
both!(a_killed_rotation_resumes);
