//! A journey step due while nothing arrives on its partition fires only through the shell's
//! wall-clock tick. Against the librdkafka mock cluster on TCP, `herald run` decides an abandoned
//! cart stamped now; its last call (due 4 s later in this test's topology) must not appear with
//! the tick off, and must appear, without any new input, once a restarted process ticks.

mod common;

use herald::demo;
use herald::events::*;
use herald::kafka::KafkaSettings;
use herald::registry::Codec;
use herald::scenario::FeedItem;
use rdkafka::message::Message;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const LAST_CALL_AFTER_HOURS: f64 = 0.001;

fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as Millis
}

/// The shipped topology with the cart's last call 3.6 s after the reminder and no holdout.
fn quick_topology(dir: &Path) {
    common::edited_topology(dir, |file, text| {
        if !file.starts_with("journeys/") {
            return text;
        }
        text.replace(
            "template = \"cart_last_call\"\nafter_hours = 24",
            &format!("template = \"cart_last_call\"\nafter_hours = {LAST_CALL_AFTER_HOURS}"),
        )
        .replace("holdout_percent = 10", "holdout_percent = 0")
    });
    let cart = std::fs::read_to_string(dir.join("journeys/abandoned_cart.toml")).unwrap();
    assert!(
        cart.contains("after_hours = 0.001"),
        "abandoned_cart.toml changed shape; update this test"
    );
}

/// A fixed-offset zone where it is about noon now, so quiet hours never get in the way.
fn midday_zone() -> String {
    let utc_hour = (now_ms() / 3_600_000) % 24;
    let offset = (12 - utc_hour + 36) % 24 - 12; // in -12..=11
    match offset {
        0 => "Etc/GMT".to_string(),
        o if o > 0 => format!("Etc/GMT-{o}"),
        o => format!("Etc/GMT+{}", -o),
    }
}

fn event(id: &str, at: Millis, fact: serde_json::Value) -> FeedItem {
    FeedItem::Event(InputEvent::new(
        "test",
        "cust-tick",
        id,
        at,
        serde_json::from_value(fact).unwrap(),
    ))
}

fn herald(bootstrap: &str, registry: &str, dir: &Path, tick_secs: u32) -> Child {
    Command::new(env!("CARGO_BIN_EXE_herald"))
        .env("HERALD_IDENTIFIER_KEY", herald::identity::DEMO_KEY)
        .args([
            "run",
            "--stage",
            "processors",
            "--bootstrap",
            bootstrap,
            "--registry",
            registry,
            "--instance-id",
            "tick-test",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .arg("--store")
        .arg(dir.join("state.redb"))
        .arg("--topology")
        .arg(dir.join("topology"))
        .env("HERALD_WALL_CLOCK_TICK_SECS", tick_secs.to_string())
        .env("RUST_LOG", "error")
        .spawn()
        .expect("herald binary starts")
}

/// The approved templates and their decided-at a read_committed reader sees now.
fn approved(bootstrap: &str, codec: &Codec, rt: &tokio::runtime::Runtime) -> Vec<(String, Millis)> {
    let mut out = Vec::new();
    demo::read_topic(bootstrap, "herald.decisions.v1", 6, |m| {
        let d = rt
            .block_on(codec.decode_decision(m.payload()))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if let Outcome::MessageApproved(a) = &d.outcome {
            out.push((a.template_name.clone(), d.decided_at));
        }
        Ok(())
    })
    .unwrap();
    out
}

fn stop(mut child: Child) {
    unsafe {
        libc_kill(child.id() as i32, 15);
    }
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "SIGTERM must stop herald cleanly: {status:?}"
    );
}

#[test]
fn a_step_due_on_a_quiet_partition_fires_by_the_wall_clock_tick_only() {
    let rt = common::runtime();
    let dir = tempfile::tempdir().unwrap();
    quick_topology(&dir.path().join("topology"));
    let topology = herald::topology_files::load(&dir.path().join("topology")).unwrap();
    let (cluster, codec) = common::demo_cluster(&rt, &topology, common::broker());
    let producer = KafkaSettings::new(&cluster.bootstrap, true, "feeder")
        .producer(None)
        .unwrap();

    let t0 = now_ms();
    demo::feed_stock(
        &rt,
        &producer,
        &codec,
        &[StockLevel {
            sku: "HG-LIN-THROW".into(),
            available: 40,
            updated_at: t0,
            source_system: "wms".into(),
        }],
    )
    .unwrap();
    let price = serde_json::json!({"amount": "89.00", "currency": "EUR"});
    let items = vec![
        event(
            "p",
            t0,
            serde_json::json!({"type": "ProfileChanged", "first_name": "Ana", "locale": "en_US", "time_zone": midday_zone(), "phone_e164": "+15550100001"}),
        ),
        event(
            "c",
            t0,
            serde_json::json!({"type": "ConsentGranted", "purpose": "MARKETING", "channel": "WHATSAPP", "source": "checkout", "artifact_id": "form-1"}),
        ),
        event(
            "cart",
            t0,
            serde_json::json!({"type": "CartAbandoned", "cart_id": "cart-1", "items": [{"sku": "HG-LIN-THROW", "name": "Linen throw", "quantity": 1, "unit_price": price}], "total": price}),
        ),
    ];
    demo::feed(
        &rt,
        &producer,
        &codec,
        &items,
        demo::FeedStamp::OccurredAt,
        |_| {},
    )
    .unwrap();

    // Tick off: the reminder goes out at once; the last call, due 3.6 s later, waits for input.
    let first = herald(&cluster.bootstrap, &cluster.registry_url, dir.path(), 0);
    let deadline = Instant::now() + Duration::from_secs(90);
    let reminded_at = loop {
        let seen = approved(&cluster.bootstrap, &codec, &rt);
        if let Some((_, at)) = seen.iter().find(|(t, _)| t == "cart_reminder") {
            break *at;
        }
        assert!(Instant::now() < deadline, "no cart reminder: {seen:?}");
        std::thread::sleep(Duration::from_millis(500));
    };
    let due = reminded_at + (LAST_CALL_AFTER_HOURS * 3_600_000.0) as Millis;
    while now_ms() < due + 4_000 {
        std::thread::sleep(Duration::from_millis(500));
    }
    let seen = approved(&cluster.bootstrap, &codec, &rt);
    assert!(
        !seen.iter().any(|(t, _)| t == "cart_last_call"),
        "without the tick nothing can fire the last call: {seen:?}"
    );
    stop(first);

    // Tick on, after a restart: the timer is rebuilt from the log and fires with no new input.
    let second = herald(&cluster.bootstrap, &cluster.registry_url, dir.path(), 1);
    let deadline = Instant::now() + Duration::from_secs(90);
    let fired_at = loop {
        let seen = approved(&cluster.bootstrap, &codec, &rt);
        if let Some((_, at)) = seen.iter().find(|(t, _)| t == "cart_last_call") {
            break *at;
        }
        assert!(
            Instant::now() < deadline,
            "the tick did not fire the last call: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    stop(second);
    // Decided as of the instant it was due, not when the tick happened to run.
    assert_eq!(fired_at, due);
    drop(producer);
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
