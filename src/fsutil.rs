//! Crash-safe file writing and bounded reading.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Inputs (PEM files, CSRs, configs) larger than this are refused.
pub const MAX_INPUT_BYTES: u64 = 1024 * 1024;

/// File mode for private keys.
pub const KEY_MODE: u32 = 0o600;
/// File mode for public material.
pub const PUBLIC_MODE: u32 = 0o644;
/// Directory mode for stores and key directories.
pub const DIR_MODE: u32 = 0o700;

/// Reads a whole file, refusing anything over [`MAX_INPUT_BYTES`].
pub fn read_limited(path: &Path) -> Result<Vec<u8>> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut buf = Vec::new();
    f.take(MAX_INPUT_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io(path, e))?;
    check_size(&path.display().to_string(), buf.len())?;
    Ok(buf)
}

/// Reads all of stdin (or any reader) with the same limit.
pub fn read_limited_from(what: &str, r: impl Read) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    r.take(MAX_INPUT_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io(what, e))?;
    check_size(what, buf.len())?;
    Ok(buf)
}

fn check_size(what: &str, len: usize) -> Result<()> {
    if len as u64 > MAX_INPUT_BYTES {
        return Err(Error::TooLarge {
            what: what.to_string(),
            size: len as u64,
            limit: MAX_INPUT_BYTES,
        });
    }
    Ok(())
}

/// Creates `dir` and its parents with mode 0700 where they do not exist yet.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|e| Error::io(dir, e))
}

/// Writes `contents` to `path` atomically: a temp file in the same directory, written and
/// fsynced, then renamed over `path`, then the directory is fsynced. Readers see the old
/// file or the new one, never a partial one; a crash leaves at most a stray `.tmp` file.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::invalid("path", format!("{} has no file name", path.display())))?
        .to_string_lossy();
    let mut rnd = [0u8; 8];
    aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut rnd)
        .map_err(|_| Error::Build("system random number generator failed".into()))?;
    let tmp: PathBuf = dir.join(format!(
        ".{file_name}.{}.{}.tmp",
        std::process::id(),
        u64::from_le_bytes(rnd)
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, e))?;
        // The umask may have narrowed the mode; never widen beyond what was asked.
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io(&tmp, e))?;
        f.write_all(contents).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        drop(f);
        fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes several files as one step: every file is staged as a fsynced temp file first and
/// only then renamed into place, so a failure while writing leaves none of them changed.
pub fn write_set_atomic(files: &[(PathBuf, Vec<u8>, u32)]) -> Result<()> {
    let mut staged: Vec<(PathBuf, &Path)> = Vec::with_capacity(files.len());
    let cleanup = |staged: &[(PathBuf, &Path)]| {
        for (t, _) in staged {
            let _ = fs::remove_file(t);
        }
    };
    for (path, contents, mode) in files {
        let staged_path = path.with_file_name(format!(
            ".{}.staged.tmp",
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        if let Err(e) = write_atomic(&staged_path, contents, *mode) {
            cleanup(&staged);
            return Err(e);
        }
        staged.push((staged_path, path.as_path()));
    }
    for (t, p) in &staged {
        fs::rename(t, p).map_err(|e| Error::io(*p, e))?;
    }
    let mut dirs: Vec<&Path> = files.iter().filter_map(|(p, _, _)| p.parent()).collect();
    dirs.dedup();
    for d in dirs {
        sync_dir(if d.as_os_str().is_empty() {
            Path::new(".")
        } else {
            d
        })?;
    }
    Ok(())
}

/// Fsyncs a directory so that renames within it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Whether a file name is one of [`write_atomic`]'s temporaries.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn atomic_write_sets_mode_and_replaces() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k.pem");
        write_atomic(&p, b"one", KEY_MODE).unwrap();
        write_atomic(&p, b"two", KEY_MODE).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temp files left: {names:?}");
    }

    #[test]
    fn failed_write_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("missing-dir").join("x");
        assert!(write_atomic(&p, b"x", PUBLIC_MODE).is_err());
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn read_limit() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("big");
        fs::write(&p, vec![b'a'; (MAX_INPUT_BYTES + 1) as usize]).unwrap();
        let e = read_limited(&p).unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{e}");
        fs::write(&p, b"small").unwrap();
        assert_eq!(read_limited(&p).unwrap(), b"small");
        assert!(matches!(
            read_limited(&d.path().join("nope")),
            Err(Error::Io { .. })
        ));
    }

    #[test]
    fn private_dir_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b");
        create_private_dir(&p).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o700);
    }
}
