//! What every channel's adapter is: the [`Provider`] trait (send one message, answer with a
//! [`SendOutcome`]), the message on its way out, the registry of configured providers, and the
//! HTTP client they share.

use crate::dispatch::SendOutcome;
use crate::events::{Channel, MessageApproved};
use anyhow::Result;
use std::sync::Arc;
use std::time::Duration;

/// One message on its way out: the approval with the recipient's clear address, and its
/// composed text where the channel carries text (SMS, e-mail, a WhatsApp session message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub customer_id: String,
    pub approved: MessageApproved,
    pub text: Option<String>,
    /// The W3C trace context of the call, sent as its `traceparent` header and in the callback
    /// data its status webhooks echo.
    pub traceparent: Option<String>,
}

/// What each channel's provider adapter does: carry one message and say how the call ended.
/// Object-safe, so dispatch holds one per channel behind the same pointer type.
pub trait Provider: Send + Sync {
    /// The channel it carries.
    fn channel(&self) -> Channel;
    /// Sends one message; never retries by itself (dispatch decides that from the outcome).
    fn send<'a>(&'a self, message: &'a Outgoing) -> futures::future::BoxFuture<'a, SendOutcome>;
}

/// The providers dispatch sends through, at most one per channel.
#[derive(Clone, Default)]
pub struct Providers {
    by_channel: std::collections::BTreeMap<Channel, Arc<dyn Provider>>,
    /// Why a channel has none, naming the setting that would give it one.
    unconfigured: std::collections::BTreeMap<Channel, String>,
}

impl Providers {
    /// Adds (or replaces) the provider of its channel.
    pub fn with(mut self, provider: Arc<dyn Provider>) -> Self {
        self.by_channel.insert(provider.channel(), provider);
        self
    }

    /// Notes why `channel` has no provider (the settings it lacks), for the dead letters of
    /// the messages approved for it.
    pub fn without(mut self, channel: Channel, why: &str) -> Self {
        self.unconfigured.insert(channel, why.to_string());
        self
    }

    /// Why a message on `channel` cannot be sent: no provider, and what would give it one.
    pub fn missing(&self, channel: Channel) -> String {
        match self.unconfigured.get(&channel) {
            Some(why) => format!("no {channel:?} provider is configured: {why}"),
            None => format!("no {channel:?} provider is configured"),
        }
    }

    /// The provider of a channel, if one is configured.
    pub fn of(&self, channel: Channel) -> Option<&Arc<dyn Provider>> {
        self.by_channel.get(&channel)
    }
}

/// Reads an HTTP call's failure to get an answer: a connection never made is safe to try
/// again; anything later (a timeout, a connection lost mid-answer) may have sent the message.
pub fn unanswered_or_undelivered(e: reqwest::Error) -> SendOutcome {
    if e.is_connect() {
        SendOutcome::NotDelivered(e.to_string())
    } else {
        SendOutcome::Unanswered(e.to_string())
    }
}

/// An HTTP client with Herald's timeouts for a provider: `timeout` for the whole answer, at
/// most 3 s to connect.
pub fn http_client(timeout: Duration) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(3)))
        .pool_max_idle_per_host(8)
        .build()?)
}
