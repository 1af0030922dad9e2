//! The loop: consume, decide, produce and commit the consumer's offsets in one Kafka
//! transaction per batch (or at-least-once where the brokers have none), until SIGTERM.

use super::log_reader::*;
use super::rebalance::*;
use super::settings::*;
use super::stage::*;
use crate::intake::Intake;
use crate::telemetry::{Metrics, StagePhase};
use anyhow::{anyhow, Context, Result};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Records one input lane may buffer before its fetching pauses.
pub(crate) const LANE_PAUSE_ABOVE: usize = 20_000;

/// Runs a stage until `stop` is set; the transaction in flight is finished first.
pub fn run_stage<S: Stage>(
    settings: &KafkaSettings,
    stage: &mut S,
    stop: &AtomicBool,
    metrics: &Metrics,
    rt: &tokio::runtime::Handle,
) -> Result<()> {
    metrics.readiness.phase(stage.name(), StagePhase::Starting);
    metrics.stage_started(stage.name(), &stage.input_topics());
    let result = consume(settings, stage, stop, metrics, rt);
    metrics.readiness.phase(stage.name(), StagePhase::Stopped);
    result
}

/// The body of `run_stage`: clients, then the consume loop.
pub(crate) fn consume<S: Stage>(
    settings: &KafkaSettings,
    stage: &mut S,
    stop: &AtomicBool,
    metrics: &Metrics,
    rt: &tokio::runtime::Handle,
) -> Result<()> {
    let group = format!("{}-{}", settings.group_prefix, stage.name());
    let client_id = format!(
        "{}-{}-{}",
        settings.group_prefix,
        stage.name(),
        settings.instance_id
    );
    let session = settings.session_timeout_ms.to_string();
    let heartbeat = (settings.session_timeout_ms / 3)
        .clamp(100, 1000)
        .to_string();
    let mut specific = vec![
        (
            "partition.assignment.strategy",
            settings.assignment_strategy.as_str(),
        ),
        ("session.timeout.ms", session.as_str()),
        ("heartbeat.interval.ms", heartbeat.as_str()),
        // A lane the broker says is behind holds its partition until its next fetch answers;
        // a broker that parks an empty fetch for its whole wait (as librdkafka's mock cluster
        // does) would stall it that long. `--kafka-config` can raise it.
        ("fetch.wait.max.ms", FETCH_WAIT_MS),
        // Group state for `/readyz`, reported by the client every second.
        ("statistics.interval.ms", "1000"),
    ];
    if settings.static_membership {
        specific.push(("group.instance.id", client_id.as_str()));
    }
    let cc = settings.consumer_config(&group, &client_id, &specific);
    let consumer: BaseConsumer<RebalanceLog> = cc
        .create_with_context(RebalanceLog::default())
        .context("cannot create Kafka consumer")?;
    let topics = stage.input_topics();
    let (lead, companions) = topics
        .split_first()
        .ok_or_else(|| anyhow!("stage {} reads no topic", stage.name()))?;
    // Only the lead topic is subscribed, so any assignor (cooperative-sticky included) hands
    // out whole partitions: the companion topics' same-numbered partitions follow by manual
    // assignment. That is what keeps one customer's whole history on one task.
    consumer.subscribe(&[lead.as_str()])?;
    let companion_config = settings.consumer_config(
        &group,
        &format!("{client_id}-companions"),
        &[
            ("fetch.wait.max.ms", FETCH_WAIT_MS),
            ("statistics.interval.ms", "1000"),
        ],
    );
    let inputs = Inputs {
        group: consumer,
        companions: companion_config
            .create_with_context(CompanionLog::default())
            .context("cannot create Kafka consumer for companion topics")?,
        probe: settings
            .consumer_config(&group, &format!("{client_id}-probe"), &[])
            .create_with_context(EndOfLogIsExpected)
            .context("cannot create Kafka client for lane checks")?,
        stale_positions: Default::default(),
        lead: lead.to_string(),
        companion_topics: companions.iter().map(|t| t.to_string()).collect(),
    };
    let txn_id = client_id.clone();
    let producer = settings.producer(settings.exactly_once.then_some(txn_id.as_str()))?;
    if settings.exactly_once {
        init_transactions(&producer, stop)?;
    }
    let reader = LogReader::new(settings)?;
    let mut owned: BTreeSet<i32> = BTreeSet::new();
    let mut intake: Intake<OwnedMessage> = Intake::new(settings.max_task_idle_ms, LANE_PAUSE_ABOVE);
    let clock = Instant::now();
    let now_ms = || clock.elapsed().as_millis() as u64;
    tracing::info!(
        stage = stage.name(),
        group,
        exactly_once = settings.exactly_once,
        "loop started"
    );

    let mut pace = TransactionPace::default();
    // The lags each consumer last reported: the metric shows both together.
    let (mut lead_lags, mut companion_lags) = (Vec::new(), Vec::new());
    // Since when the intake has held records but given none out: its partitions wait on lanes
    // with nothing buffered, and only time or a new record changes that. Kept from one fill to
    // the next while no batch runs: a fill that finds nothing ends after one round.
    let mut stalled_since: Option<Instant> = None;
    while !stop.load(Ordering::SeqCst) {
        let mut batch: Vec<OwnedMessage> = Vec::new();
        let started = Instant::now();
        let fill_until = pace.fill_until(started);
        loop {
            let wait = pace.poll_wait(
                Instant::now(),
                batch.len(),
                intake.len(),
                settings.batch_size,
                stalled_since.is_some_and(|t| t.elapsed() >= STALL_SPIN),
            );
            for m in inputs.poll(wait, settings)? {
                if let Some(late) = intake.push(m, now_ms()) {
                    // It became readable after the intake stopped waiting for it (records of
                    // different partitions become readable in no set order): it is decided
                    // after records stamped later.
                    tracing::warn!(
                        stage = stage.name(),
                        topic = late.topic,
                        partition = late.partition,
                        offset = late.offset,
                        behind_ms = late.behind_ms,
                        "a record came after its partition had decided later records"
                    );
                    metrics.late_record(stage.name(), &late.topic);
                }
            }
            apply_rebalances(
                &inputs,
                stage,
                &mut owned,
                &mut intake,
                &now_ms,
                &mut batch,
                &reader,
                metrics,
            )?;
            if let Some(report) = inputs.group.context().take_group_report() {
                metrics.readiness.group(stage.name(), report);
            }
            let lead = inputs.group.context().take_lags();
            let companion = inputs.companions.context().take_lags();
            if lead.is_some() || companion.is_some() {
                lead_lags = lead.unwrap_or(lead_lags);
                companion_lags = companion.unwrap_or(companion_lags);
                let all: Vec<_> = lead_lags.iter().chain(&companion_lags).cloned().collect();
                metrics.set_consumer_lag(stage.name(), &all);
            }
            metrics.readiness.phase(stage.name(), StagePhase::Consuming);
            check_lanes(&inputs, &mut intake, &now_ms);
            let taken = batch.len();
            while batch.len() < settings.batch_size {
                match intake.next(now_ms()) {
                    Some(m) => batch.push(m),
                    None => break,
                }
            }
            if batch.len() == taken && !intake.is_empty() {
                stalled_since.get_or_insert_with(Instant::now);
            } else {
                stalled_since = None;
            }
            inputs.apply_flow(intake.flow());
            if stop.load(Ordering::SeqCst)
                || batch.len() >= settings.batch_size
                || Instant::now() >= fill_until
            {
                break;
            }
        }
        if batch.is_empty() && !stage.tick_due() {
            stage.idle()?;
            continue;
        }
        pace.started(Instant::now());
        stalled_since = None;
        tracing::debug!(
            stage = stage.name(),
            records = batch.len(),
            fill_ms = started.elapsed().as_millis() as u64,
            "batch filled"
        );
        let result = run_batch(
            settings,
            stage,
            &inputs.group,
            &producer,
            &batch,
            &reader,
            metrics,
            rt,
        );
        match result {
            Ok(()) => {}
            Err(BatchError::Abortable(why)) => {
                tracing::warn!(error = %why, "transaction aborted; rewinding to the last commit");
                metrics.transaction(stage.name(), false);
                if settings.exactly_once {
                    producer
                        .abort_transaction(Duration::from_secs(30))
                        .context("abort_transaction")?;
                }
                stage.reset();
                let starts = inputs.rewind()?;
                intake.clear(now_ms());
                for (topic, p, start) in starts {
                    if intake.is_open(&topic, p) {
                        intake.open(&topic, p, Some(start), now_ms());
                        inputs.opened(&topic, p);
                    }
                }
            }
            Err(BatchError::Fatal(e)) => {
                if settings.exactly_once {
                    let _ = producer.abort_transaction(Duration::from_secs(10));
                }
                return Err(e);
            }
        }
    }
    tracing::info!(stage = stage.name(), "stopping: no transaction in flight");
    inputs.group.unsubscribe();
    stage.stopped()
}

/// Registers the transactional id (fencing any earlier producer under it), waiting out a
/// coordinator that is moving or a broker that is down, as long as the process is not asked
/// to stop.
pub(crate) fn init_transactions(producer: &FutureProducer, stop: &AtomicBool) -> Result<()> {
    let mut backoff = Duration::from_millis(500);
    loop {
        match producer.init_transactions(Duration::from_secs(30)) {
            Ok(()) => return Ok(()),
            Err(KafkaError::Transaction(e)) if e.is_retriable() && !stop.load(Ordering::SeqCst) => {
                tracing::warn!(error = %e, "the transaction coordinator is not available yet; retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(e) => {
                return Err(anyhow!(e)).context(
                    "init_transactions failed: does the broker support transactions? (use at-least-once mode if not)",
                )
            }
        }
    }
}

/// How long a stage consumer's fetch may wait at the broker for data (librdkafka's default is
/// 500 ms). A real broker answers as soon as data arrives; the mock cluster parks an empty
/// fetch for the whole wait, which then adds to every record's latency.
pub(crate) const FETCH_WAIT_MS: &str = "20";

/// The least time from one transaction's start to the next's, when records arrive slower than
/// a batch holds: it bounds how many transactions a stage commits per second (Kafka Streams
/// commits every 100 ms under exactly-once). It counts from the last transaction's start, not
/// from its commit, so that records which arrived while it was handled and committed do not
/// wait again: counted from the commit, a record waited for a whole cycle plus this.
const FILL_MS: u64 = 20;

/// When a stage's next transaction may start, and how long a poll may wait while its batch
/// fills.
#[derive(Debug, Default)]
pub(crate) struct TransactionPace {
    last_started: Option<Instant>,
}

impl TransactionPace {
    /// The earliest the next transaction starts: [`FILL_MS`] after the last one started, or
    /// at once if none has.
    pub(crate) fn fill_until(&self, now: Instant) -> Instant {
        self.last_started
            .map_or(now, |t| t + Duration::from_millis(FILL_MS))
    }

    /// How long the next poll for records may wait at `now`, with `in_batch` records taken
    /// and `buffered` waiting in the intake: not at all when there is a batch's worth or the
    /// batch is due, at most until it is due while it fills, and a short idle wait when there
    /// is nothing to do. More than a batch buffered is taken at once, unless the intake is
    /// `stalled` (it has given nothing out for [`STALL_SPIN`]): then the poll waits up to
    /// [`STALLED_POLL`] for a record that may change that.
    pub(crate) fn poll_wait(
        &self,
        now: Instant,
        in_batch: usize,
        buffered: usize,
        batch_size: usize,
        stalled: bool,
    ) -> Duration {
        let due = self.fill_until(now);
        if in_batch >= batch_size {
            Duration::ZERO
        } else if buffered > batch_size {
            if stalled {
                STALLED_POLL
            } else {
                Duration::ZERO
            }
        } else if now < due {
            (due - now).min(IDLE_POLL)
        } else if in_batch == 0 {
            IDLE_POLL
        } else {
            Duration::ZERO
        }
    }

    /// A transaction started at `at`.
    pub(crate) fn started(&mut self, at: Instant) {
        self.last_started = Some(at);
    }
}

/// How long a poll waits for records when there is nothing to do.
const IDLE_POLL: Duration = Duration::from_millis(10);

/// How long a poll waits while the intake holds more than a batch but has given none of it
/// out for [`STALL_SPIN`] (its partitions wait on lanes that are fresh after an assignment,
/// or behind). Not waiting at all, the stage's thread went round about 250,000 times a second
/// on a catch-up, asking each time which lanes to check: a full core for the first second of
/// every assignment (perf, herald bench). The poll returns as soon as a record of the lead
/// topic arrives, but not for one of a companion topic (another consumer).
const STALLED_POLL: Duration = Duration::from_millis(1);

/// How long a stalled intake is polled without waiting before [`STALLED_POLL`] applies. In
/// steady running a partition waits on a lane for well under this, and waiting there at once
/// cost about 8 % of the end-to-end rate (herald bench, three alternating pairs): a companion
/// lane's record does not end the lead consumer's wait.
const STALL_SPIN: Duration = Duration::from_millis(5);

pub(crate) enum BatchError {
    Abortable(anyhow::Error),
    Fatal(anyhow::Error),
}

pub(crate) fn kafka_error(e: KafkaError, what: &str) -> BatchError {
    let fatal = match &e {
        KafkaError::Transaction(t) => t.is_fatal() || !t.txn_requires_abort() && !t.is_retriable(),
        KafkaError::MessageProduction(RDKafkaErrorCode::ProducerFenced) => true,
        _ => false,
    };
    let err = anyhow!("{what}: {e}");
    if fatal {
        BatchError::Fatal(err)
    } else {
        BatchError::Abortable(err)
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn run_batch<S: Stage>(
    settings: &KafkaSettings,
    stage: &mut S,
    consumer: &BaseConsumer<RebalanceLog>,
    producer: &FutureProducer,
    batch: &[OwnedMessage],
    reader: &LogReader,
    metrics: &Metrics,
    rt: &tokio::runtime::Handle,
) -> Result<(), BatchError> {
    let t_start = Instant::now();
    // A tick with no record is not a batch anyone traces.
    let batch_span = if batch.is_empty() {
        tracing::Span::none()
    } else {
        let group = format!("{}-{}", settings.group_prefix, stage.name());
        crate::trace::batch_span(stage.name(), &group, batch.len())
    };
    let _in_batch = batch_span.enter();
    // Outside the transaction, so that reading the inventory table never keeps one open. A
    // failed read is retried on a later batch; meanwhile guards see the table as it was, and
    // hold rather than send once its levels grow old.
    if let Err(e) = stage.refresh_tables(reader) {
        tracing::warn!(error = %e, "inventory table not refreshed; retrying on a later batch");
    }
    if let Err(e) = stage.prefetch(batch) {
        tracing::warn!(error = %format!("{e:#}"), "batch prefetch failed; each record loads its own state");
    }
    let t_prepared = Instant::now();
    if settings.exactly_once {
        producer
            .begin_transaction()
            .map_err(|e| kafka_error(e, "begin_transaction"))?;
    }
    let mut out = Outbox::default();
    let mut pending = Vec::new();
    let mut offsets: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for msg in batch {
        if !stage.owns(msg.partition()) {
            metrics.readiness.phase(
                stage.name(),
                StagePhase::Restoring {
                    partition: msg.partition(),
                },
            );
            let t = Instant::now();
            stage
                .restore(msg.partition(), reader)
                .map_err(BatchError::Abortable)?;
            tracing::info!(
                partition = msg.partition(),
                ms = t.elapsed().as_millis() as u64,
                "state restored after an abort"
            );
            metrics.readiness.phase(stage.name(), StagePhase::Consuming);
        }
        stage.handle(msg, &mut out).map_err(BatchError::Fatal)?;
        // Sent as soon as they are decided, so that librdkafka and the broker deliver them
        // while the rest of the batch is handled rather than after it.
        produce(producer, &mut out, &mut pending)?;
        offsets.insert((msg.topic().to_string(), msg.partition()), msg.offset() + 1);
    }
    stage.end_of_batch(&mut out).map_err(BatchError::Fatal)?;
    produce(producer, &mut out, &mut pending)?;

    let t_handled = Instant::now();
    send_lingering(producer);
    let sent = pending.len();
    // Awaited here (`send_lingering` has waited for them) rather than left to
    // commit_transaction, which also flushes: its flush waits in steps of about 100 ms while
    // another thread serves the delivery reports. Sending the offsets and committing before
    // these had arrived took a commit from 7 to 105 ms (p50 per batch, herald bench on the
    // mock cluster). One by one, in the order sent, rather than through `join_all`: that
    // collected a batch's few thousand reports (each with room for a whole record) into a
    // vector grown afresh every batch, and the kernel zeroing its new pages was nearly half
    // of the wait's samples.
    let mut next_offsets: BTreeMap<(Arc<str>, i32), i64> = BTreeMap::new();
    rt.block_on(async {
        for (delivery, topic) in pending {
            match delivery.await {
                Ok(Ok(delivery)) => {
                    let next = next_offsets.entry((topic, delivery.partition)).or_insert(0);
                    *next = (*next).max(delivery.offset + 1);
                }
                Ok(Err((e, _))) => return Err(kafka_error(e, "delivery")),
                Err(_) => return Err(BatchError::Abortable(anyhow!("delivery report lost"))),
            }
        }
        Ok(())
    })?;
    let produced: Produced = next_offsets
        .into_iter()
        .map(|((topic, p), next)| ((topic.to_string(), p), next))
        .collect();

    let t_delivered = Instant::now();
    let mut tpl = TopicPartitionList::new();
    for ((topic, p), next) in &offsets {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*next))
            .map_err(|e| kafka_error(e, "offsets"))?;
    }
    if tpl.count() == 0 {
        // A tick's batch: output only, no input positions to move.
        if settings.exactly_once {
            producer
                .commit_transaction(Duration::from_secs(30))
                .map_err(|e| kafka_error(e, "commit_transaction"))?;
        }
    } else if settings.exactly_once {
        abort_here_if_asked(metrics)?;
        pause_here_if_asked(metrics);
        let meta = consumer
            .group_metadata()
            .ok_or_else(|| BatchError::Abortable(anyhow!("no consumer group metadata yet")))?;
        producer
            .send_offsets_to_transaction(&tpl, &meta, Duration::from_secs(30))
            .map_err(|e| kafka_error(e, "send_offsets_to_transaction"))?;
        crash_here_if_asked(metrics);
        producer
            .commit_transaction(Duration::from_secs(30))
            .map_err(|e| kafka_error(e, "commit_transaction"))?;
    } else {
        consumer
            .commit(&tpl, CommitMode::Sync)
            .map_err(|e| BatchError::Abortable(anyhow!("offset commit: {e}")))?;
    }
    let t_committed = Instant::now();
    metrics.transaction(stage.name(), true);
    metrics.batch_committed(stage.name(), t_committed - t_start);
    metrics.batch_phases(
        stage.name(),
        [
            t_prepared - t_start,
            t_handled - t_prepared,
            t_delivered - t_handled,
            t_committed - t_delivered,
        ],
    );
    count_committed(stage.name(), batch, metrics);
    stage.committed(&produced).map_err(BatchError::Fatal)?;
    tracing::debug!(
        stage = stage.name(),
        records = batch.len(),
        produced = sent,
        prepare_ms = (t_prepared - t_start).as_millis() as u64,
        handle_ms = (t_handled - t_prepared).as_millis() as u64,
        deliver_ms = (t_delivered - t_handled).as_millis() as u64,
        commit_ms = (t_committed - t_delivered).as_millis() as u64,
        store_ms = t_committed.elapsed().as_millis() as u64,
        "batch committed"
    );
    Ok(())
}

/// Sends the records still waiting out `linger.ms` at once, and returns when every record
/// produced so far has its delivery report. The batch's last records would otherwise wait the
/// whole linger before the transaction can commit: 5 of a batch's 7 ms of waiting on the mock
/// cluster (herald bench). librdkafka treats the linger as over only while a flush call waits,
/// and rdkafka's own `flush` asks with no wait and then polls for up to 100 ms between asks.
fn send_lingering(producer: &FutureProducer) {
    // SAFETY: the pointer is the live producer's handle, borrowed for this call; librdkafka's
    // flush may be called from any thread. In the event mode rdkafka uses, it only waits for
    // the producer's polling thread to serve the delivery reports.
    let outcome = unsafe {
        rdkafka::bindings::rd_kafka_flush(producer.client().native_ptr(), SEND_LINGERING_MS)
    };
    if outcome != rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        // Not an error of its own: the deliveries awaited next say what became of each record.
        tracing::debug!(?outcome, "deliveries still outstanding after the flush");
    }
}

/// How long [`send_lingering`] waits for delivery reports; those not in by then are awaited
/// one by one, as before.
const SEND_LINGERING_MS: i32 = 30_000;

/// Hands the records `out` holds to the producer, each with the topic its delivery is
/// counted under, and empties it.
fn produce(
    producer: &FutureProducer,
    out: &mut Outbox,
    pending: &mut Vec<(DeliveryFuture, Arc<str>)>,
) -> Result<(), BatchError> {
    for r in out.records.drain(..) {
        let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
        for (k, v) in &r.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let record = FutureRecord::to(&r.topic)
            .partition(r.partition)
            .key(&r.key)
            .headers(headers);
        let mut record = if r.value.is_empty() {
            record
        } else {
            record.payload(&r.value)
        };
        loop {
            match producer.send_result(record) {
                Ok(f) => {
                    pending.push((f, r.topic.clone()));
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(kafka_error(e, "produce")),
            }
        }
    }
    Ok(())
}

/// Counts a committed batch's records per topic-partition, and how long after their timestamps
/// what was decided on them became visible.
fn count_committed(stage: &str, batch: &[OwnedMessage], metrics: &Metrics) {
    let mut counts: BTreeMap<(&str, i32), u64> = BTreeMap::new();
    let mut stamps = Vec::with_capacity(batch.len());
    for msg in batch {
        *counts.entry((msg.topic(), msg.partition())).or_default() += 1;
        if let Some(ts) = msg.timestamp().to_millis() {
            stamps.push(ts);
        }
    }
    for ((topic, partition), n) in counts {
        metrics.records_in(stage, topic, partition, n);
    }
    metrics.decided(stage, &stamps, crate::clock::wall_clock_ms());
}

/// The transaction a fault-injection variable names, read once.
fn fault_at(cell: &'static std::sync::OnceLock<Option<u64>>, var: &str) -> Option<u64> {
    *cell.get_or_init(|| std::env::var(var).ok().and_then(|v| v.parse().ok()))
}

/// Fault injection for the crash tests: `HERALD_FAULT_CRASH_BEFORE_COMMIT=N` aborts the process
/// with everything of the N-th transaction produced and nothing committed.
pub(crate) fn crash_here_if_asked(metrics: &Metrics) {
    static AT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    if let Some(n) = fault_at(&AT, "HERALD_FAULT_CRASH_BEFORE_COMMIT") {
        if metrics.transactions_committed() + 1 >= n {
            eprintln!("herald: fault injection: aborting before commit of transaction {n}");
            std::process::abort();
        }
    }
}

/// Fault injection for the crash tests: `HERALD_FAULT_ABORT_TRANSACTION=N` fails the N-th
/// transaction once, as a lost delivery report would, so the loop aborts it and runs the
/// batch again with every partition restored on demand.
pub(crate) fn abort_here_if_asked(metrics: &Metrics) -> Result<(), BatchError> {
    static AT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    static DONE: AtomicBool = AtomicBool::new(false);
    if let Some(n) = fault_at(&AT, "HERALD_FAULT_ABORT_TRANSACTION") {
        if metrics.transactions_committed() + 1 >= n && !DONE.swap(true, Ordering::SeqCst) {
            eprintln!("herald: fault injection: failing transaction {n} once");
            return Err(BatchError::Abortable(anyhow!(
                "fault injection: transaction {n} failed"
            )));
        }
    }
    Ok(())
}

/// Fault injection for the fencing test: `HERALD_FAULT_PAUSE_BEFORE_OFFSETS=N` stops the
/// process (SIGSTOP, as a long GC pause or a frozen VM would) once, with the N-th transaction's
/// records produced and its input offsets not yet sent; SIGCONT resumes it there, a zombie.
pub(crate) fn pause_here_if_asked(metrics: &Metrics) {
    static AT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    static DONE: AtomicBool = AtomicBool::new(false);
    if let Some(n) = fault_at(&AT, "HERALD_FAULT_PAUSE_BEFORE_OFFSETS") {
        if metrics.transactions_committed() + 1 >= n && !DONE.swap(true, Ordering::SeqCst) {
            eprintln!("herald: fault injection: pausing inside transaction {n}");
            extern "C" {
                fn kill(pid: i32, sig: i32) -> i32;
            }
            const SIGSTOP: i32 = 19;
            // SAFETY: signals this process itself; SIGSTOP only suspends it.
            unsafe {
                kill(std::process::id() as i32, SIGSTOP);
            }
        }
    }
}

/// Headers that say where a record came from.
pub fn provenance(msg: &OwnedMessage) -> Vec<(&'static str, Vec<u8>)> {
    provenance_of(msg.topic(), msg.partition(), msg.offset())
}

/// The provenance headers of a record at `topic`/`partition`@`offset`.
pub fn provenance_of(topic: &str, partition: i32, offset: i64) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("herald.source.topic", topic.as_bytes().to_vec()),
        (
            "herald.source.partition",
            partition.to_string().into_bytes(),
        ),
        ("herald.source.offset", offset.to_string().into_bytes()),
    ]
}

/// A shared flag set on SIGTERM or Ctrl-C.
pub fn stop_on_signal(rt: &tokio::runtime::Handle) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    rt.spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            if let Ok(mut term) = signal(SignalKind::terminate()) {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            } else {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("stop requested; finishing the transaction in flight");
        flag.store(true, Ordering::SeqCst);
    });
    stop
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILL: Duration = Duration::from_millis(FILL_MS);

    #[test]
    fn a_batch_s_last_records_do_not_wait_out_the_linger() {
        use futures::FutureExt;
        let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
        mock.create_topic("decisions", 1, 1).unwrap();
        let mut settings = KafkaSettings::new(&mock.bootstrap_servers(), false, "test");
        // Longer than the flush waits: a record that lingered would still be undelivered.
        settings.extra.push(("linger.ms".into(), "50000".into()));
        let producer = settings.producer(None).unwrap();
        let record = FutureRecord::<(), _>::to("decisions").payload("last");
        let delivery = producer.send_result(record).map_err(|(e, _)| e).unwrap();
        send_lingering(&producer);
        let delivered = delivery.now_or_never().expect("the delivery report is in");
        assert!(matches!(delivered, Ok(Ok(_))), "{delivered:?}");
    }

    #[test]
    fn a_record_after_a_quiet_spell_is_taken_at_once() {
        let pace = TransactionPace::default();
        let now = Instant::now();
        assert_eq!(pace.fill_until(now), now);
        assert_eq!(pace.poll_wait(now, 1, 0, 1000, false), Duration::ZERO);
        assert_eq!(pace.poll_wait(now, 0, 0, 1000, false), IDLE_POLL);
    }

    #[test]
    fn records_that_arrived_during_a_long_transaction_do_not_wait_again() {
        let mut pace = TransactionPace::default();
        let t0 = Instant::now();
        pace.started(t0);
        // The transaction took longer to handle and commit than the fill window.
        let after = t0 + FILL + Duration::from_millis(15);
        assert!(pace.fill_until(after) <= after);
        assert_eq!(pace.poll_wait(after, 300, 0, 1000, false), Duration::ZERO);
    }

    #[test]
    fn transactions_start_at_most_once_per_fill_window() {
        let mut pace = TransactionPace::default();
        let t0 = Instant::now();
        pace.started(t0);
        let soon = t0 + Duration::from_millis(5);
        assert_eq!(pace.fill_until(soon), t0 + FILL);
        let wait = pace.poll_wait(soon, 3, 0, 1000, false);
        assert!(wait > Duration::ZERO && wait <= IDLE_POLL.min(FILL - Duration::from_millis(5)));
        // A full batch does not wait for the window.
        assert_eq!(pace.poll_wait(soon, 1000, 0, 1000, false), Duration::ZERO);
        assert_eq!(pace.poll_wait(soon, 3, 5000, 1000, false), Duration::ZERO);
    }

    #[test]
    fn an_intake_that_gives_nothing_out_is_not_polled_in_a_spin() {
        let pace = TransactionPace::default();
        let now = Instant::now();
        // More than a batch waits on lanes that hold their partitions back.
        assert_eq!(pace.poll_wait(now, 0, 5000, 1000, true), STALLED_POLL);
        // Once it gives records out again, they are taken at once.
        assert_eq!(pace.poll_wait(now, 0, 5000, 1000, false), Duration::ZERO);
        assert_eq!(pace.poll_wait(now, 1000, 5000, 1000, true), Duration::ZERO);
    }
}
