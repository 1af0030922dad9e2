//! `/metrics` of a running `herald run` (processors and dispatch in one process) against a
//! real Apache Kafka broker (`scripts/kafka`), the registry and the provider simulator: the
//! names, types and labels a Prometheus scrape, a dashboard and an alert rule rely on, and
//! counts that agree with what the process was given.

mod common;

use common::Killed;
use herald::scenario::FeedItem;
use herald::topology::Topology;
use rdkafka::producer::FutureRecord;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// One metric family of a text exposition: its type and the label names of its series.
#[derive(Debug, Default)]
struct Family {
    kind: String,
    labels: BTreeSet<String>,
    series: usize,
}

/// The families of a Prometheus text exposition, by name. A histogram's `_bucket`, `_sum` and
/// `_count` series count under the histogram's own name, and `le` is not one of its labels.
fn families(body: &str) -> BTreeMap<String, Family> {
    let mut out: BTreeMap<String, Family> = BTreeMap::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("a TYPE line names a type");
            out.entry(name.to_string()).or_default().kind = kind.to_string();
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let series = line.rsplit_once(' ').expect("a sample has a value").0;
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|s| name.strip_suffix(s))
            .find(|base| out.get(*base).is_some_and(|f| f.kind == "histogram"))
            .unwrap_or(name);
        let f = out.entry(family.to_string()).or_default();
        f.series += 1;
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            let label = pair.split('=').next().unwrap_or_default();
            if label != "le" {
                f.labels.insert(label.to_string());
            }
        }
    }
    out
}

/// The value of the series of `name` whose labels include every pair of `with`, summed.
fn value(body: &str, name: &str, with: &[(&str, &str)]) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            with.iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// The metrics an expression names, with the label names its matchers use.
fn named_metrics(expr: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("herald_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = tail[..end].to_string();
        let mut labels = Vec::new();
        if let Some(matchers) = tail[end..].strip_prefix('{') {
            let close = matchers.find('}').expect("a matcher list is closed");
            for m in matchers[..close]
                .split(',')
                .filter(|m| !m.trim().is_empty())
            {
                let label = m.split(['=', '!', '~']).next().unwrap_or_default().trim();
                labels.push(label.to_string());
            }
        }
        out.push((name, labels));
        rest = &tail[end..];
    }
    out
}

/// Every metric the shipped Grafana dashboard and Prometheus rules name is one a process
/// exposes, with the labels their matchers use (`namespace` is Prometheus's, from the target).
fn shipped_dashboard_and_alerts_name_only_exposed_metrics(
    process: &BTreeMap<String, Family>,
    gateway: &BTreeMap<String, Family>,
) {
    let root = env!("CARGO_MANIFEST_DIR");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/k8s/observability/dashboard.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut exprs: Vec<(String, String)> = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().expect("targets") {
            let title = panel["title"].as_str().unwrap_or_default();
            exprs.push((format!("panel {title}"), t["expr"].as_str().unwrap().into()));
        }
    }
    let rules: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(format!("{root}/k8s/observability/alerts.yaml")).unwrap(),
    )
    .expect("the rules are YAML");
    for group in rules["spec"]["groups"].as_sequence().expect("rule groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("an alert name");
            exprs.push((
                format!("alert {name}"),
                rule["expr"].as_str().unwrap().into(),
            ));
        }
    }
    assert!(exprs.len() >= 20, "{} expressions", exprs.len());
    for (what, expr) in &exprs {
        let named = named_metrics(expr);
        assert!(!named.is_empty(), "{what} names no Herald metric: {expr}");
        for (name, labels) in named {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|base| {
                    process
                        .get(*base)
                        .or(gateway.get(*base))
                        .map(|f| f.kind.as_str())
                        == Some("histogram")
                })
                .unwrap_or(&name);
            let f = process
                .get(family)
                .or(gateway.get(family))
                .unwrap_or_else(|| panic!("{what} names {name}, which no process exposes"));
            for l in labels.iter().filter(|l| *l != "namespace") {
                assert!(f.labels.contains(l), "{what}: {name} has no label {l}");
            }
        }
    }
}

#[test]
fn a_running_process_exposes_typed_labelled_metrics() {
    let rt = common::runtime();
    let topology = Topology::embedded().unwrap();
    let (cluster, codec) = common::demo_cluster(&rt, &topology, common::broker());
    let producer = common::feeder(&cluster);
    let items = common::scenario_events(40, 3);
    let fed = items.len();
    // The provider topic also carries what dispatch writes back; the other inputs only what
    // was fed here.
    let fed_to = |family: herald::events::Family| {
        items
            .iter()
            .filter(|i| matches!(i, FeedItem::Event(e) if e.fact.family() == family))
            .count()
    };
    let fed_orders = fed_to(herald::events::Family::Oms);
    common::feed(&rt, &producer, &codec, &items);
    // Two records no schema reads: dead letters of the processors, on the orders topic.
    let orders = topology
        .names
        .of(herald::topology::TopicRole::Oms)
        .to_string();
    for key in ["poison-1", "poison-2"] {
        rt.block_on(
            producer.send(
                FutureRecord::to(&orders)
                    .partition(0)
                    .key(key)
                    .payload("not avro"),
                Duration::from_secs(10),
            ),
        )
        .expect("the poison records are written");
    }

    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let _herald = Killed(
        common::stage_command(&cluster, "all", "metrics", &dir.path().join("state.redb"))
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .spawn()
            .expect("herald starts"),
    );

    // Everything fed is consumed and committed, something was sent, and the client has
    // reported its lag since.
    let deadline = Instant::now() + Duration::from_secs(120);
    let body = loop {
        let body = common::scrape(&rt, port).unwrap_or_default();
        let consumed = value(&body, "herald_records_in_total", &[("stage", "processors")]);
        let sent = value(&body, "herald_sends_total", &[("outcome", "accepted")]);
        let lag_reported = body
            .lines()
            .any(|l| l.starts_with("herald_consumer_lag{") && l.contains("stage=\"processors\""));
        if consumed as usize >= fed + 2 && sent > 0.0 && lag_reported {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "consumed {consumed} of {} records, {sent} sends, lag reported: {lag_reported}\n{body}",
            fed + 2
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let found = families(&body);
    let gateway_body = rt
        .block_on(async {
            reqwest::get(format!("http://{}/metrics", cluster.gateway.health_addr))
                .await?
                .text()
                .await
        })
        .expect("the gateway's /metrics answers");
    let gateway = families(&gateway_body);
    shipped_dashboard_and_alerts_name_only_exposed_metrics(&found, &gateway);

    let expected: &[(&str, &str, &[&str])] = &[
        ("herald_build_info", "gauge", &["version"]),
        (
            "herald_records_in_total",
            "counter",
            &["stage", "topic", "partition"],
        ),
        ("herald_decisions_total", "counter", &["kind"]),
        ("herald_suppressions_total", "counter", &["reason"]),
        ("herald_dead_letters_total", "counter", &["stage", "topic"]),
        (
            "herald_transactions_total",
            "counter",
            &["stage", "outcome"],
        ),
        ("herald_sends_total", "counter", &["channel", "outcome"]),
        ("herald_batch_duration_seconds", "histogram", &["stage"]),
        (
            "herald_batch_phase_seconds",
            "histogram",
            &["stage", "phase"],
        ),
        (
            "herald_provider_call_duration_seconds",
            "histogram",
            &["channel", "outcome"],
        ),
        ("herald_event_to_decision_seconds", "histogram", &["stage"]),
        (
            "herald_consumer_lag",
            "gauge",
            &["stage", "topic", "partition"],
        ),
        ("herald_dispatch_lane_waiting", "gauge", &["lane"]),
        ("herald_provider_breaker_open", "gauge", &["channel"]),
        ("herald_state_customers_in_memory", "gauge", &[]),
        ("herald_sends_in_flight", "gauge", &[]),
        ("herald_partitions_restored_total", "counter", &["stage"]),
    ];
    for (name, kind, labels) in expected {
        let f = found
            .get(*name)
            .unwrap_or_else(|| panic!("{name} is not exposed:\n{body}"));
        assert_eq!(f.kind, *kind, "the type of {name}");
        let labels: BTreeSet<String> = labels.iter().map(|l| l.to_string()).collect();
        assert_eq!(f.labels, labels, "the labels of {name}");
        assert!(f.series > 0, "{name} has no series");
    }
    // The conventions: counters end in _total, durations are in seconds, nothing in ms.
    for (name, f) in &found {
        if f.kind == "counter" {
            assert!(
                name.ends_with("_total"),
                "counter {name} must end in _total"
            );
        }
        assert!(
            !name.contains("_ms") && !name.contains("millis"),
            "{name} is not in base units"
        );
    }

    // The counts agree with what the process was given.
    assert_eq!(
        value(
            &body,
            "herald_records_in_total",
            &[("stage", "processors"), ("topic", &orders)]
        ) as usize,
        fed_orders + 2,
        "every order record fed, poison included, counted once"
    );
    assert_eq!(
        value(
            &body,
            "herald_dead_letters_total",
            &[("stage", "decode"), ("topic", &orders)]
        ),
        2.0,
        "both poison records dead-lettered as undecodable, from the orders topic"
    );
    let accepted = value(
        &body,
        "herald_decisions_total",
        &[("kind", "EventAccepted")],
    );
    assert!(accepted > 0.0, "no fact accepted");
    assert!(value(&body, "herald_build_info", &[]) == 1.0);
    // Each batch counts its records, then observes their latencies: a scrape between the two
    // sees fewer latencies than records, never more.
    let observed = value(
        &body,
        "herald_event_to_decision_seconds_count",
        &[("stage", "processors")],
    );
    let consumed = value(&body, "herald_records_in_total", &[("stage", "processors")]);
    assert!(
        observed <= consumed && observed >= (fed + 2) as f64,
        "{observed} latencies observed for {consumed} records"
    );
    assert!(
        value(
            &body,
            "herald_transactions_total",
            &[("stage", "dispatch"), ("outcome", "committed")]
        ) > 0.0
    );
}
