//! One ONNX Runtime environment per process, loaded from the shared library named in the config.
//!
//! ORT is loaded dynamically (`ort`'s `load-dynamic`): the library comes from the `onnxruntime`
//! Python wheel that `make` installs under `.venv`, so the binary builds without it and a process
//! that cannot find it says so clearly instead of failing to link.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};

/// The ORT release line `ort` 2.0.0-rc.15 (api-31) is built for.
pub const ORT_SERIES: &str = "1.31";

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "ONNX Runtime library not found: set onnxruntime.dylib_path or ORT_DYLIB_PATH, or run `make setup` to install it into .venv"
    )]
    LibraryNotFound,
    #[error("loading ONNX Runtime from {path}: {message}")]
    Load { path: String, message: String },
    #[error("ONNX Runtime cannot load the model: {0}")]
    ModelLoad(String),
    #[error("ONNX Runtime failed: {0}")]
    Run(String),
    #[error("execution provider unavailable: {0}")]
    ProviderUnavailable(String),
}

/// Where a model is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Cpu,
    Cuda,
}

impl Provider {
    pub fn parse(s: &str) -> Option<Provider> {
        match s {
            "cpu" => Some(Provider::Cpu),
            "cuda" => Some(Provider::Cuda),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Cpu => "cpu",
            Provider::Cuda => "cuda",
        }
    }
}

/// ONNX Runtime for a job process, loaded on first use: a transform-only run (`compress --no-eval`)
/// whose passes never run a model then never maps the library, which is most of such a process's
/// memory (about 28 MiB of its RSS) and of its start-up.
pub struct LazyRuntime {
    configured: String,
    loaded: OnceLock<Result<Runtime, String>>,
}

impl LazyRuntime {
    /// `configured`: `onnxruntime.dylib_path` (empty: ORT_DYLIB_PATH, then .venv), read on first use.
    pub fn new(configured: &str) -> LazyRuntime {
        LazyRuntime {
            configured: configured.to_string(),
            loaded: OnceLock::new(),
        }
    }

    /// The runtime, loading it now if nothing has yet.
    pub fn get(&self) -> Result<&Runtime, RuntimeError> {
        self.loaded
            .get_or_init(|| Runtime::init(&self.configured).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|message| RuntimeError::Load {
                path: self.configured.clone(),
                message: message.clone(),
            })
    }

    /// Whether anything has loaded (or tried to load) the library yet.
    pub fn is_loaded(&self) -> bool {
        self.loaded.get().is_some()
    }

    /// [`Runtime::session`], loading the runtime first if need be.
    pub fn session(&self, model: &Path, threads: usize) -> Result<Session, RuntimeError> {
        self.get()?.session(model, threads)
    }

    /// [`Runtime::optimize`], loading the runtime first if need be.
    pub fn optimize(&self, input: &Path, output: &Path, level: GraphOptimizationLevel) -> Result<(), RuntimeError> {
        self.get()?.optimize(input, output, level)
    }

    /// [`Runtime::unoptimized_session`], loading the runtime first if need be.
    pub fn unoptimized_session(&self, model: &Path, threads: usize) -> Result<Session, RuntimeError> {
        self.get()?.unoptimized_session(model, threads)
    }
}

impl From<Runtime> for LazyRuntime {
    fn from(runtime: Runtime) -> LazyRuntime {
        LazyRuntime {
            configured: runtime.library.display().to_string(),
            loaded: OnceLock::from(Ok(runtime)),
        }
    }
}

/// A loaded ONNX Runtime: the environment sessions are created in, and where it came from.
#[derive(Clone)]
pub struct Runtime {
    pub env: Environment,
    pub library: PathBuf,
    pub version: String,
}

static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();

impl Runtime {
    /// Loads ORT once per process; later calls return the same runtime (or the same failure).
    pub fn init(configured: &str) -> Result<Runtime, RuntimeError> {
        let result = RUNTIME.get_or_init(|| {
            let path = locate(configured).ok_or_else(|| RuntimeError::LibraryNotFound.to_string())?;
            let load = |message: String| RuntimeError::Load {
                path: path.display().to_string(),
                message,
            };
            let env = ort::init_from(&path)
                .map_err(|e| load(e.to_string()).to_string())?
                .with_name("modelpress")
                .with_telemetry(false)
                .build()
                .map_err(|e| load(e.to_string()).to_string())?;
            let version = version_of(&path);
            tracing::info!(library = %path.display(), %version, "ONNX Runtime loaded");
            Ok(Runtime {
                env,
                library: path,
                version,
            })
        });
        result.clone().map_err(|message| RuntimeError::Load {
            path: configured.to_string(),
            message,
        })
    }

    /// A session for measurement on the CPU: fixed intra-op threads, sequential execution, ORT's
    /// default graph optimizations.
    pub fn session(&self, model: &Path, threads: usize) -> Result<Session, RuntimeError> {
        self.session_on(model, threads, Provider::Cpu)
    }

    /// A session on `provider`. A GPU provider is registered with error-on-failure: when it cannot
    /// be used, this fails instead of silently running on the CPU and reporting CPU numbers as GPU.
    pub fn session_on(&self, model: &Path, threads: usize, provider: Provider) -> Result<Session, RuntimeError> {
        let mut builder = self.builder(threads)?;
        if provider == Provider::Cuda {
            builder = builder
                .with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])
                .map_err(|e| RuntimeError::ProviderUnavailable(format!("CUDA: {e}")))?;
        }
        builder.commit_from_file(model).map_err(load_error)
    }

    /// A CPU session that runs the graph as written, without ORT's graph optimizations: for
    /// calibration, whose statistics belong to the model's own tensors (fused kernels round
    /// differently), as ONNX Runtime's own calibrators do.
    pub fn unoptimized_session(&self, model: &Path, threads: usize) -> Result<Session, RuntimeError> {
        self.builder(threads)?
            .with_optimization_level(GraphOptimizationLevel::Disable)
            .map_err(|e| load_error(e.into()))?
            .commit_from_file(model)
            .map_err(load_error)
    }

    /// Every session's settings: fixed intra-op threads, one inter-op thread.
    fn builder(&self, threads: usize) -> Result<SessionBuilder, RuntimeError> {
        Session::builder(&self.env)
            .map_err(load_error)?
            .with_intra_threads(threads)
            .map_err(|e| load_error(e.into()))?
            .with_inter_threads(1)
            .map_err(|e| load_error(e.into()))
    }

    /// Execution providers this ONNX Runtime build offers (the CPU always).
    pub fn providers(&self) -> Vec<Provider> {
        use ort::ep::ExecutionProvider;
        let mut providers = vec![Provider::Cpu];
        if ort::ep::CUDA::is_available().unwrap_or(false) {
            providers.push(Provider::Cuda);
        }
        providers
    }

    /// Runs ORT's graph optimizer at `level` over `input` and writes the optimized graph to `output`.
    pub fn optimize(&self, input: &Path, output: &Path, level: GraphOptimizationLevel) -> Result<(), RuntimeError> {
        Session::builder(&self.env)
            .map_err(load_error)?
            .with_optimization_level(level)
            .map_err(|e| load_error(e.into()))?
            .with_optimized_model_path(output)
            .map_err(|e| load_error(e.into()))?
            .commit_from_file(input)
            .map_err(load_error)?;
        Ok(())
    }
}

/// The library to load: the configured path, then `ORT_DYLIB_PATH`, then the wheel under `.venv`.
pub fn locate(configured: &str) -> Option<PathBuf> {
    if !configured.is_empty() {
        return Some(PathBuf::from(configured));
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let lib = std::fs::read_dir(".venv/lib").ok()?;
    for python in lib.flatten() {
        let capi = python.path().join("site-packages/onnxruntime/capi");
        if let Ok(entries) = std::fs::read_dir(&capi) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if name.starts_with(&format!("libonnxruntime.so.{ORT_SERIES}")) {
                    return Some(entry.path());
                }
            }
        }
    }
    None
}

/// ORT's version from its build info (`git-branch=rel-1.31.1`), else from the library's file name
/// (`libonnxruntime.so.1.31.1`).
fn version_of(path: &Path) -> String {
    if let Some(v) = ort::info()
        .split([',', ' '])
        .find_map(|part| part.strip_prefix("git-branch=rel-"))
    {
        return v.to_string();
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    name.rsplit_once(".so.")
        .map(|(_, v)| v.to_string())
        .unwrap_or_else(|| format!("{ORT_SERIES}.x"))
}

fn load_error(e: ort::Error) -> RuntimeError {
    RuntimeError::ModelLoad(e.to_string())
}
