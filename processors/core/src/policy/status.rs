//! Provider status: what a failed or refused message calls for (the next channel, a
//! suppression with the provider's code, a marketing stop, an SMS STOP's opt-out).

use crate::context::{deterministic_id, Ctx};
use crate::events::*;
use crate::policy::channel::*;
use crate::policy::outcome::*;
use crate::policy::template::*;
use crate::policy::timing::*;
use crate::provider_codes::{is_undeliverable, refusal_reason, SMS_UNSUBSCRIBED};
use crate::state::{CustomerState, HOUR_MS as HOUR};

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
pub(crate) fn marketing_stop(
    refused: &MessageApproved,
    code: i32,
    ctx: &Ctx,
) -> Option<MarketingStopped> {
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

pub(crate) fn fall_back(
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
        ..MessageApproved::clone(failed)
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
