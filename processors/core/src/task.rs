//! A task: the customers of one partition and their shared stream time, deciding inputs in the
//! order they are given. Timers fire as stream time passes them, before the input that moved it,
//! so the decisions depend only on the order of the inputs and never on how they were batched.
//! The live processors, the offline replay and the property tests all decide through this.

use crate::context::Ctx;
use crate::events::{Decision, InputEvent, Millis};
use crate::pipeline;
use crate::state::{evolve, CustomerState};
use crate::tables::Tables;
use crate::topology::Topology;
use std::collections::{BTreeSet, HashMap};

/// One partition's customers, its stream time, and an index of when each customer's next timer
/// is due (so that passing a timer costs a lookup, not a scan of every customer).
#[derive(Debug, Default)]
pub struct Task {
    customers: HashMap<String, CustomerState>,
    stream_time: Millis,
    due: BTreeSet<(Millis, String)>,
    due_of: HashMap<String, Millis>,
}

impl Task {
    /// A task resumed from stored states and the stream time they were saved at.
    pub fn restored(customers: HashMap<String, CustomerState>, stream_time: Millis) -> Self {
        let mut t = Task {
            customers,
            stream_time,
            ..Task::default()
        };
        let ids: Vec<String> = t.customers.keys().cloned().collect();
        for c in ids {
            t.reindex(&c);
        }
        t
    }

    /// The largest event time this task has seen (or been advanced to).
    pub fn stream_time(&self) -> Millis {
        self.stream_time
    }

    /// The customers' states.
    pub fn customers(&self) -> &HashMap<String, CustomerState> {
        &self.customers
    }

    /// Takes the customers' states, leaving the task empty.
    pub fn into_customers(self) -> HashMap<String, CustomerState> {
        self.customers
    }

    /// Folds a decision read back from the log (restore); stream time follows its decided-at.
    pub fn fold(&mut self, d: &Decision) {
        self.stream_time = self.stream_time.max(d.decided_at);
        evolve(self.customers.entry(d.customer_id.clone()).or_default(), d);
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
        let state = self.customers.entry(customer.clone()).or_default();
        out.extend(pipeline::process(state, input, &ctx));
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
            self.stream_time = self.stream_time.max(at);
            let ctx = Ctx {
                now: self.stream_time,
                topology,
                tables,
                input_ref: "timer",
            };
            let decided = match self.customers.get_mut(&customer) {
                Some(state) => pipeline::tick(state, &customer, &ctx),
                None => Vec::new(),
            };
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

    fn reindex(&mut self, customer: &str) {
        let next = self.customers.get(customer).and_then(|s| s.next_timer());
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
}
