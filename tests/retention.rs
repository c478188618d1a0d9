//! Retention: finished jobs and artifacts expire with their bytes, orphaned objects are swept after
//! a grace period, one process sweeps at a time, and the service runs the sweeper by itself.

mod common;

use std::time::Duration;

use common::moto::Moto;
use common::{TestApp, assert_error, tiny_mlp_bytes};
use futures::TryStreamExt;
use modelpress::config::RetentionConfig;
use modelpress::retention::{self, Swept};
use modelpress::service;
use modelpress::storage::{self, Storage};
use serde_json::{Value, json};
use sqlx::PgPool;

fn retention(finished_jobs_days: u32, artifacts_days: u32, orphan_grace_s: u64) -> RetentionConfig {
    RetentionConfig {
        finished_jobs_days,
        artifacts_days,
        orphan_grace_s,
        sweep_interval_s: 0,
    }
}

/// Runs one optimize job to success and returns it.
async fn finished_job(app: &TestApp, seed: u64) -> Value {
    let model = app.upload_ok(tiny_mlp_bytes(seed)).await;
    let job = app.submit_ok(&model, json!([{"pass": "optimize"}])).await;
    let job = app.wait_for_job(job["id"].as_str().unwrap()).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    job
}

async fn backdate(pool: &PgPool, job: &Value, days: i32) {
    sqlx::query("UPDATE jobs SET finished_at = now() - make_interval(days => $2) WHERE id = $1::uuid")
        .bind(job["id"].as_str().unwrap())
        .bind(days)
        .execute(pool)
        .await
        .unwrap();
}

async fn keys(store: &dyn Storage) -> Vec<String> {
    let mut keys: Vec<String> = store
        .list(storage::TENANTS_PREFIX)
        .map_ok(|o| o.key)
        .try_collect()
        .await
        .unwrap();
    keys.sort();
    keys
}

fn job_keys(keys: &[String], job: &Value) -> usize {
    let id = job["id"].as_str().unwrap();
    keys.iter().filter(|k| k.contains(&format!("/jobs/{id}/"))).count()
}

#[sqlx::test]
async fn jobs_finished_longer_ago_than_the_retention_are_deleted_with_their_bytes(pool: PgPool) {
    let app = TestApp::spawn(pool.clone()).await;
    let store = service::storage(&app.config).unwrap();
    let (old, recent) = (finished_job(&app, 1).await, finished_job(&app, 2).await);
    backdate(&pool, &old, 31).await;
    let before = keys(store.as_ref()).await;
    assert_eq!((job_keys(&before, &old), job_keys(&before, &recent)), (3, 3));

    let swept = retention::sweep(&pool, store.as_ref(), &retention(30, 0, 3600))
        .await
        .unwrap()
        .unwrap();

    assert_eq!(swept.jobs_deleted, 1, "{swept:?}");
    assert_error(
        app.get(&format!("/v1/jobs/{}", old["id"].as_str().unwrap())).await,
        404,
        "not_found",
    )
    .await;
    let (artifacts,): (i64,) = sqlx::query_as("SELECT count(*) FROM artifacts WHERE job_id = $1::uuid")
        .bind(old["id"].as_str().unwrap())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(artifacts, 0);
    let after = keys(store.as_ref()).await;
    assert_eq!((job_keys(&after, &old), job_keys(&after, &recent)), (0, 3));
    assert_eq!(
        after.len(),
        before.len() - 3,
        "models and the recent job keep their bytes"
    );
    let recent_job: Value = app
        .get(&format!("/v1/jobs/{}", recent["id"].as_str().unwrap()))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(recent_job["artifacts"].as_array().unwrap().len(), 3);
    app.stop().await;
}

#[sqlx::test]
async fn expired_artifacts_are_deleted_and_their_downloads_answer_410(pool: PgPool) {
    let app = TestApp::spawn(pool.clone()).await;
    let store = service::storage(&app.config).unwrap();
    let job = finished_job(&app, 3).await;
    let id = job["id"].as_str().unwrap();
    assert_eq!(job["artifacts_expired_at"], Value::Null);

    // Not yet due: nothing happens.
    backdate(&pool, &job, 6).await;
    let swept = retention::sweep(&pool, store.as_ref(), &retention(0, 7, 3600))
        .await
        .unwrap();
    assert_eq!(swept, Some(Swept::default()));
    backdate(&pool, &job, 8).await;
    let swept = retention::sweep(&pool, store.as_ref(), &retention(0, 7, 3600))
        .await
        .unwrap()
        .unwrap();

    assert_eq!(swept.artifacts_expired, 1);
    let job: Value = app.get(&format!("/v1/jobs/{id}")).await.json().await.unwrap();
    assert_eq!(job["state"], "succeeded", "the job row stays");
    assert_eq!(job["artifacts"], json!([]));
    assert!(job["artifacts_expired_at"].is_string(), "{job}");
    for path in ["artifacts/model.onnx", "report", "report.html"] {
        let message = assert_error(
            app.get(&format!("/v1/jobs/{id}/{path}")).await,
            410,
            "artifacts_expired",
        )
        .await;
        assert!(message.contains("retention"), "{message}");
    }
    assert_error(
        app.get(&format!("/v1/jobs/{id}/artifacts/nope")).await,
        410,
        "artifacts_expired",
    )
    .await;
    assert_eq!(job_keys(&keys(store.as_ref()).await, &job), 0, "the bytes are gone");
    // A second sweep finds nothing more to do.
    let again = retention::sweep(&pool, store.as_ref(), &retention(0, 7, 3600))
        .await
        .unwrap();
    assert_eq!(again, Some(Swept::default()));
    app.stop().await;
}

/// Sets a local file's modification time `secs` into the past.
fn age(path: &std::path::Path, secs: u64) {
    let file = std::fs::File::options().write(true).open(path).unwrap();
    file.set_modified(std::time::SystemTime::now() - Duration::from_secs(secs))
        .unwrap();
}

#[sqlx::test]
async fn orphaned_objects_older_than_the_grace_period_are_removed_and_referenced_ones_kept(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool.clone()).await;
    let store = service::storage(&app.config).unwrap();
    let model = app.upload_ok(tiny_mlp_bytes(4)).await;
    let tenant = modelpress::db::DEFAULT_TENANT;
    let root = app.config.storage_root();
    let put = |key: String, bytes: &[u8]| {
        let staged = app.data_dir.path().join("orphan");
        std::fs::write(&staged, bytes).unwrap();
        let store = store.clone();
        async move {
            store.put_file(&key, &staged).await.unwrap();
            key
        }
    };
    let old_orphan = put(
        storage::artifact_key(tenant, uuid::Uuid::new_v4(), 1, "model.onnx"),
        b"stale bytes",
    )
    .await;
    let young_orphan = put(storage::dataset_key(tenant, uuid::Uuid::new_v4()), b"uploading").await;
    let model_key = storage::model_key(tenant, model.parse().unwrap());
    age(&root.join(&old_orphan), 7200);
    age(&root.join(&model_key), 7200);

    let swept = retention::sweep(&pool, store.as_ref(), &retention(0, 0, 3600))
        .await
        .unwrap()
        .unwrap();

    assert_eq!((swept.orphans_deleted, swept.orphan_bytes), (1, 11), "{swept:?}");
    let mut expected = vec![model_key, young_orphan];
    expected.sort();
    assert_eq!(keys(store.as_ref()).await, expected);
    let r = app.get(&format!("/v1/models/{model}/content")).await;
    assert_eq!(r.status(), 200, "the referenced model is intact");
}

#[sqlx::test]
async fn the_orphan_sweep_works_on_s3_too(pool: PgPool) {
    let moto = Moto::start().await;
    moto.create_bucket("retention").await;
    let app = TestApp::spawn_without_workers_with(pool.clone(), |c| moto.configure(c, "retention")).await;
    let store = service::storage(&app.config).unwrap();
    let model = app.upload_ok(tiny_mlp_bytes(5)).await;
    let staged = app.data_dir.path().join("orphan");
    std::fs::write(&staged, b"no row names me").unwrap();
    let orphan = storage::artifact_key(modelpress::db::DEFAULT_TENANT, uuid::Uuid::new_v4(), 2, "report.json");
    store.put_file(&orphan, &staged).await.unwrap();
    assert_eq!(moto.keys("retention").await.len(), 2);

    // moto's objects cannot be backdated, so the grace period is zero here.
    let swept = retention::sweep(&pool, store.as_ref(), &retention(0, 0, 0))
        .await
        .unwrap()
        .unwrap();

    assert_eq!(swept.orphans_deleted, 1);
    assert_eq!(
        moto.keys("retention").await,
        vec![storage::model_key(
            modelpress::db::DEFAULT_TENANT,
            model.parse().unwrap()
        )]
    );
}

#[sqlx::test]
async fn only_one_process_sweeps_at_a_time(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool.clone()).await;
    let store = service::storage(&app.config).unwrap();
    let mut other = pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(retention::LOCK_KEY)
        .execute(&mut *other)
        .await
        .unwrap();
    assert_eq!(
        retention::sweep(&pool, store.as_ref(), &retention(1, 1, 3600))
            .await
            .unwrap(),
        None,
        "another sweeper holds the lock"
    );
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(retention::LOCK_KEY)
        .execute(&mut *other)
        .await
        .unwrap();
    assert!(
        retention::sweep(&pool, store.as_ref(), &retention(1, 1, 3600))
            .await
            .unwrap()
            .is_some()
    );
}

#[sqlx::test]
async fn the_service_sweeps_on_its_own_interval(pool: PgPool) {
    let app = TestApp::spawn_with(pool.clone(), true, |c| {
        c.retention.finished_jobs_days = 1;
        c.retention.sweep_interval_s = 1;
    })
    .await;
    let job = finished_job(&app, 6).await;
    let id = job["id"].as_str().unwrap().to_string();
    backdate(&pool, &job, 2).await;
    let start = std::time::Instant::now();
    while app.get(&format!("/v1/jobs/{id}")).await.status() != 404 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the sweeper never deleted the job"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    app.stop().await;
}
