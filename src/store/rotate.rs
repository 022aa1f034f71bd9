//! The steps of `meshca ca rotate` against a [`Store`]. Each phase is a sequence of steps,
//! each atomic in the store and recorded in the rotation record before or after it runs, so
//! that re-running a phase after a crash (kill -9 included) finishes it. The decisions are
//! in [`crate::rotation`].
//!
//! Steps:
//! - prepare: record the rotation; write the next CAs (one atomic slot write); publish.
//! - activate: record `activating`; save the current CAs as the previous slot (one atomic
//!   write, before any swap); replace each CA by its next version, parents first (each an
//!   atomic CA replace, skipped when already done); record `active`; drop the next slot.
//! - prune: check the ledger and the live certificates ([`Store::live_certificates`]);
//!   record `pruning`; drop the previous slot; publish; drop the
//!   record.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use time::OffsetDateTime;

use super::{bundle_anchors, PhaseLock, SaveOutcome, Slot, Store};
use crate::bundle;
use crate::ca::{create_intermediate, create_root, Backend, CaMaterial};
use crate::error::{Error, Result};
use crate::fsutil::{self, PUBLIC_MODE};
use crate::pemutil;
use crate::rotation::{self, Phase, Plan, Request, RotationState};

/// Called after each step is recorded, with the step's name.
pub type Progress = std::sync::Arc<dyn Fn(&str) + Send + Sync>;

/// Options of a phase.
#[derive(Clone, Default)]
pub struct RotateOptions {
    /// activate: ask SDS servers to re-issue at once instead of at their next renewal.
    pub renew_now: bool,
    /// prune: go ahead although unexpired certificates of the previous CA are in the ledger.
    pub force: bool,
    /// Re-export the PEM of every affected bundle into this directory.
    pub out_dir: Option<PathBuf>,
    /// Told each step once it is recorded in the store.
    pub progress: Option<Progress>,
}

impl std::fmt::Debug for RotateOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RotateOptions")
            .field("renew_now", &self.renew_now)
            .field("force", &self.force)
            .field("out_dir", &self.out_dir)
            .finish_non_exhaustive()
    }
}

/// Records `step` in the rotation record (atomically), then reports it.
async fn record(
    store: &dyn Store,
    lock: &dyn PhaseLock,
    st: &mut RotationState,
    steps: &mut Vec<String>,
    step: String,
    opts: &RotateOptions,
    now: OffsetDateTime,
) -> Result<()> {
    st.step(step.clone(), now);
    lock.check()?;
    store.save_rotation(st).await?;
    if let Some(p) = &opts.progress {
        p(&step);
    }
    steps.push(step);
    Ok(())
}

/// What a phase run did.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseReport {
    /// The rotated CA.
    pub ca: String,
    /// The phase that was run.
    pub phase: String,
    /// The rotation's phase afterwards (`idle` once pruned).
    pub state: String,
    /// Steps done by this run.
    pub steps: Vec<String>,
    /// Bundles holding the rotated CAs.
    pub bundles: Vec<String>,
    /// Bundle files written.
    pub files: Vec<PathBuf>,
    /// Serials of unexpired certificates of the previous CA that `--force` pruned past.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub forced_past: Vec<String>,
}

/// One version of a CA in [`RotationStatus`].
#[derive(Clone, Debug, Serialize)]
pub struct CaVersion {
    /// SHA-256 fingerprint of the CA certificate.
    pub sha256: String,
    /// Subject key identifier.
    pub subject_key_id: Option<String>,
    /// notAfter.
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// SHA-256 fingerprint of its root.
    pub root_sha256: String,
    /// Bundles whose anchors hold that root now.
    pub bundles: Vec<String>,
}

/// `meshca ca rotate NAME --status`.
#[derive(Clone, Debug, Serialize)]
pub struct RotationStatus {
    /// The CA.
    pub ca: String,
    /// `idle` or the rotation's phase.
    pub phase: String,
    /// The CA and the local CAs below it that rotate with it.
    pub cas: Vec<String>,
    /// The version that issues now.
    pub current: CaVersion,
    /// The prepared version.
    pub next: Option<CaVersion>,
    /// The replaced version, trusted until prune.
    pub previous: Option<CaVersion>,
    /// Whether activate asked for immediate renewal.
    pub renew_now: bool,
    /// What the next phase is and what stands in its way (empty: nothing).
    pub next_phase: Option<String>,
    /// Reasons the next phase cannot run yet.
    pub blocked_by: Vec<String>,
    /// Serials blocking prune.
    pub blocking_serials: Vec<String>,
    /// Steps recorded so far.
    pub steps: Vec<rotation::StepRecord>,
}

/// Runs (or finishes) one phase of the rotation of `ca`, holding the store's rotation lock
/// for the whole phase ([`Store::lock_rotation`]): a second phase started meanwhile, for any
/// CA, fails at once naming the holder instead of interleaving its steps.
pub async fn run_phase(
    store: &dyn Store,
    ca: &str,
    req: Request,
    opts: &RotateOptions,
    now: OffsetDateTime,
) -> Result<PhaseReport> {
    let holder = super::lock_holder(&format!(
        "meshca ca rotate {ca} --phase {}",
        phase_name(req)
    ));
    let lock = store.lock_rotation(&holder).await?;
    let result = run_phase_locked(store, lock.as_ref(), ca, req, opts, now).await;
    if let Err(e) = lock.release().await {
        // The phase's steps are recorded; a lock left behind expires (or is taken over once
        // its holder is gone), so this is not the phase's failure.
        tracing::warn!(error = %e, "could not release the rotation lock");
    }
    result
}

fn phase_name(req: Request) -> &'static str {
    match req {
        Request::Prepare => "prepare",
        Request::Activate => "activate",
        Request::Prune => "prune",
    }
}

/// The phase's steps. Every write is preceded by [`PhaseLock::check`], so a phase that lost
/// its lock stops before writing anything more.
async fn run_phase_locked(
    store: &dyn Store,
    lock: &dyn PhaseLock,
    ca: &str,
    req: Request,
    opts: &RotateOptions,
    now: OffsetDateTime,
) -> Result<PhaseReport> {
    let state = store.load_rotation(ca).await?;
    if state.is_none() {
        // Refuse a CA that rotates as part of another CA's rotation.
        for r in store.list_rotations().await? {
            if r.covers(ca) {
                return Err(Error::invalid(
                    "rotation",
                    format!(
                        "CA {ca} rotates with {} (phase {}); run the phases on {}",
                        r.ca, r.phase, r.ca
                    ),
                ));
            }
        }
        // Make sure the name exists before anything is recorded.
        store.load_ca(ca).await?;
    }
    let plan = rotation::plan(state.as_ref(), req, ca)?;
    let mut report = PhaseReport {
        ca: ca.to_string(),
        phase: phase_name(req).into(),
        state: String::new(),
        steps: Vec::new(),
        bundles: Vec::new(),
        files: Vec::new(),
        forced_past: Vec::new(),
    };
    let mut st = match (plan, state) {
        (Plan::Start, _) => start(store, ca, now).await?,
        (_, Some(s)) => s,
        (_, None) => unreachable!("plan resumes only an existing rotation"),
    };
    match req {
        Request::Prepare => {
            if plan == Plan::Start {
                record(
                    store,
                    lock,
                    &mut st,
                    &mut report.steps,
                    "started".into(),
                    opts,
                    now,
                )
                .await?;
            }
            if store.load_rotation_cas(ca, Slot::Next).await?.is_empty() {
                let next = build_next(store, &st, now).await?;
                lock.check()?;
                store.save_rotation_cas(ca, Slot::Next, &next).await?;
                record(
                    store,
                    lock,
                    &mut st,
                    &mut report.steps,
                    "next-created".into(),
                    opts,
                    now,
                )
                .await?;
            }
            let (bundles, files) = publish(store, lock, &st, opts.out_dir.as_deref()).await?;
            record(
                store,
                lock,
                &mut st,
                &mut report.steps,
                "published".into(),
                opts,
                now,
            )
            .await?;
            report.bundles = bundles;
            report.files = files;
        }
        Request::Activate => {
            let next = store.load_rotation_cas(ca, Slot::Next).await?;
            if st.phase == Phase::Prepared {
                if next.len() != st.cas.len() || !st.steps.iter().any(|s| s.step == "published") {
                    return Err(Error::invalid(
                        "rotation",
                        format!("CA {ca}: prepare did not finish; re-run --phase prepare"),
                    ));
                }
                st.phase = Phase::Activating;
                st.activated_at = Some(now);
                st.renew_now = opts.renew_now;
                record(
                    store,
                    lock,
                    &mut st,
                    &mut report.steps,
                    "activating".into(),
                    opts,
                    now,
                )
                .await?;
            } else if opts.renew_now && !st.renew_now {
                st.renew_now = true;
                record(
                    store,
                    lock,
                    &mut st,
                    &mut report.steps,
                    "renew-now".into(),
                    opts,
                    now,
                )
                .await?;
            }
            if st.phase == Phase::Activating {
                if store
                    .load_rotation_cas(ca, Slot::Previous)
                    .await?
                    .is_empty()
                {
                    // Nothing is swapped before this slot exists, so these are the old CAs.
                    let mut cur = Vec::new();
                    for name in &st.cas {
                        cur.push(store.load_ca(name).await?);
                    }
                    lock.check()?;
                    store.save_rotation_cas(ca, Slot::Previous, &cur).await?;
                    record(
                        store,
                        lock,
                        &mut st,
                        &mut report.steps,
                        "previous-saved".into(),
                        opts,
                        now,
                    )
                    .await?;
                }
                for name in st.cas.clone() {
                    let n = next.iter().find(|c| c.meta.name == name).ok_or_else(|| {
                        Error::Corrupt(format!("rotation of {ca}: no next version of CA {name}"))
                    })?;
                    if store.load_ca(&name).await?.cert != n.cert {
                        lock.check()?;
                        let outcome = store.save_ca(n, true).await?;
                        debug_assert_eq!(outcome, SaveOutcome::Replaced);
                        record(
                            store,
                            lock,
                            &mut st,
                            &mut report.steps,
                            format!("swapped:{name}"),
                            opts,
                            now,
                        )
                        .await?;
                    }
                }
                st.phase = Phase::Active;
                record(
                    store,
                    lock,
                    &mut st,
                    &mut report.steps,
                    "active".into(),
                    opts,
                    now,
                )
                .await?;
            }
            // The next CAs are now the current ones.
            lock.check()?;
            store.remove_rotation_cas(ca, Slot::Next).await?;
            let (bundles, files) = publish(store, lock, &st, opts.out_dir.as_deref()).await?;
            report.bundles = bundles;
            report.files = files;
        }
        Request::Prune => {
            if st.phase == Phase::Active {
                let (mut blocking, unchecked) = blocking_serials(store, &st, now).await?;
                if let Some(e) = unchecked {
                    if !opts.force {
                        return Err(Error::invalid(
                            "rotation",
                            format!("CA {ca}: prune refused: cannot check which certificates of the previous CA are still in use: {e} (grant the listing, or use --force)"),
                        ));
                    }
                    blocking.push(format!("certificates in use not checked: {e}"));
                }
                if !blocking.is_empty() && !opts.force {
                    return Err(Error::invalid(
                        "rotation",
                        format!(
                            "CA {ca}: prune refused: {} unexpired certificate(s) from the previous CA in the ledger or still in use: {} (re-issue them from the new CA, wait until they expire, or use --force)",
                            blocking.len(),
                            list(&blocking)
                        ),
                    ));
                }
                report.forced_past = blocking;
                st.phase = Phase::Pruning;
                record(
                    store,
                    lock,
                    &mut st,
                    &mut report.steps,
                    "pruning".into(),
                    opts,
                    now,
                )
                .await?;
            }
            lock.check()?;
            store.remove_rotation_cas(ca, Slot::Previous).await?;
            lock.check()?;
            store.remove_rotation_cas(ca, Slot::Next).await?;
            let (bundles, files) = publish(store, lock, &st, opts.out_dir.as_deref()).await?;
            report.bundles = bundles;
            report.files = files;
            lock.check()?;
            store.remove_rotation(ca).await?;
            report.steps.push("pruned".into());
            report.state = "idle".into();
            return Ok(report);
        }
    }
    report.state = st.phase.to_string();
    Ok(report)
}

fn list(serials: &[String]) -> String {
    const SHOWN: usize = 20;
    let mut s = serials
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if serials.len() > SHOWN {
        s.push_str(&format!(" and {} more", serials.len() - SHOWN));
    }
    s
}

/// The record of a new rotation: the CA and every local CA below it.
async fn start(store: &dyn Store, ca: &str, now: OffsetDateTime) -> Result<RotationState> {
    let mut parents = Vec::new();
    for n in store.list_cas().await? {
        let c = store.load_ca(&n).await?;
        parents.push((n, c.meta.parent.clone()));
    }
    let cas = rotation::lineage(ca, &parents);
    for n in &cas {
        let c = store.load_ca(n).await?;
        if c.meta.backend != Backend::Local || c.key.is_none() {
            return Err(Error::Unsupported(format!(
                "rotating CA {n}: its key lives in {:?}; meshca rotates only CAs whose key it holds",
                c.meta.backend
            )));
        }
    }
    Ok(RotationState::new(ca, cas, now))
}

/// Creates the next version of every CA of the rotation, parents first.
async fn build_next(
    store: &dyn Store,
    st: &RotationState,
    now: OffsetDateTime,
) -> Result<Vec<CaMaterial>> {
    let mut built: Vec<CaMaterial> = Vec::new();
    for name in &st.cas {
        let cur = store.load_ca(name).await?;
        let spec = rotation::respec(&cur)?;
        let next = match &spec.parent {
            None => create_root(&spec, now)?,
            Some(p) => match built.iter().find(|b| &b.meta.name == p) {
                Some(parent) => create_intermediate(&spec, parent, now)?,
                None => create_intermediate(&spec, &store.load_ca(p).await?, now)?,
            },
        };
        let mut next = next;
        // Keep the stored facts (backend, trust domain, policy); only created_at is new.
        next.meta = crate::ca::CaMeta {
            created_at: now,
            ..cur.meta.clone()
        };
        built.push(next);
    }
    Ok(built)
}

/// The bundles that hold a CA of the rotation, published where the store keeps copies
/// ([`Store::publish_bundle`]), and (with `out_dir`) their re-exported PEMs.
async fn publish(
    store: &dyn Store,
    lock: &dyn PhaseLock,
    st: &RotationState,
    out_dir: Option<&Path>,
) -> Result<(Vec<String>, Vec<PathBuf>)> {
    let mut names = Vec::new();
    let mut files = Vec::new();
    for b in store.list_bundles().await? {
        if !b.cas.iter().any(|c| st.covers(c)) {
            continue;
        }
        let anchors = bundle_anchors(store, &b).await?;
        lock.check()?;
        store.publish_bundle(&b, &anchors).await?;
        if let Some(dir) = out_dir {
            fsutil::create_private_dir(dir)?;
            let p = dir.join(b.file_name());
            fsutil::write_atomic(&p, bundle::to_pem(&anchors).as_bytes(), PUBLIC_MODE)?;
            files.push(p);
        }
        names.push(b.name);
    }
    Ok((names, files))
}

/// What blocks prune: unexpired certificates of the previous CAs in the ledger, then those
/// still in use ([`Store::live_certificates`]) that the ledger misses. The second value is
/// why the certificates in use could not be checked, if they could not.
async fn blocking_serials(
    store: &dyn Store,
    st: &RotationState,
    now: OffsetDateTime,
) -> Result<(Vec<String>, Option<Error>)> {
    let previous = store.load_rotation_cas(&st.ca, Slot::Previous).await?;
    let mut ski = BTreeMap::new();
    for p in &previous {
        if let Some(k) = p.info()?.subject_key_id {
            ski.insert(p.meta.name.clone(), k);
        }
    }
    // Rotating an intermediate keeps the root, so nothing it signed loses trust.
    let root_changed = previous.iter().any(|p| p.meta.name == st.ca && p.is_root());
    if !root_changed {
        return Ok((Vec::new(), None));
    }
    let ledger = store.ledger().await?;
    let lookup = |c: &str| ski.get(c).cloned();
    let entries = rotation::blocking_entries(st, &ledger, &lookup, now);
    let in_ledger: std::collections::BTreeSet<&str> =
        entries.iter().map(|e| e.serial.as_str()).collect();
    let mut out: Vec<String> = entries
        .iter()
        .map(|e| format!("{} ({})", e.serial, e.ca))
        .collect();
    // The ledger can miss entries: also what is live where the store's certificates go.
    let skis = ski.values().cloned().collect();
    match store.live_certificates(&skis, now).await {
        Ok(live) => {
            for l in live {
                if !in_ledger.contains(l.serial.as_str()) {
                    out.push(l.to_string());
                }
            }
            Ok((out, None))
        }
        Err(e) => Ok((out, Some(e))),
    }
}

/// The status of `ca`'s rotation (or `idle`).
pub async fn status(store: &dyn Store, ca: &str, now: OffsetDateTime) -> Result<RotationStatus> {
    let current = store.load_ca(ca).await?;
    let st = match store.load_rotation(ca).await? {
        Some(s) => Some(s),
        None => store
            .list_rotations()
            .await?
            .into_iter()
            .find(|r| r.covers(ca)),
    };
    let owner = st.as_ref().map(|s| s.ca.clone()).unwrap_or(ca.to_string());
    let pick = |v: Vec<CaMaterial>| v.into_iter().find(|c| c.meta.name == ca);
    let next = pick(store.load_rotation_cas(&owner, Slot::Next).await?);
    let previous = pick(store.load_rotation_cas(&owner, Slot::Previous).await?);
    let mut anchors_by_bundle = Vec::new();
    for b in store.list_bundles().await? {
        let fps: Vec<String> = bundle_anchors(store, &b)
            .await?
            .iter()
            .map(|a| pemutil::fingerprint_sha256(a))
            .collect();
        anchors_by_bundle.push((b.name, fps));
    }
    let version = |c: &CaMaterial| -> Result<CaVersion> {
        let info = c.info()?;
        let root = pemutil::fingerprint_sha256(c.root());
        Ok(CaVersion {
            sha256: info.sha256_fingerprint,
            subject_key_id: info.subject_key_id,
            not_after: info.not_after,
            bundles: anchors_by_bundle
                .iter()
                .filter(|(_, f)| f.contains(&root))
                .map(|(n, _)| n.clone())
                .collect(),
            root_sha256: root,
        })
    };
    let mut blocked_by = Vec::new();
    let mut blocking = Vec::new();
    let next_phase = match &st {
        None => Some("prepare".to_string()),
        Some(s) if s.ca != ca => {
            blocked_by.push(format!(
                "CA {ca} rotates with {}; run the phases on it",
                s.ca
            ));
            None
        }
        Some(s) => {
            match s.phase {
                Phase::Prepared if !s.steps.iter().any(|x| x.step == "published") => {
                    blocked_by.push("prepare did not finish: re-run --phase prepare".into())
                }
                Phase::Activating => {
                    blocked_by.push("activate did not finish: re-run --phase activate".into())
                }
                Phase::Pruning => {
                    blocked_by.push("prune did not finish: re-run --phase prune".into())
                }
                Phase::Active => {
                    let unchecked;
                    (blocking, unchecked) = blocking_serials(store, s, now).await?;
                    if let Some(e) = unchecked {
                        blocked_by.push(format!(
                            "cannot check which certificates of the previous CA are still in use: {e}"
                        ));
                    }
                    if !blocking.is_empty() {
                        blocked_by.push(format!(
                            "{} unexpired certificate(s) from the previous CA in the ledger or still in use",
                            blocking.len()
                        ));
                    }
                }
                Phase::Prepared => {}
            }
            Some(rotation::next_phase_name(s.phase).to_string())
        }
    };
    Ok(RotationStatus {
        ca: ca.to_string(),
        phase: st
            .as_ref()
            .map(|s| s.phase.to_string())
            .unwrap_or_else(|| "idle".into()),
        cas: st
            .as_ref()
            .map(|s| s.cas.clone())
            .unwrap_or_else(|| vec![ca.to_string()]),
        current: version(&current)?,
        next: next.as_ref().map(version).transpose()?,
        previous: previous.as_ref().map(version).transpose()?,
        renew_now: st.as_ref().is_some_and(|s| s.renew_now),
        next_phase,
        blocked_by,
        blocking_serials: blocking,
        steps: st.map(|s| s.steps).unwrap_or_default(),
    })
}

/// Whether a rotation covering CA `ca` asked renewing consumers to re-issue at once.
pub async fn renew_now_for(store: &dyn Store, ca: &str) -> Result<bool> {
    Ok(store
        .list_rotations()
        .await?
        .iter()
        .any(|r| r.covers(ca) && r.renew_now && matches!(r.phase, Phase::Active)))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::bundle::BundleSpec;
    use crate::ca::CaSpec;
    use crate::store::LocalStore;

    /// A workload certificate (DNS `a.example`) issued by `ca`.
    pub(crate) async fn leaf_from(ca: CaMaterial, now: OffsetDateTime) -> crate::issue::IssuedCert {
        let issuer = crate::issue::LocalIssuer::new(ca).unwrap();
        crate::issue::issue_workload(
            &issuer,
            &crate::identity::Sans {
                dns: vec![crate::identity::DnsName::parse("a.example").unwrap()],
                ..Default::default()
            },
            None,
            crate::key::KeyAlgorithm::EcdsaP256,
            now,
        )
        .await
        .unwrap()
        .cert
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    #[test]
    fn root_with_intermediate_rotates_through_all_phases() {
        let d = tempfile::tempdir().unwrap();
        let s = LocalStore::create(d.path().join("h")).unwrap();
        let now = OffsetDateTime::now_utc();
        rt().block_on(async {
            let root = create_root(&CaSpec::root("root"), now).unwrap();
            let mut is = CaSpec::root("team");
            is.parent = Some("root".into());
            let team = create_intermediate(&is, &root, now).unwrap();
            s.save_ca(&root, false).await.unwrap();
            s.save_ca(&team, false).await.unwrap();
            s.save_bundle(&BundleSpec {
                name: "b".into(),
                cas: vec!["team".into()],
                file: None,
                namespaces: vec![],
            })
            .await
            .unwrap();
            let o = RotateOptions::default();
            let b = s.load_bundle("b").await.unwrap();
            assert_eq!(bundle_anchors(&s, &b).await.unwrap().len(), 1);
            let r = run_phase(&s, "root", Request::Prepare, &o, now)
                .await
                .unwrap();
            assert_eq!(r.bundles, ["b"]);
            assert_eq!(bundle_anchors(&s, &b).await.unwrap().len(), 2, "overlap");
            assert_eq!(
                s.load_ca("root").await.unwrap().cert,
                root.cert,
                "old issues"
            );
            // The intermediate rotates with its root and may not be rotated alone now.
            let e = run_phase(&s, "team", Request::Prepare, &o, now)
                .await
                .unwrap_err()
                .to_string();
            assert!(e.contains("rotates with root"), "{e}");
            run_phase(&s, "root", Request::Activate, &o, now)
                .await
                .unwrap();
            let new_team = s.load_ca("team").await.unwrap();
            let new_root = s.load_ca("root").await.unwrap();
            assert_ne!(new_root.cert, root.cert);
            assert_ne!(new_team.cert, team.cert);
            assert_eq!(
                new_team.root(),
                &new_root.cert,
                "re-issued under the new root"
            );
            assert_eq!(bundle_anchors(&s, &b).await.unwrap().len(), 2);
            let st = status(&s, "root", now).await.unwrap();
            assert_eq!(st.phase, "active");
            assert_eq!(st.previous.as_ref().unwrap().bundles, ["b"]);
            // A live certificate from the old intermediate blocks prune.
            let w = leaf_from(team, now).await;
            s.record(&crate::issue::LedgerEntry::for_cert("team", &w, now))
                .await
                .unwrap();
            let e = run_phase(&s, "root", Request::Prune, &o, now)
                .await
                .unwrap_err()
                .to_string();
            assert!(e.contains(&w.info.serial_hex()), "{e}");
            assert_eq!(
                status(&s, "root", now)
                    .await
                    .unwrap()
                    .blocking_serials
                    .len(),
                1
            );
            let forced = RotateOptions {
                force: true,
                ..Default::default()
            };
            let r = run_phase(&s, "root", Request::Prune, &forced, now)
                .await
                .unwrap();
            assert_eq!(r.forced_past.len(), 1);
            assert_eq!(
                bundle_anchors(&s, &b).await.unwrap(),
                vec![new_root.cert.clone()]
            );
            assert_eq!(status(&s, "root", now).await.unwrap().phase, "idle");
            s.check().unwrap();
        });
    }

    #[test]
    fn interrupted_activate_finishes_on_rerun() {
        let d = tempfile::tempdir().unwrap();
        let s = LocalStore::create(d.path().join("h")).unwrap();
        let now = OffsetDateTime::now_utc();
        rt().block_on(async {
            let root = create_root(&CaSpec::root("r"), now).unwrap();
            s.save_ca(&root, false).await.unwrap();
            let o = RotateOptions::default();
            run_phase(&s, "r", Request::Prepare, &o, now).await.unwrap();
            // Crash after `activating` was recorded and the previous slot written.
            let mut st = s.load_rotation("r").await.unwrap().unwrap();
            st.phase = Phase::Activating;
            st.activated_at = Some(now);
            s.save_rotation(&st).await.unwrap();
            s.save_rotation_cas("r", Slot::Previous, &[s.load_ca("r").await.unwrap()])
                .await
                .unwrap();
            assert!(run_phase(&s, "r", Request::Prune, &o, now).await.is_err());
            s.check().unwrap();
            run_phase(&s, "r", Request::Activate, &o, now)
                .await
                .unwrap();
            assert_ne!(s.load_ca("r").await.unwrap().cert, root.cert);
            let prev = s.load_rotation_cas("r", Slot::Previous).await.unwrap();
            assert_eq!(prev[0].cert, root.cert, "the old CA was kept as previous");
            // Re-running a finished activate is a no-op.
            let r = run_phase(&s, "r", Request::Activate, &o, now)
                .await
                .unwrap();
            assert!(r.steps.is_empty(), "{:?}", r.steps);
            run_phase(&s, "r", Request::Prune, &o, now).await.unwrap();
            s.check().unwrap();
        });
    }
}
