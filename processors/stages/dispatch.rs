//! The dispatch stage: carries approved messages to the providers and records each step on
//! `herald.dispatch.v1`. What a provider's answer means is the core's (`dispatch::answer`);
//! this stage makes the calls, paces them and carries out what the core returns.

use super::dead_letter::*;
use super::snapshot::*;
use crate::clock::wall_clock_ms;
use crate::dispatch::SendOutcome;
use crate::dispatch::{self, DispatchState, Plan};
use crate::events::*;
use crate::identity::{self, ContactDirectory, IdentifierKey};
use crate::kafka::{LogReader, OutRecord, Outbox, Produced, SharedStore, Stage};
use crate::pacing::{self, Lane, Limits, Pacer};
use crate::provider::{Outgoing, Providers};
use crate::registry::Codec;
use crate::store::{self, SnapshotWrite};
use crate::telemetry::{Metrics, SendResult};
use crate::topology::TemplateCatalog;
use crate::trace;
use anyhow::{anyhow, bail, Context, Result};
use rdkafka::message::{Message, OwnedMessage};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::Instrument;

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
    /// The trace context of the dispatch step that intended it: its calls are its children.
    traceparent: Option<String>,
}

/// A finished provider call, as its task left it.
struct Answer {
    epoch: u64,
    send: PendingSend,
    outcome: SendOutcome,
    /// From the request to the answer.
    took: std::time::Duration,
    /// The trace context of the call, which the steps recording its answer carry on.
    traceparent: Option<String>,
}

/// An open intent settled from the provider topic, to be recorded with the next batch; a
/// not-sent one carries its approval, read again from the decision log, for a new intent.
struct Settled {
    partition: i32,
    customer_id: String,
    message_id: String,
    intent: dispatch::OpenIntent,
    settlement: dispatch::Settlement,
    approval: Option<(Decision, MessageApproved, Option<String>)>,
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

    /// Reads these partitions of the provider topic on, all in one read, keeping the statuses
    /// of messages with an open intent. A status is written only after its send, and every send
    /// after its intent, so reading on from the restore never misses one.
    fn learn_statuses(&mut self, partitions: &[i32], reader: &LogReader) -> Result<()> {
        let (codec, rt) = (&self.codec, &self.rt);
        let from: Vec<(i32, i64)> = partitions
            .iter()
            .filter_map(|p| self.partitions.get(p).map(|part| (*p, part.provider_next)))
            .collect();
        let mut seen = Vec::new();
        let provider = codec.topics().provider();
        let next = reader.read_partitions(provider, &from, |m| {
            // An unreadable provider record is the processors' to dead-letter.
            if let Ok(input) = rt.block_on(codec.decode_input(provider, m.payload())) {
                if let Fact::MessageStatusChanged(s) = input.fact {
                    if let Some(id) = s.message_id {
                        seen.push((
                            m.partition(),
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
        for ((p, _), next) in from.iter().zip(next) {
            if let Some(part) = self.partitions.get_mut(p) {
                part.provider_next = next;
            }
        }
        for (p, customer, id, provider_message_id, status) in seen {
            let Some(part) = self.partitions.get_mut(&p) else {
                continue;
            };
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
                            let a = MessageApproved::clone(a);
                            // The new attempt stays in the approval's trace.
                            Some((d, a, trace::header_of(&msg)))
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

    /// Records one dispatch step, in the trace `trace` names.
    fn record(
        &mut self,
        partition: i32,
        rec: DispatchRecord,
        trace: Option<&str>,
        out: &mut Outbox,
    ) -> Result<()> {
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
            headers: trace
                .map(|t| vec![trace::kafka_header(t)])
                .unwrap_or_default(),
        });
        Ok(())
    }

    /// Records the intent of a send; the call follows once the intent is committed.
    #[allow(clippy::too_many_arguments)]
    fn intend(
        &mut self,
        partition: i32,
        decision: Decision,
        approved: MessageApproved,
        attempt: i32,
        approval_offset: i64,
        traceparent: Option<String>,
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
        self.record(partition, rec, traceparent.as_deref(), out)?;
        self.held.insert(approved.message_id.clone(), partition);
        self.intending.push(PendingSend {
            partition,
            decision,
            approved,
            attempt,
            tries: 0,
            queued_at: 0,
            traceparent,
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
            let trace = s.approval.as_ref().and_then(|(_, _, t)| t.clone());
            self.record(s.partition, rec, trace.as_deref(), out)?;
            tracing::info!(message = %s.message_id, attempt = s.intent.attempt, settlement = ?s.settlement, "open send settled");
            match (s.settlement, s.approval) {
                (dispatch::Settlement::Sent(_), _) => {
                    self.metrics.send_settled();
                }
                (
                    dispatch::Settlement::NotSent { next_attempt },
                    Some((decision, approved, trace)),
                ) => {
                    self.metrics.send_settled();
                    let offset = s.intent.approval_offset;
                    self.intend(
                        s.partition,
                        decision,
                        approved,
                        next_attempt,
                        offset,
                        trace,
                        out,
                    )?;
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
    fn to_policy_record(
        &self,
        partition: i32,
        event: &InputEvent,
        trace: Option<&str>,
    ) -> Result<OutRecord> {
        Ok(OutRecord {
            topic: self.codec.topics().provider().clone(),
            partition,
            key: event.envelope.customer_id.clone().into_bytes(),
            value: self.rt.block_on(self.codec.encode_input(event))?,
            headers: trace
                .map(|t| vec![trace::kafka_header(t)])
                .unwrap_or_default(),
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
            self.metrics
                .lane_waited(released.lane.name(), released.waited_ms);
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
                    let call = trace::provider_call_span(
                        &channel_label(channel),
                        &s.approved.message_id,
                        s.traceparent.as_deref(),
                    );
                    let outgoing = Outgoing {
                        customer_id: s.decision.customer_id.clone(),
                        approved,
                        text,
                        traceparent: call.traceparent(),
                    };
                    self.calls.insert(
                        s.approved.message_id.clone(),
                        (s.partition, s.decision.customer_id.clone()),
                    );
                    let (answers, epoch) = (self.answers.clone(), self.epoch);
                    self.rt.spawn(async move {
                        let called = std::time::Instant::now();
                        let outcome = provider.send(&outgoing).instrument(call.span.clone()).await;
                        let took = called.elapsed();
                        if let Some(kind) = failure_kind(&outcome) {
                            call.failed(kind);
                        }
                        answers
                            .lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner())
                            .push(Answer {
                                epoch,
                                send: s,
                                outcome,
                                took,
                                traceparent: outgoing.traceparent,
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
        for lane in [Lane::Transactional, Lane::Marketing] {
            self.metrics
                .set_lane_waiting(lane.name(), self.pacer.waiting(lane));
        }
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
        self.metrics.send_ended(
            &channel_label(s.approved.channel),
            SendResult::Uncalled,
            None,
        );
        let uncalled = dispatch::uncalled(&s.decision, &s.approved, why, wall_clock_ms());
        if let Some(why) = uncalled.dead_letter {
            tracing::error!(customer = %s.decision.customer_id, message = %s.approved.message_id, reason = %why, "send dead-lettered");
            out.records.push(self.dead_letter_approval(&s, why)?);
        }
        self.pacer.forget_call(&s.decision.customer_id);
        self.held.remove(&s.approved.message_id);
        let trace = s.traceparent.clone();
        self.record(s.partition, uncalled.record, trace.as_deref(), out)
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
            let label = channel_label(channel);
            self.metrics
                .send_ended(&label, send_result(&a.outcome), Some(a.took));
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
                self.metrics.breaker_opened(&label);
                tracing::error!(
                    ?channel,
                    reopen_at_ms = until,
                    "the provider keeps failing: its circuit breaker is open, sends wait"
                );
            }
            let breaker = self.pacer.breaker(channel);
            self.metrics.set_breaker_open(
                &label,
                matches!(
                    breaker,
                    pacing::Breaker::Open { .. } | pacing::Breaker::Probing
                ),
            );
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
            let call = a.traceparent.as_deref();
            self.record_answer(send, tries, a.outcome, call, now, out)?;
        }
        Ok(())
    }

    /// Records what one attempt came to and carries out what `dispatch::answer` says, in the
    /// trace of its last call (`call`).
    fn record_answer(
        &mut self,
        s: PendingSend,
        tries: u32,
        outcome: SendOutcome,
        call: Option<&str>,
        now: Millis,
        out: &mut Outbox,
    ) -> Result<()> {
        if let SendOutcome::Unanswered(e) = &outcome {
            tracing::info!(message = %s.approved.message_id, error = %e, "send unanswered; its status webhook will settle it");
        }
        let answered = dispatch::answer(&s.decision, &s.approved, s.attempt, tries, outcome, now);
        if let Some(event) = &answered.to_policy {
            self.metrics.refusal_to_policy();
            out.records
                .push(self.to_policy_record(s.partition, event, call)?);
        }
        if let Some(why) = answered.dead_letter {
            out.records.push(self.dead_letter_approval(&s, why)?);
        }
        if let Some((channel, code)) = answered.halt {
            self.metrics.account_blocked(&channel_label(channel));
            self.pacer.halt(channel, code);
            tracing::error!(code, ?channel, "the provider blocked the account or number: every send on this channel waits until someone acts and restarts dispatch");
        }
        for rec in answered.records {
            self.record(s.partition, rec, call, out)?;
        }
        Ok(())
    }
}

/// A channel as metrics label it: its name in the decision log.
fn channel_label(channel: Channel) -> String {
    crate::events::wire_name(&channel)
}

/// How a provider call ended, as metrics count it.
fn send_result(outcome: &SendOutcome) -> SendResult {
    match outcome {
        SendOutcome::Accepted(_) => SendResult::Accepted,
        SendOutcome::Unanswered(_) => SendResult::Unanswered,
        SendOutcome::Rejected { .. } | SendOutcome::NotDelivered(_) => SendResult::Refused,
    }
}

/// The `error.type` of a provider call that did not end with the message accepted.
fn failure_kind(outcome: &SendOutcome) -> Option<&'static str> {
    match outcome {
        SendOutcome::Accepted(_) => None,
        SendOutcome::Unanswered(_) => Some("unanswered"),
        SendOutcome::Rejected { .. } => Some("rejected"),
        SendOutcome::NotDelivered(_) => Some("not_delivered"),
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
        self.learn_statuses(&[partition], reader)?;
        // This partition alone, and no intent released: a restore may come mid-batch (after
        // an abort), when the others hold what the open transaction may yet abort.
        self.save_partitions(Some(partition))
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
            self.learn_statuses(&owned, reader)?;
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
        // Only approvals are traced here: every other decision passes through untouched.
        let traced = trace::record_span(self.name(), msg, None);
        let _in_span = traced.span.enter();
        let approved = MessageApproved::clone(approved);
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
                self.record(p, rec, traced.traceparent().as_deref(), out)?;
            }
            Plan::AwaitingOutcome => {}
            Plan::Intend { attempt } => {
                let trace = traced.traceparent();
                self.intend(p, decision, approved, attempt, msg.offset(), trace, out)?
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
        let dispatch_log = self.codec.topics().dispatch().to_string();
        for (p, part) in self.partitions.iter_mut() {
            if let Some(next) = produced.get(&(dispatch_log.clone(), *p)) {
                part.next_offset = part.next_offset.max(*next);
            }
        }
        self.save_partitions(None)?;
        let open: usize = self
            .partitions
            .values()
            .flat_map(|p| p.customers.values())
            .map(|c| c.open.len())
            .sum();
        self.metrics.set_sends_in_flight(open as u64);
        Ok(())
    }
}

impl DispatchStage {
    /// Saves the changes of one partition (`Some`) or of all. Only between transactions, or
    /// for a partition just restored: mid-batch, the others hold what may yet abort.
    fn save_partitions(&mut self, only: Option<i32>) -> Result<()> {
        let decisions = self.codec.topics().decisions().to_string();
        for (p, part) in self.partitions.iter_mut() {
            if only.is_some_and(|o| o != *p) {
                continue;
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
        Ok(())
    }
}
