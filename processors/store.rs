//! The state store shell: per-customer snapshots with the decision-log position they reflect.
//! One trait; the embedded backend is redb (ScyllaDB comes behind the same trait).

use anyhow::{Context, Result};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::BTreeMap;
use std::path::Path;

/// A partition's snapshot: each customer's encoded state, and the next decision-log offset
/// that is not yet folded into it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PartitionSnapshot {
    pub customers: BTreeMap<String, Vec<u8>>,
    pub next_offset: i64,
    /// Next input offset per input topic for this partition: how far the snapshot has read.
    pub inputs: BTreeMap<String, i64>,
}

/// Where snapshots live. Writes are idempotent: saving the same state and position twice is
/// the same as saving it once.
pub trait StateStore: Send + Sync {
    /// Loads everything stored for a partition of a namespace ("processors", "dispatch").
    fn load(&self, namespace: &str, partition: i32) -> Result<PartitionSnapshot>;
    /// Saves changed customers and the partition's new position atomically.
    fn save(
        &self,
        namespace: &str,
        partition: i32,
        changed: &[(String, Vec<u8>)],
        next_offset: i64,
        inputs: &BTreeMap<String, i64>,
    ) -> Result<()>;
}

const STATES: TableDefinition<&str, &[u8]> = TableDefinition::new("customer_state");
const POSITIONS: TableDefinition<&str, i64> = TableDefinition::new("partition_position");
const INPUT_POSITIONS: TableDefinition<&str, i64> = TableDefinition::new("input_position");

/// The embedded store, a redb file.
pub struct EmbeddedStore {
    db: Database,
}

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let db = Database::create(path)
            .with_context(|| format!("cannot open state store {}", path.display()))?;
        let w = db.begin_write()?;
        w.open_table(STATES)?;
        w.open_table(POSITIONS)?;
        w.open_table(INPUT_POSITIONS)?;
        w.commit()?;
        Ok(EmbeddedStore { db })
    }
}

fn prefix(namespace: &str, partition: i32) -> String {
    format!("{namespace}/{partition:05}/")
}

impl StateStore for EmbeddedStore {
    fn load(&self, namespace: &str, partition: i32) -> Result<PartitionSnapshot> {
        let r = self.db.begin_read()?;
        let states = r.open_table(STATES)?;
        let positions = r.open_table(POSITIONS)?;
        let p = prefix(namespace, partition);
        let mut customers = BTreeMap::new();
        // '/' + 1 is '0': the range ends just after every key with this prefix.
        let end = format!("{}0", &p[..p.len() - 1]);
        for item in states.range(p.as_str()..end.as_str())? {
            let (k, v) = item?;
            customers.insert(k.value()[p.len()..].to_string(), v.value().to_vec());
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
            customers,
            next_offset,
            inputs,
        })
    }

    fn save(
        &self,
        namespace: &str,
        partition: i32,
        changed: &[(String, Vec<u8>)],
        next_offset: i64,
        inputs: &BTreeMap<String, i64>,
    ) -> Result<()> {
        let p = prefix(namespace, partition);
        let w = self.db.begin_write()?;
        {
            let mut states = w.open_table(STATES)?;
            for (customer, bytes) in changed {
                states.insert(format!("{p}{customer}").as_str(), bytes.as_slice())?;
            }
            let mut positions = w.open_table(POSITIONS)?;
            // A position never moves back: replaying an older save cannot undo a newer one.
            let current = positions.get(p.as_str())?.map(|v| v.value()).unwrap_or(0);
            positions.insert(p.as_str(), current.max(next_offset))?;
            let mut input_positions = w.open_table(INPUT_POSITIONS)?;
            for (topic, next) in inputs {
                let key = format!("{p}{topic}");
                let current = input_positions
                    .get(key.as_str())?
                    .map(|v| v.value())
                    .unwrap_or(0);
                input_positions.insert(key.as_str(), current.max(*next))?;
            }
        }
        w.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_roundtrip_per_partition_and_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(&dir.path().join("state.redb")).unwrap();
        s.save(
            "processors",
            1,
            &[("c-1".into(), b"a".to_vec())],
            10,
            &BTreeMap::from([("oms.events.v1".to_string(), 4)]),
        )
        .unwrap();
        s.save(
            "processors",
            11,
            &[("c-9".into(), b"z".to_vec())],
            3,
            &BTreeMap::new(),
        )
        .unwrap();
        s.save(
            "dispatch",
            1,
            &[("c-1".into(), b"d".to_vec())],
            4,
            &BTreeMap::new(),
        )
        .unwrap();
        let snap = s.load("processors", 1).unwrap();
        assert_eq!(snap.next_offset, 10);
        assert_eq!(snap.customers.len(), 1);
        assert_eq!(snap.customers["c-1"], b"a");
        assert_eq!(snap.inputs["oms.events.v1"], 4);
        assert_eq!(s.load("dispatch", 1).unwrap().customers["c-1"], b"d");
        assert_eq!(
            s.load("processors", 2).unwrap(),
            PartitionSnapshot::default()
        );
    }

    #[test]
    fn saving_twice_is_idempotent_and_positions_never_move_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(&dir.path().join("state.redb")).unwrap();
        let none = BTreeMap::new();
        s.save("processors", 0, &[("c".into(), b"x".to_vec())], 7, &none)
            .unwrap();
        s.save("processors", 0, &[("c".into(), b"x".to_vec())], 7, &none)
            .unwrap();
        s.save("processors", 0, &[], 5, &none).unwrap();
        let snap = s.load("processors", 0).unwrap();
        assert_eq!(snap.next_offset, 7);
        assert_eq!(snap.customers.len(), 1);
    }
}
