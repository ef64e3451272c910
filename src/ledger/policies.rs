//! Reloading what operators change while the service runs: the policy files
//! (`POST /v1/policies/reload`, `SIGHUP`) and the JWKS document (on change,
//! `SIGHUP`). A reload that fails leaves everything as it was; every reload,
//! and every refused one, is audited.

use serde_json::json;

use crate::app::{AppState, Reloaded};
use crate::audit::{self, Event};
use crate::auth::{Principal, Role};
use crate::error::{AppError, Result};

/// Re-reads `policies/` for `who`: an admin the caller has authorized, or
/// the system on `SIGHUP` (the operator who can signal the process needs no
/// rule, so a policy that drops the admin's right cannot lock reloads out).
pub async fn reload(state: &AppState, who: &Principal) -> Result<Reloaded> {
    match state.reload_policies().await {
        Ok(reloaded) => {
            let files: serde_json::Map<String, serde_json::Value> = reloaded
                .files
                .iter()
                .map(|f| (f.file.clone(), f.sha256.clone().into()))
                .collect();
            record(
                state,
                who,
                "policies.reload",
                json!({ "files": files, "source": reloaded.source }),
            )
            .await?;
            tracing::info!(by = %who.sub, "policies reloaded");
            Ok(reloaded)
        }
        Err(e) => {
            let problem = format!("{e:#}");
            record(
                state,
                who,
                "policies.reload_refused",
                json!({ "problem": problem }),
            )
            .await?;
            tracing::warn!(by = %who.sub, %problem, "policy reload refused; the previous policy stays in force");
            Err(AppError::validation(
                "policies",
                format!("{problem}; the previous policy stays in force"),
            ))
        }
    }
}

/// Re-reads the JWKS file if it changed, auditing a change.
pub async fn reload_jwks(state: &AppState, who: &Principal) -> anyhow::Result<bool> {
    if !state.reload_jwks().await? {
        return Ok(false);
    }
    record(state, who, "keys.jwks_reload", json!({}))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    tracing::info!(by = %who.sub, "JWKS reloaded");
    Ok(true)
}

async fn record(
    state: &AppState,
    who: &Principal,
    action: &'static str,
    target: serde_json::Value,
) -> Result<()> {
    let mut tx = state.db.begin().await?;
    audit::append(&mut tx, Some(who), &Event::new(action, target)).await?;
    tx.commit().await?;
    Ok(())
}

/// The identity reloads triggered by a signal or a timer are audited under.
pub fn system(trigger: &str) -> Principal {
    Principal {
        sub: format!("system:{trigger}"),
        role: Role::Admin,
        carrier: None,
    }
}

/// Reloads on `SIGHUP` and polls the JWKS file every `every`.
pub async fn run_watcher(
    state: AppState,
    every: std::time::Duration,
    stop: std::sync::Arc<tokio::sync::Notify>,
) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reload through the API");
            None
        }
    };
    let mut last_jwks_error = None;
    loop {
        let hangup = async {
            match hup.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        let signalled = tokio::select! {
            _ = stop.notified() => return,
            _ = hangup => true,
            _ = tokio::time::sleep(every) => false,
        };
        if signalled {
            tracing::info!("SIGHUP: reloading policies, JWKS and keyring");
            let who = system("SIGHUP");
            // A refusal is logged and audited inside `reload`.
            let _ = reload(&state, &who).await;
            if let Err(e) = state.keys.refresh(&state.db).await {
                tracing::error!(error = %e, "cannot re-read the keyring");
            }
        }
        let who = system(if signalled { "SIGHUP" } else { "jwks-watch" });
        match reload_jwks(&state, &who).await {
            Ok(_) => last_jwks_error = None,
            Err(e) => {
                let msg = format!("{e:#}");
                if last_jwks_error.as_ref() != Some(&msg) {
                    tracing::error!(error = %msg, "the JWKS file does not load; the previous keys stay in force");
                    last_jwks_error = Some(msg);
                }
            }
        }
    }
}
