//! The stages the Kafka loop runs: the processors (dedupe, ordering guard, policy), dispatch, and
//! the passthrough used as the benchmark's ceiling. Each turns records into core calls and core
//! output into records; none holds a rule.

use crate::audit::ConsentProjection;
use crate::dispatch::SendOutcome;
use crate::dispatch::{self, DispatchState, Plan};
use crate::events::*;
use crate::identity::{self, pseudonymise, ContactDirectory, IdentifierKey};
use crate::kafka::{
    provenance, provenance_of, LogReader, OutRecord, Outbox, Produced, SharedStore, Stage,
};
use crate::pacing::{self, Lane, Limits, Pacer};
use crate::provider::{Outgoing, Providers};
use crate::registry::{Codec, DecodeError};
use crate::state::CustomerState;
use crate::store::{self, SnapshotWrite, PROCESSORS};
use crate::tables::Tables;
use crate::task::Task;
use crate::telemetry::Metrics;
use crate::topology::TemplateCatalog;
use crate::topology::Topology;
use anyhow::{anyhow, bail, Context, Result};
use rdkafka::message::{Message, OwnedMessage};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Wall-clock milliseconds, for shell-side timestamps only (never for decisions).
pub fn wall_clock_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The encoded states of the customers a batch touched, for the store; clears `touched`.
fn encode_touched<S: serde::Serialize>(
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

/// Decodes with retries for registry outages; poison is returned for the dead-letter topic.
fn decode_with_retry<T>(
    rt: &tokio::runtime::Handle,
    f: impl FnMut() -> Result<T, DecodeError>,
) -> Result<Result<T, String>> {
    decode_with_retry_for(rt, crate::registry::OUTAGE_BUDGET, f)
}

/// As `decode_with_retry`, waiting out an outage for at most `budget`: a registry refusing
/// connections fails each try at once, so a count of tries would give up within seconds.
fn decode_with_retry_for<T>(
    rt: &tokio::runtime::Handle,
    budget: Duration,
    mut f: impl FnMut() -> Result<T, DecodeError>,
) -> Result<Result<T, String>> {
    let started = std::time::Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        match f() {
            Ok(v) => return Ok(Ok(v)),
            Err(DecodeError::Poison(why)) => return Ok(Err(why)),
            Err(DecodeError::Retryable(why)) => {
                let waited = started.elapsed();
                if waited >= budget {
                    bail!(
                        "schema registry unavailable for {} s, stopping so the process is restarted: {why}",
                        waited.as_secs()
                    );
                }
                tracing::warn!(error = %why, "registry unavailable; retrying");
                let pause = delay.min(budget - waited);
                // The timer is made inside the runtime: this thread is not one of its workers.
                rt.block_on(async { tokio::time::sleep(pause).await });
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Decodes a record, retrying registry outages; poison goes to the dead-letter topic in the
/// current transaction and yields `None`.
fn decode_or_dead_letter<'a, T, F>(
    codec: &'a Codec,
    rt: &tokio::runtime::Handle,
    metrics: &Metrics,
    msg: &OwnedMessage,
    out: &mut Outbox,
    decode: impl Fn(&'a Codec) -> F,
) -> Result<Option<T>>
where
    F: std::future::Future<Output = Result<T, DecodeError>>,
{
    match decode_with_retry(rt, || rt.block_on(decode(codec)))? {
        Ok(v) => Ok(Some(v)),
        Err(why) => {
            out.records
                .push(dead_letter(codec, rt, msg, "decode", why, metrics)?);
            Ok(None)
        }
    }
}

fn dead_letter(
    codec: &Codec,
    rt: &tokio::runtime::Handle,
    msg: &OwnedMessage,
    stage: &str,
    error: String,
    metrics: &Metrics,
) -> Result<OutRecord> {
    let letter = DeadLetter {
        source_topic: msg.topic().to_string(),
        source_partition: msg.partition(),
        source_offset: msg.offset(),
        key: msg.key().map(|k| k.to_vec()),
        value: msg.payload().map(|v| v.to_vec()),
        stage: stage.to_string(),
        error,
        failed_at: wall_clock_ms(),
    };
    dead_letter_record(codec, rt, letter, metrics)
}

/// The dead-letter topic's record of a dead letter, on its source's partition and key, with the
/// provenance and the error as headers; logged and counted.
fn dead_letter_record(
    codec: &Codec,
    rt: &tokio::runtime::Handle,
    letter: DeadLetter,
    metrics: &Metrics,
) -> Result<OutRecord> {
    tracing::warn!(topic = %letter.source_topic, partition = letter.source_partition, offset = letter.source_offset, error = %letter.error, "record dead-lettered");
    Metrics::inc(&metrics.dead_letters, 1);
    let mut headers = provenance_of(
        &letter.source_topic,
        letter.source_partition,
        letter.source_offset,
    );
    headers.push(("herald.error", letter.error.clone().into_bytes()));
    Ok(OutRecord {
        topic: codec.topics().dlq().clone(),
        partition: letter.source_partition,
        key: letter.key.clone().unwrap_or_default(),
        value: rt.block_on(codec.encode_dead_letter(&letter))?,
        headers,
    })
}

#[derive(Default)]
struct ProcessorPartition {
    /// The partition's customers, stream time and timers.
    task: Task,
    /// Next unprocessed offset per input topic: records below it were already decided.
    inputs: std::collections::BTreeMap<String, i64>,
    /// Input positions advanced since the last save.
    inputs_moved: bool,
    next_decision_offset: i64,
    touched: BTreeSet<String>,
    /// Consent-history changes decided since the last save.
    consent: ConsentProjection,
    /// Each customer's card in the contact changelog, as last written.
    contacts: HashMap<String, ContactCard>,
    /// A template status change arrived since the last save: the next one saves the table.
    templates_moved: bool,
}

impl ProcessorPartition {
    /// Keeps the decisions' customers and consent changes for the next save.
    fn note(&mut self, decisions: &[Decision]) {
        for d in decisions {
            self.touched.insert(d.customer_id.clone());
            self.consent.apply(d);
        }
    }
}

/// Dedupe, ordering guard and policy over the four input topics.
pub struct ProcessorStage {
    pub topology: Arc<Topology>,
    pub codec: Arc<Codec>,
    pub store: SharedStore,
    pub rt: tokio::runtime::Handle,
    pub metrics: Arc<Metrics>,
    identifiers: IdentifierKey,
    partitions: HashMap<i32, ProcessorPartition>,
    /// Stock and template status, read whole; shared by every partition of this stage.
    tables: Tables,
    /// Next offset to read per inventory partition, and when the table was last refreshed.
    inventory_next: HashMap<i32, i64>,
    inventory_refreshed: Option<std::time::Instant>,
    /// How often idle partitions are advanced to the wall clock so their timers fire; `None`
    /// leaves timers to event time alone (a replay of the past, the demo).
    wall_clock_tick: Option<Duration>,
    last_tick: Option<std::time::Instant>,
}

/// What an input changes in the contact changelog once decided: a customer's new card when an
/// accepted profile brought addresses the card lacks, a tombstone (`None`) when an erasure was
/// accepted, nothing otherwise. Keeps `cards` as written.
fn contact_change(
    cards: &mut HashMap<String, ContactCard>,
    input: &InputEvent,
    learnt: std::collections::BTreeMap<String, String>,
    decisions: &[Decision],
) -> Option<(String, Option<ContactCard>)> {
    let customer = &input.envelope.customer_id;
    let accepted = decisions.iter().any(|d| {
        matches!(&d.outcome, Outcome::EventAccepted(a) if a.envelope.event_id == input.envelope.event_id)
    });
    if !accepted {
        return None;
    }
    match &input.fact {
        Fact::ErasureRequested(_) => {
            cards.remove(customer);
            Some((customer.clone(), None))
        }
        Fact::ProfileChanged(_) => {
            let card = cards
                .entry(customer.clone())
                .or_insert_with(|| ContactCard {
                    customer_id: customer.clone(),
                    ..ContactCard::default()
                });
            let before = card.addresses.len();
            card.addresses.extend(learnt);
            if card.addresses.len() == before {
                return None;
            }
            card.updated_at = card.updated_at.max(input.envelope.occurred_at);
            Some((customer.clone(), Some(card.clone())))
        }
        _ => None,
    }
}

impl ProcessorStage {
    /// A processor stage with no partitions yet; identifiers are hashed under `identifiers`.
    pub fn new(
        topology: Arc<Topology>,
        codec: Arc<Codec>,
        store: SharedStore,
        rt: tokio::runtime::Handle,
        metrics: Arc<Metrics>,
        identifiers: IdentifierKey,
    ) -> Self {
        ProcessorStage {
            topology,
            codec,
            store,
            rt,
            metrics,
            identifiers,
            partitions: HashMap::new(),
            tables: Tables::default(),
            inventory_next: HashMap::new(),
            inventory_refreshed: None,
            wall_clock_tick: None,
            last_tick: None,
        }
    }

    /// Whether the wall-clock tick is on and its interval has passed since the last one.
    fn tick_interval_passed(&self) -> bool {
        self.wall_clock_tick
            .is_some_and(|every| self.last_tick.is_none_or(|t| t.elapsed() >= every))
    }

    /// Advances every partition's stream time to the wall clock this often, so a deferral or
    /// journey step on a partition with no new input still fires.
    pub fn with_wall_clock_tick(mut self, every: Option<Duration>) -> Self {
        self.wall_clock_tick = every;
        self
    }

    fn emit(
        &self,
        p: i32,
        decisions: Vec<Decision>,
        headers: Vec<(&'static str, Vec<u8>)>,
        out: &mut Outbox,
    ) -> Result<()> {
        for d in decisions {
            let value = self.rt.block_on(self.codec.encode_decision(&d))?;
            Metrics::inc(&self.metrics.decisions_out, 1);
            self.metrics.count_kind(d.outcome.kind());
            match &d.outcome {
                Outcome::MessageSuppressed(m) => {
                    self.metrics.count_reason(&format!("{:?}", m.reason));
                }
                Outcome::DuplicateIgnored(dup) if dup.repeats_event_id.is_some() => {
                    Metrics::inc(&self.metrics.repeats_recognised, 1);
                }
                _ => {}
            }
            out.records.push(OutRecord {
                topic: self.codec.topics().decisions().clone(),
                partition: p,
                key: d.customer_id.into_bytes(),
                value,
                headers: headers.clone(),
            });
        }
        Ok(())
    }
}

impl Stage for ProcessorStage {
    fn name(&self) -> &'static str {
        "processors"
    }

    fn input_topics(&self) -> Vec<String> {
        self.codec.topics().inputs()
    }

    fn restore(&mut self, partition: i32, reader: &LogReader) -> Result<()> {
        let snap = self.store.load(PROCESSORS, partition)?;
        let mut part = ProcessorPartition::default();
        let mut customers = HashMap::new();
        for (customer, stored) in &snap.customers {
            let state: CustomerState = serde_json::from_slice(&stored.bytes)
                .with_context(|| format!("stored state of {customer} is unreadable"))?;
            customers.insert(customer.clone(), state);
        }
        let codec = self.codec.clone();
        let rt = self.rt.clone();
        let stream_time = snap.inputs.get(STREAM_TIME_KEY).copied().unwrap_or(0);
        part.task = Task::restored(customers, stream_time);
        for (k, v) in &snap.inputs {
            if k != STREAM_TIME_KEY && !self.tables.restore_saved(k, *v) {
                part.inputs.insert(k.clone(), *v);
            }
        }
        let tables = &mut self.tables;
        let decisions = codec.topics().decisions().clone();
        let next = reader.read(&decisions, partition, snap.next_offset, |m| {
            if let Some((topic, offset)) = source_position(m) {
                let e = part.inputs.entry(topic).or_insert(0);
                *e = (*e).max(offset + 1);
            }
            let d = rt
                .block_on(codec.decode_decision(m.payload()))
                .map_err(|e| anyhow!("decision log {decisions}/{partition}@{}: {e}", m.offset()))?;
            if let Outcome::EventAccepted(a) = &d.outcome {
                part.templates_moved |= tables.observe(&a.fact, a.envelope.occurred_at);
            }
            if snap.holds(&d.customer_id, m.offset()) {
                return Ok(());
            }
            part.task.fold(&d);
            part.consent.apply(&d);
            part.touched.insert(d.customer_id.clone());
            Ok(())
        })?;
        part.next_decision_offset = next;
        // The contact changelog is compacted: one card (or tombstone) per customer.
        let contacts = codec.topics().contacts().clone();
        reader.read(&contacts, partition, 0, |m| {
            let customer = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            match rt.block_on(codec.decode_contact_card(m.payload())) {
                Ok(Some(card)) => {
                    part.contacts.insert(customer, card);
                }
                Ok(None) => {
                    part.contacts.remove(&customer);
                }
                Err(e) => bail!(
                    "contact changelog {contacts}/{partition}@{}: {e}",
                    m.offset()
                ),
            }
            Ok(())
        })?;
        self.partitions.insert(partition, part);
        // Persist what the replay folded so the next restore starts further on.
        self.committed(&Produced::new())?;
        Ok(())
    }

    fn revoke(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    fn reset(&mut self) {
        self.partitions.clear();
    }

    fn owns(&self, partition: i32) -> bool {
        self.partitions.contains_key(&partition)
    }

    fn resume_positions(&self, partition: i32) -> Vec<(String, i64)> {
        self.partitions
            .get(&partition)
            .map(|p| p.inputs.iter().map(|(t, o)| (t.clone(), *o)).collect())
            .unwrap_or_default()
    }

    fn handle(&mut self, msg: &OwnedMessage, out: &mut Outbox) -> Result<()> {
        let p = msg.partition();
        let part = self
            .partitions
            .get_mut(&p)
            .ok_or_else(|| anyhow!("partition {p} not restored"))?;
        // Already decided (its decisions are in the log): the broker's committed offset was
        // behind what the decision log shows, e.g. a broker that drops transactional commits.
        if part
            .inputs
            .get(msg.topic())
            .is_some_and(|next| msg.offset() < *next)
        {
            return Ok(());
        }
        let e = part.inputs.entry(msg.topic().to_string()).or_insert(0);
        *e = (*e).max(msg.offset() + 1);
        part.inputs_moved = true;
        let Some(input) =
            decode_or_dead_letter(&self.codec, &self.rt, &self.metrics, msg, out, |c| {
                c.decode_input(msg.topic(), msg.payload())
            })?
        else {
            return Ok(());
        };
        if msg.key() != Some(input.envelope.customer_id.as_bytes()) {
            let why = format!("record key does not match envelope.customer_id '{}'; records must be keyed by customer", input.envelope.customer_id);
            out.records.push(dead_letter(
                &self.codec,
                &self.rt,
                msg,
                "validate",
                why,
                &self.metrics,
            )?);
            return Ok(());
        }
        // The addresses in clear go only to the contact changelog, once the fact is accepted.
        let learnt = identity::identifiers(&self.identifiers, &input);
        // From here on no phone number or e-mail address is in clear: not in state, not in
        // the decision log.
        let input = pseudonymise(&self.identifiers, input);
        let part = self
            .partitions
            .get_mut(&p)
            .ok_or_else(|| anyhow!("partition {p} not restored"))?;
        self.tables.observe(&input.fact, input.envelope.occurred_at);
        part.templates_moved |= matches!(input.fact, Fact::TemplateStatusChanged(_));
        let input_ref = format!("{}/{}/{}", msg.topic(), p, msg.offset());
        let decisions = part
            .task
            .decide(&input, &input_ref, &self.topology, &self.tables);
        part.note(&decisions);
        let card = contact_change(&mut part.contacts, &input, learnt, &decisions);
        self.emit(p, decisions, provenance(msg), out)?;
        if let Some((customer, card)) = card {
            let value = match card {
                Some(card) => self.rt.block_on(self.codec.encode_contact_card(&card))?,
                None => Vec::new(),
            };
            out.records.push(OutRecord {
                topic: self.codec.topics().contacts().clone(),
                partition: p,
                key: customer.into_bytes(),
                value,
                headers: Vec::new(),
            });
        }
        Ok(())
    }

    fn tick_due(&self) -> bool {
        let now = wall_clock_ms();
        self.tick_interval_passed()
            && self
                .partitions
                .values()
                .any(|p| p.task.next_timer().is_some_and(|t| t <= now))
    }

    fn end_of_batch(&mut self, out: &mut Outbox) -> Result<()> {
        if !self.tick_interval_passed() {
            return Ok(());
        }
        self.last_tick = Some(std::time::Instant::now());
        let now = wall_clock_ms();
        let mut fired = Vec::new();
        for (p, part) in self.partitions.iter_mut() {
            if part.task.next_timer().is_none_or(|t| t > now) {
                continue;
            }
            let ds = part.task.advance_to(now, &self.topology, &self.tables);
            part.note(&ds);
            // Stream time moved: it must be saved even if no customer changed.
            part.inputs_moved = true;
            fired.push((*p, ds));
        }
        for (p, ds) in fired {
            self.emit(p, ds, vec![("herald.timer", b"wall-clock".to_vec())], out)?;
        }
        Ok(())
    }

    fn refresh_tables(&mut self, reader: &LogReader) -> Result<()> {
        // Once a second is fresh enough for stock levels, and keeps watermark round trips rare.
        if self
            .inventory_refreshed
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return Ok(());
        }
        self.inventory_refreshed = Some(std::time::Instant::now());
        for p in 0..self.topology.partitions() {
            let from = self.inventory_next.get(&p).copied().unwrap_or(0);
            let (codec, rt, tables) = (&self.codec, &self.rt, &mut self.tables);
            let next = reader.read(codec.topics().inventory(), p, from, |m| {
                // A stock level that cannot be read is skipped, not fatal: the guard then
                // sees no level for that SKU and holds rather than sends.
                match rt.block_on(codec.decode_stock(m.payload())) {
                    Ok(level) => tables.observe_stock(level),
                    Err(e) => {
                        tracing::warn!(offset = m.offset(), error = %e, "unreadable stock level")
                    }
                }
                Ok(())
            })?;
            self.inventory_next.insert(p, next);
        }
        Ok(())
    }

    fn committed(&mut self, produced: &Produced) -> Result<()> {
        for (p, part) in self.partitions.iter_mut() {
            if let Some(next) = produced.get(&(self.codec.topics().decisions().to_string(), *p)) {
                part.next_decision_offset = part.next_decision_offset.max(*next);
            }
            // A batch of nothing but dead letters touches no customer, yet its input positions
            // must be kept, or a broker that lost the group offsets would dead-letter it again.
            if part.touched.is_empty() && !part.inputs_moved && !part.templates_moved {
                continue;
            }
            let mut inputs = part.inputs.clone();
            inputs.insert(STREAM_TIME_KEY.to_string(), part.task.stream_time());
            if std::mem::take(&mut part.templates_moved) {
                inputs.extend(self.tables.saved_positions());
            }
            let write = SnapshotWrite {
                changed: encode_touched(&mut part.touched, part.task.customers())?,
                next_offset: part.next_decision_offset,
                inputs,
                consent: std::mem::take(&mut part.consent.records),
                erased: std::mem::take(&mut part.consent.erased),
            };
            self.store.save(PROCESSORS, *p, &write)?;
            part.inputs_moved = false;
        }
        Ok(())
    }
}

#[derive(Default)]
struct DispatchPartition {
    customers: HashMap<String, DispatchState>,
    /// Addresses by keyed hash, from this partition of the CRM topic and of the contact
    /// changelog (which outlives the CRM topic's retention), and where to read each on.
    contacts: ContactDirectory,
    crm_next: i64,
    contacts_next: i64,
    /// Statuses the provider reported for messages with an open intent, by message id.
    statuses: HashMap<String, dispatch::ObservedStatus>,
    /// Where to read this partition of the provider topic on.
    provider_next: i64,
    next_offset: i64,
    touched: BTreeSet<String>,
    /// Next decision-log offset to handle: everything below was handled in a committed
    /// transaction. Kept in the snapshot, so a restart does not depend on the broker's
    /// committed offset alone (which may lag) and re-read the whole log.
    decisions_next: i64,
    decisions_moved: bool,
}

impl DispatchPartition {
    /// Whether the customer has an open intent for the message.
    fn is_open(&self, customer_id: &str, message_id: &str) -> bool {
        self.customers
            .get(customer_id)
            .is_some_and(|c| c.open.contains_key(message_id))
    }
}

/// An approval on its way to the provider.
struct PendingSend {
    partition: i32,
    decision: Decision,
    approved: MessageApproved,
    attempt: i32,
    /// Calls made for this attempt so far (retryable refusals and failed connections).
    tries: u32,
    /// When it first joined its lane, for the lane's longest-wait figure.
    queued_at: Millis,
}

/// A finished provider call, as its task left it.
struct Answer {
    epoch: u64,
    send: PendingSend,
    outcome: SendOutcome,
}

/// An open intent settled from the provider topic, to be recorded with the next batch; a
/// not-sent one carries its approval, read again from the decision log, for a new intent.
struct Settled {
    partition: i32,
    customer_id: String,
    message_id: String,
    intent: dispatch::OpenIntent,
    settlement: dispatch::Settlement,
    approval: Option<(Decision, MessageApproved)>,
}

/// Carries approved messages to the provider and records each step on `herald.dispatch.v1`.
///
/// A send is recorded as intended, and that record committed, before the provider is called;
/// the call happens in the next transaction. An intent whose call did not finish (the process
/// died, the answer was lost) is settled from the provider's status webhooks, which carry the
/// message id back, and only a wait with no status at all leads to a new attempt.
pub struct DispatchStage {
    pub codec: Arc<Codec>,
    pub store: SharedStore,
    pub providers: Providers,
    /// Where the text of SMS, e-mail and session messages comes from.
    catalog: Arc<TemplateCatalog>,
    pub rt: tokio::runtime::Handle,
    pub metrics: Arc<Metrics>,
    identifiers: IdentifierKey,
    partitions: HashMap<i32, DispatchPartition>,
    /// Intents recorded in the batch in flight: queued for their call once it commits.
    intending: Vec<PendingSend>,
    /// Committed intents waiting in their lane for the pacer to let their call go.
    pacer: Pacer<PendingSend>,
    /// Calls under way, by message id: their partition and customer.
    calls: HashMap<String, (i32, String)>,
    /// Answers of finished calls, left by the tasks that made them; recorded with the next
    /// batch, so one slow call never holds up the others.
    answers: Arc<Mutex<Vec<Answer>>>,
    /// Bumped when the stage is reset: answers to calls made before are not recorded here.
    epoch: u64,
    /// The message ids whose call this process holds (intending, queued or under way), with
    /// their partition.
    held: HashMap<String, i32>,
    /// Open intents settled since the last batch, to be recorded.
    settled: Vec<Settled>,
    /// How long an open intent waits for a status before it counts as not sent.
    settle_wait: Duration,
    last_settle: Option<std::time::Instant>,
    /// Why the CRM topic could not be read before this batch, if it could not: an unknown
    /// recipient then stops the batch instead of failing the send.
    contacts_unread: Option<String>,
}

impl DispatchStage {
    /// A dispatch stage sending through `providers`, composing text from `catalog`;
    /// recipients are keyed hashes under `identifiers`, resolved through the CRM topic.
    pub fn new(
        codec: Arc<Codec>,
        store: SharedStore,
        providers: Providers,
        catalog: TemplateCatalog,
        rt: tokio::runtime::Handle,
        metrics: Arc<Metrics>,
        identifiers: IdentifierKey,
    ) -> Self {
        DispatchStage {
            codec,
            store,
            providers,
            catalog: Arc::new(catalog),
            rt,
            metrics,
            identifiers,
            partitions: HashMap::new(),
            intending: Vec::new(),
            pacer: Pacer::new(Limits::default()),
            calls: HashMap::new(),
            answers: Arc::new(Mutex::new(Vec::new())),
            epoch: 0,
            held: HashMap::new(),
            settled: Vec::new(),
            settle_wait: Duration::from_millis(dispatch::SETTLE_WAIT_MS as u64),
            last_settle: None,
            contacts_unread: None,
        }
    }

    /// How long an intent whose outcome is unknown waits for a status webhook before it is
    /// taken as not sent and tried again. It must be longer than webhooks take to arrive.
    pub fn with_settle_wait(mut self, wait: Duration) -> Self {
        self.settle_wait = wait;
        self
    }

    /// Paces provider calls by these limits (sender and recipient rates, calls at once, the
    /// providers' circuit breakers).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.pacer = Pacer::new(limits);
        self
    }

    /// Reads this partition of the CRM topic on from where its directory stopped. Runs after
    /// a batch was fetched: every approval in it was decided after its profile fact was
    /// written, so the directory then knows every address the batch needs.
    fn learn_contacts(&mut self, partition: i32, reader: &LogReader) -> Result<()> {
        let (codec, rt, key) = (&self.codec, &self.rt, &self.identifiers);
        let Some(part) = self.partitions.get_mut(&partition) else {
            return Ok(());
        };
        let contacts = &mut part.contacts;
        let crm = codec.topics().crm();
        part.crm_next = reader.read(crm, partition, part.crm_next, |m| {
            // An unreadable CRM record is the processors' to dead-letter; it has no address.
            if let Ok(input) = rt.block_on(codec.decode_input(crm, m.payload())) {
                contacts.observe(key, &input);
            }
            Ok(())
        })?;
        let changelog = codec.topics().contacts();
        part.contacts_next = reader.read(changelog, partition, part.contacts_next, |m| {
            let customer = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            match rt.block_on(codec.decode_contact_card(m.payload())) {
                Ok(Some(card)) => contacts.learn(&customer, card.addresses),
                Ok(None) => contacts.forget(&customer),
                Err(e) => bail!(
                    "contact changelog {changelog}/{partition}@{}: {e}",
                    m.offset()
                ),
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Reads this partition of the provider topic on, keeping the statuses of messages with an
    /// open intent. A status is written only after its send, and every send after its intent,
    /// so reading on from the restore never misses one.
    fn learn_statuses(&mut self, partition: i32, reader: &LogReader) -> Result<()> {
        let (codec, rt) = (&self.codec, &self.rt);
        let Some(part) = self.partitions.get_mut(&partition) else {
            return Ok(());
        };
        let mut seen = Vec::new();
        let provider = codec.topics().provider();
        part.provider_next = reader.read(provider, partition, part.provider_next, |m| {
            // An unreadable provider record is the processors' to dead-letter.
            if let Ok(input) = rt.block_on(codec.decode_input(provider, m.payload())) {
                if let Fact::MessageStatusChanged(s) = input.fact {
                    if let Some(id) = s.message_id {
                        seen.push((
                            input.envelope.customer_id,
                            id,
                            s.provider_message_id,
                            s.status,
                        ));
                    }
                }
            }
            Ok(())
        })?;
        for (customer, id, provider_message_id, status) in seen {
            if part.is_open(&customer, &id) {
                part.statuses.entry(id).or_insert(dispatch::ObservedStatus {
                    provider_message_id,
                    status: wire_name(&status),
                });
            }
        }
        Ok(())
    }

    /// Settles the open intents whose call is not this process's to make or finish: by a
    /// status seen for them, or as not sent once the wait is over (reading the approval again).
    fn settle_open_intents(&mut self, reader: &LogReader) -> Result<()> {
        let now = wall_clock_ms();
        let wait = self.settle_wait.as_millis() as i64;
        let mut found = Vec::new();
        for (p, part) in &self.partitions {
            for (customer, state) in &part.customers {
                for (message, intent) in &state.open {
                    if self.is_mine(message) {
                        continue;
                    }
                    if let Some(settlement) =
                        dispatch::settle(intent, part.statuses.get(message), now, wait)
                    {
                        found.push((
                            *p,
                            customer.clone(),
                            message.clone(),
                            intent.clone(),
                            settlement,
                        ));
                    }
                }
            }
        }
        let decisions = self.codec.topics().decisions().clone();
        for (partition, customer_id, message_id, intent, settlement) in found {
            let approval = match settlement {
                dispatch::Settlement::Sent(_) => None,
                dispatch::Settlement::NotSent { .. } => {
                    let msg = reader
                        .read_at(&decisions, partition, intent.approval_offset)?
                        .ok_or_else(|| {
                            anyhow!(
                                "the approval of {message_id} at {decisions}/{partition}@{} is gone",
                                intent.approval_offset
                            )
                        })?;
                    let d = self
                        .rt
                        .block_on(self.codec.decode_decision(msg.payload()))
                        .map_err(|e| anyhow!("approval of {message_id}: {e}"))?;
                    match &d.outcome {
                        Outcome::MessageApproved(a) if a.message_id == message_id => {
                            let a = a.clone();
                            Some((d, a))
                        }
                        _ => bail!(
                            "{decisions}/{partition}@{} is not the approval of {message_id}",
                            intent.approval_offset
                        ),
                    }
                }
            };
            self.settled.push(Settled {
                partition,
                customer_id,
                message_id,
                intent,
                settlement,
                approval,
            });
        }
        Ok(())
    }

    fn record(&mut self, partition: i32, rec: DispatchRecord, out: &mut Outbox) -> Result<()> {
        if let Some(part) = self.partitions.get_mut(&partition) {
            dispatch::evolve(
                part.customers.entry(rec.customer_id.clone()).or_default(),
                &rec,
            );
            if !part.is_open(&rec.customer_id, &rec.message_id) {
                part.statuses.remove(&rec.message_id);
            }
            part.touched.insert(rec.customer_id.clone());
        }
        out.records.push(OutRecord {
            topic: self.codec.topics().dispatch().clone(),
            partition,
            key: rec.customer_id.clone().into_bytes(),
            value: self.rt.block_on(self.codec.encode_dispatch(&rec))?,
            headers: vec![],
        });
        Ok(())
    }

    /// Records the intent of a send; the call follows once the intent is committed.
    fn intend(
        &mut self,
        partition: i32,
        decision: Decision,
        approved: MessageApproved,
        attempt: i32,
        approval_offset: i64,
        out: &mut Outbox,
    ) -> Result<()> {
        // Any status of this send is written after it, so after what was read so far.
        let statuses_from = self
            .partitions
            .get(&partition)
            .map_or(0, |p| p.provider_next);
        let rec = dispatch::record(
            &decision,
            &approved,
            DispatchStep::Intended(DispatchIntended {
                attempt,
                approval_offset,
                statuses_from,
            }),
            wall_clock_ms(),
        );
        self.record(partition, rec, out)?;
        self.held.insert(approved.message_id.clone(), partition);
        self.intending.push(PendingSend {
            partition,
            decision,
            approved,
            attempt,
            tries: 0,
            queued_at: 0,
        });
        Ok(())
    }

    /// Records the settlements found since the last batch; a not-sent one gets a new intent.
    fn record_settlements(&mut self, out: &mut Outbox) -> Result<()> {
        for s in std::mem::take(&mut self.settled) {
            let now = wall_clock_ms();
            let step = dispatch::settlement_step(&s.intent, &s.settlement, now);
            let rec = dispatch::step_record(
                &s.customer_id,
                &s.message_id,
                &s.intent.decision_id,
                &s.intent.template_name,
                s.intent.channel,
                step,
                now,
            );
            self.record(s.partition, rec, out)?;
            tracing::info!(message = %s.message_id, attempt = s.intent.attempt, settlement = ?s.settlement, "open send settled");
            match (s.settlement, s.approval) {
                (dispatch::Settlement::Sent(_), _) => {
                    Metrics::inc(&self.metrics.sends_settled, 1);
                }
                (dispatch::Settlement::NotSent { next_attempt }, Some((decision, approved))) => {
                    Metrics::inc(&self.metrics.sends_settled, 1);
                    let offset = s.intent.approval_offset;
                    self.intend(s.partition, decision, approved, next_attempt, offset, out)?;
                }
                (dispatch::Settlement::NotSent { .. }, None) => {
                    bail!(
                        "a not-sent settlement of {} lacks its approval",
                        s.message_id
                    )
                }
            }
        }
        Ok(())
    }

    /// The approval of a send the provider refused with a code Herald does not know, for
    /// the dead-letter topic: `herald dlq replay` can send it again once someone knows what to do.
    fn dead_letter_approval(&self, s: &PendingSend, why: String) -> Result<OutRecord> {
        let offset = self
            .partitions
            .get(&s.partition)
            .and_then(|p| p.customers.get(&s.decision.customer_id))
            .and_then(|c| c.open.get(&s.approved.message_id))
            .map_or(-1, |i| i.approval_offset);
        let letter = DeadLetter {
            source_topic: self.codec.topics().decisions().to_string(),
            source_partition: s.partition,
            source_offset: offset,
            key: Some(s.decision.customer_id.clone().into_bytes()),
            value: Some(self.rt.block_on(self.codec.encode_decision(&s.decision))?),
            stage: "dispatch".into(),
            error: why,
            failed_at: wall_clock_ms(),
        };
        dead_letter_record(&self.codec, &self.rt, letter, &self.metrics)
    }

    /// The refusal policy must hear of, on `provider.events.v1` under the customer's key, in
    /// the transaction that records the failure.
    fn to_policy_record(&self, partition: i32, event: &InputEvent) -> Result<OutRecord> {
        Ok(OutRecord {
            topic: self.codec.topics().provider().clone(),
            partition,
            key: event.envelope.customer_id.clone().into_bytes(),
            value: self.rt.block_on(self.codec.encode_input(event))?,
            headers: vec![],
        })
    }

    /// Whether this process holds the call of an open intent (about to make it, or recording
    /// its settlement), so the settling must leave it alone.
    fn is_mine(&self, message_id: &str) -> bool {
        self.held.contains_key(message_id)
            || self.settled.iter().any(|s| s.message_id == message_id)
    }

    /// Starts the calls the pacer lets go now. Each runs as its own task and leaves its
    /// answer for a later batch to record.
    fn call_released(&mut self, out: &mut Outbox) -> Result<()> {
        let now = wall_clock_ms();
        for released in self.pacer.release(now) {
            let longest = match released.lane {
                Lane::Transactional => &self.metrics.longest_wait_transactional_ms,
                Lane::Marketing => &self.metrics.longest_wait_marketing_ms,
            };
            longest.fetch_max(released.waited_ms.max(0) as u64, AtomicOrdering::Relaxed);
            let s = released.send;
            let address = self.partitions.get(&s.partition).map(|part| {
                part.contacts
                    .address(&s.decision.customer_id, &s.approved.recipient)
            });
            match address {
                Some(identity::Address::Known(to)) => {
                    let to = to.to_string();
                    let channel = s.approved.channel;
                    let Some(provider) = self.providers.of(channel).cloned() else {
                        let why = dispatch::Uncallable::NoProvider(self.providers.missing(channel));
                        self.fail_uncalled(s, why, out)?;
                        continue;
                    };
                    let text = if dispatch::carries_text(&s.approved) {
                        match dispatch::compose(&self.catalog, &s.approved) {
                            Ok(t) => Some(t),
                            Err(e) => {
                                let why = dispatch::Uncallable::CannotCompose(e.to_string());
                                self.fail_uncalled(s, why, out)?;
                                continue;
                            }
                        }
                    } else {
                        None
                    };
                    let mut approved = s.approved.clone();
                    approved.recipient = to;
                    let outgoing = Outgoing {
                        customer_id: s.decision.customer_id.clone(),
                        approved,
                        text,
                    };
                    self.calls.insert(
                        s.approved.message_id.clone(),
                        (s.partition, s.decision.customer_id.clone()),
                    );
                    let (answers, epoch) = (self.answers.clone(), self.epoch);
                    self.rt.spawn(async move {
                        let outcome = provider.send(&outgoing).await;
                        answers
                            .lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner())
                            .push(Answer {
                                epoch,
                                send: s,
                                outcome,
                            });
                    });
                }
                _ if self.contacts_unread.is_some() => bail!(
                    "dispatch cannot resolve recipients: the CRM topic could not be read ({})",
                    self.contacts_unread.as_deref().unwrap_or_default()
                ),
                _ => {
                    // Erased before it went out, or an address the CRM topic never held:
                    // nobody to send to, and trying again cannot change that.
                    tracing::info!(customer = %s.decision.customer_id, message = %s.approved.message_id, "no address for the recipient; not sent");
                    self.fail_uncalled(s, dispatch::Uncallable::NoAddress, out)?;
                }
            }
        }
        self.metrics.waiting_transactional.store(
            self.pacer.waiting(Lane::Transactional) as u64,
            AtomicOrdering::Relaxed,
        );
        self.metrics.waiting_marketing.store(
            self.pacer.waiting(Lane::Marketing) as u64,
            AtomicOrdering::Relaxed,
        );
        Ok(())
    }

    /// Records a send that cannot be called, as `dispatch::uncalled` says: failed, and
    /// dead-lettered when someone can fix what stopped it.
    fn fail_uncalled(
        &mut self,
        s: PendingSend,
        why: dispatch::Uncallable,
        out: &mut Outbox,
    ) -> Result<()> {
        Metrics::inc(&self.metrics.send_failures, 1);
        let uncalled = dispatch::uncalled(&s.decision, &s.approved, why, wall_clock_ms());
        if let Some(why) = uncalled.dead_letter {
            tracing::error!(customer = %s.decision.customer_id, message = %s.approved.message_id, reason = %why, "send dead-lettered");
            out.records.push(self.dead_letter_approval(&s, why)?);
        }
        self.pacer.forget_call(&s.decision.customer_id);
        self.held.remove(&s.approved.message_id);
        self.record(s.partition, uncalled.record, out)
    }

    /// Records the answers of the calls that finished since the last batch.
    fn record_answers(&mut self, out: &mut Outbox) -> Result<()> {
        let answers = std::mem::take(
            &mut *self
                .answers
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        for a in answers {
            let message_id = a.send.approved.message_id.clone();
            // A call from before a reset, or of a partition that moved away: its intent is
            // settled by whoever holds the partition now.
            if a.epoch != self.epoch || self.calls.remove(&message_id).is_none() {
                continue;
            }
            let now = wall_clock_ms();
            let channel = a.send.approved.channel;
            let before = self.pacer.breaker(channel);
            self.pacer.ended(
                &a.send.decision.customer_id,
                channel,
                a.outcome.call_end(),
                now,
            );
            if let (false, pacing::Breaker::Open { until }) = (
                matches!(before, pacing::Breaker::Open { .. }),
                self.pacer.breaker(channel),
            ) {
                Metrics::inc(&self.metrics.breaker_opens, 1);
                tracing::error!(
                    ?channel,
                    reopen_at_ms = until,
                    "the provider keeps failing: its circuit breaker is open, sends wait"
                );
            }
            let mut send = a.send;
            send.tries += 1;
            if let dispatch::AfterCall::Retry { not_before } =
                dispatch::after_call(&a.outcome, send.tries, now, jitter())
            {
                // Back through the buckets and the breaker, after its backoff: a retry is a
                // call like any other, and a throttled provider gets its pause.
                let lane = Lane::of(&send.approved.purpose, &send.approved.category);
                let (customer, queued_at) = (send.decision.customer_id.clone(), send.queued_at);
                // Still held here: its call is not over.
                self.pacer
                    .retry(lane, &customer, channel, send, queued_at, not_before);
                continue;
            }
            self.held.remove(&message_id);
            let tries = send.tries;
            self.record_answer(send, tries, a.outcome, now, out)?;
        }
        Ok(())
    }

    /// Records what one attempt came to and carries out what `dispatch::answer` says.
    fn record_answer(
        &mut self,
        s: PendingSend,
        tries: u32,
        outcome: SendOutcome,
        now: Millis,
        out: &mut Outbox,
    ) -> Result<()> {
        match &outcome {
            SendOutcome::Accepted(_) => Metrics::inc(&self.metrics.sends, 1),
            SendOutcome::Unanswered(e) => {
                tracing::info!(message = %s.approved.message_id, error = %e, "send unanswered; its status webhook will settle it");
                Metrics::inc(&self.metrics.sends_unanswered, 1);
            }
            SendOutcome::Rejected { .. } | SendOutcome::NotDelivered(_) => {
                Metrics::inc(&self.metrics.send_failures, 1)
            }
        }
        let answered = dispatch::answer(&s.decision, &s.approved, s.attempt, tries, outcome, now);
        if let Some(event) = &answered.to_policy {
            Metrics::inc(&self.metrics.refusals_to_policy, 1);
            out.records.push(self.to_policy_record(s.partition, event)?);
        }
        if let Some(why) = answered.dead_letter {
            out.records.push(self.dead_letter_approval(&s, why)?);
        }
        if let Some((channel, code)) = answered.halt {
            Metrics::inc(&self.metrics.account_blocks, 1);
            self.pacer.halt(channel, code);
            self.metrics.lanes_halted.store(1, AtomicOrdering::Relaxed);
            tracing::error!(code, ?channel, "the provider blocked the account or number: every send on this channel waits until someone acts and restarts dispatch");
        }
        for rec in answered.records {
            self.record(s.partition, rec, out)?;
        }
        Ok(())
    }
}

/// A fraction from 0 to 1 that differs from call to call, to spread retries out.
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos % 1_000) / 1_000.0
}

impl Stage for DispatchStage {
    fn name(&self) -> &'static str {
        "dispatch"
    }

    fn input_topics(&self) -> Vec<String> {
        vec![self.codec.topics().decisions().to_string()]
    }

    fn restore(&mut self, partition: i32, reader: &LogReader) -> Result<()> {
        let snap = self.store.load(store::DISPATCH, partition)?;
        let mut part = DispatchPartition::default();
        for (customer, stored) in &snap.customers {
            part.customers.insert(
                customer.clone(),
                serde_json::from_slice(&stored.bytes).with_context(|| {
                    format!("stored dispatch state of {customer} is unreadable")
                })?,
            );
        }
        let codec = self.codec.clone();
        let rt = self.rt.clone();
        let (decisions, dispatch_log) = (
            codec.topics().decisions().clone(),
            codec.topics().dispatch().clone(),
        );
        part.decisions_next = snap.inputs.get(&*decisions).copied().unwrap_or(0);
        part.next_offset = reader.read(&dispatch_log, partition, snap.next_offset, |m| {
            let r = rt
                .block_on(codec.decode_dispatch(m.payload()))
                .map_err(|e| {
                    anyhow!(
                        "dispatch log {dispatch_log}/{partition}@{}: {e}",
                        m.offset()
                    )
                })?;
            // An intent is committed with the offset of the decision read before it.
            if let DispatchStep::Intended(i) = &r.step {
                part.decisions_next = part.decisions_next.max(i.approval_offset + 1);
            }
            if snap.holds(&r.customer_id, m.offset()) {
                return Ok(());
            }
            dispatch::evolve(part.customers.entry(r.customer_id.clone()).or_default(), &r);
            part.touched.insert(r.customer_id.clone());
            Ok(())
        })?;
        tracing::info!(
            partition,
            open = part.customers.values().map(|c| c.open.len()).sum::<usize>(),
            "dispatch restored"
        );
        // The open intents' statuses can only be at or after where each intent says.
        part.provider_next = match part
            .customers
            .values()
            .flat_map(|c| c.open.values().map(|i| i.statuses_from))
            .min()
        {
            Some(from) => from,
            None => reader.end(codec.topics().provider(), partition)?,
        };
        self.partitions.insert(partition, part);
        self.learn_contacts(partition, reader)?;
        self.learn_statuses(partition, reader)?;
        self.committed(&Produced::new())?;
        Ok(())
    }

    fn refresh_tables(&mut self, reader: &LogReader) -> Result<()> {
        let owned: Vec<i32> = self.partitions.keys().copied().collect();
        let mut unread = None;
        for p in &owned {
            if let Err(e) = self.learn_contacts(*p, reader) {
                unread = Some(format!("{}/{p}: {e}", self.codec.topics().crm()));
            }
        }
        self.contacts_unread = unread.clone();
        // Statuses are read on twice a second at most (a status takes longer than that to
        // come back), also with no intent open, so that a new intent's position is recent.
        if self
            .last_settle
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(500))
        {
            self.last_settle = Some(std::time::Instant::now());
            for p in &owned {
                self.learn_statuses(*p, reader)?;
            }
            self.settle_open_intents(reader)?;
        }
        match unread {
            Some(why) => bail!(why),
            None => Ok(()),
        }
    }

    fn tick_due(&self) -> bool {
        !self.settled.is_empty()
            || !self
                .answers
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .is_empty()
            || self.pacer.has_releasable(wall_clock_ms())
            || (self
                .last_settle
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(500))
                && self.partitions.values().any(|p| {
                    p.customers
                        .values()
                        .any(|c| c.open.keys().any(|m| !self.is_mine(m)))
                }))
    }

    fn revoke(&mut self, partition: i32) {
        self.partitions.remove(&partition);
        self.pacer.retain(|s| s.partition != partition);
        self.intending.retain(|s| s.partition != partition);
        self.settled.retain(|s| s.partition != partition);
        self.held.retain(|_, p| *p != partition);
        // Calls under way there end unrecorded here; the partition's new owner settles them.
        let moved: Vec<String> = self
            .calls
            .iter()
            .filter(|(_, (p, _))| *p == partition)
            .map(|(m, _)| m.clone())
            .collect();
        for m in moved {
            if let Some((_, customer)) = self.calls.remove(&m) {
                self.pacer.forget_call(&customer);
            }
        }
    }

    fn reset(&mut self) {
        self.partitions.clear();
        self.intending.clear();
        self.pacer.clear();
        self.calls.clear();
        self.held.clear();
        self.epoch += 1;
        self.settled.clear();
    }

    fn owns(&self, partition: i32) -> bool {
        self.partitions.contains_key(&partition)
    }

    fn resume_positions(&self, partition: i32) -> Vec<(String, i64)> {
        self.partitions
            .get(&partition)
            .filter(|p| p.decisions_next > 0)
            .map(|p| {
                vec![(
                    self.codec.topics().decisions().to_string(),
                    p.decisions_next,
                )]
            })
            .unwrap_or_default()
    }

    fn handle(&mut self, msg: &OwnedMessage, out: &mut Outbox) -> Result<()> {
        if let Some(part) = self.partitions.get_mut(&msg.partition()) {
            // Handled in a committed transaction already: the broker's offset was behind.
            if msg.offset() < part.decisions_next {
                return Ok(());
            }
            part.decisions_next = msg.offset() + 1;
            part.decisions_moved = true;
        }
        let Some(decision) =
            decode_or_dead_letter(&self.codec, &self.rt, &self.metrics, msg, out, |c| {
                c.decode_decision(msg.payload())
            })?
        else {
            return Ok(());
        };
        let Outcome::MessageApproved(approved) = &decision.outcome else {
            return Ok(());
        };
        let approved = approved.clone();
        let p = msg.partition();
        let state = self
            .partitions
            .get(&p)
            .and_then(|part| part.customers.get(&decision.customer_id))
            .cloned()
            .unwrap_or_default();
        match dispatch::plan(&state, &approved) {
            Plan::AlreadySent {
                provider_message_id,
            } => {
                let rec = dispatch::record(
                    &decision,
                    &approved,
                    DispatchStep::Skipped(DispatchSkipped {
                        first_provider_message_id: provider_message_id,
                    }),
                    wall_clock_ms(),
                );
                self.record(p, rec, out)?;
            }
            Plan::AwaitingOutcome => {}
            Plan::Intend { attempt } => {
                self.intend(p, decision, approved, attempt, msg.offset(), out)?
            }
        }
        Ok(())
    }

    fn end_of_batch(&mut self, out: &mut Outbox) -> Result<()> {
        self.record_settlements(out)?;
        self.record_answers(out)?;
        self.call_released(out)
    }

    fn committed(&mut self, produced: &Produced) -> Result<()> {
        // The intents of the batch just committed are durable: their calls may be made now.
        let now = wall_clock_ms();
        for mut s in std::mem::take(&mut self.intending) {
            s.queued_at = now;
            let lane = Lane::of(&s.approved.purpose, &s.approved.category);
            let (customer, channel) = (s.decision.customer_id.clone(), s.approved.channel);
            self.pacer.queue(lane, &customer, channel, s, now);
        }
        let (decisions, dispatch_log) = (
            self.codec.topics().decisions().to_string(),
            self.codec.topics().dispatch().to_string(),
        );
        for (p, part) in self.partitions.iter_mut() {
            if let Some(next) = produced.get(&(dispatch_log.clone(), *p)) {
                part.next_offset = part.next_offset.max(*next);
            }
            if part.touched.is_empty() && !part.decisions_moved {
                continue;
            }
            let write = SnapshotWrite {
                changed: encode_touched(&mut part.touched, &part.customers)?,
                next_offset: part.next_offset,
                inputs: [(decisions.clone(), part.decisions_next)].into(),
                ..SnapshotWrite::default()
            };
            self.store.save(store::DISPATCH, *p, &write)?;
            part.decisions_moved = false;
        }
        let open: usize = self
            .partitions
            .values()
            .flat_map(|p| p.customers.values())
            .map(|c| c.open.len())
            .sum();
        self.metrics
            .sends_in_flight
            .store(open as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registry_outage_is_retried_from_a_stage_thread_and_poison_is_not() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let handle = rt.handle().clone();
        // Stages decode on plain threads that hold only a handle to the runtime.
        std::thread::spawn(move || {
            let mut calls = 0;
            let decoded = decode_with_retry(&handle, || {
                calls += 1;
                if calls < 3 {
                    Err(DecodeError::Retryable("registry down".into()))
                } else {
                    Ok(calls)
                }
            })
            .unwrap();
            assert_eq!(decoded, Ok(3));
            let poison: Result<Result<u32, String>> =
                decode_with_retry(&handle, || Err(DecodeError::Poison("not avro".into())));
            assert_eq!(poison.unwrap(), Err("not avro".to_string()));
            // An outage longer than the budget stops the stage, saying why.
            let started = std::time::Instant::now();
            let gave_up: Result<Result<u32, String>> =
                decode_with_retry_for(&handle, Duration::from_millis(400), || {
                    Err(DecodeError::Retryable("connection refused".into()))
                });
            let why = gave_up.unwrap_err().to_string();
            assert!(why.contains("connection refused"), "{why}");
            assert!(started.elapsed() >= Duration::from_millis(400));
            assert!(started.elapsed() < Duration::from_secs(3));
        })
        .join()
        .unwrap();
    }
}
