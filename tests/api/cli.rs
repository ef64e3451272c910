//! The binary: first start with no configuration, tokens, migrate, SIGTERM.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::{free_port, postgres_url};

const BIN: &str = env!("CARGO_BIN_EXE_transfer-ledger");

/// A command with a clean environment: no LEDGER_* from the caller.
fn ledger(dir: &std::path::Path) -> Command {
    let mut c = Command::new(BIN);
    c.current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info");
    c
}

/// Runs a subcommand in `dir` and returns its standard output; it must succeed.
fn run_ok(dir: &std::path::Path, args: &[&str]) -> Vec<u8> {
    let out = ledger(dir).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

async fn wait_ready(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if reqwest::get(format!("{url}/readyz"))
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("server at {url} never became ready");
}

#[tokio::test]
async fn first_start_with_no_configuration_then_sigterm() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut server = ledger(dir.path())
        .env("LEDGER_LISTEN", format!("127.0.0.1:{port}"))
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    wait_ready(&url).await;

    // The embedded default: ./ledger-data with the database and 0600 secrets.
    let data = dir.path().join("ledger-data");
    assert!(data.join("ledger.db").is_file());
    for secret in ["master.key", "jwt.secret"] {
        let mode = std::fs::metadata(data.join(secret))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{secret}");
    }

    // Nothing audited yet: the chain is valid, empty, with no head.
    let v: serde_json::Value =
        serde_json::from_slice(&run_ok(dir.path(), &["audit", "verify"])).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"valid": true, "entries": 0, "head": null})
    );

    // A token from the CLI, run from the same directory, is accepted.
    let out = run_ok(dir.path(), &["token", "issue", "--role", "platform"]);
    let token = String::from_utf8(out).unwrap().trim().to_string();
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{url}/v1/transfers"))
        .bearer_auth(&token)
        .json(&crate::helpers::cdr(
            "carrier-a",
            "c1",
            "+14255550100",
            "+14255550101",
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    // SIGTERM: graceful exit, with the warning about generated secrets in the log.
    let pid = server.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = server.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    let mut log = String::new();
    std::io::Read::read_to_string(server.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(log.contains("production must supply its own"), "{log}");
    assert!(!log.contains("14255550100"), "no personal data in logs");
}

#[tokio::test]
async fn token_issue_validates_its_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let out = ledger(dir.path())
        .args(["token", "issue", "--role", "carrier"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--carrier is required"));
    let out = ledger(dir.path())
        .args(["token", "issue", "--role", "wizard"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--role must be one of"));
    let out = ledger(dir.path())
        .args([
            "token",
            "issue",
            "--role",
            "carrier",
            "--carrier",
            "c-1",
            "--ttl",
            "15m",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap();
    assert_eq!(token.trim().split('.').count(), 3);
}

#[tokio::test]
async fn migrate_on_postgres_and_serve_there() {
    let dir = tempfile::tempdir().unwrap();
    let Ok(admin) = sqlx::PgPool::connect(&postgres_url()).await else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "PostgreSQL unreachable under CI"
        );
        return;
    };
    let schema = format!("cli_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&admin)
        .await
        .unwrap();
    let sep = if postgres_url().contains('?') {
        '&'
    } else {
        '?'
    };
    let db_url = format!("{}{sep}options=-c%20search_path%3D{schema}", postgres_url());

    let out = ledger(dir.path())
        .env("LEDGER_DATABASE_URL", &db_url)
        .arg("migrate")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("postgres"));
    let tables: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = $1",
    )
    .bind(&schema)
    .fetch_one(&admin)
    .await
    .unwrap();
    assert!(tables >= 6);

    let port = free_port();
    let mut server = ledger(dir.path())
        .env("LEDGER_DATABASE_URL", &db_url)
        .env("LEDGER_LISTEN", format!("127.0.0.1:{port}"))
        .arg("serve")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    wait_ready(&url).await;
    let body: serde_json::Value = reqwest::get(format!("{url}/readyz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["database"], "postgres");
    Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(server.wait().unwrap().success());
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&admin)
        .await
        .unwrap();
}
