//! `modelpress infer-worker`: the process that holds inference sessions. It reads requests from
//! stdin and answers on stdout (see `protocol`), running up to `threads` requests at once; a
//! model's session is shared by every request for it (they take turns on it, since `ort` runs a
//! session through `&mut`). Whatever a model does to ONNX Runtime, it does to this process, which
//! the API replaces, never to the API itself.

use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Stdout};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ort::session::Session;
use ort::value::{DynValue, ValueType};

use super::protocol::{FailureCode, Reply, Request, Signature, TensorHeader, read_frame, split_payload, write_frame};
use crate::eval::dataset::decode;
use crate::eval::inputs::InputTensor;
use crate::eval::npz::NpyDtype;
use crate::eval::session::raw_tensor;
use crate::eval::{Provider, Runtime, RuntimeError};

struct Loaded {
    session: Mutex<Session>,
    inputs: Vec<Signature>,
    outputs: Vec<Signature>,
    memory_bytes: u64,
}

struct Worker {
    runtime: Runtime,
    sessions: Mutex<HashMap<String, Arc<Loaded>>>,
    out: Mutex<BufWriter<Stdout>>,
}

type Failure = (FailureCode, String);

/// Serves requests from stdin until it closes.
pub fn serve(runtime: Runtime, threads: usize) -> io::Result<std::convert::Infallible> {
    let worker = Arc::new(Worker {
        runtime,
        sessions: Mutex::default(),
        out: Mutex::new(BufWriter::new(io::stdout())),
    });
    let (tx, rx) = mpsc::channel::<(Request, Vec<u8>)>();
    let rx = Arc::new(Mutex::new(rx));
    let handles: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let (worker, rx) = (worker.clone(), rx.clone());
            std::thread::spawn(move || {
                loop {
                    let next = rx.lock().expect("queue lock").recv();
                    let Ok((request, payload)) = next else { break };
                    worker.answer(request, payload);
                }
            })
        })
        .collect();
    let mut stdin = BufReader::new(io::stdin().lock());
    while let Some((request, payload)) = read_frame::<Request>(&mut stdin)? {
        if tx.send((request, payload)).is_err() {
            break;
        }
    }
    // The API closed our stdin (it stopped, or gave up on us): nobody is left to answer, so runs
    // still in progress are abandoned rather than waited for.
    drop((tx, handles));
    std::process::exit(0)
}

impl Worker {
    fn answer(&self, request: Request, payload: Vec<u8>) {
        let id = request.id();
        // A bug must cost one request, not the process and every session in it.
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| self.handle(request, payload)))
            .unwrap_or_else(|_| Err((FailureCode::Run, "the inference worker panicked on this request".into())));
        let (reply, data) = match outcome {
            Ok(ok) => ok,
            Err((code, message)) => (Reply::Failed { id, code, message }, Vec::new()),
        };
        let parts: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        let mut out = self.out.lock().expect("stdout lock");
        if write_frame(&mut *out, &reply, &parts).is_err() {
            // The API end is gone; nothing is left to serve.
            std::process::exit(0);
        }
    }

    fn handle(&self, request: Request, payload: Vec<u8>) -> Result<(Reply, Vec<Vec<u8>>), Failure> {
        match request {
            Request::Load {
                id,
                key,
                path,
                provider,
                intra_op_threads,
            } => {
                let loaded = self.load(&key, &path, provider, intra_op_threads)?;
                Ok((
                    Reply::Loaded {
                        id,
                        inputs: loaded.inputs.clone(),
                        outputs: loaded.outputs.clone(),
                        memory_bytes: loaded.memory_bytes,
                    },
                    Vec::new(),
                ))
            }
            Request::Run { id, key, inputs } => {
                let loaded = self.sessions.lock().expect("sessions lock").get(&key).cloned();
                let loaded = loaded.ok_or((FailureCode::NotLoaded, format!("no session {key:?}")))?;
                let tensors = split_payload(&inputs, payload).map_err(|e| (FailureCode::Protocol, e))?;
                let start = Instant::now();
                let (outputs, data) = run(&loaded, tensors)?;
                let run_ms = start.elapsed().as_secs_f64() * 1000.0;
                Ok((Reply::Ran { id, outputs, run_ms }, data))
            }
            Request::Unload { id, key } => {
                self.sessions.lock().expect("sessions lock").remove(&key);
                Ok((Reply::Unloaded { id }, Vec::new()))
            }
        }
    }

    fn load(&self, key: &str, path: &Path, provider: Provider, threads: usize) -> Result<Arc<Loaded>, Failure> {
        if let Some(loaded) = self.sessions.lock().expect("sessions lock").get(key) {
            return Ok(loaded.clone());
        }
        let before = resident_bytes();
        let session = self.runtime.session_on(path, threads, provider).map_err(|e| match e {
            RuntimeError::ProviderUnavailable(m) => (FailureCode::ProviderUnavailable, m),
            other if provider == Provider::Cuda => (FailureCode::ProviderUnavailable, other.to_string()),
            other => (FailureCode::ModelLoad, other.to_string()),
        })?;
        let file_size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let grown = resident_bytes().saturating_sub(before);
        let loaded = Arc::new(Loaded {
            inputs: session
                .inputs()
                .iter()
                .map(|o| signature(o.name(), o.dtype()))
                .collect(),
            outputs: session
                .outputs()
                .iter()
                .map(|o| signature(o.name(), o.dtype()))
                .collect(),
            session: Mutex::new(session),
            memory_bytes: grown.max(file_size),
        });
        self.sessions
            .lock()
            .expect("sessions lock")
            .insert(key.to_string(), loaded.clone());
        Ok(loaded)
    }
}

fn run(loaded: &Loaded, tensors: Vec<super::protocol::Tensor>) -> Result<(Vec<TensorHeader>, Vec<Vec<u8>>), Failure> {
    let values = tensors
        .into_iter()
        .map(|t| {
            if !SUPPORTED_INPUTS.contains(&t.dtype) {
                return Err((
                    FailureCode::Run,
                    format!("input {:?}: dtype {} is not supported", t.name, t.dtype.name()),
                ));
            }
            let input = InputTensor {
                data: decode(t.dtype, &t.data),
                name: t.name,
                shape: t.shape,
            };
            let value = input.to_value().map_err(|e| (FailureCode::Run, e.to_string()))?;
            Ok((input.name, value))
        })
        .collect::<Result<Vec<(String, DynValue)>, Failure>>()?;
    let refs: Vec<(&str, &DynValue)> = values.iter().map(|(n, v)| (n.as_str(), v)).collect();
    let mut session = loaded.session.lock().unwrap_or_else(|p| p.into_inner());
    let outputs = session.run(refs).map_err(|e| (FailureCode::Run, e.to_string()))?;
    let mut headers = Vec::new();
    let mut data = Vec::new();
    for (name, value) in outputs.iter() {
        let raw = raw_tensor(&value).map_err(|e| (FailureCode::Run, format!("output {name:?}: {e}")))?;
        let raw = raw.ok_or_else(|| {
            (
                FailureCode::UnsupportedOutput,
                format!("output {name:?} is not a numeric tensor (a sequence, map or string); it cannot be returned"),
            )
        })?;
        headers.push(TensorHeader {
            name: name.to_string(),
            dtype: raw.dtype,
            shape: raw.shape,
        });
        data.push(raw.bytes);
    }
    Ok((headers, data))
}

/// Element types `eval::dataset::decode` turns into ORT tensors.
pub const SUPPORTED_INPUTS: [NpyDtype; 8] = [
    NpyDtype::Float32,
    NpyDtype::Float64,
    NpyDtype::Float16,
    NpyDtype::Int64,
    NpyDtype::Int32,
    NpyDtype::Int8,
    NpyDtype::Uint8,
    NpyDtype::Bool,
];

fn signature(name: &str, dtype: &ValueType) -> Signature {
    match dtype {
        ValueType::Tensor { ty, shape, .. } => Signature {
            name: name.to_string(),
            dtype: element_name(*ty),
            shape: Some(shape.iter().map(|&d| (d >= 0).then_some(d)).collect()),
        },
        other => Signature {
            name: name.to_string(),
            dtype: format!("{other:?}").to_lowercase(),
            shape: None,
        },
    }
}

fn element_name(ty: ort::value::TensorElementType) -> String {
    use ort::value::TensorElementType as T;
    let dtype = match ty {
        T::Float32 => NpyDtype::Float32,
        T::Float64 => NpyDtype::Float64,
        T::Float16 => NpyDtype::Float16,
        T::Int64 => NpyDtype::Int64,
        T::Int32 => NpyDtype::Int32,
        T::Int16 => NpyDtype::Int16,
        T::Int8 => NpyDtype::Int8,
        T::Uint8 => NpyDtype::Uint8,
        T::Uint16 => NpyDtype::Uint16,
        T::Uint32 => NpyDtype::Uint32,
        T::Uint64 => NpyDtype::Uint64,
        T::Bool => NpyDtype::Bool,
        other => return format!("{other:?}").to_lowercase(),
    };
    dtype.name().to_string()
}

/// This process's resident set (bytes), from /proc/self/statm.
fn resident_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page.max(0) as u64
}
