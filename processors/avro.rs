//! The Avro side of Herald's events: the schema files in `schemas/` (embedded in the binary),
//! assembled into one self-contained schema per topic, and the mapping between `apache_avro`
//! values and the Rust types in [`crate::events`].
//!
//! Unions are mapped by hand: apache-avro resolves a union member by shape, and several Herald
//! records share a shape (`ShipmentOutForDelivery` and `ShipmentDelivered`), so the branch index
//! is always set and read explicitly, and matched by record name when writer and reader differ.

use crate::events::*;
use crate::topology::TopicRole;
use crate::unions::{
    fact_from_value, fact_value, outcome_from_value, outcome_value, step_from_value, step_value,
};
use anyhow::{anyhow, bail, Context, Result};
use apache_avro::types::Value;
use apache_avro::{from_value, to_value, Schema};
use serde_json::Value as Json;
use std::collections::{BTreeMap, HashSet};
use std::sync::OnceLock;

/// Every schema file, by its path under `schemas/`.
pub const SCHEMA_FILES: &[(&str, &str)] = &[
    (
        "common/envelope.avsc",
        include_str!("../schemas/common/envelope.avsc"),
    ),
    (
        "common/money.avsc",
        include_str!("../schemas/common/money.avsc"),
    ),
    (
        "common/line_item.avsc",
        include_str!("../schemas/common/line_item.avsc"),
    ),
    (
        "common/purpose.avsc",
        include_str!("../schemas/common/purpose.avsc"),
    ),
    (
        "common/channel.avsc",
        include_str!("../schemas/common/channel.avsc"),
    ),
    (
        "oms/order_placed.avsc",
        include_str!("../schemas/oms/order_placed.avsc"),
    ),
    (
        "oms/shipment_dispatched.avsc",
        include_str!("../schemas/oms/shipment_dispatched.avsc"),
    ),
    (
        "oms/shipment_delayed.avsc",
        include_str!("../schemas/oms/shipment_delayed.avsc"),
    ),
    (
        "oms/shipment_out_for_delivery.avsc",
        include_str!("../schemas/oms/shipment_out_for_delivery.avsc"),
    ),
    (
        "oms/shipment_delivered.avsc",
        include_str!("../schemas/oms/shipment_delivered.avsc"),
    ),
    (
        "oms/order_cancelled.avsc",
        include_str!("../schemas/oms/order_cancelled.avsc"),
    ),
    (
        "oms/cart_abandoned.avsc",
        include_str!("../schemas/oms/cart_abandoned.avsc"),
    ),
    (
        "oms/cart_recovered.avsc",
        include_str!("../schemas/oms/cart_recovered.avsc"),
    ),
    (
        "oms/oms_event.avsc",
        include_str!("../schemas/oms/oms_event.avsc"),
    ),
    (
        "billing/payment_captured.avsc",
        include_str!("../schemas/billing/payment_captured.avsc"),
    ),
    (
        "billing/payment_failed.avsc",
        include_str!("../schemas/billing/payment_failed.avsc"),
    ),
    (
        "billing/refund_issued.avsc",
        include_str!("../schemas/billing/refund_issued.avsc"),
    ),
    (
        "billing/subscription_renewal_due.avsc",
        include_str!("../schemas/billing/subscription_renewal_due.avsc"),
    ),
    (
        "billing/subscription_renewed.avsc",
        include_str!("../schemas/billing/subscription_renewed.avsc"),
    ),
    (
        "billing/billing_event.avsc",
        include_str!("../schemas/billing/billing_event.avsc"),
    ),
    (
        "crm/consent_granted.avsc",
        include_str!("../schemas/crm/consent_granted.avsc"),
    ),
    (
        "crm/consent_revoked.avsc",
        include_str!("../schemas/crm/consent_revoked.avsc"),
    ),
    (
        "crm/profile_changed.avsc",
        include_str!("../schemas/crm/profile_changed.avsc"),
    ),
    (
        "crm/erasure_requested.avsc",
        include_str!("../schemas/crm/erasure_requested.avsc"),
    ),
    (
        "crm/crm_event.avsc",
        include_str!("../schemas/crm/crm_event.avsc"),
    ),
    (
        "provider/message_status.avsc",
        include_str!("../schemas/provider/message_status.avsc"),
    ),
    (
        "provider/template_status.avsc",
        include_str!("../schemas/provider/template_status.avsc"),
    ),
    (
        "provider/message_status_changed.avsc",
        include_str!("../schemas/provider/message_status_changed.avsc"),
    ),
    (
        "provider/inbound_message_received.avsc",
        include_str!("../schemas/provider/inbound_message_received.avsc"),
    ),
    (
        "provider/template_status_changed.avsc",
        include_str!("../schemas/provider/template_status_changed.avsc"),
    ),
    (
        "provider/provider_event.avsc",
        include_str!("../schemas/provider/provider_event.avsc"),
    ),
    (
        "inventory/stock_level.avsc",
        include_str!("../schemas/inventory/stock_level.avsc"),
    ),
    (
        "decisions/processor.avsc",
        include_str!("../schemas/decisions/processor.avsc"),
    ),
    (
        "decisions/suppression_reason.avsc",
        include_str!("../schemas/decisions/suppression_reason.avsc"),
    ),
    (
        "decisions/event_accepted.avsc",
        include_str!("../schemas/decisions/event_accepted.avsc"),
    ),
    (
        "decisions/duplicate_ignored.avsc",
        include_str!("../schemas/decisions/duplicate_ignored.avsc"),
    ),
    (
        "decisions/pre_erasure_fact_ignored.avsc",
        include_str!("../schemas/decisions/pre_erasure_fact_ignored.avsc"),
    ),
    (
        "decisions/marketing_stopped.avsc",
        include_str!("../schemas/decisions/marketing_stopped.avsc"),
    ),
    (
        "decisions/shipment_held.avsc",
        include_str!("../schemas/decisions/shipment_held.avsc"),
    ),
    (
        "decisions/shipment_released.avsc",
        include_str!("../schemas/decisions/shipment_released.avsc"),
    ),
    (
        "decisions/hold_expired.avsc",
        include_str!("../schemas/decisions/hold_expired.avsc"),
    ),
    (
        "decisions/delivery.avsc",
        include_str!("../schemas/decisions/delivery.avsc"),
    ),
    (
        "decisions/message_approved.avsc",
        include_str!("../schemas/decisions/message_approved.avsc"),
    ),
    (
        "decisions/message_suppressed.avsc",
        include_str!("../schemas/decisions/message_suppressed.avsc"),
    ),
    (
        "decisions/deferral_reason.avsc",
        include_str!("../schemas/decisions/deferral_reason.avsc"),
    ),
    (
        "decisions/message_deferred.avsc",
        include_str!("../schemas/decisions/message_deferred.avsc"),
    ),
    (
        "decisions/opted_out.avsc",
        include_str!("../schemas/decisions/opted_out.avsc"),
    ),
    (
        "decisions/message_held_out.avsc",
        include_str!("../schemas/decisions/message_held_out.avsc"),
    ),
    (
        "decisions/journey_entered.avsc",
        include_str!("../schemas/decisions/journey_entered.avsc"),
    ),
    (
        "decisions/journey_advanced.avsc",
        include_str!("../schemas/decisions/journey_advanced.avsc"),
    ),
    (
        "decisions/journey_exited.avsc",
        include_str!("../schemas/decisions/journey_exited.avsc"),
    ),
    (
        "decisions/escalation_raised.avsc",
        include_str!("../schemas/decisions/escalation_raised.avsc"),
    ),
    (
        "decisions/decision_event.avsc",
        include_str!("../schemas/decisions/decision_event.avsc"),
    ),
    (
        "dispatch/dispatch_attempted.avsc",
        include_str!("../schemas/dispatch/dispatch_attempted.avsc"),
    ),
    (
        "dispatch/dispatch_accepted.avsc",
        include_str!("../schemas/dispatch/dispatch_accepted.avsc"),
    ),
    (
        "dispatch/dispatch_failed.avsc",
        include_str!("../schemas/dispatch/dispatch_failed.avsc"),
    ),
    (
        "dispatch/dispatch_skipped.avsc",
        include_str!("../schemas/dispatch/dispatch_skipped.avsc"),
    ),
    (
        "dispatch/dispatch_intended.avsc",
        include_str!("../schemas/dispatch/dispatch_intended.avsc"),
    ),
    (
        "dispatch/dispatch_unanswered.avsc",
        include_str!("../schemas/dispatch/dispatch_unanswered.avsc"),
    ),
    (
        "dispatch/dispatch_reconciled.avsc",
        include_str!("../schemas/dispatch/dispatch_reconciled.avsc"),
    ),
    (
        "dispatch/dispatch_event.avsc",
        include_str!("../schemas/dispatch/dispatch_event.avsc"),
    ),
    (
        "dlq/dead_letter.avsc",
        include_str!("../schemas/dlq/dead_letter.avsc"),
    ),
    (
        "contacts/contact_card.avsc",
        include_str!("../schemas/contacts/contact_card.avsc"),
    ),
];

/// The value record of each topic role (its subject is `<topic name>-value`).
pub const TOPIC_RECORDS: &[(TopicRole, &str)] = &[
    (TopicRole::Oms, "herald.oms.OmsEvent"),
    (TopicRole::Billing, "herald.billing.BillingEvent"),
    (TopicRole::Crm, "herald.crm.CrmEvent"),
    (TopicRole::Provider, "herald.provider.ProviderEvent"),
    (TopicRole::Inventory, "herald.inventory.StockLevel"),
    (TopicRole::Decisions, "herald.decisions.DecisionEvent"),
    (TopicRole::Dispatch, "herald.dispatch.DispatchEvent"),
    (TopicRole::Dlq, "herald.dlq.DeadLetter"),
    (TopicRole::Contacts, "herald.contacts.ContactCard"),
];

/// The named types defined by the schema files, by full name.
fn definitions() -> Result<BTreeMap<String, Json>> {
    let mut defs = BTreeMap::new();
    for (path, text) in SCHEMA_FILES {
        let json: Json =
            serde_json::from_str(text).with_context(|| format!("schemas/{path} is not JSON"))?;
        let name = json["name"].as_str().context("schema without name")?;
        let ns = json["namespace"].as_str().unwrap_or("");
        defs.insert(format!("{ns}.{name}"), json);
    }
    Ok(defs)
}

/// Replaces each first reference to a named type by its definition, so the result stands alone.
fn inline(node: &Json, defs: &BTreeMap<String, Json>, defined: &mut HashSet<String>) -> Json {
    match node {
        Json::String(name) if defs.contains_key(name) => {
            if defined.insert(name.clone()) {
                inline(&defs[name], defs, defined)
            } else {
                node.clone()
            }
        }
        Json::Array(items) => Json::Array(items.iter().map(|i| inline(i, defs, defined)).collect()),
        Json::Object(map) => {
            if let (Some(ns), Some(name)) = (map.get("namespace"), map.get("name")) {
                if let (Some(ns), Some(name)) = (ns.as_str(), name.as_str()) {
                    defined.insert(format!("{ns}.{name}"));
                }
            }
            let mut out = serde_json::Map::new();
            for (k, v) in map {
                let v = match k.as_str() {
                    "type" | "items" | "values" | "fields" => inline(v, defs, defined),
                    _ => v.clone(),
                };
                out.insert(k.clone(), v);
            }
            Json::Object(out)
        }
        _ => node.clone(),
    }
}

/// The self-contained schema text for a record full name, all references inlined.
pub fn assembled_schema(full_name: &str) -> Result<String> {
    let defs = definitions()?;
    let root = defs
        .get(full_name)
        .ok_or_else(|| anyhow!("no schema file defines {full_name}"))?;
    let mut defined = HashSet::new();
    defined.insert(full_name.to_string());
    Ok(serde_json::to_string(&inline(root, &defs, &mut defined))?)
}

/// The record full name carried by a topic role.
pub fn record_of(role: TopicRole) -> Result<&'static str> {
    TOPIC_RECORDS
        .iter()
        .find(|(r, _)| *r == role)
        .map(|(_, r)| *r)
        .ok_or_else(|| anyhow!("topic role {} has no Herald value schema", role.as_str()))
}

/// Parsed reader schemas, one per topic, built once.
pub struct Schemas {
    by_role: BTreeMap<TopicRole, (String, Schema)>,
    /// Every named type of every topic schema, for following references while conforming.
    names: std::collections::HashMap<apache_avro::schema::Name, Schema>,
}

fn collect_names(
    schema: &Schema,
    names: &mut std::collections::HashMap<apache_avro::schema::Name, Schema>,
) {
    use apache_avro::schema::Schema as S;
    match schema {
        S::Record(r) => {
            names
                .entry(r.name.clone())
                .or_insert_with(|| schema.clone());
            for f in &r.fields {
                collect_names(&f.schema, names);
            }
        }
        S::Enum(e) => {
            names
                .entry(e.name.clone())
                .or_insert_with(|| schema.clone());
        }
        S::Union(u) => u.variants().iter().for_each(|v| collect_names(v, names)),
        S::Array(a) => collect_names(&a.items, names),
        S::Map(m) => collect_names(&m.types, names),
        _ => {}
    }
}

impl Schemas {
    fn build() -> Result<Self> {
        let mut by_role = BTreeMap::new();
        let mut names = std::collections::HashMap::new();
        for (role, record) in TOPIC_RECORDS {
            let text = assembled_schema(record)?;
            let schema = Schema::parse_str(&text)
                .with_context(|| format!("schema {record} does not parse"))?;
            collect_names(&schema, &mut names);
            by_role.insert(*role, (text, schema));
        }
        Ok(Schemas { by_role, names })
    }

    /// The schemas of every Herald topic; a broken embedded schema is a build defect.
    pub fn get() -> &'static Schemas {
        static CELL: OnceLock<Schemas> = OnceLock::new();
        CELL.get_or_init(|| match Schemas::build() {
            Ok(s) => s,
            Err(e) => panic!("embedded Avro schemas are invalid: {e:#}"),
        })
    }

    /// Schema text for the values of a topic role.
    pub fn text(&self, role: TopicRole) -> Result<&str> {
        self.by_role
            .get(&role)
            .map(|(t, _)| t.as_str())
            .ok_or_else(|| anyhow!("topic role {} has no Herald value schema", role.as_str()))
    }

    /// Parsed schema for the values of a topic role.
    pub fn schema(&self, role: TopicRole) -> Result<&Schema> {
        self.by_role
            .get(&role)
            .map(|(_, s)| s)
            .ok_or_else(|| anyhow!("topic role {} has no Herald value schema", role.as_str()))
    }
}

fn field<'a>(v: &'a Value, name: &str) -> Result<&'a Value> {
    match v {
        Value::Record(fields) => fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .ok_or_else(|| anyhow!("record has no field '{name}'")),
        other => bail!("expected a record, found {other:?}"),
    }
}

fn union_branch(v: &Value) -> Result<(usize, &Value)> {
    match v {
        Value::Union(i, inner) => Ok((*i as usize, inner)),
        other => bail!("expected a union, found {other:?}"),
    }
}

/// `Some(x)` must land in the non-null branch of a `["null", T]` union; apache-avro's value
/// serializer leaves options bare, so fix them up against the schema before writing.
fn conform(
    value: Value,
    schema: &Schema,
    names: &std::collections::HashMap<apache_avro::schema::Name, Schema>,
) -> Result<Value> {
    use apache_avro::schema::Schema as S;
    Ok(match (value, schema) {
        (v, S::Ref { name }) => {
            let target = names
                .get(name)
                .ok_or_else(|| anyhow!("unresolved schema reference {name}"))?;
            conform(v, target, names)?
        }
        (Value::Union(i, inner), S::Union(u)) => {
            let branch = &u.variants()[i as usize];
            Value::Union(i, Box::new(conform(*inner, branch, names)?))
        }
        (Value::Null, S::Union(u)) => {
            let i = u
                .variants()
                .iter()
                .position(|s| matches!(s, S::Null))
                .ok_or_else(|| anyhow!("null for a union without null"))?;
            Value::Union(i as u32, Box::new(Value::Null))
        }
        (v, S::Union(u)) => {
            // An optional field: the one non-null branch.
            let (i, branch) = u
                .variants()
                .iter()
                .enumerate()
                .find(|(_, s)| !matches!(s, S::Null))
                .ok_or_else(|| anyhow!("value for a null-only union"))?;
            Value::Union(i as u32, Box::new(conform(v, branch, names)?))
        }
        (Value::Record(fields), S::Record(r)) => {
            let mut out = Vec::with_capacity(fields.len());
            for (name, v) in fields {
                let f = r
                    .fields
                    .iter()
                    .find(|f| f.name == name)
                    .ok_or_else(|| anyhow!("field '{name}' is not in schema {}", r.name))?;
                out.push((name, conform(v, &f.schema, names)?));
            }
            Value::Record(out)
        }
        (Value::Array(items), S::Array(a)) => Value::Array(
            items
                .into_iter()
                .map(|i| conform(i, &a.items, names))
                .collect::<Result<_>>()?,
        ),
        (Value::Map(items), S::Map(m)) => Value::Map(
            items
                .into_iter()
                .map(|(k, i)| Ok((k, conform(i, &m.types, names)?)))
                .collect::<Result<_>>()?,
        ),
        (Value::Bytes(b), S::Decimal(_)) => Value::Decimal(apache_avro::Decimal::from(b)),
        (Value::Long(l), S::TimestampMillis) => Value::TimestampMillis(l),
        (Value::String(s), S::Enum(e)) => {
            let i = e
                .symbols
                .iter()
                .position(|x| *x == s)
                .ok_or_else(|| anyhow!("'{s}' is not a symbol of enum {}", e.name))?;
            Value::Enum(i as u32, s)
        }
        (v, _) => v,
    })
}

/// Converts a serde value into an Avro value that conforms to the schema of a topic role.
fn conform_to_topic(value: Value, role: TopicRole) -> Result<Value> {
    let schemas = Schemas::get();
    conform(value, schemas.schema(role)?, &schemas.names)
}

fn fact_union(fact: &Fact, base: usize) -> Result<Value> {
    Ok(Value::Union(
        (fact.index() - base) as u32,
        Box::new(fact_value(fact)?),
    ))
}

/// Avro value of an input event, for its family's topic.
pub fn input_to_value(e: &InputEvent) -> Result<Value> {
    let (base, _) = e.fact.family().fact_range();
    let v = Value::Record(vec![
        ("envelope".into(), to_value(&e.envelope)?),
        ("payload".into(), fact_union(&e.fact, base)?),
    ]);
    conform_to_topic(v, TopicRole::of_family(e.fact.family()))
}

/// Input event from an Avro value read off a family topic (reader-shaped).
pub fn input_from_value(family: Family, v: &Value) -> Result<InputEvent> {
    let envelope: Envelope = from_value(field(v, "envelope")?).context("envelope")?;
    let (i, inner) = union_branch(field(v, "payload")?)?;
    let (base, len) = family.fact_range();
    if i >= len {
        bail!("payload branch {i} is not a {family:?} record");
    }
    let fact = fact_from_value(base + i, inner).context("payload")?;
    Ok(InputEvent { envelope, fact })
}

/// Avro value of a decision.
pub fn decision_to_value(d: &Decision) -> Result<Value> {
    let payload = match &d.outcome {
        Outcome::EventAccepted(a) => Value::Record(vec![
            ("envelope".into(), to_value(&a.envelope)?),
            ("fact".into(), fact_union(&a.fact, 0)?),
            ("forget_before".into(), Value::Long(a.forget_before)),
            (
                "identity_key".into(),
                match &a.identity_key {
                    Some(k) => Value::Union(1, Box::new(Value::String(k.clone()))),
                    None => Value::Union(0, Box::new(Value::Null)),
                },
            ),
        ]),
        other => outcome_value(other)?,
    };
    let v = Value::Record(vec![
        ("decision_id".into(), Value::String(d.decision_id.clone())),
        ("customer_id".into(), Value::String(d.customer_id.clone())),
        (
            "input_event_id".into(),
            Value::String(d.input_event_id.clone()),
        ),
        ("processor".into(), to_value(d.processor)?),
        ("decided_at".into(), Value::Long(d.decided_at)),
        (
            "policy_version".into(),
            Value::String(d.policy_version.clone()),
        ),
        (
            "payload".into(),
            Value::Union(d.outcome.index() as u32, Box::new(payload)),
        ),
        (
            "consent_chain".into(),
            match &d.consent_chain {
                Some(link) => Value::Union(1, Box::new(Value::String(link.clone()))),
                None => Value::Union(0, Box::new(Value::Null)),
            },
        ),
    ]);
    conform_to_topic(v, TopicRole::Decisions)
}

/// Decision from an Avro value read off `herald.decisions.v1` (reader-shaped).
pub fn decision_from_value(v: &Value) -> Result<Decision> {
    let (i, inner) = union_branch(field(v, "payload")?)?;
    let outcome = if i == 0 {
        let (fi, fv) = union_branch(field(inner, "fact")?)?;
        Outcome::EventAccepted(EventAccepted {
            envelope: from_value(field(inner, "envelope")?)?,
            fact: fact_from_value(fi, fv)?,
            forget_before: from_value(field(inner, "forget_before")?)?,
            // Written before schema v7: no identity.
            identity_key: match field(inner, "identity_key") {
                Ok(k) => from_value(k)?,
                Err(_) => None,
            },
        })
    } else {
        outcome_from_value(i, inner)?
    };
    Ok(Decision {
        decision_id: from_value(field(v, "decision_id")?)?,
        customer_id: from_value(field(v, "customer_id")?)?,
        input_event_id: from_value(field(v, "input_event_id")?)?,
        processor: from_value(field(v, "processor")?)?,
        decided_at: from_value(field(v, "decided_at")?)?,
        policy_version: from_value(field(v, "policy_version")?)?,
        outcome,
        // Written before schema v4: no chain.
        consent_chain: match field(v, "consent_chain") {
            Ok(link) => from_value(link)?,
            Err(_) => None,
        },
    })
}

/// Avro value of a stock level.
pub fn stock_to_value(s: &StockLevel) -> Result<Value> {
    conform_to_topic(to_value(s)?, TopicRole::Inventory)
}

/// Avro value of a dispatch step.
pub fn dispatch_to_value(r: &DispatchRecord) -> Result<Value> {
    let v = Value::Record(vec![
        ("dispatch_id".into(), Value::String(r.dispatch_id.clone())),
        ("message_id".into(), Value::String(r.message_id.clone())),
        ("customer_id".into(), Value::String(r.customer_id.clone())),
        ("decision_id".into(), Value::String(r.decision_id.clone())),
        (
            "template_name".into(),
            Value::String(r.template_name.clone()),
        ),
        ("channel".into(), to_value(r.channel)?),
        ("recorded_at".into(), Value::Long(r.recorded_at)),
        (
            "payload".into(),
            Value::Union(r.step.index() as u32, Box::new(step_value(&r.step)?)),
        ),
    ]);
    conform_to_topic(v, TopicRole::Dispatch)
}

/// Dispatch step from an Avro value read off `herald.dispatch.v1`.
pub fn dispatch_from_value(v: &Value) -> Result<DispatchRecord> {
    let (i, inner) = union_branch(field(v, "payload")?)?;
    Ok(DispatchRecord {
        dispatch_id: from_value(field(v, "dispatch_id")?)?,
        message_id: from_value(field(v, "message_id")?)?,
        customer_id: from_value(field(v, "customer_id")?)?,
        decision_id: from_value(field(v, "decision_id")?)?,
        template_name: from_value(field(v, "template_name")?)?,
        channel: from_value(field(v, "channel")?)?,
        recorded_at: from_value(field(v, "recorded_at")?)?,
        step: step_from_value(i, inner)?,
    })
}

/// Avro value of a contact card.
pub fn contact_card_to_value(c: &ContactCard) -> Result<Value> {
    conform_to_topic(to_value(c)?, TopicRole::Contacts)
}

/// A contact card from an Avro value read off the contact changelog.
pub fn contact_card_from_value(v: &Value) -> Result<ContactCard> {
    Ok(from_value(v)?)
}

/// Avro value of a dead letter.
pub fn dead_letter_to_value(d: &DeadLetter) -> Result<Value> {
    let bytes = |b: &Option<Vec<u8>>| match b {
        Some(b) => Value::Bytes(b.clone()),
        None => Value::Null,
    };
    let v = Value::Record(vec![
        ("source_topic".into(), Value::String(d.source_topic.clone())),
        ("source_partition".into(), Value::Int(d.source_partition)),
        ("source_offset".into(), Value::Long(d.source_offset)),
        ("key".into(), bytes(&d.key)),
        ("value".into(), bytes(&d.value)),
        ("stage".into(), Value::String(d.stage.clone())),
        ("error".into(), Value::String(d.error.clone())),
        ("failed_at".into(), Value::Long(d.failed_at)),
    ]);
    conform_to_topic(v, TopicRole::Dlq)
}

/// Dead letter from an Avro value read off `herald.dlq.v1`.
pub fn dead_letter_from_value(v: &Value) -> Result<DeadLetter> {
    let bytes = |v: &Value| -> Result<Option<Vec<u8>>> {
        Ok(match v {
            Value::Union(_, inner) => match inner.as_ref() {
                Value::Bytes(b) => Some(b.clone()),
                _ => None,
            },
            Value::Bytes(b) => Some(b.clone()),
            _ => None,
        })
    };
    Ok(DeadLetter {
        source_topic: from_value(field(v, "source_topic")?)?,
        source_partition: from_value(field(v, "source_partition")?)?,
        source_offset: from_value(field(v, "source_offset")?)?,
        key: bytes(field(v, "key")?)?,
        value: bytes(field(v, "value")?)?,
        stage: from_value(field(v, "stage")?)?,
        error: from_value(field(v, "error")?)?,
        failed_at: from_value(field(v, "failed_at")?)?,
    })
}

/// The record names of a union field's branches, in order.
fn branch_names(schema: &Schema, field_name: &str) -> Vec<String> {
    use apache_avro::schema::Schema as S;
    let S::Record(r) = schema else {
        return vec![];
    };
    let Some(f) = r.fields.iter().find(|f| f.name == field_name) else {
        return vec![];
    };
    match &f.schema {
        S::Union(u) => u
            .variants()
            .iter()
            .map(|s| match s {
                S::Record(r) => r.name.fullname(None),
                S::Ref { name } => name.fullname(None),
                other => format!("{other:?}"),
            })
            .collect(),
        _ => vec![],
    }
}

/// Whether a writer schema is the reader's own, so values need no remapping.
pub fn same_as_reader(role: TopicRole, writer: &Schema) -> Result<bool> {
    let form =
        canonical_form(writer).ok_or_else(|| anyhow!("the writer schema has no canonical form"))?;
    Ok(form == Schemas::get().schema(role)?.canonical_form())
}

thread_local! {
    /// Set while this thread computes a canonical form whose panic is caught and answered.
    static QUIET_PANIC: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A schema's canonical form; `None` where apache-avro panics computing it, as it does for
/// some schemas its own parser accepted (the fuzzer found one in a dump's metadata): such a
/// writer schema is refused, not a crash, and the caught panic prints nothing.
fn canonical_form(schema: &Schema) -> Option<String> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET_PANIC.with(|q| q.get()) {
                previous(info);
            }
        }));
    });
    QUIET_PANIC.with(|q| q.set(true));
    let form = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| schema.canonical_form()));
    QUIET_PANIC.with(|q| q.set(false));
    form.ok()
}

/// Maps a value written with another version of the topic's schema onto the reader's union
/// order, by record name, so that a producer with an older or newer schema is read correctly.
pub fn to_reader_shape(role: TopicRole, writer: &Schema, value: Value) -> Result<Value> {
    let reader = Schemas::get().schema(role)?;
    let w = branch_names(writer, "payload");
    let r = branch_names(reader, "payload");
    let Value::Record(fields) = value else {
        bail!("expected a record on a {} topic", role.as_str());
    };
    let mut out = Vec::with_capacity(fields.len());
    for (name, v) in fields {
        if name == "payload" {
            let (i, inner) = match v {
                Value::Union(i, inner) => (i as usize, inner),
                other => bail!("payload is not a union: {other:?}"),
            };
            let wname = w
                .get(i)
                .ok_or_else(|| anyhow!("writer branch {i} out of range"))?;
            let ri = r
                .iter()
                .position(|n| n == wname)
                .ok_or_else(|| anyhow!("record {wname} is unknown to this Herald version"))?;
            out.push((name, Value::Union(ri as u32, inner)));
        } else {
            out.push((name, v));
        }
    }
    Ok(Value::Record(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(id: &str) -> Envelope {
        Envelope {
            event_id: id.into(),
            source_system: "oms".into(),
            source_sequence: Some(3),
            occurred_at: 1_700_000_000_000,
            customer_id: "c-1".into(),
            trace_parent: None,
            schema_version: 1,
        }
    }

    fn wire(schema: &Schema, v: Value) -> Value {
        let bytes = apache_avro::writer::datum::GenericDatumWriter::builder(schema)
            .build()
            .unwrap()
            .write_value_to_vec(v)
            .unwrap();
        apache_avro::reader::datum::GenericDatumReader::builder(schema)
            .build()
            .unwrap()
            .read_value(&mut bytes.as_slice())
            .unwrap()
    }

    fn roundtrip_input(e: &InputEvent) -> InputEvent {
        let schema = Schemas::get()
            .schema(TopicRole::of_family(e.fact.family()))
            .unwrap();
        let back = wire(schema, input_to_value(e).unwrap());
        input_from_value(e.fact.family(), &back).unwrap()
    }

    #[test]
    fn every_topic_schema_assembles_and_parses() {
        for (role, _) in TOPIC_RECORDS {
            Schemas::get().schema(*role).unwrap();
        }
    }

    #[test]
    fn same_shaped_records_keep_their_identity() {
        let delivered = InputEvent {
            envelope: envelope("e-1"),
            fact: Fact::ShipmentDelivered(ShipmentDelivered {
                order_id: "o-1".into(),
                shipment_id: "s-1".into(),
            }),
        };
        assert_eq!(roundtrip_input(&delivered), delivered);
    }

    #[test]
    fn money_and_optionals_survive_the_wire() {
        let placed = InputEvent {
            envelope: envelope("e-2"),
            fact: Fact::OrderPlaced(OrderPlaced {
                order_id: "o-2".into(),
                items: vec![LineItem {
                    sku: "SKU-1".into(),
                    name: "Linen throw".into(),
                    quantity: 2,
                    unit_price: Some(Money {
                        minor_units: -12_990,
                        currency: "EUR".into(),
                    }),
                }],
                total: None,
            }),
        };
        assert_eq!(roundtrip_input(&placed), placed);
    }

    #[test]
    fn decisions_roundtrip_with_their_fact() {
        let d = Decision {
            decision_id: "d".into(),
            customer_id: "c-1".into(),
            input_event_id: "e-3".into(),
            processor: Processor::Dedupe,
            decided_at: 5,
            policy_version: "v1".into(),
            outcome: Outcome::EventAccepted(EventAccepted {
                envelope: envelope("e-3"),
                fact: Fact::ConsentRevoked(ConsentChange {
                    purpose: Purpose::Marketing,
                    channel: Channel::Whatsapp,
                    source: "inbound_keyword".into(),
                    artifact_id: "a".into(),
                }),
                forget_before: 1,
                identity_key: Some("k".into()),
            }),
            consent_chain: Some("ab12".into()),
        };
        let schema = Schemas::get().schema(TopicRole::Decisions).unwrap();
        let back = wire(schema, decision_to_value(&d).unwrap());
        assert_eq!(decision_from_value(&back).unwrap(), d);
    }
}
