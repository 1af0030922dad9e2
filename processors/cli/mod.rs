//! The `herald` command line: one module per command, each with its arguments and what it
//! runs; `args` holds the arguments several commands share.

pub mod args;
pub mod audit;
pub mod bench;
pub mod chaos;
pub mod demo;
pub mod dlq;
pub mod export;
pub mod gateway;
pub mod rebuild;
pub mod registry;
pub mod replay;
pub mod run;
pub mod schemas;
pub mod simulator;
pub mod state;
pub mod topics;

use anyhow::Result;
use audit::AuditAction;
use clap::{Parser, Subcommand};
use dlq::DlqAction;
use gateway::GatewayArgs;
use run::RunArgs;
use schemas::SchemasAction;
use simulator::SimulatorArgs;
use std::net::SocketAddr;
use topics::TopicsAction;

/// Herald governs a brand's WhatsApp messaging from Kafka events.
#[derive(Parser, Debug)]
#[command(name = "herald", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Runs the whole system on this machine with nothing installed and plays a scenario.
    Demo(demo::DemoArgs),
    /// Folds every customer's state again from the decision log, from offset 0, into a fresh
    /// store directory or keyspace, and prints a digest of the result; sends nothing.
    Rebuild(rebuild::RebuildArgs),
    /// A customer's projected state from the store: consent by purpose and channel, session
    /// window, recent sends, journeys, orders, and consent history.
    State(state::StateArgs),
    /// Backtests a policy: runs a topic dump's events through the policy and journeys of DIR,
    /// with no Kafka, and prints how the decisions differ from the ones recorded in the dump.
    Replay(replay::ReplayArgs),
    /// The dead-letter topic: list its records, or replay them to where they came from.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Consent audit: a customer's consent timeline, and the hash chain check of every customer's.
    Audit {
        #[command(subcommand)]
        action: AuditAction,
    },
    /// Writes the inputs, stock levels and decisions of a cluster to a dump file for `herald replay`.
    Export(export::ExportArgs),
    /// Measures core, end-to-end and passthrough throughput; prints one JSON line.
    Bench(bench::BenchArgs),
    /// Proves crash safety: runs the processors and dispatch as separate processes on an
    /// in-process cluster (or real brokers with --bootstrap), SIGKILLs one every few seconds
    /// (and a broker now and then, when told how) while the scenario is fed, and prints one
    /// line of checks (all must be 0; exits 1 otherwise).
    Chaos(chaos::ChaosArgs),
    /// Runs the processors and/or dispatch against a Kafka cluster, a registry and a store.
    Run(Box<RunArgs>),
    /// Topic administration.
    Topics {
        #[command(subcommand)]
        action: TopicsAction,
    },
    /// Schema administration.
    Schemas {
        #[command(subcommand)]
        action: SchemasAction,
    },
    /// Serves Herald's schema registry subset (for local development and tests).
    Registry {
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
    },
    /// Serves the webhook endpoint the WhatsApp Cloud API posts to: verifies each webhook's
    /// signature, turns statuses, inbound messages and template changes into provider events,
    /// and answers 200 once Kafka has acknowledged them.
    Gateway(Box<GatewayArgs>),
    /// Serves the provider simulator: the WhatsApp Cloud API, the SMS provider and the e-mail
    /// provider, with their limits, failures and signed status callbacks (for local
    /// development and load tests).
    Simulator(Box<SimulatorArgs>),
}

/// Runs one command.
pub fn main(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Rebuild(args) => rebuild::run(args),
        Command::State(args) => state::run(args),
        Command::Replay(args) => replay::run(args),
        Command::Dlq { action } => dlq::run(action),
        Command::Audit { action } => audit::run(action),
        Command::Export(args) => export::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Chaos(args) => chaos::run(args),
        Command::Run(args) => run::run(*args),
        Command::Topics { action } => topics::run(action),
        Command::Schemas { action } => schemas::run(action),
        Command::Registry { listen } => registry::run(listen),
        Command::Gateway(args) => gateway::run(*args),
        Command::Simulator(args) => simulator::run(*args),
    }
}
