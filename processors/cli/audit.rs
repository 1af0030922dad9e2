//! `herald audit`: a customer's consent timeline, and the hash-chain check of every customer's.

use super::args::*;
use crate::telemetry::{self};
use anyhow::{bail, Result};
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum AuditAction {
    /// One customer's consent changes (grant, revoke, source, artifact, chain link) and every
    /// business-initiated decision that relied on each grant, in order.
    Consent {
        /// The customer id, as the input events carry it.
        #[arg(long)]
        customer: String,
        /// Only what was decided up to this instant (RFC 3339, e.g. 2026-11-01T00:00:00Z).
        #[arg(long)]
        as_of: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        source: LogSource,
    },
    /// Recomputes every customer's consent hash chain; exits 1 naming each break.
    Verify {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        source: LogSource,
    },
}

/// Runs `herald audit`.
pub fn run(action: AuditAction) -> Result<()> {
    match action {
        AuditAction::Consent {
            customer,
            as_of,
            json,
            source,
        } => {
            telemetry::init_tracing("warn")?;
            let as_of = as_of
                .as_deref()
                .map(|t| parse_instant("--as-of", t))
                .transpose()?;
            let decisions = source.decisions()?;
            let mine: Vec<&crate::events::Decision> = decisions
                .iter()
                .filter(|d| d.customer_id == customer)
                .collect();
            if mine.is_empty() {
                bail!("no decision about customer '{customer}' in this log");
            }
            let t = crate::audit::timeline(&customer, &mine, as_of);
            if json {
                println!("{}", serde_json::to_string(&t)?);
            } else {
                print!("{}", t.render(as_of));
            }
            Ok(())
        }
        AuditAction::Verify { json, source } => {
            telemetry::init_tracing("warn")?;
            let decisions = source.decisions()?;
            let v = crate::audit::verify(&decisions);
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!(
                    "{} customers, {} consent records: {} chained and intact, {} from before the chain, {} breaks",
                    v.customers,
                    v.consent_records,
                    v.intact,
                    v.unchained,
                    v.breaks.len()
                );
                for b in &v.breaks {
                    println!(
                        "  {} at consent record {} (decision {}): {}",
                        b.customer_id, b.position, b.decision_id, b.why
                    );
                }
            }
            if !v.breaks.is_empty() {
                bail!(
                    "the consent chain is broken for {} customers",
                    v.breaks.len()
                );
            }
            Ok(())
        }
    }
}
