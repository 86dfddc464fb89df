//! At most `max_in_flight_per_instance` attempts on one instance; the rest wait their turn.

use std::time::Duration;

use shared::client::{BreakerState, ClientError, ClientRequest};

use crate::helpers::{Behaviour, TestInstance, client, config, instance_addresses};

#[tokio::test]
async fn a_burst_beyond_the_bound_waits_for_slots_and_then_succeeds() {
    let addr = instance_addresses(1)[0];
    let instance = TestInstance::start(addr, Behaviour::Slow(Duration::from_millis(50))).await;
    let mut config = config(&[]);
    config.base_urls = vec![format!("http://{addr}").parse().expect("url")];
    config.balance.max_in_flight_per_instance = 4;
    let client = client(config);

    let burst: Vec<_> = (0..32)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.send(ClientRequest::get("/stock/BK-12")).await })
        })
        .collect();
    for call in burst {
        call.await
            .expect("task")
            .expect("every call of the burst succeeds");
    }

    assert_eq!(instance.requests(), 32);
    assert_eq!(instance.max_in_flight(), 4);
}

#[tokio::test]
async fn a_call_that_waits_past_its_deadline_for_a_slot_does_not_count_against_the_dependency() {
    let addr = instance_addresses(1)[0];
    let instance = TestInstance::start(addr, Behaviour::Slow(Duration::from_millis(300))).await;
    let mut config = config(&[]);
    config.base_urls = vec![format!("http://{addr}").parse().expect("url")];
    config.balance.max_in_flight_per_instance = 1;
    config.breaker.failure_threshold = 1;
    let client = client(config);

    let first = tokio::spawn({
        let client = client.clone();
        async move { client.send(ClientRequest::get("/stock/BK-12")).await }
    });
    // The next calls' 100 ms run out while the first holds the only slot.
    tokio::time::timeout(Duration::from_secs(5), async {
        while instance.requests() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the first call reaches the instance");
    let waited = futures::future::join_all((0..3).map(|_| {
        shared::deadline::scope(
            shared::deadline::Deadline::after(Duration::from_millis(100)),
            client.send(ClientRequest::get("/stock/BK-12")),
        )
    }))
    .await;

    first.await.expect("task").expect("the first call succeeds");
    for result in waited {
        assert!(
            matches!(result, Err(ClientError::DeadlineExceeded { .. })),
            "{result:?}"
        );
    }
    assert_eq!(client.breaker_state(), BreakerState::Closed);
}

#[tokio::test]
async fn an_attempt_whose_slot_frees_with_less_than_the_margin_left_is_not_sent() {
    let addr = instance_addresses(1)[0];
    let instance = TestInstance::start(addr, Behaviour::Hanging).await;
    let mut config = config(&[]);
    config.base_urls = vec![format!("http://{addr}").parse().expect("url")];
    config.balance.max_in_flight_per_instance = 1;
    // A wide margin, so that what is left when the slot frees (about 100 ms) is well below it
    // however slowly this machine runs the test.
    config.deadline_margin = Duration::from_millis(400);
    let client = client(config);

    // A plain POST (never retried) holds the only slot for its 500 ms attempt.
    let first = tokio::spawn({
        let client = client.clone();
        async move {
            let hanging = ClientRequest::post_json("/reserve", &serde_json::json!({}))
                .attempt_timeout(Duration::from_millis(500));
            client.send(hanging).await
        }
    });
    tokio::time::timeout(Duration::from_secs(5), async {
        while instance.requests() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the first call reaches the instance");
    let second = shared::deadline::scope(
        shared::deadline::Deadline::after(Duration::from_millis(600)),
        client.send(ClientRequest::get("/stock/BK-12")),
    )
    .await;

    assert!(
        matches!(second, Err(ClientError::DeadlineExceeded { .. })),
        "{second:?}"
    );
    assert_eq!(instance.requests(), 1);
    assert!(first.await.expect("task").is_err());
}
