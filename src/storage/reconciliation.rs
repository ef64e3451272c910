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

/// One side's calls in call-key order, straight from the covering index
/// (no sort): `(call key, duration)`.
fn side<'a>(
    db: &'a Db,
    carrier: &'a str,
    category: &'static str,
    from: i64,
    to: i64,
) -> futures::stream::BoxStream<'a, sqlx::Result<(Vec<u8>, i64)>> {
    const SQL: &str = "SELECT call_key, duration_seconds FROM transfers
        WHERE carrier_id = $1 AND category = $2 AND call_key IS NOT NULL AND duration_seconds IS NOT NULL
          AND occurred_at >= $3 AND occurred_at < $4
        ORDER BY call_key";
    match db {
        Db::Sqlite { read, .. } => sqlx::query_as(SQL)
            .bind(carrier)
            .bind(category)
            .bind(from)
            .bind(to)
            .fetch(read),
        Db::Postgres(p) => sqlx::query_as(SQL)
            .bind(carrier)
            .bind(category)
            .bind(from)
            .bind(to)
            .fetch(p),
    }
}

/// Next call of a side, with retries of the same call folded into one
/// (the longest duration stands).
async fn next_call(
    s: &mut futures::stream::BoxStream<'_, sqlx::Result<(Vec<u8>, i64)>>,
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
    let mut platform = side(db, carrier, "call_detail_record", from, to);
    let mut carrier_side = side(db, carrier, "call_duration", from, to);
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
