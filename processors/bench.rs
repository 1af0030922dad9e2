//! `herald bench`: throughput of the core alone, end to end through the mock cluster (or real
//! brokers) with
//! transactions and Avro both ways, the same loop with no processing (the ceiling), and the
//! webhook gateway.

use crate::demo;
use crate::kafka::{self, KafkaSettings};
use crate::registry::Codec;
use crate::scenario::{self, FeedItem};
use crate::stages::{PassthroughStage, ProcessorStage};
use crate::store::EmbeddedStore;
use crate::telemetry::Metrics;
use crate::topology::Topology;
use anyhow::{anyhow, Result};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The bench's one JSON line.
#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub events: usize,
    pub core_events_per_s: f64,
    pub e2e_events_per_s: f64,
    pub passthrough_events_per_s: f64,
    /// Decisions per second decoded from Avro and folded into state, as a restore or
    /// `herald rebuild` does, one thread.
    pub rebuild_events_per_s: f64,
    /// Mean size of the stored state (the JSON the state store keeps) of a customer who got at
    /// least one message in the scenario.
    pub bytes_per_customer: f64,
    /// Signed status webhooks per second the gateway verified, normalised and answered 200
    /// after Kafka acknowledged their events (32 in flight at a time).
    pub gateway_webhooks_per_s: f64,
}

/// The figures mean something only when the stages read this run's events alone.
fn refuse_used_topics(settings: &KafkaSettings, topology: &Topology) -> Result<()> {
    let reader = kafka::LogReader::new(settings)?;
    let names = &topology.names;
    for topic in names.inputs().into_iter().chain([
        names.decisions().to_string(),
        names.passthrough().to_string(),
    ]) {
        for p in 0..topology.partitions() {
            if reader.end(&topic, p)? > 0 {
                return Err(anyhow!(
                    "herald bench --bootstrap needs a cluster whose Herald topics are empty, and {topic} holds records: start a fresh one (scripts/kafka start --dir DIR)"
                ));
            }
        }
    }
    Ok(())
}

/// Runs all three measurements on a scenario of `customers` customers, through the in-process
/// mock cluster or, when given, real brokers whose Herald topics are still empty.
pub fn run(customers: usize, brokers: Option<&KafkaSettings>) -> Result<BenchResult> {
    let topology = Arc::new(Topology::embedded()?);
    let scenario = scenario::generate(customers, 7);
    let events: Vec<_> = scenario
        .items
        .iter()
        .filter_map(|i| match i {
            FeedItem::Event(e) => Some(e.clone()),
            _ => None,
        })
        .collect();

    // Core: the pipeline on decoded events, one thread, timers fired as stream time passes them.
    let mut tables = crate::tables::Tables::default();
    for level in scenario::stock_levels() {
        tables.observe_stock(level);
    }
    let t = Instant::now();
    let mut task = crate::task::Task::default();
    let mut log = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let input_ref = i.to_string();
        tables.observe(&e.fact, e.envelope.occurred_at);
        log.extend(task.decide(e, &input_ref, &topology, &tables));
    }
    let core = events.len() as f64 / t.elapsed().as_secs_f64();
    tracing::debug!(decisions = log.len(), "core pass done");
    let (rebuild, bytes_per_customer) = rebuild_pass(&log, task.customers())?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let cluster = demo::start_cluster_on(&rt, &topology, demo::demo_simulator(), brokers)?;
    let codec = Arc::new(Codec::new(&cluster.registry_url, &topology.names)?);
    rt.block_on(codec.register_all())?;
    let settings = cluster.settings(true, "bench");
    if brokers.is_some() {
        refuse_used_topics(&settings, &topology)?;
    }
    let producer = settings.producer(None)?;
    let items: Vec<FeedItem> = events.into_iter().map(FeedItem::Event).collect();
    // A real broker deletes records dated beyond retention: those carry their produce time.
    let stamp = match brokers {
        Some(_) => demo::FeedStamp::ProduceTime,
        None => demo::FeedStamp::OccurredAt,
    };
    demo::feed(&rt, &producer, &codec, &items, stamp, |_| {})?;
    let n = items.len() as u64;

    let dir = std::env::temp_dir().join(format!("herald-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store: kafka::SharedStore = Arc::new(EmbeddedStore::open(&dir.join("state.redb"))?);

    let timed = |run: &(dyn Fn(&AtomicBool, &Metrics) -> Result<()> + Sync)| -> Result<f64> {
        let stop = AtomicBool::new(false);
        let m = Metrics::default();
        std::thread::scope(|s| -> Result<f64> {
            let h = s.spawn(|| run(&stop, &m));
            // Steady state: from the first committed batch, after the group join and restore.
            let mut first: Option<(Instant, u64)> = None;
            while m.records_in.load(Ordering::Relaxed) < n {
                if h.is_finished() {
                    break;
                }
                let seen = m.records_in.load(Ordering::Relaxed);
                if first.is_none() && seen > 0 {
                    first = Some((Instant::now(), seen));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            let (t0, n0) = first.unwrap_or((Instant::now(), 0));
            let secs = t0.elapsed().as_secs_f64().max(1e-6);
            stop.store(true, Ordering::SeqCst);
            h.join().map_err(|_| anyhow!("bench stage panicked"))??;
            if m.records_in.load(Ordering::Relaxed) < n {
                return Err(anyhow!("bench stage stopped before consuming every event"));
            }
            Ok((n - n0) as f64 / secs)
        })
    };
    let h = rt.handle().clone();
    let e2e = timed(&|stop, m| {
        let mut stage = ProcessorStage::new(
            topology.clone(),
            codec.clone(),
            store.clone(),
            h.clone(),
            Arc::new(Metrics::default()),
            crate::identity::IdentifierKey::demo(),
        )
        .with_checkpoint_interval(Duration::from_millis(kafka::CHECKPOINT_MS));
        kafka::run_stage(&settings, &mut stage, stop, m, &h)
    })?;
    let passthrough = timed(&|stop, m| {
        let mut stage = PassthroughStage::new(topology.names.clone());
        kafka::run_stage(&settings, &mut stage, stop, m, &h)
    })?;
    let gateway = gateway_pass(&rt, &cluster, 5_000)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(BenchResult {
        events: items.len(),
        core_events_per_s: core.round(),
        rebuild_events_per_s: rebuild.round(),
        bytes_per_customer: bytes_per_customer.round(),
        e2e_events_per_s: e2e.round(),
        passthrough_events_per_s: passthrough.round(),
        gateway_webhooks_per_s: gateway.round(),
    })
}

/// Posts `n` distinct signed status webhooks to the cluster's gateway, 32 at a time; every one
/// must be answered 200 (its event acknowledged by Kafka). Returns webhooks per second.
fn gateway_pass(rt: &tokio::runtime::Runtime, cluster: &demo::Cluster, n: usize) -> Result<f64> {
    let secret = demo::DEMO_APP_SECRET.as_bytes();
    let bodies: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            let body = crate::provider::whatsapp::status_webhook(
                &format!("wamid.BENCH{i:08}"),
                ["sent", "delivered", "read"][i % 3],
                None,
                "34000000001",
                &crate::provider::callback::callback_data(
                    &format!("cust-{:06}", i % 1000),
                    &format!("bench-{i}"),
                ),
            );
            (crate::provider::whatsapp::sign(secret, &body), body)
        })
        .collect();
    let http = reqwest::Client::new();
    let url = cluster.gateway_url.clone();
    let t = Instant::now();
    let refused = rt.block_on(async {
        use futures::StreamExt;
        futures::stream::iter(bodies)
            .map(|(signature, body)| {
                let (http, url) = (http.clone(), url.clone());
                async move {
                    http.post(url)
                        .header(crate::provider::whatsapp::SIGNATURE_HEADER, signature)
                        .body(body)
                        .send()
                        .await
                        .map(|r| r.status().is_success())
                        .unwrap_or(false)
                }
            })
            .buffer_unordered(32)
            .filter(|ok| std::future::ready(!ok))
            .count()
            .await
    });
    let secs = t.elapsed().as_secs_f64();
    if refused > 0 {
        return Err(anyhow!(
            "the gateway refused {refused} of {n} genuine webhooks"
        ));
    }
    Ok(n as f64 / secs.max(1e-6))
}

/// Decode-and-fold rate of a decision log, and the stored size of an active customer's state.
fn rebuild_pass(
    log: &[crate::events::Decision],
    live: &std::collections::HashMap<String, crate::state::CustomerState>,
) -> Result<(f64, f64)> {
    use crate::datum::{framed, Datums, DecisionIn};
    use crate::topology::TopicRole::Decisions;
    let mut encoded = Vec::with_capacity(log.len());
    for d in log {
        encoded.push(Datums::get().write(Decisions, 1, &crate::datum::DecisionOut(d))?);
    }
    let t = Instant::now();
    let mut states: std::collections::HashMap<String, crate::state::CustomerState> =
        std::collections::HashMap::new();
    for bytes in &encoded {
        let (_, datum) = framed(bytes).ok_or_else(|| anyhow!("unframed decision"))?;
        let d: crate::events::Decision = Datums::get().read::<DecisionIn>(Decisions, datum)?.into();
        crate::state::evolve(states.entry(d.customer_id.clone()).or_default(), &d);
    }
    let rate = log.len() as f64 / t.elapsed().as_secs_f64();
    if states.len() != live.len() || states.iter().any(|(c, s)| live.get(c) != Some(s)) {
        return Err(anyhow!("the folded log does not rebuild the live states"));
    }
    let active: Vec<usize> = live
        .values()
        .filter(|s| !s.approved.is_empty())
        .map(|s| serde_json::to_vec(s).map(|b| b.len()).unwrap_or(0))
        .collect();
    let mean = active.iter().sum::<usize>() as f64 / active.len().max(1) as f64;
    Ok((rate, mean))
}
