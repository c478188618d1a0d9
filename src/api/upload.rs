//! Streaming an upload to disk: hashed on the way, cut off at the size limit. The body is never held
//! whole in memory. Each upload gets its own folder, so a model's external-data references can only
//! ever see the files uploaded with it.

use std::path::Path;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::AppState;
use super::error::{ApiError, ApiResult};
use super::extract::Tenant;

/// Bytes written and their sha256.
pub struct Written {
    pub size: u64,
    pub sha256: String,
}

/// Writes `stream` to the new file `path`, refusing to go past `limit` bytes.
pub async fn stage<S, E>(path: &Path, stream: S, limit: u64) -> ApiResult<Written>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: std::fmt::Display,
{
    let internal =
        |what: &str, e: std::io::Error| ApiError::Internal(anyhow::anyhow!("{what} {}: {e}", path.display()));
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| internal("creating", e))?;
    }
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => ApiError::InvalidRequest(format!(
                "two parts of the upload are named {:?}",
                path.file_name().unwrap_or_default()
            )),
            _ => internal("creating", e),
        })?;
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
        file.write_all(&chunk).await.map_err(|e| internal("writing", e))?;
    }
    file.flush().await.map_err(|e| internal("writing", e))?;
    Ok(Written {
        size,
        sha256: hex::encode(hasher.finalize()),
    })
}

/// What every upload starts with: the declared length checked against `limit` (413 before reading
/// a byte), the content type (lowercased), and a fresh folder under the staging area that is
/// removed with everything in it when the upload ends, stored or not.
pub async fn begin(
    headers: &axum::http::HeaderMap,
    limit: u64,
    staging: &Path,
) -> ApiResult<(String, tempfile::TempDir)> {
    use axum::http::header;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(too_large(limit));
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let internal = |e: std::io::Error| ApiError::Internal(anyhow::anyhow!("creating the staging folder: {e}"));
    tokio::fs::create_dir_all(staging).await.map_err(internal)?;
    let folder = tempfile::tempdir_in(staging).map_err(internal)?;
    Ok((content_type, folder))
}

pub fn too_large(limit: u64) -> ApiError {
    ApiError::PayloadTooLarge(format!(
        "the upload is larger than the {limit}-byte limit (limits.max_model_bytes)"
    ))
}

/// The tenant's stored-bytes quota (`limits.max_stored_bytes_per_tenant`): refused with 429
/// `quota_exceeded` when keeping `adding` more bytes would pass it. Called before an upload is read
/// (with 0: a tenant already at its cap is refused before sending gigabytes) and again before the
/// upload is stored (with its real size).
pub async fn check_quota(state: &AppState, tenant: Tenant, adding: u64) -> ApiResult<()> {
    let cap = state.config.limits.max_stored_bytes_per_tenant;
    if cap == 0 {
        return Ok(());
    }
    let used = crate::db::tenants::stored_bytes(&state.pool, tenant.0).await?.max(0) as u64;
    let full = if adding == 0 { used >= cap } else { used + adding > cap };
    if full {
        return Err(ApiError::QuotaExceeded(format!(
            "this tenant stores {used} bytes; adding {adding} would pass its {cap}-byte quota \
             (limits.max_stored_bytes_per_tenant); delete models, datasets or jobs first"
        )));
    }
    Ok(())
}
