//! `herald dlq list` and `herald dlq replay` against the in-process cluster with the processors
//! running: a poison record lands in the dead-letter topic and is listed; a dry run writes
//! nothing; a replay writes it back and, still poison, it is dead-lettered again rather than
//! lost; a good record replayed twice is decided once (dedupe sees the second as a repeat).

mod common;

use common::{herald, text};
use herald::demo;
use herald::events::{DeadLetter, Outcome, Processor};
use herald::kafka::{self, KafkaSettings, LogReader, SharedStore};
use herald::scenario::{self, FeedItem};
use herald::stages::ProcessorStage;
use herald::store::EmbeddedStore;
use herald::telemetry::Metrics;
use herald::topology::Topology;
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn lines(o: &std::process::Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn dead_letters_are_listed_replayed_on_request_and_never_decided_twice() {
    let rt = common::runtime();
    let topology = Arc::new(Topology::embedded().unwrap());
    let (cluster, codec) = common::demo_cluster(&rt, &topology, common::broker());
    let codec = Arc::new(codec);
    let dir = demo::fresh_temp_dir("dlq").unwrap();
    let store: SharedStore = Arc::new(EmbeddedStore::open(&dir.join("state.redb")).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let settings = KafkaSettings::new(&cluster.bootstrap, true, "dlq-test");
    let processors = {
        let (settings, stop, topology, codec, h) = (
            settings.clone(),
            stop.clone(),
            topology.clone(),
            codec.clone(),
            rt.handle().clone(),
        );
        std::thread::spawn(move || {
            let metrics = Metrics::shared().expect("metrics");
            let mut stage = ProcessorStage::new(
                topology,
                codec,
                store,
                h.clone(),
                metrics.clone(),
                herald::identity::IdentifierKey::demo(),
            );
            kafka::run_stage(&settings, &mut stage, &stop, &metrics, &h)
        })
    };
    let producer = settings.producer(None).unwrap();
    let send = |topic: &str, partition: i32, key: &str, value: &[u8]| {
        rt.block_on(
            producer.send(
                FutureRecord::to(topic)
                    .partition(partition)
                    .key(key.as_bytes())
                    .payload(value),
                Duration::from_secs(10),
            ),
        )
        .map_err(|(e, _)| e)
        .unwrap()
        .offset
    };
    let base = [
        "--bootstrap",
        cluster.bootstrap.as_str(),
        "--registry",
        cluster.registry_url.as_str(),
    ];
    let dlq = |extra: &[&str]| {
        let mut args = vec!["dlq"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&base);
        herald(&args)
    };
    let listed = |extra: &[&str]| {
        let o = dlq(&[&["list", "--json"], extra].concat());
        assert!(o.status.success(), "{}", text(&o));
        lines(&o)
    };
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(90);
        while !done() {
            assert!(Instant::now() < deadline, "{what} did not happen in time");
            std::thread::sleep(Duration::from_millis(300));
        }
    };

    // A poison record: not the registry's wire format.
    let poison_at = send("oms.events.v1", 2, "cust-poison", b"not avro at all");
    wait_for("the poison record reaching the dead-letter topic", &|| {
        listed(&[]).len() == 1
    });
    let first = &listed(&[])[0];
    assert_eq!(first["source_topic"], "oms.events.v1");
    assert_eq!(first["source_partition"], 2);
    assert_eq!(first["source_offset"], poison_at);
    let id = first["id"].as_str().unwrap().to_string();
    let reason = first["reason"].as_str().unwrap().to_string();
    assert!(!reason.is_empty());

    // The selections narrow the list; a malformed id or a bare replay is refused by name.
    assert_eq!(listed(&["--reason", "no such reason at all"]).len(), 0);
    assert_eq!(listed(&["--since", "2999-01-01T00:00:00Z"]).len(), 0);
    assert_eq!(listed(&["--id", &id]).len(), 1);
    let bad = dlq(&["list", "--id", "17"]);
    assert!(
        !bad.status.success() && text(&bad).contains("'17'"),
        "{}",
        text(&bad)
    );
    let bare = dlq(&["replay"]);
    assert!(
        !bare.status.success() && text(&bare).contains("--all"),
        "{}",
        text(&bare)
    );

    // A dry run reports and writes nothing.
    let dry = dlq(&["replay", "--id", &id]);
    assert!(dry.status.success(), "{}", text(&dry));
    assert!(text(&dry).contains("dry run"), "{}", text(&dry));
    let reader = LogReader::new(&settings).unwrap();
    assert_eq!(reader.end("oms.events.v1", 2).unwrap(), poison_at + 1);

    // Replayed for real, it is still poison: dead-lettered again, with its new position.
    let done = dlq(&["replay", "--id", &id, "--execute", "--json"]);
    assert!(done.status.success(), "{}", text(&done));
    let replayed_to = lines(&done)[0]["offset"].as_i64().unwrap();
    assert_eq!(replayed_to, poison_at + 1);
    wait_for("the replayed poison record dead-lettered again", &|| {
        listed(&[]).len() == 2
    });
    assert!(listed(&[])
        .iter()
        .any(|e| e["source_offset"] == replayed_to));

    // A good record that was dead-lettered (say the registry was down) and is replayed twice.
    let scenario = scenario::generate(1, 7);
    let event = scenario
        .items
        .iter()
        .find_map(|i| match i {
            FeedItem::Event(e) => Some(e.clone()),
            _ => None,
        })
        .unwrap();
    let topic = topology.names.of_family(event.fact.family());
    let letter = DeadLetter {
        source_topic: topic.to_string(),
        source_partition: 0,
        source_offset: 0,
        key: Some(event.envelope.customer_id.clone().into_bytes()),
        value: Some(rt.block_on(codec.encode_input(&event)).unwrap()),
        stage: "processors".into(),
        error: "schema registry unreachable (test)".into(),
        failed_at: 1_790_000_000_000,
    };
    send(
        "herald.dlq.v1",
        0,
        &event.envelope.customer_id,
        &rt.block_on(codec.encode_dead_letter(&letter)).unwrap(),
    );
    for _ in 0..2 {
        let o = dlq(&["replay", "--reason", "registry unreachable", "--execute"]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(text(&o).contains("replayed: 1 of 1"), "{}", text(&o));
    }
    let outcomes = || {
        let mut found = Vec::new();
        for p in 0..topology.partitions() {
            reader
                .read("herald.decisions.v1", p, 0, |m| {
                    let d = rt.block_on(codec.decode_decision(m.payload())).unwrap();
                    if d.processor == Processor::Dedupe
                        && d.input_event_id == event.envelope.event_id
                    {
                        found.push(d.outcome);
                    }
                    Ok(())
                })
                .unwrap();
        }
        found
    };
    wait_for("both replayed copies decided", &|| outcomes().len() == 2);
    let got = outcomes();
    assert!(
        matches!(got[0], Outcome::EventAccepted(_)),
        "first copy: {:?}",
        got[0]
    );
    assert!(
        matches!(got[1], Outcome::DuplicateIgnored(_)),
        "second copy: {:?}",
        got[1]
    );

    stop.store(true, Ordering::SeqCst);
    processors.join().unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
