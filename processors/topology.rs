//! Herald's configuration as data: topics, the template catalog and policy settings, read from
//! `topology/` (or the copy embedded in the binary), validated, with errors that name the key.

use crate::events::{Purpose, TemplateStatus};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

/// The embedded default topology, used by `herald demo` and when no directory is given.
pub const EMBEDDED: &[(&str, &str)] = &[
    ("topics.toml", include_str!("../topology/topics.toml")),
    ("templates.toml", include_str!("../topology/templates.toml")),
    ("policy.toml", include_str!("../topology/policy.toml")),
];

/// One topic as declared in topics.toml.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    #[serde(default = "default_replication")]
    pub replication: i32,
    /// `delete` or `compact`.
    pub cleanup_policy: String,
    /// Retention in milliseconds; -1 keeps forever.
    pub retention_ms: i64,
    pub doc: String,
}

fn default_replication() -> i32 {
    3
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TopicsFile {
    topic: Vec<TopicSpec>,
}

/// What kind of value a template variable holds.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VariableType {
    Text,
    Money,
    Date,
}

/// One variable of a template: where its value comes from and what to do when it is missing.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TemplateVariable {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: VariableType,
    /// Where the value comes from, e.g. `order.total`, `customer.first_name`.
    pub source: String,
    #[serde(default)]
    pub required: bool,
    /// Used when the source has no value; money variables never take a fallback.
    pub fallback: Option<String>,
}

/// A template in one locale, as registered at the provider.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Template {
    pub name: String,
    pub version: i32,
    pub locale: String,
    /// MARKETING, UTILITY or AUTHENTICATION (the provider's categories).
    pub category: String,
    pub purpose: Purpose,
    #[serde(default = "approved")]
    pub status: TemplateStatus,
    pub body: String,
    #[serde(default)]
    pub variables: Vec<TemplateVariable>,
    /// How long after its trigger the message is still worth sending; a deferral past this
    /// drops it as stale.
    #[serde(default = "default_ttl_hours")]
    pub ttl_hours: i64,
}

fn default_ttl_hours() -> i64 {
    72
}

/// Quiet hours in each customer's own time zone, from policy.toml's `[quiet_hours]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QuietHours {
    /// Local time quiet hours begin, as minutes after midnight (`start = "21:00"`).
    #[serde(rename = "start", deserialize_with = "clock_time")]
    pub start_minute: i32,
    /// Local time they end (`end = "08:00"`); before start means they span midnight.
    #[serde(rename = "end", deserialize_with = "clock_time")]
    pub end_minute: i32,
    /// Purposes that may still go out in quiet hours and on blackout days.
    #[serde(default)]
    pub exempt_purposes: Vec<Purpose>,
    /// How often a message held for an unknown time zone looks again.
    #[serde(default = "default_recheck_hours")]
    pub recheck_unknown_time_zone_hours: i64,
}

fn default_recheck_hours() -> i64 {
    6
}

fn clock_time<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
    let s = String::deserialize(d)?;
    let parsed = s.split_once(':').and_then(|(h, m)| {
        let (h, m) = (h.parse::<i32>().ok()?, m.parse::<i32>().ok()?);
        ((0..24).contains(&h) && (0..60).contains(&m) && s.len() == 5).then_some(h * 60 + m)
    });
    parsed.ok_or_else(|| serde::de::Error::custom(format!("'{s}' is not a local time HH:MM")))
}

/// A corporate holiday or regional blackout day: no message of a non-exempt purpose goes out on
/// that local date.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Blackout {
    pub name: String,
    #[serde(deserialize_with = "civil_date")]
    pub date: jiff::civil::Date,
    /// Region codes (the locale's country, e.g. `BR`); empty means everywhere.
    #[serde(default)]
    pub regions: Vec<String>,
}

fn civil_date<'de, D: serde::Deserializer<'de>>(d: D) -> Result<jiff::civil::Date, D::Error> {
    let s = String::deserialize(d)?;
    s.parse()
        .map_err(|_| serde::de::Error::custom(format!("'{s}' is not a date YYYY-MM-DD")))
}

fn approved() -> TemplateStatus {
    TemplateStatus::Approved
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplatesFile {
    template: Vec<Template>,
}

/// The template catalog: every template by name, each with its locales.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TemplateCatalog {
    pub templates: BTreeMap<String, Vec<Template>>,
}

impl TemplateCatalog {
    /// The locales of a template, if the catalog has it.
    pub fn variants(&self, name: &str) -> Option<&[Template]> {
        self.templates.get(name).map(|v| v.as_slice())
    }
}

/// Policy settings from policy.toml.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicySettings {
    /// Recorded on every decision so that a decision can be traced to the rules that made it.
    pub version: String,
    pub dedupe_window_hours: i64,
    pub payment_hold_timeout_hours: i64,
    pub default_locale: String,
    /// Which fact triggers which template.
    pub triggers: BTreeMap<String, String>,
    /// No quiet hours when absent.
    #[serde(default)]
    pub quiet_hours: Option<QuietHours>,
    /// Holidays and regional blackout days (`[[blackout]]`).
    #[serde(default)]
    pub blackout: Vec<Blackout>,
}

/// Everything the pure core needs to decide, loaded once.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    pub topics: Vec<TopicSpec>,
    pub catalog: TemplateCatalog,
    pub policy: PolicySettings,
}

fn parse<T: for<'de> Deserialize<'de>>(file: &str, text: &str) -> Result<T> {
    toml::from_str(text).map_err(|e| anyhow::anyhow!("topology/{file}: {e}"))
}

impl Topology {
    /// The topology compiled into the binary.
    pub fn embedded() -> Result<Self> {
        let get = |f: &str| {
            EMBEDDED
                .iter()
                .find(|(n, _)| *n == f)
                .map(|(_, t)| *t)
                .unwrap_or_default()
        };
        Self::from_texts(
            get("topics.toml"),
            get("templates.toml"),
            get("policy.toml"),
        )
    }

    /// Reads `topics.toml`, `templates.toml` and `policy.toml` from a directory.
    pub fn load(dir: &Path) -> Result<Self> {
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .with_context(|| format!("cannot read {}", dir.join(f).display()))
        };
        Self::from_texts(
            &read("topics.toml")?,
            &read("templates.toml")?,
            &read("policy.toml")?,
        )
    }

    /// Parses and validates the three files.
    pub fn from_texts(topics: &str, templates: &str, policy: &str) -> Result<Self> {
        let topics: TopicsFile = parse("topics.toml", topics)?;
        let templates: TemplatesFile = parse("templates.toml", templates)?;
        let policy: PolicySettings = parse("policy.toml", policy)?;
        let mut catalog = TemplateCatalog::default();
        for t in templates.template {
            catalog.templates.entry(t.name.clone()).or_default().push(t);
        }
        let topo = Topology {
            topics: topics.topic,
            catalog,
            policy,
        };
        topo.validate()?;
        Ok(topo)
    }

    fn validate(&self) -> Result<()> {
        let partitions: Vec<i32> = self.topics.iter().map(|t| t.partitions).collect();
        for t in &self.topics {
            if t.partitions < 1 {
                bail!(
                    "topology/topics.toml: topic {}: partitions must be >= 1",
                    t.name
                );
            }
            if t.cleanup_policy != "delete" && t.cleanup_policy != "compact" {
                bail!(
                    "topology/topics.toml: topic {}: cleanup_policy must be 'delete' or 'compact', not '{}'",
                    t.name,
                    t.cleanup_policy
                );
            }
        }
        // Co-partitioning is what lets one task own a customer's whole history.
        if partitions.windows(2).any(|w| w[0] != w[1]) {
            bail!("topology/topics.toml: all topics must have the same partition count (co-partitioning)");
        }
        for (fact, template) in &self.policy.triggers {
            if !crate::policy::TRIGGER_FACTS.contains(&fact.as_str()) {
                bail!(
                    "topology/policy.toml: triggers.{fact}: not a fact that can trigger a message"
                );
            }
            if self.catalog.variants(template).is_none() {
                bail!("topology/policy.toml: triggers.{fact}: template '{template}' is not in templates.toml");
            }
        }
        for (name, variants) in &self.catalog.templates {
            for t in variants {
                for v in &t.variables {
                    if !crate::policy::VARIABLE_SOURCES.contains(&v.source.as_str()) {
                        bail!(
                            "topology/templates.toml: template {name} ({}): variable {}: unknown source '{}'",
                            t.locale,
                            v.name,
                            v.source
                        );
                    }
                    if v.kind == VariableType::Money && v.fallback.is_some() {
                        bail!(
                            "topology/templates.toml: template {name} ({}): variable {}: money variables cannot have a fallback",
                            t.locale,
                            v.name
                        );
                    }
                }
            }
        }
        if self.policy.dedupe_window_hours <= 0 {
            bail!("topology/policy.toml: dedupe_window_hours must be > 0");
        }
        if self.policy.payment_hold_timeout_hours <= 0 {
            bail!("topology/policy.toml: payment_hold_timeout_hours must be > 0");
        }
        Ok(())
    }

    /// The partition count shared by every topic.
    pub fn partitions(&self) -> i32 {
        self.topics.first().map(|t| t.partitions).unwrap_or(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_topology_is_valid() {
        let t = Topology::embedded().unwrap();
        assert!(t.topics.iter().any(|t| t.name == "herald.decisions.v1"));
        assert!(t.catalog.variants("order_confirmation").is_some());
    }

    #[test]
    fn a_bad_key_is_named() {
        let t = Topology::embedded().unwrap();
        let policy = include_str!("../topology/policy.toml")
            .replace("dedupe_window_hours", "dedupe_window_hourz");
        let err = Topology::from_texts(
            include_str!("../topology/topics.toml"),
            include_str!("../topology/templates.toml"),
            &policy,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("dedupe_window_hourz"), "{err}");
        assert!(!t.topics.is_empty());
    }

    #[test]
    fn topics_must_be_co_partitioned() {
        let topics =
            include_str!("../topology/topics.toml").replacen("partitions = 6", "partitions = 5", 1);
        let err = Topology::from_texts(
            &topics,
            include_str!("../topology/templates.toml"),
            include_str!("../topology/policy.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("co-partitioning"), "{err}");
    }
}
