//! Helpers shared by the tests that run the `herald` binary or need an edited topology.
// Each test crate uses its own part of this module.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Runs the `herald` binary with `args`, quietly, and waits for it.
pub fn herald(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .expect("herald runs")
}

/// Everything a run printed, for assertion messages and searches.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Copies the shipped topology into `dir`, passing each file's text (by its path relative to
/// `topology/`, e.g. `journeys/abandoned_cart.toml`) through `edit`.
pub fn edited_topology(dir: &Path, edit: impl Fn(&str, String) -> String) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("topology");
    std::fs::create_dir_all(dir.join("journeys")).unwrap();
    let mut files: Vec<String> = ["topics.toml", "templates.toml", "policy.toml"]
        .iter()
        .map(|f| f.to_string())
        .collect();
    for e in std::fs::read_dir(src.join("journeys")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        files.push(format!("journeys/{name}"));
    }
    for f in files {
        let text = std::fs::read_to_string(src.join(&f)).unwrap();
        std::fs::write(dir.join(&f), edit(&f, text)).unwrap();
    }
}

/// A real Apache Kafka cluster started by `scripts/kafka` for this test binary, once, and
/// stopped when the binary exits (the script watches this process).
pub struct Broker {
    /// The client address, `127.0.0.1:PORT[,...]`.
    pub bootstrap: String,
    /// The cluster's folder: node logs, and with SASL_SSL the CA and `client.properties`.
    pub dir: std::path::PathBuf,
}

impl Broker {
    /// Client settings for this cluster (plaintext).
    pub fn settings(&self, exactly_once: bool, instance_id: &str) -> herald::kafka::KafkaSettings {
        herald::kafka::KafkaSettings::new(&self.bootstrap, exactly_once, instance_id)
    }
}

/// Starts a cluster of `nodes` (1 or 3) under `scripts/kafka`, with `extra` start options.
pub fn start_broker(nodes: u32, extra: &[&str]) -> Broker {
    let nodes = nodes.to_string();
    let mut args = vec!["--nodes", nodes.as_str()];
    args.extend_from_slice(extra);
    let service = start_service("kafka", &args);
    Broker {
        bootstrap: service.address,
        dir: service.dir,
    }
}

/// A server one of the project's scripts (`scripts/kafka`, `scripts/registry`,
/// `scripts/cassandra`) started for this test binary; it stops when the binary exits.
pub struct Service {
    /// What the script printed last: the address clients use.
    pub address: String,
    /// The server's folder: its logs, and the CA and secrets it was started with.
    pub dir: std::path::PathBuf,
}

/// Runs `scripts/<script> start --dir <fresh dir> --owner <this process> <extra>`.
pub fn start_service(script: &str, extra: &[&str]) -> Service {
    let dir = std::env::temp_dir().join(format!(
        "herald-{script}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(script);
    let out = Command::new(&path)
        .args(["start", "--owner"])
        .arg(std::process::id().to_string())
        .arg("--dir")
        .arg(&dir)
        .args(extra)
        .output()
        .unwrap_or_else(|e| panic!("scripts/{script} runs: {e}"));
    assert!(
        out.status.success(),
        "scripts/{script} start failed:\n{}",
        text(&out)
    );
    let address = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    assert!(
        !address.is_empty(),
        "scripts/{script} printed no address:\n{}",
        text(&out)
    );
    Service { address, dir }
}

/// The Apache Cassandra node this test binary shares between its tests: passwords on
/// (PasswordAuthenticator) and TLS only, as a production cluster runs.
pub fn cassandra() -> &'static Service {
    static NODE: std::sync::OnceLock<Service> = std::sync::OnceLock::new();
    NODE.get_or_init(|| start_service("cassandra", &["--auth", "--tls"]))
}

/// A `--store` address for a fresh keyspace on the shared Cassandra node, with its
/// credentials (password from a file) and CA.
pub fn cassandra_store(keyspace: &str) -> String {
    let node = cassandra();
    format!(
        "scylla://{}/{keyspace}?replication_factor=1&user=cassandra&password_file={}&ca_file={}",
        node.address,
        node.dir.join("password").display(),
        node.dir.join("ca.pem").display()
    )
}

/// A keyspace name no other test of this run uses.
pub fn fresh_keyspace(label: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "herald_{label}_{}_{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    )
}

/// The user and password of the registry `registry()` starts.
pub const REGISTRY_USER_INFO: &str = "herald:registry-test-secret";

/// The Apicurio Registry this test binary shares between its tests: HTTPS with a test CA, and
/// HTTP basic auth, as a company registry or Confluent Cloud's asks.
pub fn registry() -> &'static Service {
    static REGISTRY: std::sync::OnceLock<Service> = std::sync::OnceLock::new();
    REGISTRY
        .get_or_init(|| start_service("registry", &["--tls", "--basic-auth", REGISTRY_USER_INFO]))
}

/// The single-node cluster this test binary shares between its tests.
pub fn broker() -> &'static Broker {
    static BROKER: std::sync::OnceLock<Broker> = std::sync::OnceLock::new();
    BROKER.get_or_init(|| start_broker(1, &[]))
}

/// Runs `scripts/kafka` with `args` and asserts that it succeeded.
pub fn kafka_script(args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka");
    let out = Command::new(script)
        .args(args)
        .output()
        .expect("scripts/kafka runs");
    assert!(
        out.status.success(),
        "scripts/kafka {args:?}: {}",
        text(&out)
    );
}

/// A child process that is killed (SIGKILL) and reaped when dropped, so a failing test leaves
/// no process behind.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends `sig` to a child process this test owns.
pub fn signal(c: &std::process::Child, sig: i32) {
    extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    // SAFETY: signalling a child process the test started, by its pid.
    unsafe {
        kill(c.id() as i32, sig);
    }
}

/// A loopback port free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Where the decisions a reader at `isolation` (`read_committed` or `read_uncommitted`) sees
/// are in the decision log: the difference between the two is what aborted transactions left.
pub fn decision_offsets(
    bootstrap: &str,
    partitions: i32,
    isolation: &str,
) -> std::collections::HashSet<(i32, i64)> {
    use rdkafka::message::Message;
    let mut settings =
        herald::kafka::KafkaSettings::new(bootstrap, true, &format!("reader-{isolation}"));
    settings.extra = vec![("isolation.level".into(), isolation.into())];
    let mut at = std::collections::HashSet::new();
    herald::demo::read_topic_with(&settings, "herald.decisions.v1", partitions, |m| {
        at.insert((m.partition(), m.offset()));
        Ok(())
    })
    .unwrap();
    at
}

/// The event ids of a scenario's input records (not its undecodable ones).
pub fn event_ids(items: &[herald::scenario::FeedItem]) -> std::collections::HashSet<String> {
    items
        .iter()
        .filter_map(|i| match i {
            herald::scenario::FeedItem::Event(e) => Some(e.envelope.event_id.clone()),
            _ => None,
        })
        .collect()
}

/// The runtime a test drives clients and in-process servers on: two workers, as on the
/// two-core machines the suite runs on.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A runtime with Herald's own schema registry served on it, and the registry's URL.
pub fn runtime_with_registry() -> (tokio::runtime::Runtime, String) {
    let rt = runtime();
    let reg = rt
        .block_on(herald::registry::serve("127.0.0.1:0".parse().unwrap()))
        .unwrap();
    (rt, format!("http://{reg}"))
}

/// A transactional producer on a demo cluster's broker, for feeding it.
pub fn feeder(cluster: &herald::demo::Cluster) -> rdkafka::producer::FutureProducer {
    cluster.settings(true, "feeder").producer(None).unwrap()
}

/// The input facts of the seeded scenario of `customers` customers (no stock levels).
pub fn scenario_events(customers: usize, seed: u64) -> Vec<herald::scenario::FeedItem> {
    herald::scenario::generate(customers, seed)
        .items
        .into_iter()
        .filter(|i| matches!(i, herald::scenario::FeedItem::Event(_)))
        .collect()
}

/// Feeds scenario items to a real broker, stamped with their produce time: a broker deletes
/// records dated beyond retention, and the scenario's dates lie weeks back.
pub fn feed(
    rt: &tokio::runtime::Runtime,
    producer: &rdkafka::producer::FutureProducer,
    codec: &herald::registry::Codec,
    items: &[herald::scenario::FeedItem],
) {
    herald::demo::feed(
        rt,
        producer,
        codec,
        items,
        herald::demo::FeedStamp::ProduceTime,
        |_| {},
    )
    .unwrap();
}

/// `herald run --stage STAGE` against a demo cluster's broker, registry and provider simulator,
/// with the demo's identifier key, its store at `store` and the wall-clock tick off (the tests'
/// facts are dated away from now); the caller adds `--metrics-addr` and anything else.
pub fn stage_command(
    cluster: &herald::demo::Cluster,
    stage: &str,
    instance_id: &str,
    store: &Path,
) -> Command {
    stage_command_calling(cluster, &cluster.simulator_url, stage, instance_id, store)
}

/// As `stage_command`, calling the provider at `provider_url` instead of the cluster's simulator.
pub fn stage_command_calling(
    cluster: &herald::demo::Cluster,
    provider_url: &str,
    stage: &str,
    instance_id: &str,
    store: &Path,
) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_herald"));
    c.env("HERALD_IDENTIFIER_KEY", herald::identity::DEMO_KEY)
        .args(["run", "--stage", stage, "--instance-id", instance_id])
        .args(["--bootstrap", &cluster.bootstrap])
        .args(["--registry", &cluster.registry_url])
        .args(["--provider-url", provider_url])
        .args(["--phone-number-id", "1055501234567890"])
        .args(["--provider-token", instance_id])
        .arg("--store")
        .arg(store)
        .env("HERALD_WALL_CLOCK_TICK_SECS", "0")
        .env(
            "RUST_LOG",
            std::env::var("HERALD_TEST_LOG").unwrap_or_else(|_| "error".into()),
        );
    c
}

/// Waits until `GET /readyz` on `port` answers 200, for at most `secs`.
pub fn wait_ready(rt: &tokio::runtime::Runtime, what: &str, port: u16, secs: u64) {
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while rt
        .block_on(http.get(format!("http://127.0.0.1:{port}/readyz")).send())
        .map_or(true, |r| r.status() != 200)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} never became ready"
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// A `herald gateway` process on a demo cluster, started and ready; its webhook port.
pub fn start_gateway(
    rt: &tokio::runtime::Runtime,
    cluster: &herald::demo::Cluster,
) -> (Killed, u16) {
    start_gateway_with(rt, cluster, &[])
}

/// As `start_gateway`, with `env` set (a secured registry's settings, say).
pub fn start_gateway_with(
    rt: &tokio::runtime::Runtime,
    cluster: &herald::demo::Cluster,
    env: &[(&str, &str)],
) -> (Killed, u16) {
    let (listen, health) = (free_port(), free_port());
    let mut c = Command::new(env!("CARGO_BIN_EXE_herald"));
    c.args(["gateway", "--listen", &format!("127.0.0.1:{listen}")])
        .args(["--health-listen", &format!("127.0.0.1:{health}")])
        .args(["--app-secret", herald::demo::DEMO_APP_SECRET])
        .args(["--verify-token", herald::demo::DEMO_VERIFY_TOKEN])
        .args(["--identifier-key", herald::identity::DEMO_KEY])
        .args(["--bootstrap", &cluster.bootstrap])
        .args(["--registry", &cluster.registry_url])
        .env("RUST_LOG", "error");
    for (k, v) in env {
        c.env(k, v);
    }
    let child = Killed(c.spawn().expect("the gateway starts"));
    wait_ready(rt, "the gateway", health, 60);
    (child, listen)
}

/// Posts a webhook body to the gateway on `port`, signed with the demo's app secret; the status.
pub fn post_signed(rt: &tokio::runtime::Runtime, port: u16, body: &[u8]) -> u16 {
    let secret = herald::demo::DEMO_APP_SECRET.as_bytes();
    rt.block_on(
        reqwest::Client::new()
            .post(format!("http://127.0.0.1:{port}/webhook"))
            .header(
                "x-hub-signature-256",
                herald::provider::whatsapp::sign(secret, body),
            )
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send(),
    )
    .expect("the gateway answers")
    .status()
    .as_u16()
}

/// A WhatsApp text message from `number` as the Cloud API posts it.
pub fn inbound_text(number: &str, id: &str, unix_seconds: i64, text: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "object": "whatsapp_business_account",
        "entry": [{"id": "1", "changes": [{"field": "messages", "value": {"messages": [
            {"from": number.trim_start_matches('+'), "id": id, "timestamp": unix_seconds.to_string(),
             "type": "text", "text": {"body": text}}]}}]}]
    }))
    .expect("JSON")
}

/// Every decision in a cluster's decision log, partition by partition.
pub fn read_decisions(
    rt: &tokio::runtime::Runtime,
    cluster: &herald::demo::Cluster,
    codec: &herald::registry::Codec,
    topology: &herald::topology::Topology,
) -> Vec<herald::events::Decision> {
    read_log(
        &cluster.bootstrap,
        topology.names.decisions(),
        topology,
        |bytes| rt.block_on(codec.decode_decision(bytes)),
    )
    .into_values()
    .collect()
}

/// Every record of `topic` (read_committed), decoded, by (partition, offset).
pub fn read_log<T>(
    bootstrap: &str,
    topic: &str,
    topology: &herald::topology::Topology,
    decode: impl Fn(Option<&[u8]>) -> Result<T, herald::registry::DecodeError>,
) -> std::collections::BTreeMap<(i32, i64), T> {
    use rdkafka::message::Message;
    let mut out = std::collections::BTreeMap::new();
    herald::demo::read_topic(bootstrap, topic, topology.partitions(), |m| {
        let v = decode(m.payload()).map_err(|e| anyhow::anyhow!("{e}"))?;
        out.insert((m.partition(), m.offset()), v);
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{topic} reads: {e:#}"));
    out
}

/// `herald ARGS` with the environment `env`, waited for.
pub fn herald_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_herald"));
    c.args(args).env("RUST_LOG", "error");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("herald runs")
}

/// The demo's registry, simulator and gateway on `broker` (Herald's topics created there), and
/// a codec with every schema registered.
pub fn demo_cluster(
    rt: &tokio::runtime::Runtime,
    topology: &herald::topology::Topology,
    broker: &Broker,
) -> (herald::demo::Cluster, herald::registry::Codec) {
    let cluster = herald::demo::start_cluster_on(
        rt,
        topology,
        herald::demo::demo_simulator(),
        Some(&broker.settings(true, "test")),
    )
    .unwrap();
    let codec = herald::registry::Codec::new(&cluster.registry_url, &topology.names).unwrap();
    rt.block_on(codec.register_all()).unwrap();
    (cluster, codec)
}

/// A process's `/metrics` on `port`; `None` when it does not answer within 2 s (a stopped
/// process accepts the connection, as the kernel does, but never answers).
pub fn scrape(rt: &tokio::runtime::Runtime, port: u16) -> Option<String> {
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(2))
            .build()
            .ok()?;
        let r = client
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await
            .ok()?;
        r.text().await.ok()
    })
}

/// The sum of every series of metric `name` in a Prometheus text exposition (labelled or not);
/// 0 when it has none.
#[allow(dead_code)]
pub fn metric_sum(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}
