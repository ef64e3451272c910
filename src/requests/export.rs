//! Access exports: built page by page into sealed chunks (memory stays flat
//! whatever the number of records), signed, kept 7 days, streamed back.

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue};
use base64::Engine;
use chrono::{Duration, Utc};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::app::AppState;
use crate::audit::{self, Event};
use crate::auth::{Principal, Role};
use crate::crypto::Key;
use crate::domain::{Category, SubjectId};
use crate::error::{AppError, Result};
use crate::ledger::transfers::{decrypt, TransferView};
use crate::storage::requests::{self as store, ExportRow, RequestRow};
use crate::storage::transfers::{self as transfers, LogFilter};
use crate::storage::{micros, Tx, TxLock};

/// Plaintext bytes per sealed chunk.
const CHUNK: usize = 64 * 1024;
/// Records decrypted per page while building.
const PAGE: i64 = 500;
/// How long a prepared export is kept.
pub const KEEP_DAYS: i64 = 7;

pub(crate) fn key_aad(id: Uuid) -> String {
    format!("tl/export-key/{id}")
}

fn chunk_aad(id: Uuid, seq: i64) -> Vec<u8> {
    format!("tl/export/{id}/{seq}").into_bytes()
}

/// Seals the document as it is written, a chunk at a time.
struct ChunkWriter<'a> {
    state: &'a AppState,
    id: Uuid,
    key: Key,
    buf: Vec<u8>,
    seq: i64,
    size: i64,
    hasher: Sha256,
    /// The claim held on the request, renewed with every chunk.
    claim: i64,
}

impl ChunkWriter<'_> {
    async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.hasher.update(bytes);
        self.size += bytes.len() as i64;
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= CHUNK {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let sealed = self.key.seal(&chunk_aad(self.id, self.seq), &self.buf);
        // A chunk lost in a crash is rebuilt with the whole export; the
        // completing transaction is synchronous and flushes it first.
        let mut tx = self.state.db.begin_relaxed().await?;
        // Renewed first: no takeover while the chunk is written.
        let now = micros(Utc::now());
        if !store::renew_claim(&mut tx, self.id, self.claim, now).await? {
            return Err(super::claim_lost(self.id));
        }
        store::insert_chunk(&mut tx, self.id, self.seq, &sealed).await?;
        tx.commit().await?;
        self.claim = now;
        self.seq += 1;
        self.buf.clear();
        Ok(())
    }
}

fn explanations(state: &AppState, lang: &str) -> Value {
    let c = &state.catalogs;
    let section = |prefix: &str, names: Vec<&str>| -> Value {
        names
            .into_iter()
            .map(|n| {
                (
                    n.to_string(),
                    Value::String(c.message(lang, &format!("{prefix}-{n}"), &[])),
                )
            })
            .collect::<Map<_, _>>()
            .into()
    };
    json!({
        "categories": section("category", Category::ALL.iter().map(|c| c.as_str()).collect()),
        "purposes": section("purpose", crate::domain::Purpose::ALL.iter().map(|p| p.as_str()).collect()),
        "legal_bases": section("legal_basis", crate::domain::LegalBasis::ALL.iter().map(|l| l.as_str()).collect()),
        "directions": section("direction", crate::domain::Direction::ALL.iter().map(|d| d.as_str()).collect()),
    })
}

const RIGHTS: &[&str] = &[
    "access",
    "rectification",
    "erasure",
    "restriction",
    "portability",
    "objection",
    "withdraw-consent",
    "complaint",
];

/// Builds, seals and signs the export of a request, then completes it.
pub async fn prepare(state: &AppState, r: &RequestRow) -> Result<()> {
    let subject = super::open_subject(state, r)
        .await?
        .ok_or_else(|| AppError::Integrity("access request without its subject".into()))?;
    let lang = r.language.as_str();
    let cat = &state.catalogs;

    let mut tx = state.db.begin_relaxed().await?;
    store::discard_export(&mut tx, r.id).await?;
    // An erasure of the subject completing while this export is built
    // (on another instance) deletes what was written so far; see below.
    let erasures_before =
        store::completed_erasures(&mut tx, &r.carrier_id, &r.subject_index).await?;
    tx.commit().await?;

    let raw = Key::generate_raw();
    let mut w = ChunkWriter {
        state,
        id: r.id,
        key: Key::from_bytes(&raw),
        buf: Vec::with_capacity(CHUNK * 2),
        seq: 0,
        size: 0,
        hasher: Sha256::new(),
        claim: super::held_claim(r)?,
    };

    let generated_at = Utc::now();
    let head = json!({
        "document": "GDPR Art. 15 access export",
        "title": cat.message(lang, "export-title", &[]),
        "introduction": cat.message(lang, "export-intro", &[]),
        "request_id": r.id,
        "generated_at": generated_at,
        "language": lang,
        "controller": {"name": state.config.controller.name, "contact": state.config.controller.contact},
        "data_protection_officer": {"name": state.config.dpo.name, "contact": state.config.dpo.contact},
        "subject": super::subject_json(&subject),
        "subject_statement": cat.message(lang, "export-subject", &[("identifier", subject.as_str())]),
        "carrier_scope": r.carrier_id,
        "explanations": explanations(state, lang),
        "rights": RIGHTS.iter().map(|k| json!({"right": k, "explanation": cat.message(lang, &format!("right-{k}"), &[])})).collect::<Vec<_>>(),
        "automated_decision_making": {"exists": false, "explanation": cat.message(lang, "automated-decision-making", &[])},
    });
    // The head object without its closing brace, then the records array.
    let head = head.to_string();
    w.write(&head.as_bytes()[..head.len() - 1]).await?;
    w.write(b",\"records\":[").await?;

    let mut filter = LogFilter {
        scope: Some(r.carrier_id.clone()),
        subject_index: Some(r.subject_index.clone()),
        limit: PAGE,
        ..LogFilter::default()
    };
    let mut count: i64 = 0;
    loop {
        let rows = transfers::list(&state.db, &filter).await?;
        let Some(last) = rows.last() else { break };
        filter.after = Some((last.occurred_at, last.id));
        let full = rows.len() as i64 == PAGE;
        let mut views: Vec<TransferView> = rows.into_iter().map(TransferView::from).collect();
        decrypt(state, &mut views).await?;
        for v in views {
            let record = export_record(state, lang, &subject, v);
            if count > 0 {
                w.write(b",").await?;
            }
            w.write(record.to_string().as_bytes()).await?;
            count += 1;
        }
        if !full {
            break;
        }
    }
    w.write(format!("],\"record_count\":{count}}}").as_bytes())
        .await?;
    w.flush().await?;

    let digest: [u8; 32] = w.hasher.clone().finalize().into();
    let (key_id, signature) = state.keys.sign(&digest);
    let now = Utc::now();
    // The export key is wrapped under the master key current in the
    // transaction that stores it, which a rotation cannot retire under us.
    let mut tx = state.db.begin().await?;
    // The claim is renewed first, so that however long this transaction
    // waits for the lock (an erasure of the subject completing), no other
    // processor takes the request over and starts the export again.
    let renewed = micros(Utc::now());
    if !store::renew_claim(&mut tx, r.id, w.claim, renewed).await? {
        return Err(super::claim_lost(r.id));
    }
    w.claim = renewed;
    TxLock::Exports.take(&mut tx, false).await?;
    if store::completed_erasures(&mut tx, &r.carrier_id, &r.subject_index).await? > erasures_before
    {
        // The subject was erased meanwhile: what this export read may be
        // gone, and part of what it wrote is. It goes, as if the erasure
        // had come after it (a download answers 410 and says why).
        store::discard_export(&mut tx, r.id).await?;
        if !store::complete(&mut tx, r.id, w.claim, micros(Utc::now()), None, false).await? {
            return Err(super::claim_lost(r.id));
        }
        append_system(
            &mut tx,
            "subject_request.access_completed",
            json!({"request_id": r.id, "records": count, "discarded": "the subject was erased while the export was built"}),
        )
        .await?;
        tx.commit().await?;
        return Ok(());
    }
    let master = crate::storage::keys::current_master(&mut tx).await?;
    state.keys.ensure(&state.db, [master]).await?;
    let wrapped_key = state
        .keys
        .seal_with_master(master, &key_aad(r.id), raw.as_ref())
        .map_err(|e| AppError::Integrity(format!("export {}: {e}", r.id)))?;
    let export = ExportRow {
        request_id: r.id,
        master,
        wrapped_key,
        chunks: w.seq,
        size: w.size,
        records: count,
        sha256: digest.to_vec(),
        signature: signature.to_bytes().to_vec(),
        key_id,
        created_at: micros(now),
        expires_at: micros(now + Duration::days(KEEP_DAYS)),
    };
    store::insert_export(&mut tx, &export).await?;
    // The identifier stays (sealed) while the export exists; it goes with it.
    if !store::complete(&mut tx, r.id, w.claim, micros(now), None, true).await? {
        return Err(super::claim_lost(r.id));
    }
    append_system(
        &mut tx,
        "subject_request.access_completed",
        json!({"request_id": r.id, "records": count, "sha256": hex::encode(digest)}),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

async fn append_system(tx: &mut Tx, action: &'static str, target: Value) -> Result<()> {
    super::append_system(tx, &Event::new(action, target)).await?;
    Ok(())
}

/// One record as the data subject sees it. Identifiers of other people in
/// the record (the other party of a call) are withheld: Art. 15(4).
fn export_record(state: &AppState, lang: &str, subject: &SubjectId, v: TransferView) -> Value {
    let cat = &state.catalogs;
    let mut payload = v.payload.unwrap_or(Value::Null);
    if let Value::Object(m) = &mut payload {
        for field in ["caller", "callee"] {
            if let Some(val) = m.get_mut(field) {
                if val.as_str() != Some(subject.as_str()) {
                    *val = Value::String("(other party)".into());
                }
            }
        }
    }
    let (source, recipient) = if v.direction == "platform_to_carrier" {
        (
            cat.message(lang, "source-platform", &[]),
            cat.message(lang, "recipient-carrier", &[("carrier", &v.carrier_id)]),
        )
    } else {
        (
            cat.message(lang, "source-carrier", &[("carrier", &v.carrier_id)]),
            cat.message(lang, "recipient-platform", &[]),
        )
    };
    let until = v.retain_until.format("%Y-%m-%d").to_string();
    json!({
        "id": v.id,
        "category": v.category,
        "category_explanation": cat.message(lang, &format!("category-{}", v.category), &[]),
        "purpose": v.purpose,
        "purpose_explanation": cat.message(lang, &format!("purpose-{}", v.purpose), &[]),
        "legal_basis": v.legal_basis,
        "legal_basis_explanation": cat.message(lang, &format!("legal_basis-{}", v.legal_basis), &[]),
        "direction": v.direction,
        "source": source,
        "recipient": recipient,
        "carrier_id": v.carrier_id,
        "jurisdiction": v.jurisdiction,
        "occurred_at": v.occurred_at,
        "retain_until": v.retain_until,
        "retention_explanation": cat.message(lang, "retention-until", &[("date", &until)]),
        "payload": payload,
    })
}

/// The export as a streamed body with its digest and signature headers.
pub async fn download(
    state: &AppState,
    who: &Principal,
    id: &str,
    reason: Option<&str>,
) -> Result<(HeaderMap, Body)> {
    state.authorize(who, "subject_requests", "read")?;
    if who.role == Role::PrivacyOfficer && reason.is_none() {
        return Err(AppError::ReasonRequired(
            "downloading an export requires an X-Access-Reason header stating why".into(),
        ));
    }
    let not_found = || AppError::NotFound(format!("no subject request {id:?}"));
    let uuid = Uuid::parse_str(id).map_err(|_| super::not_a_request_id())?;
    let Some(r) = store::get(&state.db, uuid, who.scope()).await? else {
        super::audit_not_found(state, who, "subject_request.export_download", id).await?;
        return Err(not_found());
    };
    if r.kind != "access" {
        return Err(AppError::NotFound(format!(
            "subject request {id} is an erasure request and has no export"
        )));
    }
    if r.status != "completed" {
        return Err(AppError::Conflict(format!(
            "subject request {id} is {}; its export is not ready yet",
            r.status
        )));
    }
    // Past its expiry an export is gone even before housekeeping deletes it.
    let Some(e) = store::export(&state.db, uuid)
        .await?
        .filter(|e| e.expires_at > micros(Utc::now()))
    else {
        return Err(AppError::Gone(format!(
            "the export of request {id} is no longer kept (exports are deleted after 7 days, and by an erasure of their subject); make a new request"
        )));
    };
    state.keys.ensure(&state.db, [e.master]).await?;
    let raw = state
        .keys
        .open_with_master(e.master, &key_aad(uuid), &e.wrapped_key)
        .map_err(|err| AppError::Integrity(format!("export key of {id}: {err}")))?;
    let raw: [u8; 32] = raw
        .as_slice()
        .try_into()
        .map_err(|_| AppError::Integrity("export key length".into()))?;
    let key = Key::from_bytes(&raw);
    audit::record(
        state,
        Some(who),
        Event::new(
            "subject_request.export_download",
            json!({"request_id": uuid, "records": e.records}),
        )
        .reason(reason),
    )
    .await?;

    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    headers.insert(
        "x-export-sha256",
        HeaderValue::from_str(&hex::encode(&e.sha256)).expect("hex"),
    );
    let sig = base64::engine::general_purpose::STANDARD.encode(&e.signature);
    headers.insert(
        "x-export-signature",
        HeaderValue::from_str(&sig).expect("base64"),
    );
    headers.insert(
        "x-export-key-id",
        HeaderValue::from_str(&e.key_id).expect("key id"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(e.size));

    let db = state.db.clone();
    let chunks = e.chunks;
    let stream = futures::stream::unfold(0i64, move |seq| {
        let (db, key) = (db.clone(), key.clone());
        async move {
            if seq >= chunks {
                return None;
            }
            let item = match store::chunk(&db, uuid, seq).await {
                Ok(Some(sealed)) => key
                    .open(&chunk_aad(uuid, seq), &sealed)
                    .map(|pt| axum::body::Bytes::from(pt.to_vec()))
                    .map_err(|e| std::io::Error::other(format!("export chunk {seq}: {e}"))),
                Ok(None) => Err(std::io::Error::other(format!(
                    "export chunk {seq} is missing"
                ))),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            };
            Some((item, seq + 1))
        }
    });
    Ok((headers, Body::from_stream(stream)))
}
