//! S3-compatible backend (AWS S3, MinIO, Ceph, R2, moto) through the `object_store` crate. Files go
//! up in parts of `part_size` bytes (multipart upload, a few parts in flight), and come down as a
//! stream, so neither direction holds a whole object in memory.

use std::ops::Range;
use std::path::Path;

use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig, WriteMultipart,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{ByteStream, ListStream, ObjectInfo, Result, Storage, StorageError, check_key};

/// S3 refuses parts under 5 MiB (except the last).
pub const MIN_PART_SIZE: usize = 5 << 20;
/// Parts uploaded at once: bounds memory to about `part_size * (PARTS_IN_FLIGHT + 1)`.
const PARTS_IN_FLIGHT: usize = 4;

/// Where the bucket is and how to reach it. Credentials not given here come from the environment
/// as the AWS SDKs read them (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
/// web identity, ECS or instance metadata).
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// Empty: AWS itself, from `region`. Otherwise an S3-compatible endpoint, path-style.
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Allow `http://` endpoints (a store on the local network or loopback).
    pub allow_http: bool,
    pub part_size: usize,
    /// How long one request may keep retrying (object_store's own default is 3 minutes, which a
    /// client of the API would see as a hung request before a storage error).
    pub retry_timeout: std::time::Duration,
}

pub struct S3Storage {
    store: AmazonS3,
    bucket: String,
    part_size: usize,
}

impl S3Storage {
    pub fn new(options: &S3Options) -> Result<Self, object_store::Error> {
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(&options.bucket);
        if !options.region.is_empty() {
            builder = builder.with_region(&options.region);
        }
        if !options.endpoint.is_empty() {
            builder = builder.with_endpoint(&options.endpoint);
        }
        if !options.access_key_id.is_empty() {
            builder = builder
                .with_access_key_id(&options.access_key_id)
                .with_secret_access_key(&options.secret_access_key);
        }
        if options.allow_http {
            builder = builder.with_allow_http(true);
        }
        builder = builder.with_retry(RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: 4,
            retry_timeout: options.retry_timeout,
        });
        Ok(S3Storage {
            store: builder.build()?,
            bucket: options.bucket.clone(),
            part_size: options.part_size.max(MIN_PART_SIZE),
        })
    }

    fn path(&self, key: &str) -> Result<ObjectPath> {
        check_key(key)?;
        ObjectPath::parse(key).map_err(|_| StorageError::InvalidKey(key.to_string()))
    }

    /// Uploads the file in parts; `size` decides between one PUT and a multipart upload.
    async fn upload(&self, key: &str, path: &ObjectPath, file: &Path, size: u64) -> Result<()> {
        let mut reader = tokio::fs::File::open(file).await.map_err(io(key))?;
        if size < self.part_size as u64 {
            let mut buf = Vec::with_capacity(size as usize);
            reader.read_to_end(&mut buf).await.map_err(io(key))?;
            self.store
                .put(path, PutPayload::from(buf))
                .await
                .map_err(remote_write(key))?;
            return Ok(());
        }
        let upload = self.store.put_multipart(path).await.map_err(remote_write(key))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, self.part_size);
        let mut buf = vec![0u8; 1 << 20];
        let copied: Result<()> = async {
            loop {
                writer
                    .wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(remote_write(key))?;
                let n = reader.read(&mut buf).await.map_err(io(key))?;
                if n == 0 {
                    return Ok(());
                }
                writer.write(&buf[..n]);
            }
        }
        .await;
        match copied {
            Ok(()) => writer.finish().await.map(drop).map_err(remote_write(key)),
            Err(e) => {
                // Parts already uploaded cost storage until the upload is aborted.
                if let Err(abort) = writer.abort().await {
                    tracing::warn!(key, error = %abort, "aborting a failed multipart upload failed");
                }
                Err(e)
            }
        }
    }
}

fn io(key: &str) -> impl Fn(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        key: key.to_string(),
        source,
    }
}

/// A write has no object to miss: "not found" there means the bucket is gone, a store failure.
fn remote_write(key: &str) -> impl Fn(object_store::Error) -> StorageError + '_ {
    move |e| StorageError::Remote {
        key: key.to_string(),
        source: Box::new(e),
    }
}

fn remote(key: &str) -> impl Fn(object_store::Error) -> StorageError + '_ {
    move |e| match e {
        object_store::Error::NotFound { .. } => StorageError::NotFound(key.to_string()),
        other => StorageError::Remote {
            key: key.to_string(),
            source: Box::new(other),
        },
    }
}

#[async_trait::async_trait]
impl Storage for S3Storage {
    async fn put_file(&self, key: &str, file: &Path) -> Result<()> {
        let path = self.path(key)?;
        let size = tokio::fs::metadata(file).await.map_err(io(key))?.len();
        self.upload(key, &path, file, size).await?;
        tokio::fs::remove_file(file).await.map_err(io(key))?;
        Ok(())
    }

    async fn get_file(&self, key: &str, dest: &Path) -> Result<()> {
        let mut stream = self.read(key, None).await?;
        let mut out = tokio::fs::File::create(dest).await.map_err(io(key))?;
        while let Some(chunk) = stream.next().await {
            out.write_all(&chunk.map_err(io(key))?).await.map_err(io(key))?;
        }
        out.flush().await.map_err(io(key))?;
        Ok(())
    }

    async fn read(&self, key: &str, range: Option<Range<u64>>) -> Result<ByteStream> {
        let path = self.path(key)?;
        let options = GetOptions {
            range: range.map(GetRange::Bounded),
            ..Default::default()
        };
        let result = self.store.get_opts(&path, options).await.map_err(remote(key))?;
        Ok(Box::pin(result.into_stream().map_err(std::io::Error::other)))
    }

    async fn size(&self, key: &str) -> Result<u64> {
        let path = self.path(key)?;
        Ok(self.store.head(&path).await.map_err(remote(key))?.size)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(remote(key)(e)),
        }
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<()> {
        let path = self.path(prefix)?;
        let locations = self.store.list(Some(&path)).map_ok(|meta| meta.location).boxed();
        let mut deleted = self.store.delete_stream(locations);
        while let Some(result) = deleted.next().await {
            match result {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(remote(prefix)(e)),
            }
        }
        Ok(())
    }

    fn list(&self, prefix: &str) -> ListStream {
        let path = match self.path(prefix) {
            Ok(p) => p,
            Err(e) => return futures::stream::once(async move { Err(e) }).boxed(),
        };
        let prefix = prefix.to_string();
        self.store
            .list(Some(&path))
            .map(move |meta| match meta {
                Ok(meta) => Ok(ObjectInfo {
                    key: meta.location.to_string(),
                    size: meta.size,
                    modified: meta.last_modified,
                }),
                Err(e) => Err(remote(&prefix)(e)),
            })
            .boxed()
    }

    fn describe(&self) -> String {
        format!("s3://{}", self.bucket)
    }

    async fn check(&self) -> Result<()> {
        // One ListObjects request with a delimiter: the tenants, not every object.
        let prefix = ObjectPath::from(super::TENANTS_PREFIX);
        self.store
            .list_with_delimiter(Some(&prefix))
            .await
            .map(drop)
            .map_err(remote(&self.bucket))
    }
}
