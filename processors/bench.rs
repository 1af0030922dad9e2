//! `herald bench`: throughput of the core alone, end to end through the mock cluster (or real
//! brokers) with
//! transactions and Avro both ways, the same loop with no processing (the ceiling), and the
//! webhook gateway.

use crate::demo;
use crate::kafka::{self, KafkaSettings};
use crate::registry::Codec;
use crate::scenario::{self, FeedItem};
use crate::stages::{PassthroughStage, ProcessorStage};
use crate::store::{state_encoding, EmbeddedStore};
use crate::telemetry::Metrics;
use crate::topology::Topology;
use anyhow::{anyhow, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The bench's one JSON line.
#[derive(Debug, Serialize)]
pub struct BenchResult {
    #[serde(flatten)]
    pub core: CoreFigures,
    pub e2e_events_per_s: f64,
    pub passthrough_events_per_s: f64,
    /// The mean milliseconds per batch of the end-to-end pass in each phase of its
    /// transactions: prepare, handle, deliver, commit (see `herald_batch_phase_seconds`).
    pub e2e_batch_ms: BTreeMap<String, f64>,
    /// The same for the pass-through.
    pub passthrough_batch_ms: BTreeMap<String, f64>,
    /// Signed status webhooks per second the gateway verified, normalised and answered 200
    /// after Kafka acknowledged their events (32 in flight at a time).
    pub gateway_webhooks_per_s: f64,
    /// Events fed at half the measured end-to-end rate, one by one as a source would, to time
    /// each one's first decision as a read_committed reader of the decision log sees it.
    pub latency_events: usize,
    pub latency_rate_per_s: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
    /// The processors' rate with 1, 2, 4... instances in one group (`--instances`), each
    /// on a fresh copy of the topics; instances beyond the partition count idle.
    pub scale_out_events_per_s: std::collections::BTreeMap<usize, f64>,
    /// The processors with a bounded state cache (`--memory-customers`, `--memory-cache`): as
    /// many customers as the cache holds, then many more through the same cache.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub memory: Vec<MemoryRun>,
}

/// What the core measures on one thread, with no Kafka: `herald bench --core-only`.
#[derive(Debug, Serialize)]
pub struct CoreFigures {
    pub events: usize,
    pub core_events_per_s: f64,
    /// Decisions per second decoded from Avro and folded into state, as a restore or
    /// `herald rebuild` does, one thread.
    pub rebuild_events_per_s: f64,
    /// Mean size of the stored state (what the state store keeps, compressed) of a customer
    /// who got at least one message in the scenario.
    pub bytes_per_customer: f64,
}

/// One run of the memory pass.
#[derive(Debug, Serialize)]
pub struct MemoryRun {
    pub customers: usize,
    /// `--state-cache-customers` of the run.
    pub cache: usize,
    pub events: usize,
    pub events_per_s: f64,
    /// The most customers' states in memory at any checkpoint.
    pub most_in_memory: u64,
    /// States loaded from the store and let go from memory.
    pub loaded: u64,
    pub evicted: u64,
    /// How much the bench process's resident memory grew while the processors ran, in MB. On
    /// the mock cluster this includes the records the cluster keeps in the same process.
    pub rss_growth_mb: f64,
}

/// The sizes of the memory pass: customers, and the state cache they go through.
#[derive(Debug, Clone, Copy)]
pub struct MemoryPlan {
    pub customers: usize,
    pub cache: usize,
}

/// The figures mean something only when the stages read this run's events alone.
fn refuse_used_topics(
    settings: &KafkaSettings,
    topology: &Topology,
    with_passthrough: bool,
) -> Result<()> {
    let reader = kafka::LogReader::new(settings)?;
    let names = &topology.names;
    let passthrough = with_passthrough.then(|| names.passthrough().to_string());
    for topic in names
        .inputs()
        .into_iter()
        .chain([names.decisions().to_string()])
        .chain(passthrough)
    {
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
pub fn run(
    customers: usize,
    brokers: Option<&KafkaSettings>,
    instances: &[usize],
    memory: Option<MemoryPlan>,
    latency_rate: Option<f64>,
) -> Result<BenchResult> {
    let topology = Arc::new(Topology::embedded()?);
    let (core, events) = core_pass(customers, &topology)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let cluster = demo::start_cluster_on(&rt, &topology, demo::demo_simulator(), brokers)?;
    let codec = Arc::new(Codec::new(&cluster.registry_url, &topology.names)?);
    rt.block_on(codec.register_all())?;
    let settings = cluster.settings(true, "bench");
    if brokers.is_some() {
        refuse_used_topics(&settings, &topology, true)?;
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

    // Each pass's rate, and the mean milliseconds per batch of `stage` in each phase of its
    // transactions (`herald_batch_phase_seconds`): what bounds the rate.
    let timed = |stage: &str, run: &(dyn Fn(&AtomicBool, &Metrics) -> Result<()> + Sync)| {
        timed_with_metrics(n, run).map(|(rate, m)| (rate, m.batch_phase_means_ms(stage)))
    };
    let h = rt.handle().clone();
    let (e2e, e2e_batch_ms) = timed("processors", &|stop, m| {
        let mut stage = processors(&topology, &codec, &store, &h)?;
        kafka::run_stage(&settings, &mut stage, stop, m, &h)
    })?;
    let latency = {
        let stop = AtomicBool::new(false);
        let m = Metrics::new()?;
        std::thread::scope(|s| -> Result<Latency> {
            let stage = s.spawn(|| {
                let mut stage = processors(&topology, &codec, &store, &h)?;
                kafka::run_stage(&settings, &mut stage, &stop, &m, &h)
            });
            let measured = latency_pass(
                &rt,
                &settings,
                &codec,
                &topology,
                customers,
                latency_rate.unwrap_or(e2e / 2.0),
            );
            stop.store(true, Ordering::SeqCst);
            stage
                .join()
                .map_err(|_| anyhow!("bench stage panicked"))??;
            measured
        })?
    };
    let (passthrough, passthrough_batch_ms) = timed("passthrough", &|stop, m| {
        let mut stage = PassthroughStage::new(topology.names.clone());
        kafka::run_stage(&settings, &mut stage, stop, m, &h)
    })?;
    let gateway = gateway_pass(&rt, &cluster, 5_000)?;
    let mut scale_out = std::collections::BTreeMap::new();
    for &n in instances.iter().filter(|n| **n > 0) {
        let rate = scale_pass(&rt, &cluster, &topology, &items, stamp, n)?;
        scale_out.insert(n, rate.round());
    }
    let mut memory_runs = Vec::new();
    if let Some(plan) = memory {
        // As many customers as the cache holds, then the plan's many more: the ratio of the two
        // rates is what a cache miss costs.
        for customers in [plan.cache, plan.customers] {
            memory_runs.push(memory_pass(
                &rt, &cluster, &topology, customers, plan.cache, stamp,
            )?);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(BenchResult {
        core,
        e2e_events_per_s: e2e.round(),
        passthrough_events_per_s: passthrough.round(),
        e2e_batch_ms,
        passthrough_batch_ms,
        gateway_webhooks_per_s: gateway.round(),
        latency_events: latency.events,
        latency_rate_per_s: latency.rate.round(),
        latency_p50_ms: latency.p50_ms,
        latency_p99_ms: latency.p99_ms,
        latency_max_ms: latency.max_ms,
        scale_out_events_per_s: scale_out,
        memory: memory_runs,
    })
}

/// The size of the state dictionary: larger ones compressed scenario states no better.
const DICTIONARY_BYTES: usize = 16 * 1024;

/// The scenario's events of `customers` customers; the bench measures seed 7.
fn scenario_events(customers: usize, seed: u64) -> Vec<crate::events::InputEvent> {
    scenario::generate(customers, seed)
        .items
        .into_iter()
        .filter_map(|i| match i {
            FeedItem::Event(e) => Some(e),
            _ => None,
        })
        .collect()
}

/// How many inputs the core pass decides before it encodes and lets go of their decisions,
/// as the processors stage does with a transaction's batch.
const CORE_BATCH: usize = 1_000;

/// The pipeline on decoded events, one thread, timers fired as stream time passes them: the
/// task it leaves, its decision log as the decisions topic holds it (Avro), and its rate.
/// Only deciding is timed. Each batch's decisions are encoded and dropped after it, as in the
/// stage: a pass that kept every decision alive measured the kernel zeroing fresh pages for
/// them (30 % of a profile's samples) more than the rules.
fn decide_all(
    events: &[crate::events::InputEvent],
    topology: &Topology,
) -> Result<(crate::task::Task, Vec<Vec<u8>>, f64)> {
    use crate::datum::{Datums, DecisionOut};
    use crate::topology::TopicRole::Decisions;
    let mut tables = crate::tables::Tables::default();
    for level in scenario::stock_levels() {
        tables.observe_stock(level);
    }
    let mut deciding = std::time::Duration::ZERO;
    let mut task = crate::task::Task::default();
    let mut log = Vec::new();
    let mut batch = Vec::new();
    for (b, inputs) in events.chunks(CORE_BATCH).enumerate() {
        let t = Instant::now();
        for (i, e) in inputs.iter().enumerate() {
            let input_ref = (b * CORE_BATCH + i).to_string();
            tables.observe(&e.fact, e.envelope.occurred_at);
            batch.extend(task.decide(e, &input_ref, topology, &tables));
        }
        deciding += t.elapsed();
        for d in batch.drain(..) {
            log.push(Datums::get().write(Decisions, 1, &DecisionOut(&d))?);
        }
    }
    let rate = events.len() as f64 / deciding.as_secs_f64().max(1e-9);
    Ok((task, log, rate))
}

/// The core on the scenario, then the rebuild of its decision log. Returns the figures and the
/// scenario's events.
pub fn core_pass(
    customers: usize,
    topology: &Topology,
) -> Result<(CoreFigures, Vec<crate::events::InputEvent>)> {
    let events = scenario_events(customers, 7);
    let (task, log, core) = decide_all(&events, topology)?;
    tracing::debug!(decisions = log.len(), "core pass done");
    let (rebuild, bytes_per_customer) = rebuild_pass(&log, task.customers())?;
    Ok((
        CoreFigures {
            events: events.len(),
            core_events_per_s: core.round(),
            rebuild_events_per_s: rebuild.round(),
            bytes_per_customer: bytes_per_customer.round(),
        },
        events,
    ))
}

/// Trains a state dictionary on the states of a scenario other than the one the bench measures
/// (seed 8, not 7), so `bytes_per_customer` is not measured on what the dictionary learned.
pub fn train_state_dictionary(customers: usize, topology: &Topology) -> Result<Vec<u8>> {
    let (task, _, _) = decide_all(&scenario_events(customers, 8), topology)?;
    let states: Vec<_> = task
        .customers()
        .values()
        .map(|s| s.as_ref().clone())
        .collect();
    state_encoding::train_dictionary(&states, DICTIONARY_BYTES)
}

/// The event the latency pass sends first, untimed, to know the processors decide.
const WARM_UP: &str = "lat-warm-up";

/// What the latency pass measured.
struct Latency {
    events: usize,
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

/// Feeds new customers' events at `rate` per second, each produced on its own as a source
/// would, while a read_committed reader follows the decision log; times each event from its
/// send to its first decision the reader sees. The processors stage must be running.
fn latency_pass(
    rt: &tokio::runtime::Runtime,
    settings: &KafkaSettings,
    codec: &Codec,
    topology: &Topology,
    customers: usize,
    rate: f64,
) -> Result<Latency> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    use rdkafka::producer::FutureRecord;
    use std::collections::HashMap;
    use std::sync::Mutex;

    let rate = rate.max(100.0);
    // Eight seconds' worth of a second scenario, under customer and event ids of its own.
    let wanted = (rate * 8.0) as usize;
    let events: Vec<_> = scenario::generate(customers, 8)
        .items
        .into_iter()
        .filter_map(|i| match i {
            FeedItem::Event(mut e) => {
                e.envelope.customer_id = format!("lat-{}", e.envelope.customer_id);
                e.envelope.event_id = format!("lat-{}", e.envelope.event_id);
                Some(e)
            }
            _ => None,
        })
        .take(wanted)
        .collect();
    let decisions = topology.names.decisions().to_string();
    // The reader starts at the log's end: only decisions of this pass count.
    let ends = kafka::LogReader::new(settings)?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..topology.partitions() {
        tpl.add_partition_offset(
            &decisions,
            p,
            rdkafka::Offset::Offset(ends.end(&decisions, p)?),
        )?;
    }
    let reader: BaseConsumer = settings
        .consumer_config(
            "bench-latency",
            "bench-latency",
            &[("fetch.wait.max.ms", "5")],
        )
        .create()?;
    reader.assign(&tpl)?;
    // A source may deliver a fact twice: only its first send is timed.
    let distinct = events
        .iter()
        .map(|e| e.envelope.event_id.as_str())
        .collect::<std::collections::HashSet<_>>()
        .len();
    let mut timed_ids = std::collections::HashSet::with_capacity(distinct);
    let sent: Mutex<HashMap<String, Instant>> = Mutex::new(HashMap::with_capacity(distinct));
    let producer = settings.producer(None)?;
    let mut latencies = std::thread::scope(|s| -> Result<Vec<f64>> {
        let follower = s.spawn(|| -> Result<Vec<f64>> {
            let mut out = Vec::with_capacity(distinct);
            let deadline = Instant::now() + Duration::from_secs(120);
            while out.len() < distinct && Instant::now() < deadline {
                let Some(m) = reader.poll(Duration::from_millis(5)) else {
                    continue;
                };
                let m = m?;
                let seen = Instant::now();
                let d = rt
                    .block_on(codec.decode_decision(m.payload()))
                    .map_err(|e| anyhow!("decision log: {e}"))?;
                let started = sent
                    .lock()
                    .map_err(|_| anyhow!("latency map poisoned"))?
                    .remove(&d.input_event_id);
                match started {
                    Some(started) if d.input_event_id != WARM_UP => {
                        out.push((seen - started).as_secs_f64() * 1000.0)
                    }
                    _ => {}
                }
            }
            Ok(out)
        });
        // Timing starts once the stage has joined its group and decides: one event first.
        let send = |e: &crate::events::InputEvent| -> Result<()> {
            let bytes = rt.block_on(codec.encode_input(e))?;
            let topic = codec.topics().of_family(e.fact.family()).clone();
            let record = FutureRecord::to(&topic)
                .key(e.envelope.customer_id.as_bytes())
                .payload(&bytes);
            // Fire and forget: the producer's own batching is part of what a source sees.
            producer
                .send_result(record)
                .map(|_| ())
                .map_err(|(err, _)| anyhow!("feeding {topic}: {err}"))
        };
        let mut warm_up = events
            .first()
            .cloned()
            .ok_or_else(|| anyhow!("no events to time"))?;
        warm_up.envelope.event_id = WARM_UP.into();
        warm_up.envelope.customer_id = WARM_UP.into();
        sent.lock()
            .map_err(|_| anyhow!("latency map poisoned"))?
            .insert(WARM_UP.into(), Instant::now());
        send(&warm_up)?;
        let ready_by = Instant::now() + Duration::from_secs(60);
        while sent
            .lock()
            .map_err(|_| anyhow!("latency map poisoned"))?
            .contains_key(WARM_UP)
        {
            if Instant::now() > ready_by {
                return Err(anyhow!("the processors decided nothing within a minute"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let t0 = Instant::now();
        for (i, e) in events.iter().enumerate() {
            let due = t0 + Duration::from_secs_f64(i as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if timed_ids.insert(e.envelope.event_id.as_str()) {
                sent.lock()
                    .map_err(|_| anyhow!("latency map poisoned"))?
                    .insert(e.envelope.event_id.clone(), Instant::now());
            }
            send(e)?;
        }
        follower
            .join()
            .map_err(|_| anyhow!("latency reader panicked"))?
    })?;
    if latencies.len() < distinct {
        return Err(anyhow!(
            "only {} of {distinct} latency events were decided within two minutes",
            latencies.len(),
        ));
    }
    latencies.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| {
        let i = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1;
        (latencies[i] * 10.0).round() / 10.0
    };
    Ok(Latency {
        events: distinct,
        rate,
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        max_ms: at(1.0),
    })
}

/// The processors stage as `herald run` sets it up, with the demo's identifier key.
fn processors(
    topology: &Arc<Topology>,
    codec: &Arc<Codec>,
    store: &kafka::SharedStore,
    rt: &tokio::runtime::Handle,
) -> Result<ProcessorStage> {
    Ok(processors_counted(
        topology,
        codec,
        store,
        rt,
        Arc::new(Metrics::new()?),
    ))
}

/// The processors stage, counting into `metrics`.
fn processors_counted(
    topology: &Arc<Topology>,
    codec: &Arc<Codec>,
    store: &kafka::SharedStore,
    rt: &tokio::runtime::Handle,
    metrics: Arc<Metrics>,
) -> ProcessorStage {
    ProcessorStage::new(
        topology.clone(),
        codec.clone(),
        store.clone(),
        rt.clone(),
        metrics,
        crate::identity::IdentifierKey::demo(),
    )
    .with_checkpoint_interval(Duration::from_millis(kafka::CHECKPOINT_MS))
    .with_state_cache(Some(kafka::STATE_CACHE_CUSTOMERS))
}

/// The resident memory of this process, in bytes (Linux; 0 elsewhere).
fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// A customer of the memory pass: a profile and a transactional consent on day one, and an
/// order on day two, after every other customer's first day. With more customers than the
/// cache holds, each order finds its customer out of memory and loads them from the store,
/// as a customer coming back days later does.
fn memory_events(customer: usize, customers: usize, day: usize) -> Vec<FeedItem> {
    use crate::events::*;
    const DAY: Millis = 86_400_000;
    // 2026-03-01T00:00:00Z.
    const START: Millis = 1_772_323_200_000;
    let id = format!("mem-{customer:07}");
    let at = START + day as i64 * DAY + (customer as i64 * DAY) / customers.max(1) as i64;
    let event = |n: &str, at: Millis, source: &str, fact: Fact| {
        FeedItem::Event(InputEvent::new(source, &id, &format!("{id}-{n}"), at, fact))
    };
    if day == 0 {
        vec![
            event(
                "p",
                at,
                "crm",
                Fact::ProfileChanged(ProfileChanged {
                    first_name: Some("Ana".into()),
                    locale: Some("es_ES".into()),
                    time_zone: Some("Europe/Madrid".into()),
                    phone_e164: Some(format!("+34{:09}", 600_000_000 + customer)),
                    email: None,
                }),
            ),
            event(
                "c",
                at + 1,
                "crm",
                Fact::ConsentGranted(ConsentChange {
                    purpose: Purpose::Transactional,
                    channel: Channel::Whatsapp,
                    source: "checkout".into(),
                    artifact_id: format!("form-{id}"),
                }),
            ),
        ]
    } else {
        vec![event(
            "o",
            at,
            "oms",
            Fact::OrderPlaced(OrderPlaced {
                order_id: format!("{id}-ord"),
                items: Vec::new(),
                total: None,
            }),
        )]
    }
}

/// The processors on `customers` customers with a state cache of `cache`, on a copy of the
/// topics of their own: the rate, the most states in memory, loads, evictions and memory
/// growth.
fn memory_pass(
    rt: &tokio::runtime::Runtime,
    cluster: &demo::Cluster,
    topology: &Topology,
    customers: usize,
    cache: usize,
    stamp: demo::FeedStamp,
) -> Result<MemoryRun> {
    let prefix = format!("bench-memory{customers}.");
    let (topology, codec) = prefixed_topics(rt, cluster, topology, &prefix)?;
    let mut settings = cluster.settings(true, "bench-memory");
    settings.group_prefix = format!("bench-memory{customers}");
    let producer = settings.producer(None)?;
    // Fed in slices, so a million customers' events are never all in memory at once.
    let mut events = 0;
    for day in 0..2 {
        for from in (0..customers).step_by(20_000) {
            let slice: Vec<FeedItem> = (from..(from + 20_000).min(customers))
                .flat_map(|c| memory_events(c, customers, day))
                .collect();
            events += demo::feed(rt, &producer, &codec, &slice, stamp, |_| {})?;
        }
    }
    let dir = std::env::temp_dir().join(format!(
        "herald-bench-memory{customers}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let store: kafka::SharedStore = Arc::new(EmbeddedStore::open(&dir.join("state.redb"))?);
    let h = rt.handle().clone();
    let counted = Arc::new(Metrics::new()?);
    let most = std::sync::atomic::AtomicU64::new(0);
    let peak_rss = std::sync::atomic::AtomicU64::new(0);
    let sampling = AtomicBool::new(true);
    let before = resident_bytes();
    let rate = std::thread::scope(|s| {
        s.spawn(|| {
            while sampling.load(Ordering::SeqCst) {
                most.fetch_max(counted.customers_in_memory(), Ordering::Relaxed);
                peak_rss.fetch_max(resident_bytes(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let rate = timed(events as u64, &|stop, m| {
            let mut stage = processors_counted(&topology, &codec, &store, &h, counted.clone())
                .with_state_cache(Some(cache));
            kafka::run_stage(&settings, &mut stage, stop, m, &h)
        });
        sampling.store(false, Ordering::SeqCst);
        rate
    })?;
    let _ = std::fs::remove_dir_all(&dir);
    let mb = |b: u64| (b as f64 / 1e6 * 10.0).round() / 10.0;
    Ok(MemoryRun {
        customers,
        cache,
        events,
        events_per_s: rate.round(),
        most_in_memory: most.load(Ordering::Relaxed),
        loaded: counted.customers_loaded_total(),
        evicted: counted.customers_evicted_total(),
        rss_growth_mb: mb(peak_rss.load(Ordering::Relaxed).saturating_sub(before)),
    })
}

/// Runs `run` until it consumed `n` records; returns records per second in steady state, from
/// the first committed batch (after the group join and restore).
fn timed(n: u64, run: &(dyn Fn(&AtomicBool, &Metrics) -> Result<()> + Sync)) -> Result<f64> {
    Ok(timed_with_metrics(n, run)?.0)
}

/// [`timed`], with the metrics the run counted into (its batch phases say what bounds it).
fn timed_with_metrics(
    n: u64,
    run: &(dyn Fn(&AtomicBool, &Metrics) -> Result<()> + Sync),
) -> Result<(f64, Metrics)> {
    let stop = AtomicBool::new(false);
    let m = Metrics::new()?;
    let rate = std::thread::scope(|s| -> Result<f64> {
        let h = s.spawn(|| run(&stop, &m));
        let mut first: Option<(Instant, u64)> = None;
        while m.records_in_total() < n {
            if h.is_finished() {
                break;
            }
            let seen = m.records_in_total();
            if first.is_none() && seen > 0 {
                first = Some((Instant::now(), seen));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let (t0, n0) = first.unwrap_or((Instant::now(), 0));
        let secs = t0.elapsed().as_secs_f64().max(1e-6);
        stop.store(true, Ordering::SeqCst);
        h.join().map_err(|_| anyhow!("bench stage panicked"))??;
        if m.records_in_total() < n {
            return Err(anyhow!("bench stage stopped before consuming every event"));
        }
        Ok((n - n0) as f64 / secs)
    })?;
    Ok((rate, m))
}

/// A copy of the topics behind `prefix`, created empty, with its codec's schemas registered.
fn prefixed_topics(
    rt: &tokio::runtime::Runtime,
    cluster: &demo::Cluster,
    topology: &Topology,
    prefix: &str,
) -> Result<(Arc<Topology>, Arc<Codec>)> {
    let topology = Arc::new(topology.clone().with_topic_prefix(prefix)?);
    match &cluster.mock {
        Some(mock) => kafka::create_topics_on_mock(mock, &topology)?,
        None => {
            let brokers = kafka::cluster_size(&cluster.kafka)?;
            kafka::topics::topics_apply(&cluster.kafka, &topology, Some(brokers.min(3)))?;
            refuse_used_topics(&cluster.kafka, &topology, false)?;
        }
    }
    let codec = Arc::new(Codec::with_settings(&cluster.registry, &topology.names)?);
    rt.block_on(codec.register_all())?;
    Ok((topology, codec))
}

/// The processors' rate with `instances` of them in one consumer group (each its own
/// consumer, producer and transactional id, as separate processes would be), on a copy of the
/// topics behind a prefix of its own, fed the same events.
fn scale_pass(
    rt: &tokio::runtime::Runtime,
    cluster: &demo::Cluster,
    topology: &Topology,
    items: &[FeedItem],
    stamp: demo::FeedStamp,
    instances: usize,
) -> Result<f64> {
    let prefix = format!("bench-scale{instances}.");
    let (topology, codec) = prefixed_topics(rt, cluster, topology, &prefix)?;
    let settings = |instance: usize| {
        let mut s = cluster.settings(true, &format!("bench-{instance}"));
        s.group_prefix = format!("bench-scale{instances}");
        s
    };
    let each: Vec<KafkaSettings> = (0..instances.max(1)).map(settings).collect();
    let producer = each[0].producer(None)?;
    demo::feed(rt, &producer, &codec, items, stamp, |_| {})?;
    let dir = std::env::temp_dir().join(format!(
        "herald-bench-scale{instances}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let store: kafka::SharedStore = Arc::new(EmbeddedStore::open(&dir.join("state.redb"))?);
    let h = rt.handle().clone();
    let rate = timed(items.len() as u64, &|stop, m| {
        std::thread::scope(|s| -> Result<()> {
            let running: Vec<_> = (0..instances)
                .map(|i| {
                    let (topology, codec, store, h) =
                        (topology.clone(), codec.clone(), store.clone(), h.clone());
                    let settings = &each[i];
                    s.spawn(move || {
                        let mut stage = processors(&topology, &codec, &store, &h)?;
                        kafka::run_stage(settings, &mut stage, stop, m, &h)
                    })
                })
                .collect();
            for r in running {
                r.join().map_err(|_| anyhow!("bench stage panicked"))??;
            }
            Ok(())
        })
    });
    let _ = std::fs::remove_dir_all(&dir);
    rate
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
    encoded: &[Vec<u8>],
    live: &std::collections::HashMap<String, std::sync::Arc<crate::state::CustomerState>>,
) -> Result<(f64, f64)> {
    use crate::datum::{framed, Datums, DecisionIn};
    use crate::topology::TopicRole::Decisions;
    let t = Instant::now();
    let mut states: std::collections::HashMap<String, crate::state::CustomerState> =
        std::collections::HashMap::new();
    for bytes in encoded {
        let (_, datum) = framed(bytes).ok_or_else(|| anyhow!("unframed decision"))?;
        let d: crate::events::Decision = Datums::get().read::<DecisionIn>(Decisions, datum)?.into();
        crate::state::evolve(states.entry(d.customer_id.clone()).or_default(), &d);
    }
    let rate = encoded.len() as f64 / t.elapsed().as_secs_f64();
    if states.len() != live.len()
        || states
            .iter()
            .any(|(c, s)| live.get(c).map(|l| l.as_ref()) != Some(s))
    {
        return Err(anyhow!("the folded log does not rebuild the live states"));
    }
    let mut active = Vec::new();
    for (customer, state) in live {
        let stored = state_encoding::encode(state)?;
        if state_encoding::decode(&stored)? != **state {
            return Err(anyhow!(
                "{customer}'s stored state does not read back as it was"
            ));
        }
        if !state.approved.is_empty() {
            active.push(stored.len());
        }
    }
    let mean = active.iter().sum::<usize>() as f64 / active.len().max(1) as f64;
    Ok((rate, mean))
}
