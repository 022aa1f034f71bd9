//! The SDS transport over TCP: mutual TLS with a client allow-list, tested in-process over
//! 127.0.0.1 with a real rustls client, and the refusal of non-loopback plaintext TCP.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use meshca::identity::{DnsName, Sans, SpiffeId, TrustDomain};
use meshca_sds::{ClientAllowList, Listen, ServeConfig, Server, TlsConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};

const ALLOWED: &str = "spiffe://cluster.local/ns/test/sa/allowed";

/// A rustls client: trusts `ca_pem`, presents `client` (cert, key) if given.
fn client_config(
    ca_pem: &Path,
    client: Option<(&Path, &Path)>,
    tls12_only: bool,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_pem).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
        &[&rustls::version::TLS12]
    } else {
        rustls::DEFAULT_VERSIONS
    };
    let b = rustls::ClientConfig::builder_with_protocol_versions(versions)
        .with_root_certificates(roots);
    let mut cfg = match client {
        Some((cert, key)) => b
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .map(|c| c.unwrap())
                    .collect(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

/// A gRPC channel over TLS to `addr` (server name `localhost`).
async fn tls_channel(
    addr: std::net::SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> Result<Channel, tonic::transport::Error> {
    Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let cfg = cfg.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let tls = tokio_rustls::TlsConnector::from(cfg)
                    .connect(ServerName::try_from("localhost").unwrap(), tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
}

/// Opens a SotW stream for `default` and waits for the first response.
async fn first_secret(ch: Channel) -> Result<String, String> {
    let mut client = Client::new(ch);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(req(&["default"], "", "", None)).await.unwrap();
    let fut = async {
        let mut rs = client
            .stream_secrets(ReceiverStream::new(rx))
            .await
            .map_err(|e| format!("{e:?}"))?
            .into_inner();
        match rs.message().await {
            Ok(Some(r)) => Ok(one_secret(&r, "default").name),
            Ok(None) => Err("stream ended".to_string()),
            Err(e) => Err(format!("{e:?}")),
        }
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

struct Fixture {
    home: Home,
    server: Server,
    addr: std::net::SocketAddr,
    ca1: std::path::PathBuf,
}

async fn fixture() -> Fixture {
    let home = Home::new().await;
    let ca1 = home.tmp().join("ca1.pem");
    std::fs::write(&ca1, home.root_pem("ca1").await).unwrap();
    let server_sans = Sans {
        dns: vec![DnsName::parse("localhost").unwrap()],
        ..Sans::default()
    };
    let (cert, key) = home.cert_with("ca1", "sds-server", &server_sans).await;
    let mut cfg = ServeConfig::new(
        local_source(&home, None),
        vec![Listen::Tcp("127.0.0.1:0".parse().unwrap())],
    );
    cfg.tls = Some(TlsConfig {
        cert,
        key,
        client_ca: ca1.clone(),
        allow: ClientAllowList {
            spiffe_ids: vec![SpiffeId::parse(ALLOWED).unwrap()],
            subjects: vec![],
        },
    });
    cfg.shutdown_grace = Duration::from_secs(3);
    let server = Server::start(cfg).await.unwrap();
    let addr = server.tcp_addrs()[0];
    Fixture {
        home,
        server,
        addr,
        ca1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_allowed_client_gets_secrets() {
    let f = fixture().await;
    let (c, k) = f.home.client_cert("ca1", "allowed").await;
    for tls12 in [false, true] {
        let ch = tls_channel(f.addr, client_config(&f.ca1, Some((&c, &k)), tls12))
            .await
            .unwrap();
        assert_eq!(first_secret(ch).await.as_deref(), Ok("default"));
    }
    assert_eq!(
        f.server.metrics().clients_refused.load(Ordering::Relaxed),
        0
    );
    f.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_client_not_on_allow_list_is_refused_in_the_handshake() {
    let f = fixture().await;
    // Same CA, valid certificate, but another identity.
    let (c, k) = f.home.client_cert("ca1", "intruder").await;
    // TLS 1.2: the server's verdict arrives during the handshake, as the alert access_denied.
    let e = tls_channel(f.addr, client_config(&f.ca1, Some((&c, &k)), true))
        .await
        .unwrap_err();
    let e = format!("{e:?}");
    assert!(e.contains("AccessDenied"), "{e}");
    // TLS 1.3: the client finishes first; its first RPC fails, and no secret is sent.
    let r = match tls_channel(f.addr, client_config(&f.ca1, Some((&c, &k)), false)).await {
        Ok(ch) => first_secret(ch).await,
        Err(e) => Err(format!("{e:?}")),
    };
    assert!(r.is_err(), "{r:?}");
    assert!(
        eventually(5, || f
            .server
            .metrics()
            .clients_refused
            .load(Ordering::Relaxed)
            >= 2)
        .await,
        "both refusals counted as allow-list refusals"
    );
    // (tonic may reconnect once after the TLS 1.3 refusal, so there can be more than 2.)
    assert_eq!(
        f.server
            .metrics()
            .streams_total
            .get(meshca_sds::metrics::Mode::Sotw),
        0
    );
    let m = f.server.metrics().render();
    assert!(!m.contains("meshca_sds_tls_clients_refused_total 0"), "{m}");
    f.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_refuses_other_ca_missing_cert_and_plaintext() {
    let f = fixture().await;
    // The allowed identity, but from a CA the server does not trust for clients.
    let (c2, k2) = f.home.client_cert("ca2", "allowed").await;
    let e = tls_channel(f.addr, client_config(&f.ca1, Some((&c2, &k2)), true))
        .await
        .unwrap_err();
    let e = format!("{e:?}");
    assert!(
        e.contains("UnknownCA") || e.contains("BadCertificate"),
        "{e}"
    );
    // No client certificate at all.
    let e = tls_channel(f.addr, client_config(&f.ca1, None, true))
        .await
        .unwrap_err();
    let e = format!("{e:?}");
    assert!(
        e.contains("HandshakeFailure") || e.contains("CertificateRequired"),
        "{e}"
    );
    let r = match tls_channel(f.addr, client_config(&f.ca1, None, false)).await {
        Ok(ch) => first_secret(ch).await,
        Err(e) => Err(format!("{e:?}")),
    };
    assert!(r.is_err(), "TLS 1.3 without a client certificate: {r:?}");
    // Plaintext gRPC on the TLS port.
    let r = match Endpoint::try_from(format!("http://{}", f.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
    {
        Ok(ch) => first_secret(ch).await,
        Err(e) => Err(format!("{e:?}")),
    };
    assert!(r.is_err(), "plaintext on the TLS port: {r:?}");
    assert!(
        eventually(5, || f
            .server
            .metrics()
            .tls_handshake_failures
            .load(Ordering::Relaxed)
            >= 4)
        .await
    );
    assert_eq!(
        f.server.metrics().clients_refused.load(Ordering::Relaxed),
        0
    );
    assert_eq!(
        f.server
            .metrics()
            .streams_total
            .get(meshca_sds::metrics::Mode::Sotw),
        0
    );
    // The allowed client still gets through afterwards.
    let (c, k) = f.home.client_cert("ca1", "allowed").await;
    let ch = tls_channel(f.addr, client_config(&f.ca1, Some((&c, &k)), false))
        .await
        .unwrap();
    assert_eq!(first_secret(ch).await.as_deref(), Ok("default"));
    f.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_loopback_tcp_without_tls_does_not_start() {
    let home = Home::new().await;
    for addr in ["0.0.0.0:0", "[::]:0"] {
        let cfg = ServeConfig::new(
            local_source(&home, None),
            vec![Listen::Tcp(addr.parse().unwrap())],
        );
        match Server::start(cfg).await {
            Ok(s) => {
                s.shutdown().await.unwrap();
                panic!("a plaintext SDS server started on {addr}");
            }
            Err(e) => {
                let e = e.to_string();
                assert!(
                    e.contains("not a loopback address") && e.contains("--danger-plaintext-tcp"),
                    "{e}"
                );
                assert!(!e.contains('\n'));
            }
        }
    }
    // Loopback plaintext stays allowed.
    let cfg = ServeConfig::new(
        local_source(&home, None),
        vec![Listen::Tcp("127.0.0.1:0".parse().unwrap())],
    );
    let s = Server::start(cfg).await.unwrap();
    let ch = tcp_channel(s.tcp_addrs()[0]).await;
    assert_eq!(first_secret(ch).await.as_deref(), Ok("default"));
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_config_errors_are_one_line() {
    let home = Home::new().await;
    let ca1 = home.tmp().join("ca1.pem");
    std::fs::write(&ca1, home.root_pem("ca1").await).unwrap();
    let (cert, key) = home
        .cert_with(
            "ca1",
            "srv",
            &Sans {
                dns: vec![DnsName::parse("localhost").unwrap()],
                ..Sans::default()
            },
        )
        .await;
    let (_, other_key) = home.client_cert("ca1", "other").await;
    let base = TlsConfig {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: ca1.clone(),
        allow: ClientAllowList {
            spiffe_ids: vec![
                SpiffeId::for_service_account(&TrustDomain::default(), "a", "b").unwrap(),
            ],
            subjects: vec![],
        },
    };
    let cases: Vec<(TlsConfig, &str)> = vec![
        (
            TlsConfig {
                allow: ClientAllowList::default(),
                ..base.clone()
            },
            "allow-list is empty",
        ),
        (
            TlsConfig {
                key: other_key,
                ..base.clone()
            },
            "do not form a usable server certificate",
        ),
        (
            TlsConfig {
                client_ca: home.tmp().join("missing.pem"),
                ..base.clone()
            },
            "missing.pem",
        ),
        (
            TlsConfig {
                client_ca: key.clone(),
                ..base.clone()
            },
            "srv.key",
        ),
    ];
    for (tls, want) in cases {
        let mut cfg = ServeConfig::new(
            local_source(&home, None),
            vec![Listen::Tcp("127.0.0.1:0".parse().unwrap())],
        );
        cfg.tls = Some(tls);
        let e = Server::start(cfg)
            .await
            .expect_err("must not start")
            .to_string();
        assert!(e.contains(want) && !e.contains('\n'), "{e}");
        assert!(
            !e.contains("BEGIN") && !e.contains("MII"),
            "no PEM in errors: {e}"
        );
    }
}
