//! The Prometheus registry and typed handles: one place for every name.
//!
//! Labels are bounded: a route's prefix, an outcome, an error type. Never a
//! path, a client address or a token.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels for per-route series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

/// One route's series, taken from their families once, when the route is
/// compiled ([`Metrics::init_route`]): a stream then costs no label lookup.
#[derive(Clone, Debug)]
pub struct RouteMeters {
    pub streams_active: Gauge,
    pub events_sent: Counter,
    pub bytes_sent: Counter,
    pub keepalives_sent: Counter,
    pub first_event_seconds: Histogram,
    pub upstream_head_seconds: Histogram,
    pub events_per_second: Histogram,
    /// `streams_ended` for the two usual outcomes.
    pub complete: Counter,
    pub client_gone: Counter,
    /// `requests` with the outcome `ok`.
    pub requests_ok: Counter,
}

/// Labels for how a stream or request ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub route: String,
    pub outcome: &'static str,
}

/// Labels for upstream failures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub route: String,
    pub r#type: &'static str,
}

/// Labels for per-worker series: the worker thread, from 1.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabel {
    pub worker: u32,
}

/// Labels for handoff stream cancellations.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

fn latency_histogram() -> Histogram {
    // 1 ms … ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

fn rate_histogram() -> Histogram {
    // 1 … ~65,000 events/s
    Histogram::new(exponential_buckets(1.0, 2.0, 17))
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric the proxy exports.
pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<OutcomeLabels, Counter>,
    pub streams_active: Family<RouteLabel, Gauge>,
    pub streams_ended: Family<OutcomeLabels, Counter>,
    pub events_sent: Family<RouteLabel, Counter>,
    pub bytes_sent: Family<RouteLabel, Counter>,
    pub keepalives_sent: Family<RouteLabel, Counter>,
    pub upstream_errors: Family<ErrorLabels, Counter>,
    pub first_event_seconds: HistogramFamily<RouteLabel>,
    pub upstream_head_seconds: HistogramFamily<RouteLabel>,
    pub events_per_second: HistogramFamily<RouteLabel>,
    pub tokens_issued: Counter,
    pub tokens_redeemed: Counter,
    pub tokens_expired: Counter,
    pub resumes: Counter,
    pub replayed_events: Counter,
    pub streams_cancelled: Family<ReasonLabel, Counter>,
    pub connections_open: Gauge,
    pub worker_connections: Family<WorkerLabel, Gauge>,
    pub dns_lookups: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("ssegate");
        let m = Metrics {
            requests: Family::default(),
            streams_active: Family::default(),
            streams_ended: Family::default(),
            events_sent: Family::default(),
            bytes_sent: Family::default(),
            keepalives_sent: Family::default(),
            upstream_errors: Family::default(),
            first_event_seconds: Family::new_with_constructor(latency_histogram),
            upstream_head_seconds: Family::new_with_constructor(latency_histogram),
            events_per_second: Family::new_with_constructor(rate_histogram),
            tokens_issued: Counter::default(),
            tokens_redeemed: Counter::default(),
            tokens_expired: Counter::default(),
            resumes: Counter::default(),
            replayed_events: Counter::default(),
            streams_cancelled: Family::default(),
            connections_open: Gauge::default(),
            worker_connections: Family::default(),
            dns_lookups: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("requests", "Proxied requests by route and outcome", m.requests.clone());
        registry.register("streams_active", "Event streams open now", m.streams_active.clone());
        registry.register("streams_ended", "Event streams ended, by outcome", m.streams_ended.clone());
        registry.register("events_sent", "Events written to clients", m.events_sent.clone());
        registry.register("bytes_sent", "Event-stream bytes written to clients", m.bytes_sent.clone());
        registry.register("keepalives_sent", "Keep-alive comments written to clients", m.keepalives_sent.clone());
        registry.register("upstream_errors", "Upstream failures by type", m.upstream_errors.clone());
        registry.register(
            "first_event_seconds",
            "Time from request to the first event written",
            m.first_event_seconds.clone(),
        );
        registry.register(
            "upstream_head_seconds",
            "Time from upstream request to its response head",
            m.upstream_head_seconds.clone(),
        );
        registry.register(
            "events_per_second",
            "Events per second over each finished stream",
            m.events_per_second.clone(),
        );
        registry.register("tokens_issued", "Handoff tokens issued", m.tokens_issued.clone());
        registry.register("tokens_redeemed", "Handoff tokens redeemed by a first GET", m.tokens_redeemed.clone());
        registry.register("tokens_expired", "Handoff tokens that expired unused", m.tokens_expired.clone());
        registry.register("resumes", "Handoff GETs that resumed a running or ended stream", m.resumes.clone());
        registry.register("replayed_events", "Events replayed to resuming clients", m.replayed_events.clone());
        registry.register("streams_cancelled", "Handoff streams cancelled, by reason", m.streams_cancelled.clone());
        registry.register("connections_open", "Client connections open now", m.connections_open.clone());
        registry.register(
            "worker_connections",
            "Client connections open now on each worker thread",
            m.worker_connections.clone(),
        );
        registry.register(
            "dns_lookups",
            "Lookups of upstream host names (the addresses are kept for limits.dns_ttl)",
            m.dns_lookups.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Creates the per-route series, so that a fresh `/metrics` lists them,
    /// and returns their handles.
    pub fn init_route(&self, label: &RouteLabel) -> RouteMeters {
        for reason in ["grace", "delete"] {
            let _ = self.streams_cancelled.get_or_create(&ReasonLabel { reason });
        }
        for r#type in ["upstream_unavailable", "upstream_timeout", "upstream_reset"] {
            let _ = self.upstream_errors.get_or_create(&ErrorLabels { route: label.route.clone(), r#type });
        }
        let ended =
            |outcome| self.streams_ended.get_or_create(&OutcomeLabels { route: label.route.clone(), outcome }).clone();
        RouteMeters {
            streams_active: self.streams_active.get_or_create(label).clone(),
            events_sent: self.events_sent.get_or_create(label).clone(),
            bytes_sent: self.bytes_sent.get_or_create(label).clone(),
            keepalives_sent: self.keepalives_sent.get_or_create(label).clone(),
            first_event_seconds: self.first_event_seconds.get_or_create(label).clone(),
            upstream_head_seconds: self.upstream_head_seconds.get_or_create(label).clone(),
            events_per_second: self.events_per_second.get_or_create(label).clone(),
            complete: ended("complete"),
            client_gone: ended("client_gone"),
            requests_ok: self
                .requests
                .get_or_create(&OutcomeLabels { route: label.route.clone(), outcome: "ok" })
                .clone(),
        }
    }

    /// Counts an upstream failure.
    pub fn upstream_error(&self, route: &str, kind: &'static str) {
        self.upstream_errors.get_or_create(&ErrorLabels { route: route.to_string(), r#type: kind }).inc();
    }
}
