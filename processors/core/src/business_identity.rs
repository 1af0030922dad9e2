//! Business identity: which facts are the same fact, whatever event id a source gave them.
//!
//! Real sources do not keep event ids stable: a scanner reads one parcel three times, an OMS
//! retry mints a new id for the same order, a CDC backfill replays history under fresh ids.
//! Each fact kind is therefore also known by what it is about (its subject) and by what in it
//! would be news to the customer. A fact whose subject and news were both accepted before,
//! inside the dedupe window, is a repeat: recorded, never acted on. The table, in one place:
//!
//! | fact                    | subject                                  | news (a later fact with the same subject counts when this differs) |
//! |-------------------------|------------------------------------------|--------------------------------------------------------------------|
//! | OrderPlaced             | order                                    | nothing: an order is placed once                                   |
//! | ShipmentDispatched      | order, shipment, milestone               | nothing                                                            |
//! | ShipmentDelayed         | order, shipment, milestone               | the new estimated delivery date                                    |
//! | ShipmentOutForDelivery  | order, shipment, milestone               | nothing                                                            |
//! | ShipmentDelivered       | order, shipment, milestone               | nothing                                                            |
//! | OrderCancelled          | order                                    | nothing                                                            |
//! | CartAbandoned           | cart                                     | the items or the total                                             |
//! | CartRecovered           | cart                                     | nothing                                                            |
//! | PaymentCaptured         | payment                                  | the amount                                                         |
//! | PaymentFailed           | payment                                  | the reason                                                         |
//! | RefundIssued            | refund                                   | the amount                                                         |
//! | SubscriptionRenewalDue  | subscription, due date                   | the amount                                                         |
//! | SubscriptionRenewed     | none: it names no period, so the event id is its only identity            |
//! | ConsentGranted/Revoked  | artifact, purpose, channel, grant or revocation | nothing                                                     |
//! | ProfileChanged          | the customer's profile                   | the fields it sets, or when it occurred                            |
//! | ErasureRequested        | request                                  | nothing                                                            |
//! | MessageStatusChanged    | message (Herald's and the provider's id), status | the error code                                             |
//! | InboundMessageReceived  | provider message id                      | nothing                                                            |
//! | TemplateStatusChanged   | template, language                       | the status, or when it occurred                                    |
//!
//! A profile and a template status are states rather than happenings: the same content at the
//! same instant is a re-emission, but the same content later is a change back (a phone number
//! restored), so when it occurred is part of the news.

use crate::context::deterministic_id;
use crate::events::{rfc3339, wire_name, Fact, Millis};

/// What a fact is about, and what in it would be news.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusinessIdentity {
    /// Readable, free of contact details: it is written into duplicate decisions.
    pub subject: String,
    /// The content that makes a later fact with the same subject news; empty when nothing does.
    pub news: String,
}

impl BusinessIdentity {
    /// The key state remembers: subject and news together, hashed so that no profile content
    /// is kept in the clear.
    pub fn key(&self) -> String {
        deterministic_id(&["business-identity", &self.subject, &self.news])
    }
}

/// The business identity of a fact that occurred at `occurred_at`; `None` for a kind whose
/// event id is its only identity.
pub fn of(fact: &Fact, occurred_at: Millis) -> Option<BusinessIdentity> {
    let kind = fact.kind();
    let id = |subject: String, news: String| {
        // Pushed rather than formatted: every input takes an identity.
        let mut named = String::with_capacity(kind.len() + 1 + subject.len());
        named.push_str(kind);
        named.push(' ');
        named.push_str(&subject);
        Some(BusinessIdentity {
            subject: named,
            news,
        })
    };
    let shipment = |order: &str, shipment: &str| format!("order={order} shipment={shipment}");
    match fact {
        Fact::OrderPlaced(f) => id(format!("order={}", f.order_id), String::new()),
        Fact::ShipmentDispatched(f) => id(shipment(&f.order_id, &f.shipment_id), String::new()),
        Fact::ShipmentDelayed(f) => id(
            shipment(&f.order_id, &f.shipment_id),
            rfc3339(f.new_estimated_delivery),
        ),
        Fact::ShipmentOutForDelivery(f) => id(shipment(&f.order_id, &f.shipment_id), String::new()),
        Fact::ShipmentDelivered(f) => id(shipment(&f.order_id, &f.shipment_id), String::new()),
        Fact::OrderCancelled(f) => id(format!("order={}", f.order_id), String::new()),
        Fact::CartAbandoned(f) => id(
            format!("cart={}", f.cart_id),
            content(&(&f.items, &f.total)),
        ),
        Fact::CartRecovered(f) => id(format!("cart={}", f.cart_id), String::new()),
        Fact::PaymentCaptured(f) => id(format!("payment={}", f.payment_id), f.amount.display()),
        Fact::PaymentFailed(f) => id(format!("payment={}", f.payment_id), f.reason.clone()),
        Fact::RefundIssued(f) => id(format!("refund={}", f.refund_id), f.amount.display()),
        Fact::SubscriptionRenewalDue(f) => id(
            format!(
                "subscription={} due={}",
                f.subscription_id,
                rfc3339(f.due_at)
            ),
            f.amount.display(),
        ),
        Fact::SubscriptionRenewed(_) => None,
        Fact::ConsentGranted(c) | Fact::ConsentRevoked(c) => id(
            format!(
                "artifact={} purpose={} channel={}",
                c.artifact_id,
                wire_name(&c.purpose),
                wire_name(&c.channel)
            ),
            String::new(),
        ),
        Fact::ProfileChanged(p) => id(
            "profile".into(),
            format!("{} at {}", content(p), rfc3339(occurred_at)),
        ),
        Fact::ErasureRequested(f) => id(format!("request={}", f.request_id), String::new()),
        // A refusal may come before the provider gave the message an id: Herald's own id,
        // echoed back, names it then.
        Fact::MessageStatusChanged(s) => id(
            format!(
                "message={} provider_message={} status={}",
                s.message_id.as_deref().unwrap_or(""),
                s.provider_message_id,
                wire_name(&s.status)
            ),
            s.error_code.map(|c| c.to_string()).unwrap_or_default(),
        ),
        Fact::InboundMessageReceived(m) => id(
            format!("provider_message={}", m.provider_message_id),
            String::new(),
        ),
        Fact::TemplateStatusChanged(t) => id(
            format!("template={} language={}", t.template_name, t.language),
            format!("{} at {}", wire_name(&t.status), rfc3339(occurred_at)),
        ),
    }
}

/// A content fingerprint: the JSON of the value, hashed, so that contact details never appear.
fn content<T: serde::Serialize>(v: &T) -> String {
    deterministic_id(&[&serde_json::to_string(v).unwrap_or_default()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::*;

    fn delay(date: Millis) -> Fact {
        Fact::ShipmentDelayed(ShipmentDelayed {
            order_id: "o-1".into(),
            shipment_id: "s-1".into(),
            new_estimated_delivery: date,
            reason: None,
        })
    }

    #[test]
    fn the_same_delay_is_a_repeat_and_a_new_date_is_news() {
        let first = of(&delay(1_000), 5).unwrap();
        // Reported again later, by another scan: the same subject and news.
        assert_eq!(first.key(), of(&delay(1_000), 99).unwrap().key());
        let later = of(&delay(2_000), 5).unwrap();
        assert_eq!(first.subject, later.subject);
        assert_ne!(first.key(), later.key());
    }

    #[test]
    fn milestones_of_one_shipment_are_different_facts() {
        let out = Fact::ShipmentOutForDelivery(ShipmentOutForDelivery {
            order_id: "o-1".into(),
            shipment_id: "s-1".into(),
        });
        let delivered = Fact::ShipmentDelivered(ShipmentDelivered {
            order_id: "o-1".into(),
            shipment_id: "s-1".into(),
        });
        assert_ne!(of(&out, 0).unwrap().key(), of(&delivered, 0).unwrap().key());
    }

    #[test]
    fn a_grant_and_a_revocation_of_one_artifact_are_different_facts() {
        let change = ConsentChange {
            purpose: Purpose::Marketing,
            channel: Channel::Whatsapp,
            source: "form".into(),
            artifact_id: "a-1".into(),
        };
        let granted = of(&Fact::ConsentGranted(change.clone()), 0).unwrap();
        assert_eq!(
            granted.subject,
            "ConsentGranted artifact=a-1 purpose=MARKETING channel=WHATSAPP"
        );
        assert_ne!(
            granted.key(),
            of(&Fact::ConsentRevoked(change), 0).unwrap().key()
        );
    }

    #[test]
    fn a_profile_subject_names_no_contact_detail() {
        let p = Fact::ProfileChanged(ProfileChanged {
            first_name: Some("Ana".into()),
            locale: None,
            time_zone: None,
            phone_e164: Some("+15550100001".into()),
            email: Some("ana@example.com".into()),
        });
        let identity = of(&p, 0).unwrap();
        for secret in ["Ana", "+1555", "ana@"] {
            assert!(!identity.subject.contains(secret) && !identity.news.contains(secret));
        }
        // The same profile set again later is a change back, not a repeat.
        assert_ne!(identity.key(), of(&p, 1).unwrap().key());
    }

    #[test]
    fn a_renewal_has_no_identity_beyond_its_event_id() {
        let renewed = Fact::SubscriptionRenewed(SubscriptionRenewed {
            subscription_id: "sub-1".into(),
            amount: Money {
                minor_units: 900,
                currency: "EUR".into(),
            },
        });
        assert_eq!(of(&renewed, 0), None);
    }
}
