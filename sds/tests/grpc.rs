//! In-process tests of the SDS server with a tonic client, over a Unix socket and TCP.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use meshca_sds::metrics::Mode;
use meshca_sds::{ServeConfig, Server, SourceConfig, SECRET_TYPE_URL};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_ack_nack_and_stale_nonce_over_unix() {
    let home = Home::new().await;
    let (server, sock) = start(&home, local_source(&home, None)).await;
    let mut client = Client::new(unix_channel(&sock).await);
    let mut s = Sotw::open(&mut client, &["default", "ROOTCA"]).await;
    let a = s.recv().await;
    let b = s.recv().await;
    let mut got: Vec<_> = [&a, &b]
        .iter()
        .map(|r| decode(&r.resources[0]).name)
        .collect();
    got.sort();
    assert_eq!(got, vec!["ROOTCA", "default"]);
    let (rootca, default) = if decode(&a.resources[0]).name == "ROOTCA" {
        (a, b)
    } else {
        (b, a)
    };
    let d = one_secret(&default, "default");
    let r = one_secret(&rootca, "ROOTCA");
    assert_eq!(bundle_len(&r), 1);
    let serial1 = leaf_serial(&d);
    // ACK both (the older nonce first, as Envoy would on a shared stream).
    s.send(req(
        &["default", "ROOTCA"],
        &rootca.nonce,
        &rootca.version_info,
        None,
    ))
    .await;
    s.send(req(
        &["default", "ROOTCA"],
        &default.nonce,
        &default.version_info,
        None,
    ))
    .await;
    s.quiet(Duration::from_millis(400)).await;
    assert_eq!(server.metrics().acks.get(Mode::Sotw), 2);

    // Forced renewal: only `default` is pushed, with a new serial.
    server.reload();
    let r2 = s.recv().await;
    let d2 = one_secret(&r2, "default");
    assert_ne!(leaf_serial(&d2), serial1);
    assert_ne!(r2.version_info, default.version_info);
    s.quiet(Duration::from_millis(400)).await;

    // NACK it: the rejected version is not pushed again.
    s.send(req(
        &["default", "ROOTCA"],
        &r2.nonce,
        &default.version_info,
        Some("rejected for the test"),
    ))
    .await;
    s.quiet(Duration::from_millis(600)).await;
    assert_eq!(server.metrics().nacks.get(Mode::Sotw), 1);

    // A stale nonce with a different subscription set is ignored.
    s.send(req(&["default"], "s999-1", &default.version_info, None))
        .await;
    s.quiet(Duration::from_millis(300)).await;
    assert_eq!(server.metrics().stale_nonces.get(Mode::Sotw), 1);

    // The next real change goes out.
    server.reload();
    let r3 = s.recv().await;
    assert_ne!(leaf_serial(&one_secret(&r3, "default")), leaf_serial(&d2));

    // Fetch returns the same current version.
    let f = client
        .fetch_secrets(req(&["default"], "", "", None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f.version_info, r3.version_info);
    assert_eq!(
        leaf_serial(&one_secret(&f, "default")),
        leaf_serial(&decode(&r3.resources[0]))
    );
    let e = client
        .fetch_secrets(req(&["nope"], "", "", None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    // Metrics and health over HTTP.
    let m = server.metrics_addr().unwrap();
    let (code, body) = http_get(m, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        body.contains("meshca_sds_nacks_total{mode=\"sotw\"} 1"),
        "{body}"
    );
    assert!(body.contains("meshca_sds_streams_open 1"), "{body}");
    assert!(body.contains("meshca_sds_rotations_total 3"), "{body}");
    assert_eq!(http_get(m, "/healthz").await.0, 200);
    assert_eq!(http_get(m, "/nope").await.0, 404);

    server.shutdown().await.unwrap();
    assert!(!sock.exists(), "socket removed on shutdown");
    // The open stream was ended by the shutdown.
    let end = tokio::time::timeout(Duration::from_secs(5), s.rx.message())
        .await
        .expect("stream not ended");
    assert!(matches!(end, Ok(None) | Err(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_subscribe_unsubscribe_over_tcp() {
    let home = Home::new().await;
    let (server, _sock) = start(&home, local_source(&home, None)).await;
    let addr = server.tcp_addrs()[0];
    let mut client = Client::new(tcp_channel(addr).await);
    let mut d = Delta::open(&mut client, dreq(&["default"], &[], "", None)).await;
    let r = d.recv().await;
    assert_eq!(r.resources.len(), 1);
    assert_eq!(r.resources[0].name, "default");
    assert_eq!(
        decode(r.resources[0].resource.as_ref().unwrap()).name,
        "default"
    );
    assert_eq!(r.resources[0].version, r.system_version_info);
    d.send(dreq(&[], &[], &r.nonce, None)).await;
    d.quiet(Duration::from_millis(300)).await;
    assert_eq!(server.metrics().acks.get(Mode::Delta), 1);

    // Subscribe to ROOTCA: only it is sent.
    d.send(dreq(&["ROOTCA"], &[], "", None)).await;
    let r = d.recv().await;
    assert_eq!(r.resources.len(), 1);
    assert_eq!(r.resources[0].name, "ROOTCA");
    d.send(dreq(&[], &[], &r.nonce, None)).await;

    // A bundle update reaches the subscribed stream.
    home.set_bundle("mesh", &["ca1", "ca2"]).await;
    let r = d.recv().await;
    assert_eq!(r.resources[0].name, "ROOTCA");
    assert_eq!(
        bundle_len(&decode(r.resources[0].resource.as_ref().unwrap())),
        2
    );
    d.send(dreq(&[], &[], &r.nonce, None)).await;

    // Unsubscribe: the next bundle change is not sent.
    d.send(dreq(&[], &["ROOTCA"], "", None)).await;
    home.set_bundle("mesh", &["ca1"]).await;
    d.quiet(Duration::from_millis(700)).await;

    // An unknown name: nothing invented; it is sent once it appears.
    d.send(dreq(&["frontend"], &[], "", None)).await;
    d.quiet(Duration::from_millis(400)).await;
    home.set_bundle("frontend", &["ca2"]).await;
    let r = d.recv().await;
    assert_eq!(r.resources.len(), 1);
    assert_eq!(r.resources[0].name, "frontend");
    // NACK it: not re-sent.
    d.send(dreq(&[], &[], &r.nonce, Some("nope"))).await;
    d.quiet(Duration::from_millis(400)).await;
    assert_eq!(server.metrics().nacks.get(Mode::Delta), 1);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_unknown_name_is_served_once_it_appears() {
    let home = Home::new().await;
    let (server, sock) = start(&home, local_source(&home, None)).await;
    let mut client = Client::new(unix_channel(&sock).await);
    let mut s = Sotw::open(&mut client, &["backend"]).await;
    s.quiet(Duration::from_millis(500)).await;
    home.set_bundle("backend", &["ca1", "ca2"]).await;
    let r = s.recv().await;
    assert_eq!(bundle_len(&one_secret(&r, "backend")), 2);
    // Unchanged on later polls: nothing resent.
    s.quiet(Duration::from_millis(500)).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_reaches_every_open_stream() {
    let home = Home::new().await;
    let (server, sock) = start(&home, local_source(&home, None)).await;
    let unix = unix_channel(&sock).await;
    let tcp = tcp_channel(server.tcp_addrs()[0]).await;
    let mut sotw = Vec::new();
    let mut delta = Vec::new();
    for i in 0..10 {
        let mut c = Client::new(if i % 2 == 0 {
            unix.clone()
        } else {
            tcp.clone()
        });
        let mut s = Sotw::open(&mut c, &["default"]).await;
        let r = s.recv().await;
        s.send(req(&["default"], &r.nonce, &r.version_info, None))
            .await;
        sotw.push(s);
        let mut d = Delta::open(&mut c, dreq(&["default"], &[], "", None)).await;
        let r = d.recv().await;
        d.send(dreq(&[], &[], &r.nonce, None)).await;
        delta.push(d);
    }
    assert!(
        eventually(5, || server.metrics().streams_open.load(Ordering::Relaxed)
            == 20)
        .await
    );
    server.reload();
    let mut versions = std::collections::BTreeSet::new();
    for s in &mut sotw {
        versions.insert(s.recv().await.version_info);
    }
    for d in &mut delta {
        versions.insert(d.recv().await.system_version_info);
    }
    assert_eq!(versions.len(), 1, "every stream got the same new version");
    // Clients vanish: no stream task is left behind.
    drop(sotw);
    drop(delta);
    assert!(
        eventually(5, || server.metrics().streams_open.load(Ordering::Relaxed)
            == 0)
        .await
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_statuses() {
    let home = Home::new().await;
    let (server, sock) = start(&home, local_source(&home, None)).await;
    let mut client = Client::new(unix_channel(&sock).await);
    let mut bad = req(&["default"], "", "", None);
    bad.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
    let mut s = Sotw::open_raw(&mut client, bad).await;
    let e = tokio::time::timeout(Duration::from_secs(5), s.rx.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("unsupported type_url"));
    let e = client
        .fetch_secrets(req(&[], "", "", None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let many: Vec<String> = (0..2000).map(|i| format!("n{i}")).collect();
    let names: Vec<&str> = many.iter().map(String::as_str).collect();
    let mut s = Sotw::open(&mut client, &names).await;
    let e = tokio::time::timeout(Duration::from_secs(5), s.rx.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // The server is still fine.
    let mut ok = Sotw::open(&mut client, &["default"]).await;
    one_secret(&ok.recv().await, "default");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_reconnects_leave_nothing_behind() {
    let home = Home::new().await;
    let (server, sock) = start(&home, local_source(&home, None)).await;
    let ch = unix_channel(&sock).await;
    for _ in 0..300 {
        let mut c = Client::new(ch.clone());
        let mut s = Sotw::open(&mut c, &["default", "ROOTCA"]).await;
        s.recv().await;
        // Vanish mid-stream without ACKing.
    }
    assert!(
        eventually(10, || server.metrics().streams_open.load(Ordering::Relaxed)
            == 0)
        .await
    );
    assert_eq!(server.metrics().streams_total.get(Mode::Sotw), 300);
    server.shutdown().await.unwrap();
}

fn write_secret_dir(root: &std::path::Path, gen: &str, cert: &str, key: &str, ca: &str) {
    // The layout of a mounted Secret: files are symlinks into ..data, itself a symlink to a
    // timestamped directory that Kubernetes swaps atomically.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_source_pushes_secret_swaps() {
    let home = Home::new().await;
    let mount = home.tmp().join("mount");
    std::fs::create_dir_all(&mount).unwrap();
    let ca1 = home.root_pem("ca1").await;
    let (c1, k1) = home.client_cert("ca1", "w1").await;
    let rd = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();
    write_secret_dir(&mount, "gen1", &rd(&c1), &rd(&k1), &ca1);
    let src = SourceConfig::Files {
        cert: mount.join("tls.crt"),
        key: mount.join("tls.key"),
        ca: mount.join("ca.crt"),
        expected: None,
    };
    let (server, sock) = start(&home, src).await;
    let mut client = Client::new(unix_channel(&sock).await);
    let mut s = Sotw::open(&mut client, &["default"]).await;
    let r1 = s.recv().await;
    let serial1 = leaf_serial(&one_secret(&r1, "default"));
    s.send(req(&["default"], &r1.nonce, &r1.version_info, None))
        .await;
    s.quiet(Duration::from_millis(400)).await;

    // Kubernetes updates the Secret: new ..data target.
    let (c2, k2) = home.client_cert("ca1", "w2").await;
    write_secret_dir(&mount, "gen2", &rd(&c2), &rd(&k2), &ca1);
    let r2 = s.recv().await;
    assert_ne!(leaf_serial(&one_secret(&r2, "default")), serial1);

    // A broken update (key of another cert) is refused; the good one stays served.
    write_secret_dir(&mount, "gen3", &rd(&c1), &rd(&k2), &ca1);
    s.quiet(Duration::from_millis(600)).await;
    assert!(server.metrics().source_errors.load(Ordering::Relaxed) > 0);
    // A cert from a CA outside ca.crt is refused too.
    let (c3, k3) = home.client_cert("ca2", "w3").await;
    write_secret_dir(&mount, "gen4", &rd(&c3), &rd(&k3), &ca1);
    s.quiet(Duration::from_millis(600)).await;
    let f = client
        .fetch_secrets(req(&["default"], "", "", None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        f.version_info, r2.version_info,
        "still serving the last good secret"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_fails_clearly_on_bad_source() {
    let home = Home::new().await;
    let mut src = local_source(&home, None);
    if let SourceConfig::LocalCa { ca, .. } = &mut src {
        *ca = "nope".into();
    }
    let cfg = ServeConfig::new(
        src,
        vec![meshca_sds::Listen::Tcp("127.0.0.1:0".parse().unwrap())],
    );
    let e = Server::start(cfg).await.unwrap_err().to_string();
    assert!(e.contains("unknown CA \"nope\""), "{e}");
    let cfg = ServeConfig::new(
        SourceConfig::Files {
            cert: home.tmp().join("missing.crt"),
            key: home.tmp().join("missing.key"),
            ca: home.tmp().join("missing-ca.crt"),
            expected: None,
        },
        vec![meshca_sds::Listen::Tcp("127.0.0.1:0".parse().unwrap())],
    );
    let e = Server::start(cfg).await.unwrap_err().to_string();
    assert!(e.contains("missing.crt"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_outage_keeps_serving_and_recovers() {
    let home = Home::new().await;
    let (server, sock) = start(&home, local_source(&home, None)).await;
    let mut client = Client::new(unix_channel(&sock).await);
    let mut s = Sotw::open(&mut client, &["default"]).await;
    let r1 = s.recv().await;
    s.send(req(&["default"], &r1.nonce, &r1.version_info, None))
        .await;
    // The CA becomes unreadable.
    let cadir = home.path().join("cas/ca1");
    let hidden = home.path().join("cas-hidden-ca1");
    std::fs::rename(&cadir, &hidden).unwrap();
    server.reload();
    assert!(
        eventually(5, || server.metrics().source_errors.load(Ordering::Relaxed)
            > 0)
        .await
    );
    s.quiet(Duration::from_millis(300)).await;
    let f = client
        .fetch_secrets(req(&["default"], "", "", None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        f.version_info, r1.version_info,
        "current certificate still served"
    );
    // It comes back: the pending forced renewal goes through.
    std::fs::rename(&hidden, &cadir).unwrap();
    let r2 = s.recv().await;
    assert_ne!(r2.version_info, r1.version_info);
    server.shutdown().await.unwrap();
}

impl Sotw {
    async fn open_raw(client: &mut Client, first: DiscoveryRequest) -> Sotw {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(first).await.unwrap();
        let rx = client
            .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Sotw { tx, rx }
    }
}

#[test]
fn type_url_constant_matches_envoy() {
    assert_eq!(SECRET_TYPE_URL, <envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret as prost::Name>::type_url());
}
