//! Settings: `config/default.toml` (compiled in), an optional file, then `MODELPRESS_*` variables.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Serialize};

const DEFAULTS: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Config {
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub database: DatabaseConfig,
    pub storage: StorageConfig,
    pub limits: LimitsConfig,
    pub onnxruntime: OrtConfig,
    pub worker: WorkerConfig,
    pub eval: EvalConfig,
    pub retention: RetentionConfig,
    pub webhooks: WebhooksConfig,
    pub inference: InferenceConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Single-tenant local mode: no keys, everything belongs to the default tenant.
    None,
    ApiKey,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct AuthConfig {
    pub mode: AuthMode,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct WebhooksConfig {
    pub allow_private_targets: bool,
    pub max_attempts: i32,
    pub retry_base_s: u64,
    pub timeout_s: u64,
    pub poll_interval_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub max_json_bytes: usize,
    pub shutdown_grace_s: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct DatabaseConfig {
    pub url: String,
    pub max_connections: u32,
    pub migrate_on_start: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct StorageConfig {
    pub backend: String,
    pub root: String,
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub allow_http: bool,
    pub part_size_mb: usize,
    pub retry_timeout_s: u64,
    /// Credentials are never written back out: a worker serializes its configuration for each
    /// job process, which has no use for them.
    #[serde(default, skip_serializing)]
    pub access_key_id: String,
    #[serde(default, skip_serializing)]
    pub secret_access_key: Secret,
}

/// A credential: read from configuration, never printed by `Debug`.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

/// How long finished work is kept. Rows go first, then their bytes; bytes whose deletion failed
/// are orphans, which the same sweep removes once they are older than the grace period.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RetentionConfig {
    pub finished_jobs_days: u32,
    pub artifacts_days: u32,
    pub orphan_grace_s: u64,
    pub sweep_interval_s: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct LimitsConfig {
    pub max_model_bytes: u64,
    pub max_dataset_bytes: u64,
    pub requests_per_second: f64,
    pub burst: u32,
    pub max_stored_bytes_per_tenant: u64,
    pub max_active_jobs_per_tenant: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct OrtConfig {
    pub dylib_path: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct WorkerConfig {
    pub enabled: bool,
    pub concurrency: usize,
    pub lease_s: u64,
    pub poll_interval_ms: u64,
    pub rescue_interval_s: u64,
    pub job_timeout_s: u64,
    pub max_job_timeout_s: u64,
    pub job_memory_limit_mb: u64,
    pub max_attempts: i32,
    pub retry_base_s: u64,
    pub runner: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct EvalConfig {
    pub threads: usize,
    pub warmup_runs: usize,
    pub timed_runs: usize,
    pub seed: u64,
    pub batch_size: i64,
    pub dynamic_dim: i64,
    pub dim_overrides: std::collections::BTreeMap<String, i64>,
    pub latency_batch_size: i64,
    pub calibration_fraction: f64,
    pub bootstrap_rounds: usize,
    pub trusted_drop: f64,
    pub execution_provider: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct InferenceConfig {
    pub processes: usize,
    pub threads_per_process: usize,
    pub intra_op_threads: usize,
    pub memory_budget_bytes: u64,
    pub timeout_ms: u64,
    pub load_timeout_ms: u64,
    pub max_body_bytes: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

impl Config {
    /// Defaults, then `file` (if any), then `MODELPRESS_SECTION__KEY` variables, then `DATABASE_URL`.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULTS));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError(format!("config file {} does not exist", file.display())));
            }
            figment = figment.merge(Toml::file(file));
        }
        figment = figment.merge(Env::prefixed("MODELPRESS_").split("__"));
        let mut config: Config = figment.extract().map_err(|e| ConfigError(e.to_string()))?;
        if let Ok(url) = std::env::var("DATABASE_URL") {
            config.database.url = url;
        }
        config.validate()?;
        Ok(config)
    }

    /// The compiled-in defaults alone, ignoring the environment: what tests start from.
    pub fn defaults() -> Self {
        Figment::from(Toml::string(DEFAULTS))
            .extract()
            .expect("config/default.toml is valid")
    }

    fn validate(&self) -> Result<(), ConfigError> {
        match self.storage.backend.as_str() {
            "local" => {}
            "s3" if self.storage.bucket.is_empty() => {
                return Err(ConfigError("storage.backend \"s3\" needs storage.bucket".into()));
            }
            "s3" => {}
            other => {
                return Err(ConfigError(format!(
                    "storage.backend {other:?} is not supported (supported: \"local\", \"s3\")"
                )));
            }
        }
        if self.storage.part_size_mb < 5 {
            return Err(ConfigError(
                "storage.part_size_mb must be >= 5 (S3's smallest part)".into(),
            ));
        }
        if self.storage.access_key_id.is_empty() != self.storage.secret_access_key.0.is_empty() {
            return Err(ConfigError(
                "storage.access_key_id and storage.secret_access_key go together".into(),
            ));
        }
        if self.retention.orphan_grace_s < 60 {
            return Err(ConfigError(
                "retention.orphan_grace_s must be >= 60 (uploads in flight are not orphans)".into(),
            ));
        }
        if self.worker.concurrency == 0 || self.worker.lease_s < 3 {
            return Err(ConfigError(
                "worker.concurrency must be >= 1 and worker.lease_s >= 3".into(),
            ));
        }
        if !(1..=i32::MAX as u64).contains(&self.worker.max_job_timeout_s) || self.worker.job_timeout_s == 0 {
            return Err(ConfigError(
                "worker.job_timeout_s and worker.max_job_timeout_s must be within 1..=2^31-1".into(),
            ));
        }
        if !(1..=10).contains(&self.worker.max_attempts) {
            return Err(ConfigError("worker.max_attempts must be within 1..=10".into()));
        }
        if self.eval.timed_runs == 0 || self.eval.threads == 0 || self.eval.dynamic_dim < 1 || self.eval.batch_size < 1
        {
            return Err(ConfigError(
                "eval.timed_runs, eval.threads, eval.batch_size and eval.dynamic_dim must be >= 1".into(),
            ));
        }
        if !(0.0..0.95).contains(&self.eval.calibration_fraction) || self.eval.bootstrap_rounds == 0 {
            return Err(ConfigError(
                "eval.calibration_fraction must be within [0, 0.95) and eval.bootstrap_rounds >= 1".into(),
            ));
        }
        if crate::eval::Provider::parse(&self.eval.execution_provider).is_none() {
            return Err(ConfigError(
                "eval.execution_provider must be \"cpu\" or \"cuda\"".into(),
            ));
        }
        if !(self.limits.requests_per_second >= 0.0 && self.limits.requests_per_second.is_finite())
            || (self.limits.requests_per_second > 0.0 && self.limits.burst == 0)
        {
            return Err(ConfigError(
                "limits.requests_per_second must be >= 0 and limits.burst >= 1 when it is on".into(),
            ));
        }
        if !(1..=20).contains(&self.webhooks.max_attempts) || self.webhooks.timeout_s == 0 {
            return Err(ConfigError(
                "webhooks.max_attempts must be within 1..=20 and webhooks.timeout_s >= 1".into(),
            ));
        }
        if self.eval.dim_overrides.values().any(|&v| v < 1) {
            return Err(ConfigError("eval.dim_overrides values must be >= 1".into()));
        }
        let i = &self.inference;
        if i.processes == 0 || i.threads_per_process == 0 || i.intra_op_threads == 0 {
            return Err(ConfigError(
                "inference.processes, inference.threads_per_process and inference.intra_op_threads must be >= 1".into(),
            ));
        }
        if i.timeout_ms == 0 || i.load_timeout_ms == 0 || i.max_body_bytes == 0 {
            return Err(ConfigError(
                "inference.timeout_ms, inference.load_timeout_ms and inference.max_body_bytes must be >= 1".into(),
            ));
        }
        Ok(())
    }

    pub fn s3_options(&self) -> crate::storage::S3Options {
        let s = &self.storage;
        crate::storage::S3Options {
            endpoint: s.endpoint.clone(),
            bucket: s.bucket.clone(),
            region: s.region.clone(),
            access_key_id: s.access_key_id.clone(),
            secret_access_key: s.secret_access_key.0.clone(),
            allow_http: s.allow_http,
            part_size: s.part_size_mb << 20,
            retry_timeout: std::time::Duration::from_secs(s.retry_timeout_s),
        }
    }

    pub fn storage_root(&self) -> PathBuf {
        if self.storage.root.is_empty() {
            self.server.data_dir.join("objects")
        } else {
            PathBuf::from(&self.storage.root)
        }
    }

    /// Upload staging and job scratch live beside the store so finished files move by rename.
    pub fn staging_dir(&self) -> PathBuf {
        self.server.data_dir.join("staging")
    }

    pub fn scratch_dir(&self) -> PathBuf {
        self.server.data_dir.join("work")
    }

    /// Models fetched from storage for the inference workers, one folder per model.
    pub fn inference_cache_dir(&self) -> PathBuf {
        self.server.data_dir.join("inference")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_defaults_parse_and_validate() {
        let config = Config::defaults();
        config.validate().unwrap();
        assert_eq!(config.server.listen.port(), 8080);
        assert_eq!(config.storage_root(), PathBuf::from("./data/objects"));
    }

    #[test]
    fn an_s3_store_needs_a_bucket_and_both_halves_of_a_key() {
        let mut config = Config::defaults();
        config.storage.backend = "s3".into();
        assert!(config.validate().unwrap_err().to_string().contains("storage.bucket"));
        config.storage.bucket = "models".into();
        config.validate().unwrap();
        config.storage.access_key_id = "AKIA".into();
        assert!(config.validate().unwrap_err().to_string().contains("secret_access_key"));
        config.storage.secret_access_key = Secret("s3cret".into());
        config.validate().unwrap();
        assert!(!format!("{config:?}").contains("s3cret"), "Debug hides the secret");
        let written = toml::to_string(&config).unwrap();
        assert!(!written.contains("s3cret"), "the job process's copy has no secret");
        let reread: Config = Figment::from(Toml::string(DEFAULTS))
            .merge(Toml::string(&written))
            .extract()
            .unwrap();
        reread.validate().expect("the job process accepts the copy");
        config.storage.backend = "gcs".into();
        assert!(config.validate().is_err());
    }
}
