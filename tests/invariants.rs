//! Property tests over generated scenarios: for many seeds (customers, duplicates, shipments
//! before payment, opt-outs, late consent), the core keeps its guarantees. Each seed is a
//! different realistic month; a failure names the seed so it can be replayed.
//!
//! - no message is approved without consent, judged from the scenario's own consent facts;
//! - no message is approved twice, even when the whole input is delivered again;
//! - folding a customer's decisions rebuilds the live state byte for byte, in whatever order
//!   the customers' logs are replayed;
//! - the same input gives the same decisions and ids.

use herald::events::*;
use herald::scenario::{self, FeedItem};
use herald::state::CustomerState;
use herald::tables::Tables;
use herald::task::Task;
use herald::topology::Topology;
use std::collections::{BTreeMap, BTreeSet, HashMap};

const SEEDS: std::ops::RangeInclusive<u64> = 1..=40;
const CUSTOMERS: usize = 60;
const PARTITIONS: u64 = 6;

fn partition_of(customer: &str) -> u64 {
    // Any stable spread will do: the properties must hold for every assignment.
    customer
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64))
        % PARTITIONS
}

struct Run {
    decisions: Vec<Decision>,
    states: BTreeMap<String, CustomerState>,
}

fn run(inputs: &[(String, InputEvent)], topology: &Topology) -> Run {
    let mut decisions = Vec::new();
    let states = run_observed(inputs, topology, |_| {}, |d| decisions.push(d.clone()));
    Run { decisions, states }
}

/// Runs the inputs as the tasks would, telling `before` of each input just before it is decided
/// and `after` of every decision it (and the timers it lets fire) produced.
fn run_observed(
    inputs: &[(String, InputEvent)],
    topology: &Topology,
    mut before: impl FnMut(&InputEvent),
    mut after: impl FnMut(&Decision),
) -> BTreeMap<String, CustomerState> {
    let mut tables = Tables::default();
    scenario::stock_levels()
        .into_iter()
        .for_each(|l| tables.observe_stock(l));
    let mut tasks: HashMap<u64, Task> = HashMap::new();
    for (input_ref, e) in inputs {
        let task = tasks
            .entry(partition_of(&e.envelope.customer_id))
            .or_default();
        // Timers the input's time passes are decided first, on the facts seen before it.
        task.advance_to(e.envelope.occurred_at, topology, &tables)
            .iter()
            .for_each(&mut after);
        before(e);
        tables.observe(&e.fact, e.envelope.occurred_at);
        task.decide(e, input_ref, topology, &tables)
            .iter()
            .for_each(&mut after);
    }
    tasks
        .into_values()
        .flat_map(|t| t.into_customers())
        .collect()
}

fn inputs_of(seed: u64) -> Vec<(String, InputEvent)> {
    scenario::generate(CUSTOMERS, seed)
        .items
        .into_iter()
        .filter_map(|i| match i {
            FeedItem::Event(e) => Some(e),
            FeedItem::Garbage { .. } => None,
        })
        .enumerate()
        .map(|(offset, e)| (format!("feed/{offset}"), e))
        .collect()
}

/// Consent per customer, purpose and channel as the scenario's facts say, latest by the time
/// it happened (at the same instant a revocation wins); an inbound message that is exactly one
/// of policy.toml's opt-out keywords withdraws its purposes on WhatsApp.
#[derive(Default)]
struct ConsentTruth(HashMap<(String, Purpose, Channel), (Millis, bool)>);

impl ConsentTruth {
    fn set(
        &mut self,
        customer: &str,
        purpose: Purpose,
        channel: Channel,
        at: Millis,
        granted: bool,
    ) {
        let slot = self
            .0
            .entry((customer.to_string(), purpose, channel))
            .or_insert((at, granted));
        if (at, !granted) >= (slot.0, !slot.1) {
            *slot = (at, granted);
        }
    }

    fn learn(&mut self, e: &InputEvent, topology: &Topology) {
        let at = e.envelope.occurred_at;
        let customer = &e.envelope.customer_id;
        match &e.fact {
            Fact::ConsentGranted(c) => self.set(customer, c.purpose, c.channel, at, true),
            Fact::ConsentRevoked(c) => self.set(customer, c.purpose, c.channel, at, false),
            Fact::InboundMessageReceived(m) => {
                let said = m.text.trim().to_uppercase();
                let opt_out = &topology.policy.opt_out;
                if opt_out
                    .keywords
                    .values()
                    .flatten()
                    .any(|k| k.to_uppercase() == said)
                {
                    for p in &opt_out.purposes {
                        self.set(customer, *p, Channel::Whatsapp, at, false);
                    }
                }
            }
            _ => {}
        }
    }

    fn granted(&self, customer: &str, purpose: Purpose, channel: Channel) -> bool {
        self.0
            .get(&(customer.to_string(), purpose, channel))
            .is_some_and(|(_, g)| *g)
    }
}

#[test]
fn no_message_is_approved_without_consent() {
    let topology = Topology::embedded().unwrap();
    let mut approvals = 0;
    for seed in SEEDS {
        let inputs = inputs_of(seed);
        // Each approval, deferred ones included, is judged against the facts seen before it.
        let truth = std::cell::RefCell::new(ConsentTruth::default());
        run_observed(
            &inputs,
            &topology,
            |e| truth.borrow_mut().learn(e, &topology),
            |d| {
                if let Outcome::MessageApproved(m) = &d.outcome {
                    approvals += 1;
                    assert!(
                        truth.borrow().granted(&d.customer_id, m.purpose, m.channel),
                        "seed {seed}: {} approved for {} without {:?} consent on {:?}",
                        m.template_name,
                        d.customer_id,
                        m.purpose,
                        m.channel
                    );
                }
            },
        );
    }
    assert!(approvals > 1_000, "the scenarios must exercise approvals");
}

/// Marketing goes out only in daytime (08:00–21:00) of a time zone the customer's own profile
/// facts name, judged with the time zone database directly rather than through policy code.
#[test]
fn no_marketing_is_approved_in_quiet_hours_or_without_a_known_time_zone() {
    let topology = Topology::embedded().unwrap();
    let (mut daytime, mut deferred) = (0, 0);
    for seed in SEEDS {
        let inputs = inputs_of(seed);
        let mut zones: HashMap<String, String> = HashMap::new();
        for (_, e) in &inputs {
            if let Fact::ProfileChanged(p) = &e.fact {
                if let Some(tz) = &p.time_zone {
                    zones.insert(e.envelope.customer_id.clone(), tz.clone());
                }
            }
        }
        for d in run(&inputs, &topology).decisions {
            match &d.outcome {
                Outcome::MessageApproved(m) if m.purpose == Purpose::Marketing => {
                    let zone = zones.get(&d.customer_id).unwrap_or_else(|| {
                        panic!("seed {seed}: marketing approved for {} whose time zone was never given", d.customer_id)
                    });
                    let tz = jiff::tz::TimeZone::get(zone).expect("scenario zones are IANA names");
                    let local =
                        tz.to_datetime(jiff::Timestamp::from_millisecond(d.decided_at).unwrap());
                    assert!(
                        (8..21).contains(&local.hour()),
                        "seed {seed}: marketing approved at {local} in {zone} for {}",
                        d.customer_id
                    );
                    daytime += 1;
                }
                Outcome::MessageDeferred(_) => deferred += 1,
                _ => {}
            }
        }
    }
    assert!(
        daytime > 100 && deferred > 100,
        "both paths exercised: {daytime} sent, {deferred} deferred"
    );
}

/// No customer gets more messages of a category than any configured rolling cap allows, in any
/// window, counted from the approvals themselves.
#[test]
fn frequency_caps_are_never_exceeded() {
    let topology = Topology::embedded().unwrap();
    assert!(!topology.policy.frequency_cap.is_empty());
    let mut capped = 0;
    for seed in SEEDS {
        let r = run(&inputs_of(seed), &topology);
        let mut sent: HashMap<(&str, &str), Vec<Millis>> = HashMap::new();
        for d in &r.decisions {
            match &d.outcome {
                Outcome::MessageApproved(m) => sent
                    .entry((&d.customer_id, &m.category))
                    .or_default()
                    .push(d.decided_at),
                Outcome::MessageDeferred(x) if x.reason == DeferralReason::FrequencyCap => {
                    capped += 1
                }
                Outcome::MessageSuppressed(x) if x.reason == SuppressionReason::FrequencyCap => {
                    capped += 1
                }
                _ => {}
            }
        }
        for cap in &topology.policy.frequency_cap {
            let window = cap.window_hours * 3_600_000;
            for ((customer, category), times) in &sent {
                if *category != cap.category {
                    continue;
                }
                for (i, start) in times.iter().enumerate() {
                    let inside = times[i..]
                        .iter()
                        .take_while(|t| **t < start + window)
                        .count();
                    assert!(
                        inside <= cap.max,
                        "seed {seed}: {customer} got {inside} {category} messages within {} h of {start} (cap {})",
                        cap.window_hours,
                        cap.max
                    );
                }
            }
        }
    }
    assert!(
        capped > 0,
        "the scenarios must run into a cap at least once"
    );
}

#[test]
fn no_message_is_approved_twice_even_when_everything_is_delivered_again() {
    let topology = Topology::embedded().unwrap();
    for seed in SEEDS {
        let inputs = inputs_of(seed);
        // The whole feed again after the first pass, as a replay from offset zero would bring
        // it: a later delivery with its own position, same event ids.
        let mut twice = inputs.clone();
        twice.extend(
            inputs
                .iter()
                .map(|(r, e)| (format!("again/{r}"), e.clone())),
        );
        let r = run(&twice, &topology);
        let mut approved = BTreeSet::new();
        for d in &r.decisions {
            if let Outcome::MessageApproved(m) = &d.outcome {
                assert!(
                    approved.insert(m.message_id.clone()),
                    "seed {seed}: message {} ({}) approved twice",
                    m.message_id,
                    m.template_name
                );
            }
        }
    }
}

/// A small deterministic generator (64-bit LCG) for placing copies: the same seed always gives
/// the same feed, so a failure can be replayed.
fn next(state: &mut u64) -> u64 {
    *state = state
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    *state >> 33
}

#[test]
fn the_same_facts_again_under_new_ids_change_nothing() {
    let topology = Topology::embedded().unwrap();
    for seed in SEEDS {
        let inputs = inputs_of(seed);
        // Every fact with a business identity comes a second and a third time under fresh
        // event ids (a re-scan, an OMS retry, a backfill), each copy at a shuffled position
        // among the next 150 records, carrying its original time as a re-emission does.
        let mut rng = seed;
        let mut slots: Vec<Vec<(String, InputEvent)>> = vec![Vec::new(); inputs.len() + 151];
        let mut copies = 0;
        for (i, (r, e)) in inputs.iter().enumerate() {
            if herald::business_identity::of(&e.fact, e.envelope.occurred_at).is_none() {
                continue;
            }
            for n in 1..=2 {
                let mut copy = e.clone();
                copy.envelope.event_id = format!("{}~re-emitted-{n}", e.envelope.event_id);
                let at = i + 1 + (next(&mut rng) % 150) as usize;
                slots[at].push((format!("copy{n}/{r}"), copy));
                copies += 1;
            }
        }
        let mut fed = Vec::new();
        for (i, slot) in slots.into_iter().enumerate() {
            if let Some(original) = inputs.get(i) {
                fed.push(original.clone());
            }
            fed.extend(slot);
        }
        let plain = run(&inputs, &topology);
        let repeated = run(&fed, &topology);
        let is_copy = |d: &Decision| d.input_event_id.contains("~re-emitted-");
        // Each copy is recorded as a repeat (or as predating an erasure), and nothing else.
        let mut answered = 0;
        for d in repeated.decisions.iter().filter(|d| is_copy(d)) {
            match &d.outcome {
                Outcome::DuplicateIgnored(dup) => {
                    assert!(
                        dup.repeats_event_id.is_some(),
                        "seed {seed}: {} was taken for a redelivery of its own id",
                        d.input_event_id
                    );
                    answered += 1;
                }
                Outcome::PreErasureFactIgnored(_) => answered += 1,
                other => panic!(
                    "seed {seed}: the copy {} was acted on: {}",
                    d.input_event_id,
                    other.summary()
                ),
            }
        }
        assert_eq!(answered, copies, "seed {seed}: a copy got no decision");
        // The originals are decided exactly as without the copies: the same approvals, ids
        // and all, the same decisions in the same order, and the same state.
        let originals: Vec<&Decision> = repeated.decisions.iter().filter(|d| !is_copy(d)).collect();
        let expected: Vec<&Decision> = plain.decisions.iter().collect();
        assert_eq!(
            originals.len(),
            expected.len(),
            "seed {seed}: the copies changed how many decisions the originals got"
        );
        for (got, want) in originals.iter().zip(&expected) {
            assert_eq!(got, want, "seed {seed}: the copies changed a decision");
        }
        assert!(
            repeated.states == plain.states,
            "seed {seed}: the copies changed a customer's state"
        );
    }
}

#[test]
fn folding_the_decisions_rebuilds_the_live_state_in_any_replay_order() {
    let topology = Topology::embedded().unwrap();
    for seed in SEEDS {
        let r = run(&inputs_of(seed), &topology);
        let mut logs: BTreeMap<&str, Vec<&Decision>> = BTreeMap::new();
        for d in &r.decisions {
            logs.entry(&d.customer_id).or_default().push(d);
        }
        // Replay customers in reverse and interleaved: only each customer's own order counts.
        let mut rebuilt: BTreeMap<String, CustomerState> = BTreeMap::new();
        let mut cursors: Vec<(&str, std::slice::Iter<&Decision>)> =
            logs.iter().rev().map(|(c, l)| (*c, l.iter())).collect();
        while !cursors.is_empty() {
            cursors.retain_mut(|(customer, it)| match it.next() {
                Some(d) => {
                    herald::state::evolve(rebuilt.entry(customer.to_string()).or_default(), d);
                    true
                }
                None => false,
            });
        }
        assert_eq!(rebuilt.len(), r.states.len(), "seed {seed}");
        for (customer, live) in &r.states {
            let bytes = |s: &CustomerState| serde_json::to_vec(s).unwrap();
            assert!(
                bytes(&rebuilt[customer]) == bytes(live),
                "seed {seed}: rebuilding {customer} from the log differs from the live state"
            );
        }
    }
}

#[test]
fn the_same_input_gives_the_same_decisions() {
    let topology = Topology::embedded().unwrap();
    for seed in [3, 17, 29] {
        let inputs = inputs_of(seed);
        let a = run(&inputs, &topology);
        let b = run(&inputs, &topology);
        assert_eq!(a.decisions, b.decisions, "seed {seed}");
        let ids: BTreeSet<_> = a.decisions.iter().map(|d| &d.decision_id).collect();
        assert_eq!(
            ids.len(),
            a.decisions.len(),
            "seed {seed}: decision ids unique"
        );
    }
}

#[test]
fn every_customers_consent_chain_verifies() {
    let topology = Topology::embedded().unwrap();
    let mut records = 0;
    for seed in SEEDS {
        let r = run(&inputs_of(seed), &topology);
        let v = herald::audit::verify(&r.decisions);
        assert!(v.breaks.is_empty(), "seed {seed}: {:?}", v.breaks.first());
        assert_eq!(
            v.unchained, 0,
            "seed {seed}: a consent change without a link"
        );
        records += v.consent_records;
    }
    assert!(
        records > 1_000,
        "the months must change consent often: {records}"
    );
}
