//! The read-only query API of `herald run`, as Kafka Streams' interactive queries: a customer's
//! state, consent timeline and recent messages as JSON, served from this process's store on
//! its metrics listener, and where a customer lives when another instance owns their
//! partition. `schemas/query-api.openapi.yaml` documents it.

use crate::dispatch::DispatchState;
use crate::kafka::{KafkaSettings, SharedStore};
use crate::store::state_encoding;
use crate::topology::Topology;
use anyhow::{anyhow, Context, Result};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;

/// The OpenAPI description of the query API, served as written.
pub const OPENAPI: &str = include_str!("../schemas/query-api.openapi.yaml");

/// The partition Kafka's default partitioner (and Herald's producers, `murmur2_random`) gives a
/// key: murmur2 of its bytes, made positive, modulo the partition count.
pub fn partition_of(key: &[u8], partitions: i32) -> i32 {
    ((murmur2(key) & 0x7fff_ffff) % partitions.max(1) as u32) as i32
}

/// Kafka's murmur2 (seed 0x9747b28c), as its Java client computes it.
fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        for (i, b) in tail.iter().enumerate().rev() {
            h ^= u32::from(*b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^ (h >> 15)
}

/// The instance that owns a partition of the processors' group, as its coordinator says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Owner {
    /// `--instance-id` of the owning process.
    pub instance: String,
    /// The address its consumer connects from.
    pub host: String,
    /// Its query API, when every instance serves it on the same port (as the manifests do).
    pub url: String,
}

/// Finds a partition's owner among the processors' group members.
pub struct GroupOwners {
    client: BaseConsumer,
    group: String,
    client_prefix: String,
    /// The port this process's query API listens on, known once it is bound.
    port: std::sync::OnceLock<u16>,
}

impl GroupOwners {
    /// Asks the brokers of `settings` about the group of the processors stage.
    pub fn new(settings: &KafkaSettings) -> Result<GroupOwners> {
        let group = format!("{}-processors", settings.group_prefix);
        let client = settings
            .consumer_config(
                &format!("{group}-query"),
                &format!("{}-query-{}", settings.group_prefix, settings.instance_id),
                &[],
            )
            .create()
            .context("cannot create the Kafka client of the query API")?;
        Ok(GroupOwners {
            client,
            client_prefix: format!("{group}-"),
            group,
            port: std::sync::OnceLock::new(),
        })
    }

    /// The port this process serves on, which owners' URLs are taken to share (as every pod
    /// of a Deployment does).
    pub fn listening_on(&self, port: u16) {
        let _ = self.port.set(port);
    }

    /// The member assigned `partition`, if one is; blocking (a round trip to the coordinator).
    pub fn owner_of(&self, partition: i32) -> Result<Option<Owner>> {
        let list = self
            .client
            .fetch_group_list(Some(&self.group), Duration::from_secs(5))
            .with_context(|| format!("describing consumer group {}", self.group))?;
        for g in list.groups().iter().filter(|g| g.name() == self.group) {
            for m in g.members() {
                let assigned = m
                    .assignment()
                    .map(assigned_partitions)
                    .transpose()?
                    .unwrap_or_default();
                if assigned.contains(&partition) {
                    let host = m.client_host().trim_start_matches('/').to_string();
                    return Ok(Some(Owner {
                        instance: m
                            .client_id()
                            .strip_prefix(&self.client_prefix)
                            .unwrap_or(m.client_id())
                            .to_string(),
                        url: format!("http://{host}:{}", self.port.get().copied().unwrap_or(0)),
                        host,
                    }));
                }
            }
        }
        Ok(None)
    }
}

/// The partitions a consumer-protocol assignment names, whatever their topic (Herald's input
/// topics are co-partitioned): version (int16), then topics, each a name (int16 length and
/// bytes) and partitions (int32 count and int32 each), then user data.
fn assigned_partitions(bytes: &[u8]) -> Result<Vec<i32>> {
    let mut at = 2; // the version: every version has this layout
    let mut take = |n: usize| -> Result<&[u8]> {
        let s = bytes
            .get(at..at + n)
            .ok_or_else(|| anyhow!("a group member's assignment ends early"))?;
        at += n;
        Ok(s)
    };
    let mut out = Vec::new();
    let topics = i32::from_be_bytes(take(4)?.try_into()?);
    for _ in 0..topics.max(0) {
        let len = i16::from_be_bytes(take(2)?.try_into()?);
        take(len.max(0) as usize)?;
        let n = i32::from_be_bytes(take(4)?.try_into()?);
        for _ in 0..n.max(0) {
            out.push(i32::from_be_bytes(take(4)?.try_into()?));
        }
    }
    Ok(out)
}

/// What the query API reads from.
pub struct QueryApi {
    pub store: SharedStore,
    pub topology: Arc<Topology>,
    /// This process's `--instance-id`.
    pub instance: String,
    pub owners: Option<Arc<GroupOwners>>,
}

#[derive(Serialize)]
struct Refusal {
    error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    partition: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    owner: Option<Owner>,
}

/// Where a customer lives, and whether this process's store holds their state.
#[derive(Serialize)]
struct Whereabouts {
    customer_id: String,
    partition: i32,
    owner: Option<Owner>,
    served_by: String,
    stored_here: bool,
}

fn refusal(status: StatusCode, error: String) -> Response {
    let body = Refusal {
        error,
        partition: None,
        owner: None,
    };
    (status, Json(body)).into_response()
}

/// The customer view or why not. A customer this store does not hold is sent to the instance
/// that owns their partition (307), or answered 404 when that is this one or nobody.
enum Found {
    Here(crate::store::CustomerView),
    Elsewhere {
        partition: i32,
        owner: Owner,
    },
    Nowhere {
        partition: i32,
        owner: Option<Owner>,
    },
}

impl QueryApi {
    /// The instance that owns `partition`, when this process can ask.
    fn owner_of(&self, partition: i32) -> Result<Option<Owner>> {
        match &self.owners {
            Some(o) => o.owner_of(partition),
            None => Ok(None),
        }
    }

    fn find(&self, customer: &str) -> Result<Found> {
        if let Some(view) = self.store.customer(customer)? {
            // A store of its own keeps the rows of partitions this process owned before; the
            // owner now has newer ones. Only the owner answers (or this process, when no owner
            // can be named).
            return Ok(match self.owner_of(view.partition)? {
                Some(owner) if owner.instance != self.instance => Found::Elsewhere {
                    partition: view.partition,
                    owner,
                },
                _ => Found::Here(view),
            });
        }
        let partition = partition_of(customer.as_bytes(), self.topology.partitions());
        let owner = self.owner_of(partition)?;
        Ok(match owner {
            Some(owner) if owner.instance != self.instance => Found::Elsewhere { partition, owner },
            owner => Found::Nowhere { partition, owner },
        })
    }

    fn whereabouts(&self, customer: &str) -> Result<Whereabouts> {
        let stored = self.store.customer(customer)?;
        let partition = stored.as_ref().map_or_else(
            || partition_of(customer.as_bytes(), self.topology.partitions()),
            |v| v.partition,
        );
        Ok(Whereabouts {
            customer_id: customer.to_string(),
            partition,
            owner: self.owner_of(partition)?,
            served_by: self.instance.clone(),
            stored_here: stored.is_some(),
        })
    }
}

/// Runs a blocking store or Kafka read off the server's threads, and answers its JSON; an
/// infrastructure error is a 503 naming it (the caller may retry), never a panic.
async fn answer<T: Serialize + Send + 'static>(
    api: Arc<QueryApi>,
    customer: String,
    path: String,
    view: impl FnOnce(&QueryApi, crate::store::CustomerView) -> Result<T> + Send + 'static,
) -> Response {
    let found = tokio::task::spawn_blocking(move || -> Result<Result<T, Found>> {
        match api.find(&customer)? {
            Found::Here(v) => Ok(Ok(view(&api, v)?)),
            other => Ok(Err(other)),
        }
    })
    .await;
    match found {
        Ok(Ok(Ok(body))) => Json(body).into_response(),
        Ok(Ok(Err(Found::Elsewhere { partition, owner }))) => {
            let location = format!("{}{path}", owner.url);
            let body = Refusal {
                error: format!(
                    "partition {partition} is owned by instance {}",
                    owner.instance
                ),
                partition: Some(partition),
                owner: Some(owner),
            };
            (
                StatusCode::TEMPORARY_REDIRECT,
                [(header::LOCATION, location)],
                Json(body),
            )
                .into_response()
        }
        Ok(Ok(Err(Found::Nowhere { partition, owner }))) => {
            let body = Refusal {
                error: "no state is stored for this customer".into(),
                partition: Some(partition),
                owner,
            };
            (StatusCode::NOT_FOUND, Json(body)).into_response()
        }
        Ok(Ok(Err(Found::Here(_)))) => {
            refusal(StatusCode::INTERNAL_SERVER_ERROR, "unreachable".into())
        }
        Ok(Err(e)) => refusal(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
        Err(e) => refusal(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the query failed: {e}"),
        ),
    }
}

fn state_of(view: &crate::store::CustomerView) -> Result<crate::state::CustomerState> {
    state_encoding::decode(&view.state)
        .with_context(|| format!("the stored state of {} is unreadable", view.customer_id))
}

async fn customer(State(api): State<Arc<QueryApi>>, Path(id): Path<String>) -> Response {
    let path = format!("/v1/customers/{id}");
    answer(api, id, path, |api, view| {
        let state = state_of(&view)?;
        Ok(crate::projection::summarise(
            &view.customer_id,
            view.partition,
            view.next_offset,
            &state,
            api.store.consent_history(&view.customer_id)?,
            api.topology.policy.session_window_hours,
        ))
    })
    .await
}

async fn consent(State(api): State<Arc<QueryApi>>, Path(id): Path<String>) -> Response {
    let path = format!("/v1/customers/{id}/consent");
    answer(api, id, path, |api, view| {
        let state = state_of(&view)?;
        let history = api.store.consent_history(&view.customer_id)?;
        Ok(crate::projection::consent_view(
            &view.customer_id,
            &state,
            history,
        ))
    })
    .await
}

async fn messages(State(api): State<Arc<QueryApi>>, Path(id): Path<String>) -> Response {
    let path = format!("/v1/customers/{id}/messages");
    answer(api, id, path, |api, view| {
        let state = state_of(&view)?;
        let dispatch: Option<DispatchState> = api
            .store
            .load_customer(crate::store::DISPATCH, view.partition, &view.customer_id)?
            .map(|s| serde_json::from_slice(&s.bytes))
            .transpose()
            .with_context(|| format!("the dispatch state of {} is unreadable", view.customer_id))?;
        Ok(crate::projection::messages_view(
            &view.customer_id,
            &state,
            dispatch.as_ref(),
        ))
    })
    .await
}

async fn owner(State(api): State<Arc<QueryApi>>, Path(id): Path<String>) -> Response {
    match tokio::task::spawn_blocking(move || api.whereabouts(&id)).await {
        Ok(Ok(w)) => Json(w).into_response(),
        Ok(Err(e)) => refusal(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
        Err(e) => refusal(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the query failed: {e}"),
        ),
    }
}

/// The query API's routes, to merge into a process's HTTP server.
pub fn routes(api: Arc<QueryApi>) -> Router {
    Router::new()
        .route("/v1/customers/{id}", get(customer))
        .route("/v1/customers/{id}/consent", get(consent))
        .route("/v1/customers/{id}/messages", get(messages))
        .route("/v1/customers/{id}/owner", get(owner))
        .route(
            "/v1/openapi.yaml",
            get(|| async { ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI) }),
        )
        .with_state(api)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::producer::FutureRecord;

    #[test]
    fn keys_land_where_herald_producers_put_them() {
        // Herald's producers partition with murmur2_random, as Java clients do by default: the
        // query API must find a customer on the partition their records are on.
        let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
        mock.create_topic("customers", 6, 1).unwrap();
        let settings = KafkaSettings::new(&mock.bootstrap_servers(), false, "test");
        let producer = settings.producer(None).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        for i in 0..200 {
            let key = format!("cust-{i:06}{}", "x".repeat(i % 4));
            let record = FutureRecord::to("customers").key(&key).payload("{}");
            let delivered = rt
                .block_on(producer.send(record, Duration::from_secs(10)))
                .unwrap();
            assert_eq!(
                partition_of(key.as_bytes(), 6),
                delivered.partition,
                "{key}"
            );
        }
    }

    #[test]
    fn an_assignment_names_its_partitions() {
        // Version 1, one topic "oms" with partitions 1 and 4, empty user data.
        let mut bytes = vec![0, 1, 0, 0, 0, 1, 0, 3];
        bytes.extend_from_slice(b"oms");
        bytes.extend_from_slice(&[0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 4, 0, 0, 0, 0]);
        assert_eq!(assigned_partitions(&bytes).unwrap(), vec![1, 4]);
        assert!(assigned_partitions(&bytes[..9]).is_err(), "cut short");
    }
}
