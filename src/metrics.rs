//! Prometheus metrics, one registry per service instance (no globals, so
//! tests can run several). Labels are route templates, methods, statuses
//! and categories: never identifiers or personal data.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub latency: HistogramVec,
    pub transfers_recorded: IntCounterVec,
    pub integrity_failures: IntCounterVec,
    /// Time spent appending audit entries inside write transactions.
    pub audit_append: prometheus::Histogram,
    /// Anonymous refusals counted rather than audited one by one.
    pub denials_coalesced: prometheus::IntCounter,
    /// Standalone audit appends (reads, authenticated denials), by how they
    /// were made.
    pub audit_appends: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("ledger".into()), None).expect("registry");
        let requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "HTTP requests by route template, method and status",
            ),
            &["route", "method", "status"],
        )
        .expect("metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "HTTP request latency by route template",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
            ]),
            &["route", "method"],
        )
        .expect("metric");
        let transfers_recorded = IntCounterVec::new(
            Opts::new(
                "transfers_recorded_total",
                "Transfers accepted (idempotent replays included), by category",
            ),
            &["category"],
        )
        .expect("metric");
        let integrity_failures = IntCounterVec::new(
            Opts::new(
                "integrity_failures_total",
                "Stored ciphertexts that failed authentication",
            ),
            &["what"],
        )
        .expect("metric");
        let audit_append = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "audit_append_seconds",
                "Time to append one audit entry inside a write transaction",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1,
            ]),
        )
        .expect("metric");
        registry
            .register(Box::new(audit_append.clone()))
            .expect("register");
        let denials_coalesced = prometheus::IntCounter::new(
            "denials_coalesced_total",
            "Refused requests without a valid token beyond the audit budget, \
             audited as counts (request.denied entries with `coalesced`)",
        )
        .expect("metric");
        registry
            .register(Box::new(denials_coalesced.clone()))
            .expect("register");
        let audit_appends = IntCounterVec::new(
            Opts::new(
                "audit_standalone_appends_total",
                "Audit entries appended on their own (reads, authenticated denials): `guessed` in one \
                 statement after where this instance last saw the chain end, `locked` under \
                 the append cursor's lock when that guess was missing or wrong",
            ),
            &["path"],
        )
        .expect("metric");
        // Shown at 0 from the start, so an alert on it has a series to watch.
        integrity_failures.with_label_values(&["transfer"]);
        for path in ["guessed", "locked"] {
            audit_appends.with_label_values(&[path]);
        }
        for c in [
            &requests,
            &transfers_recorded,
            &integrity_failures,
            &audit_appends,
        ] {
            registry.register(Box::new(c.clone())).expect("register");
        }
        registry
            .register(Box::new(latency.clone()))
            .expect("register");
        Self {
            registry,
            requests,
            latency,
            transfers_recorded,
            integrity_failures,
            audit_append,
            denials_coalesced,
            audit_appends,
        }
    }

    /// The Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
