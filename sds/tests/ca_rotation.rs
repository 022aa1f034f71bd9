//! A CA rotation seen by an open SDS stream when the server runs with `--ca` alone (no
//! `--bundle`): `ROOTCA` must hold both roots from `prepare` until `prune`, as a bundle
//! naming the CA would, so the workload never switches its certificate and its trust at the
//! same moment.

mod common;

use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use meshca::rotation::Request;
use meshca::store::rotate::RotateOptions;
use meshca::store::Store;
use meshca_sds::SourceConfig;

/// The SHA-256 fingerprints of a validation_context secret's anchors.
fn anchors(s: &Secret) -> Vec<String> {
    let mut f: Vec<_> = bundle_certs(s)
        .iter()
        .map(|c| meshca::pemutil::fingerprint_sha256(c))
        .collect();
    f.sort();
    f
}

async fn root_fp(home: &Home) -> String {
    let ca = home.store.load_ca("ca1").await.unwrap();
    meshca::pemutil::fingerprint_sha256(ca.root())
}

/// Receives until a response for `name` arrives; ACKs every response.
async fn next_of(s: &mut Sotw, name: &str) -> Secret {
    for _ in 0..10 {
        let r = s.recv().await;
        s.send(req(&["default", "ROOTCA"], &r.nonce, &r.version_info, None))
            .await;
        let sec = decode(&r.resources[0]);
        if sec.name == name {
            return sec;
        }
    }
    panic!("no {name} update");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_alone_serves_both_roots_from_prepare_until_prune() {
    let home = Home::new().await;
    let mut src = local_source(&home, Some(Duration::from_secs(3600)));
    if let SourceConfig::LocalCa { bundle, .. } = &mut src {
        *bundle = None;
    }
    let (server, sock) = start(&home, src).await;
    let mut client = Client::new(unix_channel(&sock).await);
    let mut s = Sotw::open(&mut client, &["default", "ROOTCA"]).await;
    let old = root_fp(&home).await;
    let first = next_of(&mut s, "ROOTCA").await;
    assert_eq!(anchors(&first), vec![old.clone()]);

    let opts = RotateOptions::default();
    home.rotate_ca1(Request::Prepare, opts.clone())
        .await
        .unwrap();
    let prepared = next_of(&mut s, "ROOTCA").await;
    let next = meshca::pemutil::fingerprint_sha256(
        home.store
            .load_rotation_cas("ca1", meshca::store::Slot::Next)
            .await
            .unwrap()[0]
            .root(),
    );
    let mut both = vec![old.clone(), next.clone()];
    both.sort();
    assert_eq!(anchors(&prepared), both, "after prepare: old and new root");

    let now_opts = RotateOptions {
        renew_now: true,
        ..Default::default()
    };
    home.rotate_ca1(Request::Activate, now_opts.clone())
        .await
        .unwrap();
    assert_eq!(root_fp(&home).await, next);
    // activate --now: `default` comes from the new CA while ROOTCA still trusts both.
    let (mut default, mut rootca) = (None, None);
    let end = tokio::time::Instant::now() + Duration::from_millis(1500);
    while let Ok(Ok(Some(r))) = tokio::time::timeout_at(end, s.rx.message()).await {
        s.send(req(&["default", "ROOTCA"], &r.nonce, &r.version_info, None))
            .await;
        let sec = decode(&r.resources[0]);
        if sec.name == "default" {
            default = Some(sec);
        } else if sec.name == "ROOTCA" {
            rootca = Some(sec);
        }
    }
    let new_ski = home
        .store
        .load_ca("ca1")
        .await
        .unwrap()
        .info()
        .unwrap()
        .subject_key_id
        .unwrap();
    let default = default.expect("activate --now renews `default`");
    assert_eq!(
        leaf_info(&default).authority_key_id.as_deref(),
        Some(new_ski.as_str())
    );
    if let Some(r) = rootca {
        assert_eq!(anchors(&r), both, "after activate: still old and new root");
    }

    // prune (forced: the server's old certificate is still in the ledger): the old root goes.
    let forced = RotateOptions {
        force: true,
        ..Default::default()
    };
    home.rotate_ca1(Request::Prune, forced.clone())
        .await
        .unwrap();
    let pruned = next_of(&mut s, "ROOTCA").await;
    assert_eq!(
        anchors(&pruned),
        vec![next],
        "after prune: the new root alone"
    );
    server.shutdown().await.unwrap();
}
