//! Key lifecycle: rotating master and signing keys, rewrapping data keys in
//! the background, retiring master-key versions that wrap nothing.
//!
//! A rotation adds a master-key version; new material is wrapped under it at
//! once (writers read the current version in their own transaction). The
//! rewrap moves existing data keys over in batches by compare-and-set: a key
//! erased or rewrapped meanwhile is skipped, never written back. It can stop
//! at any point and resume; every instance runs it when it sees keys under an
//! old version. A version is retired — its material erased — only when
//! nothing is wrapped under it any more.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde::Serialize;
use serde_json::json;

use crate::app::AppState;
use crate::audit::{self, Event};
use crate::auth::{Principal, Role};
use crate::crypto::keyring::{NewVersion, Rotatable};
use crate::error::{AppError, Result};
use crate::storage::{self, keys as store, micros, Tx};

/// Data keys rewrapped per transaction.
pub const REWRAP_BATCH: i64 = 1000;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Rotation {
    /// `master` or `signing`.
    pub key: &'static str,
    /// The version added; new material is protected by it from now on.
    pub version: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct KeyStatus {
    /// The master-key version new data keys are wrapped under.
    pub current: i64,
    pub versions: Vec<MasterVersion>,
    /// Whether data keys still wait to be rewrapped under `current`.
    pub rewrap_pending: bool,
    /// The export-signing key in use, and every one still published.
    pub signing: SigningStatus,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct MasterVersion {
    pub version: i64,
    pub created_at: chrono::DateTime<Utc>,
    /// Data (subject) keys this version still wraps.
    pub data_keys: i64,
    /// Other values sealed under it: requests' identifiers, exports' keys.
    pub other_sealed: i64,
    /// When the version was retired (its material erased), if it was.
    pub retired_at: Option<chrono::DateTime<Utc>>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SigningStatus {
    pub current: String,
    pub published: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct RewrapReport {
    /// Data keys and other sealed values moved to the current version.
    pub rewrapped: u64,
    /// Versions retired at the end.
    pub retired: Vec<i64>,
    /// Values still under an old version (held by a concurrent writer; a
    /// later pass takes them).
    pub remaining: bool,
}

fn system() -> Principal {
    Principal {
        sub: "system".into(),
        role: Role::Admin,
        carrier: None,
    }
}

/// Adds a version of a master or signing key. A master rotation wakes the
/// rewrap; the old version keeps decrypting until it wraps nothing.
pub async fn rotate(state: &AppState, who: &Principal, kind: Rotatable) -> Result<Rotation> {
    let mut tx = state.db.begin().await?;
    let version = match state.keys.add_version(&mut tx, kind).await? {
        NewVersion::Added(v) => v,
        NewVersion::Raced => {
            return Err(AppError::Conflict(
                "another rotation added a key version at the same moment".into(),
            ))
        }
        NewVersion::RootRotated => {
            return Err(AppError::Conflict(
                "the root key was rotated (keys rotate-root) since this instance started; \
                 restart it with the new root key, then rotate"
                    .into(),
            ))
        }
    };
    let key = match kind {
        Rotatable::Master => "master",
        Rotatable::Signing => "signing",
    };
    audit::append(
        &mut tx,
        Some(who),
        &Event::new("keys.rotate", json!({"key": key, "version": version})),
    )
    .await?;
    tx.commit().await?;
    state.keys.refresh(&state.db).await?;
    if kind == Rotatable::Master {
        state.rewrap_ready.notify_one();
    }
    tracing::info!(key, version, "key rotated");
    Ok(Rotation { key, version })
}

pub async fn status(state: &AppState) -> Result<KeyStatus> {
    state.keys.refresh(&state.db).await?;
    let rows = store::keyring(&state.db).await?;
    let usage = store::master_usage(&state.db).await?;
    let current = state.keys.current_version();
    let versions = rows
        .iter()
        .filter(|r| r.purpose == "master")
        .map(|r| {
            let (_, keys, other) = usage
                .iter()
                .find(|u| u.0 == r.version)
                .copied()
                .unwrap_or((r.version, 0, 0));
            MasterVersion {
                version: r.version,
                created_at: storage::from_micros(r.created_at),
                data_keys: keys,
                other_sealed: other,
                retired_at: r.retired_at.map(storage::from_micros),
            }
        })
        .collect();
    let published: Vec<String> = state
        .keys
        .verifying_keys()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    Ok(KeyStatus {
        current,
        versions,
        rewrap_pending: store::any_below(&state.db, current).await?,
        signing: SigningStatus {
            current: published.last().cloned().unwrap_or_default(),
            published,
        },
    })
}

/// Moves everything wrapped under older master-key versions to the current
/// one, then retires the versions left empty. Safe to run anywhere, any
/// number of times, concurrently with traffic and with other instances.
pub async fn rewrap(
    state: &AppState,
    batch: i64,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<RewrapReport> {
    let _one = state.rewrap_lock.lock().await;
    state.keys.refresh(&state.db).await?;
    let total: u64 = {
        let current = state.keys.current_version();
        store::master_usage(&state.db)
            .await?
            .iter()
            .filter(|u| u.0 < current)
            .map(|u| (u.1 + u.2) as u64)
            .sum()
    };
    let mut report = RewrapReport::default();
    progress(0, total);
    loop {
        let mut tx = state.db.begin().await?;
        let (moved, seen) = rewrap_batch(state, &mut tx, batch).await?;
        tx.commit().await?;
        report.rewrapped += moved;
        progress(report.rewrapped, total.max(report.rewrapped));
        if seen == 0 {
            break;
        }
    }
    let current = state.keys.current_version();
    for version in state.keys.master_versions() {
        if version >= current {
            continue;
        }
        let mut tx = state.db.begin().await?;
        if store::retire_master(&mut tx, version, micros(Utc::now())).await? {
            audit::append(
                &mut tx,
                Some(&system()),
                &Event::new("keys.retire", json!({"key": "master", "version": version})),
            )
            .await?;
            tx.commit().await?;
            tracing::info!(version, "master key version retired");
            report.retired.push(version);
        }
    }
    state.keys.refresh(&state.db).await?;
    // Left for a later pass: values still under an old version, or an old
    // version this pass could not retire because another instance's rewrap
    // still held values under it when it tried (they have moved since).
    let current = state.keys.current_version();
    report.remaining = store::any_below(&state.db, current).await?
        || state.keys.master_versions().iter().any(|&v| v < current);
    Ok(report)
}

/// [`rewrap`] repeated until nothing is left under an old version, for at
/// most `patience`: values skipped because a writer (or the session of a
/// killed process that PostgreSQL has not yet noticed) held them are taken
/// on a later pass.
pub async fn rewrap_all(
    state: &AppState,
    batch: i64,
    progress: &(dyn Fn(u64, u64) + Sync),
    patience: Duration,
) -> Result<RewrapReport> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut total = RewrapReport::default();
    loop {
        let pass = rewrap(state, batch, progress).await?;
        total.rewrapped += pass.rewrapped;
        total.retired.extend(pass.retired);
        total.remaining = pass.remaining;
        if !pass.remaining || tokio::time::Instant::now() >= deadline {
            return Ok(total);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One batch: `(values moved, values looked at)`.
async fn rewrap_batch(state: &AppState, tx: &mut Tx, batch: i64) -> Result<(u64, usize)> {
    let current = store::current_master(tx).await?;
    state.keys.ensure(&state.db, [current]).await?;
    let integrity = |what: String| {
        move |e: crate::crypto::IntegrityError| AppError::Integrity(format!("{what}: {e}"))
    };
    let mut moved = 0;
    let keys = store::stale_subject_keys(tx, current, batch).await?;
    state
        .keys
        .ensure(&state.db, keys.iter().map(|k| k.master_version))
        .await?;
    for k in &keys {
        let wrapped = state
            .keys
            .rewrap_subject(k, current)
            .map_err(integrity(format!("subject key {}", k.id)))?;
        moved += u64::from(
            store::rewrap_subject_key(tx, k.id, k.master_version, current, &wrapped).await?,
        );
    }
    let mut seen = keys.len();
    for (what, aad) in [
        (
            store::SealedUnderMaster::RequestSubject,
            crate::requests::subject_aad as fn(uuid::Uuid) -> String,
        ),
        (
            store::SealedUnderMaster::ExportKey,
            crate::requests::export::key_aad,
        ),
    ] {
        let left = batch - seen as i64;
        if left <= 0 {
            break;
        }
        let rows = store::stale_sealed(tx, what, current, left).await?;
        seen += rows.len();
        state
            .keys
            .ensure(&state.db, rows.iter().map(|r| r.master))
            .await?;
        for r in &rows {
            let aad = aad(r.id);
            let plain = state
                .keys
                .open_with_master(r.master, &aad, &r.sealed)
                .map_err(integrity(format!("{what:?} {}", r.id)))?;
            let sealed = state
                .keys
                .seal_with_master(current, &aad, &plain)
                .map_err(integrity(format!("{what:?} {}", r.id)))?;
            moved += u64::from(store::rewrap_sealed(tx, what, r, current, &sealed).await?);
        }
    }
    Ok((moved, seen))
}

/// Each instance's key upkeep: picks up versions added or retired elsewhere
/// every `every`, and rewraps when a rotation (here or elsewhere) left data
/// keys under an old version.
pub async fn run_worker(state: AppState, every: Duration, stop: Arc<tokio::sync::Notify>) {
    loop {
        tokio::select! {
            _ = stop.notified() => return,
            _ = state.rewrap_ready.notified() => {},
            _ = tokio::time::sleep(every) => {},
        }
        if let Err(e) = state.keys.refresh(&state.db).await {
            tracing::error!(error = %e, "cannot re-read the keyring");
            continue;
        }
        let current = state.keys.current_version();
        let stale = state.keys.master_versions().iter().any(|&v| v < current);
        match store::any_below(&state.db, current).await {
            Ok(pending) if pending || stale => {
                match rewrap(&state, REWRAP_BATCH, &|_, _| {}).await {
                    Ok(r) => tracing::info!(
                        rewrapped = r.rewrapped,
                        retired = ?r.retired,
                        remaining = r.remaining,
                        "rewrap pass finished"
                    ),
                    Err(e) => tracing::error!(error = %e, "rewrap pass failed; retrying later"),
                }
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "cannot check for keys to rewrap"),
        }
    }
}
