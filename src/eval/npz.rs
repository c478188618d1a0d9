//! NumPy `.npz` datasets: a zip of `.npy` arrays. Read without Python and without trusting the
//! file: object arrays (which need pickle) are refused, members are capped while they expand, and
//! every header is checked against the bytes that follow it. Members are unpacked to `.npy` files
//! so samples can be read one at a time with bounded memory.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum NpzError {
    #[error("{0}")]
    Invalid(String),
    #[error("the dataset expands past the {limit}-byte limit")]
    TooLarge { limit: u64 },
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

fn invalid(msg: impl Into<String>) -> NpzError {
    NpzError::Invalid(msg.into())
}

/// Element types a dataset may hold (numpy names; the same names the model summary uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NpyDtype {
    Float32,
    Float64,
    Float16,
    Int64,
    Int32,
    Int16,
    Int8,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Bool,
}

impl NpyDtype {
    fn from_descr(descr: &str) -> Result<NpyDtype, NpzError> {
        let (order, code) = descr.split_at(descr.len().min(1));
        if code.starts_with('O') {
            return Err(invalid(
                "object arrays (which numpy stores with pickle) are not accepted",
            ));
        }
        let single_byte = matches!(code, "u1" | "i1" | "b1");
        if order == ">" && !single_byte {
            return Err(invalid(format!(
                "big-endian arrays ({descr}) are not supported; save little-endian"
            )));
        }
        let known_order = matches!(order, "<" | "|" | "=") || (order == ">" && single_byte);
        if !known_order {
            return Err(invalid(format!("unknown dtype {descr:?}")));
        }
        Ok(match code {
            "f4" => NpyDtype::Float32,
            "f8" => NpyDtype::Float64,
            "f2" => NpyDtype::Float16,
            "i8" => NpyDtype::Int64,
            "i4" => NpyDtype::Int32,
            "i2" => NpyDtype::Int16,
            "i1" => NpyDtype::Int8,
            "u1" => NpyDtype::Uint8,
            "u2" => NpyDtype::Uint16,
            "u4" => NpyDtype::Uint32,
            "u8" => NpyDtype::Uint64,
            "b1" => NpyDtype::Bool,
            _ => return Err(invalid(format!("dtype {descr:?} is not supported"))),
        })
    }

    pub fn size(self) -> u64 {
        match self {
            NpyDtype::Float64 | NpyDtype::Int64 | NpyDtype::Uint64 => 8,
            NpyDtype::Float32 | NpyDtype::Int32 | NpyDtype::Uint32 => 4,
            NpyDtype::Float16 | NpyDtype::Int16 | NpyDtype::Uint16 => 2,
            NpyDtype::Int8 | NpyDtype::Uint8 | NpyDtype::Bool => 1,
        }
    }

    /// The dtype with this numpy name (`float32`), as model signatures name their types.
    pub fn from_name(name: &str) -> Option<NpyDtype> {
        const ALL: [NpyDtype; 12] = [
            NpyDtype::Float32,
            NpyDtype::Float64,
            NpyDtype::Float16,
            NpyDtype::Int64,
            NpyDtype::Int32,
            NpyDtype::Int16,
            NpyDtype::Int8,
            NpyDtype::Uint8,
            NpyDtype::Uint16,
            NpyDtype::Uint32,
            NpyDtype::Uint64,
            NpyDtype::Bool,
        ];
        ALL.into_iter().find(|d| d.name() == name)
    }

    /// numpy's type string for writing `.npy` headers (`<f4`).
    pub fn descr(self) -> &'static str {
        match self {
            NpyDtype::Float32 => "<f4",
            NpyDtype::Float64 => "<f8",
            NpyDtype::Float16 => "<f2",
            NpyDtype::Int64 => "<i8",
            NpyDtype::Int32 => "<i4",
            NpyDtype::Int16 => "<i2",
            NpyDtype::Int8 => "|i1",
            NpyDtype::Uint8 => "|u1",
            NpyDtype::Uint16 => "<u2",
            NpyDtype::Uint32 => "<u4",
            NpyDtype::Uint64 => "<u8",
            NpyDtype::Bool => "|b1",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            NpyDtype::Float32 => "float32",
            NpyDtype::Float64 => "float64",
            NpyDtype::Float16 => "float16",
            NpyDtype::Int64 => "int64",
            NpyDtype::Int32 => "int32",
            NpyDtype::Int16 => "int16",
            NpyDtype::Int8 => "int8",
            NpyDtype::Uint8 => "uint8",
            NpyDtype::Uint16 => "uint16",
            NpyDtype::Uint32 => "uint32",
            NpyDtype::Uint64 => "uint64",
            NpyDtype::Bool => "bool",
        }
    }
}

/// One array: its name in the archive, element type, shape, and where its data starts in its
/// unpacked `.npy` file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NpyArray {
    pub name: String,
    pub dtype: NpyDtype,
    pub shape: Vec<u64>,
    #[serde(skip)]
    pub path: PathBuf,
    #[serde(skip)]
    pub data_offset: u64,
}

impl NpyArray {
    pub fn elements(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Leading-axis length: how many samples the array holds.
    pub fn samples(&self) -> u64 {
        self.shape.first().copied().unwrap_or(0)
    }

    /// Bytes of one sample (the array without its leading axis).
    pub fn sample_bytes(&self) -> u64 {
        self.shape.iter().skip(1).product::<u64>() * self.dtype.size()
    }

    /// The whole array (scalars included) as raw little-endian bytes.
    pub fn read_all(&self) -> Result<Vec<u8>, NpzError> {
        let mut file = std::fs::File::open(&self.path)?;
        file.seek(SeekFrom::Start(self.data_offset))?;
        let mut buf = vec![0u8; (self.elements() * self.dtype.size()) as usize];
        file.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// Reads samples `start..start+count` as raw little-endian bytes.
    pub fn read_samples(&self, start: u64, count: u64) -> Result<Vec<u8>, NpzError> {
        if start + count > self.samples() {
            return Err(invalid(format!(
                "{}: samples {start}..{} out of range",
                self.name,
                start + count
            )));
        }
        let mut file = std::fs::File::open(&self.path)?;
        file.seek(SeekFrom::Start(self.data_offset + start * self.sample_bytes()))?;
        let mut buf = vec![0u8; (count * self.sample_bytes()) as usize];
        file.read_exact(&mut buf)?;
        Ok(buf)
    }
}

/// numpy's own cap (`max_header_size`, numpy >= 1.24): a header past it is an attack on the parser,
/// not an array anyone saved.
pub const MAX_HEADER_BYTES: u64 = 10_000;

/// Parses an `.npy` header from the start of `r`; returns (dtype, shape, data offset).
pub fn parse_header(r: &mut impl Read) -> Result<(NpyDtype, Vec<u64>, u64), NpzError> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)
        .map_err(|_| invalid("not a .npy array (too short)"))?;
    if &magic[..6] != b"\x93NUMPY" {
        return Err(invalid("not a .npy array (bad magic)"));
    }
    let (len, prefix) = match magic[6] {
        1 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b)?;
            (u16::from_le_bytes(b) as u64, 10)
        }
        2 | 3 => {
            let mut b = [0u8; 4];
            r.read_exact(&mut b)?;
            (u32::from_le_bytes(b) as u64, 12)
        }
        v => return Err(invalid(format!("unsupported .npy version {v}"))),
    };
    if len > MAX_HEADER_BYTES {
        return Err(invalid(format!(
            "the .npy header is {len} bytes; numpy itself refuses headers over {MAX_HEADER_BYTES}"
        )));
    }
    let mut header = vec![0u8; len as usize];
    r.read_exact(&mut header)?;
    let header = String::from_utf8(header).map_err(|_| invalid("the .npy header is not text"))?;
    let field = |key: &str| -> Result<&str, NpzError> {
        let at = header
            .find(&format!("'{key}':"))
            .ok_or_else(|| invalid(format!("the .npy header has no '{key}'")))?;
        Ok(header[at + key.len() + 3..].trim_start())
    };
    let descr = field("descr")?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|d| d.split('\'').next())
        .ok_or_else(|| invalid("structured dtypes are not supported"))?;
    let dtype = NpyDtype::from_descr(descr)?;
    if field("fortran_order")?.starts_with("True") {
        return Err(invalid(
            "Fortran-ordered arrays are not supported; save with np.ascontiguousarray",
        ));
    }
    let shape_text = field("shape")?;
    let inner = shape_text
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| invalid("the .npy header's shape is malformed"))?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u64>()
                .map_err(|_| invalid(format!("bad dimension {s:?} in the .npy header")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((dtype, shape, prefix + len))
}

/// Unpacks `npz` into `dest` (one `.npy` per member), writing at most `max_bytes`, and checks each
/// member. Arrays come back sorted by name.
pub fn unpack(npz: &Path, dest: &Path, max_bytes: u64) -> Result<Vec<NpyArray>, NpzError> {
    let file = std::fs::File::open(npz)?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| invalid(format!("not a valid .npz (zip) file: {e}")))?;
    if zip.len() > 1000 {
        return Err(invalid("the dataset has more than 1000 arrays"));
    }
    let mut budget = max_bytes;
    let mut arrays = Vec::new();
    for i in 0..zip.len() {
        let mut member = zip
            .by_index(i)
            .map_err(|e| invalid(format!("reading member {i}: {e}")))?;
        let name = array_name(member.name())?;
        let path = dest.join(format!("{i}.npy"));
        let mut out = std::fs::File::create_new(&path)?;
        let written = std::io::copy(&mut (&mut member).take(budget.saturating_add(1)), &mut out)?;
        if written > budget {
            return Err(NpzError::TooLarge { limit: max_bytes });
        }
        budget -= written;
        let (dtype, shape, data_offset) =
            parse_header(&mut std::fs::File::open(&path)?).map_err(|e| invalid(format!("array {name:?}: {e}")))?;
        let array = NpyArray {
            name,
            dtype,
            shape,
            path,
            data_offset,
        };
        check_size(&array, written.saturating_sub(data_offset))?;
        arrays.push(array);
    }
    arrays.sort_by(|a, b| a.name.cmp(&b.name));
    if arrays.windows(2).any(|w| w[0].name == w[1].name) {
        return Err(invalid("the dataset holds two arrays with the same name"));
    }
    Ok(arrays)
}

/// The array name of a zip member: `name.npy`, with no path separators or odd bytes.
fn array_name(member_name: &str) -> Result<String, NpzError> {
    member_name
        .strip_suffix(".npy")
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b'\\'))
        .map(str::to_string)
        .ok_or_else(|| invalid(format!("member {member_name:?} is not a plain .npy array")))
}

/// The data after a header must be exactly what its dtype and shape declare.
fn check_size(array: &NpyArray, data_bytes: u64) -> Result<(), NpzError> {
    let declared = array.elements() * array.dtype.size();
    if data_bytes != declared {
        return Err(invalid(format!(
            "array {:?} declares shape {:?} ({declared} bytes of data) but holds {data_bytes} bytes",
            array.name, array.shape
        )));
    }
    Ok(())
}

/// Reads a small `.npz` held in memory (a request body), with the same checks as `unpack`:
/// each array with its data bytes, sorted by name. Nothing touches the disk.
pub fn read_in_memory(bytes: &[u8], max_bytes: u64) -> Result<Vec<(NpyArray, Vec<u8>)>, NpzError> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| invalid(format!("not a valid .npz (zip) file: {e}")))?;
    if zip.len() > 1000 {
        return Err(invalid("the archive has more than 1000 arrays"));
    }
    let mut budget = max_bytes;
    let mut arrays: Vec<(NpyArray, Vec<u8>)> = Vec::new();
    for i in 0..zip.len() {
        let mut member = zip
            .by_index(i)
            .map_err(|e| invalid(format!("reading member {i}: {e}")))?;
        let name = array_name(member.name())?;
        let mut raw = Vec::new();
        let read = (&mut member).take(budget.saturating_add(1)).read_to_end(&mut raw)? as u64;
        if read > budget {
            return Err(NpzError::TooLarge { limit: max_bytes });
        }
        budget -= read;
        let (dtype, shape, data_offset) =
            parse_header(&mut raw.as_slice()).map_err(|e| invalid(format!("array {name:?}: {e}")))?;
        let array = NpyArray {
            name,
            dtype,
            shape,
            path: PathBuf::new(),
            data_offset: 0,
        };
        check_size(&array, read.saturating_sub(data_offset))?;
        raw.drain(..data_offset as usize);
        arrays.push((array, raw));
    }
    arrays.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    if arrays.windows(2).any(|w| w[0].0.name == w[1].0.name) {
        return Err(invalid("the archive holds two arrays with the same name"));
    }
    Ok(arrays)
}

/// Checks that every array has a leading sample axis of the same length; returns that length.
pub fn sample_count(arrays: &[NpyArray]) -> Result<u64, NpzError> {
    let first = arrays.first().ok_or_else(|| invalid("the dataset holds no arrays"))?;
    for a in arrays {
        if a.shape.is_empty() {
            return Err(invalid(format!(
                "array {:?} is a scalar; every array needs a leading sample axis",
                a.name
            )));
        }
        if a.samples() != first.samples() {
            return Err(invalid(format!(
                "arrays disagree on the number of samples: {:?} has {}, {:?} has {}",
                first.name,
                first.samples(),
                a.name,
                a.samples()
            )));
        }
    }
    if first.samples() == 0 {
        return Err(invalid("the dataset holds no samples"));
    }
    Ok(first.samples())
}

/// An `.npy` (version 1) file: `descr` is numpy's type string (`<f4`, `<i8`, ...), `data` the
/// little-endian elements. For tests, fixtures and tools that produce datasets.
pub fn encode_npy(descr: &str, shape: &[u64], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_text}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

/// An uncompressed `.npz` holding the given members (`name.npy`, bytes).
pub fn encode_npz(members: &[(&str, Vec<u8>)]) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, data) in members {
        zip.start_file(*name, zip::write::SimpleFileOptions::default())
            .map_err(std::io::Error::other)?;
        zip.write_all(data)?;
    }
    Ok(zip.finish().map_err(std::io::Error::other)?.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn npy(descr: &str, shape: &[u64], data: &[u8]) -> Vec<u8> {
        encode_npy(descr, shape, data)
    }

    fn npz(members: &[(&str, Vec<u8>)]) -> Vec<u8> {
        encode_npz(members).unwrap()
    }

    fn unpack_bytes(bytes: Vec<u8>, limit: u64) -> Result<Vec<NpyArray>, NpzError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.npz");
        std::fs::write(&path, bytes).unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let arrays = unpack(&path, &out, limit)?;
        // Keep the folder alive for the reads below by leaking it in tests only.
        std::mem::forget(dir);
        Ok(arrays)
    }

    #[test]
    fn arrays_unpack_and_samples_read_back() {
        let x: Vec<u8> = (0..6).flat_map(|v| (v as f32).to_le_bytes()).collect();
        let y: Vec<u8> = [3i64, 7].iter().flat_map(|v| v.to_le_bytes()).collect();
        let arrays = unpack_bytes(
            npz(&[("x.npy", npy("<f4", &[2, 3], &x)), ("labels.npy", npy("<i8", &[2], &y))]),
            1 << 20,
        )
        .unwrap();
        assert_eq!(
            arrays.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(),
            ["labels", "x"]
        );
        assert_eq!(sample_count(&arrays).unwrap(), 2);
        let x = &arrays[1];
        assert_eq!(
            (x.dtype, x.shape.clone(), x.sample_bytes()),
            (NpyDtype::Float32, vec![2, 3], 12)
        );
        assert_eq!(
            x.read_samples(1, 1).unwrap(),
            (3..6).flat_map(|v| (v as f32).to_le_bytes()).collect::<Vec<u8>>()
        );
    }

    #[test]
    fn hostile_and_broken_datasets_are_refused_with_the_reason() {
        let f = |n: usize| vec![0u8; n];
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (npz(&[("x.npy", npy("|O", &[2], &f(16)))]), "pickle"),
            (npz(&[("x.npy", npy("<f4", &[2, 3], &f(20)))]), "holds 20 bytes"),
            (npz(&[("x.npy", npy(">f4", &[2], &f(8)))]), "big-endian"),
            (npz(&[("x.npy", b"not an array".to_vec())]), "magic"),
            (npz(&[("../x.npy", npy("<f4", &[1], &f(4)))]), "plain .npy"),
            (b"PK nonsense".to_vec(), "not a valid .npz"),
        ];
        for (bytes, expected) in cases {
            let err = unpack_bytes(bytes, 1 << 20).unwrap_err().to_string();
            assert!(err.contains(expected), "{expected}: {err}");
        }
        let mismatched = unpack_bytes(
            npz(&[("a.npy", npy("<f4", &[2], &f(8))), ("b.npy", npy("<f4", &[3], &f(12)))]),
            1 << 20,
        )
        .unwrap();
        assert!(sample_count(&mismatched).unwrap_err().to_string().contains("disagree"));
    }

    #[test]
    fn in_memory_reading_matches_unpacking_and_applies_the_same_checks() {
        let x: Vec<u8> = (0..6).flat_map(|v| (v as f32).to_le_bytes()).collect();
        let bytes = npz(&[
            ("x.npy", npy("<f4", &[2, 3], &x)),
            ("n.npy", npy("<i8", &[], &7i64.to_le_bytes())),
        ]);
        let arrays = read_in_memory(&bytes, 1 << 20).unwrap();
        assert_eq!(arrays[0].0.name, "n");
        assert_eq!(
            (arrays[0].0.shape.clone(), arrays[0].1.clone()),
            (vec![], 7i64.to_le_bytes().to_vec())
        );
        assert_eq!((arrays[1].0.dtype, arrays[1].1.clone()), (NpyDtype::Float32, x));
        let short = npz(&[("x.npy", npy("<f4", &[2, 3], &[0u8; 20]))]);
        assert!(
            read_in_memory(&short, 1 << 20)
                .unwrap_err()
                .to_string()
                .contains("holds 20 bytes")
        );
        assert!(matches!(read_in_memory(&bytes, 100), Err(NpzError::TooLarge { .. })));
    }

    #[test]
    fn a_compressed_member_that_expands_past_the_limit_is_stopped() {
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        zip.start_file("x.npy", options).unwrap();
        zip.write_all(&npy("<f4", &[4 << 20], &vec![0u8; 16 << 20])).unwrap();
        let bytes = zip.finish().unwrap().into_inner();
        assert!(bytes.len() < 100_000);
        assert!(matches!(unpack_bytes(bytes, 1 << 20), Err(NpzError::TooLarge { .. })));
    }
}
