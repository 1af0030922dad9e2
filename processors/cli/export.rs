//! `herald export`: the topics written to a dump file for `herald replay`.

use super::args::*;
use crate::registry::Codec;
use crate::telemetry::{self};
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;

/// The arguments of `herald export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// The dump file: `.jsonl` (JSON lines) or `.avro` (Avro container).
    #[arg(long)]
    out: PathBuf,
}

/// Runs `herald export`.
pub fn run(args: ExportArgs) -> Result<()> {
    let ExportArgs {
        cluster:
            ClusterArgs {
                kafka,
                registry,
                topology: dir,
            },
        out,
    } = args;
    telemetry::init_tracing("warn")?;
    crate::dump::Format::of(&out)?;
    let topo = dir.load()?;
    let rt = tokio::runtime::Runtime::new()?;
    let codec = Arc::new(Codec::with_settings(
        &registry.settings(&kafka.security)?,
        &topo.names,
    )?);
    let settings = kafka.connect(true, "export")?;
    let spinner = crate::telemetry::Progress::spinner("reading the cluster's topics", true);
    let records = crate::dump::export(
        &settings,
        crate::dump::replay_topics(&topo.names),
        codec,
        topo.partitions(),
        rt.handle().clone(),
    )?;
    spinner.say(format!("writing {} records", records.len()));
    let n = crate::dump::write(&out, &records)?;
    drop(spinner);
    println!("wrote {n} records to {}", out.display());
    Ok(())
}
