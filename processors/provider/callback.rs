//! What a provider's webhook says once read, the vocabulary every adapter normalises into;
//! and the callback data Herald gives each send so that its webhooks name the message.

use crate::events::*;

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

/// Compares two secrets without leaking, by its timing, where they differ.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
