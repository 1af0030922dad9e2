//! Direct identifiers (phone numbers, e-mail addresses) as keyed hashes: the only form in which
//! they enter state and Herald's topics. The hash is HMAC-SHA256 under a secret key, so the
//! warehouse can still join on it, and without the key nobody can test a guessed number against
//! it. Dispatch turns a hash back into an address through its contact directory, built from
//! the CRM input it reads itself. Pure: the key is an argument.

use crate::events::{Fact, InputEvent};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::BTreeMap;

/// The key `herald demo` uses, so that a demo's recording replays with the same hashes. Never
/// for production: anyone can compute its hashes.
pub const DEMO_KEY: &str = "herald-demo-identifier-key-not-secret";

/// Marks a value as a keyed hash, and names the scheme so it can change later.
pub const PREFIX: &str = "hk1:";

/// The secret key of the keyed hashes.
#[derive(Clone)]
pub struct IdentifierKey(Vec<u8>);

impl std::fmt::Debug for IdentifierKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdentifierKey(..)")
    }
}

impl IdentifierKey {
    /// A key from its secret bytes; shorter than 16 bytes is refused as guessable.
    pub fn new(secret: &[u8]) -> Result<IdentifierKey, String> {
        if secret.len() < 16 {
            return Err(format!(
                "the identifier key must be at least 16 bytes, got {}",
                secret.len()
            ));
        }
        Ok(IdentifierKey(secret.to_vec()))
    }

    /// The demo's key (`DEMO_KEY`), for demos, benchmarks and tests only.
    pub fn demo() -> IdentifierKey {
        IdentifierKey(DEMO_KEY.as_bytes().to_vec())
    }

    /// The keyed hash of one identifier of a kind ("phone", "email").
    pub fn pseudonym(&self, kind: &str, value: &str) -> String {
        // The key is at least 16 bytes: `new_from_slice` accepts any length for HMAC.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.0) else {
            return String::new();
        };
        mac.update(kind.as_bytes());
        mac.update(b":");
        mac.update(value.trim().as_bytes());
        let bytes = mac.finalize().into_bytes();
        let mut out = String::with_capacity(PREFIX.len() + 32);
        out.push_str(PREFIX);
        out.push_str(&crate::context::hex(&bytes[..16]));
        out
    }
}

/// Whether a value is already a keyed hash (a replayed pseudonymised fact stays as it is).
pub fn is_pseudonym(value: &str) -> bool {
    value.starts_with(PREFIX)
}

/// The identifiers an input carries, as (keyed hash, clear value): what a contact directory
/// learns from it.
pub fn identifiers(key: &IdentifierKey, input: &InputEvent) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Fact::ProfileChanged(p) = &input.fact {
        for (kind, value) in [("phone", &p.phone_e164), ("email", &p.email)] {
            if let Some(v) = value.as_deref().filter(|v| !is_pseudonym(v)) {
                out.insert(key.pseudonym(kind, v), v.to_string());
            }
        }
    }
    out
}

/// The input with every direct identifier replaced by its keyed hash.
pub fn pseudonymise(key: &IdentifierKey, mut input: InputEvent) -> InputEvent {
    if let Fact::ProfileChanged(p) = &mut input.fact {
        for (kind, value) in [("phone", &mut p.phone_e164), ("email", &mut p.email)] {
            if let Some(v) = value.as_mut().filter(|v| !is_pseudonym(v)) {
                *v = key.pseudonym(kind, v);
            }
        }
    }
    input
}

/// The webhook gateway's sender directory: which customer a WhatsApp number belongs to, by
/// the keyed hash of the number, learnt from CRM profile facts and forgotten on erasure.
#[derive(Debug, Clone, Default)]
pub struct SenderDirectory {
    by_phone: std::collections::HashMap<String, String>,
    phones_of: std::collections::HashMap<String, Vec<String>>,
}

impl SenderDirectory {
    /// Learns a profile's phone number, or forgets the customer's numbers on an erasure.
    pub fn observe(&mut self, key: &IdentifierKey, input: &InputEvent) {
        let customer = &input.envelope.customer_id;
        match &input.fact {
            Fact::ErasureRequested(_) => self.forget(customer),
            Fact::ProfileChanged(p) => {
                if let Some(phone) = p.phone_e164.as_deref() {
                    let hashed = if is_pseudonym(phone) {
                        phone.to_string()
                    } else {
                        key.pseudonym("phone", phone)
                    };
                    self.learn(customer, [hashed]);
                }
            }
            _ => {}
        }
    }

    /// Learns a customer's numbers from their contact card (keyed hashes of phones and
    /// e-mails alike: an e-mail's hash never matches a number's).
    pub fn learn(&mut self, customer: &str, addresses: impl IntoIterator<Item = String>) {
        for hashed in addresses {
            self.by_phone.insert(hashed.clone(), customer.to_string());
            self.phones_of
                .entry(customer.to_string())
                .or_default()
                .push(hashed);
        }
    }

    /// Forgets an erased customer's numbers.
    pub fn forget(&mut self, customer: &str) {
        for phone in self.phones_of.remove(customer).unwrap_or_default() {
            self.by_phone.remove(&phone);
        }
    }

    /// The customer whose profile holds this WhatsApp id (the number without its `+`).
    pub fn customer_of(&self, key: &IdentifierKey, wa_id: &str) -> Option<&str> {
        let e164 = format!("+{}", wa_id.trim_start_matches('+'));
        self.by_phone
            .get(&key.pseudonym("phone", &e164))
            .map(String::as_str)
    }

    /// How many numbers it knows.
    pub fn len(&self) -> usize {
        self.by_phone.len()
    }

    /// Whether it knows no number.
    pub fn is_empty(&self) -> bool {
        self.by_phone.is_empty()
    }
}

/// A customer's addresses as (keyed hash, clear address) pairs.
type KnownAddresses = Box<[(Box<str>, Box<str>)]>;

/// Dispatch's contact directory: each customer's addresses by keyed hash, learnt from the
/// customer's CRM facts and forgotten on their erasure.
#[derive(Debug, Clone, Default)]
pub struct ContactDirectory {
    /// Every customer of dispatch's partitions, each with one or two addresses: a boxed slice
    /// takes about 110 bytes for one where a B-tree's first node takes over 500.
    by_customer: std::collections::HashMap<Box<str>, KnownAddresses>,
}

/// Where a message's recipient leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address<'a> {
    /// The clear address to send to.
    Known(&'a str),
    /// A keyed hash the directory has no address for (erased, or never seen).
    Unknown,
}

impl ContactDirectory {
    /// Learns the input's addresses, or forgets the customer's on an erasure request.
    pub fn observe(&mut self, key: &IdentifierKey, input: &InputEvent) {
        let customer = &input.envelope.customer_id;
        if matches!(input.fact, Fact::ErasureRequested(_)) {
            self.forget(customer);
            return;
        }
        self.learn(customer, identifiers(key, input));
    }

    /// Learns addresses (clear by keyed hash) of a customer, from their contact card.
    pub fn learn(&mut self, customer: &str, addresses: BTreeMap<String, String>) {
        if addresses.is_empty() {
            return;
        }
        let mut known: BTreeMap<Box<str>, Box<str>> = self
            .by_customer
            .remove(customer)
            .map(|pairs| pairs.into_vec().into_iter().collect())
            .unwrap_or_default();
        known.extend(addresses.into_iter().map(|(k, v)| (k.into(), v.into())));
        self.by_customer
            .insert(customer.into(), known.into_iter().collect());
    }

    /// Forgets every address of an erased customer.
    pub fn forget(&mut self, customer: &str) {
        self.by_customer.remove(customer);
    }

    /// The address of `recipient` (a keyed hash; a clear address, from before hashing, is
    /// itself) for `customer`.
    pub fn address<'a>(&'a self, customer: &str, recipient: &'a str) -> Address<'a> {
        if !is_pseudonym(recipient) {
            return Address::Known(recipient);
        }
        match self
            .by_customer
            .get(customer)
            .and_then(|known| known.iter().find(|(hash, _)| **hash == *recipient))
        {
            Some((_, clear)) => Address::Known(clear),
            None => Address::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::*;

    fn profile(phone: &str, email: &str) -> InputEvent {
        InputEvent::new(
            "crm",
            "c-1",
            "e-1",
            0,
            Fact::ProfileChanged(ProfileChanged {
                first_name: Some("Ana".into()),
                locale: Some("en_US".into()),
                time_zone: None,
                phone_e164: Some(phone.into()),
                email: Some(email.into()),
            }),
        )
    }

    #[test]
    fn a_profile_leaves_with_keyed_hashes_that_only_the_key_reproduces() {
        let key = IdentifierKey::new(b"0123456789abcdef-secret").unwrap();
        let other = IdentifierKey::new(b"another key of 16+ bytes").unwrap();
        let out = pseudonymise(&key, profile("+15550100001", "ana@example.com"));
        let Fact::ProfileChanged(p) = &out.fact else {
            unreachable!()
        };
        let phone = p.phone_e164.clone().unwrap();
        assert!(
            is_pseudonym(&phone) && !phone.contains("5550100001"),
            "{phone}"
        );
        assert_eq!(phone, key.pseudonym("phone", "+15550100001"));
        assert_ne!(phone, other.pseudonym("phone", "+15550100001"));
        assert_ne!(
            key.pseudonym("phone", "x@example.com"),
            key.pseudonym("email", "x@example.com"),
            "the kind is part of the hash"
        );
        assert_eq!(p.first_name.as_deref(), Some("Ana"));
        // Idempotent: a fact that was already pseudonymised is not hashed twice.
        assert_eq!(pseudonymise(&key, out.clone()), out);
        let known = identifiers(&key, &profile("+15550100001", "ana@example.com"));
        assert_eq!(known[&phone], "+15550100001");
        assert_eq!(known.len(), 2);
    }

    #[test]
    fn the_directory_resolves_a_customers_hash_and_forgets_it_on_erasure() {
        let key = IdentifierKey::demo();
        let mut directory = ContactDirectory::default();
        directory.observe(&key, &profile("+15550100001", "ana@example.com"));
        let hash = key.pseudonym("phone", "+15550100001");
        assert_eq!(
            directory.address("c-1", &hash),
            Address::Known("+15550100001")
        );
        assert_eq!(
            directory.address("c-2", &hash),
            Address::Unknown,
            "per customer"
        );
        let erasure = InputEvent::new(
            "crm",
            "c-1",
            "e-2",
            5,
            Fact::ErasureRequested(ErasureRequested {
                request_id: "r".into(),
            }),
        );
        directory.observe(&key, &erasure);
        assert_eq!(directory.address("c-1", &hash), Address::Unknown);
    }

    #[test]
    fn an_address_learnt_later_joins_those_learnt_before() {
        let key = IdentifierKey::demo();
        let mut directory = ContactDirectory::default();
        let phone = key.pseudonym("phone", "+15550100001");
        let email = key.pseudonym("email", "ana@example.com");
        directory.learn(
            "c-1",
            BTreeMap::from([(phone.clone(), "+15550100001".into())]),
        );
        directory.learn(
            "c-1",
            BTreeMap::from([(email.clone(), "ana@example.com".into())]),
        );
        directory.learn(
            "c-1",
            BTreeMap::from([(phone.clone(), "+15550100001".into())]),
        );
        assert_eq!(
            directory.address("c-1", &phone),
            Address::Known("+15550100001")
        );
        assert_eq!(
            directory.address("c-1", &email),
            Address::Known("ana@example.com")
        );
    }

    #[test]
    fn a_short_key_is_refused() {
        assert!(IdentifierKey::new(b"short").is_err());
    }
}
