//! CA rotation: the phases, the recorded state and the pure decisions behind
//! `meshca ca rotate` (no I/O here; the store-driven steps are in
//! [`crate::store::rotate`]).
//!
//! The phases follow SPIRE's prepared, active and old authorities:
//! - **prepare** makes the *next* CA for a name (same name, kind, parent, key algorithm,
//!   subject, name constraints and policy, a new key). Its root joins every bundle that holds
//!   the name; the current CA keeps issuing.
//! - **activate** makes the next CA the current one: it issues from now on. The replaced CA
//!   is kept as the *previous* one, and its root stays in the bundles.
//! - **prune** drops the previous CA, and with it its root from the bundles. It is refused
//!   while the ledger holds an unexpired certificate the previous CA signed.
//!
//! Rotating a CA also re-issues every local CA below it (new key, signed by the next CA),
//! because after prune nothing may chain to the old key any more: an intermediate whose
//! certificate the old root signed would stop validating once the old root leaves the
//! bundles. Rotating an intermediate changes no bundle (bundles hold roots), so its prune
//! is never blocked by the ledger.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ca::{CaMaterial, CaSpec};
use crate::error::{Error, Result};
use crate::issue::LedgerEntry;
use crate::profile::{CaSubject, BACKDATE};
use crate::x509::CertInfo;

/// Where a rotation stands. Each value is recorded in the store before the steps it names
/// start, so a re-run after a crash knows what to finish.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The next CAs exist; their roots are in the bundles; publishing may be unfinished.
    Prepared,
    /// Swapping the next CAs in as the current ones (some may be swapped already).
    Activating,
    /// The next CAs issue; the previous ones are kept and still trusted.
    Active,
    /// Removing the previous CAs (the rotation record goes last).
    Pruning,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Prepared => "prepared",
            Phase::Activating => "activating",
            Phase::Active => "active",
            Phase::Pruning => "pruning",
        })
    }
}

/// A phase the operator asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// `--phase prepare`.
    Prepare,
    /// `--phase activate`.
    Activate,
    /// `--phase prune`.
    Prune,
}

/// One recorded step of a rotation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    /// What was done (`next-created`, `published`, `swapped:<ca>`, ...).
    pub step: String,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// The rotation record of one CA name, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationState {
    /// The rotated CA.
    pub ca: String,
    /// The rotated CA followed by the local CAs below it, parents before children.
    pub cas: Vec<String>,
    /// Current phase.
    pub phase: Phase,
    /// When prepare started.
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    /// When activate started.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub activated_at: Option<OffsetDateTime>,
    /// Whether activate asked renewing consumers (SDS) to re-issue at once (`--now`).
    #[serde(default)]
    pub renew_now: bool,
    /// The steps done so far, in order.
    #[serde(default)]
    pub steps: Vec<StepRecord>,
}

impl RotationState {
    /// A fresh record for prepare.
    pub fn new(ca: &str, cas: Vec<String>, now: OffsetDateTime) -> Self {
        RotationState {
            ca: ca.to_string(),
            cas,
            phase: Phase::Prepared,
            started_at: now,
            activated_at: None,
            renew_now: false,
            steps: Vec::new(),
        }
    }

    /// Records a step.
    pub fn step(&mut self, step: impl Into<String>, now: OffsetDateTime) {
        self.steps.push(StepRecord {
            step: step.into(),
            at: now,
        });
    }

    /// Whether the record covers CA `name` (the rotated one or one below it).
    pub fn covers(&self, name: &str) -> bool {
        self.cas.iter().any(|c| c == name)
    }
}

/// What a requested phase must do, given the stored record (`None`: no rotation yet).
/// Re-running the phase that is in progress (or just finished) completes it.
pub fn plan(state: Option<&RotationState>, req: Request, ca: &str) -> Result<Plan> {
    let refuse = |why: String| Err(Error::invalid("rotation", format!("CA {ca}: {why}")));
    match (req, state.map(|s| s.phase)) {
        (Request::Prepare, None) => Ok(Plan::Start),
        (Request::Prepare, Some(Phase::Prepared)) => Ok(Plan::Resume),
        (Request::Activate, Some(Phase::Prepared | Phase::Activating)) => Ok(Plan::Resume),
        (Request::Activate, Some(Phase::Active)) => Ok(Plan::Done),
        (Request::Prune, Some(Phase::Active | Phase::Pruning)) => Ok(Plan::Resume),
        (Request::Prepare, Some(p)) => refuse(format!(
            "a rotation is already {p}; finish it with --phase {} first",
            next_phase_name(p)
        )),
        (Request::Activate | Request::Prune, None) => {
            refuse("no rotation in progress (start one with --phase prepare)".into())
        }
        (Request::Activate, Some(Phase::Pruning)) => {
            refuse("the rotation is being pruned; re-run --phase prune".into())
        }
        (Request::Prune, Some(p)) => {
            refuse(format!("the rotation is {p}; run --phase activate first"))
        }
    }
}

/// The outcome of [`plan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Start a new rotation.
    Start,
    /// Run (or finish) the phase's steps.
    Resume,
    /// Nothing left to do.
    Done,
}

/// The phase to run after `p`.
pub fn next_phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Prepared | Phase::Activating => "activate",
        Phase::Active | Phase::Pruning => "prune",
    }
}

/// Ledger entries that block prune: unexpired at `now`, issued by a CA the record covers,
/// and signed by its previous version. `previous_ski` maps a CA name to the SKI of its
/// previous certificate. An entry that carries no AKI (written before meshca recorded it)
/// counts as the previous CA's when it was issued before activation.
pub fn blocking_entries<'a>(
    state: &RotationState,
    ledger: &'a [LedgerEntry],
    previous_ski: &dyn Fn(&str) -> Option<String>,
    now: OffsetDateTime,
) -> Vec<&'a LedgerEntry> {
    ledger
        .iter()
        .filter(|e| state.covers(&e.ca) && e.not_after > now)
        .filter(|e| match (&e.aki, previous_ski(&e.ca)) {
            (Some(aki), Some(ski)) => aki.eq_ignore_ascii_case(&ski),
            _ => state.activated_at.is_none_or(|t| e.issued_at < t),
        })
        .collect()
}

/// Whether a certificate was issued by the CA whose certificate is `ca`: its authority key
/// identifier equals the CA's subject key identifier. A re-created CA usually keeps its DN,
/// so DNs cannot tell the old CA from the new one.
pub fn issued_by(leaf: &CertInfo, ca: &CertInfo) -> bool {
    match (&leaf.authority_key_id, &ca.subject_key_id) {
        (Some(aki), Some(ski)) => aki.eq_ignore_ascii_case(ski),
        // Without key identifiers fall back to the issuer signature check's inputs: the DN
        // and, for a self-issued CA, nothing better is available.
        _ => leaf.issuer_der == ca.subject_der,
    }
}

/// The spec that re-creates `ca` with a new key: same name, parent, key algorithm,
/// subject, path length, name constraints, trust domain and policy, and the same validity
/// span.
pub fn respec(ca: &CaMaterial) -> Result<CaSpec> {
    let info = ca.info()?;
    let key = match &ca.key {
        Some(k) => k.algorithm(),
        None => {
            return Err(Error::Unsupported(format!(
                "CA {} keeps its key in {:?}; rotate it through that backend",
                ca.meta.name, ca.meta.backend
            )))
        }
    };
    let (_, cert) = x509_parser::parse_x509_certificate(&ca.cert)
        .map_err(|_| Error::Corrupt(format!("CA {}: certificate does not parse", ca.meta.name)))?;
    let first = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue<'_>>| {
        it.next().and_then(|a| a.as_str().ok()).map(str::to_string)
    };
    let subject = CaSubject {
        common_name: first(&mut cert.subject().iter_common_name()),
        organization: first(&mut cert.subject().iter_organization()),
        organizational_unit: first(&mut cert.subject().iter_organizational_unit()),
    };
    let span = info.not_after - (info.not_before + BACKDATE);
    let validity = std::time::Duration::try_from(span).ok();
    let nc = crate::x509::name_constraints(&ca.cert)?;
    let (permitted_dns, excluded_dns) = (nc.permitted_dns, nc.excluded_dns);
    Ok(CaSpec {
        name: ca.meta.name.clone(),
        parent: ca.meta.parent.clone(),
        key,
        validity,
        subject,
        path_len: info.path_len,
        trust_domain: Some(ca.meta.trust_domain.clone()),
        permitted_dns,
        excluded_dns,
        policy: ca.meta.policy.clone(),
    })
}

/// Orders `name` and the CAs below it, parents first, from `(name, parent)` pairs.
pub fn lineage(name: &str, parents: &[(String, Option<String>)]) -> Vec<String> {
    let mut out = vec![name.to_string()];
    let mut i = 0;
    while i < out.len() {
        let p = out[i].clone();
        let mut kids: Vec<String> = parents
            .iter()
            .filter(|(c, par)| par.as_deref() == Some(p.as_str()) && !out.contains(c))
            .map(|(c, _)| c.clone())
            .collect();
        kids.sort();
        out.extend(kids);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{create_intermediate, create_root};

    fn entry(ca: &str, aki: Option<&str>, issued: i64, until: i64) -> LedgerEntry {
        LedgerEntry {
            serial: format!("{ca}{issued}"),
            ca: ca.into(),
            subject: String::new(),
            sans: vec![],
            not_after: OffsetDateTime::from_unix_timestamp(until).unwrap(),
            issued_at: OffsetDateTime::from_unix_timestamp(issued).unwrap(),
            sha256: String::new(),
            aki: aki.map(str::to_string),
        }
    }

    #[test]
    fn plans_follow_the_phases() {
        let now = OffsetDateTime::now_utc();
        assert_eq!(plan(None, Request::Prepare, "a").unwrap(), Plan::Start);
        assert!(plan(None, Request::Activate, "a")
            .unwrap_err()
            .to_string()
            .contains("no rotation in progress"));
        let mut s = RotationState::new("a", vec!["a".into()], now);
        assert_eq!(plan(Some(&s), Request::Prepare, "a").unwrap(), Plan::Resume);
        assert!(plan(Some(&s), Request::Prune, "a")
            .unwrap_err()
            .to_string()
            .contains("run --phase activate first"));
        s.phase = Phase::Activating;
        assert_eq!(
            plan(Some(&s), Request::Activate, "a").unwrap(),
            Plan::Resume
        );
        assert!(plan(Some(&s), Request::Prepare, "a").is_err());
        s.phase = Phase::Active;
        assert_eq!(plan(Some(&s), Request::Activate, "a").unwrap(), Plan::Done);
        assert_eq!(plan(Some(&s), Request::Prune, "a").unwrap(), Plan::Resume);
        s.phase = Phase::Pruning;
        assert_eq!(plan(Some(&s), Request::Prune, "a").unwrap(), Plan::Resume);
        assert!(plan(Some(&s), Request::Activate, "a").is_err());
    }

    #[test]
    fn blockers_are_unexpired_old_ca_entries() {
        let mut s = RotationState::new(
            "r",
            vec!["r".into(), "i".into()],
            OffsetDateTime::UNIX_EPOCH,
        );
        s.activated_at = Some(OffsetDateTime::from_unix_timestamp(100).unwrap());
        let ledger = vec![
            entry("r", Some("AA:BB"), 10, 1000), // old key, live: blocks
            entry("r", Some("CC"), 150, 1000),   // new key: fine
            entry("i", None, 50, 1000),          // no AKI, before activation: blocks
            entry("i", None, 150, 1000),         // no AKI, after activation: fine
            entry("r", Some("aa:bb"), 10, 400),  // expired at now=500: fine
            entry("x", Some("AA:BB"), 10, 1000), // another CA: fine
        ];
        let prev = |c: &str| (c == "r").then(|| "AA:BB".to_string());
        let now = OffsetDateTime::from_unix_timestamp(500).unwrap();
        let b: Vec<_> = blocking_entries(&s, &ledger, &prev, now)
            .iter()
            .map(|e| e.serial.clone())
            .collect();
        assert_eq!(b, ["r10", "i50"]);
    }

    #[test]
    fn respec_keeps_everything_but_the_key() {
        let now = OffsetDateTime::now_utc();
        let mut spec = CaSpec::root("gw");
        spec.subject.common_name = Some("Gateway Root CA".into());
        spec.subject.organization = Some("Example Corp".into());
        spec.key = crate::key::KeyAlgorithm::EcdsaP384;
        spec.permitted_dns = vec!["example.com".into()];
        spec.policy.max_ttl = std::time::Duration::from_secs(7200);
        spec.validity = Some(std::time::Duration::from_secs(86400 * 30));
        let root = create_root(&spec, now).unwrap();
        let again = respec(&root).unwrap();
        assert_eq!(again.subject, spec.subject);
        assert_eq!(again.key, spec.key);
        assert_eq!(again.permitted_dns, spec.permitted_dns);
        assert_eq!(again.policy, spec.policy);
        assert_eq!(again.validity, spec.validity);
        assert_eq!(again.path_len, Some(1));
        let next = create_root(&again, now).unwrap();
        let (a, b) = (root.info().unwrap(), next.info().unwrap());
        assert_eq!(a.subject_der, b.subject_der, "same DN");
        assert_ne!(a.subject_key_id, b.subject_key_id, "new key");
        // AKI, not the DN, tells them apart.
        let mut is = CaSpec::root("int");
        is.parent = Some("gw".into());
        let int = create_intermediate(&is, &root, now).unwrap();
        let ii = int.info().unwrap();
        assert!(issued_by(&ii, &a));
        assert!(!issued_by(&ii, &b));
    }

    #[test]
    fn lineage_orders_parents_first() {
        let p = |c: &str, par: Option<&str>| (c.to_string(), par.map(str::to_string));
        let all = [
            p("b", Some("a")),
            p("a", None),
            p("c", Some("b")),
            p("x", None),
            p("d", Some("a")),
        ];
        assert_eq!(lineage("a", &all), ["a", "b", "d", "c"]);
        assert_eq!(lineage("b", &all), ["b", "c"]);
    }
}
