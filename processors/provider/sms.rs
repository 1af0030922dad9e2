//! The SMS provider adapter, shaped like Twilio's Programmable Messaging API: a form POST to
//! `/2010-04-01/Accounts/{AccountSid}/Messages.json` under HTTP basic auth (account SID and
//! auth token), answered 201 with the message SID; status callbacks are form POSTs to the
//! `StatusCallback` URL, signed in `X-Twilio-Signature` (base64 HMAC-SHA1, under the auth
//! token, of the callback URL followed by every form field's name and value, sorted by name).
//! The simulator's side of the same API lives here too.

use crate::dispatch::SendOutcome;
use crate::events::{Channel, MessageStatus, Millis};
use crate::provider::adapter::{Outgoing, Provider};
use crate::provider::callback::{BodyError, Callback};
use crate::provider::simulated::{SimulatedSend, Simulator};
use anyhow::Result;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// The header a status callback's signature travels in.
pub const SIGNATURE_HEADER: &str = "x-twilio-signature";

/// The query parameter of the status callback URL that carries Herald's callback data (the
/// customer and message id), since the SMS provider echoes the URL, not a field of ours.
pub const CALLBACK_PARAM: &str = "herald";

/// A client for the SMS provider's Messages resource.
#[derive(Clone)]
pub struct SmsClient {
    http: reqwest::Client,
    base_url: String,
    account_sid: String,
    auth_token: String,
    from: String,
    status_callback: Option<String>,
}

impl SmsClient {
    /// A client for `base_url` (`https://api.twilio.com` or the simulator) sending from
    /// `from` (an E.164 number or a messaging service SID `MG...`); statuses are asked for at
    /// `status_callback` (the gateway's public `/webhooks/sms`) when given.
    pub fn new(
        base_url: &str,
        account_sid: &str,
        auth_token: &str,
        from: &str,
        status_callback: Option<&str>,
        timeout: Duration,
    ) -> Result<Self> {
        Ok(SmsClient {
            http: crate::provider::adapter::http_client(timeout)?,
            base_url: base_url.trim_end_matches('/').to_string(),
            account_sid: account_sid.to_string(),
            auth_token: auth_token.to_string(),
            from: from.to_string(),
            status_callback: status_callback.map(str::to_string),
        })
    }

    /// The form fields of one message.
    pub fn form(&self, o: &Outgoing, text: &str) -> Vec<(String, String)> {
        let sender = if self.from.starts_with("MG") {
            "MessagingServiceSid"
        } else {
            "From"
        };
        let mut form = vec![
            ("To".to_string(), o.approved.recipient.clone()),
            (sender.to_string(), self.from.clone()),
            ("Body".to_string(), text.to_string()),
        ];
        if let Some(url) = &self.status_callback {
            let data = crate::provider::callback::traced_callback_data(
                &o.customer_id,
                &o.approved.message_id,
                o.traceparent.as_deref(),
            );
            form.push((
                "StatusCallback".to_string(),
                status_callback_url(url, &data),
            ));
        }
        form
    }

    async fn send_outgoing(&self, o: &Outgoing) -> SendOutcome {
        let Some(text) = o.text.as_deref() else {
            return SendOutcome::Rejected {
                code: 21602,
                retryable: false,
                detail: "an SMS without its text".into(),
            };
        };
        let url = format!(
            "{}/2010-04-01/Accounts/{}/Messages.json",
            self.base_url, self.account_sid
        );
        let mut request = self
            .http
            .post(url)
            .basic_auth(&self.account_sid, Some(&self.auth_token))
            .form(&self.form(o, text));
        if let Some(t) = &o.traceparent {
            request = request.header(crate::trace::TRACEPARENT, t);
        }
        let resp = match request.send().await {
            Ok(r) => r,
            Err(e) => return crate::provider::adapter::unanswered_or_undelivered(e),
        };
        let status = resp.status();
        let body: Value = match resp.json().await {
            Ok(b) => b,
            Err(e) if status.is_success() => return SendOutcome::Unanswered(e.to_string()),
            Err(_) => Value::Null,
        };
        if status.is_success() {
            return match body["sid"].as_str() {
                Some(sid) => SendOutcome::Accepted(sid.to_string()),
                None => SendOutcome::Unanswered(format!("HTTP {status} without a message SID")),
            };
        }
        match body["code"].as_i64() {
            Some(code) => SendOutcome::Rejected {
                code: code as i32,
                retryable: crate::provider_codes::is_retryable(Channel::Sms, code as i32),
                detail: body["message"]
                    .as_str()
                    .unwrap_or("no error message")
                    .to_string(),
            },
            // A proxy or gateway answering for the provider: the message may be out.
            None if status.is_server_error() => SendOutcome::Unanswered(format!(
                "HTTP {status} without an SMS provider error: the message may have gone out"
            )),
            None => SendOutcome::Rejected {
                code: status.as_u16() as i32,
                retryable: crate::provider_codes::is_retryable(
                    Channel::Sms,
                    status.as_u16() as i32,
                ),
                detail: format!("HTTP {status} without an SMS provider error"),
            },
        }
    }
}

impl Provider for SmsClient {
    fn channel(&self) -> Channel {
        Channel::Sms
    }
    fn send<'a>(&'a self, message: &'a Outgoing) -> futures::future::BoxFuture<'a, SendOutcome> {
        Box::pin(self.send_outgoing(message))
    }
}

/// The status callback URL of one message: the gateway's URL with Herald's callback data.
pub fn status_callback_url(base: &str, callback_data: &str) -> String {
    let sep = if base.contains('?') { '&' } else { '?' };
    let encoded: String = form_urlencoded::byte_serialize(callback_data.as_bytes()).collect();
    format!("{base}{sep}{CALLBACK_PARAM}={encoded}")
}

/// The HMAC-SHA1 state of a callback to `url` with these form fields, under `auth_token`:
/// the URL followed by each field's name and value, sorted by name.
fn callback_mac(
    auth_token: &[u8],
    url: &str,
    fields: &[(String, String)],
) -> Option<Hmac<sha1::Sha1>> {
    // HMAC takes a key of any length, so this never fails.
    let mut mac = <Hmac<sha1::Sha1> as Mac>::new_from_slice(auth_token).ok()?;
    mac.update(url.as_bytes());
    let mut sorted: Vec<&(String, String)> = fields.iter().collect();
    sorted.sort();
    for (name, value) in sorted {
        mac.update(name.as_bytes());
        mac.update(value.as_bytes());
    }
    Some(mac)
}

/// The `X-Twilio-Signature` of a callback to `url` with these form fields, under `auth_token`.
pub fn sign(auth_token: &[u8], url: &str, fields: &[(String, String)]) -> String {
    callback_mac(auth_token, url, fields).map_or_else(String::new, |mac| {
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    })
}

/// Why an SMS status callback's signature was refused; the text is the 401's body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing X-Twilio-Signature header")]
    Missing,
    #[error("malformed X-Twilio-Signature: it must be the base64 of 20 bytes")]
    Malformed,
    #[error("X-Twilio-Signature does not match the URL and fields")]
    Mismatch,
}

/// Checks a status callback's signature in constant time, before its fields are trusted.
pub fn verify_signature(
    auth_token: &[u8],
    header: Option<&[u8]>,
    url: &str,
    fields: &[(String, String)],
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let given = base64::engine::general_purpose::STANDARD
        .decode(header)
        .ok()
        .filter(|d| d.len() == 20)
        .ok_or(SignatureError::Malformed)?;
    callback_mac(auth_token, url, fields)
        .ok_or(SignatureError::Mismatch)?
        .verify_slice(&given)
        .map_err(|_| SignatureError::Mismatch)
}

/// Reads an SMS status callback (its form fields, and the callback data from its URL) into
/// callbacks. Statuses before the handset (queued, accepted, sending, scheduled) say nothing
/// Herald records and give none.
pub fn normalise(
    fields: &[(String, String)],
    callback_data: Option<&str>,
    received_at: Millis,
) -> Result<Vec<Callback>, BodyError> {
    let field = |name: &str| {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let sid = field("MessageSid")
        .or_else(|| field("SmsSid"))
        .filter(|s| !s.is_empty())
        .ok_or_else(|| BodyError("an SMS status without MessageSid".into()))?;
    let raw = field("MessageStatus")
        .or_else(|| field("SmsStatus"))
        .ok_or_else(|| BodyError(format!("SMS status of {sid} without MessageStatus")))?;
    let status = match raw {
        "queued" | "accepted" | "sending" | "scheduled" => return Ok(vec![]),
        "sent" => MessageStatus::Sent,
        "delivered" => MessageStatus::Delivered,
        "read" => MessageStatus::Read,
        "undelivered" | "failed" | "canceled" => MessageStatus::Failed,
        other => {
            return Err(BodyError(format!(
                "SMS status of {sid} is '{other}', not one the SMS provider defines"
            )))
        }
    };
    let error_code = match field("ErrorCode").filter(|c| !c.is_empty()) {
        Some(c) => Some(c.parse::<i32>().map_err(|_| {
            BodyError(format!(
                "SMS status of {sid} has ErrorCode '{c}', not a number"
            ))
        })?),
        None => None,
    };
    Ok(vec![Callback::Status {
        channel: Channel::Sms,
        provider_message_id: sid.to_string(),
        status,
        error_code,
        callback_data: callback_data.map(str::to_string),
        at: received_at,
    }])
}

fn twilio_error(status: StatusCode, code: i32, message: &str) -> Response {
    let body = json!({
        "code": code,
        "message": message,
        "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
        "status": status.as_u16(),
    });
    (status, Json(body)).into_response()
}

/// The simulator's `POST /2010-04-01/Accounts/{sid}/Messages.json`.
pub(crate) async fn simulate_send(
    State(sim): State<Arc<Simulator>>,
    Path(account): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let reject = |status, code, msg: &str| {
        sim.count_rejection();
        twilio_error(status, code, msg)
    };
    let account = account.trim_end_matches(".json").to_string();
    let expected = format!("{account}:");
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .is_some_and(|cred| cred.starts_with(&expected) && cred.len() > expected.len());
    if !authorized || !account.starts_with("AC") {
        return reject(StatusCode::UNAUTHORIZED, 20003, "Authenticate");
    }
    let fields: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    let field = |name: &str| {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let to = field("To");
    if to.is_empty() {
        return reject(
            StatusCode::BAD_REQUEST,
            21604,
            "A 'To' phone number is required.",
        );
    }
    let digits = to.strip_prefix('+').unwrap_or_default();
    if !(8..=15).contains(&digits.len()) || !digits.chars().all(|c| c.is_ascii_digit()) {
        return reject(
            StatusCode::BAD_REQUEST,
            21211,
            &format!("The 'To' number {to} is not a valid phone number."),
        );
    }
    let from = [field("From"), field("MessagingServiceSid")]
        .into_iter()
        .find(|f| !f.is_empty());
    let Some(from) = from else {
        return reject(
            StatusCode::BAD_REQUEST,
            21603,
            "A 'From' phone number is required.",
        );
    };
    let text = field("Body");
    if text.trim().is_empty() {
        return reject(StatusCode::BAD_REQUEST, 21602, "Message body is required.");
    }
    if text.chars().count() > 1_600 {
        return reject(
            StatusCode::BAD_REQUEST,
            21617,
            "The concatenated message body exceeds the 1600 character limit.",
        );
    }
    if !sim.take_sms_sender_token() {
        return reject(StatusCode::TOO_MANY_REQUESTS, 20429, "Too Many Requests");
    }
    if sim.chance(sim.options.transient_failure_rate) {
        return reject(
            StatusCode::INTERNAL_SERVER_ERROR,
            20500,
            "An internal server error has occurred",
        );
    }
    let callback = field("StatusCallback");
    let callback_data = url_param(&callback, CALLBACK_PARAM).unwrap_or_default();
    let send = SimulatedSend::text(Channel::Sms, &to, &callback_data, &text);
    let Some(sid) = sim.record(send, "SM") else {
        return twilio_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            20500,
            "simulator state poisoned",
        );
    };
    if !callback.is_empty() {
        let statuses: &[(&str, Option<i32>)] = if sim.chance(sim.options.undeliverable_rate) {
            &[("sent", None), ("undelivered", Some(30003))]
        } else {
            &[("sent", None), ("delivered", None)]
        };
        for (status, code) in statuses {
            let mut fields = vec![
                ("AccountSid".to_string(), account.clone()),
                ("ApiVersion".to_string(), "2010-04-01".to_string()),
                ("From".to_string(), from.clone()),
                ("MessageSid".to_string(), sid.clone()),
                ("MessageStatus".to_string(), status.to_string()),
                ("SmsSid".to_string(), sid.clone()),
                ("SmsStatus".to_string(), status.to_string()),
                ("To".to_string(), to.clone()),
            ];
            if let Some(code) = code {
                fields.push(("ErrorCode".to_string(), code.to_string()));
            }
            let signature = sign(&sim.options.sms_auth_token, &callback, &fields);
            let body = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(&fields)
                .finish()
                .into_bytes();
            sim.post_callbacks(
                callback.clone(),
                "application/x-www-form-urlencoded",
                vec![(SIGNATURE_HEADER, signature)],
                body,
            );
        }
    }
    if sim.withholds_answer().await {
        return (StatusCode::GATEWAY_TIMEOUT, "answer withheld").into_response();
    }
    let answer = json!({
        "account_sid": account,
        "api_version": "2010-04-01",
        "body": text,
        "direction": "outbound-api",
        "error_code": null,
        "error_message": null,
        "from": from,
        "num_segments": (text.chars().count().max(1) as f64 / 153.0).ceil().to_string(),
        "sid": sid,
        "status": "queued",
        "to": to,
    });
    (StatusCode::CREATED, Json(answer)).into_response()
}

/// The decoded value of one query parameter of a URL.
pub fn url_param(url: &str, name: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    form_urlencoded::parse(query.as_bytes())
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> Vec<(String, String)> {
        [
            ("MessageSid", "SM0001"),
            ("MessageStatus", "undelivered"),
            ("ErrorCode", "30003"),
            ("To", "+15550100001"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
    }

    #[test]
    fn a_signed_callback_passes_and_a_changed_field_or_url_does_not() {
        let url = status_callback_url("https://hooks.example.com/webhooks/sms", "hc1|c-1|m-1");
        let sig = sign(b"token", &url, &fields());
        assert_eq!(
            verify_signature(b"token", Some(sig.as_bytes()), &url, &fields()),
            Ok(())
        );
        let mut changed = fields();
        changed[1].1 = "delivered".into();
        assert_eq!(
            verify_signature(b"token", Some(sig.as_bytes()), &url, &changed),
            Err(SignatureError::Mismatch)
        );
        let other_url = url.replace("m-1", "m-2");
        assert_eq!(
            verify_signature(b"token", Some(sig.as_bytes()), &other_url, &fields()),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_signature(b"other", Some(sig.as_bytes()), &url, &fields()),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_signature(b"token", None, &url, &fields()),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            verify_signature(b"token", Some(b"not base64!"), &url, &fields()),
            Err(SignatureError::Malformed)
        );
    }

    #[test]
    fn a_callback_url_carries_the_callback_data_back() {
        let url = status_callback_url("https://h.example/webhooks/sms", "hc1|a b|m-1");
        assert_eq!(
            url_param(&url, CALLBACK_PARAM).as_deref(),
            Some("hc1|a b|m-1")
        );
    }

    #[test]
    fn an_undelivered_sms_is_a_failed_status_with_its_code() {
        let cs = normalise(&fields(), Some("hc1|c-1|m-1"), 5).expect("read");
        assert_eq!(
            cs,
            vec![Callback::Status {
                channel: Channel::Sms,
                provider_message_id: "SM0001".into(),
                status: MessageStatus::Failed,
                error_code: Some(30003),
                callback_data: Some("hc1|c-1|m-1".into()),
                at: 5,
            }]
        );
        let mut queued = fields();
        queued[1].1 = "queued".into();
        assert_eq!(normalise(&queued, None, 5), Ok(vec![]));
        let mut odd = fields();
        odd[1].1 = "teleported".into();
        assert!(normalise(&odd, None, 5).is_err());
        assert!(normalise(&fields()[1..], None, 5).is_err(), "no MessageSid");
    }
}
