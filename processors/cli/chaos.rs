//! `herald chaos`: a run with processes (and brokers) killed, checked for every guarantee.

use super::args::*;
use crate::telemetry::{self};
use anyhow::{bail, Result};
use clap::Args;
use std::time::Duration;

/// The arguments of `herald chaos`.
#[derive(Args, Debug)]
pub struct ChaosArgs {
    /// Customers in the scenario (about 15 events each; 13,500 give over 200,000 events).
    #[arg(long, default_value_t = 13_500)]
    customers: usize,
    /// Seed of the scenario: the same seed, the same events.
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
    /// Time between two broker kills; the first comes a quarter of this into the run.
    #[arg(long, default_value_t = 60)]
    broker_kill_every_secs: u64,
    /// How long a killed broker stays down.
    #[arg(long, default_value_t = 10)]
    broker_down_secs: u64,
    /// The processors' state cache, in customers (0: all in memory); fewer than --customers
    /// makes states leave memory and come back from the store during the run.
    #[arg(long, default_value_t = crate::kafka::STATE_CACHE_CUSTOMERS)]
    state_cache_customers: usize,
}

/// Runs `herald chaos`.
pub fn run(args: ChaosArgs) -> Result<()> {
    let ChaosArgs {
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
        state_cache_customers,
    } = args;
    telemetry::init_tracing("error")?;
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
        state_cache: state_cache_customers,
    };
    // Its own lines (kills, restarts) go above the spinner, as log lines do.
    let spinner = crate::telemetry::Progress::spinner("chaos", !json);
    let report = crate::chaos::run(&opts, |line| {
        if !json {
            spinner.println(&line);
        }
    })?;
    drop(spinner);
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
