//! Building and running the service.

use std::future::Future;
use std::os::unix::fs::DirBuilderExt;
use std::sync::{Arc, RwLock};

use anyhow::Context;
use tokio::net::TcpListener;

use crate::auth::{Policy, TokenVerifier};
use crate::config::Config;
use crate::crypto::Keyring;
use crate::retention::RetentionPolicy;
use crate::storage::Db;

/// Everything a request handler needs, cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub keys: Arc<Keyring>,
    pub config: Arc<Config>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// How many anonymous refusals this instance audits one by one.
    pub denials: Arc<crate::audit::denials::DenialBudget>,
    /// Where this process last saw the audit chain end.
    pub audit_head: Arc<crate::audit::HeadGuess>,
    pub catalogs: Arc<crate::i18n::Catalogs>,
    /// Wakes the subject-request processor.
    pub requests_ready: Arc<tokio::sync::Notify>,
    /// Wakes readers waiting (`Prefer: wait`) for a request to complete.
    pub requests_done: Arc<tokio::sync::Notify>,
    /// Wakes the key worker after a master-key rotation.
    pub rewrap_ready: Arc<tokio::sync::Notify>,
    /// One rewrap pass at a time in this process.
    pub rewrap_lock: Arc<tokio::sync::Mutex<()>>,
    /// What configuration and `policies/` say; replaced whole on reload.
    tokens: Arc<RwLock<Arc<TokenVerifier>>>,
    jwks_fingerprint: Arc<RwLock<Option<[u8; 32]>>>,
    policy: Arc<RwLock<Arc<Policy>>>,
    retention: Arc<RwLock<Arc<RetentionPolicy>>>,
    /// Serializes reloads.
    reload_lock: Arc<tokio::sync::Mutex<()>>,
}

/// The policies as read from `policies/` (or the compiled-in defaults).
pub struct LoadedPolicies {
    pub policy: Policy,
    pub retention: RetentionPolicy,
    /// SHA-256 of each file read, for the audit trail.
    pub files: Vec<(String, String)>,
    /// The directory read, or that the compiled-in defaults are in force.
    pub source: String,
}

/// What `source` says when no policy directory is configured or found.
pub const COMPILED_IN: &str = "compiled into the binary";

/// What a reload changed.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Reloaded {
    /// The policy files now in force, with their SHA-256.
    pub files: Vec<ReloadedFile>,
    /// The directory they were read from, or `compiled into the binary`
    /// when no policy directory is configured or found.
    pub source: String,
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ReloadedFile {
    pub file: String,
    pub sha256: String,
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Reads and validates `model.conf`, `policy.csv` and `retention.toml`; the
/// error names the file and, where the parser knows it, the line.
pub async fn load_policies(dir: Option<&std::path::Path>) -> anyhow::Result<LoadedPolicies> {
    let Some(dir) = dir else {
        use crate::{auth::policy, retention::policy::DEFAULT_RETENTION};
        return Ok(LoadedPolicies {
            policy: Policy::load(None).await?,
            retention: RetentionPolicy::default_policy(),
            files: [
                ("model.conf", policy::DEFAULT_MODEL),
                ("policy.csv", policy::DEFAULT_POLICY),
                ("retention.toml", DEFAULT_RETENTION),
            ]
            .into_iter()
            .map(|(name, text)| (name.to_string(), sha256_hex(text.as_bytes())))
            .collect(),
            source: COMPILED_IN.to_string(),
        });
    };
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {} (the policy directory is LEDGER_POLICY_DIR, or ./policies when \
                 that exists; it needs model.conf, policy.csv and retention.toml)",
                path.display()
            )
        })
    };
    let (model, rules, retention) = (
        read("model.conf")?,
        read("policy.csv")?,
        read("retention.toml")?,
    );
    let files = vec![
        ("model.conf".to_string(), sha256_hex(model.as_bytes())),
        ("policy.csv".to_string(), sha256_hex(rules.as_bytes())),
        (
            "retention.toml".to_string(),
            sha256_hex(retention.as_bytes()),
        ),
    ];
    let policy = Policy::from_text(&model, &rules).await?;
    let retention = RetentionPolicy::parse(&retention).map_err(|e| {
        // "retention.toml line 13: …" → "/etc/…/retention.toml line 13: …"
        let e = e.to_string();
        let why = e.strip_prefix("retention.toml").unwrap_or(&e);
        anyhow::anyhow!("{}{why}", dir.join("retention.toml").display())
    })?;
    Ok(LoadedPolicies {
        policy,
        retention,
        files,
        source: dir.display().to_string(),
    })
}

/// Reads the JWKS file, or `None` for HS256 with the configured secret.
fn load_jwks(config: &Config) -> anyhow::Result<Option<(TokenVerifier, [u8; 32])>> {
    let Some(path) = &config.jwt_keys_file else {
        return Ok(None);
    };
    let doc = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read LEDGER_JWT_KEYS_FILE {}", path.display()))?;
    let verifier = TokenVerifier::jwks(&doc, &config.jwt_issuer, &config.jwt_audience)
        .with_context(|| format!("LEDGER_JWT_KEYS_FILE {}", path.display()))?;
    use sha2::Digest;
    Ok(Some((
        verifier,
        sha2::Sha256::digest(doc.as_bytes()).into(),
    )))
}

impl AppState {
    /// Connects, migrates and loads keys and policies: everything `serve`
    /// and the other subcommands share.
    pub async fn init(config: Config) -> anyhow::Result<Self> {
        // Everything that can be refused is checked before anything is
        // written: a refused start leaves no generated key, no database.
        config.check_secrets()?;
        let loaded = load_policies(config.policy_dir().as_deref()).await?;
        let jwks = load_jwks(&config)?;
        tracing::info!(source = %loaded.source, "authorization and retention policies loaded");
        if config.database_url.is_none() && !config.data_dir.exists() {
            // Only the service's user may read the embedded database.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&config.data_dir)
                .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
        }
        let db = Db::connect(&config.database_url(), config.db_max_connections).await?;
        db.migrate().await.context("migrations failed")?;
        if let Some(path) = config.generated_master_key_file() {
            if !path.exists() && Keyring::exists(&db).await? {
                anyhow::bail!(
                    "this database's keys are sealed under a master key that is not configured: \
                     set LEDGER_MASTER_KEY or LEDGER_MASTER_KEY_FILE as when it was created \
                     (no key was generated, nothing was changed)"
                );
            }
        }
        let secrets = config.secrets()?;
        let keys = Keyring::open(&db, &secrets.root_key).await?;
        let (tokens, fingerprint) = match jwks {
            Some((verifier, fingerprint)) => (verifier, Some(fingerprint)),
            None => (
                TokenVerifier::hs256(
                    &secrets.jwt_secret,
                    &config.jwt_issuer,
                    &config.jwt_audience,
                ),
                None,
            ),
        };
        let denials = crate::audit::denials::DenialBudget::new(config.anonymous_denials_per_second);
        Ok(Self {
            db,
            keys: Arc::new(keys),
            config: Arc::new(config),
            metrics: Arc::new(crate::metrics::Metrics::new()),
            denials: Arc::new(denials),
            audit_head: Arc::default(),
            catalogs: Arc::new(crate::i18n::Catalogs::load()?),
            requests_ready: Arc::new(tokio::sync::Notify::new()),
            requests_done: Arc::new(tokio::sync::Notify::new()),
            rewrap_ready: Arc::new(tokio::sync::Notify::new()),
            rewrap_lock: Arc::new(tokio::sync::Mutex::new(())),
            tokens: Arc::new(RwLock::new(Arc::new(tokens))),
            jwks_fingerprint: Arc::new(RwLock::new(fingerprint)),
            policy: Arc::new(RwLock::new(Arc::new(loaded.policy))),
            retention: Arc::new(RwLock::new(Arc::new(loaded.retention))),
            reload_lock: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy.read().expect("policy lock").clone()
    }

    pub fn tokens(&self) -> Arc<TokenVerifier> {
        self.tokens.read().expect("tokens lock").clone()
    }

    /// Re-reads `policies/`: the new model, rules and retention take effect
    /// together, or (on any error) none does and the old ones stay.
    pub async fn reload_policies(&self) -> anyhow::Result<Reloaded> {
        let _one = self.reload_lock.lock().await;
        let loaded = load_policies(self.config.policy_dir().as_deref()).await?;
        *self.policy.write().expect("policy lock") = Arc::new(loaded.policy);
        *self.retention.write().expect("retention lock") = Arc::new(loaded.retention);
        Ok(Reloaded {
            files: loaded
                .files
                .into_iter()
                .map(|(file, sha256)| ReloadedFile { file, sha256 })
                .collect(),
            source: loaded.source,
        })
    }

    /// Re-reads the JWKS file if its content changed. Returns whether the
    /// keys in force changed; a file that does not load leaves them as they
    /// were and is reported.
    pub async fn reload_jwks(&self) -> anyhow::Result<bool> {
        let _one = self.reload_lock.lock().await;
        let Some((verifier, fingerprint)) = load_jwks(&self.config)? else {
            return Ok(false);
        };
        let mut current = self.jwks_fingerprint.write().expect("jwks lock");
        if *current == Some(fingerprint) {
            return Ok(false);
        }
        *current = Some(fingerprint);
        *self.tokens.write().expect("tokens lock") = Arc::new(verifier);
        Ok(true)
    }

    pub fn retention(&self) -> Arc<RetentionPolicy> {
        self.retention.read().expect("retention lock").clone()
    }
}

/// The HTTP service bound to its listener; `port()` tells tests where.
pub struct Application {
    listener: TcpListener,
    state: AppState,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let listen = config.listen.clone();
        let state = AppState::init(config).await?;
        let listener = TcpListener::bind(&listen)
            .await
            .with_context(|| format!("cannot listen on {listen} (LEDGER_LISTEN)"))?;
        Ok(Self { listener, state })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then finishes in-flight requests.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let addr = self.listener.local_addr()?;
        tracing::info!(%addr, backend = self.state.db.backend(), "transfer-ledger listening");
        let router = crate::http::router(self.state.clone());
        let config = &self.state.config;
        let sweeper = (!config.sweep_interval.is_zero()).then(|| {
            tracing::info!(every = ?config.sweep_interval, "retention sweeps scheduled");
            tokio::spawn(crate::retention::sweep::schedule(
                self.state.clone(),
                config.sweep_interval,
                config.sweep_batch,
            ))
        });
        let stop_worker = Arc::new(tokio::sync::Notify::new());
        let worker = tokio::spawn(crate::requests::run_worker(
            self.state.clone(),
            stop_worker.clone(),
        ));
        let every = config
            .reload_interval
            .max(std::time::Duration::from_millis(100));
        let stop_keys = Arc::new(tokio::sync::Notify::new());
        let keys = tokio::spawn(crate::ledger::keys::run_worker(
            self.state.clone(),
            every,
            stop_keys.clone(),
        ));
        let stop_watcher = Arc::new(tokio::sync::Notify::new());
        let watcher = tokio::spawn(crate::ledger::policies::run_watcher(
            self.state.clone(),
            every,
            stop_watcher.clone(),
        ));
        let stop_checkpoints = Arc::new(tokio::sync::Notify::new());
        let checkpoints = tokio::spawn({
            let (state, stop) = (self.state.clone(), stop_checkpoints.clone());
            let every = config.checkpoint_interval;
            async move {
                if !every.is_zero() {
                    state.db.run_checkpointer(every, stop).await
                }
            }
        });
        let stop_denials = Arc::new(tokio::sync::Notify::new());
        let denials = tokio::spawn(crate::audit::run_denial_flusher(
            self.state.clone(),
            stop_denials.clone(),
        ));
        crate::http::server::serve(self.listener, router, shutdown).await;
        // The count of refusals held back since the last flush goes into
        // the chain before the database closes.
        stop_denials.notify_one();
        if tokio::time::timeout(std::time::Duration::from_secs(5), denials)
            .await
            .is_err()
        {
            tracing::warn!("the count of refused requests was not audited within 5 s");
        }
        // A request cut short here is picked up again by the next processor;
        // a rewrap batch cut short rolls back and is redone by the next pass.
        for (stop, task) in [
            (stop_worker, worker),
            (stop_keys, keys),
            (stop_watcher, watcher),
        ] {
            stop.notify_one();
            task.abort();
        }
        // The checkpointer closes its connection itself (a checkpoint takes
        // at most a moment), so that closing the pools below is what closes
        // the last connection, which checkpoints the rest of the log.
        stop_checkpoints.notify_one();
        if tokio::time::timeout(std::time::Duration::from_secs(5), checkpoints)
            .await
            .is_err()
        {
            tracing::warn!("the checkpointer did not stop within 5 s");
        }
        if let Some(s) = sweeper {
            // A sweep cut short here resumes with the next one.
            s.abort();
        }
        self.state.db.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested; finishing in-flight requests");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn compiled_in_policies_say_so_and_list_their_hashes() {
        let loaded = load_policies(None).await.unwrap();
        assert_eq!(loaded.source, COMPILED_IN);
        let from_dir = load_policies(Some(std::path::Path::new("policies")))
            .await
            .unwrap();
        assert_eq!(from_dir.source, "policies");
        // The repository's files are the ones compiled in.
        assert_eq!(loaded.files, from_dir.files);
        assert_eq!(loaded.files.len(), 3);
    }
}
