//! Reacting to changes of what a source reads, without polling: the directories a source
//! names ([`WatchSpec`]) are watched with inotify (the `notify` crate), and any change in
//! them wakes the rotation loop, which re-reads the source after a short debounce
//! ([`DEBOUNCE`]).
//!
//! Directories, not files, are watched: that sees a file changed in place, a file replaced
//! by rename, and the `..data` symlink swap with which Kubernetes updates a mounted Secret or
//! ConfigMap (the files are symlinks through `..data`; the swap is a rename in the mount's
//! directory). Our own reads are not changes (open and close-without-write are ignored), and
//! neither are the files a source writes itself ([`WatchSpec::ignore`]).
//!
//! Where watching is not possible, or would not see changes made elsewhere (NFS, SMB, FUSE
//! and other network file systems: inotify reports only local writes), the rotation loop
//! keeps polling every `poll_interval`, and says so in the log.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::Notify;

/// How long after a change the source is re-read: writes that come together (a CA rotation
/// step, a cert and its key) are read once.
pub const DEBOUNCE: Duration = Duration::from_millis(75);

/// While watching, the source is still re-read this often (or every `poll_interval`, if
/// longer) as a safety net against a missed event.
pub const WATCHED_POLL: Duration = Duration::from_secs(60);

/// What to watch for a source.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchSpec {
    /// Directories, each with whether its subdirectories are watched too.
    pub dirs: Vec<(PathBuf, bool)>,
    /// File names whose changes are not changes of the source (files it writes itself).
    pub ignore: Vec<OsString>,
}

impl WatchSpec {
    /// The parent directories of `files` (each once), also those of their symlink targets.
    pub fn parents_of<'a>(files: impl IntoIterator<Item = &'a Path>) -> WatchSpec {
        let mut dirs: Vec<(PathBuf, bool)> = Vec::new();
        for f in files {
            let mut candidates = vec![f.to_path_buf()];
            if let Ok(real) = std::fs::canonicalize(f) {
                candidates.push(real);
            }
            for c in candidates {
                let dir = match c.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                    _ => PathBuf::from("."),
                };
                if !dirs.iter().any(|(d, _)| *d == dir) {
                    dirs.push((dir, false));
                }
            }
        }
        WatchSpec {
            dirs,
            ignore: Vec::new(),
        }
    }
}

/// A running watch; dropping it stops it.
pub struct Watching {
    _watcher: notify::RecommendedWatcher,
    /// The directories watched.
    pub dirs: Vec<PathBuf>,
}

impl std::fmt::Debug for Watching {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watching")
            .field("dirs", &self.dirs)
            .finish()
    }
}

/// Whether an event may be a change of the source.
fn is_change(ev: &notify::Event, ignore: &[OsString]) -> bool {
    use notify::event::{AccessKind, AccessMode};
    match ev.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
        EventKind::Access(_) => return false,
        _ => {}
    }
    if ev.need_rescan() || ev.paths.is_empty() {
        return true;
    }
    !ev.paths
        .iter()
        .all(|p| p.file_name().is_some_and(|n| ignore.iter().any(|i| i == n)))
}

/// The file system type of the mount holding `path`, from `/proc/self/mountinfo` text.
pub fn fs_type(mountinfo: &str, path: &Path) -> Option<String> {
    let mut best: Option<(usize, String)> = None;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount_point) = left.split(' ').nth(4) else {
            continue;
        };
        let Some(fstype) = right.split(' ').next() else {
            continue;
        };
        // mountinfo escapes space, tab, newline and backslash as octal.
        let mp = mount_point
            .replace("\\040", " ")
            .replace("\\011", "\t")
            .replace("\\012", "\n")
            .replace("\\134", "\\");
        if path.starts_with(&mp) && best.as_ref().is_none_or(|(l, _)| mp.len() >= *l) {
            best = Some((mp.len(), fstype.to_string()));
        }
    }
    best.map(|(_, t)| t)
}

/// Whether changes on a file system of this type can be made where inotify does not see
/// them (network and FUSE file systems).
pub fn is_remote_fs(fstype: &str) -> bool {
    matches!(
        fstype,
        "nfs" | "nfs4" | "cifs" | "smb3" | "smbfs" | "ceph" | "glusterfs" | "9p" | "afs" | "lustre"
    ) || fstype.starts_with("fuse")
}

/// Starts watching `spec`; each change notifies `changed`. Fails (with a reason for the
/// log) when a directory cannot be watched or lies on a remote file system.
pub fn start(spec: &WatchSpec, changed: Arc<Notify>) -> Result<Watching, String> {
    if spec.dirs.is_empty() {
        return Err("the source has nothing to watch".into());
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for (d, _) in &spec.dirs {
        let real = std::fs::canonicalize(d).map_err(|e| format!("{}: {e}", d.display()))?;
        if let Some(t) = fs_type(&mountinfo, &real).filter(|t| is_remote_fs(t)) {
            return Err(format!(
                "{} is on {t}, where inotify does not see changes made by other hosts",
                d.display()
            ));
        }
    }
    let ignore = spec.ignore.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        match res {
            Ok(ev) if !is_change(&ev, &ignore) => {}
            Ok(_) => changed.notify_one(),
            // A watch error (an overflowed queue, a removed directory): re-read to be safe.
            Err(e) => {
                tracing::debug!(error = %e, "file watch error; re-reading the source");
                changed.notify_one();
            }
        }
    })
    .map_err(|e| e.to_string())?;
    for (d, recursive) in &spec.dirs {
        let mode = if *recursive {
            RecursiveMode::Recursive
        } else {
            RecursiveMode::NonRecursive
        };
        watcher
            .watch(d, mode)
            .map_err(|e| format!("{}: {e}", d.display()))?;
    }
    Ok(Watching {
        _watcher: watcher,
        dirs: spec.dirs.iter().map(|(d, _)| d.clone()).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_types() {
        let mi = "22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
                  30 22 0:40 / /mnt/nfs rw - nfs4 srv:/x rw\n\
                  31 22 0:41 / /mnt/a\\040b rw - fuse.sshfs h: rw\n\
                  32 30 0:42 / /mnt/nfs/local rw - tmpfs tmpfs rw\n";
        assert_eq!(fs_type(mi, Path::new("/etc/x")).as_deref(), Some("ext4"));
        assert_eq!(
            fs_type(mi, Path::new("/mnt/nfs/y")).as_deref(),
            Some("nfs4")
        );
        assert_eq!(
            fs_type(mi, Path::new("/mnt/nfs/local/z")).as_deref(),
            Some("tmpfs")
        );
        assert_eq!(
            fs_type(mi, Path::new("/mnt/a b/c")).as_deref(),
            Some("fuse.sshfs")
        );
        // A prefix of a name is not its mount point.
        assert_eq!(fs_type(mi, Path::new("/mnt/nfsx")).as_deref(), Some("ext4"));
        assert!(is_remote_fs("nfs4") && is_remote_fs("fuse.sshfs") && !is_remote_fs("ext4"));
        assert_eq!(fs_type("garbage\n - \n", Path::new("/")), None);
    }

    #[test]
    fn own_reads_and_ignored_files_are_not_changes() {
        use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind};
        let ev = |kind, p: &str| notify::Event::new(kind).add_path(PathBuf::from(p));
        let ignore = vec![OsString::from("ledger.jsonl")];
        assert!(!is_change(
            &ev(EventKind::Access(AccessKind::Open(AccessMode::Any)), "/h/x"),
            &ignore
        ));
        assert!(!is_change(
            &ev(
                EventKind::Access(AccessKind::Close(AccessMode::Read)),
                "/h/x"
            ),
            &ignore
        ));
        assert!(is_change(
            &ev(
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                "/h/x"
            ),
            &ignore
        ));
        assert!(is_change(
            &ev(EventKind::Create(CreateKind::File), "/h/x"),
            &ignore
        ));
        assert!(!is_change(
            &ev(EventKind::Modify(ModifyKind::Any), "/h/ledger.jsonl"),
            &ignore
        ));
    }

    #[test]
    fn parents_are_deduplicated() {
        let s = WatchSpec::parents_of([
            Path::new("/nonexistent/a/tls.crt"),
            Path::new("/nonexistent/a/tls.key"),
            Path::new("/nonexistent/b/ca.crt"),
        ]);
        assert_eq!(
            s.dirs,
            vec![
                (PathBuf::from("/nonexistent/a"), false),
                (PathBuf::from("/nonexistent/b"), false)
            ]
        );
    }
}
