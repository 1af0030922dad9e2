//! The pure core composed: dedupe, then the ordering guard, then policy, each deciding on the
//! state as the previous one left it. One input and one state always give the same decisions.

use crate::context::{deterministic_id, Ctx};
use crate::events::*;
use crate::policy::Trigger;
use crate::state::{evolve, CustomerState};
use crate::{dedupe, journey, ordering, policy};

/// Stamps an input's outcomes into decisions and folds each as it is made. It borrows what
/// every decision of the input repeats: each decision owns its copy, the recorder needs none.
struct Recorder<'a> {
    state: &'a mut CustomerState,
    customer_id: &'a str,
    input_event_id: std::borrow::Cow<'a, str>,
    input_ref: &'a str,
    now: Millis,
    policy_version: &'a str,
    /// Where the decisions go; this input's (or timer's) start at `first`.
    out: &'a mut Vec<Decision>,
    first: usize,
}

impl Recorder<'_> {
    fn record(&mut self, processor: Processor, outcomes: Vec<Outcome>) {
        for outcome in outcomes {
            let mut seq = [0u8; 20];
            let mut d = Decision {
                decision_id: deterministic_id(&[
                    self.customer_id,
                    self.input_ref,
                    &self.input_event_id,
                    decimal(self.out.len() - self.first, &mut seq),
                ]),
                customer_id: self.customer_id.to_string(),
                input_event_id: self.input_event_id.to_string(),
                processor,
                decided_at: self.now,
                policy_version: self.policy_version.to_string(),
                outcome,
                consent_chain: None,
            };
            if d.outcome.changes_consent() {
                let previous = self.state.consent_chain_head.as_deref();
                d.consent_chain = Some(crate::audit::chain_link(previous, &d));
            }
            evolve(self.state, &d);
            self.out.push(d);
        }
    }
}

/// `n` in decimal, written into `buf`: a decision's sequence number goes into its id, and
/// formatting it allocated a string per decision.
fn decimal(mut n: usize, buf: &mut [u8; 20]) -> &str {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    std::str::from_utf8(&buf[at..]).unwrap_or_default()
}

/// Runs one input through dedupe, the ordering guard and policy, folding as it goes.
pub fn process(state: &mut CustomerState, input: &InputEvent, ctx: &Ctx) -> Vec<Decision> {
    let mut out = Vec::new();
    process_into(state, input, ctx, &mut out);
    out
}

/// As [`process`], appending to `out`: a decision is 432 bytes, and handing each input's
/// decisions up in a vector of their own moved every one once more and allocated per input.
pub fn process_into(
    state: &mut CustomerState,
    input: &InputEvent,
    ctx: &Ctx,
    out: &mut Vec<Decision>,
) {
    let event_id = input.envelope.event_id.as_str();
    let first = out.len();
    let mut r = Recorder {
        state,
        customer_id: &input.envelope.customer_id,
        input_event_id: event_id.into(),
        input_ref: ctx.input_ref,
        now: ctx.now,
        policy_version: &ctx.topology.policy.version,
        out,
        first,
    };
    let dedupe = dedupe::decide(r.state, input, ctx);
    let accepted = matches!(dedupe.first(), Some(Outcome::EventAccepted(_)));
    r.record(Processor::Dedupe, dedupe);
    if !accepted {
        return;
    }

    let guard = ordering::decide(r.state, input, ctx);
    let held = ordering::held_now(&guard, event_id);
    // Released shipments are policy triggers; take their facts before the fold forgets them.
    let released: Vec<(String, Fact, Millis)> = guard
        .iter()
        .filter_map(|o| match o {
            Outcome::ShipmentReleased(rel) => r.state.held.get(&rel.event_id).map(|h| {
                (
                    rel.event_id.clone(),
                    Fact::ShipmentDispatched(h.shipment.clone()),
                    h.envelope_occurred_at,
                )
            }),
            _ => None,
        })
        .collect();
    r.record(Processor::OrderingGuard, guard);

    if !held {
        let t = Trigger {
            event_id,
            fact: &input.fact,
            occurred_at: input.envelope.occurred_at,
        };
        route(&mut r, &t, ctx);
    }
    for (held_id, fact, occurred_at) in &released {
        let t = Trigger {
            event_id: held_id,
            fact,
            occurred_at: *occurred_at,
        };
        route(&mut r, &t, ctx);
    }
    // A step due at once (an order confirmation) is taken with the fact that started it.
    while let Some(slot) = journey::next_due_step(r.state, ctx.now) {
        let outcomes = journey::take_step(r.state, r.customer_id, &slot, ctx);
        if outcomes.is_empty() {
            break;
        }
        r.record(Processor::Policy, outcomes);
    }
}

/// Policy's own reading of a fact (inbound keywords, delivery failures), then every journey's.
/// Each journey decides on the state the previous one left, so caps count what was just approved.
fn route(r: &mut Recorder, t: &Trigger, ctx: &Ctx) {
    let customer_id = r.customer_id;
    let own = match t.fact {
        Fact::InboundMessageReceived(m) => {
            policy::decide_inbound(r.state, t.event_id, m, t.occurred_at, ctx)
        }
        Fact::MessageStatusChanged(s) => policy::decide_status(r.state, customer_id, s, ctx),
        _ => vec![],
    };
    r.record(Processor::Policy, own);
    for j in &ctx.topology.journeys {
        let outcomes = journey::on_fact(r.state, customer_id, j, t, ctx);
        r.record(Processor::Policy, outcomes);
    }
}

fn timer<'a>(
    state: &'a mut CustomerState,
    customer_id: &'a str,
    id: String,
    ctx: &Ctx<'a>,
    out: &'a mut Vec<Decision>,
) -> Recorder<'a> {
    let first = out.len();
    Recorder {
        state,
        customer_id,
        input_event_id: id.into(),
        input_ref: "timer",
        now: ctx.now,
        policy_version: &ctx.topology.policy.version,
        out,
        first,
    }
}

/// Fires the customer's timers that are due at stream time `ctx.now`: deferred messages to
/// decide again, journey steps, and expired holds.
pub fn tick(state: &mut CustomerState, customer_id: &str, ctx: &Ctx) -> Vec<Decision> {
    let mut out = Vec::new();
    let due: Vec<MessageDeferred> = state
        .deferred
        .values()
        .filter(|d| d.deferred_until <= ctx.now)
        .cloned()
        .collect();
    for deferral in due {
        let outcomes = policy::decide_deferred(state, &deferral, ctx);
        let id = format!(
            "timer:deferral:{}:{}",
            deferral.planned.message_id, deferral.deferred_until
        );
        timer(state, customer_id, id, ctx, &mut out).record(Processor::Policy, outcomes);
    }
    while let Some(slot) = journey::next_due_step(state, ctx.now) {
        // Instance (entry event) and step name the timer, so a re-entered journey's steps get
        // decision ids of their own.
        let (entry, steps) = state.journeys.get(&slot).map_or((String::new(), 0), |i| {
            (i.trigger_event_id.clone(), i.steps_taken)
        });
        let outcomes = journey::take_step(state, customer_id, &slot, ctx);
        if outcomes.is_empty() {
            break;
        }
        timer(
            state,
            customer_id,
            format!("timer:journey:{slot}:{entry}:{steps}"),
            ctx,
            &mut out,
        )
        .record(Processor::Policy, outcomes);
    }
    for outcome in ordering::expire(state, ctx) {
        let Outcome::HoldExpired(h) = &outcome else {
            continue;
        };
        timer(
            state,
            customer_id,
            format!("timer:hold:{}", h.event_id),
            ctx,
            &mut out,
        )
        .record(Processor::OrderingGuard, vec![outcome]);
    }
    out
}

/// Rebuilds a customer's state from their decisions.
pub fn fold<'a>(decisions: impl IntoIterator<Item = &'a Decision>) -> CustomerState {
    let mut s = CustomerState::default();
    for d in decisions {
        evolve(&mut s, d);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sequence_number_is_written_as_its_decimal_digits() {
        for n in [0, 7, 10, 99, 12_345, usize::MAX] {
            let mut buf = [0u8; 20];
            assert_eq!(decimal(n, &mut buf), n.to_string());
        }
    }

    #[test]
    fn ids_are_stable_across_releases() {
        // Decision and message ids are in the log and in the provider's callback data: a
        // change here would make dispatch resend every message it has already sent.
        assert_eq!(
            deterministic_id(&["cust-1", "order_updates", "o-6", "o1", "0"]),
            "d3b1f32f76f92049f5dff413e4d5ba68"
        );
        assert_ne!(
            deterministic_id(&["ab", "c"]),
            deterministic_id(&["a", "bc"])
        );
    }
}
