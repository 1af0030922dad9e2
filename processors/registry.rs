//! The schema registry shell: Herald's own Confluent-compatible subset (for `herald demo` and the
//! tests), and the codec that encodes and decodes the Confluent wire format through
//! schema_registry_converter over HTTP, the same path production takes against a real registry.

use crate::avro::{self, Schemas};
use crate::events::*;
use crate::topology::{TopicNames, TopicRole};
use anyhow::{anyhow, Context, Result};
use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{
    SchemaType, SubjectNameStrategy, SuppliedSchema,
};
use serde_json::json;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Registry {
    /// Schema texts by id - 1.
    schemas: Vec<(String, Schema)>,
    /// Subject -> ids of its versions, oldest first.
    subjects: BTreeMap<String, Vec<u32>>,
}

type Shared = Arc<Mutex<Registry>>;

fn error(status: StatusCode, code: u32, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error_code": code, "message": message.into()})),
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct RegisterBody {
    schema: String,
    #[serde(rename = "schemaType")]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<serde_json::Value>,
}

/// Why a registration body was refused: Confluent answers every case with 422 / 42201.
fn parse_body(body: &RegisterBody) -> Result<Schema, String> {
    if let Some(t) = &body.schema_type {
        if t != "AVRO" {
            return Err(format!("schema type {t} is not supported by this registry"));
        }
    }
    if !body.references.is_empty() {
        return Err("schema references are not supported by this registry".into());
    }
    Schema::parse_str(&body.schema).map_err(|e| format!("Invalid schema: {e}"))
}

fn invalid_schema(why: String) -> Response {
    error(StatusCode::UNPROCESSABLE_ENTITY, 42201, why)
}

/// BACKWARD: the new schema can read everything written with the latest one.
fn backward_compatible(latest: &Schema, candidate: &Schema) -> Result<(), String> {
    SchemaCompatibility::can_read(latest, candidate)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

async fn register(
    State(reg): State<Shared>,
    Path(subject): Path<String>,
    Json(body): Json<RegisterBody>,
) -> Response {
    let schema = match parse_body(&body) {
        Ok(s) => s,
        Err(why) => return invalid_schema(why),
    };
    let canonical = schema.canonical_form();
    let Ok(mut r) = reg.lock() else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            50001,
            "registry state poisoned",
        );
    };
    let versions = r.subjects.get(&subject).cloned().unwrap_or_default();
    for id in &versions {
        if r.schemas[*id as usize - 1].1.canonical_form() == canonical {
            return Json(json!({"id": id})).into_response();
        }
    }
    if let Some(latest) = versions.last() {
        if let Err(why) = backward_compatible(&r.schemas[*latest as usize - 1].1, &schema) {
            return error(StatusCode::CONFLICT, 409, format!("Schema being registered is incompatible with an earlier schema for subject \"{subject}\": {why}"));
        }
    }
    let id = match r
        .schemas
        .iter()
        .position(|(_, s)| s.canonical_form() == canonical)
    {
        Some(i) => i as u32 + 1,
        None => {
            r.schemas.push((body.schema.clone(), schema));
            r.schemas.len() as u32
        }
    };
    r.subjects.entry(subject).or_default().push(id);
    Json(json!({"id": id})).into_response()
}

async fn schema_by_id(State(reg): State<Shared>, Path(id): Path<u32>) -> Response {
    let Ok(r) = reg.lock() else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            50001,
            "registry state poisoned",
        );
    };
    match r.schemas.get((id as usize).wrapping_sub(1)) {
        Some((text, _)) => Json(json!({"schema": text})).into_response(),
        None => error(StatusCode::NOT_FOUND, 40403, "Schema not found"),
    }
}

fn version_response(r: &Registry, subject: &str, version: &str) -> Response {
    let Some(versions) = r.subjects.get(subject) else {
        return error(
            StatusCode::NOT_FOUND,
            40401,
            format!("Subject '{subject}' not found."),
        );
    };
    let index = match version {
        "latest" | "-1" => versions.len().checked_sub(1),
        v => match v.parse::<usize>() {
            Ok(n) if n >= 1 => Some(n - 1),
            _ => {
                return error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    42202,
                    format!("The specified version '{v}' is not a valid version id."),
                )
            }
        },
    };
    match index.and_then(|i| versions.get(i).map(|id| (i, *id))) {
        Some((i, id)) => Json(json!({
            "subject": subject, "version": i + 1, "id": id,
            "schemaType": "AVRO", "schema": r.schemas[id as usize - 1].0,
        }))
        .into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            40402,
            format!("Version {version} not found."),
        ),
    }
}

async fn subject_version(
    State(reg): State<Shared>,
    Path((subject, version)): Path<(String, String)>,
) -> Response {
    match reg.lock() {
        Ok(r) => version_response(&r, &subject, &version),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            50001,
            "registry state poisoned",
        ),
    }
}

async fn list_versions(State(reg): State<Shared>, Path(subject): Path<String>) -> Response {
    let Ok(r) = reg.lock() else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            50001,
            "registry state poisoned",
        );
    };
    match r.subjects.get(&subject) {
        Some(v) => Json((1..=v.len()).collect::<Vec<_>>()).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            40401,
            format!("Subject '{subject}' not found."),
        ),
    }
}

async fn list_subjects(State(reg): State<Shared>) -> Response {
    match reg.lock() {
        Ok(r) => Json(r.subjects.keys().cloned().collect::<Vec<_>>()).into_response(),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            50001,
            "registry state poisoned",
        ),
    }
}

async fn compatibility(
    State(reg): State<Shared>,
    Path((subject, version)): Path<(String, String)>,
    Json(body): Json<RegisterBody>,
) -> Response {
    let candidate = match parse_body(&body) {
        Ok(s) => s,
        Err(why) => return invalid_schema(why),
    };
    let Ok(r) = reg.lock() else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            50001,
            "registry state poisoned",
        );
    };
    let Some(versions) = r.subjects.get(&subject) else {
        return error(
            StatusCode::NOT_FOUND,
            40401,
            format!("Subject '{subject}' not found."),
        );
    };
    let id = match version.as_str() {
        "latest" => versions.last().copied(),
        v => v
            .parse::<usize>()
            .ok()
            .and_then(|n| versions.get(n.wrapping_sub(1)).copied()),
    };
    let Some(id) = id else {
        return error(
            StatusCode::NOT_FOUND,
            40402,
            format!("Version {version} not found."),
        );
    };
    match backward_compatible(&r.schemas[id as usize - 1].1, &candidate) {
        Ok(()) => Json(json!({"is_compatible": true})).into_response(),
        Err(why) => Json(json!({"is_compatible": false, "messages": [why]})).into_response(),
    }
}

/// The router of Herald's registry subset.
pub fn router() -> Router {
    Router::new()
        .route("/subjects", get(list_subjects))
        .route(
            "/subjects/{subject}/versions",
            post(register).get(list_versions),
        )
        .route(
            "/subjects/{subject}/versions/{version}",
            get(subject_version),
        )
        .route("/schemas/ids/{id}", get(schema_by_id))
        .route(
            "/compatibility/subjects/{subject}/versions/{version}",
            post(compatibility),
        )
        .with_state(Shared::default())
}

/// Serves the registry subset on `addr` (port 0 picks one); returns the bound address.
pub async fn serve(addr: SocketAddr) -> Result<SocketAddr> {
    crate::telemetry::serve_router(addr, router(), "schema registry").await
}

/// Encodes and decodes Herald's records in the Confluent wire format against a registry.
pub struct Codec {
    encoder: AvroEncoder,
    decoder: AvroDecoder,
    /// The subject (`<topic>-value`, the topic as this deployment names it) of each role.
    strategies: BTreeMap<TopicRole, (Arc<str>, SubjectNameStrategy)>,
    /// Which role each of this deployment's topics plays.
    topics: TopicNames,
    /// Writer schema id -> whether it is the reader's own schema (checked once per id).
    same_shape: std::sync::Mutex<std::collections::HashMap<(TopicRole, u32), bool>>,
}

/// A decode failure, split by who must act.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The registry could not be reached; retry.
    #[error("schema registry unavailable: {0}")]
    Retryable(String),
    /// The bytes are not a record Herald can read; dead-letter them.
    #[error("{0}")]
    Poison(String),
}

fn classify(e: SRCError) -> DecodeError {
    if e.retriable {
        DecodeError::Retryable(e.to_string())
    } else {
        DecodeError::Poison(e.to_string())
    }
}

impl Codec {
    /// A codec for the registry at `url`, for the topics as this deployment names them.
    pub fn new(url: &str, topics: &TopicNames) -> Result<Self> {
        let settings = SrSettings::new_builder(url.to_string())
            .set_timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|e| anyhow!("schema registry settings: {e}"))?;
        let mut strategies = BTreeMap::new();
        for (role, record) in avro::TOPIC_RECORDS {
            let text = Schemas::get().text(*role)?.to_string();
            let supplied = SuppliedSchema::new(Some(record.to_string()), SchemaType::Avro, text);
            let topic = topics.of(*role).clone();
            strategies.insert(
                *role,
                (
                    topic.clone(),
                    SubjectNameStrategy::TopicNameStrategyWithSchema(
                        topic.to_string(),
                        false,
                        supplied,
                    ),
                ),
            );
        }
        Ok(Codec {
            encoder: AvroEncoder::new(settings.clone()),
            decoder: AvroDecoder::new(settings),
            strategies,
            topics: topics.clone(),
            same_shape: Default::default(),
        })
    }

    async fn encode(&self, role: TopicRole, value: apache_avro::types::Value) -> Result<Vec<u8>> {
        let (topic, strategy) = self
            .strategies
            .get(&role)
            .ok_or_else(|| anyhow!("topic role {} has no Herald value schema", role.as_str()))?;
        self.encoder
            .encode_value(value, strategy)
            .await
            .map_err(|e| anyhow!("encoding for {topic}: {e}"))
    }

    /// The topics this codec reads and writes, by role.
    pub fn topics(&self) -> &TopicNames {
        &self.topics
    }

    /// Registers every Herald schema under `<topic>-value` (idempotent).
    pub async fn register_all(&self) -> Result<Vec<(String, u32)>> {
        let mut out = Vec::new();
        for (topic, strategy) in self.strategies.values() {
            let schema = self
                .encoder
                .get_schema_and_id(
                    &strategy.get_subject().map_err(|e| anyhow!("{e}"))?,
                    strategy.clone(),
                )
                .await
                .map_err(|e| anyhow!("registering {topic}-value: {e}"))?;
            out.push((format!("{topic}-value"), schema.id));
        }
        Ok(out)
    }

    /// Wire bytes of an input event for its family's topic.
    pub async fn encode_input(&self, e: &InputEvent) -> Result<Vec<u8>> {
        self.encode(
            TopicRole::of_family(e.fact.family()),
            avro::input_to_value(e)?,
        )
        .await
    }

    /// Wire bytes of a decision.
    pub async fn encode_decision(&self, d: &Decision) -> Result<Vec<u8>> {
        self.encode(TopicRole::Decisions, avro::decision_to_value(d)?)
            .await
    }

    /// Wire bytes of a dispatch step.
    pub async fn encode_dispatch(&self, r: &DispatchRecord) -> Result<Vec<u8>> {
        self.encode(TopicRole::Dispatch, avro::dispatch_to_value(r)?)
            .await
    }

    /// Wire bytes of a contact card.
    pub async fn encode_contact_card(&self, c: &ContactCard) -> Result<Vec<u8>> {
        self.encode(TopicRole::Contacts, avro::contact_card_to_value(c)?)
            .await
    }

    /// Reads a contact card off the contact changelog; `Ok(None)` for a tombstone (the
    /// customer was erased).
    pub async fn decode_contact_card(
        &self,
        bytes: Option<&[u8]>,
    ) -> Result<Option<ContactCard>, DecodeError> {
        if bytes.is_none() {
            return Ok(None);
        }
        let v = self.decode_value(TopicRole::Contacts, bytes).await?;
        avro::contact_card_from_value(&v)
            .map(Some)
            .map_err(|e| DecodeError::Poison(format!("not a contact card: {e:#}")))
    }

    /// Wire bytes of a dead letter.
    pub async fn encode_dead_letter(&self, d: &DeadLetter) -> Result<Vec<u8>> {
        self.encode(TopicRole::Dlq, avro::dead_letter_to_value(d)?)
            .await
    }

    async fn decode_value(
        &self,
        role: TopicRole,
        bytes: Option<&[u8]>,
    ) -> Result<apache_avro::types::Value, DecodeError> {
        let Some(bytes) = bytes else {
            return Err(DecodeError::Poison(
                "record has no value (tombstone)".into(),
            ));
        };
        let decoded = self
            .decoder
            .decode_with_schema(Some(bytes))
            .await
            .map_err(classify)?
            .ok_or_else(|| DecodeError::Poison("record has no value".into()))?;
        let key = (role, decoded.schema.id);
        let cached = self
            .same_shape
            .lock()
            .ok()
            .and_then(|m| m.get(&key).copied());
        let same = match cached {
            Some(same) => same,
            None => {
                let same = avro::same_as_reader(role, &decoded.schema.parsed)
                    .map_err(|e| DecodeError::Poison(format!("{e:#}")))?;
                if let Ok(mut m) = self.same_shape.lock() {
                    m.insert(key, same);
                }
                same
            }
        };
        if same {
            return Ok(decoded.value);
        }
        avro::to_reader_shape(role, &decoded.schema.parsed, decoded.value)
            .map_err(|e| DecodeError::Poison(format!("{e:#}")))
    }

    /// Reads an input event off one of the four input topics.
    pub async fn decode_input(
        &self,
        topic: &str,
        bytes: Option<&[u8]>,
    ) -> Result<InputEvent, DecodeError> {
        let family = self
            .topics
            .family_of(topic)
            .ok_or_else(|| DecodeError::Poison(format!("{topic} is not an input topic")))?;
        let v = self
            .decode_value(TopicRole::of_family(family), bytes)
            .await?;
        avro::input_from_value(family, &v)
            .map_err(|e| DecodeError::Poison(format!("not a {topic} record: {e:#}")))
    }

    /// Reads a decision off the decision log.
    pub async fn decode_decision(&self, bytes: Option<&[u8]>) -> Result<Decision, DecodeError> {
        let v = self.decode_value(TopicRole::Decisions, bytes).await?;
        avro::decision_from_value(&v)
            .map_err(|e| DecodeError::Poison(format!("not a decision: {e:#}")))
    }

    /// Reads a dispatch step off the dispatch log.
    pub async fn decode_dispatch(
        &self,
        bytes: Option<&[u8]>,
    ) -> Result<DispatchRecord, DecodeError> {
        let v = self.decode_value(TopicRole::Dispatch, bytes).await?;
        avro::dispatch_from_value(&v)
            .map_err(|e| DecodeError::Poison(format!("not a dispatch step: {e:#}")))
    }

    /// Reads a stock level off the inventory topic.
    pub async fn decode_stock(&self, bytes: Option<&[u8]>) -> Result<StockLevel, DecodeError> {
        let v = self.decode_value(TopicRole::Inventory, bytes).await?;
        apache_avro::from_value(&v)
            .map_err(|e| DecodeError::Poison(format!("not a stock level: {e:#}")))
    }

    /// Encodes a stock level for the inventory topic.
    pub async fn encode_stock(&self, s: &StockLevel) -> Result<Vec<u8>> {
        let v = avro::stock_to_value(s)?;
        self.encode(TopicRole::Inventory, v).await
    }

    /// Reads a dead letter off the dead-letter topic.
    pub async fn decode_dead_letter(
        &self,
        bytes: Option<&[u8]>,
    ) -> Result<DeadLetter, DecodeError> {
        let v = self.decode_value(TopicRole::Dlq, bytes).await?;
        avro::dead_letter_from_value(&v)
            .map_err(|e| DecodeError::Poison(format!("not a dead letter: {e:#}")))
    }
}

/// Checks that a registry answers at `url`.
pub async fn ping(url: &str) -> Result<()> {
    let resp = reqwest::get(format!("{url}/subjects"))
        .await
        .context("schema registry unreachable")?;
    if !resp.status().is_success() {
        return Err(anyhow!(
            "schema registry at {url} answered {}",
            resp.status()
        ));
    }
    Ok(())
}
