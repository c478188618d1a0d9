//! Writing a model straight to its file. `encode_to_vec` then `fs::write` builds the whole file in
//! memory first: a second copy of every weight (fresh pages the kernel must zero) before the copy
//! into the page cache. Here small fields gather in a buffer and tensor bytes go from the model's
//! own buffers to the file, so writing costs one copy, and no memory the size of the model.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use bytes::buf::UninitSlice;
use bytes::{Buf, BufMut};
use prost::Message;

/// Slices this long skip the buffer and go to the file as they are.
const DIRECT: usize = 64 * 1024;
const BUFFER: usize = 256 * 1024;

struct FileSink {
    file: File,
    buf: Vec<u8>,
    /// The first write error; later writes are skipped and it is returned at the end.
    error: Option<std::io::Error>,
}

impl FileSink {
    fn write(&mut self, bytes: &[u8]) {
        if self.error.is_none()
            && let Err(e) = self.file.write_all(bytes)
        {
            self.error = Some(e);
        }
    }

    fn flush_buffer(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        self.write(&buf);
        self.buf = buf;
        self.buf.clear();
    }
}

// SAFETY: `chunk_mut` hands out the vector's spare capacity and `advance_mut` only extends the
// length over bytes the caller has written into it, as `BufMut` requires (the same contract
// `Vec<u8>`'s own `BufMut` implementation keeps).
unsafe impl BufMut for FileSink {
    fn remaining_mut(&self) -> usize {
        isize::MAX as usize
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        let len = self.buf.len() + cnt;
        assert!(len <= self.buf.capacity(), "advance_mut past the chunk handed out");
        // SAFETY: the caller initialized `cnt` bytes of the chunk `chunk_mut` returned.
        unsafe { self.buf.set_len(len) };
        if self.buf.len() == self.buf.capacity() {
            self.flush_buffer();
        }
    }

    fn chunk_mut(&mut self) -> &mut UninitSlice {
        if self.buf.len() == self.buf.capacity() {
            self.flush_buffer();
        }
        self.buf.spare_capacity_mut().into()
    }

    fn put_slice(&mut self, src: &[u8]) {
        if src.len() >= DIRECT {
            self.flush_buffer();
            self.write(src);
        } else if src.len() <= self.buf.capacity() - self.buf.len() {
            self.buf.extend_from_slice(src);
        } else {
            self.flush_buffer();
            self.buf.extend_from_slice(src);
        }
    }

    fn put<T: Buf>(&mut self, mut src: T)
    where
        Self: Sized,
    {
        while src.has_remaining() {
            let n = src.chunk().len();
            self.put_slice(src.chunk());
            src.advance(n);
        }
    }
}

/// Encodes `model` into the file at `path` (created or truncated).
pub fn write(model: &impl Message, path: &Path) -> std::io::Result<()> {
    let mut sink = FileSink {
        file: File::create(path)?,
        buf: Vec::with_capacity(BUFFER),
        error: None,
    };
    model
        .encode(&mut sink)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    sink.flush_buffer();
    match sink.error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder;

    #[test]
    fn the_file_holds_exactly_what_encode_to_vec_gives() {
        let dir = tempfile::tempdir().unwrap();
        let mut model = builder::tiny_mlp(3);
        // A tensor past the direct-write threshold, between small fields on both sides.
        let big: Vec<f32> = (0..3 * DIRECT).map(|i| i as f32 * 0.5).collect();
        model = {
            let g = model.graph.as_mut().unwrap();
            g.initializer.push(crate::onnx::proto::TensorProto {
                name: Some("big".into()),
                dims: vec![big.len() as i64],
                data_type: Some(crate::onnx::proto::tensor_proto::DataType::Float as i32),
                raw_data: Some(big.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>().into()),
                ..Default::default()
            });
            model
        };
        // And many small tensors that together overflow the buffer several times.
        for i in 0..300 {
            let g = model.graph.as_mut().unwrap();
            g.initializer.push(crate::onnx::proto::TensorProto {
                name: Some(format!("small{i}")),
                dims: vec![1000],
                data_type: Some(crate::onnx::proto::tensor_proto::DataType::Float as i32),
                raw_data: Some(vec![i as u8; 4000].into()),
                ..Default::default()
            });
        }
        let path = dir.path().join("m.onnx");
        write(&model, &path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), model.encode_to_vec());
    }

    #[test]
    fn a_write_error_is_returned() {
        let dir = tempfile::tempdir().unwrap();
        assert!(write(&builder::tiny_mlp(1), &dir.path().join("missing/m.onnx")).is_err());
    }
}
