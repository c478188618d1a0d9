//! The job queue under trouble: lost leases, crashes, retries, cancellation, timeouts, shutdown and
//! killed workers. Real PostgreSQL, real processes.

mod common;

use common::{TestApp, database_url, fake_runner, tiny_mlp_bytes, wait_until};
use modelpress::db::DEFAULT_TENANT;
use modelpress::queue::{self, JobError, JobState, Lease, NewJob};
use serde_json::json;
use sqlx::PgPool;

async fn queued_job(pool: &PgPool, app: &TestApp, max_attempts: i32) -> uuid::Uuid {
    let model_id: uuid::Uuid = app.upload_ok(tiny_mlp_bytes(1)).await.parse().unwrap();
    let recipe = json!([{"pass": "optimize", "level": "extended"}]);
    let new = NewJob {
        goal: None,
        tenant_id: DEFAULT_TENANT,
        model_id,
        recipe: &recipe,
        priority: 0,
        max_attempts,
        timeout_s: 60,
        dataset_id: None,
        evaluation: &serde_json::json!({}),
        webhook_url: None,
        idempotency: None,
    };
    match queue::enqueue(pool, new).await.unwrap() {
        queue::Enqueued::Created(job) => job.id,
        _ => panic!("the job should have been created"),
    }
}

async fn expire_lease(pool: &PgPool, id: uuid::Uuid) {
    sqlx::query("UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await
        .unwrap();
}

#[sqlx::test]
async fn a_worker_whose_lease_was_taken_over_cannot_complete_the_job(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool.clone()).await;
    let id = queued_job(&pool, &app, 3).await;

    let first = queue::claim(&pool, "worker-a", 60)
        .await
        .unwrap()
        .expect("a queued job is claimable");
    assert_eq!((first.id, first.attempt, first.state), (id, 1, JobState::Running));
    assert!(
        queue::claim(&pool, "worker-b", 60).await.unwrap().is_none(),
        "a leased job is not claimed twice"
    );

    expire_lease(&pool, id).await;
    assert_eq!(queue::rescue_expired(&pool).await.unwrap(), 1);
    let second = queue::claim(&pool, "worker-b", 60).await.unwrap().unwrap();
    assert_eq!(second.attempt, 2);

    assert_eq!(
        queue::heartbeat(&pool, id, first.attempt, 60, None).await.unwrap(),
        Lease::Lost
    );
    assert!(
        !queue::complete(&pool, &first, &[]).await.unwrap(),
        "the fenced-out attempt must not complete"
    );
    assert_eq!(
        queue::heartbeat(&pool, id, second.attempt, 60, Some(("x", 50.0)))
            .await
            .unwrap(),
        Lease::Held
    );
    assert!(queue::complete(&pool, &second, &[]).await.unwrap());

    let job = queue::get(&pool, DEFAULT_TENANT, id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(job.attempt_errors.0.len(), 1);
    assert_eq!(job.attempt_errors.0[0].code, "lease_expired");
}

#[sqlx::test]
async fn retryable_failures_back_off_then_end_failed_keeping_every_error(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool.clone()).await;
    let id = queued_job(&pool, &app, 3).await;
    let error = |n: i32| JobError {
        code: "io_error".into(),
        message: format!("disk hiccup {n}"),
    };

    for attempt in 1..=3 {
        let job = queue::claim(&pool, "w", 60).await.unwrap().expect("runnable");
        assert_eq!(job.attempt, attempt);
        let state = queue::fail(&pool, &job, &error(attempt), true, 10).await.unwrap();
        if attempt < 3 {
            assert_eq!(state, Some(JobState::Queued));
            // Backed off: not runnable until scheduled_at, which lies in the future.
            assert!(queue::claim(&pool, "w", 60).await.unwrap().is_none());
            let row = queue::get(&pool, DEFAULT_TENANT, id).await.unwrap().unwrap();
            let delay = (row.scheduled_at - chrono::Utc::now()).num_milliseconds() as f64 / 1e3;
            let base = 10.0 * 2f64.powi(attempt - 1);
            assert!(
                delay > base - 1.0 && delay <= base * 1.25,
                "attempt {attempt}: backoff {delay}s"
            );
            sqlx::query("UPDATE jobs SET scheduled_at = now() WHERE id = $1")
                .bind(id)
                .execute(&pool)
                .await
                .unwrap();
        } else {
            assert_eq!(state, Some(JobState::Failed));
        }
    }
    let job = queue::get(&pool, DEFAULT_TENANT, id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.error.unwrap().0, error(3));
    let messages: Vec<String> = job.attempt_errors.0.iter().map(|e| e.message.clone()).collect();
    assert_eq!(messages, vec!["disk hiccup 1", "disk hiccup 2", "disk hiccup 3"]);
}

#[sqlx::test]
async fn a_fatal_failure_ends_the_job_at_once(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool.clone()).await;
    let id = queued_job(&pool, &app, 3).await;
    let job = queue::claim(&pool, "w", 60).await.unwrap().unwrap();
    let error = JobError {
        code: "pass_failed".into(),
        message: "bad".into(),
    };
    assert_eq!(
        queue::fail(&pool, &job, &error, false, 1).await.unwrap(),
        Some(JobState::Failed)
    );
    assert_eq!(queue::get(&pool, DEFAULT_TENANT, id).await.unwrap().unwrap().attempt, 1);
}

#[sqlx::test]
async fn a_job_process_that_crashes_fails_with_runtime_crashed_after_its_attempts(pool: PgPool) {
    let scripts = tempfile::tempdir().unwrap();
    let runner = fake_runner(scripts.path(), "crash.sh", "echo 'about to crash' >&2\nkill -SEGV $$");
    let app = TestApp::spawn_with(pool, true, |c| {
        c.worker.runner = runner;
        c.worker.retry_base_s = 0;
    })
    .await;
    let model_id = app.upload_ok(tiny_mlp_bytes(2)).await;
    let r = app
        .submit(json!({"model_id": model_id, "recipe": [{"pass": "optimize"}], "max_attempts": 2}))
        .await;
    let job: serde_json::Value = r.json().await.unwrap();

    let job = app.wait_for_job(job["id"].as_str().unwrap()).await;

    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["attempts"], 2);
    assert_eq!(job["error"]["code"], "runtime_crashed");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("signal 11") && message.contains("about to crash"),
        "{message}"
    );
    assert_eq!(job["attempt_errors"].as_array().unwrap().len(), 2);
    assert_eq!(job["artifacts"], json!([]));
    assert_eq!(app.get("/healthz").await.status(), 200, "the server survives");
    app.stop().await;
}

#[sqlx::test]
async fn a_running_job_is_cancelled_within_seconds_and_leaves_no_artifacts(pool: PgPool) {
    let scripts = tempfile::tempdir().unwrap();
    let runner = fake_runner(
        scripts.path(),
        "slow.sh",
        r#"echo '{"event":"progress","stage":"pass:slow","percent":20}'; exec sleep 60"#,
    );
    let app = TestApp::spawn_with(pool, true, |c| c.worker.runner = runner).await;
    let model_id = app.upload_ok(tiny_mlp_bytes(3)).await;
    let job = app.submit_ok(&model_id, json!([{"pass": "optimize"}])).await;
    let id = job["id"].as_str().unwrap().to_string();
    let running = wait_until(&app, &id, 10, |j| j["progress"]["stage"] == "pass:slow").await;
    assert_eq!(running["state"], "running");
    assert_eq!(running["progress"]["percent"], 20.0);

    let r = app
        .client
        .post(app.url(&format!("/v1/jobs/{id}/cancel")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let requested: serde_json::Value = r.json().await.unwrap();
    assert_eq!(requested["cancel_requested"], true);

    let job = wait_until(&app, &id, 5, |j| j["state"] != "running").await;
    assert_eq!(job["state"], "cancelled", "{job}");
    assert_eq!(job["artifacts"], json!([]));
    app.stop().await;
}

#[sqlx::test]
async fn an_attempt_past_its_time_limit_fails_with_timeout(pool: PgPool) {
    let scripts = tempfile::tempdir().unwrap();
    let runner = fake_runner(scripts.path(), "hang.sh", "exec sleep 60");
    let app = TestApp::spawn_with(pool, true, |c| {
        c.worker.runner = runner;
        c.worker.job_timeout_s = 1;
    })
    .await;
    let model_id = app.upload_ok(tiny_mlp_bytes(4)).await;
    let job = app.submit_ok(&model_id, json!([{"pass": "optimize"}])).await;

    let job = app.wait_for_job(job["id"].as_str().unwrap()).await;

    assert_eq!(job["state"], "failed");
    assert_eq!(job["error"]["code"], "timeout");
    assert_eq!(job["attempts"], 1, "a timeout is not retried");
    app.stop().await;
}

#[sqlx::test]
async fn shutdown_hands_a_running_job_back_to_the_queue(pool: PgPool) {
    let scripts = tempfile::tempdir().unwrap();
    let runner = fake_runner(scripts.path(), "slow.sh", "exec sleep 60");
    let app = TestApp::spawn_with(pool.clone(), true, |c| {
        c.worker.runner = runner;
        c.server.shutdown_grace_s = 0;
    })
    .await;
    let model_id = app.upload_ok(tiny_mlp_bytes(5)).await;
    let job = app.submit_ok(&model_id, json!([{"pass": "optimize"}])).await;
    let id = job["id"].as_str().unwrap().to_string();
    wait_until(&app, &id, 10, |j| j["state"] == "running").await;

    app.stop().await;

    let row = queue::get(&pool, DEFAULT_TENANT, id.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.state, JobState::Queued, "released, not failed or lost");
    assert_eq!(row.attempt, 0, "a released attempt is not spent");
    assert!(row.worker_id.is_none() && row.lease_expires_at.is_none());
}

#[sqlx::test]
async fn a_worker_killed_mid_job_costs_one_lease_not_the_job(pool: PgPool) {
    let scripts = tempfile::tempdir().unwrap();
    let runner = fake_runner(scripts.path(), "slow.sh", "exec sleep 60");
    // An API without workers to submit through, and a separate worker process that will die.
    let api = TestApp::spawn_without_workers(pool.clone()).await;
    let model_id = api.upload_ok(tiny_mlp_bytes(6)).await;
    let job = api.submit_ok(&model_id, json!([{"pass": "optimize"}])).await;
    let id = job["id"].as_str().unwrap().to_string();
    let mut doomed = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_modelpress"))
            .arg("worker")
            .env("DATABASE_URL", database_url(&pool))
            .env("MODELPRESS_WORKER__RUNNER", &runner)
            .env("MODELPRESS_WORKER__LEASE_S", "3")
            .env("MODELPRESS_SERVER__DATA_DIR", api.data_dir.path())
            .env("MODELPRESS_DATABASE__MAX_CONNECTIONS", "4")
            .spawn()
            .unwrap(),
    );
    let claimed = wait_until(&api, &id, 30, |j| j["progress"]["stage"] == "starting").await;
    assert_eq!(claimed["attempts"], 1);

    doomed.0.kill().unwrap(); // SIGKILL: no cleanup, no release
    doomed.0.wait().unwrap();

    // A healthy worker (real job process, same storage) rescues the job once the lease expires.
    let shared = api.data_dir.path().to_path_buf();
    let rescuer = TestApp::spawn_with(pool.clone(), true, |c| c.server.data_dir = shared).await;
    let job = rescuer.wait_for_job(&id).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 2);
    assert_eq!(job["attempt_errors"][0]["code"], "lease_expired");
    rescuer.stop().await;
}

/// Kills the process if the test fails before it does, so no worker outlives its test.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[sqlx::test]
async fn a_model_that_exhausts_memory_fails_with_memory_limit_and_others_still_run(pool: PgPool) {
    let app = TestApp::spawn_with(pool, true, |c| c.worker.job_memory_limit_mb = 1024).await;
    let hog = app
        .upload_ok(modelpress::onnx::encode(&modelpress::onnx::builder::memory_hog_model(
            32768,
        )))
        .await;
    let job = app.submit_ok(&hog, json!([{"pass": "optimize"}])).await;

    let job = app.wait_for_job(job["id"].as_str().unwrap()).await;

    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "memory_limit", "{job}");
    assert!(job["error"]["message"].as_str().unwrap().contains("1024 MiB"), "{job}");
    assert_eq!(job["attempts"], 1, "running out of memory is not retried");
    let good = app.upload_ok(tiny_mlp_bytes(7)).await;
    let job = app.submit_ok(&good, json!([{"pass": "optimize"}])).await;
    assert_eq!(
        app.wait_for_job(job["id"].as_str().unwrap()).await["state"],
        "succeeded"
    );
    app.stop().await;
}

#[sqlx::test]
async fn a_job_may_ask_for_its_own_time_limit_within_the_cap(pool: PgPool) {
    let scripts = tempfile::tempdir().unwrap();
    let runner = fake_runner(scripts.path(), "hang.sh", "exec sleep 60");
    let app = TestApp::spawn_with(pool, true, |c| {
        c.worker.runner = runner;
        c.worker.max_job_timeout_s = 3600;
    })
    .await;
    let model_id = app.upload_ok(tiny_mlp_bytes(8)).await;
    let r = app
        .submit(json!({"model_id": model_id, "recipe": [{"pass": "optimize"}], "timeout_s": 7200}))
        .await;
    common::assert_error(r, 400, "invalid_request").await;

    let r = app
        .submit(json!({"model_id": model_id, "recipe": [{"pass": "optimize"}], "timeout_s": 1}))
        .await;
    let job: serde_json::Value = r.json().await.unwrap();
    assert_eq!(job["timeout_s"], 1);
    let job = app.wait_for_job(job["id"].as_str().unwrap()).await;
    assert_eq!(job["error"]["code"], "timeout", "{job}");
    assert!(job["error"]["message"].as_str().unwrap().contains("(1s)"));
    app.stop().await;
}

#[sqlx::test]
async fn an_idempotency_key_returns_the_same_job_and_refuses_a_different_request(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;
    let model_id = app.upload_ok(tiny_mlp_bytes(9)).await;
    let body = json!({"model_id": model_id, "recipe": [{"pass": "optimize"}]});
    let submit = |body: serde_json::Value, key: &'static str| {
        app.client
            .post(app.url("/v1/jobs"))
            .header("idempotency-key", key)
            .json(&body)
            .send()
    };

    let first = submit(body.clone(), "order-42").await.unwrap();
    assert_eq!(first.status(), 201);
    let first: serde_json::Value = first.json().await.unwrap();
    // The same request again (defaults spelled out make no difference): the same job, 200.
    let same = json!({"model_id": model_id, "recipe": [{"pass": "optimize", "level": "extended"}], "priority": 0});
    let again = submit(same, "order-42").await.unwrap();
    assert_eq!(again.status(), 200);
    let again: serde_json::Value = again.json().await.unwrap();
    assert_eq!(again["id"], first["id"]);

    let different = json!({"model_id": model_id, "recipe": [{"pass": "optimize", "level": "all"}]});
    common::assert_error(
        submit(different, "order-42").await.unwrap(),
        422,
        "idempotency_key_reused",
    )
    .await;
    let other_key = submit(body, "order-43").await.unwrap();
    assert_eq!(other_key.status(), 201);
    let jobs: serde_json::Value = app.get("/v1/jobs").await.json().await.unwrap();
    assert_eq!(jobs["items"].as_array().unwrap().len(), 2);
}

/// A stand-in job process that does no work: copies the input as the result and writes an empty
/// report, so the test measures the queue, not ONNX Runtime.
fn noop_runner(dir: &std::path::Path) -> String {
    fake_runner(
        dir,
        "noop.sh",
        r#"input="$4"; out="$8"; mkdir -p "$out" && cp "$input" "$out/model.onnx" && echo '{}' > "$out/report.json" && echo '<html></html>' > "$out/report.html""#,
    )
}

#[sqlx::test]
async fn many_workers_in_and_out_of_process_drain_the_queue_completing_each_job_once(pool: PgPool) {
    let scripts = tempfile::tempdir().unwrap();
    let runner = noop_runner(scripts.path());
    let api = TestApp::spawn_without_workers(pool.clone()).await;
    let model_id: uuid::Uuid = api.upload_ok(tiny_mlp_bytes(10)).await.parse().unwrap();
    let recipe = json!([{"pass": "optimize", "level": "basic"}]);
    for _ in 0..200 {
        let new = NewJob {
            goal: None,
            tenant_id: DEFAULT_TENANT,
            model_id,
            recipe: &recipe,
            priority: 0,
            max_attempts: 3,
            timeout_s: 60,
            dataset_id: None,
            evaluation: &serde_json::json!({}),
            webhook_url: None,
            idempotency: None,
        };
        assert!(matches!(
            queue::enqueue(&pool, new).await.unwrap(),
            queue::Enqueued::Created(_)
        ));
    }
    let spawn_worker = || {
        KillOnDrop(
            std::process::Command::new(env!("CARGO_BIN_EXE_modelpress"))
                .arg("worker")
                .env("DATABASE_URL", database_url(&pool))
                .env("MODELPRESS_WORKER__RUNNER", &runner)
                .env("MODELPRESS_WORKER__CONCURRENCY", "2")
                .env("MODELPRESS_SERVER__DATA_DIR", api.data_dir.path())
                .env("MODELPRESS_DATABASE__MAX_CONNECTIONS", "4")
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let processes = [spawn_worker(), spawn_worker()];
    let shared = api.data_dir.path().to_path_buf();
    let in_process = TestApp::spawn_with(pool.clone(), true, |c| {
        c.server.data_dir = shared;
        c.worker.runner = runner.clone();
        c.worker.concurrency = 4;
    })
    .await;

    let start = std::time::Instant::now();
    loop {
        let (open,): (i64,) = sqlx::query_as("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')")
            .fetch_one(&pool)
            .await
            .unwrap();
        if open == 0 {
            break;
        }
        assert!(start.elapsed().as_secs() < 180, "{open} jobs still open");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    drop(processes);
    in_process.stop().await;

    let rows: Vec<(String, i32, i64, Option<String>)> = sqlx::query_as(
        "SELECT j.state, j.attempt, (SELECT count(*) FROM artifacts a WHERE a.job_id = j.id), j.worker_id FROM jobs j",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 200);
    for (state, attempt, artifacts, _) in &rows {
        assert_eq!((state.as_str(), *attempt, *artifacts), ("succeeded", 1, 3));
    }
    let workers: std::collections::HashSet<_> = rows.iter().filter_map(|r| r.3.clone()).collect();
    assert!(workers.len() >= 2, "the work was shared: {workers:?}");
}

#[sqlx::test]
async fn sigterm_to_a_worker_process_releases_its_running_job(pool: PgPool) {
    let scripts = tempfile::tempdir().unwrap();
    let runner = fake_runner(scripts.path(), "slow.sh", "exec sleep 60");
    let api = TestApp::spawn_without_workers(pool.clone()).await;
    let model_id = api.upload_ok(tiny_mlp_bytes(11)).await;
    let job = api.submit_ok(&model_id, json!([{"pass": "optimize"}])).await;
    let id = job["id"].as_str().unwrap().to_string();
    let mut worker = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_modelpress"))
            .arg("worker")
            .env("DATABASE_URL", database_url(&pool))
            .env("MODELPRESS_WORKER__RUNNER", &runner)
            .env("MODELPRESS_SERVER__SHUTDOWN_GRACE_S", "1")
            .env("MODELPRESS_SERVER__DATA_DIR", api.data_dir.path())
            .env("MODELPRESS_DATABASE__MAX_CONNECTIONS", "4")
            .spawn()
            .unwrap(),
    );
    wait_until(&api, &id, 30, |j| j["state"] == "running").await;

    // SAFETY: sending a signal to a child process this test owns.
    assert_eq!(unsafe { libc::kill(worker.0.id() as i32, libc::SIGTERM) }, 0);
    let status = worker.0.wait().unwrap();

    assert!(status.success(), "the worker exits cleanly on SIGTERM: {status}");
    let row = queue::get(&pool, DEFAULT_TENANT, id.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.state, JobState::Queued, "released for another worker");
    assert_eq!(row.attempt, 0);
}

#[sqlx::test]
async fn a_cpu_worker_leaves_cuda_jobs_for_a_cuda_worker(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool.clone()).await;
    let model_id: uuid::Uuid = app.upload_ok(tiny_mlp_bytes(12)).await.parse().unwrap();
    let recipe = json!([{"pass": "optimize"}]);
    for provider in ["cuda", "cpu"] {
        let evaluation = json!({"task": "generic", "label_key": "labels", "calibration_fraction": 0.2, "seed": 42,
                                "execution_provider": provider});
        let new = NewJob {
            goal: None,
            tenant_id: DEFAULT_TENANT,
            model_id,
            recipe: &recipe,
            priority: if provider == "cuda" { 10 } else { 0 },
            max_attempts: 1,
            timeout_s: 60,
            dataset_id: None,
            evaluation: &evaluation,
            webhook_url: None,
            idempotency: None,
        };
        queue::enqueue(&pool, new).await.unwrap();
    }
    let cpu_only = vec!["cpu".to_string()];
    let got = queue::claim_for(&pool, "cpu-worker", 60, Some(&cpu_only))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        got.evaluation.0["execution_provider"], "cpu",
        "the higher-priority CUDA job is skipped"
    );
    assert!(
        queue::claim_for(&pool, "cpu-worker", 60, Some(&cpu_only))
            .await
            .unwrap()
            .is_none()
    );
    let gpu = vec!["cpu".to_string(), "cuda".to_string()];
    let got = queue::claim_for(&pool, "gpu-worker", 60, Some(&gpu))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.evaluation.0["execution_provider"], "cuda");
}
