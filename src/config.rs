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
    /// Encryptions a data key may make before it is replaced.
    pub data_key_max_seals: i64,
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
    data_key_max_seals: Option<i64>,
    #[serde(default)]
    controller: Contact,
    #[serde(default)]
    dpo: Contact,
}

/// Secrets resolved from configuration or generated for the embedded default.
pub struct Secrets {
    pub root_key: RawKey,
    pub jwt_secret: SecretString,
}

impl Config {
    /// Reads `LEDGER_CONFIG` (if set) and the environment.
    pub fn from_env() -> anyhow::Result<Self> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Builds the configuration from any variable source (tests pass a map).
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let file: FileConfig = match var("LEDGER_CONFIG") {
            Some(path) => {
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read LEDGER_CONFIG {path}"))?;
                toml::from_str(&text)
                    .with_context(|| format!("invalid configuration file {path}"))?
            }
            None => FileConfig::default(),
        };
        let env = |k: &str| var(k).filter(|v| !v.is_empty());
        let duration = |name: &str, v: Option<String>, default: &str| -> anyhow::Result<Duration> {
            let v = v.unwrap_or_else(|| default.to_string());
            if v.trim() == "0" {
                return Ok(Duration::ZERO);
            }
            humantime::parse_duration(v.trim())
                .with_context(|| format!("{name} must be a duration such as 30s, 1h or 0"))
        };
        let policy_dir = env("LEDGER_POLICY_DIR")
            .map(PathBuf::from)
            .or(file.policy_dir);
        Ok(Self {
            data_dir: env("LEDGER_DATA_DIR")
                .map(PathBuf::from)
                .or(file.data_dir)
                .unwrap_or_else(|| "ledger-data".into()),
            database_url: env("LEDGER_DATABASE_URL").or(file.database_url),
            listen: env("LEDGER_LISTEN")
                .or(file.listen)
                .unwrap_or_else(|| "127.0.0.1:8080".into()),
            master_key: env("LEDGER_MASTER_KEY")
                .or(file.master_key)
                .map(SecretString::from),
            master_key_file: env("LEDGER_MASTER_KEY_FILE")
                .map(PathBuf::from)
                .or(file.master_key_file),
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
            sweep_interval: duration(
                "LEDGER_SWEEP_INTERVAL",
                env("LEDGER_SWEEP_INTERVAL").or(file.sweep_interval),
                "1h",
            )?,
            sweep_batch: match env("LEDGER_SWEEP_BATCH") {
                Some(v) => v
                    .parse()
                    .ok()
                    .filter(|n: &i64| (1..=100_000).contains(n))
                    .context("LEDGER_SWEEP_BATCH must be a whole number from 1 to 100000")?,
                None => 20_000,
            },
            db_max_connections: match env("LEDGER_DB_MAX_CONNECTIONS") {
                Some(v) => v
                    .parse()
                    .ok()
                    .filter(|n: &u32| *n >= 1)
                    .context("LEDGER_DB_MAX_CONNECTIONS must be a positive integer")?,
                None => file.db_max_connections.unwrap_or(16),
            },
            request_timeout: duration(
                "LEDGER_REQUEST_TIMEOUT",
                env("LEDGER_REQUEST_TIMEOUT").or(file.request_timeout),
                "60s",
            )?,
            body_limit_bytes: match env("LEDGER_BODY_LIMIT_BYTES") {
                Some(v) => v
                    .parse()
                    .context("LEDGER_BODY_LIMIT_BYTES must be a byte count")?,
                None => file.body_limit_bytes.unwrap_or(32 * 1024 * 1024),
            },
            reload_interval: duration(
                "LEDGER_RELOAD_INTERVAL",
                env("LEDGER_RELOAD_INTERVAL").or(file.reload_interval),
                "5s",
            )?,
            checkpoint_interval: Some(duration(
                "LEDGER_CHECKPOINT_INTERVAL",
                env("LEDGER_CHECKPOINT_INTERVAL").or(file.checkpoint_interval),
                "100ms",
            )?)
            .filter(|d| d.is_zero() || *d >= Duration::from_millis(10))
            .context("LEDGER_CHECKPOINT_INTERVAL must be 0 (off) or at least 10ms")?,
            data_key_max_seals: match env("LEDGER_DATA_KEY_MAX_SEALS") {
                Some(v) => v.parse().ok(),
                None => file.data_key_max_seals.or(Some(DATA_KEY_MAX_SEALS)),
            }
            .filter(|n: &i64| (DATA_KEY_MIN_SEALS..=DATA_KEY_MAX_SEALS).contains(n))
            .with_context(|| {
                format!(
                    "LEDGER_DATA_KEY_MAX_SEALS must be a whole number from {DATA_KEY_MIN_SEALS} to {DATA_KEY_MAX_SEALS}"
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

    /// `LEDGER_DATABASE_URL`, or the SQLite file in the data dir.
    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!("sqlite://{}", self.data_dir.join("ledger.db").display()),
        }
    }

    /// The policy directory: `LEDGER_POLICY_DIR`, else `./policies` if it
    /// exists, else `None` (the compiled-in defaults).
    pub fn policy_dir(&self) -> Option<PathBuf> {
        self.policy_dir.clone().or_else(|| {
            let p = PathBuf::from("policies");
            p.join("model.conf").is_file().then_some(p)
        })
    }

    /// Where the root key comes from when neither `LEDGER_MASTER_KEY` nor
    /// `LEDGER_MASTER_KEY_FILE` is set: the embedded default's generated file.
    pub fn generated_master_key_file(&self) -> Option<PathBuf> {
        (self.master_key.is_none() && self.master_key_file.is_none())
            .then(|| self.data_dir.join("master.key"))
    }

    /// Resolves the master key and the HS256 secret, generating files in the
    /// data dir for whichever is not configured.
    pub fn secrets(&self) -> anyhow::Result<Secrets> {
        let root_b64 = match (&self.master_key, &self.master_key_file) {
            (Some(k), _) => k.expose_secret().to_string(),
            (None, Some(path)) => std::fs::read_to_string(path).with_context(|| {
                format!("cannot read LEDGER_MASTER_KEY_FILE {}", path.display())
            })?,
            (None, None) => {
                let path = self.data_dir.join("master.key");
                generated_secret(
                    &path,
                    "master key",
                    "LEDGER_MASTER_KEY or LEDGER_MASTER_KEY_FILE",
                )?
            }
        };
        let root_key = parse_root_key(&root_b64)?;
        let jwt_secret = match &self.jwt_secret {
            Some(s) => s.clone(),
            None => {
                let path = self.data_dir.join("jwt.secret");
                SecretString::from(
                    generated_secret(&path, "JWT secret", "LEDGER_JWT_SECRET")?
                        .trim()
                        .to_string(),
                )
            }
        };
        if jwt_secret.expose_secret().len() < 32 {
            bail!("LEDGER_JWT_SECRET must be at least 32 bytes long");
        }
        Ok(Secrets {
            root_key,
            jwt_secret,
        })
    }
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

/// Reads a generated secret, creating it (mode 0600) on first use.
fn generated_secret(path: &Path, what: &str, variable: &str) -> anyhow::Result<String> {
    if let Ok(existing) = std::fs::read_to_string(path) {
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
