//! Webhooks: validated targets (SSRF guard), signed deliveries on every terminal state, retries
//! with backoff recorded at GET /v1/jobs/{id}/webhooks, and deliveries that survive a restart.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use common::{TestApp, assert_error, tiny_mlp_bytes};
use modelpress::db::DEFAULT_TENANT;
use serde_json::{Value, json};
use sqlx::PgPool;

/// What a receiver got: the signature header and the body, per request.
type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A webhook receiver on 127.0.0.1 that answers 500 to its first `fail_first` requests, then 200.
async fn receiver(fail_first: usize) -> (String, Received) {
    let got: Received = Default::default();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post({
            let got = got.clone();
            move |headers: HeaderMap, body: axum::body::Bytes| async move {
                let mut got = got.lock().unwrap();
                let signature = headers
                    .get("x-modelpress-signature")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default();
                got.push((signature, body.to_vec()));
                if got.len() <= fail_first {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::OK
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, got)
}

fn allow_loopback(c: &mut modelpress::config::Config) {
    c.webhooks.allow_private_targets = true;
    c.webhooks.poll_interval_ms = 100;
    c.webhooks.retry_base_s = 1;
}

async fn wait_for_deliveries(app: &TestApp, job: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let list: Value = app.get(&format!("/v1/jobs/{job}/webhooks")).await.json().await.unwrap();
        if pred(&list) {
            return list;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "deliveries never got there: {list}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn secret(app: &TestApp) -> String {
    modelpress::db::tenants::webhook_secret(&app.pool, DEFAULT_TENANT, "unused-if-one-exists")
        .await
        .unwrap()
}

#[sqlx::test]
async fn a_finished_job_is_posted_signed_to_its_webhook(pool: PgPool) {
    let app = TestApp::spawn_with(pool, true, allow_loopback).await;
    let (url, got) = receiver(0).await;
    let model = app.upload_ok(tiny_mlp_bytes(1)).await;
    let r = app
        .submit(json!({"model_id": model, "recipe": [{"pass": "optimize"}], "webhook_url": url}))
        .await;
    assert_eq!(r.status(), 201);
    let job: Value = r.json().await.unwrap();
    assert_eq!(job["webhook_url"], url);
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(app.wait_for_job(&id).await["state"], "succeeded");
    let list = wait_for_deliveries(&app, &id, |l| l["items"][0]["state"] == "delivered").await;
    let delivery = &list["items"][0];
    assert_eq!(delivery["event"], "succeeded");
    assert_eq!(delivery["attempts"], 1);
    assert_eq!(delivery["log"][0]["status"], 200);

    let (signature, body) = got.lock().unwrap()[0].clone();
    let now = chrono::Utc::now().timestamp();
    let secret = secret(&app).await;
    assert!(
        modelpress::webhooks::verify_signature(&secret, &signature, &body, now, 300),
        "{signature}"
    );
    assert!(!modelpress::webhooks::verify_signature(
        "wrong", &signature, &body, now, 300
    ));
    // The body is the job as GET /v1/jobs/{id} shows it, finished, with its artifacts.
    let sent: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(sent["id"], id.as_str());
    assert_eq!(sent["state"], "succeeded");
    assert!(!sent["artifacts"].as_array().unwrap().is_empty());
    // Exactly one delivery per terminal state.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(got.lock().unwrap().len(), 1);
    app.stop().await;
}

#[sqlx::test]
async fn a_failing_receiver_is_retried_with_backoff_and_every_attempt_is_recorded(pool: PgPool) {
    let app = TestApp::spawn_with(pool, false, allow_loopback).await;
    let (url, got) = receiver(1).await;
    let model = app.upload_ok(tiny_mlp_bytes(1)).await;
    let job: Value = app
        .submit(json!({"model_id": model, "recipe": [{"pass": "optimize"}], "webhook_url": url}))
        .await
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    // Cancelling the queued job ends it: a terminal state like any other.
    assert_eq!(app.cancel(&id).await.status(), 200);
    let list = wait_for_deliveries(&app, &id, |l| l["items"][0]["state"] == "delivered").await;
    let d = &list["items"][0];
    assert_eq!(d["event"], "cancelled");
    assert_eq!(d["attempts"], 2);
    assert_eq!(d["log"][0]["status"], 500);
    assert!(d["log"][0]["error"].as_str().unwrap().contains("500"));
    assert_eq!(d["log"][1]["status"], 200);
    let at = |i: usize| chrono::DateTime::parse_from_rfc3339(d["log"][i]["at"].as_str().unwrap()).unwrap();
    assert!(
        (at(1) - at(0)).num_milliseconds() >= 900,
        "the retry did not back off: {d}"
    );
    let got = got.lock().unwrap();
    assert_eq!(got.len(), 2);
    // Each attempt is signed anew over the same job.
    assert_eq!(got[0].1, got[1].1);
}

#[sqlx::test]
async fn a_pending_delivery_survives_a_restart(pool: PgPool) {
    let app = TestApp::spawn_with(pool.clone(), false, allow_loopback).await;
    let (url, got) = receiver(0).await;
    let model = app.upload_ok(tiny_mlp_bytes(1)).await;
    let job: Value = app
        .submit(json!({"model_id": model, "recipe": [{"pass": "optimize"}], "webhook_url": url}))
        .await
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    app.stop().await;
    // The job ends while no process runs: its delivery waits in the table.
    sqlx::query("UPDATE jobs SET state = 'cancelled', finished_at = now() WHERE id = $1::uuid")
        .bind(&id)
        .execute(&pool)
        .await
        .unwrap();
    let (pending,): (i64,) = sqlx::query_as("SELECT count(*) FROM webhook_deliveries WHERE state = 'pending'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(pending, 1);
    assert!(got.lock().unwrap().is_empty());
    let app = TestApp::spawn_with(pool, false, allow_loopback).await;
    wait_for_deliveries(&app, &id, |l| l["items"][0]["state"] == "delivered").await;
    assert_eq!(got.lock().unwrap().len(), 1);
}

#[sqlx::test]
async fn webhook_targets_on_private_networks_are_refused_unless_allowed(pool: PgPool) {
    let app = TestApp::spawn_without_workers(pool).await;
    let model = app.upload_ok(tiny_mlp_bytes(1)).await;
    for url in [
        "http://127.0.0.1:9/hook",
        "http://localhost:9/hook",
        "http://10.0.0.1/hook",
        "http://192.168.0.10/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/hook",
        "http://[fe80::1]/hook",
        "http://0.0.0.0/hook",
        "gopher://example.com/",
        "http://user:pass@8.8.8.8/",
        "not a url",
    ] {
        let r = app
            .submit(json!({"model_id": model, "recipe": [{"pass": "optimize"}], "webhook_url": url}))
            .await;
        assert_error(r, 422, "invalid_webhook_url").await;
    }
    let (jobs,): (i64,) = sqlx::query_as("SELECT count(*) FROM jobs")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(jobs, 0);
}
