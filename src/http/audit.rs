//! `/v1/audit`: reading and verifying the audit trail.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;

use super::extract::Params;
use crate::app::AppState;
use crate::audit::{self, EntryView, Event, SignedHead, Verification};
use crate::auth::Principal;
use crate::error::Result;
use crate::storage::audit::{self as store, AuditFilter};
use crate::storage::micros;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/audit", get(list))
        .route("/audit/verify", get(verify))
        .route("/audit/head", get(head))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct AuditPage {
    pub items: Vec<EntryView>,
    pub next_cursor: Option<String>,
}

/// Audit entries, newest first.
#[utoipa::path(get, operation_id = "list_audit_entries", path = "/v1/audit", tag = "audit",
    params(("from" = Option<String>, Query), ("to" = Option<String>, Query),
           ("actor" = Option<String>, Query, description = "the actor's sub"),
           ("action" = Option<String>, Query, description = "e.g. transfer.read, request.denied"),
           ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "1 to 1000, default 100"), ("cursor" = Option<String>, Query)),
    responses((status = 200, body = AuditPage)), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    who: Principal,
    mut p: Params,
) -> Result<Json<AuditPage>> {
    state.authorize(&who, "audit", "read")?;
    p.allow(&["from", "to", "actor", "action", "limit", "cursor"]);
    let (from, to) = p.period();
    let mut f = AuditFilter {
        from: from.map(micros),
        to: to.map(micros),
        actor: p.get("actor").map(str::to_string),
        action: p.get("action").map(str::to_string),
        before: p.parse("cursor", |s| {
            s.parse::<i64>()
                .map_err(|_| "is not a cursor this service issued".to_string())
        }),
        limit: p.limit(),
    };
    p.finish()?;
    f.limit += 1;
    let mut rows = store::list(&state.db, &f).await?;
    f.limit -= 1;
    let next_cursor = crate::storage::next_page(&mut rows, f.limit, |r| r.seq.to_string());
    let target = json!({
        "filters": {"from": f.from, "to": f.to, "actor": f.actor, "action": f.action, "before": f.before},
        "returned": rows.len(),
    });
    audit::record(&state, Some(&who), Event::new("audit.read", target)).await?;
    Ok(Json(AuditPage {
        items: rows.into_iter().map(EntryView::from).collect(),
        next_cursor,
    }))
}

/// Recomputes the whole chain from the stored bytes.
#[utoipa::path(get, path = "/v1/audit/verify", tag = "audit",
    responses((status = 200, body = Verification)), security(("bearer" = [])))]
pub async fn verify(State(state): State<AppState>, who: Principal) -> Result<Json<Verification>> {
    state.authorize(&who, "audit", "read")?;
    let v = audit::verify(&state.db).await?;
    let target = json!({"valid": v.valid, "entries": v.entries, "first_bad_seq": v.first_bad_seq});
    if let Err(e) = audit::record(&state, Some(&who), Event::new("audit.verify", target)).await {
        // A chain broken so that nothing can be appended to it (its cursor
        // deleted) is exactly what the auditor must be told; any other
        // failed append fails the read, as for every audited read.
        if !v.cursor_missing {
            return Err(e);
        }
        tracing::error!(error = %e, first_bad_seq = ?v.first_bad_seq,
            "the audit chain is broken and this verification could not be appended to it");
    }
    Ok(Json(v))
}

/// A signed checkpoint of the chain's head, to keep and check later with
/// `transfer-ledger audit verify --since-head FILE`.
#[utoipa::path(get, path = "/v1/audit/head", tag = "audit",
    responses((status = 200, body = SignedHead)), security(("bearer" = [])))]
pub async fn head(State(state): State<AppState>, who: Principal) -> Result<Json<SignedHead>> {
    state.authorize(&who, "audit", "read")?;
    let head = audit::signed_head(&state).await?;
    audit::record(
        &state,
        Some(&who),
        Event::new("audit.head", json!({"seq": head.seq})),
    )
    .await?;
    Ok(Json(head))
}
