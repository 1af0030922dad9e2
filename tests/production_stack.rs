//! Herald on the components a team already runs, none of them Herald's own: Apicurio Registry
//! through its Confluent-compatible API (HTTPS with a private CA, HTTP basic auth), Apache
//! Cassandra 5.0 as the CQL state store (password and TLS), and a real Apache Kafka broker.
//! Then the decision and dispatch topics are read with Confluent's Python client and
//! `AvroDeserializer`, as a warehouse team would, and held against Herald's own reading.

mod common;

use common::{herald_env, text, Killed};
use herald::events::{Decision, DispatchRecord, Outcome};
use herald::registry::{Codec, RegistrySettings};
use herald::scenario::{self, FeedItem};
use herald::topology::Topology;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// The shared registry's settings: URL, user and CA.
fn registry_settings() -> RegistrySettings {
    let registry = common::registry();
    RegistrySettings {
        url: registry.address.clone(),
        user_info: Some(common::REGISTRY_USER_INFO.to_string()),
        ca_file: Some(registry.dir.join("ca.pem")),
    }
}

/// An HTTP client for the registry's API, trusting its CA.
fn registry_http(rt: &tokio::runtime::Runtime) -> reqwest::Client {
    let _guard = rt.enter();
    let ca = std::fs::read(common::registry().dir.join("ca.pem")).unwrap();
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .build()
        .unwrap()
}

/// `GET` a path of the registry's API, as its user; the JSON answer.
fn registry_get(rt: &tokio::runtime::Runtime, path: &str) -> serde_json::Value {
    let (user, password) = common::REGISTRY_USER_INFO.split_once(':').unwrap();
    let http = registry_http(rt);
    rt.block_on(async {
        http.get(format!("{}{path}", common::registry().address))
            .basic_auth(user, Some(password))
            .send()
            .await?
            .json()
            .await
    })
    .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// Posts a schema to a subject the way any producer's serializer would; the HTTP status.
fn post_schema(rt: &tokio::runtime::Runtime, subject: &str, schema: &str) -> (u16, String) {
    let (user, password) = common::REGISTRY_USER_INFO.split_once(':').unwrap();
    let resp = rt
        .block_on(
            registry_http(rt)
                .post(format!(
                    "{}/subjects/{subject}/versions",
                    common::registry().address
                ))
                .basic_auth(user, Some(password))
                .header("content-type", "application/vnd.schemaregistry.v1+json")
                .body(serde_json::json!({ "schema": schema }).to_string())
                .send(),
        )
        .unwrap();
    let status = resp.status().as_u16();
    (status, rt.block_on(resp.text()).unwrap_or_default())
}

#[test]
fn schemas_register_on_apicurio_with_credentials_and_an_incompatible_schema_is_refused() {
    let rt = common::runtime();
    let registry = common::registry();
    let dir = tempfile::tempdir().unwrap();
    // The registry's settings in the same properties file as the Kafka client's, under the
    // keys Confluent's clients use.
    let props = dir.path().join("client.properties");
    let write_props = |ca: bool| {
        let mut p = format!(
            "schema.registry.url={}\nschema.registry.basic.auth.user.info={}\n",
            registry.address,
            common::REGISTRY_USER_INFO
        );
        if ca {
            p.push_str(&format!(
                "schema.registry.ssl.ca.location={}\n",
                registry.dir.join("ca.pem").display()
            ));
        }
        std::fs::write(&props, p).unwrap();
    };
    write_props(true);
    let props_s = props.to_str().unwrap();
    let register = |prefix: &str, extra: &[&str]| {
        let mut args = vec![
            "schemas",
            "register",
            "--kafka-properties",
            props_s,
            "--topic-prefix",
            prefix,
        ];
        args.extend_from_slice(extra);
        herald_env(&args, &[])
    };

    let first = register("one.", &[]);
    assert!(first.status.success(), "{}", text(&first));
    let subjects = herald::avro::TOPIC_RECORDS.len();
    assert_eq!(
        text(&first).lines().filter(|l| l.contains("\tid ")).count(),
        subjects,
        "one line per subject: {}",
        text(&first)
    );
    // Idempotent: the same ids again.
    let again = register("one.", &[]);
    assert!(again.status.success(), "{}", text(&again));
    assert_eq!(
        String::from_utf8_lossy(&first.stdout),
        String::from_utf8_lossy(&again.stdout)
    );
    // Every subject is there, and set to BACKWARD (Apicurio's default would be NONE).
    let listed: Vec<String> = serde_json::from_value(registry_get(&rt, "/subjects")).unwrap();
    let topology = Topology::embedded()
        .unwrap()
        .with_topic_prefix("one.")
        .unwrap();
    for (role, _) in herald::avro::TOPIC_RECORDS {
        let subject = format!("{}-value", topology.names.of(*role));
        assert!(listed.contains(&subject), "{subject} not in {listed:?}");
    }
    let config = registry_get(&rt, "/config/one.herald.decisions.v1-value");
    assert_eq!(
        config["compatibilityLevel"], "BACKWARD",
        "herald schemas register sets the subject's compatibility: {config}"
    );

    // A producer's schema that old decisions cannot be read with is refused by the registry.
    let incompatible = r#"{"type":"record","name":"DecisionEvent","namespace":"herald.decisions",
        "fields":[{"name":"decision_id","type":"string"},{"name":"tenant","type":"string"}]}"#;
    let (status, body) = post_schema(&rt, "one.herald.decisions.v1-value", incompatible);
    assert_eq!(
        status, 409,
        "an incompatible schema must be refused: {body}"
    );

    // A subject already holding a stranger's schema: Herald's registration fails and says
    // which subject, rather than writing records no reader of that subject expects.
    let (status, body) = post_schema(
        &rt,
        "two.herald.decisions.v1-value",
        r#"{"type":"record","name":"Other","fields":[{"name":"x","type":"string"}]}"#,
    );
    assert_eq!(status, 200, "{body}");
    let refused = register("two.", &[]);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains("two.herald.decisions.v1-value") && text(&refused).contains("409"),
        "the error names the subject and the refusal: {}",
        text(&refused)
    );

    // A wrong password and a missing CA are named, and no secret is printed.
    let wrong = register("one.", &["--registry-user-info", "herald:not-the-password"]);
    assert!(!wrong.status.success());
    assert!(
        text(&wrong).contains("--registry-user-info"),
        "the error names the setting: {}",
        text(&wrong)
    );
    let (_, password) = common::REGISTRY_USER_INFO.split_once(':').unwrap();
    assert!(!text(&wrong).contains("not-the-password") && !text(&wrong).contains(password));
    write_props(false);
    let untrusted = register("one.", &[]);
    assert!(!untrusted.status.success());
    assert!(
        text(&untrusted).contains("--registry-ca-file"),
        "the error points at the CA setting: {}",
        text(&untrusted)
    );
}

/// For each input topic of `items`, registers a version of its schema with one optional field
/// more (BACKWARD-compatible); the new id by topic.
fn register_newer_versions(
    rt: &tokio::runtime::Runtime,
    codec: &Codec,
    items: &[FeedItem],
) -> HashMap<String, u32> {
    let topics: HashSet<String> = items
        .iter()
        .filter_map(|i| match i {
            FeedItem::Event(e) => Some(codec.topics().of_family(e.fact.family()).to_string()),
            _ => None,
        })
        .collect();
    let mut out = HashMap::new();
    for topic in topics {
        let latest = registry_get(rt, &format!("/subjects/{topic}-value/versions/latest"));
        let mut schema: serde_json::Value =
            serde_json::from_str(latest["schema"].as_str().unwrap()).unwrap();
        schema["fields"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "name": "source_note", "type": ["null", "string"], "default": null
            }));
        let (status, body) = post_schema(rt, &format!("{topic}-value"), &schema.to_string());
        assert_eq!(status, 200, "{body}");
        let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
            .as_u64()
            .unwrap() as u32;
        out.insert(topic, id);
    }
    out
}

/// Produces `items` as a source on the newer schema versions writes them: Confluent framing
/// with the newer id, and the added field (null: union branch 0) after Herald's fields.
fn feed_as_newer_version(
    rt: &tokio::runtime::Runtime,
    producer: &rdkafka::producer::FutureProducer,
    codec: &Codec,
    items: &[FeedItem],
    newer: &HashMap<String, u32>,
) {
    use rdkafka::producer::FutureRecord;
    let mut pending = Vec::new();
    for item in items {
        let (topic, key, bytes) = match item {
            FeedItem::Event(e) => {
                let topic = codec.topics().of_family(e.fact.family()).to_string();
                let mut bytes = rt.block_on(codec.encode_input(e)).unwrap();
                bytes[1..5].copy_from_slice(&newer[&topic].to_be_bytes());
                bytes.push(0);
                (topic, e.envelope.customer_id.clone(), bytes)
            }
            FeedItem::Garbage { topic, key, bytes } => (
                codec.topics().of(*topic).to_string(),
                key.clone(),
                bytes.clone(),
            ),
        };
        pending.push(
            producer
                .send_result(FutureRecord::to(&topic).key(key.as_bytes()).payload(&bytes))
                .map_err(|(e, _)| e)
                .unwrap(),
        );
    }
    for d in rt.block_on(futures::future::join_all(pending)) {
        d.unwrap().map_err(|(e, _)| e).unwrap();
    }
}

/// Decisions of the log, as Herald reads them, by (partition, offset).
fn decisions(
    rt: &tokio::runtime::Runtime,
    cluster: &herald::demo::Cluster,
    codec: &Codec,
    topology: &Topology,
) -> BTreeMap<(i32, i64), Decision> {
    common::read_log(
        &cluster.bootstrap,
        topology.names.decisions(),
        topology,
        |b| rt.block_on(codec.decode_decision(b)),
    )
}

/// How many times each fact was accepted.
fn accepted(log: &BTreeMap<(i32, i64), Decision>) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for d in log.values() {
        if let Outcome::EventAccepted(e) = &d.outcome {
            *out.entry(e.envelope.event_id.clone()).or_insert(0) += 1;
        }
    }
    out
}

/// A process's log without the dead letters the scenario's garbage is expected to cause.
fn warnings(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains("record dead-lettered"))
        .collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

#[test]
fn a_run_on_apicurio_and_cassandra_survives_a_restart_and_a_registry_outage_and_rebuilds_equal() {
    let rt = common::runtime();
    let topology = Topology::embedded().unwrap();
    let registry = registry_settings();
    let registry_dir = common::registry().dir.clone();
    let ca = registry_dir.join("ca.pem");
    let ca_s = ca.to_str().unwrap().to_string();
    let cassandra = common::cassandra();
    let cluster = herald::demo::start_cluster_with(
        &rt,
        &topology,
        herald::demo::demo_simulator(),
        Some(&common::broker().settings(true, "test")),
        Some(&registry),
    )
    .unwrap();
    let codec = Codec::with_settings(&registry, &topology.names).unwrap();
    rt.block_on(codec.register_all()).unwrap();
    let s = scenario::generate(60, 23);
    let to_accept = s.facts_to_accept();
    let garbage = s
        .items
        .iter()
        .filter(|i| !matches!(i, FeedItem::Event(_)))
        .count();
    let (first, second) = s.items.split_at(s.items.len() / 2);
    let ids_in = |items: &[FeedItem]| -> HashSet<String> {
        items
            .iter()
            .filter_map(|i| match i {
                FeedItem::Event(e) if to_accept.contains(&e.envelope.event_id) => {
                    Some(e.envelope.event_id.clone())
                }
                _ => None,
            })
            .collect()
    };
    let producer = cluster.settings(true, "feeder").producer(None).unwrap();
    herald::demo::feed_stock(&rt, &producer, &codec, &scenario::stock_levels()).unwrap();
    common::feed(&rt, &producer, &codec, first);

    // The store's password from the environment, its user and CA in the address.
    let keyspace = common::fresh_keyspace("live");
    let live = format!(
        "scylla://{}/{keyspace}?replication_factor=1&user=cassandra&ca_file={}",
        cassandra.address,
        cassandra.dir.join("ca.pem").display()
    );
    let secrets = [
        ("HERALD_REGISTRY_USER_INFO", common::REGISTRY_USER_INFO),
        ("HERALD_REGISTRY_CA_FILE", ca_s.as_str()),
        ("HERALD_STORE_PASSWORD", "cassandra"),
    ];
    // Each process's warnings go to a file, appended across restarts, so that a failure
    // says what the processes saw (an abort, a rebalance, a registry retry).
    let logs = tempfile::tempdir().unwrap();
    let log_of = |stage: &str| logs.path().join(format!("{stage}.log"));
    let spawn = |stage: &str| {
        let port = common::free_port();
        let mut c = common::stage_command(&cluster, stage, "stack", Path::new(&live));
        c.args(["--metrics-addr", &format!("127.0.0.1:{port}")]);
        for (k, v) in secrets {
            c.env(k, v);
        }
        // A handful of customers in memory: the rest come and go through the CQL store.
        c.env("HERALD_STATE_CACHE_CUSTOMERS", "8");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_of(stage))
            .unwrap();
        c.env("RUST_LOG", "info").stderr(log);
        let child = Killed(c.spawn().expect("herald starts"));
        common::wait_ready(&rt, stage, port, 120);
        child
    };
    // Every fact is accepted, or ignored as older than its customer's erasure: across topics
    // the order records are read in is the intake's best effort, so an erasure on one topic
    // may be decided before an older fact on another.
    let wait_accepted = |want: &HashSet<String>, what: &str, child: &mut Killed| {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let log = decisions(&rt, &cluster, &codec, &topology);
            let got = accepted(&log);
            let ignored: HashSet<&String> = log
                .values()
                .filter_map(|d| match &d.outcome {
                    Outcome::PreErasureFactIgnored(p) => Some(&p.event_id),
                    _ => None,
                })
                .collect();
            let missing: Vec<&String> = want
                .iter()
                .filter(|id| !got.contains_key(*id) && !ignored.contains(id))
                .collect();
            if missing.is_empty() {
                return got;
            }
            assert!(
                child.0.try_wait().unwrap().is_none(),
                "the processors stopped while {what}; their log:\n{}",
                warnings(&log_of("processors"))
            );
            if Instant::now() >= deadline {
                // What was decided about each missing fact, where.
                let about: Vec<String> = missing
                    .iter()
                    .map(|id| {
                        let seen: Vec<String> = log
                            .iter()
                            .filter(|(_, d)| &&d.input_event_id == id)
                            .map(|((p, o), d)| format!("{p}@{o}:{}", d.outcome.kind()))
                            .collect();
                        format!("{id}: {seen:?}")
                    })
                    .collect();
                panic!(
                    "{} of {} facts not accepted {what}:\n{}\nthe processors' log:\n{}",
                    missing.len(),
                    want.len(),
                    about.join("\n"),
                    warnings(&log_of("processors"))
                );
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    };

    let mut processors = spawn("processors");
    let dispatch = spawn("dispatch");
    wait_accepted(&ids_in(first), "before the restart", &mut processors);

    // SIGKILL, and a new process restores from Cassandra.
    drop(processors);
    let mut processors = spawn("processors");

    // The registry stops answering (paused, as a hung or partitioned registry is), and the
    // second half arrives with schema ids the new process has not resolved yet.
    let registry_script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/registry");
    let pause = |action: &str| {
        let o = Command::new(&registry_script)
            .args([action, "--dir"])
            .arg(&registry_dir)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "scripts/registry {action}: {}",
            text(&o)
        );
    };
    // A source system has moved to a newer version of its schema (an optional field more),
    // registered before the outage: a schema id the restarted process has never resolved.
    let newer = register_newer_versions(&rt, &codec, second);
    let before = accepted(&decisions(&rt, &cluster, &codec, &topology)).len();
    pause("pause");
    feed_as_newer_version(&rt, &producer, &codec, second, &newer);
    std::thread::sleep(Duration::from_secs(12));
    let during = accepted(&decisions(&rt, &cluster, &codec, &topology)).len();
    pause("resume");
    assert_eq!(
        during, before,
        "facts were decided without the registry: the outage proved nothing"
    );
    let all: HashSet<String> = to_accept.clone();
    let got = wait_accepted(&all, "after the registry came back", &mut processors);
    let twice: Vec<_> = got.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "facts accepted twice: {twice:?}");

    // Nothing was dead-lettered for the outage: only the scenario's garbage is there.
    let letters = herald::dlq::read_all(
        &cluster.settings(true, "dlq-reader"),
        &codec,
        &rt,
        topology.partitions(),
    )
    .unwrap();
    let blamed: Vec<_> = letters
        .iter()
        .filter(|l| {
            l.reason.contains("http call to schema registry failed")
                || l.reason.contains("retriable: true")
                || l.reason.contains("unavailable")
        })
        .map(|l| l.reason.clone())
        .collect();
    assert!(
        blamed.is_empty(),
        "dead-lettered for the outage: {blamed:?}"
    );
    let inputs = letters
        .iter()
        .filter(|l| topology.names.family_of(&l.source_topic).is_some())
        .count();
    assert_eq!(inputs, garbage, "input records dead-lettered: {letters:?}");

    // A clean stop, then the decision log rebuilt into a fresh keyspace equals the live one.
    common::signal(&processors.0, 15);
    assert!(processors.0.wait().unwrap().success());
    let fresh = format!(
        "scylla://{}/{}?replication_factor=1&user=cassandra&ca_file={}",
        cassandra.address,
        common::fresh_keyspace("rebuilt"),
        cassandra.dir.join("ca.pem").display()
    );
    let o = herald_env(
        &[
            "rebuild",
            "--bootstrap",
            &cluster.bootstrap,
            "--registry",
            &registry.url,
            "--into",
            &fresh,
            "--verify",
            &live,
        ],
        &secrets,
    );
    assert!(o.status.success(), "rebuild --verify: {}", text(&o));
    assert!(text(&o).contains("equal"), "{}", text(&o));

    // The `herald gateway` command on the same registry takes a signed webhook.
    let (_gateway, listen) = common::start_gateway_with(&rt, &cluster, &secrets);
    let body = common::inbound_text("+15550001111", "wamid.stack-1", 1_790_000_000, "hello");
    assert_eq!(common::post_signed(&rt, listen, &body), 200);

    // Export and the dead-letter list through the same registry.
    let dump = tempfile::tempdir().unwrap();
    let out = dump.path().join("export.jsonl");
    let o = herald_env(
        &[
            "export",
            "--bootstrap",
            &cluster.bootstrap,
            "--registry",
            &registry.url,
            "--out",
            out.to_str().unwrap(),
        ],
        &secrets,
    );
    assert!(o.status.success(), "export: {}", text(&o));
    let o = herald_env(
        &[
            "dlq",
            "list",
            "--bootstrap",
            &cluster.bootstrap,
            "--registry",
            &registry.url,
            "--json",
        ],
        &secrets,
    );
    assert!(o.status.success(), "dlq list: {}", text(&o));
    assert!(!text(&o).contains(common::REGISTRY_USER_INFO));

    // Wait for dispatch to have written its steps, then stop it cleanly.
    let deadline = Instant::now() + Duration::from_secs(120);
    while cluster.simulator.sent_count() == 0 {
        assert!(Instant::now() < deadline, "dispatch sent nothing");
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut dispatch = dispatch;
    common::signal(&dispatch.0, 15);
    assert!(dispatch.0.wait().unwrap().success());

    warehouse_client_reads_what_herald_wrote(&rt, &cluster, &codec, &topology, &registry);
}

/// Fails naming the offsets one reader saw and the other did not.
fn same_offsets(python: BTreeSet<(i32, i64)>, herald: BTreeSet<(i32, i64)>, topic: &str) {
    let only_python: Vec<_> = python.difference(&herald).take(10).collect();
    let only_herald: Vec<_> = herald.difference(&python).take(10).collect();
    assert!(
        only_python.is_empty() && only_herald.is_empty() && python.len() == herald.len(),
        "the Python consumer read other offsets of {topic}: only it read {only_python:?}, \
         only Herald read {only_herald:?}"
    );
}

/// Confluent's Python client reads both topics read_committed through the registry, and each
/// record it decodes matches Herald's own decoding of the same offset.
fn warehouse_client_reads_what_herald_wrote(
    rt: &tokio::runtime::Runtime,
    cluster: &herald::demo::Cluster,
    codec: &Codec,
    topology: &Topology,
    registry: &RegistrySettings,
) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let o = Command::new(root.join("scripts/python-client"))
        .output()
        .unwrap();
    assert!(o.status.success(), "scripts/python-client: {}", text(&o));
    let python = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let reader = Command::new(&python)
        .arg(root.join("tests/warehouse/read_topics.py"))
        .args(["--bootstrap", &cluster.bootstrap])
        .args(["--registry", &registry.url])
        .args(["--user-info", registry.user_info.as_deref().unwrap()])
        .arg("--ca-file")
        .arg(registry.ca_file.as_ref().unwrap())
        .args([&**topology.names.decisions(), &**topology.names.dispatch()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A consumer that hangs fails the test instead of holding up the suite.
    let pid = reader.id();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(reader.wait_with_output()));
    let o = match finished.recv_timeout(Duration::from_secs(180)) {
        Ok(o) => o.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("the Python consumer did not finish within 180 s");
        }
    };
    assert!(
        o.status.success(),
        "the Python consumer failed: {}",
        text(&o)
    );
    let read: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();

    let mine = decisions(rt, cluster, codec, topology);
    let steps: BTreeMap<(i32, i64), DispatchRecord> = common::read_log(
        &cluster.bootstrap,
        topology.names.dispatch(),
        topology,
        |b| rt.block_on(codec.decode_dispatch(b)),
    );
    assert!(!mine.is_empty() && !steps.is_empty());

    let at = |r: &serde_json::Value| {
        (
            r["partition"].as_i64().unwrap() as i32,
            r["offset"].as_i64().unwrap(),
        )
    };
    // A union of records reads as [full record name, fields].
    let branch = |v: &serde_json::Value| {
        v[0].as_str()
            .unwrap_or_default()
            .rsplit('.')
            .next()
            .unwrap_or_default()
            .to_string()
    };
    // The records the Python consumer read of `topic`, at the very offsets Herald read.
    let of_topic = |topic: &str, herald: BTreeSet<(i32, i64)>| -> Vec<&serde_json::Value> {
        let records: Vec<_> = read.iter().filter(|r| r["topic"] == topic).collect();
        same_offsets(records.iter().map(|r| at(r)).collect(), herald, topic);
        records
    };
    for r in of_topic(topology.names.decisions(), mine.keys().copied().collect()) {
        let d = &mine[&at(r)];
        let v = &r["value"];
        assert_eq!(
            r["key"],
            d.customer_id.as_str(),
            "the key is the customer id"
        );
        assert_eq!(v["decision_id"], d.decision_id.as_str());
        assert_eq!(v["customer_id"], d.customer_id.as_str());
        assert_eq!(v["input_event_id"], d.input_event_id.as_str());
        assert_eq!(v["decided_at"], d.decided_at, "{v}");
        assert_eq!(v["policy_version"], d.policy_version.as_str());
        assert_eq!(branch(&v["payload"]), d.outcome.kind(), "{v}");
    }
    for r in of_topic(topology.names.dispatch(), steps.keys().copied().collect()) {
        let step = &steps[&at(r)];
        let v = &r["value"];
        assert_eq!(v["dispatch_id"], step.dispatch_id.as_str());
        assert_eq!(v["decision_id"], step.decision_id.as_str());
        assert_eq!(v["customer_id"], step.customer_id.as_str());
        assert_eq!(v["template_name"], step.template_name.as_str());
        assert_eq!(v["recorded_at"], step.recorded_at, "{v}");
        // The dispatch payload union, in schema order.
        let variant = [
            "DispatchAttempted",
            "DispatchAccepted",
            "DispatchFailed",
            "DispatchSkipped",
            "DispatchIntended",
            "DispatchUnanswered",
            "DispatchReconciled",
        ][step.step.index()];
        assert_eq!(branch(&v["payload"]), variant, "{v}");
    }
}
