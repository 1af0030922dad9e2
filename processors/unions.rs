//! Herald's enums whose variants are Avro union branches (facts, outcomes, dispatch steps),
//! listed once in branch order. Each list gives both the generic-value mapping (`avro.rs`)
//! and the direct serde one (`datum.rs`); several Herald records share a shape, so a branch is
//! always chosen and read by index.

use crate::events::*;
use anyhow::{bail, Result};
use apache_avro::types::Value;
use apache_avro::{from_value, to_value};
use serde::de::{self, VariantAccess};
use serde::ser::Serializer;

macro_rules! union_branches {
    (
        $value:ident, $from_value:ident, $write:ident, $read:ident,
        $enum:ident { $($idx:literal => $variant:ident($ty:ty)),* $(,)? }
    ) => {
        /// The generic Avro value of the branch's record.
        #[allow(unreachable_patterns)]
        pub(crate) fn $value(x: &$enum) -> Result<Value> {
            Ok(match x {
                $($enum::$variant(r) => to_value(r)?,)*
                _ => bail!("this record is written by hand"),
            })
        }
        /// The record of union branch `idx` (in the full union) from its generic value.
        pub(crate) fn $from_value(idx: usize, v: &Value) -> Result<$enum> {
            Ok(match idx {
                $($idx => $enum::$variant(from_value::<$ty>(v)?),)*
                other => bail!("union branch {other} is unknown to this Herald version"),
            })
        }
        /// Writes the record of `x` as branch `branch` of the union the serializer is at.
        #[allow(unreachable_patterns)]
        pub(crate) fn $write<S: Serializer>(x: &$enum, branch: u32, s: S) -> Result<S::Ok, S::Error> {
            match x {
                $($enum::$variant(r) => s.serialize_newtype_variant("", branch, "", r),)*
                _ => Err(serde::ser::Error::custom("this record is written by hand")),
            }
        }
        /// Reads the record of the union branch whose index (in the full union) is `idx`.
        pub(crate) fn $read<'de, A: VariantAccess<'de>>(idx: usize, v: A) -> Result<$enum, A::Error> {
            Ok(match idx {
                $($idx => $enum::$variant(v.newtype_variant::<$ty>()?),)*
                other => {
                    return Err(de::Error::custom(format!(
                        "union branch {other} is unknown to this Herald version"
                    )))
                }
            })
        }
    };
}

union_branches!(fact_value, fact_from_value, write_fact, read_fact, Fact {
    0 => OrderPlaced(OrderPlaced),
    1 => ShipmentDispatched(ShipmentDispatched),
    2 => ShipmentDelayed(ShipmentDelayed),
    3 => ShipmentOutForDelivery(ShipmentOutForDelivery),
    4 => ShipmentDelivered(ShipmentDelivered),
    5 => OrderCancelled(OrderCancelled),
    6 => CartAbandoned(CartAbandoned),
    7 => CartRecovered(CartRecovered),
    8 => PaymentCaptured(PaymentCaptured),
    9 => PaymentFailed(PaymentFailed),
    10 => RefundIssued(RefundIssued),
    11 => SubscriptionRenewalDue(SubscriptionRenewalDue),
    12 => SubscriptionRenewed(SubscriptionRenewed),
    13 => ConsentGranted(ConsentChange),
    14 => ConsentRevoked(ConsentChange),
    15 => ProfileChanged(ProfileChanged),
    16 => ErasureRequested(ErasureRequested),
    17 => MessageStatusChanged(MessageStatusChanged),
    18 => InboundMessageReceived(InboundMessageReceived),
    19 => TemplateStatusChanged(TemplateStatusChanged),
});

// `EventAccepted` (branch 0) is written by hand: its fact is itself a union.
union_branches!(
    outcome_value,
    outcome_from_value,
    write_outcome,
    read_outcome,
    Outcome {
    1 => DuplicateIgnored(DuplicateIgnored),
    2 => ShipmentHeld(ShipmentHeld),
    3 => ShipmentReleased(ShipmentReleased),
    4 => HoldExpired(HoldExpired),
    5 => MessageApproved(std::sync::Arc<MessageApproved>),
    6 => MessageSuppressed(MessageSuppressed),
    7 => MessageDeferred(MessageDeferred),
    8 => OptedOut(OptedOut),
    9 => MessageHeldOut(MessageHeldOut),
    10 => JourneyEntered(JourneyEntered),
    11 => JourneyAdvanced(JourneyAdvanced),
    12 => JourneyExited(JourneyExited),
    13 => EscalationRaised(EscalationRaised),
    14 => PreErasureFactIgnored(PreErasureFactIgnored),
    15 => MarketingStopped(MarketingStopped),
});

union_branches!(step_value, step_from_value, write_step, read_step, DispatchStep {
    0 => Attempted(DispatchAttempted),
    1 => Accepted(DispatchAccepted),
    2 => Failed(DispatchFailed),
    3 => Skipped(DispatchSkipped),
    4 => Intended(DispatchIntended),
    5 => Unanswered(DispatchUnanswered),
    6 => Reconciled(DispatchReconciled),
});
