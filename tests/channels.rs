//! Dispatch across channels against the in-process cluster and the simulator: an SMS and a
//! WhatsApp session message go out as the catalog's text with the approval's values; an
//! e-mail approved while no e-mail provider is configured is not lost but dead-lettered with
//! the settings that would send it, and recorded as failed on the dispatch topic; refusals in
//! a call's answer that policy must hear of (a paused template, an invalid SMS number) are
//! written back to the provider topic as the failed statuses the provider would have posted.
//! Once e-mail is configured, `herald dlq replay` sends the dead-lettered e-mail exactly once,
//! however often it is replayed.

mod common;

use herald::demo;
use herald::events::*;
use herald::kafka::{self, KafkaSettings, SharedStore};
use herald::provider::sms::SmsClient;
use herald::provider::whatsapp::CloudApiClient;
use herald::provider::Providers;
use herald::registry::Codec;
use herald::stages::DispatchStage;
use herald::store::EmbeddedStore;
use herald::telemetry::Metrics;
use herald::topology::Topology;
use rdkafka::producer::FutureRecord;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn approval(id: &str, channel: Channel, delivery: Delivery, recipient: &str) -> Decision {
    let m = MessageApproved {
        message_id: id.into(),
        trigger_event_id: format!("e-{id}"),
        template_name: "order_confirmation".into(),
        template_version: 3,
        locale: "en_US".into(),
        purpose: Purpose::Transactional,
        channel,
        // Clear addresses: no CRM directory is needed to resolve them.
        recipient: recipient.into(),
        variables: herald::sorted_map::SortedMap::from([
            ("first_name".to_string(), "Ana".to_string()),
            ("order_id".to_string(), format!("A-{id}")),
            ("total".to_string(), "EUR 12.50".to_string()),
        ]),
        consent_artifact_id: "form-1".into(),
        consent_granted_at: 0,
        category: "UTILITY".into(),
        delivery,
        journey: None,
        relied_on: Default::default(),
    };
    Decision {
        decision_id: format!("d-{id}"),
        customer_id: "cust-000777".into(),
        input_event_id: format!("e-{id}"),
        processor: Processor::Policy,
        decided_at: 0,
        policy_version: "channels-test".into(),
        outcome: Outcome::MessageApproved(m.into()),
        consent_chain: None,
    }
}

#[test]
fn text_channels_carry_the_catalog_text_and_a_channel_without_provider_is_dead_lettered() {
    let rt = common::runtime();
    let topology = Topology::embedded().unwrap();
    // Every WhatsApp template send is refused as paused (session messages are not).
    let simulator = herald::provider::SimulatorOptions {
        template_paused_rate: 1.0,
        ..demo::demo_simulator()
    };
    let cluster = demo::start_cluster_on(
        &rt,
        &topology,
        simulator,
        Some(&common::broker().settings(true, "test")),
    )
    .unwrap();
    let codec = Arc::new(Codec::new(&cluster.registry_url, &topology.names).unwrap());
    rt.block_on(codec.register_all()).unwrap();
    let dir = demo::fresh_temp_dir("channels").unwrap();
    let store: SharedStore = Arc::new(EmbeddedStore::open(&dir.join("dispatch.redb")).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let metrics = Metrics::shared().expect("metrics");
    let settings = KafkaSettings::new(&cluster.bootstrap, true, "channels");
    let providers = Providers::default()
        .with(Arc::new(
            CloudApiClient::new(&cluster.simulator_url, "1055501234567890", "t").unwrap(),
        ))
        .with(Arc::new(
            SmsClient::new(
                &cluster.simulator_url,
                demo::DEMO_SMS_ACCOUNT,
                demo::DEMO_SMS_TOKEN,
                demo::DEMO_SMS_FROM,
                // The simulator knows Herald's message id from the callback URL only.
                Some(&format!("{}/webhooks/sms", cluster.gateway_root)),
                Duration::from_secs(5),
            )
            .unwrap(),
        ))
        .without(Channel::Email, "set --email-api-key and --email-from");
    let start_dispatch = |providers: Providers, stop: Arc<AtomicBool>| {
        let (settings, metrics, codec, h, store) = (
            settings.clone(),
            metrics.clone(),
            codec.clone(),
            rt.handle().clone(),
            store.clone(),
        );
        let catalog = topology.catalog.clone();
        std::thread::spawn(move || {
            let mut stage = DispatchStage::new(
                codec,
                store,
                providers,
                catalog,
                h.clone(),
                metrics.clone(),
                herald::identity::IdentifierKey::demo(),
            );
            kafka::run_stage(&settings, &mut stage, &stop, &metrics, &h)
        })
    };
    let dispatch = start_dispatch(providers.clone(), stop.clone());
    let producer = settings.producer(None).unwrap();
    for d in [
        approval("sms-1", Channel::Sms, Delivery::Template, "+34600000777"),
        approval(
            "session-1",
            Channel::Whatsapp,
            Delivery::Session,
            "+34600000777",
        ),
        approval(
            "mail-1",
            Channel::Email,
            Delivery::Template,
            "ana@example.com",
        ),
        approval(
            "paused-1",
            Channel::Whatsapp,
            Delivery::Template,
            "+34600000777",
        ),
        approval("badnumber-1", Channel::Sms, Delivery::Template, "+12"),
    ] {
        let bytes = rt.block_on(codec.encode_decision(&d)).unwrap();
        let record = FutureRecord::to("herald.decisions.v1")
            .key(d.customer_id.as_bytes())
            .payload(&bytes);
        rt.block_on(producer.send(record, Duration::from_secs(10)))
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while cluster.simulator.sent_count() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // The dead letter and the failure are committed with the batch that tried the call.
    let mut letters = Vec::new();
    let mut failures = Vec::new();
    let mut refusals = Vec::new();
    while Instant::now() < deadline {
        letters.clear();
        failures.clear();
        refusals.clear();
        demo::read_topic(
            &cluster.bootstrap,
            "provider.events.v1",
            topology.partitions(),
            |m| {
                use rdkafka::message::Message;
                let e = rt
                    .block_on(codec.decode_input("provider.events.v1", m.payload()))
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                if let (Fact::MessageStatusChanged(s), "dispatch") =
                    (&e.fact, e.envelope.source_system.as_str())
                {
                    refusals.push((
                        s.message_id.clone().unwrap_or_default(),
                        s.status,
                        s.error_code,
                        e.envelope.customer_id.clone(),
                    ));
                }
                Ok(())
            },
        )
        .unwrap();
        demo::read_topic(
            &cluster.bootstrap,
            "herald.dlq.v1",
            topology.partitions(),
            |m| {
                use rdkafka::message::Message;
                letters.push(
                    rt.block_on(codec.decode_dead_letter(m.payload()))
                        .map_err(|e| anyhow::anyhow!("{e}"))?,
                );
                Ok(())
            },
        )
        .unwrap();
        demo::read_topic(
            &cluster.bootstrap,
            "herald.dispatch.v1",
            topology.partitions(),
            |m| {
                use rdkafka::message::Message;
                let r = rt
                    .block_on(codec.decode_dispatch(m.payload()))
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                if let DispatchStep::Failed(f) = &r.step {
                    failures.push((r.message_id.clone(), f.detail.clone()));
                }
                Ok(())
            },
        )
        .unwrap();
        if !letters.is_empty() && failures.len() >= 3 && refusals.len() >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::SeqCst);
    let _ = dispatch.join();

    let sent = cluster.simulator.sent();
    let text = "Hi Ana, thanks for your order A-sms-1. Total: EUR 12.50.";
    let sms = sent
        .iter()
        .find(|s| s.message_id == "sms-1")
        .unwrap_or_else(|| panic!("the SMS went out: {sent:?}"));
    assert_eq!(
        (sms.channel, sms.text.as_deref()),
        (Channel::Sms, Some(text))
    );
    let session = sent
        .iter()
        .find(|s| s.message_id == "session-1")
        .expect("the session message went out");
    assert_eq!(session.channel, Channel::Whatsapp);
    assert_eq!(
        session.text.as_deref(),
        Some("Hi Ana, thanks for your order A-session-1. Total: EUR 12.50."),
        "a session message is text, not a template"
    );
    assert!(
        sent.iter().all(|s| s.message_id != "mail-1"),
        "no e-mail provider"
    );
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].stage, "dispatch");
    assert!(
        letters[0].error.contains("no Email provider")
            && letters[0].error.contains("--email-api-key"),
        "the dead letter names the missing settings: {}",
        letters[0].error
    );
    failures.sort();
    let failed: Vec<&str> = failures.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(
        failed,
        ["badnumber-1", "mail-1", "paused-1"],
        "{failures:?}; refusals {refusals:?}; sent {sent:?}; metrics {}",
        metrics.render()
    );
    refusals.sort_by(|a, b| a.0.cmp(&b.0));
    let customer = "cust-000777".to_string();
    assert_eq!(
        refusals,
        vec![
            (
                "badnumber-1".to_string(),
                MessageStatus::Failed,
                Some(21211),
                customer.clone()
            ),
            (
                "paused-1".to_string(),
                MessageStatus::Failed,
                Some(132015),
                customer
            ),
        ],
        "each refusal policy must hear of is on the provider topic once"
    );

    // Once e-mail is configured, `herald dlq replay` sends the dead-lettered e-mail, once,
    // however often it is replayed.
    let stop = Arc::new(AtomicBool::new(false));
    let with_email = providers.clone().with(Arc::new(
        herald::provider::email::EmailClient::new(
            &cluster.simulator_url,
            "SG.test",
            demo::DEMO_EMAIL_FROM,
            Duration::from_secs(5),
        )
        .unwrap(),
    ));
    let dispatch = start_dispatch(with_email, stop.clone());
    let mails = || {
        cluster
            .simulator
            .sent()
            .iter()
            .filter(|s| s.message_id == "mail-1")
            .count()
    };
    for round in 0..2 {
        let o = common::herald(&[
            "dlq",
            "replay",
            "--reason",
            "no Email provider",
            "--execute",
            "--bootstrap",
            &cluster.bootstrap,
            "--registry",
            &cluster.registry_url,
        ]);
        assert!(o.status.success(), "{}", common::text(&o));
        let deadline = Instant::now() + Duration::from_secs(30);
        while mails() == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if round == 1 {
            // Time for a second send, were dispatch to make one.
            std::thread::sleep(Duration::from_secs(3));
        }
        assert_eq!(mails(), 1, "after replay {}", round + 1);
    }
    stop.store(true, Ordering::SeqCst);
    let _ = dispatch.join();
    let _ = std::fs::remove_dir_all(&dir);
}
