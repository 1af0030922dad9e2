//! How Herald reaches Kafka: settings from flags, a properties file and the environment (secrets
//! never shown), the connection check that names what is wrong, and the client contexts.

use anyhow::{anyhow, Context, Result};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureProducer;
use rdkafka::ClientContext;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long, by default, an input topic with nothing buffered may hold its partition back
/// (Kafka Streams' max.task.idle.ms).
pub const MAX_TASK_IDLE_MS: u64 = 250;

/// How often, by default, the processors save changed customers to the state store (Kafka
/// Streams flushes its stores on commit, every 100 ms under exactly-once; a second keeps
/// the replay after a crash short and writes a busy customer once per second, not per batch).
pub const CHECKPOINT_MS: u64 = 1_000;
/// How many customers' states the processors keep in memory by default: at about 8 KB each in
/// memory, some 800 MB per process.
pub const STATE_CACHE_CUSTOMERS: usize = 100_000;

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
            max_task_idle_ms: MAX_TASK_IDLE_MS,
            extra: vec![],
            static_membership: false,
            session_timeout_ms: 10_000,
            group_prefix: "herald".into(),
        }
    }

    pub(crate) fn base(&self) -> ClientConfig {
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
            // 1 ms on the stages' producers made more, smaller requests: handling slowed
            // by more than the shorter wait for the batch's last deliveries saved (herald
            // bench, mock cluster: 15,100-15,200 end-to-end events/s against 18,600-22,600).
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
pub(crate) struct ConnectionProbe {
    pub(crate) errors: Mutex<Vec<(KafkaError, String)>>,
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
pub(crate) fn explain_connection_failure(
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
