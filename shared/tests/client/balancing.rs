//! Client-side load balancing over several instances of one dependency.

use shared::client::ClientRequest;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{client, config, received};

#[tokio::test]
async fn calls_spread_over_the_instances() {
    let (a, b) = (MockServer::start().await, MockServer::start().await);
    for server in [&a, &b] {
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(200))
            .mount(server)
            .await;
    }
    let client = client(config(&[&a, &b]));

    // Four callers at once: the requests in flight on each instance take part in the choice.
    // (One caller alone would see the faster of two instances take nearly every call, which is
    // what a latency-aware balancer should do with one request at a time.)
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                for _ in 0..20 {
                    client
                        .send(ClientRequest::get("/prices/BK-12"))
                        .await
                        .expect("ok");
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.expect("caller");
    }

    let (to_a, to_b) = (received(&a).await.len(), received(&b).await.len());
    assert_eq!(to_a + to_b, 80);
    assert!(to_a >= 16 && to_b >= 16, "{to_a} / {to_b}");
}

#[tokio::test]
async fn a_retry_goes_to_the_next_instance() {
    let (sick, healthy) = (MockServer::start().await, MockServer::start().await);
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&sick)
        .await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&healthy)
        .await;
    let client = client(config(&[&sick, &healthy]));

    for _ in 0..2 {
        client
            .send(ClientRequest::get("/prices/BK-12"))
            .await
            .expect("the retry succeeds");
    }

    // Each call ends on the healthy instance; none goes back to the sick one after it failed.
    assert!(received(&sick).await.len() <= 2);
    assert_eq!(received(&healthy).await.len(), 2);
}

#[tokio::test]
async fn a_base_url_path_prefix_is_kept() {
    let upstream = MockServer::start().await;
    Mock::given(wiremock::matchers::path("/inventory/stock/BK-12"))
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&upstream)
        .await;
    let mut config = config(&[]);
    config.base_urls =
        vec![url::Url::parse(&format!("{}/inventory/", upstream.uri())).expect("url")];

    client(config)
        .send(ClientRequest::get("/stock/BK-12"))
        .await
        .expect("ok");
}
