//! The provider simulator: one HTTP server answering the Cloud API's, the SMS provider's and
//! the e-mail provider's send requests, each through its adapter's endpoint.

use super::simulated::{Simulator, SimulatorLog, SimulatorOptions};
use super::whatsapp::messages;
use anyhow::Result;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

async fn stats(State(sim): State<Arc<Simulator>>) -> Response {
    let log = &sim.log;
    let sends = log.sent_count();
    let rejected = log.rejected.lock().map(|r| *r).unwrap_or(0);
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    Json(json!({
        "accepted": sends,
        "rejected": rejected,
        "answers_dropped": load(&log.answers_dropped),
        "webhooks_delivered": load(&log.webhooks_delivered),
        "webhooks_abandoned": load(&log.webhooks_abandoned),
    }))
    .into_response()
}

/// Serves the simulator on `addr` with `options`.
pub async fn serve_simulator_with(
    addr: SocketAddr,
    options: SimulatorOptions,
) -> Result<(SocketAddr, Arc<SimulatorLog>)> {
    let log = Arc::new(SimulatorLog::default());
    let sim = Arc::new(Simulator {
        log: log.clone(),
        rng: Mutex::new(crate::scenario::Rng::new(options.seed)),
        options,
        sender: Mutex::new(None),
        sms_sender: Mutex::new(None),
        email_sender: Mutex::new(None),
        pairs: Mutex::new(std::collections::HashMap::new()),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?,
    });
    let router = Router::new()
        .route("/{version}/{phone_id}/messages", post(messages))
        .route(
            "/2010-04-01/Accounts/{account}/Messages.json",
            post(crate::provider::sms::simulate_send),
        )
        .route("/v3/mail/send", post(crate::provider::email::simulate_send))
        .route("/simulator/stats", get(stats))
        .with_state(sim);
    let bound = crate::telemetry::serve_router(addr, router, "provider simulator").await?;
    Ok((bound, log))
}
