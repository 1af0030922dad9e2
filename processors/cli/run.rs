//! `herald run`: the processors and/or dispatch against a Kafka cluster, a registry and a store.

use super::args::*;
use crate::events::Channel;
use crate::kafka::{self};
use crate::provider::email::EmailClient;
use crate::provider::sms::SmsClient;
use crate::provider::whatsapp::CloudApiClient;
use crate::provider::Providers;
use crate::registry::Codec;
use crate::stages::{DispatchStage, ProcessorStage};
use crate::store::StoreAddress;
use crate::telemetry::{self, Metrics};
use crate::topology::Topology;
use anyhow::{anyhow, bail, Context, Result};
use clap::ValueEnum;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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
    /// Which stages this process runs: the processors (dedupe, ordering guard, policy),
    /// dispatch, or both.
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
    /// The WhatsApp Cloud API's root (Graph API).
    pub provider_url: String,
    /// The WhatsApp sender's phone number id; dispatch needs it.
    #[arg(long, env = "HERALD_PHONE_NUMBER_ID", default_value = "")]
    pub phone_number_id: String,
    #[arg(
        long,
        env = "HERALD_PROVIDER_TOKEN",
        default_value = "",
        hide_env_values = true
    )]
    /// The Cloud API access token (a system user's); dispatch needs it. Never printed.
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
    #[arg(long, env = "HERALD_SENDER_RATE", default_value_t = crate::pacing::DEFAULT_LIMITS.sender_per_second)]
    pub sender_rate: f64,
    /// Messages the phone number may send at once after a quiet spell (default: one
    /// second's worth).
    #[arg(long, env = "HERALD_SENDER_BURST")]
    pub sender_burst: Option<f64>,
    /// Milliseconds between two messages to one recipient once their burst is spent (the
    /// provider's pair rate limit).
    #[arg(long, env = "HERALD_PAIR_INTERVAL_MS", default_value_t = crate::pacing::DEFAULT_LIMITS.pair_interval_ms, value_parser = clap::value_parser!(u64).range(1..))]
    pub pair_interval_ms: u64,
    /// Messages one recipient may get at once before the pair interval applies.
    #[arg(long, env = "HERALD_PAIR_BURST", default_value_t = crate::pacing::DEFAULT_LIMITS.pair_burst as u32, value_parser = clap::value_parser!(u32).range(1..))]
    pub pair_burst: u32,
    /// Provider calls under way at once, at most.
    #[arg(long, env = "HERALD_MAX_CALLS", default_value_t = crate::pacing::DEFAULT_LIMITS.max_calls as u32, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_calls: u32,
    /// A provider's circuit breaker judges it by the calls that ended in this many last
    /// milliseconds...
    #[arg(long, env = "HERALD_BREAKER_WINDOW_MS", default_value_t = crate::pacing::DEFAULT_LIMITS.breaker_window_ms as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pub breaker_window_ms: u64,
    /// ...once at least this many ended in it...
    #[arg(long, env = "HERALD_BREAKER_MIN_CALLS", default_value_t = crate::pacing::DEFAULT_LIMITS.breaker_min_calls, value_parser = clap::value_parser!(u32).range(1..))]
    pub breaker_min_calls: u32,
    /// ...and opens when at least this share of them failed (unreachable, 5xx, no answer).
    #[arg(long, env = "HERALD_BREAKER_FAILURE_SHARE", default_value_t = crate::pacing::DEFAULT_LIMITS.breaker_failure_share)]
    pub breaker_failure_share: f64,
    /// How long an open breaker holds every call to that provider before one probe call.
    #[arg(long, env = "HERALD_BREAKER_COOLDOWN_MS", default_value_t = crate::pacing::DEFAULT_LIMITS.breaker_cooldown_ms as u64)]
    pub breaker_cooldown_ms: u64,
    /// Where `/metrics`, `/healthz`, `/readyz` and the query API (`/v1/customers/...`) listen.
    #[arg(long, env = "HERALD_METRICS_ADDR", default_value = "0.0.0.0:9464")]
    pub metrics_addr: SocketAddr,
    /// The most input records one transaction takes.
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
    #[arg(long, env = "HERALD_MAX_TASK_IDLE_MS", default_value_t = crate::kafka::MAX_TASK_IDLE_MS)]
    pub max_task_idle_ms: u64,
    /// Every this many seconds, partitions with a timer due by the wall clock are advanced to it,
    /// so a deferral or journey step fires even when no new input arrives; 0 leaves timers to
    /// event time alone (for a backfill of old events, whose stream time is in the past).
    #[arg(long, env = "HERALD_WALL_CLOCK_TICK_SECS", default_value_t = 5)]
    pub wall_clock_tick_secs: u64,
    /// How often the processors save changed customers to the state store, in milliseconds;
    /// a restart replays the decision log since the last save. 0 saves after every
    /// transaction (the most store writes, the least replay).
    #[arg(long, env = "HERALD_CHECKPOINT_MS", default_value_t = crate::kafka::CHECKPOINT_MS)]
    pub checkpoint_ms: u64,
    /// How many customers' states the processors keep in memory, across their partitions; the
    /// others are loaded from the store when an input or timer of theirs comes. 0 keeps every
    /// customer of the partitions owned.
    #[arg(long, env = "HERALD_STATE_CACHE_CUSTOMERS", default_value_t = crate::kafka::STATE_CACHE_CUSTOMERS)]
    pub state_cache_customers: usize,
    /// Join the consumer group as a static member named after the instance id, so a restarted
    /// process (same HERALD_INSTANCE_ID) takes its partitions back without a rebalance.
    #[arg(long, env = "HERALD_STATIC_MEMBERSHIP")]
    pub static_membership: bool,
    /// How long the group waits for a silent member (a killed process) before its partitions
    /// move on: shorter fails over faster, longer rides out pauses.
    #[arg(long, env = "HERALD_SESSION_TIMEOUT_MS", default_value_t = 10_000)]
    pub session_timeout_ms: u32,
}

/// The providers dispatch sends through: the Cloud API always, SMS and e-mail when their
/// settings are all given; a channel without them dead-letters its messages with the settings
/// it lacks.
pub(crate) fn providers(args: &RunArgs) -> Result<Providers> {
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

/// The pacing limits of `herald run`'s dispatch, each checked under its own name.
pub(crate) fn send_limits(args: &RunArgs) -> Result<crate::pacing::Limits> {
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
pub(crate) fn runtime_with_registry(
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

/// Runs `herald run`.
pub fn run(args: RunArgs) -> Result<()> {
    // A long-running stage: an operator reads aborts, rebalances and outages in its log.
    let service = match args.stage {
        StageName::Processors => "herald-processors",
        StageName::Dispatch => "herald-dispatch",
        StageName::All => "herald",
    };
    let _export = telemetry::init_tracing_and_export("info", service)?;
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
    let metrics = Metrics::shared()?;
    let owners = Arc::new(crate::query::GroupOwners::new(&settings)?);
    let query = crate::query::routes(Arc::new(crate::query::QueryApi {
        store: store.clone(),
        topology: topo.clone(),
        instance: instance.clone(),
        owners: Some(owners.clone()),
    }));
    let bound = rt.block_on(telemetry::serve_metrics(
        args.metrics_addr,
        metrics.clone(),
        query,
    ))?;
    owners.listening_on(bound.port());
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
        let checkpoint = Duration::from_millis(args.checkpoint_ms);
        let cache = (args.state_cache_customers > 0).then_some(args.state_cache_customers);
        handles.push(std::thread::spawn(move || {
            let mut stage = ProcessorStage::new(t, c, store, h.clone(), m.clone(), k)
                .with_wall_clock_tick(tick)
                .with_checkpoint_interval(checkpoint)
                .with_state_cache(cache);
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
