//! Dispatch planning: which approved messages go to the provider, and what each step records.
//! The HTTP call itself lives in the provider shell.

use crate::context::deterministic_id;
use crate::events::*;
use crate::topology::TemplateCatalog;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Per-customer dispatch state: the messages the provider accepted, and the sends recorded as
/// intended whose outcome is not recorded yet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispatchState {
    /// message id -> provider message id.
    pub sent: BTreeMap<String, String>,
    /// message id -> its open intent.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub open: BTreeMap<String, OpenIntent>,
}

/// A send recorded as intended and not yet settled: the provider may or may not have it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenIntent {
    pub attempt: i32,
    pub intended_at: Millis,
    /// Where the approval is in the decision log partition, to send it anew if need be.
    pub approval_offset: i64,
    /// From where in the provider topic partition its statuses can appear.
    #[serde(default)]
    pub statuses_from: i64,
    pub decision_id: String,
    pub template_name: String,
    pub channel: Channel,
}

/// What dispatch should do with an approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Record an intent with this attempt number, then call the provider once it is committed.
    Intend { attempt: i32 },
    /// Already sent: record the skip, do not call the provider again.
    AlreadySent { provider_message_id: String },
    /// An intent is open: whether it went out is settled from status webhooks, never by
    /// sending again.
    AwaitingOutcome,
}

/// Plans the dispatch of one approval.
pub fn plan(state: &DispatchState, approved: &MessageApproved) -> Plan {
    if let Some(id) = state.sent.get(&approved.message_id) {
        return Plan::AlreadySent {
            provider_message_id: id.clone(),
        };
    }
    if state.open.contains_key(&approved.message_id) {
        return Plan::AwaitingOutcome;
    }
    Plan::Intend { attempt: 1 }
}

/// A status the provider reported for one of our messages (its callback data names it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedStatus {
    pub provider_message_id: String,
    pub status: String,
}

/// How an open intent is settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// A status webhook names the message: it went out; never send it again.
    Sent(ObservedStatus),
    /// No status within the wait: it did not go out; a new intent (attempt + 1) follows.
    NotSent { next_attempt: i32 },
}

/// Settles an intent whose call's outcome is unknown: by a status seen for it, or, once
/// `wait_ms` has passed since the intent without one, as not sent. `None`: keep waiting.
pub fn settle(
    intent: &OpenIntent,
    status: Option<&ObservedStatus>,
    now: Millis,
    wait_ms: i64,
) -> Option<Settlement> {
    match status {
        Some(s) => Some(Settlement::Sent(s.clone())),
        None if now - intent.intended_at >= wait_ms => Some(Settlement::NotSent {
            next_attempt: intent.attempt + 1,
        }),
        None => None,
    }
}

/// The step that records a settlement.
pub fn settlement_step(intent: &OpenIntent, settlement: &Settlement, now: Millis) -> DispatchStep {
    let waited_ms = now - intent.intended_at;
    match settlement {
        Settlement::Sent(s) => DispatchStep::Reconciled(DispatchReconciled {
            provider_message_id: Some(s.provider_message_id.clone()),
            status: Some(s.status.clone()),
            waited_ms,
        }),
        Settlement::NotSent { .. } => DispatchStep::Reconciled(DispatchReconciled {
            provider_message_id: None,
            status: None,
            waited_ms,
        }),
    }
}

/// The dispatch record of one step for a message.
pub fn step_record(
    customer_id: &str,
    message_id: &str,
    decision_id: &str,
    template_name: &str,
    channel: Channel,
    step: DispatchStep,
    now: Millis,
) -> DispatchRecord {
    let step_key = match &step {
        DispatchStep::Attempted(a) => format!("attempt-{}", a.attempt),
        DispatchStep::Accepted(_) => "accepted".into(),
        DispatchStep::Failed(_) => "failed".into(),
        DispatchStep::Skipped(_) => format!("skipped-{decision_id}"),
        DispatchStep::Intended(i) => format!("intent-{}", i.attempt),
        DispatchStep::Unanswered(u) => format!("unanswered-{}", u.attempt),
        DispatchStep::Reconciled(r) => format!(
            "reconciled-{}",
            r.provider_message_id.as_deref().unwrap_or("unsent")
        ),
    };
    DispatchRecord {
        dispatch_id: deterministic_id(&[message_id, &step_key]),
        message_id: message_id.to_string(),
        customer_id: customer_id.to_string(),
        decision_id: decision_id.to_string(),
        template_name: template_name.to_string(),
        channel,
        recorded_at: now,
        step,
    }
}

/// The dispatch record of one step for an approval.
pub fn record(
    decision: &Decision,
    approved: &MessageApproved,
    step: DispatchStep,
    now: Millis,
) -> DispatchRecord {
    step_record(
        &decision.customer_id,
        &approved.message_id,
        &decision.decision_id,
        &approved.template_name,
        approved.channel,
        step,
        now,
    )
}

/// Folds a dispatch step into the state.
pub fn evolve(state: &mut DispatchState, rec: &DispatchRecord) {
    match &rec.step {
        DispatchStep::Intended(i) => {
            state.open.insert(
                rec.message_id.clone(),
                OpenIntent {
                    attempt: i.attempt,
                    intended_at: rec.recorded_at,
                    approval_offset: i.approval_offset,
                    statuses_from: i.statuses_from,
                    decision_id: rec.decision_id.clone(),
                    template_name: rec.template_name.clone(),
                    channel: rec.channel,
                },
            );
        }
        DispatchStep::Accepted(a) => {
            state.open.remove(&rec.message_id);
            state
                .sent
                .insert(rec.message_id.clone(), a.provider_message_id.clone());
        }
        DispatchStep::Reconciled(DispatchReconciled {
            provider_message_id: Some(id),
            ..
        }) => {
            state.open.remove(&rec.message_id);
            state.sent.insert(rec.message_id.clone(), id.clone());
        }
        // Refused: settled, not sent. A not-sent reconciliation is followed by a new intent
        // in the same transaction, which replaces the open one.
        DispatchStep::Failed(_) => {
            state.open.remove(&rec.message_id);
        }
        DispatchStep::Reconciled(_)
        | DispatchStep::Attempted(_)
        | DispatchStep::Unanswered(_)
        | DispatchStep::Skipped(_) => {}
    }
}

/// What a Cloud API error code calls for.
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
        code if crate::policy::refusal_reason(code).is_some() => ErrorAction::ReturnToPolicy,
        code if crate::policy::is_undeliverable(Channel::Whatsapp, code) => ErrorAction::Fallback,
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
        code if crate::policy::is_undeliverable(Channel::Sms, code) => ErrorAction::Fallback,
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
        code if crate::policy::is_undeliverable(Channel::Email, code) => ErrorAction::Fallback,
        401 | 403 => ErrorAction::StopLane,
        // 400 and 413 say Herald built a request the provider cannot take: a person looks.
        _ => ErrorAction::Unknown,
    }
}

/// Provider error codes worth retrying on a channel: throttling and transient faults.
pub fn is_retryable(channel: Channel, code: i32) -> bool {
    classify(channel, code) == ErrorAction::Retry
}

/// Whether a message travels as composed text rather than as a template the provider holds:
/// every SMS and e-mail, and a WhatsApp session message.
pub fn carries_text(m: &MessageApproved) -> bool {
    m.channel != Channel::Whatsapp || m.delivery == Delivery::Session
}

/// Why a message cannot be composed as text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CompositionError(pub String);

/// The text of a message on a channel that carries text rather than a template the provider
/// holds (SMS, e-mail, a WhatsApp session message): the catalog body of the approved variant
/// with its variables filled in. A placeholder without a value is an error, never a blank.
pub fn compose(catalog: &TemplateCatalog, m: &MessageApproved) -> Result<String, CompositionError> {
    let variants = catalog.variants(&m.template_name).ok_or_else(|| {
        CompositionError(format!(
            "template {} is not in the catalog",
            m.template_name
        ))
    })?;
    let template = variants
        .iter()
        .find(|t| t.locale == m.locale && t.version == m.template_version)
        .or_else(|| {
            // A catalog updated since the approval: the newest version in the same locale.
            variants
                .iter()
                .filter(|t| t.locale == m.locale)
                .max_by_key(|t| t.version)
        })
        .ok_or_else(|| {
            CompositionError(format!(
                "template {} has no {} variant in the catalog",
                m.template_name, m.locale
            ))
        })?;
    let mut out = String::with_capacity(template.body.len() + 32);
    let mut rest = template.body.as_str();
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let close = after.find("}}").ok_or_else(|| {
            CompositionError(format!(
                "template {} ({}) has an unclosed '{{{{'",
                m.template_name, m.locale
            ))
        })?;
        let name = after[..close].trim();
        let value = m.variables.get(name).ok_or_else(|| {
            CompositionError(format!(
                "template {} ({}) needs {name}, which the approval does not carry",
                m.template_name, m.locale
            ))
        })?;
        out.push_str(value);
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The subject line of an e-mail: the first sentence of its text, cut at a word boundary so
/// it fits the 78 characters a mail header line should keep to.
pub fn subject_of(text: &str) -> String {
    let first = text
        .split_inclusive(['.', '!', '?', '\n'])
        .next()
        .unwrap_or(text)
        .trim();
    if first.chars().count() <= 78 {
        return first.to_string();
    }
    let mut cut = String::new();
    for word in first.split_whitespace() {
        if cut.chars().count() + word.chars().count() + 1 > 77 {
            break;
        }
        if !cut.is_empty() {
            cut.push(' ');
        }
        cut.push_str(word);
    }
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    fn approval() -> (Decision, MessageApproved) {
        let m = MessageApproved {
            message_id: "m-1".into(),
            trigger_event_id: "e-1".into(),
            template_name: "order_confirmation".into(),
            template_version: 1,
            locale: "en_US".into(),
            purpose: Purpose::Transactional,
            channel: Channel::Whatsapp,
            recipient: "+15550100001".into(),
            variables: BTreeMap::new(),
            consent_artifact_id: "form-1".into(),
            consent_granted_at: 0,
            category: "UTILITY".into(),
            delivery: Delivery::Template,
            journey: None,
            relied_on: BTreeMap::new(),
        };
        let d = Decision {
            decision_id: "d-1".into(),
            customer_id: "c-1".into(),
            input_event_id: "e-1".into(),
            processor: Processor::Policy,
            decided_at: 0,
            policy_version: "v".into(),
            outcome: Outcome::MessageApproved(m.clone()),
            consent_chain: None,
        };
        (d, m)
    }

    fn accepted(d: &Decision, m: &MessageApproved, wamid: &str) -> DispatchRecord {
        record(
            d,
            m,
            DispatchStep::Accepted(DispatchAccepted {
                provider_message_id: wamid.into(),
            }),
            5,
        )
    }

    #[test]
    fn a_message_the_provider_accepted_is_never_sent_again() {
        let (d, m) = approval();
        let mut state = DispatchState::default();
        assert_eq!(plan(&state, &m), Plan::Intend { attempt: 1 });
        evolve(&mut state, &intended(&d, &m, 1, 10));
        evolve(&mut state, &accepted(&d, &m, "wamid.1"));
        assert_eq!(
            plan(&state, &m),
            Plan::AlreadySent {
                provider_message_id: "wamid.1".into()
            }
        );
    }

    #[test]
    fn a_failed_attempt_does_not_count_as_sent() {
        let (d, m) = approval();
        let mut state = DispatchState::default();
        let failed = record(
            &d,
            &m,
            DispatchStep::Failed(DispatchFailed {
                code: 131000,
                retryable: true,
                detail: "provider fault".into(),
            }),
            5,
        );
        evolve(&mut state, &failed);
        assert_eq!(plan(&state, &m), Plan::Intend { attempt: 1 });
    }

    fn intended(d: &Decision, m: &MessageApproved, attempt: i32, at: Millis) -> DispatchRecord {
        record(
            d,
            m,
            DispatchStep::Intended(DispatchIntended {
                attempt,
                approval_offset: 7,
                statuses_from: 3,
            }),
            at,
        )
    }

    #[test]
    fn an_open_intent_is_never_sent_again_until_it_is_settled() {
        let (d, m) = approval();
        let mut state = DispatchState::default();
        evolve(&mut state, &intended(&d, &m, 1, 1_000));
        // The process died during the call, or the answer was lost: the approval delivered
        // again finds the intent open and does not lead to a second call.
        assert_eq!(plan(&state, &m), Plan::AwaitingOutcome);
        let unanswered = record(
            &d,
            &m,
            DispatchStep::Unanswered(DispatchUnanswered {
                attempt: 1,
                detail: "timed out".into(),
            }),
            1_500,
        );
        evolve(&mut state, &unanswered);
        assert_eq!(plan(&state, &m), Plan::AwaitingOutcome);
        let open = state.open[&m.message_id].clone();
        assert_eq!(open.approval_offset, 7);
        // Before the wait is over and with no status, it stays open.
        assert_eq!(settle(&open, None, 20_000, 30_000), None);
    }

    #[test]
    fn a_status_webhook_settles_an_open_intent_as_sent() {
        let (d, m) = approval();
        let mut state = DispatchState::default();
        evolve(&mut state, &intended(&d, &m, 1, 1_000));
        let open = state.open[&m.message_id].clone();
        let seen = ObservedStatus {
            provider_message_id: "wamid.7".into(),
            status: "delivered".into(),
        };
        // A status settles it at once, however short the wait so far.
        let s = settle(&open, Some(&seen), 1_001, 30_000).unwrap();
        assert_eq!(s, Settlement::Sent(seen));
        let rec = record(&d, &m, settlement_step(&open, &s, 1_001), 1_001);
        evolve(&mut state, &rec);
        assert!(state.open.is_empty());
        assert_eq!(
            plan(&state, &m),
            Plan::AlreadySent {
                provider_message_id: "wamid.7".into()
            }
        );
    }

    #[test]
    fn no_status_within_the_wait_means_not_sent_and_a_new_attempt() {
        let (d, m) = approval();
        let mut state = DispatchState::default();
        evolve(&mut state, &intended(&d, &m, 1, 1_000));
        let open = state.open[&m.message_id].clone();
        let s = settle(&open, None, 31_000, 30_000).unwrap();
        assert_eq!(s, Settlement::NotSent { next_attempt: 2 });
        let rec = record(&d, &m, settlement_step(&open, &s, 31_000), 31_000);
        assert_ne!(rec.dispatch_id, intended(&d, &m, 1, 1_000).dispatch_id);
        evolve(&mut state, &rec);
        evolve(&mut state, &intended(&d, &m, 2, 31_000));
        assert_eq!(state.open[&m.message_id].attempt, 2);
        assert!(state.sent.is_empty());
    }

    #[test]
    fn the_same_step_of_the_same_message_has_the_same_id() {
        let (d, m) = approval();
        assert_eq!(
            accepted(&d, &m, "wamid.1").dispatch_id,
            accepted(&d, &m, "wamid.1").dispatch_id,
            "a re-recorded step must be recognisable as a repeat"
        );
        let attempt = |n| {
            record(
                &d,
                &m,
                DispatchStep::Attempted(DispatchAttempted { attempt: n }),
                5,
            )
            .dispatch_id
        };
        assert_ne!(attempt(1), attempt(2));
    }

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

    fn catalog() -> TemplateCatalog {
        crate::topology::Topology::embedded()
            .expect("embedded topology")
            .catalog
    }

    #[test]
    fn a_text_channel_gets_the_catalog_body_with_the_approved_values() {
        let (_, mut m) = approval();
        m.template_version = 3;
        m.variables = BTreeMap::from([
            ("first_name".to_string(), "Ana".to_string()),
            ("order_id".to_string(), "A-17".to_string()),
            ("total".to_string(), "EUR 12.50".to_string()),
        ]);
        let text = compose(&catalog(), &m).expect("composed");
        assert_eq!(
            text,
            "Hi Ana, thanks for your order A-17. Total: EUR 12.50."
        );
        assert_eq!(subject_of(&text), "Hi Ana, thanks for your order A-17.");
        m.variables.remove("total");
        let e = compose(&catalog(), &m).expect_err("a missing value is never sent blank");
        assert!(e.0.contains("total"), "{e}");
        m.template_name = "no_such_template".into();
        assert!(compose(&catalog(), &m).is_err());
    }

    #[test]
    fn a_long_first_sentence_is_cut_at_a_word_for_the_subject() {
        let long = "word ".repeat(40);
        let subject = subject_of(&long);
        assert!(subject.chars().count() <= 78, "{subject}");
        assert!(subject.ends_with("word…"), "{subject}");
    }
}
