//! Webhook normalisation, pure: a signed body in, provider facts out. Each adapter checks its
//! own signature and reads its own body shape; this module picks the adapter for a path, names
//! why a body is refused, routes each callback to its customer and makes the provider event.
//! The HTTP server around it is `gateway`.

use crate::context::deterministic_id;
use crate::events::*;
use crate::provider::callback::{parse_callback_data, BodyError, Callback};
use crate::provider::whatsapp::{normalise, verify_signature};

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
    crate::provider::sms::verify_signature(auth_token, signature, url, &fields)
        .map_err(|e| Refusal::Unauthorized(e.to_string()))?;
    let data = crate::provider::sms::url_param(url, crate::provider::sms::CALLBACK_PARAM);
    crate::provider::sms::normalise(&fields, data.as_deref(), received_at)
        .map_err(Refusal::BadRequest)
}

/// E-mail delivery events as the gateway reads them: basic auth, then the body. The door
/// `POST /webhooks/email` opens onto.
pub fn read_email(
    (user, password): (&str, &str),
    authorization: Option<&[u8]>,
    body: &[u8],
    received_at: Millis,
) -> Result<Vec<Callback>, Refusal> {
    if !crate::provider::email::authorized(authorization, user, password) {
        return Err(Refusal::Unauthorized(
            "missing or wrong basic-auth credentials".into(),
        ));
    }
    crate::provider::email::normalise(body, received_at).map_err(Refusal::BadRequest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::whatsapp::{sign, SignatureError};

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
