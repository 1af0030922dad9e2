//! `herald chaos`: the crash-safety proof. It owns a Kafka-protocol cluster (the librdkafka mock
//! cluster, on TCP), runs the processors and dispatch as separate `herald run` processes, and
//! kills one of them with SIGKILL every few seconds while the scenario is fed, restarting it at
//! once. Afterwards it checks what a read_committed reader saw and prints one line: events lost,
//! duplicate decisions, per-customer order violations, sends without consent, duplicate sends.

use crate::demo::{self, FeedStamp};
use crate::dump::Follower;
use crate::events::{Decision, DispatchStep, Processor};
use crate::kafka::KafkaSettings;
use crate::registry::Codec;
use crate::scenario::{self, FeedItem};
use crate::topology::Topology;
use anyhow::{anyhow, Context, Result};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Options of `herald chaos`.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    pub customers: usize,
    pub seed: u64,
    pub kill_every: Duration,
    /// Which processes are killed: the processors, dispatch, or both in turn.
    pub victims: Victims,
    /// The `herald` binary to run as the processes under test.
    pub herald: PathBuf,
    /// Share of provider answers the simulator withholds (the message goes out, dispatch
    /// never hears so): those sends must be settled from status webhooks, not sent again.
    pub drop_answers: f64,
    /// Real brokers to run on (bootstrap and security settings); the in-process mock cluster
    /// when absent.
    pub brokers: Option<KafkaSettings>,
    /// Kills and restarts brokers during the run, when given (real brokers only).
    pub broker_kills: Option<BrokerKills>,
    /// The processors' state cache, in customers (0: every customer stays in memory). Below
    /// the scenario's customers, states leave memory and come back from the store mid-run.
    pub state_cache: usize,
}

/// How the harness kills and restarts a broker: shell commands in which `{node}` stands for the
/// broker's id, e.g. `scripts/kafka kill-node --dir D --node {node}`.
#[derive(Debug, Clone)]
pub struct BrokerKills {
    pub kill: String,
    pub start: String,
    /// Time between two broker kills; each victim is the leader of a decision-log partition.
    pub every: Duration,
    /// How long a killed broker stays down.
    pub down_for: Duration,
}

/// The one line `herald chaos` prints (as JSON with `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    pub events: usize,
    pub kills: u64,
    /// Of the kills, those of the dispatch process.
    pub dispatch_kills: u64,
    /// Sends the simulator accepted but whose answer it withheld.
    pub answers_withheld: u64,
    /// Times a process exited on its own (a fatal error after a kill) and was restarted.
    pub exits: u64,
    pub seconds: f64,
    /// Brokers killed (SIGKILL of a partition leader) and restarted during the run.
    pub broker_kills: u64,
    pub decisions: usize,
    pub sends: usize,
    pub events_lost: u64,
    pub duplicate_decisions: u64,
    pub order_violations: u64,
    pub sends_without_consent: u64,
    /// Sends approved on an input the broker acknowledged before the consent change that
    /// forbids them: the change became readable after later records of other topics (a killed
    /// broker's followers catching up, say). Not a guarantee broken: Kafka orders nothing
    /// across topics, and the processors count such records as late.
    pub sends_before_late_consent_change: u64,
    pub duplicate_sends: u64,
    /// Approved messages whose dispatch never ended (sent, failed, or skipped as a repeat):
    /// a dispatch that stalled or lost an approval.
    pub approvals_unsettled: u64,
}

impl ChaosReport {
    /// Whether every guarantee held.
    pub fn clean(&self) -> bool {
        self.events_lost == 0
            && self.duplicate_decisions == 0
            && self.order_violations == 0
            && self.sends_without_consent == 0
            && self.duplicate_sends == 0
            && self.approvals_unsettled == 0
    }

    /// The one line.
    pub fn line(&self) -> String {
        format!(
            "chaos: {} events, {} kills ({} of dispatch), {} broker kills, {} restarts after an exit, {} provider answers withheld, in {:.0} s: events lost {}, duplicate decisions {}, order violations {}, sends without consent {}, duplicate sends {}, approvals unsettled {} (sends approved before a consent change reached the broker {})",
            self.events,
            self.kills,
            self.dispatch_kills,
            self.broker_kills,
            self.exits,
            self.answers_withheld,
            self.seconds,
            self.events_lost,
            self.duplicate_decisions,
            self.order_violations,
            self.sends_without_consent,
            self.duplicate_sends,
            self.approvals_unsettled,
            self.sends_before_late_consent_change
        )
    }
}

/// Which processes `herald chaos` kills.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Victims {
    Processors,
    Dispatch,
    Both,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    Processors,
    Dispatch,
}

struct Processes {
    herald: PathBuf,
    bootstrap: String,
    /// Client settings beyond the bootstrap address (security), passed as `--kafka-config`.
    kafka_extra: Vec<(String, String)>,
    /// How long the group waits for a killed member.
    session_timeout_ms: u32,
    /// Whether a restarted process rejoins under its old member id (KIP-345), taking its
    /// partitions back at once instead of after the dead member's session.
    static_membership: bool,
    /// How long a send whose answer was lost waits for its status before it is tried again.
    settle_wait: Duration,
    registry: String,
    simulator: String,
    state_cache: usize,
    /// The gateway's scheme and host, where SMS statuses are asked for.
    gateway: String,
    dir: PathBuf,
    children: Vec<(Role, Child)>,
}

impl Processes {
    fn spawn(&self, role: Role) -> Result<Child> {
        let (stage, instance, store) = match role {
            Role::Processors => ("processors", "chaos-processors", "processors.redb"),
            Role::Dispatch => ("dispatch", "chaos-dispatch", "dispatch.redb"),
        };
        Command::new(&self.herald)
            .args(["run", "--stage", stage, "--instance-id", instance])
            // The children work on the topics this run created (the embedded topology's), not
            // on those a deployment's environment would point them at.
            .env_remove("HERALD_TOPOLOGY")
            .env_remove("HERALD_TOPIC_PREFIX")
            .env_remove("HERALD_GROUP_PREFIX")
            .env("HERALD_IDENTIFIER_KEY", crate::identity::DEMO_KEY)
            .args(["--bootstrap", &self.bootstrap, "--registry", &self.registry])
            .args(
                self.kafka_extra
                    .iter()
                    .flat_map(|(k, v)| ["--kafka-config".to_string(), format!("{k}={v}")]),
            )
            .args(["--provider-url", &self.simulator])
            .args([
                "--phone-number-id",
                "1055501234567890",
                "--provider-token",
                "chaos",
            ])
            // SMS and e-mail on the simulator too, as the demo has them.
            .args(["--sms-url", &self.simulator, "--email-url", &self.simulator])
            .args(["--sms-account-sid", crate::demo::DEMO_SMS_ACCOUNT])
            .env("HERALD_SMS_AUTH_TOKEN", crate::demo::DEMO_SMS_TOKEN)
            .args(["--sms-from", crate::demo::DEMO_SMS_FROM])
            .arg("--sms-status-callback")
            .arg(format!("{}/webhooks/sms", self.gateway))
            .env("HERALD_EMAIL_API_KEY", "SG.chaos-key")
            .args(["--email-from", crate::demo::DEMO_EMAIL_FROM])
            // A withheld answer is given up on after a second; a send whose outcome is
            // unknown waits 10 s for its status webhook (they arrive within a second).
            .args(["--provider-timeout-ms", "1000", "--settle-wait-ms"])
            .arg(self.settle_wait.as_millis().to_string())
            // The simulator's number is an upgraded one, as in the demo.
            .args(["--sender-rate", "1000"])
            .args(["--metrics-addr", "127.0.0.1:0"])
            // A killed member is dropped only when its session expires (the mock cluster
            // ignores static membership): keep that short, as for fast failover.
            .arg("--session-timeout-ms")
            .arg(self.session_timeout_ms.to_string())
            .args(self.static_membership.then_some("--static-membership"))
            .arg("--store")
            .arg(self.dir.join(store))
            .env("HERALD_STATE_CACHE_CUSTOMERS", self.state_cache.to_string())
            // The scenario is a month of event time; the wall clock must not overtake it.
            .env("HERALD_WALL_CLOCK_TICK_SECS", "0")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()),
            )
            .spawn()
            .with_context(|| format!("cannot start {}", self.herald.display()))
    }

    fn kill_and_restart(&mut self, i: usize) -> Result<()> {
        let role = self.children[i].0;
        // SIGKILL: no transaction is finished, no state is saved.
        let _ = self.children[i].1.kill();
        let _ = self.children[i].1.wait();
        self.children[i].1 = self.spawn(role)?;
        Ok(())
    }

    /// Restarts every process that exited on its own (a fatal error stops a process; its
    /// supervisor, here the harness, starts it again). Returns how many it restarted.
    fn restart_exited(&mut self) -> Result<u64> {
        let mut restarted = 0;
        for i in 0..self.children.len() {
            if let Ok(Some(status)) = self.children[i].1.try_wait() {
                let role = self.children[i].0;
                tracing::warn!(?role, %status, "a process exited on its own; restarting it");
                self.children[i].1 = self.spawn(role)?;
                restarted += 1;
            }
        }
        Ok(restarted)
    }

    fn stop(&mut self) {
        for (_, c) in &mut self.children {
            terminate(c);
        }
    }
}

fn terminate(c: &mut Child) {
    extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    // SAFETY: signalling a child process we own by its pid.
    unsafe {
        kill(c.id() as i32, 15);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = c.kill();
    let _ = c.wait();
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            return Err(anyhow!(
                "{what} did not happen within {} s",
                limit.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(())
}

/// Follows the dispatch log (read_committed) and keeps the messages whose dispatch ended:
/// accepted, failed, skipped as a repeat, or settled as sent from a status.
struct DispatchWatch {
    ended: Arc<Mutex<HashSet<String>>>,
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Result<()>>,
}

impl DispatchWatch {
    fn start(
        cluster: &KafkaSettings,
        codec: Arc<Codec>,
        partitions: i32,
        rt: tokio::runtime::Handle,
    ) -> Result<Self> {
        use rdkafka::consumer::Consumer;
        use rdkafka::message::Message;
        use rdkafka::{Offset, TopicPartitionList};
        // The run's own client settings, security included.
        let mut settings = cluster.clone();
        settings.instance_id = "chaos-dispatch-watch".into();
        let consumer = settings.log_reader()?;
        let mut tpl = TopicPartitionList::new();
        let dispatch_log = codec.topics().dispatch().clone();
        for p in 0..partitions {
            tpl.add_partition_offset(&dispatch_log, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let ended = Arc::new(Mutex::new(HashSet::new()));
        let count = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (e, c, st) = (ended.clone(), count.clone(), stop.clone());
        let handle = std::thread::spawn(move || -> Result<()> {
            while !st.load(Ordering::SeqCst) {
                let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else {
                    continue;
                };
                let rec = rt
                    .block_on(codec.decode_dispatch(m.payload()))
                    .map_err(|e| anyhow!("{dispatch_log}@{}: {e}", m.offset()))?;
                let over = match &rec.step {
                    DispatchStep::Accepted(_)
                    | DispatchStep::Failed(_)
                    | DispatchStep::Skipped(_) => true,
                    DispatchStep::Reconciled(r) => r.status.is_some(),
                    _ => false,
                };
                if over {
                    let mut ended = e.lock().map_err(|_| anyhow!("dispatch watch poisoned"))?;
                    if ended.insert(rec.message_id) {
                        c.store(ended.len() as u64, Ordering::SeqCst);
                    }
                }
            }
            Ok(())
        });
        Ok(DispatchWatch {
            ended,
            count,
            stop,
            handle,
        })
    }

    /// Messages whose dispatch ended so far.
    fn ended(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    fn finish(self) -> Result<HashSet<String>> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .join()
            .map_err(|_| anyhow!("the dispatch watch panicked"))??;
        let ended = self
            .ended
            .lock()
            .map_err(|_| anyhow!("dispatch watch poisoned"))?;
        Ok(ended.clone())
    }
}

/// Kills the leader of one decision-log partition after another, the first a quarter of
/// `every` into the run and then every `every`, and starts it again after `down_for`, until
/// the run calms down.
struct BrokerKiller {
    handle: std::thread::JoinHandle<Result<u64>>,
}

impl BrokerKiller {
    fn start(
        plan: BrokerKills,
        cluster: KafkaSettings,
        decisions: Arc<str>,
        calm: Arc<AtomicBool>,
    ) -> Self {
        let handle = std::thread::spawn(move || -> Result<u64> {
            let mut kills = 0u64;
            let mut partition = 0;
            let mut last = Instant::now();
            // The first kill comes early: a feed that calms down within one interval would
            // otherwise end with no broker killed at all (the suite's run feeds for about 20 s
            // with kills every 20 s).
            let mut wait = plan.every / 4;
            while !calm.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(200));
                if last.elapsed() < wait {
                    continue;
                }
                let Some(leader) = leader_of(&cluster, &decisions, partition)? else {
                    continue;
                };
                shell(&plan.kill, leader)?;
                kills += 1;
                tracing::warn!(broker = leader, partition, "chaos: broker killed");
                let down = Instant::now();
                while down.elapsed() < plan.down_for && !calm.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(200));
                }
                shell(&plan.start, leader)?;
                tracing::warn!(broker = leader, "chaos: broker restarted");
                partition = (partition + 1) % 6;
                last = Instant::now();
                wait = plan.every;
            }
            Ok(kills)
        });
        BrokerKiller { handle }
    }

    fn finish(self) -> Result<u64> {
        self.handle
            .join()
            .map_err(|_| anyhow!("the broker killer panicked"))?
    }
}

/// The broker that leads `topic`/`partition` now, if the cluster says.
fn leader_of(cluster: &KafkaSettings, topic: &str, partition: i32) -> Result<Option<i32>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let client: BaseConsumer = cluster
        .client_config()
        .create()
        .context("cannot create a metadata client")?;
    let Ok(md) = client.fetch_metadata(Some(topic), Duration::from_secs(10)) else {
        return Ok(None);
    };
    Ok(md
        .topics()
        .first()
        .and_then(|t| t.partitions().iter().find(|p| p.id() == partition))
        .map(|p| p.leader())
        .filter(|l| *l >= 0))
}

/// Runs a broker control command with `{node}` replaced; fails naming it when it fails.
fn shell(template: &str, node: i32) -> Result<()> {
    let command = template.replace("{node}", &node.to_string());
    let status = Command::new("sh")
        .args(["-c", &command])
        .status()
        .with_context(|| format!("cannot run '{command}'"))?;
    if !status.success() {
        return Err(anyhow!("'{command}' failed: {status}"));
    }
    Ok(())
}

/// How far dispatch may fall behind the approvals before feeding waits for it: the mock
/// cluster keeps only 5 MB of each partition, and dispatch must read an approval before it is
/// trimmed.
const DISPATCH_LAG: u64 = 1_500;

/// How long dispatch waits for the status of a send whose answer was lost before it sends again.
/// It must outlast the slowest status: on real brokers a killed broker is noticed only after
/// broker.session.timeout.ms (9 s) and its partitions' leaders move after that, so a status
/// webhook written then reaches dispatch well past the mock cluster's 10 s.
fn settle_wait(real_brokers: bool) -> Duration {
    Duration::from_secs(if real_brokers { 30 } else { 10 })
}

/// Runs the scenario under repeated SIGKILLs and checks the outcome.
pub fn run(opts: &ChaosOptions, say: impl Fn(String)) -> Result<ChaosReport> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let topology = Topology::embedded()?;
    let simulator = crate::provider::SimulatorOptions {
        drop_answer_rate: opts.drop_answers,
        withhold_answer_for: Duration::from_secs(2),
        ..demo::demo_simulator()
    };
    let cluster = demo::start_cluster_on(&rt, &topology, simulator, opts.brokers.as_ref())?;
    // A real broker keeps what retention allows: records stamped with the scenario's dates,
    // weeks back, would be deleted, so they carry the time they were produced.
    let stamp = match opts.brokers {
        Some(_) => FeedStamp::ProduceTime,
        None => FeedStamp::OccurredAt,
    };
    let codec = Arc::new(Codec::new(&cluster.registry_url, &topology.names)?);
    rt.block_on(codec.register_all())?;
    let scenario = scenario::generate(opts.customers, opts.seed);
    let events: Vec<&crate::events::InputEvent> = scenario
        .items
        .iter()
        .filter_map(|i| match i {
            FeedItem::Event(e) => Some(e),
            _ => None,
        })
        .collect();
    // Reads the decision log as it is committed: the mock cluster trims old segments. Only
    // the scenario's own records count as decided, not the status webhooks that join them.
    let follower = Follower::counting(
        &cluster.kafka,
        vec![topology.names.decisions().to_string()],
        codec.clone(),
        topology.partitions(),
        rt.handle().clone(),
        Some(events.iter().map(|e| e.envelope.event_id.clone()).collect()),
    )?;
    let dispatched = DispatchWatch::start(
        &cluster.kafka,
        codec.clone(),
        topology.partitions(),
        rt.handle().clone(),
    )?;
    say(format!(
        "herald chaos: {} events, a SIGKILL every {} ms",
        events.len(),
        opts.kill_every.as_millis()
    ));
    let producer = cluster.settings(true, "chaos-feeder").producer(None)?;
    demo::feed_stock(&rt, &producer, &codec, &scenario::stock_levels())?;

    let dir = demo::fresh_temp_dir("chaos")?;
    let mut procs = Processes {
        herald: opts.herald.clone(),
        bootstrap: cluster.bootstrap.clone(),
        kafka_extra: cluster.kafka.extra.clone(),
        // Real brokers refuse sessions shorter than group.min.session.timeout.ms (6 s).
        session_timeout_ms: if opts.brokers.is_some() { 6_000 } else { 3_000 },
        // The mock cluster ignores it; real brokers honour it, as a StatefulSet would use it.
        static_membership: opts.brokers.is_some(),
        settle_wait: settle_wait(opts.brokers.is_some()),
        registry: cluster.registry_url.clone(),
        simulator: cluster.simulator_url.clone(),
        state_cache: opts.state_cache,
        gateway: cluster.gateway_root.clone(),
        dir: dir.clone(),
        children: Vec::new(),
    };
    for role in [Role::Processors, Role::Dispatch] {
        let c = procs.spawn(role)?;
        procs.children.push((role, c));
    }
    let procs = Arc::new(Mutex::new(procs));
    let started = Instant::now();
    let kills = Arc::new(AtomicU64::new(0));
    let dispatch_kills = Arc::new(AtomicU64::new(0));
    let calm = Arc::new(AtomicBool::new(false));
    let exits = Arc::new(AtomicU64::new(0));
    let killer = {
        let dispatch_kills = dispatch_kills.clone();
        let exits = exits.clone();
        let (procs, kills, calm, every, victims) = (
            procs.clone(),
            kills.clone(),
            calm.clone(),
            opts.kill_every,
            opts.victims,
        );
        let decided = follower.decided_inputs_counter();
        let simulator = cluster.simulator.clone();
        std::thread::spawn(move || -> Result<()> {
            // What each process has visibly done: a kill waits until its victim has committed
            // something since it last started, so every kill lands mid-stream and the run
            // still moves forward however slowly a restart rejoins the group.
            let progress = |role: Role| match role {
                Role::Processors => decided.load(Ordering::SeqCst),
                Role::Dispatch => simulator.sent_count() as u64,
            };
            let roles: Vec<Role> = match victims {
                Victims::Processors => vec![Role::Processors],
                Victims::Dispatch => vec![Role::Dispatch],
                Victims::Both => vec![Role::Processors, Role::Dispatch],
            };
            let mut since: Vec<u64> = roles.iter().map(|r| progress(*r)).collect();
            let mut victim = 0;
            let mut last = Instant::now();
            // Each process is killed at most once per round of turns, so a restarted one has
            // the time of a round to rejoin and settle before it is killed again.
            let mut last_of: Vec<Option<Instant>> = roles.iter().map(|_| None).collect();
            let round = every * roles.len() as u32;
            while !calm.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
                let restarted = procs
                    .lock()
                    .map_err(|_| anyhow!("process table poisoned"))?
                    .restart_exited()?;
                exits.fetch_add(restarted, Ordering::SeqCst);
                if last.elapsed() < every {
                    continue;
                }
                // The next in turn that has made progress: one waiting for the other (the
                // processors idle while dispatch catches up) does not shield the other.
                let Some(next) = (0..roles.len())
                    .map(|k| (victim + k) % roles.len())
                    .find(|&k| {
                        progress(roles[k]) > since[k]
                            && last_of[k].is_none_or(|t| t.elapsed() >= round)
                    })
                else {
                    continue;
                };
                last_of[next] = Some(Instant::now());
                victim = next;
                let mut p = procs
                    .lock()
                    .map_err(|_| anyhow!("process table poisoned"))?;
                let i = p
                    .children
                    .iter()
                    .position(|(r, _)| *r == roles[victim])
                    .ok_or_else(|| anyhow!("no {:?} process", roles[victim]))?;
                p.kill_and_restart(i)?;
                kills.fetch_add(1, Ordering::SeqCst);
                if roles[victim] == Role::Dispatch {
                    dispatch_kills.fetch_add(1, Ordering::SeqCst);
                }
                since[victim] = progress(roles[victim]);
                last = Instant::now();
                victim = (victim + 1) % roles.len();
            }
            Ok(())
        })
    };

    let broker_killer = opts.broker_kills.clone().map(|b| {
        BrokerKiller::start(
            b,
            cluster.kafka.clone(),
            topology.names.decisions().clone(),
            calm.clone(),
        )
    });

    // Fed in chunks, each waited for, so that the processors (not the mock cluster's segment
    // trimming) are what the records race against.
    let mut acknowledged = HashMap::new();
    let result = (|| -> Result<()> {
        let mut fed_events = 0u64;
        for chunk in scenario.items.chunks(2_000) {
            acknowledged.extend(demo::feed_noting_acknowledgements(
                &rt, &producer, &codec, chunk, stamp,
            )?);
            fed_events += chunk
                .iter()
                .filter(|i| matches!(i, FeedItem::Event(_)))
                .count() as u64;
            wait_for("deciding the fed records", Duration::from_secs(600), || {
                follower.decided_inputs() >= fed_events
            })?;
            wait_for("dispatch keeping up", Duration::from_secs(600), || {
                dispatched.ended() + DISPATCH_LAG >= follower.approved()
            })?;
            say(format!(
                "  decided {fed_events}/{}  dispatched {}/{}  kills {}",
                events.len(),
                dispatched.ended(),
                follower.approved(),
                kills.load(Ordering::SeqCst)
            ));
        }
        Ok(())
    })();
    calm.store(true, Ordering::SeqCst);
    killer
        .join()
        .map_err(|_| anyhow!("the killer thread panicked"))??;
    let broker_kills = match broker_killer {
        Some(k) => k.finish()?,
        None => 0,
    };
    result?;
    // Dispatch catches up once the kills stop: every approval's dispatch ended, or nothing
    // new for longer than an unknown send waits for its status before it is tried again.
    let mut last = (0, Instant::now());
    let mut told = Instant::now();
    wait_for("dispatch catching up", Duration::from_secs(600), || {
        if let Ok(mut p) = procs.lock() {
            if let Ok(n) = p.restart_exited() {
                exits.fetch_add(n, Ordering::SeqCst);
            }
        }
        let ended = dispatched.ended();
        if ended != last.0 {
            last = (ended, Instant::now());
        }
        if told.elapsed() >= Duration::from_secs(5) {
            say(format!(
                "  dispatched {ended}/{} approvals",
                follower.approved()
            ));
            told = Instant::now();
        }
        ended >= follower.approved()
            || last.1.elapsed() > settle_wait(opts.brokers.is_some()) + Duration::from_secs(5)
    })?;
    let seconds = started.elapsed().as_secs_f64();
    procs
        .lock()
        .map_err(|_| anyhow!("process table poisoned"))?
        .stop();
    let records = follower.finish()?;
    let ended = dispatched.finish()?;
    let decisions = crate::dump::decisions(&records);
    let approvals_unsettled = decisions
        .iter()
        .filter_map(|d| match &d.outcome {
            crate::events::Outcome::MessageApproved(a) => Some(a.message_id.as_str()),
            _ => None,
        })
        .collect::<HashSet<&str>>()
        .iter()
        .filter(|m| !ended.contains(**m))
        .count() as u64;
    let sends = cluster.simulator.sent();
    let seen = demo::Visibility {
        triggered_at: approval_triggers(&records, &acknowledged),
        acknowledged,
    };
    let checks = demo::independent_checks(&scenario.items, &topology, &sends, Some(&seen));
    for w in &checks.without_consent {
        eprintln!("chaos: send without consent: {w}");
    }
    for w in &checks.before_late_consent_change {
        eprintln!("chaos: send approved before a consent change reached the broker: {w}");
    }
    // What the log shows of those customers, in log order, to tell a late read from a lost one.
    let suspects: BTreeSet<&str> = checks
        .without_consent
        .iter()
        .chain(&checks.before_late_consent_change)
        .filter_map(|w| w.customer_id.as_deref())
        .collect();
    for c in suspects {
        eprintln!("chaos: the decision log of {c}:");
        for d in decisions.iter().filter(|d| d.customer_id == c) {
            eprintln!(
                "chaos:   {} {} (input {})",
                crate::events::rfc3339(d.decided_at),
                d.outcome.summary(),
                d.input_event_id,
            );
        }
    }
    let (events_lost, duplicate_decisions, order_violations) = check_log(&events, &decisions);
    let _ = std::fs::remove_dir_all(&dir);
    drop(producer);
    Ok(ChaosReport {
        events: events.len(),
        kills: kills.load(Ordering::SeqCst),
        dispatch_kills: dispatch_kills.load(Ordering::SeqCst),
        answers_withheld: cluster.simulator.answers_dropped.load(Ordering::SeqCst),
        exits: exits.load(Ordering::SeqCst),
        seconds,
        broker_kills,
        decisions: decisions.len(),
        sends: sends.len(),
        events_lost,
        duplicate_decisions,
        order_violations,
        sends_without_consent: checks.without_consent.len() as u64,
        sends_before_late_consent_change: checks.before_late_consent_change.len() as u64,
        duplicate_sends: checks.duplicates,
        approvals_unsettled,
    })
}

/// By message id: when the broker acknowledged the input record on which its approval was
/// decided. An approval decided on an input carries that input's id; one a timer decided
/// (`timer:...`) was decided while stream time moved to the next input of its partition, whose
/// decisions follow it in the log. Taking that next fed input, and not the previous one,
/// makes the time at least the true one, so the check can only be stricter than the
/// intake's guarantee: a record the broker had when the deciding input arrived is decided
/// before it.
fn approval_triggers(
    records: &[crate::replay::DumpedRecord],
    acknowledged: &HashMap<String, i64>,
) -> HashMap<String, i64> {
    let mut by_partition: BTreeMap<i32, Vec<(i64, &crate::events::Decision)>> = BTreeMap::new();
    for r in records {
        if let crate::replay::Payload::Decision(d) = &r.payload {
            by_partition
                .entry(r.partition)
                .or_default()
                .push((r.offset, d));
        }
    }
    let mut triggered = HashMap::new();
    for log in by_partition.values_mut() {
        log.sort_by_key(|(offset, _)| *offset);
        // Walking back, the acknowledgement of the nearest fed input at or after each decision.
        let mut next_fed: Option<i64> = None;
        for (_, d) in log.iter().rev() {
            if let Some(at) = acknowledged.get(&d.input_event_id) {
                next_fed = Some(*at);
            }
            if let (crate::events::Outcome::MessageApproved(a), Some(at)) = (&d.outcome, next_fed) {
                let t = triggered.entry(a.message_id.clone()).or_insert(at);
                *t = (*t).max(at);
            }
        }
    }
    triggered
}

/// From the fed events and the committed decision log (per partition in offset order): input
/// records with no dedupe decision, decision ids written twice, and customers whose records of
/// one topic were decided in another order than they were fed.
pub fn check_log(fed: &[&crate::events::InputEvent], log: &[Decision]) -> (u64, u64, u64) {
    let mut topic_of: HashMap<&str, &str> = HashMap::new();
    let mut fed_order: BTreeMap<(&str, &str), Vec<&str>> = BTreeMap::new();
    for e in fed {
        let topic = crate::topology::TopicRole::of_family(e.fact.family()).as_str();
        topic_of.insert(&e.envelope.event_id, topic);
        fed_order
            .entry((&e.envelope.customer_id, topic))
            .or_default()
            .push(&e.envelope.event_id);
    }
    let mut ids = HashSet::new();
    let mut duplicates = 0;
    let mut decided_order: BTreeMap<(&str, &str), Vec<&str>> = BTreeMap::new();
    for d in log {
        if !ids.insert(d.decision_id.as_str()) {
            duplicates += 1;
            continue;
        }
        if d.processor != Processor::Dedupe {
            continue;
        }
        if let Some(topic) = topic_of.get(d.input_event_id.as_str()) {
            decided_order
                .entry((&d.customer_id, topic))
                .or_default()
                .push(&d.input_event_id);
        }
    }
    let mut lost = 0;
    let mut violations = 0;
    for (key, want) in &fed_order {
        let got = decided_order.get(key).map(Vec::as_slice).unwrap_or(&[]);
        lost += want.len().saturating_sub(got.len()) as u64;
        if got.len() == want.len() && got != want.as_slice() {
            violations += 1;
        }
    }
    (lost, duplicates, violations)
}

/// The `herald` binary to run: this one.
pub fn this_binary() -> Result<PathBuf> {
    std::env::current_exe().context("cannot find the herald binary to run")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::*;
    use crate::replay::{DumpedRecord, Payload};

    fn decided(partition: i32, offset: i64, input: &str, outcome: Outcome) -> DumpedRecord {
        DumpedRecord {
            topic: "herald.decisions.v1".into(),
            partition,
            offset,
            timestamp: None,
            key: None,
            payload: Payload::Decision(Decision {
                decision_id: format!("d-{partition}-{offset}"),
                customer_id: "c-1".into(),
                input_event_id: input.into(),
                processor: Processor::Policy,
                decided_at: 0,
                policy_version: "v1".into(),
                outcome,
                consent_chain: None,
            }),
        }
    }

    fn approval(message_id: &str) -> Outcome {
        Outcome::MessageApproved(std::sync::Arc::new(MessageApproved {
            message_id: message_id.into(),
            trigger_event_id: String::new(),
            template_name: "we_miss_you".into(),
            template_version: 1,
            locale: "en_US".into(),
            purpose: Purpose::Marketing,
            channel: Channel::Whatsapp,
            recipient: String::new(),
            variables: Default::default(),
            consent_artifact_id: String::new(),
            consent_granted_at: 0,
            category: String::new(),
            delivery: Default::default(),
            journey: None,
            relied_on: Default::default(),
        }))
    }

    fn other() -> Outcome {
        Outcome::DuplicateIgnored(DuplicateIgnored {
            event_id: String::new(),
            first_seen_at: 0,
            repeats_event_id: None,
            identity: None,
        })
    }

    #[test]
    fn an_approval_is_timed_by_the_input_it_was_decided_on_or_the_next_one_for_a_timer() {
        let acknowledged = HashMap::from([
            ("oms-1".to_string(), 100),
            ("oms-2".to_string(), 200),
            ("oms-3".to_string(), 300),
        ]);
        let log = vec![
            decided(0, 0, "oms-1", approval("on-input")),
            // A status webhook (not fed) between a timer and the input it fired before.
            decided(0, 3, "oms-2", other()),
            decided(0, 1, "timer:journey:x", approval("on-timer")),
            decided(0, 2, "wamid-status", other()),
            decided(1, 0, "oms-3", other()),
            decided(1, 1, "timer:journey:y", approval("last-timer")),
        ];
        let t = approval_triggers(&log, &acknowledged);
        assert_eq!(t.get("on-input"), Some(&100));
        assert_eq!(
            t.get("on-timer"),
            Some(&200),
            "the next fed input of its partition"
        );
        assert_eq!(
            t.get("last-timer"),
            None,
            "no input followed: judged strictly"
        );
    }
}
