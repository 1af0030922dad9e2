//! Kills the processors in the middle of a Kafka transaction, again and again, and restarts
//! them, against a real Apache Kafka broker (`scripts/kafka`); then proves that the aborted
//! transactions' decisions are in the log yet invisible to a read_committed reader, which sees
//! no decision lost or written twice, and that SIGTERM stops the process cleanly.

mod common;

use herald::demo;
use herald::events::{Fact, Outcome};
use herald::kafka::KafkaSettings;
use herald::registry::Codec;
use herald::scenario::{self, FeedItem};
use herald::topology::Topology;
use rdkafka::message::{Headers, Message};
use std::collections::{HashMap, HashSet};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

fn herald(
    bootstrap: &str,
    registry: &str,
    store: &std::path::Path,
    crash_at: Option<u32>,
    abort_at: Option<u32>,
) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_herald"));
    c.env("HERALD_IDENTIFIER_KEY", herald::identity::DEMO_KEY);
    c.args([
        "run",
        "--stage",
        "processors",
        "--bootstrap",
        bootstrap,
        "--registry",
        registry,
        "--instance-id",
        "crash-test",
        "--metrics-addr",
        "127.0.0.1:0",
        "--batch-size",
        "300",
        "--session-timeout-ms",
        "6000",
    ])
    .arg("--store")
    .arg(store)
    // A sixth of the 300 customers in memory: the others are loaded from the store, during
    // restores too, while transactions die.
    .env("HERALD_STATE_CACHE_CUSTOMERS", "50")
    .env(
        "RUST_LOG",
        std::env::var("HERALD_TEST_LOG").unwrap_or_else(|_| "error".into()),
    );
    if let Some(n) = crash_at {
        c.env("HERALD_FAULT_CRASH_BEFORE_COMMIT", n.to_string());
    }
    if let Some(n) = abort_at {
        c.env("HERALD_FAULT_ABORT_TRANSACTION", n.to_string());
    }
    c.spawn().expect("herald binary starts")
}

/// Whether this is the one decision dedupe makes for every input record: accepted, a repeat, or
/// (for a customer erased before the record was read) ignored as older than the erasure.
fn dedupe_step(o: &Outcome) -> bool {
    matches!(
        o,
        Outcome::EventAccepted(_)
            | Outcome::DuplicateIgnored(_)
            | Outcome::PreErasureFactIgnored(_)
    )
}

/// Dedupe decisions and dead letters a read_committed reader sees now.
fn visible(
    bootstrap: &str,
    partitions: i32,
    codec: &Codec,
    rt: &tokio::runtime::Runtime,
) -> (usize, usize) {
    let mut dedupe = 0;
    demo::read_topic(bootstrap, "herald.decisions.v1", partitions, |m| {
        let d = rt
            .block_on(codec.decode_decision(m.payload()))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if dedupe_step(&d.outcome) {
            dedupe += 1;
        }
        Ok(())
    })
    .unwrap();
    let dlq = demo::read_topic(bootstrap, "herald.dlq.v1", partitions, |_| Ok(())).unwrap();
    (dedupe, dlq as usize)
}

/// The input records no decision or dead letter names as its source, for a failure message.
fn undecided(
    bootstrap: &str,
    partitions: i32,
    codec: &Codec,
    rt: &tokio::runtime::Runtime,
) -> String {
    let source = |m: &rdkafka::message::BorrowedMessage<'_>| {
        herald::stages::source_position(m).map(|(topic, offset)| (topic, m.partition(), offset))
    };
    let mut seen = HashSet::new();
    let mut deduped = HashSet::new();
    let mut kinds: HashMap<(String, i32, i64), Vec<String>> = HashMap::new();
    let _ = demo::read_topic(bootstrap, "herald.decisions.v1", partitions, |m| {
        let d = rt
            .block_on(codec.decode_decision(m.payload()))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if let Some(src) = source(m) {
            kinds.entry(src.clone()).or_default().push(format!(
                "{}@{}:{}",
                m.partition(),
                m.offset(),
                d.outcome.kind()
            ));
            if dedupe_step(&d.outcome) {
                deduped.insert(src.clone());
            }
            seen.insert(src);
        }
        Ok(())
    });
    let not_deduped: Vec<String> = kinds
        .iter()
        .filter(|(k, _)| !deduped.contains(*k))
        .map(|(k, v)| format!("{k:?} -> {v:?}"))
        .collect();
    let mut letters = Vec::new();
    let _ = demo::read_topic(bootstrap, "herald.dlq.v1", partitions, |m| {
        let error = m
            .headers()
            .and_then(|h| h.iter().find(|x| x.key == "herald.error"))
            .and_then(|x| x.value)
            .map(|v| {
                String::from_utf8_lossy(v)
                    .chars()
                    .take(120)
                    .collect::<String>()
            })
            .unwrap_or_default();
        letters.push(format!("{:?}: {error}", source(m)));
        seen.extend(source(m));
        Ok(())
    });
    let mut missing = Vec::new();
    for topic in Topology::embedded().unwrap().names.inputs() {
        let _ = demo::read_topic(bootstrap, &topic, partitions, |m| {
            if !seen.contains(&(topic.to_string(), m.partition(), m.offset())) {
                missing.push(format!("{topic}/{}@{}", m.partition(), m.offset()));
            }
            Ok(())
        });
    }
    format!(
        "[{}]; decided without a dedupe-step decision:\n{}\ndead letters:\n{}",
        missing.join(" "),
        not_deduped.join("\n"),
        letters.join("\n")
    )
}

#[test]
fn a_crash_mid_transaction_loses_nothing_and_writes_nothing_twice() {
    let rt = common::runtime();
    let topology = Topology::embedded().unwrap();
    let (cluster, codec) = common::demo_cluster(&rt, &topology, common::broker());
    let s = scenario::generate(300, 11);
    let settings = KafkaSettings::new(&cluster.bootstrap, true, "feeder");
    let producer = settings.producer(None).unwrap();
    common::feed(&rt, &producer, &codec, &s.items);
    let events: Vec<_> = s
        .items
        .iter()
        .filter_map(|i| {
            if let FeedItem::Event(e) = i {
                Some(e)
            } else {
                None
            }
        })
        .collect();
    let garbage = s.len() - events.len();

    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("state.redb");

    // Killed again and again inside a transaction: each run dies with its N-th transaction's
    // decisions produced and its offsets sent, but not committed. Each restart uses the same
    // transactional id, so the broker fences the dead run and aborts what it left open. One
    // run first aborts its transaction and runs the batch again, restoring each partition as
    // the batch reaches it, before it dies: a restore there must not save what the other
    // partitions hold of the open transaction.
    for (crash_at, abort_at) in [(3, None), (2, Some(2)), (4, None), (3, Some(3)), (2, None)] {
        let mut crashed = herald(
            &cluster.bootstrap,
            &cluster.registry_url,
            &store,
            Some(crash_at),
            abort_at,
        );
        let status = crashed.wait().unwrap();
        assert!(!status.success(), "the fault-injected run must die");
    }

    // Restarted at once, as a supervisor would: the dead process is still a member of the group
    // until its session expires, so the restart first sits through that rebalance.
    let mut second = herald(
        &cluster.bootstrap,
        &cluster.registry_url,
        &store,
        None,
        None,
    );
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let (dedupe, dlq) = visible(&cluster.bootstrap, topology.partitions(), &codec, &rt);
        if dedupe >= events.len() && dlq >= garbage {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "processors did not catch up: {dedupe} of {} records decided; undecided: {}",
            events.len(),
            undecided(&cluster.bootstrap, topology.partitions(), &codec, &rt)
        );
        assert!(
            second.try_wait().unwrap().is_none(),
            "the restarted processors stopped"
        );
        std::thread::sleep(Duration::from_millis(1000));
    }
    // SIGTERM: the transaction in flight is finished and the process exits 0.
    unsafe {
        libc_kill(second.id() as i32, 15);
    }
    let status = second.wait().unwrap();
    assert!(
        status.success(),
        "SIGTERM must stop herald cleanly, got {status:?}"
    );

    // The aborted transactions' decisions are in the log (a read_uncommitted reader sees
    // them), and a read_committed reader sees none of them.
    let committed =
        common::decision_offsets(&cluster.bootstrap, topology.partitions(), "read_committed");
    let everything = common::decision_offsets(
        &cluster.bootstrap,
        topology.partitions(),
        "read_uncommitted",
    );
    let aborted: Vec<_> = everything.difference(&committed).collect();
    assert!(
        !aborted.is_empty(),
        "the killed runs left no aborted decisions in the log: the test proved nothing"
    );
    assert!(committed.is_subset(&everything));

    // What a read_committed consumer sees.
    let mut ids = HashSet::new();
    let mut duplicates = 0;
    let mut dedupe_per_record: HashMap<String, usize> = HashMap::new();
    let mut accepted: HashMap<String, String> = HashMap::new();
    let mut twice: Vec<String> = Vec::new();
    let mut ignored: HashSet<String> = HashSet::new();
    demo::read_topic(
        &cluster.bootstrap,
        "herald.decisions.v1",
        topology.partitions(),
        |m| {
            let d = rt
                .block_on(codec.decode_decision(m.payload()))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if !ids.insert(d.decision_id.clone()) {
                duplicates += 1;
            }
            match &d.outcome {
                Outcome::EventAccepted(a) => {
                    *dedupe_per_record
                        .entry(d.input_event_id.clone())
                        .or_default() += 1;
                    let src = m
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|x| {
                                    format!(
                                        "{}={}",
                                        x.key,
                                        String::from_utf8_lossy(x.value.unwrap_or_default())
                                    )
                                })
                                .collect::<Vec<_>>()
                                .join(" ")
                        })
                        .unwrap_or_default();
                    let here = format!(
                        "decision {} at {}/{} from {src}",
                        d.decision_id,
                        m.partition(),
                        m.offset()
                    );
                    if let Some(first) = accepted.insert(a.envelope.event_id.clone(), here.clone())
                    {
                        twice.push(format!(
                            "event {} accepted twice:\n  {first}\n  {here}",
                            a.envelope.event_id
                        ));
                    }
                }
                Outcome::DuplicateIgnored(_) => {
                    *dedupe_per_record
                        .entry(d.input_event_id.clone())
                        .or_default() += 1
                }
                // Whether a record of an erased customer is read before or after the erasure
                // depends on how the consumer interleaves the input topics.
                Outcome::PreErasureFactIgnored(p) => {
                    *dedupe_per_record
                        .entry(d.input_event_id.clone())
                        .or_default() += 1;
                    ignored.insert(p.event_id.clone());
                }
                _ => {}
            }
            Ok(())
        },
    )
    .unwrap();
    assert!(
        twice.is_empty(),
        "{} events accepted twice, e.g.\n{}",
        twice.len(),
        twice.iter().take(3).cloned().collect::<Vec<_>>().join("\n")
    );
    assert_eq!(duplicates, 0, "decisions written twice");
    let deliveries: usize = dedupe_per_record.values().sum();
    assert_eq!(
        deliveries,
        events.len(),
        "every input record gets exactly one dedupe decision"
    );
    // Re-emitted copies are repeats: restored state must recognise them across the crashes.
    let distinct: HashSet<_> = s.facts_to_accept();
    let unaccounted: Vec<_> = distinct
        .iter()
        .filter(|id| !accepted.contains_key(*id) && !ignored.contains(*id))
        .collect();
    assert!(
        unaccounted.is_empty(),
        "every distinct fact is accepted once, or ignored as older than its customer's erasure: {unaccounted:?}"
    );
    assert!(
        accepted.keys().all(|id| distinct.contains(id)),
        "only the scenario's facts are accepted"
    );
    assert!(events
        .iter()
        .any(|e| matches!(e.fact, Fact::ShipmentDispatched(_))));
    // By source, not by count: one record lost and another dead-lettered twice would add up.
    let mut letters: HashMap<(String, i32, i64), usize> = HashMap::new();
    demo::read_topic(
        &cluster.bootstrap,
        "herald.dlq.v1",
        topology.partitions(),
        |m| {
            let source = herald::stages::source_position(m)
                .map(|(topic, offset)| (topic, m.partition(), offset))
                .ok_or_else(|| anyhow::anyhow!("a dead letter without its source"))?;
            *letters.entry(source).or_default() += 1;
            Ok(())
        },
    )
    .unwrap();
    let repeated: Vec<_> = letters.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "dead-lettered twice: {repeated:?}");
    assert_eq!(
        letters.len(),
        garbage,
        "every undecodable record is dead-lettered once"
    );
    drop(producer);
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
