//! The WhatsApp Cloud API adapter: the client for template and session messages, the webhook
//! signature (`X-Hub-Signature-256`) and body shapes (statuses, inbound messages, template
//! status changes) it posts, and the simulator's side of the same API.

use super::adapter::{http_client, unanswered_or_undelivered, Outgoing, Provider};
use super::callback::{traced_callback_data, BodyError, Callback};
use super::simulated::{message_id_of, Simulator};
use super::simulated::{Bucket, SimulatedSend};
use crate::dispatch::SendOutcome;
use crate::events::{Channel, Delivery, MessageApproved};
use crate::events::{MessageStatus, Millis, TemplateStatus};
use anyhow::Result;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use std::sync::Arc;
use std::time::Duration;

/// The Graph API version Herald speaks.
pub const GRAPH_VERSION: &str = "v21.0";

/// A client for the WhatsApp Cloud API `/{phone-number-id}/messages` endpoint.
#[derive(Clone)]
pub struct CloudApiClient {
    http: reqwest::Client,
    base_url: String,
    phone_number_id: String,
    token: String,
}

/// The Cloud API request body for an approved template message, with named parameters and the
/// customer and message id as `biz_opaque_callback_data` so status callbacks can be matched.
pub fn template_request(customer_id: &str, m: &MessageApproved, trace: Option<&str>) -> Value {
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
        "biz_opaque_callback_data": traced_callback_data(customer_id, &m.message_id, trace),
    })
}

/// The Cloud API request body for a session (free-form text) message, which the provider
/// takes only inside the customer service window.
pub fn session_request(
    customer_id: &str,
    m: &MessageApproved,
    text: &str,
    trace: Option<&str>,
) -> Value {
    json!({
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": m.recipient,
        "type": "text",
        "text": {"preview_url": false, "body": text},
        "biz_opaque_callback_data": traced_callback_data(customer_id, &m.message_id, trace),
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
        self.post(&template_request(customer_id, m, None), None)
            .await
    }

    /// Sends one message as its approval says it travels: a template, or a session message
    /// with its composed text.
    pub async fn send_outgoing(&self, o: &Outgoing) -> SendOutcome {
        match (o.approved.delivery, &o.text) {
            (Delivery::Session, Some(text)) => {
                let trace = o.traceparent.as_deref();
                self.post(
                    &session_request(&o.customer_id, &o.approved, text, trace),
                    trace,
                )
                .await
            }
            (Delivery::Session, None) => SendOutcome::Rejected {
                code: 131008,
                retryable: false,
                detail: "a session message without its text".into(),
            },
            (Delivery::Template, _) => {
                let trace = o.traceparent.as_deref();
                self.post(&template_request(&o.customer_id, &o.approved, trace), trace)
                    .await
            }
        }
    }

    async fn post(&self, body: &Value, trace: Option<&str>) -> SendOutcome {
        let url = format!(
            "{}/{GRAPH_VERSION}/{}/messages",
            self.base_url, self.phone_number_id
        );
        let mut request = self.http.post(url).bearer_auth(&self.token).json(body);
        if let Some(t) = trace {
            request = request.header(crate::trace::TRACEPARENT, t);
        }
        let resp = match request.send().await {
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

fn graph_error(status: StatusCode, code: i32, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": "OAuthException", "code": code, "fbtrace_id": "herald-simulator"}});
    (status, Json(body)).into_response()
}

pub(crate) async fn messages(
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
            let signature = sign(&o.app_secret, &body);
            sim.post_callbacks(
                url.clone(),
                "application/json",
                vec![(SIGNATURE_HEADER, signature)],
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
        "timestamp": (crate::clock::wall_clock_ms() / 1000).to_string(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;

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
