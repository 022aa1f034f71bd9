//! Shared CLI plumbing: store selection, output, logging, exit codes.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use meshca::identity::{DnsName, SpiffeId};
use serde::Serialize;

/// Output format of stdout data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Human-readable text.
    Text,
    /// One JSON document.
    Json,
}

/// Format of stderr logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Plain text lines.
    Text,
    /// JSON lines.
    Json,
}

/// The global flags: every subcommand of `meshca` takes them, and so does `meshca-sds`, which
/// shares this definition (its `serve --help` must list the same flags as `meshca sds serve`).
#[derive(clap::Args, Debug)]
pub struct GlobalArgs {
    /// Home directory of the local store [default: $MESHCA_HOME, else $XDG_DATA_HOME/meshca,
    /// else ~/.local/share/meshca].
    #[arg(long, global = true, env = "MESHCA_HOME")]
    pub home: Option<PathBuf>,
    /// Where CAs live: `local` (the home directory) or `kube:<namespace>`.
    #[arg(long, global = true, default_value = "local")]
    pub store: String,
    /// Kubeconfig for `--store kube:<ns>`, `bundle publish` and `signer run`
    /// [default: $KUBECONFIG, else ~/.kube/config, else the in-cluster service account].
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// Output format of data printed on stdout.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// Log level for diagnostics on stderr (error, warn, info, debug, trace); RUST_LOG overrides.
    #[arg(long, global = true, default_value = "warn")]
    pub log_level: String,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl GlobalArgs {
    /// Starts logging; `serves` raises the default level (warn) to info, where a server logs
    /// each push, ACK and NACK.
    pub fn init_logging(&self, serves: bool) {
        let level = match self.log_level.as_str() {
            "warn" if serves => "info",
            l => l,
        };
        init_logging(level, self.log_format);
    }

    pub fn into_ctx(self) -> Ctx {
        Ctx {
            home: self.home,
            store: self.store,
            kubeconfig: self.kubeconfig,
            output: self.output,
        }
    }
}

/// Global options every command sees.
#[derive(Debug)]
pub struct Ctx {
    pub home: Option<PathBuf>,
    pub store: String,
    pub kubeconfig: Option<PathBuf>,
    pub output: OutputFormat,
}

/// A user error raised by the CLI itself (bad flag combination and the like): exit 1.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg.into()))
}

impl Ctx {
    pub fn home_dir(&self) -> anyhow::Result<PathBuf> {
        match &self.home {
            Some(h) if !h.as_os_str().is_empty() => Ok(h.clone()),
            _ => meshca::store::local::default_home()
                .ok_or_else(|| usage("no home directory: pass --home or set MESHCA_HOME")),
        }
    }

    pub fn json(&self) -> bool {
        self.output == OutputFormat::Json
    }

    /// Prints `value` as JSON when `--output json`, else the text from `text()`.
    pub fn emit<T: Serialize>(
        &self,
        value: &T,
        text: impl FnOnce() -> String,
    ) -> anyhow::Result<()> {
        let mut out = std::io::stdout().lock();
        if self.json() {
            serde_json::to_writer_pretty(&mut out, value)?;
            writeln!(out)?;
        } else {
            let t = text();
            write!(out, "{t}")?;
            if !t.is_empty() && !t.ends_with('\n') {
                writeln!(out)?;
            }
        }
        Ok(())
    }
}

/// Reads a file (or stdin for `-`) with the input size limit.
pub fn read_input(path: &Path) -> anyhow::Result<(Vec<u8>, String)> {
    if path == Path::new("-") {
        Ok((
            meshca::fsutil::read_limited_from("<stdin>", std::io::stdin().lock())?,
            "<stdin>".into(),
        ))
    } else {
        Ok((
            meshca::fsutil::read_limited(path)?,
            path.display().to_string(),
        ))
    }
}

/// The DER of the first `CERTIFICATE REQUEST` PEM block in a file (or stdin for `-`).
pub fn read_csr_der(path: &Path) -> anyhow::Result<Vec<u8>> {
    let (bytes, src) = read_input(path)?;
    Ok(meshca::pemutil::parse_blocks(&bytes, &src)?
        .into_iter()
        .find(|b| b.tag() == "CERTIFICATE REQUEST" || b.tag() == "NEW CERTIFICATE REQUEST")
        .ok_or_else(|| meshca::Error::Pem {
            source_name: src.clone(),
            reason: "no CERTIFICATE REQUEST block".into(),
        })?
        .into_contents())
}

/// The command line of `prog`: `--help` and `--version` print and exit 0; a usage error is
/// one line on stderr and exit 1, like every other user error.
pub fn parse_args<C: clap::Parser>(prog: &str) -> Result<C, std::process::ExitCode> {
    C::try_parse().map_err(|e| {
        if e.use_stderr() {
            eprintln!("{prog}: error: {}", clap_one_line(&e));
            std::process::ExitCode::from(1)
        } else {
            let _ = e.print(); // --help, --version
            std::process::ExitCode::SUCCESS
        }
    })
}

/// How `prog` exits after its command: 0, or one line on stderr and [`exit_code`].
pub fn finish(prog: &str, result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{prog}: error: {}", one_line(&e));
            std::process::ExitCode::from(exit_code(&e))
        }
    }
}

/// The async runtime of a command: `workers` worker threads, or with 1 a current-thread
/// runtime (everything on the main thread, no worker threads). `prog` names the program in the
/// error.
pub fn runtime(
    prog: &str,
    workers: usize,
) -> Result<tokio::runtime::Runtime, std::process::ExitCode> {
    let mut b = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    b.enable_all().build().map_err(|e| {
        eprintln!("{prog}: error: cannot start the async runtime: {e}");
        std::process::ExitCode::from(2)
    })
}

pub fn init_logging(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => b.try_init(),
        LogFormat::Json => b.json().try_init(),
    };
}

/// 1 for the user's errors (input, policy, unknown names), 2 for everything else.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if cause.is::<UsageError>() {
            return 1;
        }
        if let Some(me) = cause.downcast_ref::<meshca::Error>() {
            return if me.is_user_error() { 1 } else { 2 };
        }
    }
    2
}

/// The error chain on one line.
pub fn one_line(e: &anyhow::Error) -> String {
    let line = format!("{e:#}").replace('\n', " ");
    meshca::escape::escape_controls(&line).into_owned()
}

/// "3d 4h" style remaining time.
pub fn time_left(secs: i64) -> String {
    if secs <= 0 {
        return "EXPIRED".into();
    }
    let d = secs / 86400;
    let h = (secs % 86400) / 3600;
    let m = (secs % 3600) / 60;
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else {
        format!("{m}m {}s", secs % 60)
    }
}

pub fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// A clap error on one line: its message lines joined, without the usage and help hints.
pub fn clap_one_line(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let parts: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect();
    let line = parts.join(" ");
    meshca::escape::escape_controls(line.trim_start_matches("error: ")).into_owned()
}

/// The workload identity flags shared by `issue` and `sds serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct IdentityArgs {
    /// SPIFFE ID for the URI SAN.
    #[arg(long, conflicts_with_all = ["namespace", "service_account"])]
    pub spiffe_id: Option<SpiffeId>,
    /// Kubernetes namespace (with --service-account: spiffe://<td>/ns/<ns>/sa/<sa>).
    #[arg(long, requires = "service_account")]
    pub namespace: Option<String>,
    /// Kubernetes service account.
    #[arg(long, requires = "namespace")]
    pub service_account: Option<String>,
    /// DNS SAN (repeatable).
    #[arg(long = "dns", value_name = "NAME")]
    pub dns: Vec<DnsName>,
    /// IP SAN (repeatable).
    #[arg(long = "ip", value_name = "ADDR")]
    pub ips: Vec<IpAddr>,
}

impl IdentityArgs {
    /// The SANs these flags ask for, SPIFFE IDs built in trust domain `td`.
    pub fn sans(
        &self,
        td: &meshca::identity::TrustDomain,
    ) -> meshca::Result<meshca::identity::Sans> {
        meshca::config::sans_from_parts(
            td,
            self.spiffe_id.clone(),
            self.namespace.as_deref(),
            self.service_account.as_deref(),
            self.dns.clone(),
            self.ips.clone(),
        )
    }
}
