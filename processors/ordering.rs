//! Ordering guard: facts about one order are applied in causal order. A shipment that arrives
//! before its order's payment is held, released when the payment arrives, or expires.

use crate::events::*;
use crate::pipeline::Ctx;
use crate::state::CustomerState;

/// Decides what the guard does with an accepted fact: hold it, release earlier holds, or
/// nothing (the fact applies as it is).
pub fn decide(state: &CustomerState, input: &InputEvent, ctx: &Ctx) -> Vec<Outcome> {
    let mut out = expire(state, ctx);
    match &input.fact {
        Fact::ShipmentDispatched(s) => {
            let paid = state.orders.get(&s.order_id).is_some_and(|o| o.paid);
            if !paid {
                out.push(Outcome::ShipmentHeld(ShipmentHeld {
                    event_id: input.envelope.event_id.clone(),
                    shipment: s.clone(),
                    expires_at: input.envelope.occurred_at.max(ctx.now)
                        + ctx.topology.policy.payment_hold_timeout_hours * 3_600_000,
                }));
            }
        }
        Fact::PaymentCaptured(p) => {
            for (event_id, held) in &state.held {
                let already_expired = held.expires_at <= ctx.now;
                if held.shipment.order_id == p.order_id && !already_expired {
                    out.push(Outcome::ShipmentReleased(ShipmentReleased {
                        event_id: event_id.clone(),
                        order_id: p.order_id.clone(),
                    }));
                }
            }
        }
        _ => {}
    }
    out
}

/// Holds whose timeout has passed at stream time `ctx.now`; also run on the shell's tick.
pub fn expire(state: &CustomerState, ctx: &Ctx) -> Vec<Outcome> {
    state
        .held
        .iter()
        .filter(|(_, h)| h.expires_at <= ctx.now)
        .map(|(event_id, h)| {
            Outcome::HoldExpired(HoldExpired {
                event_id: event_id.clone(),
                order_id: h.shipment.order_id.clone(),
            })
        })
        .collect()
}

/// Whether the guard held this input instead of letting it apply now.
pub fn held_now(outcomes: &[Outcome], event_id: &str) -> bool {
    outcomes
        .iter()
        .any(|o| matches!(o, Outcome::ShipmentHeld(h) if h.event_id == event_id))
}
