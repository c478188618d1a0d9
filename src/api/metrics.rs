//! `GET /metrics` in Prometheus text format: HTTP requests by route template and status (with a
//! latency histogram), and the queue and storage as the database sees them (jobs by state, queue
//! depth, age of the oldest runnable job, rescued leases, stored bytes). Routes are labelled by
//! their template (`/v1/jobs/{id}`), never by the raw path, so label cardinality stays bounded.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, State};
use axum::http::{Request, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::ApiResult;

const BUCKETS: [f64; 11] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

#[derive(Default)]
struct Series {
    count: u64,
    sum: f64,
    buckets: [u64; BUCKETS.len()],
}

/// Request counters of this API process.
#[derive(Default)]
pub struct HttpMetrics {
    series: Mutex<BTreeMap<(String, String, u16), Series>>,
}

impl HttpMetrics {
    fn observe(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let mut series = self.series.lock().expect("metrics lock");
        let s = series
            .entry((method.to_string(), route.to_string(), status))
            .or_default();
        s.count += 1;
        s.sum += seconds;
        for (i, b) in BUCKETS.iter().enumerate() {
            if seconds <= *b {
                s.buckets[i] += 1;
            }
        }
    }
}

impl HttpMetrics {
    /// The HTTP series in Prometheus text format.
    fn render(&self) -> String {
        let mut out = String::new();
        let w = &mut out;
        let _ = writeln!(
            w,
            "# HELP modelpress_http_requests_total HTTP requests by method, route template and status."
        );
        let _ = writeln!(w, "# TYPE modelpress_http_requests_total counter");
        let series = self.series.lock().expect("metrics lock");
        for ((m, r, s), v) in series.iter() {
            let _ = writeln!(
                w,
                "modelpress_http_requests_total{{method=\"{m}\",route=\"{r}\",status=\"{s}\"}} {}",
                v.count
            );
        }
        let _ = writeln!(
            w,
            "# HELP modelpress_http_request_duration_seconds HTTP request latency."
        );
        let _ = writeln!(w, "# TYPE modelpress_http_request_duration_seconds histogram");
        for ((m, r, s), v) in series.iter() {
            let labels = format!("method=\"{m}\",route=\"{r}\",status=\"{s}\"");
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    w,
                    "modelpress_http_request_duration_seconds_bucket{{{labels},le=\"{b}\"}} {}",
                    v.buckets[i]
                );
            }
            let _ = writeln!(
                w,
                "modelpress_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                v.count
            );
            let _ = writeln!(w, "modelpress_http_request_duration_seconds_sum{{{labels}}} {}", v.sum);
            let _ = writeln!(
                w,
                "modelpress_http_request_duration_seconds_count{{{labels}}} {}",
                v.count
            );
        }

        out
    }
}

/// Middleware: times every request and records it under its route template.
pub async fn track(State(state): State<AppState>, req: Request<Body>, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let response = next.run(req).await;
    state.http_metrics.observe(
        &method,
        &route,
        response.status().as_u16(),
        start.elapsed().as_secs_f64(),
    );
    response
}

pub async fn metrics(State(state): State<AppState>) -> ApiResult<Response> {
    let mut out = state.http_metrics.render();
    let w = &mut out;
    // The queue and storage, from the database every worker and API process shares.
    let states: Vec<(String, i64)> = sqlx::query_as("SELECT state, count(*) FROM jobs GROUP BY state ORDER BY state")
        .fetch_all(&state.pool)
        .await?;
    let _ = writeln!(w, "# HELP modelpress_jobs Jobs by state.");
    let _ = writeln!(w, "# TYPE modelpress_jobs gauge");
    for st in crate::queue::JobState::ALL {
        let n = states.iter().find(|(s, _)| s == st.as_str()).map_or(0, |(_, n)| *n);
        let _ = writeln!(w, "modelpress_jobs{{state=\"{}\"}} {n}", st.as_str());
    }
    let (depth, oldest): (i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*), EXTRACT(EPOCH FROM now() - min(scheduled_at))::float8
         FROM jobs WHERE state = 'queued' AND scheduled_at <= now()",
    )
    .fetch_one(&state.pool)
    .await?;
    let _ = writeln!(
        w,
        "# HELP modelpress_queue_depth Jobs runnable now, waiting for a worker."
    );
    let _ = writeln!(w, "# TYPE modelpress_queue_depth gauge");
    let _ = writeln!(w, "modelpress_queue_depth {depth}");
    let _ = writeln!(
        w,
        "# HELP modelpress_queue_oldest_age_seconds Age of the oldest runnable job."
    );
    let _ = writeln!(w, "# TYPE modelpress_queue_oldest_age_seconds gauge");
    let _ = writeln!(w, "modelpress_queue_oldest_age_seconds {}", oldest.unwrap_or(0.0));
    let (rescued,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM jobs, jsonb_array_elements(attempt_errors) e WHERE e->>'code' = 'lease_expired'",
    )
    .fetch_one(&state.pool)
    .await?;
    let _ = writeln!(
        w,
        "# HELP modelpress_rescued_leases_total Attempts whose lease expired and were swept."
    );
    let _ = writeln!(w, "# TYPE modelpress_rescued_leases_total counter");
    let _ = writeln!(w, "modelpress_rescued_leases_total {rescued}");
    let durations: Vec<(String, f64, i64)> = sqlx::query_as(
        "SELECT recipe->0->>'pass', avg(EXTRACT(EPOCH FROM finished_at - started_at))::float8, count(*)
         FROM jobs WHERE state = 'succeeded' AND started_at IS NOT NULL GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&state.pool)
    .await?;
    let _ = writeln!(
        w,
        "# HELP modelpress_job_duration_seconds_avg Mean wall time of succeeded jobs by first pass."
    );
    let _ = writeln!(w, "# TYPE modelpress_job_duration_seconds_avg gauge");
    for (pass, avg, n) in &durations {
        let _ = writeln!(
            w,
            "modelpress_job_duration_seconds_avg{{pass=\"{pass}\",jobs=\"{n}\"}} {avg}"
        );
    }
    let (models, datasets, artifacts): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT COALESCE(sum(size_bytes), 0) FROM models)::int8,
                (SELECT COALESCE(sum(size_bytes), 0) FROM datasets)::int8,
                (SELECT COALESCE(sum(size_bytes), 0) FROM artifacts)::int8",
    )
    .fetch_one(&state.pool)
    .await?;
    let _ = writeln!(w, "# HELP modelpress_storage_bytes Bytes stored, by kind.");
    let _ = writeln!(w, "# TYPE modelpress_storage_bytes gauge");
    let _ = writeln!(w, "modelpress_storage_bytes{{kind=\"models\"}} {models}");
    let _ = writeln!(w, "modelpress_storage_bytes{{kind=\"datasets\"}} {datasets}");
    let _ = writeln!(w, "modelpress_storage_bytes{{kind=\"artifacts\"}} {artifacts}");
    inference(w, &state.inference);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}

/// The inference sessions this API process holds in its worker processes.
fn inference(w: &mut String, pool: &crate::infer::InferencePool) {
    use std::sync::atomic::Ordering::Relaxed;
    let (sessions, bytes) = pool.loaded();
    let stats = &pool.stats;
    for (name, kind, help, value) in [
        (
            "modelpress_inference_sessions",
            "gauge",
            "Inference sessions loaded.",
            sessions as u64,
        ),
        (
            "modelpress_inference_session_bytes",
            "gauge",
            "Memory the loaded inference sessions took to load.",
            bytes,
        ),
        (
            "modelpress_inference_evictions_total",
            "counter",
            "Inference sessions unloaded to stay within the memory budget.",
            stats.evictions.load(Relaxed),
        ),
        (
            "modelpress_inference_timeouts_total",
            "counter",
            "Inference requests cut off at the time limit.",
            stats.timeouts.load(Relaxed),
        ),
        (
            "modelpress_inference_worker_restarts_total",
            "counter",
            "Inference worker processes replaced after dying or being killed.",
            stats.restarts.load(Relaxed),
        ),
    ] {
        let _ = writeln!(w, "# HELP {name} {help}");
        let _ = writeln!(w, "# TYPE {name} {kind}");
        let _ = writeln!(w, "{name} {value}");
    }
}
