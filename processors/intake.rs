//! Intake: merges the co-partitioned input topics of each partition into one stream in
//! timestamp order, the way Kafka Streams chooses among a task's partitions.
//!
//! Without it the consumer hands records over in whatever order the fetches return, so one
//! topic can run days ahead of another: an order is then decided before the consent revocation
//! that preceded it, and the stream time that ages the dedupe window jumps past a redelivery.
//! A lane (one topic-partition) that is empty holds its partition back until the broker,
//! asked after the partition's latest arrival, says the lane is at its end. A lane the broker
//! says is behind (records written, not yet fetched) holds it back until they arrive, however
//! long that takes; a lane whose broker does not answer (its leader died and is being
//! replaced) holds it back for up to [`LEADER_MOVE_WAIT_MS`]; only a lane whose position is
//! unknown gives up after `max_idle_ms` (Kafka Streams' KIP-695 semantics).

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

/// How often a lane the broker said was behind is asked again while its records do not come:
/// they may have been only a transaction marker, which moves the position without a record.
pub const RECHECK_MS: u64 = 25;

/// How long a lane whose broker does not answer may hold its partition back. A killed leader
/// is replaced once the controller misses its heartbeats (`broker.session.timeout.ms`, 9 s by
/// default) and the new leader answers within seconds of that; going on without the lane
/// sooner would decide its partition's other topics ahead of records the dead leader holds.
/// Past this, a partition whose leader stays gone must not stop the others' decisions.
pub const LEADER_MOVE_WAIT_MS: u64 = 30_000;

/// How often a lane whose leader did not answer is asked again. While no leader answers, each
/// question waits out the probe's timeout (2 s), and every partition's records wait with it;
/// asking at `RECHECK_MS` would stall them for the whole of a leader's move.
pub const UNANSWERED_RECHECK_MS: u64 = 1_000;

/// Where the broker says a lane stands against its end (the last stable offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lag {
    /// Nothing after the lane's position.
    AtEnd,
    /// Records after the lane's position that the consumer has not handed over yet.
    Behind,
    /// The lane's position is known but its leader did not say where it ends: it may be dead.
    Unanswered,
    /// The lane's position is not known.
    Unknown,
}

struct Lane<R> {
    records: VecDeque<R>,
    /// When each buffered record arrived, in step with `records`.
    arrivals: VecDeque<u64>,
    /// Monotonic ms at which the lane last became empty.
    empty_since: u64,
    /// Offset after the last record buffered, once one was.
    next_offset: Option<i64>,
    /// The broker's last answer about this lane since its last record, and when it was asked.
    checked: Option<(u64, Lag)>,
    /// Nothing buffered since the lane was opened or rewound: its first fetch may be slow.
    fresh: bool,
    /// Since when every question about the lane went unanswered, since its last record.
    unanswered_since: Option<u64>,
}

impl<R> Lane<R> {
    fn new(now_ms: u64, start: Option<i64>) -> Self {
        Lane {
            records: VecDeque::new(),
            arrivals: VecDeque::new(),
            empty_since: now_ms,
            next_offset: start,
            checked: None,
            fresh: true,
            unanswered_since: None,
        }
    }

    /// Empty, and may still receive records older than what other lanes hold. `last_fill` is
    /// the latest arrival among the records at the heads of the partition's lanes: only an
    /// answer asked at or after it proves that the lane holds nothing the broker had before the
    /// record handed out next arrived.
    fn holds_back(&self, now_ms: u64, last_fill: u64, max_idle_ms: u64) -> bool {
        if !self.records.is_empty() {
            return false;
        }
        match self.checked {
            Some((asked_at, Lag::AtEnd)) if asked_at >= last_fill => false,
            Some((_, Lag::Behind)) => true,
            Some((asked_at, Lag::Unanswered)) => {
                let since = self.unanswered_since.unwrap_or(asked_at);
                now_ms.saturating_sub(since) < LEADER_MOVE_WAIT_MS
            }
            _ => {
                let patience = if self.fresh {
                    max_idle_ms.max(FIRST_FETCH_WAIT_MS)
                } else {
                    max_idle_ms
                };
                now_ms.saturating_sub(self.empty_since.max(last_fill)) < patience
            }
        }
    }

    /// Whether the broker should be asked about the lane now: it holds its partition back and
    /// has no answer since the partition's latest arrival, or was behind a while ago.
    fn needs_check(&self, now_ms: u64, last_fill: u64) -> bool {
        match self.checked {
            Some((asked_at, Lag::AtEnd)) => asked_at < last_fill,
            Some((asked_at, Lag::Unanswered)) => now_ms >= asked_at + UNANSWERED_RECHECK_MS,
            Some((asked_at, _)) => now_ms >= asked_at + RECHECK_MS,
            None => true,
        }
    }
}

/// Buffered records of the assigned lanes, handed out oldest first per partition.
pub struct Intake<R> {
    max_idle_ms: u64,
    pause_above: usize,
    lanes: BTreeMap<(i32, String), Lane<R>>,
    paused: BTreeSet<(i32, String)>,
    /// Per partition, the latest arrival among the records at its lanes' heads.
    last_fill: BTreeMap<i32, u64>,
    /// Per partition, the latest timestamp handed out: a record stamped before it came late.
    released: BTreeMap<i32, i64>,
}

/// A record that came after its partition had handed out records stamped later.
#[derive(Debug, PartialEq)]
pub struct Late {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// How much earlier it is stamped than the latest record its partition handed out.
    pub behind_ms: i64,
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
            released: BTreeMap::new(),
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
            self.released.remove(&partition);
        }
    }

    /// Forgets every buffered record (the consumer was rewound); lanes stay open.
    pub fn clear(&mut self, now_ms: u64) {
        for lane in self.lanes.values_mut() {
            *lane = Lane::new(now_ms, None);
        }
        // What is read again was handed out before the rewind, not late.
        self.released.clear();
    }

    /// Buffers a record; one for a lane that is not open (revoked meanwhile) is dropped.
    /// Returns it as [`Late`] when it is stamped before a record its partition already handed
    /// out: it came after the intake had stopped waiting for it.
    pub fn push(&mut self, record: R, now_ms: u64) -> Option<Late> {
        let p = record.partition();
        let lane = self.lanes.get_mut(&(p, record.topic().to_string()))?;
        if lane.records.is_empty() {
            self.last_fill.insert(p, now_ms);
        }
        lane.next_offset = Some(record.offset() + 1);
        lane.checked = None;
        lane.unanswered_since = None;
        lane.fresh = false;
        let late = match (record.timestamp_ms(), self.released.get(&p)) {
            (Some(at), Some(&released)) if at < released => Some(Late {
                topic: record.topic().to_string(),
                partition: p,
                offset: record.offset(),
                behind_ms: released - at,
            }),
            _ => None,
        };
        lane.records.push_back(record);
        lane.arrivals.push_back(now_ms);
        late
    }

    fn blocking(&self, now_ms: u64) -> impl Iterator<Item = (&(i32, String), &Lane<R>)> {
        self.lanes.iter().filter(move |((p, _), l)| {
            let last_fill = self.last_fill.get(p).copied().unwrap_or(0);
            l.holds_back(now_ms, last_fill, self.max_idle_ms)
        })
    }

    /// Empty lanes holding back a partition that has records to decide.
    fn waiting(&self, now_ms: u64) -> impl Iterator<Item = (&(i32, String), &Lane<R>)> {
        self.blocking(now_ms)
            .filter(|((p, _), _)| self.has_records(*p))
    }

    /// Whether any lane of partition `p` holds a record. A partition's lanes are adjacent in
    /// the map, so this reads only them.
    fn has_records(&self, p: i32) -> bool {
        self.lanes
            .range((p, String::new())..)
            .take_while(|((q, _), _)| *q == p)
            .any(|(_, l)| !l.records.is_empty())
    }

    /// The waiting lanes the broker should be asked about now (see [`Intake::checked`]), with
    /// the offset each waits for if known. Asked on every round of the loop's poll, so it
    /// builds nothing for the lanes it leaves out.
    pub fn to_check(&self, now_ms: u64) -> Vec<(String, i32, Option<i64>)> {
        self.waiting(now_ms)
            .filter(|((p, _), l)| {
                let last_fill = self.last_fill.get(p).copied().unwrap_or(0);
                l.needs_check(now_ms, last_fill)
            })
            .map(|((p, t), l)| (t.clone(), *p, l.next_offset))
            .collect()
    }

    /// The broker's answer about a lane, to a question asked at `asked_at`: at its end, it
    /// stops holding the partition back (until the next arrival); behind, it holds it back
    /// until its records come; unanswered, it holds it back until a leader answers or
    /// [`LEADER_MOVE_WAIT_MS`] pass. True when the lane just stopped being answered.
    pub fn checked(&mut self, topic: &str, partition: i32, asked_at: u64, lag: Lag) -> bool {
        let Some(lane) = self.lanes.get_mut(&(partition, topic.to_string())) else {
            return false;
        };
        if !lane.records.is_empty() {
            return false;
        }
        lane.checked = Some((asked_at, lag));
        match lag {
            Lag::Unanswered if lane.unanswered_since.is_none() => {
                lane.unanswered_since = Some(asked_at);
                true
            }
            Lag::Unanswered => false,
            _ => {
                lane.unanswered_since = None;
                false
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
        let (at, key) = best?;
        let key = key.clone();
        let released = self.released.entry(key.0).or_insert(at);
        *released = (*released).max(at);
        let lane = self.lanes.get_mut(&key)?;
        let record = lane.records.pop_front();
        lane.arrivals.pop_front();
        match lane.arrivals.front() {
            // The lane's next record may have arrived after the other lanes were last asked
            // about (it came while this one waited): they must be asked again before it goes.
            Some(&arrived) => {
                let fill = self.last_fill.entry(key.0).or_insert(arrived);
                *fill = (*fill).max(arrived);
            }
            None => lane.empty_since = now_ms,
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
    fn a_record_that_arrived_after_the_other_lanes_were_asked_waits_for_a_new_answer() {
        let mut i = intake(&["crm", "oms"], &[0]);
        i.push(R("oms", 0, 10), 0);
        i.checked("crm", 0, 1, Lag::AtEnd);
        // The order at 30 arrives while the one at 10 still waits: the crm answer predates it.
        i.push(R("oms", 0, 30), 5);
        assert_eq!(i.next(6), Some(R("oms", 0, 10)));
        assert_eq!(
            i.next(6),
            None,
            "a revocation the broker had before the order at 30 arrived may not be fetched yet"
        );
        assert_eq!(i.to_check(6), vec![("crm".to_string(), 0, None)]);
        // It was: it comes first.
        i.push(R("crm", 0, 20), 7);
        assert_eq!(drain(&mut i, 7), vec![R("crm", 0, 20)]);
        i.checked("crm", 0, 8, Lag::AtEnd);
        assert_eq!(drain(&mut i, 8), vec![R("oms", 0, 30)]);
    }

    #[test]
    fn a_record_stamped_before_what_its_partition_handed_out_is_reported_late() {
        let mut i = intake(&["crm", "oms"], &[0, 1]);
        i.push(R("oms", 0, 30), 0);
        i.checked("crm", 0, 0, Lag::AtEnd);
        assert_eq!(drain(&mut i, 0), vec![R("oms", 0, 30)]);
        // The revocation at 20 reached the broker after the order at 30 was decided.
        assert_eq!(
            i.push(R("crm", 0, 20), 0),
            Some(Late {
                topic: "crm".into(),
                partition: 0,
                offset: 20,
                behind_ms: 10
            })
        );
        assert_eq!(i.push(R("crm", 0, 31), 0), None, "in order");
        assert_eq!(
            i.push(R("crm", 1, 20), 0),
            None,
            "another partition's stream time is its own"
        );
        // A rewind reads again what was handed out: not late.
        i.clear(0);
        assert_eq!(i.push(R("oms", 0, 30), 0), None);
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
    fn a_lane_whose_position_is_unknown_holds_its_partition_back_until_it_idles_out() {
        let mut i = intake(&["crm", "oms"], &[0]);
        i.push(R("crm", 0, 1), 0);
        i.push(R("oms", 0, 10), 0);
        assert_eq!(i.next(0), Some(R("crm", 0, 1)));
        assert_eq!(i.next(50), None, "crm may still deliver something older");
        i.checked("crm", 0, 50, Lag::Unknown);
        assert_eq!(i.next(100), Some(R("oms", 0, 10)));
    }

    #[test]
    fn a_lane_whose_leader_does_not_answer_holds_its_partition_back_until_a_new_one_does() {
        let mut i = intake(&["crm", "oms"], &[0]);
        i.push(R("crm", 0, 1), 0);
        i.push(R("oms", 0, 10), 0);
        assert_eq!(i.next(0), Some(R("crm", 0, 1)));
        assert!(
            i.checked("crm", 0, 50, Lag::Unanswered),
            "the first silence"
        );
        assert_eq!(
            i.next(5_000),
            None,
            "long past the idle time, a killed leader may hold a revocation older than the order"
        );
        assert!(
            !i.checked("crm", 0, 5_000, Lag::Unanswered),
            "still silent: the wait runs from the first silence"
        );
        assert_eq!(i.next(LEADER_MOVE_WAIT_MS), None);
        assert_eq!(
            i.to_check(5_000 + RECHECK_MS),
            vec![],
            "each question waits out the probe's timeout while no leader answers: not so often"
        );
        assert_eq!(
            i.to_check(5_000 + UNANSWERED_RECHECK_MS),
            vec![("crm".to_string(), 0, Some(2))]
        );
        i.checked("crm", 0, 10_000, Lag::Behind);
        i.push(R("crm", 0, 5), 10_000);
        assert_eq!(
            drain(&mut i, 10_000),
            vec![R("crm", 0, 5)],
            "the new leader's records come first"
        );
        i.checked("crm", 0, 10_000, Lag::AtEnd);
        assert_eq!(i.next(10_000), Some(R("oms", 0, 10)));
    }

    #[test]
    fn a_partition_whose_leader_stays_gone_goes_on_without_it() {
        let mut i = intake(&["crm", "oms"], &[0]);
        i.push(R("crm", 0, 1), 0);
        i.push(R("oms", 0, 10), 0);
        assert_eq!(i.next(0), Some(R("crm", 0, 1)));
        i.checked("crm", 0, 100, Lag::Unanswered);
        i.checked("crm", 0, 20_000, Lag::Unanswered);
        assert_eq!(i.next(100 + LEADER_MOVE_WAIT_MS - 1), None);
        assert_eq!(i.next(100 + LEADER_MOVE_WAIT_MS), Some(R("oms", 0, 10)));
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
        i.push(R("oms", 0, 20), FIRST_FETCH_WAIT_MS);
        assert_eq!(
            i.to_check(FIRST_FETCH_WAIT_MS),
            vec![("crm".to_string(), 0, Some(40))],
            "a reopened lane is asked about from the position it was opened at"
        );
    }

    #[test]
    fn a_lane_the_broker_says_is_at_its_end_does_not_hold_its_partition_back() {
        let mut i = intake(&["crm", "oms"], &[0]);
        i.push(R("crm", 0, 5), 0);
        i.push(R("oms", 0, 10), 0);
        assert_eq!(i.next(0), Some(R("crm", 0, 5)));
        assert_eq!(i.to_check(0), vec![("crm".to_string(), 0, Some(6))]);
        assert_eq!(i.next(0), None);
        i.checked("crm", 0, 0, Lag::AtEnd);
        assert_eq!(i.to_check(0), vec![]);
        assert_eq!(i.next(0), Some(R("oms", 0, 10)));
        assert_eq!(i.to_check(0), vec![], "nothing is waiting to be decided");
        i.push(R("crm", 0, 20), 200);
        assert_eq!(i.next(200), None, "oms is not known to be at its end");
        assert_eq!(i.to_check(200), vec![("oms".to_string(), 0, Some(11))]);
        i.checked("oms", 0, 150, Lag::AtEnd);
        assert_eq!(
            i.next(200),
            None,
            "asked before crm's record arrived: what was written with it may not have been"
        );
        i.checked("oms", 0, 200, Lag::AtEnd);
        assert_eq!(i.next(200), Some(R("crm", 0, 20)));
    }

    #[test]
    fn a_lane_the_broker_says_is_behind_holds_its_partition_back_until_its_records_come() {
        let mut i = intake(&["crm", "oms"], &[0]);
        i.push(R("crm", 0, 1), 0);
        i.push(R("oms", 0, 30), 0);
        assert_eq!(i.next(0), Some(R("crm", 0, 1)));
        i.checked("crm", 0, 0, Lag::Behind);
        assert_eq!(
            i.next(60_000),
            None,
            "long past the idle time, a revocation the broker has may still come first"
        );
        assert_eq!(i.to_check(RECHECK_MS - 1), vec![]);
        assert_eq!(
            i.to_check(RECHECK_MS),
            vec![("crm".to_string(), 0, Some(2))],
            "asked again: the lag may have been a transaction marker"
        );
        i.push(R("crm", 0, 20), 60_000);
        assert_eq!(i.next(60_000), Some(R("crm", 0, 20)));
        assert_eq!(i.next(60_000), None, "crm is empty again");
        i.checked("crm", 0, 60_000, Lag::AtEnd);
        assert_eq!(i.next(60_000), Some(R("oms", 0, 30)));
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
