//! `/readyz` tells the truth, on a real Apache Kafka broker (`scripts/kafka`): a processor is not
//! ready while it joins its group or restores its partitions (a long decision log), is ready
//! once it consumes, and is
//! not ready again once it lost its broker; `/healthz` says it lives throughout.

mod common;

use herald::events::*;
use herald::registry::Codec;
use herald::topology::Topology;
use rdkafka::producer::FutureRecord;

/// Decisions in the log the processor restores from.
const LONG_LOG: usize = 300_000;
use std::process::Command;
use std::time::{Duration, Instant};

/// The status and body of a GET, or `None` when nothing answers.
fn get(rt: &tokio::runtime::Runtime, url: &str) -> Option<(u16, String)> {
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .ok()?;
        let r = client.get(url).send().await.ok()?;
        let status = r.status().as_u16();
        Some((status, r.text().await.ok()?))
    })
}

/// Polls `url` until `until` holds for its answer, asserting `meanwhile` of every answer before.
fn wait_for(
    rt: &tokio::runtime::Runtime,
    url: &str,
    within: Duration,
    what: &str,
    until: impl Fn(u16, &str) -> bool,
    meanwhile: impl Fn(u16, &str) -> Result<(), String>,
) -> String {
    let deadline = Instant::now() + within;
    let mut last = None;
    loop {
        if let Some((status, body)) = get(rt, url) {
            if until(status, &body) {
                return body;
            }
            if let Err(e) = meanwhile(status, &body) {
                panic!("while waiting for {what}: {e} ({status} {body:?})");
            }
            last = Some((status, body));
        }
        assert!(
            Instant::now() < deadline,
            "{what} not seen in {within:?}; last answer {last:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn readyz_waits_for_the_restore_and_falls_when_the_broker_goes() {
    // A cluster of its own: the test stops its only broker.
    let broker = common::start_broker(1, &[]);
    let (rt, registry_url) = common::runtime_with_registry();
    let topology = Topology::embedded().unwrap();
    let admin = broker.settings(false, "topics");
    herald::kafka::topics::topics_apply(&admin, &topology, Some(1)).expect("topics apply");

    // A long decision log to restore: the processor is assigned its partitions at once, and
    // rebuilding partition 0 from this many decisions takes seconds.
    let codec = Codec::new(&registry_url, &topology.names).unwrap();
    rt.block_on(codec.register_all()).unwrap();
    let decision = |i: usize| Decision {
        decision_id: format!("d-{i}"),
        customer_id: "cust-long-history".into(),
        input_event_id: format!("e-{i}"),
        processor: Processor::Dedupe,
        decided_at: 1_793_491_200_000,
        policy_version: "v".into(),
        outcome: Outcome::DuplicateIgnored(DuplicateIgnored {
            event_id: format!("e-{i}"),
            first_seen_at: 1_793_491_200_000,
            repeats_event_id: None,
            identity: None,
        }),
        consent_chain: None,
    };
    let bytes = rt.block_on(codec.encode_decision(&decision(0))).unwrap();
    let producer = broker.settings(false, "history").producer(None).unwrap();
    let decisions = topology.names.decisions().to_string();
    let mut pending = Vec::new();
    for i in 0..LONG_LOG {
        let key = format!("d-{i}");
        let mut record = FutureRecord::to(&decisions)
            .partition(0)
            .key(&key)
            .payload(&bytes);
        loop {
            match producer.send_result(record) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    back,
                )) => {
                    record = back;
                    producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => panic!("producing the decision log: {e}"),
            }
        }
    }
    for r in rt.block_on(futures::future::join_all(pending)) {
        r.expect("delivery report").expect("delivered");
    }

    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let processors = common::Killed(
        Command::new(env!("CARGO_BIN_EXE_herald"))
            .env("HERALD_IDENTIFIER_KEY", herald::identity::DEMO_KEY)
            .args(["run", "--stage", "processors", "--instance-id", "ready"])
            .args(["--bootstrap", &broker.bootstrap])
            .args(["--registry", &registry_url])
            .args(["--session-timeout-ms", "6000"])
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--store")
            .arg(dir.path().join("state.redb"))
            .env("HERALD_WALL_CLOCK_TICK_SECS", "0")
            .env("RUST_LOG", "error")
            .spawn()
            .expect("herald starts"),
    );
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    let healthz = format!("http://127.0.0.1:{port}/healthz");

    // Joining, then restoring: never ready before every assigned partition is restored, and
    // alive all along.
    let metrics = format!("http://127.0.0.1:{port}/metrics");
    let restored = || {
        get(&rt, &metrics)
            .map(|(_, body)| common::metric_sum(&body, "herald_partitions_restored_total") as u64)
            .unwrap_or(0)
    };
    let mut seen_restoring = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "never ready");
        // Restored first, then asked: a partition restored in between cannot make it pass.
        let before = restored();
        let Some((status, body)) = get(&rt, &readyz) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        if status == 200 {
            assert_eq!(
                restored().max(before),
                topology.partitions() as u64,
                "ready with partitions still to restore"
            );
            break;
        }
        assert_eq!(status, 503, "{body}");
        if body.contains("restoring partition") {
            seen_restoring += 1;
            assert!(before < topology.partitions() as u64, "{body}");
        }
        assert_eq!(
            get(&rt, &healthz).map(|(s, _)| s),
            Some(200),
            "/healthz must say the process lives while it restores"
        );
        // A restore decodes a decision in microseconds: ask often enough to see it under way.
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        seen_restoring >= 3,
        "the restore of {LONG_LOG} decisions was seen only {seen_restoring} times: the test proved little"
    );

    // The broker goes: not ready (the process lives and keeps trying).
    common::kafka_script(&[
        "kill-node",
        "--dir",
        broker.dir.to_str().unwrap(),
        "--node",
        "1",
    ]);
    let lost = wait_for(
        &rt,
        &readyz,
        Duration::from_secs(45),
        "not ready without a broker",
        |status, _| status == 503,
        |_, _| Ok(()),
    );
    assert!(
        lost.contains("lost its group coordinator") || lost.contains("no report"),
        "{lost}"
    );
    assert_eq!(get(&rt, &healthz).map(|(s, _)| s), Some(200));

    // The broker is back: ready again.
    common::kafka_script(&[
        "start-node",
        "--dir",
        broker.dir.to_str().unwrap(),
        "--node",
        "1",
    ]);
    wait_for(
        &rt,
        &readyz,
        Duration::from_secs(120),
        "ready once the broker is back",
        |status, _| status == 200,
        |_, _| Ok(()),
    );
    let mut processors = processors;
    assert!(
        processors.0.try_wait().unwrap().is_none(),
        "the processor stopped"
    );
}
