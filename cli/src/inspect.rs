//! `meshca inspect` and `meshca verify`.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use meshca::inspect::{self, Inspection, Object, Verification};
use meshca::pki_types::CertificateDer;
use meshca::store;

use crate::common::{read_input, rfc3339, time_left, Ctx, UsageError};

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// PEM file (certificate, chain, CSR or bundle), or - for stdin.
    file: PathBuf,
    /// Verify the chain against this bundle: a PEM file or a bundle name in the store.
    #[arg(long)]
    bundle: Option<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum UsageArg {
    /// TLS server.
    Server,
    /// TLS client.
    Client,
    /// Either.
    Any,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Chain PEM: leaf first, then intermediates.
    chain: PathBuf,
    /// Trust anchors: a PEM file or a bundle name in the store.
    #[arg(long)]
    bundle: String,
    /// Required extended key usage.
    #[arg(long, value_enum, default_value_t = UsageArg::Any)]
    usage: UsageArg,
}

async fn load_anchors(ctx: &Ctx, bundle: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let p = Path::new(bundle);
    if p.exists() || bundle.contains('/') || bundle.ends_with(".pem") {
        let (bytes, src) = read_input(p)?;
        return Ok(meshca::pemutil::parse_certs(&bytes, &src)?);
    }
    let store = ctx.store(false).await?;
    let spec = store.load_bundle(bundle).await?;
    Ok(store::bundle_anchors(store.as_ref(), &spec).await?)
}

fn certs_of(bytes: &[u8], src: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    Ok(meshca::pemutil::parse_blocks(bytes, src)?
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| CertificateDer::from(b.into_contents()))
        .collect())
}

pub async fn run_inspect(ctx: &Ctx, a: InspectArgs) -> anyhow::Result<()> {
    let (bytes, src) = read_input(&a.file)?;
    let now = time::OffsetDateTime::now_utc();
    let mut ins = inspect::inspect(&bytes, &src, now)?;
    if let Some(b) = &a.bundle {
        let anchors = load_anchors(ctx, b).await?;
        ins.verification = Some(inspect::verify(&certs_of(&bytes, &src)?, &anchors, b, now));
    }
    // Subjects, labels and SANs come from the input: no control character reaches the terminal.
    ctx.emit(&ins, || meshca::escape::escape_lines(&text(&ins)))
}

fn text(ins: &Inspection) -> String {
    let mut s = String::new();
    let n = ins.objects.len();
    for (i, o) in ins.objects.iter().enumerate() {
        if n > 1 {
            s.push_str(&format!("[{}/{}] ", i + 1, n));
        }
        match o {
            Object::Certificate { info, seconds_left } => {
                s.push_str(&format!(
                    "certificate{}\n",
                    if info.is_ca { " (CA)" } else { "" }
                ));
                s.push_str(&format!(
                    "  subject      {}\n  issuer       {}\n  serial       {}\n",
                    info.subject, info.issuer, info.serial
                ));
                s.push_str(&format!(
                    "  valid        {} to {} ({})\n",
                    rfc3339(info.not_before),
                    rfc3339(info.not_after),
                    time_left(*seconds_left)
                ));
                let mut sans: Vec<String> =
                    info.sans.uri.iter().map(|u| format!("URI:{u}")).collect();
                sans.extend(info.sans.dns.iter().map(|d| format!("DNS:{d}")));
                sans.extend(info.sans.ip.iter().map(|d| format!("IP:{d}")));
                sans.extend(info.sans.email.iter().map(|e| format!("email:{e}")));
                sans.extend(info.sans.other.iter().cloned());
                if !sans.is_empty() {
                    s.push_str(&format!("  SANs         {}\n", sans.join(", ")));
                }
                s.push_str(&format!(
                    "  key          {}  ({})\n",
                    info.key, info.signature_algorithm
                ));
                if info.is_ca {
                    s.push_str(&format!(
                        "  CA           pathLen {}\n",
                        info.path_len
                            .map(|p| p.to_string())
                            .unwrap_or("none".into())
                    ));
                }
                s.push_str(&format!("  key usage    {}\n", info.key_usage.join(", ")));
                if !info.extended_key_usage.is_empty() {
                    s.push_str(&format!(
                        "  ext usage    {}\n",
                        info.extended_key_usage.join(", ")
                    ));
                }
                s.push_str(&format!("  sha256       {}\n", info.sha256_fingerprint));
            }
            Object::CertificateRequest(c) => {
                s.push_str("certificate request\n");
                s.push_str(&format!(
                    "  subject      {}\n  key          {}\n",
                    c.subject, c.key
                ));
                let mut sans: Vec<String> = c.sans.uri.iter().map(|u| format!("URI:{u}")).collect();
                sans.extend(c.sans.dns.iter().map(|d| format!("DNS:{d}")));
                sans.extend(c.sans.ip.iter().map(|d| format!("IP:{d}")));
                sans.extend(c.sans.email.iter().map(|e| format!("email:{e}")));
                sans.extend(c.sans.other.iter().cloned());
                s.push_str(&format!(
                    "  SANs         {}\n",
                    if sans.is_empty() {
                        "(none)".into()
                    } else {
                        sans.join(", ")
                    }
                ));
                s.push_str(&format!("  asks CA      {}\n", c.wants_ca));
                s.push_str(&format!(
                    "  signature    {}\n",
                    if c.signature_valid {
                        "valid"
                    } else {
                        "INVALID"
                    }
                ));
            }
            Object::PrivateKey { label } => {
                s.push_str(&format!("private key ({label}; content not shown)\n"))
            }
            Object::Other { label } => s.push_str(&format!("PEM block {label}\n")),
        }
    }
    if let Some(c) = &ins.chain {
        match &c.problem {
            None => s.push_str("chain order  ok (each certificate is issued by the next)\n"),
            Some(p) => s.push_str(&format!("chain order  BROKEN: {p}\n")),
        }
    }
    if let Some(v) = &ins.verification {
        s.push_str(&verification_text(v));
    }
    s
}

fn verification_text(v: &Verification) -> String {
    match &v.error {
        None => format!(
            "verify       ok against {} (server: {}, client: {})\n",
            v.bundle,
            if v.valid_for_server { "yes" } else { "no" },
            if v.valid_for_client { "yes" } else { "no" }
        ),
        Some(e) => format!("verify       FAILED against {}: {e}\n", v.bundle),
    }
}

pub async fn run_verify(ctx: &Ctx, a: VerifyArgs) -> anyhow::Result<()> {
    let (bytes, src) = read_input(&a.chain)?;
    let chain = meshca::pemutil::parse_certs(&bytes, &src)?;
    let anchors = load_anchors(ctx, &a.bundle).await?;
    let v = inspect::verify(&chain, &anchors, &a.bundle, time::OffsetDateTime::now_utc());
    let ok = match a.usage {
        UsageArg::Server => v.valid_for_server,
        UsageArg::Client => v.valid_for_client,
        UsageArg::Any => v.valid_for_server || v.valid_for_client,
    };
    ctx.emit(&v, || meshca::escape::escape_lines(&verification_text(&v)))?;
    if ok {
        Ok(())
    } else {
        Err(anyhow::Error::new(UsageError(format!(
            "{src} does not verify against {} for {} use: {}",
            a.bundle,
            format!("{:?}", a.usage).to_lowercase(),
            v.error
                .clone()
                .unwrap_or_else(|| "wrong extended key usage".into())
        ))))
    }
}
