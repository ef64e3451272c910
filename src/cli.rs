//! The command line: every subcommand reads the same configuration as
//! `serve`, so run from the same directory it finds the same data.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::app::{shutdown_signal, AppState, Application};
use crate::auth::{Role, TokenIssuer};
use crate::config::Config;
use crate::domain::CarrierId;

#[derive(Parser, Debug)]
#[command(
    name = "transfer-ledger",
    version,
    about = "System of record for personal data crossing between a telecom platform and its carriers"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the HTTP service.
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Tokens for the configured HS256 secret.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Delete expired records now (what the server does on its schedule).
    Sweep {
        /// Count what would go; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Compare a carrier's call durations with the platform's call records.
    Reconcile {
        /// The carrier whose call durations are compared.
        #[arg(long)]
        carrier: String,
        /// RFC 3339, inclusive (occurred_at).
        #[arg(long)]
        from: Option<String>,
        /// RFC 3339, exclusive.
        #[arg(long)]
        to: Option<String>,
        /// Seconds by which two durations of one call may differ and still match.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        tolerance_seconds: i64,
    },
    /// Measure the service against raw baselines, in one run.
    Bench(BenchCommand),
    /// The key hierarchy: rotation and status.
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Add a master-key version and rewrap every data key under it.
    Rotate {
        /// Only add the version; running servers rewrap in the background.
        #[arg(long)]
        no_wait: bool,
    },
    /// Add an export-signing key version (old public keys stay published).
    RotateSigning,
    /// Rewrap the keyring under a new root key (LEDGER_MASTER_KEY).
    RotateRoot {
        /// The new root key: 32 random bytes in base64 (`openssl rand -base64 32`).
        #[arg(long, value_name = "FILE")]
        new_key_file: std::path::PathBuf,
    },
    /// How many data keys each master-key version still wraps.
    Status,
}

#[derive(Args, Debug)]
pub struct BenchCommand {
    /// How many transfers to ingest.
    #[arg(long, default_value_t = 100_000)]
    pub records: usize,
    /// A PostgreSQL server to bench on (fresh schemas are created and
    /// dropped); a temporary SQLite database by default.
    #[arg(long)]
    pub database_url: Option<String>,
    /// Also write the figures as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<std::path::PathBuf>,
    /// Transfers per batch request.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Concurrent requests.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Records of the one subject whose access export is measured (at most --records).
    #[arg(long, default_value_t = 200_000)]
    pub export_records: usize,
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Recompute the hash chain; exit non-zero if it is broken.
    Verify {
        /// A head saved earlier from GET /v1/audit/head: also prove the log
        /// was neither rewritten before it nor truncated after it.
        #[arg(long, value_name = "FILE")]
        since_head: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Print one signed token on stdout.
    Issue(IssueArgs),
}

#[derive(Args, Debug)]
pub struct IssueArgs {
    /// privacy_officer, carrier, platform, retention_sweeper, auditor or admin.
    #[arg(long)]
    pub role: String,
    /// The carrier (required with --role carrier).
    #[arg(long)]
    pub carrier: Option<String>,
    /// The subject; defaults to the role (and carrier).
    #[arg(long)]
    pub sub: Option<String>,
    /// Lifetime, e.g. 15m, 1h, 7d.
    #[arg(long, default_value = "1h", allow_hyphen_values = true)]
    pub ttl: String,
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = Config::from_env()?;
    if matches!(
        cli.command,
        Command::Audit(_) | Command::Sweep { .. } | Command::Reconcile { .. } | Command::Keys(_)
    ) {
        config.require_existing_ledger()?;
    }
    match cli.command {
        Command::Serve => {
            let app = Application::build(config).await?;
            app.run_until(shutdown_signal()).await
        }
        Command::Migrate => {
            let state = AppState::init(config).await?;
            println!("migrations applied ({})", state.db.backend());
            Ok(())
        }
        Command::Audit(AuditCommand::Verify { since_head }) => {
            audit_verify(config, since_head).await
        }
        Command::Sweep { dry_run } => {
            let state = AppState::init(config).await?;
            let who = cli_principal(Role::RetentionSweeper);
            let bar = progress_bar("sweeping");
            let progress = |done: u64, total: u64| {
                if let Some(pb) = &bar {
                    pb.set_length(total);
                    pb.set_position(done);
                }
            };
            let report = crate::retention::sweep::run(
                &state,
                &who,
                dry_run,
                state.config.sweep_batch,
                bar.is_some().then_some(&progress as _),
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            if let Some(pb) = bar {
                pb.finish_and_clear();
            }
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Reconcile {
            carrier,
            from,
            to,
            tolerance_seconds,
        } => {
            let time = |name: &str,
                        v: Option<String>|
             -> anyhow::Result<Option<chrono::DateTime<chrono::Utc>>> {
                v.map(|s| {
                    chrono::DateTime::parse_from_rfc3339(&s)
                        .map(|t| t.with_timezone(&chrono::Utc))
                        .map_err(|_| anyhow::anyhow!("--{name} must be an RFC 3339 date-time"))
                })
                .transpose()
            };
            use crate::ledger::reconciliation::MAX_TOLERANCE_SECONDS;
            anyhow::ensure!(
                (0..=MAX_TOLERANCE_SECONDS).contains(&tolerance_seconds),
                "--tolerance-seconds must be from 0 to {MAX_TOLERANCE_SECONDS}"
            );
            let (from, to) = (time("from", from)?, time("to", to)?);
            if let (Some(from), Some(to)) = (from, to) {
                anyhow::ensure!(to >= from, "--to must not be before --from");
            }
            let q = crate::ledger::reconciliation::Query {
                carrier: CarrierId::parse(&carrier)
                    .map_err(|e| anyhow::anyhow!("--carrier {e}"))?,
                from,
                to,
                tolerance_seconds,
                outcome: crate::storage::reconciliation::Outcome::Mismatched,
                limit: 0,
                cursor: None,
            };
            let state = AppState::init(config).await?;
            let spinner = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
                let s = indicatif::ProgressBar::new_spinner();
                s.set_message(format!("reconciling {carrier}"));
                s.enable_steady_tick(std::time::Duration::from_millis(100));
                s
            });
            let started = std::time::Instant::now();
            let s = crate::ledger::reconciliation::summary(&state, &q)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if let Some(sp) = spinner {
                sp.finish_and_clear();
            }
            println!(
                "reconciliation of {carrier} (tolerance {tolerance_seconds} s; took {:.1} s)",
                started.elapsed().as_secs_f64()
            );
            for (k, v) in [
                ("matched", s.matched),
                ("mismatched", s.mismatched),
                ("missing at carrier", s.missing_at_carrier),
                ("missing at platform", s.missing_at_platform),
                ("platform seconds", s.total_platform_seconds),
                ("carrier seconds", s.total_carrier_seconds),
            ] {
                println!("  {k:<22} {v:>12}");
            }
            Ok(())
        }
        Command::Bench(b) => {
            let backend = if b.database_url.is_some() {
                "PostgreSQL"
            } else {
                "SQLite"
            };
            anyhow::ensure!(
                (1..=10_000).contains(&b.batch),
                "--batch must be from 1 to 10000 (the service's batch limit)"
            );
            anyhow::ensure!(
                (1..=256).contains(&b.concurrency),
                "--concurrency must be from 1 to 256"
            );
            // The file is opened before the run, which may take an hour: a
            // path that cannot be written fails now, not after it.
            let json = match &b.json {
                Some(path) => {
                    let existed = path.exists();
                    let file = std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .open(path)
                        .with_context(|| {
                            format!("--json {}: cannot write there", path.display())
                        })?;
                    Some((path.clone(), file, existed))
                }
                None => None,
            };
            let args = crate::bench::BenchArgs {
                records: b.records,
                database_url: b.database_url,
                json: b.json.clone(),
                batch: b.batch,
                concurrency: b.concurrency,
                export_records: b.export_records,
            };
            let report = match crate::bench::run(args).await {
                Ok(r) => r,
                Err(e) => {
                    if let Some((path, _, false)) = &json {
                        let _ = std::fs::remove_file(path);
                    }
                    return Err(e);
                }
            };
            print!("{}", crate::bench::table(&report, backend));
            if let Some((path, mut file, _)) = json {
                use std::io::Write;
                file.set_len(0)
                    .and_then(|()| {
                        file.write_all(serde_json::to_string_pretty(&report)?.as_bytes())
                    })
                    .with_context(|| format!("--json {}", path.display()))?;
            }
            Ok(())
        }
        Command::Keys(k) => keys(config, k).await,
        Command::Token(TokenCommand::Issue(args)) => {
            println!("{}", issue_token(&config, &args)?);
            Ok(())
        }
    }
}

/// Who runs a command, for the audit trail: the login name, or the user id
/// when the environment names none (a container, a cron job).
fn cli_principal(role: Role) -> crate::auth::Principal {
    use std::os::unix::fs::MetadataExt;
    let user = ["USER", "LOGNAME"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        .or_else(|| {
            std::fs::metadata("/proc/self")
                .ok()
                .map(|m| format!("uid-{}", m.uid()))
        })
        .unwrap_or_else(|| "unknown".into());
    crate::auth::Principal {
        sub: format!("cli:{user}"),
        role,
        carrier: None,
    }
}

async fn keys(config: Config, command: KeysCommand) -> anyhow::Result<()> {
    use crate::crypto::keyring::Rotatable;
    use crate::ledger::keys as lifecycle;
    let err = |e: crate::error::AppError| anyhow::anyhow!("{e}");
    match command {
        KeysCommand::Status => {
            let state = AppState::init(config).await?;
            let s = lifecycle::status(&state).await.map_err(err)?;
            println!("{}", serde_json::to_string_pretty(&s)?);
        }
        KeysCommand::RotateSigning => {
            let state = AppState::init(config).await?;
            let r = lifecycle::rotate(&state, &cli_principal(Role::Admin), Rotatable::Signing)
                .await
                .map_err(err)?;
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
        KeysCommand::Rotate { no_wait } => {
            let state = AppState::init(config).await?;
            let r = lifecycle::rotate(&state, &cli_principal(Role::Admin), Rotatable::Master)
                .await
                .map_err(err)?;
            eprintln!(
                "master key v{} added; new data keys are wrapped under it",
                r.version
            );
            if no_wait {
                println!("{}", serde_json::to_string_pretty(&r)?);
                return Ok(());
            }
            let bar = progress_bar("rewrapping");
            let progress = |done: u64, total: u64| {
                if let Some(pb) = &bar {
                    pb.set_length(total);
                    pb.set_position(done);
                }
            };
            let report = lifecycle::rewrap_all(
                &state,
                lifecycle::REWRAP_BATCH,
                &progress,
                std::time::Duration::from_secs(120),
            )
            .await
            .map_err(err)?;
            if let Some(pb) = bar {
                pb.finish_and_clear();
            }
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "key": r.key,
                    "version": r.version,
                    "rewrapped": report.rewrapped,
                    "retired": report.retired,
                    "remaining": report.remaining,
                }))?
            );
        }
        KeysCommand::RotateRoot { new_key_file } => {
            let text = std::fs::read_to_string(&new_key_file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", new_key_file.display()))?;
            let new = crate::config::parse_root_key(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", new_key_file.display()))?;
            let generated = config.generated_master_key_file();
            // Opening the state proves the current root key opens the keyring
            // (and refuses, generating nothing, when none is configured).
            let state = AppState::init(config.clone()).await?;
            let old = config.secrets()?.root_key;
            anyhow::ensure!(*old != *new, "the new root key is the one in use");
            // The embedded default reads its root key from the data dir.
            // Everything that can fail there happens before the keyring
            // moves: the old key is kept under a new name (a hard link,
            // refused if that name exists, so nothing is overwritten) and
            // the new key is written and synced beside it. After the commit
            // only a rename is left.
            let staged = match &generated {
                Some(path) => Some(stage_root_key_files(path, text.trim())?),
                None => None,
            };
            let moved = match crate::crypto::Keyring::rotate_root(&state.db, &old, &new).await {
                Ok(moved) => moved,
                Err(e) => {
                    // Nothing moved: the staged files would only mislead.
                    if let Some((tmp, kept)) = &staged {
                        let _ = std::fs::remove_file(tmp);
                        let _ = std::fs::remove_file(kept);
                    }
                    return Err(e);
                }
            };
            // From here on the keyring is under the new key: the key file
            // is replaced even if the audit entry fails.
            let audited: anyhow::Result<()> = async {
                let mut tx = state.db.begin().await?;
                crate::audit::append(
                    &mut tx,
                    Some(&cli_principal(Role::Admin)),
                    &crate::audit::Event::new(
                        "keys.rotate_root",
                        serde_json::json!({"keyring_entries": moved}),
                    ),
                )
                .await
                .map_err(err)?;
                tx.commit().await?;
                Ok(())
            }
            .await;
            match (generated, staged) {
                (Some(path), Some((tmp, kept))) => {
                    if let Err(e) = std::fs::rename(&tmp, &path).and_then(|()| sync_dir(&path)) {
                        anyhow::bail!(
                            "the keyring is now under the new root key, but {} could not replace {}: {e}; \
                             move it there by hand before starting the service (the old key is kept as {})",
                            tmp.display(),
                            path.display(),
                            kept.display()
                        );
                    }
                    println!(
                        "rewrapped {moved} keyring entries under the new root key and replaced {}; \
                         the old key is kept as {}: move it to your secret store and keep it as long as \
                         any backup taken before now; restart the service",
                        path.display(),
                        kept.display()
                    );
                }
                _ => println!(
                    "rewrapped {moved} keyring entries under the new root key; now set LEDGER_MASTER_KEY_FILE \
                     (or LEDGER_MASTER_KEY) to the new key on every instance and restart them; keep the old key \
                     as long as any backup taken before now (only it opens them)"
                ),
            }
            audited.map_err(|e| {
                e.context("the root key was rotated, but its audit entry could not be written")
            })?;
        }
    }
    Ok(())
}

/// Keeps the current root key file as `<file>.old-<UTC time>` (a hard link:
/// refused if that name exists) and writes the new key, synced, to
/// `<file>.new`. Returns (the new key's file, the old key's).
fn stage_root_key_files(
    path: &std::path::Path,
    new_key: &str,
) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let kept = path.with_extension(format!(
        "key.old-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%S%.6fZ")
    ));
    std::fs::hard_link(path, &kept)
        .map_err(|e| anyhow::anyhow!("cannot keep the old root key as {}: {e}", kept.display()))?;
    let tmp = path.with_extension("key.new");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tmp.display()))?;
    f.write_all(new_key.as_bytes())?;
    f.sync_all()?;
    sync_dir(path)?;
    Ok((tmp, kept))
}

/// Makes a rename or a new name in `path`'s directory durable.
fn sync_dir(path: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(path.parent().unwrap_or(std::path::Path::new(".")))?.sync_all()
}

fn progress_bar(what: &str) -> Option<indicatif::ProgressBar> {
    std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let pb = indicatif::ProgressBar::new(0);
        pb.set_style(
            indicatif::ProgressStyle::with_template(&format!(
                "{what} [{{bar:40}}] {{pos}}/{{len}} ({{per_sec}}, {{eta}})"
            ))
            .expect("template")
            .progress_chars("=> "),
        );
        pb
    })
}

fn issue_token(config: &Config, args: &IssueArgs) -> anyhow::Result<String> {
    let role: Role = args
        .role
        .parse()
        .map_err(|_| anyhow::anyhow!("--role must be one of: {}", Role::expected()))?;
    let carrier = match (role, &args.carrier) {
        (Role::Carrier, None) => anyhow::bail!("--carrier is required with --role carrier"),
        (Role::Carrier, Some(c)) => {
            Some(CarrierId::parse(c).map_err(|e| anyhow::anyhow!("--carrier {e}"))?)
        }
        (_, Some(_)) => anyhow::bail!("--carrier is only for --role carrier"),
        (_, None) => None,
    };
    let ttl = humantime::parse_duration(&args.ttl)
        .map_err(|_| anyhow::anyhow!("--ttl must be a duration such as 15m or 1h"))?;
    anyhow::ensure!(
        ttl.as_secs() >= 1 && ttl.as_secs() <= 366 * 86400 && ttl.subsec_nanos() == 0,
        "--ttl must be whole seconds between 1s and 366 days (token times are in seconds)"
    );
    let sub = args.sub.clone().unwrap_or_else(|| match &carrier {
        Some(c) => format!("{role}:{c}"),
        None => role.to_string(),
    });
    crate::auth::jwt::check_sub(&sub).map_err(|e| anyhow::anyhow!("--sub {e}"))?;
    if let Some(jwks) = &config.jwt_keys_file {
        anyhow::bail!(
            "LEDGER_JWT_KEYS_FILE is set ({}): the service accepts only tokens signed by those keys, \
             not this command's HS256 tokens; issue tokens with the identity provider that holds them",
            jwks.display()
        );
    }
    let fresh = config.jwt_secret.is_none() && !config.data_dir.exists();
    let secret = config.jwt_secret()?;
    if fresh {
        eprintln!(
            "warning: there was no data dir at {}: created it with a new JWT secret; a server started \
             from another directory (or with another LEDGER_DATA_DIR) will refuse this token",
            config.data_dir.display()
        );
    }
    let issuer = TokenIssuer::hs256(&secret, &config.jwt_issuer, &config.jwt_audience);
    issuer.issue(&sub, role, carrier.as_ref().map(CarrierId::as_str), ttl)
}

async fn audit_verify(
    config: Config,
    since_head: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let saved: Option<crate::audit::SignedHead> = match &since_head {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --since-head {}", path.display()))?;
            Some(serde_json::from_str(&text).map_err(|e| {
                anyhow::anyhow!("{} is not a saved audit head: {e}", path.display())
            })?)
        }
        None => None,
    };
    let state = AppState::init(config).await?;
    let mut v = crate::audit::verify(&state.db).await?;
    if let (true, Some(saved)) = (v.valid, &saved) {
        if let Err((seq, reason)) = crate::audit::check_saved_head(&state, saved).await? {
            v = crate::audit::Verification {
                valid: false,
                head: None,
                first_bad_seq: Some(seq),
                reason: Some(reason),
                ..v
            };
        }
    }
    println!("{}", serde_json::to_string_pretty(&v)?);
    if v.valid {
        Ok(())
    } else {
        anyhow::bail!(
            "the audit chain does not verify at entry {}: {}",
            v.first_bad_seq.unwrap_or_default(),
            v.reason.as_deref().unwrap_or("broken")
        )
    }
}
