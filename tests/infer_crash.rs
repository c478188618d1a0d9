//! An inference worker killed in the middle of a request, as the kernel's out-of-memory killer
//! would kill it: the request gets a clear 503 in the API's error format (never a hang or a 500),
//! and a new worker gives the next request the same answer as before. A test binary of its own, so
//! the only inference worker among this process's children is this test's.

mod common;

use std::time::{Duration, Instant};

use common::models::slow_model_job;
use common::{TestApp, assert_error};
use serde_json::{Value, json};
use sqlx::PgPool;

/// PIDs of this process's children that run `modelpress infer-worker`.
fn inference_workers() -> Vec<u32> {
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        // `pid (comm) state ppid ...`: the name may hold spaces and parentheses, so split after it.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if parent == Some(me) && cmdline.split(|&b| b == 0).any(|arg| arg == b"infer-worker") {
            found.push(pid);
        }
    }
    found
}

/// Seconds of CPU the process has used (user + system), from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    // After the name: state is field 0, utime 11 and stime 12, in clock ticks (100 a second).
    let ticks = |i: usize| fields.get(i).and_then(|t| t.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

async fn infer(app: &TestApp, job: &str, n: i64) -> reqwest::Response {
    app.client
        .post(app.url(&format!("/v1/jobs/{job}/infer")))
        .json(&json!({"inputs": {"n": n}}))
        .send()
        .await
        .unwrap()
}

#[sqlx::test]
async fn a_worker_killed_mid_request_fails_it_with_503_and_a_new_one_serves_the_next(pool: PgPool) {
    let app = TestApp::spawn_with(pool, true, |c| {
        c.inference.timeout_ms = 120_000;
        c.inference.processes = 1;
    })
    .await;
    let job = slow_model_job(&app).await;

    let before = infer(&app, &job, 3).await;
    assert_eq!(before.status(), 200);
    let before: Value = before.json().await.unwrap();
    let workers = inference_workers();
    assert_eq!(
        workers.len(),
        1,
        "one inference worker after the first request: {workers:?}"
    );
    let worker = workers[0];

    // A request that would run for hours; once its worker is busy with it, the worker dies.
    let long = tokio::spawn({
        let (client, url) = (app.client.clone(), app.url(&format!("/v1/jobs/{job}/infer")));
        async move {
            client
                .post(url)
                .json(&json!({"inputs": {"n": 1_000_000_000i64}}))
                .send()
                .await
                .unwrap()
        }
    });
    let busy_from = cpu_seconds(worker);
    let start = Instant::now();
    while cpu_seconds(worker) < busy_from + 0.3 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the worker never started the long request"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &worker.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());

    let response = tokio::time::timeout(Duration::from_secs(30), long)
        .await
        .expect("the request still waits on a dead worker")
        .unwrap();
    let message = assert_error(response, 503, "inference_unavailable").await;
    assert!(message.contains("stopped while handling this request"), "{message}");

    let after = infer(&app, &job, 3).await;
    assert_eq!(after.status(), 200);
    let after: Value = after.json().await.unwrap();
    assert_eq!(after["outputs"], before["outputs"]);
    let workers = inference_workers();
    assert!(
        workers.len() == 1 && workers[0] != worker,
        "a new worker, not the killed one: {workers:?} (killed {worker})"
    );
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("modelpress_inference_worker_restarts_total 1"),
        "{metrics}"
    );
    app.stop().await;
}
