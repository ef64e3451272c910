//! `transfer-ledger bench`: every figure next to an honest baseline measured
//! in the same run on the same machine.
//!
//! The service runs as a child process (`serve`) on a fresh database, so its
//! peak RSS is its own; the bench drives it over loopback HTTP.

mod workload;

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine;
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use secrecy::SecretString;
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::QueryBuilder;

use crate::auth::{Role, TokenIssuer};
use crate::storage::{on_db, on_tx, Db};

#[derive(Debug, Clone)]
pub struct BenchArgs {
    pub records: usize,
    pub database_url: Option<String>,
    pub json: Option<PathBuf>,
    pub batch: usize,
    pub concurrency: usize,
    /// Records of the one subject whose export is measured.
    pub export_records: usize,
}

/// The JSON report; keys are part of the bench's contract. Figures of
/// features not built yet are `null`.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub records: usize,
    pub ingest_per_s: f64,
    pub baseline_insert_per_s: f64,
    pub ingest_ratio: f64,
    pub subject_lookup_p50_ms: f64,
    pub subject_lookup_p99_ms: f64,
    pub log_page_p99_ms: f64,
    pub export_records: Option<u64>,
    pub export_seconds: Option<f64>,
    pub export_peak_rss_mb: Option<f64>,
    pub access_request_p50_ms: Option<f64>,
    pub erasure_request_p50_ms: Option<f64>,
    pub sweep_per_s: Option<f64>,
    pub baseline_delete_per_s: f64,
    pub sweep_ratio: Option<f64>,
    pub reconcile_pairs: Option<u64>,
    pub reconcile_seconds: Option<f64>,
    pub server_peak_rss_mb: f64,
    /// Issue 4's baseline, printed in the table but not a key of the JSON
    /// (its keys are issue 8's): records per second of a raw `DELETE` of
    /// the rows the sweep deleted, from a copy of the service's own tables.
    #[serde(skip)]
    pub raw_delete: Option<RawDelete>,
}

/// A raw delete of the sweep's rows from a copy of the service's tables.
#[derive(Debug, Clone, Copy)]
pub struct RawDelete {
    /// Records deleted (each with its slots and lookup rows).
    pub records: u64,
    pub per_s: f64,
}

struct Server {
    child: std::process::Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Resident set size of the service process now, in MiB.
    fn rss_mb(&self) -> f64 {
        self.status_kb("VmRSS:") / 1024.0
    }

    fn status_kb(&self, field: &str) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    }

    /// Peak resident set size of the service process, in MiB.
    fn peak_rss_mb(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN)
    }
}

fn progress(len: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} ({per_sec}, {eta})")
            .expect("template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn timed_sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    v
}

/// A fresh database for the service and one for the baseline.
struct Databases {
    service_url: String,
    baseline_url: String,
    /// Where the service's records are copied before the sweep, for the
    /// raw delete of the same rows.
    copy_url: String,
    schemas: Vec<String>,
    admin_url: Option<String>,
    _dir: tempfile::TempDir,
}

impl Databases {
    async fn create(url: Option<&str>) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        match url {
            None => Ok(Self {
                service_url: format!("sqlite://{}", dir.path().join("ledger.db").display()),
                baseline_url: format!("sqlite://{}", dir.path().join("baseline.db").display()),
                copy_url: format!("sqlite://{}", dir.path().join("raw-delete.db").display()),
                schemas: Vec::new(),
                admin_url: None,
                _dir: dir,
            }),
            Some(url) => {
                anyhow::ensure!(
                    url.starts_with("postgres"),
                    "--database-url must be a postgres:// URL"
                );
                let id = uuid::Uuid::new_v4().simple().to_string();
                let schemas = vec![
                    format!("bench_{}", &id[..12]),
                    format!("baseline_{}", &id[..12]),
                    format!("rawdelete_{}", &id[..12]),
                ];
                let admin = sqlx::PgPool::connect(url)
                    .await
                    .context("cannot connect to --database-url")?;
                for s in &schemas {
                    sqlx::query(&format!("CREATE SCHEMA {s}"))
                        .execute(&admin)
                        .await?;
                }
                admin.close().await;
                let sep = if url.contains('?') { '&' } else { '?' };
                let with = |s: &str| format!("{url}{sep}options=-c%20search_path%3D{s}");
                Ok(Self {
                    service_url: with(&schemas[0]),
                    baseline_url: with(&schemas[1]),
                    copy_url: with(&schemas[2]),
                    schemas,
                    admin_url: Some(url.to_string()),
                    _dir: dir,
                })
            }
        }
    }

    async fn drop_schemas(&self) {
        if let Some(url) = &self.admin_url {
            if let Ok(admin) = sqlx::PgPool::connect(url).await {
                for s in &self.schemas {
                    let _ = sqlx::query(&format!("DROP SCHEMA {s} CASCADE"))
                        .execute(&admin)
                        .await;
                }
            }
        }
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(args.records >= 100, "--records must be at least 100");
    let dbs = Databases::create(args.database_url.as_deref()).await?;
    let result = run_on(&args, &dbs).await;
    dbs.drop_schemas().await;
    result
}

async fn run_on(args: &BenchArgs, dbs: &Databases) -> anyhow::Result<Report> {
    let now = chrono::Utc::now();
    eprintln!("generating a workload of {} transfers", args.records);
    let work = workload::generate(args.records, 42, now);
    let records = work.transfers.len();

    // The service, as a child process on a random loopback port.
    let secret = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
    let master = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = std::process::Command::new(std::env::current_exe()?)
        .arg("serve")
        .env("LEDGER_DATA_DIR", dbs._dir.path())
        .env("LEDGER_DATABASE_URL", &dbs.service_url)
        .env("LEDGER_LISTEN", format!("127.0.0.1:{port}"))
        .env("LEDGER_MASTER_KEY", &master)
        .env("LEDGER_JWT_SECRET", &secret)
        .env("LEDGER_SWEEP_INTERVAL", "0")
        .env("LEDGER_REQUEST_TIMEOUT", "10m")
        .env(
            "RUST_LOG",
            std::env::var("LEDGER_BENCH_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("cannot start the service")?;
    let server = Server {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency * 2)
        .build()?;
    wait_ready(&client, &server.url).await?;

    let issuer = TokenIssuer::hs256(
        &SecretString::from(secret),
        "transfer-ledger",
        "transfer-ledger",
    );
    let ttl = Duration::from_secs(24 * 3600);
    let platform = issuer.issue("bench-platform", Role::Platform, None, ttl)?;
    let officer = issuer.issue("bench-officer", Role::PrivacyOfficer, None, ttl)?;
    let carrier_tokens: Vec<String> = workload::CARRIERS
        .iter()
        .map(|(c, _)| issuer.issue(&format!("bench-{c}"), Role::Carrier, Some(c), ttl))
        .collect::<anyhow::Result<_>>()?;

    for (ci, (carrier, country)) in workload::CARRIERS.iter().enumerate() {
        for t in 0..workload::TENANTS_PER_CARRIER {
            let body = json!({"reference": workload::consent_ref(ci, t), "kind": "customer_operator",
                "carrier_id": carrier, "customer_tenant_id": workload::tenant_id(ci, t),
                "countries": [country], "granted_at": "2020-01-01T00:00:00Z"});
            let r = client
                .post(format!("{}/v1/consents", server.url))
                .bearer_auth(&platform)
                .json(&body)
                .send()
                .await?;
            anyhow::ensure!(
                r.status().is_success(),
                "consent registration failed: {}",
                r.text().await?
            );
        }
    }

    // Batches, serialized before the clock starts: platform flows, and each
    // carrier's own flow under its own token.
    let mut batches: Vec<(String, String, usize)> = Vec::new();
    let mut by_submitter: Vec<(String, Vec<&Value>)> = vec![(platform.clone(), Vec::new())];
    for token in &carrier_tokens {
        by_submitter.push((token.clone(), Vec::new()));
    }
    for (from_carrier, t) in &work.transfers {
        let idx = if *from_carrier {
            1 + workload::CARRIERS
                .iter()
                .position(|(c, _)| t["carrier_id"] == *c)
                .expect("known carrier")
        } else {
            0
        };
        by_submitter[idx].1.push(t);
    }
    let mut raw_rows: Vec<(String, i64, i64, String)> = Vec::with_capacity(records);
    for (token, items) in &by_submitter {
        for chunk in items.chunks(args.batch) {
            let body = json!({"transfers": chunk}).to_string();
            batches.push((token.clone(), body, chunk.len()));
            for t in chunk {
                let occurred =
                    chrono::DateTime::parse_from_rfc3339(t["occurred_at"].as_str().expect("time"))?
                        .timestamp_micros();
                let retain = if t.get("retention_days").is_some() {
                    occurred + 86_400_000_000
                } else {
                    i64::MAX
                };
                raw_rows.push((
                    t["carrier_id"].as_str().expect("carrier").to_string(),
                    occurred,
                    retain,
                    t.to_string(),
                ));
            }
        }
    }

    // 1. Ingest through the service.
    let service_db = Db::connect(&dbs.service_url, 1).await?;
    let wal_before = wal_position(&service_db).await?;
    let pb = progress(records as u64, "ingest");
    let queue = Arc::new(Mutex::new(batches.into_iter().collect::<VecDeque<_>>()));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        let (queue, client, url, pb) = (
            queue.clone(),
            client.clone(),
            server.url.clone(),
            pb.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let Some((token, body, n)) = queue.lock().expect("queue").pop_front() else {
                    return Ok(());
                };
                let r = client
                    .post(format!("{url}/v1/transfers/batch"))
                    .bearer_auth(token)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await?;
                if r.status() != 201 {
                    anyhow::bail!("batch refused: {} {}", r.status(), r.text().await?);
                }
                pb.inc(n as u64);
            }
        }));
    }
    for w in workers {
        w.await??;
    }
    let ingest_secs = started.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let metrics = client
        .get(format!("{}/metrics", server.url))
        .send()
        .await?
        .text()
        .await?;
    let audit_secs = metric(&metrics, "ledger_audit_append_seconds_sum").unwrap_or(f64::NAN);
    eprintln!(
        "audit appends took {:.3} s of {:.1} s of ingest ({:.2}% of wall time)",
        audit_secs,
        ingest_secs,
        100.0 * audit_secs / ingest_secs
    );
    let ingest_per_s = records as f64 / ingest_secs;
    let service_work = Work::since(&service_db, wal_before).await?;
    service_db.close().await;

    // 2. The baseline: the same JSON into a plain table, fastest plain sqlx way.
    let baseline = Db::connect(&dbs.baseline_url, 4).await?;
    let (baseline_insert_per_s, baseline_delete_per_s, baseline_work) =
        baseline_run(&baseline, &raw_rows, args.batch, now.timestamp_micros()).await?;
    baseline.close().await;
    eprintln!(
        "storage per record after ingest: service {}, baseline {}",
        service_work.describe(records),
        baseline_work.describe(records)
    );

    // 3. Subject lookups: metadata pages by blind index.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut subjects: Vec<&str> = work.subscribers.iter().map(|s| s.number.as_str()).collect();
    subjects.shuffle(&mut rng);
    let mut lookups = Vec::new();
    for s in subjects.iter().cycle().take(300) {
        let t = Instant::now();
        let r = client
            .get(format!("{}/v1/transfers", server.url))
            .query(&[("subject", *s), ("limit", "100")])
            .bearer_auth(&officer)
            .send()
            .await?;
        anyhow::ensure!(r.status() == 200, "lookup failed: {}", r.status());
        r.bytes().await?;
        lookups.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let lookups = timed_sorted(lookups);
    let (guessed, locked) = standalone_appends(&client, &server.url, &metrics).await?;
    eprintln!(
        "the lookups' audit entries: {guessed} appended in one statement, {locked} under the cursor's lock"
    );

    // 4. A filtered page of 100 deep into the log.
    let service_db = Db::connect(&dbs.service_url, 2).await?;
    let mut pages = Vec::new();
    for i in 0..100 {
        let carrier = workload::CARRIERS[i % workload::CARRIERS.len()].0;
        // About half way down the carrier's call detail records.
        let depth = records / workload::CARRIERS.len() / 3 / 2 + i * 3;
        let Some(cursor) = cursor_at(&service_db, carrier, depth as i64).await? else {
            continue;
        };
        let t = Instant::now();
        let r = client
            .get(format!("{}/v1/transfers", server.url))
            .query(&[
                ("carrier_id", carrier),
                ("category", "call_detail_record"),
                ("limit", "100"),
                ("cursor", &cursor),
            ])
            .bearer_auth(&officer)
            .send()
            .await?;
        anyhow::ensure!(r.status() == 200, "log page failed: {}", r.status());
        r.bytes().await?;
        pages.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    service_db.close().await;
    let pages = timed_sorted(pages);

    // 5. Data-subject requests: 20 subjects with 10 records each for the
    // access and erasure latencies, and one heavy subject for the export.
    let fr = workload::CARRIERS
        .iter()
        .position(|(c, _)| *c == "carrier-fr")
        .expect("carrier-fr");
    let carrier_fr = &carrier_tokens[fr];
    let mut small = Vec::new();
    for i in 0..40 {
        let number = workload::dedicated_number(i);
        post_batches(
            &client,
            &server.url,
            &platform,
            workload::calls_of(fr, &number, 10, &work.subscribers, i as u64, now),
            args.batch,
        )
        .await?;
        small.push(number);
    }
    let mut access = Vec::new();
    let mut erasure = Vec::new();
    for (i, number) in small.iter().enumerate() {
        let kind = if i < 20 { "access" } else { "erasure" };
        let started = Instant::now();
        request_until_done(&client, &server.url, carrier_fr, kind, number).await?;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        if i < 20 {
            access.push(ms)
        } else {
            erasure.push(ms)
        }
    }
    let (access, erasure) = (timed_sorted(access), timed_sorted(erasure));

    let heavy = workload::dedicated_number(999);
    let export_records = args.export_records.min(args.records);
    eprintln!("ingesting {export_records} records of one subject for the export");
    post_batches(
        &client,
        &server.url,
        &platform,
        workload::calls_of(fr, &heavy, export_records, &work.subscribers, 999, now),
        args.batch,
    )
    .await?;
    // Forget the peak so far (ingest): measure the export's own.
    let rss_before_export = server.rss_mb();
    eprintln!(
        "server memory before the export: anonymous {:.0} MiB, file-backed {:.0} MiB, shared {:.0} MiB",
        server.status_kb("RssAnon:") / 1024.0,
        server.status_kb("RssFile:") / 1024.0,
        server.status_kb("RssShmem:") / 1024.0
    );
    let _ = std::fs::write(format!("/proc/{}/clear_refs", server.child.id()), "5");
    let started = Instant::now();
    let id = request_until_done(&client, &server.url, carrier_fr, "access", &heavy).await?;
    let r = client
        .get(format!("{}/v1/subject-requests/{id}/export", server.url))
        .bearer_auth(carrier_fr)
        .send()
        .await?;
    anyhow::ensure!(r.status() == 200, "export download failed: {}", r.status());
    let mut bytes = 0usize;
    let mut stream = r.bytes_stream();
    while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
        bytes += chunk?.len();
    }
    let export_seconds = started.elapsed().as_secs_f64();
    let export_peak_rss_mb = server.peak_rss_mb();
    eprintln!(
        "export of {export_records} records: {bytes} bytes in {export_seconds:.1} s; server RSS {rss_before_export:.0} MiB before, peak {export_peak_rss_mb:.0} MiB during"
    );

    // 6. Reconciliation of every carrier's calls over the whole period.
    let started = Instant::now();
    let mut pairs = 0u64;
    for (carrier, _) in workload::CARRIERS {
        let r = client
            .get(format!("{}/v1/reconciliation", server.url))
            .query(&[
                ("carrier_id", *carrier),
                ("limit", "1"),
                ("tolerance_seconds", "0"),
            ])
            .bearer_auth(&officer)
            .send()
            .await?;
        anyhow::ensure!(
            r.status() == 200,
            "reconciliation failed: {}",
            r.text().await?
        );
        let v: Value = r.json().await?;
        pairs += v["matched"].as_u64().unwrap_or(0) + v["mismatched"].as_u64().unwrap_or(0);
    }
    let reconcile_seconds = started.elapsed().as_secs_f64();

    // 7. The retention sweep: about half the calls were kept one day. Its
    // rows are copied first, for issue 4's raw delete of the same rows.
    copy_records(dbs).await?;
    let sweeper = issuer.issue("bench-sweeper", Role::RetentionSweeper, None, ttl)?;
    let started = Instant::now();
    let r = client
        .post(format!("{}/v1/retention/sweeps", server.url))
        .bearer_auth(&sweeper)
        .json(&json!({"dry_run": false}))
        .send()
        .await?;
    anyhow::ensure!(r.status() == 201, "sweep failed: {}", r.text().await?);
    let sweep: Value = r.json().await?;
    let sweep_secs = started.elapsed().as_secs_f64();
    let sweep_per_s = sweep["deleted"].as_f64().unwrap_or(0.0) / sweep_secs;
    eprintln!(
        "sweep deleted {} records in {:.1} s",
        sweep["deleted"], sweep_secs
    );

    let copy = Db::connect(&dbs.copy_url, 1).await?;
    let raw = raw_delete(&copy, crate::storage::micros(chrono::Utc::now())).await?;
    copy.close().await;
    eprintln!(
        "raw delete of the same rows from a copy of the service's tables: {} records in {:.1} s",
        raw.records,
        raw.records as f64 / raw.per_s
    );
    if Some(raw.records) != sweep["deleted"].as_u64() {
        eprintln!(
            "warning: the raw delete took {} records, the sweep {}: their rates do not compare",
            raw.records, sweep["deleted"]
        );
    }

    let report = Report {
        records,
        ingest_per_s,
        baseline_insert_per_s,
        ingest_ratio: ingest_per_s / baseline_insert_per_s,
        subject_lookup_p50_ms: percentile(&lookups, 0.50),
        subject_lookup_p99_ms: percentile(&lookups, 0.99),
        log_page_p99_ms: percentile(&pages, 0.99),
        baseline_delete_per_s,
        sweep_per_s: Some(sweep_per_s),
        export_records: Some(export_records as u64),
        reconcile_pairs: Some(pairs),
        reconcile_seconds: Some(reconcile_seconds),
        export_seconds: Some(export_seconds),
        export_peak_rss_mb: Some(export_peak_rss_mb),
        access_request_p50_ms: Some(percentile(&access, 0.5)),
        erasure_request_p50_ms: Some(percentile(&erasure, 0.5)),
        sweep_ratio: Some(sweep_per_s / baseline_delete_per_s),
        server_peak_rss_mb: server.peak_rss_mb(),
        raw_delete: Some(raw),
    };
    let _ = work.call_pairs;
    Ok(report)
}

async fn post_batches(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    items: Vec<Value>,
    batch: usize,
) -> anyhow::Result<()> {
    for chunk in items.chunks(batch) {
        let r = client
            .post(format!("{url}/v1/transfers/batch"))
            .bearer_auth(token)
            .json(&json!({"transfers": chunk}))
            .send()
            .await?;
        anyhow::ensure!(r.status() == 201, "batch refused: {}", r.text().await?);
    }
    Ok(())
}

/// Posts a subject request and polls until it is completed; returns its id.
async fn request_until_done(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    kind: &str,
    number: &str,
) -> anyhow::Result<String> {
    let body =
        json!({"kind": kind, "carrier_id": "carrier-fr", "subject": {"phone_number": number}});
    let r = client
        .post(format!("{url}/v1/subject-requests"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await?;
    anyhow::ensure!(r.status() == 202, "request refused: {}", r.text().await?);
    let id = r.json::<Value>().await?["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    // The service answers once the request completes (`Prefer: wait`),
    // so the client does not poll.
    let deadline = Instant::now() + Duration::from_secs(600);
    while Instant::now() < deadline {
        let v: Value = client
            .get(format!("{url}/v1/subject-requests/{id}"))
            .bearer_auth(token)
            .header("Prefer", "wait=30")
            .send()
            .await?
            .json()
            .await?;
        if v["status"] == "completed" {
            return Ok(id);
        }
    }
    anyhow::bail!("subject request {id} did not complete")
}

async fn wait_ready(client: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if client
            .get(format!("{url}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the service did not become ready")
}

/// The keyset cursor of the `depth`-th newest CDR of `carrier`.
async fn cursor_at(db: &Db, carrier: &str, depth: i64) -> anyhow::Result<Option<String>> {
    let row: Option<(i64, uuid::Uuid)> = on_db!(db, c => {
        sqlx::query_as(
            "SELECT occurred_at, id FROM transfers WHERE carrier_id = $1 AND category = 'call_detail_record'
             ORDER BY occurred_at DESC, id DESC LIMIT 1 OFFSET $2",
        )
        .bind(carrier)
        .bind(depth)
        .fetch_optional(c)
        .await
    })?;
    Ok(row
        .map(|(at, id)| crate::storage::encode_cursor(crate::storage::Listing::Transfers, at, id)))
}

/// Inserts the rows into a plain table (primary key plus one index on
/// carrier and time) in batches, then deletes the expired ones with one
/// range DELETE. Returns rows per second for each, and what the insert
/// stored and wrote.
async fn baseline_run(
    db: &Db,
    rows: &[(String, i64, i64, String)],
    batch: usize,
    now: i64,
) -> anyhow::Result<(f64, f64, Work)> {
    let ddl = [
        "CREATE TABLE baseline_transfers (id BIGINT PRIMARY KEY, carrier_id TEXT NOT NULL, occurred_at BIGINT NOT NULL,
         retain_until BIGINT NOT NULL, body TEXT NOT NULL)",
        "CREATE INDEX baseline_carrier_time ON baseline_transfers (carrier_id, occurred_at)",
        "CREATE INDEX baseline_retain ON baseline_transfers (retain_until)",
    ];
    for sql in ddl {
        on_db!(db, c => sqlx::query(sql).execute(c).await.map(|_| ()))?;
    }
    let wal_before = wal_position(db).await?;
    let pb = progress(rows.len() as u64, "baseline");
    let started = Instant::now();
    match db {
        Db::Sqlite { write, .. } => {
            for (n, chunk) in rows.chunks(batch).enumerate() {
                let mut tx = write.begin().await?;
                for sub in chunk.chunks(crate::storage::MAX_BINDS / 5) {
                    let mut qb = QueryBuilder::<sqlx::Sqlite>::new(
                        "INSERT INTO baseline_transfers (id, carrier_id, occurred_at, retain_until, body) ",
                    );
                    let base = (n * batch) as i64;
                    qb.push_values(sub.iter().enumerate(), |mut b, (i, r)| {
                        b.push_bind(base + i as i64)
                            .push_bind(&r.0)
                            .push_bind(r.1)
                            .push_bind(r.2)
                            .push_bind(&r.3);
                    });
                    qb.build().execute(&mut *tx).await?;
                }
                tx.commit().await?;
                pb.inc(chunk.len() as u64);
            }
        }
        Db::Postgres(pool) => {
            // COPY: the fastest plain way into PostgreSQL.
            let mut next_id = 0i64;
            for chunk in rows.chunks(batch) {
                let mut conn = pool.acquire().await?;
                let mut copy = conn
                    .copy_in_raw("COPY baseline_transfers (id, carrier_id, occurred_at, retain_until, body) FROM STDIN")
                    .await?;
                let mut buf = String::with_capacity(chunk.len() * 700);
                for r in chunk {
                    let body =
                        r.3.replace('\\', "\\\\")
                            .replace('\t', "\\t")
                            .replace('\n', "\\n");
                    buf.push_str(&format!("{next_id}\t{}\t{}\t{}\t{body}\n", r.0, r.1, r.2));
                    next_id += 1;
                }
                copy.send(buf.as_bytes()).await?;
                copy.finish().await?;
                pb.inc(chunk.len() as u64);
            }
        }
    }
    let insert_per_s = rows.len() as f64 / started.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let work = Work::since(db, wal_before).await?;

    let started = Instant::now();
    let deleted = on_db!(db, c => {
        sqlx::query("DELETE FROM baseline_transfers WHERE retain_until < $1").bind(now).execute(c).await.map(|r| r.rows_affected())
    })?;
    let delete_per_s = deleted as f64 / started.elapsed().as_secs_f64();
    Ok((insert_per_s, delete_per_s, work))
}

/// The tables a sweep deletes from, in the order a raw delete empties them.
const SWEPT_TABLES: [&str; 3] = ["subject_lookup", "transfer_slots", "transfers"];

/// Copies the service's records with their slots and lookup rows, and
/// every index on them, into a database of their own, before the sweep
/// deletes them. SQLite: `VACUUM INTO` (the whole database, consistent).
/// PostgreSQL: the three tables recreated `LIKE` the service's, with their
/// indexes, filled, and analyzed so the raw delete gets its best plan. Both
/// copies are freshly packed, which can only make the raw delete faster
/// than a delete from the service's own tables.
async fn copy_records(dbs: &Databases) -> anyhow::Result<()> {
    use sqlx::ConnectOptions;
    use std::str::FromStr;
    eprintln!("copying the service's records, slots and lookup rows for the raw delete");
    // Plain connections: a copy of millions of rows is slow by nature, not
    // worth the service's slow-statement warnings.
    match dbs.schemas.first() {
        None => {
            let path = sqlx::sqlite::SqliteConnectOptions::from_str(&dbs.copy_url)?
                .get_filename()
                .to_path_buf();
            let mut c = sqlx::sqlite::SqliteConnectOptions::from_str(&dbs.service_url)?
                .log_slow_statements(log::LevelFilter::Off, Duration::ZERO)
                .connect()
                .await?;
            sqlx::query("VACUUM INTO $1")
                .bind(path.display().to_string())
                .execute(&mut c)
                .await?;
        }
        Some(service_schema) => {
            let mut c = sqlx::postgres::PgConnectOptions::from_str(&dbs.copy_url)?
                .log_slow_statements(log::LevelFilter::Off, Duration::ZERO)
                .connect()
                .await?;
            for t in SWEPT_TABLES {
                for sql in [
                    format!("CREATE TABLE {t} (LIKE {service_schema}.{t} INCLUDING ALL)"),
                    format!("INSERT INTO {t} SELECT * FROM {service_schema}.{t}"),
                    format!("ANALYZE {t}"),
                ] {
                    sqlx::query(&sql).execute(&mut c).await?;
                }
            }
        }
    }
    Ok(())
}

/// Standalone audit appends since `before` (the server's metrics text):
/// `(guessed, locked)`.
async fn standalone_appends(
    client: &reqwest::Client,
    url: &str,
    before: &str,
) -> anyhow::Result<(u64, u64)> {
    let now = client
        .get(format!("{url}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let count = |text: &str, path: &str| {
        let series = format!("ledger_audit_standalone_appends_total{{path=\"{path}\"}}");
        metric(text, &series).unwrap_or(0.0) as u64
    };
    Ok((
        count(&now, "guessed") - count(before, "guessed"),
        count(&now, "locked") - count(before, "locked"),
    ))
}

/// The value of one series (name and labels, as exported) in a metrics text.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Issue 4's baseline: the expired records, their slots and their lookup
/// rows deleted from the copy with three plain `DELETE`s in one transaction
/// (no holds, no key shredding, no audit, no batches), under the service's
/// own connection settings.
async fn raw_delete(copy: &Db, cutoff: i64) -> anyhow::Result<RawDelete> {
    let started = Instant::now();
    let mut tx = copy.begin().await?;
    let mut records = 0;
    for t in SWEPT_TABLES {
        let sql = if t == "transfers" {
            "DELETE FROM transfers WHERE retain_until < $1".to_string()
        } else {
            format!(
                "DELETE FROM {t} WHERE transfer_id IN (SELECT id FROM transfers WHERE retain_until < $1)"
            )
        };
        records = on_tx!(&mut tx, c => {
            sqlx::query(&sql).bind(cutoff).execute(&mut *c).await.map(|r| r.rows_affected())
        })?;
    }
    tx.commit().await?;
    Ok(RawDelete {
        records,
        per_s: records as f64 / started.elapsed().as_secs_f64(),
    })
}

/// What an ingest left and wrote: the size of the database (tables and
/// their indexes) and, on PostgreSQL, the write-ahead log it generated.
/// Unlike the rates, these do not move with the machine's load: they show
/// how much b-tree a record costs.
struct Work {
    database_bytes: u64,
    wal_bytes: Option<u64>,
}

impl Work {
    async fn since(db: &Db, wal_before: Option<i64>) -> anyhow::Result<Self> {
        let database_bytes: i64 = match db {
            Db::Sqlite { read, .. } => {
                sqlx::query_scalar(
                    "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
                )
                .fetch_one(read)
                .await?
            }
            Db::Postgres(p) => {
                sqlx::query_scalar(
                    "SELECT CAST(COALESCE(SUM(pg_total_relation_size(c.oid)), 0) AS BIGINT) FROM pg_class c
                     WHERE c.relnamespace = CAST(current_schema() AS regnamespace) AND c.relkind = 'r'",
                )
                .fetch_one(p)
                .await?
            }
        };
        let wal_after = wal_position(db).await?;
        Ok(Self {
            database_bytes: database_bytes as u64,
            wal_bytes: wal_before
                .zip(wal_after)
                .map(|(a, b)| (b - a).max(0) as u64),
        })
    }

    fn describe(&self, records: usize) -> String {
        let per = |b: u64| b as f64 / records as f64;
        match self.wal_bytes {
            Some(w) => format!(
                "{:.0} bytes stored, {:.0} bytes of WAL",
                per(self.database_bytes),
                per(w)
            ),
            None => format!("{:.0} bytes stored", per(self.database_bytes)),
        }
    }
}

/// PostgreSQL's current WAL position in bytes (`None` on SQLite). The
/// cluster's, not one schema's: nothing else should run during a bench.
async fn wal_position(db: &Db) -> anyhow::Result<Option<i64>> {
    Ok(match db {
        Db::Sqlite { .. } => None,
        Db::Postgres(p) => Some(
            sqlx::query_scalar(
                "SELECT CAST(pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0') AS BIGINT)",
            )
            .fetch_one(p)
            .await?,
        ),
    })
}

/// The figures as a table, each next to its baseline and target.
pub fn table(r: &Report, backend: &str) -> String {
    let opt = |v: Option<f64>| {
        v.map(|v| format!("{v:.1}"))
            .unwrap_or_else(|| "not built".into())
    };
    let rows = vec![
        ("records", format!("{}", r.records), String::new()),
        (
            "ingest/s",
            format!("{:.0}", r.ingest_per_s),
            format!(
                "baseline {:.0}/s, ratio {:.2} (target ≥ 0.5)",
                r.baseline_insert_per_s, r.ingest_ratio
            ),
        ),
        (
            "subject lookup p50",
            format!("{:.2} ms", r.subject_lookup_p50_ms),
            String::new(),
        ),
        (
            "subject lookup p99",
            format!("{:.2} ms", r.subject_lookup_p99_ms),
            "target < 5 ms".into(),
        ),
        (
            "log page p99",
            format!("{:.2} ms", r.log_page_p99_ms),
            "target < 10 ms".into(),
        ),
        (
            "baseline delete/s",
            format!("{:.0}", r.baseline_delete_per_s),
            String::new(),
        ),
        (
            "sweep/s",
            opt(r.sweep_per_s),
            format!(
                "ratio {} (target ≥ 0.5)",
                r.sweep_ratio.map(|v| format!("{v:.2}")).unwrap_or_default()
            ),
        ),
        (
            "raw delete/s",
            r.raw_delete
                .map(|d| format!("{:.0}", d.per_s))
                .unwrap_or_default(),
            "the sweep's rows from a copy of the service's tables".into(),
        ),
        (
            "sweep ÷ raw delete",
            r.raw_delete
                .zip(r.sweep_per_s)
                .map(|(d, s)| format!("{:.2}", s / d.per_s))
                .unwrap_or_default(),
            "issue 4: target ≥ 0.33 (the sweep at most 3× the raw delete)".into(),
        ),
        (
            "export seconds",
            opt(r.export_seconds),
            format!("{} records", r.export_records.unwrap_or(0)),
        ),
        (
            "export peak RSS",
            opt(r.export_peak_rss_mb),
            "MiB, target < 150 (exports), < 200 (whole service)".into(),
        ),
        (
            "access p50",
            opt(r.access_request_p50_ms),
            "ms, target < 15".into(),
        ),
        (
            "erasure p50",
            opt(r.erasure_request_p50_ms),
            "ms, target < 25".into(),
        ),
        (
            "reconcile seconds",
            opt(r.reconcile_seconds),
            format!(
                "{} pairs, target < 20 s for 1M",
                r.reconcile_pairs.unwrap_or(0)
            ),
        ),
        (
            "server peak RSS",
            format!("{:.0} MiB", r.server_peak_rss_mb),
            "target < 200 MiB".into(),
        ),
    ];
    let mut out = format!("transfer-ledger bench on {backend}\n");
    for (k, v, note) in rows {
        out.push_str(&format!("  {k:<22} {v:>14}   {note}\n"));
    }
    out
}
