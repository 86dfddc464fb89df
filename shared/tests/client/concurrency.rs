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
