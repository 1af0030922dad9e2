//! The provider shell: a WhatsApp Cloud API client for approved template messages, and the
//! provider simulator, an HTTP server that accepts the Cloud API send request shape, answers with
//! a message id, and keeps what it received so that checks independent of Herald's policy code
//! can inspect it.

use crate::events::MessageApproved;
use anyhow::Result;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The Graph API version Herald speaks.
pub const GRAPH_VERSION: &str = "v21.0";

/// What the provider said about one send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// Accepted; the provider's message id (wamid).
    Accepted(String),
    /// Refused with the provider's error code.
    Rejected {
        code: i32,
        retryable: bool,
        detail: String,
    },
}

/// A client for the WhatsApp Cloud API `/{phone-number-id}/messages` endpoint.
#[derive(Clone)]
pub struct CloudApiClient {
    http: reqwest::Client,
    base_url: String,
    phone_number_id: String,
    token: String,
}

/// The Cloud API request body for an approved template message, with named parameters and the
/// message id as `biz_opaque_callback_data` so status callbacks can be matched to it.
pub fn template_request(m: &MessageApproved) -> Value {
    let parameters: Vec<Value> = m
        .variables
        .iter()
        .map(|(name, text)| json!({"type": "text", "parameter_name": name, "text": text}))
        .collect();
    json!({
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": m.recipient,
        "type": "template",
        "template": {
            "name": m.template_name,
            "language": {"code": m.locale},
            "components": [{"type": "body", "parameters": parameters}],
        },
        "biz_opaque_callback_data": m.message_id,
    })
}

impl CloudApiClient {
    /// A client for `base_url` (the Graph API root or the simulator).
    pub fn new(base_url: &str, phone_number_id: &str, token: &str) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(8)
            .build()?;
        Ok(CloudApiClient {
            http,
            base_url: base_url.trim_end_matches('/').to_string(),
            phone_number_id: phone_number_id.to_string(),
            token: token.to_string(),
        })
    }

    /// Sends one approved template message. `Err` means the provider could not be reached.
    pub async fn send(&self, m: &MessageApproved) -> Result<SendOutcome> {
        let url = format!(
            "{}/{GRAPH_VERSION}/{}/messages",
            self.base_url, self.phone_number_id
        );
        let resp = self
            .http
            .post(url)
            .bearer_auth(&self.token)
            .json(&template_request(m))
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            if let Some(id) = body["messages"][0]["id"].as_str() {
                return Ok(SendOutcome::Accepted(id.to_string()));
            }
        }
        let code = body["error"]["code"]
            .as_i64()
            .unwrap_or(status.as_u16() as i64) as i32;
        let detail = body["error"]["message"]
            .as_str()
            .unwrap_or("no error message")
            .to_string();
        Ok(SendOutcome::Rejected {
            code,
            retryable: crate::dispatch::is_retryable(code) || status.is_server_error(),
            detail,
        })
    }
}

/// One send the simulator accepted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SimulatedSend {
    pub to: String,
    pub template: String,
    pub language: String,
    pub callback_data: String,
    pub parameters: Vec<(String, String)>,
    pub wamid: String,
}

/// What the simulator received, shared with whoever started it.
#[derive(Default)]
pub struct SimulatorLog {
    pub sends: Mutex<Vec<SimulatedSend>>,
    pub rejected: Mutex<u64>,
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

fn graph_error(status: StatusCode, code: i32, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": "OAuthException", "code": code, "fbtrace_id": "herald-simulator"}});
    (status, Json(body)).into_response()
}

async fn messages(
    State(log): State<Arc<SimulatorLog>>,
    Path((_version, phone_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Option<Json<Value>>,
) -> Response {
    let reject = |status, code, msg: &str| {
        if let Ok(mut r) = log.rejected.lock() {
            *r += 1;
        }
        graph_error(status, code, msg)
    };
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer ") && v.len() > 7);
    if !authorized {
        return reject(StatusCode::UNAUTHORIZED, 190, "Invalid OAuth access token.");
    }
    if phone_id.is_empty() || !phone_id.chars().all(|c| c.is_ascii_digit()) {
        return reject(StatusCode::BAD_REQUEST, 100, "Invalid phone number id");
    }
    let Some(Json(b)) = body else {
        return reject(StatusCode::BAD_REQUEST, 100, "Request body is not JSON");
    };
    if b["messaging_product"] != "whatsapp" {
        return reject(
            StatusCode::BAD_REQUEST,
            100,
            "(#100) The parameter messaging_product is required.",
        );
    }
    let to = b["to"].as_str().unwrap_or_default().to_string();
    let digits: String = to.chars().filter(|c| c.is_ascii_digit()).collect();
    if digits.len() < 8 {
        return reject(
            StatusCode::BAD_REQUEST,
            131009,
            "(#131009) Parameter value is not valid: to",
        );
    }
    if b["type"] != "template" {
        // Herald only sends templates outside a service window; a free-form message is refused
        // the way the Cloud API refuses it outside the 24-hour window.
        return reject(StatusCode::BAD_REQUEST, 131047, "Re-engagement message: more than 24 hours have passed since the recipient last replied.");
    }
    let template = b["template"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let language = b["template"]["language"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if template.is_empty() || language.is_empty() {
        return reject(
            StatusCode::BAD_REQUEST,
            132000,
            "(#132000) Template name and language are required",
        );
    }
    let mut parameters = Vec::new();
    for c in b["template"]["components"].as_array().into_iter().flatten() {
        for p in c["parameters"].as_array().into_iter().flatten() {
            let text = p["text"].as_str().unwrap_or_default();
            if text.trim().is_empty() {
                return reject(
                    StatusCode::BAD_REQUEST,
                    131008,
                    "(#131008) Required parameter is missing",
                );
            }
            parameters.push((
                p["parameter_name"].as_str().unwrap_or_default().to_string(),
                text.to_string(),
            ));
        }
    }
    let callback_data = b["biz_opaque_callback_data"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let Ok(mut sends) = log.sends.lock() else {
        return graph_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            1,
            "simulator state poisoned",
        );
    };
    let wamid = format!("wamid.HERALDSIM{:012}", sends.len() + 1);
    sends.push(SimulatedSend {
        to: to.clone(),
        template,
        language,
        callback_data,
        parameters,
        wamid: wamid.clone(),
    });
    Json(json!({
        "messaging_product": "whatsapp",
        "contacts": [{"input": to, "wa_id": digits}],
        "messages": [{"id": wamid}],
    }))
    .into_response()
}

async fn stats(State(log): State<Arc<SimulatorLog>>) -> Response {
    let sends = log.sent_count();
    let rejected = log.rejected.lock().map(|r| *r).unwrap_or(0);
    Json(json!({"accepted": sends, "rejected": rejected})).into_response()
}

/// Serves the simulator on `addr`; returns the bound address and the log of what it received.
pub async fn serve_simulator(addr: SocketAddr) -> Result<(SocketAddr, Arc<SimulatorLog>)> {
    let log = Arc::new(SimulatorLog::default());
    let router = Router::new()
        .route("/{version}/{phone_id}/messages", post(messages))
        .route("/simulator/stats", get(stats))
        .with_state(log.clone());
    let bound = crate::telemetry::serve_router(addr, router, "provider simulator").await?;
    Ok((bound, log))
}
