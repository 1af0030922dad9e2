//! How a customer's state is stored: its JSON compressed by zstd with a dictionary trained on
//! customer states (`schemas/customer_state.zdict`). The field names, enum names and template
//! names every state repeats live in the dictionary, so a stored state carries mostly what is
//! its own: an active customer's 8 kB of JSON is stored in about 1.3 kB. JSON inside keeps
//! `#[serde(default)]` working, so a state saved before a field existed still loads.
//!
//! A dictionary, once states are written with it, is needed to read them for as long as they
//! are stored: a new dictionary gets a new id and is added beside the old one, never in place.

use crate::state::CustomerState;
use anyhow::{anyhow, Context, Result};
use std::cell::RefCell;
use std::sync::LazyLock;
use zstd::bulk::{Compressor, Decompressor};
use zstd::dict::{DecoderDictionary, EncoderDictionary};
use zstd::zstd_safe::CParameter;

/// The dictionary states are written with.
const DICTIONARY: &[u8] = include_bytes!("../../schemas/customer_state.zdict");
/// Fast enough to run on every save; higher levels gain a few percent for several times the CPU.
const LEVEL: i32 = 3;
/// The first bytes of every zstd frame.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

static ENCODER: LazyLock<EncoderDictionary<'static>> =
    LazyLock::new(|| EncoderDictionary::copy(DICTIONARY, LEVEL));
static DECODER: LazyLock<DecoderDictionary<'static>> =
    LazyLock::new(|| DecoderDictionary::copy(DICTIONARY));

thread_local! {
    // A compression context is a few hundred kB to set up: one per thread, reused.
    static COMPRESSOR: RefCell<Option<Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<Decompressor<'static>>> = const { RefCell::new(None) };
}

/// The id a dictionary names itself by in its header (0 for raw content).
fn dictionary_id(dictionary: &[u8]) -> u32 {
    zstd::zstd_safe::get_dict_id_from_dict(dictionary).map_or(0, |id| id.get())
}

/// The stored form of a customer's state.
pub fn encode(state: &CustomerState) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(state)?;
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let compressor = match slot.as_mut() {
            Some(c) => c,
            None => {
                let mut c = Compressor::with_prepared_dictionary(&ENCODER)?;
                // zstd's own checksum repeats what the store and Kafka already check; the size
                // in the header lets a reader allocate once.
                c.set_parameter(CParameter::ChecksumFlag(false))?;
                c.set_parameter(CParameter::ContentSizeFlag(true))?;
                c.set_parameter(CParameter::DictIdFlag(true))?;
                slot.insert(c)
            }
        };
        compressor
            .compress(&json)
            .context("compressing a customer's state")
    })
}

/// Reads a stored state: compressed with the dictionary, or plain JSON as Herald stored it
/// before states were compressed.
pub fn decode(bytes: &[u8]) -> Result<CustomerState> {
    if !bytes.starts_with(&ZSTD_MAGIC) {
        return serde_json::from_slice(bytes).context("a state stored as JSON does not parse");
    }
    let wanted = zstd::zstd_safe::get_dict_id_from_frame(bytes).map_or(0, |id| id.get());
    let ours = dictionary_id(DICTIONARY);
    if wanted != ours {
        return Err(anyhow!(
            "a state compressed with dictionary {wanted}, and this Herald has only dictionary {ours}"
        ));
    }
    let size = zstd::zstd_safe::get_frame_content_size(bytes)
        .ok()
        .flatten()
        .ok_or_else(|| anyhow!("a compressed state without its size"))?;
    let json = DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let decompressor = match slot.as_mut() {
            Some(d) => d,
            None => slot.insert(Decompressor::with_prepared_dictionary(&DECODER)?),
        };
        decompressor
            .decompress(bytes, size as usize)
            .context("decompressing a stored state")
    })?;
    serde_json::from_slice(&json).context("a stored state does not parse")
}

/// Trains a dictionary of `size` bytes on `states`, for `schemas/customer_state.zdict`.
pub fn train_dictionary(states: &[CustomerState], size: usize) -> Result<Vec<u8>> {
    let samples = states
        .iter()
        .map(serde_json::to_vec)
        .collect::<Result<Vec<_>, _>>()?;
    zstd::dict::from_samples(&samples, size).context("training the state dictionary")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Channel, Purpose};
    use crate::state::{ConsentEntry, Profile};

    fn customer() -> CustomerState {
        CustomerState {
            profile: Profile {
                first_name: Some("Ada".into()),
                locale: Some("en_GB".into()),
                time_zone: Some("Europe/London".into()),
                phone_e164: Some("+447700900123".into()),
                email: None,
            },
            consent: vec![ConsentEntry {
                purpose: Purpose::Marketing,
                channel: Channel::Whatsapp,
                granted: true,
                source: "checkout".into(),
                artifact_id: "form-1".into(),
                changed_at: 1_700_000_000_000,
            }],
            seen: [("oms-1".to_string(), 1_700_000_000_000)].into(),
            ..CustomerState::default()
        }
    }

    #[test]
    fn a_state_reads_back_as_it_was_saved_and_smaller_than_its_json() {
        let state = customer();
        let stored = encode(&state).unwrap();
        assert_eq!(decode(&stored).unwrap(), state);
        let json = serde_json::to_vec(&state).unwrap();
        assert!(
            stored.len() * 2 < json.len(),
            "{} bytes stored for {} of JSON",
            stored.len(),
            json.len()
        );
    }

    #[test]
    fn a_state_stored_as_json_by_an_older_herald_still_loads() {
        let state = customer();
        let json = serde_json::to_vec(&state).unwrap();
        assert_eq!(decode(&json).unwrap(), state);
    }

    #[test]
    fn a_state_from_an_unknown_dictionary_is_refused_by_name() {
        let mut c = Compressor::new(LEVEL).unwrap();
        let plain = c.compress(b"{}").unwrap();
        // No dictionary at all is dictionary 0: not ours.
        let e = decode(&plain).unwrap_err().to_string();
        assert!(e.contains("dictionary 0"), "{e}");
        let torn = &encode(&customer()).unwrap()[..12];
        assert!(decode(torn).is_err());
    }
}
