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
