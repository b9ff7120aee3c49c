//! Logging and traces: tracing with structured fields, level from
//! `RUST_LOG`; spans exported over OTLP/HTTP (protobuf) when an endpoint is
//! configured, off otherwise.
//!
//! Every request runs in a `request` span carrying its request id, so each
//! log line of a request names it. With traces on, the request span takes
//! its parent from the caller's W3C `traceparent`, a single-flag request's
//! evaluation gets a span, and so does each plugin call; with traces off,
//! no evaluation or plugin span is created at all ([`traces_on`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::config::LogFormat;

/// Whether spans are exported: evaluation and plugin spans are made only
/// then (a disabled `tracing` span still costs a check per use, an enabled
/// one an allocation).
static TRACES_ON: AtomicBool = AtomicBool::new(false);

/// Whether traces are exported.
pub fn traces_on() -> bool {
    TRACES_ON.load(Ordering::Relaxed)
}

/// Where and how traces go.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceOptions {
    /// The collector's OTLP/HTTP base URL (`http://collector:4318`); spans
    /// are posted to `<base>/v1/traces`.
    pub endpoint: String,
    /// Share of traces started here that are kept (a caller's sampled
    /// decision is followed).
    pub sample_ratio: f64,
}

/// Keeps the trace pipeline: dropping it sends what is still buffered.
#[must_use]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            TRACES_ON.store(false, Ordering::Relaxed);
            if let Err(e) = provider.shutdown() {
                eprintln!("flaghost: sending the last spans failed: {e}");
            }
        }
    }
}

/// Installs the global subscriber: log lines as `format` (level from
/// `RUST_LOG`, default `info`), and spans to `traces` if given.
pub fn init(format: LogFormat, traces: Option<&TraceOptions>) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: piped logs stay plain text for collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    // NB: the level filter is the log lines' own: spans go to the exporter
    // whatever RUST_LOG says.
    let logs = match format {
        LogFormat::Text => logs.with_filter(filter).boxed(),
        LogFormat::Json => logs.json().flatten_event(true).with_filter(filter).boxed(),
    };
    let Some(traces) = traces else {
        tracing_subscriber::registry().with(logs).init();
        return Ok(Telemetry { provider: None });
    };
    let endpoint = format!("{}/v1/traces", traces.endpoint.trim_end_matches('/'));
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(&endpoint)
        .with_timeout(Duration::from_secs(5))
        .build()
        .with_context(|| format!("--otlp-endpoint (OTEL_EXPORTER_OTLP_ENDPOINT): {endpoint}"))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("flaghost");
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            traces.sample_ratio,
        ))))
        .with_resource(resource.build())
        .build();
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("flaghost"))
        .with_filter(
            tracing_subscriber::filter::Targets::new()
                .with_target("flaghost", tracing::Level::INFO),
        );
    tracing_subscriber::registry().with(logs).with(spans).init();
    TRACES_ON.store(true, Ordering::Relaxed);
    tracing::info!(endpoint = %endpoint, sample_ratio = traces.sample_ratio, "traces exported over OTLP/HTTP");
    Ok(Telemetry {
        provider: Some(provider),
    })
}

/// The W3C trace context a request carries (`traceparent`, `tracestate`),
/// as the parent of `span`. Only with traces on.
pub fn adopt_caller_context(span: &tracing::Span, headers: &axum::http::HeaderMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    struct Headers<'a>(&'a axum::http::HeaderMap);
    impl opentelemetry::propagation::Extractor for Headers<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|v| v.to_str().ok())
        }
        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(axum::http::HeaderName::as_str).collect()
        }
    }
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Headers(headers)));
    // NB: fails only for a span already started or disabled; the span then
    // stays a root.
    let _ = span.set_parent(parent);
}
