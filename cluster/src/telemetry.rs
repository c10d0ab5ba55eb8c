//! Logs and OpenTelemetry traces for the router and the expert nodes.
//!
//! Logs go to stderr, filtered by `MOE_LOG`. Traces are exported over OTLP/gRPC only when an
//! endpoint is given (`--otlp-endpoint` or `OTEL_EXPORTER_OTLP_ENDPOINT`); without one no span
//! is even created ([`enabled`] is false and callers skip them), so tracing costs nothing.
//!
//! Every request is one trace: the client's W3C `traceparent` (gRPC metadata or HTTP header)
//! becomes the parent of the router's request span, and the router puts the context of each
//! per-node dispatch span into the `DispatchBatch` it sends, so the node's expert-batch span is
//! its child. Step, layer and dispatch spans are many per request: only a fraction of steps
//! (`--trace-step-ratio`) carries them ([`sample_step`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use clap::Args;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

#[derive(Args, Debug, Clone)]
pub struct TelemetryArgs {
    /// OTLP/gRPC collector for traces, e.g. `http://jaeger:4317`. Without one, no spans.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Fraction of model steps traced in detail (step, per-layer and per-node dispatch spans,
    /// and the nodes' expert-batch spans). Request, queue and prefill spans are always kept.
    #[arg(long, env = "MOE_TRACE_STEP_RATIO", default_value_t = 0.1)]
    pub trace_step_ratio: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP exporter for {endpoint}: {message}")]
    Exporter { endpoint: String, message: String },
    #[error("--trace-step-ratio must be within 0..=1, got {0}")]
    Ratio(f64),
}

static ENABLED: AtomicBool = AtomicBool::new(false);
/// `--trace-step-ratio` as f64 bits.
static STEP_RATIO: AtomicU64 = AtomicU64::new(0);
static STEPS: AtomicU64 = AtomicU64::new(0);

/// Whether spans are exported (an OTLP endpoint was given).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Whether this step gets detail spans: exactly `ratio` of steps, evenly spread (no RNG, so
/// two runs trace the same steps).
pub fn sample_step() -> bool {
    if !enabled() {
        return false;
    }
    let ratio = f64::from_bits(STEP_RATIO.load(Ordering::Relaxed));
    let n = STEPS.fetch_add(1, Ordering::Relaxed) as f64;
    ((n + 1.0) * ratio).floor() > (n * ratio).floor()
}

/// Keeps the exporter alive; dropping it flushes the spans still buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is buffered now (before a planned exit).
    pub fn flush(&self) {
        if let Some(provider) = &self.provider {
            let _ = provider.force_flush();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Installs logging and, with an endpoint, trace export. `service` is the default
/// `service.name` (`OTEL_SERVICE_NAME` overrides it); `instance` (the node or router id) becomes
/// `service.instance.id`. Call from within the tokio runtime (the exporter's client lives on it).
pub fn init(
    service: &str,
    instance: &str,
    args: &TelemetryArgs,
    default_log_filter: &str,
) -> Result<Telemetry, TelemetryError> {
    let log_filter = tracing_subscriber::EnvFilter::try_from_env("MOE_LOG")
        .unwrap_or_else(|_| default_log_filter.into());
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(log_filter);
    let Some(endpoint) = args.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) else {
        let _ = tracing_subscriber::registry().with(logs).try_init();
        return Ok(Telemetry { provider: None });
    };
    if !(0.0..=1.0).contains(&args.trace_step_ratio) {
        return Err(TelemetryError::Ratio(args.trace_step_ratio));
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| TelemetryError::Exporter {
            endpoint: endpoint.to_string(),
            message: e.to_string(),
        })?;
    let mut resource = opentelemetry_sdk::Resource::builder()
        .with_attribute(KeyValue::new("service.instance.id", instance.to_string()));
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_string());
    }
    let provider = SdkTracerProvider::builder()
        .with_resource(resource.build())
        .with_batch_exporter(exporter)
        .build();
    let tracer = provider.tracer(service.to_string());
    // Only this workspace's spans: the libraries' (h2, tonic, etcd) would drown the requests.
    // A `Targets` filter is decided once per callsite, so the libraries' hot-path trace events
    // stay free; a per-event filter function would be consulted on every one of them.
    let ours = tracing_subscriber::filter::Targets::new()
        .with_target("moe_router", tracing::Level::INFO)
        .with_target("moe_gateway", tracing::Level::INFO)
        .with_target("moe_expert_node", tracing::Level::INFO)
        .with_target("moe_cluster", tracing::Level::INFO)
        .with_target("moe_model", tracing::Level::INFO);
    let spans = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(ours);
    let _ = tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .try_init();
    STEP_RATIO.store(args.trace_step_ratio.to_bits(), Ordering::Relaxed);
    ENABLED.store(true, Ordering::Relaxed);
    tracing::info!(endpoint, service, instance, "exporting traces over OTLP");
    Ok(Telemetry {
        provider: Some(provider),
    })
}

/// Makes `span` the child of the remote span in `traceparent` (W3C Trace Context), when it
/// parses; an absent or malformed header leaves the span a root, as the standard says.
pub fn set_remote_parent(
    span: &tracing::Span,
    traceparent: Option<&str>,
    tracestate: Option<&str>,
) {
    let Some(traceparent) = traceparent else {
        return;
    };
    let mut carrier = HashMap::with_capacity(2);
    carrier.insert("traceparent".to_string(), traceparent.to_string());
    if let Some(state) = tracestate {
        carrier.insert("tracestate".to_string(), state.to_string());
    }
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The W3C `traceparent` of `span`, for a request to another process; `None` for a disabled
/// span.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    if span.is_none() {
        return None;
    }
    let mut carrier = HashMap::with_capacity(2);
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove("traceparent")
}

/// Links `span` (a batch's) to `other` (a request it served, in another trace).
pub fn add_link(span: &tracing::Span, other: &tracing::Span) {
    if span.is_none() || other.is_none() {
        return;
    }
    let target: SpanContext = other.context().span().span_context().clone();
    if target.is_valid() {
        span.add_link(target);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_sampling_keeps_the_ratio() {
        // Counts from wherever the global counter is: the ratio holds over any window.
        STEP_RATIO.store(0.25f64.to_bits(), Ordering::Relaxed);
        ENABLED.store(true, Ordering::Relaxed);
        let kept = (0..400).filter(|_| sample_step()).count();
        ENABLED.store(false, Ordering::Relaxed);
        assert_eq!(kept, 100);
        assert!(!sample_step(), "never sampled while tracing is off");
    }

    #[test]
    fn disabled_spans_carry_no_traceparent() {
        assert_eq!(traceparent(&tracing::Span::none()), None);
        // Malformed headers are ignored, not errors.
        set_remote_parent(&tracing::Span::none(), Some("garbage"), None);
    }
}
