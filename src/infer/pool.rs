//! The API side of inference: a fixed number of worker processes (`modelpress infer-worker`),
//! spawned on first use and replaced when they die or are killed. A model always lives in the
//! same process (a hash of its key), so concurrent requests for it share one session. Loaded
//! sessions are tracked here with the memory each took; past the budget the least recently used
//! are unloaded. Requests are multiplexed over each process's pipes by id.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{OnceCell, oneshot};

use super::protocol::{FailureCode, Reply, Request, Signature, Tensor, headers_of, split_payload};
use crate::config::InferenceConfig;
use crate::eval::Provider;

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error("the model ran past the inference time limit ({ms} ms); the worker running it was restarted")]
    Timeout { ms: u64 },
    #[error("loading the model took longer than inference.load_timeout_ms ({ms} ms)")]
    LoadTimeout { ms: u64 },
    #[error("the inference worker stopped while handling this request ({0}); it is replaced on the next request")]
    WorkerGone(String),
    #[error("starting an inference worker ({runner}): {message}")]
    Spawn { runner: String, message: String },
    #[error("{message}")]
    Worker { code: FailureCode, message: String },
}

pub struct PoolSettings {
    /// Program run as `<runner> infer-worker`.
    pub runner: PathBuf,
    /// Handed to workers as ORT_DYLIB_PATH.
    pub dylib: Option<PathBuf>,
    /// Address-space limit of each worker (MiB; 0 = none), as for job processes.
    pub memory_limit_mb: u64,
    pub inference: InferenceConfig,
}

/// Where a model's file is and how to run it; `key` names its session.
#[derive(Debug, Clone)]
pub struct ModelRef {
    pub key: String,
    pub path: PathBuf,
    pub provider: Provider,
}

/// A loaded session's signature and cost.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub inputs: Vec<Signature>,
    pub outputs: Vec<Signature>,
    pub memory_bytes: u64,
}

pub struct RunOutput {
    pub outputs: Vec<Tensor>,
    /// Round trip to the worker and back, as this process saw it.
    pub elapsed_ms: f64,
}

/// A session and whether this call loaded it.
pub struct Session {
    pub info: Arc<ModelInfo>,
    pub load_ms: Option<f64>,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<(Reply, Vec<u8>)>>>>;

struct Process {
    generation: u64,
    stdin: tokio::sync::Mutex<ChildStdin>,
    pending: Pending,
    child: Mutex<Child>,
}

impl Process {
    fn alive(&self) -> bool {
        matches!(self.child.lock().expect("child lock").try_wait(), Ok(None))
    }

    fn kill(&self) {
        let _ = self.child.lock().expect("child lock").start_kill();
    }
}

struct Entry {
    slot: usize,
    generation: u64,
    cell: Arc<OnceCell<Arc<ModelInfo>>>,
    last_used: u64,
}

#[derive(Default)]
struct Models {
    entries: HashMap<String, Entry>,
    clock: u64,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct PoolStats {
    pub evictions: AtomicU64,
    pub restarts: AtomicU64,
    pub timeouts: AtomicU64,
}

pub struct InferencePool {
    settings: PoolSettings,
    slots: Vec<tokio::sync::Mutex<Option<Arc<Process>>>>,
    models: Mutex<Models>,
    next_id: AtomicU64,
    generations: AtomicU64,
    pub stats: PoolStats,
}

impl InferencePool {
    pub fn new(settings: PoolSettings) -> Self {
        let slots = (0..settings.inference.processes.max(1))
            .map(|_| tokio::sync::Mutex::new(None))
            .collect();
        InferencePool {
            settings,
            slots,
            models: Mutex::default(),
            next_id: AtomicU64::new(1),
            generations: AtomicU64::new(1),
            stats: PoolStats::default(),
        }
    }

    /// Sessions loaded now and the memory they take, for `/metrics`.
    pub fn loaded(&self) -> (usize, u64) {
        let models = self.models.lock().expect("models lock");
        let loaded: Vec<u64> = models
            .entries
            .values()
            .filter_map(|e| e.cell.get().map(|i| i.memory_bytes))
            .collect();
        (loaded.len(), loaded.iter().sum())
    }

    fn slot_of(&self, key: &str) -> usize {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        (h.finish() % self.slots.len() as u64) as usize
    }

    /// The session for `model`, loading it on first use (and unloading the least recently used
    /// sessions when the budget is exceeded).
    pub async fn session(&self, model: &ModelRef) -> Result<Session, InferError> {
        let slot = self.slot_of(&model.key);
        let process = self.process(slot).await?;
        let cell = {
            let mut models = self.models.lock().expect("models lock");
            models.clock += 1;
            let clock = models.clock;
            let entry = models.entries.entry(model.key.clone()).or_insert_with(|| Entry {
                slot,
                generation: process.generation,
                cell: Arc::default(),
                last_used: clock,
            });
            if entry.generation != process.generation {
                // Its process was replaced: the session went with it.
                entry.generation = process.generation;
                entry.cell = Arc::default();
            }
            entry.last_used = clock;
            entry.cell.clone()
        };
        let mut load_ms = None;
        let loaded = cell
            .get_or_try_init(|| async {
                let start = Instant::now();
                let request = Request::Load {
                    id: self.next_id(),
                    key: model.key.clone(),
                    path: model.path.clone(),
                    provider: model.provider,
                    intra_op_threads: self.settings.inference.intra_op_threads,
                };
                let ms = self.settings.inference.load_timeout_ms;
                let reply = self
                    .call(&process, request, Vec::new(), ms)
                    .await
                    .map_err(|e| match e {
                        InferError::Timeout { ms } => InferError::LoadTimeout { ms },
                        other => other,
                    })?;
                load_ms = Some(start.elapsed().as_secs_f64() * 1000.0);
                match reply {
                    (
                        Reply::Loaded {
                            inputs,
                            outputs,
                            memory_bytes,
                            ..
                        },
                        _,
                    ) => Ok(Arc::new(ModelInfo {
                        inputs,
                        outputs,
                        memory_bytes,
                    })),
                    other => Err(unexpected(other.0)),
                }
            })
            .await;
        let info = match loaded {
            Ok(info) => info.clone(),
            Err(e) => {
                self.forget(&model.key, &cell);
                return Err(e);
            }
        };
        if load_ms.is_some() {
            self.enforce_budget(&model.key).await;
        }
        Ok(Session { info, load_ms })
    }

    /// Runs `model` on `inputs` (already checked against its signature), within the time limit.
    pub async fn run(&self, model: &ModelRef, inputs: Vec<Tensor>) -> Result<RunOutput, InferError> {
        for attempt in 0..2 {
            self.session(model).await?;
            let process = self.process(self.slot_of(&model.key)).await?;
            let request = Request::Run {
                id: self.next_id(),
                key: model.key.clone(),
                inputs: headers_of(&inputs),
            };
            let payload: Vec<u8> = inputs.iter().flat_map(|t| t.data.iter().copied()).collect();
            let start = Instant::now();
            let reply = self
                .call(&process, request, payload, self.settings.inference.timeout_ms)
                .await?;
            let elapsed_ms = start.elapsed().as_secs_f64() * 1000.0;
            match reply {
                (Reply::Ran { outputs, .. }, data) => {
                    let outputs = split_payload(&outputs, data).map_err(|message| InferError::Worker {
                        code: FailureCode::Protocol,
                        message,
                    })?;
                    return Ok(RunOutput { outputs, elapsed_ms });
                }
                // Unloaded between our load and this run (the budget): load again, once.
                (
                    Reply::Failed {
                        code: FailureCode::NotLoaded,
                        ..
                    },
                    _,
                ) if attempt == 0 => {
                    let mut models = self.models.lock().expect("models lock");
                    models.entries.remove(&model.key);
                }
                (other, _) => return Err(unexpected(other)),
            }
        }
        Err(InferError::Worker {
            code: FailureCode::NotLoaded,
            message: "the model's session was unloaded twice while this request waited".into(),
        })
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn forget(&self, key: &str, cell: &Arc<OnceCell<Arc<ModelInfo>>>) {
        let mut models = self.models.lock().expect("models lock");
        if models.entries.get(key).is_some_and(|e| Arc::ptr_eq(&e.cell, cell)) {
            models.entries.remove(key);
        }
    }

    /// Unloads least recently used sessions (never `keep`) until the loaded ones fit the budget.
    async fn enforce_budget(&self, keep: &str) {
        let budget = self.settings.inference.memory_budget_bytes;
        let victims: Vec<(String, usize, u64)> = {
            let mut models = self.models.lock().expect("models lock");
            let mut total: u64 = models
                .entries
                .values()
                .filter_map(|e| e.cell.get().map(|i| i.memory_bytes))
                .sum();
            let mut candidates: Vec<(u64, String)> = models
                .entries
                .iter()
                .filter(|(k, e)| k.as_str() != keep && e.cell.initialized())
                .map(|(k, e)| (e.last_used, k.clone()))
                .collect();
            candidates.sort();
            let mut victims = Vec::new();
            for (_, key) in candidates {
                if total <= budget {
                    break;
                }
                if let Some(e) = models.entries.remove(&key) {
                    total = total.saturating_sub(e.cell.get().map_or(0, |i| i.memory_bytes));
                    victims.push((key, e.slot, e.generation));
                }
            }
            if total > budget {
                tracing::warn!(
                    model = keep,
                    total,
                    budget,
                    "one session alone exceeds inference.memory_budget_bytes"
                );
            }
            victims
        };
        for (key, slot, generation) in victims {
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
            tracing::info!(model = %key, "unloading the least recently used inference session");
            let current = self.slots[slot].lock().await.clone();
            if let Some(process) = current.filter(|p| p.generation == generation) {
                let request = Request::Unload {
                    id: self.next_id(),
                    key,
                };
                if let Err(e) = self.call(&process, request, Vec::new(), 10_000).await {
                    tracing::warn!(error = %e, "unloading an inference session failed");
                }
            }
        }
    }

    /// The live process of `slot`, started when there is none (or it died).
    async fn process(&self, slot: usize) -> Result<Arc<Process>, InferError> {
        let mut current = self.slots[slot].lock().await;
        if let Some(p) = current.as_ref() {
            if p.alive() {
                return Ok(p.clone());
            }
            self.stats.restarts.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(slot, "an inference worker exited; starting a new one");
            let dead = p.generation;
            let mut models = self.models.lock().expect("models lock");
            models.entries.retain(|_, e| e.generation != dead);
        }
        let process = Arc::new(self.spawn()?);
        *current = Some(process.clone());
        Ok(process)
    }

    fn spawn(&self) -> Result<Process, InferError> {
        let s = &self.settings;
        let mut cmd = Command::new(&s.runner);
        cmd.arg("infer-worker")
            .arg("--threads")
            .arg(s.inference.threads_per_process.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(lib) = &s.dylib {
            cmd.env("ORT_DYLIB_PATH", lib);
        }
        crate::worker::limits::limit_address_space(&mut cmd, s.memory_limit_mb);
        let mut child = cmd.spawn().map_err(|e| InferError::Spawn {
            runner: s.runner.display().to_string(),
            message: e.to_string(),
        })?;
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let pending: Pending = Arc::default();
        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(read_replies(stdout, pending.clone()));
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::info!(target: "modelpress::infer_worker", generation, "{line}");
            }
        });
        tracing::info!(generation, pid = child.id(), "inference worker started");
        Ok(Process {
            generation,
            stdin: tokio::sync::Mutex::new(stdin),
            pending,
            child: Mutex::new(child),
        })
    }

    /// Sends one request and waits for its reply, at most `timeout_ms`. Past it the process is
    /// killed (a run cannot be interrupted from outside ORT) and its sessions forgotten.
    async fn call(
        &self,
        process: &Arc<Process>,
        request: Request,
        payload: Vec<u8>,
        timeout_ms: u64,
    ) -> Result<(Reply, Vec<u8>), InferError> {
        let id = request.id();
        let (tx, rx) = oneshot::channel();
        process.pending.lock().expect("pending lock").insert(id, tx);
        let mut frame = Vec::with_capacity(payload.len() + 256);
        super::protocol::write_frame(&mut frame, &request, &[&payload]).expect("writing to memory");
        let written = async {
            let mut stdin = process.stdin.lock().await;
            stdin.write_all(&frame).await?;
            stdin.flush().await
        };
        let deadline = Duration::from_millis(timeout_ms);
        let outcome = tokio::time::timeout(deadline, async {
            written
                .await
                .map_err(|e| InferError::WorkerGone(format!("writing to it: {e}")))?;
            rx.await.map_err(|_| InferError::WorkerGone(exit_status(process)))
        })
        .await;
        match outcome {
            Ok(Ok(reply)) => match reply {
                (Reply::Failed { code, message, .. }, _) if code != FailureCode::NotLoaded => {
                    Err(InferError::Worker { code, message })
                }
                other => Ok(other),
            },
            Ok(Err(e)) => {
                self.retire(process).await;
                Err(e)
            }
            Err(_) => {
                process.pending.lock().expect("pending lock").remove(&id);
                self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    generation = process.generation,
                    timeout_ms,
                    "an inference request ran past its time limit; killing its worker"
                );
                self.retire(process).await;
                Err(InferError::Timeout { ms: timeout_ms })
            }
        }
    }

    /// Kills `process`, takes it out of its slot and forgets the sessions it held.
    async fn retire(&self, process: &Arc<Process>) {
        process.kill();
        for slot in &self.slots {
            let mut current = slot.lock().await;
            if current.as_ref().is_some_and(|p| Arc::ptr_eq(p, process)) {
                *current = None;
                self.stats.restarts.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut models = self.models.lock().expect("models lock");
        models.entries.retain(|_, e| e.generation != process.generation);
    }
}

fn unexpected(reply: Reply) -> InferError {
    InferError::Worker {
        code: FailureCode::Protocol,
        message: format!("unexpected reply from the inference worker: {reply:?}"),
    }
}

fn exit_status(process: &Process) -> String {
    match process.child.lock().expect("child lock").try_wait() {
        Ok(Some(status)) => format!("it exited: {status}"),
        _ => "its output ended".into(),
    }
}

/// Routes replies to their waiting requests until the worker's stdout closes; then every request
/// still waiting learns that the worker is gone (its sender is dropped).
async fn read_replies(stdout: ChildStdout, pending: Pending) {
    let mut r = BufReader::new(stdout);
    loop {
        match read_frame(&mut r).await {
            Ok(Some((reply, payload))) => {
                let waiter = pending.lock().expect("pending lock").remove(&reply.id());
                if let Some(tx) = waiter {
                    let _ = tx.send((reply, payload));
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable reply from an inference worker");
                break;
            }
        }
    }
    pending.lock().expect("pending lock").clear();
}

async fn read_frame(r: &mut BufReader<ChildStdout>) -> std::io::Result<Option<(Reply, Vec<u8>)>> {
    let len = match r.read_u32_le().await {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut header = vec![0u8; len as usize];
    r.read_exact(&mut header).await?;
    let reply: Reply =
        serde_json::from_slice(&header).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let size = r.read_u64_le().await?;
    let mut payload = vec![0u8; size as usize];
    r.read_exact(&mut payload).await?;
    Ok(Some((reply, payload)))
}
