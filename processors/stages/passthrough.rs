//! The pass-through stage: the input topics consumed and produced unchanged, with the same
//! settings, as the ceiling the benchmark compares the processors against.

use crate::kafka::{LogReader, OutRecord, Outbox, Produced, Stage};
use anyhow::Result;
use rdkafka::message::{Message, OwnedMessage};
use std::collections::BTreeSet;

/// Consumes the input topics and produces the same bytes, with the same settings: the ceiling
/// the benchmark compares the processors against.
pub struct PassthroughStage {
    topics: crate::topology::TopicNames,
    owned: BTreeSet<i32>,
}

impl PassthroughStage {
    /// A pass-through of these topics' inputs to their pass-through topic.
    pub fn new(topics: crate::topology::TopicNames) -> Self {
        PassthroughStage {
            topics,
            owned: BTreeSet::new(),
        }
    }
}

impl Stage for PassthroughStage {
    fn name(&self) -> &'static str {
        "passthrough"
    }
    fn input_topics(&self) -> Vec<String> {
        self.topics.inputs()
    }
    fn restore(&mut self, partition: i32, _reader: &LogReader) -> Result<()> {
        self.owned.insert(partition);
        Ok(())
    }
    fn revoke(&mut self, partition: i32) {
        self.owned.remove(&partition);
    }
    fn reset(&mut self) {
        self.owned.clear();
    }
    fn owns(&self, partition: i32) -> bool {
        self.owned.contains(&partition)
    }
    fn handle(&mut self, msg: &OwnedMessage, out: &mut Outbox) -> Result<()> {
        out.records.push(OutRecord {
            topic: self.topics.passthrough().clone(),
            partition: msg.partition(),
            key: msg.key().map(|k| k.to_vec()).unwrap_or_default(),
            value: msg.payload().map(|v| v.to_vec()).unwrap_or_default(),
            headers: vec![],
        });
        Ok(())
    }
    fn end_of_batch(&mut self, _out: &mut Outbox) -> Result<()> {
        Ok(())
    }
    fn committed(&mut self, _produced: &Produced) -> Result<()> {
        Ok(())
    }
}
