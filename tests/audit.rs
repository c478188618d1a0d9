//! The audit trail: one structured line per mutating request. Alone in its test binary: the
//! thread-local log subscriber it installs must not race other tests for tracing's per-callsite
//! interest cache.

mod common;

use common::{TestApp, tiny_mlp_bytes};
use serde_json::Value;
use sqlx::PgPool;

/// Log lines captured in memory (tests run the service on the test's own current-thread runtime,
/// so a thread-local subscriber sees the server's events too).
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[sqlx::test]
async fn every_mutating_request_leaves_one_audit_line_naming_key_tenant_action_and_resource(pool: PgPool) {
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_writer({
            let logs = logs.clone();
            move || logs.clone()
        })
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let app = TestApp::spawn_as(pool, false, "acme", |_| {}).await;
    let (key_id, tenant): (uuid::Uuid, uuid::Uuid) = sqlx::query_as("SELECT k.id, k.tenant_id FROM api_keys k")
        .fetch_one(&app.pool)
        .await
        .unwrap();

    let r = app
        .client
        .post(app.url("/v1/models"))
        .header("content-type", "application/octet-stream")
        .header("x-request-id", "audit-upload-1")
        .body(tiny_mlp_bytes(1))
        .send()
        .await
        .unwrap();
    let model = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    app.get("/v1/models").await; // reads are not audited
    let r = app
        .client
        .delete(app.url(&format!("/v1/models/{model}")))
        .header("x-request-id", "audit-delete-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    app.stop().await;

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let audit: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["target"] == "audit")
        .map(|l| l["fields"].clone())
        .collect();
    assert_eq!(audit.len(), 2, "{audit:?}");
    let expect = [
        ("POST /v1/models", format!("/v1/models/{model}"), 201, "audit-upload-1"),
        (
            "DELETE /v1/models/{id}",
            format!("/v1/models/{model}"),
            204,
            "audit-delete-1",
        ),
    ];
    for (line, (action, resource, status, request_id)) in audit.iter().zip(expect) {
        assert_eq!(line["key_id"], key_id.to_string(), "{line}");
        assert_eq!(line["tenant"], tenant.to_string(), "{line}");
        assert_eq!(line["action"], action, "{line}");
        assert_eq!(line["resource"], resource, "{line}");
        assert_eq!(line["status"], status, "{line}");
        assert_eq!(line["request_id"], request_id, "{line}");
    }
}
