//! Where model and artifact bytes live. One interface, two backends: local disk (one machine, or a
//! shared volume) and S3-compatible object stores (API and workers on different hosts). Keys are
//! built from ids only, never from client-supplied names.

mod local;
mod s3;

use std::ops::Range;
use std::path::Path;
use std::pin::Pin;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::Stream;
use futures::stream::BoxStream;
use uuid::Uuid;

pub use local::LocalStorage;
pub use s3::{MIN_PART_SIZE, S3Options, S3Storage};

pub type ByteStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// One stored object, as a listing sees it (the sweeper looks for objects no row refers to).
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    pub modified: DateTime<Utc>,
}

pub type ListStream = BoxStream<'static, Result<ObjectInfo>>;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("object {0} not found")]
    NotFound(String),
    #[error("invalid object key {0:?}")]
    InvalidKey(String),
    #[error("storage I/O on {key}: {source}")]
    Io {
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("object store request for {key}: {source}")]
    Remote {
        key: String,
        #[source]
        source: Box<object_store::Error>,
    },
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

#[async_trait::async_trait]
pub trait Storage: Send + Sync + 'static {
    /// Stores a finished local file under `key`, consuming it (a rename where the backend allows).
    async fn put_file(&self, key: &str, file: &Path) -> Result<()>;
    /// Copies the object to a local file (workers fetch their inputs this way).
    async fn get_file(&self, key: &str, dest: &Path) -> Result<()>;
    /// Streams the object's bytes, or the given byte range of them.
    async fn read(&self, key: &str, range: Option<Range<u64>>) -> Result<ByteStream>;
    async fn size(&self, key: &str) -> Result<u64>;
    /// Deletes the object; deleting a missing object is not an error.
    async fn delete(&self, key: &str) -> Result<()>;
    /// Deletes every object whose key starts with `prefix/`.
    async fn delete_prefix(&self, prefix: &str) -> Result<()>;
    /// Every object whose key starts with `prefix/`, in no particular order.
    fn list(&self, prefix: &str) -> ListStream;
    /// Where the bytes are, for logs (`local:/srv/objects`, `s3://bucket`).
    fn describe(&self) -> String;
    /// One cheap request that shows the store answers (readiness).
    async fn check(&self) -> Result<()>;
}

/// Every key starts with this segment (the sweeper lists it to find orphans).
pub const TENANTS_PREFIX: &str = "tenants";

/// Keys: `tenants/<tenant>/models/<model>/model.onnx` and
/// `tenants/<tenant>/jobs/<job>/<attempt>/<artifact>`. The attempt keeps a fenced-out worker's
/// uploads from overwriting the winner's.
pub fn model_prefix(tenant: Uuid, model: Uuid) -> String {
    format!("tenants/{tenant}/models/{model}")
}

pub fn model_key(tenant: Uuid, model: Uuid) -> String {
    format!("{}/model.onnx", model_prefix(tenant, model))
}

/// The n-th external-data file of a model; its relative path is kept in the database.
pub fn model_file_key(tenant: Uuid, model: Uuid, n: usize) -> String {
    format!("{}/files/{n}", model_prefix(tenant, model))
}

pub fn dataset_key(tenant: Uuid, dataset: Uuid) -> String {
    format!("tenants/{tenant}/datasets/{dataset}/data.npz")
}

pub fn job_prefix(tenant: Uuid, job: Uuid) -> String {
    format!("tenants/{tenant}/jobs/{job}")
}

pub fn artifact_key(tenant: Uuid, job: Uuid, attempt: i32, name: &str) -> String {
    format!("{}/{attempt}/{name}", job_prefix(tenant, job))
}

/// A key is a `/`-separated path of `[A-Za-z0-9._-]` segments, none of them `.` or `..`.
pub fn check_key(key: &str) -> Result<()> {
    let ok = !key.is_empty()
        && key.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(StorageError::InvalidKey(key.to_string()))
    }
}

/// Size and sha256 of a local file, read in chunks (never whole).
pub async fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    use sha2::{Digest, Sha256};
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(path).await?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((size, hex::encode(hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_built_from_ids_are_valid_and_traversal_is_not() {
        let id = Uuid::new_v4();
        check_key(&model_key(id, id)).unwrap();
        check_key(&artifact_key(id, id, 2, "report.json")).unwrap();
        for bad in ["", "../etc/passwd", "a/../b", "/abs", "a//b", "a/./b", "a b", "a\\b"] {
            assert!(check_key(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
