//! A journey's guards: whether one of its messages may go now (the order still stands, the
//! cart's items are in stock), and the fact its variables render from. Policy asks these before
//! approving a journey message; they import nothing of policy or of the journey machine.

use crate::context::Ctx;
use crate::events::*;
use crate::sorted_map::SortedMap;
use crate::state::{journey_slot, CustomerState, HOUR_MS as HOUR};
use crate::tables::Stock;
use crate::topology::{Guard, JourneyKey};

/// `relied_on` key of a held message's subject fact (JSON), rendered once its locale is known.
pub const SUBJECT_FACT: &str = "subject_fact";

/// What a journey's guards say about sending one of its messages now.
#[derive(Debug, Clone, PartialEq)]
pub enum Check {
    /// Go ahead; the facts the guards relied on, by name.
    Clear(SortedMap<String, String>),
    /// Hold: the signal a guard needs is ambiguous.
    Hold(DeferralReason),
    /// Do not send: a suppression (its message fields are filled in by policy), and maybe the
    /// journey's end.
    End(Vec<Outcome>),
}

fn guard_refusal(reason: SuppressionReason, detail: String) -> Outcome {
    Outcome::MessageSuppressed(MessageSuppressed {
        message_id: None,
        trigger_event_id: String::new(),
        template_name: String::new(),
        purpose: Purpose::Transactional,
        reason,
        detail,
    })
}

/// Checks a journey's guards for instance `key`.
pub fn check(state: &CustomerState, name: &str, key: &str, ctx: &Ctx) -> Check {
    let Some(journey) = ctx.topology.journey(name) else {
        return Check::Clear(SortedMap::new());
    };
    let mut relied_on = SortedMap::new();
    if journey.key == JourneyKey::Order {
        match state.orders.get(key) {
            Some(o) if o.cancelled => {
                return Check::End(vec![guard_refusal(
                    SuppressionReason::OrderCancelled,
                    format!("order {key} was cancelled"),
                )])
            }
            Some(o) if o.placed => {}
            _ => return Check::Hold(DeferralReason::MissingOrderFacts),
        }
    }
    for guard in &journey.guards {
        match guard {
            Guard::CartInStock => {
                let Some(cart) = state.carts.get(key) else {
                    return Check::End(vec![guard_refusal(
                        SuppressionReason::JourneyExited,
                        format!("cart {key} is no longer open"),
                    )]);
                };
                let fresh_since = ctx.now - ctx.topology.policy.inventory_max_age_hours * HOUR;
                for item in &cart.items {
                    match ctx.tables.stock(&item.sku, fresh_since) {
                        Stock::InStock(n) => {
                            relied_on.insert(format!("stock.{}", item.sku), n.to_string());
                        }
                        Stock::OutOfStock => {
                            let mut end = vec![guard_refusal(
                                SuppressionReason::OutOfStock,
                                format!("{} ({}) is out of stock", item.name, item.sku),
                            )];
                            if state.journeys.contains_key(&journey_slot(name, key)) {
                                end.push(Outcome::JourneyExited(JourneyExited {
                                    journey: name.to_string(),
                                    journey_key: key.to_string(),
                                    reason: "OUT_OF_STOCK".into(),
                                    cause_event_id: format!("stock:{}", item.sku),
                                }));
                            }
                            return Check::End(end);
                        }
                        Stock::Unknown => return Check::Hold(DeferralReason::StaleInventory),
                    }
                }
            }
        }
    }
    Check::Clear(relied_on)
}

/// The fact a journey message renders its variables from: the one kept with a held message,
/// else rebuilt from state by instance key.
pub fn subject_fact(state: &CustomerState, planned: &MessageApproved, ctx: &Ctx) -> Option<Fact> {
    if let Some(kept) = planned.relied_on.get(SUBJECT_FACT) {
        if let Ok(fact) = serde_json::from_str(kept) {
            return Some(fact);
        }
    }
    let journey = ctx.topology.journey(planned.journey.as_deref()?)?;
    let key = planned.relied_on.get("journey_key")?;
    rebuild_fact(state, journey.key, key)
}

/// The fact a journey instance is about, rebuilt from state by its key.
pub fn rebuild_fact(state: &CustomerState, kind: JourneyKey, key: &str) -> Option<Fact> {
    match kind {
        JourneyKey::Customer => None,
        JourneyKey::Cart => state.carts.get(key).map(|c| {
            Fact::CartAbandoned(CartAbandoned {
                cart_id: key.to_string(),
                items: c.items.clone(),
                total: c.total.clone(),
            })
        }),
        JourneyKey::Subscription => state.subscriptions.get(key).map(|s| {
            Fact::SubscriptionRenewalDue(SubscriptionRenewalDue {
                subscription_id: key.to_string(),
                due_at: s.due_at,
                amount: s.amount.clone(),
            })
        }),
        JourneyKey::Order => state.orders.get(key).map(|o| {
            Fact::OrderPlaced(OrderPlaced {
                order_id: key.to_string(),
                items: vec![],
                total: o.total.clone(),
            })
        }),
    }
}
