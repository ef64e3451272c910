//! Registering consents, showing them, changing their status.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::app::AppState;
use crate::audit::{self, Event, Outcome};
use crate::auth::{Principal, Role};
use crate::domain::consent::{ConsentKind, ConsentStatus, NewConsent};
use crate::domain::CarrierId;
use crate::error::{AppError, Result, ResultExt};
use crate::ledger::transfers;
use crate::storage::consents::{self as store, ConsentRow};
use crate::storage::{from_micros, micros};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ConsentView {
    pub reference: String,
    pub kind: String,
    pub carrier_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer_tenant_id: Option<String>,
    /// `{phone_number}` or `{sip_uri}` for data-subject consents; `null`
    /// once the subject has been erased.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<Value>,
    pub countries: Vec<String>,
    pub status: String,
    pub granted_at: DateTime<Utc>,
    pub status_changed_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

fn subject_aad(reference: &str, key_id: Uuid) -> Vec<u8> {
    format!("tl/consent/{reference}/{key_id}").into_bytes()
}

pub async fn register(state: &AppState, who: &Principal, c: NewConsent) -> Result<ConsentView> {
    state.authorize_for(who, &c.carrier_id, c.kind.write_object(), "write")?;
    // A consent with a data subject seals under the subject's data key, as a
    // transfer does, and reruns as a transfer write does when a concurrent
    // write spent that key's nonce budget or a concurrent erasure or sweep
    // destroyed the key: the rerun replaces the key.
    let row = transfers::with_retries(|| register_once(state, who, &c)).await?;
    view(state, row).await
}

/// One attempt: the consent is stored and audited when this returns `Ok`.
async fn register_once(state: &AppState, who: &Principal, c: &NewConsent) -> Result<ConsentRow> {
    let now = micros(Utc::now());
    let mut tx = state.db.begin().await?;
    let (mut subject_index, mut subject_key_id, mut subject_sealed) = (None, None, None);
    if let Some(subject) = &c.subject {
        let bi = state.keys.blind().of(subject);
        let mut resolved = transfers::resolve_subject_keys(
            state,
            &mut tx,
            c.carrier_id.as_str(),
            vec![bi.clone()],
        )
        .await?;
        let over = crate::storage::keys::add_seals(
            &mut tx,
            &mut resolved.seals,
            state.config.data_key_max_seals,
        )
        .await?;
        if !over.is_empty() {
            return Err(AppError::Conflict(transfers::BUDGET_RACE.into()));
        }
        let (key_id, key) = &resolved.keys[&bi];
        let field = match subject {
            crate::domain::SubjectId::Phone(_) => "phone_number",
            crate::domain::SubjectId::Sip(_) => "sip_uri",
        };
        let mut m = Map::new();
        m.insert(field.into(), subject.as_str().into());
        subject_sealed = Some(key.seal(
            &subject_aad(&c.reference, *key_id),
            &serde_json::to_vec(&m).expect("map"),
        ));
        subject_index = Some(bi);
        subject_key_id = Some(*key_id);
    }
    let row = ConsentRow {
        reference: c.reference.clone(),
        kind: c.kind.as_str().into(),
        carrier_id: c.carrier_id.to_string(),
        customer_tenant_id: c.customer_tenant_id.clone(),
        subject_index,
        subject_key_id,
        subject_sealed,
        countries: c
            .countries
            .iter()
            .map(|c| c.as_str())
            .collect::<Vec<_>>()
            .join(","),
        status: ConsentStatus::Active.as_str().into(),
        granted_at: micros(c.granted_at),
        status_changed_at: now,
        created_at: now,
        created_by: who.sub.clone(),
    };
    store::insert(&mut tx, &row)
        .await
        .map_err(transfers::key_gone)
        .on_constraint("consents_pkey|consents.reference", || {
            AppError::Conflict(format!(
                "consent reference {:?} is already registered for this carrier",
                c.reference
            ))
        })?;
    let target = json!({
        "carrier_id": row.carrier_id,
        "reference": row.reference,
        "kind": row.kind,
        "subject_index": row.subject_index.as_ref().map(hex::encode),
    });
    audit::append(&mut tx, Some(who), &Event::new("consent.register", target)).await?;
    tx.commit().await?;
    Ok(row)
}

fn target(row: &ConsentRow) -> Value {
    json!({"carrier_id": row.carrier_id, "reference": row.reference})
}

/// The one consent `reference` names for this caller. References are per
/// carrier: callers who see several carriers disambiguate with `carrier`.
async fn find_one(
    state: &AppState,
    who: &Principal,
    reference: &str,
    carrier: Option<&str>,
) -> Result<ConsentRow> {
    let mut rows = store::find(&state.db, reference, who.scope(), carrier).await?;
    match rows.len() {
        0 => Err(AppError::NotFound(
            match crate::domain::fields::unknown_name(reference) {
                "?" => "no consent with that reference".to_string(),
                shown => format!("no consent {shown:?}"),
            },
        )),
        1 => Ok(rows.remove(0)),
        _ => Err(AppError::Conflict(format!(
            "several carriers use consent reference {reference:?}; add ?carrier_id= to choose one"
        ))),
    }
}

/// [`find_one`], with a lookup that found nothing audited as `action`
/// (outcome `not_found`): probing for another carrier's references leaves
/// a trace, as probing for its record ids does. The reference is named as
/// errors name it, so free text typed as one stays out of the log.
async fn find_audited(
    state: &AppState,
    who: &Principal,
    reference: &str,
    carrier: Option<&str>,
    action: &'static str,
) -> Result<ConsentRow> {
    let found = find_one(state, who, reference, carrier).await;
    if let Err(AppError::NotFound(_)) = &found {
        let target = json!({"reference": crate::domain::fields::unknown_name(reference)});
        audit::record(
            state,
            Some(who),
            Event::new(action, target).outcome(Outcome::NotFound),
        )
        .await?;
    }
    found
}

/// Privacy officers say why when a read reveals a data subject's identifier.
fn require_reason(who: &Principal, row: &ConsentRow, reason: Option<&str>) -> Result<()> {
    if who.role == Role::PrivacyOfficer && row.subject_sealed.is_some() && reason.is_none() {
        return Err(AppError::ReasonRequired(
            "this consent names a data subject; reading it requires an X-Access-Reason header stating why".into(),
        ));
    }
    Ok(())
}

pub async fn get(
    state: &AppState,
    who: &Principal,
    reference: &str,
    carrier: Option<&str>,
    reason: Option<&str>,
) -> Result<ConsentView> {
    state.authorize(who, "consents", "read")?;
    let row = find_audited(state, who, reference, carrier, "consent.read").await?;
    require_reason(who, &row, reason)?;
    let shown = view(state, row.clone()).await?;
    audit::record(
        state,
        Some(who),
        Event::new("consent.read", target(&row)).reason(reason),
    )
    .await?;
    Ok(shown)
}

pub async fn set_status(
    state: &AppState,
    who: &Principal,
    reference: &str,
    carrier: Option<&str>,
    reason: Option<&str>,
    to: ConsentStatus,
) -> Result<ConsentView> {
    // Callers with no write right at all learn nothing about references.
    state.authorize_any(who, &ConsentKind::WRITE_OBJECTS, "write")?;
    let row = find_audited(state, who, reference, carrier, "consent.status").await?;
    let carrier =
        CarrierId::parse(&row.carrier_id).map_err(|e| AppError::Internal(anyhow::anyhow!(e)))?;
    let kind: ConsentKind = row
        .kind
        .parse()
        .map_err(|_| AppError::Internal(anyhow::anyhow!("bad consent kind")))?;
    state.authorize_for(who, &carrier, kind.write_object(), "write")?;
    require_reason(who, &row, reason)?;
    let from: ConsentStatus = row
        .status
        .parse()
        .map_err(|_| AppError::Internal(anyhow::anyhow!("bad consent status")))?;
    if from == to {
        let shown = view(state, row.clone()).await?;
        let mut t = target(&row);
        t["status"] = json!({"from": from, "to": to, "changed": false});
        audit::record(
            state,
            Some(who),
            Event::new("consent.status", t).reason(reason),
        )
        .await?;
        return Ok(shown);
    }
    kind.may_move(from, to)
        .map_err(|m| AppError::Conflict(format!("consent {reference:?}: {m}")))?;
    let mut tx = state.db.begin().await?;
    if !store::set_status(
        &mut tx,
        carrier.as_str(),
        reference,
        from.as_str(),
        to.as_str(),
        micros(Utc::now()),
    )
    .await?
    {
        return Err(AppError::Conflict(format!(
            "consent {reference:?} changed meanwhile; read it and retry"
        )));
    }
    let mut t = target(&row);
    t["status"] = json!({"from": from, "to": to, "changed": true});
    audit::append(
        &mut tx,
        Some(who),
        &Event::new("consent.status", t).reason(reason),
    )
    .await?;
    tx.commit().await?;
    let row = find_one(state, who, reference, Some(carrier.as_str())).await?;
    view(state, row).await
}

async fn view(state: &AppState, row: ConsentRow) -> Result<ConsentView> {
    let subject = match (&row.subject_key_id, &row.subject_sealed) {
        (Some(key_id), Some(sealed)) => Some(open_subject(state, &row, *key_id, sealed).await?),
        // A data subject's consent whose subject was erased (an erasure
        // clears the sealed identifier and the key reference together).
        _ if row.kind == ConsentKind::DataSubject.as_str() => Some(Value::Null),
        _ => None,
    };
    Ok(ConsentView {
        reference: row.reference,
        kind: row.kind,
        carrier_id: row.carrier_id,
        customer_tenant_id: row.customer_tenant_id,
        subject,
        countries: row.countries.split(',').map(str::to_string).collect(),
        status: row.status,
        granted_at: from_micros(row.granted_at),
        status_changed_at: from_micros(row.status_changed_at),
        created_at: from_micros(row.created_at),
    })
}

async fn open_subject(
    state: &AppState,
    row: &ConsentRow,
    key_id: Uuid,
    sealed: &[u8],
) -> Result<Value> {
    let Some(key_row) = crate::storage::keys::subject_key_by_id(&state.db, key_id).await? else {
        return Ok(Value::Null);
    };
    state
        .keys
        .ensure(&state.db, [key_row.master_version])
        .await?;
    let key = state
        .keys
        .subject_key(&key_row)
        .map_err(|e| AppError::Integrity(format!("subject key {key_id}: {e}")))?;
    let pt = key
        .open(&subject_aad(&row.reference, key_id), sealed)
        .map_err(|e| AppError::Integrity(format!("consent {} subject: {e}", row.reference)))?;
    serde_json::from_slice(&pt)
        .map_err(|_| AppError::Integrity(format!("consent {} subject is not JSON", row.reference)))
}
