//! The messages between the API process and an inference worker process, over the worker's
//! stdin/stdout. A frame is a JSON header (u32 little-endian length first) and a binary payload
//! (u64 length first): tensors travel as raw little-endian bytes, so a request costs one copy,
//! not a text encoding of every number.

use std::io::{self, Read, Write};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::eval::Provider;
use crate::eval::npz::NpyDtype;

/// Largest header a peer may send; a longer one means the stream is corrupt.
const MAX_HEADER_BYTES: u32 = 16 << 20;
/// Largest payload; above any body the API accepts.
const MAX_PAYLOAD_BYTES: u64 = 8 << 30;

/// A tensor's description in a header; its bytes follow in the payload, in header order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorHeader {
    pub name: String,
    pub dtype: NpyDtype,
    pub shape: Vec<i64>,
}

/// A tensor with its little-endian element bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub dtype: NpyDtype,
    pub shape: Vec<i64>,
    pub data: Vec<u8>,
}

impl Tensor {
    pub fn elements(&self) -> u64 {
        self.shape.iter().map(|&d| d.max(0) as u64).product()
    }
}

/// One input or output as the session declares it. `dtype` is the numpy name (`float32`), or the
/// ONNX type's own name for types a request cannot carry; dimensions are `None` when dynamic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signature {
    pub name: String,
    pub dtype: String,
    /// `None` for values that are not tensors (sequences, maps).
    pub shape: Option<Vec<Option<i64>>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Creates the session for `key` from `path` unless it exists.
    Load {
        id: u64,
        key: String,
        path: PathBuf,
        provider: Provider,
        intra_op_threads: usize,
    },
    /// Runs the session `key` on the payload's tensors.
    Run {
        id: u64,
        key: String,
        inputs: Vec<TensorHeader>,
    },
    /// Drops the session `key` (runs in flight finish first).
    Unload { id: u64, key: String },
}

impl Request {
    pub fn id(&self) -> u64 {
        match self {
            Request::Load { id, .. } | Request::Run { id, .. } | Request::Unload { id, .. } => *id,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Loaded {
        id: u64,
        inputs: Vec<Signature>,
        outputs: Vec<Signature>,
        /// How much the worker's resident set grew while loading (at least the file's size).
        memory_bytes: u64,
    },
    Ran {
        id: u64,
        outputs: Vec<TensorHeader>,
        run_ms: f64,
    },
    Unloaded {
        id: u64,
    },
    Failed {
        id: u64,
        code: FailureCode,
        message: String,
    },
}

impl Reply {
    pub fn id(&self) -> u64 {
        match self {
            Reply::Loaded { id, .. } | Reply::Ran { id, .. } | Reply::Unloaded { id } | Reply::Failed { id, .. } => *id,
        }
    }
}

/// Why a worker refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureCode {
    /// ONNX Runtime cannot load the model.
    ModelLoad,
    /// The requested execution provider cannot be used.
    ProviderUnavailable,
    /// ONNX Runtime refused the inputs or failed while running.
    Run,
    /// An output is not a numeric tensor.
    UnsupportedOutput,
    /// No session under that key (unloaded meanwhile).
    NotLoaded,
    /// The request itself was malformed.
    Protocol,
}

pub fn write_frame<H: Serialize>(w: &mut impl Write, header: &H, payload: &[&[u8]]) -> io::Result<()> {
    let header = serde_json::to_vec(header).map_err(io::Error::other)?;
    let total: u64 = payload.iter().map(|p| p.len() as u64).sum();
    w.write_all(&(header.len() as u32).to_le_bytes())?;
    w.write_all(&header)?;
    w.write_all(&total.to_le_bytes())?;
    for part in payload {
        w.write_all(part)?;
    }
    w.flush()
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub fn read_frame<H: for<'de> Deserialize<'de>>(r: &mut impl Read) -> io::Result<Option<(H, Vec<u8>)>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len);
    if len > MAX_HEADER_BYTES {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "frame header too long"));
    }
    let mut header = vec![0u8; len as usize];
    r.read_exact(&mut header)?;
    let header = serde_json::from_slice(&header).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut size = [0u8; 8];
    r.read_exact(&mut size)?;
    let size = u64::from_le_bytes(size);
    if size > MAX_PAYLOAD_BYTES {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "frame payload too long"));
    }
    let mut payload = vec![0u8; size as usize];
    r.read_exact(&mut payload)?;
    Ok(Some((header, payload)))
}

/// Splits a payload into the tensors `headers` describe, checking that the sizes add up.
pub fn split_payload(headers: &[TensorHeader], payload: Vec<u8>) -> Result<Vec<Tensor>, String> {
    let mut at = 0usize;
    let mut tensors = Vec::with_capacity(headers.len());
    for h in headers {
        if h.shape.iter().any(|&d| d < 0) {
            return Err(format!("tensor {:?} has a negative dimension", h.name));
        }
        let bytes = h
            .shape
            .iter()
            .try_fold(h.dtype.size(), |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| format!("tensor {:?} is too large", h.name))? as usize;
        let end = at
            .checked_add(bytes)
            .filter(|&e| e <= payload.len())
            .ok_or_else(|| format!("the payload ends inside tensor {:?}", h.name))?;
        tensors.push(Tensor {
            name: h.name.clone(),
            dtype: h.dtype,
            shape: h.shape.clone(),
            data: payload[at..end].to_vec(),
        });
        at = end;
    }
    if at != payload.len() {
        return Err("the payload is longer than its tensors".into());
    }
    Ok(tensors)
}

pub fn headers_of(tensors: &[Tensor]) -> Vec<TensorHeader> {
    tensors
        .iter()
        .map(|t| TensorHeader {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_with_their_tensors() {
        let tensors = vec![
            Tensor {
                name: "x".into(),
                dtype: NpyDtype::Float32,
                shape: vec![2],
                data: [1.5f32, -2.0].iter().flat_map(|v| v.to_le_bytes()).collect(),
            },
            Tensor {
                name: "n".into(),
                dtype: NpyDtype::Int64,
                shape: vec![],
                data: 7i64.to_le_bytes().to_vec(),
            },
        ];
        let request = Request::Run {
            id: 9,
            key: "k".into(),
            inputs: headers_of(&tensors),
        };
        let mut wire = Vec::new();
        let parts: Vec<&[u8]> = tensors.iter().map(|t| t.data.as_slice()).collect();
        write_frame(&mut wire, &request, &parts).unwrap();
        let mut r = wire.as_slice();
        let (back, payload): (Request, Vec<u8>) = read_frame(&mut r).unwrap().unwrap();
        let Request::Run { id: 9, inputs, .. } = back else {
            panic!("wrong request back")
        };
        assert_eq!(split_payload(&inputs, payload).unwrap(), tensors);
        assert!(read_frame::<Request>(&mut r).unwrap().is_none(), "clean end of stream");
    }

    #[test]
    fn payloads_that_disagree_with_their_headers_are_refused() {
        let h = vec![TensorHeader {
            name: "x".into(),
            dtype: NpyDtype::Float32,
            shape: vec![3],
        }];
        assert!(split_payload(&h, vec![0; 8]).unwrap_err().contains("ends inside"));
        assert!(split_payload(&h, vec![0; 16]).unwrap_err().contains("longer"));
    }
}
