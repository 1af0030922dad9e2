//! Every door where outside bytes come in (`herald::doors`), over seeds (the scenario files'
//! facts, the provider's documented webhook shapes, dumps of them, the shipped topology and
//! settings) and over deterministic mutations of those: no panic, no hang, every refusal with
//! its reason, nothing let in that breaks what a valid input keeps. The short run of what
//! `scripts/fuzz` runs for millions of inputs under libFuzzer; `HERALD_DOOR_CASES` sets how
//! many mutations each door gets here (default 20,000). Inputs that once broke a door are kept
//! under `tests/fuzz/regressions/<door>/` and run before the mutations. An input that breaks a
//! door is written to `target/doors-failures/`; the seeds are written to `target/fuzz-seeds/`
//! for `scripts/fuzz`.

use herald::doors::{Door, Verdict, KNOWN_SENDER};
use herald::events::{Fact, Family, InputEvent};
use herald::replay::{DumpedRecord, Payload};
use herald::topology::{Topology, EMBEDDED, EMBEDDED_JOURNEYS};
use std::time::{Duration, Instant};

const EPOCH: i64 = 1_793_491_200_000;

fn signed(body: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8];
    v.extend_from_slice(body);
    v
}

fn webhook(value: serde_json::Value) -> Vec<u8> {
    signed(
        &serde_json::to_vec(&serde_json::json!({
            "object": "whatsapp_business_account",
            "entry": [{"id": "102290129340398", "changes": [{"field": "messages", "value": value}]}]
        }))
        .unwrap(),
    )
}

fn message(kind: &str, content: serde_json::Value) -> Vec<u8> {
    let mut m = serde_json::json!({"from": KNOWN_SENDER, "id": "wamid.IN1", "timestamp": "1750000001", "type": kind});
    m[kind] = content;
    webhook(serde_json::json!({
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550000000", "phone_number_id": "1055501234567890"},
        "contacts": [{"profile": {"name": "Ana"}, "wa_id": KNOWN_SENDER}],
        "messages": [m]
    }))
}

/// Every input event of the scenario files, with its family.
fn scenario_events() -> Vec<InputEvent> {
    let mut files: Vec<_> = std::fs::read_dir("tests/scenarios")
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
        for step in s["steps"].as_array().unwrap() {
            let Some(fact) = step.get("fact") else {
                continue;
            };
            let fact: Fact = serde_json::from_value(fact.clone()).unwrap();
            let customer = step["customer"].as_str().unwrap_or("cust-1");
            let at = EPOCH + (step["at_h"].as_f64().unwrap() * 3_600_000.0) as i64;
            let id = step["id"].as_str().unwrap_or("tick");
            out.push(InputEvent::new("scenario", customer, id, at, fact));
        }
    }
    out
}

const FAMILIES: [Family; 4] = [Family::Oms, Family::Billing, Family::Crm, Family::Provider];

/// The same request, unsigned: once with no header at all, once with a header that is not
/// the body's signature.
fn unsigned(signed: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let body = &signed[0][1..];
    let mut missing = vec![1u8, 255];
    missing.extend_from_slice(body);
    let wrong_header = b"sha256=0000000000000000000000000000000000000000000000000000000000000000";
    let mut wrong = vec![1u8, wrong_header.len() as u8];
    wrong.extend_from_slice(wrong_header);
    wrong.extend_from_slice(body);
    vec![missing, wrong]
}

fn seeds(door: Door) -> Vec<Vec<u8>> {
    let mut seeds = signed_seeds(door);
    if matches!(
        door,
        Door::WhatsappWebhook | Door::SmsWebhook | Door::EmailWebhook
    ) {
        seeds.extend(unsigned(&seeds));
    }
    seeds
}

/// What the real sources send, signed where the door checks a signature.
fn signed_seeds(door: Door) -> Vec<Vec<u8>> {
    let topology = Topology::embedded().unwrap();
    let records = || -> Vec<DumpedRecord> {
        scenario_events()
            .into_iter()
            .enumerate()
            .map(|(i, e)| DumpedRecord {
                topic: topology.names.of_family(e.fact.family()).to_string(),
                partition: 0,
                offset: i as i64,
                timestamp: Some(e.envelope.occurred_at),
                key: Some(e.envelope.customer_id.clone()),
                payload: Payload::Input(e),
            })
            .collect()
    };
    match door {
        Door::WhatsappWebhook => {
            let status = |status: &str, extra: serde_json::Value| {
                let mut s = serde_json::json!({"id": "wamid.X1", "status": status, "timestamp": "1750000000",
                    "recipient_id": KNOWN_SENDER, "biz_opaque_callback_data": "hc1|cust-1|m1"});
                for (k, v) in extra.as_object().unwrap() {
                    s[k] = v.clone();
                }
                webhook(serde_json::json!({"messaging_product": "whatsapp", "statuses": [s]}))
            };
            vec![
                status("delivered", serde_json::json!({})),
                status("read", serde_json::json!({})),
                status(
                    "failed",
                    serde_json::json!({"errors": [{"code": 131047, "title": "Re-engagement message"}]}),
                ),
                message("text", serde_json::json!({"body": "STOP"})),
                message(
                    "button",
                    serde_json::json!({"payload": "Stop promotions", "text": "Stop promotions"}),
                ),
                message(
                    "interactive",
                    serde_json::json!({"type": "button_reply", "button_reply": {"id": "track-1", "title": "Track my order"}}),
                ),
                message(
                    "interactive",
                    serde_json::json!({"type": "list_reply", "list_reply": {"id": "row-2", "title": "Stop promotions"}}),
                ),
                message(
                    "image",
                    serde_json::json!({"caption": "it arrived broken", "mime_type": "image/jpeg", "id": "media-1"}),
                ),
                message(
                    "reaction",
                    serde_json::json!({"message_id": "wamid.OUT", "emoji": "👍"}),
                ),
                signed(&serde_json::to_vec(&serde_json::json!({
                    "object": "whatsapp_business_account",
                    "entry": [{"id": "1", "time": 1795500100, "changes": [{"field": "message_template_status_update", "value": {
                        "event": "PAUSED", "message_template_id": 3, "message_template_name": "order_confirmation",
                        "message_template_language": "en_US", "reason": "LOW_QUALITY"}}]}]
                }))
                .unwrap()),
            ]
        }
        Door::SmsWebhook => {
            let url = herald::provider::sms::status_callback_url(
                "https://hooks.example.com/webhooks/sms",
                "hc1|cust-1|m-1",
            );
            ["undelivered&ErrorCode=30003", "delivered", "sent"]
                .iter()
                .map(|status| {
                    signed(
                        format!("{url}\nMessageSid=SM0001&MessageStatus={status}&To=%2B15550100001&AccountSid=AC1")
                            .as_bytes(),
                    )
                })
                .collect()
        }
        Door::EmailWebhook => vec![signed(
            br#"[{"email":"a@example.com","timestamp":1750000000,"event":"processed","sg_message_id":"XM1.filterdrecv-1.0","herald_callback":"hc1|cust-1|m-1"},
{"email":"a@example.com","timestamp":1750000001,"event":"delivered","sg_message_id":"XM1.filterdrecv-1.0","herald_callback":"hc1|cust-1|m-1"},
{"email":"a@example.com","timestamp":1750000002,"event":"bounce","type":"bounce","status":"5.1.1","sg_message_id":"XM2.filterdrecv-1.1","herald_callback":"hc1|cust-1|m-2"}]"#,
        )],
        Door::InputRecord => scenario_events()
            .iter()
            .map(|e| {
                let family = e.fact.family();
                let schema = herald::avro::Schemas::get()
                    .schema(herald::topology::TopicRole::of_family(family))
                    .unwrap();
                let mut out = vec![FAMILIES.iter().position(|f| *f == family).unwrap() as u8];
                out.extend(
                    apache_avro::writer::datum::GenericDatumWriter::builder(schema)
                        .build()
                        .unwrap()
                        .write_value_to_vec(herald::avro::input_to_value(e).unwrap())
                        .unwrap(),
                );
                out
            })
            .collect(),
        Door::DumpJsonLines | Door::DumpAvro => {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(if door == Door::DumpAvro {
                "seed.avro"
            } else {
                "seed.jsonl"
            });
            let all = records();
            // Whole dumps and short ones: mutations of a short one reach further per input.
            [&all[..], &all[..3]]
                .iter()
                .map(|rs| {
                    herald::dump::write(&path, rs).unwrap();
                    std::fs::read(&path).unwrap()
                })
                .collect()
        }
        Door::Topology => {
            let mut out: Vec<Vec<u8>> = ["topics.toml", "templates.toml", "policy.toml"]
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    let text = EMBEDDED.iter().find(|(n, _)| n == f).unwrap().1;
                    let mut v = vec![i as u8];
                    v.extend_from_slice(text.as_bytes());
                    v
                })
                .collect();
            for (j, (_, text)) in EMBEDDED_JOURNEYS.iter().enumerate() {
                let mut v = vec![3 + j as u8];
                v.extend_from_slice(text.as_bytes());
                out.push(v);
            }
            out
        }
        Door::Settings => vec![
            b"\x00security.protocol=SASL_SSL\nsasl.mechanism=SCRAM-SHA-512\n# secrets below\nsasl.username=herald\nsasl.password=s3cret=with=equals\nssl.ca.location=/etc/herald/ca.pem\n".to_vec(),
            b"\x01scylla://10.0.0.1:9042,10.0.0.2:9042/herald?consistency=quorum".to_vec(),
            b"\x01/var/lib/herald/processors.redb".to_vec(),
        ],
    }
}

/// A small deterministic generator (xorshift64*): the same cases on every run.
struct Cases(u64);

impl Cases {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Bytes that mean something to one of the doors' formats: JSON, forms, TOML, Avro varints.
const TOKENS: &[&[u8]] = &[
    b"null",
    b"true",
    b"\"\"",
    b"[]",
    b"{}",
    b"-1",
    b"0",
    b"1e999",
    b"18446744073709551616",
    b"-9223372036854775809",
    b"\"\\ud800\"",
    b"\\u0000",
    b"\"type\":\"button\"",
    b"\"statuses\":[{}]",
    b"\"messages\":[{}]",
    b"%",
    b"%ZZ",
    b"&",
    b"=",
    b"+",
    b"\n",
    b"\r\n",
    b"[[template]]",
    b"[[step]]",
    b"= 0",
    b"= -1",
    b"= \"\"",
    b"= 99999999999",
    b"\"25:00\"",
    b"\x00",
    b"\xff\xff\xff\xff\x0f",
    b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",
    b"\xfe\xff\xff\xff\xff\xff\xff\xff\xff\x01",
    b"\x01",
    b"\x7f",
    b"Obj\x01",
    b"avro.schema",
    b"herald.schema.",
];

fn mutate(cases: &mut Cases, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut d = seed.to_vec();
    // The first byte chooses how a door reads the rest: keep it most of the time.
    let keep = usize::from(cases.below(10) < 8).min(d.len());
    for _ in 0..=cases.below(4) {
        let len = d.len();
        let at = keep + cases.below(len.saturating_sub(keep) + 1);
        match cases.below(8) {
            0 if at < len => d[at] ^= 1 << cases.below(8),
            1 if at < len => {
                d[at] = [0, 0xff, 0x7f, 0x80, b'"', b'{', b'}', b',', b':', b'\\'][cases.below(10)]
            }
            2 => {
                let n = cases.below(16).min(len - at.min(len));
                d.drain(at..at + n);
            }
            3 => {
                let n = cases.below(32).min(len - at.min(len));
                let copy = d[at..at + n].to_vec();
                let to = keep + cases.below(d.len().saturating_sub(keep) + 1);
                d.splice(to..to, copy);
            }
            4 => {
                let t = TOKENS[cases.below(TOKENS.len())];
                d.splice(at..at, t.iter().copied());
            }
            5 if !other.is_empty() => {
                let from = cases.below(other.len());
                d.truncate(at);
                d.extend_from_slice(&other[from..]);
            }
            6 => d.truncate(at),
            _ => {
                let n = cases.below(8);
                let random: Vec<u8> = (0..n).map(|_| cases.next() as u8).collect();
                d.splice(at..at, random);
            }
        }
    }
    d
}

/// Runs one input through a door, turning a panic, a broken check or a hang into a failure
/// that names the input (also written under `target/doors-failures/`).
fn pass(door: Door, input: &[u8], n: usize) -> Verdict {
    let started = Instant::now();
    let outcome = std::panic::catch_unwind(|| door.open(input));
    let took = started.elapsed();
    let failure = match &outcome {
        Err(_) => Some("panicked".to_string()),
        Ok(Err(broken)) => Some(broken.to_string()),
        // Generous: a hang, not a slow machine, is what this catches.
        Ok(Ok(_)) if took > Duration::from_secs(5) => Some(format!("took {took:?}")),
        Ok(Ok(_)) => None,
    };
    if let Some(why) = failure {
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("../doors-failures");
        let _ = std::fs::create_dir_all(&dir);
        let file = dir.join(format!("{}-{n}", door.name()));
        let _ = std::fs::write(&file, input);
        panic!(
            "{} input {n} ({}): {why}\n{}",
            door.name(),
            file.display(),
            String::from_utf8_lossy(&input[..input.len().min(600)])
        );
    }
    match outcome {
        Ok(Ok(v)) => v,
        _ => unreachable!("failures panicked above"),
    }
}

fn run(door: Door) {
    let seeds = seeds(door);
    // The fuzzer starts from the same seeds: `scripts/fuzz` takes them from here.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("../fuzz-seeds")
        .join(door.name());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (i, s) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:03}")), s).unwrap();
    }
    // Every seed is what the real source sends: the door must let it in, or the mutations
    // below would only ever test the first refusal.
    for (i, s) in seeds.iter().enumerate() {
        let v = pass(door, s, i);
        let meant_to_pass = s.first().is_none_or(|b| b % 2 == 0);
        assert!(
            !meant_to_pass || matches!(v, Verdict::Accepted(_)),
            "{} seed {i} refused: {v:?}",
            door.name()
        );
    }
    // Inputs that once broke the door (found by the fuzzer) must pass it now.
    let regressions = std::path::Path::new("tests/fuzz/regressions").join(door.name());
    if let Ok(found) = std::fs::read_dir(&regressions) {
        for (i, f) in found.enumerate() {
            let input = std::fs::read(f.unwrap().path()).unwrap();
            pass(door, &input, seeds.len() + i);
        }
    }
    let n: usize = std::env::var("HERALD_DOOR_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let mut cases = Cases(0x9E37_79B9_7F4A_7C15 ^ door.name().len() as u64);
    let (mut accepted, mut refused) = (0, 0);
    for i in 0..n {
        let seed = &seeds[cases.below(seeds.len())];
        let other = &seeds[cases.below(seeds.len())];
        let input = mutate(&mut cases, seed, other);
        match pass(door, &input, seeds.len() + i) {
            Verdict::Accepted(_) => accepted += 1,
            Verdict::Refused(_) => refused += 1,
        }
    }
    eprintln!(
        "{}: {} seeds, {n} mutations: {accepted} let in, {refused} refused",
        door.name(),
        seeds.len()
    );
}

#[test]
fn whatsapp_webhook() {
    run(Door::WhatsappWebhook);
}

#[test]
fn sms_webhook() {
    run(Door::SmsWebhook);
}

#[test]
fn email_webhook() {
    run(Door::EmailWebhook);
}

#[test]
fn input_record() {
    run(Door::InputRecord);
}

#[test]
fn dump_jsonl() {
    run(Door::DumpJsonLines);
}

#[test]
fn dump_avro() {
    run(Door::DumpAvro);
}

#[test]
fn topology() {
    run(Door::Topology);
}

#[test]
fn settings() {
    run(Door::Settings);
}
