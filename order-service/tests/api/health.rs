//! Liveness and readiness.

use serde_json::Value;

use crate::helpers::spawn_app;

#[tokio::test]
async fn readiness_shows_both_dependencies_without_depending_on_them() {
    let app = spawn_app().await;

    let response = app
        .client
        .get(format!("{}/readyz", app.address))
        .send()
        .await
        .expect("GET /readyz");

    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("readiness JSON");
    for dependency in ["pricing", "inventory"] {
        assert_eq!(
            body["checks"][dependency]["critical"], false,
            "{dependency}"
        );
    }
    for critical in ["database", "broker"] {
        assert_eq!(body["checks"][critical]["critical"], true, "{critical}");
        assert_eq!(body["checks"][critical]["ok"], true, "{critical}");
    }
    app.teardown().await;
}
