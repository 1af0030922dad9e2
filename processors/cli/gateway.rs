//! `herald gateway`: the webhook gateway.

use super::args::*;
use super::run::{default_group_prefix, runtime_with_registry};
use crate::kafka::{self};
use crate::telemetry::{self};
use anyhow::{bail, Result};
use std::net::SocketAddr;
use std::time::Duration;

/// Settings of `herald gateway`.
#[derive(clap::Args, Debug)]
pub struct GatewayArgs {
    /// Where the provider posts webhooks (`/webhook`).
    #[arg(long, env = "HERALD_GATEWAY_ADDR", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Health, readiness and metrics (`/healthz`, `/readyz`, `/metrics`), on a listener of
    /// their own so that a webhook storm cannot starve the probes.
    #[arg(
        long,
        env = "HERALD_GATEWAY_HEALTH_ADDR",
        default_value = "0.0.0.0:8081"
    )]
    pub health_listen: SocketAddr,
    /// The Meta app secret webhooks are signed with (X-Hub-Signature-256).
    #[arg(long, env = "HERALD_APP_SECRET", hide_env_values = true)]
    pub app_secret: String,
    /// The token the GET verification handshake must present (hub.verify_token).
    #[arg(long, env = "HERALD_VERIFY_TOKEN", hide_env_values = true)]
    pub verify_token: String,
    /// Key of the keyed hashes of phone numbers: the same as the processors', so an inbound
    /// message's sender can be matched to a customer.
    #[arg(long, env = "HERALD_IDENTIFIER_KEY", hide_env_values = true)]
    pub identifier_key: String,
    #[command(flatten)]
    pub kafka: KafkaClientArgs,
    #[command(flatten)]
    pub registry: RegistryArgs,
    #[command(flatten)]
    pub topology: TopologyArgs,
    /// How long Kafka may take to acknowledge a webhook's events before it is answered 503.
    #[arg(long, env = "HERALD_GATEWAY_ACK_TIMEOUT_MS", default_value_t = 10_000)]
    pub ack_timeout_ms: u64,
    /// The SMS account's auth token, which signs its status callbacks (X-Twilio-Signature);
    /// `/webhooks/sms` answers 404 without it.
    #[arg(long, env = "HERALD_SMS_AUTH_TOKEN", hide_env_values = true)]
    pub sms_auth_token: Option<String>,
    /// The scheme and host the providers call the gateway at (e.g. https://hooks.example.com):
    /// SMS signatures cover the URL, which a TLS-terminating proxy hides from the gateway.
    #[arg(long, env = "HERALD_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// USER:PASSWORD the e-mail provider's event webhook presents (HTTP basic auth);
    /// `/webhooks/email` answers 404 without it.
    #[arg(long, env = "HERALD_EMAIL_WEBHOOK_AUTH", hide_env_values = true)]
    pub email_webhook_auth: Option<String>,
}

/// Runs `herald gateway`.
pub fn run(args: GatewayArgs) -> Result<()> {
    let _export = telemetry::init_tracing_and_export("info", "herald-gateway")?;
    if args.app_secret.is_empty() {
        bail!("HERALD_APP_SECRET (--app-secret) is empty: webhooks could not be verified");
    }
    if args.verify_token.is_empty() {
        bail!("HERALD_VERIFY_TOKEN (--verify-token) is empty");
    }
    let identifiers = identifier_key_from(&args.identifier_key)?;
    let email_webhook_auth = match args.email_webhook_auth.as_deref() {
        None => None,
        Some(auth) => match auth.split_once(':') {
            Some((user, password)) if !user.is_empty() && !password.is_empty() => {
                Some((user.to_string(), password.to_string()))
            }
            _ => bail!("HERALD_EMAIL_WEBHOOK_AUTH (--email-webhook-auth) must be USER:PASSWORD, both non-empty"),
        },
    };
    if args.sms_auth_token.as_deref() == Some("") {
        bail!("HERALD_SMS_AUTH_TOKEN (--sms-auth-token) is set but empty");
    }
    if let Some(u) = &args.public_url {
        if !(u.starts_with("https://") || u.starts_with("http://")) {
            bail!(
                "HERALD_PUBLIC_URL (--public-url) must start with https:// or http://, got '{u}'"
            );
        }
    }
    let topo = args.topology.load()?;
    let (rt, codec) = runtime_with_registry(&args.registry.settings(&args.kafka.security)?, &topo)?;
    let mut settings = args.kafka.connect(false, "gateway")?;
    settings.group_prefix = default_group_prefix(&topo);
    let stop = kafka::stop_on_signal(rt.handle());
    let running = crate::gateway::start(
        &rt,
        &settings,
        codec,
        crate::gateway::GatewayConfig {
            app_secret: args.app_secret.into_bytes(),
            verify_token: args.verify_token,
            identifiers,
            partitions: topo.partitions(),
            ack_timeout: Duration::from_millis(args.ack_timeout_ms),
            sms_auth_token: args.sms_auth_token.map(String::into_bytes),
            public_url: args.public_url,
            email_webhook_auth,
        },
        args.listen,
        args.health_listen,
        stop.clone(),
    )?;
    tracing::info!(webhooks = %running.webhook_addr, health = %running.health_addr, "herald gateway");
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}
