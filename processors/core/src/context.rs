//! What every rule is given besides state and input: stream time, configuration and where the
//! input sits in the log; and the ids rules derive from them. Imports nothing above `events`.

use crate::events::Millis;
use crate::tables::Tables;
use crate::topology::Topology;
use sha2::{Digest, Sha256};

/// What the core needs besides state and input: stream time and configuration.
#[derive(Debug, Clone, Copy)]
pub struct Ctx<'a> {
    /// Stream time of the task (the largest occurred-at it has seen), never the wall clock.
    pub now: Millis,
    pub topology: &'a Topology,
    /// Stock and template status, read whole by every task.
    pub tables: &'a Tables,
    /// Where the input record sits in the log (`topic/partition/offset`): a redelivered record
    /// gets the same decision ids, a second delivery of the same fact gets new ones.
    pub input_ref: &'a str,
}

/// A short, stable id derived from its parts (128 bits of SHA-256, hex).
pub fn deterministic_id(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0x1f]);
    }
    let digest = h.finalize();
    // One allocation: every decision takes an id, and a formatted string per byte showed as a
    // third of the core's time.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(32);
    for b in &digest[..16] {
        id.push(HEX[(b >> 4) as usize] as char);
        id.push(HEX[(b & 0x0f) as usize] as char);
    }
    id
}
