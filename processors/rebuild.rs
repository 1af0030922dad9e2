//! `herald rebuild`: every customer's state folded again from the decision log, from offset 0,
//! into a fresh store, with a digest that does not depend on how the work was split; and the
//! same digest of a live store, to prove the two agree. Reads the log and writes only its own
//! store: no send, no record, no side effect.

use crate::audit::ConsentProjection;
use crate::events::{Decision, Millis, Outcome};
use crate::replay::{DumpedRecord, Payload};
use crate::stages::{STREAM_TIME_KEY, TIMERS_KEY};
use crate::state::{evolve, CustomerState};
use crate::store::{state_encoding, EmbeddedStore, SnapshotWrite, StateStore, PROCESSORS};
use crate::tables::Tables;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// One partition folded: its customers, the next offset to fold, and its stream time.
#[derive(Debug, Default)]
pub struct FoldedPartition {
    pub customers: BTreeMap<String, CustomerState>,
    pub next_offset: i64,
    pub stream_time: Millis,
    pub decisions: u64,
    /// Consent history in log order, an erased customer's history dropped.
    pub consent: ConsentProjection,
    /// Template statuses the partition accepted, saved beside its positions as the live
    /// processors save them.
    pub tables: Tables,
}

/// Folds each partition's decisions in offset order, `parallelism` partitions at a time;
/// `progress` hears the decisions folded so far.
pub fn fold(
    records: &[DumpedRecord],
    parallelism: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> BTreeMap<i32, FoldedPartition> {
    let mut logs: BTreeMap<i32, Vec<(i64, &Decision)>> = BTreeMap::new();
    for r in records {
        if let Payload::Decision(d) = &r.payload {
            logs.entry(r.partition).or_default().push((r.offset, d));
        }
    }
    let done = std::sync::atomic::AtomicU64::new(0);
    let work: Vec<(i32, Vec<(i64, &Decision)>)> = logs.into_iter().collect();
    let chunk = work.len().div_ceil(parallelism.max(1)).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = work
            .chunks(chunk)
            .map(|part| {
                let done = &done;
                s.spawn(move || {
                    let mut out = Vec::new();
                    for (p, log) in part {
                        let mut log = log.clone();
                        log.sort_by_key(|(o, _)| *o);
                        let mut f = FoldedPartition::default();
                        for (offset, d) in log {
                            evolve(f.customers.entry(d.customer_id.clone()).or_default(), d);
                            if let Outcome::EventAccepted(a) = &d.outcome {
                                f.tables.observe(&a.fact, a.envelope.occurred_at);
                            }
                            f.consent.apply(d);
                            f.stream_time = f.stream_time.max(d.decided_at);
                            f.next_offset = f.next_offset.max(offset + 1);
                            f.decisions += 1;
                            let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                            if n.is_multiple_of(20_000) {
                                progress(n);
                            }
                        }
                        out.push((*p, f));
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

/// SHA-256 over every customer's id and state, in id order: the same states give the same
/// digest whatever the partitioning or parallelism.
pub fn digest<'a>(customers: impl IntoIterator<Item = (&'a String, &'a CustomerState)>) -> String {
    let mut sorted: Vec<(&String, &CustomerState)> = customers.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut h = Sha256::new();
    for (id, state) in sorted {
        h.update(id.as_bytes());
        h.update([0x1f]);
        h.update(serde_json::to_vec(state).unwrap_or_default());
        h.update([0x1e]);
    }
    crate::context::hex(&h.finalize())
}

/// Fails unless the store holds nothing at all.
pub fn ensure_fresh(store: &dyn StateStore) -> Result<()> {
    if !store.is_empty()? {
        bail!(
            "--into: {} already holds state; rebuild into a fresh directory or keyspace",
            store.describe()
        );
    }
    Ok(())
}

/// Writes folded partitions, and their consent history, into a store that must hold nothing
/// yet.
pub fn write(store: &dyn StateStore, folded: &BTreeMap<i32, FoldedPartition>) -> Result<()> {
    ensure_fresh(store)?;
    for (p, f) in folded {
        let mut changed = Vec::with_capacity(f.customers.len());
        let mut timers = Vec::new();
        for (c, s) in &f.customers {
            changed.push((c.clone(), state_encoding::encode(s)?));
            if let Some(due) = s.next_timer() {
                timers.push((c.clone(), Some(due)));
            }
        }
        let mut inputs = BTreeMap::from([
            (STREAM_TIME_KEY.to_string(), f.stream_time),
            (TIMERS_KEY.to_string(), 1),
        ]);
        inputs.extend(f.tables.saved_positions());
        let write = SnapshotWrite {
            changed,
            next_offset: f.next_offset,
            inputs,
            consent: f.consent.records.clone(),
            // The store is fresh: nothing saved earlier to remove.
            erased: Vec::new(),
            timers,
        };
        store.save(PROCESSORS, *p, &write)?;
    }
    Ok(())
}

/// Every customer state a store holds for the processors, across `partitions`.
pub fn load_states(
    store: &dyn StateStore,
    partitions: i32,
) -> Result<BTreeMap<String, CustomerState>> {
    let mut out = BTreeMap::new();
    for p in 0..partitions {
        for (c, stored) in store.load(PROCESSORS, p)?.customers {
            let state = state_encoding::decode(&stored.bytes)
                .with_context(|| format!("stored state of {c} (partition {p}) is unreadable"))?;
            out.insert(c, state);
        }
    }
    Ok(out)
}

/// What `herald rebuild` reports.
#[derive(Debug, Clone, Serialize)]
pub struct RebuildReport {
    pub decisions: u64,
    pub customers: usize,
    pub digest: String,
    pub seconds: f64,
    pub events_per_s: f64,
    /// With `--verify`: the live store's digest, and the customers whose states differ.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live_digest: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub differing_customers: Vec<String>,
}

/// The customers whose state differs between two sets (or that only one has), in id order.
pub fn differing(
    a: &BTreeMap<String, CustomerState>,
    b: &BTreeMap<String, CustomerState>,
    most: usize,
) -> Vec<String> {
    let mut ids: Vec<&String> = a.keys().chain(b.keys()).collect();
    ids.sort();
    ids.dedup();
    ids.into_iter()
        .filter(|id| a.get(*id) != b.get(*id))
        .take(most)
        .cloned()
        .collect()
}

/// Opens the store file inside `dir` for a rebuild.
pub fn open_fresh(dir: &Path) -> Result<EmbeddedStore> {
    EmbeddedStore::open(&dir.join("state.redb"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::{self, FeedItem};
    use crate::tables::Tables;
    use crate::task::Task;
    use crate::topology::Topology;

    /// A generated month decided by six tasks, as a dump of its decision log.
    fn month() -> (Vec<DumpedRecord>, BTreeMap<String, CustomerState>) {
        let topology = Topology::embedded().unwrap();
        let tables = Tables::default();
        let mut tasks: BTreeMap<i32, Task> = BTreeMap::new();
        let mut records = Vec::new();
        let mut next: BTreeMap<i32, i64> = BTreeMap::new();
        for item in scenario::generate(80, 5).items {
            let FeedItem::Event(e) = item else { continue };
            let p = e.envelope.customer_id.bytes().map(i32::from).sum::<i32>() % 6;
            let task = tasks.entry(p).or_default();
            for d in task.decide(&e, "x", &topology, &tables) {
                let offset = next.entry(p).or_default();
                *offset += 1;
                let offset = *offset - 1;
                records.push(DumpedRecord {
                    topic: "herald.decisions.v1".into(),
                    partition: p,
                    offset,
                    timestamp: None,
                    key: Some(d.customer_id.clone()),
                    payload: Payload::Decision(d),
                });
            }
        }
        let live = tasks
            .into_values()
            .flat_map(|t| t.into_customers())
            .collect();
        (records, live)
    }

    #[test]
    fn any_parallelism_rebuilds_the_live_states_with_one_digest() {
        let (records, live) = month();
        let one = fold(&records, 1, &|_| {});
        let four = fold(&records, 4, &|_| {});
        let d1 = digest(one.values().flat_map(|f| f.customers.iter()));
        let d4 = digest(four.values().flat_map(|f| f.customers.iter()));
        assert_eq!(d1, d4);
        assert_eq!(d1, digest(live.iter()));
        let rebuilt: BTreeMap<String, CustomerState> =
            one.into_values().flat_map(|f| f.customers).collect();
        assert!(differing(&rebuilt, &live, 5).is_empty());
    }

    #[test]
    fn a_missing_decision_changes_the_digest_and_names_the_customer() {
        let (mut records, live) = month();
        let gone = records
            .iter()
            .position(|r| matches!(&r.payload, Payload::Decision(d) if d.outcome.kind() == "MessageApproved"))
            .unwrap();
        let Payload::Decision(d) = &records[gone].payload else {
            unreachable!()
        };
        let who = d.customer_id.clone();
        records.remove(gone);
        let rebuilt: BTreeMap<String, CustomerState> = fold(&records, 2, &|_| {})
            .into_values()
            .flat_map(|f| f.customers)
            .collect();
        assert_ne!(digest(rebuilt.iter()), digest(live.iter()));
        assert_eq!(differing(&rebuilt, &live, 5), vec![who]);
    }

    #[test]
    fn a_rebuild_refuses_a_store_that_is_not_fresh() {
        let (records, _) = month();
        let folded = fold(&records, 2, &|_| {});
        let dir = tempfile::tempdir().unwrap();
        let store = open_fresh(dir.path()).unwrap();
        write(&store, &folded).unwrap();
        let states = load_states(&store, 6).unwrap();
        assert_eq!(
            digest(states.iter()),
            digest(folded.values().flat_map(|f| f.customers.iter()))
        );
        let err = write(&store, &folded).unwrap_err();
        assert!(err.to_string().contains("fresh"), "{err}");
    }
}
