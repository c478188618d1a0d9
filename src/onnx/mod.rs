//! ONNX models: protobuf types generated from `proto/onnx.proto`, loading with validation, and the
//! model summary. Nothing here knows about the database, HTTP or ONNX Runtime.

pub mod builder;
pub mod bundle;
pub mod domains;
pub mod dtype;
pub mod external;
pub mod graph;
pub mod sink;
pub mod summary;
pub mod tensor;
pub mod upgrade;
pub mod wire;

use std::path::Path;

use prost::Message;

/// Generated ONNX protobuf types (`ModelProto`, `GraphProto`, ...).
#[allow(clippy::all, clippy::pedantic)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

pub use proto::ModelProto;
pub use summary::{Dim, ModelSummary, TensorSignature};

/// Nesting deeper than this (If/Loop/Scan bodies inside bodies) is refused rather than recursed.
pub const MAX_SUBGRAPH_DEPTH: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("not a valid ONNX protobuf: {}", shorten(&.0.to_string()))]
    Decode(#[from] prost::DecodeError),
    #[error("invalid ONNX model: {0}")]
    Invalid(String),
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = OnnxError> = std::result::Result<T, E>;

/// prost names every enclosing field in a decode error; for deeply nested input that is thousands
/// of characters. Keep the start (what failed) and the end (where).
fn shorten(message: &str) -> String {
    const KEEP: usize = 160;
    if message.len() <= 2 * KEEP + 5 {
        return message.to_string();
    }
    let head = message.char_indices().nth(KEEP).map_or(message.len(), |(i, _)| i);
    let tail = message.char_indices().rev().nth(KEEP).map_or(0, |(i, _)| i);
    format!("{} ... {}", &message[..head], &message[tail..])
}

/// Checks the top-level protobuf framing of a model file without reading it into memory: every
/// field must be a known `ModelProto` field with its wire type, and every length must fit in the
/// file. Random bytes and most truncations fail within the first few bytes read, before an upload
/// costs memory the size of the file.
pub fn precheck(path: &Path) -> Result<()> {
    use std::io::{BufRead, BufReader, Seek, SeekFrom};
    let io = |source| OnnxError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut r = BufReader::new(file);
    let bad = |what: String| OnnxError::Invalid(format!("not an ONNX model: {what}"));
    let mut pos = 0u64;
    let varint = |r: &mut BufReader<std::fs::File>, pos: &mut u64| -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = match r.fill_buf().map_err(io)?.first() {
                Some(&b) => b,
                None => return Err(bad(format!("the file ends inside a field header at byte {pos}"))),
            };
            r.consume(1);
            *pos += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(bad(format!("a malformed varint at byte {pos}")))
    };
    while pos < len {
        let key = varint(&mut r, &mut pos)?;
        let (field, wire) = (key >> 3, key & 7);
        // ModelProto: varints 1 (ir_version) and 5 (model_version); everything else is
        // length-delimited (strings, the graph, repeated messages).
        let expected = match field {
            1 | 5 => 0,
            2 | 3 | 4 | 6 | 7 | 8 | 14 | 20 | 25 | 26 => 2,
            _ => return Err(bad(format!("unknown top-level field {field} at byte {pos}"))),
        };
        if wire != expected {
            return Err(bad(format!("field {field} has wire type {wire} at byte {pos}")));
        }
        if wire == 0 {
            varint(&mut r, &mut pos)?;
        } else {
            let n = varint(&mut r, &mut pos)?;
            if pos.checked_add(n).is_none_or(|end| end > len) {
                return Err(bad(format!(
                    "field {field} claims {n} bytes at byte {pos} but the file has {len}"
                )));
            }
            pos += n;
            r.seek(SeekFrom::Start(pos)).map_err(io)?;
        }
    }
    Ok(())
}

/// Decodes and validates a model held in memory (its tensor data is copied out of `bytes`).
pub fn decode(bytes: &[u8]) -> Result<ModelProto> {
    let model = ModelProto::decode(bytes)?;
    validate(&model)?;
    Ok(model)
}

/// Decodes and validates a model from a buffer it may keep: tensor data shares the buffer instead
/// of being copied, so a model costs about its file size in memory.
pub fn decode_shared(bytes: bytes::Bytes) -> Result<ModelProto> {
    let model = ModelProto::decode(bytes)?;
    validate(&model)?;
    Ok(model)
}

/// Reads a model file and decodes it sharing the file's bytes (no external-data check).
pub fn read(path: &Path) -> Result<ModelProto> {
    let bytes = std::fs::read(path).map_err(|source| OnnxError::Io {
        path: path.display().to_string(),
        source,
    })?;
    decode_shared(bytes.into())
}

/// Maps a model file into memory and decodes it over the mapping: weights are neither copied nor
/// read until a pass touches them, so loading costs the graph's size, not the file's.
///
/// Only for job processes, which own their input files: were a file truncated while mapped, reading
/// past its new end would kill the process with SIGBUS (a job attempt that is then retried; never the
/// API, which uses [`read`]).
pub fn read_mapped(path: &Path) -> Result<ModelProto> {
    let io = |source| OnnxError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    if file.metadata().map_err(io)?.len() == 0 {
        // An empty file cannot be mapped; it decodes (and fails validation) like any other.
        return decode(&[]);
    }
    // SAFETY: the mapping is read-only and lives as long as the `Bytes` that share it; the caveat
    // on concurrent truncation is documented above.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
    decode_shared(bytes::Bytes::from_owner(map))
}

/// Reads (mapped, see [`read_mapped`]), decodes and validates a model file, and checks its external
/// data files (if any) in the model's folder.
pub fn load(path: &Path) -> Result<ModelProto> {
    let model = read_mapped(path)?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    external::check(&model, dir)?;
    Ok(model)
}

pub fn encode(model: &ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

/// Structural checks that catch files which decode as protobuf but are not models: random bytes and
/// truncated files usually decode into a message without a graph or without an opset. Operator-level
/// checks are left to ONNX Runtime, which the job runs before anything else.
fn validate(model: &ModelProto) -> Result<()> {
    let invalid = |msg: String| Err(OnnxError::Invalid(msg));
    let ir_version = model.ir_version.unwrap_or(0);
    if ir_version <= 0 {
        return invalid(format!(
            "ir_version is {ir_version}; a model must declare ir_version >= 1"
        ));
    }
    let Some(graph) = model.graph.as_ref() else {
        return invalid("the model has no graph".into());
    };
    if ir_version >= 3 && model.opset_import.is_empty() {
        return invalid("the model imports no operator set (opset_import is empty)".into());
    }
    for opset in &model.opset_import {
        if opset.version.unwrap_or(0) <= 0 {
            return invalid(format!(
                "opset_import for domain {:?} has version {}",
                opset.domain(),
                opset.version.unwrap_or(0)
            ));
        }
    }
    if graph.output.is_empty() {
        return invalid("the graph declares no outputs".into());
    }
    validate_graph(graph, "graph", 0)?;
    tensor::for_each_tensor(model, &mut |t, at| tensor::check_inline(t, at))?;
    external::check_syntax(model)
}

fn validate_graph(graph: &proto::GraphProto, at: &str, depth: usize) -> Result<()> {
    if depth > MAX_SUBGRAPH_DEPTH {
        return Err(OnnxError::Invalid(format!(
            "{at}: subgraphs nested deeper than {MAX_SUBGRAPH_DEPTH} levels"
        )));
    }
    for (i, node) in graph.node.iter().enumerate() {
        if node.op_type().is_empty() {
            return Err(OnnxError::Invalid(format!(
                "{at}: node {i} ({:?}) has no op_type",
                node.name()
            )));
        }
        for attr in &node.attribute {
            let sub_at = format!("{at}/{}:{}", node.name(), attr.name());
            if let Some(g) = attr.g.as_ref() {
                validate_graph(g, &sub_at, depth + 1)?;
            }
            for g in &attr.graphs {
                validate_graph(g, &sub_at, depth + 1)?;
            }
        }
    }
    Ok(())
}

/// Calls `f` on the graph and on every subgraph under it (bounded by [`MAX_SUBGRAPH_DEPTH`], which
/// [`decode`] has enforced).
pub fn for_each_graph<'a>(graph: &'a proto::GraphProto, f: &mut dyn FnMut(&'a proto::GraphProto)) {
    f(graph);
    for node in &graph.node {
        for attr in &node.attribute {
            if let Some(g) = attr.g.as_ref() {
                for_each_graph(g, f);
            }
            for g in &attr.graphs {
                for_each_graph(g, f);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_model_round_trips_through_the_codec() {
        let model = builder::tiny_mlp(7);
        let bytes = encode(&model);
        let back = decode(&bytes).unwrap();
        assert_eq!(back, model);
        assert_eq!(encode(&back), bytes);
    }

    #[test]
    fn random_text_is_not_a_model() {
        let err = decode(b"this is certainly not an onnx model, just some text").unwrap_err();
        assert!(matches!(err, OnnxError::Decode(_) | OnnxError::Invalid(_)), "{err}");
    }

    #[test]
    fn an_empty_file_is_not_a_model() {
        let err = decode(b"").unwrap_err();
        assert!(err.to_string().contains("ir_version"), "{err}");
    }

    #[test]
    fn the_precheck_passes_real_framing_and_stops_garbage_and_truncation_early() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        let bytes = encode(&builder::tiny_mlp(2));
        std::fs::write(&path, &bytes).unwrap();
        precheck(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        assert!(precheck(&path).unwrap_err().to_string().contains("claims"));
        std::fs::write(&path, b"\xff\xff\xff garbage").unwrap();
        assert!(precheck(&path).is_err());
        std::fs::write(&path, b"hello world, not a model").unwrap();
        assert!(precheck(&path).is_err());
    }

    #[test]
    fn every_truncation_of_a_model_is_rejected() {
        let bytes = encode(&builder::tiny_mlp(1));
        for len in 0..bytes.len() {
            assert!(
                decode(&bytes[..len]).is_err(),
                "a model cut at {len} of {} bytes was accepted",
                bytes.len()
            );
        }
    }
}
