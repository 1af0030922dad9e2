//! Herald's records straight to and from Avro binary, with no generic `Value` in between.
//!
//! The registry codec uses this for every record written with the schema this build reads
//! (the common case: Herald wrote it). apache-avro's schema-aware serializer walks the schema
//! and the Rust type together, so nothing is built, validated or conformed per record. Unions
//! are still chosen by index (see the note in [`crate::avro`]): the wrappers here name the
//! branch, because several Herald records share a shape.
//!
//! Records written with another schema version take the slower path in `avro.rs`, which
//! resolves the writer's schema against the reader's.

use crate::avro::Schemas;
use crate::events::*;
use crate::schema_plan::{Plan, PlanError};
use crate::topology::TopicRole;
use crate::unions::{read_fact, read_outcome, read_step, write_fact, write_outcome, write_step};
use anyhow::{anyhow, bail, Context, Result};
use apache_avro::writer::datum::GenericDatumWriter;
use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Deserializer, EnumAccess, VariantAccess, Visitor,
};
use serde::ser::{SerializeStruct, Serializer};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::OnceLock;

/// The branch index of a union, as the schema-aware deserializer names it.
struct BranchIndex;

impl<'de> DeserializeSeed<'de> for BranchIndex {
    type Value = usize;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
        struct Index;
        impl Visitor<'_> for Index {
            type Value = usize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a union branch index")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<usize, E> {
                Ok(v as usize)
            }
        }
        d.deserialize_identifier(Index)
    }
}

/// A record field's position among the names a visitor knows (`names.len()` if unknown).
struct FieldOf(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for FieldOf {
    type Value = usize;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
        d.deserialize_identifier(self)
    }
}

impl Visitor<'_> for FieldOf {
    type Value = usize;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<usize, E> {
        Ok(self.0.iter().position(|n| *n == v).unwrap_or(self.0.len()))
    }
}

/// Reads a fact branch; a consent change is read by shape, as one Rust type serves the two
/// records (`ConsentGranted`, `ConsentRevoked`) and the reader checks record names.
fn read_fact_branch<'de, A: VariantAccess<'de>>(idx: usize, v: A) -> Result<Fact, A::Error> {
    match idx {
        13 => v
            .newtype_variant_seed(ConsentChangeFrom)
            .map(Fact::ConsentGranted),
        14 => v
            .newtype_variant_seed(ConsentChangeFrom)
            .map(Fact::ConsentRevoked),
        _ => read_fact(idx, v),
    }
}

/// A `ConsentGranted` or `ConsentRevoked` record as a [`ConsentChange`].
struct ConsentChangeFrom;

impl<'de> DeserializeSeed<'de> for ConsentChangeFrom {
    type Value = ConsentChange;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<ConsentChange, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ConsentChangeFrom {
    type Value = ConsentChange;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a consent change record")
    }
    fn visit_map<A: de::MapAccess<'de>>(self, mut m: A) -> Result<ConsentChange, A::Error> {
        let (mut purpose, mut channel, mut source, mut artifact_id) = (None, None, None, None);
        const NAMES: &[&str] = &["purpose", "channel", "source", "artifact_id"];
        while let Some(key) = m.next_key_seed(FieldOf(NAMES))? {
            match key {
                0 => purpose = Some(m.next_value()?),
                1 => channel = Some(m.next_value()?),
                2 => source = Some(m.next_value()?),
                3 => artifact_id = Some(m.next_value()?),
                _ => {
                    m.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        Ok(ConsentChange {
            purpose: purpose.ok_or_else(|| de::Error::missing_field("purpose"))?,
            channel: channel.ok_or_else(|| de::Error::missing_field("channel"))?,
            source: source.ok_or_else(|| de::Error::missing_field("source"))?,
            artifact_id: artifact_id.ok_or_else(|| de::Error::missing_field("artifact_id"))?,
        })
    }
}

/// A fact as a branch of a union that starts at fact index `base` (a family's slice, or 0).
struct FactAt<'a> {
    fact: &'a Fact,
    base: usize,
}

impl Serialize for FactAt<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let branch = self.fact.index().checked_sub(self.base).ok_or_else(|| {
            serde::ser::Error::custom("fact does not belong to this topic's family")
        })?;
        write_fact(self.fact, branch as u32, s)
    }
}

/// Reads a fact from a union whose first branch is fact index `base`, of `len` branches.
struct FactFrom {
    base: usize,
    len: usize,
}

impl<'de> DeserializeSeed<'de> for FactFrom {
    type Value = Fact;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Fact, D::Error> {
        d.deserialize_enum("Fact", &[], self)
    }
}

impl<'de> Visitor<'de> for FactFrom {
    type Value = Fact;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a fact union")
    }
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Fact, A::Error> {
        let (i, v) = data.variant_seed(BranchIndex)?;
        if i >= self.len {
            return Err(de::Error::custom(format!(
                "payload branch {i} is not a record of this topic"
            )));
        }
        read_fact_branch(self.base + i, v)
    }
}

/// An input event, written for its family's topic.
pub struct InputOut<'a>(pub &'a InputEvent);

impl Serialize for InputOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let e = self.0;
        let (base, _) = e.fact.family().fact_range();
        let mut r = s.serialize_struct("Event", 2)?;
        r.serialize_field("envelope", &e.envelope)?;
        r.serialize_field(
            "payload",
            &FactAt {
                fact: &e.fact,
                base,
            },
        )?;
        r.end()
    }
}

/// Reads an input event of a topic whose union holds facts `base..base + len`.
struct InputFrom {
    base: usize,
    len: usize,
}

impl<'de> DeserializeSeed<'de> for InputFrom {
    type Value = InputEvent;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<InputEvent, D::Error> {
        // Each family names its record differently; the shape is the same.
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for InputFrom {
    type Value = InputEvent;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an input event record")
    }
    fn visit_map<A: de::MapAccess<'de>>(self, mut m: A) -> Result<InputEvent, A::Error> {
        let (base, len) = (self.base, self.len);
        let (mut envelope, mut fact) = (None, None);
        const NAMES: &[&str] = &["envelope", "payload"];
        while let Some(key) = m.next_key_seed(FieldOf(NAMES))? {
            match key {
                0 => envelope = Some(m.next_value::<Envelope>()?),
                1 => fact = Some(m.next_value_seed(FactFrom { base, len })?),
                _ => {
                    m.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        Ok(InputEvent {
            envelope: envelope.ok_or_else(|| de::Error::missing_field("envelope"))?,
            fact: fact.ok_or_else(|| de::Error::missing_field("payload"))?,
        })
    }
}

/// `EventAccepted` in its record shape: its fact is a branch of the full fact union.
struct EventAcceptedOut<'a>(&'a EventAccepted);

impl Serialize for EventAcceptedOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let a = self.0;
        let mut r = s.serialize_struct("EventAccepted", 4)?;
        r.serialize_field("envelope", &a.envelope)?;
        r.serialize_field(
            "fact",
            &FactAt {
                fact: &a.fact,
                base: 0,
            },
        )?;
        r.serialize_field("forget_before", &a.forget_before)?;
        r.serialize_field("identity_key", &a.identity_key)?;
        r.end()
    }
}

struct EventAcceptedFrom;

impl<'de> DeserializeSeed<'de> for EventAcceptedFrom {
    type Value = EventAccepted;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<EventAccepted, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EventAcceptedFrom {
    type Value = EventAccepted;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an EventAccepted record")
    }
    fn visit_map<A: de::MapAccess<'de>>(self, mut m: A) -> Result<EventAccepted, A::Error> {
        let (mut envelope, mut fact, mut forget_before, mut identity_key) =
            (None, None, None, None);
        const NAMES: &[&str] = &["envelope", "fact", "forget_before", "identity_key"];
        while let Some(key) = m.next_key_seed(FieldOf(NAMES))? {
            match key {
                0 => envelope = Some(m.next_value::<Envelope>()?),
                1 => fact = Some(m.next_value_seed(FactFrom { base: 0, len: 20 })?),
                2 => forget_before = Some(m.next_value::<Millis>()?),
                3 => identity_key = m.next_value::<Option<String>>()?,
                _ => {
                    m.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        Ok(EventAccepted {
            envelope: envelope.ok_or_else(|| de::Error::missing_field("envelope"))?,
            fact: fact.ok_or_else(|| de::Error::missing_field("fact"))?,
            forget_before: forget_before
                .ok_or_else(|| de::Error::missing_field("forget_before"))?,
            identity_key,
        })
    }
}

/// A decision's outcome as a branch of the `payload` union.
struct OutcomeOut<'a>(&'a Outcome);

impl Serialize for OutcomeOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Outcome::EventAccepted(a) => {
                s.serialize_newtype_variant("", 0, "", &EventAcceptedOut(a))
            }
            other => write_outcome(other, other.index() as u32, s),
        }
    }
}

struct OutcomeFrom;

impl<'de> Deserialize<'de> for OutcomeIn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_enum("Outcome", &[], OutcomeFrom)
            .map(OutcomeIn)
    }
}

/// The outcome read off a decision's `payload` union.
struct OutcomeIn(Outcome);

impl<'de> Visitor<'de> for OutcomeFrom {
    type Value = Outcome;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an outcome union")
    }
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Outcome, A::Error> {
        let (i, v) = data.variant_seed(BranchIndex)?;
        if i == 0 {
            return v
                .newtype_variant_seed(EventAcceptedFrom)
                .map(Outcome::EventAccepted);
        }
        read_outcome(i, v)
    }
}

/// A decision in the shape of `herald.decisions.DecisionEvent`.
pub struct DecisionOut<'a>(pub &'a Decision);

impl Serialize for DecisionOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let d = self.0;
        let mut r = s.serialize_struct("DecisionEvent", 8)?;
        r.serialize_field("decision_id", &d.decision_id)?;
        r.serialize_field("customer_id", &d.customer_id)?;
        r.serialize_field("input_event_id", &d.input_event_id)?;
        r.serialize_field("processor", &d.processor)?;
        r.serialize_field("decided_at", &d.decided_at)?;
        r.serialize_field("policy_version", &d.policy_version)?;
        r.serialize_field("payload", &OutcomeOut(&d.outcome))?;
        r.serialize_field("consent_chain", &d.consent_chain)?;
        r.end()
    }
}

/// A decision read from `herald.decisions.DecisionEvent`.
#[derive(Deserialize)]
#[serde(rename = "DecisionEvent")]
pub struct DecisionIn {
    decision_id: String,
    customer_id: String,
    input_event_id: String,
    processor: Processor,
    decided_at: Millis,
    policy_version: String,
    payload: OutcomeIn,
    #[serde(default)]
    consent_chain: Option<String>,
}

impl From<DecisionIn> for Decision {
    fn from(d: DecisionIn) -> Decision {
        Decision {
            decision_id: d.decision_id,
            customer_id: d.customer_id,
            input_event_id: d.input_event_id,
            processor: d.processor,
            decided_at: d.decided_at,
            policy_version: d.policy_version,
            outcome: d.payload.0,
            consent_chain: d.consent_chain,
        }
    }
}

/// A dispatch step's record as a branch of the `payload` union.
struct StepOut<'a>(&'a DispatchStep);

impl Serialize for StepOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        write_step(self.0, self.0.index() as u32, s)
    }
}

/// The step read off a dispatch record's `payload` union.
struct StepIn(DispatchStep);

impl<'de> Deserialize<'de> for StepIn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Steps;
        impl<'de> Visitor<'de> for Steps {
            type Value = DispatchStep;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a dispatch step union")
            }
            fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<DispatchStep, A::Error> {
                let (i, v) = data.variant_seed(BranchIndex)?;
                read_step(i, v)
            }
        }
        d.deserialize_enum("DispatchStep", &[], Steps).map(StepIn)
    }
}

/// A dispatch step in the shape of `herald.dispatch.DispatchEvent`.
pub struct DispatchOut<'a>(pub &'a DispatchRecord);

impl Serialize for DispatchOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let d = self.0;
        let mut r = s.serialize_struct("DispatchEvent", 8)?;
        r.serialize_field("dispatch_id", &d.dispatch_id)?;
        r.serialize_field("message_id", &d.message_id)?;
        r.serialize_field("customer_id", &d.customer_id)?;
        r.serialize_field("decision_id", &d.decision_id)?;
        r.serialize_field("template_name", &d.template_name)?;
        r.serialize_field("channel", &d.channel)?;
        r.serialize_field("recorded_at", &d.recorded_at)?;
        r.serialize_field("payload", &StepOut(&d.step))?;
        r.end()
    }
}

/// A dispatch step read from `herald.dispatch.DispatchEvent`.
#[derive(Deserialize)]
#[serde(rename = "DispatchEvent")]
pub struct DispatchIn {
    dispatch_id: String,
    message_id: String,
    customer_id: String,
    decision_id: String,
    template_name: String,
    channel: Channel,
    recorded_at: Millis,
    payload: StepIn,
}

impl From<DispatchIn> for DispatchRecord {
    fn from(d: DispatchIn) -> DispatchRecord {
        DispatchRecord {
            dispatch_id: d.dispatch_id,
            message_id: d.message_id,
            customer_id: d.customer_id,
            decision_id: d.decision_id,
            template_name: d.template_name,
            channel: d.channel,
            recorded_at: d.recorded_at,
            step: d.payload.0,
        }
    }
}

/// An input event read off the topic whose union holds facts `BASE..BASE + LEN`.
pub struct InputIn<const BASE: usize, const LEN: usize>(pub InputEvent);

impl<'de, const BASE: usize, const LEN: usize> Deserialize<'de> for InputIn<BASE, LEN> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        InputFrom {
            base: BASE,
            len: LEN,
        }
        .deserialize(d)
        .map(InputIn)
    }
}

/// Reads an input event of `family`'s topic, written with this build's schema.
pub fn read_input(family: Family, datum: &[u8]) -> Result<InputEvent> {
    use Family::*;
    let (d, role) = (Datums::get(), TopicRole::of_family(family));
    // Each union is the slice of the facts `Family::fact_range` gives.
    Ok(match family {
        Oms => {
            d.read::<InputIn<{ Oms.fact_range().0 }, { Oms.fact_range().1 }>>(role, datum)?
                .0
        }
        Billing => {
            d.read::<InputIn<{ Billing.fact_range().0 }, { Billing.fact_range().1 }>>(role, datum)?
                .0
        }
        Crm => {
            d.read::<InputIn<{ Crm.fact_range().0 }, { Crm.fact_range().1 }>>(role, datum)?
                .0
        }
        Provider => {
            d.read::<InputIn<{ Provider.fact_range().0 }, { Provider.fact_range().1 }>>(
                role, datum,
            )?
            .0
        }
    })
}

/// Each topic role's own schema compiled into a plan, and apache-avro's writer for the
/// records the plan leaves to it; names resolved once per process.
pub struct Datums {
    plans: BTreeMap<TopicRole, Plan>,
    writers: BTreeMap<TopicRole, GenericDatumWriter<'static>>,
}

impl Datums {
    fn build() -> Result<Datums> {
        let schemas = Schemas::get();
        let (mut plans, mut writers) = (BTreeMap::new(), BTreeMap::new());
        for (role, _) in crate::avro::TOPIC_RECORDS {
            let schema = schemas.schema(*role)?;
            plans.insert(*role, Plan::compile(schema)?);
            // The serializer checks each value against the schema as it writes it.
            writers.insert(
                *role,
                GenericDatumWriter::builder(schema)
                    .validate(false)
                    .build()?,
            );
        }
        Ok(Datums { plans, writers })
    }

    /// The datums of every Herald topic; a broken embedded schema is a build defect.
    pub fn get() -> &'static Datums {
        static CELL: OnceLock<Datums> = OnceLock::new();
        CELL.get_or_init(|| match Datums::build() {
            Ok(d) => d,
            Err(e) => panic!("embedded Avro schemas are invalid: {e:#}"),
        })
    }

    /// `value` in the Confluent wire format: magic byte, the writer schema's id, the datum.
    pub fn write<T: Serialize>(&self, role: TopicRole, id: u32, value: &T) -> Result<Vec<u8>> {
        let (Some(plan), Some(writer)) = (self.plans.get(&role), self.writers.get(&role)) else {
            bail!("topic role {} has no Herald value schema", role.as_str());
        };
        let mut out = Vec::with_capacity(256);
        out.push(0);
        out.extend_from_slice(&id.to_be_bytes());
        match plan.write(value, &mut out) {
            Ok(()) => {}
            Err(PlanError::Unplanned(_)) => {
                out.truncate(5);
                writer
                    .write_ser(&mut out, value)
                    .with_context(|| format!("encoding for {}", role.as_str()))?;
            }
            Err(e) => return Err(e).with_context(|| format!("encoding for {}", role.as_str())),
        }
        Ok(out)
    }

    /// Reads a datum written with this build's schema for `role` (the wire header removed).
    pub fn read<T: DeserializeOwned>(&self, role: TopicRole, datum: &[u8]) -> Result<T> {
        let plan = self
            .plans
            .get(&role)
            .ok_or_else(|| anyhow!("topic role {} has no Herald value schema", role.as_str()))?;
        let mut rest = datum;
        let value = plan.read(&mut rest)?;
        if !rest.is_empty() {
            bail!("{} bytes follow the record", rest.len());
        }
        Ok(value)
    }
}

/// The writer schema id of a Confluent-framed record, and its datum.
pub fn framed(bytes: &[u8]) -> Option<(u32, &[u8])> {
    match bytes {
        [0, a, b, c, d, datum @ ..] => Some((u32::from_be_bytes([*a, *b, *c, *d]), datum)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::avro;
    use crate::driver::Driver;
    use crate::scenario::{self, FeedItem};
    use crate::topology::Topology;
    use apache_avro::reader::datum::GenericDatumReader;
    use apache_avro::types::Value;

    /// The generic path's bytes, as every release before this module wrote them.
    fn generic(role: TopicRole, v: Value) -> Vec<u8> {
        let schema = Schemas::get().schema(role).unwrap();
        let w = GenericDatumWriter::builder(schema).build().unwrap();
        w.write_value_to_vec(v).unwrap()
    }

    /// What a generic reader makes of a datum: maps compare whatever order they were
    /// written in (the generic writer's order is its hash map's).
    fn value(role: TopicRole, datum: &[u8]) -> Value {
        let schema = Schemas::get().schema(role).unwrap();
        let r = GenericDatumReader::builder(schema).build().unwrap();
        let mut rest = datum;
        let v = r.read_value(&mut rest).unwrap();
        assert!(rest.is_empty());
        v
    }

    fn direct<T: Serialize>(role: TopicRole, value: &T) -> Vec<u8> {
        let wire = Datums::get().write(role, 7, value).unwrap();
        let (id, datum) = framed(&wire).unwrap();
        assert_eq!(id, 7);
        datum.to_vec()
    }

    /// Every record a generated scenario produces: inputs, decisions and dispatch steps.
    fn records() -> (Vec<InputEvent>, Vec<Decision>, Vec<DispatchRecord>) {
        let topology = Topology::embedded().unwrap();
        let mut driver = Driver::new(&topology);
        let (mut inputs, mut decisions, mut steps) = (vec![], vec![], vec![]);
        for (i, item) in scenario::generate(150, 11).items.into_iter().enumerate() {
            if let FeedItem::Event(e) = item {
                let out = driver.input(&e, &i.to_string());
                decisions.extend(out.decisions);
                steps.extend(out.steps);
                inputs.push(e);
            }
        }
        let out = driver.advance_to(i64::MAX / 4);
        decisions.extend(out.decisions);
        steps.extend(out.steps);
        (inputs, decisions, steps)
    }

    #[test]
    fn direct_datums_read_as_the_generic_writers_and_back_whole() {
        let (inputs, decisions, steps) = records();
        assert!(inputs.len() > 1000 && decisions.len() > 1000 && !steps.is_empty());
        let mut kinds = std::collections::BTreeSet::new();
        for e in &inputs {
            let role = TopicRole::of_family(e.fact.family());
            let bytes = direct(role, &InputOut(e));
            let old = generic(role, avro::input_to_value(e).unwrap());
            assert_eq!(value(role, &bytes), value(role, &old));
            let back = read_input(e.fact.family(), &bytes).unwrap();
            assert_eq!(&back, e);
        }
        for d in &decisions {
            kinds.insert(d.outcome.kind());
            let bytes = direct(TopicRole::Decisions, &DecisionOut(d));
            let old = generic(TopicRole::Decisions, avro::decision_to_value(d).unwrap());
            assert_eq!(
                value(TopicRole::Decisions, &bytes),
                value(TopicRole::Decisions, &old)
            );
            let back: DecisionIn = Datums::get().read(TopicRole::Decisions, &bytes).unwrap();
            assert_eq!(&Decision::from(back), d);
        }
        assert!(
            kinds.len() >= 8,
            "too few outcome kinds exercised: {kinds:?}"
        );
        for r in &steps {
            let bytes = direct(TopicRole::Dispatch, &DispatchOut(r));
            let old = generic(TopicRole::Dispatch, avro::dispatch_to_value(r).unwrap());
            assert_eq!(
                value(TopicRole::Dispatch, &bytes),
                value(TopicRole::Dispatch, &old)
            );
            let back: DispatchIn = Datums::get().read(TopicRole::Dispatch, &bytes).unwrap();
            assert_eq!(&DispatchRecord::from(back), r);
        }
        let card = ContactCard {
            customer_id: "cust-1".into(),
            addresses: [("WHATSAPP".to_string(), "+34600000001".to_string())].into(),
            updated_at: 5,
        };
        let bytes = direct(TopicRole::Contacts, &card);
        let old = generic(
            TopicRole::Contacts,
            avro::contact_card_to_value(&card).unwrap(),
        );
        assert_eq!(
            value(TopicRole::Contacts, &bytes),
            value(TopicRole::Contacts, &old)
        );
        assert_eq!(
            Datums::get()
                .read::<ContactCard>(TopicRole::Contacts, &bytes)
                .unwrap(),
            card
        );
        for level in scenario::stock_levels() {
            let bytes = direct(TopicRole::Inventory, &level);
            let old = generic(TopicRole::Inventory, avro::stock_to_value(&level).unwrap());
            assert_eq!(
                value(TopicRole::Inventory, &bytes),
                value(TopicRole::Inventory, &old)
            );
            let back: StockLevel = Datums::get().read(TopicRole::Inventory, &bytes).unwrap();
            assert_eq!(back, level);
        }
    }

    /// apache-avro's schema-aware serializer and deserializer, which the plans replace.
    fn apache_bytes<T: Serialize>(role: TopicRole, value: &T) -> Vec<u8> {
        let schema = Schemas::get().schema(role).unwrap();
        let w = GenericDatumWriter::builder(schema).build().unwrap();
        let mut out = Vec::new();
        w.write_ser(&mut out, value).unwrap();
        out
    }

    fn apache_read<T: DeserializeOwned>(role: TopicRole, mut datum: &[u8]) -> T {
        let schema = Schemas::get().schema(role).unwrap();
        let r = GenericDatumReader::builder(schema).build().unwrap();
        r.read_deser(&mut datum).unwrap()
    }

    /// The plan itself, with no fallback to apache-avro.
    fn planned<T: Serialize>(role: TopicRole, value: &T) -> Vec<u8> {
        let mut out = Vec::new();
        Datums::get().plans[&role].write(value, &mut out).unwrap();
        out
    }

    #[test]
    fn plans_write_every_record_byte_for_byte_as_apache_avro_and_read_it_back() {
        let (inputs, decisions, steps) = records();
        for e in &inputs {
            let role = TopicRole::of_family(e.fact.family());
            let bytes = planned(role, &InputOut(e));
            assert_eq!(bytes, apache_bytes(role, &InputOut(e)), "{e:?}");
        }
        for d in &decisions {
            let bytes = planned(TopicRole::Decisions, &DecisionOut(d));
            assert_eq!(bytes, apache_bytes(TopicRole::Decisions, &DecisionOut(d)));
            let apache: DecisionIn = apache_read(TopicRole::Decisions, &bytes);
            let ours: DecisionIn = Datums::get().read(TopicRole::Decisions, &bytes).unwrap();
            assert_eq!(Decision::from(ours), Decision::from(apache));
        }
        for r in &steps {
            let bytes = planned(TopicRole::Dispatch, &DispatchOut(r));
            assert_eq!(bytes, apache_bytes(TopicRole::Dispatch, &DispatchOut(r)));
        }
        let card = ContactCard {
            customer_id: "cust-1".into(),
            addresses: [
                ("SMS".to_string(), "+34600000002".to_string()),
                ("WHATSAPP".to_string(), "+34600000001".to_string()),
            ]
            .into(),
            updated_at: -5,
        };
        let bytes = planned(TopicRole::Contacts, &card);
        assert_eq!(bytes, apache_bytes(TopicRole::Contacts, &card));
        for level in scenario::stock_levels() {
            let bytes = planned(TopicRole::Inventory, &level);
            assert_eq!(bytes, apache_bytes(TopicRole::Inventory, &level));
        }
    }

    #[test]
    fn a_record_the_plan_leaves_out_is_written_by_apache_avro() {
        /// A contact card whose fields come out of schema order.
        struct Shuffled<'a>(&'a ContactCard);
        impl Serialize for Shuffled<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut r = s.serialize_struct("ContactCard", 3)?;
                r.serialize_field("updated_at", &self.0.updated_at)?;
                r.serialize_field("customer_id", &self.0.customer_id)?;
                r.serialize_field("addresses", &self.0.addresses)?;
                r.end()
            }
        }
        let card = ContactCard {
            customer_id: "cust-9".into(),
            addresses: [("EMAIL".to_string(), "a@example.com".to_string())].into(),
            updated_at: 1_700_000_000_000,
        };
        let mut out = Vec::new();
        let refused = Datums::get().plans[&TopicRole::Contacts].write(&Shuffled(&card), &mut out);
        assert!(
            matches!(refused, Err(PlanError::Unplanned(_))),
            "{refused:?}"
        );
        let bytes = direct(TopicRole::Contacts, &Shuffled(&card));
        assert_eq!(bytes, apache_bytes(TopicRole::Contacts, &card));
        let back: ContactCard = Datums::get().read(TopicRole::Contacts, &bytes).unwrap();
        assert_eq!(back, card);
    }

    #[test]
    fn a_truncated_or_overlong_datum_is_refused() {
        let (_, decisions, _) = records();
        let bytes = direct(TopicRole::Decisions, &DecisionOut(&decisions[0]));
        let short = &bytes[..bytes.len() - 3];
        assert!(Datums::get()
            .read::<DecisionIn>(TopicRole::Decisions, short)
            .is_err());
        let mut long = bytes.clone();
        long.push(0);
        assert!(Datums::get()
            .read::<DecisionIn>(TopicRole::Decisions, &long)
            .is_err());
        assert_eq!(framed(&[1, 0, 0, 0, 1, 2]), None);
    }
}
