//! The ScyllaDB backend of the state store. Every statement comes from `schemas/scylla.cql` and
//! is prepared at connect time; writes carry their log position as the write timestamp, so
//! retries and replays are harmless, and a newer position always wins.

use super::contract::{
    CustomerView, PartitionSnapshot, SnapshotWrite, StateStore, StoredState, PROCESSORS,
};
use crate::audit::ConsentEvent;
use crate::events::wire_name;
use anyhow::{anyhow, bail, Context, Result};
use futures::{StreamExt, TryStreamExt};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::policies::retry::DefaultRetryPolicy;
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::Consistency;
use scylla::value::CqlTimestamp;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// The reviewed CQL: schema and every statement Herald runs.
pub const CQL: &str = include_str!("../../schemas/scylla.cql");

/// Buckets per Kafka partition: a partition's customers spread over this many CQL partitions.
const BUCKETS: i32 = 16;
/// Writes in flight at once during a save.
const WRITES_IN_FLIGHT: usize = 64;

/// What a statement is for, as its `-- name:` line says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatementKind {
    Ddl,
    Write,
    Read,
}

/// One named statement of the CQL file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CqlStatement {
    pub name: String,
    pub kind: StatementKind,
    pub text: String,
}

/// Splits the CQL file into its named statements; comments between them are dropped.
pub fn statements(cql: &str) -> Result<Vec<CqlStatement>> {
    let mut out: Vec<CqlStatement> = Vec::new();
    for (n, line) in cql.lines().enumerate() {
        let trimmed = line.trim();
        if let Some(rest) = trimmed.strip_prefix("-- name:") {
            let (name, kind) = rest
                .trim()
                .split_once(' ')
                .ok_or_else(|| anyhow!("scylla.cql line {}: '-- name: <id> (<kind>)'", n + 1))?;
            let kind = match kind.trim() {
                "(ddl)" => StatementKind::Ddl,
                "(write)" => StatementKind::Write,
                "(read)" => StatementKind::Read,
                other => bail!(
                    "scylla.cql line {}: kind {other} is not (ddl), (write) or (read)",
                    n + 1
                ),
            };
            out.push(CqlStatement {
                name: name.to_string(),
                kind,
                text: String::new(),
            });
        } else if trimmed.starts_with("--") || trimmed.is_empty() {
            continue;
        } else if let Some(current) = out.last_mut() {
            if !current.text.is_empty() {
                current.text.push(' ');
            }
            current.text.push_str(trimmed);
        } else {
            bail!("scylla.cql line {}: a statement without a name", n + 1);
        }
    }
    for s in &mut out {
        s.text = s.text.trim_end_matches(';').trim().to_string();
        if s.text.is_empty() {
            bail!("scylla.cql: statement {} is empty", s.name);
        }
    }
    Ok(out)
}

/// Why a statement could not be retried or replayed safely; empty when it can.
pub fn idempotency_violations(s: &CqlStatement) -> Vec<String> {
    let upper = s.text.to_uppercase();
    let mut why = Vec::new();
    if upper.contains(" COUNTER") {
        why.push("uses a counter column".to_string());
    }
    match s.kind {
        StatementKind::Ddl => {
            if !upper.contains("IF NOT EXISTS") {
                why.push("DDL without IF NOT EXISTS fails when run again".to_string());
            }
        }
        StatementKind::Write => {
            if !upper.contains("USING TIMESTAMP ?") {
                why.push("a write without USING TIMESTAMP ? (the log position)".to_string());
            }
            // `SET x = x + ...` appends to a list or adds to a counter: not repeatable.
            if let Some(set) = upper.split(" SET ").nth(1) {
                for assignment in set.split(',') {
                    if let Some((col, value)) = assignment.split_once('=') {
                        let col = col.trim();
                        let v = value.trim();
                        if v.starts_with(&format!("{col} +")) || v.contains(&format!("+ {col}")) {
                            why.push(format!("'{}' appends or increments", assignment.trim()));
                        }
                    }
                }
            }
            if upper.contains(" IF ") || upper.ends_with(" IF EXISTS") {
                why.push("a lightweight transaction (IF ...) is not retried safely".to_string());
            }
            if !(upper.starts_with("INSERT ")
                || upper.starts_with("UPDATE ")
                || upper.starts_with("DELETE "))
            {
                why.push("a write must be INSERT, UPDATE or DELETE".to_string());
            }
        }
        StatementKind::Read => {
            if !upper.starts_with("SELECT ") {
                why.push("a read must be a SELECT".to_string());
            }
        }
    }
    why
}

/// How to reach ScyllaDB, from `scylla://host:port[,host:port]/keyspace?options`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScyllaConfig {
    pub nodes: Vec<String>,
    pub keyspace: String,
    /// Replicas per datacenter when Herald creates the keyspace.
    pub replication_factor: u32,
    /// The datacenter that LOCAL_* consistency counts in; requests prefer its nodes.
    pub local_dc: Option<String>,
    pub consistency: Consistency,
    pub request_timeout: Duration,
    /// The role Herald logs in as (PasswordAuthenticator); its password is never part of the
    /// address: it comes from `password_file` or `HERALD_STORE_PASSWORD` when connecting.
    pub user: Option<String>,
    /// A file holding the password (a mounted Kubernetes secret, say), trailing newline ignored.
    pub password_file: Option<std::path::PathBuf>,
    /// Connect over TLS.
    pub tls: bool,
    /// The CA that signed the nodes' certificates (PEM); the system's CAs when absent.
    pub ca_file: Option<std::path::PathBuf>,
}

/// The environment variable a CQL password may come from when the address names no file.
pub const PASSWORD_ENV: &str = "HERALD_STORE_PASSWORD";

impl ScyllaConfig {
    /// Parses what follows `scylla://`.
    pub fn parse(rest: &str) -> Result<ScyllaConfig> {
        let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (hosts, keyspace) = location
            .split_once('/')
            .ok_or_else(|| anyhow!("--store: scylla://HOST:PORT/KEYSPACE needs a keyspace"))?;
        let nodes: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| {
                if h.contains(':') {
                    h.to_string()
                } else {
                    format!("{h}:9042")
                }
            })
            .collect();
        if nodes.is_empty() {
            bail!("--store: scylla:// needs at least one host");
        }
        // Keyspace names are identifiers: they are spliced into DDL, so nothing else passes.
        let valid = !keyspace.is_empty()
            && keyspace.len() <= 48
            && keyspace
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && !keyspace.starts_with(|c: char| c.is_ascii_digit());
        if !valid {
            bail!("--store: keyspace '{keyspace}' must be 1-48 of a-z, 0-9, _ and not start with a digit");
        }
        let mut config = ScyllaConfig {
            nodes,
            keyspace: keyspace.to_string(),
            replication_factor: 3,
            local_dc: None,
            consistency: Consistency::LocalQuorum,
            request_timeout: Duration::from_secs(5),
            user: None,
            password_file: None,
            tls: false,
            ca_file: None,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| anyhow!("--store: option '{pair}' needs a value (key=value)"))?;
            match k {
                "replication_factor" => {
                    config.replication_factor = v
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| anyhow!("--store: replication_factor '{v}' is not a positive number"))?
                }
                "local_dc" => config.local_dc = Some(v.to_string()),
                "consistency" => {
                    config.consistency = match v.to_ascii_lowercase().as_str() {
                        "local_quorum" => Consistency::LocalQuorum,
                        "quorum" => Consistency::Quorum,
                        "each_quorum" => Consistency::EachQuorum,
                        "local_one" => Consistency::LocalOne,
                        "one" => Consistency::One,
                        "all" => Consistency::All,
                        _ => bail!("--store: consistency '{v}' is not one of local_quorum, quorum, each_quorum, local_one, one, all"),
                    }
                }
                "timeout_ms" => {
                    config.request_timeout = Duration::from_millis(
                        v.parse()
                            .ok()
                            .filter(|n| *n > 0)
                            .ok_or_else(|| anyhow!("--store: timeout_ms '{v}' is not a positive number"))?,
                    )
                }
                "user" if !v.is_empty() => config.user = Some(v.to_string()),
                "password_file" if !v.is_empty() => {
                    config.password_file = Some(std::path::PathBuf::from(v))
                }
                "password" => bail!("--store: a password does not go in the address (it would be logged); use password_file=PATH or {PASSWORD_ENV}"),
                "tls" => {
                    config.tls = match v {
                        "true" => true,
                        "false" => false,
                        _ => bail!("--store: tls '{v}' is not true or false"),
                    }
                }
                "ca_file" if !v.is_empty() => {
                    config.ca_file = Some(std::path::PathBuf::from(v));
                    config.tls = true;
                }
                "user" | "password_file" | "ca_file" => bail!("--store: option '{k}' is empty"),
                other => bail!("--store: unknown scylla option '{other}' (known: replication_factor, local_dc, consistency, timeout_ms, user, password_file, tls, ca_file)"),
            }
        }
        Ok(config)
    }

    /// The password for `user`: from `password_file`, else from `env` (the process's
    /// `HERALD_STORE_PASSWORD`). A password without a user, or a user without one, is an error
    /// naming what to set.
    pub fn credentials(&self, env: Option<String>) -> Result<Option<(String, String)>> {
        let from_file = match &self.password_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| {
                        format!("--store: password_file {} cannot be read", path.display())
                    })?
                    .trim_end_matches(['\n', '\r'])
                    .to_string(),
            ),
            None => None,
        };
        let password = from_file.or(env.filter(|p| !p.is_empty()));
        match (&self.user, password) {
            (Some(user), Some(password)) => Ok(Some((user.clone(), password))),
            (Some(user), None) => bail!(
                "--store: user={user} needs a password: password_file=PATH in the address, or {PASSWORD_ENV}"
            ),
            (None, Some(_)) => bail!(
                "--store: a password is given ({PASSWORD_ENV} or password_file) but the address names no user=ROLE"
            ),
            (None, None) => Ok(None),
        }
    }

    /// The TLS context for the connections, when TLS is on.
    fn tls_context(&self) -> Result<Option<openssl::ssl::SslContext>> {
        if !self.tls {
            return Ok(None);
        }
        let mut builder =
            openssl::ssl::SslContextBuilder::new(openssl::ssl::SslMethod::tls_client())
                .context("--store: TLS is not available")?;
        match &self.ca_file {
            Some(path) => builder.set_ca_file(path).with_context(|| {
                format!(
                    "--store: ca_file {} is not a readable PEM CA",
                    path.display()
                )
            })?,
            None => builder
                .set_default_verify_paths()
                .context("--store: the system's CA certificates cannot be loaded")?,
        }
        builder.set_verify(openssl::ssl::SslVerifyMode::PEER);
        Ok(Some(builder.build()))
    }

    /// The `WITH replication = ...` map for a new keyspace.
    fn replication(&self) -> String {
        match &self.local_dc {
            Some(dc) => format!(
                "{{'class': 'NetworkTopologyStrategy', '{}': {}}}",
                dc.replace('\'', "''"),
                self.replication_factor
            ),
            None => format!(
                "{{'class': 'NetworkTopologyStrategy', 'replication_factor': {}}}",
                self.replication_factor
            ),
        }
    }
}

/// Which of a partition's buckets a customer lives in; stable across processes and versions.
fn bucket(customer: &str) -> i32 {
    let h = Sha256::digest(customer.as_bytes());
    (u16::from_be_bytes([h[0], h[1]]) as i32) % BUCKETS
}

struct Prepared {
    upsert_snapshot_state: PreparedStatement,
    upsert_customer_timer: PreparedStatement,
    delete_customer_timer: PreparedStatement,
    upsert_partition_position: PreparedStatement,
    upsert_input_position: PreparedStatement,
    upsert_customer_partition: PreparedStatement,
    insert_consent_record: PreparedStatement,
    delete_consent_history: PreparedStatement,
    select_snapshot_bucket: PreparedStatement,
    select_customer_snapshot: PreparedStatement,
    select_partition_timers: PreparedStatement,
    select_partition_position: PreparedStatement,
    select_input_positions: PreparedStatement,
    select_customer_partition: PreparedStatement,
    select_consent_history: PreparedStatement,
    select_any_snapshot: PreparedStatement,
}

/// The state store on ScyllaDB.
pub struct ScyllaStore {
    session: Session,
    prepared: Prepared,
    config: ScyllaConfig,
    rt: tokio::runtime::Handle,
}

type ConsentRow = (
    CqlTimestamp,
    String,
    bool,
    String,
    String,
    String,
    String,
    Option<String>,
);

impl ScyllaStore {
    /// Connects, creates the keyspace and tables if missing, and prepares every statement.
    /// Called from a plain thread: it blocks on `rt`.
    pub fn connect(config: ScyllaConfig, rt: tokio::runtime::Handle) -> Result<ScyllaStore> {
        let all = statements(CQL)?;
        for s in &all {
            let why = idempotency_violations(s);
            if !why.is_empty() {
                bail!("scylla.cql statement {}: {}", s.name, why.join("; "));
            }
        }
        let credentials = config.credentials(std::env::var(PASSWORD_ENV).ok())?;
        let tls = config.tls_context()?;
        let handle = rt.clone();
        rt.block_on(async move {
            let profile = ExecutionProfile::builder()
                .consistency(config.consistency)
                .request_timeout(Some(config.request_timeout))
                // Retries a timed-out request only when the statement is marked idempotent.
                .retry_policy(Arc::new(DefaultRetryPolicy::new()))
                .build();
            let mut builder = SessionBuilder::new()
                .known_nodes(&config.nodes)
                .connection_timeout(config.request_timeout)
                .default_execution_profile_handle(profile.into_handle());
            if let Some(dc) = &config.local_dc {
                builder = builder.prefer_datacenter(dc.clone());
            }
            if let Some((user, password)) = credentials {
                builder = builder.user(user, password);
            }
            if let Some(tls) = tls {
                builder = builder.tls_context(Some(tls));
            }
            let session = builder.build().await.with_context(|| {
                format!(
                    "--store: cannot connect to ScyllaDB at {}",
                    config.nodes.join(",")
                )
            })?;
            let replication = config.replication();
            for s in all.iter().filter(|s| s.kind == StatementKind::Ddl) {
                let text = s
                    .text
                    .replace("{keyspace}", &config.keyspace)
                    .replace("{replication}", &replication);
                session
                    .query_unpaged(text, ())
                    .await
                    .with_context(|| format!("ScyllaDB: {} failed", s.name))?;
            }
            session
                .await_schema_agreement()
                .await
                .context("ScyllaDB: schema agreement")?;
            session
                .use_keyspace(&config.keyspace, false)
                .await
                .with_context(|| format!("ScyllaDB: use keyspace {}", config.keyspace))?;
            let mut by_name = BTreeMap::new();
            for s in all.iter().filter(|s| s.kind != StatementKind::Ddl) {
                let mut p = session
                    .prepare(s.text.as_str())
                    .await
                    .with_context(|| format!("ScyllaDB: preparing {}", s.name))?;
                // Every statement passed the idempotency check above.
                p.set_is_idempotent(true);
                by_name.insert(s.name.clone(), p);
            }
            let mut take = |name: &str| {
                by_name
                    .remove(name)
                    .ok_or_else(|| anyhow!("scylla.cql has no statement named {name}"))
            };
            let prepared = Prepared {
                upsert_snapshot_state: take("upsert_snapshot_state")?,
                upsert_customer_timer: take("upsert_customer_timer")?,
                delete_customer_timer: take("delete_customer_timer")?,
                upsert_partition_position: take("upsert_partition_position")?,
                upsert_input_position: take("upsert_input_position")?,
                upsert_customer_partition: take("upsert_customer_partition")?,
                insert_consent_record: take("insert_consent_record")?,
                delete_consent_history: take("delete_consent_history")?,
                select_snapshot_bucket: take("select_snapshot_bucket")?,
                select_customer_snapshot: take("select_customer_snapshot")?,
                select_partition_timers: take("select_partition_timers")?,
                select_partition_position: take("select_partition_position")?,
                select_input_positions: take("select_input_positions")?,
                select_customer_partition: take("select_customer_partition")?,
                select_consent_history: take("select_consent_history")?,
                select_any_snapshot: take("select_any_snapshot")?,
            };
            Ok(ScyllaStore {
                session,
                prepared,
                config,
                rt: handle,
            })
        })
    }

    async fn load_async(&self, namespace: &str, partition: i32) -> Result<PartitionSnapshot> {
        let p = &self.prepared;
        let buckets = (0..BUCKETS).map(|b| async move {
            let pager = self
                .session
                .execute_iter(p.select_snapshot_bucket.clone(), (namespace, partition, b))
                .await?;
            let rows: Vec<(String, Vec<u8>, i64)> = pager
                .rows_stream::<(String, Vec<u8>, i64)>()?
                .try_collect()
                .await?;
            anyhow::Ok(rows)
        });
        let mut customers = BTreeMap::new();
        for rows in futures::future::try_join_all(buckets).await? {
            for (customer, bytes, next_offset) in rows {
                customers.insert(customer, StoredState { bytes, next_offset });
            }
        }
        Ok(PartitionSnapshot {
            customers,
            ..self.load_positions_async(namespace, partition).await?
        })
    }

    /// A partition's rows of (name, offset or instant), such as its input positions or timers.
    async fn keyed_offsets(
        &self,
        statement: &PreparedStatement,
        namespace: &str,
        partition: i32,
    ) -> Result<BTreeMap<String, i64>> {
        Ok(self
            .session
            .execute_iter(statement.clone(), (namespace, partition))
            .await?
            .rows_stream::<(String, i64)>()?
            .try_collect::<Vec<_>>()
            .await?
            .into_iter()
            .collect())
    }

    async fn load_positions_async(
        &self,
        namespace: &str,
        partition: i32,
    ) -> Result<PartitionSnapshot> {
        let p = &self.prepared;
        let timers = self
            .keyed_offsets(&p.select_partition_timers, namespace, partition)
            .await?;
        let next_offset = self
            .session
            .execute_unpaged(&p.select_partition_position, (namespace, partition))
            .await?
            .into_rows_result()?
            .maybe_first_row::<(i64,)>()?
            .map(|(o,)| o)
            .unwrap_or(0);
        let inputs = self
            .keyed_offsets(&p.select_input_positions, namespace, partition)
            .await?;
        Ok(PartitionSnapshot {
            customers: BTreeMap::new(),
            next_offset,
            inputs,
            timers,
        })
    }

    async fn load_customer_async(
        &self,
        namespace: &str,
        partition: i32,
        customer: &str,
    ) -> Result<Option<StoredState>> {
        Ok(self
            .session
            .execute_unpaged(
                &self.prepared.select_customer_snapshot,
                (namespace, partition, bucket(customer), customer),
            )
            .await?
            .into_rows_result()?
            .maybe_first_row::<(Vec<u8>, i64)>()?
            .map(|(bytes, next_offset)| StoredState { bytes, next_offset }))
    }

    async fn save_async(&self, namespace: &str, partition: i32, w: &SnapshotWrite) -> Result<()> {
        let p = &self.prepared;
        let at = w.next_offset;
        let project = namespace == PROCESSORS;
        // States (and their projection) first, positions last: a crash in between leaves
        // positions behind the states, and each state's own offset keeps the restore exact.
        let states = futures::stream::iter(w.changed.iter().map(|(customer, bytes)| async move {
            self.session
                .execute_unpaged(
                    &p.upsert_snapshot_state,
                    (
                        namespace,
                        partition,
                        bucket(customer),
                        customer,
                        bytes,
                        at,
                        at,
                    ),
                )
                .await?;
            if project {
                self.session
                    .execute_unpaged(&p.upsert_customer_partition, (customer, partition, at))
                    .await?;
            }
            anyhow::Ok(())
        }))
        .buffer_unordered(WRITES_IN_FLIGHT)
        .try_collect::<Vec<()>>();
        if project {
            // Before this save's own rows, which carry `at` and so survive it.
            for customer in &w.erased {
                self.session
                    .execute_unpaged(&p.delete_consent_history, (at - 1, customer))
                    .await?;
            }
        }
        let consent = futures::stream::iter(w.consent.iter().filter(|_| project).map(
            |(customer, c)| async move {
                let purposes: Vec<String> = c.purposes.iter().map(wire_name).collect();
                let purposes = purposes.join(",");
                let channel = wire_name(&c.channel);
                self.session
                    .execute_unpaged(
                        &p.insert_consent_record,
                        (
                            customer,
                            CqlTimestamp(c.at),
                            &c.decision_id,
                            c.granted,
                            purposes,
                            channel,
                            &c.source,
                            &c.artifact_id,
                            &c.chain,
                            at,
                        ),
                    )
                    .await?;
                anyhow::Ok(())
            },
        ))
        .buffer_unordered(WRITES_IN_FLIGHT)
        .try_collect::<Vec<()>>();
        let timers = futures::stream::iter(w.timers.iter().map(|(customer, due)| async move {
            match due {
                Some(due) => {
                    self.session
                        .execute_unpaged(
                            &p.upsert_customer_timer,
                            (namespace, partition, customer, *due, at),
                        )
                        .await?
                }
                None => {
                    self.session
                        .execute_unpaged(
                            &p.delete_customer_timer,
                            (at, namespace, partition, customer),
                        )
                        .await?
                }
            };
            anyhow::Ok(())
        }))
        .buffer_unordered(WRITES_IN_FLIGHT)
        .try_collect::<Vec<()>>();
        futures::try_join!(states, consent, timers)?;
        // A position is its own write timestamp: the highest one wins, whatever the order.
        self.session
            .execute_unpaged(&p.upsert_partition_position, (namespace, partition, at, at))
            .await?;
        futures::future::try_join_all(w.inputs.iter().map(|(topic, next)| {
            self.session.execute_unpaged(
                &p.upsert_input_position,
                (namespace, partition, topic, *next, *next),
            )
        }))
        .await?;
        Ok(())
    }

    async fn customer_async(&self, customer_id: &str) -> Result<Option<CustomerView>> {
        let Some((partition,)) = self
            .session
            .execute_unpaged(&self.prepared.select_customer_partition, (customer_id,))
            .await?
            .into_rows_result()?
            .maybe_first_row::<(i32,)>()?
        else {
            return Ok(None);
        };
        Ok(self
            .load_customer_async(PROCESSORS, partition, customer_id)
            .await?
            .map(|stored| CustomerView {
                customer_id: customer_id.to_string(),
                partition,
                next_offset: stored.next_offset,
                state: stored.bytes,
            }))
    }

    async fn consent_history_async(&self, customer_id: &str) -> Result<Vec<ConsentEvent>> {
        let rows: Vec<ConsentRow> = self
            .session
            .execute_iter(self.prepared.select_consent_history.clone(), (customer_id,))
            .await?
            .rows_stream::<ConsentRow>()?
            .try_collect()
            .await?;
        rows.into_iter()
            .map(
                |(at, decision_id, granted, purposes, channel, source, artifact_id, chain)| {
                    let name = |s: &str| serde_json::Value::String(s.to_string());
                    Ok(ConsentEvent {
                        at: at.0,
                        granted,
                        purposes: purposes
                            .split(',')
                            .filter(|p| !p.is_empty())
                            .map(|p| serde_json::from_value(name(p)))
                            .collect::<Result<_, _>>()
                            .with_context(|| {
                                format!("consent history of {customer_id}: purposes '{purposes}'")
                            })?,
                        channel: serde_json::from_value(name(&channel)).with_context(|| {
                            format!("consent history of {customer_id}: channel '{channel}'")
                        })?,
                        source,
                        artifact_id,
                        decision_id,
                        chain,
                    })
                },
            )
            .collect()
    }
}

impl StateStore for ScyllaStore {
    fn load(&self, namespace: &str, partition: i32) -> Result<PartitionSnapshot> {
        self.rt
            .block_on(self.load_async(namespace, partition))
            .with_context(|| {
                format!(
                    "ScyllaDB {}: loading {namespace}/{partition}",
                    self.describe()
                )
            })
    }

    fn load_positions(&self, namespace: &str, partition: i32) -> Result<PartitionSnapshot> {
        self.rt
            .block_on(self.load_positions_async(namespace, partition))
            .with_context(|| {
                format!(
                    "ScyllaDB {}: loading positions of {namespace}/{partition}",
                    self.describe()
                )
            })
    }

    fn load_customer(
        &self,
        namespace: &str,
        partition: i32,
        customer: &str,
    ) -> Result<Option<StoredState>> {
        self.rt
            .block_on(self.load_customer_async(namespace, partition, customer))
            .with_context(|| {
                format!(
                    "ScyllaDB {}: loading {customer} of {namespace}/{partition}",
                    self.describe()
                )
            })
    }

    fn load_customers(
        &self,
        namespace: &str,
        partition: i32,
        customers: &[String],
    ) -> Result<BTreeMap<String, StoredState>> {
        // One round trip at a time would bound a batch of cold customers by the network's
        // latency: the reads go out together, as the writes do.
        let reads = futures::stream::iter(customers.iter().map(|c| async move {
            let found = self.load_customer_async(namespace, partition, c).await?;
            anyhow::Ok(found.map(|s| (c.clone(), s)))
        }))
        .buffer_unordered(WRITES_IN_FLIGHT)
        .try_collect::<Vec<_>>();
        let found = self.rt.block_on(reads).with_context(|| {
            format!(
                "ScyllaDB {}: loading {} customers of {namespace}/{partition}",
                self.describe(),
                customers.len()
            )
        })?;
        Ok(found.into_iter().flatten().collect())
    }

    fn save(&self, namespace: &str, partition: i32, write: &SnapshotWrite) -> Result<()> {
        self.rt
            .block_on(self.save_async(namespace, partition, write))
            .with_context(|| {
                format!(
                    "ScyllaDB {}: saving {namespace}/{partition}",
                    self.describe()
                )
            })
    }

    fn customer(&self, customer_id: &str) -> Result<Option<CustomerView>> {
        self.rt.block_on(self.customer_async(customer_id))
    }

    fn consent_history(&self, customer_id: &str) -> Result<Vec<ConsentEvent>> {
        self.rt.block_on(self.consent_history_async(customer_id))
    }

    fn is_empty(&self) -> Result<bool> {
        let row = self.rt.block_on(async {
            anyhow::Ok(
                self.session
                    .execute_unpaged(&self.prepared.select_any_snapshot, ())
                    .await?
                    .into_rows_result()?
                    .maybe_first_row::<(String,)>()?,
            )
        })?;
        Ok(row.is_none())
    }

    fn describe(&self) -> String {
        format!(
            "scylla://{}/{}",
            self.config.nodes.join(","),
            self.config.keyspace
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_statement_in_the_cql_file_is_idempotent_and_timestamped_by_log_position() {
        let all = statements(CQL).unwrap();
        assert!(
            all.iter()
                .filter(|s| s.kind == StatementKind::Write)
                .count()
                >= 5
        );
        for s in &all {
            assert_eq!(
                idempotency_violations(s),
                Vec::<String>::new(),
                "{}",
                s.name
            );
        }
    }

    #[test]
    fn the_idempotency_check_catches_what_cannot_be_retried() {
        let write = |text: &str| CqlStatement {
            name: "w".into(),
            kind: StatementKind::Write,
            text: text.into(),
        };
        let cases = [
            (
                "UPDATE t SET n = n + 1 WHERE k = ? USING TIMESTAMP ?",
                "appends",
            ),
            ("UPDATE t SET l = l + ? WHERE k = ?", "USING TIMESTAMP"),
            (
                "UPDATE t SET l = ? + l WHERE k = ? USING TIMESTAMP ?",
                "appends",
            ),
            ("INSERT INTO t (k) VALUES (?) IF NOT EXISTS", "lightweight"),
            ("INSERT INTO t (k) VALUES (?)", "USING TIMESTAMP"),
        ];
        for (text, expect) in cases {
            let why = idempotency_violations(&write(text)).join("; ");
            assert!(why.contains(expect), "{text}: {why}");
        }
        let ddl = CqlStatement {
            name: "d".into(),
            kind: StatementKind::Ddl,
            text: "CREATE TABLE t (n counter, k int PRIMARY KEY)".into(),
        };
        let why = idempotency_violations(&ddl).join("; ");
        assert!(
            why.contains("counter") && why.contains("IF NOT EXISTS"),
            "{why}"
        );
    }

    #[test]
    fn every_named_statement_has_text_and_the_code_uses_them_all() {
        let all = statements(CQL).unwrap();
        let dml: Vec<&str> = all
            .iter()
            .filter(|s| s.kind != StatementKind::Ddl)
            .map(|s| s.name.as_str())
            .collect();
        // `connect` takes each by name; one the code never takes is dead CQL under review.
        let source = include_str!("scylla.rs");
        for name in dml {
            assert!(
                source.contains(&format!("take(\"{name}\")")),
                "{name} unused"
            );
        }
    }

    #[test]
    fn credentials_and_tls_come_from_the_address_and_a_password_never_does() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "s3cret\n").unwrap();
        let c = ScyllaConfig::parse(&format!(
            "db:9142/herald?user=herald&password_file={}&ca_file=/etc/ca.pem",
            file.display()
        ))
        .unwrap();
        assert!(c.tls, "a CA file means TLS");
        assert_eq!(
            c.ca_file.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        // The file's password wins over the environment's; its newline is not part of it.
        assert_eq!(
            c.credentials(Some("from-env".into())).unwrap(),
            Some(("herald".into(), "s3cret".into()))
        );
        let from_env = ScyllaConfig::parse("db/herald?user=herald&tls=true").unwrap();
        assert!(from_env.tls && from_env.ca_file.is_none());
        assert_eq!(
            from_env.credentials(Some("pw".into())).unwrap(),
            Some(("herald".into(), "pw".into()))
        );
        let e = from_env.credentials(None).unwrap_err().to_string();
        assert!(
            e.contains(PASSWORD_ENV) && e.contains("password_file"),
            "{e}"
        );
        let no_user = ScyllaConfig::parse("db/herald").unwrap();
        assert_eq!(no_user.credentials(None).unwrap(), None);
        let e = no_user
            .credentials(Some("pw".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("user="), "{e}");
        let e = ScyllaConfig::parse("db/herald?user=herald&password=pw")
            .unwrap_err()
            .to_string();
        assert!(e.contains("password_file") && !e.contains("pw&"), "{e}");
        for bad in ["db/herald?tls=yes", "db/herald?user=", "db/herald?ca_file="] {
            assert!(ScyllaConfig::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn scylla_addresses_parse_with_defaults_and_name_bad_options() {
        let c = ScyllaConfig::parse("a,b:19042/herald_prod?local_dc=eu1&timeout_ms=800").unwrap();
        assert_eq!(c.nodes, vec!["a:9042", "b:19042"]);
        assert_eq!(c.keyspace, "herald_prod");
        assert_eq!(c.consistency, Consistency::LocalQuorum);
        assert_eq!(c.replication_factor, 3);
        assert_eq!(c.request_timeout, Duration::from_millis(800));
        assert!(c.replication().contains("'eu1': 3"));
        for (bad, named) in [
            ("a/herald?consistency=any", "consistency"),
            ("a/herald?replication_factor=0", "replication_factor"),
            ("a/herald?colour=red", "colour"),
            ("a/Herald; DROP", "keyspace"),
            ("a", "keyspace"),
        ] {
            let e = ScyllaConfig::parse(bad).unwrap_err().to_string();
            assert!(e.contains(named), "{bad}: {e}");
        }
    }

    #[test]
    fn buckets_are_stable_and_spread() {
        assert_eq!(bucket("c-1"), bucket("c-1"));
        let used: std::collections::BTreeSet<i32> =
            (0..500).map(|i| bucket(&format!("c-{i}"))).collect();
        assert_eq!(used.len(), BUCKETS as usize);
    }
}
