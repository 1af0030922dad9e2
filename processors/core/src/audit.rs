//! Consent audit: each customer's consent history as a hash chain over the decision log, the
//! timeline an auditor reads (`herald audit consent`), and the check that finds a changed or
//! missing record (`herald audit verify`). Pure: the log is read by the shell.

use crate::events::{rfc3339, Channel, Decision, Fact, Millis, Outcome, Purpose};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// The chain link of a consent-changing decision: SHA-256 of the previous link (empty for the
/// first) and the decision's content, the link itself left out. Hex, 64 characters.
pub fn chain_link(previous: Option<&str>, d: &Decision) -> String {
    let mut h = Sha256::new();
    h.update(previous.unwrap_or("").as_bytes());
    h.update([0x1f]);
    for part in [
        d.decision_id.as_str(),
        d.customer_id.as_str(),
        d.input_event_id.as_str(),
        d.policy_version.as_str(),
    ] {
        h.update(part.as_bytes());
        h.update([0x1f]);
    }
    h.update(d.decided_at.to_be_bytes());
    // Struct fields serialise in declaration order and maps are BTreeMaps: stable bytes.
    h.update(serde_json::to_vec(&d.outcome).unwrap_or_default());
    crate::context::hex(&h.finalize())
}

/// One change of consent, as the timeline shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsentEvent {
    pub at: Millis,
    pub granted: bool,
    pub purposes: Vec<Purpose>,
    pub channel: Channel,
    pub source: String,
    pub artifact_id: String,
    pub decision_id: String,
    pub chain: Option<String>,
}

/// A business-initiated decision and the consent artifact it relied on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reliance {
    pub at: Millis,
    pub decision_id: String,
    pub summary: String,
    pub message_id: String,
    pub channel: Channel,
    pub artifact_id: String,
    pub consent_granted_at: Millis,
}

/// A customer's consent timeline and what relied on it, up to an instant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Timeline {
    pub customer_id: String,
    pub changes: Vec<ConsentEvent>,
    pub relied_on: Vec<Reliance>,
}

/// The consent change a decision records, if it records one.
pub fn consent_change(d: &Decision) -> Option<ConsentEvent> {
    let (granted, purposes, channel, source, artifact_id, at) = match &d.outcome {
        Outcome::EventAccepted(a) => match &a.fact {
            Fact::ConsentGranted(c) | Fact::ConsentRevoked(c) => (
                matches!(a.fact, Fact::ConsentGranted(_)),
                vec![c.purpose],
                c.channel,
                c.source.clone(),
                c.artifact_id.clone(),
                a.envelope.occurred_at,
            ),
            _ => return None,
        },
        Outcome::OptedOut(o) => (
            false,
            o.purposes.clone(),
            o.channel,
            format!("inbound keyword '{}'", o.keyword),
            o.provider_message_id.clone(),
            o.received_at,
        ),
        _ => return None,
    };
    Some(ConsentEvent {
        at,
        granted,
        purposes,
        channel,
        source,
        artifact_id,
        decision_id: d.decision_id.clone(),
        chain: d.consent_chain.clone(),
    })
}

/// Consent-history projection changes not yet saved: the records to add, and the customers
/// whose earlier records go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsentProjection {
    pub records: Vec<(String, ConsentEvent)>,
    pub erased: Vec<String>,
}

impl ConsentProjection {
    /// What one decision changes: an erasure forgets the customer's history so far (saved or
    /// pending), a consent change adds a record.
    pub fn apply(&mut self, d: &Decision) {
        if d.outcome.erases_customer() {
            self.records.retain(|(c, _)| *c != d.customer_id);
            self.erased.push(d.customer_id.clone());
        }
        if let Some(c) = consent_change(d) {
            self.records.push((d.customer_id.clone(), c));
        }
    }
}

/// The timeline of one customer from their decisions in log order, up to `as_of` (decision
/// time) when given.
pub fn timeline(customer_id: &str, decisions: &[&Decision], as_of: Option<Millis>) -> Timeline {
    let mut t = Timeline {
        customer_id: customer_id.to_string(),
        ..Timeline::default()
    };
    for d in decisions {
        if as_of.is_some_and(|limit| d.decided_at > limit) {
            continue;
        }
        if let Some(change) = consent_change(d) {
            t.changes.push(change);
        }
        let planned = match &d.outcome {
            Outcome::MessageApproved(m) => Some(&**m),
            Outcome::MessageDeferred(m) => Some(&m.planned),
            _ => None,
        };
        if let Some(m) = planned {
            t.relied_on.push(Reliance {
                at: d.decided_at,
                decision_id: d.decision_id.clone(),
                summary: d.outcome.summary(),
                message_id: m.message_id.clone(),
                channel: m.channel,
                artifact_id: m.consent_artifact_id.clone(),
                consent_granted_at: m.consent_granted_at,
            });
        }
    }
    t
}

fn short(link: &Option<String>) -> String {
    link.as_deref()
        .map(|l| format!("{}…", &l[..l.len().min(12)]))
        .unwrap_or_else(|| "(none)".into())
}

impl Timeline {
    /// The timeline for a reader: each change of consent, and under it the decisions that
    /// relied on that grant; reliance on consent this log does not show comes last.
    pub fn render(&self, as_of: Option<Millis>) -> String {
        let mut s = format!("consent of {}", self.customer_id);
        if let Some(t) = as_of {
            s += &format!(" as of {}", rfc3339(t));
        }
        s += "\n";
        if self.changes.is_empty() {
            s += "  no consent change recorded\n";
        }
        let mut shown = vec![false; self.relied_on.len()];
        for c in &self.changes {
            let purposes: Vec<String> = c.purposes.iter().map(|p| format!("{p:?}")).collect();
            s += &format!(
                "{}  {:<8} {}/{:?}  source {}  artifact {}  link {}\n",
                rfc3339(c.at),
                if c.granted { "GRANTED" } else { "REVOKED" },
                purposes.join("+"),
                c.channel,
                c.source,
                c.artifact_id,
                short(&c.chain)
            );
            if !c.granted {
                continue;
            }
            for (i, r) in self.relied_on.iter().enumerate() {
                if !shown[i] && r.artifact_id == c.artifact_id && r.consent_granted_at == c.at {
                    shown[i] = true;
                    s += &format!(
                        "    {}  {} on {:?}  (decision {})\n",
                        rfc3339(r.at),
                        r.summary,
                        r.channel,
                        r.decision_id
                    );
                }
            }
        }
        let orphans: Vec<&Reliance> = self
            .relied_on
            .iter()
            .zip(&shown)
            .filter(|(_, seen)| !**seen)
            .map(|(r, _)| r)
            .collect();
        if !orphans.is_empty() {
            s += "relied on consent not in this log:\n";
            for r in orphans {
                s += &format!(
                    "    {}  {} on {:?}, artifact {} granted {}  (decision {})\n",
                    rfc3339(r.at),
                    r.summary,
                    r.channel,
                    r.artifact_id,
                    rfc3339(r.consent_granted_at),
                    r.decision_id
                );
            }
        }
        s
    }
}

/// Where a customer's consent chain does not hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainBreak {
    pub customer_id: String,
    pub decision_id: String,
    /// Consent records of this customer before the break that checked out.
    pub position: usize,
    pub why: String,
}

/// What `herald audit verify` found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Verification {
    pub customers: usize,
    pub consent_records: usize,
    /// Consent changes written before the chain existed (schema v3 and older), not checkable.
    pub unchained: usize,
    /// Chained records whose link checked out.
    pub intact: usize,
    pub breaks: Vec<ChainBreak>,
}

/// Recomputes every customer's chain from their decisions in log order. A changed record breaks
/// its own link; a missing one breaks the link after it.
pub fn verify<'a>(decisions: impl IntoIterator<Item = &'a Decision>) -> Verification {
    let mut per: BTreeMap<&str, Vec<&Decision>> = BTreeMap::new();
    for d in decisions {
        per.entry(&d.customer_id).or_default().push(d);
    }
    let mut v = Verification {
        customers: per.len(),
        ..Verification::default()
    };
    for (customer, ds) in per {
        let mut previous: Option<String> = None;
        let mut checked = 0;
        for d in ds {
            if !d.outcome.changes_consent() {
                if d.consent_chain.is_some() {
                    v.breaks.push(ChainBreak {
                        customer_id: customer.to_string(),
                        decision_id: d.decision_id.clone(),
                        position: checked,
                        why: "a chain link on a decision that changes no consent".into(),
                    });
                }
                continue;
            }
            v.consent_records += 1;
            let Some(recorded) = &d.consent_chain else {
                v.unchained += 1;
                continue;
            };
            let expected = chain_link(previous.as_deref(), d);
            if *recorded != expected {
                v.breaks.push(ChainBreak {
                    customer_id: customer.to_string(),
                    decision_id: d.decision_id.clone(),
                    position: checked,
                    why: "the link does not follow from the records before it: this record \
                          was changed, or one before it is missing"
                        .into(),
                });
                break;
            }
            checked += 1;
            previous = Some(expected);
        }
        v.intact += checked;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::*;
    use crate::tables::Tables;
    use crate::task::Task;
    use crate::topology::Topology;

    const T0: Millis = 1_772_445_600_000;
    const HOUR: Millis = 3_600_000;

    fn consent(id: &str, at: Millis, grant: bool, purpose: Purpose) -> InputEvent {
        let change = ConsentChange {
            purpose,
            channel: Channel::Whatsapp,
            source: "checkout".into(),
            artifact_id: format!("form-{id}"),
        };
        let fact = if grant {
            Fact::ConsentGranted(change)
        } else {
            Fact::ConsentRevoked(change)
        };
        InputEvent::new("crm", "c-1", id, at, fact)
    }

    fn log() -> Vec<Decision> {
        let topology = Topology::embedded().unwrap();
        let tables = Tables::default();
        let mut task = Task::default();
        let inputs = [
            InputEvent::new(
                "crm",
                "c-1",
                "p",
                T0,
                serde_json::from_value(serde_json::json!({"type": "ProfileChanged", "first_name": "Ana", "locale": "en_US", "time_zone": "America/New_York", "phone_e164": "+15550100001"})).unwrap(),
            ),
            consent("g1", T0, true, Purpose::Transactional),
            consent("g2", T0 + HOUR, true, Purpose::Marketing),
            InputEvent::new(
                "oms",
                "c-1",
                "o",
                T0 + 2 * HOUR,
                serde_json::from_value(serde_json::json!({"type": "OrderPlaced", "order_id": "o-1", "items": [], "total": {"amount": "10.00", "currency": "EUR"}})).unwrap(),
            ),
            consent("r1", T0 + 3 * HOUR, false, Purpose::Marketing),
        ];
        inputs
            .iter()
            .enumerate()
            .flat_map(|(i, e)| task.decide(e, &format!("t/0/{i}"), &topology, &tables))
            .collect()
    }

    #[test]
    fn the_live_log_verifies_and_the_timeline_shows_what_relied_on_each_grant() {
        let log = log();
        let v = verify(&log);
        assert_eq!(v.consent_records, 3);
        assert_eq!(v.unchained, 0);
        assert!(v.breaks.is_empty(), "{:?}", v.breaks);
        let all: Vec<&Decision> = log.iter().collect();
        let t = timeline("c-1", &all, None);
        assert_eq!(t.changes.len(), 3);
        assert!(!t.changes[2].granted);
        assert!(
            t.relied_on.iter().any(|r| r.artifact_id == "form-g1"),
            "{t:?}"
        );
        let before_revocation = timeline("c-1", &all, Some(T0 + 2 * HOUR));
        assert_eq!(before_revocation.changes.len(), 2);
    }

    #[test]
    fn a_changed_or_missing_consent_record_breaks_the_chain() {
        let log = log();
        let consent_at: Vec<usize> = (0..log.len())
            .filter(|i| log[*i].outcome.changes_consent())
            .collect();

        let mut changed = log.clone();
        if let Outcome::EventAccepted(a) = &mut changed[consent_at[1]].outcome {
            if let Fact::ConsentGranted(c) = &mut a.fact {
                c.source = "made up later".into();
            }
        }
        let v = verify(&changed);
        assert_eq!(v.breaks.len(), 1);
        assert_eq!(v.breaks[0].position, 1);

        let mut missing = log.clone();
        missing.remove(consent_at[0]);
        let v = verify(&missing);
        assert_eq!(v.breaks.len(), 1);
        assert_eq!(v.breaks[0].position, 0);
    }

    #[test]
    fn the_consent_projection_forgets_an_erased_customers_history_and_keeps_what_follows() {
        let topology = Topology::embedded().unwrap();
        let tables = Tables::default();
        let mut task = Task::default();
        let erasure = InputEvent::new(
            "crm",
            "c-1",
            "x",
            T0 + 4 * HOUR,
            Fact::ErasureRequested(ErasureRequested {
                request_id: "r".into(),
            }),
        );
        let mut projection = ConsentProjection::default();
        let mut decisions = log();
        decisions.extend(task.decide(&erasure, "t/0/9", &topology, &tables));
        decisions.extend(task.decide(
            &consent("g3", T0 + 5 * HOUR, true, Purpose::Transactional),
            "t/0/10",
            &topology,
            &tables,
        ));
        for d in &decisions {
            projection.apply(d);
        }
        assert_eq!(projection.erased, vec!["c-1".to_string()]);
        let kept: Vec<&str> = projection
            .records
            .iter()
            .map(|(_, c)| c.artifact_id.as_str())
            .collect();
        assert_eq!(
            kept,
            vec!["form-g3"],
            "only the consent given after the erasure"
        );
    }
}
