//! Policy: decides whether one message may go out, on which channel, in which template and
//! language, and when; and records why. Rules here: consent per purpose and channel with channel
//! fallback, the template catalog with provider status, version fallback and the locale chain,
//! validated variables (never a blank price), the customer service window, frequency caps,
//! quiet hours, and holds for ambiguous signals. It also reads inbound messages for opt-out
//! keywords and escalation terms. Which messages are asked for is the journeys' business.

use crate::context::{deterministic_id, Ctx};
use crate::events::*;
use crate::journey_guard::{self, Check, SUBJECT_FACT};
use crate::provider_codes::{is_undeliverable, refusal_reason, SMS_UNSUBSCRIBED};
use crate::quiet_hours::SendWindow;
use crate::state::{ConsentEntry, CustomerState, ANNOUNCES, HOUR_MS as HOUR};
use crate::topology::{Template, VariableType};
use std::collections::BTreeMap;

/// A fact that reached policy: an accepted input, or a shipment the guard released.
#[derive(Debug, Clone, Copy)]
pub struct Trigger<'a> {
    pub event_id: &'a str,
    pub fact: &'a Fact,
    /// When the fact happened: a message's time to live counts from here.
    pub occurred_at: Millis,
}

/// One message a journey asks policy to decide.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// Deterministic: the same step or reaction always asks for the same id.
    pub message_id: String,
    pub template: &'a str,
    pub trigger_event_id: &'a str,
    /// The fact its variables come from (a journey step rebuilds it from state).
    pub fact: Option<&'a Fact>,
    /// Time to live counts from here.
    pub since: Millis,
    /// Journey name and instance key.
    pub journey: (&'a str, &'a str),
    /// The subject a reaction's message announces (journey, fact identity and news), which
    /// no second message may announce again; none for a journey step.
    pub announces: Option<String>,
}

fn suppress(
    message_id: Option<&str>,
    trigger_event_id: &str,
    template: &str,
    purpose: Purpose,
    reason: SuppressionReason,
    detail: String,
) -> Outcome {
    Outcome::MessageSuppressed(MessageSuppressed {
        message_id: message_id.map(str::to_string),
        trigger_event_id: trigger_event_id.to_string(),
        template_name: template.to_string(),
        purpose,
        reason,
        detail,
    })
}

/// Suppresses a message that was already planned (deferred, or timed out of its window).
fn suppressed_planned(
    p: &MessageApproved,
    reason: SuppressionReason,
    detail: String,
) -> Vec<Outcome> {
    vec![suppress(
        Some(&p.message_id),
        &p.trigger_event_id,
        &p.template_name,
        p.purpose,
        reason,
        detail,
    )]
}

/// The address a channel delivers to, if the customer has one on file.
fn address(state: &CustomerState, channel: Channel) -> Option<&str> {
    let p = &state.profile;
    match channel {
        Channel::Whatsapp | Channel::Sms => p.phone_e164.as_deref(),
        Channel::Email => p.email.as_deref(),
    }
    .filter(|a| !a.trim().is_empty())
}

/// The first channel, in the configured order, that the customer consented to for this
/// purpose and has an address for; or why there is none, channel by channel.
fn choose_channel<'s>(
    state: &'s CustomerState,
    purpose: Purpose,
    channels: &[Channel],
) -> Result<(Channel, &'s ConsentEntry, &'s str), (SuppressionReason, String)> {
    let mut why = Vec::new();
    let mut consented_without_address = false;
    for &channel in channels {
        match state.consent_for(purpose, channel) {
            Some(c) if c.granted => match address(state, channel) {
                Some(a) => return Ok((channel, c, a)),
                None => {
                    consented_without_address = true;
                    why.push(format!("{channel:?}: no address on file"));
                }
            },
            Some(c) => why.push(format!("{channel:?}: consent revoked ({})", c.artifact_id)),
            None => why.push(format!("{channel:?}: no consent")),
        }
    }
    let reason = if consented_without_address {
        SuppressionReason::NoPhone
    } else {
        SuppressionReason::NoConsent
    };
    Err((reason, format!("{purpose:?}: {}", why.join("; "))))
}

fn language(locale: &str) -> &str {
    locale.split(['_', '-']).next().unwrap_or(locale)
}

/// Locales to try for a customer, best first: their own, the configured chain, then any
/// variant of the same language. Never another language.
fn locale_candidates<'t>(variants: &'t [Template], locale: &str, ctx: &Ctx) -> Vec<&'t str> {
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
struct Chosen<'t> {
    template: &'t Template,
    delivery: Delivery,
    note: Option<String>,
}

/// Picks the template variant to send: the highest approved version in the best locale,
/// following `fallback` templates when the provider paused or disabled it, and as a session
/// message when nothing is approved but the customer service window is open.
fn choose_template<'t>(
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
fn provider_status(t: &Template, ctx: &Ctx) -> TemplateStatus {
    ctx.tables.template_status(&t.name, &t.locale, t.status)
}

/// Until when the 24-hour customer service window is open, if it is open now.
fn session_open_until(state: &CustomerState, ctx: &Ctx) -> Option<Millis> {
    let until = state.last_inbound_at? + ctx.topology.policy.session_window_hours * HOUR;
    (until > ctx.now).then_some(until)
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

fn source_value(source: &str, state: &CustomerState, fact: Option<&Fact>) -> Option<Raw> {
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
fn render(
    template: &Template,
    state: &CustomerState,
    fact: Option<&Fact>,
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

/// Decides one message a journey asks for.
pub fn decide_message(state: &CustomerState, req: &Request, ctx: &Ctx) -> Vec<Outcome> {
    let catalog = &ctx.topology.catalog;
    let Some(variants) = catalog.variants(req.template).filter(|v| !v.is_empty()) else {
        return vec![suppress(
            Some(&req.message_id),
            req.trigger_event_id,
            req.template,
            Purpose::Transactional,
            SuppressionReason::UnknownTemplate,
            format!("template {} is not in the catalog", req.template),
        )];
    };
    if state.approved.contains(&req.message_id) || state.deferred.contains_key(&req.message_id) {
        return vec![];
    }
    let head = &variants[0];
    if let Some(subject) = req
        .announces
        .as_ref()
        .filter(|s| state.announced.contains(*s))
    {
        return vec![suppress(
            Some(&req.message_id),
            req.trigger_event_id,
            req.template,
            head.purpose,
            SuppressionReason::AlreadyAnnounced,
            format!("{} already announced this news ({subject})", req.journey.0),
        )];
    }
    let refuse = |reason, detail| {
        vec![suppress(
            Some(&req.message_id),
            req.trigger_event_id,
            req.template,
            head.purpose,
            reason,
            detail,
        )]
    };
    let (channel, consent, recipient) =
        match choose_channel(state, head.purpose, &ctx.topology.policy.channels) {
            Ok(c) => c,
            Err((reason, detail)) => return refuse(reason, detail),
        };
    let mut relied_on = BTreeMap::new();
    relied_on.insert("journey_key".to_string(), req.journey.1.to_string());
    if let Some(subject) = &req.announces {
        relied_on.insert(ANNOUNCES.to_string(), subject.clone());
    }
    let mut planned = MessageApproved {
        message_id: req.message_id.clone(),
        trigger_event_id: req.trigger_event_id.to_string(),
        template_name: req.template.to_string(),
        template_version: head.version,
        locale: String::new(),
        purpose: head.purpose,
        channel,
        recipient: recipient.to_string(),
        variables: BTreeMap::new(),
        consent_artifact_id: consent.artifact_id.clone(),
        consent_granted_at: consent.changed_at,
        category: head.category.clone(),
        delivery: Delivery::Template,
        journey: Some(req.journey.0.to_string()),
        relied_on,
    };
    let expires_at = req.since + head.ttl_hours * HOUR;
    let Some(locale) = state.profile.locale.as_deref().filter(|l| !l.is_empty()) else {
        // No language is guessed: hold until the profile says. The fact is kept with the
        // message, since state remembers an order but not each shipment's carrier and link.
        if let Some(fact) = req.fact.and_then(|f| serde_json::to_string(f).ok()) {
            planned.relied_on.insert(SUBJECT_FACT.to_string(), fact);
        }
        return hold(planned, DeferralReason::UnknownLocale, expires_at, ctx);
    };
    let chosen = match choose_template(req.template, locale, state, ctx) {
        Ok(c) => c,
        Err((reason, detail)) => return refuse(reason, detail),
    };
    let variables = match render(chosen.template, state, req.fact) {
        Ok(v) => v,
        Err(detail) => return refuse(SuppressionReason::MissingVariable, detail),
    };
    planned.template_name = chosen.template.name.clone();
    planned.template_version = chosen.template.version;
    planned.locale = chosen.template.locale.clone();
    planned.variables = variables;
    planned.delivery = chosen.delivery;
    if let Some(note) = chosen.note {
        planned.relied_on.insert("template".into(), note);
    }
    match journey_guard::check(state, req.journey.0, req.journey.1, ctx) {
        Check::Clear(facts) => planned.relied_on.extend(facts),
        Check::Hold(reason) => return hold(planned, reason, expires_at, ctx),
        Check::End(outcomes) => return end_planned(&planned, outcomes),
    }
    when_to_send(state, planned, expires_at, ctx)
}

/// Suppressions a journey check ended with, addressed to this planned message.
fn end_planned(planned: &MessageApproved, outcomes: Vec<Outcome>) -> Vec<Outcome> {
    outcomes
        .into_iter()
        .map(|o| match o {
            Outcome::MessageSuppressed(s) => suppress(
                Some(&planned.message_id),
                &planned.trigger_event_id,
                &planned.template_name,
                planned.purpose,
                s.reason,
                s.detail,
            ),
            other => other,
        })
        .collect()
}

/// Holds a message for an ambiguous signal, to be looked at again; dropped once stale.
fn hold(
    planned: MessageApproved,
    reason: DeferralReason,
    expires_at: Millis,
    ctx: &Ctx,
) -> Vec<Outcome> {
    let detail = format!("held for {reason:?} until it went stale");
    let recheck_hours = ctx.topology.policy.recheck_ambiguous_hours;
    hold_for(
        planned,
        reason,
        recheck_hours,
        SuppressionReason::Ambiguous,
        detail,
        expires_at,
        ctx,
    )
}

/// Defers a message to be looked at again in `recheck_hours`, or drops it with `stale` when
/// that would be past its time to live.
fn hold_for(
    planned: MessageApproved,
    reason: DeferralReason,
    recheck_hours: i64,
    stale: SuppressionReason,
    detail: String,
    expires_at: Millis,
    ctx: &Ctx,
) -> Vec<Outcome> {
    let recheck = ctx.now + recheck_hours.max(1) * HOUR;
    if recheck > expires_at {
        return suppressed_planned(&planned, stale, detail);
    }
    vec![Outcome::MessageDeferred(MessageDeferred {
        reason,
        deferred_until: recheck,
        expires_at,
        planned,
    })]
}

/// Decides a deferred (or held) message again once it is due: the channel and consent as they
/// are now, the template's status, the locale if it was unknown, the journey's guards, then the
/// send window again.
pub fn decide_deferred(
    state: &CustomerState,
    deferral: &MessageDeferred,
    ctx: &Ctx,
) -> Vec<Outcome> {
    let p = &deferral.planned;
    // Another message about the same news may have gone out while this one waited.
    if let Some(subject) = p
        .relied_on
        .get(ANNOUNCES)
        .filter(|s| state.announced.contains(*s))
    {
        return suppressed_planned(
            p,
            SuppressionReason::AlreadyAnnounced,
            format!("already announced this news ({subject}) while it waited"),
        );
    }
    let (channel, consent, recipient) =
        match choose_channel(state, p.purpose, &ctx.topology.policy.channels) {
            Ok(c) => c,
            Err((reason, detail)) => {
                return suppressed_planned(
                    p,
                    reason,
                    format!("{detail}, decided again after waiting"),
                )
            }
        };
    let mut planned = MessageApproved {
        channel,
        recipient: recipient.to_string(),
        consent_artifact_id: consent.artifact_id.clone(),
        consent_granted_at: consent.changed_at,
        ..p.clone()
    };
    if planned.locale.is_empty() {
        let Some(locale) = state.profile.locale.as_deref().filter(|l| !l.is_empty()) else {
            return hold(
                planned,
                DeferralReason::UnknownLocale,
                deferral.expires_at,
                ctx,
            );
        };
        let chosen = match choose_template(&p.template_name, locale, state, ctx) {
            Ok(c) => c,
            Err((reason, detail)) => return suppressed_planned(p, reason, detail),
        };
        let fact = journey_guard::subject_fact(state, p, ctx);
        match render(chosen.template, state, fact.as_ref()) {
            Ok(v) => planned.variables = v,
            Err(detail) => {
                return suppressed_planned(p, SuppressionReason::MissingVariable, detail)
            }
        }
        planned.template_name = chosen.template.name.clone();
        planned.template_version = chosen.template.version;
        planned.locale = chosen.template.locale.clone();
        planned.delivery = chosen.delivery;
    } else {
        // The provider may have paused the template while the message waited.
        let status = ctx
            .topology
            .catalog
            .variants(&p.template_name)
            .and_then(|v| {
                v.iter()
                    .find(|t| t.locale == p.locale && t.version == p.template_version)
            })
            .map_or(TemplateStatus::Approved, |t| provider_status(t, ctx));
        if status != TemplateStatus::Approved && p.delivery == Delivery::Template {
            match session_open_until(state, ctx) {
                Some(until) => {
                    planned.delivery = Delivery::Session;
                    planned.relied_on.insert(
                        "template".into(),
                        format!(
                            "{} {status:?}; customer service window open until {until}",
                            p.template_name
                        ),
                    );
                }
                None => {
                    return suppressed_planned(
                        p,
                        SuppressionReason::TemplateUnavailable,
                        format!(
                            "{} ({}) is {status:?} at the provider",
                            p.template_name, p.locale
                        ),
                    )
                }
            }
        }
    }
    if let Some(name) = p.journey.as_deref() {
        let key = p
            .relied_on
            .get("journey_key")
            .map(String::as_str)
            .unwrap_or("");
        match journey_guard::check(state, name, key, ctx) {
            Check::Clear(facts) => planned.relied_on.extend(facts),
            Check::Hold(reason) => return hold(planned, reason, deferral.expires_at, ctx),
            Check::End(outcomes) => return end_planned(&planned, outcomes),
        }
    }
    when_to_send(state, planned, deferral.expires_at, ctx)
}

/// The customer's region for regional blackouts: the country part of their locale.
fn region(state: &CustomerState) -> Option<&str> {
    state.profile.locale.as_deref()?.split(['_', '-']).nth(1)
}

/// When the frequency caps let one more message of this category out: `None` if now.
fn cap_frees_at(state: &CustomerState, category: &str, ctx: &Ctx) -> Option<(Millis, String)> {
    let mut latest: Option<(Millis, String)> = None;
    for cap in ctx
        .topology
        .policy
        .frequency_cap
        .iter()
        .filter(|c| c.category == category)
    {
        let window = cap.window_hours * HOUR;
        let mut inside: Vec<Millis> = state
            .recent
            .values()
            .filter(|r| r.message.category == category && r.approved_at > ctx.now - window)
            .map(|r| r.approved_at)
            .collect();
        if inside.len() < cap.max {
            continue;
        }
        inside.sort_unstable();
        // The slot frees when enough of the oldest ones leave the window.
        let frees = inside[inside.len() - cap.max] + window;
        let why = format!("{} {category} in {} h", inside.len(), cap.window_hours);
        if latest.as_ref().is_none_or(|(at, _)| frees > *at) {
            latest = Some((frees, why));
        }
    }
    latest
}

/// Approves the message now, defers it to the next allowed instant (caps, quiet hours,
/// blackout days), or drops it when that instant is past its time to live.
fn when_to_send(
    state: &CustomerState,
    mut planned: MessageApproved,
    expires_at: Millis,
    ctx: &Ctx,
) -> Vec<Outcome> {
    let policy = &ctx.topology.policy;
    if ctx.now > expires_at {
        let detail = format!(
            "decided {} h after its time to live ran out",
            (ctx.now - expires_at) / HOUR
        );
        return suppressed_planned(&planned, SuppressionReason::Stale, detail);
    }
    if planned.delivery == Delivery::Session {
        match session_open_until(state, ctx) {
            Some(until) => {
                planned
                    .relied_on
                    .insert("session_window_open_until".into(), until.to_string());
            }
            None => {
                return suppressed_planned(
                    &planned,
                    SuppressionReason::OutsideSessionWindow,
                    "a session message needs the customer service window open".into(),
                )
            }
        }
    }
    let defer = |planned: MessageApproved, reason, until| {
        vec![Outcome::MessageDeferred(MessageDeferred {
            reason,
            deferred_until: until,
            expires_at,
            planned,
        })]
    };
    if planned.purpose == Purpose::Marketing {
        match marketing_stopped_until(state, ctx) {
            Some((Some(until), why)) if until <= expires_at => {
                planned.relied_on.insert("marketing_paused".into(), why);
                return defer(planned, DeferralReason::MarketingPaused, until);
            }
            Some((_, why)) => {
                return suppressed_planned(&planned, SuppressionReason::MarketingStopped, why)
            }
            None => {}
        }
    }
    if let Some((frees, why)) = cap_frees_at(state, &planned.category, ctx) {
        if frees > expires_at {
            return suppressed_planned(
                &planned,
                SuppressionReason::FrequencyCap,
                format!("{why}: the cap frees a slot only after the time to live"),
            );
        }
        planned.relied_on.insert("frequency_cap".into(), why);
        return defer(planned, DeferralReason::FrequencyCap, frees);
    }
    let quiet = match &policy.quiet_hours {
        Some(q) if !q.exempt_purposes.contains(&planned.purpose) => q,
        _ => return vec![Outcome::MessageApproved(planned)],
    };
    let zone_name = state.profile.time_zone.clone().unwrap_or_default();
    let Some(tz) = crate::quiet_hours::time_zone(&zone_name) else {
        // Quiet hours cannot be judged without the customer's time zone: hold, and look again.
        let detail = format!("time zone '{zone_name}' unknown until the message went stale");
        return hold_for(
            planned,
            DeferralReason::UnknownTimeZone,
            quiet.recheck_unknown_time_zone_hours,
            SuppressionReason::UnknownTimeZone,
            detail,
            expires_at,
            ctx,
        );
    };
    match crate::quiet_hours::next_allowed(ctx.now, &tz, region(state), quiet, &policy.blackout) {
        SendWindow::Now => {
            planned.relied_on.insert("time_zone".into(), zone_name);
            vec![Outcome::MessageApproved(planned)]
        }
        SendWindow::NotBefore(at, reason) if at <= expires_at => defer(planned, reason, at),
        SendWindow::NotBefore(at, reason) => suppressed_planned(
            &planned,
            SuppressionReason::Stale,
            format!(
                "{reason:?} in {zone_name} until {}, past the template's time to live",
                iso_date(at)
            ),
        ),
    }
}

/// Normalises an inbound message for keyword matching: trimmed of spaces and punctuation,
/// inner spaces collapsed, upper case.
fn normalise(text: &str) -> String {
    text.trim_matches(|c: char| !c.is_alphanumeric())
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_uppercase()
}

/// What an inbound customer message decides: an opt-out when it is a configured keyword,
/// else an escalation when it carries a risk or complaint term.
pub fn decide_inbound<'a>(
    state: &CustomerState,
    event_id: &str,
    inbound: &InboundMessageReceived,
    received_at: Millis,
    ctx: &Ctx<'a>,
) -> Vec<Outcome> {
    let policy = &ctx.topology.policy;
    let said = normalise(&inbound.text);
    let among = |lists: &'a BTreeMap<String, Vec<String>>, what: &str| {
        lists.values().flatten().find(move |k| normalise(k) == what)
    };
    // An opt-out by a keyword, by an opt-out button's text (tapped, or typed: withdrawing on
    // a typed "Stop promotions" errs on the side of consent), or by a button's payload.
    let payload = inbound
        .button_payload
        .as_deref()
        .map(normalise)
        .filter(|p| !p.is_empty());
    let keyword = among(&policy.opt_out.keywords, &said)
        .or_else(|| among(&policy.opt_out.button_texts, &said))
        .or_else(|| among(&policy.opt_out.button_payloads, payload.as_deref()?));
    if let Some(keyword) = keyword {
        if policy.opt_out.purposes.is_empty() {
            return vec![];
        }
        return vec![Outcome::OptedOut(OptedOut {
            provider_message_id: if inbound.provider_message_id.is_empty() {
                event_id.to_string()
            } else {
                inbound.provider_message_id.clone()
            },
            keyword: keyword.clone(),
            channel: Channel::Whatsapp,
            purposes: policy.opt_out.purposes.clone(),
            received_at,
        })];
    }
    let words: Vec<String> = inbound
        .text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    for rule in &policy.escalation {
        if let Some(term) = rule
            .terms
            .iter()
            .find(|t| words.iter().any(|w| *w == t.to_lowercase()))
        {
            let open_orders = state
                .orders
                .iter()
                .filter(|(_, o)| o.is_open())
                .map(|(id, _)| id.clone())
                .collect();
            return vec![Outcome::EscalationRaised(EscalationRaised {
                provider_message_id: inbound.provider_message_id.clone(),
                category: rule.category.clone(),
                matched_term: term.clone(),
                text: inbound.text.clone(),
                open_orders,
            })];
        }
    }
    vec![]
}

/// What the provider's failure of a message calls for: one WhatsApp could not deliver
/// (131026) goes out again on the next channel the customer consented to, with the same
/// template, language and variables; one the provider refused as it was approved (outside the
/// service window, template paused or disabled, variables refused) is recorded as suppressed,
/// with the code, so the decision log says it never went out and why.
pub fn decide_status(
    state: &CustomerState,
    customer_id: &str,
    status: &MessageStatusChanged,
    ctx: &Ctx,
) -> Vec<Outcome> {
    let (MessageStatus::Failed, Some(code)) = (&status.status, status.error_code) else {
        return vec![];
    };
    let Some(sent) = status
        .message_id
        .as_ref()
        .and_then(|id| state.recent.get(id))
    else {
        return vec![];
    };
    if sent.message.channel == Channel::Sms && code == SMS_UNSUBSCRIBED {
        // The recipient texted STOP: the carrier blocks every message from us to them, so
        // their SMS consent is gone for every purpose, and this message takes the next channel.
        let artifact = if status.provider_message_id.is_empty() {
            sent.message.message_id.clone()
        } else {
            status.provider_message_id.clone()
        };
        let mut out = vec![Outcome::OptedOut(OptedOut {
            provider_message_id: artifact,
            keyword: "STOP".into(),
            channel: Channel::Sms,
            purposes: vec![Purpose::Transactional, Purpose::Marketing],
            received_at: ctx.now,
        })];
        out.extend(fall_back(state, customer_id, sent, ctx, code));
        return out;
    }
    if is_undeliverable(sent.message.channel, code) {
        return fall_back(state, customer_id, sent, ctx, code);
    }
    if let Some(stop) = marketing_stop(&sent.message, code, ctx) {
        let detail = match stop.resumes_at {
            None => format!(
                "the provider refused it with error {code}: the customer turned marketing messages off"
            ),
            Some(at) => format!(
                "the provider refused it with error {code}: marketing to the customer is paused until {}",
                iso_date(at)
            ),
        };
        let mut out = vec![Outcome::MarketingStopped(stop)];
        out.extend(suppressed_planned(
            &sent.message,
            SuppressionReason::MarketingStopped,
            detail,
        ));
        return out;
    }
    match refusal_reason(code) {
        Some(reason) => suppressed_planned(
            &sent.message,
            reason,
            format!("the provider refused it with error {code}"),
        ),
        None => vec![],
    }
}

/// What a refusal of a marketing message with 131048 (spam rate limit), 131049 (the provider
/// limits marketing to this user for now) or 131050 (the user turned marketing messages off)
/// stops: only the last waits for a new consent; the others pause for the configured hours.
fn marketing_stop(refused: &MessageApproved, code: i32, ctx: &Ctx) -> Option<MarketingStopped> {
    if refused.purpose != Purpose::Marketing {
        return None;
    }
    let resumes_at = match code {
        131050 => None,
        131048 | 131049 => {
            Some(ctx.now + ctx.topology.policy.provider_marketing_pause_hours * HOUR)
        }
        _ => return None,
    };
    Some(MarketingStopped {
        message_id: refused.message_id.clone(),
        error_code: code,
        channel: refused.channel,
        stopped_at: ctx.now,
        resumes_at,
    })
}

/// Whether marketing to the customer is stopped now, and until when (`None`: until a new
/// marketing consent). A pause ends at its time; a turn-off ends with a marketing grant
/// given after it, on any channel.
fn marketing_stopped_until(state: &CustomerState, ctx: &Ctx) -> Option<(Option<Millis>, String)> {
    if let Some(off) = &state.marketing_turned_off {
        let granted_since = state
            .consent
            .iter()
            .any(|c| c.purpose == Purpose::Marketing && c.granted && c.changed_at > off.stopped_at);
        if !granted_since {
            return Some((
                None,
                format!(
                    "the customer turned marketing messages off at the provider (error {} on {:?}, {}); a new marketing consent lifts it",
                    off.error_code,
                    off.channel,
                    iso_date(off.stopped_at)
                ),
            ));
        }
    }
    let paused = state.marketing_paused.as_ref()?;
    let until = paused.resumes_at.filter(|t| *t > ctx.now)?;
    Some((
        Some(until),
        format!(
            "the provider paused marketing to the customer (error {} on {:?}) until {}",
            paused.error_code,
            paused.channel,
            iso_date(until)
        ),
    ))
}

fn fall_back(
    state: &CustomerState,
    customer_id: &str,
    sent: &crate::state::RecentSend,
    ctx: &Ctx,
    code: i32,
) -> Vec<Outcome> {
    let failed = &sent.message;
    let channels = &ctx.topology.policy.channels;
    let after = channels
        .iter()
        .position(|c| *c == failed.channel)
        .map_or(channels.len(), |i| i + 1);
    let message_id = deterministic_id(&[customer_id, &failed.message_id, "fallback"]);
    if state.approved.contains(&message_id) {
        return vec![];
    }
    let redo = MessageApproved {
        message_id: message_id.clone(),
        ..failed.clone()
    };
    let (channel, consent, recipient) =
        match choose_channel(state, failed.purpose, &channels[after..]) {
            Ok(c) => c,
            Err((reason, detail)) => {
                return suppressed_planned(
                    &redo,
                    reason,
                    format!(
                        "{:?} undeliverable; no fallback channel: {detail}",
                        failed.channel
                    ),
                )
            }
        };
    let mut planned = MessageApproved {
        channel,
        recipient: recipient.to_string(),
        consent_artifact_id: consent.artifact_id.clone(),
        consent_granted_at: consent.changed_at,
        delivery: Delivery::Template,
        ..redo
    };
    planned.relied_on.insert(
        "fallback_from".into(),
        format!(
            "{} on {:?} (error {code})",
            failed.message_id, failed.channel
        ),
    );
    let template = ctx
        .topology
        .catalog
        .variants(&failed.template_name)
        .and_then(|v| v.first());
    let ttl = template.map_or(72, |t| t.ttl_hours);
    when_to_send(state, planned, sent.approved_at + ttl * HOUR, ctx)
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
            ..m.clone()
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
}
