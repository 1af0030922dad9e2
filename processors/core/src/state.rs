//! Per-customer state and its fold. `evolve` only applies what a decision says; every rule that
//! produced the decision lives in the processors.

use crate::events::*;
use crate::sorted_map::SortedMap;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::sync::Arc;

/// One hour in milliseconds.
pub const HOUR_MS: Millis = 3_600_000;
/// How long approved messages are kept in state for frequency caps and channel fallback; no
/// cap window may be longer.
pub const RECENT_SENDS_KEPT_MS: Millis = 35 * 24 * HOUR_MS;

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
    #[serde(default)]
    pub email: Option<String>,
}

/// One shipment of an order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentFacts {
    pub skus: Vec<String>,
    pub delivered: bool,
}

/// What Herald knows of one order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderFacts {
    pub placed: bool,
    pub paid: bool,
    pub cancelled: bool,
    pub total: Option<Money>,
    /// SKUs ordered.
    #[serde(default)]
    pub skus: Vec<String>,
    /// Shipments by id: a split order has several.
    #[serde(default)]
    pub shipments: SortedMap<String, ShipmentFacts>,
    /// Refunded so far, in minor units of the order's currency.
    #[serde(default)]
    pub refunded_minor_units: i64,
}

impl OrderFacts {
    /// Ordered SKUs that no shipment has carried yet.
    pub fn unshipped(&self) -> Vec<&str> {
        self.skus
            .iter()
            .filter(|sku| !self.shipments.values().any(|s| s.skus.contains(sku)))
            .map(String::as_str)
            .collect()
    }

    /// Placed and not cancelled, with items still to ship or parcels still on their way.
    pub fn is_open(&self) -> bool {
        self.placed
            && !self.cancelled
            && (!self.unshipped().is_empty() || self.shipments.values().any(|s| !s.delivered))
    }
}

/// An abandoned cart still open.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CartFacts {
    pub items: Vec<LineItem>,
    pub total: Option<Money>,
}

/// A subscription's next renewal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionFacts {
    pub due_at: Millis,
    pub amount: Money,
}

/// A message approved recently: frequency caps count these, channel fallback re-plans them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentSend {
    pub approved_at: Millis,
    /// The approval decision's own message, shared rather than copied.
    pub message: Arc<MessageApproved>,
    /// The furthest delivery status the provider reported; statuses arrive out of order and
    /// repeated, and never move it back (read is not followed by delivered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<MessageStatus>,
}

/// How far along a status is: a later report of an earlier status changes nothing.
fn status_rank(s: MessageStatus) -> u8 {
    match s {
        MessageStatus::Sent => 1,
        MessageStatus::Delivered => 2,
        // Read and failed both end a message's story; neither replaces the other.
        MessageStatus::Read | MessageStatus::Failed => 3,
    }
}

/// The first fact accepted with a business identity: what a later repeat is named after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptedFact {
    pub event_id: String,
    /// Stream time when it was accepted; it leaves the window with the ids seen then.
    pub first_seen_at: Millis,
}

/// The `relied_on` entry of an approved message naming the subject it announces.
pub const ANNOUNCES: &str = "announces";

/// One running journey instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JourneyInstance {
    pub journey: String,
    pub key: String,
    pub trigger_event_id: String,
    pub entered_at: Millis,
    pub steps_taken: i32,
    pub next_step_due: Option<Millis>,
}

/// The state map key of a journey instance.
pub fn journey_slot(journey: &str, key: &str) -> String {
    format!("{journey}/{key}")
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
    pub seen: SortedMap<String, Millis>,
    /// The business identities (`business_identity`) of the facts accepted in the dedupe
    /// window, by key: a fact with the same subject and news under a new event id repeats one.
    #[serde(default)]
    pub identities: SortedMap<String, AcceptedFact>,
    /// Latest consent per purpose and channel, kept sorted by (purpose, channel).
    pub consent: Vec<ConsentEntry>,
    pub profile: Profile,
    pub orders: SortedMap<String, OrderFacts>,
    /// Held shipment facts by event id.
    pub held: SortedMap<String, HeldShipment>,
    /// Messages approved so far (deterministic ids).
    pub approved: BTreeSet<String>,
    /// The subjects (journey, fact identity and news) approved messages were about: one
    /// shipment, delay, delivery or refund is announced once per distinct news.
    #[serde(default)]
    pub announced: BTreeSet<String>,
    /// Messages deferred by policy and not yet decided again, by message id.
    #[serde(default)]
    pub deferred: SortedMap<String, MessageDeferred>,
    /// Set once an erasure request was applied.
    pub erased: bool,
    #[serde(default)]
    pub carts: SortedMap<String, CartFacts>,
    #[serde(default)]
    pub subscriptions: SortedMap<String, SubscriptionFacts>,
    /// When the customer last wrote to the brand: opens the customer service window.
    #[serde(default)]
    pub last_inbound_at: Option<Millis>,
    /// Messages approved in the last `RECENT_SENDS_KEPT_MS`, by message id.
    #[serde(default)]
    pub recent: SortedMap<String, RecentSend>,
    /// Running journey instances, by `journey/key`.
    #[serde(default)]
    pub journeys: SortedMap<String, JourneyInstance>,
    /// The last link of the consent hash chain, which the next consent change extends.
    #[serde(default)]
    pub consent_chain_head: Option<String>,
    /// When the latest erasure request was made; facts from before it stay out of state.
    #[serde(default)]
    pub erased_at: Option<Millis>,
    /// The latest provider refusal saying the customer turned marketing off (lifted by a
    /// later marketing consent).
    #[serde(default)]
    pub marketing_turned_off: Option<MarketingStopped>,
    /// The latest provider refusal pausing marketing to the customer until a given time.
    #[serde(default)]
    pub marketing_paused: Option<MarketingStopped>,
}

impl CustomerState {
    /// The earliest instant a timer of this customer is due: a hold expiring, a deferred
    /// message to decide again, or a journey step.
    pub fn next_timer(&self) -> Option<Millis> {
        let holds = self.held.values().map(|h| h.expires_at);
        let deferrals = self.deferred.values().map(|d| d.deferred_until);
        let steps = self.journeys.values().filter_map(|j| j.next_step_due);
        holds.chain(deferrals).chain(steps).min()
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
                o.skus = f.items.iter().map(|i| i.sku.clone()).collect();
            }
            Fact::ShipmentDispatched(f) => {
                let o = self.orders.entry(f.order_id.clone()).or_default();
                o.shipments.entry(f.shipment_id.clone()).or_default().skus = f.skus.clone();
            }
            Fact::ShipmentDelivered(f) => {
                let o = self.orders.entry(f.order_id.clone()).or_default();
                o.shipments
                    .entry(f.shipment_id.clone())
                    .or_default()
                    .delivered = true;
            }
            Fact::RefundIssued(f) => {
                self.orders
                    .entry(f.order_id.clone())
                    .or_default()
                    .refunded_minor_units += f.amount.minor_units;
            }
            Fact::CartAbandoned(f) => {
                self.carts.insert(
                    f.cart_id.clone(),
                    CartFacts {
                        items: f.items.clone(),
                        total: f.total.clone(),
                    },
                );
            }
            Fact::CartRecovered(f) => {
                self.carts.remove(&f.cart_id);
            }
            Fact::SubscriptionRenewalDue(f) => {
                self.subscriptions.insert(
                    f.subscription_id.clone(),
                    SubscriptionFacts {
                        due_at: f.due_at,
                        amount: f.amount.clone(),
                    },
                );
            }
            Fact::SubscriptionRenewed(f) => {
                self.subscriptions.remove(&f.subscription_id);
            }
            Fact::MessageStatusChanged(st) => {
                if let Some(sent) = st.message_id.as_ref().and_then(|m| self.recent.get_mut(m)) {
                    if sent
                        .status
                        .is_none_or(|now| status_rank(st.status) > status_rank(now))
                    {
                        sent.status = Some(st.status);
                    }
                }
            }
            Fact::InboundMessageReceived(_) => {
                self.last_inbound_at = Some(self.last_inbound_at.map_or(at, |t| t.max(at)));
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
                merge(&mut self.profile.email, &p.email);
            }
            Fact::ErasureRequested(_) => {
                let seen = std::mem::take(&mut self.seen);
                let erased_at = Some(self.erased_at.unwrap_or(at).max(at));
                // The consent chain goes on across an erasure, so an audit can still tell
                // that no record was removed.
                let consent_chain_head = self.consent_chain_head.take();
                *self = CustomerState {
                    seen,
                    consent_chain_head,
                    erased_at,
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
    if let Some(link) = &decision.consent_chain {
        state.consent_chain_head = Some(link.clone());
    }
    match &decision.outcome {
        Outcome::EventAccepted(a) => {
            state
                .seen
                .insert(a.envelope.event_id.clone(), decision.decided_at);
            state.seen.retain(|_, at| *at >= a.forget_before);
            state.apply_fact(&a.fact, a.envelope.occurred_at);
            // After the fact: an erasure keeps its own identity (it names no one), so that
            // the same request re-emitted later is recognised.
            if let Some(key) = &a.identity_key {
                state.identities.insert(
                    key.clone(),
                    AcceptedFact {
                        event_id: a.envelope.event_id.clone(),
                        first_seen_at: decision.decided_at,
                    },
                );
            }
            state
                .identities
                .retain(|_, f| f.first_seen_at >= a.forget_before);
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
            if let Some(subject) = m.relied_on.get(ANNOUNCES) {
                state.announced.insert(subject.clone());
            }
            state.deferred.remove(&m.message_id);
            let horizon = decision.decided_at - RECENT_SENDS_KEPT_MS;
            state.recent.retain(|_, r| r.approved_at >= horizon);
            state.recent.insert(
                m.message_id.clone(),
                RecentSend {
                    approved_at: decision.decided_at,
                    message: m.clone(),
                    status: None,
                },
            );
        }
        Outcome::MessageDeferred(d) => {
            state
                .deferred
                .insert(d.planned.message_id.clone(), d.clone());
        }
        Outcome::MessageSuppressed(m) => match &m.message_id {
            Some(id) => {
                state.deferred.remove(id);
            }
            None => state.deferred.retain(|_, d| {
                d.planned.trigger_event_id != m.trigger_event_id
                    || d.planned.template_name != m.template_name
            }),
        },
        Outcome::MarketingStopped(m) => {
            let slot = match m.resumes_at {
                None => &mut state.marketing_turned_off,
                Some(_) => &mut state.marketing_paused,
            };
            *slot = Some(m.clone());
        }
        Outcome::OptedOut(o) => {
            for purpose in &o.purposes {
                state.set_consent(ConsentEntry {
                    purpose: *purpose,
                    channel: o.channel,
                    granted: false,
                    source: format!("inbound keyword {}", o.keyword),
                    artifact_id: o.provider_message_id.clone(),
                    changed_at: o.received_at,
                });
            }
        }
        Outcome::JourneyEntered(j) => {
            state.journeys.insert(
                journey_slot(&j.journey, &j.journey_key),
                JourneyInstance {
                    journey: j.journey.clone(),
                    key: j.journey_key.clone(),
                    trigger_event_id: j.trigger_event_id.clone(),
                    entered_at: j.entered_at,
                    steps_taken: 0,
                    next_step_due: j.next_step_due,
                },
            );
        }
        Outcome::JourneyAdvanced(j) => {
            if let Some(i) = state
                .journeys
                .get_mut(&journey_slot(&j.journey, &j.journey_key))
            {
                i.steps_taken = j.steps_taken;
                i.next_step_due = j.next_step_due;
            }
        }
        Outcome::JourneyExited(j) => {
            state
                .journeys
                .remove(&journey_slot(&j.journey, &j.journey_key));
        }
        Outcome::DuplicateIgnored(_)
        | Outcome::PreErasureFactIgnored(_)
        | Outcome::MessageHeldOut(_)
        | Outcome::EscalationRaised(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_status_never_moves_back() {
        let mut state = CustomerState::default();
        let message: MessageApproved = serde_json::from_value(serde_json::json!({
            "message_id": "m-1", "trigger_event_id": "e-1", "template_name": "t",
            "template_version": 1, "locale": "en_US", "purpose": "TRANSACTIONAL",
            "channel": "WHATSAPP", "recipient": "hk1:00", "variables": {},
            "consent_artifact_id": "a", "consent_granted_at": 0, "category": "UTILITY",
            "delivery": "TEMPLATE", "journey": null, "relied_on": {}
        }))
        .unwrap();
        state.recent.insert(
            "m-1".into(),
            RecentSend {
                approved_at: 0,
                message: message.into(),
                status: None,
            },
        );
        let report = |state: &mut CustomerState, status| {
            state.apply_fact(
                &Fact::MessageStatusChanged(MessageStatusChanged {
                    provider_message_id: "wamid.1".into(),
                    status,
                    error_code: None,
                    message_id: Some("m-1".into()),
                }),
                0,
            )
        };
        // Reordered and repeated, as webhooks arrive: read first, then delivered, then sent.
        for s in [
            MessageStatus::Read,
            MessageStatus::Delivered,
            MessageStatus::Sent,
            MessageStatus::Read,
        ] {
            report(&mut state, s);
            assert_eq!(state.recent["m-1"].status, Some(MessageStatus::Read));
        }
    }
}
