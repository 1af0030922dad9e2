//! Policy's rules, given a state and an input, and the outcomes they must give.

use super::{message::*, outcome::*, template::*, timing::*};
use crate::context::{deterministic_id, Ctx};
use crate::events::*;
use crate::state::{ConsentEntry, OrderFacts};
use crate::state::{CustomerState, ANNOUNCES, HOUR_MS as HOUR};
use crate::topology::Topology;

const T0: Millis = 1_793_491_200_000;

fn customer(locale: &str) -> CustomerState {
    let mut s = CustomerState::default();
    s.profile.first_name = Some("Ana".into());
    s.profile.locale = Some(locale.into());
    s.profile.phone_e164 = Some("+34600000001".into());
    s.consent.push(ConsentEntry {
        purpose: Purpose::Transactional,
        channel: Channel::Whatsapp,
        granted: true,
        source: "checkout".into(),
        artifact_id: "form-1".into(),
        changed_at: T0,
    });
    s.orders.insert(
        "o-1".into(),
        OrderFacts {
            placed: true,
            ..OrderFacts::default()
        },
    );
    s
}

fn order(total: Option<i64>) -> Fact {
    Fact::OrderPlaced(OrderPlaced {
        order_id: "o-1".into(),
        items: vec![],
        total: total.map(|minor_units| Money {
            minor_units,
            currency: "EUR".into(),
        }),
    })
}

/// Runs `f` with the embedded topology, empty tables, at T0.
fn at_t0<R>(f: impl FnOnce(&Ctx) -> R) -> R {
    let topology = Topology::embedded().expect("embedded topology");
    let tables = crate::tables::Tables::default();
    f(&Ctx {
        now: T0,
        topology: &topology,
        tables: &tables,
        input_ref: "test/0/0",
    })
}

fn decide_on(state: &CustomerState, fact: &Fact) -> Vec<Outcome> {
    let (template, journey) = match fact {
        Fact::OrderPlaced(_) => ("order_confirmation", "order_updates"),
        Fact::ShipmentDispatched(_) => ("shipment_dispatched", "order_updates"),
        _ => ("cart_reminder", "abandoned_cart"),
    };
    let req = Request {
        message_id: deterministic_id(&["c-1", "e-1", template]),
        template,
        trigger_event_id: "e-1",
        fact: Some(fact),
        since: T0,
        journey: (journey, fact.order_id().unwrap_or("k-1")),
        announces: None,
    };
    at_t0(|ctx| decide_message(state, &req, ctx))
}

fn reason(outcomes: &[Outcome]) -> Option<SuppressionReason> {
    match outcomes {
        [Outcome::MessageSuppressed(m)] => Some(m.reason),
        _ => None,
    }
}

#[test]
fn an_order_with_consent_phone_and_price_is_approved_in_the_customers_language() {
    let out = decide_on(&customer("es_ES"), &order(Some(12_990)));
    let [Outcome::MessageApproved(m)] = out.as_slice() else {
        panic!("expected an approval, got {out:?}");
    };
    assert_eq!(m.locale, "es_ES");
    assert_eq!(m.recipient, "+34600000001");
    assert_eq!(m.consent_artifact_id, "form-1");
    assert_eq!(
        m.variables.get("total").map(String::as_str),
        Some("EUR 129.90")
    );
}

#[test]
fn news_already_announced_is_suppressed_whichever_message_asks_again() {
    let fact = order(Some(12_990));
    let mut req = Request {
        message_id: deterministic_id(&["c-1", "e-1", "order_confirmation"]),
        template: "order_confirmation",
        trigger_event_id: "e-1",
        fact: Some(&fact),
        since: T0,
        journey: ("order_updates", "o-1"),
        announces: Some("subject-1".into()),
    };
    let mut state = customer("en_US");
    let first = at_t0(|ctx| decide_message(&state, &req, ctx));
    let [Outcome::MessageApproved(m)] = first.as_slice() else {
        panic!("{first:?}")
    };
    assert_eq!(
        m.relied_on.get(ANNOUNCES).map(String::as_str),
        Some("subject-1")
    );
    let decision = Decision {
        decision_id: "d".into(),
        customer_id: "c-1".into(),
        input_event_id: "e-1".into(),
        processor: Processor::Policy,
        decided_at: T0,
        policy_version: "v".into(),
        outcome: first[0].clone(),
        consent_chain: None,
    };
    crate::state::evolve(&mut state, &decision);
    // The same news asked for again by another trigger (a new message id).
    req.message_id = deterministic_id(&["c-1", "e-2", "order_confirmation"]);
    req.trigger_event_id = "e-2";
    let again = at_t0(|ctx| decide_message(&state, &req, ctx));
    assert_eq!(reason(&again), Some(SuppressionReason::AlreadyAnnounced));
    // Other news about the same order is not held back.
    req.announces = Some("subject-2".into());
    let other = at_t0(|ctx| decide_message(&state, &req, ctx));
    assert!(
        matches!(other.as_slice(), [Outcome::MessageApproved(_)]),
        "{other:?}"
    );
}

#[test]
fn a_revoked_or_absent_consent_suppresses() {
    let mut revoked = customer("en_US");
    revoked.consent[0].granted = false;
    assert_eq!(
        reason(&decide_on(&revoked, &order(Some(100)))),
        Some(SuppressionReason::NoConsent)
    );
    let mut none = customer("en_US");
    none.consent.clear();
    assert_eq!(
        reason(&decide_on(&none, &order(Some(100)))),
        Some(SuppressionReason::NoConsent)
    );
}

#[test]
fn transactional_consent_does_not_cover_marketing() {
    let cart = Fact::CartAbandoned(CartAbandoned {
        cart_id: "k-1".into(),
        items: vec![],
        total: None,
    });
    assert_eq!(
        reason(&decide_on(&customer("en_US"), &cart)),
        Some(SuppressionReason::NoConsent)
    );
}

/// What becomes of a message of this purpose, planned now with a 72 h time to live.
fn planned_now(state: &CustomerState, purpose: Purpose) -> Vec<Outcome> {
    let out = decide_on(state, &order(Some(100)));
    let [Outcome::MessageApproved(m)] = out.as_slice() else {
        panic!("expected the order confirmation approved, got {out:?}");
    };
    let planned = MessageApproved {
        purpose,
        ..MessageApproved::clone(m)
    };
    at_t0(|ctx| when_to_send(state, planned, T0 + 72 * HOUR, ctx))
}

/// Whether a provider's marketing stop or pause held the message (quiet hours may still).
fn held_by_a_stop(out: &[Outcome]) -> bool {
    out.iter().any(|o| {
        matches!(o, Outcome::MessageSuppressed(m) if m.reason == SuppressionReason::MarketingStopped)
            || matches!(o, Outcome::MessageDeferred(d) if d.reason == DeferralReason::MarketingPaused)
    })
}

fn marketing_consent(changed_at: Millis) -> ConsentEntry {
    ConsentEntry {
        purpose: Purpose::Marketing,
        channel: Channel::Whatsapp,
        granted: true,
        source: "preferences".into(),
        artifact_id: "form-2".into(),
        changed_at,
    }
}

#[test]
fn a_customer_who_turned_marketing_off_gets_orders_and_no_marketing_until_a_new_grant() {
    let mut s = customer("en_US");
    s.consent.push(marketing_consent(T0 - 10 * HOUR));
    s.marketing_turned_off = Some(MarketingStopped {
        message_id: "m-0".into(),
        error_code: 131050,
        channel: Channel::Whatsapp,
        stopped_at: T0 - HOUR,
        resumes_at: None,
    });
    assert_eq!(
        reason(&planned_now(&s, Purpose::Marketing)),
        Some(SuppressionReason::MarketingStopped)
    );
    assert!(matches!(
        planned_now(&s, Purpose::Transactional).as_slice(),
        [Outcome::MessageApproved(_)]
    ));
    // A grant from before the stop does not lift it; one given after it does.
    s.consent.retain(|c| c.purpose != Purpose::Marketing);
    s.consent.push(marketing_consent(T0 - HOUR / 2));
    assert!(!held_by_a_stop(&planned_now(&s, Purpose::Marketing)));
}

#[test]
fn a_marketing_pause_defers_within_the_time_to_live_and_suppresses_beyond_it() {
    let mut s = customer("en_US");
    let pause = |resumes_at| MarketingStopped {
        message_id: "m-0".into(),
        error_code: 131049,
        channel: Channel::Whatsapp,
        stopped_at: T0 - HOUR,
        resumes_at: Some(resumes_at),
    };
    s.marketing_paused = Some(pause(T0 + 5 * HOUR));
    let out = planned_now(&s, Purpose::Marketing);
    let [Outcome::MessageDeferred(d)] = out.as_slice() else {
        panic!("expected a deferral, got {out:?}");
    };
    assert_eq!(
        (d.reason, d.deferred_until),
        (DeferralReason::MarketingPaused, T0 + 5 * HOUR)
    );
    s.marketing_paused = Some(pause(T0 + 100 * HOUR));
    assert_eq!(
        reason(&planned_now(&s, Purpose::Marketing)),
        Some(SuppressionReason::MarketingStopped)
    );
    s.marketing_paused = Some(pause(T0));
    assert!(!held_by_a_stop(&planned_now(&s, Purpose::Marketing)));
}

#[test]
fn a_missing_price_is_never_sent() {
    assert_eq!(
        reason(&decide_on(&customer("en_US"), &order(None))),
        Some(SuppressionReason::MissingVariable)
    );
}

#[test]
fn a_missing_first_name_takes_the_locales_fallback() {
    let mut s = customer("es_ES");
    s.profile.first_name = None;
    let out = decide_on(&s, &order(Some(100)));
    let [Outcome::MessageApproved(m)] = out.as_slice() else {
        panic!("expected an approval, got {out:?}");
    };
    assert_eq!(
        m.variables.get("first_name").map(String::as_str),
        Some("hola")
    );
}

#[test]
fn another_language_is_never_substituted() {
    assert_eq!(
        reason(&decide_on(&customer("de_DE"), &order(Some(100)))),
        Some(SuppressionReason::UnsupportedLocale)
    );
    // Same language, other region: the language matches, so it goes out.
    let out = decide_on(&customer("es_MX"), &order(Some(100)));
    assert!(matches!(out.as_slice(), [Outcome::MessageApproved(m)] if m.locale == "es_ES"));
}

#[test]
fn no_number_no_send_and_a_cancelled_order_gets_no_shipping_message() {
    let mut s = customer("en_US");
    s.profile.phone_e164 = None;
    assert_eq!(
        reason(&decide_on(&s, &order(Some(100)))),
        Some(SuppressionReason::NoPhone)
    );
    let mut s = customer("en_US");
    s.orders.insert(
        "o-1".into(),
        OrderFacts {
            placed: true,
            paid: true,
            cancelled: true,
            ..OrderFacts::default()
        },
    );
    let shipped = Fact::ShipmentDispatched(ShipmentDispatched {
        order_id: "o-1".into(),
        shipment_id: "s-1".into(),
        carrier: "DHL".into(),
        tracking_url: None,
        skus: vec![],
        estimated_delivery: None,
    });
    assert_eq!(
        reason(&decide_on(&s, &shipped)),
        Some(SuppressionReason::OrderCancelled)
    );
}

#[test]
fn a_message_already_approved_is_not_approved_again() {
    let mut s = customer("en_US");
    let first = decide_on(&s, &order(Some(100)));
    let [Outcome::MessageApproved(m)] = first.as_slice() else {
        panic!("expected an approval, got {first:?}");
    };
    s.approved.insert(m.message_id.clone());
    assert_eq!(decide_on(&s, &order(Some(100))), vec![]);
}

#[test]
fn iso_dates_are_civil_utc_dates() {
    assert_eq!(iso_date(0), "1970-01-01");
    assert_eq!(iso_date(951_782_400_000), "2000-02-29");
    assert_eq!(iso_date(1_795_392_000_000), "2026-11-23");
}
