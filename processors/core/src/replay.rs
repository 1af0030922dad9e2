//! The offline backtest behind `herald replay`: recorded records (inputs, stock levels and the
//! decisions the live system took) run through a given policy with no Kafka, and the new
//! decisions compared with the recorded ones. Pure: files are read by the `dump` shell.
//!
//! Inputs are decided in the order the live processors decided them, as the recorded decision
//! log shows it (each input's dedupe decision marks its turn), so that a difference is the
//! policy's and not an accident of arrival order. Inputs the log does not show (none was
//! recorded, or the dump was taken mid-stream) follow in timestamp order.

use crate::events::{Decision, InputEvent, Millis, Outcome, Processor, StockLevel};
use crate::identity::{pseudonymise, IdentifierKey};
use crate::tables::Tables;
use crate::task::Task;
use crate::topology::Topology;
use serde::Serialize;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};

/// What a dumped record holds, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Input(InputEvent),
    Decision(Decision),
    Stock(StockLevel),
    /// The record could not be read; the reason is kept.
    Undecodable(String),
}

/// One record of a topic dump: where it sat in the log and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct DumpedRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The record's Kafka timestamp, when the dump has it.
    pub timestamp: Option<Millis>,
    pub key: Option<String>,
    pub payload: Payload,
}

/// A record the live processors would have dead-lettered, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    pub at: String,
    pub reason: String,
}

/// The decisions a replay took, and the inputs it could not decide.
#[derive(Debug, Default)]
pub struct Replayed {
    pub inputs: usize,
    pub decisions: Vec<Decision>,
    pub dead_letters: Vec<DeadLetter>,
    /// Inputs decided in the recorded order; the rest followed in timestamp order.
    pub in_recorded_order: usize,
}

enum Step {
    Input(usize),
    /// Stream time the live task reached here (a timer fired), possibly by a wall-clock tick.
    Advance(Millis),
}

impl Step {
    fn time(&self, inputs: &[(&DumpedRecord, &InputEvent)]) -> Millis {
        match self {
            Step::Input(i) => inputs[*i].1.envelope.occurred_at,
            Step::Advance(t) => *t,
        }
    }
}

/// Runs the dump's inputs through `topology`'s policy and journeys.
/// Identifiers in the dump's inputs are hashed under `key`, as the live processors hash them.
pub fn replay(records: &[DumpedRecord], topology: &Topology, key: &IdentifierKey) -> Replayed {
    let mut out = Replayed::default();
    let mut tables = Tables::default();
    // The live task reads the inventory topic whole, as of the wall clock: so does the replay,
    // with every level in the dump, latest last.
    let mut stock: Vec<&DumpedRecord> = records
        .iter()
        .filter(|r| matches!(r.payload, Payload::Stock(_)))
        .collect();
    stock.sort_by_key(|r| (r.partition, r.offset));
    for r in stock {
        if let Payload::Stock(level) = &r.payload {
            tables.observe_stock(level.clone());
        }
    }

    let mut inputs: Vec<(&DumpedRecord, &InputEvent)> = Vec::new();
    for r in records {
        let at = format!("{}/{}/{}", r.topic, r.partition, r.offset);
        match &r.payload {
            Payload::Input(e) if r.key.as_deref() != Some(e.envelope.customer_id.as_str()) => {
                out.dead_letters.push(DeadLetter {
                    at,
                    reason: format!(
                        "record key does not match envelope.customer_id '{}'",
                        e.envelope.customer_id
                    ),
                })
            }
            Payload::Input(e) => inputs.push((r, e)),
            Payload::Undecodable(why) if topology.names.family_of(&r.topic).is_some() => {
                out.dead_letters.push(DeadLetter {
                    at,
                    reason: why.clone(),
                })
            }
            _ => {}
        }
    }
    out.inputs = inputs.len();
    let mut recorded: BTreeMap<i32, Vec<(&DumpedRecord, &Decision)>> = BTreeMap::new();
    for r in records {
        if let Payload::Decision(d) = &r.payload {
            recorded.entry(r.partition).or_default().push((r, d));
        }
    }

    // Each partition's steps: the recorded order first, then what the log does not show.
    let arrival = |i: &usize| {
        let (r, e) = inputs[*i];
        (
            r.timestamp.unwrap_or(e.envelope.occurred_at),
            r.topic.clone(),
            r.offset,
        )
    };
    let mut by_partition: BTreeMap<i32, Vec<usize>> = BTreeMap::new();
    for (i, (r, _)) in inputs.iter().enumerate() {
        by_partition.entry(r.partition).or_default().push(i);
    }
    let mut steps: BTreeMap<i32, VecDeque<Step>> = BTreeMap::new();
    for (p, mut idx) in by_partition {
        idx.sort_by_key(arrival);
        let mut waiting: HashMap<&str, VecDeque<usize>> = HashMap::new();
        for &i in &idx {
            waiting
                .entry(inputs[i].1.envelope.event_id.as_str())
                .or_default()
                .push_back(i);
        }
        let mut seq = VecDeque::new();
        let mut taken = vec![false; inputs.len()];
        let mut log = recorded.remove(&p).unwrap_or_default();
        log.sort_by_key(|(r, _)| r.offset);
        for (_, d) in log {
            if d.input_event_id.starts_with("timer:") {
                seq.push_back(Step::Advance(d.decided_at));
            } else if d.processor == Processor::Dedupe {
                if let Some(i) = waiting
                    .get_mut(d.input_event_id.as_str())
                    .and_then(|q| q.pop_front())
                {
                    taken[i] = true;
                    out.in_recorded_order += 1;
                    seq.push_back(Step::Input(i));
                }
            }
        }
        seq.extend(idx.into_iter().filter(|i| !taken[*i]).map(Step::Input));
        steps.insert(p, seq);
    }

    // Partitions interleave by time, so that a template status change read on one partition
    // reaches the others about when it did live.
    let mut tasks: HashMap<i32, Task> = HashMap::new();
    let mut heads: BinaryHeap<std::cmp::Reverse<(Millis, i32)>> = steps
        .iter()
        .filter_map(|(p, s)| s.front().map(|f| std::cmp::Reverse((f.time(&inputs), *p))))
        .collect();
    while let Some(std::cmp::Reverse((_, p))) = heads.pop() {
        let Some(seq) = steps.get_mut(&p) else {
            continue;
        };
        let Some(step) = seq.pop_front() else {
            continue;
        };
        let task = tasks.entry(p).or_default();
        match step {
            Step::Input(i) => {
                let (r, e) = inputs[i];
                tables.observe(&e.fact, e.envelope.occurred_at);
                let input_ref = format!("{}/{}/{}", r.topic, r.partition, r.offset);
                let e = pseudonymise(key, e.clone());
                out.decisions
                    .extend(task.decide(&e, &input_ref, topology, &tables));
            }
            Step::Advance(t) => out.decisions.extend(task.advance_to(t, topology, &tables)),
        }
        if let Some(next) = seq.front() {
            heads.push(std::cmp::Reverse((next.time(&inputs), p)));
        }
    }
    out
}

/// Recorded and replayed counts of one decision label.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Count {
    pub recorded: u64,
    pub replayed: u64,
}

/// Where one customer's decisions first part ways.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FirstDifference {
    pub customer_id: String,
    /// Decisions equal before this one.
    pub position: usize,
    pub input_event_id: String,
    pub recorded: Option<String>,
    pub replayed: Option<String>,
}

/// How a replay's decisions differ from the recorded ones.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Comparison {
    pub recorded_decisions: u64,
    pub replayed_decisions: u64,
    pub customers: u64,
    pub customers_differing: u64,
    /// Counts by label (`MessageSuppressed:FrequencyCap`), every label either side has.
    pub by_label: BTreeMap<String, Count>,
    /// The first difference of the first customers that differ, by customer id.
    pub first_differences: Vec<FirstDifference>,
}

impl Comparison {
    /// Labels whose counts differ.
    pub fn changed_labels(&self) -> impl Iterator<Item = (&String, &Count)> {
        self.by_label
            .iter()
            .filter(|(_, c)| c.recorded != c.replayed)
    }
}

/// What makes two decisions the same decision: what was decided, about which input, by which
/// processor. Ids, time and policy version are left out; a changed policy changes them all.
fn same(a: &Decision, b: &Decision) -> bool {
    a.input_event_id == b.input_event_id && a.processor == b.processor && a.outcome == b.outcome
}

fn describe(d: &Decision) -> String {
    format!("{} (input {})", d.outcome.summary(), d.input_event_id)
}

/// Compares decisions customer by customer, in each customer's order; keeps the first
/// difference of at most `show` customers.
pub fn compare(recorded: &[Decision], replayed: &[Decision], show: usize) -> Comparison {
    let mut c = Comparison {
        recorded_decisions: recorded.len() as u64,
        replayed_decisions: replayed.len() as u64,
        ..Comparison::default()
    };
    let mut per: BTreeMap<&str, (Vec<&Decision>, Vec<&Decision>)> = BTreeMap::new();
    for d in recorded {
        c.by_label.entry(d.outcome.label()).or_default().recorded += 1;
        per.entry(&d.customer_id).or_default().0.push(d);
    }
    for d in replayed {
        c.by_label.entry(d.outcome.label()).or_default().replayed += 1;
        per.entry(&d.customer_id).or_default().1.push(d);
    }
    c.customers = per.len() as u64;
    for (customer, (was, now)) in per {
        let position = was.iter().zip(&now).take_while(|(a, b)| same(a, b)).count();
        if position == was.len() && position == now.len() {
            continue;
        }
        c.customers_differing += 1;
        if c.first_differences.len() < show {
            let (r, n) = (was.get(position), now.get(position));
            c.first_differences.push(FirstDifference {
                customer_id: customer.to_string(),
                position,
                input_event_id: r
                    .or(n)
                    .map(|d| d.input_event_id.clone())
                    .unwrap_or_default(),
                recorded: r.map(|d| describe(d)),
                replayed: n.map(|d| describe(d)),
            });
        }
    }
    c
}

/// Everything `herald replay` reports, as its `--json` line.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub policy_version: String,
    pub inputs: usize,
    pub inputs_in_recorded_order: usize,
    pub dead_letters: usize,
    pub sends_recorded: u64,
    pub sends_replayed: u64,
    #[serde(flatten)]
    pub comparison: Comparison,
}

impl Report {
    /// The report of a replay against the decisions recorded in the same dump.
    pub fn new(policy_version: &str, recorded: &[Decision], r: &Replayed, show: usize) -> Self {
        let sends = |ds: &[Decision]| ds.iter().filter(|d| is_send(&d.outcome)).count() as u64;
        Report {
            policy_version: policy_version.to_string(),
            inputs: r.inputs,
            inputs_in_recorded_order: r.in_recorded_order,
            dead_letters: r.dead_letters.len(),
            sends_recorded: sends(recorded),
            sends_replayed: sends(&r.decisions),
            comparison: compare(recorded, &r.decisions, show),
        }
    }

    /// Whether the replay decided anything differently from the recording.
    pub fn differs(&self) -> bool {
        self.comparison.customers_differing > 0
    }

    /// The readable report: totals, counts that changed, and each customer's first difference.
    pub fn render(&self, all_labels: bool) -> String {
        let c = &self.comparison;
        let mut s = format!(
            "replayed {} inputs ({} in the recorded order) under policy {}; {} dead letters\n",
            self.inputs, self.inputs_in_recorded_order, self.policy_version, self.dead_letters
        );
        if c.recorded_decisions == 0 {
            s += "the dump holds no recorded decisions: counts below are the replay's alone\n";
        }
        s += &format!(
            "decisions: recorded {}, replayed {}; sends: recorded {}, replayed {}\n\
             customers: {}, of whom {} decided differently\n\n",
            c.recorded_decisions,
            c.replayed_decisions,
            self.sends_recorded,
            self.sends_replayed,
            c.customers,
            c.customers_differing
        );
        let rows: Vec<(&String, &Count)> = if all_labels {
            c.by_label.iter().collect()
        } else {
            c.changed_labels().collect()
        };
        if rows.is_empty() {
            s += "no decision count changed\n";
        } else {
            s += &format!(
                "{:<44} {:>10} {:>10} {:>8}\n",
                "decision", "recorded", "replayed", "change"
            );
            for (label, n) in rows {
                s += &format!(
                    "{label:<44} {:>10} {:>10} {:>+8}\n",
                    n.recorded,
                    n.replayed,
                    n.replayed as i64 - n.recorded as i64
                );
            }
        }
        if !c.first_differences.is_empty() {
            s += &format!(
                "\nfirst differences ({} of {} customers):\n",
                c.first_differences.len(),
                c.customers_differing
            );
            for f in &c.first_differences {
                s += &format!(
                    "  {} after {} equal decisions:\n    recorded  {}\n    replayed  {}\n",
                    f.customer_id,
                    f.position,
                    f.recorded.as_deref().unwrap_or("(nothing)"),
                    f.replayed.as_deref().unwrap_or("(nothing)")
                );
            }
        }
        s
    }
}

/// Whether the outcome is a message that would go out.
pub fn is_send(o: &Outcome) -> bool {
    matches!(o, Outcome::MessageApproved(_))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> IdentifierKey {
        IdentifierKey::demo()
    }
    use crate::events::*;

    const HOUR: Millis = 3_600_000;
    const T0: Millis = 1_772_445_600_000;

    fn fact(v: serde_json::Value) -> Fact {
        serde_json::from_value(v).unwrap()
    }

    fn record(
        topic: &str,
        offset: i64,
        customer: &str,
        id: &str,
        at: Millis,
        f: Fact,
    ) -> DumpedRecord {
        DumpedRecord {
            topic: topic.into(),
            partition: 0,
            offset,
            timestamp: Some(at),
            key: Some(customer.into()),
            payload: Payload::Input(InputEvent::new("test", customer, id, at, f)),
        }
    }

    /// A customer with WhatsApp consent for both purposes who places an order.
    fn month() -> Vec<DumpedRecord> {
        vec![
            record(
                "crm.events.v1",
                0,
                "c-1",
                "p",
                T0,
                fact(
                    serde_json::json!({"type": "ProfileChanged", "first_name": "Ana", "locale": "en_US", "time_zone": "America/New_York", "phone_e164": "+15550100001"}),
                ),
            ),
            record(
                "crm.events.v1",
                1,
                "c-1",
                "ct",
                T0,
                fact(
                    serde_json::json!({"type": "ConsentGranted", "purpose": "TRANSACTIONAL", "channel": "WHATSAPP", "source": "checkout", "artifact_id": "f-1"}),
                ),
            ),
            record(
                "oms.events.v1",
                0,
                "c-1",
                "o",
                T0 + HOUR,
                fact(
                    serde_json::json!({"type": "OrderPlaced", "order_id": "o-1", "items": [{"sku": "HG-LIN-THROW", "name": "Linen throw", "quantity": 1, "unit_price": {"amount": "89.00", "currency": "EUR"}}], "total": {"amount": "89.00", "currency": "EUR"}}),
                ),
            ),
        ]
    }

    fn with_log(mut records: Vec<DumpedRecord>, log: &[Decision]) -> Vec<DumpedRecord> {
        for (i, d) in log.iter().enumerate() {
            records.push(DumpedRecord {
                topic: "herald.decisions.v1".into(),
                partition: 0,
                offset: i as i64,
                timestamp: None,
                key: Some(d.customer_id.clone()),
                payload: Payload::Decision(d.clone()),
            });
        }
        records
    }

    #[test]
    fn the_same_policy_reproduces_the_recorded_decisions() {
        let topology = Topology::embedded().unwrap();
        let first = replay(&month(), &topology, &key());
        assert!(first.decisions.iter().any(|d| is_send(&d.outcome)));
        let again = replay(&with_log(month(), &first.decisions), &topology, &key());
        assert_eq!(again.in_recorded_order, 3);
        let c = compare(&first.decisions, &again.decisions, 10);
        assert_eq!(c.customers_differing, 0, "{c:?}");
        assert_eq!(c.changed_labels().count(), 0);
    }

    #[test]
    fn a_revoked_consent_shows_as_the_first_difference() {
        let topology = Topology::embedded().unwrap();
        let recorded = replay(&month(), &topology, &key()).decisions;
        // The same month, with the consent no longer granted: the confirmation is suppressed.
        let mut changed = month();
        changed.remove(1);
        let now = replay(&with_log(changed, &recorded), &topology, &key());
        let c = compare(&recorded, &now.decisions, 10);
        assert_eq!(c.customers_differing, 1);
        let first = &c.first_differences[0];
        assert_eq!(first.customer_id, "c-1");
        assert!(
            first
                .recorded
                .as_deref()
                .unwrap_or("")
                .contains("EventAccepted"),
            "{first:?}"
        );
        let approved = c
            .by_label
            .get("MessageApproved:Whatsapp")
            .cloned()
            .unwrap_or_default();
        assert!(approved.recorded > approved.replayed, "{c:?}");
    }

    #[test]
    fn a_record_keyed_by_someone_else_is_a_dead_letter() {
        let topology = Topology::embedded().unwrap();
        let mut records = month();
        records[2].key = Some("c-2".into());
        let r = replay(&records, &topology, &key());
        assert_eq!(r.dead_letters.len(), 1);
        assert!(r.dead_letters[0].reason.contains("does not match"));
        assert!(!r.decisions.iter().any(|d| is_send(&d.outcome)));
    }
}
