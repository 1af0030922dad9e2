//! Herald: an event-sourced stream processor on Kafka that governs a brand's WhatsApp messaging.
//!
//! The pure core (`business_identity`, `dedupe`, `ordering`, `policy`, `journey`, `quiet_hours`, `dispatch`, `state`,
//! `tables`, `pipeline`, `task`, `replay`, `audit`, `identity`, `projection`) decides; the
//! shells (`intake`, `kafka`, `stages`, `registry`, `store`, `scylla_store`, `provider`, `sms`,
//! `email`, `dump`, `telemetry`, `cli`) move bytes.

pub mod avro;
pub mod events;
pub mod topology;

// The pure core: no I/O, no clock, no randomness.
pub mod audit;
pub mod business_identity;
pub mod dedupe;
pub mod dispatch;
pub mod identity;
pub mod journey;
pub mod ordering;
pub mod pacing;
pub mod pipeline;
pub mod policy;
pub mod projection;
pub mod quiet_hours;
pub mod replay;
pub mod state;
pub mod tables;
pub mod task;

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
