//! Submitting jobs and watching them run end to end: real worker, real job process, real ONNX Runtime.

mod common;

use std::process::Command;

use common::{TestApp, assert_error, python, tiny_mlp_bytes};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::PgPool;

#[sqlx::test]
async fn an_optimize_job_runs_end_to_end_and_its_model_runs_in_onnx_runtime(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let model_id = app.upload_ok(tiny_mlp_bytes(11)).await;

    let r = app
        .submit(json!({"model_id": model_id, "recipe": [{"pass": "optimize", "level": "extended"}]}))
        .await;
    assert_eq!(r.status(), 201);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let job: Value = r.json().await.unwrap();
    assert_eq!(location, format!("/v1/jobs/{}", job["id"].as_str().unwrap()));
    assert!(["queued", "running"].contains(&job["state"].as_str().unwrap()), "{job}");
    assert_eq!(job["recipe"], json!([{"pass": "optimize", "level": "extended"}]));

    let job = app.wait_for_job(job["id"].as_str().unwrap()).await;

    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 1);
    assert_eq!(job["error"], Value::Null);
    assert_eq!(job["progress"], json!({"stage": "done", "percent": 100.0}));
    assert!(job["started_at"].is_string() && job["finished_at"].is_string());
    let names: Vec<&str> = job["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["model.onnx", "report.html", "report.json"]);

    // The artifact downloads intact and runs in stock ONNX Runtime with the outputs of the original.
    let model_artifact = &job["artifacts"][0];
    let bytes = app
        .get(model_artifact["url"].as_str().unwrap())
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(bytes.len() as u64, model_artifact["size_bytes"].as_u64().unwrap());
    assert_eq!(
        hex::encode(Sha256::digest(&bytes)),
        model_artifact["sha256"].as_str().unwrap()
    );
    let dir = tempfile::tempdir().unwrap();
    let (original, compressed) = (dir.path().join("original.onnx"), dir.path().join("model.onnx"));
    std::fs::write(&original, tiny_mlp_bytes(11)).unwrap();
    std::fs::write(&compressed, &bytes).unwrap();
    let check = Command::new(python())
        .arg("-c")
        .arg(
            "import sys, numpy as np, onnx, onnxruntime as ort\n\
             onnx.checker.check_model(sys.argv[2])\n\
             x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)\n\
             run = lambda p: ort.InferenceSession(p, providers=['CPUExecutionProvider']).run(None, {'input': x})[0]\n\
             a, b = run(sys.argv[1]), run(sys.argv[2])\n\
             assert a.shape == (4, 10), a.shape\n\
             assert np.allclose(a, b, atol=1e-5), np.abs(a - b).max()\n\
             print('ok', float(np.abs(a - b).max()))",
        )
        .arg(&original)
        .arg(&compressed)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));

    // The report measures the original and the result.
    let report: Value = app
        .get(&format!("/v1/jobs/{}/report", job["id"].as_str().unwrap()))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(report["schema_version"], 2);
    assert_eq!(report["job_id"], job["id"]);
    assert_eq!(report["environment"]["execution_provider"], "cpu");
    assert_eq!(report["environment"]["intra_op_threads"], 1);
    assert_eq!(
        report["inputs"],
        json!([{"name": "input", "dtype": "float32", "shape": [1, 16]}])
    );
    assert_eq!(report["original"]["size_bytes"], tiny_mlp_bytes(11).len());
    assert_eq!(report["result"]["size_bytes"], bytes.len());
    assert_eq!(report["original"]["parameters"], 16 * 32 + 32 + 32 * 10 + 10);
    for side in ["original", "result"] {
        let latency = &report[side]["latency"];
        let (p50, p90, p99) = (
            latency["p50_ms"].as_f64().unwrap(),
            latency["p90_ms"].as_f64().unwrap(),
            latency["p99_ms"].as_f64().unwrap(),
        );
        assert!(p50 > 0.0 && p50 <= p90 && p90 <= p99, "{side}: {latency}");
        assert_eq!(latency["runs"], 5);
    }
    let fidelity = &report["result"]["fidelity"];
    assert!(fidelity["max_abs_error"].as_f64().unwrap() < 1e-4, "{fidelity}");
    assert!(fidelity["cosine_similarity"].as_f64().unwrap() > 0.9999, "{fidelity}");
    assert_eq!(fidelity["outputs"][0]["name"], "logits");
    assert_eq!(report["passes"][0]["pass"], "optimize");
    app.stop().await;
}

#[sqlx::test]
async fn a_model_onnx_runtime_cannot_load_fails_with_a_clear_code_and_no_retry(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let bytes = modelpress::onnx::encode(&modelpress::onnx::builder::unloadable_model());
    let model_id = app.upload_ok(bytes).await;

    let job = app.submit_ok(&model_id, json!([{"pass": "optimize"}])).await;
    let job = app.wait_for_job(job["id"].as_str().unwrap()).await;

    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "model_load_failed");
    assert!(
        job["error"]["message"].as_str().unwrap().contains("NoSuchOperator"),
        "{job}"
    );
    assert_eq!(job["attempts"], 1, "a model that cannot load is not retried");
    assert_eq!(job["attempt_errors"].as_array().unwrap().len(), 1);
    assert_eq!(job["artifacts"], json!([]));
    assert_error(
        app.get(&format!("/v1/jobs/{}/report", job["id"].as_str().unwrap()))
            .await,
        404,
        "not_found",
    )
    .await;
    // The service is unharmed and still runs good jobs.
    let good = app.upload_ok(tiny_mlp_bytes(12)).await;
    let job = app
        .submit_ok(&good, json!([{"pass": "optimize", "level": "basic"}]))
        .await;
    assert_eq!(
        app.wait_for_job(job["id"].as_str().unwrap()).await["state"],
        "succeeded"
    );
    app.stop().await;
}

#[sqlx::test]
async fn bad_recipes_are_rejected_with_invalid_recipe_naming_the_problem(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;
    let model_id = app.upload_ok(tiny_mlp_bytes(13)).await;
    let cases = [
        (json!([{"pass": "shrink"}]), "unknown pass \"shrink\""),
        (json!([{"pass": "optimize", "level": "max"}]), "max"),
        (json!([{"pass": "optimize", "strength": 3}]), "strength"),
        (json!([]), "empty"),
        (json!("optimize"), "array"),
    ];
    for (recipe, expected) in cases {
        let r = app.submit(json!({"model_id": model_id, "recipe": recipe})).await;
        let message = assert_error(r, 400, "invalid_recipe").await;
        assert!(message.contains(expected), "{recipe}: {message}");
    }
    let jobs: Value = app.get("/v1/jobs").await.json().await.unwrap();
    assert_eq!(jobs["items"], json!([]));
}

#[sqlx::test]
async fn malformed_submissions_get_json_errors(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;
    let post = |body: &'static str, content_type: &'static str| {
        app.client
            .post(app.url("/v1/jobs"))
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    assert_error(
        post("{not json", "application/json").await.unwrap(),
        400,
        "invalid_json",
    )
    .await;
    assert_error(
        post(r#"{"recipe": []}"#, "application/json").await.unwrap(),
        400,
        "invalid_json",
    )
    .await;
    assert_error(
        post(r#"{"model_id": 1}"#, "text/plain").await.unwrap(),
        415,
        "unsupported_media_type",
    )
    .await;
    let missing = uuid::Uuid::new_v4();
    let r = app
        .submit(json!({"model_id": missing, "recipe": [{"pass": "optimize"}]}))
        .await;
    assert_error(r, 404, "not_found").await;
    let model_id = app.upload_ok(tiny_mlp_bytes(14)).await;
    let r = app
        .submit(json!({"model_id": model_id, "recipe": [{"pass": "optimize"}], "max_attempts": 0}))
        .await;
    assert_error(r, 400, "invalid_request").await;
}

#[sqlx::test]
async fn a_queued_job_can_be_cancelled_once(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;
    let model_id = app.upload_ok(tiny_mlp_bytes(15)).await;
    let job = app.submit_ok(&model_id, json!([{"pass": "optimize"}])).await;
    let id = job["id"].as_str().unwrap();
    assert_error(app.get(&format!("/v1/jobs/{id}/report")).await, 409, "job_not_finished").await;

    let r = app.cancel(id).await;
    assert_eq!(r.status(), 200);
    let cancelled: Value = r.json().await.unwrap();
    assert_eq!(cancelled["state"], "cancelled");
    assert!(cancelled["finished_at"].is_string());

    let r = app.cancel(id).await;
    assert_error(r, 409, "job_finished").await;
    let r = app.cancel(uuid::Uuid::new_v4()).await;
    assert_error(r, 404, "not_found").await;
}

#[sqlx::test]
async fn jobs_list_newest_first_filtered_by_state_with_cursors(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;
    let model_id = app.upload_ok(tiny_mlp_bytes(16)).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            app.submit_ok(&model_id, json!([{"pass": "optimize"}])).await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    app.cancel(&ids[0]).await;

    let page1: Value = app.get("/v1/jobs?limit=2").await.json().await.unwrap();
    let got: Vec<&str> = page1["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, vec![ids[2].as_str(), ids[1].as_str()]);
    let cursor = page1["next_cursor"].as_str().unwrap();
    let page2: Value = app
        .get(&format!("/v1/jobs?limit=2&cursor={cursor}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page2["items"][0]["id"], ids[0].as_str());
    assert_eq!(page2["next_cursor"], Value::Null);

    let queued: Value = app.get("/v1/jobs?state=queued").await.json().await.unwrap();
    assert_eq!(queued["items"].as_array().unwrap().len(), 2);
    let cancelled: Value = app.get("/v1/jobs?state=cancelled").await.json().await.unwrap();
    assert_eq!(cancelled["items"][0]["id"], ids[0].as_str());
    assert_error(app.get("/v1/jobs?state=done").await, 400, "invalid_query").await;
}

#[sqlx::test]
async fn unknown_jobs_and_artifacts_answer_404(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;
    let missing = uuid::Uuid::new_v4();
    assert_error(app.get(&format!("/v1/jobs/{missing}")).await, 404, "not_found").await;
    assert_error(app.get(&format!("/v1/jobs/{missing}/report")).await, 404, "not_found").await;
    assert_error(
        app.get(&format!("/v1/jobs/{missing}/artifacts/model.onnx")).await,
        404,
        "not_found",
    )
    .await;
    assert_error(app.get("/v1/jobs/123").await, 404, "not_found").await;
}

#[sqlx::test]
async fn polling_a_job_gets_304_until_it_changes(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;
    let model_id = app.upload_ok(tiny_mlp_bytes(17)).await;
    let job = app.submit_ok(&model_id, json!([{"pass": "optimize"}])).await;
    let path = format!("/v1/jobs/{}", job["id"].as_str().unwrap());

    let r = app.get(&path).await;
    assert_eq!(r.status(), 200);
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    let again = app
        .client
        .get(app.url(&path))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);
    assert!(again.bytes().await.unwrap().is_empty());

    app.client
        .post(app.url(&format!("{path}/cancel")))
        .send()
        .await
        .unwrap();
    let changed = app
        .client
        .get(app.url(&path))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), 200);
    assert_ne!(changed.headers()["etag"].to_str().unwrap(), etag);
}

#[sqlx::test]
async fn the_event_stream_follows_a_job_to_its_end(pool: PgPool) {
    use futures::StreamExt;
    let app = TestApp::spawn(pool).await;
    let model_id = app.upload_ok(tiny_mlp_bytes(18)).await;
    let job = app.submit_ok(&model_id, json!([{"pass": "optimize"}])).await;
    let id = job["id"].as_str().unwrap();

    let r = app.get(&format!("/v1/jobs/{id}/events")).await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut stream = r.bytes_stream();
    let mut text = String::new();
    let read = async {
        while let Some(chunk) = stream.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), read)
        .await
        .expect("the stream ends with the job");
    let states: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| {
            serde_json::from_str::<Value>(d).unwrap()["state"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(!states.is_empty(), "{text}");
    assert_eq!(states.last().unwrap(), "succeeded", "{states:?}");
    assert!(text.contains("event: job"));
    assert_error(
        app.get(&format!("/v1/jobs/{}/events", uuid::Uuid::new_v4())).await,
        404,
        "not_found",
    )
    .await;
    app.stop().await;
}
