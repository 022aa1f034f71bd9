//! Certificates from Istio's CA API served by meshca (`istio_ca`), used by a real Envoy (path in
//! `MESHCA_ENVOY_BIN`): the frontend's certificate and key, obtained through
//! `CreateCertificate` as istio-agent would, are served to Envoy over SDS from files; a client
//! whose certificate also came through `CreateCertificate` completes mTLS, one from another CA
//! is refused. Token review is faked here (the real TokenReview path is
//! `cli/tests/istio_e2e.rs`, on a real API server).
//!
//! Without `MESHCA_ENVOY_BIN` the test prints a skip reason, or fails when `CI=true`.
#![cfg(feature = "kube")]

mod common;

use std::sync::Arc;

use common::envoy::*;
use common::*;
use meshca::identity::{DnsName, Sans, SpiffeId, TrustDomain};
use meshca::issue::Issuer;
use meshca::istio::{AuthError, Caller, PodDirectory, TokenAuthenticator};
use meshca::store::Store;
use meshca_sds::istio_ca::proto::{
    IstioCertificateRequest, IstioCertificateResponse, CREATE_CERTIFICATE,
};
use meshca_sds::istio_ca::{IstioCaConfig, IstioCaServer};
use meshca_sds::SourceConfig;

const OK: &str = "hello from envoy\n";

/// Accepts the token `token-<sa>` as ServiceAccount `app/<sa>`.
#[derive(Debug)]
struct Tokens;

#[async_trait::async_trait]
impl TokenAuthenticator for Tokens {
    async fn review(&self, token: &str, _audience: &str) -> Result<Caller, AuthError> {
        let sa = token
            .strip_prefix("token-")
            .ok_or_else(|| AuthError::Rejected("unknown token".into()))?;
        Ok(Caller {
            namespace: "app".into(),
            name: sa.into(),
            node: None,
            pod: None,
        })
    }
}

#[async_trait::async_trait]
impl PodDirectory for Tokens {
    async fn pod_on_node(&self, _: &str, _: &str, _: &str) -> Result<Option<String>, String> {
        Ok(None)
    }
}

/// `CreateCertificate` for `sans` under `token-<sa>`; writes `<sa>.crt` (leaf and
/// intermediates), `<sa>.key` and `<sa>.root.pem` (the last certificate of the answer).
async fn obtain(
    home: &Home,
    addr: std::net::SocketAddr,
    sa: &str,
    sans: &Sans,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let key = meshca::key::KeyAlgorithm::EcdsaP256.generate().unwrap();
    let csr = meshca::issue::local::csr_for(&key, sans, &TrustDomain::default()).unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr: pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", csr)),
        validity_duration: 3600,
        metadata: None,
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer token-{sa}").parse().unwrap(),
    );
    req.metadata_mut()
        .insert("clusterid", "Kubernetes".parse().unwrap());
    let resp: tonic::Response<IstioCertificateResponse> = grpc
        .unary(
            req,
            http::uri::PathAndQuery::from_static(CREATE_CERTIFICATE),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap();
    let chain = resp.into_inner().cert_chain;
    assert!(chain.len() >= 2, "{chain:?}");
    let c = home.tmp().join(format!("{sa}.crt"));
    let k = home.tmp().join(format!("{sa}.key"));
    let r = home.tmp().join(format!("{sa}.root.pem"));
    std::fs::write(&c, chain[..chain.len() - 1].concat()).unwrap();
    std::fs::write(&k, key.to_pkcs8_pem().as_bytes()).unwrap();
    std::fs::write(&r, chain.last().unwrap()).unwrap();
    (c, k, r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_serves_a_certificate_from_istios_ca_api_and_accepts_its_clients() {
    let Some(bin) = envoy_bin() else { return };
    let home = Home::new().await; // ca1, ca2
                                  // CA ca1 also signs `localhost` (curl checks the frontend's name).
    let mut ca1 = home.store.load_ca("ca1").await.unwrap();
    ca1.meta.policy.allowed_dns = vec!["localhost".into()];
    let issuer: Arc<dyn Issuer> = Arc::new(meshca::issue::LocalIssuer::new(ca1).unwrap());
    let ca = IstioCaServer::start(IstioCaConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: None,
        cas: vec!["ca1".into()],
        issuers: meshca::kube::issuers::IssuerSet::watch_fixed(
            [("ca1".to_string(), issuer)].into(),
        ),
        auth: Arc::new(Tokens),
        pods: Arc::new(Tokens),
        audience: "istio-ca".into(),
        cluster_id: "Kubernetes".into(),
        ledger: None,
        metrics: Arc::new(meshca::kube::metrics::Metrics::new()),
    })
    .await
    .unwrap();
    let id = |sa: &str| SpiffeId::for_service_account(&TrustDomain::default(), "app", sa).unwrap();
    let frontend = Sans {
        spiffe_id: Some(id("frontend")),
        dns: vec![DnsName::parse("localhost").unwrap()],
        ips: vec![],
    };
    let (fc, fk, root) = obtain(&home, ca.local_addr(), "frontend", &frontend).await;
    let blue = Sans {
        spiffe_id: Some(id("blue")),
        ..Sans::default()
    };
    let (bc, bk, _) = obtain(&home, ca.local_addr(), "blue", &blue).await;

    let source = SourceConfig::Files {
        cert: fc.clone(),
        key: fk,
        ca: root.clone(),
        expected: Some(frontend),
    };
    let (server, mut envoy, port) = server_and_envoy(&bin, &home, source, false).await;
    let ready = eventually_async(30, || async {
        curl(port, &root, &bc, &bk).await.as_deref() == Ok(OK)
    })
    .await;
    assert!(ready, "envoy never served blue; log:\n{}", envoy.log_tail());
    // Envoy serves the very certificate CreateCertificate returned.
    let leaf = meshca::pemutil::parse_certs(&std::fs::read(&fc).unwrap(), "frontend").unwrap();
    let serial = meshca::x509::CertInfo::from_der(&leaf[0])
        .unwrap()
        .serial_hex();
    let serving = envoy.serving_serials().await;
    assert!(
        serving.contains(&norm_serial(&serial)),
        "{serving:?} vs {serial}"
    );
    // Denied twin: a client of another CA.
    let (gc, gk) = home.client_cert("ca2", "green").await;
    let e = curl(port, &root, &gc, &gk)
        .await
        .expect_err("a ca2 client must be refused");
    assert!(e.contains("unknown ca"), "refused with: {e}");
    assert!(envoy.alive());
    server.shutdown().await.unwrap();
    ca.shutdown().await.unwrap();
}
