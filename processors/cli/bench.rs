//! `herald bench`: throughput of the core and of the whole path.

use super::args::*;
use crate::bench;
use crate::telemetry::{self};
use anyhow::{Context, Result};
use clap::Args;

/// The arguments of `herald bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(long, default_value_t = 5_000)]
    customers: usize,
    /// Measure end to end and pass-through on these real brokers (their Herald topics
    /// empty) instead of the in-process cluster.
    #[arg(long)]
    bootstrap: Option<String>,
    /// Processor instance counts to measure in one consumer group, each on its own copy of
    /// the topics (0: skip the scale-out figures).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    instances: Vec<usize>,
    /// Also run the processors on this many customers (e.g. 1000000) through a state cache of
    /// --memory-cache customers, after a run with only as many customers as the cache holds.
    /// Real brokers only: the mock cluster keeps 5 MB of each partition, far less than a
    /// million customers' events.
    #[arg(long, requires = "bootstrap")]
    memory_customers: Option<usize>,
    /// Time the latency pass at this many events/s instead of half the measured end-to-end
    /// rate, so that two runs (two builds, two settings) compare at one rate.
    #[arg(long)]
    latency_rate: Option<f64>,
    /// The state cache of the memory runs, in customers.
    #[arg(long, default_value_t = 10_000)]
    memory_cache: usize,
    /// Measure only the core and the rebuild, on one thread with no Kafka (e.g. under
    /// `valgrind --tool=callgrind`, which counts instructions repeatably).
    #[arg(long, conflicts_with_all = ["bootstrap", "memory_customers"])]
    core_only: bool,
    /// Instead of measuring, train a state dictionary on a scenario of --customers customers
    /// and write it here (`schemas/customer_state_compact.zdict`; a dictionary that stored
    /// states must stay readable, see the README).
    #[arg(long, conflicts_with_all = ["bootstrap", "memory_customers", "core_only"])]
    train_state_dictionary: Option<std::path::PathBuf>,
    #[command(flatten)]
    security: KafkaSecurityArgs,
}

/// Runs `herald bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    let BenchArgs {
        customers,
        bootstrap,
        instances,
        memory_customers,
        memory_cache,
        latency_rate,
        core_only,
        train_state_dictionary,
        security,
    } = args;
    telemetry::init_tracing("error")?;
    if let Some(path) = train_state_dictionary {
        let topology = crate::topology::Topology::embedded()?;
        let dictionary = bench::train_state_dictionary(customers, &topology)?;
        std::fs::write(&path, dictionary)
            .with_context(|| format!("cannot write {}", path.display()))?;
        return Ok(());
    }
    if core_only {
        let topology = crate::topology::Topology::embedded()?;
        let (figures, _) = bench::core_pass(customers, &topology)?;
        println!("{}", serde_json::to_string(&figures)?);
        return Ok(());
    }
    let brokers = match &bootstrap {
        Some(b) => Some(connect(b, &security, true, "bench")?),
        None => None,
    };
    if memory_customers.is_some() && memory_cache == 0 {
        anyhow::bail!("--memory-cache must be at least 1 customer");
    }
    let memory = memory_customers.map(|customers| bench::MemoryPlan {
        customers,
        cache: memory_cache,
    });
    let r = bench::run(
        customers,
        brokers.as_ref(),
        &instances,
        memory,
        latency_rate,
    )?;
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
