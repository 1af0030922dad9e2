//! The webhook gateway against the in-process Kafka cluster: a corpus of genuine and tampered
//! webhooks must give 0 false accepts and 0 false rejects; oversize and malformed bodies are
//! answered with their status and the gateway goes on; the verification handshake; a repeated
//! status becomes one event on provider.events.v1, keyed by the customer in its callback data;
//! a template button, an interactive list reply and a captioned photo from a customer the CRM
//! knows reach that customer's provider events with their payload, reply id and caption.

mod common;

use herald::demo::{self, DEMO_APP_SECRET, DEMO_VERIFY_TOKEN};
use herald::events::{Envelope, Fact, InputEvent, MessageStatus, ProfileChanged};
use herald::provider::callback::callback_data;
use herald::provider::whatsapp::sign;
use herald::provider::whatsapp::status_webhook;
use herald::registry::Codec;
use herald::scenario::FeedItem;
use herald::topology::Topology;
use rdkafka::message::Message;
use std::sync::Arc;

/// What was changed, the headers sent, and the body sent.
type Tampering<'a> = (&'a str, Vec<(&'a str, String)>, Vec<u8>);

struct Answer {
    status: u16,
    body: String,
}

fn post(
    rt: &tokio::runtime::Runtime,
    url: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> Answer {
    rt.block_on(async {
        let mut req = reqwest::Client::new().post(url).body(body);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let r = req.send().await.expect("the gateway answers");
        Answer {
            status: r.status().as_u16(),
            body: r.text().await.unwrap_or_default(),
        }
    })
}

fn get(rt: &tokio::runtime::Runtime, url: &str) -> Answer {
    rt.block_on(async {
        let r = reqwest::get(url).await.expect("the gateway answers");
        Answer {
            status: r.status().as_u16(),
            body: r.text().await.unwrap_or_default(),
        }
    })
}

/// Genuine webhook bodies of each kind the gateway reads.
fn genuine_bodies() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (i, status) in ["sent", "delivered", "read"].iter().enumerate() {
        out.push(status_webhook(
            &format!("wamid.CORPUS{i}"),
            status,
            None,
            "34000000001",
            &callback_data("cust-000001", &format!("m{i}")),
        ));
    }
    out.push(status_webhook(
        "wamid.CORPUS9",
        "failed",
        Some(131026),
        "34000000001",
        &callback_data("cust-000002", "m9"),
    ));
    // An inbound message with emoji and non-ASCII text: the signature covers the raw bytes.
    out.push(
        serde_json::to_vec(&serde_json::json!({
            "object": "whatsapp_business_account",
            "entry": [{"id": "1", "changes": [{"field": "messages", "value": {
                "messages": [{"from": "34999999999", "id": "wamid.IN1", "timestamp": "1795500000",
                    "type": "text", "text": {"body": "¿Dónde está mi pedido? 📦🙏"}}]}}]}]
        }))
        .unwrap(),
    );
    out.push(
        serde_json::to_vec(&serde_json::json!({
            "object": "whatsapp_business_account",
            "entry": [{"id": "1", "time": 1795500100, "changes": [{"field": "message_template_status_update", "value": {
                "event": "PAUSED", "message_template_id": 7, "message_template_name": "cart_reminder",
                "message_template_language": "en_US", "reason": "LOW_QUALITY"}}]}]
        }))
        .unwrap(),
    );
    out
}

#[test]
fn the_gateway_accepts_every_genuine_webhook_and_no_tampered_one() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let topology = Topology::embedded().unwrap();
    // Each test reads whole topics, so each has a cluster of its own.
    let broker = common::start_broker(1, &[]);
    let cluster = demo::start_cluster_on(
        &rt,
        &topology,
        demo::demo_simulator(),
        Some(&broker.settings(true, "test")),
    )
    .unwrap();
    let codec = Arc::new(Codec::new(&cluster.registry_url, &topology.names).unwrap());
    rt.block_on(codec.register_all()).unwrap();
    let url = cluster.gateway_url.clone();
    let secret = DEMO_APP_SECRET.as_bytes();
    let sig = |body: &[u8]| ("x-hub-signature-256", sign(secret, body));

    let (mut false_accepts, mut false_rejects, mut genuine, mut tampered) = (0, 0, 0, 0);
    let mut outcomes = Vec::new();
    for body in genuine_bodies() {
        let good = sign(secret, &body);
        let hex = good.trim_start_matches("sha256=").to_string();
        // Genuine: as the provider signs it, and with the hex digits in upper case.
        for header in [good.clone(), format!("sha256={}", hex.to_uppercase())] {
            genuine += 1;
            let a = post(&rt, &url, &[("x-hub-signature-256", header)], body.clone());
            if a.status != 200 {
                false_rejects += 1;
                outcomes.push(format!("genuine refused {}: {}", a.status, a.body));
            }
        }
        let reserialised =
            serde_json::to_vec_pretty(&serde_json::from_slice::<serde_json::Value>(&body).unwrap())
                .unwrap();
        let mut flipped = body.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0x01;
        let tamperings: Vec<Tampering> = vec![
            (
                "wrong secret",
                vec![("x-hub-signature-256", sign(b"some-other-app-secret", &body))],
                body.clone(),
            ),
            ("missing header", vec![], body.clone()),
            (
                "sha1 header only",
                vec![("x-hub-signature", format!("sha1={}", &hex[..40]))],
                body.clone(),
            ),
            (
                "truncated hex",
                vec![("x-hub-signature-256", format!("sha256={}", &hex[..63]))],
                body.clone(),
            ),
            (
                "no sha256= prefix",
                vec![("x-hub-signature-256", hex.clone())],
                body.clone(),
            ),
            (
                "re-serialised body",
                vec![("x-hub-signature-256", good.clone())],
                reserialised,
            ),
            (
                "one bit flipped",
                vec![("x-hub-signature-256", good.clone())],
                flipped,
            ),
        ];
        for (what, headers, b) in tamperings {
            tampered += 1;
            let a = post(&rt, &url, &headers, b);
            if a.status == 200 {
                false_accepts += 1;
                outcomes.push(format!("{what} accepted"));
            } else {
                assert_eq!(a.status, 401, "{what}: {}", a.body);
                assert!(a.body.contains("X-Hub-Signature-256"), "{what}: {}", a.body);
            }
        }
    }
    eprintln!(
        "corpus: {genuine} genuine, {tampered} tampered: {false_accepts} false accepts, {false_rejects} false rejects"
    );
    assert_eq!((false_accepts, false_rejects), (0, 0), "{outcomes:#?}");

    // Oversize and malformed bodies get their status, and the gateway goes on.
    let big = vec![b' '; herald::gateway::MAX_BODY_BYTES + 1];
    let a = post(&rt, &url, &[sig(&big)], big.clone());
    assert_eq!(a.status, 413, "{}", a.body);
    let junk = b"{\"object\": \"whatsapp_business_account\", \"entry\": [".to_vec();
    let a = post(&rt, &url, &[sig(&junk)], junk.clone());
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(a.body.contains("not JSON"), "{}", a.body);
    let odd = br#"{"object":"whatsapp_business_account","entry":[{"changes":[{"field":"messages","value":{"statuses":[{"id":"w","status":"exploded"}]}}]}]}"#.to_vec();
    let a = post(&rt, &url, &[sig(&odd)], odd.clone());
    assert_eq!(a.status, 400);
    assert!(a.body.contains("exploded"), "{}", a.body);
    let health = format!("http://{}/healthz", cluster.gateway.health_addr);
    assert_eq!(get(&rt, &health).status, 200);

    // Each answer is counted by channel and outcome, in a typed exposition.
    let metrics = get(
        &rt,
        &format!("http://{}/metrics", cluster.gateway.health_addr),
    )
    .body;
    let webhooks = |outcome: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("herald_gateway_webhooks_total{"))
            .filter(|l| l.contains("channel=\"whatsapp\""))
            .filter(|l| l.contains(&format!("outcome=\"{outcome}\"")))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
            .sum()
    };
    assert_eq!(
        (
            webhooks("accepted"),
            webhooks("unauthorized"),
            webhooks("bad_request")
        ),
        (genuine, tampered, 2),
        "{metrics}"
    );
    for typed in [
        "# TYPE herald_gateway_webhooks_total counter",
        "# TYPE herald_gateway_request_duration_seconds histogram",
        "# TYPE herald_gateway_events_total counter",
        "# TYPE herald_build_info gauge",
    ] {
        assert!(metrics.contains(typed), "{typed} missing:\n{metrics}");
    }

    // The verification handshake.
    let hs = |token: &str| {
        get(
            &rt,
            &format!("{url}?hub.mode=subscribe&hub.verify_token={token}&hub.challenge=1158201444"),
        )
    };
    let ok = hs(DEMO_VERIFY_TOKEN);
    assert_eq!((ok.status, ok.body.as_str()), (200, "1158201444"));
    assert_eq!(hs("guess").status, 403);

    // A status posted twice is one event, on the customer's partition.
    let repeated = status_webhook(
        "wamid.REPEATED",
        "delivered",
        None,
        "34000000003",
        &callback_data("cust-000003", "m-rep"),
    );
    for _ in 0..2 {
        assert_eq!(
            post(&rt, &url, &[sig(&repeated)], repeated.clone()).status,
            200
        );
    }
    let mut repeats = 0;
    let mut template_copies = 0;
    demo::read_topic(
        &cluster.bootstrap,
        "provider.events.v1",
        topology.partitions(),
        |m| {
            let e = rt
                .block_on(codec.decode_input("provider.events.v1", m.payload()))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            match &e.fact {
                Fact::MessageStatusChanged(s) if s.provider_message_id == "wamid.REPEATED" => {
                    repeats += 1;
                    assert_eq!(s.status, MessageStatus::Delivered);
                    assert_eq!(s.message_id.as_deref(), Some("m-rep"));
                    assert_eq!(e.envelope.customer_id, "cust-000003");
                    assert_eq!(m.key(), Some("cust-000003".as_bytes()));
                }
                Fact::TemplateStatusChanged(_) => template_copies += 1,
                _ => {}
            }
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(repeats, 1, "a repeated status must be one event");
    // A template status concerns every task: one copy per partition (from the two genuine
    // posts of the same body, deduplicated).
    assert_eq!(template_copies, topology.partitions());
    // The inbound message from a number no profile holds is kept, on the dead-letter topic.
    let mut unroutable = 0;
    demo::read_topic(
        &cluster.bootstrap,
        "herald.dlq.v1",
        topology.partitions(),
        |m| {
            let d = rt
                .block_on(codec.decode_dead_letter(m.payload()))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if d.stage == "gateway" && d.error.contains("no customer profile holds") {
                unroutable += 1;
            }
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(unroutable, 1);

    // Inbound messages in the shapes the Cloud API documents, from a customer the CRM knows:
    // each keeps its meaning on its way to the customer's provider events.
    let producer = herald::kafka::KafkaSettings::new(&cluster.bootstrap, true, "crm-feeder")
        .producer(None)
        .unwrap();
    let profile = InputEvent {
        envelope: Envelope {
            event_id: "crm-p-77".into(),
            source_system: "crm".into(),
            source_sequence: None,
            occurred_at: 1_795_400_000_000,
            customer_id: "cust-000077".into(),
            trace_parent: None,
            schema_version: 1,
        },
        fact: Fact::ProfileChanged(ProfileChanged {
            first_name: Some("Ana".into()),
            locale: Some("en_US".into()),
            time_zone: None,
            phone_e164: Some("+15550100077".into()),
            email: None,
        }),
    };
    common::feed(&rt, &producer, &codec, &[FeedItem::Event(profile)]);
    let shape = |id: &str, kind: &str, content: serde_json::Value| {
        let mut m = serde_json::json!({"from": "15550100077", "id": id, "timestamp": "1795500200", "type": kind});
        m[kind] = content;
        serde_json::to_vec(&serde_json::json!({
            "object": "whatsapp_business_account",
            "entry": [{"id": "1", "changes": [{"field": "messages", "value": {
                "messaging_product": "whatsapp",
                "contacts": [{"profile": {"name": "Ana"}, "wa_id": "15550100077"}],
                "messages": [m]}}]}]
        }))
        .unwrap()
    };
    let shapes = [
        shape(
            "wamid.BTN",
            "button",
            serde_json::json!({"payload": "Stop promotions", "text": "Stop promotions"}),
        ),
        shape(
            "wamid.LIST",
            "interactive",
            serde_json::json!({"type": "list_reply", "list_reply": {"id": "row-2", "title": "Track my order"}}),
        ),
        shape(
            "wamid.IMG",
            "image",
            serde_json::json!({"caption": "it arrived broken", "mime_type": "image/jpeg", "sha256": "abc", "id": "media-1"}),
        ),
    ];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let inbound = loop {
        // Posted again until the sender directory has read the profile (the same message has
        // one event id, so a repeat is one fact).
        for body in &shapes {
            assert_eq!(post(&rt, &url, &[sig(body)], body.clone()).status, 200);
        }
        let mut found = std::collections::BTreeMap::new();
        demo::read_topic(
            &cluster.bootstrap,
            "provider.events.v1",
            topology.partitions(),
            |m| {
                let e = rt
                    .block_on(codec.decode_input("provider.events.v1", m.payload()))
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                if let Fact::InboundMessageReceived(i) = e.fact {
                    if e.envelope.customer_id == "cust-000077" {
                        found.insert(i.provider_message_id.clone(), i);
                    }
                }
                Ok(())
            },
        )
        .unwrap();
        if found.len() == shapes.len() {
            break found;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {found:?} reached the customer"
        );
        std::thread::sleep(std::time::Duration::from_secs(1));
    };
    let button = &inbound["wamid.BTN"];
    assert_eq!(
        (
            button.message_type.as_deref(),
            button.text.as_str(),
            button.button_payload.as_deref()
        ),
        (Some("button"), "Stop promotions", Some("Stop promotions"))
    );
    let list = &inbound["wamid.LIST"];
    assert_eq!(
        (list.text.as_str(), list.reply_id.as_deref()),
        ("Track my order", Some("row-2"))
    );
    let image = &inbound["wamid.IMG"];
    assert_eq!(
        (image.message_type.as_deref(), image.text.as_str()),
        (Some("image"), "it arrived broken")
    );
}

/// SMS and e-mail sent through their adapters to the simulator come back as signed status
/// callbacks on `/webhooks/sms` and `/webhooks/email`, and become provider events of the
/// customer, named by Herald's message id; tampered or unauthenticated callbacks are refused.
#[test]
fn sms_and_email_statuses_come_back_through_the_gateway_and_forgeries_do_not() {
    use herald::dispatch::SendOutcome;
    use herald::events::{Channel, MessageApproved};
    use herald::provider::Outgoing;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let topology = Topology::embedded().unwrap();
    // Each test reads whole topics, so each has a cluster of its own.
    let broker = common::start_broker(1, &[]);
    let cluster = demo::start_cluster_on(
        &rt,
        &topology,
        demo::demo_simulator(),
        Some(&broker.settings(true, "test")),
    )
    .unwrap();
    let codec = Arc::new(Codec::new(&cluster.registry_url, &topology.names).unwrap());
    rt.block_on(codec.register_all()).unwrap();
    let providers = demo::demo_providers(&cluster.simulator_url, &cluster.gateway_root).unwrap();
    let message = |channel, recipient: &str, id: &str| Outgoing {
        customer_id: "cust-000042".into(),
        approved: MessageApproved {
            message_id: id.into(),
            trigger_event_id: "e-1".into(),
            template_name: "order_confirmation".into(),
            template_version: 3,
            locale: "en_US".into(),
            purpose: herald::events::Purpose::Transactional,
            channel,
            recipient: recipient.into(),
            variables: Default::default(),
            consent_artifact_id: "form-1".into(),
            consent_granted_at: 0,
            category: "UTILITY".into(),
            delivery: Default::default(),
            journey: None,
            relied_on: Default::default(),
        },
        text: Some("Hi Ana, thanks for your order A-17. Total: EUR 12.50.".into()),
        traceparent: None,
    };
    let sms = providers.of(Channel::Sms).expect("the demo has SMS");
    let email = providers.of(Channel::Email).expect("the demo has e-mail");
    let sent_sms = rt.block_on(sms.send(&message(Channel::Sms, "+34600000042", "m-sms")));
    let sent_mail = rt.block_on(email.send(&message(Channel::Email, "ana@example.com", "m-mail")));
    let (SendOutcome::Accepted(sms_id), SendOutcome::Accepted(mail_id)) = (&sent_sms, &sent_mail)
    else {
        panic!("both accepted: {sent_sms:?} {sent_mail:?}");
    };
    assert!(sms_id.starts_with("SM"), "{sms_id}");
    // The simulator received them in the providers' shapes.
    let sends = cluster.simulator.sent();
    assert!(sends.iter().any(|s| s.channel == Channel::Sms
        && s.to == "+34600000042"
        && s.message_id == "m-sms"
        && s.text.as_deref().is_some_and(|t| t.contains("A-17"))));
    assert!(sends.iter().any(|s| s.channel == Channel::Email
        && s.to == "ana@example.com"
        && s.message_id == "m-mail"));
    // A refused send is read in the provider's numbering.
    let bad = rt.block_on(sms.send(&message(Channel::Sms, "+12", "m-bad")));
    assert!(
        matches!(
            bad,
            SendOutcome::Rejected {
                code: 21211,
                retryable: false,
                ..
            }
        ),
        "{bad:?}"
    );

    // Wait for the simulator's callbacks to be delivered (each within half a second).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while cluster
        .simulator
        .webhooks_pending
        .load(std::sync::atomic::Ordering::Relaxed)
        > 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "callbacks still pending"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        cluster
            .simulator
            .webhooks_abandoned
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "the gateway refused a genuine callback"
    );
    let mut statuses = Vec::new();
    demo::read_topic(
        &cluster.bootstrap,
        "provider.events.v1",
        topology.partitions(),
        |m| {
            let e = rt
                .block_on(codec.decode_input("provider.events.v1", m.payload()))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if let Fact::MessageStatusChanged(s) = &e.fact {
                assert_eq!(e.envelope.customer_id, "cust-000042");
                statuses.push((
                    e.envelope.source_system.clone(),
                    s.message_id.clone().unwrap_or_default(),
                    s.status,
                ));
            }
            Ok(())
        },
    )
    .unwrap();
    for (source, id) in [("sms", "m-sms"), ("email", "m-mail")] {
        for status in [MessageStatus::Sent, MessageStatus::Delivered] {
            let n = statuses
                .iter()
                .filter(|(s, m, st)| s == source && m == id && *st == status)
                .count();
            assert_eq!(n, 1, "{source} {status:?} of {id}: {statuses:?}");
        }
    }

    // Forgeries: an SMS callback signed with another token, or with a field changed after
    // signing; an e-mail event with the wrong password or none.
    let sms_url = herald::provider::sms::status_callback_url(
        &format!("{}/webhooks/sms", cluster.gateway_root),
        &callback_data("cust-000042", "m-sms"),
    );
    let fields: Vec<(String, String)> = [
        ("MessageSid", sms_id.as_str()),
        ("MessageStatus", "read"),
        ("To", "+34600000042"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    let form = |fields: &[(String, String)]| {
        let mut s = form_urlencoded::Serializer::new(String::new());
        for (k, v) in fields {
            s.append_pair(k, v);
        }
        s.finish().into_bytes()
    };
    let form_header = (
        "content-type",
        "application/x-www-form-urlencoded".to_string(),
    );
    let genuine = herald::provider::sms::sign(demo::DEMO_SMS_TOKEN.as_bytes(), &sms_url, &fields);
    let a = post(
        &rt,
        &sms_url,
        &[form_header.clone(), ("x-twilio-signature", genuine.clone())],
        form(&fields),
    );
    assert_eq!(a.status, 200, "genuine SMS callback: {}", a.body);
    let forged = herald::provider::sms::sign(b"another-token", &sms_url, &fields);
    let a = post(
        &rt,
        &sms_url,
        &[form_header.clone(), ("x-twilio-signature", forged)],
        form(&fields),
    );
    assert_eq!(a.status, 401, "{}", a.body);
    let mut changed = fields.clone();
    changed[1].1 = "failed".into();
    let a = post(
        &rt,
        &sms_url,
        &[form_header.clone(), ("x-twilio-signature", genuine)],
        form(&changed),
    );
    assert_eq!(a.status, 401, "{}", a.body);
    let a = post(&rt, &sms_url, &[form_header], form(&fields));
    assert_eq!(
        (a.status, a.body.contains("missing")),
        (401, true),
        "{}",
        a.body
    );

    let email_url = format!("{}/webhooks/email", cluster.gateway_root);
    let event = serde_json::to_vec(&serde_json::json!([{"email": "ana@example.com",
        "timestamp": 1795500000, "event": "open", "sg_message_id": format!("{mail_id}.filter0"),
        "herald_callback": callback_data("cust-000042", "m-mail")}]))
    .unwrap();
    let basic = |user: &str, password: &str| {
        (
            "authorization",
            herald::provider::email::basic_auth(user, password),
        )
    };
    let (user, password) = demo::DEMO_EMAIL_WEBHOOK_AUTH;
    assert_eq!(
        post(&rt, &email_url, &[basic(user, "guess")], event.clone()).status,
        401
    );
    assert_eq!(post(&rt, &email_url, &[], event.clone()).status, 401);
    assert_eq!(
        post(&rt, &email_url, &[basic(user, password)], event.clone()).status,
        200
    );
    let a = post(
        &rt,
        &email_url,
        &[basic(user, password)],
        b"{\"event\":1}".to_vec(),
    );
    assert_eq!(a.status, 400, "{}", a.body);
}
