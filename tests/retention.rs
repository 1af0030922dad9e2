//! What Herald must not forget when an input topic's retention deletes a customer's profile,
//! on a real Apache Kafka broker (`scripts/kafka`). The processors write every address they
//! learn to the compacted contact changelog (`herald.contacts.v1`); once the CRM topic's
//! records are gone (deleted as retention would), a fresh dispatch still sends to the address
//! the customer gave, an address given later joins the restored card rather than replacing
//! it, a fresh gateway still routes the customer's STOP to them, and an erasure
//! leaves a tombstone as the customer's last card. A template the provider paused stays
//! paused across a restart once the provider topic's records are gone too.

mod common;

use herald::demo;
use herald::events::*;
use herald::scenario::FeedItem;
use herald::topology::Topology;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::Message;
use rdkafka::TopicPartitionList;
use std::time::{Duration, Instant};

const CUSTOMER: &str = "cust-000042";
const PHONE: &str = "+15550100042";
const EMAIL: &str = "ana42@example.com";
/// A second customer, who only ever orders after the provider paused the template.
const OTHER: &str = "cust-000043";

fn fact(id: &str, at: Millis, fact: Fact) -> FeedItem {
    fact_of(CUSTOMER, id, at, fact)
}

fn fact_of(customer: &str, id: &str, at: Millis, fact: Fact) -> FeedItem {
    FeedItem::Event(InputEvent {
        envelope: Envelope {
            event_id: id.into(),
            source_system: "retention-test".into(),
            source_sequence: None,
            occurred_at: at,
            customer_id: customer.into(),
            trace_parent: None,
            schema_version: 1,
        },
        fact,
    })
}

fn order(id: &str, order_id: &str, at: Millis) -> FeedItem {
    order_of(CUSTOMER, id, order_id, at)
}

fn order_of(customer: &str, id: &str, order_id: &str, at: Millis) -> FeedItem {
    fact_of(
        customer,
        id,
        at,
        Fact::OrderPlaced(OrderPlaced {
            order_id: order_id.into(),
            items: vec![],
            total: Some(Money {
                minor_units: 4_500,
                currency: "EUR".into(),
            }),
        }),
    )
}

#[test]
fn addresses_outlive_the_crm_topic_and_erasure_leaves_a_tombstone() {
    let broker = common::start_broker(1, &[]);
    let rt = common::runtime();
    let topology = Topology::embedded().unwrap();
    let (cluster, codec) = common::demo_cluster(&rt, &topology, &broker);
    let producer = cluster.settings(true, "feeder").producer(None).unwrap();
    // Two months ago: the profile and consent, then an order.
    let t0 = 1_790_000_000_000;
    let consent = |id: &str, purpose| {
        fact(
            id,
            t0 + 60_000,
            Fact::ConsentGranted(ConsentChange {
                purpose,
                channel: Channel::Whatsapp,
                source: "checkout".into(),
                artifact_id: format!("form-{id}"),
            }),
        )
    };
    common::feed(
        &rt,
        &producer,
        &codec,
        &[
            fact(
                "p1",
                t0,
                Fact::ProfileChanged(ProfileChanged {
                    first_name: Some("Ana".into()),
                    locale: Some("en_US".into()),
                    time_zone: Some("UTC".into()),
                    phone_e164: Some(PHONE.into()),
                    email: None,
                }),
            ),
            consent("ct", Purpose::Transactional),
            consent("cm", Purpose::Marketing),
            order("o1", "o-1", t0 + 3_600_000),
            fact_of(
                OTHER,
                "p43",
                t0,
                Fact::ProfileChanged(ProfileChanged {
                    first_name: Some("Bea".into()),
                    locale: Some("en_US".into()),
                    time_zone: Some("UTC".into()),
                    phone_e164: Some("+15550100043".into()),
                    email: None,
                }),
            ),
            fact_of(
                OTHER,
                "ct43",
                t0 + 60_000,
                Fact::ConsentGranted(ConsentChange {
                    purpose: Purpose::Transactional,
                    channel: Channel::Whatsapp,
                    source: "checkout".into(),
                    artifact_id: "form-ct43".into(),
                }),
            ),
        ],
    );

    let run = |stage: &str, store: &std::path::Path| {
        common::Killed(
            common::stage_command(&cluster, stage, "retention", store)
                .args(["--metrics-addr", "127.0.0.1:0"])
                .spawn()
                .expect("herald starts"),
        )
    };
    let sent_to_customer = || {
        cluster
            .simulator
            .sent()
            .into_iter()
            .filter(|s| s.to.trim_start_matches('+') == PHONE.trim_start_matches('+'))
            .count()
    };
    // The customer's decisions, for a failure to show what was decided instead.
    let decided_for = |customer: &str| {
        let mut out: Vec<String> = common::read_decisions(&rt, &cluster, &codec, &topology)
            .into_iter()
            .filter(|d| d.customer_id == customer)
            .map(|d| d.outcome.summary())
            .collect();
        demo::read_topic(
            &cluster.bootstrap,
            topology.names.dispatch(),
            topology.partitions(),
            |m| {
                let r = rt
                    .block_on(codec.decode_dispatch(m.payload()))
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                if r.customer_id == customer {
                    out.push(format!("{:?}", r.step));
                }
                Ok(())
            },
        )
        .unwrap();
        out
    };
    let decided = || decided_for(CUSTOMER);
    let wait_sends = |n: usize, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(120);
        while sent_to_customer() < n {
            assert!(
                Instant::now() < deadline,
                "{what}: {} sends; decided {:?}",
                sent_to_customer(),
                decided()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    let first = tempfile::tempdir().unwrap();
    {
        let _p = run("processors", &first.path().join("processors.redb"));
        let _d = run("dispatch", &first.path().join("dispatch.redb"));
        wait_sends(1, "the first order's confirmation");
    }

    // The processors wrote the customer's card to the contact changelog.
    let mut cards = 0;
    demo::read_topic(
        &cluster.bootstrap,
        topology.names.contacts(),
        topology.partitions(),
        |m| {
            cards += usize::from(m.key() == Some(CUSTOMER.as_bytes()));
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(cards, 1, "one contact card for the customer");

    // Retention deletes the CRM topic's records: the profile fact is gone from the inputs.
    let admin: AdminClient<DefaultClientContext> = cluster
        .settings(false, "admin")
        .consumer_config("unused", "retention-admin", &[])
        .create()
        .unwrap();
    let crm = topology.names.crm().to_string();
    let reader: rdkafka::consumer::BaseConsumer = cluster
        .settings(false, "reader")
        .consumer_config("unused", "retention-reader", &[])
        .create()
        .unwrap();
    let mut upto = TopicPartitionList::new();
    for p in 0..topology.partitions() {
        let (_, high) = herald::kafka::watermarks(&reader, &crm, p).unwrap();
        upto.add_partition_offset(&crm, p, rdkafka::Offset::Offset(high))
            .unwrap();
    }
    rt.block_on(admin.delete_records(&upto, &AdminOptions::new()))
        .expect("records deleted");
    for p in 0..topology.partitions() {
        let (low, high) = herald::kafka::watermarks(&reader, &crm, p).unwrap();
        assert_eq!(low, high, "the CRM topic still holds records");
    }

    // Weeks later, with fresh stores (a new node): a second order is confirmed to the address
    // the customer gave, which only the contact changelog still holds.
    common::feed(
        &rt,
        &producer,
        &codec,
        &[order("o2", "o-2", t0 + 30 * 86_400_000)],
    );
    let second = tempfile::tempdir().unwrap();
    let processors = run("processors", &second.path().join("processors.redb"));
    let _d = run("dispatch", &second.path().join("dispatch.redb"));
    wait_sends(
        2,
        "the second order's confirmation after the CRM records were deleted",
    );

    // An e-mail address given now is added to the card the fresh processors restored from the
    // changelog: the new card keeps the phone number, which no input holds any more.
    common::feed(
        &rt,
        &producer,
        &codec,
        &[fact(
            "p2",
            t0 + 30 * 86_400_000 + 60_000,
            Fact::ProfileChanged(ProfileChanged {
                first_name: None,
                locale: None,
                time_zone: None,
                phone_e164: None,
                email: Some(EMAIL.into()),
            }),
        )],
    );
    // The customer's latest record in the contact changelog: `Some(None)` is a tombstone.
    let last_card = || {
        let mut last = None;
        demo::read_topic(
            &cluster.bootstrap,
            topology.names.contacts(),
            topology.partitions(),
            |m| {
                if m.key() == Some(CUSTOMER.as_bytes()) {
                    last = Some(rt.block_on(codec.decode_contact_card(m.payload())).unwrap());
                }
                Ok(())
            },
        )
        .unwrap();
        last
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let card = loop {
        if let Some(Some(card)) = last_card() {
            if card.addresses.values().any(|a| a == EMAIL) {
                break card;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no card with the e-mail address: {:?}",
            decided()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        card.addresses.values().any(|a| a == PHONE),
        "the new card lost the phone number: {card:?}"
    );

    // A gateway started now routes the customer's STOP to them: an opt-out, not a dead letter.
    let (_gateway, listen) = common::start_gateway(&rt, &cluster);
    let post = |body: &[u8]| common::post_signed(&rt, listen, body);
    let stop = common::inbound_text(PHONE, "wamid.STOP42", 1_795_500_000, "STOP");
    assert_eq!(post(&stop), 200);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !decided().iter().any(|d| d.starts_with("OptedOut:")) {
        assert!(
            Instant::now() < deadline,
            "the customer's STOP was not recorded as an opt-out: {:?}",
            decided()
        );
        std::thread::sleep(Duration::from_secs(1));
    }

    // Erasure: the customer's last card is a tombstone, and no later card holds the number.
    common::feed(
        &rt,
        &producer,
        &codec,
        &[fact(
            "er1",
            t0 + 31 * 86_400_000,
            Fact::ErasureRequested(ErasureRequested {
                request_id: "req-42".into(),
            }),
        )],
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match last_card() {
            Some(None) => break,
            Some(Some(card)) => assert!(card.addresses.values().any(|a| a == PHONE)),
            None => panic!("the customer never had a contact card"),
        }
        assert!(Instant::now() < deadline, "no tombstone after the erasure");
        std::thread::sleep(Duration::from_secs(1));
    }

    // The provider pauses the order confirmation. The processors restart on their store after
    // the provider topic's records are gone (it keeps a week): the next order for the second
    // customer is suppressed for the paused template, not sent with it.
    let paused = serde_json::to_vec(&serde_json::json!({
        "object": "whatsapp_business_account",
        "entry": [{"id": "1", "time": 1795500100, "changes": [{"field": "message_template_status_update", "value": {
            "event": "PAUSED", "message_template_id": 3, "message_template_name": "order_confirmation",
            "message_template_language": "en_US", "reason": "LOW_QUALITY"}}]}]
    }))
    .unwrap();
    assert_eq!(post(&paused), 200);
    let paused_decided = || {
        common::read_decisions(&rt, &cluster, &codec, &topology)
            .iter()
            .filter(|d| {
                matches!(&d.outcome, Outcome::EventAccepted(a)
                    if matches!(a.fact, Fact::TemplateStatusChanged(_)))
            })
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while paused_decided() < topology.partitions() as usize {
        assert!(
            Instant::now() < deadline,
            "the pause was not decided on every partition"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(processors);
    let provider = topology.names.provider().to_string();
    let mut upto = TopicPartitionList::new();
    for p in 0..topology.partitions() {
        let (_, high) = herald::kafka::watermarks(&reader, &provider, p).unwrap();
        upto.add_partition_offset(&provider, p, rdkafka::Offset::Offset(high))
            .unwrap();
    }
    rt.block_on(admin.delete_records(&upto, &AdminOptions::new()))
        .expect("provider records deleted");
    let _p = run("processors", &second.path().join("processors.redb"));
    common::feed(
        &rt,
        &producer,
        &codec,
        &[order_of(OTHER, "o43", "o-43", t0 + 32 * 86_400_000)],
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let about_the_order = loop {
        let found: Vec<String> = decided_for(OTHER)
            .into_iter()
            .filter(|d| d.starts_with("MessageApproved") || d.starts_with("MessageSuppressed"))
            .collect();
        if !found.is_empty() {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "no decision on the order: {:?}",
            decided_for(OTHER)
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(
        about_the_order,
        ["MessageSuppressed:order_confirmation:TemplateUnavailable"],
        "the paused template was forgotten across the restart"
    );
}
