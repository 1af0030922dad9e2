//! What a provider's answer means: whether the call is tried again, which steps are recorded,
//! what goes back to policy, when a lane halts, and what goes to the dead-letter topic. The
//! dispatch stage makes the call and carries these out; it decides none of them.

use super::intent::record;
use crate::context::deterministic_id;
use crate::events::*;
use crate::pacing::{self, CallEnd};
use crate::provider_codes::{self, ErrorAction};

/// A provider's answer to one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// Accepted; the provider's message id (wamid).
    Accepted(String),
    /// Refused with the provider's error code.
    Rejected {
        code: i32,
        retryable: bool,
        detail: String,
    },
    /// The request never reached the provider (no connection): safe to try again.
    NotDelivered(String),
    /// The request may have reached the provider but no answer came back (a timeout, a
    /// connection lost mid-answer): the message may be out, so only a status settles it.
    Unanswered(String),
}

impl SendOutcome {
    /// What the call says about the provider's health, for its circuit breaker and the
    /// sender's bucket: a server-side fault or silence counts against the provider, a refusal
    /// of the message does not.
    pub fn call_end(&self) -> CallEnd {
        match self {
            SendOutcome::Accepted(_) => CallEnd::Answered,
            SendOutcome::Rejected { code, .. } => provider_codes::call_end_of_refusal(*code),
            SendOutcome::NotDelivered(_) | SendOutcome::Unanswered(_) => CallEnd::ProviderFailed,
        }
    }

    /// Whether calling again may help: a retryable refusal, or a request that never arrived.
    /// An unanswered call is not: the message may be out.
    pub fn may_retry(&self) -> bool {
        matches!(
            self,
            SendOutcome::Rejected {
                retryable: true,
                ..
            } | SendOutcome::NotDelivered(_)
        )
    }
}

/// Calls one attempt may make: the first and three retries, each through the pacer.
pub const MAX_TRIES: u32 = 4;

/// What follows a finished call, given the calls this attempt has made (this one included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterCall {
    /// Call again, through the pacer, not before this time.
    Retry { not_before: Millis },
    /// The attempt is over: record its answer.
    Record,
}

/// Whether a call is tried again; `jitter` (0.0 to 1.0) comes from the caller, so the rule
/// stays deterministic and retries of many sends refused at once still spread out.
pub fn after_call(outcome: &SendOutcome, tries: u32, now: Millis, jitter: f64) -> AfterCall {
    if outcome.may_retry() && tries < MAX_TRIES {
        AfterCall::Retry {
            not_before: now + pacing::retry_backoff_ms(tries, jitter),
        }
    } else {
        AfterCall::Record
    }
}

/// Everything one finished attempt comes to.
#[derive(Debug, Clone, PartialEq)]
pub struct Answered {
    /// `Attempted`, then the outcome's step, to append to the dispatch log in this order.
    pub records: Vec<DispatchRecord>,
    /// A refusal policy must hear of, as the failed status the provider would have posted; it
    /// goes to the provider topic in the same transaction, so policy reads it like a webhook.
    pub to_policy: Option<InputEvent>,
    /// Why the approval goes to the dead-letter topic (a code no table knows), if it does.
    pub dead_letter: Option<String>,
    /// The channel and code of an account or number block: the lane halts until someone acts.
    pub halt: Option<(Channel, i32)>,
}

/// What an attempt's answer records and sets off. `tries` counts the calls it made.
pub fn answer(
    decision: &Decision,
    approved: &MessageApproved,
    attempt: i32,
    tries: u32,
    outcome: SendOutcome,
    now: Millis,
) -> Answered {
    let attempted = record(
        decision,
        approved,
        DispatchStep::Attempted(DispatchAttempted { attempt }),
        now,
    );
    let mut answered = Answered {
        records: vec![attempted],
        to_policy: None,
        dead_letter: None,
        halt: None,
    };
    let step = match outcome {
        SendOutcome::Accepted(id) => DispatchStep::Accepted(DispatchAccepted {
            provider_message_id: id,
        }),
        SendOutcome::Rejected {
            code,
            retryable,
            detail,
        } => {
            match provider_codes::classify(approved.channel, code) {
                ErrorAction::ReturnToPolicy
                | ErrorAction::Fallback
                | ErrorAction::StopMarketing => {
                    answered.to_policy = Some(refusal_for_policy(decision, approved, code, now));
                }
                ErrorAction::Unknown => {
                    answered.dead_letter = Some(format!(
                        "provider error code {code} is not one Herald knows: {detail}"
                    ));
                }
                ErrorAction::StopLane => answered.halt = Some((approved.channel, code)),
                ErrorAction::Retry => {}
            }
            DispatchStep::Failed(DispatchFailed {
                code,
                retryable,
                detail: format!("{detail} (after {tries} tries)"),
            })
        }
        SendOutcome::NotDelivered(e) => DispatchStep::Failed(DispatchFailed {
            code: 0,
            retryable: true,
            detail: format!("provider unreachable after {tries} tries: {e}"),
        }),
        SendOutcome::Unanswered(e) => {
            DispatchStep::Unanswered(DispatchUnanswered { attempt, detail: e })
        }
    };
    answered.records.push(record(decision, approved, step, now));
    answered
}

/// The failed status a refusal stands for, under an id derived from the message and code, so
/// that a replay of the answer writes the same event and dedupe recognises it.
fn refusal_for_policy(
    decision: &Decision,
    approved: &MessageApproved,
    code: i32,
    now: Millis,
) -> InputEvent {
    let message_id = &approved.message_id;
    InputEvent::new(
        "dispatch",
        &decision.customer_id,
        &deterministic_id(&[message_id, "refused", &code.to_string()]),
        now,
        Fact::MessageStatusChanged(MessageStatusChanged {
            provider_message_id: String::new(),
            status: MessageStatus::Failed,
            error_code: Some(code),
            message_id: Some(message_id.clone()),
        }),
    )
}

/// Why a send cannot be called at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uncallable {
    /// The recipient has no address: erased before it went out, or never given.
    NoAddress,
    /// No provider is configured for the channel (the reason names what to set).
    NoProvider(String),
    /// The text of a text channel cannot be composed from the catalog.
    CannotCompose(String),
}

/// A send that could not be called: the failure to record and, when someone can fix what
/// stopped it, why it goes to the dead-letter topic (so `herald dlq replay` can send it then).
#[derive(Debug, Clone, PartialEq)]
pub struct Uncalled {
    pub record: DispatchRecord,
    pub dead_letter: Option<String>,
}

/// What a send that cannot be called records. A missing address cannot be fixed by trying
/// again, so it only fails; a missing provider or an uncomposable text is a person's to fix.
pub fn uncalled(
    decision: &Decision,
    approved: &MessageApproved,
    why: Uncallable,
    now: Millis,
) -> Uncalled {
    let (detail, dead_letter) = match why {
        Uncallable::NoAddress => (
            "no address for this recipient: the customer was erased, or the CRM topic never gave one"
                .to_string(),
            false,
        ),
        Uncallable::NoProvider(why) => (why, true),
        Uncallable::CannotCompose(e) => (
            format!("cannot compose the {:?} text: {e}", approved.channel),
            true,
        ),
    };
    let failed = DispatchStep::Failed(DispatchFailed {
        code: 0,
        retryable: false,
        detail: detail.clone(),
    });
    Uncalled {
        record: record(decision, approved, failed, now),
        dead_letter: dead_letter.then_some(detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::intent::tests::approval;

    fn rejected(code: i32) -> SendOutcome {
        SendOutcome::Rejected {
            code,
            retryable: provider_codes::is_retryable(Channel::Whatsapp, code),
            detail: "refused".into(),
        }
    }

    #[test]
    fn a_throttled_call_is_retried_with_backoff_until_the_tries_run_out() {
        let throttled = rejected(130429);
        assert_eq!(
            after_call(&throttled, 1, 1_000, 0.0),
            AfterCall::Retry { not_before: 1_050 }
        );
        assert_eq!(
            after_call(&throttled, 2, 1_000, 1.0),
            AfterCall::Retry { not_before: 1_150 },
            "doubled, plus the caller's jitter of half again"
        );
        assert_eq!(
            after_call(&throttled, MAX_TRIES, 1_000, 0.0),
            AfterCall::Record
        );
        let unanswered = SendOutcome::Unanswered("timeout".into());
        assert_eq!(
            after_call(&unanswered, 1, 1_000, 0.0),
            AfterCall::Record,
            "the message may be out: only a status settles it"
        );
    }

    #[test]
    fn a_refusal_policy_must_hear_of_goes_back_as_a_failed_status() {
        let (d, m) = approval();
        let a = answer(&d, &m, 1, 1, rejected(131026), 9);
        let steps: Vec<String> = a.records.iter().map(|r| r.step.summary()).collect();
        assert_eq!(
            steps,
            vec!["Attempted:1".to_string(), "Failed:131026".into()]
        );
        let back = a
            .to_policy
            .expect("the undeliverable message returns to policy");
        let Fact::MessageStatusChanged(s) = &back.fact else {
            panic!("{back:?}")
        };
        assert_eq!(
            (s.status, s.error_code, s.message_id.as_deref()),
            (MessageStatus::Failed, Some(131026), Some("m-1"))
        );
        assert_eq!(back.envelope.customer_id, "c-1");
        let again = answer(&d, &m, 1, 1, rejected(131026), 99);
        assert_eq!(
            again.to_policy.map(|e| e.envelope.event_id),
            Some(back.envelope.event_id),
            "a replayed answer writes the same event id"
        );
        assert!(a.halt.is_none() && a.dead_letter.is_none());
    }

    #[test]
    fn a_blocked_account_halts_its_lane_and_an_unknown_code_is_dead_lettered() {
        let (d, m) = approval();
        let blocked = answer(&d, &m, 1, 1, rejected(368), 9);
        assert_eq!(blocked.halt, Some((Channel::Whatsapp, 368)));
        assert!(blocked.to_policy.is_none());
        let unknown = answer(&d, &m, 1, 1, rejected(987_654), 9);
        assert!(unknown
            .dead_letter
            .is_some_and(|why| why.contains("987654")));
    }

    #[test]
    fn an_unreachable_recipient_fails_without_a_dead_letter_a_missing_provider_with_one() {
        let (d, m) = approval();
        let none = uncalled(&d, &m, Uncallable::NoAddress, 9);
        assert!(none.dead_letter.is_none());
        assert_eq!(none.record.step.summary(), "Failed:0");
        let missing = uncalled(&d, &m, Uncallable::NoProvider("no SMS provider".into()), 9);
        assert_eq!(missing.dead_letter.as_deref(), Some("no SMS provider"));
    }
}
