//! Timing and caps: when a message may go (quiet hours, blackouts, the session window,
//! frequency caps, a marketing stop), or why it is held or dropped as stale.

use crate::context::Ctx;
use crate::events::*;
use crate::policy::channel::*;
use crate::policy::outcome::*;
use crate::policy::template::*;
use crate::quiet_hours::SendWindow;
use crate::state::{CustomerState, HOUR_MS as HOUR};

/// The customer's region for regional blackouts: the country part of their locale.
pub(crate) fn region(state: &CustomerState) -> Option<&str> {
    state.profile.locale.as_deref()?.split(['_', '-']).nth(1)
}

/// When the frequency caps let one more message of this category out: `None` if now.
pub(crate) fn cap_frees_at(
    state: &CustomerState,
    category: &str,
    ctx: &Ctx,
) -> Option<(Millis, String)> {
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
pub(crate) fn when_to_send(
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
        _ => return vec![Outcome::MessageApproved(planned.into())],
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
            vec![Outcome::MessageApproved(planned.into())]
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

/// Whether marketing to the customer is stopped now, and until when (`None`: until a new
/// marketing consent). A pause ends at its time; a turn-off ends with a marketing grant
/// given after it, on any channel.
pub(crate) fn marketing_stopped_until(
    state: &CustomerState,
    ctx: &Ctx,
) -> Option<(Option<Millis>, String)> {
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
