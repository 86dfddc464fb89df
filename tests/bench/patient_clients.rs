//! A burst of clients that honour `Retry-After`: the overload benchmark's second load.
//!
//! wrk is a closed loop with no think time: a connection refused with `503` asks again at once,
//! so a thousand refused connections ask thousands of times a second, each refusal waits behind
//! the others before it is read, and the machine's two cores go to refusing instead of serving.
//! Real clients come back later when told to (browsers' fetch retry libraries, the AWS SDKs, our
//! own resilient client): this load is that. Each of `CLIENTS` clients places orders one after
//! another on a connection of its own; after a `503` or `429` it waits for the answer's
//! `Retry-After` (1 s when absent) plus up to half of it again at random (jitter, so refused
//! clients do not all return in the same millisecond), then carries on.
//!
//! Prints one line `PATIENT {json}`: per status, the count and p50/p99/max latency in
//! microseconds, and the seconds the load ran; tests/bench/bench.py reads it (scenario
//! `burst-patient`).
//!
//! ```text
//! cargo run --release -p e2e --example patient_clients -- URL CLIENTS SECONDS [BODY]
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::Rng;

/// How long a request may take before the client gives up on it: the gateway's edge budget is
/// 5 s, so an answer later than that is not coming.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(6);
/// What a refused client waits when the answer names no `Retry-After`.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Tally {
    /// Latency of every answer in microseconds, by status (`0`: no answer).
    latencies: BTreeMap<u16, Vec<u64>>,
}

impl Tally {
    fn record(&mut self, status: u16, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latencies.entry(status).or_default().push(micros);
    }

    fn merge(&mut self, other: Self) {
        for (status, mut values) in other.latencies {
            self.latencies
                .entry(status)
                .or_default()
                .append(&mut values);
        }
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    // Nearest rank: the smallest value with at least p of the answers at or below it.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

async fn client(http: reqwest::Client, url: String, body: String, until: Instant) -> Tally {
    let mut tally = Tally::default();
    while Instant::now() < until {
        let started = Instant::now();
        let answer = http
            .post(&url)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await;
        let Ok(response) = answer else {
            tally.record(0, started.elapsed());
            tokio::time::sleep(DEFAULT_RETRY_AFTER).await;
            continue;
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .map_or(DEFAULT_RETRY_AFTER, Duration::from_secs);
        // The whole answer, as a real client reads it, before the clock stops.
        let _ = response.bytes().await;
        tally.record(status, started.elapsed());
        if matches!(status, 429 | 503) {
            let jitter = rand::rng().random_range(0.0..0.5);
            tokio::time::sleep(retry_after.mul_f64(1.0 + jitter)).await;
        }
    }
    tally
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: patient_clients URL CLIENTS SECONDS [BODY]";
    let url = args.next().ok_or_else(|| anyhow::anyhow!(usage))?;
    let clients: usize = args.next().ok_or_else(|| anyhow::anyhow!(usage))?.parse()?;
    let seconds: f64 = args.next().ok_or_else(|| anyhow::anyhow!(usage))?.parse()?;
    let body = args
        .next()
        .unwrap_or_else(|| r#"{"items":[{"sku":"BK-12","qty":1}]}"#.to_owned());

    // One connection per client, as wrk keeps one per connection it is given.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .timeout(REQUEST_TIMEOUT)
        .build()?;
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = (0..clients)
        .map(|_| tokio::spawn(client(http.clone(), url.clone(), body.clone(), until)))
        .collect();
    let mut tally = Tally::default();
    for task in tasks {
        tally.merge(task.await?);
    }
    let elapsed = started.elapsed().as_secs_f64();

    let mut statuses = serde_json::Map::new();
    for (status, mut values) in tally.latencies {
        values.sort_unstable();
        statuses.insert(
            status.to_string(),
            serde_json::json!({
                "count": values.len(),
                "p50_us": percentile(&values, 0.50),
                "p99_us": percentile(&values, 0.99),
                "max_us": values.last().copied().unwrap_or(0),
            }),
        );
    }
    let summary = serde_json::json!({
        "clients": clients,
        "seconds": elapsed,
        "statuses": statuses,
    });
    println!("PATIENT {summary}");
    Ok(())
}
