//! `herald simulator`: the provider simulator.

use crate::telemetry::{self};
use anyhow::{bail, Result};
use clap::Args;
use std::net::SocketAddr;

/// Settings of `herald simulator`.
#[derive(Args, Debug)]
pub struct SimulatorArgs {
    /// Where the simulated provider APIs listen.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    /// Where to post signed WhatsApp status webhooks (the gateway's `/webhook`).
    #[arg(long)]
    pub webhook_url: Option<String>,
    /// The app secret WhatsApp webhooks are signed with.
    #[arg(
        long,
        env = "HERALD_APP_SECRET",
        hide_env_values = true,
        default_value = ""
    )]
    pub app_secret: String,
    /// The SMS auth token status callbacks are signed with.
    #[arg(
        long,
        env = "HERALD_SMS_AUTH_TOKEN",
        hide_env_values = true,
        default_value = ""
    )]
    pub sms_auth_token: String,
    /// Where to post e-mail events (the gateway's `/webhooks/email`).
    #[arg(long)]
    pub email_webhook_url: Option<String>,
    /// USER:PASSWORD of the e-mail event webhook.
    #[arg(
        long,
        env = "HERALD_EMAIL_WEBHOOK_AUTH",
        hide_env_values = true,
        default_value = ""
    )]
    pub email_webhook_auth: String,
    /// Messages per second the WhatsApp number may send (80 by default, 1,000 upgraded).
    #[arg(long, default_value_t = 80.0)]
    pub sender_rate: f64,
    /// Share (0 to 1) of messages that later fail as undeliverable.
    #[arg(long, default_value_t = 0.0, value_parser = share)]
    pub undeliverable_rate: f64,
    /// Share of calls refused with a transient fault a retry may pass.
    #[arg(long, default_value_t = 0.0, value_parser = share)]
    pub transient_failure_rate: f64,
    /// Share of template sends refused as paused (132015).
    #[arg(long, default_value_t = 0.0, value_parser = share)]
    pub template_paused_rate: f64,
    /// Share of accepted sends whose answer is withheld past the client's patience.
    #[arg(long, default_value_t = 0.0, value_parser = share)]
    pub drop_answer_rate: f64,
    /// Share of status callbacks posted twice.
    #[arg(long, default_value_t = 0.0, value_parser = share)]
    pub duplicate_webhook_rate: f64,
    /// Seed of the simulated failures and delays: the same seed, the same run.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

/// A share from 0 to 1.
pub(crate) fn share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("'{s}' is not a share from 0 to 1")),
    }
}

/// `herald simulator`: the provider simulator with the given limits, failures and callbacks.
/// Runs `herald simulator`.
pub fn run(args: SimulatorArgs) -> Result<()> {
    telemetry::init_tracing("info")?;
    let email_webhook_auth = match args.email_webhook_auth.split_once(':') {
        Some((u, p)) => (u.to_string(), p.to_string()),
        None if args.email_webhook_auth.is_empty() => (String::new(), String::new()),
        None => bail!("--email-webhook-auth (HERALD_EMAIL_WEBHOOK_AUTH) must be USER:PASSWORD"),
    };
    if args.sender_rate <= 0.0 {
        bail!("--sender-rate must be above 0, got {}", args.sender_rate);
    }
    let options = crate::provider::SimulatorOptions {
        webhook_url: args.webhook_url,
        app_secret: args.app_secret.into_bytes(),
        seed: args.seed,
        sender_per_s: args.sender_rate,
        drop_answer_rate: args.drop_answer_rate,
        transient_failure_rate: args.transient_failure_rate,
        undeliverable_rate: args.undeliverable_rate,
        template_paused_rate: args.template_paused_rate,
        duplicate_webhook_rate: args.duplicate_webhook_rate,
        sms_auth_token: args.sms_auth_token.into_bytes(),
        email_webhook_url: args.email_webhook_url,
        email_webhook_auth,
        ..crate::provider::SimulatorOptions::default()
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let (addr, _) = crate::provider::serve_simulator_with(args.listen, options).await?;
        println!("listening on http://{addr}");
        tokio::signal::ctrl_c().await?;
        Ok(())
    })
}
