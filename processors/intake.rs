//! Intake: merges the co-partitioned input topics of each partition into one stream in
//! timestamp order, the way Kafka Streams chooses among a task's partitions.
//!
//! Without it the consumer hands records over in whatever order the fetches return, so one
//! topic can run days ahead of another: an order is then decided before the consent revocation
//! that preceded it, and the stream time that ages the dedupe window jumps past a redelivery.
//! A lane (one topic-partition) that is empty holds its partition back until records arrive or
//! it has been idle for `max_idle_ms`, after which the others go on without it.

use rdkafka::message::{Message, OwnedMessage};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// What the intake needs to know of a record.
pub trait Stamped {
    /// Topic the record came from.
    fn topic(&self) -> &str;
    /// Partition the record came from.
    fn partition(&self) -> i32;
    /// Offset of the record in its partition.
    fn offset(&self) -> i64;
    /// Record timestamp in ms (create or log-append time); None when the broker gave none.
    fn timestamp_ms(&self) -> Option<i64>;
}

impl Stamped for OwnedMessage {
    fn topic(&self) -> &str {
        Message::topic(self)
    }
    fn partition(&self) -> i32 {
        Message::partition(self)
    }
    fn offset(&self) -> i64 {
        Message::offset(self)
    }
    fn timestamp_ms(&self) -> Option<i64> {
        Message::timestamp(self).to_millis()
    }
}

/// How long a lane just opened or rewound may hold its partition back before its first record:
/// the first fetch after an assignment waits on leader and offset lookups, and deciding the
/// other topics meanwhile would run stream time ahead of it.
pub const FIRST_FETCH_WAIT_MS: u64 = 5_000;

/// How long after records arrive on one lane another lane's end-of-partition counts: the
/// cached watermark that says so may predate a fetch response still on its way.
pub const CONFIRM_GRACE_MS: u64 = 100;

struct Lane<R> {
    records: VecDeque<R>,
    /// Monotonic ms at which the lane last became empty.
    empty_since: u64,
    /// Offset after the last record buffered, once one was.
    next_offset: Option<i64>,
    /// When the broker was last seen to have nothing after `next_offset`.
    caught_up_at: Option<u64>,
    /// Nothing buffered since the lane was opened or rewound: its first fetch may be slow.
    fresh: bool,
}

impl<R> Lane<R> {
    fn new(now_ms: u64, start: Option<i64>) -> Self {
        Lane {
            records: VecDeque::new(),
            empty_since: now_ms,
            next_offset: start,
            caught_up_at: None,
            fresh: true,
        }
    }

    /// Empty, and may still receive records older than what other lanes hold. `last_fill` is
    /// when records last arrived on an empty lane of the partition: data that arrives together
    /// (one produce burst) reaches the lanes in separate fetch responses, so an empty lane is
    /// waited for from then on, unless it was seen at its end well after that.
    fn holds_back(&self, now_ms: u64, last_fill: u64, max_idle_ms: u64) -> bool {
        let patience = if self.fresh {
            max_idle_ms.max(FIRST_FETCH_WAIT_MS)
        } else {
            max_idle_ms
        };
        let confirmed_at_end = self
            .caught_up_at
            .is_some_and(|at| at >= last_fill + CONFIRM_GRACE_MS);
        self.records.is_empty()
            && !confirmed_at_end
            && now_ms.saturating_sub(self.empty_since.max(last_fill)) < patience
    }
}

/// Buffered records of the assigned lanes, handed out oldest first per partition.
pub struct Intake<R> {
    max_idle_ms: u64,
    pause_above: usize,
    lanes: BTreeMap<(i32, String), Lane<R>>,
    paused: BTreeSet<(i32, String)>,
    /// Per partition, when records last arrived on one of its empty lanes.
    last_fill: BTreeMap<i32, u64>,
}

/// Lanes whose fetching should stop or start again, so one fast topic cannot fill memory
/// while its partition waits on older records of another.
#[derive(Debug, Default, PartialEq)]
pub struct FlowChange {
    pub pause: Vec<(String, i32)>,
    pub resume: Vec<(String, i32)>,
}

impl<R: Stamped> Intake<R> {
    /// An intake with no lanes; a lane over `pause_above` records asks to be paused.
    pub fn new(max_idle_ms: u64, pause_above: usize) -> Self {
        Intake {
            max_idle_ms,
            pause_above: pause_above.max(2),
            lanes: BTreeMap::new(),
            paused: BTreeSet::new(),
            last_fill: BTreeMap::new(),
        }
    }

    /// Starts buffering a newly assigned topic-partition, read from `start` when known.
    pub fn open(&mut self, topic: &str, partition: i32, start: Option<i64>, now_ms: u64) {
        self.lanes
            .insert((partition, topic.to_string()), Lane::new(now_ms, start));
    }

    /// Whether the topic-partition is open.
    pub fn is_open(&self, topic: &str, partition: i32) -> bool {
        self.lanes.contains_key(&(partition, topic.to_string()))
    }

    /// Drops a revoked topic-partition and what was buffered for it.
    pub fn close(&mut self, topic: &str, partition: i32) {
        let key = (partition, topic.to_string());
        self.lanes.remove(&key);
        self.paused.remove(&key);
        if !self.lanes.keys().any(|(p, _)| *p == partition) {
            self.last_fill.remove(&partition);
        }
    }

    /// Forgets every buffered record (the consumer was rewound); lanes stay open.
    pub fn clear(&mut self, now_ms: u64) {
        for lane in self.lanes.values_mut() {
            *lane = Lane::new(now_ms, None);
        }
    }

    /// Buffers a record; one for a lane that is not open (revoked meanwhile) is dropped.
    pub fn push(&mut self, record: R, now_ms: u64) {
        let p = record.partition();
        if let Some(lane) = self.lanes.get_mut(&(p, record.topic().to_string())) {
            if lane.records.is_empty() {
                self.last_fill.insert(p, now_ms);
            }
            lane.next_offset = Some(record.offset() + 1);
            lane.caught_up_at = None;
            lane.fresh = false;
            lane.records.push_back(record);
        }
    }

    fn blocking(&self, now_ms: u64) -> impl Iterator<Item = (&(i32, String), &Lane<R>)> {
        self.lanes.iter().filter(move |((p, _), l)| {
            let last_fill = self.last_fill.get(p).copied().unwrap_or(0);
            l.holds_back(now_ms, last_fill, self.max_idle_ms)
        })
    }

    /// Empty lanes holding their partition back, with the offset they wait for if known: the
    /// shell compares it with the broker's watermarks and reports the ones at the end.
    pub fn waiting(&self, now_ms: u64) -> Vec<(String, i32, Option<i64>)> {
        self.blocking(now_ms)
            .map(|((p, t), l)| (t.clone(), *p, l.next_offset))
            .collect()
    }

    /// The lane has read all the broker has, as of `now_ms`: once that is well after the
    /// partition's last arrival, it stops holding the partition back.
    pub fn caught_up(&mut self, topic: &str, partition: i32, now_ms: u64) {
        if let Some(lane) = self.lanes.get_mut(&(partition, topic.to_string())) {
            if lane.records.is_empty() {
                lane.caught_up_at = Some(now_ms);
            }
        }
    }

    /// How many records are buffered.
    pub fn len(&self) -> usize {
        self.lanes.values().map(|l| l.records.len()).sum()
    }

    /// Whether nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.lanes.values().all(|l| l.records.is_empty())
    }

    /// The oldest head among partitions whose every lane either has records or has idled out.
    /// Ties go to the lower partition, then the topic name, so the choice is reproducible.
    pub fn next(&mut self, now_ms: u64) -> Option<R> {
        let blocked: BTreeSet<i32> = self.blocking(now_ms).map(|(k, _)| k.0).collect();
        let mut best: Option<(i64, &(i32, String))> = None;
        for (key, lane) in &self.lanes {
            if blocked.contains(&key.0) {
                continue;
            }
            if let Some(head) = lane.records.front() {
                let ts = head.timestamp_ms().unwrap_or(i64::MIN);
                if best.is_none_or(|(b, _)| ts < b) {
                    best = Some((ts, key));
                }
            }
        }
        let key = best?.1.clone();
        let lane = self.lanes.get_mut(&key)?;
        let record = lane.records.pop_front();
        if lane.records.is_empty() {
            lane.empty_since = now_ms;
        }
        record
    }

    /// Pauses lanes grown past the limit and resumes paused ones drained below half of it.
    pub fn flow(&mut self) -> FlowChange {
        let mut change = FlowChange::default();
        for (key, lane) in &self.lanes {
            let n = lane.records.len();
            if n > self.pause_above && !self.paused.contains(key) {
                change.pause.push((key.1.clone(), key.0));
            } else if n < self.pause_above / 2 && self.paused.contains(key) {
                change.resume.push((key.1.clone(), key.0));
            }
        }
        for (t, p) in &change.pause {
            self.paused.insert((*p, t.clone()));
        }
        for (t, p) in &change.resume {
            self.paused.remove(&(*p, t.clone()));
        }
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct R(&'static str, i32, i64);

    // Offsets in these tests are the timestamps: both grow within a lane.
    impl Stamped for R {
        fn topic(&self) -> &str {
            self.0
        }
        fn partition(&self) -> i32 {
            self.1
        }
        fn offset(&self) -> i64 {
            self.2
        }
        fn timestamp_ms(&self) -> Option<i64> {
            Some(self.2)
        }
    }

    fn intake(topics: &[&str], partitions: &[i32]) -> Intake<R> {
        let mut i = Intake::new(100, 4);
        for p in partitions {
            for t in topics {
                i.open(t, *p, None, 0);
            }
        }
        i
    }

    fn drain(i: &mut Intake<R>, now: u64) -> Vec<R> {
        std::iter::from_fn(|| i.next(now)).collect()
    }

    #[test]
    fn records_of_one_partition_come_out_oldest_first_across_topics() {
        let mut i = intake(&["crm", "oms"], &[0]);
        i.push(R("oms", 0, 10), 0);
        i.push(R("oms", 0, 30), 0);
        i.push(R("crm", 0, 20), 0);
        i.push(R("crm", 0, 40), 0);
        // The revocation at 20 is decided before the order at 30, whatever the fetch order.
        // Once crm is drained it holds the partition back: the order at 30 waits for it.
        assert_eq!(
            drain(&mut i, 0),
            vec![R("oms", 0, 10), R("crm", 0, 20), R("oms", 0, 30)]
        );
        assert_eq!(
            i.len(),
            1,
            "crm's 40 waits: oms may still deliver older records"
        );
        i.push(R("oms", 0, 35), 0);
        assert_eq!(drain(&mut i, 0), vec![R("oms", 0, 35)]);
    }

    #[test]
    fn an_empty_lane_holds_its_partition_back_until_it_idles_out() {
        let mut i = intake(&["crm", "oms"], &[0]);
        i.push(R("crm", 0, 1), 0);
        i.push(R("oms", 0, 10), 0);
        assert_eq!(i.next(0), Some(R("crm", 0, 1)));
        assert_eq!(i.next(50), None, "crm may still deliver something older");
        assert_eq!(i.next(100), Some(R("oms", 0, 10)));
    }

    #[test]
    fn a_lane_not_yet_fetched_gets_longer_to_deliver_its_first_record() {
        let mut i = intake(&["crm", "oms"], &[0]);
        i.push(R("oms", 0, 10), 0);
        assert_eq!(
            i.next(1_000),
            None,
            "crm's first fetch may still be on its way"
        );
        assert_eq!(i.next(FIRST_FETCH_WAIT_MS), Some(R("oms", 0, 10)));
        i.open("crm", 0, Some(40), FIRST_FETCH_WAIT_MS);
        assert_eq!(
            i.waiting(FIRST_FETCH_WAIT_MS),
            vec![
                ("crm".to_string(), 0, Some(40)),
                ("oms".to_string(), 0, Some(11))
            ]
        );
    }

    #[test]
    fn a_lane_at_the_end_of_its_partition_does_not_hold_it_back() {
        let mut i = intake(&["crm", "oms"], &[0]);
        i.push(R("crm", 0, 5), 0);
        i.push(R("oms", 0, 10), 0);
        assert_eq!(i.next(0), Some(R("crm", 0, 5)));
        assert_eq!(i.waiting(0), vec![("crm".to_string(), 0, Some(6))]);
        assert_eq!(i.next(0), None);
        i.caught_up("crm", 0, 100);
        assert_eq!(i.waiting(100), vec![]);
        assert_eq!(i.next(100), Some(R("oms", 0, 10)));
        assert_eq!(
            i.waiting(100),
            vec![("oms".to_string(), 0, Some(11))],
            "crm is still at its end"
        );
        i.push(R("crm", 0, 20), 200);
        assert_eq!(i.next(200), None, "oms is not known to be at its end");
        i.caught_up("oms", 0, 250);
        assert_eq!(
            i.next(250),
            None,
            "seen at its end too soon after crm's arrival: its own fetch may be on the way"
        );
        i.caught_up("oms", 0, 300);
        assert_eq!(i.next(300), Some(R("crm", 0, 20)));
        assert_eq!(
            i.waiting(300),
            vec![("crm".to_string(), 0, Some(21))],
            "a new record means crm may have more again"
        );
    }

    #[test]
    fn records_after_a_quiet_spell_wait_briefly_for_the_other_lanes() {
        let mut i = intake(&["crm", "oms"], &[0]);
        i.push(R("crm", 0, 1), 0);
        i.push(R("oms", 0, 2), 0);
        drain(&mut i, 1_000);
        drain(&mut i, 2_000);
        assert!(i.is_empty());
        // Long after, a burst reaches oms first; crm's part of it may be a fetch behind.
        i.push(R("oms", 0, 50), 10_000);
        assert_eq!(i.next(10_050), None);
        i.push(R("crm", 0, 40), 10_060);
        assert_eq!(drain(&mut i, 10_060), vec![R("crm", 0, 40)]);
        assert_eq!(drain(&mut i, 10_160), vec![R("oms", 0, 50)]);
    }

    #[test]
    fn a_waiting_partition_does_not_hold_back_the_others() {
        let mut i = intake(&["crm", "oms"], &[0, 1]);
        i.push(R("oms", 0, 10), 0);
        i.push(R("oms", 1, 50), 0);
        i.push(R("crm", 1, 60), 0);
        assert_eq!(i.next(0), Some(R("oms", 1, 50)));
        assert_eq!(i.next(0), None, "partition 1's oms lane is empty now");
    }

    #[test]
    fn order_within_a_lane_is_kept_even_when_timestamps_go_back() {
        let mut i = intake(&["oms"], &[0]);
        i.push(R("oms", 0, 50), 0);
        i.push(R("oms", 0, 10), 0);
        assert_eq!(drain(&mut i, 0), vec![R("oms", 0, 50), R("oms", 0, 10)]);
    }

    #[test]
    fn revoked_and_cleared_lanes_lose_their_records() {
        let mut i = intake(&["crm", "oms"], &[0]);
        i.push(R("oms", 0, 10), 0);
        i.close("oms", 0);
        i.push(R("oms", 0, 20), 0);
        assert!(
            i.is_empty(),
            "records of a revoked lane belong to its next owner"
        );
        i.push(R("crm", 0, 5), 0);
        i.clear(7);
        assert!(i.is_empty());
    }

    #[test]
    fn a_lane_that_runs_ahead_is_paused_and_resumed_when_drained() {
        let mut i = intake(&["crm", "oms"], &[0]);
        for t in 0..6 {
            i.push(R("oms", 0, 100 + t), 0);
        }
        i.push(R("crm", 0, 1), 0);
        assert_eq!(
            i.flow(),
            FlowChange {
                pause: vec![("oms".into(), 0)],
                resume: vec![]
            }
        );
        assert_eq!(i.flow(), FlowChange::default(), "already paused");
        assert_eq!(drain(&mut i, 1_000), vec![R("crm", 0, 1)]);
        assert_eq!(drain(&mut i, 2_000).len(), 6, "crm idled out");
        assert_eq!(
            i.flow(),
            FlowChange {
                pause: vec![],
                resume: vec![("oms".into(), 0)]
            }
        );
    }
}
