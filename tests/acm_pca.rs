//! ACM Private CA backend against moto's real server (`moto_server`).
//!
//! Needs `MESHCA_MOTO_ENDPOINT=http://127.0.0.1:PORT`. Without it the tests print a skip
//! reason and return, except under `CI=true`, where they fail.
//!
//! moto differs from AWS in ways these tests work around, each named where it matters:
//! - CA keys are always RSA-2048 whatever is requested (we never assert the CA key type);
//! - validity is fixed at 365 days (the issuing tests ask for 365 days, and one test shows
//!   meshca refusing moto's 365-day answer to a 24-hour request);
//! - idempotency tokens are ignored (the token test observes what meshca *sends*);
//! - some errors come back as HTTP 500 with an HTML body (error tests use one attempt);
//! - ValidityNotBefore is ignored: notBefore is the moment moto issued, so the tests verify
//!   chains at the current time rather than at the `now` they passed to meshca;
//! - only RootCACertificate/V1 and EndEntityCertificate/V1 get proper extensions (so a
//!   PCA-signed subordinate is shown to be refused by meshca, not accepted).

/// Without the feature there is nothing to test; say so instead of passing silently.
#[cfg(not(feature = "aws-pca"))]
#[test]
fn aws_pca_feature_disabled() {
    eprintln!("SKIP: tests/acm_pca.rs needs `--features aws-pca` (or --all-features)");
}

#[cfg(feature = "aws-pca")]
mod pca {

    use std::sync::{Arc, Mutex, Once};
    use std::time::Duration;

    use meshca::acm::{
        create_root_pca, create_subordinate_pca, register_pca, LimiterConfig, PcaCaSpec, PcaOptions,
    };
    use meshca::bundle::BundleSpec;
    use meshca::ca::{create_root, Backend, CaMaterial, CaSpec};
    use meshca::identity::{DnsName, Sans, SpiffeId, TrustDomain};
    use meshca::issue::acm_pca::AcmPcaIssuer;
    use meshca::issue::{issue_csr, issue_workload, CsrOptions, Issuer, SignRequest};
    use meshca::key::KeyAlgorithm;
    use meshca::store::{bundle_anchors, load_issuer, LocalStore, Store};
    use meshca::x509::{verify_chain, Usage};
    use meshca::Error;
    use time::OffsetDateTime;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// moto always issues for 365 days; asking for exactly that lets meshca's validity check pass.
    const MOTO_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

    fn moto() -> Option<String> {
        match std::env::var("MESHCA_MOTO_ENDPOINT") {
            Ok(v) if !v.is_empty() => {
                static ENV: Once = Once::new();
                ENV.call_once(|| {
                    // Dummy credentials; moto accepts anything. No instance metadata lookups.
                    std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
                    std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
                    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
                });
                Some(v)
            }
            _ => {
                if std::env::var("CI").as_deref() == Ok("true") {
                    panic!("MESHCA_MOTO_ENDPOINT is not set (required when CI=true)");
                }
                eprintln!("SKIP: MESHCA_MOTO_ENDPOINT not set; start `moto_server -H 127.0.0.1 -p PORT` and export it");
                None
            }
        }
    }

    fn opts(endpoint: &str) -> PcaOptions {
        PcaOptions {
            region: Some("us-east-1".into()),
            endpoint: Some(endpoint.to_string()),
            ..PcaOptions::default()
        }
    }

    fn spec(name: &str) -> CaSpec {
        let mut s = CaSpec::root(name);
        // moto's certificates always last 365 days: let the policy allow that.
        s.policy.max_ttl = Duration::from_secs(400 * 24 * 3600);
        s
    }

    fn sans(ns: &str, sa: &str) -> Sans {
        Sans {
            spiffe_id: Some(
                SpiffeId::for_service_account(&TrustDomain::default(), ns, sa).unwrap(),
            ),
            dns: vec![DnsName::parse(&format!("{sa}.{ns}.svc")).unwrap()],
            ips: vec!["10.1.2.3".parse().unwrap()],
        }
    }

    /// Creates and activates a fresh root PCA named after `prefix` on moto.
    async fn new_root(ep: &str, prefix: &str, now: OffsetDateTime) -> CaMaterial {
        create_root_pca(&spec(&unique(prefix)), &opts(ep), now)
            .await
            .unwrap()
    }

    fn unique(prefix: &str) -> String {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        format!(
            "{prefix}-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        )
    }

    fn copy(ca: &CaMaterial) -> CaMaterial {
        CaMaterial {
            meta: ca.meta.clone(),
            cert: ca.cert.clone(),
            parents: ca.parents.clone(),
            key: None,
        }
    }

    fn openssl_verify(
        dir: &std::path::Path,
        root: &str,
        untrusted: Option<&str>,
        leaf: &str,
    ) -> String {
        let mut cmd = std::process::Command::new("openssl");
        cmd.arg("verify").arg("-CAfile").arg(dir.join(root));
        if let Some(u) = untrusted {
            cmd.arg("-untrusted").arg(dir.join(u));
        }
        let out = cmd.arg(dir.join(leaf)).output().expect("run openssl");
        let s = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "openssl verify failed: {s}");
        s
    }

    #[tokio::test]
    async fn create_root_pca_and_issue_through_store() {
        let Some(ep) = moto() else { return };
        let now = OffsetDateTime::now_utc();
        let name = unique("root");
        let ca = create_root_pca(&spec(&name), &opts(&ep), now)
            .await
            .unwrap();
        assert!(ca.key.is_none(), "the PCA key never leaves AWS");
        assert!(ca.is_root());
        let info = ca.info().unwrap();
        assert!(info.is_ca && info.self_signed, "{info:?}");
        let Backend::AcmPca { arn, .. } = &ca.meta.backend else {
            panic!("backend {:?}", ca.meta.backend)
        };
        assert!(arn.starts_with("arn:aws:acm-pca:us-east-1:"), "{arn}");

        // Store it and issue through the generic dispatch, as `meshca issue` does.
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::create(dir.path().join("home")).unwrap();
        store.save_ca(&ca, false).await.unwrap();
        // load_issuer uses the region/endpoint stored with the CA.
        let issuer = load_issuer(&store, &name).await.unwrap();
        let want = sans("mesh", "blue");
        let w = issue_workload(
            issuer.as_ref(),
            &want,
            Some(MOTO_VALIDITY),
            KeyAlgorithm::EcdsaP256,
            now,
        )
        .await
        .unwrap();
        assert_eq!(w.cert.root, ca.cert);
        assert!(w.cert.intermediates.is_empty());
        assert_eq!(
            w.cert.info.sans.uri,
            vec!["spiffe://cluster.local/ns/mesh/sa/blue".to_string()]
        );
        assert_eq!(w.cert.info.sans.dns, vec!["blue.mesh.svc".to_string()]);
        assert_eq!(w.cert.info.sans.ip, vec!["10.1.2.3".to_string()]);
        verify_chain(
            &w.cert.leaf,
            &w.cert.intermediates,
            std::slice::from_ref(&ca.cert),
            OffsetDateTime::now_utc(),
            Usage::Server,
        )
        .unwrap();
        verify_chain(
            &w.cert.leaf,
            &w.cert.intermediates,
            std::slice::from_ref(&ca.cert),
            OffsetDateTime::now_utc(),
            Usage::Client,
        )
        .unwrap();

        // openssl agrees.
        std::fs::write(dir.path().join("root.pem"), ca.chain_pem()).unwrap();
        std::fs::write(dir.path().join("leaf.pem"), w.cert.leaf_pem()).unwrap();
        let out = openssl_verify(dir.path(), "root.pem", None, "leaf.pem");
        assert!(out.contains("leaf.pem: OK"), "{out}");

        // An external CSR through issue_csr keeps the CSR (the PCA signs the CSR itself).
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["green.mesh.svc".to_string()]).unwrap();
        // The subject AWS copies: only what meshca checks (rcgen's default CN is refused).
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "green.mesh.svc");
        p.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://cluster.local/ns/mesh/sa/green"
                .try_into()
                .unwrap(),
        ));
        let csr = p.serialize_request(&key).unwrap();
        let c = issue_csr(
            issuer.as_ref(),
            csr.der(),
            &CsrOptions {
                ttl: Some(MOTO_VALIDITY),
                ..CsrOptions::default()
            },
            now,
        )
        .await
        .unwrap();
        assert_eq!(
            c.info.spki_der,
            rcgen::PublicKeyData::subject_public_key_info(&key)
        );
        verify_chain(
            &c.leaf,
            &[],
            std::slice::from_ref(&ca.cert),
            OffsetDateTime::now_utc(),
            Usage::Server,
        )
        .unwrap();
    }

    #[tokio::test]
    async fn validity_not_honoured_is_refused() {
        let Some(ep) = moto() else { return };
        let now = OffsetDateTime::now_utc();
        let ca = new_root(&ep, "validity", now).await;
        let issuer = AcmPcaIssuer::connect(ca, &opts(&ep)).await.unwrap();
        // moto limitation: it ignores Validity and always issues for 365 days. meshca asked for
        // 24 hours, so it must refuse the certificate rather than hand out a 365-day one.
        let err = issue_workload(
            &issuer,
            &sans("a", "b"),
            Some(Duration::from_secs(24 * 3600)),
            KeyAlgorithm::EcdsaP256,
            now,
        )
        .await
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("validity not honoured"), "{msg}");
        assert!(!msg.contains('\n'));
    }

    #[tokio::test]
    async fn pca_and_local_ca_in_one_bundle() {
        let Some(ep) = moto() else { return };
        let now = OffsetDateTime::now_utc();
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::create(dir.path().join("home")).unwrap();
        let local = create_root(&CaSpec::root("local-root"), now).unwrap();
        let local_cert = local.cert.clone();
        store.save_ca(&local, false).await.unwrap();

        // Create a PCA, then register it by ARN under a second name (the `--pca-arn` path).
        let created = new_root(&ep, "bundled", now).await;
        let Backend::AcmPca { arn, .. } = created.meta.backend.clone() else {
            unreachable!()
        };
        let pspec = PcaCaSpec {
            policy: spec("x").policy,
            ..PcaCaSpec::default()
        };
        let registered = register_pca("pca-registered", &arn, &pspec, &opts(&ep), now)
            .await
            .unwrap();
        assert_eq!(registered.cert, created.cert);
        assert!(registered.key.is_none());
        store.save_ca(&registered, false).await.unwrap();

        let b = BundleSpec {
            name: "mesh".into(),
            cas: vec!["local-root".into(), "pca-registered".into()],
            file: None,
            namespaces: Vec::new(),
        };
        store.save_bundle(&b).await.unwrap();
        let anchors = bundle_anchors(&store, &store.load_bundle("mesh").await.unwrap())
            .await
            .unwrap();
        assert_eq!(anchors.len(), 2);
        assert!(anchors.contains(&local_cert) && anchors.contains(&created.cert));

        // Certificates from both CAs verify against the one bundle.
        for (ca, ttl) in [
            ("local-root", Duration::from_secs(3600)),
            ("pca-registered", MOTO_VALIDITY),
        ] {
            let issuer = load_issuer(&store, ca).await.unwrap();
            let w = issue_workload(
                issuer.as_ref(),
                &sans("mesh", ca),
                Some(ttl),
                KeyAlgorithm::EcdsaP256,
                now,
            )
            .await
            .unwrap();
            verify_chain(
                &w.cert.leaf,
                &w.cert.intermediates,
                &anchors,
                OffsetDateTime::now_utc(),
                Usage::Server,
            )
            .unwrap();
        }
        std::fs::write(
            dir.path().join("bundle.pem"),
            meshca::bundle::to_pem(&anchors),
        )
        .unwrap();
        let issuer = load_issuer(&store, "pca-registered").await.unwrap();
        let w = issue_workload(
            issuer.as_ref(),
            &sans("mesh", "x"),
            Some(MOTO_VALIDITY),
            KeyAlgorithm::EcdsaP256,
            now,
        )
        .await
        .unwrap();
        std::fs::write(dir.path().join("leaf.pem"), w.cert.leaf_pem()).unwrap();
        assert!(openssl_verify(dir.path(), "bundle.pem", None, "leaf.pem").contains("OK"));
    }

    #[tokio::test]
    async fn subordinate_pca_under_local_root() {
        let Some(ep) = moto() else { return };
        let now = OffsetDateTime::now_utc();
        let root = create_root(&CaSpec::root("offline-root"), now).unwrap();
        let mut s = spec(&unique("sub"));
        s.parent = Some("offline-root".into());
        let sub = create_subordinate_pca(&s, &root, &opts(&ep), now)
            .await
            .unwrap();
        assert_eq!(sub.parents, vec![root.cert.clone()]);
        assert_eq!(sub.meta.parent.as_deref(), Some("offline-root"));
        let si = sub.info().unwrap();
        assert!(si.is_ca && si.path_len == Some(0));

        let issuer = AcmPcaIssuer::connect(sub, &opts(&ep)).await.unwrap();
        let w = issue_workload(
            &issuer,
            &sans("team", "api"),
            Some(MOTO_VALIDITY),
            KeyAlgorithm::EcdsaP384,
            now,
        )
        .await;
        let w = w.unwrap();
        assert_eq!(w.cert.intermediates, vec![issuer.ca().cert.clone()]);
        verify_chain(
            &w.cert.leaf,
            &w.cert.intermediates,
            std::slice::from_ref(&root.cert),
            OffsetDateTime::now_utc(),
            Usage::Server,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("root.pem"),
            meshca::pemutil::certs_to_pem([&root.cert]),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("int.pem"),
            meshca::pemutil::certs_to_pem(w.cert.intermediates.iter()),
        )
        .unwrap();
        std::fs::write(dir.path().join("leaf.pem"), w.cert.leaf_pem()).unwrap();
        assert!(openssl_verify(dir.path(), "root.pem", Some("int.pem"), "leaf.pem").contains("OK"));
    }

    #[tokio::test]
    async fn subordinate_signed_by_pca_parent_is_checked() {
        let Some(ep) = moto() else { return };
        let now = OffsetDateTime::now_utc();
        let parent = new_root(&ep, "pparent", now).await;
        let mut s = spec(&unique("psub"));
        s.parent = Some(parent.meta.name.clone());
        // moto limitation: SubordinateCACertificate_PathLen0/V1 gets no basicConstraints in moto,
        // so the "CA certificate" it returns is not a CA. meshca must refuse to import it.
        let err = create_subordinate_pca(&s, &parent, &opts(&ep), now)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not a CA certificate"), "{err}");
    }

    #[tokio::test]
    async fn unknown_arn_maps_to_ca_not_found() {
        let Some(ep) = moto() else { return };
        let now = OffsetDateTime::now_utc();
        let arn = "arn:aws:acm-pca:us-east-1:123456789012:certificate-authority/00000000-0000-0000-0000-000000000000";
        // One attempt only: moto answers some errors with HTTP 500 HTML bodies.
        let o = PcaOptions {
            throttle_retries: 0,
            ..opts(&ep)
        };
        let err = register_pca("ghost", arn, &PcaCaSpec::default(), &o, now)
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("CA not found") && msg.contains(arn), "{msg}");
        assert!(!msg.contains('\n') && msg.len() < 400, "{msg}");

        // Issuing with a CA record whose PCA does not exist.
        let real = create_root_pca(&spec(&unique("ghost")), &o, now)
            .await
            .unwrap();
        let ghost = CaMaterial {
            meta: meshca::ca::CaMeta {
                backend: Backend::AcmPca {
                    arn: arn.into(),
                    region: None,
                    endpoint: Some(ep.clone()),
                },
                ..real.meta.clone()
            },
            cert: real.cert.clone(),
            parents: Vec::new(),
            key: None,
        };
        let issuer = AcmPcaIssuer::connect(ghost, &o).await.unwrap();
        let err = issue_workload(
            &issuer,
            &sans("a", "b"),
            Some(MOTO_VALIDITY),
            KeyAlgorithm::EcdsaP256,
            now,
        )
        .await
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("acm-pca: "), "{msg}");
        assert!(
            !msg.contains('\n') && !msg.contains("SdkError") && !msg.contains("<html"),
            "{msg}"
        );
        assert!(matches!(err, Error::Backend { .. }), "{err:?}");
        eprintln!("unknown ARN on IssueCertificate: {msg}");
        assert!(
            msg.contains("CA not found") || msg.contains("server error"),
            "{msg}"
        );
        assert_eq!(
            issuer.client().calls(),
            1,
            "one attempt, no retries on non-throttling errors"
        );

        // A malformed ARN never reaches AWS.
        let err = register_pca("bad", "arn:aws:s3:::bucket", &PcaCaSpec::default(), &o, now)
            .await
            .unwrap_err();
        assert!(
            err.is_user_error() && err.to_string().contains("ACM PCA ARN"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn policy_denial_costs_no_aws_call() {
        let Some(ep) = moto() else { return };
        let now = OffsetDateTime::now_utc();
        let mut s = spec(&unique("policy"));
        s.policy.allowed_dns = vec!["*.allowed.svc".into()];
        let ca = create_root_pca(&s, &opts(&ep), now).await.unwrap();
        let issuer = AcmPcaIssuer::connect(ca, &opts(&ep)).await.unwrap();
        let err = issue_workload(
            &issuer,
            &sans("mesh", "evil"),
            Some(MOTO_VALIDITY),
            KeyAlgorithm::EcdsaP256,
            now,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Error::PolicyDenied { .. }), "{err}");
        assert_eq!(issuer.client().calls(), 0);
    }

    /// A TCP relay in front of moto that records the bytes clients send (to observe request
    /// bodies) and can answer the first `throttle` IssueCertificate calls with a
    /// ThrottlingException (moto never throttles).
    struct Relay {
        addr: String,
        sent: Arc<Mutex<Vec<u8>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Relay {
        async fn start(upstream: &str, throttle: usize) -> Relay {
            Self::with_faults(
                upstream,
                vec![(
                    "ACMPrivateCA.IssueCertificate",
                    "ThrottlingException",
                    throttle,
                )],
            )
            .await
        }

        /// Answers the first `n` calls of each `(X-Amz-Target, error code, n)` with that error.
        async fn with_faults(
            upstream: &str,
            faults: Vec<(&'static str, &'static str, usize)>,
        ) -> Relay {
            let up = upstream.trim_start_matches("http://").to_string();
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = format!("http://{}", l.local_addr().unwrap());
            let sent = Arc::new(Mutex::new(Vec::new()));
            let left = Arc::new(Mutex::new(faults));
            let s2 = sent.clone();
            let task = tokio::spawn(async move {
                loop {
                    let Ok((mut c, _)) = l.accept().await else {
                        return;
                    };
                    let (up, sent, left) = (up.clone(), s2.clone(), left.clone());
                    tokio::spawn(async move {
                        // One request per upstream connection: read it whole, then relay.
                        loop {
                            let Some(req) = read_request(&mut c).await else {
                                return;
                            };
                            sent.lock().unwrap().extend_from_slice(&req);
                            let text = String::from_utf8_lossy(&req).to_string();
                            let fault = left
                                .lock()
                                .unwrap()
                                .iter_mut()
                                .find(|(target, _, n)| {
                                    *n > 0 && text.contains(&format!("{target}\r\n"))
                                })
                                .map(|(_, code, n)| {
                                    *n -= 1;
                                    *code
                                });
                            if let Some(code) = fault {
                                let body = format!(
                                    r#"{{"__type":"{code}","message":"injected by the test relay"}}"#
                                );
                                let resp = format!(
                                "HTTP/1.1 400 Bad Request\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: {}\r\n\r\n{body}",
                                body.len()
                            );
                                if c.write_all(resp.as_bytes()).await.is_err() {
                                    return;
                                }
                                continue;
                            }
                            let Ok(mut u) = tokio::net::TcpStream::connect(&up).await else {
                                return;
                            };
                            // Ask moto to close so the response ends at EOF.
                            let req = String::from_utf8_lossy(&req).replacen(
                                "\r\n",
                                "\r\nConnection: close\r\n",
                                1,
                            );
                            if u.write_all(req.as_bytes()).await.is_err() {
                                return;
                            }
                            let mut resp = Vec::new();
                            if u.read_to_end(&mut resp).await.is_err() {
                                return;
                            }
                            // Tell the client the connection closes too.
                            if c.write_all(&resp).await.is_err() {
                                return;
                            }
                            return;
                        }
                    });
                }
            });
            Relay { addr, sent, task }
        }

        fn tokens(&self) -> Vec<String> {
            let s = String::from_utf8_lossy(&self.sent.lock().unwrap()).to_string();
            s.split("\"IdempotencyToken\":\"")
                .skip(1)
                .map(|r| r.split('"').next().unwrap().to_string())
                .collect()
        }

        fn issue_calls(&self) -> usize {
            String::from_utf8_lossy(&self.sent.lock().unwrap())
                .matches("ACMPrivateCA.IssueCertificate")
                .count()
        }
    }

    impl Drop for Relay {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// Reads one HTTP/1.1 request (headers + Content-Length body). `None` at EOF.
    async fn read_request(c: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
        let mut buf = Vec::new();
        let mut tmp = [0u8; 8192];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap_or(0))
                    })
                    .unwrap_or(0);
                while buf.len() < end + 4 + len {
                    let n = c.read(&mut tmp).await.ok()?;
                    if n == 0 {
                        return None;
                    }
                    buf.extend_from_slice(&tmp[..n]);
                }
                return Some(buf);
            }
            let n = c.read(&mut tmp).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&tmp[..n]);
        }
    }

    #[tokio::test]
    async fn idempotency_token_is_stable_across_retries() {
        let Some(ep) = moto() else { return };
        let now = OffsetDateTime::now_utc();
        let ca = new_root(&ep, "token", now).await;
        let relay = Relay::start(&ep, 0).await;
        let issuer = AcmPcaIssuer::connect(copy(&ca), &opts(&relay.addr))
            .await
            .unwrap();

        // One request (one key, one CSR), signed twice as a caller's retry would.
        let key = rcgen::KeyPair::generate().unwrap();
        let want = sans("mesh", "retry");
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name = meshca::profile::workload_subject(&want, &TrustDomain::default());
        p.subject_alt_names = meshca::profile::san_list(&want).unwrap();
        let csr = p.serialize_request(&key).unwrap().der().to_vec();
        let req = SignRequest {
            public_key_der: rcgen::PublicKeyData::subject_public_key_info(&key),
            key: meshca::key::PublicKeyKind::Ecdsa { bits: 256 },
            sans: want.clone(),
            ttl: MOTO_VALIDITY,
            csr_der: Some(csr.clone()),
            ekus: meshca::policy::Ekus::default(),
        };
        let a = issuer.sign(&req, now).await.unwrap();
        let later = now + Duration::from_secs(7);
        let b = issuer.sign(&req, later).await.unwrap();
        // The plan is the same whatever the clock says.
        assert_eq!(
            issuer.plan(&req, &csr, now).unwrap().token,
            issuer.plan(&req, &csr, later).unwrap().token
        );
        // A fresh key (a new request) gets a new token.
        let w = issue_workload(
            &issuer,
            &want,
            Some(MOTO_VALIDITY),
            KeyAlgorithm::EcdsaP256,
            now,
        )
        .await
        .unwrap();

        let tokens = relay.tokens();
        assert_eq!(tokens.len(), 3, "{tokens:?}");
        assert_eq!(
            tokens[0], tokens[1],
            "a retry of the same request sends the same token"
        );
        assert_ne!(tokens[0], tokens[2], "a new request sends a new token");
        assert!(tokens
            .iter()
            .all(|t| t.len() <= 36 && t.chars().all(|c| c.is_ascii_hexdigit())));
        // moto limitation: it ignores IdempotencyToken and issued twice; AWS would return the
        // same certificate for both calls. Both are still valid for the same key.
        assert_eq!(a.info.spki_der, b.info.spki_der);
        assert_ne!(w.cert.info.spki_der, a.info.spki_der);
    }

    #[tokio::test]
    async fn throttling_is_retried_with_bounds() {
        let Some(ep) = moto() else { return };
        let now = OffsetDateTime::now_utc();
        let ca = new_root(&ep, "throttle", now).await;
        // moto never throttles: the relay answers the first two IssueCertificate calls with a
        // ThrottlingException, then passes calls through to moto.
        let relay = Relay::start(&ep, 2).await;
        let o = PcaOptions {
            throttle_retries: 3,
            throttle_backoff: Duration::from_millis(20),
            ..opts(&relay.addr)
        };
        let issuer = AcmPcaIssuer::connect(copy(&ca), &o).await.unwrap();
        issue_workload(
            &issuer,
            &sans("t", "a"),
            Some(MOTO_VALIDITY),
            KeyAlgorithm::EcdsaP256,
            now,
        )
        .await
        .unwrap();
        assert_eq!(
            relay.issue_calls(),
            3,
            "two throttled attempts and one success"
        );
        let t = relay.tokens();
        assert!(
            t.windows(2).all(|w| w[0] == w[1]),
            "retries reuse the token: {t:?}"
        );

        // Retries are bounded: 5 throttles against 1 allowed retry fail after 2 attempts.
        let relay = Relay::start(&ep, 5).await;
        let o = PcaOptions {
            throttle_retries: 1,
            throttle_backoff: Duration::from_millis(20),
            ..opts(&relay.addr)
        };
        let issuer = AcmPcaIssuer::connect(ca, &o).await.unwrap();
        let err = issue_workload(
            &issuer,
            &sans("t", "b"),
            Some(MOTO_VALIDITY),
            KeyAlgorithm::EcdsaP256,
            now,
        )
        .await
        .unwrap_err();
        assert!(
            err.to_string().contains("throttled by AWS")
                && err.to_string().contains("after 2 attempt"),
            "{err}"
        );
        assert!(matches!(
            err,
            Error::Backend {
                retryable: true,
                ..
            }
        ));
        assert_eq!(relay.issue_calls(), 2);
    }

    #[tokio::test]
    async fn get_certificate_in_progress_is_polled_until_a_deadline() {
        let Some(ep) = moto() else { return };
        let now = OffsetDateTime::now_utc();
        let ca = new_root(&ep, "poll", now).await;
        // moto's GetCertificate returns at once; the relay answers the first three with
        // RequestInProgressException, as AWS does while a certificate is being issued.
        let relay = Relay::with_faults(
            &ep,
            vec![(
                "ACMPrivateCA.GetCertificate",
                "RequestInProgressException",
                3,
            )],
        )
        .await;
        let issuer = AcmPcaIssuer::connect(copy(&ca), &opts(&relay.addr))
            .await
            .unwrap();
        issue_workload(
            &issuer,
            &sans("p", "a"),
            Some(MOTO_VALIDITY),
            KeyAlgorithm::EcdsaP256,
            now,
        )
        .await
        .unwrap();
        assert_eq!(
            issuer.client().calls(),
            5,
            "1 IssueCertificate + 3 in-progress polls + 1 GetCertificate"
        );
        assert_eq!(relay.issue_calls(), 1, "polling never re-issues");

        // Never ready: a retryable error after the deadline, with bounded polls.
        let relay = Relay::with_faults(
            &ep,
            vec![(
                "ACMPrivateCA.GetCertificate",
                "RequestInProgressException",
                1000,
            )],
        )
        .await;
        let o = PcaOptions {
            poll_deadline: Duration::from_millis(800),
            ..opts(&relay.addr)
        };
        let issuer = AcmPcaIssuer::connect(copy(&ca), &o).await.unwrap();
        let err = issue_workload(
            &issuer,
            &sans("p", "b"),
            Some(MOTO_VALIDITY),
            KeyAlgorithm::EcdsaP256,
            now,
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("still in progress after"), "{err}");
        assert!(matches!(
            err,
            Error::Backend {
                retryable: true,
                ..
            }
        ));
        // 100+200+400 ms of backoff fit in 800 ms: at most 5 GetCertificate calls.
        assert!(issuer.client().calls() <= 6, "{}", issuer.client().calls());
    }

    #[tokio::test]
    async fn aws_error_codes_map_to_one_line_messages() {
        let Some(ep) = moto() else { return };
        let now = OffsetDateTime::now_utc();
        let ca = new_root(&ep, "errors", now).await;
        // moto does not check CA state or IAM on IssueCertificate, and accepts any CSR it can
        // parse: the relay injects the AWS error responses for these cases.
        let cases = [
            (
                "AccessDeniedException",
                "access denied calling IssueCertificate",
                false,
                false,
            ),
            (
                "InvalidStateException",
                "is not active, so IssueCertificate is refused",
                false,
                false,
            ),
            (
                "MalformedCSRException",
                "CSR rejected: ACM PCA rejected the CSR",
                true,
                false,
            ),
            ("LimitExceededException", "AWS quota exceeded", false, false),
        ];
        for (code, want, user_error, retryable) in cases {
            let relay =
                Relay::with_faults(&ep, vec![("ACMPrivateCA.IssueCertificate", code, 1)]).await;
            let issuer = AcmPcaIssuer::connect(copy(&ca), &opts(&relay.addr))
                .await
                .unwrap();
            let err = issue_workload(
                &issuer,
                &sans("e", "a"),
                Some(MOTO_VALIDITY),
                KeyAlgorithm::EcdsaP256,
                now,
            )
            .await
            .unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(want), "{code}: {msg}");
            assert!(
                !msg.contains('\n') && !msg.contains("SdkError") && !msg.contains("ServiceError"),
                "{msg}"
            );
            assert_eq!(err.is_user_error(), user_error, "{code}: {err:?}");
            if let Error::Backend { retryable: r, .. } = err {
                assert_eq!(r, retryable, "{code}");
            }
            assert_eq!(relay.issue_calls(), 1, "{code}: not retried");
        }
    }

    #[tokio::test]
    async fn inactive_ca_is_not_registered() {
        let Some(ep) = moto() else { return };
        let now = OffsetDateTime::now_utc();
        let ca = new_root(&ep, "disabled", now).await;
        let Backend::AcmPca { arn, .. } = ca.meta.backend.clone() else {
            unreachable!()
        };
        let client = meshca::acm::PcaClient::connect(None, &opts(&ep))
            .await
            .unwrap();
        client
            .sdk()
            .update_certificate_authority()
            .certificate_authority_arn(&arn)
            .status(aws_sdk_acmpca::types::CertificateAuthorityStatus::Disabled)
            .send()
            .await
            .unwrap();
        let err = register_pca("off", &arn, &PcaCaSpec::default(), &opts(&ep), now)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("is not active (status DISABLED)"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn burst_is_queued_and_shed_not_amplified() {
        let Some(ep) = moto() else { return };
        let now = OffsetDateTime::now_utc();
        let ca = new_root(&ep, "burst", now).await;
        let relay = Relay::start(&ep, 0).await;
        let o = PcaOptions {
            limiter: LimiterConfig {
                rate_per_sec: 4.0,
                burst: 2,
                max_wait: Duration::from_millis(600),
            },
            ..opts(&relay.addr)
        };
        let issuer = Arc::new(AcmPcaIssuer::connect(ca, &o).await.unwrap());
        let mut tasks = Vec::new();
        for i in 0..12 {
            let issuer = issuer.clone();
            tasks.push(tokio::spawn(async move {
                issue_workload(
                    issuer.as_ref(),
                    &sans("burst", &format!("w{i}")),
                    Some(MOTO_VALIDITY),
                    KeyAlgorithm::EcdsaP256,
                    now,
                )
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
            }));
        }
        let mut ok = 0;
        let mut shed = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(()) => ok += 1,
                Err(e) => {
                    assert!(
                        e.starts_with("acm-pca: throttled locally: arn:aws:acm-pca:"),
                        "{e}"
                    );
                    shed += 1;
                }
            }
        }
        // 2 at once + at most 600 ms of queue at 4/s (2 more, plus one of slack for timing);
        // the rest are shed without reaching AWS.
        assert!((4..=5).contains(&ok), "ok={ok} shed={shed}");
        assert_eq!(ok + shed, 12);
        assert_eq!(relay.issue_calls(), ok, "shed requests cost no AWS call");
    }

    /// A retry of the same managed Secret through ACM PCA presents the same CSR, so the same
    /// idempotency token (AWS returns the first certificate instead of billing a second).
    /// The relay throttles the first IssueCertificate with no client-side retry, so the
    /// managed-Secret controller itself retries.
    #[cfg(feature = "kube")]
    #[tokio::test]
    async fn managed_secret_retry_reuses_the_idempotency_token() {
        use meshca::kube::issuers::IssuerSet;
        use meshca::kube::managed::Managed;
        let Some(ep) = moto() else { return };
        let now = OffsetDateTime::now_utc();
        let ca = new_root(&ep, "managed", now).await;
        let relay = Relay::start(&ep, 1).await;
        let o = PcaOptions {
            throttle_retries: 0,
            throttle_backoff: Duration::from_millis(20),
            ..opts(&relay.addr)
        };
        let name = ca.meta.name.clone();
        // The CA serves managed Secrets in namespace `app`, any service name there.
        let mut served = copy(&ca);
        served.meta.policy.managed_namespaces = vec!["app".into()];
        served.meta.policy.allowed_dns = vec!["*.{ns}.svc".into()];
        let issuer: Arc<dyn Issuer> = Arc::new(AcmPcaIssuer::connect(served, &o).await.unwrap());
        // A Kubernetes API that accepts every write (the Secret's annotation and apply).
        let svc = tower::service_fn(|req: http::Request<kube::client::Body>| async move {
            let body = http_body_util::BodyExt::collect(req.into_body())
                .await
                .unwrap()
                .to_bytes();
            Ok::<_, std::convert::Infallible>(
                http::Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(if body.is_empty() {
                        b"{}".to_vec()
                    } else {
                        body.to_vec()
                    }))
                    .unwrap(),
            )
        });
        let m = Managed::new(
            kube::Client::new(svc, "default"),
            IssuerSet::watch_fixed([(name.clone(), issuer)].into_iter().collect()),
            Arc::new(meshca::kube::metrics::Metrics::new()),
            Arc::new(meshca::kube::ratelimit::RateLimiter::new(0.0, 1)),
            meshca::kube::leader::always_leader(),
            Arc::new(meshca::clock::SystemClock),
        );
        let s: k8s_openapi::api::core::v1::Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "w", "namespace": "app", "resourceVersion": "1", "annotations": {
                "meshca.io/ca": name, "meshca.io/dns-names": "w.app.svc", "meshca.io/ttl": "8760h"}},
        }))
        .unwrap();
        let e = m.reconcile(&s).await.unwrap_err();
        assert!(
            matches!(
                e,
                Error::Backend {
                    retryable: true,
                    ..
                }
            ),
            "{e}"
        );
        m.reconcile(&s).await.unwrap();
        assert_eq!(relay.issue_calls(), 2, "one throttled call and its retry");
        let t = relay.tokens();
        assert_eq!(t.len(), 2, "{t:?}");
        assert_eq!(t[0], t[1], "the retry sends the same idempotency token");
    }

    /// A CSR made by openssl (P-256 key) with `subj` and `-addext` values, as DER.
    fn openssl_csr_der(dir: &std::path::Path, name: &str, subj: &str, addext: &[&str]) -> Vec<u8> {
        let key = dir.join(format!("{name}.key"));
        let csr = dir.join(format!("{name}.der"));
        let cnf = dir.join("req.cnf");
        std::fs::write(
            &cnf,
            "[req]\ndistinguished_name=dn\n[dn]\n[dir_sect]\nCN=someone else\n",
        )
        .unwrap();
        let run = |args: &[&std::ffi::OsStr]| {
            let o = std::process::Command::new("openssl")
                .args(args)
                .output()
                .expect("openssl must be installed (.ci/run installs it)");
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        };
        run(&[
            "genpkey".as_ref(),
            "-algorithm".as_ref(),
            "EC".as_ref(),
            "-pkeyopt".as_ref(),
            "ec_paramgen_curve:P-256".as_ref(),
            "-out".as_ref(),
            key.as_os_str(),
        ]);
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "req".as_ref(),
            "-new".as_ref(),
            "-config".as_ref(),
            cnf.as_os_str(),
            "-key".as_ref(),
            key.as_os_str(),
            "-subj".as_ref(),
            subj.as_ref(),
            "-outform".as_ref(),
            "DER".as_ref(),
            "-out".as_ref(),
            csr.as_os_str(),
        ];
        for a in addext {
            args.push("-addext".as_ref());
            args.push(a.as_ref());
        }
        run(&args);
        std::fs::read(csr).unwrap()
    }

    /// Issue 9: AWS copies a CSR's SAN extension and subject, so a CSR carrying SAN forms or
    /// subject attributes meshca cannot check is refused before any AWS call, also when the
    /// SANs are given separately (API passthrough); a CSR holding only checkable values is
    /// issued, and the certificate carries exactly the checked SANs.
    #[tokio::test]
    async fn passthrough_refuses_what_meshca_cannot_check() {
        let Some(ep) = moto() else { return };
        let now = OffsetDateTime::now_utc();
        let dir = tempfile::tempdir().unwrap();
        let ca = new_root(&ep, "passthrough", now).await;
        let relay = Relay::start(&ep, 0).await;
        let issuer = AcmPcaIssuer::connect(ca, &opts(&relay.addr)).await.unwrap();
        let checked = Sans {
            dns: vec![DnsName::parse("api.ns.svc").unwrap()],
            ..Sans::default()
        };
        let with_ttl = |override_sans: Option<Sans>| CsrOptions {
            override_sans,
            ttl: Some(MOTO_VALIDITY),
            ..CsrOptions::default()
        };
        let cases: &[(&str, &str, &[&str], bool, &str)] = &[
            (
                "othername",
                "/CN=api.ns.svc",
                &["subjectAltName=DNS:api.ns.svc,otherName:1.3.6.1.4.1.311.20.2.3;UTF8:admin@corp"],
                false,
                "otherName",
            ),
            (
                "dirname",
                "/CN=api.ns.svc",
                &["subjectAltName=DNS:api.ns.svc,dirName:dir_sect"],
                false,
                "directoryName",
            ),
            (
                "rid",
                "/CN=api.ns.svc",
                &["subjectAltName=DNS:api.ns.svc,RID:1.2.3.4"],
                false,
                "registeredID",
            ),
            (
                "email",
                "/CN=api.ns.svc",
                &["subjectAltName=DNS:api.ns.svc,email:a@b.example"],
                false,
                "e-mail",
            ),
            (
                "ou",
                "/CN=api.ns.svc/OU=admins",
                &["subjectAltName=DNS:api.ns.svc"],
                false,
                "OU=admins",
            ),
            (
                "cn",
                "/CN=root.corp.example",
                &["subjectAltName=DNS:api.ns.svc"],
                false,
                "CN=root.corp.example",
            ),
            // Passthrough: the SANs come from the request, the CSR still goes to AWS.
            (
                "override-othername",
                "/CN=api.ns.svc",
                &["subjectAltName=DNS:other.ns.svc,otherName:1.3.6.1.4.1.311.20.2.3;UTF8:x@corp"],
                true,
                "otherName",
            ),
            (
                "override-subject",
                "/O=evil/CN=api.ns.svc",
                &["subjectAltName=DNS:other.ns.svc"],
                true,
                "O=evil",
            ),
        ];
        for (name, subj, ext, over, why) in cases {
            let der = openssl_csr_der(dir.path(), name, subj, ext);
            let e = issue_csr(&issuer, &der, &with_ttl(over.then(|| checked.clone())), now)
                .await
                .map(|c| c.info.sans)
                .expect_err(&format!("{name}: a CSR carrying what meshca cannot check"));
            assert!(e.to_string().contains(why), "{name}: {e}");
            assert!(e.is_user_error(), "{name}: {e}");
        }
        assert_eq!(relay.issue_calls(), 0, "refused CSRs cost no AWS call");

        // Only checkable values: CN = a checked SAN, O = the trust domain.
        let der = openssl_csr_der(
            dir.path(),
            "good",
            "/O=cluster.local/CN=api.ns.svc",
            &["subjectAltName=DNS:api.ns.svc"],
        );
        let cert = issue_csr(&issuer, &der, &with_ttl(None), now)
            .await
            .unwrap();
        assert_eq!(cert.info.sans.dns, vec!["api.ns.svc".to_string()]);
        assert!(cert.info.sans.other.is_empty() && cert.info.sans.email.is_empty());
        assert_eq!(relay.issue_calls(), 1);
    }

    /// istio#56191: AWS Private CA refuses a certificate with an empty subject unless its SAN
    /// extension is critical (RFC 5280 4.2.1.6), and ztunnel's CSRs have an empty subject and
    /// a non-critical SAN. meshca then sends the SANs as a critical custom extension through
    /// the APIPassthrough template: checked here on the request that reaches the endpoint
    /// (moto ignores ApiPassthrough, so the certificate it returns proves nothing about it).
    /// A CSR with a subject keeps the plain template: its twin.
    #[tokio::test]
    async fn empty_subject_sends_a_critical_san() {
        let Some(ep) = moto() else { return };
        let now = OffsetDateTime::now_utc();
        let dir = tempfile::tempdir().unwrap();
        let ca = new_root(&ep, "ztunnel", now).await;
        let relay = Relay::start(&ep, 0).await;
        let issuer = AcmPcaIssuer::connect(ca, &opts(&relay.addr)).await.unwrap();
        let id = "spiffe://cluster.local/ns/app/sa/web";
        let opts = CsrOptions {
            ttl: Some(MOTO_VALIDITY),
            ..CsrOptions::default()
        };
        let ztunnel = openssl_csr_der(
            dir.path(),
            "zt",
            "/",
            &[&format!("subjectAltName=URI:{id}")],
        );
        let cert = issue_csr(&issuer, &ztunnel, &opts, now).await.unwrap();
        assert_eq!(cert.info.sans.uri, vec![id.to_string()]);
        let sent = String::from_utf8_lossy(&relay.sent.lock().unwrap()).to_string();
        assert!(
            sent.contains("template/EndEntityCertificate_APIPassthrough/V1"),
            "{sent}"
        );
        let custom = sent
            .split("\"CustomExtensions\":")
            .nth(1)
            .unwrap_or_else(|| panic!("no CustomExtensions sent: {sent}"));
        assert!(
            custom.contains("\"Critical\":true")
                && custom.contains("\"ObjectIdentifier\":\"2.5.29.17\""),
            "{custom}"
        );
        // The SAN's value is exactly the URI asked for.
        let value = custom
            .split("\"Value\":\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        use base64::Engine;
        let der = base64::engine::general_purpose::STANDARD
            .decode(value)
            .unwrap();
        assert!(String::from_utf8_lossy(&der).contains(id));
        let want = Sans {
            spiffe_id: Some(SpiffeId::parse(id).unwrap()),
            ..Sans::default()
        };
        assert_eq!(der, meshca::issue::acm_pca::san_extension_der(&want));

        // Twin: a subject (CN = the SPIFFE ID, O = the trust domain), the plain template.
        relay.sent.lock().unwrap().clear();
        let named = openssl_csr_der(
            dir.path(),
            "named",
            // openssl's -subj takes "/" as the separator: escape the ID's.
            &format!("/O=cluster.local/CN={}", id.replace('/', "\\/")),
            &[&format!("subjectAltName=URI:{id}")],
        );
        issue_csr(&issuer, &named, &opts, now).await.unwrap();
        let sent = String::from_utf8_lossy(&relay.sent.lock().unwrap()).to_string();
        assert!(sent.contains("template/EndEntityCertificate/V1"), "{sent}");
        assert!(!sent.contains("CustomExtensions"), "{sent}");
    }
}
