//! Herald's core: the rules, as synchronous functions of (state, input, context) that return
//! events, and the folds that rebuild state from those events. It reads no clock, environment,
//! network, file or random source; its dependencies cannot (see `Cargo.toml` and `clippy.toml`).
//!
//! Layout, from the bottom up (a module imports only modules above it in this list):
//!
//! - Vocabulary: `events` (facts, decisions, dispatch steps), `topology` (topics, templates,
//!   policy and journeys, parsed from text), `tables` (stock and template status), `state`
//!   (a customer's state and the fold), `context` (`Ctx`: stream time, configuration, where the
//!   input sits; `deterministic_id`).
//! - Rules, one processor each: `dedupe`, `ordering` (the ordering guard), `quiet_hours`,
//!   `journey_guard`, `policy`, `journey`, `dispatch`, `pacing`.
//! - Composition: `pipeline` (dedupe, ordering guard, policy and journeys for one input),
//!   `task` (a partition's customers).
//! - Reading the log back: `replay`, `audit` (the consent chain), `projection`, `identity`
//!   (erasure-safe hashing), `business_identity`.

pub mod context;
pub mod events;
pub mod state;
pub mod tables;
pub mod topology;

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

pub mod audit;
pub mod business_identity;
pub mod identity;
pub mod projection;
pub mod replay;
