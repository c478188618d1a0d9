//! External data: tensors whose bytes live in files next to the model (`external_data` entries
//! `location`, `offset`, `length`). Every location is checked before anything reads it: it must be a
//! relative path inside the model's folder, also after following symlinks, and the byte range must
//! lie inside the file. This is the path-traversal class of bugs the Python `onnx` package has had
//! CVEs for; a model can name any file it likes, so nothing here trusts it.

use std::collections::BTreeSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};

use super::proto::tensor_proto::DataLocation;
use super::proto::{ModelProto, StringStringEntryProto, TensorProto};
use super::tensor::{checked_elements, for_each_tensor, for_each_tensor_mut, is_external, raw_byte_len};
use super::{OnnxError, Result};

/// ONNX's own limit: a protobuf message cannot exceed 2 GiB.
pub const PROTOBUF_LIMIT: u64 = 2 * 1024 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalRef {
    pub location: String,
    pub offset: u64,
    pub length: Option<u64>,
}

fn err(at: impl std::fmt::Display, t: &TensorProto, what: impl std::fmt::Display) -> OnnxError {
    OnnxError::Invalid(format!("{at}: tensor {:?}: external data {what}", t.name()))
}

/// Reads a tensor's `external_data` entries and checks them without touching the filesystem.
pub fn parse_ref(t: &TensorProto, at: impl std::fmt::Display) -> Result<ExternalRef> {
    let at = &at;
    let get = |key: &str| t.external_data.iter().find(|e| e.key() == key).map(|e| e.value());
    let location = get("location").ok_or_else(|| err(at, t, "has no location"))?;
    check_location(location).map_err(|why| err(at, t, format!("location {location:?} {why}")))?;
    let number = |key: &str| -> Result<Option<u64>> {
        get(key)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| err(at, t, format!("{key} {v:?} is not a byte count")))
            })
            .transpose()
    };
    let offset = number("offset")?.unwrap_or(0);
    let length = number("length")?;
    let elements = checked_elements(t, at)?;
    if let (Some(length), Some(expected)) = (length, raw_byte_len(t.data_type(), elements))
        && length != expected
    {
        return Err(err(
            at,
            t,
            format!("length {length} does not match the declared {expected} bytes"),
        ));
    }
    Ok(ExternalRef {
        location: location.to_string(),
        offset,
        length,
    })
}

/// A location must be a plain relative path: not empty, not absolute, no `..`, no backslashes or
/// drive letters (Windows paths), no NUL.
pub fn check_location(location: &str) -> std::result::Result<(), &'static str> {
    if location.is_empty() {
        return Err("is empty");
    }
    if location.contains('\0') || location.contains('\\') {
        return Err("contains a backslash or NUL");
    }
    // ONNX Runtime reads tensors "located" here from a raw process memory address (offset); a
    // model from outside must never get that.
    if location.contains("_ORT_MEM_ADDR_") {
        return Err("is ONNX Runtime's in-memory data marker");
    }
    if location.len() >= 2 && location.as_bytes()[1] == b':' {
        return Err("is a drive-letter path");
    }
    for c in Path::new(location).components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err("contains '..'"),
            Component::RootDir | Component::Prefix(_) => return Err("is absolute"),
        }
    }
    Ok(())
}

/// Checks every external reference syntactically (no filesystem access).
pub fn check_syntax(model: &ModelProto) -> Result<()> {
    for_each_tensor(model, &mut |t, at| {
        if is_external(t) {
            parse_ref(t, at)?;
        }
        Ok(())
    })
}

/// Checks every external reference against the files in `dir`: each resolves (through symlinks)
/// to a regular file inside `dir`, and its byte range lies inside the file. Returns the distinct
/// relative locations referenced.
pub fn check(model: &ModelProto, dir: &Path) -> Result<BTreeSet<String>> {
    let root = dir.canonicalize().map_err(|source| OnnxError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let mut used = BTreeSet::new();
    for_each_tensor(model, &mut |t, at| {
        if !is_external(t) {
            return Ok(());
        }
        let r = parse_ref(t, at)?;
        let file = resolve(&root, &r.location).map_err(|why| err(at, t, format!("location {:?} {why}", r.location)))?;
        let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        let length = match r.length {
            Some(l) => l,
            None => size.saturating_sub(r.offset),
        };
        if r.offset.checked_add(length).is_none_or(|end| end > size) {
            return Err(err(
                at,
                t,
                format!(
                    "range {}..{} lies past the end of {:?} ({size} bytes)",
                    r.offset,
                    r.offset.saturating_add(length),
                    r.location
                ),
            ));
        }
        used.insert(r.location);
        Ok(())
    })?;
    Ok(used)
}

/// `root.join(location)`, canonicalized, if it is a regular file inside `root`.
fn resolve(root: &Path, location: &str) -> std::result::Result<PathBuf, String> {
    let path = root
        .join(location)
        .canonicalize()
        .map_err(|_| "names a file that is not there".to_string())?;
    if !path.starts_with(root) {
        return Err("resolves outside the model's folder".into());
    }
    if !path.is_file() {
        return Err("is not a regular file".into());
    }
    Ok(path)
}

/// Reads one external tensor's bytes (after [`check`]).
pub fn read(t: &TensorProto, dir: &Path) -> Result<Vec<u8>> {
    let r = parse_ref(t, "model")?;
    let root = dir.canonicalize().map_err(|source| OnnxError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let path = resolve(&root, &r.location).map_err(|why| err("model", t, why))?;
    let io = |source| OnnxError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::File::open(&path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    let length = r.length.unwrap_or(size.saturating_sub(r.offset));
    if r.offset.saturating_add(length) > size {
        return Err(err("model", t, "range lies past the end of the file"));
    }
    file.seek(SeekFrom::Start(r.offset)).map_err(io)?;
    let mut buf = vec![0u8; length as usize];
    file.read_exact(&mut buf).map_err(io)?;
    Ok(buf)
}

/// Moves every external tensor's bytes into the model (`raw_data`), so passes can edit it alone.
pub fn internalize(model: &mut ModelProto, dir: &Path) -> Result<()> {
    check(model, dir)?;
    for_each_tensor_mut(model, &mut |t| {
        if is_external(t) {
            t.raw_data = Some(read(t, dir)?.into());
            t.external_data.clear();
            t.data_location = None;
        }
        Ok(())
    })
}

/// Makes `t` an external tensor whose bytes are `offset..offset+length` of `location` (its inline
/// data is dropped).
pub fn point_to(t: &mut TensorProto, location: &str, offset: u64, length: u64) {
    t.raw_data = None;
    t.data_location = Some(DataLocation::External as i32);
    t.external_data = [
        ("location", location.to_string()),
        ("offset", offset.to_string()),
        ("length", length.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| StringStringEntryProto {
        key: Some(k.into()),
        value: Some(v),
    })
    .collect();
}

/// Writes `model` to `path`. Tensors of at least `min_bytes` move to one data file beside it
/// (`<file name>.data`, each tensor 64-byte aligned) when `min_bytes` is given, or automatically
/// when the model would not fit in one protobuf.
pub fn save(model: &ModelProto, path: &Path, min_bytes: Option<u64>) -> Result<()> {
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |source| OnnxError::Io { path: p, source }
    };
    let threshold = match min_bytes {
        Some(m) => Some(m),
        None if (prost::Message::encoded_len(model) as u64) >= PROTOBUF_LIMIT => Some(1024),
        None => None,
    };
    let Some(threshold) = threshold else {
        return super::sink::write(model, path).map_err(io(path));
    };
    let file_name = path
        .file_name()
        .map(|n| format!("{}.data", n.to_string_lossy()))
        .unwrap_or_else(|| "model.onnx.data".into());
    let data_path = path.with_file_name(&file_name);
    let mut data = std::io::BufWriter::new(std::fs::File::create(&data_path).map_err(io(&data_path))?);
    let mut offset = 0u64;
    let mut model = model.clone();
    for_each_tensor_mut(&mut model, &mut |t| {
        let Some(raw) = t.raw_data.as_ref().filter(|r| r.len() as u64 >= threshold) else {
            return Ok(());
        };
        let pad = offset.next_multiple_of(64) - offset;
        data.write_all(&vec![0u8; pad as usize]).map_err(io(&data_path))?;
        offset += pad;
        data.write_all(raw).map_err(io(&data_path))?;
        let length = raw.len() as u64;
        point_to(t, &file_name, offset, length);
        offset += length;
        Ok(())
    })?;
    data.flush().map_err(io(&data_path))?;
    super::sink::write(&model, path).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder;

    fn point_w1_at(model: &mut ModelProto, location: &str, offset: u64, length: u64) {
        point_to(
            &mut model.graph.as_mut().unwrap().initializer[0],
            location,
            offset,
            length,
        );
    }

    #[test]
    fn locations_must_be_plain_relative_paths() {
        for ok in ["w.bin", "weights/w.bin", "./w.bin", "model.onnx.data"] {
            assert_eq!(check_location(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "../x",
            "a/../../x",
            "/etc/passwd",
            "C:\\x",
            "c:x",
            "a\\..\\b",
            "x\0y",
        ] {
            assert!(check_location(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn a_model_saved_with_external_data_loads_back_identically() {
        let dir = tempfile::tempdir().unwrap();
        let model = builder::tiny_mlp(3);
        let path = dir.path().join("m.onnx");
        save(&model, &path, Some(64)).unwrap();
        assert!(dir.path().join("m.onnx.data").exists());
        let mut loaded = crate::onnx::load(&path).unwrap();
        assert_ne!(loaded, model, "the weights are external now");
        internalize(&mut loaded, dir.path()).unwrap();
        assert_eq!(loaded, model);
    }

    #[test]
    fn traversal_symlinks_and_ranges_past_the_end_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), vec![0u8; 4096]).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("link.bin")).unwrap();
        std::fs::write(dir.path().join("small.bin"), vec![0u8; 100]).unwrap();
        let w1_bytes = (builder::MLP_IN * builder::MLP_HIDDEN * 4) as u64;
        let cases = [
            ("../secret", 0, "'..'"),
            ("/etc/passwd", 0, "absolute"),
            ("link.bin", 0, "outside the model's folder"),
            ("missing.bin", 0, "not there"),
            ("small.bin", 0, "past the end"),
        ];
        for (location, offset, expected) in cases {
            let mut model = builder::tiny_mlp(1);
            point_w1_at(&mut model, location, offset, w1_bytes);
            let err = check(&model, dir.path()).unwrap_err().to_string();
            assert!(err.contains(expected) && err.contains("\"w1\""), "{location}: {err}");
        }
    }
}
