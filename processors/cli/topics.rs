//! `herald topics apply`: the topics of `topology/topics.toml`, created or checked.

use super::args::*;
use crate::kafka::topics::topics_apply;
use crate::telemetry::{self};
use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum TopicsAction {
    /// Creates the topics of topology/topics.toml that are missing and reports what differs.
    Apply {
        #[command(flatten)]
        kafka: KafkaClientArgs,
        #[command(flatten)]
        topology: TopologyArgs,
        /// Replication factor override (the file's default is 3).
        #[arg(long)]
        replication: Option<i32>,
    },
}

/// Runs `herald topics`.
pub fn run(action: TopicsAction) -> Result<()> {
    match action {
        TopicsAction::Apply {
            kafka,
            topology: dir,
            replication,
        } => {
            telemetry::init_tracing("warn")?;
            let topo = dir.load()?;
            let settings = kafka.connect(false, "topics-apply")?;
            let report = topics_apply(&settings, &topo, replication)?;
            for line in &report {
                println!("{line}");
            }
            Ok(())
        }
    }
}
