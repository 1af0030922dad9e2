//! Sixty days of event time on a real Apache Kafka broker (`scripts/kafka`) whose own retention
//! deletes the input topics' records behind Herald: after every step of the run the broker has
//! deleted all of them, and the processors, dispatch and the gateway are all killed and started
//! again. Afterwards no opt-out is lost, no consent forgotten, no message unsent for lack of an
//! address the customer gave, and no erased customer's address is left anywhere Herald writes.
//!
//! The input topics keep their records 12 s here (14 days in production), and the broker checks
//! retention every second. The records carry the time they were written, as most producers
//! stamp them, so retention counts from then; the facts inside are dated over sixty days from
//! tomorrow on. Ahead of the wall clock rather than behind it: the provider simulator stamps
//! its status webhooks with the wall clock, and statuses from far ahead of the facts would
//! make every later order stale.

mod common;

use herald::demo;
use herald::events::*;
use herald::registry::Codec;
use herald::scenario::FeedItem;
use herald::topology::Topology;
use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const DAY: Millis = 86_400_000;
/// The regular customers; 0 and 1 say STOP, 2 withdraws transactional consent, 3 is erased,
/// 4 gives a new number.
const CUSTOMERS: usize = 10;
const SKU: &str = "HG-CER-VASE";

fn customer(i: usize) -> String {
    format!("cust-{:06}", 200 + i)
}

fn phone(i: usize) -> String {
    format!("+1555020{:04}", i)
}

/// A second number customer 4 gives on day 48.
const NEW_PHONE: &str = "+15550299999";

fn event(customer: &str, id: &str, at: Millis, fact: Fact) -> FeedItem {
    FeedItem::Event(InputEvent::new("long-horizon", customer, id, at, fact))
}

fn profile(customer: &str, id: &str, at: Millis, phone: &str) -> FeedItem {
    event(
        customer,
        id,
        at,
        Fact::ProfileChanged(ProfileChanged {
            first_name: Some("Ana".into()),
            locale: Some("en_US".into()),
            time_zone: Some("UTC".into()),
            phone_e164: Some(phone.into()),
            email: None,
        }),
    )
}

fn consent(customer: &str, id: &str, at: Millis, purpose: Purpose, granted: bool) -> FeedItem {
    let change = ConsentChange {
        purpose,
        channel: Channel::Whatsapp,
        source: "checkout".into(),
        artifact_id: format!("form-{id}"),
    };
    event(
        customer,
        id,
        at,
        if granted {
            Fact::ConsentGranted(change)
        } else {
            Fact::ConsentRevoked(change)
        },
    )
}

fn order(customer: &str, id: &str, at: Millis) -> FeedItem {
    event(
        customer,
        id,
        at,
        Fact::OrderPlaced(OrderPlaced {
            order_id: format!("o-{id}"),
            items: vec![],
            total: Some(Money {
                minor_units: 4_500,
                currency: "EUR".into(),
            }),
        }),
    )
}

fn cart(customer: &str, id: &str, at: Millis) -> FeedItem {
    event(
        customer,
        id,
        at,
        Fact::CartAbandoned(CartAbandoned {
            cart_id: format!("cart-{id}"),
            items: vec![LineItem {
                sku: SKU.into(),
                name: "Ceramic vase".into(),
                quantity: 1,
                unit_price: Some(Money {
                    minor_units: 6_200,
                    currency: "EUR".into(),
                }),
            }],
            total: Some(Money {
                minor_units: 6_200,
                currency: "EUR".into(),
            }),
        }),
    )
}

#[test]
fn sixty_days_with_the_inputs_deleted_behind_herald_and_every_process_restarted() {
    let broker = common::start_broker(
        1,
        &[
            "--broker-config",
            "log.retention.check.interval.ms=1000",
            "--broker-config",
            "log.cleaner.backoff.ms=1000",
        ],
    );
    let rt = common::runtime();
    let topology = Topology::embedded().unwrap();
    let simulator = herald::provider::SimulatorOptions {
        duplicate_webhook_rate: 0.0,
        undeliverable_rate: 0.0,
        template_paused_rate: 0.0,
        transient_failure_rate: 0.0,
        ..demo::demo_simulator()
    };
    let cluster = demo::start_cluster_on(
        &rt,
        &topology,
        simulator,
        Some(&broker.settings(true, "test")),
    )
    .unwrap();
    let codec = Codec::new(&cluster.registry_url, &topology.names).unwrap();
    rt.block_on(codec.register_all()).unwrap();
    let producer = cluster.settings(true, "feeder").producer(None).unwrap();
    let admin: AdminClient<DefaultClientContext> = cluster
        .settings(false, "admin")
        .consumer_config("unused", "long-horizon-admin", &[])
        .create()
        .unwrap();
    let reader: rdkafka::consumer::BaseConsumer = cluster
        .settings(false, "reader")
        .consumer_config("unused", "long-horizon-reader", &[])
        .create()
        .unwrap();

    // The broker's own retention on the input topics, and a contact changelog that rolls and
    // compacts within seconds, so an erased card is really cleaned away. (AlterConfigs replaces
    // a topic's whole configuration: the cleanup policy is restated.)
    let inputs = topology.names.inputs();
    let contacts = topology.names.contacts().to_string();
    let mut alter: Vec<AlterConfig> = inputs
        .iter()
        .map(|t| {
            AlterConfig::new(ResourceSpecifier::Topic(t))
                .set("cleanup.policy", "delete")
                .set("retention.ms", "12000")
                .set("segment.ms", "1000")
        })
        .collect();
    alter.push(
        AlterConfig::new(ResourceSpecifier::Topic(&contacts))
            .set("cleanup.policy", "compact")
            .set("retention.ms", "-1")
            .set("max.compaction.lag.ms", "1000")
            .set("segment.ms", "1000")
            .set("min.cleanable.dirty.ratio", "0.01")
            .set("min.compaction.lag.ms", "0"),
    );
    for r in rt
        .block_on(admin.alter_configs(&alter, &AdminOptions::new()))
        .unwrap()
    {
        r.expect("topic settings changed");
    }

    let dir = tempfile::tempdir().unwrap();
    // A stage started and ready (joined, restored, consuming): facts fed before that could
    // outlive their 12 s on the broker unread.
    let stage = |stage: &str| {
        let metrics = common::free_port();
        let child = common::Killed(
            common::stage_command(
                &cluster,
                stage,
                "long-horizon",
                &dir.path().join(format!("{stage}.redb")),
            )
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics}")])
            .spawn()
            .expect("herald starts"),
        );
        common::wait_ready(&rt, stage, metrics, 90);
        child
    };
    let gateway = || common::start_gateway(&rt, &cluster);
    let stop_from = |listen: u16, number: &str, id: &str, at: Millis| {
        let body = common::inbound_text(number, id, at / 1000, "STOP");
        assert_eq!(
            common::post_signed(&rt, listen, &body),
            200,
            "STOP from {number}"
        );
    };
    // Every decision so far, by customer, as summaries.
    let decided = || {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for d in common::read_decisions(&rt, &cluster, &codec, &topology) {
            let summary = match &d.outcome {
                Outcome::EventAccepted(a) => format!("accepted:{}", a.envelope.event_id),
                other => other.summary(),
            };
            out.entry(d.customer_id).or_default().push(summary);
        }
        out
    };
    let sends_to = |number: &str| {
        cluster
            .simulator
            .sent()
            .into_iter()
            .filter(|s| s.to.trim_start_matches('+') == number.trim_start_matches('+'))
            .map(|s| s.template)
            .collect::<Vec<_>>()
    };
    let wait = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(180);
        while !done() {
            assert!(
                Instant::now() < deadline,
                "{what}; decided: {:?}",
                decided()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    let accepted = |items: &[FeedItem]| {
        let ids = common::event_ids(items);
        move || {
            let all: BTreeSet<String> = decided()
                .into_values()
                .flatten()
                .filter_map(|s| s.strip_prefix("accepted:").map(str::to_string))
                .collect();
            ids.iter().all(|id| all.contains(id))
        }
    };
    let inputs_deleted = || {
        inputs.iter().all(|t| {
            (0..topology.partitions()).all(|p| {
                let (low, high) = herald::kafka::watermarks(&reader, t, p).unwrap();
                low == high
            })
        })
    };
    let stock = |at: Millis| {
        let level = StockLevel {
            sku: SKU.into(),
            available: 40,
            updated_at: at,
            source_system: "wms".into(),
        };
        let value = rt.block_on(codec.encode_stock(&level)).unwrap();
        rt.block_on(
            producer.send(
                FutureRecord::to(topology.names.inventory())
                    .key(SKU)
                    .payload(&value),
                Duration::from_secs(10),
            ),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    };

    let t0 = {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as Millis;
        // Noon UTC tomorrow: quiet hours never hold a message.
        now - now.rem_euclid(DAY) + DAY + DAY / 2
    };
    let day = |d: i64| t0 + d * DAY;
    // One step of the run: its facts fed, decided and (sends) sent; then the broker deletes
    // every input record and every Herald process is killed and started again.
    let processes =
        std::cell::RefCell::new(Some((stage("processors"), stage("dispatch"), gateway())));
    let step = |name: &str, items: Vec<FeedItem>, sends: &dyn Fn() -> bool| {
        common::feed(&rt, &producer, &codec, &items);
        wait(&format!("{name}: facts decided"), &accepted(&items));
        wait(&format!("{name}: messages sent"), sends);
        wait(
            &format!("{name}: inputs deleted by retention"),
            &inputs_deleted,
        );
        *processes.borrow_mut() = None;
        *processes.borrow_mut() = Some((stage("processors"), stage("dispatch"), gateway()));
    };
    let confirmations = |number: &str| {
        sends_to(number)
            .iter()
            .filter(|t| *t == "order_confirmation")
            .count()
    };
    let orders_sent = |n: usize| {
        move || {
            (0..CUSTOMERS)
                .filter(|i| ![2, 3, 4].contains(i))
                .all(|i| confirmations(&phone(i)) >= n)
        }
    };

    // Day 0: every customer's profile and consent.
    let mut first = Vec::new();
    for i in 0..CUSTOMERS {
        let c = customer(i);
        first.push(profile(&c, &format!("p{i}"), day(0), &phone(i)));
        first.push(consent(
            &c,
            &format!("ct{i}"),
            day(0) + 60_000,
            Purpose::Transactional,
            true,
        ));
        first.push(consent(
            &c,
            &format!("cm{i}"),
            day(0) + 60_000,
            Purpose::Marketing,
            true,
        ));
    }
    step("day 0", first, &|| true);

    // Day 12: everyone orders.
    let orders = |d: i64| {
        (0..CUSTOMERS)
            .map(|i| order(&customer(i), &format!("d{d}-{i}"), day(d)))
            .collect::<Vec<_>>()
    };
    step("day 12", orders(12), &orders_sent(1));

    // Day 24: customers 0 and 1 say STOP to the gateway started after their profiles were
    // deleted; customer 2 withdraws transactional consent; everyone else orders.
    {
        let listen = processes.borrow().as_ref().unwrap().2 .1;
        stop_from(listen, &phone(0), "wamid.STOP0", day(24) - 7_200_000);
        stop_from(listen, &phone(1), "wamid.STOP1", day(24) - 7_200_000);
    }
    let opted_out = || {
        let d = decided();
        [0, 1].iter().all(|i| {
            d.get(&customer(*i))
                .is_some_and(|s| s.iter().any(|s| s.starts_with("OptedOut:")))
        })
    };
    wait("the STOPs recorded as opt-outs", &opted_out);
    let mut items = vec![consent(
        &customer(2),
        "rt2",
        day(24) - 60_000,
        Purpose::Transactional,
        false,
    )];
    // Customer 2 orders next on day 36: an order on another topic in the same instant as the
    // withdrawal may be decided before it.
    items.extend(
        orders(24)
            .into_iter()
            .filter(|o| !matches!(o, FeedItem::Event(e) if e.envelope.customer_id == customer(2))),
    );
    step("day 24", items, &orders_sent(2));

    // Day 36: customer 3 is erased; everyone orders.
    let mut items = vec![event(
        &customer(3),
        "er3",
        day(36) - 60_000,
        Fact::ErasureRequested(ErasureRequested {
            request_id: "req-3".into(),
        }),
    )];
    items.extend(orders(36));
    step("day 36", items, &orders_sent(3));

    // Day 48: customer 4 gives a new number; newcomers arrive (their cards roll every
    // partition of the contact changelog, so the cleaner can compact the erased card); everyone
    // else orders. (Customer 4 orders next on day 60: an order on another topic in the same
    // instant as the profile change may be decided before it.)
    let mut items = vec![profile(&customer(4), "p4b", day(48) - 60_000, NEW_PHONE)];
    for n in 0..30 {
        items.push(profile(
            &format!("new-{n:03}"),
            &format!("pn{n}"),
            day(48),
            &format!("+1555030{n:04}"),
        ));
    }
    items.extend(
        orders(48)
            .into_iter()
            .filter(|o| !matches!(o, FeedItem::Event(e) if e.envelope.customer_id == customer(4))),
    );
    // The stock level the day-60 carts are checked against, read by the restarted processors.
    stock(day(60) - 3_600_000);
    step("day 48", items, &orders_sent(4));

    // Day 60: everyone leaves a cart (marketing), then orders.
    let mut items: Vec<FeedItem> = (0..CUSTOMERS)
        .map(|i| cart(&customer(i), &format!("cart{i}"), day(60) - 1_800_000))
        .collect();
    for n in 30..40 {
        items.push(profile(
            &format!("new-{n:03}"),
            &format!("pn{n}"),
            day(60),
            &format!("+1555030{n:04}"),
        ));
    }
    items.extend(orders(60));
    step("day 60", items, &orders_sent(5));

    // No message unsent for lack of an address, and no consent forgotten: every order of a
    // customer with consent was confirmed to the number they gave at the time.
    for i in [0, 1, 5, 6, 7, 8, 9] {
        assert_eq!(confirmations(&phone(i)), 5, "{}'s orders", customer(i));
    }
    assert_eq!(
        (confirmations(&phone(4)), confirmations(NEW_PHONE)),
        (3, 1),
        "customer 4's orders, before and after the new number"
    );
    // Withdrawn consent stays withdrawn: only the order before it was confirmed.
    assert_eq!(
        confirmations(&phone(2)),
        1,
        "customer 2 withdrew consent on day 24"
    );
    let d = decided();
    let suppressed = |i: usize| {
        d.get(&customer(i))
            .map(|s| {
                s.iter()
                    .filter(|s| s.starts_with("MessageSuppressed:order_confirmation:NoConsent"))
                    .count()
            })
            .unwrap_or(0)
    };
    assert_eq!(
        suppressed(2),
        3,
        "customer 2's later orders: {:?}",
        d.get(&customer(2))
    );

    // No opt-out lost: the STOPs of day 24 still hold on day 60, while the others' carts are
    // reminded (one in ten customers is held out of the journey).
    let marketing = |i: usize| {
        sends_to(&phone(i))
            .iter()
            .filter(|t| t.starts_with("cart_"))
            .count()
    };
    assert_eq!((marketing(0), marketing(1)), (0, 0), "marketing after STOP");
    for i in [0, 1] {
        assert!(
            d.get(&customer(i)).is_some_and(|s| s
                .iter()
                .any(|s| s == "MessageSuppressed:cart_reminder:NoConsent")),
            "{}'s cart: {:?}",
            customer(i),
            d.get(&customer(i))
        );
    }
    let reminded = [5, 6, 7, 8, 9]
        .iter()
        .filter(|i| marketing(**i) > 0)
        .count();
    assert!(
        reminded >= 3,
        "only {reminded} of five consenting customers got a cart reminder"
    );

    // No erased customer's address left anywhere Herald writes: the erased customer had two
    // confirmations before the erasure and none after, and once the cleaner has compacted the
    // contact changelog no record of any Herald topic, nor either store, holds their number.
    assert_eq!(
        confirmations(&phone(3)),
        2,
        "customer 3 was erased on day 36"
    );
    *processes.borrow_mut() = None;
    let erased = phone(3);
    let digits = erased.trim_start_matches('+').to_string();
    let holds_number = |bytes: &[u8]| {
        [erased.as_bytes(), digits.as_bytes()]
            .iter()
            .any(|n| bytes.windows(n.len()).any(|w| w == *n))
    };
    let mut topics: Vec<String> = vec![
        topology.names.decisions().to_string(),
        topology.names.dispatch().to_string(),
        topology.names.dlq().to_string(),
        contacts.clone(),
    ];
    topics.extend(inputs.iter().cloned());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut found = Vec::new();
        for t in &topics {
            demo::read_topic(&cluster.bootstrap, t, topology.partitions(), |m| {
                if m.payload().is_some_and(holds_number) {
                    found.push(format!("{t}/{}@{}", m.partition(), m.offset()));
                }
                Ok(())
            })
            .unwrap();
        }
        if found.is_empty() {
            break;
        }
        // Only the contact changelog may still hold it, until the cleaner has run.
        assert!(
            found.iter().all(|f| f.starts_with(&contacts)),
            "the erased number is still in {found:?}"
        );
        assert!(
            Instant::now() < deadline,
            "the contact changelog was never compacted: the erased number is in {found:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    for store in ["processors", "dispatch"] {
        let bytes = std::fs::read(dir.path().join(format!("{store}.redb"))).unwrap();
        assert!(
            !holds_number(&bytes),
            "the {store} store holds the erased number"
        );
    }
}
