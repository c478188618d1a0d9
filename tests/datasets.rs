//! Datasets and task metrics end to end: the digits classifier (made by
//! scripts/make-digits-fixture.py) evaluated by the service must score what the script measured;
//! bad datasets are refused; datasets must match the model they are used with.

mod common;

use common::{TestApp, assert_error, tiny_mlp_bytes};
use modelpress::eval::npz::{encode_npy, encode_npz};
use serde_json::{Value, json};
use sqlx::PgPool;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/fixtures/digits/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

async fn upload_dataset(app: &TestApp, bytes: Vec<u8>) -> reqwest::Response {
    app.client
        .post(app.url("/v1/datasets?name=digits-test"))
        .header("content-type", "application/octet-stream")
        .body(bytes)
        .send()
        .await
        .unwrap()
}

/// Uploads the digits model and test set, runs `recipe` as a classification job with `extra`
/// fields, and returns the report of the job, which must succeed.
async fn digits_job_report(app: &TestApp, recipe: Value, extra: Value) -> Value {
    let model_id = app.upload_ok(fixture("mlp.onnx")).await;
    let dataset: Value = upload_dataset(app, fixture("test.npz")).await.json().await.unwrap();
    let mut body =
        json!({"model_id": model_id, "recipe": recipe, "dataset_id": dataset["id"], "task": "classification"});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let job: Value = app.submit(body).await.json().await.unwrap();
    let job = app.wait_for_job(job["id"].as_str().unwrap()).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    app.get(&format!("/v1/jobs/{}/report", job["id"].as_str().unwrap()))
        .await
        .json()
        .await
        .unwrap()
}

fn f32s(n: usize, value: f32) -> Vec<u8> {
    (0..n).flat_map(|_| value.to_le_bytes()).collect()
}

#[sqlx::test]
async fn the_digits_classifier_scores_what_its_training_script_measured(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let expected: Value = serde_json::from_slice(&fixture("expected.json")).unwrap();
    let model_id = app.upload_ok(fixture("mlp.onnx")).await;
    let r = upload_dataset(&app, fixture("test.npz")).await;
    assert_eq!(r.status(), 201);
    let dataset: Value = r.json().await.unwrap();
    assert_eq!(dataset["samples"], expected["samples"]);
    assert_eq!(
        dataset["arrays"],
        json!([
            {"name": "input", "dtype": "float32", "shape": [540, 64]},
            {"name": "labels", "dtype": "int64", "shape": [540]},
        ])
    );

    let r = app
        .submit(json!({
            "model_id": model_id,
            "recipe": [{"pass": "optimize"}],
            "dataset_id": dataset["id"],
            "task": "classification",
        }))
        .await;
    assert_eq!(r.status(), 201);
    let job: Value = r.json().await.unwrap();
    assert_eq!(job["dataset_id"], dataset["id"]);
    assert_eq!(job["evaluation"]["task"], "classification");
    let job = app.wait_for_job(job["id"].as_str().unwrap()).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let report: Value = app
        .get(&format!("/v1/jobs/{}/report", job["id"].as_str().unwrap()))
        .await
        .json()
        .await
        .unwrap();

    assert_eq!(report["evaluation"]["inputs"], "dataset");
    assert_eq!(
        report["evaluation"]["evaluation_samples"], 540,
        "optimize does not calibrate: every sample counts"
    );
    assert_eq!(report["evaluation"]["calibration_samples"], 0);
    let metrics = &report["original"]["metrics"];
    assert_eq!(metrics["task"], "classification");
    for key in ["accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_micro"] {
        let (got, want) = (metrics[key].as_f64().unwrap(), expected[key].as_f64().unwrap());
        assert!((got - want).abs() < 1e-9, "{key}: service {got}, script {want}");
    }
    assert_eq!(metrics["confusion"].as_array().unwrap().len(), 10);
    assert!(metrics["top5_accuracy"].as_f64().unwrap() >= metrics["accuracy"].as_f64().unwrap());
    // Graph optimization changes no prediction.
    let comparison = &report["comparison"];
    assert_eq!(comparison["metric"], "accuracy");
    assert_eq!(comparison["delta"], 0.0);
    assert_eq!(comparison["delta_ci95"], json!([0.0, 0.0]));
    let ci = comparison["original_ci95"].as_array().unwrap();
    let acc = expected["accuracy"].as_f64().unwrap();
    assert!(
        ci[0].as_f64().unwrap() < acc && acc < ci[1].as_f64().unwrap(),
        "{comparison}"
    );
    assert_eq!(report["result"]["fidelity"]["top1_agreement"], 1.0);
    assert!(report["result"]["fidelity"]["max_abs_error"].as_f64().unwrap() < 1e-4);
    // Size, compression and batched latency are measured.
    let size = report["original"]["size_bytes"].as_u64().unwrap();
    let zstd = report["original"]["compressed_size_bytes"].as_u64().unwrap();
    assert!(zstd > 0 && zstd < size, "zstd {zstd} of {size}");
    assert_eq!(report["original"]["latency_batched"]["batch_size"], 8);
    assert!(report["environment"]["peak_memory_bytes"].as_u64().unwrap() > 1 << 20);

    // The same report as a self-contained page, its charts drawn from the JSON's numbers.
    let r = app
        .get(&format!("/v1/jobs/{}/report.html", job["id"].as_str().unwrap()))
        .await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let html = r.text().await.unwrap();
    assert!(!html.contains("http://") && !html.contains("https://") && !html.contains("<script src"));
    let size = report["result"]["size_bytes"].as_u64().unwrap();
    assert!(
        html.contains(&format!("data-label=\"result\" data-size=\"{size}\"")),
        "scatter point for the result"
    );
    // The p50 bar carries the exact number (compared as numbers: JSON and HTML may spell it
    // differently, e.g. 1e-3 vs 0.001).
    let p50 = report["result"]["latency"]["p50_ms"].as_f64().unwrap();
    let bars: Vec<f64> = html
        .split("data-ms=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next()?.parse().ok())
        .collect();
    // serde_json parses without `float_roundtrip`, which can land one ulp away from the value
    // written; anything closer than 1e-12 relative is the same number.
    assert!(
        bars.iter().any(|b| (b - p50).abs() <= 1e-12 * p50.abs().max(1e-300)),
        "no bar for p50 {p50}: {bars:?}"
    );
    app.stop().await;
}

#[sqlx::test]
async fn a_regression_task_reports_mae_rmse_and_r2(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let model_id = app.upload_ok(tiny_mlp_bytes(3)).await;
    let n = 20;
    let targets: Vec<u8> = (0..n * 10).flat_map(|i| ((i % 7) as f32).to_le_bytes()).collect();
    let npz = encode_npz(&[
        ("input.npy", encode_npy("<f4", &[n as u64, 16], &f32s(n * 16, 0.5))),
        ("y.npy", encode_npy("<f4", &[n as u64, 10], &targets)),
    ])
    .unwrap();
    let dataset: Value = upload_dataset(&app, npz).await.json().await.unwrap();
    let job = app
        .submit(
            json!({"model_id": model_id, "recipe": [{"pass": "optimize"}], "dataset_id": dataset["id"],
                       "task": "regression", "label_key": "y"}),
        )
        .await
        .json::<Value>()
        .await
        .unwrap();
    let job = app.wait_for_job(job["id"].as_str().unwrap()).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let report: Value = app
        .get(&format!("/v1/jobs/{}/report", job["id"].as_str().unwrap()))
        .await
        .json()
        .await
        .unwrap();
    let m = &report["result"]["metrics"];
    assert_eq!(m["task"], "regression");
    assert!(m["mae"].as_f64().unwrap() > 0.0 && m["rmse"].as_f64().unwrap() >= m["mae"].as_f64().unwrap());
    assert!(m["r2"].is_number());
    assert_eq!(report["comparison"]["metric"], "mae");
    app.stop().await;
}

#[sqlx::test]
async fn bad_datasets_are_refused_with_invalid_dataset_and_nothing_is_stored(pool: PgPool) {
    let app = TestApp::spawn_with(pool, false, |c| c.limits.max_dataset_bytes = 1 << 20).await;
    let pickled = encode_npz(&[("x.npy", encode_npy("|O", &[2], &[0u8; 16]))]).unwrap();
    let mismatched = encode_npz(&[
        ("input.npy", encode_npy("<f4", &[4, 16], &f32s(64, 0.0))),
        ("labels.npy", encode_npy("<i8", &[3], &[0u8; 24])),
    ])
    .unwrap();
    let lying = encode_npz(&[("input.npy", encode_npy("<f4", &[4, 16], &f32s(10, 0.0)))]).unwrap();
    let bomb = {
        use std::io::Write;
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        zip.start_file("input.npy", options).unwrap();
        zip.write_all(&encode_npy("<f4", &[4 << 20], &vec![0u8; 16 << 20]))
            .unwrap();
        zip.finish().unwrap().into_inner()
    };
    let cases = [
        (pickled, "pickle"),
        (mismatched, "disagree on the number of samples"),
        (lying, "declares shape"),
        (bomb, "limit"),
        (b"not a zip at all".to_vec(), "not a valid .npz"),
    ];
    for (bytes, expected) in cases {
        let message = assert_error(upload_dataset(&app, bytes).await, 400, "invalid_dataset").await;
        assert!(message.contains(expected), "{expected}: {message}");
    }
    assert_eq!(app.stored_files(), Vec::<std::path::PathBuf>::new());
    let list: Value = app.get("/v1/datasets").await.json().await.unwrap();
    assert_eq!(list["items"], json!([]));
}

#[sqlx::test]
async fn a_dataset_that_does_not_fit_the_model_is_refused_at_submission(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;
    let model_id = app.upload_ok(tiny_mlp_bytes(4)).await;
    let wrong_width = encode_npz(&[("input.npy", encode_npy("<f4", &[4, 15], &f32s(60, 0.0)))]).unwrap();
    let dataset: Value = upload_dataset(&app, wrong_width).await.json().await.unwrap();
    let submit = |extra: Value| {
        let mut body = json!({"model_id": model_id, "recipe": [{"pass": "optimize"}]});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        app.submit(body)
    };

    let message = assert_error(
        submit(json!({"dataset_id": dataset["id"]})).await,
        422,
        "dataset_mismatch",
    )
    .await;
    assert!(
        message.contains("\"input\"") && message.contains("size 16"),
        "{message}"
    );
    let message = assert_error(submit(json!({"task": "classification"})).await, 400, "invalid_request").await;
    assert!(message.contains("dataset"), "{message}");
    let missing = uuid::Uuid::new_v4();
    assert_error(submit(json!({"dataset_id": missing})).await, 404, "not_found").await;
    // This build of ONNX Runtime has no CUDA: refused up front, never measured on the CPU instead.
    let message = assert_error(
        submit(json!({"execution_provider": "cuda"})).await,
        422,
        "cuda_unavailable",
    )
    .await;
    assert!(message.contains("onnxruntime-gpu"), "{message}");
    assert_error(
        submit(json!({"execution_provider": "tpu"})).await,
        400,
        "invalid_request",
    )
    .await;
}

#[sqlx::test]
async fn datasets_list_get_and_delete_unless_in_use(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;
    let model_id = app.upload_ok(fixture("mlp.onnx")).await;
    let dataset: Value = upload_dataset(&app, fixture("test.npz")).await.json().await.unwrap();
    let id = dataset["id"].as_str().unwrap();
    let fetched: Value = app.get(&format!("/v1/datasets/{id}")).await.json().await.unwrap();
    assert_eq!(fetched, dataset);
    let list: Value = app.get("/v1/datasets").await.json().await.unwrap();
    assert_eq!(list["items"][0]["id"], id);

    let job = app
        .submit(json!({"model_id": model_id, "recipe": [{"pass": "optimize"}], "dataset_id": id}))
        .await
        .json::<Value>()
        .await
        .unwrap();
    let r = app
        .client
        .delete(app.url(&format!("/v1/datasets/{id}")))
        .send()
        .await
        .unwrap();
    assert_error(r, 409, "dataset_in_use").await;
    app.cancel(job["id"].as_str().unwrap()).await;
    let r = app
        .client
        .delete(app.url(&format!("/v1/datasets/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_error(app.get(&format!("/v1/datasets/{id}")).await, 404, "not_found").await;
}

#[sqlx::test]
async fn capabilities_list_what_this_server_can_measure_on(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;
    let caps: Value = app.get("/v1/capabilities").await.json().await.unwrap();
    assert_eq!(caps["onnxruntime"]["loaded"], true);
    assert!(caps["onnxruntime"]["version"].as_str().unwrap().starts_with("1.31"));
    assert_eq!(caps["execution_providers"], json!(["cpu"]), "the CPU wheel has no CUDA");
    assert!(caps["cpu"]["cores"].as_u64().unwrap() >= 1);
    assert!(caps["cpu"]["features"]["avx2"].is_boolean());
}

#[sqlx::test]
async fn int8_dynamic_quantization_keeps_the_digits_accuracy(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let report = digits_job_report(
        &app,
        json!([{"pass": "quantize_int8_dynamic", "per_channel": true}]),
        json!({}),
    )
    .await;
    let delta = report["comparison"]["delta"].as_f64().unwrap();
    assert!(
        delta.abs() <= 0.01,
        "accuracy moved by {delta}: {}",
        report["comparison"]
    );
    assert!(report["result"]["fidelity"]["top1_agreement"].as_f64().unwrap() >= 0.99);
    assert!(report["result"]["size_bytes"].as_u64().unwrap() < report["original"]["size_bytes"].as_u64().unwrap() / 2);
    app.stop().await;
}

#[sqlx::test]
async fn int4_weight_only_keeps_most_of_the_digits_accuracy(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let recipe = json!([{"pass": "quantize_int4_weight_only", "block_size": 32, "symmetric": false}]);
    let report = digits_job_report(&app, recipe, json!({})).await;
    let delta = report["comparison"]["delta"].as_f64().unwrap();
    assert!(
        delta.abs() <= 0.03,
        "accuracy moved by {delta}: {}",
        report["comparison"]
    );
    assert!(report["result"]["size_bytes"].as_u64().unwrap() * 3 < report["original"]["size_bytes"].as_u64().unwrap());
    app.stop().await;
}

#[sqlx::test]
async fn static_int8_calibrates_on_a_split_it_never_evaluates_on(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let recipe = json!([{"pass": "quantize_int8_static", "calibration": "percentile", "per_channel": true}]);
    let report = digits_job_report(&app, recipe, json!({"calibration_fraction": 0.25})).await;
    assert_eq!(report["evaluation"]["calibration_samples"], 135);
    assert_eq!(report["evaluation"]["evaluation_samples"], 405);
    assert_eq!(
        report["original"]["metrics"]["samples"], 405,
        "metrics cover the evaluation split only"
    );
    assert!(
        report["passes"][0]["notes"][0]
            .as_str()
            .unwrap()
            .contains("on 135 sample(s) of the calibration split")
    );
    let delta = report["comparison"]["delta"].as_f64().unwrap();
    assert!(
        delta.abs() <= 0.02,
        "accuracy moved by {delta}: {}",
        report["comparison"]
    );
    app.stop().await;
}
