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
    let tmp = stage(path, contents, mode)?;
    let result = fs::rename(&tmp, path)
        .map_err(|e| Error::io(path, e))
        .and_then(|()| sync_dir(dir_of(path)));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn dir_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Writes `contents` to a fresh, fsynced temp file next to `path` (a name
/// [`is_temp_name`] recognises) and returns the temp file's path.
fn stage(path: &Path, contents: &[u8], mode: u32) -> Result<PathBuf> {
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::invalid("path", format!("{} has no file name", path.display())))?
        .to_string_lossy();
    let mut rnd = [0u8; 8];
    aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut rnd)
        .map_err(|_| Error::Build("system random number generator failed".into()))?;
    let tmp: PathBuf = dir_of(path).join(format!(
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
        f.sync_all().map_err(|e| Error::io(&tmp, e))
    })();
    match result {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Writes several files as one step: every file is staged as a fsynced temp file first and
/// only then renamed into place, so a failure while writing leaves none of them changed.
/// The directories are fsynced once, after the last rename.
pub fn write_set_atomic(files: &[(PathBuf, Vec<u8>, u32)]) -> Result<()> {
    let mut staged: Vec<(PathBuf, &Path)> = Vec::with_capacity(files.len());
    let cleanup = |staged: &[(PathBuf, &Path)]| {
        for (t, _) in staged {
            let _ = fs::remove_file(t);
        }
    };
    for (path, contents, mode) in files {
        match stage(path, contents, *mode) {
            Ok(tmp) => staged.push((tmp, path.as_path())),
            Err(e) => {
                cleanup(&staged);
                return Err(e);
            }
        }
    }
    for (i, (t, p)) in staged.iter().enumerate() {
        if let Err(e) = fs::rename(t, p) {
            cleanup(&staged[i..]);
            return Err(Error::io(*p, e));
        }
    }
    let mut dirs: Vec<&Path> = files.iter().map(|(p, _, _)| dir_of(p)).collect();
    dirs.dedup();
    for d in dirs {
        sync_dir(d)?;
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
