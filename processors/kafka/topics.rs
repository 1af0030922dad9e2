//! `topology/topics.toml` applied through the admin API: what is missing is created with its
//! partitions, replication and configs; what differs is reported.

use super::KafkaSettings;
use crate::topology::Topology;
use anyhow::{bail, Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use std::time::Duration;

/// Creates missing topics and reports differences; returns one line per topic.
pub fn topics_apply(
    settings: &KafkaSettings,
    topo: &Topology,
    replication: Option<i32>,
) -> Result<Vec<String>> {
    let admin: AdminClient<DefaultClientContext> = settings
        .client_config()
        .create()
        .context("cannot create Kafka admin client")?;
    let rt = tokio::runtime::Runtime::new()?;
    let metadata = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(15))
        .with_context(|| format!("cannot read cluster metadata from {}", settings.bootstrap))?;
    let brokers = metadata.brokers().len() as i32;
    let mut report = Vec::new();
    let mut missing = Vec::new();
    for spec in &topo.topics {
        match metadata.topics().iter().find(|t| t.name() == spec.name) {
            Some(t) => {
                let have = t.partitions().len() as i32;
                if have != spec.partitions {
                    report.push(format!(
                        "DIFFERS {}: partitions {have}, topics.toml says {}",
                        spec.name, spec.partitions
                    ));
                } else {
                    report.push(format!("OK      {}: {} partitions", spec.name, have));
                }
            }
            None => missing.push(spec),
        }
    }
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    // Configs of the topics that exist: cleanup.policy and retention.ms must match the file.
    let existing: Vec<_> = topo
        .topics
        .iter()
        .filter(|s| !missing.iter().any(|m| m.name == s.name))
        .collect();
    if !existing.is_empty() {
        let specs: Vec<ResourceSpecifier> = existing
            .iter()
            .map(|s| ResourceSpecifier::Topic(&s.name))
            .collect();
        if let Ok(results) = rt.block_on(admin.describe_configs(specs.iter(), &opts)) {
            for (spec, res) in existing.iter().zip(results) {
                let Ok(res) = res else { continue };
                let get = |k: &str| res.get(k).and_then(|e| e.value.clone()).unwrap_or_default();
                if get("cleanup.policy") != spec.cleanup_policy {
                    report.push(format!(
                        "DIFFERS {}: cleanup.policy {}, topics.toml says {}",
                        spec.name,
                        get("cleanup.policy"),
                        spec.cleanup_policy
                    ));
                }
                if get("retention.ms") != spec.retention_ms.to_string() {
                    report.push(format!(
                        "DIFFERS {}: retention.ms {}, topics.toml says {}",
                        spec.name,
                        get("retention.ms"),
                        spec.retention_ms
                    ));
                }
                if let Some(lag) = spec.max_compaction_lag_ms {
                    if get("max.compaction.lag.ms") != lag.to_string() {
                        report.push(format!(
                            "DIFFERS {}: max.compaction.lag.ms {}, topics.toml says {lag}",
                            spec.name,
                            get("max.compaction.lag.ms"),
                        ));
                    }
                }
            }
        }
    }
    if let Some(short) = missing
        .iter()
        .find(|s| replication.unwrap_or(s.replication) > brokers)
    {
        bail!(
            "{} needs replication factor {} but the cluster has {brokers} broker(s): lower it with --replication",
            short.name,
            replication.unwrap_or(short.replication)
        );
    }
    if !missing.is_empty() {
        let retention: Vec<String> = missing.iter().map(|s| s.retention_ms.to_string()).collect();
        let lag: Vec<Option<String>> = missing
            .iter()
            .map(|s| s.max_compaction_lag_ms.map(|l| l.to_string()))
            .collect();
        let new: Vec<NewTopic> = missing
            .iter()
            .zip(retention.iter().zip(&lag))
            .map(|(s, (r, lag))| {
                let topic = NewTopic::new(
                    &s.name,
                    s.partitions,
                    TopicReplication::Fixed(replication.unwrap_or(s.replication)),
                )
                .set("cleanup.policy", &s.cleanup_policy)
                .set("retention.ms", r);
                match lag {
                    Some(lag) => topic.set("max.compaction.lag.ms", lag),
                    None => topic,
                }
            })
            .collect();
        let results = rt.block_on(admin.create_topics(new.iter(), &opts))?;
        for r in results {
            match r {
                Ok(name) => report.push(format!("CREATED {name}")),
                Err((name, e)) => report.push(format!("FAILED  {name}: {e}")),
            }
        }
    }
    if report.iter().any(|l| l.starts_with("FAILED")) {
        bail!("some topics could not be created:\n{}", report.join("\n"));
    }
    Ok(report)
}
