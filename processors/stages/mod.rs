//! The stages the Kafka loop runs: one file per stage (`processor`, `dispatch`, `passthrough`),
//! what each saves with a batch (`snapshot`), and decoding with the dead-letter topic behind it
//! (`dead_letter`).

pub mod dead_letter;
pub mod dispatch;
pub mod passthrough;
pub mod processor;
pub mod snapshot;

pub use dispatch::DispatchStage;
pub use passthrough::PassthroughStage;
pub use processor::ProcessorStage;
pub use snapshot::{source_position, STREAM_TIME_KEY, TIMERS_KEY};
