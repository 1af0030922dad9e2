//! Telemetry shell: tracing setup, Prometheus counters, and the small HTTP helper every Herald
//! server (registry, simulator, metrics) uses.

use anyhow::{Context, Result};
use axum::routing::get;
use axum::Router;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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
    /// Facts recognised as repeats of an earlier fact under a new event id.
    pub repeats_recognised: AtomicU64,
    by_kind: Mutex<BTreeMap<String, u64>>,
    by_reason: Mutex<BTreeMap<String, u64>>,
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

/// Serves `/metrics`, `/healthz` and `/readyz` for a running process.
pub async fn serve_metrics(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<SocketAddr> {
    let router = Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move { m.render() }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }));
    serve_router(addr, router, "metrics").await
}
