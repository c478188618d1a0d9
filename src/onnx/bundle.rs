//! Model bundles: a `.zip` or `.tar` holding one `.onnx` file and the external-data files it names.
//! Extraction trusts nothing in the archive: entry names must be plain relative paths, links and
//! special files are refused, and the bytes written are capped while they are written (a zip bomb
//! stops at the cap, not at the end of the disk).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::external::check_location;

/// Most entries an archive may hold.
pub const MAX_ENTRIES: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveKind {
    Zip,
    Tar,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("the bundle expands past the {limit}-byte limit")]
    TooLarge { limit: u64 },
    #[error("{0}")]
    Invalid(String),
    #[error("writing the bundle: {0}")]
    Io(#[from] std::io::Error),
}

/// Extracts `archive` into `dest` (an empty folder), writing at most `max_bytes` in all.
pub fn extract(archive: &Path, kind: ArchiveKind, dest: &Path, max_bytes: u64) -> Result<(), BundleError> {
    let mut budget = max_bytes;
    let file = std::fs::File::open(archive)?;
    match kind {
        ArchiveKind::Zip => {
            let mut zip = zip::ZipArchive::new(file)
                .map_err(|e| BundleError::Invalid(format!("not a valid zip archive: {e}")))?;
            if zip.len() > MAX_ENTRIES {
                return Err(BundleError::Invalid(format!(
                    "the archive has more than {MAX_ENTRIES} entries"
                )));
            }
            for i in 0..zip.len() {
                let mut entry = zip
                    .by_index(i)
                    .map_err(|e| BundleError::Invalid(format!("reading zip entry {i}: {e}")))?;
                let name = entry.name().to_string();
                if entry.is_dir() {
                    continue;
                }
                if entry.is_symlink() {
                    return Err(BundleError::Invalid(format!("the archive entry {name:?} is a symlink")));
                }
                write_entry(&name, &mut entry, dest, &mut budget, max_bytes)?;
            }
        }
        ArchiveKind::Tar => {
            let mut tar = tar::Archive::new(file);
            let entries = tar
                .entries()
                .map_err(|e| BundleError::Invalid(format!("not a valid tar archive: {e}")))?;
            for (i, entry) in entries.enumerate() {
                if i >= MAX_ENTRIES {
                    return Err(BundleError::Invalid(format!(
                        "the archive has more than {MAX_ENTRIES} entries"
                    )));
                }
                let mut entry = entry.map_err(|e| BundleError::Invalid(format!("reading tar entry {i}: {e}")))?;
                let name = String::from_utf8_lossy(&entry.path_bytes()).to_string();
                match entry.header().entry_type() {
                    tar::EntryType::Directory => continue,
                    tar::EntryType::Regular | tar::EntryType::Continuous => {}
                    other => {
                        return Err(BundleError::Invalid(format!(
                            "the archive entry {name:?} is a {other:?}, not a regular file"
                        )));
                    }
                }
                write_entry(&name, &mut entry, dest, &mut budget, max_bytes)?;
            }
        }
    }
    Ok(())
}

fn write_entry(name: &str, data: &mut dyn Read, dest: &Path, budget: &mut u64, limit: u64) -> Result<(), BundleError> {
    let relative = name.trim_start_matches("./");
    check_location(relative).map_err(|why| BundleError::Invalid(format!("the archive entry {name:?} {why}")))?;
    let path = dest.join(relative);
    if path.exists() {
        return Err(BundleError::Invalid(format!("the archive holds {name:?} twice")));
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut out = std::fs::File::create_new(&path)?;
    let written = std::io::copy(&mut data.take(budget.saturating_add(1)), &mut out)?;
    if written > *budget {
        return Err(BundleError::TooLarge { limit });
    }
    *budget -= written;
    out.flush()?;
    Ok(())
}

/// The one `.onnx` file in an extracted bundle.
pub fn find_model(dir: &Path) -> Result<PathBuf, BundleError> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() && entry.path().extension().is_some_and(|e| e == "onnx") {
                found.push(entry.path());
            }
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(BundleError::Invalid("the bundle holds no .onnx file".into())),
        n => Err(BundleError::Invalid(format!(
            "the bundle holds {n} .onnx files; exactly one is expected"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_with(entries: &[(&str, tar::EntryType, &[u8])]) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut builder = tar::Builder::new(file.reopen().unwrap());
        for (name, kind, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            if *kind == tar::EntryType::Symlink {
                header.set_link_name("/etc/passwd").unwrap();
            }
            // Write the name bytes raw, so hostile names reach the extractor unaltered.
            let gnu = header.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
            header.set_cksum();
            builder.append(&header, *data).unwrap();
        }
        builder.finish().unwrap();
        file
    }

    #[test]
    fn a_tar_bundle_extracts_and_its_model_is_found() {
        let archive = tar_with(&[
            ("m.onnx", tar::EntryType::Regular, b"model"),
            ("weights/w.bin", tar::EntryType::Regular, b"0123"),
        ]);
        let dest = tempfile::tempdir().unwrap();
        extract(archive.path(), ArchiveKind::Tar, dest.path(), 100).unwrap();
        assert_eq!(std::fs::read(dest.path().join("weights/w.bin")).unwrap(), b"0123");
        assert_eq!(find_model(dest.path()).unwrap(), dest.path().join("m.onnx"));
    }

    #[test]
    fn hostile_archives_are_refused() {
        type Entries<'a> = &'a [(&'a str, tar::EntryType, &'a [u8])];
        let cases: [(Entries, &str); 4] = [
            (&[("../escape.bin", tar::EntryType::Regular, b"x")], "'..'"),
            (&[("/etc/cron.d/x", tar::EntryType::Regular, b"x")], "absolute"),
            (&[("link.bin", tar::EntryType::Symlink, b"")], "Symlink"),
            (&[("big.bin", tar::EntryType::Regular, &[0u8; 200])], "limit"),
        ];
        for (entries, expected) in cases {
            let archive = tar_with(entries);
            let dest = tempfile::tempdir().unwrap();
            let err = extract(archive.path(), ArchiveKind::Tar, dest.path(), 100)
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{entries:?}: {err}");
        }
    }

    #[test]
    fn a_zip_bomb_stops_at_the_limit() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut zip = zip::ZipWriter::new(file.reopen().unwrap());
        let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        zip.start_file("m.onnx", options).unwrap();
        zip.write_all(&vec![0u8; 10 << 20]).unwrap();
        zip.finish().unwrap();
        assert!(
            file.path().metadata().unwrap().len() < 100_000,
            "the archive itself is small"
        );
        let dest = tempfile::tempdir().unwrap();
        let err = extract(file.path(), ArchiveKind::Zip, dest.path(), 1 << 20).unwrap_err();
        assert!(matches!(err, BundleError::TooLarge { .. }), "{err}");
        assert!(std::fs::metadata(dest.path().join("m.onnx")).unwrap().len() <= (1 << 20) + 1);
    }
}
