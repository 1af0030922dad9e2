//! Dedupe: the same fact delivered twice yields one accepted event; the repeat is recorded.

use crate::events::*;
use crate::pipeline::Ctx;
use crate::state::CustomerState;

/// Accepts a fact whose event id is not in the customer's window, or records the duplicate.
pub fn decide(state: &CustomerState, input: &InputEvent, ctx: &Ctx) -> Vec<Outcome> {
    let id = &input.envelope.event_id;
    match state.seen.get(id) {
        Some(first_seen_at) => vec![Outcome::DuplicateIgnored(DuplicateIgnored {
            event_id: id.clone(),
            first_seen_at: *first_seen_at,
        })],
        None => vec![Outcome::EventAccepted(EventAccepted {
            envelope: input.envelope.clone(),
            fact: input.fact.clone(),
            forget_before: ctx.now - ctx.topology.policy.dedupe_window_hours * 3_600_000,
        })],
    }
}
