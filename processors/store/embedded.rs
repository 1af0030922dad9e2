//! The embedded backend: one redb file, for one machine and for `herald demo`.

use super::contract::{
    CustomerView, PartitionSnapshot, SnapshotWrite, StateStore, StoredState, PROCESSORS,
};
use crate::audit::ConsentEvent;
use anyhow::{Context, Result};
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle,
};
use std::collections::BTreeMap;
use std::path::Path;
use std::path::PathBuf;

/// The states table before each state carried its position.
const LEGACY_STATES: TableDefinition<&str, &[u8]> = TableDefinition::new("customer_state");
const STATES: TableDefinition<&str, (i64, &[u8])> = TableDefinition::new("customer_snapshot");
const POSITIONS: TableDefinition<&str, i64> = TableDefinition::new("partition_position");
const INPUT_POSITIONS: TableDefinition<&str, i64> = TableDefinition::new("input_position");
/// The projection before states were stored once: a copy of each state as JSON.
const LEGACY_VIEW: TableDefinition<&str, (i32, i64, &str)> = TableDefinition::new("customer_view");
/// The query projection: which partition holds each customer's state.
const VIEW: TableDefinition<&str, i32> = TableDefinition::new("customer_partition");
/// Consent rows with the log position of the save that wrote them, so an erasure removes
/// exactly the rows saved before it, however often it is replayed.
const CONSENT: TableDefinition<&str, (i64, &[u8])> = TableDefinition::new("consent_history");
/// Each customer's next timer with the log position of the save that wrote it; a cleared timer
/// stays as `NO_TIMER`, so that a replayed older save cannot bring it back.
const TIMERS: TableDefinition<&str, (i64, i64)> = TableDefinition::new("customer_timer");
const NO_TIMER: i64 = i64::MIN;

/// redb's page cache. Its default, 1 GiB, grew the processors' resident memory by a gigabyte
/// with a million customers; states are read once per cache miss of the processors' own cache,
/// and the operating system's page cache still holds the file.
const CACHE_BYTES: usize = 64 * 1024 * 1024;

/// The embedded store, a redb file.
pub struct EmbeddedStore {
    db: Database,
    path: PathBuf,
}

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .with_context(|| format!("cannot open state store {}", path.display()))?;
        let w = db.begin_write()?;
        // A store written before states carried their own positions: its positions cannot be
        // trusted without them, and the store is a cache of the log, so it starts over and the
        // next restore replays the log from the beginning.
        if w.delete_table(LEGACY_STATES)? {
            w.delete_table(POSITIONS)?;
            w.delete_table(INPUT_POSITIONS)?;
            tracing::warn!(path = %path.display(), "state store from an older format emptied; state is restored from the log");
        }
        // A store from before states were stored once keeps where each customer is, and drops
        // the JSON copies.
        if w.list_tables()?.any(|t| t.name() == LEGACY_VIEW.name()) {
            let legacy: Vec<(String, i32)> = w
                .open_table(LEGACY_VIEW)?
                .iter()?
                .map(|row| row.map(|(k, v)| (k.value().to_string(), v.value().0)))
                .collect::<Result<_, _>>()?;
            w.delete_table(LEGACY_VIEW)?;
            let mut view = w.open_table(VIEW)?;
            for (customer, partition) in &legacy {
                view.insert(customer.as_str(), *partition)?;
            }
        }
        w.open_table(STATES)?;
        w.open_table(POSITIONS)?;
        w.open_table(INPUT_POSITIONS)?;
        w.open_table(VIEW)?;
        w.open_table(CONSENT)?;
        w.open_table(TIMERS)?;
        w.commit()?;
        Ok(EmbeddedStore {
            db,
            path: path.to_path_buf(),
        })
    }
}

fn prefix(namespace: &str, partition: i32) -> String {
    format!("{namespace}/{partition:05}/")
}

/// The key range of everything under `p` (which ends in '/'; '/' + 1 is '0').
fn end_of(p: &str) -> String {
    format!("{}0", &p[..p.len() - 1])
}

/// Consent rows sort by customer, then time, then decision: the history reads oldest first.
fn consent_key(customer: &str, c: &ConsentEvent) -> String {
    format!("{customer}\u{1}{:020}\u{1}{}", c.at, c.decision_id)
}

/// The key range of one customer's consent rows.
fn consent_range(customer: &str) -> (String, String) {
    (format!("{customer}\u{1}"), format!("{customer}\u{2}"))
}

/// The state stored under `key`, if any.
fn stored_state(
    states: &redb::ReadOnlyTable<&str, (i64, &[u8])>,
    key: &str,
) -> Result<Option<StoredState>> {
    Ok(states.get(key)?.map(|v| {
        let (next_offset, bytes) = v.value();
        StoredState {
            bytes: bytes.to_vec(),
            next_offset,
        }
    }))
}

/// A partition's positions and timers, as the read transaction `r` sees them.
fn positions_in(
    r: &redb::ReadTransaction,
    namespace: &str,
    partition: i32,
) -> Result<PartitionSnapshot> {
    let positions = r.open_table(POSITIONS)?;
    let p = prefix(namespace, partition);
    let end = end_of(&p);
    let mut timers = BTreeMap::new();
    for item in r.open_table(TIMERS)?.range(p.as_str()..end.as_str())? {
        let (k, v) = item?;
        let (_, due) = v.value();
        if due != NO_TIMER {
            timers.insert(k.value()[p.len()..].to_string(), due);
        }
    }
    let next_offset = positions.get(p.as_str())?.map(|v| v.value()).unwrap_or(0);
    let mut inputs = BTreeMap::new();
    for item in r
        .open_table(INPUT_POSITIONS)?
        .range(p.as_str()..end.as_str())?
    {
        let (k, v) = item?;
        inputs.insert(k.value()[p.len()..].to_string(), v.value());
    }
    Ok(PartitionSnapshot {
        customers: BTreeMap::new(),
        next_offset,
        inputs,
        timers,
    })
}

impl StateStore for EmbeddedStore {
    fn load(&self, namespace: &str, partition: i32) -> Result<PartitionSnapshot> {
        let r = self.db.begin_read()?;
        let states = r.open_table(STATES)?;
        let p = prefix(namespace, partition);
        let end = end_of(&p);
        let mut customers = BTreeMap::new();
        for item in states.range(p.as_str()..end.as_str())? {
            let (k, v) = item?;
            let (next_offset, bytes) = v.value();
            customers.insert(
                k.value()[p.len()..].to_string(),
                StoredState {
                    bytes: bytes.to_vec(),
                    next_offset,
                },
            );
        }
        // Positions from the same transaction as the states: positions saved after them
        // would skip decisions the states do not hold.
        Ok(PartitionSnapshot {
            customers,
            ..positions_in(&r, namespace, partition)?
        })
    }

    fn load_customer(
        &self,
        namespace: &str,
        partition: i32,
        customer: &str,
    ) -> Result<Option<StoredState>> {
        let r = self.db.begin_read()?;
        let key = format!("{}{customer}", prefix(namespace, partition));
        stored_state(&r.open_table(STATES)?, &key)
    }

    fn load_customers(
        &self,
        namespace: &str,
        partition: i32,
        customers: &[String],
    ) -> Result<BTreeMap<String, StoredState>> {
        let r = self.db.begin_read()?;
        let states = r.open_table(STATES)?;
        let p = prefix(namespace, partition);
        let mut found = BTreeMap::new();
        for c in customers {
            if let Some(s) = stored_state(&states, &format!("{p}{c}"))? {
                found.insert(c.clone(), s);
            }
        }
        Ok(found)
    }

    fn load_positions(&self, namespace: &str, partition: i32) -> Result<PartitionSnapshot> {
        positions_in(&self.db.begin_read()?, namespace, partition)
    }

    fn save(&self, namespace: &str, partition: i32, write: &SnapshotWrite) -> Result<()> {
        let p = prefix(namespace, partition);
        let at = write.next_offset;
        let w = self.db.begin_write()?;
        {
            let mut states = w.open_table(STATES)?;
            let mut view = w.open_table(VIEW)?;
            for (customer, bytes) in &write.changed {
                let key = format!("{p}{customer}");
                // As in ScyllaDB, where the write timestamp is the log position: an older
                // position never overwrites a newer one.
                let newer = states.get(key.as_str())?.map(|v| v.value().0);
                if newer.is_some_and(|n| n > at) {
                    continue;
                }
                states.insert(key.as_str(), (at, bytes.as_slice()))?;
                if namespace == PROCESSORS {
                    view.insert(customer.as_str(), partition)?;
                }
            }
            let mut timers = w.open_table(TIMERS)?;
            for (customer, due) in &write.timers {
                let key = format!("{p}{customer}");
                let newer = timers.get(key.as_str())?.map(|v| v.value().0);
                if newer.is_some_and(|n| n > at) {
                    continue;
                }
                timers.insert(key.as_str(), (at, due.unwrap_or(NO_TIMER)))?;
            }
            let mut positions = w.open_table(POSITIONS)?;
            let current = positions.get(p.as_str())?.map(|v| v.value()).unwrap_or(0);
            positions.insert(p.as_str(), current.max(at))?;
            let mut input_positions = w.open_table(INPUT_POSITIONS)?;
            for (topic, next) in &write.inputs {
                let key = format!("{p}{topic}");
                let current = input_positions
                    .get(key.as_str())?
                    .map(|v| v.value())
                    .unwrap_or(0);
                input_positions.insert(key.as_str(), current.max(*next))?;
            }
            if namespace == PROCESSORS {
                let mut consent = w.open_table(CONSENT)?;
                for customer in &write.erased {
                    let (from, to) = consent_range(customer);
                    let older: Vec<String> = consent
                        .range(from.as_str()..to.as_str())?
                        .filter_map(|item| item.ok())
                        .filter(|(_, v)| v.value().0 < at)
                        .map(|(k, _)| k.value().to_string())
                        .collect();
                    for key in older {
                        consent.remove(key.as_str())?;
                    }
                }
                for (customer, c) in &write.consent {
                    consent.insert(
                        consent_key(customer, c).as_str(),
                        (at, serde_json::to_vec(c)?.as_slice()),
                    )?;
                }
            }
        }
        w.commit()?;
        Ok(())
    }

    fn customer(&self, customer_id: &str) -> Result<Option<CustomerView>> {
        let r = self.db.begin_read()?;
        let Some(partition) = r.open_table(VIEW)?.get(customer_id)?.map(|v| v.value()) else {
            return Ok(None);
        };
        let key = format!("{}{customer_id}", prefix(PROCESSORS, partition));
        Ok(
            stored_state(&r.open_table(STATES)?, &key)?.map(|s| CustomerView {
                customer_id: customer_id.to_string(),
                partition,
                next_offset: s.next_offset,
                state: s.bytes,
            }),
        )
    }

    fn consent_history(&self, customer_id: &str) -> Result<Vec<ConsentEvent>> {
        let r = self.db.begin_read()?;
        let table = r.open_table(CONSENT)?;
        let (from, to) = consent_range(customer_id);
        let mut out = Vec::new();
        for item in table.range(from.as_str()..to.as_str())? {
            let (_, v) = item?;
            out.push(
                serde_json::from_slice(v.value().1)
                    .with_context(|| format!("consent history of {customer_id} is unreadable"))?,
            );
        }
        Ok(out)
    }

    fn is_empty(&self) -> Result<bool> {
        let r = self.db.begin_read()?;
        Ok(r.open_table(STATES)?.is_empty()? && r.open_table(POSITIONS)?.is_empty()?)
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_from_before_per_customer_positions_starts_over_instead_of_trusting_its_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let db = Database::create(&path).unwrap();
            let w = db.begin_write().unwrap();
            w.open_table(LEGACY_STATES)
                .unwrap()
                .insert("processors/00000/c-1", b"{}".as_slice())
                .unwrap();
            w.open_table(POSITIONS)
                .unwrap()
                .insert("processors/00000/", 500)
                .unwrap();
            w.commit().unwrap();
        }
        let s = EmbeddedStore::open(&path).unwrap();
        assert_eq!(s.load(PROCESSORS, 0).unwrap(), PartitionSnapshot::default());
        assert!(s.is_empty().unwrap());
    }

    #[test]
    fn a_store_with_json_copies_of_states_still_finds_each_customer_and_drops_the_copies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let db = Database::create(&path).unwrap();
            let w = db.begin_write().unwrap();
            w.open_table(STATES)
                .unwrap()
                .insert("processors/00003/c-1", (7, b"{}".as_slice()))
                .unwrap();
            w.open_table(LEGACY_VIEW)
                .unwrap()
                .insert("c-1", (3, 7, "{}"))
                .unwrap();
            w.commit().unwrap();
        }
        let s = EmbeddedStore::open(&path).unwrap();
        let view = s.customer("c-1").unwrap().expect("still found");
        assert_eq!((view.partition, view.next_offset), (3, 7));
        assert_eq!(view.state, b"{}");
        let r = s.db.begin_read().unwrap();
        assert!(r.open_table(LEGACY_VIEW).is_err(), "the JSON copies stay");
    }

    #[test]
    fn a_restore_folds_only_what_each_customer_has_not_seen() {
        let snap = PartitionSnapshot {
            customers: BTreeMap::from([(
                "c-1".to_string(),
                StoredState {
                    bytes: vec![],
                    next_offset: 10,
                },
            )]),
            next_offset: 4,
            ..PartitionSnapshot::default()
        };
        assert!(snap.holds("c-1", 9));
        assert!(!snap.holds("c-1", 10));
        assert!(!snap.holds("c-2", 5));
    }
}
