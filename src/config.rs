//! Typed configuration, built once from an optional TOML file (named by
//! `LEDGER_CONFIG`) overlaid with `LEDGER_*` environment variables, and
//! passed down explicitly so tests can vary it.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use base64::Engine;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::crypto::RawKey;

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Contact {
    pub name: Option<String>,
    pub contact: Option<String>,
}

/// AES-GCM with random 96-bit nonces stays within NIST SP 800-38D's bound
/// (collision probability at most 2^-32) for 2^32 encryptions per key; data
/// keys are replaced at half of that, leaving room for concurrent writers.
pub const DATA_KEY_MAX_SEALS: i64 = 1 << 31;
/// The least budget that can be configured: one batch (at most 10,000
/// transfers) must fit in a fresh key.
pub const DATA_KEY_MIN_SEALS: i64 = 10_000;

/// The longest any duration setting may be: a year.
const MAX_DURATION: Duration = Duration::from_secs(366 * 86_400);

/// The longest sweep interval: a week.
const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(7 * 86_400);

#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    pub listen: String,
    pub master_key: Option<SecretString>,
    pub master_key_file: Option<PathBuf>,
    pub jwt_secret: Option<SecretString>,
    pub jwt_keys_file: Option<PathBuf>,
    pub jwt_issuer: String,
    pub jwt_audience: String,
    pub policy_dir: Option<PathBuf>,
    pub sweep_interval: Duration,
    /// Records deleted per sweep transaction.
    pub sweep_batch: i64,
    pub db_max_connections: u32,
    pub request_timeout: Duration,
    pub body_limit_bytes: usize,
    /// How often each instance re-reads the keyring and the JWKS file.
    pub reload_interval: Duration,
    /// How often `serve` copies SQLite's write-ahead log into the database
    /// (`storage::Db::run_checkpointer`); zero leaves it to the writer.
    pub checkpoint_interval: Duration,
    /// How long a subject request's processor may go without renewing its
    /// claim before another processor takes the request over.
    pub claim_timeout: Duration,
    /// Encryptions a data key may make before it is replaced.
    pub data_key_max_seals: i64,
    /// Refused requests without a valid token audited one by one per
    /// second (beyond it, counted: `audit::denials`); 0 = all of them.
    pub anonymous_denials_per_second: u32,
    pub controller: Contact,
    pub dpo: Contact,
}

/// The TOML file: the same settings as the environment, lower-case names
/// without the `LEDGER_` prefix.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    listen: Option<String>,
    master_key: Option<String>,
    master_key_file: Option<PathBuf>,
    jwt_secret: Option<String>,
    jwt_keys_file: Option<PathBuf>,
    jwt_issuer: Option<String>,
    jwt_audience: Option<String>,
    policy_dir: Option<PathBuf>,
    sweep_interval: Option<String>,
    db_max_connections: Option<u32>,
    request_timeout: Option<String>,
    body_limit_bytes: Option<usize>,
    reload_interval: Option<String>,
    checkpoint_interval: Option<String>,
    claim_timeout: Option<String>,
    data_key_max_seals: Option<i64>,
    anonymous_denials_per_second: Option<u32>,
    #[serde(default)]
    controller: Contact,
    #[serde(default)]
    dpo: Contact,
}

/// A configuration file that does not parse, by line and column and the
/// parser's message, without the excerpt of the file that the parser's own
/// rendering quotes: the line may hold the root key or the JWT secret.
fn toml_error(path: &str, text: &str, e: &toml::de::Error) -> anyhow::Error {
    let at = e
        .span()
        .map(|span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!(" line {line}, column {column}")
        })
        .unwrap_or_default();
    anyhow::anyhow!(
        "invalid configuration file {path}{at}: {}",
        without_quoted_text(e.message().trim_end())
    )
}

/// `message` with the text between double quotes left out: the parser
/// quotes the values it could not use ("invalid type: string \"…\"").
fn without_quoted_text(message: &str) -> String {
    message
        .split('"')
        .enumerate()
        .map(|(i, part)| if i % 2 == 1 { "…" } else { part })
        .collect::<Vec<_>>()
        .join("\"")
}

/// Secrets resolved from configuration or generated for the embedded default.
pub struct Secrets {
    pub root_key: RawKey,
    pub jwt_secret: SecretString,
}

impl Config {
    /// Reads `LEDGER_CONFIG` (if set) and the environment.
    pub fn from_env() -> anyhow::Result<Self> {
        for name in unknown_variables(std::env::vars_os().map(|(k, _)| k)) {
            tracing::warn!(variable = %name, "not a setting of transfer-ledger (misspelt?); ignored");
        }
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Builds the configuration from any variable source (tests pass a map).
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let config_path = var("LEDGER_CONFIG");
        let file: FileConfig = match &config_path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read LEDGER_CONFIG {path}"))?;
                let file: FileConfig =
                    toml::from_str(&text).map_err(|e| toml_error(path, &text, &e))?;
                if file.master_key.is_some() || file.jwt_secret.is_some() {
                    warn_if_readable_by_others(Path::new(path));
                }
                file
            }
            None => FileConfig::default(),
        };
        let env = |k: &str| var(k).filter(|v| !v.is_empty());
        // Where a setting came from, for its error message: the variable,
        // or its key in the configuration file.
        let source = |name: &str| match (&config_path, env(name)) {
            (Some(path), None) => format!(
                "`{}` in {path}",
                name.trim_start_matches("LEDGER_").to_ascii_lowercase()
            ),
            _ => name.to_string(),
        };
        // A duration from the variable or the file, else `default`; `0` is
        // off, anything else must be at least `min`.
        let duration = |name: &str,
                        file_value: Option<String>,
                        default: &str,
                        min: Duration|
         -> anyhow::Result<Duration> {
            let Some(v) = env(name).or(file_value) else {
                return Ok(humantime::parse_duration(default).expect("valid default"));
            };
            if v.trim() == "0" {
                return Ok(Duration::ZERO);
            }
            let d = humantime::parse_duration(v.trim()).with_context(|| {
                format!("{} must be a duration such as 30s, 1h or 0", source(name))
            })?;
            anyhow::ensure!(
                d >= min,
                "{} must be 0 (off) or at least {}",
                source(name),
                humantime::format_duration(min)
            );
            // Longer is no setting anyone means, and far beyond what a
            // timer can add to the clock.
            anyhow::ensure!(
                d <= MAX_DURATION,
                "{} must be at most {}",
                source(name),
                humantime::format_duration(MAX_DURATION)
            );
            Ok(d)
        };
        // The root key comes from the environment or from the file, never
        // a mix: an environment that names one overrides both file settings.
        let (master_key, master_key_file) =
            match (env("LEDGER_MASTER_KEY"), env("LEDGER_MASTER_KEY_FILE")) {
                (None, None) => (file.master_key, file.master_key_file),
                (key, path) => (key, path.map(PathBuf::from)),
            };
        anyhow::ensure!(
            master_key.is_none() || master_key_file.is_none(),
            "both LEDGER_MASTER_KEY (master_key) and LEDGER_MASTER_KEY_FILE (master_key_file) are set: set one"
        );
        let policy_dir = env("LEDGER_POLICY_DIR")
            .map(PathBuf::from)
            .or(file.policy_dir);
        // Checked here, where the message can name the file's key when the
        // value came from the file (and checked again, by name, when used).
        if let Some(k) = &master_key {
            parse_root_key(k)
                .map_err(|e| anyhow::anyhow!("{}: {e:#}", source("LEDGER_MASTER_KEY")))?;
        }
        if let Some(s) = env("LEDGER_JWT_SECRET").or(file.jwt_secret.clone()) {
            check_jwt_secret(&SecretString::from(s), &source("LEDGER_JWT_SECRET"))?;
        }
        let listen = env("LEDGER_LISTEN")
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:8080".into());
        check_listen(&listen).map_err(|e| anyhow::anyhow!("{}: {e}", source("LEDGER_LISTEN")))?;
        Ok(Self {
            data_dir: env("LEDGER_DATA_DIR")
                .map(PathBuf::from)
                .or(file.data_dir)
                .unwrap_or_else(|| "ledger-data".into()),
            database_url: env("LEDGER_DATABASE_URL").or(file.database_url),
            listen,
            master_key: master_key.map(SecretString::from),
            master_key_file,
            jwt_secret: env("LEDGER_JWT_SECRET")
                .or(file.jwt_secret)
                .map(SecretString::from),
            jwt_keys_file: env("LEDGER_JWT_KEYS_FILE")
                .map(PathBuf::from)
                .or(file.jwt_keys_file),
            jwt_issuer: env("LEDGER_JWT_ISSUER")
                .or(file.jwt_issuer)
                .unwrap_or_else(|| "transfer-ledger".into()),
            jwt_audience: env("LEDGER_JWT_AUDIENCE")
                .or(file.jwt_audience)
                .unwrap_or_else(|| "transfer-ledger".into()),
            policy_dir,
            // Expired records outlive their retention by up to one interval.
            sweep_interval: match duration(
                "LEDGER_SWEEP_INTERVAL",
                file.sweep_interval,
                "1h",
                Duration::from_secs(1),
            )? {
                d if d > MAX_SWEEP_INTERVAL => bail!(
                    "{} must be at most {} (expired records outlive their retention by up to one \
                     interval; 0 turns the schedule off)",
                    source("LEDGER_SWEEP_INTERVAL"),
                    humantime::format_duration(MAX_SWEEP_INTERVAL)
                ),
                d => d,
            },
            sweep_batch: match env("LEDGER_SWEEP_BATCH") {
                Some(v) => v
                    .parse()
                    .ok()
                    .filter(|n: &i64| (1..=100_000).contains(n))
                    .context("LEDGER_SWEEP_BATCH must be a whole number from 1 to 100000")?,
                None => 20_000,
            },
            // A sweep holds one connection for its lock on PostgreSQL.
            db_max_connections: match env("LEDGER_DB_MAX_CONNECTIONS") {
                Some(v) => v.parse().ok(),
                None => Some(file.db_max_connections.unwrap_or(16)),
            }
            .filter(|n: &u32| *n >= 2)
            .with_context(|| {
                format!(
                    "{} must be a whole number of at least 2",
                    source("LEDGER_DB_MAX_CONNECTIONS")
                )
            })?,
            request_timeout: duration(
                "LEDGER_REQUEST_TIMEOUT",
                file.request_timeout,
                "60s",
                Duration::ZERO,
            )?,
            body_limit_bytes: match env("LEDGER_BODY_LIMIT_BYTES") {
                Some(v) => v.parse().ok(),
                None => Some(file.body_limit_bytes.unwrap_or(32 * 1024 * 1024)),
            }
            .filter(|n: &usize| *n >= 1024)
            .with_context(|| {
                format!(
                    "{} must be a byte count of at least 1024",
                    source("LEDGER_BODY_LIMIT_BYTES")
                )
            })?,
            reload_interval: duration(
                "LEDGER_RELOAD_INTERVAL",
                file.reload_interval,
                "5s",
                Duration::ZERO,
            )?,
            checkpoint_interval: duration(
                "LEDGER_CHECKPOINT_INTERVAL",
                file.checkpoint_interval,
                "100ms",
                Duration::from_millis(10),
            )?,
            // At least several of the longest steps (an erasure batch takes
            // about a second): a shorter timeout makes every step's end a
            // takeover, and an export taken over starts again.
            claim_timeout: match duration(
                "LEDGER_CLAIM_TIMEOUT",
                file.claim_timeout,
                "120s",
                Duration::ZERO,
            )? {
                d if d.is_zero() => bail!(
                    "{} cannot be 0: a request whose processor died would never be taken up again",
                    source("LEDGER_CLAIM_TIMEOUT")
                ),
                d if d < Duration::from_secs(10) => bail!(
                    "{} must be at least 10s (a shorter one turns every slow step into a takeover)",
                    source("LEDGER_CLAIM_TIMEOUT")
                ),
                d => d,
            },
            data_key_max_seals: match env("LEDGER_DATA_KEY_MAX_SEALS") {
                Some(v) => v.parse().ok(),
                None => file.data_key_max_seals.or(Some(DATA_KEY_MAX_SEALS)),
            }
            .filter(|n: &i64| (DATA_KEY_MIN_SEALS..=DATA_KEY_MAX_SEALS).contains(n))
            .with_context(|| {
                format!(
                    "{} must be a whole number from {DATA_KEY_MIN_SEALS} to {DATA_KEY_MAX_SEALS}",
                    source("LEDGER_DATA_KEY_MAX_SEALS")
                )
            })?,
            anonymous_denials_per_second: match env("LEDGER_ANONYMOUS_DENIALS_PER_SECOND") {
                Some(v) => v.parse().ok(),
                None => Some(file.anonymous_denials_per_second.unwrap_or(10)),
            }
            .filter(|n: &u32| *n <= 100_000)
            .with_context(|| {
                format!(
                    "{} must be a whole number from 0 (audit every one) to 100000",
                    source("LEDGER_ANONYMOUS_DENIALS_PER_SECOND")
                )
            })?,
            controller: Contact {
                name: env("LEDGER_CONTROLLER_NAME").or(file.controller.name),
                contact: env("LEDGER_CONTROLLER_CONTACT").or(file.controller.contact),
            },
            dpo: Contact {
                name: env("LEDGER_DPO_NAME").or(file.dpo.name),
                contact: env("LEDGER_DPO_CONTACT").or(file.dpo.contact),
            },
        })
    }

    /// Claims, leases and sweep leases last renewed before this (at `now`,
    /// in microseconds) are stale: their holder is presumed dead.
    pub fn stale_before(&self, now: i64) -> i64 {
        now - self.claim_timeout.as_micros() as i64
    }

    /// Refuses to go on when the SQLite database file does not exist yet:
    /// commands that work on an existing ledger (verify, sweep, keys,
    /// reconcile) would otherwise create an empty one, keys and all, in the
    /// wrong directory and report on it ("valid, 0 entries").
    pub fn require_existing_ledger(&self) -> anyhow::Result<()> {
        let url = self.database_url();
        if !url.starts_with("sqlite:") || crate::storage::sqlite_in_memory(&url) {
            return Ok(());
        }
        let path = <sqlx::sqlite::SqliteConnectOptions as std::str::FromStr>::from_str(&url)
            .map(|o| o.get_filename().to_path_buf())
            .unwrap_or_else(|_| self.data_dir.join("ledger.db"));
        anyhow::ensure!(
            path.exists(),
            "no ledger at {}: run this command from the directory `serve` runs in, or set \
             LEDGER_DATA_DIR or LEDGER_DATABASE_URL",
            path.display()
        );
        Ok(())
    }

    /// `LEDGER_DATABASE_URL`, or the SQLite file in the data dir.
    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!("sqlite://{}", self.data_dir.join("ledger.db").display()),
        }
    }

    /// The policy directory: `LEDGER_POLICY_DIR`, else `./policies` if it
    /// exists (all three files then must be there), else `None` (the
    /// compiled-in defaults).
    pub fn policy_dir(&self) -> Option<PathBuf> {
        self.policy_dir.clone().or_else(|| {
            let p = PathBuf::from("policies");
            p.is_dir().then_some(p)
        })
    }

    /// Where the root key comes from when neither `LEDGER_MASTER_KEY` nor
    /// `LEDGER_MASTER_KEY_FILE` is set: the embedded default's generated file.
    pub fn generated_master_key_file(&self) -> Option<PathBuf> {
        (self.master_key.is_none() && self.master_key_file.is_none())
            .then(|| self.data_dir.join("master.key"))
    }

    /// The root key when configured (`LEDGER_MASTER_KEY`, or the file
    /// `LEDGER_MASTER_KEY_FILE` names); `None` for the embedded default's
    /// generated one. Errors name the setting.
    fn configured_root_key(&self) -> anyhow::Result<Option<RawKey>> {
        match (&self.master_key, &self.master_key_file) {
            (Some(k), _) => parse_root_key(k.expose_secret())
                .map(Some)
                .map_err(|e| anyhow::anyhow!("LEDGER_MASTER_KEY: {e:#}")),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).with_context(|| {
                    format!("cannot read LEDGER_MASTER_KEY_FILE {}", path.display())
                })?;
                parse_root_key(&text).map(Some).map_err(|e| {
                    anyhow::anyhow!("LEDGER_MASTER_KEY_FILE {}: {e:#}", path.display())
                })
            }
            (None, None) => Ok(None),
        }
    }

    /// Checks the secrets that are configured, generating nothing: a
    /// service refused for a bad setting leaves no files behind.
    /// (The JWT secret and an inline root key were checked when the
    /// configuration was read.)
    pub fn check_secrets(&self) -> anyhow::Result<()> {
        self.configured_root_key()?;
        if let (None, Some(path)) = (&self.master_key, &self.master_key_file) {
            warn_if_shared(
                path,
                "other users may read the root key in LEDGER_MASTER_KEY_FILE; make it mode 0600",
            );
        }
        Ok(())
    }

    /// The HS256 secret: configured, or the embedded default's generated one.
    pub fn jwt_secret(&self) -> anyhow::Result<SecretString> {
        match &self.jwt_secret {
            Some(s) => {
                check_jwt_secret(s, "LEDGER_JWT_SECRET")?;
                Ok(s.clone())
            }
            None => {
                let path = self.data_dir.join("jwt.secret");
                let s = SecretString::from(
                    generated_secret(&path, "JWT secret", "LEDGER_JWT_SECRET")?
                        .trim()
                        .to_string(),
                );
                check_jwt_secret(&s, &path.display().to_string())?;
                Ok(s)
            }
        }
    }

    /// Resolves the master key and the HS256 secret, generating files in the
    /// data dir for whichever is not configured.
    pub fn secrets(&self) -> anyhow::Result<Secrets> {
        let root_key = match self.configured_root_key()? {
            Some(k) => k,
            None => {
                let path = self.data_dir.join("master.key");
                let text = generated_secret(
                    &path,
                    "master key",
                    "LEDGER_MASTER_KEY or LEDGER_MASTER_KEY_FILE",
                )?;
                parse_root_key(&text).map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))?
            }
        };
        Ok(Secrets {
            root_key,
            jwt_secret: self.jwt_secret()?,
        })
    }
}

fn check_jwt_secret(s: &SecretString, source: &str) -> anyhow::Result<()> {
    if s.expose_secret().len() < 32 {
        bail!(
            "{source}: the JWT secret must be at least 32 bytes long (RFC 7518 3.2: an HS256 key \
             of fewer than 256 bits can be guessed from any token it signed); `openssl rand -base64 32` makes one"
        );
    }
    Ok(())
}

/// Every `LEDGER_*` variable the service reads.
const VARIABLES: &[&str] = &[
    "LEDGER_ANONYMOUS_DENIALS_PER_SECOND",
    "LEDGER_BENCH_SERVER_LOG",
    "LEDGER_BODY_LIMIT_BYTES",
    "LEDGER_CHECKPOINT_INTERVAL",
    "LEDGER_CLAIM_TIMEOUT",
    "LEDGER_CONFIG",
    "LEDGER_CONTROLLER_CONTACT",
    "LEDGER_CONTROLLER_NAME",
    "LEDGER_DATABASE_URL",
    "LEDGER_DATA_DIR",
    "LEDGER_DATA_KEY_MAX_SEALS",
    "LEDGER_DB_MAX_CONNECTIONS",
    "LEDGER_DPO_CONTACT",
    "LEDGER_DPO_NAME",
    "LEDGER_JWT_AUDIENCE",
    "LEDGER_JWT_ISSUER",
    "LEDGER_JWT_KEYS_FILE",
    "LEDGER_JWT_SECRET",
    "LEDGER_LISTEN",
    "LEDGER_LOG_FORMAT",
    "LEDGER_MASTER_KEY",
    "LEDGER_MASTER_KEY_FILE",
    "LEDGER_POLICY_DIR",
    "LEDGER_RELOAD_INTERVAL",
    "LEDGER_REQUEST_TIMEOUT",
    "LEDGER_SWEEP_BATCH",
    "LEDGER_SWEEP_INTERVAL",
    // The tests' PostgreSQL, read by the test harness, which the service
    // processes it starts inherit.
    "LEDGER_TEST_POSTGRES_URL",
];

/// `LEDGER_*` names among `names` that are no setting: a misspelt one
/// would otherwise be ignored without a word. (Unknown keys of the
/// configuration file are refused; the environment is shared with other
/// programs, so these only warn.)
fn unknown_variables(names: impl Iterator<Item = std::ffi::OsString>) -> Vec<String> {
    names
        .filter_map(|n| n.into_string().ok())
        .filter(|n| n.starts_with("LEDGER_") && !VARIABLES.contains(&n.as_str()))
        .collect()
}

/// A listen address is `HOST:PORT` (`[v6]:PORT` for an IPv6 address),
/// checked before anything is written; whether it can be bound is known
/// only when binding.
fn check_listen(listen: &str) -> Result<(), String> {
    let bad = || format!("expected HOST:PORT such as 127.0.0.1:8080, got {listen:?}");
    let (host, port) = listen.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = !host.is_empty()
        && if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            v6.parse::<std::net::Ipv6Addr>().is_ok()
        } else {
            host.parse::<std::net::Ipv4Addr>().is_ok()
                || host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        };
    if !host_ok || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    Ok(())
}

/// A root (master) key: 32 bytes in base64, surrounding whitespace ignored.
pub fn parse_root_key(text: &str) -> anyhow::Result<crate::crypto::RawKey> {
    let bytes = zeroize::Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .context("the master key must be base64")?,
    );
    let Ok(arr) = <[u8; 32]>::try_from(bytes.as_slice()) else {
        bail!(
            "the master key must be 32 bytes (44 characters of base64), not {} bytes",
            bytes.len()
        );
    };
    Ok(zeroize::Zeroizing::new(arr))
}

/// A configuration file that holds secrets should be readable by the
/// service's user only (docs/operations.md); say so when it is not.
fn warn_if_readable_by_others(path: &Path) {
    warn_if_shared(
        path,
        "the configuration file holds a secret (master_key or jwt_secret) and other users may read it; \
         make it mode 0600 or move the secret to LEDGER_MASTER_KEY_FILE",
    );
}

/// Warns when other users may read or write a file holding a secret.
fn warn_if_shared(path: &Path, why: &str) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{:o}", mode & 0o777),
                "{why}"
            );
        }
    }
}

/// Reads a generated secret, creating it (mode 0600) on first use.
fn generated_secret(path: &Path, what: &str, variable: &str) -> anyhow::Result<String> {
    if let Ok(existing) = std::fs::read_to_string(path) {
        warn_if_shared(
            path,
            &format!("other users may read the {what} in this file; make it mode 0600"),
        );
        return Ok(existing);
    }
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let value =
        base64::engine::general_purpose::STANDARD.encode(*crate::crypto::Key::generate_raw());
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut f) => {
            f.write_all(value.as_bytes())?;
            f.sync_all()?;
            tracing::warn!(
                path = %path.display(),
                "generated a {what} for the embedded default; production must supply its own through {variable}, \
                 and whoever can read this file can read the ledger"
            );
            Ok(value)
        }
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok(std::fs::read_to_string(path)?)
        }
        Err(e) => Err(e).with_context(|| format!("cannot create {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> anyhow::Result<Config> {
        let vars: std::collections::HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| vars.get(k).cloned())
    }

    #[test]
    fn misspelt_variables_are_found() {
        let names = [
            "LEDGER_SWEEP_INTERAVL",
            "LEDGER_LISTEN",
            "PATH",
            "LEDGER_DATA_DIR",
        ]
        .map(std::ffi::OsString::from);
        assert_eq!(
            unknown_variables(names.into_iter()),
            ["LEDGER_SWEEP_INTERAVL"]
        );
        // Every variable the code reads is listed.
        let source: String = [
            "config.rs",
            "telemetry.rs",
            "bench/mod.rs",
            "cli.rs",
            "app.rs",
            "storage/mod.rs",
        ]
        .iter()
        .map(|f| {
            let text =
                std::fs::read_to_string(format!("{}/src/{f}", env!("CARGO_MANIFEST_DIR"))).unwrap();
            // The code, not its tests.
            text.split("#[cfg(test)]").next().unwrap().to_string()
        })
        .collect();
        for part in source.split("\"LEDGER_").skip(1) {
            let name: String = part
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                .collect();
            if !name.is_empty() && part[name.len()..].starts_with('"') {
                assert!(
                    VARIABLES.contains(&format!("LEDGER_{name}").as_str()),
                    "LEDGER_{name}"
                );
            }
        }
    }

    #[test]
    fn listen_addresses_are_host_and_port() {
        for ok in [
            "127.0.0.1:8080",
            "0.0.0.0:0",
            "[::1]:8080",
            "localhost:9000",
            "ledger.internal:443",
        ] {
            assert!(check_listen(ok).is_ok(), "{ok}");
        }
        for bad in [
            "nonsense",
            "127.0.0.1:99999",
            ":8080",
            "127.0.0.1:",
            "::1:8080",
            "host name:80",
            "[zz]:80",
        ] {
            assert!(check_listen(bad).is_err(), "{bad}");
        }
        let e = config(&[("LEDGER_LISTEN", "nonsense")]).unwrap_err();
        assert!(
            format!("{e:#}").starts_with("LEDGER_LISTEN: expected HOST:PORT"),
            "{e:#}"
        );
    }

    #[test]
    fn secrets_in_the_file_are_named_by_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ledger.toml");
        let path = file.display().to_string();
        std::fs::write(&file, "master_key = \"bad!!\"\n").unwrap();
        let e = config(&[("LEDGER_CONFIG", &path)]).unwrap_err();
        assert!(
            format!("{e:#}").starts_with(&format!(
                "`master_key` in {path}: the master key must be base64"
            )),
            "{e:#}"
        );
        std::fs::write(&file, "jwt_secret = \"short\"\n").unwrap();
        let e = config(&[("LEDGER_CONFIG", &path)]).unwrap_err();
        assert!(
            format!("{e:#}")
                .starts_with(&format!("`jwt_secret` in {path}: the JWT secret must be")),
            "{e:#}"
        );
    }

    #[test]
    fn a_file_that_does_not_parse_is_named_by_line_without_quoting_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ledger.toml");
        let key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
        for text in [
            format!("listen = \"127.0.0.1:9\"\ndata_key_max_seals = \"{key}\"\n"),
            format!("listen = \"127.0.0.1:9\"\nmaster_key = \"{key}\",\n"),
            format!("listen = \"127.0.0.1:9\"\njwt_secret = \"{key}\n"),
            format!("listen = \"127.0.0.1:9\"\nmaster_key = {key}\n"),
        ] {
            std::fs::write(&file, &text).unwrap();
            let path = file.display().to_string();
            let e = format!("{:#}", config(&[("LEDGER_CONFIG", &path)]).unwrap_err());
            assert!(
                e.starts_with(&format!(
                    "invalid configuration file {path} line 2, column "
                )),
                "{e}"
            );
            assert!(!e.contains(&key[..8]), "{e}");
        }
    }

    #[test]
    fn errors_name_the_variable_or_the_files_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ledger.toml");
        std::fs::write(&file, "sweep_interval = \"often\"\n").unwrap();
        let path = file.display().to_string();
        let e = config(&[("LEDGER_CONFIG", &path)]).unwrap_err();
        assert!(
            format!("{e:#}").starts_with(&format!("`sweep_interval` in {path} must be")),
            "{e:#}"
        );
        // The variable wins over the file, and is what the message names.
        let e = config(&[("LEDGER_CONFIG", &path), ("LEDGER_SWEEP_INTERVAL", "soon")]).unwrap_err();
        assert!(
            format!("{e:#}").starts_with("LEDGER_SWEEP_INTERVAL must be"),
            "{e:#}"
        );
        assert!(config(&[("LEDGER_CONFIG", &path), ("LEDGER_SWEEP_INTERVAL", "10m")]).is_ok());
    }

    #[test]
    fn sweep_interval_is_off_or_at_least_a_second() {
        assert_eq!(
            config(&[("LEDGER_SWEEP_INTERVAL", "0")])
                .unwrap()
                .sweep_interval,
            Duration::ZERO
        );
        assert!(config(&[("LEDGER_SWEEP_INTERVAL", "1s")]).is_ok());
        assert!(config(&[("LEDGER_SWEEP_INTERVAL", "999ms")]).is_err());
        assert!(config(&[("LEDGER_SWEEP_INTERVAL", "7d")]).is_ok());
        let e = config(&[("LEDGER_SWEEP_INTERVAL", "8d")]).unwrap_err();
        assert!(format!("{e:#}").contains("at most 7days"), "{e:#}");
        let e = config(&[("LEDGER_REQUEST_TIMEOUT", "99999999999y")]).unwrap_err();
        assert!(
            format!("{e:#}").starts_with("LEDGER_REQUEST_TIMEOUT must be"),
            "{e:#}"
        );
    }

    #[test]
    fn anonymous_denials_per_second() {
        let rate = |v: &str| {
            config(&[("LEDGER_ANONYMOUS_DENIALS_PER_SECOND", v)])
                .map(|c| c.anonymous_denials_per_second)
                .map_err(|e| format!("{e:#}"))
        };
        assert_eq!(config(&[]).unwrap().anonymous_denials_per_second, 10);
        assert_eq!(rate("0"), Ok(0));
        assert_eq!(rate("100000"), Ok(100_000));
        for bad in ["-1", "100001", "ten"] {
            let e = rate(bad).unwrap_err();
            assert!(
                e.starts_with("LEDGER_ANONYMOUS_DENIALS_PER_SECOND must be"),
                "{e}"
            );
        }
    }

    #[test]
    fn claim_timeout_is_at_least_ten_seconds_and_never_off() {
        let default = config(&[]).unwrap().claim_timeout;
        assert_eq!(default, Duration::from_secs(120));
        assert_eq!(
            config(&[("LEDGER_CLAIM_TIMEOUT", "5m")])
                .unwrap()
                .claim_timeout,
            Duration::from_secs(300)
        );
        let e = config(&[("LEDGER_CLAIM_TIMEOUT", "0")]).unwrap_err();
        assert!(
            format!("{e:#}").starts_with("LEDGER_CLAIM_TIMEOUT cannot be 0"),
            "{e:#}"
        );
        let e = config(&[("LEDGER_CLAIM_TIMEOUT", "9s")]).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "LEDGER_CLAIM_TIMEOUT must be at least 10s (a shorter one turns every slow step into a takeover)"
        );
        assert!(config(&[("LEDGER_CLAIM_TIMEOUT", "10s")]).is_ok());
    }

    #[test]
    fn connections_are_at_least_two_from_either_source() {
        assert_eq!(config(&[]).unwrap().db_max_connections, 16);
        for bad in ["0", "1", "many"] {
            let e = config(&[("LEDGER_DB_MAX_CONNECTIONS", bad)]).unwrap_err();
            assert!(format!("{e:#}").contains("at least 2"), "{bad}: {e:#}");
        }
        assert_eq!(
            config(&[("LEDGER_DB_MAX_CONNECTIONS", "2")])
                .unwrap()
                .db_max_connections,
            2
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ledger.toml");
        std::fs::write(&file, "db_max_connections = 0\n").unwrap();
        let path = file.display().to_string();
        let e = config(&[("LEDGER_CONFIG", &path)]).unwrap_err();
        assert!(
            format!("{e:#}").starts_with(&format!(
                "`db_max_connections` in {path} must be a whole number of at least 2"
            )),
            "{e:#}"
        );
    }

    #[test]
    fn the_environments_root_key_overrides_the_files_whole() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ledger.toml");
        let key = "MTIzNDU2Nzg5MGFiY2RlZjEyMzQ1Njc4OTBhYmNkZWY=";
        std::fs::write(&file, format!("master_key = \"{key}\"\n")).unwrap();
        let path = file.display().to_string();
        let c = config(&[
            ("LEDGER_CONFIG", &path),
            ("LEDGER_MASTER_KEY_FILE", "/keys/root.key"),
        ])
        .unwrap();
        assert!(c.master_key.is_none());
        assert_eq!(
            c.master_key_file.as_deref(),
            Some(std::path::Path::new("/keys/root.key"))
        );
        assert!(config(&[("LEDGER_CONFIG", &path)])
            .unwrap()
            .master_key
            .is_some());
        let e =
            config(&[("LEDGER_MASTER_KEY", key), ("LEDGER_MASTER_KEY_FILE", "/k")]).unwrap_err();
        assert!(format!("{e:#}").contains("set one"), "{e:#}");
    }

    #[test]
    fn master_key_errors_name_their_source() {
        let e = config(&[("LEDGER_MASTER_KEY", "not*base64")]).unwrap_err();
        assert!(format!("{e:#}").starts_with("LEDGER_MASTER_KEY: the master key must be base64"));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k");
        std::fs::write(&file, "AAAA").unwrap();
        let e = config(&[("LEDGER_MASTER_KEY_FILE", &file.display().to_string())])
            .unwrap()
            .check_secrets()
            .unwrap_err();
        assert!(
            format!("{e:#}").contains(&format!(
                "LEDGER_MASTER_KEY_FILE {}: the master key must be 32 bytes",
                file.display()
            )),
            "{e:#}"
        );
    }
}
