//! Per-customer state and its fold. `evolve` only applies what a decision says; every rule that
//! produced the decision lives in the processors.

use crate::events::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The consent a customer gave or withdrew for one purpose on one channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsentEntry {
    pub purpose: Purpose,
    pub channel: Channel,
    pub granted: bool,
    pub source: String,
    pub artifact_id: String,
    pub changed_at: Millis,
}

/// What Herald knows of the customer's contact details and preferences.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    pub first_name: Option<String>,
    pub locale: Option<String>,
    pub time_zone: Option<String>,
    pub phone_e164: Option<String>,
}

/// What Herald knows of one order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderFacts {
    pub placed: bool,
    pub paid: bool,
    pub cancelled: bool,
    pub total: Option<Money>,
}

/// A shipment fact held by the ordering guard until its order is paid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldShipment {
    pub envelope_occurred_at: Millis,
    pub shipment: ShipmentDispatched,
    pub expires_at: Millis,
}

/// Everything Herald knows about one customer: the fold of their decisions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerState {
    /// Dedupe window: accepted event id -> stream time when it was accepted. The window counts
    /// from when Herald saw the id, not from when the fact occurred: a late fact is still
    /// remembered for the whole window.
    pub seen: BTreeMap<String, Millis>,
    /// Latest consent per purpose and channel, kept sorted by (purpose, channel).
    pub consent: Vec<ConsentEntry>,
    pub profile: Profile,
    pub orders: BTreeMap<String, OrderFacts>,
    /// Held shipment facts by event id.
    pub held: BTreeMap<String, HeldShipment>,
    /// Messages approved so far (deterministic ids).
    pub approved: BTreeSet<String>,
    /// Messages deferred by policy and not yet decided again, by message id.
    #[serde(default)]
    pub deferred: BTreeMap<String, MessageDeferred>,
    /// Set once an erasure request was applied.
    pub erased: bool,
}

impl CustomerState {
    /// The earliest instant a timer of this customer is due: a hold expiring or a deferred
    /// message to decide again.
    pub fn next_timer(&self) -> Option<Millis> {
        let holds = self.held.values().map(|h| h.expires_at);
        let deferrals = self.deferred.values().map(|d| d.deferred_until);
        holds.chain(deferrals).min()
    }

    /// The consent currently recorded for a purpose and channel.
    pub fn consent_for(&self, purpose: Purpose, channel: Channel) -> Option<&ConsentEntry> {
        self.consent
            .iter()
            .find(|c| c.purpose == purpose && c.channel == channel)
    }

    /// Keeps the consent change that happened last, whatever order the changes arrived in: a
    /// grant delivered late never overrides a newer revocation. At the same instant a
    /// revocation wins, because an ambiguous signal must not lead to a send.
    fn set_consent(&mut self, entry: ConsentEntry) {
        match self
            .consent
            .binary_search_by(|c| (c.purpose, c.channel).cmp(&(entry.purpose, entry.channel)))
        {
            Ok(i) => {
                let current = &self.consent[i];
                if (entry.changed_at, !entry.granted) >= (current.changed_at, !current.granted) {
                    self.consent[i] = entry;
                }
            }
            Err(i) => self.consent.insert(i, entry),
        }
    }

    fn apply_fact(&mut self, fact: &Fact, at: Millis) {
        match fact {
            Fact::OrderPlaced(f) => {
                let o = self.orders.entry(f.order_id.clone()).or_default();
                o.placed = true;
                o.total = f.total.clone();
            }
            Fact::PaymentCaptured(f) => {
                self.orders.entry(f.order_id.clone()).or_default().paid = true;
            }
            Fact::OrderCancelled(f) => {
                self.orders.entry(f.order_id.clone()).or_default().cancelled = true;
            }
            Fact::ConsentGranted(c) | Fact::ConsentRevoked(c) => self.set_consent(ConsentEntry {
                purpose: c.purpose,
                channel: c.channel,
                granted: matches!(fact, Fact::ConsentGranted(_)),
                source: c.source.clone(),
                artifact_id: c.artifact_id.clone(),
                changed_at: at,
            }),
            Fact::ProfileChanged(p) => {
                let merge = |slot: &mut Option<String>, v: &Option<String>| {
                    if v.is_some() {
                        slot.clone_from(v);
                    }
                };
                merge(&mut self.profile.first_name, &p.first_name);
                merge(&mut self.profile.locale, &p.locale);
                merge(&mut self.profile.time_zone, &p.time_zone);
                merge(&mut self.profile.phone_e164, &p.phone_e164);
            }
            Fact::ErasureRequested(_) => {
                let seen = std::mem::take(&mut self.seen);
                *self = CustomerState {
                    seen,
                    erased: true,
                    ..CustomerState::default()
                };
            }
            _ => {}
        }
    }
}

/// Folds one decision into the customer's state.
pub fn evolve(state: &mut CustomerState, decision: &Decision) {
    match &decision.outcome {
        Outcome::EventAccepted(a) => {
            state
                .seen
                .insert(a.envelope.event_id.clone(), decision.decided_at);
            state.seen.retain(|_, at| *at >= a.forget_before);
            state.apply_fact(&a.fact, a.envelope.occurred_at);
        }
        Outcome::ShipmentHeld(h) => {
            state.held.insert(
                h.event_id.clone(),
                HeldShipment {
                    envelope_occurred_at: decision.decided_at,
                    shipment: h.shipment.clone(),
                    expires_at: h.expires_at,
                },
            );
        }
        Outcome::ShipmentReleased(ShipmentReleased { event_id, .. })
        | Outcome::HoldExpired(HoldExpired { event_id, .. }) => {
            state.held.remove(event_id);
        }
        Outcome::MessageApproved(m) => {
            state.approved.insert(m.message_id.clone());
            state.deferred.remove(&m.message_id);
        }
        Outcome::MessageDeferred(d) => {
            state
                .deferred
                .insert(d.planned.message_id.clone(), d.clone());
        }
        Outcome::MessageSuppressed(m) => {
            state.deferred.retain(|_, d| {
                d.planned.trigger_event_id != m.trigger_event_id
                    || d.planned.template_name != m.template_name
            });
        }
        Outcome::DuplicateIgnored(_) => {}
    }
}
