//! Template and locale: which approved variant of a template a message uses (never the wrong
//! language), its status at the provider, and its variables rendered from facts and state.

use crate::context::Ctx;
use crate::events::*;
use crate::policy::channel::*;
use crate::sorted_map::SortedMap;
use crate::state::CustomerState;
use crate::topology::{Template, VariableType};

pub(crate) fn language(locale: &str) -> &str {
    locale.split(['_', '-']).next().unwrap_or(locale)
}

/// Locales to try for a customer, best first: their own, the configured chain, then any
/// variant of the same language. Never another language.
pub(crate) fn locale_candidates<'t>(
    variants: &'t [Template],
    locale: &str,
    ctx: &Ctx,
) -> Vec<&'t str> {
    let mut out: Vec<&str> = Vec::new();
    let mut push = |l: &'t str| {
        if !out.contains(&l) {
            out.push(l);
        }
    };
    let chain = ctx.topology.policy.locale_fallback.get(locale);
    let wanted = std::iter::once(locale).chain(chain.into_iter().flatten().map(String::as_str));
    for want in wanted {
        for t in variants.iter().filter(|t| t.locale == want) {
            push(&t.locale);
        }
    }
    for t in variants
        .iter()
        .filter(|t| language(&t.locale) == language(locale))
    {
        push(&t.locale);
    }
    out
}

/// The template chosen for a customer, and how it travels.
pub(crate) struct Chosen<'t> {
    pub(crate) template: &'t Template,
    pub(crate) delivery: Delivery,
    pub(crate) note: Option<String>,
}

/// Picks the template variant to send: the highest approved version in the best locale,
/// following `fallback` templates when the provider paused or disabled it, and as a session
/// message when nothing is approved but the customer service window is open.
pub(crate) fn choose_template<'t>(
    name: &str,
    locale: &str,
    state: &CustomerState,
    ctx: &Ctx<'t>,
) -> Result<Chosen<'t>, (SuppressionReason, String)> {
    let catalog = &ctx.topology.catalog;
    let Some(first) = catalog.variants(name).filter(|v| !v.is_empty()) else {
        return Err((
            SuppressionReason::UnknownTemplate,
            format!("template {name} is not in the catalog"),
        ));
    };
    let candidates = locale_candidates(first, locale, ctx);
    if candidates.is_empty() {
        return Err((
            SuppressionReason::UnsupportedLocale,
            format!("no {name} template in {locale} or another variant of its language"),
        ));
    }
    let mut tried = Vec::new();
    let mut current = Some(name);
    // Follow the fallback chain (bounded: topology does not forbid cycles).
    for _ in 0..4 {
        let Some(n) = current else { break };
        let variants = catalog.variants(n).unwrap_or(&[]);
        for l in &candidates {
            let usable = variants
                .iter()
                .filter(|t| &t.locale == l)
                .filter(|t| provider_status(t, ctx) == TemplateStatus::Approved)
                .max_by_key(|t| t.version);
            if let Some(t) = usable {
                let note = (n != name).then(|| format!("{name} unavailable, fell back to {n}"));
                return Ok(Chosen {
                    template: t,
                    delivery: Delivery::Template,
                    note,
                });
            }
        }
        tried.push(n.to_string());
        current = variants.first().and_then(|t| t.fallback.as_deref());
    }
    if let Some(until) = session_open_until(state, ctx) {
        if let Some(t) = candidates
            .first()
            .and_then(|l| first.iter().find(|t| &t.locale == l))
        {
            return Ok(Chosen {
                template: t,
                delivery: Delivery::Session,
                note: Some(format!(
                    "no approved template ({}); customer service window open until {until}",
                    tried.join(", ")
                )),
            });
        }
    }
    Err((
        SuppressionReason::TemplateUnavailable,
        format!(
            "no approved version of {} in {locale}, and the customer service window is closed",
            tried.join(" or ")
        ),
    ))
}

/// A template's status as the provider last reported it, else as the catalog says.
pub(crate) fn provider_status(t: &Template, ctx: &Ctx) -> TemplateStatus {
    ctx.tables.template_status(&t.name, &t.locale, t.status)
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

pub(crate) enum Raw {
    Text(String),
    Money(Money),
    Date(Millis),
}

pub(crate) fn source_value(
    source: &str,
    state: &CustomerState,
    fact: Option<&Fact>,
) -> Option<Raw> {
    let text = |s: &str| (!s.trim().is_empty()).then(|| Raw::Text(s.to_string()));
    match (source, fact) {
        ("customer.first_name", _) => state.profile.first_name.as_deref().and_then(text),
        (_, None) => None,
        ("order.id", Some(f)) => f.order_id().and_then(text),
        ("order.total", Some(Fact::OrderPlaced(o))) => o.total.clone().map(Raw::Money),
        ("order.total", Some(f)) => f
            .order_id()
            .and_then(|id| state.orders.get(id))
            .and_then(|o| o.total.clone())
            .map(Raw::Money),
        ("shipment.carrier", Some(Fact::ShipmentDispatched(s))) => text(&s.carrier),
        ("shipment.tracking_url", Some(Fact::ShipmentDispatched(s))) => {
            s.tracking_url.as_deref().and_then(text)
        }
        ("shipment.new_estimated_delivery", Some(Fact::ShipmentDelayed(s))) => {
            Some(Raw::Date(s.new_estimated_delivery))
        }
        ("cart.total", Some(Fact::CartAbandoned(c))) => c.total.clone().map(Raw::Money),
        ("cart.first_item", Some(Fact::CartAbandoned(c))) => {
            c.items.first().and_then(|i| text(&i.name))
        }
        ("subscription.amount", Some(Fact::SubscriptionRenewalDue(s))) => {
            Some(Raw::Money(s.amount.clone()))
        }
        ("subscription.due_date", Some(Fact::SubscriptionRenewalDue(s))) => {
            Some(Raw::Date(s.due_at))
        }
        ("refund.amount", Some(Fact::RefundIssued(r))) => Some(Raw::Money(r.amount.clone())),
        _ => None,
    }
}

/// Renders every variable of a template, or names the first one that has no acceptable value.
pub(crate) fn render(
    template: &Template,
    state: &CustomerState,
    fact: Option<&Fact>,
) -> Result<SortedMap<String, String>, String> {
    let mut out = SortedMap::new();
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
