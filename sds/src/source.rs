//! Where certificates come from: the [`CertSource`] trait and its two implementations,
//! [`LocalCaSource`] (issue from a CA in a meshca home) and [`FileSource`] (PEM files, such
//! as a mounted `kubernetes.io/tls` Secret).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use meshca::identity::Sans;
use meshca::issue::LedgerEntry;
use meshca::key::{KeyAlgorithm, PrivateKey};
use meshca::store::{LocalStore, Store};
use meshca::x509::{verify_chain, CertInfo, Usage};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use zeroize::Zeroizing;

/// A workload certificate with its key.
pub struct WorkloadCert {
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key, PKCS#8 (or as found in the key file) PEM.
    pub key_pem: Zeroizing<String>,
    /// Parsed leaf.
    pub info: CertInfo,
    /// When this certificate was obtained; renewal is scheduled from here.
    pub obtained_at: OffsetDateTime,
}

impl std::fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("serial", &self.info.serial)
            .field("not_after", &self.info.not_after)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl WorkloadCert {
    /// The chain as PEM.
    pub fn chain_pem(&self) -> String {
        meshca::pemutil::certs_to_pem(self.chain.iter())
    }

    /// When renewal is due: `fraction` of the time from `obtained_at` to notAfter, pulled
    /// earlier by `jitter` (a number in `[0, 1)`, scaled by `max_jitter` of that span).
    pub fn renew_deadline(&self, fraction: f64, jitter: f64, max_jitter: f64) -> OffsetDateTime {
        let start = self.obtained_at.max(self.info.not_before);
        let span = (self.info.not_after - start).max(time::Duration::ZERO);
        let f = (fraction * (1.0 - max_jitter * jitter)).clamp(0.0, 1.0);
        start + span * f
    }
}

/// What a source provides at one moment.
#[derive(Debug, Default)]
pub struct Material {
    /// A workload certificate, when the source produced or read one (`None`: keep the
    /// current one).
    pub workload: Option<WorkloadCert>,
    /// Anchors of the workload's trust bundle (`ROOTCA`).
    pub bundle: Vec<CertificateDer<'static>>,
    /// Further named trust bundles, served under their names.
    pub named_bundles: BTreeMap<String, Vec<CertificateDer<'static>>>,
    /// Renew at once unless the current certificate's authority key identifier is this
    /// subject key identifier: set while the issuing CA's rotation was activated with
    /// `--now`. Keys, not DNs, tell a rotated CA from its predecessor.
    pub renew_unless_issued_by: Option<String>,
    /// CRLs of the `ROOTCA` bundle's CAs (`sds serve --crl`).
    pub crls: Option<crate::secrets::Crls>,
}

/// A source failure. Displayed as one line, never with key material.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {message}")]
pub struct SourceError {
    /// The source (`local-ca:...`, `files:...`).
    pub source_name: String,
    /// What went wrong.
    pub message: String,
    /// Whether the configuration or the input is at fault (a missing file, an unknown CA,
    /// a policy denial) rather than the environment.
    pub user_error: bool,
}

/// Errors a source can wrap: library errors know whether they are the user's.
pub trait SourceFailure {
    /// The message and whether it is the user's fault.
    fn parts(self) -> (String, bool);
}

impl SourceFailure for meshca::Error {
    fn parts(self) -> (String, bool) {
        let user = self.is_user_error();
        (self.to_string(), user)
    }
}

impl SourceFailure for String {
    fn parts(self) -> (String, bool) {
        (self, true)
    }
}

/// A place certificates come from. The rotation loop calls [`CertSource::load`] on every
/// poll tick and when a renewal is due; it verifies what it gets before publishing.
#[async_trait]
pub trait CertSource: Send + Sync + std::fmt::Debug {
    /// A short description for logs (`local-ca:/home/ca1`, `files:/etc/tls`).
    fn describe(&self) -> String;

    /// Returns the current material. With `renew`, a new workload certificate is wanted
    /// (the local CA issues one; the file source always re-reads its files).
    async fn load(&self, renew: bool, now: OffsetDateTime) -> Result<Material, SourceError>;

    /// The identity every workload certificate from this source must carry, if known.
    fn expected_identity(&self) -> Option<&Sans>;

    /// The directories whose changes are changes of this source (watched instead of
    /// polled; see [`crate::fswatch`]). Empty: the source is polled.
    fn watch_spec(&self) -> crate::fswatch::WatchSpec {
        crate::fswatch::WatchSpec::default()
    }
}

/// Checks a workload certificate before it is published: the key matches the leaf, the
/// chain validates to `anchors` for both server and client use at `now`, and the leaf
/// carries `expected` (its SPIFFE ID exactly, and every DNS name and IP).
pub fn verify_workload(
    w: &WorkloadCert,
    anchors: &[CertificateDer<'static>],
    expected: Option<&Sans>,
    now: OffsetDateTime,
) -> Result<(), String> {
    let key = PrivateKey::from_pem(&w.key_pem, "private key").map_err(|e| e.to_string())?;
    if key.public_key_der() != w.info.spki_der {
        return Err("the private key does not match the certificate".into());
    }
    if anchors.is_empty() {
        return Err("the trust bundle is empty".into());
    }
    let (leaf, rest) = w.chain.split_first().ok_or("empty certificate chain")?;
    for usage in [Usage::Server, Usage::Client] {
        verify_chain(leaf, rest, anchors, now, usage)
            .map_err(|e| format!("against the trust bundle: {e}"))?;
    }
    if let Some(exp) = expected {
        if let Some(id) = &exp.spiffe_id {
            if w.info.sans.uri != [id.to_string()] {
                return Err(format!(
                    "certificate identity {:?} is not the expected {id}",
                    w.info.sans.uri
                ));
            }
        }
        for d in &exp.dns {
            if !w
                .info
                .sans
                .dns
                .iter()
                .any(|x| x.eq_ignore_ascii_case(d.as_str()))
            {
                return Err(format!("certificate lacks DNS name {d}"));
            }
        }
        for ip in &exp.ips {
            if !w.info.sans.ip.contains(&ip.to_string()) {
                return Err(format!("certificate lacks IP {ip}"));
            }
        }
    }
    Ok(())
}

/// Issues the workload certificate from a CA in a meshca home and renews it.
#[derive(Debug)]
pub struct LocalCaSource {
    store: LocalStore,
    ca: String,
    bundle: Option<String>,
    sans: Sans,
    ttl: Option<Duration>,
    key: KeyAlgorithm,
    serve_named_bundles: bool,
    serve_crls: bool,
    /// Built CRLs by CA fingerprint: (revoked serials, built at, PEM). A CRL is rebuilt only
    /// when its revocations change or half its validity has passed, so an unchanged CRL is
    /// never pushed again (ECDSA signatures differ on every signing).
    crl_cache: std::sync::Mutex<BTreeMap<String, (String, OffsetDateTime, String)>>,
}

/// nextUpdate of the CRLs the SDS server builds; they are rebuilt after half of it.
pub const SDS_CRL_VALIDITY: Duration = Duration::from_secs(24 * 3600);

impl LocalCaSource {
    /// A source issuing `sans` from CA `ca` in `home`; `bundle` names the trust bundle
    /// served as `ROOTCA` (default: the CA's own root, and while it is rotated the other
    /// side's root too, as in every bundle holding it).
    pub fn new(
        home: &Path,
        ca: &str,
        bundle: Option<String>,
        sans: Sans,
        ttl: Option<Duration>,
        key: KeyAlgorithm,
    ) -> Result<Self, SourceError> {
        let store = LocalStore::open(home).map_err(|e| SourceError {
            source_name: format!("local-ca:{}", home.display()),
            message: e.to_string(),
            user_error: true,
        })?;
        if sans.is_empty() {
            return Err(SourceError {
                source_name: format!("local-ca:{}", home.display()),
                message: "no identity: give a SPIFFE ID, namespace/service account or DNS name"
                    .into(),
                user_error: true,
            });
        }
        Ok(LocalCaSource {
            store,
            ca: ca.to_string(),
            bundle,
            sans,
            ttl,
            key,
            serve_named_bundles: true,
            serve_crls: false,
            crl_cache: std::sync::Mutex::new(BTreeMap::new()),
        })
    }

    /// Whether `ROOTCA` carries the CRLs of its CAs (default off).
    pub fn serve_crls(mut self, on: bool) -> Self {
        self.serve_crls = on;
        self
    }

    /// The CRLs of every CA in the chains of the `ROOTCA` bundle's members (Envoy wants one
    /// for each CA of a chain), including both versions of a CA under rotation.
    async fn crls(&self, now: OffsetDateTime) -> Result<Option<crate::secrets::Crls>, SourceError> {
        if !self.serve_crls {
            return Ok(None);
        }
        let members = match &self.bundle {
            Some(b) => {
                self.store
                    .load_bundle(b)
                    .await
                    .map_err(|e| self.err(e))?
                    .cas
            }
            None => vec![self.ca.clone()],
        };
        let cas = meshca::store::chain_cas(&self.store, &members)
            .await
            .map_err(|e| self.err(e))?;
        let revoked = self.store.revocations().await.map_err(|e| self.err(e))?;
        let mut pem = String::new();
        let mut leaf_only = false;
        let mut cache = self.crl_cache.lock().unwrap_or_else(|p| p.into_inner());
        for c in &cas {
            if c.key.is_none() {
                leaf_only = true;
                continue;
            }
            let fp = meshca::pemutil::fingerprint_sha256(&c.cert);
            let mine: Vec<_> = revoked
                .iter()
                .filter(|r| r.ca == c.meta.name)
                .cloned()
                .collect();
            let key: String = mine.iter().map(|r| format!("{},", r.serial)).collect();
            let fresh = cache
                .get(&fp)
                .filter(|(k, at, _)| *k == key && now < *at + SDS_CRL_VALIDITY / 2);
            let crl = match fresh {
                Some((_, _, p)) => p.clone(),
                None => {
                    let der = meshca::crl::build(
                        c,
                        &mine,
                        now,
                        SDS_CRL_VALIDITY,
                        meshca::crl::crl_number(now),
                    )
                    .map_err(|e| self.err(e))?;
                    let p = meshca::crl::to_pem(&der);
                    cache.insert(fp, (key, now, p.clone()));
                    p
                }
            };
            pem.push_str(&crl);
        }
        Ok(Some(crate::secrets::Crls { pem, leaf_only }))
    }

    /// Whether every bundle of the store is also served under its own name (default on).
    pub fn serve_named_bundles(mut self, on: bool) -> Self {
        self.serve_named_bundles = on;
        self
    }

    fn err(&self, e: impl SourceFailure) -> SourceError {
        let (message, user_error) = e.parts();
        SourceError {
            source_name: self.describe(),
            message,
            user_error,
        }
    }
}

#[async_trait]
impl CertSource for LocalCaSource {
    fn describe(&self) -> String {
        format!("local-ca:{}/{}", self.store.home().display(), self.ca)
    }

    async fn load(&self, renew: bool, now: OffsetDateTime) -> Result<Material, SourceError> {
        let bundle = match &self.bundle {
            Some(b) => {
                let spec = self.store.load_bundle(b).await.map_err(|e| self.err(e))?;
                meshca::store::bundle_anchors(&self.store, &spec)
                    .await
                    .map_err(|e| self.err(e))?
            }
            // The CA's root plus, during a rotation, the other side's: from prepare until
            // prune the same roots as a bundle naming the CA, so a renewal from the new CA
            // never arrives together with the loss of trust in the old one.
            None => meshca::store::ca_anchors(&self.store, &self.ca)
                .await
                .map_err(|e| self.err(e))?,
        };
        let mut named_bundles = BTreeMap::new();
        if self.serve_named_bundles {
            for spec in self.store.list_bundles().await.map_err(|e| self.err(e))? {
                match meshca::store::bundle_anchors(&self.store, &spec).await {
                    Ok(a) => {
                        named_bundles.insert(spec.name.clone(), a);
                    }
                    Err(e) => {
                        tracing::warn!(bundle = %spec.name, error = %e, "trust bundle skipped")
                    }
                }
            }
        }
        let rotated = meshca::store::rotate::renew_now_for(&self.store, &self.ca)
            .await
            .map_err(|e| self.err(e))?;
        let renew_unless_issued_by = if rotated {
            let ca = self
                .store
                .load_ca(&self.ca)
                .await
                .map_err(|e| self.err(e))?;
            ca.info().map_err(|e| self.err(e))?.subject_key_id
        } else {
            None
        };
        let workload = if renew {
            let issuer = meshca::store::load_issuer(&self.store, &self.ca)
                .await
                .map_err(|e| self.err(e))?;
            let w =
                meshca::issue::issue_workload(issuer.as_ref(), &self.sans, self.ttl, self.key, now)
                    .await
                    .map_err(|e| self.err(e))?;
            if let Err(e) = self
                .store
                .record(&LedgerEntry::for_cert(&self.ca, &w.cert, now))
                .await
            {
                tracing::warn!(error = %e, "could not append to the issuance ledger");
            }
            let mut chain = vec![w.cert.leaf.clone()];
            chain.extend(w.cert.intermediates.iter().cloned());
            Some(WorkloadCert {
                chain,
                key_pem: w.key.to_pkcs8_pem(),
                info: w.cert.info.clone(),
                obtained_at: now,
            })
        } else {
            None
        };
        Ok(Material {
            workload,
            bundle,
            named_bundles,
            renew_unless_issued_by,
            crls: self.crls(now).await?,
        })
    }

    fn expected_identity(&self) -> Option<&Sans> {
        Some(&self.sans)
    }

    /// The whole home: CAs, bundles, rotation records and revocations. The ledger (which
    /// this source appends to on every issuance) and the lock files are not changes.
    fn watch_spec(&self) -> crate::fswatch::WatchSpec {
        crate::fswatch::WatchSpec {
            dirs: vec![(self.store.home().to_path_buf(), true)],
            ignore: ["ledger.jsonl", ".lock", ".rotation.lock"]
                .into_iter()
                .map(Into::into)
                .collect(),
        }
    }
}

/// Serves PEM files: a certificate chain, its key and a CA bundle. Works with a mounted
/// Kubernetes Secret, whose files are symlinks through `..data` that Kubernetes swaps
/// atomically: paths are re-resolved and re-read on every change of their directories
/// (or every poll where they cannot be watched).
#[derive(Debug)]
pub struct FileSource {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    expected: Option<Sans>,
}

impl FileSource {
    /// Files `cert` (leaf first), `key` and `ca` (trust bundle).
    pub fn new(cert: PathBuf, key: PathBuf, ca: PathBuf, expected: Option<Sans>) -> Self {
        FileSource {
            cert,
            key,
            ca,
            expected,
        }
    }

    /// The usual layout of a mounted `kubernetes.io/tls` Secret: `tls.crt`, `tls.key`, `ca.crt`.
    pub fn secret_dir(dir: &Path, expected: Option<Sans>) -> Self {
        FileSource::new(
            dir.join("tls.crt"),
            dir.join("tls.key"),
            dir.join("ca.crt"),
            expected,
        )
    }

    fn err(&self, e: impl SourceFailure) -> SourceError {
        let (message, user_error) = e.parts();
        SourceError {
            source_name: self.describe(),
            message,
            user_error,
        }
    }
}

#[async_trait]
impl CertSource for FileSource {
    fn describe(&self) -> String {
        format!("files:{}", self.cert.display())
    }

    async fn load(&self, _renew: bool, now: OffsetDateTime) -> Result<Material, SourceError> {
        let (cert, key, ca) = (self.cert.clone(), self.key.clone(), self.ca.clone());
        let read = tokio::task::spawn_blocking(move || -> meshca::Result<_> {
            let c = meshca::fsutil::read_limited(&cert)?;
            let k = Zeroizing::new(meshca::fsutil::read_limited(&key)?);
            let a = meshca::fsutil::read_limited(&ca)?;
            Ok((c, k, a))
        })
        .await
        .map_err(|e| self.err(format!("reader task failed: {e}")))?;
        let (c, k, a) = read.map_err(|e| self.err(e))?;
        let chain = meshca::pemutil::parse_certs(&c, &self.cert.display().to_string())
            .map_err(|e| self.err(e))?;
        let bundle = meshca::pemutil::parse_certs(&a, &self.ca.display().to_string())
            .map_err(|e| self.err(e))?;
        let key_pem = Zeroizing::new(
            String::from_utf8(k.to_vec())
                .map_err(|_| self.err(format!("{}: not PEM text", self.key.display())))?,
        );
        // Parse once here so a bad key is reported as this file's problem.
        PrivateKey::from_pem(&key_pem, &self.key.display().to_string()).map_err(|e| self.err(e))?;
        let info = CertInfo::from_der(&chain[0]).map_err(|e| self.err(e))?;
        Ok(Material {
            workload: Some(WorkloadCert {
                chain,
                key_pem,
                info,
                obtained_at: now,
            }),
            bundle,
            named_bundles: BTreeMap::new(),
            renew_unless_issued_by: None,
            crls: None,
        })
    }

    fn expected_identity(&self) -> Option<&Sans> {
        self.expected.as_ref()
    }

    /// The directories of the three files (and of their symlink targets): a file changed in
    /// place, replaced by rename, or a `..data` symlink swap all show there.
    fn watch_spec(&self) -> crate::fswatch::WatchSpec {
        crate::fswatch::WatchSpec::parents_of([
            self.cert.as_path(),
            self.key.as_path(),
            self.ca.as_path(),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshca::ca::{create_root, CaSpec};
    use meshca::identity::{SpiffeId, TrustDomain};
    use meshca::issue::{issue_workload, LocalIssuer};

    async fn workload(
        ca: &meshca::ca::CaMaterial,
        sans: &Sans,
        now: OffsetDateTime,
    ) -> WorkloadCert {
        let spec_ca = meshca::ca::CaMaterial {
            meta: ca.meta.clone(),
            cert: ca.cert.clone(),
            parents: ca.parents.clone(),
            key: Some(PrivateKey::from_pem(&ca.key.as_ref().unwrap().to_pkcs8_pem(), "k").unwrap()),
        };
        let issuer = LocalIssuer::new(spec_ca).unwrap();
        let w = issue_workload(
            &issuer,
            sans,
            Some(Duration::from_secs(3600)),
            KeyAlgorithm::EcdsaP256,
            now,
        )
        .await
        .unwrap();
        WorkloadCert {
            chain: vec![w.cert.leaf.clone()],
            key_pem: w.key.to_pkcs8_pem(),
            info: w.cert.info,
            obtained_at: now,
        }
    }

    fn sans(sa: &str) -> Sans {
        Sans {
            spiffe_id: Some(
                SpiffeId::for_service_account(&TrustDomain::default(), "ns", sa).unwrap(),
            ),
            ..Sans::default()
        }
    }

    #[tokio::test]
    async fn verify_checks_bundle_identity_and_key() {
        let now = OffsetDateTime::now_utc();
        let ca1 = create_root(&CaSpec::root("ca1"), now).unwrap();
        let ca2 = create_root(&CaSpec::root("ca2"), now).unwrap();
        let w = workload(&ca1, &sans("a"), now).await;
        verify_workload(&w, std::slice::from_ref(&ca1.cert), Some(&sans("a")), now).unwrap();
        let e = verify_workload(&w, std::slice::from_ref(&ca2.cert), Some(&sans("a")), now)
            .unwrap_err();
        assert!(e.contains("unknown issuer"), "{e}");
        let e = verify_workload(&w, std::slice::from_ref(&ca1.cert), Some(&sans("b")), now)
            .unwrap_err();
        assert!(e.contains("not the expected"), "{e}");
        assert!(verify_workload(&w, &[], None, now)
            .unwrap_err()
            .contains("empty"));
        let other = workload(&ca1, &sans("a"), now).await;
        let mixed = WorkloadCert {
            chain: w.chain.clone(),
            key_pem: other.key_pem.clone(),
            info: w.info.clone(),
            obtained_at: now,
        };
        let e = verify_workload(&mixed, std::slice::from_ref(&ca1.cert), None, now).unwrap_err();
        assert!(e.contains("does not match"), "{e}");
        assert!(
            !format!("{w:?}").contains("PRIVATE"),
            "Debug redacts the key"
        );
        // Expired by the time of checking.
        let later = now + time::Duration::hours(2);
        assert!(
            verify_workload(&w, std::slice::from_ref(&ca1.cert), None, later)
                .unwrap_err()
                .contains("expired")
        );
    }

    #[tokio::test]
    async fn renew_deadline_uses_fraction_and_jitter() {
        let now = OffsetDateTime::now_utc();
        let ca1 = create_root(&CaSpec::root("ca1"), now).unwrap();
        let w = workload(&ca1, &sans("a"), now).await;
        // notBefore is backdated; the span starts at obtained_at.
        let span = w.info.not_after - now;
        let d = w.renew_deadline(0.5, 0.0, 0.1);
        let diff: time::Duration = d - (now + span * 0.5);
        assert!(diff.abs() < time::Duration::seconds(1));
        let d2 = w.renew_deadline(0.5, 0.999, 0.1);
        assert!(d2 < d && d2 > now + span * 0.44);
        assert!(w.renew_deadline(2.0, 0.0, 0.0) <= w.info.not_after);
    }
}
