//! The `herald` command line.

use crate::email::EmailClient;
use crate::events::Channel;
use crate::kafka::{self, KafkaSettings};
use crate::provider::{CloudApiClient, Providers};
use crate::registry::Codec;
use crate::sms::SmsClient;
use crate::stages::{DispatchStage, ProcessorStage};
use crate::store::StoreAddress;
use crate::telemetry::{self, Metrics};
use crate::topology::Topology;
use crate::{bench, demo};
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Herald governs a brand's WhatsApp messaging from Kafka events.
#[derive(Parser, Debug)]
#[command(name = "herald", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Runs the whole system on this machine with nothing installed and plays a scenario.
    Demo {
        /// Customers in the scenario (about 12 events each).
        #[arg(long, default_value_t = 10_000)]
        customers: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// End with one JSON line instead of the readable summary.
        #[arg(long)]
        json: bool,
        /// Stay up after the scenario and print the addresses for ordinary Kafka clients.
        #[arg(long)]
        keep_running: bool,
        /// After the run, write the inputs, stock levels and decisions to this dump file
        /// (`.jsonl` or `.avro`) for `herald replay`.
        #[arg(long)]
        record: Option<PathBuf>,
        /// Keep the processors' state store in this directory (`state.redb`) instead of a
        /// temporary one, e.g. for `herald rebuild --verify`.
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Folds every customer's state again from the decision log, from offset 0, into a fresh
    /// store directory or keyspace, and prints a digest of the result; sends nothing.
    Rebuild {
        #[command(flatten)]
        source: LogSource,
        /// Where to rebuild: a directory for a new embedded store (`state.redb`), or a
        /// `scylla://HOST:PORT/KEYSPACE` address; it must hold no state yet.
        #[arg(long)]
        into: String,
        /// Partitions folded at once; the digest does not depend on it.
        #[arg(long, default_value_t = 2)]
        parallelism: usize,
        /// A live store to compare with (a `state.redb` file or a scylla:// address): exits 1
        /// if the digests differ.
        #[arg(long)]
        verify: Option<StoreAddress>,
        #[arg(long)]
        json: bool,
    },
    /// A customer's projected state from the store: consent by purpose and channel, session
    /// window, recent sends, journeys, orders, and consent history.
    State {
        #[arg(long)]
        customer: String,
        /// The store: a `state.redb` file or a `scylla://HOST:PORT/KEYSPACE` address.
        #[arg(long, env = "HERALD_STORE")]
        store: StoreAddress,
        #[command(flatten)]
        topology: TopologyArgs,
        #[arg(long)]
        json: bool,
    },
    /// Backtests a policy: runs a topic dump's events through the policy and journeys of DIR,
    /// with no Kafka, and prints how the decisions differ from the ones recorded in the dump.
    Replay {
        /// Dump files (`.jsonl` or `.avro`), from `herald export` or `herald demo --record`;
        /// repeat for several.
        #[arg(long = "events", required = true)]
        events: Vec<PathBuf>,
        /// Topology directory with the policy to try (policy.toml, templates.toml, journeys/).
        #[arg(long)]
        policy: PathBuf,
        /// Customers whose first difference is shown.
        #[arg(long, default_value_t = 10)]
        show: usize,
        /// Show every decision count, not only those that changed.
        #[arg(long)]
        all: bool,
        /// Print one JSON object instead of the readable report.
        #[arg(long)]
        json: bool,
        /// Exit 1 when any customer is decided differently (for a policy change's CI).
        #[arg(long)]
        fail_on_difference: bool,
        /// The key the live processors hash phone numbers and e-mail addresses under; the
        /// replay must use the same one to reproduce their decisions. The default is the
        /// demo's key, for the demo's recordings.
        #[arg(long, env = "HERALD_IDENTIFIER_KEY", hide_env_values = true, default_value = crate::identity::DEMO_KEY)]
        identifier_key: String,
    },
    /// The dead-letter topic: list its records, or replay them to where they came from.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Consent audit: a customer's consent timeline, and the hash chain check of every customer's.
    Audit {
        #[command(subcommand)]
        action: AuditAction,
    },
    /// Writes the inputs, stock levels and decisions of a cluster to a dump file for `herald replay`.
    Export {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// The dump file: `.jsonl` (JSON lines) or `.avro` (Avro container).
        #[arg(long)]
        out: PathBuf,
    },
    /// Measures core, end-to-end and passthrough throughput; prints one JSON line.
    Bench {
        #[arg(long, default_value_t = 5_000)]
        customers: usize,
        /// Measure end to end and pass-through on these real brokers (their Herald topics
        /// empty) instead of the in-process cluster.
        #[arg(long)]
        bootstrap: Option<String>,
        #[command(flatten)]
        security: KafkaSecurityArgs,
    },
    /// Proves crash safety: runs the processors and dispatch as separate processes on an
    /// in-process cluster (or real brokers with --bootstrap), SIGKILLs one every few seconds
    /// (and a broker now and then, when told how) while the scenario is fed, and prints one
    /// line of checks (all must be 0; exits 1 otherwise).
    Chaos {
        /// Customers in the scenario (about 15 events each; 13,500 give over 200,000 events).
        #[arg(long, default_value_t = 13_500)]
        customers: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Time between two SIGKILLs (processors and dispatch take turns).
        #[arg(long, default_value_t = 4_000)]
        kill_every_ms: u64,
        /// Which processes to kill.
        #[arg(long, value_enum, default_value = "both")]
        kill: crate::chaos::Victims,
        /// Share of provider answers the simulator withholds although the message went out.
        #[arg(long, default_value_t = 0.05)]
        drop_answers: f64,
        /// Print the result as one JSON line.
        #[arg(long)]
        json: bool,
        /// Run on these real brokers instead of the in-process cluster (`host:port,...`); the
        /// topics are created on them with `herald topics apply`'s admin path.
        #[arg(long)]
        bootstrap: Option<String>,
        #[command(flatten)]
        security: KafkaSecurityArgs,
        /// A shell command that SIGKILLs broker `{node}`, e.g. `scripts/kafka kill-node --dir
        /// DIR --node {node}`; with --start-broker-cmd, the leader of a decision-log partition
        /// is killed and restarted during the run.
        #[arg(long, requires_all = ["bootstrap", "start_broker_cmd"])]
        kill_broker_cmd: Option<String>,
        /// The shell command that starts broker `{node}` again and waits until it is up.
        #[arg(long, requires = "kill_broker_cmd")]
        start_broker_cmd: Option<String>,
        /// Time between two broker kills.
        #[arg(long, default_value_t = 60)]
        broker_kill_every_secs: u64,
        /// How long a killed broker stays down.
        #[arg(long, default_value_t = 10)]
        broker_down_secs: u64,
    },
    /// Runs the processors and/or dispatch against a Kafka cluster, a registry and a store.
    Run(Box<RunArgs>),
    /// Topic administration.
    Topics {
        #[command(subcommand)]
        action: TopicsAction,
    },
    /// Schema administration.
    Schemas {
        #[command(subcommand)]
        action: SchemasAction,
    },
    /// Serves Herald's schema registry subset (for local development and tests).
    Registry {
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
    },
    /// Serves the webhook endpoint the WhatsApp Cloud API posts to: verifies each webhook's
    /// signature, turns statuses, inbound messages and template changes into provider events,
    /// and answers 200 once Kafka has acknowledged them.
    Gateway(Box<GatewayArgs>),
    /// Serves the provider simulator: the WhatsApp Cloud API, the SMS provider and the e-mail
    /// provider, with their limits, failures and signed status callbacks (for local
    /// development and load tests).
    Simulator(Box<SimulatorArgs>),
}

/// Settings of `herald simulator`.
#[derive(Args, Debug)]
pub struct SimulatorArgs {
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    /// Where to post signed WhatsApp status webhooks (the gateway's `/webhook`).
    #[arg(long)]
    pub webhook_url: Option<String>,
    /// The app secret WhatsApp webhooks are signed with.
    #[arg(
        long,
        env = "HERALD_APP_SECRET",
        hide_env_values = true,
        default_value = ""
    )]
    pub app_secret: String,
    /// The SMS auth token status callbacks are signed with.
    #[arg(
        long,
        env = "HERALD_SMS_AUTH_TOKEN",
        hide_env_values = true,
        default_value = ""
    )]
    pub sms_auth_token: String,
    /// Where to post e-mail events (the gateway's `/webhooks/email`).
    #[arg(long)]
    pub email_webhook_url: Option<String>,
    /// USER:PASSWORD of the e-mail event webhook.
    #[arg(
        long,
        env = "HERALD_EMAIL_WEBHOOK_AUTH",
        hide_env_values = true,
        default_value = ""
    )]
    pub email_webhook_auth: String,
    /// Messages per second the WhatsApp number may send (80 by default, 1,000 upgraded).
    #[arg(long, default_value_t = 80.0)]
    pub sender_rate: f64,
    /// Share (0 to 1) of messages that later fail as undeliverable.
    #[arg(long, default_value_t = 0.0, value_parser = share)]
    pub undeliverable_rate: f64,
    /// Share of calls refused with a transient fault a retry may pass.
    #[arg(long, default_value_t = 0.0, value_parser = share)]
    pub transient_failure_rate: f64,
    /// Share of template sends refused as paused (132015).
    #[arg(long, default_value_t = 0.0, value_parser = share)]
    pub template_paused_rate: f64,
    /// Share of accepted sends whose answer is withheld past the client's patience.
    #[arg(long, default_value_t = 0.0, value_parser = share)]
    pub drop_answer_rate: f64,
    /// Share of status callbacks posted twice.
    #[arg(long, default_value_t = 0.0, value_parser = share)]
    pub duplicate_webhook_rate: f64,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

/// A share from 0 to 1.
fn share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("'{s}' is not a share from 0 to 1")),
    }
}

#[derive(Subcommand, Debug)]
pub enum TopicsAction {
    /// Creates the topics of topology/topics.toml that are missing and reports what differs.
    Apply {
        #[command(flatten)]
        kafka: KafkaClientArgs,
        #[command(flatten)]
        topology: TopologyArgs,
        /// Replication factor override (the file's default is 3).
        #[arg(long)]
        replication: Option<i32>,
    },
}

/// Where the audit reads the decision log: dump files, or a cluster.
#[derive(clap::Args, Debug)]
pub struct LogSource {
    /// Dump files (`.jsonl` or `.avro`) from `herald export` or `herald demo --record`.
    #[arg(long = "events", conflicts_with = "bootstrap")]
    pub events: Vec<PathBuf>,
    /// A cluster whose `herald.decisions.v1` is read whole (read_committed).
    #[arg(long, env = "HERALD_BOOTSTRAP")]
    pub bootstrap: Option<String>,
    #[command(flatten)]
    pub security: KafkaSecurityArgs,
    #[command(flatten)]
    pub registry: RegistryArgs,
    #[command(flatten)]
    pub topology: TopologyArgs,
}

impl LogSource {
    fn decisions(&self) -> Result<Vec<crate::events::Decision>> {
        Ok(crate::dump::decisions(&self.records()?))
    }

    fn records(&self) -> Result<Vec<crate::replay::DumpedRecord>> {
        Ok(match &self.bootstrap {
            Some(bootstrap) if self.events.is_empty() && self.registry.given(&self.security) => {
                let topo = self.topology.load()?;
                let rt = tokio::runtime::Runtime::new()?;
                let registry = self.registry.settings(&self.security)?;
                let codec = Arc::new(Codec::with_settings(&registry, &topo.names)?);
                let settings = connect(bootstrap, &self.security, true, "log-reader")?;
                crate::dump::export(
                    &settings,
                    vec![topo.names.decisions().to_string()],
                    codec,
                    topo.partitions(),
                    rt.handle().clone(),
                )?
            }
            _ if !self.events.is_empty() => {
                let names = self.topology.load()?.names;
                let mut records = Vec::new();
                for file in &self.events {
                    records.extend(crate::dump::read(file, &names)?);
                }
                records
            }
            _ => {
                bail!("say where the decision log is: --events FILE, or --bootstrap and --registry")
            }
        })
    }
}

#[derive(Subcommand, Debug)]
pub enum AuditAction {
    /// One customer's consent changes (grant, revoke, source, artifact, chain link) and every
    /// business-initiated decision that relied on each grant, in order.
    Consent {
        #[arg(long)]
        customer: String,
        /// Only what was decided up to this instant (RFC 3339, e.g. 2026-11-01T00:00:00Z).
        #[arg(long)]
        as_of: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        source: LogSource,
    },
    /// Recomputes every customer's consent hash chain; exits 1 naming each break.
    Verify {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        source: LogSource,
    },
}

/// The identifier key from its configured text; an error names the setting.
fn identifier_key_from(text: &str) -> Result<crate::identity::IdentifierKey> {
    crate::identity::IdentifierKey::new(text.as_bytes())
        .map_err(|why| anyhow!("HERALD_IDENTIFIER_KEY (--identifier-key): {why}"))
}

/// A small runtime for commands that may talk to ScyllaDB.
fn store_runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn parse_instant(flag: &str, text: &str) -> Result<crate::events::Millis> {
    text.parse::<jiff::Timestamp>()
        .map(|t| t.as_millisecond())
        .with_context(|| {
            format!("{flag}: '{text}' is not an RFC 3339 instant (2026-11-01T00:00:00Z)")
        })
}

/// The cluster a command reads: brokers, registry, and the topology for partition counts.
#[derive(Args, Debug)]
pub struct ClusterArgs {
    #[command(flatten)]
    kafka: KafkaClientArgs,
    #[command(flatten)]
    registry: RegistryArgs,
    #[command(flatten)]
    topology: TopologyArgs,
}

/// Where the dead-letter topic is, and which of its records a `herald dlq` command acts on.
#[derive(Args, Debug)]
pub struct DlqArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// A dead letter's id (`partition:offset`, as the list shows); repeat for several.
    #[arg(long = "id")]
    ids: Vec<String>,
    /// Only dead letters whose reason contains this text (case-insensitive).
    #[arg(long)]
    reason: Option<String>,
    /// Only dead letters written at or after this instant (RFC 3339).
    #[arg(long)]
    since: Option<String>,
    /// Only dead letters written before this instant (RFC 3339).
    #[arg(long)]
    until: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
pub enum DlqAction {
    /// Lists the dead letters (all, or those selected): id, time, stage, origin and reason.
    List {
        #[command(flatten)]
        args: DlqArgs,
    },
    /// Writes the selected dead letters' records back to their topic and partition. A dry run
    /// unless --execute; a replayed record is deduplicated like the first, so nothing is sent twice.
    Replay {
        #[command(flatten)]
        args: DlqArgs,
        /// Replay every dead letter (a replay needs a selection otherwise).
        #[arg(long)]
        all: bool,
        /// Really write them (the default only shows what would be replayed).
        #[arg(long)]
        execute: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum SchemasAction {
    /// Registers every Herald schema under `<topic>-value` (idempotent).
    Register {
        #[command(flatten)]
        registry: RegistryArgs,
        /// The Kafka properties file may hold the registry's settings.
        #[command(flatten)]
        security: KafkaSecurityArgs,
        /// The topology whose topic names give the subjects.
        #[command(flatten)]
        topology: TopologyArgs,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageName {
    Processors,
    Dispatch,
    All,
}

/// Options of `herald run`; every one can come from the environment.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub kafka: KafkaClientArgs,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// The state store: an embedded store file, or ScyllaDB as
    /// `scylla://HOST:PORT[,HOST:PORT]/KEYSPACE[?replication_factor=3&local_dc=DC&consistency=local_quorum&timeout_ms=5000]`.
    #[arg(long, env = "HERALD_STORE", default_value = ".herald/state.redb")]
    pub store: StoreAddress,
    #[arg(long, env = "HERALD_STAGE", value_enum, default_value = "all")]
    pub stage: StageName,
    /// Secret key (16 bytes or more) of the keyed hashes that replace phone numbers and e-mail
    /// addresses in state and in every Herald topic; the same for every process, and for
    /// `herald replay` of their recordings.
    #[arg(long, env = "HERALD_IDENTIFIER_KEY", hide_env_values = true)]
    pub identifier_key: String,
    /// At-least-once mode, for brokers without transactions.
    #[arg(long, env = "HERALD_AT_LEAST_ONCE")]
    pub at_least_once: bool,
    /// Unique per process (transactional id); defaults to the host name.
    #[arg(long, env = "HERALD_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// What this deployment's consumer groups and transactional ids start with
    /// (`PREFIX-processors`, `PREFIX-dispatch-INSTANCE`): a second deployment on the same
    /// cluster (staging, a shadow policy) needs its own. Defaults to the topic prefix followed
    /// by `herald` (`herald` with no topic prefix, `staging.herald` with `staging.`).
    #[arg(long, env = "HERALD_GROUP_PREFIX")]
    pub group_prefix: Option<String>,
    #[command(flatten)]
    pub topology: TopologyArgs,
    #[arg(
        long,
        env = "HERALD_PROVIDER_URL",
        default_value = "https://graph.facebook.com"
    )]
    pub provider_url: String,
    #[arg(long, env = "HERALD_PHONE_NUMBER_ID", default_value = "")]
    pub phone_number_id: String,
    #[arg(
        long,
        env = "HERALD_PROVIDER_TOKEN",
        default_value = "",
        hide_env_values = true
    )]
    pub provider_token: String,
    /// The SMS provider's API root (Twilio-shaped Messages resource).
    #[arg(long, env = "HERALD_SMS_URL", default_value = "https://api.twilio.com")]
    pub sms_url: String,
    /// The SMS account SID (AC...); with --sms-auth-token and --sms-from it turns SMS on.
    #[arg(long, env = "HERALD_SMS_ACCOUNT_SID")]
    pub sms_account_sid: Option<String>,
    #[arg(long, env = "HERALD_SMS_AUTH_TOKEN", hide_env_values = true)]
    pub sms_auth_token: Option<String>,
    /// The number (E.164) or messaging service SID (MG...) SMS are sent from.
    #[arg(long, env = "HERALD_SMS_FROM")]
    pub sms_from: Option<String>,
    /// Where the SMS provider posts statuses: the gateway's public `/webhooks/sms`.
    #[arg(long, env = "HERALD_SMS_STATUS_CALLBACK")]
    pub sms_status_callback: Option<String>,
    /// The e-mail provider's API root (SendGrid-shaped v3 Mail Send).
    #[arg(
        long,
        env = "HERALD_EMAIL_URL",
        default_value = "https://api.sendgrid.com"
    )]
    pub email_url: String,
    /// The e-mail API key; with --email-from it turns e-mail on.
    #[arg(long, env = "HERALD_EMAIL_API_KEY", hide_env_values = true)]
    pub email_api_key: Option<String>,
    /// The address e-mails are sent from.
    #[arg(long, env = "HERALD_EMAIL_FROM")]
    pub email_from: Option<String>,
    /// How long dispatch waits for the provider's answer to a send. A send left unanswered is
    /// never retried blindly: its outcome is settled from status webhooks.
    #[arg(long, env = "HERALD_PROVIDER_TIMEOUT_MS", default_value_t = 10_000)]
    pub provider_timeout_ms: u64,
    /// How long a send whose outcome is unknown (the process died during the call, or the
    /// answer was lost) waits for a status webhook naming it before it counts as not sent and
    /// is tried again. Longer than the provider takes to post a status.
    #[arg(long, env = "HERALD_SETTLE_WAIT_MS", default_value_t = crate::dispatch::SETTLE_WAIT_MS as u64)]
    pub settle_wait_ms: u64,
    /// Messages per second dispatch sends from its phone number (the Cloud API's default
    /// throughput is 80; an upgraded number may send 1,000).
    #[arg(long, env = "HERALD_SENDER_RATE", default_value_t = 80.0)]
    pub sender_rate: f64,
    /// Messages the phone number may send at once after a quiet spell (default: one
    /// second's worth).
    #[arg(long, env = "HERALD_SENDER_BURST")]
    pub sender_burst: Option<f64>,
    /// Milliseconds between two messages to one recipient once their burst is spent (the
    /// provider's pair rate limit).
    #[arg(long, env = "HERALD_PAIR_INTERVAL_MS", default_value_t = 6_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub pair_interval_ms: u64,
    /// Messages one recipient may get at once before the pair interval applies.
    #[arg(long, env = "HERALD_PAIR_BURST", default_value_t = 45, value_parser = clap::value_parser!(u32).range(1..))]
    pub pair_burst: u32,
    /// Provider calls under way at once, at most.
    #[arg(long, env = "HERALD_MAX_CALLS", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_calls: u32,
    /// A provider's circuit breaker judges it by the calls that ended in this many last
    /// milliseconds...
    #[arg(long, env = "HERALD_BREAKER_WINDOW_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub breaker_window_ms: u64,
    /// ...once at least this many ended in it...
    #[arg(long, env = "HERALD_BREAKER_MIN_CALLS", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub breaker_min_calls: u32,
    /// ...and opens when at least this share of them failed (unreachable, 5xx, no answer).
    #[arg(long, env = "HERALD_BREAKER_FAILURE_SHARE", default_value_t = 0.5)]
    pub breaker_failure_share: f64,
    /// How long an open breaker holds every call to that provider before one probe call.
    #[arg(long, env = "HERALD_BREAKER_COOLDOWN_MS", default_value_t = 30_000)]
    pub breaker_cooldown_ms: u64,
    #[arg(long, env = "HERALD_METRICS_ADDR", default_value = "0.0.0.0:9464")]
    pub metrics_addr: SocketAddr,
    #[arg(long, env = "HERALD_BATCH_SIZE", default_value_t = 1000)]
    pub batch_size: usize,
    /// Consumer group assignor for the lead topic: `cooperative-sticky` moves only the
    /// partitions that change owner; `range` stops every member on each rebalance.
    #[arg(
        long,
        env = "HERALD_ASSIGNMENT_STRATEGY",
        default_value = "cooperative-sticky"
    )]
    pub assignment_strategy: String,
    /// How long an input topic with nothing buffered may hold its partition back, so that
    /// records of all four inputs are decided in timestamp order (Kafka Streams' max.task.idle.ms).
    #[arg(long, env = "HERALD_MAX_TASK_IDLE_MS", default_value_t = 250)]
    pub max_task_idle_ms: u64,
    /// Every this many seconds, partitions with a timer due by the wall clock are advanced to it,
    /// so a deferral or journey step fires even when no new input arrives; 0 leaves timers to
    /// event time alone (for a backfill of old events, whose stream time is in the past).
    #[arg(long, env = "HERALD_WALL_CLOCK_TICK_SECS", default_value_t = 5)]
    pub wall_clock_tick_secs: u64,
    /// Join the consumer group as a static member named after the instance id, so a restarted
    /// process (same HERALD_INSTANCE_ID) takes its partitions back without a rebalance.
    #[arg(long, env = "HERALD_STATIC_MEMBERSHIP")]
    pub static_membership: bool,
    /// How long the group waits for a silent member (a killed process) before its partitions
    /// move on: shorter fails over faster, longer rides out pauses.
    #[arg(long, env = "HERALD_SESSION_TIMEOUT_MS", default_value_t = 10_000)]
    pub session_timeout_ms: u32,
}

/// How a command reaches the Kafka cluster: the same options for every command that talks to it.
#[derive(Args, Debug, Clone)]
pub struct KafkaClientArgs {
    /// Brokers to start from, `host:port[,host:port]`.
    #[arg(long, env = "HERALD_BOOTSTRAP")]
    pub bootstrap: String,
    #[command(flatten)]
    pub security: KafkaSecurityArgs,
}

/// librdkafka client settings (security, timeouts) beyond the bootstrap address. They apply in
/// this order, later ones winning: the properties file, `HERALD_KAFKA_*` environment variables
/// (`HERALD_KAFKA_SASL_PASSWORD` is `sasl.password`), then `--kafka-config` flags.
#[derive(Args, Debug, Clone, Default)]
pub struct KafkaSecurityArgs {
    /// A librdkafka properties file of `key=value` lines (security.protocol, sasl.mechanism,
    /// sasl.username, sasl.password, ssl.ca.location, ...); the place for secrets.
    #[arg(long = "kafka-properties", env = "HERALD_KAFKA_PROPERTIES")]
    pub kafka_properties: Option<PathBuf>,
    /// One librdkafka setting, `key=value`; repeatable.
    #[arg(long = "kafka-config", value_parser = parse_kv)]
    pub kafka_config: Vec<(String, String)>,
}

impl KafkaSecurityArgs {
    /// Every `key=value` from the file, the environment and the flags, in that order.
    fn all_settings(&self) -> Result<Vec<(String, String)>> {
        let mut out = match &self.kafka_properties {
            Some(path) => kafka::read_properties(path)?,
            None => Vec::new(),
        };
        out.extend(kafka::settings_from_env(std::env::vars()));
        out.extend(self.kafka_config.iter().cloned());
        Ok(out)
    }

    /// The librdkafka settings: all but the schema registry's.
    pub fn settings(&self) -> Result<Vec<(String, String)>> {
        Ok(self
            .all_settings()?
            .into_iter()
            .filter(|(k, _)| !k.starts_with(crate::registry::PROPERTY_PREFIX))
            .collect())
    }

    /// The `schema.registry.*` settings, which the same file may hold, as Confluent's clients
    /// read them.
    pub fn registry_properties(&self) -> Result<Vec<(String, String)>> {
        Ok(self
            .all_settings()?
            .into_iter()
            .filter(|(k, _)| k.starts_with(crate::registry::PROPERTY_PREFIX))
            .collect())
    }
}

/// How a command reaches the schema registry (Confluent's API, or Apicurio's
/// `/apis/ccompat/v7`). Each setting may also come from the Kafka properties file as
/// `schema.registry.url`, `schema.registry.basic.auth.user.info` and
/// `schema.registry.ssl.ca.location`; a flag or variable wins over the file.
#[derive(Args, Debug, Clone, Default)]
pub struct RegistryArgs {
    /// The registry's URL.
    #[arg(long = "registry", env = "HERALD_REGISTRY_URL")]
    pub registry: Option<String>,
    /// USER:PASSWORD for a registry behind HTTP basic auth (Confluent Cloud: key and secret).
    #[arg(
        long = "registry-user-info",
        env = "HERALD_REGISTRY_USER_INFO",
        hide_env_values = true
    )]
    pub registry_user_info: Option<String>,
    /// PEM file of the CA that signed the registry's certificate.
    #[arg(long = "registry-ca-file", env = "HERALD_REGISTRY_CA_FILE")]
    pub registry_ca_file: Option<PathBuf>,
}

impl RegistryArgs {
    /// The registry settings, from these options over the properties file's.
    pub fn settings(
        &self,
        security: &KafkaSecurityArgs,
    ) -> Result<crate::registry::RegistrySettings> {
        crate::registry::RegistrySettings::resolve(
            &security.registry_properties()?,
            self.registry.as_deref(),
            self.registry_user_info.as_deref(),
            self.registry_ca_file.as_deref(),
        )
    }

    /// Whether a registry is named here or in the properties file.
    fn given(&self, security: &KafkaSecurityArgs) -> bool {
        self.registry.is_some()
            || security
                .registry_properties()
                .map(|p| p.iter().any(|(k, _)| k == "schema.registry.url"))
                .unwrap_or(false)
    }
}

impl KafkaClientArgs {
    /// Client settings for `instance_id`, once the cluster has answered with them.
    pub fn connect(&self, exactly_once: bool, instance_id: &str) -> Result<KafkaSettings> {
        connect(&self.bootstrap, &self.security, exactly_once, instance_id)
    }
}

/// Client settings for the cluster at `bootstrap`, checked against it: a wrong address,
/// certificate or password stops the command here with the settings to fix.
fn connect(
    bootstrap: &str,
    security: &KafkaSecurityArgs,
    exactly_once: bool,
    instance_id: &str,
) -> Result<KafkaSettings> {
    let mut settings = KafkaSettings::new(bootstrap, exactly_once, instance_id);
    settings.extra = security.settings()?;
    kafka::check_connection(&settings)?;
    Ok(settings)
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .ok_or_else(|| format!("expected key=value, got '{s}'"))
}

/// Which topology a command uses, and the names of its topics.
#[derive(Args, Debug, Clone, Default)]
pub struct TopologyArgs {
    /// Topology directory (topics, templates, policy, journeys); the embedded one when absent.
    #[arg(long, env = "HERALD_TOPOLOGY")]
    pub topology: Option<PathBuf>,
    /// Put before every topic name instead of topics.toml's `prefix`, so that deployments
    /// (production, staging) share a cluster without touching each other's topics.
    #[arg(long, env = "HERALD_TOPIC_PREFIX")]
    pub topic_prefix: Option<String>,
}

impl TopologyArgs {
    /// Loads the topology, with the prefix applied.
    pub fn load(&self) -> Result<Topology> {
        let topo = match &self.topology {
            Some(d) => crate::topology_files::load(d)?,
            None => Topology::embedded()?,
        };
        match &self.topic_prefix {
            Some(prefix) => topo
                .with_topic_prefix(prefix)
                .context("--topic-prefix (HERALD_TOPIC_PREFIX)"),
            None => Ok(topo),
        }
    }
}

/// Runs a parsed command line.
pub fn main(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Demo {
            customers,
            seed,
            json,
            keep_running,
            record,
            state_dir,
        } => {
            telemetry::init_tracing(if json { "error" } else { "warn" });
            if let Some(path) = &record {
                // Refuse a bad file name before a run of minutes, not after it.
                crate::dump::Format::of(path)?;
            }
            let opts = demo::DemoOptions {
                customers,
                seed,
                json,
                keep_running,
                state_dir,
                record,
            };
            let summary = demo::run(&opts)?;
            if !keep_running {
                demo::print_summary(&summary, json);
            }
            if summary.sends_without_consent > 0 || summary.duplicate_sends > 0 {
                bail!(
                    "guarantee violated: {} sends without consent, {} duplicate sends",
                    summary.sends_without_consent,
                    summary.duplicate_sends
                );
            }
            Ok(())
        }
        Command::Bench {
            customers,
            bootstrap,
            security,
        } => {
            telemetry::init_tracing("error");
            let brokers = match &bootstrap {
                Some(b) => Some(connect(b, &security, true, "bench")?),
                None => None,
            };
            let r = bench::run(customers, brokers.as_ref())?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Command::Run(args) => {
            telemetry::init_tracing("info");
            run(*args)
        }
        Command::Topics {
            action:
                TopicsAction::Apply {
                    kafka,
                    topology: dir,
                    replication,
                },
        } => {
            telemetry::init_tracing("warn");
            let topo = dir.load()?;
            let settings = kafka.connect(false, "topics-apply")?;
            let report = topics_apply(&settings, &topo, replication)?;
            for line in &report {
                println!("{line}");
            }
            Ok(())
        }
        Command::Schemas {
            action:
                SchemasAction::Register {
                    registry,
                    security,
                    topology,
                },
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            let registry = registry.settings(&security)?;
            rt.block_on(crate::registry::ping(&registry))?;
            let codec = Codec::with_settings(&registry, &topology.load()?.names)?;
            rt.block_on(codec.require_backward_compatibility(&registry))?;
            for (subject, id) in rt.block_on(codec.register_all())? {
                println!("{subject}\tid {id}");
            }
            Ok(())
        }
        Command::Replay {
            events,
            policy,
            show,
            all,
            json,
            fail_on_difference,
            identifier_key,
        } => {
            telemetry::init_tracing("warn");
            let key = identifier_key_from(&identifier_key)?;
            let topo = crate::topology_files::load(&policy)?;
            let mut records = Vec::new();
            for file in &events {
                records.extend(crate::dump::read(file, &topo.names)?);
            }
            let recorded = crate::dump::decisions(&records);
            let replayed = crate::replay::replay(&records, &topo, &key);
            let report =
                crate::replay::Report::new(&topo.policy.version, &recorded, &replayed, show);
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.render(all));
            }
            if fail_on_difference && report.differs() {
                bail!(
                    "{} of {} customers are decided differently",
                    report.comparison.customers_differing,
                    report.comparison.customers
                );
            }
            Ok(())
        }
        Command::State {
            customer,
            store,
            topology: dir,
            json,
        } => {
            telemetry::init_tracing("warn");
            let topo = dir.load()?;
            let rt = store_runtime()?;
            store.ensure_exists("--store")?;
            let store = store.open(rt.handle())?;
            let Some(view) = store.customer(&customer)? else {
                bail!(
                    "{} holds no state for customer '{customer}'",
                    store.describe()
                );
            };
            let state: crate::state::CustomerState = serde_json::from_str(&view.state)
                .with_context(|| format!("the projected state of {customer} is unreadable"))?;
            let summary = crate::projection::summarise(
                &customer,
                view.partition,
                view.next_offset,
                &state,
                store.consent_history(&customer)?,
                topo.policy.session_window_hours,
            );
            if json {
                println!("{}", serde_json::to_string(&summary)?);
            } else {
                print!("{}", summary.render());
            }
            Ok(())
        }
        Command::Dlq { action } => dead_letters(action),
        Command::Audit {
            action:
                AuditAction::Consent {
                    customer,
                    as_of,
                    json,
                    source,
                },
        } => {
            telemetry::init_tracing("warn");
            let as_of = as_of
                .as_deref()
                .map(|t| parse_instant("--as-of", t))
                .transpose()?;
            let decisions = source.decisions()?;
            let mine: Vec<&crate::events::Decision> = decisions
                .iter()
                .filter(|d| d.customer_id == customer)
                .collect();
            if mine.is_empty() {
                bail!("no decision about customer '{customer}' in this log");
            }
            let t = crate::audit::timeline(&customer, &mine, as_of);
            if json {
                println!("{}", serde_json::to_string(&t)?);
            } else {
                print!("{}", t.render(as_of));
            }
            Ok(())
        }
        Command::Audit {
            action: AuditAction::Verify { json, source },
        } => {
            telemetry::init_tracing("warn");
            let decisions = source.decisions()?;
            let v = crate::audit::verify(&decisions);
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!(
                    "{} customers, {} consent records: {} chained and intact, {} from before the chain, {} breaks",
                    v.customers,
                    v.consent_records,
                    v.intact,
                    v.unchained,
                    v.breaks.len()
                );
                for b in &v.breaks {
                    println!(
                        "  {} at consent record {} (decision {}): {}",
                        b.customer_id, b.position, b.decision_id, b.why
                    );
                }
            }
            if !v.breaks.is_empty() {
                bail!(
                    "the consent chain is broken for {} customers",
                    v.breaks.len()
                );
            }
            Ok(())
        }
        Command::Chaos {
            customers,
            seed,
            kill_every_ms,
            kill,
            drop_answers,
            json,
            bootstrap,
            security,
            kill_broker_cmd,
            start_broker_cmd,
            broker_kill_every_secs,
            broker_down_secs,
        } => {
            telemetry::init_tracing("error");
            let brokers = match &bootstrap {
                Some(b) => Some(connect(b, &security, true, "chaos")?),
                None => None,
            };
            let broker_kills = match (kill_broker_cmd, start_broker_cmd) {
                (Some(kill), Some(start)) => Some(crate::chaos::BrokerKills {
                    kill,
                    start,
                    every: Duration::from_secs(broker_kill_every_secs),
                    down_for: Duration::from_secs(broker_down_secs),
                }),
                _ => None,
            };
            let opts = crate::chaos::ChaosOptions {
                customers,
                seed,
                kill_every: Duration::from_millis(kill_every_ms),
                victims: kill,
                herald: crate::chaos::this_binary()?,
                drop_answers,
                brokers,
                broker_kills,
            };
            let report = crate::chaos::run(&opts, |line| {
                if !json {
                    eprintln!("{line}");
                }
            })?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{}", report.line());
            }
            if !report.clean() {
                bail!("a guarantee did not hold under SIGKILL");
            }
            Ok(())
        }
        Command::Rebuild {
            source,
            into,
            parallelism,
            verify,
            json,
        } => {
            telemetry::init_tracing("warn");
            if let Some(live) = &verify {
                live.ensure_exists("--verify")?;
            }
            let topo = source.topology.load()?;
            let rt = store_runtime()?;
            let target = if into.starts_with("scylla://") {
                StoreAddress::parse(&into)?
            } else {
                StoreAddress::Embedded(PathBuf::from(&into).join("state.redb"))
            };
            let store = target.open(rt.handle())?;
            crate::rebuild::ensure_fresh(store.as_ref())?;
            let records = source.records()?;
            let started = std::time::Instant::now();
            let total = records
                .iter()
                .filter(|r| matches!(r.payload, crate::replay::Payload::Decision(_)))
                .count();
            let progress = |n: u64| {
                if !json {
                    eprint!("\r  folded {n:>9} of {total} decisions");
                }
            };
            let folded = crate::rebuild::fold(&records, parallelism, &progress);
            crate::rebuild::write(store.as_ref(), &folded)?;
            let seconds = started.elapsed().as_secs_f64();
            let decisions: u64 = folded.values().map(|f| f.decisions).sum();
            if !json {
                eprintln!("\r  folded {decisions:>9} of {total} decisions");
            }
            let rebuilt = crate::rebuild::load_states(store.as_ref(), topo.partitions())?;
            let mut report = crate::rebuild::RebuildReport {
                decisions,
                customers: rebuilt.len(),
                digest: crate::rebuild::digest(rebuilt.iter()),
                seconds,
                events_per_s: decisions as f64 / seconds.max(1e-9),
                live_digest: None,
                differing_customers: Vec::new(),
            };
            if let Some(live) = &verify {
                let live = live.open(rt.handle())?;
                let states = crate::rebuild::load_states(live.as_ref(), topo.partitions())?;
                report.live_digest = Some(crate::rebuild::digest(states.iter()));
                report.differing_customers = crate::rebuild::differing(&rebuilt, &states, 10);
            }
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "rebuilt {} customers from {} decisions into {} in {:.1} s\ndigest {}",
                    report.customers,
                    report.decisions,
                    store.describe(),
                    report.seconds,
                    report.digest
                );
                if let Some(live) = &report.live_digest {
                    println!("live   {live}");
                }
            }
            if report
                .live_digest
                .as_ref()
                .is_some_and(|l| *l != report.digest)
            {
                bail!(
                    "the rebuilt state differs from the live store, e.g. for {}",
                    report.differing_customers.join(", ")
                );
            }
            if report.live_digest.is_some() && !json {
                println!("equal: the live store is what the log says");
            }
            Ok(())
        }
        Command::Export {
            cluster:
                ClusterArgs {
                    kafka,
                    registry,
                    topology: dir,
                },
            out,
        } => {
            telemetry::init_tracing("warn");
            crate::dump::Format::of(&out)?;
            let topo = dir.load()?;
            let rt = tokio::runtime::Runtime::new()?;
            let codec = Arc::new(Codec::with_settings(
                &registry.settings(&kafka.security)?,
                &topo.names,
            )?);
            let settings = kafka.connect(true, "export")?;
            let records = crate::dump::export(
                &settings,
                crate::dump::replay_topics(&topo.names),
                codec,
                topo.partitions(),
                rt.handle().clone(),
            )?;
            let n = crate::dump::write(&out, &records)?;
            println!("wrote {n} records to {}", out.display());
            Ok(())
        }
        Command::Registry { listen } => serve_registry(listen),
        Command::Simulator(args) => simulator(*args),
        Command::Gateway(args) => gateway(*args),
    }
}

/// Settings of `herald gateway`.
#[derive(clap::Args, Debug)]
pub struct GatewayArgs {
    /// Where the provider posts webhooks (`/webhook`).
    #[arg(long, env = "HERALD_GATEWAY_ADDR", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Health, readiness and metrics (`/healthz`, `/readyz`, `/metrics`), on a listener of
    /// their own so that a webhook storm cannot starve the probes.
    #[arg(
        long,
        env = "HERALD_GATEWAY_HEALTH_ADDR",
        default_value = "0.0.0.0:8081"
    )]
    pub health_listen: SocketAddr,
    /// The Meta app secret webhooks are signed with (X-Hub-Signature-256).
    #[arg(long, env = "HERALD_APP_SECRET", hide_env_values = true)]
    pub app_secret: String,
    /// The token the GET verification handshake must present (hub.verify_token).
    #[arg(long, env = "HERALD_VERIFY_TOKEN", hide_env_values = true)]
    pub verify_token: String,
    /// Key of the keyed hashes of phone numbers: the same as the processors', so an inbound
    /// message's sender can be matched to a customer.
    #[arg(long, env = "HERALD_IDENTIFIER_KEY", hide_env_values = true)]
    pub identifier_key: String,
    #[command(flatten)]
    pub kafka: KafkaClientArgs,
    #[command(flatten)]
    pub registry: RegistryArgs,
    #[command(flatten)]
    pub topology: TopologyArgs,
    /// How long Kafka may take to acknowledge a webhook's events before it is answered 503.
    #[arg(long, env = "HERALD_GATEWAY_ACK_TIMEOUT_MS", default_value_t = 10_000)]
    pub ack_timeout_ms: u64,
    /// The SMS account's auth token, which signs its status callbacks (X-Twilio-Signature);
    /// `/webhooks/sms` answers 404 without it.
    #[arg(long, env = "HERALD_SMS_AUTH_TOKEN", hide_env_values = true)]
    pub sms_auth_token: Option<String>,
    /// The scheme and host the providers call the gateway at (e.g. https://hooks.example.com):
    /// SMS signatures cover the URL, which a TLS-terminating proxy hides from the gateway.
    #[arg(long, env = "HERALD_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// USER:PASSWORD the e-mail provider's event webhook presents (HTTP basic auth);
    /// `/webhooks/email` answers 404 without it.
    #[arg(long, env = "HERALD_EMAIL_WEBHOOK_AUTH", hide_env_values = true)]
    pub email_webhook_auth: Option<String>,
}

/// The providers dispatch sends through: the Cloud API always, SMS and e-mail when their
/// settings are all given; a channel without them dead-letters its messages with the settings
/// it lacks.
fn providers(args: &RunArgs) -> Result<Providers> {
    let timeout = Duration::from_millis(args.provider_timeout_ms);
    let mut providers = Providers::default().with(Arc::new(CloudApiClient::with_timeout(
        &args.provider_url,
        &args.phone_number_id,
        &args.provider_token,
        timeout,
    )?));
    let given = |v: &Option<String>| v.as_deref().filter(|s| !s.is_empty()).map(str::to_string);
    let sms = [
        given(&args.sms_account_sid),
        given(&args.sms_auth_token),
        given(&args.sms_from),
    ];
    providers = match sms {
        [Some(sid), Some(token), Some(from)] => {
            if !sid.starts_with("AC") {
                bail!("HERALD_SMS_ACCOUNT_SID (--sms-account-sid) must start with AC, got '{sid}'");
            }
            providers.with(Arc::new(SmsClient::new(
                &args.sms_url,
                &sid,
                &token,
                &from,
                args.sms_status_callback.as_deref(),
                timeout,
            )?))
        }
        [None, None, None] => providers.without(
            Channel::Sms,
            "set --sms-account-sid, --sms-auth-token and --sms-from (HERALD_SMS_ACCOUNT_SID, HERALD_SMS_AUTH_TOKEN, HERALD_SMS_FROM)",
        ),
        _ => bail!("SMS needs all of HERALD_SMS_ACCOUNT_SID, HERALD_SMS_AUTH_TOKEN and HERALD_SMS_FROM (--sms-account-sid, --sms-auth-token, --sms-from), or none"),
    };
    providers = match [given(&args.email_api_key), given(&args.email_from)] {
        [Some(key), Some(from)] => {
            if !from.contains('@') {
                bail!("HERALD_EMAIL_FROM (--email-from) must be an e-mail address, got '{from}'");
            }
            providers.with(Arc::new(EmailClient::new(&args.email_url, &key, &from, timeout)?))
        }
        [None, None] => providers.without(
            Channel::Email,
            "set --email-api-key and --email-from (HERALD_EMAIL_API_KEY, HERALD_EMAIL_FROM)",
        ),
        _ => bail!("e-mail needs both HERALD_EMAIL_API_KEY and HERALD_EMAIL_FROM (--email-api-key, --email-from), or neither"),
    };
    Ok(providers)
}

fn gateway(args: GatewayArgs) -> Result<()> {
    telemetry::init_tracing("info");
    if args.app_secret.is_empty() {
        bail!("HERALD_APP_SECRET (--app-secret) is empty: webhooks could not be verified");
    }
    if args.verify_token.is_empty() {
        bail!("HERALD_VERIFY_TOKEN (--verify-token) is empty");
    }
    let identifiers = identifier_key_from(&args.identifier_key)?;
    let email_webhook_auth = match args.email_webhook_auth.as_deref() {
        None => None,
        Some(auth) => match auth.split_once(':') {
            Some((user, password)) if !user.is_empty() && !password.is_empty() => {
                Some((user.to_string(), password.to_string()))
            }
            _ => bail!("HERALD_EMAIL_WEBHOOK_AUTH (--email-webhook-auth) must be USER:PASSWORD, both non-empty"),
        },
    };
    if args.sms_auth_token.as_deref() == Some("") {
        bail!("HERALD_SMS_AUTH_TOKEN (--sms-auth-token) is set but empty");
    }
    if let Some(u) = &args.public_url {
        if !(u.starts_with("https://") || u.starts_with("http://")) {
            bail!(
                "HERALD_PUBLIC_URL (--public-url) must start with https:// or http://, got '{u}'"
            );
        }
    }
    let topo = args.topology.load()?;
    let (rt, codec) = runtime_with_registry(&args.registry.settings(&args.kafka.security)?, &topo)?;
    let mut settings = args.kafka.connect(false, "gateway")?;
    settings.group_prefix = default_group_prefix(&topo);
    let stop = kafka::stop_on_signal(rt.handle());
    let running = crate::gateway::start(
        &rt,
        &settings,
        codec,
        crate::gateway::GatewayConfig {
            app_secret: args.app_secret.into_bytes(),
            verify_token: args.verify_token,
            identifiers,
            partitions: topo.partitions(),
            ack_timeout: Duration::from_millis(args.ack_timeout_ms),
            sms_auth_token: args.sms_auth_token.map(String::into_bytes),
            public_url: args.public_url,
            email_webhook_auth,
        },
        args.listen,
        args.health_listen,
        stop.clone(),
    )?;
    tracing::info!(webhooks = %running.webhook_addr, health = %running.health_addr, "herald gateway");
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// `herald registry`: the schema registry subset, until Ctrl-C.
fn serve_registry(listen: SocketAddr) -> Result<()> {
    telemetry::init_tracing("info");
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let addr = crate::registry::serve(listen).await?;
        println!("listening on http://{addr}");
        tokio::signal::ctrl_c().await?;
        Ok(())
    })
}

/// `herald simulator`: the provider simulator with the given limits, failures and callbacks.
fn simulator(args: SimulatorArgs) -> Result<()> {
    telemetry::init_tracing("info");
    let email_webhook_auth = match args.email_webhook_auth.split_once(':') {
        Some((u, p)) => (u.to_string(), p.to_string()),
        None if args.email_webhook_auth.is_empty() => (String::new(), String::new()),
        None => bail!("--email-webhook-auth (HERALD_EMAIL_WEBHOOK_AUTH) must be USER:PASSWORD"),
    };
    if args.sender_rate <= 0.0 {
        bail!("--sender-rate must be above 0, got {}", args.sender_rate);
    }
    let options = crate::provider::SimulatorOptions {
        webhook_url: args.webhook_url,
        app_secret: args.app_secret.into_bytes(),
        seed: args.seed,
        sender_per_s: args.sender_rate,
        drop_answer_rate: args.drop_answer_rate,
        transient_failure_rate: args.transient_failure_rate,
        undeliverable_rate: args.undeliverable_rate,
        template_paused_rate: args.template_paused_rate,
        duplicate_webhook_rate: args.duplicate_webhook_rate,
        sms_auth_token: args.sms_auth_token.into_bytes(),
        email_webhook_url: args.email_webhook_url,
        email_webhook_auth,
        ..crate::provider::SimulatorOptions::default()
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let (addr, _) = crate::provider::serve_simulator_with(args.listen, options).await?;
        println!("listening on http://{addr}");
        tokio::signal::ctrl_c().await?;
        Ok(())
    })
}

/// `herald dlq list` and `herald dlq replay`.
fn dead_letters(action: DlqAction) -> Result<()> {
    telemetry::init_tracing("warn");
    let (args, replay) = match action {
        DlqAction::List { args } => (args, None),
        DlqAction::Replay { args, all, execute } => (args, Some((all, execute))),
    };
    crate::dlq::check_ids(&args.ids)?;
    let selection = crate::dlq::Selection {
        ids: args.ids.clone(),
        reason: args.reason.clone(),
        since: args
            .since
            .as_deref()
            .map(|t| parse_instant("--since", t))
            .transpose()?,
        until: args
            .until
            .as_deref()
            .map(|t| parse_instant("--until", t))
            .transpose()?,
    };
    if let Some((false, _)) = replay {
        if selection.is_empty() {
            bail!("herald dlq replay needs --id, --reason, --since or --until (or --all for every dead letter)");
        }
    }
    let topo = args.cluster.topology.load()?;
    let partitions = topo
        .topics
        .iter()
        .find(|t| t.role == Some(crate::topology::TopicRole::Dlq))
        .map_or(topo.partitions(), |t| t.partitions);
    let (rt, codec) = runtime_with_registry(
        &args
            .cluster
            .registry
            .settings(&args.cluster.kafka.security)?,
        &topo,
    )?;
    let settings = args.cluster.kafka.connect(true, "herald-dlq")?;
    let entries: Vec<crate::dlq::Entry> = crate::dlq::read_all(&settings, &codec, &rt, partitions)?
        .into_iter()
        .filter(|e| selection.selects(e))
        .collect();
    let Some((_, execute)) = replay else {
        if args.json {
            for e in &entries {
                println!("{}", serde_json::to_string(e)?);
            }
        } else {
            println!("{} dead letters", entries.len());
            for e in &entries {
                println!(
                    "  {:<8} {}  {:<10} {}/{}@{}  {}",
                    e.id,
                    crate::events::rfc3339(e.failed_at),
                    e.stage,
                    e.source_topic,
                    e.source_partition,
                    e.source_offset,
                    e.reason
                );
            }
        }
        return Ok(());
    };
    let done = crate::dlq::replay(&settings, topo.names.dlq(), &rt, &entries, execute)?;
    if args.json {
        for r in &done {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        let verb = if execute {
            "replayed"
        } else {
            "would replay (dry run; --execute to write)"
        };
        let written = done.iter().filter(|r| r.skipped.is_none()).count();
        println!("{verb}: {written} of {} selected dead letters", done.len());
        for r in &done {
            match (&r.skipped, r.offset) {
                (Some(why), _) => println!("  {:<8} skipped: {why}", r.id),
                (None, Some(o)) => {
                    println!("  {:<8} -> {}/{}@{o}", r.id, r.to_topic, r.to_partition)
                }
                (None, None) => println!("  {:<8} -> {}/{}", r.id, r.to_topic, r.to_partition),
            }
        }
    }
    Ok(())
}

/// The pacing limits of `herald run`'s dispatch, each checked under its own name.
fn send_limits(args: &RunArgs) -> Result<crate::pacing::Limits> {
    let rate = args.sender_rate;
    if !(rate.is_finite() && rate > 0.0) {
        bail!("HERALD_SENDER_RATE (--sender-rate) must be a number of messages per second above 0, not {rate}");
    }
    let burst = args.sender_burst.unwrap_or(rate);
    if !(burst.is_finite() && burst >= 1.0) {
        bail!("HERALD_SENDER_BURST (--sender-burst) must be at least 1 message, not {burst}");
    }
    let share = args.breaker_failure_share;
    if !(share > 0.0 && share <= 1.0) {
        bail!("HERALD_BREAKER_FAILURE_SHARE (--breaker-failure-share) must be above 0 and at most 1, not {share}");
    }
    Ok(crate::pacing::Limits {
        sender_per_second: rate,
        sender_burst: burst,
        pair_interval_ms: args.pair_interval_ms,
        pair_burst: args.pair_burst as f64,
        max_calls: args.max_calls as usize,
        breaker_window_ms: args.breaker_window_ms as crate::events::Millis,
        breaker_min_calls: args.breaker_min_calls,
        breaker_failure_share: share,
        breaker_cooldown_ms: args.breaker_cooldown_ms as crate::events::Millis,
    })
}

/// The consumer-group and transactional-id prefix of a deployment that names none: its topic
/// prefix before `herald`, so that a staging deployment never joins production's groups.
pub fn default_group_prefix(topology: &Topology) -> String {
    format!("{}herald", topology.prefix)
}

/// The runtime a long-running command works on, and the codec of a registry it has reached.
fn runtime_with_registry(
    registry: &crate::registry::RegistrySettings,
    topology: &Topology,
) -> Result<(tokio::runtime::Runtime, Arc<Codec>)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // A registry that is away (restarting, say) is waited for; wrong settings stop at once.
    rt.block_on(crate::registry::wait_for(
        registry,
        crate::registry::OUTAGE_BUDGET,
    ))?;
    let codec = Arc::new(Codec::with_settings(registry, &topology.names)?);
    // Every schema this process writes is resolved now, so a registry outage later holds up
    // only records of a schema it has not seen, never its own writes.
    rt.block_on(codec.register_all())
        .context("resolving Herald's schemas in the registry")?;
    Ok((rt, codec))
}

fn run(args: RunArgs) -> Result<()> {
    let identifiers = identifier_key_from(&args.identifier_key)?;
    let topo = Arc::new(args.topology.load()?);
    let (rt, codec) = runtime_with_registry(&args.registry.settings(&args.kafka.security)?, &topo)?;
    let store: kafka::SharedStore = args.store.open(rt.handle())?;
    let instance = args
        .instance_id
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("pid{}", std::process::id()));
    let mut settings = args.kafka.connect(!args.at_least_once, &instance)?;
    settings.batch_size = args.batch_size;
    settings.assignment_strategy = args.assignment_strategy.clone();
    settings.max_task_idle_ms = args.max_task_idle_ms;
    settings.static_membership = args.static_membership;
    settings.group_prefix = args
        .group_prefix
        .clone()
        .unwrap_or_else(|| default_group_prefix(&topo));
    settings.session_timeout_ms = args.session_timeout_ms;
    let stop = kafka::stop_on_signal(rt.handle());
    let metrics = Metrics::shared();
    let bound = rt.block_on(telemetry::serve_metrics(args.metrics_addr, metrics.clone()))?;
    tracing::info!(metrics = %bound, instance, "herald run");

    let mut handles = Vec::new();
    if matches!(args.stage, StageName::Processors | StageName::All) {
        let (s, st, m, h, t, c, store, k) = (
            settings.clone(),
            stop.clone(),
            metrics.clone(),
            rt.handle().clone(),
            topo.clone(),
            codec.clone(),
            store.clone(),
            identifiers.clone(),
        );
        let tick =
            (args.wall_clock_tick_secs > 0).then(|| Duration::from_secs(args.wall_clock_tick_secs));
        handles.push(std::thread::spawn(move || {
            let mut stage = ProcessorStage::new(t, c, store, h.clone(), m.clone(), k)
                .with_wall_clock_tick(tick);
            kafka::run_stage(&s, &mut stage, &st, &m, &h)
        }));
    }
    if matches!(args.stage, StageName::Dispatch | StageName::All) {
        if args.phone_number_id.is_empty() || args.provider_token.is_empty() {
            bail!("dispatch needs HERALD_PHONE_NUMBER_ID and HERALD_PROVIDER_TOKEN (or --phone-number-id / --provider-token)");
        }
        let providers = providers(&args)?;
        let catalog = topo.catalog.clone();
        let settle_wait = Duration::from_millis(args.settle_wait_ms);
        let limits = send_limits(&args)?;
        let (s, st, m, h, c, store, k) = (
            settings.clone(),
            stop.clone(),
            metrics.clone(),
            rt.handle().clone(),
            codec.clone(),
            store.clone(),
            identifiers.clone(),
        );
        handles.push(std::thread::spawn(move || {
            let mut stage =
                DispatchStage::new(c, store, providers, catalog, h.clone(), m.clone(), k)
                    .with_settle_wait(settle_wait)
                    .with_limits(limits);
            kafka::run_stage(&s, &mut stage, &st, &m, &h)
        }));
    }
    let mut first_error = None;
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                // One stage failing stops the others, so the process exits and is restarted whole.
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
                first_error.get_or_insert(e);
            }
            Err(_) => {
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
                first_error.get_or_insert(anyhow!("a stage panicked"));
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Creates missing topics and reports differences; returns one line per topic.
pub fn topics_apply(
    settings: &KafkaSettings,
    topo: &Topology,
    replication: Option<i32>,
) -> Result<Vec<String>> {
    let admin: AdminClient<DefaultClientContext> = settings
        .client_config()
        .create()
        .context("cannot create Kafka admin client")?;
    let rt = tokio::runtime::Runtime::new()?;
    let metadata = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(15))
        .with_context(|| format!("cannot read cluster metadata from {}", settings.bootstrap))?;
    let brokers = metadata.brokers().len() as i32;
    let mut report = Vec::new();
    let mut missing = Vec::new();
    for spec in &topo.topics {
        match metadata.topics().iter().find(|t| t.name() == spec.name) {
            Some(t) => {
                let have = t.partitions().len() as i32;
                if have != spec.partitions {
                    report.push(format!(
                        "DIFFERS {}: partitions {have}, topics.toml says {}",
                        spec.name, spec.partitions
                    ));
                } else {
                    report.push(format!("OK      {}: {} partitions", spec.name, have));
                }
            }
            None => missing.push(spec),
        }
    }
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    // Configs of the topics that exist: cleanup.policy and retention.ms must match the file.
    let existing: Vec<_> = topo
        .topics
        .iter()
        .filter(|s| !missing.iter().any(|m| m.name == s.name))
        .collect();
    if !existing.is_empty() {
        let specs: Vec<ResourceSpecifier> = existing
            .iter()
            .map(|s| ResourceSpecifier::Topic(&s.name))
            .collect();
        if let Ok(results) = rt.block_on(admin.describe_configs(specs.iter(), &opts)) {
            for (spec, res) in existing.iter().zip(results) {
                let Ok(res) = res else { continue };
                let get = |k: &str| res.get(k).and_then(|e| e.value.clone()).unwrap_or_default();
                if get("cleanup.policy") != spec.cleanup_policy {
                    report.push(format!(
                        "DIFFERS {}: cleanup.policy {}, topics.toml says {}",
                        spec.name,
                        get("cleanup.policy"),
                        spec.cleanup_policy
                    ));
                }
                if get("retention.ms") != spec.retention_ms.to_string() {
                    report.push(format!(
                        "DIFFERS {}: retention.ms {}, topics.toml says {}",
                        spec.name,
                        get("retention.ms"),
                        spec.retention_ms
                    ));
                }
                if let Some(lag) = spec.max_compaction_lag_ms {
                    if get("max.compaction.lag.ms") != lag.to_string() {
                        report.push(format!(
                            "DIFFERS {}: max.compaction.lag.ms {}, topics.toml says {lag}",
                            spec.name,
                            get("max.compaction.lag.ms"),
                        ));
                    }
                }
            }
        }
    }
    if let Some(short) = missing
        .iter()
        .find(|s| replication.unwrap_or(s.replication) > brokers)
    {
        bail!(
            "{} needs replication factor {} but the cluster has {brokers} broker(s): lower it with --replication",
            short.name,
            replication.unwrap_or(short.replication)
        );
    }
    if !missing.is_empty() {
        let retention: Vec<String> = missing.iter().map(|s| s.retention_ms.to_string()).collect();
        let lag: Vec<Option<String>> = missing
            .iter()
            .map(|s| s.max_compaction_lag_ms.map(|l| l.to_string()))
            .collect();
        let new: Vec<NewTopic> = missing
            .iter()
            .zip(retention.iter().zip(&lag))
            .map(|(s, (r, lag))| {
                let topic = NewTopic::new(
                    &s.name,
                    s.partitions,
                    TopicReplication::Fixed(replication.unwrap_or(s.replication)),
                )
                .set("cleanup.policy", &s.cleanup_policy)
                .set("retention.ms", r);
                match lag {
                    Some(lag) => topic.set("max.compaction.lag.ms", lag),
                    None => topic,
                }
            })
            .collect();
        let results = rt.block_on(admin.create_topics(new.iter(), &opts))?;
        for r in results {
            match r {
                Ok(name) => report.push(format!("CREATED {name}")),
                Err((name, e)) => report.push(format!("FAILED  {name}: {e}")),
            }
        }
    }
    if report.iter().any(|l| l.starts_with("FAILED")) {
        bail!("some topics could not be created:\n{}", report.join("\n"));
    }
    Ok(report)
}
