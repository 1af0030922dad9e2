//! A send's intent: whether an approval goes to the provider (`plan`), how an open intent is
//! settled from statuses, what each step records, and the fold of a customer's dispatch state.

use crate::context::deterministic_id;
use crate::events::*;
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

/// How long an open intent waits, by default, for a status naming it before it counts as not
/// sent and is tried again: longer than a provider takes to post a status.
pub const SETTLE_WAIT_MS: Millis = 60_000;

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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An approved order confirmation and its decision.
    pub(crate) fn approval() -> (Decision, MessageApproved) {
        let m = MessageApproved {
            message_id: "m-1".into(),
            trigger_event_id: "e-1".into(),
            template_name: "order_confirmation".into(),
            template_version: 1,
            locale: "en_US".into(),
            purpose: Purpose::Transactional,
            channel: Channel::Whatsapp,
            recipient: "+15550100001".into(),
            variables: Default::default(),
            consent_artifact_id: "form-1".into(),
            consent_granted_at: 0,
            category: "UTILITY".into(),
            delivery: Delivery::Template,
            journey: None,
            relied_on: Default::default(),
        };
        let d = Decision {
            decision_id: "d-1".into(),
            customer_id: "c-1".into(),
            input_event_id: "e-1".into(),
            processor: Processor::Policy,
            decided_at: 0,
            policy_version: "v".into(),
            outcome: Outcome::MessageApproved(m.clone().into()),
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
}
