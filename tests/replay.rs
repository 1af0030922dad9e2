//! The offline backtest as a user runs it: `herald demo --record` writes a dump of a live run,
//! and `herald replay` runs it through a policy directory with no Kafka. The policy that made
//! the recording reproduces it exactly; a stricter frequency cap shows up as fewer sends.

mod common;

use common::{edited_topology, herald, text};
use std::path::Path;

/// The shipped topology with marketing capped at one message a day and two a week.
fn stricter_policy(dir: &Path) {
    edited_topology(dir, |file, text| {
        if file != "policy.toml" {
            return text;
        }
        let stricter = text
            .replace("max = 2\nwindow_hours = 24", "max = 1\nwindow_hours = 24")
            .replace("max = 5\nwindow_hours = 168", "max = 2\nwindow_hours = 168");
        assert_ne!(
            stricter, text,
            "the caps in policy.toml moved; update this test"
        );
        stricter
    });
}

#[test]
fn a_recorded_demo_replays_exactly_and_a_stricter_cap_shows_as_fewer_sends() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("month.avro");
    let dump = dump.to_str().unwrap();
    let demo = herald(&["demo", "--customers", "200", "--json", "--record", dump]);
    assert!(demo.status.success(), "{}", text(&demo));

    let topology = concat!(env!("CARGO_MANIFEST_DIR"), "/topology");
    let same = herald(&[
        "replay",
        "--events",
        dump,
        "--policy",
        topology,
        "--json",
        "--fail-on-difference",
    ]);
    assert!(same.status.success(), "{}", text(&same));
    let report: serde_json::Value = serde_json::from_slice(&same.stdout).unwrap();
    assert_eq!(report["customers_differing"], 0, "{report}");
    assert!(report["sends_recorded"].as_u64().unwrap() > 100, "{report}");
    assert_eq!(report["recorded_decisions"], report["replayed_decisions"]);
    assert_eq!(report["inputs"], report["inputs_in_recorded_order"]);

    let stricter = dir.path().join("stricter");
    stricter_policy(&stricter);
    let changed = herald(&[
        "replay",
        "--events",
        dump,
        "--policy",
        stricter.to_str().unwrap(),
        "--show",
        "2",
    ]);
    assert!(changed.status.success(), "{}", text(&changed));
    let out = text(&changed);
    assert!(out.contains("MessageSuppressed:FrequencyCap"), "{out}");
    assert!(out.contains("first differences (2 of"), "{out}");
    let gate = herald(&[
        "replay",
        "--events",
        dump,
        "--policy",
        stricter.to_str().unwrap(),
        "--json",
        "--fail-on-difference",
    ]);
    assert!(
        !gate.status.success(),
        "a changed policy must fail the gate"
    );
    let report: serde_json::Value = serde_json::from_slice(&gate.stdout).unwrap();
    assert!(
        report["sends_replayed"].as_u64() < report["sends_recorded"].as_u64(),
        "{report}"
    );
}

#[test]
fn a_dump_with_a_bad_name_or_line_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let topology = concat!(env!("CARGO_MANIFEST_DIR"), "/topology");
    let csv = dir.path().join("month.csv");
    std::fs::write(&csv, "x").unwrap();
    let o = herald(&[
        "replay",
        "--events",
        csv.to_str().unwrap(),
        "--policy",
        topology,
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains(".jsonl"), "{}", text(&o));

    let bad = dir.path().join("month.jsonl");
    std::fs::write(
        &bad,
        "{\"topic\": \"oms.events.v1\", \"value\": {}}\nnot json\n",
    )
    .unwrap();
    let o = herald(&[
        "replay",
        "--events",
        bad.to_str().unwrap(),
        "--policy",
        topology,
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("line 2"), "{}", text(&o));
}
