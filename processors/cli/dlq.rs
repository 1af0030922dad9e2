//! `herald dlq`: list the dead-letter topic, or replay its records to where they came from.

use super::args::*;
use super::run::runtime_with_registry;
use crate::telemetry::{self};
use anyhow::{bail, Result};
use clap::{Args, Subcommand};

/// Where the dead-letter topic is, and which of its records a `herald dlq` command acts on.
#[derive(Args, Debug)]
pub struct DlqArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// A dead letter's id (`partition:offset`, as the list shows); repeat for several.
    #[arg(long = "id")]
    pub ids: Vec<String>,
    /// Only dead letters whose reason contains this text (case-insensitive).
    #[arg(long)]
    pub reason: Option<String>,
    /// Only dead letters written at or after this instant (RFC 3339).
    #[arg(long)]
    pub since: Option<String>,
    /// Only dead letters written before this instant (RFC 3339).
    #[arg(long)]
    pub until: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum DlqAction {
    /// Lists the dead letters (all, or those selected): id, time, stage, origin and reason.
    List {
        #[command(flatten)]
        args: DlqArgs,
    },
    /// Writes the selected dead letters' records back to their topic and partition. A dry run
    /// unless --execute; a replayed record is deduplicated like the first, so nothing is sent twice.
    Replay {
        #[command(flatten)]
        args: DlqArgs,
        /// Replay every dead letter (a replay needs a selection otherwise).
        #[arg(long)]
        all: bool,
        /// Really write them (the default only shows what would be replayed).
        #[arg(long)]
        execute: bool,
    },
}

/// `herald dlq list` and `herald dlq replay`.
pub fn run(action: DlqAction) -> Result<()> {
    telemetry::init_tracing("warn")?;
    let (args, replay) = match action {
        DlqAction::List { args } => (args, None),
        DlqAction::Replay { args, all, execute } => (args, Some((all, execute))),
    };
    crate::dlq::check_ids(&args.ids)?;
    let selection = crate::dlq::Selection {
        ids: args.ids.clone(),
        reason: args.reason.clone(),
        since: args
            .since
            .as_deref()
            .map(|t| parse_instant("--since", t))
            .transpose()?,
        until: args
            .until
            .as_deref()
            .map(|t| parse_instant("--until", t))
            .transpose()?,
    };
    if let Some((false, _)) = replay {
        if selection.is_empty() {
            bail!("herald dlq replay needs --id, --reason, --since or --until (or --all for every dead letter)");
        }
    }
    let topo = args.cluster.topology.load()?;
    let partitions = topo
        .topics
        .iter()
        .find(|t| t.role == Some(crate::topology::TopicRole::Dlq))
        .map_or(topo.partitions(), |t| t.partitions);
    let (rt, codec) = runtime_with_registry(
        &args
            .cluster
            .registry
            .settings(&args.cluster.kafka.security)?,
        &topo,
    )?;
    let settings = args.cluster.kafka.connect(true, "herald-dlq")?;
    let entries: Vec<crate::dlq::Entry> = crate::dlq::read_all(&settings, &codec, &rt, partitions)?
        .into_iter()
        .filter(|e| selection.selects(e))
        .collect();
    let Some((_, execute)) = replay else {
        if args.json {
            for e in &entries {
                println!("{}", serde_json::to_string(e)?);
            }
        } else {
            println!("{} dead letters", entries.len());
            for e in &entries {
                println!(
                    "  {:<8} {}  {:<10} {}/{}@{}  {}",
                    e.id,
                    crate::events::rfc3339(e.failed_at),
                    e.stage,
                    e.source_topic,
                    e.source_partition,
                    e.source_offset,
                    e.reason
                );
            }
        }
        return Ok(());
    };
    let done = crate::dlq::replay(&settings, topo.names.dlq(), &rt, &entries, execute)?;
    if args.json {
        for r in &done {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        let verb = if execute {
            "replayed"
        } else {
            "would replay (dry run; --execute to write)"
        };
        let written = done.iter().filter(|r| r.skipped.is_none()).count();
        println!("{verb}: {written} of {} selected dead letters", done.len());
        for r in &done {
            match (&r.skipped, r.offset) {
                (Some(why), _) => println!("  {:<8} skipped: {why}", r.id),
                (None, Some(o)) => {
                    println!("  {:<8} -> {}/{}@{o}", r.id, r.to_topic, r.to_partition)
                }
                (None, None) => println!("  {:<8} -> {}/{}", r.id, r.to_topic, r.to_partition),
            }
        }
    }
    Ok(())
}
