//! The stages the Kafka loop runs: the processors (dedupe, ordering guard, policy), dispatch, and
//! the passthrough used as the benchmark's ceiling. Each turns records into core calls and core
//! output into records; none holds a rule.

use crate::audit::ConsentProjection;
use crate::dispatch::{self, DispatchState, Plan};
use crate::events::*;
use crate::identity::{self, pseudonymise, ContactDirectory, IdentifierKey};
use crate::kafka::{provenance, LogReader, OutRecord, Outbox, Produced, SharedStore, Stage};
use crate::provider::{CloudApiClient, SendOutcome};
use crate::registry::{Codec, DecodeError};
use crate::state::CustomerState;
use crate::store::{self, SnapshotWrite, PROCESSORS};
use crate::tables::Tables;
use crate::task::Task;
use crate::telemetry::Metrics;
use crate::topology::Topology;
use anyhow::{anyhow, bail, Context, Result};
use rdkafka::message::{Message, OwnedMessage};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

pub const DECISIONS: &str = "herald.decisions.v1";
pub const DISPATCH: &str = "herald.dispatch.v1";
pub const DLQ: &str = "herald.dlq.v1";
pub const INVENTORY: &str = "catalog.inventory.v1";
/// The CRM input topic: profiles (and their addresses), consent, erasure requests.
pub const CRM: &str = "crm.events.v1";
pub const INPUTS: [&str; 4] = [
    "oms.events.v1",
    "billing.events.v1",
    "crm.events.v1",
    "provider.events.v1",
];

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

/// The input record a decision came from, from its provenance headers.
fn source_position(m: &OwnedMessage) -> Option<(String, i64)> {
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
    mut f: impl FnMut() -> Result<T, DecodeError>,
) -> Result<Result<T, String>> {
    let mut delay = Duration::from_millis(100);
    for _ in 0..10 {
        match f() {
            Ok(v) => return Ok(Ok(v)),
            Err(DecodeError::Poison(why)) => return Ok(Err(why)),
            Err(DecodeError::Retryable(why)) => {
                tracing::warn!(error = %why, "registry unavailable; retrying");
                rt.block_on(tokio::time::sleep(delay));
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    bail!("schema registry unavailable after 10 attempts")
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
        error: error.clone(),
        failed_at: wall_clock_ms(),
    };
    tracing::warn!(topic = msg.topic(), partition = msg.partition(), offset = msg.offset(), error = %error, "record dead-lettered");
    Metrics::inc(&metrics.dead_letters, 1);
    let mut headers = provenance(msg);
    headers.push(("herald.error", error.into_bytes()));
    Ok(OutRecord {
        topic: DLQ,
        partition: msg.partition(),
        key: msg.key().map(|k| k.to_vec()).unwrap_or_default(),
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
            if let Outcome::MessageSuppressed(m) = &d.outcome {
                self.metrics.count_reason(&format!("{:?}", m.reason));
            }
            out.records.push(OutRecord {
                topic: DECISIONS,
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

    fn input_topics(&self) -> Vec<&'static str> {
        INPUTS.to_vec()
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
        part.inputs = snap
            .inputs
            .iter()
            .filter(|(k, _)| *k != STREAM_TIME_KEY)
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        let next = reader.read(DECISIONS, partition, snap.next_offset, |m| {
            if let Some((topic, offset)) = source_position(m) {
                let e = part.inputs.entry(topic).or_insert(0);
                *e = (*e).max(offset + 1);
            }
            let d = rt
                .block_on(codec.decode_decision(m.payload()))
                .map_err(|e| anyhow!("decision log {DECISIONS}/{partition}@{}: {e}", m.offset()))?;
            if snap.holds(&d.customer_id, m.offset()) {
                return Ok(());
            }
            part.task.fold(&d);
            part.consent.apply(&d);
            part.touched.insert(d.customer_id.clone());
            Ok(())
        })?;
        part.next_decision_offset = next;
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
        // From here on no phone number or e-mail address is in clear: not in state, not in
        // the decision log.
        let input = pseudonymise(&self.identifiers, input);
        let part = self
            .partitions
            .get_mut(&p)
            .ok_or_else(|| anyhow!("partition {p} not restored"))?;
        self.tables.observe(&input.fact);
        let input_ref = format!("{}/{}/{}", msg.topic(), p, msg.offset());
        let decisions = part
            .task
            .decide(&input, &input_ref, &self.topology, &self.tables);
        part.note(&decisions);
        self.emit(p, decisions, provenance(msg), out)
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
            let next = reader.read(INVENTORY, p, from, |m| {
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
            if let Some(next) = produced.get(&(DECISIONS.to_string(), *p)) {
                part.next_decision_offset = part.next_decision_offset.max(*next);
            }
            // A batch of nothing but dead letters touches no customer, yet its input positions
            // must be kept, or a broker that lost the group offsets would dead-letter it again.
            if part.touched.is_empty() && !part.inputs_moved {
                continue;
            }
            let mut inputs = part.inputs.clone();
            inputs.insert(STREAM_TIME_KEY.to_string(), part.task.stream_time());
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
    /// Addresses by keyed hash, from this partition of the CRM topic, and where to read on.
    contacts: ContactDirectory,
    crm_next: i64,
    next_offset: i64,
    touched: BTreeSet<String>,
}

struct PendingSend {
    partition: i32,
    decision: Decision,
    approved: MessageApproved,
}

/// Carries approved messages to the provider and records each step on `herald.dispatch.v1`.
pub struct DispatchStage {
    pub codec: Arc<Codec>,
    pub store: SharedStore,
    pub client: CloudApiClient,
    pub rt: tokio::runtime::Handle,
    pub metrics: Arc<Metrics>,
    identifiers: IdentifierKey,
    partitions: HashMap<i32, DispatchPartition>,
    pending: Vec<PendingSend>,
    /// Why the CRM topic could not be read before this batch, if it could not: an unknown
    /// recipient then stops the batch instead of failing the send.
    contacts_unread: Option<String>,
}

impl DispatchStage {
    /// A dispatch stage sending through `client`; recipients are keyed hashes under
    /// `identifiers`, resolved through the CRM topic.
    pub fn new(
        codec: Arc<Codec>,
        store: SharedStore,
        client: CloudApiClient,
        rt: tokio::runtime::Handle,
        metrics: Arc<Metrics>,
        identifiers: IdentifierKey,
    ) -> Self {
        DispatchStage {
            codec,
            store,
            client,
            rt,
            metrics,
            identifiers,
            partitions: HashMap::new(),
            pending: Vec::new(),
            contacts_unread: None,
        }
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
        part.crm_next = reader.read(CRM, partition, part.crm_next, |m| {
            // An unreadable CRM record is the processors' to dead-letter; it has no address.
            if let Ok(input) = rt.block_on(codec.decode_input(CRM, m.payload())) {
                contacts.observe(key, &input);
            }
            Ok(())
        })?;
        Ok(())
    }

    fn record(&mut self, partition: i32, rec: DispatchRecord, out: &mut Outbox) -> Result<()> {
        if let Some(part) = self.partitions.get_mut(&partition) {
            dispatch::evolve(
                part.customers.entry(rec.customer_id.clone()).or_default(),
                &rec,
            );
            part.touched.insert(rec.customer_id.clone());
        }
        out.records.push(OutRecord {
            topic: DISPATCH,
            partition,
            key: rec.customer_id.clone().into_bytes(),
            value: self.rt.block_on(self.codec.encode_dispatch(&rec))?,
            headers: vec![],
        });
        Ok(())
    }
}

impl Stage for DispatchStage {
    fn name(&self) -> &'static str {
        "dispatch"
    }

    fn input_topics(&self) -> Vec<&'static str> {
        vec![DECISIONS]
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
        part.next_offset = reader.read(DISPATCH, partition, snap.next_offset, |m| {
            let r = rt
                .block_on(codec.decode_dispatch(m.payload()))
                .map_err(|e| anyhow!("dispatch log {DISPATCH}/{partition}@{}: {e}", m.offset()))?;
            if snap.holds(&r.customer_id, m.offset()) {
                return Ok(());
            }
            dispatch::evolve(part.customers.entry(r.customer_id.clone()).or_default(), &r);
            part.touched.insert(r.customer_id.clone());
            Ok(())
        })?;
        self.partitions.insert(partition, part);
        self.learn_contacts(partition, reader)?;
        self.committed(&Produced::new())?;
        Ok(())
    }

    fn refresh_tables(&mut self, reader: &LogReader) -> Result<()> {
        let owned: Vec<i32> = self.partitions.keys().copied().collect();
        let mut unread = None;
        for p in owned {
            if let Err(e) = self.learn_contacts(p, reader) {
                unread = Some(format!("{CRM}/{p}: {e}"));
            }
        }
        self.contacts_unread = unread.clone();
        match unread {
            Some(why) => bail!(why),
            None => Ok(()),
        }
    }

    fn revoke(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    fn reset(&mut self) {
        self.partitions.clear();
        self.pending.clear();
    }

    fn owns(&self, partition: i32) -> bool {
        self.partitions.contains_key(&partition)
    }

    fn handle(&mut self, msg: &OwnedMessage, out: &mut Outbox) -> Result<()> {
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
        let in_batch = self
            .pending
            .iter()
            .any(|s| s.approved.message_id == approved.message_id);
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
            Plan::Send if in_batch => {}
            Plan::Send => self.pending.push(PendingSend {
                partition: p,
                decision,
                approved,
            }),
        }
        Ok(())
    }

    fn end_of_batch(&mut self, out: &mut Outbox) -> Result<()> {
        let mut pending = Vec::with_capacity(self.pending.len());
        for s in std::mem::take(&mut self.pending) {
            let address = self.partitions.get(&s.partition).map(|part| {
                part.contacts
                    .address(&s.decision.customer_id, &s.approved.recipient)
            });
            match address {
                Some(identity::Address::Known(to)) => {
                    let mut send = s.approved.clone();
                    send.recipient = to.to_string();
                    pending.push((s, send));
                }
                _ if self.contacts_unread.is_some() => bail!(
                    "dispatch cannot resolve recipients: the CRM topic could not be read ({})",
                    self.contacts_unread.as_deref().unwrap_or_default()
                ),
                _ => {
                    // Erased before it went out, or an address the CRM topic never held:
                    // nobody to send to, and trying again cannot change that.
                    Metrics::inc(&self.metrics.send_failures, 1);
                    tracing::info!(customer = %s.decision.customer_id, message = %s.approved.message_id, "no address for the recipient; not sent");
                    let failed = DispatchStep::Failed(DispatchFailed {
                        code: 0,
                        retryable: false,
                        detail: "no address for this recipient: the customer was erased, or the CRM topic never gave one".into(),
                    });
                    let rec = dispatch::record(&s.decision, &s.approved, failed, wall_clock_ms());
                    self.record(s.partition, rec, out)?;
                }
            }
        }
        for chunk in pending.chunks(64) {
            let client = &self.client;
            let results = self.rt.block_on(futures::future::join_all(chunk.iter().map(
                |(_, send)| async move {
                    let mut delay = Duration::from_millis(50);
                    let mut attempt = 1;
                    loop {
                        match client.send(send).await {
                            Ok(SendOutcome::Rejected {
                                retryable: true, ..
                            })
                            | Err(_)
                                if attempt < 4 =>
                            {
                                tokio::time::sleep(delay).await;
                                delay *= 2;
                                attempt += 1;
                            }
                            other => return (attempt, other),
                        }
                    }
                },
            )));
            for ((s, _), (attempts, result)) in chunk.iter().zip(results) {
                let now = wall_clock_ms();
                let attempted = dispatch::record(
                    &s.decision,
                    &s.approved,
                    DispatchStep::Attempted(DispatchAttempted { attempt: attempts }),
                    now,
                );
                self.record(s.partition, attempted, out)?;
                let step = match result {
                    Ok(SendOutcome::Accepted(id)) => {
                        Metrics::inc(&self.metrics.sends, 1);
                        DispatchStep::Accepted(DispatchAccepted {
                            provider_message_id: id,
                        })
                    }
                    Ok(SendOutcome::Rejected {
                        code,
                        retryable,
                        detail,
                    }) => {
                        Metrics::inc(&self.metrics.send_failures, 1);
                        DispatchStep::Failed(DispatchFailed {
                            code,
                            retryable,
                            detail,
                        })
                    }
                    Err(e) => {
                        Metrics::inc(&self.metrics.send_failures, 1);
                        DispatchStep::Failed(DispatchFailed {
                            code: 0,
                            retryable: true,
                            detail: format!("provider unreachable: {e}"),
                        })
                    }
                };
                let rec = dispatch::record(&s.decision, &s.approved, step, now);
                self.record(s.partition, rec, out)?;
            }
        }
        Ok(())
    }

    fn committed(&mut self, produced: &Produced) -> Result<()> {
        for (p, part) in self.partitions.iter_mut() {
            if let Some(next) = produced.get(&(DISPATCH.to_string(), *p)) {
                part.next_offset = part.next_offset.max(*next);
            }
            if part.touched.is_empty() {
                continue;
            }
            let write = SnapshotWrite {
                changed: encode_touched(&mut part.touched, &part.customers)?,
                next_offset: part.next_offset,
                ..SnapshotWrite::default()
            };
            self.store.save(store::DISPATCH, *p, &write)?;
        }
        Ok(())
    }
}

/// Consumes the input topics and produces the same bytes, with the same settings: the ceiling
/// the benchmark compares the processors against.
#[derive(Default)]
pub struct PassthroughStage {
    owned: BTreeSet<i32>,
}

/// The topic the passthrough writes to.
pub const PASSTHROUGH: &str = "herald.bench.passthrough";

impl Stage for PassthroughStage {
    fn name(&self) -> &'static str {
        "passthrough"
    }
    fn input_topics(&self) -> Vec<&'static str> {
        INPUTS.to_vec()
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
            topic: PASSTHROUGH,
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
