//! "Workloads signed by different CAs" through SDS and a real Envoy (path in
//! `MESHCA_ENVOY_BIN`), on the local store.
//!
//! `ca1` signs the frontend (Envoy's listener certificate, `default`, from one in-process
//! meshca SDS server) and the client `blue`; `ca2` signs the client `green`. The listener
//! validates clients with `ROOTCA`, the bundle `mesh`:
//! - while `mesh` holds ca1 only, blue passes and green is refused (`unknown ca`);
//! - once `mesh` holds ca1 and ca2 (what `meshca bundle update mesh --add-ca ca2` stores), the
//!   server pushes the new `ROOTCA` on the open stream and green passes, with neither Envoy
//!   nor the SDS server restarted and no SDS reconnect.
//!
//! Without `MESHCA_ENVOY_BIN` the test prints a skip reason, or fails when `CI=true`.

mod common;

use std::time::Duration;

use common::envoy::*;
use common::*;

const OK: &str = "hello from envoy\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn green_from_ca2_is_accepted_once_the_bundle_adds_ca2_without_a_restart() {
    let Some(bin) = envoy_bin() else { return };
    let home = Home::new().await; // ca1, ca2; bundle mesh = [ca1]
                                  // A long TTL: nothing but the bundle change makes the server push.
    let (server, mut envoy, port) = server_and_envoy(
        &bin,
        &home,
        local_source(&home, Some(Duration::from_secs(3600))),
        false,
    )
    .await;
    let pid = envoy.child.id();

    // The clients trust the frontend's CA; the frontend's trust is the question.
    let ca1_file = home.tmp().join("ca1.pem");
    std::fs::write(&ca1_file, home.root_pem("ca1").await).unwrap();
    let (blue_c, blue_k) = home.client_cert("ca1", "blue").await;
    let (green_c, green_k) = home.client_cert("ca2", "green").await;

    let ready = eventually_async(30, || async {
        curl(port, &ca1_file, &blue_c, &blue_k).await.as_deref() == Ok(OK)
    })
    .await;
    assert!(ready, "envoy never served blue; log:\n{}", envoy.log_tail());
    let frontend_serial = envoy.serving_serials().await;
    assert!(frontend_serial.contains(&served_serial(&server)));

    // ROOTCA = [ca1]: green (ca2) is refused in the handshake, and Envoy counts it.
    let listener_stat = format!("listener.127.0.0.1_{port}.ssl.fail_verify_error");
    let before_fail = stat(&envoy.stats("ssl.fail_verify_error").await, &listener_stat);
    let e = curl(port, &ca1_file, &green_c, &green_k)
        .await
        .expect_err("green must be refused while ROOTCA holds ca1 only");
    assert!(e.contains("unknown ca"), "refused with: {e}");
    let after_fail = stat(&envoy.stats("ssl.fail_verify_error").await, &listener_stat);
    assert_eq!(after_fail, before_fail + 1, "Envoy refused green's chain");

    let stats = envoy
        .stats("^(sds\\.ROOTCA\\.|cluster\\.meshca_sds\\.upstream_cx_total)")
        .await;
    let rootca_before = stat(&stats, "sds.ROOTCA.update_success");
    let cx_before = stat(&stats, "cluster.meshca_sds.upstream_cx_total");
    assert!(cx_before >= 1, "{stats:?}");

    // The bundle change, as `meshca bundle update mesh --add-ca ca2` stores it.
    home.set_bundle("mesh", &["ca1", "ca2"]).await;
    let took = eventually_async(20, || async {
        stat(
            &envoy.stats("^sds\\.ROOTCA\\.").await,
            "sds.ROOTCA.update_success",
        ) > rootca_before
    })
    .await;
    assert!(
        took,
        "envoy did not take the new ROOTCA; log:\n{}",
        envoy.log_tail()
    );
    let green_ok = eventually_async(10, || async {
        curl(port, &ca1_file, &green_c, &green_k).await.as_deref() == Ok(OK)
    })
    .await;
    assert!(green_ok, "green still refused after ca2 joined the bundle");
    assert_eq!(
        curl(port, &ca1_file, &blue_c, &blue_k).await.as_deref(),
        Ok(OK),
        "blue still passes"
    );

    // No restart anywhere: the same Envoy process, the same SDS connection, the same
    // frontend certificate, and nothing NACKed.
    assert!(envoy.alive(), "envoy exited");
    assert_eq!(envoy.child.id(), pid);
    let stats = envoy
        .stats("^(sds\\.|cluster\\.meshca_sds\\.upstream_cx_total)")
        .await;
    assert_eq!(
        stat(&stats, "cluster.meshca_sds.upstream_cx_total"),
        cx_before,
        "no SDS reconnect: {stats:?}"
    );
    assert_eq!(stat(&stats, "sds.ROOTCA.update_rejected"), 0, "{stats:?}");
    assert_eq!(stat(&stats, "sds.default.update_rejected"), 0, "{stats:?}");
    assert_eq!(envoy.serving_serials().await, frontend_serial);
    server.shutdown().await.unwrap();
}
