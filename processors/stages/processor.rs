//! The processors stage: dedupe, the ordering guard, policy and journeys (the core's `task`)
//! over the input topics, writing decisions, contact cards and dead letters.

use super::dead_letter::*;
use super::snapshot::*;
use crate::audit::ConsentProjection;
use crate::clock::wall_clock_ms;
use crate::events::*;
use crate::identity::{self, pseudonymise, IdentifierKey};
use crate::kafka::{provenance, LogReader, OutRecord, Outbox, Produced, SharedStore, Stage};
use crate::registry::Codec;
use crate::state::CustomerState;
use crate::store::{state_encoding, SnapshotWrite, PROCESSORS};
use crate::tables::Tables;
use crate::task::Task;
use crate::telemetry::Metrics;
use crate::topology::Topology;
use crate::trace;
use anyhow::{anyhow, bail, Context, Result};
use rdkafka::message::{Message, OwnedMessage};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

#[derive(Default)]
struct ProcessorPartition {
    /// The partition's customers, stream time and timers.
    task: Task,
    /// Next unprocessed offset per input topic: records below it were already decided.
    inputs: std::collections::BTreeMap<String, i64>,
    /// Input positions advanced since the last save.
    inputs_moved: bool,
    next_decision_offset: i64,
    /// Customers decided for since the last save. Hashed, not ordered: it is asked about
    /// every decision, and a search of a sorted set of thousands of ids took 5.6 % of the
    /// stage's handling (perf, herald bench on the mock cluster).
    touched: HashSet<String>,
    /// Consent-history changes decided since the last save.
    consent: ConsentProjection,
    /// Each customer's card in the contact changelog, as the record last written: kept
    /// encoded, it takes a sixth of the memory of the decoded card (one address: about 170
    /// bytes against 1 KB), and it is decoded only when a profile change adds to it.
    contacts: HashMap<String, Box<[u8]>>,
    /// A template status change arrived since the last save: the next one saves the table.
    templates_moved: bool,
    /// The trace context of each message deferred while this process held the partition, by
    /// message id, so that its release, hours later, continues the trace of the fact that
    /// asked for it. In memory only: a message deferred before a restore is released in a
    /// trace of its own.
    deferred_traces: HashMap<String, String>,
}

/// The message a decision settles or defers, if any.
fn message_of(outcome: &Outcome) -> Option<&str> {
    match outcome {
        Outcome::MessageDeferred(m) => Some(&m.planned.message_id),
        Outcome::MessageApproved(m) => Some(&m.message_id),
        Outcome::MessageSuppressed(m) => m.message_id.as_deref(),
        _ => None,
    }
}

impl ProcessorPartition {
    /// The trace a decision belongs in: a deferred message's, once it is decided again;
    /// `current` (the record's, or none for a timer) otherwise. Remembers deferrals.
    fn trace_of(&mut self, d: &Decision, current: Option<&str>) -> Option<String> {
        let message = message_of(&d.outcome)?;
        let earlier = match &d.outcome {
            // Deferred again: it keeps the trace it had.
            Outcome::MessageDeferred(_) => self.deferred_traces.get(message).cloned(),
            _ => self.deferred_traces.remove(message),
        };
        let trace = earlier.or_else(|| current.map(str::to_string));
        if let (Outcome::MessageDeferred(_), Some(t)) = (&d.outcome, &trace) {
            self.deferred_traces.insert(message.to_string(), t.clone());
        }
        trace
    }

    /// Keeps the decisions' customers and consent changes for the next save.
    fn note(&mut self, decisions: &[Decision]) {
        let mut noted: Option<&str> = None;
        for d in decisions {
            // An input's decisions are mostly its own customer's: look each up once.
            if noted != Some(d.customer_id.as_str()) && !self.touched.contains(&d.customer_id) {
                self.touched.insert(d.customer_id.clone());
            }
            noted = Some(&d.customer_id);
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
    /// How often changed customers are saved to the store. The decision log is the record:
    /// a restore replays what came after the last save, so saving less often costs only
    /// replay after a crash, and a customer changed by many batches is written once.
    checkpoint_every: Duration,
    last_checkpoint: Option<std::time::Instant>,
    /// The save in flight: states are encoded and written on a thread of their own, so a
    /// checkpoint does not stall the records behind it. At most one runs at a time.
    saving: Option<std::thread::JoinHandle<Result<()>>>,
    /// At most this many customers' states stay in memory across the stage's partitions after a
    /// checkpoint; the others are loaded from the store when an input or a timer needs them.
    /// `None` keeps every customer.
    state_cache: Option<usize>,
}

/// What one partition's checkpoint writes, with its customers' states still to encode.
struct PartitionSave {
    partition: i32,
    /// Shared with the task: taking them costs no copy on the stage's thread.
    customers: Vec<(String, std::sync::Arc<CustomerState>)>,
    next_offset: i64,
    inputs: std::collections::BTreeMap<String, i64>,
    consent: Vec<(String, crate::audit::ConsentEvent)>,
    erased: Vec<String>,
}

/// Encodes and writes a checkpoint's partitions, in order.
fn write_checkpoint(store: &SharedStore, saves: Vec<PartitionSave>) -> Result<()> {
    for save in saves {
        let mut changed = Vec::with_capacity(save.customers.len());
        let mut timers = Vec::with_capacity(save.customers.len());
        // Each state is let go once encoded, not after the whole checkpoint is written: while
        // the save holds it, the stage's next decision for that customer copies it whole.
        for (customer, state) in save.customers {
            timers.push((customer.clone(), state.next_timer()));
            changed.push((customer, state_encoding::encode(&state)?));
        }
        let write = SnapshotWrite {
            changed,
            next_offset: save.next_offset,
            inputs: save.inputs,
            consent: save.consent,
            erased: save.erased,
            timers,
        };
        store.save(PROCESSORS, save.partition, &write)?;
    }
    Ok(())
}

/// A customer's stored state and the log position it reflects, or a new customer's empty state
/// at 0. A store that does not answer is asked again with a backoff, for about three seconds.
fn load_state(store: &SharedStore, partition: i32, customer: &str) -> Result<(CustomerState, i64)> {
    let stored = with_retry(
        store,
        &format!("the state of {customer}"),
        partition,
        || store.load_customer(PROCESSORS, partition, customer),
    )?;
    match stored {
        Some(s) => Ok((
            state_encoding::decode(&s.bytes)
                .with_context(|| format!("stored state of {customer} is unreadable"))?,
            s.next_offset,
        )),
        None => Ok((CustomerState::default(), 0)),
    }
}

/// Reads from the store, asking again with a backoff for about three seconds before giving up
/// naming `what` and the store.
fn with_retry<T>(
    store: &SharedStore,
    what: &str,
    partition: i32,
    mut read: impl FnMut() -> Result<T>,
) -> Result<T> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match read() {
            Ok(found) => return Ok(found),
            Err(e) if backoff <= Duration::from_millis(1600) => {
                tracing::warn!(what, partition, error = %format!("{e:#}"), "reading the state store; trying again");
                std::thread::sleep(backoff);
                backoff *= 2;
            }
            Err(e) => {
                return Err(e.context(format!(
                    "loading {what} (partition {partition}) from {}",
                    store.describe()
                )))
            }
        }
    }
}

/// Loads into `task`, in one read of the store, the customers it wants that are not in memory.
fn admit_wanted(
    store: &SharedStore,
    metrics: &Metrics,
    partition: i32,
    task: &mut Task,
    wanted: Vec<String>,
) -> Result<()> {
    if wanted.is_empty() {
        return Ok(());
    }
    let mut found = with_retry(store, "customers' states", partition, || {
        store.load_customers(PROCESSORS, partition, &wanted)
    })?;
    metrics.customers_loaded(wanted.len() as u64);
    for customer in wanted {
        let state = match found.remove(&customer) {
            Some(s) => state_encoding::decode(&s.bytes)
                .with_context(|| format!("stored state of {customer} is unreadable"))?,
            None => CustomerState::default(),
        };
        task.admit(customer, state);
    }
    Ok(())
}

/// What an input changes in the contact changelog once decided: a customer's new card when an
/// accepted profile brought addresses the card lacks, a tombstone (`None`) when an erasure was
/// accepted, nothing otherwise. `previous` is the customer's card as last written.
fn contact_change(
    previous: Option<ContactCard>,
    input: &InputEvent,
    learnt: std::collections::BTreeMap<String, String>,
    decisions: &[Decision],
) -> Option<Option<ContactCard>> {
    let customer = &input.envelope.customer_id;
    let accepted = decisions.iter().any(|d| {
        matches!(&d.outcome, Outcome::EventAccepted(a) if a.envelope.event_id == input.envelope.event_id)
    });
    if !accepted {
        return None;
    }
    match &input.fact {
        Fact::ErasureRequested(_) => Some(None),
        Fact::ProfileChanged(_) => {
            let mut card = previous.unwrap_or_else(|| ContactCard {
                customer_id: customer.clone(),
                ..ContactCard::default()
            });
            let before = card.addresses.len();
            card.addresses.extend(learnt);
            if card.addresses.len() == before {
                return None;
            }
            card.updated_at = card.updated_at.max(input.envelope.occurred_at);
            Some(Some(card))
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
            checkpoint_every: Duration::ZERO,
            last_checkpoint: None,
            saving: None,
            state_cache: None,
        }
    }

    /// Keeps at most `customers` states in memory after each checkpoint (`None`: all).
    pub fn with_state_cache(mut self, customers: Option<usize>) -> Self {
        self.state_cache = customers;
        self
    }

    /// Lets the customers used longest ago leave memory, beyond each partition's share of the
    /// cache. Only after the previous save is done and before the next starts: a customer
    /// changed since then is kept until a save has written it, so the store always holds the
    /// state of a customer not in memory.
    fn evict_cold(&mut self) {
        let in_memory = |parts: &HashMap<i32, ProcessorPartition>| {
            parts.values().map(|p| p.task.resident()).sum::<usize>()
        };
        if let Some(cache) = self.state_cache {
            let share = cache / self.partitions.len().max(1);
            for part in self.partitions.values_mut() {
                let touched = &part.touched;
                let gone = part.task.evict(share, |c| touched.contains(c));
                self.metrics.customers_evicted(gone as u64);
            }
        }
        self.metrics
            .set_customers_in_memory(in_memory(&self.partitions));
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

    /// Saves changed customers at most this often (zero: after every transaction).
    pub fn with_checkpoint_interval(mut self, every: Duration) -> Self {
        self.checkpoint_every = every;
        self
    }

    /// Waits for the save in flight, if any; its failure is this stage's.
    fn saved(&mut self) -> Result<()> {
        match self.saving.take() {
            Some(h) => h
                .join()
                .map_err(|_| anyhow!("the checkpoint writer panicked"))?
                .context("saving a checkpoint to the state store"),
            None => Ok(()),
        }
    }

    /// Starts saving every partition's changed customers, consent changes and positions, once
    /// the previous save is done; `wait` also waits for this one. Only between transactions:
    /// mid-batch, a partition holds records decided in a transaction that may yet abort.
    fn checkpoint(&mut self, wait: bool) -> Result<()> {
        self.save_partitions(None, wait)
    }

    /// Starts saving the changes of one partition (`Some`) or of all; see `checkpoint`.
    fn save_partitions(&mut self, only: Option<i32>, wait: bool) -> Result<()> {
        self.saved()?;
        if only.is_none() {
            self.last_checkpoint = Some(std::time::Instant::now());
            self.evict_cold();
        }
        let mut saves = Vec::new();
        for (p, part) in self.partitions.iter_mut() {
            if only.is_some_and(|o| o != *p) {
                continue;
            }
            // A batch of nothing but dead letters touches no customer, yet its input positions
            // must be kept, or a broker that lost the group offsets would dead-letter it again.
            if part.touched.is_empty() && !part.inputs_moved && !part.templates_moved {
                continue;
            }
            let mut inputs = part.inputs.clone();
            inputs.insert(STREAM_TIME_KEY.to_string(), part.task.stream_time());
            inputs.insert(TIMERS_KEY.to_string(), 1);
            // The template table is shared by the partitions, so mid-batch it may hold what
            // another partition's open transaction observed: it is saved with a checkpoint.
            if only.is_none() && std::mem::take(&mut part.templates_moved) {
                inputs.extend(self.tables.saved_positions());
            }
            let customers = part.task.customers();
            let mut changed: Vec<_> = std::mem::take(&mut part.touched)
                .into_iter()
                .filter_map(|c| customers.get(&c).cloned().map(|s| (c, s)))
                .collect();
            // Written in key order, as the sorted set gave them: the store's writes cost less.
            changed.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            saves.push(PartitionSave {
                partition: *p,
                customers: changed,
                next_offset: part.next_decision_offset,
                inputs,
                consent: std::mem::take(&mut part.consent.records),
                erased: std::mem::take(&mut part.consent.erased),
            });
            part.inputs_moved = false;
        }
        if saves.is_empty() {
            return Ok(());
        }
        let store = self.store.clone();
        self.saving = Some(std::thread::spawn(move || write_checkpoint(&store, saves)));
        if wait {
            self.saved()?;
        }
        Ok(())
    }

    /// Writes decisions to the decision log with `headers`, each in the trace its message
    /// belongs in (see [`ProcessorPartition::trace_of`]), or `current`'s.
    fn emit(
        &mut self,
        p: i32,
        decisions: Vec<Decision>,
        headers: Vec<(&'static str, Vec<u8>)>,
        current: Option<&str>,
        out: &mut Outbox,
    ) -> Result<()> {
        // One runtime entry per input, not per decision.
        let values = self.rt.block_on(self.codec.encode_decisions(&decisions))?;
        let mut headers = Some(headers);
        let last = decisions.len().saturating_sub(1);
        for (i, (d, value)) in decisions.into_iter().zip(values).enumerate() {
            let trace = self
                .partitions
                .get_mut(&p)
                .and_then(|part| part.trace_of(&d, current))
                .or_else(|| current.map(str::to_string));
            // The last decision takes the input's headers; the others copy them.
            let mut headers = if i == last {
                headers.take()
            } else {
                headers.clone()
            }
            .unwrap_or_default();
            headers.extend(trace.as_deref().map(trace::kafka_header));
            self.metrics.decision(d.outcome.kind());
            match &d.outcome {
                Outcome::MessageSuppressed(m) => {
                    // As the decision log names it, so a dashboard and a warehouse query agree.
                    self.metrics
                        .suppression(&crate::events::wire_name(&m.reason));
                }
                Outcome::DuplicateIgnored(dup) if dup.repeats_event_id.is_some() => {
                    self.metrics.repeat_recognised();
                }
                _ => {}
            }
            out.records.push(OutRecord {
                topic: self.codec.topics().decisions().clone(),
                partition: p,
                key: d.customer_id.into_bytes(),
                value,
                headers,
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
        // A save of this partition may still be in flight from before it was revoked.
        self.saved()?;
        let mut snap = self.store.load_positions(PROCESSORS, partition)?;
        let mut part = ProcessorPartition::default();
        let stream_time = snap.inputs.get(STREAM_TIME_KEY).copied().unwrap_or(0);
        // Where each customer in memory was loaded from: the decisions before it are in the
        // state already, and the replay must not fold them again.
        let mut loaded_at: HashMap<String, i64> = HashMap::new();
        if snap.inputs.contains_key(TIMERS_KEY) || (snap.next_offset == 0 && snap.inputs.is_empty())
        {
            part.task = Task::resumed(stream_time, std::mem::take(&mut snap.timers));
        } else {
            // Saved before timers were: every customer is read once, and saved again with
            // their timers.
            snap = self.store.load(PROCESSORS, partition)?;
            let mut customers = HashMap::new();
            for (customer, stored) in &snap.customers {
                let state = state_encoding::decode(&stored.bytes)
                    .with_context(|| format!("stored state of {customer} is unreadable"))?;
                customers.insert(customer.clone(), state);
                loaded_at.insert(customer.clone(), stored.next_offset);
                part.touched.insert(customer.clone());
            }
            part.task = Task::restored(customers, stream_time);
        }
        let codec = self.codec.clone();
        let rt = self.rt.clone();
        for (k, v) in &snap.inputs {
            if k != STREAM_TIME_KEY && k != TIMERS_KEY && !self.tables.restore_saved(k, *v) {
                part.inputs.insert(k.clone(), *v);
            }
        }
        let (store, metrics) = (&self.store, &self.metrics);
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
            // Deferrals still waiting, as far back as this replay reads.
            part.trace_of(&d, trace::header_of(m).as_deref());
            if let Outcome::EventAccepted(a) = &d.outcome {
                part.templates_moved |= tables.observe(&a.fact, a.envelope.occurred_at);
            }
            if !part.task.is_resident(&d.customer_id) {
                let (state, at) = load_state(store, partition, &d.customer_id)?;
                metrics.customers_loaded(1);
                part.task.admit(d.customer_id.clone(), state);
                loaded_at.insert(d.customer_id.clone(), at);
            }
            if loaded_at
                .get(&d.customer_id)
                .is_some_and(|at| m.offset() < *at)
            {
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
            // Decoded to prove it readable; kept as written.
            match rt.block_on(codec.decode_contact_card(m.payload())) {
                Ok(Some(_)) => {
                    let record = m.payload().unwrap_or_default();
                    part.contacts.insert(customer, record.into());
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
        // Persist what the replay folded so the next restore starts further on. This partition
        // alone: a restore may come mid-batch (after an abort), when the others hold records of
        // the open transaction; saved, and that transaction aborted, their positions would skip
        // records no decision was ever written for.
        self.save_partitions(Some(partition), false)
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

    fn prefetch(&mut self, batch: &[OwnedMessage]) -> Result<()> {
        // Records are keyed by customer (one that is not goes to the dead letters, and its
        // state loaded here is merely let go later).
        let mut cold: BTreeMap<i32, BTreeSet<String>> = BTreeMap::new();
        for msg in batch {
            let Some(part) = self.partitions.get(&msg.partition()) else {
                continue;
            };
            let Some(customer) = msg.key().and_then(|k| std::str::from_utf8(k).ok()) else {
                continue;
            };
            if !part.task.is_resident(customer) {
                cold.entry(msg.partition())
                    .or_default()
                    .insert(customer.to_string());
            }
        }
        for (p, customers) in cold {
            if let Some(part) = self.partitions.get_mut(&p) {
                let customers = customers.into_iter().collect();
                admit_wanted(&self.store, &self.metrics, p, &mut part.task, customers)?;
            }
        }
        Ok(())
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
            tracing::debug!(
                topic = msg.topic(),
                partition = p,
                offset = msg.offset(),
                "already decided; skipped"
            );
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
        // Joins the trace the record carries (its header, else its envelope's), so every
        // decision taken on it is part of that trace.
        let traced = trace::record_span(self.name(), msg, input.envelope.trace_parent.as_deref());
        let _in_span = traced.span.enter();
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
        let wanted = part.task.wanted(&input);
        admit_wanted(&self.store, &self.metrics, p, &mut part.task, wanted)?;
        let input_ref = format!("{}/{}/{}", msg.topic(), p, msg.offset());
        let decisions = part
            .task
            .decide(&input, &input_ref, &self.topology, &self.tables);
        part.note(&decisions);
        let customer = &input.envelope.customer_id;
        let previous = match (&input.fact, part.contacts.get(customer)) {
            (Fact::ProfileChanged(_), Some(record)) => self
                .rt
                .block_on(self.codec.decode_contact_card(Some(record)))
                .map_err(|e| anyhow!("the contact card of {customer} is unreadable: {e}"))?,
            _ => None,
        };
        // The card as its new record in the changelog; a tombstone once the customer is erased.
        let card = match contact_change(previous, &input, learnt, &decisions) {
            Some(Some(card)) => {
                let value = self.rt.block_on(self.codec.encode_contact_card(&card))?;
                part.contacts
                    .insert(customer.clone(), value.as_slice().into());
                Some(value)
            }
            Some(None) => {
                part.contacts.remove(customer);
                Some(Vec::new())
            }
            None => None,
        };
        let current = traced.traceparent();
        self.emit(p, decisions, provenance(msg), current.as_deref(), out)?;
        if let Some(value) = card {
            out.records.push(OutRecord {
                topic: self.codec.topics().contacts().clone(),
                partition: p,
                key: input.envelope.customer_id.clone().into_bytes(),
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
            let wanted = part.task.wanted_until(now);
            admit_wanted(&self.store, &self.metrics, *p, &mut part.task, wanted)?;
            let ds = part.task.advance_to(now, &self.topology, &self.tables);
            part.note(&ds);
            // Stream time moved: it must be saved even if no customer changed.
            part.inputs_moved = true;
            fired.push((*p, ds));
        }
        for (p, ds) in fired {
            let timer = vec![("herald.timer", b"wall-clock".to_vec())];
            self.emit(p, ds, timer, None, out)?;
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
        let decisions = self.codec.topics().decisions().to_string();
        for (p, part) in self.partitions.iter_mut() {
            if let Some(next) = produced.get(&(decisions.clone(), *p)) {
                part.next_decision_offset = part.next_decision_offset.max(*next);
            }
        }
        if self
            .last_checkpoint
            .is_some_and(|t| t.elapsed() < self.checkpoint_every)
        {
            return Ok(());
        }
        // Saving after every transaction (no interval) keeps the store current when the
        // transaction is: wait for it.
        self.checkpoint(self.checkpoint_every.is_zero())
    }

    fn idle(&mut self) -> Result<()> {
        // The last batches before a quiet spell are saved once the interval has passed, not
        // when the next record comes: the store (and the query API, and `herald state`) is
        // never more than an interval behind what was committed.
        let pending = self
            .partitions
            .values()
            .any(|p| !p.touched.is_empty() || p.inputs_moved || p.templates_moved);
        let due = self
            .last_checkpoint
            .is_none_or(|t| t.elapsed() >= self.checkpoint_every);
        if pending && due {
            self.checkpoint(false)?;
        }
        Ok(())
    }

    fn stopped(&mut self) -> Result<()> {
        self.checkpoint(true)
    }
}
