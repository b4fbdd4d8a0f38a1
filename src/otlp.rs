//! Traces exported over OTLP (gRPC) when `--otlp-endpoint` is given to a
//! router or a replica: each sampled call's `call` span (see
//! `cellbank_client::trace`), with its log lines as span events, goes to
//! the collector in batches. The span's parent is the caller's span named
//! by the request's `traceparent`, and the `traceparent` a router sends on
//! names the router's span, so the router's and the cell's spans form one
//! trace.

use cellbank_client::trace::TraceContext;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider};
use opentelemetry_otlp::WithExportConfig;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The exporter: flushed and stopped by [`Exporter::shutdown`].
pub struct Exporter {
    provider: opentelemetry_sdk::trace::TracerProvider,
}

impl Exporter {
    /// Sends what is still batched and stops.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("otlp: {e}");
        }
    }
}

pub type Layer =
    tracing_opentelemetry::OpenTelemetryLayer<tracing_subscriber::Registry, opentelemetry_sdk::trace::Tracer>;

/// The layer that exports spans to `endpoint` (`http://host:4317`) as
/// `service`. Must be called inside a Tokio runtime (the batches are sent
/// from a task on it).
pub fn layer(endpoint: &str, service: &str) -> anyhow::Result<(Layer, Exporter)> {
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(endpoint).build()?;
    let resource =
        opentelemetry_sdk::Resource::new([opentelemetry::KeyValue::new("service.name", service.to_string())]);
    let provider = opentelemetry_sdk::trace::TracerProvider::builder()
        .with_batch_exporter(exporter, opentelemetry_sdk::runtime::Tokio)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("cellbank");
    cellbank_client::trace::set_exporter_hooks(adopt, current_span_id);
    Ok((tracing_opentelemetry::layer().with_tracer(tracer), Exporter { provider }))
}

/// Makes `span` a child of the caller's span in `context`'s trace.
fn adopt(span: &tracing::Span, context: &TraceContext) {
    let remote = SpanContext::new(
        TraceId::from_bytes(context.trace_id),
        SpanId::from_bytes(context.parent_id),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
}

/// The exported id of the span this task is in, if any.
fn current_span_id() -> Option<[u8; 8]> {
    let id = tracing::Span::current().context().span().span_context().span_id();
    (id != SpanId::INVALID).then(|| id.to_bytes())
}
