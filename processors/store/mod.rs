//! The state store shell. One contract (`contract`), two backends: the embedded store (redb)
//! for one machine and ScyllaDB or Cassandra (`scylla`) for production, and the address that
//! names and opens one (`address`). Both backends give the same answers;
//! `tests/store_contract.rs` holds them to it.

pub mod address;
pub mod contract;
pub mod embedded;
pub mod scylla;
pub mod state_encoding;

pub use address::StoreAddress;
pub use contract::*;
pub use embedded::EmbeddedStore;
