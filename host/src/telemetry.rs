//! Logging and traces: tracing with structured fields, level from
//! `RUST_LOG`; spans exported over OTLP/HTTP (protobuf) when an endpoint is
//! configured, off otherwise.
//!
//! Each log line of a request names its request id. With traces on, the
//! request runs in a `request` span carrying it, whose parent is the
//! caller's W3C `traceparent`; a single-flag request's evaluation gets a
//! span, and so does each plugin call. With traces off, no span is created
//! at all ([`traces_on`]): the id rides in a task-local ([`in_request`])
//! that the log format prints.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, format};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
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
        LogFormat::Text => logs
            .event_format(NamingRequests {
                inner: format::Format::default().with_ansi(ansi),
                json: false,
            })
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .map_event_format(|inner| NamingRequests { inner, json: true })
            .with_filter(filter)
            .boxed(),
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

/// The request header carrying a caller's request id, answered back.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// A request's id: the caller's `X-Request-Id` if it is one a log line can
/// carry as it is (1 to 64 letters, digits, `.`, `_`, `:` or `-`; answered
/// back), else a number of this process's.
///
/// NB: a number, not text, until a log line or a span prints it: making a
/// string for every request cost 1% of a single-flag request (perf).
#[derive(Clone)]
pub enum RequestId {
    /// The caller's, answered back.
    Given(HeaderValue),
    /// This process's: its random number, and the request's.
    Own(u32, u64),
}

impl RequestId {
    /// The id of a request with these headers.
    pub fn of(headers: &HeaderMap) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        static PROCESS: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
        if let Some(given) = headers.get(REQUEST_ID_HEADER)
            && (1..=64).contains(&given.len())
            && given
                .as_bytes()
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
        {
            return RequestId::Given(given.clone());
        }
        // NB: numbered per thread (a thread's number in the high bits): one
        // counter shared by every core is a cache line they take in turn.
        thread_local! {
            static OWN: std::cell::Cell<u64> =
                std::cell::Cell::new(NEXT.fetch_add(1, Ordering::Relaxed) << 40);
        }
        RequestId::Own(
            *PROCESS.get_or_init(rand::random::<u32>),
            OWN.with(|n| {
                let id = n.get();
                n.set(id + 1);
                id
            }),
        )
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // (Checked above: ASCII.)
            RequestId::Given(value) => f.write_str(value.to_str().unwrap_or_default()),
            RequestId::Own(process, n) => write!(f, "{process:08x}-{n:x}"),
        }
    }
}

tokio::task_local! {
    /// The request a task (or a plugin thread's job) serves, for its log
    /// lines; set with traces off only (on, the `request` span carries it).
    static REQUEST: RequestId;
}

/// `future`, its log lines naming request `id`.
///
/// NB: not a span: with traces off, an enabled `request` span for every
/// request cost a single flag about 1.5 µs of CPU at `RUST_LOG=info`
/// (the log layer formats its fields into a string at creation, and every
/// poll enters and leaves it); this moves the id in and out of a
/// thread-local per poll, and only a log line formats it.
pub fn in_request<F: std::future::Future>(
    id: RequestId,
    future: F,
) -> impl std::future::Future<Output = F::Output> {
    REQUEST.scope(id, future)
}

/// The id of the request being served here, to carry to another thread.
pub fn current_request() -> Option<RequestId> {
    REQUEST.try_with(RequestId::clone).ok()
}

/// Runs `f`, its log lines naming request `id` (if any).
pub fn with_request<R>(id: Option<RequestId>, f: impl FnOnce() -> R) -> R {
    match id {
        Some(id) => REQUEST.sync_scope(id, f),
        None => f(),
    }
}

/// A log line format that adds the request id where one is being served
/// ([`in_request`]): ` request_id=<id>` at the end of a text line, a
/// `request_id` field in a JSON one.
struct NamingRequests<F> {
    inner: F,
    json: bool,
}

impl<S, N, F> FormatEvent<S, N> for NamingRequests<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let Ok(id) = REQUEST.try_with(ToString::to_string) else {
            return self.inner.format_event(ctx, writer, event);
        };
        // NB: formatted whole first, for the id to go before the newline
        // (and the JSON object's closing brace). Colours are kept: the
        // inner format is told whether to use them, not the buffer.
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        let end = line.trim_end_matches('\n').len();
        let (body, newline) = line.split_at(end);
        if self.json && body.ends_with('}') {
            let (object, brace) = body.split_at(body.len() - 1);
            // (The id is letters, digits and `.`, `_`, `:`, `-`: no escaping.)
            write!(writer, "{object},\"request_id\":\"{id}\"{brace}{newline}")
        } else {
            write!(writer, "{body} request_id={id}{newline}")
        }
    }
}
