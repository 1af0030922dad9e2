//! Scenario tests: each file in tests/scenarios/ gives events (and timer ticks) and the decisions
//! Herald must take, in order. `EventAccepted` is implied for every new event and not listed.
//! Every scenario also checks that folding its decisions rebuilds the live state exactly.
//!
//! The files run through `herald::driver`, every processor in memory, dispatch included: a
//! file may say what the provider answers (`answers`, first match wins, else accepted) and
//! which customers have no address (`no_address`), and list the dispatch steps it expects
//! (`dispatched`, as `template:Channel:Step`).

use herald::dispatch::SendOutcome;
use herald::driver::{Call, Driver};
use herald::events::*;
use herald::pipeline;
use herald::state::CustomerState;
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
    /// What the provider answers; a call no rule matches is accepted.
    #[serde(default)]
    answers: Vec<AnswerRule>,
    /// Customers dispatch finds no address for.
    #[serde(default)]
    no_address: Vec<String>,
    /// The dispatch steps expected, in log order; not checked when absent.
    dispatched: Option<Vec<String>>,
}

/// One provider answer: to the calls for this template, channel, attempt and try (each
/// optional), the provider answers `answer`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AnswerRule {
    template: Option<String>,
    channel: Option<Channel>,
    attempt: Option<i32>,
    #[serde(rename = "try")]
    try_number: Option<u32>,
    answer: Answer,
}

#[derive(Deserialize, Clone)]
#[serde(rename_all = "snake_case")]
enum Answer {
    Accepted,
    /// Refused with this provider code.
    Rejected(i32),
    /// The request never reached the provider.
    Unreachable,
    /// No answer came back.
    Unanswered,
}

impl AnswerRule {
    fn matches(&self, call: &Call) -> bool {
        self.template
            .as_ref()
            .is_none_or(|t| *t == call.approved.template_name)
            && self.channel.is_none_or(|c| c == call.approved.channel)
            && self.attempt.is_none_or(|a| a == call.attempt)
            && self.try_number.is_none_or(|t| t == call.try_number)
    }
}

fn answer(rules: &[AnswerRule], call: &Call) -> SendOutcome {
    let channel = call.approved.channel;
    match rules
        .iter()
        .find(|r| r.matches(call))
        .map(|r| r.answer.clone())
    {
        None | Some(Answer::Accepted) => {
            SendOutcome::Accepted(format!("wamid.{}", call.approved.message_id))
        }
        Some(Answer::Rejected(code)) => SendOutcome::Rejected {
            code,
            retryable: herald::provider_codes::is_retryable(channel, code),
            detail: format!("scenario refuses with {code}"),
        },
        Some(Answer::Unreachable) => SendOutcome::NotDelivered("connection refused".into()),
        Some(Answer::Unanswered) => SendOutcome::Unanswered("timed out".into()),
    }
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

/// A dispatch step as the scenario files list it.
fn step_summary(r: &DispatchRecord) -> String {
    format!("{}:{:?}:{}", r.template_name, r.channel, r.step.summary())
}

struct Run {
    expect: Vec<String>,
    dispatched: Vec<String>,
    decisions: Vec<Decision>,
    states: BTreeMap<String, CustomerState>,
}

fn run(s: &Scenario, topology: &Topology) -> Run {
    let mut driver = Driver::new(topology).with_answers(|call: &Call| answer(&s.answers, call));
    for customer in &s.no_address {
        driver.without_address(customer);
    }
    let mut decisions = Vec::new();
    let mut steps = Vec::new();
    let mut stock = s.stock.clone();
    for (i, step) in s.steps.iter().enumerate() {
        let at = EPOCH + (step.at_h * 3_600_000.0) as i64;
        stock.extend(step.stock.clone().unwrap_or_default());
        for (sku, available) in &stock {
            driver.tables_mut().observe_stock(StockLevel {
                sku: sku.clone(),
                available: *available,
                updated_at: at,
                source_system: "scenario".into(),
            });
        }
        let out = match (&step.id, &step.fact) {
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
                driver.input(&input, &format!("step/{i}"))
            }
            (None, None) => driver.advance_to(at),
            _ => panic!("a step has both id and fact, or neither (a tick)"),
        };
        decisions.extend(out.decisions);
        steps.extend(out.steps);
    }
    Run {
        expect: decisions.iter().filter_map(summary).collect(),
        dispatched: steps.iter().map(step_summary).collect(),
        states: driver
            .customers()
            .iter()
            .map(|(c, s)| (c.clone(), s.as_ref().clone()))
            .collect(),
        decisions,
    }
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
        let Run {
            expect: got,
            dispatched,
            decisions,
            states,
        } = run(&s, &topology);
        if let Some(want) = &s.dispatched {
            if &dispatched != want {
                failures.push(format!(
                    "{} ({})\n  expected dispatch {:?}\n  got               {:?}",
                    f.display(),
                    s.description,
                    want,
                    dispatched
                ));
            }
        }
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
        let again = run(&s, &topology);
        if again.decisions != decisions || again.dispatched != dispatched {
            failures.push(format!("{}: a second run decided differently", f.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
