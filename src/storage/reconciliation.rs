//! Matching the platform's call detail records with a carrier's call
//! durations by keyed call hash, in SQL, without decrypting payloads.

use sqlx::FromRow;
use uuid::Uuid;

use super::{on_db, Db};

/// One duration per call and side (a retried submission of the same call
/// counts once; if retries disagree, the longest duration stands), then the
/// two sides side by side, keyed by call.
const JOINED: &str = "
WITH per_side AS (
    SELECT call_key, category, MAX(duration_seconds) AS d
    FROM transfers
    WHERE carrier_id = $1 AND category IN ('call_detail_record', 'call_duration')
      AND occurred_at >= $2 AND occurred_at < $3 AND call_key IS NOT NULL AND duration_seconds IS NOT NULL
    GROUP BY call_key, category
), j AS (
    SELECT call_key,
           MAX(CASE WHEN category = 'call_detail_record' THEN d END) AS pd,
           MAX(CASE WHEN category = 'call_duration' THEN d END) AS cd
    FROM per_side
    GROUP BY call_key
)";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Matched,
    Mismatched,
    MissingAtCarrier,
    MissingAtPlatform,
}

impl Outcome {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "matched" => Self::Matched,
            "mismatched" => Self::Mismatched,
            "missing_at_carrier" => Self::MissingAtCarrier,
            "missing_at_platform" => Self::MissingAtPlatform,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Matched => "matched",
            Self::Mismatched => "mismatched",
            Self::MissingAtCarrier => "missing_at_carrier",
            Self::MissingAtPlatform => "missing_at_platform",
        }
    }

    /// The SQL condition on the joined row; `$4` is the tolerance.
    fn condition(self) -> &'static str {
        match self {
            Self::Matched => "pd IS NOT NULL AND cd IS NOT NULL AND ABS(pd - cd) <= $4",
            Self::Mismatched => "pd IS NOT NULL AND cd IS NOT NULL AND ABS(pd - cd) > $4",
            Self::MissingAtCarrier => "cd IS NULL",
            Self::MissingAtPlatform => "pd IS NULL",
        }
    }
}

#[derive(Debug, Clone, Copy, FromRow)]
pub struct Summary {
    pub matched: i64,
    pub mismatched: i64,
    pub missing_at_carrier: i64,
    pub missing_at_platform: i64,
    pub total_platform_seconds: i64,
    pub total_carrier_seconds: i64,
}

pub async fn summary(
    db: &Db,
    carrier: &str,
    from: i64,
    to: i64,
    tolerance: i64,
) -> sqlx::Result<Summary> {
    let sql = format!(
        "{JOINED}
        SELECT
          CAST(COALESCE(SUM(CASE WHEN {m} THEN 1 ELSE 0 END), 0) AS BIGINT) AS matched,
          CAST(COALESCE(SUM(CASE WHEN {x} THEN 1 ELSE 0 END), 0) AS BIGINT) AS mismatched,
          CAST(COALESCE(SUM(CASE WHEN {mc} THEN 1 ELSE 0 END), 0) AS BIGINT) AS missing_at_carrier,
          CAST(COALESCE(SUM(CASE WHEN {mp} THEN 1 ELSE 0 END), 0) AS BIGINT) AS missing_at_platform,
          CAST(COALESCE(SUM(pd), 0) AS BIGINT) AS total_platform_seconds,
          CAST(COALESCE(SUM(cd), 0) AS BIGINT) AS total_carrier_seconds
        FROM j",
        m = Outcome::Matched.condition(),
        x = Outcome::Mismatched.condition(),
        mc = Outcome::MissingAtCarrier.condition(),
        mp = Outcome::MissingAtPlatform.condition(),
    );
    on_db!(db, c => {
        sqlx::query_as(&sql).bind(carrier).bind(from).bind(to).bind(tolerance).fetch_one(c).await
    })
}

#[derive(Debug, Clone, FromRow)]
pub struct Item {
    pub call_key: Vec<u8>,
    pub pd: Option<i64>,
    pub cd: Option<i64>,
}

/// A page of the calls with one outcome, in call-key order.
#[allow(clippy::too_many_arguments)]
pub async fn items(
    db: &Db,
    carrier: &str,
    from: i64,
    to: i64,
    tolerance: i64,
    outcome: Outcome,
    after: Option<&[u8]>,
    limit: i64,
) -> sqlx::Result<Vec<Item>> {
    let sql = format!(
        "{JOINED}
        SELECT call_key, pd, cd FROM j
        WHERE {} AND ($5 IS NULL OR call_key > $5) ORDER BY call_key LIMIT $6",
        outcome.condition()
    );
    on_db!(db, c => {
        sqlx::query_as(&sql).bind(carrier).bind(from).bind(to).bind(tolerance).bind(after).bind(limit).fetch_all(c).await
    })
}

/// One record of each call key (to decrypt its call id).
pub async fn record_per_call(
    db: &Db,
    carrier: &str,
    keys: &[Vec<u8>],
) -> sqlx::Result<Vec<(Vec<u8>, Uuid)>> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    on_db!(db, c, DB => {
        let mut qb = sqlx::QueryBuilder::<DB>::new("SELECT call_key, id FROM transfers WHERE carrier_id = ");
        qb.push_bind(carrier).push(" AND call_key IN (");
        let mut sep = qb.separated(", ");
        for k in keys {
            sep.push_bind(k.as_slice());
        }
        qb.push(")");
        qb.build_query_as().fetch_all(c).await
    })
}
