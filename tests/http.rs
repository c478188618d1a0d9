//! Cross-cutting HTTP behaviour: health, readiness, request ids, and one error format everywhere.

mod common;

use common::{TestApp, assert_error};
use serde_json::Value;
use sqlx::PgPool;

#[sqlx::test]
async fn health_and_readiness_report_the_database_and_onnx_runtime(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;
    let health: Value = app.get("/healthz").await.json().await.unwrap();
    assert_eq!(health["status"], "ok");
    let r = app.get("/readyz").await;
    assert_eq!(r.status(), 200);
    let ready: Value = r.json().await.unwrap();
    assert_eq!(ready["database"], "ok");
    assert_eq!(ready["storage"], "ok");
    assert!(
        ready["onnxruntime"]["version"].as_str().unwrap().starts_with("1.31"),
        "{ready}"
    );
}

#[sqlx::test]
async fn readiness_fails_when_the_database_is_gone(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool.clone()).await;
    pool.close().await;
    let message = assert_error(app.get("/readyz").await, 503, "not_ready").await;
    assert!(message.contains("database"), "{message}");
}

#[sqlx::test]
async fn readiness_fails_when_the_object_store_is_gone(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;
    assert_eq!(app.get("/readyz").await.status(), 200);
    std::fs::remove_dir_all(app.config.storage_root()).unwrap();
    let message = assert_error(app.get("/readyz").await, 503, "not_ready").await;
    assert!(message.contains("object store"), "{message}");
}

#[sqlx::test]
async fn unknown_routes_and_methods_use_the_error_format(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;
    assert_error(app.get("/v1/nothing-here").await, 404, "not_found").await;
    let r = app.client.put(app.url("/v1/models")).send().await.unwrap();
    assert_error(r, 405, "method_not_allowed").await;
    let r = app.client.delete(app.url("/v1/jobs")).send().await.unwrap();
    assert_error(r, 405, "method_not_allowed").await;
}

#[sqlx::test]
async fn every_response_carries_a_request_id_and_echoes_the_clients(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;
    let r = app.get("/healthz").await;
    let generated = r.headers()["x-request-id"].to_str().unwrap();
    assert_eq!(generated.len(), 36, "a UUID: {generated}");
    let r = app
        .client
        .get(app.url("/v1/nothing"))
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "trace-me-42");
}

#[sqlx::test]
async fn the_dashboard_is_one_self_contained_page(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;
    let r = app.get("/").await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let html = r.text().await.unwrap();
    assert!(html.contains("data-testid=\"upload-model\"") && html.contains("/v1/jobs"));
    assert!(!html.contains("http://") && !html.contains("https://") && !html.contains("<script src"));
}

#[sqlx::test]
async fn metrics_count_requests_by_route_template_and_report_the_queue(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;
    let model_id = app.upload_ok(common::tiny_mlp_bytes(1)).await;
    for _ in 0..3 {
        app.get(&format!("/v1/models/{model_id}")).await;
    }
    app.get(&format!("/v1/models/{}", uuid::Uuid::new_v4())).await;
    app.submit(serde_json::json!({"model_id": model_id, "recipe": [{"pass": "optimize"}]}))
        .await;

    let r = app.get("/metrics").await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let line = |prefix: &str| text.lines().find(|l| l.starts_with(prefix)).map(str::to_string);
    assert_eq!(
        line("modelpress_http_requests_total{method=\"GET\",route=\"/v1/models/{id}\",status=\"200\"}").as_deref(),
        Some("modelpress_http_requests_total{method=\"GET\",route=\"/v1/models/{id}\",status=\"200\"} 3")
    );
    assert!(line("modelpress_http_requests_total{method=\"GET\",route=\"/v1/models/{id}\",status=\"404\"}").is_some());
    assert!(!text.contains(&model_id), "raw paths never become labels");
    assert_eq!(
        line("modelpress_jobs{state=\"queued\"}").as_deref(),
        Some("modelpress_jobs{state=\"queued\"} 1")
    );
    assert_eq!(
        line("modelpress_queue_depth").as_deref(),
        Some("modelpress_queue_depth 1")
    );
    assert!(line("modelpress_storage_bytes{kind=\"models\"}").is_some_and(|l| !l.ends_with(" 0")));
}
