//! `meshca revoke SERIAL` and `meshca crl NAME`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use meshca::crl::{self, Reason, Revocation};

use crate::common::{usage, Ctx};

#[derive(Args, Debug)]
pub struct RevokeArgs {
    /// Serial number of the certificate (hex, colons optional), as `meshca ledger` shows it.
    serial: String,
    /// Why: unspecified, key-compromise, ca-compromise, affiliation-changed, superseded,
    /// cessation-of-operation, certificate-hold, privilege-withdrawn.
    #[arg(long, default_value = "unspecified")]
    reason: Reason,
    /// The issuing CA (needed with --force for a serial not in the ledger).
    #[arg(long)]
    ca: Option<String>,
    /// Record the revocation although the serial is not in the ledger.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
pub struct CrlArgs {
    /// CA name.
    name: String,
    /// Write the PEM CRL to this file (atomically) instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Time until nextUpdate.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "7d")]
    validity: Duration,
}

pub async fn run_revoke(ctx: &Ctx, a: RevokeArgs) -> anyhow::Result<()> {
    let store = ctx.store(false).await?;
    let serial = crl::normalize_serial(&a.serial)?;
    let ledger = store.ledger().await?;
    let found: Vec<_> = ledger
        .iter()
        .filter(|e| crl::normalize_serial(&e.serial).ok().as_deref() == Some(serial.as_str()))
        .filter(|e| a.ca.as_ref().is_none_or(|c| &e.ca == c))
        .collect();
    let ca = match (found.first(), &a.ca) {
        (Some(e), _) => e.ca.clone(),
        (None, Some(c)) if a.force => {
            store.load_ca(c).await?;
            c.clone()
        }
        (None, None) if a.force => {
            return Err(usage(format!(
                "serial {serial} is not in the ledger: --force needs --ca NAME"
            )))
        }
        (None, _) => {
            return Err(usage(format!(
                "serial {serial} is not in the ledger{} (check `meshca ledger`; --force --ca NAME records it anyway)",
                a.ca.as_ref().map(|c| format!(" for CA {c}")).unwrap_or_default()
            )))
        }
    };
    let r = Revocation {
        serial,
        ca,
        reason: a.reason,
        revoked_at: time::OffsetDateTime::now_utc(),
    };
    store.revoke(&r).await?;
    ctx.emit(&r, || {
        format!(
            "revoked serial {} of CA {} ({:?}); publish with `meshca crl {}` or `meshca sds serve --crl`\n",
            r.serial, r.ca, r.reason, r.ca
        )
    })
}

pub async fn run_crl(ctx: &Ctx, a: CrlArgs) -> anyhow::Result<()> {
    let store = ctx.store(false).await?;
    let ca = store.load_ca(&a.name).await?;
    let now = time::OffsetDateTime::now_utc();
    let der = crl::build(
        &ca,
        &store.revocations().await?,
        now,
        a.validity,
        crl::crl_number(now),
    )?;
    let pem = crl::to_pem(&der);
    match &a.out {
        Some(p) => {
            meshca::fsutil::write_atomic(p, pem.as_bytes(), meshca::fsutil::PUBLIC_MODE)?;
            #[derive(serde::Serialize)]
            struct Wrote<'a> {
                ca: &'a str,
                file: &'a PathBuf,
            }
            ctx.emit(
                &Wrote {
                    ca: &a.name,
                    file: p,
                },
                || format!("wrote the CRL of CA {} to {}\n", a.name, p.display()),
            )
        }
        None => {
            print!("{pem}");
            Ok(())
        }
    }
}
