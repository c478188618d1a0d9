//! The service on an S3-compatible store (moto on loopback): uploads, jobs and downloads all go
//! through the bucket, objects sit where the database says, large files go up in parts, and
//! nothing touches the local disk store.

mod common;

use std::collections::BTreeSet;
use std::io::Write;

use common::moto::Moto;
use common::{TestApp, assert_error, tiny_mlp_bytes};
use futures::TryStreamExt;
use modelpress::onnx::{builder, external};
use modelpress::storage::{MIN_PART_SIZE, S3Options, S3Storage, Storage, StorageError};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::PgPool;

const BUCKET: &str = "modelpress-test";

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/fixtures/digits/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

async fn post(app: &TestApp, path: &str, content_type: &str, body: Vec<u8>) -> Value {
    let r = app
        .client
        .post(app.url(path))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "POST {path}: {}", r.text().await.unwrap());
    r.json().await.unwrap()
}

/// The tiny MLP as a zip bundle with its weights in `m.onnx.data`.
fn external_bundle(seed: u64) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.onnx");
    external::save(&builder::tiny_mlp(seed), &path, Some(64)).unwrap();
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for name in ["m.onnx", "m.onnx.data"] {
        zip.start_file(name, zip::write::SimpleFileOptions::default()).unwrap();
        zip.write_all(&std::fs::read(dir.path().join(name)).unwrap()).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

/// Every storage key the database refers to.
async fn keys_in_database(pool: &PgPool) -> BTreeSet<String> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT storage_key FROM models
         UNION ALL SELECT f->>'storage_key' FROM models, jsonb_array_elements(files) f
         UNION ALL SELECT storage_key FROM datasets
         UNION ALL SELECT storage_key FROM artifacts",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter().map(|(k,)| k).collect()
}

#[sqlx::test]
async fn uploads_jobs_and_downloads_go_through_s3_and_objects_are_where_the_database_says(pool: PgPool) {
    let moto = Moto::start().await;
    moto.create_bucket(BUCKET).await;
    let app = TestApp::spawn_with(pool.clone(), true, |c| moto.configure(c, BUCKET)).await;

    // A labelled dataset job (model + dataset fetched from the bucket) and an external-data
    // bundle job (the model's data file fetched beside it).
    let digits = app.upload_ok(fixture("mlp.onnx")).await;
    let dataset = post(
        &app,
        "/v1/datasets?name=digits",
        "application/octet-stream",
        fixture("test.npz"),
    )
    .await;
    let bundle = post(&app, "/v1/models", "application/zip", external_bundle(3)).await;
    assert_eq!(bundle["files"][0]["path"], "m.onnx.data");
    let jobs = [
        app.submit(
            json!({"model_id": digits, "dataset_id": dataset["id"], "task": "classification",
                          "recipe": [{"pass": "quantize_int8_dynamic"}]}),
        )
        .await,
        app.submit(json!({"model_id": bundle["id"], "recipe": [{"pass": "optimize"}]}))
            .await,
    ];
    let mut finished = Vec::new();
    for r in jobs {
        assert_eq!(r.status(), 201);
        let job: Value = r.json().await.unwrap();
        let job = app.wait_for_job(job["id"].as_str().unwrap()).await;
        assert_eq!(job["state"], "succeeded", "{job}");
        finished.push(job);
    }
    let report: Value = app
        .get(&format!("/v1/jobs/{}/report", finished[0]["id"].as_str().unwrap()))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        report["evaluation"]["inputs"], "dataset",
        "the worker fetched the dataset"
    );
    assert!(
        report["original"]["metrics"]["accuracy"].as_f64().unwrap() > 0.9,
        "{report}"
    );

    // The bucket holds exactly what the database refers to, and the local store is unused.
    let in_bucket: BTreeSet<String> = moto.keys(BUCKET).await.into_iter().collect();
    let in_database = keys_in_database(&pool).await;
    assert_eq!(in_bucket, in_database);
    assert_eq!(in_bucket.len(), 1 + 1 + 2 + 3 * 2, "{in_bucket:#?}");
    assert_eq!(
        app.stored_files(),
        Vec::<std::path::PathBuf>::new(),
        "nothing left on local disk"
    );

    // Downloads stream from the bucket: whole, by range, and checked against the recorded hash.
    let artifact = &finished[1]["artifacts"].as_array().unwrap()[0];
    assert_eq!(artifact["name"], "model.onnx");
    let url = artifact["url"].as_str().unwrap();
    let whole = app.get(url).await.bytes().await.unwrap();
    assert_eq!(
        hex::encode(Sha256::digest(&whole)),
        artifact["sha256"].as_str().unwrap()
    );
    let part = app
        .client
        .get(app.url(url))
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(
        part.headers()["content-range"],
        format!("bytes 10-19/{}", whole.len()).as_str()
    );
    assert_eq!(part.bytes().await.unwrap(), whole.slice(10..20));
    let content = app
        .get(&format!("/v1/models/{digits}/content"))
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(content, fixture("mlp.onnx"));

    // Deleting a model or a dataset deletes its bytes in the bucket.
    for path in [
        format!("/v1/models/{}", bundle["id"].as_str().unwrap()),
        format!("/v1/datasets/{}", dataset["id"].as_str().unwrap()),
    ] {
        let r = app.client.delete(app.url(&path)).send().await.unwrap();
        assert_eq!(r.status(), 204, "DELETE {path}");
    }
    let left: BTreeSet<String> = moto.keys(BUCKET).await.into_iter().collect();
    assert_eq!(left, keys_in_database(&pool).await);
    assert!(!left.iter().any(|k| k.contains(bundle["id"].as_str().unwrap())));
    assert!(!left.iter().any(|k| k.contains("/datasets/")));
    app.stop().await;
}

#[tokio::test]
async fn a_large_file_goes_up_in_parts_and_comes_back_whole_and_by_range() {
    let moto = Moto::start().await;
    moto.create_bucket(BUCKET).await;
    let store = S3Storage::new(&S3Options {
        endpoint: moto.endpoint.clone(),
        bucket: BUCKET.into(),
        region: "us-east-1".into(),
        access_key_id: "testing".into(),
        secret_access_key: "testing".into(),
        allow_http: true,
        part_size: MIN_PART_SIZE,
        retry_timeout: std::time::Duration::from_secs(30),
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bytes: Vec<u8> = (0..12 * 1024 * 1024 + 123)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let src = dir.path().join("big");
    std::fs::write(&src, &bytes).unwrap();

    store.put_file("t/big.bin", &src).await.unwrap();
    assert!(!src.exists(), "put_file consumes the staged file");
    assert!(
        moto.etag(BUCKET, "t/big.bin").await.ends_with("-3"),
        "12 MiB in 5 MiB parts is a three-part multipart upload"
    );
    assert_eq!(store.size("t/big.bin").await.unwrap(), bytes.len() as u64);

    // A range across the first part boundary, then the whole object to a file.
    let boundary = MIN_PART_SIZE as u64;
    let range: Vec<u8> = store
        .read("t/big.bin", Some(boundary - 100..boundary + 100))
        .await
        .unwrap()
        .try_fold(Vec::new(), |mut acc, b| async move {
            acc.extend_from_slice(&b);
            Ok(acc)
        })
        .await
        .unwrap();
    assert_eq!(range, bytes[MIN_PART_SIZE - 100..MIN_PART_SIZE + 100]);
    let back = dir.path().join("back");
    store.get_file("t/big.bin", &back).await.unwrap();
    assert!(
        std::fs::read(&back).unwrap() == bytes,
        "the round trip is byte-identical"
    );

    // A small file is one plain PUT; listing sees both; a prefix delete removes both.
    let small = dir.path().join("small");
    std::fs::write(&small, b"hello").unwrap();
    store.put_file("t/sub/small.txt", &small).await.unwrap();
    assert!(!moto.etag(BUCKET, "t/sub/small.txt").await.contains('-'));
    let mut listed: Vec<(String, u64)> = store.list("t").map_ok(|o| (o.key, o.size)).try_collect().await.unwrap();
    listed.sort();
    assert_eq!(
        listed,
        vec![("t/big.bin".into(), bytes.len() as u64), ("t/sub/small.txt".into(), 5)]
    );
    store.delete_prefix("t").await.unwrap();
    assert_eq!(moto.keys(BUCKET).await, Vec::<String>::new());
    assert!(matches!(store.size("t/big.bin").await, Err(StorageError::NotFound(_))));
    assert!(matches!(
        store.read("t/big.bin", None).await,
        Err(StorageError::NotFound(_))
    ));
    store.delete("t/big.bin").await.unwrap();
    assert!(matches!(
        store.read("../x", None).await,
        Err(StorageError::InvalidKey(_))
    ));
}

#[sqlx::test]
async fn a_missing_bucket_makes_the_service_unready_and_uploads_fail_cleanly(pool: PgPool) {
    let moto = Moto::start().await;
    let app = TestApp::spawn_with(pool, false, |c| moto.configure(c, "no-such-bucket")).await;
    let message = assert_error(app.get("/readyz").await, 503, "not_ready").await;
    assert!(message.contains("s3://no-such-bucket"), "{message}");
    moto.create_bucket("no-such-bucket").await;
    let ready: Value = app.get("/readyz").await.json().await.unwrap();
    assert_eq!(ready["storage"], "ok", "{ready}");
    // Gone again between the check and the upload: a 503 in the error format, nothing recorded.
    let r = app
        .client
        .delete(format!("{}/no-such-bucket", moto.endpoint))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let message = assert_error(app.upload(tiny_mlp_bytes(1)).await, 503, "storage_unavailable").await;
    assert!(
        !message.contains("no-such-bucket") && !message.contains(&moto.endpoint),
        "the store's details stay in the server log: {message}"
    );
    let listed: Value = app.get("/v1/models").await.json().await.unwrap();
    assert_eq!(
        listed["items"],
        json!([]),
        "a model whose bytes were not stored is not recorded"
    );
}

/// A service whose S3 endpoint is a closed port on this machine.
async fn unreachable_store(pool: PgPool, retry_timeout_s: u64) -> TestApp {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    TestApp::spawn_with(pool, false, |c| {
        c.storage.backend = "s3".into();
        c.storage.endpoint = format!("http://127.0.0.1:{closed}");
        c.storage.bucket = "anything".into();
        c.storage.allow_http = true;
        c.storage.access_key_id = "testing".into();
        c.storage.secret_access_key = modelpress::config::Secret("testing".into());
        c.storage.retry_timeout_s = retry_timeout_s;
    })
    .await
}

#[sqlx::test]
async fn an_upload_to_an_unreachable_store_gets_503_once_its_retries_end(pool: PgPool) {
    let app = unreachable_store(pool, 2).await;
    // Bounded by storage.retry_timeout_s, not object_store's 3-minute default; the outer limit
    // only keeps a regression from hanging the test run.
    let response = tokio::time::timeout(std::time::Duration::from_secs(60), app.upload(tiny_mlp_bytes(2)))
        .await
        .expect("the upload still retries after a minute");
    let message = assert_error(response, 503, "storage_unavailable").await;
    assert!(message.contains("try again later"), "{message}");
    let listed: Value = app.get("/v1/models").await.json().await.unwrap();
    assert_eq!(listed["items"], json!([]), "nothing is recorded");
}

#[sqlx::test]
async fn an_unreachable_store_makes_readiness_fail_within_seconds(pool: PgPool) {
    let app = unreachable_store(pool, 30).await;
    let start = std::time::Instant::now();
    let message = assert_error(app.get("/readyz").await, 503, "not_ready").await;
    assert!(message.contains("object store s3://anything unavailable"), "{message}");
    assert!(
        start.elapsed().as_secs() < 10,
        "the probe answered in {:?}",
        start.elapsed()
    );
}
