//! Tenants and API keys: every /v1 route needs a key, and a tenant never sees another's data.
//! The cross-tenant test walks `modelpress::api::route_table()`, so a new route without a
//! cross-tenant check here fails it.

mod common;

use std::time::Duration;

use common::{TestApp, api_key, assert_error, bearer_client, tiny_mlp_bytes};
use modelpress::onnx::{builder, external};
use serde_json::{Value, json};
use sqlx::PgPool;

fn digits(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/fixtures/digits/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// A route template with its parameters filled in.
fn fill(template: &str, id: &str, name: &str) -> String {
    template
        .replace("{id}", id)
        .replace("{name}", name)
        .replace("{path}", name)
}

async fn send(client: &reqwest::Client, method: &reqwest::Method, url: &str) -> reqwest::Response {
    let mut request = client.request(method.clone(), url);
    if *method == reqwest::Method::POST {
        request = request.json(&json!({}));
    }
    request.send().await.unwrap()
}

#[sqlx::test]
async fn every_v1_route_needs_a_valid_key_and_the_open_routes_stay_open(pool: PgPool) {
    let app = TestApp::spawn_as(pool, false, "acme", |_| {}).await;
    let revoked = modelpress::api::auth::issue_key(&app.pool, "acme").await.unwrap();
    assert!(
        modelpress::db::tenants::revoke_key(&app.pool, revoked.id)
            .await
            .unwrap()
    );
    let real = api_key(&app.pool, "acme").await;
    // Change the secret's last character to a different one (a fixed replacement would be the
    // real key again whenever the key happens to end in it).
    let last = if real.ends_with('0') { '1' } else { '0' };
    let mangled = format!("{}{last}", &real[..real.len() - 1]);
    assert_ne!(mangled, real);
    let clients = [
        ("no key", reqwest::Client::new()),
        ("not a key", bearer_client("letmein")),
        ("a revoked key", bearer_client(&revoked.key)),
        ("a key with a wrong secret", bearer_client(&mangled)),
    ];
    let id = uuid::Uuid::new_v4().to_string();
    let mut checked = 0;
    for (method, template) in modelpress::api::route_table() {
        let url = app.url(&fill(&template, &id, "model.onnx"));
        if !template.starts_with("/v1/") {
            let r = reqwest::Client::new()
                .request(method.clone(), &url)
                .send()
                .await
                .unwrap();
            assert_ne!(r.status(), 401, "{method} {template} should stay open");
            continue;
        }
        for (what, client) in &clients {
            let r = send(client, &method, &url).await;
            let message = assert_error(r, 401, "unauthorized").await;
            assert!(!message.contains(&real), "{method} {template} with {what} echoed a key");
        }
        checked += 1;
    }
    assert!(checked >= 18, "only {checked} /v1 routes checked");
    // Unknown /v1 paths do not reveal what exists either.
    assert_error(
        app.client_for("x")
            .await
            .get(app.url("/v1/nothing"))
            .send()
            .await
            .unwrap(),
        404,
        "not_found",
    )
    .await;
    assert_error(
        reqwest::Client::new().get(app.url("/v1/nothing")).send().await.unwrap(),
        401,
        "unauthorized",
    )
    .await;
    // The valid key works, and `WWW-Authenticate` tells a client without one what to send.
    assert_eq!(app.get("/v1/models").await.status(), 200);
    let r = reqwest::Client::new().get(app.url("/v1/models")).send().await.unwrap();
    assert!(r.headers()["www-authenticate"].to_str().unwrap().starts_with("Bearer"));
}

/// Tenant A's resources: a finished job (with artifacts and a report) on a bundle model with an
/// external-data file, and a dataset.
struct Owned {
    model: String,
    file: String,
    dataset: String,
    job: String,
}

async fn tenant_a_resources(app: &TestApp) -> Owned {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.onnx");
    external::save(&builder::tiny_mlp(3), &path, Some(64)).unwrap();
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(std::fs::read(&path).unwrap()).file_name("m.onnx"),
        )
        .part(
            "data",
            reqwest::multipart::Part::bytes(std::fs::read(dir.path().join("m.onnx.data")).unwrap())
                .file_name("m.onnx.data"),
        );
    let r = app
        .client
        .post(app.url("/v1/models"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let bundle: Value = r.json().await.unwrap();
    let file = bundle["files"][0]["path"].as_str().unwrap().to_string();

    let model = app.upload_ok(digits("mlp.onnx")).await;
    let r = app
        .client
        .post(app.url("/v1/datasets"))
        .header("content-type", "application/octet-stream")
        .body(digits("test.npz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let dataset = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let job = app
        .submit(
            json!({"model_id": model, "dataset_id": dataset, "task": "classification",
                       "recipe": [{"pass": "optimize"}]}),
        )
        .await;
    assert_eq!(job.status(), 201);
    let job = job.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let done = app.wait_for_job(&job).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    Owned {
        model: bundle["id"].as_str().unwrap().to_string(),
        file,
        dataset,
        job,
    }
}

/// The status, code and message of an answer, with `id` written as `<id>` so an answer about
/// A's id and one about a missing id compare equal when they say the same thing.
async fn answer(r: reqwest::Response, id: &str) -> (u16, String, String) {
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    let code = body["error"]["code"].as_str().unwrap_or("").to_string();
    let message = body["error"]["message"].as_str().unwrap_or("").replace(id, "<id>");
    (status, code, message)
}

#[sqlx::test]
async fn another_tenants_ids_answer_exactly_like_missing_ids_on_every_route(pool: PgPool) {
    let app = TestApp::spawn_as(pool, true, "tenant-a", |_| {}).await;
    let a = tenant_a_resources(&app).await;
    let b = app.client_for("tenant-b").await;
    let missing = uuid::Uuid::new_v4().to_string();
    let mut unchecked = Vec::new();
    for (method, template) in modelpress::api::route_table() {
        let route = format!("{method} {template}");
        // The id of A's resource this route addresses, and the name part (artifact, file) if any.
        let target = match route.as_str() {
            "GET /v1/models/{id}" | "DELETE /v1/models/{id}" | "GET /v1/models/{id}/content" => {
                Some((a.model.clone(), String::new()))
            }
            "GET /v1/models/{id}/files/{path}" => Some((a.model.clone(), a.file.clone())),
            "GET /v1/datasets/{id}" | "DELETE /v1/datasets/{id}" => Some((a.dataset.clone(), String::new())),
            "GET /v1/jobs/{id}"
            | "POST /v1/jobs/{id}/cancel"
            | "GET /v1/jobs/{id}/events"
            | "GET /v1/jobs/{id}/report"
            | "GET /v1/jobs/{id}/report.html"
            | "GET /v1/jobs/{id}/webhooks"
            | "POST /v1/jobs/{id}/infer" => Some((a.job.clone(), String::new())),
            "GET /v1/jobs/{id}/artifacts/{name}" => Some((a.job.clone(), "model.onnx".to_string())),
            // Routes without an id: checked below.
            "GET /v1/models"
            | "GET /v1/datasets"
            | "GET /v1/jobs"
            | "POST /v1/jobs"
            | "POST /v1/models"
            | "POST /v1/datasets"
            | "GET /v1/capabilities" => None,
            _ if !template.starts_with("/v1/") => None,
            _ => {
                unchecked.push(route.clone());
                None
            }
        };
        let Some((id, name)) = target else { continue };
        let theirs = send(&b, &method, &app.url(&fill(&template, &id, &name))).await;
        let theirs = answer(theirs, &id).await;
        let absent = send(&b, &method, &app.url(&fill(&template, &missing, &name))).await;
        let absent = answer(absent, &missing).await;
        assert_eq!(theirs.0, 404, "{route} with another tenant's id: {theirs:?}");
        assert_eq!(theirs.1, "not_found", "{route}: {theirs:?}");
        assert_eq!(
            theirs, absent,
            "{route}: another tenant's id must look like a missing one"
        );
    }
    assert!(
        unchecked.is_empty(),
        "routes without a cross-tenant check: {unchecked:?}"
    );

    // Listings: B sees none of A's rows; A still sees them.
    for list in ["/v1/models", "/v1/datasets", "/v1/jobs"] {
        let theirs: Value = b.get(app.url(list)).send().await.unwrap().json().await.unwrap();
        assert_eq!(theirs["items"], json!([]), "{list} as B");
        let mine: Value = app.get(list).await.json().await.unwrap();
        assert!(!mine["items"].as_array().unwrap().is_empty(), "{list} as A");
    }
    // B cannot submit a job on A's model, nor evaluate on A's dataset.
    let r = b
        .post(app.url("/v1/jobs"))
        .json(&json!({"model_id": a.model, "recipe": [{"pass": "optimize"}]}))
        .send()
        .await
        .unwrap();
    assert_error(r, 404, "not_found").await;
    let r = b
        .post(app.url("/v1/models"))
        .header("content-type", "application/octet-stream")
        .body(digits("mlp.onnx"))
        .send()
        .await
        .unwrap();
    let own_model = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let r = b
        .post(app.url("/v1/jobs"))
        .json(
            &json!({"model_id": own_model, "dataset_id": a.dataset, "task": "classification",
                      "recipe": [{"pass": "optimize"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_error(r, 404, "not_found").await;
    // ... and B's upload is invisible to A.
    assert_error(app.get(&format!("/v1/models/{own_model}")).await, 404, "not_found").await;

    // B's deletes and cancel changed nothing of A's.
    assert_eq!(app.get(&format!("/v1/models/{}", a.model)).await.status(), 200);
    assert_eq!(app.get(&format!("/v1/datasets/{}", a.dataset)).await.status(), 200);
    assert_error(app.cancel(&a.job).await, 409, "job_finished").await;
    assert_eq!(
        app.get(&format!("/v1/jobs/{}/artifacts/model.onnx", a.job))
            .await
            .status(),
        200
    );
    app.stop().await;
}

#[sqlx::test]
async fn keys_are_rate_limited_per_key_whatever_x_forwarded_for_says(pool: PgPool) {
    let app = TestApp::spawn_as(pool, false, "acme", |c| {
        c.limits.requests_per_second = 0.5;
        c.limits.burst = 3;
    })
    .await;
    for n in 0..3 {
        let r = app
            .client
            .get(app.url("/v1/models"))
            .header("x-forwarded-for", format!("10.0.0.{n}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = app
        .client
        .get(app.url("/v1/models"))
        .header("x-forwarded-for", "10.9.9.9")
        .send()
        .await
        .unwrap();
    let retry_after: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    assert_error(r, 429, "rate_limited").await;
    // Another key of the same tenant has its own bucket; open routes are not limited.
    let other = app.client_for("acme").await;
    assert_eq!(other.get(app.url("/v1/models")).send().await.unwrap().status(), 200);
    assert_eq!(app.get("/healthz").await.status(), 200);
    // After Retry-After, the first key works again.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    assert_eq!(app.get("/v1/models").await.status(), 200);
}

#[sqlx::test]
async fn tenants_are_capped_on_active_jobs_and_stored_bytes(pool: PgPool) {
    let model = tiny_mlp_bytes(1);
    let cap = model.len() as u64 + 100;
    let app = TestApp::spawn_as(pool, false, "acme", |c| {
        c.limits.max_active_jobs_per_tenant = 1;
        c.limits.max_stored_bytes_per_tenant = cap;
    })
    .await;
    let model_id = app.upload_ok(model.clone()).await;
    // A second model would pass the byte quota: refused, and nothing of it is kept.
    let files_before = app.stored_files();
    assert_error(app.upload(tiny_mlp_bytes(2)).await, 429, "quota_exceeded").await;
    assert_eq!(app.stored_files(), files_before);
    let (models,): (i64,) = sqlx::query_as("SELECT count(*) FROM models")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(models, 1);
    // One active job is allowed, the second is refused until the first ends.
    let job = app.submit_ok(&model_id, json!([{"pass": "optimize"}])).await;
    let r = app
        .submit(json!({"model_id": model_id, "recipe": [{"pass": "optimize"}]}))
        .await;
    assert_error(r, 429, "quota_exceeded").await;
    assert_eq!(app.cancel(job["id"].as_str().unwrap()).await.status(), 200);
    app.submit_ok(&model_id, json!([{"pass": "optimize"}])).await;
    // Quotas are per tenant: another tenant still has room.
    let other = app.client_for("other").await;
    let r = other
        .post(app.url("/v1/models"))
        .header("content-type", "application/octet-stream")
        .body(model)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
}

#[sqlx::test]
async fn the_keys_cli_creates_lists_and_revokes_keys(pool: PgPool) {
    let app = TestApp::spawn_with(pool, false, |c| c.auth.mode = modelpress::config::AuthMode::ApiKey).await;
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_modelpress"))
            .args(args)
            .env("DATABASE_URL", common::database_url(&app.pool))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    let (stdout, stderr) = cli(&["keys", "create", "--tenant", "acme"]);
    let key = stdout.trim().to_string();
    assert!(key.starts_with("mpk_"), "{stdout}");
    let webhook_secret = stderr
        .lines()
        .find_map(|l| l.strip_prefix("webhook signing secret of this tenant: "))
        .unwrap_or_else(|| panic!("no webhook secret in {stderr}"))
        .to_string();
    assert_eq!(
        cli(&["keys", "webhook-secret", "--tenant", "acme"]).0.trim(),
        webhook_secret
    );
    let client = bearer_client(&key);
    assert_eq!(client.get(app.url("/v1/models")).send().await.unwrap().status(), 200);

    // Only a hash is stored: the key's secret appears nowhere in the table.
    let secret = key.rsplit('_').next().unwrap();
    let (hits,): (i64,) = sqlx::query_as("SELECT count(*) FROM api_keys WHERE encode(secret_hash, 'hex') LIKE '%' || $1 || '%' OR secret_hash = convert_to($1, 'UTF8')")
        .bind(secret)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(hits, 0);

    let (list, _) = cli(&["keys", "list"]);
    let id = list
        .lines()
        .find(|l| l.contains("acme"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    assert!(!list.contains(secret));
    cli(&["keys", "revoke", &id]);
    assert_error(
        client.get(app.url("/v1/models")).send().await.unwrap(),
        401,
        "unauthorized",
    )
    .await;
    let (list, _) = cli(&["keys", "list"]);
    assert!(
        list.lines().any(|l| l.starts_with(&id) && !l.trim_end().ends_with('-')),
        "{list}"
    );
}
