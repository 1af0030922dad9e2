//! A realistic, seeded scenario for a direct-to-consumer home-goods brand: profiles, consent,
//! orders, payments (some late, some failing), shipments (some before payment, some split),
//! delays, cancellations, abandoned carts (some without a price), opt-outs, renewals, inbound
//! messages, a few erasure requests, redelivered duplicates, facts re-emitted under new event
//! ids, and a few undecodable records.

use crate::business_identity;
use crate::events::*;

/// SplitMix64: a tiny, well-known PRNG; the scenario must be reproducible from its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;
/// 2026-11-01T00:00:00Z: scenario time starts here.
pub const EPOCH: Millis = 1_793_491_200_000;

const PRODUCTS: &[(&str, &str, i64)] = &[
    ("HG-LIN-THROW", "Linen throw", 8900),
    ("HG-OAK-BOARD", "Oak serving board", 4500),
    ("HG-CER-VASE", "Ceramic vase", 6200),
    ("HG-WOOL-RUG", "Wool rug 160x230", 34900),
    ("HG-GLASS-SET", "Glass tumbler set", 3900),
    ("HG-CAND-SOY", "Soy candle trio", 2900),
    ("HG-BED-PERC", "Percale duvet cover", 11900),
    ("HG-LAMP-BRS", "Brass table lamp", 15900),
];
const NAMES: &[&str] = &[
    "Ana", "Bruno", "Carla", "Diego", "Elena", "Felipe", "Grace", "Hugo", "Inês", "João", "Laura",
    "Marco", "Nina", "Olivia", "Pedro", "Rosa",
];
const LOCALES: &[(&str, &str, &str, u64)] = &[
    ("en_US", "America/New_York", "EUR", 55),
    ("es_ES", "Europe/Madrid", "EUR", 25),
    ("pt_BR", "America/Sao_Paulo", "BRL", 14),
    ("fr_FR", "Europe/Paris", "EUR", 6),
];
/// What customers write in: questions, opt-out keywords, complaints.
const INBOUND: &[&str] = &[
    "Hi, where is my order?",
    "Hi, where is my order?",
    "STOP",
    "parar",
    "My vase arrived broken, I want a refund",
    "I will file a chargeback",
];
/// Stock per SKU as the warehouse reports it; the rug is sold out.
pub fn stock_levels() -> Vec<StockLevel> {
    PRODUCTS
        .iter()
        .map(|(sku, _, _)| StockLevel {
            sku: sku.to_string(),
            available: if *sku == "HG-WOOL-RUG" { 0 } else { 40 },
            // Measured at the end of the scenario's two months, so never too old to trust.
            updated_at: EPOCH + 60 * DAY,
            source_system: "wms".into(),
        })
        .collect()
}
const CARRIERS: &[&str] = &["DHL", "UPS", "Correos", "Loggi"];

/// One record to feed: an event, or bytes that are not a Herald record at all.
// Nearly every item is an event; boxing them to shrink the rare garbage would cost more.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum FeedItem {
    Event(InputEvent),
    Garbage {
        /// The input topic it lands on, whatever the deployment calls it.
        topic: crate::topology::TopicRole,
        key: String,
        bytes: Vec<u8>,
    },
}

/// The generated scenario, in feed order.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub items: Vec<FeedItem>,
    pub customers: usize,
    /// Event ids of facts fed a second time under a new id, which only business identity
    /// recognises: they are decided as repeats, never accepted.
    pub re_emitted: std::collections::BTreeSet<String>,
}

struct Gen {
    rng: Rng,
    events: Vec<(Millis, u64, FeedItem)>,
    seq: u64,
    re_emitted: std::collections::BTreeSet<String>,
}

impl Gen {
    fn push(&mut self, customer: &str, source: &str, at: Millis, fact: Fact) -> InputEvent {
        self.seq += 1;
        let e = InputEvent {
            envelope: Envelope {
                event_id: format!("{source}-{:08}", self.seq),
                source_system: source.to_string(),
                source_sequence: Some(self.seq as i64),
                occurred_at: at,
                customer_id: customer.to_string(),
                trace_parent: None,
                schema_version: 1,
            },
            fact,
        };
        self.events.push((at, self.seq, FeedItem::Event(e.clone())));
        // Redelivery: the same fact, same id, a little later (retries, replays).
        if self.rng.chance(0.06) {
            let later = at + 1 + self.rng.below(2 * HOUR as u64) as i64;
            self.seq += 1;
            self.events
                .push((later, self.seq, FeedItem::Event(e.clone())));
        }
        // Re-emission: the same fact under a new event id and with its original time, as a
        // carrier re-scan, an OMS retry or a CDC backfill sends it.
        if business_identity::of(&e.fact, at).is_some() && self.rng.chance(0.03) {
            let later = at + 1 + self.rng.below(6 * HOUR as u64) as i64;
            self.seq += 1;
            let mut copy = e.clone();
            copy.envelope.event_id = format!("{source}-{:08}", self.seq);
            copy.envelope.source_sequence = Some(self.seq as i64);
            self.re_emitted.insert(copy.envelope.event_id.clone());
            self.events.push((later, self.seq, FeedItem::Event(copy)));
        }
        e
    }

    fn money(&self, minor: i64, currency: &str) -> Money {
        Money {
            minor_units: minor,
            currency: currency.to_string(),
        }
    }

    fn items(&mut self, currency: &str, priced: bool) -> Vec<LineItem> {
        let n = 1 + self.rng.below(3) as usize;
        (0..n)
            .map(|_| {
                let (sku, name, price) = PRODUCTS[self.rng.below(PRODUCTS.len() as u64) as usize];
                LineItem {
                    sku: sku.into(),
                    name: name.into(),
                    quantity: 1 + self.rng.below(2) as i32,
                    unit_price: priced.then(|| self.money(price, currency)),
                }
            })
            .collect()
    }
}

fn total(items: &[LineItem]) -> Option<Money> {
    let mut sum = 0;
    let mut currency = None;
    for i in items {
        let p = i.unit_price.as_ref()?;
        sum += p.minor_units * i.quantity as i64;
        currency = Some(p.currency.clone());
    }
    Some(Money {
        minor_units: sum,
        currency: currency?,
    })
}

/// Generates the scenario for `customers` customers from `seed`.
pub fn generate(customers: usize, seed: u64) -> Scenario {
    let mut g = Gen {
        rng: Rng::new(seed),
        events: Vec::new(),
        seq: 0,
        re_emitted: Default::default(),
    };
    for c in 0..customers {
        let customer = format!("cust-{c:06}");
        let t0 = EPOCH + g.rng.below(20 * DAY as u64) as i64;
        let roll = g.rng.below(100);
        let mut acc = 0;
        let &(locale, tz, currency, _) = LOCALES
            .iter()
            .find(|l| {
                acc += l.3;
                roll < acc
            })
            .unwrap_or(&LOCALES[0]);
        let phone = g
            .rng
            .chance(0.97)
            .then(|| format!("+{}", 340_000_000_000u64 + c as u64 * 7919 % 99_999_999));
        let time_zone_known = g.rng.chance(0.98);
        let first_name = g
            .rng
            .chance(0.9)
            .then(|| NAMES[g.rng.below(NAMES.len() as u64) as usize].to_string());
        g.push(
            &customer,
            "crm",
            t0,
            Fact::ProfileChanged(ProfileChanged {
                first_name,
                locale: Some(locale.into()),
                // A few CRM profiles carry no time zone: marketing to them must be held.
                time_zone: time_zone_known.then(|| tz.into()),
                phone_e164: phone,
                email: Some(format!("{customer}@example.com")),
            }),
        );
        let consent = |purpose, artifact: String| ConsentChange {
            purpose,
            channel: Channel::Whatsapp,
            source: "checkout".into(),
            artifact_id: artifact,
        };
        if g.rng.chance(0.92) {
            g.push(
                &customer,
                "crm",
                t0 + 60_000,
                Fact::ConsentGranted(consent(
                    Purpose::Transactional,
                    format!("form-{customer}-t"),
                )),
            );
        } else {
            let transactional_on = |channel, prefix: &str| {
                Fact::ConsentGranted(ConsentChange {
                    purpose: Purpose::Transactional,
                    channel,
                    source: "checkout".into(),
                    artifact_id: format!("{prefix}-{customer}-t"),
                })
            };
            if g.rng.chance(0.5) {
                // Some customers only agreed to order updates by SMS: the fallback channel...
                g.push(
                    &customer,
                    "crm",
                    t0 + 60_000,
                    transactional_on(Channel::Sms, "sms"),
                );
                if g.rng.chance(0.5) {
                    // ...half of them to e-mail too, where an undeliverable SMS falls back to.
                    g.push(
                        &customer,
                        "crm",
                        t0 + 61_000,
                        transactional_on(Channel::Email, "email"),
                    );
                }
            } else if g.rng.chance(0.5) {
                // Others only to e-mail.
                g.push(
                    &customer,
                    "crm",
                    t0 + 60_000,
                    transactional_on(Channel::Email, "email"),
                );
            }
        }
        let marketing = g.rng.chance(0.55);
        if marketing {
            g.push(
                &customer,
                "crm",
                t0 + 120_000,
                Fact::ConsentGranted(consent(Purpose::Marketing, format!("form-{customer}-m"))),
            );
        }

        let orders = 1 + g.rng.below(3);
        for o in 0..orders {
            let order_id = format!("ord-{c:06}-{o}");
            let t = t0 + HOUR + o as i64 * 3 * DAY + g.rng.below(DAY as u64) as i64;
            let items = g.items(currency, true);
            let priced = g.rng.chance(0.97);
            g.push(
                &customer,
                "oms",
                t,
                Fact::OrderPlaced(OrderPlaced {
                    order_id: order_id.clone(),
                    items: items.clone(),
                    total: if priced { total(&items) } else { None },
                }),
            );
            if g.rng.chance(0.03) {
                g.push(
                    &customer,
                    "oms",
                    t + 2 * HOUR,
                    Fact::OrderCancelled(OrderCancelled {
                        order_id: order_id.clone(),
                        reason: "customer request".into(),
                    }),
                );
                continue;
            }
            let amount = total(&items).unwrap_or_else(|| g.money(0, currency));
            let ship_at = t + DAY;
            let pay = g.rng.below(100);
            // 15%: payment captured after the shipment fact arrives (held, then released);
            // 5%: payment fails (the hold expires); the rest: paid within minutes.
            let paid_at = match pay {
                0..=14 => Some(ship_at + 2 * HOUR),
                15..=19 => None,
                _ => Some(t + 5 * 60_000),
            };
            match paid_at {
                Some(at) => {
                    g.push(
                        &customer,
                        "billing",
                        at,
                        Fact::PaymentCaptured(PaymentCaptured {
                            order_id: order_id.clone(),
                            payment_id: format!("pay-{order_id}"),
                            amount: amount.clone(),
                        }),
                    );
                }
                None => {
                    g.push(
                        &customer,
                        "billing",
                        t + 10 * 60_000,
                        Fact::PaymentFailed(PaymentFailed {
                            order_id: order_id.clone(),
                            payment_id: format!("pay-{order_id}"),
                            reason: "card_declined".into(),
                        }),
                    );
                }
            }
            let parcels = if items.len() > 1 && g.rng.chance(0.3) {
                2
            } else {
                1
            };
            for s in 0..parcels {
                let shipment_id = format!("shp-{order_id}-{s}");
                let skus = items
                    .iter()
                    .skip(s)
                    .step_by(parcels)
                    .map(|i| i.sku.clone())
                    .collect();
                let carrier = CARRIERS[g.rng.below(CARRIERS.len() as u64) as usize].to_string();
                let tracking_url = g
                    .rng
                    .chance(0.85)
                    .then(|| format!("https://track.example/{shipment_id}"));
                g.push(
                    &customer,
                    "oms",
                    ship_at + s as i64 * HOUR,
                    Fact::ShipmentDispatched(ShipmentDispatched {
                        order_id: order_id.clone(),
                        shipment_id: shipment_id.clone(),
                        carrier,
                        tracking_url,
                        skus,
                        estimated_delivery: Some(ship_at + 3 * DAY),
                    }),
                );
                if paid_at.is_none() {
                    continue;
                }
                if g.rng.chance(0.1) {
                    g.push(
                        &customer,
                        "oms",
                        ship_at + DAY,
                        Fact::ShipmentDelayed(ShipmentDelayed {
                            order_id: order_id.clone(),
                            shipment_id: shipment_id.clone(),
                            new_estimated_delivery: ship_at + 5 * DAY,
                            reason: Some("weather".into()),
                        }),
                    );
                }
                g.push(
                    &customer,
                    "oms",
                    ship_at + 2 * DAY + 8 * HOUR,
                    Fact::ShipmentOutForDelivery(ShipmentOutForDelivery {
                        order_id: order_id.clone(),
                        shipment_id: shipment_id.clone(),
                    }),
                );
                g.push(
                    &customer,
                    "oms",
                    ship_at + 2 * DAY + 14 * HOUR,
                    Fact::ShipmentDelivered(ShipmentDelivered {
                        order_id: order_id.clone(),
                        shipment_id,
                    }),
                );
            }
            if g.rng.chance(0.08) {
                let partial = g.rng.chance(0.6);
                let refund = if partial {
                    amount.minor_units / 3
                } else {
                    amount.minor_units
                };
                g.push(
                    &customer,
                    "billing",
                    ship_at + 4 * DAY,
                    Fact::RefundIssued(RefundIssued {
                        order_id: order_id.clone(),
                        refund_id: format!("ref-{order_id}"),
                        amount: g.money(refund, currency),
                        partial,
                    }),
                );
            }
        }
        // Marketing opt-outs land two days before a cart at the earliest, so that the check
        // compares against a consent state every topic has caught up with.
        let cart_at = t0 + 8 * DAY + g.rng.below(6 * DAY as u64) as i64;
        if marketing && g.rng.chance(0.15) {
            let at = if g.rng.chance(0.5) {
                cart_at - 2 * DAY
            } else {
                cart_at + 2 * DAY
            };
            g.push(
                &customer,
                "crm",
                at,
                Fact::ConsentRevoked(ConsentChange {
                    purpose: Purpose::Marketing,
                    channel: Channel::Whatsapp,
                    source: "preference_center".into(),
                    artifact_id: format!("pref-{customer}"),
                }),
            );
        }
        if g.rng.chance(0.35) {
            // Some customers leave several carts within hours: frequency caps must hold.
            let carts = 1 + usize::from(g.rng.chance(0.3)) + usize::from(g.rng.chance(0.2));
            for k in 0..carts {
                let priced = g.rng.chance(0.88);
                let items = g.items(currency, priced);
                g.push(
                    &customer,
                    "oms",
                    cart_at + k as i64 * 3 * HOUR,
                    Fact::CartAbandoned(CartAbandoned {
                        cart_id: format!("cart-{c:06}-{k}"),
                        total: total(&items),
                        items,
                    }),
                );
            }
        }
        if g.rng.chance(0.1) {
            let at = t0 + 10 * DAY;
            g.push(
                &customer,
                "billing",
                at,
                Fact::SubscriptionRenewalDue(SubscriptionRenewalDue {
                    subscription_id: format!("sub-{c:06}"),
                    due_at: at + 3 * DAY,
                    amount: g.money(2900, currency),
                }),
            );
        }
        if g.rng.chance(0.1) {
            let text = INBOUND[g.rng.below(INBOUND.len() as u64) as usize];
            g.push(
                &customer,
                "provider",
                t0 + 5 * DAY,
                Fact::InboundMessageReceived(InboundMessageReceived {
                    provider_message_id: format!("wamid.in-{c}"),
                    text: text.into(),
                    message_type: Some("text".into()),
                    button_payload: None,
                    reply_id: None,
                }),
            );
        }
    }
    // About one customer in a hundred asks to be forgotten late in the month: their personal
    // data leaves state and the query projection. Chosen by number, not drawn, so that the
    // rest of the month is the same with or without them and small demos have some too.
    for c in 0..customers {
        if c % 97 == 50 {
            let customer = format!("cust-{c:06}");
            g.push(
                &customer,
                "crm",
                EPOCH + 27 * DAY + (c as i64 % 1000) * 60_000,
                Fact::ErasureRequested(ErasureRequested {
                    request_id: format!("erase-{c:06}"),
                }),
            );
        }
    }
    // A few records no decoder can read: they must land in the dead-letter topic.
    for i in 0..12u64 {
        let at = EPOCH + (i as i64) * DAY;
        let bytes = if i % 2 == 0 {
            b"{\"not\":\"avro\"}".to_vec()
        } else {
            vec![0, 0, 0, 0x7f, 0x7f, 1, 2, 3]
        };
        g.seq += 1;
        g.events.push((
            at,
            g.seq,
            FeedItem::Garbage {
                topic: crate::topology::TopicRole::Oms,
                key: format!("cust-{:06}", i),
                bytes,
            },
        ));
    }
    g.events.sort_by_key(|(at, seq, _)| (*at, *seq));
    Scenario {
        items: g.events.into_iter().map(|(_, _, e)| e).collect(),
        customers,
        re_emitted: g.re_emitted,
    }
}

impl Scenario {
    /// The event ids Herald must accept: every input record's, except the re-emitted copies.
    pub fn facts_to_accept(&self) -> std::collections::HashSet<String> {
        self.items
            .iter()
            .filter_map(|i| match i {
                FeedItem::Event(e) if !self.re_emitted.contains(&e.envelope.event_id) => {
                    Some(e.envelope.event_id.clone())
                }
                _ => None,
            })
            .collect()
    }

    /// Number of records to feed.
    pub fn len(&self) -> usize {
        self.items.len()
    }
    /// Whether there is nothing to feed.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_scenario() {
        let a = generate(50, 7);
        let b = generate(50, 7);
        assert_eq!(a.len(), b.len());
        let ids = |s: &Scenario| -> Vec<String> {
            s.items
                .iter()
                .filter_map(|i| match i {
                    FeedItem::Event(e) => Some(e.envelope.event_id.clone()),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(ids(&a), ids(&b));
    }

    #[test]
    fn ten_thousand_customers_give_over_a_hundred_thousand_events() {
        let s = generate(10_000, 42);
        assert!(s.len() >= 100_000, "{}", s.len());
    }
}
