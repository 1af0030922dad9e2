//! The state-store contract: what the processors, `herald rebuild` and `herald state` rely on,
//! checked against every backend: the embedded store, an Apache Cassandra 5.0 node that
//! `scripts/cassandra` starts for this binary (password and TLS on), and ScyllaDB whenever
//! `HERALD_TEST_SCYLLA` names a node (`HOST:PORT`). Each test gets a fresh keyspace.

mod common;

use herald::audit::ConsentEvent;
use herald::events::{Channel, Purpose};
use herald::store::{
    PartitionSnapshot, SnapshotWrite, StateStore, StoreAddress, StoredState, DISPATCH, PROCESSORS,
};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

/// Keeps what a store needs alive (its directory, the runtime ScyllaDB calls run on).
struct Backend {
    name: String,
    store: Arc<dyn StateStore>,
    _dir: Option<tempfile::TempDir>,
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime")
    })
}

/// Fresh stores of every backend reachable from here.
fn backends() -> Vec<Backend> {
    let dir = tempfile::tempdir().unwrap();
    let embedded = StoreAddress::Embedded(dir.path().join("state.redb"))
        .open(runtime().handle())
        .unwrap();
    let cassandra = common::cassandra_store(&common::fresh_keyspace("contract"));
    let mut out = vec![
        Backend {
            name: "embedded".into(),
            store: embedded,
            _dir: Some(dir),
        },
        Backend {
            store: StoreAddress::parse(&cassandra)
                .unwrap()
                .open(runtime().handle())
                .unwrap_or_else(|e| panic!("Cassandra at {cassandra}: {e:#}")),
            name: cassandra,
            _dir: None,
        },
    ];
    match std::env::var("HERALD_TEST_SCYLLA") {
        Ok(node) if !node.is_empty() => {
            static N: AtomicU32 = AtomicU32::new(0);
            let keyspace = format!(
                "herald_contract_{}_{}_{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis()
                    % 1_000_000,
                N.fetch_add(1, Ordering::SeqCst)
            );
            let address = format!("scylla://{node}/{keyspace}?replication_factor=1");
            let store = StoreAddress::parse(&address)
                .unwrap()
                .open(runtime().handle())
                .unwrap_or_else(|e| panic!("HERALD_TEST_SCYLLA={node}: {e:#}"));
            out.push(Backend {
                name: address,
                store,
                _dir: None,
            });
        }
        _ => eprintln!(
            "HERALD_TEST_SCYLLA is not set: the contract is checked on the embedded store only"
        ),
    }
    out
}

fn state(bytes: &str) -> Vec<u8> {
    format!("{{\"note\":\"{bytes}\"}}").into_bytes()
}

fn write(changed: &[(&str, &str)], next_offset: i64, inputs: &[(&str, i64)]) -> SnapshotWrite {
    SnapshotWrite {
        changed: changed
            .iter()
            .map(|(c, b)| (c.to_string(), state(b)))
            .collect(),
        next_offset,
        inputs: inputs.iter().map(|(t, o)| (t.to_string(), *o)).collect(),
        consent: Vec::new(),
        erased: Vec::new(),
        timers: Vec::new(),
    }
}

fn consent(at: i64, granted: bool, decision: &str) -> ConsentEvent {
    ConsentEvent {
        at,
        granted,
        purposes: vec![Purpose::Marketing, Purpose::Transactional],
        channel: Channel::Whatsapp,
        source: "checkout form".into(),
        artifact_id: format!("artifact-{decision}"),
        decision_id: decision.into(),
        chain: Some(format!("link-{decision}")),
    }
}

#[test]
fn a_fresh_store_is_empty_and_a_saved_one_is_not() {
    for b in backends() {
        assert!(b.store.is_empty().unwrap(), "{}", b.name);
        assert_eq!(
            b.store.load(PROCESSORS, 0).unwrap(),
            PartitionSnapshot::default(),
            "{}",
            b.name
        );
        b.store
            .save(PROCESSORS, 0, &write(&[("c-1", "a")], 1, &[]))
            .unwrap();
        assert!(!b.store.is_empty().unwrap(), "{}", b.name);
    }
}

#[test]
fn snapshots_round_trip_per_namespace_and_partition_with_each_customers_position() {
    for b in backends() {
        let s = &b.store;
        s.save(
            PROCESSORS,
            1,
            &write(
                &[("c-1", "a"), ("c-2", "b")],
                10,
                &[("oms.events.v1", 4), ("~stream-time", 1_700_000_000_000)],
            ),
        )
        .unwrap();
        s.save(PROCESSORS, 1, &write(&[("c-2", "b2")], 12, &[]))
            .unwrap();
        s.save(PROCESSORS, 11, &write(&[("c-9", "z")], 3, &[]))
            .unwrap();
        s.save(DISPATCH, 1, &write(&[("c-1", "d")], 4, &[]))
            .unwrap();
        let snap = s.load(PROCESSORS, 1).unwrap();
        assert_eq!(snap.next_offset, 12, "{}", b.name);
        assert_eq!(
            snap.customers,
            BTreeMap::from([
                (
                    "c-1".to_string(),
                    StoredState {
                        bytes: state("a"),
                        next_offset: 10
                    }
                ),
                (
                    "c-2".to_string(),
                    StoredState {
                        bytes: state("b2"),
                        next_offset: 12
                    }
                ),
            ]),
            "{}",
            b.name
        );
        assert_eq!(snap.inputs["oms.events.v1"], 4, "{}", b.name);
        assert_eq!(snap.inputs["~stream-time"], 1_700_000_000_000, "{}", b.name);
        // c-1 was saved at 10: a restore replaying from the partition's position folds only
        // its decisions from offset 10 on.
        assert!(snap.holds("c-1", 9) && !snap.holds("c-1", 10), "{}", b.name);
        assert_eq!(
            s.load(DISPATCH, 1).unwrap().customers["c-1"].bytes,
            state("d")
        );
        assert_eq!(s.load(PROCESSORS, 11).unwrap().customers.len(), 1);
        assert_eq!(s.load(PROCESSORS, 2).unwrap(), PartitionSnapshot::default());
    }
}

#[test]
fn one_customer_and_the_timers_load_without_the_partition() {
    for b in backends() {
        let s = &b.store;
        let mut w = write(&[("c-1", "a"), ("c-2", "b")], 10, &[("oms.events.v1", 4)]);
        w.timers = vec![("c-1".into(), Some(1_000)), ("c-2".into(), Some(2_000))];
        s.save(PROCESSORS, 3, &w).unwrap();
        // c-2's timer fired and it has none now; c-3 is new with one.
        let mut w = write(&[("c-2", "b2"), ("c-3", "c")], 12, &[]);
        w.timers = vec![("c-2".into(), None), ("c-3".into(), Some(3_000))];
        s.save(PROCESSORS, 3, &w).unwrap();
        // A late retry of the first save brings no cleared timer back.
        let mut late = write(&[("c-2", "b")], 10, &[]);
        late.timers = vec![("c-2".into(), Some(2_000))];
        s.save(PROCESSORS, 3, &late).unwrap();
        let positions = s.load_positions(PROCESSORS, 3).unwrap();
        assert!(positions.customers.is_empty(), "{}", b.name);
        assert_eq!(positions.next_offset, 12, "{}", b.name);
        assert_eq!(positions.inputs["oms.events.v1"], 4, "{}", b.name);
        assert_eq!(
            positions.timers,
            BTreeMap::from([("c-1".to_string(), 1_000), ("c-3".to_string(), 3_000)]),
            "{}",
            b.name
        );
        assert_eq!(s.load(PROCESSORS, 3).unwrap().timers, positions.timers);
        assert_eq!(
            s.load_customer(PROCESSORS, 3, "c-2").unwrap(),
            Some(StoredState {
                bytes: state("b2"),
                next_offset: 12
            }),
            "{}",
            b.name
        );
        assert_eq!(s.load_customer(PROCESSORS, 3, "c-9").unwrap(), None);
        assert_eq!(s.load_customer(PROCESSORS, 4, "c-1").unwrap(), None);
        assert_eq!(s.load_customer(DISPATCH, 3, "c-1").unwrap(), None);
    }
}

#[test]
fn saving_the_same_write_twice_is_the_same_as_once() {
    for b in backends() {
        let mut w = write(&[("c-1", "x")], 7, &[("crm.events.v1", 3)]);
        w.consent = vec![("c-1".into(), consent(100, true, "d-1"))];
        b.store.save(PROCESSORS, 0, &w).unwrap();
        let once = b.store.load(PROCESSORS, 0).unwrap();
        b.store.save(PROCESSORS, 0, &w).unwrap();
        assert_eq!(b.store.load(PROCESSORS, 0).unwrap(), once, "{}", b.name);
        assert_eq!(
            b.store.consent_history("c-1").unwrap().len(),
            1,
            "{}",
            b.name
        );
    }
}

#[test]
fn an_older_position_never_undoes_a_newer_one() {
    for b in backends() {
        let s = &b.store;
        s.save(
            PROCESSORS,
            0,
            &write(&[("c-1", "new")], 20, &[("oms.events.v1", 50)]),
        )
        .unwrap();
        // A late retry of an earlier save, or a lagging restore, arrives after the newer one.
        s.save(
            PROCESSORS,
            0,
            &write(
                &[("c-1", "old"), ("c-2", "only")],
                15,
                &[("oms.events.v1", 40)],
            ),
        )
        .unwrap();
        let snap = s.load(PROCESSORS, 0).unwrap();
        assert_eq!(snap.customers["c-1"].bytes, state("new"), "{}", b.name);
        assert_eq!(snap.customers["c-1"].next_offset, 20, "{}", b.name);
        assert_eq!(snap.customers["c-2"].next_offset, 15, "{}", b.name);
        assert_eq!(snap.next_offset, 20, "{}", b.name);
        assert_eq!(snap.inputs["oms.events.v1"], 50, "{}", b.name);
        let view = s.customer("c-1").unwrap().unwrap();
        assert_eq!(view.state, state("new"), "{}", b.name);
    }
}

#[test]
fn the_projection_answers_by_customer_with_consent_history_oldest_first() {
    for b in backends() {
        let s = &b.store;
        let mut w = write(&[("c-7", "latest")], 31, &[]);
        w.consent = vec![
            ("c-7".into(), consent(2_000, false, "d-2")),
            ("c-7".into(), consent(1_000, true, "d-1")),
            ("c-8".into(), consent(1_500, true, "d-9")),
        ];
        s.save(PROCESSORS, 5, &w).unwrap();
        let view = s.customer("c-7").unwrap().expect("projected");
        assert_eq!(
            (view.partition, view.next_offset, view.state),
            (5, 31, state("latest")),
            "{}",
            b.name
        );
        let history = s.consent_history("c-7").unwrap();
        assert_eq!(
            history,
            vec![consent(1_000, true, "d-1"), consent(2_000, false, "d-2")],
            "{}",
            b.name
        );
        assert!(s.customer("nobody").unwrap().is_none(), "{}", b.name);
        assert!(
            s.consent_history("nobody").unwrap().is_empty(),
            "{}",
            b.name
        );
        // Dispatch's state is not a customer projection.
        s.save(DISPATCH, 5, &write(&[("c-dispatch-only", "d")], 3, &[]))
            .unwrap();
        assert!(
            s.customer("c-dispatch-only").unwrap().is_none(),
            "{}",
            b.name
        );
    }
}

#[test]
fn a_partition_of_thousands_of_customers_loads_whole() {
    for b in backends() {
        let names: Vec<String> = (0..3_000).map(|i| format!("customer-{i:05}")).collect();
        let changed: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "s")).collect();
        for (i, chunk) in changed.chunks(500).enumerate() {
            b.store
                .save(PROCESSORS, 2, &write(chunk, 100 + i as i64, &[]))
                .unwrap();
        }
        let snap = b.store.load(PROCESSORS, 2).unwrap();
        assert_eq!(snap.customers.len(), 3_000, "{}", b.name);
        assert_eq!(snap.next_offset, 105, "{}", b.name);
        assert_eq!(snap.customers["customer-02999"].next_offset, 105);
    }
}

#[test]
fn an_erasure_removes_the_consent_history_saved_before_it_and_nothing_after() {
    for b in backends() {
        let s = &b.store;
        let mut first = write(&[("c-1", "granted")], 10, &[]);
        first.consent = vec![
            ("c-1".into(), consent(1_000, true, "d-1")),
            ("c-2".into(), consent(1_000, true, "d-5")),
        ];
        s.save(PROCESSORS, 0, &first).unwrap();
        let mut erasure = write(&[("c-1", "erased")], 20, &[]);
        erasure.erased = vec!["c-1".into()];
        s.save(PROCESSORS, 0, &erasure).unwrap();
        assert!(s.consent_history("c-1").unwrap().is_empty(), "{}", b.name);
        assert_eq!(s.consent_history("c-2").unwrap().len(), 1, "{}", b.name);
        // The customer comes back and consents again; a replay of the erasure's save (a
        // restore, a retry) must not remove the new record.
        let mut again = write(&[("c-1", "regranted")], 30, &[]);
        again.consent = vec![("c-1".into(), consent(5_000, true, "d-7"))];
        s.save(PROCESSORS, 0, &again).unwrap();
        s.save(PROCESSORS, 0, &erasure).unwrap();
        assert_eq!(
            s.consent_history("c-1").unwrap(),
            vec![consent(5_000, true, "d-7")],
            "{}",
            b.name
        );
        assert_eq!(
            s.customer("c-1").unwrap().unwrap().state,
            state("regranted"),
            "{}",
            b.name
        );
    }
}
