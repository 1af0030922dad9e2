//! Property tests of the core's guarantees, with proptest. Each property runs on inputs drawn
//! from generated months (a seed, a handful of customers, then any subsequence of their
//! events: facts lost, reordered holds, opt-outs, late consent), and a failure shrinks to the
//! fewest events that still break it. `tests/invariants.proptest-regressions` keeps the seeds of
//! failures found so far; proptest runs them first, every time.
//!
//! - no message is approved without consent, judged from the input's own consent facts;
//! - marketing goes out only in daytime of a time zone the customer's profile names;
//! - no rolling frequency cap is exceeded;
//! - no message is approved twice, even when the whole input is delivered again;
//! - the same facts again under new event ids change nothing;
//! - folding a customer's decisions rebuilds the live state byte for byte, in whatever order
//!   the customers' logs are replayed;
//! - the same input gives the same decisions and ids, and every consent chain verifies.
//!
//! `whole_months_exercise_every_property` runs each property on 40 whole months and checks
//! that they approve, defer, cap and change consent often enough for the properties to mean
//! something.

use herald::events::*;
use herald::scenario::{self, FeedItem};
use herald::state::CustomerState;
use herald::tables::Tables;
use herald::task::Task;
use herald::topology::Topology;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::OnceLock;

const SEEDS: std::ops::RangeInclusive<u64> = 1..=40;
const CUSTOMERS: usize = 60;
const PARTITIONS: u64 = 6;

type Inputs = Vec<(String, InputEvent)>;
type Checked<T> = Result<T, TestCaseError>;

fn topology() -> &'static Topology {
    static T: OnceLock<Topology> = OnceLock::new();
    T.get_or_init(|| Topology::embedded().expect("the embedded topology loads"))
}

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

fn run(inputs: &[(String, InputEvent)]) -> Run {
    let mut decisions = Vec::new();
    let states = run_observed(inputs, |_| {}, |d| decisions.push(d.clone()));
    Run { decisions, states }
}

/// Runs the inputs as the tasks would, telling `before` of each input just before it is decided
/// and `after` of every decision it (and the timers it lets fire) produced.
fn run_observed(
    inputs: &[(String, InputEvent)],
    mut before: impl FnMut(&InputEvent),
    mut after: impl FnMut(&Decision),
) -> BTreeMap<String, CustomerState> {
    let topology = topology();
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

fn inputs_of(seed: u64, customers: usize) -> Inputs {
    scenario::generate(customers, seed)
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

/// Inputs for one case: a month of a few customers, then any subsequence of its events, which
/// shrinks towards fewer events.
fn months() -> impl Strategy<Value = Inputs> {
    (1u64..100_000, 1usize..=6).prop_flat_map(|(seed, customers)| {
        let all = inputs_of(seed, customers);
        let n = all.len();
        proptest::sample::subsequence(all, 0..=n)
    })
}

/// Consent per customer, purpose and channel as the input's facts say, latest by the time it
/// happened (at the same instant a revocation wins); an inbound message that is exactly one of
/// policy.toml's opt-out keywords withdraws its purposes on WhatsApp.
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

    fn learn(&mut self, e: &InputEvent) {
        let at = e.envelope.occurred_at;
        let customer = &e.envelope.customer_id;
        match &e.fact {
            Fact::ConsentGranted(c) => self.set(customer, c.purpose, c.channel, at, true),
            Fact::ConsentRevoked(c) => self.set(customer, c.purpose, c.channel, at, false),
            Fact::InboundMessageReceived(m) => {
                let said = m.text.trim().to_uppercase();
                let opt_out = &topology().policy.opt_out;
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

/// Each approval, deferred ones included, against the consent facts seen before it. The
/// approvals judged.
fn no_approval_without_consent(inputs: &[(String, InputEvent)]) -> Checked<usize> {
    let truth = std::cell::RefCell::new(ConsentTruth::default());
    let mut approvals = Vec::new();
    run_observed(
        inputs,
        |e| truth.borrow_mut().learn(e),
        |d| {
            if let Outcome::MessageApproved(m) = &d.outcome {
                let granted = truth.borrow().granted(&d.customer_id, m.purpose, m.channel);
                approvals.push((granted, d.customer_id.clone(), m.clone()));
            }
        },
    );
    for (granted, customer, m) in &approvals {
        prop_assert!(
            granted,
            "{} approved for {customer} without {:?} consent on {:?}",
            m.template_name,
            m.purpose,
            m.channel
        );
    }
    Ok(approvals.len())
}

/// Marketing only in daytime (08:00–21:00) of a time zone the customer's own profile facts
/// name, judged with the time zone database directly rather than through policy code. Marketing
/// approvals and deferrals seen.
fn marketing_only_in_daytime(inputs: &[(String, InputEvent)]) -> Checked<(usize, usize)> {
    let mut zones: HashMap<String, String> = HashMap::new();
    for (_, e) in inputs {
        if let Fact::ProfileChanged(p) = &e.fact {
            if let Some(tz) = &p.time_zone {
                zones.insert(e.envelope.customer_id.clone(), tz.clone());
            }
        }
    }
    let (mut daytime, mut deferred) = (0, 0);
    for d in run(inputs).decisions {
        match &d.outcome {
            Outcome::MessageApproved(m) if m.purpose == Purpose::Marketing => {
                let zone = zones.get(&d.customer_id);
                prop_assert!(
                    zone.is_some(),
                    "marketing approved for {} whose time zone was never given",
                    d.customer_id
                );
                let zone = zone.map(String::as_str).unwrap_or_default();
                let tz = jiff::tz::TimeZone::get(zone).expect("scenario zones are IANA names");
                let local =
                    tz.to_datetime(jiff::Timestamp::from_millisecond(d.decided_at).unwrap());
                prop_assert!(
                    (8..21).contains(&local.hour()),
                    "marketing approved at {local} in {zone} for {}",
                    d.customer_id
                );
                daytime += 1;
            }
            Outcome::MessageDeferred(_) => deferred += 1,
            _ => {}
        }
    }
    Ok((daytime, deferred))
}

/// No customer gets more messages of a category than any configured rolling cap allows, in any
/// window, counted from the approvals themselves. Decisions that met a cap.
fn caps_never_exceeded(inputs: &[(String, InputEvent)]) -> Checked<usize> {
    let topology = topology();
    let r = run(inputs);
    let mut capped = 0;
    let mut sent: HashMap<(&str, &str), Vec<Millis>> = HashMap::new();
    for d in &r.decisions {
        match &d.outcome {
            Outcome::MessageApproved(m) => sent
                .entry((&d.customer_id, &m.category))
                .or_default()
                .push(d.decided_at),
            Outcome::MessageDeferred(x) if x.reason == DeferralReason::FrequencyCap => capped += 1,
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
                prop_assert!(
                    inside <= cap.max,
                    "{customer} got {inside} {category} messages within {} h of {start} (cap {})",
                    cap.window_hours,
                    cap.max
                );
            }
        }
    }
    Ok(capped)
}

/// The whole input again after the first pass, as a replay from offset zero would bring it (a
/// later delivery with its own position, same event ids): no message approved twice.
fn no_double_approval_on_redelivery(inputs: &[(String, InputEvent)]) -> Checked<()> {
    let mut twice = inputs.to_vec();
    twice.extend(
        inputs
            .iter()
            .map(|(r, e)| (format!("again/{r}"), e.clone())),
    );
    let mut approved = BTreeSet::new();
    for d in &run(&twice).decisions {
        if let Outcome::MessageApproved(m) = &d.outcome {
            prop_assert!(
                approved.insert(m.message_id.clone()),
                "message {} ({}) approved twice",
                m.message_id,
                m.template_name
            );
        }
    }
    Ok(())
}

/// A small deterministic generator (64-bit LCG) for placing copies: the same input always gives
/// the same feed, so a failure can be replayed.
fn next(state: &mut u64) -> u64 {
    *state = state
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    *state >> 33
}

/// Every fact with a business identity comes a second and a third time under fresh event ids
/// (a re-scan, an OMS retry, a backfill), each copy at a shuffled position among the next 150
/// records, carrying its original time as a re-emission does: each copy is recorded as a
/// repeat, and the originals are decided exactly as without them. Copies made.
fn reemissions_change_nothing(inputs: &[(String, InputEvent)]) -> Checked<usize> {
    let mut rng = inputs.len() as u64;
    let mut slots: Vec<Inputs> = vec![Vec::new(); inputs.len() + 151];
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
    let plain = run(inputs);
    let repeated = run(&fed);
    let is_copy = |d: &Decision| d.input_event_id.contains("~re-emitted-");
    let mut answered = 0;
    for d in repeated.decisions.iter().filter(|d| is_copy(d)) {
        match &d.outcome {
            Outcome::DuplicateIgnored(dup) => {
                prop_assert!(
                    dup.repeats_event_id.is_some(),
                    "{} was taken for a redelivery of its own id",
                    d.input_event_id
                );
                answered += 1;
            }
            Outcome::PreErasureFactIgnored(_) => answered += 1,
            other => prop_assert!(
                false,
                "the copy {} was acted on: {}",
                d.input_event_id,
                other.summary()
            ),
        }
    }
    prop_assert_eq!(answered, copies, "a copy got no decision");
    let originals: Vec<&Decision> = repeated.decisions.iter().filter(|d| !is_copy(d)).collect();
    let expected: Vec<&Decision> = plain.decisions.iter().collect();
    prop_assert_eq!(
        originals.len(),
        expected.len(),
        "the copies changed how many decisions the originals got"
    );
    for (got, want) in originals.iter().zip(&expected) {
        prop_assert_eq!(got, want, "the copies changed a decision");
    }
    prop_assert!(
        repeated.states == plain.states,
        "the copies changed a customer's state"
    );
    Ok(copies)
}

/// Folding each customer's decisions, customers replayed in reverse and interleaved, rebuilds
/// the live states byte for byte.
fn folding_rebuilds_the_live_state(inputs: &[(String, InputEvent)]) -> Checked<()> {
    let r = run(inputs);
    let mut logs: BTreeMap<&str, Vec<&Decision>> = BTreeMap::new();
    for d in &r.decisions {
        logs.entry(&d.customer_id).or_default().push(d);
    }
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
    prop_assert_eq!(rebuilt.len(), r.states.len());
    for (customer, live) in &r.states {
        let bytes = |s: &CustomerState| serde_json::to_vec(s).unwrap();
        prop_assert!(
            bytes(&rebuilt[customer]) == bytes(live),
            "rebuilding {} from the log differs from the live state",
            customer
        );
    }
    Ok(())
}

/// The same input twice gives the same decisions, with unique ids; every consent chain
/// verifies. Consent records checked.
fn deterministic_and_chained(inputs: &[(String, InputEvent)]) -> Checked<usize> {
    let a = run(inputs);
    let b = run(inputs);
    prop_assert_eq!(&a.decisions, &b.decisions);
    let ids: BTreeSet<_> = a.decisions.iter().map(|d| &d.decision_id).collect();
    prop_assert_eq!(ids.len(), a.decisions.len(), "decision ids unique");
    let v = herald::audit::verify(&a.decisions);
    prop_assert!(v.breaks.is_empty(), "{:?}", v.breaks.first());
    prop_assert_eq!(v.unchained, 0, "a consent change without a link");
    Ok(v.consent_records)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn no_message_is_approved_without_consent(inputs in months()) {
        no_approval_without_consent(&inputs)?;
    }

    #[test]
    fn no_marketing_is_approved_in_quiet_hours_or_without_a_known_time_zone(inputs in months()) {
        marketing_only_in_daytime(&inputs)?;
    }

    #[test]
    fn frequency_caps_are_never_exceeded(inputs in months()) {
        caps_never_exceeded(&inputs)?;
    }

    #[test]
    fn no_message_is_approved_twice_even_when_everything_is_delivered_again(inputs in months()) {
        no_double_approval_on_redelivery(&inputs)?;
    }

    #[test]
    fn the_same_facts_again_under_new_ids_change_nothing(inputs in months()) {
        reemissions_change_nothing(&inputs)?;
    }

    #[test]
    fn folding_the_decisions_rebuilds_the_live_state_in_any_replay_order(inputs in months()) {
        folding_rebuilds_the_live_state(&inputs)?;
    }

    #[test]
    fn the_same_input_gives_the_same_decisions_and_every_consent_chain_verifies(inputs in months()) {
        deterministic_and_chained(&inputs)?;
    }
}

/// Every property on 40 whole months of 60 customers, and enough happening in them for the
/// properties to mean something; a failure names its seed.
#[test]
fn whole_months_exercise_every_property() {
    let (mut approvals, mut daytime, mut deferred, mut capped, mut copies, mut consent) =
        (0, 0, 0, 0, 0, 0);
    for seed in SEEDS {
        let inputs = inputs_of(seed, CUSTOMERS);
        fn held<T>(seed: u64, r: Checked<T>) -> T {
            r.unwrap_or_else(|e| panic!("seed {seed}: {e}"))
        }
        approvals += held(seed, no_approval_without_consent(&inputs));
        let (d, f) = held(seed, marketing_only_in_daytime(&inputs));
        daytime += d;
        deferred += f;
        capped += held(seed, caps_never_exceeded(&inputs));
        held(seed, no_double_approval_on_redelivery(&inputs));
        copies += held(seed, reemissions_change_nothing(&inputs));
        held(seed, folding_rebuilds_the_live_state(&inputs));
        consent += held(seed, deterministic_and_chained(&inputs));
    }
    assert!(approvals > 1_000, "approvals exercised: {approvals}");
    assert!(
        daytime > 100 && deferred > 100,
        "both marketing paths exercised: {daytime} sent, {deferred} deferred"
    );
    assert!(capped > 0, "the months must run into a cap at least once");
    assert!(copies > 1_000, "re-emissions exercised: {copies}");
    assert!(
        consent > 1_000,
        "the months must change consent often: {consent}"
    );
}
