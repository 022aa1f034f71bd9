//! Shared test setup: a meshca home with two CAs, a server, gRPC clients.
#![allow(dead_code)]

pub mod envoy;

use std::path::{Path, PathBuf};
use std::time::Duration;

use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{secret, Secret};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::Any;
use meshca::bundle::BundleSpec;
use meshca::ca::{create_root, CaSpec};
use meshca::identity::{DnsName, Sans, SpiffeId, TrustDomain};
use meshca::key::KeyAlgorithm;
use meshca::store::{LocalStore, Store};
use meshca_sds::{Listen, ServeConfig, Server, SourceConfig, SECRET_TYPE_URL};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};

pub struct Home {
    pub dir: tempfile::TempDir,
    pub store: LocalStore,
}

impl Home {
    /// Runs a phase of `meshca ca rotate ca1` now, with `opts`.
    pub async fn rotate_ca1(
        &self,
        phase: meshca::rotation::Request,
        opts: meshca::store::rotate::RotateOptions,
    ) -> meshca::Result<meshca::store::rotate::PhaseReport> {
        meshca::store::rotate::run_phase(
            &self.store,
            "ca1",
            phase,
            &opts,
            time::OffsetDateTime::now_utc(),
        )
        .await
    }

    /// A home with CAs `ca1` and `ca2` and the bundle `mesh` = [ca1].
    pub async fn new() -> Home {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::create(dir.path().join("home")).unwrap();
        let now = time::OffsetDateTime::now_utc();
        for n in ["ca1", "ca2"] {
            let ca = create_root(&CaSpec::root(n), now).unwrap();
            store.save_ca(&ca, false).await.unwrap();
        }
        let h = Home { dir, store };
        h.set_bundle("mesh", &["ca1"]).await;
        h
    }

    pub fn path(&self) -> PathBuf {
        self.store.home().to_path_buf()
    }

    pub fn tmp(&self) -> &Path {
        self.dir.path()
    }

    pub async fn set_bundle(&self, name: &str, cas: &[&str]) {
        let b = BundleSpec {
            name: name.into(),
            cas: cas.iter().map(|s| s.to_string()).collect(),
            file: None,
            namespaces: vec![],
        };
        self.store.save_bundle(&b).await.unwrap();
    }

    pub async fn root_pem(&self, ca: &str) -> String {
        self.store.load_ca(ca).await.unwrap().chain_pem()
    }

    /// Issues a client certificate from `ca` and writes `<prefix>.crt` / `<prefix>.key`.
    pub async fn client_cert(&self, ca: &str, prefix: &str) -> (PathBuf, PathBuf) {
        let sans = Sans {
            spiffe_id: Some(
                SpiffeId::for_service_account(&TrustDomain::default(), "test", prefix).unwrap(),
            ),
            ..Sans::default()
        };
        self.cert_with(ca, prefix, &sans).await
    }

    /// Issues a certificate for `sans` from `ca` and writes `<prefix>.crt` / `<prefix>.key`.
    pub async fn cert_with(&self, ca: &str, prefix: &str, sans: &Sans) -> (PathBuf, PathBuf) {
        let issuer = meshca::store::load_issuer(&self.store, ca).await.unwrap();
        let w = meshca::issue::issue_workload(
            issuer.as_ref(),
            sans,
            None,
            KeyAlgorithm::EcdsaP256,
            time::OffsetDateTime::now_utc(),
        )
        .await
        .unwrap();
        let c = self.tmp().join(format!("{prefix}.crt"));
        let k = self.tmp().join(format!("{prefix}.key"));
        std::fs::write(&c, w.cert.chain_pem()).unwrap();
        std::fs::write(&k, w.key.to_pkcs8_pem().as_bytes()).unwrap();
        (c, k)
    }
}

pub fn workload_sans() -> Sans {
    Sans {
        spiffe_id: Some(
            SpiffeId::for_service_account(&TrustDomain::default(), "mesh", "web").unwrap(),
        ),
        dns: vec![DnsName::parse("localhost").unwrap()],
        ips: vec![],
    }
}

pub fn local_source(home: &Home, ttl: Option<Duration>) -> SourceConfig {
    SourceConfig::LocalCa {
        home: home.path(),
        ca: "ca1".into(),
        bundle: Some("mesh".into()),
        sans: workload_sans(),
        ttl,
        key: KeyAlgorithm::EcdsaP256,
        crl: false,
    }
}

/// A server on a Unix socket in the home's temp dir and on 127.0.0.1:0.
pub async fn start(home: &Home, source: SourceConfig) -> (Server, PathBuf) {
    let sock = home.tmp().join("sds.sock");
    let mut cfg = ServeConfig::new(
        source,
        vec![
            Listen::Unix(sock.clone()),
            Listen::Tcp("127.0.0.1:0".parse().unwrap()),
        ],
    );
    cfg.rotation.poll_interval = Duration::from_millis(100);
    cfg.metrics = Some("127.0.0.1:0".parse().unwrap());
    cfg.shutdown_grace = Duration::from_secs(3);
    (Server::start(cfg).await.unwrap(), sock)
}

pub async fn unix_channel(path: &Path) -> Channel {
    let path = path.to_path_buf();
    Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap()
}

pub async fn tcp_channel(addr: std::net::SocketAddr) -> Channel {
    Endpoint::try_from(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

pub type Client = SecretDiscoveryServiceClient<Channel>;

pub fn decode(any: &Any) -> Secret {
    assert_eq!(any.type_url, SECRET_TYPE_URL);
    Secret::decode(any.value.as_slice()).unwrap()
}

/// The parsed leaf of a tls_certificate secret.
pub fn leaf_info(s: &Secret) -> meshca::x509::CertInfo {
    let Some(secret::Type::TlsCertificate(t)) = &s.r#type else {
        panic!("{} is not a certificate", s.name)
    };
    let Some(envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineBytes(b)) =
        &t.certificate_chain.as_ref().unwrap().specifier
    else {
        panic!("chain is not inline bytes")
    };
    let certs = meshca::pemutil::parse_certs(b, "chain").unwrap();
    meshca::x509::CertInfo::from_der(&certs[0]).unwrap()
}

/// The leaf serial of a tls_certificate secret.
pub fn leaf_serial(s: &Secret) -> String {
    leaf_info(s).serial
}

/// The anchors of a validation_context secret.
pub fn bundle_certs(s: &Secret) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    let Some(secret::Type::ValidationContext(v)) = &s.r#type else {
        panic!("{} is not a bundle", s.name)
    };
    let Some(envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineBytes(b)) =
        &v.trusted_ca.as_ref().unwrap().specifier
    else {
        panic!("trusted_ca is not inline bytes")
    };
    meshca::pemutil::parse_certs(b, "bundle").unwrap()
}

/// The anchors count of a validation_context secret.
pub fn bundle_len(s: &Secret) -> usize {
    bundle_certs(s).len()
}

/// A state-of-the-world stream: send requests, receive responses with a timeout.
pub struct Sotw {
    pub tx: mpsc::Sender<DiscoveryRequest>,
    pub rx: tonic::Streaming<DiscoveryResponse>,
}

impl Sotw {
    pub async fn open(client: &mut Client, names: &[&str]) -> Sotw {
        let (tx, rx) = mpsc::channel(16);
        tx.send(req(names, "", "", None)).await.unwrap();
        let rx = client
            .stream_secrets(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Sotw { tx, rx }
    }

    pub async fn recv(&mut self) -> DiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(10), self.rx.message())
            .await
            .expect("timed out waiting for a response")
            .unwrap()
            .expect("stream ended")
    }

    /// Asserts nothing arrives within `wait`.
    pub async fn quiet(&mut self, wait: Duration) {
        if let Ok(m) = tokio::time::timeout(wait, self.rx.message()).await {
            panic!(
                "unexpected message: {:?}",
                m.map(|r| r.map(|r| (r.version_info, r.nonce)))
            );
        }
    }

    pub async fn send(&self, r: DiscoveryRequest) {
        self.tx.send(r).await.unwrap();
    }
}

pub fn req(names: &[&str], nonce: &str, version: &str, error: Option<&str>) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.into(),
        node: Some(envoy_types::pb::envoy::config::core::v3::Node {
            id: "test-node".into(),
            cluster: "test".into(),
            ..Default::default()
        }),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        type_url: SECRET_TYPE_URL.into(),
        response_nonce: nonce.into(),
        error_detail: error.map(|m| envoy_types::pb::google::rpc::Status {
            code: 3,
            message: m.into(),
            details: vec![],
        }),
        ..Default::default()
    }
}

/// Checks the SDS rule: exactly one Secret per response and its name is `name`.
pub fn one_secret(r: &DiscoveryResponse, name: &str) -> Secret {
    assert_eq!(r.resources.len(), 1, "exactly one secret per response");
    let s = decode(&r.resources[0]);
    assert_eq!(s.name, name);
    assert!(!r.nonce.is_empty());
    assert_eq!(r.type_url, SECRET_TYPE_URL);
    s
}

pub struct Delta {
    pub tx: mpsc::Sender<DeltaDiscoveryRequest>,
    pub rx: tonic::Streaming<DeltaDiscoveryResponse>,
}

pub fn dreq(
    sub: &[&str],
    unsub: &[&str],
    nonce: &str,
    error: Option<&str>,
) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: SECRET_TYPE_URL.into(),
        resource_names_subscribe: sub.iter().map(|s| s.to_string()).collect(),
        resource_names_unsubscribe: unsub.iter().map(|s| s.to_string()).collect(),
        response_nonce: nonce.into(),
        error_detail: error.map(|m| envoy_types::pb::google::rpc::Status {
            code: 3,
            message: m.into(),
            details: vec![],
        }),
        ..Default::default()
    }
}

impl Delta {
    pub async fn open(client: &mut Client, first: DeltaDiscoveryRequest) -> Delta {
        let (tx, rx) = mpsc::channel(16);
        tx.send(first).await.unwrap();
        let rx = client
            .delta_secrets(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Delta { tx, rx }
    }

    pub async fn recv(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(10), self.rx.message())
            .await
            .expect("timed out waiting for a response")
            .unwrap()
            .expect("stream ended")
    }

    pub async fn quiet(&mut self, wait: Duration) {
        if let Ok(m) = tokio::time::timeout(wait, self.rx.message()).await {
            panic!(
                "unexpected message: {:?}",
                m.map(|r| r.map(|r| (r.system_version_info, r.nonce)))
            );
        }
    }

    pub async fn send(&self, r: DeltaDiscoveryRequest) {
        self.tx.send(r).await.unwrap();
    }
}

pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (code, body)
}

/// Polls `f` every 50 ms for up to `secs` seconds.
pub async fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..secs * 20 {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

/// Writes the layout of a mounted Secret: files are symlinks into `..data`, itself a symlink
/// to a generation directory that is swapped atomically (as the kubelet does).
pub fn write_secret_dir(root: &Path, gen: &str, cert: &str, key: &str, ca: &str) {
    let d = root.join(format!("..{gen}"));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("tls.crt"), cert).unwrap();
    std::fs::write(d.join("tls.key"), key).unwrap();
    std::fs::write(d.join("ca.crt"), ca).unwrap();
    let tmp = root.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..{gen}"), &tmp).unwrap();
    std::fs::rename(&tmp, root.join("..data")).unwrap();
    for f in ["tls.crt", "tls.key", "ca.crt"] {
        let l = root.join(f);
        if std::fs::symlink_metadata(&l).is_err() {
            std::os::unix::fs::symlink(format!("..data/{f}"), &l).unwrap();
        }
    }
}
