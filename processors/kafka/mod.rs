//! The Kafka shell: consume -> decide -> produce in Kafka transactions (or at-least-once for
//! brokers without them), restore of partition state on assignment, the dead-letter topic, and a
//! clean stop on SIGTERM. The loop is generic over a [`Stage`]; the rules live in the core.
//!
//! One idea per file: `settings` (reaching the cluster), `log_reader` (reading a partition to
//! its end), `stage` (what the loop asks of a stage), `rebalance` (partitions coming and going,
//! companion positions), `transaction_loop` (the loop itself), `topics` (`herald topics apply`).

pub mod log_reader;
pub mod rebalance;
pub mod settings;
pub mod stage;
pub mod topics;
pub mod transaction_loop;

pub use log_reader::*;
pub use settings::*;
pub use stage::*;
pub use transaction_loop::*;
