//! meshca SDS against a real Envoy (path in `MESHCA_ENVOY_BIN`).
//!
//! Each test starts the SDS server in-process and Envoy with `deploy/sds/envoy-bootstrap.yaml`
//! (ports, socket path, API type and transport substituted), then shows through curl and
//! Envoy's admin API that:
//! - an mTLS request with a client certificate from the same CA succeeds;
//! - one from another CA is refused;
//! - a short-TTL rotation makes Envoy serve a new serial with `update_rejected` at 0;
//! - a trust-bundle update admitting the second CA lets its client in, same Envoy process.
//!
//! Without `MESHCA_ENVOY_BIN` the tests print a skip reason, or fail when `CI=true`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::envoy::*;
use common::*;
use meshca_sds::{Listen, ServeConfig, Server};

async fn scenario(delta: bool, tcp: bool) {
    let Some(bin) = envoy_bin() else { return };
    let home = Home::new().await;
    let sock = home.tmp().join("sds.sock");
    let listen = if tcp {
        Listen::Tcp("127.0.0.1:0".parse().unwrap())
    } else {
        Listen::Unix(sock.clone())
    };
    let mut cfg = ServeConfig::new(
        local_source(&home, Some(Duration::from_secs(10))),
        vec![listen],
    );
    cfg.rotation.poll_interval = Duration::from_millis(200);
    let server = Server::start(cfg).await.unwrap();
    let sds_addr = if tcp {
        Listen::Tcp(server.tcp_addrs()[0])
    } else {
        Listen::Unix(sock)
    };
    let port = free_port();
    let mut envoy = Envoy::start(&bin, home.tmp(), &bootstrap(delta, &sds_addr, port));

    let ca1 = home.tmp().join("ca1.pem");
    std::fs::write(&ca1, home.root_pem("ca1").await).unwrap();
    let (c1, k1) = home.client_cert("ca1", "client1").await;
    let (c2, k2) = home.client_cert("ca2", "client2").await;

    // Same-CA client gets through once Envoy has its secrets.
    let mut last = Err(String::new());
    for _ in 0..100 {
        last = curl(port, &ca1, &c1, &k1).await;
        if last.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        last.as_deref(),
        Ok("hello from envoy\n"),
        "envoy log:\n{}",
        envoy.log_tail()
    );

    // A client from another CA is refused.
    let refused = curl(port, &ca1, &c2, &k2).await;
    assert!(
        refused.is_err(),
        "ca2 client must be refused before the bundle update"
    );
    eprintln!("ca2 client refused as expected: {}", refused.unwrap_err());

    // Rotation (TTL 10 s, renewal at ~50%): Envoy serves a new serial, the one meshca serves.
    let first = envoy.serving_serials().await;
    if first.is_empty() {
        eprintln!("/certs: {}", envoy.get("/certs").await);
    }
    assert!(!first.is_empty(), "envoy /certs shows no chain");
    let mut rotated = false;
    for _ in 0..150 {
        let now = envoy.serving_serials().await;
        let want = served_serial(&server);
        if !now.is_empty() && now != first && now.contains(&want) {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        rotated,
        "envoy did not pick up the rotated certificate; log:\n{}",
        envoy.log_tail()
    );
    let stats = envoy.stats("^sds\\.").await;
    eprintln!("envoy sds stats: {stats:?}");
    assert_eq!(
        stats.get("sds.default.update_rejected").map(String::as_str),
        Some("0"),
        "{stats:?}"
    );
    assert_eq!(
        stats.get("sds.ROOTCA.update_rejected").map(String::as_str),
        Some("0"),
        "{stats:?}"
    );
    let ok: u64 = stats
        .get("sds.default.update_success")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        ok >= 2,
        "at least the first certificate and one rotation: {stats:?}"
    );
    assert_eq!(
        curl(port, &ca1, &c1, &k1).await.as_deref(),
        Ok("hello from envoy\n")
    );

    // A bundle update admitting ca2 lets its client in, without restarting Envoy.
    let pid = envoy.child.id();
    home.set_bundle("mesh", &["ca1", "ca2"]).await;
    let mut admitted = Err(String::new());
    for _ in 0..100 {
        admitted = curl(port, &ca1, &c2, &k2).await;
        if admitted.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        admitted.as_deref(),
        Ok("hello from envoy\n"),
        "log:\n{}",
        envoy.log_tail()
    );
    assert!(
        envoy.alive() && envoy.child.id() == pid,
        "same Envoy process"
    );
    assert_eq!(
        curl(port, &ca1, &c1, &k1).await.as_deref(),
        Ok("hello from envoy\n")
    );
    let stats = envoy.stats("^sds\\.").await;
    assert_eq!(
        stats.get("sds.default.update_rejected").map(String::as_str),
        Some("0"),
        "{stats:?}"
    );
    assert_eq!(
        stats.get("sds.ROOTCA.update_rejected").map(String::as_str),
        Some("0"),
        "{stats:?}"
    );
    let cx = envoy
        .stats("^cluster\\.meshca_sds\\.upstream_cx_total")
        .await;
    eprintln!(
        "sds connections: {cx:?}; server: {}",
        server
            .metrics()
            .render()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert_eq!(
        cx.get("cluster.meshca_sds.upstream_cx_total")
            .map(String::as_str),
        Some("1"),
        "no reconnects"
    );
    let mode = if delta {
        meshca_sds::metrics::Mode::Delta
    } else {
        meshca_sds::metrics::Mode::Sotw
    };
    assert_eq!(server.metrics().nacks.get(mode), 0);
    assert!(server.metrics().acks.get(mode) >= 4);
    drop(envoy);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_sotw_over_unix_socket() {
    scenario(false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_delta_over_unix_socket() {
    scenario(true, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_sotw_over_tcp() {
    scenario(false, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_delta_over_tcp() {
    scenario(true, true).await;
}

/// Envoy keeps its last good secrets while meshca is down, reconnects (sending its last
/// accepted version with an empty nonce) and takes the new server's certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_survives_sds_restart_and_resyncs() {
    let Some(bin) = envoy_bin() else { return };
    let home = Home::new().await;
    let sock = home.tmp().join("sds.sock");
    let start = || async {
        let mut cfg = ServeConfig::new(
            local_source(&home, Some(Duration::from_secs(3600))),
            vec![Listen::Unix(sock.clone())],
        );
        cfg.rotation.poll_interval = Duration::from_millis(200);
        Server::start(cfg).await.unwrap()
    };
    let first = start().await;
    let port = free_port();
    let envoy = Envoy::start(
        &bin,
        home.tmp(),
        &bootstrap(false, &Listen::Unix(sock.clone()), port),
    );
    let ca1 = home.tmp().join("ca1.pem");
    std::fs::write(&ca1, home.root_pem("ca1").await).unwrap();
    let (c1, k1) = home.client_cert("ca1", "client1").await;
    let mut ok = false;
    for _ in 0..100 {
        if curl(port, &ca1, &c1, &k1).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ok, "log:\n{}", envoy.log_tail());
    let serial1 = served_serial(&first);
    assert!(envoy.serving_serials().await.contains(&serial1));

    // meshca goes away: Envoy keeps serving the last good certificate.
    first.shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        curl(port, &ca1, &c1, &k1).await.as_deref(),
        Ok("hello from envoy\n")
    );
    assert!(envoy.serving_serials().await.contains(&serial1));

    // A new server (with a newly issued certificate) on the same socket: Envoy reconnects.
    let second = start().await;
    let serial2 = served_serial(&second);
    assert_ne!(serial1, serial2);
    let mut resynced = false;
    for _ in 0..400 {
        if envoy.serving_serials().await.contains(&serial2) {
            resynced = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(resynced, "envoy did not resync; log:\n{}", envoy.log_tail());
    assert_eq!(
        curl(port, &ca1, &c1, &k1).await.as_deref(),
        Ok("hello from envoy\n")
    );
    let stats = envoy.stats("^sds\\.").await;
    assert_eq!(
        stats.get("sds.default.update_rejected").map(String::as_str),
        Some("0"),
        "{stats:?}"
    );
    let cx: u64 = envoy
        .stats("^cluster\\.meshca_sds\\.upstream_cx_total")
        .await
        .get("cluster.meshca_sds.upstream_cx_total")
        .unwrap()
        .parse()
        .unwrap();
    assert!(cx >= 2, "a reconnect shows in upstream_cx_total ({cx})");
    drop(envoy);
    second.shutdown().await.unwrap();
}

/// File source (a mounted Secret with `..data` swaps) through a real Envoy: a new
/// certificate and a new `ca.crt` reach Envoy without restarting it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_file_source_follows_secret_swaps() {
    let Some(bin) = envoy_bin() else { return };
    let home = Home::new().await;
    let mount = home.tmp().join("mount");
    std::fs::create_dir_all(&mount).unwrap();
    let rd = |p: &Path| std::fs::read_to_string(p).unwrap();
    let sans = workload_sans();
    let ca1_pem = home.root_pem("ca1").await;
    let ca2_pem = home.root_pem("ca2").await;
    let (s1, k1) = home.cert_with("ca1", "server1", &sans).await;
    write_secret_dir(&mount, "gen1", &rd(&s1), &rd(&k1), &ca1_pem);
    let sock = home.tmp().join("sds.sock");
    let mut cfg = ServeConfig::new(
        meshca_sds::SourceConfig::Files {
            cert: mount.join("tls.crt"),
            key: mount.join("tls.key"),
            ca: mount.join("ca.crt"),
            expected: Some(sans.clone()),
        },
        vec![Listen::Unix(sock.clone())],
    );
    cfg.rotation.poll_interval = Duration::from_millis(200);
    let server = Server::start(cfg).await.unwrap();
    let port = free_port();
    let mut envoy = Envoy::start(
        &bin,
        home.tmp(),
        &bootstrap(true, &Listen::Unix(sock), port),
    );
    let ca1 = home.tmp().join("ca1.pem");
    std::fs::write(&ca1, &ca1_pem).unwrap();
    let (c1, ck1) = home.client_cert("ca1", "client1").await;
    let (c2, ck2) = home.client_cert("ca2", "client2").await;
    let mut ok = Err(String::new());
    for _ in 0..100 {
        ok = curl(port, &ca1, &c1, &ck1).await;
        if ok.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        ok.as_deref(),
        Ok("hello from envoy\n"),
        "log:\n{}",
        envoy.log_tail()
    );
    assert!(curl(port, &ca1, &c2, &ck2).await.is_err());
    let serial1 = served_serial(&server);

    // The Secret is updated: new certificate, and ca.crt now trusts ca2 as well.
    let (s2, k2) = home.cert_with("ca1", "server2", &sans).await;
    write_secret_dir(
        &mount,
        "gen2",
        &rd(&s2),
        &rd(&k2),
        &format!("{ca1_pem}{ca2_pem}"),
    );
    let mut admitted = false;
    for _ in 0..100 {
        let serials = envoy.serving_serials().await;
        if !serials.contains(&serial1) && curl(port, &ca1, &c2, &ck2).await.is_ok() {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(admitted, "log:\n{}", envoy.log_tail());
    assert!(envoy
        .serving_serials()
        .await
        .contains(&served_serial(&server)));
    assert!(envoy.alive());
    let stats = envoy.stats("^sds\\.").await;
    assert_eq!(
        stats.get("sds.default.update_rejected").map(String::as_str),
        Some("0"),
        "{stats:?}"
    );
    assert_eq!(
        stats.get("sds.ROOTCA.update_rejected").map(String::as_str),
        Some("0"),
        "{stats:?}"
    );
    drop(envoy);
    server.shutdown().await.unwrap();
}
