//! `meshca`: the private PKI of a Kubernetes service mesh, from the command line.
#![forbid(unsafe_code)]

mod aws;
mod bundle;
mod ca;
mod common;
mod completions;
mod init;
mod inspect;
mod issue;
mod istio_ca;
mod kube_store;
mod policy;
mod progress;
mod revoke;
mod sds;
mod signer;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use common::Ctx;

/// Private PKI for Envoy-based service meshes: CAs, workload certificates, trust bundles.
#[derive(Parser, Debug)]
#[command(name = "meshca", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: common::GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create CAs (roots and intermediates), from flags or a meshca.toml.
    Init(init::InitArgs),
    /// Sign a workload certificate (fresh key or an external CSR).
    Issue(issue::IssueArgs),
    /// Create, update, show and export trust bundles.
    #[command(subcommand)]
    Bundle(bundle::BundleCmd),
    /// Show a certificate, chain, CSR or bundle file.
    Inspect(inspect::InspectArgs),
    /// Verify a certificate chain against a trust bundle (exit 1 when it does not verify).
    Verify(inspect::VerifyArgs),
    /// List and show CAs.
    #[command(subcommand)]
    Ca(ca::CaCmd),
    /// Show the issuance ledger.
    Ledger(ca::LedgerArgs),
    /// Check the store: every CA, bundle and ledger line must load.
    Check,
    /// Revoke a certificate by serial (recorded in the store, published in CRLs).
    Revoke(revoke::RevokeArgs),
    /// Write a CA's X.509 v2 CRL (PEM).
    Crl(revoke::CrlArgs),
    /// Envoy SDS server.
    #[command(subcommand)]
    Sds(sds::SdsCmd),
    /// The in-cluster CSR signer controller.
    #[command(subcommand)]
    Signer(signer::SignerCmd),
    /// Istio's CA API (IstioCertificateService) for istio-agent and ztunnel (CA_ADDR).
    #[command(subcommand)]
    IstioCa(istio_ca::IstioCaCmd),
    /// Explain issuance policy decisions offline.
    #[command(subcommand)]
    Policy(policy::PolicyCmd),
    /// Print a shell completion script on stdout (bash, zsh, fish, powershell, elvish).
    Completions(completions::CompletionsArgs),
    /// Print the man page (roff) on stdout; --out-dir writes one page per subcommand.
    Man(completions::ManArgs),
}

fn main() -> ExitCode {
    let cli: Cli = match common::parse_args("meshca") {
        Ok(c) => c,
        Err(code) => return code,
    };
    // The servers log each push, ACK and NACK at info.
    cli.global
        .init_logging(matches!(cli.command, Command::Sds(_) | Command::IstioCa(_)));
    // Every command runs on 2 worker threads, `sds serve` on --worker-threads (default 2: it
    // may serve a node's or a fleet's Envoys).
    let workers = match &cli.command {
        Command::Sds(c) => c.worker_threads(2),
        _ => 2,
    };
    let rt = match common::runtime("meshca", workers) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let ctx = cli.global.into_ctx();
    common::finish("meshca", rt.block_on(run(ctx, cli.command)))
}

async fn run(ctx: Ctx, cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Init(a) => init::run(&ctx, a).await,
        Command::Issue(a) => issue::run(&ctx, a).await,
        Command::Bundle(c) => bundle::run(&ctx, c).await,
        Command::Inspect(a) => inspect::run_inspect(&ctx, a).await,
        Command::Verify(a) => inspect::run_verify(&ctx, a).await,
        Command::Ca(c) => ca::run(&ctx, c).await,
        Command::Ledger(a) => ca::run_ledger(&ctx, a).await,
        Command::Check => ca::run_check(&ctx).await,
        Command::Revoke(a) => revoke::run_revoke(&ctx, a).await,
        Command::Crl(a) => revoke::run_crl(&ctx, a).await,
        Command::Sds(c) => sds::run(&ctx, c).await,
        Command::Signer(c) => signer::run_cmd(&ctx, c).await,
        Command::IstioCa(c) => istio_ca::run(&ctx, c).await,
        Command::Policy(c) => policy::run(&ctx, c).await,
        Command::Completions(a) => completions::run_completions(a),
        Command::Man(a) => completions::run_man(a),
    }
}
