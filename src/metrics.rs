//! Prometheus metrics (prometheus-client): request counters and latency histograms updated on the
//! request path, and gauges for tokens and quota filled in at scrape time. Label sets are bounded:
//! operation names, status classes, configured client and app names; never users or paths.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub operation: &'static str,
    pub status_class: &'static str,
    pub client: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SignInLabels {
    pub app: Arc<str>,
    /// `sign_in` (no valid token was held) or `refresh` (replacing a valid one).
    pub kind: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppLabels {
    pub app: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QuotaLabels {
    pub operation: &'static str,
    pub app: Arc<str>,
    pub limit: &'static str,
    /// `local`: what meetgate's own accounting leaves; `upstream`: what the upstream last said.
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControlLabels {
    /// `acquire` (with the host password) or `keepalive` (with the current token).
    pub kind: &'static str,
    /// `ok`, `refused` (the upstream said no) or `failed` (meetgate could not ask).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientLabels {
    pub client: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientRefusalLabels {
    pub client: Arc<str>,
    /// `queue_wait` (no slot within `max_wait`), `max_queued` or `rate`.
    pub reason: &'static str,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms to ~65 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

/// Every metric meetgate exports.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_seconds: Family<OperationLabels, Histogram, fn() -> Histogram>,
    pub upstream_seconds: Family<OperationLabels, Histogram, fn() -> Histogram>,
    pub queue_wait_seconds: Family<OperationLabels, Histogram, fn() -> Histogram>,
    pub upstream_429: Family<OperationLabels, Counter>,
    pub sign_ins: Family<SignInLabels, Counter>,
    pub token_expiry_seconds: Family<AppLabels, Gauge<f64, AtomicU64>>,
    pub quota_remaining: Family<QuotaLabels, Gauge>,
    pub in_flight: Gauge,
    /// Client connections open on the proxy listener, and of those the parked ones (`conn`).
    pub client_connections: Gauge,
    pub client_connections_parked: Gauge,
    pub waiting: Gauge,
    pub ready: Gauge,
    pub cluster_degraded: Gauge,
    pub cluster_fallbacks: Gauge,
    pub cluster_leased: Gauge,
    pub control_sessions: Gauge,
    pub control_token_requests: Family<ControlLabels, Counter>,
    pub control_replays: Counter,
    /// Span batches sent to the OTLP collector (`result` ok or error), from [`crate::trace`].
    pub trace_export_batches: Family<ResultLabels, Counter>,
    pub client_admitted: Family<ClientLabels, Counter>,
    pub client_queue_wait_seconds: Family<ClientLabels, Histogram, fn() -> Histogram>,
    pub client_refused: Family<ClientRefusalLabels, Counter>,
    /// Per operation (by table index): its series, each looked up once. A family lookup takes
    /// the family's read lock, a write to a line every worker shares, and hashes the labels,
    /// on every call; these handles are the same series.
    per_op: Vec<OpSeries>,
    anonymous: Arc<str>,
}

#[derive(Default)]
struct OpSeries {
    /// The three request histograms, by [`OpHistogram`].
    histograms: [OnceLock<Histogram>; 3],
    /// `requests` by status class, for callers without client authentication (`client="-"`).
    anonymous_requests: [OnceLock<Counter>; STATUS_CLASSES],
}

const STATUS_CLASSES: usize = 5;

/// Which of the per-operation request histograms.
#[derive(Clone, Copy)]
pub enum OpHistogram {
    Request = 0,
    Upstream = 1,
    QueueWait = 2,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("meetgate");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by operation, status class and client",
            requests.clone(),
        );
        let hist = || {
            Family::<OperationLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram as fn() -> Histogram,
            )
        };
        let request_seconds = hist();
        registry.register(
            "request_duration_seconds",
            "Time from request received to response headers sent",
            request_seconds.clone(),
        );
        let upstream_seconds = hist();
        registry.register(
            "upstream_duration_seconds",
            "Time waiting for upstream response headers",
            upstream_seconds.clone(),
        );
        let queue_wait_seconds = hist();
        registry.register(
            "queue_wait_seconds",
            "Time waiting for a quota slot",
            queue_wait_seconds.clone(),
        );
        let upstream_429 = Family::<OperationLabels, Counter>::default();
        registry.register(
            "upstream_429",
            "Upstream 429 answers (the goal is zero)",
            upstream_429.clone(),
        );
        let sign_ins = Family::<SignInLabels, Counter>::default();
        registry.register(
            "sign_ins",
            "App ID sign-ins and refreshes, by app and result",
            sign_ins.clone(),
        );
        let token_expiry_seconds = Family::<AppLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "token_expiry_seconds",
            "Seconds until the token of each app's default identity expires (negative: none valid)",
            token_expiry_seconds.clone(),
        );
        let quota_remaining = Family::<QuotaLabels, Gauge>::default();
        registry.register(
            "quota_remaining",
            "Requests left in the current window per bucket, as meetgate sees it and as the upstream last reported",
            quota_remaining.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "in_flight_requests",
            "Requests being handled",
            in_flight.clone(),
        );
        let client_connections = Gauge::default();
        registry.register(
            "client_connections",
            "Client connections open on the proxy listener",
            client_connections.clone(),
        );
        let client_connections_parked = Gauge::default();
        registry.register(
            "client_connections_parked",
            "Idle HTTP/1.1 client connections parked between requests, holding none of hyper's buffers",
            client_connections_parked.clone(),
        );
        let waiting = Gauge::default();
        registry.register(
            "waiting_requests",
            "Requests waiting for a quota slot",
            waiting.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 when every app's default identity holds a valid token",
            ready.clone(),
        );
        let cluster_degraded = Gauge::default();
        registry.register(
            "cluster_degraded",
            "1 while Redis is unreachable and this replica runs on local fallbacks",
            cluster_degraded.clone(),
        );
        let cluster_fallbacks = Gauge::default();
        registry.register(
            "cluster_fallback_decisions",
            "Decisions made on local fallbacks because Redis was unreachable (since start)",
            cluster_fallbacks.clone(),
        );
        let cluster_leased = Gauge::default();
        registry.register(
            "cluster_leased_admissions",
            "Admissions on slots leased ahead from Redis, without a round trip of their own (since start)",
            cluster_leased.clone(),
        );
        let control_sessions = Gauge::default();
        registry.register(
            "control_sessions",
            "Meeting-control sessions held (one per app and conference)",
            control_sessions.clone(),
        );
        let control_token_requests = Family::<ControlLabels, Counter>::default();
        registry.register(
            "control_token_requests",
            "Meeting-control token requests meetgate made, by kind and result",
            control_token_requests.clone(),
        );
        let control_replays = Counter::default();
        registry.register(
            "control_replays",
            "Control calls replayed after the upstream refused meetgate's control token",
            control_replays.clone(),
        );
        let trace_export_batches = Family::<ResultLabels, Counter>::default();
        registry.register(
            "trace_export_batches",
            "Span batches sent to the OTLP collector, by result ([tracing] on only)",
            trace_export_batches.clone(),
        );
        let client_admitted = Family::<ClientLabels, Counter>::default();
        registry.register(
            "client_admitted",
            "Requests given a quota slot, by configured client",
            client_admitted.clone(),
        );
        let client_queue_wait_seconds =
            Family::<ClientLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram as fn() -> Histogram,
            );
        registry.register(
            "client_queue_wait_seconds",
            "Time waiting for a quota slot, by configured client",
            client_queue_wait_seconds.clone(),
        );
        let client_refused = Family::<ClientRefusalLabels, Counter>::default();
        registry.register(
            "client_refused",
            "Requests refused with 429 before the upstream, by configured client and reason",
            client_refused.clone(),
        );
        Metrics {
            registry,
            trace_export_batches,
            client_admitted,
            client_queue_wait_seconds,
            client_refused,
            control_sessions,
            control_token_requests,
            control_replays,
            cluster_degraded,
            cluster_fallbacks,
            cluster_leased,
            requests,
            request_seconds,
            upstream_seconds,
            queue_wait_seconds,
            upstream_429,
            sign_ins,
            token_expiry_seconds,
            quota_remaining,
            in_flight,
            client_connections,
            client_connections_parked,
            waiting,
            ready,
            per_op: (0..crate::operations::OperationTable::global().len())
                .map(|_| OpSeries::default())
                .collect(),
            anonymous: Arc::from("-"),
        }
    }

    /// Observes `seconds` in the `which` histogram's series for operation `name`, through the
    /// cached handle when the request was classified as table operation `op`.
    pub fn observe_op(
        &self,
        op: Option<crate::operations::OperationId>,
        name: &'static str,
        which: OpHistogram,
        seconds: f64,
    ) {
        let family = match which {
            OpHistogram::Request => &self.request_seconds,
            OpHistogram::Upstream => &self.upstream_seconds,
            OpHistogram::QueueWait => &self.queue_wait_seconds,
        };
        let labels = || OperationLabels { operation: name };
        match op.and_then(|id| self.per_op.get(id.index())) {
            Some(series) => series.histograms[which as usize]
                .get_or_init(|| family.get_or_create(&labels()).clone())
                .observe(seconds),
            None => family.get_or_create(&labels()).observe(seconds),
        }
    }

    /// Counts an answered request of operation `name` (table operation `op` once classified)
    /// with `status`, for the configured `client`, or `-` without client authentication.
    pub fn count_request(
        &self,
        op: Option<crate::operations::OperationId>,
        name: &'static str,
        status: u16,
        client: Option<&Arc<str>>,
    ) {
        let class = status_index(status);
        let labels = |client: &Arc<str>| RequestLabels {
            operation: name,
            status_class: STATUS_CLASS_NAMES[class],
            client: client.clone(),
        };
        match (client, op.and_then(|id| self.per_op.get(id.index()))) {
            (None, Some(series)) => series.anonymous_requests[class]
                .get_or_init(|| {
                    self.requests
                        .get_or_create(&labels(&self.anonymous))
                        .clone()
                })
                .inc(),
            (client, _) => self
                .requests
                .get_or_create(&labels(client.unwrap_or(&self.anonymous)))
                .inc(),
        };
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// Counts a control-token request: `keepalive` or an acquisition, and how it ended.
    pub fn control_token(&self, keepalive: bool, result: &'static str) {
        self.control_token_requests
            .get_or_create(&ControlLabels {
                kind: if keepalive { "keepalive" } else { "acquire" },
                result,
            })
            .inc();
    }

    pub fn sign_in(&self, app: &Arc<str>, refresh: bool, ok: bool) {
        self.sign_ins
            .get_or_create(&SignInLabels {
                app: app.clone(),
                kind: if refresh { "refresh" } else { "sign_in" },
                result: if ok { "ok" } else { "failed" },
            })
            .inc();
    }
}

const STATUS_CLASS_NAMES: [&str; STATUS_CLASSES] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// `2xx`, `4xx`, ... for a status code.
pub fn status_class(status: u16) -> &'static str {
    STATUS_CLASS_NAMES[status_index(status)]
}

fn status_index(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operations::{OperationId, OperationTable};

    /// The cached per-operation handle and a family lookup feed one and the same series.
    #[test]
    fn cached_handles_are_the_family_series() {
        let metrics = Metrics::new();
        let id = OperationId::from_index(0);
        let name = OperationTable::global().get(id).name;
        metrics.observe_op(Some(id), name, OpHistogram::Upstream, 0.001);
        metrics.observe_op(Some(id), name, OpHistogram::Upstream, 0.002);
        metrics.observe_op(None, name, OpHistogram::Upstream, 0.003);
        let text = metrics.encode();
        let count = format!("meetgate_upstream_duration_seconds_count{{operation=\"{name}\"}} 3");
        assert!(text.contains(&count), "{text}");
        assert!(
            !text.contains("meetgate_queue_wait_seconds_count"),
            "no series before a first observation: {text}"
        );
    }

    /// Requests without client authentication count through a cached handle into the same
    /// `client="-"` series a family lookup finds; a named client gets a series of its own.
    #[test]
    fn request_counts_by_status_class_and_client() {
        let metrics = Metrics::new();
        let id = OperationId::from_index(0);
        let name = OperationTable::global().get(id).name;
        metrics.count_request(Some(id), name, 200, None);
        metrics.count_request(Some(id), name, 204, None);
        metrics.count_request(None, name, 299, None);
        metrics.count_request(Some(id), name, 503, None);
        metrics.count_request(Some(id), name, 200, Some(&Arc::from("billing")));
        let text = metrics.encode();
        for series in [
            format!("{{operation=\"{name}\",status_class=\"2xx\",client=\"-\"}} 3"),
            format!("{{operation=\"{name}\",status_class=\"5xx\",client=\"-\"}} 1"),
            format!("{{operation=\"{name}\",status_class=\"2xx\",client=\"billing\"}} 1"),
        ] {
            assert!(text.contains(&series), "{series} in {text}");
        }
    }
}
