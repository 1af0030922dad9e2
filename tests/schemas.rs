//! Schema evolution and the registry subset: every topic schema is BACKWARD compatible with its
//! committed history, and the registry answers the Confluent API as clients expect.

use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;
use herald::avro::{self, Schemas, TOPIC_RECORDS};
use herald::events::*;
use herald::registry::{self, Codec, DecodeError};
use herald::topology::Topology;
use std::path::PathBuf;

fn history_dir(topic: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("schemas/history")
        .join(format!("{topic}-value"))
}

fn versions(topic: &str) -> Vec<(u32, String)> {
    let mut out: Vec<(u32, String)> = std::fs::read_dir(history_dir(topic))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().to_string();
                    let v = name
                        .strip_prefix('v')?
                        .strip_suffix(".avsc")?
                        .parse()
                        .ok()?;
                    Some((v, std::fs::read_to_string(e.path()).ok()?))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Each topic's current schema can read everything written with any committed version, and the
/// newest committed version is the current one: a schema change must add a history file.
/// `HERALD_RECORD_SCHEMAS=1 cargo test --test schemas` records a changed schema as a new version.
#[test]
fn every_schema_is_backward_compatible_with_its_history() {
    let record = std::env::var("HERALD_RECORD_SCHEMAS").is_ok();
    let mut problems = Vec::new();
    // The history is kept under the subjects of the shipped topic names.
    let names = Topology::embedded().unwrap().names;
    for (role, _) in TOPIC_RECORDS {
        let topic: &str = names.of(*role);
        let current = Schemas::get().schema(*role).unwrap();
        let history = versions(topic);
        for (v, text) in &history {
            let old = Schema::parse_str(text).unwrap();
            if let Err(e) = SchemaCompatibility::can_read(&old, current) {
                problems.push(format!(
                    "{topic}-value: current schema cannot read v{v}: {e}"
                ));
            }
        }
        let latest_is_current = history.last().is_some_and(|(_, t)| {
            Schema::parse_str(t).unwrap().canonical_form() == current.canonical_form()
        });
        if !latest_is_current {
            if record {
                let next = history.last().map(|(v, _)| v + 1).unwrap_or(1);
                let pretty: serde_json::Value =
                    serde_json::from_str(Schemas::get().text(*role).unwrap()).unwrap();
                std::fs::create_dir_all(history_dir(topic)).unwrap();
                std::fs::write(
                    history_dir(topic).join(format!("v{next}.avsc")),
                    serde_json::to_string_pretty(&pretty).unwrap() + "\n",
                )
                .unwrap();
            } else {
                problems.push(format!("{topic}-value: schema changed without a history entry; run HERALD_RECORD_SCHEMAS=1 cargo test --test schemas"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn the_registry_refuses_an_incompatible_schema_with_409() {
    let rt = rt();
    rt.block_on(async {
        let addr = registry::serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let url = format!("http://{addr}");
        let http = reqwest::Client::new();
        let post = |subject: &str, schema: &str| {
            http.post(format!("{url}/subjects/{subject}/versions"))
                .header("content-type", "application/vnd.schemaregistry.v1+json")
                .body(serde_json::json!({"schema": schema}).to_string())
                .send()
        };
        let v1 = r#"{"type":"record","name":"Beat","fields":[{"name":"n","type":"long"}]}"#;
        let compatible = r#"{"type":"record","name":"Beat","fields":[{"name":"n","type":"long"},{"name":"note","type":["null","string"],"default":null}]}"#;
        let breaking = r#"{"type":"record","name":"Beat","fields":[{"name":"n","type":"long"},{"name":"must","type":"string"}]}"#;
        let r = post("beat-value", v1).await.unwrap();
        assert_eq!(r.status(), 200);
        let id1 = r.json::<serde_json::Value>().await.unwrap()["id"].clone();
        // Registering the same schema again gives the same id.
        let again = post("beat-value", v1).await.unwrap().json::<serde_json::Value>().await.unwrap();
        assert_eq!(again["id"], id1);
        let r = post("beat-value", breaking).await.unwrap();
        assert_eq!(r.status(), 409);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error_code"], 409);
        let check = http
            .post(format!("{url}/compatibility/subjects/beat-value/versions/latest"))
            .body(serde_json::json!({"schema": breaking}).to_string())
            .header("content-type", "application/json")
            .send()
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap();
        assert_eq!(check["is_compatible"], false);
        assert_eq!(post("beat-value", compatible).await.unwrap().status(), 200);
        let latest: serde_json::Value = http.get(format!("{url}/subjects/beat-value/versions/latest")).send().await.unwrap().json().await.unwrap();
        assert_eq!(latest["version"], 2);
        let subjects: Vec<String> = http.get(format!("{url}/subjects")).send().await.unwrap().json().await.unwrap();
        assert_eq!(subjects, vec!["beat-value".to_string()]);
        assert_eq!(http.get(format!("{url}/schemas/ids/999")).send().await.unwrap().status(), 404);
        assert_eq!(post("beat-value", "{not json").await.unwrap().status(), 422);
    });
}

#[test]
fn records_roundtrip_in_the_confluent_wire_format_over_http() {
    let rt = rt();
    rt.block_on(async {
        let addr = registry::serve("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let codec = Codec::new(
            &format!("http://{addr}"),
            &Topology::embedded().unwrap().names,
        )
        .unwrap();
        let registered = codec.register_all().await.unwrap();
        assert_eq!(registered.len(), TOPIC_RECORDS.len());
        let e = InputEvent {
            envelope: Envelope {
                event_id: "e-1".into(),
                source_system: "billing".into(),
                source_sequence: None,
                occurred_at: 1_793_491_200_000,
                customer_id: "cust-1".into(),
                trace_parent: Some("00-abc-def-01".into()),
                schema_version: 1,
            },
            fact: Fact::RefundIssued(RefundIssued {
                order_id: "ord-1".into(),
                refund_id: "r-1".into(),
                amount: Money {
                    minor_units: 2990,
                    currency: "EUR".into(),
                },
                partial: true,
            }),
        };
        let bytes = codec.encode_input(&e).await.unwrap();
        assert_eq!(bytes[0], 0, "Confluent magic byte");
        let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        assert!(registered
            .iter()
            .any(|(s, i)| s == "billing.events.v1-value" && *i == id));
        assert_eq!(
            codec
                .decode_input("billing.events.v1", Some(&bytes))
                .await
                .unwrap(),
            e
        );
        // Bytes that are not a Herald record are poison (dead-letter), not a retry.
        assert!(matches!(
            codec
                .decode_input("billing.events.v1", Some(b"plain text"))
                .await,
            Err(DecodeError::Poison(_))
        ));
        assert!(matches!(
            codec
                .decode_input("billing.events.v1", Some(&[0, 0, 0, 0x7f, 0x7f, 1]))
                .await,
            Err(DecodeError::Poison(_))
        ));
        // A record of another family on the wrong topic is poison too.
        assert!(matches!(
            codec.decode_input("oms.events.v1", Some(&bytes)).await,
            Err(DecodeError::Poison(_))
        ));
        let _ = avro::record_of(herald::topology::TopicRole::Dlq).unwrap();
    });
}

#[test]
fn an_unreachable_registry_is_a_retry_not_poison() {
    let rt = rt();
    rt.block_on(async {
        let codec = Codec::new("http://127.0.0.1:9", &Topology::embedded().unwrap().names).unwrap();
        let r = codec
            .decode_input("oms.events.v1", Some(&[0, 0, 0, 0, 1, 2]))
            .await;
        assert!(matches!(r, Err(DecodeError::Retryable(_))), "{r:?}");
    });
}
