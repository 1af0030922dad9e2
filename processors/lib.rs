//! Herald: an event-sourced stream processor on Kafka that governs a brand's WhatsApp messaging.
//!
//! The rules live in the core crate, `herald-core` (processors/core), which cannot do I/O; its
//! modules are re-exported here under their own names (`herald::policy`, `herald::dispatch`,
//! ...). This crate is the shells that move bytes around the core. Layout, from the bottom up;
//! a group of modules imports only its own group and the groups above it:
//!
//! - Vocabulary of the shells: `clock` (wall-clock time for shell-written timestamps),
//!   `topology_files` (a topology folder read from disk), `scenario` (the seeded demo scenario).
//! - Bytes: `avro` (schemas and the Avro mapping), `datum` and `schema_plan` (Herald's types
//!   straight to and from Avro binary through schemas compiled once), `registry` (the registry client and server,
//!   the wire-format codec), `telemetry` (logs, metrics, HTTP helpers), `trace` (spans and the W3C trace context), `intake` (input
//!   topics merged in timestamp order), `store` (the state store contract, its two backends and
//!   the address that opens one).
//! - Kafka: `kafka` (settings, log reader, the stage contract, rebalances, the transaction loop,
//!   `topics apply`).
//! - Providers: `provider` (the adapter contract, one module per channel with its client,
//!   signature, webhook shape and simulator endpoint, and the simulator), `webhook` (webhook
//!   normalisation, pure), `gateway` (the HTTP server around it).
//! - Stages and tools: `stages` (processor, dispatch, passthrough; snapshot; dead letters),
//!   `dump` (topic dumps), `dlq`, `rebuild`, `doors` (every door, for the fuzzer), `demo`,
//!   `bench`, `chaos`.
//! - `cli`: one module per command.

// The pure core, its own crate: no I/O, no clock, no randomness.
pub use herald_core::{
    audit, business_identity, context, dedupe, dispatch, driver, events, identity, journey,
    journey_guard, ordering, pacing, pipeline, policy, projection, provider_codes, quiet_hours,
    replay, sorted_map, state, tables, task, topology,
};

pub mod clock;
pub mod scenario;
pub mod topology_files;

pub mod avro;
pub mod datum;
pub mod intake;
pub mod registry;
pub mod schema_plan;
pub mod store;
pub mod telemetry;
pub mod trace;
pub mod unions;

pub mod kafka;

pub mod gateway;
pub mod provider;
pub mod query;
pub mod webhook;

pub mod bench;
pub mod chaos;
pub mod demo;
pub mod dlq;
pub mod doors;
pub mod dump;
pub mod rebuild;
pub mod stages;

pub mod cli;
