//! Matching the platform's call detail records with a carrier's call
//! durations by keyed call hash, in SQL, without decrypting payloads.

use uuid::Uuid;

use super::{on_db, push_list, Db};

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
}

#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub matched: i64,
    pub mismatched: i64,
    pub missing_at_carrier: i64,
    pub missing_at_platform: i64,
    pub total_platform_seconds: i64,
    pub total_carrier_seconds: i64,
}

#[derive(Debug, Clone)]
pub struct Item {
    pub call_key: Vec<u8>,
    pub pd: Option<i64>,
    pub cd: Option<i64>,
}

/// What to list besides the totals: calls with `outcome`, after `after`.
pub struct Listing<'a> {
    pub outcome: Outcome,
    pub after: Option<&'a [u8]>,
    pub limit: usize,
}

/// The two sides' statement: one side's calls in call-key order, straight
/// from the covering index (no sort): `(call key, duration)`.
const SIDE: &str = "SELECT call_key, duration_seconds FROM transfers
    WHERE carrier_id = $1 AND category = $2 AND call_key IS NOT NULL AND duration_seconds IS NOT NULL
      AND occurred_at >= $3 AND occurred_at < $4
    ORDER BY call_key";

type Side<'a> = futures::stream::BoxStream<'a, sqlx::Result<(Vec<u8>, i64)>>;

/// Serializes taking two connections at once. A reconciliation reads its
/// two sides through two connections; several taking their first
/// connection each and then waiting for a second could hold the whole read
/// pool between them and stall every reader until the acquire timeout (a
/// carrier's burst of reconciliations did). Taken one pair at a time, pairs
/// no longer wait for each other. What remains: a transaction that takes a
/// second connection while it holds one (a write that meets a master-key
/// version another instance just added and re-reads the keyring; a
/// PostgreSQL sweep's batch beside its lock connection) can, with enough of
/// them at once on a small pool, wait for the pool's acquire timeout and
/// fail; that was so before reconciliations took pairs, and a pool of at
/// least a few connections per concurrent writer avoids it.
static PAIRS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn pair<DB: sqlx::Database>(
    pool: &sqlx::Pool<DB>,
) -> sqlx::Result<(
    sqlx::pool::PoolConnection<DB>,
    sqlx::pool::PoolConnection<DB>,
)> {
    let _one = PAIRS.lock().await;
    Ok((pool.acquire().await?, pool.acquire().await?))
}

/// Next call of a side, with retries of the same call folded into one
/// (the longest duration stands).
async fn next_call(
    s: &mut Side<'_>,
    peeked: &mut Option<(Vec<u8>, i64)>,
) -> sqlx::Result<Option<(Vec<u8>, i64)>> {
    use futures::StreamExt;
    let Some((key, mut d)) = (match peeked.take() {
        Some(p) => Some(p),
        None => s.next().await.transpose()?,
    }) else {
        return Ok(None);
    };
    while let Some((k, d2)) = s.next().await.transpose()? {
        if k == key {
            d = d.max(d2);
        } else {
            *peeked = Some((k, d2));
            break;
        }
    }
    Ok(Some((key, d)))
}

/// One merge pass over both sides: the totals, and a page of one outcome.
pub async fn reconcile(
    db: &Db,
    carrier: &str,
    from: i64,
    to: i64,
    tolerance: i64,
    listing: Option<Listing<'_>>,
) -> sqlx::Result<(Summary, Vec<Item>)> {
    macro_rules! side {
        ($conn:expr, $category:expr) => {
            sqlx::query_as(SIDE)
                .bind(carrier)
                .bind($category)
                .bind(from)
                .bind(to)
                .fetch(&mut *$conn)
        };
    }
    // A pool of one connection (an in-memory database, or a PostgreSQL pool
    // configured that small) cannot give a pair: both sides are read in
    // turn on its one connection and merged from memory.
    macro_rules! one {
        ($pool:expr) => {{
            let mut c = $pool.acquire().await?;
            let platform: Vec<(Vec<u8>, i64)> =
                side!(c, "call_detail_record").try_collect().await?;
            let carrier_side: Vec<(Vec<u8>, i64)> = side!(c, "call_duration").try_collect().await?;
            drop(c);
            let stream =
                |v: Vec<(Vec<u8>, i64)>| futures::stream::iter(v.into_iter().map(Ok)).boxed();
            merge(stream(platform), stream(carrier_side), tolerance, listing).await
        }};
    }
    macro_rules! two {
        ($pool:expr) => {{
            let (mut a, mut b) = pair($pool).await?;
            merge(
                side!(a, "call_detail_record"),
                side!(b, "call_duration"),
                tolerance,
                listing,
            )
            .await
        }};
    }
    use futures::{StreamExt, TryStreamExt};
    match db {
        Db::Sqlite { read, .. } if read.options().get_max_connections() < 2 => one!(read),
        Db::Postgres(p) if p.options().get_max_connections() < 2 => one!(p),
        Db::Sqlite { read, .. } => two!(read),
        Db::Postgres(p) => two!(p),
    }
}

async fn merge(
    mut platform: Side<'_>,
    mut carrier_side: Side<'_>,
    tolerance: i64,
    listing: Option<Listing<'_>>,
) -> sqlx::Result<(Summary, Vec<Item>)> {
    let (mut pp, mut cp) = (None, None);
    let mut p = next_call(&mut platform, &mut pp).await?;
    let mut c = next_call(&mut carrier_side, &mut cp).await?;
    let mut sum = Summary {
        matched: 0,
        mismatched: 0,
        missing_at_carrier: 0,
        missing_at_platform: 0,
        total_platform_seconds: 0,
        total_carrier_seconds: 0,
    };
    let mut items = Vec::new();
    loop {
        let (key, pd, cd) = match (&p, &c) {
            (None, None) => break,
            (Some((pk, _)), Some((ck, _))) if pk == ck => {
                let (key, pd) = p.take().expect("some");
                let (_, cd) = c.take().expect("some");
                p = next_call(&mut platform, &mut pp).await?;
                c = next_call(&mut carrier_side, &mut cp).await?;
                (key, Some(pd), Some(cd))
            }
            (Some((pk, _)), Some((ck, _))) if pk > ck => {
                let (key, cd) = c.take().expect("some");
                c = next_call(&mut carrier_side, &mut cp).await?;
                (key, None, Some(cd))
            }
            (Some(_), _) => {
                let (key, pd) = p.take().expect("some");
                p = next_call(&mut platform, &mut pp).await?;
                (key, Some(pd), None)
            }
            (None, Some(_)) => {
                let (key, cd) = c.take().expect("some");
                c = next_call(&mut carrier_side, &mut cp).await?;
                (key, None, Some(cd))
            }
        };
        let outcome = match (pd, cd) {
            (Some(a), Some(b)) if (a - b).abs() <= tolerance => Outcome::Matched,
            (Some(_), Some(_)) => Outcome::Mismatched,
            (Some(_), None) => Outcome::MissingAtCarrier,
            _ => Outcome::MissingAtPlatform,
        };
        match outcome {
            Outcome::Matched => sum.matched += 1,
            Outcome::Mismatched => sum.mismatched += 1,
            Outcome::MissingAtCarrier => sum.missing_at_carrier += 1,
            Outcome::MissingAtPlatform => sum.missing_at_platform += 1,
        }
        sum.total_platform_seconds += pd.unwrap_or(0);
        sum.total_carrier_seconds += cd.unwrap_or(0);
        if let Some(l) = &listing {
            if l.outcome == outcome
                && items.len() < l.limit
                && l.after.is_none_or(|a| key.as_slice() > a)
            {
                items.push(Item {
                    call_key: key,
                    pd,
                    cd,
                });
            }
        }
    }
    Ok((sum, items))
}

/// One record of each call key (to decrypt its call id). The categories and
/// the duration are named so that the lookup is a probe of the partial
/// index `transfers_call_key` (carrier, category, call key; records with a
/// duration) per key, not a scan of the carrier's records.
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
        qb.push_bind(carrier)
            .push(" AND category IN ('call_detail_record', 'call_duration') AND duration_seconds IS NOT NULL AND call_key IN (");
        push_list(&mut qb, keys.iter().map(|k| k.as_slice()));
        qb.push(")");
        qb.build_query_as().fetch_all(c).await
    })
}
