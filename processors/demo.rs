//! `herald demo`: the whole system on one machine with nothing installed. It starts a librdkafka
//! mock cluster, the registry subset, the provider simulator and the processors, feeds the
//! scenario, and checks the outcome with checks that do not use the policy code.

use crate::context::deterministic_id;
use crate::events::*;
use crate::kafka::{self, KafkaSettings};
use crate::provider::whatsapp::CloudApiClient;
use crate::provider::{self, SimulatedSend};
use crate::registry::{self, Codec};
use crate::scenario::{self, FeedItem};
use crate::stages::{DispatchStage, ProcessorStage};
use crate::store::EmbeddedStore;
use crate::telemetry::Metrics;
use crate::topology::Topology;
use anyhow::{anyhow, Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The demo's identifier key: fixed, so a demo recording replays with the same hashes.
pub fn demo_key() -> Result<crate::identity::IdentifierKey> {
    crate::identity::IdentifierKey::new(crate::identity::DEMO_KEY.as_bytes())
        .map_err(|e| anyhow!(e))
}

/// Options of `herald demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub customers: usize,
    pub seed: u64,
    pub json: bool,
    pub keep_running: bool,
    pub state_dir: Option<PathBuf>,
    /// Dump file to write the run's inputs, stock and decisions to, for `herald replay`.
    pub record: Option<PathBuf>,
    /// Where the metrics and the query API listen.
    pub metrics_addr: std::net::SocketAddr,
}

/// What the demo prints at the end (the `--json` line).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub customers: usize,
    pub events_in: u64,
    pub decisions: u64,
    pub decisions_by_kind: BTreeMap<String, u64>,
    pub suppressions_by_reason: BTreeMap<String, u64>,
    pub sends: u64,
    /// Sends the simulator accepted, by channel (WHATSAPP, SMS, EMAIL).
    #[serde(default)]
    pub sends_by_channel: BTreeMap<String, u64>,
    pub sends_without_consent: u64,
    pub duplicate_sends: u64,
    /// Facts the scenario fed again under a new event id.
    #[serde(default)]
    pub re_emitted_in: u64,
    /// Facts dedupe recognised as repeats under a new event id (the re-emitted ones, and any
    /// status webhook the provider simulator sent twice).
    #[serde(default)]
    pub repeats_recognised: u64,
    pub dlq: u64,
    pub seconds: f64,
    pub events_per_s: f64,
    /// Where the seconds went: encoding and producing the scenario (`feeding`), waiting for
    /// the processors to decide what was fed (`processors`), for dispatch to keep up with
    /// the decisions (`dispatch`), and at the end for the last sends and their status
    /// webhooks to settle (`settling`).
    #[serde(default)]
    pub seconds_by_phase: BTreeMap<String, f64>,
    /// What bounds the wall time (see [`what_bounds`]).
    #[serde(default)]
    pub bounded_by: String,
}

/// What bounds a demo's wall time of `seconds`: a channel's sender rate when its sends alone
/// take most of it (at least 3/4) at `limits`' rate after the first burst, otherwise the phase
/// that took longest.
pub fn what_bounds(
    sends_by_channel: &BTreeMap<String, u64>,
    limits: &crate::pacing::Limits,
    seconds: f64,
    phases: &BTreeMap<String, f64>,
) -> String {
    let rate = limits.sender_per_second.max(1e-9);
    let busiest = sends_by_channel.iter().max_by_key(|(_, n)| **n);
    if let Some((channel, n)) = busiest {
        let floor = (*n as f64 - limits.sender_burst).max(0.0) / rate;
        if floor >= 0.75 * seconds {
            return format!(
                "the {channel} sender's rate: {n} sends at {rate:.0}/s take at least {floor:.1} s"
            );
        }
    }
    match phases.iter().max_by(|a, b| a.1.total_cmp(b.1)) {
        Some((phase, secs)) => format!("the {phase} phase: {secs:.1} s of {seconds:.1} s"),
        None => "nothing measured".into(),
    }
}

/// The app secret the demo's simulator signs webhooks with and its gateway checks.
pub const DEMO_APP_SECRET: &str = "herald-demo-app-secret-not-secret";
/// The demo gateway's verification token.
pub const DEMO_VERIFY_TOKEN: &str = "herald-demo-verify-token";
/// The demo SMS account: its SID, and the auth token that signs its status callbacks.
pub const DEMO_SMS_ACCOUNT: &str = "ACherald0000000000000000000000demo";
pub const DEMO_SMS_TOKEN: &str = "herald-demo-sms-token-not-secret";
/// The number the demo's SMS are sent from, and the address its e-mails are sent from.
pub const DEMO_SMS_FROM: &str = "+15550199999";
pub const DEMO_EMAIL_FROM: &str = "orders@herald.example";
/// The basic-auth credentials of the demo e-mail provider's event webhook.
pub const DEMO_EMAIL_WEBHOOK_AUTH: (&str, &str) = ("herald", "herald-demo-email-hook-not-secret");

/// The providers of every channel, all on the simulator at `simulator_url`, SMS statuses
/// asked for at the gateway's `/webhooks/sms`.
pub fn demo_providers(simulator_url: &str, gateway_url: &str) -> Result<provider::Providers> {
    let timeout = Duration::from_secs(10);
    Ok(provider::Providers::default()
        .with(Arc::new(CloudApiClient::new(
            simulator_url,
            "1055501234567890",
            "demo-token",
        )?))
        .with(Arc::new(crate::provider::sms::SmsClient::new(
            simulator_url,
            DEMO_SMS_ACCOUNT,
            DEMO_SMS_TOKEN,
            DEMO_SMS_FROM,
            Some(&format!("{gateway_url}/webhooks/sms")),
            timeout,
        )?))
        .with(Arc::new(crate::provider::email::EmailClient::new(
            simulator_url,
            "SG.demo-key",
            DEMO_EMAIL_FROM,
            timeout,
        )?)))
}

/// The running pieces of a one-machine Herald.
pub struct Cluster {
    /// The in-process cluster, when no brokers were given.
    pub mock:
        Option<rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>>,
    pub bootstrap: String,
    /// How clients reach it: the bootstrap address and any security settings.
    pub kafka: KafkaSettings,
    pub registry_url: String,
    /// The registry with whatever credentials and CA it needs (`registry_url` alone for Herald's
    /// own).
    pub registry: crate::registry::RegistrySettings,
    pub simulator_url: String,
    pub simulator: Arc<provider::SimulatorLog>,
    /// The webhook gateway the simulator posts status webhooks to.
    pub gateway_url: String,
    /// The gateway's scheme and host, under which `/webhooks/sms` and `/webhooks/email` are.
    pub gateway_root: String,
    pub gateway: crate::gateway::RunningGateway,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Cluster {
    /// Client settings for this cluster under `instance_id`.
    pub fn settings(&self, exactly_once: bool, instance_id: &str) -> KafkaSettings {
        let mut s = self.kafka.clone();
        s.exactly_once = exactly_once;
        s.instance_id = instance_id.to_string();
        s
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.gateway.join();
    }
}

/// The simulator as the demo runs it: the Cloud API's limits on the higher throughput tier
/// (1,000 messages/s per number), statuses posted to the gateway within half a second, 1 %
/// of messages undeliverable, 0.2 % of template sends refused in the answer as paused, 1 % of
/// calls failing with a transient fault that a retry passes.
pub fn demo_simulator() -> provider::SimulatorOptions {
    provider::SimulatorOptions {
        sender_per_s: 1_000.0,
        app_secret: DEMO_APP_SECRET.as_bytes().to_vec(),
        duplicate_webhook_rate: 0.02,
        undeliverable_rate: 0.01,
        template_paused_rate: 0.002,
        transient_failure_rate: 0.01,
        ..provider::SimulatorOptions::default()
    }
}

/// Dispatch's pacing in the demo: the simulator's number's throughput and pair limit.
pub fn demo_limits() -> crate::pacing::Limits {
    let sim = demo_simulator();
    crate::pacing::Limits {
        sender_per_second: sim.sender_per_s,
        sender_burst: sim.sender_per_s,
        pair_interval_ms: sim.pair_interval.as_millis() as u64,
        pair_burst: sim.pair_burst,
        ..crate::pacing::Limits::default()
    }
}

/// Starts the mock cluster with Herald's topics, the registry, the webhook gateway and the
/// simulator (posting its status webhooks to the gateway).
pub fn start_cluster(
    rt: &tokio::runtime::Runtime,
    topology: &Topology,
    simulator: provider::SimulatorOptions,
) -> Result<Cluster> {
    start_cluster_on(rt, topology, simulator, None)
}

/// As [`start_cluster`], on the real brokers of `brokers` when given (their topics created by
/// `herald topics apply`'s admin path, replicated as the cluster's brokers allow), on the
/// in-process mock cluster otherwise.
pub fn start_cluster_on(
    rt: &tokio::runtime::Runtime,
    topology: &Topology,
    simulator: provider::SimulatorOptions,
    brokers: Option<&KafkaSettings>,
) -> Result<Cluster> {
    start_cluster_with(rt, topology, simulator, brokers, None)
}

/// As `start_cluster_on`, against an existing schema registry (`None`: Herald's own, served
/// in-process).
pub fn start_cluster_with(
    rt: &tokio::runtime::Runtime,
    topology: &Topology,
    simulator: provider::SimulatorOptions,
    brokers: Option<&KafkaSettings>,
    registry: Option<&crate::registry::RegistrySettings>,
) -> Result<Cluster> {
    let (mock, kafka) = match brokers {
        None => {
            let mock = rdkafka::mocking::MockCluster::new(1)
                .context("cannot start the in-process Kafka cluster")?;
            kafka::create_topics_on_mock(&mock, topology)?;
            mock.create_topic(topology.names.passthrough(), topology.partitions(), 1)?;
            let bootstrap = mock.bootstrap_servers();
            (Some(mock), KafkaSettings::new(&bootstrap, true, "demo"))
        }
        Some(settings) => {
            let mut topics = topology.clone();
            topics.topics.push(crate::topology::TopicSpec {
                name: topology.names.passthrough().to_string(),
                role: None,
                partitions: topology.partitions(),
                replication: 3,
                cleanup_policy: "delete".into(),
                retention_ms: 86_400_000,
                max_compaction_lag_ms: None,
                doc: "herald bench's pass-through figure".into(),
            });
            let brokers = kafka::cluster_size(settings)?;
            crate::kafka::topics::topics_apply(settings, &topics, Some(brokers.min(3)))?;
            (None, settings.clone())
        }
    };
    let bootstrap = kafka.bootstrap.clone();
    let any = "127.0.0.1:0".parse().map_err(|e| anyhow!("{e}"))?;
    let registry = match registry {
        Some(settings) => settings.clone(),
        None => {
            let reg = rt.block_on(registry::serve(any))?;
            crate::registry::RegistrySettings::new(&format!("http://{reg}"))
        }
    };
    let registry_url = registry.url.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gateway = crate::gateway::start(
        rt,
        &{
            let mut s = kafka.clone();
            s.exactly_once = false;
            s.instance_id = "demo-gateway".into();
            s
        },
        Arc::new(Codec::with_settings(&registry, &topology.names)?),
        crate::gateway::GatewayConfig {
            app_secret: simulator.app_secret.clone(),
            verify_token: DEMO_VERIFY_TOKEN.into(),
            identifiers: crate::identity::IdentifierKey::demo(),
            partitions: topology.partitions(),
            ack_timeout: Duration::from_secs(10),
            sms_auth_token: Some(DEMO_SMS_TOKEN.as_bytes().to_vec()),
            public_url: None,
            email_webhook_auth: Some((
                DEMO_EMAIL_WEBHOOK_AUTH.0.to_string(),
                DEMO_EMAIL_WEBHOOK_AUTH.1.to_string(),
            )),
        },
        any,
        any,
        stop.clone(),
    )?;
    let gateway_root = format!("http://{}", gateway.webhook_addr);
    let gateway_url = format!("{gateway_root}/webhook");
    let options = provider::SimulatorOptions {
        webhook_url: Some(gateway_url.clone()),
        sms_auth_token: DEMO_SMS_TOKEN.as_bytes().to_vec(),
        email_webhook_url: Some(format!("{gateway_root}/webhooks/email")),
        email_webhook_auth: (
            DEMO_EMAIL_WEBHOOK_AUTH.0.to_string(),
            DEMO_EMAIL_WEBHOOK_AUTH.1.to_string(),
        ),
        ..simulator
    };
    let (sim, log) = rt.block_on(provider::serve_simulator_with(any, options))?;
    Ok(Cluster {
        mock,
        bootstrap,
        kafka,
        registry_url,
        registry,
        simulator_url: format!("http://{sim}"),
        simulator: log,
        gateway_url,
        gateway_root,
        gateway,
        stop,
    })
}

/// Which timestamp the fed records carry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FeedStamp {
    /// The event's occurred-at, as the source system would stamp it live.
    OccurredAt,
    /// Produce time: for brokers whose retention would delete records dated weeks back.
    ProduceTime,
}

/// Produces the scenario to the input topics, in feed order; returns how many records.
pub fn feed(
    rt: &tokio::runtime::Runtime,
    producer: &FutureProducer,
    codec: &Codec,
    items: &[FeedItem],
    stamp_with: FeedStamp,
    progress: impl FnMut(usize),
) -> Result<usize> {
    let pending = produce_items(rt, producer, codec, items, stamp_with, progress)?;
    for d in rt.block_on(futures::future::join_all(
        pending.into_iter().map(|(_, f)| f),
    )) {
        delivered(d)?;
    }
    Ok(items.len())
}

/// As [`feed`], and returns when the broker acknowledged each event's record (wall-clock ms,
/// by event id). With `acks=all` a record is acknowledged once a read_committed reader can
/// see it.
pub fn feed_noting_acknowledgements(
    rt: &tokio::runtime::Runtime,
    producer: &FutureProducer,
    codec: &Codec,
    items: &[FeedItem],
    stamp_with: FeedStamp,
) -> Result<HashMap<String, i64>> {
    let pending = produce_items(rt, producer, codec, items, stamp_with, |_| {})?;
    // Each on its own task, so an acknowledgement is timed when it comes, not when the last
    // record has been handed to the producer.
    let waits: Vec<_> = pending
        .into_iter()
        .map(|(id, f)| rt.spawn(async move { (id, f.await, crate::clock::wall_clock_ms()) }))
        .collect();
    let mut acknowledged = HashMap::new();
    for w in rt.block_on(futures::future::join_all(waits)) {
        let (id, d, at) = w.map_err(|e| anyhow!("feeding: {e}"))?;
        delivered(d)?;
        if let Some(id) = id {
            acknowledged.insert(id, at);
        }
    }
    Ok(acknowledged)
}

type Delivery = std::result::Result<
    rdkafka::producer::future_producer::OwnedDeliveryResult,
    futures::channel::oneshot::Canceled,
>;

fn delivered(d: Delivery) -> Result<()> {
    match d {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(anyhow!("feeding: {e}")),
        Err(_) => Err(anyhow!("feeding: delivery report lost")),
    }
}

/// Hands every item to the producer, in feed order, with the event id of each (none for
/// garbage) and its delivery to wait for.
fn produce_items(
    rt: &tokio::runtime::Runtime,
    producer: &FutureProducer,
    codec: &Codec,
    items: &[FeedItem],
    stamp_with: FeedStamp,
    mut progress: impl FnMut(usize),
) -> Result<Vec<(Option<String>, rdkafka::producer::DeliveryFuture)>> {
    let mut pending = Vec::with_capacity(items.len());
    let mut stamp = None;
    for (i, item) in items.iter().enumerate() {
        let (topic, key, bytes, id) = match item {
            FeedItem::Event(e) => {
                stamp = Some(e.envelope.occurred_at);
                (
                    codec.topics().of_family(e.fact.family()).clone(),
                    e.envelope.customer_id.clone(),
                    rt.block_on(codec.encode_input(e))?,
                    Some(e.envelope.event_id.clone()),
                )
            }
            FeedItem::Garbage { topic, key, bytes } => (
                codec.topics().of(*topic).clone(),
                key.clone(),
                bytes.clone(),
                None,
            ),
        };
        let mut record = FutureRecord::to(&topic).key(key.as_bytes()).payload(&bytes);
        // Source systems stamp a record when the fact happens; a replayed month keeps its
        // event time so the processors' intake can merge topics the way it would live.
        if let (Some(at), FeedStamp::OccurredAt) = (stamp, stamp_with) {
            record = record.timestamp(at);
        }
        loop {
            match producer.send_result(record) {
                Ok(f) => {
                    pending.push((id, f));
                    break;
                }
                Err((
                    KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                    back,
                )) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(anyhow!("feeding {topic}: {e}")),
            }
        }
        progress(i + 1);
    }
    Ok(pending)
}

/// Produces stock levels to the inventory topic, keyed by SKU.
pub fn feed_stock(
    rt: &tokio::runtime::Runtime,
    producer: &FutureProducer,
    codec: &Codec,
    levels: &[StockLevel],
) -> Result<()> {
    for level in levels {
        let bytes = rt.block_on(codec.encode_stock(level))?;
        let record = FutureRecord::to(codec.topics().inventory())
            .key(level.sku.as_bytes())
            .payload(&bytes);
        rt.block_on(producer.send(record, Duration::from_secs(30)))
            .map_err(|(e, _)| anyhow!("feeding {}: {e}", codec.topics().inventory()))?;
    }
    Ok(())
}

/// Reads a whole topic with a read_committed reader and hands each value to `f`.
pub fn read_topic(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    f: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> Result<()>,
) -> Result<u64> {
    let settings = KafkaSettings::new(bootstrap, true, &format!("reader-{}", std::process::id()));
    read_topic_with(&settings, topic, partitions, f)
}

/// As [`read_topic`], with these client settings (security, or `isolation.level` to see what
/// aborted transactions left in the log).
pub fn read_topic_with(
    settings: &KafkaSettings,
    topic: &str,
    partitions: i32,
    mut f: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> Result<()>,
) -> Result<u64> {
    let consumer: BaseConsumer<kafka::EndOfLogIsExpected> = settings.log_reader()?;
    let mut tpl = TopicPartitionList::new();
    let mut highs = HashMap::new();
    for p in 0..partitions {
        // A partition whose records retention deleted (low = high) has nothing to read, and
        // its end would never be seen: no record comes to set the position.
        let (low, high) = kafka::watermarks(&consumer, topic, p)?;
        if high > low {
            highs.insert(p, high);
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
    }
    if highs.is_empty() {
        return Ok(0);
    }
    consumer.assign(&tpl)?;
    let mut done = HashSet::new();
    let mut n = 0;
    let deadline = Instant::now() + Duration::from_secs(300);
    while done.len() < highs.len() {
        if Instant::now() > deadline {
            return Err(anyhow!("reading {topic}: end not reached in 300 s"));
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                n += 1;
                f(&m)?;
                if m.offset() + 1 >= highs[&m.partition()] {
                    done.insert(m.partition());
                }
            }
            // End of partition is queued after that partition's records, so only then can the
            // position be trusted; an empty poll says nothing about prefetched records.
            Some(Err(KafkaError::PartitionEOF(p)))
                if highs.get(&p).is_some_and(|high| {
                    kafka::position_of(&consumer, topic, p).is_ok_and(|pos| pos >= *high)
                }) =>
            {
                done.insert(p);
            }
            Some(Err(KafkaError::PartitionEOF(_))) | None => {}
            Some(Err(e)) if kafka::passes(&e) => {}
            Some(Err(e)) => return Err(anyhow!("reading {topic}: {e}")),
        }
    }
    Ok(n)
}

/// A consent change of the scenario: when, purpose, channel, granted, its event id.
type ConsentChangeAt<'a> = (Millis, Purpose, Channel, bool, &'a str);

/// When records reached the broker, in wall-clock ms: what the processors could have seen
/// when they decided.
#[derive(Debug, Default)]
pub struct Visibility {
    /// By event id: when the broker acknowledged the event's record.
    pub acknowledged: HashMap<String, i64>,
    /// By message id: when the broker acknowledged the input record its approval was decided
    /// on (for a timer, the input that moved stream time past it).
    pub triggered_at: HashMap<String, i64>,
}

/// Checks the simulator's log against the scenario's own consent events, without policy code:
/// a send counts as without consent when, at its trigger's time, the scenario's latest consent
/// event for the template's purpose was a grant on no channel. With `visible`, a send that the
/// consent events acknowledged before the input its approval was decided on allowed is counted
/// apart, as decided before a consent change reached the broker: Kafka orders no records across
/// topics, and a change may become readable after later records of other topics were decided.
pub fn independent_checks(
    items: &[FeedItem],
    topology: &Topology,
    sends: &[SimulatedSend],
    visible: Option<&Visibility>,
) -> IndependentChecks {
    // Ground truth from the scenario: consent timeline (with each change's event id) and
    // trigger times per message id.
    let mut timeline: HashMap<&str, Vec<ConsentChangeAt>> = HashMap::new();
    // Message id -> (customer, when it was asked for, template): an SMS or e-mail carries
    // text, not the template's name, so the template is known from what asked for it.
    let mut triggers: HashMap<String, (&str, Millis, &str)> = HashMap::new();
    for item in items {
        let FeedItem::Event(e) = item else { continue };
        let c = e.envelope.customer_id.as_str();
        match &e.fact {
            Fact::ConsentGranted(x) => timeline.entry(c).or_default().push((
                e.envelope.occurred_at,
                x.purpose,
                x.channel,
                true,
                &e.envelope.event_id,
            )),
            Fact::ConsentRevoked(x) => timeline.entry(c).or_default().push((
                e.envelope.occurred_at,
                x.purpose,
                x.channel,
                false,
                &e.envelope.event_id,
            )),
            _ => {}
        }
        // Reactions: one message per fact and template.
        for j in &topology.journeys {
            for r in j.reactions.iter().filter(|r| r.fact == e.fact.kind()) {
                for template in std::iter::once(&r.template).chain(&r.partial_template) {
                    let id = deterministic_id(&[c, &e.envelope.event_id, template]);
                    triggers
                        .entry(id)
                        .or_insert((c, e.envelope.occurred_at, template.as_str()));
                }
            }
        }
        // Timed steps: one message per journey instance and step, judged at the step's due
        // time as the journey file schedules it.
        for j in topology
            .journeys
            .iter()
            .filter(|j| j.entry == e.fact.kind())
        {
            let Some(key) = crate::journey::key_of(j.key, &e.fact, c) else {
                continue;
            };
            let mut at = e.envelope.occurred_at;
            let mut n = 0;
            while let Some((step, after)) = j.step_at(n) {
                at = match (step.before_due_hours, &e.fact) {
                    (Some(h), Fact::SubscriptionRenewalDue(s)) => {
                        (s.due_at - (h * 3_600_000.0) as i64).max(at)
                    }
                    _ => at + (after * 3_600_000.0) as i64,
                };
                let id =
                    deterministic_id(&[c, &j.name, &key, &e.envelope.event_id, &n.to_string()]);
                triggers
                    .entry(id)
                    .or_insert((c, at, step.template.as_str()));
                n += 1;
            }
        }
    }
    // A message WhatsApp reported undeliverable may go out once more on a fallback channel,
    // under an id derived from the first; it is judged at its first's trigger.
    let firsts: Vec<(String, (&str, Millis, &str))> =
        triggers.iter().map(|(id, t)| (id.clone(), *t)).collect();
    for (id, (c, at, template)) in firsts {
        triggers.insert(deterministic_id(&[c, &id, "fallback"]), (c, at, template));
    }
    let purpose_of = |template: &str| {
        topology
            .catalog
            .variants(template)
            .and_then(|v| v.first())
            .map(|t| t.purpose)
    };
    let mut checks = IndependentChecks::default();
    let mut seen = HashSet::new();
    for s in sends {
        if !seen.insert((s.to.clone(), s.message_id.clone())) {
            checks.duplicates += 1;
        }
        let Some((customer, at, asked_for)) = triggers.get(&s.message_id) else {
            // A message the scenario never asked for is a send without grounds.
            checks.without_consent.push(UnconsentedSend {
                message_id: s.message_id.clone(),
                template: s.template.clone(),
                customer_id: None,
                why: "no fact asked for it".into(),
            });
            continue;
        };
        // A WhatsApp template may be a fallback template of the one asked for.
        let template = if s.template.is_empty() {
            asked_for
        } else {
            s.template.as_str()
        };
        let Some(purpose) = purpose_of(template) else {
            checks.without_consent.push(UnconsentedSend {
                message_id: s.message_id.clone(),
                template: s.template.clone(),
                customer_id: Some(customer.to_string()),
                why: "the template is not in the catalog".into(),
            });
            continue;
        };
        // Granted on some channel at `at`, by the consent changes `counts` lets through.
        let granted = |counts: &dyn Fn(&str) -> bool| {
            timeline.get(customer).is_some_and(|t| {
                [Channel::Whatsapp, Channel::Sms, Channel::Email]
                    .iter()
                    .any(|channel| {
                        let mut events: Vec<_> = t
                            .iter()
                            .filter(|(when, p, c, _, id)| {
                                *p == purpose && c == channel && when <= at && counts(id)
                            })
                            .collect();
                        events.sort_by_key(|(when, _, _, granted, _)| (*when, !*granted));
                        events.last().is_some_and(|(_, _, _, g, _)| *g)
                    })
            })
        };
        if granted(&|_| true) {
            continue;
        }
        let why = format!(
            "no {purpose:?} consent at its trigger, {}",
            crate::events::rfc3339(*at)
        );
        // Decided on an input the broker acknowledged at `decided`: the intake decides every
        // record the broker had by then first, so only those consent changes could count.
        let decided = visible.and_then(|v| v.triggered_at.get(&s.message_id).map(|d| (v, *d)));
        let unseen = decided.filter(|(v, decided)| {
            granted(&|id| v.acknowledged.get(id).is_some_and(|a| a <= decided))
        });
        let send = |why: String| UnconsentedSend {
            message_id: s.message_id.clone(),
            template: s.template.clone(),
            customer_id: Some(customer.to_string()),
            why,
        };
        match unseen {
            Some((v, decided)) => {
                // The changes the broker acknowledged only after the approval.
                let late: Vec<String> = timeline
                    .get(customer)
                    .into_iter()
                    .flatten()
                    .filter(|(when, p, ..)| *p == purpose && when <= at)
                    .filter_map(|(.., id)| {
                        let acked = *v.acknowledged.get(*id)?;
                        (acked > decided)
                            .then(|| format!("{id} at {}", crate::events::rfc3339(acked)))
                    })
                    .collect();
                checks.before_late_consent_change.push(send(format!(
                    "{why}; approved on an input acknowledged at {}, before the broker acknowledged {}",
                    crate::events::rfc3339(decided),
                    late.join(", ")
                )))
            }
            None => checks.without_consent.push(send(why)),
        }
    }
    checks
}

/// A send the scenario's own consent events do not allow, and why.
#[derive(Debug)]
pub struct UnconsentedSend {
    pub message_id: String,
    pub template: String,
    /// The customer whose fact asked for it; None when no fact did.
    pub customer_id: Option<String>,
    pub why: String,
}

impl std::fmt::Display for UnconsentedSend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message_id, self.template)?;
        if let Some(c) = &self.customer_id {
            write!(f, " for {c}")?;
        }
        write!(f, ": {}", self.why)
    }
}

/// What [`independent_checks`] found in the simulator's log.
#[derive(Debug, Default)]
pub struct IndependentChecks {
    /// Each send without consent.
    pub without_consent: Vec<UnconsentedSend>,
    /// Sends approved before the consent change that forbids them reached the broker.
    pub before_late_consent_change: Vec<UnconsentedSend>,
    /// Sends of a message id to a number that had already received it.
    pub duplicates: u64,
}

fn wait_until(
    stop: &AtomicBool,
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> bool,
    mut tick: impl FnMut(),
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if stop.load(Ordering::SeqCst) {
            return Err(anyhow!("interrupted while waiting for {what}"));
        }
        if Instant::now() > deadline {
            return Err(anyhow!("timed out waiting for {what}"));
        }
        tick();
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// How many decisions dispatch may have still to read before the demo feeds more: well inside
/// what the mock cluster keeps of six partitions.
const DISPATCH_LAG: u64 = 15_000;

/// Runs the demo and returns its summary.
pub fn run(opts: &DemoOptions) -> Result<Summary> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let topology = Arc::new(Topology::embedded()?);
    let say = |s: String| {
        if !opts.json {
            eprintln!("{s}");
        }
    };
    say(format!(
        "herald demo: {} customers, seed {}",
        opts.customers, opts.seed
    ));
    let cluster = start_cluster(&rt, &topology, demo_simulator())?;
    say(format!(
        "  kafka (in-process mock) {}\n  schema registry         {}\n  provider simulator      {}",
        cluster.bootstrap, cluster.registry_url, cluster.simulator_url
    ));

    let scenario = scenario::generate(opts.customers, opts.seed);
    say(format!("  scenario: {} records", scenario.len()));
    let tmp;
    let state_dir = match &opts.state_dir {
        Some(d) => d.clone(),
        None => {
            tmp = fresh_temp_dir("demo")?;
            tmp.clone()
        }
    };
    let store: kafka::SharedStore = Arc::new(EmbeddedStore::open(&state_dir.join("state.redb"))?);
    let codec = Arc::new(Codec::new(&cluster.registry_url, &topology.names)?);
    rt.block_on(codec.register_all())?;

    // Started before anything is produced, so that it reads every record before the
    // in-process cluster trims old segments.
    let recorder = match &opts.record {
        Some(_) => Some(crate::dump::Follower::start(
            &cluster.kafka,
            crate::dump::replay_topics(&topology.names),
            codec.clone(),
            topology.partitions(),
            rt.handle().clone(),
        )?),
        None => None,
    };
    let stop = kafka::stop_on_signal(rt.handle());
    // One registry for the process, as `herald run --stage all` has; `pm` and `dm` name the
    // side each count is read for.
    let pm = Metrics::shared()?;
    let dm = pm.clone();
    // As `herald run` serves them: the process's metrics, and the query API on its store.
    let query = crate::query::routes(Arc::new(crate::query::QueryApi {
        store: store.clone(),
        topology: topology.clone(),
        instance: "demo".into(),
        owners: None,
    }));
    let served = rt.block_on(crate::telemetry::serve_metrics(
        opts.metrics_addr,
        pm.clone(),
        query,
    ))?;
    say(format!(
        "  metrics and query API   http://{served}/metrics  http://{served}/v1/customers/{{id}}"
    ));
    let settings = KafkaSettings::new(&cluster.bootstrap, true, "demo");
    let mut handles = Vec::new();
    {
        let (s, st, t, c, h, m) = (
            settings.clone(),
            stop.clone(),
            topology.clone(),
            codec.clone(),
            rt.handle().clone(),
            pm.clone(),
        );
        let store = store.clone();
        handles.push(std::thread::spawn(move || {
            let mut stage = ProcessorStage::new(
                t,
                c,
                store,
                h.clone(),
                m.clone(),
                crate::identity::IdentifierKey::demo(),
            )
            .with_checkpoint_interval(std::time::Duration::from_millis(kafka::CHECKPOINT_MS));
            kafka::run_stage(&s, &mut stage, &st, &m, &h)
        }));
    }
    {
        let (s, st, c, h, m) = (
            settings.clone(),
            stop.clone(),
            codec.clone(),
            rt.handle().clone(),
            dm.clone(),
        );
        let store = store.clone();
        let providers = demo_providers(&cluster.simulator_url, &cluster.gateway_root)?;
        let catalog = topology.catalog.clone();
        handles.push(std::thread::spawn(move || {
            let mut stage = DispatchStage::new(
                c,
                store,
                providers,
                catalog,
                h.clone(),
                m.clone(),
                crate::identity::IdentifierKey::demo(),
            )
            .with_limits(demo_limits());
            kafka::run_stage(&s, &mut stage, &st, &m, &h)
        }));
    }

    let producer = settings.producer(None)?;
    feed_stock(&rt, &producer, &codec, &scenario::stock_levels())?;
    let started = Instant::now();
    let total = scenario.len();
    // Counts the events the processors have taken; fed, decided, sent and dead-lettered after.
    let progress = crate::telemetry::Progress::bar(total as u64, "events", !opts.json);
    let show = |fed: usize| {
        progress.at(pm.records_in_of("processors"));
        progress.say(format!(
            "fed {fed}  decisions {}  sends {}  dlq {}",
            pm.decisions_total(),
            dm.sends_accepted(),
            pm.dead_letters_total()
        ));
    };
    // Feed in chunks and let the processors catch up between them: records of different topics
    // are only ordered within what the consumer has in hand, as in a live system.
    let mut fed = 0;
    let mut phases: BTreeMap<String, f64> = BTreeMap::new();
    let mut phase_started = Instant::now();
    let mut phase_ends = |name: &str| {
        *phases.entry(name.to_string()).or_default() += phase_started.elapsed().as_secs_f64();
        phase_started = Instant::now();
    };
    for chunk in scenario.items.chunks(5_000) {
        fed += feed(&rt, &producer, &codec, chunk, FeedStamp::OccurredAt, |_| {})?;
        phase_ends("feeding");
        show(fed);
        let target = fed as u64;
        wait_until(
            &stop,
            "the processors",
            Duration::from_secs(600),
            || pm.records_in_of("processors") >= target || handles.iter().any(|h| h.is_finished()),
            || show(fed),
        )?;
        phase_ends("processors");
        // The mock cluster keeps about 5 MB of each partition: dispatch must not fall so far
        // behind that the decisions it has yet to read are trimmed.
        wait_until(
            &stop,
            "dispatch keeping up",
            Duration::from_secs(600),
            || {
                dm.records_in_of("dispatch") + DISPATCH_LAG >= pm.decisions_total()
                    || handles.iter().any(|h| h.is_finished())
            },
            || show(fed),
        )?;
        phase_ends("dispatch");
        if let Some(h) = handles.iter().position(|h| h.is_finished()) {
            let r = handles
                .remove(h)
                .join()
                .map_err(|_| anyhow!("a stage panicked"))?;
            r?;
            return Err(anyhow!("a stage stopped early"));
        }
    }
    let mut last_counts = None;
    let mut quiet_since = Instant::now();
    wait_until(
        &stop,
        "dispatch",
        Duration::from_secs(600),
        || {
            // Quiet: every decision dispatched, no send unsettled, no status webhook still
            // on its way, and nothing new decided for a second (a status may bring a
            // fallback decision).
            let counts = (pm.records_in_of("processors"), pm.decisions_total());
            let quiet = dm.records_in_of("dispatch") >= counts.1
                && dm.sends_in_flight() == 0
                && cluster.simulator.webhooks_pending.load(Ordering::Relaxed) == 0;
            if !quiet || last_counts != Some(counts) {
                last_counts = Some(counts);
                quiet_since = Instant::now();
                return false;
            }
            quiet_since.elapsed() >= Duration::from_secs(1)
        },
        || show(fed),
    )?;
    phase_ends("settling");
    let seconds = started.elapsed().as_secs_f64();
    drop(progress);

    // Counted as the processors committed them: librdkafka's mock cluster trims old log
    // segments of large partitions, so a read from the beginning would see only the tail.
    let by_kind = pm.kinds();
    let by_reason = pm.reasons();
    let decisions = pm.decisions_total();
    let dlq = read_topic(
        &cluster.bootstrap,
        topology.names.dlq(),
        topology.partitions(),
        |_| Ok(()),
    )?;
    let sends = cluster.simulator.sent();
    let checks = independent_checks(&scenario.items, &topology, &sends, None);
    for w in &checks.without_consent {
        say(format!("  send without consent: {w}"));
    }
    if let (Some(path), Some(recorder)) = (&opts.record, recorder) {
        let records = recorder.finish()?;
        let recorded = records
            .iter()
            .filter(|r| matches!(r.payload, crate::replay::Payload::Decision(_)))
            .count() as u64;
        if recorded != decisions {
            return Err(anyhow!(
                "the recording holds {recorded} of the {decisions} decisions; not writing {}",
                path.display()
            ));
        }
        let n = crate::dump::write(path, &records)?;
        say(format!("  recorded {n} records to {}", path.display()));
    }

    let summary = Summary {
        customers: opts.customers,
        events_in: total as u64,
        decisions,
        decisions_by_kind: by_kind,
        suppressions_by_reason: by_reason,
        sends: sends.len() as u64,
        sends_by_channel: sends.iter().fold(BTreeMap::new(), |mut by, s| {
            *by.entry(format!("{:?}", s.channel).to_uppercase())
                .or_insert(0) += 1;
            by
        }),
        sends_without_consent: checks.without_consent.len() as u64,
        re_emitted_in: scenario.re_emitted.len() as u64,
        repeats_recognised: pm.repeats_recognised_total(),
        duplicate_sends: checks.duplicates,
        dlq,
        seconds,
        events_per_s: total as f64 / seconds.max(1e-9),
        seconds_by_phase: phases,
        bounded_by: String::new(),
    };
    let summary = Summary {
        bounded_by: what_bounds(
            &summary.sends_by_channel,
            &demo_limits(),
            seconds,
            &summary.seconds_by_phase,
        ),
        ..summary
    };
    if opts.keep_running {
        print_summary(&summary, opts.json);
        eprintln!("\nherald demo keeps running (Ctrl-C to stop):\n  bootstrap.servers   {}\n  schema.registry.url {}\n  provider simulator  {}\n  metrics             http://{served}/metrics\n  query API           http://{served}/v1/customers/cust-000000\n  e.g. kcat -b {} -t {} -s value=avro -r {} -X isolation.level=read_committed",
            cluster.bootstrap, cluster.registry_url, cluster.simulator_url, cluster.bootstrap, topology.names.decisions(), cluster.registry_url);
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    stop.store(true, Ordering::SeqCst);
    for h in handles {
        h.join().map_err(|_| anyhow!("a stage panicked"))??;
    }
    // Clients go before the cluster they talk to.
    drop(producer);
    drop(cluster);
    Ok(summary)
}

/// An empty directory `herald-<what>-<pid>` under the system's temporary directory.
pub fn fresh_temp_dir(what: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("herald-{what}-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Prints the summary for a person, or as one JSON line.
pub fn print_summary(s: &Summary, json: bool) {
    if json {
        println!("{}", serde_json::to_string(s).unwrap_or_default());
        return;
    }
    println!("\nHerald demo summary");
    println!("  customers               {}", s.customers);
    println!("  events in               {}", s.events_in);
    println!("  decisions               {}", s.decisions);
    for (k, v) in &s.decisions_by_kind {
        println!("    {k:<22}{v}");
    }
    println!("  suppressed, by reason");
    for (k, v) in &s.suppressions_by_reason {
        println!("    {k:<22}{v}");
    }
    println!("  messages sent           {}", s.sends);
    for (k, v) in &s.sends_by_channel {
        println!("    {k:<22}{v}");
    }
    println!(
        "  re-emitted under new ids {} (recognised as repeats: {})",
        s.re_emitted_in, s.repeats_recognised
    );
    println!("  dead letters            {}", s.dlq);
    println!(
        "  throughput              {:.0} events/s ({:.1} s)",
        s.events_per_s, s.seconds
    );
    let phases: Vec<String> = s
        .seconds_by_phase
        .iter()
        .map(|(phase, secs)| format!("{phase} {secs:.1} s"))
        .collect();
    println!("  time went to            {}", phases.join(", "));
    println!("  bounded by              {}", s.bounded_by);
    println!("  sends without consent   {}", s.sends_without_consent);
    println!("  duplicate sends         {}", s.duplicate_sends);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sends(whatsapp: u64, sms: u64) -> BTreeMap<String, u64> {
        BTreeMap::from([("WHATSAPP".to_string(), whatsapp), ("SMS".to_string(), sms)])
    }

    fn phases(dispatch: f64, processors: f64) -> BTreeMap<String, f64> {
        BTreeMap::from([
            ("dispatch".to_string(), dispatch),
            ("processors".to_string(), processors),
        ])
    }

    /// A customer who granted marketing on WhatsApp, had a delivery (the re-engagement
    /// journey nudges 14 days later), and revoked marketing an hour after the delivery; and
    /// the nudge the simulator received.
    fn nudged_after_revoking() -> (Vec<FeedItem>, SimulatedSend) {
        const T0: Millis = 1_772_445_600_000;
        const HOUR: Millis = 3_600_000;
        let consent = |kind: &str| {
            serde_json::from_value::<Fact>(serde_json::json!({"type": kind, "purpose": "MARKETING", "channel": "WHATSAPP", "source": "crm", "artifact_id": "a-1"})).unwrap()
        };
        let delivered: Fact = serde_json::from_value(
            serde_json::json!({"type": "ShipmentDelivered", "order_id": "o-1", "shipment_id": "s-1"}),
        )
        .unwrap();
        let items = vec![
            FeedItem::Event(InputEvent::new(
                "crm",
                "c-1",
                "granted",
                T0,
                consent("ConsentGranted"),
            )),
            FeedItem::Event(InputEvent::new(
                "oms",
                "c-1",
                "delivered",
                T0 + HOUR,
                delivered,
            )),
            FeedItem::Event(InputEvent::new(
                "crm",
                "c-1",
                "revoked",
                T0 + 2 * HOUR,
                consent("ConsentRevoked"),
            )),
        ];
        let nudge = SimulatedSend {
            channel: Channel::Whatsapp,
            to: "+15550100001".into(),
            template: "we_miss_you".into(),
            language: "en_US".into(),
            callback_data: String::new(),
            message_id: deterministic_id(&["c-1", "re_engagement", "c-1", "delivered", "0"]),
            parameters: vec![],
            text: None,
            wamid: "wamid.1".into(),
        };
        (items, nudge)
    }

    #[test]
    fn a_send_after_a_revocation_is_without_consent_unless_approved_before_the_broker_had_it() {
        let topology = Topology::embedded().unwrap();
        let (items, nudge) = nudged_after_revoking();
        let strict = independent_checks(&items, &topology, std::slice::from_ref(&nudge), None);
        assert_eq!(
            strict.without_consent.len(),
            1,
            "{:?}",
            strict.without_consent
        );

        let acknowledged = |revoked: i64| {
            HashMap::from([
                ("granted".to_string(), 1_000),
                ("delivered".to_string(), 1_001),
                ("revoked".to_string(), revoked),
            ])
        };
        let approved = HashMap::from([(nudge.message_id.clone(), 5_000)]);
        // The revocation was on the broker before the input the nudge was decided on: a
        // broken guarantee.
        let visible = Visibility {
            acknowledged: acknowledged(4_999),
            triggered_at: approved.clone(),
        };
        let c = independent_checks(
            &items,
            &topology,
            std::slice::from_ref(&nudge),
            Some(&visible),
        );
        assert_eq!(c.without_consent.len(), 1);
        assert!(c.before_late_consent_change.is_empty());
        // It reached the broker only after: counted apart, named as such.
        let late = Visibility {
            acknowledged: acknowledged(5_001),
            triggered_at: approved,
        };
        let c = independent_checks(&items, &topology, std::slice::from_ref(&nudge), Some(&late));
        assert!(c.without_consent.is_empty());
        assert_eq!(c.before_late_consent_change.len(), 1);
        assert!(
            c.before_late_consent_change[0]
                .why
                .contains("before the broker acknowledged revoked at 1970-01-01T00:00:05.001Z"),
            "{}",
            c.before_late_consent_change[0]
        );
    }

    #[test]
    fn a_run_that_takes_about_what_its_sends_need_is_bounded_by_the_sender() {
        let limits = demo_limits();
        let bound = what_bounds(&sends(60_429, 2_374), &limits, 67.7, &phases(60.0, 4.7));
        assert_eq!(
            bound,
            "the WHATSAPP sender's rate: 60429 sends at 1000/s take at least 59.4 s"
        );
    }

    #[test]
    fn a_run_far_slower_than_its_sends_need_names_its_longest_phase() {
        let limits = demo_limits();
        let bound = what_bounds(&sends(60_429, 2_374), &limits, 215.0, &phases(187.4, 8.2));
        assert_eq!(bound, "the dispatch phase: 187.4 s of 215.0 s");
    }
}
