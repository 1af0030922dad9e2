//! `herald replay`: a recorded dump decided again under a policy, and the difference.

use super::args::*;
use crate::telemetry::{self};
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

/// The arguments of `herald replay`.
#[derive(Args, Debug)]
pub struct ReplayArgs {
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
}

/// Runs `herald replay`.
pub fn run(args: ReplayArgs) -> Result<()> {
    let ReplayArgs {
        events,
        policy,
        show,
        all,
        json,
        fail_on_difference,
        identifier_key,
    } = args;
    telemetry::init_tracing("warn")?;
    let key = identifier_key_from(&identifier_key)?;
    let topo = crate::topology_files::load(&policy)?;
    let spinner = crate::telemetry::Progress::spinner("replaying", !json);
    let mut records = Vec::new();
    for file in &events {
        spinner.say(format!("reading {}", file.display()));
        records.extend(crate::dump::read(file, &topo.names)?);
    }
    spinner.say(format!(
        "{} records through policy {}",
        records.len(),
        topo.policy.version
    ));
    let recorded = crate::dump::decisions(&records);
    let replayed = crate::replay::replay(&records, &topo, &key);
    drop(spinner);
    let report = crate::replay::Report::new(&topo.policy.version, &recorded, &replayed, show);
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
