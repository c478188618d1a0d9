//! Inference benchmark: `POST /v1/jobs/{id}/infer` against calling ONNX Runtime directly in one
//! process, on the same model file with the same input, at 1 and 16 concurrent clients. Prints a
//! Markdown section on stdout. `bench/infer_bench.sh` starts the service, makes the jobs and calls
//! this; run alone it needs a running service and finished jobs:
//!
//!   infer_bench --base http://127.0.0.1:8080 --seconds 5 \
//!       --case digits <job id> <model.onnx the job produced> 1x64 [--case ...]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use modelpress::eval::Runtime;
use modelpress::eval::inputs::{InputTensor, TensorData};
use modelpress::eval::npz::{encode_npy, encode_npz};
use modelpress::eval::session::PreparedInputs;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use serde_json::Value;

const CLIENTS: [usize; 2] = [1, 16];

struct Case {
    name: String,
    job: String,
    model: String,
    shape: Vec<i64>,
}

struct Cell {
    case: String,
    path: &'static str,
    clients: usize,
    latencies_ms: Vec<f64>,
    server_ms: Vec<f64>,
    seconds: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut base = "http://127.0.0.1:8080".to_string();
    let mut seconds = 5.0;
    let mut cases = Vec::new();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--base" => {
                base = args[i + 1].clone();
                i += 2;
            }
            "--seconds" => {
                seconds = args[i + 1].parse().expect("--seconds N");
                i += 2;
            }
            "--case" => {
                let shape = args[i + 4]
                    .split('x')
                    .map(|d| d.parse().expect("shape like 1x3x48x192"))
                    .collect();
                cases.push(Case {
                    name: args[i + 1].clone(),
                    job: args[i + 2].clone(),
                    model: args[i + 3].clone(),
                    shape,
                });
                i += 5;
            }
            other => panic!("unknown argument {other}"),
        }
    }
    let duration = Duration::from_secs_f64(seconds);
    let runtime = Runtime::init("").expect("ONNX Runtime (ORT_DYLIB_PATH)");
    let tokio = tokio::runtime::Runtime::new().unwrap();
    let mut cells = Vec::new();
    for case in &cases {
        let n: i64 = case.shape.iter().product();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let values: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
        let session = runtime.session(case.model.as_ref(), 1).expect("loading the model");
        let input_name = session.inputs()[0].name().to_string();
        let input = InputTensor {
            name: input_name.clone(),
            shape: case.shape.clone(),
            data: TensorData::F32(values.clone()),
        };
        let session = Arc::new(Mutex::new(session));
        for clients in CLIENTS {
            eprintln!("infer_bench: {} direct ORT, {clients} clients", case.name);
            cells.push(direct(case, &session, &input, clients, duration));
        }
        let json = serde_json::json!({"inputs": {input_name.clone(): nested(&values, &case.shape)}}).to_string();
        let shape: Vec<u64> = case.shape.iter().map(|&d| d as u64).collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let npz = encode_npz(&[(&format!("{input_name}.npy"), encode_npy("<f4", &shape, &bytes))]).unwrap();
        for (path, body, ctype) in [
            ("endpoint, JSON", json.into_bytes(), "application/json"),
            ("endpoint, .npz", npz, "application/octet-stream"),
        ] {
            for clients in CLIENTS {
                eprintln!("infer_bench: {} {path}, {clients} clients", case.name);
                let url = format!("{base}/v1/jobs/{}/infer", case.job);
                cells.push(tokio.block_on(endpoint(case, path, url, body.clone(), ctype, clients, duration)));
            }
        }
    }
    report(&cells, seconds);
}

fn nested(values: &[f32], shape: &[i64]) -> Value {
    match shape.split_first() {
        None => Value::from(values[0]),
        Some((&n, rest)) => {
            let step = values.len() / n.max(1) as usize;
            Value::Array(
                (0..n as usize)
                    .map(|i| nested(&values[i * step..(i + 1) * step], rest))
                    .collect(),
            )
        }
    }
}

/// `clients` threads calling one shared session (as the service's worker shares one), each with
/// its inputs built once: ONNX Runtime's own cost.
fn direct(
    case: &Case,
    session: &Arc<Mutex<ort::session::Session>>,
    input: &InputTensor,
    clients: usize,
    duration: Duration,
) -> Cell {
    let warm = PreparedInputs::new(std::slice::from_ref(input)).unwrap();
    for _ in 0..20 {
        warm.run(&mut session.lock().unwrap()).unwrap();
    }
    let start = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (session, input) = (session.clone(), input.clone());
            std::thread::spawn(move || {
                let prepared = PreparedInputs::new(&[input]).unwrap();
                let mut lat = Vec::new();
                while start.elapsed() < duration {
                    let t = Instant::now();
                    prepared.run(&mut session.lock().unwrap()).unwrap();
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                lat
            })
        })
        .collect();
    let latencies_ms = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    Cell {
        case: case.name.clone(),
        path: "direct ORT (in process)",
        clients,
        latencies_ms,
        server_ms: Vec::new(),
        seconds: start.elapsed().as_secs_f64(),
    }
}

async fn endpoint(
    case: &Case,
    path: &'static str,
    url: String,
    body: Vec<u8>,
    ctype: &'static str,
    clients: usize,
    duration: Duration,
) -> Cell {
    let client = reqwest::Client::new();
    for _ in 0..20 {
        send(client.clone(), url.clone(), body.clone(), ctype).await;
    }
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                while start.elapsed() < duration {
                    out.push(send(client.clone(), url.clone(), body.clone(), ctype).await);
                }
                out
            })
        })
        .collect();
    let mut latencies_ms = Vec::new();
    let mut server_ms = Vec::new();
    for t in tasks {
        for (l, s) in t.await.unwrap() {
            latencies_ms.push(l);
            server_ms.push(s);
        }
    }
    Cell {
        case: case.name.clone(),
        path,
        clients,
        latencies_ms,
        server_ms,
        seconds: start.elapsed().as_secs_f64(),
    }
}

fn report(cells: &[Cell], seconds: f64) {
    println!("## Inference endpoint");
    println!();
    println!(
        "`bench/infer_bench.sh` ({seconds} s per cell, after 20 warm-up calls): `POST /v1/jobs/{{id}}/infer` on a \
         release `modelpress serve` (inference defaults: 2 worker processes, 1 intra-op thread per session) \
         against ONNX Runtime called directly in the benchmark's own process on the same model file (the job's \
         `model.onnx`) and the same random input, one session shared by all clients as the service shares one. \
         Client, server, workers and PostgreSQL share this machine's {} cores. \"X-Inference-Ms\" is the \
         server's own figure for the worker round trip (IPC + run).",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!("| Model | Path | Clients | req/s | p50 ms | p99 ms | X-Inference-Ms p50 | Requests |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    let mut p50s = std::collections::HashMap::new();
    for c in cells {
        let mut l = c.latencies_ms.clone();
        l.sort_by(f64::total_cmp);
        let mut s: Vec<f64> = c.server_ms.iter().copied().filter(|v| v.is_finite()).collect();
        s.sort_by(f64::total_cmp);
        let p50 = percentile(&l, 0.5);
        p50s.insert((c.case.clone(), c.path, c.clients), p50);
        println!(
            "| {} | {} | {} | {:.0} | {:.3} | {:.3} | {} | {} |",
            c.case,
            c.path,
            c.clients,
            l.len() as f64 / c.seconds,
            p50,
            percentile(&l, 0.99),
            if s.is_empty() {
                "–".into()
            } else {
                format!("{:.3}", percentile(&s, 0.5))
            },
            l.len()
        );
    }
    println!();
    println!("Service overhead at p50 (endpoint p50 minus direct ORT p50), 1 client:");
    println!();
    println!("| Model | Path | Overhead ms | Target (< 1 ms for small models) |");
    println!("|---|---|---:|---|");
    for c in cells
        .iter()
        .filter(|c| c.clients == 1 && c.path.starts_with("endpoint"))
    {
        let direct = p50s[&(c.case.clone(), "direct ORT (in process)", 1)];
        let overhead = p50s[&(c.case.clone(), c.path, 1)] - direct;
        println!(
            "| {} | {} | {overhead:.3} | {} |",
            c.case,
            c.path,
            if overhead < 1.0 { "met" } else { "not met" }
        );
    }
    println!();
}

/// One request: (latency ms as the client saw it, the server's X-Inference-Ms).
async fn send(client: reqwest::Client, url: String, body: Vec<u8>, ctype: &'static str) -> (f64, f64) {
    let t = Instant::now();
    let r = client
        .post(&url)
        .header("content-type", ctype)
        .header("accept", ctype)
        .body(body)
        .send()
        .await
        .expect("request");
    let status = r.status();
    let server: Option<f64> = r
        .headers()
        .get("x-inference-ms")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let text = r.bytes().await.expect("body");
    assert!(
        status.is_success(),
        "{url}: {status} {}",
        String::from_utf8_lossy(&text)
    );
    (t.elapsed().as_secs_f64() * 1000.0, server.unwrap_or(f64::NAN))
}
