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
        // Every request's span in the log, to show what it carries.
        .env("RUST_LOG", "info,tower_http=debug")
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    wait_ready(&url).await;

    // The embedded default: ./ledger-data with the database, its log and
    // the secrets readable by their owner only.
    let data = dir.path().join("ledger-data");
    assert!(data.join("ledger.db").is_file());
    for secret in ["master.key", "jwt.secret", "ledger.db", "ledger.db-wal"] {
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
    // Paths a client filled with a phone number: a consent reference, a
    // record id that is none.
    for path in ["/v1/consents/+14255550100", "/v1/transfers/+14255550100"] {
        let r = client
            .get(format!("{url}{path}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_client_error(), "{path}: {}", r.status());
    }

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
    assert!(log.contains("route=/v1/consents/{reference}"), "{log}");
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

    // What the service would refuse is refused here, naming the flag.
    let refused = |args: &[&str], env: &[(&str, &str)], names: &str| {
        let out = ledger(dir.path())
            .args(["token", "issue"])
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(names), "{args:?}: {err}");
    };
    let long = "x".repeat(257);
    refused(
        &["--role", "auditor", "--sub", ""],
        &[],
        "--sub must be 1 to 256",
    );
    refused(
        &["--role", "auditor", "--sub", &long],
        &[],
        "--sub must be 1 to 256",
    );
    refused(&["--role", "auditor", "--ttl", "-1h"], &[], "--ttl must be");
    refused(
        &["--role", "auditor", "--ttl", "500ms"],
        &[],
        "--ttl must be whole seconds",
    );
    refused(
        &["--role", "auditor"],
        &[("LEDGER_JWT_KEYS_FILE", "/etc/jwks.json")],
        "LEDGER_JWT_KEYS_FILE is set",
    );
}

/// A start refused for a bad setting writes nothing: no generated key, no
/// database; the error names the setting.
#[tokio::test]
async fn refused_starts_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("bad-policies");
    std::fs::create_dir(&policies).unwrap();
    for f in ["model.conf", "policy.csv", "retention.toml"] {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("policies")
            .join(f);
        std::fs::copy(src, policies.join(f)).unwrap();
    }
    std::fs::write(
        policies.join("retention.toml"),
        "[categories]\ncall_quality = 0\n",
    )
    .unwrap();
    let short_key = "AAAAAAAAAAAAAAAAAAAAAA==";
    let bad_policy = policies.display().to_string();
    for (env, names) in [
        (
            ("LEDGER_POLICY_DIR", bad_policy.as_str()),
            "retention.toml line",
        ),
        (("LEDGER_JWT_SECRET", "short"), "LEDGER_JWT_SECRET"),
        (
            ("LEDGER_MASTER_KEY", short_key),
            "LEDGER_MASTER_KEY: the master key must be 32 bytes",
        ),
        (
            ("LEDGER_SWEEP_INTERVAL", "500ms"),
            "LEDGER_SWEEP_INTERVAL must be 0 (off) or at least 1s",
        ),
        (
            ("LEDGER_LOG_FORMAT", "jsno"),
            "LEDGER_LOG_FORMAT: expected `json` or `text`, got \"jsno\"",
        ),
        (("RUST_LOG", "info,sqlx=loud"), "RUST_LOG"),
        (
            (
                "LEDGER_DATABASE_URL",
                "postgres://postgres@127.0.0.1:1/none",
            ),
            "cannot connect to PostgreSQL at 127.0.0.1:1 (LEDGER_DATABASE_URL): ",
        ),
    ] {
        let out = ledger(dir.path())
            .env(env.0, env.1)
            .arg("migrate")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{env:?}: {err}");
        assert!(err.contains(names), "{env:?}: {err}");
        assert!(!dir.path().join("ledger-data").exists(), "{env:?}: {err}");
    }

    // A ledger set up with a configured master key, started without one:
    // refused, and no key is generated that would open nothing.
    let key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    let migrate = |key: Option<&str>| {
        let mut c = ledger(dir.path());
        if let Some(k) = key {
            c.env("LEDGER_MASTER_KEY", k);
        }
        let out = c.arg("migrate").output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = migrate(Some(key));
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = migrate(None);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("set LEDGER_MASTER_KEY or LEDGER_MASTER_KEY_FILE"),
        "{err}"
    );
    assert!(!dir.path().join("ledger-data/master.key").exists());
    // So is a root-key rotation, which needs the current key first.
    let new_key = dir.path().join("new.key");
    std::fs::write(&new_key, "MTIzNDU2Nzg5MGFiY2RlZjEyMzQ1Njc4OTBhYmNkZWY=").unwrap();
    let out = ledger(dir.path())
        .args(["keys", "rotate-root", "--new-key-file"])
        .arg(&new_key)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("set LEDGER_MASTER_KEY or LEDGER_MASTER_KEY_FILE"),
        "{err}"
    );
    assert!(!dir.path().join("ledger-data/master.key").exists());
    // With the key, it opens as before.
    let (code, err) = migrate(Some(key));
    assert_eq!(code, Some(0), "{err}");
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

/// On the embedded default, `keys rotate-root` replaces `master.key`; the
/// old key still opens every backup taken before, so it is kept beside it
/// (owner-only) and the output says where, rather than being overwritten.
#[tokio::test]
async fn root_rotation_on_the_embedded_default_keeps_the_old_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    run_ok(dir.path(), &["migrate"]);
    let data = dir.path().join("ledger-data");
    let old = std::fs::read_to_string(data.join("master.key")).unwrap();
    let new_key = dir.path().join("new.key");
    std::fs::write(&new_key, "MTIzNDU2Nzg5MGFiY2RlZjEyMzQ1Njc4OTBhYmNkZWY=\n").unwrap();
    let out = run_ok(
        dir.path(),
        &[
            "keys",
            "rotate-root",
            "--new-key-file",
            new_key.to_str().unwrap(),
        ],
    );
    let out = String::from_utf8_lossy(&out);
    let kept: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("master.key.old-"))
        .collect();
    assert_eq!(kept.len(), 1, "{out}");
    assert_eq!(std::fs::read_to_string(&kept[0]).unwrap(), old);
    assert_eq!(
        std::fs::metadata(&kept[0]).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(
        out.contains(&*kept[0].file_name().unwrap().to_string_lossy()),
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(data.join("master.key")).unwrap(),
        "MTIzNDU2Nzg5MGFiY2RlZjEyMzQ1Njc4OTBhYmNkZWY="
    );
    // The ledger opens with the new key.
    run_ok(dir.path(), &["keys", "status"]);
}

/// Run from the wrong directory, commands that work on an existing ledger
/// refuse instead of creating an empty one and reporting on it.
#[tokio::test]
async fn commands_on_a_ledger_refuse_a_directory_without_one() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["audit", "verify"][..],
        &["keys", "status"],
        &["sweep", "--dry-run"],
        &["reconcile", "--carrier", "carrier-a"],
    ] {
        let out = ledger(dir.path()).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("no ledger at"), "{args:?}: {err}");
    }
    assert!(!dir.path().join("ledger-data").exists());
    // So does a SQLite URL naming a file that does not exist.
    let out = ledger(dir.path())
        .env("LEDGER_DATABASE_URL", "sqlite://elsewhere/ledger.db")
        .args(["audit", "verify"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no ledger at elsewhere/ledger.db"));
    // Once `serve` or `migrate` has created it, they work.
    run_ok(dir.path(), &["migrate"]);
    run_ok(dir.path(), &["audit", "verify"]);
}
