//! Verification of meshca's certificates by real peers: `openssl verify`, `openssl x509`,
//! rustls-webpki, rustls mutual-TLS handshakes, `openssl s_server`/`s_client` and curl.
//!
//! The mesh is the two-CA App Mesh example (ca1 signs frontend and blue, ca2 signs green) plus
//! an intermediate under ca1 and one root CA per key type. Everything is created with the
//! library, written as App Mesh-style PEM files to a temporary directory, and read back from
//! those files by the peers.
//!
//! `openssl` and `curl` are Debian packages that `.ci/run` installs. When one is missing the
//! test fails under `CI=true` and otherwise prints why it is skipped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshca::ca::{create_intermediate, create_root, CaMaterial, CaSpec};
use meshca::identity::{DnsName, Sans, SpiffeId, TrustDomain};
use meshca::issue::{issue_workload, LocalIssuer, Workload};
use meshca::key::KeyAlgorithm;
use meshca::pki_types::pem::PemObject;
use meshca::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use meshca::x509::{verify_chain, CertInfo, Usage};
use rustls::client::WebPkiServerVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, ClientConnection, RootCertStore,
    ServerConfig, ServerConnection,
};
use time::OffsetDateTime;

const NS: &str = "howto-k8s-mtls-file-based";
/// Upper bound of every wait on a peer process or socket.
const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Peers: find them, or fail under CI / skip with a reason.

/// Whether `tool` runs (`tool args` exits 0). When it does not: panics under `CI=true`,
/// otherwise prints a skip reason and returns false.
fn require_tool(tool: &str, args: &[&str], test: &str) -> bool {
    let ok = Command::new(tool)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: `{tool}` is not installed or does not run, and CI=true");
    }
    eprintln!("SKIPPED {test}: `{tool}` is not installed (install the Debian package `{tool}`)");
    false
}

fn have_openssl(test: &str) -> bool {
    require_tool("openssl", &["version"], test)
}

// ---------------------------------------------------------------------------------------------
// The mesh.

/// One issued workload and where its files are.
struct Leaf {
    name: String,
    spiffe_id: String,
    dns: String,
    /// The issuing CA's name.
    ca: String,
    /// The root at the top of its chain.
    root_ca: String,
    workload: Workload,
}

struct Mesh {
    dir: tempfile::TempDir,
    now: OffsetDateTime,
    cas: Vec<(String, CaMaterial)>,
    leaves: Vec<Leaf>,
}

impl Mesh {
    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }
    fn leaf(&self, name: &str) -> &Leaf {
        self.leaves.iter().find(|l| l.name == name).unwrap()
    }
    fn ca(&self, name: &str) -> &CaMaterial {
        &self.cas.iter().find(|(n, _)| n == name).unwrap().1
    }
    /// `<ca>_root.pem`: the CA's root certificate (trust anchor file).
    fn root_file(&self, ca: &str) -> PathBuf {
        self.path(&format!("{ca}_root.pem"))
    }
    fn cert_file(&self, leaf: &str) -> PathBuf {
        self.path(&format!("{leaf}_cert.pem"))
    }
    fn chain_file(&self, leaf: &str) -> PathBuf {
        self.path(&format!("{leaf}_cert_chain.pem"))
    }
    fn key_file(&self, leaf: &str) -> PathBuf {
        self.path(&format!("{leaf}_key.pem"))
    }
    /// `<leaf>_intermediates.pem`, when the chain has intermediates.
    fn intermediates_file(&self, leaf: &str) -> Option<PathBuf> {
        let p = self.path(&format!("{leaf}_intermediates.pem"));
        p.exists().then_some(p)
    }
    fn bundle_file(&self) -> PathBuf {
        self.path("ca_1_ca_2_bundle.pem")
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

fn root_spec(name: &str, key: KeyAlgorithm) -> CaSpec {
    let mut s = CaSpec::root(name);
    s.key = key;
    s
}

/// Builds the mesh with the library and writes every PEM file.
fn build_mesh() -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let td = TrustDomain::default();

    let ca1 = create_root(&root_spec("ca1", KeyAlgorithm::EcdsaP256), now).unwrap();
    let ca2 = create_root(&root_spec("ca2", KeyAlgorithm::EcdsaP256), now).unwrap();
    let mut int_spec = root_spec("ca1-int", KeyAlgorithm::EcdsaP256);
    int_spec.parent = Some("ca1".into());
    let ca1_int = create_intermediate(&int_spec, &ca1, now).unwrap();
    let p384 = create_root(&root_spec("ca-p384", KeyAlgorithm::EcdsaP384), now).unwrap();
    let ed = create_root(&root_spec("ca-ed25519", KeyAlgorithm::Ed25519), now).unwrap();
    let rsa = create_root(&root_spec("ca-rsa2048", KeyAlgorithm::Rsa2048), now).unwrap();

    // (workload, service account, issuing CA, root CA, key algorithm)
    let plan: [(&str, &str, &str, &str, KeyAlgorithm); 7] = [
        (
            "frontend",
            "frontend",
            "ca1",
            "ca1",
            KeyAlgorithm::EcdsaP256,
        ),
        ("blue", "blue", "ca1", "ca1", KeyAlgorithm::EcdsaP256),
        ("green", "green", "ca2", "ca2", KeyAlgorithm::EcdsaP256),
        (
            "purple",
            "purple",
            "ca1-int",
            "ca1",
            KeyAlgorithm::EcdsaP256,
        ),
        (
            "p384",
            "p384",
            "ca-p384",
            "ca-p384",
            KeyAlgorithm::EcdsaP384,
        ),
        (
            "ed25519",
            "ed25519",
            "ca-ed25519",
            "ca-ed25519",
            KeyAlgorithm::Ed25519,
        ),
        (
            "rsa2048",
            "rsa2048",
            "ca-rsa2048",
            "ca-rsa2048",
            KeyAlgorithm::Rsa2048,
        ),
    ];

    let mut cas = vec![
        ("ca1".to_string(), ca1),
        ("ca2".to_string(), ca2),
        ("ca1-int".to_string(), ca1_int),
        ("ca-p384".to_string(), p384),
        ("ca-ed25519".to_string(), ed),
        ("ca-rsa2048".to_string(), rsa),
    ];
    for (name, ca) in &cas {
        std::fs::write(
            dir.path().join(format!("{name}_root.pem")),
            meshca::pemutil::certs_to_pem([ca.root()]),
        )
        .unwrap();
    }
    std::fs::write(
        dir.path().join("ca_1_ca_2_bundle.pem"),
        meshca::bundle::to_pem(&meshca::bundle::assemble([&cas[0].1, &cas[1].1])),
    )
    .unwrap();

    // Issuers take ownership of the CA key, so issue from reloaded copies.
    let mut leaves = Vec::new();
    for (name, sa, ca_name, root_ca, alg) in plan {
        let idx = cas.iter().position(|(n, _)| n == ca_name).unwrap();
        let ca = &cas[idx].1;
        let copy = CaMaterial {
            meta: ca.meta.clone(),
            cert: ca.cert.clone(),
            parents: ca.parents.clone(),
            key: Some(
                meshca::key::PrivateKey::from_pem(
                    &ca.key.as_ref().unwrap().to_pkcs8_pem(),
                    "ca key",
                )
                .unwrap(),
            ),
        };
        let issuer = LocalIssuer::new(copy).unwrap();
        let spiffe = SpiffeId::for_service_account(&td, NS, sa).unwrap();
        let dns = format!("{sa}.{NS}.svc.cluster.local");
        let sans = Sans {
            spiffe_id: Some(spiffe.clone()),
            dns: vec![DnsName::parse(&dns).unwrap()],
            ips: Vec::new(),
        };
        let w = block_on(issue_workload(&issuer, &sans, None, alg, now)).unwrap();
        meshca::output::write_workload_files(dir.path(), name, &w).unwrap();
        if !w.cert.intermediates.is_empty() {
            std::fs::write(
                dir.path().join(format!("{name}_intermediates.pem")),
                meshca::pemutil::certs_to_pem(w.cert.intermediates.iter()),
            )
            .unwrap();
        }
        leaves.push(Leaf {
            name: name.to_string(),
            spiffe_id: spiffe.to_string(),
            dns,
            ca: ca_name.to_string(),
            root_ca: root_ca.to_string(),
            workload: w,
        });
    }
    // Keep the CAs (with keys) for the tests that look at them.
    cas.sort_by(|a, b| a.0.cmp(&b.0));
    Mesh {
        dir,
        now,
        cas,
        leaves,
    }
}

// ---------------------------------------------------------------------------------------------
// Running commands with a bound.

/// Runs a command to completion within [`WAIT`], killing it on timeout.
fn run_bounded(cmd: &mut Command, stdin: Option<&[u8]>) -> Output {
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    if let Some(data) = stdin {
        child.stdin.take().unwrap().write_all(data).unwrap();
    }
    let out = Arc::new(Mutex::new(Vec::new()));
    let err = Arc::new(Mutex::new(Vec::new()));
    let t1 = pump(child.stdout.take().unwrap(), out.clone());
    let t2 = pump(child.stderr.take().unwrap(), err.clone());
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    t1.join().unwrap();
    t2.join().unwrap();
    let stdout = out.lock().unwrap().clone();
    let stderr = err.lock().unwrap().clone();
    Output {
        status,
        stdout,
        stderr,
    }
}

fn pump(
    mut r: impl Read + Send + 'static,
    into: Arc<Mutex<Vec<u8>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => into.lock().unwrap().extend_from_slice(&buf[..n]),
            }
        }
    })
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn openssl(args: &[&str]) -> Output {
    run_bounded(Command::new("openssl").args(args), None)
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

// ---------------------------------------------------------------------------------------------
// openssl verify + rustls-webpki path validation

/// `openssl verify -x509_strict -purpose <purpose> -CAfile <anchors> [-untrusted <ints>] <leaf>`.
fn openssl_verify(
    mesh: &Mesh,
    leaf: &str,
    anchors: &Path,
    with_intermediates: bool,
    purpose: &str,
) -> (bool, String) {
    let cert = mesh.cert_file(leaf);
    let ints = mesh.intermediates_file(leaf);
    let mut args = vec![
        "verify",
        "-x509_strict",
        "-purpose",
        purpose,
        "-CAfile",
        p(anchors),
    ];
    if with_intermediates {
        if let Some(i) = &ints {
            args.extend(["-untrusted", p(i)]);
        }
    }
    args.push(p(&cert));
    let out = openssl(&args);
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    let ok = out.status.success() && text(&out.stdout).contains(&format!("{}: OK", p(&cert)));
    (ok, all)
}

fn anchors(mesh: &Mesh, cas: &[&str]) -> Vec<CertificateDer<'static>> {
    cas.iter().map(|c| mesh.ca(c).root().clone()).collect()
}

#[test]
fn every_chain_verifies_with_openssl_and_webpki() {
    if !have_openssl("every_chain_verifies_with_openssl_and_webpki") {
        return;
    }
    let mesh = build_mesh();
    for leaf in &mesh.leaves {
        let root = mesh.root_file(&leaf.root_ca);
        for purpose in ["sslserver", "sslclient"] {
            let (ok, out) = openssl_verify(&mesh, &leaf.name, &root, true, purpose);
            assert!(ok, "{} ({purpose}) against its root: {out}", leaf.name);
        }
        // The chain file holds leaf + intermediates: it must be exactly what a peer needs.
        let chain = meshca::pemutil::parse_certs(
            &std::fs::read(mesh.chain_file(&leaf.name)).unwrap(),
            "chain",
        )
        .unwrap();
        assert_eq!(chain[0], leaf.workload.cert.leaf);
        assert_eq!(&chain[1..], &leaf.workload.cert.intermediates[..]);
        for usage in [Usage::Server, Usage::Client] {
            verify_chain(
                &chain[0],
                &chain[1..],
                &anchors(&mesh, &[&leaf.root_ca]),
                mesh.now,
                usage,
            )
            .unwrap_or_else(|e| panic!("{} {usage:?} webpki: {e}", leaf.name));
        }
    }

    // The intermediate-issued leaf needs its intermediate: without it both peers refuse.
    let purple = mesh.leaf("purple");
    assert_eq!(purple.workload.cert.intermediates.len(), 1);
    let (ok, out) = openssl_verify(&mesh, "purple", &mesh.root_file("ca1"), false, "sslserver");
    assert!(
        !ok && out.contains("unable to get local issuer certificate"),
        "{out}"
    );
    let e = verify_chain(
        &purple.workload.cert.leaf,
        &[],
        &anchors(&mesh, &["ca1"]),
        mesh.now,
        Usage::Server,
    )
    .unwrap_err();
    assert!(e.to_string().contains("unknown issuer"), "{e}");
}

#[test]
fn green_fails_against_ca1_and_passes_against_the_ca1_ca2_bundle() {
    if !have_openssl("green_fails_against_ca1_and_passes_against_the_ca1_ca2_bundle") {
        return;
    }
    let mesh = build_mesh();
    let green = &mesh.leaf("green").workload.cert;

    let (ok, out) = openssl_verify(&mesh, "green", &mesh.root_file("ca1"), true, "sslclient");
    assert!(!ok, "green must not verify against ca1 alone: {out}");
    assert!(
        out.contains("unable to get local issuer certificate"),
        "{out}"
    );
    let e = verify_chain(
        &green.leaf,
        &green.intermediates,
        &anchors(&mesh, &["ca1"]),
        mesh.now,
        Usage::Client,
    )
    .unwrap_err();
    assert!(e.to_string().contains("unknown issuer"), "{e}");

    // The bundle file holds exactly the two roots.
    let bundle =
        meshca::pemutil::parse_certs(&std::fs::read(mesh.bundle_file()).unwrap(), "bundle")
            .unwrap();
    assert_eq!(bundle, anchors(&mesh, &["ca1", "ca2"]));
    for leaf in ["green", "frontend", "blue", "purple"] {
        let (ok, out) = openssl_verify(&mesh, leaf, &mesh.bundle_file(), true, "sslclient");
        assert!(ok, "{leaf} against the ca1+ca2 bundle: {out}");
        let c = &mesh.leaf(leaf).workload.cert;
        verify_chain(&c.leaf, &c.intermediates, &bundle, mesh.now, Usage::Client)
            .unwrap_or_else(|e| panic!("{leaf} webpki against the bundle: {e}"));
    }
    // And ca1's leaves fail against ca2 alone, symmetrically.
    let (ok, _) = openssl_verify(&mesh, "blue", &mesh.root_file("ca2"), true, "sslserver");
    assert!(!ok);
}

// ---------------------------------------------------------------------------------------------
// openssl x509 -text shows the profile

/// The value on the line after `header` in `openssl x509 -text` output.
fn value_after(text: &str, header: &str) -> Option<String> {
    let mut lines = text.lines();
    lines.find(|l| l.trim_start().starts_with(header))?;
    lines
        .next()
        .map(|l| l.trim().trim_start_matches("keyid:").to_string())
}

#[test]
fn openssl_x509_text_shows_the_workload_profile() {
    if !have_openssl("openssl_x509_text_shows_the_workload_profile") {
        return;
    }
    let mesh = build_mesh();
    let fmt = time::macros::format_description!(
        "[month repr:short] [day padding:space] [hour]:[minute]:[second] [year] GMT"
    );
    for leaf in &mesh.leaves {
        let out = openssl(&[
            "x509",
            "-in",
            p(&mesh.cert_file(&leaf.name)),
            "-text",
            "-noout",
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let t = text(&out.stdout);
        let n = &leaf.name;
        assert!(
            t.contains(&format!("URI:{}", leaf.spiffe_id)),
            "{n}: URI SAN missing:\n{t}"
        );
        assert_eq!(t.matches("URI:").count(), 1, "{n}: exactly one URI SAN");
        assert!(
            t.contains(&format!("DNS:{}", leaf.dns)),
            "{n}: DNS SAN:\n{t}"
        );
        assert!(
            t.contains("X509v3 Extended Key Usage")
                && t.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
            "{n}: EKU serverAuth + clientAuth:\n{t}"
        );
        assert!(
            t.contains("X509v3 Basic Constraints: critical") && t.contains("CA:FALSE"),
            "{n}: CA:FALSE:\n{t}"
        );
        let ku = value_after(&t, "X509v3 Key Usage: critical").expect("critical key usage");
        if n == "rsa2048" {
            assert_eq!(ku, "Digital Signature, Key Encipherment", "{n}");
        } else {
            assert_eq!(ku, "Digital Signature", "{n}");
        }
        // SKI present; AKI present and equal to the issuing CA's SKI.
        let ski = value_after(&t, "X509v3 Subject Key Identifier:").expect("SKI");
        assert!(ski.len() >= 20 && ski.contains(':'), "{n}: SKI {ski:?}");
        let aki = value_after(&t, "X509v3 Authority Key Identifier:").expect("AKI");
        let ca_pem = meshca::pemutil::certs_to_pem([&mesh.ca(&leaf.ca).cert]);
        let ca_file = mesh.path(&format!("{}_issuer.pem", leaf.name));
        std::fs::write(&ca_file, ca_pem).unwrap();
        let ca_text = text(&openssl(&["x509", "-in", p(&ca_file), "-text", "-noout"]).stdout);
        let ca_ski = value_after(&ca_text, "X509v3 Subject Key Identifier:").expect("CA SKI");
        assert_eq!(aki, ca_ski, "{n}: AKI must name the issuer's key");

        // Serial: 128-bit positive.
        let serial = value_after(&t, "Serial Number:").expect("serial");
        assert_eq!(
            serial.split(':').count(),
            16,
            "{n}: 16-byte serial {serial}"
        );

        // notBefore backdated 5 minutes for clock skew; notAfter = now + default 24h TTL.
        let dates =
            text(&openssl(&["x509", "-in", p(&mesh.cert_file(n)), "-noout", "-dates"]).stdout);
        let nb = (mesh.now - meshca::profile::BACKDATE).format(fmt).unwrap();
        let na = (mesh.now + meshca::policy::DEFAULT_TTL)
            .format(fmt)
            .unwrap();
        assert!(
            dates.contains(&format!("notBefore={nb}")),
            "{n}: {dates} vs {nb}"
        );
        assert!(
            dates.contains(&format!("notAfter={na}")),
            "{n}: {dates} vs {na}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// rustls mutual TLS

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn roots_from(file: &Path) -> Arc<RootCertStore> {
    let mut store = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(file).unwrap() {
        store.add(c.unwrap()).unwrap();
    }
    Arc::new(store)
}

fn chain_and_key(
    mesh: &Mesh,
    leaf: &str,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let chain = CertificateDer::pem_file_iter(mesh.chain_file(leaf))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(mesh.key_file(leaf)).unwrap();
    (chain, key)
}

/// A server presenting `leaf` that requires a client certificate from `trust`.
fn server_config(mesh: &Mesh, leaf: &str, trust: &Path) -> Arc<ServerConfig> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots_from(trust), provider())
        .build()
        .unwrap();
    let (chain, key) = chain_and_key(mesh, leaf);
    Arc::new(
        ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap(),
    )
}

/// A client presenting `leaf` that trusts servers from `trust`.
fn client_config(mesh: &Mesh, leaf: &str, trust: &Path) -> Arc<ClientConfig> {
    let verifier = WebPkiServerVerifier::builder_with_provider(roots_from(trust), provider())
        .build()
        .unwrap();
    let (chain, key) = chain_and_key(mesh, leaf);
    Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_webpki_verifier(verifier)
            .with_client_auth_cert(chain, key)
            .unwrap(),
    )
}

#[derive(Debug)]
#[allow(dead_code)] // the payloads are read through Debug in failure messages
enum TlsFail {
    Tls(rustls::Error),
    Io(String),
}

fn tls_fail(e: std::io::Error) -> TlsFail {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(t) => TlsFail::Tls(t.clone()),
        None => TlsFail::Io(format!("{:?}: {e}", e.kind())),
    }
}

/// What the server saw: the peer's certificate and the message it received.
#[derive(Debug)]
struct ServerSaw {
    peer_leaf: CertificateDer<'static>,
    message: String,
}

fn read_line(tls: &mut impl Read) -> Result<String, TlsFail> {
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\n") {
        if got.len() > 1024 {
            return Err(TlsFail::Io("line too long".into()));
        }
        match tls.read(&mut b).map_err(tls_fail)? {
            0 => return Err(TlsFail::Io("eof before a full line".into())),
            _ => got.push(b[0]),
        }
    }
    Ok(String::from_utf8_lossy(&got).trim_end().to_string())
}

fn serve_once(listener: TcpListener, cfg: Arc<ServerConfig>) -> Result<ServerSaw, TlsFail> {
    let (mut sock, _) = listener.accept().map_err(|e| TlsFail::Io(e.to_string()))?;
    sock.set_read_timeout(Some(WAIT)).unwrap();
    sock.set_write_timeout(Some(WAIT)).unwrap();
    let mut conn = ServerConnection::new(cfg).map_err(TlsFail::Tls)?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).map_err(tls_fail)?;
    }
    let peer_leaf = conn.peer_certificates().expect("client cert")[0].clone();
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    let message = read_line(&mut tls)?;
    tls.write_all(format!("pong {message}\n").as_bytes())
        .map_err(tls_fail)?;
    tls.flush().map_err(tls_fail)?;
    conn.send_close_notify();
    let _ = conn.complete_io(&mut sock);
    Ok(ServerSaw { peer_leaf, message })
}

fn client_once(port: u16, cfg: Arc<ClientConfig>, server_name: &str) -> Result<String, TlsFail> {
    let mut sock =
        TcpStream::connect(("127.0.0.1", port)).map_err(|e| TlsFail::Io(e.to_string()))?;
    sock.set_read_timeout(Some(WAIT)).unwrap();
    sock.set_write_timeout(Some(WAIT)).unwrap();
    let name = ServerName::try_from(server_name.to_string()).unwrap();
    let mut conn = ClientConnection::new(cfg, name).map_err(TlsFail::Tls)?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).map_err(tls_fail)?;
    }
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    tls.write_all(b"ping from client\n").map_err(tls_fail)?;
    tls.flush().map_err(tls_fail)?;
    read_line(&mut tls)
}

/// One mutual-TLS exchange over 127.0.0.1; returns what each side ended with.
fn mtls(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    server_name: &str,
) -> (Result<ServerSaw, TlsFail>, Result<String, TlsFail>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let srv = std::thread::spawn(move || serve_once(listener, server));
    let cli = client_once(port, client, server_name);
    (srv.join().unwrap(), cli)
}

#[test]
fn rustls_mtls_same_ca_succeeds_and_cross_ca_is_refused() {
    let mesh = build_mesh();
    let ca1 = mesh.root_file("ca1");
    let blue_name = mesh.leaf("blue").dns.clone();

    // frontend/ca1 -> blue/ca1: handshake completes and data round-trips.
    let (srv, cli) = mtls(
        server_config(&mesh, "blue", &ca1),
        client_config(&mesh, "frontend", &ca1),
        &blue_name,
    );
    let saw = srv.expect("server side of frontend -> blue");
    assert_eq!(saw.message, "ping from client");
    assert_eq!(cli.expect("client side"), "pong ping from client");
    let peer = CertInfo::from_der(&saw.peer_leaf).unwrap();
    assert_eq!(peer.sans.uri, vec![mesh.leaf("frontend").spiffe_id.clone()]);

    // green/ca2 client -> server trusting only ca1: the server refuses the certificate.
    let (srv, cli) = mtls(
        server_config(&mesh, "blue", &ca1),
        client_config(&mesh, "green", &ca1),
        &blue_name,
    );
    match srv {
        Err(TlsFail::Tls(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer))) => {}
        other => panic!("server must refuse green's certificate as unknown issuer: {other:?}"),
    }
    match cli {
        Err(TlsFail::Tls(rustls::Error::AlertReceived(AlertDescription::UnknownCA))) => {}
        other => panic!("client must see the unknown_ca alert: {other:?}"),
    }

    // The frontend (trusting only ca1) refuses a server whose certificate is from ca2.
    let (srv, cli) = mtls(
        server_config(&mesh, "green", &ca1),
        client_config(&mesh, "frontend", &ca1),
        &mesh.leaf("green").dns,
    );
    match cli {
        Err(TlsFail::Tls(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer))) => {}
        other => panic!("client must refuse green's server certificate: {other:?}"),
    }
    match srv {
        Err(TlsFail::Tls(rustls::Error::AlertReceived(AlertDescription::UnknownCA))) => {}
        other => panic!("server must see the unknown_ca alert: {other:?}"),
    }

    // With the ca1+ca2 bundle the frontend accepts green as a server, and green (as a
    // client) is accepted by a server trusting the bundle.
    let bundle = mesh.bundle_file();
    let (srv, cli) = mtls(
        server_config(&mesh, "green", &bundle),
        client_config(&mesh, "frontend", &bundle),
        &mesh.leaf("green").dns,
    );
    srv.expect("green server trusting the bundle");
    assert_eq!(cli.expect("frontend with bundle"), "pong ping from client");
}

#[test]
fn rustls_mtls_with_every_key_type_and_an_intermediate() {
    let mesh = build_mesh();
    for leaf in ["p384", "ed25519", "rsa2048", "purple"] {
        let l = mesh.leaf(leaf);
        let root = mesh.root_file(&l.root_ca);
        // The same leaf on both ends is enough to exercise its key type and chain.
        let (srv, cli) = mtls(
            server_config(&mesh, leaf, &root),
            client_config(&mesh, leaf, &root),
            &l.dns,
        );
        srv.unwrap_or_else(|e| panic!("{leaf} server: {e:?}"));
        assert_eq!(
            cli.unwrap_or_else(|e| panic!("{leaf} client: {e:?}")),
            "pong ping from client"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// openssl s_server / s_client / curl

/// A running `openssl s_server`, killed on drop.
struct SServer {
    child: Child,
    port: u16,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
}

impl SServer {
    /// Starts `openssl s_server -accept 127.0.0.1:<free port> <args>` and waits for ACCEPT.
    fn start(args: &[&str]) -> SServer {
        for _attempt in 0..3 {
            let port = {
                let l = TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap().port()
            };
            let accept = format!("127.0.0.1:{port}");
            let mut child = Command::new("openssl")
                .arg("s_server")
                .args(["-accept", &accept, "-naccept", "1"])
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let out = Arc::new(Mutex::new(Vec::new()));
            let err = Arc::new(Mutex::new(Vec::new()));
            pump(child.stdout.take().unwrap(), out.clone());
            pump(child.stderr.take().unwrap(), err.clone());
            let mut s = SServer {
                child,
                port,
                out,
                err,
            };
            let deadline = Instant::now() + WAIT;
            loop {
                if text(&s.out.lock().unwrap()).contains("ACCEPT") {
                    return s;
                }
                if let Some(st) = s.child.try_wait().unwrap() {
                    eprintln!(
                        "s_server on {port} exited early ({st}): {}; retrying",
                        text(&s.err.lock().unwrap())
                    );
                    break;
                }
                if Instant::now() > deadline {
                    let _ = s.child.kill();
                    panic!("s_server did not print ACCEPT within {WAIT:?}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("could not start openssl s_server on a free port");
    }

    /// Waits (bounded) for the server to exit after its one connection; returns its output.
    fn finish(mut self) -> String {
        let deadline = Instant::now() + WAIT;
        while self.child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Give the pumps a moment to drain, then report everything.
        std::thread::sleep(Duration::from_millis(50));
        let o = format!(
            "{}{}",
            text(&self.out.lock().unwrap()),
            text(&self.err.lock().unwrap())
        );
        o
    }
}

impl Drop for SServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn s_server_args<'a>(mesh: &'a Mesh, leaf: &str, trust: &'a Path, mode: &'a str) -> Vec<String> {
    vec![
        "-cert".into(),
        p(&mesh.chain_file(leaf)).into(),
        "-key".into(),
        p(&mesh.key_file(leaf)).into(),
        "-CAfile".into(),
        p(trust).into(),
        "-Verify".into(),
        "1".into(),
        "-verify_return_error".into(),
        // No session tickets: keeps s_client's output free of ticket dumps.
        "-num_tickets".into(),
        "0".into(),
        mode.into(),
    ]
}

fn s_client(mesh: &Mesh, port: u16, leaf: &str, trust: &Path, server_name: &str) -> Output {
    let connect = format!("127.0.0.1:{port}");
    run_bounded(
        Command::new("openssl").args([
            "s_client",
            "-connect",
            &connect,
            "-servername",
            server_name,
            "-verify_hostname",
            server_name,
            "-cert",
            p(&mesh.chain_file(leaf)),
            "-key",
            p(&mesh.key_file(leaf)),
            "-CAfile",
            p(trust),
            "-verify_return_error",
            "-ign_eof",
        ]),
        // `-rev` servers answer each line reversed and close on CLOSE.
        Some(b"hello meshca\nCLOSE\n"),
    )
}

#[test]
fn openssl_s_server_and_s_client_mtls() {
    if !have_openssl("openssl_s_server_and_s_client_mtls") {
        return;
    }
    let mesh = build_mesh();
    let ca1 = mesh.root_file("ca1");
    let blue = mesh.leaf("blue").dns.clone();

    // frontend/ca1 client -> blue/ca1 server: verified both ways, data passes both ways.
    let args = s_server_args(&mesh, "blue", &ca1, "-rev");
    let srv = SServer::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let out = s_client(&mesh, srv.port, "frontend", &ca1, &blue);
    let server_log = srv.finish();
    let so = text(&out.stdout);
    assert!(
        out.status.success(),
        "s_client failed: {so}\n{}",
        text(&out.stderr)
    );
    assert!(so.contains("Verify return code: 0 (ok)"), "{so}");
    assert!(
        so.contains("achsem olleh"),
        "reversed reply must arrive: {so}"
    );
    assert!(
        server_log.contains("CONNECTION ESTABLISHED")
            && server_log.contains("Verification: OK")
            && server_log.contains(&format!("CN = {}", mesh.leaf("frontend").dns)),
        "server must have verified the frontend certificate: {server_log}"
    );

    // green/ca2 client -> the same server: refused with unknown_ca, no data passes.
    let srv = SServer::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let out = s_client(&mesh, srv.port, "green", &ca1, &blue);
    let server_log = srv.finish();
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success(), "s_client with green must fail: {so}");
    assert!(se.contains("alert unknown ca"), "{se}");
    assert!(!so.contains("achsem olleh"), "no data may pass: {so}");
    assert!(
        server_log.contains("unable to get local issuer certificate")
            && !server_log.contains("CONNECTION ESTABLISHED"),
        "{server_log}"
    );

    // The frontend client refuses a green (ca2) server when it trusts only ca1.
    let gargs = s_server_args(&mesh, "green", &mesh.bundle_file(), "-rev");
    let srv = SServer::start(&gargs.iter().map(String::as_str).collect::<Vec<_>>());
    let out = s_client(&mesh, srv.port, "frontend", &ca1, &mesh.leaf("green").dns);
    drop(srv);
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success(), "{so}");
    assert!(se.contains("certificate verify failed"), "{se}");
    assert!(!so.contains("achsem olleh"));
}

#[test]
fn curl_with_a_client_certificate_to_openssl_s_server_www() {
    if !have_openssl("curl_with_a_client_certificate_to_openssl_s_server_www")
        || !require_tool(
            "curl",
            &["--version"],
            "curl_with_a_client_certificate_to_openssl_s_server_www",
        )
    {
        return;
    }
    let mesh = build_mesh();
    let ca1 = mesh.root_file("ca1");
    let blue = mesh.leaf("blue").dns.clone();
    let args = s_server_args(&mesh, "blue", &ca1, "-www");
    let srv = SServer::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let resolve = format!("{blue}:{}:127.0.0.1", srv.port);
    let url = format!("https://{blue}:{}/", srv.port);
    let out = run_bounded(
        Command::new("curl").args([
            "-sS",
            "--max-time",
            "15",
            "--cacert",
            p(&ca1),
            "--cert",
            p(&mesh.chain_file("frontend")),
            "--key",
            p(&mesh.key_file("frontend")),
            "--resolve",
            &resolve,
            "-w",
            "\nHTTP %{http_code} verify %{ssl_verify_result}\n",
            &url,
        ]),
        None,
    );
    drop(srv);
    let body = text(&out.stdout);
    assert!(out.status.success(), "curl failed: {}", text(&out.stderr));
    assert!(body.contains("HTTP 200 verify 0"), "{body}");
    // s_server -www reports the client certificate it verified.
    assert!(body.contains("Verify return code: 0 (ok)"), "{body}");
    assert!(
        body.contains(&format!("URI:{}", mesh.leaf("frontend").spiffe_id)),
        "{body}"
    );
}

// ---------------------------------------------------------------------------------------------
// Name constraints down the chain (issue 9)

/// A root permitting example.com but excluding secret.example.com, an intermediate permitting
/// example.com: what meshca issues under the intermediate passes `openssl verify
/// -x509_strict` and webpki, and what the root's constraints forbid is refused at issuance
/// (before the fix it was issued, and openssl rejected it with "excluded subtree violation").
/// An intermediate wider than its parent is refused when it is created.
#[test]
fn name_constraints_of_every_ca_on_the_chain_hold_at_issuance() {
    if !have_openssl("name_constraints_of_every_ca_on_the_chain_hold_at_issuance") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let now = OffsetDateTime::now_utc();
    let mut root_spec = CaSpec::root("corp");
    root_spec.permitted_dns = vec!["example.com".into()];
    root_spec.excluded_dns = vec!["secret.example.com".into()];
    let root = create_root(&root_spec, now).unwrap();
    let root_pem = dir.path().join("root.pem");
    std::fs::write(&root_pem, root.chain_pem()).unwrap();

    let mut wide = CaSpec::root("team");
    wide.parent = Some("corp".into());
    wide.permitted_dns = vec!["other.org".into()];
    let e = create_intermediate(&wide, &root, now)
        .map(|_| ())
        .expect_err("an intermediate permitting other.org under a root limited to example.com");
    assert!(e.to_string().contains("other.org"), "{e}");

    let mut spec = CaSpec::root("team");
    spec.parent = Some("corp".into());
    spec.permitted_dns = vec!["example.com".into()];
    let int = create_intermediate(&spec, &root, now).unwrap();
    let int_pem = dir.path().join("int.pem");
    std::fs::write(&int_pem, meshca::pemutil::certs_to_pem([&int.cert])).unwrap();
    let issuer = LocalIssuer::new(int).unwrap();
    let issue = |dns: &str| {
        let sans = Sans {
            dns: vec![DnsName::parse(dns).unwrap()],
            ..Sans::default()
        };
        block_on(issue_workload(
            &issuer,
            &sans,
            None,
            KeyAlgorithm::EcdsaP256,
            now,
        ))
    };
    let verify = |w: &Workload, file: &str| {
        let leaf = dir.path().join(file);
        std::fs::write(&leaf, w.cert.leaf_pem()).unwrap();
        let out = openssl(&[
            "verify",
            "-x509_strict",
            "-purpose",
            "sslserver",
            "-CAfile",
            p(&root_pem),
            "-untrusted",
            p(&int_pem),
            p(&leaf),
        ]);
        (
            out.status.success(),
            format!("{}{}", text(&out.stdout), text(&out.stderr)),
        )
    };
    let good = issue("api.example.com").unwrap();
    let (ok, out) = verify(&good, "good.pem");
    assert!(
        ok,
        "openssl rejects a certificate within every constraint: {out}"
    );
    verify_chain(
        &good.cert.leaf,
        &good.cert.intermediates,
        std::slice::from_ref(&root.cert),
        now,
        Usage::Server,
    )
    .unwrap();
    match issue("api.secret.example.com") {
        Ok(w) => {
            let (ok, out) = verify(&w, "bad.pem");
            panic!(
                "issued api.secret.example.com under a root that excludes secret.example.com \
                 (openssl verify ok={ok}: {out})"
            );
        }
        Err(e) => assert!(
            e.to_string().contains("api.secret.example.com")
                && e.to_string().contains("secret.example.com"),
            "{e}"
        ),
    }
}
