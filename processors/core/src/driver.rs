//! The topology driver: every processor in memory, in the spirit of Kafka Streams'
//! TopologyTestDriver. Given inputs, the provider's answers and ticks, it runs dedupe, the
//! ordering guard, policy and journeys (through `task`) and dispatch (through `dispatch`'s
//! rules) as the live stages would, feeding what dispatch sends back to policy in as a provider
//! fact, and returns the decisions and dispatch steps. No broker, no clock: scenario files and
//! unit tests state what was sent and what the provider answered.

use crate::dispatch::{
    self, AfterCall, DispatchState, ObservedStatus, Plan, SendOutcome, Settlement, Uncallable,
};
use crate::events::*;
use crate::state::CustomerState;
use crate::tables::Tables;
use crate::task::Task;
use crate::topology::Topology;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

/// One provider call, as the driver's provider sees it.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    pub approved: &'a MessageApproved,
    pub customer_id: &'a str,
    /// The attempt (a new one follows a send settled as not sent).
    pub attempt: i32,
    /// The call within the attempt, from 1 (retries of retryable refusals).
    pub try_number: u32,
}

/// The provider's answer to a call; the default accepts everything.
pub type Answers<'t> = Box<dyn FnMut(&Call) -> SendOutcome + 't>;

/// What one input or tick came to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Output {
    /// Decisions in log order, those policy took on dispatch's refusals included.
    pub decisions: Vec<Decision>,
    /// Dispatch steps in log order.
    pub steps: Vec<DispatchRecord>,
    /// Approvals sent to the dead-letter topic, with why.
    pub dead_letters: Vec<(String, String)>,
}

impl Output {
    fn extend(&mut self, other: Output) {
        self.decisions.extend(other.decisions);
        self.steps.extend(other.steps);
        self.dead_letters.extend(other.dead_letters);
    }
}

/// Every processor of one partition, in memory.
pub struct Driver<'t> {
    topology: &'t Topology,
    tables: Tables,
    task: Task,
    dispatch: BTreeMap<String, DispatchState>,
    answers: Answers<'t>,
    /// Customers whose address the CRM topic never gave (or erased).
    unreachable: BTreeSet<String>,
    /// Channels whose lane a provider's account block halted, with the code.
    halted: BTreeMap<Channel, i32>,
    /// Statuses seen for messages with an open intent.
    statuses: HashMap<String, ObservedStatus>,
    /// The decision log, whose offsets intents point at, to send an approval anew.
    log: Vec<Decision>,
    refusals: usize,
    settle_wait_ms: Millis,
}

impl<'t> Driver<'t> {
    /// A driver over `topology`, with empty tables and a provider that accepts every call.
    pub fn new(topology: &'t Topology) -> Self {
        Driver {
            topology,
            tables: Tables::default(),
            task: Task::default(),
            dispatch: BTreeMap::new(),
            answers: Box::new(|call: &Call| {
                SendOutcome::Accepted(format!("wamid.{}", call.approved.message_id))
            }),
            unreachable: BTreeSet::new(),
            halted: BTreeMap::new(),
            statuses: HashMap::new(),
            log: Vec::new(),
            refusals: 0,
            settle_wait_ms: dispatch::SETTLE_WAIT_MS,
        }
    }

    /// Answers provider calls with `answers`.
    pub fn with_answers(mut self, answers: impl FnMut(&Call) -> SendOutcome + 't) -> Self {
        self.answers = Box::new(answers);
        self
    }

    /// The stock and template-status tables, to report stock levels before an input.
    pub fn tables_mut(&mut self) -> &mut Tables {
        &mut self.tables
    }

    /// Marks a customer as having no address dispatch could resolve.
    pub fn without_address(&mut self, customer_id: &str) {
        self.unreachable.insert(customer_id.to_string());
    }

    /// The customers' states as the processors hold them.
    pub fn customers(&self) -> &HashMap<String, std::sync::Arc<CustomerState>> {
        self.task.customers()
    }

    /// Feeds one input, read from the log at `input_ref`, through every processor.
    pub fn input(&mut self, input: &InputEvent, input_ref: &str) -> Output {
        self.tables.observe(&input.fact, input.envelope.occurred_at);
        if let Fact::MessageStatusChanged(s) = &input.fact {
            self.observe_status(&input.envelope.customer_id, s);
        }
        let decisions = self
            .task
            .decide(input, input_ref, self.topology, &self.tables);
        let mut out = self.dispatch_all(decisions);
        out.extend(self.settle(input.envelope.occurred_at));
        out
    }

    /// Moves stream time to `now`: timers due by then fire, and open sends with no status
    /// for the settle wait are settled as not sent and tried again.
    pub fn advance_to(&mut self, now: Millis) -> Output {
        let decisions = self.task.advance_to(now, self.topology, &self.tables);
        let mut out = self.dispatch_all(decisions);
        out.extend(self.settle(now));
        out
    }

    fn observe_status(&mut self, customer_id: &str, s: &MessageStatusChanged) {
        let Some(id) = &s.message_id else { return };
        let open = self
            .dispatch
            .get(customer_id)
            .is_some_and(|d| d.open.contains_key(id));
        if open {
            self.statuses
                .entry(id.clone())
                .or_insert_with(|| ObservedStatus {
                    provider_message_id: s.provider_message_id.clone(),
                    status: wire_name(&s.status),
                });
        }
    }

    /// Dispatches the approvals among `decisions`, and what policy decides on the refusals
    /// dispatch sends back, until nothing more comes back.
    fn dispatch_all(&mut self, decisions: Vec<Decision>) -> Output {
        let mut out = Output::default();
        let mut queue: VecDeque<Decision> = decisions.into();
        while let Some(d) = queue.pop_front() {
            let offset = self.log.len() as i64;
            self.log.push(d.clone());
            if let Outcome::MessageApproved(approved) = &d.outcome {
                let approved = approved.clone();
                for event in self.dispatch_one(&d, &approved, offset, &mut out) {
                    queue.extend(self.refusal_decided(&event));
                }
            }
            out.decisions.push(d);
        }
        out
    }

    /// What policy decides on a refusal dispatch sent back, read as the next record of the
    /// provider topic.
    fn refusal_decided(&mut self, event: &InputEvent) -> Vec<Decision> {
        self.refusals += 1;
        let input_ref = format!("provider/refusal/{}", self.refusals);
        self.task
            .decide(event, &input_ref, self.topology, &self.tables)
    }

    /// Plans, intends and calls one approval; returns the refusals policy must hear of.
    fn dispatch_one(
        &mut self,
        d: &Decision,
        approved: &MessageApproved,
        offset: i64,
        out: &mut Output,
    ) -> Vec<InputEvent> {
        let now = d.decided_at;
        let state = self
            .dispatch
            .get(&d.customer_id)
            .cloned()
            .unwrap_or_default();
        match dispatch::plan(&state, approved) {
            Plan::AwaitingOutcome => Vec::new(),
            Plan::AlreadySent {
                provider_message_id,
            } => {
                let skipped = DispatchStep::Skipped(DispatchSkipped {
                    first_provider_message_id: provider_message_id,
                });
                self.record(dispatch::record(d, approved, skipped, now), out);
                Vec::new()
            }
            Plan::Intend { attempt } => self.intend_and_call(d, approved, attempt, offset, out),
        }
    }

    fn intend_and_call(
        &mut self,
        d: &Decision,
        approved: &MessageApproved,
        attempt: i32,
        approval_offset: i64,
        out: &mut Output,
    ) -> Vec<InputEvent> {
        let now = d.decided_at.max(self.task.stream_time());
        let intended = DispatchStep::Intended(DispatchIntended {
            attempt,
            approval_offset,
            statuses_from: 0,
        });
        self.record(dispatch::record(d, approved, intended, now), out);
        if self.halted.contains_key(&approved.channel) {
            // The lane waits for someone to act; the intent stays open.
            return Vec::new();
        }
        if self.unreachable.contains(&d.customer_id) {
            let uncalled = dispatch::uncalled(d, approved, Uncallable::NoAddress, now);
            if let Some(why) = uncalled.dead_letter {
                out.dead_letters.push((approved.message_id.clone(), why));
            }
            self.record(uncalled.record, out);
            return Vec::new();
        }
        let mut tries = 0;
        let outcome = loop {
            tries += 1;
            let call = Call {
                approved,
                customer_id: &d.customer_id,
                attempt,
                try_number: tries,
            };
            let outcome = (self.answers)(&call);
            // Retries happen at once here: the driver has no pacer, and a fixed jitter keeps
            // the run deterministic.
            match dispatch::after_call(&outcome, tries, now, 0.5) {
                AfterCall::Retry { .. } => continue,
                AfterCall::Record => break outcome,
            }
        };
        let answered = dispatch::answer(d, approved, attempt, tries, outcome, now);
        if let Some(why) = answered.dead_letter {
            out.dead_letters.push((approved.message_id.clone(), why));
        }
        if let Some((channel, code)) = answered.halt {
            self.halted.insert(channel, code);
        }
        for rec in answered.records {
            self.record(rec, out);
        }
        answered.to_policy.into_iter().collect()
    }

    fn record(&mut self, rec: DispatchRecord, out: &mut Output) {
        let state = self.dispatch.entry(rec.customer_id.clone()).or_default();
        dispatch::evolve(state, &rec);
        if !state.open.contains_key(&rec.message_id) {
            self.statuses.remove(&rec.message_id);
        }
        out.steps.push(rec);
    }

    /// Settles open intents: by a status seen for them, or as not sent once the wait is over,
    /// in which case the approval is read again and a new attempt made.
    fn settle(&mut self, now: Millis) -> Output {
        let mut found = Vec::new();
        for (customer, state) in &self.dispatch {
            for (message, intent) in &state.open {
                if self.halted.contains_key(&intent.channel) {
                    continue;
                }
                let status = self.statuses.get(message);
                if let Some(s) = dispatch::settle(intent, status, now, self.settle_wait_ms) {
                    found.push((customer.clone(), message.clone(), intent.clone(), s));
                }
            }
        }
        let mut out = Output::default();
        let mut again = Vec::new();
        for (customer, message, intent, settlement) in found {
            let step = dispatch::settlement_step(&intent, &settlement, now);
            let rec = dispatch::step_record(
                &customer,
                &message,
                &intent.decision_id,
                &intent.template_name,
                intent.channel,
                step,
                now,
            );
            self.record(rec, &mut out);
            if let Settlement::NotSent { next_attempt } = settlement {
                again.push((intent.approval_offset, next_attempt));
            }
        }
        for (offset, attempt) in again {
            let Some(d) = usize::try_from(offset).ok().and_then(|i| self.log.get(i)) else {
                continue;
            };
            let Outcome::MessageApproved(approved) = &d.outcome else {
                continue;
            };
            let (mut d, approved) = (d.clone(), approved.clone());
            d.decided_at = now;
            for event in self.intend_and_call(&d, &approved, attempt, offset, &mut out) {
                let decisions = self.refusal_decided(&event);
                out.extend(self.dispatch_all(decisions));
            }
        }
        out
    }
}
