//! Scenario tests: each file in tests/scenarios/ gives events (and timer ticks) and the decisions
//! Herald must take, in order. `EventAccepted` is implied for every new event and not listed.
//! Every scenario also checks that folding its decisions rebuilds the live state exactly.

use herald::context::Ctx;
use herald::events::*;
use herald::pipeline;
use herald::state::CustomerState;
use herald::tables::Tables;
use herald::topology::Topology;
use serde::Deserialize;
use std::collections::BTreeMap;

const EPOCH: Millis = 1_793_491_200_000; // 2026-11-01T00:00:00Z

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Scenario {
    description: String,
    /// Stock levels (SKU -> units) the warehouse reports afresh at every step, unless a step
    /// reports that SKU otherwise; absent, the inventory table is empty (unknown stock).
    #[serde(default)]
    stock: BTreeMap<String, i32>,
    steps: Vec<Step>,
    expect: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    /// Hours after the scenario epoch.
    at_h: f64,
    /// Event id; absent for a timer tick.
    id: Option<String>,
    #[serde(default = "default_customer")]
    customer: String,
    fact: Option<Fact>,
    /// Stock levels (SKU -> units available) the warehouse reports at this step.
    stock: Option<BTreeMap<String, i32>>,
}

fn default_customer() -> String {
    "cust-1".into()
}

/// The scenario files name every decision but dedupe's acceptance and the journey bookkeeping.
fn summary(d: &Decision) -> Option<String> {
    match &d.outcome {
        Outcome::EventAccepted(_) | Outcome::JourneyEntered(_) | Outcome::JourneyAdvanced(_) => {
            None
        }
        other => Some(other.summary()),
    }
}

fn run(
    s: &Scenario,
    topology: &Topology,
) -> (Vec<String>, Vec<Decision>, BTreeMap<String, CustomerState>) {
    let mut states: BTreeMap<String, CustomerState> = BTreeMap::new();
    let mut all = Vec::new();
    let mut now = 0;
    let mut tables = Tables::default();
    let mut stock = s.stock.clone();
    for (i, step) in s.steps.iter().enumerate() {
        let at = EPOCH + (step.at_h * 3_600_000.0) as i64;
        now = now.max(at);
        let input_ref = format!("step/{i}");
        stock.extend(step.stock.clone().unwrap_or_default());
        for (sku, available) in &stock {
            tables.observe_stock(StockLevel {
                sku: sku.clone(),
                available: *available,
                updated_at: at,
                source_system: "scenario".into(),
            });
        }
        if let Some(f) = &step.fact {
            tables.observe(f, at);
        }
        let ctx = Ctx {
            now,
            topology,
            tables: &tables,
            input_ref: &input_ref,
        };
        let state = states.entry(step.customer.clone()).or_default();
        let ds = match (&step.id, &step.fact) {
            (Some(id), Some(fact)) => {
                let input = InputEvent {
                    envelope: Envelope {
                        event_id: id.clone(),
                        source_system: "scenario".into(),
                        source_sequence: None,
                        occurred_at: at,
                        customer_id: step.customer.clone(),
                        trace_parent: None,
                        schema_version: 1,
                    },
                    fact: fact.clone(),
                };
                pipeline::process(state, &input, &ctx)
            }
            (None, None) => pipeline::tick(state, &step.customer, &ctx),
            _ => panic!("a step has both id and fact, or neither (a tick)"),
        };
        all.extend(ds);
    }
    (all.iter().filter_map(summary).collect(), all, states)
}

#[test]
fn every_scenario_file_decides_as_expected() {
    let topology = herald::topology_files::load(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/topology"
    )))
    .expect("topology loads");
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/scenarios");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 8, "expected the scenario files in {dir}");
    let mut failures = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let s: Scenario =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let (got, decisions, states) = run(&s, &topology);
        if got != s.expect {
            // A status step names the message it is about; the ids approved help write one.
            let approved: Vec<String> = decisions
                .iter()
                .filter_map(|d| match &d.outcome {
                    Outcome::MessageApproved(m) => {
                        Some(format!("{} {}", m.template_name, m.message_id))
                    }
                    _ => None,
                })
                .collect();
            failures.push(format!(
                "{} ({})\n  expected {:?}\n  got      {:?}\n  approved {:?}",
                f.display(),
                s.description,
                s.expect,
                got,
                approved
            ));
        }
        // Replay gives the same state: the fold of a customer's decisions is their live state.
        for (customer, live) in &states {
            let rebuilt = pipeline::fold(decisions.iter().filter(|d| &d.customer_id == customer));
            if &rebuilt != live {
                failures.push(format!(
                    "{}: folding the decisions of {customer} does not rebuild the live state",
                    f.display()
                ));
            }
        }
        let mut ids: Vec<&str> = decisions.iter().map(|d| d.decision_id.as_str()).collect();
        ids.sort();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            failures.push(format!("{}: two decisions share an id", f.display()));
        }
        // The same input always gives the same decisions, ids included.
        let (_, again, _) = run(&s, &topology);
        if again != decisions {
            failures.push(format!("{}: a second run decided differently", f.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
