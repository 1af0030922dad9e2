//! The provider shell: the [`Provider`] trait every channel's adapter implements, the WhatsApp
//! Cloud API client for template and session messages, and the provider simulator, an HTTP
//! server that accepts the Cloud API (and, through `sms` and `email`, the SMS and e-mail
//! providers') send request shapes, answers with a message id, posts signed status callbacks,
//! and keeps what it received so that checks independent of Herald's policy code can inspect
//! it.

use crate::dispatch::SendOutcome;
use crate::events::{Channel, Delivery, MessageApproved};
use anyhow::Result;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The Graph API version Herald speaks.
pub const GRAPH_VERSION: &str = "v21.0";

/// One message on its way out: the approval with the recipient's clear address, and its
/// composed text where the channel carries text (SMS, e-mail, a WhatsApp session message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub customer_id: String,
    pub approved: MessageApproved,
    pub text: Option<String>,
}

/// What each channel's provider adapter does: carry one message and say how the call ended.
/// Object-safe, so dispatch holds one per channel behind the same pointer type.
pub trait Provider: Send + Sync {
    /// The channel it carries.
    fn channel(&self) -> Channel;
    /// Sends one message; never retries by itself (dispatch decides that from the outcome).
    fn send<'a>(&'a self, message: &'a Outgoing) -> futures::future::BoxFuture<'a, SendOutcome>;
}

/// The providers dispatch sends through, at most one per channel.
#[derive(Clone, Default)]
pub struct Providers {
    by_channel: std::collections::BTreeMap<Channel, Arc<dyn Provider>>,
    /// Why a channel has none, naming the setting that would give it one.
    unconfigured: std::collections::BTreeMap<Channel, String>,
}

impl Providers {
    /// Adds (or replaces) the provider of its channel.
    pub fn with(mut self, provider: Arc<dyn Provider>) -> Self {
        self.by_channel.insert(provider.channel(), provider);
        self
    }

    /// Notes why `channel` has no provider (the settings it lacks), for the dead letters of
    /// the messages approved for it.
    pub fn without(mut self, channel: Channel, why: &str) -> Self {
        self.unconfigured.insert(channel, why.to_string());
        self
    }

    /// Why a message on `channel` cannot be sent: no provider, and what would give it one.
    pub fn missing(&self, channel: Channel) -> String {
        match self.unconfigured.get(&channel) {
            Some(why) => format!("no {channel:?} provider is configured: {why}"),
            None => format!("no {channel:?} provider is configured"),
        }
    }

    /// The provider of a channel, if one is configured.
    pub fn of(&self, channel: Channel) -> Option<&Arc<dyn Provider>> {
        self.by_channel.get(&channel)
    }
}

/// Reads an HTTP call's failure to get an answer: a connection never made is safe to try
/// again; anything later (a timeout, a connection lost mid-answer) may have sent the message.
pub fn unanswered_or_undelivered(e: reqwest::Error) -> SendOutcome {
    if e.is_connect() {
        SendOutcome::NotDelivered(e.to_string())
    } else {
        SendOutcome::Unanswered(e.to_string())
    }
}

/// An HTTP client with Herald's timeouts for a provider: `timeout` for the whole answer, at
/// most 3 s to connect.
pub fn http_client(timeout: Duration) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(3)))
        .pool_max_idle_per_host(8)
        .build()?)
}

/// A client for the WhatsApp Cloud API `/{phone-number-id}/messages` endpoint.
#[derive(Clone)]
pub struct CloudApiClient {
    http: reqwest::Client,
    base_url: String,
    phone_number_id: String,
    token: String,
}

/// What Herald puts in a send's `biz_opaque_callback_data`, which the provider echoes in
/// every status webhook: the customer (so the gateway can key the status like every other
/// record) and the message id (so dispatch can settle an intent from it).
pub fn callback_data(customer_id: &str, message_id: &str) -> String {
    format!("hc1|{customer_id}|{message_id}")
}

/// The customer and message id in a status webhook's callback data, if Herald wrote it.
pub fn parse_callback_data(data: &str) -> Option<(&str, &str)> {
    let rest = data.strip_prefix("hc1|")?;
    // Message ids are hex; a customer id may itself hold a '|'.
    let (customer, message) = rest.rsplit_once('|')?;
    (!customer.is_empty() && !message.is_empty()).then_some((customer, message))
}

/// The Cloud API request body for an approved template message, with named parameters and the
/// customer and message id as `biz_opaque_callback_data` so status callbacks can be matched.
pub fn template_request(customer_id: &str, m: &MessageApproved) -> Value {
    let parameters: Vec<Value> = m
        .variables
        .iter()
        .map(|(name, text)| json!({"type": "text", "parameter_name": name, "text": text}))
        .collect();
    json!({
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": m.recipient,
        "type": "template",
        "template": {
            "name": m.template_name,
            "language": {"code": m.locale},
            "components": [{"type": "body", "parameters": parameters}],
        },
        "biz_opaque_callback_data": callback_data(customer_id, &m.message_id),
    })
}

/// The Cloud API request body for a session (free-form text) message, which the provider
/// takes only inside the customer service window.
pub fn session_request(customer_id: &str, m: &MessageApproved, text: &str) -> Value {
    json!({
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": m.recipient,
        "type": "text",
        "text": {"preview_url": false, "body": text},
        "biz_opaque_callback_data": callback_data(customer_id, &m.message_id),
    })
}

impl CloudApiClient {
    /// A client for `base_url` (the Graph API root or the simulator), waiting 10 s for an answer.
    pub fn new(base_url: &str, phone_number_id: &str, token: &str) -> Result<Self> {
        Self::with_timeout(base_url, phone_number_id, token, Duration::from_secs(10))
    }

    /// A client that gives up on an answer after `timeout`.
    pub fn with_timeout(
        base_url: &str,
        phone_number_id: &str,
        token: &str,
        timeout: Duration,
    ) -> Result<Self> {
        Ok(CloudApiClient {
            http: http_client(timeout)?,
            base_url: base_url.trim_end_matches('/').to_string(),
            phone_number_id: phone_number_id.to_string(),
            token: token.to_string(),
        })
    }

    /// Sends one approved template message to one of `customer_id`'s addresses.
    pub async fn send(&self, customer_id: &str, m: &MessageApproved) -> SendOutcome {
        self.post(&template_request(customer_id, m)).await
    }

    /// Sends one message as its approval says it travels: a template, or a session message
    /// with its composed text.
    pub async fn send_outgoing(&self, o: &Outgoing) -> SendOutcome {
        match (o.approved.delivery, &o.text) {
            (Delivery::Session, Some(text)) => {
                self.post(&session_request(&o.customer_id, &o.approved, text))
                    .await
            }
            (Delivery::Session, None) => SendOutcome::Rejected {
                code: 131008,
                retryable: false,
                detail: "a session message without its text".into(),
            },
            (Delivery::Template, _) => self.send(&o.customer_id, &o.approved).await,
        }
    }

    async fn post(&self, body: &Value) -> SendOutcome {
        let url = format!(
            "{}/{GRAPH_VERSION}/{}/messages",
            self.base_url, self.phone_number_id
        );
        let resp = match self
            .http
            .post(url)
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => return unanswered_or_undelivered(e),
        };
        let status = resp.status();
        let body: Value = match resp.json().await {
            Ok(b) => b,
            // A success whose body was lost is still an unknown outcome.
            Err(e) if status.is_success() => return SendOutcome::Unanswered(e.to_string()),
            Err(_) => Value::Null,
        };
        if status.is_success() {
            if let Some(id) = body["messages"][0]["id"].as_str() {
                return SendOutcome::Accepted(id.to_string());
            }
            return SendOutcome::Unanswered(format!("HTTP {status} without a message id"));
        }
        let Some(code) = body["error"]["code"].as_i64().map(|c| c as i32) else {
            // A server error without a Cloud API error is a gateway or proxy answering for the
            // provider (502, 504...): whether the send went through is unknown.
            if status.is_server_error() {
                return SendOutcome::Unanswered(format!(
                    "HTTP {status} without a Cloud API error: the message may have gone out"
                ));
            }
            let code = status.as_u16() as i32;
            return SendOutcome::Rejected {
                code,
                // A bare 429 is a throttle in front of the provider: worth trying again.
                retryable: crate::provider_codes::is_retryable(Channel::Whatsapp, code),
                detail: format!("HTTP {status} without a Cloud API error"),
            };
        };
        let detail = body["error"]["message"]
            .as_str()
            .unwrap_or("no error message")
            .to_string();
        SendOutcome::Rejected {
            code,
            retryable: crate::provider_codes::is_retryable(Channel::Whatsapp, code)
                || status.is_server_error(),
            detail,
        }
    }
}

impl Provider for CloudApiClient {
    fn channel(&self) -> Channel {
        Channel::Whatsapp
    }
    fn send<'a>(&'a self, message: &'a Outgoing) -> futures::future::BoxFuture<'a, SendOutcome> {
        Box::pin(self.send_outgoing(message))
    }
}

/// One send the simulator accepted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SimulatedSend {
    pub channel: Channel,
    pub to: String,
    /// The template's name (empty for a message sent as text).
    pub template: String,
    pub language: String,
    pub callback_data: String,
    /// Herald's message id, from the callback data (the whole of it if Herald did not write it).
    pub message_id: String,
    pub parameters: Vec<(String, String)>,
    /// The text of a message sent as text (SMS, e-mail, a WhatsApp session message).
    pub text: Option<String>,
    /// The provider's message id (the simulator assigns it when it records the send).
    pub wamid: String,
}

/// Herald's message id in a send's callback data (the whole of it if Herald did not write it).
fn message_id_of(callback_data: &str) -> String {
    parse_callback_data(callback_data)
        .map_or(callback_data, |(_, m)| m)
        .to_string()
}

impl SimulatedSend {
    /// A message sent as text on `channel`; its provider id is given when it is recorded.
    pub fn text(channel: Channel, to: &str, callback_data: &str, text: &str) -> Self {
        SimulatedSend {
            channel,
            to: to.to_string(),
            template: String::new(),
            language: String::new(),
            callback_data: callback_data.to_string(),
            message_id: message_id_of(callback_data),
            parameters: vec![],
            text: Some(text.to_string()),
            wamid: String::new(),
        }
    }
}

/// How the simulator behaves beyond answering: the limits it enforces, the failures it
/// injects, and the status webhooks it posts.
#[derive(Debug, Clone)]
pub struct SimulatorOptions {
    /// Where to post signed status webhooks (the gateway's `/webhook`); none when absent.
    pub webhook_url: Option<String>,
    /// The app secret webhooks are signed with.
    pub app_secret: Vec<u8>,
    /// Seed of the failures and delays.
    pub seed: u64,
    /// Messages per second one sender number may send (the Cloud API's default is 80).
    pub sender_per_s: f64,
    /// One message per this interval to one recipient, after a burst of `pair_burst`.
    pub pair_interval: Duration,
    pub pair_burst: f64,
    /// Share of sends accepted whose answer is held back past the client's patience.
    pub drop_answer_rate: f64,
    /// How long such an answer is held back.
    pub withhold_answer_for: Duration,
    /// Share of sends refused with a transient fault (131000), which a retry may pass.
    pub transient_failure_rate: f64,
    /// Share of accepted sends that later fail as undeliverable (a `failed` status, 131026).
    pub undeliverable_rate: f64,
    /// Share of session (text) messages refused as outside the customer service window.
    pub window_closed_rate: f64,
    /// Share of template messages refused in the answer because the template is paused
    /// (132015), as the Cloud API does after quality complaints.
    pub template_paused_rate: f64,
    /// Share of status webhooks posted twice.
    pub duplicate_webhook_rate: f64,
    /// Each status webhook is posted after a delay up to this; independent delays reorder them.
    pub max_webhook_delay: Duration,
    /// The SMS account's auth token, which signs its status callbacks.
    pub sms_auth_token: Vec<u8>,
    /// Messages per second the SMS account may send.
    pub sms_per_s: f64,
    /// Where the e-mail provider posts its event webhook (the gateway's `/webhooks/email`).
    pub email_webhook_url: Option<String>,
    /// The basic-auth user and password of the e-mail event webhook.
    pub email_webhook_auth: (String, String),
    /// Requests per second the e-mail API key may make.
    pub email_per_s: f64,
}

impl Default for SimulatorOptions {
    fn default() -> Self {
        SimulatorOptions {
            webhook_url: None,
            app_secret: Vec::new(),
            seed: 7,
            sender_per_s: 80.0,
            pair_interval: Duration::from_secs(6),
            pair_burst: 45.0,
            drop_answer_rate: 0.0,
            withhold_answer_for: Duration::from_secs(15),
            transient_failure_rate: 0.0,
            undeliverable_rate: 0.0,
            window_closed_rate: 0.0,
            template_paused_rate: 0.0,
            duplicate_webhook_rate: 0.0,
            max_webhook_delay: Duration::from_millis(500),
            sms_auth_token: Vec::new(),
            sms_per_s: 100.0,
            email_webhook_url: None,
            email_webhook_auth: (String::new(), String::new()),
            email_per_s: 600.0,
        }
    }
}

/// A token bucket: `capacity` tokens, refilled at `per_s`.
#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    at: std::time::Instant,
}

impl Bucket {
    fn take(&mut self, capacity: f64, per_s: f64, now: std::time::Instant) -> bool {
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * per_s).min(capacity);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What the simulator received and did, shared with whoever started it.
#[derive(Default)]
pub struct SimulatorLog {
    pub sends: Mutex<Vec<SimulatedSend>>,
    pub rejected: Mutex<u64>,
    /// Accepted sends whose answer was held back.
    pub answers_dropped: std::sync::atomic::AtomicU64,
    /// Status webhooks the gateway acknowledged with a 2xx.
    pub webhooks_delivered: std::sync::atomic::AtomicU64,
    /// Status webhooks given up on after every retry.
    pub webhooks_abandoned: std::sync::atomic::AtomicU64,
    /// Status webhooks scheduled and not yet delivered or abandoned (a gauge).
    pub webhooks_pending: std::sync::atomic::AtomicU64,
}

/// The simulator's shared state: its log, options, limits and randomness.
pub(crate) struct Simulator {
    log: Arc<SimulatorLog>,
    pub(crate) options: SimulatorOptions,
    rng: Mutex<crate::scenario::Rng>,
    sender: Mutex<Option<Bucket>>,
    sms_sender: Mutex<Option<Bucket>>,
    email_sender: Mutex<Option<Bucket>>,
    pairs: Mutex<std::collections::HashMap<String, Bucket>>,
    http: reqwest::Client,
}

impl Simulator {
    pub(crate) fn chance(&self, p: f64) -> bool {
        p > 0.0 && self.rng.lock().map(|mut r| r.chance(p)).unwrap_or(false)
    }
    fn below(&self, n: u64) -> u64 {
        self.rng.lock().map(|mut r| r.below(n)).unwrap_or(0)
    }

    /// Counts a refused send.
    pub(crate) fn count_rejection(&self) {
        if let Ok(mut r) = self.log.rejected.lock() {
            *r += 1;
        }
    }

    fn take(bucket: &Mutex<Option<Bucket>>, per_s: f64) -> bool {
        let now = std::time::Instant::now();
        bucket.lock().is_ok_and(|mut b| {
            b.get_or_insert(Bucket {
                tokens: per_s.max(1.0),
                at: now,
            })
            .take(per_s.max(1.0), per_s, now)
        })
    }

    /// Whether the SMS account may send one more message now.
    pub(crate) fn take_sms_sender_token(&self) -> bool {
        Self::take(&self.sms_sender, self.options.sms_per_s)
    }

    /// Whether the e-mail API key may make one more request now.
    pub(crate) fn take_email_token(&self) -> bool {
        Self::take(&self.email_sender, self.options.email_per_s)
    }

    /// Records an accepted send under a new provider id starting with `id_prefix` (`wamid.`,
    /// `SM`), and returns the id; `None` if the log is poisoned.
    pub(crate) fn record(&self, mut send: SimulatedSend, id_prefix: &str) -> Option<String> {
        let mut sends = self.log.sends.lock().ok()?;
        let id = format!("{id_prefix}HERALDSIM{:012}", sends.len() + 1);
        send.wamid = id.clone();
        sends.push(send);
        Some(id)
    }

    /// Posts one callback to `url` after a random delay, twice at the duplicate rate, and
    /// retries it until the receiver answers 2xx, as providers do.
    pub(crate) fn post_callbacks(
        self: &Arc<Self>,
        url: String,
        content_type: &'static str,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
    ) {
        let copies = if self.chance(self.options.duplicate_webhook_rate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = Duration::from_millis(
                self.below(self.options.max_webhook_delay.as_millis() as u64 + 1),
            );
            let callback = Callback {
                url: url.clone(),
                content_type,
                headers: headers.clone(),
                body: body.clone(),
            };
            self.log
                .webhooks_pending
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::spawn(post_webhook(self.clone(), callback, delay));
        }
    }

    /// Holds the answer back past the client's patience at the drop rate (the message is out,
    /// the answer saying so never arrives in time); true if it did.
    pub(crate) async fn withholds_answer(&self) -> bool {
        if !self.chance(self.options.drop_answer_rate) {
            return false;
        }
        self.log
            .answers_dropped
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(self.options.withhold_answer_for).await;
        true
    }
}

/// One callback the simulator posts.
struct Callback {
    url: String,
    content_type: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

impl SimulatorLog {
    /// The sends accepted so far.
    pub fn sent(&self) -> Vec<SimulatedSend> {
        self.sends.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// How many sends were accepted so far.
    pub fn sent_count(&self) -> usize {
        self.sends.lock().map(|s| s.len()).unwrap_or(0)
    }
}

fn graph_error(status: StatusCode, code: i32, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": "OAuthException", "code": code, "fbtrace_id": "herald-simulator"}});
    (status, Json(body)).into_response()
}

async fn messages(
    State(sim): State<Arc<Simulator>>,
    Path((_version, phone_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Option<Json<Value>>,
) -> Response {
    let reject = |status, code, msg: &str| {
        sim.count_rejection();
        graph_error(status, code, msg)
    };
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer ") && v.len() > 7);
    if !authorized {
        return reject(StatusCode::UNAUTHORIZED, 190, "Invalid OAuth access token.");
    }
    if phone_id.is_empty() || !phone_id.chars().all(|c| c.is_ascii_digit()) {
        return reject(StatusCode::BAD_REQUEST, 100, "Invalid phone number id");
    }
    let Some(Json(b)) = body else {
        return reject(StatusCode::BAD_REQUEST, 100, "Request body is not JSON");
    };
    if b["messaging_product"] != "whatsapp" {
        return reject(
            StatusCode::BAD_REQUEST,
            100,
            "(#100) The parameter messaging_product is required.",
        );
    }
    let to = b["to"].as_str().unwrap_or_default().to_string();
    let digits: String = to.chars().filter(|c| c.is_ascii_digit()).collect();
    if digits.len() < 8 {
        return reject(
            StatusCode::BAD_REQUEST,
            131009,
            "(#131009) Parameter value is not valid: to",
        );
    }
    let session_text = match b["type"].as_str() {
        Some("template") => None,
        Some("text") => match b["text"]["body"].as_str().filter(|t| !t.trim().is_empty()) {
            Some(t) => Some(t.to_string()),
            None => {
                return reject(
                    StatusCode::BAD_REQUEST,
                    131008,
                    "(#131008) Required parameter is missing: text.body",
                )
            }
        },
        _ => {
            return reject(
                StatusCode::BAD_REQUEST,
                100,
                "(#100) Param type must be one of {TEMPLATE, TEXT}",
            )
        }
    };
    // The simulator cannot see the customer's replies, so whether the 24-hour window is open
    // is drawn at the configured rate.
    if session_text.is_some() && sim.chance(sim.options.window_closed_rate) {
        return reject(StatusCode::BAD_REQUEST, 131047, "Re-engagement message: more than 24 hours have passed since the recipient last replied.");
    }
    let template = b["template"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let language = b["template"]["language"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if session_text.is_none() && (template.is_empty() || language.is_empty()) {
        return reject(
            StatusCode::BAD_REQUEST,
            132000,
            "(#132000) Template name and language are required",
        );
    }
    let mut parameters = Vec::new();
    for c in b["template"]["components"].as_array().into_iter().flatten() {
        for p in c["parameters"].as_array().into_iter().flatten() {
            let text = p["text"].as_str().unwrap_or_default();
            if text.trim().is_empty() {
                return reject(
                    StatusCode::BAD_REQUEST,
                    131008,
                    "(#131008) Required parameter is missing",
                );
            }
            parameters.push((
                p["parameter_name"].as_str().unwrap_or_default().to_string(),
                text.to_string(),
            ));
        }
    }
    if session_text.is_none() && sim.chance(sim.options.template_paused_rate) {
        return reject(
            StatusCode::BAD_REQUEST,
            132015,
            "(#132015) Template is paused: the template has been paused due to low quality",
        );
    }
    let callback_data = b["biz_opaque_callback_data"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let now = std::time::Instant::now();
    let o = &sim.options;
    if !Simulator::take(&sim.sender, o.sender_per_s) {
        return reject(
            StatusCode::BAD_REQUEST,
            130429,
            "(#130429) Rate limit hit: Cloud API message throughput has been reached.",
        );
    }
    let pair_ok = sim.pairs.lock().is_ok_and(|mut pairs| {
        pairs
            .entry(digits.clone())
            .or_insert(Bucket {
                tokens: o.pair_burst,
                at: now,
            })
            .take(
                o.pair_burst,
                1.0 / o.pair_interval.as_secs_f64().max(0.001),
                now,
            )
    });
    if !pair_ok {
        return reject(
            StatusCode::BAD_REQUEST,
            131056,
            "(#131056) (Business Account, Consumer Account) pair rate limit hit",
        );
    }
    if sim.chance(o.transient_failure_rate) {
        return reject(
            StatusCode::INTERNAL_SERVER_ERROR,
            131000,
            "(#131000) Something went wrong",
        );
    }
    let send = SimulatedSend {
        channel: Channel::Whatsapp,
        to: to.clone(),
        template,
        language,
        message_id: message_id_of(&callback_data),
        callback_data: callback_data.clone(),
        parameters,
        text: session_text,
        wamid: String::new(),
    };
    let Some(wamid) = sim.record(send, "wamid.") else {
        return graph_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            1,
            "simulator state poisoned",
        );
    };
    if let Some(url) = &o.webhook_url {
        let undeliverable = sim.chance(o.undeliverable_rate);
        let statuses: &[(&str, Option<i32>)] = if undeliverable {
            &[("sent", None), ("failed", Some(131026))]
        } else {
            &[("sent", None), ("delivered", None), ("read", None)]
        };
        for (status, code) in statuses {
            let body = status_webhook(&wamid, status, *code, &digits, &callback_data);
            let signature = crate::gateway::sign(&o.app_secret, &body);
            sim.post_callbacks(
                url.clone(),
                "application/json",
                vec![(crate::gateway::SIGNATURE_HEADER, signature)],
                body,
            );
        }
    }
    if sim.withholds_answer().await {
        return (StatusCode::GATEWAY_TIMEOUT, "answer withheld").into_response();
    }
    Json(json!({
        "messaging_product": "whatsapp",
        "contacts": [{"input": to, "wa_id": digits}],
        "messages": [{"id": wamid}],
    }))
    .into_response()
}

/// A Cloud API status webhook body for one message.
pub fn status_webhook(
    wamid: &str,
    status: &str,
    error_code: Option<i32>,
    recipient: &str,
    callback_data: &str,
) -> Vec<u8> {
    let mut st = json!({
        "id": wamid,
        "status": status,
        "timestamp": (crate::stages::wall_clock_ms() / 1000).to_string(),
        "recipient_id": recipient,
        "biz_opaque_callback_data": callback_data,
    });
    if let Some(code) = error_code {
        st["errors"] = json!([{"code": code, "title": "Message undeliverable", "message": "Message undeliverable", "error_data": {"details": "Message failed to send because of an unknown error."}}]);
    }
    let body = json!({
        "object": "whatsapp_business_account",
        "entry": [{"id": "102290129340398", "changes": [{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550783881", "phone_number_id": "1055501234567890"},
            "statuses": [st],
        }}]}],
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

/// Posts one signed webhook after `delay`, retrying with backoff until the gateway answers
/// 2xx, as the provider does (for a while).
async fn post_webhook(sim: Arc<Simulator>, callback: Callback, delay: Duration) {
    deliver_webhook(&sim, callback, delay).await;
    sim.log
        .webhooks_pending
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
}

async fn deliver_webhook(sim: &Simulator, callback: Callback, delay: Duration) {
    tokio::time::sleep(delay).await;
    let mut backoff = Duration::from_millis(200);
    for _ in 0..10 {
        let mut request = sim
            .http
            .post(&callback.url)
            .header("content-type", callback.content_type)
            .body(callback.body.clone());
        for (name, value) in &callback.headers {
            request = request.header(*name, value);
        }
        let sent = request.send().await;
        if sent.is_ok_and(|r| r.status().is_success()) {
            sim.log
                .webhooks_delivered
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    sim.log
        .webhooks_abandoned
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

async fn stats(State(sim): State<Arc<Simulator>>) -> Response {
    let log = &sim.log;
    let sends = log.sent_count();
    let rejected = log.rejected.lock().map(|r| *r).unwrap_or(0);
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    Json(json!({
        "accepted": sends,
        "rejected": rejected,
        "answers_dropped": load(&log.answers_dropped),
        "webhooks_delivered": load(&log.webhooks_delivered),
        "webhooks_abandoned": load(&log.webhooks_abandoned),
    }))
    .into_response()
}

/// Serves the simulator on `addr` with `options`.
pub async fn serve_simulator_with(
    addr: SocketAddr,
    options: SimulatorOptions,
) -> Result<(SocketAddr, Arc<SimulatorLog>)> {
    let log = Arc::new(SimulatorLog::default());
    let sim = Arc::new(Simulator {
        log: log.clone(),
        rng: Mutex::new(crate::scenario::Rng::new(options.seed)),
        options,
        sender: Mutex::new(None),
        sms_sender: Mutex::new(None),
        email_sender: Mutex::new(None),
        pairs: Mutex::new(std::collections::HashMap::new()),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?,
    });
    let router = Router::new()
        .route("/{version}/{phone_id}/messages", post(messages))
        .route(
            "/2010-04-01/Accounts/{account}/Messages.json",
            post(crate::sms::simulate_send),
        )
        .route("/v3/mail/send", post(crate::email::simulate_send))
        .route("/simulator/stats", get(stats))
        .with_state(sim);
    let bound = crate::telemetry::serve_router(addr, router, "provider simulator").await?;
    Ok((bound, log))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A provider stand-in that answers every send with this status and body.
    async fn answering(status: StatusCode, body: &'static str) -> CloudApiClient {
        let app = Router::new().fallback(move || async move { (status, body) });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        CloudApiClient::new(&format!("http://{addr}"), "1", "t").expect("client")
    }

    fn approval() -> MessageApproved {
        MessageApproved {
            message_id: "m-1".into(),
            trigger_event_id: "e-1".into(),
            template_name: "order_confirmation".into(),
            template_version: 1,
            locale: "en_US".into(),
            purpose: crate::events::Purpose::Transactional,
            channel: crate::events::Channel::Whatsapp,
            recipient: "+15550100001".into(),
            variables: Default::default(),
            consent_artifact_id: "form-1".into(),
            consent_granted_at: 0,
            category: "UTILITY".into(),
            delivery: Default::default(),
            journey: None,
            relied_on: Default::default(),
        }
    }

    #[tokio::test]
    async fn a_proxy_error_is_an_unknown_outcome_and_a_coded_error_is_a_refusal() {
        let proxy = answering(StatusCode::BAD_GATEWAY, "<html>502 Bad Gateway</html>").await;
        assert!(matches!(
            proxy.send("c-1", &approval()).await,
            SendOutcome::Unanswered(_)
        ));
        let fault = answering(
            StatusCode::INTERNAL_SERVER_ERROR,
            r#"{"error":{"code":131000,"message":"Something went wrong"}}"#,
        )
        .await;
        assert!(matches!(
            fault.send("c-1", &approval()).await,
            SendOutcome::Rejected {
                code: 131000,
                retryable: true,
                ..
            }
        ));
        let refused = answering(StatusCode::FORBIDDEN, "").await;
        assert!(matches!(
            refused.send("c-1", &approval()).await,
            SendOutcome::Rejected {
                code: 403,
                retryable: false,
                ..
            }
        ));
    }
}
