//! `herald demo`: the whole system on this machine with nothing installed, playing a scenario.

use crate::demo;
use crate::telemetry::{self};
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

/// The arguments of `herald demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
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
    /// Where `/metrics`, `/healthz`, `/readyz` and the query API (`/v1/customers/...`) of the
    /// demo's processes listen (port 0: a free one, printed at the start).
    #[arg(long, default_value = "127.0.0.1:0")]
    metrics_addr: std::net::SocketAddr,
}

/// Runs `herald demo`.
pub fn run(args: DemoArgs) -> Result<()> {
    let DemoArgs {
        customers,
        seed,
        json,
        keep_running,
        record,
        state_dir,
        metrics_addr,
    } = args;
    let _export =
        telemetry::init_tracing_and_export(if json { "error" } else { "warn" }, "herald-demo")?;
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
        metrics_addr,
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
