//! The schema registry shell: Herald's own Confluent-compatible subset (for `herald demo` and the
//! tests), and the codec that encodes and decodes the Confluent wire format through
//! schema_registry_converter over HTTP, the same path production takes against a real registry.

use crate::avro::{self, Schemas};
use crate::datum::{self, Datums};
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

/// Herald's registry checks BACKWARD compatibility always; it accepts that level and refuses
/// any other, as a registry that cannot honour a level must.
async fn set_compatibility(
    Path(_subject): Path<String>,
    Json(body): Json<serde_json::Value>,
) -> Response {
    match body.get("compatibility").and_then(|c| c.as_str()) {
        Some("BACKWARD") => Json(json!({"compatibility": "BACKWARD"})).into_response(),
        other => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            42203,
            format!("compatibility {other:?}: this registry checks BACKWARD only"),
        ),
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
        .route("/config/{subject}", axum::routing::put(set_compatibility))
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

/// How long a process waits out a registry that does not answer (at start, or for a record
/// of a schema it has not resolved) before it stops to be restarted: long enough for a
/// registry's rolling restart, and below the consumer's max.poll.interval.ms (300 s), so a
/// stage waiting keeps its partitions.
pub const OUTAGE_BUDGET: std::time::Duration = std::time::Duration::from_secs(120);

/// The Kafka properties-file keys a registry's settings may come from, as Confluent's clients
/// name them; librdkafka never sees them.
pub const PROPERTY_PREFIX: &str = "schema.registry.";
const URL_KEY: &str = "schema.registry.url";
const USER_INFO_KEY: &str = "schema.registry.basic.auth.user.info";
const CA_KEY: &str = "schema.registry.ssl.ca.location";

/// How to reach a schema registry: its Confluent-compatible URL, and what a secured one asks
/// for (HTTP basic auth, a private CA).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RegistrySettings {
    pub url: String,
    /// `USER:PASSWORD` for HTTP basic auth (Confluent Cloud: API key and secret).
    pub user_info: Option<String>,
    /// PEM file of the CA that signed the registry's certificate, beside the system's CAs.
    pub ca_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for RegistrySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password never reaches a log line.
        let user = self
            .user_info
            .as_deref()
            .map(|u| format!("{}:***", u.split(':').next().unwrap_or_default()));
        f.debug_struct("RegistrySettings")
            .field("url", &self.url)
            .field("user_info", &user)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl RegistrySettings {
    /// A registry at `url` that asks for nothing more.
    pub fn new(url: &str) -> RegistrySettings {
        RegistrySettings {
            url: url.to_string(),
            ..Default::default()
        }
    }

    /// Settings from the `schema.registry.*` keys of a Kafka properties file, overridden by
    /// what flags or the environment give (`url`, `user_info`, `ca_file`). An error names the
    /// setting to fix.
    pub fn resolve(
        properties: &[(String, String)],
        url: Option<&str>,
        user_info: Option<&str>,
        ca_file: Option<&std::path::Path>,
    ) -> Result<RegistrySettings> {
        let property = |key: &str| {
            properties
                .iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        for (k, _) in properties {
            if k.starts_with(PROPERTY_PREFIX)
                && ![URL_KEY, USER_INFO_KEY, CA_KEY].contains(&k.as_str())
            {
                anyhow::bail!("{k}: not a registry setting Herald knows ({URL_KEY}, {USER_INFO_KEY}, {CA_KEY})");
            }
        }
        let url = url.map(str::to_string).or_else(|| property(URL_KEY)).ok_or_else(|| {
            anyhow!("no schema registry: give --registry (HERALD_REGISTRY_URL) or {URL_KEY} in the Kafka properties file")
        })?;
        let url = url.trim_end_matches('/').to_string();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            anyhow::bail!(
                "--registry (HERALD_REGISTRY_URL): '{url}' must start with http:// or https://"
            );
        }
        let user_info = user_info
            .map(str::to_string)
            .or_else(|| property(USER_INFO_KEY))
            .filter(|u| !u.is_empty());
        if let Some(u) = &user_info {
            if !u.contains(':') {
                anyhow::bail!("--registry-user-info (HERALD_REGISTRY_USER_INFO, {USER_INFO_KEY}) is USER:PASSWORD");
            }
        }
        let ca_file = ca_file
            .map(std::path::Path::to_path_buf)
            .or_else(|| property(CA_KEY).map(std::path::PathBuf::from));
        Ok(RegistrySettings {
            url,
            user_info,
            ca_file,
        })
    }

    /// An HTTP client that trusts the configured CA.
    fn client_builder(&self) -> Result<reqwest::ClientBuilder> {
        let mut builder = reqwest::Client::builder().timeout(std::time::Duration::from_secs(10));
        if let Some(path) = &self.ca_file {
            let pem = std::fs::read(path).with_context(|| {
                format!(
                    "--registry-ca-file (HERALD_REGISTRY_CA_FILE): cannot read {}",
                    path.display()
                )
            })?;
            let ca = reqwest::Certificate::from_pem(&pem).with_context(|| {
                format!(
                    "--registry-ca-file (HERALD_REGISTRY_CA_FILE): {} is not a PEM certificate",
                    path.display()
                )
            })?;
            builder = builder.add_root_certificate(ca);
        }
        Ok(builder)
    }

    fn basic_auth(&self) -> Option<(&str, &str)> {
        self.user_info.as_deref().and_then(|u| u.split_once(':'))
    }

    fn converter_settings(&self) -> Result<SrSettings> {
        let mut builder = SrSettings::new_builder(self.url.clone());
        builder.set_timeout(std::time::Duration::from_secs(10));
        if let Some((user, password)) = self.basic_auth() {
            builder.set_basic_authorization(user, Some(password));
        }
        builder
            .build_with(self.client_builder()?)
            .map_err(|e| anyhow!("schema registry settings: {e}"))
    }
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
    /// The registry's id of this build's schema, per role, once looked up.
    ids: std::sync::Mutex<std::collections::HashMap<TopicRole, u32>>,
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

/// Who must act on a registry error. The converter retries only 502 and 503; a real registry
/// also answers 401/403 while credentials rotate, 429 when rate-limiting (Confluent Cloud) and
/// 500 or 504 while it restarts. Those are the registry's trouble, not the record's: retried,
/// never dead-lettered. What remains poison is what the record itself causes: an id the
/// registry does not know (404), a schema or payload that does not parse.
pub fn classify(e: SRCError) -> DecodeError {
    if e.retriable || registry_trouble(&e.error) {
        DecodeError::Retryable(e.to_string())
    } else {
        DecodeError::Poison(e.to_string())
    }
}

/// Whether the converter's error text names an HTTP status that is the registry's trouble.
fn registry_trouble(error: &str) -> bool {
    let Some(rest) = error.split("failed with status ").nth(1) else {
        return false;
    };
    let code: u16 = rest
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or(0);
    matches!(code, 401 | 403 | 408 | 429) || (500..600).contains(&code)
}

impl Codec {
    /// A codec for the registry at `url`, for the topics as this deployment names them.
    pub fn new(url: &str, topics: &TopicNames) -> Result<Self> {
        Codec::with_settings(&RegistrySettings::new(url), topics)
    }

    /// A codec for a registry that may ask for credentials and a private CA.
    pub fn with_settings(registry: &RegistrySettings, topics: &TopicNames) -> Result<Self> {
        let settings = registry.converter_settings()?;
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
            ids: Default::default(),
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
            .map_err(|e| {
                self.encoder.remove_errors_from_cache();
                anyhow!("encoding for {topic}: {e}")
            })
    }

    /// The registry's id of this build's schema for `role`, registered under the topic's
    /// subject on first use and remembered after.
    async fn writer_id(&self, role: TopicRole) -> Result<u32> {
        if let Some(id) = self.ids.lock().ok().and_then(|m| m.get(&role).copied()) {
            return Ok(id);
        }
        let (topic, strategy) = self
            .strategies
            .get(&role)
            .ok_or_else(|| anyhow!("topic role {} has no Herald value schema", role.as_str()))?;
        let subject = strategy.get_subject().map_err(|e| anyhow!("{e}"))?;
        let schema = self
            .encoder
            .get_schema_and_id(&subject, strategy.clone())
            .await
            .map_err(|e| {
                self.encoder.remove_errors_from_cache();
                anyhow!("encoding for {topic}: {e}")
            })?;
        if let Ok(mut m) = self.ids.lock() {
            m.insert(role, schema.id);
        }
        Ok(schema.id)
    }

    /// Wire bytes of `value`, written straight from Herald's types with this build's schema.
    async fn write<T: serde::Serialize>(&self, role: TopicRole, value: &T) -> Result<Vec<u8>> {
        let id = self.writer_id(role).await?;
        Datums::get().write(role, id, value)
    }

    /// The datum of `bytes` when its writer schema is this build's own for `role` (already
    /// seen once); `None` sends it the slow way, which resolves other writer schemas.
    fn own_datum<'b>(&self, role: TopicRole, bytes: Option<&'b [u8]>) -> Option<&'b [u8]> {
        let (id, datum) = datum::framed(bytes?)?;
        let same = self.same_shape.lock().ok()?.get(&(role, id)).copied()?;
        same.then_some(datum)
    }

    /// The topics this codec reads and writes, by role.
    pub fn topics(&self) -> &TopicNames {
        &self.topics
    }

    /// Sets every Herald subject's compatibility to BACKWARD, as Herald's schemas evolve (a
    /// reader of the newest version reads every older record), so the registry refuses a
    /// producer's incompatible schema. Confluent's registry defaults to it; Apicurio's
    /// Confluent-compatible API to NONE.
    pub async fn require_backward_compatibility(&self, registry: &RegistrySettings) -> Result<()> {
        let client = registry.client_builder()?.build()?;
        for (topic, _) in self.strategies.values() {
            let subject = format!("{topic}-value");
            let mut request = client
                .put(format!("{}/config/{subject}", registry.url))
                .header("content-type", "application/vnd.schemaregistry.v1+json")
                .body(r#"{"compatibility":"BACKWARD"}"#);
            if let Some((user, password)) = registry.basic_auth() {
                request = request.basic_auth(user, Some(password));
            }
            let resp = request
                .send()
                .await
                .with_context(|| format!("setting {subject}'s compatibility"))?;
            if !resp.status().is_success() {
                let status = resp.status();
                let body = resp.text().await.unwrap_or_default();
                anyhow::bail!("setting {subject}'s compatibility to BACKWARD: {status} {body}");
            }
        }
        Ok(())
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
        self.write(TopicRole::of_family(e.fact.family()), &datum::InputOut(e))
            .await
    }

    /// Wire bytes of a decision.
    pub async fn encode_decision(&self, d: &Decision) -> Result<Vec<u8>> {
        self.write(TopicRole::Decisions, &datum::DecisionOut(d))
            .await
    }

    /// Wire bytes of each decision, the schema id looked up once for them all.
    pub async fn encode_decisions(&self, ds: &[Decision]) -> Result<Vec<Vec<u8>>> {
        let id = self.writer_id(TopicRole::Decisions).await?;
        ds.iter()
            .map(|d| Datums::get().write(TopicRole::Decisions, id, &datum::DecisionOut(d)))
            .collect()
    }

    /// Wire bytes of a dispatch step.
    pub async fn encode_dispatch(&self, r: &DispatchRecord) -> Result<Vec<u8>> {
        self.write(TopicRole::Dispatch, &datum::DispatchOut(r))
            .await
    }

    /// Wire bytes of a contact card.
    pub async fn encode_contact_card(&self, c: &ContactCard) -> Result<Vec<u8>> {
        self.write(TopicRole::Contacts, c).await
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
        if let Some(datum) = self.own_datum(TopicRole::Contacts, bytes) {
            return Datums::get()
                .read(TopicRole::Contacts, datum)
                .map(Some)
                .map_err(|e| DecodeError::Poison(format!("not a contact card: {e:#}")));
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
            .map_err(|e| {
                let why = classify(e);
                if matches!(why, DecodeError::Retryable(_)) {
                    // The converter keeps failures it thinks final; the next try must ask again.
                    self.decoder.remove_errors_from_cache();
                }
                why
            })?
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
        let role = TopicRole::of_family(family);
        if let Some(datum) = self.own_datum(role, bytes) {
            return datum::read_input(family, datum)
                .map_err(|e| DecodeError::Poison(format!("not a {topic} record: {e:#}")));
        }
        let v = self.decode_value(role, bytes).await?;
        avro::input_from_value(family, &v)
            .map_err(|e| DecodeError::Poison(format!("not a {topic} record: {e:#}")))
    }

    /// Reads a decision off the decision log.
    pub async fn decode_decision(&self, bytes: Option<&[u8]>) -> Result<Decision, DecodeError> {
        if let Some(datum) = self.own_datum(TopicRole::Decisions, bytes) {
            return Datums::get()
                .read::<datum::DecisionIn>(TopicRole::Decisions, datum)
                .map(Decision::from)
                .map_err(|e| DecodeError::Poison(format!("not a decision: {e:#}")));
        }
        let v = self.decode_value(TopicRole::Decisions, bytes).await?;
        avro::decision_from_value(&v)
            .map_err(|e| DecodeError::Poison(format!("not a decision: {e:#}")))
    }

    /// Reads a dispatch step off the dispatch log.
    pub async fn decode_dispatch(
        &self,
        bytes: Option<&[u8]>,
    ) -> Result<DispatchRecord, DecodeError> {
        if let Some(datum) = self.own_datum(TopicRole::Dispatch, bytes) {
            return Datums::get()
                .read::<datum::DispatchIn>(TopicRole::Dispatch, datum)
                .map(DispatchRecord::from)
                .map_err(|e| DecodeError::Poison(format!("not a dispatch step: {e:#}")));
        }
        let v = self.decode_value(TopicRole::Dispatch, bytes).await?;
        avro::dispatch_from_value(&v)
            .map_err(|e| DecodeError::Poison(format!("not a dispatch step: {e:#}")))
    }

    /// Reads a stock level off the inventory topic.
    pub async fn decode_stock(&self, bytes: Option<&[u8]>) -> Result<StockLevel, DecodeError> {
        if let Some(datum) = self.own_datum(TopicRole::Inventory, bytes) {
            return Datums::get()
                .read(TopicRole::Inventory, datum)
                .map_err(|e| DecodeError::Poison(format!("not a stock level: {e:#}")));
        }
        let v = self.decode_value(TopicRole::Inventory, bytes).await?;
        apache_avro::from_value(&v)
            .map_err(|e| DecodeError::Poison(format!("not a stock level: {e:#}")))
    }

    /// Encodes a stock level for the inventory topic.
    pub async fn encode_stock(&self, s: &StockLevel) -> Result<Vec<u8>> {
        self.write(TopicRole::Inventory, s).await
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

/// Why a registry check failed: the registry is away (wait for it), or the settings are wrong
/// (stop and say which).
#[derive(Debug)]
pub enum RegistryCheck {
    Away(anyhow::Error),
    Misconfigured(anyhow::Error),
}

/// Checks that a registry answers at its URL and takes the credentials given; an error says
/// which setting to fix.
pub async fn ping(registry: &RegistrySettings) -> Result<()> {
    check(registry).await.map_err(|e| match e {
        RegistryCheck::Away(e) | RegistryCheck::Misconfigured(e) => e,
    })
}

/// As `ping`, waiting up to `budget` for a registry that is away (unreachable, 408, 429, 5xx);
/// wrong credentials or an untrusted certificate stop at once.
pub async fn wait_for(registry: &RegistrySettings, budget: std::time::Duration) -> Result<()> {
    let started = std::time::Instant::now();
    let mut delay = std::time::Duration::from_millis(250);
    loop {
        match check(registry).await {
            Ok(()) => return Ok(()),
            Err(RegistryCheck::Misconfigured(e)) => return Err(e),
            Err(RegistryCheck::Away(e)) => {
                if started.elapsed() >= budget {
                    return Err(e.context(format!(
                        "waited {} s for the schema registry",
                        started.elapsed().as_secs()
                    )));
                }
                tracing::warn!(error = %format!("{e:#}"), "schema registry away; waiting for it");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(5));
            }
        }
    }
}

async fn check(registry: &RegistrySettings) -> Result<(), RegistryCheck> {
    let url = &registry.url;
    let client = registry
        .client_builder()
        .and_then(|b| Ok(b.build()?))
        .map_err(RegistryCheck::Misconfigured)?;
    let mut request = client.get(format!("{url}/subjects"));
    if let Some((user, password)) = registry.basic_auth() {
        request = request.basic_auth(user, Some(password));
    }
    let resp = match request.send().await {
        Ok(resp) => resp,
        Err(e) => {
            let mut why = format!("{e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                why = format!("{why}: {s}");
                source = s.source();
            }
            if url.starts_with("https://") && why.contains("certificate") {
                return Err(RegistryCheck::Misconfigured(anyhow!(
                    "schema registry at {url} unreachable: {why} (is --registry-ca-file the CA that signed it?)"
                )));
            }
            return Err(RegistryCheck::Away(anyhow!(
                "schema registry at {url} unreachable: {why}"
            )));
        }
    };
    match resp.status().as_u16() {
        200..=299 => Ok(()),
        401 | 403 => Err(RegistryCheck::Misconfigured(anyhow!(
            "schema registry at {url} refused the credentials ({}): check --registry-user-info (HERALD_REGISTRY_USER_INFO, {USER_INFO_KEY})",
            resp.status()
        ))),
        code if code == 408 || code == 429 || code >= 500 => Err(RegistryCheck::Away(anyhow!(
            "schema registry at {url} answered {}",
            resp.status()
        ))),
        _ => Err(RegistryCheck::Misconfigured(anyhow!(
            "schema registry at {url} answered {}: is --registry the Confluent-compatible API's root?",
            resp.status()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn registry_settings_come_from_the_properties_file_and_flags_win() {
        let file = props(&[
            ("schema.registry.url", "https://sr.example.com/"),
            ("schema.registry.basic.auth.user.info", "key:secret"),
            ("schema.registry.ssl.ca.location", "/etc/ca.pem"),
        ]);
        let s = RegistrySettings::resolve(&file, None, None, None).unwrap();
        assert_eq!(s.url, "https://sr.example.com");
        assert_eq!(s.user_info.as_deref(), Some("key:secret"));
        assert_eq!(
            s.ca_file.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        assert!(!format!("{s:?}").contains("secret"), "{s:?}");
        let s = RegistrySettings::resolve(
            &file,
            Some("http://other:8081"),
            Some("me:pw"),
            Some(std::path::Path::new("/ca2.pem")),
        )
        .unwrap();
        assert_eq!(
            (s.url.as_str(), s.user_info.as_deref()),
            ("http://other:8081", Some("me:pw"))
        );
        for (file, flag, named) in [
            (props(&[]), None, "--registry"),
            (props(&[]), Some("sr:8081"), "http://"),
            (
                props(&[("schema.registry.user.info", "x:y")]),
                Some("http://sr"),
                "schema.registry.user.info",
            ),
            (
                props(&[("schema.registry.basic.auth.user.info", "no-colon")]),
                Some("http://sr"),
                "USER:PASSWORD",
            ),
        ] {
            let e = RegistrySettings::resolve(&file, flag, None, None)
                .unwrap_err()
                .to_string();
            assert!(e.contains(named), "{e}");
        }
    }

    #[test]
    fn the_registrys_own_trouble_is_retried_and_a_bad_record_is_dead_lettered() {
        let status = |code: &str| {
            SRCError::non_retryable_without_cause(&format!(
                "HTTP request to schema registry failed with status {code}"
            ))
        };
        for code in [
            "401 Unauthorized",
            "403 Forbidden",
            "429 Too Many Requests",
            "500 Internal Server Error",
            "504 Gateway Timeout",
        ] {
            assert!(
                matches!(classify(status(code)), DecodeError::Retryable(_)),
                "{code} is the registry's trouble"
            );
        }
        assert!(matches!(
            classify(status("404 Not Found")),
            DecodeError::Poison(_)
        ));
        assert!(matches!(
            classify(SRCError::non_retryable_without_cause(
                "Invalid bytes: first byte is 0x7b, expected magic byte 0x00"
            )),
            DecodeError::Poison(_)
        ));
        assert!(matches!(
            classify(SRCError::new(
                "http call to schema registry failed",
                None,
                true
            )),
            DecodeError::Retryable(_)
        ));
    }

    /// A registry that answers `status` to its first `times` calls and 200 after.
    async fn flaky(status: u16, times: usize) -> RegistrySettings {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let app = Router::new().route(
            "/subjects",
            get(move || {
                let calls = calls.clone();
                async move {
                    if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < times {
                        StatusCode::from_u16(status).unwrap().into_response()
                    } else {
                        Json(json!([])).into_response()
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        RegistrySettings::new(&format!("http://{addr}"))
    }

    #[tokio::test]
    async fn a_registry_that_is_away_is_waited_for_and_wrong_settings_stop_at_once() {
        let budget = std::time::Duration::from_secs(10);
        // Restarting: 503 twice, then up.
        wait_for(&flaky(503, 2).await, budget).await.unwrap();
        // Wrong credentials: no waiting.
        let started = std::time::Instant::now();
        let e = wait_for(&flaky(401, 100).await, budget).await.unwrap_err();
        assert!(format!("{e:#}").contains("--registry-user-info"), "{e:#}");
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        // Nobody listening: waited for up to the budget, then an error saying so.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let started = std::time::Instant::now();
        let short = std::time::Duration::from_millis(700);
        let e = wait_for(&RegistrySettings::new(&format!("http://{closed}")), short)
            .await
            .unwrap_err();
        assert!(started.elapsed() >= short, "gave up before the budget");
        assert!(format!("{e:#}").contains("waited"), "{e:#}");
    }
}
