//! Send pacing: which sends waiting for their provider call may be called now.
//!
//! Transactional and authentication messages wait in a lane ahead of marketing, so a marketing
//! backlog never holds them up. Every call spends a token of the sender number's bucket and
//! one of its recipient's (the provider's pair rate limit), a customer has one call under way
//! at a time (so their messages arrive in order), and a provider that keeps failing opens its
//! circuit breaker until a probe call succeeds. Pure: time is an argument.

use crate::events::{Channel, Millis, Purpose};
use std::collections::{HashMap, HashSet, VecDeque};

/// The lane a send waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    /// Transactional and authentication messages: always called first.
    Transactional,
    /// Marketing messages: called with whatever capacity the other lane leaves.
    Marketing,
}

impl Lane {
    /// The lane of a message with this purpose and provider template category.
    pub fn of(purpose: &Purpose, category: &str) -> Lane {
        if matches!(purpose, Purpose::Transactional)
            || category.eq_ignore_ascii_case("AUTHENTICATION")
        {
            Lane::Transactional
        } else {
            Lane::Marketing
        }
    }

    /// The lane's name in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Lane::Transactional => "transactional",
            Lane::Marketing => "marketing",
        }
    }

    fn index(self) -> usize {
        match self {
            Lane::Transactional => 0,
            Lane::Marketing => 1,
        }
    }
}

/// A token bucket holding at most `burst` tokens, refilled continuously at `per_second`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    tokens: f64,
    at: Millis,
    per_ms: f64,
    burst: f64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn full(per_second: f64, burst: f64, now: Millis) -> Self {
        TokenBucket {
            tokens: burst,
            at: now,
            per_ms: per_second / 1000.0,
            burst,
        }
    }

    fn tokens_at(&self, now: Millis) -> f64 {
        let elapsed = now.saturating_sub(self.at).max(0) as f64;
        (self.tokens + elapsed * self.per_ms).min(self.burst)
    }

    /// Whether a token is there at `now`.
    pub fn has_token(&self, now: Millis) -> bool {
        self.tokens_at(now) >= 1.0
    }

    /// Takes a token if one is there.
    pub fn take(&mut self, now: Millis) -> bool {
        let tokens = self.tokens_at(now);
        self.at = self.at.max(now);
        if tokens >= 1.0 {
            self.tokens = tokens - 1.0;
            true
        } else {
            self.tokens = tokens;
            false
        }
    }

    /// Empties the bucket: the provider said the rate was exceeded, so it gets a pause.
    pub fn drain(&mut self, now: Millis) {
        self.at = self.at.max(now);
        self.tokens = 0.0;
    }

    /// Whether the bucket is full again, so forgetting it changes nothing.
    fn is_full(&self, now: Millis) -> bool {
        self.tokens_at(now) >= self.burst
    }
}

/// A provider's circuit breaker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Breaker {
    /// Calls go through.
    Closed,
    /// No call goes through until `until`; then one probe call may.
    Open { until: Millis },
    /// A probe call is under way: its answer closes the breaker or opens it again.
    Probing,
    /// The provider blocked the account or number (this error code): no call goes until
    /// someone acts and restarts dispatch; nothing a retry does can succeed meanwhile.
    Halted { code: i32 },
}

impl Breaker {
    fn allows(&self, now: Millis) -> bool {
        match self {
            Breaker::Closed => true,
            Breaker::Open { until } => now >= *until,
            Breaker::Probing | Breaker::Halted { .. } => false,
        }
    }
}

/// The limits dispatch paces its calls by.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Messages per second per sender phone number (the Cloud API's default throughput is 80).
    pub sender_per_second: f64,
    /// Messages a sender number may send at once after a quiet spell.
    pub sender_burst: f64,
    /// Milliseconds between two messages to one recipient (the pair rate limit: 6 s).
    pub pair_interval_ms: u64,
    /// Messages one recipient may get at once before the pair interval applies.
    pub pair_burst: f64,
    /// Calls under way at once, at most.
    pub max_calls: usize,
    /// The breaker judges a provider by the calls that ended in this many last milliseconds
    /// (by share, not in a row: concurrent calls that time out all end together)...
    pub breaker_window_ms: Millis,
    /// ...once at least this many ended in it...
    pub breaker_min_calls: u32,
    /// ...and opens when at least this share of them failed.
    pub breaker_failure_share: f64,
    /// How long an open breaker stops calls before a probe.
    pub breaker_cooldown_ms: Millis,
}

/// The limits a dispatch runs with unless told otherwise: the Cloud API's default sender
/// throughput and pair rate limit, and a breaker that needs 20 calls in 10 s to judge.
pub const DEFAULT_LIMITS: Limits = Limits {
    sender_per_second: 80.0,
    sender_burst: 80.0,
    pair_interval_ms: 6_000,
    pair_burst: 45.0,
    max_calls: 256,
    breaker_window_ms: 10_000,
    breaker_min_calls: 20,
    breaker_failure_share: 0.5,
    breaker_cooldown_ms: 30_000,
};

impl Default for Limits {
    fn default() -> Self {
        DEFAULT_LIMITS
    }
}

/// A send waiting for its call.
#[derive(Debug, Clone)]
struct Waiting<T> {
    customer: String,
    channel: Channel,
    queued_at: Millis,
    /// A retry waits out its backoff: not called before this.
    not_before: Millis,
    send: T,
}

/// How long a retry of a call waits after its `tries`-th try failed retryably: 50 ms doubled
/// per try, plus `jitter` (0.0 to 1.0) of half that again, so that the retries of many sends
/// refused at once spread out.
pub fn retry_backoff_ms(tries: u32, jitter: f64) -> Millis {
    let base = 50i64 << tries.saturating_sub(1).min(10);
    base + (base as f64 / 2.0 * jitter.clamp(0.0, 1.0)) as Millis
}

/// A send the pacer lets go: call it now.
#[derive(Debug, Clone, PartialEq)]
pub struct Released<T> {
    pub lane: Lane,
    /// How long it waited in its lane.
    pub waited_ms: Millis,
    pub send: T,
}

/// How a call ended, as far as the provider's health goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallEnd {
    /// The provider answered (accepted or refused for a reason of the message).
    Answered,
    /// The provider answered that the sender's rate was exceeded.
    Throttled,
    /// The provider was unreachable, answered with a server error, or did not answer.
    ProviderFailed,
}

/// A lane scan looks at this many waiting sends at most, so a long queue of sends held by
/// their recipient's limit costs bounded time per round.
const SCAN_LIMIT: usize = 4_096;

/// Recipient buckets are forgotten once full again, checked when there are more than this.
const RECIPIENTS_KEPT: usize = 4_096;

/// The lanes of waiting sends and what paces their calls.
#[derive(Debug, Clone)]
pub struct Pacer<T> {
    limits: Limits,
    lanes: [VecDeque<Waiting<T>>; 2],
    /// Each channel's sender (a WhatsApp number, an SMS sender, an e-mail account) has its
    /// own bucket: an SMS never spends a WhatsApp number's token.
    senders: HashMap<Channel, TokenBucket>,
    recipients: HashMap<String, TokenBucket>,
    /// Customers with a call under way.
    calling: HashSet<String>,
    breakers: HashMap<Channel, Breaker>,
    /// When the latest calls per provider ended while its breaker was closed, and whether
    /// they failed.
    recent: HashMap<Channel, VecDeque<(Millis, bool)>>,
}

impl<T> Pacer<T> {
    /// An empty pacer.
    pub fn new(limits: Limits) -> Self {
        Pacer {
            limits,
            lanes: [VecDeque::new(), VecDeque::new()],
            senders: HashMap::new(),
            recipients: HashMap::new(),
            calling: HashSet::new(),
            breakers: HashMap::new(),
            recent: HashMap::new(),
        }
    }

    /// Queues a send at the back of its lane.
    pub fn queue(&mut self, lane: Lane, customer: &str, channel: Channel, send: T, now: Millis) {
        self.lanes[lane.index()].push_back(Waiting {
            customer: customer.to_string(),
            channel,
            queued_at: now,
            not_before: now,
            send,
        });
    }

    /// Puts a send whose call failed retryably back at the front of its lane (it was the
    /// first of its customer's), to be called again through the same buckets and breaker, not
    /// before `not_before`.
    pub fn retry(
        &mut self,
        lane: Lane,
        customer: &str,
        channel: Channel,
        send: T,
        queued_at: Millis,
        not_before: Millis,
    ) {
        self.lanes[lane.index()].push_front(Waiting {
            customer: customer.to_string(),
            channel,
            queued_at,
            not_before,
            send,
        });
    }

    /// Sends waiting in a lane.
    pub fn waiting(&self, lane: Lane) -> usize {
        self.lanes[lane.index()].len()
    }

    /// Calls under way.
    pub fn calling(&self) -> usize {
        self.calling.len()
    }

    /// Every waiting send, transactional lane first.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.lanes.iter().flatten().map(|w| &w.send)
    }

    /// The breaker of a channel's provider.
    pub fn breaker(&self, channel: Channel) -> Breaker {
        self.breakers
            .get(&channel)
            .cloned()
            .unwrap_or(Breaker::Closed)
    }

    fn releasable(&self, w: &Waiting<T>, now: Millis) -> bool {
        now >= w.not_before
            && !self.calling.contains(&w.customer)
            && self.sender_has_token(w.channel, now)
            && self.breaker(w.channel).allows(now)
            && self
                .recipients
                .get(&w.customer)
                .is_none_or(|b| b.has_token(now))
    }

    fn sender_has_token(&self, channel: Channel, now: Millis) -> bool {
        self.senders.get(&channel).is_none_or(|b| b.has_token(now))
    }

    /// Whether `release` would let a send go at `now`.
    pub fn has_releasable(&self, now: Millis) -> bool {
        if self.calling.len() >= self.limits.max_calls {
            return false;
        }
        self.lanes.iter().any(|lane| {
            lane.iter()
                .take(SCAN_LIMIT)
                .any(|w| self.releasable(w, now))
        })
    }

    /// Lets go the sends that may be called at `now`: the transactional lane first, each in
    /// queue order, skipping a send whose customer has a call under way, whose recipient has
    /// no token left or whose provider's breaker is open.
    pub fn release(&mut self, now: Millis) -> Vec<Released<T>> {
        let mut out = Vec::new();
        for lane in [Lane::Transactional, Lane::Marketing] {
            let mut i = 0;
            let mut scanned = 0;
            while i < self.lanes[lane.index()].len() && scanned < SCAN_LIMIT {
                if self.calling.len() >= self.limits.max_calls {
                    return out;
                }
                scanned += 1;
                if !self.releasable(&self.lanes[lane.index()][i], now) {
                    i += 1;
                    continue;
                }
                let Some(w) = self.lanes[lane.index()].remove(i) else {
                    break;
                };
                let limits = &self.limits;
                self.senders
                    .entry(w.channel)
                    .or_insert_with(|| {
                        TokenBucket::full(limits.sender_per_second, limits.sender_burst, now)
                    })
                    .take(now);
                self.recipients
                    .entry(w.customer.clone())
                    .or_insert_with(|| {
                        TokenBucket::full(
                            1000.0 / limits.pair_interval_ms.max(1) as f64,
                            limits.pair_burst,
                            now,
                        )
                    })
                    .take(now);
                if let Some(Breaker::Open { .. }) = self.breakers.get(&w.channel) {
                    self.breakers.insert(w.channel, Breaker::Probing);
                }
                self.calling.insert(w.customer.clone());
                out.push(Released {
                    lane,
                    waited_ms: now.saturating_sub(w.queued_at).max(0),
                    send: w.send,
                });
            }
        }
        if self.recipients.len() > RECIPIENTS_KEPT {
            self.recipients.retain(|_, b| !b.is_full(now));
        }
        out
    }

    /// A customer's call ended: their next send may go, and the provider's breaker learns
    /// how it went.
    pub fn ended(&mut self, customer: &str, channel: Channel, end: CallEnd, now: Millis) {
        self.calling.remove(customer);
        let failed = end == CallEnd::ProviderFailed;
        let next = match self.breaker(channel) {
            Breaker::Probing if failed => self.opened(now),
            Breaker::Probing => Breaker::Closed,
            // A call released before the breaker opened ends late: the breaker stays open.
            open @ Breaker::Open { .. } => open,
            halted @ Breaker::Halted { .. } => halted,
            Breaker::Closed => {
                let since = now - self.limits.breaker_window_ms;
                let recent = self.recent.entry(channel).or_default();
                recent.push_back((now, failed));
                while recent.front().is_some_and(|(at, _)| *at < since) {
                    recent.pop_front();
                }
                let failures = recent.iter().filter(|(_, f)| *f).count();
                if recent.len() >= self.limits.breaker_min_calls.max(1) as usize
                    && failures as f64 >= self.limits.breaker_failure_share * recent.len() as f64
                {
                    recent.clear();
                    self.opened(now)
                } else {
                    Breaker::Closed
                }
            }
        };
        self.breakers.insert(channel, next);
        if end == CallEnd::Throttled {
            if let Some(b) = self.senders.get_mut(&channel) {
                b.drain(now);
            }
        }
    }

    fn opened(&self, now: Millis) -> Breaker {
        Breaker::Open {
            until: now + self.limits.breaker_cooldown_ms,
        }
    }

    /// Stops every call to a channel's provider: it blocked the account or number.
    pub fn halt(&mut self, channel: Channel, code: i32) {
        self.breakers.insert(channel, Breaker::Halted { code });
    }

    /// Forgets a call whose answer will not come back here (its partition moved away): the
    /// customer's next send may go, and the breaker learns nothing.
    pub fn forget_call(&mut self, customer: &str) {
        self.calling.remove(customer);
    }

    /// Drops the waiting sends `keep` says no to.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        for lane in &mut self.lanes {
            lane.retain(|w| keep(&w.send));
        }
    }

    /// Drops every waiting send and forgets every call under way; limits and breakers stay.
    pub fn clear(&mut self) {
        for lane in &mut self.lanes {
            lane.clear();
        }
        self.calling.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            sender_per_second: 10.0,
            sender_burst: 10.0,
            pair_interval_ms: 6_000,
            pair_burst: 2.0,
            max_calls: 100,
            breaker_window_ms: 1_000,
            breaker_min_calls: 3,
            breaker_failure_share: 0.6,
            breaker_cooldown_ms: 1_000,
        }
    }

    fn sends(released: Vec<Released<u32>>) -> Vec<u32> {
        released.into_iter().map(|r| r.send).collect()
    }

    fn end_all(p: &mut Pacer<u32>, customers: impl IntoIterator<Item = String>, now: Millis) {
        for c in customers {
            p.ended(&c, Channel::Whatsapp, CallEnd::Answered, now);
        }
    }

    #[test]
    fn transactional_sends_go_before_a_marketing_backlog_queued_earlier() {
        let mut p = Pacer::new(limits());
        for i in 0..50 {
            p.queue(Lane::Marketing, &format!("m{i}"), Channel::Whatsapp, i, 0);
        }
        p.queue(Lane::Transactional, "t1", Channel::Whatsapp, 1000, 5);
        p.queue(Lane::Transactional, "t2", Channel::Whatsapp, 1001, 6);
        let first = sends(p.release(10));
        assert_eq!(first.len(), 10, "the sender's burst is 10");
        assert_eq!(&first[..2], &[1000, 1001]);
        // A transactional send queued behind a still-waiting marketing backlog takes the
        // next token, not the 41st.
        p.queue(Lane::Transactional, "t3", Channel::Whatsapp, 1002, 20);
        assert_eq!(sends(p.release(120)), vec![1002]);
    }

    #[test]
    fn the_sender_bucket_caps_the_rate_and_refills_with_time() {
        let mut p = Pacer::new(limits());
        for i in 0..100 {
            p.queue(Lane::Marketing, &format!("c{i}"), Channel::Whatsapp, i, 0);
        }
        let mut released = 0;
        for ms in (0..=2_000).step_by(50) {
            released += p.release(ms).len();
        }
        // 10 at once, then 10 per second for two seconds.
        assert_eq!(released, 30);
        assert!(!p.has_releasable(2_000));
        assert!(p.has_releasable(2_100));
    }

    #[test]
    fn a_recipient_gets_a_short_burst_then_one_message_per_pair_interval() {
        let mut p = Pacer::new(limits());
        for i in 0..5 {
            p.queue(Lane::Marketing, "same", Channel::Whatsapp, i, 0);
        }
        p.queue(Lane::Marketing, "other", Channel::Whatsapp, 99, 0);
        // One call under way per customer: in order, one after another.
        assert_eq!(sends(p.release(0)), vec![0, 99]);
        end_all(&mut p, ["same".to_string(), "other".to_string()], 1);
        assert_eq!(sends(p.release(1)), vec![1]);
        end_all(&mut p, ["same".to_string()], 2);
        // The burst of two is spent: the next waits for the pair interval.
        assert!(p.release(3).is_empty());
        assert!(p.release(5_999).is_empty());
        assert_eq!(sends(p.release(6_001)), vec![2]);
    }

    #[test]
    fn a_failing_provider_opens_its_breaker_and_one_probe_closes_it() {
        let mut p = Pacer::new(limits());
        for i in 0..3 {
            p.queue(
                Lane::Transactional,
                &format!("c{i}"),
                Channel::Whatsapp,
                i,
                0,
            );
        }
        p.queue(Lane::Transactional, "sms", Channel::Sms, 100, 0);
        assert_eq!(p.release(0).len(), 4);
        for c in 0..3 {
            p.ended(
                &format!("c{c}"),
                Channel::Whatsapp,
                CallEnd::ProviderFailed,
                10,
            );
        }
        assert_eq!(p.breaker(Channel::Whatsapp), Breaker::Open { until: 1_010 });
        assert_eq!(p.breaker(Channel::Sms), Breaker::Closed);
        p.queue(Lane::Transactional, "late", Channel::Whatsapp, 200, 20);
        p.queue(Lane::Transactional, "later", Channel::Whatsapp, 201, 20);
        p.queue(Lane::Transactional, "sms2", Channel::Sms, 300, 20);
        // Open: no WhatsApp call, while the SMS provider's calls go on.
        assert_eq!(sends(p.release(500)), vec![300]);
        // After the cooldown one probe goes, and nothing else while it is under way.
        assert_eq!(sends(p.release(1_010)), vec![200]);
        assert_eq!(p.breaker(Channel::Whatsapp), Breaker::Probing);
        assert!(p.release(1_020).is_empty());
        p.ended("late", Channel::Whatsapp, CallEnd::Answered, 1_030);
        assert_eq!(sends(p.release(1_030)), vec![201]);
    }

    #[test]
    fn timeouts_ending_together_do_not_open_the_breaker_of_a_healthy_provider() {
        let mut p = Pacer::new(limits());
        for i in 0..10 {
            p.queue(Lane::Marketing, &format!("c{i}"), Channel::Whatsapp, i, 0);
        }
        assert_eq!(p.release(0).len(), 10);
        for i in 0..8 {
            p.ended(&format!("c{i}"), Channel::Whatsapp, CallEnd::Answered, 10);
        }
        // The two calls that timed out end last, one after the other: 2 of 10 failed.
        for i in 8..10 {
            p.ended(
                &format!("c{i}"),
                Channel::Whatsapp,
                CallEnd::ProviderFailed,
                900,
            );
        }
        assert_eq!(p.breaker(Channel::Whatsapp), Breaker::Closed);
    }

    #[test]
    fn a_failed_probe_opens_the_breaker_again() {
        let mut p = Pacer::new(Limits {
            breaker_min_calls: 1,
            ..limits()
        });
        p.queue(Lane::Marketing, "a", Channel::Whatsapp, 1, 0);
        p.queue(Lane::Marketing, "b", Channel::Whatsapp, 2, 0);
        assert_eq!(sends(p.release(0)), vec![1, 2]);
        p.ended("a", Channel::Whatsapp, CallEnd::ProviderFailed, 0);
        p.queue(Lane::Marketing, "c", Channel::Whatsapp, 3, 0);
        assert_eq!(sends(p.release(1_000)), vec![3]);
        p.ended("c", Channel::Whatsapp, CallEnd::ProviderFailed, 1_100);
        assert_eq!(p.breaker(Channel::Whatsapp), Breaker::Open { until: 2_100 });
    }

    #[test]
    fn an_account_block_halts_its_provider_and_only_its_provider() {
        let mut p = Pacer::new(limits());
        p.queue(Lane::Transactional, "a", Channel::Whatsapp, 1, 0);
        assert_eq!(sends(p.release(0)), vec![1]);
        p.halt(Channel::Whatsapp, 368);
        p.ended("a", Channel::Whatsapp, CallEnd::Answered, 10);
        p.queue(Lane::Transactional, "b", Channel::Whatsapp, 2, 10);
        p.queue(Lane::Transactional, "c", Channel::Sms, 3, 10);
        // No cooldown ends a halt: the WhatsApp send waits, however long.
        assert_eq!(sends(p.release(10)), vec![3]);
        assert!(p.release(3_600_000).is_empty());
        assert_eq!(p.waiting(Lane::Transactional), 1);
        assert_eq!(p.breaker(Channel::Whatsapp), Breaker::Halted { code: 368 });
    }

    #[test]
    fn a_throttled_answer_pauses_the_sender() {
        let mut p = Pacer::new(limits());
        for i in 0..4 {
            p.queue(Lane::Marketing, &format!("c{i}"), Channel::Whatsapp, i, 0);
        }
        assert_eq!(sends(p.release(0)).len(), 4);
        p.ended("c0", Channel::Whatsapp, CallEnd::Throttled, 0);
        p.queue(Lane::Marketing, "d", Channel::Whatsapp, 9, 0);
        assert!(p.release(50).is_empty(), "the bucket was emptied");
        assert_eq!(sends(p.release(100)), vec![9]);
    }

    #[test]
    fn calls_under_way_are_capped() {
        let mut p = Pacer::new(Limits {
            max_calls: 2,
            ..limits()
        });
        for i in 0..5 {
            p.queue(Lane::Marketing, &format!("c{i}"), Channel::Whatsapp, i, 0);
        }
        assert_eq!(sends(p.release(0)), vec![0, 1]);
        assert!(p.release(0).is_empty());
        p.forget_call("c0");
        assert_eq!(sends(p.release(0)), vec![2]);
    }

    #[test]
    fn a_retry_waits_out_its_backoff_and_spends_a_token_like_any_call() {
        let mut p = Pacer::new(Limits {
            sender_burst: 2.0,
            sender_per_second: 1.0,
            ..limits()
        });
        p.queue(Lane::Transactional, "c", Channel::Whatsapp, 1, 0);
        assert_eq!(sends(p.release(0)), vec![1]);
        // Refused as retryable: back in its lane, first, not before its backoff.
        p.ended("c", Channel::Whatsapp, CallEnd::Answered, 10);
        p.queue(Lane::Transactional, "other", Channel::Whatsapp, 2, 10);
        p.retry(Lane::Transactional, "c", Channel::Whatsapp, 1, 0, 60);
        assert_eq!(
            sends(p.release(20)),
            vec![2],
            "the retry waits; the other goes"
        );
        // Both tokens are spent: the retry's backoff is over, but it waits for a token.
        assert!(p.release(60).is_empty());
        assert_eq!(sends(p.release(1_100)), vec![1]);
    }

    #[test]
    fn each_channel_has_its_own_sender_bucket() {
        let mut p = Pacer::new(Limits {
            sender_burst: 1.0,
            ..limits()
        });
        p.queue(Lane::Transactional, "a", Channel::Whatsapp, 1, 0);
        p.queue(Lane::Transactional, "b", Channel::Whatsapp, 2, 0);
        p.queue(Lane::Transactional, "c", Channel::Sms, 3, 0);
        assert_eq!(
            sends(p.release(0)),
            vec![1, 3],
            "the SMS does not wait for the WhatsApp number's token"
        );
    }

    #[test]
    fn backoff_doubles_per_try_with_at_most_half_again_of_jitter() {
        assert_eq!(retry_backoff_ms(1, 0.0), 50);
        assert_eq!(retry_backoff_ms(2, 0.0), 100);
        assert_eq!(retry_backoff_ms(3, 1.0), 300);
        assert!(retry_backoff_ms(40, 1.0) < 100_000, "bounded");
    }
}
