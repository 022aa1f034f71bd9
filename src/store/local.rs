//! The local-directory store (the embedded default).
//!
//! Layout of a home directory (mode 0700):
//! ```text
//! meshca-home.json          marker with the layout version
//! .lock                     flock(2) taken for every change
//! .rotation.lock            flock(2) held for a whole `ca rotate` phase; names its holder
//! cas/<name>/ca.crt         the CA certificate
//! cas/<name>/ca.key         its key, PKCS#8, mode 0600 (absent for remote-key backends)
//! cas/<name>/chain.pem      the CA certificate followed by its parents up to the root
//! cas/<name>/meta.json      backend, trust domain, policy
//! bundles/<name>.json       trust bundle definitions
//! ledger.jsonl              append-only issuance ledger, one JSON object a line
//! revocations.jsonl         append-only revocations (serial, CA, reason, time)
//! rotations/<name>/state.json           a CA rotation in progress (phase, steps done)
//! rotations/<name>/{next,previous}/<x>/ the rotation's CAs, laid out like cas/<x>/
//! ```
//! Every file is written atomically (temp file, fsync, rename, fsync of the directory). A CA is
//! assembled in a hidden temp directory and renamed into place, so a crash never leaves a
//! half-written CA. Changes are serialized between processes by an exclusive lock.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::{SaveOutcome, Slot, Store};
use crate::bundle::BundleSpec;
use crate::ca::{validate_ca_name, CaMaterial, CaMeta};
use crate::crl::Revocation;
use crate::error::{Error, Result};
use crate::fsutil::{self, KEY_MODE, PUBLIC_MODE};
use crate::issue::LedgerEntry;
use crate::key::PrivateKey;
use crate::pemutil;
use crate::rotation::RotationState;

const MARKER: &str = "meshca-home.json";
const LAYOUT_VERSION: u32 = 1;

/// A meshca home directory.
#[derive(Clone, Debug)]
pub struct LocalStore {
    home: PathBuf,
}

/// The per-user default home: `$XDG_DATA_HOME/meshca`, else `~/.local/share/meshca`.
/// (`--home` and `$MESHCA_HOME` take precedence; the CLI resolves them.)
pub fn default_home() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(x).join("meshca"));
    }
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(|h| PathBuf::from(h).join(".local/share/meshca"))
}

impl LocalStore {
    /// Opens an existing home. Fails with a hint when there is none.
    pub fn open(home: impl Into<PathBuf>) -> Result<Self> {
        let home = home.into();
        if !home.join(MARKER).is_file() {
            return Err(Error::Store(format!(
                "no meshca home at {} (run `meshca init` first, or pass --home)",
                home.display()
            )));
        }
        Ok(LocalStore { home })
    }

    /// Opens a home, creating it (mode 0700) when it does not exist. An existing non-empty
    /// directory that is not a meshca home is refused.
    pub fn create(home: impl Into<PathBuf>) -> Result<Self> {
        let home = home.into();
        if home.join(MARKER).is_file() {
            return Ok(LocalStore { home });
        }
        if home.exists() {
            if !home.is_dir() {
                return Err(Error::Store(format!(
                    "{} exists and is not a directory",
                    home.display()
                )));
            }
            let non_empty = fs::read_dir(&home)
                .map_err(|e| Error::io(&home, e))?
                .next()
                .is_some();
            if non_empty {
                return Err(Error::Store(format!(
                    "{} is a non-empty directory that is not a meshca home",
                    home.display()
                )));
            }
        }
        fsutil::create_private_dir(&home)?;
        let marker = serde_json::json!({ "meshca_home": LAYOUT_VERSION });
        fsutil::write_atomic(
            &home.join(MARKER),
            marker.to_string().as_bytes(),
            PUBLIC_MODE,
        )?;
        Ok(LocalStore { home })
    }

    /// The home directory.
    pub fn home(&self) -> &Path {
        &self.home
    }

    fn cas_dir(&self) -> PathBuf {
        self.home.join("cas")
    }

    fn ca_dir(&self, name: &str) -> PathBuf {
        self.cas_dir().join(name)
    }

    fn old_ca_dir(&self, name: &str) -> PathBuf {
        self.cas_dir().join(format!(".{name}.old.tmp"))
    }

    fn bundle_path(&self, name: &str) -> PathBuf {
        self.home.join("bundles").join(format!("{name}.json"))
    }

    /// The ledger file.
    pub fn ledger_path(&self) -> PathBuf {
        self.home.join("ledger.jsonl")
    }

    fn revocations_path(&self) -> PathBuf {
        self.home.join("revocations.jsonl")
    }

    fn revocations_sync(&self) -> Result<Vec<Revocation>> {
        read_jsonl(&self.revocations_path())
    }

    fn revoke_sync(&self, r: &Revocation) -> Result<()> {
        let mut line = serde_json::to_vec(r).map_err(|e| Error::Build(e.to_string()))?;
        line.push(b'\n');
        let _lock = self.lock()?;
        if self
            .revocations_sync()?
            .iter()
            .any(|x| x.serial == r.serial && x.ca == r.ca)
        {
            return Err(Error::AlreadyExists(format!(
                "revocation of serial {} of CA {}",
                r.serial, r.ca
            )));
        }
        append_line(&self.revocations_path(), &line)
    }

    /// Takes the home's exclusive lock until the returned file is dropped.
    fn lock(&self) -> Result<File> {
        let p = self.home.join(".lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&p)
            .map_err(|e| Error::io(&p, e))?;
        f.lock().map_err(|e| Error::io(&p, e))?;
        Ok(f)
    }

    /// Where a CA's files are: its directory, or the previous one when a `--force` replace
    /// was interrupted between its two renames.
    fn ca_dir_for_read(&self, name: &str) -> Option<PathBuf> {
        let d = self.ca_dir(name);
        if d.is_dir() {
            return Some(d);
        }
        let old = self.old_ca_dir(name);
        old.is_dir().then_some(old)
    }

    fn read_ca(&self, name: &str, dir: &Path) -> Result<CaMaterial> {
        let read = |f: &str| -> Result<Vec<u8>> { fsutil::read_limited(&dir.join(f)) };
        let meta: CaMeta = serde_json::from_slice(&read("meta.json")?)
            .map_err(|e| Error::Corrupt(format!("{}: {e}", dir.join("meta.json").display())))?;
        let chain_path = dir.join("chain.pem");
        let chain = pemutil::parse_certs(&read("chain.pem")?, &chain_path.display().to_string())
            .map_err(|e| Error::Corrupt(e.to_string()))?;
        let key_path = dir.join("ca.key");
        let key = if key_path.exists() {
            let text = zeroize::Zeroizing::new(read("ca.key")?);
            let s = std::str::from_utf8(&text)
                .map_err(|_| Error::Corrupt(format!("{}: not PEM text", key_path.display())))?;
            Some(
                PrivateKey::from_pem(s, &key_path.display().to_string())
                    .map_err(|e| Error::Corrupt(e.to_string()))?,
            )
        } else {
            None
        };
        if meta.name != name {
            return Err(Error::Corrupt(format!(
                "{}: names CA {:?}",
                dir.display(),
                meta.name
            )));
        }
        let mut it = chain.into_iter();
        let cert = it
            .next()
            .ok_or_else(|| Error::Corrupt(format!("{}: empty", chain_path.display())))?;
        let ca = CaMaterial {
            meta,
            cert,
            parents: it.collect(),
            key,
        };
        ca.validate()?;
        Ok(ca)
    }

    /// Checks every file of the home: CAs load and validate, bundles parse, every ledger line
    /// parses. Returns the number of CAs, bundles and ledger entries.
    pub fn check(&self) -> Result<(usize, usize, usize)> {
        let cas = self.list_cas_sync()?;
        for c in &cas {
            self.load_ca_sync(c)?;
        }
        let bundles = self.list_bundles_sync()?;
        for r in self.list_rotations_sync()? {
            for slot in [Slot::Next, Slot::Previous] {
                self.load_rotation_cas_sync(&r.ca, slot)?;
            }
        }
        self.revocations_sync()?;
        Ok((cas.len(), bundles.len(), self.ledger_sync()?.len()))
    }

    fn list_cas_sync(&self) -> Result<Vec<String>> {
        let dir = self.cas_dir();
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut names = std::collections::BTreeSet::new();
        for e in fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let e = e.map_err(|e| Error::io(&dir, e))?;
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(old) = n.strip_prefix('.').and_then(|s| s.strip_suffix(".old.tmp")) {
                names.insert(old.to_string());
            } else if !n.starts_with('.') && e.path().is_dir() {
                names.insert(n);
            }
        }
        Ok(names.into_iter().collect())
    }

    fn load_ca_sync(&self, name: &str) -> Result<CaMaterial> {
        validate_ca_name(name).map_err(|_| Error::UnknownCa(name.to_string()))?;
        let dir = self
            .ca_dir_for_read(name)
            .ok_or_else(|| Error::UnknownCa(name.to_string()))?;
        self.read_ca(name, &dir)
    }

    fn list_bundles_sync(&self) -> Result<Vec<BundleSpec>> {
        let dir = self.home.join("bundles");
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let e = e.map_err(|e| Error::io(&dir, e))?;
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(name) = n.strip_suffix(".json").filter(|_| !n.starts_with('.')) {
                out.push(self.load_bundle_sync(name)?);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn load_bundle_sync(&self, name: &str) -> Result<BundleSpec> {
        let p = self.bundle_path(name);
        if validate_ca_name(name).is_err() || !p.is_file() {
            return Err(Error::UnknownBundle(name.to_string()));
        }
        serde_json::from_slice(&fsutil::read_limited(&p)?)
            .map_err(|e| Error::Corrupt(format!("{}: {e}", p.display())))
    }

    fn ledger_sync(&self) -> Result<Vec<LedgerEntry>> {
        read_jsonl(&self.ledger_path())
    }

    fn save_ca_sync(&self, ca: &CaMaterial, replace: bool) -> Result<SaveOutcome> {
        validate_ca_name(&ca.meta.name)?;
        let _lock = self.lock()?;
        let name = &ca.meta.name;
        let cas = self.cas_dir();
        fsutil::create_private_dir(&cas)?;
        let dir = self.ca_dir(name);
        let old = self.old_ca_dir(name);
        // Finish an interrupted replace: the previous CA is still the current one.
        if !dir.exists() && old.is_dir() {
            fs::rename(&old, &dir).map_err(|e| Error::io(&old, e))?;
        }
        let exists = dir.exists();
        if exists && !replace {
            return Err(Error::AlreadyExists(format!("CA {name}")));
        }
        let tmp = cas.join(format!(".{name}.{}.new.tmp", temp_tag()?));
        let result = (|| {
            write_ca_files(&tmp, ca)?;
            if exists {
                if old.exists() {
                    fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
                }
                fs::rename(&dir, &old).map_err(|e| Error::io(&dir, e))?;
            }
            fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))?;
            fsutil::sync_dir(&cas)?;
            if exists {
                fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        result.map(|()| {
            if exists {
                SaveOutcome::Replaced
            } else {
                SaveOutcome::Created
            }
        })
    }

    fn save_bundle_sync(&self, b: &BundleSpec) -> Result<SaveOutcome> {
        b.validate()?;
        let _lock = self.lock()?;
        let p = self.bundle_path(&b.name);
        fsutil::create_private_dir(p.parent().expect("bundles dir"))?;
        let existed = p.exists();
        let json = serde_json::to_vec_pretty(b).map_err(|e| Error::Build(e.to_string()))?;
        fsutil::write_atomic(&p, &json, PUBLIC_MODE)?;
        Ok(if existed {
            SaveOutcome::Replaced
        } else {
            SaveOutcome::Created
        })
    }

    fn record_sync(&self, entry: &LedgerEntry) -> Result<()> {
        let mut line = serde_json::to_vec(entry).map_err(|e| Error::Build(e.to_string()))?;
        line.push(b'\n');
        let _lock = self.lock()?;
        append_line(&self.ledger_path(), &line)
    }
}

/// Reads a JSON-lines file (absent: empty); a line that does not parse is corruption.
fn read_jsonl<T: serde::de::DeserializeOwned>(p: &Path) -> Result<Vec<T>> {
    let text = match fs::read_to_string(p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(p, e)),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| Error::Corrupt(format!("{} line {}: {e}", p.display(), i + 1)))
        })
        .collect()
}

/// Appends one whole line (under the caller's lock, in one write, so readers never see half
/// a record) and syncs it.
fn append_line(p: &Path, line: &[u8]) -> Result<()> {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(p)
        .map_err(|e| Error::io(p, e))?;
    f.write_all(line).map_err(|e| Error::io(p, e))?;
    f.sync_data().map_err(|e| Error::io(p, e))
}

/// A unique tag for temporary names: the process id and random bytes.
fn temp_tag() -> Result<String> {
    let mut rnd = [0u8; 6];
    aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut rnd)
        .map_err(|_| Error::Build("system random number generator failed".into()))?;
    Ok(format!("{}.{}", std::process::id(), pemutil::hex(&rnd)))
}

/// Writes a CA's files into a new private directory `dir`.
fn write_ca_files(dir: &Path, ca: &CaMaterial) -> Result<()> {
    fsutil::create_private_dir(dir)?;
    fsutil::write_atomic(
        &dir.join("ca.crt"),
        pemutil::certs_to_pem([&ca.cert]).as_bytes(),
        PUBLIC_MODE,
    )?;
    fsutil::write_atomic(
        &dir.join("chain.pem"),
        ca.chain_pem().as_bytes(),
        PUBLIC_MODE,
    )?;
    if let Some(k) = &ca.key {
        fsutil::write_atomic(&dir.join("ca.key"), k.to_pkcs8_pem().as_bytes(), KEY_MODE)?;
    }
    let meta = serde_json::to_vec_pretty(&ca.meta).map_err(|e| Error::Build(e.to_string()))?;
    fsutil::write_atomic(&dir.join("meta.json"), &meta, PUBLIC_MODE)
}

/// Removes a directory tree atomically from readers' view: renamed to a hidden temporary
/// name first, then deleted. Absent is fine.
fn remove_tree(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let parent = path.parent().expect("a path inside the home");
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let doomed = parent.join(format!(".{name}.{}.del.tmp", temp_tag()?));
    fs::rename(path, &doomed).map_err(|e| Error::io(path, e))?;
    fsutil::sync_dir(parent)?;
    fs::remove_dir_all(&doomed).map_err(|e| Error::io(&doomed, e))
}

/// Rotation records: `rotations/<ca>/state.json`, and the slots `rotations/<ca>/next/<x>/`
/// and `rotations/<ca>/previous/<x>/` laid out like `cas/<x>/`.
impl LocalStore {
    fn rotations_dir(&self) -> PathBuf {
        self.home.join("rotations")
    }

    fn rotation_dir(&self, ca: &str) -> PathBuf {
        self.rotations_dir().join(ca)
    }

    fn list_rotations_sync(&self) -> Result<Vec<RotationState>> {
        let dir = self.rotations_dir();
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let e = e.map_err(|e| Error::io(&dir, e))?;
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with('.') || validate_ca_name(&n).is_err() {
                continue;
            }
            let p = e.path().join("state.json");
            if !p.is_file() {
                continue;
            }
            let st: RotationState = serde_json::from_slice(&fsutil::read_limited(&p)?)
                .map_err(|e| Error::Corrupt(format!("{}: {e}", p.display())))?;
            if st.ca != n {
                return Err(Error::Corrupt(format!(
                    "{}: names CA {:?}",
                    p.display(),
                    st.ca
                )));
            }
            out.push(st);
        }
        out.sort_by(|a, b| a.ca.cmp(&b.ca));
        Ok(out)
    }

    fn save_rotation_sync(&self, st: &RotationState) -> Result<()> {
        validate_ca_name(&st.ca)?;
        let _lock = self.lock()?;
        fsutil::create_private_dir(&self.rotations_dir())?;
        let dir = self.rotation_dir(&st.ca);
        fsutil::create_private_dir(&dir)?;
        let json = serde_json::to_vec_pretty(st).map_err(|e| Error::Build(e.to_string()))?;
        fsutil::write_atomic(&dir.join("state.json"), &json, PUBLIC_MODE)
    }

    fn load_rotation_cas_sync(&self, ca: &str, slot: Slot) -> Result<Vec<CaMaterial>> {
        validate_ca_name(ca)?;
        let dir = self.rotation_dir(ca).join(slot.as_str());
        if !dir.is_dir() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let e = e.map_err(|e| Error::io(&dir, e))?;
            let n = e.file_name().to_string_lossy().into_owned();
            if !n.starts_with('.') && validate_ca_name(&n).is_ok() {
                out.push(self.read_ca(&n, &e.path())?);
            }
        }
        out.sort_by(|a, b| a.meta.name.cmp(&b.meta.name));
        Ok(out)
    }

    fn save_rotation_cas_sync(&self, ca: &str, slot: Slot, cas: &[CaMaterial]) -> Result<()> {
        validate_ca_name(ca)?;
        let _lock = self.lock()?;
        fsutil::create_private_dir(&self.rotations_dir())?;
        let dir = self.rotation_dir(ca);
        fsutil::create_private_dir(&dir)?;
        let target = dir.join(slot.as_str());
        if target.exists() {
            return Err(Error::AlreadyExists(format!(
                "{} CAs of the rotation of {ca}",
                slot.as_str()
            )));
        }
        let tmp = dir.join(format!(".{}.{}.new.tmp", slot.as_str(), temp_tag()?));
        let result = (|| {
            fsutil::create_private_dir(&tmp)?;
            for c in cas {
                validate_ca_name(&c.meta.name)?;
                write_ca_files(&tmp.join(&c.meta.name), c)?;
            }
            fsutil::sync_dir(&tmp)?;
            fs::rename(&tmp, &target).map_err(|e| Error::io(&target, e))?;
            fsutil::sync_dir(&dir)
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        result
    }

    fn remove_rotation_cas_sync(&self, ca: &str, slot: Slot) -> Result<()> {
        validate_ca_name(ca)?;
        let _lock = self.lock()?;
        remove_tree(&self.rotation_dir(ca).join(slot.as_str()))
    }

    fn remove_rotation_sync(&self, ca: &str) -> Result<()> {
        validate_ca_name(ca)?;
        let _lock = self.lock()?;
        remove_tree(&self.rotation_dir(ca))
    }
}

#[async_trait]
impl Store for LocalStore {
    fn describe(&self) -> String {
        format!("local:{}", self.home.display())
    }
    async fn list_cas(&self) -> Result<Vec<String>> {
        self.list_cas_sync()
    }
    async fn ca_exists(&self, name: &str) -> Result<bool> {
        Ok(validate_ca_name(name).is_ok() && self.ca_dir_for_read(name).is_some())
    }
    async fn load_ca(&self, name: &str) -> Result<CaMaterial> {
        self.load_ca_sync(name)
    }
    async fn save_ca(&self, ca: &CaMaterial, replace: bool) -> Result<SaveOutcome> {
        self.save_ca_sync(ca, replace)
    }
    async fn list_bundles(&self) -> Result<Vec<BundleSpec>> {
        self.list_bundles_sync()
    }
    async fn load_bundle(&self, name: &str) -> Result<BundleSpec> {
        self.load_bundle_sync(name)
    }
    async fn save_bundle(&self, b: &BundleSpec) -> Result<SaveOutcome> {
        self.save_bundle_sync(b)
    }
    async fn record(&self, entry: &LedgerEntry) -> Result<()> {
        self.record_sync(entry)
    }
    async fn ledger(&self) -> Result<Vec<LedgerEntry>> {
        self.ledger_sync()
    }
    async fn list_rotations(&self) -> Result<Vec<RotationState>> {
        self.list_rotations_sync()
    }
    async fn revoke(&self, r: &Revocation) -> Result<()> {
        self.revoke_sync(r)
    }
    async fn revocations(&self) -> Result<Vec<Revocation>> {
        self.revocations_sync()
    }
    async fn save_rotation(&self, state: &RotationState) -> Result<()> {
        self.save_rotation_sync(state)
    }
    async fn load_rotation_cas(&self, ca: &str, slot: Slot) -> Result<Vec<CaMaterial>> {
        self.load_rotation_cas_sync(ca, slot)
    }
    async fn save_rotation_cas(&self, ca: &str, slot: Slot, cas: &[CaMaterial]) -> Result<()> {
        self.save_rotation_cas_sync(ca, slot, cas)
    }
    async fn remove_rotation_cas(&self, ca: &str, slot: Slot) -> Result<()> {
        self.remove_rotation_cas_sync(ca, slot)
    }
    async fn remove_rotation(&self, ca: &str) -> Result<()> {
        self.remove_rotation_sync(ca)
    }
    async fn lock_rotation(&self, holder: &str) -> Result<Box<dyn super::PhaseLock>> {
        Ok(Box::new(self.lock_rotation_sync(holder)?))
    }
}

/// The home's rotation lock: an flock on `.rotation.lock`, released when the file closes
/// (also when the process is killed).
struct LocalPhaseLock(#[allow(dead_code)] File);

#[async_trait]
impl super::PhaseLock for LocalPhaseLock {
    async fn release(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

impl LocalStore {
    /// Takes the rotation lock without waiting: a second phase fails naming the holder
    /// written into the lock file by the first.
    fn lock_rotation_sync(&self, holder: &str) -> Result<LocalPhaseLock> {
        let p = self.home.join(".rotation.lock");
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(&p)
            .map_err(|e| Error::io(&p, e))?;
        match f.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut who = String::new();
                let _ = (&f).take(512).read_to_string(&mut who);
                return Err(super::lock_busy(&who));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&p, e)),
        }
        let io = |e: std::io::Error| Error::io(&p, e);
        f.set_len(0).map_err(io)?;
        f.rewind().map_err(io)?;
        f.write_all(holder.as_bytes()).map_err(io)?;
        f.flush().map_err(io)?;
        Ok(LocalPhaseLock(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{create_root, CaSpec};
    use std::os::unix::fs::MetadataExt;
    use time::OffsetDateTime;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    #[test]
    fn save_load_modes_and_replace() {
        let d = tempfile::tempdir().unwrap();
        let home = d.path().join("home");
        let s = LocalStore::create(&home).unwrap();
        assert_eq!(fs::metadata(&home).unwrap().mode() & 0o777, 0o700);
        let now = OffsetDateTime::now_utc();
        let ca = create_root(&CaSpec::root("ca1"), now).unwrap();
        rt().block_on(async {
            assert_eq!(s.save_ca(&ca, false).await.unwrap(), SaveOutcome::Created);
            assert!(matches!(
                s.save_ca(&ca, false).await,
                Err(Error::AlreadyExists(_))
            ));
            let back = s.load_ca("ca1").await.unwrap();
            assert_eq!(back.cert, ca.cert);
            assert_eq!(
                back.key.unwrap().public_key_der(),
                ca.key.as_ref().unwrap().public_key_der()
            );
            let other = create_root(&CaSpec::root("ca1"), now).unwrap();
            assert_eq!(
                s.save_ca(&other, true).await.unwrap(),
                SaveOutcome::Replaced
            );
            assert_eq!(s.load_ca("ca1").await.unwrap().cert, other.cert);
            assert!(matches!(s.load_ca("nope").await, Err(Error::UnknownCa(_))));
            assert!(matches!(
                s.load_ca("../etc").await,
                Err(Error::UnknownCa(_))
            ));
            assert_eq!(s.list_cas().await.unwrap(), ["ca1"]);
        });
        let key = home.join("cas/ca1/ca.key");
        assert_eq!(fs::metadata(&key).unwrap().mode() & 0o777, 0o600);
        assert_eq!(
            fs::metadata(home.join("cas/ca1")).unwrap().mode() & 0o777,
            0o700
        );
        let leftovers: Vec<_> = fs::read_dir(home.join("cas"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    }

    #[test]
    fn interrupted_replace_still_loads_previous_ca() {
        let d = tempfile::tempdir().unwrap();
        let s = LocalStore::create(d.path().join("h")).unwrap();
        let ca = create_root(&CaSpec::root("ca1"), OffsetDateTime::now_utc()).unwrap();
        rt().block_on(s.save_ca(&ca, false)).unwrap();
        // Simulate a crash between the two renames of a --force replace.
        fs::rename(s.ca_dir("ca1"), s.old_ca_dir("ca1")).unwrap();
        assert_eq!(rt().block_on(s.load_ca("ca1")).unwrap().cert, ca.cert);
        assert_eq!(rt().block_on(s.list_cas()).unwrap(), ["ca1"]);
        assert!(matches!(
            rt().block_on(s.save_ca(&ca, false)),
            Err(Error::AlreadyExists(_))
        ));
        assert!(
            s.ca_dir("ca1").is_dir(),
            "the next change finishes the recovery"
        );
    }

    #[test]
    fn open_requires_a_home_and_create_refuses_foreign_dirs() {
        let d = tempfile::tempdir().unwrap();
        let e = LocalStore::open(d.path().join("none"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("run `meshca init` first"), "{e}");
        fs::write(d.path().join("file"), b"x").unwrap();
        assert!(LocalStore::create(d.path()).is_err());
        assert!(LocalStore::create(d.path().join("file")).is_err());
    }

    #[test]
    fn ledger_appends_and_detects_corruption() {
        let d = tempfile::tempdir().unwrap();
        let s = LocalStore::create(d.path().join("h")).unwrap();
        let e = LedgerEntry {
            serial: "01".into(),
            ca: "ca1".into(),
            subject: "CN=x".into(),
            sans: vec!["DNS:x".into()],
            not_after: OffsetDateTime::UNIX_EPOCH,
            issued_at: OffsetDateTime::UNIX_EPOCH,
            sha256: "AA".into(),
            aki: None,
        };
        rt().block_on(async {
            s.record(&e).await.unwrap();
            s.record(&e).await.unwrap();
            assert_eq!(s.ledger().await.unwrap(), vec![e.clone(), e.clone()]);
        });
        let mut f = OpenOptions::new()
            .append(true)
            .open(s.ledger_path())
            .unwrap();
        f.write_all(b"{half").unwrap();
        assert!(matches!(s.ledger_sync(), Err(Error::Corrupt(_))));
    }

    #[test]
    fn bundles_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let s = LocalStore::create(d.path().join("h")).unwrap();
        let b = BundleSpec {
            name: "frontend".into(),
            cas: vec!["ca1".into(), "ca2".into()],
            file: None,
            namespaces: vec![],
        };
        rt().block_on(async {
            assert_eq!(s.save_bundle(&b).await.unwrap(), SaveOutcome::Created);
            assert_eq!(s.save_bundle(&b).await.unwrap(), SaveOutcome::Replaced);
            assert_eq!(s.load_bundle("frontend").await.unwrap(), b);
            assert!(matches!(
                s.load_bundle("x").await,
                Err(Error::UnknownBundle(_))
            ));
            assert_eq!(s.list_bundles().await.unwrap(), vec![b.clone()]);
        });
    }
}
