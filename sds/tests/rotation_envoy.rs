//! A CA rotation under traffic through a real Envoy (path in `MESHCA_ENVOY_BIN`).
//!
//! Envoy's listener takes its certificate (`default`) and its client trust (`ROOTCA`) from
//! one in-process meshca SDS server issuing from CA `ca1`. A client holding a certificate
//! from the old `ca1` sends a request every 100 ms through `prepare` and `activate --now`:
//! none may fail. After activate Envoy serves a certificate of the new CA; a client
//! re-issued from the new CA is accepted; after prune the old-CA client is refused. Run
//! twice: with `--bundle mesh` and with `--ca` alone.
//!
//! Without `MESHCA_ENVOY_BIN` the test prints a skip reason, or fails when `CI=true`.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::envoy::*;
use common::*;
use meshca::rotation::Request;
use meshca::store::rotate::RotateOptions;
use meshca::store::Store;

const OK: &str = "hello from envoy\n";

/// Requests every 100 ms until stopped; counts successes and keeps every failure.
struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    fn start(
        port: u16,
        ca: std::path::PathBuf,
        cert: std::path::PathBuf,
        key: std::path::PathBuf,
    ) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let (s, o, f) = (stop.clone(), ok.clone(), failures.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            while !s.load(Ordering::Relaxed) {
                tick.tick().await;
                match curl(port, &ca, &cert, &key).await {
                    Ok(b) if b == OK => {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(b) => f.lock().unwrap().push(format!("unexpected body {b:?}")),
                    Err(e) => f.lock().unwrap().push(e),
                }
            }
        });
        Traffic {
            stop,
            ok,
            failures,
            task,
        }
    }

    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        let f = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), f)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_traffic_has_zero_failed_requests() {
    rotation_under_traffic(true).await;
}

/// `sds serve --ca ca1` without `--bundle`: ROOTCA must follow the rotation as a bundle
/// naming the CA does (both roots from prepare until prune).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_traffic_with_ca_alone_has_zero_failed_requests() {
    rotation_under_traffic(false).await;
}

async fn rotation_under_traffic(with_bundle: bool) {
    let Some(bin) = envoy_bin() else { return };
    let home = Home::new().await;
    // A long TTL: only the rotation makes the server renew.
    let mut source = local_source(&home, Some(Duration::from_secs(3600)));
    if !with_bundle {
        if let meshca_sds::SourceConfig::LocalCa { bundle, .. } = &mut source {
            *bundle = None;
        }
    }
    let (server, envoy, port) = server_and_envoy(&bin, &home, source, false).await;

    // The client trusts what the rotation publishes (the bundle file it re-exports).
    let out_dir = home.tmp().join("pub");
    std::fs::create_dir_all(&out_dir).unwrap();
    let ca_file = out_dir.join("mesh_bundle.pem");
    std::fs::write(&ca_file, home.root_pem("ca1").await).unwrap();
    let (old_c, old_k) = home.client_cert("ca1", "old-client").await;
    let ready = eventually_async(30, || async {
        curl(port, &ca_file, &old_c, &old_k).await.as_deref() == Ok(OK)
    })
    .await;
    assert!(ready, "envoy never served; log:\n{}", envoy.log_tail());
    let old_serials = envoy.serving_serials().await;
    let old_ca = home.store.load_ca("ca1").await.unwrap();
    let old_ski = old_ca.info().unwrap().subject_key_id.unwrap();

    let traffic = Traffic::start(port, ca_file.clone(), old_c.clone(), old_k.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

    // prepare: the new root joins ROOTCA; Envoy takes the bundle update.
    let before = stat(
        &envoy.stats("^sds\\.ROOTCA\\.").await,
        "sds.ROOTCA.update_success",
    );
    let opts = RotateOptions {
        out_dir: Some(out_dir.clone()),
        ..Default::default()
    };
    home.rotate_ca1(Request::Prepare, opts.clone())
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(&ca_file)
            .unwrap()
            .matches("BEGIN CERTIFICATE")
            .count(),
        2,
        "the published bundle holds both roots"
    );
    let took_bundle = eventually_async(20, || async {
        stat(
            &envoy.stats("^sds\\.ROOTCA\\.").await,
            "sds.ROOTCA.update_success",
        ) > before
    })
    .await;
    assert!(
        took_bundle,
        "envoy did not take the new ROOTCA; log:\n{}",
        envoy.log_tail()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    // activate --now: the server re-issues from the new CA at once, without a restart.
    let opts_now = RotateOptions {
        renew_now: true,
        out_dir: Some(out_dir.clone()),
        ..Default::default()
    };
    home.rotate_ca1(Request::Activate, opts_now.clone())
        .await
        .unwrap();
    let new_ca = home.store.load_ca("ca1").await.unwrap();
    let new_ski = new_ca.info().unwrap().subject_key_id.unwrap();
    assert_ne!(old_ski, new_ski);
    let switched = eventually_async(20, || async {
        let s = envoy.serving_serials().await;
        !s.is_empty() && s != old_serials && s.contains(&served_serial(&server))
    })
    .await;
    assert!(
        switched,
        "envoy kept the old certificate; log:\n{}",
        envoy.log_tail()
    );
    // The served certificate is the new CA's: its ledger line carries the new key's id.
    let serial = served_serial(&server);
    let ledger = home.store.ledger().await.unwrap();
    let line = ledger
        .iter()
        .find(|e| norm_serial(&e.serial) == serial)
        .expect("the served certificate is in the ledger");
    assert_eq!(line.aki.as_deref(), Some(new_ski.as_str()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ok, failures) = traffic.finish().await;
    eprintln!(
        "requests during prepare and activate: {ok} ok, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "failed requests during rotation: {failures:?}"
    );
    assert!(ok >= 10, "traffic actually ran ({ok} requests)");

    // A client re-issued from the new CA is accepted.
    let (new_c, new_k) = home.client_cert("ca1", "new-client").await;
    assert_eq!(
        curl(port, &ca_file, &new_c, &new_k).await.as_deref(),
        Ok(OK)
    );

    // prune is refused while the old server certificate is live in the ledger; forced, the
    // old root leaves ROOTCA and the old-CA client is refused.
    let e = home
        .rotate_ca1(Request::Prune, opts.clone())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("prune refused"), "{e}");
    let forced = RotateOptions {
        force: true,
        out_dir: Some(out_dir.clone()),
        ..Default::default()
    };
    home.rotate_ca1(Request::Prune, forced.clone())
        .await
        .unwrap();
    let refused = eventually_async(20, || async {
        curl(port, &ca_file, &old_c, &old_k).await.is_err()
    })
    .await;
    assert!(refused, "old-CA client still accepted after prune");
    assert_eq!(
        curl(port, &ca_file, &new_c, &new_k).await.as_deref(),
        Ok(OK)
    );
    let stats = envoy.stats("^sds\\.").await;
    assert_eq!(stat(&stats, "sds.default.update_rejected"), 0, "{stats:?}");
    assert_eq!(stat(&stats, "sds.ROOTCA.update_rejected"), 0, "{stats:?}");
    server.shutdown().await.unwrap();
}

/// `sds serve --crl`: Envoy takes ROOTCA with the CA's CRL (every CA of the chain has one, so
/// Envoy's default full-chain CRL check passes), then refuses a client once its revocation
/// is pushed, while an unrevoked client of the same CA still gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_refuses_a_revoked_client_once_the_crl_arrives() {
    let Some(bin) = envoy_bin() else { return };
    let home = Home::new().await;
    let mut src = local_source(&home, Some(Duration::from_secs(3600)));
    if let meshca_sds::SourceConfig::LocalCa { crl, .. } = &mut src {
        *crl = true;
    }
    let (server, envoy, port) = server_and_envoy(&bin, &home, src, false).await;
    let ca_file = home.tmp().join("ca1.pem");
    std::fs::write(&ca_file, home.root_pem("ca1").await).unwrap();
    let (good_c, good_k) = home.client_cert("ca1", "good").await;
    let (bad_c, bad_k) = home.client_cert("ca1", "bad").await;
    let ready = eventually_async(30, || async {
        curl(port, &ca_file, &good_c, &good_k).await.as_deref() == Ok(OK)
    })
    .await;
    assert!(ready, "envoy never served; log:\n{}", envoy.log_tail());
    assert_eq!(
        curl(port, &ca_file, &bad_c, &bad_k).await.as_deref(),
        Ok(OK),
        "not revoked yet"
    );
    let before = stat(
        &envoy.stats("^sds\\.ROOTCA\\.").await,
        "sds.ROOTCA.update_success",
    );

    let pem = std::fs::read(&bad_c).unwrap();
    let der = meshca::pemutil::parse_certs(&pem, "bad").unwrap();
    let serial = meshca::x509::CertInfo::from_der(&der[0])
        .unwrap()
        .serial_hex();
    home.store
        .revoke(&meshca::crl::Revocation {
            serial: meshca::crl::normalize_serial(&serial).unwrap(),
            ca: "ca1".into(),
            reason: meshca::crl::Reason::KeyCompromise,
            revoked_at: time::OffsetDateTime::now_utc(),
        })
        .await
        .unwrap();
    let refused = eventually_async(20, || async {
        curl(port, &ca_file, &bad_c, &bad_k).await.is_err()
    })
    .await;
    assert!(
        refused,
        "revoked client still accepted; log:\n{}",
        envoy.log_tail()
    );
    assert_eq!(
        curl(port, &ca_file, &good_c, &good_k).await.as_deref(),
        Ok(OK),
        "the unrevoked client of the same CA passes"
    );
    let stats = envoy.stats("^sds\\.").await;
    assert!(
        stat(&stats, "sds.ROOTCA.update_success") > before,
        "{stats:?}"
    );
    assert_eq!(stat(&stats, "sds.ROOTCA.update_rejected"), 0, "{stats:?}");
    // Unchanged revocations are not pushed again.
    let settled = stat(
        &envoy.stats("^sds\\.ROOTCA\\.").await,
        "sds.ROOTCA.update_success",
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        stat(
            &envoy.stats("^sds\\.ROOTCA\\.").await,
            "sds.ROOTCA.update_success"
        ),
        settled
    );
    server.shutdown().await.unwrap();
}
