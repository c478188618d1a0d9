//! Latency percentiles over repeated runs after a warm-up.

use std::time::Instant;

use ort::session::Session;
use serde::{Deserialize, Serialize};

use super::RuntimeError;
use super::session::PreparedInputs;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p90_ms: f64,
    /// Added with the advisor's latency constraints (which name p95); absent in older reports.
    #[serde(default)]
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    pub runs: usize,
}

pub fn measure(
    session: &mut Session,
    inputs: &PreparedInputs,
    warmup: usize,
    runs: usize,
) -> Result<Latency, RuntimeError> {
    for _ in 0..warmup {
        inputs.run(session)?;
    }
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        inputs.run(session)?;
        samples.push(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(summarize(samples))
}

/// Nearest-rank percentiles: every reported figure is a latency that was actually observed.
pub fn summarize(mut samples: Vec<f64>) -> Latency {
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    let pick = |p: f64| {
        if n == 0 {
            return 0.0;
        }
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        samples[rank.clamp(1, n) - 1]
    };
    Latency {
        p50_ms: pick(50.0),
        p90_ms: pick(90.0),
        p95_ms: pick(95.0),
        p99_ms: pick(99.0),
        mean_ms: if n == 0 {
            0.0
        } else {
            samples.iter().sum::<f64>() / n as f64
        },
        runs: n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let l = summarize((1..=100).rev().map(f64::from).collect());
        assert_eq!((l.p50_ms, l.p90_ms, l.p99_ms), (50.0, 90.0, 99.0));
        assert_eq!(l.mean_ms, 50.5);
        assert_eq!(l.runs, 100);
        let one = summarize(vec![7.0]);
        assert_eq!((one.p50_ms, one.p99_ms), (7.0, 7.0));
    }
}
