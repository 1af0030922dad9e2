//! The doors where outside bytes come into Herald, each one function of arbitrary bytes, so a
//! coverage-guided fuzzer (`tests/fuzz`, `cargo fuzz`) and the suite's short run
//! (`tests/doors.rs`) drive the very code the gateway, the processors, `herald replay` and the
//! configuration loaders run. A door reads its bytes as the real one does, then checks what it
//! let in: an accepted webhook's events fit their Avro schema and read back the same, a record
//! decoded off an input topic encodes back to the same event, a dump's every input record is
//! either decided or dead-lettered, a loaded topology decides a few plain facts. A refusal must
//! say why. A check that fails is a [`Broken`]: a bug, which the fuzzer reports as a crash.

use crate::avro::{self, Schemas};
use crate::dump::{self, Format};
use crate::events::{Family, InputEvent};
use crate::identity::IdentifierKey;
use crate::provider::callback::Callback;
use crate::provider::whatsapp;
use crate::topology::{TopicRole, Topology};
use crate::webhook::{self, Refusal, Route};
use std::path::Path;

/// The app secret the WhatsApp door's valid signatures are made with.
const APP_SECRET: &[u8] = b"door-app-secret";
/// The SMS account token the SMS door's valid signatures are made with.
const SMS_TOKEN: &[u8] = b"door-sms-token";
/// The e-mail webhook's basic-auth credentials.
const EMAIL_AUTH: (&str, &str) = ("herald", "door-password");
/// The number the sender directory knows, as the provider writes it (no `+`).
pub const KNOWN_SENDER: &str = "15550100001";
/// A receive time for callbacks that carry none.
const RECEIVED_AT: i64 = 1_795_500_000_000;

/// One door.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    /// `POST /webhook`: a Cloud API webhook and its `X-Hub-Signature-256`.
    WhatsappWebhook,
    /// `POST /webhooks/sms`: form fields, the callback URL and `X-Twilio-Signature`.
    SmsWebhook,
    /// `POST /webhooks/email`: a JSON list of delivery events under basic auth.
    EmailWebhook,
    /// A record's Avro body on one of the four input topics.
    InputRecord,
    /// A JSON-lines dump given to `herald replay`.
    DumpJsonLines,
    /// An Avro container dump given to `herald replay`.
    DumpAvro,
    /// One of the topology files: topics, templates, policy or a journey.
    Topology,
    /// Settings: a librdkafka properties file and a `--store` address.
    Settings,
}

impl Door {
    /// Every door, in the order the README lists them.
    pub const ALL: [Door; 8] = [
        Door::WhatsappWebhook,
        Door::SmsWebhook,
        Door::EmailWebhook,
        Door::InputRecord,
        Door::DumpJsonLines,
        Door::DumpAvro,
        Door::Topology,
        Door::Settings,
    ];

    /// The door's name: the fuzz target's and the seed folder's.
    pub fn name(self) -> &'static str {
        match self {
            Door::WhatsappWebhook => "whatsapp_webhook",
            Door::SmsWebhook => "sms_webhook",
            Door::EmailWebhook => "email_webhook",
            Door::InputRecord => "input_record",
            Door::DumpJsonLines => "dump_jsonl",
            Door::DumpAvro => "dump_avro",
            Door::Topology => "topology",
            Door::Settings => "settings",
        }
    }

    /// Passes `data` through the door.
    pub fn open(self, data: &[u8]) -> Result<Verdict, Broken> {
        match self {
            Door::WhatsappWebhook => whatsapp_webhook(data),
            Door::SmsWebhook => sms_webhook(data),
            Door::EmailWebhook => email_webhook(data),
            Door::InputRecord => input_record(data),
            Door::DumpJsonLines => dump_file(Format::JsonLines, data),
            Door::DumpAvro => dump_file(Format::Avro, data),
            Door::Topology => topology(data),
            Door::Settings => settings(data),
        }
    }
}

/// What a door did with its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Let in: how many events, records or settings came through.
    Accepted(usize),
    /// Turned away, and why.
    Refused(String),
}

/// A check a door's result failed: a bug in Herald.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{door}: {why}")]
pub struct Broken {
    pub door: &'static str,
    pub why: String,
}

fn broken(door: Door, why: impl Into<String>) -> Broken {
    Broken {
        door: door.name(),
        why: why.into(),
    }
}

fn refused(door: Door, why: String) -> Result<Verdict, Broken> {
    if why.trim().is_empty() {
        return Err(broken(door, "a refusal that gives no reason"));
    }
    Ok(Verdict::Refused(why))
}

/// How a webhook door's first byte says its request is signed.
enum Signing<'a> {
    /// Correctly, over the rest of the bytes.
    Valid,
    /// Not at all.
    Missing,
    /// With these header bytes.
    Given(&'a [u8]),
}

/// Splits a webhook door's bytes: the first chooses the signing (even: valid; otherwise the
/// second byte is a header length, 255 meaning no header), the rest is the body.
fn signing(data: &[u8]) -> (Signing<'_>, &[u8]) {
    match data {
        [] => (Signing::Valid, &[]),
        [flags, rest @ ..] if flags % 2 == 0 => (Signing::Valid, rest),
        [_, 255, rest @ ..] => (Signing::Missing, rest),
        [_, len, rest @ ..] => {
            let n = (*len as usize).min(rest.len());
            (Signing::Given(&rest[..n]), &rest[n..])
        }
        [_] => (Signing::Missing, &[]),
    }
}

/// What the gateway does with callbacks it let in: each becomes a provider event for its
/// customer (or every partition) or a dead letter; every event must fit the provider schema.
fn let_in(door: Door, callbacks: &[Callback]) -> Result<Verdict, Broken> {
    let known = |from: &str| (from == KNOWN_SENDER).then(|| "cust-door".to_string());
    for c in callbacks {
        if webhook::event_id(c).is_empty() {
            return Err(broken(door, format!("a callback with no event id: {c:?}")));
        }
        let customer = match webhook::route(c, known) {
            Route::Customer(customer) => customer,
            Route::Everyone => "template:door".to_string(),
            Route::Unroutable(why) if why.trim().is_empty() => {
                return Err(broken(door, "an unroutable callback that gives no reason"))
            }
            Route::Unroutable(_) => continue,
        };
        survives_avro(
            door,
            Family::Provider,
            &webhook::provider_event(c, &customer),
        )?;
    }
    Ok(Verdict::Accepted(callbacks.len()))
}

/// An event must encode under its topic's schema and read back as itself, as the processors
/// will read it.
fn survives_avro(door: Door, family: Family, e: &InputEvent) -> Result<(), Broken> {
    let schema = Schemas::get()
        .schema(TopicRole::of_family(family))
        .map_err(|e| broken(door, format!("no schema: {e:#}")))?;
    let value = avro::input_to_value(e)
        .map_err(|why| broken(door, format!("{e:?} has no Avro value: {why:#}")))?;
    let bytes = apache_avro::writer::datum::GenericDatumWriter::builder(schema)
        .build()
        .and_then(|w| w.write_value_to_vec(value))
        .map_err(|why| broken(door, format!("{e:?} does not fit its schema: {why}")))?;
    let read = read_datum(schema, &bytes)
        .map_err(|why| broken(door, format!("{e:?} encoded unreadably: {why}")))?;
    let back = avro::input_from_value(family, &read)
        .map_err(|why| broken(door, format!("{e:?} read back as no event: {why:#}")))?;
    if &back != e {
        return Err(broken(
            door,
            format!("{e:?} read back as a different event: {back:?}"),
        ));
    }
    Ok(())
}

/// Reads one Avro value with `schema`, as the registry codec does once it has the writer's.
fn read_datum(
    schema: &apache_avro::Schema,
    mut bytes: &[u8],
) -> Result<apache_avro::types::Value, apache_avro::Error> {
    apache_avro::reader::datum::GenericDatumReader::builder(schema)
        .build()?
        .read_value(&mut bytes)
}

fn webhook_verdict(
    door: Door,
    result: Result<Vec<Callback>, Refusal>,
    validly_signed: bool,
) -> Result<Verdict, Broken> {
    match result {
        Ok(_) if !validly_signed => Err(broken(door, "let in without a valid signature")),
        Ok(callbacks) => let_in(door, &callbacks),
        Err(Refusal::Unauthorized(why)) if validly_signed => Err(broken(
            door,
            format!("a validly signed request refused as unauthorized: {why}"),
        )),
        Err(Refusal::Unauthorized(why)) => refused(door, why),
        Err(Refusal::BadRequest(e)) => refused(door, e.0),
    }
}

fn whatsapp_webhook(data: &[u8]) -> Result<Verdict, Broken> {
    let door = Door::WhatsappWebhook;
    let (signing, body) = signing(data);
    let valid = whatsapp::sign(APP_SECRET, body);
    let header = match signing {
        Signing::Valid => Some(valid.as_bytes()),
        Signing::Missing => None,
        Signing::Given(h) => Some(h),
    };
    // Hex digits may come in either case: a header equal but for case is as valid.
    let validly_signed = header.is_some_and(|h| h.eq_ignore_ascii_case(valid.as_bytes()));
    let result = webhook::read_whatsapp(APP_SECRET, header, body, RECEIVED_AT);
    webhook_verdict(door, result, validly_signed)
}

fn sms_webhook(data: &[u8]) -> Result<Verdict, Broken> {
    let door = Door::SmsWebhook;
    let (signing, rest) = signing(data);
    // The callback URL comes first, up to a newline; the form body follows.
    let (url, body) = match rest.iter().position(|b| *b == b'\n') {
        Some(i) => (
            String::from_utf8_lossy(&rest[..i]).into_owned(),
            &rest[i + 1..],
        ),
        None => ("https://herald.example.com/webhooks/sms".to_string(), rest),
    };
    let fields: Vec<(String, String)> = form_urlencoded::parse(body).into_owned().collect();
    let valid = crate::provider::sms::sign(SMS_TOKEN, &url, &fields);
    let header = match signing {
        Signing::Valid => Some(valid.as_bytes()),
        Signing::Missing => None,
        Signing::Given(h) => Some(h),
    };
    let validly_signed = header == Some(valid.as_bytes());
    let result = webhook::read_sms(SMS_TOKEN, header, &url, body, RECEIVED_AT);
    webhook_verdict(door, result, validly_signed)
}

fn email_webhook(data: &[u8]) -> Result<Verdict, Broken> {
    let door = Door::EmailWebhook;
    let (signing, body) = signing(data);
    let valid = crate::provider::email::basic_auth(EMAIL_AUTH.0, EMAIL_AUTH.1);
    let header = match signing {
        Signing::Valid => Some(valid.as_bytes()),
        Signing::Missing => None,
        Signing::Given(h) => Some(h),
    };
    let validly_signed = header == Some(valid.as_bytes());
    let result = webhook::read_email(EMAIL_AUTH, header, body, RECEIVED_AT);
    webhook_verdict(door, result, validly_signed)
}

const FAMILIES: [Family; 4] = [Family::Oms, Family::Billing, Family::Crm, Family::Provider];

/// The first byte picks the input topic; the rest is the record's Avro body, read with the
/// topic's schema as the processors read a record written with Herald's own.
fn input_record(data: &[u8]) -> Result<Verdict, Broken> {
    let door = Door::InputRecord;
    let Some((pick, body)) = data.split_first() else {
        return Ok(Verdict::Refused("empty".into()));
    };
    let family = FAMILIES[*pick as usize % FAMILIES.len()];
    let schema = Schemas::get()
        .schema(TopicRole::of_family(family))
        .map_err(|e| broken(door, format!("no schema: {e:#}")))?;
    let value = match read_datum(schema, body) {
        Ok(v) => v,
        Err(e) => return refused(door, e.to_string()),
    };
    match avro::input_from_value(family, &value) {
        Ok(e) => {
            survives_avro(door, family, &e)?;
            Ok(Verdict::Accepted(1))
        }
        Err(e) => refused(door, format!("{e:#}")),
    }
}

/// A dump as `herald replay` reads it, then replayed: every input-topic record must come out
/// decided or dead-lettered.
fn dump_file(format: Format, data: &[u8]) -> Result<Verdict, Broken> {
    let door = match format {
        Format::JsonLines => Door::DumpJsonLines,
        Format::Avro => Door::DumpAvro,
    };
    let topology = embedded(door)?;
    let label = match format {
        Format::JsonLines => Path::new("fuzzed.jsonl"),
        Format::Avro => Path::new("fuzzed.avro"),
    };
    let records = match dump::read_bytes(label, format, data, &topology.names) {
        Ok(r) => r,
        Err(e) => return refused(door, format!("{e:#}")),
    };
    let on_inputs = records
        .iter()
        .filter(|r| topology.names.family_of(&r.topic).is_some())
        .filter(|r| {
            matches!(
                r.payload,
                crate::replay::Payload::Input(_) | crate::replay::Payload::Undecodable(_)
            )
        })
        .count();
    let replayed = crate::replay::replay(&records, topology, &IdentifierKey::demo());
    if replayed.inputs + replayed.dead_letters.len() != on_inputs {
        return Err(broken(
            door,
            format!(
                "{on_inputs} input records, {} decided and {} dead-lettered",
                replayed.inputs,
                replayed.dead_letters.len()
            ),
        ));
    }
    Ok(Verdict::Accepted(records.len()))
}

/// The embedded topology, parsed once: doors run millions of times.
fn embedded(door: Door) -> Result<&'static Topology, Broken> {
    static EMBEDDED: std::sync::OnceLock<Result<Topology, String>> = std::sync::OnceLock::new();
    EMBEDDED
        .get_or_init(|| Topology::embedded().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| broken(door, format!("the embedded topology: {e}")))
}

const TOPOLOGY_FILES: [&str; 3] = ["topics.toml", "templates.toml", "policy.toml"];

/// The first byte picks the file the rest replaces (topics, templates, policy, then each
/// journey in turn); the others are the embedded ones. A topology that loads must decide plain facts.
fn topology(data: &[u8]) -> Result<Verdict, Broken> {
    let door = Door::Topology;
    let Some((pick, text)) = data.split_first() else {
        return Ok(Verdict::Refused("empty".into()));
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return Ok(Verdict::Refused("not UTF-8".into()));
    };
    let embedded_text = |f: &str| {
        crate::topology::EMBEDDED
            .iter()
            .find(|(n, _)| *n == f)
            .map(|(_, t)| *t)
            .unwrap_or_default()
    };
    let mut files = TOPOLOGY_FILES.map(embedded_text);
    let mut journeys: Vec<(String, String)> = crate::topology::EMBEDDED_JOURNEYS
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    let pick = *pick as usize % (files.len() + journeys.len());
    match files.get_mut(pick) {
        Some(f) => *f = text,
        None => {
            if let Some((_, j)) = journeys.get_mut(pick - files.len()) {
                *j = text.to_string();
            }
        }
    }
    let loaded = match Topology::from_parts(files[0], files[1], files[2], &journeys) {
        Ok(t) => t,
        Err(e) => return refused(door, format!("{e:#}")),
    };
    if loaded.partitions() < 1 {
        return Err(broken(door, "a topology with no partitions loaded"));
    }
    decide_plain_facts(&loaded);
    Ok(Verdict::Accepted(1))
}

/// A customer's profile, consent, an order and a reply, decided under `topology` and then
/// carried a month on so every timer and journey step fires: a topology the loader accepted
/// must not make the core fail on the plainest facts.
fn decide_plain_facts(topology: &Topology) {
    use crate::events::*;
    let at = RECEIVED_AT;
    let consent = |purpose| {
        Fact::ConsentGranted(ConsentChange {
            purpose,
            channel: Channel::Whatsapp,
            source: "checkout".into(),
            artifact_id: "form-1".into(),
        })
    };
    let facts = [
        Fact::ProfileChanged(ProfileChanged {
            first_name: Some("Ana".into()),
            locale: Some("en_US".into()),
            time_zone: Some("Europe/Madrid".into()),
            phone_e164: Some("+15550100001".into()),
            email: Some("ana@example.com".into()),
        }),
        consent(Purpose::Transactional),
        consent(Purpose::Marketing),
        Fact::OrderPlaced(OrderPlaced {
            order_id: "o-1".into(),
            items: vec![],
            total: Some(Money {
                minor_units: 4_500,
                currency: "EUR".into(),
            }),
        }),
        Fact::InboundMessageReceived(InboundMessageReceived {
            provider_message_id: "wamid.1".into(),
            text: "STOP".into(),
            message_type: Some("text".into()),
            button_payload: None,
            reply_id: None,
        }),
    ];
    let tables = crate::tables::Tables::default();
    let mut task = crate::task::Task::default();
    for (i, fact) in facts.into_iter().enumerate() {
        let e = InputEvent::new("door", "cust-door", &format!("e{i}"), at + i as i64, fact);
        task.decide(&e, &format!("door/0/{i}"), topology, &tables);
    }
    task.advance_to(at + 31 * 86_400_000, topology, &tables);
}

/// The first byte picks the setting: a properties file (even) or a `--store` address (odd).
fn settings(data: &[u8]) -> Result<Verdict, Broken> {
    let door = Door::Settings;
    let Some((pick, text)) = data.split_first() else {
        return Ok(Verdict::Refused("empty".into()));
    };
    let text = String::from_utf8_lossy(text);
    if pick % 2 == 0 {
        match crate::kafka::parse_properties(&text) {
            Ok(settings) => {
                if let Some((k, v)) = settings
                    .iter()
                    .find(|(k, v)| k.is_empty() || k.trim() != k || v.trim() != v)
                {
                    return Err(broken(door, format!("a setting read as '{k}'='{v}'")));
                }
                Ok(Verdict::Accepted(settings.len()))
            }
            Err(why) => refused(door, why),
        }
    } else {
        match crate::store::StoreAddress::parse(&text) {
            Ok(_) => Ok(Verdict::Accepted(1)),
            Err(e) => refused(door, format!("{e:#}")),
        }
    }
}
