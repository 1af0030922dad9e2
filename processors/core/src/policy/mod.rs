//! Policy: whether, when, on which channel and with which template a message goes, or why it
//! does not. One concern per file, from the bottom up: `outcome` (what policy is asked, and
//! suppressing or holding), `channel` (channel and address), `template` (template, locale,
//! variables), `timing` (quiet hours, caps, the session window), `message` (deciding a message
//! and a held one), `status` (what the provider's failure calls for), `inbound` (opt-out
//! keywords and escalation).

pub mod channel;
pub mod inbound;
pub mod message;
pub mod outcome;
pub mod status;
pub mod template;
pub mod timing;

#[cfg(test)]
mod tests;

pub use inbound::decide_inbound;
pub use message::{decide_deferred, decide_message};
pub use outcome::{Request, Trigger};
pub use status::decide_status;
pub use template::iso_date;
