//! `herald rebuild`: every customer's state folded again from the decision log, into a fresh store.

use super::args::*;
use crate::store::StoreAddress;
use crate::telemetry::{self};
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

/// The arguments of `herald rebuild`.
#[derive(Args, Debug)]
pub struct RebuildArgs {
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
}

/// Runs `herald rebuild`.
pub fn run(args: RebuildArgs) -> Result<()> {
    let RebuildArgs {
        source,
        into,
        parallelism,
        verify,
        json,
    } = args;
    telemetry::init_tracing("warn")?;
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
    let bar = crate::telemetry::Progress::bar(total as u64, "decisions folded", !json);
    let folded = crate::rebuild::fold(&records, parallelism, &|n| bar.at(n));
    bar.say("writing the store".into());
    crate::rebuild::write(store.as_ref(), &folded)?;
    drop(bar);
    let seconds = started.elapsed().as_secs_f64();
    let decisions: u64 = folded.values().map(|f| f.decisions).sum();
    if !json {
        eprintln!("  folded {decisions} of {total} decisions");
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
