//! Journeys: state machines declared in `topology/journeys/*.toml`. An entry fact starts an
//! instance (one per order, cart, subscription or customer) unless the customer is in the
//! holdout cohort; timed steps come due in event time; reactions answer facts about a running
//! instance; exit facts end it, and with it every message it still had waiting. Each message a
//! journey asks for is decided by policy. Pure: state, fact, context in; decisions out.

use crate::business_identity;
use crate::context::{deterministic_id, Ctx};
use crate::events::*;
use crate::journey_guard;
use crate::policy::{self, Request, Trigger};
use crate::state::{journey_slot, CustomerState, HOUR_MS as HOUR};
use crate::topology::{Journey, JourneyKey};
use sha2::{Digest, Sha256};

/// The instance key a fact addresses for a journey keyed by `kind`, if it carries one.
pub fn key_of(kind: JourneyKey, fact: &Fact, customer_id: &str) -> Option<String> {
    match (kind, fact) {
        (JourneyKey::Customer, _) => Some(customer_id.to_string()),
        (JourneyKey::Order, f) => f.order_id().map(str::to_string),
        (JourneyKey::Cart, Fact::CartAbandoned(c)) => Some(c.cart_id.clone()),
        (JourneyKey::Cart, Fact::CartRecovered(c)) => Some(c.cart_id.clone()),
        (JourneyKey::Subscription, Fact::SubscriptionRenewalDue(s)) => {
            Some(s.subscription_id.clone())
        }
        (JourneyKey::Subscription, Fact::SubscriptionRenewed(s)) => Some(s.subscription_id.clone()),
        _ => None,
    }
}

/// Whether a customer is in a journey's holdout cohort: a stable hash of customer and journey,
/// so the same customer is always in or out of the same journey, independently per journey.
pub fn in_holdout(customer_id: &str, journey: &Journey) -> bool {
    if journey.holdout_percent <= 0.0 {
        return false;
    }
    let digest = Sha256::new()
        .chain_update(customer_id.as_bytes())
        .chain_update([0x1f])
        .chain_update(journey.name.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let bucket = u64::from_be_bytes(first) % 10_000;
    (bucket as f64) < journey.holdout_percent * 100.0
}

/// When the `n`-th timed step is due, given when the one before was (or the entry).
fn step_due(
    journey: &Journey,
    n: usize,
    previous: Millis,
    state: &CustomerState,
    key: &str,
) -> Option<Millis> {
    let (step, after) = journey.step_at(n)?;
    let due = match (step.before_due_hours, state.subscriptions.get(key)) {
        (Some(h), Some(s)) => s.due_at - (h * HOUR as f64) as Millis,
        _ => previous + (after * HOUR as f64) as Millis,
    };
    // A step whose moment passed before the journey got there is due at once.
    Some(due.max(previous))
}

/// Whether a fact covers only part of its order: a shipment that leaves items behind, a
/// delivery with parcels still on their way, a partial refund.
fn is_partial(state: &CustomerState, fact: &Fact) -> bool {
    let order = fact.order_id().and_then(|id| state.orders.get(id));
    match (fact, order) {
        (Fact::ShipmentDispatched(_), Some(o)) => !o.unshipped().is_empty(),
        (Fact::ShipmentDelivered(_), Some(o)) => {
            !o.unshipped().is_empty() || o.shipments.values().any(|s| !s.delivered)
        }
        (Fact::RefundIssued(r), _) => r.partial,
        _ => false,
    }
}

/// Ends instances of a journey and drops the messages they still had waiting.
fn exit(
    state: &CustomerState,
    journey: &Journey,
    keys: Vec<String>,
    reason: &str,
    cause: &str,
) -> Vec<Outcome> {
    let mut out = Vec::new();
    for key in keys {
        for d in state.deferred.values().filter(|d| {
            d.planned.journey.as_deref() == Some(&journey.name)
                && d.planned.relied_on.get("journey_key") == Some(&key)
        }) {
            let p = &d.planned;
            out.push(Outcome::MessageSuppressed(MessageSuppressed {
                message_id: Some(p.message_id.clone()),
                trigger_event_id: p.trigger_event_id.clone(),
                template_name: p.template_name.clone(),
                purpose: p.purpose,
                reason: SuppressionReason::JourneyExited,
                detail: format!("{} ended by {reason}", journey.name),
            }));
        }
        out.push(Outcome::JourneyExited(JourneyExited {
            journey: journey.name.clone(),
            journey_key: key,
            reason: reason.to_string(),
            cause_event_id: cause.to_string(),
        }));
    }
    out
}

/// What one accepted fact does to one journey: exits, an entry (or a holdout), reactions.
pub fn on_fact(
    state: &CustomerState,
    customer_id: &str,
    journey: &Journey,
    trigger: &Trigger,
    ctx: &Ctx,
) -> Vec<Outcome> {
    let kind = trigger.fact.kind();
    // Most facts concern few journeys; this keeps the others from building keys for nothing.
    if !journey.listens_to(kind) {
        return vec![];
    }
    let own_key = key_of(journey.key, trigger.fact, customer_id);
    let running = |key: &str| {
        state
            .journeys
            .contains_key(&journey_slot(&journey.name, key))
    };
    if journey.exit_on.iter().any(|f| f == kind) {
        // A fact with this journey's kind of key ends that instance; any other ends them all.
        let keys: Vec<String> = state
            .journeys
            .values()
            .filter(|i| i.journey == journey.name)
            .filter(|i| own_key.as_ref().is_none_or(|k| *k == i.key))
            .map(|i| i.key.clone())
            .collect();
        return exit(state, journey, keys, kind, trigger.event_id);
    }
    let mut out = Vec::new();
    if journey.entry == kind {
        if let Some(key) = own_key.as_deref().filter(|k| !running(k)) {
            if in_holdout(customer_id, journey) {
                out.push(Outcome::MessageHeldOut(MessageHeldOut {
                    journey: journey.name.clone(),
                    journey_key: key.to_string(),
                    trigger_event_id: trigger.event_id.to_string(),
                    holdout_percent: journey.holdout_percent.round() as i32,
                }));
            } else {
                out.push(Outcome::JourneyEntered(JourneyEntered {
                    journey: journey.name.clone(),
                    journey_key: key.to_string(),
                    trigger_event_id: trigger.event_id.to_string(),
                    entered_at: trigger.occurred_at,
                    next_step_due: step_due(journey, 0, trigger.occurred_at, state, key),
                }));
            }
        }
        return out;
    }
    let Some(key) = own_key else { return out };
    for reaction in journey.reactions.iter().filter(|r| r.fact == kind) {
        let order_unresolved = journey.key == JourneyKey::Order
            && state
                .orders
                .get(&key)
                .is_none_or(|o| o.cancelled || !o.placed);
        // A finished instance answers nothing more; an order not yet seen is held, not guessed.
        if !running(&key) && !order_unresolved {
            continue;
        }
        let partial = is_partial(state, trigger.fact);
        let template = match (&reaction.partial_template, partial) {
            (Some(p), true) => p.as_str(),
            _ => reaction.template.as_str(),
        };
        // Whichever reaction asks (the full or the partial template), one journey tells of one
        // piece of news once.
        let announces = business_identity::of(trigger.fact, trigger.occurred_at)
            .map(|i| deterministic_id(&["announces", &journey.name, &i.key()]));
        let req = Request {
            message_id: deterministic_id(&[customer_id, trigger.event_id, template]),
            template,
            trigger_event_id: trigger.event_id,
            fact: Some(trigger.fact),
            since: trigger.occurred_at,
            journey: (&journey.name, &key),
            announces,
        };
        out.extend(policy::decide_message(state, &req, ctx));
        if kind == "ShipmentDelivered" && !partial && running(&key) {
            out.push(Outcome::JourneyExited(JourneyExited {
                journey: journey.name.clone(),
                journey_key: key.clone(),
                reason: "COMPLETED".into(),
                cause_event_id: trigger.event_id.to_string(),
            }));
        }
    }
    out
}

/// The running instance whose next step is due first at `now`, if any (its state slot).
pub fn next_due_step(state: &CustomerState, now: Millis) -> Option<String> {
    state
        .journeys
        .iter()
        .filter_map(|(slot, i)| i.next_step_due.map(|due| (due, slot)))
        .filter(|(due, _)| *due <= now)
        .min()
        .map(|(_, slot)| slot.clone())
}

/// Takes the due step of one instance: its message (decided by policy), then the schedule of
/// the next step, or the journey's end.
pub fn take_step(state: &CustomerState, customer_id: &str, slot: &str, ctx: &Ctx) -> Vec<Outcome> {
    let Some(inst) = state.journeys.get(slot) else {
        return vec![];
    };
    let exited = |reason: &str| {
        Outcome::JourneyExited(JourneyExited {
            journey: inst.journey.clone(),
            journey_key: inst.key.clone(),
            reason: reason.to_string(),
            cause_event_id: format!("timer:journey:{slot}"),
        })
    };
    let Some(journey) = ctx.topology.journey(&inst.journey) else {
        return vec![exited("JOURNEY_REMOVED")];
    };
    let n = inst.steps_taken.max(0) as usize;
    let Some((step, _)) = journey.step_at(n) else {
        return vec![exited("COMPLETED")];
    };
    let due = inst.next_step_due.unwrap_or(ctx.now);
    let fact = journey_guard::rebuild_fact(state, journey.key, &inst.key);
    let req = Request {
        // The entry event names the instance: a journey left and entered again under the same
        // key is a new instance whose messages must not collide with the last one's.
        message_id: deterministic_id(&[
            customer_id,
            &journey.name,
            &inst.key,
            &inst.trigger_event_id,
            &n.to_string(),
        ]),
        template: &step.template,
        trigger_event_id: &inst.trigger_event_id,
        fact: fact.as_ref(),
        since: due,
        journey: (&journey.name, &inst.key),
        announces: None,
    };
    let mut out = policy::decide_message(state, &req, ctx);
    if out.iter().any(|o| matches!(o, Outcome::JourneyExited(_))) {
        return out;
    }
    match step_due(journey, n + 1, due, state, &inst.key) {
        Some(next) => out.push(Outcome::JourneyAdvanced(JourneyAdvanced {
            journey: journey.name.clone(),
            journey_key: inst.key.clone(),
            steps_taken: n as i32 + 1,
            next_step_due: Some(next),
        })),
        // A journey that still answers facts stays until its exit; one that only had steps ends.
        None if !journey.reactions.is_empty() => {
            out.push(Outcome::JourneyAdvanced(JourneyAdvanced {
                journey: journey.name.clone(),
                journey_key: inst.key.clone(),
                steps_taken: n as i32 + 1,
                next_step_due: None,
            }))
        }
        None => out.push(exited("COMPLETED")),
    }
    out
}
