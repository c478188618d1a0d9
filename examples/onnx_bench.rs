//! ONNX parse + serialize benchmark: ours (`onnx::decode`, prost plus our validation, and
//! `onnx::encode`) against Python's `onnx` package (`onnx.load_model_from_string` and
//! `SerializeToString`, from `.venv`) on the largest model `scripts/fetch-models.sh` fetched.
//!
//! Each side runs in its own processes, alternating: this binary with `--child` and
//! `bench/onnx_vs_python.py`. A child reads the file once, then parses and serializes it in memory,
//! one warm-up run and [`RUNS`] timed runs, and prints its timings as JSON; the parent reads the
//! child's peak RSS from `wait4`. A start-up-only child per side gives the baseline RSS to subtract.
//! Prints a Markdown section.
//!
//! `MODELPRESS_MODELS_DIR=$(scripts/fetch-models.sh) cargo run --release --example onnx_bench`
//! (or `make bench`, which writes BENCHMARKS.md).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use modelpress::onnx::{self, ModelSummary};
use serde_json::{Value, json};

/// Timed runs per child process, after one warm-up run.
const RUNS: usize = 7;
/// Child processes per side; the medians are over all `ROUNDS * RUNS` runs.
const ROUNDS: usize = 3;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--child") => child(&args[2..]),
        _ => {
            println!("{}", driver()?);
            Ok(())
        }
    }
}

/// `--child baseline` prints `{}`; `--child run MODEL RUNS` times decode and encode.
fn child(args: &[String]) -> anyhow::Result<()> {
    if args.first().map(String::as_str) == Some("baseline") {
        println!("{}", json!({"vm_hwm_kib": vm_hwm_kib()}));
        return Ok(());
    }
    let [_, path, runs] = args else {
        bail!("usage: onnx_bench --child run MODEL RUNS")
    };
    let bytes = std::fs::read(path)?;
    let (mut parse_ms, mut serialize_ms) = (Vec::new(), Vec::new());
    let mut identical = true;
    let mut first_ms = 0.0;
    for i in 0..=runs.parse::<usize>()? {
        let t0 = Instant::now();
        let model = onnx::decode(&bytes)?;
        let t1 = Instant::now();
        let out = onnx::encode(&model);
        let t2 = Instant::now();
        identical &= out == bytes;
        drop(std::hint::black_box((model, out)));
        if i == 0 {
            first_ms = (t2 - t0).as_secs_f64() * 1e3;
        } else {
            parse_ms.push((t1 - t0).as_secs_f64() * 1e3);
            serialize_ms.push((t2 - t1).as_secs_f64() * 1e3);
        }
    }
    let summary = ModelSummary::of(&onnx::decode(&bytes)?);
    println!(
        "{}",
        json!({
            "parse_ms": parse_ms,
            "serialize_ms": serialize_ms,
            "identical": identical,
            "first_ms": first_ms,
            "nodes": summary.nodes,
            "parameters": summary.parameters,
            "vm_hwm_kib": vm_hwm_kib(),
        })
    );
    Ok(())
}

/// This process's peak RSS in KiB as the kernel counts it for its own address space (`VmHWM`).
fn vm_hwm_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A child's JSON line and its peak resident set size in bytes.
struct Measured {
    report: Value,
    max_rss: u64,
}

/// Runs `cmd` to completion and reads its peak RSS with `wait4` (per child, unlike
/// `getrusage(RUSAGE_CHILDREN)`, which keeps the maximum over all children so far). The parent must
/// stay small (it never loads the model) for the figure to be the child's alone.
fn measure(cmd: &mut Command) -> anyhow::Result<Measured> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let mut stdout = String::new();
    child.stdout.take().expect("piped").read_to_string(&mut stdout)?;
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 reaps our own child and fills `usage`. `child` is not
    // waited on afterwards (dropping a std Child neither waits nor kills).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    ensure!(pid > 0, "wait4 on {what}: {}", std::io::Error::last_os_error());
    ensure!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{what} failed (wait status {status})"
    );
    let report: Value = serde_json::from_str(stdout.trim()).with_context(|| format!("{what} printed {stdout:?}"))?;
    // The child's exec records the pre-exec address space's peak too (posix_spawn shares the parent's
    // until then), so ru_maxrss is only the child's own peak while this parent stays small: check it
    // against the child's own VmHWM.
    let (rusage_kib, own_kib) = (usage.ru_maxrss as u64, report["vm_hwm_kib"].as_u64().unwrap_or(0));
    ensure!(
        rusage_kib.abs_diff(own_kib) <= (own_kib / 10).max(4096),
        "{what}: wait4 says peak RSS {rusage_kib} KiB, the child's VmHWM {own_kib} KiB; \
         the parent's own memory is leaking into the measurement"
    );
    Ok(Measured {
        report,
        max_rss: usage.ru_maxrss as u64 * 1024, // KiB on Linux
    })
}

fn models_dir() -> PathBuf {
    match std::env::var_os("MODELPRESS_MODELS_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/models"),
    }
}

fn largest_model(dir: &Path) -> anyhow::Result<(PathBuf, u64)> {
    let mut best: Option<(PathBuf, u64)> = None;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            let len = entry.metadata()?.len();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "onnx") && best.as_ref().is_none_or(|b| len > b.1) {
                best = Some((path, len));
            }
        }
    }
    best.with_context(|| format!("no .onnx model under {}: run scripts/fetch-models.sh", dir.display()))
}

fn samples(reports: &[Value], key: &str) -> Vec<f64> {
    reports
        .iter()
        .flat_map(|r| r[key].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_f64())
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Per-side figures: medians in ms, peak RSS and peak over the start-up baseline in bytes.
struct Side {
    parse: f64,
    serialize: f64,
    total: f64,
    first: f64,
    max_rss: u64,
    over_baseline: u64,
    identical: bool,
    runs: usize,
}

fn side(baseline: &Measured, runs: &[Measured]) -> Side {
    let reports: Vec<Value> = runs.iter().map(|m| m.report.clone()).collect();
    let (parse, serialize) = (samples(&reports, "parse_ms"), samples(&reports, "serialize_ms"));
    let totals = parse.iter().zip(&serialize).map(|(p, s)| p + s).collect();
    let max_rss = runs.iter().map(|m| m.max_rss).max().unwrap_or(0);
    Side {
        runs: parse.len(),
        parse: median(parse),
        serialize: median(serialize),
        total: median(totals),
        first: median(reports.iter().filter_map(|r| r["first_ms"].as_f64()).collect()),
        max_rss,
        over_baseline: max_rss.saturating_sub(baseline.max_rss),
        identical: reports.iter().all(|r| r["identical"] == true),
    }
}

fn driver() -> anyhow::Result<String> {
    let (model, size) = largest_model(&models_dir())?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var_os("MODELPRESS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".venv/bin/python"));
    let script = root.join("bench/onnx_vs_python.py");
    let exe = std::env::current_exe()?;
    let name = model.file_name().unwrap().to_string_lossy().to_string();

    let ours_cmd = |args: &[&str]| {
        let mut c = Command::new(&exe);
        c.arg("--child").args(args);
        c
    };
    let py_cmd = |args: &[&str]| {
        let mut c = Command::new(&python);
        c.arg(&script).args(args);
        c
    };
    let model_arg = model.to_str().context("model path is not UTF-8")?;
    let runs_arg = RUNS.to_string();
    let run_args = ["run", model_arg, runs_arg.as_str()];

    let ours_base = measure(&mut ours_cmd(&["baseline"]))?;
    let py_base = measure(&mut py_cmd(&["baseline"]))?;
    let (mut ours_runs, mut py_runs) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        ours_runs.push(measure(&mut ours_cmd(&run_args))?);
        py_runs.push(measure(&mut py_cmd(&run_args))?);
    }
    let ours = side(&ours_base, &ours_runs);
    let py = side(&py_base, &py_runs);
    let info = &py_base.report;
    let version = |k: &str| info[k].as_str().unwrap_or("?").to_string();

    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let ratio = |p: f64, o: f64| {
        if o > 0.0 {
            format!("{:.2}×", p / o)
        } else {
            "n/a".into()
        }
    };
    let yes = |b: bool| if b { "yes" } else { "no" };
    let mut out = String::new();
    out.push_str("## ONNX parse + serialize\n\n");
    out.push_str(&format!(
        "`{name}` ({size} bytes, {:.1} MiB; {} nodes, {} parameters; the largest model `scripts/fetch-models.sh` \
         fetches), bytes in memory → model → bytes, file read excluded. ModelPress: `onnx::decode` (prost, plus \
         our structural validation) and `onnx::encode`, release build. Python: onnx {} (protobuf {}, {} backend) \
         `onnx.load_model_from_string` (what `onnx.load` does after reading the file) and `SerializeToString` \
         (what `onnx.save` writes), Python {}. Medians of {} runs per side ({ROUNDS} processes per side, \
         alternating, {RUNS} timed runs each after a warm-up run). The first-run row is the median of the \
         {ROUNDS} warm-up runs: in a fresh process every buffer is newly faulted in, as in a job process that \
         parses once, while later runs reuse the allocator's pages. Peak memory: each process's max RSS \
         (`wait4`); the start-up baseline is a process that only starts (ModelPress: this binary; Python: \
         `import onnx`), {:.1} MiB and {:.1} MiB. Command: `cargo run --release --example onnx_bench` \
         (`bench/onnx_vs_python.py` is the Python side).\n\n",
        mib(size),
        ours_runs[0].report["nodes"],
        ours_runs[0].report["parameters"],
        version("onnx"),
        version("protobuf"),
        version("protobuf_backend"),
        version("python"),
        ours.runs.min(py.runs),
        mib(ours_base.max_rss),
        mib(py_base.max_rss),
    ));
    out.push_str("| | ModelPress | Python `onnx` | Python ÷ ModelPress |\n|---|---:|---:|---:|\n");
    for (label, o, p) in [
        ("parse, ms", ours.parse, py.parse),
        ("serialize, ms", ours.serialize, py.serialize),
        ("parse + serialize, ms", ours.total, py.total),
        (
            "parse + serialize, first run in a fresh process, ms",
            ours.first,
            py.first,
        ),
    ] {
        out.push_str(&format!("| {label} | {o:.2} | {p:.2} | {} |\n", ratio(p, o)));
    }
    for (label, o, p) in [
        ("peak RSS, MiB", ours.max_rss, py.max_rss),
        ("peak RSS over start-up, MiB", ours.over_baseline, py.over_baseline),
    ] {
        out.push_str(&format!(
            "| {label} | {:.1} | {:.1} | {} |\n",
            mib(o),
            mib(p),
            ratio(p as f64, o as f64)
        ));
    }
    out.push_str(&format!(
        "| serialized bytes identical to the file | {} | {} | |\n",
        yes(ours.identical),
        yes(py.identical)
    ));
    Ok(out)
}
