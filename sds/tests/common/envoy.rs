//! A real Envoy for the tests (path in `MESHCA_ENVOY_BIN`): start it with meshca's example
//! bootstrap, read its admin API, and curl through its listener.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use meshca_sds::secrets::Kind;
use meshca_sds::{Listen, Server, DEFAULT_NAME};

pub fn envoy_bin() -> Option<PathBuf> {
    match std::env::var_os("MESHCA_ENVOY_BIN").filter(|v| !v.is_empty()) {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!(
                    "MESHCA_ENVOY_BIN is not set and CI=true: the real-Envoy tests must run in CI"
                );
            }
            eprintln!(
                "SKIPPED: set MESHCA_ENVOY_BIN to the envoy binary to run the real-Envoy SDS tests"
            );
            None
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Envoy as a child of the test thread (it sets a parent-death signal); killed on drop.
pub struct Envoy {
    pub child: Child,
    pub admin: String,
    pub log: PathBuf,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Envoy {
    pub fn start(bin: &Path, dir: &Path, bootstrap: &str) -> Envoy {
        let cfg = dir.join("envoy.yaml");
        std::fs::write(&cfg, bootstrap).unwrap();
        let admin_path = dir.join("admin.addr");
        let log = dir.join("envoy.log");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&cfg)
            .args([
                "--disable-hot-restart",
                "--log-level",
                "info",
                "--concurrency",
                "1",
            ])
            .arg("--admin-address-path")
            .arg(&admin_path)
            .arg("--log-path")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start envoy");
        let mut e = Envoy {
            child,
            admin: String::new(),
            log,
        };
        for _ in 0..200 {
            if let Ok(a) = std::fs::read_to_string(&admin_path) {
                if !a.trim().is_empty() {
                    e.admin = a.trim().to_string();
                    return e;
                }
            }
            if let Ok(Some(st)) = e.child.try_wait() {
                panic!("envoy exited at startup ({st}); log:\n{}", e.log_tail());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "envoy did not write its admin address; log:\n{}",
            e.log_tail()
        );
    }

    pub fn log_tail(&self) -> String {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// GET on the admin API (through curl: the admin server speaks HTTP/1.1 only and
    /// answers with chunked bodies).
    pub async fn get(&self, path: &str) -> String {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "5"])
            .arg(format!("http://{}{path}", self.admin))
            .output()
            .await
            .expect("run curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Stats matching a prefix, as name -> value.
    pub async fn stats(&self, filter: &str) -> std::collections::BTreeMap<String, String> {
        self.get(&format!("/stats?filter={filter}"))
            .await
            .lines()
            .filter_map(|l| {
                l.split_once(": ")
                    .map(|(a, b)| (a.to_string(), b.to_string()))
            })
            .collect()
    }

    /// Serial numbers of the certificate chains Envoy serves (normalized).
    pub async fn serving_serials(&self) -> Vec<String> {
        let v: serde_json::Value =
            serde_json::from_str(&self.get("/certs").await).unwrap_or_default();
        let mut out = Vec::new();
        for c in v["certificates"].as_array().into_iter().flatten() {
            for cc in c["cert_chain"].as_array().into_iter().flatten() {
                if let Some(s) = cc["serial_number"].as_str() {
                    out.push(norm_serial(s));
                }
            }
        }
        out
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

pub fn norm_serial(s: &str) -> String {
    let h = s.replace(':', "").to_ascii_lowercase();
    h.trim_start_matches('0').to_string()
}

pub fn served_serial(server: &Server) -> String {
    let snap = server.snapshots().borrow().clone();
    match &snap.get(DEFAULT_NAME).unwrap().kind {
        Kind::Certificate { serial, .. } => norm_serial(serial),
        k => panic!("default is {k:?}"),
    }
}

/// curl through Envoy with a client certificate; Ok(body) or Err(curl's message).
pub async fn curl(port: u16, ca: &Path, cert: &Path, key: &Path) -> Result<String, String> {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "5", "--tls-max", "1.2"])
        .arg("--cacert")
        .arg(ca)
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .arg("--resolve")
        .arg(format!("localhost:{port}:127.0.0.1"))
        .arg(format!("https://localhost:{port}/"))
        .output()
        .await
        .expect("run curl");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

pub fn bootstrap(delta: bool, sds_addr: &Listen, port: u16) -> String {
    let template = include_str!("../../../deploy/sds/envoy-bootstrap.yaml");
    let mut b = template
        .replace("port_value: 15000", "port_value: 0")
        .replace(
            "address: 0.0.0.0, port_value: 15443",
            &format!("address: 127.0.0.1, port_value: {port}"),
        );
    assert!(b.contains(&format!("address: 127.0.0.1, port_value: {port}")));
    assert!(b.contains("api_type: GRPC") && b.contains("pipe: { path: /run/meshca/sds.sock }"));
    if delta {
        b = b.replace("api_type: GRPC", "api_type: DELTA_GRPC");
    }
    match sds_addr {
        Listen::Unix(p) => b.replace("/run/meshca/sds.sock", &p.display().to_string()),
        Listen::Tcp(a) => b.replace(
            "pipe: { path: /run/meshca/sds.sock }",
            &format!(
                "socket_address: {{ address: {}, port_value: {} }}",
                a.ip(),
                a.port()
            ),
        ),
    }
}

/// Polls the async check `f` every 100 ms for up to `secs` seconds.
pub async fn eventually_async<F, Fut>(secs: u64, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < end {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A counter of an Envoy stats map (0 when absent).
pub fn stat(stats: &std::collections::BTreeMap<String, String>, k: &str) -> u64 {
    stats.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// An in-process SDS server for `source` on a Unix socket in the home's temp dir (polling
/// every 200 ms), and an Envoy on the example bootstrap that takes its secrets from it and
/// listens on a free port (returned).
pub async fn server_and_envoy(
    bin: &Path,
    home: &super::Home,
    source: meshca_sds::SourceConfig,
    delta: bool,
) -> (Server, Envoy, u16) {
    let sock = home.tmp().join("sds.sock");
    let mut cfg = meshca_sds::ServeConfig::new(source, vec![Listen::Unix(sock.clone())]);
    cfg.rotation.poll_interval = Duration::from_millis(200);
    let server = Server::start(cfg).await.unwrap();
    let port = free_port();
    let envoy = Envoy::start(
        bin,
        home.tmp(),
        &bootstrap(delta, &Listen::Unix(sock), port),
    );
    (server, envoy, port)
}
