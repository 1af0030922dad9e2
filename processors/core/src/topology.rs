//! Herald's configuration as data: topics, the template catalog and policy settings, read from
//! `topology/` (or the copy embedded in the binary), validated, with errors that name the key.

use crate::events::{Channel, Family, Purpose, TemplateStatus};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Where a template variable may take its value from.
pub const VARIABLE_SOURCES: &[&str] = &[
    "customer.first_name",
    "order.id",
    "order.total",
    "shipment.carrier",
    "shipment.tracking_url",
    "shipment.new_estimated_delivery",
    "cart.total",
    "cart.first_item",
    "subscription.amount",
    "subscription.due_date",
    "refund.amount",
];

/// The embedded default topology, used by `herald demo` and when no directory is given.
pub const EMBEDDED: &[(&str, &str)] = &[
    ("topics.toml", include_str!("../../../topology/topics.toml")),
    (
        "templates.toml",
        include_str!("../../../topology/templates.toml"),
    ),
    ("policy.toml", include_str!("../../../topology/policy.toml")),
];

/// The embedded journeys (`topology/journeys/*.toml`).
pub const EMBEDDED_JOURNEYS: &[(&str, &str)] = &[
    (
        "abandoned_cart.toml",
        include_str!("../../../topology/journeys/abandoned_cart.toml"),
    ),
    (
        "order_updates.toml",
        include_str!("../../../topology/journeys/order_updates.toml"),
    ),
    (
        "re_engagement.toml",
        include_str!("../../../topology/journeys/re_engagement.toml"),
    ),
    (
        "subscription_renewal.toml",
        include_str!("../../../topology/journeys/subscription_renewal.toml"),
    ),
];

/// What a topic carries for Herald, whatever it is called in a deployment: the code names
/// topics by role, and topics.toml says which topic plays each one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TopicRole {
    /// Order, shipment and cart facts.
    Oms,
    /// Payments, refunds and renewals.
    Billing,
    /// Consent, profile and erasure facts.
    Crm,
    /// Provider callbacks, written by the gateway.
    Provider,
    /// Stock per SKU, compacted.
    Inventory,
    /// The decision log of the processors.
    Decisions,
    /// The dispatch log.
    Dispatch,
    /// Dead letters.
    Dlq,
    /// Every customer's addresses, compacted: what outlives the CRM topic's retention.
    Contacts,
}

impl TopicRole {
    /// Every role, each of which topics.toml must give exactly one topic.
    pub const ALL: [TopicRole; 9] = [
        TopicRole::Oms,
        TopicRole::Billing,
        TopicRole::Crm,
        TopicRole::Provider,
        TopicRole::Inventory,
        TopicRole::Decisions,
        TopicRole::Dispatch,
        TopicRole::Dlq,
        TopicRole::Contacts,
    ];

    /// The role as written in topics.toml.
    pub fn as_str(self) -> &'static str {
        match self {
            TopicRole::Oms => "oms",
            TopicRole::Billing => "billing",
            TopicRole::Crm => "crm",
            TopicRole::Provider => "provider",
            TopicRole::Inventory => "inventory",
            TopicRole::Decisions => "decisions",
            TopicRole::Dispatch => "dispatch",
            TopicRole::Dlq => "dlq",
            TopicRole::Contacts => "contacts",
        }
    }

    /// The input topic of a family of facts.
    pub fn of_family(family: Family) -> TopicRole {
        match family {
            Family::Oms => TopicRole::Oms,
            Family::Billing => TopicRole::Billing,
            Family::Crm => TopicRole::Crm,
            Family::Provider => TopicRole::Provider,
        }
    }

    /// The family of facts an input topic carries; `None` for the others.
    pub fn family(self) -> Option<Family> {
        match self {
            TopicRole::Oms => Some(Family::Oms),
            TopicRole::Billing => Some(Family::Billing),
            TopicRole::Crm => Some(Family::Crm),
            TopicRole::Provider => Some(Family::Provider),
            _ => None,
        }
    }
}

/// The topic names of one deployment, by role: topics.toml's names behind its prefix. Names are
/// shared (`Arc<str>`) because every produced record carries its topic's.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicNames {
    by_role: BTreeMap<TopicRole, Arc<str>>,
    passthrough: Arc<str>,
}

impl TopicNames {
    /// The topic playing `role`.
    pub fn of(&self, role: TopicRole) -> &Arc<str> {
        // Validation guarantees every role a topic; the index is total.
        &self.by_role[&role]
    }

    /// The role a topic plays in this deployment; `None` for a topic that is not Herald's.
    pub fn role_of(&self, topic: &str) -> Option<TopicRole> {
        self.by_role
            .iter()
            .find(|(_, name)| name.as_ref() == topic)
            .map(|(role, _)| *role)
    }

    /// The input topic of a family of facts.
    pub fn of_family(&self, family: Family) -> &Arc<str> {
        self.of(TopicRole::of_family(family))
    }

    /// The family of facts a topic carries, if it is one of the four input topics.
    pub fn family_of(&self, topic: &str) -> Option<Family> {
        self.role_of(topic).and_then(TopicRole::family)
    }

    /// The four input topics the processors consume.
    pub fn inputs(&self) -> Vec<String> {
        [
            TopicRole::Oms,
            TopicRole::Billing,
            TopicRole::Crm,
            TopicRole::Provider,
        ]
        .into_iter()
        .map(|r| self.of(r).to_string())
        .collect()
    }

    /// The decision log.
    pub fn decisions(&self) -> &Arc<str> {
        self.of(TopicRole::Decisions)
    }

    /// The dispatch log.
    pub fn dispatch(&self) -> &Arc<str> {
        self.of(TopicRole::Dispatch)
    }

    /// The dead-letter topic.
    pub fn dlq(&self) -> &Arc<str> {
        self.of(TopicRole::Dlq)
    }

    /// The contact changelog.
    pub fn contacts(&self) -> &Arc<str> {
        self.of(TopicRole::Contacts)
    }

    /// The stock table.
    pub fn inventory(&self) -> &Arc<str> {
        self.of(TopicRole::Inventory)
    }

    /// The CRM input topic: profiles (and their addresses), consent, erasure requests.
    pub fn crm(&self) -> &Arc<str> {
        self.of(TopicRole::Crm)
    }

    /// The provider topic, where the gateway writes status webhooks.
    pub fn provider(&self) -> &Arc<str> {
        self.of(TopicRole::Provider)
    }

    /// The topic `herald bench`'s pass-through stage writes, behind the same prefix.
    pub fn passthrough(&self) -> &Arc<str> {
        &self.passthrough
    }
}

/// One topic as declared in topics.toml.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    /// The topic's name, with the deployment's prefix once loaded.
    pub name: String,
    /// What the topic carries for Herald; a topic without a role is created by `herald topics
    /// apply` and read by no stage.
    #[serde(default)]
    pub role: Option<TopicRole>,
    pub partitions: i32,
    #[serde(default = "default_replication")]
    pub replication: i32,
    /// `delete` or `compact`.
    pub cleanup_policy: String,
    /// Retention in milliseconds; -1 keeps forever.
    pub retention_ms: i64,
    /// For a compacted topic, the longest a superseded record (an erased customer's card) may
    /// wait before the cleaner removes it; absent, the broker's default (no bound).
    #[serde(default)]
    pub max_compaction_lag_ms: Option<i64>,
    pub doc: String,
}

fn default_replication() -> i32 {
    3
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TopicsFile {
    /// Put before every topic name, so that deployments (staging, a shadow) share a cluster.
    #[serde(default)]
    prefix: String,
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
    /// Another template (by name) to use when this one is paused, disabled or rejected at the
    /// provider.
    #[serde(default)]
    pub fallback: Option<String>,
}

fn default_ttl_hours() -> i64 {
    72
}

fn default_provider_marketing_pause_hours() -> i64 {
    24
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

/// A rolling cap on messages of one template category per customer (`[[frequency_cap]]`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FrequencyCap {
    /// Template category counted (MARKETING, UTILITY...).
    pub category: String,
    /// Most messages approved inside any window.
    pub max: usize,
    pub window_hours: i64,
}

/// Inbound keywords and buttons that withdraw consent (`[opt_out]`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptOut {
    /// Purposes a keyword withdraws on the channel it arrives on.
    pub purposes: Vec<Purpose>,
    /// Keywords by language (`en`, `es`, `pt`); matched on the whole message, ignoring case.
    pub keywords: BTreeMap<String, Vec<String>>,
    /// Texts of quick-reply buttons that mean opt-out, by language (the marketing opt-out
    /// button's "Stop promotions"); matched on a message's whole text, ignoring case.
    #[serde(default)]
    pub button_texts: BTreeMap<String, Vec<String>>,
    /// Payloads of template buttons that mean opt-out, by language; matched on a button
    /// reply's payload, ignoring case.
    #[serde(default)]
    pub button_payloads: BTreeMap<String, Vec<String>>,
}

/// Inbound terms that raise an escalation for the agent desk (`[[escalation]]`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EscalationRule {
    /// `complaint`, `risk`...: where the agent desk routes it.
    pub category: String,
    /// Matched as whole words, ignoring case.
    pub terms: Vec<String>,
}

/// Policy settings from policy.toml.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicySettings {
    /// Recorded on every decision so that a decision can be traced to the rules that made it.
    pub version: String,
    pub dedupe_window_hours: i64,
    /// A customer's latest this many event ids are remembered however far stream time has
    /// moved, so a topic that lags the others (a slow fetch, a backlog) cannot age a
    /// redelivery out of the window.
    pub dedupe_remember_at_least: usize,
    pub payment_hold_timeout_hours: i64,
    /// Channels in the order they are tried: a message goes out on the first one the customer
    /// consented to for its purpose and has an address for.
    pub channels: Vec<Channel>,
    /// Locales to try, in order, when a template has no variant in the customer's own locale;
    /// each must be the same language.
    #[serde(default)]
    pub locale_fallback: BTreeMap<String, Vec<String>>,
    /// How often a message held for an ambiguous signal (locale, inventory, order facts) looks again.
    pub recheck_ambiguous_hours: i64,
    /// Hours a customer's inbound message keeps the customer service window open.
    pub session_window_hours: i64,
    /// A stock level older than this is not trusted by a journey guard.
    pub inventory_max_age_hours: i64,
    /// How long marketing to a customer pauses after the provider refused it with 131048
    /// (spam rate limit) or 131049 (marketing limited for this user).
    #[serde(default = "default_provider_marketing_pause_hours")]
    pub provider_marketing_pause_hours: i64,
    #[serde(default)]
    pub frequency_cap: Vec<FrequencyCap>,
    #[serde(default)]
    pub opt_out: OptOut,
    #[serde(default)]
    pub escalation: Vec<EscalationRule>,
    /// No quiet hours when absent.
    #[serde(default)]
    pub quiet_hours: Option<QuietHours>,
    /// Holidays and regional blackout days (`[[blackout]]`).
    #[serde(default)]
    pub blackout: Vec<Blackout>,
}

/// What one journey instance is about: facts with this key kind address it.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum JourneyKey {
    /// One instance per order (order_id).
    Order,
    /// One instance per cart (cart_id).
    Cart,
    /// One instance per subscription (subscription_id).
    Subscription,
    /// One instance per customer.
    Customer,
}

/// A named condition checked before every message of a journey.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Guard {
    /// Every item of the cart is in stock, by a stock level recent enough to trust. Out of
    /// stock ends the journey; a missing or old level holds the message.
    CartInStock,
}

/// A timed step: a template sent some time after the previous step (or the entry).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JourneyStep {
    pub template: String,
    /// Hours after the previous step (or the entry) it is due.
    #[serde(default)]
    pub after_hours: f64,
    /// Instead of `after_hours`: this many hours before the subscription's due date.
    #[serde(default)]
    pub before_due_hours: Option<f64>,
    /// Times the step repeats while the journey goes on (an ignored nudge is sent again).
    #[serde(default)]
    pub repeat: u32,
    /// Each repeat waits this many times longer than the one before (exponential backoff).
    #[serde(default = "one")]
    pub backoff: f64,
}

fn one() -> f64 {
    1.0
}

/// A message sent when a fact about an active instance arrives (e.g. a shipment of the order).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JourneyReaction {
    pub fact: String,
    pub template: String,
    /// Used instead when the fact covers only part of the order (a split shipment, a partial refund).
    #[serde(default)]
    pub partial_template: Option<String>,
}

/// A journey: a state machine of messages, declared in `topology/journeys/<name>.toml`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Journey {
    pub name: String,
    pub description: String,
    /// The fact that starts an instance.
    pub entry: String,
    pub key: JourneyKey,
    /// Facts that end the instance with their key, or every instance when they carry another key.
    #[serde(default)]
    pub exit_on: Vec<String>,
    /// Share of customers (0-100) held out of the journey, for incrementality reporting.
    #[serde(default)]
    pub holdout_percent: f64,
    #[serde(default)]
    pub guards: Vec<Guard>,
    #[serde(default, rename = "step")]
    pub steps: Vec<JourneyStep>,
    #[serde(default, rename = "on")]
    pub reactions: Vec<JourneyReaction>,
}

impl Journey {
    /// Whether a fact of this kind enters, exits or triggers a reaction of this journey.
    pub fn listens_to(&self, kind: &str) -> bool {
        self.entry == kind
            || self.exit_on.iter().any(|f| f == kind)
            || self.reactions.iter().any(|r| r.fact == kind)
    }

    /// The timed step taken as the `n`-th (repeats counted), and how long after the previous
    /// one it is due; `None` once every step is taken.
    pub fn step_at(&self, n: usize) -> Option<(&JourneyStep, f64)> {
        let mut left = n;
        for step in &self.steps {
            let times = step.repeat as usize + 1;
            if left < times {
                return Some((step, step.after_hours * step.backoff.powi(left as i32)));
            }
            left -= times;
        }
        None
    }
}

/// Everything the pure core needs to decide, loaded once.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    /// The topics with their full names (prefix included).
    pub topics: Vec<TopicSpec>,
    /// The topic of each role, from `topics`.
    pub names: TopicNames,
    /// The prefix the names carry.
    pub prefix: String,
    pub catalog: TemplateCatalog,
    pub policy: PolicySettings,
    /// Journeys by name order.
    pub journeys: Vec<Journey>,
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

    /// Parses and validates the three files, with the embedded journeys.
    pub fn from_texts(topics: &str, templates: &str, policy: &str) -> Result<Self> {
        let journeys: Vec<(String, String)> = EMBEDDED_JOURNEYS
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect();
        Self::from_parts(topics, templates, policy, &journeys)
    }

    /// Parses and validates the files; `journeys` are (file name, text) pairs.
    pub fn from_parts(
        topics: &str,
        templates: &str,
        policy: &str,
        journeys: &[(String, String)],
    ) -> Result<Self> {
        let topics: TopicsFile = parse("topics.toml", topics)?;
        let templates: TemplatesFile = parse("templates.toml", templates)?;
        let policy: PolicySettings = parse("policy.toml", policy)?;
        let mut catalog = TemplateCatalog::default();
        for t in templates.template {
            catalog.templates.entry(t.name.clone()).or_default().push(t);
        }
        let mut parsed = Vec::new();
        for (file, text) in journeys {
            let j: Journey = parse(&format!("journeys/{file}"), text)?;
            parsed.push(j);
        }
        parsed.sort_by(|a, b| a.name.cmp(&b.name));
        let mut topo = Topology {
            topics: topics.topic,
            names: TopicNames {
                by_role: BTreeMap::new(),
                passthrough: Arc::from(""),
            },
            prefix: String::new(),
            catalog,
            policy,
            journeys: parsed,
        };
        topo.validate()?;
        topo.set_topic_prefix(&topics.prefix)
            .context("topology/topics.toml")?;
        Ok(topo)
    }

    /// The same topology with every topic name behind `prefix` instead of topics.toml's own
    /// (`--topic-prefix`): how a staging deployment shares a cluster with production.
    pub fn with_topic_prefix(mut self, prefix: &str) -> Result<Self> {
        self.set_topic_prefix(prefix)?;
        Ok(self)
    }

    fn set_topic_prefix(&mut self, prefix: &str) -> Result<()> {
        if let Some(bad) = prefix
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            bail!("prefix '{prefix}' has '{bad}'; Kafka topic names take letters, digits, '.', '_' and '-'");
        }
        for t in &mut self.topics {
            let declared = t.name.strip_prefix(self.prefix.as_str()).unwrap_or(&t.name);
            t.name = format!("{prefix}{declared}");
        }
        self.prefix = prefix.to_string();
        self.names = TopicNames {
            by_role: self
                .topics
                .iter()
                .filter_map(|t| Some((t.role?, Arc::from(t.name.as_str()))))
                .collect(),
            passthrough: Arc::from(format!("{prefix}herald.bench.passthrough")),
        };
        Ok(())
    }

    /// The journey of that name.
    pub fn journey(&self, name: &str) -> Option<&Journey> {
        self.journeys.iter().find(|j| j.name == name)
    }

    fn validate(&self) -> Result<()> {
        let partitions: Vec<i32> = self.topics.iter().map(|t| t.partitions).collect();
        for role in TopicRole::ALL {
            let playing: Vec<&str> = self
                .topics
                .iter()
                .filter(|t| t.role == Some(role))
                .map(|t| t.name.as_str())
                .collect();
            match playing.as_slice() {
                [_] => {}
                [] => bail!(
                    "topology/topics.toml: no topic has role = \"{}\"",
                    role.as_str()
                ),
                many => bail!(
                    "topology/topics.toml: role = \"{}\" is given to {} topics ({}); each role has one",
                    role.as_str(),
                    many.len(),
                    many.join(", ")
                ),
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for t in &self.topics {
            if !seen.insert(t.name.as_str()) {
                bail!("topology/topics.toml: topic {} is declared twice", t.name);
            }
        }
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
        self.validate_journeys()?;
        self.validate_policy()?;
        for (name, variants) in &self.catalog.templates {
            for t in variants {
                for v in &t.variables {
                    if !VARIABLE_SOURCES.contains(&v.source.as_str()) {
                        bail!(
                            "topology/templates.toml: template {name} ({}): variable {}: unknown source '{}'",
                            t.locale,
                            v.name,
                            v.source
                        );
                    }
                    if let Some(f) = &t.fallback {
                        if self.catalog.variants(f).is_none() {
                            bail!("topology/templates.toml: template {name} ({}): fallback '{f}' is not in templates.toml", t.locale);
                        }
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
        if self.policy.dedupe_remember_at_least == 0 {
            bail!("topology/policy.toml: dedupe_remember_at_least must be > 0");
        }
        if self.policy.payment_hold_timeout_hours <= 0 {
            bail!("topology/policy.toml: payment_hold_timeout_hours must be > 0");
        }
        Ok(())
    }

    fn validate_journeys(&self) -> Result<()> {
        let mut names = std::collections::BTreeSet::new();
        for j in &self.journeys {
            let at = format!("topology/journeys/{}.toml", j.name);
            if !names.insert(&j.name) {
                bail!("{at}: name: a second journey is called '{}'", j.name);
            }
            let known = |f: &str| crate::events::FACT_KINDS.contains(&f);
            if !known(&j.entry) {
                bail!("{at}: entry: '{}' is not a fact", j.entry);
            }
            for f in &j.exit_on {
                if !known(f) {
                    bail!("{at}: exit_on: '{f}' is not a fact");
                }
            }
            if !(0.0..=100.0).contains(&j.holdout_percent) {
                bail!("{at}: holdout_percent must be between 0 and 100");
            }
            if j.steps.is_empty() && j.reactions.is_empty() {
                bail!("{at}: a journey needs at least one [[step]] or [[on]]");
            }
            let template = |key: &str, t: &str| {
                if self.catalog.variants(t).is_none() {
                    bail!("{at}: {key}: template '{t}' is not in templates.toml");
                }
                Ok(())
            };
            for s in &j.steps {
                template("step.template", &s.template)?;
                if s.after_hours < 0.0 || s.backoff < 1.0 {
                    bail!(
                        "{at}: step {}: after_hours must be >= 0 and backoff >= 1",
                        s.template
                    );
                }
                if s.before_due_hours.is_some() && j.key != JourneyKey::Subscription {
                    bail!(
                        "{at}: step {}: before_due_hours needs key = \"subscription\"",
                        s.template
                    );
                }
            }
            for r in &j.reactions {
                if !known(&r.fact) {
                    bail!("{at}: on.fact: '{}' is not a fact", r.fact);
                }
                template("on.template", &r.template)?;
                if let Some(p) = &r.partial_template {
                    template("on.partial_template", p)?;
                }
            }
        }
        Ok(())
    }

    fn validate_policy(&self) -> Result<()> {
        let p = &self.policy;
        if p.channels.is_empty() {
            bail!("topology/policy.toml: channels: list at least one channel");
        }
        for (locale, chain) in &p.locale_fallback {
            let language = |l: &str| l.split(['_', '-']).next().unwrap_or("").to_string();
            for l in chain {
                if language(l) != language(locale) {
                    bail!("topology/policy.toml: locale_fallback.{locale}: '{l}' is another language; a message is never sent in the wrong language");
                }
            }
        }
        for c in &p.frequency_cap {
            if c.max == 0 || c.window_hours <= 0 {
                bail!(
                    "topology/policy.toml: frequency_cap ({}): max and window_hours must be > 0",
                    c.category
                );
            }
            if c.window_hours * crate::state::HOUR_MS > crate::state::RECENT_SENDS_KEPT_MS {
                bail!("topology/policy.toml: frequency_cap ({}): window_hours is longer than the {} days of sends kept in state", c.category, crate::state::RECENT_SENDS_KEPT_MS / (24 * crate::state::HOUR_MS));
            }
        }
        for (key, v) in [
            ("recheck_ambiguous_hours", p.recheck_ambiguous_hours),
            ("session_window_hours", p.session_window_hours),
            ("inventory_max_age_hours", p.inventory_max_age_hours),
            (
                "provider_marketing_pause_hours",
                p.provider_marketing_pause_hours,
            ),
        ] {
            if v <= 0 {
                bail!("topology/policy.toml: {key} must be > 0");
            }
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
        let policy = include_str!("../../../topology/policy.toml")
            .replace("dedupe_window_hours", "dedupe_window_hourz");
        let err = Topology::from_texts(
            include_str!("../../../topology/topics.toml"),
            include_str!("../../../topology/templates.toml"),
            &policy,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("dedupe_window_hourz"), "{err}");
        assert!(!t.topics.is_empty());
    }

    fn topics_with(edit: impl Fn(&str) -> String) -> Result<Topology> {
        Topology::from_texts(
            &edit(include_str!("../../../topology/topics.toml")),
            include_str!("../../../topology/templates.toml"),
            include_str!("../../../topology/policy.toml"),
        )
    }

    #[test]
    fn the_prefix_goes_before_every_topic_name() {
        let t = topics_with(|s| s.replace("prefix = \"\"", "prefix = \"staging.\"")).unwrap();
        assert_eq!(t.names.decisions().as_ref(), "staging.herald.decisions.v1");
        assert_eq!(
            t.names.of_family(Family::Crm).as_ref(),
            "staging.crm.events.v1"
        );
        assert!(t.topics.iter().all(|t| t.name.starts_with("staging.")));
        assert_eq!(t.names.role_of("herald.decisions.v1"), None);
        assert_eq!(
            t.names.role_of("staging.herald.dlq.v1"),
            Some(TopicRole::Dlq)
        );
        // --topic-prefix replaces topics.toml's prefix rather than adding to it.
        let t = t.with_topic_prefix("shadow-").unwrap();
        assert_eq!(t.names.dispatch().as_ref(), "shadow-herald.dispatch.v1");
        assert_eq!(
            t.names.passthrough().as_ref(),
            "shadow-herald.bench.passthrough"
        );
        let err = t.with_topic_prefix("a b").unwrap_err().to_string();
        assert!(err.contains("prefix 'a b'"), "{err}");
    }

    #[test]
    fn a_shadow_renames_its_own_topics_and_reads_the_inputs() {
        let t = topics_with(|s| {
            s.replace("\"herald.decisions.v1\"", "\"shadow.decisions.v1\"")
                .replace("\"herald.dispatch.v1\"", "\"shadow.dispatch.v1\"")
        })
        .unwrap();
        assert_eq!(t.names.decisions().as_ref(), "shadow.decisions.v1");
        assert_eq!(t.names.family_of("oms.events.v1"), Some(Family::Oms));
        assert_eq!(t.names.inputs().len(), 4);
    }

    #[test]
    fn every_role_has_exactly_one_topic() {
        let err = topics_with(|s| s.replace("role = \"dlq\"", "role = \"dispatch\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("role = \"dispatch\" is given to 2 topics"),
            "{err}"
        );
        let err = topics_with(|s| s.replace("role = \"dlq\"", "role = \"dispatch\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("herald.dlq.v1"), "{err}");
        let err = topics_with(|s| s.replace("role = \"oms\"\n", ""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("role"), "{err}");
        let err = topics_with(|s| s.replace("role = \"oms\"", "role = \"orders\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("orders"), "{err}");
    }

    #[test]
    fn topics_must_be_co_partitioned() {
        let topics = include_str!("../../../topology/topics.toml").replacen(
            "partitions = 6",
            "partitions = 5",
            1,
        );
        let err = Topology::from_texts(
            &topics,
            include_str!("../../../topology/templates.toml"),
            include_str!("../../../topology/policy.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("co-partitioning"), "{err}");
    }
}
