//! Channel and address: which channel a message takes (the customer's preference, consent and
//! an address on it), and whether the WhatsApp customer service window is open.

use crate::context::Ctx;
use crate::events::*;
use crate::state::{ConsentEntry, CustomerState, HOUR_MS as HOUR};

/// The address a channel delivers to, if the customer has one on file.
pub(crate) fn address(state: &CustomerState, channel: Channel) -> Option<&str> {
    let p = &state.profile;
    match channel {
        Channel::Whatsapp | Channel::Sms => p.phone_e164.as_deref(),
        Channel::Email => p.email.as_deref(),
    }
    .filter(|a| !a.trim().is_empty())
}

/// The first channel, in the configured order, that the customer consented to for this
/// purpose and has an address for; or why there is none, channel by channel.
pub(crate) fn choose_channel<'s>(
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

/// Until when the 24-hour customer service window is open, if it is open now.
pub(crate) fn session_open_until(state: &CustomerState, ctx: &Ctx) -> Option<Millis> {
    let until = state.last_inbound_at? + ctx.topology.policy.session_window_hours * HOUR;
    (until > ctx.now).then_some(until)
}
