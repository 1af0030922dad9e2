//! `herald schemas register`: every subject registered, with BACKWARD compatibility.

use super::args::*;
use crate::registry::Codec;
use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum SchemasAction {
    /// Registers every Herald schema under `<topic>-value` (idempotent).
    Register {
        #[command(flatten)]
        registry: RegistryArgs,
        /// The Kafka properties file may hold the registry's settings.
        #[command(flatten)]
        security: KafkaSecurityArgs,
        /// The topology whose topic names give the subjects.
        #[command(flatten)]
        topology: TopologyArgs,
    },
}

/// Runs `herald schemas`.
pub fn run(action: SchemasAction) -> Result<()> {
    match action {
        SchemasAction::Register {
            registry,
            security,
            topology,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            let registry = registry.settings(&security)?;
            rt.block_on(crate::registry::ping(&registry))?;
            let codec = Codec::with_settings(&registry, &topology.load()?.names)?;
            rt.block_on(codec.require_backward_compatibility(&registry))?;
            for (subject, id) in rt.block_on(codec.register_all())? {
                println!("{subject}\tid {id}");
            }
            Ok(())
        }
    }
}
