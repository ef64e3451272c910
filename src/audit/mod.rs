//! The tamper-evident audit trail.
//!
//! Every entry is canonical JSON holding its sequence number and the hash of
//! the previous entry; the stored hash is SHA-256 of exactly those bytes.
//! The database stores an entry only if it follows the one-row append
//! cursor, and moves the cursor with it (migration 0022), so the chain never
//! forks. Appends that record a change take the cursor under lock in the
//! same transaction as the change, so an entry exists if and only if its
//! change committed; standalone appends (reads) guess where the chain ends
//! and are refused, then appended under the lock, when the guess is wrong. Entries hold actors,
//! actions, record ids and blind-index values, never plaintext personal data.

pub mod denials;

use base64::Engine;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::app::AppState;
use crate::auth::Principal;
use crate::error::Result;
use crate::storage::audit::{self as store, AuditRow};
use crate::storage::{micros, Db, Tx};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    Denied,
    NotFound,
    /// Work the service attempted and could not do (it is retried).
    Failed,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Denied => "denied",
            Self::NotFound => "not_found",
            Self::Failed => "failed",
        }
    }
}

/// What happened: the action, its outcome, what it touched and why.
#[derive(Debug, Clone)]
pub struct Event {
    pub action: &'static str,
    pub outcome: Outcome,
    /// Record ids, request ids, blind-index values (hex): never plaintext.
    pub target: Value,
    /// A privacy officer's stated `X-Access-Reason`.
    pub reason: Option<String>,
    /// About no single request: the entry carries no `request_id` even when
    /// appended while one is served.
    pub detached: bool,
}

impl Event {
    pub fn new(action: &'static str, target: Value) -> Self {
        Self {
            action,
            outcome: Outcome::Success,
            target,
            reason: None,
            detached: false,
        }
    }
    pub fn detached(mut self) -> Self {
        self.detached = true;
        self
    }
    pub fn outcome(mut self, outcome: Outcome) -> Self {
        self.outcome = outcome;
        self
    }
    pub fn reason(mut self, reason: Option<&str>) -> Self {
        self.reason = reason.map(str::to_string);
        self
    }
}

#[derive(Serialize)]
struct Actor<'a> {
    sub: &'a str,
    role: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    carrier: Option<&'a str>,
}

/// The canonical bytes of an entry. Field order is fixed by this struct.
#[derive(Serialize)]
struct Entry<'a> {
    v: u8,
    seq: i64,
    prev: String,
    at: String,
    actor: Actor<'a>,
    action: &'a str,
    outcome: Outcome,
    target: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

/// The fields verification reads back from stored entry bytes.
#[derive(Deserialize)]
struct Linked {
    seq: i64,
    prev: String,
    at: DateTime<Utc>,
    actor: LinkedActor,
    action: String,
    outcome: String,
}

#[derive(Deserialize)]
struct LinkedActor {
    sub: String,
}

#[derive(Debug, Clone, Copy)]
pub struct Appended {
    pub seq: i64,
    pub hash: [u8; 32],
}

/// Appends `event` inside `tx`. Call it last, just before commit: the
/// append cursor stays locked until the transaction ends.
pub async fn append(tx: &mut Tx, who: Option<&Principal>, event: &Event) -> Result<Appended> {
    let (head_seq, head_hash) = store::lock_head(tx).await?;
    let (row, appended) = entry_row(head_seq, &head_hash, who, event);
    store::append(tx, &row).await?;
    Ok(appended)
}

/// The row of `event` appended after entry `head_seq`, whose hash is
/// `head_hash`.
fn entry_row(
    head_seq: i64,
    head_hash: &[u8],
    who: Option<&Principal>,
    event: &Event,
) -> (AuditRow, Appended) {
    let seq = head_seq + 1;
    let now = Utc::now();
    let anonymous = Actor {
        sub: "anonymous",
        role: "none",
        carrier: None,
    };
    let actor = match who {
        Some(p) => Actor {
            sub: &p.sub,
            role: p.role.as_str(),
            carrier: p.scope(),
        },
        None => anonymous,
    };
    let entry = Entry {
        v: 1,
        seq,
        prev: hex::encode(head_hash),
        at: now.to_rfc3339_opts(SecondsFormat::Micros, true),
        actor,
        action: event.action,
        outcome: event.outcome,
        target: &event.target,
        request_id: crate::telemetry::current_request_id()
            .filter(|r| !r.is_empty() && !event.detached),
        reason: event.reason.as_deref(),
    };
    let bytes = serde_json::to_string(&entry).expect("audit entries serialize");
    let hash: [u8; 32] = Sha256::digest(bytes.as_bytes()).into();
    let row = AuditRow {
        seq,
        at: micros(now),
        actor: who
            .map(|p| p.sub.clone())
            .unwrap_or_else(|| "anonymous".into()),
        action: event.action.to_string(),
        outcome: event.outcome.as_str().to_string(),
        entry: bytes,
        prev_hash: head_hash.to_vec(),
        hash: hash.to_vec(),
    };
    (row, Appended { seq, hash })
}

/// Where this process last saw the chain end. Only a guess: another
/// instance, the CLI or a write transaction of this process may have
/// appended since, and the database refuses an entry that does not follow
/// the real end. Standalone appends of this process take turns on it, so
/// that they do not all guess the same end.
#[derive(Debug, Default)]
pub struct HeadGuess(tokio::sync::Mutex<Option<Appended>>);

/// Appends `event` on its own (reads, authenticated denials; anonymous
/// ones go through [`record_anonymous_denial`]). First in one statement,
/// after where this process last saw the chain end; if the database refuses
/// it (the chain has moved on), in a transaction that locks the append
/// cursor. One round trip while this process's standalone appends follow
/// one another, five when something else appended in between.
pub async fn record(state: &AppState, who: Option<&Principal>, event: Event) -> Result<Appended> {
    let count = |path: &str| state.metrics.audit_appends.with_label_values(&[path]).inc();
    let mut guess = state.audit_head.0.lock().await;
    if let Some(head) = *guess {
        let (row, appended) = entry_row(head.seq, &head.hash, who, &event);
        match store::append_guessed(&state.db, &row).await {
            Ok(()) => {
                *guess = Some(appended);
                count("guessed");
                return Ok(appended);
            }
            Err(e) if store::is_moved_head(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // Not held across the locked append: a concurrent standalone append
    // then finds no guess and queues on the cursor's lock instead.
    *guess = None;
    drop(guess);
    let mut tx = state.db.begin().await?;
    let appended = append(&mut tx, who, &event).await?;
    tx.commit().await?;
    count("locked");
    let mut guess = state.audit_head.0.lock().await;
    if guess.is_none_or(|g| g.seq < appended.seq) {
        *guess = Some(appended);
    }
    Ok(appended)
}

/// Audits a refusal of a request that carried no valid token, within the
/// instance's budget (`denials`): one by one, after the count of those held
/// back before it, or only counted. The append runs in a task of its own:
/// a client that resets its connection drops the request's future, and
/// with it, were the append done there, the count it had taken.
pub async fn record_anonymous_denial(state: &AppState, status: u16, route: &str, target: Value) {
    let at = Utc::now();
    if !state.denials.admit(status, route, at) {
        state.metrics.denials_coalesced.inc();
        return;
    }
    let (state, route) = (state.clone(), route.to_string());
    let request_id = crate::telemetry::current_request_id();
    // Counted before the task starts, so that the final flush waits for it.
    let in_flight = state.denials.begin_append();
    let task = spawn_for_request(request_id, async move {
        let _in_flight = in_flight;
        let held = state.denials.take_held();
        let appended = async {
            let mut tx = state.db.begin().await?;
            if let Some(held) = &held {
                append(&mut tx, None, &count_event(held)).await?;
            }
            let event = Event::new("request.denied", target).outcome(Outcome::Denied);
            append(&mut tx, None, &event).await?;
            tx.commit().await?;
            Result::<()>::Ok(())
        }
        .await;
        if let Err(e) = appended {
            tracing::error!(error = %e, "could not audit a denied request; it is counted instead");
            // Neither the count nor this refusal goes unrecorded: both wait
            // for the next flush.
            let mut back = held.unwrap_or_default();
            back.add(status, &route, at);
            state.denials.hold_back(back);
            state.metrics.denials_coalesced.inc();
        }
    });
    if let Err(e) = task.await {
        tracing::error!(error = %e, "auditing a denied request failed");
    }
}

/// Runs `work` in a task of its own, with the request's id and tracing
/// span: a client that resets its connection drops the request's future,
/// not the task.
pub fn spawn_for_request<F>(request_id: Option<String>, work: F) -> tokio::task::JoinHandle<()>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    use tracing::Instrument;
    tokio::spawn(
        crate::telemetry::with_request_id(request_id, work).instrument(tracing::Span::current()),
    )
}

/// The entry of anonymous refusals counted rather than audited one by one.
fn count_event(held: &denials::Held) -> Event {
    Event::new("request.denied", held.target())
        .outcome(Outcome::Denied)
        .detached()
}

/// Appends the count of anonymous refusals held back since the last one.
pub async fn flush_denials(state: &AppState) -> Result<()> {
    let Some(held) = state.denials.take_held() else {
        return Ok(());
    };
    if let Err(e) = record(state, None, count_event(&held)).await {
        state.denials.hold_back(held);
        return Err(e);
    }
    Ok(())
}

/// Flushes the held-back count every [`denials::FLUSH_EVERY`] until
/// `stop`, and once more then, after the appends of refusals still under
/// way (a request whose client went away leaves its append running).
pub async fn run_denial_flusher(state: AppState, stop: std::sync::Arc<tokio::sync::Notify>) {
    let mut tick = tokio::time::interval(denials::FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.notified() => true,
        };
        if stopping {
            state.denials.appends_done().await;
        }
        if let Err(e) = flush_denials(&state).await {
            tracing::error!(error = %e, "could not audit the count of refused requests");
        }
        if stopping {
            return;
        }
    }
}

/// What verifying the chain found.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Verification {
    pub valid: bool,
    pub entries: i64,
    /// The last entry; `null` while the log is empty or when it is invalid.
    pub head: Option<HeadRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_bad_seq: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The append cursor's row is gone: nothing can be appended until it is
    /// restored (so the verification itself cannot be audited).
    #[serde(skip)]
    pub cursor_missing: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct HeadRef {
    pub seq: i64,
    pub hash: String,
}

impl Verification {
    fn bad(entries: i64, seq: i64, reason: impl Into<String>) -> Self {
        Self {
            valid: false,
            entries,
            head: None,
            first_bad_seq: Some(seq),
            reason: Some(reason.into()),
            cursor_missing: false,
        }
    }
}

const VERIFY_PAGE: i64 = 5_000;

/// Recomputes the chain from the first entry, from the stored bytes.
pub async fn verify(db: &Db) -> Result<Verification> {
    // Read the cursor first: entries appended while we verify lie beyond it.
    let cursor_seq = store::cursor(db).await?.map(|(seq, _)| seq);
    let mut expected = 1;
    let mut prev = vec![0u8; 32];
    loop {
        let page = store::chain_page(db, expected - 1, VERIFY_PAGE).await?;
        let done = (page.len() as i64) < VERIFY_PAGE;
        for row in page {
            let entries = expected - 1;
            if row.seq != expected {
                return Ok(Verification::bad(
                    entries,
                    expected,
                    format!("entry {expected} is missing"),
                ));
            }
            let hash: [u8; 32] = Sha256::digest(row.entry.as_bytes()).into();
            if row.hash != hash {
                return Ok(Verification::bad(
                    entries,
                    row.seq,
                    "the entry's bytes do not match its hash",
                ));
            }
            let Ok(linked) = serde_json::from_str::<Linked>(&row.entry) else {
                return Ok(Verification::bad(
                    entries,
                    row.seq,
                    "the entry is not a ledger audit entry",
                ));
            };
            if linked.seq != row.seq {
                return Ok(Verification::bad(
                    entries,
                    row.seq,
                    format!(
                        "the entry stored at {} was written as entry {}",
                        row.seq, linked.seq
                    ),
                ));
            }
            // The columns kept for filtering must say what the hashed bytes say.
            if linked.actor.sub != row.actor
                || linked.action != row.action
                || linked.outcome != row.outcome
                || micros(linked.at) != row.at
            {
                return Ok(Verification::bad(
                    entries,
                    row.seq,
                    "the entry's columns differ from its hashed bytes",
                ));
            }
            if linked.prev != hex::encode(&prev) || row.prev_hash != prev {
                return Ok(Verification::bad(
                    entries,
                    row.seq,
                    "the entry does not chain to the one before it",
                ));
            }
            prev = row.hash;
            expected += 1;
        }
        if done {
            break;
        }
    }
    let entries = expected - 1;
    let Some(cursor_seq) = cursor_seq else {
        return Ok(Verification {
            cursor_missing: true,
            ..Verification::bad(
                entries,
                entries + 1,
                "the append cursor (the audit_head row) is missing: it was deleted, and appends fail until it is restored",
            )
        });
    };
    if cursor_seq > entries {
        return Ok(Verification::bad(
            entries,
            entries + 1,
            format!("the log ends at entry {entries} but was appended up to {cursor_seq}: its tail was removed"),
        ));
    }
    Ok(Verification {
        valid: true,
        entries,
        head: (entries > 0).then(|| HeadRef {
            seq: entries,
            hash: hex::encode(&prev),
        }),
        first_bad_seq: None,
        reason: None,
        cursor_missing: false,
    })
}

/// A signed checkpoint of the chain: who keeps one can later prove the log
/// was neither rewritten before it nor truncated after it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SignedHead {
    pub seq: i64,
    pub hash: String,
    pub at: DateTime<Utc>,
    pub key_id: String,
    /// Base64 Ed25519 signature over `signed_message(seq, hash, at)`.
    pub signature: String,
}

/// The bytes a head signature covers.
pub fn signed_message(seq: i64, hash: &str, at: &DateTime<Utc>) -> String {
    format!(
        "transfer-ledger audit head v1\nseq={seq}\nhash={hash}\nat={}",
        at.to_rfc3339_opts(SecondsFormat::Micros, true)
    )
}

pub async fn signed_head(state: &AppState) -> Result<SignedHead> {
    let (seq, hash) = match store::last(&state.db).await? {
        Some(row) => (row.seq, hex::encode(&row.hash)),
        None => (0, hex::encode([0u8; 32])),
    };
    let at = crate::storage::from_micros(micros(Utc::now()));
    let (key_id, sig) = state.keys.sign(signed_message(seq, &hash, &at).as_bytes());
    Ok(SignedHead {
        seq,
        hash,
        at,
        key_id,
        signature: base64::engine::general_purpose::STANDARD.encode(sig.to_bytes()),
    })
}

/// Checks a saved head: its signature against the published keys, and that
/// the log still holds exactly that entry at that position.
pub async fn check_saved_head(
    state: &AppState,
    saved: &SignedHead,
) -> Result<std::result::Result<(), (i64, String)>> {
    let keys = state.keys.verifying_keys();
    let Some((_, key)) = keys.iter().find(|(id, _)| *id == saved.key_id) else {
        return Ok(Err((
            saved.seq,
            format!("the saved head is signed by unknown key {}", saved.key_id),
        )));
    };
    let sig = base64::engine::general_purpose::STANDARD
        .decode(&saved.signature)
        .ok()
        .and_then(|b| ed25519_dalek::Signature::from_slice(&b).ok());
    let message = signed_message(saved.seq, &saved.hash, &saved.at);
    if sig.is_none_or(|s| key.verify_strict(message.as_bytes(), &s).is_err()) {
        return Ok(Err((
            saved.seq,
            "the saved head's signature does not verify".into(),
        )));
    }
    match store::entry_at(&state.db, saved.seq).await? {
        None if saved.seq == 0 => Ok(Ok(())),
        None => Ok(Err((
            saved.seq,
            format!(
                "the log no longer reaches the saved head at entry {}: it was truncated",
                saved.seq
            ),
        ))),
        Some(row) if hex::encode(&row.hash) != saved.hash => Ok(Err((
            saved.seq,
            format!(
                "entry {} differs from the saved head: the log was rewritten",
                saved.seq
            ),
        ))),
        Some(_) => Ok(Ok(())),
    }
}

/// An entry as listed by `GET /v1/audit`: the entry as it was hashed
/// (`entry`), and beside it, for reading and filtering, the fields most
/// looked for. Verification reads `entry` only.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EntryView {
    pub seq: i64,
    pub at: DateTime<Utc>,
    /// The actor's `sub` (what `?actor=` matches).
    pub actor: String,
    pub action: String,
    pub outcome: String,
    #[schema(value_type = Object)]
    pub target: Value,
    /// The `X-Access-Reason` a decrypting read stated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// SHA-256 of the previous entry, hex.
    pub prev_hash: String,
    /// SHA-256 of `entry`'s bytes as stored, hex.
    pub hash: String,
    /// The entry as it was hashed.
    #[schema(value_type = Object)]
    pub entry: Value,
}

impl From<AuditRow> for EntryView {
    fn from(r: AuditRow) -> Self {
        let entry: Value = serde_json::from_str(&r.entry).unwrap_or(Value::Null);
        Self {
            seq: r.seq,
            at: crate::storage::from_micros(r.at),
            actor: r.actor,
            action: r.action,
            outcome: r.outcome,
            target: entry.get("target").cloned().unwrap_or(Value::Null),
            reason: entry
                .get("reason")
                .and_then(Value::as_str)
                .map(str::to_string),
            prev_hash: hex::encode(&r.prev_hash),
            hash: hex::encode(&r.hash),
            entry,
        }
    }
}
