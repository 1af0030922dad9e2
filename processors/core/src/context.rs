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
    hex(&h.finalize()[..16])
}

/// Lowercase hex of `bytes`, in one allocation: ids and hash-chain links are made on every
/// decision, and a formatted string per byte showed as a third of the core's time.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0x0f) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_two_lowercase_digits_a_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(deterministic_id(&["a"]).len(), 32);
    }
}
