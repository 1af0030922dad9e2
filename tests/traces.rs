//! One order's trace, end to end: facts carrying a W3C `traceparent` are fed to a real Apache
//! Kafka broker (`scripts/kafka`); `herald run` and `herald gateway` export their spans over
//! OTLP/HTTP to a collector this test serves; the provider simulator posts its status
//! webhooks to that gateway. The spans must form one trace from the input record through its
//! decision, the dispatch step, the provider call and the status webhook, to the processing of
//! that status; and the records Herald writes carry the trace on in their `traceparent` header.

mod common;

use axum::routing::post;
use common::Killed;
use herald::events::Family;
use herald::scenario::FeedItem;
use herald::topology::{TopicRole, Topology};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One exported span, as the collector received it.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    trace: String,
    id: String,
    parent: String,
    name: String,
    kind: i64,
    links: Vec<String>,
    attributes: BTreeMap<String, String>,
}

const SERVER: i64 = 2;
const CLIENT: i64 = 3;
const PRODUCER: i64 = 4;
const CONSUMER: i64 = 5;

/// The spans of OTLP/JSON export requests.
fn spans_of(request: &Value) -> Vec<Span> {
    let mut out = Vec::new();
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    for rs in request["resourceSpans"].as_array().into_iter().flatten() {
        let service = rs["resource"]["attributes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["key"] == "service.name")
            .map(|a| text(&a["value"]["stringValue"]))
            .unwrap_or_default();
        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
            for s in ss["spans"].as_array().into_iter().flatten() {
                let attributes = s["attributes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| {
                        let v = a["value"]
                            .as_object()
                            .and_then(|o| o.values().next())
                            .map(text)
                            .unwrap_or_default();
                        (text(&a["key"]), v)
                    })
                    .collect();
                out.push(Span {
                    service: service.clone(),
                    trace: text(&s["traceId"]),
                    id: text(&s["spanId"]),
                    parent: s["parentSpanId"].as_str().unwrap_or_default().to_string(),
                    name: text(&s["name"]),
                    kind: s["kind"].as_i64().unwrap_or(-1),
                    links: s["links"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|l| text(&l["spanId"]))
                        .collect(),
                    attributes,
                });
            }
        }
    }
    out
}

/// An OTLP/HTTP collector on a free port: every span it was sent.
fn collector(rt: &tokio::runtime::Runtime) -> (String, Arc<Mutex<Vec<Span>>>) {
    let received: Arc<Mutex<Vec<Span>>> = Arc::default();
    let keep = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: axum::body::Bytes| {
            let keep = keep.clone();
            async move {
                let request: Value = serde_json::from_slice(&body).expect("OTLP/JSON");
                keep.lock().unwrap().extend(spans_of(&request));
                "{}"
            }
        }),
    );
    let addr = rt
        .block_on(herald::telemetry::serve_router(
            "127.0.0.1:0".parse().unwrap(),
            app,
            "collector",
        ))
        .unwrap();
    (format!("http://{addr}"), received)
}

/// The W3C context the test gives the n-th fed fact: trace and span ids of its own.
fn fed_context(n: usize) -> (String, String) {
    (
        format!("{:032x}", 0x7ace_0000_u64 + n as u64),
        format!("{:016x}", 0x5ba0_0000_u64 + n as u64),
    )
}

#[test]
fn one_order_is_one_trace_from_its_input_to_the_status_webhook() {
    let rt = common::runtime();
    let topology = Topology::embedded().unwrap();
    let (cluster, codec) = common::demo_cluster(&rt, &topology, common::broker());
    let (collector_url, received) = collector(&rt);
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector_url.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ];

    // The gateway exports its spans; the simulator posts its webhooks there, and fails no call.
    let (_gateway, webhook_port) = common::start_gateway_with(&rt, &cluster, &otel);
    let (simulator, _log) = rt
        .block_on(herald::provider::serve_simulator_with(
            "127.0.0.1:0".parse().unwrap(),
            herald::provider::SimulatorOptions {
                webhook_url: Some(format!("http://127.0.0.1:{webhook_port}/webhook")),
                undeliverable_rate: 0.0,
                template_paused_rate: 0.0,
                transient_failure_rate: 0.0,
                duplicate_webhook_rate: 0.0,
                ..herald::demo::demo_simulator()
            },
        ))
        .unwrap();

    // Every fact carries a context of its own, in its envelope (as a source system without
    // Kafka headers sets it; the header's precedence is a unit test of `trace`).
    let mut items = common::scenario_events(12, 3);
    let mut fed: BTreeMap<String, (String, Family)> = BTreeMap::new();
    for (n, item) in items.iter_mut().enumerate() {
        if let FeedItem::Event(e) = item {
            let (trace, span) = fed_context(n);
            e.envelope.trace_parent = Some(format!("00-{trace}-{span}-01"));
            fed.insert(trace, (span, e.fact.family()));
        }
    }
    common::feed(&rt, &common::feeder(&cluster), &codec, &items);

    let dir = tempfile::tempdir().unwrap();
    let simulator_url = format!("http://{simulator}");
    let store = dir.path().join("state.redb");
    let mut run = common::stage_command_calling(&cluster, &simulator_url, "all", "traces", &store);
    // The wall clock decides again the messages deferred near the scenario's end.
    run.env("HERALD_WALL_CLOCK_TICK_SECS", "1");
    for (k, v) in otel {
        run.env(k, v);
    }
    let _herald = Killed(run.spawn().expect("herald starts"));

    let inputs: BTreeSet<String> = [TopicRole::Oms, TopicRole::Billing, TopicRole::Crm]
        .iter()
        .map(|r| format!("process {}", topology.names.of(*r)))
        .collect();
    let decisions = format!("process {}", topology.names.decisions());
    let provider_topic = topology.names.of(TopicRole::Provider).to_string();
    let status_send = format!("send {provider_topic}");
    let status_process = format!("process {provider_topic}");

    // The whole path of one fed order: input → decision → dispatch → call → webhook → status.
    let deadline = Instant::now() + Duration::from_secs(150);
    let (spans, path) = loop {
        let spans = received.lock().unwrap().clone();
        let child = |parent: &Span, name: &str, kind: i64, service: &str| {
            spans
                .iter()
                .find(|s| {
                    s.parent == parent.id
                        && s.trace == parent.trace
                        && s.name == name
                        && s.kind == kind
                        && s.service == service
                })
                .cloned()
        };
        let path = spans
            .iter()
            .filter(|s| inputs.contains(&s.name) && s.kind == CONSUMER && s.service == "herald")
            .filter(|s| {
                fed.get(&s.trace)
                    .is_some_and(|(span, family)| s.parent == *span && *family == Family::Oms)
            })
            .find_map(|input| {
                let dispatch = child(input, &decisions, CONSUMER, "herald")?;
                let call = child(&dispatch, "POST", CLIENT, "herald")?;
                let status = child(&call, &status_send, PRODUCER, "herald-gateway")?;
                let processed = child(&status, &status_process, CONSUMER, "herald")?;
                Some(vec![input.clone(), dispatch, call, status, processed])
            });
        if let Some(path) = path {
            break (spans, path);
        }
        assert!(
            Instant::now() < deadline,
            "no order's trace reached its status webhook; {} spans received: {:#?}",
            spans.len(),
            spans
                .iter()
                .map(|s| (&s.service, &s.name, s.kind))
                .collect::<BTreeSet<_>>()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let [input, dispatch, call, status, _processed] = &path[..] else {
        unreachable!()
    };
    let trace = &input.trace;

    // The messaging conventions' attributes, on the record spans.
    for (span, topic) in [
        (input, input.name.trim_start_matches("process ").to_string()),
        (dispatch, topology.names.decisions().to_string()),
    ] {
        assert_eq!(
            span.attributes.get("messaging.system").map(String::as_str),
            Some("kafka")
        );
        assert_eq!(
            span.attributes
                .get("messaging.operation.type")
                .map(String::as_str),
            Some("process")
        );
        assert_eq!(
            span.attributes.get("messaging.destination.name"),
            Some(&topic)
        );
        assert!(
            span.attributes.contains_key("messaging.kafka.offset"),
            "{span:?}"
        );
    }
    assert_eq!(
        call.attributes
            .get("http.request.method")
            .map(String::as_str),
        Some("POST")
    );
    assert_eq!(
        call.attributes.get("herald.channel").map(String::as_str),
        Some("WHATSAPP")
    );
    // The status is written under the webhook request that brought it, which it links to.
    let request = spans
        .iter()
        .find(|s| status.links.contains(&s.id) && s.kind == SERVER)
        .unwrap_or_else(|| panic!("the status span links to no webhook request: {status:?}"));
    assert_eq!(request.name, "POST /webhook");
    assert_eq!(request.service, "herald-gateway");
    assert_eq!(
        request
            .attributes
            .get("http.response.status_code")
            .map(String::as_str),
        Some("200")
    );
    // The batch a record ran in is a link of the record's span, not its parent.
    let batch = spans
        .iter()
        .find(|s| input.links.contains(&s.id) && s.name == "process")
        .unwrap_or_else(|| panic!("the input's span links to no batch span: {input:?}"));
    assert_eq!(
        batch
            .attributes
            .get("messaging.consumer.group.name")
            .map(String::as_str),
        Some("herald-processors")
    );

    // A message deferred (quiet hours, a blackout...) is decided again, when a timer fires or
    // a later record moves time on, in the trace of the fact that asked for it.
    // Every decision also names what it was decided on: its input record, or a timer.
    let unsourced = std::cell::RefCell::new(BTreeSet::new());
    let read_deferrals = || {
        let mut deferred: BTreeMap<String, String> = BTreeMap::new();
        let mut decided: BTreeMap<String, String> = BTreeMap::new();
        herald::demo::read_topic(
            &cluster.bootstrap,
            topology.names.decisions(),
            topology.partitions(),
            |m| {
                use rdkafka::message::{Headers, Message};
                let d = rt.block_on(codec.decode_decision(m.payload()))?;
                let by_timer = m
                    .headers()
                    .is_some_and(|h| h.iter().any(|x| x.key == "herald.timer"));
                if !by_timer && herald::stages::source_position(m).is_none() {
                    unsourced.borrow_mut().insert(d.decision_id.clone());
                }
                let trace = herald::trace::header_of(m).unwrap_or_default();
                match d.outcome {
                    herald::events::Outcome::MessageDeferred(x) => {
                        deferred.entry(x.planned.message_id).or_insert(trace);
                    }
                    herald::events::Outcome::MessageApproved(x) => {
                        decided.insert(x.message_id.clone(), trace);
                    }
                    herald::events::Outcome::MessageSuppressed(x) => {
                        if let Some(id) = x.message_id {
                            decided.insert(id, trace);
                        }
                    }
                    _ => {}
                }
                Ok(())
            },
        )
        .unwrap();
        let released: Vec<(String, String, String)> = deferred
            .iter()
            .filter_map(|(m, t)| decided.get(m).map(|a| (m.clone(), t.clone(), a.clone())))
            .collect();
        (deferred, released)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let released = loop {
        let (deferred, released) = read_deferrals();
        let unsourced = unsourced.borrow();
        assert!(
            unsourced.is_empty(),
            "{} decisions name neither their input record nor a timer, e.g. {:?}",
            unsourced.len(),
            unsourced.iter().take(3).collect::<Vec<_>>()
        );
        if !released.is_empty() {
            break released;
        }
        assert!(
            Instant::now() < deadline,
            "no deferred message was decided again: {deferred:?} deferred"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    for (message, at_deferral, again) in released {
        assert!(
            !at_deferral.is_empty(),
            "the deferral of {message} carries no trace"
        );
        assert_eq!(
            at_deferral.split('-').nth(1),
            again.split('-').nth(1),
            "{message} was decided again outside the trace it was deferred in"
        );
    }

    // The records Herald wrote carry the trace on: the decision log and the dispatch log.
    for topic in [topology.names.decisions(), topology.names.dispatch()] {
        let mut carried = 0;
        herald::demo::read_topic(&cluster.bootstrap, topic, topology.partitions(), |m| {
            if herald::trace::header_of(m).is_some_and(|t| t.contains(trace.as_str())) {
                carried += 1;
            }
            Ok(())
        })
        .unwrap();
        assert!(carried > 0, "no record of {topic} carries trace {trace}");
    }
}
