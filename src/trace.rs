//! OpenTelemetry traces: the `[tracing]` settings, W3C trace context read from clients and sent
//! upstream, the request path's spans, and their OTLP/HTTP export (batched on a thread of its
//! own, off the request path).
//!
//! Spans are ordinary `tracing` spans with target [`TARGET`]. Only the OpenTelemetry layer
//! listens to that target (the log's filter turns it off), so without `[tracing]` no layer is
//! interested, every span is disabled at its call site, and the request path pays a branch.
//! Requests are sampled at their head, before any span is made: an unsampled request pays what
//! it pays with tracing off.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SamplingDecision, SamplingResult,
    SdkTracerProvider, ShouldSample, SpanData, SpanExporter,
};
use opentelemetry_sdk::Resource;
use serde::Serialize;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::secret::print;

/// The target of the request path's spans and span events.
pub const TARGET: &str = "meetgate::span";

/// `[tracing]`: where spans go, and how many.
#[derive(Clone, Serialize)]
pub struct TracingConfig {
    /// The collector's OTLP/HTTP base URL; spans are posted to `<it>/v1/traces`.
    #[serde(serialize_with = "print::redacted_url")]
    pub otlp_endpoint: secrecy::SecretString,
    /// The share of new traces kept; a client's sampled flag is followed either way.
    pub sample_ratio: f64,
    pub service_name: String,
    /// More resource attributes (`deployment.environment`, `service.namespace`, ...).
    pub resource_attributes: BTreeMap<String, String>,
    /// How long finished spans wait before a batch is sent.
    #[serde(serialize_with = "print::duration")]
    pub export_interval: Duration,
    /// Longest wait for the collector per batch.
    #[serde(serialize_with = "print::duration")]
    pub export_timeout: Duration,
    /// Finished spans kept for export at most; beyond it new ones are dropped (and counted).
    pub max_queued_spans: usize,
}

impl PartialEq for TracingConfig {
    fn eq(&self, other: &Self) -> bool {
        use secrecy::ExposeSecret;
        self.otlp_endpoint.expose_secret() == other.otlp_endpoint.expose_secret()
            && self.sample_ratio == other.sample_ratio
            && self.service_name == other.service_name
            && self.resource_attributes == other.resource_attributes
            && self.export_interval == other.export_interval
            && self.export_timeout == other.export_timeout
            && self.max_queued_spans == other.max_queued_spans
    }
}

impl std::fmt::Debug for TracingConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use secrecy::ExposeSecret;
        f.debug_struct("TracingConfig")
            .field(
                "otlp_endpoint",
                &crate::secret::redact_url(self.otlp_endpoint.expose_secret()),
            )
            .field("sample_ratio", &self.sample_ratio)
            .field("service_name", &self.service_name)
            .field("resource_attributes", &self.resource_attributes)
            .field("export_interval", &self.export_interval)
            .field("export_timeout", &self.export_timeout)
            .field("max_queued_spans", &self.max_queued_spans)
            .finish()
    }
}

/// Batches sent and failed, for `/metrics`.
pub static EXPORTED_BATCHES: AtomicU64 = AtomicU64::new(0);
pub static FAILED_BATCHES: AtomicU64 = AtomicU64::new(0);

/// Reads a client's `traceparent`/`tracestate` and writes ours upstream (W3C trace context).
fn propagator() -> &'static TraceContextPropagator {
    static P: std::sync::OnceLock<TraceContextPropagator> = std::sync::OnceLock::new();
    P.get_or_init(TraceContextPropagator::new)
}

/// The share of new traces kept (`tracing.sample_ratio`), set when the layer is built: unset
/// while tracing is off.
static SAMPLE_RATIO: std::sync::OnceLock<f64> = std::sync::OnceLock::new();

/// Whether a request is traced: as the client's sampled flag says when its `traceparent` is
/// valid (parent-based), else with the configured probability. Decided before any span exists:
/// tracing-opentelemetry builds every span it sees, records its fields and events, and drops
/// an unsampled one only when it ends, which cost a request at sample ratio 0.01 nearly half
/// of what tracing every request cost.
fn sampled(ratio: f64, parent: Option<&opentelemetry::Context>) -> bool {
    let client = parent.map(|cx| {
        let span = cx.span();
        let sc = span.span_context();
        (sc.is_valid(), sc.is_sampled())
    });
    match client {
        Some((true, sampled)) => sampled,
        _ => ratio >= 1.0 || (ratio > 0.0 && rand::random::<f64>() < ratio),
    }
}

/// The span of one request: a child of the client's span when it sent `traceparent`, else the
/// root of a new trace. `Span::none()` (free) when tracing is off or this request is not
/// sampled: then, as with tracing off, its phases make no spans ([`phase`]), nothing is
/// exported, and the client's trace headers go upstream unchanged.
pub fn request_span(headers: &HeaderMap, method: &http::Method) -> Span {
    let Some(&ratio) = SAMPLE_RATIO.get() else {
        return Span::none();
    };
    let parent = headers
        .contains_key("traceparent")
        .then(|| propagator().extract(&HeaderExtractor(headers)));
    if !sampled(ratio, parent.as_ref()) {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: TARGET,
        "request",
        otel.kind = "server",
        http.request.method = method.as_str(),
        meetgate.operation = tracing::field::Empty,
        meetgate.request_id = tracing::field::Empty,
        meetgate.client = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
    );
    if let Some(parent) = parent.filter(|_| !span.is_disabled()) {
        let _ = span.set_parent(parent);
    }
    span
}

/// A phase's span (`make`), a child of the request's; none when the request is not traced, so
/// it does not become the root of a trace of its own.
pub fn phase(request: &Span, make: impl FnOnce() -> Span) -> Span {
    if request.is_disabled() {
        Span::none()
    } else {
        traced(make)
    }
}

/// A span's making (a callsite, its metadata and fields: much code) kept out of the caller's,
/// where it would sit between the blocks of the requests that are not traced, most of them.
#[cold]
#[inline(never)]
fn traced(make: impl FnOnce() -> Span) -> Span {
    make()
}

/// The SDK's sampler: a request's span exists only when [`request_span`] chose to trace it, so
/// the root of a new trace named `request` is kept; any other span (a sign-in in the
/// background, say) is sampled by the parent-based ratio sampler.
#[derive(Clone, Debug)]
struct HeadSampled(Sampler);

impl ShouldSample for HeadSampled {
    fn should_sample(
        &self,
        parent_context: Option<&opentelemetry::Context>,
        trace_id: TraceId,
        name: &str,
        span_kind: &opentelemetry::trace::SpanKind,
        attributes: &[KeyValue],
        links: &[opentelemetry::trace::Link],
    ) -> SamplingResult {
        let root = parent_context.is_none_or(|cx| !cx.has_active_span());
        if root && name == "request" {
            return SamplingResult {
                decision: SamplingDecision::RecordAndSample,
                attributes: Vec::new(),
                trace_state: opentelemetry::trace::TraceState::default(),
            };
        }
        self.0
            .should_sample(parent_context, trace_id, name, span_kind, attributes, links)
    }
}

/// The trace id the access line carries: the request span's, or (tracing off) the one the
/// client's `traceparent` names.
pub fn trace_id(span: &Span, headers: &HeaderMap) -> Option<TraceId> {
    let id = if span.is_disabled() {
        if !headers.contains_key("traceparent") {
            return None;
        }
        propagator()
            .extract(&HeaderExtractor(headers))
            .span()
            .span_context()
            .trace_id()
    } else {
        span.context().span().span_context().trace_id()
    };
    (id != TraceId::INVALID).then_some(id)
}

/// Writes `span`'s context as `traceparent` (and the client's `tracestate`) into the upstream
/// request. With tracing off the client's own headers go unchanged.
pub fn inject(span: &Span, headers: &mut HeaderMap) {
    if span.is_disabled() {
        return;
    }
    propagator().inject_context(&span.context(), &mut HeaderInjector(headers));
}

/// The tracer provider, kept until exit: dropping it sends what is queued.
pub struct TraceGuard {
    provider: SdkTracerProvider,
}

impl Drop for TraceGuard {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

/// The OpenTelemetry layer for the subscriber and its guard.
pub fn layer<S>(
    cfg: &TracingConfig,
) -> Result<
    (
        tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>,
        TraceGuard,
    ),
    String,
>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    use secrecy::ExposeSecret;
    let base = cfg.otlp_endpoint.expose_secret().trim_end_matches('/');
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{base}/v1/traces"))
        .with_timeout(cfg.export_timeout)
        .with_headers(std::collections::HashMap::new())
        .build()
        .map_err(|e| format!("tracing.otlp_endpoint: cannot build the exporter: {e}"))?;
    let processor = BatchSpanProcessor::builder(Watched {
        inner: exporter,
        failing: Arc::new(AtomicBool::new(false)),
    })
    .with_batch_config(
        BatchConfigBuilder::default()
            .with_scheduled_delay(cfg.export_interval)
            .with_max_queue_size(cfg.max_queued_spans)
            .build(),
    )
    .build();
    let resource = Resource::builder_empty()
        .with_service_name(cfg.service_name.clone())
        .with_attributes(
            cfg.resource_attributes
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
        )
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(HeadSampled(Sampler::ParentBased(Box::new(
            Sampler::TraceIdRatioBased(cfg.sample_ratio),
        ))))
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("meetgate");
    let _ = SAMPLE_RATIO.set(cfg.sample_ratio);
    Ok((
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_tracked_inactivity(false)
            .with_threads(false),
        TraceGuard { provider },
    ))
}

/// The exporter, counting batches and saying once (not per batch, never per request) when the
/// collector stops answering, and once when it answers again.
#[derive(Debug)]
struct Watched<E> {
    inner: E,
    failing: Arc<AtomicBool>,
}

impl<E: SpanExporter> SpanExporter for Watched<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        match &result {
            Ok(()) => {
                EXPORTED_BATCHES.fetch_add(1, Ordering::Relaxed);
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(target: "meetgate::trace", "trace export recovered");
                }
            }
            Err(e) => {
                FAILED_BATCHES.fetch_add(1, Ordering::Relaxed);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        target: "meetgate::trace",
                        error = %e,
                        spans,
                        "trace export failing; spans are dropped until the collector answers (said once)"
                    );
                }
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_id_comes_from_the_clients_traceparent_when_tracing_is_off() {
        let mut h = HeaderMap::new();
        assert_eq!(trace_id(&Span::none(), &h), None);
        h.insert(
            "traceparent",
            http::HeaderValue::from_static(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        );
        assert_eq!(
            trace_id(&Span::none(), &h).map(|t| t.to_string()),
            Some("4bf92f3577b34da6a3ce929d0e0e4736".to_owned())
        );
        h.insert("traceparent", http::HeaderValue::from_static("garbage"));
        assert_eq!(trace_id(&Span::none(), &h), None);
    }

    #[test]
    fn tracing_off_leaves_the_clients_headers_alone() {
        let mut h = HeaderMap::new();
        h.insert("traceparent", http::HeaderValue::from_static("x"));
        inject(&Span::none(), &mut h);
        assert_eq!(h["traceparent"], "x");
        assert_eq!(h.len(), 1);
    }
}
