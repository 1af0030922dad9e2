//! What a state store is: per-customer snapshots with the log position each reflects, the
//! positions each task has read to, and the query projection (a customer's state, their consent
//! history). Every backend implements `StateStore`; `tests/store_contract.rs` holds them to it.

use crate::audit::ConsentEvent;
use anyhow::Result;
use std::collections::BTreeMap;

/// The processors' namespace: customer state, projected for queries.
pub const PROCESSORS: &str = "processors";
/// Dispatch's namespace: what was sent, not projected.
pub const DISPATCH: &str = "dispatch";

/// A customer's encoded state and the log position it reflects: every decision before
/// `next_offset` is folded into it, none after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredState {
    pub bytes: Vec<u8>,
    pub next_offset: i64,
}

/// A partition's snapshot: each customer's state, the partition's next log offset that is not
/// yet saved, how far it has read each input topic, and when each customer's next timer is due.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PartitionSnapshot {
    /// Empty from `load_positions`, which leaves customers to `load_customer`.
    pub customers: BTreeMap<String, StoredState>,
    pub next_offset: i64,
    /// Next input offset per input topic for this partition: how far the snapshot has read.
    pub inputs: BTreeMap<String, i64>,
    /// The next timer of each customer who has one, as saved with their state.
    pub timers: BTreeMap<String, i64>,
}

impl PartitionSnapshot {
    /// Whether the decision at `offset` for `customer` is already folded into the snapshot, so a
    /// restore must not fold it again. Exact per customer, so a save that stopped half-way
    /// (states written, position not) still restores to the right state.
    pub fn holds(&self, customer: &str, offset: i64) -> bool {
        self.customers
            .get(customer)
            .is_some_and(|s| offset < s.next_offset)
    }
}

/// One save of a partition: the customers changed since the last one, the log position they
/// all reflect, the input positions read, and the consent changes decided (for the projection).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SnapshotWrite {
    pub changed: Vec<(String, Vec<u8>)>,
    pub next_offset: i64,
    pub inputs: BTreeMap<String, i64>,
    pub consent: Vec<(String, ConsentEvent)>,
    /// Customers whose erasure was decided: their consent history saved before this write goes.
    pub erased: Vec<String>,
    /// The next timer of customers in `changed`: `None` clears one they had.
    pub timers: Vec<(String, Option<i64>)>,
}

/// A customer's row in the query projection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerView {
    pub customer_id: String,
    pub partition: i32,
    /// The decision-log offset the state reflects.
    pub next_offset: i64,
    /// The customer's state as stored (`state_encoding::decode` reads it).
    pub state: Vec<u8>,
}

/// Where snapshots and the projection live. Every write is idempotent and ordered by log
/// position: saving the same thing twice is the same as once, and a save of an older position
/// never undoes a newer one (a customer's state, a partition's offset, an input position).
pub trait StateStore: Send + Sync {
    /// Loads everything stored for a partition of a namespace (`PROCESSORS`, `DISPATCH`).
    fn load(&self, namespace: &str, partition: i32) -> Result<PartitionSnapshot>;
    /// Loads a partition's positions and timers, without any customer's state.
    fn load_positions(&self, namespace: &str, partition: i32) -> Result<PartitionSnapshot>;
    /// Loads one customer's stored state, if any.
    fn load_customer(
        &self,
        namespace: &str,
        partition: i32,
        customer: &str,
    ) -> Result<Option<StoredState>>;
    /// Loads the stored states of several customers of one partition, those that have one. A
    /// backend overrides it to read them in one transaction or concurrently.
    fn load_customers(
        &self,
        namespace: &str,
        partition: i32,
        customers: &[String],
    ) -> Result<BTreeMap<String, StoredState>> {
        let mut found = BTreeMap::new();
        for c in customers {
            if let Some(s) = self.load_customer(namespace, partition, c)? {
                found.insert(c.clone(), s);
            }
        }
        Ok(found)
    }
    /// Saves a partition's changes; in `PROCESSORS` also the projection.
    fn save(&self, namespace: &str, partition: i32, write: &SnapshotWrite) -> Result<()>;
    /// A customer's projected state, if any was saved.
    fn customer(&self, customer_id: &str) -> Result<Option<CustomerView>>;
    /// A customer's consent changes, oldest first.
    fn consent_history(&self, customer_id: &str) -> Result<Vec<ConsentEvent>>;
    /// Whether nothing at all is stored yet (a rebuild writes only into an empty store).
    fn is_empty(&self) -> Result<bool>;
    /// Where the store is, for messages.
    fn describe(&self) -> String;
}
