//! Herald's core: the rules, as synchronous functions of (state, input, context) that return
//! events, and the folds that rebuild state from those events. It reads no clock, environment,
//! network, file or random source; its dependencies cannot (see `Cargo.toml` and `clippy.toml`).
//!
//! Layout, from the bottom up; a module imports only modules above it in this list:
//!
//! - Vocabulary: `events` (facts, decisions, dispatch steps), `state` (a customer's state and
//!   its fold), `topology` (topics, templates, policy and journeys, parsed from text), `tables`
//!   (stock and template status), `context` (`Ctx`: stream time, configuration, where the input
//!   sits; `deterministic_id`).
//! - Reading facts: `business_identity` (the same fact under a new id), `identity` (keyed
//!   hashes of addresses), `audit` (the consent hash chain, timeline and check).
//! - Rules, one concern each: `dedupe`, `ordering` (the ordering guard), `quiet_hours`,
//!   `pacing` (lanes, buckets, breakers), `provider_codes` (what each provider code means),
//!   `journey_guard`, `policy` (a folder by concern), `journey`, `dispatch` (intent, answer,
//!   compose).
//! - Composition: `pipeline` (dedupe, ordering guard, policy and journeys for one input), `task`
//!   (a partition's customers and stream time), `driver` (every processor in memory, dispatch
//!   included, for scenario files and tests).
//! - The log read back: `replay` (a policy tried on recorded inputs), `projection` (what
//!   `herald state` shows).

pub mod context;
pub mod events;
pub mod sorted_map;
pub mod state;
pub mod tables;
pub mod topology;

pub mod audit;
pub mod business_identity;
pub mod identity;

pub mod dedupe;
pub mod dispatch;
pub mod journey;
pub mod journey_guard;
pub mod ordering;
pub mod pacing;
pub mod policy;
pub mod provider_codes;
pub mod quiet_hours;

pub mod driver;
pub mod pipeline;
pub mod task;

pub mod projection;
pub mod replay;
