//! A task: the customers of one partition and their shared stream time, deciding inputs in the
//! order they are given. Timers fire as stream time passes them, before the input that moved it,
//! so the decisions depend only on the order of the inputs and never on how they were batched.
//! The live processors, the offline replay and the property tests all decide through this.
//!
//! A task need not hold every customer: the live processors keep a bounded cache and load a
//! customer from the store when it is `wanted`. The timers of customers not in memory stay in
//! the index, so a cold customer's hold still expires on time once the shell loads it.

use crate::context::Ctx;
use crate::events::{Decision, InputEvent, Millis};
use crate::pipeline;
use crate::state::{evolve, CustomerState};
use crate::tables::Tables;
use crate::topology::Topology;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// One partition's customers in memory, its stream time, and an index of when each customer's
/// next timer is due, in memory or not (so that passing a timer costs a lookup, not a scan).
#[derive(Debug, Default)]
pub struct Task {
    /// Shared, so that a checkpoint takes them without copying: a state still being saved is
    /// copied only when its customer is decided for again meanwhile (`Arc::make_mut`).
    customers: HashMap<String, Arc<CustomerState>>,
    stream_time: Millis,
    due: BTreeSet<(Millis, String)>,
    due_of: HashMap<String, Millis>,
    /// When each customer in memory was last decided for, on a counter of uses: the customers
    /// used longest ago leave memory first.
    last_used: HashMap<String, u64>,
    uses: u64,
}

impl Task {
    /// A task resumed from stored states and the stream time they were saved at.
    pub fn restored(customers: HashMap<String, CustomerState>, stream_time: Millis) -> Self {
        let mut t = Task {
            customers: customers
                .into_iter()
                .map(|(c, s)| (c, Arc::new(s)))
                .collect(),
            stream_time,
            ..Task::default()
        };
        let ids: Vec<String> = t.customers.keys().cloned().collect();
        for c in ids {
            t.reindex(&c);
        }
        t
    }

    /// A task resumed with no customer in memory: its stream time, and when each customer's
    /// next timer is due as saved with their states.
    pub fn resumed(
        stream_time: Millis,
        timers: impl IntoIterator<Item = (String, Millis)>,
    ) -> Self {
        let mut t = Task {
            stream_time,
            ..Task::default()
        };
        for (customer, at) in timers {
            t.due.insert((at, customer.clone()));
            t.due_of.insert(customer, at);
        }
        t
    }

    /// Whether a customer's state is in memory.
    pub fn is_resident(&self, customer: &str) -> bool {
        self.customers.contains_key(customer)
    }

    /// Takes a customer's state into memory, as loaded from the store (or a new customer's
    /// empty state). A customer already in memory keeps the state it has: it is newer than
    /// anything stored.
    pub fn admit(&mut self, customer: String, state: CustomerState) {
        if self.customers.contains_key(&customer) {
            return;
        }
        self.customers.insert(customer.clone(), Arc::new(state));
        self.touch(&customer);
        self.reindex(&customer);
    }

    /// The customers not in memory that deciding `input` needs: its own customer, and every
    /// customer whose timer the input's time passes.
    pub fn wanted(&self, input: &InputEvent) -> Vec<String> {
        let until = if input.fact.moves_stream_time() {
            input.envelope.occurred_at
        } else {
            self.stream_time
        };
        let mut out = self.wanted_until(until);
        let customer = &input.envelope.customer_id;
        if !self.is_resident(customer) && !out.contains(customer) {
            out.push(customer.clone());
        }
        out
    }

    /// The customers not in memory whose timers fall due by `now` (or by the stream time).
    pub fn wanted_until(&self, now: Millis) -> Vec<String> {
        let until = now.max(self.stream_time);
        self.due
            .iter()
            .take_while(|(at, _)| *at <= until)
            .filter(|(_, c)| !self.is_resident(c))
            .map(|(_, c)| c.clone())
            .collect()
    }

    /// How many customers are in memory.
    pub fn resident(&self) -> usize {
        self.customers.len()
    }

    /// Lets the customers used longest ago leave memory until at most `keep` remain, sparing
    /// those `pinned` (changed and not yet saved); returns how many left. Their timers stay in
    /// the index.
    pub fn evict(&mut self, keep: usize, pinned: impl Fn(&str) -> bool) -> usize {
        let excess = self.customers.len().saturating_sub(keep);
        if excess == 0 {
            return 0;
        }
        let mut cold: Vec<(u64, &String)> = self
            .customers
            .keys()
            .filter(|c| !pinned(c))
            .map(|c| (self.last_used.get(c).copied().unwrap_or(0), c))
            .collect();
        let n = excess.min(cold.len());
        if n == 0 {
            return 0;
        }
        if n < cold.len() {
            cold.select_nth_unstable(n - 1);
        }
        let leaving: Vec<String> = cold[..n].iter().map(|(_, c)| (*c).clone()).collect();
        for c in &leaving {
            self.customers.remove(c);
            self.last_used.remove(c);
        }
        n
    }

    /// The largest event time this task has seen (or been advanced to).
    pub fn stream_time(&self) -> Millis {
        self.stream_time
    }

    /// The customers' states.
    pub fn customers(&self) -> &HashMap<String, Arc<CustomerState>> {
        &self.customers
    }

    /// Takes the customers' states, leaving the task empty.
    pub fn into_customers(self) -> HashMap<String, CustomerState> {
        self.customers
            .into_iter()
            .map(|(c, s)| (c, Arc::unwrap_or_clone(s)))
            .collect()
    }

    /// Folds a decision read back from the log (restore); stream time follows its decided-at.
    pub fn fold(&mut self, d: &Decision) {
        self.stream_time = self.stream_time.max(d.decided_at);
        evolve(
            Arc::make_mut(self.customers.entry(d.customer_id.clone()).or_default()),
            d,
        );
        self.touch(&d.customer_id);
        self.reindex(&d.customer_id.clone());
    }

    /// Decides one input: timers its time has passed fire first, then the input, then any timer
    /// the input itself made due at once.
    pub fn decide(
        &mut self,
        input: &InputEvent,
        input_ref: &str,
        topology: &Topology,
        tables: &Tables,
    ) -> Vec<Decision> {
        let until = if input.fact.moves_stream_time() {
            input.envelope.occurred_at
        } else {
            self.stream_time
        };
        let mut out = self.advance_to(until, topology, tables);
        let customer = input.envelope.customer_id.clone();
        let ctx = Ctx {
            now: self.stream_time,
            topology,
            tables,
            input_ref,
        };
        let state = Arc::make_mut(self.customers.entry(customer.clone()).or_default());
        pipeline::process_into(state, input, &ctx, &mut out);
        self.touch(&customer);
        self.reindex(&customer);
        out.extend(self.advance_to(self.stream_time, topology, tables));
        out
    }

    /// Moves stream time forward to `now` (never back), firing each timer it passes at the
    /// instant it was due, in due order: a nudge due at 10:00 is decided as of 10:00 even when
    /// the next record is from 14:00. The shell's wall-clock tick calls this for quiet partitions.
    pub fn advance_to(
        &mut self,
        now: Millis,
        topology: &Topology,
        tables: &Tables,
    ) -> Vec<Decision> {
        let mut out = Vec::new();
        // Customers are taken in due order, then by id, so the order of timer decisions is
        // the same on every run.
        while let Some((at, customer)) = self.due.first().cloned() {
            if at > now.max(self.stream_time) {
                break;
            }
            // The shell loads every customer `wanted_until` names before advancing. Were one
            // missing, deciding its timer on an empty state could send what its real state
            // forbids: the timer waits, and so does stream time.
            let resident = self.customers.contains_key(&customer);
            debug_assert!(resident, "timer of {customer} due while not in memory");
            if !resident {
                return out;
            }
            self.stream_time = self.stream_time.max(at);
            let ctx = Ctx {
                now: self.stream_time,
                topology,
                tables,
                input_ref: "timer",
            };
            let decided = match self.customers.get_mut(&customer) {
                Some(state) => pipeline::tick(Arc::make_mut(state), &customer, &ctx),
                None => Vec::new(),
            };
            self.touch(&customer);
            let before = self.due_of.get(&customer).copied();
            self.reindex(&customer);
            // A timer that fires but stays due would spin; the core guarantees progress, and
            // this guard keeps a broken guarantee from hanging the task.
            if decided.is_empty() && self.due_of.get(&customer).copied() == before {
                self.due.remove(&(at, customer.clone()));
                self.due_of.remove(&customer);
            }
            out.extend(decided);
        }
        self.stream_time = self.stream_time.max(now);
        out
    }

    /// When the earliest timer of any customer is due, if one is set.
    pub fn next_timer(&self) -> Option<Millis> {
        self.due.first().map(|(t, _)| *t)
    }

    fn touch(&mut self, customer: &str) {
        self.uses += 1;
        match self.last_used.get_mut(customer) {
            Some(u) => *u = self.uses,
            None => {
                self.last_used.insert(customer.to_string(), self.uses);
            }
        }
    }

    /// Indexes a customer in memory by its next timer; one not in memory keeps its entry.
    fn reindex(&mut self, customer: &str) {
        let Some(state) = self.customers.get(customer) else {
            return;
        };
        let next = state.next_timer();
        let old = self.due_of.get(customer).copied();
        if old == next {
            return;
        }
        if let Some(t) = old {
            self.due.remove(&(t, customer.to_string()));
            self.due_of.remove(customer);
        }
        if let Some(t) = next {
            self.due.insert((t, customer.to_string()));
            self.due_of.insert(customer.to_string(), t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::*;

    const HOUR: Millis = 3_600_000;
    // 2026-03-02T10:00:00Z, a Monday, inside every configured send window.
    const T0: Millis = 1_772_445_600_000;

    fn input(customer: &str, id: &str, at: Millis, fact: Fact) -> InputEvent {
        InputEvent::new("test", customer, id, at, fact)
    }

    fn fact(v: serde_json::Value) -> Fact {
        serde_json::from_value(v).unwrap()
    }

    /// A paid-for order whose shipment is reported before payment: held, expiring 48 h later.
    fn held_shipment(customer: &str, id: &str, at: Millis) -> Vec<InputEvent> {
        let order = format!("{id}-ord");
        vec![
            input(
                customer,
                &format!("{id}-p"),
                at,
                fact(
                    serde_json::json!({"type": "ProfileChanged", "first_name": "Ana", "locale": "en_US", "time_zone": "America/New_York", "phone_e164": "+15550100001"}),
                ),
            ),
            input(
                customer,
                &format!("{id}-o"),
                at,
                fact(
                    serde_json::json!({"type": "OrderPlaced", "order_id": order, "items": [], "total": null}),
                ),
            ),
            input(
                customer,
                id,
                at + HOUR,
                fact(
                    serde_json::json!({"type": "ShipmentDispatched", "order_id": order, "shipment_id": "s", "carrier": "DHL", "tracking_url": null, "skus": [], "estimated_delivery": null}),
                ),
            ),
        ]
    }

    fn kinds(ds: &[Decision]) -> Vec<String> {
        ds.iter()
            .filter(|d| d.processor != Processor::Dedupe)
            .map(|d| d.outcome.kind().to_string())
            .collect()
    }

    #[test]
    fn a_timer_fires_when_another_customers_input_passes_it() {
        let topology = Topology::embedded().unwrap();
        let tables = Tables::default();
        let mut task = Task::default();
        for e in held_shipment("c-1", "e-1", T0) {
            task.decide(&e, "t/0/0", &topology, &tables);
        }
        let due = task.next_timer().expect("the held shipment set a timer");
        assert!(due > T0);
        let later = input(
            "c-2",
            "e-9",
            due + HOUR,
            fact(
                serde_json::json!({"type": "ProfileChanged", "first_name": null, "locale": null, "time_zone": null, "phone_e164": null}),
            ),
        );
        let ds = task.decide(&later, "t/0/9", &topology, &tables);
        // c-1's timer decisions come before c-2's own dedupe decision.
        let first_c2 = ds.iter().position(|d| d.customer_id == "c-2").unwrap();
        assert!(first_c2 > 0, "{:?}", kinds(&ds));
        assert!(ds[..first_c2].iter().all(|d| d.customer_id == "c-1"));
        assert!(kinds(&ds[..first_c2]).contains(&"HoldExpired".to_string()));
    }

    #[test]
    fn a_provider_status_does_not_move_stream_time() {
        let topology = Topology::embedded().unwrap();
        let tables = Tables::default();
        let mut task = Task::default();
        for e in held_shipment("c-1", "e-1", T0) {
            task.decide(&e, "t/0/0", &topology, &tables);
        }
        let before = task.stream_time();
        let due = task.next_timer().unwrap();
        // A status stamped by the provider's clock, weeks after the business timeline.
        let status = input(
            "c-1",
            "s-1",
            due + 500 * HOUR,
            fact(
                serde_json::json!({"type": "MessageStatusChanged", "provider_message_id": "wamid.1", "status": "DELIVERED", "error_code": null, "message_id": "m-1"}),
            ),
        );
        let ds = task.decide(&status, "t/0/5", &topology, &tables);
        assert_eq!(task.stream_time(), before);
        assert!(
            !kinds(&ds).contains(&"HoldExpired".to_string()),
            "{:?}",
            kinds(&ds)
        );
        assert_eq!(task.next_timer(), Some(due));
    }

    #[test]
    fn a_tick_before_an_input_does_not_change_decisions() {
        let topology = Topology::embedded().unwrap();
        let tables = Tables::default();
        let mut inputs = held_shipment("c-1", "e-1", T0);
        inputs.extend(held_shipment("c-2", "e-2", T0 + 30 * HOUR));
        inputs.extend(held_shipment("c-3", "e-3", T0 + 80 * HOUR));
        inputs.extend(held_shipment("c-4", "e-4", T0 + 200 * HOUR));
        let mut one = Task::default();
        let a: Vec<Decision> = inputs
            .iter()
            .enumerate()
            .flat_map(|(i, e)| one.decide(e, &format!("t/0/{i}"), &topology, &tables))
            .collect();
        // The same inputs, with a wall-clock tick reaching each input's time just before it:
        // the timers fire in the tick's batch instead, with the same decisions.
        let mut two = Task::default();
        let mut b = Vec::new();
        for (i, e) in inputs.iter().enumerate() {
            b.extend(two.advance_to(e.envelope.occurred_at, &topology, &tables));
            b.extend(two.decide(e, &format!("t/0/{i}"), &topology, &tables));
        }
        assert!(a.iter().any(|d| d.outcome.kind() == "HoldExpired"));
        assert_eq!(a, b);
    }

    #[test]
    fn a_tick_fires_a_due_step_on_a_quiet_partition_and_restore_keeps_it() {
        let topology = Topology::embedded().unwrap();
        let tables = Tables::default();
        let mut task = Task::default();
        let mut log = Vec::new();
        for e in held_shipment("c-1", "e-1", T0) {
            log.extend(task.decide(&e, "t/0/0", &topology, &tables));
        }
        let due = task.next_timer().unwrap();
        assert!(task.advance_to(due - 1, &topology, &tables).is_empty());
        let mut restored = Task::default();
        log.iter().for_each(|d| restored.fold(d));
        assert_eq!(restored.next_timer(), Some(due));
        let fired = restored.advance_to(due, &topology, &tables);
        assert!(
            kinds(&fired).iter().any(|k| k == "HoldExpired"),
            "{:?}",
            kinds(&fired)
        );
        assert!(restored.next_timer().is_none_or(|t| t > due));
    }

    /// Decides `inputs` on a task that keeps at most one customer in memory, saving every
    /// customer to `store` before they may leave and loading them from it when wanted.
    fn decide_with_one_in_memory(
        inputs: &[InputEvent],
        topology: &Topology,
        tables: &Tables,
    ) -> (Vec<Decision>, usize) {
        let mut store: HashMap<String, CustomerState> = HashMap::new();
        let mut task = Task::default();
        let mut out = Vec::new();
        let mut evicted = 0;
        for (i, e) in inputs.iter().enumerate() {
            for c in task.wanted(e) {
                let state = store.get(&c).cloned().unwrap_or_default();
                task.admit(c, state);
            }
            out.extend(task.decide(e, &format!("t/0/{i}"), topology, tables));
            store.extend(
                task.customers()
                    .iter()
                    .map(|(c, s)| (c.clone(), s.as_ref().clone())),
            );
            evicted += task.evict(1, |_| false);
        }
        (out, evicted)
    }

    #[test]
    fn customers_out_of_memory_are_decided_as_if_they_never_left() {
        let topology = Topology::embedded().unwrap();
        let tables = Tables::default();
        // Four customers interleaved, each with a shipment held until it expires, so timers of
        // customers not in memory fall due while another customer's input is decided.
        let mut inputs = Vec::new();
        let each: Vec<Vec<InputEvent>> = (1..=4)
            .map(|i| held_shipment(&format!("c-{i}"), &format!("e-{i}"), T0 + i * 20 * HOUR))
            .collect();
        for step in 0..3 {
            for customer in &each {
                inputs.push(customer[step].clone());
            }
        }
        inputs.push(input(
            "c-5",
            "e-late",
            T0 + 400 * HOUR,
            fact(
                serde_json::json!({"type": "ProfileChanged", "first_name": null, "locale": null, "time_zone": null, "phone_e164": null}),
            ),
        ));
        let mut all = Task::default();
        let expected: Vec<Decision> = inputs
            .iter()
            .enumerate()
            .flat_map(|(i, e)| all.decide(e, &format!("t/0/{i}"), &topology, &tables))
            .collect();
        let (decided, evicted) = decide_with_one_in_memory(&inputs, &topology, &tables);
        assert!(evicted > 0);
        assert_eq!(
            kinds(&expected)
                .iter()
                .filter(|k| *k == "HoldExpired")
                .count(),
            4
        );
        assert_eq!(decided, expected);
    }

    #[test]
    fn a_timer_of_a_customer_not_in_memory_is_wanted_when_due() {
        let topology = Topology::embedded().unwrap();
        let tables = Tables::default();
        let mut task = Task::default();
        for e in held_shipment("c-1", "e-1", T0) {
            task.decide(&e, "t/0/0", &topology, &tables);
        }
        let due = task.next_timer().unwrap();
        let stored = task.customers()["c-1"].as_ref().clone();
        assert_eq!(task.evict(0, |_| false), 1);
        assert!(!task.is_resident("c-1"));
        assert_eq!(task.next_timer(), Some(due), "the timer stays indexed");
        let profile = |at| {
            input(
                "c-2",
                "e-2",
                at,
                fact(
                    serde_json::json!({"type": "ProfileChanged", "first_name": null, "locale": null, "time_zone": null, "phone_e164": null}),
                ),
            )
        };
        assert_eq!(task.wanted(&profile(due - 1)), vec!["c-2".to_string()]);
        assert_eq!(
            task.wanted(&profile(due)),
            vec!["c-1".to_string(), "c-2".to_string()]
        );
        assert_eq!(task.wanted_until(due), vec!["c-1".to_string()]);
        // A customer in memory keeps its state when the store offers an older one.
        task.admit("c-1".to_string(), stored.clone());
        task.admit("c-1".to_string(), CustomerState::default());
        assert_eq!(*task.customers()["c-1"], stored);
        assert_eq!(task.evict(0, |_| false), 1);
        // A customer changed and not yet saved is never let go.
        task.admit("c-2".to_string(), CustomerState::default());
        assert_eq!(task.evict(0, |c| c == "c-2"), 0);
        assert!(task.is_resident("c-2"));
    }
}
