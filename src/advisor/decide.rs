//! The decision over measured candidates: feasibility against each constraint, ranking by the
//! objective (robust to latency noise: candidates within a few percent are tied and the smaller
//! wins), the Pareto front, and when nothing fits, the nearest miss with what to relax.

use super::goal::{Goal, Objective};
use super::{CandidateRecord, CandidateStatus, Decision, NearestMiss};
use crate::eval::latency::Latency;

/// Latencies within this factor of each other count as equal when ranking by speed.
const LATENCY_TIE: f64 = 1.03;

pub struct Outcome {
    pub decision: Option<Decision>,
    pub alternatives: Vec<usize>,
    pub pareto_front: Vec<usize>,
    pub nearest_miss: Option<NearestMiss>,
}

pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn percentile(l: &Latency, p: u32) -> f64 {
    match p {
        90 => l.p90_ms,
        95 => l.p95_ms,
        99 => l.p99_ms,
        _ => l.p50_ms,
    }
}

/// The allowed drop in the metric's units.
fn allowed_drop(goal: &Goal, original: f64) -> Option<f64> {
    let d = goal.constraints.max_accuracy_drop.as_ref()?;
    d.absolute.or(d.relative.map(|r| r * original.abs()))
}

/// Whether the candidate's metric drops by more than the goal allows.
pub fn misses_accuracy(goal: &Goal, c: &CandidateRecord) -> bool {
    c.metric
        .as_ref()
        .is_some_and(|m| allowed_drop(goal, m.original).is_some_and(|allowed| m.drop > allowed + 1e-12))
}

/// Every constraint the candidate misses, in words with the numbers; empty when feasible. A
/// record without a metric is not judged on accuracy (used to ask "is accuracy all it misses?").
pub fn violations(goal: &Goal, c: &CandidateRecord) -> Vec<String> {
    let mut out = Vec::new();
    if misses_accuracy(goal, c)
        && let Some(m) = &c.metric
        && let Some(allowed) = allowed_drop(goal, m.original)
    {
        out.push(format!(
            "{} drops by {:.4} ({:.4} -> {:.4}); the goal allows {:.4}",
            m.name, m.drop, m.original, m.value, allowed
        ));
    }
    if let (Some(max), Some(size)) = (goal.constraints.max_size_bytes, c.size_bytes)
        && size > max
    {
        out.push(format!("{size} bytes is over max_size_bytes {max}"));
    }
    if let (Some(limit), Some(lat)) = (&goal.constraints.max_latency_ms, &c.latency) {
        let v = percentile(lat, limit.percentile);
        if v > limit.value {
            out.push(format!(
                "p{} latency {v:.3} ms is over max_latency_ms {:.3}",
                limit.percentile, limit.value
            ));
        }
    }
    if goal.cares_about_latency()
        && let Some(s) = c.speedup
        && s < 1.0
    {
        out.push(format!(
            "slower than the original ({:.2}x its p50 latency, measured in the same run)",
            1.0 / s
        ));
    }
    out
}

fn drop_of(c: &CandidateRecord) -> f64 {
    c.metric.as_ref().map_or(f64::INFINITY, |m| m.drop)
}

fn p50(c: &CandidateRecord) -> f64 {
    c.latency.as_ref().map_or(f64::INFINITY, |l| l.p50_ms)
}

fn size(c: &CandidateRecord) -> u64 {
    c.size_bytes.unwrap_or(u64::MAX)
}

/// Feasible candidates best first by the objective.
fn rank(goal: &Goal, feasible: &[&CandidateRecord]) -> Vec<usize> {
    let mut v: Vec<&CandidateRecord> = feasible.to_vec();
    match goal.objective {
        Objective::Smallest => v.sort_by(|a, b| {
            size(a)
                .cmp(&size(b))
                .then(drop_of(a).total_cmp(&drop_of(b)))
                .then(a.id.cmp(&b.id))
        }),
        Objective::MostAccurate => v.sort_by(|a, b| {
            drop_of(a)
                .total_cmp(&drop_of(b))
                .then(size(a).cmp(&size(b)))
                .then(a.id.cmp(&b.id))
        }),
        Objective::Fastest => {
            // Buckets of LATENCY_TIE around the fastest remaining: within a bucket the smaller
            // model wins, so noise of a few percent does not flip the decision.
            let mut rest = v;
            let mut ordered = Vec::new();
            while !rest.is_empty() {
                let best = rest.iter().map(|c| p50(c)).fold(f64::INFINITY, f64::min);
                let (mut tied, others): (Vec<_>, Vec<_>) = rest.into_iter().partition(|c| p50(c) <= best * LATENCY_TIE);
                tied.sort_by(|a, b| {
                    size(a)
                        .cmp(&size(b))
                        .then(drop_of(a).total_cmp(&drop_of(b)))
                        .then(a.id.cmp(&b.id))
                });
                ordered.extend(tied);
                rest = others;
            }
            v = ordered;
        }
    }
    v.iter().map(|c| c.id).collect()
}

/// Candidates not dominated on (size, drop, p50) by another measured candidate.
fn pareto(measured: &[&CandidateRecord]) -> Vec<usize> {
    let key = |c: &CandidateRecord| (size(c) as f64, drop_of(c), p50(c));
    measured
        .iter()
        .filter(|c| {
            let (s, d, l) = key(c);
            !measured.iter().any(|o| {
                let (os, od, ol) = key(o);
                o.id != c.id && os <= s && od <= d && ol <= l && (os < s || od < d || ol < l)
            })
        })
        .map(|c| c.id)
        .collect()
}

/// How far a candidate is from feasible: the sum of each constraint's relative overshoot.
fn shortfall(goal: &Goal, c: &CandidateRecord) -> (f64, Vec<String>) {
    let mut total = 0.0;
    let mut advice = Vec::new();
    if let Some(m) = &c.metric
        && let Some(allowed) = allowed_drop(goal, m.original)
        && m.drop > allowed
    {
        total += (m.drop - allowed) / allowed.max(1e-3);
        let d = goal
            .constraints
            .max_accuracy_drop
            .as_ref()
            .expect("allowed implies a constraint");
        advice.push(if d.relative.is_some() {
            format!(
                "allow max_accuracy_drop.relative {:.4} (now {:.4}) on {}",
                m.drop / m.original.abs().max(1e-12),
                d.relative.unwrap_or_default(),
                m.name
            )
        } else {
            format!(
                "allow max_accuracy_drop.absolute {:.4} (now {:.4}) on {}",
                m.drop, allowed, m.name
            )
        });
    }
    if let (Some(max), Some(s)) = (goal.constraints.max_size_bytes, c.size_bytes)
        && s > max
    {
        total += (s - max) as f64 / max as f64;
        advice.push(format!(
            "raise max_size_bytes to {s} (+{:.1}%)",
            100.0 * (s - max) as f64 / max as f64
        ));
    }
    if let (Some(limit), Some(lat)) = (&goal.constraints.max_latency_ms, &c.latency) {
        let v = percentile(lat, limit.percentile);
        if v > limit.value {
            total += (v - limit.value) / limit.value;
            advice.push(format!(
                "raise max_latency_ms.value to {v:.3} at p{} (+{:.1}%)",
                limit.percentile,
                100.0 * (v - limit.value) / limit.value
            ));
        }
    }
    if goal.cares_about_latency()
        && let Some(s) = c.speedup
        && s < 1.0
    {
        total += 1.0 / s - 1.0;
        advice.push(
            "no compressed candidate beats the original's latency on this CPU; drop the latency objective or \
             constraint, or run on a CPU with VNNI/AMX"
                .into(),
        );
    }
    (total, advice)
}

fn ratio_text(before: f64, after: f64, more: &str, less: &str) -> String {
    if after <= 0.0 || before <= 0.0 {
        return String::new();
    }
    let r = before / after;
    if r >= 1.0 {
        format!("{r:.2}x {more}")
    } else {
        format!("{:.2}x {less}", 1.0 / r)
    }
}

/// "int8 static: 3.9x smaller, 1.8x faster on this CPU, accuracy -0.6 points (95% CI ...)".
fn reason(goal: &Goal, c: &CandidateRecord, original_size: u64, feasible: usize, cpu: &str) -> String {
    let mut parts = Vec::new();
    if let Some(s) = c.size_bytes {
        parts.push(format!(
            "{} ({original_size} -> {s} bytes)",
            ratio_text(original_size as f64, s as f64, "smaller", "larger")
        ));
    }
    if let Some(speedup) = c.speedup {
        parts.push(format!(
            "{} on {cpu} (paired p50)",
            ratio_text(speedup, 1.0, "faster", "slower")
        ));
    }
    if let Some(m) = &c.metric {
        let delta = m.value - m.original;
        let unitless = matches!(
            m.name.as_str(),
            "accuracy" | "f1_macro" | "precision_macro" | "recall_macro"
        );
        let mut text = if unitless {
            format!(
                "{} {:+.2} points ({:.4} -> {:.4})",
                m.name,
                100.0 * delta,
                m.original,
                m.value
            )
        } else {
            format!("{} {:+.4} ({:.4} -> {:.4})", m.name, delta, m.original, m.value)
        };
        if let Some([lo, hi]) = m.delta_ci95 {
            let scale = if unitless { 100.0 } else { 1.0 };
            text.push_str(&format!(" (95% CI {:+.2}..{:+.2})", scale * lo, scale * hi));
        }
        parts.push(text);
    }
    let why = match goal.objective {
        Objective::Smallest => "the smallest",
        Objective::Fastest => "the fastest (the smallest of those within 3% of the best p50)",
        Objective::MostAccurate => "the most accurate",
    };
    format!(
        "{}: {}; chosen as {why} of {feasible} candidate(s) that meet every constraint",
        c.label,
        parts.join(", ")
    )
}

/// `original_size`: bytes of the original model (for the "N x smaller" in the reason).
pub fn decide(goal: &Goal, records: &[CandidateRecord], original_size: u64) -> Outcome {
    let measured: Vec<&CandidateRecord> = records.iter().filter(|c| c.status != CandidateStatus::Failed).collect();
    let feasible: Vec<&CandidateRecord> = records
        .iter()
        .filter(|c| c.status == CandidateStatus::Feasible)
        .collect();
    let ranked = rank(goal, &feasible);
    let cpu = crate::pipeline::cpu_model();
    let decision = ranked.first().map(|&id| {
        let c = records.iter().find(|c| c.id == id).expect("ranked from records");
        Decision {
            candidate: id,
            label: c.label.clone(),
            recipe: c.recipe.clone(),
            reason: reason(goal, c, original_size, feasible.len(), &cpu),
        }
    });
    let nearest_miss = if decision.is_some() {
        None
    } else {
        measured
            .iter()
            .map(|c| (shortfall(goal, c), c))
            .min_by(|((a, _), x), ((b, _), y)| a.total_cmp(b).then(x.id.cmp(&y.id)))
            .map(|((_, advice), c)| NearestMiss {
                candidate: c.id,
                label: c.label.clone(),
                advice,
            })
    };
    Outcome {
        alternatives: ranked.iter().skip(1).copied().collect(),
        pareto_front: pareto(&measured),
        decision,
        nearest_miss,
    }
}
