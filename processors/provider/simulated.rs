//! The simulated provider's state, shared by each adapter's simulator endpoint: what it
//! received, its limits, the failures it injects, and the signed callbacks it posts.

use super::callback::parse_callback_data;
use crate::events::Channel;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One send the simulator accepted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SimulatedSend {
    pub channel: Channel,
    pub to: String,
    /// The template's name (empty for a message sent as text).
    pub template: String,
    pub language: String,
    pub callback_data: String,
    /// Herald's message id, from the callback data (the whole of it if Herald did not write it).
    pub message_id: String,
    pub parameters: Vec<(String, String)>,
    /// The text of a message sent as text (SMS, e-mail, a WhatsApp session message).
    pub text: Option<String>,
    /// The provider's message id (the simulator assigns it when it records the send).
    pub wamid: String,
}

/// Herald's message id in a send's callback data (the whole of it if Herald did not write it).
pub(crate) fn message_id_of(callback_data: &str) -> String {
    parse_callback_data(callback_data)
        .map_or(callback_data, |(_, m)| m)
        .to_string()
}

impl SimulatedSend {
    /// A message sent as text on `channel`; its provider id is given when it is recorded.
    pub fn text(channel: Channel, to: &str, callback_data: &str, text: &str) -> Self {
        SimulatedSend {
            channel,
            to: to.to_string(),
            template: String::new(),
            language: String::new(),
            callback_data: callback_data.to_string(),
            message_id: message_id_of(callback_data),
            parameters: vec![],
            text: Some(text.to_string()),
            wamid: String::new(),
        }
    }
}

/// How the simulator behaves beyond answering: the limits it enforces, the failures it
/// injects, and the status webhooks it posts.
#[derive(Debug, Clone)]
pub struct SimulatorOptions {
    /// Where to post signed status webhooks (the gateway's `/webhook`); none when absent.
    pub webhook_url: Option<String>,
    /// The app secret webhooks are signed with.
    pub app_secret: Vec<u8>,
    /// Seed of the failures and delays.
    pub seed: u64,
    /// Messages per second one sender number may send (the Cloud API's default is 80).
    pub sender_per_s: f64,
    /// One message per this interval to one recipient, after a burst of `pair_burst`.
    pub pair_interval: Duration,
    pub pair_burst: f64,
    /// Share of sends accepted whose answer is held back past the client's patience.
    pub drop_answer_rate: f64,
    /// How long such an answer is held back.
    pub withhold_answer_for: Duration,
    /// Share of sends refused with a transient fault (131000), which a retry may pass.
    pub transient_failure_rate: f64,
    /// Share of accepted sends that later fail as undeliverable (a `failed` status, 131026).
    pub undeliverable_rate: f64,
    /// Share of session (text) messages refused as outside the customer service window.
    pub window_closed_rate: f64,
    /// Share of template messages refused in the answer because the template is paused
    /// (132015), as the Cloud API does after quality complaints.
    pub template_paused_rate: f64,
    /// Share of status webhooks posted twice.
    pub duplicate_webhook_rate: f64,
    /// Each status webhook is posted after a delay up to this; independent delays reorder them.
    pub max_webhook_delay: Duration,
    /// The SMS account's auth token, which signs its status callbacks.
    pub sms_auth_token: Vec<u8>,
    /// Messages per second the SMS account may send.
    pub sms_per_s: f64,
    /// Where the e-mail provider posts its event webhook (the gateway's `/webhooks/email`).
    pub email_webhook_url: Option<String>,
    /// The basic-auth user and password of the e-mail event webhook.
    pub email_webhook_auth: (String, String),
    /// Requests per second the e-mail API key may make.
    pub email_per_s: f64,
}

impl Default for SimulatorOptions {
    fn default() -> Self {
        SimulatorOptions {
            webhook_url: None,
            app_secret: Vec::new(),
            seed: 7,
            sender_per_s: 80.0,
            pair_interval: Duration::from_secs(6),
            pair_burst: 45.0,
            drop_answer_rate: 0.0,
            withhold_answer_for: Duration::from_secs(15),
            transient_failure_rate: 0.0,
            undeliverable_rate: 0.0,
            window_closed_rate: 0.0,
            template_paused_rate: 0.0,
            duplicate_webhook_rate: 0.0,
            max_webhook_delay: Duration::from_millis(500),
            sms_auth_token: Vec::new(),
            sms_per_s: 100.0,
            email_webhook_url: None,
            email_webhook_auth: (String::new(), String::new()),
            email_per_s: 600.0,
        }
    }
}

/// A token bucket: `capacity` tokens, refilled at `per_s`.
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    pub(crate) tokens: f64,
    pub(crate) at: std::time::Instant,
}

impl Bucket {
    pub(crate) fn take(&mut self, capacity: f64, per_s: f64, now: std::time::Instant) -> bool {
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * per_s).min(capacity);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What the simulator received and did, shared with whoever started it.
#[derive(Default)]
pub struct SimulatorLog {
    pub sends: Mutex<Vec<SimulatedSend>>,
    pub rejected: Mutex<u64>,
    /// Accepted sends whose answer was held back.
    pub answers_dropped: std::sync::atomic::AtomicU64,
    /// Status webhooks the gateway acknowledged with a 2xx.
    pub webhooks_delivered: std::sync::atomic::AtomicU64,
    /// Status webhooks given up on after every retry.
    pub webhooks_abandoned: std::sync::atomic::AtomicU64,
    /// Status webhooks scheduled and not yet delivered or abandoned (a gauge).
    pub webhooks_pending: std::sync::atomic::AtomicU64,
}

/// The simulator's shared state: its log, options, limits and randomness.
pub(crate) struct Simulator {
    pub(crate) log: Arc<SimulatorLog>,
    pub(crate) options: SimulatorOptions,
    pub(crate) rng: Mutex<crate::scenario::Rng>,
    pub(crate) sender: Mutex<Option<Bucket>>,
    pub(crate) sms_sender: Mutex<Option<Bucket>>,
    pub(crate) email_sender: Mutex<Option<Bucket>>,
    pub(crate) pairs: Mutex<std::collections::HashMap<String, Bucket>>,
    pub(crate) http: reqwest::Client,
}

impl Simulator {
    pub(crate) fn chance(&self, p: f64) -> bool {
        p > 0.0 && self.rng.lock().map(|mut r| r.chance(p)).unwrap_or(false)
    }
    pub(crate) fn below(&self, n: u64) -> u64 {
        self.rng.lock().map(|mut r| r.below(n)).unwrap_or(0)
    }

    /// Counts a refused send.
    pub(crate) fn count_rejection(&self) {
        if let Ok(mut r) = self.log.rejected.lock() {
            *r += 1;
        }
    }

    pub(crate) fn take(bucket: &Mutex<Option<Bucket>>, per_s: f64) -> bool {
        let now = std::time::Instant::now();
        bucket.lock().is_ok_and(|mut b| {
            b.get_or_insert(Bucket {
                tokens: per_s.max(1.0),
                at: now,
            })
            .take(per_s.max(1.0), per_s, now)
        })
    }

    /// Whether the SMS account may send one more message now.
    pub(crate) fn take_sms_sender_token(&self) -> bool {
        Self::take(&self.sms_sender, self.options.sms_per_s)
    }

    /// Whether the e-mail API key may make one more request now.
    pub(crate) fn take_email_token(&self) -> bool {
        Self::take(&self.email_sender, self.options.email_per_s)
    }

    /// Records an accepted send under a new provider id starting with `id_prefix` (`wamid.`,
    /// `SM`), and returns the id; `None` if the log is poisoned.
    pub(crate) fn record(&self, mut send: SimulatedSend, id_prefix: &str) -> Option<String> {
        let mut sends = self.log.sends.lock().ok()?;
        let id = format!("{id_prefix}HERALDSIM{:012}", sends.len() + 1);
        send.wamid = id.clone();
        sends.push(send);
        Some(id)
    }

    /// Posts one callback to `url` after a random delay, twice at the duplicate rate, and
    /// retries it until the receiver answers 2xx, as providers do.
    pub(crate) fn post_callbacks(
        self: &Arc<Self>,
        url: String,
        content_type: &'static str,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
    ) {
        let copies = if self.chance(self.options.duplicate_webhook_rate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = Duration::from_millis(
                self.below(self.options.max_webhook_delay.as_millis() as u64 + 1),
            );
            let callback = Callback {
                url: url.clone(),
                content_type,
                headers: headers.clone(),
                body: body.clone(),
            };
            self.log
                .webhooks_pending
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::spawn(post_webhook(self.clone(), callback, delay));
        }
    }

    /// Holds the answer back past the client's patience at the drop rate (the message is out,
    /// the answer saying so never arrives in time); true if it did.
    pub(crate) async fn withholds_answer(&self) -> bool {
        if !self.chance(self.options.drop_answer_rate) {
            return false;
        }
        self.log
            .answers_dropped
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(self.options.withhold_answer_for).await;
        true
    }
}

/// One callback the simulator posts.
struct Callback {
    pub(crate) url: String,
    pub(crate) content_type: &'static str,
    pub(crate) headers: Vec<(&'static str, String)>,
    pub(crate) body: Vec<u8>,
}

impl SimulatorLog {
    /// The sends accepted so far.
    pub fn sent(&self) -> Vec<SimulatedSend> {
        self.sends.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// How many sends were accepted so far.
    pub fn sent_count(&self) -> usize {
        self.sends.lock().map(|s| s.len()).unwrap_or(0)
    }
}

/// Posts one signed webhook after `delay`, retrying with backoff until the gateway answers
/// 2xx, as the provider does (for a while).
async fn post_webhook(sim: Arc<Simulator>, callback: Callback, delay: Duration) {
    deliver_webhook(&sim, callback, delay).await;
    sim.log
        .webhooks_pending
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
}

async fn deliver_webhook(sim: &Simulator, callback: Callback, delay: Duration) {
    tokio::time::sleep(delay).await;
    let mut backoff = Duration::from_millis(200);
    for _ in 0..10 {
        let mut request = sim
            .http
            .post(&callback.url)
            .header("content-type", callback.content_type)
            .body(callback.body.clone());
        for (name, value) in &callback.headers {
            request = request.header(*name, value);
        }
        let sent = request.send().await;
        if sent.is_ok_and(|r| r.status().is_success()) {
            sim.log
                .webhooks_delivered
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    sim.log
        .webhooks_abandoned
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}
