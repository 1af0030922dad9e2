//! What a stage is to the loop: the records it produces for a batch, and the calls the loop
//! makes (restore, handle, end of batch, committed, revoke).

use super::log_reader::*;
use crate::store::StateStore;
use anyhow::Result;
use rdkafka::message::OwnedMessage;
use std::collections::BTreeMap;
use std::sync::Arc;

/// One record a stage wants written in the current transaction.
#[derive(Debug, Clone)]
pub struct OutRecord {
    /// The topic as this deployment names it; shared, since many records go to one topic.
    pub topic: std::sync::Arc<str>,
    pub partition: i32,
    pub key: Vec<u8>,
    /// Wire bytes; empty for a tombstone (no Avro record encodes to nothing).
    pub value: Vec<u8>,
    pub headers: Vec<(&'static str, Vec<u8>)>,
}

/// What a stage produced while handling a batch.
#[derive(Default)]
pub struct Outbox {
    pub records: Vec<OutRecord>,
}

/// The next offset of each (topic, partition) this transaction wrote to.
pub type Produced = BTreeMap<(String, i32), i64>;

/// A processing stage run by the loop: the processors, dispatch, or the bench passthrough.
pub trait Stage {
    /// Name used in group ids, transactional ids and store namespaces.
    fn name(&self) -> &'static str;
    /// Topics it consumes.
    fn input_topics(&self) -> Vec<String>;
    /// Rebuilds the state of a partition it now owns.
    fn restore(&mut self, partition: i32, reader: &LogReader) -> Result<()>;
    /// Forgets the state of a partition it no longer owns.
    fn revoke(&mut self, partition: i32);
    /// Forgets everything (after an aborted transaction); state is restored again on demand.
    fn reset(&mut self);
    /// Whether the stage holds state for a partition.
    fn owns(&self, partition: i32) -> bool;
    /// Input positions (topic, next offset) the stage already decided for a partition; the
    /// loop seeks there after restore when the broker's committed offset is behind.
    fn resume_positions(&self, _partition: i32) -> Vec<(String, i64)> {
        Vec::new()
    }
    /// Handles one input record. `Err` is fatal: the transaction is aborted and the loop stops.
    fn handle(&mut self, msg: &OwnedMessage, out: &mut Outbox) -> Result<()>;
    /// Called before each batch, outside its transaction: loads at once what the batch's records
    /// will need (customers' states not in memory). A failure here is only a warning: each
    /// record then loads what it needs itself.
    fn prefetch(&mut self, _batch: &[OwnedMessage]) -> Result<()> {
        Ok(())
    }
    /// Called before each batch: brings tables read whole (inventory) up to date.
    fn refresh_tables(&mut self, _reader: &LogReader) -> Result<()> {
        Ok(())
    }
    /// Whether a batch should run even with no records: a wall-clock tick has timers to fire.
    fn tick_due(&self) -> bool {
        false
    }
    /// Called once per batch after every record: timers, batched provider calls.
    fn end_of_batch(&mut self, out: &mut Outbox) -> Result<()>;
    /// Called after the transaction committed, with the positions it wrote.
    fn committed(&mut self, produced: &Produced) -> Result<()>;
    /// Called between transactions when no record came: what a batch would have done after
    /// its commit and still waits (a checkpoint) is done now.
    fn idle(&mut self) -> Result<()> {
        Ok(())
    }
    /// Called once the loop stopped with every transaction committed: saves what a stage
    /// keeps for its next checkpoint, so the next start replays nothing.
    fn stopped(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Keeps a store handle shareable across stages.
pub type SharedStore = Arc<dyn StateStore>;
