//! Consents of both kinds.

use sqlx::{FromRow, QueryBuilder};
use uuid::Uuid;

use super::{on_db, on_tx, push_list, Db, Tx, MAX_BINDS};

#[derive(Debug, Clone, FromRow)]
pub struct ConsentRow {
    pub reference: String,
    pub kind: String,
    pub carrier_id: String,
    pub customer_tenant_id: Option<String>,
    pub subject_index: Option<Vec<u8>>,
    pub subject_key_id: Option<Uuid>,
    pub subject_sealed: Option<Vec<u8>>,
    pub countries: String,
    pub status: String,
    pub granted_at: i64,
    pub status_changed_at: i64,
    pub created_at: i64,
    pub created_by: String,
}

const COLUMNS: &str =
    "reference, kind, carrier_id, customer_tenant_id, subject_index, subject_key_id, \
     subject_sealed, countries, status, granted_at, status_changed_at, created_at, created_by";

pub async fn insert(tx: &mut Tx, r: &ConsentRow) -> sqlx::Result<()> {
    on_tx!(tx, c => {
        sqlx::query(&format!(
            "INSERT INTO consents ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
        ))
        .bind(&r.reference)
        .bind(&r.kind)
        .bind(&r.carrier_id)
        .bind(&r.customer_tenant_id)
        .bind(&r.subject_index)
        .bind(r.subject_key_id)
        .bind(&r.subject_sealed)
        .bind(&r.countries)
        .bind(&r.status)
        .bind(r.granted_at)
        .bind(r.status_changed_at)
        .bind(r.created_at)
        .bind(&r.created_by)
        .execute(c)
        .await
        .map(|r| r.rows_affected())
    })?;
    Ok(())
}

/// Consents with this reference, within `scope` and, if given, of `carrier`
/// (at most two: enough to tell an ambiguous reference).
pub async fn find(
    db: &Db,
    reference: &str,
    scope: Option<&str>,
    carrier: Option<&str>,
) -> sqlx::Result<Vec<ConsentRow>> {
    on_db!(db, c => {
        sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM consents WHERE reference = $1 AND ($2 IS NULL OR carrier_id = $2)
             AND ($3 IS NULL OR carrier_id = $3) ORDER BY carrier_id LIMIT 2"
        ))
        .bind(reference)
        .bind(scope)
        .bind(carrier)
        .fetch_all(c)
        .await
    })
}

/// Reads consents inside a write transaction, so a status change cannot
/// slip between the check and the write that relies on it.
pub async fn get_many(tx: &mut Tx, references: &[&str]) -> sqlx::Result<Vec<ConsentRow>> {
    let mut out = Vec::new();
    for chunk in references.chunks(MAX_BINDS) {
        let rows: Vec<ConsentRow> = on_tx!(tx, c, DB => {
            let mut qb = QueryBuilder::<DB>::new(format!("SELECT {COLUMNS} FROM consents WHERE reference IN ("));
            push_list(&mut qb, chunk.iter().copied());
            qb.push(")");
            // SQLite's single writer already excludes concurrent status changes.
            if <DB as sqlx::Database>::NAME == "PostgreSQL" {
                qb.push(" FOR SHARE");
            }
            qb.build_query_as().fetch_all(&mut *c).await
        })?;
        out.extend(rows);
    }
    Ok(out)
}

/// The customer-operator consents of a customer tenant for a carrier, by
/// reference; locked against status changes on PostgreSQL, as
/// [`get_many`]'s are.
pub async fn of_tenant(tx: &mut Tx, carrier: &str, tenant: &str) -> sqlx::Result<Vec<ConsentRow>> {
    on_tx!(tx, c, DB => {
        let lock = if <DB as sqlx::Database>::NAME == "PostgreSQL" { " FOR SHARE" } else { "" };
        sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM consents
             WHERE carrier_id = $1 AND kind = 'customer_operator' AND customer_tenant_id = $2
             ORDER BY reference{lock}"
        ))
        .bind(carrier)
        .bind(tenant)
        .fetch_all(c)
        .await
    })
}

/// Moves a consent from `from` to `to`; false if its status changed meanwhile.
pub async fn set_status(
    tx: &mut Tx,
    carrier: &str,
    reference: &str,
    from: &str,
    to: &str,
    now: i64,
) -> sqlx::Result<bool> {
    let done = on_tx!(tx, c => {
        sqlx::query(
            "UPDATE consents SET status = $1, status_changed_at = $2
             WHERE carrier_id = $3 AND reference = $4 AND status = $5",
        )
        .bind(to)
        .bind(now)
        .bind(carrier)
        .bind(reference)
        .bind(from)
        .execute(c)
        .await
        .map(|r| r.rows_affected())
    })?;
    Ok(done == 1)
}
