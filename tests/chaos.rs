//! The short chaos run, on a three-node Apache Kafka cluster (`scripts/kafka`, replication 3,
//! min.insync.replicas 2): the processors and dispatch run as separate processes (static
//! members of their groups), and one of them (in turn) is SIGKILLed every 1.5 s (each at most
//! every 3 s) while a scenario is fed; the leader of a decision-log partition is SIGKILLed and
//! restarted 5 s in and every 20 s after; the provider simulator withholds 5 % of its answers
//! although the message went out. A
//! read_committed reader must then find no event lost, no decision twice, no customer's records
//! decided out of order, no send without consent, no send twice, and no approval whose dispatch
//! never ended. The processors keep 60 of the 300 customers in memory, loading the others from
//! the store when their inputs come. The long run (over 200,000
//! events) is `herald chaos`, documented in the README.

mod common;

#[test]
fn repeated_sigkills_of_processes_and_brokers_lose_nothing_and_repeat_nothing() {
    let cluster = common::start_broker(3, &[]);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka");
    let control = |verb: &str| {
        format!(
            "{} {verb} --dir {} --node {{node}}",
            script.display(),
            cluster.dir.display()
        )
    };
    let (kill, start) = (control("kill-node"), control("start-node"));
    let o = common::herald(&[
        "chaos",
        "--bootstrap",
        &cluster.bootstrap,
        "--kill-broker-cmd",
        &kill,
        "--start-broker-cmd",
        &start,
        "--broker-kill-every-secs",
        "20",
        "--broker-down-secs",
        "5",
        "--customers",
        "300",
        "--kill-every-ms",
        "1500",
        "--kill",
        "both",
        "--drop-answers",
        "0.05",
        // A fifth of the customers in memory: the others leave and are loaded back from the
        // store while processes and brokers die.
        "--state-cache-customers",
        "60",
        "--json",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", common::text(&o));
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(
        r["kills"].as_u64().unwrap() >= 3 && r["dispatch_kills"].as_u64().unwrap() >= 1,
        "too few kills to prove anything: {r}"
    );
    assert!(
        r["broker_kills"].as_u64().unwrap() >= 1,
        "no broker was killed: {r}"
    );
    assert!(
        r["answers_withheld"].as_u64().unwrap() > 0,
        "no provider answer was withheld: {r}"
    );
    assert!(r["events"].as_u64().unwrap() > 4_000, "{r}");
    for check in [
        "events_lost",
        "duplicate_decisions",
        "order_violations",
        "sends_without_consent",
        "duplicate_sends",
        "approvals_unsettled",
    ] {
        assert_eq!(r[check], 0, "{check}: {r}");
    }
    assert!(
        r["sends"].as_u64().unwrap() > 500,
        "dispatch must have sent: {r}"
    );
}
