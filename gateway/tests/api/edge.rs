//! What the edge adds to every request: correlation IDs, the request budget, problem answers for
//! unknown paths, and the health routes.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use crate::helpers::{ADMIN_KEY, TestApp, assert_problem, json, spawn_app};

/// Every public route, with the upstream and upstream path it must reach.
fn routes(app: &TestApp) -> Vec<(Method, &'static str, &MockServer, &'static str)> {
    vec![
        (Method::POST, "/api/orders", &app.order, "/orders"),
        (Method::GET, "/api/orders/o-1", &app.order, "/orders/o-1"),
        (
            Method::POST,
            "/api/orders/o-1/cancel",
            &app.order,
            "/orders/o-1/cancel",
        ),
        (
            Method::GET,
            "/api/products/BK-12",
            &app.pricing,
            "/prices/BK-12",
        ),
        (
            Method::GET,
            "/api/products/BK-12",
            &app.inventory,
            "/stock/BK-12",
        ),
        (
            Method::GET,
            "/api/prices/BK-12",
            &app.pricing,
            "/prices/BK-12",
        ),
        (
            Method::PUT,
            "/api/prices/BK-12",
            &app.pricing,
            "/prices/BK-12",
        ),
    ]
}

/// Makes every upstream answer every request with a body the gateway can use.
async fn upstreams_answer(app: &TestApp) {
    let body = json!({ "id": "o-1", "sku": "BK-12", "name": "The Rust Book", "price": 39.9,
                       "currency": "EUR", "available": 3 });
    for server in [&app.order, &app.inventory, &app.pricing] {
        Mock::given(wiremock::matchers::any())
            .respond_with(ResponseTemplate::new(200).set_body_json(&body))
            .mount(server)
            .await;
    }
}

async fn send(app: &TestApp, method: Method, route: &str, id: Option<&str>) -> reqwest::Response {
    let mut request = app
        .request(method, route)
        .header("x-api-key", ADMIN_KEY)
        .json(&json!({ "items": [{ "sku": "BK-12", "qty": 1 }], "price": 39.9 }));
    if let Some(id) = id {
        request = request.header("x-correlation-id", id);
    }
    request.send().await.expect("request")
}

/// The requests `server` received at `upstream_path`.
async fn received_at(server: &MockServer, upstream_path: &str) -> Vec<Request> {
    server
        .received_requests()
        .await
        .expect("recording")
        .into_iter()
        .filter(|r| r.url.path() == upstream_path)
        .collect()
}

#[tokio::test]
async fn every_route_forwards_the_callers_correlation_id_and_echoes_it() {
    let app = spawn_app().await;
    upstreams_answer(&app).await;

    for (i, (method, route, server, upstream_path)) in routes(&app).into_iter().enumerate() {
        let id = format!("client-id-{i}");
        let response = send(&app, method.clone(), route, Some(&id)).await;

        assert!(
            response.status().is_success(),
            "{method} {route}: {}",
            response.status()
        );
        assert_eq!(
            response.headers()["x-correlation-id"],
            id.as_str(),
            "{method} {route}"
        );
        let seen: Vec<_> = received_at(server, upstream_path)
            .await
            .iter()
            .filter_map(|r| r.headers.get("x-correlation-id").cloned())
            .collect();
        assert!(
            seen.iter().any(|h| h == id.as_str()),
            "{method} {route} → {upstream_path}: {seen:?}"
        );
    }
}

#[tokio::test]
async fn an_invalid_correlation_id_is_replaced_by_a_uuid_that_travels_upstream() {
    let app = spawn_app().await;
    upstreams_answer(&app).await;

    let response = send(&app, Method::GET, "/api/orders/o-1", Some("bad id!")).await;

    assert_eq!(response.status().as_u16(), 200);
    let echoed = response.headers()["x-correlation-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(
        uuid::Uuid::parse_str(&echoed).is_ok(),
        "{echoed} is not a UUID"
    );
    let received = received_at(&app.order, "/orders/o-1").await;
    assert!(
        received.iter().any(|r| r
            .headers
            .get("x-correlation-id")
            .is_some_and(|v| v == echoed.as_str())),
        "order-service never saw {echoed}"
    );
}

#[tokio::test]
async fn a_correlation_id_is_minted_when_none_is_sent() {
    let app = spawn_app().await;
    Mock::given(method("GET"))
        .and(path("/prices/BK-12"))
        .and(header_exists_as_uuid())
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "sku": "BK-12" })))
        .mount(&app.pricing)
        .await;

    let response = send(&app, Method::GET, "/api/prices/BK-12", None).await;

    assert_eq!(response.status().as_u16(), 200);
    let minted = response.headers()["x-correlation-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(
        uuid::Uuid::parse_str(&minted).is_ok(),
        "{minted} is not a UUID"
    );
    let received = received_at(&app.pricing, "/prices/BK-12").await;
    assert!(
        received.iter().any(|r| r
            .headers
            .get("x-correlation-id")
            .is_some_and(|v| v == minted.as_str())),
        "pricing never saw {minted}"
    );
}

fn header_exists_as_uuid() -> impl wiremock::Match {
    |request: &Request| {
        request
            .headers
            .get("x-correlation-id")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| uuid::Uuid::parse_str(v).is_ok())
    }
}

#[tokio::test]
async fn problems_carry_the_correlation_id_too() {
    let app = spawn_app().await;

    let response = app
        .get("/api/nothing-here")
        .header("x-correlation-id", "trace-404")
        .send()
        .await
        .expect("request");

    assert_eq!(response.headers()["x-correlation-id"], "trace-404");
    let body = assert_problem(response, 404).await;
    assert_eq!(body["correlationId"], "trace-404");
}

#[tokio::test]
async fn every_upstream_call_carries_a_budget_within_the_edge_budget() {
    let app = spawn_app().await;
    upstreams_answer(&app).await;

    for (method, route, server, upstream_path) in routes(&app) {
        let response = send(&app, method.clone(), route, None).await;
        assert!(response.status().is_success(), "{method} {route}");

        for request in received_at(server, upstream_path).await {
            let budget: u64 = request.headers["x-request-timeout-ms"]
                .to_str()
                .expect("ascii")
                .parse()
                .expect("whole milliseconds");
            let budget = Duration::from_millis(budget);
            assert!(
                budget > Duration::ZERO && budget <= app.budget,
                "{method} {route}: forwarded {budget:?}, edge budget {:?}",
                app.budget
            );
        }
    }
}

#[tokio::test]
async fn a_caller_may_shorten_the_budget_but_not_lengthen_it() {
    let app = spawn_app().await;
    upstreams_answer(&app).await;
    let forwarded = |request: &Request| -> u64 {
        request.headers["x-request-timeout-ms"]
            .to_str()
            .expect("ascii")
            .parse()
            .expect("number")
    };

    app.get("/api/orders/short")
        .header("x-request-timeout-ms", "800")
        .send()
        .await
        .expect("request");
    app.get("/api/orders/long")
        .header("x-request-timeout-ms", "600000")
        .send()
        .await
        .expect("request");

    let short = received_at(&app.order, "/orders/short").await;
    assert!(forwarded(&short[0]) <= 800, "{}", forwarded(&short[0]));
    let long = received_at(&app.order, "/orders/long").await;
    let edge = u64::try_from(app.budget.as_millis()).expect("small");
    assert!(forwarded(&long[0]) <= edge, "{}", forwarded(&long[0]));
}

#[tokio::test]
async fn an_unknown_path_is_a_404_problem() {
    let app = spawn_app().await;

    let response = app.get("/orders/o-1").send().await.expect("request");

    assert_problem(response, 404).await;
}

#[tokio::test]
async fn health_and_readiness_report_every_dependency_breaker() {
    let app = spawn_app().await;

    let health = app.get("/healthz").send().await.expect("request");
    assert_eq!(health.status().as_u16(), 200);

    let ready = app.get("/readyz").send().await.expect("request");
    assert_eq!(ready.status().as_u16(), 200);
    let report = json(ready).await;
    for dependency in ["order", "inventory", "pricing"] {
        let check = &report["checks"][dependency];
        assert_eq!(check["ok"], true, "{dependency}: {report}");
        assert_eq!(check["critical"], false, "{dependency}: {report}");
    }

    let metrics = app.get("/metrics").send().await.expect("request");
    assert_eq!(metrics.status().as_u16(), 200);
    let text = metrics.text().await.expect("text");
    assert!(text.contains("service=\"gateway\""), "{text}");
}

#[tokio::test]
async fn routes_are_matched_on_method_too() {
    let app = spawn_app().await;
    Mock::given(wiremock::matchers::any())
        .respond_with(ResponseTemplate::new(200))
        .expect(0)
        .mount(&app.order)
        .await;

    let response = app
        .request(Method::DELETE, "/api/orders/o-1")
        .send()
        .await
        .expect("request");

    assert_problem(response, 405).await;
}
