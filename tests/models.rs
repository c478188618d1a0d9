//! Uploading, reading, downloading and deleting models over HTTP.

mod common;

use common::{TestApp, assert_error, tiny_mlp_bytes};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::PgPool;

#[sqlx::test]
async fn uploading_a_raw_model_returns_its_summary_and_location(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;
    let bytes = tiny_mlp_bytes(1);

    let r = app
        .client
        .post(app.url("/v1/models?name=mlp.onnx"))
        .header("content-type", "application/octet-stream")
        .body(bytes.clone())
        .send()
        .await
        .unwrap();

    assert_eq!(r.status(), 201);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let model: Value = r.json().await.unwrap();
    assert_eq!(location, format!("/v1/models/{}", model["id"].as_str().unwrap()));
    assert_eq!(model["name"], "mlp.onnx");
    assert_eq!(model["size_bytes"], bytes.len());
    assert_eq!(model["sha256"], hex::encode(Sha256::digest(&bytes)));
    let s = &model["summary"];
    assert_eq!(s["ir_version"], 8);
    assert_eq!(s["opsets"], json!([{"domain": "ai.onnx", "version": 17}]));
    assert_eq!(
        s["inputs"],
        json!([{"name": "input", "dtype": "float32", "shape": ["batch", 16]}])
    );
    assert_eq!(
        s["outputs"],
        json!([{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}])
    );
    assert_eq!(s["parameters"], 16 * 32 + 32 + 32 * 10 + 10);
    assert_eq!(s["op_counts"], json!({"Add": 2, "MatMul": 2, "Relu": 1}));

    let fetched: Value = app.get(&location).await.json().await.unwrap();
    assert_eq!(fetched, model);
}

#[sqlx::test]
async fn a_multipart_upload_takes_its_name_from_the_file_part(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;
    let bytes = tiny_mlp_bytes(2);
    let form = reqwest::multipart::Form::new().text("comment", "ignored").part(
        "file",
        reqwest::multipart::Part::bytes(bytes.clone()).file_name("classifier.onnx"),
    );

    let r = app
        .client
        .post(app.url("/v1/models"))
        .multipart(form)
        .send()
        .await
        .unwrap();

    assert_eq!(r.status(), 201);
    let model: Value = r.json().await.unwrap();
    assert_eq!(model["name"], "classifier.onnx");
    assert_eq!(model["size_bytes"], bytes.len());
    assert_eq!(model["summary"]["parameters"], 16 * 32 + 32 + 32 * 10 + 10);
}

#[sqlx::test]
async fn a_multipart_upload_without_a_file_part_is_rejected(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;
    let form = reqwest::multipart::Form::new().text("model", "nope");
    let r = app
        .client
        .post(app.url("/v1/models"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_error(r, 400, "invalid_request").await;
}

#[sqlx::test]
async fn uploading_text_is_rejected_with_invalid_model_and_nothing_is_stored(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;

    let r = app.upload(b"definitely not an ONNX model".to_vec()).await;

    assert_error(r, 400, "invalid_model").await;
    let list: Value = app.get("/v1/models").await.json().await.unwrap();
    assert_eq!(list["items"], json!([]));
    assert_eq!(app.stored_files(), Vec::<std::path::PathBuf>::new());
}

#[sqlx::test]
async fn uploading_a_truncated_model_is_rejected_with_400(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;
    let bytes = tiny_mlp_bytes(3);

    let r = app.upload(bytes[..bytes.len() * 2 / 3].to_vec()).await;

    let message = assert_error(r, 400, "invalid_model").await;
    assert!(
        message.contains("protobuf") || message.contains("invalid ONNX"),
        "{message}"
    );
    assert_eq!(app.stored_files(), Vec::<std::path::PathBuf>::new());
}

#[sqlx::test]
async fn an_empty_upload_is_rejected(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;
    assert_error(app.upload(Vec::new()).await, 400, "invalid_model").await;
}

#[sqlx::test]
async fn an_upload_over_the_limit_is_refused_with_413_and_leaves_nothing(pool: PgPool) {
    let app = TestApp::spawn_with(pool, false, |c| c.limits.max_model_bytes = 1000).await;
    let big = vec![7u8; 5000];

    // Declared up front: refused before reading.
    assert_error(app.upload(big.clone()).await, 413, "payload_too_large").await;

    // Streamed without a length: refused once the limit is crossed mid-stream.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = big.chunks(512).map(|c| Ok(c.to_vec())).collect();
    let r = app
        .client
        .post(app.url("/v1/models"))
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_error(r, 413, "payload_too_large").await;
    assert_eq!(app.stored_files(), Vec::<std::path::PathBuf>::new());
}

#[sqlx::test]
async fn other_content_types_are_refused_with_415(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;
    let r = app
        .client
        .post(app.url("/v1/models"))
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_error(r, 415, "unsupported_media_type").await;
}

#[sqlx::test]
async fn unknown_and_malformed_model_ids_answer_404_not_found(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;
    let missing = uuid::Uuid::new_v4();
    assert_error(app.get(&format!("/v1/models/{missing}")).await, 404, "not_found").await;
    assert_error(
        app.get(&format!("/v1/models/{missing}/content")).await,
        404,
        "not_found",
    )
    .await;
    assert_error(app.get("/v1/models/not-a-uuid").await, 404, "not_found").await;
    let r = app
        .client
        .delete(app.url(&format!("/v1/models/{missing}")))
        .send()
        .await
        .unwrap();
    assert_error(r, 404, "not_found").await;
}

#[sqlx::test]
async fn model_content_downloads_with_etag_ranges_and_conditional_requests(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;
    let bytes = tiny_mlp_bytes(4);
    let id = app.upload_ok(bytes.clone()).await;
    let path = format!("/v1/models/{id}/content");

    let r = app.get(&path).await;
    assert_eq!(r.status(), 200);
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    assert_eq!(etag, format!("\"{}\"", hex::encode(Sha256::digest(&bytes))));
    assert_eq!(r.headers()["content-length"], bytes.len().to_string().as_str());
    assert_eq!(r.headers()["accept-ranges"], "bytes");
    assert_eq!(r.bytes().await.unwrap().to_vec(), bytes);

    let r = app
        .client
        .get(app.url(&path))
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes 10-19/{}", bytes.len()).as_str()
    );
    assert_eq!(r.bytes().await.unwrap().to_vec(), bytes[10..20].to_vec());

    let r = app
        .client
        .get(app.url(&path))
        .header("range", "bytes=-5")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap().to_vec(), bytes[bytes.len() - 5..].to_vec());

    let r = app
        .client
        .get(app.url(&path))
        .header("range", format!("bytes={}-", bytes.len()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes */{}", bytes.len()).as_str()
    );
    assert_error(r, 416, "range_not_satisfiable").await;

    let r = app
        .client
        .get(app.url(&path))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
}

#[sqlx::test]
async fn models_list_newest_first_with_cursor_pagination(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;
    let mut ids = Vec::new();
    for seed in 0..3 {
        ids.push(app.upload_ok(tiny_mlp_bytes(seed)).await);
    }

    let page1: Value = app.get("/v1/models?limit=2").await.json().await.unwrap();
    let got: Vec<&str> = page1["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, vec![ids[2].as_str(), ids[1].as_str()]);
    let cursor = page1["next_cursor"].as_str().expect("a full page has a next cursor");

    let page2: Value = app
        .get(&format!("/v1/models?limit=2&cursor={cursor}"))
        .await
        .json()
        .await
        .unwrap();
    let got: Vec<&str> = page2["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, vec![ids[0].as_str()]);
    assert_eq!(page2["next_cursor"], Value::Null);

    assert_error(app.get("/v1/models?limit=0").await, 400, "invalid_query").await;
    assert_error(app.get("/v1/models?limit=abc").await, 400, "invalid_query").await;
    assert_error(app.get("/v1/models?cursor=garbage").await, 400, "invalid_query").await;
}

#[sqlx::test]
async fn deleting_a_model_removes_its_row_and_bytes(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;
    let id = app.upload_ok(tiny_mlp_bytes(5)).await;
    assert_eq!(app.stored_files().len(), 1);

    let r = app
        .client
        .delete(app.url(&format!("/v1/models/{id}")))
        .send()
        .await
        .unwrap();

    assert_eq!(r.status(), 204);
    assert_error(app.get(&format!("/v1/models/{id}")).await, 404, "not_found").await;
    assert_eq!(app.stored_files(), Vec::<std::path::PathBuf>::new());
}

#[sqlx::test]
async fn a_model_with_a_queued_job_cannot_be_deleted(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;
    let id = app.upload_ok(tiny_mlp_bytes(6)).await;
    app.submit_ok(&id, json!([{"pass": "optimize"}])).await;

    let r = app
        .client
        .delete(app.url(&format!("/v1/models/{id}")))
        .send()
        .await
        .unwrap();

    assert_error(r, 409, "model_in_use").await;
    assert_eq!(app.get(&format!("/v1/models/{id}")).await.status(), 200);
}
