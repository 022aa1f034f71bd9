//! `meshca-sds`: the SDS server alone, for the sidecar beside each Envoy.
//!
//! `meshca-sds serve` is `meshca sds serve`: the same flag definitions (cli/src/sds.rs and the
//! global flags of cli/src/common.rs, compiled into both binaries), the same sources (local CA,
//! files, kube-csr) and the same behaviour, with these differences: `--worker-threads` defaults
//! to 1 (a current-thread runtime) instead of 2; the image's build (`--no-default-features`,
//! profile `sidecar`) leaves the AWS SDK out, so a CA backed by ACM Private CA is refused, and
//! aborts on a panic instead of unwinding. What it leaves out is everything else of `meshca`:
//! the other subcommands, the signer, the Kubernetes store and ACM Private CA. A smaller binary
//! is what a server idling beside every Envoy pays for in RSS (docs/sds.md, "Idle footprint").
#![forbid(unsafe_code)]

// The modules of `meshca` that `sds serve` needs. Helpers the other subcommands use are
// compiled here too and left unused.
#[allow(dead_code)]
#[path = "../common.rs"]
mod common;
#[path = "../sds.rs"]
mod sds;

use std::process::ExitCode;

use clap::Parser;

/// The meshca SDS server alone (`meshca sds serve`), for a sidecar beside each Envoy.
#[derive(Parser, Debug)]
#[command(name = "meshca-sds", version, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: common::GlobalArgs,
    #[command(subcommand)]
    command: sds::SdsCmd,
}

fn main() -> ExitCode {
    let cli: Cli = match common::parse_args("meshca-sds") {
        Ok(c) => c,
        Err(code) => return code,
    };
    cli.global.init_logging(true);
    // One thread by default: a sidecar serves the few streams of one Envoy, and each worker
    // thread would idle with its own stack and runtime state (docs/sds.md, "Idle footprint").
    let rt = match common::runtime("meshca-sds", cli.command.worker_threads(1)) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let ctx = cli.global.into_ctx();
    common::finish("meshca-sds", rt.block_on(sds::run(&ctx, cli.command)))
}
