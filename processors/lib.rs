//! Herald: an event-sourced stream processor on Kafka that governs a brand's WhatsApp messaging.
//!
//! The pure core (`business_identity`, `dedupe`, `ordering`, `policy`, `journey`, `quiet_hours`, `dispatch`, `state`,
//! `tables`, `pipeline`, `task`, `replay`, `audit`, `identity`, `projection`) decides; the
//! shells (`intake`, `kafka`, `stages`, `registry`, `store`, `scylla_store`, `provider`, `sms`,
//! `email`, `dump`, `telemetry`, `cli`) move bytes.

pub mod avro;

// The pure core, its own crate: no I/O, no clock, no randomness.
pub use herald_core::{
    audit, business_identity, context, dedupe, dispatch, driver, events, identity, journey,
    journey_guard, ordering, pacing, pipeline, policy, projection, provider_codes, quiet_hours,
    replay, state, tables, task, topology,
};

// Shells.
pub mod bench;
pub mod chaos;
pub mod cli;
pub mod demo;
pub mod dlq;
pub mod doors;
pub mod dump;
pub mod email;
pub mod gateway;
pub mod intake;
pub mod kafka;
pub mod provider;
pub mod rebuild;
pub mod registry;
pub mod scenario;
pub mod scylla_store;
pub mod sms;
pub mod stages;
pub mod store;
pub mod telemetry;
pub mod topology_files;
