//! Partitions coming and going: the rebalance log, the consumer with its lanes and the
//! companion positions of each owned partition, and restoring or dropping a partition's state.

use super::log_reader::*;
use super::settings::*;
use super::stage::*;
use crate::intake::{FlowChange, Intake, Lag, LEADER_MOVE_WAIT_MS};
use crate::telemetry::{GroupReport, Metrics, StagePhase};
use anyhow::{anyhow, bail, Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub(crate) enum RebalanceEvent {
    Assigned(Vec<(String, i32)>),
    Revoked(Vec<(String, i32)>),
}

/// Records rebalances so the loop can restore and drop state between batches.
#[derive(Default)]
pub(crate) struct RebalanceLog {
    pub(crate) events: Mutex<Vec<RebalanceEvent>>,
    /// The consumer group state from the client's latest statistics, for `/readyz`.
    pub(crate) group: Mutex<Option<GroupReport>>,
    /// The lag of each assigned partition from the client's latest statistics.
    pub(crate) lags: Mutex<Option<Vec<PartitionLag>>>,
}

/// A topic, a partition and how many records of it are still to consume.
pub(crate) type PartitionLag = (String, i32, i64);

/// The part of librdkafka's statistics the consumer lag metric needs.
#[derive(serde::Deserialize)]
struct LagStatistics {
    #[serde(default)]
    topics: BTreeMap<String, TopicStatistics>,
}

#[derive(serde::Deserialize)]
struct TopicStatistics {
    #[serde(default)]
    partitions: BTreeMap<String, PartitionStatistics>,
}

#[derive(serde::Deserialize)]
struct PartitionStatistics {
    partition: i32,
    #[serde(default)]
    fetch_state: String,
    /// The next offset to hand the application; negative until it has had a record.
    #[serde(default = "no_offset")]
    app_offset: i64,
    /// The group's committed offset as this client knows it; negative when unknown.
    #[serde(default = "no_offset")]
    committed_offset: i64,
    /// The end of the partition a read_committed reader sees (last stable offset).
    #[serde(default = "no_offset")]
    ls_offset: i64,
}

fn no_offset() -> i64 {
    -1
}

/// Each partition the client fetches, with its lag, from one statistics report; `None` when
/// the report cannot be read. librdkafka lists an internal partition -1 per topic, and every
/// known partition whether fetched or not; only the fetched ones with a known position count.
/// Its own `consumer_lag` counts from the offsets the consumer committed, and Herald commits
/// them through the producer's transactions, so it stays -1: the lag is the last stable offset
/// less the next offset the application will get (or the committed one, before any record).
pub(crate) fn partition_lags(statistics: &[u8]) -> Option<Vec<PartitionLag>> {
    let stats: LagStatistics = serde_json::from_slice(statistics).ok()?;
    Some(
        stats
            .topics
            .into_iter()
            .flat_map(|(topic, t)| {
                t.partitions
                    .into_values()
                    .filter(|p| p.partition >= 0 && p.fetch_state == "active")
                    .filter_map(move |p| {
                        let at = if p.app_offset >= 0 {
                            p.app_offset
                        } else {
                            p.committed_offset
                        };
                        (at >= 0 && p.ls_offset >= 0)
                            .then(|| (topic.clone(), p.partition, (p.ls_offset - at).max(0)))
                    })
            })
            .collect(),
    )
}

/// The context of the companion-topic consumer: end of log is expected, and its statistics
/// carry the lag of the companion partitions.
#[derive(Default)]
pub(crate) struct CompanionLog {
    pub(crate) lags: Mutex<Option<Vec<PartitionLag>>>,
}

impl ClientContext for CompanionLog {
    fn error(&self, error: KafkaError, reason: &str) {
        crate::kafka::settings::EndOfLogIsExpected.error(error, reason)
    }

    fn stats_raw(&self, statistics: &[u8]) {
        if let (Some(lags), Ok(mut slot)) = (partition_lags(statistics), self.lags.lock()) {
            *slot = Some(lags);
        }
    }
}

impl ConsumerContext for CompanionLog {}

impl CompanionLog {
    pub(crate) fn take_lags(&self) -> Option<Vec<PartitionLag>> {
        self.lags.lock().ok().and_then(|mut l| l.take())
    }
}

/// The part of librdkafka's statistics readiness needs.
#[derive(serde::Deserialize)]
pub(crate) struct GroupStatistics {
    pub(crate) cgrp: Option<GroupStatisticsEntry>,
}

#[derive(serde::Deserialize)]
pub(crate) struct GroupStatisticsEntry {
    pub(crate) state: String,
    pub(crate) join_state: String,
}

impl ClientContext for RebalanceLog {
    fn stats_raw(&self, statistics: &[u8]) {
        if let Ok(GroupStatistics { cgrp: Some(g) }) = serde_json::from_slice(statistics) {
            if let Ok(mut slot) = self.group.lock() {
                *slot = Some(GroupReport {
                    state: g.state,
                    join_state: g.join_state,
                    at: Instant::now(),
                });
            }
        }
        if let (Some(lags), Ok(mut slot)) = (partition_lags(statistics), self.lags.lock()) {
            *slot = Some(lags);
        }
    }
}

impl RebalanceLog {
    pub(crate) fn take_group_report(&self) -> Option<GroupReport> {
        self.group.lock().ok().and_then(|mut g| g.take())
    }

    pub(crate) fn take_lags(&self) -> Option<Vec<PartitionLag>> {
        self.lags.lock().ok().and_then(|mut l| l.take())
    }
}

pub(crate) fn tpl_list(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

impl ConsumerContext for RebalanceLog {
    fn pre_rebalance(&self, _c: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = r {
            if let Ok(mut e) = self.events.lock() {
                e.push(RebalanceEvent::Revoked(tpl_list(tpl)));
            }
        }
    }
    fn post_rebalance(&self, _c: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = r {
            if let Ok(mut e) = self.events.lock() {
                e.push(RebalanceEvent::Assigned(tpl_list(tpl)));
            }
        }
    }
}

/// Restores state for partitions of the lead topic just assigned, with their companion topics,
/// and drops it for the revoked ones.
#[allow(clippy::too_many_arguments)]
pub(crate) fn apply_rebalances<S: Stage>(
    inputs: &Inputs,
    stage: &mut S,
    owned: &mut BTreeSet<i32>,
    intake: &mut Intake<OwnedMessage>,
    now_ms: &dyn Fn() -> u64,
    batch: &mut Vec<OwnedMessage>,
    reader: &LogReader,
    metrics: &Metrics,
) -> Result<()> {
    let events: Vec<RebalanceEvent> = match inputs.group.context().events.lock() {
        Ok(mut e) => std::mem::take(&mut *e),
        Err(_) => bail!("rebalance log poisoned"),
    };
    for ev in events {
        match ev {
            RebalanceEvent::Revoked(list) => {
                for (_, p) in list {
                    inputs.unassign_companions(p)?;
                    for topic in inputs.all_topics() {
                        intake.close(topic, p);
                    }
                    if owned.remove(&p) {
                        stage.revoke(p);
                        tracing::info!(partition = p, "partition revoked; state dropped");
                    }
                    // Records fetched before the revoke belong to the next owner now.
                    batch.retain(|m| m.partition() != p);
                }
            }
            RebalanceEvent::Assigned(list) => {
                for (_, p) in list {
                    if !owned.insert(p) {
                        continue;
                    }
                    if !stage.owns(p) {
                        let t = Instant::now();
                        metrics
                            .readiness
                            .phase(stage.name(), StagePhase::Restoring { partition: p });
                        stage.restore(p, reader)?;
                        metrics.partition_restored(stage.name());
                        tracing::info!(
                            partition = p,
                            ms = t.elapsed().as_millis() as u64,
                            "partition assigned; state restored"
                        );
                    }
                    // Skip what the decision log shows as decided; records below it are also
                    // filtered by the stage, so a failed seek costs time, not correctness.
                    // Records that left only dead letters are not in the decision log: where
                    // the group committed past them, their transaction handled them already,
                    // and reading them again would dead-letter them twice.
                    let mut starts: BTreeMap<String, i64> =
                        stage.resume_positions(p).into_iter().collect();
                    for (topic, committed) in inputs.committed_at(p) {
                        if let Some(start) = starts.get_mut(&topic) {
                            *start = (*start).max(committed);
                        }
                    }
                    inputs.assign_companions(p, &starts)?;
                    if let Some(next) = starts.get(&inputs.lead) {
                        if let Err(e) = inputs.group.seek(
                            &inputs.lead,
                            p,
                            Offset::Offset(*next),
                            Duration::from_secs(5),
                        ) {
                            tracing::debug!(partition = p, error = %e, "seek after restore not possible yet");
                        }
                    }
                    // The lanes' patience starts now, after the restore, not at the assignment.
                    for topic in inputs.all_topics() {
                        let start = match starts.get(topic) {
                            Some(s) => Some(*s),
                            None => inputs.start_of(topic, p),
                        };
                        intake.open(topic, p, start, now_ms());
                        inputs.opened(topic, p);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Asks the broker where the empty lanes that hold a partition back stand against their ends,
/// in one request, and tells the intake. Asked after the partition's latest arrival, "at the
/// end" proves that nothing written before that arrival is still to come on the lane.
pub(crate) fn check_lanes(
    inputs: &Inputs,
    intake: &mut Intake<OwnedMessage>,
    now_ms: &dyn Fn() -> u64,
) {
    let lanes = intake.to_check(now_ms());
    if lanes.is_empty() {
        return;
    }
    let asked_at = now_ms();
    let asking = Instant::now();
    let ends = inputs.ends(&lanes);
    tracing::debug!(
        lanes = lanes.len(),
        us = asking.elapsed().as_micros() as u64,
        "lane ends asked"
    );
    let positions = inputs.positions();
    for (topic, p, next) in lanes {
        // The consumer's own position steps over transaction markers; the lane's next offset
        // stands in before the consumer has handed anything over, and wins when it is further
        // (a lead partition whose seek to the resume position failed re-reads decided records).
        let reported = positions
            .get(&(topic.clone(), p))
            .copied()
            .filter(|at| !inputs.is_stale(&topic, p, *at));
        let position = reported.max(next);
        let lag = match (position, ends.get(&(topic.clone(), p))) {
            (Some(at), Some(end)) if at >= *end => Lag::AtEnd,
            (Some(_), Some(_)) => Lag::Behind,
            (Some(_), None) => Lag::Unanswered,
            (None, _) => Lag::Unknown,
        };
        tracing::debug!(topic, partition = p, ?position, end = ?ends.get(&(topic.clone(), p)), ?lag, "lane checked");
        if intake.checked(&topic, p, asked_at, lag) {
            tracing::warn!(
                topic,
                partition = p,
                wait_ms = LEADER_MOVE_WAIT_MS,
                "the lane's leader does not say where it ends; its partition waits for a new leader before deciding the other topics"
            );
        }
    }
}

/// How many records one poll of the inputs takes from each consumer without waiting: a lane
/// that catches up holds its partition back, so it must be drained as fast as it is fetched.
pub(crate) const POLL_BURST: usize = 1024;

/// The two consumers a stage reads with: the group member for the lead topic, and a
/// manually assigned one for the companion topics' partitions that follow it.
pub(crate) struct Inputs {
    pub(crate) group: BaseConsumer<RebalanceLog>,
    pub(crate) companions: BaseConsumer<CompanionLog>,
    /// Asks where lanes end. It never fetches: a broker answers one connection's requests in
    /// order, so on a consumer's connection the question would wait out a parked fetch.
    pub(crate) probe: BaseConsumer<EndOfLogIsExpected>,
    /// The position each consumer reported for a lane when it was (re)opened. librdkafka
    /// forgets a partition's position only once its unassign or seek has been processed, so
    /// until then it reports where the previous assignment had read to, which may be past
    /// records the new one has yet to hand over.
    pub(crate) stale_positions: std::cell::RefCell<HashMap<(String, i32), i64>>,
    pub(crate) lead: String,
    pub(crate) companion_topics: Vec<String>,
}

impl Inputs {
    pub(crate) fn all_topics(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.lead).chain(self.companion_topics.iter())
    }

    pub(crate) fn is_lead(&self, topic: &str) -> bool {
        topic == self.lead
    }

    /// Records from both consumers; waits up to `wait` on the group member, which also serves
    /// the rebalance callbacks. An error no retry can mend (a setting the broker refuses, a
    /// missing permission) stops the stage naming what to change.
    pub(crate) fn poll(
        &self,
        wait: Duration,
        settings: &KafkaSettings,
    ) -> Result<Vec<OwnedMessage>> {
        let mut got = Vec::new();
        let mut fatal = None;
        let mut take = |r: Option<KafkaResult<OwnedMessage>>| match r {
            Some(Ok(m)) => got.push(m),
            Some(Err(KafkaError::PartitionEOF(_))) | None => {}
            Some(Err(e)) => match needs_an_operator(&e, settings) {
                Some(why) => fatal = Some(why),
                None => tracing::warn!(error = %e, "consumer error (librdkafka retries)"),
            },
        };
        take(self.group.poll(wait).map(|r| r.map(|m| m.detach())));
        for _ in 0..POLL_BURST {
            match self.group.poll(Duration::ZERO) {
                None => break,
                r => take(r.map(|r| r.map(|m| m.detach()))),
            }
        }
        if !self.companion_topics.is_empty() {
            for _ in 0..POLL_BURST {
                match self.companions.poll(Duration::ZERO) {
                    None => break,
                    r => take(r.map(|r| r.map(|m| m.detach()))),
                }
            }
        }
        match fatal {
            Some(why) => Err(why),
            None => Ok(got),
        }
    }

    /// Assigns partition `p` of every companion topic, from the stage's resume position when
    /// it has one and from the group's committed offset otherwise.
    pub(crate) fn assign_companions(&self, p: i32, starts: &BTreeMap<String, i64>) -> Result<()> {
        if self.companion_topics.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for t in &self.companion_topics {
            let offset = match starts.get(t) {
                Some(o) => Offset::Offset(*o),
                None => Offset::Stored,
            };
            tpl.add_partition_offset(t, p, offset)?;
        }
        self.companions
            .incremental_assign(&tpl)
            .with_context(|| format!("cannot assign companion partitions {p}"))?;
        Ok(())
    }

    pub(crate) fn unassign_companions(&self, p: i32) -> Result<()> {
        if self.companion_topics.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for t in &self.companion_topics {
            tpl.add_partition(t, p);
        }
        self.companions
            .incremental_unassign(&tpl)
            .with_context(|| format!("cannot unassign companion partitions {p}"))?;
        Ok(())
    }

    /// The end (last stable offset) of each lane, asked of the broker now; lanes it did not
    /// answer for are missing.
    pub(crate) fn ends(&self, lanes: &[(String, i32, Option<i64>)]) -> HashMap<(String, i32), i64> {
        let mut tpl = TopicPartitionList::new();
        for (topic, p, _) in lanes {
            if let Err(e) = tpl.add_partition_offset(topic, *p, Offset::End) {
                tracing::debug!(error = %e, topic, partition = p, "cannot ask for a lane's end");
            }
        }
        match self.probe.offsets_for_times(tpl, Duration::from_secs(2)) {
            Ok(answer) => answer
                .elements()
                .iter()
                .filter(|e| e.error().is_ok())
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some(((e.topic().to_string(), e.partition()), o)),
                    _ => None,
                })
                .collect(),
            Err(e) => {
                tracing::debug!(error = %e, "the broker did not say where the lanes end");
                HashMap::new()
            }
        }
    }

    /// Notes the position the consumer reports for a lane just (re)opened: until it changes,
    /// it belongs to the previous assignment.
    pub(crate) fn opened(&self, topic: &str, p: i32) {
        let key = (topic.to_string(), p);
        let now = self.positions().get(&key).copied();
        let mut stale = self.stale_positions.borrow_mut();
        match now {
            Some(at) => stale.insert(key, at),
            None => stale.remove(&key),
        };
    }

    /// Whether `at` is the position the consumer reported when the lane was opened.
    pub(crate) fn is_stale(&self, topic: &str, p: i32, at: i64) -> bool {
        self.stale_positions
            .borrow()
            .get(&(topic.to_string(), p))
            .is_some_and(|s| *s == at)
    }

    /// The group's committed offset of partition `p` of each input topic that has one; none
    /// when the broker does not say (the stage's own positions are used then).
    pub(crate) fn committed_at(&self, p: i32) -> BTreeMap<String, i64> {
        let mut tpl = TopicPartitionList::new();
        for topic in self.all_topics() {
            tpl.add_partition(topic, p);
        }
        match self.group.committed_offsets(tpl, Duration::from_secs(5)) {
            Ok(committed) => committed
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some((e.topic().to_string(), o)),
                    _ => None,
                })
                .collect(),
            Err(e) => {
                tracing::debug!(partition = p, error = %e, "committed offsets not known");
                BTreeMap::new()
            }
        }
    }

    /// Each assigned lane's consume position, where the consumer knows it.
    pub(crate) fn positions(&self) -> HashMap<(String, i32), i64> {
        let mut out = HashMap::new();
        let group = self.group.position();
        let companions = if self.companion_topics.is_empty() {
            Ok(TopicPartitionList::new())
        } else {
            self.companions.position()
        };
        for tpl in [group, companions].into_iter().flatten() {
            for e in tpl.elements() {
                if let Offset::Offset(o) = e.offset() {
                    out.insert((e.topic().to_string(), e.partition()), o);
                }
            }
        }
        out
    }

    /// Where a lane with no resume position starts reading: the group's committed offset, or
    /// the start of the partition when the group has none (`auto.offset.reset=earliest`).
    /// None when the broker does not say.
    pub(crate) fn start_of(&self, topic: &str, p: i32) -> Option<i64> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, p);
        let consumer_committed = if self.is_lead(topic) {
            self.group.committed_offsets(tpl, Duration::from_secs(5))
        } else {
            self.companions
                .committed_offsets(tpl, Duration::from_secs(5))
        };
        let committed = consumer_committed
            .ok()?
            .elements()
            .first()
            .map(|e| e.offset());
        match committed {
            Some(Offset::Offset(o)) => Some(o),
            _ => self
                .probe
                .fetch_watermarks(topic, p, Duration::from_secs(5))
                .ok()
                .map(|(low, _)| low),
        }
    }

    /// Pauses and resumes fetching as the intake asks; a failure only costs memory, so it is
    /// logged.
    pub(crate) fn apply_flow(&self, change: FlowChange) {
        for (lanes, pause) in [(&change.pause, true), (&change.resume, false)] {
            for (topic, p) in lanes {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(topic, *p);
                let result = match (self.is_lead(topic), pause) {
                    (true, true) => self.group.pause(&tpl),
                    (true, false) => self.group.resume(&tpl),
                    (false, true) => self.companions.pause(&tpl),
                    (false, false) => self.companions.resume(&tpl),
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e, topic, partition = p, pause, "cannot pause or resume a lane");
                }
            }
        }
    }

    /// Seeks every assigned partition of both consumers back to the group's committed offset;
    /// returns the committed offsets it sought to.
    pub(crate) fn rewind(&self) -> Result<Vec<(String, i32, i64)>> {
        let committed = self
            .group
            .committed_offsets(self.group.assignment()?, Duration::from_secs(30))?;
        let mut sought = seek_to(&self.group, &committed)?;
        if !self.companion_topics.is_empty() {
            let committed = self
                .companions
                .committed_offsets(self.companions.assignment()?, Duration::from_secs(30))?;
            sought.extend(seek_to(&self.companions, &committed)?);
        }
        Ok(sought)
    }
}

/// Seeks to the committed offsets (the beginning where there is none); returns the committed
/// ones.
pub(crate) fn seek_to<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    committed: &TopicPartitionList,
) -> Result<Vec<(String, i32, i64)>> {
    let mut seek = TopicPartitionList::new();
    let mut sought = Vec::new();
    for e in committed.elements() {
        let offset = match e.offset() {
            Offset::Offset(o) => {
                sought.push((e.topic().to_string(), e.partition(), o));
                Offset::Offset(o)
            }
            _ => Offset::Beginning,
        };
        seek.add_partition_offset(e.topic(), e.partition(), offset)?;
    }
    consumer.seek_partitions(seek, Duration::from_secs(30))?;
    Ok(sought)
}

/// The consumer errors that retrying cannot mend, with the setting an operator must change.
pub(crate) fn needs_an_operator(e: &KafkaError, settings: &KafkaSettings) -> Option<anyhow::Error> {
    // A fatal error leaves the consumer unusable (e.g. a static member fenced by a rejoin under
    // its own group.instance.id while the group coordinator moved): polling it on would stall
    // the stage for ever, so it stops, and its supervisor starts it afresh.
    if let KafkaError::MessageConsumptionFatal(code) = e {
        return Some(anyhow!(
            "the Kafka consumer failed fatally ({code}); stopping so that a restart rejoins the group"
        ));
    }
    let code = e.rdkafka_error_code()?;
    let why = match code {
        RDKafkaErrorCode::InvalidSessionTimeout => format!(
            "the brokers refuse a session timeout of {} ms: set --session-timeout-ms \
             (HERALD_SESSION_TIMEOUT_MS) within their group.min.session.timeout.ms and \
             group.max.session.timeout.ms (6,000 and 1,800,000 by default)",
            settings.session_timeout_ms
        ),
        RDKafkaErrorCode::GroupAuthorizationFailed => format!(
            "the brokers do not let this principal use the consumer groups {}-*: grant READ on \
             them (or set --group-prefix to groups it may use)",
            settings.group_prefix
        ),
        RDKafkaErrorCode::TopicAuthorizationFailed => {
            "the brokers do not let this principal read Herald's topics: grant READ and WRITE \
             on them"
                .to_string()
        }
        _ => return None,
    };
    Some(anyhow!("{why} ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_counts_from_the_application_position_to_the_last_stable_offset() {
        // Trimmed from a real report of a transactional consumer: librdkafka's own
        // consumer_lag stays -1 because the offsets are committed by the producer.
        let report = br#"{"type":"consumer","topics":{"herald.decisions.v1":{"partitions":{
            "0":{"partition":0,"fetch_state":"active","app_offset":1700,"committed_offset":-1001,
                 "ls_offset":1772,"hi_offset":1780,"consumer_lag":-1},
            "1":{"partition":1,"fetch_state":"active","app_offset":-1001,"committed_offset":1500,
                 "ls_offset":1587,"hi_offset":1587,"consumer_lag":-1},
            "2":{"partition":2,"fetch_state":"none","app_offset":-1001,"committed_offset":-1001,
                 "ls_offset":-1001,"hi_offset":-1001,"consumer_lag":-1},
            "3":{"partition":3,"fetch_state":"active","app_offset":-1001,"committed_offset":-1001,
                 "ls_offset":900,"hi_offset":900,"consumer_lag":-1},
            "-1":{"partition":-1,"fetch_state":"none","app_offset":-1001,"committed_offset":-1001,
                 "ls_offset":-1001,"hi_offset":-1001,"consumer_lag":-1}}}}}"#;
        assert_eq!(
            partition_lags(report),
            Some(vec![
                ("herald.decisions.v1".to_string(), 0, 72),
                ("herald.decisions.v1".to_string(), 1, 87),
            ])
        );
        assert_eq!(partition_lags(b"not json"), None);
    }
}
