//! Deciding a message: the order in which policy's rules apply to a message a fact or a
//! journey asks for, and to one held until its time.

use crate::context::Ctx;
use crate::events::*;
use crate::journey_guard::{self, Check, SUBJECT_FACT};
use crate::policy::channel::*;
use crate::policy::outcome::*;
use crate::policy::template::*;
use crate::policy::timing::*;
use crate::sorted_map::SortedMap;
use crate::state::{CustomerState, ANNOUNCES, HOUR_MS as HOUR};

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
    let mut relied_on = SortedMap::new();
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
        variables: SortedMap::new(),
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
