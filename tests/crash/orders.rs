//! Placing orders as a client that was told `503` would (the same key again after a pause), and
//! reading back what the services hold: shared by the crash and replica tests.

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::{Connection, ConnectionProperties};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::stack::amqp_url;

/// How long a client waits before sending an unanswered order again, and how often it tries:
/// 100 tries 200 ms apart outlast a restart and a caller's open breaker (seconds) many times
/// over.
const RESEND_AFTER: Duration = Duration::from_millis(200);
const RESENDS: usize = 100;
/// How long the queues may take to drain once the counts add up (a redelivered duplicate may
/// still be on its way).
const DRAIN_WITHIN: Duration = Duration::from_secs(90);

/// Sends an order of one `BK-12` with its key until it is placed, as a client told `503` would (after a
/// pause, so the load does not spin while inventory is away); returns the order's ID and the
/// status of every answer (`0` for none). A refusal for good fails the test.
pub async fn place_until_answered(
    http: &reqwest::Client,
    url: &str,
    key: &str,
) -> (String, Vec<String>) {
    let mut answers = Vec::new();
    for _ in 0..RESENDS {
        let outcome = place(
            http,
            url,
            key,
            &json!({"items": [{"sku": "BK-12", "qty": 1}]}),
        )
        .await;
        answers.push(outcome.label());
        match outcome {
            Outcome::Placed(id) => return (id, answers),
            Outcome::Refused(status, body) => panic!("order {key} was refused ({status}): {body}"),
            Outcome::Unanswered(_) => tokio::time::sleep(RESEND_AFTER).await,
        }
    }
    panic!("order {key} was not placed after {RESENDS} tries: {answers:?}");
}

/// What one attempt at placing an order got.
pub enum Outcome {
    /// `201`, with the order's ID.
    Placed(String),
    /// A `4xx` that sending again will not change.
    Refused(u16, String),
    /// No answer, or one that may change when sent again (`5xx`, `429`): the status, 0 for none.
    Unanswered(u16),
}

impl Outcome {
    pub fn label(&self) -> String {
        match self {
            Self::Placed(_) => "201".to_owned(),
            Self::Refused(status, _) | Self::Unanswered(status) => status.to_string(),
        }
    }
}

/// One attempt at placing the order `body` with `key`.
pub async fn place(http: &reqwest::Client, url: &str, key: &str, body: &Value) -> Outcome {
    let response = http
        .post(url)
        .header("idempotency-key", key)
        .json(body)
        .send()
        .await;
    let Ok(response) = response else {
        return Outcome::Unanswered(0);
    };
    let status = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    match status {
        201 => {
            let order: Value = serde_json::from_str(&body).expect("a 201 carries the order");
            Outcome::Placed(
                order["id"]
                    .as_str()
                    .expect("the order has an id")
                    .to_owned(),
            )
        }
        // 409 "Idempotency-Key in use": the same key is still being placed (by a replica that
        // may have died holding it): come back later, like a 503.
        409 if body.contains("Idempotency-Key in use") => Outcome::Unanswered(status),
        429 | 500..=599 => Outcome::Unanswered(status),
        _ => Outcome::Refused(status, body),
    }
}

/// How many of the orders `ids` are not answered `200` by `GET {orders_url}{id}`, read
/// `concurrency` at a time.
pub async fn unreadable_orders<'a>(
    http: &reqwest::Client,
    orders_url: &str,
    ids: impl IntoIterator<Item = &'a str>,
    concurrency: usize,
) -> usize {
    use futures::StreamExt;
    futures::stream::iter(ids)
        .map(|id| {
            let (http, url) = (http.clone(), format!("{orders_url}{id}"));
            async move {
                http.get(url)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            }
        })
        .buffer_unordered(concurrency)
        .filter(|status| std::future::ready(*status != 200))
        .count()
        .await
}

pub async fn get_json(http: &reqwest::Client, url: &str) -> Value {
    match http.get(url).send().await {
        Ok(response) => response.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

/// Pricing's count of `sku`'s units sold, asked of the pricing process at `base`.
pub async fn units_sold(http: &reqwest::Client, base: &str, sku: &str) -> i64 {
    let price = get_json(http, &format!("{base}/prices/{sku}")).await;
    price["unitsSold"].as_i64().unwrap_or(-1)
}

/// The sum of the samples of metric `name` of the process at `base`, `None` when it is not
/// exposed.
pub async fn metric(http: &reqwest::Client, base: &str, name: &str) -> Option<f64> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let samples: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!samples.is_empty()).then(|| samples.iter().sum())
}

/// Waits until every consumer queue of the namespace, and its DLQ, holds no message (a
/// redelivered duplicate may still be on its way when the counts above already add up).
pub async fn assert_eventually_drained(namespace: &str) {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connects to the broker");
    let channel = connection.create_channel().await.expect("channel");
    let deadline = Instant::now() + DRAIN_WITHIN;
    loop {
        let mut waiting = Vec::new();
        for queue in [
            "order.price-events",
            "inventory.order-events",
            "pricing.order-events",
        ] {
            for suffix in ["", ".dlq"] {
                let name = format!("{namespace}.{queue}{suffix}");
                let declared = channel
                    .queue_declare(
                        name.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..QueueDeclareOptions::default()
                        },
                        Default::default(),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("{name} exists: {e}"));
                if declared.message_count() > 0 {
                    waiting.push((name, declared.message_count()));
                }
            }
        }
        if waiting.is_empty() {
            break;
        }
        assert!(
            waiting.iter().all(|(name, _)| !name.ends_with(".dlq")),
            "messages were dead-lettered: {waiting:?}"
        );
        assert!(Instant::now() < deadline, "queues not drained: {waiting:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let _ = connection.close(200, "OK".into()).await;
}
