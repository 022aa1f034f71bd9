//! `meshca ca list|show|rotate`, `meshca ledger`, `meshca check`.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use meshca::report::CaSummary;
use meshca::rotation::Request;
use meshca::store::rotate::{self, RotateOptions};

use crate::common::{rfc3339, time_left, usage, Ctx};

#[derive(Subcommand, Debug)]
pub enum CaCmd {
    /// List CAs.
    List,
    /// Show one CA with its policy and chain.
    Show(ShowArgs),
    /// Rotate a CA without downtime: --phase prepare, then activate, then prune.
    Rotate(RotateArgs),
    /// Print the CA certificate, or with --secret a kubernetes.io/tls Secret holding it.
    Export(ExportArgs),
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// CA name.
    name: String,
    /// Print a kubernetes.io/tls Secret manifest NAMESPACE/NAME whose tls.crt and ca.crt are
    /// the CA certificate (applied to the cluster with --store kube:NS).
    #[arg(long, value_name = "NS/NAME")]
    secret: Option<meshca::output::ObjectRef>,
    /// Put the CA key in tls.key (cert-manager CA-issuer interop). Treat the output as the
    /// CA key itself.
    #[arg(long, requires = "secret")]
    include_key: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PhaseArg {
    /// Make the next CA (new key) and add its root to every bundle holding the CA.
    Prepare,
    /// The next CA issues from now on; the old root stays trusted.
    Activate,
    /// Remove the old CA from the bundles (refused while its certificates are live).
    Prune,
}

#[derive(Args, Debug)]
pub struct RotateArgs {
    /// CA name.
    name: String,
    /// The phase to run (re-running an interrupted phase finishes it).
    #[arg(
        long,
        value_enum,
        required_unless_present = "status",
        conflicts_with = "status"
    )]
    phase: Option<PhaseArg>,
    /// Show the phase, both CAs' fingerprints and expiry, their bundles and what blocks the
    /// next phase.
    #[arg(long)]
    status: bool,
    /// activate: SDS servers renew at once instead of at their next renewal.
    #[arg(long)]
    now: bool,
    /// prune: go ahead although unexpired certificates of the old CA are in the ledger.
    #[arg(long)]
    force: bool,
    /// Re-export the PEM file of every bundle holding the CA into this directory.
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    /// CA name.
    name: String,
    /// Print only the CA certificate chain PEM.
    #[arg(long)]
    pem: bool,
}

#[derive(Args, Debug)]
pub struct LedgerArgs {
    /// Only entries of this CA.
    #[arg(long)]
    ca: Option<String>,
}

pub async fn run(ctx: &Ctx, cmd: CaCmd) -> anyhow::Result<()> {
    let store = ctx.store(false).await?;
    let now = time::OffsetDateTime::now_utc();
    match cmd {
        CaCmd::List => {
            let mut all = Vec::new();
            for n in store.list_cas().await? {
                all.push(CaSummary::of(&store.load_ca(&n).await?, now, false)?);
            }
            ctx.emit(&all, || {
                if all.is_empty() {
                    return "no CAs (create one with `meshca init --ca NAME`)\n".into();
                }
                let mut s = format!(
                    "{:<16} {:<13} {:<12} {:<11} {:<16} {}\n",
                    "NAME", "KIND", "PARENT", "KEY", "TRUST DOMAIN", "EXPIRES"
                );
                for c in &all {
                    s.push_str(&format!(
                        "{:<16} {:<13} {:<12} {:<11} {:<16} {} ({})\n",
                        c.name,
                        c.kind,
                        c.parent.as_deref().unwrap_or("-"),
                        c.key,
                        c.trust_domain,
                        rfc3339(c.not_after),
                        time_left(c.seconds_left)
                    ));
                }
                s
            })
        }
        CaCmd::Show(a) => {
            let ca = store.load_ca(&a.name).await?;
            let c = CaSummary::of(&ca, now, true)?;
            if a.pem {
                print!("{}", ca.chain_pem());
                return Ok(());
            }
            ctx.emit(&c, || {
                let p = c.policy.as_ref().expect("detail");
                format!(
                    "CA {}\n  kind          {}{}\n  backend       {:?}\n  subject       {}\n  key           {}\n  trust domain  {}\n  expires       {} ({})\n  sha256        {}\n  policy        max TTL {}, default TTL {}, SPIFFE {}, DNS {}, wildcards {}, IPs {}\n",
                    c.name,
                    c.kind,
                    c.parent.as_ref().map(|p| format!(" of {p}")).unwrap_or_default(),
                    c.backend,
                    c.subject,
                    c.key,
                    c.trust_domain,
                    rfc3339(c.not_after),
                    time_left(c.seconds_left),
                    c.sha256_fingerprint,
                    humantime::format_duration(p.max_ttl),
                    humantime::format_duration(p.default_ttl),
                    if p.allowed_spiffe_ids.is_empty() { "any in trust domain".into() } else { p.allowed_spiffe_ids.join(" ") },
                    if p.allowed_dns.is_empty() { "any".into() } else { p.allowed_dns.join(" ") },
                    if p.allow_wildcard_dns { "allowed" } else { "denied" },
                    if !p.allow_ip_sans {
                        "denied".to_string()
                    } else if p.allowed_ip_ranges.is_empty() {
                        "operator only (none in the cluster)".to_string()
                    } else {
                        p.allowed_ip_ranges.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(" ")
                    },
                )
            })
        }
        CaCmd::Rotate(a) => run_rotate(ctx, store.as_ref(), a, now).await,
        CaCmd::Export(a) => run_export(ctx, store.as_ref(), a).await,
    }
}

async fn run_export(
    ctx: &Ctx,
    store: &dyn meshca::store::Store,
    a: ExportArgs,
) -> anyhow::Result<()> {
    let ca = store.load_ca(&a.name).await?;
    let tls_crt = meshca::pemutil::certs_to_pem(
        std::iter::once(&ca.cert).chain(ca.leaf_chain_tail().iter().skip(1)),
    );
    let Some(at) = a.secret else {
        print!("{tls_crt}");
        return Ok(());
    };
    let anchors = meshca::bundle::to_pem(&meshca::store::ca_anchors(store, &a.name).await?);
    let key = match (&ca.key, a.include_key) {
        (Some(k), true) => Some(k.to_pkcs8_pem()),
        (None, true) => {
            return Err(usage(format!(
                "CA {} keeps its key in {:?}: --include-key cannot export it",
                a.name, ca.meta.backend
            )))
        }
        (_, false) => None,
    };
    if let Some(ns) = crate::kube_store::kube_namespace(ctx) {
        let ks = crate::kube_store::open(ns, ctx.kubeconfig.as_deref()).await?;
        ks.apply_tls_secret(
            &at.namespace,
            &at.name,
            &tls_crt,
            key.as_ref().map(|k| k.as_str()).unwrap_or_default(),
            &anchors,
            &a.name,
        )
        .await?;
        eprintln!("meshca: wrote Secret {at} with CA {}", a.name);
        return Ok(());
    }
    let yaml = meshca::output::ca_secret_manifest(
        &at,
        &a.name,
        &tls_crt,
        key.as_ref().map(|k| k.as_str()),
        &anchors,
    )?;
    print!("{yaml}");
    Ok(())
}

/// Logs each recorded rotation step. Only in builds with the `fault-injection` feature (the
/// crash tests), the environment variable `MESHCA_DANGER_HANG_AFTER_STEP=<step>` stops the
/// process (until killed) right after that step is recorded, so a test can kill -9 it
/// between two steps. Release builds ignore the variable.
fn progress(step: &str) {
    tracing::info!(step, "rotation step recorded");
    #[cfg(feature = "fault-injection")]
    if std::env::var("MESHCA_DANGER_HANG_AFTER_STEP").as_deref() == Ok(step) {
        eprintln!("meshca: hanging after step {step} (MESHCA_DANGER_HANG_AFTER_STEP)");
        loop {
            std::thread::park();
        }
    }
}

async fn run_rotate(
    ctx: &Ctx,
    store: &dyn meshca::store::Store,
    a: RotateArgs,
    now: time::OffsetDateTime,
) -> anyhow::Result<()> {
    let Some(phase) = a.phase else {
        let st = rotate::status(store, &a.name, now).await?;
        return ctx.emit(&st, || {
            let v = |label: &str, v: &rotate::CaVersion| {
                format!(
                    "  {label:<9} sha256 {}\n            expires {}  bundles {}\n",
                    v.sha256,
                    rfc3339(v.not_after),
                    if v.bundles.is_empty() {
                        "-".into()
                    } else {
                        v.bundles.join(",")
                    }
                )
            };
            let mut s = format!("CA {}: rotation {}\n", st.ca, st.phase);
            if st.cas.len() > 1 {
                s.push_str(&format!("  rotates   {}\n", st.cas.join(", ")));
            }
            s.push_str(&v("current", &st.current));
            if let Some(n) = &st.next {
                s.push_str(&v("next", n));
            }
            if let Some(p) = &st.previous {
                s.push_str(&v("previous", p));
            }
            match (&st.next_phase, st.blocked_by.is_empty()) {
                (Some(n), true) => s.push_str(&format!("  next      --phase {n}\n")),
                (Some(n), false) => s.push_str(&format!(
                    "  next      --phase {n}, blocked: {}\n",
                    st.blocked_by.join("; ")
                )),
                (None, _) => s.push_str(&format!("  blocked   {}\n", st.blocked_by.join("; "))),
            }
            for b in &st.blocking_serials {
                s.push_str(&format!("  blocking  {b}\n"));
            }
            s
        });
    };
    if a.now && !matches!(phase, PhaseArg::Activate) {
        return Err(usage("--now goes with --phase activate"));
    }
    if a.force && !matches!(phase, PhaseArg::Prune) {
        return Err(usage("--force goes with --phase prune"));
    }
    let req = match phase {
        PhaseArg::Prepare => Request::Prepare,
        PhaseArg::Activate => Request::Activate,
        PhaseArg::Prune => Request::Prune,
    };
    let opts = RotateOptions {
        renew_now: a.now,
        force: a.force,
        out_dir: a.out_dir,
        progress: Some(std::sync::Arc::new(progress)),
    };
    let r = rotate::run_phase(store, &a.name, req, &opts, now).await?;
    for s in &r.forced_past {
        tracing::warn!(serial = %s, "pruned although this certificate of the old CA is unexpired (--force)");
    }
    ctx.emit(&r, || {
        let mut s = format!(
            "CA {}: {} done, rotation {}{}\n",
            r.ca,
            r.phase,
            r.state,
            if r.steps.is_empty() {
                " (nothing left to do)".to_string()
            } else {
                format!(" ({})", r.steps.join(", "))
            }
        );
        if !r.bundles.is_empty() {
            s.push_str(&format!("  bundles   {}\n", r.bundles.join(", ")));
        }
        for f in &r.files {
            s.push_str(&format!("  wrote     {}\n", f.display()));
        }
        s
    })
}

pub async fn run_ledger(ctx: &Ctx, a: LedgerArgs) -> anyhow::Result<()> {
    let store = ctx.store(false).await?;
    let mut entries = store.ledger().await?;
    if let Some(ca) = &a.ca {
        entries.retain(|e| &e.ca == ca);
    }
    ctx.emit(&entries, || {
        entries
            .iter()
            .map(|e| {
                format!(
                    "{}  {:<12} {}  until {}  {}\n",
                    rfc3339(e.issued_at),
                    e.ca,
                    e.serial,
                    rfc3339(e.not_after),
                    e.sans.join(",")
                )
            })
            .collect()
    })
}

pub async fn run_check(ctx: &Ctx) -> anyhow::Result<()> {
    if ctx.store != "local" {
        return Err(usage("`meshca check` checks the local store"));
    }
    let home = ctx.home_dir()?;
    let s = meshca::store::LocalStore::open(&home)?;
    let (cas, bundles, ledger) = s.check()?;
    #[derive(serde::Serialize)]
    struct Check {
        home: std::path::PathBuf,
        cas: usize,
        bundles: usize,
        ledger_entries: usize,
    }
    let c = Check {
        home,
        cas,
        bundles,
        ledger_entries: ledger,
    };
    ctx.emit(&c, || {
        format!(
            "ok: {} CAs, {} bundles, {} ledger entries in {}\n",
            c.cas,
            c.bundles,
            c.ledger_entries,
            c.home.display()
        )
    })
}
