//! At-least-once mode, for brokers without transactions, on a real Apache Kafka broker
//! (`scripts/kafka`): `herald topics apply` creates the topics through the admin API, and two
//! processor processes share one consumer group without transactions. Every input record must
//! get its decisions, and any repeat must be the same decision (same deterministic id), so
//! idempotent consumers see each decision once.

mod common;

use herald::demo;
use herald::events::{Outcome, Processor};
use herald::kafka::KafkaSettings;
use herald::registry::Codec;
use herald::scenario::{self, FeedItem};
use herald::topology::Topology;
use rdkafka::message::Message;
use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn two_processes_share_a_group_at_least_once() {
    let bootstrap = common::broker().bootstrap.clone();
    let admin = common::broker().settings(false, "topics-apply");

    // Topics through the real admin path, twice: the second run finds everything in place.
    let topology = Topology::embedded().unwrap();
    let first =
        herald::kafka::topics::topics_apply(&admin, &topology, Some(1)).expect("topics apply");
    assert_eq!(
        first.iter().filter(|l| l.starts_with("CREATED")).count(),
        topology.topics.len(),
        "{first:?}"
    );
    std::thread::sleep(Duration::from_secs(1));
    let second = herald::kafka::topics::topics_apply(&admin, &topology, Some(1))
        .expect("topics apply again");
    assert!(
        second.iter().all(|l| !l.starts_with("CREATED")),
        "{second:?}"
    );
    // What differs from the file is reported, through `herald topics apply` as a user runs
    // it, and nothing is changed.
    let edited = tempfile::tempdir().unwrap();
    common::edited_topology(edited.path(), |file, text| {
        if file != "topics.toml" {
            return text;
        }
        text.replace("partitions = 6", "partitions = 8")
            .replacen(
                "cleanup_policy = \"delete\"",
                "cleanup_policy = \"compact\"",
                2,
            )
            .replacen("retention_ms = 1209600000", "retention_ms = 86400000", 3)
    });
    let o = common::herald(&[
        "topics",
        "apply",
        "--bootstrap",
        &bootstrap,
        "--replication",
        "1",
        "--topology",
        edited.path().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::text(&o));
    let report = common::text(&o);
    for differs in [
        "DIFFERS oms.events.v1: partitions 6, topics.toml says 8",
        "DIFFERS billing.events.v1: cleanup.policy delete, topics.toml says compact",
        "DIFFERS crm.events.v1: retention.ms 1209600000, topics.toml says 86400000",
    ] {
        assert!(
            report.contains(differs),
            "{differs} missing from:\n{report}"
        );
    }
    let third =
        herald::kafka::topics::topics_apply(&admin, &topology, Some(1)).expect("topics apply");
    assert!(
        third.iter().all(|l| l.starts_with("OK")),
        "a report changes nothing: {third:?}"
    );

    let (rt, registry_url) = common::runtime_with_registry();
    let codec = Codec::new(&registry_url, &topology.names).unwrap();
    rt.block_on(codec.register_all()).unwrap();
    let s = scenario::generate(200, 5);
    let producer = KafkaSettings::new(&bootstrap, false, "feeder")
        .producer(None)
        .unwrap();
    let records: usize = s
        .items
        .iter()
        .filter(|i| matches!(i, FeedItem::Event(_)))
        .count();

    let dir = tempfile::tempdir().unwrap();
    let metrics: Vec<u16> = (0..2).map(|_| common::free_port()).collect();
    let spawn = |name: &str, port: u16| {
        Command::new(env!("CARGO_BIN_EXE_herald"))
            .env("HERALD_IDENTIFIER_KEY", herald::identity::DEMO_KEY)
            .args([
                "run",
                "--stage",
                "processors",
                "--at-least-once",
                "--bootstrap",
                &bootstrap,
                "--registry",
                &registry_url,
                "--instance-id",
                name,
                "--batch-size",
                "200",
            ])
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--store")
            .arg(dir.path().join(format!("{name}.redb")))
            // HERALD_TEST_LOG=info shows the rebalances when this test needs explaining.
            .env(
                "RUST_LOG",
                std::env::var("HERALD_TEST_LOG").unwrap_or_else(|_| "error".into()),
            )
            .spawn()
            .expect("herald starts")
    };
    let mut a = common::Killed(spawn("a", metrics[0]));
    let mut b = common::Killed(spawn("b", metrics[1]));
    // The records go in once both processes own partitions: fed before, the first to join
    // could decide them all before the second is given any.
    let joined = Instant::now() + Duration::from_secs(60);
    while !metrics.iter().all(|port| {
        common::scrape(&rt, *port)
            .is_some_and(|body| common::metric_sum(&body, "herald_partitions_restored_total") > 0.0)
    }) {
        assert!(Instant::now() < joined, "both processes joined the group");
        std::thread::sleep(Duration::from_millis(200));
    }
    common::feed(&rt, &producer, &codec, &s.items);

    let count = || {
        let mut ids: HashMap<String, usize> = HashMap::new();
        let mut accepted: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
        let mut pre_erasure = std::collections::HashSet::new();
        demo::read_topic(
            &bootstrap,
            "herald.decisions.v1",
            topology.partitions(),
            |m| {
                let d = rt
                    .block_on(codec.decode_decision(m.payload()))
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                // Every input record gets one dedupe decision: accepted, a repeat, or a fact
                // from before its customer's erasure. Which of the last two a fact delivered
                // late gets depends on whether the erasure was decided first.
                if d.processor == Processor::Dedupe {
                    match &d.outcome {
                        Outcome::EventAccepted(a) => {
                            accepted
                                .entry(a.envelope.event_id.clone())
                                .or_default()
                                .insert(d.decision_id.clone());
                        }
                        Outcome::PreErasureFactIgnored(i) => {
                            pre_erasure.insert(i.event_id.clone());
                        }
                        _ => {}
                    }
                    *ids.entry(d.decision_id).or_default() += 1;
                }
                Ok(())
            },
        )
        .unwrap();
        (ids, accepted, pre_erasure)
    };
    let deadline = Instant::now() + Duration::from_secs(240);
    let (ids, accepted, pre_erasure) = loop {
        let (ids, accepted, pre_erasure) = count();
        if ids.len() >= records {
            break (ids, accepted, pre_erasure);
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {records} records decided",
            ids.len()
        );
        assert!(
            a.0.try_wait().unwrap().is_none() && b.0.try_wait().unwrap().is_none(),
            "a processor stopped"
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    // One distinct dedupe decision per input record: nothing lost, and repeats (if any) carry
    // the same id.
    assert_eq!(ids.len(), records);
    // Each fact accepted once, or ignored as predating its customer's erasure when a late
    // delivery of it is decided after the erasure: a redelivered record repeats its decision
    // id, and a second delivery of a fact meets the state that saw the first, on whichever
    // process owns it. Facts the scenario re-emitted under new ids are repeats, never accepted.
    let distinct = s.facts_to_accept();
    let missing: Vec<_> = distinct
        .iter()
        .filter(|f| !accepted.contains_key(*f) && !pre_erasure.contains(*f))
        .collect();
    assert!(
        missing.is_empty(),
        "facts neither accepted nor erased: {missing:?}"
    );
    let repeats: Vec<_> = accepted.keys().filter(|f| !distinct.contains(*f)).collect();
    assert!(repeats.is_empty(), "re-emitted facts accepted: {repeats:?}");
    let twice: Vec<_> = accepted.iter().filter(|(_, d)| d.len() > 1).collect();
    assert!(twice.is_empty(), "facts accepted twice: {twice:?}");

    // Both processes took part in the group.
    for port in &metrics {
        let body = common::scrape(&rt, *port).expect("the process answers on /metrics");
        let consumed = common::metric_sum(&body, "herald_records_in_total") as u64;
        assert!(
            consumed > 0,
            "process on metrics port {port} consumed nothing:\n{body}"
        );
    }
    let dlq = demo::read_topic(&bootstrap, "herald.dlq.v1", topology.partitions(), |_| {
        Ok(())
    })
    .unwrap();
    let garbage = s.len() - records;
    assert!(
        dlq as usize >= garbage,
        "every undecodable record reaches the DLQ ({dlq} of {garbage})"
    );

    common::signal(&a.0, 15);
    common::signal(&b.0, 15);
    assert!(
        a.0.wait().unwrap().success() && b.0.wait().unwrap().success(),
        "SIGTERM must stop both cleanly"
    );
}
