//! The SDS transport: which TCP listeners need mutual TLS, the TLS server configuration
//! (rustls, client certificates verified by `WebPkiClientVerifier` plus an allow-list of
//! client identities), and the accept loop that hands tonic only completed handshakes.
//!
//! SDS hands out private keys, so a TCP listener that other hosts can reach must
//! authenticate its clients. [`check_exposure`] refuses a non-loopback TCP listener without
//! [`TlsConfig`] unless the operator explicitly asked for plaintext
//! (`--danger-plaintext-tcp`). A client whose certificate chains to the client CA but whose
//! identity is not on the [`ClientAllowList`] is refused during the handshake with the TLS
//! alert `access_denied`; the server logs the refused identity.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use meshca::identity::SpiffeId;
use meshca::x509::CertInfo;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use crate::metrics::Metrics;
use crate::{Listen, ServeError};

/// How long a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once per listener; further connections wait to be accepted.
pub const MAX_PENDING_HANDSHAKES: usize = 256;

/// Client identities allowed to connect over mutual TLS. A client is allowed when its
/// certificate (already verified against the client CA) matches any entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientAllowList {
    /// SPIFFE IDs: the certificate must carry exactly one URI SAN, equal to one of these.
    pub spiffe_ids: Vec<SpiffeId>,
    /// Subject DNs, compared as meshca prints them (`CN=envoy,O=mesh`); spaces around `=`
    /// and after `,` are ignored.
    pub subjects: Vec<String>,
}

/// Normalizes a DN for comparison: no spaces around `=` or after `,`.
fn norm_dn(dn: &str) -> String {
    dn.split(',')
        .map(|rdn| rdn.split('=').map(str::trim).collect::<Vec<_>>().join("="))
        .collect::<Vec<_>>()
        .join(",")
}

impl ClientAllowList {
    /// Whether the list is empty (an empty list allows nobody, and is refused as a
    /// configuration).
    pub fn is_empty(&self) -> bool {
        self.spiffe_ids.is_empty() && self.subjects.is_empty()
    }

    /// Checks a client certificate. `Ok` names the entry that matched; `Err` describes the
    /// client (its SPIFFE ID and subject), for the refusal log line.
    pub fn check(&self, info: &CertInfo) -> Result<String, String> {
        if let [uri] = info.sans.uri.as_slice() {
            if let Some(id) = self.spiffe_ids.iter().find(|id| id.to_string() == *uri) {
                return Ok(id.to_string());
            }
        }
        let subject = norm_dn(&info.subject);
        if !subject.is_empty() {
            if let Some(s) = self.subjects.iter().find(|s| norm_dn(s) == subject) {
                return Ok(s.clone());
            }
        }
        let uris = if info.sans.uri.is_empty() {
            "none".to_string()
        } else {
            format!("{:?}", info.sans.uri)
        };
        Err(format!(
            "client certificate (URI SANs {uris}, subject {:?}) is not on the allow-list",
            info.subject
        ))
    }
}

/// Mutual TLS for the TCP listeners.
#[derive(Clone, Debug)]
pub struct TlsConfig {
    /// Server certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA certificates that client certificates must chain to (PEM).
    pub client_ca: PathBuf,
    /// Client identities allowed in.
    pub allow: ClientAllowList,
}

fn tls_err(what: impl std::fmt::Display) -> ServeError {
    ServeError::Config(format!("TLS: {what}"))
}

fn read_file(p: &std::path::Path) -> Result<Vec<u8>, ServeError> {
    meshca::fsutil::read_limited(p).map_err(tls_err)
}

impl TlsConfig {
    /// Loads the certificate, key and client CA and builds the rustls server configuration
    /// (ALPN `h2`, client certificates required).
    pub fn server_config(
        &self,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<rustls::ServerConfig>, ServeError> {
        if self.allow.is_empty() {
            return Err(tls_err(
                "the client allow-list is empty: give --allow-client-spiffe-id or --allow-client-subject",
            ));
        }
        let chain =
            meshca::pemutil::parse_certs(&read_file(&self.cert)?, &self.cert.display().to_string())
                .map_err(tls_err)?;
        let key_text = zeroize::Zeroizing::new(
            String::from_utf8(read_file(&self.key)?)
                .map_err(|_| tls_err(format!("{}: not PEM text", self.key.display())))?,
        );
        let key = meshca::key::PrivateKey::from_pem(&key_text, &self.key.display().to_string())
            .map_err(tls_err)?;
        let key_der = {
            use rustls::pki_types::pem::PemObject;
            PrivateKeyDer::from_pem_slice(key.to_pkcs8_pem().as_bytes())
                .map_err(|_| tls_err(format!("{}: unreadable private key", self.key.display())))?
        };
        let ca = meshca::pemutil::parse_certs(
            &read_file(&self.client_ca)?,
            &self.client_ca.display().to_string(),
        )
        .map_err(tls_err)?;
        let mut roots = rustls::RootCertStore::empty();
        for c in ca {
            roots.add(c).map_err(|e| {
                tls_err(format!(
                    "{}: not a usable CA certificate: {e}",
                    self.client_ca.display()
                ))
            })?;
        }
        let inner = WebPkiClientVerifier::builder(Arc::new(roots))
            .build()
            .map_err(|e| tls_err(format!("client CA {}: {e}", self.client_ca.display())))?;
        let verifier = Arc::new(AllowListVerifier {
            inner,
            allow: self.allow.clone(),
            metrics,
        });
        let mut cfg = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key_der)
            .map_err(|e| {
                tls_err(format!(
                    "{} and {} do not form a usable server certificate: {e}",
                    self.cert.display(),
                    self.key.display()
                ))
            })?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// `WebPkiClientVerifier` (chain to the client CA, clientAuth EKU, validity) followed by the
/// allow-list check. A refusal becomes the TLS alert `access_denied`.
#[derive(Debug)]
struct AllowListVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allow: ClientAllowList,
    metrics: Arc<Metrics>,
}

impl ClientCertVerifier for AllowListVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let info = CertInfo::from_der(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        match self.allow.check(&info) {
            Ok(entry) => {
                tracing::debug!(client = %entry, "client certificate allowed");
                Ok(ClientCertVerified::assertion())
            }
            Err(reason) => {
                self.metrics.clients_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("{reason}; TLS handshake refused (access_denied)");
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::ApplicationVerificationFailure,
                ))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Whether a TCP listener on `addr` can be reached from other hosts (anything but a
/// loopback address, IPv4-mapped loopback included).
pub fn is_exposed(addr: &SocketAddr) -> bool {
    !addr.ip().to_canonical().is_loopback()
}

/// Refuses a TCP listener that other hosts can reach unless mutual TLS is configured or
/// plaintext was explicitly asked for.
pub fn check_exposure(
    listen: &[Listen],
    tls: Option<&TlsConfig>,
    danger_plaintext_tcp: bool,
) -> Result<(), ServeError> {
    if tls.is_some() {
        if !listen.iter().any(|l| matches!(l, Listen::Tcp(_))) {
            return Err(tls_err(
                "mutual TLS applies to tcp: listeners, and none is configured",
            ));
        }
        return Ok(());
    }
    if danger_plaintext_tcp {
        return Ok(());
    }
    for l in listen {
        if let Listen::Tcp(a) = l {
            if is_exposed(a) {
                return Err(ServeError::Config(format!(
                    "{l} is not a loopback address and SDS hands out private keys: configure mutual TLS \
                     (--tls-cert, --tls-key, --client-ca and --allow-client-spiffe-id or --allow-client-subject), \
                     or pass --danger-plaintext-tcp to serve it in plaintext anyway"
                )));
            }
        }
    }
    Ok(())
}

/// Accepts TCP connections on `listener` and yields those whose TLS handshake completed.
/// Handshakes run concurrently (at most [`MAX_PENDING_HANDSHAKES`], each bounded by
/// [`HANDSHAKE_TIMEOUT`]), so a slow client holds up nobody else.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                _ = crate::stopped(&mut shutdown) => return,
                p = pending.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let (tcp, peer) = tokio::select! {
                _ = crate::stopped(&mut shutdown) => return,
                _ = tx.closed() => return,
                c = listener.accept() => match c {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx, metrics) = (acceptor.clone(), tx.clone(), metrics.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        metrics
                            .tls_handshake_failures
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::info!(peer = %peer, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        metrics
                            .tls_handshake_failures
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::info!(peer = %peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshca::x509::RawSans;

    fn info(uris: &[&str], subject: &str) -> CertInfo {
        let c = meshca::ca::create_root(
            &meshca::ca::CaSpec::root("t"),
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
        let mut i = CertInfo::from_der(&c.cert).unwrap();
        i.sans = RawSans {
            uri: uris.iter().map(|s| s.to_string()).collect(),
            ..RawSans::default()
        };
        i.subject = subject.into();
        i
    }

    #[test]
    fn allow_list_matches_spiffe_id_or_subject() {
        let a = ClientAllowList {
            spiffe_ids: vec![SpiffeId::parse("spiffe://cluster.local/ns/mesh/sa/envoy").unwrap()],
            subjects: vec!["CN = gw, O = mesh".into()],
        };
        assert_eq!(
            a.check(&info(&["spiffe://cluster.local/ns/mesh/sa/envoy"], "")),
            Ok("spiffe://cluster.local/ns/mesh/sa/envoy".into())
        );
        assert!(a.check(&info(&[], "CN=gw, O=mesh")).is_ok());
        let e = a
            .check(&info(&["spiffe://cluster.local/ns/mesh/sa/other"], "CN=x"))
            .unwrap_err();
        assert!(e.contains("sa/other") && e.contains("CN=x"), "{e}");
        // Two URI SANs: not an X509-SVID, no SPIFFE match.
        assert!(a
            .check(&info(
                &[
                    "spiffe://cluster.local/ns/mesh/sa/envoy",
                    "spiffe://cluster.local/ns/mesh/sa/x"
                ],
                ""
            ))
            .is_err());
        // Subject order matters; an empty subject never matches.
        assert!(a.check(&info(&[], "O=mesh, CN=gw")).is_err());
        let empty = ClientAllowList {
            subjects: vec!["".into()],
            ..ClientAllowList::default()
        };
        assert!(empty.check(&info(&[], "")).is_err());
    }

    #[test]
    fn exposure_rules() {
        let l = |s: &str| vec![Listen::parse(s).unwrap()];
        for ok in [
            "tcp:127.0.0.1:1",
            "tcp:[::1]:1",
            "tcp:[::ffff:127.0.0.1]:1",
            "unix:/x",
        ] {
            check_exposure(&l(ok), None, false).unwrap();
        }
        for bad in ["tcp:0.0.0.0:1", "tcp:[::]:1", "tcp:10.0.0.1:8234"] {
            let e = check_exposure(&l(bad), None, false)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("--danger-plaintext-tcp") && e.contains(&bad[4..]),
                "{e}"
            );
            assert!(!e.contains('\n'));
            check_exposure(&l(bad), None, true).unwrap();
        }
        let tls = TlsConfig {
            cert: "c".into(),
            key: "k".into(),
            client_ca: "ca".into(),
            allow: ClientAllowList::default(),
        };
        check_exposure(&l("tcp:0.0.0.0:1"), Some(&tls), false).unwrap();
        assert!(check_exposure(&l("unix:/x"), Some(&tls), false).is_err());
    }
}
