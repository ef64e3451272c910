//! Refused requests that carry no valid token, audited at a bounded rate.
//!
//! Every refused request is audited, and the log is append-only and never
//! pruned. A client with no credentials at all could otherwise grow it
//! without end and keep SQLite's single writer busy with its refusals. So
//! each instance audits anonymous refusals one by one up to a rate (a token
//! bucket holding ten seconds' worth), and counts the rest. The count
//! goes into the chain as one `request.denied` entry with `coalesced` set.
//! That entry is appended before the next anonymous refusal audited one by
//! one, and by the server's flush every few seconds and at shutdown.
//! Nothing is dropped from the record. Only the count of the refusals since
//! the last flush dies with a killed process, and the
//! `ledger_denials_coalesced_total` metric has counted them meanwhile.
//! Refusals of callers with a valid token (403, a missing access reason)
//! are always audited one by one: they name an actor.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};

/// How often the server appends what it has counted.
pub const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Seconds' worth of refusals the bucket holds: a short burst is audited
/// whole.
const BURST_SECONDS: f64 = 10.0;

pub struct DenialBudget {
    /// Refusals per second audited one by one; `None`: every one.
    rate: Option<f64>,
    state: Mutex<State>,
    /// Appends of refusals under way (each in a task of its own), which
    /// the final flush waits for.
    in_flight: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// An append of a refusal under way, for as long as it lives.
pub struct InFlight(std::sync::Arc<DenialBudget>);

impl Drop for InFlight {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

struct State {
    tokens: f64,
    refilled: Instant,
    held: Held,
}

/// Anonymous refusals counted instead of audited one by one.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Held {
    pub count: u64,
    pub first_at: Option<DateTime<Utc>>,
    pub last_at: Option<DateTime<Utc>>,
    /// By response status.
    pub statuses: BTreeMap<u16, u64>,
    /// By method and route template (`unmatched` for paths no route
    /// matched): the router's routes, so a bounded set.
    pub routes: BTreeMap<String, u64>,
}

impl Held {
    pub fn add(&mut self, status: u16, route: &str, at: DateTime<Utc>) {
        self.count += 1;
        self.first_at.get_or_insert(at);
        self.last_at = Some(at);
        *self.statuses.entry(status).or_default() += 1;
        *self.routes.entry(route.to_string()).or_default() += 1;
    }

    fn merge(&mut self, other: Held) {
        self.count += other.count;
        self.first_at = match (self.first_at, other.first_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last_at = self.last_at.max(other.last_at);
        for (k, v) in other.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        for (k, v) in other.routes {
            *self.routes.entry(k).or_default() += v;
        }
    }

    /// The audit entry's target.
    pub fn target(&self) -> Value {
        let at =
            |t: Option<DateTime<Utc>>| t.map(|t| t.to_rfc3339_opts(SecondsFormat::Micros, true));
        let statuses: BTreeMap<String, u64> = self
            .statuses
            .iter()
            .map(|(s, n)| (s.to_string(), *n))
            .collect();
        json!({
            "coalesced": self.count,
            "first_at": at(self.first_at),
            "last_at": at(self.last_at),
            "statuses": statuses,
            "routes": self.routes,
        })
    }
}

impl DenialBudget {
    /// `per_second` anonymous refusals audited one by one (0: all of them).
    pub fn new(per_second: u32) -> Self {
        let rate = (per_second > 0).then_some(f64::from(per_second));
        Self {
            rate,
            state: Mutex::new(State {
                tokens: rate.map_or(0.0, |r| r * BURST_SECONDS),
                refilled: Instant::now(),
                held: Held::default(),
            }),
            in_flight: Default::default(),
            idle: tokio::sync::Notify::new(),
        }
    }

    /// Marks an append of a refusal as under way until the guard drops.
    pub fn begin_append(self: &std::sync::Arc<Self>) -> InFlight {
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Waits until no append of a refusal is under way.
    pub async fn appends_done(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.in_flight.load(std::sync::atomic::Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Whether this refusal is audited one by one; if not, it is counted.
    pub fn admit(&self, status: u16, route: &str, at: DateTime<Utc>) -> bool {
        self.admit_at(status, route, at, Instant::now())
    }

    fn admit_at(&self, status: u16, route: &str, at: DateTime<Utc>, now: Instant) -> bool {
        let Some(rate) = self.rate else {
            return true;
        };
        let mut s = self.state.lock().expect("denial budget");
        let elapsed = now.duration_since(s.refilled).as_secs_f64();
        s.tokens = (s.tokens + elapsed * rate).min(rate * BURST_SECONDS);
        s.refilled = now;
        if s.tokens >= 1.0 {
            s.tokens -= 1.0;
            true
        } else {
            s.held.add(status, route, at);
            false
        }
    }

    /// What has been counted since the last take, if anything.
    pub fn take_held(&self) -> Option<Held> {
        let mut s = self.state.lock().expect("denial budget");
        (s.held.count > 0).then(|| std::mem::take(&mut s.held))
    }

    /// Gives back a count whose entry could not be appended.
    pub fn hold_back(&self, held: Held) {
        self.state.lock().expect("denial budget").held.merge(held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_beyond_the_budget_is_counted_not_lost() {
        let budget = DenialBudget::new(2);
        let at = Utc::now();
        let now = Instant::now();
        let admitted = (0..100)
            .filter(|_| budget.admit_at(401, "GET /v1/transfers", at, now))
            .count();
        // Ten seconds' worth at once, then two a second.
        assert_eq!(admitted, 20);
        let later = now + std::time::Duration::from_secs(1);
        assert!(budget.admit_at(401, "GET /v1/transfers", at, later));
        assert!(budget.admit_at(401, "GET /v1/transfers", at, later));
        assert!(!budget.admit_at(401, "GET /v1/transfers", at, later));
        let held = budget.take_held().unwrap();
        assert_eq!(held.count as usize + admitted + 2, 103);
        assert_eq!(held.statuses[&401], held.count);
        assert_eq!(held.routes["GET /v1/transfers"], held.count);
        assert_eq!(held.first_at, Some(at));
        assert!(budget.take_held().is_none());

        // A count that could not be appended is kept for the next flush.
        budget.hold_back(held.clone());
        budget.admit_at(404, "unmatched", at, later);
        let again = budget.take_held().unwrap();
        assert_eq!(again.count, held.count + 1);
        assert_eq!(again.statuses[&404], 1);
        assert_eq!(again.target()["coalesced"], held.count + 1);
    }

    #[test]
    fn zero_audits_every_refusal() {
        let budget = DenialBudget::new(0);
        assert!((0..10_000).all(|_| budget.admit(401, "unmatched", Utc::now())));
        assert!(budget.take_held().is_none());
    }
}
