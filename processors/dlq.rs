//! `herald dlq list` and `herald dlq replay`: the dead-letter topic, read and selected by id,
//! reason or time, and its records written back where they came from. A replayed record goes
//! through the same idempotency as the first time (dedupe by event id for an input, dispatch's
//! send record by message id for an approval), so replaying never sends a message twice.

use crate::events::{DeadLetter, Millis};
use crate::kafka::{KafkaSettings, LogReader};
use crate::registry::Codec;
use anyhow::{anyhow, bail, Context, Result};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use serde::Serialize;
use std::time::Duration;

/// A dead letter and where it sits in the dead-letter topic; its id is `partition:offset`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    pub id: String,
    pub partition: i32,
    pub offset: i64,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub stage: String,
    pub reason: String,
    pub failed_at: Millis,
    /// The original record's bytes, as they were dead-lettered.
    #[serde(skip)]
    pub key: Option<Vec<u8>>,
    #[serde(skip)]
    pub value: Option<Vec<u8>>,
}

impl Entry {
    /// The entry of a dead letter read at `partition`/`offset` of the topic.
    pub fn new(partition: i32, offset: i64, d: DeadLetter) -> Self {
        Entry {
            id: format!("{partition}:{offset}"),
            partition,
            offset,
            source_topic: d.source_topic,
            source_partition: d.source_partition,
            source_offset: d.source_offset,
            stage: d.stage,
            reason: d.error,
            failed_at: d.failed_at,
            key: d.key,
            value: d.value,
        }
    }
}

/// Which dead letters a command acts on. Every given criterion must hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selection {
    /// Ids (`partition:offset`); any of them.
    pub ids: Vec<String>,
    /// Text the reason contains (case-insensitive).
    pub reason: Option<String>,
    /// Dead-lettered at or after.
    pub since: Option<Millis>,
    /// Dead-lettered before.
    pub until: Option<Millis>,
}

impl Selection {
    /// Whether any criterion was given.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.reason.is_none() && self.since.is_none() && self.until.is_none()
    }

    /// Whether the entry meets every criterion.
    pub fn selects(&self, e: &Entry) -> bool {
        (self.ids.is_empty() || self.ids.contains(&e.id))
            && self
                .reason
                .as_ref()
                .is_none_or(|r| e.reason.to_lowercase().contains(&r.to_lowercase()))
            && self.since.is_none_or(|t| e.failed_at >= t)
            && self.until.is_none_or(|t| e.failed_at < t)
    }
}

/// Checks that every id is `partition:offset`, so a typo is not a silent empty selection.
pub fn check_ids(ids: &[String]) -> Result<()> {
    for id in ids {
        let ok = id
            .split_once(':')
            .is_some_and(|(p, o)| p.parse::<i32>().is_ok() && o.parse::<i64>().is_ok());
        if !ok {
            bail!("--id '{id}' is not a dead letter id (partition:offset, as `herald dlq list` shows)");
        }
    }
    Ok(())
}

/// Reads every dead letter of the topic's `partitions`, in partition and offset order.
pub fn read_all(
    settings: &KafkaSettings,
    codec: &Codec,
    rt: &tokio::runtime::Runtime,
    partitions: i32,
) -> Result<Vec<Entry>> {
    let reader = LogReader::new(settings)?;
    let mut out = Vec::new();
    let dlq = codec.topics().dlq();
    for p in 0..partitions {
        reader.read(dlq, p, 0, |m| {
            let letter = rt
                .block_on(codec.decode_dead_letter(m.payload()))
                .map_err(|e| anyhow!("{dlq}/{p}@{} is not a dead letter: {e}", m.offset()))?;
            out.push(Entry::new(p, m.offset(), letter));
            Ok(())
        })?;
    }
    Ok(out)
}

/// What a replay did (or, on a dry run, would do) with one dead letter.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Replayed {
    pub id: String,
    pub to_topic: String,
    pub to_partition: i32,
    /// Where it was written; none on a dry run or when it was skipped.
    pub offset: Option<i64>,
    /// Why it was not written, when it was not.
    pub skipped: Option<String>,
}

/// Writes each entry's original record back to its source topic and partition, with a header
/// naming the dead letter (in `dlq`), and waits for Kafka to acknowledge each; only reports
/// when `execute` is false.
pub fn replay(
    settings: &KafkaSettings,
    dlq: &str,
    rt: &tokio::runtime::Runtime,
    entries: &[Entry],
    execute: bool,
) -> Result<Vec<Replayed>> {
    let producer = if execute {
        Some(settings.producer(None)?)
    } else {
        None
    };
    let mut out = Vec::new();
    for e in entries {
        let mut r = Replayed {
            id: e.id.clone(),
            to_topic: e.source_topic.clone(),
            to_partition: e.source_partition,
            offset: None,
            skipped: None,
        };
        let Some(value) = &e.value else {
            r.skipped = Some("the dead letter holds no record bytes".into());
            out.push(r);
            continue;
        };
        if e.source_partition < 0 {
            r.skipped = Some("the dead letter does not say which partition it came from".into());
            out.push(r);
            continue;
        }
        if let Some(producer) = &producer {
            let from = format!("{dlq}/{}@{}", e.partition, e.offset);
            let headers = OwnedHeaders::new().insert(Header {
                key: "herald.replayed-from",
                value: Some(from.as_bytes()),
            });
            let mut record = FutureRecord::to(&e.source_topic)
                .partition(e.source_partition)
                .payload(value)
                .headers(headers);
            if let Some(k) = &e.key {
                record = record.key(k);
            }
            let delivery = rt
                .block_on(producer.send(record, Duration::from_secs(30)))
                .map_err(|(err, _)| err)
                .with_context(|| format!("replaying dead letter {} to {}", e.id, e.source_topic))?;
            r.offset = Some(delivery.offset);
        }
        out.push(r);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(partition: i32, offset: i64, reason: &str, at: Millis) -> Entry {
        Entry::new(
            partition,
            offset,
            DeadLetter {
                source_topic: "oms.events.v1".into(),
                source_partition: partition,
                source_offset: 7,
                key: None,
                value: Some(vec![1]),
                stage: "processors".into(),
                error: reason.into(),
                failed_at: at,
            },
        )
    }

    #[test]
    fn every_given_criterion_must_hold() {
        let a = entry(0, 3, "schema 17 is not registered", 1_000);
        let b = entry(
            1,
            4,
            "provider error code 999 is not one Herald knows",
            2_000,
        );
        let by_reason = Selection {
            reason: Some("ERROR CODE".into()),
            ..Selection::default()
        };
        assert!(!by_reason.selects(&a) && by_reason.selects(&b));
        let by_time = Selection {
            since: Some(1_000),
            until: Some(2_000),
            ..Selection::default()
        };
        assert!(by_time.selects(&a) && !by_time.selects(&b));
        let by_id_and_reason = Selection {
            ids: vec!["1:4".into(), "0:3".into()],
            reason: Some("schema".into()),
            ..Selection::default()
        };
        assert!(by_id_and_reason.selects(&a) && !by_id_and_reason.selects(&b));
        assert!(Selection::default().is_empty());
    }

    #[test]
    fn a_malformed_id_is_refused_by_name() {
        assert!(check_ids(&["0:12".into()]).is_ok());
        let err = check_ids(&["12".into()]).unwrap_err().to_string();
        assert!(err.contains("'12'"), "{err}");
    }
}
