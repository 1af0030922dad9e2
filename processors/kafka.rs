//! The Kafka shell: consume -> decide -> produce in Kafka transactions (or at-least-once for
//! brokers without them), restore of partition state on assignment, the dead-letter topic, and a
//! clean stop on SIGTERM. The loop is generic over a [`Stage`]; the rules live in the core.

use crate::intake::{FlowChange, Intake, Lag};
use crate::store::StateStore;
use crate::telemetry::{GroupReport, Metrics, StagePhase};
use anyhow::{anyhow, bail, Context, Result};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Records one input lane may buffer before its fetching pauses.
const LANE_PAUSE_ABOVE: usize = 20_000;

/// How the loop talks to the brokers.
#[derive(Clone)]
pub struct KafkaSettings {
    pub bootstrap: String,
    /// Kafka transactions (exactly-once); false for at-least-once on brokers without them.
    pub exactly_once: bool,
    /// Unique per process: the transactional id and client id derive from it.
    pub instance_id: String,
    pub batch_size: usize,
    /// Assignor for the lead topic; companions follow it, so co-partitioning holds with any.
    pub assignment_strategy: String,
    /// How long an empty input lane may hold its partition back before the others go on
    /// without it (Kafka Streams' `max.task.idle.ms`); see `intake`.
    pub max_task_idle_ms: u64,
    /// Extra librdkafka settings (security, timeouts), applied last.
    pub extra: Vec<(String, String)>,
    /// Join the group with a static member id derived from `instance_id` (KIP-345), so a
    /// process restarted under the same id takes its partitions back without a rebalance.
    pub static_membership: bool,
    /// How long the group waits for a silent member before handing its partitions on.
    pub session_timeout_ms: u32,
    /// What this deployment's consumer groups and transactional ids start with
    /// (`{prefix}-{stage}`, `{prefix}-{stage}-{instance}`), so that two deployments on one
    /// cluster never share a group or fence each other.
    pub group_prefix: String,
}

impl KafkaSettings {
    /// Settings with Herald's defaults for a cluster.
    pub fn new(bootstrap: &str, exactly_once: bool, instance_id: &str) -> Self {
        KafkaSettings {
            bootstrap: bootstrap.to_string(),
            exactly_once,
            instance_id: instance_id.to_string(),
            batch_size: 1000,
            assignment_strategy: "cooperative-sticky".into(),
            max_task_idle_ms: 250,
            extra: vec![],
            static_membership: false,
            session_timeout_ms: 10_000,
            group_prefix: "herald".into(),
        }
    }

    fn base(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap);
        for (k, v) in &self.extra {
            c.set(k, v);
        }
        c
    }

    /// The connection and security settings alone, for admin and metadata clients.
    pub fn client_config(&self) -> ClientConfig {
        self.base()
    }

    /// A producer; transactional when `transactional_id` is given.
    pub fn producer(&self, transactional_id: Option<&str>) -> Result<FutureProducer> {
        let mut c = self.base();
        c.set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "60000")
            .set("partitioner", "murmur2_random");
        if let Some(id) = transactional_id {
            c.set("transactional.id", id)
                .set("transaction.timeout.ms", "60000")
                .set("message.timeout.ms", "55000");
        }
        for (k, v) in &self.extra {
            c.set(k, v);
        }
        c.create().context("cannot create Kafka producer")
    }

    /// What every Herald consumer shares: committed reads only, offsets committed by Herald
    /// itself, from the beginning when the group has none; then `specific`, then the extras.
    pub fn consumer_config(
        &self,
        group: &str,
        client_id: &str,
        specific: &[(&str, &str)],
    ) -> ClientConfig {
        let mut c = self.base();
        c.set("group.id", group)
            .set("client.id", client_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed");
        for (k, v) in specific {
            c.set(*k, *v);
        }
        for (k, v) in &self.extra {
            c.set(k, v);
        }
        c
    }

    /// A reader with no group, for restoring state from a log partition.
    pub fn log_reader(&self) -> Result<BaseConsumer<EndOfLogIsExpected>> {
        self.consumer_config(
            &format!("{}-restore-{}", self.group_prefix, self.instance_id),
            &format!("{}-restore-{}", self.group_prefix, self.instance_id),
            // A reader reads to the end and stops; the fetch it leaves waiting at the end of
            // one partition holds up its next read (one fetch per broker at a time), so the
            // broker must answer an empty fetch at once, not after the default 500 ms.
            &[("enable.partition.eof", "true"), ("fetch.wait.max.ms", "5")],
        )
        .create_with_context(EndOfLogIsExpected)
        .context("cannot create Kafka restore reader")
    }
}

impl std::fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let extra: Vec<(String, String)> = self
            .extra
            .iter()
            .map(|(k, v)| (k.clone(), shown_value(k, v)))
            .collect();
        f.debug_struct("KafkaSettings")
            .field("bootstrap", &self.bootstrap)
            .field("exactly_once", &self.exactly_once)
            .field("instance_id", &self.instance_id)
            .field("group_prefix", &self.group_prefix)
            .field("extra", &extra)
            .finish_non_exhaustive()
    }
}

/// Whether a librdkafka setting holds a secret (a password, a key, a token, a JAAS line).
pub fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "jaas", "token", ".key.pem", "ssl.key"]
        .iter()
        .any(|s| k.contains(s))
}

/// A setting's value as logs and error messages may show it.
pub fn shown_value(key: &str, value: &str) -> String {
    if is_secret(key) {
        "[hidden]".into()
    } else {
        value.to_string()
    }
}

/// Client settings from a librdkafka properties file: `key=value` lines, `#` comments.
pub fn read_properties(path: &std::path::Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--kafka-properties {}: cannot read it", path.display()))?;
    parse_properties(&text).map_err(|why| anyhow!("--kafka-properties {}: {why}", path.display()))
}

/// Parses `key=value` lines; blank lines and lines starting with `#` or `!` are skipped.
pub fn parse_properties(text: &str) -> std::result::Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(format!("line {} is not key=value", n + 1));
        };
        let k = k.trim();
        if k.is_empty() {
            return Err(format!("line {} has no key", n + 1));
        }
        out.push((k.to_string(), v.trim().to_string()));
    }
    Ok(out)
}

/// Client settings from the environment in the usual container form: `HERALD_KAFKA_SASL_PASSWORD`
/// is `sasl.password` (after the prefix, lower case, `_` for `.`). `HERALD_KAFKA_PROPERTIES`
/// names the properties file and is not a setting.
pub fn settings_from_env(vars: impl Iterator<Item = (String, String)>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = vars
        .filter_map(|(k, v)| {
            let rest = k.strip_prefix("HERALD_KAFKA_")?;
            if rest == "PROPERTIES" || rest.is_empty() {
                return None;
            }
            Some((rest.to_ascii_lowercase().replace('_', "."), v))
        })
        .collect();
    out.sort();
    out
}

/// How many brokers the cluster has now.
pub fn cluster_size(settings: &KafkaSettings) -> Result<i32> {
    let client: BaseConsumer<ConnectionProbe> = settings
        .base()
        .create_with_context(ConnectionProbe::default())
        .context("invalid Kafka client settings")?;
    let metadata = client
        .fetch_metadata(None, Duration::from_secs(15))
        .with_context(|| format!("cannot read cluster metadata from {}", settings.bootstrap))?;
    Ok(metadata.brokers().len() as i32)
}

/// Collects client errors while a connection is checked.
#[derive(Default)]
struct ConnectionProbe {
    errors: Mutex<Vec<(KafkaError, String)>>,
}

impl ClientContext for ConnectionProbe {
    fn error(&self, error: KafkaError, reason: &str) {
        if let Ok(mut e) = self.errors.lock() {
            e.push((error, reason.to_string()));
        }
    }
}

impl ConsumerContext for ConnectionProbe {}

/// Asks the cluster for its metadata once, so that a wrong address, certificate or password is
/// a clear error at start naming the settings to fix, not a client retrying forever.
pub fn check_connection(settings: &KafkaSettings) -> Result<()> {
    let client: BaseConsumer<ConnectionProbe> = settings
        .base()
        .create_with_context(ConnectionProbe::default())
        .context("invalid Kafka client settings")?;
    // Errors reach the context only as the client is polled, so ask in short rounds.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen: Vec<(KafkaError, String)> = Vec::new();
    loop {
        let answer = client.fetch_metadata(None, Duration::from_secs(2));
        if answer.is_ok() {
            return Ok(());
        }
        if let Some(Err(e)) = client.poll(Duration::from_millis(200)) {
            let reason = e.to_string();
            seen.push((e, reason));
        }
        if let Ok(mut e) = client.context().errors.lock() {
            seen.append(&mut e);
        }
        let refused = seen
            .iter()
            .any(|(_, r)| r.to_ascii_lowercase().contains("authentication"));
        if refused || Instant::now() > deadline {
            let failure = match answer {
                Err(e) => e,
                Ok(_) => return Ok(()),
            };
            return Err(explain_connection_failure(settings, &failure, &seen));
        }
    }
}

/// Names the settings behind a failed first contact with the cluster.
fn explain_connection_failure(
    settings: &KafkaSettings,
    failure: &KafkaError,
    seen: &[(KafkaError, String)],
) -> anyhow::Error {
    let reasons: Vec<&str> = seen.iter().map(|(_, r)| r.as_str()).collect();
    let said = |needle: &str| {
        reasons
            .iter()
            .any(|r| r.to_ascii_lowercase().contains(needle))
    };
    let get = |k: &str| {
        settings
            .extra
            .iter()
            .rev()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let detail = reasons.last().copied().unwrap_or("no answer");
    let what = if said("authentication") || said("sasl") {
        format!(
            "the brokers refused the credentials: check sasl.username ({}) and sasl.password, and sasl.mechanism ({})",
            get("sasl.username").unwrap_or("unset"),
            get("sasl.mechanism").unwrap_or("unset")
        )
    } else if said("ssl") || said("certificate") || said("handshake") {
        format!(
            "the TLS handshake failed: check security.protocol ({}) and ssl.ca.location ({})",
            get("security.protocol").unwrap_or("plaintext"),
            get("ssl.ca.location").unwrap_or("unset")
        )
    } else {
        format!(
            "no broker answered at {}: check the bootstrap address (--bootstrap, HERALD_BOOTSTRAP) and security.protocol ({})",
            settings.bootstrap,
            get("security.protocol").unwrap_or("plaintext")
        )
    };
    anyhow!("cannot reach the Kafka cluster: {what} ({failure}; {detail})")
}

/// Client context for log readers: reaching the end of a partition is the signal they wait for,
/// not an error worth logging.
pub struct EndOfLogIsExpected;

impl ClientContext for EndOfLogIsExpected {
    fn error(&self, error: KafkaError, reason: &str) {
        if !matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        ) {
            tracing::error!(error = %error, reason, "kafka client error");
        }
    }
}

impl ConsumerContext for EndOfLogIsExpected {}

/// One record a stage wants written in the current transaction.
#[derive(Debug, Clone)]
pub struct OutRecord {
    /// The topic as this deployment names it; shared, since many records go to one topic.
    pub topic: std::sync::Arc<str>,
    pub partition: i32,
    pub key: Vec<u8>,
    /// Wire bytes; empty for a tombstone (no Avro record encodes to nothing).
    pub value: Vec<u8>,
    pub headers: Vec<(&'static str, Vec<u8>)>,
}

/// What a stage produced while handling a batch.
#[derive(Default)]
pub struct Outbox {
    pub records: Vec<OutRecord>,
}

/// The next offset of each (topic, partition) this transaction wrote to.
pub type Produced = BTreeMap<(String, i32), i64>;

/// A processing stage run by the loop: the processors, dispatch, or the bench passthrough.
pub trait Stage {
    /// Name used in group ids, transactional ids and store namespaces.
    fn name(&self) -> &'static str;
    /// Topics it consumes.
    fn input_topics(&self) -> Vec<String>;
    /// Rebuilds the state of a partition it now owns.
    fn restore(&mut self, partition: i32, reader: &LogReader) -> Result<()>;
    /// Forgets the state of a partition it no longer owns.
    fn revoke(&mut self, partition: i32);
    /// Forgets everything (after an aborted transaction); state is restored again on demand.
    fn reset(&mut self);
    /// Whether the stage holds state for a partition.
    fn owns(&self, partition: i32) -> bool;
    /// Input positions (topic, next offset) the stage already decided for a partition; the
    /// loop seeks there after restore when the broker's committed offset is behind.
    fn resume_positions(&self, _partition: i32) -> Vec<(String, i64)> {
        Vec::new()
    }
    /// Handles one input record. `Err` is fatal: the transaction is aborted and the loop stops.
    fn handle(&mut self, msg: &OwnedMessage, out: &mut Outbox) -> Result<()>;
    /// Called before each batch: brings tables read whole (inventory) up to date.
    fn refresh_tables(&mut self, _reader: &LogReader) -> Result<()> {
        Ok(())
    }
    /// Whether a batch should run even with no records: a wall-clock tick has timers to fire.
    fn tick_due(&self) -> bool {
        false
    }
    /// Called once per batch after every record: timers, batched provider calls.
    fn end_of_batch(&mut self, out: &mut Outbox) -> Result<()>;
    /// Called after the transaction committed, with the positions it wrote.
    fn committed(&mut self, produced: &Produced) -> Result<()>;
}

/// Reads a log partition from an offset to its end (read_committed), for restore.
pub struct LogReader {
    consumer: BaseConsumer<EndOfLogIsExpected>,
}

impl LogReader {
    /// A reader with these settings' connection and security options.
    pub fn new(settings: &KafkaSettings) -> Result<Self> {
        Ok(LogReader {
            consumer: settings.log_reader()?,
        })
    }

    /// Feeds every record of `topic`/`partition` from `from` to the end; returns the next offset.
    pub fn read(
        &self,
        topic: &str,
        partition: i32,
        from: i64,
        mut f: impl FnMut(&OwnedMessage) -> Result<()>,
    ) -> Result<i64> {
        // End of partition alone is not the end: a reader may see it before everything up to
        // the high watermark taken now was fetched. Done means the position reached it.
        let (low, high) = watermarks(&self.consumer, topic, partition)?;
        // Retention may have deleted where the reader stopped: what is left starts at `low`.
        let from = from.max(low);
        let mut next = from;
        if from >= high {
            return Ok(from.max(next));
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(from))?;
        self.consumer.assign(&tpl)?;
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if Instant::now() > deadline {
                bail!("restoring {topic}/{partition}: end of log not reached in 300 s");
            }
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    let owned = m.detach();
                    next = owned.offset() + 1;
                    f(&owned)?;
                    if next >= high {
                        break;
                    }
                }
                // Only the end-of-partition event, queued after the records, makes the position
                // trustworthy; an empty poll may still have records prefetched.
                Some(Err(KafkaError::PartitionEOF(p))) if p == partition => {
                    if position_of(&self.consumer, topic, partition)? >= high {
                        break;
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) | None => {}
                // A broker that died or restarts: librdkafka reconnects, the deadline bounds it.
                Some(Err(e)) if passes(&e) => {
                    tracing::debug!(error = %e, topic, partition, "reader waits for the broker")
                }
                Some(Err(e)) => bail!("restoring {topic}/{partition}: {e}"),
            }
        }
        self.consumer.unassign()?;
        // Transaction markers occupy offsets too: the next record is at or after the watermark.
        Ok(next.max(high))
    }
}

impl LogReader {
    /// The offset the next record of `topic`/`partition` will get.
    pub fn end(&self, topic: &str, partition: i32) -> Result<i64> {
        Ok(watermarks(&self.consumer, topic, partition)?.1)
    }

    /// The record at `offset` of `topic`/`partition`, if the log holds one there.
    pub fn read_at(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Result<Option<OwnedMessage>> {
        let mut found = None;
        let (_, high) = watermarks(&self.consumer, topic, partition)?;
        if offset >= high {
            return Ok(None);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
        self.consumer.assign(&tpl)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    if m.offset() == offset {
                        found = Some(m.detach());
                    }
                    break;
                }
                Some(Err(KafkaError::PartitionEOF(_))) | None => {
                    if position_of(&self.consumer, topic, partition)? >= high {
                        break;
                    }
                }
                Some(Err(e)) if passes(&e) => {
                    tracing::debug!(error = %e, topic, partition, "reader waits for the broker")
                }
                Some(Err(e)) => {
                    self.consumer.unassign()?;
                    bail!("reading {topic}/{partition}@{offset}: {e}");
                }
            }
        }
        self.consumer.unassign()?;
        Ok(found)
    }
}

/// Whether a consumer error is one librdkafka recovers from by itself (a lost connection, a
/// leader moving), so that a reader goes on waiting rather than fail.
pub fn passes(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::OperationTimedOut
                | RDKafkaErrorCode::NetworkException
                | RDKafkaErrorCode::NotCoordinator
                | RDKafkaErrorCode::CoordinatorNotAvailable
                | RDKafkaErrorCode::FencedLeaderEpoch
                | RDKafkaErrorCode::UnknownLeaderEpoch
                | RDKafkaErrorCode::OffsetNotAvailable
                | RDKafkaErrorCode::DestroyBroker
        )
    )
}

/// The low and high watermarks of `topic`/`partition`. A partition whose leader is moving (a
/// broker died or restarts) answers errors for a while: those are waited out, for up to a
/// minute; an unknown topic or a refused permission is an error at once.
pub fn watermarks<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
) -> Result<(i64, i64)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut backoff = Duration::from_millis(100);
    loop {
        match consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)) {
            Ok(w) => return Ok(w),
            Err(e) => {
                let hopeless = matches!(
                    e.rdkafka_error_code(),
                    Some(
                        RDKafkaErrorCode::UnknownTopicOrPartition
                            | RDKafkaErrorCode::UnknownTopic
                            | RDKafkaErrorCode::UnknownPartition
                            | RDKafkaErrorCode::TopicAuthorizationFailed
                    )
                );
                if hopeless || Instant::now() > deadline {
                    return Err(anyhow!(e))
                        .with_context(|| format!("where {topic}/{partition} ends"));
                }
                tracing::debug!(error = %e, topic, partition, "watermarks not available yet; retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// The consumer's current position in one partition (-1 when it has none yet).
pub fn position_of<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
) -> Result<i64> {
    let pos = consumer.position()?;
    Ok(pos
        .find_partition(topic, partition)
        .and_then(|e| match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        })
        .unwrap_or(-1))
}

#[derive(Debug)]
enum RebalanceEvent {
    Assigned(Vec<(String, i32)>),
    Revoked(Vec<(String, i32)>),
}

/// Records rebalances so the loop can restore and drop state between batches.
#[derive(Default)]
struct RebalanceLog {
    events: Mutex<Vec<RebalanceEvent>>,
    /// The consumer group state from the client's latest statistics, for `/readyz`.
    group: Mutex<Option<GroupReport>>,
}

/// The part of librdkafka's statistics readiness needs.
#[derive(serde::Deserialize)]
struct GroupStatistics {
    cgrp: Option<GroupStatisticsEntry>,
}

#[derive(serde::Deserialize)]
struct GroupStatisticsEntry {
    state: String,
    join_state: String,
}

impl ClientContext for RebalanceLog {
    fn stats_raw(&self, statistics: &[u8]) {
        if let Ok(GroupStatistics { cgrp: Some(g) }) = serde_json::from_slice(statistics) {
            if let Ok(mut slot) = self.group.lock() {
                *slot = Some(GroupReport {
                    state: g.state,
                    join_state: g.join_state,
                    at: Instant::now(),
                });
            }
        }
    }
}

impl RebalanceLog {
    fn take_group_report(&self) -> Option<GroupReport> {
        self.group.lock().ok().and_then(|mut g| g.take())
    }
}

fn tpl_list(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

impl ConsumerContext for RebalanceLog {
    fn pre_rebalance(&self, _c: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = r {
            if let Ok(mut e) = self.events.lock() {
                e.push(RebalanceEvent::Revoked(tpl_list(tpl)));
            }
        }
    }
    fn post_rebalance(&self, _c: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = r {
            if let Ok(mut e) = self.events.lock() {
                e.push(RebalanceEvent::Assigned(tpl_list(tpl)));
            }
        }
    }
}

/// Runs a stage until `stop` is set; the transaction in flight is finished first.
pub fn run_stage<S: Stage>(
    settings: &KafkaSettings,
    stage: &mut S,
    stop: &AtomicBool,
    metrics: &Metrics,
    rt: &tokio::runtime::Handle,
) -> Result<()> {
    metrics.readiness.phase(stage.name(), StagePhase::Starting);
    let result = consume(settings, stage, stop, metrics, rt);
    metrics.readiness.phase(stage.name(), StagePhase::Stopped);
    result
}

/// The body of `run_stage`: clients, then the consume loop.
fn consume<S: Stage>(
    settings: &KafkaSettings,
    stage: &mut S,
    stop: &AtomicBool,
    metrics: &Metrics,
    rt: &tokio::runtime::Handle,
) -> Result<()> {
    let group = format!("{}-{}", settings.group_prefix, stage.name());
    let client_id = format!(
        "{}-{}-{}",
        settings.group_prefix,
        stage.name(),
        settings.instance_id
    );
    let session = settings.session_timeout_ms.to_string();
    let heartbeat = (settings.session_timeout_ms / 3)
        .clamp(100, 1000)
        .to_string();
    let mut specific = vec![
        (
            "partition.assignment.strategy",
            settings.assignment_strategy.as_str(),
        ),
        ("session.timeout.ms", session.as_str()),
        ("heartbeat.interval.ms", heartbeat.as_str()),
        // A lane the broker says is behind holds its partition until its next fetch answers;
        // a broker that parks an empty fetch for its whole wait (as librdkafka's mock cluster
        // does) would stall it that long. `--kafka-config` can raise it.
        ("fetch.wait.max.ms", FETCH_WAIT_MS),
        // Group state for `/readyz`, reported by the client every second.
        ("statistics.interval.ms", "1000"),
    ];
    if settings.static_membership {
        specific.push(("group.instance.id", client_id.as_str()));
    }
    let cc = settings.consumer_config(&group, &client_id, &specific);
    let consumer: BaseConsumer<RebalanceLog> = cc
        .create_with_context(RebalanceLog::default())
        .context("cannot create Kafka consumer")?;
    let topics = stage.input_topics();
    let (lead, companions) = topics
        .split_first()
        .ok_or_else(|| anyhow!("stage {} reads no topic", stage.name()))?;
    // Only the lead topic is subscribed, so any assignor (cooperative-sticky included) hands
    // out whole partitions: the companion topics' same-numbered partitions follow by manual
    // assignment. That is what keeps one customer's whole history on one task.
    consumer.subscribe(&[lead.as_str()])?;
    let companion_config = settings.consumer_config(
        &group,
        &format!("{client_id}-companions"),
        &[("fetch.wait.max.ms", FETCH_WAIT_MS)],
    );
    let inputs = Inputs {
        group: consumer,
        companions: companion_config
            .create_with_context(EndOfLogIsExpected)
            .context("cannot create Kafka consumer for companion topics")?,
        probe: settings
            .consumer_config(&group, &format!("{client_id}-probe"), &[])
            .create_with_context(EndOfLogIsExpected)
            .context("cannot create Kafka client for lane checks")?,
        stale_positions: Default::default(),
        lead: lead.to_string(),
        companion_topics: companions.iter().map(|t| t.to_string()).collect(),
    };
    let txn_id = client_id.clone();
    let producer = settings.producer(settings.exactly_once.then_some(txn_id.as_str()))?;
    if settings.exactly_once {
        init_transactions(&producer, stop)?;
    }
    let reader = LogReader::new(settings)?;
    let mut owned: BTreeSet<i32> = BTreeSet::new();
    let mut intake: Intake<OwnedMessage> = Intake::new(settings.max_task_idle_ms, LANE_PAUSE_ABOVE);
    let clock = Instant::now();
    let now_ms = || clock.elapsed().as_millis() as u64;
    tracing::info!(
        stage = stage.name(),
        group,
        exactly_once = settings.exactly_once,
        "loop started"
    );

    while !stop.load(Ordering::SeqCst) {
        let mut batch: Vec<OwnedMessage> = Vec::new();
        let started = Instant::now();
        // A transaction costs round trips to the coordinator: fill the batch for up to 50 ms.
        while batch.len() < settings.batch_size && started.elapsed() < Duration::from_millis(50) {
            let wait = if intake.len() > settings.batch_size {
                Duration::ZERO
            } else {
                Duration::from_millis(10)
            };
            for m in inputs.poll(wait, settings)? {
                intake.push(m, now_ms());
            }
            apply_rebalances(
                &inputs,
                stage,
                &mut owned,
                &mut intake,
                &now_ms,
                &mut batch,
                &reader,
                metrics,
            )?;
            if let Some(report) = inputs.group.context().take_group_report() {
                metrics.readiness.group(stage.name(), report);
            }
            metrics.readiness.phase(stage.name(), StagePhase::Consuming);
            check_lanes(&inputs, &mut intake, &now_ms);
            while batch.len() < settings.batch_size {
                match intake.next(now_ms()) {
                    Some(m) => batch.push(m),
                    None => break,
                }
            }
            inputs.apply_flow(intake.flow());
            if stop.load(Ordering::SeqCst) {
                break;
            }
        }
        if batch.is_empty() && !stage.tick_due() {
            continue;
        }
        let result = run_batch(
            settings,
            stage,
            &inputs.group,
            &producer,
            &batch,
            &reader,
            metrics,
            rt,
        );
        match result {
            Ok(()) => {}
            Err(BatchError::Abortable(why)) => {
                tracing::warn!(error = %why, "transaction aborted; rewinding to the last commit");
                Metrics::inc(&metrics.aborted_transactions, 1);
                if settings.exactly_once {
                    producer
                        .abort_transaction(Duration::from_secs(30))
                        .context("abort_transaction")?;
                }
                stage.reset();
                let starts = inputs.rewind()?;
                intake.clear(now_ms());
                for (topic, p, start) in starts {
                    if intake.is_open(&topic, p) {
                        intake.open(&topic, p, Some(start), now_ms());
                        inputs.opened(&topic, p);
                    }
                }
            }
            Err(BatchError::Fatal(e)) => {
                if settings.exactly_once {
                    let _ = producer.abort_transaction(Duration::from_secs(10));
                }
                return Err(e);
            }
        }
    }
    tracing::info!(stage = stage.name(), "stopping: no transaction in flight");
    inputs.group.unsubscribe();
    Ok(())
}

/// Registers the transactional id (fencing any earlier producer under it), waiting out a
/// coordinator that is moving or a broker that is down, as long as the process is not asked
/// to stop.
fn init_transactions(producer: &FutureProducer, stop: &AtomicBool) -> Result<()> {
    let mut backoff = Duration::from_millis(500);
    loop {
        match producer.init_transactions(Duration::from_secs(30)) {
            Ok(()) => return Ok(()),
            Err(KafkaError::Transaction(e)) if e.is_retriable() && !stop.load(Ordering::SeqCst) => {
                tracing::warn!(error = %e, "the transaction coordinator is not available yet; retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(e) => {
                return Err(anyhow!(e)).context(
                    "init_transactions failed: does the broker support transactions? (use at-least-once mode if not)",
                )
            }
        }
    }
}

/// Restores state for partitions of the lead topic just assigned, with their companion topics,
/// and drops it for the revoked ones.
#[allow(clippy::too_many_arguments)]
fn apply_rebalances<S: Stage>(
    inputs: &Inputs,
    stage: &mut S,
    owned: &mut BTreeSet<i32>,
    intake: &mut Intake<OwnedMessage>,
    now_ms: &dyn Fn() -> u64,
    batch: &mut Vec<OwnedMessage>,
    reader: &LogReader,
    metrics: &Metrics,
) -> Result<()> {
    let events: Vec<RebalanceEvent> = match inputs.group.context().events.lock() {
        Ok(mut e) => std::mem::take(&mut *e),
        Err(_) => bail!("rebalance log poisoned"),
    };
    for ev in events {
        match ev {
            RebalanceEvent::Revoked(list) => {
                for (_, p) in list {
                    inputs.unassign_companions(p)?;
                    for topic in inputs.all_topics() {
                        intake.close(topic, p);
                    }
                    if owned.remove(&p) {
                        stage.revoke(p);
                        tracing::info!(partition = p, "partition revoked; state dropped");
                    }
                    // Records fetched before the revoke belong to the next owner now.
                    batch.retain(|m| m.partition() != p);
                }
            }
            RebalanceEvent::Assigned(list) => {
                for (_, p) in list {
                    if !owned.insert(p) {
                        continue;
                    }
                    if !stage.owns(p) {
                        let t = Instant::now();
                        metrics
                            .readiness
                            .phase(stage.name(), StagePhase::Restoring { partition: p });
                        stage.restore(p, reader)?;
                        Metrics::inc(&metrics.restored_partitions, 1);
                        tracing::info!(
                            partition = p,
                            ms = t.elapsed().as_millis() as u64,
                            "partition assigned; state restored"
                        );
                    }
                    // Skip what the decision log shows as decided; records below it are also
                    // filtered by the stage, so a failed seek costs time, not correctness.
                    let starts: BTreeMap<String, i64> =
                        stage.resume_positions(p).into_iter().collect();
                    inputs.assign_companions(p, &starts)?;
                    if let Some(next) = starts.get(&inputs.lead) {
                        if let Err(e) = inputs.group.seek(
                            &inputs.lead,
                            p,
                            Offset::Offset(*next),
                            Duration::from_secs(5),
                        ) {
                            tracing::debug!(partition = p, error = %e, "seek after restore not possible yet");
                        }
                    }
                    // The lanes' patience starts now, after the restore, not at the assignment.
                    for topic in inputs.all_topics() {
                        let start = match starts.get(topic) {
                            Some(s) => Some(*s),
                            None => inputs.start_of(topic, p),
                        };
                        intake.open(topic, p, start, now_ms());
                        inputs.opened(topic, p);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Asks the broker where the empty lanes that hold a partition back stand against their ends,
/// in one request, and tells the intake. Asked after the partition's latest arrival, "at the
/// end" proves that nothing written before that arrival is still to come on the lane.
fn check_lanes(inputs: &Inputs, intake: &mut Intake<OwnedMessage>, now_ms: &dyn Fn() -> u64) {
    let lanes = intake.to_check(now_ms());
    if lanes.is_empty() {
        return;
    }
    let asked_at = now_ms();
    let ends = inputs.ends(&lanes);
    let positions = inputs.positions();
    for (topic, p, next) in lanes {
        // The consumer's own position steps over transaction markers; the lane's next offset
        // stands in before the consumer has handed anything over, and wins when it is further
        // (a lead partition whose seek to the resume position failed re-reads decided records).
        let reported = positions
            .get(&(topic.clone(), p))
            .copied()
            .filter(|at| !inputs.is_stale(&topic, p, *at));
        let position = reported.max(next);
        let lag = match (position, ends.get(&(topic.clone(), p))) {
            (Some(at), Some(end)) if at >= *end => Lag::AtEnd,
            (Some(_), Some(_)) => Lag::Behind,
            _ => Lag::Unknown,
        };
        tracing::debug!(topic, partition = p, ?position, end = ?ends.get(&(topic.clone(), p)), ?lag, "lane checked");
        intake.checked(&topic, p, asked_at, lag);
    }
}

/// How many records one poll of the inputs takes from each consumer without waiting: a lane
/// that catches up holds its partition back, so it must be drained as fast as it is fetched.
const POLL_BURST: usize = 1024;

/// How long a stage consumer's fetch may wait at the broker for data (librdkafka's default is
/// 500 ms).
const FETCH_WAIT_MS: &str = "50";

/// The two consumers a stage reads with: the group member for the lead topic, and a
/// manually assigned one for the companion topics' partitions that follow it.
struct Inputs {
    group: BaseConsumer<RebalanceLog>,
    companions: BaseConsumer<EndOfLogIsExpected>,
    /// Asks where lanes end. It never fetches: a broker answers one connection's requests in
    /// order, so on a consumer's connection the question would wait out a parked fetch.
    probe: BaseConsumer<EndOfLogIsExpected>,
    /// The position each consumer reported for a lane when it was (re)opened. librdkafka
    /// forgets a partition's position only once its unassign or seek has been processed, so
    /// until then it reports where the previous assignment had read to, which may be past
    /// records the new one has yet to hand over.
    stale_positions: std::cell::RefCell<HashMap<(String, i32), i64>>,
    lead: String,
    companion_topics: Vec<String>,
}

impl Inputs {
    fn all_topics(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.lead).chain(self.companion_topics.iter())
    }

    fn is_lead(&self, topic: &str) -> bool {
        topic == self.lead
    }

    /// Records from both consumers; waits up to `wait` on the group member, which also serves
    /// the rebalance callbacks. An error no retry can mend (a setting the broker refuses, a
    /// missing permission) stops the stage naming what to change.
    fn poll(&self, wait: Duration, settings: &KafkaSettings) -> Result<Vec<OwnedMessage>> {
        let mut got = Vec::new();
        let mut fatal = None;
        let mut take = |r: Option<KafkaResult<OwnedMessage>>| match r {
            Some(Ok(m)) => got.push(m),
            Some(Err(KafkaError::PartitionEOF(_))) | None => {}
            Some(Err(e)) => match needs_an_operator(&e, settings) {
                Some(why) => fatal = Some(why),
                None => tracing::warn!(error = %e, "consumer error (librdkafka retries)"),
            },
        };
        take(self.group.poll(wait).map(|r| r.map(|m| m.detach())));
        for _ in 0..POLL_BURST {
            match self.group.poll(Duration::ZERO) {
                None => break,
                r => take(r.map(|r| r.map(|m| m.detach()))),
            }
        }
        if !self.companion_topics.is_empty() {
            for _ in 0..POLL_BURST {
                match self.companions.poll(Duration::ZERO) {
                    None => break,
                    r => take(r.map(|r| r.map(|m| m.detach()))),
                }
            }
        }
        match fatal {
            Some(why) => Err(why),
            None => Ok(got),
        }
    }

    /// Assigns partition `p` of every companion topic, from the stage's resume position when
    /// it has one and from the group's committed offset otherwise.
    fn assign_companions(&self, p: i32, starts: &BTreeMap<String, i64>) -> Result<()> {
        if self.companion_topics.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for t in &self.companion_topics {
            let offset = match starts.get(t) {
                Some(o) => Offset::Offset(*o),
                None => Offset::Stored,
            };
            tpl.add_partition_offset(t, p, offset)?;
        }
        self.companions
            .incremental_assign(&tpl)
            .with_context(|| format!("cannot assign companion partitions {p}"))?;
        Ok(())
    }

    fn unassign_companions(&self, p: i32) -> Result<()> {
        if self.companion_topics.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for t in &self.companion_topics {
            tpl.add_partition(t, p);
        }
        self.companions
            .incremental_unassign(&tpl)
            .with_context(|| format!("cannot unassign companion partitions {p}"))?;
        Ok(())
    }

    /// The end (last stable offset) of each lane, asked of the broker now; lanes it did not
    /// answer for are missing.
    fn ends(&self, lanes: &[(String, i32, Option<i64>)]) -> HashMap<(String, i32), i64> {
        let mut tpl = TopicPartitionList::new();
        for (topic, p, _) in lanes {
            if let Err(e) = tpl.add_partition_offset(topic, *p, Offset::End) {
                tracing::debug!(error = %e, topic, partition = p, "cannot ask for a lane's end");
            }
        }
        match self.probe.offsets_for_times(tpl, Duration::from_secs(2)) {
            Ok(answer) => answer
                .elements()
                .iter()
                .filter(|e| e.error().is_ok())
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some(((e.topic().to_string(), e.partition()), o)),
                    _ => None,
                })
                .collect(),
            Err(e) => {
                tracing::debug!(error = %e, "the broker did not say where the lanes end");
                HashMap::new()
            }
        }
    }

    /// Notes the position the consumer reports for a lane just (re)opened: until it changes,
    /// it belongs to the previous assignment.
    fn opened(&self, topic: &str, p: i32) {
        let key = (topic.to_string(), p);
        let now = self.positions().get(&key).copied();
        let mut stale = self.stale_positions.borrow_mut();
        match now {
            Some(at) => stale.insert(key, at),
            None => stale.remove(&key),
        };
    }

    /// Whether `at` is the position the consumer reported when the lane was opened.
    fn is_stale(&self, topic: &str, p: i32, at: i64) -> bool {
        self.stale_positions
            .borrow()
            .get(&(topic.to_string(), p))
            .is_some_and(|s| *s == at)
    }

    /// Each assigned lane's consume position, where the consumer knows it.
    fn positions(&self) -> HashMap<(String, i32), i64> {
        let mut out = HashMap::new();
        let group = self.group.position();
        let companions = if self.companion_topics.is_empty() {
            Ok(TopicPartitionList::new())
        } else {
            self.companions.position()
        };
        for tpl in [group, companions].into_iter().flatten() {
            for e in tpl.elements() {
                if let Offset::Offset(o) = e.offset() {
                    out.insert((e.topic().to_string(), e.partition()), o);
                }
            }
        }
        out
    }

    /// Where a lane with no resume position starts reading: the group's committed offset, or
    /// the start of the partition when the group has none (`auto.offset.reset=earliest`).
    /// None when the broker does not say.
    fn start_of(&self, topic: &str, p: i32) -> Option<i64> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, p);
        let consumer_committed = if self.is_lead(topic) {
            self.group.committed_offsets(tpl, Duration::from_secs(5))
        } else {
            self.companions
                .committed_offsets(tpl, Duration::from_secs(5))
        };
        let committed = consumer_committed
            .ok()?
            .elements()
            .first()
            .map(|e| e.offset());
        match committed {
            Some(Offset::Offset(o)) => Some(o),
            _ => self
                .probe
                .fetch_watermarks(topic, p, Duration::from_secs(5))
                .ok()
                .map(|(low, _)| low),
        }
    }

    /// Pauses and resumes fetching as the intake asks; a failure only costs memory, so it is
    /// logged.
    fn apply_flow(&self, change: FlowChange) {
        for (lanes, pause) in [(&change.pause, true), (&change.resume, false)] {
            for (topic, p) in lanes {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(topic, *p);
                let result = match (self.is_lead(topic), pause) {
                    (true, true) => self.group.pause(&tpl),
                    (true, false) => self.group.resume(&tpl),
                    (false, true) => self.companions.pause(&tpl),
                    (false, false) => self.companions.resume(&tpl),
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e, topic, partition = p, pause, "cannot pause or resume a lane");
                }
            }
        }
    }

    /// Seeks every assigned partition of both consumers back to the group's committed offset;
    /// returns the committed offsets it sought to.
    fn rewind(&self) -> Result<Vec<(String, i32, i64)>> {
        let committed = self
            .group
            .committed_offsets(self.group.assignment()?, Duration::from_secs(30))?;
        let mut sought = seek_to(&self.group, &committed)?;
        if !self.companion_topics.is_empty() {
            let committed = self
                .companions
                .committed_offsets(self.companions.assignment()?, Duration::from_secs(30))?;
            sought.extend(seek_to(&self.companions, &committed)?);
        }
        Ok(sought)
    }
}

/// Seeks to the committed offsets (the beginning where there is none); returns the committed
/// ones.
fn seek_to<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    committed: &TopicPartitionList,
) -> Result<Vec<(String, i32, i64)>> {
    let mut seek = TopicPartitionList::new();
    let mut sought = Vec::new();
    for e in committed.elements() {
        let offset = match e.offset() {
            Offset::Offset(o) => {
                sought.push((e.topic().to_string(), e.partition(), o));
                Offset::Offset(o)
            }
            _ => Offset::Beginning,
        };
        seek.add_partition_offset(e.topic(), e.partition(), offset)?;
    }
    consumer.seek_partitions(seek, Duration::from_secs(30))?;
    Ok(sought)
}

/// The consumer errors that retrying cannot mend, with the setting an operator must change.
fn needs_an_operator(e: &KafkaError, settings: &KafkaSettings) -> Option<anyhow::Error> {
    // A fatal error leaves the consumer unusable (e.g. a static member fenced by a rejoin under
    // its own group.instance.id while the group coordinator moved): polling it on would stall
    // the stage for ever, so it stops, and its supervisor starts it afresh.
    if let KafkaError::MessageConsumptionFatal(code) = e {
        return Some(anyhow!(
            "the Kafka consumer failed fatally ({code}); stopping so that a restart rejoins the group"
        ));
    }
    let code = e.rdkafka_error_code()?;
    let why = match code {
        RDKafkaErrorCode::InvalidSessionTimeout => format!(
            "the brokers refuse a session timeout of {} ms: set --session-timeout-ms \
             (HERALD_SESSION_TIMEOUT_MS) within their group.min.session.timeout.ms and \
             group.max.session.timeout.ms (6,000 and 1,800,000 by default)",
            settings.session_timeout_ms
        ),
        RDKafkaErrorCode::GroupAuthorizationFailed => format!(
            "the brokers do not let this principal use the consumer groups {}-*: grant READ on \
             them (or set --group-prefix to groups it may use)",
            settings.group_prefix
        ),
        RDKafkaErrorCode::TopicAuthorizationFailed => {
            "the brokers do not let this principal read Herald's topics: grant READ and WRITE \
             on them"
                .to_string()
        }
        _ => return None,
    };
    Some(anyhow!("{why} ({e})"))
}

enum BatchError {
    Abortable(anyhow::Error),
    Fatal(anyhow::Error),
}

fn kafka_error(e: KafkaError, what: &str) -> BatchError {
    let fatal = match &e {
        KafkaError::Transaction(t) => t.is_fatal() || !t.txn_requires_abort() && !t.is_retriable(),
        KafkaError::MessageProduction(RDKafkaErrorCode::ProducerFenced) => true,
        _ => false,
    };
    let err = anyhow!("{what}: {e}");
    if fatal {
        BatchError::Fatal(err)
    } else {
        BatchError::Abortable(err)
    }
}

#[allow(clippy::too_many_arguments)]
fn run_batch<S: Stage>(
    settings: &KafkaSettings,
    stage: &mut S,
    consumer: &BaseConsumer<RebalanceLog>,
    producer: &FutureProducer,
    batch: &[OwnedMessage],
    reader: &LogReader,
    metrics: &Metrics,
    rt: &tokio::runtime::Handle,
) -> Result<(), BatchError> {
    let t_start = Instant::now();
    // Outside the transaction, so that reading the inventory table never keeps one open. A
    // failed read is retried on a later batch; meanwhile guards see the table as it was, and
    // hold rather than send once its levels grow old.
    if let Err(e) = stage.refresh_tables(reader) {
        tracing::warn!(error = %e, "inventory table not refreshed; retrying on a later batch");
    }
    if settings.exactly_once {
        producer
            .begin_transaction()
            .map_err(|e| kafka_error(e, "begin_transaction"))?;
    }
    let mut out = Outbox::default();
    let mut offsets: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for msg in batch {
        if !stage.owns(msg.partition()) {
            metrics.readiness.phase(
                stage.name(),
                StagePhase::Restoring {
                    partition: msg.partition(),
                },
            );
            stage
                .restore(msg.partition(), reader)
                .map_err(BatchError::Abortable)?;
            metrics.readiness.phase(stage.name(), StagePhase::Consuming);
        }
        stage.handle(msg, &mut out).map_err(BatchError::Fatal)?;
        offsets.insert((msg.topic().to_string(), msg.partition()), msg.offset() + 1);
    }
    stage.end_of_batch(&mut out).map_err(BatchError::Fatal)?;
    Metrics::inc(&metrics.records_in, batch.len() as u64);

    let mut pending = Vec::with_capacity(out.records.len());
    for r in &out.records {
        let mut headers = OwnedHeaders::new();
        for (k, v) in &r.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let record = FutureRecord::to(&r.topic)
            .partition(r.partition)
            .key(&r.key)
            .headers(headers);
        let mut record = if r.value.is_empty() {
            record
        } else {
            record.payload(&r.value)
        };
        loop {
            match producer.send_result(record) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(kafka_error(e, "produce")),
            }
        }
    }
    let t_handled = Instant::now();
    let mut produced: Produced = BTreeMap::new();
    let deliveries = rt.block_on(futures::future::join_all(pending));
    for (d, r) in deliveries.into_iter().zip(&out.records) {
        match d {
            Ok(Ok(delivery)) => {
                let next = produced
                    .entry((r.topic.to_string(), delivery.partition))
                    .or_insert(0);
                *next = (*next).max(delivery.offset + 1);
            }
            Ok(Err((e, _))) => return Err(kafka_error(e, "delivery")),
            Err(_) => return Err(BatchError::Abortable(anyhow!("delivery report lost"))),
        }
    }

    let mut tpl = TopicPartitionList::new();
    for ((topic, p), next) in &offsets {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*next))
            .map_err(|e| kafka_error(e, "offsets"))?;
    }
    if tpl.count() == 0 {
        // A tick's batch: output only, no input positions to move.
        if settings.exactly_once {
            producer
                .commit_transaction(Duration::from_secs(30))
                .map_err(|e| kafka_error(e, "commit_transaction"))?;
        }
    } else if settings.exactly_once {
        pause_here_if_asked(metrics);
        let meta = consumer
            .group_metadata()
            .ok_or_else(|| BatchError::Abortable(anyhow!("no consumer group metadata yet")))?;
        producer
            .send_offsets_to_transaction(&tpl, &meta, Duration::from_secs(30))
            .map_err(|e| kafka_error(e, "send_offsets_to_transaction"))?;
        crash_here_if_asked(metrics);
        producer
            .commit_transaction(Duration::from_secs(30))
            .map_err(|e| kafka_error(e, "commit_transaction"))?;
    } else {
        consumer
            .commit(&tpl, CommitMode::Sync)
            .map_err(|e| BatchError::Abortable(anyhow!("offset commit: {e}")))?;
    }
    Metrics::inc(&metrics.transactions, 1);
    let t_committed = Instant::now();
    stage.committed(&produced).map_err(BatchError::Fatal)?;
    tracing::debug!(
        records = batch.len(),
        produced = out.records.len(),
        handle_ms = (t_handled - t_start).as_millis() as u64,
        commit_ms = (t_committed - t_handled).as_millis() as u64,
        store_ms = t_committed.elapsed().as_millis() as u64,
        "batch committed"
    );
    Ok(())
}

/// Fault injection for the crash tests: `HERALD_FAULT_CRASH_BEFORE_COMMIT=N` aborts the process
/// with everything of the N-th transaction produced and nothing committed.
fn crash_here_if_asked(metrics: &Metrics) {
    static AT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| {
        std::env::var("HERALD_FAULT_CRASH_BEFORE_COMMIT")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    if let Some(n) = at {
        if metrics.transactions.load(Ordering::SeqCst) + 1 >= *n {
            eprintln!("herald: fault injection: aborting before commit of transaction {n}");
            std::process::abort();
        }
    }
}

/// Fault injection for the fencing test: `HERALD_FAULT_PAUSE_BEFORE_OFFSETS=N` stops the
/// process (SIGSTOP, as a long GC pause or a frozen VM would) once, with the N-th transaction's
/// records produced and its input offsets not yet sent; SIGCONT resumes it there, a zombie.
fn pause_here_if_asked(metrics: &Metrics) {
    static AT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    static DONE: AtomicBool = AtomicBool::new(false);
    let at = AT.get_or_init(|| {
        std::env::var("HERALD_FAULT_PAUSE_BEFORE_OFFSETS")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    if let Some(n) = at {
        if metrics.transactions.load(Ordering::SeqCst) + 1 >= *n
            && !DONE.swap(true, Ordering::SeqCst)
        {
            eprintln!("herald: fault injection: pausing inside transaction {n}");
            extern "C" {
                fn kill(pid: i32, sig: i32) -> i32;
            }
            const SIGSTOP: i32 = 19;
            // SAFETY: signals this process itself; SIGSTOP only suspends it.
            unsafe {
                kill(std::process::id() as i32, SIGSTOP);
            }
        }
    }
}

/// Creates Herald's topics on a librdkafka mock cluster (whose admin API is not usable).
pub fn create_topics_on_mock<C: ClientContext>(
    cluster: &rdkafka::mocking::MockCluster<'_, C>,
    topology: &crate::topology::Topology,
) -> Result<()> {
    for t in &topology.topics {
        cluster
            .create_topic(&t.name, t.partitions, 1)
            .with_context(|| format!("creating {} on the mock cluster", t.name))?;
    }
    Ok(())
}

/// Headers that say where a record came from.
pub fn provenance(msg: &OwnedMessage) -> Vec<(&'static str, Vec<u8>)> {
    provenance_of(msg.topic(), msg.partition(), msg.offset())
}

/// The provenance headers of a record at `topic`/`partition`@`offset`.
pub fn provenance_of(topic: &str, partition: i32, offset: i64) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("herald.source.topic", topic.as_bytes().to_vec()),
        (
            "herald.source.partition",
            partition.to_string().into_bytes(),
        ),
        ("herald.source.offset", offset.to_string().into_bytes()),
    ]
}

/// A shared flag set on SIGTERM or Ctrl-C.
pub fn stop_on_signal(rt: &tokio::runtime::Handle) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    rt.spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            if let Ok(mut term) = signal(SignalKind::terminate()) {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            } else {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("stop requested; finishing the transaction in flight");
        flag.store(true, Ordering::SeqCst);
    });
    stop
}

/// Keeps a store handle shareable across stages.
pub type SharedStore = Arc<dyn StateStore>;
