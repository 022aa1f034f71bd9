//! `meshca ca list|show`, `meshca ledger`, `meshca check`.

use clap::{Args, Subcommand};
use meshca::report::CaSummary;

use crate::common::{rfc3339, time_left, usage, Ctx};

#[derive(Subcommand, Debug)]
pub enum CaCmd {
    /// List CAs.
    List,
    /// Show one CA with its policy and chain.
    Show(ShowArgs),
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
                    if p.allow_ip_sans { "allowed" } else { "denied" },
                )
            })
        }
    }
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
