//! Dispatch planning: which approved messages go to the provider, and what each step records.
//! The HTTP call itself lives in the provider shell.

use crate::events::*;
use crate::pipeline::deterministic_id;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Per-customer dispatch state: the messages already accepted by the provider.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispatchState {
    /// message id -> provider message id.
    pub sent: BTreeMap<String, String>,
}

/// What dispatch should do with an approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Call the provider.
    Send,
    /// Already sent: record the skip, do not call the provider again.
    AlreadySent { provider_message_id: String },
}

/// Plans the dispatch of one approval.
pub fn plan(state: &DispatchState, approved: &MessageApproved) -> Plan {
    match state.sent.get(&approved.message_id) {
        Some(id) => Plan::AlreadySent {
            provider_message_id: id.clone(),
        },
        None => Plan::Send,
    }
}

/// The dispatch record of one step for an approval.
pub fn record(
    decision: &Decision,
    approved: &MessageApproved,
    step: DispatchStep,
    now: Millis,
) -> DispatchRecord {
    let step_key = match &step {
        DispatchStep::Attempted(a) => format!("attempt-{}", a.attempt),
        DispatchStep::Accepted(_) => "accepted".into(),
        DispatchStep::Failed(_) => "failed".into(),
        DispatchStep::Skipped(_) => format!("skipped-{}", decision.decision_id),
    };
    DispatchRecord {
        dispatch_id: deterministic_id(&[&approved.message_id, &step_key]),
        message_id: approved.message_id.clone(),
        customer_id: decision.customer_id.clone(),
        decision_id: decision.decision_id.clone(),
        template_name: approved.template_name.clone(),
        channel: approved.channel,
        recorded_at: now,
        step,
    }
}

/// Folds a dispatch step into the state.
pub fn evolve(state: &mut DispatchState, rec: &DispatchRecord) {
    if let DispatchStep::Accepted(a) = &rec.step {
        state
            .sent
            .insert(rec.message_id.clone(), a.provider_message_id.clone());
    }
}

/// Provider error codes worth retrying: throttling and transient provider faults.
pub fn is_retryable(code: i32) -> bool {
    matches!(
        code,
        4 | 80007 | 130429 | 131000 | 131016 | 429 | 500 | 502 | 503 | 504
    )
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
        assert_eq!(plan(&state, &m), Plan::Send);
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
        assert_eq!(plan(&state, &m), Plan::Send);
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
        assert!(is_retryable(130429), "rate limit hit");
        assert!(is_retryable(503));
        assert!(!is_retryable(131026), "undeliverable: retrying cannot help");
        assert!(!is_retryable(132001), "template does not exist");
    }
}
