//! What a job's child process tells its worker, one JSON object per stdout line.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Progress {
        stage: String,
        percent: f32,
    },
    /// The advisor finished measuring a candidate (an `advisor::CandidateRecord`); a later event
    /// with the same `id` replaces it.
    Candidate {
        candidate: serde_json::Value,
    },
    Error {
        code: String,
        message: String,
        retryable: bool,
    },
    Done,
}

impl Event {
    /// Writes the event as one line on stdout and flushes, so the worker sees it at once.
    pub fn emit(&self) {
        use std::io::Write;
        let line = serde_json::to_string(self).expect("events serialize");
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}
