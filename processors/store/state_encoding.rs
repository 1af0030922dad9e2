//! How a customer's state is stored: its compact JSON compressed by zstd with a dictionary
//! trained on customer states (`schemas/customer_state_compact.zdict`). The field names, enum
//! names and template names every state repeats live in the dictionary, so a stored state
//! carries mostly what is its own: an active customer's 8 kB of JSON is stored in about a
//! kilobyte. JSON inside keeps `#[serde(default)]` working, so a state saved before a field
//! existed still loads.
//!
//! The compact form leaves out what a state repeats of itself (`Folded`): a recent message's
//! id (its key), recipient (the profile's address) and consent (the current one), the recent
//! ids in `approved`, the subjects recent messages announce, and each identity whose fact is
//! still in the dedupe window (its event and time are that entry's).
//! Random ids and timestamps are most of what is left, and nothing compresses them; each
//! repeat left in costs a few bytes of back-reference.
//!
//! A dictionary, once states are written with it, is needed to read them for as long as they
//! are stored: a new dictionary gets a new id and is added beside the old ones, never in
//! place. The dictionary a state names also says its form: `customer_state.zdict` states are
//! the whole JSON, `customer_state_compact.zdict` states the compact form.

use crate::events::{
    Channel, Delivery, MarketingStopped, MessageApproved, MessageDeferred, MessageStatus, Millis,
    Purpose,
};
use crate::sorted_map::SortedMap;
use crate::state::{
    AcceptedFact, CartFacts, ConsentEntry, CustomerState, HeldShipment, JourneyInstance,
    OrderFacts, Profile, RecentSend, SubscriptionFacts, ANNOUNCES,
};
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, LazyLock};
use zstd::bulk::{Compressor, Decompressor};
use zstd::dict::{DecoderDictionary, EncoderDictionary};
use zstd::zstd_safe::CParameter;

/// The dictionary states are written with, in the compact form.
const DICTIONARY: &[u8] = include_bytes!("../../schemas/customer_state_compact.zdict");
/// The dictionary of states stored whole, before the compact form; read, never written.
const WHOLE_FORM_DICTIONARY: &[u8] = include_bytes!("../../schemas/customer_state.zdict");
/// Fast enough to run on every save; higher levels gain a few percent for several times the CPU.
const LEVEL: i32 = 3;
/// The first bytes of every zstd frame.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

static ENCODER: LazyLock<EncoderDictionary<'static>> =
    LazyLock::new(|| EncoderDictionary::copy(DICTIONARY, LEVEL));
static DECODER: LazyLock<DecoderDictionary<'static>> =
    LazyLock::new(|| DecoderDictionary::copy(DICTIONARY));
static WHOLE_FORM_DECODER: LazyLock<DecoderDictionary<'static>> =
    LazyLock::new(|| DecoderDictionary::copy(WHOLE_FORM_DICTIONARY));

thread_local! {
    // A compression context is a few hundred kB to set up: one per thread, reused.
    static COMPRESSOR: RefCell<Option<Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<Decompressor<'static>>> = const { RefCell::new(None) };
    static WHOLE_FORM_DECOMPRESSOR: RefCell<Option<Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// What the compact form left out of its state, and the exceptions that make leaving it out
/// lossless for any state, not only the ones the fold makes.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
struct Folded {
    /// For each `seen` event in key order, the identity it was accepted under, whose
    /// `identities` entry was left out; trailing nulls are trimmed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    seen_identities: Vec<Option<String>>,
    /// Recent messages whose id really is empty: any other empty id is its key's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    blank_message_ids: Vec<String>,
    /// Recent messages missing from `approved`: the other recent ids are left out of it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    unapproved_recent: Vec<String>,
    /// Subjects a recent message announces that are missing from `announced`: the others are
    /// left out of it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    unannounced_recent: Vec<String>,
    /// Recent messages whose recipient really is empty: any other empty recipient is the
    /// profile's address on the message's channel.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    blank_recipients: Vec<String>,
    /// Recent messages that really name no consent: any other is the customer's current
    /// consent for the message's purpose and channel.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    blank_consents: Vec<String>,
}

#[derive(Serialize)]
struct CompactOut<'a> {
    state: CompactState<'a>,
    #[serde(skip_serializing_if = "is_nothing_folded")]
    folded: Folded,
}

fn is_nothing_folded(f: &Folded) -> bool {
    *f == Folded::default()
}

/// A state as the compact form writes it: its own fields, borrowed, in `CustomerState`'s
/// shape, so that it reads back as one; the repeats it leaves out are missing from the
/// collections or blank in the messages.
#[derive(Serialize)]
struct CompactState<'a> {
    seen: &'a SortedMap<String, Millis>,
    identities: BTreeMap<&'a String, &'a AcceptedFact>,
    consent: &'a [ConsentEntry],
    profile: &'a Profile,
    orders: &'a SortedMap<String, OrderFacts>,
    held: &'a SortedMap<String, HeldShipment>,
    approved: BTreeSet<&'a String>,
    announced: BTreeSet<&'a String>,
    deferred: &'a SortedMap<String, MessageDeferred>,
    erased: bool,
    carts: &'a SortedMap<String, CartFacts>,
    subscriptions: &'a SortedMap<String, SubscriptionFacts>,
    last_inbound_at: Option<Millis>,
    recent: BTreeMap<&'a String, CompactRecent<'a>>,
    journeys: &'a SortedMap<String, JourneyInstance>,
    consent_chain_head: &'a Option<String>,
    erased_at: Option<Millis>,
    marketing_turned_off: &'a Option<MarketingStopped>,
    marketing_paused: &'a Option<MarketingStopped>,
}

/// A `RecentSend` as the compact form writes it.
#[derive(Serialize)]
struct CompactRecent<'a> {
    approved_at: Millis,
    message: CompactMessage<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<MessageStatus>,
}

/// A `MessageApproved` as the compact form writes it: its id, recipient and consent blank
/// where they repeat the key, the profile and the consent.
#[derive(Serialize)]
struct CompactMessage<'a> {
    message_id: &'a str,
    trigger_event_id: &'a str,
    template_name: &'a str,
    template_version: i32,
    locale: &'a str,
    purpose: Purpose,
    channel: Channel,
    recipient: &'a str,
    variables: &'a SortedMap<String, String>,
    consent_artifact_id: &'a str,
    consent_granted_at: Millis,
    category: &'a str,
    delivery: &'a Delivery,
    journey: &'a Option<String>,
    relied_on: &'a SortedMap<String, String>,
}

#[derive(Deserialize)]
struct CompactIn {
    state: CustomerState,
    #[serde(default)]
    folded: Folded,
}

/// The subject each recent message announces.
fn recent_announces(state: &CustomerState) -> impl Iterator<Item = &String> {
    state
        .recent
        .values()
        .filter_map(|r| r.message.relied_on.get(ANNOUNCES))
}

/// The profile's address on a channel.
fn address_on(profile: &Profile, channel: Channel) -> Option<&String> {
    match channel {
        Channel::Whatsapp | Channel::Sms => profile.phone_e164.as_ref(),
        Channel::Email => profile.email.as_ref(),
    }
}

/// The state with its repeats of itself left out, and what was left out. Borrows rather than
/// copies: a checkpoint encodes every changed customer, and copying a state costs as much as
/// compressing it.
fn fold(whole: &CustomerState) -> (CompactState<'_>, Folded) {
    // Naming every field, so that a field added to the state cannot be forgotten here.
    let CustomerState {
        seen,
        identities,
        consent,
        profile,
        orders,
        held,
        approved,
        announced,
        deferred,
        erased,
        carts,
        subscriptions,
        last_inbound_at,
        recent,
        journeys,
        consent_chain_head,
        erased_at,
        marketing_turned_off,
        marketing_paused,
    } = whole;
    let mut folded = Folded::default();

    // An identity accepted with a fact still in the window repeats that entry's event and time.
    let mut identity_of: HashMap<&str, &String> = HashMap::new();
    for (key, fact) in identities {
        if seen.get(&fact.event_id) == Some(&fact.first_seen_at) {
            identity_of.entry(fact.event_id.as_str()).or_insert(key);
        }
    }
    let mut kept_identities: BTreeMap<&String, &AcceptedFact> = identities.iter().collect();
    if !identity_of.is_empty() {
        folded.seen_identities = seen
            .keys()
            .map(|event| {
                identity_of.get(event.as_str()).map(|key| {
                    kept_identities.remove(*key);
                    (*key).clone()
                })
            })
            .collect();
        while folded.seen_identities.last() == Some(&None) {
            folded.seen_identities.pop();
        }
    }

    let mut kept_approved: BTreeSet<&String> = approved.iter().collect();
    let mut compact_recent = BTreeMap::new();
    for (id, send) in recent {
        let RecentSend {
            approved_at,
            message,
            status,
        } = send;
        let MessageApproved {
            message_id,
            trigger_event_id,
            template_name,
            template_version,
            locale,
            purpose,
            channel,
            recipient,
            variables,
            consent_artifact_id,
            consent_granted_at,
            category,
            delivery,
            journey,
            relied_on,
        } = message.as_ref();
        if message_id.is_empty() && message_id != id {
            folded.blank_message_ids.push(id.clone());
        }
        if !kept_approved.remove(id) {
            folded.unapproved_recent.push(id.clone());
        }
        let recipient_is_the_profiles = address_on(profile, *channel) == Some(recipient);
        if recipient.is_empty() && !recipient_is_the_profiles {
            folded.blank_recipients.push(id.clone());
        }
        let consent_is_current = whole.consent_for(*purpose, *channel).is_some_and(|c| {
            c.artifact_id == *consent_artifact_id && c.changed_at == *consent_granted_at
        });
        if consent_artifact_id.is_empty() && *consent_granted_at == 0 && !consent_is_current {
            folded.blank_consents.push(id.clone());
        }
        let (consent_artifact_id, consent_granted_at) = if consent_is_current {
            ("", 0)
        } else {
            (consent_artifact_id.as_str(), *consent_granted_at)
        };
        let message = CompactMessage {
            message_id: if message_id == id { "" } else { message_id },
            trigger_event_id,
            template_name,
            template_version: *template_version,
            locale,
            purpose: *purpose,
            channel: *channel,
            recipient: if recipient_is_the_profiles {
                ""
            } else {
                recipient
            },
            variables,
            consent_artifact_id,
            consent_granted_at,
            category,
            delivery,
            journey,
            relied_on,
        };
        let send = CompactRecent {
            approved_at: *approved_at,
            message,
            status: *status,
        };
        compact_recent.insert(id, send);
    }

    let mut kept_announced: BTreeSet<&String> = announced.iter().collect();
    let mut announced_recently = BTreeSet::new();
    for subject in recent_announces(whole) {
        if announced_recently.insert(subject) && !kept_announced.remove(subject) {
            folded.unannounced_recent.push(subject.clone());
        }
    }
    let state = CompactState {
        seen,
        identities: kept_identities,
        consent,
        profile,
        orders,
        held,
        approved: kept_approved,
        announced: kept_announced,
        deferred,
        erased: *erased,
        carts,
        subscriptions,
        last_inbound_at: *last_inbound_at,
        recent: compact_recent,
        journeys,
        consent_chain_head,
        erased_at: *erased_at,
        marketing_turned_off,
        marketing_paused,
    };
    (state, folded)
}

/// The whole state from its compact form.
fn unfold(mut state: CustomerState, folded: Folded) -> Result<CustomerState> {
    if folded.seen_identities.len() > state.seen.len() {
        bail!(
            "a stored state names identities for {} events of a dedupe window of {}",
            folded.seen_identities.len(),
            state.seen.len()
        );
    }
    for ((event, at), key) in state.seen.iter().zip(folded.seen_identities) {
        if let Some(key) = key {
            state.identities.insert(
                key,
                AcceptedFact {
                    event_id: event.clone(),
                    first_seen_at: *at,
                },
            );
        }
    }
    for (id, recent) in state.recent.iter_mut() {
        if recent.message.message_id.is_empty() && !folded.blank_message_ids.contains(id) {
            Arc::make_mut(&mut recent.message).message_id = id.clone();
        }
        if !folded.unapproved_recent.contains(id) {
            state.approved.insert(id.clone());
        }
        // Unshared while the state is decoded: no copy is made.
        let message = Arc::make_mut(&mut recent.message);
        if message.recipient.is_empty() && !folded.blank_recipients.contains(id) {
            let address = address_on(&state.profile, message.channel);
            message.recipient = address.cloned().ok_or_else(|| {
                anyhow!("a stored state's message {id} leaves out an address its profile lacks")
            })?;
        }
        if message.consent_artifact_id.is_empty()
            && message.consent_granted_at == 0
            && !folded.blank_consents.contains(id)
        {
            // `CustomerState::consent_for` would borrow the whole state while this message is
            // borrowed from it.
            let consent = state
                .consent
                .iter()
                .find(|c| c.purpose == message.purpose && c.channel == message.channel)
                .ok_or_else(|| {
                    anyhow!("a stored state's message {id} leaves out a consent it lacks")
                })?;
            message.consent_artifact_id = consent.artifact_id.clone();
            message.consent_granted_at = consent.changed_at;
        }
    }
    let announces: Vec<String> = recent_announces(&state)
        .filter(|s| !folded.unannounced_recent.contains(s))
        .cloned()
        .collect();
    state.announced.extend(announces);
    Ok(state)
}

/// The id a dictionary names itself by in its header (0 for raw content).
fn dictionary_id(dictionary: &[u8]) -> u32 {
    zstd::zstd_safe::get_dict_id_from_dict(dictionary).map_or(0, |id| id.get())
}

/// The compact form's JSON, which the dictionary was trained on.
fn compact_json(state: &CustomerState) -> Result<Vec<u8>> {
    let (state, folded) = fold(state);
    Ok(serde_json::to_vec(&CompactOut { state, folded })?)
}

/// The stored form of a customer's state.
pub fn encode(state: &CustomerState) -> Result<Vec<u8>> {
    let json = compact_json(state)?;
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

/// Decompresses a frame with one of the dictionaries.
fn decompress(
    bytes: &[u8],
    slot: &'static std::thread::LocalKey<RefCell<Option<Decompressor<'static>>>>,
    dictionary: &'static DecoderDictionary<'static>,
) -> Result<Vec<u8>> {
    let size = zstd::zstd_safe::get_frame_content_size(bytes)
        .ok()
        .flatten()
        .ok_or_else(|| anyhow!("a compressed state without its size"))?;
    slot.with(|cell| {
        let mut slot = cell.borrow_mut();
        let decompressor = match slot.as_mut() {
            Some(d) => d,
            None => slot.insert(Decompressor::with_prepared_dictionary(dictionary)?),
        };
        decompressor
            .decompress(bytes, size as usize)
            .context("decompressing a stored state")
    })
}

/// Reads a stored state: the compact form, the whole form an earlier Herald compressed, or
/// plain JSON as Herald stored it before states were compressed.
pub fn decode(bytes: &[u8]) -> Result<CustomerState> {
    if !bytes.starts_with(&ZSTD_MAGIC) {
        return serde_json::from_slice(bytes).context("a state stored as JSON does not parse");
    }
    let wanted = zstd::zstd_safe::get_dict_id_from_frame(bytes).map_or(0, |id| id.get());
    if wanted == dictionary_id(DICTIONARY) {
        let json = decompress(bytes, &DECOMPRESSOR, &DECODER)?;
        let compact: CompactIn =
            serde_json::from_slice(&json).context("a stored state does not parse")?;
        unfold(compact.state, compact.folded)
    } else if wanted == dictionary_id(WHOLE_FORM_DICTIONARY) {
        let json = decompress(bytes, &WHOLE_FORM_DECOMPRESSOR, &WHOLE_FORM_DECODER)?;
        serde_json::from_slice(&json).context("a stored state does not parse")
    } else {
        Err(anyhow!(
            "a state compressed with dictionary {wanted}, and this Herald has only dictionaries {} and {}",
            dictionary_id(DICTIONARY),
            dictionary_id(WHOLE_FORM_DICTIONARY)
        ))
    }
}

/// Trains a dictionary of `size` bytes on `states` in the compact form, for
/// `schemas/customer_state_compact.zdict`.
pub fn train_dictionary(states: &[CustomerState], size: usize) -> Result<Vec<u8>> {
    let samples = states
        .iter()
        .map(compact_json)
        .collect::<Result<Vec<_>>>()?;
    zstd::dict::from_samples(&samples, size).context("training the state dictionary")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Channel, Delivery, MessageApproved, Purpose};
    use crate::state::{ConsentEntry, RecentSend};
    use proptest::prelude::*;

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

    fn approved(id: &str, announces: Option<&str>) -> RecentSend {
        RecentSend {
            approved_at: 1_700_000_100_000,
            message: Arc::new(MessageApproved {
                message_id: id.into(),
                trigger_event_id: "oms-1".into(),
                template_name: "shipment_delivered".into(),
                template_version: 1,
                locale: "en_GB".into(),
                purpose: Purpose::Marketing,
                channel: Channel::Whatsapp,
                recipient: "+447700900123".into(),
                variables: [("order_id".to_string(), "ord-1".to_string())].into(),
                consent_artifact_id: "form-1".into(),
                consent_granted_at: 1_700_000_000_000,
                category: "UTILITY".into(),
                delivery: Delivery::default(),
                journey: Some("order_updates".into()),
                relied_on: announces
                    .map(|a| (ANNOUNCES.to_string(), a.to_string()))
                    .into_iter()
                    .collect(),
            }),
            status: None,
        }
    }

    /// A state as the fold leaves it: every recent message approved under its own id, its
    /// subject announced, each identity's fact in the window.
    fn active_customer() -> CustomerState {
        let mut state = customer();
        state.seen.insert("oms-2".into(), 1_700_000_200_000);
        for (key, event, at) in [
            (
                "9b27f9d46a8e3622812f127eb68e8367",
                "oms-1",
                1_700_000_000_000,
            ),
            (
                "a37d59c7e785580e71195d3b701404f0",
                "oms-2",
                1_700_000_200_000,
            ),
        ] {
            let fact = AcceptedFact {
                event_id: event.into(),
                first_seen_at: at,
            };
            state.identities.insert(key.into(), fact);
        }
        for (id, subject) in [
            (
                "0265e5a70d6e7322aa49148777c70d65",
                Some("22c86b9786b989de43199f14e5a67cec"),
            ),
            ("14d451a9ccdcbe1fc0124ae63199c1fa", None),
        ] {
            state.recent.insert(id.into(), approved(id, subject));
            state.approved.insert(id.into());
            state.announced.extend(subject.map(String::from));
        }
        state
            .approved
            .insert("f034179b19dea0faea6893d534488142".into());
        state
            .announced
            .insert("7415e2af096df5537ad4894bbc6f0435".into());
        state
    }

    #[test]
    fn the_compact_form_leaves_out_only_what_the_state_repeats() {
        let state = active_customer();
        let (compact, folded) = fold(&state);
        assert!(compact.identities.is_empty(), "{:?}", compact.identities);
        fn names<'a>(set: &BTreeSet<&'a String>) -> Vec<&'a str> {
            set.iter().map(|s| s.as_str()).collect()
        }
        assert_eq!(
            names(&compact.approved),
            ["f034179b19dea0faea6893d534488142"]
        );
        assert_eq!(
            names(&compact.announced),
            ["7415e2af096df5537ad4894bbc6f0435"]
        );
        assert!(compact
            .recent
            .values()
            .all(|r| r.message.message_id.is_empty()
                && r.message.recipient.is_empty()
                && r.message.consent_artifact_id.is_empty()));
        assert_eq!(folded.seen_identities.len(), 2);
        assert_eq!(decode(&encode(&state).unwrap()).unwrap(), state);
    }

    #[test]
    fn a_state_the_fold_would_not_make_still_reads_back_as_it_was() {
        let mut state = active_customer();
        // A recent message neither approved nor under its own id, another with no id at all.
        let mut odd = approved("another-id", Some("7415e2af096df5537ad4894bbc6f0435"));
        odd.status = Some(crate::events::MessageStatus::Read);
        state.recent.insert("odd".into(), odd);
        state.recent.insert("blank".into(), approved("", None));
        state.approved.insert("blank".into());
        // Two recent messages announcing one subject, one of them not in `announced`.
        state
            .recent
            .insert("twice".into(), approved("twice", Some("never-announced")));
        state
            .recent
            .insert("again".into(), approved("again", Some("never-announced")));
        // Identities whose fact left the window, that disagree on its time, or share an event.
        let fact = |event: &str, at| AcceptedFact {
            event_id: event.into(),
            first_seen_at: at,
        };
        state
            .identities
            .insert("gone".into(), fact("oms-0", 1_600_000_000_000));
        state
            .identities
            .insert("later".into(), fact("oms-2", 1_700_000_300_000));
        state
            .identities
            .insert("same-event".into(), fact("oms-1", 1_700_000_000_000));
        assert_eq!(decode(&encode(&state).unwrap()).unwrap(), state);
        assert_eq!(decode(&encode(&customer()).unwrap()).unwrap(), customer());
        let empty = CustomerState::default();
        assert_eq!(decode(&encode(&empty).unwrap()).unwrap(), empty);
    }

    /// Any state, drawn from small pools of ids, times and addresses so that the repeats
    /// the compact form leaves out happen often, and their near misses too.
    fn any_state() -> impl Strategy<Value = CustomerState> {
        let id = || prop::sample::select(vec!["", "m1", "m2", "m3", "s1", "s2"]);
        let at = || prop::sample::select(vec![0_i64, 10, 20]);
        let channel =
            || prop::sample::select(vec![Channel::Whatsapp, Channel::Sms, Channel::Email]);
        let purpose = || prop::sample::select(vec![Purpose::Transactional, Purpose::Marketing]);
        let address = || prop::option::of(prop::sample::select(vec!["", "+44", "a@b"]));
        let consent =
            (purpose(), channel(), id(), at()).prop_map(|(p, c, artifact, at)| ConsentEntry {
                purpose: p,
                channel: c,
                granted: true,
                source: "checkout".into(),
                artifact_id: artifact.into(),
                changed_at: at,
            });
        let recent = (
            id(),
            (id(), channel(), purpose(), address(), id(), at()),
            prop::option::of(id()),
        )
            .prop_map(|(key, (message_id, c, p, to, artifact, at), announces)| {
                let mut r = approved(message_id, announces);
                let m = Arc::make_mut(&mut r.message);
                m.channel = c;
                m.purpose = p;
                m.recipient = to.unwrap_or("").into();
                m.consent_artifact_id = artifact.into();
                m.consent_granted_at = at;
                (key.to_string(), r)
            });
        let identity = (id(), id(), at()).prop_map(|(key, event, at)| {
            let fact = AcceptedFact {
                event_id: event.into(),
                first_seen_at: at,
            };
            (key.to_string(), fact)
        });
        (
            prop::collection::btree_map(id().prop_map(String::from), at(), 0..4),
            prop::collection::vec(identity, 0..5),
            prop::collection::vec(consent, 0..3),
            (address(), address()),
            prop::collection::vec(recent, 0..5),
            prop::collection::btree_set(id().prop_map(String::from), 0..4),
            prop::collection::btree_set(id().prop_map(String::from), 0..4),
        )
            .prop_map(
                |(seen, identities, consent, (phone, email), recent, approved, announced)| {
                    CustomerState {
                        seen: seen.into_iter().collect(),
                        identities: identities.into_iter().collect(),
                        consent,
                        profile: Profile {
                            phone_e164: phone.map(String::from),
                            email: email.map(String::from),
                            ..Profile::default()
                        },
                        recent: recent.into_iter().collect(),
                        approved,
                        announced,
                        ..CustomerState::default()
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn every_state_reads_back_as_it_was_saved(state in any_state()) {
            let stored = encode(&state).unwrap();
            prop_assert_eq!(decode(&stored).unwrap(), state);
        }
    }

    #[test]
    fn a_state_naming_more_identities_than_its_window_is_refused() {
        let folded = Folded {
            seen_identities: vec![Some("a".into()), Some("b".into())],
            ..Folded::default()
        };
        let e = unfold(customer(), folded).unwrap_err().to_string();
        assert!(e.contains("identities for 2 events"), "{e}");
    }

    #[test]
    fn a_state_compressed_whole_by_an_earlier_herald_still_loads() {
        let state = active_customer();
        let dictionary = EncoderDictionary::copy(WHOLE_FORM_DICTIONARY, LEVEL);
        let mut c = Compressor::with_prepared_dictionary(&dictionary).unwrap();
        let stored = c.compress(&serde_json::to_vec(&state).unwrap()).unwrap();
        assert_eq!(decode(&stored).unwrap(), state);
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
