//! `spawn_app` and typed helpers shared by the API tests.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine;
use reqwest::{Client, Response, StatusCode};
use secrecy::SecretString;
use serde_json::{json, Value};
use tempfile::TempDir;
use transfer_ledger::auth::{Role, TokenIssuer};
use transfer_ledger::storage::Db;
use transfer_ledger::{AppState, Application, Config};

pub const JWT_SECRET: &str = "test-secret-test-secret-test-secret-0123456789";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A loopback port free at the moment of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A service process started by [`TestApp::another_instance`].
pub struct Instance {
    pub url: String,
    child: std::process::Child,
}

impl Instance {
    /// SIGTERM, and waits for the process to finish and exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: signals our own child, which has not been waited for.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        self.child.wait().unwrap()
    }

    /// SIGKILL: the process gets no chance to finish anything.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The PostgreSQL server tests run against.
pub fn postgres_url() -> String {
    std::env::var("LEDGER_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Whether PostgreSQL is reachable. Under `CI=true` an unreachable server
/// fails the run instead of skipping its tests.
async fn postgres_available() -> bool {
    static CHECKED: OnceLock<bool> = OnceLock::new();
    if let Some(ok) = CHECKED.get() {
        return *ok;
    }
    let ok = sqlx::PgPool::connect(&postgres_url())
        .await
        .map(drop)
        .is_ok();
    if !ok {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!(
                "PostgreSQL is not reachable at {} and CI=true",
                postgres_url()
            );
        }
        eprintln!(
            "SKIPPING PostgreSQL tests: {} is not reachable",
            postgres_url()
        );
    }
    *CHECKED.get_or_init(|| ok)
}

pub struct TestApp {
    pub addr: String,
    pub client: Client,
    pub backend: Backend,
    pub state: AppState,
    _dir: TempDir,
    issuer: TokenIssuer,
    schema: Option<String>,
    pub vars: HashMap<String, String>,
}

/// Starts the service on a fresh database of `backend`; `None` when
/// PostgreSQL is unavailable outside CI.
pub async fn spawn_app(backend: Backend) -> Option<TestApp> {
    spawn_app_with(backend, HashMap::new()).await
}

pub async fn spawn_app_with(backend: Backend, extra: HashMap<String, String>) -> Option<TestApp> {
    let dir = tempfile::tempdir().unwrap();
    let (db_url, schema) = match backend {
        Backend::Sqlite => (
            format!("sqlite://{}", dir.path().join("ledger.db").display()),
            None,
        ),
        Backend::Postgres => {
            if !postgres_available().await {
                return None;
            }
            let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
            let admin = sqlx::PgPool::connect(&postgres_url()).await.unwrap();
            sqlx::query(&format!("CREATE SCHEMA {schema}"))
                .execute(&admin)
                .await
                .unwrap();
            admin.close().await;
            let sep = if postgres_url().contains('?') {
                '&'
            } else {
                '?'
            };
            (
                format!("{}{sep}options=-c%20search_path%3D{schema}", postgres_url()),
                Some(schema),
            )
        }
    };
    let master = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
    let mut vars: HashMap<String, String> = [
        ("LEDGER_DATA_DIR", dir.path().display().to_string()),
        ("LEDGER_DATABASE_URL", db_url.clone()),
        ("LEDGER_LISTEN", "127.0.0.1:0".into()),
        ("LEDGER_MASTER_KEY", master),
        ("LEDGER_JWT_SECRET", JWT_SECRET.into()),
        (
            "LEDGER_POLICY_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/policies").into(),
        ),
        ("LEDGER_SWEEP_INTERVAL", "0".into()),
        ("LEDGER_DB_MAX_CONNECTIONS", "8".into()),
        ("LEDGER_CONTROLLER_NAME", "Example Platform Ltd".into()),
        ("LEDGER_DPO_CONTACT", "dpo@example.com".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    vars.extend(extra);
    let config = Config::from_lookup(|k| vars.get(k).cloned()).unwrap();
    let app = Application::build(config).await.expect("service starts");
    let addr = format!("http://127.0.0.1:{}", app.port());
    let state = app.state().clone();
    tokio::spawn(app.run_until(std::future::pending()));
    Some(TestApp {
        addr,
        client: Client::new(),
        backend,
        state,
        _dir: dir,
        issuer: TokenIssuer::hs256(
            &SecretString::from(JWT_SECRET),
            "transfer-ledger",
            "transfer-ledger",
        ),
        schema,
        vars,
    })
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(schema) = self.schema.take() {
            // Best effort: a fresh runtime, since Drop cannot await.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    if let Ok(pool) = sqlx::PgPool::connect(&postgres_url()).await {
                        let _ = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
                            .execute(&pool)
                            .await;
                    }
                });
            })
            .join();
        }
    }
}

/// Runs a test body on SQLite and on PostgreSQL.
#[macro_export]
macro_rules! both {
    ($name:ident) => {
        $crate::both!($name, [("", ""); 0]);
    };
    // With extra environment for the service: `[("LEDGER_…", "value"), …]`.
    ($name:ident, $env:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            fn env() -> std::collections::HashMap<String, String> {
                $env.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                if let Some(app) =
                    $crate::helpers::spawn_app_with($crate::helpers::Backend::Sqlite, env()).await
                {
                    super::$name(app).await
                }
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(app) =
                    $crate::helpers::spawn_app_with($crate::helpers::Backend::Postgres, env()).await
                {
                    super::$name(app).await
                }
            }
        }
    };
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Reply {
    async fn from(r: Response) -> Self {
        let status = r.status();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Self {
            status,
            headers,
            body,
            text,
        }
    }

    /// The fields named by a 422 problem, as `index:field` or `field`.
    pub fn bad_fields(&self) -> Vec<String> {
        self.body["errors"]
            .as_array()
            .map(|errs| {
                errs.iter()
                    .map(|e| match e["index"].as_u64() {
                        Some(i) => format!("{i}:{}", e["field"].as_str().unwrap()),
                        None => e["field"].as_str().unwrap().to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    #[track_caller]
    pub fn expect(self, status: u16) -> Self {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected status; body: {}",
            self.text
        );
        self
    }
}

impl TestApp {
    pub fn token(&self, role: Role, carrier: Option<&str>) -> String {
        let sub = format!("{role}-{}", carrier.unwrap_or("x"));
        self.issuer
            .issue(&sub, role, carrier, std::time::Duration::from_secs(600))
            .unwrap()
    }

    /// Every item of a keyset-paginated listing (`path` already has a query).
    pub async fn all_pages(&self, path: &str, token: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = match &cursor {
                Some(c) => format!("{path}&cursor={c}"),
                None => path.to_string(),
            };
            let r = self.get(&page, token).await.expect(200);
            out.extend(r.body["items"].as_array().unwrap().iter().cloned());
            match r.body["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.into()),
                None => return out,
            }
        }
    }

    /// The pages of a listing answered as a JSON array, following its
    /// `Link: <…>; rel="next"` headers.
    pub async fn linked_pages(&self, path: &str, token: &str) -> Vec<Vec<Value>> {
        let mut pages = Vec::new();
        let mut next = Some(path.to_string());
        while let Some(path) = next {
            let r = self.get(&path, token).await.expect(200);
            pages.push(r.body.as_array().unwrap().clone());
            next = r.headers.get("link").map(|l| {
                let l = l.to_str().unwrap();
                assert!(l.ends_with(">; rel=\"next\""), "{l}");
                l[1..l.find('>').unwrap()].to_string()
            });
        }
        pages
    }

    pub fn dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    /// Runs the binary with this app's configuration and waits.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.cli_command(args, &[]).output().unwrap()
    }

    /// Runs the binary and requires success; its standard output.
    #[track_caller]
    pub fn cli_ok(&self, args: &[&str]) -> Vec<u8> {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    pub fn cli_spawn(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Child {
        self.cli_command(args, env)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    }

    /// Another instance of the service, a process on the same database,
    /// once it answers `/readyz`; killed when dropped.
    pub async fn another_instance(&self, env: &[(&str, &str)]) -> Instance {
        let listen = format!("127.0.0.1:{}", free_port());
        let mut env = env.to_vec();
        env.push(("LEDGER_LISTEN", &listen));
        let child = self.cli_spawn(&["serve"], &env);
        let instance = Instance {
            url: format!("http://{listen}"),
            child,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !self
            .client
            .get(format!("{}/readyz", instance.url))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the other instance never became ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        instance
    }

    fn cli_command(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Command {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_transfer-ledger"));
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in &self.vars {
            c.env(k, v);
        }
        for (k, v) in env {
            c.env(k, v);
        }
        c.args(args);
        c
    }

    /// Records transfers as the platform in one batch; their ids, in order.
    pub async fn batch(&self, items: Vec<Value>) -> Vec<String> {
        let r = self
            .post(
                "/v1/transfers/batch",
                &self.platform(),
                &json!({"transfers": items}),
            )
            .await
            .expect(201);
        r.body["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    }

    pub fn platform(&self) -> String {
        self.token(Role::Platform, None)
    }
    pub fn officer(&self) -> String {
        self.token(Role::PrivacyOfficer, None)
    }
    pub fn carrier(&self, id: &str) -> String {
        self.token(Role::Carrier, Some(id))
    }

    pub async fn get(&self, path: &str, token: &str) -> Reply {
        let r = self
            .client
            .get(format!("{}{path}", self.addr))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        Reply::from(r).await
    }

    /// A decrypting read with an access reason.
    pub async fn read(&self, path: &str, token: &str) -> Reply {
        let r = self
            .client
            .get(format!("{}{path}", self.addr))
            .bearer_auth(token)
            .header("X-Access-Reason", "ticket PRIV-42")
            .send()
            .await
            .unwrap();
        Reply::from(r).await
    }

    pub async fn post(&self, path: &str, token: &str, body: &Value) -> Reply {
        let r = self
            .client
            .post(format!("{}{path}", self.addr))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .unwrap();
        Reply::from(r).await
    }

    /// A POST left running while the test goes on; its reply from the
    /// handle.
    pub fn post_in_background(
        &self,
        path: &str,
        token: &str,
        body: &Value,
    ) -> tokio::task::JoinHandle<Reply> {
        let req = self
            .client
            .post(format!("{}{path}", self.addr))
            .bearer_auth(token)
            .json(body);
        tokio::spawn(async move { Reply::from(req.send().await.unwrap()).await })
    }

    /// The audit chain verifies (as an auditor).
    /// No slot and no lookup row is left of a record that is gone.
    pub async fn assert_no_orphans(&self) {
        for child in ["transfer_slots", "subject_lookup"] {
            let orphans = self
                .scalar(&format!(
                    "SELECT COUNT(*) FROM {child} WHERE transfer_id NOT IN (SELECT id FROM transfers)"
                ))
                .await;
            assert_eq!(orphans, 0, "{child} rows of deleted records are left");
        }
    }

    /// Subject keys with nothing left to decrypt: no slot and no consent
    /// uses them.
    pub async fn unused_keys(&self) -> i64 {
        self.scalar(
            "SELECT COUNT(*) FROM subject_keys k
             WHERE NOT EXISTS (SELECT 1 FROM transfer_slots s WHERE s.subject_key_id = k.id)
               AND NOT EXISTS (SELECT 1 FROM consents c WHERE c.subject_key_id = k.id)",
        )
        .await
    }

    pub async fn assert_audit_valid(&self) {
        let v = self
            .get("/v1/audit/verify", &self.token(Role::Auditor, None))
            .await
            .expect(200);
        assert_eq!(v.body["valid"], true, "{}", v.text);
    }

    pub async fn raw(&self, req: reqwest::RequestBuilder) -> Reply {
        Reply::from(req.send().await.unwrap()).await
    }

    pub fn db(&self) -> &Db {
        &self.state.db
    }

    /// Registers an active customer-operator consent.
    pub async fn consent(&self, reference: &str, carrier: &str, tenant: &str, countries: &[&str]) {
        self.post(
            "/v1/consents",
            &self.platform(),
            &json!({"reference": reference, "kind": "customer_operator", "carrier_id": carrier,
                    "customer_tenant_id": tenant, "countries": countries, "granted_at": "2026-01-01T00:00:00Z"}),
        )
        .await
        .expect(201);
    }

    /// Counts rows of a table, straight from the database.
    pub async fn count(&self, table: &str) -> i64 {
        self.scalar(&format!("SELECT COUNT(*) FROM {table}")).await
    }

    /// The one BIGINT a query returns.
    pub async fn scalar(&self, sql: &str) -> i64 {
        match self.db() {
            Db::Sqlite { read, .. } => sqlx::query_scalar(sql).fetch_one(read).await.unwrap(),
            Db::Postgres(p) => sqlx::query_scalar(sql).fetch_one(p).await.unwrap(),
        }
    }

    /// A `BEFORE INSERT` row trigger named `name` on `table`, for fault
    /// injection: `sqlite_body` holds the SQLite trigger's statements,
    /// `pg_body` the PL/pgSQL body of the PostgreSQL trigger function
    /// (both may use `NEW`).
    pub async fn before_insert_trigger(
        &self,
        name: &str,
        table: &str,
        sqlite_body: &str,
        pg_body: &str,
    ) {
        match self.db() {
            Db::Sqlite { write, .. } => {
                sqlx::query(&format!(
                    "CREATE TRIGGER {name} BEFORE INSERT ON {table} BEGIN {sqlite_body} END"
                ))
                .execute(write)
                .await
                .unwrap();
            }
            Db::Postgres(p) => {
                sqlx::query(&format!(
                    "CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN {pg_body} END; $$"
                ))
                .execute(p)
                .await
                .unwrap();
                sqlx::query(&format!(
                    "CREATE TRIGGER {name} BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION {name}()"
                ))
                .execute(p)
                .await
                .unwrap();
            }
        }
    }

    /// Runs a statement straight on the database (tamper tests).
    pub async fn exec(&self, sql: &str, blob: Option<Vec<u8>>, id: Option<uuid::Uuid>) -> u64 {
        match self.db() {
            Db::Sqlite { write, .. } => {
                let mut q = sqlx::query(sql);
                if let Some(b) = blob.clone() {
                    q = q.bind(b);
                }
                if let Some(i) = id {
                    q = q.bind(i);
                }
                q.execute(write).await.unwrap().rows_affected()
            }
            Db::Postgres(p) => {
                let mut q = sqlx::query(sql);
                if let Some(b) = blob {
                    q = q.bind(b);
                }
                if let Some(i) = id {
                    q = q.bind(i);
                }
                q.execute(p).await.unwrap().rows_affected()
            }
        }
    }

    /// Every stored value of every table, raw bytes for blobs, for
    /// plaintext scans.
    pub async fn dump(&self) -> Vec<u8> {
        macro_rules! collect {
            ($pool:expr, $sql:expr, $out:expr) => {{
                use sqlx::Row;
                for row in sqlx::query($sql).fetch_all($pool).await.unwrap() {
                    for i in 0..row.columns().len() {
                        if let Ok(Some(b)) = row.try_get::<Option<Vec<u8>>, _>(i) {
                            $out.extend(b);
                        } else if let Ok(Some(s)) = row.try_get::<Option<String>, _>(i) {
                            $out.extend(s.into_bytes());
                        } else if let Ok(Some(n)) = row.try_get::<Option<i64>, _>(i) {
                            $out.extend(n.to_string().into_bytes());
                        } else if let Ok(Some(u)) = row.try_get::<Option<uuid::Uuid>, _>(i) {
                            $out.extend(u.to_string().into_bytes());
                        }
                        $out.push(b'|');
                    }
                }
            }};
        }
        let mut out = Vec::new();
        for table in [
            "keyring",
            "subject_keys",
            "transfers",
            "transfer_slots",
            "subject_lookup",
            "consents",
            "audit_log",
        ] {
            let sql = format!("SELECT * FROM {table}");
            match self.db() {
                Db::Sqlite { read, .. } => collect!(read, &sql, out),
                Db::Postgres(p) => collect!(p, &sql, out),
            }
        }
        out
    }
}

/// A valid transfer of each category, for carrier `carrier`.
pub fn cdr(carrier: &str, call_id: &str, caller: &str, callee: &str) -> Value {
    json!({
        "carrier_id": carrier, "direction": "platform_to_carrier", "category": "call_detail_record",
        "purpose": "troubleshooting", "legal_basis": "legitimate_interest", "jurisdiction": "FR",
        "occurred_at": "2026-11-01T10:02:00Z",
        "payload": {"call_id": call_id, "caller": caller, "callee": callee,
                    "start_time": "2026-11-01T10:00:00Z", "end_time": "2026-11-01T10:01:40Z",
                    "duration_seconds": 100, "call_direction": "outbound", "disconnect_reason": "normal call clearing"}
    })
}

pub fn quality(carrier: &str, call_id: &str, caller: &str, callee: &str) -> Value {
    json!({
        "carrier_id": carrier, "direction": "platform_to_carrier", "category": "call_quality",
        "purpose": "service_operation", "legal_basis": "legitimate_interest", "jurisdiction": "DE",
        "occurred_at": "2026-11-01T10:03:00Z",
        "payload": {"call_id": call_id, "caller": caller, "callee": callee, "mos": 4.2, "jitter_ms": 12.5,
                    "packet_loss_pct": 0.3, "round_trip_ms": 80, "codec": "SILK"}
    })
}

pub fn duration(carrier: &str, call_id: &str, caller: &str, callee: &str) -> Value {
    json!({
        "carrier_id": carrier, "direction": "carrier_to_platform", "category": "call_duration",
        "purpose": "reconciliation", "legal_basis": "contract", "jurisdiction": "US",
        "occurred_at": "2026-11-01T10:05:00Z",
        "payload": {"call_id": call_id, "caller": caller, "callee": callee,
                    "start_time": "2026-11-01T10:00:00Z", "duration_seconds": 100}
    })
}

pub fn assignment(carrier: &str, consent: &str, tenant: &str, phone: &str, sip: &str) -> Value {
    json!({
        "carrier_id": carrier, "direction": "platform_to_carrier", "category": "number_assignment",
        "purpose": "service_provisioning", "legal_basis": "contract", "jurisdiction": "FR",
        "consent": {"reference": consent},
        "occurred_at": "2026-11-01T09:00:00Z",
        "payload": {"phone_number": phone, "sip_uri": sip, "customer_tenant_id": tenant,
                    "action": "assigned", "effective_at": "2026-11-01T09:00:00Z"}
    })
}
