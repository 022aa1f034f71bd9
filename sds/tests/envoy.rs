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

/// The bootstrap with its meshca_sds cluster replaced by `deploy/sds/sds-cluster-mtls.yaml`:
/// SDS over TCP to `sds`, Envoy presenting `client` (cert, key) and checking meshca's
/// certificate against `server_ca`.
fn mtls_bootstrap(
    sds: std::net::SocketAddr,
    port: u16,
    client: (&Path, &Path),
    server_ca: &Path,
) -> String {
    let b = bootstrap(false, &Listen::Tcp(sds), port);
    let at = b
        .find("  - name: meshca_sds\n")
        .expect("meshca_sds cluster");
    let cluster = include_str!("../../deploy/sds/sds-cluster-mtls.yaml")
        .replace(
            "/etc/meshca-sds/envoy-client.crt",
            &client.0.display().to_string(),
        )
        .replace(
            "/etc/meshca-sds/envoy-client.key",
            &client.1.display().to_string(),
        )
        .replace(
            "/etc/meshca-sds/server-ca.crt",
            &server_ca.display().to_string(),
        )
        .replace(
            "socket_address: { address: 10.0.0.5, port_value: 8234 }",
            &format!(
                "socket_address: {{ address: {}, port_value: {} }}",
                sds.ip(),
                sds.port()
            ),
        );
    assert!(cluster.contains(&format!("port_value: {}", sds.port())));
    format!("{}{cluster}", &b[..at])
}

/// Envoy reaches meshca over TCP with mutual TLS (a static client certificate): an Envoy
/// whose SPIFFE ID is on the allow-list gets its secrets and serves mTLS with them; one
/// with a valid certificate of the same CA but another identity is refused in the
/// handshake and never gets a secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_gets_secrets_over_mtls_and_a_client_off_the_allow_list_is_refused() {
    let Some(bin) = envoy_bin() else { return };
    let home = Home::new().await;
    let ca1 = home.tmp().join("ca1.pem");
    std::fs::write(&ca1, home.root_pem("ca1").await).unwrap();
    let server_sans = meshca::identity::Sans {
        dns: vec![meshca::identity::DnsName::parse("meshca-sds.local").unwrap()],
        ..Default::default()
    };
    let (srv_cert, srv_key) = home.cert_with("ca1", "sds-server", &server_sans).await;
    let (envoy_cert, envoy_key) = home.client_cert("ca1", "envoy").await;
    let (stranger_cert, stranger_key) = home.client_cert("ca1", "stranger").await;
    let mut cfg = ServeConfig::new(
        local_source(&home, Some(Duration::from_secs(3600))),
        vec![Listen::Tcp("127.0.0.1:0".parse().unwrap())],
    );
    cfg.tls = Some(meshca_sds::TlsConfig {
        cert: srv_cert,
        key: srv_key,
        client_ca: ca1.clone(),
        allow: meshca_sds::ClientAllowList {
            spiffe_ids: vec![meshca::identity::SpiffeId::parse(
                "spiffe://cluster.local/ns/test/sa/envoy",
            )
            .unwrap()],
            subjects: vec![],
        },
    });
    let server = Server::start(cfg).await.unwrap();
    let sds = server.tcp_addrs()[0];

    // The allowed Envoy.
    let dir_a = home.tmp().join("envoy-a");
    std::fs::create_dir_all(&dir_a).unwrap();
    let port_a = free_port();
    let envoy_a = Envoy::start(
        &bin,
        &dir_a,
        &mtls_bootstrap(sds, port_a, (&envoy_cert, &envoy_key), &ca1),
    );
    let (c1, k1) = home.client_cert("ca1", "client1").await;
    let mut last = Err(String::new());
    for _ in 0..100 {
        last = curl(port_a, &ca1, &c1, &k1).await;
        if last.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        last.as_deref(),
        Ok("hello from envoy\n"),
        "envoy log:\n{}",
        envoy_a.log_tail()
    );
    assert!(envoy_a
        .serving_serials()
        .await
        .contains(&served_serial(&server)));
    let ssl = envoy_a.stats("^cluster\\.meshca_sds\\.ssl\\.").await;
    eprintln!("allowed envoy, SDS cluster TLS stats: {ssl:?}");
    let handshakes: u64 = ssl
        .get("cluster.meshca_sds.ssl.handshake")
        .expect("ssl.handshake stat")
        .parse()
        .unwrap();
    assert!(handshakes >= 1, "{ssl:?}");
    let sds_stats = envoy_a.stats("^sds\\.").await;
    assert_eq!(
        sds_stats
            .get("sds.default.update_rejected")
            .map(String::as_str),
        Some("0"),
        "{sds_stats:?}"
    );
    assert_eq!(
        server
            .metrics()
            .clients_refused
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );

    // An Envoy with a valid certificate from the same CA, but not on the allow-list.
    let dir_b = home.tmp().join("envoy-b");
    std::fs::create_dir_all(&dir_b).unwrap();
    let port_b = free_port();
    let streams_before = server
        .metrics()
        .streams_total
        .get(meshca_sds::metrics::Mode::Sotw);
    let envoy_b = Envoy::start(
        &bin,
        &dir_b,
        &mtls_bootstrap(sds, port_b, (&stranger_cert, &stranger_key), &ca1),
    );
    let refused = eventually(20, || {
        server
            .metrics()
            .clients_refused
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    })
    .await;
    assert!(
        refused,
        "meshca did not refuse the stranger; envoy log:\n{}",
        envoy_b.log_tail()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sds_b = envoy_b.stats("^sds\\.").await;
    let ssl_b = envoy_b
        .stats("^cluster\\.meshca_sds\\.(ssl|upstream_cx)")
        .await;
    eprintln!("refused envoy: sds stats {sds_b:?}; SDS cluster stats {ssl_b:?}");
    assert!(
        sds_b
            .get("sds.default.update_success")
            .is_none_or(|v| v == "0"),
        "the refused Envoy got a secret: {sds_b:?}"
    );
    // (/certs lists its own static SDS client certificate, never meshca's workload one.)
    assert!(
        !envoy_b
            .serving_serials()
            .await
            .contains(&served_serial(&server)),
        "the refused Envoy holds the workload certificate"
    );
    assert!(
        ssl_b
            .get("cluster.meshca_sds.ssl.handshake")
            .is_some_and(|v| v == "0"),
        "{ssl_b:?}"
    );
    assert!(curl(port_b, &ca1, &c1, &k1).await.is_err());
    assert_eq!(
        server
            .metrics()
            .streams_total
            .get(meshca_sds::metrics::Mode::Sotw),
        streams_before,
        "no SDS stream from the refused Envoy"
    );
    // The allowed Envoy is unaffected.
    assert_eq!(
        curl(port_a, &ca1, &c1, &k1).await.as_deref(),
        Ok("hello from envoy\n")
    );
    drop(envoy_b);
    drop(envoy_a);
    server.shutdown().await.unwrap();
}

/// Envoy's `google_grpc` client (gRPC C-core) over the Unix socket: it sends the
/// percent-encoded socket path as `:authority`, which h2 alone refuses with PROTOCOL_ERROR
/// (Envoy then logs `StreamSecrets gRPC config stream ... closed: 13, Stream removed`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_google_grpc_over_unix_socket() {
    let Some(bin) = envoy_bin() else { return };
    let home = Home::new().await;
    let sock = home.tmp().join("sds.sock");
    let mut cfg = ServeConfig::new(local_source(&home, None), vec![Listen::Unix(sock.clone())]);
    cfg.rotation.poll_interval = Duration::from_millis(200);
    let server = Server::start(cfg).await.unwrap();
    let port = free_port();
    let b = bootstrap(false, &Listen::Unix(sock.clone()), port);
    let google = format!(
        "google_grpc: {{ target_uri: \"unix:{}\", stat_prefix: meshca_sds }}",
        sock.display()
    );
    assert_eq!(
        b.matches("envoy_grpc: { cluster_name: meshca_sds }")
            .count(),
        2
    );
    let b = b.replace("envoy_grpc: { cluster_name: meshca_sds }", &google);
    let envoy = Envoy::start(&bin, home.tmp(), &b);

    let ca1 = home.tmp().join("ca1.pem");
    std::fs::write(&ca1, home.root_pem("ca1").await).unwrap();
    let (c1, k1) = home.client_cert("ca1", "client1").await;
    let served = eventually_async(20, || async {
        curl(port, &ca1, &c1, &k1).await.as_deref() == Ok("hello from envoy\n")
    })
    .await;
    assert!(served, "envoy log:\n{}", envoy.log_tail());
    let stats = envoy.stats("^sds\\.").await;
    for s in ["default", "ROOTCA"] {
        assert!(
            stat(&stats, &format!("sds.{s}.update_success")) >= 1,
            "{stats:?}"
        );
        assert_eq!(
            stat(&stats, &format!("sds.{s}.update_rejected")),
            0,
            "{stats:?}"
        );
    }
    assert!(
        !std::fs::read_to_string(&envoy.log)
            .unwrap_or_default()
            .contains("Stream removed"),
        "log:\n{}",
        envoy.log_tail()
    );
    drop(envoy);
    server.shutdown().await.unwrap();
}
