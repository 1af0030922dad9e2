//! What each provider's error codes mean, in one table per channel, read by dispatch (retry,
//! back to policy, halt the lane, dead-letter), by policy (which suppression, which fallback)
//! and by the pacer (a throttle or a provider fault). Adding a provider's codes touches only
//! this file.

use crate::events::{Channel, SuppressionReason};
use crate::pacing::CallEnd;

/// What a provider's error code calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAction {
    /// Throttling or a transient fault: back off and try again.
    Retry,
    /// The message cannot go as it was approved (outside the service window, template paused,
    /// disabled or missing, a parameter refused): it returns to policy as a failed decision.
    ReturnToPolicy,
    /// Undeliverable on this channel: the next channel the customer consented to.
    Fallback,
    /// The customer is not to get marketing now (spam rate limit, per-user marketing limit,
    /// the user stopped marketing): no more marketing to them.
    StopMarketing,
    /// The business account or number is blocked or its token is invalid: stop the lane and
    /// alert; nothing sent on it can succeed until someone acts.
    StopLane,
    /// A code Herald does not know: the message goes to the dead-letter topic.
    Unknown,
}

/// Classifies a provider's error code for a channel: the Cloud API's codes for WhatsApp, the
/// SMS provider's (Twilio-shaped) codes for SMS, and the HTTP status for e-mail, whose provider
/// answers with no code of its own.
pub fn classify(channel: Channel, code: i32) -> ErrorAction {
    match channel {
        Channel::Whatsapp => classify_cloud_api(code),
        Channel::Sms => classify_sms(code),
        Channel::Email => classify_email(code),
    }
}

/// Classifies a Cloud API error code (or an HTTP status when the answer had none), as the
/// Cloud API's error code reference defines them.
fn classify_cloud_api(code: i32) -> ErrorAction {
    match code {
        // Throttling: app, account, number and pair rate limits; transient service faults.
        4 | 80007 | 130429 | 131056 | 131000 | 131016 | 133004 | 429 | 500 | 502 | 503 | 504 => {
            ErrorAction::Retry
        }
        // Policy names the reason of each refusal it must hear of; one list serves both.
        code if refusal_reason(code).is_some() => ErrorAction::ReturnToPolicy,
        code if is_undeliverable(Channel::Whatsapp, code) => ErrorAction::Fallback,
        131048..=131050 => ErrorAction::StopMarketing,
        // Access, token and account blocks: 0 (auth), 3 (capability), 10 (permission),
        // 190 (token expired), 200-299 (permissions), 368 (policy block), 131031 (account
        // locked), 131042 (payment), 131045 (certificate), 133010 (number not registered).
        0 | 3 | 10 | 190 | 200..=299 | 368 | 131031 | 131042 | 131045 | 133010 => {
            ErrorAction::StopLane
        }
        _ => ErrorAction::Unknown,
    }
}

/// Classifies an SMS provider error code (Twilio's numbering).
fn classify_sms(code: i32) -> ErrorAction {
    match code {
        // Too many requests, queue overflow, an internal fault, a bare throttle or outage.
        20429 | 30001 | 20500 | 429 | 500 | 502 | 503 | 504 => ErrorAction::Retry,
        code if is_undeliverable(Channel::Sms, code) => ErrorAction::Fallback,
        // The recipient replied STOP: the carrier refuses every further message from us.
        21610 => ErrorAction::StopMarketing,
        // Authentication, a suspended account, a sender number the account does not own or
        // that cannot send to the region.
        20003 | 20005 | 21606 | 21408 | 21612 | 401 | 403 => ErrorAction::StopLane,
        _ => ErrorAction::Unknown,
    }
}

/// Classifies an e-mail provider's answer (SendGrid-shaped: the HTTP status).
fn classify_email(code: i32) -> ErrorAction {
    match code {
        429 | 500 | 502 | 503 | 504 => ErrorAction::Retry,
        // A bounce or a dropped address, reported by the event webhook.
        code if is_undeliverable(Channel::Email, code) => ErrorAction::Fallback,
        401 | 403 => ErrorAction::StopLane,
        // 400 and 413 say Herald built a request the provider cannot take: a person looks.
        _ => ErrorAction::Unknown,
    }
}

/// Provider error codes worth retrying on a channel: throttling and transient faults.
pub fn is_retryable(channel: Channel, code: i32) -> bool {
    classify(channel, code) == ErrorAction::Retry
}

/// The Cloud API error code for a message it could not deliver to that channel.
pub const UNDELIVERABLE: i32 = 131_026;

/// Whether a provider's error code says the message cannot reach the customer on that
/// channel, so the next channel should carry it: the Cloud API's 131026; the SMS provider's
/// invalid, unreachable, landline or filtered numbers (Twilio's 21211, 21614, 30003-30008);
/// an e-mail bounce or drop (550, as the gateway records one).
pub fn is_undeliverable(channel: Channel, code: i32) -> bool {
    match channel {
        Channel::Whatsapp => code == UNDELIVERABLE,
        Channel::Sms => matches!(code, 21211 | 21614 | 30003..=30008),
        Channel::Email => code == EMAIL_BOUNCED,
    }
}

/// The SMS provider's code for a recipient who replied STOP (Twilio's 21610).
pub const SMS_UNSUBSCRIBED: i32 = 21_610;

/// The code the gateway gives an e-mail the provider bounced or dropped (SMTP's permanent
/// "mailbox unavailable").
pub const EMAIL_BOUNCED: i32 = 550;

/// The suppression reason of a Cloud API refusal that policy must hear of.
pub fn refusal_reason(code: i32) -> Option<SuppressionReason> {
    match code {
        131047 => Some(SuppressionReason::OutsideSessionWindow),
        132001 | 132015 | 132016 | 131051 | 131052 | 131053 => {
            Some(SuppressionReason::TemplateUnavailable)
        }
        132000 | 132005 | 132007 | 132012 | 131008 | 131009 => {
            Some(SuppressionReason::MissingVariable)
        }
        _ => None,
    }
}

/// What a refusal says about the provider's health, for its circuit breaker and the sender's
/// bucket: a throttle or a server-side fault counts against the provider, a refusal of the
/// message does not.
pub fn call_end_of_refusal(code: i32) -> CallEnd {
    match code {
        // The Cloud API's, the SMS provider's and HTTP's "too many requests".
        130429 | 20429 | 429 => CallEnd::Throttled,
        // The Cloud API's and the SMS provider's "something went wrong"; an e-mail
        // provider's server error.
        131000 | 20500 | 500..=504 => CallEnd::ProviderFailed,
        _ => CallEnd::Answered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_throttling_and_transient_faults_are_retried() {
        let wa = Channel::Whatsapp;
        assert!(is_retryable(wa, 130429), "rate limit hit");
        assert!(is_retryable(wa, 503));
        assert!(
            !is_retryable(wa, 131026),
            "undeliverable: retrying cannot help"
        );
        assert!(!is_retryable(wa, 132001), "template does not exist");
        assert!(
            is_retryable(wa, 131056),
            "pair rate limit: back off and retry"
        );
        assert!(is_retryable(Channel::Sms, 20429), "SMS: too many requests");
        assert!(is_retryable(Channel::Email, 429));
        assert!(
            !is_retryable(Channel::Email, 400),
            "a malformed mail is not sent by retrying"
        );
    }

    #[test]
    fn each_error_code_says_who_must_act() {
        let classify = |code| classify(Channel::Whatsapp, code);
        assert_eq!(
            classify(131047),
            ErrorAction::ReturnToPolicy,
            "outside the window"
        );
        assert_eq!(
            classify(132015),
            ErrorAction::ReturnToPolicy,
            "template paused"
        );
        assert_eq!(
            classify(132016),
            ErrorAction::ReturnToPolicy,
            "template disabled"
        );
        assert_eq!(classify(131026), ErrorAction::Fallback);
        for code in [131048, 131049, 131050] {
            assert_eq!(classify(code), ErrorAction::StopMarketing, "{code}");
        }
        assert_eq!(classify(368), ErrorAction::StopLane, "account blocked");
        assert_eq!(classify(190), ErrorAction::StopLane, "token expired");
        assert_eq!(classify(987654), ErrorAction::Unknown);
    }

    #[test]
    fn sms_and_email_codes_are_read_in_their_providers_numbering() {
        for (channel, code, action, what) in [
            (
                Channel::Sms,
                30003,
                ErrorAction::Fallback,
                "unreachable handset",
            ),
            (Channel::Sms, 21211, ErrorAction::Fallback, "invalid number"),
            (
                Channel::Sms,
                21610,
                ErrorAction::StopMarketing,
                "replied STOP",
            ),
            (
                Channel::Sms,
                20003,
                ErrorAction::StopLane,
                "bad credentials",
            ),
            (
                Channel::Sms,
                131047,
                ErrorAction::Unknown,
                "a Cloud API code",
            ),
            (Channel::Email, 401, ErrorAction::StopLane, "bad API key"),
            (
                Channel::Email,
                413,
                ErrorAction::Unknown,
                "a mail too large",
            ),
        ] {
            assert_eq!(
                classify(channel, code),
                action,
                "{channel:?} {code}: {what}"
            );
        }
    }
}
