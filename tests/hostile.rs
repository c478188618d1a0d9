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
    sqlx::query_as("SELECT (SELECT count(*) FROM models), (SELECT count(*) FROM datasets), (SELECT count(*) FROM jobs)")
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
    let mut files_before = app.stored_files();
    let mut rows_before = rows(&app).await;
    let mut failures = Vec::new();
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
        let expected = (case["status"].as_u64().unwrap() as u16, case["code"].as_str().unwrap());
        let status = response.status().as_u16();
        let json = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json");
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let code = body["error"]["code"].as_str().unwrap_or("-");
        let message = body["error"]["message"].as_str().unwrap_or("");
        if (status, code) != expected || !json || message.is_empty() || message.len() > 1200 {
            let shown: String = message.chars().take(300).collect();
            failures.push(format!(
                "{name}: expected {expected:?}, got {status} {code} ({} bytes): {shown}",
                message.len()
            ));
        }
        assert_eq!(
            app.get("/healthz").await.status(),
            200,
            "the server is down after {name}"
        );
        // Compared with the state before this case, so one failure does not hide the next.
        let files_now = app.stored_files();
        if files_now != files_before {
            failures.push(format!("{name} left files behind: {files_now:?}"));
            files_before = files_now;
        }
        let rows_now = rows(&app).await;
        if rows_now != rows_before {
            failures.push(format!("{name} left rows behind: {rows_now:?}"));
            rows_before = rows_now;
        }
    }
    assert!(failures.is_empty(), "{} cases:\n{}", cases.len(), failures.join("\n"));
    // The model used for the range cases is still whole.
    assert_eq!(
        app.get(&format!("/v1/models/{model}/content"))
            .await
            .bytes()
            .await
            .unwrap()
            .to_vec(),
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
