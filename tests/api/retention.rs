//! Retention: the policy, sweeps, legal holds, crash safety.

use std::collections::HashSet;

use serde_json::{json, Value};
use transfer_ledger::auth::Role;

use crate::both;
use crate::helpers::*;

/// A CDR that occurred ten days ago and was kept one day: expired.
fn expired(carrier: &str, call: &str, caller: &str) -> Value {
    let mut t = cdr(carrier, call, caller, "+14255550199");
    t["occurred_at"] = json!((chrono::Utc::now() - chrono::Duration::days(10)).to_rfc3339());
    t["retention_days"] = json!(1);
    t
}

impl TestApp {
    fn sweeper(&self) -> String {
        self.token(Role::RetentionSweeper, None)
    }

    /// `POST /v1/retention/sweeps` as the sweeper, answered with `status`.
    async fn sweep_now(&self, status: u16) -> Reply {
        self.post("/v1/retention/sweeps", &self.sweeper(), &json!({}))
            .await
            .expect(status)
    }

    /// A dry run, as the sweeper; its report.
    async fn dry_run(&self) -> Reply {
        self.post(
            "/v1/retention/sweeps",
            &self.sweeper(),
            &json!({"dry_run": true}),
        )
        .await
        .expect(201)
    }

    async fn ids_left(&self) -> HashSet<String> {
        let items = self
            .all_pages("/v1/transfers?limit=1000", &self.officer())
            .await;
        items
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_string())
            .collect()
    }

    /// Records `n` expired CDRs at `carrier`, calls `{prefix}{i}`, callers
    /// +1425555 followed by `first + i` in four digits; their ids.
    async fn expired_calls(
        &self,
        carrier: &str,
        prefix: &str,
        first: usize,
        n: usize,
    ) -> Vec<String> {
        self.batch(
            (0..n)
                .map(|i| {
                    expired(
                        carrier,
                        &format!("{prefix}{i}"),
                        &format!("+1425555{:04}", first + i),
                    )
                })
                .collect(),
        )
        .await
    }

    /// Places a legal hold as a privacy officer; the hold as answered.
    pub(crate) async fn hold(&self, hold: Value) -> Value {
        self.post("/v1/holds", &self.officer(), &hold)
            .await
            .expect(201)
            .body
    }
}

async fn the_policy_in_force_is_shown(app: TestApp) {
    let r = app
        .get("/v1/retention/policy", &app.officer())
        .await
        .expect(200);
    assert_eq!(r.body["categories"]["call_detail_record"], 180);
    assert_eq!(r.body["jurisdictions"]["US"]["call_detail_record"], 548);
}
both!(the_policy_in_force_is_shown);

#[tokio::test]
async fn an_invalid_policy_stops_the_service_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/policies");
    for f in ["model.conf", "policy.csv"] {
        std::fs::copy(format!("{src}/{f}"), dir.path().join(f)).unwrap();
    }
    std::fs::write(
        dir.path().join("retention.toml"),
        "[categories]\nnumber_assignment = 30\ncall_detail_record = 30\ncall_quality = -1\ncall_duration = 30\n",
    )
    .unwrap();
    let extra = [(
        "LEDGER_POLICY_DIR".to_string(),
        dir.path().display().to_string(),
    )]
    .into_iter()
    .collect();
    let err = tokio::spawn(spawn_app_with(Backend::Sqlite, extra))
        .await
        .err()
        .expect("start refused");
    let msg = err
        .into_panic()
        .downcast::<String>()
        .map(|s| *s)
        .unwrap_or_default();
    assert!(msg.contains("retention.toml line 4"), "{msg}");
}

async fn sweeps_delete_what_expired_and_keep_what_is_held(app: TestApp) {
    // Given expired records of two carriers, one of them under a legal hold,
    // and records still within retention.
    let gone = app
        .batch(
            (0..30)
                .map(|i| expired("carrier-a", &format!("a{i}"), &format!("+142555501{i:02}")))
                .collect(),
        )
        .await;
    let held = app
        .batch(
            (0..10)
                .map(|i| expired("carrier-h", &format!("h{i}"), &format!("+142555503{i:02}")))
                .collect(),
        )
        .await;
    let kept = app
        .batch(
            (0..5)
                .map(|i| {
                    cdr(
                        "carrier-a",
                        &format!("k{i}"),
                        "+14255550400",
                        "+14255550401",
                    )
                })
                .collect(),
        )
        .await;
    let officer = app.officer();
    let hold = app
        .hold(json!({"carrier_id": "carrier-h", "reason": "litigation L-7"}))
        .await;
    let keys_before = app.count("subject_keys").await;

    // A dry run reports what would go and changes nothing.
    let dry = app.dry_run().await;
    assert_eq!(
        (
            dry.body["examined"].clone(),
            dry.body["deleted"].clone(),
            dry.body["held"].clone()
        ),
        (json!(40), json!(30), json!(10))
    );
    // 30 callers of carrier-a and their common callee have nothing else: 31 keys would go.
    assert_eq!(dry.body["keys_shredded"], 31);
    assert_eq!(app.count("transfers").await, 45);

    // The sweep deletes exactly the expired, unheld records and their keys.
    // Its body is optional: none at all runs a sweep that deletes.
    let r = app
        .raw(
            app.client
                .post(format!("{}/v1/retention/sweeps", app.addr))
                .bearer_auth(app.sweeper()),
        )
        .await
        .expect(201);
    assert_eq!(
        (
            r.body["deleted"].clone(),
            r.body["held"].clone(),
            r.body["keys_shredded"].clone()
        ),
        (json!(30), json!(10), json!(31))
    );
    assert_eq!(r.body["dry_run"], false);
    let left = app.ids_left().await;
    assert!(gone.iter().all(|id| !left.contains(id)));
    assert!(held.iter().chain(&kept).all(|id| left.contains(id)));
    assert_eq!(app.count("subject_keys").await, keys_before - 31);
    assert_eq!(app.count("transfer_slots").await, 30);
    // The deleted records' slots and lookup rows went with them (on
    // PostgreSQL the sweep deletes them itself and the delete trigger
    // stands aside), and no other record's.
    app.assert_no_orphans().await;
    assert_eq!(
        app.scalar("SELECT COUNT(*) FROM transfers t WHERE NOT EXISTS (SELECT 1 FROM subject_lookup l WHERE l.transfer_id = t.id)")
            .await,
        0,
        "a record kept lost its lookup rows"
    );

    // Released, the held records go with the next sweep.
    let id = hold["id"].as_str().unwrap();
    let released = app
        .raw(
            app.client
                .delete(format!("{}/v1/holds/{id}", app.addr))
                .bearer_auth(&officer),
        )
        .await;
    assert_eq!(released.status, 200, "{}", released.text);
    assert_eq!(released.body["active"], false);
    let r = app
        .post(
            "/v1/retention/sweeps",
            &app.sweeper(),
            &json!({"dry_run": false}),
        )
        .await
        .expect(201);
    assert_eq!(r.body["deleted"], 10);
    assert_eq!(app.ids_left().await, kept.iter().cloned().collect());

    // Sweeps are listed and audited; the chain verifies.
    let list = app.get("/v1/retention/sweeps", &officer).await.expect(200);
    assert_eq!(list.body.as_array().unwrap().len(), 3);
    // Page by page (Link headers), each once, newest first; dry runs and
    // sweeps that deleted apart.
    let pages = app
        .linked_pages("/v1/retention/sweeps?limit=2", &officer)
        .await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [2, 1]);
    assert_eq!(pages.concat(), *list.body.as_array().unwrap());
    let real = app
        .linked_pages("/v1/retention/sweeps?dry_run=false&limit=1", &officer)
        .await;
    assert_eq!(real.len(), 2);
    assert!(real.iter().flatten().all(|s| s["dry_run"] == false));
    let dry_runs = app
        .get("/v1/retention/sweeps?dry_run=true", &officer)
        .await
        .expect(200);
    assert_eq!(dry_runs.body[0]["id"], dry.body["id"]);
    assert_eq!(dry_runs.body.as_array().unwrap().len(), 1);
    let r = app
        .get("/v1/retention/sweeps?dry_run=1&cursor=%3D", &officer)
        .await
        .expect(422);
    let mut bad = r.bad_fields();
    bad.sort();
    assert_eq!(bad, ["cursor", "dry_run"]);
    // Whether a sweep deletes is never left to a default: null is refused.
    let r = app
        .post(
            "/v1/retention/sweeps",
            &app.token(Role::RetentionSweeper, None),
            &json!({"dry_run": null}),
        )
        .await
        .expect(422);
    assert_eq!(r.bad_fields(), ["dry_run"]);
    let auditor = app.token(Role::Auditor, None);
    let entries = app
        .get("/v1/audit?action=retention.sweep&limit=10", &auditor)
        .await
        .expect(200);
    assert_eq!(entries.body["items"].as_array().unwrap().len(), 3);
    let batches = app
        .get("/v1/audit?action=retention.sweep.batch&limit=100", &auditor)
        .await
        .expect(200);
    let deleted: usize = batches.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            e["entry"]["target"]["deleted_ids"]
                .as_array()
                .unwrap()
                .len()
        })
        .sum();
    assert_eq!(deleted, 40);
    app.assert_audit_valid().await;
}
both!(sweeps_delete_what_expired_and_keep_what_is_held);

async fn holds_match_by_subject_and_category_and_are_validated(app: TestApp) {
    let officer = app.officer();
    app.batch(vec![
        expired("carrier-a", "s1", "+14255550111"),
        expired("carrier-a", "s2", "+14255550112"),
        {
            let mut q = quality("carrier-a", "s3", "+14255550113", "+14255550199");
            q["occurred_at"] =
                json!((chrono::Utc::now() - chrono::Duration::days(10)).to_rfc3339());
            q["retention_days"] = json!(1);
            q
        },
    ])
    .await;
    // Held by subject (any spelling) and by category.
    app.hold(json!({"subject": {"phone_number": "+1 425 555 0111"}, "reason": "DSAR dispute"}))
        .await;
    let h = app
        .hold(json!({"category": "call_quality", "reason": "regulator inquiry"}))
        .await;
    assert_eq!(h["category"], "call_quality");
    assert!(h["subject_index"].is_null());
    let r = app.sweep_now(201).await;
    assert_eq!(
        (r.body["deleted"].clone(), r.body["held"].clone()),
        (json!(1), json!(2))
    );

    // Bad holds: every field named; a hold must say what it holds.
    let r = app
        .post(
            "/v1/holds",
            &officer,
            &json!({"category": "x", "subject": {"phone_number": "1"}, "extra": 1}),
        )
        .await
        .expect(422);
    let mut f = r.bad_fields();
    f.sort();
    assert_eq!(f, ["category", "extra", "reason", "subject.phone_number"]);
    app.post("/v1/holds", &officer, &json!({"reason": "everything"}))
        .await
        .expect(422);
    // Only privacy officers place holds; auditors read them.
    app.post(
        "/v1/holds",
        &app.carrier("carrier-a"),
        &json!({"carrier_id": "carrier-a", "reason": "x"}),
    )
    .await
    .expect(403);
    let listed = app
        .get("/v1/holds?active=true", &app.token(Role::Auditor, None))
        .await
        .expect(200);
    assert_eq!(listed.body.as_array().unwrap().len(), 2);
    // Releasing twice, or an unknown hold.
    let id = h["id"].as_str().unwrap();
    let del = |id: String| {
        app.raw(
            app.client
                .delete(format!("{}/v1/holds/{id}", app.addr))
                .bearer_auth(&officer),
        )
    };
    assert_eq!(del(id.into()).await.status, 200);
    assert_eq!(del(id.into()).await.status, 409);
    assert_eq!(del(uuid::Uuid::now_v7().to_string()).await.status, 404);
    // Listed in force, released, or all.
    let auditor = app.token(Role::Auditor, None);
    let ids = |path: &'static str| {
        let (app, auditor) = (&app, auditor.clone());
        async move {
            let r = app.get(path, &auditor).await.expect(200);
            r.body
                .as_array()
                .unwrap()
                .iter()
                .map(|h| h["id"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(ids("/v1/holds?active=false").await, [id]);
    assert_eq!(ids("/v1/holds?active=true").await.len(), 1);
    assert_eq!(ids("/v1/holds").await.len(), 2);
}
both!(holds_match_by_subject_and_category_and_are_validated);

async fn one_sweep_at_a_time(app: TestApp) {
    // Another process holds the sweep lock.
    use transfer_ledger::storage::{retention, Db};
    let other = Db::connect(&app.vars["LEDGER_DATABASE_URL"], 2)
        .await
        .unwrap();
    let lock = retention::try_lock(&other, 0)
        .await
        .unwrap()
        .expect("free at first");
    let r = app.sweep_now(409).await;
    assert!(r.body["detail"]
        .as_str()
        .unwrap()
        .contains("already running"));
    // The CLI beside the server is refused the same way.
    let out = app.cli(&["sweep"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already running"));
    lock.release().await;
    app.sweep_now(201).await;
}
both!(one_sweep_at_a_time);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_sweeps_on_its_schedule() {
    let extra = [("LEDGER_SWEEP_INTERVAL".to_string(), "1s".to_string())]
        .into_iter()
        .collect();
    let app = spawn_app_with(Backend::Sqlite, extra).await.unwrap();
    app.batch(vec![expired("carrier-a", "x", "+14255550100")])
        .await;
    for _ in 0..50 {
        if app.count("transfers").await == 0 {
            let sweeps = app
                .get("/v1/retention/sweeps", &app.officer())
                .await
                .expect(200);
            assert_eq!(sweeps.body[0]["started_by"], "scheduler");
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the scheduled sweep did not run");
}

/// Small batches walk past held records by their cursor: batches made only
/// of held records, and held records between expired ones, neither stop the
/// sweep nor get deleted.
async fn batches_walk_past_held_records(app: TestApp) {
    let mut records = Vec::new();
    for i in 0..4 {
        records.push(expired("carrier-h", &format!("h{i}"), "+14255559999"));
    }
    for i in 0..8 {
        records.push(expired(
            "carrier-a",
            &format!("a{i}"),
            &format!("+142555501{i:02}"),
        ));
        records.push(expired("carrier-h", &format!("g{i}"), "+14255559999"));
    }
    let ids = app.batch(records).await;
    let (held, gone): (Vec<_>, Vec<_>) = ids
        .iter()
        .enumerate()
        .partition(|(n, _)| *n < 4 || n % 2 == 1);
    app.hold(json!({"carrier_id": "carrier-h", "reason": "litigation"}))
        .await;

    let status = app
        .cli_spawn(&["sweep"], &[("LEDGER_SWEEP_BATCH", "3")])
        .wait()
        .unwrap();
    assert!(status.success());
    let left = app.ids_left().await;
    assert!(
        gone.iter().all(|(_, id)| !left.contains(*id)),
        "an expired record outlived the sweep"
    );
    assert_eq!(
        left,
        held.iter()
            .map(|(_, id)| (*id).clone())
            .collect::<HashSet<_>>()
    );
}
both!(batches_walk_past_held_records);

/// Sweep batches, erasure steps and a subject's reads run in transactions
/// planned as index probes on PostgreSQL; relaxed ones also skip the WAL
/// wait, read ones are read-only; none plans parallel workers. On SQLite
/// they are plain transactions.
async fn batch_transactions_are_planned_as_probes(app: TestApp) {
    use transfer_ledger::storage::{Db, Tx};
    let db = Db::connect(&app.vars["LEDGER_DATABASE_URL"], 2)
        .await
        .unwrap();
    for kind in ["probes", "relaxed", "read"] {
        let tx = match kind {
            "probes" => db.begin_probes().await,
            "relaxed" => db.begin_relaxed().await,
            _ => db.begin_read_probes().await,
        };
        match tx.unwrap() {
            Tx::Postgres(mut t) => {
                let (hash, merge, seq, parallel, sync, read_only): (
                    String,
                    String,
                    String,
                    String,
                    String,
                    String,
                ) = sqlx::query_as(
                    "SELECT current_setting('enable_hashjoin'), current_setting('enable_mergejoin'),
                                current_setting('enable_seqscan'), current_setting('max_parallel_workers_per_gather'),
                                current_setting('synchronous_commit'), current_setting('transaction_read_only')",
                    )
                    .fetch_one(&mut *t)
                    .await
                    .unwrap();
                assert_eq!(
                    (
                        hash.as_str(),
                        merge.as_str(),
                        seq.as_str(),
                        parallel.as_str()
                    ),
                    ("off", "off", "off", "0"),
                    "{kind}"
                );
                assert_eq!(
                    sync == "off",
                    kind == "relaxed",
                    "{kind}: synchronous_commit {sync}"
                );
                assert_eq!(
                    read_only == "on",
                    kind == "read",
                    "{kind}: read only {read_only}"
                );
                t.rollback().await.unwrap();
            }
            Tx::Sqlite(mut t) => {
                let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM transfers")
                    .fetch_one(&mut *t)
                    .await
                    .unwrap();
                assert_eq!(n, 0);
                t.rollback().await.unwrap();
            }
        }
    }
    // The settings end with the transaction.
    if let Db::Postgres(pool) = &db {
        let hash: String = sqlx::query_scalar("SELECT current_setting('enable_hashjoin')")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(hash, "on");
    }
}
both!(batch_transactions_are_planned_as_probes);

/// Kill a sweep with SIGKILL at random instants, many times: a rerun
/// finishes the job, exactly the unexpired and held records are left, and
/// nothing is deleted, counted or audited twice.
async fn sweeps_survive_being_killed_at_any_instant(app: TestApp) {
    let expired_ids = app
        .batch(
            (0..1500)
                .map(|i| {
                    expired(
                        "carrier-a",
                        &format!("e{i}"),
                        &format!("+1425555{:04}", i % 700),
                    )
                })
                .collect(),
        )
        .await;
    let held = app
        .batch(
            (0..40)
                .map(|i| expired("carrier-h", &format!("h{i}"), "+14255559999"))
                .collect(),
        )
        .await;
    let kept = app
        .batch(
            (0..60)
                .map(|i| {
                    cdr(
                        "carrier-a",
                        &format!("k{i}"),
                        &format!("+1425555{:04}", i),
                        "+14255550199",
                    )
                })
                .collect(),
        )
        .await;
    app.hold(json!({"carrier_id": "carrier-h", "reason": "litigation"}))
        .await;
    let keys_before = app.count("subject_keys").await;

    let mut kills = 0;
    for round in 0..12u64 {
        let mut child = app.cli_spawn(&["sweep"], &[("LEDGER_SWEEP_BATCH", "5")]);
        // Somewhere between start-up and the end of the job.
        let delay = 15 + (round * 7919 % 23) * 6;
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        if child.try_wait().unwrap().is_none() {
            std::process::Command::new("kill")
                .args(["-KILL", &child.id().to_string()])
                .status()
                .unwrap();
            kills += 1;
        }
        child.wait().unwrap();
    }
    assert!(
        kills >= 3,
        "the sweeps finished before they could be killed"
    );
    let out = app.cli(&["sweep"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let left = app.ids_left().await;
    let expected: HashSet<String> = held.iter().chain(&kept).cloned().collect();
    assert_eq!(
        left, expected,
        "exactly the unexpired and held records are left"
    );

    // Every expired record deleted once, counted once, audited once.
    let auditor = app.token(Role::Auditor, None);
    let sweeps = app
        .get("/v1/retention/sweeps?limit=1000", &auditor)
        .await
        .expect(200);
    let total = |field: &str| -> i64 {
        sweeps
            .body
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s[field].as_i64().unwrap())
            .sum()
    };
    assert_eq!(total("deleted"), expired_ids.len() as i64);
    let audited: Vec<String> = app
        .all_pages(
            "/v1/audit?action=retention.sweep.batch&limit=1000",
            &auditor,
        )
        .await
        .iter()
        .flat_map(|e| {
            e["entry"]["target"]["deleted_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
        })
        .collect();
    let unique: HashSet<_> = audited.iter().cloned().collect();
    assert_eq!(unique.len(), audited.len(), "no record audited twice");
    assert_eq!(unique, expired_ids.iter().cloned().collect::<HashSet<_>>());
    app.assert_audit_valid().await;

    // Keys of the deleted-only subjects are gone (a sweep killed before
    // its key check leaves the next one to walk every key), each counted
    // and audited once; every remaining slot still opens.
    assert_eq!(
        app.unused_keys().await,
        0,
        "keys left with nothing to decrypt"
    );
    let shredded = keys_before - app.count("subject_keys").await;
    assert!(shredded >= 600, "only {shredded} keys went");
    assert_eq!(total("keys_shredded"), shredded);
    let audited: i64 = app
        .all_pages("/v1/audit?action=retention.sweep.keys&limit=1000", &auditor)
        .await
        .iter()
        .map(|e| e["entry"]["target"]["keys_shredded"].as_i64().unwrap())
        .sum();
    assert_eq!(audited, shredded);
    app.read("/v1/transfers?include=payload&limit=1000", &app.officer())
        .await
        .expect(200);
}
both!(sweeps_survive_being_killed_at_any_instant);

/// Records deleted outside the service (an operator's own `DELETE`) still
/// take their slots and lookup rows with them: SQLite's foreign keys
/// cascade, and on PostgreSQL the row trigger of migration 0018 fires
/// because nothing said the children were deleted already.
async fn records_deleted_by_hand_take_their_slots_and_lookup_rows(app: TestApp) {
    app.expired_calls("carrier-o", "o", 5000, 20).await;
    let lookups = app.count("subject_lookup").await;
    let gone = app
        .exec(
            "DELETE FROM transfers WHERE id IN (SELECT id FROM transfers ORDER BY id LIMIT 5)",
            None,
            None,
        )
        .await;
    assert_eq!(gone, 5);
    app.assert_no_orphans().await;
    assert!(app.count("subject_lookup").await < lookups);
    assert_eq!(app.count("transfers").await, 15);
}
both!(records_deleted_by_hand_take_their_slots_and_lookup_rows);

/// A sweep checks the keys of what it deletes after its last batch. One
/// that stopped before that check leaves its row marked (`keys_pending`),
/// and the next sweep, with nothing of its own to delete, walks every key
/// and destroys those left with nothing to decrypt, once.
async fn a_sweep_finishes_the_key_check_of_one_that_stopped_before_it(app: TestApp) {
    app.expired_calls("carrier-o", "o", 6000, 30).await;
    let keys = app.count("subject_keys").await;
    // As if a sweep had committed its batches and then been killed.
    app.exec("DELETE FROM transfers", None, None).await;
    assert_eq!(app.unused_keys().await, keys);
    let stopped = uuid::Uuid::now_v7();
    app.exec(
        "INSERT INTO sweeps (id, dry_run, status, examined, deleted, held, keys_shredded, cutoff, started_at, started_by, keys_pending)
         VALUES ($1, false, 'interrupted', 30, 30, 0, 0, 0, 0, 'killed', true)",
        None,
        Some(stopped),
    )
    .await;

    // A dry run says so, and changes nothing.
    let dry = app.dry_run().await;
    assert_eq!(dry.body["keys_shredded"], keys);
    assert_eq!(app.count("subject_keys").await, keys);

    let r = app.sweep_now(201).await;
    assert_eq!(
        (r.body["deleted"].clone(), r.body["keys_shredded"].clone()),
        (json!(0), json!(keys))
    );
    assert_eq!(app.count("subject_keys").await, 0);
    let pending = app
        .scalar("SELECT COUNT(*) FROM sweeps WHERE keys_pending")
        .await;
    assert_eq!(pending, 0, "the key check is still marked pending");
    // Done once: the next sweep has nothing to walk.
    let r = app.sweep_now(201).await;
    assert_eq!(r.body["keys_shredded"], 0);
    app.assert_audit_valid().await;
}
both!(a_sweep_finishes_the_key_check_of_one_that_stopped_before_it);

/// A subject key left unused that another transaction holds locked when the
/// sweep checks it (on PostgreSQL, a writer sealing under it or a rewrap;
/// the sweep does not wait for either) is not forgotten: the sweep checks it
/// again a few times, and if it is still locked, the next sweep checks
/// every key.
async fn a_key_locked_during_the_sweep_is_destroyed_by_the_next(app: TestApp) {
    app.expired_calls("carrier-l", "l", 6000, 30).await;
    let keys = app.count("subject_keys").await;
    let locker = match app.backend {
        Backend::Postgres => {
            let mut tx = app.db().begin().await.unwrap();
            if let transfer_ledger::storage::Tx::Postgres(t) = &mut tx {
                sqlx::query("SELECT id FROM subject_keys FOR KEY SHARE")
                    .execute(&mut **t)
                    .await
                    .unwrap();
            }
            Some(tx)
        }
        // One writer at a time: nothing else can hold a key meanwhile.
        Backend::Sqlite => None,
    };
    let first = app.sweep_now(201).await;
    assert_eq!(first.body["deleted"], 30);
    let locked = if locker.is_some() { keys } else { 0 };
    assert_eq!(first.body["keys_shredded"], keys - locked);
    assert_eq!(app.unused_keys().await, locked);
    if let Some(tx) = locker {
        drop(tx); // rolled back
    }

    let next = app.sweep_now(201).await;
    assert_eq!(next.body["keys_shredded"], locked);
    assert_eq!(
        app.unused_keys().await,
        0,
        "keys with nothing to decrypt are left"
    );
    let pending = app
        .scalar("SELECT COUNT(*) FROM sweeps WHERE keys_pending")
        .await;
    assert_eq!(pending, 0);
    app.assert_audit_valid().await;
}
both!(a_key_locked_during_the_sweep_is_destroyed_by_the_next);

/// A hold placed while a sweep batch is in flight: once its 201 is back,
/// every record it covers that is still there survives the sweep. (On
/// PostgreSQL the batch is stalled before its delete, after choosing its
/// records, to hold that window open: the hold waits for the batch.)
async fn a_hold_placed_during_a_sweep_protects_what_is_left(app: TestApp) {
    app.expired_calls("carrier-h", "h", 3000, 200).await;
    if app.backend == Backend::Postgres {
        // Between the batch's choice of records and its audit entry (which
        // would serialize it with the hold's own entry anyway).
        app.exec(
            "CREATE FUNCTION stall_sweep() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(1); RETURN NULL; END; $$",
            None,
            None,
        )
        .await;
        app.exec(
            "CREATE TRIGGER stall_sweep BEFORE DELETE ON transfers FOR EACH STATEMENT EXECUTE FUNCTION stall_sweep()",
            None,
            None,
        )
        .await;
    }
    let sweep = app.post_in_background("/v1/retention/sweeps", &app.sweeper(), &json!({}));
    // Into the first batch (50 records), then the hold.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    app.hold(json!({"carrier_id": "carrier-h", "reason": "litigation L-9"}))
        .await;
    let there_at_201 = app.ids_left().await;
    let report = sweep.await.unwrap().body;
    // The report counts what the hold kept, though it came mid-sweep.
    assert_eq!(report["held"], there_at_201.len(), "{report}");
    assert_eq!(report["deleted"], 200 - there_at_201.len(), "{report}");
    let left = app.ids_left().await;
    assert!(
        there_at_201.is_subset(&left),
        "{} records deleted after the hold was placed",
        there_at_201.difference(&left).count()
    );
    if app.backend == Backend::Postgres {
        // The hold came during the stalled first batch: the rest is held.
        assert_eq!(there_at_201.len(), 150);
    }
}
both!(
    a_hold_placed_during_a_sweep_protects_what_is_left,
    [("LEDGER_SWEEP_BATCH", "50")]
);

/// A batch that keeps the holds lock (an instance frozen mid-sweep) makes
/// placing a hold answer 503 within its bounded wait, leaving no statement
/// queued for the lock that would hold up every other batch; once the
/// batch ends, the hold goes in.
async fn a_hold_behind_a_stuck_batch_is_refused_and_leaves_nothing_waiting(app: TestApp) {
    if app.backend != Backend::Postgres {
        return;
    }
    let transfer_ledger::storage::Db::Postgres(pool) = app.db() else {
        unreachable!()
    };
    // The shared lock a sweep or erasure batch takes ("tlho").
    const HOLDS: i32 = 0x746c_686f;
    let take_shared = "SELECT pg_advisory_xact_lock_shared($1, hashtext(current_schema()))";
    let mut stuck = pool.begin().await.unwrap();
    sqlx::query(take_shared)
        .bind(HOLDS)
        .execute(&mut *stuck)
        .await
        .unwrap();

    let started = std::time::Instant::now();
    let body = json!({"carrier_id": "carrier-a", "reason": "litigation L-10"});
    let r = app
        .post("/v1/holds", &app.officer(), &body)
        .await
        .expect(503);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(40),
        "waited {:?}",
        started.elapsed()
    );
    assert_eq!(r.headers["retry-after"], "5");
    assert!(
        r.body["detail"].as_str().unwrap().contains("not placed"),
        "{}",
        r.text
    );
    // Nothing queued behind the stuck batch: another batch gets the shared
    // lock at once.
    let mut other = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL lock_timeout = 1000")
        .execute(&mut *other)
        .await
        .unwrap();
    sqlx::query(take_shared)
        .bind(HOLDS)
        .execute(&mut *other)
        .await
        .expect("a refused hold left a statement waiting for the lock");
    other.rollback().await.unwrap();
    let holds = app.get("/v1/holds", &app.officer()).await.expect(200);
    assert_eq!(holds.body.as_array().unwrap().len(), 0, "{}", holds.text);

    stuck.rollback().await.unwrap();
    app.hold(body).await;
}
both!(a_hold_behind_a_stuck_batch_is_refused_and_leaves_nothing_waiting);

/// A sweep that fails (here the database refuses its deletes) answers 500,
/// is marked `interrupted` with the time it stopped instead of staying
/// `running`, and the next sweep finishes its job.
async fn a_failed_sweep_is_marked_interrupted_and_the_next_finishes(app: TestApp) {
    app.expired_calls("carrier-a", "f", 4000, 5).await;
    let (create, drop) = match app.backend {
        Backend::Sqlite => (
            vec!["CREATE TRIGGER refuse BEFORE DELETE ON transfers BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"],
            "DROP TRIGGER refuse",
        ),
        Backend::Postgres => (
            vec![
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'refused by the test'; END; $$",
                "CREATE TRIGGER refuse BEFORE DELETE ON transfers FOR EACH STATEMENT EXECUTE FUNCTION refuse()",
            ],
            "DROP TRIGGER refuse ON transfers",
        ),
    };
    for sql in create {
        app.exec(sql, None, None).await;
    }
    let failed = app.sweep_now(500).await;
    assert!(
        !failed.text.contains("refused by the test"),
        "{}",
        failed.text
    );
    let sweeps = app
        .get("/v1/retention/sweeps", &app.officer())
        .await
        .expect(200)
        .body;
    assert_eq!(sweeps[0]["status"], "interrupted", "{sweeps}");
    assert!(sweeps[0]["finished_at"].is_string(), "{sweeps}");
    assert_eq!(app.ids_left().await.len(), 5);

    app.exec(drop, None, None).await;
    let done = app.sweep_now(201).await.body;
    assert_eq!(done["deleted"], 5, "{done}");
    assert!(app.ids_left().await.is_empty());
}
both!(a_failed_sweep_is_marked_interrupted_and_the_next_finishes);

/// A sweeper frozen while it holds the sweep lock (its process paused, not
/// dead, so its connection and the lock outlive it) is taken over once its
/// lease is stale: the next sweep ends its lock connection and finishes the
/// job, and the frozen sweep, were it to resume, finds itself interrupted.
/// While the lease is fresh, a second sweep is refused as before.
async fn a_frozen_sweeper_is_taken_over_once_its_lease_is_stale(app: TestApp) {
    use transfer_ledger::storage::{micros, retention as store};
    if app.backend != Backend::Postgres {
        return;
    }
    app.expired_calls("carrier-a", "z", 5000, 5).await;
    let transfer_ledger::storage::Db::Postgres(pool) = app.db() else {
        unreachable!()
    };
    // The frozen sweeper: the lock on a connection of its own, and its
    // running sweep with its lease and that connection's backend.
    let mut frozen = pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1, hashtext(current_schema()))")
        .bind(0x746c_7377_i32)
        .execute(&mut *frozen)
        .await
        .unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *frozen)
        .await
        .unwrap();
    let stale = uuid::Uuid::now_v7();
    let now = micros(chrono::Utc::now());
    sqlx::query(
        "INSERT INTO sweeps (id, dry_run, status, examined, deleted, held, keys_shredded, cutoff, started_at, started_by, renewed_at, lock_pid)
         VALUES ($1, false, 'running', 0, 0, 0, 0, $2, $2, 'frozen', $2, $3)",
    )
    .bind(stale)
    .bind(now)
    .bind(pid)
    .execute(pool)
    .await
    .unwrap();

    // Fresh lease: refused, and the holder untouched.
    app.sweep_now(409).await;
    sqlx::query("SELECT 1").execute(&mut *frozen).await.unwrap();

    // A batch in flight: its lease renewed but not committed yet, the
    // committed one stale. Not taken over: the takeover waits for the
    // batch and then finds the lease fresh.
    let stale_lease = "UPDATE sweeps SET renewed_at = $1 WHERE id = $2";
    sqlx::query(stale_lease)
        .bind(now - 30_000_000)
        .bind(stale)
        .execute(pool)
        .await
        .unwrap();
    let mut batch = pool.begin().await.unwrap();
    sqlx::query(stale_lease)
        .bind(micros(chrono::Utc::now()))
        .bind(stale)
        .execute(&mut *batch)
        .await
        .unwrap();
    let second = app.post_in_background("/v1/retention/sweeps", &app.sweeper(), &json!({}));
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    batch.commit().await.unwrap();
    second.await.unwrap().expect(409);
    sqlx::query("SELECT 1").execute(&mut *frozen).await.unwrap();

    // Stale lease (older than the 10 s claim timeout): taken over.
    sqlx::query("UPDATE sweeps SET renewed_at = $1 WHERE id = $2")
        .bind(now - 30_000_000)
        .bind(stale)
        .execute(pool)
        .await
        .unwrap();
    let done = app.sweep_now(201).await.body;
    assert_eq!(done["deleted"], 5, "{done}");
    assert!(
        sqlx::query("SELECT 1").execute(&mut *frozen).await.is_err(),
        "the frozen holder's lock connection was ended"
    );
    let sweeps = app
        .get("/v1/retention/sweeps", &app.officer())
        .await
        .expect(200)
        .body;
    let old = sweeps
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == stale.to_string())
        .unwrap();
    assert_eq!(old["status"], "interrupted", "{sweeps}");
    // Resumed, the frozen sweep's next batch finds its lease gone.
    let mut tx = app.db().begin().await.unwrap();
    assert!(
        !store::renew_sweep(&mut tx, stale, micros(chrono::Utc::now()), None)
            .await
            .unwrap()
    );
}
both!(
    a_frozen_sweeper_is_taken_over_once_its_lease_is_stale,
    [("LEDGER_CLAIM_TIMEOUT", "10s")]
);
