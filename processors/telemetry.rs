//! Telemetry shell: tracing setup, Prometheus metrics, and the small HTTP helper every Herald
//! server (registry, simulator, metrics) uses.

use crate::events::Channel;
use crate::trace;
use anyhow::{Context, Result};
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use prometheus::core::Collector;
use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The progress bar on screen now, if a long command shows one.
static SHOWN: Mutex<Option<indicatif::ProgressBar>> = Mutex::new(None);

/// The progress of a long command (demo, rebuild, replay, export, chaos), drawn on stderr when
/// it is a terminal and not at all otherwise (a pipe, a log file, `--json`). Log lines written
/// while it shows go above it. It leaves the screen when dropped.
pub struct Progress {
    bar: indicatif::ProgressBar,
}

impl Progress {
    /// A bar counting to `total` things (`what`: "events", "decisions").
    pub fn bar(total: u64, what: &str, shown: bool) -> Progress {
        let bar = indicatif::ProgressBar::with_draw_target(Some(total), Self::target(shown));
        let style = indicatif::ProgressStyle::with_template(&format!(
            "  {{bar:30}} {{pos:>9}}/{{len}} {what}  {{per_sec}}  eta {{eta}}  {{msg}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        bar.set_style(style);
        Self::show(bar)
    }

    /// A spinner for work whose size is not known in advance, with the time it has taken.
    pub fn spinner(what: &str, shown: bool) -> Progress {
        let bar = indicatif::ProgressBar::with_draw_target(None, Self::target(shown));
        let style = indicatif::ProgressStyle::with_template(&format!(
            "  {{spinner}} {what} {{elapsed}}  {{msg}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(120));
        Self::show(bar)
    }

    fn target(shown: bool) -> indicatif::ProgressDrawTarget {
        if shown {
            indicatif::ProgressDrawTarget::stderr_with_hz(8)
        } else {
            indicatif::ProgressDrawTarget::hidden()
        }
    }

    fn show(bar: indicatif::ProgressBar) -> Progress {
        if let Ok(mut shown) = SHOWN.lock() {
            *shown = Some(bar.clone());
        }
        Progress { bar }
    }

    /// Sets how far it is.
    pub fn at(&self, position: u64) {
        self.bar.set_position(position);
    }

    /// Sets the words after the bar.
    pub fn say(&self, message: String) {
        self.bar.set_message(message);
    }

    /// Writes a line above the bar (to stderr as it is, when the bar is hidden).
    pub fn println(&self, line: &str) {
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
        if let Ok(mut shown) = SHOWN.lock() {
            *shown = None;
        }
    }
}

/// A log writer that takes the progress bar off the screen while a line is written, so the
/// line lands above the bar and the bar is drawn again below it.
pub struct LogsAboveTheBar<W: std::io::Write> {
    sink: W,
}

impl<W: std::io::Write> std::io::Write for LogsAboveTheBar<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bar = SHOWN.lock().ok().and_then(|b| b.clone());
        match bar {
            Some(bar) => bar.suspend(|| self.sink.write_all(buf)).map(|()| buf.len()),
            None => self.sink.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.sink.flush()
    }
}

/// How log lines are written, from `HERALD_LOG_FORMAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One readable line per event (the default).
    Text,
    /// One JSON object per line, for a log pipeline: level, target, message and fields.
    Json,
}

impl LogFormat {
    /// The format `HERALD_LOG_FORMAT` names (`text` when unset); an error naming the key for
    /// anything else.
    pub fn from_setting(value: Option<&str>) -> Result<LogFormat> {
        match value.map(str::trim) {
            None | Some("") | Some("text") => Ok(LogFormat::Text),
            Some("json") => Ok(LogFormat::Json),
            Some(other) => anyhow::bail!("HERALD_LOG_FORMAT is '{other}': it takes text or json"),
        }
    }
}

/// Starts logging to stderr in the format `HERALD_LOG_FORMAT` names; `RUST_LOG` overrides the
/// level. Lines go above a progress bar on screen, never through it.
pub fn init_tracing(default_level: &str) -> Result<()> {
    init_logs_and_traces(default_level, None).map(|_| ())
}

/// As [`init_tracing`], and exports spans over OTLP as `service` when the standard `OTEL_*`
/// variables ask for it (see [`crate::trace`]); keep the guard until the process ends, so the
/// last spans are sent.
pub fn init_tracing_and_export(
    default_level: &str,
    service: &str,
) -> Result<Option<trace::Export>> {
    init_logs_and_traces(default_level, Some(service))
}

fn init_logs_and_traces(
    default_level: &str,
    service: Option<&str>,
) -> Result<Option<trace::Export>> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{Layer, Registry};
    let format = LogFormat::from_setting(std::env::var("HERALD_LOG_FORMAT").ok().as_deref())?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let logs = tracing_subscriber::fmt::layer().with_writer(|| LogsAboveTheBar {
        sink: std::io::stderr(),
    });
    let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = vec![match format {
        LogFormat::Text => logs.with_filter(filter).boxed(),
        LogFormat::Json => logs.json().flatten_event(true).with_filter(filter).boxed(),
    }];
    let export = match service {
        Some(service) => trace::export_layer::<Registry>(service)?,
        None => None,
    };
    let export = export.map(|(layer, export)| {
        layers.push(layer);
        export
    });
    // A second start in one process (tests, the demo's stages) keeps the first subscriber.
    let _ = tracing_subscriber::registry().with(layers).try_init();
    Ok(export)
}

/// Binds `addr`, serves `router` in the background, and returns the bound address.
pub async fn serve_router(addr: SocketAddr, router: Router, what: &str) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("{what}: cannot listen on {addr}"))?;
    let bound = listener.local_addr()?;
    let name = what.to_string();
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(server = %name, error = %e, "server stopped");
        }
    });
    Ok(bound)
}

/// Seconds from an instant in milliseconds since the epoch to another, never negative.
pub fn seconds_between(from_ms: i64, to_ms: i64) -> f64 {
    (to_ms - from_ms).max(0) as f64 / 1000.0
}

/// Buckets for durations from a millisecond to a minute: batches, provider calls, latency.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A committed batch's phases, in order: prepare (tables and prefetch), handle (deciding and
/// handing records to the producer), deliver (the brokers' acknowledgements of the batch's
/// records), commit (the input offsets and the end of the transaction).
pub const BATCH_PHASES: [&str; 4] = ["prepare", "handle", "deliver", "commit"];

/// How a send's provider call ended, as the `outcome` label of send metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendResult {
    /// The provider took the message.
    Accepted,
    /// No answer: the call may have reached the provider; a status webhook settles it.
    Unanswered,
    /// The provider answered with a refusal or could not deliver.
    Refused,
    /// Never called: no address, no provider for the channel, or a message that cannot be
    /// composed.
    Uncalled,
}

impl SendResult {
    fn label(self) -> &'static str {
        match self {
            SendResult::Accepted => "accepted",
            SendResult::Unanswered => "unanswered",
            SendResult::Refused => "refused",
            SendResult::Uncalled => "uncalled",
        }
    }
}

/// Every metric a Herald process exposes on `/metrics`, in one Prometheus registry: the
/// stages of the process (processors, dispatch) share it, and label what is theirs.
pub struct Metrics {
    registry: Registry,
    records_in: IntCounterVec,
    decisions: IntCounterVec,
    suppressions: IntCounterVec,
    dead_letters: IntCounterVec,
    repeats_recognised: IntCounter,
    transactions: IntCounterVec,
    sends: IntCounterVec,
    sends_settled: IntCounter,
    account_blocks: IntCounterVec,
    refusals_to_policy: IntCounter,
    sends_in_flight: IntGauge,
    lane_waiting: IntGaugeVec,
    lane_longest_wait: GaugeVec,
    breaker_opens: IntCounterVec,
    breaker_open: IntGaugeVec,
    channel_halted: IntGaugeVec,
    partitions_restored: IntCounterVec,
    customers_loaded: IntCounter,
    customers_evicted: IntCounter,
    customers_in_memory: IntGauge,
    batch_duration: HistogramVec,
    batch_phase: HistogramVec,
    provider_call_duration: HistogramVec,
    event_to_decision: HistogramVec,
    late_records: IntCounterVec,
    consumer_lag: IntGaugeVec,
    /// What `/readyz` answers from.
    pub readiness: Readiness,
}

/// Registers a metric and hands it back.
fn registered<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<M>,
) -> prometheus::Result<M> {
    let metric = metric?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

/// `herald_build_info{version}` = 1, so dashboards can tell which build runs where.
fn register_build_info(registry: &Registry) -> prometheus::Result<()> {
    let info = registered(
        registry,
        IntGaugeVec::new(
            Opts::new(
                "herald_build_info",
                "1, labelled with the running build's version.",
            ),
            &["version"],
        ),
    )?;
    info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
    Ok(())
}

/// A fresh registry holding `herald_build_info`.
pub fn process_registry() -> prometheus::Result<Registry> {
    let registry = Registry::new();
    register_build_info(&registry)?;
    Ok(registry)
}

/// The text exposition of a registry, or a line saying why it could not be written.
pub fn render_registry(registry: &Registry) -> String {
    TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap_or_else(|e| format!("# metrics could not be encoded: {e}\n"))
}

impl Metrics {
    /// A process's metrics, every one registered.
    pub fn new() -> Result<Metrics> {
        Self::build().context("building the process's metrics")
    }

    fn build() -> prometheus::Result<Metrics> {
        let r = process_registry()?;
        let counter = |name: &str, help: &str| registered(&r, IntCounter::new(name, help));
        let counters = |name: &str, help: &str, labels: &[&str]| {
            registered(&r, IntCounterVec::new(Opts::new(name, help), labels))
        };
        let gauge = |name: &str, help: &str| registered(&r, IntGauge::new(name, help));
        let gauges = |name: &str, help: &str, labels: &[&str]| {
            registered(&r, IntGaugeVec::new(Opts::new(name, help), labels))
        };
        let histograms = |name: &str, help: &str, labels: &[&str]| {
            registered(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(name, help).buckets(SECONDS_BUCKETS.to_vec()),
                    labels,
                ),
            )
        };
        let metrics = Metrics {
            records_in: counters(
                "herald_records_in_total",
                "Input records consumed and committed, by stage, topic and partition.",
                &["stage", "topic", "partition"],
            )?,
            decisions: counters(
                "herald_decisions_total",
                "Decisions written to the decision log, by kind.",
                &["kind"],
            )?,
            suppressions: counters(
                "herald_suppressions_total",
                "Messages suppressed, by reason.",
                &["reason"],
            )?,
            dead_letters: counters(
                "herald_dead_letters_total",
                "Records sent to the dead-letter topic, by the stage that refused them and their source topic.",
                &["stage", "topic"],
            )?,
            repeats_recognised: counter(
                "herald_repeats_recognised_total",
                "Facts recognised as repeats of an earlier fact under a new event id.",
            )?,
            transactions: counters(
                "herald_transactions_total",
                "Kafka transactions (or offset commits without exactly-once), by stage and outcome (committed, aborted).",
                &["stage", "outcome"],
            )?,
            sends: counters(
                "herald_sends_total",
                "Provider calls ended, by channel and outcome (accepted, unanswered, refused, uncalled).",
                &["channel", "outcome"],
            )?,
            sends_settled: counter(
                "herald_sends_settled_total",
                "Open send intents settled from status webhooks or after the reconcile wait.",
            )?,
            account_blocks: counters(
                "herald_provider_account_blocks_total",
                "Sends refused because the provider blocked the account or number, by channel.",
                &["channel"],
            )?,
            refusals_to_policy: counter(
                "herald_refusals_to_policy_total",
                "Refusals in a send's answer written back to policy as failed statuses.",
            )?,
            sends_in_flight: gauge(
                "herald_sends_in_flight",
                "Sends recorded as intended and not yet settled, as of the last commit.",
            )?,
            lane_waiting: gauges(
                "herald_dispatch_lane_waiting",
                "Sends waiting for their provider call, by lane (transactional, marketing).",
                &["lane"],
            )?,
            lane_longest_wait: registered(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "herald_dispatch_lane_longest_wait_seconds",
                        "The longest a send waited in its lane for its call since the start, by lane.",
                    ),
                    &["lane"],
                ),
            )?,
            breaker_opens: counters(
                "herald_provider_breaker_opens_total",
                "Times a provider's circuit breaker opened after calls kept failing, by channel.",
                &["channel"],
            )?,
            breaker_open: gauges(
                "herald_provider_breaker_open",
                "1 while a channel's circuit breaker keeps calls back (open or probing), else 0.",
                &["channel"],
            )?,
            channel_halted: gauges(
                "herald_provider_lane_halted",
                "1 once the provider blocked the account or number and dispatch stopped calling that channel.",
                &["channel"],
            )?,
            partitions_restored: counters(
                "herald_partitions_restored_total",
                "Partitions whose state was restored on assignment, by stage.",
                &["stage"],
            )?,
            customers_loaded: counter(
                "herald_state_customers_loaded_total",
                "Customers' states loaded from the store when an input or timer needed them.",
            )?,
            customers_evicted: counter(
                "herald_state_customers_evicted_total",
                "Customers' states let go from memory to stay within --state-cache-customers.",
            )?,
            customers_in_memory: gauge(
                "herald_state_customers_in_memory",
                "Customers' states held in memory, as of the last checkpoint.",
            )?,
            batch_duration: histograms(
                "herald_batch_duration_seconds",
                "From a batch's start to its commit, by stage.",
                &["stage"],
            )?,
            batch_phase: histograms(
                "herald_batch_phase_seconds",
                "Where a committed batch's time went, by stage and phase: prepare (tables, prefetch), handle (decide and produce), deliver (the brokers' acknowledgements), commit (offsets and the transaction's end).",
                &["stage", "phase"],
            )?,
            provider_call_duration: histograms(
                "herald_provider_call_duration_seconds",
                "Provider calls from request to answer, by channel and outcome.",
                &["channel", "outcome"],
            )?,
            event_to_decision: histograms(
                "herald_event_to_decision_seconds",
                "From an input record's timestamp to the commit of what the stage decided on it, by stage.",
                &["stage"],
            )?,
            late_records: counters(
                "herald_late_records_total",
                "Input records that reached the broker after their partition had decided records stamped later, by stage and topic.",
                &["stage", "topic"],
            )?,
            consumer_lag: gauges(
                "herald_consumer_lag",
                "Records of an assigned partition not yet consumed, as the Kafka client last reported, by stage, topic and partition.",
                &["stage", "topic", "partition"],
            )?,
            registry: r,
            readiness: Readiness::default(),
        };
        // Every channel and lane has its series from the start, so a dashboard shows 0 rather
        // than nothing, and an alert on a change sees the first one.
        for channel in [Channel::Whatsapp, Channel::Sms, Channel::Email] {
            let c = crate::events::wire_name(&channel);
            metrics.breaker_open.with_label_values(&[&c]).set(0);
            metrics.channel_halted.with_label_values(&[&c]).set(0);
            metrics.breaker_opens.with_label_values(&[&c]).inc_by(0);
            metrics.account_blocks.with_label_values(&[&c]).inc_by(0);
        }
        for lane in ["transactional", "marketing"] {
            metrics.lane_waiting.with_label_values(&[lane]).set(0);
        }
        Ok(metrics)
    }

    /// Gives a starting stage its series: its transactions, and the dead letters of records of
    /// its input topics that cannot be decoded.
    pub fn stage_started(&self, stage: &str, input_topics: &[String]) {
        for outcome in ["committed", "aborted"] {
            self.transactions
                .with_label_values(&[stage, outcome])
                .inc_by(0);
        }
        for topic in input_topics {
            self.dead_letters
                .with_label_values(&["decode", topic])
                .inc_by(0);
        }
    }

    /// A process's metrics, shared by its stages and its `/metrics` server.
    pub fn shared() -> Result<Arc<Metrics>> {
        Ok(Arc::new(Metrics::new()?))
    }

    /// The records of one topic-partition a stage committed.
    pub fn records_in(&self, stage: &str, topic: &str, partition: i32, n: u64) {
        self.records_in
            .with_label_values(&[stage, topic, &partition.to_string()])
            .inc_by(n);
    }

    /// Input records consumed so far, across stages, topics and partitions.
    pub fn records_in_total(&self) -> u64 {
        sum_counters(&self.records_in)
    }

    /// Input records `stage` consumed so far, across topics and partitions.
    pub fn records_in_of(&self, stage: &str) -> u64 {
        sum_counters_where(&self.records_in, |labels| {
            labels.contains(&("stage", stage))
        })
    }

    /// Counts a decision by its kind.
    pub fn decision(&self, kind: &str) {
        self.decisions.with_label_values(&[kind]).inc();
    }

    /// Decisions written so far.
    pub fn decisions_total(&self) -> u64 {
        sum_counters(&self.decisions)
    }

    /// Decisions so far, by kind.
    pub fn kinds(&self) -> BTreeMap<String, u64> {
        by_label(&self.decisions, "kind")
    }

    /// Suppressions so far, by reason.
    pub fn reasons(&self) -> BTreeMap<String, u64> {
        by_label(&self.suppressions, "reason")
    }

    /// Counts a suppression by its reason.
    pub fn suppression(&self, reason: &str) {
        self.suppressions.with_label_values(&[reason]).inc();
    }

    /// Counts a fact recognised as a repeat under a new event id.
    pub fn repeat_recognised(&self) {
        self.repeats_recognised.inc();
    }

    /// Facts recognised as repeats so far.
    pub fn repeats_recognised_total(&self) -> u64 {
        self.repeats_recognised.get()
    }

    /// Counts a dead letter of `stage` from `topic`.
    pub fn dead_letter(&self, stage: &str, topic: &str) {
        self.dead_letters.with_label_values(&[stage, topic]).inc();
    }

    /// Dead letters written so far.
    pub fn dead_letters_total(&self) -> u64 {
        sum_counters(&self.dead_letters)
    }

    /// Counts a transaction of `stage`, committed or aborted.
    pub fn transaction(&self, stage: &str, committed: bool) {
        let outcome = if committed { "committed" } else { "aborted" };
        self.transactions.with_label_values(&[stage, outcome]).inc();
    }

    /// Transactions committed so far by every stage of the process.
    pub fn transactions_committed(&self) -> u64 {
        sum_counters_where(&self.transactions, |labels| {
            labels.contains(&("outcome", "committed"))
        })
    }

    /// Counts a send's end on `channel`, and how long its call took when there was one.
    pub fn send_ended(&self, channel: &str, result: SendResult, call: Option<Duration>) {
        self.sends
            .with_label_values(&[channel, result.label()])
            .inc();
        if let Some(took) = call {
            self.provider_call_duration
                .with_label_values(&[channel, result.label()])
                .observe(took.as_secs_f64());
        }
    }

    /// Sends the providers accepted so far.
    pub fn sends_accepted(&self) -> u64 {
        sum_counters_where(&self.sends, |labels| {
            labels.contains(&("outcome", "accepted"))
        })
    }

    /// Counts an open intent settled without its call's answer.
    pub fn send_settled(&self) {
        self.sends_settled.inc();
    }

    /// Counts a send refused because the provider blocked the account or number.
    pub fn account_blocked(&self, channel: &str) {
        self.account_blocks.with_label_values(&[channel]).inc();
        self.channel_halted.with_label_values(&[channel]).set(1);
    }

    /// Counts a refusal handed back to policy.
    pub fn refusal_to_policy(&self) {
        self.refusals_to_policy.inc();
    }

    /// Sends intended and not yet settled, as of the last commit.
    pub fn set_sends_in_flight(&self, n: u64) {
        self.sends_in_flight.set(n as i64);
    }

    /// Sends intended and not yet settled, as last set.
    pub fn sends_in_flight(&self) -> u64 {
        self.sends_in_flight.get().max(0) as u64
    }

    /// How many sends wait in `lane` now.
    pub fn set_lane_waiting(&self, lane: &str, n: usize) {
        self.lane_waiting.with_label_values(&[lane]).set(n as i64);
    }

    /// A send left `lane` after waiting `waited_ms`: the longest wait is kept.
    pub fn lane_waited(&self, lane: &str, waited_ms: i64) {
        let g = self.lane_longest_wait.with_label_values(&[lane]);
        let secs = waited_ms.max(0) as f64 / 1000.0;
        if secs > g.get() {
            g.set(secs);
        }
    }

    /// A channel's breaker opened.
    pub fn breaker_opened(&self, channel: &str) {
        self.breaker_opens.with_label_values(&[channel]).inc();
    }

    /// Whether a channel's breaker keeps calls back now.
    pub fn set_breaker_open(&self, channel: &str, open: bool) {
        self.breaker_open
            .with_label_values(&[channel])
            .set(i64::from(open));
    }

    /// Counts a partition restored by `stage`.
    pub fn partition_restored(&self, stage: &str) {
        self.partitions_restored.with_label_values(&[stage]).inc();
    }

    /// Counts customers' states loaded from the store.
    pub fn customers_loaded(&self, n: u64) {
        self.customers_loaded.inc_by(n);
    }

    /// Customers' states loaded so far.
    pub fn customers_loaded_total(&self) -> u64 {
        self.customers_loaded.get()
    }

    /// Counts customers' states let go from memory.
    pub fn customers_evicted(&self, n: u64) {
        self.customers_evicted.inc_by(n);
    }

    /// Customers' states let go so far.
    pub fn customers_evicted_total(&self) -> u64 {
        self.customers_evicted.get()
    }

    /// Customers' states in memory as of this checkpoint.
    pub fn set_customers_in_memory(&self, n: usize) {
        self.customers_in_memory.set(n as i64);
    }

    /// Customers' states in memory, as last set.
    pub fn customers_in_memory(&self) -> u64 {
        self.customers_in_memory.get().max(0) as u64
    }

    /// A batch of `stage` committed `took` after it started.
    pub fn batch_committed(&self, stage: &str, took: Duration) {
        self.batch_duration
            .with_label_values(&[stage])
            .observe(took.as_secs_f64());
    }

    /// How long each phase of a committed batch of `stage` took (see [`BATCH_PHASES`]).
    pub fn batch_phases(&self, stage: &str, took: [Duration; 4]) {
        for (phase, took) in BATCH_PHASES.iter().zip(took) {
            self.batch_phase
                .with_label_values(&[stage, phase])
                .observe(took.as_secs_f64());
        }
    }

    /// The mean milliseconds per committed batch of `stage` in each phase, for the bench.
    pub fn batch_phase_means_ms(&self, stage: &str) -> BTreeMap<String, f64> {
        BATCH_PHASES
            .iter()
            .map(|phase| {
                let h = self.batch_phase.with_label_values(&[stage, phase]);
                let n = h.get_sample_count().max(1) as f64;
                let mean = h.get_sample_sum() / n * 1000.0;
                (phase.to_string(), (mean * 100.0).round() / 100.0)
            })
            .collect()
    }

    /// What `stage` decided on records with these timestamps (ms since the epoch) became
    /// visible at `committed_ms`.
    pub fn decided(&self, stage: &str, record_timestamps: &[i64], committed_ms: i64) {
        let h = self.event_to_decision.with_label_values(&[stage]);
        for ts in record_timestamps {
            h.observe(seconds_between(*ts, committed_ms));
        }
    }

    /// A record of `topic` came after `stage` had decided later-stamped records of its partition.
    pub fn late_record(&self, stage: &str, topic: &str) {
        self.late_records.with_label_values(&[stage, topic]).inc();
    }

    /// The consumer lag of `stage`'s assigned partitions, as its Kafka client last reported;
    /// a partition not in the report is no longer assigned and leaves the metric.
    pub fn set_consumer_lag(&self, stage: &str, lags: &[(String, i32, i64)]) {
        let reported: BTreeSet<(String, String)> = lags
            .iter()
            .map(|(t, p, _)| (t.clone(), p.to_string()))
            .collect();
        for family in self.consumer_lag.collect() {
            for m in family.get_metric() {
                let label = |name: &str| {
                    m.get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map(|l| l.value().to_string())
                        .unwrap_or_default()
                };
                let (s, t, p) = (label("stage"), label("topic"), label("partition"));
                if s == stage && !reported.contains(&(t.clone(), p.clone())) {
                    let _ = self.consumer_lag.remove_label_values(&[&s, &t, &p]);
                }
            }
        }
        for (topic, partition, lag) in lags {
            self.consumer_lag
                .with_label_values(&[stage, topic, &partition.to_string()])
                .set(*lag);
        }
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        render_registry(&self.registry)
    }
}

/// A counter family's series summed by the value of one label.
fn by_label(v: &IntCounterVec, label: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for family in v.collect() {
        for m in family.get_metric() {
            if let Some(l) = m.get_label().iter().find(|l| l.name() == label) {
                *out.entry(l.value().to_string()).or_default() +=
                    m.get_counter().get_value() as u64;
            }
        }
    }
    out
}

/// The sum of every series of a counter family.
fn sum_counters(v: &IntCounterVec) -> u64 {
    sum_counters_where(v, |_| true)
}

/// The sum of the series of a counter family whose labels (name, value) pass `keep`.
fn sum_counters_where(v: &IntCounterVec, keep: impl Fn(&[(&str, &str)]) -> bool) -> u64 {
    v.collect()
        .iter()
        .flat_map(|f| f.get_metric())
        .filter(|m| {
            let labels: Vec<(&str, &str)> = m
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            keep(&labels)
        })
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

/// Where a stage stands on its way to consuming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StagePhase {
    /// Creating its clients and registering its transactional id.
    Starting,
    /// Rebuilding a newly assigned partition's state from the decision log.
    Restoring { partition: i32 },
    /// In its consume loop.
    Consuming,
    /// Left its consume loop (asked to stop, or failed).
    Stopped,
}

/// What a stage's Kafka client last reported of its consumer group (librdkafka statistics):
/// `state` is `up` while the coordinator is connected, `join_state` is `steady` once the member
/// has joined and holds its assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupReport {
    pub state: String,
    pub join_state: String,
    pub at: Instant,
}

/// How long a group report stays good: the client reports every second, so silence this long
/// means the stage's loop is stuck (a restore or a commit waiting on the brokers).
pub const GROUP_REPORT_GOOD_FOR: Duration = Duration::from_secs(15);

#[derive(Debug, Clone)]
struct StageReadiness {
    phase: StagePhase,
    group: Option<GroupReport>,
}

/// Readiness of every stage a process runs, for `/readyz`: ready when each has joined its
/// group, restored its partitions and is consuming, with its group coordinator connected.
#[derive(Debug, Default)]
pub struct Readiness {
    stages: Mutex<BTreeMap<String, StageReadiness>>,
}

impl Readiness {
    /// Records where `stage` stands.
    pub fn phase(&self, stage: &str, phase: StagePhase) {
        self.update(stage, |s| s.phase = phase);
    }

    /// Records what `stage`'s client last said of its group.
    pub fn group(&self, stage: &str, report: GroupReport) {
        self.update(stage, |s| s.group = Some(report));
    }

    // The consume loop reports on every poll: the stage's name is allocated only once.
    fn update(&self, stage: &str, f: impl FnOnce(&mut StageReadiness)) {
        if let Ok(mut m) = self.stages.lock() {
            match m.get_mut(stage) {
                Some(s) => f(s),
                None => f(m.entry(stage.to_string()).or_insert(StageReadiness {
                    phase: StagePhase::Starting,
                    group: None,
                })),
            }
        }
    }

    /// `Ok` when every stage is ready at `now`, else each stage's reason for not being so.
    pub fn verdict(&self, now: Instant) -> std::result::Result<(), Vec<String>> {
        let stages = match self.stages.lock() {
            Ok(m) => m.clone(),
            Err(_) => return Err(vec!["readiness state poisoned".into()]),
        };
        if stages.is_empty() {
            return Err(vec!["no stage has started yet".into()]);
        }
        let reasons: Vec<String> = stages
            .iter()
            .filter_map(|(name, s)| not_ready(s, now).map(|why| format!("{name}: {why}")))
            .collect();
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons)
        }
    }
}

/// Why one stage is not ready, if it is not.
fn not_ready(s: &StageReadiness, now: Instant) -> Option<String> {
    match s.phase {
        StagePhase::Starting => return Some("starting".into()),
        StagePhase::Restoring { partition } => {
            return Some(format!("restoring partition {partition}"))
        }
        StagePhase::Stopped => return Some("stopped".into()),
        StagePhase::Consuming => {}
    }
    let Some(g) = &s.group else {
        return Some("joining its consumer group (no report from the Kafka client yet)".into());
    };
    let age = now.saturating_duration_since(g.at);
    if age > GROUP_REPORT_GOOD_FOR {
        return Some(format!(
            "no report from its Kafka client for {} s",
            age.as_secs()
        ));
    }
    if g.state != "up" {
        return Some(format!(
            "lost its group coordinator (group state {})",
            g.state
        ));
    }
    if g.join_state != "steady" {
        return Some(format!("joining its consumer group ({})", g.join_state));
    }
    None
}

/// Serves `/metrics`, `/healthz` and `/readyz` for a running process. `/healthz` says the
/// process lives; `/readyz` answers 503, naming what each stage waits for, until every stage
/// has joined its group, restored its partitions and is consuming, and again once it lost its
/// group coordinator (the brokers).
/// `also` adds routes of the process's own (the query API).
pub async fn serve_metrics(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    also: Router,
) -> Result<SocketAddr> {
    let ready = metrics.clone();
    let router = also
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move { m.render() }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let m = ready.clone();
                async move {
                    match m.readiness.verdict(Instant::now()) {
                        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                        Err(why) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready\n{}\n", why.join("\n")),
                        ),
                    }
                }
            }),
        );
    serve_router(addr, router, "metrics").await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_land_above_the_progress_bar_and_leave_it_whole() {
        use std::io::Write;
        let term = indicatif::InMemoryTerm::new(10, 100);
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(100),
            indicatif::ProgressDrawTarget::term_like(Box::new(term.clone())),
        );
        bar.set_style(indicatif::ProgressStyle::with_template("[{bar:10}] {pos}/{len}").unwrap());
        let _shown = Progress::show(bar.clone());
        bar.set_position(40);
        // The log line goes to the same screen, as stderr would take it.
        struct Screen(indicatif::InMemoryTerm);
        impl Write for Screen {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                let line = String::from_utf8_lossy(buf);
                indicatif::TermLike::write_line(&self.0, line.trim_end())?;
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut log = LogsAboveTheBar {
            sink: Screen(term.clone()),
        };
        log.write_all(b"WARN a log line\n").unwrap();
        bar.set_position(41);
        let screen = term.contents();
        let lines: Vec<&str> = screen.lines().collect();
        assert_eq!(lines.len(), 2, "{screen}");
        assert_eq!(lines[0], "WARN a log line", "{screen}");
        assert!(lines[1].starts_with("[█"), "the bar below, whole: {screen}");
        assert!(lines[1].ends_with("41/100"), "{screen}");
    }

    #[test]
    fn the_log_format_is_text_or_json_and_anything_else_names_the_setting() {
        assert_eq!(LogFormat::from_setting(None).unwrap(), LogFormat::Text);
        assert_eq!(
            LogFormat::from_setting(Some("json")).unwrap(),
            LogFormat::Json
        );
        let e = LogFormat::from_setting(Some("xml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("HERALD_LOG_FORMAT") && e.contains("xml"), "{e}");
    }

    fn report(state: &str, join_state: &str, at: Instant) -> GroupReport {
        GroupReport {
            state: state.into(),
            join_state: join_state.into(),
            at,
        }
    }

    #[test]
    fn ready_only_when_every_stage_consumes_in_a_steady_group_with_its_coordinator() {
        let r = Readiness::default();
        let t0 = Instant::now();
        assert!(r.verdict(t0).is_err(), "nothing started");
        r.phase("processors", StagePhase::Starting);
        r.phase("dispatch", StagePhase::Consuming);
        r.group("dispatch", report("up", "steady", t0));
        assert_eq!(r.verdict(t0), Err(vec!["processors: starting".into()]));
        r.phase("processors", StagePhase::Consuming);
        r.group("processors", report("up", "wait-join", t0));
        let why = r.verdict(t0).unwrap_err();
        assert!(why[0].contains("joining"), "{why:?}");
        r.phase("processors", StagePhase::Restoring { partition: 3 });
        r.group("processors", report("up", "steady", t0));
        assert_eq!(
            r.verdict(t0),
            Err(vec!["processors: restoring partition 3".into()])
        );
        r.phase("processors", StagePhase::Consuming);
        assert_eq!(r.verdict(t0), Ok(()));
        // The brokers went away: the client goes back to looking for its coordinator.
        r.group("dispatch", report("query-coord", "steady", t0));
        let why = r.verdict(t0).unwrap_err();
        assert!(
            why[0].starts_with("dispatch: lost its group coordinator"),
            "{why:?}"
        );
        r.group("dispatch", report("up", "steady", t0));
        // A loop stuck long enough that its client has not reported is not ready either.
        let later = t0 + GROUP_REPORT_GOOD_FOR + Duration::from_secs(1);
        assert_eq!(r.verdict(later).unwrap_err().len(), 2);
    }
}
