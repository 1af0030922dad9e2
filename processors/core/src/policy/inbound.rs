//! Inbound messages: opt-out keywords and buttons, and escalation of what a person must read.

use crate::context::Ctx;
use crate::events::*;
use crate::state::CustomerState;
use std::collections::BTreeMap;

/// Normalises an inbound message for keyword matching: trimmed of spaces and punctuation,
/// inner spaces collapsed, upper case.
pub(crate) fn normalise(text: &str) -> String {
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
