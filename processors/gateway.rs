//! The webhook gateway (`herald gateway`): the WhatsApp Cloud API posts message statuses,
//! inbound messages and template status changes here, the SMS provider its status callbacks,
//! the e-mail provider its delivery events. Each POST is authenticated (`X-Hub-Signature-256`,
//! `X-Twilio-Signature`, basic auth) before anything reads it, normalised into provider events,
//! and answered 200 only once Kafka has acknowledged every event (acks=all); a 5xx makes the
//! provider retry.
//!
//! The signature check and the normalisation are pure functions (`webhook` and each adapter
//! in `provider`); this module is the HTTP and Kafka shell around them. Health and readiness are served on a listener of their own, so a
//! storm of webhooks cannot starve the probes.

use crate::clock::wall_clock_ms;
use crate::events::*;
use crate::identity::{IdentifierKey, SenderDirectory};
use crate::kafka::KafkaSettings;
use crate::provider::callback::{constant_time_eq, Callback};
use crate::provider::whatsapp::SIGNATURE_HEADER;
use crate::registry::Codec;
use crate::trace;
use crate::webhook::{
    event_id, provider_event, read_email, read_sms, read_whatsapp, route, Refusal, Route,
};
use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::TopicPartitionList;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tracing::Instrument;

/// The Cloud API's own limit on a webhook body; anything larger is answered 413.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

/// Settings of `herald gateway`.
#[derive(Clone)]
pub struct GatewayConfig {
    /// The Meta app secret the provider signs webhooks with.
    pub app_secret: Vec<u8>,
    /// The token the verification handshake must present.
    pub verify_token: String,
    /// Hashes senders' numbers to find their customer.
    pub identifiers: IdentifierKey,
    /// Partitions of the provider topic (a template status goes to each).
    pub partitions: i32,
    /// How long Kafka may take to acknowledge a webhook's events before it is answered 503.
    pub ack_timeout: Duration,
    /// The SMS account's auth token, which signs its status callbacks; `/webhooks/sms` is
    /// answered 404 without it.
    pub sms_auth_token: Option<Vec<u8>>,
    /// The scheme and host the SMS provider calls the gateway at (`https://hooks.example.com`),
    /// which its signatures cover; by default `http://` and the request's Host header.
    pub public_url: Option<String>,
    /// The basic-auth user and password of the e-mail event webhook; `/webhooks/email` is
    /// answered 404 without them.
    pub email_webhook_auth: Option<(String, String)>,
}

/// What the gateway has done, for `/metrics`: webhooks by the answer they got, and what they
/// turned into, in the process's one registry.
pub struct GatewayMetrics {
    registry: prometheus::Registry,
    webhooks: prometheus::IntCounterVec,
    events: prometheus::IntCounter,
    duplicates: prometheus::IntCounter,
    dead_letters: prometheus::IntCounter,
    request_duration: prometheus::HistogramVec,
}

/// How a webhook was answered, as the `outcome` label.
#[derive(Debug, Clone, Copy)]
enum WebhookOutcome {
    /// 200: every record it turned into is in Kafka.
    Accepted,
    /// 401: its signature did not match.
    Unauthorized,
    /// 400: not a Cloud API webhook.
    BadRequest,
    /// 503: Kafka did not acknowledge; the provider retries.
    Unavailable,
}

impl WebhookOutcome {
    fn label(self) -> &'static str {
        match self {
            WebhookOutcome::Accepted => "accepted",
            WebhookOutcome::Unauthorized => "unauthorized",
            WebhookOutcome::BadRequest => "bad_request",
            WebhookOutcome::Unavailable => "unavailable",
        }
    }
}

impl GatewayMetrics {
    /// The gateway's metrics, every one registered with `herald_build_info`.
    pub fn new() -> Result<GatewayMetrics> {
        Self::build().context("building the gateway's metrics")
    }

    fn build() -> prometheus::Result<GatewayMetrics> {
        use prometheus::{HistogramOpts, IntCounter, IntCounterVec, Opts};
        let registry = crate::telemetry::process_registry()?;
        let webhooks = IntCounterVec::new(
            Opts::new(
                "herald_gateway_webhooks_total",
                "Webhooks received, by channel and by the answer they got (accepted, unauthorized, bad_request, unavailable).",
            ),
            &["channel", "outcome"],
        )?;
        let events = IntCounter::new(
            "herald_gateway_events_total",
            "Provider events produced from webhooks.",
        )?;
        let duplicates = IntCounter::new(
            "herald_gateway_duplicate_callbacks_total",
            "Repeated callbacks that produced no event.",
        )?;
        let dead_letters = IntCounter::new(
            "herald_gateway_dead_letters_total",
            "Callbacks dead-lettered as unroutable.",
        )?;
        let request_duration = prometheus::HistogramVec::new(
            HistogramOpts::new(
                "herald_gateway_request_duration_seconds",
                "From a webhook's arrival to its answer, by channel and outcome.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["channel", "outcome"],
        )?;
        registry.register(Box::new(webhooks.clone()))?;
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(duplicates.clone()))?;
        registry.register(Box::new(dead_letters.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        // Every route and answer has its series from the start: the first refusal is a change.
        for channel in ["whatsapp", "sms", "email"] {
            for outcome in [
                WebhookOutcome::Accepted,
                WebhookOutcome::Unauthorized,
                WebhookOutcome::BadRequest,
                WebhookOutcome::Unavailable,
            ] {
                webhooks
                    .with_label_values(&[channel, outcome.label()])
                    .inc_by(0);
            }
        }
        Ok(GatewayMetrics {
            registry,
            webhooks,
            events,
            duplicates,
            dead_letters,
            request_duration,
        })
    }

    fn answered(&self, channel: &str, outcome: WebhookOutcome, since: std::time::Instant) {
        let labels = [channel, outcome.label()];
        self.webhooks.with_label_values(&labels).inc();
        self.request_duration
            .with_label_values(&labels)
            .observe(since.elapsed().as_secs_f64());
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        crate::telemetry::render_registry(&self.registry)
    }
}

/// Recently produced (message, status) pairs: a repeated webhook yields no second event.
/// Bounded; an older repeat still carries the same event id, which dedupe recognises.
struct RecentCallbacks {
    seen: HashSet<String>,
    order: VecDeque<String>,
    capacity: usize,
}

impl RecentCallbacks {
    fn contains(&self, id: &str) -> bool {
        self.seen.contains(id)
    }
    fn insert(&mut self, id: String) {
        if self.seen.insert(id.clone()) {
            self.order.push_back(id);
            while self.order.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.seen.remove(&old);
                }
            }
        }
    }
}

struct Gateway {
    config: GatewayConfig,
    /// Taken away on shutdown, after which webhooks are answered 503.
    producer: RwLock<Option<FutureProducer>>,
    codec: Arc<Codec>,
    senders: Arc<RwLock<SenderDirectory>>,
    recent: Mutex<RecentCallbacks>,
    metrics: Arc<GatewayMetrics>,
}

#[derive(serde::Deserialize)]
struct Handshake {
    #[serde(rename = "hub.mode")]
    mode: Option<String>,
    #[serde(rename = "hub.verify_token")]
    verify_token: Option<String>,
    #[serde(rename = "hub.challenge")]
    challenge: Option<String>,
}

async fn verify(State(g): State<Arc<Gateway>>, Query(h): Query<Handshake>) -> Response {
    match (h.mode.as_deref(), h.verify_token, h.challenge) {
        (Some("subscribe"), Some(token), Some(challenge))
            if constant_time_eq(token.as_bytes(), g.config.verify_token.as_bytes()) =>
        {
            (StatusCode::OK, challenge).into_response()
        }
        (Some("subscribe"), Some(_), Some(_)) => {
            (StatusCode::FORBIDDEN, "hub.verify_token does not match").into_response()
        }
        _ => (
            StatusCode::BAD_REQUEST,
            "expected hub.mode=subscribe, hub.verify_token and hub.challenge",
        )
            .into_response(),
    }
}

async fn receive(State(g): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes) -> Response {
    let arrived = std::time::Instant::now();
    let signature = headers.get(SIGNATURE_HEADER).map(|v| v.as_bytes());
    let read = read_whatsapp(&g.config.app_secret, signature, &body, wall_clock_ms());
    answer(&g, "whatsapp", &headers, arrived, read, &body).await
}

/// Accepts or refuses a webhook as it read, and counts its answer; the request is a span of
/// the trace its `traceparent` header names, if any.
async fn answer(
    g: &Arc<Gateway>,
    channel: &str,
    headers: &HeaderMap,
    arrived: std::time::Instant,
    read: Result<Vec<Callback>, Refusal>,
    body: &[u8],
) -> Response {
    let route = match channel {
        "sms" => "/webhooks/sms",
        "email" => "/webhooks/email",
        _ => "/webhook",
    };
    let request = trace::webhook_span(
        route,
        headers
            .get(trace::TRACEPARENT)
            .and_then(|v| v.to_str().ok()),
    );
    let (outcome, response) = match read {
        Ok(callbacks) => {
            accept(g, &callbacks, body)
                .instrument(request.span.clone())
                .await
        }
        Err(r) => {
            request.failed("refused");
            refused(r)
        }
    };
    request
        .span
        .record("http.response.status_code", response.status().as_u16());
    if response.status().is_server_error() {
        request.failed("unavailable");
    }
    g.metrics.answered(channel, outcome, arrived);
    response
}

fn refused(r: Refusal) -> (WebhookOutcome, Response) {
    match r {
        Refusal::Unauthorized(why) => (
            WebhookOutcome::Unauthorized,
            (StatusCode::UNAUTHORIZED, why).into_response(),
        ),
        Refusal::BadRequest(e) => (
            WebhookOutcome::BadRequest,
            (StatusCode::BAD_REQUEST, e.0).into_response(),
        ),
    }
}

/// `POST /webhooks/sms`: an SMS status callback, its signature checked over the URL the
/// provider called and the form fields before any field is trusted.
async fn receive_sms(
    State(g): State<Arc<Gateway>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let arrived = std::time::Instant::now();
    let Some(token) = g.config.sms_auth_token.as_deref() else {
        return (
            StatusCode::NOT_FOUND,
            "SMS status callbacks are not configured: set --sms-auth-token (HERALD_SMS_AUTH_TOKEN)",
        )
            .into_response();
    };
    let base = match &g.config.public_url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => format!(
            "http://{}",
            headers
                .get("host")
                .and_then(|h| h.to_str().ok())
                .unwrap_or_default()
        ),
    };
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let url = format!("{base}{path}");
    let signature = headers
        .get(crate::provider::sms::SIGNATURE_HEADER)
        .map(|v| v.as_bytes());
    let read = read_sms(token, signature, &url, &body, wall_clock_ms());
    answer(&g, "sms", &headers, arrived, read, &body).await
}

/// `POST /webhooks/email`: the e-mail provider's delivery events, under basic auth.
async fn receive_email(State(g): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes) -> Response {
    let arrived = std::time::Instant::now();
    let Some((user, password)) = &g.config.email_webhook_auth else {
        return (
            StatusCode::NOT_FOUND,
            "e-mail events are not configured: set --email-webhook-auth (HERALD_EMAIL_WEBHOOK_AUTH)",
        )
            .into_response();
    };
    let authorization = headers.get("authorization").map(|v| v.as_bytes());
    let read = read_email((user, password), authorization, &body, wall_clock_ms());
    answer(&g, "email", &headers, arrived, read, &body).await
}

/// Turns authenticated callbacks into provider events (or dead letters), and answers 200 once
/// Kafka has every one of them.
async fn accept(
    g: &Arc<Gateway>,
    callbacks: &[Callback],
    body: &[u8],
) -> (WebhookOutcome, Response) {
    let now = wall_clock_ms();
    let mut records: Vec<Outgoing> = Vec::new();
    let mut fresh = Vec::new();
    // Each event's span lasts until Kafka acknowledged it.
    let mut publishing = Vec::new();
    for c in callbacks {
        let id = event_id(c);
        let known = g.recent.lock().map(|r| r.contains(&id)).unwrap_or(false);
        if known {
            g.metrics.duplicates.inc();
            continue;
        }
        let routed = {
            let senders = g.senders.read();
            route(c, |from| {
                senders.as_ref().ok().and_then(|s| {
                    s.customer_of(&g.config.identifiers, from)
                        .map(str::to_string)
                })
            })
        };
        // A status of Herald's message joins that message's trace, which its callback data
        // carries back from the provider call.
        let callback_trace = match c {
            Callback::Status {
                callback_data: Some(data),
                ..
            } => crate::provider::callback::trace_of_callback_data(data),
            _ => None,
        };
        let publish = trace::publish_span(g.codec.topics().provider(), callback_trace);
        let traceparent = publish.traceparent();
        publishing.push(publish);
        let encoded = match &routed {
            Route::Customer(customer) => {
                let mut e = provider_event(c, customer);
                e.envelope.trace_parent = traceparent.clone();
                match g.codec.encode_input(&e).await {
                    Ok(v) => vec![(customer.clone(), None, v)],
                    Err(e) => return unavailable(format!("cannot encode: {e:#}")),
                }
            }
            Route::Everyone => {
                let mut out = Vec::new();
                // One record, copied to every partition.
                let key = format!("template:{id}");
                let v = match g.codec.encode_input(&provider_event(c, &key)).await {
                    Ok(v) => v,
                    Err(e) => return unavailable(format!("cannot encode: {e:#}")),
                };
                for p in 0..g.config.partitions {
                    out.push((key.clone(), Some(p), v.clone()));
                }
                out
            }
            Route::Unroutable(why) => {
                let letter = DeadLetter {
                    source_topic: "webhook".into(),
                    source_partition: -1,
                    source_offset: -1,
                    key: None,
                    value: Some(body.to_vec()),
                    stage: "gateway".into(),
                    error: why.clone(),
                    failed_at: now,
                };
                g.metrics.dead_letters.inc();
                tracing::warn!(reason = %why, "webhook callback dead-lettered");
                match g.codec.encode_dead_letter(&letter).await {
                    Ok(v) => {
                        records.push(Outgoing {
                            topic: g.codec.topics().dlq().clone(),
                            key: id.clone(),
                            partition: None,
                            error: Some(why.clone()),
                            traceparent: traceparent.clone(),
                            value: v,
                        });
                        fresh.push(id);
                        continue;
                    }
                    Err(e) => return unavailable(format!("cannot encode: {e:#}")),
                }
            }
        };
        for (key, partition, value) in encoded {
            records.push(Outgoing {
                topic: g.codec.topics().provider().clone(),
                key,
                partition,
                error: None,
                traceparent: traceparent.clone(),
                value,
            });
        }
        fresh.push(id);
    }
    let Some(producer) = g.producer.read().ok().and_then(|p| p.clone()) else {
        return unavailable("the gateway is shutting down".into());
    };
    // Every event acknowledged by all in-sync replicas, or the provider must try again.
    let sends = records.iter().map(|o| {
        let mut r = FutureRecord::to(&o.topic)
            .key(o.key.as_bytes())
            .payload(&o.value);
        if let Some(p) = o.partition {
            r = r.partition(p);
        }
        let mut headers = rdkafka::message::OwnedHeaders::new();
        if let Some(error) = &o.error {
            headers = headers.insert(rdkafka::message::Header {
                key: "herald.error",
                value: Some(error.as_bytes()),
            });
        }
        if let Some(t) = &o.traceparent {
            headers = headers.insert(rdkafka::message::Header {
                key: trace::TRACEPARENT,
                value: Some(t.as_bytes()),
            });
        }
        if o.error.is_some() || o.traceparent.is_some() {
            r = r.headers(headers);
        }
        producer.send(r, g.config.ack_timeout)
    });
    for result in futures::future::join_all(sends).await {
        if let Err((e, _)) = result {
            for p in &publishing {
                p.failed("not_acknowledged");
            }
            return unavailable(format!("Kafka did not acknowledge: {e}"));
        }
    }
    drop(publishing);
    if let Ok(mut r) = g.recent.lock() {
        for id in fresh {
            r.insert(id);
        }
    }
    g.metrics.events.inc_by(records.len() as u64);
    (
        WebhookOutcome::Accepted,
        (StatusCode::OK, "EVENT_RECEIVED").into_response(),
    )
}

/// One record a webhook turns into.
struct Outgoing {
    topic: Arc<str>,
    key: String,
    /// Set for a template status, which goes to every partition.
    partition: Option<i32>,
    /// The reason, for a dead letter.
    error: Option<String>,
    /// The trace context the record carries on.
    traceparent: Option<String>,
    value: Vec<u8>,
}

fn unavailable(why: String) -> (WebhookOutcome, Response) {
    tracing::warn!(reason = %why, "webhook not accepted; the provider will retry");
    (
        WebhookOutcome::Unavailable,
        (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
    )
}

/// A running gateway: its addresses and counters.
pub struct RunningGateway {
    pub webhook_addr: SocketAddr,
    pub health_addr: SocketAddr,
    pub metrics: Arc<GatewayMetrics>,
    ready: Arc<AtomicBool>,
    follower: Option<std::thread::JoinHandle<()>>,
    gateway: Arc<Gateway>,
}

impl RunningGateway {
    /// Waits for the sender directory's reader to finish (after `stop` was set), so that it
    /// never outlives the cluster it reads.
    pub fn join(&mut self) {
        if let Some(h) = self.follower.take() {
            let _ = h.join();
        }
        if let Ok(mut p) = self.gateway.producer.write() {
            p.take();
        }
    }

    /// Whether the sender directory has caught up with the CRM topic.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

/// What keeps the sender directory: it follows every partition of the CRM topic from the
/// start, and marks the gateway ready once it reached the end it saw at startup.
struct SenderFollower {
    settings: KafkaSettings,
    codec: Arc<Codec>,
    rt: tokio::runtime::Handle,
    key: IdentifierKey,
    partitions: i32,
    senders: Arc<RwLock<SenderDirectory>>,
    ready: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl SenderFollower {
    /// Runs until `stop` is set.
    fn run(self) -> Result<()> {
        let SenderFollower {
            settings,
            codec,
            rt,
            key,
            partitions,
            senders,
            ready,
            stop,
        } = self;
        let consumer: BaseConsumer = settings
            .consumer_config(
                &format!("{}-gateway", settings.group_prefix),
                &format!("{}-gateway-senders", settings.group_prefix),
                &[],
            )
            .create()
            .context("cannot create the gateway's CRM reader")?;
        // The CRM topic for profiles just written, the contact changelog for those the CRM
        // topic's retention has already deleted.
        let mut tpl = TopicPartitionList::new();
        let mut ends = HashMap::new();
        let crm = codec.topics().crm().clone();
        let changelog = codec.topics().contacts().clone();
        for topic in [&crm, &changelog] {
            for p in 0..partitions {
                tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)?;
                let (low, high) = crate::kafka::watermarks(&consumer, topic, p)?;
                // Empty, or emptied by retention: nothing to read there.
                ends.insert((topic.to_string(), p), if high <= low { 0 } else { high });
            }
        }
        consumer.assign(&tpl)?;
        let mut caught_up: HashSet<(String, i32)> = ends
            .iter()
            .filter(|(_, high)| **high == 0)
            .map(|(tp, _)| tp.clone())
            .collect();
        while !stop.load(Ordering::Relaxed) {
            if caught_up.len() < ends.len() {
                // A transactional topic (the contact changelog) ends in a commit marker, which
                // no message shows: the position tells when the reader is past it.
                if let Ok(positions) = consumer.position() {
                    for e in positions.elements() {
                        let key = (e.topic().to_string(), e.partition());
                        if let (rdkafka::Offset::Offset(at), Some(end)) =
                            (e.offset(), ends.get(&key))
                        {
                            if at >= *end {
                                caught_up.insert(key);
                            }
                        }
                    }
                }
            }
            if caught_up.len() == ends.len() {
                ready.store(true, Ordering::Relaxed);
            }
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    if m.topic() == &*changelog {
                        let customer =
                            String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                        match rt.block_on(codec.decode_contact_card(m.payload())) {
                            Ok(Some(card)) => {
                                if let Ok(mut s) = senders.write() {
                                    s.learn(&customer, card.addresses.into_keys());
                                }
                            }
                            Ok(None) => {
                                if let Ok(mut s) = senders.write() {
                                    s.forget(&customer);
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "unreadable contact card"),
                        }
                    } else if let Ok(input) = rt.block_on(codec.decode_input(&crm, m.payload())) {
                        if let Ok(mut s) = senders.write() {
                            s.observe(&key, &input);
                        }
                    }
                    if ends
                        .get(&(m.topic().to_string(), m.partition()))
                        .is_some_and(|end| m.offset() + 1 >= *end)
                    {
                        caught_up.insert((m.topic().to_string(), m.partition()));
                    }
                }
                Some(Err(e)) => tracing::warn!(error = %e, "gateway CRM reader"),
                None => {}
            }
        }
        Ok(())
    }
}

/// Starts the gateway on `webhook_addr` (POST and GET `/webhook`) and `health_addr`
/// (`/healthz`, `/readyz`, `/metrics`); it runs on `rt` until the process ends or `stop` is set.
pub fn start(
    rt: &tokio::runtime::Runtime,
    settings: &KafkaSettings,
    codec: Arc<Codec>,
    config: GatewayConfig,
    webhook_addr: SocketAddr,
    health_addr: SocketAddr,
    stop: Arc<AtomicBool>,
) -> Result<RunningGateway> {
    let producer = settings.producer(None)?;
    let senders = Arc::new(RwLock::new(SenderDirectory::default()));
    let ready = Arc::new(AtomicBool::new(false));
    let metrics = Arc::new(GatewayMetrics::new()?);
    let follower = {
        let f = SenderFollower {
            settings: settings.clone(),
            codec: codec.clone(),
            rt: rt.handle().clone(),
            key: config.identifiers.clone(),
            partitions: config.partitions,
            senders: senders.clone(),
            ready: ready.clone(),
            stop: stop.clone(),
        };
        Some(std::thread::spawn(move || {
            if let Err(e) = f.run() {
                tracing::error!(error = %e, "the gateway's sender directory stopped");
            }
        }))
    };
    let gateway = Arc::new(Gateway {
        config,
        producer: RwLock::new(Some(producer)),
        codec,
        senders,
        recent: Mutex::new(RecentCallbacks {
            seen: HashSet::new(),
            order: VecDeque::new(),
            capacity: 100_000,
        }),
        metrics: metrics.clone(),
    });
    let webhooks = Router::new()
        .route("/webhook", get(verify).post(receive))
        .route("/webhooks/sms", axum::routing::post(receive_sms))
        .route("/webhooks/email", axum::routing::post(receive_email))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(gateway.clone());
    let health = {
        let (ready, m) = (ready.clone(), metrics.clone());
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/readyz",
                get(move || {
                    let ready = ready.clone();
                    async move {
                        if ready.load(Ordering::Relaxed) {
                            (StatusCode::OK, "ready")
                        } else {
                            (
                                StatusCode::SERVICE_UNAVAILABLE,
                                "reading the CRM topic for the sender directory",
                            )
                        }
                    }
                }),
            )
            .route(
                "/metrics",
                get(move || {
                    let m = m.clone();
                    async move { m.render() }
                }),
            )
    };
    let webhook_addr = rt.block_on(crate::telemetry::serve_router(
        webhook_addr,
        webhooks,
        "webhook gateway",
    ))?;
    // The probes get a listener and a thread of their own: a webhook storm fills the
    // webhook listener's queue and the shared runtime, not this one.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let probe_rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.send(Err(anyhow::anyhow!("health runtime: {e}")));
                return;
            }
        };
        probe_rt.block_on(async move {
            match crate::telemetry::serve_router(health_addr, health, "gateway health").await {
                Ok(a) => {
                    let _ = tx.send(Ok(a));
                    std::future::pending::<()>().await;
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        });
    });
    let health_addr = rx
        .recv()
        .map_err(|_| anyhow::anyhow!("the health listener did not start"))??;
    Ok(RunningGateway {
        webhook_addr,
        health_addr,
        metrics,
        ready,
        follower,
        gateway,
    })
}
