//! The advisor's part of `report.html`: the decision and its reason (or the nearest miss and what
//! to relax), every candidate with its status and numbers, what pre-flight ruled out, and the
//! per-layer sensitivity the repair loop used. Rendered from the same `AdvisorReport` the JSON
//! carries, so the page never says more than the data.

use std::fmt::Write as _;

use super::html::{duration, escape, human_bytes, lower_is_better, sig};
use crate::advisor::{AdvisorReport, CandidateStatus};

/// The size × metric scatter's data: the original and every measured candidate on the goal's
/// metric, and the index of the chosen one.
pub struct Scatter {
    pub metric: String,
    pub lower_is_better: bool,
    pub points: Vec<(String, u64, f64)>,
    pub chosen: Option<usize>,
}

pub fn scatter_points(a: &AdvisorReport, original_size: u64) -> Scatter {
    let name = a
        .candidates
        .iter()
        .find_map(|c| c.metric.as_ref().map(|m| m.name.clone()))
        .unwrap_or_else(|| "cosine".into());
    let original_value = a
        .candidates
        .iter()
        .find_map(|c| c.metric.as_ref().map(|m| m.original))
        .unwrap_or(1.0);
    let mut points = vec![("original".to_string(), original_size, original_value)];
    let mut chosen = None;
    for c in &a.candidates {
        if let (Some(size), Some(m)) = (c.size_bytes, &c.metric) {
            if a.decision.as_ref().is_some_and(|d| d.candidate == c.id) {
                chosen = Some(points.len());
            }
            points.push((format!("#{} {}", c.id, c.label), size, m.value));
        }
    }
    Scatter {
        lower_is_better: lower_is_better(&name),
        metric: name,
        points,
        chosen,
    }
}

pub fn section(out: &mut String, a: &AdvisorReport, original_size: u64) {
    out.push_str("<section class=\"advisor\" id=\"advisor\">\n<h2>Advisor</h2>\n");
    let _ = writeln!(
        out,
        "<p class=\"goal\">Goal: <strong>{}</strong>{}; {} candidate(s) measured in {} s{}{}.</p>",
        escape(&format!("{:?}", a.goal.objective).to_lowercase()),
        constraints_text(a),
        a.candidates.len(),
        sig(a.elapsed_s, 3),
        if a.stopped_by_budget {
            format!(
                ", stopped by the {} s budget ({} not tried)",
                a.goal.time_budget_s,
                a.not_tried.len()
            )
        } else {
            String::new()
        },
        if a.skipped.is_empty() {
            String::new()
        } else {
            format!(
                "; {} skipped as at least as lossy as a candidate that missed the accuracy budget ({})",
                a.skipped.len(),
                escape(
                    &a.skipped
                        .iter()
                        .map(|s| s.candidate.as_str())
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            )
        }
    );
    match (&a.decision, &a.nearest_miss) {
        (Some(d), _) => {
            let _ = writeln!(
                out,
                "<div class=\"tile decision\"><h3>Decision</h3><p><strong>{}</strong></p><p>{}</p></div>",
                escape(&d.label),
                escape(&d.reason)
            );
        }
        (None, Some(m)) => {
            let _ = write!(
                out,
                "<div class=\"tile decision miss\"><h3>No candidate met the goal</h3>\
                 <p>Nearest miss: <strong>{}</strong>. To accept it:</p><ul>",
                escape(&m.label)
            );
            for advice in &m.advice {
                let _ = write!(out, "<li>{}</li>", escape(advice));
            }
            out.push_str("</ul></div>\n");
        }
        (None, None) => {}
    }

    out.push_str(
        "<h3>Candidates</h3>\n<table class=\"candidates\">\n<tr><th>#</th><th class=\"text\">candidate</th>\
         <th>status</th><th>size</th><th>p50</th><th>speed-up</th><th>metric</th><th>drop</th>\
         <th class=\"text\">why not</th></tr>\n",
    );
    for c in &a.candidates {
        let chosen = a.decision.as_ref().is_some_and(|d| d.candidate == c.id);
        let status = match c.status {
            CandidateStatus::Feasible if chosen => "chosen",
            CandidateStatus::Feasible => "feasible",
            CandidateStatus::Infeasible => "infeasible",
            CandidateStatus::Failed => "failed",
        };
        let size = c.size_bytes.map_or("–".to_string(), |s| {
            format!(
                "{} ({}x)",
                human_bytes(s),
                sig(original_size as f64 / s.max(1) as f64, 3)
            )
        });
        let _ = writeln!(
            out,
            "<tr class=\"{status}\" data-candidate=\"{}\" data-size=\"{}\"><td>{}</td><td class=\"text\">{}{}</td><td>{status}</td>\
             <td>{size}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"notes\">{}</td></tr>",
            c.id,
            c.size_bytes.unwrap_or(0),
            c.id,
            escape(&c.label),
            if a.pareto_front.contains(&c.id) {
                " <span class=\"muted\">(Pareto)</span>"
            } else {
                ""
            },
            c.latency.as_ref().map_or("–".into(), |l| duration(l.p50_ms)),
            c.speedup.map_or("–".into(), |s| format!("{}x", sig(s, 3))),
            c.metric
                .as_ref()
                .map_or("–".into(), |m| format!("{} {}", escape(&m.name), sig(m.value, 4))),
            c.metric.as_ref().map_or("–".into(), |m| sig(m.drop, 3)),
            escape(&c.reasons.join("; "))
        );
    }
    out.push_str("</table>\n");

    if !a.preflight.ruled_out.is_empty() {
        out.push_str("<h3>Ruled out before measuring</h3>\n<ul class=\"ruled-out\">\n");
        for r in &a.preflight.ruled_out {
            let _ = writeln!(
                out,
                "<li><strong>{}</strong>: {}</li>",
                escape(&r.candidate),
                escape(&r.reason)
            );
        }
        out.push_str("</ul>\n");
    }

    for c in a.candidates.iter().filter(|c| c.sensitivity.is_some()) {
        let _ = write!(
            out,
            "<h3>Layer sensitivity of #{} {}</h3>\n<table class=\"sensitivity\">\n<tr><th class=\"text\">node</th>\
             <th class=\"text\">op</th><th>relative error at output</th><th>own contribution</th></tr>\n",
            c.id,
            escape(&c.label)
        );
        for l in c.sensitivity.iter().flatten() {
            let _ = writeln!(
                out,
                "<tr><td class=\"text\"><code>{}</code></td><td class=\"text\">{}</td><td>{}</td><td>{}</td></tr>",
                escape(&l.node),
                escape(&l.op_type),
                sig(l.output_error, 3),
                sig(l.contribution, 3)
            );
        }
        out.push_str("</table>\n");
    }
    out.push_str("</section>\n");
}

fn constraints_text(a: &AdvisorReport) -> String {
    let c = &a.goal.constraints;
    let mut parts = Vec::new();
    if let Some(d) = &c.max_accuracy_drop {
        let metric = d.metric.clone().unwrap_or_default();
        match (d.absolute, d.relative) {
            (Some(x), _) => parts.push(format!("{metric} drop ≤ {x}")),
            (_, Some(r)) => parts.push(format!("{metric} drop ≤ {}%", sig(100.0 * r, 3))),
            _ => {}
        }
    }
    if let Some(s) = c.max_size_bytes {
        parts.push(format!("size ≤ {}", human_bytes(s)));
    }
    if let Some(l) = &c.max_latency_ms {
        parts.push(format!("p{} ≤ {} ms", l.percentile, l.value));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" with {}", escape(&parts.join(", ")))
    }
}
