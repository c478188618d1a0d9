//! The hostile-input corpus (scripts/make-hostile-corpus.py, run here) through the API: every case
//! gets its expected status and error code, the server stays up, and nothing of a rejected request
//! is left in storage (object store and upload staging) or the database.

mod common;

use std::path::PathBuf;

use common::{TestApp, assert_error, python, tiny_mlp_bytes};
use serde_json::Value;
use sqlx::PgPool;

const LIMIT: u64 = 4 * 1024 * 1024;

fn corpus() -> (tempfile::TempDir, Vec<Value>) {
    let dir = tempfile::tempdir().unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/make-hostile-corpus.py");
    let out = std::process::Command::new(python())
        .arg(script)
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let manifest = std::fs::read_to_string(dir.path().join("manifest.json")).unwrap();
    let cases: Vec<Value> = serde_json::from_str(&manifest).unwrap();
    (dir, cases)
}

async fn rows(app: &TestApp) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM models), (SELECT count(*) FROM datasets), (SELECT count(*) FROM jobs)",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

#[sqlx::test]
async fn every_hostile_input_gets_a_clean_4xx_and_leaves_nothing_behind(pool: PgPool) {
    let app = TestApp::spawn_with(pool, false, |c| {
        c.limits.max_model_bytes = LIMIT;
        c.limits.max_dataset_bytes = LIMIT;
    })
    .await;
    let model = app.upload_ok(tiny_mlp_bytes(1)).await;
    let (dir, cases) = corpus();
    assert!(cases.len() >= 30, "the corpus shrank to {} cases", cases.len());
    let files_before = app.stored_files();
    let rows_before = rows(&app).await;
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let body = std::fs::read(dir.path().join(case["file"].as_str().unwrap())).unwrap();
        let path = case["path"].as_str().unwrap().replace("{model}", &model);
        let method: reqwest::Method = case["method"].as_str().unwrap().parse().unwrap();
        let mut request = app.client.request(method, app.url(&path));
        if let Some(ct) = case["content_type"].as_str().filter(|c| !c.is_empty()) {
            request = request.header("content-type", ct).body(body);
        }
        for (k, v) in case["headers"].as_object().unwrap() {
            request = request.header(k, v.as_str().unwrap());
        }
        let response = request.send().await.unwrap_or_else(|e| panic!("{name}: {e}"));
        let status = case["status"].as_u64().unwrap() as u16;
        let message = assert_error(response, status, case["code"].as_str().unwrap()).await;
        assert!(message.len() < 1200, "{name}: the error message is {} bytes", message.len());
        assert_eq!(app.get("/healthz").await.status(), 200, "the server is down after {name}");
        assert_eq!(app.stored_files(), files_before, "{name} left files behind");
        assert_eq!(rows(&app).await, rows_before, "{name} left rows behind");
    }
    // The model used for the range cases is still whole.
    assert_eq!(
        app.get(&format!("/v1/models/{model}/content")).await.bytes().await.unwrap().to_vec(),
        tiny_mlp_bytes(1)
    );
}

#[sqlx::test]
async fn an_upload_cut_off_mid_stream_leaves_no_partial_file(pool: PgPool) {
    let app = TestApp::spawn_with(pool, false, |c| c.limits.max_dataset_bytes = 64 * 1024).await;
    // 1 MiB sent in chunks with no Content-Length: the limit is only crossed while streaming.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..256).map(|_| Ok(vec![0u8; 4096])).collect();
    let r = app
        .client
        .post(app.url("/v1/datasets"))
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_error(r, 413, "payload_too_large").await;
    assert_eq!(app.stored_files(), Vec::<PathBuf>::new());
}
