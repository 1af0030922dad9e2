//! Arguments several commands share: where the cluster, the registry, the topology and the
//! logs are, and how to read instants and keys.

use crate::kafka::{self, KafkaSettings};
use crate::registry::Codec;
use crate::topology::Topology;
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;

/// Where the audit reads the decision log: dump files, or a cluster.
#[derive(clap::Args, Debug)]
pub struct LogSource {
    /// Dump files (`.jsonl` or `.avro`) from `herald export` or `herald demo --record`.
    #[arg(long = "events", conflicts_with = "bootstrap")]
    pub events: Vec<PathBuf>,
    /// A cluster whose `herald.decisions.v1` is read whole (read_committed).
    #[arg(long, env = "HERALD_BOOTSTRAP")]
    pub bootstrap: Option<String>,
    #[command(flatten)]
    pub security: KafkaSecurityArgs,
    #[command(flatten)]
    pub registry: RegistryArgs,
    #[command(flatten)]
    pub topology: TopologyArgs,
}

impl LogSource {
    pub(crate) fn decisions(&self) -> Result<Vec<crate::events::Decision>> {
        Ok(crate::dump::decisions(&self.records()?))
    }

    pub(crate) fn records(&self) -> Result<Vec<crate::replay::DumpedRecord>> {
        Ok(match &self.bootstrap {
            Some(bootstrap) if self.events.is_empty() && self.registry.given(&self.security) => {
                let topo = self.topology.load()?;
                let rt = tokio::runtime::Runtime::new()?;
                let registry = self.registry.settings(&self.security)?;
                let codec = Arc::new(Codec::with_settings(&registry, &topo.names)?);
                let settings = connect(bootstrap, &self.security, true, "log-reader")?;
                crate::dump::export(
                    &settings,
                    vec![topo.names.decisions().to_string()],
                    codec,
                    topo.partitions(),
                    rt.handle().clone(),
                )?
            }
            _ if !self.events.is_empty() => {
                let names = self.topology.load()?.names;
                let mut records = Vec::new();
                for file in &self.events {
                    records.extend(crate::dump::read(file, &names)?);
                }
                records
            }
            _ => {
                bail!("say where the decision log is: --events FILE, or --bootstrap and --registry")
            }
        })
    }
}

/// The identifier key from its configured text; an error names the setting.
pub(crate) fn identifier_key_from(text: &str) -> Result<crate::identity::IdentifierKey> {
    crate::identity::IdentifierKey::new(text.as_bytes())
        .map_err(|why| anyhow!("HERALD_IDENTIFIER_KEY (--identifier-key): {why}"))
}

/// A small runtime for commands that may talk to ScyllaDB.
pub(crate) fn store_runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

pub(crate) fn parse_instant(flag: &str, text: &str) -> Result<crate::events::Millis> {
    text.parse::<jiff::Timestamp>()
        .map(|t| t.as_millisecond())
        .with_context(|| {
            format!("{flag}: '{text}' is not an RFC 3339 instant (2026-11-01T00:00:00Z)")
        })
}

/// The cluster a command reads: brokers, registry, and the topology for partition counts.
#[derive(Args, Debug)]
pub struct ClusterArgs {
    #[command(flatten)]
    pub kafka: KafkaClientArgs,
    #[command(flatten)]
    pub registry: RegistryArgs,
    #[command(flatten)]
    pub topology: TopologyArgs,
}

/// How a command reaches the Kafka cluster: the same options for every command that talks to it.
#[derive(Args, Debug, Clone)]
pub struct KafkaClientArgs {
    /// Brokers to start from, `host:port[,host:port]`.
    #[arg(long, env = "HERALD_BOOTSTRAP")]
    pub bootstrap: String,
    #[command(flatten)]
    pub security: KafkaSecurityArgs,
}

/// librdkafka client settings (security, timeouts) beyond the bootstrap address. They apply in
/// this order, later ones winning: the properties file, `HERALD_KAFKA_*` environment variables
/// (`HERALD_KAFKA_SASL_PASSWORD` is `sasl.password`), then `--kafka-config` flags.
#[derive(Args, Debug, Clone, Default)]
pub struct KafkaSecurityArgs {
    /// A librdkafka properties file of `key=value` lines (security.protocol, sasl.mechanism,
    /// sasl.username, sasl.password, ssl.ca.location, ...); the place for secrets.
    #[arg(long = "kafka-properties", env = "HERALD_KAFKA_PROPERTIES")]
    pub kafka_properties: Option<PathBuf>,
    /// One librdkafka setting, `key=value`; repeatable.
    #[arg(long = "kafka-config", value_parser = parse_kv)]
    pub kafka_config: Vec<(String, String)>,
}

impl KafkaSecurityArgs {
    /// Every `key=value` from the file, the environment and the flags, in that order.
    pub(crate) fn all_settings(&self) -> Result<Vec<(String, String)>> {
        let mut out = match &self.kafka_properties {
            Some(path) => kafka::read_properties(path)?,
            None => Vec::new(),
        };
        out.extend(kafka::settings_from_env(std::env::vars()));
        out.extend(self.kafka_config.iter().cloned());
        Ok(out)
    }

    /// The librdkafka settings: all but the schema registry's.
    pub fn settings(&self) -> Result<Vec<(String, String)>> {
        Ok(self
            .all_settings()?
            .into_iter()
            .filter(|(k, _)| !k.starts_with(crate::registry::PROPERTY_PREFIX))
            .collect())
    }

    /// The `schema.registry.*` settings, which the same file may hold, as Confluent's clients
    /// read them.
    pub fn registry_properties(&self) -> Result<Vec<(String, String)>> {
        Ok(self
            .all_settings()?
            .into_iter()
            .filter(|(k, _)| k.starts_with(crate::registry::PROPERTY_PREFIX))
            .collect())
    }
}

/// How a command reaches the schema registry (Confluent's API, or Apicurio's
/// `/apis/ccompat/v7`). Each setting may also come from the Kafka properties file as
/// `schema.registry.url`, `schema.registry.basic.auth.user.info` and
/// `schema.registry.ssl.ca.location`; a flag or variable wins over the file.
#[derive(Args, Debug, Clone, Default)]
pub struct RegistryArgs {
    /// The registry's URL.
    #[arg(long = "registry", env = "HERALD_REGISTRY_URL")]
    pub registry: Option<String>,
    /// USER:PASSWORD for a registry behind HTTP basic auth (Confluent Cloud: key and secret).
    #[arg(
        long = "registry-user-info",
        env = "HERALD_REGISTRY_USER_INFO",
        hide_env_values = true
    )]
    pub registry_user_info: Option<String>,
    /// PEM file of the CA that signed the registry's certificate.
    #[arg(long = "registry-ca-file", env = "HERALD_REGISTRY_CA_FILE")]
    pub registry_ca_file: Option<PathBuf>,
}

impl RegistryArgs {
    /// The registry settings, from these options over the properties file's.
    pub fn settings(
        &self,
        security: &KafkaSecurityArgs,
    ) -> Result<crate::registry::RegistrySettings> {
        crate::registry::RegistrySettings::resolve(
            &security.registry_properties()?,
            self.registry.as_deref(),
            self.registry_user_info.as_deref(),
            self.registry_ca_file.as_deref(),
        )
    }

    /// Whether a registry is named here or in the properties file.
    pub(crate) fn given(&self, security: &KafkaSecurityArgs) -> bool {
        self.registry.is_some()
            || security
                .registry_properties()
                .map(|p| p.iter().any(|(k, _)| k == "schema.registry.url"))
                .unwrap_or(false)
    }
}

impl KafkaClientArgs {
    /// Client settings for `instance_id`, once the cluster has answered with them.
    pub fn connect(&self, exactly_once: bool, instance_id: &str) -> Result<KafkaSettings> {
        connect(&self.bootstrap, &self.security, exactly_once, instance_id)
    }
}

/// Client settings for the cluster at `bootstrap`, checked against it: a wrong address,
/// certificate or password stops the command here with the settings to fix.
pub(crate) fn connect(
    bootstrap: &str,
    security: &KafkaSecurityArgs,
    exactly_once: bool,
    instance_id: &str,
) -> Result<KafkaSettings> {
    let mut settings = KafkaSettings::new(bootstrap, exactly_once, instance_id);
    settings.extra = security.settings()?;
    kafka::check_connection(&settings)?;
    Ok(settings)
}

pub(crate) fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .ok_or_else(|| format!("expected key=value, got '{s}'"))
}

/// Which topology a command uses, and the names of its topics.
#[derive(Args, Debug, Clone, Default)]
pub struct TopologyArgs {
    /// Topology directory (topics, templates, policy, journeys); the embedded one when absent.
    #[arg(long, env = "HERALD_TOPOLOGY")]
    pub topology: Option<PathBuf>,
    /// Put before every topic name instead of topics.toml's `prefix`, so that deployments
    /// (production, staging) share a cluster without touching each other's topics.
    #[arg(long, env = "HERALD_TOPIC_PREFIX")]
    pub topic_prefix: Option<String>,
}

impl TopologyArgs {
    /// Loads the topology, with the prefix applied.
    pub fn load(&self) -> Result<Topology> {
        let topo = match &self.topology {
            Some(d) => crate::topology_files::load(d)?,
            None => Topology::embedded()?,
        };
        match &self.topic_prefix {
            Some(prefix) => topo
                .with_topic_prefix(prefix)
                .context("--topic-prefix (HERALD_TOPIC_PREFIX)"),
            None => Ok(topo),
        }
    }
}
