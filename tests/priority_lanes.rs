//! Dispatch under load: a marketing backlog many seconds long is already waiting when
//! transactional approvals arrive; each of those must reach the provider (the simulator)
//! within its budget, while the marketing backlog is still far from drained.

mod common;

use herald::demo;
use herald::events::*;
use herald::kafka::{self, KafkaSettings, SharedStore};
use herald::pacing::Limits;
use herald::provider::whatsapp::CloudApiClient;
use herald::provider::{Providers, SimulatorOptions};
use herald::registry::Codec;
use herald::stages::DispatchStage;
use herald::store::EmbeddedStore;
use herald::telemetry::Metrics;
use herald::topology::Topology;
use rdkafka::producer::FutureRecord;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a transactional send may take from its approval to the provider, whatever the
/// marketing load.
const TRANSACTIONAL_BUDGET: Duration = Duration::from_secs(2);
const SENDER_PER_S: f64 = 100.0;
const MARKETING: usize = 3_000;
const TRANSACTIONAL: usize = 40;

fn approval(customer: usize, n: usize, purpose: Purpose) -> Decision {
    let marketing = purpose == Purpose::Marketing;
    let message_id = format!(
        "{}-{customer}-{n}",
        if marketing { "promo" } else { "order" }
    );
    let m = MessageApproved {
        message_id: message_id.clone(),
        trigger_event_id: format!("e-{message_id}"),
        template_name: if marketing {
            "spring_sale"
        } else {
            "order_confirmation"
        }
        .into(),
        template_version: 1,
        locale: "en_US".into(),
        purpose,
        channel: Channel::Whatsapp,
        // A clear number: no CRM directory is needed to resolve it.
        recipient: format!("+1555{customer:07}"),
        variables: Default::default(),
        consent_artifact_id: "form-1".into(),
        consent_granted_at: 0,
        category: if marketing { "MARKETING" } else { "UTILITY" }.into(),
        delivery: Delivery::Template,
        journey: None,
        relied_on: Default::default(),
    };
    Decision {
        decision_id: format!("d-{message_id}"),
        customer_id: format!("cust-{customer:06}"),
        input_event_id: format!("e-{message_id}"),
        processor: Processor::Policy,
        decided_at: 0,
        policy_version: "load-test".into(),
        outcome: Outcome::MessageApproved(m.into()),
        consent_chain: None,
    }
}

#[test]
fn a_marketing_backlog_never_delays_transactional_sends_beyond_their_budget() {
    let rt = common::runtime();
    let topology = Topology::embedded().unwrap();
    let simulator = SimulatorOptions {
        sender_per_s: SENDER_PER_S,
        undeliverable_rate: 0.0,
        template_paused_rate: 0.0,
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
    let dir = demo::fresh_temp_dir("lanes").unwrap();
    let store: SharedStore = Arc::new(EmbeddedStore::open(&dir.join("dispatch.redb")).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let metrics = Metrics::shared().expect("metrics");
    let settings = KafkaSettings::new(&cluster.bootstrap, true, "lanes");
    let dispatch = {
        let (settings, stop, metrics, codec, h) = (
            settings.clone(),
            stop.clone(),
            metrics.clone(),
            codec.clone(),
            rt.handle().clone(),
        );
        let providers = Providers::default().with(Arc::new(
            CloudApiClient::new(&cluster.simulator_url, "1055501234567890", "lanes").unwrap(),
        ));
        let catalog = herald::topology::Topology::embedded().unwrap().catalog;
        std::thread::spawn(move || {
            let mut stage = DispatchStage::new(
                codec,
                store,
                providers,
                catalog,
                h.clone(),
                metrics.clone(),
                herald::identity::IdentifierKey::demo(),
            )
            .with_limits(Limits {
                sender_per_second: SENDER_PER_S,
                sender_burst: SENDER_PER_S,
                ..Limits::default()
            });
            kafka::run_stage(&settings, &mut stage, &stop, &metrics, &h)
        })
    };

    let producer = settings.producer(None).unwrap();
    let produce = |d: &Decision| {
        let bytes = rt.block_on(codec.encode_decision(d)).unwrap();
        let record = FutureRecord::to("herald.decisions.v1")
            .key(d.customer_id.as_bytes())
            .payload(&bytes);
        rt.block_on(producer.send(record, Duration::from_secs(10)))
            .map_err(|(e, _)| e)
            .unwrap();
    };
    // Three promotions each to a thousand customers: half a minute of the sender's rate.
    let mut promos = Vec::new();
    for n in 0..MARKETING / 1_000 {
        for c in 0..1_000 {
            promos.push(approval(c, n, Purpose::Marketing));
        }
    }
    let pending: Vec<_> = promos
        .iter()
        .map(|d| {
            let bytes = rt.block_on(codec.encode_decision(d)).unwrap();
            producer
                .send_result(
                    FutureRecord::to("herald.decisions.v1")
                        .key(d.customer_id.as_bytes())
                        .payload(&bytes),
                )
                .map_err(|(e, _)| e)
                .unwrap()
        })
        .collect();
    for p in pending {
        rt.block_on(p).unwrap().map_err(|(e, _)| e).unwrap();
    }
    let marketing_started = Instant::now();
    let wait_until = |what: &str, limit: Duration, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + limit;
        while !done() {
            assert!(Instant::now() < deadline, "{what} did not happen in time");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_until(
        "the marketing backlog starting",
        Duration::from_secs(60),
        &|| cluster.simulator.sent_count() >= 200,
    );

    // Orders keep coming while the backlog drains; some customers also await a promotion.
    let mut produced_at: HashMap<String, Instant> = HashMap::new();
    let mut seen_at: HashMap<String, Instant> = HashMap::new();
    let mut seen_upto = 0;
    let mut watch = |seen_at: &mut HashMap<String, Instant>| {
        let sent = cluster.simulator.sent();
        let now = Instant::now();
        for s in &sent[seen_upto..] {
            seen_at.entry(s.message_id.clone()).or_insert(now);
        }
        seen_upto = sent.len();
    };
    for i in 0..TRANSACTIONAL {
        let d = approval(5_000 + i, 0, Purpose::Transactional);
        let Outcome::MessageApproved(m) = &d.outcome else {
            unreachable!()
        };
        produced_at.insert(m.message_id.clone(), Instant::now());
        produce(&d);
        let next = Instant::now() + Duration::from_millis(100);
        while Instant::now() < next {
            watch(&mut seen_at);
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while produced_at.keys().any(|m| !seen_at.contains_key(m)) && Instant::now() < deadline {
        watch(&mut seen_at);
        std::thread::sleep(Duration::from_millis(5));
    }
    let marketing_sent_meanwhile = seen_at.keys().filter(|m| m.starts_with("promo-")).count();
    let mut waits: Vec<Duration> = produced_at
        .iter()
        .map(|(m, at)| {
            seen_at
                .get(m)
                .map_or(Duration::MAX, |seen| seen.duration_since(*at))
        })
        .collect();
    waits.sort();
    let longest = waits[waits.len() - 1];
    let median = waits[waits.len() / 2];
    eprintln!(
        "lanes: {TRANSACTIONAL} transactional sends behind a {MARKETING}-message marketing backlog at {SENDER_PER_S}/s: median {} ms, longest {} ms (budget {} ms); marketing sent meanwhile {}/{MARKETING} in {:.1} s",
        median.as_millis(),
        longest.as_millis(),
        TRANSACTIONAL_BUDGET.as_millis(),
        marketing_sent_meanwhile,
        marketing_started.elapsed().as_secs_f64(),
    );
    stop.store(true, Ordering::SeqCst);
    let _ = dispatch.join();
    let _ = std::fs::remove_dir_all(&dir);

    assert!(
        longest <= TRANSACTIONAL_BUDGET,
        "a transactional send waited {} ms behind marketing",
        longest.as_millis()
    );
    // The backlog was real: most of the marketing was still waiting when the orders went out.
    assert!(
        marketing_sent_meanwhile < MARKETING * 2 / 3,
        "the marketing backlog drained ({marketing_sent_meanwhile}) before the orders came: no load"
    );
}
