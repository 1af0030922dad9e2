//! What a stage saves with each committed batch: the states of the customers it touched, and
//! where it has read each input topic to.

use anyhow::Result;
use rdkafka::message::Message;
use std::collections::{BTreeSet, HashMap};

/// The encoded states of the customers a batch touched, for the store; clears `touched`.
pub(crate) fn encode_touched<S: serde::Serialize>(
    touched: &mut BTreeSet<String>,
    customers: &HashMap<String, S>,
) -> Result<Vec<(String, Vec<u8>)>> {
    let mut changed = Vec::with_capacity(touched.len());
    for c in std::mem::take(touched) {
        if let Some(s) = customers.get(&c) {
            changed.push((c, serde_json::to_vec(s)?));
        }
    }
    Ok(changed)
}

/// Key under which a partition's stream time is kept among its input positions: both only grow,
/// and both must survive a restart (the dedupe window and hold timers run on stream time).
pub const STREAM_TIME_KEY: &str = "~stream-time";

/// Key among a partition's saved positions that says its customers' timers are saved with their
/// states. A store written before timers were lacks it: its partitions are read whole once.
pub const TIMERS_KEY: &str = "~timers";

/// The input record (topic, offset; the partition is the decision's own) a decision or dead
/// letter came from, from its provenance headers.
pub fn source_position(m: &impl Message) -> Option<(String, i64)> {
    use rdkafka::message::Headers;
    let h = m.headers()?;
    let get = |key: &str| {
        h.iter()
            .find(|x| x.key == key)
            .and_then(|x| x.value)
            .map(|v| String::from_utf8_lossy(v).to_string())
    };
    Some((
        get("herald.source.topic")?,
        get("herald.source.offset")?.parse().ok()?,
    ))
}
