//! `POST /v1/jobs/{id}/infer` end to end: real jobs on the digits classifier, the models run in
//! real inference worker processes, checked against ONNX Runtime run directly in the test.

mod common;

use std::time::{Duration, Instant};

use common::models::slow_model_job;
use common::{TestApp, assert_error};
use modelpress::eval::Runtime;
use modelpress::eval::inputs::{InputTensor, TensorData};
use modelpress::eval::npz::{self, NpyArray, encode_npy, encode_npz};
use modelpress::eval::session::PreparedInputs;
use serde_json::{Value, json};
use sqlx::PgPool;

/// Samples of the digits test split the tests infer on (any will do; spread over the file).
const SAMPLES: [u64; 8] = [0, 1, 2, 3, 57, 120, 333, 539];

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/fixtures/digits/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// The digits test set's arrays, unpacked into `dir`.
fn digits_arrays(dir: &std::path::Path) -> (NpyArray, NpyArray) {
    let file = dir.join("test.npz");
    std::fs::write(&file, fixture("test.npz")).unwrap();
    let arrays = npz::unpack(&file, dir, 1 << 26).unwrap();
    let get = |n: &str| arrays.iter().find(|a| a.name == n).unwrap().clone();
    (get("input"), get("labels"))
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// The chosen samples: (rows of 64 pixels, labels).
fn samples(dir: &std::path::Path) -> (Vec<Vec<f32>>, Vec<i64>) {
    let (input, labels) = digits_arrays(dir);
    let rows = SAMPLES
        .iter()
        .map(|&i| f32s(&input.read_samples(i, 1).unwrap()))
        .collect();
    let labels = SAMPLES
        .iter()
        .map(|&i| i64::from_le_bytes(labels.read_samples(i, 1).unwrap().try_into().unwrap()))
        .collect();
    (rows, labels)
}

/// Uploads the digits model and test set and runs `recipe` as a classification job to success.
async fn digits_job(app: &TestApp, recipe: Value) -> String {
    let model_id = app.upload_ok(fixture("mlp.onnx")).await;
    let r = app
        .client
        .post(app.url("/v1/datasets?name=digits-test"))
        .header("content-type", "application/octet-stream")
        .body(fixture("test.npz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let dataset: Value = r.json().await.unwrap();
    let body = json!({"model_id": model_id, "recipe": recipe, "dataset_id": dataset["id"], "task": "classification"});
    let job: Value = app.submit(body).await.json().await.unwrap();
    let job = app.wait_for_job(job["id"].as_str().unwrap()).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    job["id"].as_str().unwrap().to_string()
}

async fn infer_json(app: &TestApp, job: &str, query: &str, body: Value) -> reqwest::Response {
    app.client
        .post(app.url(&format!("/v1/jobs/{job}/infer{query}")))
        .json(&body)
        .send()
        .await
        .unwrap()
}

fn argmax(row: &[f64]) -> usize {
    row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0
}

fn matrix(v: &Value) -> Vec<Vec<f64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|row| row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect())
        .collect()
}

/// The logits ONNX Runtime gives for `rows` when run here, in the test process, on `model`.
fn logits_in_process(model: &std::path::Path, rows: &[Vec<f32>]) -> Vec<Vec<f64>> {
    let runtime = Runtime::init("").expect("ONNX Runtime (run `make setup`)");
    let mut session = runtime.session(model, 1).unwrap();
    let input = InputTensor {
        name: "input".into(),
        shape: vec![rows.len() as i64, 64],
        data: TensorData::F32(rows.concat()),
    };
    let out = PreparedInputs::new(&[input])
        .unwrap()
        .run_and_collect(&mut session)
        .unwrap();
    let values = out[0].values.clone().unwrap();
    values.chunks(10).map(<[f64]>::to_vec).collect()
}

fn assert_close(a: &[Vec<f64>], b: &[Vec<f64>], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{what}: {x} vs {y}");
    }
}

#[sqlx::test]
async fn the_compressed_digits_model_answers_like_onnx_runtime_and_compare_shows_the_difference(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let job = digits_job(&app, json!([{"pass": "quantize_int8_dynamic"}])).await;
    let dir = tempfile::tempdir().unwrap();
    let (rows, labels) = samples(dir.path());

    // Eight clients at once on a cold model: one of them loads it, all share the session.
    let body = json!({"inputs": {"input": rows}});
    let concurrent = futures::future::join_all((0..8).map(|_| infer_json(&app, &job, "", body.clone()))).await;
    let mut loads = 0;
    let mut answers = Vec::new();
    for r in concurrent {
        assert_eq!(r.status(), 200);
        loads += usize::from(r.headers().contains_key("x-inference-load-ms"));
        answers.push(r.json::<Value>().await.unwrap()["outputs"].clone());
    }
    assert_eq!(loads, 1, "the model is loaded once");
    assert!(answers.windows(2).all(|w| w[0] == w[1]));
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("modelpress_inference_sessions 1\n"), "{metrics}");

    // The compressed model alone.
    let r = infer_json(&app, &job, "", json!({"inputs": {"input": rows}})).await;
    assert_eq!(r.status(), 200);
    let ms: f64 = r.headers()["x-inference-ms"].to_str().unwrap().parse().unwrap();
    assert!(ms > 0.0 && ms < 10_000.0, "X-Inference-Ms {ms}");
    let plain: Value = r.json().await.unwrap();
    assert_eq!(plain["job_id"], job.as_str());
    assert!(
        plain.get("original").is_none() && plain.get("difference").is_none(),
        "{plain}"
    );
    let compressed = matrix(&plain["outputs"]["logits"]);
    assert_eq!((compressed.len(), compressed[0].len()), (SAMPLES.len(), 10));

    // The same numbers ONNX Runtime gives on the job's artifact and on the original, run here.
    let artifact = app
        .get(&format!("/v1/jobs/{job}/artifacts/model.onnx"))
        .await
        .bytes()
        .await
        .unwrap();
    std::fs::write(dir.path().join("compressed.onnx"), &artifact).unwrap();
    std::fs::write(dir.path().join("original.onnx"), fixture("mlp.onnx")).unwrap();
    assert_close(
        &compressed,
        &logits_in_process(&dir.path().join("compressed.onnx"), &rows),
        "compressed logits",
    );
    let original_here = logits_in_process(&dir.path().join("original.onnx"), &rows);

    // compare=true: both models, and how far apart they are.
    let r = infer_json(&app, &job, "?compare=true", json!({"inputs": {"input": rows}})).await;
    assert_eq!(r.status(), 200);
    let both: Value = r.json().await.unwrap();
    assert_eq!(
        matrix(&both["outputs"]["logits"]),
        compressed,
        "same inputs, same session, same answer"
    );
    let original = matrix(&both["original"]["outputs"]["logits"]);
    assert_close(&original, &original_here, "original logits");
    let d = &both["difference"]["logits"];
    let max_abs = compressed
        .iter()
        .flatten()
        .zip(original.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(max_abs > 0.0, "int8 quantization changes the logits a little");
    assert!((d["max_abs_error"].as_f64().unwrap() - max_abs).abs() < 1e-6, "{d}");
    assert!(
        d["cosine"].as_f64().unwrap() > 0.99 && d["cosine"].as_f64().unwrap() < 1.0,
        "{d}"
    );
    let agree = compressed
        .iter()
        .zip(&original)
        .filter(|(c, o)| argmax(c) == argmax(o))
        .count();
    assert_eq!(d["rows"], SAMPLES.len());
    assert_eq!(
        d["argmax_agreement"].as_f64().unwrap(),
        agree as f64 / SAMPLES.len() as f64
    );

    // The class the report's evaluation counts: the original's argmax, scored against the labels.
    let report: Value = app.get(&format!("/v1/jobs/{job}/report")).await.json().await.unwrap();
    let top1 = report["result"]["fidelity"]["top1_agreement"].as_f64().unwrap();
    let classes: Vec<usize> = compressed.iter().map(|r| argmax(r)).collect();
    let original_classes: Vec<usize> = original.iter().map(|r| argmax(r)).collect();
    if top1 == 1.0 {
        assert_eq!(
            classes, original_classes,
            "the report saw no class change on any sample"
        );
    }
    assert!(agree >= SAMPLES.len() - 1, "{classes:?} vs {original_classes:?}");
    let correct = classes.iter().zip(&labels).filter(|(c, l)| **c as i64 == **l).count();
    assert!(correct >= SAMPLES.len() - 1, "classes {classes:?}, labels {labels:?}");

    // .npz in, .npz out, with the original's outputs beside and the difference in a header.
    let x: Vec<u8> = rows.concat().iter().flat_map(|v| v.to_le_bytes()).collect();
    let body = encode_npz(&[("input.npy", encode_npy("<f4", &[SAMPLES.len() as u64, 64], &x))]).unwrap();
    let r = app
        .client
        .post(app.url(&format!("/v1/jobs/{job}/infer?compare=true")))
        .header("content-type", "application/octet-stream")
        .header("accept", "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    let header: Value = serde_json::from_str(r.headers()["x-inference-difference"].to_str().unwrap()).unwrap();
    assert_eq!(header, both["difference"]);
    let npz_file = dir.path().join("out.npz");
    std::fs::write(&npz_file, r.bytes().await.unwrap()).unwrap();
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let arrays = npz::unpack(&npz_file, &out_dir, 1 << 20).unwrap();
    let names: Vec<&str> = arrays.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["logits", "original.logits"]);
    assert_eq!(arrays[0].shape, vec![SAMPLES.len() as u64, 10]);
    // The JSON writes each float32 in its shortest round-trip form, so read back as float32 it
    // is exactly the .npz's value.
    let from_json: Vec<f32> = compressed.concat().into_iter().map(|v| v as f32).collect();
    assert_eq!(
        f32s(&arrays[0].read_all().unwrap()),
        from_json,
        "the .npz holds the JSON's float32 values"
    );
    app.stop().await;
}

#[sqlx::test]
async fn bad_inputs_get_422_naming_the_input_and_other_tenants_jobs_are_not_found(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let job = digits_job(&app, json!([{"pass": "optimize"}])).await;
    let row = vec![0.0f32; 64];
    let cases = [
        (
            json!({"inputs": {"pixels": [row.clone()]}}),
            "input \"pixels\" is not an input of this model",
        ),
        (
            json!({"inputs": {}}),
            "input \"input\" is missing: expected float32 [?, 64]",
        ),
        (
            json!({"inputs": {"input": [vec![0.0f32; 63]]}}),
            "input \"input\" has shape [1, 63] but the model expects float32 [?, 64]",
        ),
        (
            json!({"inputs": {"input": row.clone()}}),
            "input \"input\" has shape [64]",
        ),
        (
            json!({"inputs": {"input": [[1, "x"]]}}),
            "input \"input\": \"x\" is not a float32",
        ),
        (json!({"inputs": {"input": [row.clone(), [1.0]]}}), "ragged"),
    ];
    for (body, expected) in cases {
        let message = assert_error(infer_json(&app, &job, "", body).await, 422, "invalid_input").await;
        assert!(message.contains(expected), "{expected:?} not in {message:?}");
    }
    // .npz inputs must have the input's dtype exactly.
    let x: Vec<u8> = (0..64).flat_map(|_| 0f64.to_le_bytes()).collect();
    let body = encode_npz(&[("input.npy", encode_npy("<f8", &[1, 64], &x))]).unwrap();
    let r = app
        .client
        .post(app.url(&format!("/v1/jobs/{job}/infer")))
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap();
    let message = assert_error(r, 422, "invalid_input").await;
    assert!(
        message.contains("input \"input\" must be float32 but is float64"),
        "{message}"
    );
    // Malformed bodies and formats nobody can serve.
    let post = |ct: &'static str, accept: &'static str, body: &'static str| {
        app.client
            .post(app.url(&format!("/v1/jobs/{job}/infer")))
            .header("content-type", ct)
            .header("accept", accept)
            .body(body)
            .send()
    };
    assert_error(
        post("application/json", "application/json", "{\"inputs\": [")
            .await
            .unwrap(),
        400,
        "invalid_json",
    )
    .await;
    assert_error(
        post("application/json", "application/json", "{\"input\": {}}")
            .await
            .unwrap(),
        400,
        "invalid_json",
    )
    .await;
    assert_error(
        post("text/csv", "application/json", "1,2").await.unwrap(),
        415,
        "unsupported_media_type",
    )
    .await;
    assert_error(
        post("application/json", "text/html", "{}").await.unwrap(),
        406,
        "not_acceptable",
    )
    .await;
    assert_error(
        post("application/octet-stream", "application/json", "not a zip")
            .await
            .unwrap(),
        422,
        "invalid_input",
    )
    .await;
    // After all that, a good request still works.
    let r = infer_json(&app, &job, "", json!({"inputs": {"input": [row.clone()]}})).await;
    assert_eq!(r.status(), 200);

    // A job measured on CUDA runs on CUDA or not at all.
    let caps: Value = app.get("/v1/capabilities").await.json().await.unwrap();
    if !caps.to_string().contains("\"cuda\"") {
        sqlx::query("UPDATE jobs SET evaluation = jsonb_set(evaluation, '{execution_provider}', '\"cuda\"') WHERE id = $1::uuid")
            .bind(&job)
            .execute(&app.pool)
            .await
            .unwrap();
        let r = infer_json(&app, &job, "", json!({"inputs": {"input": [row.clone()]}})).await;
        assert_error(r, 422, "cuda_unavailable").await;
    }

    // Another tenant's job does not exist for this one.
    let other = uuid::Uuid::new_v4();
    sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, 'other')")
        .bind(other)
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE jobs SET tenant_id = $1 WHERE id = $2::uuid")
        .bind(other)
        .bind(&job)
        .execute(&app.pool)
        .await
        .unwrap();
    let r = infer_json(&app, &job, "", json!({"inputs": {"input": [row]}})).await;
    assert_error(r, 404, "not_found").await;
    app.stop().await;
}

#[sqlx::test]
async fn unfinished_unknown_and_oversized_requests_are_refused(pool: PgPool) {
    let app = TestApp::spawn_with(pool, false, |c| c.inference.max_body_bytes = 1024).await;
    let model_id = app.upload_ok(fixture("mlp.onnx")).await;
    let job = app.submit_ok(&model_id, json!([{"pass": "optimize"}])).await;
    let job = job["id"].as_str().unwrap();
    let small = json!({"inputs": {"input": [vec![0.0f32; 64]]}});
    let message = assert_error(infer_json(&app, job, "", small.clone()).await, 409, "job_not_finished").await;
    assert!(message.contains("queued"), "{message}");
    let big = json!({"inputs": {"input": vec![vec![0.5f32; 64]; 10]}});
    assert_error(infer_json(&app, job, "", big).await, 413, "payload_too_large").await;
    let unknown = uuid::Uuid::new_v4();
    assert_error(
        infer_json(&app, &unknown.to_string(), "", small.clone()).await,
        404,
        "not_found",
    )
    .await;
    assert_error(
        infer_json(&app, "not-a-uuid", "", small.clone()).await,
        404,
        "not_found",
    )
    .await;
    app.cancel(job).await;
    let r = infer_json(&app, job, "", small).await;
    assert_error(r, 409, "job_not_succeeded").await;
}

/// The slow model (`y = tanh(y @ W)` repeated `n` times, a Loop): the request chooses its run time.
#[sqlx::test]
async fn a_request_past_the_time_limit_is_cut_off_and_the_next_one_works(pool: PgPool) {
    let app = TestApp::spawn_with(pool, true, |c| {
        c.inference.timeout_ms = 1500;
        c.inference.processes = 1;
    })
    .await;
    let job = &slow_model_job(&app).await;

    let quick = infer_json(&app, job, "?compare=true", json!({"inputs": {"n": 3}})).await;
    assert_eq!(quick.status(), 200);
    let quick: Value = quick.json().await.unwrap();
    assert_eq!(
        quick["difference"]["y"]["max_abs_error"], 0.0,
        "{}",
        quick["difference"]
    );

    let start = Instant::now();
    let r = infer_json(&app, job, "", json!({"inputs": {"n": 1_000_000_000i64}})).await;
    let message = assert_error(r, 504, "inference_timeout").await;
    assert!(message.contains("1500 ms"), "{message}");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(15),
        "cut off after {took:?}"
    );
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("modelpress_inference_timeouts_total 1"), "{metrics}");

    // A new worker serves the next request, with the same answer as before.
    let again = infer_json(&app, job, "?compare=true", json!({"inputs": {"n": 3}})).await;
    assert_eq!(again.status(), 200);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["outputs"], quick["outputs"]);
    app.stop().await;
}

#[sqlx::test]
async fn sessions_past_the_memory_budget_are_unloaded_and_reloaded_on_demand(pool: PgPool) {
    let app = TestApp::spawn_with(pool, true, |c| {
        c.inference.memory_budget_bytes = 1;
        c.inference.processes = 1;
    })
    .await;
    let int8 = digits_job(&app, json!([{"pass": "quantize_int8_dynamic"}])).await;
    let fp32 = digits_job(&app, json!([{"pass": "optimize"}])).await;
    let body = json!({"inputs": {"input": [vec![0.25f32; 64]]}});
    let mut answers = Vec::new();
    for job in [&int8, &fp32, &int8] {
        let r = infer_json(&app, job, "", body.clone()).await;
        assert_eq!(r.status(), 200);
        assert!(
            r.headers().contains_key("x-inference-load-ms"),
            "each request loads again"
        );
        answers.push(r.json::<Value>().await.unwrap()["outputs"].clone());
    }
    assert_eq!(answers[0], answers[2], "a reloaded session answers the same");
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("modelpress_inference_sessions 1\n"), "{metrics}");
    assert!(metrics.contains("modelpress_inference_evictions_total 2"), "{metrics}");
    app.stop().await;
}
