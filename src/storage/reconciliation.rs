//! Matching the platform's call detail records with a carrier's call
//! durations by keyed call hash, in SQL, without decrypting payloads.

use sqlx::FromRow;
use uuid::Uuid;

use super::{on_db, Db};

/// One side per call: the latest record of each call key (a retried
/// submission of the same call counts once), then both sides joined.
const JOINED: &str = "
WITH p AS (
    SELECT call_key, duration_seconds AS d, id,
           ROW_NUMBER() OVER (PARTITION BY call_key ORDER BY recorded_at DESC, id DESC) AS rn
    FROM transfers
    WHERE carrier_id = $1 AND category = 'call_detail_record' AND occurred_at >= $2 AND occurred_at < $3
      AND call_key IS NOT NULL AND duration_seconds IS NOT NULL
), c AS (
    SELECT call_key, duration_seconds AS d, id,
           ROW_NUMBER() OVER (PARTITION BY call_key ORDER BY recorded_at DESC, id DESC) AS rn
    FROM transfers
    WHERE carrier_id = $1 AND category = 'call_duration' AND occurred_at >= $2 AND occurred_at < $3
      AND call_key IS NOT NULL AND duration_seconds IS NOT NULL
), j AS (
    SELECT COALESCE(p.call_key, c.call_key) AS call_key, p.d AS pd, c.d AS cd, p.id AS pid, c.id AS cid
    FROM (SELECT * FROM p WHERE rn = 1) p
    FULL OUTER JOIN (SELECT * FROM c WHERE rn = 1) c ON p.call_key = c.call_key
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
    pub pid: Option<Uuid>,
    pub cid: Option<Uuid>,
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
        SELECT call_key, pd, cd, pid, cid FROM j
        WHERE {} AND ($5 IS NULL OR call_key > $5) ORDER BY call_key LIMIT $6",
        outcome.condition()
    );
    on_db!(db, c => {
        sqlx::query_as(&sql).bind(carrier).bind(from).bind(to).bind(tolerance).bind(after).bind(limit).fetch_all(c).await
    })
}
