//! Local-disk backend: objects are files under a root folder, keyed by relative path.

use std::io::SeekFrom;
use std::ops::Range;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

use futures::StreamExt;

use super::{ByteStream, ListStream, ObjectInfo, Result, Storage, StorageError, check_key};

pub struct LocalStorage {
    root: PathBuf,
}

impl LocalStorage {
    pub fn new(root: impl Into<PathBuf>) -> std::io::Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(&root)?;
        Ok(LocalStorage { root })
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        Ok(self.root.join(key))
    }
}

fn io_err(key: &str) -> impl Fn(std::io::Error) -> StorageError + '_ {
    move |source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            StorageError::NotFound(key.to_string())
        } else {
            StorageError::Io {
                key: key.to_string(),
                source,
            }
        }
    }
}

#[async_trait::async_trait]
impl Storage for LocalStorage {
    async fn put_file(&self, key: &str, file: &Path) -> Result<()> {
        let dest = self.path(key)?;
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(io_err(key))?;
        }
        // Rename when the file is on the same filesystem; otherwise copy then remove.
        if tokio::fs::rename(file, &dest).await.is_err() {
            let tmp = dest.with_extension("partial");
            tokio::fs::copy(file, &tmp).await.map_err(io_err(key))?;
            tokio::fs::rename(&tmp, &dest).await.map_err(io_err(key))?;
            tokio::fs::remove_file(file).await.map_err(io_err(key))?;
        }
        Ok(())
    }

    async fn get_file(&self, key: &str, dest: &Path) -> Result<()> {
        let src = self.path(key)?;
        tokio::fs::copy(&src, dest).await.map_err(io_err(key))?;
        Ok(())
    }

    async fn read(&self, key: &str, range: Option<Range<u64>>) -> Result<ByteStream> {
        let path = self.path(key)?;
        let mut file = tokio::fs::File::open(&path).await.map_err(io_err(key))?;
        match range {
            None => Ok(Box::pin(ReaderStream::new(file))),
            Some(r) => {
                file.seek(SeekFrom::Start(r.start)).await.map_err(io_err(key))?;
                Ok(Box::pin(ReaderStream::new(file.take(r.end - r.start))))
            }
        }
    }

    async fn size(&self, key: &str) -> Result<u64> {
        let path = self.path(key)?;
        Ok(tokio::fs::metadata(&path).await.map_err(io_err(key))?.len())
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        match tokio::fs::remove_file(&path).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(key)(e)),
            _ => Ok(()),
        }
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<()> {
        let path = self.path(prefix)?;
        match tokio::fs::remove_dir_all(&path).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(prefix)(e)),
            _ => Ok(()),
        }
    }

    fn list(&self, prefix: &str) -> ListStream {
        let (root, prefix) = (self.root.clone(), prefix.to_string());
        let walked = async move {
            let start = match check_key(&prefix) {
                Ok(()) => root.join(&prefix),
                Err(e) => return vec![Err(e)],
            };
            tokio::task::spawn_blocking(move || walk(&root, &start))
                .await
                .unwrap_or_else(|e| vec![Err(io_err(&prefix)(std::io::Error::other(e)))])
        };
        futures::stream::once(walked).flat_map(futures::stream::iter).boxed()
    }

    fn describe(&self) -> String {
        format!("local:{}", self.root.display())
    }

    async fn check(&self) -> Result<()> {
        let root = self.root.to_string_lossy();
        let meta = tokio::fs::metadata(&self.root).await.map_err(io_err(&root))?;
        if meta.is_dir() {
            Ok(())
        } else {
            Err(io_err(&root)(std::io::Error::other("not a folder")))
        }
    }
}

/// Files under `start`, keyed relative to `root`. A folder that does not exist lists nothing.
fn walk(root: &Path, start: &Path) -> Vec<Result<ObjectInfo>> {
    let mut out = Vec::new();
    let mut stack = vec![start.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                out.push(Err(io_err(&dir.to_string_lossy())(e)));
                continue;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                let Ok(relative) = path.strip_prefix(root) else {
                    continue;
                };
                let key = relative
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/");
                let modified = meta.modified().map(chrono::DateTime::from).unwrap_or_default();
                out.push(Ok(ObjectInfo {
                    key,
                    size: meta.len(),
                    modified,
                }));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;

    async fn collect(s: ByteStream) -> Vec<u8> {
        s.try_fold(Vec::new(), |mut acc, b| async move {
            acc.extend_from_slice(&b);
            Ok(acc)
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn put_read_range_and_delete_an_object() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStorage::new(dir.path().join("objects")).unwrap();
        let src = dir.path().join("upload");
        std::fs::write(&src, b"0123456789").unwrap();
        store.put_file("a/b/c.bin", &src).await.unwrap();
        assert!(!src.exists(), "the staged file is consumed");
        assert_eq!(store.size("a/b/c.bin").await.unwrap(), 10);
        assert_eq!(
            collect(store.read("a/b/c.bin", None).await.unwrap()).await,
            b"0123456789"
        );
        assert_eq!(
            collect(store.read("a/b/c.bin", Some(2..5)).await.unwrap()).await,
            b"234"
        );
        let listed: Vec<ObjectInfo> = store.list("a").try_collect().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].key.as_str(), listed[0].size), ("a/b/c.bin", 10));
        assert!(store.list("nothing").try_collect::<Vec<_>>().await.unwrap().is_empty());
        store.delete_prefix("a").await.unwrap();
        assert!(matches!(store.size("a/b/c.bin").await, Err(StorageError::NotFound(_))));
        store.delete("a/b/c.bin").await.unwrap();
        assert!(matches!(
            store.read("../x", None).await,
            Err(StorageError::InvalidKey(_))
        ));
    }
}
