//! Which store an address names, and opening it: the one place that knows every backend.

use super::contract::StateStore;
use super::embedded::EmbeddedStore;
use super::scylla::{ScyllaConfig, ScyllaStore};
use anyhow::{bail, Result};
use std::path::PathBuf;
use std::sync::Arc;

/// Where the state store is: a redb file, or a ScyllaDB keyspace
/// (`scylla://host:9042[,host:9042]/keyspace[?option=value&...]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreAddress {
    Embedded(PathBuf),
    Scylla(ScyllaConfig),
}

impl StoreAddress {
    /// Parses `--store`; errors name the part that is wrong.
    pub fn parse(s: &str) -> Result<StoreAddress> {
        if let Some(rest) = s.strip_prefix("scylla://") {
            return Ok(StoreAddress::Scylla(ScyllaConfig::parse(rest)?));
        }
        if s.contains("://") {
            bail!("--store: '{s}' is neither a file path nor a scylla:// address");
        }
        if s.is_empty() {
            bail!("--store: empty");
        }
        Ok(StoreAddress::Embedded(PathBuf::from(s)))
    }

    /// Fails, naming `flag`, when an embedded store's file does not exist: reading a store that
    /// is not there must not create an empty one.
    pub fn ensure_exists(&self, flag: &str) -> Result<()> {
        if let StoreAddress::Embedded(path) = self {
            if !path.is_file() {
                bail!("{flag}: {} is not a store file", path.display());
            }
        }
        Ok(())
    }

    /// Opens the store; ScyllaDB creates its keyspace and tables if missing and prepares every
    /// statement, so a wrong address or schema fails here and not mid-stream.
    pub fn open(&self, rt: &tokio::runtime::Handle) -> Result<Arc<dyn StateStore>> {
        Ok(match self {
            StoreAddress::Embedded(path) => Arc::new(EmbeddedStore::open(path)?),
            StoreAddress::Scylla(config) => {
                Arc::new(ScyllaStore::connect(config.clone(), rt.clone())?)
            }
        })
    }
}

impl std::str::FromStr for StoreAddress {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        StoreAddress::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_address_is_a_path_or_a_scylla_keyspace_and_bad_ones_are_named() {
        assert_eq!(
            StoreAddress::parse("/var/lib/herald/state.redb").unwrap(),
            StoreAddress::Embedded(PathBuf::from("/var/lib/herald/state.redb"))
        );
        assert!(matches!(
            StoreAddress::parse("scylla://10.0.0.1:9042/herald").unwrap(),
            StoreAddress::Scylla(_)
        ));
        let e = StoreAddress::parse("redis://x").unwrap_err().to_string();
        assert!(e.contains("--store"), "{e}");
    }
}
