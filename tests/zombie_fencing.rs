//! A zombie is fenced, on a real Apache Kafka broker (`scripts/kafka`). Processor A stops
//! (SIGSTOP, as a long GC pause or a frozen VM would) inside a transaction, with its decisions
//! produced and its input offsets not yet sent. Processor B joins the group and A's partitions
//! move to it once A's session expires. Then A resumes: the group no longer knows its
//! generation, so its transaction cannot take the offsets and is aborted. None of A's writes in
//! that transaction becomes visible to a read_committed reader, which sees every input record
//! decided exactly once.

mod common;

use herald::demo;
use herald::events::Outcome;
use herald::kafka::KafkaSettings;
use herald::scenario::{self, FeedItem};
use herald::topology::Topology;
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use std::collections::HashMap;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Whether the process is stopped (state `T` in /proc).
fn stopped(c: &Child) -> bool {
    std::fs::read_to_string(format!("/proc/{}/stat", c.id()))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .map(|r| r.trim_start().starts_with('T'))
        })
        .unwrap_or(false)
}

/// The transactions a process aborted, from its `/metrics`; 0 when it does not answer.
fn aborted(rt: &tokio::runtime::Runtime, port: u16) -> u64 {
    let body = common::scrape(rt, port).unwrap_or_default();
    body.lines()
        .filter(|l| {
            l.starts_with("herald_transactions_total{") && l.contains("outcome=\"aborted\"")
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum()
}

/// A counter from a process's `/metrics`, summed over its labels; 0 when it does not answer.
fn metric(rt: &tokio::runtime::Runtime, port: u16, name: &str) -> u64 {
    common::metric_sum(&common::scrape(rt, port).unwrap_or_default(), name) as u64
}

/// The state of consumer group `group` and its members' client ids, as its coordinator says.
fn group_members(bootstrap: &str, group: &str) -> (String, Vec<String>) {
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("a client");
    match consumer.fetch_group_list(Some(group), Duration::from_secs(5)) {
        Ok(list) => list
            .groups()
            .iter()
            .find(|g| g.name() == group)
            .map(|g| {
                let members = g
                    .members()
                    .iter()
                    .map(|m| m.client_id().to_string())
                    .collect();
                (g.state().to_string(), members)
            })
            .unwrap_or_default(),
        Err(e) => (format!("unknown ({e})"), Vec::new()),
    }
}

#[test]
fn a_paused_processor_is_fenced_when_it_resumes_and_none_of_its_writes_is_visible() {
    let broker = common::broker();
    let rt = common::runtime();
    let topology = Topology::embedded().unwrap();
    let (cluster, codec) = common::demo_cluster(&rt, &topology, broker);
    let s = scenario::generate(300, 23);
    let producer = KafkaSettings::new(&cluster.bootstrap, true, "feeder")
        .producer(None)
        .unwrap();
    common::feed(&rt, &producer, &codec, &s.items);
    let records = s
        .items
        .iter()
        .filter(|i| matches!(i, FeedItem::Event(_)))
        .count();

    let dir = tempfile::tempdir().unwrap();
    let spawn = |name: &str, port: u16, pause_at: Option<u32>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_herald"));
        c.env("HERALD_IDENTIFIER_KEY", herald::identity::DEMO_KEY)
            .args(["run", "--stage", "processors", "--instance-id", name])
            .args(["--bootstrap", &cluster.bootstrap])
            .args(["--registry", &cluster.registry_url])
            .args(["--batch-size", "100", "--session-timeout-ms", "6000"])
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--store")
            .arg(dir.path().join(format!("{name}.redb")))
            .env(
                "RUST_LOG",
                std::env::var("HERALD_TEST_LOG").unwrap_or_else(|_| "error".into()),
            );
        if let Some(n) = pause_at {
            c.env("HERALD_FAULT_PAUSE_BEFORE_OFFSETS", n.to_string());
        }
        common::Killed(c.spawn().expect("herald starts"))
    };
    let (port_a, port_b) = (common::free_port(), common::free_port());

    // A alone: it owns every partition and stops itself inside its third transaction.
    let a = spawn("zombie-a", port_a, Some(3));
    let deadline = Instant::now() + Duration::from_secs(120);
    while !stopped(&a.0) {
        assert!(Instant::now() < deadline, "A never reached its pause");
        assert!(a.0.id() > 0);
        std::thread::sleep(Duration::from_millis(100));
    }

    // B joins; once A's session has expired, the group hands every partition to B. B cannot
    // restore past A's open transaction until it ends, so it waits for A. A resumes only once
    // the group has really moved on: a B that joins while A is still a member starts a
    // rebalance that waits for A, and A resuming then would still own its partitions.
    let b = spawn("zombie-b", port_b, None);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (state, members) = group_members(&cluster.bootstrap, "herald-processors");
        if state == "Stable"
            && !members.is_empty()
            && members.iter().all(|m| m.ends_with("-zombie-b"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the group never moved to B alone: {state} {members:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(stopped(&a.0), "A must still be paused while B takes over");

    // A resumes inside its transaction: its offsets are refused, and the transaction aborted.
    common::signal(&a.0, 18); // SIGCONT
    let deadline = Instant::now() + Duration::from_secs(60);
    while aborted(&rt, port_a) == 0 {
        assert!(
            Instant::now() < deadline,
            "A resumed, yet no transaction of A was aborted: the zombie was not fenced"
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    // Everything is decided, once, by whichever process owns it now.
    let count = || {
        let mut ids: HashMap<String, usize> = HashMap::new();
        let mut accepted: HashMap<String, usize> = HashMap::new();
        demo::read_topic(
            &cluster.bootstrap,
            "herald.decisions.v1",
            topology.partitions(),
            |m| {
                let d = rt
                    .block_on(codec.decode_decision(m.payload()))
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                *ids.entry(d.decision_id.clone()).or_default() += 1;
                if let Outcome::EventAccepted(e) = &d.outcome {
                    *accepted.entry(e.envelope.event_id.clone()).or_default() += 1;
                }
                Ok(())
            },
        )
        .unwrap();
        (ids, accepted)
    };
    let distinct = s.facts_to_accept();
    let deadline = Instant::now() + Duration::from_secs(240);
    let (ids, accepted) = loop {
        let (ids, accepted) = count();
        if accepted.len() >= distinct.len() {
            break (ids, accepted);
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {} facts accepted ({records} records)",
            accepted.len(),
            distinct.len()
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    let twice: Vec<_> = ids.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "decisions visible twice: {twice:?}");
    let accepted_twice: Vec<_> = accepted.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        accepted_twice.is_empty(),
        "facts accepted twice: {accepted_twice:?}"
    );

    // A's aborted writes are in the log, and only a read_uncommitted reader sees them.
    let committed =
        common::decision_offsets(&cluster.bootstrap, topology.partitions(), "read_committed");
    let everything = common::decision_offsets(
        &cluster.bootstrap,
        topology.partitions(),
        "read_uncommitted",
    );
    assert!(
        everything.difference(&committed).count() > 0,
        "the paused transaction left nothing in the log: the test proved nothing"
    );
    assert!(
        metric(&rt, port_b, "herald_records_in_total") > 0,
        "B took over nothing"
    );
    drop(a);
    drop(b);
}
