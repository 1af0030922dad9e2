//! Topic dumps: the records `herald replay` reads, in two formats chosen by the file name.
//!
//! - `*.jsonl`: one JSON object per line, `{"topic", "partition", "offset", "timestamp", "key",
//!   "value"}`, the value in Herald's JSON form (as in the scenario files); a record that could
//!   not be decoded has `"error"` instead of `"value"`. Only `topic` and `value` are required:
//!   a missing partition is 0 and a missing offset is the line number.
//! - `*.avro`: an Avro object container file of `herald.dump.TopicRecord`, each value the Avro
//!   binary of its topic's Herald schema, which the file carries in its metadata under
//!   `herald.schema.<topic>`, so a dump stays readable after the schemas move on.
//!
//! `herald export` writes either from a cluster; `herald demo --record FILE` writes one after its run.

use crate::avro::{self, Schemas};
use crate::events::{Decision, InputEvent, StockLevel};
use crate::kafka::{position_of, EndOfLogIsExpected, KafkaSettings};
use crate::registry::{Codec, DecodeError};
use crate::replay::{DumpedRecord, Payload};
use crate::topology::{TopicNames, TopicRole};
use anyhow::{anyhow, bail, Context, Result};
use apache_avro::types::Value;
use apache_avro::Schema;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{BufRead, BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The topics a dump for `herald replay` holds: inputs, stock, decisions.
pub fn replay_topics(names: &TopicNames) -> Vec<String> {
    let mut t = names.inputs();
    t.extend([names.inventory().to_string(), names.decisions().to_string()]);
    t
}

const RECORD_SCHEMA: &str = r#"{
  "type": "record", "name": "TopicRecord", "namespace": "herald.dump",
  "doc": "One Kafka record; value is the Avro binary of the topic's schema, which the file metadata holds under herald.schema.<topic>.",
  "fields": [
    {"name": "topic", "type": "string"},
    {"name": "partition", "type": "int"},
    {"name": "offset", "type": "long"},
    {"name": "timestamp", "type": ["null", "long"], "default": null},
    {"name": "key", "type": ["null", "string"], "default": null},
    {"name": "value", "type": ["null", "bytes"], "default": null},
    {"name": "error", "type": ["null", "string"], "default": null}
  ]
}"#;

/// The two file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    JsonLines,
    Avro,
}

impl Format {
    /// The format a file name asks for.
    pub fn of(path: &Path) -> Result<Format> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl") | Some("json") => Ok(Format::JsonLines),
            Some("avro") => Ok(Format::Avro),
            _ => bail!(
                "{}: a dump file must end in .jsonl (JSON lines) or .avro (Avro container)",
                path.display()
            ),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct JsonLine {
    topic: String,
    #[serde(default)]
    partition: Option<i32>,
    #[serde(default)]
    offset: Option<i64>,
    #[serde(default)]
    timestamp: Option<i64>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Writes records to `path` in the format its name asks for; returns how many.
pub fn write(path: &Path, records: &[DumpedRecord]) -> Result<usize> {
    let format = Format::of(path)?;
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut out = BufWriter::new(file);
    match format {
        Format::JsonLines => {
            for r in records {
                let (value, error) = match &r.payload {
                    Payload::Input(e) => (Some(serde_json::to_value(e)?), None),
                    Payload::Decision(d) => (Some(serde_json::to_value(d)?), None),
                    Payload::Stock(s) => (Some(serde_json::to_value(s)?), None),
                    Payload::Undecodable(why) => (None, Some(why.clone())),
                };
                let line = JsonLine {
                    topic: r.topic.clone(),
                    partition: Some(r.partition),
                    offset: Some(r.offset),
                    timestamp: r.timestamp,
                    key: r.key.clone(),
                    value,
                    error,
                };
                serde_json::to_writer(&mut out, &line)?;
                out.write_all(b"\n")?;
            }
        }
        Format::Avro => write_avro(&mut out, records)?,
    }
    out.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(records.len())
}

fn union(present: Option<Value>) -> Value {
    match present {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(v) => Value::Union(1, Box::new(v)),
    }
}

/// The Avro binary of a decoded payload in its topic's schema; `None` for an undecodable one.
fn datum(p: &Payload) -> Result<Option<Vec<u8>>> {
    let Some(role) = role_of(p) else {
        return Ok(None);
    };
    let v = match p {
        Payload::Input(e) => avro::input_to_value(e)?,
        Payload::Decision(d) => avro::decision_to_value(d)?,
        Payload::Stock(s) => avro::stock_to_value(s)?,
        Payload::Undecodable(_) => return Ok(None),
    };
    let schema = Schemas::get().schema(role)?;
    let bytes = apache_avro::writer::datum::GenericDatumWriter::builder(schema)
        .build()?
        .write_value_to_vec(v)
        .map_err(|e| anyhow!("encoding a {} record: {e}", role.as_str()))?;
    Ok(Some(bytes))
}

/// The role of the topic a decoded payload came from.
fn role_of(p: &Payload) -> Option<TopicRole> {
    match p {
        Payload::Input(e) => Some(TopicRole::of_family(e.fact.family())),
        Payload::Decision(_) => Some(TopicRole::Decisions),
        Payload::Stock(_) => Some(TopicRole::Inventory),
        Payload::Undecodable(_) => None,
    }
}

fn write_avro<W: Write>(out: W, records: &[DumpedRecord]) -> Result<()> {
    let schema = Schema::parse_str(RECORD_SCHEMA)?;
    let mut w = apache_avro::Writer::new(&schema, out)?;
    // The writer schema of each topic the records came from, under the topic's own name, so a
    // reader with another prefix or later schemas can still map the values.
    let mut roles = std::collections::BTreeMap::new();
    for r in records {
        if let Some(role) = role_of(&r.payload) {
            roles.entry(r.topic.clone()).or_insert(role);
        }
    }
    for (topic, role) in &roles {
        w.add_user_metadata(
            format!("herald.schema.{topic}"),
            Schemas::get().text(*role)?,
        )?;
    }
    for r in records {
        let (value, error) = match &r.payload {
            Payload::Undecodable(why) => (None, Some(why.clone())),
            p => (datum(p)?, None),
        };
        w.append_value(Value::Record(vec![
            ("topic".into(), Value::String(r.topic.clone())),
            ("partition".into(), Value::Int(r.partition)),
            ("offset".into(), Value::Long(r.offset)),
            ("timestamp".into(), union(r.timestamp.map(Value::Long))),
            ("key".into(), union(r.key.clone().map(Value::String))),
            ("value".into(), union(value.map(Value::Bytes))),
            ("error".into(), union(error.map(Value::String))),
        ]))?;
    }
    w.flush()?;
    Ok(())
}

/// Reads a dump written by `write` (or by hand, for JSON lines). A line that is not JSON is an
/// error naming the line; a value that is not a record of its topic becomes `Undecodable`, as
/// the live processors would dead-letter it. Records of topics that play no replay role under
/// `names` (another deployment's, say) are skipped.
pub fn read(path: &Path, names: &TopicNames) -> Result<Vec<DumpedRecord>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    match Format::of(path)? {
        Format::JsonLines => read_json_lines(path, std::io::BufReader::new(file), names),
        Format::Avro => read_avro(path, std::io::BufReader::new(file), names),
    }
}

/// Reads a dump held in memory, `label` standing for its file name in errors: what `read` does
/// once the file is open (and what the fuzzer drives).
pub fn read_bytes(
    label: &Path,
    format: Format,
    bytes: &[u8],
    names: &TopicNames,
) -> Result<Vec<DumpedRecord>> {
    match format {
        Format::JsonLines => read_json_lines(label, bytes, names),
        Format::Avro => read_avro(label, bytes, names),
    }
}

/// What a replay topic holds; `None` for topics a dump has no use for.
#[derive(Clone, Copy)]
enum Holds {
    Inputs(crate::events::Family),
    Decisions,
    Stock,
}

impl Holds {
    fn role(self) -> TopicRole {
        match self {
            Holds::Inputs(family) => TopicRole::of_family(family),
            Holds::Decisions => TopicRole::Decisions,
            Holds::Stock => TopicRole::Inventory,
        }
    }
}

fn holds(names: &TopicNames, topic: &str) -> Option<Holds> {
    match names.role_of(topic)? {
        TopicRole::Decisions => Some(Holds::Decisions),
        TopicRole::Inventory => Some(Holds::Stock),
        role => role.family().map(Holds::Inputs),
    }
}

fn from_json(names: &TopicNames, topic: &str, v: serde_json::Value) -> Option<Payload> {
    let decoded = match holds(names, topic)? {
        Holds::Inputs(_) => serde_json::from_value::<InputEvent>(v).map(Payload::Input),
        Holds::Decisions => serde_json::from_value::<Decision>(v).map(Payload::Decision),
        Holds::Stock => serde_json::from_value::<StockLevel>(v).map(Payload::Stock),
    };
    Some(decoded.unwrap_or_else(|e| Payload::Undecodable(format!("not a {topic} record: {e}"))))
}

fn read_json_lines(
    path: &Path,
    input: impl BufRead,
    names: &TopicNames,
) -> Result<Vec<DumpedRecord>> {
    let mut out = Vec::new();
    for (n, line) in input.lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let l: JsonLine = serde_json::from_str(&line)
            .with_context(|| format!("{} line {}: not a dump record", path.display(), n + 1))?;
        if holds(names, &l.topic).is_none() {
            continue;
        }
        let payload = match (l.value, l.error) {
            (Some(v), _) => match from_json(names, &l.topic, v) {
                Some(p) => p,
                None => continue,
            },
            (None, Some(why)) => Payload::Undecodable(why),
            (None, None) => Payload::Undecodable("record has no value".into()),
        };
        out.push(DumpedRecord {
            topic: l.topic,
            partition: l.partition.unwrap_or(0),
            offset: l.offset.unwrap_or(n as i64),
            timestamp: l.timestamp,
            key: l.key,
            payload,
        });
    }
    Ok(out)
}

fn field<'v>(fields: &'v [(String, Value)], name: &str) -> Option<&'v Value> {
    fields
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| match v {
            Value::Union(_, inner) => inner.as_ref(),
            other => other,
        })
}

/// Decodes one value with the writer schema the file carries, mapped onto this Herald's shape
/// when the schemas differ (`same`, checked once per topic).
fn from_datum(
    holds: Holds,
    writer: &Schema,
    reader: &apache_avro::reader::datum::GenericDatumReader,
    same: bool,
    bytes: &[u8],
) -> Result<Payload> {
    let v = reader.read_value(&mut &bytes[..])?;
    let v = if same {
        v
    } else {
        avro::to_reader_shape(holds.role(), writer, v)?
    };
    Ok(match holds {
        Holds::Inputs(family) => Payload::Input(avro::input_from_value(family, &v)?),
        Holds::Decisions => Payload::Decision(avro::decision_from_value(&v)?),
        Holds::Stock => Payload::Stock(apache_avro::from_value(&v)?),
    })
}

fn read_avro(
    path: &Path,
    input: impl std::io::Read,
    names: &TopicNames,
) -> Result<Vec<DumpedRecord>> {
    let reader = apache_avro::Reader::new(input)
        .with_context(|| format!("{}: not an Avro container file", path.display()))?;
    let mut writers: HashMap<String, Schema> = HashMap::new();
    for (k, v) in reader.user_metadata() {
        if let Some(topic) = k.strip_prefix("herald.schema.") {
            let text = std::str::from_utf8(v)
                .with_context(|| format!("{}: metadata {k} is not text", path.display()))?;
            writers.insert(topic.to_string(), Schema::parse_str(text)?);
        }
    }
    let mut decoders = HashMap::new();
    for (topic, writer) in &writers {
        let Some(holds) = holds(names, topic) else {
            continue;
        };
        let reader = apache_avro::reader::datum::GenericDatumReader::builder(writer).build()?;
        let same = avro::same_as_reader(holds.role(), writer).unwrap_or(false);
        decoders.insert(topic.clone(), (holds, writer, reader, same));
    }
    let mut out = Vec::new();
    for (n, value) in reader.enumerate() {
        let value = value.with_context(|| format!("{} record {n}", path.display()))?;
        let Value::Record(fields) = value else {
            bail!("{} record {n}: not a TopicRecord", path.display());
        };
        let text = |name: &str| match field(&fields, name) {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        let topic =
            text("topic").ok_or_else(|| anyhow!("{} record {n}: no topic", path.display()))?;
        if holds(names, &topic).is_none() {
            continue;
        }
        let payload = match (field(&fields, "value"), text("error")) {
            (Some(Value::Bytes(b)), _) => {
                let Some((holds, writer, reader, same)) = decoders.get(&topic) else {
                    continue;
                };
                match from_datum(*holds, writer, reader, *same, b) {
                    Ok(p) => p,
                    Err(e) => Payload::Undecodable(format!("not a {topic} record: {e:#}")),
                }
            }
            (_, Some(why)) => Payload::Undecodable(why),
            _ => Payload::Undecodable("record has no value".into()),
        };
        out.push(DumpedRecord {
            partition: match field(&fields, "partition") {
                Some(Value::Int(p)) => *p,
                _ => 0,
            },
            offset: match field(&fields, "offset") {
                Some(Value::Long(o)) => *o,
                _ => n as i64,
            },
            timestamp: match field(&fields, "timestamp") {
                Some(Value::Long(t)) => Some(*t),
                _ => None,
            },
            key: text("key"),
            topic,
            payload,
        });
    }
    Ok(out)
}

fn decode(codec: &Codec, rt: &tokio::runtime::Handle, m: &BorrowedMessage) -> Result<Payload> {
    let topic = m.topic();
    let decoded = match holds(codec.topics(), topic) {
        Some(Holds::Inputs(_)) => rt
            .block_on(codec.decode_input(topic, m.payload()))
            .map(Payload::Input),
        Some(Holds::Decisions) => rt
            .block_on(codec.decode_decision(m.payload()))
            .map(Payload::Decision),
        Some(Holds::Stock) => rt
            .block_on(codec.decode_stock(m.payload()))
            .map(Payload::Stock),
        None => return Err(anyhow!("{topic} is not a topic a dump holds")),
    };
    match decoded {
        Ok(p) => Ok(p),
        Err(DecodeError::Poison(why)) => Ok(Payload::Undecodable(why)),
        Err(e @ DecodeError::Retryable(_)) => Err(anyhow!("reading {topic}: {e}")),
    }
}

/// A reader of the replay topics that runs alongside a live system and keeps every committed
/// record as it arrives, so that a broker which trims old segments (the in-process cluster keeps
/// 5 MB per partition) cannot take records from the dump.
pub struct Follower {
    finish: Arc<AtomicBool>,
    /// Dedupe decisions read so far (one per decided input record, of the counted ones if
    /// the follower was given them), and approvals.
    decided_inputs: Arc<std::sync::atomic::AtomicU64>,
    approved: Arc<std::sync::atomic::AtomicU64>,
    handle: std::thread::JoinHandle<Result<Vec<DumpedRecord>>>,
}

impl Follower {
    /// Starts reading `topics` (replay topics) from their beginning (read_committed).
    pub fn start(
        cluster: &KafkaSettings,
        topics: Vec<String>,
        codec: Arc<Codec>,
        partitions: i32,
        rt: tokio::runtime::Handle,
    ) -> Result<Self> {
        Self::counting(cluster, topics, codec, partitions, rt, None)
    }

    /// As `start`, counting as decided only the input records whose event id is in `counted`
    /// (a feed's own records, not the status webhooks the gateway adds).
    pub fn counting(
        cluster: &KafkaSettings,
        topics: Vec<String>,
        codec: Arc<Codec>,
        partitions: i32,
        rt: tokio::runtime::Handle,
        counted: Option<std::collections::HashSet<String>>,
    ) -> Result<Self> {
        let mut settings = cluster.clone();
        settings.instance_id = format!("dump-{}", std::process::id());
        let consumer: BaseConsumer<EndOfLogIsExpected> = settings.log_reader()?;
        let mut tpl = TopicPartitionList::new();
        for topic in &topics {
            for p in 0..partitions {
                tpl.add_partition_offset(topic, p, Offset::Beginning)?;
            }
        }
        consumer.assign(&tpl)?;
        let finish = Arc::new(AtomicBool::new(false));
        let flag = finish.clone();
        let decided_inputs = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let approved = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (decided, approvals) = (decided_inputs.clone(), approved.clone());
        let handle = std::thread::spawn(move || {
            let mut out = Vec::new();
            let mut approved_ids = std::collections::HashSet::new();
            // Set once finishing: the end offsets to reach, per topic and partition.
            let mut ends: Option<HashMap<(String, i32), i64>> = None;
            let mut deadline = None;
            loop {
                if ends.is_none() && flag.load(Ordering::SeqCst) {
                    let mut e = HashMap::new();
                    for topic in &topics {
                        for p in 0..partitions {
                            let (_, high) = crate::kafka::watermarks(&consumer, topic, p)?;
                            e.insert((topic.to_string(), p), high);
                        }
                    }
                    ends = Some(e);
                    deadline = Some(Instant::now() + Duration::from_secs(300));
                }
                if let Some(e) = &ends {
                    let done = e.iter().all(|((t, p), high)| {
                        *high == 0 || position_of(&consumer, t, *p).is_ok_and(|pos| pos >= *high)
                    });
                    if done {
                        return Ok(out);
                    }
                    if deadline.is_some_and(|d| Instant::now() > d) {
                        bail!("the dump did not reach the end of the topics in 300 s");
                    }
                }
                match consumer.poll(Duration::from_millis(100)) {
                    Some(Ok(m)) => {
                        let payload = decode(&codec, &rt, &m)?;
                        if let Payload::Decision(d) = &payload {
                            if d.processor == crate::events::Processor::Dedupe
                                && counted
                                    .as_ref()
                                    .is_none_or(|c| c.contains(&d.input_event_id))
                            {
                                decided.fetch_add(1, Ordering::Relaxed);
                            }
                            if let crate::events::Outcome::MessageApproved(a) = &d.outcome {
                                if approved_ids.insert(a.message_id.clone()) {
                                    approvals.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        out.push(DumpedRecord {
                            topic: m.topic().to_string(),
                            partition: m.partition(),
                            offset: m.offset(),
                            timestamp: m.timestamp().to_millis(),
                            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                            payload,
                        })
                    }
                    Some(Err(KafkaError::PartitionEOF(_))) | None => {}
                    // A broker that died or restarts: librdkafka reconnects by itself.
                    Some(Err(e)) if crate::kafka::passes(&e) => {}
                    Some(Err(e)) => bail!("reading the topics for the dump: {e}"),
                }
            }
        });
        Ok(Follower {
            finish,
            decided_inputs,
            approved,
            handle,
        })
    }

    /// Input records decided so far (dedupe decisions read).
    pub fn decided_inputs(&self) -> u64 {
        self.decided_inputs.load(Ordering::Relaxed)
    }

    /// The counter behind `decided_inputs`, for another thread to watch.
    pub fn decided_inputs_counter(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.decided_inputs.clone()
    }

    /// Distinct messages approved so far.
    pub fn approved(&self) -> u64 {
        self.approved.load(Ordering::Relaxed)
    }

    /// Reads on to the topics' current end and returns every record read.
    pub fn finish(self) -> Result<Vec<DumpedRecord>> {
        self.finish.store(true, Ordering::SeqCst);
        self.handle
            .join()
            .map_err(|_| anyhow!("the dump reader panicked"))?
    }
}

/// Reads `topics` (replay topics) whole from a cluster (read_committed) and decodes them
/// through the registry. A registry outage fails the export; a record that cannot be decoded is
/// kept with its reason.
pub fn export(
    cluster: &KafkaSettings,
    topics: Vec<String>,
    codec: Arc<Codec>,
    partitions: i32,
    rt: tokio::runtime::Handle,
) -> Result<Vec<DumpedRecord>> {
    Follower::start(cluster, topics, codec, partitions, rt)?.finish()
}

/// The decisions of dump files, or of a cluster's decision log, in log order per partition.
pub fn decisions(records: &[DumpedRecord]) -> Vec<Decision> {
    let mut ds: Vec<(&DumpedRecord, &Decision)> = records
        .iter()
        .filter_map(|r| match &r.payload {
            Payload::Decision(d) => Some((r, d)),
            _ => None,
        })
        .collect();
    ds.sort_by_key(|(r, _)| (r.partition, r.offset));
    ds.into_iter().map(|(_, d)| d.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::*;

    fn names() -> TopicNames {
        crate::topology::Topology::embedded().unwrap().names
    }

    fn sample() -> Vec<DumpedRecord> {
        let input = InputEvent {
            envelope: Envelope {
                event_id: "e-1".into(),
                source_system: "oms".into(),
                source_sequence: Some(1),
                occurred_at: 1_772_445_600_000,
                customer_id: "c-1".into(),
                trace_parent: None,
                schema_version: 1,
            },
            fact: Fact::OrderCancelled(OrderCancelled {
                order_id: "o-1".into(),
                reason: "customer".into(),
            }),
        };
        let decision = Decision {
            decision_id: "d-1".into(),
            customer_id: "c-1".into(),
            input_event_id: "e-1".into(),
            processor: Processor::Dedupe,
            decided_at: 1_772_445_600_000,
            policy_version: "v".into(),
            outcome: Outcome::DuplicateIgnored(DuplicateIgnored {
                event_id: "e-1".into(),
                first_seen_at: 1,
                repeats_event_id: None,
                identity: None,
            }),
            consent_chain: None,
        };
        let at = |topic: &str, offset, payload| DumpedRecord {
            topic: topic.into(),
            partition: 3,
            offset,
            timestamp: Some(7),
            key: Some("c-1".into()),
            payload,
        };
        vec![
            at("oms.events.v1", 5, Payload::Input(input)),
            at(
                "oms.events.v1",
                6,
                Payload::Undecodable("magic byte 0x7b".into()),
            ),
            at("herald.decisions.v1", 0, Payload::Decision(decision)),
            at(
                "catalog.inventory.v1",
                1,
                Payload::Stock(StockLevel {
                    sku: "S".into(),
                    available: 0,
                    updated_at: 3,
                    source_system: "wms".into(),
                }),
            ),
        ]
    }

    #[test]
    fn both_formats_give_back_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["d.jsonl", "d.avro"] {
            let path = dir.path().join(name);
            write(&path, &sample()).unwrap();
            assert_eq!(read(&path, &names()).unwrap(), sample(), "{name}");
        }
    }

    #[test]
    fn a_dump_is_read_by_the_topic_names_of_the_deployment_it_is_read_for() {
        let dir = tempfile::tempdir().unwrap();
        let staging = crate::topology::Topology::embedded()
            .unwrap()
            .with_topic_prefix("staging.")
            .unwrap()
            .names;
        let prefixed: Vec<DumpedRecord> = sample()
            .into_iter()
            .map(|mut r| {
                r.topic = format!("staging.{}", r.topic);
                r
            })
            .collect();
        for name in ["d.jsonl", "d.avro"] {
            let path = dir.path().join(name);
            write(&path, &prefixed).unwrap();
            assert_eq!(read(&path, &staging).unwrap(), prefixed, "{name}");
            // Production's names match none of staging's topics: nothing is taken for its own.
            assert_eq!(read(&path, &names()).unwrap(), vec![], "{name}");
        }
    }

    #[test]
    fn a_bad_line_is_named_and_a_bad_value_is_kept_as_undecodable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(
            &path,
            "{\"topic\": \"crm.events.v1\", \"value\": {\"nope\": 1}}\n{oops\n",
        )
        .unwrap();
        let err = read(&path, &names()).unwrap_err();
        assert!(format!("{err:#}").contains("line 2"), "{err:#}");
        std::fs::write(
            &path,
            "{\"topic\": \"crm.events.v1\", \"value\": {\"nope\": 1}}\n",
        )
        .unwrap();
        let r = read(&path, &names()).unwrap();
        assert!(
            matches!(&r[0].payload, Payload::Undecodable(why) if why.contains("crm.events.v1"))
        );
        assert_eq!((r[0].partition, r[0].offset), (0, 0));
    }

    #[test]
    fn an_unknown_extension_is_refused_with_the_accepted_ones() {
        let err = Format::of(Path::new("dump.csv")).unwrap_err();
        assert!(err.to_string().contains(".jsonl"));
    }
}
