//! The e-mail provider adapter, shaped like SendGrid's v3 Mail Send API: a JSON POST to
//! `/v3/mail/send` with a bearer API key, answered 202 with no body and the message id in
//! `X-Message-Id`. Herald's callback data travels as a custom argument, which the provider
//! echoes in every event of its Event Webhook (a JSON list of events, posted under HTTP basic
//! auth). The simulator's side of the same API lives here too.

use crate::dispatch::SendOutcome;
use crate::events::{Channel, MessageStatus, Millis};
use crate::provider::adapter::{Outgoing, Provider};
use crate::provider::callback::{BodyError, Callback};
use crate::provider::simulated::{SimulatedSend, Simulator};
use anyhow::Result;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// The custom argument that carries Herald's callback data.
pub const CALLBACK_ARG: &str = "herald_callback";

/// The header the provider answers a send's message id in.
pub const MESSAGE_ID_HEADER: &str = "x-message-id";

/// A client for the e-mail provider's Mail Send endpoint.
#[derive(Clone)]
pub struct EmailClient {
    http: reqwest::Client,
    base_url: String,
    api_key: String,
    from: String,
}

/// The Mail Send request body of one message: plain text, its subject the text's first
/// sentence, the template's name as the category the provider reports by.
pub fn mail_request(o: &Outgoing, from: &str, text: &str) -> Value {
    json!({
        "personalizations": [{
            "to": [{"email": o.approved.recipient}],
            "custom_args": {
                CALLBACK_ARG: crate::provider::callback::traced_callback_data(
                    &o.customer_id, &o.approved.message_id, o.traceparent.as_deref()),
            },
        }],
        "from": {"email": from},
        "subject": crate::dispatch::subject_of(text),
        "content": [{"type": "text/plain", "value": text}],
        "categories": [o.approved.template_name],
    })
}

impl EmailClient {
    /// A client for `base_url` (`https://api.sendgrid.com` or the simulator) sending from
    /// the address `from`.
    pub fn new(base_url: &str, api_key: &str, from: &str, timeout: Duration) -> Result<Self> {
        Ok(EmailClient {
            http: crate::provider::adapter::http_client(timeout)?,
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key: api_key.to_string(),
            from: from.to_string(),
        })
    }

    async fn send_outgoing(&self, o: &Outgoing) -> SendOutcome {
        let Some(text) = o.text.as_deref() else {
            return SendOutcome::Rejected {
                code: 400,
                retryable: false,
                detail: "an e-mail without its text".into(),
            };
        };
        let mut request = self
            .http
            .post(format!("{}/v3/mail/send", self.base_url))
            .bearer_auth(&self.api_key)
            .json(&mail_request(o, &self.from, text));
        if let Some(t) = &o.traceparent {
            request = request.header(crate::trace::TRACEPARENT, t);
        }
        let resp = match request.send().await {
            Ok(r) => r,
            Err(e) => return crate::provider::adapter::unanswered_or_undelivered(e),
        };
        let status = resp.status();
        if status.is_success() {
            return match resp
                .headers()
                .get(MESSAGE_ID_HEADER)
                .and_then(|v| v.to_str().ok())
            {
                Some(id) => SendOutcome::Accepted(id.to_string()),
                None => SendOutcome::Unanswered(format!("HTTP {status} without X-Message-Id")),
            };
        }
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        let detail = body["errors"]
            .as_array()
            .map(|errors| {
                errors
                    .iter()
                    .map(|e| match e["field"].as_str() {
                        Some(f) => format!("{f}: {}", e["message"].as_str().unwrap_or("?")),
                        None => e["message"].as_str().unwrap_or("?").to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .unwrap_or_else(|| format!("HTTP {status} without an error list"));
        if status.is_server_error() && body["errors"].is_null() {
            // A proxy or gateway answering for the provider: the mail may be out.
            return SendOutcome::Unanswered(detail);
        }
        let code = status.as_u16() as i32;
        SendOutcome::Rejected {
            code,
            retryable: crate::provider_codes::is_retryable(Channel::Email, code),
            detail,
        }
    }
}

impl Provider for EmailClient {
    fn channel(&self) -> Channel {
        Channel::Email
    }
    fn send<'a>(&'a self, message: &'a Outgoing) -> futures::future::BoxFuture<'a, SendOutcome> {
        Box::pin(self.send_outgoing(message))
    }
}

/// Whether an event webhook's `Authorization` header holds these basic-auth credentials,
/// compared in constant time.
pub fn authorized(header: Option<&[u8]>, user: &str, password: &str) -> bool {
    let expected = basic_auth(user, password);
    header.is_some_and(|h| crate::provider::callback::constant_time_eq(h, expected.as_bytes()))
}

/// The `Authorization` header value of HTTP basic auth with these credentials.
pub fn basic_auth(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// Reads an Event Webhook body (a JSON list of events) into callbacks. Events that say nothing
/// about delivery (deferred, click, group changes) give none; `processed` is sent, `open` is
/// read, and a bounce or drop is a failure with [`crate::provider_codes::EMAIL_BOUNCED`]. An event
/// without Herald's custom argument is still read; routing decides what becomes of it.
pub fn normalise(body: &[u8], received_at: Millis) -> Result<Vec<Callback>, BodyError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| BodyError(format!("body is not JSON: {e}")))?;
    let events = v
        .as_array()
        .ok_or_else(|| BodyError("an event webhook body is a JSON list of events".into()))?;
    let mut out = Vec::new();
    for e in events {
        let id = e["sg_message_id"]
            .as_str()
            .ok_or_else(|| BodyError("an e-mail event without sg_message_id".into()))?;
        // The event's id is the send's X-Message-Id with the relay's suffix.
        let id = id.split('.').next().unwrap_or(id);
        let event = e["event"]
            .as_str()
            .ok_or_else(|| BodyError(format!("e-mail event of {id} without 'event'")))?;
        let (status, error_code) = match event {
            "processed" => (MessageStatus::Sent, None),
            "delivered" => (MessageStatus::Delivered, None),
            "open" => (MessageStatus::Read, None),
            "bounce" | "dropped" => (
                MessageStatus::Failed,
                Some(crate::provider_codes::EMAIL_BOUNCED),
            ),
            "deferred" | "click" | "spamreport" | "unsubscribe" | "group_unsubscribe"
            | "group_resubscribe" => continue,
            other => {
                return Err(BodyError(format!(
                    "e-mail event '{other}' of {id} is not one the provider defines"
                )))
            }
        };
        out.push(Callback::Status {
            channel: Channel::Email,
            provider_message_id: id.to_string(),
            status,
            error_code,
            callback_data: e[CALLBACK_ARG].as_str().map(str::to_string),
            at: e["timestamp"].as_i64().map_or(received_at, |s| s * 1_000),
        });
    }
    Ok(out)
}

fn sendgrid_error(status: StatusCode, field: Option<&str>, message: &str) -> Response {
    let body = json!({"errors": [{"message": message, "field": field, "help": null}]});
    (status, Json(body)).into_response()
}

/// The simulator's `POST /v3/mail/send`.
pub(crate) async fn simulate_send(
    State(sim): State<Arc<Simulator>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let reject = |status, field, msg: &str| {
        sim.count_rejection();
        sendgrid_error(status, field, msg)
    };
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer ") && v.len() > 7);
    if !authorized {
        return reject(
            StatusCode::UNAUTHORIZED,
            None,
            "The provided authorization grant is invalid, expired, or revoked",
        );
    }
    if body.len() > 30 * 1024 * 1024 {
        return reject(StatusCode::PAYLOAD_TOO_LARGE, None, "Payload Too Large");
    }
    let Ok(b) = serde_json::from_slice::<Value>(&body) else {
        return reject(
            StatusCode::BAD_REQUEST,
            None,
            "Bad Request: the body is not JSON",
        );
    };
    let personalization = &b["personalizations"][0];
    let to = personalization["to"][0]["email"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (local, domain) = to.split_once('@').unwrap_or_default();
    if local.is_empty() || !domain.contains('.') {
        return reject(StatusCode::BAD_REQUEST, Some("personalizations.0.to"), "The to array is required for all personalization objects, and must have at least one email object with a valid email address.");
    }
    if b["from"]["email"].as_str().is_none_or(|f| !f.contains('@')) {
        return reject(
            StatusCode::BAD_REQUEST,
            Some("from.email"),
            "The from email does not contain a valid address.",
        );
    }
    if b["subject"].as_str().is_none_or(|s| s.trim().is_empty()) {
        return reject(
            StatusCode::BAD_REQUEST,
            Some("subject"),
            "The subject is required.",
        );
    }
    let Some(text) = b["content"][0]["value"]
        .as_str()
        .filter(|t| !t.trim().is_empty())
    else {
        return reject(
            StatusCode::BAD_REQUEST,
            Some("content.0.value"),
            "The content value must be a string at least one character in length.",
        );
    };
    if !sim.take_email_token() {
        return reject(StatusCode::TOO_MANY_REQUESTS, None, "too many requests");
    }
    if sim.chance(sim.options.transient_failure_rate) {
        return reject(
            StatusCode::INTERNAL_SERVER_ERROR,
            None,
            "internal server error",
        );
    }
    let callback_data = personalization["custom_args"][CALLBACK_ARG]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let send = SimulatedSend::text(Channel::Email, &to, &callback_data, text);
    let Some(id) = sim.record(send, "") else {
        return sendgrid_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            None,
            "simulator state poisoned",
        );
    };
    if let Some(url) = &sim.options.email_webhook_url {
        let events: &[&str] = if sim.chance(sim.options.undeliverable_rate) {
            &["processed", "bounce"]
        } else {
            &["processed", "delivered"]
        };
        let now = crate::clock::wall_clock_ms() / 1_000;
        for (n, event) in events.iter().enumerate() {
            let mut e = json!({
                "email": to,
                "timestamp": now,
                "event": event,
                "sg_event_id": format!("{id}-{n}"),
                "sg_message_id": format!("{id}.filterdrecv-herald-sim.{n}"),
                CALLBACK_ARG: callback_data,
            });
            if *event == "bounce" {
                e["type"] = json!("bounce");
                e["status"] = json!("5.1.1");
                e["reason"] =
                    json!("550 5.1.1 The email account that you tried to reach does not exist.");
            }
            let body = serde_json::to_vec(&json!([e])).unwrap_or_default();
            let (user, password) = &sim.options.email_webhook_auth;
            let auth = basic_auth(user, password);
            sim.post_callbacks(
                url.clone(),
                "application/json",
                vec![("authorization", auth)],
                body,
            );
        }
    }
    if sim.withholds_answer().await {
        return (StatusCode::GATEWAY_TIMEOUT, "answer withheld").into_response();
    }
    let mut response = StatusCode::ACCEPTED.into_response();
    if let Ok(v) = axum::http::HeaderValue::from_str(&id) {
        response.headers_mut().insert(MESSAGE_ID_HEADER, v);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_become_statuses_and_a_bounce_is_a_failure_policy_falls_back_from() {
        let body = br#"[
            {"email":"a@example.com","timestamp":1750000000,"event":"processed","sg_message_id":"XM1.filterdrecv-1.0","herald_callback":"hc1|c-1|m-1"},
            {"email":"a@example.com","timestamp":1750000001,"event":"deferred","sg_message_id":"XM1.filterdrecv-1.0"},
            {"email":"a@example.com","timestamp":1750000002,"event":"bounce","type":"bounce","sg_message_id":"XM1.filterdrecv-1.1","herald_callback":"hc1|c-1|m-1"}
        ]"#;
        let cs = normalise(body, 0).expect("read");
        assert_eq!(cs.len(), 2, "deferred says nothing Herald records");
        assert_eq!(
            cs[1],
            Callback::Status {
                channel: Channel::Email,
                provider_message_id: "XM1".into(),
                status: MessageStatus::Failed,
                error_code: Some(crate::provider_codes::EMAIL_BOUNCED),
                callback_data: Some("hc1|c-1|m-1".into()),
                at: 1_750_000_002_000,
            }
        );
        assert!(normalise(b"{}", 0).is_err(), "not a list");
        assert!(normalise(br#"[{"event":"delivered"}]"#, 0).is_err());
        assert!(normalise(br#"[{"event":"teleported","sg_message_id":"x"}]"#, 0).is_err());
    }

    #[test]
    fn basic_auth_must_match_exactly() {
        let good = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("herald:s3cret")
        );
        assert!(authorized(Some(good.as_bytes()), "herald", "s3cret"));
        assert!(!authorized(Some(good.as_bytes()), "herald", "other"));
        assert!(!authorized(None, "herald", "s3cret"));
        assert!(!authorized(Some(b"Basic aGVyYWxkOg=="), "herald", "s3cret"));
    }
}
