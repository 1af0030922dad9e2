//! The query projection as a reader sees it (`herald state`): a customer's consent by purpose
//! and channel, session window, recent sends by purpose, journeys, orders, and consent history,
//! from what the state store keeps. Pure: the store is read by the shell.

use crate::audit::ConsentEvent;
use crate::dispatch::DispatchState;
use crate::events::{rfc3339, wire_name, Channel, DeferralReason, MessageStatus, Millis, Purpose};
use crate::state::{ConsentEntry, CustomerState, JourneyInstance, HOUR_MS};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;

/// Recent sends of one purpose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SendsByPurpose {
    pub purpose: Purpose,
    pub count: usize,
    pub last_at: Millis,
}

/// One order, with a status in words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OrderSummary {
    pub order_id: String,
    pub status: &'static str,
    pub shipments: usize,
}

/// A customer's projected state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CustomerSummary {
    pub customer_id: String,
    pub partition: i32,
    /// Decisions of the partition before this offset are reflected.
    pub reflects_decisions_before: i64,
    pub erased: bool,
    pub consent: Vec<ConsentEntry>,
    /// When the customer service window closes, if the customer ever wrote in.
    pub session_window_open_until: Option<Millis>,
    pub recent_sends: Vec<SendsByPurpose>,
    pub deferred_messages: usize,
    pub held_shipments: usize,
    pub journeys: Vec<JourneyInstance>,
    pub orders: Vec<OrderSummary>,
    pub consent_history: Vec<ConsentEvent>,
}

/// The summary of a stored state; `session_window_hours` comes from the policy.
pub fn summarise(
    customer_id: &str,
    partition: i32,
    next_offset: i64,
    state: &CustomerState,
    history: Vec<ConsentEvent>,
    session_window_hours: i64,
) -> CustomerSummary {
    let mut sends: BTreeMap<Purpose, (usize, Millis)> = BTreeMap::new();
    for r in state.recent.values() {
        let e = sends.entry(r.message.purpose).or_insert((0, r.approved_at));
        e.0 += 1;
        e.1 = e.1.max(r.approved_at);
    }
    let orders = state
        .orders
        .iter()
        .map(|(id, o)| OrderSummary {
            order_id: id.clone(),
            status: if o.cancelled {
                "cancelled"
            } else if o.is_open() {
                if o.paid {
                    "paid, in fulfilment"
                } else {
                    "placed, unpaid"
                }
            } else if o.placed {
                "fulfilled"
            } else {
                "known from later facts only"
            },
            shipments: o.shipments.len(),
        })
        .collect();
    CustomerSummary {
        customer_id: customer_id.to_string(),
        partition,
        reflects_decisions_before: next_offset,
        erased: state.erased,
        consent: state.consent.clone(),
        session_window_open_until: state
            .last_inbound_at
            .map(|at| at + session_window_hours * HOUR_MS),
        recent_sends: sends
            .into_iter()
            .map(|(purpose, (count, last_at))| SendsByPurpose {
                purpose,
                count,
                last_at,
            })
            .collect(),
        deferred_messages: state.deferred.len(),
        held_shipments: state.held.len(),
        journeys: state.journeys.values().cloned().collect(),
        orders,
        consent_history: history,
    }
}

impl CustomerSummary {
    /// The summary for a reader.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "customer {} (partition {}, state reflects decisions before offset {}){}",
            self.customer_id,
            self.partition,
            self.reflects_decisions_before,
            if self.erased { " ERASED" } else { "" }
        );
        let _ = writeln!(s, "consent by purpose and channel:");
        if self.consent.is_empty() {
            let _ = writeln!(s, "  (none recorded)");
        }
        for c in &self.consent {
            let _ = writeln!(
                s,
                "  {:<14} {:<9} {:<8} since {}  source {}  artifact {}",
                wire_name(&c.purpose),
                wire_name(&c.channel),
                if c.granted { "GRANTED" } else { "REVOKED" },
                rfc3339(c.changed_at),
                c.source,
                c.artifact_id
            );
        }
        let _ = match self.session_window_open_until {
            Some(until) => writeln!(s, "session window: open until {}", rfc3339(until)),
            None => writeln!(s, "session window: never opened"),
        };
        let _ = writeln!(s, "recent sends (kept 35 days):");
        if self.recent_sends.is_empty() {
            let _ = writeln!(s, "  (none)");
        }
        for r in &self.recent_sends {
            let _ = writeln!(
                s,
                "  {:<14} {:>3}, last {}",
                wire_name(&r.purpose),
                r.count,
                rfc3339(r.last_at)
            );
        }
        let _ = writeln!(
            s,
            "waiting: {} deferred messages, {} held shipment notices",
            self.deferred_messages, self.held_shipments
        );
        let _ = writeln!(s, "journeys:");
        if self.journeys.is_empty() {
            let _ = writeln!(s, "  (none running)");
        }
        for j in &self.journeys {
            let _ = writeln!(
                s,
                "  {} [{}] entered {}, {} steps taken, next step {}",
                j.journey,
                j.key,
                rfc3339(j.entered_at),
                j.steps_taken,
                j.next_step_due
                    .map(rfc3339)
                    .unwrap_or_else(|| "none".into())
            );
        }
        let _ = writeln!(s, "orders:");
        if self.orders.is_empty() {
            let _ = writeln!(s, "  (none)");
        }
        for o in &self.orders {
            let _ = writeln!(
                s,
                "  {} {} ({} shipments)",
                o.order_id, o.status, o.shipments
            );
        }
        let _ = writeln!(
            s,
            "consent history ({} records):",
            self.consent_history.len()
        );
        for c in &self.consent_history {
            let purposes: Vec<String> = c.purposes.iter().map(wire_name).collect();
            let _ = writeln!(
                s,
                "  {} {:<8} {}/{}  source {}  artifact {}  decision {}",
                rfc3339(c.at),
                if c.granted { "GRANTED" } else { "REVOKED" },
                purposes.join("+"),
                wire_name(&c.channel),
                c.source,
                c.artifact_id,
                c.decision_id
            );
        }
        s
    }
}

/// A recent approval and the consent grant it relied on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecentReliance {
    pub approved_at: Millis,
    pub message_id: String,
    pub template_name: String,
    pub channel: Channel,
    pub purpose: Purpose,
    pub artifact_id: String,
    pub consent_granted_at: Millis,
}

/// A customer's consent timeline as the store keeps it: every change, and the approvals still
/// in state (the last `RECENT_SENDS_KEPT_MS`) with the grant each relied on. The whole history
/// of reliance is in the decision log (`herald audit consent`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConsentView {
    pub customer_id: String,
    pub changes: Vec<ConsentEvent>,
    pub relied_on_recently: Vec<RecentReliance>,
}

/// The consent view of a stored state and its consent history, approvals oldest first.
pub fn consent_view(
    customer_id: &str,
    state: &CustomerState,
    history: Vec<ConsentEvent>,
) -> ConsentView {
    let mut relied: Vec<RecentReliance> = state
        .recent
        .values()
        .map(|r| RecentReliance {
            approved_at: r.approved_at,
            message_id: r.message.message_id.clone(),
            template_name: r.message.template_name.clone(),
            channel: r.message.channel,
            purpose: r.message.purpose,
            artifact_id: r.message.consent_artifact_id.clone(),
            consent_granted_at: r.message.consent_granted_at,
        })
        .collect();
    relied.sort_by(|a, b| (a.approved_at, &a.message_id).cmp(&(b.approved_at, &b.message_id)));
    ConsentView {
        customer_id: customer_id.to_string(),
        changes: history,
        relied_on_recently: relied,
    }
}

/// What became of a recent approval: its delivery status, and dispatch's record of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecentMessage {
    pub message_id: String,
    pub approved_at: Millis,
    pub template_name: String,
    pub channel: Channel,
    pub purpose: Purpose,
    /// The furthest status the provider reported.
    pub status: Option<MessageStatus>,
    /// The provider's id once it accepted the message.
    pub provider_message_id: Option<String>,
    /// The attempt recorded as intended and not settled yet, if one is.
    pub open_attempt: Option<i32>,
}

/// A message policy deferred, and until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeferredMessage {
    pub message_id: String,
    pub template_name: String,
    pub reason: DeferralReason,
    pub until: Millis,
}

/// A customer's recent messages, newest first, and those waiting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MessagesView {
    pub customer_id: String,
    pub recent: Vec<RecentMessage>,
    pub deferred: Vec<DeferredMessage>,
}

/// The messages view of a stored state and, when dispatch has one, its dispatch state.
pub fn messages_view(
    customer_id: &str,
    state: &CustomerState,
    dispatch: Option<&DispatchState>,
) -> MessagesView {
    let mut recent: Vec<RecentMessage> = state
        .recent
        .iter()
        .map(|(id, r)| RecentMessage {
            message_id: id.clone(),
            approved_at: r.approved_at,
            template_name: r.message.template_name.clone(),
            channel: r.message.channel,
            purpose: r.message.purpose,
            status: r.status,
            provider_message_id: dispatch.and_then(|d| d.sent.get(id).cloned()),
            open_attempt: dispatch.and_then(|d| d.open.get(id).map(|o| o.attempt)),
        })
        .collect();
    recent.sort_by(|a, b| (b.approved_at, &b.message_id).cmp(&(a.approved_at, &a.message_id)));
    let mut deferred: Vec<DeferredMessage> = state
        .deferred
        .iter()
        .map(|(id, d)| DeferredMessage {
            message_id: id.clone(),
            template_name: d.planned.template_name.clone(),
            reason: d.reason,
            until: d.deferred_until,
        })
        .collect();
    deferred.sort_by_key(|d| d.until);
    MessagesView {
        customer_id: customer_id.to_string(),
        recent,
        deferred,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::*;
    use crate::state::RecentSend;

    #[test]
    fn a_summary_reads_consent_window_sends_and_orders_from_state() {
        let mut state = CustomerState {
            last_inbound_at: Some(1_000),
            ..CustomerState::default()
        };
        state.consent.push(ConsentEntry {
            purpose: Purpose::Marketing,
            channel: Channel::Whatsapp,
            granted: true,
            source: "checkout".into(),
            artifact_id: "art-1".into(),
            changed_at: 500,
        });
        state.orders.insert(
            "o-1".into(),
            crate::state::OrderFacts {
                placed: true,
                paid: true,
                skus: vec!["sku".into()],
                ..Default::default()
            },
        );
        let approved = |at: Millis| RecentSend {
            approved_at: at,
            message: std::sync::Arc::new(MessageApproved {
                message_id: format!("m{at}"),
                trigger_event_id: "e".into(),
                template_name: "t".into(),
                template_version: 1,
                locale: "en".into(),
                purpose: Purpose::Marketing,
                channel: Channel::Whatsapp,
                recipient: "r".into(),
                variables: Default::default(),
                consent_artifact_id: "art-1".into(),
                consent_granted_at: 500,
                category: "MARKETING".into(),
                delivery: Default::default(),
                journey: None,
                relied_on: Default::default(),
            }),
            status: None,
        };
        state.recent.insert("m1".into(), approved(2_000));
        state.recent.insert("m2".into(), approved(3_000));
        let s = summarise("c-1", 3, 77, &state, vec![], 24);
        assert_eq!(s.session_window_open_until, Some(1_000 + 24 * HOUR_MS));
        assert_eq!(s.recent_sends[0].count, 2);
        assert_eq!(s.recent_sends[0].last_at, 3_000);
        assert_eq!(s.orders[0].status, "paid, in fulfilment");
        let text = s.render();
        assert!(text.contains("MARKETING      WHATSAPP  GRANTED"), "{text}");
        assert!(text.contains("offset 77"), "{text}");

        let consent = consent_view("c-1", &state, vec![]);
        let relied: Vec<(Millis, &str)> = consent
            .relied_on_recently
            .iter()
            .map(|r| (r.approved_at, r.artifact_id.as_str()))
            .collect();
        assert_eq!(relied, [(2_000, "art-1"), (3_000, "art-1")]);

        let mut dispatch = DispatchState::default();
        dispatch.sent.insert("m1".into(), "wamid.1".into());
        let messages = messages_view("c-1", &state, Some(&dispatch));
        let seen: Vec<(&str, Option<&str>)> = messages
            .recent
            .iter()
            .map(|m| (m.message_id.as_str(), m.provider_message_id.as_deref()))
            .collect();
        assert_eq!(
            seen,
            [("m2", None), ("m1", Some("wamid.1"))],
            "newest first"
        );
    }
}
