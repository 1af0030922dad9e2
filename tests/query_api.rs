//! The read-only query API of `herald run` over HTTP, on a real Apache Kafka broker
//! (`scripts/kafka`) with two processes in the processors' group, each with its own embedded
//! store: a customer's state, consent and messages from the process that owns them, a 307 to
//! the owner from the other, 404 for a customer nobody stores, and bodies that hold what
//! `schemas/query-api.openapi.yaml` says they hold.

mod common;

use common::Killed;
use herald::events::{Fact, Family};
use herald::scenario::FeedItem;
use herald::topology::Topology;
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

struct Answer {
    status: u16,
    location: Option<String>,
    body: Value,
}

fn get(rt: &tokio::runtime::Runtime, port: u16, path: &str) -> Option<Answer> {
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .ok()?;
        let r = client
            .get(format!("http://127.0.0.1:{port}{path}"))
            .send()
            .await
            .ok()?;
        let status = r.status().as_u16();
        let location = r
            .headers()
            .get("location")
            .and_then(|l| l.to_str().ok())
            .map(str::to_string);
        let text = r.text().await.ok()?;
        Some(Answer {
            status,
            location,
            body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
        })
    })
}

/// The `required` properties of a schema of the OpenAPI document, resolving `$ref`s.
fn required<'a>(doc: &'a serde_yaml::Value, schema: &'a serde_yaml::Value) -> Vec<&'a str> {
    let schema = match schema["$ref"].as_str() {
        Some(r) => {
            let name = r.trim_start_matches("#/components/schemas/");
            &doc["components"]["schemas"][name]
        }
        None => schema,
    };
    schema["required"]
        .as_sequence()
        .map(|r| r.iter().filter_map(|k| k.as_str()).collect())
        .unwrap_or_default()
}

/// A body holds every property its documented 200 response requires.
fn documented(doc: &serde_yaml::Value, path: &str, body: &Value) {
    let schema =
        &doc["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"];
    let keys = required(doc, schema);
    assert!(!keys.is_empty(), "{path}: no documented properties");
    for k in keys {
        assert!(body.get(k).is_some(), "{path}: the body lacks {k}: {body}");
    }
}

#[test]
fn the_query_api_answers_for_a_customer_from_the_process_that_owns_them() {
    let rt = common::runtime();
    let topology = Topology::embedded().unwrap();
    let (cluster, codec) = common::demo_cluster(&rt, &topology, common::broker());
    let producer = common::feeder(&cluster);
    let items = common::scenario_events(30, 5);
    let fed_outside_provider = items
        .iter()
        .filter(|i| matches!(i, FeedItem::Event(e) if e.fact.family() != Family::Provider))
        .count();
    // Customers who granted consent: their timelines have something to show.
    let consenting: BTreeSet<String> = items
        .iter()
        .filter_map(|i| match i {
            FeedItem::Event(e) if matches!(e.fact, Fact::ConsentGranted(_)) => {
                Some(e.envelope.customer_id.clone())
            }
            _ => None,
        })
        .collect();
    assert!(!consenting.is_empty());
    common::feed(&rt, &producer, &codec, &items);

    let dir = tempfile::tempdir().unwrap();
    let (port_a, port_b) = (common::free_port(), common::free_port());
    // A runs both stages, so its store holds dispatch's record of every message; B runs the
    // processors only. Each has a store of its own.
    let _a = Killed(
        common::stage_command(&cluster, "all", "a", &dir.path().join("a.redb"))
            .args(["--metrics-addr", &format!("127.0.0.1:{port_a}")])
            .spawn()
            .expect("herald starts"),
    );
    let _b = Killed(
        common::stage_command(&cluster, "processors", "b", &dir.path().join("b.redb"))
            .args(["--metrics-addr", &format!("127.0.0.1:{port_b}")])
            .spawn()
            .expect("herald starts"),
    );

    // Everything decided, and checkpointed since (a second after the last batch).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let consumed: f64 = [port_a, port_b]
            .iter()
            .map(|p| {
                let body = common::scrape(&rt, *p).unwrap_or_default();
                body.lines()
                    .filter(|l| l.starts_with("herald_records_in_total{"))
                    .filter(|l| l.contains("stage=\"processors\"") && !l.contains("provider"))
                    .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                    .sum::<f64>()
            })
            .sum();
        if consumed as usize >= fed_outside_provider {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{consumed} of {fed_outside_provider} records consumed"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(3));

    let doc: serde_yaml::Value = {
        let a = get(&rt, port_a, "/v1/openapi.yaml").expect("A answers");
        assert_eq!(a.status, 200);
        serde_yaml::from_str(a.body.as_str().expect("YAML text")).expect("the OpenAPI parses")
    };
    assert_eq!(
        doc["paths"]
            .as_mapping()
            .unwrap()
            .keys()
            .filter_map(|k| k.as_str())
            .collect::<BTreeSet<_>>(),
        BTreeSet::from([
            "/v1/customers/{customerId}",
            "/v1/customers/{customerId}/consent",
            "/v1/customers/{customerId}/messages",
            "/v1/customers/{customerId}/owner",
            "/v1/openapi.yaml",
        ]),
        "the document describes the routes served"
    );

    let (mut served, mut redirected, mut with_provider_ids) = (0, 0, 0);
    for customer in &consenting {
        let partition = herald::query::partition_of(customer.as_bytes(), topology.partitions());
        let path = format!("/v1/customers/{customer}");
        let owner = get(&rt, port_a, &format!("{path}/owner")).expect("A answers");
        assert_eq!(owner.status, 200, "{}", owner.body);
        documented(&doc, "/v1/customers/{customerId}/owner", &owner.body);
        assert_eq!(owner.body["partition"], partition, "{}", owner.body);
        let owned_by = owner.body["owner"]["instance"].as_str().unwrap_or_default();
        assert!(["a", "b"].contains(&owned_by), "{}", owner.body);
        let home = if owned_by == "a" { port_a } else { port_b };
        let away = if owned_by == "a" { port_b } else { port_a };

        // The owner answers from its store.
        let state = get(&rt, home, &path).expect("the owner answers");
        assert_eq!(state.status, 200, "{customer}: {}", state.body);
        documented(&doc, "/v1/customers/{customerId}", &state.body);
        assert_eq!(state.body["customer_id"], customer.as_str());
        assert_eq!(state.body["partition"], partition);
        assert!(
            !state.body["consent"].as_array().unwrap().is_empty(),
            "{customer} granted consent: {}",
            state.body
        );
        let consent = get(&rt, home, &format!("{path}/consent")).unwrap();
        assert_eq!(consent.status, 200);
        documented(&doc, "/v1/customers/{customerId}/consent", &consent.body);
        assert!(
            consent.body["changes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["granted"] == true),
            "{}",
            consent.body
        );
        let messages = get(&rt, home, &format!("{path}/messages")).unwrap();
        assert_eq!(messages.status, 200);
        documented(&doc, "/v1/customers/{customerId}/messages", &messages.body);
        if owned_by == "a" {
            with_provider_ids += messages.body["recent"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| m["provider_message_id"].is_string())
                .count();
        }
        served += 1;

        // The other sends the caller to the owner.
        let elsewhere = get(&rt, away, &path).expect("the other answers");
        assert_eq!(elsewhere.status, 307, "{customer}: {}", elsewhere.body);
        assert_eq!(elsewhere.body["owner"]["instance"], owned_by);
        assert!(
            elsewhere
                .location
                .as_deref()
                .is_some_and(|l| l.ends_with(&path)),
            "{:?}",
            elsewhere.location
        );
        redirected += 1;
    }
    assert!(served > 0 && redirected > 0);
    assert!(
        with_provider_ids > 0,
        "dispatch's record of sent messages shows in A's answers"
    );

    // Nobody stores a customer Herald never heard of: their partition's owner says so.
    let whereabouts = get(&rt, port_a, "/v1/customers/nobody-at-all/owner").unwrap();
    assert_eq!(
        whereabouts.body["partition"],
        herald::query::partition_of(b"nobody-at-all", topology.partitions())
    );
    assert_eq!(whereabouts.body["stored_here"], false);
    let home = match whereabouts.body["owner"]["instance"].as_str() {
        Some("a") => port_a,
        Some("b") => port_b,
        other => panic!("no owner for the partition: {other:?}"),
    };
    let nobody = get(&rt, home, "/v1/customers/nobody-at-all").unwrap();
    assert_eq!(nobody.status, 404, "{}", nobody.body);
    assert_eq!(nobody.body["partition"], whereabouts.body["partition"]);
}

/// `herald demo --keep-running` serves, as `herald run` does, the metrics of its stages and the
/// query API on its store: what an operator tries first, with nothing installed.
#[test]
fn a_running_demo_serves_its_metrics_and_the_query_api() {
    let rt = common::runtime();
    let port = common::free_port();
    let _demo = Killed(
        std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .args([
                "demo",
                "--customers",
                "20",
                "--seed",
                "7",
                "--json",
                "--keep-running",
            ])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("the demo starts"),
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let customer = loop {
        match get(&rt, port, "/v1/customers/cust-000000") {
            Some(a) if a.status == 200 => break a.body,
            other => assert!(
                Instant::now() < deadline,
                "the demo's query API never answered for cust-000000: {:?}",
                other.map(|a| (a.status, a.body))
            ),
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(customer["customer_id"], "cust-000000", "{customer}");
    // Sends follow the decisions: the scrape waits for the first.
    let metrics = loop {
        let body = common::scrape(&rt, port).expect("the demo's /metrics answers");
        if common::metric_sum(&body, "herald_sends_total") > 0.0 {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "the demo's /metrics never counted a send:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    for name in [
        "herald_records_in_total",
        "herald_decisions_total",
        "herald_consumer_lag",
    ] {
        assert!(
            metrics.lines().any(|l| l.starts_with(name)),
            "{name} is not in the demo's /metrics:\n{metrics}"
        );
    }
    assert!(common::metric_sum(&metrics, "herald_decisions_total") > 0.0);
    // Both stages count under one registry, each under its own label.
    for stage in ["processors", "dispatch"] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("herald_records_in_total{")
                    && l.contains(&format!("stage=\"{stage}\""))),
            "no records counted for {stage}:\n{metrics}"
        );
    }
    assert_eq!(
        get(&rt, port, "/v1/customers/nobody-like-this").map(|a| a.status),
        Some(404)
    );
}
