//! Herald over SASL_SSL, as most company clusters and managed Kafka services run it: a real
//! Apache Kafka broker (`scripts/kafka start --sasl-ssl`) with a SCRAM-SHA-512 user and a
//! certificate signed by a CA the test makes. Every command that talks to Kafka takes the same
//! librdkafka properties file: topics apply, the processors, dispatch, the gateway, export, the
//! dead-letter list, rebuild and the consent audit. A wrong password is a clear error naming
//! the setting, soon, not a hang; secrets appear in no output and no `--help`.

mod common;

use common::{herald, herald_env, text};
use herald::demo;
use herald::events::Outcome;
use herald::kafka::KafkaSettings;
use herald::registry::Codec;
use herald::scenario::{self, FeedItem};
use herald::topology::Topology;
use rdkafka::message::Message;
use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn every_kafka_command_works_over_sasl_ssl_and_a_wrong_password_is_named() {
    let broker = common::start_broker(1, &["--sasl-ssl"]);
    let props = broker.dir.join("client.properties");
    let props_s = props.to_str().unwrap().to_string();
    let secrets = herald::kafka::read_properties(&props).unwrap();
    let password = secrets
        .iter()
        .find(|(k, _)| k == "sasl.password")
        .map(|(_, v)| v.clone())
        .unwrap();

    // Plaintext to a SASL_SSL listener, and a wrong password: clear errors, soon.
    let t = Instant::now();
    let o = herald(&[
        "topics",
        "apply",
        "--bootstrap",
        &broker.bootstrap,
        "--kafka-properties",
        &props_s,
        "--kafka-config",
        "sasl.password=not-the-password",
        "--replication",
        "1",
    ]);
    assert!(!o.status.success(), "a wrong password must fail");
    assert!(t.elapsed() < Duration::from_secs(60), "it must not hang");
    let said = text(&o);
    assert!(
        said.contains("sasl.password") && said.contains("sasl.username (herald)"),
        "the error names the settings: {said}"
    );
    assert!(!said.contains(&password) && !said.contains("not-the-password"));
    let o = herald(&[
        "topics",
        "apply",
        "--bootstrap",
        &broker.bootstrap,
        "--replication",
        "1",
    ]);
    assert!(!o.status.success(), "plaintext to a TLS listener must fail");
    assert!(
        text(&o).contains("security.protocol"),
        "the error names security.protocol: {}",
        text(&o)
    );

    // Secrets from the environment never show in --help.
    let o = herald_env(
        &["run", "--help"],
        &[
            ("HERALD_KAFKA_SASL_PASSWORD", password.as_str()),
            ("HERALD_KAFKA_PROPERTIES", &props_s),
            ("HERALD_IDENTIFIER_KEY", "a-secret-identifier-key"),
        ],
    );
    assert!(o.status.success());
    let help = text(&o);
    assert!(help.contains("--kafka-properties"), "{help}");
    assert!(!help.contains(&password) && !help.contains("a-secret-identifier-key"));

    // Topics through the admin API over SASL_SSL, then everything else with the same file.
    let o = herald(&[
        "topics",
        "apply",
        "--bootstrap",
        &broker.bootstrap,
        "--kafka-properties",
        &props_s,
        "--replication",
        "1",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let topology = Topology::embedded().unwrap();
    assert_eq!(
        text(&o)
            .lines()
            .filter(|l| l.starts_with("CREATED"))
            .count(),
        topology.topics.len(),
        "{}",
        text(&o)
    );

    let rt = common::runtime();
    let mut secured = KafkaSettings::new(&broker.bootstrap, true, "test");
    secured.extra = secrets.clone();
    // The gateway of the one-machine cluster produces over SASL_SSL too.
    let cluster =
        demo::start_cluster_on(&rt, &topology, demo::demo_simulator(), Some(&secured)).unwrap();
    let codec = Codec::new(&cluster.registry_url, &topology.names).unwrap();
    rt.block_on(codec.register_all()).unwrap();
    let s = scenario::generate(60, 3);
    let producer = cluster.settings(true, "feeder").producer(None).unwrap();
    demo::feed_stock(&rt, &producer, &codec, &scenario::stock_levels()).unwrap();
    common::feed(&rt, &producer, &codec, &s.items);
    let distinct = s.facts_to_accept();

    let dir = tempfile::tempdir().unwrap();
    let spawn = |stage: &str| {
        let store = dir.path().join(format!("{stage}.redb"));
        common::Killed(
            Command::new(env!("CARGO_BIN_EXE_herald"))
                .env("HERALD_IDENTIFIER_KEY", herald::identity::DEMO_KEY)
                .env("HERALD_KAFKA_PROPERTIES", &props_s)
                .args(["run", "--stage", stage, "--instance-id", "secured"])
                .args(["--bootstrap", &broker.bootstrap])
                .args(["--registry", &cluster.registry_url])
                .args(["--provider-url", &cluster.simulator_url])
                .args(["--phone-number-id", "1055501234567890"])
                .args(["--provider-token", "secured"])
                .args(["--metrics-addr", "127.0.0.1:0"])
                .arg("--store")
                .arg(store)
                .env("HERALD_WALL_CLOCK_TICK_SECS", "0")
                .env("RUST_LOG", "error")
                .spawn()
                .expect("herald starts"),
        )
    };
    let processors = spawn("processors");
    let dispatch = spawn("dispatch");
    let mut secured_reader = secured.clone();
    secured_reader.instance_id = "reader".into();
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut accepted = HashSet::new();
    while accepted.len() < distinct.len() {
        assert!(
            Instant::now() < deadline,
            "only {} of {} facts accepted over SASL_SSL",
            accepted.len(),
            distinct.len()
        );
        std::thread::sleep(Duration::from_secs(1));
        accepted.clear();
        demo::read_topic_with(
            &secured_reader,
            "herald.decisions.v1",
            topology.partitions(),
            |m| {
                let d = rt
                    .block_on(codec.decode_decision(m.payload()))
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                if let Outcome::EventAccepted(e) = d.outcome {
                    accepted.insert(e.envelope.event_id);
                }
                Ok(())
            },
        )
        .unwrap();
    }
    // Dispatch reads the approvals and sends through the simulator, whose status webhooks the
    // gateway writes back over SASL_SSL.
    let deadline = Instant::now() + Duration::from_secs(120);
    while cluster.simulator.sent_count() == 0 {
        assert!(Instant::now() < deadline, "dispatch sent nothing");
        std::thread::sleep(Duration::from_millis(500));
    }
    let statuses = demo::read_topic_with(
        &secured_reader,
        "provider.events.v1",
        topology.partitions(),
        |_| Ok(()),
    )
    .unwrap();
    assert!(statuses > 0, "no status webhook reached provider.events.v1");

    // The admin and audit commands, with the same properties file.
    let with_file = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend([
            "--bootstrap",
            &broker.bootstrap,
            "--kafka-properties",
            &props_s,
        ]);
        let o = herald(&all);
        assert!(o.status.success(), "herald {args:?}: {}", text(&o));
        assert!(
            !text(&o).contains(&password),
            "herald {args:?} shows the password"
        );
        text(&o)
    };
    let registry = cluster.registry_url.as_str();
    let dump = dir.path().join("export.jsonl");
    let said = with_file(&[
        "export",
        "--registry",
        registry,
        "--out",
        dump.to_str().unwrap(),
    ]);
    assert!(said.contains("wrote"), "{said}");
    assert!(std::fs::metadata(&dump).unwrap().len() > 0);
    with_file(&["dlq", "list", "--registry", registry, "--json"]);
    let rebuilt = dir.path().join("rebuilt");
    let said = with_file(&[
        "rebuild",
        "--registry",
        registry,
        "--into",
        rebuilt.to_str().unwrap(),
        "--json",
    ]);
    assert!(said.contains("digest"), "{said}");
    with_file(&["audit", "verify", "--registry", registry]);
    let customer = s
        .items
        .iter()
        .find_map(|i| match i {
            FeedItem::Event(e) => Some(e.envelope.customer_id.clone()),
            _ => None,
        })
        .unwrap();
    with_file(&[
        "audit",
        "consent",
        "--customer",
        &customer,
        "--registry",
        registry,
    ]);
    drop(processors);
    drop(dispatch);
}
