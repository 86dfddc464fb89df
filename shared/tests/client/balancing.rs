//! Client-side load balancing over several instances of one dependency.

use shared::client::ClientRequest;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{client, config, received};

#[tokio::test]
async fn calls_alternate_between_instances() {
    let (a, b) = (MockServer::start().await, MockServer::start().await);
    for server in [&a, &b] {
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(200))
            .mount(server)
            .await;
    }
    let client = client(config(&[&a, &b]));

    for _ in 0..4 {
        client
            .send(ClientRequest::get("/prices/BK-12"))
            .await
            .expect("ok");
    }

    assert_eq!(received(&a).await.len(), 2);
    assert_eq!(received(&b).await.len(), 2);
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

    assert_eq!(received(&sick).await.len(), 2);
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
