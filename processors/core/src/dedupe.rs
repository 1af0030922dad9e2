//! Dedupe: the same fact delivered twice yields one accepted event; the repeat is recorded.

use crate::business_identity;
use crate::context::Ctx;
use crate::events::*;
use crate::state::CustomerState;

/// Accepts a fact whose event id and business identity are both new to the customer's window,
/// or records the duplicate: the same id delivered again, or the same fact under a new id.
pub fn decide(state: &CustomerState, input: &InputEvent, ctx: &Ctx) -> Vec<Outcome> {
    let id = &input.envelope.event_id;
    if let Some(first_seen_at) = state.seen.get(id) {
        return vec![Outcome::DuplicateIgnored(DuplicateIgnored {
            event_id: id.clone(),
            first_seen_at: *first_seen_at,
            repeats_event_id: None,
            identity: None,
        })];
    }
    // A replay of the inputs, or a late delivery, must not bring back what was erased.
    if let Some(erased_at) = state
        .erased_at
        .filter(|erased_at| input.envelope.occurred_at <= *erased_at)
    {
        return vec![Outcome::PreErasureFactIgnored(PreErasureFactIgnored {
            event_id: id.clone(),
            erased_at,
        })];
    }
    let identity = business_identity::of(&input.fact, input.envelope.occurred_at);
    let identity_key = identity.as_ref().map(|i| i.key());
    if let (Some(identity), Some(earlier)) = (
        &identity,
        identity_key.as_ref().and_then(|k| state.identities.get(k)),
    ) {
        return vec![Outcome::DuplicateIgnored(DuplicateIgnored {
            event_id: id.clone(),
            first_seen_at: earlier.first_seen_at,
            repeats_event_id: Some(earlier.event_id.clone()),
            identity: Some(identity.subject.clone()),
        })];
    }
    vec![Outcome::EventAccepted(EventAccepted {
        envelope: input.envelope.clone(),
        fact: input.fact.clone(),
        forget_before: forget_before(state, ctx),
        identity_key,
    })]
}

/// The oldest first-seen time still remembered once a fact is accepted: the window's start in
/// stream time, moved back so that the customer's latest `dedupe_remember_at_least` ids (the
/// new one included) stay.
fn forget_before(state: &CustomerState, ctx: &Ctx) -> Millis {
    let policy = &ctx.topology.policy;
    let window_start = ctx.now - policy.dedupe_window_hours * 3_600_000;
    let keep_others = policy.dedupe_remember_at_least.saturating_sub(1);
    if keep_others == 0 {
        return window_start;
    }
    let mut seen: Vec<Millis> = state.seen.values().copied().collect();
    if seen.len() <= keep_others {
        return seen
            .into_iter()
            .min()
            .map_or(window_start, |oldest| oldest.min(window_start));
    }
    // The keep_others-th newest first-seen time: everything at or after it stays.
    let (_, nth, _) = seen.select_nth_unstable_by(keep_others - 1, |a, b| b.cmp(a));
    (*nth).min(window_start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::evolve;
    use crate::topology::Topology;

    fn input(id: &str, at: Millis) -> InputEvent {
        InputEvent {
            envelope: Envelope {
                event_id: id.into(),
                source_system: "crm".into(),
                source_sequence: None,
                occurred_at: at,
                customer_id: "c".into(),
                trace_parent: None,
                schema_version: 1,
            },
            fact: Fact::RefundIssued(RefundIssued {
                order_id: "o-1".into(),
                // One refund per event id: these tests are about ids, not business identity.
                refund_id: format!("r-{id}"),
                amount: Money {
                    minor_units: 100,
                    currency: "EUR".into(),
                },
                partial: false,
            }),
        }
    }

    fn fold(state: &mut CustomerState, outcome: Outcome, at: Millis) {
        let d = Decision {
            decision_id: "d".into(),
            customer_id: "c".into(),
            input_event_id: "e".into(),
            processor: Processor::Dedupe,
            decided_at: at,
            policy_version: "v".into(),
            outcome,
            consent_chain: None,
        };
        evolve(state, &d);
    }

    #[test]
    fn a_repeat_inside_the_window_is_recorded_and_a_repeat_after_it_is_new() {
        let topology = Topology::embedded().unwrap();
        let window = topology.policy.dedupe_window_hours * 3_600_000;
        let mut state = CustomerState::default();
        let tables = crate::tables::Tables::default();
        let ctx = Ctx {
            now: 1_000,
            topology: &topology,
            tables: &tables,
            input_ref: "r/0/1",
        };
        let first = decide(&state, &input("e-1", 1_000), &ctx);
        assert!(matches!(first[0], Outcome::EventAccepted(_)));
        fold(&mut state, first[0].clone(), 1_000);
        let again = decide(&state, &input("e-1", 1_000), &ctx);
        assert_eq!(
            again,
            vec![Outcome::DuplicateIgnored(DuplicateIgnored {
                event_id: "e-1".into(),
                first_seen_at: 1_000,
                repeats_event_id: None,
                identity: None,
            })]
        );
        // Stream time moving past the window alone does not forget e-1: the customer's latest
        // ids stay, so a topic that lags the others still finds its redeliveries recognised.
        let later = Ctx {
            now: 1_000 + window + 1,
            ..ctx
        };
        let other = decide(&state, &input("e-2", later.now), &later);
        fold(&mut state, other[0].clone(), later.now);
        assert!(matches!(
            decide(&state, &input("e-1", 1_000), &later)[0],
            Outcome::DuplicateIgnored(_)
        ));
        // Once that many newer facts were accepted past the window, e-1 is forgotten and a
        // repeat counts as new.
        for i in 0..topology.policy.dedupe_remember_at_least {
            let d = decide(&state, &input(&format!("n-{i}"), later.now), &later);
            fold(&mut state, d[0].clone(), later.now);
        }
        assert!(!state.seen.contains_key("e-1"));
        assert!(matches!(
            decide(&state, &input("e-1", 1_000), &later)[0],
            Outcome::EventAccepted(_)
        ));
    }

    #[test]
    fn after_an_erasure_facts_from_before_it_stay_out_and_later_ones_come_in() {
        let topology = Topology::embedded().unwrap();
        let tables = crate::tables::Tables::default();
        let window = topology.policy.dedupe_window_hours * 3_600_000;
        let now = 10 * window;
        let ctx = Ctx {
            now,
            topology: &topology,
            tables: &tables,
            input_ref: "r/0/1",
        };
        let mut state = CustomerState::default();
        let order = input;
        let before = order("e-old", 1_000);
        let accepted = decide(&state, &before, &ctx)[0].clone();
        fold(&mut state, accepted, now);
        let erasure = InputEvent {
            fact: Fact::ErasureRequested(ErasureRequested {
                request_id: "r".into(),
            }),
            ..input("erase", 5_000)
        };
        let erased = decide(&state, &erasure, &ctx)[0].clone();
        fold(&mut state, erased, now);
        assert!(state.erased && state.erased_at == Some(5_000));
        // Much later, the dedupe window has forgotten the ids seen before the erasure.
        state.seen.clear();
        // The same fact delivered again once its id has left the window (a replay from offset
        // zero): its id is forgotten with the rest, but its time gives it away.
        assert_eq!(
            decide(&state, &order("e-old", 1_000), &ctx),
            vec![Outcome::PreErasureFactIgnored(PreErasureFactIgnored {
                event_id: "e-old".into(),
                erased_at: 5_000
            })]
        );
        assert!(matches!(
            decide(&state, &order("e-new", 6_000), &ctx)[0],
            Outcome::EventAccepted(_)
        ));
    }
}
