//! Test harness: the whole service (HTTP API + workers running real job processes) on a random
//! port, against the fresh database `#[sqlx::test]` made for the test.
#![allow(dead_code)]

pub mod models;
pub mod moto;
pub mod pipeline;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use modelpress::config::Config;
use modelpress::service::{self, ServiceOptions};
use serde_json::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub pool: PgPool,
    pub config: Arc<Config>,
    pub data_dir: tempfile::TempDir,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// Defaults for tests: short evaluation, fast polling, job processes run by the binary under test.
pub fn test_config(data_dir: &std::path::Path) -> Config {
    let mut config = Config::defaults();
    config.server.data_dir = data_dir.to_path_buf();
    config.worker.runner = env!("CARGO_BIN_EXE_modelpress").into();
    config.worker.poll_interval_ms = 200;
    config.worker.rescue_interval_s = 1;
    config.eval.warmup_runs = 1;
    config.eval.timed_runs = 5;
    // Tests that sweep call `retention::sweep` themselves, or turn the sweeper on.
    config.retention.sweep_interval_s = 0;
    config
}

impl TestApp {
    pub async fn spawn(pool: PgPool) -> TestApp {
        Self::spawn_with(pool, true, |_| {}).await
    }

    /// An API without workers: jobs stay queued, for tests about the queue's API side.
    pub async fn spawn_without_workers(pool: PgPool) -> TestApp {
        Self::spawn_with(pool, false, |_| {}).await
    }

    pub async fn spawn_without_workers_with(pool: PgPool, tweak: impl FnOnce(&mut Config)) -> TestApp {
        Self::spawn_with(pool, false, tweak).await
    }

    pub async fn spawn_with(pool: PgPool, workers: bool, tweak: impl FnOnce(&mut Config)) -> TestApp {
        let data_dir = tempfile::tempdir().unwrap();
        let mut config = test_config(data_dir.path());
        tweak(&mut config);
        let config = Arc::new(config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let options = ServiceOptions {
            listener: Some(listener),
            workers,
        };
        let task = tokio::spawn({
            let (config, pool, shutdown) = (config.clone(), pool.clone(), shutdown.clone());
            async move { service::run(config, pool, options, shutdown).await.unwrap() }
        });
        TestApp {
            base,
            client: reqwest::Client::new(),
            pool,
            config,
            data_dir,
            shutdown,
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    pub async fn cancel(&self, job_id: impl std::fmt::Display) -> reqwest::Response {
        self.client
            .post(self.url(&format!("/v1/jobs/{job_id}/cancel")))
            .send()
            .await
            .unwrap()
    }

    pub async fn upload(&self, bytes: Vec<u8>) -> reqwest::Response {
        self.client
            .post(self.url("/v1/models"))
            .header("content-type", "application/octet-stream")
            .body(bytes)
            .send()
            .await
            .unwrap()
    }

    /// Uploads and returns the model id, asserting success.
    pub async fn upload_ok(&self, bytes: Vec<u8>) -> String {
        let r = self.upload(bytes).await;
        assert_eq!(r.status(), 201, "upload failed: {}", r.text().await.unwrap());
        r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string()
    }

    pub async fn submit(&self, body: Value) -> reqwest::Response {
        self.client.post(self.url("/v1/jobs")).json(&body).send().await.unwrap()
    }

    pub async fn submit_ok(&self, model_id: &str, recipe: Value) -> Value {
        let r = self
            .submit(serde_json::json!({"model_id": model_id, "recipe": recipe}))
            .await;
        assert_eq!(r.status(), 201, "submit failed: {}", r.text().await.unwrap());
        r.json().await.unwrap()
    }

    /// Polls the job until it reaches a terminal state (or panics after two minutes).
    pub async fn wait_for_job(&self, id: &str) -> Value {
        let start = Instant::now();
        loop {
            let job: Value = self.get(&format!("/v1/jobs/{id}")).await.json().await.unwrap();
            if ["succeeded", "failed", "cancelled"].contains(&job["state"].as_str().unwrap()) {
                return job;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "job {id} did not finish: {job}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Files anywhere under the data folder (object store, staging, scratch).
    pub fn stored_files(&self) -> Vec<PathBuf> {
        fn walk(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = entry.path();
                if p.is_dir() { walk(&p, out) } else { out.push(p) }
            }
        }
        let mut files = Vec::new();
        walk(self.data_dir.path(), &mut files);
        files
    }

    /// Stops the service and waits for it: workers finish or release their jobs and close their
    /// LISTEN connection. Tests that run workers end with this, so `#[sqlx::test]` can drop the
    /// test database (it refuses while a connection outside its pool is still open).
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A client that sends `Authorization: Bearer <key>` with every request.
pub fn bearer_client(key: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}")).unwrap();
    headers.insert(reqwest::header::AUTHORIZATION, value);
    reqwest::Client::builder().default_headers(headers).build().unwrap()
}

/// A new API key for `tenant` (created if new) in the test's database, as `modelpress keys create`
/// makes one.
pub async fn api_key(pool: &PgPool, tenant: &str) -> String {
    modelpress::api::auth::issue_key(pool, tenant).await.unwrap().key
}

impl TestApp {
    /// The service in auth mode "api_key", its `client` acting for a new key of `tenant`.
    pub async fn spawn_as(pool: PgPool, workers: bool, tenant: &str, tweak: impl FnOnce(&mut Config)) -> TestApp {
        let key = api_key(&pool, tenant).await;
        let mut app = Self::spawn_with(pool, workers, |c| {
            c.auth.mode = modelpress::config::AuthMode::ApiKey;
            tweak(c)
        })
        .await;
        app.client = bearer_client(&key);
        app
    }

    /// The same service as seen by a new key of another tenant.
    pub async fn client_for(&self, tenant: &str) -> reqwest::Client {
        bearer_client(&api_key(&self.pool, tenant).await)
    }
}

/// Asserts the API's error shape and code.
pub async fn assert_error(response: reqwest::Response, status: u16, code: &str) -> String {
    let got = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let text = response.text().await.unwrap();
    assert_eq!(got, status, "expected {status} {code}, got {got}: {text}");
    assert!(
        content_type.starts_with("application/json"),
        "error without JSON content type: {content_type}"
    );
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("error body is not JSON: {text}"));
    assert_eq!(body["error"]["code"], code, "{body}");
    let message = body["error"]["message"].as_str().expect("error.message is a string");
    assert!(!message.is_empty());
    message.to_string()
}

pub fn tiny_mlp_bytes(seed: u64) -> Vec<u8> {
    modelpress::onnx::encode(&modelpress::onnx::builder::tiny_mlp(seed))
}

/// The project's Python environment (onnx, onnxruntime), installed by `make setup`.
pub fn python() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run `make setup` (make test does it)",
        p.display()
    );
    p
}

/// A connection string for the test's own database, for processes started by the test.
pub fn database_url(pool: &PgPool) -> String {
    let o = pool.connect_options();
    format!(
        "postgres://{}@{}:{}/{}",
        o.get_username(),
        o.get_host(),
        o.get_port(),
        o.get_database().expect("sqlx::test names its database")
    )
}

/// An executable stand-in for the job process, for tests about what the worker does when the
/// real one crashes, hangs or is slow. It ignores its arguments.
pub fn fake_runner(dir: &std::path::Path, name: &str, body: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.to_string_lossy().to_string()
}

/// Polls the job until `pred` holds (or panics after `secs`).
pub async fn wait_until(app: &TestApp, id: &str, secs: u64, pred: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let job: Value = app.get(&format!("/v1/jobs/{id}")).await.json().await.unwrap();
        if pred(&job) {
            return job;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "job {id} never reached the expected state: {job}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `onnx.checker.check_model(full_check=True)` in the project's Python must accept `path`.
pub fn onnx_checker(path: &std::path::Path) {
    let check = std::process::Command::new(python())
        .args([
            "-c",
            "import sys, onnx; onnx.checker.check_model(sys.argv[1], full_check=True)",
        ])
        .arg(path)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
}
