//! The test environment the CLI test binaries share: a temporary directory with a meshca home
//! in it, and helpers that run the built `meshca` binary there.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// The meshca home (`MESHCA_HOME`) of every command run here.
    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// `meshca ARGS` in the directory, with its home, no `RUST_LOG` and no test hooks.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_meshca"));
        c.args(args)
            .env("MESHCA_HOME", self.home())
            .env_remove("RUST_LOG")
            .env_remove("MESHCA_DANGER_HANG_AFTER_STEP")
            .current_dir(self.dir.path());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).stdin(Stdio::null()).output().unwrap()
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "meshca {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }
}

/// Runs openssl, which must succeed.
pub fn openssl(args: &[&str]) -> Output {
    let o = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl must be installed (.ci/run installs it)");
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// A CSR made by openssl with the given key spec and extra -addext values.
pub fn openssl_csr(env: &Env, name: &str, keyspec: &[&str], addext: &[&str]) -> PathBuf {
    let key = env.path(&format!("{name}.key"));
    let csr = env.path(&format!("{name}.csr"));
    let mut args = vec!["genpkey", "-out", key.to_str().unwrap()];
    args.extend_from_slice(keyspec);
    openssl(&args);
    let mut args = vec![
        "req",
        "-new",
        "-key",
        key.to_str().unwrap(),
        "-subj",
        "/CN=ext",
        "-out",
        csr.to_str().unwrap(),
    ];
    for a in addext {
        args.push("-addext");
        args.push(a);
    }
    openssl(&args);
    csr
}

/// openssl genpkey options for an ECDSA P-256 key.
pub const P256: &[&str] = &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"];

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed (and reaped) when dropped.
pub struct Running(pub Child);

impl Running {
    /// SIGTERM, then its exit status (waits up to 15 s).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        sigterm(self.0.id());
        let mut status = None;
        assert!(
            wait_for(|| {
                status = self.0.try_wait().unwrap();
                status.is_some()
            }),
            "no exit within 15 s of SIGTERM"
        );
        status.unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends SIGTERM to `pid`.
pub fn sigterm(pid: u32) {
    let st = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// Polls `f` every 50 ms for up to 15 s.
pub fn wait_for(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..300 {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// `GET path` on 127.0.0.1:`port` with an optional `Accept`: (status, content type, body).
pub fn http_get(port: u16, path: &str, accept: Option<&str>) -> Option<(u16, String, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{accept}Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    let ctype = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    Some((code, ctype, body.to_string()))
}

/// A finished command's stdout then stderr, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `kubectl --kubeconfig KUBECONFIG ARGS`, with `stdin` written to it when given.
pub fn kubectl_output(
    kubectl: &Path,
    kubeconfig: &Path,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> Output {
    let mut c = Command::new(kubectl);
    c.arg("--kubeconfig").arg(kubeconfig).args(args);
    c.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = c.spawn().expect("kubectl");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    child.wait_with_output().unwrap()
}

/// `to` relative to directory `from` (both made canonical): kustomize takes only relative
/// paths, so a test's overlay refers to deploy/ this way.
pub fn relative(from: &Path, to: &Path) -> PathBuf {
    let from = from.canonicalize().unwrap();
    let to = to.canonicalize().unwrap();
    let common = from
        .components()
        .zip(to.components())
        .take_while(|(a, b)| a == b)
        .count();
    let mut out = PathBuf::new();
    for _ in from.components().skip(common) {
        out.push("..");
    }
    for c in to.components().skip(common) {
        out.push(c);
    }
    out
}

/// A peer found through environment variable `var`, or `None` with the reason printed; with
/// `CI=true` a missing peer is a failure. `how` says how to provide it.
pub fn peer(var: &str, how: &str) -> Option<PathBuf> {
    match std::env::var_os(var).filter(|v| !v.is_empty()) {
        Some(p) => Some(PathBuf::from(p)),
        None if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{var} is not set: with CI=true this test needs it ({how})")
        }
        None => {
            eprintln!("skipping: {var} is not set ({how})");
            None
        }
    }
}
