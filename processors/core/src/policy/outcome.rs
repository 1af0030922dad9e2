//! Policy's vocabulary: what it is asked to decide (a fact that reached it, a message a journey
//! asks for), and how a planned message ends up suppressed or held.

use crate::context::Ctx;
use crate::events::*;
use crate::state::HOUR_MS as HOUR;

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

pub(crate) fn suppress(
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
pub(crate) fn suppressed_planned(
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

/// Suppressions a journey check ended with, addressed to this planned message.
pub(crate) fn end_planned(planned: &MessageApproved, outcomes: Vec<Outcome>) -> Vec<Outcome> {
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
pub(crate) fn hold(
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
pub(crate) fn hold_for(
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
