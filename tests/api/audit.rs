//! The audit trail: coverage, atomicity, tamper evidence, concurrency.

use serde_json::{json, Value};
use transfer_ledger::storage::Db;

use crate::both;
use crate::helpers::*;

impl TestApp {
    /// The value of one exported series (name and labels).
    async fn metric(&self, series: &str) -> u64 {
        let metrics = self.get("/metrics", "").await.expect(200).text;
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("{series} is exported"))
            .parse()
            .unwrap()
    }

    /// Standalone audit appends so far: `(guessed, locked)`.
    async fn standalone_appends(&self) -> (u64, u64) {
        let series =
            |path: &str| format!("ledger_audit_standalone_appends_total{{path=\"{path}\"}}");
        (
            self.metric(&series("guessed")).await,
            self.metric(&series("locked")).await,
        )
    }

    pub(crate) async fn audit_entries(&self) -> Vec<Value> {
        let auditor = self.token(transfer_ledger::auth::Role::Auditor, None);
        let mut out: Vec<Value> = self
            .all_pages("/v1/audit?limit=1000", &auditor)
            .await
            .into_iter()
            .map(|i| i["entry"].clone())
            .collect();
        out.reverse();
        out
    }

    async fn verify(&self) -> Value {
        self.get(
            "/v1/audit/verify",
            &self.token(transfer_ledger::auth::Role::Auditor, None),
        )
        .await
        .expect(200)
        .body
    }

    /// Runs raw SQL with the audit triggers out of the way, as a database
    /// superuser could.
    async fn superuser(&self, sql: &str) {
        match self.db() {
            Db::Sqlite { write, .. } => {
                // Every trigger of the log out of the way and back, in one
                // transaction, as PostgreSQL's are disabled and enabled.
                let mut tx = write.begin().await.unwrap();
                let triggers: Vec<(String, String)> = sqlx::query_as(
                    "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'audit_log'",
                )
                .fetch_all(&mut *tx)
                .await
                .unwrap();
                for (name, _) in &triggers {
                    sqlx::query(&format!("DROP TRIGGER {name}"))
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                }
                sqlx::query(sql).execute(&mut *tx).await.unwrap();
                for (_, create) in &triggers {
                    sqlx::query(create).execute(&mut *tx).await.unwrap();
                }
                tx.commit().await.unwrap();
            }
            Db::Postgres(p) => {
                let mut tx = p.begin().await.unwrap();
                for s in [
                    "ALTER TABLE audit_log DISABLE TRIGGER USER",
                    sql,
                    "ALTER TABLE audit_log ENABLE TRIGGER USER",
                ] {
                    sqlx::query(s).execute(&mut *tx).await.unwrap();
                }
                tx.commit().await.unwrap();
            }
        }
    }
}

fn actions(entries: &[Value]) -> Vec<&str> {
    entries
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect()
}

async fn every_access_is_audited_without_personal_data(app: TestApp) {
    let (platform, officer, carrier) = (app.platform(), app.officer(), app.carrier("carrier-a"));
    app.consent("oc-1", "carrier-a", "tenant-1", &["FR"]).await;
    let na = app
        .post(
            "/v1/transfers",
            &platform,
            &assignment(
                "carrier-a",
                "oc-1",
                "tenant-1",
                "+33198765432",
                "sip:+33198765432@pbx.example",
            ),
        )
        .await
        .expect(201);
    let batch = json!({"transfers": [cdr("carrier-a", "CALL-77a", "+14255550177", "sip:zelda@secret.example"),
                                     quality("carrier-a", "CALL-77a", "+14255550177", "sip:zelda@secret.example")]});
    let b = app
        .post("/v1/transfers/batch", &platform, &batch)
        .await
        .expect(201);
    let id = na.body["id"].as_str().unwrap();
    app.read(&format!("/v1/transfers/{id}"), &officer)
        .await
        .expect(200);
    app.read(
        "/v1/transfers?subject=%2B14255550177&include=payload",
        &officer,
    )
    .await
    .expect(200);
    app.get(&format!("/v1/transfers/{}", uuid::Uuid::now_v7()), &carrier)
        .await
        .expect(404);
    app.post("/v1/consents", &carrier, &json!({"reference": "ds-1", "kind": "data_subject", "carrier_id": "carrier-a",
        "subject": {"phone_number": "+14255550177"}, "countries": ["FR"], "granted_at": "2026-10-01T00:00:00Z"})).await.expect(201);
    app.post(
        "/v1/consents/oc-1/status",
        &platform,
        &json!({"status": "suspended"}),
    )
    .await
    .expect(200);
    app.get("/v1/reports/processing", &officer)
        .await
        .expect(200);
    app.get("/v1/transfers", "garbage").await.expect(401);
    app.get("/v1/transfers", &platform).await.expect(403);
    app.post(
        "/v1/transfers",
        &carrier,
        &duration("carrier-b", "x", "+14255550100", "+14255550101"),
    )
    .await
    .expect(403);
    // A decrypting read without a stated reason is refused, and audited.
    let r = app
        .get(&format!("/v1/transfers/{id}"), &officer)
        .await
        .expect(400);
    assert!(r.text.contains("X-Access-Reason"), "{}", r.text);
    // So is reading a data subject's consent without one.
    let r = app.get("/v1/consents/ds-1", &officer).await.expect(400);
    assert!(r.text.contains("X-Access-Reason"), "{}", r.text);

    let entries = app.audit_entries().await;
    let acts = actions(&entries);
    for want in [
        "consent.register",
        "transfer.record",
        "transfer.record_batch",
        "transfer.read",
        "transfer.list",
        "consent.status",
        "report.processing",
        "request.denied",
    ] {
        assert!(acts.contains(&want), "{want} missing from {acts:?}");
    }
    // One entry per batch, listing its ids.
    let batch_entry = entries
        .iter()
        .find(|e| e["action"] == "transfer.record_batch")
        .unwrap();
    assert_eq!(batch_entry["target"]["transfer_ids"], b.body["ids"]);
    // The decrypting read names the reader, the record and the reason.
    let read = entries
        .iter()
        .find(|e| e["action"] == "transfer.read" && e["outcome"] == "success")
        .unwrap();
    assert_eq!(read["target"]["transfer_id"], id);
    assert_eq!(read["reason"], "ticket PRIV-42");
    assert_eq!(read["actor"]["role"], "privacy_officer");
    assert!(read["request_id"].is_string());
    // Listed with the fields most looked for beside the entry as hashed.
    let listed = app
        .all_pages(
            "/v1/audit?action=transfer.read&limit=100",
            &app.token(transfer_ledger::auth::Role::Auditor, None),
        )
        .await;
    let item = listed.iter().find(|i| i["entry"] == *read).unwrap();
    assert_eq!(
        [
            &item["action"],
            &item["actor"],
            &item["outcome"],
            &item["reason"],
            &item["target"],
            &item["prev_hash"]
        ],
        [
            &read["action"],
            &read["actor"]["sub"],
            &read["outcome"],
            &read["reason"],
            &read["target"],
            &read["prev"]
        ]
    );
    let at = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    assert_eq!(at(&item["at"]), at(&read["at"]));
    // A probe of an unknown id is recorded as not found, with the carrier.
    let probe = entries
        .iter()
        .find(|e| e["outcome"] == "not_found")
        .unwrap();
    assert_eq!(probe["actor"]["carrier"], "carrier-a");
    // Denials: anonymous for a bad token, named for a forbidden role.
    let denied: Vec<_> = entries
        .iter()
        .filter(|e| e["action"] == "request.denied")
        .collect();
    assert_eq!(denied.len(), 5, "{denied:#?}");
    assert_eq!(denied[0]["actor"]["sub"], "anonymous");
    assert_eq!(denied[1]["actor"]["role"], "platform", "{denied:#?}");
    assert_eq!(denied[1]["target"]["route"], "/v1/transfers");
    assert_eq!(denied[2]["actor"]["carrier"], "carrier-a");
    assert_eq!(denied[3]["actor"]["role"], "privacy_officer");
    assert_eq!(denied[3]["target"]["route"], "/v1/transfers/{id}");
    assert_eq!(denied[3]["target"]["status"], 400);
    assert_eq!(denied[4]["target"]["route"], "/v1/consents/{reference}");
    assert_eq!(denied[4]["actor"]["role"], "privacy_officer");
    // Subject lookups are recorded by blind index only.
    let list = entries
        .iter()
        .find(|e| e["action"] == "transfer.list")
        .unwrap();
    assert_eq!(
        list["target"]["filters"]["subject_index"]
            .as_str()
            .unwrap()
            .len(),
        64
    );

    // No plaintext personal data anywhere in the trail.
    let all = serde_json::to_string(&entries).unwrap();
    for secret in [
        "33198765432",
        "4255550177",
        "zelda",
        "secret.example",
        "pbx.example",
        "CALL-77a",
    ] {
        assert!(!all.contains(secret), "{secret} in the audit trail");
    }
    assert_eq!(app.verify().await["valid"], true);
}
both!(every_access_is_audited_without_personal_data);

async fn entries_commit_with_their_change_or_not_at_all(app: TestApp) {
    let platform = app.platform();
    // A refused write leaves no entry claiming success.
    let na = assignment(
        "carrier-a",
        "missing",
        "tenant-1",
        "+33198765432",
        "sip:a@b.example",
    );
    app.post("/v1/transfers", &platform, &na).await.expect(409);
    assert!(!actions(&app.audit_entries().await).contains(&"transfer.record"));

    // If the audit append fails, the write it records fails with it.
    app.before_insert_trigger(
        "fail_audit",
        "audit_log",
        "SELECT RAISE(ABORT, 'audit down');",
        "RAISE EXCEPTION 'audit down';",
    )
    .await;
    app.post(
        "/v1/transfers",
        &platform,
        &cdr("carrier-a", "c1", "+14255550100", "+14255550101"),
    )
    .await
    .expect(500);
    assert_eq!(app.count("transfers").await, 0);
    // No unaudited read either: the read fails rather than return data,
    // appended after the chain's end as this instance last saw it (the
    // reads above) or under the cursor's lock.
    app.get("/v1/transfers", &app.officer()).await.expect(500);
    app.get("/v1/transfers", &app.officer()).await.expect(500);
    match app.db() {
        Db::Sqlite { write, .. } => {
            sqlx::query("DROP TRIGGER fail_audit")
                .execute(write)
                .await
                .unwrap();
        }
        Db::Postgres(p) => {
            sqlx::query("DROP TRIGGER fail_audit ON audit_log")
                .execute(p)
                .await
                .unwrap();
        }
    }
    let r = app
        .post(
            "/v1/transfers",
            &platform,
            &cdr("carrier-a", "c1", "+14255550100", "+14255550101"),
        )
        .await
        .expect(201);
    let entries = app.audit_entries().await;
    let rec = entries
        .iter()
        .find(|e| e["action"] == "transfer.record")
        .unwrap();
    assert_eq!(rec["target"]["transfer_ids"][0], r.body["id"]);
    assert_eq!(app.verify().await["valid"], true);
}
both!(entries_commit_with_their_change_or_not_at_all);

async fn the_log_refuses_updates_and_deletes(app: TestApp) {
    app.get("/v1/transfers", &app.officer()).await.expect(200);
    for sql in [
        "UPDATE audit_log SET actor = 'someone-else'",
        "DELETE FROM audit_log",
    ] {
        let refused = match app.db() {
            Db::Sqlite { write, .. } => sqlx::query(sql).execute(write).await.is_err(),
            Db::Postgres(p) => sqlx::query(sql).execute(p).await.is_err(),
        };
        assert!(refused, "{sql}");
    }
    if let Db::Postgres(p) = app.db() {
        assert!(sqlx::query("TRUNCATE audit_log").execute(p).await.is_err());
    }
}
both!(the_log_refuses_updates_and_deletes);

/// The database itself keeps the chain: an entry that does not follow the
/// append cursor is refused, whoever writes it, and the cursor stays.
async fn the_log_refuses_entries_that_do_not_follow_its_end(app: TestApp) {
    for _ in 0..3 {
        app.get("/v1/transfers", &app.officer()).await.expect(200);
    }
    // The first under the cursor's lock, the next after it in one statement.
    assert_eq!(app.standalone_appends().await, (2, 1));
    let head: (i64, Vec<u8>) = match app.db() {
        Db::Sqlite { read, .. } => sqlx::query_as("SELECT seq, hash FROM audit_head")
            .fetch_one(read)
            .await
            .unwrap(),
        Db::Postgres(p) => sqlx::query_as("SELECT seq, hash FROM audit_head")
            .fetch_one(p)
            .await
            .unwrap(),
    };
    assert_eq!(head.0, 3);
    // Well-formed entries, each wrong in one way: a stale prev_hash, a gap,
    // a fork of an earlier entry.
    for (seq, prev) in [(4, vec![7u8; 32]), (5, head.1.clone()), (3, head.1.clone())] {
        let entry = format!(
            r#"{{"v":1,"seq":{seq},"prev":"{}","at":"2026-01-01T00:00:00.000000Z","actor":{{"sub":"x","role":"auditor"}},"action":"audit.read","outcome":"success","target":{{}}}}"#,
            hex::encode(&prev)
        );
        let hash = {
            use sha2::Digest;
            sha2::Sha256::digest(entry.as_bytes()).to_vec()
        };
        let sql = "INSERT INTO audit_log (seq, at, actor, action, outcome, entry, prev_hash, hash)
                   VALUES ($1, 1767225600000000, 'x', 'audit.read', 'success', $2, $3, $4)";
        let refused = match app.db() {
            Db::Sqlite { write, .. } => sqlx::query(sql)
                .bind(seq)
                .bind(&entry)
                .bind(&prev)
                .bind(&hash)
                .execute(write)
                .await
                .unwrap_err(),
            Db::Postgres(p) => sqlx::query(sql)
                .bind(seq)
                .bind(&entry)
                .bind(&prev)
                .bind(&hash)
                .execute(p)
                .await
                .unwrap_err(),
        };
        assert!(
            refused
                .to_string()
                .contains("does not follow the end of the chain"),
            "seq {seq}: {refused}"
        );
    }
    assert_eq!(app.count("audit_log").await, 3);
    assert_eq!(app.scalar("SELECT seq FROM audit_head").await, 3);
    let v = app.verify().await;
    assert_eq!(
        (v["valid"].clone(), v["entries"].clone()),
        (json!(true), json!(3)),
        "{v}"
    );
}
both!(the_log_refuses_entries_that_do_not_follow_its_end);

/// Two instances on one database, each appending after the other: every
/// audited read of one finds the chain moved on by the other since its
/// last append, and is appended after the real end, none lost or forked.
async fn instances_appending_in_turn_keep_one_chain(app: TestApp) {
    let other = app.another_instance(&[]).await;
    let officer = app.officer();
    let read = |base: String| {
        let (client, officer) = (app.client.clone(), officer.clone());
        async move {
            client
                .get(format!("{base}/v1/transfers"))
                .bearer_auth(officer)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let bases = [app.addr.clone(), other.url.clone()];
    for i in 0..20 {
        assert_eq!(read(bases[i % 2].clone()).await, 200);
        // And some in turn with the same instance, after its own appends.
        if i % 5 == 0 {
            assert_eq!(read(bases[i % 2].clone()).await, 200);
        }
    }
    // This instance appended 12 entries: the 10 after one of the other's
    // under the cursor's lock (its guess was wrong, or it had none), the 2
    // right after its own in one statement.
    assert_eq!(app.standalone_appends().await, (2, 10));
    // And at once, from both.
    let reads: Vec<_> = (0..40)
        .map(|i| tokio::spawn(read(bases[i % 2].clone())))
        .collect();
    for r in reads {
        assert_eq!(r.await.unwrap(), 200);
    }
    let v = app.verify().await;
    assert_eq!(
        (v["valid"].clone(), v["entries"].clone()),
        (json!(true), json!(64)),
        "{v}"
    );
    let entries = app.audit_entries().await;
    assert_eq!(
        entries
            .iter()
            .filter(|e| e["action"] == "transfer.list")
            .count(),
        64
    );
}
both!(instances_appending_in_turn_keep_one_chain);

async fn tampering_is_found_at_the_right_entry(app: TestApp) {
    let officer = app.officer();
    for _ in 0..8 {
        app.get("/v1/transfers", &officer).await.expect(200);
    }
    // Entries 1..=8 are the reads; verify itself appends as it goes.
    assert_eq!(app.verify().await["valid"], true);

    // Edit entry 3's bytes.
    app.superuser("UPDATE audit_log SET entry = REPLACE(entry, 'transfer.list', 'transfer.lisT') WHERE seq = 3").await;
    let before = app.count("audit_log").await;
    let v = app.verify().await;
    assert_eq!(
        (v["valid"].clone(), v["first_bad_seq"].clone()),
        (json!(false), json!(3)),
        "{v}"
    );
    // A broken chain that can still be appended to records its verification.
    assert_eq!(app.count("audit_log").await, before + 1);
    // And when that append fails for another reason, the read fails too: no
    // unaudited answer (only a deleted cursor is answered regardless).
    let refuse = match app.backend {
        Backend::Sqlite => vec![
            "CREATE TRIGGER refuse_appends BEFORE INSERT ON audit_log BEGIN SELECT RAISE(ABORT, 'full'); END",
        ],
        Backend::Postgres => vec![
            "CREATE FUNCTION refuse_appends() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'full'; END; $$",
            "CREATE TRIGGER refuse_appends BEFORE INSERT ON audit_log FOR EACH ROW EXECUTE FUNCTION refuse_appends()",
        ],
    };
    for sql in refuse {
        app.exec(sql, None, None).await;
    }
    app.get(
        "/v1/audit/verify",
        &app.token(transfer_ledger::auth::Role::Auditor, None),
    )
    .await
    .expect(500);
}
both!(tampering_is_found_at_the_right_entry);

async fn deleting_reordering_and_inserting_are_found(app: TestApp) {
    let officer = app.officer();
    for _ in 0..8 {
        app.get("/v1/transfers", &officer).await.expect(200);
    }
    // Reorder: swap the stored entries 4 and 5 (bytes and hashes together).
    app.superuser(
        "UPDATE audit_log SET entry = (SELECT entry FROM audit_log b WHERE b.seq = 9 - audit_log.seq),
                              hash = (SELECT hash FROM audit_log b WHERE b.seq = 9 - audit_log.seq),
                              prev_hash = (SELECT prev_hash FROM audit_log b WHERE b.seq = 9 - audit_log.seq)
         WHERE seq IN (4, 5)",
    )
    .await;
    let v = app.verify().await;
    assert_eq!(v["first_bad_seq"], 4, "{v}");
}
both!(deleting_reordering_and_inserting_are_found);

async fn deletion_and_insertion_are_found(app: TestApp) {
    let officer = app.officer();
    for _ in 0..6 {
        app.get("/v1/transfers", &officer).await.expect(200);
    }
    app.superuser("DELETE FROM audit_log WHERE seq = 2").await;
    let v = app.verify().await;
    assert_eq!(
        (v["valid"].clone(), v["first_bad_seq"].clone()),
        (json!(false), json!(2)),
        "{v}"
    );
    assert!(v["reason"].as_str().unwrap().contains("missing"));

    // Put a forged entry in its place: well-formed, but it cannot chain.
    let forged = r#"{"v":1,"seq":2,"prev":"00","at":"2026-01-01T00:00:00.000000Z","actor":{"sub":"x","role":"auditor"},"action":"audit.read","outcome":"success","target":{}}"#;
    let hash = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(forged.as_bytes()))
    };
    let blob = |h: &str| match app.backend {
        Backend::Sqlite => format!("X'{h}'"),
        Backend::Postgres => format!("decode('{h}', 'hex')"),
    };
    app.superuser(&format!(
        "INSERT INTO audit_log (seq, at, actor, action, outcome, entry, prev_hash, hash)
         VALUES (2, 1767225600000000, 'x', 'audit.read', 'success', '{forged}', {}, {})",
        blob(&"00".repeat(32)),
        blob(&hash)
    ))
    .await;
    let v = app.verify().await;
    assert_eq!(v["first_bad_seq"], 2, "{v}");
    assert!(v["reason"].as_str().unwrap().contains("chain"), "{v}");
}
both!(deletion_and_insertion_are_found);

async fn truncating_the_tail_is_found_against_a_saved_head(app: TestApp) {
    use base64::Engine;
    let auditor = app.token(transfer_ledger::auth::Role::Auditor, None);
    for _ in 0..5 {
        app.get("/v1/transfers", &app.officer()).await.expect(200);
    }
    // The auditor keeps a signed head.
    let head = app.get("/v1/audit/head", &auditor).await.expect(200).body;
    assert_eq!(head["seq"], 5);
    let keys = app
        .get("/v1/keys/export-signing", &auditor)
        .await
        .expect(200)
        .body;
    assert_eq!(keys["alg"], "Ed25519");
    let pk: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(keys["public_key"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let sig = base64::engine::general_purpose::STANDARD
        .decode(head["signature"].as_str().unwrap())
        .unwrap();
    let at = chrono::DateTime::parse_from_rfc3339(head["at"].as_str().unwrap())
        .unwrap()
        .with_timezone(&chrono::Utc);
    let message = transfer_ledger::audit::signed_message(5, head["hash"].as_str().unwrap(), &at);
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&pk).unwrap();
    vk.verify_strict(
        message.as_bytes(),
        &ed25519_dalek::Signature::from_slice(&sig).unwrap(),
    )
    .expect("head signature verifies");

    let head_file = app.dir().join("head.json");
    std::fs::write(&head_file, head.to_string()).unwrap();
    let cli = |extra: &[&str]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_transfer-ledger"));
        c.env_clear().env("PATH", std::env::var("PATH").unwrap());
        for (k, v) in &app.vars {
            c.env(k, v);
        }
        c.args(["audit", "verify"]).args(extra);
        c.output().unwrap()
    };
    let out = cli(&["--since-head", head_file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Remove the tail (entries 4 onward) and cover the tracks in the cursor.
    app.superuser("DELETE FROM audit_log WHERE seq >= 4").await;
    app.superuser(
        "UPDATE audit_head SET seq = 3, hash = (SELECT hash FROM audit_log WHERE seq = 3)",
    )
    .await;
    let out = cli(&[]);
    assert!(
        out.status.success(),
        "without a saved head the shorter chain is self-consistent"
    );
    let out = cli(&["--since-head", head_file.to_str().unwrap()]);
    assert!(!out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["valid"].clone(), v["first_bad_seq"].clone()),
        (json!(false), json!(5)),
        "{v}"
    );
    assert!(v["reason"].as_str().unwrap().contains("truncated"));

    // Without covering the tracks, the cursor alone gives it away.
    app.superuser("UPDATE audit_head SET seq = 9").await;
    let v = app.verify().await;
    assert_eq!(v["valid"], false);

    // Deleting the cursor itself is named as such, by the API and the CLI.
    app.superuser("DELETE FROM audit_log WHERE seq > 3").await;
    app.superuser("DELETE FROM audit_head").await;
    let v = app.verify().await;
    assert_eq!(v["valid"], false, "{v}");
    assert!(v["reason"].as_str().unwrap().contains("audit_head"), "{v}");
    let out = cli(&[]);
    assert!(!out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["reason"].as_str().unwrap().contains("audit_head"), "{v}");
}
both!(truncating_the_tail_is_found_against_a_saved_head);

async fn concurrent_requests_leave_a_gapless_chain(app: TestApp) {
    let platform = app.platform();
    let officer = app.officer();
    let mut handles = Vec::new();
    for i in 0..200 {
        let (client, addr) = (app.client.clone(), app.addr.clone());
        let (platform, officer) = (platform.clone(), officer.clone());
        handles.push(tokio::spawn(async move {
            let r = if i % 2 == 0 {
                client
                    .post(format!("{addr}/v1/transfers"))
                    .bearer_auth(platform)
                    .json(&cdr(
                        "carrier-a",
                        &format!("c{i}"),
                        &format!("+142555501{:02}", i % 100),
                        "+14255550199",
                    ))
                    .send()
                    .await
                    .unwrap()
            } else {
                client
                    .get(format!("{addr}/v1/transfers?limit=5"))
                    .bearer_auth(officer)
                    .send()
                    .await
                    .unwrap()
            };
            r.status().as_u16()
        }));
    }
    for h in handles {
        let s = h.await.unwrap();
        assert!(s == 200 || s == 201, "status {s}");
    }
    let v = app.verify().await;
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(v["entries"], 200);
    assert_eq!(v["head"]["seq"], 200);
}
both!(concurrent_requests_leave_a_gapless_chain);

/// Several service instances against one PostgreSQL: the chain never forks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_instances_share_one_unforked_chain() {
    let Some(first) = spawn_app(Backend::Postgres).await else {
        return;
    };
    let shared: std::collections::HashMap<String, String> =
        ["LEDGER_DATABASE_URL", "LEDGER_MASTER_KEY"]
            .iter()
            .map(|k| (k.to_string(), first.vars[*k].clone()))
            .collect();
    let second = spawn_app_with(Backend::Postgres, shared).await.unwrap();
    let mut handles = Vec::new();
    for i in 0..120 {
        let app = if i % 2 == 0 { &first } else { &second };
        let (client, addr, token) = (app.client.clone(), app.addr.clone(), app.platform());
        handles.push(tokio::spawn(async move {
            client
                .post(format!("{addr}/v1/transfers"))
                .bearer_auth(token)
                .json(&cdr(
                    "carrier-a",
                    &format!("c{i}"),
                    "+14255550100",
                    "+14255550101",
                ))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    for h in handles {
        assert_eq!(h.await.unwrap(), 201);
    }
    let v = second.verify().await;
    assert_eq!(
        (v["valid"].clone(), v["entries"].clone()),
        (json!(true), json!(120)),
        "{v}"
    );
}

async fn the_filter_columns_must_match_the_hashed_bytes(app: TestApp) {
    app.get("/v1/transfers", &app.officer()).await.expect(200);
    app.get("/v1/transfers", &app.officer()).await.expect(200);
    app.superuser("UPDATE audit_log SET actor = 'someone-else' WHERE seq = 2")
        .await;
    let v = app.verify().await;
    assert_eq!(v["first_bad_seq"], 2, "{v}");
}
both!(the_filter_columns_must_match_the_hashed_bytes);

/// Anonymous refusals in `entries`: (audited one by one, counted in
/// `coalesced` entries, how many such entries).
fn anonymous_refusals(entries: &[Value]) -> (u64, u64, usize) {
    let anonymous = entries
        .iter()
        .filter(|e| e["action"] == "request.denied" && e["actor"]["sub"] == "anonymous");
    let (counted, single): (Vec<&Value>, Vec<&Value>) =
        anonymous.partition(|e| e["target"]["coalesced"].is_u64());
    let held = counted
        .iter()
        .map(|e| e["target"]["coalesced"].as_u64().unwrap())
        .sum();
    (single.len() as u64, held, counted.len())
}

/// Refusals without a valid token beyond the instance's budget are counted
/// into one entry, not one each, and none goes unrecorded: at the next
/// refusal audited one by one, and at shutdown. Refusals of a known caller
/// are always audited one by one.
async fn anonymous_refusals_beyond_the_budget_are_counted(app: TestApp) {
    let hammer = |url: String, n: usize| {
        let client = app.client.clone();
        async move {
            for i in 0..n {
                let req = if i % 2 == 0 {
                    client
                        .get(format!("{url}/v1/transfers"))
                        .bearer_auth("garbage")
                } else {
                    client.get(format!("{url}/v1/holds"))
                };
                assert_eq!(req.send().await.unwrap().status(), 401);
            }
        }
    };
    // A budget of 1 a second holds 10: 40 at once overflow it.
    hammer(app.addr.clone(), 40).await;
    app.get("/v1/audit", &app.platform()).await.expect(403);
    let coalesced = app.metric("ledger_denials_coalesced_total").await;
    assert!(coalesced >= 20, "{coalesced}");
    // The next refusal within the budget brings the count with it.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    hammer(app.addr.clone(), 1).await;
    let entries = app.audit_entries().await;
    let (single, held, summaries) = anonymous_refusals(&entries);
    assert_eq!(single + held, 41, "{single} + {held}");
    assert_eq!(held, coalesced);
    // One count, unless the server's own flush (every 10 s) came between.
    assert!(summaries >= 1);
    let counts: Vec<&Value> = entries
        .iter()
        .filter(|e| e["target"]["coalesced"].is_u64())
        .collect();
    let sum = |key: &str| -> u64 {
        counts
            .iter()
            .map(|e| {
                e["target"]
                    .pointer(key)
                    .and_then(Value::as_u64)
                    .unwrap_or(0)
            })
            .sum()
    };
    assert_eq!(sum("/statuses/401"), held);
    assert_eq!(
        sum("/routes/GET ~1v1~1transfers") + sum("/routes/GET ~1v1~1holds"),
        held
    );
    for c in &counts {
        assert_eq!(c["outcome"], "denied");
        assert!(c["target"]["first_at"].is_string());
        // About no one request.
        assert!(c.get("request_id").is_none(), "{c}");
    }
    let named = entries
        .iter()
        .filter(|e| e["action"] == "request.denied" && e["actor"]["role"] == "platform")
        .count();
    assert_eq!(named, 1);

    // What another instance counted is appended when it stops.
    let other = app
        .another_instance(&[("LEDGER_ANONYMOUS_DENIALS_PER_SECOND", "1")])
        .await;
    hammer(other.url.clone(), 30).await;
    assert!(other.terminate().success());
    let (single_after, held_after, summaries_after) =
        anonymous_refusals(&app.audit_entries().await);
    assert_eq!(single_after + held_after, 41 + 30);
    assert!(held_after > held, "{held_after}");
    assert!(summaries_after > summaries);
    app.assert_audit_valid().await;
}
both!(
    anonymous_refusals_beyond_the_budget_are_counted,
    [("LEDGER_ANONYMOUS_DENIALS_PER_SECOND", "1")]
);
