//! The webhook gateway (`herald gateway`): the WhatsApp Cloud API posts message statuses,
//! inbound messages and template status changes here, the SMS provider its status callbacks,
//! the e-mail provider its delivery events. Each POST is authenticated (`X-Hub-Signature-256`,
//! `X-Twilio-Signature`, basic auth) before anything reads it, normalised into provider events,
//! and answered 200 only once Kafka has acknowledged every event (acks=all); a 5xx makes the
//! provider retry.
//!
//! The signature check and the normalisation are pure functions; the HTTP and Kafka parts are
//! the shell around them. Health and readiness are served on a listener of their own, so a
//! storm of webhooks cannot starve the probes.

use crate::context::deterministic_id;
use crate::events::*;
use crate::identity::{IdentifierKey, SenderDirectory};
use crate::kafka::KafkaSettings;
use crate::provider::parse_callback_data;
use crate::registry::Codec;
use crate::stages::wall_clock_ms;
use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hmac::{Hmac, Mac};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::TopicPartitionList;
use serde_json::Value;
use sha2::Sha256;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// The Cloud API's own limit on a webhook body; anything larger is answered 413.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

/// The header the provider signs a webhook with.
pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";

/// Why a webhook's signature was refused; the text is the 401's body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing X-Hub-Signature-256 header")]
    Missing,
    #[error("malformed X-Hub-Signature-256: {0}")]
    Malformed(&'static str),
    #[error("X-Hub-Signature-256 does not match the body")]
    Mismatch,
}

/// The header value for `body` signed with `secret`, as the provider sends it.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    // HMAC accepts a key of any length, so this never fails.
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::from("sha256=");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Checks `X-Hub-Signature-256` (HMAC-SHA256 of the raw body under the app secret) in constant
/// time. Hex digits are read in either case; anything but 64 of them after `sha256=` is
/// malformed.
pub fn verify_signature(
    secret: &[u8],
    header: Option<&[u8]>,
    body: &[u8],
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let hex = header
        .strip_prefix(b"sha256=")
        .ok_or(SignatureError::Malformed("it must start with 'sha256='"))?;
    if hex.len() != 64 {
        return Err(SignatureError::Malformed("it must hold 64 hex digits"));
    }
    let mut expected = [0u8; 32];
    for (i, pair) in hex.chunks(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        match (digit(pair[0]), digit(pair[1])) {
            (Some(h), Some(l)) => expected[i] = h << 4 | l,
            _ => return Err(SignatureError::Malformed("it holds a non-hex character")),
        }
    }
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(secret).map_err(|_| SignatureError::Mismatch)?;
    mac.update(body);
    // `verify_slice` compares in constant time.
    mac.verify_slice(&expected)
        .map_err(|_| SignatureError::Mismatch)
}

/// One callback the provider reported, normalised.
#[derive(Debug, Clone, PartialEq)]
pub enum Callback {
    /// A status of a message (ours when its callback data is Herald's).
    Status {
        /// The channel whose provider reported it.
        channel: Channel,
        provider_message_id: String,
        status: MessageStatus,
        error_code: Option<i32>,
        callback_data: Option<String>,
        at: Millis,
    },
    /// A customer wrote to the brand: text, a button or interactive reply, or media.
    Inbound {
        provider_message_id: String,
        from: String,
        /// The text, a reply's title, or a media caption.
        text: String,
        message_type: String,
        button_payload: Option<String>,
        reply_id: Option<String>,
        at: Millis,
    },
    /// A template's review status changed.
    TemplateStatus {
        name: String,
        language: String,
        status: TemplateStatus,
        at: Millis,
    },
}

/// Why a body could not be read as a Cloud API webhook; answered 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BodyError(pub String);

fn unix_seconds(v: &Value, fallback: Millis) -> Millis {
    v.as_str()
        .and_then(|s| s.parse::<i64>().ok())
        .or_else(|| v.as_i64())
        .map_or(fallback, |s| s * 1_000)
}

/// Reads a Cloud API webhook body (`object: whatsapp_business_account`) into callbacks.
/// `received_at` stands in for a missing timestamp. Kinds Herald does not use (contacts,
/// account updates) are skipped; a status or message it cannot read is an error.
pub fn normalise(body: &[u8], received_at: Millis) -> Result<Vec<Callback>, BodyError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| BodyError(format!("body is not JSON: {e}")))?;
    if v["object"] != "whatsapp_business_account" {
        return Err(BodyError(
            "object is not 'whatsapp_business_account'".into(),
        ));
    }
    let entries = v["entry"]
        .as_array()
        .ok_or_else(|| BodyError("'entry' is not a list".into()))?;
    let mut out = Vec::new();
    for entry in entries {
        // A change without its own timestamp takes its entry's (`time`, Unix seconds), so a
        // repeated webhook gives the same event id.
        let received_at = unix_seconds(&entry["time"], received_at);
        for change in entry["changes"].as_array().into_iter().flatten() {
            let value = &change["value"];
            match change["field"].as_str() {
                Some("messages") => {
                    for s in value["statuses"].as_array().into_iter().flatten() {
                        out.push(status(s, received_at)?);
                    }
                    for m in value["messages"].as_array().into_iter().flatten() {
                        if let Some(c) = inbound(m, received_at)? {
                            out.push(c);
                        }
                    }
                }
                Some("message_template_status_update") => {
                    out.push(template_status(value, received_at)?)
                }
                _ => {}
            }
        }
    }
    Ok(out)
}

fn status(s: &Value, received_at: Millis) -> Result<Callback, BodyError> {
    let id = s["id"]
        .as_str()
        .ok_or_else(|| BodyError("a status has no message id".into()))?;
    let status = match s["status"].as_str() {
        Some("sent") => MessageStatus::Sent,
        Some("delivered") => MessageStatus::Delivered,
        Some("read") => MessageStatus::Read,
        Some("failed") => MessageStatus::Failed,
        other => {
            return Err(BodyError(format!(
                "status of {id} is {other:?}, not sent, delivered, read or failed"
            )))
        }
    };
    let error_code = s["errors"][0]["code"].as_i64().map(|c| c as i32);
    Ok(Callback::Status {
        channel: Channel::Whatsapp,
        provider_message_id: id.to_string(),
        status,
        error_code,
        callback_data: s["biz_opaque_callback_data"].as_str().map(str::to_string),
        at: unix_seconds(&s["timestamp"], received_at),
    })
}

fn inbound(m: &Value, received_at: Millis) -> Result<Option<Callback>, BodyError> {
    let id = m["id"]
        .as_str()
        .ok_or_else(|| BodyError("an inbound message has no id".into()))?;
    let from = m["from"]
        .as_str()
        .ok_or_else(|| BodyError(format!("inbound message {id} has no sender")))?;
    let Some(message_type) = m["type"].as_str() else {
        return Ok(None);
    };
    let field = |path: &[&str]| {
        path.iter()
            .fold(&m[message_type], |v, k| &v[*k])
            .as_str()
            .map(str::to_string)
    };
    let (text, button_payload, reply_id) = match message_type {
        "text" => (m["text"]["body"].as_str().map(str::to_string), None, None),
        // A quick-reply button of a template, such as the marketing opt-out button: its text
        // and the payload the template gave it.
        "button" => (field(&["text"]), field(&["payload"]), None),
        "interactive" => {
            let reply = ["button_reply", "list_reply"]
                .into_iter()
                .find(|k| m["interactive"][*k].is_object())
                .unwrap_or("button_reply");
            (field(&[reply, "title"]), None, field(&[reply, "id"]))
        }
        // A caption is what the customer said under the photo ("it arrived broken").
        "image" | "video" | "document" => (field(&["caption"]), None, None),
        // Audio, stickers, reactions, locations and the like still open the service window;
        // their content is not Herald's to keep.
        _ => (None, None, None),
    };
    Ok(Some(Callback::Inbound {
        provider_message_id: id.to_string(),
        from: from.to_string(),
        text: text.unwrap_or_default(),
        message_type: message_type.to_string(),
        button_payload,
        reply_id,
        at: unix_seconds(&m["timestamp"], received_at),
    }))
}

fn template_status(v: &Value, received_at: Millis) -> Result<Callback, BodyError> {
    let status = match v["event"].as_str() {
        Some("APPROVED") => TemplateStatus::Approved,
        Some("PENDING") => TemplateStatus::Pending,
        Some("PAUSED") => TemplateStatus::Paused,
        Some("DISABLED") => TemplateStatus::Disabled,
        Some("REJECTED") => TemplateStatus::Rejected,
        other => {
            return Err(BodyError(format!(
                "template status event {other:?} is not one Herald knows"
            )))
        }
    };
    Ok(Callback::TemplateStatus {
        name: v["message_template_name"]
            .as_str()
            .ok_or_else(|| BodyError("template status without message_template_name".into()))?
            .to_string(),
        language: v["message_template_language"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        status,
        at: unix_seconds(&v["timestamp"], received_at),
    })
}

/// The event id of a callback: the same status of the same message, however often the
/// provider repeats it, has one id, so dedupe downstream sees one fact.
pub fn event_id(c: &Callback) -> String {
    match c {
        Callback::Status {
            provider_message_id,
            status,
            ..
        } => deterministic_id(&[provider_message_id, &wire_name(status)]),
        Callback::Inbound {
            provider_message_id,
            ..
        } => deterministic_id(&[provider_message_id, "inbound"]),
        Callback::TemplateStatus {
            name,
            language,
            status,
            at,
        } => deterministic_id(&[name, language, &wire_name(status), &at.to_string()]),
    }
}

/// Where a callback goes: to one customer's partition, to every partition (a template status
/// concerns every task), or to the dead-letter topic with the reason.
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    Customer(String),
    Everyone,
    Unroutable(String),
}

/// Routes a callback: a status by the customer in its callback data, an inbound message by the
/// customer whose profile holds the sender's number.
pub fn route(c: &Callback, sender_of: impl Fn(&str) -> Option<String>) -> Route {
    match c {
        Callback::Status { callback_data, provider_message_id, .. } => {
            match callback_data.as_deref().and_then(parse_callback_data) {
                Some((customer, _)) => Route::Customer(customer.to_string()),
                None => Route::Unroutable(format!(
                    "status of {provider_message_id} carries no Herald callback data: not a message Herald sent"
                )),
            }
        }
        Callback::Inbound { from, provider_message_id, .. } => match sender_of(from) {
            Some(customer) => Route::Customer(customer),
            None => Route::Unroutable(format!(
                "inbound message {provider_message_id} is from a number no customer profile holds"
            )),
        },
        Callback::TemplateStatus { .. } => Route::Everyone,
    }
}

/// The provider event for a callback, for `customer_id`.
pub fn provider_event(c: &Callback, customer_id: &str) -> InputEvent {
    let source = match c {
        Callback::Status { channel, .. } => match channel {
            Channel::Whatsapp => "whatsapp",
            Channel::Sms => "sms",
            Channel::Email => "email",
        },
        Callback::Inbound { .. } | Callback::TemplateStatus { .. } => "whatsapp",
    };
    let (at, fact) = match c {
        Callback::Status {
            channel: _,
            provider_message_id,
            status,
            error_code,
            callback_data,
            at,
        } => (
            *at,
            Fact::MessageStatusChanged(MessageStatusChanged {
                provider_message_id: provider_message_id.clone(),
                status: *status,
                error_code: *error_code,
                message_id: callback_data
                    .as_deref()
                    .and_then(parse_callback_data)
                    .map(|(_, m)| m.to_string()),
            }),
        ),
        Callback::Inbound {
            provider_message_id,
            text,
            message_type,
            button_payload,
            reply_id,
            at,
            ..
        } => (
            *at,
            Fact::InboundMessageReceived(InboundMessageReceived {
                provider_message_id: provider_message_id.clone(),
                text: text.clone(),
                message_type: Some(message_type.clone()),
                button_payload: button_payload.clone(),
                reply_id: reply_id.clone(),
            }),
        ),
        Callback::TemplateStatus {
            name,
            language,
            status,
            at,
        } => (
            *at,
            Fact::TemplateStatusChanged(TemplateStatusChanged {
                template_name: name.clone(),
                language: language.clone(),
                status: *status,
            }),
        ),
    };
    InputEvent::new(source, customer_id, &event_id(c), at, fact)
}

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

/// What the gateway has done, for `/metrics` and the benchmark.
#[derive(Default)]
pub struct GatewayMetrics {
    pub accepted: AtomicU64,
    pub events: AtomicU64,
    pub duplicates: AtomicU64,
    pub unauthorized: AtomicU64,
    pub bad_requests: AtomicU64,
    pub unavailable: AtomicU64,
    pub dead_letters: AtomicU64,
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

/// Compares two secrets without leaking, by its timing, where they differ.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a webhook was turned away, which decides the status it is answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The signature or credentials are missing or wrong: 401, nothing in the body is read.
    Unauthorized(String),
    /// Authenticated, but the body is not what the provider sends: 400.
    BadRequest(BodyError),
}

/// A WhatsApp Cloud API webhook as the gateway reads it: the signature over the raw body
/// first, then the body. The door `POST /webhook` opens onto.
pub fn read_whatsapp(
    app_secret: &[u8],
    signature: Option<&[u8]>,
    body: &[u8],
    received_at: Millis,
) -> Result<Vec<Callback>, Refusal> {
    verify_signature(app_secret, signature, body)
        .map_err(|e| Refusal::Unauthorized(e.to_string()))?;
    normalise(body, received_at).map_err(Refusal::BadRequest)
}

/// An SMS status callback as the gateway reads it: the signature over the URL the provider
/// called and the form fields, then the fields. The door `POST /webhooks/sms` opens onto.
pub fn read_sms(
    auth_token: &[u8],
    signature: Option<&[u8]>,
    url: &str,
    body: &[u8],
    received_at: Millis,
) -> Result<Vec<Callback>, Refusal> {
    let fields: Vec<(String, String)> = form_urlencoded::parse(body).into_owned().collect();
    crate::sms::verify_signature(auth_token, signature, url, &fields)
        .map_err(|e| Refusal::Unauthorized(e.to_string()))?;
    let data = crate::sms::url_param(url, crate::sms::CALLBACK_PARAM);
    crate::sms::normalise(&fields, data.as_deref(), received_at).map_err(Refusal::BadRequest)
}

/// E-mail delivery events as the gateway reads them: basic auth, then the body. The door
/// `POST /webhooks/email` opens onto.
pub fn read_email(
    (user, password): (&str, &str),
    authorization: Option<&[u8]>,
    body: &[u8],
    received_at: Millis,
) -> Result<Vec<Callback>, Refusal> {
    if !crate::email::authorized(authorization, user, password) {
        return Err(Refusal::Unauthorized(
            "missing or wrong basic-auth credentials".into(),
        ));
    }
    crate::email::normalise(body, received_at).map_err(Refusal::BadRequest)
}

async fn receive(State(g): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes) -> Response {
    let signature = headers.get(SIGNATURE_HEADER).map(|v| v.as_bytes());
    match read_whatsapp(&g.config.app_secret, signature, &body, wall_clock_ms()) {
        Ok(callbacks) => accept(&g, &callbacks, &body).await,
        Err(r) => refused(&g, r),
    }
}

fn refused(g: &Gateway, r: Refusal) -> Response {
    match r {
        Refusal::Unauthorized(why) => {
            g.metrics.unauthorized.fetch_add(1, Ordering::Relaxed);
            (StatusCode::UNAUTHORIZED, why).into_response()
        }
        Refusal::BadRequest(e) => {
            g.metrics.bad_requests.fetch_add(1, Ordering::Relaxed);
            (StatusCode::BAD_REQUEST, e.0).into_response()
        }
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
        .get(crate::sms::SIGNATURE_HEADER)
        .map(|v| v.as_bytes());
    match read_sms(token, signature, &url, &body, wall_clock_ms()) {
        Ok(callbacks) => accept(&g, &callbacks, &body).await,
        Err(r) => refused(&g, r),
    }
}

/// `POST /webhooks/email`: the e-mail provider's delivery events, under basic auth.
async fn receive_email(State(g): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes) -> Response {
    let Some((user, password)) = &g.config.email_webhook_auth else {
        return (
            StatusCode::NOT_FOUND,
            "e-mail events are not configured: set --email-webhook-auth (HERALD_EMAIL_WEBHOOK_AUTH)",
        )
            .into_response();
    };
    let authorization = headers.get("authorization").map(|v| v.as_bytes());
    match read_email((user, password), authorization, &body, wall_clock_ms()) {
        Ok(callbacks) => accept(&g, &callbacks, &body).await,
        Err(r) => refused(&g, r),
    }
}

/// Turns authenticated callbacks into provider events (or dead letters), and answers 200 once
/// Kafka has every one of them.
async fn accept(g: &Arc<Gateway>, callbacks: &[Callback], body: &[u8]) -> Response {
    let inc = |c: &AtomicU64| c.fetch_add(1, Ordering::Relaxed);
    let now = wall_clock_ms();
    let mut records: Vec<Outgoing> = Vec::new();
    let mut fresh = Vec::new();
    for c in callbacks {
        let id = event_id(c);
        let known = g.recent.lock().map(|r| r.contains(&id)).unwrap_or(false);
        if known {
            inc(&g.metrics.duplicates);
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
        let encoded = match &routed {
            Route::Customer(customer) => {
                let e = provider_event(c, customer);
                match g.codec.encode_input(&e).await {
                    Ok(v) => vec![(customer.clone(), None, v)],
                    Err(e) => return unavailable(g, format!("cannot encode: {e:#}")),
                }
            }
            Route::Everyone => {
                let mut out = Vec::new();
                // One record, copied to every partition.
                let key = format!("template:{id}");
                let v = match g.codec.encode_input(&provider_event(c, &key)).await {
                    Ok(v) => v,
                    Err(e) => return unavailable(g, format!("cannot encode: {e:#}")),
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
                inc(&g.metrics.dead_letters);
                tracing::warn!(reason = %why, "webhook callback dead-lettered");
                match g.codec.encode_dead_letter(&letter).await {
                    Ok(v) => {
                        records.push(Outgoing {
                            topic: g.codec.topics().dlq().clone(),
                            key: id.clone(),
                            partition: None,
                            error: Some(why.clone()),
                            value: v,
                        });
                        fresh.push(id);
                        continue;
                    }
                    Err(e) => return unavailable(g, format!("cannot encode: {e:#}")),
                }
            }
        };
        for (key, partition, value) in encoded {
            records.push(Outgoing {
                topic: g.codec.topics().provider().clone(),
                key,
                partition,
                error: None,
                value,
            });
        }
        fresh.push(id);
    }
    let Some(producer) = g.producer.read().ok().and_then(|p| p.clone()) else {
        return unavailable(g, "the gateway is shutting down".into());
    };
    // Every event acknowledged by all in-sync replicas, or the provider must try again.
    let sends = records.iter().map(|o| {
        let mut r = FutureRecord::to(&o.topic)
            .key(o.key.as_bytes())
            .payload(&o.value);
        if let Some(p) = o.partition {
            r = r.partition(p);
        }
        if let Some(error) = &o.error {
            r = r.headers(
                rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                    key: "herald.error",
                    value: Some(error.as_bytes()),
                }),
            );
        }
        producer.send(r, g.config.ack_timeout)
    });
    for result in futures::future::join_all(sends).await {
        if let Err((e, _)) = result {
            return unavailable(g, format!("Kafka did not acknowledge: {e}"));
        }
    }
    if let Ok(mut r) = g.recent.lock() {
        for id in fresh {
            r.insert(id);
        }
    }
    inc(&g.metrics.accepted);
    g.metrics
        .events
        .fetch_add(records.len() as u64, Ordering::Relaxed);
    (StatusCode::OK, "EVENT_RECEIVED").into_response()
}

/// One record a webhook turns into.
struct Outgoing {
    topic: Arc<str>,
    key: String,
    /// Set for a template status, which goes to every partition.
    partition: Option<i32>,
    /// The reason, for a dead letter.
    error: Option<String>,
    value: Vec<u8>,
}

fn unavailable(g: &Gateway, why: String) -> Response {
    g.metrics.unavailable.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(reason = %why, "webhook not accepted; the provider will retry");
    (StatusCode::SERVICE_UNAVAILABLE, why).into_response()
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
    let metrics = Arc::new(GatewayMetrics::default());
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
                    async move { render_metrics(&m) }
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

fn render_metrics(m: &GatewayMetrics) -> String {
    let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let mut out = String::new();
    for (name, help, v) in [
        (
            "herald_gateway_webhooks_accepted_total",
            "Webhooks answered 200.",
            g(&m.accepted),
        ),
        (
            "herald_gateway_events_total",
            "Provider events produced.",
            g(&m.events),
        ),
        (
            "herald_gateway_duplicate_callbacks_total",
            "Repeated callbacks that produced no event.",
            g(&m.duplicates),
        ),
        (
            "herald_gateway_unauthorized_total",
            "Webhooks refused for their signature (401).",
            g(&m.unauthorized),
        ),
        (
            "herald_gateway_bad_requests_total",
            "Webhooks whose body was not a Cloud API webhook (400).",
            g(&m.bad_requests),
        ),
        (
            "herald_gateway_unavailable_total",
            "Webhooks answered 503 because Kafka did not acknowledge.",
            g(&m.unavailable),
        ),
        (
            "herald_gateway_dead_letters_total",
            "Callbacks dead-lettered as unroutable.",
            g(&m.dead_letters),
        ),
    ] {
        crate::telemetry::counter_line(&mut out, name, help, v);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"app-secret-for-tests";

    fn status_body(callback: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "object": "whatsapp_business_account",
            "entry": [{"id": "102290129340398", "changes": [{"field": "messages", "value": {
                "messaging_product": "whatsapp",
                "metadata": {"display_phone_number": "15550783881", "phone_number_id": "106540352242922"},
                "statuses": [{"id": "wamid.X1", "status": "delivered", "timestamp": "1750000000",
                    "recipient_id": "15550100001", "biz_opaque_callback_data": callback}]
            }}]}]
        }))
        .unwrap()
    }

    #[test]
    fn a_signed_body_passes_and_each_kind_of_tampering_is_named() {
        let body = status_body("hc1|cust-1|m1");
        let good = sign(SECRET, &body);
        assert_eq!(
            verify_signature(SECRET, Some(good.as_bytes()), &body),
            Ok(())
        );
        assert_eq!(
            verify_signature(
                SECRET,
                Some(good.to_uppercase().replace("SHA256=", "sha256=").as_bytes()),
                &body
            ),
            Ok(()),
            "hex digits are read in either case"
        );
        assert_eq!(
            verify_signature(SECRET, None, &body),
            Err(SignatureError::Missing)
        );
        assert!(matches!(
            verify_signature(SECRET, Some(&good.as_bytes()[..40]), &body),
            Err(SignatureError::Malformed(_))
        ));
        assert!(matches!(
            verify_signature(SECRET, Some(b"sha1=0123"), &body),
            Err(SignatureError::Malformed(_))
        ));
        let other = sign(b"another-secret", &body);
        assert_eq!(
            verify_signature(SECRET, Some(other.as_bytes()), &body),
            Err(SignatureError::Mismatch)
        );
        let mut changed = body.clone();
        changed.push(b' ');
        assert_eq!(
            verify_signature(SECRET, Some(good.as_bytes()), &changed),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn statuses_route_by_their_callback_data_and_repeat_with_one_id() {
        let cs = normalise(&status_body("hc1|cust-1|m1"), 5).unwrap();
        assert_eq!(cs.len(), 1);
        assert_eq!(route(&cs[0], |_| None), Route::Customer("cust-1".into()));
        let e = provider_event(&cs[0], "cust-1");
        assert_eq!(e.envelope.occurred_at, 1_750_000_000_000);
        match &e.fact {
            Fact::MessageStatusChanged(s) => {
                assert_eq!(s.message_id.as_deref(), Some("m1"));
                assert_eq!(s.status, MessageStatus::Delivered);
            }
            other => panic!("{other:?}"),
        }
        let again = normalise(&status_body("hc1|cust-1|m1"), 9).unwrap();
        assert_eq!(event_id(&cs[0]), event_id(&again[0]));
        let foreign = normalise(&status_body("campaign-42"), 5).unwrap();
        assert!(matches!(route(&foreign[0], |_| None), Route::Unroutable(_)));
    }

    #[test]
    fn inbound_messages_and_template_changes_are_read() {
        let body = serde_json::json!({
            "object": "whatsapp_business_account",
            "entry": [{"id": "1", "changes": [
                {"field": "messages", "value": {"messages": [
                    {"from": "15550100001", "id": "wamid.IN1", "timestamp": "1750000001", "type": "text", "text": {"body": "hi 👋"}},
                    {"from": "15550100001", "id": "wamid.IN2", "timestamp": "1750000002", "type": "button", "button": {"text": "Stop promotions", "payload": "STOP"}}
                ]}},
                {"field": "message_template_status_update", "value": {"event": "PAUSED", "message_template_id": 7, "message_template_name": "cart_reminder", "message_template_language": "en_US", "reason": "LOW_QUALITY"}}
            ]}]
        });
        let cs = normalise(&serde_json::to_vec(&body).unwrap(), 5).unwrap();
        assert_eq!(cs.len(), 3);
        assert!(matches!(&cs[0], Callback::Inbound { text, .. } if text == "hi 👋"));
        assert!(matches!(&cs[1], Callback::Inbound { text, .. } if text == "Stop promotions"));
        assert_eq!(
            route(&cs[0], |from| (from == "15550100001")
                .then(|| "cust-9".to_string())),
            Route::Customer("cust-9".into())
        );
        assert!(matches!(route(&cs[0], |_| None), Route::Unroutable(_)));
        assert_eq!(route(&cs[2], |_| None), Route::Everyone);
    }

    /// One inbound message of the Cloud API's documented shapes, read as the customer's fact.
    fn inbound_fact(message: serde_json::Value) -> InboundMessageReceived {
        let body = serde_json::json!({
            "object": "whatsapp_business_account",
            "entry": [{"id": "1", "changes": [{"field": "messages", "value": {
                "messaging_product": "whatsapp",
                "metadata": {"display_phone_number": "15550000000", "phone_number_id": "1055501234567890"},
                "contacts": [{"profile": {"name": "Ana"}, "wa_id": "15550100001"}],
                "messages": [message]}}]}]
        });
        let cs = normalise(&serde_json::to_vec(&body).unwrap(), 5).unwrap();
        assert_eq!(cs.len(), 1);
        match provider_event(&cs[0], "cust-1").fact {
            Fact::InboundMessageReceived(m) => m,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn buttons_interactive_replies_and_captions_keep_their_meaning() {
        let base = |kind: &str, content: serde_json::Value| {
            let mut m = serde_json::json!({"from": "15550100001", "id": "wamid.X", "timestamp": "1750000001", "type": kind});
            m[kind] = content;
            m
        };
        // A quick-reply button of a template: the marketing opt-out button among them.
        let b = inbound_fact(base(
            "button",
            serde_json::json!({"payload": "Stop promotions", "text": "Stop promotions"}),
        ));
        assert_eq!(
            (b.text.as_str(), b.button_payload.as_deref()),
            ("Stop promotions", Some("Stop promotions"))
        );
        assert_eq!(b.message_type.as_deref(), Some("button"));
        // Interactive replies keep the id of what was chosen as well as its title.
        let r = inbound_fact(base(
            "interactive",
            serde_json::json!({"type": "button_reply", "button_reply": {"id": "track-1", "title": "Track my order"}}),
        ));
        assert_eq!(
            (r.text.as_str(), r.reply_id.as_deref()),
            ("Track my order", Some("track-1"))
        );
        let l = inbound_fact(base(
            "interactive",
            serde_json::json!({"type": "list_reply", "list_reply": {"id": "row-2", "title": "Stop promotions", "description": "No more offers"}}),
        ));
        assert_eq!(
            (l.text.as_str(), l.reply_id.as_deref()),
            ("Stop promotions", Some("row-2"))
        );
        // A caption is the text of an image, a video or a document.
        for kind in ["image", "video", "document"] {
            let m = inbound_fact(base(
                kind,
                serde_json::json!({"caption": "it arrived broken", "mime_type": "image/jpeg", "sha256": "abc", "id": "media-1"}),
            ));
            assert_eq!(m.text, "it arrived broken", "{kind}");
            assert_eq!(m.message_type.as_deref(), Some(kind));
        }
        // Media without a caption, and content Herald does not keep, carry no text.
        let bare = inbound_fact(base(
            "image",
            serde_json::json!({"mime_type": "image/jpeg", "sha256": "abc", "id": "media-1"}),
        ));
        assert_eq!(bare.text, "");
        for (kind, content) in [
            (
                "audio",
                serde_json::json!({"id": "a-1", "mime_type": "audio/ogg"}),
            ),
            (
                "sticker",
                serde_json::json!({"id": "s-1", "mime_type": "image/webp"}),
            ),
            (
                "reaction",
                serde_json::json!({"message_id": "wamid.OUT", "emoji": "👍"}),
            ),
            (
                "location",
                serde_json::json!({"latitude": 38.7, "longitude": -9.1}),
            ),
        ] {
            let m = inbound_fact(base(kind, content));
            assert_eq!(
                (m.text.as_str(), m.message_type.as_deref()),
                ("", Some(kind))
            );
        }
    }

    #[test]
    fn bodies_that_are_not_webhooks_are_refused_with_the_reason() {
        assert!(normalise(b"{not json", 0)
            .unwrap_err()
            .0
            .contains("not JSON"));
        assert!(normalise(br#"{"object":"page","entry":[]}"#, 0)
            .unwrap_err()
            .0
            .contains("whatsapp_business_account"));
        let bad_status = br#"{"object":"whatsapp_business_account","entry":[{"changes":[{"field":"messages","value":{"statuses":[{"id":"w","status":"exploded"}]}}]}]}"#;
        assert!(normalise(bad_status, 0).unwrap_err().0.contains("exploded"));
    }
}
