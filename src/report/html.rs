//! A report as one self-contained HTML page: inline CSS, hand-written inline SVG charts, no scripts,
//! fonts, images or links to anything outside the page, readable on screen and on paper.
//!
//! Every plotted SVG element carries `data-*` attributes with the exact numbers it shows (Rust's
//! shortest round-trip formatting), so a test or a script can check a chart against `report.json`.
//! All text taken from the report is HTML-escaped.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use serde_json::Value;

use super::{Report, TaskMetrics};
use crate::eval::latency::Latency;
use crate::eval::metrics::{Classification, Regression};

/// `write!` into a `String`, which cannot fail.
macro_rules! w {
    ($out:expr, $($arg:tt)*) => {{
        let _ = write!($out, $($arg)*);
    }};
}

/// Confusion matrices with more classes than this are shown as a table of the changed cells.
const HEATMAP_MAX_CLASSES: usize = 40;
/// Rows of the changed-cells table for large confusion matrices.
const CHANGED_CELLS_MAX_ROWS: usize = 100;

const STYLE: &str = r#"
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --soft: #f6f8fa; --good: #1a7f37; --bad: #cf222e;
        --orig: #8c959f; --res: #0969da; --front: #bf8700; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--fg); background: #fff; max-width: 1000px; margin: 0 auto; padding: 24px;
       -webkit-print-color-adjust: exact; print-color-adjust: exact; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 8px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 14px; margin: 14px 0 6px; }
.sub { color: var(--muted); margin: 0 0 16px; }
.muted { color: var(--muted); }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
.meta { display: grid; grid-template-columns: repeat(auto-fit, minmax(280px, 1fr)); gap: 12px; }
.meta section { border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px; }
.meta h3 { margin-top: 0; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; margin: 0; }
dt { color: var(--muted); }
dd { margin: 0; overflow-wrap: anywhere; }
ol.recipe { margin: 0; padding-left: 20px; }
ol.recipe li { margin-bottom: 4px; }
.summary { display: grid; grid-template-columns: repeat(auto-fit, minmax(260px, 1fr)); gap: 12px; margin-top: 16px; }
.tile { border: 1px solid var(--line); border-radius: 6px; padding: 12px 14px; background: var(--soft); }
.tile h3 { margin: 0 0 6px; color: var(--muted); font-weight: 600; text-transform: uppercase; font-size: 12px;
           letter-spacing: .04em; }
.tile .big { font-size: 19px; font-weight: 600; }
.tile p { margin: 4px 0 0; }
.good { color: var(--good); }
.bad { color: var(--bad); }
.flat { color: var(--muted); }
table { border-collapse: collapse; width: 100%; margin: 6px 0 10px; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 8px; text-align: right; vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
th:first-child, td:first-child, td.text, th.text { text-align: left; }
td.notes { text-align: left; }
td.notes ul { margin: 0; padding-left: 18px; }
.warnings { border: 2px solid var(--bad); border-radius: 6px; padding: 10px 14px; margin-top: 16px;
            background: #fff5f5; }
.warnings h2 { border: 0; margin: 0 0 6px; color: var(--bad); }
.warnings ul { margin: 0; padding-left: 20px; }
.nowarn { color: var(--muted); margin-top: 16px; }
figure { margin: 8px 0 16px; }
figcaption { color: var(--muted); font-size: 12.5px; margin-top: 4px; }
svg { max-width: 100%; height: auto; display: block; }
svg text { font-family: inherit; font-size: 11px; fill: var(--fg); }
svg .axis { stroke: var(--fg); stroke-width: 1; }
svg .grid { stroke: var(--line); stroke-width: 1; }
svg .tick-label { fill: var(--muted); }
svg .axis-title { font-size: 12px; font-weight: 600; }
svg .pareto { fill: none; stroke: var(--front); stroke-width: 2; stroke-dasharray: 5 3; }
svg circle.point { fill: var(--orig); stroke: #fff; stroke-width: 1; }
svg circle.point.original { fill: var(--orig); }
svg circle.point.chosen { fill: var(--res); stroke: var(--fg); stroke-width: 2; }
svg circle.halo { fill: none; stroke: var(--res); stroke-width: 1.5; }
svg rect.bar.original { fill: var(--orig); }
svg rect.bar.result { fill: var(--res); }
svg rect.cell { stroke: var(--line); stroke-width: 1; }
svg text.cell-value { text-anchor: middle; dominant-baseline: central; }
.legend { display: flex; gap: 16px; flex-wrap: wrap; color: var(--muted); font-size: 12.5px; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 4px;
          vertical-align: middle; }
@media print {
  body { max-width: none; padding: 0; font-size: 11px; background: #fff; color: #000; }
  h2 { break-after: avoid; }
  section, figure, table, .tile, .warnings { break-inside: avoid; }
  .tile, th { background: #fff; }
  .warnings { background: #fff; }
  svg { max-width: 100%; height: auto; }
}
"#;

/// Renders the report as one self-contained HTML page.
pub fn render(report: &Report) -> String {
    let mut out = String::with_capacity(64 * 1024);
    let title = match report.job_id {
        Some(id) => format!("ModelPress report: job {id}"),
        None => "ModelPress report: offline run".to_string(),
    };
    w!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n",
        escape(&title)
    );
    header(&mut out, report);
    summary(&mut out, report);
    warnings(&mut out, &report.warnings);
    if let Some(a) = report.advisor.as_deref() {
        super::advisor_html::section(&mut out, a, report.original.size_bytes);
    }
    charts(&mut out, report);
    task_metrics(&mut out, report);
    fidelity(&mut out, report);
    passes(&mut out, report);
    w!(
        out,
        "<p class=\"muted\">Report schema version {}. Generated by ModelPress.</p>\n</body>\n</html>\n",
        report.schema_version
    );
    out
}

// ---------------------------------------------------------------------------------------------
// Sections
// ---------------------------------------------------------------------------------------------

fn header(out: &mut String, report: &Report) {
    let job = match report.job_id {
        Some(id) => format!("job <code>{id}</code>"),
        None => "offline run".to_string(),
    };
    w!(
        out,
        "<header>\n<h1>Compression report</h1>\n<p class=\"sub\">{job} · created {}</p>\n<div class=\"meta\">\n",
        escape(&report.created_at.format("%Y-%m-%d %H:%M:%S UTC").to_string())
    );

    out.push_str("<section class=\"recipe\"><h3>Recipe</h3>\n");
    if report.recipe.0.is_empty() {
        out.push_str("<p class=\"muted\">No passes.</p>\n");
    } else {
        out.push_str("<ol class=\"recipe\">\n");
        for spec in &report.recipe.0 {
            let value = serde_json::to_value(spec).unwrap_or(Value::Null);
            let (name, params) = match &value {
                Value::Object(map) => {
                    let name = map.get("pass").map(json_inline).unwrap_or_else(|| "?".into());
                    let params: Vec<String> = map
                        .iter()
                        .filter(|(k, _)| k.as_str() != "pass")
                        .map(|(k, v)| format!("{}: {}", escape(k), escape(&json_inline(v))))
                        .collect();
                    (name, params)
                }
                other => (json_inline(other), Vec::new()),
            };
            w!(out, "<li><strong><code>{}</code></strong>", escape(&name));
            if !params.is_empty() {
                w!(out, "<br><span class=\"mono muted\">{}</span>", params.join(", "));
            }
            out.push_str("</li>\n");
        }
        out.push_str("</ol>\n");
    }
    out.push_str("</section>\n");

    let env = &report.environment;
    out.push_str("<section class=\"environment\"><h3>Environment</h3>\n<dl>\n");
    dl_row(out, "ONNX Runtime", &escape(&env.onnxruntime_version));
    dl_row(out, "Provider", &escape(&env.execution_provider));
    dl_row(out, "CPU", &escape(&env.cpu_model));
    dl_row(out, "Threads", &env.intra_op_threads.to_string());
    dl_row(
        out,
        "Peak memory",
        &format!(
            "{} ({} B)",
            human_bytes(env.peak_memory_bytes),
            group(env.peak_memory_bytes)
        ),
    );
    dl_row(
        out,
        "Timing",
        &format!("{} warm-up + {} timed runs", env.warmup_runs, env.timed_runs),
    );
    dl_row(out, "Seed", &env.seed.to_string());
    out.push_str("</dl>\n</section>\n");

    let ev = &report.evaluation;
    let task = serde_json::to_value(ev.task)
        .ok()
        .as_ref()
        .map(json_inline)
        .unwrap_or_default();
    let source = match ev.inputs.as_str() {
        "dataset" => "dataset".to_string(),
        "synthetic" => "synthetic (seeded random inputs)".to_string(),
        other => other.to_string(),
    };
    out.push_str("<section class=\"evaluation\"><h3>Evaluation</h3>\n<dl>\n");
    dl_row(out, "Inputs", &escape(&source));
    dl_row(
        out,
        "Task",
        &format!(
            "{}{}",
            escape(&task),
            if ev.fidelity_only {
                " (fidelity only: no labels)"
            } else {
                ""
            }
        ),
    );
    dl_row(
        out,
        "Samples",
        &format!(
            "{} evaluated of {}",
            group(ev.evaluation_samples),
            group(ev.dataset_samples)
        ),
    );
    dl_row(
        out,
        "Calibration",
        &format!("{} samples", group(ev.calibration_samples)),
    );
    if let Some(key) = &ev.label_key {
        dl_row(out, "Labels", &format!("<code>{}</code>", escape(key)));
    }
    for input in &report.inputs {
        let shape: Vec<String> = input.shape.iter().map(|d| d.to_string()).collect();
        dl_row(
            out,
            "Input",
            &format!(
                "<code>{}</code> {} [{}]",
                escape(&input.name),
                escape(&input.dtype),
                shape.join(", ")
            ),
        );
    }
    out.push_str("</dl>\n</section>\n</div>\n</header>\n");
}

fn summary(out: &mut String, report: &Report) {
    let (o, r) = (&report.original, &report.result);
    out.push_str("<section class=\"summary\" id=\"summary\">\n");

    // Size.
    w!(
        out,
        "<div class=\"tile size\"><h3>Size</h3>\
         <div class=\"big\">{} → {}</div>\
         <p>{} B → {} B {}</p>\
         <p>zstd: {} → {} {}</p>\
         <p class=\"muted\">{} → {} parameters; sparsity {} → {}</p></div>\n",
        human_bytes(o.size_bytes),
        human_bytes(r.size_bytes),
        group(o.size_bytes),
        group(r.size_bytes),
        percent_change(o.size_bytes as f64, r.size_bytes as f64, false),
        human_bytes(o.compressed_size_bytes),
        human_bytes(r.compressed_size_bytes),
        percent_change(o.compressed_size_bytes as f64, r.compressed_size_bytes as f64, false),
        group(o.parameters),
        group(r.parameters),
        pct(o.sparsity),
        pct(r.sparsity),
    );

    // Latency.
    let (a, b) = (o.latency.p50_ms, r.latency.p50_ms);
    let ratio = if a > 0.0 && b.is_finite() {
        let x = b / a;
        let word = if x < 1.0 {
            "faster"
        } else if x > 1.0 {
            "slower"
        } else {
            "unchanged"
        };
        let class = if x < 1.0 {
            "good"
        } else if x > 1.0 {
            "bad"
        } else {
            "flat"
        };
        format!("<span class=\"{class}\">×{} ({word})</span>", sig(x, 3))
    } else {
        "<span class=\"flat\">ratio n/a</span>".to_string()
    };
    w!(
        out,
        "<div class=\"tile latency\"><h3>Latency p50 (batch 1)</h3>\
         <div class=\"big\">{} → {}</div><p>{ratio}</p>",
        duration(a),
        duration(b)
    );
    if let (Some(ob), Some(rb)) = (&o.latency_batched, &r.latency_batched) {
        w!(
            out,
            "<p>batch {}: {} → {} samples/s {}</p>",
            ob.batch_size,
            group(ob.throughput_per_s.round() as u64),
            group(rb.throughput_per_s.round() as u64),
            percent_change(ob.throughput_per_s, rb.throughput_per_s, true)
        );
    }
    out.push_str("</div>\n");

    // Headline metric, or fidelity.
    if let Some(c) = &report.comparison {
        let lower = lower_is_better(&c.metric);
        w!(
            out,
            "<div class=\"tile metric\"><h3>{}</h3>\
             <div class=\"big\">{} → {}</div>\
             <p>Δ {} (95% CI [{}, {}])</p>\
             <p class=\"muted\">original 95% CI [{}, {}]; result [{}, {}]</p>",
            escape(&c.metric),
            metric(c.original),
            metric(c.result),
            delta_span(c.delta, lower),
            signed(c.delta_ci95[0]),
            signed(c.delta_ci95[1]),
            metric(c.original_ci95[0]),
            metric(c.original_ci95[1]),
            metric(c.result_ci95[0]),
            metric(c.result_ci95[1]),
        );
        let others: Vec<String> = c
            .deltas
            .iter()
            .filter(|(k, _)| **k != c.metric)
            .map(|(k, v)| format!("{} {}", escape(k), delta_span(*v, lower_is_better(k))))
            .collect();
        if !others.is_empty() {
            w!(out, "<p>{}</p>", others.join("; "));
        }
        out.push_str("</div>\n");
    } else {
        let f = &r.fidelity;
        w!(
            out,
            "<div class=\"tile metric\"><h3>Fidelity vs original</h3>\
             <div class=\"big\">cosine {}</div><p>SNR {}</p><p>top-1 agreement {}</p>",
            cosine(f.cosine_similarity),
            snr(f.snr_db),
            f.top1_agreement.map(pct).unwrap_or_else(|| "n/a".into())
        );
        out.push_str("<p class=\"muted\">No labels: no task metric to compare.</p></div>\n");
    }
    out.push_str("</section>\n");
}

fn warnings(out: &mut String, warnings: &[String]) {
    if warnings.is_empty() {
        out.push_str("<p class=\"nowarn\" id=\"warnings\">No warnings.</p>\n");
        return;
    }
    w!(
        out,
        "<section class=\"warnings\" id=\"warnings\" role=\"alert\"><h2>⚠ {} warning{}</h2>\n<ul>\n",
        warnings.len(),
        if warnings.len() == 1 { "" } else { "s" }
    );
    for warning in warnings {
        w!(out, "<li>{}</li>\n", escape(warning));
    }
    out.push_str("</ul>\n</section>\n");
}

fn charts(out: &mut String, report: &Report) {
    let (name, lower, o, r) = headline(report);
    out.push_str("<h2>Size × quality</h2>\n<figure>\n");
    match report.advisor.as_deref() {
        // Every candidate the advisor measured, on the goal's metric.
        Some(a) => {
            let sc = super::advisor_html::scatter_points(a, report.original.size_bytes);
            let points: Vec<(&str, u64, f64)> = sc.points.iter().map(|(l, s, m)| (l.as_str(), *s, *m)).collect();
            out.push_str(&scatter_svg(&points, &sc.metric, sc.lower_is_better, sc.chosen));
        }
        None => {
            let points = [
                ("original", report.original.size_bytes, o),
                ("result", report.result.size_bytes, r),
            ];
            out.push_str(&scatter_svg(&points, &name, lower, Some(1)));
        }
    }
    w!(
        out,
        "<figcaption><div class=\"legend\">\
         <span><span class=\"swatch\" style=\"background:#8c959f\"></span>candidate</span>\
         <span><span class=\"swatch\" style=\"background:#0969da\"></span>chosen (result)</span>\
         <span><span class=\"swatch\" style=\"background:#bf8700\"></span>Pareto front</span></div>\
         x: size on disk; y: {} ({} is better). A point is on the front when no other point is both \
         smaller and {}.</figcaption>\n</figure>\n",
        escape(&name),
        if lower { "lower" } else { "higher" },
        if lower { "lower" } else { "higher" },
    );

    out.push_str("<h2>Latency</h2>\n<figure>\n");
    out.push_str(&latency_svg(&report.original.latency, &report.result.latency));
    out.push_str(
        "<figcaption><div class=\"legend\">\
         <span><span class=\"swatch\" style=\"background:#8c959f\"></span>original</span>\
         <span><span class=\"swatch\" style=\"background:#0969da\"></span>result</span></div>",
    );
    w!(
        out,
        "Batch of one; {} timed runs (original), {} (result); nearest-rank percentiles.",
        report.original.latency.runs,
        report.result.latency.runs
    );
    out.push_str("</figcaption>\n</figure>\n");
    if let (Some(ob), Some(rb)) = (&report.original.latency_batched, &report.result.latency_batched) {
        w!(
            out,
            "<p class=\"batched\">Batch of {}: p50 {} → {}; throughput <strong>{}</strong> → \
             <strong>{}</strong> samples/s {}.</p>\n",
            ob.batch_size,
            duration(ob.latency.p50_ms),
            duration(rb.latency.p50_ms),
            group(ob.throughput_per_s.round() as u64),
            group(rb.throughput_per_s.round() as u64),
            percent_change(ob.throughput_per_s, rb.throughput_per_s, true)
        );
    } else if let Some(b) = report
        .original
        .latency_batched
        .as_ref()
        .or(report.result.latency_batched.as_ref())
    {
        w!(
            out,
            "<p class=\"batched\">Batch of {}: throughput {} samples/s (measured for one model only).</p>\n",
            b.batch_size,
            group(b.throughput_per_s.round() as u64)
        );
    }
}

/// The y axis of the scatter: the comparison's metric when there is one, else cosine similarity.
fn headline(report: &Report) -> (String, bool, f64, f64) {
    match &report.comparison {
        Some(c) => (c.metric.clone(), lower_is_better(&c.metric), c.original, c.result),
        None => (
            "cosine similarity".to_string(),
            false,
            report.original.fidelity.cosine_similarity,
            report.result.fidelity.cosine_similarity,
        ),
    }
}

fn task_metrics(out: &mut String, report: &Report) {
    match (&report.original.metrics, &report.result.metrics) {
        (Some(TaskMetrics::Classification(o)), Some(TaskMetrics::Classification(r))) => classification(out, o, r),
        (Some(TaskMetrics::Regression(o)), Some(TaskMetrics::Regression(r))) => regression(out, o, r),
        (None, None) => {}
        _ => out.push_str("<p class=\"muted\">Task metrics are missing or differ in kind between the models.</p>\n"),
    }
}

fn classification(out: &mut String, o: &Classification, r: &Classification) {
    out.push_str("<h2>Classification</h2>\n<table class=\"overall\">\n<tr><th>metric</th><th>original</th><th>result</th><th>Δ</th></tr>\n");
    let rows: [(&str, Option<f64>, Option<f64>); 8] = [
        ("accuracy", Some(o.accuracy), Some(r.accuracy)),
        ("top-5 accuracy", o.top5_accuracy, r.top5_accuracy),
        ("precision (macro)", Some(o.precision_macro), Some(r.precision_macro)),
        ("recall (macro)", Some(o.recall_macro), Some(r.recall_macro)),
        ("F1 (macro)", Some(o.f1_macro), Some(r.f1_macro)),
        ("precision (micro)", Some(o.precision_micro), Some(r.precision_micro)),
        ("recall (micro)", Some(o.recall_micro), Some(r.recall_micro)),
        ("F1 (micro)", Some(o.f1_micro), Some(r.f1_micro)),
    ];
    for (name, a, b) in rows {
        before_after_row(out, name, a, b, false);
    }
    w!(
        out,
        "<tr><td>samples (NaN scores)</td><td>{} ({})</td><td>{} ({})</td><td></td></tr>\n</table>\n",
        group(o.samples),
        group(o.nan_samples),
        group(r.samples),
        group(r.nan_samples)
    );

    // Per class.
    out.push_str(
        "<h3>Per class</h3>\n<table class=\"per-class\">\n\
         <tr><th>class</th><th>support</th>\
         <th>precision</th><th>→</th><th>Δ</th>\
         <th>recall</th><th>→</th><th>Δ</th>\
         <th>F1</th><th>→</th><th>Δ</th></tr>\n",
    );
    let classes: BTreeSet<i64> = o.per_class.iter().chain(&r.per_class).map(|c| c.class).collect();
    for class in classes {
        let a = o.per_class.iter().find(|c| c.class == class);
        let b = r.per_class.iter().find(|c| c.class == class);
        let support = a.or(b).map(|c| c.support).unwrap_or(0);
        w!(
            out,
            "<tr data-class=\"{class}\"><td>{class}</td><td>{}</td>",
            group(support)
        );
        for pick in [
            (|c: &crate::eval::metrics::ClassMetrics| c.precision) as fn(&crate::eval::metrics::ClassMetrics) -> f64,
            |c| c.recall,
            |c| c.f1,
        ] {
            let (x, y) = (a.map(pick), b.map(pick));
            w!(out, "<td>{}</td><td>{}</td>", opt(x, metric), opt(y, metric));
            match (x, y) {
                (Some(x), Some(y)) => w!(out, "<td>{}</td>", delta_span(y - x, false)),
                _ => out.push_str("<td></td>"),
            }
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table>\n");

    confusion_delta(out, &o.confusion, &r.confusion);
}

fn confusion_delta(out: &mut String, o: &[Vec<u64>], r: &[Vec<u64>]) {
    let n = o
        .len()
        .max(r.len())
        .max(o.iter().chain(r).map(Vec::len).max().unwrap_or(0));
    if n == 0 {
        return;
    }
    let cell = |m: &[Vec<u64>], i: usize, j: usize| m.get(i).and_then(|row| row.get(j)).copied().unwrap_or(0) as i64;
    let deltas: Vec<Vec<i64>> = (0..n)
        .map(|i| (0..n).map(|j| cell(r, i, j) - cell(o, i, j)).collect())
        .collect();
    let changed = deltas.iter().flatten().filter(|d| **d != 0).count();
    out.push_str("<h3>Confusion matrix: result − original</h3>\n");
    if changed == 0 {
        out.push_str("<p class=\"muted\">No sample changed its predicted class.</p>\n");
    }
    if n <= HEATMAP_MAX_CLASSES {
        out.push_str("<figure>\n");
        out.push_str(&heatmap_svg(&deltas));
        out.push_str(
            "<figcaption>Rows: true class; columns: predicted class. Each cell is the change in sample \
             count. <span class=\"good\">Blue</span>: better (more correct on the diagonal, fewer \
             errors off it); <span class=\"bad\">red</span>: worse.</figcaption>\n</figure>\n",
        );
        return;
    }
    // Too many classes for a readable grid: the changed cells, largest change first.
    let mut cells: Vec<(usize, usize, i64)> = deltas
        .iter()
        .enumerate()
        .flat_map(|(i, row)| row.iter().enumerate().map(move |(j, d)| (i, j, *d)))
        .filter(|c| c.2 != 0)
        .collect();
    cells.sort_by_key(|c| (std::cmp::Reverse(c.2.unsigned_abs()), c.0, c.1));
    if changed > 0 {
        w!(
            out,
            "<p class=\"muted\">{n} classes: showing the {} changed cell(s) with the largest change, of {changed}.</p>\n",
            changed.min(CHANGED_CELLS_MAX_ROWS)
        );
        out.push_str(
            "<table class=\"confusion-changes\">\n<tr><th>true</th><th>predicted</th><th>Δ samples</th></tr>\n",
        );
        for (i, j, d) in cells.into_iter().take(CHANGED_CELLS_MAX_ROWS) {
            let better = if i == j { d > 0 } else { d < 0 };
            w!(
                out,
                "<tr class=\"cell\" data-true=\"{i}\" data-pred=\"{j}\" data-delta=\"{d}\"><td>{i}</td><td>{j}</td>\
                 <td class=\"{}\">{}</td></tr>\n",
                if better { "good" } else { "bad" },
                signed_int(d)
            );
        }
        out.push_str("</table>\n");
    }
}

fn regression(out: &mut String, o: &Regression, r: &Regression) {
    out.push_str(
        "<h2>Regression</h2>\n<table class=\"regression\">\n\
         <tr><th>metric</th><th>original</th><th>result</th><th>Δ</th></tr>\n",
    );
    before_after_row(out, "MAE", Some(o.mae), Some(r.mae), true);
    before_after_row(out, "RMSE", Some(o.rmse), Some(r.rmse), true);
    before_after_row(out, "R²", o.r2, r.r2, false);
    w!(
        out,
        "<tr><td>samples</td><td>{}</td><td>{}</td><td></td></tr>\n</table>\n",
        group(o.samples),
        group(r.samples)
    );
    if o.r2.is_none() || r.r2.is_none() {
        out.push_str("<p class=\"muted\">R² is n/a when the targets have no variance.</p>\n");
    }
}

fn fidelity(out: &mut String, report: &Report) {
    let f = &report.result.fidelity;
    out.push_str("<h2>Output fidelity</h2>\n");
    w!(
        out,
        "<p>Result against the original on the same inputs. Worst output: max abs error {}, \
         cosine {}, SNR {}; top-1 agreement {}.",
        sci(f.max_abs_error),
        cosine(f.cosine_similarity),
        snr(f.snr_db),
        f.top1_agreement.map(pct).unwrap_or_else(|| "n/a".into())
    );
    if f.non_finite_values > 0 {
        w!(
            out,
            " <strong class=\"bad\">{} non-finite value(s)</strong> where the original's were finite.",
            group(f.non_finite_values)
        );
    }
    out.push_str("</p>\n");
    out.push_str(
        "<table class=\"fidelity\">\n<tr><th>output</th><th>max abs error</th><th>mean abs error</th>\
         <th>cosine</th><th>SNR</th></tr>\n",
    );
    for output in &f.outputs {
        w!(
            out,
            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            escape(&output.name),
            sci(output.max_abs_error),
            sci(output.mean_abs_error),
            cosine(output.cosine_similarity),
            snr(output.snr_db)
        );
    }
    out.push_str("</table>\n");
    let n = &report.original.fidelity;
    w!(
        out,
        "<p class=\"muted\">Noise floor (the original run twice): max abs error {}, cosine {}, SNR {}.</p>\n",
        sci(n.max_abs_error),
        cosine(n.cosine_similarity),
        snr(n.snr_db)
    );
}

fn passes(out: &mut String, report: &Report) {
    out.push_str("<h2>Passes</h2>\n");
    if report.passes.is_empty() {
        out.push_str("<p class=\"muted\">No passes ran.</p>\n");
        return;
    }
    out.push_str("<table class=\"passes\">\n<tr><th>pass</th><th>duration</th><th class=\"text\">notes</th></tr>\n");
    for p in &report.passes {
        w!(
            out,
            "<tr><td><code>{}</code></td><td>{} ms</td><td class=\"notes\">",
            escape(&p.pass),
            sig(p.duration_ms, 3)
        );
        match p.notes.as_slice() {
            [] => {}
            [one] => out.push_str(&escape(one)),
            many => {
                out.push_str("<ul>");
                for note in many {
                    w!(out, "<li>{}</li>", escape(note));
                }
                out.push_str("</ul>");
            }
        }
        out.push_str("</td></tr>\n");
    }
    out.push_str("</table>\n");
    for p in report.passes.iter().filter(|p| !p.layers.is_empty()) {
        layers(out, p);
    }
}

/// The per-weight table of a pass that keeps one; columns a pass does not fill are left out.
fn layers(out: &mut String, p: &crate::report::PassRecord) {
    let has = |f: fn(&crate::compress::LayerRecord) -> bool| p.layers.iter().any(f);
    let (sparse, rank, clusters, err) = (
        has(|l| l.sparsity.is_some()),
        has(|l| l.rank.is_some()),
        has(|l| l.clusters.is_some()),
        has(|l| l.max_abs_error.is_some()),
    );
    w!(
        out,
        "<h3><code>{}</code>: per weight</h3>\n<table class=\"layers\">\n<tr><th class=\"text\">weight</th>\
         <th class=\"text\">nodes</th><th>shape</th><th>parameters</th><th>bytes</th>",
        escape(&p.pass)
    );
    for (on, head) in [
        (sparse, "sparsity"),
        (rank, "rank (energy)"),
        (clusters, "clusters"),
        (err, "max abs error"),
    ] {
        if on {
            w!(out, "<th>{head}</th>");
        }
    }
    out.push_str("</tr>\n");
    for l in &p.layers {
        let dims: Vec<String> = l.shape.iter().map(|d| d.to_string()).collect();
        w!(
            out,
            "<tr><td class=\"text\"><code>{}</code></td><td class=\"text\">{}</td><td>{}</td><td>{} → {}</td>\
             <td>{} → {}</td>",
            escape(&l.weight),
            escape(&l.nodes.join(", ")),
            dims.join("×"),
            l.parameters_before,
            l.parameters_after,
            l.bytes_before,
            l.bytes_after
        );
        let pct = |v: Option<f64>| v.map_or(String::new(), |v| format!("{:.1}%", v * 100.0));
        if sparse {
            w!(out, "<td>{} → {}</td>", pct(l.sparsity_before), pct(l.sparsity));
        }
        if rank {
            w!(
                out,
                "<td>{} ({})</td>",
                l.rank.map_or(String::new(), |r| r.to_string()),
                pct(l.retained_energy)
            );
        }
        if clusters {
            w!(out, "<td>{}</td>", l.clusters.map_or(String::new(), |c| c.to_string()));
        }
        if err {
            w!(out, "<td>{}</td>", l.max_abs_error.map_or(String::new(), sci));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table>\n");
}

fn before_after_row(out: &mut String, name: &str, a: Option<f64>, b: Option<f64>, lower: bool) {
    let d = match (a, b) {
        (Some(a), Some(b)) => delta_span(b - a, lower),
        _ => String::new(),
    };
    w!(
        out,
        "<tr><td>{name}</td><td>{}</td><td>{}</td><td>{d}</td></tr>\n",
        opt(a, metric),
        opt(b, metric)
    );
}

fn dl_row(out: &mut String, term: &str, html: &str) {
    w!(out, "<dt>{term}</dt><dd>{html}</dd>\n");
}

// ---------------------------------------------------------------------------------------------
// Charts
// ---------------------------------------------------------------------------------------------

/// True for metrics where a smaller value is better (errors and losses).
pub fn lower_is_better(metric: &str) -> bool {
    let m = metric.to_ascii_lowercase();
    ["mae", "mse", "rmse", "loss", "error", "wer", "cer", "perplexity"]
        .iter()
        .any(|k| m == *k || m.ends_with(&format!("_{k}")) || m.starts_with(&format!("{k}_")))
}

/// Indices of the non-dominated points: no other point is at most as large and at least as good,
/// and strictly better in one of the two. Points with a non-finite metric are never on the front.
pub fn pareto_front(points: &[(&str, u64, f64)], lower_is_better: bool) -> Vec<usize> {
    let better = |a: f64, b: f64| if lower_is_better { a < b } else { a > b };
    let at_least = |a: f64, b: f64| if lower_is_better { a <= b } else { a >= b };
    let mut front: Vec<usize> = (0..points.len())
        .filter(|&i| {
            let (_, s, m) = points[i];
            m.is_finite()
                && !points
                    .iter()
                    .any(|&(_, s2, m2)| m2.is_finite() && s2 <= s && at_least(m2, m) && (s2 < s || better(m2, m)))
        })
        .collect();
    front.sort_by(|&a, &b| points[a].1.cmp(&points[b].1).then(points[a].2.total_cmp(&points[b].2)));
    front
}

/// The size × metric scatter: one circle per `(label, size in bytes, metric)` point, the Pareto
/// front as a polyline, and `chosen` (an index into `points`) highlighted.
pub fn scatter_svg(
    points: &[(&str, u64, f64)],
    metric_name: &str,
    lower_is_better: bool,
    chosen: Option<usize>,
) -> String {
    const W: f64 = 640.0;
    const H: f64 = 340.0;
    const ML: f64 = 84.0;
    const MR: f64 = 24.0;
    const MT: f64 = 16.0;
    const MB: f64 = 50.0;
    let mut out = String::new();
    w!(
        out,
        "<svg class=\"scatter\" viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\" role=\"img\" \
         aria-label=\"Size versus {} for {} model(s)\">\n",
        escape(metric_name),
        points.len()
    );
    let finite: Vec<&(&str, u64, f64)> = points.iter().filter(|p| p.2.is_finite()).collect();
    if finite.is_empty() {
        w!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">No finite values to plot.</text>\n</svg>\n",
            W / 2.0,
            H / 2.0
        );
        return out;
    }

    // x: bytes from zero; y: the metric's range, padded.
    let max_size = finite.iter().map(|p| p.1).max().unwrap_or(0) as f64;
    let x_axis = Axis::new(0.0, (max_size * 1.08).max(1.0), 6);
    let (mut lo, mut hi) = finite.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
        (lo.min(p.2), hi.max(p.2))
    });
    let span = hi - lo;
    let pad = if span > 0.0 {
        span * 0.15
    } else {
        (lo.abs() * 0.01).max(1e-3)
    };
    let (vmin, vmax) = (lo, hi);
    lo -= pad;
    hi += pad;
    let mut y_axis = Axis::new(lo, hi, 5);
    // Keep unit-interval metrics (accuracy, cosine, F1) inside [0, 1].
    if vmax <= 1.0 && y_axis.hi > 1.0 {
        y_axis.hi = 1.0;
    }
    if vmin >= 0.0 && y_axis.lo < 0.0 {
        y_axis.lo = 0.0;
    }

    let px = |x: f64| ML + (x - x_axis.lo) / (x_axis.hi - x_axis.lo) * (W - ML - MR);
    let py = |y: f64| H - MB - (y - y_axis.lo) / (y_axis.hi - y_axis.lo) * (H - MT - MB);

    // Grid and ticks.
    let (unit, scale) = byte_unit(x_axis.hi);
    let x_decimals = decimals(x_axis.step / scale);
    for t in x_axis.ticks() {
        let x = px(t);
        w!(
            out,
            "<line class=\"grid\" x1=\"{x:.1}\" y1=\"{MT}\" x2=\"{x:.1}\" y2=\"{}\"/>\
             <text class=\"tick-label x-tick\" data-value=\"{t}\" x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{:.*} {unit}</text>\n",
            H - MB,
            H - MB + 16.0,
            x_decimals,
            t / scale
        );
    }
    let y_decimals = decimals(y_axis.step);
    for t in y_axis.ticks() {
        let y = py(t);
        w!(
            out,
            "<line class=\"grid\" x1=\"{ML}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\"/>\
             <text class=\"tick-label y-tick\" data-value=\"{t}\" x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{:.*}</text>\n",
            W - MR,
            ML - 6.0,
            y + 4.0,
            y_decimals,
            t
        );
    }
    w!(
        out,
        "<line class=\"axis\" x1=\"{ML}\" y1=\"{}\" x2=\"{}\" y2=\"{}\"/>\
         <line class=\"axis\" x1=\"{ML}\" y1=\"{MT}\" x2=\"{ML}\" y2=\"{}\"/>\n\
         <text class=\"axis-title\" x=\"{}\" y=\"{}\" text-anchor=\"middle\">size on disk</text>\n\
         <text class=\"axis-title\" transform=\"translate(14 {}) rotate(-90)\" text-anchor=\"middle\">{} ({} is better)</text>\n",
        H - MB,
        W - MR,
        H - MB,
        H - MB,
        (ML + W - MR) / 2.0,
        H - 10.0,
        (MT + H - MB) / 2.0,
        escape(metric_name),
        if lower_is_better { "lower" } else { "higher" }
    );

    // The front.
    let front = pareto_front(points, lower_is_better);
    let coords: Vec<String> = front
        .iter()
        .map(|&i| format!("{:.1},{:.1}", px(points[i].1 as f64), py(points[i].2)))
        .collect();
    let labels: Vec<String> = front.iter().map(|&i| escape(points[i].0)).collect();
    w!(
        out,
        "<polyline class=\"pareto\" data-points=\"{}\" points=\"{}\"/>\n",
        labels.join(";"),
        coords.join(" ")
    );

    // Points: the chosen one last so it draws on top.
    let mut order: Vec<usize> = (0..points.len()).collect();
    if let Some(c) = chosen.filter(|&c| c < points.len()) {
        order.retain(|&i| i != c);
        order.push(c);
    }
    let show_labels = points.len() <= 12;
    for i in order {
        let (label, size, value) = points[i];
        if !value.is_finite() {
            continue;
        }
        let (x, y) = (px(size as f64), py(value));
        let is_chosen = chosen == Some(i);
        let mut class = String::from("point");
        if label == "original" {
            class.push_str(" original");
        }
        if is_chosen {
            class.push_str(" chosen");
            w!(out, "<circle class=\"halo\" cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"11\"/>\n");
        }
        w!(
            out,
            "<circle class=\"{class}\" data-label=\"{}\" data-size=\"{size}\" data-metric=\"{value}\" \
             data-pareto=\"{}\" data-chosen=\"{is_chosen}\" cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"{}\">\
             <title>{}: {} B, {} {}</title></circle>\n",
            escape(label),
            front.contains(&i),
            if is_chosen { 7 } else { 5 },
            escape(label),
            group(size),
            escape(metric_name),
            value
        );
        if show_labels || is_chosen {
            // Labels to the left of points near the right edge.
            let (dx, anchor) = if x > W - MR - 90.0 {
                (-12.0, "end")
            } else {
                (12.0, "start")
            };
            w!(
                out,
                "<text class=\"point-label\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\">{}</text>\n",
                x + dx,
                y - 8.0,
                escape(label)
            );
        }
    }
    let skipped: Vec<String> = points
        .iter()
        .filter(|p| !p.2.is_finite())
        .map(|p| escape(p.0))
        .collect();
    if !skipped.is_empty() {
        w!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" class=\"tick-label\">not plotted (non-finite): {}</text>\n",
            W - MR,
            MT + 10.0,
            skipped.join(", ")
        );
    }
    out.push_str("</svg>\n");
    out
}

/// Horizontal bars: p50/p90/p99 of the original and the result.
fn latency_svg(original: &Latency, result: &Latency) -> String {
    const W: f64 = 640.0;
    const ML: f64 = 48.0;
    const MR: f64 = 96.0;
    const MT: f64 = 8.0;
    const BAR: f64 = 16.0;
    const GROUP_GAP: f64 = 14.0;
    let rows = [
        ("p50", original.p50_ms, result.p50_ms),
        ("p90", original.p90_ms, result.p90_ms),
        ("p99", original.p99_ms, result.p99_ms),
    ];
    let plot_h = rows.len() as f64 * (2.0 * BAR + GROUP_GAP);
    let h = MT + plot_h + 32.0;
    let max = rows
        .iter()
        .flat_map(|r| [r.1, r.2])
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max);
    let axis = Axis::new(0.0, if max > 0.0 { max } else { 1.0 }, 5);
    let px = |v: f64| ML + (v.clamp(axis.lo, axis.hi) - axis.lo) / (axis.hi - axis.lo) * (W - ML - MR);
    let (unit, scale) = time_unit(axis.hi);
    let tick_decimals = decimals(axis.step / scale);

    let mut out = String::new();
    w!(
        out,
        "<svg class=\"latency\" viewBox=\"0 0 {W} {h}\" width=\"{W}\" height=\"{h}\" role=\"img\" \
         aria-label=\"Latency percentiles, original and result\">\n"
    );
    let base = MT + plot_h;
    for t in axis.ticks() {
        let x = px(t);
        w!(
            out,
            "<line class=\"grid\" x1=\"{x:.1}\" y1=\"{MT}\" x2=\"{x:.1}\" y2=\"{base}\"/>\
             <text class=\"tick-label x-tick\" data-value=\"{t}\" x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{:.*} {unit}</text>\n",
            base + 14.0,
            tick_decimals,
            t / scale
        );
    }
    for (k, (name, a, b)) in rows.iter().enumerate() {
        let top = MT + k as f64 * (2.0 * BAR + GROUP_GAP) + GROUP_GAP / 2.0;
        w!(
            out,
            "<text class=\"axis-title\" x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{name}</text>\n",
            ML - 8.0,
            top + BAR + 4.0
        );
        for (j, (model, v)) in [("original", *a), ("result", *b)].into_iter().enumerate() {
            let y = top + j as f64 * BAR;
            let width = if v.is_finite() { px(v) - ML } else { 0.0 };
            w!(
                out,
                "<rect class=\"bar {model}\" data-model=\"{model}\" data-percentile=\"{name}\" data-ms=\"{v}\" \
                 x=\"{ML}\" y=\"{y:.1}\" width=\"{width:.1}\" height=\"{}\"><title>{model} {name}: {v} ms</title></rect>\
                 <text class=\"bar-label\" x=\"{:.1}\" y=\"{:.1}\">{} {}</text>\n",
                BAR - 2.0,
                ML + width + 4.0,
                y + BAR / 2.0 + 3.0,
                model,
                duration(v)
            );
        }
    }
    w!(
        out,
        "<line class=\"axis\" x1=\"{ML}\" y1=\"{MT}\" x2=\"{ML}\" y2=\"{base}\"/>\
         <line class=\"axis\" x1=\"{ML}\" y1=\"{base}\" x2=\"{}\" y2=\"{base}\"/>\n</svg>\n",
        W - MR
    );
    out
}

/// A diverging heat map of `deltas[true][predicted]`; blue where the result is better, red where
/// it is worse, the number in every cell.
fn heatmap_svg(deltas: &[Vec<i64>]) -> String {
    let n = deltas.len();
    let cell = (480.0 / n as f64).clamp(14.0, 40.0);
    let (ml, mt) = (52.0, 44.0);
    let (w, h) = (ml + n as f64 * cell + 8.0, mt + n as f64 * cell + 8.0);
    let max_abs = deltas
        .iter()
        .flatten()
        .map(|d| d.unsigned_abs())
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let font = (cell * 0.38).clamp(8.0, 12.0);
    let mut out = String::new();
    w!(
        out,
        "<svg class=\"heatmap\" viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\" role=\"img\" \
         aria-label=\"Confusion matrix change, {n} classes\">\n\
         <text class=\"axis-title\" x=\"{:.1}\" y=\"12\" text-anchor=\"middle\">predicted class</text>\n\
         <text class=\"axis-title\" transform=\"translate(12 {:.1}) rotate(-90)\" text-anchor=\"middle\">true class</text>\n",
        ml + n as f64 * cell / 2.0,
        mt + n as f64 * cell / 2.0
    );
    for k in 0..n {
        let c = k as f64 * cell + cell / 2.0;
        w!(
            out,
            "<text class=\"tick-label\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{k}</text>\
             <text class=\"tick-label\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{k}</text>\n",
            ml + c,
            mt - 6.0,
            ml - 6.0,
            mt + c + 4.0
        );
    }
    for (i, row) in deltas.iter().enumerate() {
        for (j, &d) in row.iter().enumerate() {
            let better = if i == j { d > 0 } else { d < 0 };
            let t = d.unsigned_abs() as f64 / max_abs;
            let fill = if d == 0 {
                "#ffffff".to_string()
            } else if better {
                mix((33, 102, 172), 0.2 + 0.8 * t)
            } else {
                mix((178, 24, 43), 0.2 + 0.8 * t)
            };
            let (x, y) = (ml + j as f64 * cell, mt + i as f64 * cell);
            let text_fill = if d == 0 {
                "#b0b8c0"
            } else if t > 0.55 {
                "#ffffff"
            } else {
                "#1f2328"
            };
            w!(
                out,
                "<rect class=\"cell{}\" data-true=\"{i}\" data-pred=\"{j}\" data-delta=\"{d}\" x=\"{x:.1}\" y=\"{y:.1}\" \
                 width=\"{cell:.1}\" height=\"{cell:.1}\" fill=\"{fill}\"><title>true {i}, predicted {j}: {}</title></rect>\
                 <text class=\"cell-value\" x=\"{:.1}\" y=\"{:.1}\" style=\"fill:{text_fill};font-size:{font:.0}px\">{}</text>\n",
                if i == j { " diagonal" } else { "" },
                signed_int(d),
                x + cell / 2.0,
                y + cell / 2.0,
                if d == 0 { "0".to_string() } else { signed_int(d) }
            );
        }
    }
    out.push_str("</svg>\n");
    out
}

/// White mixed with `rgb` by `t` in 0..=1.
fn mix(rgb: (u8, u8, u8), t: f64) -> String {
    let t = t.clamp(0.0, 1.0);
    let c = |v: u8| (255.0 + (v as f64 - 255.0) * t).round() as u8;
    format!("#{:02x}{:02x}{:02x}", c(rgb.0), c(rgb.1), c(rgb.2))
}

/// A linear axis with "nice" (1, 2, 5 × 10^k) tick steps.
#[derive(Debug, Clone, Copy)]
struct Axis {
    lo: f64,
    hi: f64,
    step: f64,
}

impl Axis {
    fn new(lo: f64, hi: f64, ticks: usize) -> Self {
        let (lo, hi) = if hi > lo { (lo, hi) } else { (lo - 0.5, lo + 0.5) };
        let step = nice((hi - lo) / (ticks.max(2) - 1) as f64);
        Self {
            lo: (lo / step + 1e-9).floor() * step,
            hi: (hi / step - 1e-9).ceil() * step,
            step,
        }
    }

    fn ticks(&self) -> Vec<f64> {
        let first = (self.lo / self.step - 1e-9).ceil();
        let last = (self.hi / self.step + 1e-9).floor();
        let count = (last - first).max(0.0) as usize;
        (0..=count)
            .map(|k| {
                let v = (first + k as f64) * self.step;
                // Strip float noise (0.30000000000000004) at the step's precision.
                let d = decimals(self.step) as i32 + 2;
                let p = 10f64.powi(d);
                (v * p).round() / p
            })
            .collect()
    }
}

/// The 1, 2 or 5 × 10^k nearest `x`.
fn nice(x: f64) -> f64 {
    if !(x.is_finite() && x > 0.0) {
        return 1.0;
    }
    let exp = x.log10().floor();
    let f = x / 10f64.powf(exp);
    let nf = match f {
        f if f < 1.5 => 1.0,
        f if f < 3.0 => 2.0,
        f if f < 7.0 => 5.0,
        _ => 10.0,
    };
    nf * 10f64.powf(exp)
}

/// Decimal places that show a tick step exactly.
fn decimals(step: f64) -> usize {
    if !(step.is_finite() && step > 0.0) {
        return 0;
    }
    (-(step.log10() + 1e-9).floor()).clamp(0.0, 12.0) as usize
}

fn byte_unit(max: f64) -> (&'static str, f64) {
    match max {
        m if m >= 1e9 => ("GB", 1e9),
        m if m >= 1e6 => ("MB", 1e6),
        m if m >= 1e3 => ("kB", 1e3),
        _ => ("B", 1.0),
    }
}

/// A unit for milliseconds.
fn time_unit(max_ms: f64) -> (&'static str, f64) {
    match max_ms {
        m if m >= 1e3 => ("s", 1e3),
        m if m >= 1.0 => ("ms", 1.0),
        _ => ("µs", 1e-3),
    }
}

// ---------------------------------------------------------------------------------------------
// Text
// ---------------------------------------------------------------------------------------------

/// HTML-escapes `<>&"'`; also writes `://` as `&#58;//`, so text from a report never puts a URL
/// scheme in the page's source (it reads the same).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    if out.contains("://") {
        out = out.replace("://", "&#58;//");
    }
    out
}

/// A JSON value as short text: strings bare, arrays as `[a, b]`.
fn json_inline(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Array(items) => format!("[{}]", items.iter().map(json_inline).collect::<Vec<_>>().join(", ")),
        other => other.to_string(),
    }
}

/// `x` to `digits` significant digits (fixed notation).
pub(crate) fn sig(x: f64, digits: i32) -> String {
    if !x.is_finite() {
        return x.to_string();
    }
    if x == 0.0 {
        return "0".into();
    }
    let magnitude = x.abs().log10().floor() as i32;
    let decimals = (digits - 1 - magnitude).clamp(0, 15) as usize;
    format!("{x:.decimals$}")
}

/// A task metric: four decimals in the usual range, significant digits outside it.
fn metric(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else if x.abs() >= 0.01 && x.abs() < 1000.0 {
        format!("{x:.4}")
    } else {
        sig(x, 4)
    }
}

fn signed(x: f64) -> String {
    if x > 0.0 {
        format!("+{}", metric(x))
    } else if x < 0.0 {
        format!("−{}", metric(-x))
    } else {
        "0".into()
    }
}

fn signed_int(d: i64) -> String {
    match d {
        d if d > 0 => format!("+{d}"),
        d if d < 0 => format!("−{}", d.unsigned_abs()),
        _ => "0".into(),
    }
}

/// A signed delta coloured by whether it is an improvement.
fn delta_span(d: f64, lower_is_better: bool) -> String {
    let class = if d == 0.0 || !d.is_finite() {
        "flat"
    } else if (d > 0.0) != lower_is_better {
        "good"
    } else {
        "bad"
    };
    format!("<span class=\"delta {class}\">{}</span>", signed(d))
}

/// `(after − before) / before` as a coloured percentage.
fn percent_change(before: f64, after: f64, higher_is_better: bool) -> String {
    if !(before > 0.0 && after.is_finite()) {
        return String::new();
    }
    let p = (after - before) / before * 100.0;
    let class = if p.abs() < 0.05 {
        "flat"
    } else if (p > 0.0) == higher_is_better {
        "good"
    } else {
        "bad"
    };
    let sign = if p > 0.0 {
        "+"
    } else if p < 0.0 {
        "−"
    } else {
        ""
    };
    format!("<span class=\"{class}\">({sign}{:.1}%)</span>", p.abs())
}

fn pct(x: f64) -> String {
    format!("{:.2}%", x * 100.0)
}

fn cosine(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.6}")
    } else {
        x.to_string()
    }
}

fn snr(x: Option<f64>) -> String {
    match x {
        Some(db) => format!("{} dB", sig(db, 4)),
        None => "∞ (identical)".into(),
    }
}

fn sci(x: f64) -> String {
    if x == 0.0 { "0".into() } else { format!("{x:.3e}") }
}

fn opt(x: Option<f64>, f: fn(f64) -> String) -> String {
    x.map(f).unwrap_or_else(|| "n/a".into())
}

/// A duration in milliseconds, in the unit that reads best.
pub(crate) fn duration(ms: f64) -> String {
    if !ms.is_finite() {
        return format!("{ms} ms");
    }
    let (unit, scale) = time_unit(ms);
    format!("{} {unit}", sig(ms / scale, 3))
}

/// `10211` → `10,211`.
fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (k, c) in digits.chars().enumerate() {
        if k > 0 && (digits.len() - k).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes in decimal units (kB, MB), as on the scatter's axis.
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{} {}", sig(v, 3), UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde_json::json;

    use super::*;

    /// Modelled on the digits report (`quantize_int8_dynamic` on `tests/fixtures/digits/mlp.onnx`),
    /// with three classes and a result that changed some predictions.
    fn classification_json() -> Value {
        let latency = |p50: f64, p90: f64, p99: f64| json!({"p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "mean_ms": p50, "runs": 20});
        let fidelity = |max: f64, mean: f64, cos: f64, snr: Option<f64>| {
            json!({"max_abs_error": max, "mean_abs_error": mean, "cosine_similarity": cos, "snr_db": snr,
                   "top1_agreement": 0.9, "non_finite_values": 0,
                   "outputs": [{"name": "logits", "max_abs_error": max, "mean_abs_error": mean,
                                "cosine_similarity": cos, "snr_db": snr}]})
        };
        let class = |c: i64, p: f64, r: f64, f1: f64, s: u64| json!({"class": c, "precision": p, "recall": r, "f1": f1, "support": s});
        json!({
            "schema_version": 1,
            "job_id": "6f1c0b9e-3d55-4a43-9d1e-0b8f6f0f4c21",
            "created_at": "2026-11-29T06:24:09.329618516Z",
            "recipe": [{"pass": "quantize_int8_dynamic", "per_channel": true, "op_types": ["MatMul", "Gemm"], "exclude_nodes": []}],
            "environment": {"onnxruntime_version": "1.31.1", "execution_provider": "cpu", "cpu_model": "AMD EPYC <fast>",
                            "intra_op_threads": 1, "warmup_runs": 3, "timed_runs": 20, "inputs": "dataset", "seed": 42,
                            "batch_size": 1, "dynamic_dim_default": 32, "peak_memory_bytes": 36773888u64},
            "evaluation": {"inputs": "dataset", "task": "classification", "fidelity_only": false, "dataset_samples": 18,
                           "evaluation_samples": 18, "calibration_samples": 0, "label_key": "labels"},
            "inputs": [{"name": "input", "dtype": "float32", "shape": [1, 64]}],
            "original": {
                "size_bytes": 10211, "compressed_size_bytes": 9472, "parameters": 2410, "sparsity": 0.0,
                "latency": latency(0.001923, 0.0019420000000000001, 0.001953),
                "latency_batched": {"batch_size": 8, "latency": latency(0.002123, 0.002153, 0.002183), "throughput_per_s": 3773228.9406659747},
                "fidelity": fidelity(0.0, 0.0, 0.9999999999999998, None),
                "metrics": {"task": "classification", "samples": 18, "accuracy": 0.8333333333333334, "top5_accuracy": null,
                            "precision_macro": 0.8412698412698413, "recall_macro": 0.8333333333333334, "f1_macro": 0.8333333333333334,
                            "precision_micro": 0.8333333333333334, "recall_micro": 0.8333333333333334, "f1_micro": 0.8333333333333334,
                            "per_class": [class(0, 0.8333333333333334, 0.8333333333333334, 0.8333333333333334, 6),
                                          class(1, 0.8571428571428571, 1.0, 0.923076923076923, 6),
                                          class(2, 1.0, 0.6666666666666666, 0.8, 6)],
                            "confusion": [[5, 1, 0], [0, 6, 0], [1, 1, 4]], "nan_samples": 0}
            },
            "result": {
                "size_bytes": 4297, "compressed_size_bytes": 3385, "parameters": 2494, "sparsity": 0.0,
                "latency": latency(0.002994, 0.003015, 0.0030340000000000002),
                "latency_batched": {"batch_size": 8, "latency": latency(0.003185, 0.003205, 0.003235), "throughput_per_s": 2510000.7843752448},
                "fidelity": fidelity(0.13279342651367188, 0.03190931341645342, 0.9999871791394638, Some(45.691450315287625)),
                "metrics": {"task": "classification", "samples": 18, "accuracy": 0.7777777777777778, "top5_accuracy": null,
                            "precision_macro": 0.7936507936507936, "recall_macro": 0.7777777777777778, "f1_macro": 0.7777777777777778,
                            "precision_micro": 0.7777777777777778, "recall_micro": 0.7777777777777778, "f1_micro": 0.7777777777777778,
                            "per_class": [class(0, 0.6666666666666666, 0.6666666666666666, 0.6666666666666666, 6),
                                          class(1, 0.7142857142857143, 0.8333333333333334, 0.7692307692307693, 6),
                                          class(2, 1.0, 0.8333333333333334, 0.9090909090909091, 6)],
                            "confusion": [[4, 2, 0], [1, 5, 0], [1, 0, 5]], "nan_samples": 0}
            },
            "comparison": {"metric": "accuracy", "original": 0.8333333333333334, "result": 0.7777777777777778,
                           "delta": -0.05555555555555558, "original_ci95": [0.6666666666666666, 1.0],
                           "result_ci95": [0.5555555555555556, 0.9444444444444444], "delta_ci95": [-0.16666666666666666, 0.05555555555555555],
                           "deltas": {"accuracy": -0.05555555555555558, "f1_macro": -0.05555555555555558,
                                      "precision_macro": -0.0476190476190477, "recall_macro": -0.05555555555555558}},
            "passes": [{"pass": "quantize_int8_dynamic", "duration_ms": 0.215612,
                        "notes": ["2 node(s) quantized, 2368 weights to int8 (per output column)"]}],
            "warnings": ["label <script>alert('x')</script> & \"quoted\" see https://example.com/x"]
        })
    }

    fn report(value: Value) -> Report {
        serde_json::from_value(value).expect("report deserializes")
    }

    fn classification_report() -> Report {
        report(classification_json())
    }

    /// No labels, no comparison, no batched latency: what a synthetic-input job reports.
    fn synthetic_report() -> Report {
        let mut v = classification_json();
        v["job_id"] = Value::Null;
        v["evaluation"] = json!({"inputs": "synthetic", "task": "generic", "fidelity_only": true, "dataset_samples": 0,
                                 "evaluation_samples": 8, "calibration_samples": 0, "label_key": null});
        v["environment"]["inputs"] = json!("synthetic");
        v["comparison"] = Value::Null;
        v["warnings"] = json!([]);
        for side in ["original", "result"] {
            v[side]["metrics"] = Value::Null;
            v[side]["latency_batched"] = Value::Null;
        }
        report(v)
    }

    /// Attributes of every `<tag ...>` whose class list contains `class`.
    fn elements(html: &str, tag: &str, class: &str) -> Vec<HashMap<String, String>> {
        let open = format!("<{tag} ");
        html.match_indices(&open)
            .filter_map(|(i, _)| {
                let end = i + html[i..].find('>')?;
                let attrs = attributes(&html[i + open.len()..end]);
                attrs
                    .get("class")
                    .is_some_and(|c| c.split(' ').any(|c| c == class))
                    .then_some(attrs)
            })
            .collect()
    }

    fn attributes(mut s: &str) -> HashMap<String, String> {
        let mut out = HashMap::new();
        while let Some(eq) = s.find("=\"") {
            let name = s[..eq].trim().to_string();
            let rest = &s[eq + 2..];
            let close = rest.find('"').expect("closing quote");
            out.insert(name, rest[..close].to_string());
            s = &rest[close + 1..];
        }
        out
    }

    fn num(attrs: &HashMap<String, String>, key: &str) -> f64 {
        attrs[key]
            .parse()
            .unwrap_or_else(|_| panic!("{key}={:?} is a number", attrs[key]))
    }

    #[test]
    fn scatter_points_carry_the_reports_sizes_and_metric() {
        let r = classification_report();
        let html = render(&r);
        let points = elements(&html, "circle", "point");
        assert_eq!(points.len(), 2);
        let c = r.comparison.as_ref().unwrap();
        for (label, size, value) in [
            ("original", r.original.size_bytes, c.original),
            ("result", r.result.size_bytes, c.result),
        ] {
            let p = points.iter().find(|p| p["data-label"] == label).expect(label);
            assert_eq!(p["data-size"].parse::<u64>().unwrap(), size);
            assert_eq!(num(p, "data-metric"), value);
        }
        let chosen: Vec<_> = points.iter().filter(|p| p["class"].contains("chosen")).collect();
        assert_eq!(chosen.len(), 1);
        assert_eq!(chosen[0]["data-label"], "result");
        // Smaller but less accurate: both are on the front, drawn from small to large.
        let front = elements(&html, "polyline", "pareto");
        assert_eq!(front.len(), 1);
        assert_eq!(front[0]["data-points"], "result;original");
        assert!(html.contains("accuracy (higher is better)"));
        // Ticks frame the plotted values.
        let y_ticks: Vec<f64> = elements(&html, "text", "y-tick")
            .iter()
            .map(|t| num(t, "data-value"))
            .collect();
        assert!(y_ticks.len() >= 3);
        assert!(y_ticks.first().unwrap() <= &c.result && y_ticks.last().unwrap() >= &c.original);
        let x_ticks: Vec<f64> = elements(&html, "text", "x-tick")
            .iter()
            .map(|t| num(t, "data-value"))
            .collect();
        assert!(x_ticks.iter().any(|t| *t >= r.original.size_bytes as f64));
    }

    #[test]
    fn latency_bars_match_the_percentiles() {
        let r = classification_report();
        let html = render(&r);
        let bars = elements(&html, "rect", "bar");
        assert_eq!(bars.len(), 6);
        for (model, m) in [("original", &r.original), ("result", &r.result)] {
            for (percentile, ms) in [
                ("p50", m.latency.p50_ms),
                ("p90", m.latency.p90_ms),
                ("p99", m.latency.p99_ms),
            ] {
                let bar = bars
                    .iter()
                    .find(|b| b["data-model"] == model && b["data-percentile"] == percentile)
                    .unwrap_or_else(|| panic!("{model} {percentile}"));
                assert_eq!(num(bar, "data-ms"), ms);
            }
        }
        // Longer latencies draw longer bars.
        let width = |model: &str, p: &str| {
            bars.iter()
                .find(|b| b["data-model"] == model && b["data-percentile"] == p)
                .map(|b| num(b, "width"))
                .unwrap()
        };
        assert!(width("result", "p50") > width("original", "p50"));
        assert!(
            html.contains("3,773,229") && html.contains("2,510,001"),
            "batched throughput"
        );
    }

    #[test]
    fn confusion_cells_are_result_minus_original() {
        let r = classification_report();
        let html = render(&r);
        let (Some(TaskMetrics::Classification(o)), Some(TaskMetrics::Classification(n))) =
            (&r.original.metrics, &r.result.metrics)
        else {
            panic!("classification metrics")
        };
        let cells = elements(&html, "rect", "cell");
        assert_eq!(cells.len(), 9);
        for cell in &cells {
            let i: usize = cell["data-true"].parse().unwrap();
            let j: usize = cell["data-pred"].parse().unwrap();
            let d: i64 = cell["data-delta"].parse().unwrap();
            assert_eq!(d, n.confusion[i][j] as i64 - o.confusion[i][j] as i64, "cell {i},{j}");
        }
        // Colours: fewer correct on the diagonal is worse (red), more correct is better (blue).
        let fill = |i: &str, j: &str| {
            cells
                .iter()
                .find(|c| c["data-true"] == i && c["data-pred"] == j)
                .map(|c| c["fill"].clone())
                .unwrap()
        };
        assert_ne!(fill("0", "0"), fill("2", "2"));
        assert_eq!(fill("2", "0"), "#ffffff");
        // The per-class table has one row per class, with coloured deltas.
        assert_eq!(html.matches("<tr data-class=").count(), 3);
        assert!(html.contains("<span class=\"delta bad\">−0.1667</span>"));
        assert!(html.contains("<span class=\"delta good\">+0.1667</span>"));
    }

    #[test]
    fn large_confusion_matrices_list_the_changed_cells() {
        let n = HEATMAP_MAX_CLASSES + 1;
        let o: Vec<Vec<u64>> = (0..n)
            .map(|i| (0..n).map(|j| u64::from(i == j) * 10).collect())
            .collect();
        let mut r = o.clone();
        r[3][3] = 8;
        r[3][7] = 2;
        let mut out = String::new();
        confusion_delta(&mut out, &o, &r);
        assert!(!out.contains("<svg"));
        let rows = elements(&out, "tr", "cell");
        assert_eq!(rows.len(), 2);
        assert!(
            rows.iter()
                .any(|c| c["data-true"] == "3" && c["data-pred"] == "3" && c["data-delta"] == "-2")
        );
        assert!(
            rows.iter()
                .any(|c| c["data-true"] == "3" && c["data-pred"] == "7" && c["data-delta"] == "2")
        );
    }

    #[test]
    fn the_page_is_self_contained() {
        for r in [classification_report(), synthetic_report()] {
            let html = render(&r);
            assert!(html.starts_with("<!DOCTYPE html>"));
            assert!(!html.contains("http://") && !html.contains("https://"));
            assert!(!html.contains("<script"));
            assert!(!html.contains("<link"));
            assert!(!html.contains("url("), "no external CSS resources");
            assert!(!html.contains("@import"));
            assert!(!html.contains("<img"));
            assert!(html.contains("@media print"));
        }
    }

    #[test]
    fn report_text_is_escaped() {
        let html = render(&classification_report());
        assert!(!html.contains("<script>alert"));
        assert!(
            html.contains("label &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;quoted&quot; see https&#58;//example.com/x")
        );
        assert!(html.contains("AMD EPYC &lt;fast&gt;"));
        assert!(html.contains("1 warning</h2>"), "warnings are prominent");
        assert_eq!(escape("a<b>&\"'c"), "a&lt;b&gt;&amp;&quot;&#39;c");
    }

    #[test]
    fn a_synthetic_report_plots_cosine_similarity() {
        let r = synthetic_report();
        let html = render(&r);
        assert!(html.contains("offline run"));
        assert!(html.contains("cosine similarity (higher is better)"));
        let points = elements(&html, "circle", "point");
        assert_eq!(points.len(), 2);
        for (label, m) in [("original", &r.original), ("result", &r.result)] {
            let p = points.iter().find(|p| p["data-label"] == label).expect(label);
            assert_eq!(p["data-size"].parse::<u64>().unwrap(), m.size_bytes);
            assert_eq!(num(p, "data-metric"), m.fidelity.cosine_similarity);
        }
        assert!(!html.contains("Classification</h2>"));
        assert!(!html.contains("rect class=\"cell"));
        assert!(html.contains("No warnings."));
        assert!(html.contains("∞ (identical)"));
        assert_eq!(elements(&html, "rect", "bar").len(), 6);
    }

    #[test]
    fn regression_reports_show_errors_and_lower_is_better() {
        let mut v = classification_json();
        v["evaluation"]["task"] = json!("regression");
        v["original"]["metrics"] = json!({"task": "regression", "samples": 18, "mae": 0.5, "rmse": 0.75, "r2": 0.9});
        v["result"]["metrics"] = json!({"task": "regression", "samples": 18, "mae": 0.25, "rmse": 0.5, "r2": null});
        v["comparison"] = json!({"metric": "mae", "original": 0.5, "result": 0.25, "delta": -0.25,
                                 "original_ci95": [0.4, 0.6], "result_ci95": [0.2, 0.3], "delta_ci95": [-0.3, -0.2],
                                 "deltas": {"mae": -0.25}});
        let html = render(&report(v));
        assert!(html.contains("Regression</h2>"));
        assert!(
            html.contains("<td>MAE</td><td>0.5000</td><td>0.2500</td><td><span class=\"delta good\">−0.2500</span>")
        );
        assert!(html.contains("mae (lower is better)"));
        // Smaller and lower error: the result dominates the original.
        let front = elements(&html, "polyline", "pareto");
        assert_eq!(front[0]["data-points"], "result");
    }

    #[test]
    fn pareto_front_keeps_non_dominated_points() {
        let points = [
            ("a", 100, 0.90),
            ("b", 50, 0.85),
            ("c", 60, 0.80), // dominated by b
            ("d", 100, 0.91),
            ("e", 10, f64::NAN),
            ("f", 20, 0.70),
        ];
        let labels = |idx: Vec<usize>| idx.into_iter().map(|i| points[i].0).collect::<Vec<_>>();
        assert_eq!(labels(pareto_front(&points, false)), ["f", "b", "d"]);
        assert_eq!(labels(pareto_front(&points, true)), ["f"]);
        let svg = scatter_svg(&points, "accuracy", false, Some(3));
        assert_eq!(elements(&svg, "circle", "point").len(), 5);
        assert!(svg.contains("not plotted (non-finite): e"));
    }

    #[test]
    fn number_formatting() {
        assert_eq!(group(10211), "10,211");
        assert_eq!(group(999), "999");
        assert_eq!(group(1_000_000), "1,000,000");
        assert_eq!(human_bytes(10211), "10.2 kB");
        assert_eq!(human_bytes(36773888), "36.8 MB");
        assert_eq!(duration(0.001923), "1.92 µs");
        assert_eq!(duration(12.5), "12.5 ms");
        assert_eq!(
            Axis::new(0.0, 11028.0, 6).ticks(),
            [0.0, 2000.0, 4000.0, 6000.0, 8000.0, 10000.0, 12000.0]
        );
        assert_eq!(Axis::new(0.7, 0.9, 5).ticks(), [0.7, 0.75, 0.8, 0.85, 0.9]);
    }
}
