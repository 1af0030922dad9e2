//! Telemetry shell: tracing setup, Prometheus counters, and the small HTTP helper every Herald
//! server (registry, simulator, metrics) uses.

use anyhow::{Context, Result};
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Starts logging to stderr; `RUST_LOG` overrides the level.
pub fn init_tracing(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
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

/// Appends one counter in the Prometheus text format.
pub fn counter_line(out: &mut String, name: &str, help: &str, value: u64) {
    out.push_str(&format!(
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
    ));
}

/// Counters a processor exposes on `/metrics`.
#[derive(Default)]
pub struct Metrics {
    pub records_in: AtomicU64,
    pub decisions_out: AtomicU64,
    pub dead_letters: AtomicU64,
    pub transactions: AtomicU64,
    pub aborted_transactions: AtomicU64,
    pub sends: AtomicU64,
    pub send_failures: AtomicU64,
    /// Calls that may have reached the provider but got no answer.
    pub sends_unanswered: AtomicU64,
    /// Open intents settled from status webhooks or the reconcile wait.
    pub sends_settled: AtomicU64,
    /// Sends the provider refused because the account or number is blocked: an alert.
    pub account_blocks: AtomicU64,
    /// Refusals in a call's answer handed back to policy as failed statuses.
    pub refusals_to_policy: AtomicU64,
    /// Sends recorded as intended and not yet settled, as of the last commit (a gauge).
    pub sends_in_flight: AtomicU64,
    /// Sends waiting for their call in the transactional lane (a gauge).
    pub waiting_transactional: AtomicU64,
    /// Sends waiting for their call in the marketing lane (a gauge).
    pub waiting_marketing: AtomicU64,
    /// The longest a transactional send waited in its lane, in milliseconds.
    pub longest_wait_transactional_ms: AtomicU64,
    /// The longest a marketing send waited in its lane, in milliseconds.
    pub longest_wait_marketing_ms: AtomicU64,
    /// Times a provider's circuit breaker opened.
    pub breaker_opens: AtomicU64,
    /// 1 once a provider blocked the account or number and its lane stopped (a gauge).
    pub lanes_halted: AtomicU64,
    pub restored_partitions: AtomicU64,
    /// Customers' states loaded from the store because an input or a timer needed them.
    pub customers_loaded: AtomicU64,
    /// Customers' states let go from memory to keep within the state cache.
    pub customers_evicted: AtomicU64,
    /// Customers' states in memory, as of the last checkpoint (a gauge).
    pub customers_in_memory: AtomicU64,
    /// Facts recognised as repeats of an earlier fact under a new event id.
    pub repeats_recognised: AtomicU64,
    by_kind: Mutex<BTreeMap<String, u64>>,
    by_reason: Mutex<BTreeMap<String, u64>>,
    /// What `/readyz` answers from.
    pub readiness: Readiness,
}

impl Metrics {
    /// A shared set of counters.
    pub fn shared() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    /// Adds one to an atomic counter.
    pub fn inc(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }

    /// Counts a decision by its kind.
    pub fn count_kind(&self, kind: &str) {
        if let Ok(mut m) = self.by_kind.lock() {
            *m.entry(kind.to_string()).or_default() += 1;
        }
    }

    /// Counts a suppression by its reason.
    pub fn count_reason(&self, reason: &str) {
        if let Ok(mut m) = self.by_reason.lock() {
            *m.entry(reason.to_string()).or_default() += 1;
        }
    }

    /// Decisions by kind so far.
    pub fn kinds(&self) -> BTreeMap<String, u64> {
        self.by_kind.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Suppressions by reason so far.
    pub fn reasons(&self) -> BTreeMap<String, u64> {
        self.by_reason.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Prometheus text exposition of every counter.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut line = |name: &str, help: &str, v: u64| counter_line(&mut out, name, help, v);
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        line(
            "herald_records_in_total",
            "Input records consumed.",
            g(&self.records_in),
        );
        line(
            "herald_decisions_total",
            "Decisions produced.",
            g(&self.decisions_out),
        );
        line(
            "herald_dead_letters_total",
            "Records sent to herald.dlq.v1.",
            g(&self.dead_letters),
        );
        line(
            "herald_repeats_recognised_total",
            "Facts recognised as repeats of an earlier fact under a new event id.",
            g(&self.repeats_recognised),
        );
        line(
            "herald_transactions_total",
            "Kafka transactions committed.",
            g(&self.transactions),
        );
        line(
            "herald_transactions_aborted_total",
            "Kafka transactions aborted.",
            g(&self.aborted_transactions),
        );
        line(
            "herald_sends_total",
            "Messages accepted by the provider.",
            g(&self.sends),
        );
        line(
            "herald_send_failures_total",
            "Provider calls that failed.",
            g(&self.send_failures),
        );
        line(
            "herald_sends_unanswered_total",
            "Provider calls that got no answer; their intents wait for a status webhook.",
            g(&self.sends_unanswered),
        );
        line(
            "herald_sends_settled_total",
            "Open send intents settled from status webhooks or after the reconcile wait.",
            g(&self.sends_settled),
        );
        line(
            "herald_provider_account_blocks_total",
            "Sends refused because the provider blocked the account or number (alert on any).",
            g(&self.account_blocks),
        );
        line(
            "herald_refusals_to_policy_total",
            "Refusals in a send's answer written back to policy as failed statuses.",
            g(&self.refusals_to_policy),
        );
        line(
            "herald_state_customers_loaded_total",
            "Customers' states loaded from the store when an input or timer needed them.",
            g(&self.customers_loaded),
        );
        line(
            "herald_state_customers_evicted_total",
            "Customers' states let go from memory to stay within --state-cache-customers.",
            g(&self.customers_evicted),
        );
        line(
            "herald_state_customers_in_memory",
            "Customers' states held in memory, as of the last checkpoint.",
            g(&self.customers_in_memory),
        );
        line(
            "herald_sends_in_flight",
            "Sends recorded as intended and not yet settled, as of the last commit.",
            g(&self.sends_in_flight),
        );
        line(
            "herald_dispatch_waiting_transactional",
            "Transactional and authentication sends waiting for their provider call.",
            g(&self.waiting_transactional),
        );
        line(
            "herald_dispatch_waiting_marketing",
            "Marketing sends waiting for their provider call.",
            g(&self.waiting_marketing),
        );
        line(
            "herald_dispatch_longest_wait_transactional_ms",
            "The longest a transactional send waited for its call since the start.",
            g(&self.longest_wait_transactional_ms),
        );
        line(
            "herald_dispatch_longest_wait_marketing_ms",
            "The longest a marketing send waited for its call since the start.",
            g(&self.longest_wait_marketing_ms),
        );
        line(
            "herald_provider_breaker_opens_total",
            "Times a provider's circuit breaker opened after calls kept failing.",
            g(&self.breaker_opens),
        );
        line(
            "herald_provider_lane_halted",
            "1 when a provider blocked the account or number and dispatch stopped calling it (alert).",
            g(&self.lanes_halted),
        );
        line(
            "herald_partitions_restored_total",
            "Partitions whose state was restored on assignment.",
            g(&self.restored_partitions),
        );
        if let Ok(m) = self.by_kind.lock() {
            out.push_str("# HELP herald_decisions_by_kind_total Decisions by kind.\n# TYPE herald_decisions_by_kind_total counter\n");
            for (k, v) in m.iter() {
                out.push_str(&format!(
                    "herald_decisions_by_kind_total{{kind=\"{k}\"}} {v}\n"
                ));
            }
        }
        out
    }
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
pub async fn serve_metrics(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<SocketAddr> {
    let ready = metrics.clone();
    let router = Router::new()
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
