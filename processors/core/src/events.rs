//! Herald's domain events: the input facts, the decisions and the dispatch steps, as Rust types
//! that mirror the Avro schemas in `schemas/` field for field.

use crate::sorted_map::SortedMap;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Milliseconds since the Unix epoch, UTC (Avro `timestamp-millis`).
pub type Millis = i64;

/// An instant as RFC 3339 for readers (the raw number if it is out of range).
pub fn rfc3339(ms: Millis) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| ms.to_string())
}

/// The name a unit enum (purpose, channel, status) has on the wire, as serde writes it.
pub fn wire_name<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// What every input event carries (`herald.common.Envelope`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub event_id: String,
    pub source_system: String,
    pub source_sequence: Option<i64>,
    pub occurred_at: Millis,
    pub customer_id: String,
    pub trace_parent: Option<String>,
    pub schema_version: i32,
}

/// Money with exactly two fraction digits (`herald.common.Money`), held as minor units so that
/// arithmetic is exact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Money {
    #[serde(rename = "amount", with = "decimal_scale2")]
    pub minor_units: i64,
    pub currency: String,
}

impl Money {
    /// Renders the amount the way a template shows it, e.g. `EUR 129.90`.
    pub fn display(&self) -> String {
        let sign = if self.minor_units < 0 { "-" } else { "" };
        let abs = self.minor_units.unsigned_abs();
        format!("{} {}{}.{:02}", self.currency, sign, abs / 100, abs % 100)
    }
}

/// Avro `decimal` (bytes, scale 2) <-> minor units: big-endian two's complement of the unscaled value.
mod decimal_scale2 {
    use serde::{de::Error, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &i64, s: S) -> Result<S::Ok, S::Error> {
        let bytes = v.to_be_bytes();
        // Shortest two's complement form: drop leading bytes that only repeat the sign.
        let mut start = 0;
        while start < 7 {
            let b = bytes[start];
            let next_sign = bytes[start + 1] & 0x80;
            if (b == 0x00 && next_sign == 0) || (b == 0xff && next_sign != 0) {
                start += 1;
            } else {
                break;
            }
        }
        s.serialize_bytes(&bytes[start..])
    }

    /// Accepts Avro decimal bytes, a byte array (stored state) or a decimal string such as
    /// "129.90" (scenario files).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        d.deserialize_any(AmountVisitor)
    }

    fn from_twos_complement<E: Error>(b: &[u8]) -> Result<i64, E> {
        if b.is_empty() || b.len() > 8 {
            return Err(E::custom(format!(
                "decimal of {} bytes does not fit a 64-bit amount",
                b.len()
            )));
        }
        let fill = if b[0] & 0x80 != 0 { 0xff } else { 0x00 };
        let mut full = [fill; 8];
        full[8 - b.len()..].copy_from_slice(b);
        Ok(i64::from_be_bytes(full))
    }

    /// "129.90" -> 12990; at most two fraction digits, never rounded.
    pub fn parse_decimal(s: &str) -> Option<i64> {
        let (neg, s) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
        if whole.is_empty()
            || frac.len() > 2
            || !whole
                .chars()
                .chain(frac.chars())
                .all(|c| c.is_ascii_digit())
        {
            return None;
        }
        let frac = format!("{frac:0<2}");
        let v = whole
            .parse::<i64>()
            .ok()?
            .checked_mul(100)?
            .checked_add(frac.parse::<i64>().ok()?)?;
        Some(if neg { -v } else { v })
    }

    struct AmountVisitor;
    impl<'de> serde::de::Visitor<'de> for AmountVisitor {
        type Value = i64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a decimal amount with at most two fraction digits")
        }
        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<i64, E> {
            from_twos_complement(v)
        }
        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<i64, E> {
            from_twos_complement(&v)
        }
        fn visit_str<E: Error>(self, v: &str) -> Result<i64, E> {
            parse_decimal(v).ok_or_else(|| E::custom(format!("'{v}' is not an amount like 129.90")))
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<i64, A::Error> {
            let mut out = Vec::new();
            while let Some(b) = a.next_element::<u8>()? {
                out.push(b);
            }
            from_twos_complement(&out)
        }
    }
}

/// One product line of an order or cart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineItem {
    pub sku: String,
    pub name: String,
    pub quantity: i32,
    pub unit_price: Option<Money>,
}

/// Why a message is sent; consent is per purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Purpose {
    Transactional,
    Marketing,
}

/// The channel a message travels on; consent is per channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Channel {
    Whatsapp,
    Sms,
    Email,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderPlaced {
    pub order_id: String,
    pub items: Vec<LineItem>,
    pub total: Option<Money>,
}
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentDispatched {
    pub order_id: String,
    pub shipment_id: String,
    pub carrier: String,
    pub tracking_url: Option<String>,
    pub skus: Vec<String>,
    pub estimated_delivery: Option<Millis>,
}
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentDelayed {
    pub order_id: String,
    pub shipment_id: String,
    pub new_estimated_delivery: Millis,
    pub reason: Option<String>,
}
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentOutForDelivery {
    pub order_id: String,
    pub shipment_id: String,
}
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentDelivered {
    pub order_id: String,
    pub shipment_id: String,
}
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCancelled {
    pub order_id: String,
    pub reason: String,
}
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CartAbandoned {
    pub cart_id: String,
    pub items: Vec<LineItem>,
    pub total: Option<Money>,
}
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CartRecovered {
    pub cart_id: String,
    pub order_id: String,
}
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentCaptured {
    pub order_id: String,
    pub payment_id: String,
    pub amount: Money,
}
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentFailed {
    pub order_id: String,
    pub payment_id: String,
    pub reason: String,
}
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundIssued {
    pub order_id: String,
    pub refund_id: String,
    pub amount: Money,
    pub partial: bool,
}
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionRenewalDue {
    pub subscription_id: String,
    pub due_at: Millis,
    pub amount: Money,
}
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionRenewed {
    pub subscription_id: String,
    pub amount: Money,
}
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsentChange {
    pub purpose: Purpose,
    pub channel: Channel,
    pub source: String,
    pub artifact_id: String,
}
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileChanged {
    pub first_name: Option<String>,
    pub locale: Option<String>,
    pub time_zone: Option<String>,
    pub phone_e164: Option<String>,
    /// The e-mail fallback channel's address.
    #[serde(default)]
    pub email: Option<String>,
}
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErasureRequested {
    pub request_id: String,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MessageStatus {
    Sent,
    Delivered,
    Read,
    Failed,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TemplateStatus {
    Approved,
    Pending,
    Paused,
    Disabled,
    Rejected,
}
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageStatusChanged {
    pub provider_message_id: String,
    pub status: MessageStatus,
    pub error_code: Option<i32>,
    /// Herald's message id, echoed back by the provider from the send request's callback data.
    #[serde(default)]
    pub message_id: Option<String>,
}
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundMessageReceived {
    pub provider_message_id: String,
    /// What the customer said: the text, a button's or an interactive reply's title, or the
    /// caption under an image, video or document; empty for media without one.
    pub text: String,
    /// The provider's message type (`text`, `button`, `interactive`, `image`...).
    #[serde(default)]
    pub message_type: Option<String>,
    /// A quick-reply button's payload, as the template defined it.
    #[serde(default)]
    pub button_payload: Option<String>,
    /// The id of the interactive reply chosen (a reply button or a list row).
    #[serde(default)]
    pub reply_id: Option<String>,
}
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateStatusChanged {
    pub template_name: String,
    pub language: String,
    pub status: TemplateStatus,
}

/// A fact from any input family. The variant order is the order of the `fact` union in
/// `EventAccepted`; each family's own union is a contiguous, order-preserving slice of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Fact {
    OrderPlaced(OrderPlaced),
    ShipmentDispatched(ShipmentDispatched),
    ShipmentDelayed(ShipmentDelayed),
    ShipmentOutForDelivery(ShipmentOutForDelivery),
    ShipmentDelivered(ShipmentDelivered),
    OrderCancelled(OrderCancelled),
    CartAbandoned(CartAbandoned),
    CartRecovered(CartRecovered),
    PaymentCaptured(PaymentCaptured),
    PaymentFailed(PaymentFailed),
    RefundIssued(RefundIssued),
    SubscriptionRenewalDue(SubscriptionRenewalDue),
    SubscriptionRenewed(SubscriptionRenewed),
    ConsentGranted(ConsentChange),
    ConsentRevoked(ConsentChange),
    ProfileChanged(ProfileChanged),
    ErasureRequested(ErasureRequested),
    MessageStatusChanged(MessageStatusChanged),
    InboundMessageReceived(InboundMessageReceived),
    TemplateStatusChanged(TemplateStatusChanged),
}

/// Every fact kind, in `Fact` union order (the record names).
pub const FACT_KINDS: [&str; 20] = [
    "OrderPlaced",
    "ShipmentDispatched",
    "ShipmentDelayed",
    "ShipmentOutForDelivery",
    "ShipmentDelivered",
    "OrderCancelled",
    "CartAbandoned",
    "CartRecovered",
    "PaymentCaptured",
    "PaymentFailed",
    "RefundIssued",
    "SubscriptionRenewalDue",
    "SubscriptionRenewed",
    "ConsentGranted",
    "ConsentRevoked",
    "ProfileChanged",
    "ErasureRequested",
    "MessageStatusChanged",
    "InboundMessageReceived",
    "TemplateStatusChanged",
];

/// The input families, one per input topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Oms,
    Billing,
    Crm,
    Provider,
}

impl Family {
    /// Position of the family's first record in the `Fact` order, and how many records it has.
    pub const fn fact_range(self) -> (usize, usize) {
        match self {
            Family::Oms => (0, 8),
            Family::Billing => (8, 5),
            Family::Crm => (13, 4),
            Family::Provider => (17, 3),
        }
    }
}

impl Fact {
    /// Index of this variant in the `Fact` union.
    pub fn index(&self) -> usize {
        match self {
            Fact::OrderPlaced(_) => 0,
            Fact::ShipmentDispatched(_) => 1,
            Fact::ShipmentDelayed(_) => 2,
            Fact::ShipmentOutForDelivery(_) => 3,
            Fact::ShipmentDelivered(_) => 4,
            Fact::OrderCancelled(_) => 5,
            Fact::CartAbandoned(_) => 6,
            Fact::CartRecovered(_) => 7,
            Fact::PaymentCaptured(_) => 8,
            Fact::PaymentFailed(_) => 9,
            Fact::RefundIssued(_) => 10,
            Fact::SubscriptionRenewalDue(_) => 11,
            Fact::SubscriptionRenewed(_) => 12,
            Fact::ConsentGranted(_) => 13,
            Fact::ConsentRevoked(_) => 14,
            Fact::ProfileChanged(_) => 15,
            Fact::ErasureRequested(_) => 16,
            Fact::MessageStatusChanged(_) => 17,
            Fact::InboundMessageReceived(_) => 18,
            Fact::TemplateStatusChanged(_) => 19,
        }
    }

    /// Whether its time moves a task's stream time. A provider's report on Herald's own sends
    /// (a delivery status, a template review) is stamped by the provider's clock, not the
    /// business timeline: during a backfill of past events it would leap stream time to the
    /// present and fire every timer before the facts that should have stopped them are read.
    pub fn moves_stream_time(&self) -> bool {
        !matches!(
            self,
            Fact::MessageStatusChanged(_) | Fact::TemplateStatusChanged(_)
        )
    }

    /// The family (and so the topic) this fact belongs to.
    pub fn family(&self) -> Family {
        match self.index() {
            0..=7 => Family::Oms,
            8..=12 => Family::Billing,
            13..=16 => Family::Crm,
            _ => Family::Provider,
        }
    }

    /// The record name, as in the schema and in decision summaries.
    pub fn kind(&self) -> &'static str {
        FACT_KINDS[self.index()]
    }

    /// The order this fact is about, if any.
    pub fn order_id(&self) -> Option<&str> {
        match self {
            Fact::OrderPlaced(f) => Some(&f.order_id),
            Fact::ShipmentDispatched(f) => Some(&f.order_id),
            Fact::ShipmentDelayed(f) => Some(&f.order_id),
            Fact::ShipmentOutForDelivery(f) => Some(&f.order_id),
            Fact::ShipmentDelivered(f) => Some(&f.order_id),
            Fact::OrderCancelled(f) => Some(&f.order_id),
            Fact::CartRecovered(f) => Some(&f.order_id),
            Fact::PaymentCaptured(f) => Some(&f.order_id),
            Fact::PaymentFailed(f) => Some(&f.order_id),
            Fact::RefundIssued(f) => Some(&f.order_id),
            _ => None,
        }
    }
}

/// An input event: envelope plus fact, as read from one of the four input topics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputEvent {
    pub envelope: Envelope,
    pub fact: Fact,
}

impl InputEvent {
    /// An event from `source_system` with no source sequence or trace, at schema version 1.
    pub fn new(
        source_system: &str,
        customer_id: &str,
        event_id: &str,
        at: Millis,
        fact: Fact,
    ) -> Self {
        InputEvent {
            envelope: Envelope {
                event_id: event_id.into(),
                source_system: source_system.into(),
                source_sequence: None,
                occurred_at: at,
                customer_id: customer_id.into(),
                trace_parent: None,
                schema_version: 1,
            },
            fact,
        }
    }
}

/// Which processor took a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Processor {
    Dedupe,
    OrderingGuard,
    Policy,
}

/// Why a message a trigger asked for was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SuppressionReason {
    NoConsent,
    NoPhone,
    UnknownTemplate,
    UnsupportedLocale,
    MissingVariable,
    OrderCancelled,
    /// Quiet hours or blackout days would have pushed it past its template's time to live.
    Stale,
    /// The customer's time zone stayed unknown (or not an IANA name) for the whole time to live.
    UnknownTimeZone,
    /// The customer already had as many messages of this category as the rolling window allows.
    FrequencyCap,
    /// No approved version of the template is usable (paused, disabled or rejected at the provider).
    TemplateUnavailable,
    /// A session message needs the 24-hour customer service window open, and it is closed.
    OutsideSessionWindow,
    /// An item of the cart ran out of stock: a reminder would advertise what cannot be bought.
    OutOfStock,
    /// An ambiguous signal (locale, inventory, order facts) stayed unresolved until stale.
    Ambiguous,
    /// Its journey ended (the cart was bought, the order cancelled) before it went out.
    JourneyExited,
    /// The provider said marketing to this customer stopped: they turned marketing off
    /// (131050), or it is paused (131048, 131049) past the message's time to live.
    MarketingStopped,
    /// A message of this journey about the same subject and news (one shipment, delay,
    /// delivery or refund) was already approved.
    AlreadyAnnounced,
}

/// Why a message waits instead of going out now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DeferralReason {
    /// Inside quiet hours in the customer's time zone.
    QuietHours,
    /// A corporate holiday or regional blackout day there.
    Blackout,
    /// The time zone is unknown: an ambiguous signal holds rather than sends.
    UnknownTimeZone,
    /// The rolling frequency cap is reached; the message waits for the window to free a slot.
    FrequencyCap,
    /// The customer's locale is unknown: no language is guessed.
    UnknownLocale,
    /// The stock level a guard needs is missing or too old to trust.
    StaleInventory,
    /// The message is about an order Herald has not seen placed.
    MissingOrderFacts,
    /// The provider paused marketing to the customer (131048, 131049) until then.
    MarketingPaused,
}

/// How an approved message travels: as a pre-approved template, or as a free-form session
/// message, which the provider accepts only inside the 24-hour customer service window.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Delivery {
    #[default]
    Template,
    Session,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventAccepted {
    pub envelope: Envelope,
    pub fact: Fact,
    pub forget_before: Millis,
    /// The fact's business identity key (`business_identity`), which later repeats under new
    /// event ids are recognised by; none for a kind known by its event id alone.
    #[serde(default)]
    pub identity_key: Option<String>,
}
/// The provider refused a marketing message because marketing to the customer must stop: they
/// turned marketing messages off (131050, until they grant marketing consent again), or the
/// provider limits marketing to them for now (131048, 131049, until `resumes_at`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarketingStopped {
    /// The refused message.
    pub message_id: String,
    /// The provider's error code.
    pub error_code: i32,
    /// The channel that refused it.
    pub channel: Channel,
    /// When the refusal was decided (stream time).
    pub stopped_at: Millis,
    /// When marketing may resume by itself; none when only a new marketing consent lifts it.
    #[serde(default)]
    pub resumes_at: Option<Millis>,
}
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreErasureFactIgnored {
    /// The ignored fact's event id.
    pub event_id: String,
    /// Occurred-at of the erasure request the fact predates.
    pub erased_at: Millis,
}

/// Dedupe saw an event id, or a fact with the same business identity, already accepted
/// inside its window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DuplicateIgnored {
    pub event_id: String,
    pub first_seen_at: Millis,
    /// The earlier fact this one repeats under a new event id; none when the id itself repeated.
    #[serde(default)]
    pub repeats_event_id: Option<String>,
    /// What the repeated fact is about (`ShipmentDelayed order=o-1 shipment=s-1`).
    #[serde(default)]
    pub identity: Option<String>,
}
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentHeld {
    pub event_id: String,
    pub shipment: ShipmentDispatched,
    pub expires_at: Millis,
}
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentReleased {
    pub event_id: String,
    pub order_id: String,
}
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldExpired {
    pub event_id: String,
    pub order_id: String,
}
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageApproved {
    pub message_id: String,
    pub trigger_event_id: String,
    pub template_name: String,
    pub template_version: i32,
    pub locale: String,
    pub purpose: Purpose,
    pub channel: Channel,
    pub recipient: String,
    pub variables: SortedMap<String, String>,
    pub consent_artifact_id: String,
    pub consent_granted_at: Millis,
    /// The template's category at the provider (MARKETING, UTILITY, AUTHENTICATION, SERVICE);
    /// frequency caps count by it.
    #[serde(default)]
    pub category: String,
    #[serde(default)]
    pub delivery: Delivery,
    /// The journey that planned this message, if any.
    #[serde(default)]
    pub journey: Option<String>,
    /// Other facts the decision relied on, by name (stock levels, the session window...).
    #[serde(default)]
    pub relied_on: SortedMap<String, String>,
}
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageSuppressed {
    /// The planned message it drops, when one was planned (deferred, or a journey step).
    #[serde(default)]
    pub message_id: Option<String>,
    pub trigger_event_id: String,
    pub template_name: String,
    pub purpose: Purpose,
    pub reason: SuppressionReason,
    pub detail: String,
}

/// Policy deferred a message it would otherwise approve; it is decided again when due.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageDeferred {
    pub reason: DeferralReason,
    /// Not before this instant; the customer's consent and window are checked again then.
    pub deferred_until: Millis,
    /// After this instant the message is stale and is dropped with a reason instead.
    pub expires_at: Millis,
    /// The message as it would have been approved now.
    pub planned: MessageApproved,
}

/// An inbound opt-out keyword withdrew consent on the channel it arrived on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OptedOut {
    /// The inbound message that said it: the consent artifact.
    pub provider_message_id: String,
    pub keyword: String,
    pub channel: Channel,
    pub purposes: Vec<Purpose>,
    pub received_at: Millis,
}

/// A customer in a journey's holdout cohort: no message, recorded for incrementality reporting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageHeldOut {
    pub journey: String,
    pub journey_key: String,
    pub trigger_event_id: String,
    pub holdout_percent: i32,
}

/// A customer entered a journey instance (one per journey and key, e.g. per cart).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JourneyEntered {
    pub journey: String,
    pub journey_key: String,
    pub trigger_event_id: String,
    pub entered_at: Millis,
    /// When its first timed step is due; none when it only reacts to facts.
    pub next_step_due: Option<Millis>,
}

/// A journey took a timed step (or let it pass) and scheduled the next one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JourneyAdvanced {
    pub journey: String,
    pub journey_key: String,
    /// Timed steps taken so far, repeats included.
    pub steps_taken: i32,
    pub next_step_due: Option<Millis>,
}

/// A journey instance ended: an exit fact, its last step, or a guard that ends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JourneyExited {
    pub journey: String,
    pub journey_key: String,
    /// `COMPLETED`, the exit fact's kind (e.g. `OrderPlaced`), or the guard (e.g. `OUT_OF_STOCK`).
    pub reason: String,
    pub cause_event_id: String,
}

/// An inbound message matched a risk or complaint term: an agent must look at it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EscalationRaised {
    pub provider_message_id: String,
    /// `complaint` or `risk`, from policy.toml.
    pub category: String,
    pub matched_term: String,
    pub text: String,
    /// Orders placed and not yet delivered or cancelled, for the agent's context.
    pub open_orders: Vec<String>,
}

/// What a decision says (the `payload` union of `DecisionEvent`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Outcome {
    EventAccepted(EventAccepted),
    DuplicateIgnored(DuplicateIgnored),
    ShipmentHeld(ShipmentHeld),
    ShipmentReleased(ShipmentReleased),
    HoldExpired(HoldExpired),
    /// Shared with the customer's state, which keeps approved messages for caps and fallback.
    MessageApproved(Arc<MessageApproved>),
    MessageSuppressed(MessageSuppressed),
    MessageDeferred(MessageDeferred),
    OptedOut(OptedOut),
    MessageHeldOut(MessageHeldOut),
    JourneyEntered(JourneyEntered),
    JourneyAdvanced(JourneyAdvanced),
    JourneyExited(JourneyExited),
    EscalationRaised(EscalationRaised),
    PreErasureFactIgnored(PreErasureFactIgnored),
    MarketingStopped(MarketingStopped),
}

impl Outcome {
    /// Index in the decision payload union.
    pub fn index(&self) -> usize {
        match self {
            Outcome::EventAccepted(_) => 0,
            Outcome::DuplicateIgnored(_) => 1,
            Outcome::ShipmentHeld(_) => 2,
            Outcome::ShipmentReleased(_) => 3,
            Outcome::HoldExpired(_) => 4,
            Outcome::MessageApproved(_) => 5,
            Outcome::MessageSuppressed(_) => 6,
            Outcome::MessageDeferred(_) => 7,
            Outcome::OptedOut(_) => 8,
            Outcome::MessageHeldOut(_) => 9,
            Outcome::JourneyEntered(_) => 10,
            Outcome::JourneyAdvanced(_) => 11,
            Outcome::JourneyExited(_) => 12,
            Outcome::EscalationRaised(_) => 13,
            Outcome::PreErasureFactIgnored(_) => 14,
            Outcome::MarketingStopped(_) => 15,
        }
    }

    /// The decision kind, as shown in summaries.
    pub fn kind(&self) -> &'static str {
        [
            "EventAccepted",
            "DuplicateIgnored",
            "ShipmentHeld",
            "ShipmentReleased",
            "HoldExpired",
            "MessageApproved",
            "MessageSuppressed",
            "MessageDeferred",
            "OptedOut",
            "MessageHeldOut",
            "JourneyEntered",
            "JourneyAdvanced",
            "JourneyExited",
            "EscalationRaised",
            "PreErasureFactIgnored",
            "MarketingStopped",
        ][self.index()]
    }

    /// Kind plus the reason or channel that sets it apart, for counting decisions by outcome
    /// (`MessageSuppressed:FrequencyCap`, `MessageApproved:Sms`, `JourneyExited:ORDER_PLACED`).
    pub fn label(&self) -> String {
        let kind = self.kind();
        match self {
            Outcome::MessageApproved(m) if m.delivery == Delivery::Session => {
                format!("{kind}:{:?}:Session", m.channel)
            }
            Outcome::MessageApproved(m) => format!("{kind}:{:?}", m.channel),
            Outcome::MessageSuppressed(s) => format!("{kind}:{:?}", s.reason),
            Outcome::MessageDeferred(d) => format!("{kind}:{:?}", d.reason),
            Outcome::JourneyExited(j) => format!("{kind}:{}", j.reason),
            // The same fact under a new event id, told apart from a redelivered record.
            Outcome::DuplicateIgnored(d) if d.repeats_event_id.is_some() => {
                format!("{kind}:Repeat")
            }
            _ => kind.to_string(),
        }
    }

    /// Whether the decision changes the customer's consent (a grant, a revocation, an opt-out).
    pub fn changes_consent(&self) -> bool {
        match self {
            Outcome::EventAccepted(a) => {
                matches!(a.fact, Fact::ConsentGranted(_) | Fact::ConsentRevoked(_))
            }
            Outcome::OptedOut(_) => true,
            _ => false,
        }
    }

    /// Whether the decision applies an erasure request: the customer's personal data goes from
    /// state and from the query projection.
    pub fn erases_customer(&self) -> bool {
        matches!(self, Outcome::EventAccepted(a) if matches!(a.fact, Fact::ErasureRequested(_)))
    }

    /// One line naming what was decided about which template, journey or term.
    pub fn summary(&self) -> String {
        match self {
            Outcome::MessageApproved(m) => {
                let mut s = format!("MessageApproved:{}:{}", m.template_name, m.locale);
                if m.channel != Channel::Whatsapp {
                    s += &format!(":{:?}", m.channel);
                }
                if m.delivery == Delivery::Session {
                    s += ":Session";
                }
                s
            }
            Outcome::EventAccepted(a) => format!("EventAccepted:{}", a.fact.kind()),
            Outcome::DuplicateIgnored(DuplicateIgnored {
                repeats_event_id: Some(earlier),
                ..
            }) => format!("DuplicateIgnored:repeats:{earlier}"),
            Outcome::JourneyEntered(j) => format!("JourneyEntered:{}", j.journey),
            Outcome::JourneyAdvanced(j) => format!("JourneyAdvanced:{}", j.journey),
            Outcome::JourneyExited(j) => format!("JourneyExited:{}:{}", j.journey, j.reason),
            Outcome::MessageHeldOut(h) => format!("MessageHeldOut:{}", h.journey),
            Outcome::OptedOut(o) => format!("OptedOut:{}", o.keyword),
            Outcome::MarketingStopped(m) => format!("MarketingStopped:{}", m.error_code),
            Outcome::EscalationRaised(e) => {
                format!("EscalationRaised:{}:{}", e.category, e.matched_term)
            }
            Outcome::MessageSuppressed(s) => {
                format!("MessageSuppressed:{}:{:?}", s.template_name, s.reason)
            }
            Outcome::MessageDeferred(d) => {
                format!("MessageDeferred:{}:{:?}", d.planned.template_name, d.reason)
            }
            other => other.kind().to_string(),
        }
    }
}

/// One decision of dedupe, ordering guard or policy (`herald.decisions.DecisionEvent`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub decision_id: String,
    pub customer_id: String,
    pub input_event_id: String,
    pub processor: Processor,
    pub decided_at: Millis,
    pub policy_version: String,
    pub outcome: Outcome,
    /// On a decision that changes consent: the link of the customer's consent hash chain
    /// (SHA-256 of the previous link and this decision), so an audit detects a changed or
    /// missing record. `None` on every other decision.
    #[serde(default)]
    pub consent_chain: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispatchAttempted {
    pub attempt: i32,
}
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispatchAccepted {
    pub provider_message_id: String,
}
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispatchFailed {
    pub code: i32,
    pub retryable: bool,
    pub detail: String,
}
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispatchSkipped {
    pub first_provider_message_id: String,
}
/// Recorded and committed before the provider is called.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispatchIntended {
    pub attempt: i32,
    /// Where the approval is in the same partition of the decision log.
    pub approval_offset: i64,
    /// From where in the same partition of the provider topic a status of it can appear.
    pub statuses_from: i64,
}
/// The request left and no answer came back: the outcome is unknown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispatchUnanswered {
    pub attempt: i32,
    pub detail: String,
}
/// An open intent settled from status webhooks; no provider id means it was not sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispatchReconciled {
    pub provider_message_id: Option<String>,
    pub status: Option<String>,
    pub waited_ms: i64,
}

/// One dispatch step (the `payload` union of `DispatchEvent`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum DispatchStep {
    Attempted(DispatchAttempted),
    Accepted(DispatchAccepted),
    Failed(DispatchFailed),
    Skipped(DispatchSkipped),
    Intended(DispatchIntended),
    Unanswered(DispatchUnanswered),
    Reconciled(DispatchReconciled),
}

impl DispatchStep {
    /// Index in the dispatch payload union.
    pub fn index(&self) -> usize {
        match self {
            DispatchStep::Attempted(_) => 0,
            DispatchStep::Accepted(_) => 1,
            DispatchStep::Failed(_) => 2,
            DispatchStep::Skipped(_) => 3,
            DispatchStep::Intended(_) => 4,
            DispatchStep::Unanswered(_) => 5,
            DispatchStep::Reconciled(_) => 6,
        }
    }

    /// A short line naming the step and what it carries, as scenario files list them:
    /// `Intended:1`, `Attempted:1`, `Accepted`, `Failed:131026`, `Skipped`, `Unanswered:1`,
    /// `Reconciled:sent` or `Reconciled:not_sent`.
    pub fn summary(&self) -> String {
        match self {
            DispatchStep::Intended(i) => format!("Intended:{}", i.attempt),
            DispatchStep::Attempted(a) => format!("Attempted:{}", a.attempt),
            DispatchStep::Accepted(_) => "Accepted".into(),
            DispatchStep::Failed(f) => format!("Failed:{}", f.code),
            DispatchStep::Skipped(_) => "Skipped".into(),
            DispatchStep::Unanswered(u) => format!("Unanswered:{}", u.attempt),
            DispatchStep::Reconciled(r) => match r.provider_message_id {
                Some(_) => "Reconciled:sent".into(),
                None => "Reconciled:not_sent".into(),
            },
        }
    }
}

/// One record of `herald.dispatch.v1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispatchRecord {
    pub dispatch_id: String,
    pub message_id: String,
    pub customer_id: String,
    pub decision_id: String,
    pub template_name: String,
    pub channel: Channel,
    pub recorded_at: Millis,
    pub step: DispatchStep,
}

/// One record of `catalog.inventory.v1`: units of a SKU available now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockLevel {
    pub sku: String,
    pub available: i32,
    pub updated_at: Millis,
    pub source_system: String,
}

/// One record of the contact changelog (`herald.contacts.v1`): every address Herald learnt
/// for a customer, clear by keyed hash. Erasure writes a tombstone instead.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactCard {
    pub customer_id: String,
    pub addresses: BTreeMap<String, String>,
    pub updated_at: Millis,
}

/// One record of `herald.dlq.v1`: the original bytes and why they could not be processed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub stage: String,
    pub error: String,
    pub failed_at: Millis,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_displays_exact_amounts() {
        let m = Money {
            minor_units: 12990,
            currency: "EUR".into(),
        };
        assert_eq!(m.display(), "EUR 129.90");
        let neg = Money {
            minor_units: -5,
            currency: "USD".into(),
        };
        assert_eq!(neg.display(), "USD -0.05");
    }

    #[test]
    fn fact_indexes_follow_family_ranges() {
        let f = Fact::PaymentCaptured(PaymentCaptured {
            order_id: "o".into(),
            payment_id: "p".into(),
            amount: Money {
                minor_units: 1,
                currency: "EUR".into(),
            },
        });
        let (start, len) = Family::Billing.fact_range();
        assert!(f.index() >= start && f.index() < start + len);
        assert_eq!(f.family(), Family::Billing);
    }
}
