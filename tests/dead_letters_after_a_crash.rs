//! A record that leaves only a dead letter leaves nothing in the decision log. The processors,
//! killed after such a record's transaction committed and before their next checkpoint, must
//! not read it again on restart and dead-letter it twice: the group's committed offset says it
//! was handled, against a real Apache Kafka broker (`scripts/kafka`).

mod common;

use common::Killed;
use herald::kafka::KafkaSettings;
use herald::scenario::{self, FeedItem};
use herald::topology::Topology;
use rdkafka::producer::FutureRecord;
use std::collections::HashSet;
use std::time::{Duration, Instant};

#[test]
fn records_that_left_only_dead_letters_are_not_dead_lettered_again_after_a_crash() {
    let rt = common::runtime();
    let topology = Topology::embedded().unwrap();
    let (cluster, codec) = common::demo_cluster(&rt, &topology, common::broker());
    let producer = KafkaSettings::new(&cluster.bootstrap, true, "feeder")
        .producer(None)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("state.redb");
    let processors = || {
        let mut c = common::stage_command(&cluster, "processors", "crash", &store);
        // No checkpoint after the start: a restart knows only what the decision log says.
        c.env("HERALD_CHECKPOINT_MS", "3600000").args([
            "--metrics-addr",
            "127.0.0.1:0",
            "--session-timeout-ms",
            "6000",
        ]);
        Killed(c.spawn().expect("herald binary starts"))
    };
    let events = |seed: u64, prefix: &str| -> Vec<herald::events::InputEvent> {
        scenario::generate(30, seed)
            .items
            .into_iter()
            .filter_map(|i| match i {
                FeedItem::Event(mut e) => {
                    e.envelope.event_id = format!("{prefix}-{}", e.envelope.event_id);
                    e.envelope.customer_id = format!("{prefix}-{}", e.envelope.customer_id);
                    Some(e)
                }
                _ => None,
            })
            .take(120)
            .collect()
    };
    let feed = |events: &[herald::events::InputEvent]| {
        let items: Vec<FeedItem> = events.iter().cloned().map(FeedItem::Event).collect();
        common::feed(&rt, &producer, &codec, &items);
    };
    let decided = |ids: &HashSet<String>| {
        common::read_decisions(&rt, &cluster, &codec, &topology)
            .iter()
            .filter(|d| ids.contains(&d.input_event_id))
            .map(|d| d.input_event_id.clone())
            .collect::<HashSet<_>>()
            .len()
    };
    let letters = || {
        herald::dlq::read_all(
            &cluster.settings(true, "dlq-reader"),
            &codec,
            &rt,
            topology.partitions(),
        )
        .unwrap()
    };
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !done() {
            assert!(Instant::now() < deadline, "{what} did not happen in time");
            std::thread::sleep(Duration::from_millis(500));
        }
    };

    // Facts on every partition, then one poison record at the end of each.
    let first = events(21, "a");
    feed(&first);
    let topic = topology.names.of_family(first[0].fact.family()).to_string();
    for p in 0..topology.partitions() {
        let record = FutureRecord::to(&topic)
            .partition(p)
            .key("cust-poison")
            .payload(b"not avro at all".as_slice());
        rt.block_on(producer.send(record, Duration::from_secs(10)))
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let poison = topology.partitions() as usize;
    let first_ids: HashSet<String> = first.iter().map(|e| e.envelope.event_id.clone()).collect();
    let run = processors();
    wait_for(
        "the first facts decided and the poison dead-lettered",
        &|| decided(&first_ids) == first_ids.len() && letters().len() == poison,
    );

    // Killed before any checkpoint, and restarted on the same store.
    drop(run);
    let run = processors();
    let second = events(22, "b");
    feed(&second);
    let second_ids: HashSet<String> = second.iter().map(|e| e.envelope.event_id.clone()).collect();
    wait_for("the facts fed after the restart decided", &|| {
        decided(&second_ids) == second_ids.len()
    });
    let dead = letters();
    assert_eq!(
        dead.len(),
        poison,
        "each poison record dead-lettered once, not again after the restart: {:?}",
        dead.iter()
            .map(|l| (l.source_partition, l.source_offset))
            .collect::<Vec<_>>()
    );
    drop(run);
}
