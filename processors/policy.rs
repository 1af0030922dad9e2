//! Policy: decides for each trigger whether a template message may go out, and records why.
//! Rules here: the trigger table, template catalog and locale, consent per purpose on WhatsApp,
//! a known recipient, cancelled orders, and validated variables (never a blank price).

use crate::events::*;
use crate::pipeline::{deterministic_id, Ctx};
use crate::quiet_hours::SendWindow;
use crate::state::{ConsentEntry, CustomerState};
use crate::topology::{Template, VariableType};
use std::collections::BTreeMap;

/// Facts that may trigger a message (the keys allowed in policy.toml's `[triggers]`).
pub const TRIGGER_FACTS: &[&str] = &[
    "OrderPlaced",
    "ShipmentDispatched",
    "ShipmentDelayed",
    "ShipmentOutForDelivery",
    "ShipmentDelivered",
    "CartAbandoned",
    "SubscriptionRenewalDue",
];

/// Where a template variable may take its value from.
pub const VARIABLE_SOURCES: &[&str] = &[
    "customer.first_name",
    "order.id",
    "order.total",
    "shipment.carrier",
    "shipment.tracking_url",
    "shipment.new_estimated_delivery",
    "cart.total",
    "cart.first_item",
    "subscription.amount",
    "subscription.due_date",
];

/// A fact that reached policy: an accepted input, or a shipment the guard released.
#[derive(Debug, Clone, Copy)]
pub struct Trigger<'a> {
    pub event_id: &'a str,
    pub fact: &'a Fact,
    /// When the fact happened: a message's time to live counts from here.
    pub occurred_at: Millis,
}

const HOUR: Millis = 3_600_000;

fn suppressed(
    t: &Trigger,
    template: &str,
    purpose: Purpose,
    reason: SuppressionReason,
    detail: String,
) -> Vec<Outcome> {
    vec![Outcome::MessageSuppressed(MessageSuppressed {
        trigger_event_id: t.event_id.to_string(),
        template_name: template.to_string(),
        purpose,
        reason,
        detail,
    })]
}

/// Suppresses a message that was already planned (deferred, or timed out of its window).
fn suppressed_planned(
    p: &MessageApproved,
    reason: SuppressionReason,
    detail: String,
) -> Vec<Outcome> {
    vec![Outcome::MessageSuppressed(MessageSuppressed {
        trigger_event_id: p.trigger_event_id.clone(),
        template_name: p.template_name.clone(),
        purpose: p.purpose,
        reason,
        detail,
    })]
}

/// The customer's standing consent for a purpose on WhatsApp, or why there is none.
fn whatsapp_consent(state: &CustomerState, purpose: Purpose) -> Result<&ConsentEntry, String> {
    match state.consent_for(purpose, Channel::Whatsapp) {
        Some(c) if c.granted => Ok(c),
        Some(c) => Err(format!(
            "{purpose:?} consent on WhatsApp revoked ({})",
            c.artifact_id
        )),
        None => Err(format!("no {purpose:?} consent on WhatsApp")),
    }
}

/// The customer's WhatsApp number, if one is on file.
fn whatsapp_number(state: &CustomerState) -> Option<&str> {
    state
        .profile
        .phone_e164
        .as_deref()
        .filter(|p| !p.is_empty())
}

/// The template variant for a locale: the exact locale, else the same language. Never another
/// language: a customer who reads Spanish is not sent English.
fn pick_locale<'t>(variants: &'t [Template], locale: &str) -> Option<&'t Template> {
    let approved = || {
        variants
            .iter()
            .filter(|t| t.status == TemplateStatus::Approved)
    };
    let language = locale.split(['_', '-']).next().unwrap_or(locale);
    approved()
        .find(|t| t.locale == locale)
        .or_else(|| approved().find(|t| t.locale.split(['_', '-']).next() == Some(language)))
}

/// Civil date (UTC) of an instant, as `YYYY-MM-DD`.
pub fn iso_date(at: Millis) -> String {
    // Howard Hinnant's days-to-civil algorithm.
    let z = at.div_euclid(86_400_000) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

enum Raw {
    Text(String),
    Money(Money),
    Date(Millis),
}

fn source_value(source: &str, state: &CustomerState, fact: &Fact) -> Option<Raw> {
    let text = |s: &str| (!s.trim().is_empty()).then(|| Raw::Text(s.to_string()));
    match (source, fact) {
        ("customer.first_name", _) => state.profile.first_name.as_deref().and_then(text),
        ("order.id", f) => f.order_id().and_then(text),
        ("order.total", Fact::OrderPlaced(o)) => o.total.clone().map(Raw::Money),
        ("order.total", f) => f
            .order_id()
            .and_then(|id| state.orders.get(id))
            .and_then(|o| o.total.clone())
            .map(Raw::Money),
        ("shipment.carrier", Fact::ShipmentDispatched(s)) => text(&s.carrier),
        ("shipment.tracking_url", Fact::ShipmentDispatched(s)) => {
            s.tracking_url.as_deref().and_then(text)
        }
        ("shipment.new_estimated_delivery", Fact::ShipmentDelayed(s)) => {
            Some(Raw::Date(s.new_estimated_delivery))
        }
        ("cart.total", Fact::CartAbandoned(c)) => c.total.clone().map(Raw::Money),
        ("cart.first_item", Fact::CartAbandoned(c)) => c.items.first().and_then(|i| text(&i.name)),
        ("subscription.amount", Fact::SubscriptionRenewalDue(s)) => {
            Some(Raw::Money(s.amount.clone()))
        }
        ("subscription.due_date", Fact::SubscriptionRenewalDue(s)) => Some(Raw::Date(s.due_at)),
        _ => None,
    }
}

/// Renders every variable of a template, or names the first one that has no acceptable value.
fn render(
    template: &Template,
    state: &CustomerState,
    fact: &Fact,
) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for v in &template.variables {
        let rendered = match (source_value(&v.source, state, fact), v.kind) {
            (Some(Raw::Money(m)), VariableType::Money) => Some(m.display()),
            (Some(Raw::Date(d)), VariableType::Date) => Some(iso_date(d)),
            (Some(Raw::Text(t)), VariableType::Text) => Some(t),
            (Some(_), kind) => return Err(format!("{} has the wrong type for {kind:?}", v.name)),
            (None, VariableType::Money) => None,
            (None, _) => v.fallback.clone(),
        };
        match rendered {
            Some(value) => {
                out.insert(v.name.clone(), value);
            }
            None if v.required => return Err(format!("{} ({}) has no value", v.name, v.source)),
            None => {}
        }
    }
    Ok(out)
}

/// Decides whether the trigger's template message may be sent to this customer now.
pub fn decide(
    state: &CustomerState,
    customer_id: &str,
    trigger: &Trigger,
    ctx: &Ctx,
) -> Vec<Outcome> {
    let Some(template_name) = ctx.topology.policy.triggers.get(trigger.fact.kind()) else {
        return vec![];
    };
    let Some(variants) = ctx
        .topology
        .catalog
        .variants(template_name)
        .filter(|v| !v.is_empty())
    else {
        return suppressed(
            trigger,
            template_name,
            Purpose::Transactional,
            SuppressionReason::UnknownTemplate,
            format!("template {template_name} is not in the catalog"),
        );
    };
    let purpose = variants[0].purpose;
    let t = trigger;
    if let Some(order_id) = trigger.fact.order_id() {
        let cancelled = state.orders.get(order_id).is_some_and(|o| o.cancelled);
        if cancelled && !matches!(trigger.fact, Fact::OrderPlaced(_)) {
            return suppressed(
                t,
                template_name,
                purpose,
                SuppressionReason::OrderCancelled,
                format!("order {order_id} was cancelled"),
            );
        }
    }
    let consent = match whatsapp_consent(state, purpose) {
        Ok(c) => c,
        Err(detail) => {
            return suppressed(
                t,
                template_name,
                purpose,
                SuppressionReason::NoConsent,
                detail,
            )
        }
    };
    let Some(phone) = whatsapp_number(state) else {
        return suppressed(
            t,
            template_name,
            purpose,
            SuppressionReason::NoPhone,
            "no WhatsApp number on file".into(),
        );
    };
    let locale = state
        .profile
        .locale
        .as_deref()
        .unwrap_or(&ctx.topology.policy.default_locale);
    let Some(template) = pick_locale(variants, locale) else {
        return suppressed(
            t,
            template_name,
            purpose,
            SuppressionReason::UnsupportedLocale,
            format!("no approved {template_name} template in {locale}"),
        );
    };
    let variables = match render(template, state, trigger.fact) {
        Ok(v) => v,
        Err(detail) => {
            return suppressed(
                t,
                template_name,
                purpose,
                SuppressionReason::MissingVariable,
                detail,
            )
        }
    };
    let message_id = deterministic_id(&[customer_id, trigger.event_id, template_name]);
    if state.approved.contains(&message_id) || state.deferred.contains_key(&message_id) {
        return vec![];
    }
    let planned = MessageApproved {
        message_id,
        trigger_event_id: trigger.event_id.to_string(),
        template_name: template_name.clone(),
        template_version: template.version,
        locale: template.locale.clone(),
        purpose,
        channel: Channel::Whatsapp,
        recipient: phone.to_string(),
        variables,
        consent_artifact_id: consent.artifact_id.clone(),
        consent_granted_at: consent.changed_at,
    };
    let expires_at = trigger.occurred_at + template.ttl_hours * HOUR;
    when_to_send(state, planned, expires_at, ctx)
}

/// Decides a deferred message again once it is due: consent and number as they are now, then
/// the send window again (the stream may have moved into the next quiet period meanwhile).
pub fn decide_deferred(
    state: &CustomerState,
    deferral: &MessageDeferred,
    ctx: &Ctx,
) -> Vec<Outcome> {
    let p = &deferral.planned;
    let consent = match whatsapp_consent(state, p.purpose) {
        Ok(c) => c,
        Err(detail) => {
            return suppressed_planned(
                p,
                SuppressionReason::NoConsent,
                format!("{detail}, decided again after waiting"),
            )
        }
    };
    let Some(phone) = whatsapp_number(state) else {
        return suppressed_planned(
            p,
            SuppressionReason::NoPhone,
            "no WhatsApp number on file".into(),
        );
    };
    let planned = MessageApproved {
        recipient: phone.to_string(),
        consent_artifact_id: consent.artifact_id.clone(),
        consent_granted_at: consent.changed_at,
        ..p.clone()
    };
    when_to_send(state, planned, deferral.expires_at, ctx)
}

/// The customer's region for regional blackouts: the country part of their locale.
fn region(state: &CustomerState) -> Option<&str> {
    state.profile.locale.as_deref()?.split(['_', '-']).nth(1)
}

/// Approves the message now, defers it to the next allowed instant in the customer's time zone,
/// or drops it when that instant is past its time to live.
fn when_to_send(
    state: &CustomerState,
    planned: MessageApproved,
    expires_at: Millis,
    ctx: &Ctx,
) -> Vec<Outcome> {
    let policy = &ctx.topology.policy;
    let stale = |reason, detail: String| suppressed_planned(&planned, reason, detail);
    if ctx.now > expires_at {
        return stale(
            SuppressionReason::Stale,
            format!(
                "decided {} h after its trigger, past the template's time to live",
                (ctx.now - expires_at) / HOUR
            ),
        );
    }
    let quiet = match &policy.quiet_hours {
        Some(q) if !q.exempt_purposes.contains(&planned.purpose) => q,
        _ => return vec![Outcome::MessageApproved(planned)],
    };
    let defer = |reason, until| {
        vec![Outcome::MessageDeferred(MessageDeferred {
            reason,
            deferred_until: until,
            expires_at,
            planned: planned.clone(),
        })]
    };
    let zone_name = state.profile.time_zone.as_deref().unwrap_or("");
    let Some(tz) = crate::quiet_hours::time_zone(zone_name) else {
        // Quiet hours cannot be judged without the customer's time zone: hold, and look again.
        let recheck = ctx.now + quiet.recheck_unknown_time_zone_hours.max(1) * HOUR;
        if recheck > expires_at {
            return stale(
                SuppressionReason::UnknownTimeZone,
                format!("time zone '{zone_name}' unknown until the message went stale"),
            );
        }
        return defer(DeferralReason::UnknownTimeZone, recheck);
    };
    match crate::quiet_hours::next_allowed(ctx.now, &tz, region(state), quiet, &policy.blackout) {
        SendWindow::Now => vec![Outcome::MessageApproved(planned)],
        SendWindow::NotBefore(at, reason) if at <= expires_at => defer(reason, at),
        SendWindow::NotBefore(at, reason) => stale(
            SuppressionReason::Stale,
            format!(
                "{reason:?} in {zone_name} until {}, past the template's time to live",
                iso_date(at)
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{ConsentEntry, OrderFacts};
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

    fn decide_on(state: &CustomerState, fact: &Fact) -> Vec<Outcome> {
        let topology = Topology::embedded().expect("embedded topology");
        let ctx = Ctx {
            now: T0,
            topology: &topology,
            input_ref: "test/0/0",
        };
        let trigger = Trigger {
            event_id: "e-1",
            fact,
            occurred_at: T0,
        };
        decide(state, "c-1", &trigger, &ctx)
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
                total: None,
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
    fn facts_that_trigger_nothing_decide_nothing() {
        let paid = Fact::PaymentCaptured(PaymentCaptured {
            order_id: "o-1".into(),
            payment_id: "p-1".into(),
            amount: Money {
                minor_units: 100,
                currency: "EUR".into(),
            },
        });
        assert_eq!(decide_on(&customer("en_US"), &paid), vec![]);
    }

    #[test]
    fn iso_dates_are_civil_utc_dates() {
        assert_eq!(iso_date(0), "1970-01-01");
        assert_eq!(iso_date(951_782_400_000), "2000-02-29");
        assert_eq!(iso_date(1_795_392_000_000), "2026-11-23");
    }
}
