//! Reading a partition of a topic from an offset to its end, read_committed: how stages restore
//! and follow the companion topics (CRM, contacts, provider statuses, inventory).

use super::settings::*;
use anyhow::{anyhow, bail, Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use std::time::{Duration, Instant};

/// Reads a log partition from an offset to its end (read_committed), for restore.
pub struct LogReader {
    pub(crate) consumer: BaseConsumer<EndOfLogIsExpected>,
}

impl LogReader {
    /// A reader with these settings' connection and security options.
    pub fn new(settings: &KafkaSettings) -> Result<Self> {
        Ok(LogReader {
            consumer: settings.log_reader()?,
        })
    }

    /// Feeds every record of `topic`/`partition` from `from` to the end; returns the next offset.
    pub fn read(
        &self,
        topic: &str,
        partition: i32,
        from: i64,
        f: impl FnMut(&OwnedMessage) -> Result<()>,
    ) -> Result<i64> {
        let next = self.read_partitions(topic, &[(partition, from)], f)?;
        next.first()
            .copied()
            .ok_or_else(|| anyhow!("reading {topic}/{partition}: no position came back"))
    }

    /// As [`LogReader::read`] for several partitions of `topic` at once, in one assignment:
    /// feeds every record of each `(partition, from)` from `from` to its end, and returns each
    /// one's next offset in the same order. Reading them one by one costs a fetch round trip
    /// each, most of which waits on partitions with nothing new. End of partition alone is not
    /// the end: a reader may see it before everything up to the high watermark taken now was
    /// fetched, so done means the position reached it; and retention may have deleted where
    /// the reader stopped, so what is left starts at the low watermark.
    pub fn read_partitions(
        &self,
        topic: &str,
        from: &[(i32, i64)],
        mut f: impl FnMut(&OwnedMessage) -> Result<()>,
    ) -> Result<Vec<i64>> {
        let mut next = Vec::with_capacity(from.len());
        // Partitions still to read to their high watermark: (partition, index in `next`, high).
        let mut open: Vec<(i32, usize, i64)> = Vec::new();
        let mut tpl = TopicPartitionList::new();
        for (i, (partition, start)) in from.iter().enumerate() {
            let (low, high) = watermarks(&self.consumer, topic, *partition)?;
            let start = (*start).max(low);
            next.push(start);
            if start < high {
                tpl.add_partition_offset(topic, *partition, Offset::Offset(start))?;
                open.push((*partition, i, high));
            }
        }
        if open.is_empty() {
            return Ok(next);
        }
        self.consumer.assign(&tpl)?;
        let deadline = Instant::now() + Duration::from_secs(300);
        while !open.is_empty() {
            if Instant::now() > deadline {
                bail!("restoring {topic} {from:?}: end of log not reached in 300 s");
            }
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    let owned = m.detach();
                    if let Some(k) = open.iter().position(|(p, _, _)| *p == owned.partition()) {
                        let (_, i, high) = open[k];
                        next[i] = owned.offset() + 1;
                        f(&owned)?;
                        if next[i] >= high {
                            next[i] = next[i].max(high);
                            open.swap_remove(k);
                        }
                    }
                }
                // Only the end-of-partition event, queued after the records, makes a position
                // trustworthy; an empty poll may still have records prefetched.
                Some(Err(KafkaError::PartitionEOF(_))) => {
                    let mut k = 0;
                    while k < open.len() {
                        let (p, i, high) = open[k];
                        if position_of(&self.consumer, topic, p)? >= high {
                            next[i] = next[i].max(high);
                            open.swap_remove(k);
                        } else {
                            k += 1;
                        }
                    }
                }
                None => {}
                Some(Err(e)) if passes(&e) => {
                    tracing::debug!(error = %e, topic, "reader waits for the broker")
                }
                Some(Err(e)) => bail!("restoring {topic} {from:?}: {e}"),
            }
        }
        self.consumer.unassign()?;
        // Transaction markers occupy offsets too: the next record is at or after the watermark.
        Ok(next)
    }

    /// The offset the next record of `topic`/`partition` will get.
    pub fn end(&self, topic: &str, partition: i32) -> Result<i64> {
        Ok(watermarks(&self.consumer, topic, partition)?.1)
    }

    /// The record at `offset` of `topic`/`partition`, if the log holds one there.
    pub fn read_at(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Result<Option<OwnedMessage>> {
        let mut found = None;
        let (_, high) = watermarks(&self.consumer, topic, partition)?;
        if offset >= high {
            return Ok(None);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
        self.consumer.assign(&tpl)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    if m.offset() == offset {
                        found = Some(m.detach());
                    }
                    break;
                }
                Some(Err(KafkaError::PartitionEOF(_))) | None => {
                    if position_of(&self.consumer, topic, partition)? >= high {
                        break;
                    }
                }
                Some(Err(e)) if passes(&e) => {
                    tracing::debug!(error = %e, topic, partition, "reader waits for the broker")
                }
                Some(Err(e)) => {
                    self.consumer.unassign()?;
                    bail!("reading {topic}/{partition}@{offset}: {e}");
                }
            }
        }
        self.consumer.unassign()?;
        Ok(found)
    }
}

/// Whether a consumer error is one librdkafka recovers from by itself (a lost connection, a
/// leader moving), so that a reader goes on waiting rather than fail.
pub fn passes(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::OperationTimedOut
                | RDKafkaErrorCode::NetworkException
                | RDKafkaErrorCode::NotCoordinator
                | RDKafkaErrorCode::CoordinatorNotAvailable
                | RDKafkaErrorCode::FencedLeaderEpoch
                | RDKafkaErrorCode::UnknownLeaderEpoch
                | RDKafkaErrorCode::OffsetNotAvailable
                | RDKafkaErrorCode::DestroyBroker
        )
    )
}

/// The low and high watermarks of `topic`/`partition`. A partition whose leader is moving (a
/// broker died or restarts) answers errors for a while: those are waited out, for up to a
/// minute; an unknown topic or a refused permission is an error at once.
pub fn watermarks<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
) -> Result<(i64, i64)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut backoff = Duration::from_millis(100);
    loop {
        match consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)) {
            Ok(w) => return Ok(w),
            Err(e) => {
                let hopeless = matches!(
                    e.rdkafka_error_code(),
                    Some(
                        RDKafkaErrorCode::UnknownTopicOrPartition
                            | RDKafkaErrorCode::UnknownTopic
                            | RDKafkaErrorCode::UnknownPartition
                            | RDKafkaErrorCode::TopicAuthorizationFailed
                    )
                );
                if hopeless || Instant::now() > deadline {
                    return Err(anyhow!(e))
                        .with_context(|| format!("where {topic}/{partition} ends"));
                }
                tracing::debug!(error = %e, topic, partition, "watermarks not available yet; retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// The consumer's current position in one partition (-1 when it has none yet).
pub fn position_of<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
) -> Result<i64> {
    let pos = consumer.position()?;
    Ok(pos
        .find_partition(topic, partition)
        .and_then(|e| match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        })
        .unwrap_or(-1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::producer::{FutureRecord, Producer};

    #[test]
    fn partitions_read_together_each_end_where_their_own_log_does() {
        let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
        mock.create_topic("statuses", 3, 1).unwrap();
        let settings = KafkaSettings::new(&mock.bootstrap_servers(), false, "test");
        let producer = settings.producer(None).unwrap();
        // Partition 0 holds five records, partition 1 none, partition 2 three.
        for (p, n) in [(0, 5), (2, 3)] {
            for i in 0..n {
                let value = format!("{p}-{i}");
                let record = FutureRecord::<(), _>::to("statuses")
                    .partition(p)
                    .payload(&value);
                // The delivery is awaited by the flush below.
                drop(producer.send_result(record).map_err(|(e, _)| e).unwrap());
            }
        }
        producer.flush(Duration::from_secs(10)).unwrap();

        let reader = LogReader::new(&settings).unwrap();
        let mut seen = Vec::new();
        let next = reader
            .read_partitions("statuses", &[(0, 2), (1, 0), (2, 0)], |m| {
                seen.push(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned());
                Ok(())
            })
            .unwrap();
        assert_eq!(next, vec![5, 0, 3]);
        seen.sort();
        assert_eq!(seen, vec!["0-2", "0-3", "0-4", "2-0", "2-1", "2-2"]);

        // Read on from where it stopped: nothing new, nothing fed twice.
        let again = reader
            .read_partitions("statuses", &[(0, 5), (1, 0), (2, 3)], |m| {
                bail!("fed again: {:?}", m.payload())
            })
            .unwrap();
        assert_eq!(again, vec![5, 0, 3]);
    }
}
