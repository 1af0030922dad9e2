//! Three deployments on one real Apache Kafka broker (`scripts/kafka`), as a platform team would
//! run them: production on topics.toml's names; a shadow (a new policy version reading
//! production's inputs and writing a decision log, dispatch log and dead-letter topic of its
//! own, with its own consumer groups); and staging, every topic behind `--topic-prefix
//! staging.`. Each starts with a fresh store. The shadow must decide every production input
//! (not restore from production's decision log and decide nothing), and no deployment may
//! read or write another's topics.

mod common;

use herald::demo;
use herald::events::{Decision, Processor};
use herald::registry::Codec;
use herald::scenario::{self, FeedItem};
use herald::topology::Topology;
use rdkafka::message::Message;
use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const SHADOW_POLICY: &str = "2026-11-30.shadow";

/// Starts `herald run --stage processors` with a store of its own and these extra arguments.
fn processors(name: &str, registry: &str, dir: &Path, extra: &[&str]) -> common::Killed {
    common::Killed(
        Command::new(env!("CARGO_BIN_EXE_herald"))
            .env("HERALD_IDENTIFIER_KEY", herald::identity::DEMO_KEY)
            .args(["run", "--stage", "processors"])
            .args(["--bootstrap", &common::broker().bootstrap])
            .args(["--registry", registry, "--instance-id", name])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .arg("--store")
            .arg(dir.join(format!("{name}.redb")))
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("HERALD_TEST_LOG").unwrap_or_else(|_| "error".into()),
            )
            .spawn()
            .expect("herald starts"),
    )
}

/// Every committed decision of a decision log.
fn decisions(rt: &tokio::runtime::Runtime, codec: &Codec, topic: &str) -> Vec<Decision> {
    let mut out = Vec::new();
    demo::read_topic(&common::broker().bootstrap, topic, 6, |m| {
        let d = rt
            .block_on(codec.decode_decision(m.payload()))
            .map_err(|e| anyhow::anyhow!("{topic}: {e}"))?;
        out.push(d);
        Ok(())
    })
    .unwrap();
    out
}

/// The input records a decision log's dedupe decisions came from.
fn decided_inputs(log: &[Decision]) -> HashSet<String> {
    log.iter()
        .filter(|d| d.processor == Processor::Dedupe)
        .map(|d| d.input_event_id.clone())
        .collect()
}

fn records_in(topic: &str) -> usize {
    let mut n = 0;
    demo::read_topic(&common::broker().bootstrap, topic, 6, |_| {
        n += 1;
        Ok(())
    })
    .unwrap();
    n
}

/// Waits until `topic` holds a dedupe decision for every one of `ids`.
fn wait_until_decided(
    rt: &tokio::runtime::Runtime,
    codec: &Codec,
    topic: &str,
    ids: &HashSet<String>,
    running: &mut common::Killed,
) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let decided = decided_inputs(&decisions(rt, codec, topic));
        if ids.is_subset(&decided) {
            return;
        }
        assert!(
            running.0.try_wait().unwrap().is_none(),
            "the processors writing {topic} stopped"
        );
        assert!(
            Instant::now() < deadline,
            "{topic}: {} of {} inputs decided",
            ids.intersection(&decided).count(),
            ids.len()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn garbage(items: &[FeedItem]) -> usize {
    items
        .iter()
        .filter(|i| matches!(i, FeedItem::Garbage { .. }))
        .count()
}

#[test]
fn production_shadow_and_staging_share_a_cluster_without_touching_each_others_topics() {
    let bootstrap = common::broker().bootstrap.clone();
    let (rt, registry_url) = common::runtime_with_registry();
    let dir = tempfile::tempdir().unwrap();

    // The shadow: production's input names, its own decision, dispatch, dead-letter and
    // contact topics, and a new policy version to tell its decisions apart.
    let shadow_dir = dir.path().join("shadow-topology");
    common::edited_topology(&shadow_dir, |file, text| match file {
        "topics.toml" => text
            .replace("\"herald.decisions.v1\"", "\"shadow.decisions.v1\"")
            .replace("\"herald.dispatch.v1\"", "\"shadow.dispatch.v1\"")
            .replace("\"herald.dlq.v1\"", "\"shadow.dlq.v1\"")
            .replace("\"herald.contacts.v1\"", "\"shadow.contacts.v1\""),
        "policy.toml" => text.replacen(
            "version = \"2026-11-24.1\"",
            &format!("version = \"{SHADOW_POLICY}\""),
            1,
        ),
        _ => text,
    });
    let shadow_topology = shadow_dir.to_str().unwrap();

    // Each deployment creates its topics as a user would; the shadow finds the inputs there.
    let apply = |extra: &[&str]| {
        let mut args = vec![
            "topics",
            "apply",
            "--bootstrap",
            &bootstrap,
            "--replication",
            "1",
        ];
        args.extend(extra);
        let o = common::herald(&args);
        assert!(o.status.success(), "{}", common::text(&o));
        common::text(&o)
    };
    let production_report = apply(&[]);
    assert!(
        production_report.contains("CREATED herald.decisions.v1"),
        "{production_report}"
    );
    let shadow_report = apply(&["--topology", shadow_topology]);
    for line in ["CREATED shadow.decisions.v1", "OK      oms.events.v1"] {
        assert!(shadow_report.contains(line), "{line}: {shadow_report}");
    }
    let staging_report = apply(&["--topic-prefix", "staging."]);
    assert_eq!(
        staging_report.matches("CREATED staging.").count(),
        Topology::embedded().unwrap().topics.len(),
        "{staging_report}"
    );

    // Production's facts on production's topics, staging's own facts (ids of their own) on
    // staging's; each codec registers its schemas under its own topics' subjects.
    let production = Topology::embedded().unwrap();
    let staging = Topology::embedded()
        .unwrap()
        .with_topic_prefix("staging.")
        .unwrap();
    let production_codec = Codec::new(&registry_url, &production.names).unwrap();
    let staging_codec = Codec::new(&registry_url, &staging.names).unwrap();
    rt.block_on(production_codec.register_all()).unwrap();
    rt.block_on(staging_codec.register_all()).unwrap();
    let subjects: Vec<String> = rt
        .block_on(async {
            reqwest::get(format!("{registry_url}/subjects"))
                .await?
                .json()
                .await
        })
        .unwrap();
    assert!(
        subjects.contains(&"staging.herald.decisions.v1-value".to_string()),
        "{subjects:?}"
    );
    let producer = common::broker()
        .settings(false, "feeder")
        .producer(None)
        .unwrap();
    let production_feed = scenario::generate(40, 5);
    let mut staging_feed = scenario::generate(20, 9);
    for item in &mut staging_feed.items {
        if let FeedItem::Event(e) = item {
            e.envelope.event_id = format!("staging-{}", e.envelope.event_id);
        }
    }
    for (codec, feed) in [
        (&production_codec, &production_feed),
        (&staging_codec, &staging_feed),
    ] {
        demo::feed_stock(&rt, &producer, codec, &scenario::stock_levels()).unwrap();
        common::feed(&rt, &producer, codec, &feed.items);
    }
    let production_ids = common::event_ids(&production_feed.items);
    let staging_ids = common::event_ids(&staging_feed.items);

    // Production decides its facts, then stops: what it wrote is the yardstick.
    let mut prod = processors("production", &registry_url, dir.path(), &[]);
    wait_until_decided(
        &rt,
        &production_codec,
        "herald.decisions.v1",
        &production_ids,
        &mut prod,
    );
    drop(prod);
    let production_log = decisions(&rt, &production_codec, "herald.decisions.v1");
    let production_dead = records_in("herald.dlq.v1");
    let production_cards = records_in("herald.contacts.v1");
    assert!(production_cards > 0, "production wrote no contact card");
    // Every undecodable record the feed holds is dead-lettered (the scenario has some).
    assert!(production_dead >= garbage(&production_feed.items) && production_dead > 0);

    // A fresh shadow with its own groups and a fresh staging (groups from its prefix) decide
    // everything they read, with production's decision log already full.
    let mut shadow = processors(
        "shadow",
        &registry_url,
        dir.path(),
        &[
            "--topology",
            shadow_topology,
            "--group-prefix",
            "herald-shadow",
        ],
    );
    let mut staged = processors(
        "staging",
        &registry_url,
        dir.path(),
        &["--topic-prefix", "staging."],
    );
    let shadow_codec = Codec::new(
        &registry_url,
        &herald::topology_files::load(&shadow_dir).unwrap().names,
    )
    .unwrap();
    wait_until_decided(
        &rt,
        &shadow_codec,
        "shadow.decisions.v1",
        &production_ids,
        &mut shadow,
    );
    wait_until_decided(
        &rt,
        &staging_codec,
        "staging.herald.decisions.v1",
        &staging_ids,
        &mut staged,
    );
    drop(shadow);
    drop(staged);

    // The shadow read production's inputs and wrote only its own topics, under its policy.
    let shadow_log = decisions(&rt, &shadow_codec, "shadow.decisions.v1");
    assert_eq!(decided_inputs(&shadow_log), production_ids);
    assert!(
        shadow_log.iter().all(|d| d.policy_version == SHADOW_POLICY),
        "a shadow decision under another policy"
    );
    assert_eq!(records_in("shadow.dlq.v1"), production_dead);
    assert_eq!(records_in("shadow.contacts.v1"), production_cards);
    // Staging read and wrote only staging's topics.
    let staging_log = decisions(&rt, &staging_codec, "staging.herald.decisions.v1");
    assert_eq!(decided_inputs(&staging_log), staging_ids);
    let staging_dead = records_in("staging.herald.dlq.v1");
    assert!(staging_dead >= garbage(&staging_feed.items) && staging_dead > 0);
    // Production's topics hold exactly what production wrote.
    let ids = |log: &[Decision]| {
        let mut ids: Vec<String> = log.iter().map(|d| d.decision_id.clone()).collect();
        ids.sort();
        ids
    };
    assert_eq!(
        ids(&decisions(&rt, &production_codec, "herald.decisions.v1")),
        ids(&production_log)
    );
    assert_eq!(decided_inputs(&production_log), production_ids);
    assert_eq!(records_in("herald.dlq.v1"), production_dead);
    assert_eq!(records_in("herald.contacts.v1"), production_cards);
    assert!(production_log
        .iter()
        .all(|d| d.policy_version != SHADOW_POLICY));
}
