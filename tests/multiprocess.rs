//! Scaling out: one API process and two worker processes (the real binary, separate OS processes
//! sharing one database) complete 50 real jobs, each exactly once, first on a local store every
//! process shares, then on S3 with each process on its own disk as if on its own host. The API's
//! /metrics moves while they work, and the processes log JSON.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::moto::Moto;
use common::{database_url, tiny_mlp_bytes};
use serde_json::{Value, json};
use sqlx::PgPool;

const JOBS: usize = 50;
const BUCKET: &str = "multiprocess";

/// A `modelpress serve` process whose stderr (JSON logs) goes to a file; killed if the test fails.
struct Process {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Process {
    fn spawn(name: &'static str, args: &[&str], env: &[(String, String)], logs: &Path) -> Process {
        let log = logs.join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_modelpress"))
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("HOSTNAME", name)
            .env("MODELPRESS_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Process {
            name,
            child: Some(child),
            log,
        }
    }

    /// The process's log lines, each parsed as JSON (a line that is not JSON fails the test).
    fn log_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("{}: a log line is not JSON: {l}", self.name)))
            .collect()
    }

    fn logged(&self, message: &str) -> bool {
        self.log_lines().iter().any(|l| l["fields"]["message"] == message)
    }

    /// SIGTERM, then waits for a clean exit.
    fn terminate(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!("{} did not stop within 60 s of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One Prometheus sample by its exact series text (name and labels).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
}

async fn wait_for(what: &str, secs: u64, mut ready: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !ready().await {
        assert!(start.elapsed() < Duration::from_secs(secs), "{what} within {secs} s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every storage key the database refers to.
async fn keys_in_database(pool: &PgPool) -> BTreeSet<String> {
    let rows: Vec<(String,)> =
        sqlx::query_as("SELECT storage_key FROM models UNION ALL SELECT storage_key FROM artifacts")
            .fetch_all(pool)
            .await
            .unwrap();
    rows.into_iter().map(|(k,)| k).collect()
}

fn files_under(dir: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                walk(root, &p, out)
            } else {
                out.insert(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

/// Runs the whole scenario; `moto` set means the S3 store, otherwise one shared local folder.
async fn fifty_jobs_across_three_processes(pool: PgPool, moto: Option<Moto>) {
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let logs = dirs[3].path();
    // S3: each process has a disk of its own (as on separate hosts); local: they share one.
    let data_dir = |i: usize| {
        dirs[if moto.is_some() { i } else { 0 }]
            .path()
            .to_str()
            .unwrap()
            .to_string()
    };
    let mut env = vec![
        ("DATABASE_URL".to_string(), database_url(&pool)),
        ("MODELPRESS_DATABASE__MAX_CONNECTIONS".into(), "4".into()),
        ("MODELPRESS_EVAL__WARMUP_RUNS".into(), "1".into()),
        ("MODELPRESS_EVAL__TIMED_RUNS".into(), "3".into()),
        ("MODELPRESS_WORKER__POLL_INTERVAL_MS".into(), "200".into()),
        ("MODELPRESS_WORKER__CONCURRENCY".into(), "2".into()),
    ];
    if let Some(moto) = &moto {
        moto.create_bucket(BUCKET).await;
        env.extend(moto.env(BUCKET));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let base = format!("http://{listen}");
    let (d0, d1, d2) = (data_dir(0), data_dir(1), data_dir(2));
    let api = Process::spawn(
        "api",
        &["serve", "--role", "api", "--listen", &listen, "--data-dir", &d0],
        &env,
        logs,
    );
    let workers = [
        Process::spawn(
            "worker-a",
            &["serve", "--role", "worker", "--data-dir", &d1],
            &env,
            logs,
        ),
        Process::spawn(
            "worker-b",
            &["serve", "--role", "worker", "--data-dir", &d2],
            &env,
            logs,
        ),
    ];
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("{base}{path}")).send();
    wait_for("the API is ready", 60, async || {
        get("/readyz").await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    for w in &workers {
        wait_for("both workers are started", 60, async || w.logged("worker started")).await;
    }

    let metrics = async || get("/metrics").await.unwrap().text().await.unwrap();
    let before = metrics().await;
    assert_eq!(sample(&before, "modelpress_jobs{state=\"succeeded\"}"), Some(0.0));

    let model: Value = http
        .post(format!("{base}/v1/models?name=mlp"))
        .header("content-type", "application/octet-stream")
        .body(tiny_mlp_bytes(7))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // Submit while the workers already drain the queue, reading /metrics after each submission
    // and then until the last job is done.
    let start = Instant::now();
    let mut seen = vec![0.0];
    let mut observe = |m: &str| {
        let succeeded = sample(m, "modelpress_jobs{state=\"succeeded\"}").unwrap();
        assert_eq!(
            sample(m, "modelpress_jobs{state=\"failed\"}"),
            Some(0.0),
            "a job failed"
        );
        if seen.last() != Some(&succeeded) {
            seen.push(succeeded);
        }
        succeeded
    };
    for i in 0..JOBS {
        let pass = if i % 2 == 0 {
            "optimize"
        } else {
            "quantize_int8_dynamic"
        };
        let r = http
            .post(format!("{base}/v1/jobs"))
            .json(&json!({"model_id": model["id"], "recipe": [{"pass": pass}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let m = metrics().await;
        let submitted = "modelpress_http_requests_total{method=\"POST\",route=\"/v1/jobs\",status=\"201\"}";
        assert_eq!(sample(&m, submitted), Some((i + 1) as f64), "the request counter moves");
        observe(&m);
    }
    let last = loop {
        let m = metrics().await;
        if observe(&m) == JOBS as f64 {
            break m;
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "not all {JOBS} jobs done: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let elapsed = start.elapsed();
    eprintln!("{JOBS} jobs in {elapsed:?}; succeeded counts seen on /metrics: {seen:?}");
    assert!(
        seen.iter().any(|&n| n > 0.0 && n < JOBS as f64),
        "/metrics moved through intermediate counts: {seen:?}"
    );
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert_eq!(
        sample(
            &last,
            "modelpress_http_requests_total{method=\"POST\",route=\"/v1/jobs\",status=\"201\"}"
        ),
        Some(JOBS as f64)
    );
    assert_eq!(sample(&last, "modelpress_queue_depth"), Some(0.0));
    for pass in ["optimize", "quantize_int8_dynamic"] {
        let series = format!("modelpress_job_duration_seconds_avg{{pass=\"{pass}\",jobs=\"25\"}}");
        assert!(sample(&last, &series).is_some_and(|s| s > 0.0), "{series} in\n{last}");
    }

    // Each job ran exactly once: one attempt, no errors, three artifacts, and nothing else stored.
    let rows: Vec<(String, i32, Value, i64, Option<String>)> = sqlx::query_as(
        "SELECT state, attempt, attempt_errors, (SELECT count(*) FROM artifacts a WHERE a.job_id = j.id), worker_id
         FROM jobs j",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), JOBS);
    let mut by_host: BTreeMap<String, usize> = BTreeMap::new();
    for (state, attempt, errors, artifacts, worker) in &rows {
        assert_eq!(
            (state.as_str(), *attempt, errors, *artifacts),
            ("succeeded", 1, &json!([]), 3)
        );
        let host = worker.as_deref().unwrap().split(':').next().unwrap().to_string();
        *by_host.entry(host).or_default() += 1;
    }
    eprintln!("jobs per worker process: {by_host:?}");
    assert_eq!(
        by_host.keys().cloned().collect::<Vec<_>>(),
        ["worker-a", "worker-b"],
        "both worker processes took jobs"
    );
    // The jobs really ran: a report measured by the job process, fetched through the API.
    let (job_id,): (uuid::Uuid,) =
        sqlx::query_as("SELECT id FROM jobs WHERE recipe->0->>'pass' = 'quantize_int8_dynamic' LIMIT 1")
            .fetch_one(&pool)
            .await
            .unwrap();
    let report: Value = get(&format!("/v1/jobs/{job_id}/report"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report["job_id"], job_id.to_string(), "{report}");
    assert!(report["result"]["size_bytes"].as_u64().unwrap() < report["original"]["size_bytes"].as_u64().unwrap());
    let expected = keys_in_database(&pool).await;
    assert_eq!(expected.len(), 1 + 3 * JOBS);
    match &moto {
        Some(moto) => {
            let in_bucket: BTreeSet<String> = moto.keys(BUCKET).await.into_iter().collect();
            assert_eq!(in_bucket, expected);
            for dir in &dirs[..3] {
                assert!(!dir.path().join("objects").exists(), "the local store is unused");
            }
        }
        None => assert_eq!(files_under(&dirs[0].path().join("objects")), expected),
    }

    for p in workers.into_iter().chain([api]) {
        let name = p.name;
        let lines = p.log_lines().len();
        assert!(lines > 0, "{name} logged nothing");
        let status = p.terminate();
        assert!(status.success(), "{name} exited with {status} after SIGTERM");
    }
}

#[sqlx::test]
async fn one_api_and_two_worker_processes_on_a_shared_disk_complete_fifty_jobs_once_each(pool: PgPool) {
    fifty_jobs_across_three_processes(pool, None).await;
}

#[sqlx::test]
async fn one_api_and_two_worker_processes_on_s3_complete_fifty_jobs_once_each(pool: PgPool) {
    fifty_jobs_across_three_processes(pool, Some(Moto::start().await)).await;
}
