//! `meshca issue`: sign a workload certificate.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use meshca::bundle;
use meshca::issue::{issue_csr, issue_workload, CsrOptions, IssuedCert, LedgerEntry};
use meshca::key::KeyAlgorithm;
use meshca::output::{self, ObjectRef};
use meshca::report::IssueReport;
use meshca::store::{self, Store};

use crate::common::{rfc3339, time_left, usage, Ctx, IdentityArgs};

#[derive(Args, Debug)]
pub struct IssueArgs {
    /// Issuing CA.
    #[arg(long)]
    ca: String,
    #[command(flatten)]
    id: IdentityArgs,
    /// Lifetime, e.g. 24h [default: the CA policy's default TTL].
    #[arg(long, value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
    /// Workload key algorithm.
    #[arg(long, default_value = "ecdsa-p256", conflicts_with = "csr")]
    key: KeyAlgorithm,
    /// Sign this PKCS#10 CSR (PEM file, or - for stdin) instead of generating a key. Its SANs
    /// are used unless --spiffe-id/--namespace/--dns/--ip are given.
    #[arg(long, value_name = "FILE")]
    csr: Option<PathBuf>,
    /// Base name of the files: <name>_cert.pem, <name>_key.pem, <name>_cert_chain.pem
    /// [default: the service account, else the first DNS label].
    #[arg(long)]
    name: Option<String>,
    /// Directory for the files [default: the current directory, unless --secret or --output json].
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Print a kubernetes.io/tls Secret manifest NAMESPACE/NAME (tls.crt, tls.key, ca.crt) on stdout.
    #[arg(long, value_name = "NAMESPACE/NAME", conflicts_with_all = ["csr", "out_dir"])]
    secret: Option<ObjectRef>,
    /// Trust bundle for ca.crt / the bundle file [default: the issuing CA's root].
    #[arg(long)]
    bundle: Option<String>,
}

fn default_name(a: &IssueArgs, cert: &IssuedCert) -> String {
    if let Some(n) = &a.name {
        return n.clone();
    }
    if let Some(sa) = &a.id.service_account {
        return sa.clone();
    }
    if let Some(d) = a.id.dns.first() {
        return d
            .as_str()
            .trim_start_matches("*.")
            .split('.')
            .next()
            .unwrap_or("workload")
            .to_string();
    }
    if let Some(id) = &a.id.spiffe_id {
        if let Some(last) = id.path().rsplit('/').next() {
            return last.to_string();
        }
    }
    cert.info
        .sans
        .dns
        .first()
        .map(|d| d.split('.').next().unwrap_or("workload").to_string())
        .unwrap_or_else(|| "workload".into())
}

async fn anchors_pem(
    store: &dyn Store,
    bundle_name: Option<&str>,
    cert: &IssuedCert,
) -> anyhow::Result<(String, Option<String>)> {
    Ok(match bundle_name {
        Some(b) => {
            let spec = store.load_bundle(b).await?;
            let anchors = store::bundle_anchors(store, &spec).await?;
            (bundle::to_pem(&anchors), Some(spec.file_name()))
        }
        None => (bundle::to_pem(std::slice::from_ref(&cert.root)), None),
    })
}

pub async fn run(ctx: &Ctx, a: IssueArgs) -> anyhow::Result<()> {
    if let Some(n) = &a.name {
        output::validate_workload_name(n)?;
    }
    let store = ctx.store(false).await?;
    let issuer = store::load_issuer(store.as_ref(), &a.ca).await?;
    if let Some(b) = &a.bundle {
        store.load_bundle(b).await?; // fail before signing
    }
    let td = issuer.meta().trust_domain.clone();
    let now = time::OffsetDateTime::now_utc();
    let given = a.id.sans(&td)?;

    let (cert, key) = match &a.csr {
        Some(path) => {
            let info_der = crate::common::read_csr_der(path)?;
            let opts = CsrOptions {
                override_sans: (!given.is_empty()).then_some(given),
                ttl: a.ttl,
                ..CsrOptions::default()
            };
            (
                issue_csr(issuer.as_ref(), &info_der, &opts, now).await?,
                None,
            )
        }
        None => {
            let _p = a.key.is_rsa().then(|| {
                crate::progress::Progress::spinner(ctx, format!("generating a {} key", a.key))
            });
            let w = issue_workload(issuer.as_ref(), &given, a.ttl, a.key, now).await?;
            (w.cert.clone(), Some(w))
        }
    };
    let (ca_pem, bundle_file) = anchors_pem(store.as_ref(), a.bundle.as_deref(), &cert).await?;
    let entry = LedgerEntry::for_cert(&a.ca, &cert, now);
    let mut report = IssueReport {
        ca: a.ca.clone(),
        serial: entry.serial.clone(),
        subject: cert.info.subject.clone(),
        sans: entry.sans.clone(),
        not_before: cert.info.not_before,
        not_after: cert.info.not_after,
        files: None,
        bundle_file: None,
        certificate_chain_pem: None,
        private_key_pem: None,
        ca_pem: None,
    };

    if let Some(at) = &a.secret {
        let w = key
            .as_ref()
            .ok_or_else(|| usage("--secret needs a generated key (not --csr)"))?;
        if let Some(ns) = crate::kube_store::kube_namespace(ctx) {
            // With the kube store the Secret is written to the cluster, not printed.
            let ks = crate::kube_store::open(ns, ctx.kubeconfig.as_deref()).await?;
            ks.apply_tls_secret(
                &at.namespace,
                &at.name,
                &w.cert.chain_pem(),
                &w.key.to_pkcs8_pem(),
                &ca_pem,
                &a.ca,
            )
            .await?;
            store.record(&entry).await?;
            eprintln!(
                "meshca: issued serial {} for {} (valid until {}); wrote Secret {at}",
                report.serial,
                report.sans.join(", "),
                rfc3339(report.not_after)
            );
            return ctx.emit(&report, String::new);
        }
        let yaml = output::tls_secret_manifest(at, &a.ca, w, &ca_pem)?;
        store.record(&entry).await?;
        print!("{yaml}");
        eprintln!(
            "meshca: issued serial {} for {} (valid until {}); Secret {at} manifest on stdout",
            report.serial,
            report.sans.join(", "),
            rfc3339(report.not_after)
        );
        return Ok(());
    }

    if ctx.json() && a.out_dir.is_none() {
        report.certificate_chain_pem = Some(cert.chain_pem());
        report.private_key_pem = key.as_ref().map(|w| w.key.to_pkcs8_pem().to_string());
        report.ca_pem = Some(ca_pem);
        store.record(&entry).await?;
        return ctx.emit(&report, String::new);
    }

    let dir = a.out_dir.clone().unwrap_or_else(|| PathBuf::from("."));
    let name = default_name(&a, &cert);
    let files = match &key {
        Some(w) => output::write_workload_files(&dir, &name, w)?,
        None => output::write_cert_files(&dir, &name, &cert)?,
    };
    if let Some(f) = bundle_file {
        let p = dir.join(f);
        meshca::fsutil::write_atomic(&p, ca_pem.as_bytes(), meshca::fsutil::PUBLIC_MODE)?;
        report.bundle_file = Some(p);
    }
    report.files = Some(files);
    // The ledger records what was delivered: written after the files.
    store.record(&entry).await?;
    let left = (report.not_after - now).whole_seconds();
    ctx.emit(&report, || {
        let f = report.files.as_ref().expect("files set");
        let mut s = format!(
            "issued serial {} by {}\n  subject   {}\n  SANs      {}\n  valid     until {} ({})\n  cert      {}\n",
            report.serial,
            report.ca,
            report.subject,
            report.sans.join(", "),
            rfc3339(report.not_after),
            time_left(left),
            f.cert.display()
        );
        if key.is_some() {
            s.push_str(&format!("  key       {}\n", f.key.display()));
        }
        s.push_str(&format!("  chain     {}\n", f.chain.display()));
        if let Some(b) = &report.bundle_file {
            s.push_str(&format!("  bundle    {}\n", b.display()));
        }
        s
    })
}
