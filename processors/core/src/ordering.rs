//! Ordering guard: facts about one order are applied in causal order. A shipment that arrives
//! before its order's payment is held, released when the payment arrives, or expires.

use crate::context::Ctx;
use crate::events::*;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::OrderFacts;
    use crate::topology::Topology;

    fn shipment(order: &str) -> InputEvent {
        InputEvent {
            envelope: Envelope {
                event_id: format!("ship-{order}"),
                source_system: "oms".into(),
                source_sequence: None,
                occurred_at: 10,
                customer_id: "c".into(),
                trace_parent: None,
                schema_version: 1,
            },
            fact: Fact::ShipmentDispatched(ShipmentDispatched {
                order_id: order.into(),
                shipment_id: "s".into(),
                carrier: "DHL".into(),
                tracking_url: None,
                skus: vec![],
                estimated_delivery: None,
            }),
        }
    }

    #[test]
    fn an_unpaid_shipment_is_held_and_a_paid_one_is_not() {
        let topology = Topology::embedded().unwrap();
        let tables = crate::tables::Tables::default();
        let ctx = Ctx {
            now: 10,
            topology: &topology,
            tables: &tables,
            input_ref: "r",
        };
        let mut state = CustomerState::default();
        let held = decide(&state, &shipment("o-1"), &ctx);
        assert!(held_now(&held, "ship-o-1"));
        if let Outcome::ShipmentHeld(h) = &held[0] {
            assert_eq!(
                h.expires_at,
                10 + topology.policy.payment_hold_timeout_hours * 3_600_000
            );
        }
        state.orders.insert(
            "o-2".into(),
            OrderFacts {
                paid: true,
                ..Default::default()
            },
        );
        assert!(decide(&state, &shipment("o-2"), &ctx).is_empty());
    }
}
