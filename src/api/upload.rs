//! Streaming an upload to a staging file: hashed on the way, cut off at the size limit, removed
//! automatically unless the caller keeps it. The body is never held whole in memory.

use std::path::Path;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::error::{ApiError, ApiResult};

pub struct Staged {
    /// Deleted on drop unless moved into storage first.
    pub path: tempfile::TempPath,
    pub size: u64,
    pub sha256: String,
}

pub async fn stage<S, E>(dir: &Path, stream: S, limit: u64) -> ApiResult<Staged>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: std::fmt::Display,
{
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("creating the staging folder: {e}")))?;
    let (file, path) = tempfile::NamedTempFile::new_in(dir)
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("creating a staging file: {e}")))?
        .into_parts();
    let mut file = tokio::fs::File::from_std(file);
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut stream = std::pin::pin!(stream);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::InvalidRequest(format!("reading the upload failed: {e}")))?;
        size += chunk.len() as u64;
        if size > limit {
            return Err(too_large(limit));
        }
        hasher.update(&chunk);
        file.write_all(&chunk)
            .await
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("writing the staging file: {e}")))?;
    }
    file.flush()
        .await
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("writing the staging file: {e}")))?;
    Ok(Staged {
        path,
        size,
        sha256: hex::encode(hasher.finalize()),
    })
}

pub fn too_large(limit: u64) -> ApiError {
    ApiError::PayloadTooLarge(format!(
        "the upload is larger than the {limit}-byte limit (limits.max_model_bytes)"
    ))
}
