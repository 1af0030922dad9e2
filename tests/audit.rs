//! The consent audit and the rebuild as an operator runs them, on one demo's recorded decision
//! log and live store: the chain of every customer verifies; a customer's timeline shows each
//! grant and what relied on it; a record changed or removed afterwards is found and named; and
//! the state rebuilt from the log, at any parallelism, has the live store's digest.

mod common;

use common::{herald, text};
use std::path::PathBuf;
use std::sync::OnceLock;

fn is_consent_grant(line: &serde_json::Value) -> bool {
    let o = &line["value"]["outcome"];
    line["topic"] == "herald.decisions.v1"
        && o["type"] == "EventAccepted"
        && o["fact"]["type"] == "ConsentGranted"
}

/// Every record of a JSON-lines dump.
fn dump_lines(dump: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dump)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// One demo run for every test: its dump and its live state directory.
fn demo() -> &'static (tempfile::TempDir, PathBuf, PathBuf) {
    static DEMO: OnceLock<(tempfile::TempDir, PathBuf, PathBuf)> = OnceLock::new();
    DEMO.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let dump = dir.path().join("month.jsonl");
        let live = dir.path().join("live");
        let o = herald(&[
            "demo",
            "--customers",
            "150",
            "--json",
            "--record",
            dump.to_str().unwrap(),
            "--state-dir",
            live.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        (dir, dump, live)
    })
}

#[test]
fn the_state_rebuilt_from_the_log_has_the_live_digest_at_any_parallelism() {
    let (dir, dump, live) = demo();
    let mut digests = Vec::new();
    for (n, parallelism) in ["1", "3"].iter().enumerate() {
        let into = dir.path().join(format!("rebuilt-{n}"));
        let o = herald(&[
            "rebuild",
            "--events",
            dump.to_str().unwrap(),
            "--into",
            into.to_str().unwrap(),
            "--parallelism",
            parallelism,
            "--verify",
            live.join("state.redb").to_str().unwrap(),
            "--json",
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(report["digest"], report["live_digest"], "{report}");
        assert!(report["customers"].as_u64().unwrap() > 100, "{report}");
        digests.push(report["digest"].clone());
    }
    assert_eq!(digests[0], digests[1]);
    // A second rebuild into the same directory is refused, not merged.
    let o = herald(&[
        "rebuild",
        "--events",
        dump.to_str().unwrap(),
        "--into",
        dir.path().join("rebuilt-0").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("fresh directory"), "{}", text(&o));
}

#[test]
fn the_demo_log_verifies_and_a_changed_or_removed_consent_record_is_named() {
    let (dir, dump, _) = demo();

    let ok = herald(&["audit", "verify", "--events", dump.to_str().unwrap()]);
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(text(&ok).contains(" 0 breaks"), "{}", text(&ok));

    let lines = dump_lines(dump);
    // A customer whose order confirmation relied on a grant in this log.
    let approved = lines
        .iter()
        .find(|l| l["value"]["outcome"]["type"] == "MessageApproved")
        .expect("the demo approves messages");
    let customer = approved["value"]["customer_id"].as_str().unwrap();
    let artifact = approved["value"]["outcome"]["consent_artifact_id"]
        .as_str()
        .unwrap();
    let timeline = herald(&[
        "audit",
        "consent",
        "--customer",
        customer,
        "--events",
        dump.to_str().unwrap(),
    ]);
    assert!(timeline.status.success(), "{}", text(&timeline));
    let t = text(&timeline);
    let grant = t
        .lines()
        .position(|l| l.contains("GRANTED") && l.contains(artifact))
        .unwrap_or_else(|| panic!("no grant of {artifact}:\n{t}"));
    assert!(
        t.lines()
            .skip(grant + 1)
            .take_while(|l| l.starts_with("    "))
            .any(|l| l.contains("MessageApproved")),
        "the approval is not listed under the grant it relied on:\n{t}"
    );

    // Changed afterwards: the source of one grant is rewritten.
    let first_grant = lines.iter().position(is_consent_grant).unwrap();
    let victim = lines[first_grant]["value"]["customer_id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut changed = lines.clone();
    changed[first_grant]["value"]["outcome"]["fact"]["source"] = "backfilled".into();
    let tampered = dir.path().join("changed.jsonl");
    let body: Vec<String> = changed.iter().map(|l| l.to_string()).collect();
    std::fs::write(&tampered, body.join("\n")).unwrap();
    let o = herald(&["audit", "verify", "--events", tampered.to_str().unwrap()]);
    assert!(!o.status.success(), "a changed record must fail the audit");
    assert!(text(&o).contains(&victim), "{}", text(&o));

    // Removed afterwards: a grant that a later consent record of the same customer follows.
    let removable = lines
        .iter()
        .enumerate()
        .find(|(i, l)| {
            is_consent_grant(l)
                && lines[i + 1..].iter().any(|m| {
                    m["value"]["customer_id"] == l["value"]["customer_id"]
                        && !m["value"]["consent_chain"].is_null()
                })
        })
        .map(|(i, _)| i)
        .expect("some customer changes consent twice");
    let mut removed = lines.clone();
    removed.remove(removable);
    let gap = dir.path().join("removed.jsonl");
    let body: Vec<String> = removed.iter().map(|l| l.to_string()).collect();
    std::fs::write(&gap, body.join("\n")).unwrap();
    let o = herald(&["audit", "verify", "--events", gap.to_str().unwrap()]);
    assert!(!o.status.success(), "a removed record must fail the audit");
    let who = lines[removable]["value"]["customer_id"].as_str().unwrap();
    assert!(text(&o).contains(who), "{}", text(&o));
}

#[test]
fn the_store_projection_shows_the_consent_history_the_log_shows_and_forgets_erased_customers() {
    let (dir, dump, live) = demo();
    // A customer with a grant in the log: the audit timeline (from the log) and the
    // projection (from the live store, and from a store rebuilt from the log) must agree.
    let lines = dump_lines(dump);
    let erased: Vec<String> = lines
        .iter()
        .filter(|l| {
            l["topic"] == "herald.decisions.v1"
                && l["value"]["outcome"]["fact"]["type"] == "ErasureRequested"
        })
        .map(|l| l["value"]["customer_id"].as_str().unwrap().to_string())
        .collect();
    let grant = lines
        .iter()
        .find(|l| is_consent_grant(l) && !erased.iter().any(|e| l["value"]["customer_id"] == *e))
        .expect("a consent grant in the demo");
    let customer = grant["value"]["customer_id"].as_str().unwrap().to_string();
    let o = herald(&[
        "audit",
        "consent",
        "--customer",
        &customer,
        "--events",
        dump.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let timeline: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rebuilt = dir.path().join("rebuilt-for-projection");
    let o = herald(&[
        "rebuild",
        "--events",
        dump.to_str().unwrap(),
        "--into",
        rebuilt.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let mut seen = Vec::new();
    for store in [live.join("state.redb"), rebuilt.join("state.redb")] {
        let o = herald(&[
            "state",
            "--customer",
            &customer,
            "--store",
            store.to_str().unwrap(),
            "--json",
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let view: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(
            view["consent_history"],
            timeline["changes"],
            "{} disagrees with the log",
            store.display()
        );
        assert!(!view["consent"].as_array().unwrap().is_empty(), "{view}");
        seen.push(view["consent"].clone());
        let readable = herald(&[
            "state",
            "--customer",
            &customer,
            "--store",
            store.to_str().unwrap(),
        ]);
        assert!(text(&readable).contains("GRANTED"), "{}", text(&readable));
    }
    assert_eq!(seen[0], seen[1]);
    // An erased customer keeps no consent, sends, orders or history from before the erasure in
    // the projection, though the log keeps its chain for the auditor.
    assert!(!erased.is_empty(), "the demo has erasure requests");
    let o = herald(&[
        "state",
        "--customer",
        &erased[0],
        "--store",
        live.join("state.redb").to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let view: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(view["erased"], true, "{view}");
    for emptied in ["consent", "consent_history", "recent_sends"] {
        assert_eq!(view[emptied], serde_json::json!([]), "{emptied}: {view}");
    }
    // Facts that arrive after the erasure are new processing; nothing from before survives.
    for order in view["orders"].as_array().unwrap() {
        assert_eq!(order["status"], "known from later facts only", "{view}");
    }
    let o = herald(&[
        "state",
        "--customer",
        "no-such-customer",
        "--store",
        live.join("state.redb").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("no state for customer"), "{}", text(&o));
}

#[test]
fn no_phone_number_or_email_address_is_in_clear_in_the_decision_log() {
    let (_, dump, _) = demo();
    let lines = dump_lines(dump);
    let mut clear = std::collections::BTreeSet::new();
    for l in &lines {
        let fact = &l["value"]["fact"];
        if l["topic"] == "crm.events.v1" && fact["type"] == "ProfileChanged" {
            for field in ["phone_e164", "email"] {
                if let Some(v) = fact[field].as_str() {
                    clear.insert(v.to_string());
                }
            }
        }
    }
    assert!(clear.len() > 100, "the demo's profiles carry addresses");
    let mut hashed_recipients = 0;
    for l in lines.iter().filter(|l| l["topic"] == "herald.decisions.v1") {
        let text = l.to_string();
        for c in &clear {
            assert!(!text.contains(c.as_str()), "{c} in clear in {text}");
        }
        if let Some(r) = l["value"]["outcome"]["recipient"].as_str() {
            assert!(r.starts_with("hk1:"), "{text}");
            hashed_recipients += 1;
        }
    }
    assert!(hashed_recipients > 100);
}
