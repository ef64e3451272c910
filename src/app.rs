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
    pub tokens: Arc<TokenVerifier>,
    pub config: Arc<Config>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub catalogs: Arc<crate::i18n::Catalogs>,
    /// Wakes the subject-request processor.
    pub requests_ready: Arc<tokio::sync::Notify>,
    policy: Arc<RwLock<Arc<Policy>>>,
    retention: Arc<RwLock<Arc<RetentionPolicy>>>,
}

impl AppState {
    /// Connects, migrates and loads keys and policies: everything `serve`
    /// and the other subcommands share.
    pub async fn init(config: Config) -> anyhow::Result<Self> {
        let secrets = config.secrets()?;
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
        let keys = Keyring::open(&db, &secrets.root_key).await?;
        let policy_dir = config.policy_dir();
        let policy = Policy::load(policy_dir.as_deref()).await?;
        let retention = match &policy_dir {
            Some(dir) => {
                let path = dir.join("retention.toml");
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                RetentionPolicy::parse(&text).map_err(anyhow::Error::msg)?
            }
            None => RetentionPolicy::default_policy(),
        };
        let tokens = match &config.jwt_keys_file {
            Some(path) => {
                let doc = std::fs::read_to_string(path).with_context(|| {
                    format!("cannot read LEDGER_JWT_KEYS_FILE {}", path.display())
                })?;
                TokenVerifier::jwks(&doc, &config.jwt_issuer, &config.jwt_audience)
                    .with_context(|| format!("LEDGER_JWT_KEYS_FILE {}", path.display()))?
            }
            None => TokenVerifier::hs256(
                &secrets.jwt_secret,
                &config.jwt_issuer,
                &config.jwt_audience,
            ),
        };
        Ok(Self {
            db,
            keys: Arc::new(keys),
            tokens: Arc::new(tokens),
            config: Arc::new(config),
            metrics: Arc::new(crate::metrics::Metrics::new()),
            catalogs: Arc::new(crate::i18n::Catalogs::load()?),
            requests_ready: Arc::new(tokio::sync::Notify::new()),
            policy: Arc::new(RwLock::new(Arc::new(policy))),
            retention: Arc::new(RwLock::new(Arc::new(retention))),
        })
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy.read().expect("policy lock").clone()
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
            .with_context(|| format!("cannot listen on {listen}"))?;
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
        axum::serve(self.listener, router)
            .with_graceful_shutdown(shutdown)
            .await?;
        // A request cut short here is picked up again by the next processor.
        stop_worker.notify_one();
        worker.abort();
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
