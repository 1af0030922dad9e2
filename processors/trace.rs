//! Distributed tracing: spans per batch, per record and per provider call, named and
//! attributed after the OpenTelemetry messaging and HTTP semantic conventions, and the W3C
//! trace context (`traceparent`) each carries on, so that one trace shows a fact's whole path:
//! its input record, the decisions taken on it, the dispatch steps, the provider call, and the
//! status webhook that comes back.
//!
//! The context travels in the `traceparent` header of every Kafka record Herald writes, in the
//! `traceparent` header of provider calls, and in the callback data the provider echoes in its
//! status webhooks. Spans are exported over OTLP only when an endpoint is configured
//! (`OTEL_EXPORTER_OTLP_ENDPOINT`); without one no span is recorded and the context an input
//! came with is carried on unchanged, so a downstream service still joins the caller's trace.

use anyhow::{anyhow, Result};
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider,
};
use opentelemetry::Context;
use rdkafka::message::{Headers, Message};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The header (Kafka and HTTP) that carries the W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

/// Where spans come from, as tracing targets them; the exporter takes only these.
pub const TARGET: &str = "herald::trace";

/// The span context a well-formed W3C `traceparent` (version 00) names: `None` for anything
/// else, an all-zero id included, so a malformed header starts a new trace rather than
/// failing the record.
pub fn parse(traceparent: &str) -> Option<SpanContext> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    // Version 00 has exactly four fields; a later version may add some after them.
    if !hex(version, 2) || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    if !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let cx = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags & TraceFlags::SAMPLED.to_u8()),
        true,
        TraceState::NONE,
    );
    cx.is_valid().then_some(cx)
}

/// The W3C `traceparent` of a span context, `None` when it is not a valid one.
pub fn format(cx: &SpanContext) -> Option<String> {
    cx.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            cx.trace_id(),
            cx.span_id(),
            cx.trace_flags().to_u8()
        )
    })
}

/// The `traceparent` header of a Kafka record, if it carries a well-formed one.
pub fn header_of<M: Message>(msg: &M) -> Option<String> {
    let headers = msg.headers()?;
    headers
        .iter()
        .filter(|h| h.key == TRACEPARENT)
        .filter_map(|h| std::str::from_utf8(h.value?).ok())
        .find(|v| parse(v).is_some())
        .map(str::to_string)
}

/// A record header carrying `traceparent`.
pub fn kafka_header(traceparent: &str) -> (&'static str, Vec<u8>) {
    (TRACEPARENT, traceparent.as_bytes().to_vec())
}

/// A span and the trace context what happens under it carries on.
pub struct Traced {
    /// The span itself: enter it, or instrument a future with it.
    pub span: tracing::Span,
    /// The context it came with, carried on when the span records nothing.
    carried: Option<String>,
}

impl Traced {
    /// The `traceparent` for what this span produces: its own when spans are exported, else
    /// the one it came with.
    pub fn traceparent(&self) -> Option<String> {
        format(self.span.context().span().span_context()).or_else(|| self.carried.clone())
    }

    /// Marks the span failed, with the kind of error (`error.type`).
    pub fn failed(&self, error_type: &str) {
        self.span.record("otel.status_code", "ERROR");
        self.span.record("error.type", error_type);
    }

    /// Makes `carried` the span's parent, so the span joins the trace that context belongs to.
    /// The enclosing span (a record's batch, an event's webhook request) becomes a link when
    /// the span joins another trace. A record's span without a context to join starts a trace
    /// of its own (`alone`): one fact, one trace, not one trace per batch.
    fn adopt(self, parent: Option<&str>, alone: bool) -> Traced {
        if self.span.is_disabled() {
            return self;
        }
        let parent = match parent.and_then(parse) {
            Some(remote) => Context::new().with_remote_span_context(remote),
            None if alone => Context::new(),
            None => return self,
        };
        let enclosing = tracing::Span::current().context();
        self.span.add_link(enclosing.span().span_context().clone());
        let _ = self.span.set_parent(parent);
        self
    }
}

/// The span of one transaction's batch of records of a stage, consumed in `group` (`process`,
/// kind consumer).
pub fn batch_span(stage: &str, group: &str, records: usize) -> tracing::Span {
    tracing::debug_span!(
        target: TARGET,
        "process",
        otel.kind = "consumer",
        messaging.system = "kafka",
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.consumer.group.name = group,
        messaging.batch.message_count = records as i64,
        herald.stage = stage,
    )
}

/// The span of one record's processing (`process {topic}`, kind consumer), a child of the
/// trace the record carries (`traceparent`: its header, else what its payload names), linked
/// to the batch it ran in.
pub fn record_span<M: Message>(stage: &str, msg: &M, payload_trace: Option<&str>) -> Traced {
    let carried = header_of(msg).or_else(|| {
        payload_trace
            .filter(|t| parse(t).is_some())
            .map(str::to_string)
    });
    let span = tracing::debug_span!(
        target: TARGET,
        "process record",
        otel.name = format!("process {}", msg.topic()),
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
        messaging.system = "kafka",
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = msg.topic(),
        messaging.destination.partition.id = msg.partition().to_string(),
        messaging.kafka.offset = msg.offset(),
        herald.stage = stage,
        messaging.kafka.message.key = msg
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default(),
    );
    let parent = carried.clone();
    Traced { span, carried }.adopt(parent.as_deref(), true)
}

/// The span of one provider call (`POST`, kind client, after the HTTP conventions), a child of
/// the dispatch step that asked for it.
pub fn provider_call_span(channel: &str, message_id: &str, parent: Option<&str>) -> Traced {
    let span = tracing::debug_span!(
        target: TARGET,
        "provider call",
        otel.name = "POST",
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
        http.request.method = "POST",
        herald.channel = channel,
        herald.message_id = message_id,
    );
    let carried = parent.filter(|t| parse(t).is_some()).map(str::to_string);
    Traced { span, carried }.adopt(parent, false)
}

/// The span of a webhook request the gateway serves (`POST {route}`, kind server), a child of
/// the trace its own `traceparent` header names, if any.
pub fn webhook_span(route: &str, traceparent: Option<&str>) -> Traced {
    let span = tracing::debug_span!(
        target: TARGET,
        "webhook",
        otel.name = format!("POST {route}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
        http.request.method = "POST",
        http.route = route,
        http.response.status_code = tracing::field::Empty,
    );
    let carried = traceparent
        .filter(|t| parse(t).is_some())
        .map(str::to_string);
    Traced { span, carried }.adopt(traceparent, false)
}

/// The span of writing one provider event to Kafka from a webhook (`send {topic}`, kind
/// producer): a child of the provider call whose callback data named `callback_trace`, so
/// the status joins the trace of the message it is about, linked to the webhook's request.
pub fn publish_span(topic: &str, callback_trace: Option<&str>) -> Traced {
    let span = tracing::debug_span!(
        target: TARGET,
        "publish",
        otel.name = format!("send {topic}"),
        otel.kind = "producer",
        messaging.system = "kafka",
        messaging.operation.type = "send",
        messaging.operation.name = "send",
        messaging.destination.name = topic,
    );
    let carried = callback_trace
        .filter(|t| parse(t).is_some())
        .map(str::to_string);
    Traced { span, carried }.adopt(callback_trace, false)
}

/// Span export over OTLP, when configured; flushes what is left when dropped.
pub struct Export {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Export {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown() {
                eprintln!("herald: spans not all exported at exit: {e}");
            }
        }
    }
}

/// Whether the environment asks for span export: an OTLP endpoint is set, and
/// `OTEL_TRACES_EXPORTER` is not `none` (the SDK's conventional switch).
pub fn export_wanted(var: impl Fn(&str) -> Option<String>) -> Result<bool> {
    let endpoint = [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .any(|k| var(k).is_some_and(|v| !v.trim().is_empty()));
    match var("OTEL_TRACES_EXPORTER").as_deref().map(str::trim) {
        None | Some("") | Some("otlp") => Ok(endpoint),
        Some("none") => Ok(false),
        Some(other) => Err(anyhow!(
            "OTEL_TRACES_EXPORTER={other}: Herald exports spans over OTLP only; set otlp or none"
        )),
    }
}

/// A tracing layer, boxed so it composes with the log layer whatever the subscriber.
pub type BoxedLayer<S> = Box<dyn tracing_subscriber::Layer<S> + Send + Sync>;

/// The tracing layer that records Herald's spans and exports them over OTLP/HTTP (endpoint,
/// protocol, headers and batching from the standard `OTEL_*` variables), as `service`
/// unless `OTEL_SERVICE_NAME` names it; `None` when export is not configured.
pub fn export_layer<S>(service: &str) -> Result<Option<(BoxedLayer<S>, Export)>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
{
    use tracing_subscriber::Layer;
    if !export_wanted(|k| std::env::var(k).ok())? {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| anyhow!("OTEL_EXPORTER_OTLP_ENDPOINT: the span exporter cannot start: {e}"))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service.to_string());
    }
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("herald");
    // Spans, and the warnings and errors inside them as span events; the log level set for
    // the console does not decide what a trace holds.
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(tracing_subscriber::filter::filter_fn(|m| {
            if m.is_span() {
                m.target() == TARGET
            } else {
                m.target().starts_with("herald") && *m.level() <= tracing::Level::WARN
            }
        }));
    Ok(Some((
        Box::new(layer),
        Export {
            provider: Some(provider),
        },
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_well_formed_traceparent_round_trips() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = parse(tp).expect("well formed");
        assert!(cx.is_remote() && cx.is_sampled());
        assert_eq!(format(&cx).as_deref(), Some(tp));
    }

    #[test]
    fn malformed_or_empty_contexts_start_a_new_trace() {
        for bad in [
            "",
            "00-abc-def-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(parse(bad).is_none(), "{bad:?} parsed");
        }
    }

    #[test]
    fn without_export_a_record_carries_its_context_on_unchanged() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let msg = rdkafka::message::OwnedMessage::new(
            None,
            Some(b"c-1".to_vec()),
            "oms.events.v1".into(),
            rdkafka::Timestamp::NotAvailable,
            0,
            7,
            None,
        );
        assert_eq!(
            record_span("processors", &msg, Some(tp))
                .traceparent()
                .as_deref(),
            Some(tp)
        );
        assert_eq!(
            record_span("processors", &msg, Some("junk")).traceparent(),
            None
        );
    }

    #[test]
    fn a_records_header_names_its_trace_before_its_payload() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let payload = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let with = |value: &str| {
            rdkafka::message::OwnedMessage::new(
                None,
                None,
                "oms.events.v1".into(),
                rdkafka::Timestamp::NotAvailable,
                0,
                7,
                Some(
                    rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                        key: TRACEPARENT,
                        value: Some(value.as_bytes()),
                    }),
                ),
            )
        };
        let traced = record_span("processors", &with(header), Some(payload));
        assert_eq!(traced.traceparent().as_deref(), Some(header));
        // A malformed header gives way to the payload's context.
        let traced = record_span("processors", &with("00-junk"), Some(payload));
        assert_eq!(traced.traceparent().as_deref(), Some(payload));
    }

    #[test]
    fn export_follows_the_standard_variables() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert!(!export_wanted(env(&[])).unwrap());
        assert!(export_wanted(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")])).unwrap());
        assert!(!export_wanted(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_TRACES_EXPORTER", "none")
        ]))
        .unwrap());
        let e = export_wanted(env(&[("OTEL_TRACES_EXPORTER", "jaeger")])).unwrap_err();
        assert!(e.to_string().contains("OTEL_TRACES_EXPORTER"));
    }
}
