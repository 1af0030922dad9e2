//! What a provider's webhook says once read, the vocabulary every adapter normalises into;
//! and the callback data Herald gives each send so that its webhooks name the message.

use crate::events::*;

/// What Herald puts in a send's `biz_opaque_callback_data`, which the provider echoes in
/// every status webhook: the customer (so the gateway can key the status like every other
/// record) and the message id (so dispatch can settle an intent from it).
pub fn callback_data(customer_id: &str, message_id: &str) -> String {
    format!("hc1|{customer_id}|{message_id}")
}

/// As [`callback_data`], with the W3C trace context of the provider call, so the status
/// webhooks the provider posts join the trace of the message they are about.
pub fn traced_callback_data(
    customer_id: &str,
    message_id: &str,
    traceparent: Option<&str>,
) -> String {
    match traceparent.filter(|t| crate::trace::parse(t).is_some()) {
        Some(t) => format!("hc2|{t}|{customer_id}|{message_id}"),
        None => callback_data(customer_id, message_id),
    }
}

/// The trace context a status webhook's callback data carries, if Herald wrote one.
pub fn trace_of_callback_data(data: &str) -> Option<&str> {
    let (trace, _) = data.strip_prefix("hc2|")?.split_once('|')?;
    crate::trace::parse(trace).map(|_| trace)
}

/// The customer and message id in a status webhook's callback data, if Herald wrote it.
pub fn parse_callback_data(data: &str) -> Option<(&str, &str)> {
    let rest = match data.strip_prefix("hc2|") {
        // A traceparent has no '|' in it.
        Some(traced) => traced.split_once('|')?.1,
        None => data.strip_prefix("hc1|")?,
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn callback_data_carries_the_trace_of_the_call_back() {
        let data = traced_callback_data("cust|7", "m-1", Some(TRACE));
        assert_eq!(parse_callback_data(&data), Some(("cust|7", "m-1")));
        assert_eq!(trace_of_callback_data(&data), Some(TRACE));
    }

    #[test]
    fn callback_data_without_a_trace_reads_as_before() {
        for data in [
            traced_callback_data("c-1", "m-1", None),
            traced_callback_data("c-1", "m-1", Some("not a traceparent")),
            callback_data("c-1", "m-1"),
        ] {
            assert_eq!(data, "hc1|c-1|m-1");
            assert_eq!(parse_callback_data(&data), Some(("c-1", "m-1")));
            assert_eq!(trace_of_callback_data(&data), None);
        }
        assert_eq!(trace_of_callback_data("hc2|junk|c-1|m-1"), None);
    }
}
